//! What can go wrong on the database side, and which of it a retry can fix.

use std::time::Duration;

use pgwire_replication::PgWireError;

use super::SlotName;
use super::connection::TlsSetupError;
use crate::lsn::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to PostgreSQL at {target}: {detail}")]
    Connect {
        target: String,
        detail: String,
        transient: bool,
    },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// Several hosts, none of them a primary: a failover may be under way.
    #[error(
        "no primary among the database hosts ({hosts}); retrying (during a failover the new \
         primary appears once a standby is promoted)"
    )]
    NoPrimary { hosts: String },
    /// A table joined the publication while a session streamed: its event ids may need
    /// qualifying, and its mapping checking.
    #[error(
        "table `{table}` joined the publication while streaming; restarting the session to check \
         its mapping"
    )]
    PublicationChanged { table: String },
    #[error(
        "PostgreSQL has wal_level = {actual}; logical replication needs wal_level = logical. \
         Run `ALTER SYSTEM SET wal_level = logical;` and restart PostgreSQL"
    )]
    WalLevel { actual: String },
    #[error(
        "publication `{publication}` does not exist; create it with \
         `CREATE PUBLICATION {publication} FOR TABLE <outbox table> WITH (publish = 'insert');`"
    )]
    PublicationMissing { publication: String },
    #[error(
        "publication `{publication}` contains no table; add the outbox table with \
         `ALTER PUBLICATION {publication} ADD TABLE <outbox table>;` (or, for a table-less \
         outbox of pg_logical_emit_message events, run with --message-prefix)"
    )]
    PublicationEmpty { publication: String },
    #[error(
        "replication slot `{slot}` does not exist and --no-create-slot is set; create it with \
         `{create_sql}` (`outbox-cdc setup --apply` does)"
    )]
    SlotMissing { slot: String, create_sql: String },
    #[error(
        "replication slot `{slot}` uses the `{plugin}` plugin, but outbox-cdc needs `pgoutput`; \
         drop it (`SELECT pg_drop_replication_slot('{slot}');`) or choose another --slot"
    )]
    SlotWrongPlugin { slot: String, plugin: String },
    #[error(
        "replication slot `{slot}` belongs to database `{database}`, not `{expected}`; choose \
         another --slot"
    )]
    SlotOtherDatabase {
        slot: String,
        database: String,
        expected: String,
    },
    #[error(
        "replication slot `{slot}` has been invalidated (wal_status = {wal_status}): PostgreSQL \
         removed WAL it still needed, so events written meanwhile cannot be read. Drop it \
         (`SELECT pg_drop_replication_slot('{slot}');`) and start again: outbox-cdc then names \
         the events that may be missing and how to re-publish them from the table"
    )]
    SlotInvalidated { slot: String, wal_status: String },
    #[error(
        "--start-lsn {requested} is older than the oldest position replication slot `{slot}` can \
         still serve, {oldest}: the WAL before it is gone. Start at {oldest} or later; to keep \
         history for replays, run with --replay-window"
    )]
    StartLsnUnavailable {
        slot: String,
        requested: Lsn,
        oldest: Lsn,
    },
    #[error("replication slot `{slot}` is in use by another connection (pid {})", pid.map_or("unknown".to_string(), |p| p.to_string()))]
    SlotBusy { slot: String, pid: Option<i32> },
    #[error("{context}: {detail}")]
    Query {
        context: String,
        detail: String,
        transient: bool,
    },
    #[error("replication stream: {detail}")]
    Replication { detail: String, transient: bool },
    #[error(
        "PostgreSQL no longer streams replication slot `{slot}` to this connection (its \
         walsender, pid {walsender_pid}, is gone; the slot is now held by {}): the connection \
         was lost without notice, e.g. a dropped network path; reconnecting",
        active_pid.map_or("no one".to_string(), |p| format!("pid {p}"))
    )]
    WalsenderGone {
        slot: String,
        walsender_pid: i32,
        active_pid: Option<i32>,
    },
    #[error(
        "PostgreSQL did not answer within {waited:?} whether replication slot `{slot}` is still \
         streamed to this connection (--replication-timeout): the network path or the server \
         is stuck; reconnecting"
    )]
    Unresponsive { slot: String, waited: Duration },
    #[error("the replication stream ended")]
    Ended,
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Connect { transient, .. }
            | SourceError::Query { transient, .. }
            | SourceError::Replication { transient, .. } => *transient,
            SourceError::SlotBusy { .. }
            | SourceError::NoPrimary { .. }
            | SourceError::PublicationChanged { .. }
            | SourceError::Ended
            | SourceError::WalsenderGone { .. }
            | SourceError::Unresponsive { .. } => true,
            _ => false,
        }
    }

    pub(super) fn query(context: impl Into<String>, err: tokio_postgres::Error) -> Self {
        SourceError::Query {
            context: context.into(),
            transient: sql_error_is_transient(&err),
            detail: describe_sql_error(&err),
        }
    }

    pub(super) fn from_wire(slot: &SlotName, err: PgWireError) -> Self {
        let text = err.to_string();
        let sqlstate = text
            .rsplit_once("(SQLSTATE ")
            .and_then(|(_, rest)| rest.get(..5))
            .unwrap_or("");
        if sqlstate == "55006" {
            return SourceError::SlotBusy {
                slot: slot.to_string(),
                pid: text
                    .split_once("active for PID ")
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .and_then(|pid| pid.parse().ok()),
            };
        }
        let transient = match &err {
            PgWireError::Io(_) | PgWireError::Task(_) => true,
            // `recv` takes the worker's join handle once the worker has ended; a `select!` that
            // cancels `recv` while it waits on that handle loses the worker's own error, and the
            // next `recv` says only this. The worker ended, so the connection is gone (its
            // cause is logged by pgwire_replication): reconnect, and the next session's checks
            // name anything a retry cannot fix.
            PgWireError::Internal(detail) if detail.contains("already joined") => {
                return SourceError::Replication {
                    detail: "the replication connection ended (its cause is logged just before \
                             by pgwire_replication)"
                        .to_owned(),
                    transient: true,
                };
            }
            PgWireError::Server(_) => sqlstate_is_transient(sqlstate),
            _ => false,
        };
        SourceError::Replication {
            detail: text,
            transient,
        }
    }
}

/// Connection failures, server shutdowns and resource exhaustion pass; the rest needs a person.
fn sqlstate_is_transient(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, …)
        || code.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock
}

pub(super) fn sql_error_is_transient(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        Some(code) => sqlstate_is_transient(code.code()),
        // A certificate that does not verify, or a server without TLS under sslmode=require:
        // retrying cannot help, the configuration must change.
        None if tls_misconfiguration(err) => false,
        // No SQLSTATE: I/O, closed connection, timeout.
        None => true,
    }
}

fn tls_misconfiguration(err: &tokio_postgres::Error) -> bool {
    if err.to_string().contains("does not support TLS") {
        return true;
    }
    crate::tls::certificate_rejected(err)
}

pub(super) fn describe_sql_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError;

    #[test]
    fn classifies_replication_errors() {
        let slot: SlotName = "s".parse().unwrap();
        let busy = SourceError::from_wire(
            &slot,
            PgWireError::Server(
                "replication slot \"s\" is active for PID 4242 (SQLSTATE 55006)".into(),
            ),
        );
        assert!(
            matches!(
                busy,
                SourceError::SlotBusy {
                    pid: Some(4242),
                    ..
                }
            ),
            "{busy:?}"
        );

        let shutdown = SourceError::from_wire(
            &slot,
            PgWireError::Server(
                "terminating connection due to administrator command (SQLSTATE 57P01)".into(),
            ),
        );
        assert!(shutdown.is_transient());

        let missing = SourceError::from_wire(
            &slot,
            PgWireError::Server("publication \"p\" does not exist (SQLSTATE 42704)".into()),
        );
        assert!(!missing.is_transient());

        let io = SourceError::from_wire(
            &slot,
            PgWireError::Io(std::sync::Arc::new(std::io::Error::other("reset"))),
        );
        assert!(io.is_transient());
        let auth = SourceError::from_wire(
            &slot,
            PgWireError::Auth("password authentication failed".into()),
        );
        assert!(!auth.is_transient());
    }

    /// CI caught this on PostgreSQL 18: a crash (`pg_ctl stop -m immediate`) ended the worker
    /// while the session's `select!` had cancelled `recv` mid-join, and the process exited on
    /// "internal error: replication worker already joined" instead of reconnecting.
    #[test]
    fn a_worker_joined_by_a_cancelled_recv_is_a_lost_connection_not_a_bug() {
        let slot: SlotName = "s".parse().unwrap();
        let joined = SourceError::from_wire(
            &slot,
            PgWireError::Internal("replication worker already joined".into()),
        );
        assert!(joined.is_transient(), "{joined:?}");
        assert!(joined.to_string().contains("replication connection ended"));

        let other = SourceError::from_wire(&slot, PgWireError::Internal("bad state".into()));
        assert!(!other.is_transient(), "{other:?}");
    }
}
