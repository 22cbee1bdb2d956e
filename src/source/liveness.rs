//! Is the replication connection still alive? Asked over the SQL connection.
//!
//! A replication connection whose peer vanished without a FIN or RST (a black-holed network, a
//! stuck proxy, a NAT that forgot the flow) looks exactly like an idle outbox: nothing arrives.
//! PostgreSQL's walsender sends nothing by itself while our status updates keep arriving, so
//! silence proves nothing, and TCP notices only after many minutes of retransmissions. The
//! server knows better: once it stops hearing from us it ends the walsender after
//! `wal_sender_timeout`, and `pg_replication_slots.active_pid` stops naming our walsender. So
//! every `timeout / 3` the watch asks, and gives up on the connection when the answer names
//! another process (or none), or when no answer comes within `timeout`.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{SlotName, SourceError};

/// A running watch over one replication session; it ends with the reason the session is dead.
#[derive(Debug)]
pub struct Liveness {
    /// Taken once it has reported.
    task: Option<JoinHandle<SourceError>>,
}

impl Liveness {
    pub(super) fn watch(
        client: Arc<tokio_postgres::Client>,
        slot: SlotName,
        walsender_pid: i32,
        timeout: Duration,
    ) -> Liveness {
        let period = (timeout / 3).max(Duration::from_millis(100));
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let answer = tokio::time::timeout(
                    timeout,
                    client.query_opt(
                        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                        &[&slot.as_str()],
                    ),
                )
                .await;
                let active_pid = match answer {
                    Err(_elapsed) => {
                        return SourceError::Unresponsive {
                            slot: slot.to_string(),
                            waited: timeout,
                        };
                    }
                    Ok(Err(err)) => {
                        return SourceError::query(
                            "checking that the replication slot is still streamed by this connection",
                            err,
                        );
                    }
                    Ok(Ok(row)) => row.and_then(|row| row.get::<_, Option<i32>>(0)),
                };
                if active_pid != Some(walsender_pid) {
                    return SourceError::WalsenderGone {
                        slot: slot.to_string(),
                        walsender_pid,
                        active_pid,
                    };
                }
            }
        });
        Liveness { task: Some(task) }
    }

    /// Resolves when the session is found dead, with the reason. Cancel-safe.
    pub async fn dead(&mut self) -> SourceError {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let reason = match task.await {
            Ok(reason) => reason,
            Err(err) => SourceError::Replication {
                detail: format!("the replication liveness check failed: {err}"),
                transient: true,
            },
        };
        self.task = None;
        reason
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
