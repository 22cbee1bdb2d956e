//! outbox-cdc: publishes a PostgreSQL outbox table to NATS JetStream from the WAL.
//!
//! Data flows one way: [`source`] (logical replication, pgoutput) → [`pipeline`] (ordering,
//! ack-gated LSN confirmation) → [`sink`] (JetStream), with [`mapping`] turning rows into
//! messages. [`run`] supervises sessions: reconnects, standby, shutdown.

pub mod admin;
pub mod config;
pub mod dead_letter;
pub mod demo;
pub mod embedded;
mod error;
pub mod http;
pub mod lsn;
pub mod mapping;
pub mod pipeline;
pub mod run;
pub mod secret;
pub mod sink;
pub mod source;
pub mod stats;
pub mod subject_map;
pub mod tls;

pub use error::Error;
pub use lsn::Lsn;
