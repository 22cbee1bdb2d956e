//! Ordinary SQL against the source database: the server to use among the hosts, server checks,
//! the publication's tables, the slot.

use std::sync::Arc;

use tokio_postgres::error::SqlState;

use super::connection::{ChannelBinding, DatabaseUrl, Host, TargetSession};
use super::error::{describe_sql_error, sql_error_is_transient};
use super::pgoutput::{Relation, RelationColumn};
use super::{PublicationName, SlotName, SourceError};
use crate::lsn::Lsn;

/// PostgreSQL 17 brought failover slots (`failover`, `synced`, `sync_replication_slots`).
pub const FAILOVER_SLOTS_SINCE: i32 = 170_000;

/// What `pg_replication_slots` says about our slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotState {
    pub plugin: String,
    pub database: String,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
    /// Synced to standbys (PostgreSQL 17+; None before).
    pub failover: Option<bool>,
    /// On a standby: a copy kept in sync with the primary's (PostgreSQL 17+).
    pub synced: Option<bool>,
    pub temporary: bool,
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
    pub server_version_num: i32,
}

/// What a failover slot needs on the primary (PostgreSQL 17+).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryFailover {
    /// `synchronized_standby_slots`: the physical slots logical walsenders wait for.
    pub synchronized_standby_slots: Vec<String>,
    /// Physical slots, with whether a standby streams through each now.
    pub physical_slots: Vec<(String, bool)>,
}

/// What a failover slot needs on a standby (PostgreSQL 17+).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyFailover {
    pub in_recovery: bool,
    pub sync_replication_slots: bool,
    pub hot_standby_feedback: bool,
    /// `primary_conninfo` names a database (the slot sync worker needs one).
    pub conninfo_has_dbname: bool,
    pub primary_slot_name: String,
}

/// A snapshot exported by a slot's creation, valid while this lives (its session stays open
/// and idle).
pub struct ExportedSnapshot {
    _session: pgwire_replication::ReplicationClient,
    pub name: String,
}

/// Ordinary SQL against the source database: checks, slot management, status.
pub struct Catalog {
    /// Shared with the liveness watch of the running session.
    pub(super) client: Arc<tokio_postgres::Client>,
    database: DatabaseUrl,
    /// The host this connection went to; the replication connection goes there too.
    host: Host,
    server_version_num: i32,
}

impl Catalog {
    /// Connects to the first host that suits `target_session_attrs`: by default the first
    /// primary, skipping standbys and hosts that do not answer.
    pub async fn connect(database: &DatabaseUrl) -> Result<Self, SourceError> {
        let mut tried: Vec<String> = Vec::new();
        let mut last_error = None;
        for host in &database.hosts_to_try() {
            let client = match connect_host(database, host).await {
                Ok(client) => client,
                Err(err) => {
                    tried.push(format!("{host}: {err}"));
                    last_error = Some(err);
                    continue;
                }
            };
            let row = match client
                .query_one(
                    "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int",
                    &[],
                )
                .await
            {
                Ok(row) => row,
                Err(e) => {
                    let err = SourceError::query("reading the server's role", e);
                    tried.push(format!("{host}: {err}"));
                    last_error = Some(err);
                    continue;
                }
            };
            let in_recovery: bool = row.get(0);
            if in_recovery && database.target_session == TargetSession::Primary {
                tried.push(format!("{host}: a standby (in recovery)"));
                continue;
            }
            return Ok(Catalog {
                client: Arc::new(client),
                database: database.clone(),
                host: host.clone(),
                server_version_num: row.get(1),
            });
        }
        match last_error {
            // One host, and it failed: its own error, as precise as can be.
            Some(err) if database.hosts.len() == 1 => Err(err),
            _ => Err(SourceError::NoPrimary {
                hosts: tried.join("; "),
            }),
        }
    }

    /// Connects to `database` without choosing among its hosts: to its first host that answers,
    /// primary or standby (for checking a standby).
    pub async fn connect_any(database: &DatabaseUrl) -> Result<Self, SourceError> {
        let any = DatabaseUrl {
            target_session: TargetSession::Any,
            ..database.clone()
        };
        Catalog::connect(&any).await
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The host this catalog is connected to.
    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn database(&self) -> &DatabaseUrl {
        &self.database
    }

    /// `server_version_num`, e.g. 170002.
    pub fn server_version_num(&self) -> i32 {
        self.server_version_num
    }

    pub fn has_failover_slots(&self) -> bool {
        self.server_version_num >= FAILOVER_SLOTS_SINCE
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
    /// any event arrives: at least one.
    pub async fn publication_tables(
        &self,
        publication: &PublicationName,
    ) -> Result<Vec<Relation>, SourceError> {
        let tables = self.published_tables(publication).await?;
        if tables.is_empty() {
            return Err(SourceError::PublicationEmpty {
                publication: publication.to_string(),
            });
        }
        Ok(tables)
    }

    /// As [`Catalog::publication_tables`], but possibly none: a table-less outbox
    /// (`--message-prefix`) streams through a publication of no table.
    pub async fn published_tables(
        &self,
        publication: &PublicationName,
    ) -> Result<Vec<Relation>, SourceError> {
        if !self.publication_exists(publication).await? {
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
        // The failover columns exist from PostgreSQL 17 on.
        let failover_columns = if self.has_failover_slots() {
            "failover, synced"
        } else {
            "NULL::bool, NULL::bool"
        };
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT coalesce(plugin::text, ''), coalesce(database::text, ''), active_pid,
                            confirmed_flush_lsn::text, restart_lsn::text, wal_status,
                            {failover_columns}, temporary
                       FROM pg_replication_slots WHERE slot_name = $1"
                ),
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
                failover: row.get(6),
                synced: row.get(7),
                temporary: row.get(8),
            }
        }))
    }

    /// The server's current WAL position: written on a primary, replayed on a standby.
    pub async fn current_wal_lsn(&self) -> Result<Lsn, SourceError> {
        let context = "reading the server's WAL position";
        let row = self
            .client
            .query_one(
                "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                              ELSE pg_current_wal_lsn() END)::text",
                &[],
            )
            .await
            .map_err(|e| SourceError::query(context, e))?;
        let text: Option<String> = row.get(0);
        text.unwrap_or_default()
            .parse()
            .map_err(|e: crate::lsn::ParseLsnError| SourceError::Query {
                context: context.into(),
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
            server_version_num: self.server_version_num,
        })
    }

    /// What failover slots need from this primary; None before PostgreSQL 17.
    pub async fn primary_failover(&self) -> Result<Option<PrimaryFailover>, SourceError> {
        if !self.has_failover_slots() {
            return Ok(None);
        }
        let listed: String = self
            .client
            .query_one("SHOW synchronized_standby_slots", &[])
            .await
            .map_err(|e| SourceError::query("reading synchronized_standby_slots", e))?
            .get(0);
        let physical_slots = self
            .client
            .query(
                "SELECT slot_name::text, active FROM pg_replication_slots
                  WHERE slot_type = 'physical' ORDER BY slot_name",
                &[],
            )
            .await
            .map_err(|e| SourceError::query("reading the physical replication slots", e))?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        Ok(Some(PrimaryFailover {
            synchronized_standby_slots: listed
                .split(',')
                .map(|s| s.trim().trim_matches('"').to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            physical_slots,
        }))
    }

    /// What failover slots need from this standby; None before PostgreSQL 17.
    pub async fn standby_failover(&self) -> Result<Option<StandbyFailover>, SourceError> {
        if !self.has_failover_slots() {
            return Ok(None);
        }
        let row = self
            .client
            .query_one(
                "SELECT pg_is_in_recovery(),
                        current_setting('sync_replication_slots')::bool,
                        current_setting('hot_standby_feedback')::bool,
                        current_setting('primary_conninfo'),
                        current_setting('primary_slot_name')",
                &[],
            )
            .await
            .map_err(|e| SourceError::query("reading the standby's settings", e))?;
        let conninfo: String = row.get(3);
        Ok(Some(StandbyFailover {
            in_recovery: row.get(0),
            sync_replication_slots: row.get(1),
            hot_standby_feedback: row.get(2),
            conninfo_has_dbname: conninfo_names_a_database(&conninfo),
            primary_slot_name: row.get(4),
        }))
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

    /// The primary key's columns of `table`, in key order (none without a primary key).
    pub async fn primary_key(&self, table: &Relation) -> Result<Vec<String>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT a.attname::text
                   FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                  WHERE i.indrelid = $1 AND i.indisprimary
                  ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&table.id],
            )
            .await
            .map_err(|e| SourceError::query("reading the table's primary key", e))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Runs statements an operator asked for (`setup --apply`).
    pub async fn apply(&self, sql: &str) -> Result<(), SourceError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| SourceError::query(format!("applying `{}`", sql.trim()), e))
    }

    /// The SQL that creates the slot: with `failover` on PostgreSQL 17 and later, so that
    /// standbys with `sync_replication_slots` keep a copy a promoted standby resumes from.
    pub fn create_slot_sql(&self, slot: &SlotName) -> String {
        if self.has_failover_slots() {
            format!(
                "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput', false, false, true);"
            )
        } else {
            format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');")
        }
    }

    /// Drops the slot (it must not be active).
    pub async fn drop_slot(&self, slot: &SlotName) -> Result<(), SourceError> {
        self.apply(&format!("SELECT pg_drop_replication_slot('{slot}')"))
            .await
    }

    /// Creates the slot (see [`Catalog::create_slot_sql`]); another instance having created it
    /// a moment earlier is fine.
    pub async fn create_slot(&self, slot: &SlotName) -> Result<(), SourceError> {
        let sql = self.create_slot_sql(slot);
        match self.client.batch_execute(&sql).await {
            Ok(()) => {
                tracing::info!(slot = %slot, failover = self.has_failover_slots(),
                    "created replication slot with the pgoutput plugin");
                Ok(())
            }
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(()),
            Err(e) => Err(SourceError::query(
                format!("creating replication slot `{slot}`"),
                e,
            )),
        }
    }

    /// A replication session to this host that runs commands and never streams.
    async fn command_session(
        &self,
        slot: &SlotName,
    ) -> Result<pgwire_replication::ReplicationClient, SourceError> {
        if let Some(refusal) = self.database.replication_refusal() {
            return Err(SourceError::Connect {
                target: self.database.to_string(),
                transient: false,
                detail: refusal.to_owned(),
            });
        }
        // The publication is not used: the session never starts streaming.
        let config = self
            .database
            .replication_config(&self.host, slot.as_str(), "unused");
        self.database
            .within_connect_timeout(pgwire_replication::ReplicationClient::connect_gated(config))
            .await
            .map_err(|timeout| SourceError::Connect {
                target: self.database.to_string(),
                transient: true,
                detail: format!("{}: {timeout}", self.host),
            })?
            .map_err(|e| SourceError::from_wire(slot, e))
    }

    /// Turns on `failover` for an existing slot (`ALTER_REPLICATION_SLOT`, PostgreSQL 17+: a
    /// replication command, so over a replication connection).
    pub async fn enable_failover(&self, slot: &SlotName) -> Result<(), SourceError> {
        let mut client = self.command_session(slot).await?;
        client
            .simple_query(&format!("ALTER_REPLICATION_SLOT {slot} (FAILOVER true)"))
            .await
            .map_err(|e| SourceError::from_wire(slot, e))?;
        client.abort();
        Ok(())
    }

    /// Creates the slot (with failover on 17+) and exports the snapshot it starts from: rows
    /// visible in it are exactly those committed before the slot's first change. The snapshot
    /// lives as long as the returned value.
    pub async fn create_slot_with_snapshot(
        &self,
        slot: &SlotName,
    ) -> Result<ExportedSnapshot, SourceError> {
        let mut client = self.command_session(slot).await?;
        let failover = if self.has_failover_slots() {
            ", FAILOVER true"
        } else {
            ""
        };
        let rows = client
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'export'{failover})"
            ))
            .await
            .map_err(|e| SourceError::from_wire(slot, e))?;
        let text = |i: usize| {
            rows.first()
                .and_then(|row| row.get(i))
                .and_then(|value| value.as_deref())
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
        };
        let (Some(consistent_point), Some(name)) = (text(1), text(2)) else {
            return Err(SourceError::Replication {
                detail: format!("unexpected answer to CREATE_REPLICATION_SLOT: {rows:?}"),
                transient: false,
            });
        };
        tracing::info!(slot = %slot, %consistent_point, snapshot = %name, failover = self.has_failover_slots(),
            "created replication slot with an exported snapshot");
        Ok(ExportedSnapshot {
            _session: client,
            name,
        })
    }

    /// Checks that `state`, our slot's, suits us.
    pub fn check_slot(&self, slot: &SlotName, state: &SlotState) -> Result<(), SourceError> {
        if state.plugin != "pgoutput" {
            return Err(SourceError::SlotWrongPlugin {
                slot: slot.to_string(),
                plugin: state.plugin.clone(),
            });
        }
        if state.database != self.database.dbname {
            return Err(SourceError::SlotOtherDatabase {
                slot: slot.to_string(),
                database: state.database.clone(),
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
        Ok(())
    }
}

async fn connect_host(
    database: &DatabaseUrl,
    host: &Host,
) -> Result<tokio_postgres::Client, SourceError> {
    let (config, tls) = database.sql_config(host)?;
    let (client, connection) = database
        .within_connect_timeout(config.connect(tls))
        .await
        .map_err(|timeout| SourceError::Connect {
            target: database.to_string(),
            transient: true,
            detail: format!("{host}: {timeout}"),
        })?
        .map_err(|err| {
            let mut detail = describe_sql_error(&err);
            // tokio-postgres says only that the server did not use channel binding.
            if database.channel_binding == ChannelBinding::Require
                && detail.contains("channel binding")
            {
                detail.push_str(
                    " (channel_binding=require: the server authenticated the client without \
                     channel binding; that needs TLS and SCRAM-SHA-256 authentication, with the \
                     password stored as SCRAM)",
                );
            }
            SourceError::Connect {
                target: database.to_string(),
                transient: sql_error_is_transient(&err)
                    && err.code() != Some(&SqlState::INVALID_PASSWORD)
                    && err.code() != Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
                    && database.channel_binding != ChannelBinding::Require,
                detail,
            }
        })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "SQL connection to PostgreSQL closed");
        }
    });
    Ok(client)
}

/// Whether a libpq connection string names a database (`dbname=…`, or a URL's path).
fn conninfo_names_a_database(conninfo: &str) -> bool {
    if let Some((_, rest)) = conninfo.split_once("://") {
        let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
        let path = path.split('?').next().unwrap_or("");
        return !path.is_empty() || conninfo.contains("dbname=");
    }
    conninfo
        .split_whitespace()
        .any(|pair| pair.starts_with("dbname=") && pair.len() > "dbname=".len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_database_in_primary_conninfo() {
        assert!(conninfo_names_a_database(
            "user=postgres host=a port=5432 dbname=app sslmode=disable"
        ));
        assert!(!conninfo_names_a_database("user=postgres host=a port=5432"));
        assert!(conninfo_names_a_database("postgresql://u@a:5432/app"));
        assert!(!conninfo_names_a_database("postgresql://u@a:5432"));
    }
}
