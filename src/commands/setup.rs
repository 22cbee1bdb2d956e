//! `outbox-cdc setup`: checks the server and creates what is missing — the outbox table, its
//! publication, the slot (with failover on PostgreSQL 17+) — or prints the SQL for it, and says
//! what a failover to a standby still needs.

use super::args::{ConfigArgs, DatabaseArgs, PublicationArgs, SlotArgs, StandbyArgs};
use super::error::{AdminError, ConfigError};
use super::failover;
use crate::source::connection::DatabaseUrl;
use crate::source::{Catalog, PublicationName, SlotName};

/// The recommended table and publication, as shipped in `sql/outbox.sql`.
pub const OUTBOX_SQL: &str = include_str!("../../sql/outbox.sql");
/// `outbox_emit(…)`, the table-less outbox's writer: `pg_logical_emit_message(true, 'outbox', …)`.
pub const OUTBOX_EMIT_SQL: &str = include_str!("../../sql/outbox_emit.sql");

/// One thing `setup` creates or changes.
enum Step {
    Sql(String),
    /// `ALTER_REPLICATION_SLOT … (FAILOVER true)`: a replication command, not SQL.
    EnableFailover,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub slot: SlotArgs,

    #[command(flatten)]
    pub publication: PublicationArgs,

    /// The outbox table (optionally schema-qualified), created from sql/outbox.sql when missing
    #[arg(long, env = "OUTBOX_CDC_TABLE", default_value = "outbox")]
    pub table: String,

    #[command(flatten)]
    pub standbys: StandbyArgs,

    /// Run the SQL instead of only printing it
    #[arg(long)]
    pub apply: bool,

    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `setup`, its flags checked.
#[derive(Debug, Clone)]
pub struct Setup {
    pub database: DatabaseUrl,
    pub slot: SlotName,
    pub publication: PublicationName,
    pub table: String,
    pub standbys: Vec<DatabaseUrl>,
    pub apply: bool,
}

impl SetupArgs {
    pub fn resolve(self) -> Result<Setup, ConfigError> {
        Ok(Setup {
            database: self.database.resolve()?,
            slot: self.slot.slot,
            publication: self.publication.publication,
            table: self.table,
            standbys: self.standbys.resolve()?,
            apply: self.apply,
        })
    }
}

/// Checks the server, then prints (or, with `--apply`, runs) the SQL that is still missing.
pub async fn setup(args: Setup) -> Result<(), AdminError> {
    let catalog = Catalog::connect(&args.database).await?;
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

    let slot = &args.slot;
    let standbys = &args.standbys;
    let mut plan: Vec<(String, Step)> = Vec::new();
    let table_kind = catalog.relation_kind(&args.table).await?;
    match table_kind {
        Some(kind) => println!(
            "  ok  table `{}` exists{}",
            args.table,
            if kind == 'p' { " (partitioned)" } else { "" }
        ),
        None => plan.push((
            format!("create the outbox table `{}`", args.table),
            Step::Sql(create_table_sql(&args.table)),
        )),
    }
    if catalog.publication_exists(&args.publication).await? {
        println!("  ok  publication `{}` exists", args.publication);
    } else {
        plan.push((
            format!("create publication `{}`", args.publication),
            Step::Sql(create_publication_sql(
                &args.publication,
                &args.table,
                table_kind == Some('p'),
            )),
        ));
    }
    let slot_state = catalog.slot_state(slot).await?;
    match &slot_state {
        Some(state) => {
            println!(
                "  ok  replication slot `{slot}` exists (plugin {})",
                state.plugin
            );
            if state.failover == Some(false) {
                plan.push((
                    format!("turn on failover for replication slot `{slot}`"),
                    Step::EnableFailover,
                ));
            }
        }
        None => plan.push((
            format!("create replication slot `{slot}`"),
            Step::Sql(catalog.create_slot_sql(slot)),
        )),
    }

    if plan.is_empty() {
        println!("nothing to create");
    } else if args.apply {
        for (what, step) in &plan {
            match step {
                // A slot needs wal_level = logical: skip it rather than fail half-way.
                Step::Sql(sql)
                    if sql.contains("pg_create_logical_replication_slot")
                        && !problems.is_empty() =>
                {
                    println!("  --  not creating the slot until the problems above are fixed");
                    continue;
                }
                Step::Sql(sql) => catalog.apply(sql).await?,
                Step::EnableFailover => catalog.enable_failover(slot).await?,
            }
            println!("  ++  {what}");
        }
    } else {
        println!("\n-- SQL to run (or pass --apply):");
        for (what, step) in &plan {
            match step {
                Step::Sql(sql) => println!("-- {what}\n{sql}\n"),
                Step::EnableFailover => println!(
                    "-- {what} (a replication command: psql \"dbname={} replication=database\")\n\
                     ALTER_REPLICATION_SLOT {slot} (FAILOVER true)\n",
                    catalog.database().dbname
                ),
            }
        }
    }
    let slot_state = match args.apply {
        true => catalog.slot_state(slot).await?,
        false => slot_state,
    };
    let failover = failover::check(&catalog, slot, slot_state.as_ref(), standbys).await?;
    println!("failover to a standby:");
    print!("{}", failover::render(&failover.findings));
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
    let sql = OUTBOX_SQL;
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
            server_version_num: 150_000,
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
}
