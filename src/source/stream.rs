//! The replication connection: `START_REPLICATION … LOGICAL` with pgoutput, its events in WAL
//! order, and the flush position reported back.

use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{ReplicationClient, ReplicationEvent};

use super::catalog::Catalog;
use super::liveness::Liveness;
use super::{SlotName, SourceConfig, SourceError};
use crate::lsn::Lsn;

/// One event of the replication stream, in WAL order.
#[derive(Debug, Clone)]
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
    /// A logical decoding message (`pg_logical_emit_message`): inside its transaction when
    /// `transactional`, else on its own, whether or not its transaction commits.
    Message {
        transactional: bool,
        prefix: String,
        content: Bytes,
    },
}

/// A running `START_REPLICATION` session. Dropping it ends the session.
pub struct ReplicationStream {
    client: ReplicationClient,
    slot: SlotName,
    liveness: Liveness,
}

/// Who the server is, as the replication connection sees it (`IDENTIFY_SYSTEM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// The cluster's system identifier: the same on a primary and its physical standbys,
    /// another on a cluster made by `initdb`.
    pub system_id: String,
    /// The current timeline: a promoted standby starts a new one.
    pub timeline: u32,
    /// Where the server's WAL ends (flushed).
    pub wal_end: Lsn,
}

/// How an earlier timeline relates to the server's current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineAncestry {
    /// It is the current timeline.
    Current,
    /// The current timeline branched off it at this position: its WAL up to here is this
    /// server's history, what came after is not.
    BranchedAt(Lsn),
    /// It is not in this server's history.
    Unrelated,
}

/// A replication connection that has not started streaming: what it learns of the server can
/// still stop the session before anything is read.
pub struct PendingStream {
    client: ReplicationClient,
    config: SourceConfig,
    walsender_pid: i32,
    identity: ServerIdentity,
    liveness_client: std::sync::Arc<tokio_postgres::Client>,
}

impl PendingStream {
    pub fn identity(&self) -> &ServerIdentity {
        &self.identity
    }

    /// Where `timeline` stands in the current timeline's history (`TIMELINE_HISTORY`).
    pub async fn ancestry(&mut self, timeline: u32) -> Result<TimelineAncestry, SourceError> {
        let current = self.identity.timeline;
        if timeline == current {
            return Ok(TimelineAncestry::Current);
        }
        if current == 1 || timeline > current {
            return Ok(TimelineAncestry::Unrelated);
        }
        let slot = self.config.slot.clone();
        let history = self
            .client
            .timeline_history(current)
            .await
            .map_err(|e| SourceError::from_wire(&slot, e))?;
        Ok(
            branch_point(&String::from_utf8_lossy(&history.content), timeline)
                .map_or(TimelineAncestry::Unrelated, TimelineAncestry::BranchedAt),
        )
    }

    /// Sends `START_REPLICATION` and waits until the server accepted it.
    pub async fn start(mut self) -> Result<ReplicationStream, SourceError> {
        let slot = self.config.slot.clone();
        let wire_error = |e| SourceError::from_wire(&slot, e);
        self.client.start().await.map_err(wire_error)?;
        self.client.wait_started().await.map_err(wire_error)?;
        Ok(ReplicationStream {
            client: self.client,
            slot: slot.clone(),
            liveness: Liveness::watch(
                self.liveness_client,
                slot,
                self.walsender_pid,
                self.config.replication_timeout,
            ),
        })
    }
}

/// The position where `timeline` ends in a timeline history file (`<tli>\t<switchpoint>\t<reason>`
/// per line).
fn branch_point(history: &str, timeline: u32) -> Option<Lsn> {
    history.lines().find_map(|line| {
        let mut fields = line.split('\t');
        let tli: u32 = fields.next()?.trim().parse().ok()?;
        let switchpoint: Lsn = fields.next()?.trim().parse().ok()?;
        (tli == timeline).then_some(switchpoint)
    })
}

impl ReplicationStream {
    /// Opens a replication connection to the host `catalog` chose, not yet streaming.
    /// `confirmed` is what this process knows to be safe to report as flushed (never below the
    /// slot's own position). `catalog`'s connection then watches that the server keeps
    /// streaming to this one.
    pub async fn connect(
        config: &SourceConfig,
        confirmed: Lsn,
        catalog: &Catalog,
    ) -> Result<PendingStream, SourceError> {
        let db = &config.database;
        let host = catalog.host();
        if let Some(refusal) = db.replication_refusal() {
            return Err(SourceError::Connect {
                target: db.to_string(),
                transient: false,
                detail: refusal.to_owned(),
            });
        }
        let mut wire = db
            .replication_config(host, config.slot.as_str(), config.publication.as_str())
            // 0/0: the server starts at the slot's confirmed position. A slot cannot rewind.
            .with_start_lsn(pgwire_replication::Lsn::from_u64(0))
            .with_status_interval(config.status_interval)
            .with_wakeup_interval(config.status_interval)
            // pgoutput sends values in the session's output format: make bytea unambiguous.
            .with_options("-c bytea_output=hex");
        // Until told otherwise the worker reports its start LSN as flushed; 0/0 would be
        // ignored by the server, but be explicit.
        if !confirmed.is_zero() {
            wire = wire.with_ack_lsn(confirmed.into());
        }
        let wire_error = |e| SourceError::from_wire(&config.slot, e);
        // Gated: learn the walsender's pid and the server's identity on the session itself
        // before it starts streaming.
        let mut client = db
            .within_connect_timeout(ReplicationClient::connect_gated(wire))
            .await
            .map_err(|timeout| SourceError::Connect {
                target: db.to_string(),
                transient: true,
                detail: format!("{host}: {timeout}"),
            })?
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
        let system = client.identify_system().await.map_err(wire_error)?;
        Ok(PendingStream {
            client,
            config: config.clone(),
            walsender_pid,
            identity: ServerIdentity {
                system_id: system.system_id,
                timeline: system.timeline,
                wal_end: system.xlogpos.into(),
            },
            liveness_client: catalog.client.clone(),
        })
    }

    /// The next event. Cancel-safe for events; a cancel while the worker is ending loses only
    /// the worker's own error (pgwire_replication logs it), which the next call reports as a
    /// lost connection (see `SourceError::from_wire`).
    pub async fn next(&mut self) -> Result<WalEvent, SourceError> {
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
        Ok(match event {
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
            ReplicationEvent::Message {
                transactional,
                prefix,
                content,
                ..
            } => WalEvent::Message {
                transactional,
                prefix,
                content,
            },
            ReplicationEvent::StoppedAt { .. } => return Err(SourceError::Ended),
        })
    }

    /// Records `lsn` as durable downstream; the next status update reports it as flushed.
    pub fn confirm(&self, lsn: Lsn) {
        self.client.update_applied_lsn(lsn.into());
    }

    /// Waits until a status update carrying `lsn` has been sent, then ends the session; both
    /// bounded by `deadline`.
    pub async fn finish(mut self, lsn: Lsn, deadline: tokio::time::Instant) {
        self.confirm(lsn);
        let metrics = self.client.metrics();
        let sent = tokio::time::timeout_at(deadline, async {
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
                "the final status update was not confirmed sent before the shutdown timeout"),
        }
        if tokio::time::timeout_at(deadline, self.client.shutdown())
            .await
            .is_err()
        {
            self.client.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_where_a_timeline_ended_from_its_history() {
        let history = "1\t0/3023890\tno recovery target specified\n\n\
                       2\t0/5000028\tno recovery target specified\n";
        assert_eq!(branch_point(history, 1), Some(Lsn::new(0x3023890)));
        assert_eq!(branch_point(history, 2), Some(Lsn::new(0x5000028)));
        assert_eq!(branch_point(history, 3), None);
        assert_eq!(branch_point("garbage\n", 1), None);
    }
}
