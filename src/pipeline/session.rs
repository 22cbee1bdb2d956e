//! One replication session: WAL events in, publishes out, the confirmed position back.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::PipelineSettings;
use super::atomic::{self, Fallback, Held, OpenBatch};
use super::error::{Disposition, Error};
use super::mapping::{TableMapping, TransactionContext};
use super::messages::MessageMapping;
use super::poison::{ErrorPolicy, PoisonKind, PoisonRow, RefusedRows};
use super::progress::Progress;
use super::replay::ReplayHold;
use super::watermark::Watermark;
use crate::event::{EventRef, OutboxEvent};
use crate::lsn::Lsn;
use crate::sink::{
    AckError, AckOutcome, BatchEvent, ConnectionLost, JetStreamSink, MAX_BATCHES_IN_FLIGHT,
    Published, Sent, SinkError,
};
use crate::source::pgoutput::{self, Insert, Message, SkippedKind};
use crate::source::{ReplicationStream, SourceError, WalEvent};
use crate::stats::{SkipReason, SkippedChanges, Stats};

/// What travels with each publish and comes back with its ack.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    commit_time: SystemTime,
    /// Set on a dead letter, with why its row became one: a dead letter that cannot be published
    /// has nothing left to fall back to.
    dead_letter: Option<PoisonKind>,
    /// Sent in an atomic batch: refused, its whole transaction goes out event by event next.
    batched: bool,
    /// The last event of an atomic batch: its ack counts the batch.
    ends_batch: bool,
}

/// The sink as a session uses it.
pub type Sink = JetStreamSink<InFlight>;

/// A message about to be published, with the row it carries.
struct Outgoing {
    message: OutboxEvent,
    event: EventRef,
    in_flight: InFlight,
}

/// What outlives a session: the replay window's history, the rows JetStream refused at their
/// ack (dead-lettered in their place by the next session, see [`super::poison`]), and the event
/// to send unfenced.
#[derive(Debug)]
pub struct Carryover {
    pub hold: ReplayHold,
    pub refused: RefusedRows,
    /// (commit LSN, event id) of a publish JetStream refused because the stream's last message
    /// was not its predecessor, while every publish before it was acked: they are all stored,
    /// so the next session sends it without naming a predecessor. Else the first new publish of
    /// every session would be fenced on a re-sent duplicate and be refused again, forever,
    /// behind a message another publisher stored.
    pub unfence: Option<(Lsn, String)>,
    /// Commit LSNs of transactions JetStream refused as an atomic batch: the next session
    /// publishes them event by event (see [`super::atomic`]).
    refused_batches: HashSet<Lsn>,
    /// Commit LSN of the newest transaction counted in the metrics: one read again by a later
    /// session is not counted again.
    counted_through: Lsn,
}

impl Carryover {
    pub fn new(hold: ReplayHold) -> Self {
        Carryover {
            hold,
            refused: RefusedRows::default(),
            unfence: None,
            refused_batches: HashSet::new(),
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
}

/// Why a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Shutdown was requested and in-flight acks were drained (or timed out).
    Shutdown { drained: bool },
    /// JetStream refused a row at its ack; the next session, started at once, publishes its
    /// dead letter in its place (see [`super::poison`]).
    Restart,
}

/// What the loop does after an event or an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    Restart,
}

/// Where a session starts.
#[derive(Debug, Clone)]
pub struct SessionStart {
    /// The newest position known durable downstream: in this process, per the checkpoint, or the
    /// slot's own.
    pub progress: Lsn,
    /// Transactions that committed before this LSN are read but not published (`--start-lsn`,
    /// or what the checkpoint says was already published).
    pub skip_before: Lsn,
    /// The publication's tables (`schema.table`) when the session started.
    pub tables: HashSet<String>,
    /// The publication has more than one table: event ids are qualified by it.
    pub qualify_ids: bool,
    /// `--message-prefix`es, bound.
    pub messages: Vec<MessageMapping>,
}

/// One replication session: runs until shutdown or the first error.
pub struct Session<'a> {
    settings: &'a PipelineSettings,
    stream: ReplicationStream,
    sink: &'a mut Sink,
    connection_lost: ConnectionLost,
    stats: &'a Stats,
    watermark: Watermark,
    carry: &'a mut Carryover,
    progress: Progress,
    skip_before: Lsn,
    tables_at_start: HashSet<String>,
    qualify_ids: bool,
    messages: Vec<MessageMapping>,
    /// A non-transactional message with one of our prefixes was warned about.
    warned_non_transactional: bool,
    /// The open transaction committed before `skip_before`.
    skipping: bool,
    tables: HashMap<u32, TableMapping>,
    transaction: Option<TransactionContext>,
    /// What the open transaction skipped, counted at its Commit.
    skipped: SkippedChanges,
    row_index: u32,
    /// The newest acked commit LSN last logged, and when: logged periodically so an operator
    /// can save it for `--start-lsn`.
    logged_commit: Option<(Instant, Lsn)>,
    /// With `--atomic-transactions`, the open transaction's events held for its batch.
    batch: Option<OpenBatch<Outgoing>>,
}

/// How often the newest acked commit LSN is logged while it moves.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(30);

impl<'a> Session<'a> {
    pub fn new(
        settings: &'a PipelineSettings,
        stream: ReplicationStream,
        sink: &'a mut Sink,
        stats: &'a Stats,
        start: SessionStart,
        carry: &'a mut Carryover,
        progress: Progress,
    ) -> Self {
        Session {
            settings,
            stream,
            connection_lost: sink.connection_lost(),
            sink,
            stats,
            watermark: Watermark::new(start.progress),
            carry,
            progress,
            skip_before: start.skip_before,
            tables_at_start: start.tables,
            qualify_ids: start.qualify_ids,
            messages: start.messages,
            warned_non_transactional: false,
            skipping: false,
            tables: HashMap::new(),
            transaction: None,
            skipped: SkippedChanges::default(),
            row_index: 0,
            logged_commit: None,
            batch: settings.atomic_max_batch.map(OpenBatch::new),
        }
    }

    /// Streams until `shutdown` turns true or something fails. The confirmed LSN reached is
    /// returned with the outcome, so the next session can start from it.
    pub async fn run(
        mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (Lsn, Result<SessionEnd, Error>) {
        let streamed = self.stream_events(shutdown).await;
        // Every wait from here on ends by one deadline: --shutdown-timeout after shutdown was
        // asked for (a restart to publish a dead letter gets the same bound).
        let deadline = Instant::now() + self.settings.shutdown_timeout;
        let result = match streamed {
            Ok(Next::Continue) => Ok(self.drain(deadline).await),
            Ok(Next::Restart) => Ok(SessionEnd::Restart),
            Err(err) => Err(err),
        };
        let progress = self.watermark.confirmed();
        if result.is_ok() {
            match tokio::time::timeout_at(deadline, self.save_progress()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "could not save the checkpoint at the session's end")
                }
                Err(_) => tracing::warn!(
                    "the checkpoint was not saved before the shutdown timeout (the next start reads again from the slot)"
                ),
            }
            // Ended cleanly, the walsender releases the slot at once: the next session (or
            // instance) need not wait for PostgreSQL to notice a dropped connection.
            let confirmed = self.reportable();
            self.stream.finish(confirmed, deadline).await;
        }
        (progress, result)
    }

    /// Streams until shutdown is requested (`Continue`: drain next) or a row must be
    /// dead-lettered in its place (`Restart`).
    async fn stream_events(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Next, Error> {
        let window = self.settings.max_in_flight.max(1);
        // Proves to /healthz that this loop still turns, busy or idle; saves the checkpoint as
        // often as the position is reported, since nothing past it is.
        let mut heartbeat = tokio::time::interval(
            self.settings
                .status_interval
                .clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            if *shutdown.borrow() {
                return Ok(Next::Continue);
            }
            let next = tokio::select! {
                biased;
                _ = shutdown.changed() => Next::Continue,
                _ = self.connection_lost.wait() => return Err(SinkError::Disconnected.into()),
                (published, outcome) = self.sink.next_ack(), if self.sink.in_flight() > 0 => {
                    self.on_ack(published, outcome).await?
                }
                _ = heartbeat.tick() => {
                    self.on_tick().await?;
                    Next::Continue
                }
                event = self.stream.next(), if self.sink.in_flight() < window
                    && self.sink.batches_in_flight() < MAX_BATCHES_IN_FLIGHT => {
                    self.on_event(event?).await?
                }
            };
            if next == Next::Restart {
                return Ok(Next::Restart);
            }
        }
    }

    /// Waits for in-flight acks until `deadline`.
    async fn drain(&mut self, deadline: Instant) -> SessionEnd {
        // A connection that is down (or reconnecting) takes nothing: the flush is bounded too.
        let _ = tokio::time::timeout_at(deadline, self.sink.flush()).await;
        while self.sink.in_flight() > 0
            && let Ok((published, outcome)) =
                tokio::time::timeout_at(deadline, self.sink.next_ack()).await
        {
            match self.on_ack(published, outcome).await {
                Ok(Next::Continue) => {}
                Ok(Next::Restart) => return SessionEnd::Shutdown { drained: false },
                Err(err) => {
                    tracing::warn!(error = %err, "a publish failed during shutdown; it will be re-sent on the next start");
                    return SessionEnd::Shutdown { drained: false };
                }
            }
        }
        SessionEnd::Shutdown {
            drained: self.sink.in_flight() == 0,
        }
    }

    async fn on_event(&mut self, event: WalEvent) -> Result<Next, Error> {
        match event {
            WalEvent::Begin {
                commit_lsn,
                commit_time_micros,
            } => {
                self.watermark.begin();
                self.skipping = commit_lsn < self.skip_before;
                self.transaction = Some(TransactionContext::new(commit_lsn, commit_time_micros));
                self.skipped = SkippedChanges::default();
                self.row_index = 0;
                if let Some(batch) = &mut self.batch {
                    let refused = self.carry.refused_batches.contains(&commit_lsn);
                    batch.begin(refused.then_some(Fallback::Refused));
                }
            }
            WalEvent::Data(frame) => return self.on_message(frame).await,
            WalEvent::Commit { end_lsn } => {
                if self.publish_batch().await? == Next::Restart {
                    return Ok(Next::Restart);
                }
                self.on_commit(end_lsn);
            }
            WalEvent::Message {
                transactional,
                prefix,
                content,
            } => {
                return self
                    .on_logical_message(transactional, &prefix, content)
                    .await;
            }
            WalEvent::Keepalive { wal_end } => {
                self.stats.server_wal_end.set(wal_end.as_u64());
                if self.watermark.keepalive(wal_end) {
                    self.confirm();
                }
            }
        }
        Ok(Next::Continue)
    }

    fn on_commit(&mut self, end_lsn: Lsn) {
        let transaction = self.transaction.take();
        let commit_lsn = transaction.as_ref().map_or(end_lsn, |t| t.commit_lsn);
        if commit_lsn > self.carry.counted_through {
            self.carry.counted_through = commit_lsn;
            self.stats.transaction_read(&self.skipped);
        }
        if self.watermark.commit(commit_lsn, end_lsn) {
            // Every row was acked before the Commit arrived (or there was none).
            if let Some(transaction) = transaction {
                self.stats.transaction_acked(transaction.commit_time);
            }
            self.confirm();
        }
    }

    async fn on_message(&mut self, frame: Bytes) -> Result<Next, Error> {
        let message = pgoutput::decode(&frame).map_err(|e| SourceError::Replication {
            detail: e.to_string(),
            transient: false,
        })?;
        match message {
            Message::Relation(relation) => {
                // (A partition's Relation arrives too when its root publishes it.)
                let mapping =
                    TableMapping::bind(&self.settings.mapping, &relation, self.qualify_ids)?;
                tracing::debug!(table = %mapping.table(), relation_id = relation.id, "bound table mapping");
                self.tables.insert(relation.id, mapping);
            }
            Message::Insert(insert) => return self.on_insert(insert, &frame).await,
            Message::Skipped(kind) => self.on_skipped(kind),
        }
        Ok(Next::Continue)
    }

    /// An outbox row: mapped (or its dead letter made), then published.
    async fn on_insert(&mut self, insert: Insert<'_>, frame: &Bytes) -> Result<Next, Error> {
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
            // Its ids may need qualifying, and its columns checking: a new session reads the
            // publication's tables again.
            return Err(SourceError::PublicationChanged {
                table: mapping.table().to_string(),
            }
            .into());
        }
        if self.skipping {
            self.skipped.add(SkipReason::BeforeStartLsn);
            return Ok(Next::Continue);
        }
        let row_index = self.row_index;
        self.row_index += 1;
        let outgoing = self.outgoing(mapping, &insert, frame, txn, row_index)?;
        self.publish(outgoing).await
    }

    /// A row mapped (or its dead letter made) for publishing.
    fn outgoing(
        &self,
        mapping: &TableMapping,
        insert: &Insert<'_>,
        frame: &Bytes,
        txn: &TransactionContext,
        row_index: u32,
    ) -> Result<Outgoing, Error> {
        match mapping.map(&insert.tuple, frame, txn, row_index) {
            Ok(message) => {
                let event = mapping.event_ref(&message, txn.commit_lsn, row_index);
                Ok(self.as_event_or_refused(message, event, txn.commit_time))
            }
            Err(unmappable) => {
                let row = PoisonRow::new(
                    PoisonKind::Unmappable,
                    unmappable.reason.clone(),
                    unmappable.event.clone(),
                    mapping.raw_payload(&insert.tuple, frame),
                );
                self.poison(row, unmappable.into(), txn.commit_time)
            }
        }
    }

    /// A logical decoding message (see [`super::messages`]): with one of our prefixes and
    /// inside a transaction, an event in its place; else skipped and counted.
    async fn on_logical_message(
        &mut self,
        transactional: bool,
        prefix: &str,
        content: Bytes,
    ) -> Result<Next, Error> {
        let Some(index) = self.messages.iter().position(|m| m.prefix == prefix) else {
            self.on_skipped(SkippedKind::LogicalMessage);
            return Ok(Next::Continue);
        };
        if !transactional {
            self.stats.skipped(SkipReason::NonTransactionalMessage, 1);
            if !self.warned_non_transactional {
                self.warned_non_transactional = true;
                tracing::warn!(%prefix,
                    "skipped a non-transactional message with prefix `{prefix}`: it is sent even when its transaction aborts, so it is never published; emit it with pg_logical_emit_message(true, …)");
            }
            return Ok(Next::Continue);
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
            self.skipped.add(SkipReason::BeforeStartLsn);
            return Ok(Next::Continue);
        }
        let row_index = self.row_index;
        self.row_index += 1;
        let message = &self.messages[index];
        let outgoing = match message.encode(&content) {
            Ok(frame) => {
                let Ok(pgoutput::Message::Insert(insert)) = pgoutput::decode(&frame) else {
                    return Err(SourceError::Replication {
                        detail: format!(
                            "the message with prefix `{prefix}` at commit LSN {} did not encode as a row (a bug in outbox-cdc: please report it)",
                            txn.commit_lsn
                        ),
                        transient: false,
                    }
                    .into());
                };
                self.outgoing(&message.mapping, &insert, &frame, txn, row_index)?
            }
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
        self.publish(outgoing).await
    }

    /// The event itself, or — when JetStream refused it at its ack in an earlier session — its
    /// dead letter.
    fn as_event_or_refused(
        &self,
        message: OutboxEvent,
        event: EventRef,
        commit_time: SystemTime,
    ) -> Outgoing {
        if let ErrorPolicy::DeadLetter { subject } = &self.settings.on_error
            && let Some((kind, reason)) = self.carry.refused.get(event.commit_lsn, &event.event_id)
        {
            let row = PoisonRow::new(kind, reason.to_owned(), event, message.payload);
            return self.dead_letter(row, subject, commit_time);
        }
        Outgoing {
            message,
            event,
            in_flight: InFlight {
                commit_time,
                dead_letter: None,
                batched: false,
                ends_batch: false,
            },
        }
    }

    /// Sends `outgoing`, or with `--atomic-transactions` holds it for its transaction's batch.
    async fn publish(&mut self, outgoing: Outgoing) -> Result<Next, Error> {
        let Some(batch) = &mut self.batch else {
            return self.publish_one(outgoing).await;
        };
        let fallback = outgoing
            .in_flight
            .dead_letter
            .is_some()
            .then_some(Fallback::DeadLetter);
        match batch.hold(outgoing, fallback) {
            Held::Yes => Ok(Next::Continue),
            Held::No(outgoing) => self.publish_one(outgoing).await,
            Held::FallsBack(outgoing, reason) => {
                let held = batch.fall_back(reason);
                if self.publish_each(reason, held).await? == Next::Restart {
                    return Ok(Next::Restart);
                }
                self.publish_one(outgoing).await
            }
        }
    }

    /// The open transaction's held events at its commit: one atomic batch, or event by event
    /// when the sink cannot send them as one.
    async fn publish_batch(&mut self) -> Result<Next, Error> {
        let Some(batch) = &mut self.batch else {
            return Ok(Next::Continue);
        };
        let events = batch.take();
        if events.is_empty() {
            return Ok(Next::Continue);
        }
        if events.len() == 1 {
            let mut events = events;
            return match events.pop() {
                Some(only) => self.publish_one(only).await,
                None => Ok(Next::Continue),
            };
        }
        if let Err(reason) = self.sink.batchable(events.iter().map(|o| &o.message))? {
            let reason = Fallback::Sink(reason);
            let (_, first) = batch.fall_back(reason);
            return self.publish_each(reason, (events, first)).await;
        }
        let fenced = self.carry.fenced(&events[0].event);
        let last = events.len() - 1;
        let batch: Vec<BatchEvent<InFlight>> = events
            .into_iter()
            .enumerate()
            .map(|(i, o)| BatchEvent {
                message: o.message,
                event: o.event,
                tag: InFlight {
                    batched: true,
                    ends_batch: i == last,
                    ..o.in_flight
                },
            })
            .collect();
        let sent = self.sink.publish_batch(batch, fenced).await?;
        self.stats.already_stored.inc_by(sent.already_stored as u64);
        for _ in 0..sent.sent {
            self.watermark.published();
        }
        self.stats.in_flight.set(self.sink.in_flight() as u64);
        Ok(Next::Continue)
    }

    /// A transaction that falls back: what was held for its batch goes out one by one.
    async fn publish_each(
        &mut self,
        reason: Fallback,
        (held, first): (Vec<Outgoing>, bool),
    ) -> Result<Next, Error> {
        self.stats.atomic_fallback(reason.as_str());
        if first && let Some(txn) = &self.transaction {
            atomic::warn(reason, txn.commit_lsn);
        }
        for outgoing in held {
            if self.publish_one(outgoing).await? == Next::Restart {
                return Ok(Next::Restart);
            }
        }
        Ok(Next::Continue)
    }

    /// Sends `outgoing` on its own. A message over the server's `max_payload` is a poison row,
    /// whose dead letter goes out in its place, fenced as it would have been.
    async fn publish_one(&mut self, outgoing: Outgoing) -> Result<Next, Error> {
        let Outgoing {
            message,
            event,
            in_flight,
        } = outgoing;
        let fenced = self.carry.fenced(&event);
        let sent = match self.sink.publish(message, event, in_flight, fenced).await {
            Ok(Sent::AlreadyStored) => {
                self.stats.already_stored.inc();
                return Ok(Next::Continue);
            }
            Ok(sent) => sent,
            Err(err) => {
                self.stats.publish_error(err.kind());
                let SinkError::TooLarge { event, size, .. } = &err else {
                    return Err(err.into());
                };
                let mut row = PoisonRow::new(
                    PoisonKind::TooLarge,
                    err.to_string(),
                    event.clone(),
                    Bytes::new(),
                );
                row.payload_size = *size;
                let dead = self.poison(row, err.into(), in_flight.commit_time)?;
                self.sink
                    .publish(dead.message, dead.event, dead.in_flight, fenced)
                    .await?
            }
        };
        self.watermark.published();
        self.stats.in_flight.set(self.sink.in_flight() as u64);
        self.after_sent(sent).await
    }

    /// A publish that nothing is fenced on (see [`Sent::AwaitAck`]) is waited for, with every
    /// other in flight, before the next goes out.
    async fn after_sent(&mut self, sent: Sent) -> Result<Next, Error> {
        if sent == Sent::Pipelined {
            return Ok(Next::Continue);
        }
        while self.sink.in_flight() > 0 {
            tokio::select! {
                biased;
                _ = self.connection_lost.wait() => return Err(SinkError::Disconnected.into()),
                (published, outcome) = self.sink.next_ack() => {
                    if self.on_ack(published, outcome).await? == Next::Restart {
                        return Ok(Next::Restart);
                    }
                }
            }
        }
        Ok(Next::Continue)
    }

    /// With `--on-error dead-letter`, the dead letter to publish in place of `row`; else `err`.
    fn poison(
        &self,
        row: PoisonRow,
        err: Error,
        commit_time: SystemTime,
    ) -> Result<Outgoing, Error> {
        let ErrorPolicy::DeadLetter { subject } = &self.settings.on_error else {
            self.stats.poison_row(row.kind.as_str(), "fail");
            return Err(err);
        };
        Ok(self.dead_letter(row, subject, commit_time))
    }

    /// The dead letter of `row` on `subject`, logged (and counted once it is stored).
    fn dead_letter(&self, row: PoisonRow, subject: &str, commit_time: SystemTime) -> Outgoing {
        tracing::warn!(kind = row.kind.as_str(), event = %row.event, reason = %row.reason,
            dead_letter_subject = %subject,
            "published a row that cannot be published as itself to the dead-letter subject");
        let kind = row.kind;
        let event = EventRef {
            subject: Some(subject.into()),
            ..row.event.clone()
        };
        Outgoing {
            message: row.into_dead_letter(subject, self.sink.max_payload()),
            event,
            in_flight: InFlight {
                commit_time,
                dead_letter: Some(kind),
                batched: false,
                ends_batch: false,
            },
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

    async fn on_ack(
        &mut self,
        published: Published<InFlight>,
        outcome: AckOutcome,
    ) -> Result<Next, Error> {
        let Published { event, tag } = published;
        let ack = match outcome {
            Ok(ack) => ack,
            Err(err) => return self.on_refused(event, tag, err).await,
        };
        if ack.duplicate {
            self.stats.duplicates.inc();
        } else {
            self.stats.published.inc();
            // Counted once stored: a dead letter re-sent after a restart is a duplicate.
            if let Some(kind) = tag.dead_letter {
                self.stats.poison_row(kind.as_str(), "dead_letter");
            }
            if tag.ends_batch {
                self.stats.atomic_batches.inc();
            }
        }
        self.stats.in_flight.set(self.sink.in_flight() as u64);
        if self.watermark.acked() {
            self.stats.transaction_acked(tag.commit_time);
            self.confirm();
        }
        Ok(Next::Continue)
    }

    /// A publish JetStream refused. A row it can never take is, with a dead-letter subject,
    /// remembered, and the session restarts so the next one publishes its dead letter in its
    /// place (see [`super::poison`]). The watermark never passes a row that is in neither place.
    async fn on_refused(
        &mut self,
        event: EventRef,
        in_flight: InFlight,
        err: AckError,
    ) -> Result<Next, Error> {
        let err = self.sink.ack_error(event, err).await;
        self.stats.publish_error(err.kind());
        if let SinkError::Fenced { event, .. } = &err {
            // Acks come in publish order: every publish before this one is stored.
            self.carry.unfence = Some((event.commit_lsn, event.event_id.clone()));
        }
        let refused_event = match &err {
            SinkError::NoStream { event } | SinkError::Rejected { event, .. } => event.clone(),
            _ => return Err(err.into()),
        };
        if in_flight.batched {
            // Which of the batch's rows JetStream could not take is not said: event by event,
            // the next session finds out (and dead-letters it or stops, per --on-error).
            let detail = match &err {
                SinkError::Rejected { detail, .. } => detail.as_str(),
                _ => "no stream captures one of its subjects",
            };
            tracing::warn!(commit_lsn = %refused_event.commit_lsn, reason = %detail,
                "JetStream refused an atomic batch: restarting the session to publish its transaction event by event");
            self.stats.atomic_fallback(Fallback::Refused.as_str());
            self.carry.refused_batches.insert(refused_event.commit_lsn);
            return Ok(Next::Restart);
        }
        let err = Error::from(err);
        let Disposition::Poison(kind) = err.disposition() else {
            return Err(err);
        };
        // A dead letter JetStream refuses has nothing left to fall back to.
        if in_flight.dead_letter.is_some() || self.settings.on_error == ErrorPolicy::Fail {
            self.stats.poison_row(kind.as_str(), "fail");
            return Err(err);
        }
        tracing::warn!(kind = kind.as_str(), event = %refused_event, reason = %err,
            "JetStream refused a row at its ack: restarting the session to publish its dead letter in its place");
        self.carry.refused.insert(
            refused_event.commit_lsn,
            refused_event.event_id,
            kind,
            err.to_string(),
        );
        Ok(Next::Restart)
    }

    /// Every status interval (at most a second): proof of life for /healthz, the checkpoint,
    /// then what it and the replay hold let PostgreSQL know.
    async fn on_tick(&mut self) -> Result<(), Error> {
        self.stats.beat();
        self.save_progress().await?;
        let now = Instant::now();
        self.carry.hold.release(now);
        self.report();
        self.log_progress(now);
        Ok(())
    }

    fn log_progress(&mut self, now: Instant) {
        let Some(commit) = self.watermark.last_acked_commit() else {
            return;
        };
        let due = match self.logged_commit {
            None => true,
            Some((at, logged)) => {
                logged != commit && now.duration_since(at) >= PROGRESS_LOG_INTERVAL
            }
        };
        if due {
            tracing::info!(last_acked_commit_lsn = %commit, confirmed_lsn = %self.reportable(),
                "progress: every transaction up to this commit LSN is in JetStream");
            self.logged_commit = Some((now, commit));
        }
    }

    async fn save_progress(&mut self) -> Result<(), Error> {
        self.progress.save(self.watermark.confirmed()).await?;
        Ok(())
    }

    /// What PostgreSQL may be told: what the replay window releases, and never past what the
    /// checkpoint holds (see [`super::progress`]).
    fn reportable(&self) -> Lsn {
        self.carry.hold.released().min(self.progress.saved())
    }

    /// The watermark moved: record it, and report what the replay window lets go.
    fn confirm(&mut self) {
        if !self.carry.refused_batches.is_empty() {
            let confirmed = self.watermark.confirmed();
            self.carry.refused_batches.retain(|&lsn| lsn >= confirmed);
        }
        let now = Instant::now();
        self.carry.hold.record(now, self.watermark.confirmed());
        self.carry.hold.release(now);
        self.report();
        if let Some(commit) = self.watermark.last_acked_commit() {
            self.stats.last_acked_commit_lsn.set(commit.as_u64());
        }
    }

    fn report(&mut self) {
        let lsn = self.reportable();
        self.stream.confirm(lsn);
        self.stats.confirmed_lsn.set(lsn.as_u64());
    }
}
