//! The source: PostgreSQL's WAL, read through a logical replication slot with `pgoutput`.
//!
//! ```text
//!   Catalog (SQL, tokio-postgres)          ReplicationStream (pgwire-replication)
//!   ─ wal_level, publication, tables       ─ START_REPLICATION SLOT s LOGICAL 0/0
//!   ─ slot: create / check plugin            (proto_version 1, publication_names p)
//!   ─ who holds the slot                   ─ Begin, XLogData(bytes), Commit, Keepalive
//!                                          ─ confirm(lsn) → standby status updates
//! ```
//!
//! It owns the two connections to PostgreSQL, the names of the slot and publication, and the
//! pgoutput decoder. It knows nothing of NATS or of what a row means.
//!
//! **Invariant:** the flush position reported to the server only ever comes from
//! [`ReplicationStream::confirm`], and only the flush position moves the slot. `confirm` records
//! the position; the replication worker sends it every `status_interval` and at once when the
//! server asks. The caller must never confirm a position whose events are not durable
//! downstream: the server discards the WAL behind it.

mod catalog;
pub mod connection;
mod error;
mod liveness;
mod names;
pub mod pgoutput;
mod stream;
mod table;

use std::time::Duration;

pub use catalog::{
    Catalog, ExportedSnapshot, FAILOVER_SLOTS_SINCE, PrimaryFailover, ServerReadiness, SlotState,
    StandbyFailover,
};
pub use error::SourceError;
pub use names::{PublicationName, SlotName};
pub use stream::{PendingStream, ReplicationStream, ServerIdentity, TimelineAncestry, WalEvent};
pub use table::{Selection, TableQuery, TableReader, TextRow, quote_ident};

use connection::DatabaseUrl;

/// Where to read from and how.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub database: DatabaseUrl,
    pub slot: SlotName,
    pub publication: PublicationName,
    pub create_slot: bool,
    pub status_interval: Duration,
    /// A replication connection PostgreSQL no longer streams to, or that gets no answer for
    /// this long, is given up (see [`liveness`]).
    pub replication_timeout: Duration,
}
