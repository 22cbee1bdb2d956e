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

use super::RunConfig;
use super::backfill::{self, BackfillConfig, Rows, TableReport};
use super::continuity::{self, Gap, Published};
use super::error::Error;
use super::mapping::TableMapping;
use super::messages::MessageMapping;
use super::progress::{Progress, ProgressRecord};
use super::replay::ReplayHold;
use super::session::{Carryover, Session, SessionEnd, SessionStart, Sink};
use crate::lsn::Lsn;
use crate::sink::{Checkpoint, SinkError};
use crate::source::{Catalog, PendingStream, ReplicationStream, SlotState, SourceError};
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
        carry: Carryover::new(ReplayHold::new(config.replay.window, Lsn::ZERO)),
        accept_gap: config.accept_gap,
        config,
        stats,
        catalog: None,
        progress: Lsn::ZERO,
        skip_before: Lsn::ZERO,
        streamed: false,
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
            // Not a failure: the next session publishes a dead letter in its row's place.
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
    stats: &'a Stats,
    catalog: Option<Catalog>,
    /// The newest position known durable downstream in this process (never below the slot's).
    progress: Lsn,
    /// What PostgreSQL is told (held back by the replay window), and rows to dead-letter in place.
    carry: Carryover,
    /// Transactions that committed before this are not published again.
    skip_before: Lsn,
    /// A session has streamed: --start-lsn and the checkpoint applied to the first one.
    streamed: bool,
    /// The last session reached streaming.
    streamed_this_session: bool,
    /// `--accept-gap`, until a session has streamed past the gap it accepted.
    accept_gap: bool,
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
        self.streamed = true;
        self.streamed_this_session = true;
        self.accept_gap = false;
        if self.role != Role::Leader {
            tracing::info!(slot = %self.config.source.slot, from = %self.progress,
                "took the replication slot: this instance is the leader and streams");
            self.role = Role::Leader;
            self.stats.set_role(crate::stats::Role::Leader);
        }
        let session = Session::new(
            &self.config.pipeline,
            stream,
            &mut sink,
            self.stats,
            start,
            &mut self.carry,
            progress,
        );
        let (progress, result) = session.run(shutdown).await;
        self.progress = self.progress.max(progress);
        result
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
        // Check the mapping against every published table before streaming, so a wrong flag
        // fails at start rather than at the first event.
        let prefixes = &self.config.pipeline.message_prefixes;
        let tables = if prefixes.is_empty() {
            catalog.publication_tables(&source.publication).await?
        } else {
            catalog.published_tables(&source.publication).await?
        };
        let qualify_ids = tables.len() + prefixes.len() > 1;
        for table in &tables {
            TableMapping::bind(&self.config.pipeline.mapping, table, qualify_ids)?;
        }
        let messages = prefixes
            .iter()
            .enumerate()
            .map(|(i, prefix)| {
                // Relation ids no table has (OIDs are far below).
                let id = u32::MAX - i as u32;
                MessageMapping::bind(&self.config.pipeline.mapping, prefix, id, qualify_ids)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if qualify_ids && !self.streamed {
            tracing::info!(tables = ?tables.iter().map(|t| t.qualified_name()).collect::<Vec<_>>(),
                "the publication has several tables: event ids (Nats-Msg-Id) are `schema.table:<id>`, so theirs cannot collide");
        }
        let slot_state = catalog.slot_state(&source.slot).await?;
        if let Some(state) = &slot_state {
            catalog.check_slot(&source.slot, state)?;
            if let Some(pid) = state.active_pid {
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
        let (mut checkpoint, saved) = Checkpoint::open(
            sink.context(),
            bucket,
            source.slot.as_str(),
            sink.replicas(),
        )
        .await?;
        let mut record = saved
            .map(|value| ProgressRecord::decode(&value))
            .transpose()
            .map_err(|detail| SinkError::Checkpoint {
                bucket: bucket.clone(),
                detail: format!("key `{}`: {detail}", source.slot),
            })?;
        let mut slot_state = slot_state;
        if record.as_ref().is_some_and(|r| r.initial_backfill_pending) {
            // The slot has not streamed: it can go, and the switch begin again.
            slot_state = self
                .restart_initial_backfill(catalog, slot_state.is_some())
                .await?;
            record = None;
        }
        let published = Published {
            stream_end: sink.stream_end(),
            record: record.clone(),
        };
        let mut gap_accepted = false;
        let slot = match slot_state {
            Some(state) => {
                let slot_lsn = state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
                gap_accepted |= self.gate(continuity::slot_position(
                    &source.slot,
                    slot_lsn,
                    &published,
                ))?;
                state
            }
            None => {
                let missing = || SourceError::SlotMissing {
                    slot: source.slot.to_string(),
                    create_sql: catalog.create_slot_sql(&source.slot),
                };
                if !source.create_slot {
                    return Err(missing().into());
                }
                gap_accepted |=
                    self.gate(continuity::before_creating_slot(&source.slot, &published))?;
                match &self.config.initial_backfill {
                    Some(predicate) => {
                        self.initial_backfill(catalog, &mut checkpoint, predicate)
                            .await?;
                        // The streams hold the backfilled rows now: fence after them.
                        sink.prepare(&self.config.sink).await?;
                    }
                    None => catalog.create_slot(&source.slot).await?,
                }
                let state = catalog
                    .slot_state(&source.slot)
                    .await?
                    .ok_or_else(missing)?;
                catalog.check_slot(&source.slot, &state)?;
                state
            }
        };
        self.warn_without_failover(catalog.has_failover_slots(), &slot);
        let slot_lsn = slot.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
        let replay = &self.config.replay;
        if !self.streamed {
            if let Some(start) = replay.start_lsn
                && start < slot_lsn
            {
                return Err(SourceError::StartLsnUnavailable {
                    slot: source.slot.to_string(),
                    requested: start,
                    oldest: slot_lsn,
                }
                .into());
            }
            let saved = record.as_ref().map(|r| r.lsn).filter(|_| !gap_accepted);
            self.skip_before = replay.start_lsn.or(saved).unwrap_or(Lsn::ZERO);
            self.carry.hold = ReplayHold::new(replay.window, slot_lsn);
            tracing::info!(slot_confirmed_lsn = %slot_lsn, checkpoint = ?saved.map(|l| l.to_string()),
                stream_end = ?published.stream_end.as_ref().map(|e| e.commit_lsn.to_string()),
                skip_before = %self.skip_before, "start position");
        }
        self.progress = self.progress.max(slot_lsn);
        self.skip_before = self.skip_before.max(self.progress);
        self.carry.refused.forget_before(self.skip_before);

        let mut pending =
            ReplicationStream::connect(&source, self.carry.hold.released(), catalog).await?;
        gap_accepted |= self.check_history(&mut pending, &published).await?;
        let identity = pending.identity();
        // The record goes on from what it said, unless a gap was accepted: then from the slot.
        let lsn = match &record {
            Some(record) if !gap_accepted => record.lsn.max(slot_lsn),
            _ => slot_lsn,
        };
        let progress = Progress::start(
            checkpoint,
            ProgressRecord {
                lsn,
                system_id: Some(identity.system_id.clone()),
                timeline: Some(identity.timeline),
                initial_backfill_pending: false,
            },
        )
        .await?;
        let stream = pending.start().await?;
        Ok(Ready {
            stream,
            sink,
            progress,
            start: SessionStart {
                progress: self.progress,
                skip_before: self.skip_before,
                tables: tables
                    .iter()
                    .map(|t| t.qualified_name())
                    .collect::<HashSet<_>>(),
                qualify_ids,
                messages,
            },
        })
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
            mapping: self.config.pipeline.mapping.clone(),
            on_error: self.config.pipeline.on_error.clone(),
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

    /// A slot created for `--initial-backfill` whose rows were not all published (the process
    /// ended): it never streamed, so it is dropped and the switch begins again.
    async fn restart_initial_backfill(
        &self,
        catalog: &Catalog,
        slot_exists: bool,
    ) -> Result<Option<SlotState>, Error> {
        let slot = &self.config.source.slot;
        if self.config.initial_backfill.is_none() {
            return Err(SourceError::Query {
                context: format!("replication slot `{slot}`"),
                detail: format!(
                    "an --initial-backfill did not finish: start again with the same \
                     --initial-backfill (it drops the slot, which never streamed, and begins \
                     again), or drop the slot (`SELECT pg_drop_replication_slot('{slot}');`)"
                ),
                transient: false,
            }
            .into());
        }
        if slot_exists {
            tracing::warn!(slot = %slot,
                "an --initial-backfill did not finish: dropping its slot, which never streamed, and beginning again");
            catalog
                .apply(&format!("SELECT pg_drop_replication_slot('{slot}')"))
                .await?;
        }
        Ok(None)
    }

    /// The server's history must hold what was published (see [`continuity::history`]).
    async fn check_history(
        &mut self,
        pending: &mut PendingStream,
        published: &Published,
    ) -> Result<bool, Error> {
        let current = pending.identity().timeline;
        let ancestry = match published.record.as_ref().and_then(|r| r.timeline) {
            Some(timeline) if timeline != current => Some(pending.ancestry(timeline).await?),
            _ => None,
        };
        if let Some(ancestry) = ancestry {
            tracing::info!(
                timeline = current,
                ?ancestry,
                "the database is on another timeline than when outbox-cdc last confirmed (a failover or a restore)"
            );
        }
        self.gate(continuity::history(pending.identity(), ancestry, published))
    }

    /// A gap stops the process, unless `--accept-gap` accepts it (true) this once.
    fn gate(&self, found: Result<(), Box<Gap>>) -> Result<bool, Error> {
        match found {
            Ok(()) => Ok(false),
            Err(gap) if self.accept_gap => {
                tracing::warn!(%gap, "--accept-gap: going on past the gap");
                Ok(true)
            }
            Err(gap) => Err(gap.into()),
        }
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

/// The initial backfill's progress, in the log.
struct LoggedProgress;

impl backfill::Progress for LoggedProgress {
    fn table(&mut self, report: &TableReport) {
        tracing::info!(table = %report.table, rows = report.selected, predicate = %report.predicate,
            order_by = ?report.order_by, "--initial-backfill: rows selected in the slot's snapshot");
    }

    fn rows(&mut self, _done: u64, _total: u64) {}
}

/// Resolves once shutdown is requested; never when nobody can request it any more.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sleeps; true when shutdown was requested meanwhile.
async fn sleep_or_shutdown(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::time::timeout(delay, shutdown_requested(shutdown))
        .await
        .is_ok()
}
