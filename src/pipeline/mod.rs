//! The pipeline: WAL events in from the [`source`](crate::source), JetStream publishes out to
//! the [`sink`](crate::sink), and the position PostgreSQL may discard WAL up to back to the
//! source.
//!
//! ```text
//!  ReplicationStream ──WalEvent──▶ decode ─▶ mapping ─▶ (poison?) ─▶ JetStreamSink::publish
//!         ▲                                                              │ acks, in publish order
//!         └──────── confirm(lsn) ◀── ReplayHold ◀── Watermark ◀──────────┘
//! ```
//!
//! It owns what a row means ([`mapping`]: outbox row → message), what happens to a row that
//! cannot be published as itself ([`poison`]), the sessions and their supervision
//! ([`supervisor`]: reconnects, standby, shutdown), and the confirmed position.
//!
//! Invariants:
//! - Publishes are issued in WAL order (transactions in commit order, rows in transaction order)
//!   on one connection, and their acks are consumed in that same order.
//! - At most `max_in_flight` publishes await their ack. A transaction larger than that streams
//!   through; memory is bounded by the window, not by the transaction.
//! - The confirmed LSN is the end LSN of the newest transaction whose every row is acked — never
//!   more ([`Watermark`]). With nothing in flight and no transaction open, it may also follow the
//!   server's keepalive position, so that an idle outbox on a busy database does not pin WAL.
//! - A row is published as itself, as its dead letter in its place, or the process stops: it is
//!   never skipped.

mod atomic;
pub mod backfill;
mod continuity;
mod error;
pub mod mapping;
pub mod messages;
pub mod poison;
mod progress;
mod replay;
mod session;
mod start;
mod supervisor;
mod watermark;

use std::time::Duration;

pub use atomic::Fallback;
pub use continuity::Gap;
pub use error::{Disposition, Error};
pub use progress::ProgressRecord;
pub use supervisor::run;
pub use watermark::Watermark;

use crate::lsn::Lsn;
use crate::sink::SinkConfig;
use crate::source::SourceConfig;
use mapping::Mappings;

/// What the pipeline does with rows.
#[derive(Debug)]
pub struct PipelineSettings {
    /// Each table's mapping and poison-row policy (the table-less messages take the flags').
    pub mappings: Mappings,
    pub max_in_flight: usize,
    pub shutdown_timeout: Duration,
    /// How often the confirmed position is reported (`--status-interval`): the checkpoint is
    /// saved as often, as nothing past it is reported.
    pub status_interval: Duration,
    /// Logical decoding messages with these prefixes are events (see [`messages`]).
    pub message_prefixes: Vec<String>,
    /// A logical decoding message with this prefix annotates the events of its transaction
    /// that follow it (see [`messages`]).
    pub annotation_prefix: Option<String>,
    /// With `--atomic-transactions`, the most events one atomic batch holds.
    pub atomic_max_batch: Option<usize>,
}

/// Everything `run` needs, checked.
#[derive(Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub sink: SinkConfig,
    pub pipeline: PipelineSettings,
    pub standby_retry: Duration,
    pub replay: ReplayConfig,
    /// Go on past the gap found at start (see [`continuity`]), once.
    pub accept_gap: bool,
    /// When the slot is created: publish the rows this SQL condition selects in the slot's
    /// snapshot first (the switch from a polling relay).
    pub initial_backfill: Option<String>,
}

/// Where to start and how much history to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayConfig {
    pub start_lsn: Option<Lsn>,
    pub window: Duration,
    pub checkpoint_bucket: String,
}

/// Resolves once shutdown is requested; never when nobody can request it any more (a closed
/// channel would otherwise resolve at once, every time, and spin a loop that awaits it).
pub(crate) async fn shutdown_requested(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}
