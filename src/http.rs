//! `/healthz`, `/readyz` and `/metrics` for orchestrators and Prometheus.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::stats::{Role, Stats};

/// A leader whose pipeline loop has not turned for this long is wedged.
const WEDGED_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --http-addr {addr}: {source}")]
pub struct HttpError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// A bound listener; [`HttpServer::serve`] answers on it until shutdown.
pub struct HttpServer {
    listener: tokio::net::TcpListener,
}

impl HttpServer {
    /// Binds first, so a taken port fails the start instead of a background task.
    pub async fn bind(addr: SocketAddr) -> Result<Self, HttpError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError { addr, source })?;
        Ok(HttpServer { listener })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    pub async fn serve(self, stats: Arc<Stats>, mut shutdown: watch::Receiver<bool>) {
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(stats);
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(err) = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!(error = %err, "the HTTP endpoint stopped");
        }
    }
}

/// Alive and not wedged: the pipeline made progress or is idle, or this instance is waiting.
async fn healthz(State(stats): State<Arc<Stats>>) -> impl IntoResponse {
    let quiet = stats.since_last_beat();
    if stats.role() == Role::Leader && quiet > WEDGED_AFTER {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "wedged: the pipeline made no progress for {}s\n",
                quiet.as_secs()
            ),
        )
    } else {
        (StatusCode::OK, "ok\n".to_owned())
    }
}

/// Ready while streaming as leader or waiting as standby; not while PostgreSQL or NATS is
/// unreachable or the first session has not started.
async fn readyz(State(stats): State<Arc<Stats>>) -> impl IntoResponse {
    let role = stats.role();
    let status = match role {
        Role::Leader | Role::Standby => StatusCode::OK,
        Role::Starting | Role::Reconnecting => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, format!("{}\n", role.as_str()))
}

async fn metrics(State(stats): State<Arc<Stats>>) -> impl IntoResponse {
    let text = stats.encode();
    stats.scraped();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}
