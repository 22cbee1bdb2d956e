//! `outbox-cdc backfill`: re-publishes rows from the outbox table with `run`'s mapping and
//! flags (the same `--config`), skipping what the stream holds. A progress bar on a terminal,
//! plain log lines otherwise; a report of what it did at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Args;

use super::cli::ConfigError;
use super::run::{RunArgs, parse_duration};
use crate::pipeline::backfill::{self, BackfillConfig, Progress, Rows, TableReport};
use crate::source::Catalog;

#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub run: RunArgs,

    /// Re-publish the rows this SQL condition selects, e.g. `created_at > now() - interval '1 hour'`.
    #[arg(
        long = "where",
        value_name = "SQL",
        required_unless_present = "since_stream_end",
        conflicts_with = "since_stream_end"
    )]
    pub where_sql: Option<String>,

    /// Re-publish the rows created after the stream's last event (its Outbox-Commit-Time) minus
    /// --margin: what a lost slot never delivered. All rows when the stream holds none.
    #[arg(long)]
    pub since_stream_end: bool,

    /// How far before the stream's last event to start (clocks, and transactions that took long
    /// between their insert and their commit).
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub margin: Duration,

    /// Columns to order the rows by (comma-separated). Default: the created-at column, then the
    /// primary key; or the primary key alone.
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS")]
    pub order_by: Vec<String>,

    /// The created-at column (for --since-stream-end and the default order).
    #[arg(long, value_name = "COLUMN")]
    pub created_column: Option<String>,

    /// Only this table of the publication (`table` or `schema.table`).
    #[arg(long, value_name = "TABLE")]
    pub table: Option<String>,

    /// Rows read and published at a time.
    #[arg(long, default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Say how many rows would be re-published, and the first and last, then stop.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::Error),
}

/// Runs the backfill and prints its report.
pub async fn execute(args: BackfillArgs) -> Result<(), BackfillError> {
    let config = args.run.clone().resolve()?;
    let catalog = Catalog::connect(&config.source.database)
        .await
        .map_err(crate::pipeline::Error::from)?;
    let backfill_config = BackfillConfig {
        publication: config.source.publication.clone(),
        sink: config.sink.clone(),
        mapping: config.pipeline.mapping.clone(),
        on_error: config.pipeline.on_error.clone(),
        rows: match args.where_sql {
            Some(condition) => Rows::Where(condition),
            None => Rows::SinceStreamEnd {
                margin: args.margin,
            },
        },
        table: args.table,
        order_by: (!args.order_by.is_empty()).then_some(args.order_by),
        created_column: args.created_column,
        batch: args.batch_size as usize,
        snapshot: None,
        dry_run: args.dry_run,
    };
    let mut display = Display::new();
    let reports = backfill::backfill(&backfill_config, &catalog, &mut display).await?;
    display.finish();
    for report in &reports {
        print!("{}", render(report, args.dry_run));
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
