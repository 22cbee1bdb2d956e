//! outbox-cdc: publishes a PostgreSQL outbox table to NATS JetStream from the WAL.
//!
//! ```text
//!  PostgreSQL ──WAL──▶ source ──WalEvent──▶ pipeline ──OutboxEvent──▶ sink ──▶ JetStream
//!   (slot)            (pgoutput)         (map, order,               (publish,
//!     ▲                                   watermark)                 acks in order)
//!     └──────────── confirm(lsn): end of the newest fully acked transaction ◀──┘
//! ```
//!
//! Data flows one way. [`source`] and [`sink`] know nothing of each other or of the pipeline;
//! [`pipeline`] ties them together; [`commands`] is the command line on top. Beneath them all are
//! the domain types ([`lsn`], [`event`], [`subject`]) and two helpers ([`secret`], [`tls`]);
//! beside them [`stats`] and [`http`] (metrics and health) and [`embedded`] (throwaway servers
//! for the demo, tests and benchmarks).

pub mod commands;
pub mod embedded;
pub mod event;
pub mod http;
pub mod lsn;
pub mod pipeline;
pub mod secret;
pub mod sink;
pub mod source;
pub mod stats;
pub mod subject;
pub mod tls;

pub use lsn::Lsn;

/// The version `--version` and the start-up log line name, with the commit it was built from
/// (`unknown` outside a git checkout; see `build.rs`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("OUTBOX_CDC_COMMIT"),
    ")"
);
