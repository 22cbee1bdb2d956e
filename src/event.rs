//! An outbox event on its way: which row it is ([`EventRef`]) and the message made of it
//! ([`OutboxEvent`]). The pipeline makes both; the sink publishes the message and names the row
//! in its errors. Neither needs to know how the other works.

use std::fmt;
use std::sync::Arc;

use async_nats::{HeaderMap, HeaderValue, Subject};
use bytes::Bytes;

use crate::lsn::Lsn;

/// The headers outbox-cdc sets on every event. They win over user headers of the same name.
pub mod header {
    /// The event id: JetStream de-duplicates by it.
    pub use async_nats::header::NATS_MESSAGE_ID as MSG_ID;
    /// The commit LSN of the row's transaction (`X/Y`).
    pub const COMMIT_LSN: &str = "Outbox-Commit-Lsn";
    /// `schema.table` of the row.
    pub const TABLE: &str = "Outbox-Table";
    /// The commit time of the row's transaction, RFC 3339.
    pub const COMMIT_TIME: &str = "Outbox-Commit-Time";
    /// The row's place among the published rows of its transaction, from 0: with the commit
    /// LSN, the event's position in the WAL, which a restart resumes after.
    pub const ROW_INDEX: &str = "Outbox-Row-Index";
    /// Set (`true`) on events `outbox-cdc backfill` re-published from the table, which have no
    /// commit LSN.
    pub const BACKFILL: &str = "Outbox-Backfill";
}

/// Which row an event is: what a person needs to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef {
    pub event_id: String,
    /// `schema.table`; shared by every row of the table.
    pub table: Arc<str>,
    /// None when the row's subject could not be made.
    pub subject: Option<Subject>,
    /// Where the row's transaction committed.
    pub commit_lsn: Lsn,
    /// The row's place among the published rows of its transaction.
    pub row_index: u32,
}

impl EventRef {
    /// The subject as text, `-` when there is none.
    pub fn subject_str(&self) -> &str {
        self.subject.as_ref().map_or("-", |s| s.as_str())
    }
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event id `{}` (table `{}`, ", self.event_id, self.table)?;
        match &self.subject {
            Some(subject) => write!(f, "subject `{subject}`")?,
            None => f.write_str("subject unknown")?,
        }
        write!(f, ", commit LSN {})", self.commit_lsn)
    }
}

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub subject: Subject,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// The `Nats-Msg-Id` header's value, kept apart: the next publish into the same stream
    /// names it as its predecessor.
    pub id: HeaderValue,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_row_for_a_person() {
        let event = EventRef {
            event_id: "42".into(),
            table: Arc::from("public.outbox"),
            subject: Some(Subject::from("outbox.order.created")),
            commit_lsn: Lsn::new(0x1_0000_0010),
            row_index: 0,
        };
        assert_eq!(
            event.to_string(),
            "event id `42` (table `public.outbox`, subject `outbox.order.created`, commit LSN 1/10)"
        );
        let unknown = EventRef {
            subject: None,
            ..event
        };
        assert!(unknown.to_string().contains("subject unknown"));
        assert_eq!(unknown.subject_str(), "-");
    }
}
