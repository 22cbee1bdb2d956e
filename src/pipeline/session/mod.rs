//! One replication session: WAL events in, publishes out, the confirmed position back.
//!
//! ```text
//!             ┌──────────────────── driver (async, I/O) ─────────────────────┐
//!  WAL event ─▶ on_wal      ┌──────────── core (sync, no I/O) ───────────┐   │
//!  sent      ─▶ on_sent     │ mapping, poison rows, atomic batches,      │   │
//!  ack       ─▶ on_ack      │ refusals and restarts, the positions       │   │
//!  tick      ─▶ on_tick     └───────────────┬────────────────────────────┘   │
//!  shutdown  ─▶ on_shutdown                 ▼ poll_output                    │
//!             │   Publish / PublishBatch → sink · Report → PostgreSQL         │
//!             │   SaveCheckpoint → NATS KV · End(Shutdown | Restart)          │
//!             └──────────────────────────────────────────────────────────────┘
//! ```
//!
//! [`core`] decides; [`driver`] does. Every decision that bears on the guarantees — what is
//! published, skipped, re-sent, dead-lettered, fallen back, confirmed — is in the core and is
//! unit-tested there without servers; the driver only performs outputs and feeds back their
//! results, in order. What a session leaves to the next is its [`Carryover`].

mod core;
mod driver;
mod positions;

pub use core::{Carryover, SessionEnd, SessionStart};
pub use driver::{Session, Sink};
