//! `outbox-cdc backfill`: re-publishes rows from the outbox table with `run`'s mapping and
//! publishing flags (the same names, variables and config file keys), skipping what the stream
//! holds. A progress bar on a terminal,
//! plain log lines otherwise; a report of what it did at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args};

use super::args::{
    ConfigArgs, DatabaseArgs, MappingArgs, NatsArgs, PoisonArgs, PublicationArgs, PublishArgs,
    WhereArgs, parse_duration, sink_config,
};
use super::error::ConfigError;
use super::tables::{TableSections, table_streams};
use crate::pipeline::backfill::{self, BackfillConfig, Progress, Rows, TableReport};
use crate::pipeline::mapping::{Mappings, TableSettings};
use crate::source::Catalog;
use crate::source::connection::DatabaseUrl;

/// `backfill` takes what `run` maps and publishes with, and what selects the rows; not what
/// only streaming uses (the slot, its timeouts, replay, the HTTP endpoint).
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("rows").required(true).args(["where_sql", "since_stream_end"])))]
pub struct BackfillArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub publication: PublicationArgs,

    #[command(flatten)]
    pub mapping: MappingArgs,

    #[command(flatten)]
    pub publish: PublishArgs,

    #[command(flatten)]
    pub poison: PoisonArgs,

    #[command(flatten)]
    pub rows: WhereArgs,

    /// Re-publish the rows created after the stream's last event, minus --margin
    ///
    /// After its Outbox-Commit-Time: what a lost slot never delivered. All rows when the stream
    /// holds none.
    #[arg(long)]
    pub since_stream_end: bool,

    /// How far before the stream's last event --since-stream-end starts
    ///
    /// For clocks, and transactions that took long between their insert and their commit.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub margin: Duration,

    /// Columns to order the rows by, comma-separated [default: the created-at column, then the primary key]
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS")]
    pub order_by: Vec<String>,

    /// The created-at column, for --since-stream-end and the default order [default: created_at when the table has it]
    #[arg(long, value_name = "COLUMN")]
    pub created_column: Option<String>,

    /// Only this table of the publication (`table` or `schema.table`)
    #[arg(long, value_name = "TABLE")]
    pub only_table: Option<String>,

    /// Rows read and published at a time
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Say how many rows would be re-published, and the first and last, then stop
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `backfill`, its flags checked.
#[derive(Debug, Clone)]
pub struct Backfill {
    pub database: DatabaseUrl,
    pub config: BackfillConfig,
}

impl BackfillArgs {
    pub fn resolve(self) -> Result<Backfill, ConfigError> {
        self.resolve_with(&TableSections::default())
    }

    /// Checks the flags, with the config file's per-table `sections`.
    pub fn resolve_with(self, sections: &TableSections) -> Result<Backfill, ConfigError> {
        let database = self.database.resolve()?;
        let default = TableSettings {
            mapping: self.mapping.resolve(&database.dbname)?,
            on_error: self.poison.resolve()?,
        };
        let mappings = Mappings {
            tables: sections.settings(&default)?,
            default,
        };
        // Rows go out one by one: a backfill publishes no atomic batches.
        let sink = sink_config(
            &self.nats,
            self.publish,
            &mappings,
            &table_streams(sections),
            false,
        )?;
        Ok(Backfill {
            database,
            config: BackfillConfig {
                publication: self.publication.publication,
                sink,
                mappings,
                rows: match self.rows.where_sql {
                    Some(condition) => Rows::Where(condition),
                    None => Rows::SinceStreamEnd {
                        margin: self.margin,
                    },
                },
                table: self.only_table,
                order_by: (!self.order_by.is_empty()).then_some(self.order_by),
                created_column: self.created_column,
                batch: self.batch_size as usize,
                snapshot: None,
                dry_run: self.dry_run,
            },
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::Error),
}

/// Runs the backfill and prints its report.
pub async fn execute(backfill: Backfill) -> Result<(), BackfillError> {
    let Backfill { database, config } = backfill;
    let catalog = Catalog::connect(&database)
        .await
        .map_err(crate::pipeline::Error::from)?;
    let mut display = Display::new();
    let reports = backfill::backfill(&config, &catalog, &mut display).await?;
    display.finish();
    for report in &reports {
        print!("{}", render(report, config.dry_run));
    }
    Ok(())
}

/// The report of one table, for people.
pub fn render(report: &TableReport, dry_run: bool) -> String {
    let edge = |id: &Option<String>| id.clone().unwrap_or_else(|| "-".to_owned());
    let mut out = format!(
        "backfill {}: {} rows where {}, ordered by {} (first id {}, last id {})\n",
        report.table,
        report.selected,
        report.predicate,
        report.order_by.join(", "),
        edge(&report.first_id),
        edge(&report.last_id),
    );
    if dry_run {
        out.push_str("  nothing published (--dry-run)\n");
    } else {
        out.push_str(&format!(
            "  published {}, already in the stream {}, dead-lettered {}\n",
            report.published, report.already_present, report.dead_lettered
        ));
    }
    out
}

/// A progress bar on a terminal; a log line every few seconds otherwise.
struct Display {
    bar: Option<indicatif::ProgressBar>,
    logged: Instant,
}

impl Display {
    fn new() -> Display {
        Display {
            bar: None,
            logged: Instant::now(),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

impl Progress for Display {
    fn table(&mut self, report: &TableReport) {
        self.finish();
        tracing::info!(table = %report.table, rows = report.selected, predicate = %report.predicate,
            order_by = ?report.order_by, "backfill: rows selected");
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(report.selected);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} rows, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(report.table.clone());
            self.bar = Some(bar);
        }
    }

    fn rows(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        } else if self.logged.elapsed() >= Duration::from_secs(5) || done == total {
            self.logged = Instant::now();
            tracing::info!(done, total, "backfill: progress");
        }
    }
}
