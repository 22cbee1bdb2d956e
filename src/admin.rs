//! Operator commands: `setup` (check the server, create table, publication and slot) and
//! `status` (where the slot stands and how much WAL it holds back).

use std::fmt::Write as _;

use serde::Serialize;

use crate::config::resolve_database_url;
use crate::lsn::Lsn;
use crate::sink::Checkpoint;
use crate::source::connection::DatabaseUrl;
use crate::source::{Catalog, PublicationName, SlotName, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(
        "replication slot `{slot}` does not exist; `outbox-cdc setup --apply` or the first `outbox-cdc run` creates it"
    )]
    SlotMissing { slot: String },
    #[error(
        "replication slot `{slot}` is invalidated (wal_status = lost): PostgreSQL removed WAL it still needed. Drop and recreate it (`SELECT pg_drop_replication_slot('{slot}');`), then re-publish what was missed from the table"
    )]
    SlotLost { slot: String },
    #[error("the server is not ready for outbox-cdc: {0} problem(s) listed above")]
    NotReady(usize),
}

/// Connection flags shared by `setup` and `status`.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL [env: OUTBOX_CDC_DATABASE_URL, then DATABASE_URL]
    #[arg(long, env = "OUTBOX_CDC_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Logical replication slot.
    #[arg(long, env = "OUTBOX_CDC_SLOT", default_value = "outbox_cdc")]
    pub slot: SlotName,
}

impl DatabaseArgs {
    async fn connect(&self) -> Result<Catalog, AdminError> {
        let url: DatabaseUrl = resolve_database_url(self.database_url.clone())?;
        Ok(Catalog::connect(&url).await?)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// With a NATS URL (flag, OUTBOX_CDC_NATS_URL or NATS_URL), also show the checkpoint that
    /// `run --replay-window` keeps.
    #[command(flatten)]
    pub nats: crate::config::NatsArgs,

    /// KV bucket of the checkpoint.
    #[arg(
        long,
        env = "OUTBOX_CDC_CHECKPOINT_BUCKET",
        default_value = "outbox_cdc"
    )]
    pub checkpoint_bucket: String,
}

/// The slot as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub slot: String,
    pub plugin: String,
    pub database: String,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub server_wal_lsn: String,
    /// WAL between the confirmed position and the server's current position, in bytes.
    pub lag_bytes: Option<u64>,
    /// WAL the slot keeps on disk (from `restart_lsn`), in bytes.
    pub retained_bytes: Option<u64>,
    pub wal_status: Option<String>,
    /// The newest published position saved in NATS KV (`run --replay-window`).
    pub checkpoint_lsn: Option<String>,
    /// Why there is no checkpoint position, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_note: Option<String>,
}

/// Prints the slot's state; an error when the slot is missing or invalidated.
pub async fn status(args: StatusArgs) -> Result<(), AdminError> {
    let catalog = args.database.connect().await?;
    let slot = &args.database.slot;
    let state = catalog
        .slot_state(slot)
        .await?
        .ok_or_else(|| AdminError::SlotMissing {
            slot: slot.to_string(),
        })?;
    let server = catalog.current_wal_lsn().await?;
    let behind = |lsn: Option<Lsn>| lsn.map(|lsn| server.bytes_since(lsn));
    let (checkpoint_lsn, checkpoint_note) = if args.nats.url().is_none() {
        (None, Some("not read: no NATS URL given".to_owned()))
    } else {
        let (urls, auth) = args.nats.resolve()?;
        match Checkpoint::read(&urls, &auth, &args.checkpoint_bucket, slot.as_str()).await {
            Ok(Some(lsn)) => (Some(lsn.to_string()), None),
            Ok(None) => (
                None,
                Some(format!("none saved in bucket `{}`", args.checkpoint_bucket)),
            ),
            Err(e) => (None, Some(format!("not read: {e}"))),
        }
    };
    let status = SlotStatus {
        slot: slot.to_string(),
        plugin: state.plugin.clone(),
        database: state.database.clone(),
        active: state.active_pid.is_some(),
        active_pid: state.active_pid,
        confirmed_flush_lsn: state.confirmed_flush_lsn.map(|l| l.to_string()),
        restart_lsn: state.restart_lsn.map(|l| l.to_string()),
        server_wal_lsn: server.to_string(),
        lag_bytes: behind(state.confirmed_flush_lsn),
        retained_bytes: behind(state.restart_lsn),
        wal_status: state.wal_status.clone(),
        checkpoint_lsn,
        checkpoint_note,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{}", render_status(&status));
    }
    if status.wal_status.as_deref() == Some("lost") {
        return Err(AdminError::SlotLost {
            slot: slot.to_string(),
        });
    }
    Ok(())
}

fn render_status(s: &SlotStatus) -> String {
    let none = || "-".to_owned();
    let bytes = |b: Option<u64>| b.map_or_else(none, |b| format!("{b} bytes"));
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{key:<22}{value}");
    };
    line("slot", s.slot.clone());
    line("plugin", s.plugin.clone());
    line("database", s.database.clone());
    line(
        "active",
        match s.active_pid {
            Some(pid) => format!("yes (pid {pid})"),
            None => "no".into(),
        },
    );
    line(
        "confirmed_flush_lsn",
        s.confirmed_flush_lsn.clone().unwrap_or_else(none),
    );
    line("restart_lsn", s.restart_lsn.clone().unwrap_or_else(none));
    line("server WAL LSN", s.server_wal_lsn.clone());
    line("lag", bytes(s.lag_bytes));
    line("retained WAL", bytes(s.retained_bytes));
    line("wal_status", s.wal_status.clone().unwrap_or_else(none));
    line(
        "checkpoint",
        match (&s.checkpoint_lsn, &s.checkpoint_note) {
            (Some(lsn), _) => lsn.clone(),
            (None, Some(note)) => format!("- ({note})"),
            (None, None) => none(),
        },
    );
    out
}

#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Publication of the outbox table.
    #[arg(long, env = "OUTBOX_CDC_PUBLICATION", default_value = "outbox_pub")]
    pub publication: PublicationName,

    /// The outbox table (optionally schema-qualified). Created from sql/outbox.sql when missing.
    #[arg(long, env = "OUTBOX_CDC_TABLE", default_value = "outbox")]
    pub table: String,

    /// Run the SQL instead of only printing it.
    #[arg(long)]
    pub apply: bool,
}

/// Checks the server, then prints (or, with `--apply`, runs) the SQL that is still missing.
pub async fn setup(args: SetupArgs) -> Result<(), AdminError> {
    let catalog = args.database.connect().await?;
    let ready = catalog.readiness().await?;
    println!(
        "PostgreSQL {} as role `{}`",
        ready.server_version, ready.role
    );
    let problems = readiness_problems(&ready);
    if problems.is_empty() {
        println!(
            "  ok  wal_level = logical, replication slots and WAL senders available, role may replicate"
        );
    }
    for problem in &problems {
        println!("  !!  {problem}");
    }

    let slot = &args.database.slot;
    let mut plan: Vec<(String, String)> = Vec::new();
    let table_kind = catalog.relation_kind(&args.table).await?;
    match table_kind {
        Some(kind) => println!(
            "  ok  table `{}` exists{}",
            args.table,
            if kind == 'p' { " (partitioned)" } else { "" }
        ),
        None => plan.push((
            format!("create the outbox table `{}`", args.table),
            create_table_sql(&args.table),
        )),
    }
    if catalog.publication_exists(&args.publication).await? {
        println!("  ok  publication `{}` exists", args.publication);
    } else {
        plan.push((
            format!("create publication `{}`", args.publication),
            create_publication_sql(&args.publication, &args.table, table_kind == Some('p')),
        ));
    }
    match catalog.slot_state(slot).await? {
        Some(state) => println!(
            "  ok  replication slot `{slot}` exists (plugin {})",
            state.plugin
        ),
        None => plan.push((
            format!("create replication slot `{slot}`"),
            format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"),
        )),
    }

    if plan.is_empty() {
        println!("nothing to create");
    } else if args.apply {
        for (what, sql) in &plan {
            // A slot needs wal_level = logical: skip it rather than fail half-way.
            if sql.contains("pg_create_logical_replication_slot") && !problems.is_empty() {
                println!("  --  not creating the slot until the problems above are fixed");
                continue;
            }
            catalog.apply(sql).await?;
            println!("  ++  {what}");
        }
    } else {
        println!("\n-- SQL to run (or pass --apply):");
        for (what, sql) in &plan {
            println!("-- {what}\n{sql}\n");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(AdminError::NotReady(problems.len()))
    }
}

/// What is wrong with the server for logical replication, each with the fix.
pub fn readiness_problems(ready: &crate::source::ServerReadiness) -> Vec<String> {
    let mut problems = Vec::new();
    if ready.wal_level != "logical" {
        problems.push(format!(
            "wal_level is `{}`: run `ALTER SYSTEM SET wal_level = logical;` and restart PostgreSQL",
            ready.wal_level
        ));
    }
    if ready.max_replication_slots <= ready.replication_slots_used {
        problems.push(format!(
            "all {} replication slots are used: raise max_replication_slots (`ALTER SYSTEM SET max_replication_slots = {};`, restart)",
            ready.max_replication_slots,
            ready.max_replication_slots + 4
        ));
    }
    if ready.max_wal_senders < 1 {
        problems.push(
            "max_wal_senders is 0: `ALTER SYSTEM SET max_wal_senders = 10;` and restart".into(),
        );
    }
    if !ready.role_can_replicate {
        problems.push(format!(
            "role `{}` has neither REPLICATION nor SUPERUSER: `ALTER ROLE \"{}\" REPLICATION;`",
            ready.role, ready.role
        ));
    }
    problems
}

/// The recommended table from `sql/outbox.sql`, under the given name.
pub fn create_table_sql(table: &str) -> String {
    let sql = crate::demo::OUTBOX_SQL;
    let start = sql.find("CREATE TABLE").unwrap_or(0);
    let end = sql[start..].find(");").map_or(sql.len(), |i| start + i + 2);
    sql[start..end].replacen(
        "CREATE TABLE IF NOT EXISTS outbox (",
        &format!("CREATE TABLE IF NOT EXISTS {table} ("),
        1,
    )
}

pub fn create_publication_sql(
    publication: &PublicationName,
    table: &str,
    partitioned: bool,
) -> String {
    let via_root = if partitioned {
        ", publish_via_partition_root = true"
    } else {
        ""
    };
    format!(
        "CREATE PUBLICATION {publication} FOR TABLE {table} WITH (publish = 'insert'{via_root});"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ServerReadiness;

    #[test]
    fn table_sql_comes_from_the_shipped_file() {
        let sql = create_table_sql("app.events_outbox");
        assert!(
            sql.starts_with("CREATE TABLE IF NOT EXISTS app.events_outbox ("),
            "{sql}"
        );
        assert!(sql.ends_with(");"), "{sql}");
        assert!(sql.contains("payload        jsonb"), "{sql}");
        assert!(!sql.contains("PUBLICATION"), "{sql}");
    }

    #[test]
    fn publication_sql_publishes_inserts_via_the_root_when_partitioned() {
        let publication: PublicationName = "outbox_pub".parse().unwrap();
        assert_eq!(
            create_publication_sql(&publication, "outbox", false),
            "CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert');"
        );
        assert!(
            create_publication_sql(&publication, "outbox", true)
                .contains("publish_via_partition_root = true")
        );
    }

    #[test]
    fn readiness_names_each_problem_with_its_fix() {
        let good = ServerReadiness {
            wal_level: "logical".into(),
            max_replication_slots: 10,
            replication_slots_used: 1,
            max_wal_senders: 10,
            role: "app".into(),
            role_can_replicate: true,
            server_version: "15".into(),
        };
        assert!(readiness_problems(&good).is_empty());
        let bad = ServerReadiness {
            wal_level: "replica".into(),
            replication_slots_used: 10,
            max_wal_senders: 0,
            role_can_replicate: false,
            ..good
        };
        let problems = readiness_problems(&bad).join("\n");
        for needle in [
            "ALTER SYSTEM SET wal_level = logical",
            "max_replication_slots = 14",
            "max_wal_senders = 10",
            "ALTER ROLE \"app\" REPLICATION",
        ] {
            assert!(problems.contains(needle), "{needle} in {problems}");
        }
    }

    #[test]
    fn status_text_shows_lag_and_holder() {
        let text = render_status(&SlotStatus {
            slot: "outbox_cdc".into(),
            plugin: "pgoutput".into(),
            database: "app".into(),
            active: true,
            active_pid: Some(42),
            confirmed_flush_lsn: Some("0/10".into()),
            restart_lsn: None,
            server_wal_lsn: "0/20".into(),
            lag_bytes: Some(16),
            retained_bytes: None,
            wal_status: Some("reserved".into()),
            checkpoint_lsn: Some("0/18".into()),
            checkpoint_note: None,
        });
        assert!(text.contains("checkpoint            0/18"), "{text}");
        assert!(text.contains("yes (pid 42)"), "{text}");
        assert!(text.contains("16 bytes"), "{text}");
        assert!(text.contains("retained WAL          -"), "{text}");
    }
}
