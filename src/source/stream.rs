//! The replication connection: `START_REPLICATION … LOGICAL` with pgoutput, its events in WAL
//! order, and the flush position reported back.

use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};

use super::catalog::Catalog;
use super::liveness::Liveness;
use super::{SlotName, SourceConfig, SourceError};
use crate::lsn::Lsn;

/// One event of the replication stream, in WAL order.
#[derive(Debug)]
pub enum WalEvent {
    /// A transaction starts; `commit_lsn` is where it committed.
    Begin {
        commit_lsn: Lsn,
        commit_time_micros: i64,
    },
    /// A pgoutput message (Relation, Insert, …), still encoded; see [`pgoutput::decode`].
    Data(Bytes),
    /// The transaction ends; a flush position at `end_lsn` means "everything up to here is done".
    Commit { end_lsn: Lsn },
    /// The server's heartbeat: it has sent everything up to `wal_end`.
    Keepalive { wal_end: Lsn },
}

/// A running `START_REPLICATION` session. Dropping it ends the session.
pub struct ReplicationStream {
    client: ReplicationClient,
    slot: SlotName,
    liveness: Liveness,
}

impl ReplicationStream {
    /// Starts streaming from the slot's confirmed position. `confirmed` is what this process
    /// knows to be safe to report as flushed (never below the slot's own position).
    /// `catalog`'s connection watches that the server keeps streaming to this one.
    pub async fn start(
        config: &SourceConfig,
        confirmed: Lsn,
        catalog: &Catalog,
    ) -> Result<Self, SourceError> {
        let db = &config.database;
        let mut wire = ReplicationConfig::new(
            db.host.clone(),
            db.user.clone(),
            db.password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default(),
            db.dbname.clone(),
            config.slot.as_str(),
            config.publication.as_str(),
        )
        .with_port(db.port)
        .with_tls(db.replication_tls())
        // 0/0: the server starts at the slot's confirmed position. A slot cannot rewind.
        .with_start_lsn(pgwire_replication::Lsn::from_u64(0))
        .with_status_interval(config.status_interval)
        .with_wakeup_interval(config.status_interval)
        // pgoutput sends values in the session's output format: make bytea unambiguous.
        .with_options("-c bytea_output=hex")
        .with_application_name(db.application_name.clone());
        // Until told otherwise the worker reports its start LSN as flushed; 0/0 would be
        // ignored by the server, but be explicit.
        if !confirmed.is_zero() {
            wire = wire.with_ack_lsn(confirmed.into());
        }
        let wire_error = |e| SourceError::from_wire(&config.slot, e);
        // Gated: learn the walsender's pid on the session itself before it starts streaming.
        let mut client = ReplicationClient::connect_gated(wire)
            .await
            .map_err(wire_error)?;
        let rows = client
            .simple_query("SELECT pg_backend_pid()")
            .await
            .map_err(wire_error)?;
        let walsender_pid = rows
            .first()
            .and_then(|row| row.first())
            .and_then(|value| value.as_deref())
            .and_then(|text| std::str::from_utf8(text).ok()?.parse::<i32>().ok())
            .ok_or_else(|| SourceError::Replication {
                detail: format!("unexpected answer to SELECT pg_backend_pid(): {rows:?}"),
                transient: false,
            })?;
        client.start().await.map_err(wire_error)?;
        client.wait_started().await.map_err(wire_error)?;
        Ok(ReplicationStream {
            client,
            slot: config.slot.clone(),
            liveness: Liveness::watch(
                catalog.client.clone(),
                config.slot.clone(),
                walsender_pid,
                config.replication_timeout,
            ),
        })
    }

    /// The next event. Cancel-safe.
    pub async fn next(&mut self) -> Result<WalEvent, SourceError> {
        loop {
            let received = tokio::select! {
                biased;
                received = self.client.recv() => received,
                dead = self.liveness.dead() => return Err(dead),
            };
            let event = match received {
                Ok(Some(event)) => event,
                Ok(None) => return Err(SourceError::Ended),
                Err(e) => return Err(SourceError::from_wire(&self.slot, e)),
            };
            return Ok(match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    commit_time_micros,
                    ..
                } => WalEvent::Begin {
                    commit_lsn: final_lsn.into(),
                    commit_time_micros,
                },
                ReplicationEvent::XLogData { data, .. } => WalEvent::Data(data),
                ReplicationEvent::Commit { end_lsn, .. } => WalEvent::Commit {
                    end_lsn: end_lsn.into(),
                },
                ReplicationEvent::KeepAlive { wal_end, .. } => WalEvent::Keepalive {
                    wal_end: wal_end.into(),
                },
                // Logical decoding messages (pg_logical_emit_message) are not outbox rows.
                ReplicationEvent::Message { .. } => continue,
                ReplicationEvent::StoppedAt { .. } => return Err(SourceError::Ended),
            });
        }
    }

    /// Records `lsn` as durable downstream; the next status update reports it as flushed.
    pub fn confirm(&self, lsn: Lsn) {
        self.client.update_applied_lsn(lsn.into());
    }

    /// Waits until a status update carrying `lsn` has been sent (bounded by `timeout`), then ends
    /// the session.
    pub async fn finish(mut self, lsn: Lsn, timeout: Duration) {
        self.confirm(lsn);
        let metrics = self.client.metrics();
        let sent = tokio::time::timeout(timeout, async {
            while Lsn::from(metrics.last_applied_lsn()) < lsn || metrics.feedback_sent() == 0 {
                // A worker that has ended (the server closed the connection) sends nothing
                // more: waiting out the timeout would only delay the exit.
                if !self.client.is_running() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            true
        })
        .await;
        match sent {
            Ok(true) => {}
            Ok(false) => tracing::warn!(%lsn,
                "the replication connection was already closed: the final status update was not sent (the next start resumes from the slot)"),
            Err(_) => tracing::warn!(%lsn,
                "the final status update was not confirmed sent before the timeout"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.shutdown()).await;
    }
}
