//! The supervisor: checks, then replication sessions until shutdown.
//!
//! A session is one NATS connection plus one `START_REPLICATION`. Transient failures (a lost
//! connection, an ack timeout, a server restart) end the session; the next one starts after an
//! exponential backoff from the slot's confirmed position, so nothing is lost and JetStream
//! de-duplicates what is re-sent. Permanent failures (bad configuration, an unmappable row, no
//! stream for a subject) end the process with a message saying what to fix.
//!
//! Leader election is the slot itself: PostgreSQL lets one connection stream from a slot. An
//! instance that finds it busy (SQLSTATE 55006) is a standby and retries every `standby_retry`.

use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tokio::sync::watch;

use super::RunConfig;
use super::error::Error;
use super::mapping::TableMapping;
use super::replay::ReplayHold;
use super::session::{Carryover, Session, SessionEnd, SessionStart, Sink};
use crate::lsn::Lsn;
use crate::sink::Checkpoint;
use crate::source::{Catalog, ReplicationStream, SourceError};
use crate::stats::Stats;

/// A session that ran this long resets the backoff: it was not failing in a loop.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

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
        config,
        stats,
        catalog: None,
        progress: Lsn::ZERO,
        skip_before: Lsn::ZERO,
        streamed: false,
        role: Role::Starting,
    };
    let mut delays = backoff();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        match supervisor.session(&mut shutdown).await {
            Ok(SessionEnd::Shutdown { drained }) => {
                tracing::info!(
                    confirmed_lsn = %supervisor.carry.hold.released(),
                    last_acked_commit_lsn = %Lsn::new(stats.last_acked_commit_lsn.get()),
                    drained,
                    published = stats.published.get(),
                    duplicates = stats.duplicates.get(),
                    "stopped"
                );
                return Ok(());
            }
            // Not a failure: the backoff is left as it is.
            Ok(SessionEnd::Restart) => {}
            Err(Error::Source(SourceError::SlotBusy { slot, pid })) => {
                supervisor.standby(&slot, pid);
                if sleep_or_shutdown(supervisor.config.standby_retry, &mut shutdown).await {
                    return Ok(());
                }
            }
            Err(err) if err.is_transient() => {
                // Its connection may be what failed, or share a stuck network path with it: the
                // next session opens a fresh one.
                supervisor.catalog = None;
                if started.elapsed() >= HEALTHY_SESSION {
                    delays = backoff();
                }
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
    role: Role,
}

impl Supervisor<'_> {
    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<SessionEnd, Error> {
        let source = &self.config.source;
        let catalog = match self.catalog.take() {
            Some(catalog) if !catalog.is_closed() => catalog,
            _ => Catalog::connect(&source.database).await?,
        };
        let catalog = self.catalog.insert(catalog);
        catalog.check_wal_level().await?;
        // Check the mapping against every published table before streaming, so a wrong flag
        // fails at start rather than at the first event.
        for table in catalog.publication_tables(&source.publication).await? {
            TableMapping::bind(&self.config.pipeline.mapping, &table)?;
        }
        let slot = catalog
            .ensure_slot(&source.slot, source.create_slot)
            .await?;
        if let Some(pid) = slot.active_pid {
            return Err(SourceError::SlotBusy {
                slot: source.slot.to_string(),
                pid: Some(pid),
            }
            .into());
        }
        let slot_lsn = slot.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
        let replay = &self.config.replay;
        if !self.streamed
            && let Some(start) = replay.start_lsn
            && start < slot_lsn
        {
            return Err(SourceError::StartLsnUnavailable {
                slot: source.slot.to_string(),
                requested: start,
                oldest: slot_lsn,
            }
            .into());
        }

        let mut sink = Sink::connect(&self.config.sink).await?;
        sink.prepare(&self.config.sink).await?;
        let (checkpoint, saved) = if replay.window.is_zero() {
            (None, None)
        } else {
            let (checkpoint, saved) = Checkpoint::open(
                sink.context(),
                &replay.checkpoint_bucket,
                source.slot.as_str(),
            )
            .await?;
            (Some(checkpoint), saved)
        };
        if !self.streamed {
            self.skip_before = match (replay.start_lsn, saved) {
                (Some(start), _) => start,
                (None, Some(saved)) => saved,
                (None, None) => Lsn::ZERO,
            };
            self.carry.hold = ReplayHold::new(replay.window, slot_lsn);
            tracing::info!(slot_confirmed_lsn = %slot_lsn, checkpoint = ?saved.map(|l| l.to_string()),
                skip_before = %self.skip_before, "start position");
        }
        self.progress = self.progress.max(slot_lsn);
        self.skip_before = self.skip_before.max(self.progress);
        self.carry.refused.forget_before(self.skip_before);

        let stream = ReplicationStream::start(source, self.carry.hold.released(), catalog).await?;
        self.streamed = true;
        if self.role != Role::Leader {
            tracing::info!(slot = %source.slot, from = %slot_lsn,
                "took the replication slot: this instance is the leader and streams");
            self.role = Role::Leader;
            self.stats.set_role(crate::stats::Role::Leader);
        }
        let start = SessionStart {
            progress: self.progress,
            skip_before: self.skip_before,
        };
        let session = Session::new(
            &self.config.pipeline,
            stream,
            &mut sink,
            self.stats,
            start,
            &mut self.carry,
            checkpoint,
        );
        let (progress, result) = session.run(shutdown).await;
        self.progress = self.progress.max(progress);
        result
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

/// Sleeps; true when shutdown was requested meanwhile.
async fn sleep_or_shutdown(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    match tokio::time::timeout(delay, shutdown.wait_for(|stop| *stop)).await {
        Ok(Ok(_)) => true,
        // Nobody can request shutdown any more: just sleep.
        Ok(Err(_)) => {
            tokio::time::sleep(delay).await;
            false
        }
        Err(_elapsed) => false,
    }
}
