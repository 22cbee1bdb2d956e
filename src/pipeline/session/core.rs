//! The session's decisions, without I/O: what to publish, what a refusal means, when a session
//! ends and what carries over, which position PostgreSQL and the checkpoint get.
//!
//! Inputs: a WAL event ([`SessionCore::on_wal`]), what the sink did with a publish
//! ([`SessionCore::on_sent`]), an ack outcome ([`SessionCore::on_ack`]), a tick, the checkpoint
//! saved, shutdown. Outputs, drained with [`SessionCore::poll_output`]: publish one event or a
//! batch, tell PostgreSQL a position, save the checkpoint, end the session. The driver
//! ([`super::driver`]) performs each output and feeds its result back before asking for the next
//! one, so publishes leave in the order decided here, each after the previous one's fate is known.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::time::Instant;

use super::positions::Positions;
use crate::event::{EventRef, OutboxEvent};
use crate::lsn::Lsn;
use crate::pipeline::PipelineSettings;
use crate::pipeline::atomic::{self, Fallback, Held, OpenBatch};
use crate::pipeline::error::{Disposition, Error};
use crate::pipeline::mapping::{
    RowValues, TableMapping, TransactionContext, UnmappableRow, WalRow, copy_header_object,
};
use crate::pipeline::messages::MessageMapping;
use crate::pipeline::poison::{ErrorPolicy, PoisonKind, PoisonRow, RefusedRows};
use crate::pipeline::replay::ReplayHold;
use crate::sink::{
    Ack, BatchOutcome, MAX_BATCHES_IN_FLIGHT, Outgoing, Published, Role, Sent, SinkError,
};
use crate::source::pgoutput::{self, Message, SkippedKind};
use crate::source::{SourceError, WalEvent};
use crate::stats::{PoisonAction, SkipReason, SkippedChanges, Stats};

/// What travels with each publish and comes back with its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    commit_time: SystemTime,
    /// Set on a dead letter, with why its row became one: a dead letter that cannot be published
    /// has nothing left to fall back to.
    dead_letter: Option<PoisonKind>,
}

/// An event on its way out.
pub type Event = Outgoing<InFlight>;

/// What the session asks the driver to do.
// One at a time, moved straight on to the sink: boxing the event would allocate per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Output {
    /// Publish one event; with `fenced`, naming its predecessor in its stream.
    Publish { event: Event, fenced: bool },
    /// Publish a transaction's events as one atomic batch.
    PublishBatch { events: Vec<Event>, fenced: bool },
    /// Tell PostgreSQL it may discard the WAL before this position.
    Report(Lsn),
    /// Save this position in the checkpoint, then call [`SessionCore::on_saved`].
    SaveCheckpoint(Lsn),
    /// The session is over.
    End(SessionEnd),
}

/// What the sink did with the last publish [`SessionCore::poll_output`] handed out.
#[derive(Debug)]
pub enum SendResult {
    One(Result<Sent, SinkError>),
    Batch(Result<BatchOutcome<InFlight>, SinkError>),
}

/// Why a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Shutdown was requested and in-flight acks were drained (or the deadline came first).
    Shutdown { drained: bool },
    /// A refusal the next session, started at once, answers: a dead letter in its row's place
    /// (see [`crate::pipeline::poison`]), a transaction event by event, or a look again at what
    /// the stream holds.
    Restart,
}

/// What outlives a session (see [`Carryover`]'s fields).
#[derive(Debug)]
pub struct Carryover {
    /// The newest position this process knows JetStream stored: the next session does not send
    /// again what committed before it.
    pub acked: Lsn,
    /// The replay window's history.
    pub hold: ReplayHold,
    /// Rows JetStream refused at their ack: dead-lettered in their place by the next session.
    pub refused: RefusedRows,
    /// (commit LSN, event id) of a publish JetStream refused because the stream's last message
    /// was not its predecessor, while every publish before it was acked: they are all stored,
    /// so the next session sends it without naming a predecessor. Else the first new publish of
    /// every session would be fenced on a re-sent duplicate and be refused again, forever,
    /// behind a message another publisher stored.
    pub unfence: Option<(Lsn, String)>,
    /// Commit LSNs of transactions JetStream refused as an atomic batch because of one of their
    /// rows, with `--on-error dead-letter`: the next session publishes them event by event, the
    /// refused row's dead letter in its place (see [`crate::pipeline::atomic`]).
    refused_batches: HashSet<Lsn>,
    /// Commit LSNs of transactions JetStream refused as an atomic batch because it had stored
    /// one of their ids: the next session reads the stream's end again, which holds them when
    /// an earlier session's batch was stored late. Refused so a second time, an id was used
    /// twice, and the process stops.
    duplicate_batches: HashSet<Lsn>,
    /// Commit LSN of the newest transaction counted in the metrics: one read again by a later
    /// session is not counted again.
    counted_through: Lsn,
}

impl Carryover {
    pub fn new(acked: Lsn, hold: ReplayHold) -> Self {
        Carryover {
            acked,
            hold,
            refused: RefusedRows::default(),
            unfence: None,
            refused_batches: HashSet::new(),
            duplicate_batches: HashSet::new(),
            counted_through: Lsn::ZERO,
        }
    }

    /// Whether the publish of `event` names its predecessor.
    fn fenced(&mut self, event: &EventRef) -> bool {
        match &self.unfence {
            Some((lsn, id)) if *lsn == event.commit_lsn && *id == event.event_id => {
                self.unfence = None;
                false
            }
            _ => true,
        }
    }

    /// What no session reads again is forgotten: transactions that committed before `lsn`.
    pub fn forget_before(&mut self, lsn: Lsn) {
        self.refused.forget_before(lsn);
        self.refused_batches.retain(|&commit| commit >= lsn);
        self.duplicate_batches.retain(|&commit| commit >= lsn);
    }
}

/// Where a session starts.
#[derive(Debug, Clone)]
pub struct SessionStart {
    /// Transactions that committed before this LSN are read but not published (`--start-lsn`,
    /// what the checkpoint says was published, or what this process acked).
    pub skip_before: Lsn,
    /// What the checkpoint holds as the session starts.
    pub saved: Lsn,
    /// The publication's tables (`schema.table`) when the session started.
    pub tables: HashSet<String>,
    /// The publication has more than one table: event ids are qualified by it.
    pub qualify_ids: bool,
    /// `--message-prefix`es, bound.
    pub messages: Vec<MessageMapping>,
    /// The server's largest accepted message (dead letters leave out a body over it).
    pub max_payload: usize,
}

/// A step decided and not yet taken, in WAL order.
// As `Output`: boxing the event would allocate per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Step {
    /// `fenced` set when it replaces a publish that decided it already (a dead letter).
    One {
        event: Event,
        fenced: Option<bool>,
    },
    Batch(Vec<Event>),
    /// A transaction's end: counted once everything before it went out.
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: Option<SystemTime>,
    },
}

/// A publish handed out, whose result the driver has not fed back yet.
#[derive(Debug, Clone, Copy)]
enum Sending {
    One {
        fenced: bool,
        commit_time: SystemTime,
    },
    Batch,
}

/// How often the newest acked commit LSN is logged while it moves.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// One replication session's state machine.
pub struct SessionCore<'a> {
    settings: &'a PipelineSettings,
    stats: &'a Stats,
    carry: Carryover,
    positions: Positions,
    skip_before: Lsn,
    tables_at_start: HashSet<String>,
    qualify_ids: bool,
    messages: Vec<MessageMapping>,
    max_payload: usize,
    tables: HashMap<u32, TableMapping>,
    /// `--on-error` of each table bound (`schema.table`); the flags' for the others.
    policies: HashMap<Arc<str>, ErrorPolicy>,
    transaction: Option<TransactionContext>,
    /// The open transaction committed before `skip_before`.
    skipping: bool,
    /// What the open transaction skipped, counted at its Commit.
    skipped: SkippedChanges,
    row_index: u32,
    /// With `--atomic-transactions`, the open transaction's events held for its batch.
    batch: Option<OpenBatch<Event>>,
    steps: VecDeque<Step>,
    sending: Option<Sending>,
    in_flight: usize,
    batches_in_flight: usize,
    /// A publish went out that nothing after it can be fenced on: no publish until its ack.
    await_acks: bool,
    /// A checkpoint save to hand out, and whether one is under way.
    pending_save: Option<Lsn>,
    saving: bool,
    shutting_down: bool,
    end: Option<SessionEnd>,
    ended: bool,
    /// A non-transactional message with one of our prefixes was warned about.
    warned_non_transactional: bool,
    /// The open transaction's annotations (`--annotation-prefix`).
    annotations: HeaderMap,
    /// An annotation arriving after events of its transaction was warned about.
    warned_late_annotation: bool,
    /// The newest acked commit LSN last logged, and when: logged periodically so an operator
    /// can save it for `--start-lsn`.
    logged_commit: Option<(Instant, Lsn)>,
}

impl<'a> SessionCore<'a> {
    pub fn new(
        settings: &'a PipelineSettings,
        stats: &'a Stats,
        start: SessionStart,
        carry: Carryover,
    ) -> Self {
        let Carryover { acked, .. } = carry;
        let hold = carry.hold.clone();
        SessionCore {
            settings,
            stats,
            positions: Positions::new(acked, hold, start.saved),
            carry,
            skip_before: start.skip_before,
            tables_at_start: start.tables,
            qualify_ids: start.qualify_ids,
            messages: start.messages,
            max_payload: start.max_payload,
            tables: HashMap::new(),
            policies: HashMap::new(),
            transaction: None,
            skipping: false,
            skipped: SkippedChanges::default(),
            row_index: 0,
            batch: settings.atomic_max_batch.map(OpenBatch::new),
            steps: VecDeque::new(),
            sending: None,
            in_flight: 0,
            batches_in_flight: 0,
            await_acks: false,
            pending_save: None,
            saving: false,
            shutting_down: false,
            end: None,
            ended: false,
            warned_non_transactional: false,
            annotations: HeaderMap::new(),
            warned_late_annotation: false,
            logged_commit: None,
        }
    }

    /// Whether the next WAL event may be read: everything decided went out, and the window has
    /// room.
    pub fn wants_wal(&self) -> bool {
        self.end.is_none()
            && !self.shutting_down
            && self.steps.is_empty()
            && self.sending.is_none()
            && !self.await_acks
            && self.in_flight < self.settings.max_in_flight.max(1)
            && self.batches_in_flight < MAX_BATCHES_IN_FLIGHT
    }

    /// Publishes awaiting their ack.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn positions(&self) -> &Positions {
        &self.positions
    }

    /// The next thing to do, if any. After [`Output::Publish`] or [`Output::PublishBatch`],
    /// nothing until [`SessionCore::on_sent`].
    pub fn poll_output(&mut self) -> Option<Output> {
        if self.ended {
            return None;
        }
        if let Some(end) = self.end {
            self.ended = true;
            return Some(Output::End(end));
        }
        if let Some(lsn) = self.positions.report() {
            self.stats.confirmed_lsn.set(lsn.as_u64());
            return Some(Output::Report(lsn));
        }
        if self.sending.is_some() {
            return None;
        }
        if let Some(lsn) = self.pending_save.take() {
            self.saving = true;
            return Some(Output::SaveCheckpoint(lsn));
        }
        if self.shutting_down {
            if self.in_flight == 0 {
                self.end = Some(SessionEnd::Shutdown { drained: true });
                return self.poll_output();
            }
            return None;
        }
        if self.await_acks {
            if self.in_flight > 0 {
                return None;
            }
            self.await_acks = false;
        }
        loop {
            match self.steps.pop_front()? {
                Step::One { event, fenced } => {
                    let fenced = fenced.unwrap_or_else(|| self.carry.fenced(&event.event));
                    self.sending = Some(Sending::One {
                        fenced,
                        commit_time: event.tag.commit_time,
                    });
                    return Some(Output::Publish { event, fenced });
                }
                Step::Batch(events) => {
                    let fenced = self.carry.fenced(&events[0].event);
                    self.sending = Some(Sending::Batch);
                    return Some(Output::PublishBatch { events, fenced });
                }
                Step::Commit {
                    commit_lsn,
                    end_lsn,
                    commit_time,
                } => {
                    // Every event of the transaction went out: counted, its commit can be.
                    if self.positions.commit(commit_lsn, end_lsn, Instant::now()) {
                        // Every row was acked before the Commit arrived (or there was none).
                        if let Some(commit_time) = commit_time {
                            self.stats.transaction_acked(commit_time);
                        }
                        self.acked_moved();
                        if let Some(lsn) = self.positions.report() {
                            self.stats.confirmed_lsn.set(lsn.as_u64());
                            return Some(Output::Report(lsn));
                        }
                    }
                }
            }
        }
    }

    /// Shutdown was asked for: nothing more is read or sent; the session ends once the
    /// publishes in flight are acked (or at the driver's deadline).
    pub fn on_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// The shutdown deadline passed with publishes still in flight.
    pub fn on_deadline(&mut self) {
        if self.end.is_none() {
            self.end = Some(SessionEnd::Shutdown {
                drained: self.in_flight == 0,
            });
        }
    }

    /// The checkpoint holds `saved`, or (None) the save was abandoned at shutdown.
    pub fn on_saved(&mut self, saved: Option<Lsn>) {
        self.saving = false;
        if let Some(lsn) = saved {
            self.positions.saved_at(lsn);
        }
    }

    /// Every status interval (at most a second): proof of life for /healthz, the replay window,
    /// the checkpoint (nothing past it is told to PostgreSQL), and the progress log line.
    pub fn on_tick(&mut self, now: Instant) {
        self.stats.beat();
        self.positions.release(now);
        if !self.saving && !self.shutting_down && self.end.is_none() {
            self.pending_save = self.positions.unsaved();
        }
        self.log_progress(now);
    }

    fn log_progress(&mut self, now: Instant) {
        let Some(commit) = self.positions.last_acked_commit() else {
            return;
        };
        let due = match self.logged_commit {
            None => true,
            Some((at, logged)) => {
                logged != commit && now.duration_since(at) >= PROGRESS_LOG_INTERVAL
            }
        };
        if due {
            tracing::info!(last_acked_commit_lsn = %commit, confirmed_lsn = %self.positions.reportable(),
                "progress: every transaction up to this commit LSN is in JetStream");
            self.logged_commit = Some((now, commit));
        }
    }

    /// The session's end: what carries over to the next one.
    pub fn into_carryover(mut self) -> Carryover {
        let (acked, hold) = self.positions.into_parts();
        self.carry.acked = self.carry.acked.max(acked);
        self.carry.hold = hold;
        self.carry
    }

    // ---- WAL events -------------------------------------------------------------------------

    /// The next event of the replication stream.
    pub fn on_wal(&mut self, event: WalEvent) -> Result<(), Error> {
        match event {
            WalEvent::Begin {
                commit_lsn,
                commit_time_micros,
            } => {
                self.positions.begin();
                self.skipping = commit_lsn < self.skip_before;
                self.transaction = Some(TransactionContext::new(commit_lsn, commit_time_micros));
                self.skipped = SkippedChanges::default();
                self.row_index = 0;
                if !self.annotations.is_empty() {
                    self.annotations = HeaderMap::new();
                }
                if let Some(batch) = &mut self.batch {
                    let refused = self.carry.refused_batches.contains(&commit_lsn);
                    batch.begin(refused.then_some(Fallback::Refused));
                }
                Ok(())
            }
            WalEvent::Data(frame) => self.on_data(frame),
            WalEvent::Commit { end_lsn } => self.on_commit(end_lsn),
            WalEvent::Message {
                transactional,
                prefix,
                content,
            } => self.on_logical_message(transactional, &prefix, content),
            WalEvent::Keepalive { wal_end } => {
                self.stats.server_wal_end.set(wal_end.as_u64());
                // Only once everything decided went out: a keepalive never overtakes an event.
                if self.steps.is_empty()
                    && self.sending.is_none()
                    && self.positions.keepalive(wal_end, Instant::now())
                {
                    self.acked_moved();
                }
                Ok(())
            }
        }
    }

    fn on_commit(&mut self, end_lsn: Lsn) -> Result<(), Error> {
        self.hold_batch_at_commit();
        let transaction = self.transaction.take();
        let commit_lsn = transaction.as_ref().map_or(end_lsn, |t| t.commit_lsn);
        if commit_lsn > self.carry.counted_through {
            self.carry.counted_through = commit_lsn;
            self.stats.transaction_read(&self.skipped);
        }
        self.steps.push_back(Step::Commit {
            commit_lsn,
            end_lsn,
            commit_time: transaction.map(|t| t.commit_time),
        });
        Ok(())
    }

    fn on_data(&mut self, frame: Bytes) -> Result<(), Error> {
        let message = pgoutput::decode(&frame).map_err(|e| SourceError::Replication {
            detail: e.to_string(),
            transient: false,
        })?;
        match message {
            Message::Relation(relation) => {
                // (A partition's Relation arrives too when its root publishes it.)
                let settings = self.settings.mappings.for_table(&relation);
                let mapping = TableMapping::bind(&settings.mapping, &relation, self.qualify_ids)?;
                tracing::debug!(table = %mapping.table(), relation_id = relation.id, "bound table mapping");
                self.policies
                    .insert(mapping.table().clone(), settings.on_error.clone());
                self.tables.insert(relation.id, mapping);
                Ok(())
            }
            Message::Insert(insert) => {
                let (Some(mapping), Some(txn)) = (
                    self.tables.get(&insert.relation_id),
                    self.transaction.as_ref(),
                ) else {
                    return Err(SourceError::Replication {
                        detail: format!(
                            "insert for relation {} arrived without its Relation message or outside a transaction",
                            insert.relation_id
                        ),
                        transient: false,
                    }
                    .into());
                };
                if !self.tables_at_start.contains(mapping.table().as_ref()) {
                    // Its ids may need qualifying, and its columns checking: a new session
                    // reads the publication's tables again.
                    return Err(SourceError::PublicationChanged {
                        table: mapping.table().to_string(),
                    }
                    .into());
                }
                if self.skipping {
                    self.skipped.add(SkipReason::BeforeStartLsn);
                    return Ok(());
                }
                let row = WalRow {
                    tuple: insert.tuple,
                    frame: &frame,
                };
                let event = self.map_row(mapping, &row, txn, self.row_index)?;
                self.row_index += 1;
                self.publish(event);
                Ok(())
            }
            Message::Skipped(kind) => {
                self.on_skipped(kind);
                Ok(())
            }
        }
    }

    /// A row mapped (or its dead letter made) for publishing.
    fn map_row<R: RowValues + ?Sized>(
        &self,
        mapping: &TableMapping,
        row: &R,
        txn: &TransactionContext,
        row_index: u32,
    ) -> Result<Event, Error> {
        match mapping.map(row, txn, row_index) {
            Ok(message) => {
                let event = mapping.event_ref(&message, txn.commit_lsn, row_index);
                Ok(self.event_or_its_dead_letter(message, event, txn.commit_time))
            }
            Err(unmappable) => {
                let row = PoisonRow::new(
                    PoisonKind::Unmappable,
                    unmappable.reason.clone(),
                    unmappable.event.clone(),
                    mapping.raw_payload(row),
                );
                self.poison(row, unmappable.into(), txn.commit_time)
            }
        }
    }

    /// A logical decoding message (see [`crate::pipeline::messages`]): with one of our prefixes
    /// and inside a transaction, an event in its place; else skipped and counted.
    fn on_logical_message(
        &mut self,
        transactional: bool,
        prefix: &str,
        content: Bytes,
    ) -> Result<(), Error> {
        let annotation = self.settings.annotation_prefix.as_deref() == Some(prefix);
        let index = self.messages.iter().position(|m| m.prefix == prefix);
        if index.is_none() && !annotation {
            self.on_skipped(SkippedKind::LogicalMessage);
            return Ok(());
        }
        if !transactional {
            self.stats.skipped(SkipReason::NonTransactionalMessage, 1);
            if !self.warned_non_transactional {
                self.warned_non_transactional = true;
                tracing::warn!(%prefix,
                    "skipped a non-transactional message with prefix `{prefix}`: it is sent even when its transaction aborts, so it is never published; emit it with pg_logical_emit_message(true, …)");
            }
            return Ok(());
        }
        let Some(txn) = self.transaction.as_ref() else {
            return Err(SourceError::Replication {
                detail: format!(
                    "a transactional message with prefix `{prefix}` arrived outside a transaction"
                ),
                transient: false,
            }
            .into());
        };
        if self.skipping {
            if !annotation {
                self.skipped.add(SkipReason::BeforeStartLsn);
            }
            return Ok(());
        }
        let Some(index) = index else {
            return self.on_annotation(prefix, content);
        };
        let row_index = self.row_index;
        let message = &self.messages[index];
        let event = match message.row(&content) {
            Ok(row) => self.map_row(&message.mapping, &row[..], txn, row_index)?,
            Err(reason) => {
                let unmappable = message.mapping.unreadable(txn, row_index, reason);
                let row = PoisonRow::new(
                    PoisonKind::Unmappable,
                    unmappable.reason.clone(),
                    unmappable.event.clone(),
                    content,
                );
                self.poison(row, unmappable.into(), txn.commit_time)?
            }
        };
        self.row_index += 1;
        self.publish(event);
        Ok(())
    }

    /// A transaction's annotation (`--annotation-prefix`): its members become headers of the
    /// transaction's events that follow it. One that cannot be read is a poison row of its own:
    /// the process stops naming it, or (`--on-error dead-letter`) it is dead-lettered and the
    /// events go out without it.
    fn on_annotation(&mut self, prefix: &str, content: Bytes) -> Result<(), Error> {
        let Some(txn) = self.transaction.as_ref() else {
            return Ok(());
        };
        let origin = format!("the annotation with prefix `{prefix}`");
        let mut annotations = std::mem::take(&mut self.annotations);
        match copy_header_object(&content, &origin, &mut annotations) {
            Ok(()) => {
                if self.row_index > 0 && !self.warned_late_annotation {
                    self.warned_late_annotation = true;
                    tracing::warn!(commit_lsn = %txn.commit_lsn, published = self.row_index,
                        "an annotation arrived after events of its transaction, which went out without it: emit it first (said once)");
                }
                self.annotations = annotations;
                Ok(())
            }
            Err(reason) => {
                let row_index = self.row_index;
                let event = EventRef {
                    event_id: format!("{}:{row_index}", txn.commit_lsn),
                    table: Arc::from(format!("message.{prefix}")),
                    subject: None,
                    commit_lsn: txn.commit_lsn,
                    row_index,
                };
                let commit_time = txn.commit_time;
                let unmappable = UnmappableRow {
                    event: event.clone(),
                    reason: reason.clone(),
                };
                let row = PoisonRow::new(PoisonKind::Unmappable, reason, event, content);
                let dead = self.poison(row, unmappable.into(), commit_time)?;
                self.annotations = annotations;
                self.row_index += 1;
                self.publish(dead);
                Ok(())
            }
        }
    }

    fn on_skipped(&mut self, kind: SkippedKind) {
        let reason = match kind {
            SkippedKind::Update => SkipReason::Update,
            SkippedKind::Delete => SkipReason::Delete,
            SkippedKind::Truncate => SkipReason::Truncate,
            _ => SkipReason::Other,
        };
        if self.transaction.is_some() {
            self.skipped.add(reason);
        } else {
            self.stats.skipped(reason, 1);
        }
        if let SkippedKind::Unknown(tag) = kind {
            tracing::warn!(tag = %char::from(tag), "skipped a pgoutput message of unknown type");
        }
    }

    // ---- publishing --------------------------------------------------------------------------

    /// The event itself, or — when JetStream refused it at its ack in an earlier session — its
    /// dead letter.
    fn event_or_its_dead_letter(
        &self,
        message: OutboxEvent,
        event: EventRef,
        commit_time: SystemTime,
    ) -> Event {
        if let Some((kind, reason)) = self.carry.refused.get(event.commit_lsn, &event.event_id)
            && let ErrorPolicy::DeadLetter { subject } = self.policy(&event.table)
        {
            let row = PoisonRow::new(kind, reason.to_owned(), event, message.payload);
            return self.dead_letter(row, subject, commit_time);
        }
        Outgoing {
            message,
            event,
            tag: InFlight {
                commit_time,
                dead_letter: None,
            },
        }
    }

    /// `--on-error` of `table`.
    fn policy(&self, table: &str) -> &ErrorPolicy {
        self.policies
            .get(table)
            .unwrap_or(&self.settings.mappings.default.on_error)
    }

    /// With `--on-error dead-letter`, the dead letter to publish in place of `row`; else `err`.
    fn poison(&self, row: PoisonRow, err: Error, commit_time: SystemTime) -> Result<Event, Error> {
        let ErrorPolicy::DeadLetter { subject } = self.policy(&row.event.table) else {
            self.stats.poison_row(row.kind, PoisonAction::Fail);
            return Err(err);
        };
        Ok(self.dead_letter(row, subject, commit_time))
    }

    /// The dead letter of `row` on `subject`, logged (and counted once it is stored).
    fn dead_letter(&self, row: PoisonRow, subject: &str, commit_time: SystemTime) -> Event {
        tracing::warn!(kind = row.kind.as_str(), event = %row.event, reason = %row.reason,
            dead_letter_subject = %subject,
            "published a row that cannot be published as itself to the dead-letter subject");
        let kind = row.kind;
        let event = EventRef {
            subject: Some(subject.into()),
            ..row.event.clone()
        };
        Outgoing {
            message: row.into_dead_letter(subject, self.max_payload),
            event,
            tag: InFlight {
                commit_time,
                dead_letter: Some(kind),
            },
        }
    }

    /// Sends `event`, or with `--atomic-transactions` holds it for its transaction's batch.
    /// The transaction's annotations join its headers (the row's own win).
    fn publish(&mut self, mut event: Event) {
        if !self.annotations.is_empty() && event.tag.dead_letter.is_none() {
            for (name, values) in self.annotations.iter() {
                if event.message.headers.get(name.clone()).is_none()
                    && let Some(value) = values.first()
                {
                    event.message.headers.insert(name.clone(), value.clone());
                }
            }
        }
        let Some(batch) = &mut self.batch else {
            self.steps.push_back(Step::One {
                event,
                fenced: None,
            });
            return;
        };
        let fallback = event
            .tag
            .dead_letter
            .is_some()
            .then_some(Fallback::DeadLetter);
        match batch.hold(event, fallback) {
            Held::Yes => {}
            Held::No(event) => self.steps.push_back(Step::One {
                event,
                fenced: None,
            }),
            Held::FallsBack(event, reason) => {
                let (held, first) = batch.fall_back(reason);
                self.fall_back(reason, first, held.into_iter().chain([event]));
            }
        }
    }

    /// A transaction that falls back: its events go out one by one, in order.
    fn fall_back(&mut self, reason: Fallback, first: bool, events: impl Iterator<Item = Event>) {
        self.stats.atomic_fallback(reason);
        if first && let Some(txn) = &self.transaction {
            atomic::warn(reason, txn.commit_lsn);
        }
        for event in events {
            self.steps.push_back(Step::One {
                event,
                fenced: None,
            });
        }
    }

    /// At a transaction's commit, what was held for its batch: one batch, or one event.
    fn hold_batch_at_commit(&mut self) {
        let Some(batch) = &mut self.batch else {
            return;
        };
        let mut events = batch.take();
        // An id twice in one transaction: JetStream would store it once, and refuse the batch
        // that holds it twice. Sent once, the second is what a per-event publish would have
        // made it: a duplicate.
        let repeated: Vec<usize> = {
            let mut seen = HashSet::with_capacity(events.len());
            (0..events.len())
                .filter(|&i| !seen.insert(events[i].message.id.as_str()))
                .collect()
        };
        for &i in repeated.iter().rev() {
            events.remove(i);
        }
        let twice = repeated.len();
        if twice > 0 {
            self.stats.duplicates.inc_by(twice as u64);
            tracing::warn!(commit_lsn = %events[0].event.commit_lsn, duplicates = twice,
                "a transaction holds the same event id more than once: JetStream stores it once");
        }
        match events.len() {
            0 => {}
            1 => {
                if let Some(event) = events.pop() {
                    self.steps.push_back(Step::One {
                        event,
                        fenced: None,
                    });
                }
            }
            _ => self.steps.push_back(Step::Batch(events)),
        }
    }

    /// What the sink did with the publish [`SessionCore::poll_output`] last handed out.
    pub fn on_sent(&mut self, result: SendResult) -> Result<(), Error> {
        let Some(sending) = self.sending.take() else {
            debug_assert!(false, "a send result without a publish");
            return Ok(());
        };
        match (sending, result) {
            (Sending::One { .. }, SendResult::One(Ok(Sent::AlreadyStored))) => {
                self.stats.already_stored.inc();
            }
            (Sending::One { .. }, SendResult::One(Ok(sent))) => {
                self.sent(1);
                self.await_acks = sent == Sent::AwaitAck;
            }
            (
                Sending::One {
                    fenced,
                    commit_time,
                },
                SendResult::One(Err(err)),
            ) => {
                self.stats.publish_error(err.kind());
                let SinkError::TooLarge { event, size, .. } = &err else {
                    return Err(err.into());
                };
                // A message over the server's max_payload is a poison row, whose dead letter
                // goes out in its place, fenced as it would have been.
                let mut row = PoisonRow::new(
                    PoisonKind::TooLarge,
                    err.to_string(),
                    event.clone(),
                    Bytes::new(),
                );
                row.payload_size = *size;
                let dead = self.poison(row, err.into(), commit_time)?;
                self.steps.push_front(Step::One {
                    event: dead,
                    fenced: Some(fenced),
                });
            }
            (Sending::Batch, SendResult::Batch(Ok(BatchOutcome::Sent(sent)))) => {
                self.stats.already_stored.inc_by(sent.already_stored as u64);
                self.sent(sent.sent);
                if sent.batched {
                    self.batches_in_flight += 1;
                }
            }
            (Sending::Batch, SendResult::Batch(Ok(BatchOutcome::NotBatchable(reason, events)))) => {
                let reason = Fallback::Sink(reason);
                let first = self
                    .batch
                    .as_mut()
                    .is_some_and(|batch| batch.fall_back(reason).1);
                self.stats.atomic_fallback(reason);
                if first {
                    atomic::warn(reason, events[0].event.commit_lsn);
                }
                for event in events.into_iter().rev() {
                    self.steps.push_front(Step::One {
                        event,
                        fenced: None,
                    });
                }
            }
            (Sending::Batch, SendResult::Batch(Err(err))) => {
                self.stats.publish_error(err.kind());
                return Err(err.into());
            }
            (sending, result) => {
                debug_assert!(false, "{result:?} answers {sending:?}");
            }
        }
        Ok(())
    }

    fn sent(&mut self, events: usize) {
        for _ in 0..events {
            self.positions.published();
        }
        self.in_flight += events;
        self.stats.in_flight.set(self.in_flight as u64);
    }

    // ---- acks ----------------------------------------------------------------------------------

    /// The oldest publish in flight was answered: stored (or a duplicate), or refused.
    pub fn on_ack(
        &mut self,
        published: Published<InFlight>,
        outcome: Result<Ack, SinkError>,
    ) -> Result<(), Error> {
        self.in_flight = self.in_flight.saturating_sub(1);
        if published.role == Role::CommitsBatch {
            self.batches_in_flight = self.batches_in_flight.saturating_sub(1);
        }
        self.stats.in_flight.set(self.in_flight as u64);
        let ack = match outcome {
            Ok(ack) => ack,
            Err(err) => return self.on_refused(published, err),
        };
        let Published { tag, role, .. } = published;
        if ack.duplicate {
            self.stats.duplicates.inc();
        } else {
            self.stats.published.inc();
            // Counted once stored: a dead letter re-sent after a restart is a duplicate.
            if let Some(kind) = tag.dead_letter {
                self.stats.poison_row(kind, PoisonAction::DeadLetter);
            }
            if role == Role::CommitsBatch {
                self.stats.atomic_batches.inc();
            }
        }
        if self.positions.acked_one(Instant::now()) {
            self.stats.transaction_acked(tag.commit_time);
            self.acked_moved();
        }
        Ok(())
    }

    /// A publish JetStream refused. What it means is decided here (see
    /// [`crate::pipeline::poison`] and [`crate::pipeline::atomic`]); the watermark never passes
    /// a row that is in neither its place nor its dead letter's.
    fn on_refused(&mut self, published: Published<InFlight>, err: SinkError) -> Result<(), Error> {
        self.stats.publish_error(err.kind());
        let Published { event, tag, role } = published;
        if let SinkError::Fenced { event, .. } = &err {
            // Acks come in publish order: every publish before this one is stored.
            self.carry.unfence = Some((event.commit_lsn, event.event_id.clone()));
            return Err(err.into());
        }
        if let SinkError::AtomicDuplicate { .. } = &err {
            return self.on_duplicate_batch(&event, err);
        }
        let refused_row = matches!(err, SinkError::NoStream { .. } | SinkError::Rejected { .. });
        if !refused_row {
            return Err(err.into());
        }
        if role != Role::Single {
            return self.on_refused_batch(&event, err);
        }
        let err = Error::from(err);
        let Disposition::Poison(kind) = err.disposition() else {
            return Err(err);
        };
        // A dead letter JetStream refuses has nothing left to fall back to.
        if tag.dead_letter.is_some() || *self.policy(&event.table) == ErrorPolicy::Fail {
            self.stats.poison_row(kind, PoisonAction::Fail);
            return Err(err);
        }
        tracing::warn!(kind = kind.as_str(), event = %event, reason = %err,
            "JetStream refused a row at its ack: restarting the session to publish its dead letter in its place");
        self.carry
            .refused
            .insert(event.commit_lsn, event.event_id, kind, err.to_string());
        self.end = Some(SessionEnd::Restart);
        Ok(())
    }

    /// JetStream refused a batch as holding an id it stored. A session that ended (a crash, a
    /// restart, another instance) had sent the batch, and JetStream stored it after this session
    /// read the stream's end: the next session reads it again and finds the transaction there.
    /// Never published event by event: consumers would see part of it.
    fn on_duplicate_batch(&mut self, event: &EventRef, err: SinkError) -> Result<(), Error> {
        let commit_lsn = event.commit_lsn;
        if !self.carry.duplicate_batches.insert(commit_lsn) {
            // Refused so again although the stream's end, read since, does not hold it.
            return Err(Error::IdUsedTwice {
                refused: Box::new(err),
            });
        }
        tracing::info!(%commit_lsn, reason = %err,
            "JetStream already holds an event of this transaction (a batch sent before this session was stored late): reading the stream's end again");
        self.end = Some(SessionEnd::Restart);
        Ok(())
    }

    /// JetStream refused a batch because of one of its rows (which one it does not say). With
    /// `--on-error dead-letter` the next session publishes the transaction event by event, the
    /// refused row's dead letter in its place: holding a dead letter, the transaction could not
    /// be atomic anyway. With `--on-error fail` the process stops, nothing of the transaction
    /// stored.
    fn on_refused_batch(&mut self, event: &EventRef, err: SinkError) -> Result<(), Error> {
        let detail = match &err {
            SinkError::Rejected { detail, .. } => detail.clone(),
            _ => "no stream captures one of its subjects".to_owned(),
        };
        if *self.policy(&event.table) == ErrorPolicy::Fail {
            self.stats
                .poison_row(PoisonKind::Rejected, PoisonAction::Fail);
            return Err(SinkError::AtomicRefused {
                event: event.clone(),
                detail: format!(
                    "{detail}. Nothing of the transaction was stored. One of its rows cannot be \
                     stored (JetStream does not say which): fix it, or run with --on-error \
                     dead-letter, which publishes this transaction event by event with that \
                     row's dead letter in its place"
                ),
            }
            .into());
        }
        tracing::warn!(commit_lsn = %event.commit_lsn, reason = %detail,
            "JetStream refused an atomic batch because of one of its rows: the next session publishes the transaction event by event, that row's dead letter in its place");
        self.stats.atomic_fallback(Fallback::Refused);
        self.carry.refused_batches.insert(event.commit_lsn);
        self.end = Some(SessionEnd::Restart);
        Ok(())
    }

    /// `acked` moved: what no session reads again is forgotten, the metric follows.
    fn acked_moved(&mut self) {
        let acked = self.positions.acked();
        self.carry.refused_batches.retain(|&lsn| lsn >= acked);
        self.carry.duplicate_batches.retain(|&lsn| lsn >= acked);
        if let Some(commit) = self.positions.last_acked_commit() {
            self.stats.last_acked_commit_lsn.set(commit.as_u64());
        }
    }
}

#[cfg(test)]
mod tests {
    //! The session's decisions, case by case, against a sink that records what it was asked and
    //! answers as scripted: no servers, no sleeps.

    use super::*;
    use crate::pipeline::mapping::{MappingConfig, Mappings, TableSettings};
    use crate::sink::{AckError, BatchSent, NotBatchable};
    use crate::source::pgoutput::encode;

    const TEXT: u32 = 25;

    fn lsn(v: u64) -> Lsn {
        Lsn::new(v)
    }

    fn settings(on_error: ErrorPolicy, atomic: Option<usize>) -> PipelineSettings {
        PipelineSettings {
            mappings: Mappings::new(TableSettings {
                mapping: MappingConfig::default(),
                on_error,
            }),
            max_in_flight: 100,
            shutdown_timeout: Duration::from_secs(5),
            status_interval: Duration::from_secs(1),
            message_prefixes: Vec::new(),
            annotation_prefix: None,
            atomic_max_batch: atomic,
        }
    }

    fn dead_letter() -> ErrorPolicy {
        ErrorPolicy::DeadLetter {
            subject: "dlq".into(),
        }
    }

    fn start(skip_before: u64) -> SessionStart {
        SessionStart {
            skip_before: lsn(skip_before),
            saved: lsn(skip_before),
            tables: ["public.outbox".to_owned()].into(),
            qualify_ids: false,
            messages: Vec::new(),
            max_payload: 1 << 20,
        }
    }

    /// What a first session starts with: the slot at 0/10.
    fn fresh() -> Carryover {
        Carryover::new(lsn(0x10), ReplayHold::new(Duration::ZERO, lsn(0x10)))
    }

    /// One transaction as the WAL sends it: Begin, the Relation, one Insert per event type,
    /// Commit. Ids are `<commit>-<n>`.
    fn transaction(commit: u64, event_types: &[&str]) -> Vec<WalEvent> {
        let mut events = vec![
            WalEvent::Begin {
                commit_lsn: lsn(commit),
                commit_time_micros: 0,
            },
            WalEvent::Data(Bytes::from(encode::relation(
                1,
                "public",
                "outbox",
                &[
                    ("id", TEXT),
                    ("aggregate_type", TEXT),
                    ("event_type", TEXT),
                    ("payload", TEXT),
                ],
            ))),
        ];
        for (n, event_type) in event_types.iter().enumerate() {
            let id = format!("{commit}-{n}");
            events.push(WalEvent::Data(Bytes::from(encode::insert(
                1,
                &[
                    Some(id.as_bytes()),
                    Some(b"order"),
                    Some(event_type.as_bytes()),
                    Some(b"{}"),
                ],
            ))));
        }
        events.push(WalEvent::Commit {
            end_lsn: lsn(commit + 1),
        });
        events
    }

    /// Plays the driver: performs each output, answering publishes as scripted (else
    /// pipelined), and keeps the publishes in flight, in order, for [`Sink::ack`].
    #[derive(Default)]
    struct Sink {
        /// What was asked, one line each: `publish <id> fenced`, `batch <ids…>`, `report <lsn>`,
        /// `save <lsn>`.
        log: Vec<String>,
        in_flight: VecDeque<Published<InFlight>>,
        /// The messages published, in order.
        sent: Vec<Event>,
        answers: VecDeque<Result<Sent, SinkError>>,
        batch_answers: VecDeque<BatchAnswer>,
    }

    enum BatchAnswer {
        NotBatchable(NotBatchable),
    }

    impl Sink {
        fn drive(&mut self, core: &mut SessionCore<'_>) -> Result<Option<SessionEnd>, Error> {
            while let Some(output) = core.poll_output() {
                match output {
                    Output::End(end) => return Ok(Some(end)),
                    Output::Report(at) => self.log.push(format!("report {at}")),
                    Output::SaveCheckpoint(at) => {
                        self.log.push(format!("save {at}"));
                        core.on_saved(Some(at));
                    }
                    Output::Publish { event, fenced } => {
                        let unfenced = if fenced { "" } else { " unfenced" };
                        self.log
                            .push(format!("publish {}{unfenced}", event.message.id.as_str()));
                        let answer = self.answers.pop_front().unwrap_or(Ok(Sent::Pipelined));
                        if let Ok(Sent::Pipelined | Sent::AwaitAck) = answer {
                            self.in_flight.push_back(Published {
                                event: event.event.clone(),
                                tag: event.tag,
                                role: Role::Single,
                            });
                            self.sent.push(event);
                        }
                        core.on_sent(SendResult::One(answer))?;
                    }
                    Output::PublishBatch { events, .. } => {
                        if let Some(BatchAnswer::NotBatchable(reason)) =
                            self.batch_answers.pop_front()
                        {
                            let outcome = BatchOutcome::NotBatchable(reason, events);
                            core.on_sent(SendResult::Batch(Ok(outcome)))?;
                            continue;
                        }
                        let ids: Vec<&str> = events.iter().map(|e| e.message.id.as_str()).collect();
                        self.log.push(format!("batch {}", ids.join(" ")));
                        let last = events.len() - 1;
                        let sent = events.len();
                        for (i, event) in events.into_iter().enumerate() {
                            self.in_flight.push_back(Published {
                                event: event.event,
                                tag: event.tag,
                                role: if i == last {
                                    Role::CommitsBatch
                                } else {
                                    Role::InBatch
                                },
                            });
                        }
                        core.on_sent(SendResult::Batch(Ok(BatchOutcome::Sent(BatchSent {
                            sent,
                            already_stored: 0,
                            batched: true,
                        }))))?;
                    }
                }
            }
            Ok(None)
        }

        /// Feeds the WAL events, driving after each as the driver does.
        fn feed(
            &mut self,
            core: &mut SessionCore<'_>,
            events: Vec<WalEvent>,
        ) -> Result<Option<SessionEnd>, Error> {
            for event in events {
                assert!(core.wants_wal(), "a WAL event read while publishes wait");
                core.on_wal(event)?;
                if let Some(end) = self.drive(core)? {
                    return Ok(Some(end));
                }
            }
            Ok(None)
        }

        /// The oldest publish in flight is answered with `outcome` (a refusal is made from
        /// `refuse` and the publish's row).
        fn ack_with(
            &mut self,
            core: &mut SessionCore<'_>,
            outcome: impl FnOnce(EventRef) -> Result<Ack, SinkError>,
        ) -> Result<Option<SessionEnd>, Error> {
            let published = self.in_flight.pop_front().expect("a publish in flight");
            let outcome = outcome(published.event.clone());
            core.on_ack(published, outcome)?;
            self.drive(core)
        }

        fn ack(&mut self, core: &mut SessionCore<'_>) -> Result<Option<SessionEnd>, Error> {
            self.ack_with(core, |_| Ok(Ack { duplicate: false }))
        }

        fn ack_all(&mut self, core: &mut SessionCore<'_>) -> Result<Option<SessionEnd>, Error> {
            while !self.in_flight.is_empty() {
                if let Some(end) = self.ack(core)? {
                    return Ok(Some(end));
                }
            }
            Ok(None)
        }

        fn tick(&mut self, core: &mut SessionCore<'_>) -> Result<Option<SessionEnd>, Error> {
            core.on_tick(Instant::now());
            self.drive(core)
        }

        fn take_log(&mut self) -> Vec<String> {
            std::mem::take(&mut self.log)
        }

        /// What was sent since the last take: the log without the position reports.
        fn take_sent(&mut self) -> Vec<String> {
            let mut log = self.take_log();
            log.retain(|l| !l.starts_with("report"));
            log
        }
    }

    fn rejected(event: EventRef) -> Result<Ack, SinkError> {
        Err(SinkError::Rejected {
            event,
            detail: "header size exceeds maximum allowed of 64kb".into(),
        })
    }

    fn metric(stats: &Stats, name: &str) -> f64 {
        let text = stats.encode();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn publishes_in_order_and_tells_postgres_only_what_is_acked_and_saved() {
        let (settings, stats) = (settings(ErrorPolicy::Fail, None), Stats::default());
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        let mut sink = Sink::default();
        sink.drive(&mut core).unwrap();
        assert_eq!(sink.take_log(), ["report 0/10"], "the start position, once");
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        sink.feed(&mut core, transaction(0x200, &["c"])).unwrap();
        assert_eq!(
            sink.take_log(),
            ["publish 256-0", "publish 256-1", "publish 512-0"]
        );
        assert_eq!(core.in_flight(), 3);
        sink.ack(&mut core).unwrap();
        assert_eq!(
            core.positions().acked(),
            lsn(0x10),
            "half a transaction is not acked"
        );
        sink.ack(&mut core).unwrap();
        assert_eq!(core.positions().acked(), lsn(0x101));
        assert!(
            sink.take_log().is_empty(),
            "not told before the checkpoint holds it"
        );
        sink.tick(&mut core).unwrap();
        assert_eq!(sink.take_log(), ["save 0/101", "report 0/101"]);
        sink.ack(&mut core).unwrap();
        sink.tick(&mut core).unwrap();
        assert_eq!(sink.take_log(), ["save 0/201", "report 0/201"]);
        let carry = core.into_carryover();
        assert_eq!(carry.acked, lsn(0x201));
        assert_eq!(metric(&stats, "outbox_cdc_transactions_total"), 2.0);
    }

    #[test]
    fn keepalives_move_the_position_only_with_nothing_in_flight() {
        let (settings, stats) = (settings(ErrorPolicy::Fail, None), Stats::default());
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        let mut sink = Sink::default();
        sink.feed(&mut core, transaction(0x100, &["a"])).unwrap();
        core.on_wal(WalEvent::Keepalive {
            wal_end: lsn(0x900),
        })
        .unwrap();
        assert_eq!(
            core.positions().acked(),
            lsn(0x10),
            "a publish is in flight"
        );
        sink.ack_all(&mut core).unwrap();
        core.on_wal(WalEvent::Keepalive {
            wal_end: lsn(0x900),
        })
        .unwrap();
        assert_eq!(core.positions().acked(), lsn(0x900));
    }

    #[test]
    fn what_committed_before_the_resume_point_is_read_but_not_published_nor_counted_twice() {
        let (settings, stats) = (settings(ErrorPolicy::Fail, None), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x150), fresh());
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        sink.feed(&mut core, transaction(0x200, &["c"])).unwrap();
        let log = sink.take_sent();
        assert_eq!(log, ["publish 512-0"]);
        assert_eq!(
            metric(
                &stats,
                "outbox_cdc_rows_skipped_total{reason=\"before_start_lsn\"}"
            ),
            2.0
        );
        // A later session reads the same transaction again: it is counted once.
        let carry = core.into_carryover();
        let mut core = SessionCore::new(&settings, &stats, start(0x150), carry);
        sink.feed(&mut core, transaction(0x200, &["c"])).unwrap();
        assert_eq!(metric(&stats, "outbox_cdc_transactions_total"), 2.0);
    }

    #[test]
    fn a_row_refused_at_its_ack_is_dead_lettered_in_its_place_by_the_next_session() {
        let (settings, stats) = (settings(dead_letter(), None), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        sink.feed(&mut core, transaction(0x100, &["a", "b", "c"]))
            .unwrap();
        sink.ack(&mut core).unwrap();
        let end = sink.ack_with(&mut core, rejected).unwrap();
        assert_eq!(end, Some(SessionEnd::Restart));
        assert_eq!(
            core.positions().acked(),
            lsn(0x10),
            "the transaction is not confirmed"
        );
        let carry = core.into_carryover();

        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), carry);
        sink.feed(&mut core, transaction(0x100, &["a", "b", "c"]))
            .unwrap();
        let published: Vec<String> = sink
            .take_log()
            .into_iter()
            .filter(|l| l.starts_with("publish"))
            .collect();
        assert_eq!(
            published,
            [
                "publish 256-0",
                "publish dead-letter:256-1",
                "publish 256-2"
            ],
            "the dead letter in its row's place"
        );
        sink.ack_all(&mut core).unwrap();
        assert_eq!(core.positions().acked(), lsn(0x101));
        assert_eq!(
            metric(
                &stats,
                "outbox_cdc_poison_rows_total{kind=\"rejected\",action=\"dead_letter\"}"
            ),
            1.0
        );
    }

    #[test]
    fn with_on_error_fail_a_refused_row_stops_the_process_naming_it() {
        let (settings, stats) = (settings(ErrorPolicy::Fail, None), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        sink.ack(&mut core).unwrap();
        let err = sink.ack_with(&mut core, rejected).unwrap_err();
        assert_eq!(err.disposition(), Disposition::Poison(PoisonKind::Rejected));
        assert!(err.to_string().contains("event id `256-1`"), "{err}");
        // A dead letter refused has nothing left to fall back to either.
        let settings = self::settings(dead_letter(), None);
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        let mut sink = Sink::default();
        sink.answers.push_back(Err(SinkError::TooLarge {
            event: EventRef {
                event_id: "256-0".into(),
                table: "public.outbox".into(),
                subject: Some("outbox.order.a".into()),
                commit_lsn: lsn(0x100),
                row_index: 0,
            },
            size: 2 << 20,
            max: 1 << 20,
        }));
        sink.feed(&mut core, transaction(0x100, &["a"])).unwrap();
        assert!(sink.ack_with(&mut core, rejected).is_err());
    }

    #[test]
    fn a_message_too_large_to_send_is_dead_lettered_in_its_place_fenced_as_it_would_have_been() {
        let (settings, stats) = (settings(dead_letter(), None), Stats::default());
        let mut carry = fresh();
        carry.unfence = Some((lsn(0x100), "256-0".into()));
        let mut core = SessionCore::new(&settings, &stats, start(0x10), carry);
        let mut sink = Sink::default();
        sink.answers.push_back(Err(SinkError::TooLarge {
            event: EventRef {
                event_id: "256-0".into(),
                table: "public.outbox".into(),
                subject: Some("outbox.order.a".into()),
                commit_lsn: lsn(0x100),
                row_index: 0,
            },
            size: 2 << 20,
            max: 1 << 20,
        }));
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        let published: Vec<String> = sink
            .take_log()
            .into_iter()
            .filter(|l| l.starts_with("publish"))
            .collect();
        assert_eq!(
            published,
            [
                "publish 256-0 unfenced",
                "publish dead-letter:256-0 unfenced",
                "publish 256-1"
            ]
        );
        let settings = self::settings(ErrorPolicy::Fail, None);
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        let mut sink = Sink::default();
        sink.answers.push_back(Err(SinkError::TooLarge {
            event: EventRef {
                event_id: "256-0".into(),
                table: "public.outbox".into(),
                subject: Some("outbox.order.a".into()),
                commit_lsn: lsn(0x100),
                row_index: 0,
            },
            size: 2 << 20,
            max: 1 << 20,
        }));
        let err = sink
            .feed(&mut core, transaction(0x100, &["a"]))
            .unwrap_err();
        assert_eq!(err.disposition(), Disposition::Poison(PoisonKind::TooLarge));
    }

    #[test]
    fn a_fenced_refusal_restarts_and_the_next_session_sends_that_event_unfenced() {
        let (settings, stats) = (settings(ErrorPolicy::Fail, None), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        sink.ack(&mut core).unwrap();
        let err = sink
            .ack_with(&mut core, |event| {
                Err(SinkError::Fenced {
                    event,
                    detail: "wrong last msg ID".into(),
                })
            })
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        let carry = core.into_carryover();
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), carry);
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        sink.feed(&mut core, transaction(0x200, &["c"])).unwrap();
        let published: Vec<String> = sink
            .take_log()
            .into_iter()
            .filter(|l| l.starts_with("publish"))
            .collect();
        assert_eq!(
            published,
            ["publish 256-0", "publish 256-1 unfenced", "publish 512-0"],
            "only the refused event, once"
        );
    }

    #[test]
    fn a_publish_no_stream_is_known_for_waits_for_its_ack_before_the_next() {
        let (settings, stats) = (settings(ErrorPolicy::Fail, None), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        sink.answers.push_back(Ok(Sent::AwaitAck));
        for event in transaction(0x100, &["a", "b"]).into_iter().take(3) {
            core.on_wal(event).unwrap();
            sink.drive(&mut core).unwrap();
        }
        assert!(!core.wants_wal(), "nothing is read before its ack");
        sink.ack(&mut core).unwrap();
        assert!(core.wants_wal());
    }

    #[test]
    fn a_lost_batch_confirms_nothing_of_its_transaction_and_the_next_session_sends_it_again() {
        let (settings, stats) = (settings(ErrorPolicy::Fail, Some(1000)), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        sink.feed(&mut core, transaction(0x200, &["c", "d", "e"]))
            .unwrap();
        let batches: Vec<String> = sink
            .take_log()
            .into_iter()
            .filter(|l| l.starts_with("batch"))
            .collect();
        assert_eq!(batches, ["batch 256-0 256-1", "batch 512-0 512-1 512-2"]);
        sink.ack(&mut core).unwrap();
        sink.ack(&mut core).unwrap();
        assert_eq!(core.positions().acked(), lsn(0x101));
        let err = sink
            .ack_with(&mut core, |event| {
                Err(SinkError::Publish {
                    event,
                    detail: AckError::TimedOut(Duration::from_secs(10)).to_string(),
                })
            })
            .unwrap_err();
        assert!(err.is_transient());
        let carry = core.into_carryover();
        assert_eq!(
            carry.acked,
            lsn(0x101),
            "the lost batch's transaction is not acked"
        );
        assert_eq!(metric(&stats, "outbox_cdc_atomic_batches_total"), 1.0);
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x101), carry);
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        sink.feed(&mut core, transaction(0x200, &["c", "d", "e"]))
            .unwrap();
        let batches: Vec<String> = sink
            .take_log()
            .into_iter()
            .filter(|l| l.starts_with("batch"))
            .collect();
        assert_eq!(batches, ["batch 512-0 512-1 512-2"], "whole, once");
    }

    #[test]
    fn a_batch_refused_as_a_duplicate_is_looked_for_again_never_sent_event_by_event() {
        let (settings, stats) = (settings(dead_letter(), Some(1000)), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        let duplicate = |event| {
            Err(SinkError::AtomicDuplicate {
                event,
                detail: "atomic publish batch contains duplicate message id".into(),
            })
        };
        let end = sink.ack_with(&mut core, duplicate).unwrap();
        assert_eq!(end, Some(SessionEnd::Restart));
        let carry = core.into_carryover();
        // The next session finds the stream holding it (the sink would leave it out), or sends it
        // whole again; never one by one.
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), carry);
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        let sent = sink.take_sent();
        assert_eq!(sent, ["batch 256-0 256-1"]);
        assert_eq!(
            metric(
                &stats,
                "outbox_cdc_atomic_fallbacks_total{reason=\"refused\"}"
            ),
            0.0
        );
        // Refused so again, although the stream was read again: an id was used before.
        let err = sink.ack_with(&mut core, duplicate).unwrap_err();
        assert!(matches!(err, Error::IdUsedTwice { .. }), "{err}");
        assert_eq!(err.disposition(), Disposition::Fatal);
        assert!(err.to_string().contains("--id-column"), "{err}");
    }

    #[test]
    fn a_batch_refused_for_one_of_its_rows_goes_event_by_event_only_to_dead_letter_that_row() {
        let stats = Stats::default();
        // --on-error fail: the process stops with nothing of the transaction stored.
        let settings_fail = settings(ErrorPolicy::Fail, Some(1000));
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings_fail, &stats, start(0x10), fresh());
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        let err = sink.ack_with(&mut core, rejected).unwrap_err();
        assert!(!err.is_transient());
        let text = err.to_string();
        assert!(
            text.contains("Nothing of the transaction was stored"),
            "{text}"
        );
        assert!(text.contains("64kb"), "{text}");

        // --on-error dead-letter: event by event, the refused row's dead letter in its place.
        let settings = settings(dead_letter(), Some(1000));
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        assert_eq!(
            sink.ack_with(&mut core, rejected).unwrap(),
            Some(SessionEnd::Restart)
        );
        let carry = core.into_carryover();
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), carry);
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        let sent = sink.take_sent();
        assert_eq!(sent, ["publish 256-0", "publish 256-1"]);
        assert_eq!(
            sink.ack_with(&mut core, rejected).unwrap(),
            Some(SessionEnd::Restart)
        );
        let carry = core.into_carryover();
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), carry);
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        let sent = sink.take_sent();
        assert_eq!(sent, ["publish dead-letter:256-0", "publish 256-1"]);
        sink.ack_all(&mut core).unwrap();
        assert_eq!(core.positions().acked(), lsn(0x101));
        assert_eq!(
            metric(
                &stats,
                "outbox_cdc_atomic_fallbacks_total{reason=\"refused\"}"
            ),
            1.0
        );
    }

    #[test]
    fn transactions_that_cannot_be_one_batch_go_out_event_by_event_in_order() {
        let (settings, stats) = (settings(dead_letter(), Some(2)), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        // Over --atomic-max-batch: what was held goes first, then the rest as it comes.
        sink.feed(&mut core, transaction(0x100, &["a", "b", "c", "d"]))
            .unwrap();
        // A poison row (whitespace in the subject) among them.
        sink.feed(&mut core, transaction(0x200, &["e", "bad type", "f"]))
            .unwrap();
        // The sink cannot batch them (two streams, say).
        sink.batch_answers
            .push_back(BatchAnswer::NotBatchable(NotBatchable::SeveralStreams));
        sink.feed(&mut core, transaction(0x300, &["g", "h"]))
            .unwrap();
        sink.feed(&mut core, transaction(0x400, &["i", "j"]))
            .unwrap();
        let sent = sink.take_sent();
        assert_eq!(
            sent,
            [
                "publish 256-0",
                "publish 256-1",
                "publish 256-2",
                "publish 256-3",
                "publish 512-0",
                "publish dead-letter:512-1",
                "publish 512-2",
                "publish 768-0",
                "publish 768-1",
                "batch 1024-0 1024-1",
            ]
        );
        for reason in ["too_many_events", "dead_letter", "several_streams"] {
            let name = format!("outbox_cdc_atomic_fallbacks_total{{reason=\"{reason}\"}}");
            assert_eq!(metric(&stats, &name), 1.0, "{reason}");
        }
    }

    #[test]
    fn an_id_twice_in_one_transaction_is_sent_once_in_its_batch() {
        let (settings, stats) = (settings(ErrorPolicy::Fail, Some(1000)), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        let mut events = transaction(0x100, &["a", "b"]);
        let repeated = events[2].clone();
        events.insert(4, repeated);
        sink.feed(&mut core, events).unwrap();
        let sent = sink.take_sent();
        assert_eq!(sent, ["batch 256-0 256-1"]);
        assert_eq!(metric(&stats, "outbox_cdc_events_duplicate_total"), 1.0);
        sink.ack_all(&mut core).unwrap();
        assert_eq!(core.positions().acked(), lsn(0x101));
    }

    #[test]
    fn shutdown_drains_what_is_in_flight_and_sends_nothing_more() {
        let (settings, stats) = (settings(ErrorPolicy::Fail, None), Stats::default());
        let mut sink = Sink::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        sink.feed(&mut core, transaction(0x100, &["a", "b"]))
            .unwrap();
        core.on_shutdown();
        assert!(!core.wants_wal());
        assert_eq!(sink.drive(&mut core).unwrap(), None, "two acks awaited");
        sink.ack(&mut core).unwrap();
        assert_eq!(
            sink.ack(&mut core).unwrap(),
            Some(SessionEnd::Shutdown { drained: true })
        );
        assert_eq!(core.positions().acked(), lsn(0x101));

        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        let mut sink = Sink::default();
        sink.feed(&mut core, transaction(0x100, &["a"])).unwrap();
        core.on_shutdown();
        core.on_deadline();
        assert_eq!(
            sink.drive(&mut core).unwrap(),
            Some(SessionEnd::Shutdown { drained: false })
        );
        assert_eq!(core.positions().acked(), lsn(0x10));
    }

    fn annotation(content: &str) -> WalEvent {
        WalEvent::Message {
            transactional: true,
            prefix: "ctx".into(),
            content: Bytes::from(content.to_owned()),
        }
    }

    #[test]
    fn an_annotation_becomes_headers_of_the_events_of_its_transaction_that_follow_it() {
        let mut settings = settings(dead_letter(), None);
        settings.annotation_prefix = Some("ctx".into());
        let stats = Stats::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        let mut sink = Sink::default();
        let mut events = transaction(0x100, &["a", "b", "c"]);
        // After the first row: the first goes out without it (and a warning says so).
        events.insert(
            3,
            annotation(r#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "user": "ann"}"#),
        );
        sink.feed(&mut core, events).unwrap();
        sink.feed(&mut core, transaction(0x200, &["d"])).unwrap();
        let headers: Vec<(String, Option<String>, Option<String>)> = std::mem::take(&mut sink.sent)
            .into_iter()
            .map(|e| {
                let get = |n: &str| e.message.headers.get(n).map(|v| v.as_str().to_owned());
                (
                    e.message.id.as_str().to_owned(),
                    get("traceparent"),
                    get("user"),
                )
            })
            .collect();
        let trace = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
        assert_eq!(
            headers,
            [
                ("256-0".into(), None, None),
                ("256-1".into(), trace.clone(), Some("ann".into())),
                ("256-2".into(), trace, Some("ann".into())),
                ("512-0".into(), None, None),
            ],
            "the events after it, in its transaction only"
        );
    }

    #[test]
    fn an_annotation_that_cannot_be_read_is_a_poison_row_of_its_own() {
        let mut settings = settings(ErrorPolicy::Fail, None);
        settings.annotation_prefix = Some("ctx".into());
        let stats = Stats::default();
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        let mut events = transaction(0x100, &["a"]);
        events.insert(2, annotation(r#"{"Nats-Rollup": "all"}"#));
        let err = Sink::default().feed(&mut core, events).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("annotation with prefix `ctx`") && text.contains("reserved"),
            "{text}"
        );

        let mut settings = self::settings(dead_letter(), None);
        settings.annotation_prefix = Some("ctx".into());
        let mut core = SessionCore::new(&settings, &stats, start(0x10), fresh());
        let mut sink = Sink::default();
        let mut events = transaction(0x100, &["a"]);
        events.insert(2, annotation("[1, 2]"));
        sink.feed(&mut core, events).unwrap();
        let published: Vec<String> = sink
            .take_log()
            .into_iter()
            .filter(|l| l.starts_with("publish"))
            .collect();
        assert_eq!(published, ["publish dead-letter:0/100:0", "publish 256-0"]);
    }
}
