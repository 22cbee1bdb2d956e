//! `outbox-cdc verify`: audits a stream. Read headers-only from a start, its messages must have
//! commit LSNs that never go backwards, a predecessor chain (`Nats-Expected-Last-Msg-Id`) without
//! a break, and no event id twice; with `--database-url`, the stream and the table must hold the
//! same events. Human output or `--json`; exit 1 on a finding, for cron or after an incident.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use async_nats::header::{
    NATS_BATCH_ID, NATS_BATCH_SEQUENCE, NATS_EXPECTED_LAST_MESSAGE_ID, NATS_EXPECTED_LAST_SEQUENCE,
};
use clap::Args;
use serde::Serialize;

use super::args::{
    ConfigArgs, DatabaseArgs, IdColumnArgs, JsonArgs, NatsArgs, PublicationArgs, StreamArgs,
    WhereArgs, parse_time,
};
use super::error::ConfigError;
use super::tables::TableSections;
use crate::event::header;
use crate::lsn::Lsn;
use crate::pipeline::mapping::{EventIds, TransactionContext};
use crate::pipeline::poison::HEADER_ERROR_KIND;
use crate::sink::{NatsAuth, NatsUrls, SinkError, StoredHeaders, StreamStart, read_headers};
use crate::source::connection::DatabaseUrl;
use crate::source::{Catalog, PublicationName, SourceError, TableQuery, TableReader};

#[derive(Debug, Clone, Args)]
#[command(mut_arg("stream", |arg| {
    arg.required(true)
        .help("The stream to audit")
        .long_help(None)
        .help_heading(None)
}))]
pub struct VerifyArgs {
    #[command(flatten)]
    pub stream: StreamArgs,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// Start at this stream sequence
    #[arg(long, value_name = "SEQUENCE", conflicts_with_all = ["since_time", "since_lsn"])]
    pub since_sequence: Option<u64>,

    /// Start at messages stored at or after this time (RFC 3339)
    #[arg(long, value_name = "TIME", value_parser = parse_time, conflicts_with = "since_lsn")]
    pub since_time: Option<time::OffsetDateTime>,

    /// Start at the first event committed at or after this LSN (`X/Y`)
    #[arg(long, value_name = "LSN")]
    pub since_lsn: Option<Lsn>,

    // With a database URL, the table check (see the command's help).
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub publication: PublicationArgs,

    #[command(flatten)]
    pub id: IdColumnArgs,

    #[command(flatten)]
    pub rows: WhereArgs,

    #[command(flatten)]
    pub output: JsonArgs,

    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `verify`, its flags checked.
#[derive(Debug, Clone)]
pub struct Verify {
    pub stream: String,
    pub nats: (NatsUrls, NatsAuth),
    pub start: StreamStart,
    pub since_lsn: Option<Lsn>,
    /// With it, the table check.
    pub database: Option<DatabaseUrl>,
    pub publication: PublicationName,
    pub id_column: Option<String>,
    /// The id columns the config file's per-table sections set: (table, column).
    pub table_id_columns: Vec<(String, String)>,
    /// Only these rows: events the table lacks are then not looked for.
    pub where_sql: Option<String>,
    pub json: bool,
}

impl VerifyArgs {
    pub fn resolve(self) -> Result<Verify, ConfigError> {
        self.resolve_with(&TableSections::default())
    }

    /// Checks the flags, with the id columns of the config file's per-table `sections`.
    pub fn resolve_with(self, sections: &TableSections) -> Result<Verify, ConfigError> {
        let start = match (self.since_sequence, self.since_time) {
            (Some(sequence), _) => StreamStart::Sequence(sequence),
            (None, Some(time)) => StreamStart::Time(time),
            (None, None) => StreamStart::First,
        };
        Ok(Verify {
            // Required on the command line.
            stream: self.stream.stream.unwrap_or_default(),
            nats: self.nats.resolve()?,
            start,
            since_lsn: self.since_lsn,
            database: self.database.resolve_optional()?,
            publication: self.publication.publication,
            id_column: self.id.id_column,
            table_id_columns: sections
                .id_columns()
                .map(|(table, column)| (table.to_owned(), column.to_owned()))
                .collect(),
            where_sql: self.rows.where_sql,
            json: self.output.json,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Mapping(#[from] crate::pipeline::mapping::MissingColumn),
    #[error(
        "table `{table}` has no `id` column: the ids of its events are made of the commit LSN, \
         which the table cannot reproduce; give --id-column, or verify the stream alone \
         (without a database URL)"
    )]
    NoIdColumn { table: String },
    #[error("stream `{stream}`: {findings} finding(s), listed above")]
    Findings { stream: String, findings: usize },
}

/// How many examples of each finding are shown.
const EXAMPLES: usize = 10;

/// What the audit found.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub stream: String,
    pub messages: u64,
    pub first_sequence: Option<u64>,
    pub last_sequence: Option<u64>,
    /// (sequence, its commit LSN, the newest commit LSN before it).
    pub lsn_backwards: Vec<(u64, String, String)>,
    pub lsn_backwards_count: usize,
    /// (sequence, the predecessor it names, the message actually before it).
    pub chain_breaks: Vec<(u64, String, String)>,
    pub chain_breaks_count: usize,
    /// Messages naming no predecessor (the stream's first, or published without fencing).
    pub unchained: u64,
    /// (sequence, id, the sequence that held it first).
    pub duplicate_ids: Vec<(u64, String, u64)>,
    pub duplicate_ids_count: usize,
    /// With --database-url: table rows the stream lacks (findings), and events whose rows the
    /// table no longer holds — deleted after they were published, as the clean-up the README
    /// recommends does: those cannot be compared, and are counted, not found.
    pub table_rows: Option<u64>,
    pub rows_missing: Vec<String>,
    pub rows_missing_count: usize,
    pub unchecked_events: Vec<String>,
    pub unchecked_events_count: usize,
}

impl Report {
    pub fn findings(&self) -> usize {
        self.lsn_backwards_count
            + self.chain_breaks_count
            + self.duplicate_ids_count
            + self.rows_missing_count
    }
}

/// The stream checks, message by message in stream order.
#[derive(Default)]
pub struct StreamAudit {
    report: Report,
    newest_lsn: Option<Lsn>,
    previous_id: Option<String>,
    seen: HashMap<String, u64>,
    /// Event ids per `Outbox-Table`, for the table check.
    pub events: HashMap<String, HashSet<String>>,
    /// Checking starts at the first event committed at or after this.
    since_lsn: Option<Lsn>,
    started: bool,
    /// The message before the first one read is not known (a later start): its predecessor
    /// cannot be checked.
    predecessor_unknown: bool,
    /// The previous message's atomic batch id and place in it.
    previous_batch: Option<(String, u64)>,
}

fn note<T>(list: &mut Vec<T>, count: &mut usize, item: T) {
    *count += 1;
    if list.len() < EXAMPLES {
        list.push(item);
    }
}

impl StreamAudit {
    /// `from_first`: reading starts at the stream's first message.
    pub fn new(stream: &str, since_lsn: Option<Lsn>, from_first: bool) -> StreamAudit {
        StreamAudit {
            report: Report {
                stream: stream.to_owned(),
                ..Default::default()
            },
            since_lsn,
            started: since_lsn.is_none(),
            predecessor_unknown: !from_first,
            ..Default::default()
        }
    }

    pub fn check(&mut self, message: &StoredHeaders) {
        let text = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
        let id = text(header::MSG_ID.as_ref());
        if std::mem::take(&mut self.predecessor_unknown) {
            self.previous_id = text(NATS_EXPECTED_LAST_MESSAGE_ID.as_ref());
            // Mid-batch, the batch's previous message is not known either: taken as read.
            self.previous_batch = text(NATS_BATCH_ID.as_ref()).zip(
                text(NATS_BATCH_SEQUENCE.as_ref())
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(|n| n.saturating_sub(1)),
            );
        }
        let lsn: Option<Lsn> = text(header::COMMIT_LSN).and_then(|l| l.parse().ok());
        if !self.started {
            if lsn.is_some_and(|l| Some(l) >= self.since_lsn) {
                self.started = true;
            } else {
                self.previous_id = id;
                return;
            }
        }
        let r = &mut self.report;
        r.messages += 1;
        r.first_sequence.get_or_insert(message.sequence);
        r.last_sequence = Some(message.sequence);
        if let Some(lsn) = lsn {
            match self.newest_lsn {
                Some(newest) if lsn < newest => note(
                    &mut r.lsn_backwards,
                    &mut r.lsn_backwards_count,
                    (message.sequence, lsn.to_string(), newest.to_string()),
                ),
                _ => self.newest_lsn = Some(lsn),
            }
        }
        // An atomic batch (--atomic-transactions) names its predecessor by stream sequence on
        // its first message; its other messages follow the one before in the same batch.
        let batch = text(NATS_BATCH_ID.as_ref())
            .zip(text(NATS_BATCH_SEQUENCE.as_ref()).and_then(|s| s.parse::<u64>().ok()));
        let previous_batch = std::mem::replace(&mut self.previous_batch, batch.clone());
        let in_batch = match (&batch, &previous_batch) {
            (Some((id, n)), Some((previous, m))) if *n > 1 => Some((
                id == previous && *n == m + 1,
                format!("batch {id} message {}", n - 1),
            )),
            (Some((id, n)), _) if *n > 1 => Some((false, format!("batch {id} message {}", n - 1))),
            _ => None,
        };
        let expected_sequence = text(NATS_EXPECTED_LAST_SEQUENCE.as_ref());
        match (
            text(NATS_EXPECTED_LAST_MESSAGE_ID.as_ref()),
            expected_sequence,
            in_batch,
        ) {
            (Some(expected), _, _) if self.previous_id.as_ref() != Some(&expected) => note(
                &mut r.chain_breaks,
                &mut r.chain_breaks_count,
                (
                    message.sequence,
                    expected,
                    self.previous_id.clone().unwrap_or_else(|| "-".to_owned()),
                ),
            ),
            (Some(_), _, _) => {}
            (None, Some(expected), _)
                if expected.parse::<u64>().ok() != message.sequence.checked_sub(1) =>
            {
                note(
                    &mut r.chain_breaks,
                    &mut r.chain_breaks_count,
                    (
                        message.sequence,
                        format!("sequence {expected}"),
                        format!("sequence {}", message.sequence.saturating_sub(1)),
                    ),
                )
            }
            (None, Some(_), _) => {}
            (None, None, Some((true, _))) => {}
            (None, None, Some((false, expected))) => note(
                &mut r.chain_breaks,
                &mut r.chain_breaks_count,
                (
                    message.sequence,
                    expected,
                    self.previous_id.clone().unwrap_or_else(|| "-".to_owned()),
                ),
            ),
            (None, None, None) => r.unchained += 1,
        }
        if let Some(id) = &id {
            match self.seen.get(id) {
                Some(&first) => note(
                    &mut r.duplicate_ids,
                    &mut r.duplicate_ids_count,
                    (message.sequence, id.clone(), first),
                ),
                None => {
                    self.seen.insert(id.clone(), message.sequence);
                }
            }
            // Events of a table (not dead letters), for the table check.
            if let Some(table) = text(header::TABLE)
                && message.headers.get(HEADER_ERROR_KIND).is_none()
            {
                self.events.entry(table).or_default().insert(id.clone());
            }
        }
        self.previous_id = id;
    }

    pub fn finish(self) -> (Report, HashMap<String, HashSet<String>>) {
        (self.report, self.events)
    }
}

/// Audits the stream (and the table), prints the report; an error when something was found.
pub async fn execute(args: Verify) -> Result<(), VerifyError> {
    let (urls, auth) = &args.nats;
    let (client, denials) = auth.connect_once(urls).await?;
    let context = async_nats::jetstream::new(client);
    let start = args.start;
    let mut audit = StreamAudit::new(&args.stream, args.since_lsn, start == StreamStart::First);
    // A subject the server refuses this user fails the read at once, named.
    let read = read_headers(&context, &args.stream, start, |message| {
        audit.check(&message)
    });
    denials.guard(read).await?;
    let (mut report, events) = audit.finish();
    if let Some(database) = &args.database {
        check_table(&args, database, &events, &mut report).await?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", render(&report));
    }
    match report.findings() {
        0 => Ok(()),
        findings => Err(VerifyError::Findings {
            stream: args.stream,
            findings,
        }),
    }
}

/// Compares the table rows (mapped to their event ids as `run` maps them) with the events.
async fn check_table(
    args: &Verify,
    database: &DatabaseUrl,
    events: &HashMap<String, HashSet<String>>,
    report: &mut Report,
) -> Result<(), VerifyError> {
    let catalog = Catalog::connect(database).await?;
    let tables = catalog.publication_tables(&args.publication).await?;
    let qualify = tables.len() > 1;
    let mut rows_total = 0;
    for relation in &tables {
        // `run`'s rule: `id` when the table has it. Without an id column the events' ids are
        // made of the commit LSN, which no row tells.
        let section = args
            .table_id_columns
            .iter()
            .find(|(table, _)| *table == relation.qualified_name() || *table == relation.name)
            .map(|(_, column)| column);
        let id_column = match section.or(args.id_column.as_ref()) {
            Some(column) => column.clone(),
            None if relation.column_index("id").is_some() => "id".to_owned(),
            None => {
                return Err(VerifyError::NoIdColumn {
                    table: relation.qualified_name(),
                });
            }
        };
        let ids = EventIds::bind(Some(&id_column), relation, qualify)?;
        let query = TableQuery {
            table: relation.clone(),
            predicate: args.where_sql.clone().unwrap_or_else(|| "true".to_owned()),
            order_by: vec![id_column],
            snapshot: None,
        };
        let (mut reader, _) = TableReader::open(&catalog, &query, 10_000).await?;
        let mut rows = HashSet::new();
        loop {
            let batch = reader.next_batch().await?;
            if batch.is_empty() {
                break;
            }
            for row in batch {
                if let Ok(id) = ids.of(&row[..], &TransactionContext::backfill(), 0) {
                    rows.insert(id.as_str().to_owned());
                }
            }
        }
        rows_total += rows.len() as u64;
        let empty = HashSet::new();
        let stored = events.get(&relation.qualified_name()).unwrap_or(&empty);
        let mut missing: Vec<&String> = rows.iter().filter(|id| !stored.contains(*id)).collect();
        missing.sort();
        for id in missing {
            note(
                &mut report.rows_missing,
                &mut report.rows_missing_count,
                id.clone(),
            );
        }
        if args.where_sql.is_none() {
            let mut extra: Vec<&String> = stored.iter().filter(|id| !rows.contains(*id)).collect();
            extra.sort();
            for id in extra {
                note(
                    &mut report.unchecked_events,
                    &mut report.unchecked_events_count,
                    id.clone(),
                );
            }
        }
    }
    report.table_rows = Some(rows_total);
    Ok(())
}

pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "stream {}: {} messages checked (sequences {}..{})",
        r.stream,
        r.messages,
        r.first_sequence.map_or("-".into(), |s| s.to_string()),
        r.last_sequence.map_or("-".into(), |s| s.to_string()),
    );
    let mut line = |ok: bool, text: String| {
        let _ = writeln!(out, "  {}  {text}", if ok { "ok" } else { "!!" });
    };
    line(
        r.lsn_backwards_count == 0,
        match r.lsn_backwards_count {
            0 => "commit LSNs never go backwards".into(),
            n => format!(
                "{n} events committed before an event stored ahead of them (sequence, LSN, newest before): {:?}",
                r.lsn_backwards
            ),
        },
    );
    line(
        r.chain_breaks_count == 0,
        match r.chain_breaks_count {
            0 => format!(
                "every predecessor named is the message before ({} name none: the first, or unfenced)",
                r.unchained
            ),
            n => format!(
                "{n} breaks in the predecessor chain, a message lost or inserted (sequence, named, actual): {:?}",
                r.chain_breaks
            ),
        },
    );
    line(
        r.duplicate_ids_count == 0,
        match r.duplicate_ids_count {
            0 => "no event id twice".into(),
            n => format!(
                "{n} event ids stored twice (sequence, id, first sequence): {:?}",
                r.duplicate_ids
            ),
        },
    );
    if let Some(rows) = r.table_rows {
        line(
            r.rows_missing_count == 0,
            match r.rows_missing_count {
                0 => format!("all {rows} table rows are in the stream"),
                n => format!("{n} table rows the stream lacks: {:?}", r.rows_missing),
            },
        );
        if r.unchecked_events_count > 0 {
            let _ = writeln!(
                out,
                "  --  {} events whose rows the table no longer holds (deleted after publishing, \
                 as the clean-up job does): not compared: {:?}",
                r.unchecked_events_count, r.unchecked_events
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sequence: u64, id: &str, lsn: Option<&str>, expects: Option<&str>) -> StoredHeaders {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(header::MSG_ID, id);
        headers.insert(header::TABLE, "public.outbox");
        if let Some(lsn) = lsn {
            headers.insert(header::COMMIT_LSN, lsn);
        }
        if let Some(expects) = expects {
            headers.insert("Nats-Expected-Last-Msg-Id", expects);
        }
        StoredHeaders {
            sequence,
            subject: "outbox.order.created".into(),
            headers,
        }
    }

    #[test]
    fn finds_reorders_breaks_and_duplicates_and_passes_a_clean_stream() {
        let mut clean = StreamAudit::new("S", None, true);
        for m in [
            message(1, "a", Some("0/10"), None),
            message(2, "b", Some("0/10"), Some("a")),
            message(3, "c", Some("0/20"), Some("b")),
        ] {
            clean.check(&m);
        }
        let (report, events) = clean.finish();
        assert_eq!(report.findings(), 0, "{report:?}");
        assert_eq!(report.unchained, 1);
        assert_eq!(events["public.outbox"].len(), 3);

        let mut bad = StreamAudit::new("S", None, true);
        for m in [
            message(1, "a", Some("0/10"), None),
            // b (0/15) was lost: c names it.
            message(3, "c", Some("0/20"), Some("b")),
            message(4, "d", Some("0/18"), Some("c")),
            message(5, "a", Some("0/30"), Some("d")),
        ] {
            bad.check(&m);
        }
        let (report, _) = bad.finish();
        assert_eq!(report.chain_breaks, [(3, "b".to_owned(), "a".to_owned())]);
        assert_eq!(report.lsn_backwards_count, 1);
        assert_eq!(report.duplicate_ids, [(5, "a".to_owned(), 1)]);
        assert_eq!(report.findings(), 3);
        let text = render(&report);
        assert!(
            text.contains("!!  1 breaks in the predecessor chain"),
            "{text}"
        );

        // Atomic batches: the first names the sequence before it, the others follow it.
        let batch = |sequence: u64, id: &str, batch: &str, n: u64, expects: Option<u64>| {
            let mut m = message(sequence, id, Some("0/40"), None);
            m.headers.insert("Nats-Batch-Id", batch);
            m.headers
                .insert("Nats-Batch-Sequence", n.to_string().as_str());
            if let Some(expects) = expects {
                m.headers
                    .insert("Nats-Expected-Last-Sequence", expects.to_string().as_str());
            }
            m
        };
        let mut batches = StreamAudit::new("S", None, true);
        for m in [
            message(1, "a", Some("0/10"), None),
            batch(2, "b", "x-1", 1, Some(1)),
            batch(3, "c", "x-1", 2, None),
            batch(4, "d", "x-2", 1, Some(3)),
            // x-2's second message is missing; x-3 expected sequence 5.
            batch(5, "e", "x-2", 3, None),
            batch(6, "f", "x-3", 1, Some(4)),
        ] {
            batches.check(&m);
        }
        let (report, _) = batches.finish();
        assert_eq!(report.unchained, 1, "{report:?}");
        assert_eq!(
            report.chain_breaks,
            [
                (5, "batch x-2 message 2".to_owned(), "d".to_owned()),
                (6, "sequence 4".to_owned(), "sequence 5".to_owned()),
            ]
        );

        let mut later = StreamAudit::new("S", Some(Lsn::new(0x20)), true);
        for m in [
            message(1, "a", Some("0/10"), None),
            message(2, "b", Some("0/20"), Some("a")),
        ] {
            later.check(&m);
        }
        let (report, _) = later.finish();
        assert_eq!((report.messages, report.findings()), (1, 0));
    }
}
