//! The session's I/O around its core: reads the replication stream, publishes, awaits acks,
//! saves the checkpoint, watches the clock and the shutdown signal — and asks the core what each
//! result means.
//!
//! One deadline bounds everything after shutdown is asked for: the publish or checkpoint write
//! under way, the drain of the acks, the last checkpoint write, the last status update and the
//! replication connection's close all end by `--shutdown-timeout` after the request.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::core::{Carryover, InFlight, Output, SendResult, SessionCore, SessionEnd, SessionStart};
use crate::pipeline::progress::Progress;
use crate::pipeline::{Error, PipelineSettings, shutdown_requested};
use crate::sink::{ConnectionLost, JetStreamSink};
use crate::source::ReplicationStream;
use crate::stats::Stats;

/// The sink as a session uses it.
pub type Sink = JetStreamSink<InFlight>;

/// One replication session: runs until shutdown, a restart the core asks for, or an error.
pub struct Session<'a> {
    core: SessionCore<'a>,
    stream: ReplicationStream,
    sink: &'a mut Sink,
    progress: Progress,
    connection_lost: ConnectionLost,
    stop: Stop,
    status_interval: Duration,
}

/// When shutdown was asked for, and so the deadline of every wait after it.
#[derive(Debug, Clone, Copy)]
struct Stop {
    timeout: Duration,
    deadline: Option<Instant>,
}

impl Stop {
    fn request(&mut self) {
        self.deadline
            .get_or_insert_with(|| Instant::now() + self.timeout);
    }
}

impl<'a> Session<'a> {
    pub fn new(
        settings: &'a PipelineSettings,
        stats: &'a Stats,
        stream: ReplicationStream,
        sink: &'a mut Sink,
        progress: Progress,
        start: SessionStart,
        carry: Carryover,
    ) -> Self {
        Session {
            core: SessionCore::new(settings, stats, start, carry),
            stream,
            connection_lost: sink.connection_lost(),
            sink,
            progress,
            stop: Stop {
                timeout: settings.shutdown_timeout,
                deadline: None,
            },
            status_interval: settings.status_interval,
        }
    }

    /// Streams until `shutdown` turns true, a restart, or an error; returns what carries over
    /// to the next session with the outcome.
    pub async fn run(
        mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (Carryover, Result<SessionEnd, Error>) {
        let result = self.stream_events(shutdown).await;
        let Session {
            mut core,
            stream,
            mut progress,
            stop,
            ..
        } = self;
        if let Ok(end) = result {
            // A restart (to publish a dead letter in place, say) gets the same bound.
            let deadline = stop
                .deadline
                .unwrap_or_else(|| Instant::now() + stop.timeout);
            finish(&mut core, stream, &mut progress, end, deadline).await;
        }
        (core.into_carryover(), result)
    }

    async fn stream_events(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, Error> {
        // Proves to /healthz that this loop still turns, busy or idle; saves the checkpoint as
        // often as the position is reported, since nothing past it is.
        let mut heartbeat = tokio::time::interval(
            self.status_interval
                .clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            if let Some(end) = self.perform_outputs(shutdown).await? {
                return Ok(end);
            }
            if *shutdown.borrow() {
                self.stop.request();
            }
            if self.stop.deadline.is_some() {
                self.core.on_shutdown();
            }
            let deadline = self.stop.deadline;
            tokio::select! {
                biased;
                _ = shutdown_requested(shutdown), if deadline.is_none() => {
                    self.stop.request();
                    self.core.on_shutdown();
                    // What the client buffered goes out, so that its acks can come back.
                    if let Some(deadline) = self.stop.deadline {
                        let _ = tokio::time::timeout_at(deadline, self.sink.flush()).await;
                    }
                }
                () = sleep_until(deadline) => self.core.on_deadline(),
                err = self.connection_lost.wait() => return Err(err.into()),
                (published, outcome) = self.sink.next_ack(), if self.core.in_flight() > 0 => {
                    let outcome = match outcome {
                        Ok(ack) => Ok(ack),
                        Err(err) => Err(self.sink.ack_error(published.event.clone(), err).await),
                    };
                    self.core.on_ack(published, outcome)?;
                }
                _ = heartbeat.tick() => self.core.on_tick(Instant::now()),
                event = self.stream.next(), if self.core.wants_wal() => self.core.on_wal(event?)?,
            }
        }
    }

    /// Does what the core decided, feeding each result back, until it has nothing more to do
    /// now; the session's end when it came.
    async fn perform_outputs(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<SessionEnd>, Error> {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::End(end) => return Ok(Some(end)),
                Output::Report(lsn) => self.stream.confirm(lsn),
                Output::Publish { event, fenced } => {
                    let sent = self.sink.publish(event, fenced);
                    match until_deadline(sent, &mut self.stop, shutdown).await {
                        Some(sent) => self.core.on_sent(SendResult::One(sent))?,
                        None => self.core.on_deadline(),
                    }
                }
                Output::PublishBatch { events, fenced } => {
                    let sent = self.sink.publish_batch(events, fenced);
                    match until_deadline(sent, &mut self.stop, shutdown).await {
                        Some(sent) => self.core.on_sent(SendResult::Batch(sent))?,
                        None => self.core.on_deadline(),
                    }
                }
                Output::SaveCheckpoint(lsn) => {
                    let save = self.progress.save(lsn);
                    match until_deadline(save, &mut self.stop, shutdown).await {
                        Some(Ok(())) => self.core.on_saved(Some(lsn)),
                        Some(Err(err)) => return Err(err.into()),
                        None => {
                            self.core.on_saved(None);
                            self.core.on_deadline();
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

/// The last checkpoint write and status update. Ended cleanly, the walsender releases the slot
/// at once: the next session (or instance) need not wait for PostgreSQL to notice a dropped
/// connection.
async fn finish(
    core: &mut SessionCore<'_>,
    stream: ReplicationStream,
    progress: &mut Progress,
    end: SessionEnd,
    deadline: Instant,
) {
    if let Some(lsn) = core.positions().unsaved() {
        match tokio::time::timeout_at(deadline, progress.save(lsn)).await {
            Ok(Ok(())) => core.on_saved(Some(lsn)),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "could not save the checkpoint at the session's end")
            }
            Err(_) => tracing::warn!(
                "the checkpoint was not saved before the shutdown timeout (the next start reads again from the slot)"
            ),
        }
    }
    let told = core.positions().reportable();
    if let SessionEnd::Shutdown { drained: false } = end {
        tracing::warn!(in_flight = core.in_flight(), confirmed_lsn = %told,
            "shutdown timeout: publishes still awaiting their ack are sent again by the next start");
    }
    stream.finish(told, deadline).await;
}

/// Runs `io` to its end, unless shutdown is asked for meanwhile and its deadline passes first
/// (None).
async fn until_deadline<T>(
    io: impl Future<Output = T>,
    stop: &mut Stop,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<T> {
    tokio::pin!(io);
    loop {
        if let Some(deadline) = stop.deadline {
            return tokio::time::timeout_at(deadline, &mut io).await.ok();
        }
        tokio::select! {
            biased;
            out = &mut io => return Some(out),
            _ = shutdown_requested(shutdown) => stop.request(),
        }
    }
}

/// Resolves at `deadline`; never without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
