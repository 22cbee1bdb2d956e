//! Ordinary SQL against the source database: server checks, the publication's tables, the slot.

use std::sync::Arc;

use tokio_postgres::error::SqlState;

use super::connection::DatabaseUrl;
use super::error::{describe_sql_error, sql_error_is_transient};
use super::pgoutput::{Relation, RelationColumn};
use super::{PublicationName, SlotName, SourceError};
use crate::lsn::Lsn;

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
    pub(super) client: Arc<tokio_postgres::Client>,
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
