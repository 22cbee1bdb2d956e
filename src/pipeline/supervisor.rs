//! The supervisor: checks, then replication sessions until shutdown.
//!
//! A session is one NATS connection plus one `START_REPLICATION`. Transient failures (a lost
//! connection, an ack timeout, a server restart, a failover under way) end the session; the next
//! one starts after an exponential backoff — from its first step again after a session that
//! streamed — from the slot's confirmed position, and what its streams hold already is not sent
//! again. Permanent failures (bad configuration, a poison row with `--on-error fail`, a gap in
//! the history, see [`super::continuity`]) end the process with a message saying what to do.
//!
//! Leader election is the slot itself: PostgreSQL lets one connection stream from a slot. An
//! instance that finds it busy (SQLSTATE 55006) is a standby and retries every `standby_retry`.

use std::collections::HashSet;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::watch;

use super::backfill::{self, BackfillConfig, Rows, TableReport};
use super::continuity::Published;
use super::error::Error;
use super::mapping::TableMapping;
use super::messages::MessageMapping;
use super::progress::{Progress, ProgressRecord};
use super::replay::ReplayHold;
use super::session::{Carryover, Session, SessionEnd, SessionStart, Sink};
use super::start::{Gate, Process, SlotPlan, Start, StartConfig};
use super::{RunConfig, shutdown_requested};
use crate::lsn::Lsn;
use crate::sink::{Checkpoint, SinkError};
use crate::source::{Catalog, ReplicationStream, SlotName, SlotState, SourceError};
use crate::stats::Stats;

fn backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs until `shutdown` turns true (Ok) or a permanent error (Err).
pub async fn run(
    config: RunConfig,
    stats: &Stats,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut supervisor = Supervisor {
        carry: None,
        gate: Gate::new(config.accept_gap),
        start: StartConfig {
            slot: config.source.slot.clone(),
            create_slot: config.source.create_slot,
            initial_backfill: config.initial_backfill.is_some(),
            start_lsn: config.replay.start_lsn,
        },
        config,
        stats,
        catalog: None,
        process: Process::default(),
        streamed_this_session: false,
        role: Role::Starting,
        warned_no_failover: false,
    };
    let mut delays = backoff();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let outcome = supervisor.session(&mut shutdown).await;
        if supervisor.streamed_this_session {
            // It was not failing in a loop: a failure after it retries at once-ish.
            delays = backoff();
        }
        match outcome {
            Ok(SessionEnd::Shutdown { drained }) => {
                tracing::info!(
                    confirmed_lsn = %Lsn::new(stats.confirmed_lsn.get()),
                    last_acked_commit_lsn = %Lsn::new(stats.last_acked_commit_lsn.get()),
                    drained,
                    published = stats.published.get(),
                    duplicates = stats.duplicates.get(),
                    "stopped"
                );
                return Ok(());
            }
            // Not a failure: the next session answers what the last one met.
            Ok(SessionEnd::Restart) => {}
            Err(Error::Source(SourceError::SlotBusy { slot, pid })) => {
                supervisor.standby(&slot, pid);
                if sleep_or_shutdown(supervisor.config.standby_retry, &mut shutdown).await {
                    return Ok(());
                }
            }
            Err(err) if err.is_transient() => {
                // Its connection may be what failed, or share a stuck network path with it: the
                // next session opens a fresh one (and after a failover finds the new primary).
                supervisor.catalog = None;
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                stats.reconnects.inc();
                tracing::warn!(error = %err, retry_in = ?delay, "transient failure; retrying with backoff");
                if supervisor.role == Role::Leader {
                    supervisor.role = Role::Starting;
                }
                stats.set_role(crate::stats::Role::Reconnecting);
                if sleep_or_shutdown(delay, &mut shutdown).await {
                    return Ok(());
                }
            }
            Err(err) => return Err(err),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Starting,
    Standby(Option<i32>),
    Leader,
}

struct Supervisor<'a> {
    config: RunConfig,
    start: StartConfig,
    stats: &'a Stats,
    catalog: Option<Catalog>,
    /// What this process knows from its earlier sessions.
    process: Process,
    /// What the last session left to the next (taken while a session runs).
    carry: Option<Carryover>,
    /// `--accept-gap`, until a session has streamed past the gap it accepted.
    gate: Gate,
    /// The last session reached streaming.
    streamed_this_session: bool,
    role: Role,
    warned_no_failover: bool,
}

/// A session ready to stream.
struct Ready {
    stream: ReplicationStream,
    sink: Sink,
    progress: Progress,
    start: SessionStart,
}

impl Supervisor<'_> {
    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<SessionEnd, Error> {
        self.streamed_this_session = false;
        // Nothing is in flight while a session is being prepared: shutdown need not wait for a
        // server that does not answer.
        let ready = tokio::select! {
            biased;
            _ = shutdown_requested(shutdown) => return Ok(SessionEnd::Shutdown { drained: true }),
            ready = self.prepare() => ready?,
        };
        let Ready {
            stream,
            mut sink,
            progress,
            start,
        } = ready;
        self.process.streamed = true;
        self.streamed_this_session = true;
        self.gate = Gate::new(false);
        if self.role != Role::Leader {
            tracing::info!(slot = %self.config.source.slot, from = %self.process.acked,
                "took the replication slot: this instance is the leader and streams");
            self.role = Role::Leader;
            self.stats.set_role(crate::stats::Role::Leader);
        }
        let carry = self.take_carry();
        let session = Session::new(
            &self.config.pipeline,
            self.stats,
            stream,
            &mut sink,
            progress,
            start,
            carry,
        );
        let (carry, result) = session.run(shutdown).await;
        self.process.acked = self.process.acked.max(carry.acked);
        self.carry = Some(carry);
        self.stats.in_flight.set(0);
        result
    }

    /// What the last session left to the next (a fresh one before the first).
    fn carry(&mut self) -> &mut Carryover {
        let (acked, window) = (self.process.acked, self.config.replay.window);
        self.carry
            .get_or_insert_with(|| Carryover::new(acked, ReplayHold::new(window, acked)))
    }

    fn take_carry(&mut self) -> Carryover {
        self.carry();
        let (acked, window) = (self.process.acked, self.config.replay.window);
        self.carry
            .take()
            .unwrap_or_else(|| Carryover::new(acked, ReplayHold::new(window, acked)))
    }

    /// Everything before streaming: the server and the mapping checked, the slot, the streams
    /// and the checkpoint read, the history checked for gaps, the slot created if need be.
    async fn prepare(&mut self) -> Result<Ready, Error> {
        let catalog = match self.catalog.take() {
            Some(catalog) if !catalog.is_closed() => catalog,
            _ => Catalog::connect(&self.config.source.database).await?,
        };
        let ready = self.prepare_on(&catalog).await;
        self.catalog = Some(catalog);
        ready
    }

    async fn prepare_on(&mut self, catalog: &Catalog) -> Result<Ready, Error> {
        let source = self.config.source.clone();
        catalog.check_wal_level().await?;
        let (tables, qualify_ids, messages) = self.bind_mappings(catalog).await?;
        let slot_state = catalog.slot_state(&source.slot).await?;
        if let Some(state) = &slot_state {
            catalog.check_slot(&source.slot, state)?;
            if let Some(pid) = state.active_pid {
                // Standby, without a word to NATS.
                return Err(SourceError::SlotBusy {
                    slot: source.slot.to_string(),
                    pid: Some(pid),
                }
                .into());
            }
        }

        let mut sink = Sink::connect(&self.config.sink).await?;
        sink.prepare(&self.config.sink).await?;
        let bucket = &self.config.replay.checkpoint_bucket;
        let (mut checkpoint, saved) = sink.open_checkpoint(bucket, source.slot.as_str()).await?;
        let record = saved
            .map(|value| ProgressRecord::decode(&value))
            .transpose()
            .map_err(|detail| SinkError::Checkpoint {
                bucket: bucket.clone(),
                detail: format!("key `{}`: {detail}", source.slot),
            })?;
        let published = Published {
            stream_end: sink.stream_end(),
            record,
        };
        let start_config = self.start.clone();
        let mut start = Start::new(&start_config, self.process, published);
        let plan = start.slot(slot_state.as_ref(), &mut self.gate, || {
            catalog.create_slot_sql(&source.slot)
        })?;
        let slot = match plan {
            SlotPlan::Use => slot_state.ok_or_else(|| missing_slot(catalog, &source.slot))?,
            SlotPlan::Create | SlotPlan::CreateWithBackfill { .. } => {
                if let SlotPlan::CreateWithBackfill { drop_first } = plan {
                    if drop_first {
                        catalog.drop_slot(&source.slot).await?;
                    }
                    let predicate = self.config.initial_backfill.clone().unwrap_or_default();
                    self.initial_backfill(catalog, &mut checkpoint, &predicate)
                        .await?;
                    // The streams hold the backfilled rows now: fence after them.
                    sink.prepare(&self.config.sink).await?;
                } else {
                    catalog.create_slot(&source.slot).await?;
                }
                let state = catalog
                    .slot_state(&source.slot)
                    .await?
                    .ok_or_else(|| missing_slot(catalog, &source.slot))?;
                catalog.check_slot(&source.slot, &state)?;
                state
            }
        };
        self.warn_without_failover(catalog.has_failover_slots(), &slot);
        let slot_lsn = slot.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
        let position = start.position(slot_lsn, &self.gate)?;
        let window = self.config.replay.window;
        let carry = self.carry();
        if let Some(replay_from) = position.replay_from {
            carry.hold = ReplayHold::new(window, replay_from);
            tracing::info!(slot_confirmed_lsn = %slot_lsn,
                checkpoint = ?start.published().record.as_ref().map(|r| r.lsn.to_string()),
                stream_end = ?start.published().stream_end.as_ref().map(|e| e.commit_lsn.to_string()),
                skip_before = %position.skip_before, "start position");
        }
        carry.acked = carry.acked.max(position.acked);
        carry.forget_before(position.skip_before);
        let released = carry.hold.released();
        self.process.acked = position.acked;
        self.process.skip_before = position.skip_before;

        let mut pending = ReplicationStream::connect(&source, released, catalog).await?;
        let ancestry = match start.needs_ancestry(pending.identity()) {
            Some(timeline) => {
                let ancestry = pending.ancestry(timeline).await?;
                tracing::info!(
                    timeline = pending.identity().timeline,
                    ?ancestry,
                    "the database is on another timeline than when outbox-cdc last confirmed (a failover or a restore)"
                );
                Some(ancestry)
            }
            None => None,
        };
        start.history(pending.identity(), ancestry, &mut self.gate)?;
        let record = start.record(slot_lsn, pending.identity(), &self.gate);
        let saved = record.lsn;
        let progress = Progress::start(checkpoint, record).await?;
        let stream = pending.start().await?;
        Ok(Ready {
            stream,
            progress,
            start: SessionStart {
                skip_before: position.skip_before,
                saved,
                tables,
                qualify_ids,
                messages,
                max_payload: sink.max_payload(),
            },
            sink,
        })
    }

    /// The publication's tables, each with the mapping checked against it before streaming
    /// (a wrong flag fails at start rather than at the first event), and the message prefixes.
    async fn bind_mappings(
        &self,
        catalog: &Catalog,
    ) -> Result<(HashSet<String>, bool, Vec<MessageMapping>), Error> {
        let publication = &self.config.source.publication;
        let prefixes = &self.config.pipeline.message_prefixes;
        let tables = if prefixes.is_empty() {
            catalog.publication_tables(publication).await?
        } else {
            catalog.published_tables(publication).await?
        };
        let qualify_ids = tables.len() + prefixes.len() > 1;
        let mappings = &self.config.pipeline.mappings;
        if let Some(name) = mappings.unmatched(&tables).next() {
            return Err(Error::NoSuchTable {
                section: name.to_owned(),
                publication: publication.to_string(),
                tables: tables.iter().map(|t| t.qualified_name()).collect(),
            });
        }
        for table in &tables {
            TableMapping::bind(&mappings.for_table(table).mapping, table, qualify_ids)?;
        }
        let messages = prefixes
            .iter()
            .map(|prefix| MessageMapping::bind(&mappings.default.mapping, prefix, qualify_ids))
            .collect::<Result<Vec<_>, _>>()?;
        if qualify_ids && !self.process.streamed {
            tracing::info!(tables = ?tables.iter().map(|t| t.qualified_name()).collect::<Vec<_>>(),
                "the publication has several tables: event ids (Nats-Msg-Id) are `schema.table:<id>`, so theirs cannot collide");
        }
        Ok((
            tables.iter().map(|t| t.qualified_name()).collect(),
            qualify_ids,
            messages,
        ))
    }

    /// `--initial-backfill`, when the slot is created: the slot exports the snapshot it starts
    /// from, the rows `predicate` selects in that snapshot are published (what the old relay had
    /// not sent yet), and streaming then goes on from the slot — every older row from the
    /// snapshot, every newer one from the WAL, none twice.
    async fn initial_backfill(
        &self,
        catalog: &Catalog,
        checkpoint: &mut Checkpoint,
        predicate: &str,
    ) -> Result<(), Error> {
        Progress::initial_backfill_pending(checkpoint).await?;
        let snapshot = catalog
            .create_slot_with_snapshot(&self.config.source.slot)
            .await?;
        let config = BackfillConfig {
            publication: self.config.source.publication.clone(),
            sink: self.config.sink.clone(),
            mappings: self.config.pipeline.mappings.clone(),
            rows: Rows::Where(predicate.to_owned()),
            table: None,
            order_by: None,
            created_column: None,
            batch: 1000,
            snapshot: Some(snapshot.name.clone()),
            dry_run: false,
        };
        let reports = backfill::backfill(&config, catalog, &mut LoggedProgress).await?;
        drop(snapshot);
        for report in reports {
            tracing::info!(table = %report.table, selected = report.selected, published = report.published,
                already_present = report.already_present, dead_lettered = report.dead_lettered,
                "--initial-backfill: published the rows the snapshot selects; streaming from the slot from here");
        }
        Ok(())
    }

    /// On PostgreSQL 17+, a slot without `failover` is not synced to standbys: a failover loses
    /// it (and outbox-cdc then stops at the gap). Said once per process.
    fn warn_without_failover(&mut self, server_has_failover: bool, slot: &SlotState) {
        if self.warned_no_failover || !server_has_failover || slot.failover != Some(false) {
            return;
        }
        self.warned_no_failover = true;
        let name = &self.config.source.slot;
        tracing::warn!(slot = %name,
            "replication slot `{name}` was created without failover: standbys do not keep a copy, and after a failover it is gone. \
             Turn it on with `outbox-cdc setup --apply`, or on a replication connection: \
             `psql \"dbname=<db> replication=database\" -c 'ALTER_REPLICATION_SLOT {name} (FAILOVER true)'`");
    }

    fn standby(&mut self, slot: &str, pid: Option<i32>) {
        self.stats.set_role(crate::stats::Role::Standby);
        if self.role != Role::Standby(pid) {
            let holder = pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
            tracing::info!(%slot, holder_pid = %holder, retry_every = ?self.config.standby_retry,
                "replication slot `{slot}` is active on another connection (pid {holder}): this instance is standby");
            self.role = Role::Standby(pid);
        }
    }
}

fn missing_slot(catalog: &Catalog, slot: &SlotName) -> Error {
    SourceError::SlotMissing {
        slot: slot.to_string(),
        create_sql: catalog.create_slot_sql(slot),
    }
    .into()
}

/// The initial backfill's progress, in the log.
struct LoggedProgress;

impl backfill::Progress for LoggedProgress {
    fn table(&mut self, report: &TableReport) {
        tracing::info!(table = %report.table, rows = report.selected, predicate = %report.predicate,
            order_by = ?report.order_by, "--initial-backfill: rows selected in the slot's snapshot");
    }

    fn rows(&mut self, _done: u64, _total: u64) {}
}

/// Sleeps; true when shutdown was requested meanwhile.
async fn sleep_or_shutdown(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::time::timeout(delay, shutdown_requested(shutdown))
        .await
        .is_ok()
}
