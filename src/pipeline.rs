//! The pipeline: WAL events in, JetStream publishes out, and the LSN that may be confirmed.
//!
//! ```text
//!  ReplicationStream ──WalEvent──▶ decode ─▶ TableMapping ─▶ JetStreamSink::publish
//!         ▲                                                       │ acks, in publish order
//!         └──────── confirm(lsn) ◀── Watermark ◀──────────────────┘
//! ```
//!
//! Invariants:
//! - Publishes are issued in WAL order (transactions in commit order, rows in transaction order)
//!   on one connection, and their acks are consumed in that same order.
//! - At most `max_in_flight` publishes await their ack. A transaction larger than that streams
//!   through; memory is bounded by the window, not by the transaction.
//! - The confirmed LSN is the end LSN of the newest transaction whose every row is acked — never
//!   more. With nothing in flight and no transaction open, it may also follow the server's
//!   keepalive position, so that an idle outbox on a busy database does not pin WAL.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use async_nats::Subject;
use tokio::sync::watch;

use crate::Error;
use crate::dead_letter::{ErrorPolicy, PoisonKind, PoisonRow, RefusedRows};
use crate::lsn::Lsn;
use crate::mapping::{MappingConfig, TableMapping, TransactionContext};
use crate::sink::{
    AckError, AckOutcome, Checkpoint, ConnectionLost, JetStreamSink, PublishLabel, Sent, SinkError,
};
use crate::source::pgoutput::{self, Message, SkippedKind};
use crate::source::{ReplicationStream, SourceError, WalEvent};
use crate::stats::{SkipReason, SkippedChanges, Stats};

/// Tracks which WAL position is safe to confirm.
#[derive(Debug, Clone)]
pub struct Watermark {
    /// Publishes issued and acked in this session, counted in order.
    published: u64,
    acked: u64,
    /// Commits whose rows are not all acked yet: (rows published up to this commit, end LSN, commit LSN).
    pending: VecDeque<PendingCommit>,
    in_transaction: bool,
    confirmed: Lsn,
    /// Commit LSN of the newest transaction that is fully acked (for operators to save).
    last_acked_commit: Option<Lsn>,
}

#[derive(Debug, Clone, Copy)]
struct PendingCommit {
    published: u64,
    end_lsn: Lsn,
    commit_lsn: Lsn,
}

impl Watermark {
    pub fn new(confirmed: Lsn) -> Self {
        Watermark {
            published: 0,
            acked: 0,
            pending: VecDeque::new(),
            in_transaction: false,
            confirmed,
            last_acked_commit: None,
        }
    }

    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    pub fn last_acked_commit(&self) -> Option<Lsn> {
        self.last_acked_commit
    }

    pub fn in_flight(&self) -> u64 {
        self.published - self.acked
    }

    pub fn begin(&mut self) {
        self.in_transaction = true;
    }

    pub fn published(&mut self) {
        self.published += 1;
    }

    /// A transaction ended. Returns true when the confirmed LSN moved.
    pub fn commit(&mut self, commit_lsn: Lsn, end_lsn: Lsn) -> bool {
        self.in_transaction = false;
        self.pending.push_back(PendingCommit {
            published: self.published,
            end_lsn,
            commit_lsn,
        });
        self.advance()
    }

    /// The oldest outstanding publish was acked. Returns true when the confirmed LSN moved.
    pub fn acked(&mut self) -> bool {
        debug_assert!(self.acked < self.published, "more acks than publishes");
        self.acked += 1;
        self.advance()
    }

    /// The server has sent everything up to `wal_end`. With nothing in flight and no transaction
    /// open, every event before `wal_end` is durable downstream, so it may be confirmed.
    pub fn keepalive(&mut self, wal_end: Lsn) -> bool {
        if self.in_transaction || self.acked != self.published || !self.pending.is_empty() {
            return false;
        }
        self.raise(wal_end)
    }

    fn advance(&mut self) -> bool {
        let mut moved = false;
        while let Some(front) = self.pending.front().copied() {
            if front.published > self.acked {
                break;
            }
            self.pending.pop_front();
            self.last_acked_commit = Some(front.commit_lsn);
            moved |= self.raise(front.end_lsn);
        }
        moved
    }

    fn raise(&mut self, lsn: Lsn) -> bool {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            true
        } else {
            false
        }
    }
}

/// Holds the LSN reported to PostgreSQL back by the replay window, so the slot keeps that much
/// WAL and `--start-lsn` can go back that far. With a zero window it releases at once.
#[derive(Debug, Clone)]
pub struct ReplayHold {
    window: Duration,
    /// Positions that became durable downstream, oldest first: (since when, newest LSN then).
    history: VecDeque<(Instant, Lsn)>,
    released: Lsn,
}

/// Positions that become durable within one bucket share an entry, so memory is bounded by
/// window / bucket, not by the transaction rate. A position may be released up to one bucket
/// early.
const HOLD_BUCKET: Duration = Duration::from_millis(100);

impl ReplayHold {
    pub fn new(window: Duration, released: Lsn) -> Self {
        ReplayHold {
            window,
            history: VecDeque::new(),
            released,
        }
    }

    /// The position reported to PostgreSQL.
    pub fn released(&self) -> Lsn {
        self.released
    }

    /// `lsn` is durable downstream as of `now`.
    pub fn record(&mut self, now: Instant, lsn: Lsn) {
        if self.window.is_zero() {
            self.released = self.released.max(lsn);
            return;
        }
        match self.history.back_mut() {
            Some((since, newest)) if now.duration_since(*since) < HOLD_BUCKET => {
                *newest = (*newest).max(lsn)
            }
            _ => self.history.push_back((now, lsn)),
        }
    }

    /// Releases what has been durable for the whole window. True when the released LSN moved.
    pub fn release(&mut self, now: Instant) -> bool {
        let before = self.released;
        while let Some(&(since, lsn)) = self.history.front() {
            if now.duration_since(since) < self.window {
                break;
            }
            self.history.pop_front();
            self.released = self.released.max(lsn);
        }
        self.released > before
    }
}

/// What outlives a session: the replay window's history, the rows JetStream refused at their
/// ack, which the next session dead-letters in their place, and the event to send unfenced.
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
            counted_through: Lsn::ZERO,
        }
    }

    /// Whether the publish of `event_id` (committed at `commit_lsn`) names its predecessor.
    fn fenced(&mut self, commit_lsn: Lsn, event_id: &str) -> bool {
        match &self.unfence {
            Some((lsn, id)) if *lsn == commit_lsn && id == event_id => {
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
    /// dead letter in its place (see [`crate::dead_letter`]).
    Restart,
}

/// What the loop does after an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    Restart,
}

#[derive(Debug)]
pub struct PipelineSettings {
    pub mapping: MappingConfig,
    pub on_error: ErrorPolicy,
    pub max_in_flight: usize,
    pub shutdown_timeout: Duration,
}

/// Where a session starts.
#[derive(Debug, Clone, Copy)]
pub struct SessionStart {
    /// The newest position known durable downstream: in this process, per the checkpoint, or the
    /// slot's own.
    pub progress: Lsn,
    /// Transactions that committed before this LSN are read but not published (`--start-lsn`,
    /// or what the checkpoint says was already published).
    pub skip_before: Lsn,
}

/// One replication session: runs until shutdown or the first error.
pub struct Session<'a> {
    settings: &'a PipelineSettings,
    stream: ReplicationStream,
    sink: &'a mut JetStreamSink,
    connection_lost: ConnectionLost,
    stats: &'a Stats,
    watermark: Watermark,
    carry: &'a mut Carryover,
    checkpoint: Option<Checkpoint>,
    skip_before: Lsn,
    /// The open transaction committed before `skip_before`.
    skipping: bool,
    tables: HashMap<u32, TableMapping>,
    /// One per publish in flight, oldest first, as the sink hands back their acks.
    labels: VecDeque<PublishLabel>,
    transaction: Option<TransactionContext>,
    /// What the open transaction skipped, counted at its Commit.
    skipped: SkippedChanges,
    row_index: u32,
    /// The newest acked commit LSN last logged, and when: logged periodically so an operator
    /// can save it for `--start-lsn`.
    logged_commit: Option<(Instant, Lsn)>,
}

/// How often the newest acked commit LSN is logged while it moves.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(30);

impl<'a> Session<'a> {
    pub fn new(
        settings: &'a PipelineSettings,
        stream: ReplicationStream,
        sink: &'a mut JetStreamSink,
        stats: &'a Stats,
        start: SessionStart,
        carry: &'a mut Carryover,
        checkpoint: Option<Checkpoint>,
    ) -> Self {
        Session {
            settings,
            stream,
            connection_lost: sink.connection_lost(),
            sink,
            stats,
            watermark: Watermark::new(start.progress),
            carry,
            checkpoint,
            skip_before: start.skip_before,
            skipping: false,
            tables: HashMap::new(),
            labels: VecDeque::new(),
            transaction: None,
            skipped: SkippedChanges::default(),
            row_index: 0,
            logged_commit: None,
        }
    }

    pub fn confirmed(&self) -> Lsn {
        self.watermark.confirmed()
    }

    /// Streams until `shutdown` turns true or something fails. The confirmed LSN reached is
    /// returned with the outcome, so the next session can start from it.
    pub async fn run(
        mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (Lsn, Result<SessionEnd, Error>) {
        let result = match self.stream_events(shutdown).await {
            Ok(Next::Continue) => Ok(self.drain().await),
            Ok(Next::Restart) => Ok(SessionEnd::Restart),
            Err(err) => Err(err),
        };
        let progress = self.watermark.confirmed();
        if result.is_ok() {
            if let Err(err) = self.save_checkpoint().await {
                tracing::warn!(error = %err, "could not save the checkpoint at the session's end");
            }
            // Ended cleanly, the walsender releases the slot at once: the next session (or
            // instance) need not wait for PostgreSQL to notice a dropped connection.
            self.stream
                .finish(
                    self.carry.hold.released(),
                    self.settings.shutdown_timeout.max(Duration::from_secs(2)),
                )
                .await;
        }
        (progress, result)
    }

    /// Streams until shutdown is requested (`Continue`: drain next) or a row must be
    /// dead-lettered in its place (`Restart`).
    async fn stream_events(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Next, Error> {
        let window = self.settings.max_in_flight.max(1);
        // Proves to /healthz that this loop still turns, busy or idle.
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            if *shutdown.borrow() {
                return Ok(Next::Continue);
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => {}
                _ = self.connection_lost.wait() => return Err(SinkError::Disconnected.into()),
                ack = self.sink.next_ack(), if self.sink.in_flight() > 0 => {
                    if self.on_ack(ack).await? == Next::Restart {
                        return Ok(Next::Restart);
                    }
                }
                _ = heartbeat.tick() => self.on_tick().await?,
                event = self.stream.next(), if self.sink.in_flight() < window => {
                    if self.on_event(event?).await? == Next::Restart {
                        return Ok(Next::Restart);
                    }
                }
            }
        }
    }

    /// Waits for in-flight acks, bounded by the shutdown timeout.
    async fn drain(&mut self) -> SessionEnd {
        self.sink.flush().await;
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_timeout;
        while self.sink.in_flight() > 0
            && let Ok(ack) = tokio::time::timeout_at(deadline, self.sink.next_ack()).await
        {
            match self.on_ack(ack).await {
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

    async fn on_ack(&mut self, ack: AckOutcome) -> Result<Next, Error> {
        let label = self
            .labels
            .pop_front()
            .expect("one label per in-flight publish");
        let ack = match ack {
            Ok(ack) => ack,
            Err(err) => return self.on_failed_publish(&label, err).await,
        };
        if ack.duplicate {
            self.stats.duplicates.inc();
        } else {
            self.stats.published.inc();
            // Counted once stored: a dead letter re-sent after a restart is a duplicate.
            if let Some(kind) = label.dead_letter {
                self.stats.poison_row(kind.as_str(), "dead_letter");
            }
        }
        self.stats.in_flight.set(self.sink.in_flight() as u64);
        if self.watermark.acked() {
            self.stats.transaction_acked(label.commit_time);
            self.confirm();
        }
        Ok(Next::Continue)
    }

    /// A publish JetStream refused. A row it can never take — no stream captures its subject,
    /// or it refuses the message itself — is, with a dead-letter subject, remembered, and the
    /// session restarts: the next one publishes its dead letter in its place and re-sends what
    /// followed it. The watermark never passes a row that is in neither place.
    async fn on_failed_publish(
        &mut self,
        label: &PublishLabel,
        err: AckError,
    ) -> Result<Next, Error> {
        let err = self.sink.ack_error(label, err).await;
        self.stats.publish_error(err.kind());
        let kind = match &err {
            SinkError::NoStream { .. } => PoisonKind::NoStream,
            SinkError::Rejected { .. } => PoisonKind::Rejected,
            SinkError::Fenced { .. } => {
                // Acks come in publish order: every publish before this one is stored.
                self.carry.unfence = Some((label.commit_lsn, label.event_id.clone()));
                return Err(err.into());
            }
            _ => return Err(err.into()),
        };
        // A dead letter JetStream refuses has nothing left to fall back to.
        if label.dead_letter.is_some() || self.settings.on_error == ErrorPolicy::Fail {
            self.stats.poison_row(kind.as_str(), "fail");
            return Err(err.into());
        }
        tracing::warn!(kind = kind.as_str(), event_id = %label.event_id, subject = %label.subject,
            commit_lsn = %label.commit_lsn, reason = %err,
            "JetStream refused a row at its ack: restarting the session to publish its dead letter in its place");
        self.carry.refused.insert(
            label.commit_lsn,
            label.event_id.clone(),
            kind,
            err.to_string(),
        );
        Ok(Next::Restart)
    }

    /// With `--on-error dead-letter`, the dead letter to publish for `row`; else `err`.
    fn dead_letter_or_fail(
        &self,
        row: PoisonRow,
        err: Error,
        commit_time: std::time::SystemTime,
    ) -> Result<(crate::mapping::OutboxEvent, PublishLabel), Error> {
        let ErrorPolicy::DeadLetter { subject } = &self.settings.on_error else {
            self.stats.poison_row(row.kind.as_str(), "fail");
            return Err(err);
        };
        Ok(self.dead_letter(row, subject, commit_time))
    }

    /// The dead letter of `row` on `subject`, logged (and counted once it is stored).
    fn dead_letter(
        &self,
        row: PoisonRow,
        subject: &str,
        commit_time: std::time::SystemTime,
    ) -> (crate::mapping::OutboxEvent, PublishLabel) {
        tracing::warn!(kind = row.kind.as_str(), event_id = %row.event_id, table = %row.table,
            subject = row.subject.as_deref().unwrap_or("-"), commit_lsn = %row.commit_lsn,
            reason = %row.reason, dead_letter_subject = %subject,
            "published a row that cannot be published as itself to the dead-letter subject");
        let label = PublishLabel {
            subject: Subject::from(subject),
            event_id: row.event_id.clone(),
            commit_lsn: row.commit_lsn,
            commit_time,
            dead_letter: Some(row.kind),
        };
        (
            row.into_dead_letter(subject, self.sink.max_payload()),
            label,
        )
    }

    fn push_in_flight(&mut self, label: PublishLabel) {
        self.labels.push_back(label);
        self.stats.in_flight.set(self.sink.in_flight() as u64);
        self.watermark.published();
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
            }
            WalEvent::Data(frame) => return self.on_message(frame).await,
            WalEvent::Commit { end_lsn } => {
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
            WalEvent::Keepalive { wal_end } => {
                self.stats.server_wal_end.set(wal_end.as_u64());
                if self.watermark.keepalive(wal_end) {
                    self.confirm();
                }
            }
        }
        Ok(Next::Continue)
    }

    async fn on_message(&mut self, frame: bytes::Bytes) -> Result<Next, Error> {
        let message = pgoutput::decode(&frame).map_err(|e| SourceError::Replication {
            detail: e.to_string(),
            transient: false,
        })?;
        match message {
            Message::Relation(relation) => {
                let mapping = TableMapping::bind(&self.settings.mapping, &relation)?;
                tracing::debug!(table = %mapping.table(), relation_id = relation.id, "bound table mapping");
                self.tables.insert(relation.id, mapping);
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
                if self.skipping {
                    self.skipped.add(SkipReason::BeforeStartLsn);
                    return Ok(Next::Continue);
                }
                let row_index = self.row_index;
                self.row_index += 1;
                let settings = self.settings;
                let (commit_lsn, commit_time) = (txn.commit_lsn, txn.commit_time);
                let (event, label) = match mapping.map(&insert.tuple, &frame, txn, row_index) {
                    Ok(event) => {
                        let label = PublishLabel::new(&event, commit_lsn, commit_time);
                        match (
                            self.carry.refused.get(commit_lsn, &label.event_id),
                            &settings.on_error,
                        ) {
                            // JetStream refused it at its ack in an earlier session.
                            (Some((kind, reason)), ErrorPolicy::DeadLetter { subject }) => {
                                let row = PoisonRow {
                                    kind,
                                    reason: reason.to_owned(),
                                    table: mapping.table().to_owned(),
                                    event_id: label.event_id,
                                    subject: Some(event.subject),
                                    commit_lsn,
                                    payload_size: event.payload.len(),
                                    payload: event.payload,
                                };
                                self.dead_letter(row, subject, commit_time)
                            }
                            _ => (event, label),
                        }
                    }
                    Err(unmappable) => {
                        let payload = mapping.raw_payload(&insert.tuple, &frame);
                        let row = PoisonRow {
                            kind: PoisonKind::Unmappable,
                            reason: unmappable.reason.clone(),
                            table: unmappable.table.clone(),
                            event_id: unmappable.event_id.clone(),
                            subject: unmappable.subject.clone(),
                            commit_lsn: unmappable.commit_lsn,
                            payload_size: payload.len(),
                            payload,
                        };
                        self.dead_letter_or_fail(row, unmappable.into(), commit_time)?
                    }
                };
                let fenced = self.carry.fenced(label.commit_lsn, &label.event_id);
                let sent = match self.sink.publish(event, &label, fenced).await {
                    Ok(sent) => sent,
                    Err(err) => {
                        self.stats.publish_error(err.kind());
                        let SinkError::TooLarge { size, .. } = &err else {
                            return Err(err.into());
                        };
                        let row = PoisonRow {
                            kind: PoisonKind::TooLarge,
                            reason: err.to_string(),
                            table: self
                                .tables
                                .get(&insert.relation_id)
                                .map_or_else(String::new, |m| m.table().to_owned()),
                            event_id: label.event_id.clone(),
                            subject: Some(label.subject.to_string()),
                            commit_lsn: label.commit_lsn,
                            payload: bytes::Bytes::new(),
                            payload_size: *size,
                        };
                        let (event, dead_letter) =
                            self.dead_letter_or_fail(row, err.into(), commit_time)?;
                        // In the refused event's place, fenced as it would have been.
                        let sent = self.sink.publish(event, &dead_letter, fenced).await?;
                        self.push_in_flight(dead_letter);
                        return self.after_sent(sent).await;
                    }
                };
                self.push_in_flight(label);
                return self.after_sent(sent).await;
            }
            Message::Skipped(kind) => {
                if self.transaction.is_some() {
                    self.skipped.add(kind.into());
                } else {
                    self.stats.skipped(kind.into(), 1);
                }
                if let SkippedKind::Unknown(tag) = kind {
                    tracing::warn!(tag = %char::from(tag), "skipped a pgoutput message of unknown type");
                }
            }
        }
        Ok(Next::Continue)
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
                ack = self.sink.next_ack() => {
                    if self.on_ack(ack).await? == Next::Restart {
                        return Ok(Next::Restart);
                    }
                }
            }
        }
        Ok(Next::Continue)
    }

    /// Once a second: proof of life for /healthz, the replay hold's release, the checkpoint.
    async fn on_tick(&mut self) -> Result<(), Error> {
        self.stats.beat();
        let now = Instant::now();
        if self.carry.hold.release(now) {
            self.report();
        }
        self.log_progress(now);
        self.save_checkpoint().await
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
            tracing::info!(last_acked_commit_lsn = %commit, confirmed_lsn = %self.carry.hold.released(),
                "progress: every transaction up to this commit LSN is in JetStream");
            self.logged_commit = Some((now, commit));
        }
    }

    async fn save_checkpoint(&mut self) -> Result<(), Error> {
        if let Some(checkpoint) = &mut self.checkpoint {
            checkpoint.save(self.watermark.confirmed()).await?;
        }
        Ok(())
    }

    /// The watermark moved: record it, and report what the replay window lets go.
    fn confirm(&mut self) {
        let now = Instant::now();
        self.carry.hold.record(now, self.watermark.confirmed());
        self.carry.hold.release(now);
        self.report();
        if let Some(commit) = self.watermark.last_acked_commit() {
            self.stats.last_acked_commit_lsn.set(commit.as_u64());
        }
    }

    fn report(&mut self) {
        let lsn = self.carry.hold.released();
        self.stream.confirm(lsn);
        self.stats.confirmed_lsn.set(lsn.as_u64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn::new(v)
    }

    #[test]
    fn confirms_a_transaction_only_when_all_its_rows_are_acked() {
        let mut w = Watermark::new(lsn(10));
        w.begin();
        w.published();
        w.published();
        assert!(!w.commit(lsn(20), lsn(21)));
        assert_eq!(w.confirmed(), lsn(10));
        assert!(!w.acked());
        assert_eq!(w.confirmed(), lsn(10), "one of two rows acked");
        assert!(w.acked());
        assert_eq!(w.confirmed(), lsn(21));
        assert_eq!(w.last_acked_commit(), Some(lsn(20)));
    }

    #[test]
    fn confirms_in_commit_order_across_transactions() {
        let mut w = Watermark::new(lsn(0));
        for (commit, end) in [(100, 101), (200, 201), (300, 301)] {
            w.begin();
            w.published();
            w.commit(lsn(commit), lsn(end));
        }
        assert_eq!(w.in_flight(), 3);
        w.acked();
        assert_eq!(w.confirmed(), lsn(101));
        w.acked();
        w.acked();
        assert_eq!(w.confirmed(), lsn(301));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn a_transaction_without_rows_confirms_once_earlier_ones_are_acked() {
        let mut w = Watermark::new(lsn(0));
        w.begin();
        w.published();
        w.commit(lsn(10), lsn(11));
        w.begin();
        assert!(
            !w.commit(lsn(20), lsn(21)),
            "empty txn waits for the one before it"
        );
        w.acked();
        assert_eq!(w.confirmed(), lsn(21));
    }

    #[test]
    fn a_large_transaction_confirms_nothing_until_its_commit() {
        let mut w = Watermark::new(lsn(5));
        w.begin();
        for _ in 0..1000 {
            w.published();
            assert!(!w.acked());
        }
        assert_eq!(
            w.confirmed(),
            lsn(5),
            "rows acked, but the commit has not arrived"
        );
        assert!(
            !w.keepalive(lsn(999)),
            "no keepalive confirmation inside a transaction"
        );
        assert!(w.commit(lsn(50), lsn(51)));
        assert_eq!(w.confirmed(), lsn(51));
    }

    #[test]
    fn keepalives_confirm_only_when_idle() {
        let mut w = Watermark::new(lsn(0));
        assert!(w.keepalive(lsn(500)), "idle: follow the server");
        assert_eq!(w.confirmed(), lsn(500));
        w.begin();
        w.published();
        w.commit(lsn(600), lsn(601));
        assert!(!w.keepalive(lsn(700)), "a publish is in flight");
        w.acked();
        assert_eq!(w.confirmed(), lsn(601));
        assert!(w.keepalive(lsn(700)));
        assert!(!w.keepalive(lsn(650)), "never moves back");
        assert_eq!(w.confirmed(), lsn(700));
    }

    #[test]
    fn never_moves_backwards() {
        let mut w = Watermark::new(lsn(1000));
        w.begin();
        w.published();
        w.commit(lsn(10), lsn(11));
        assert!(!w.acked());
        assert_eq!(w.confirmed(), lsn(1000));
    }

    #[test]
    fn a_zero_replay_window_releases_at_once() {
        let mut hold = ReplayHold::new(Duration::ZERO, lsn(10));
        hold.record(Instant::now(), lsn(20));
        assert_eq!(hold.released(), lsn(20));
        hold.record(Instant::now(), lsn(15));
        assert_eq!(hold.released(), lsn(20), "never moves back");
    }

    #[test]
    fn a_replay_window_releases_positions_once_they_are_that_old() {
        let start = Instant::now();
        let window = Duration::from_secs(60);
        let mut hold = ReplayHold::new(window, lsn(10));
        hold.record(start, lsn(20));
        hold.record(start + Duration::from_secs(30), lsn(30));
        assert!(!hold.release(start + Duration::from_secs(59)));
        assert_eq!(hold.released(), lsn(10), "nothing is a minute old yet");
        assert!(hold.release(start + Duration::from_secs(60)));
        assert_eq!(hold.released(), lsn(20));
        assert!(!hold.release(start + Duration::from_secs(89)));
        assert!(hold.release(start + Duration::from_secs(90)));
        assert_eq!(hold.released(), lsn(30));
    }

    #[test]
    fn a_replay_window_keeps_one_entry_per_bucket() {
        let start = Instant::now();
        let mut hold = ReplayHold::new(Duration::from_secs(1), lsn(0));
        for i in 0..1000u64 {
            // 1000 positions within 50 ms share a bucket.
            hold.record(start + Duration::from_micros(i * 50), lsn(i + 1));
        }
        assert_eq!(hold.history.len(), 1);
        assert!(hold.release(start + Duration::from_secs(1)));
        assert_eq!(
            hold.released(),
            lsn(1000),
            "the bucket holds its newest position"
        );
    }
}
