//! Backfill: rows read again from the outbox table and published with the same mapping as the
//! WAL's, for what the stream lacks — after a lost slot, or to move from a polling relay.
//!
//! Rows are read in one snapshot, in a stable order, in batches ([`crate::source::TableReader`]),
//! as text, and mapped by the very [`TableMapping`] the WAL's rows go through (both are
//! [`super::mapping::RowValues`]). A backfilled event carries `Outbox-Backfill: true` and no commit LSN. Before
//! publishing, the ids its stream already holds (read headers-only) are checked, so nothing is
//! stored twice also outside JetStream's duplicate window. It never takes the replication slot:
//! it runs beside `run`, whose next publish after a backfilled one is refused by fencing and
//! sent again (a session restart, never an event).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use super::error::{Disposition, Error};
use super::mapping::{Mappings, TableMapping, TransactionContext};
use super::poison::{ErrorPolicy, PoisonKind, PoisonRow};
use crate::event::{EventRef, OutboxEvent};
use crate::sink::{JetStreamSink, Outgoing, Sent, SinkConfig, SinkError};
use crate::source::pgoutput::Relation;
use crate::source::{
    Catalog, PublicationName, Selection, SourceError, TableQuery, TableReader, TextRow, quote_ident,
};

type Sink = JetStreamSink<()>;

/// Which rows to re-publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rows {
    /// Those a SQL condition selects.
    Where(String),
    /// Those created after the stream's last event (its `Outbox-Commit-Time`) minus `margin`:
    /// the events a lost slot never delivered. All rows when the stream holds none.
    SinceStreamEnd { margin: Duration },
}

#[derive(Debug, Clone)]
pub struct BackfillConfig {
    pub publication: PublicationName,
    pub sink: SinkConfig,
    pub mappings: Mappings,
    pub rows: Rows,
    /// Only this table of the publication (`table` or `schema.table`).
    pub table: Option<String>,
    /// Columns to order by; by default the created-at column then the primary key, or the
    /// primary key alone.
    pub order_by: Option<Vec<String>>,
    /// The created-at column (`--since-stream-end`, default order); `created_at` by default.
    pub created_column: Option<String>,
    pub batch: usize,
    /// In a snapshot exported by a replication slot's creation (the switch from a polling relay).
    pub snapshot: Option<String>,
    pub dry_run: bool,
}

/// What happened to one table's rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    pub order_by: Vec<String>,
    pub predicate: String,
    pub selected: u64,
    /// The selection's first and last rows' event ids.
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub published: u64,
    /// In the stream already (by event id), so not published.
    pub already_present: u64,
    /// Poison rows, dead-lettered (with `--on-error dead-letter`).
    pub dead_lettered: u64,
}

/// Rows done so far, of how many, for a progress display.
pub trait Progress {
    fn table(&mut self, report: &TableReport);
    fn rows(&mut self, done: u64, total: u64);
}

/// Re-publishes the selected rows of every table of the publication (or `--table`).
pub async fn backfill(
    config: &BackfillConfig,
    catalog: &Catalog,
    progress: &mut dyn Progress,
) -> Result<Vec<TableReport>, Error> {
    let tables = catalog.publication_tables(&config.publication).await?;
    let qualify_ids = tables.len() > 1;
    let chosen: Vec<&Relation> = tables
        .iter()
        .filter(|t| {
            config
                .table
                .as_deref()
                .is_none_or(|wanted| wanted == t.name || wanted == t.qualified_name())
        })
        .collect();
    if chosen.is_empty() {
        return Err(SourceError::Query {
            context: "choosing the table to backfill".into(),
            detail: format!(
                "publication `{}` has no table `{}`; its tables: {}",
                config.publication,
                config.table.as_deref().unwrap_or_default(),
                tables
                    .iter()
                    .map(|t| t.qualified_name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            transient: false,
        }
        .into());
    }
    let mut sink = connect(&config.sink).await?;
    let since = match &config.rows {
        Rows::SinceStreamEnd { margin } => sink.stream_end().map(|end| (end, *margin)),
        Rows::Where(_) => None,
    };
    let mut reports = Vec::new();
    for relation in chosen {
        let settings = config.mappings.for_table(relation);
        let mapping = TableMapping::bind(&settings.mapping, relation, qualify_ids)?;
        let query = table_query(config, catalog, relation, since.as_ref()).await?;
        let batch_size = config.batch;
        let (mut reader, selection) = TableReader::open(catalog, &query, batch_size).await?;
        let mut report = TableReport {
            table: relation.qualified_name(),
            order_by: query.order_by.clone(),
            predicate: query.predicate.clone(),
            selected: selection.rows,
            ..Default::default()
        };
        describe_edges(&mut report, &selection, &mapping);
        progress.table(&report);
        if config.dry_run {
            reports.push(report);
            continue;
        }
        let start_time = since.as_ref().and_then(|(end, margin)| {
            let time = end.commit_time.as_deref()?;
            let at =
                time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
                    .ok()?;
            Some(at - *margin)
        });
        let mut table = TableBackfill {
            config,
            mapping,
            on_error: &settings.on_error,
            ids: HashMap::new(),
            start_time,
            row_index: 0,
        };
        loop {
            let rows = reader.next_batch().await?;
            if rows.is_empty() {
                break;
            }
            table.publish_batch(&mut sink, rows, &mut report).await?;
            progress.rows(
                report.published + report.already_present + report.dead_lettered,
                report.selected,
            );
        }
        reports.push(report);
    }
    Ok(reports)
}

async fn connect(config: &SinkConfig) -> Result<Sink, Error> {
    let mut sink = Sink::connect(config).await?;
    sink.prepare(config).await?;
    Ok(sink)
}

/// The query for `relation`: the predicate, and the order (said in the report).
async fn table_query(
    config: &BackfillConfig,
    catalog: &Catalog,
    relation: &Relation,
    since: Option<&(crate::sink::StreamEnd, Duration)>,
) -> Result<TableQuery, Error> {
    let has = |column: &str| relation.column_index(column).is_some();
    let missing = |column: &str, flag: &'static str| super::mapping::MissingColumn {
        table: relation.qualified_name(),
        column: column.to_owned(),
        flag,
        available: relation
            .column_names()
            .iter()
            .map(|c| c.to_string())
            .collect(),
    };
    let created = match &config.created_column {
        Some(column) if has(column) => Some(column.clone()),
        Some(column) => return Err(missing(column, "--created-column").into()),
        None => Some("created_at".to_owned()).filter(|c| has(c)),
    };
    let predicate = match (&config.rows, since) {
        (Rows::Where(condition), _) => condition.clone(),
        (Rows::SinceStreamEnd { .. }, None) => "true".to_owned(),
        (Rows::SinceStreamEnd { margin }, Some((end, _))) => {
            let created = created
                .clone()
                .ok_or_else(|| missing("created_at", "--created-column"))?;
            match &end.commit_time {
                Some(time) => format!(
                    "{} >= '{}'::timestamptz - interval '{} milliseconds'",
                    quote_ident(&created),
                    time.replace('\'', "''"),
                    margin.as_millis()
                ),
                None => "true".to_owned(),
            }
        }
    };
    let order_by = match &config.order_by {
        Some(columns) => {
            for column in columns {
                if !has(column) {
                    return Err(missing(column, "--order-by").into());
                }
            }
            columns.clone()
        }
        None => {
            let key = catalog.primary_key(relation).await?;
            let mut order: Vec<String> = created.into_iter().collect();
            for column in key {
                if !order.contains(&column) {
                    order.push(column);
                }
            }
            if order.is_empty() {
                return Err(SourceError::Query {
                    context: format!("ordering the rows of `{}`", relation.qualified_name()),
                    detail: "the table has neither a created_at column nor a primary key: give \
                             --order-by"
                        .into(),
                    transient: false,
                }
                .into());
            }
            order
        }
    };
    Ok(TableQuery {
        table: relation.clone(),
        predicate,
        order_by,
        snapshot: config.snapshot.clone(),
    })
}

/// The event ids of the selection's first and last rows, for the report.
fn describe_edges(report: &mut TableReport, selection: &Selection, mapping: &TableMapping) {
    let id = |row: &Option<TextRow>| {
        let row = row.as_ref()?;
        let message = mapping
            .map(&row[..], &TransactionContext::backfill(), 0)
            .ok()?;
        Some(message.id.as_str().to_owned())
    };
    report.first_id = id(&selection.first);
    report.last_id = id(&selection.last);
}

/// A row ready to publish.
struct Prepared {
    message: OutboxEvent,
    event: EventRef,
    /// The dead letter of a poison row.
    dead_letter: bool,
}

struct TableBackfill<'a> {
    config: &'a BackfillConfig,
    mapping: TableMapping,
    /// The table's `--on-error`.
    on_error: &'a ErrorPolicy,
    /// Per stream, the ids it held when first asked about.
    ids: HashMap<String, HashSet<String>>,
    start_time: Option<time::OffsetDateTime>,
    row_index: u32,
}

/// How many times in a row publishing may fail before the backfill gives up.
const ATTEMPTS: usize = 10;

impl TableBackfill<'_> {
    async fn publish_batch(
        &mut self,
        sink: &mut Sink,
        rows: Vec<TextRow>,
        report: &mut TableReport,
    ) -> Result<(), Error> {
        let mut queue = VecDeque::with_capacity(rows.len());
        for row in rows {
            let prepared = match self.map(&row) {
                Ok(prepared) => prepared,
                Err(poisoned) => {
                    let (row, err) = *poisoned;
                    self.poison(row, err.into(), sink.max_payload())?
                }
            };
            if self.present(sink, &prepared).await? {
                report.already_present += 1;
                continue;
            }
            queue.push_back(prepared);
        }
        let mut failures = 0;
        while !queue.is_empty() {
            match self.send(sink, &mut queue, report).await {
                Ok(()) => {}
                Err(err) => {
                    failures += 1;
                    if failures >= ATTEMPTS {
                        return Err(err);
                    }
                    match err.disposition() {
                        // A dead letter JetStream refuses has nothing left to fall back to.
                        Disposition::Poison(_) if queue.front().is_some_and(|p| p.dead_letter) => {
                            return Err(err);
                        }
                        Disposition::Poison(kind) => {
                            let Some(front) = queue.pop_front() else {
                                return Err(err);
                            };
                            let row = PoisonRow::new(
                                kind,
                                err.to_string(),
                                front.event,
                                front.message.payload,
                            );
                            let dead = self.poison(row, err, sink.max_payload())?;
                            queue.push_front(dead);
                        }
                        Disposition::Transient => {
                            tracing::warn!(error = %err, "backfill: publishing again from the refused row");
                        }
                        Disposition::Fatal => return Err(err),
                    }
                    // The rows after a refused one were refused too (fencing): a new connection
                    // fences on what the stream holds now.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    *sink = connect(&self.config.sink).await?;
                }
            }
        }
        Ok(())
    }

    /// Sends the queue and takes its acks in order; what was stored leaves the queue. Stops at
    /// the first refusal.
    async fn send(
        &mut self,
        sink: &mut Sink,
        queue: &mut VecDeque<Prepared>,
        report: &mut TableReport,
    ) -> Result<(), Error> {
        let mut sent = 0;
        for prepared in queue.iter_mut() {
            match sink
                .publish(
                    Outgoing {
                        message: prepared.message.clone(),
                        event: prepared.event.clone(),
                        tag: (),
                    },
                    true,
                )
                .await
            {
                Ok(Sent::Pipelined | Sent::AwaitAck | Sent::AlreadyStored) => sent += 1,
                Err(err @ SinkError::TooLarge { .. }) if sent == 0 => return Err(err.into()),
                // Sent later on its own, after the acks of those before it.
                Err(SinkError::TooLarge { .. }) => break,
                Err(err) => return Err(err.into()),
            }
        }
        for _ in 0..sent {
            // A publish the server refused this user is never answered: stop on the refusal.
            let denials = sink.denials().clone();
            let (published, outcome) = tokio::select! {
                biased;
                denied = denials.wait() => return Err(denied.into()),
                next = sink.next_ack() => next,
            };
            match outcome {
                Ok(ack) => {
                    let done = queue.pop_front();
                    if done.as_ref().is_some_and(|p| p.dead_letter) {
                        report.dead_lettered += 1;
                    } else if ack.duplicate {
                        report.already_present += 1;
                    } else {
                        report.published += 1;
                    }
                }
                Err(err) => return Err(sink.ack_error(published.event, err).await.into()),
            }
        }
        Ok(())
    }

    /// Maps `row` as the WAL's rows are; an unmappable row comes back with its error.
    fn map(
        &mut self,
        row: &TextRow,
    ) -> Result<Prepared, Box<(PoisonRow, super::mapping::UnmappableRow)>> {
        let index = self.row_index;
        self.row_index = self.row_index.wrapping_add(1);
        let context = TransactionContext::backfill();
        match self.mapping.map(&row[..], &context, index) {
            Ok(message) => {
                let event = self.mapping.event_ref(&message, context.commit_lsn, index);
                Ok(Prepared {
                    message,
                    event,
                    dead_letter: false,
                })
            }
            Err(unmappable) => {
                let row = PoisonRow::new(
                    PoisonKind::Unmappable,
                    unmappable.reason.clone(),
                    unmappable.event.clone(),
                    self.mapping.raw_payload(&row[..]),
                );
                Err(Box::new((row, unmappable)))
            }
        }
    }

    /// With `--on-error dead-letter`, the dead letter to publish in place of `row`; else `err`.
    fn poison(&self, row: PoisonRow, err: Error, max_payload: usize) -> Result<Prepared, Error> {
        let ErrorPolicy::DeadLetter { subject } = self.on_error else {
            return Err(err);
        };
        tracing::warn!(kind = row.kind.as_str(), event = %row.event, reason = %row.reason,
            dead_letter_subject = %subject, "backfill: a row that cannot be published as itself goes to the dead-letter subject");
        let event = EventRef {
            subject: Some(subject.as_str().into()),
            ..row.event.clone()
        };
        Ok(Prepared {
            message: row.into_dead_letter(subject, max_payload),
            event,
            dead_letter: true,
        })
    }

    /// Whether the stream this row goes to holds its id already.
    async fn present(&mut self, sink: &mut Sink, prepared: &Prepared) -> Result<bool, Error> {
        let Some(stream) = sink.stream_name_of(prepared.message.subject.as_str()) else {
            return Ok(false);
        };
        if !self.ids.contains_key(&stream) {
            let ids = sink.stored_ids(&stream, self.start_time).await?;
            tracing::info!(stream = %stream, ids = ids.len(), since = ?self.start_time,
                "backfill: read the event ids the stream holds");
            self.ids.insert(stream.clone(), ids);
        }
        Ok(self.ids[&stream].contains(prepared.message.id.as_str()))
    }
}
