//! The replication source: PostgreSQL's WAL, read through a logical slot with `pgoutput`.
//!
//! ```text
//!   Catalog (SQL, tokio-postgres)          ReplicationStream (pgwire-replication)
//!   ─ wal_level, publication, tables       ─ START_REPLICATION SLOT s LOGICAL 0/0
//!   ─ slot: create / check plugin            (proto_version 1, publication_names p)
//!   ─ who holds the slot                   ─ Begin, XLogData(bytes), Commit, Keepalive
//!                                          ─ confirm(lsn) → standby status updates
//! ```
//!
//! Progress: `confirm` only records the position; the replication worker sends it to the
//! server every `status_interval` and at once when the server asks for a reply. Only the
//! flush position moves the slot, so the caller must never confirm a position whose
//! events are not durable downstream.

pub mod connection;
mod liveness;
pub mod pgoutput;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_postgres::error::SqlState;

use crate::lsn::Lsn;
use connection::{DatabaseUrl, TlsSetupError};
use liveness::Liveness;
use pgoutput::{Relation, RelationColumn};

/// A replication slot name: PostgreSQL allows lowercase letters, digits and underscores.
/// (`pgwire-replication` does not quote it in `START_REPLICATION`, so this check also keeps the
/// command well-formed.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotName(String);

impl FromStr for SlotName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(SlotName(s.to_owned()))
        } else {
            Err(format!(
                "invalid slot name `{s}`: use 1 to 63 lowercase letters, digits and underscores"
            ))
        }
    }
}

impl SlotName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A publication name (the replication command takes a comma-separated list, so no commas).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublicationName(String);

impl FromStr for PublicationName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 63 || s.contains([',', '\0']) {
            Err(format!(
                "invalid publication name `{s}`: 1 to 63 characters, no commas"
            ))
        } else {
            Ok(PublicationName(s.to_owned()))
        }
    }
}

impl PublicationName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PublicationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub database: DatabaseUrl,
    pub slot: SlotName,
    pub publication: PublicationName,
    pub create_slot: bool,
    pub status_interval: Duration,
    /// A replication connection PostgreSQL no longer streams to, or that gets no answer for
    /// this long, is given up (see [`liveness`]).
    pub replication_timeout: Duration,
}

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
         `ALTER PUBLICATION {publication} ADD TABLE <outbox table>;`"
    )]
    PublicationEmpty { publication: String },
    #[error(
        "replication slot `{slot}` does not exist and --no-create-slot is set; create it with \
         `SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');`"
    )]
    SlotMissing { slot: String },
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
         removed WAL it still needed, so events written meanwhile cannot be read. Drop and \
         recreate the slot, and re-publish from the table if needed"
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
            | SourceError::Ended
            | SourceError::WalsenderGone { .. }
            | SourceError::Unresponsive { .. } => true,
            _ => false,
        }
    }

    fn query(context: impl Into<String>, err: tokio_postgres::Error) -> Self {
        SourceError::Query {
            context: context.into(),
            transient: sql_error_is_transient(&err),
            detail: describe_sql_error(&err),
        }
    }

    fn from_wire(slot: &SlotName, err: PgWireError) -> Self {
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

fn sql_error_is_transient(err: &tokio_postgres::Error) -> bool {
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

fn describe_sql_error(err: &tokio_postgres::Error) -> String {
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

/// What `pg_replication_slots` says about our slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub plugin: String,
    pub database: String,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
}

/// What `setup` checks on the server before logical replication can work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReadiness {
    pub wal_level: String,
    pub max_replication_slots: i32,
    pub replication_slots_used: i32,
    pub max_wal_senders: i32,
    pub role: String,
    /// REPLICATION attribute or superuser.
    pub role_can_replicate: bool,
    pub server_version: String,
}

/// Ordinary SQL against the source database: checks, slot management, status.
pub struct Catalog {
    /// Shared with the liveness watch of the running session.
    client: Arc<tokio_postgres::Client>,
    database: DatabaseUrl,
}

impl Catalog {
    pub async fn connect(database: &DatabaseUrl) -> Result<Self, SourceError> {
        let (config, tls) = database.sql_config()?;
        let (client, connection) =
            config
                .connect(tls)
                .await
                .map_err(|err| SourceError::Connect {
                    target: database.to_string(),
                    transient: sql_error_is_transient(&err)
                        && err.code() != Some(&SqlState::INVALID_PASSWORD)
                        && err.code() != Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
                    detail: describe_sql_error(&err),
                })?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "SQL connection to PostgreSQL closed");
            }
        });
        Ok(Catalog {
            client: Arc::new(client),
            database: database.clone(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// `wal_level` must be `logical`.
    pub async fn check_wal_level(&self) -> Result<(), SourceError> {
        let row = self
            .client
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(|e| SourceError::query("reading wal_level", e))?;
        let actual: String = row.get(0);
        if actual != "logical" {
            return Err(SourceError::WalLevel { actual });
        }
        Ok(())
    }

    /// The tables the publication publishes, with their columns, for checking the mapping before
    /// any event arrives.
    pub async fn publication_tables(
        &self,
        publication: &PublicationName,
    ) -> Result<Vec<Relation>, SourceError> {
        let exists = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&publication.as_str()],
            )
            .await
            .map_err(|e| SourceError::query("reading pg_publication", e))?;
        if exists.is_none() {
            return Err(SourceError::PublicationMissing {
                publication: publication.to_string(),
            });
        }
        let rows = self
            .client
            .query(
                "SELECT t.schemaname::text, t.tablename::text, c.oid,
                        array_agg(a.attname::text ORDER BY a.attnum),
                        array_agg(a.atttypid ORDER BY a.attnum)
                   FROM pg_publication_tables t
                   JOIN pg_namespace n ON n.nspname = t.schemaname
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                  WHERE t.pubname = $1
                  GROUP BY 1, 2, 3
                  ORDER BY 1, 2",
                &[&publication.as_str()],
            )
            .await
            .map_err(|e| SourceError::query("reading the publication's tables", e))?;
        if rows.is_empty() {
            return Err(SourceError::PublicationEmpty {
                publication: publication.to_string(),
            });
        }
        Ok(rows
            .iter()
            .map(|row| {
                let names: Vec<String> = row.get(3);
                let types: Vec<u32> = row.get(4);
                Relation {
                    id: row.get(2),
                    namespace: row.get(0),
                    name: row.get(1),
                    columns: names
                        .into_iter()
                        .zip(types)
                        .map(|(name, type_oid)| RelationColumn {
                            name,
                            type_oid,
                            flags: 0,
                        })
                        .collect(),
                }
            })
            .collect())
    }

    pub async fn slot_state(&self, slot: &SlotName) -> Result<Option<SlotState>, SourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT coalesce(plugin::text, ''), coalesce(database::text, ''), active_pid,
                        confirmed_flush_lsn::text, restart_lsn::text, wal_status
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot.as_str()],
            )
            .await
            .map_err(|e| SourceError::query("reading pg_replication_slots", e))?;
        Ok(row.map(|row| {
            let lsn = |i: usize| {
                row.get::<_, Option<String>>(i)
                    .and_then(|text| text.parse::<Lsn>().ok())
            };
            SlotState {
                plugin: row.get(0),
                database: row.get(1),
                active_pid: row.get(2),
                confirmed_flush_lsn: lsn(3),
                restart_lsn: lsn(4),
                wal_status: row.get(5),
            }
        }))
    }

    /// The server's current WAL write position.
    pub async fn current_wal_lsn(&self) -> Result<Lsn, SourceError> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| SourceError::query("reading pg_current_wal_lsn()", e))?;
        let text: String = row.get(0);
        text.parse()
            .map_err(|e: crate::lsn::ParseLsnError| SourceError::Query {
                context: "reading pg_current_wal_lsn()".into(),
                detail: e.to_string(),
                transient: false,
            })
    }

    /// The server settings and role attributes logical replication depends on.
    pub async fn readiness(&self) -> Result<ServerReadiness, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT current_setting('wal_level'),
                        current_setting('max_replication_slots')::int,
                        (SELECT count(*)::int FROM pg_replication_slots),
                        current_setting('max_wal_senders')::int,
                        current_user::text, r.rolreplication, r.rolsuper,
                        current_setting('server_version')
                   FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| SourceError::query("reading server settings", e))?;
        Ok(ServerReadiness {
            wal_level: row.get(0),
            max_replication_slots: row.get(1),
            replication_slots_used: row.get(2),
            max_wal_senders: row.get(3),
            role: row.get(4),
            role_can_replicate: row.get::<_, bool>(5) || row.get::<_, bool>(6),
            server_version: row.get(7),
        })
    }

    /// `pg_class.relkind` of a table name as `to_regclass` resolves it (`r` table, `p`
    /// partitioned table), or `None` when there is no such relation.
    pub async fn relation_kind(&self, table: &str) -> Result<Option<char>, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1))",
                &[&table],
            )
            .await
            .map_err(|e| SourceError::query(format!("looking up table `{table}`"), e))?;
        Ok(row
            .get::<_, Option<String>>(0)
            .and_then(|kind| kind.chars().next()))
    }

    pub async fn publication_exists(
        &self,
        publication: &PublicationName,
    ) -> Result<bool, SourceError> {
        self.client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&publication.as_str()],
            )
            .await
            .map(|row| row.is_some())
            .map_err(|e| SourceError::query("reading pg_publication", e))
    }

    /// Runs statements an operator asked for (`setup --apply`).
    pub async fn apply(&self, sql: &str) -> Result<(), SourceError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| SourceError::query(format!("applying `{}`", sql.trim()), e))
    }

    /// Makes sure the slot exists (creating it unless told not to) and suits us.
    pub async fn ensure_slot(
        &self,
        slot: &SlotName,
        create: bool,
    ) -> Result<SlotState, SourceError> {
        if self.slot_state(slot).await?.is_none() {
            if !create {
                return Err(SourceError::SlotMissing {
                    slot: slot.to_string(),
                });
            }
            match self
                .client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot.as_str()],
                )
                .await
            {
                Ok(row) => {
                    let lsn: String = row.get(0);
                    tracing::info!(slot = %slot, %lsn, "created replication slot with the pgoutput plugin");
                }
                // Another instance created it a moment ago: fine.
                Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
                Err(e) => {
                    return Err(SourceError::query(
                        format!("creating replication slot `{slot}`"),
                        e,
                    ));
                }
            }
        }
        let state = self
            .slot_state(slot)
            .await?
            .ok_or_else(|| SourceError::SlotMissing {
                slot: slot.to_string(),
            })?;
        if state.plugin != "pgoutput" {
            return Err(SourceError::SlotWrongPlugin {
                slot: slot.to_string(),
                plugin: state.plugin,
            });
        }
        if state.database != self.database.dbname {
            return Err(SourceError::SlotOtherDatabase {
                slot: slot.to_string(),
                database: state.database,
                expected: self.database.dbname.clone(),
            });
        }
        if let Some(status) = &state.wal_status
            && status == "lost"
        {
            return Err(SourceError::SlotInvalidated {
                slot: slot.to_string(),
                wal_status: status.clone(),
            });
        }
        Ok(state)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_plain_identifiers() {
        assert!("outbox_cdc_1".parse::<SlotName>().is_ok());
        for bad in ["", "Outbox", "a-b", "a b", "x;DROP", &"a".repeat(64)] {
            let err = bad.parse::<SlotName>().unwrap_err();
            assert!(err.contains("invalid slot name"), "{bad}");
        }
    }

    #[test]
    fn publication_names_cannot_hold_commas() {
        assert!("outbox_pub".parse::<PublicationName>().is_ok());
        assert!("a,b".parse::<PublicationName>().is_err());
        assert!("".parse::<PublicationName>().is_err());
    }

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
}
