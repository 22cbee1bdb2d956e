//! Poison rows: rows that cannot be published as themselves — a row that cannot be mapped, a
//! payload over the server's `max_payload`, a subject no stream captures, a message JetStream
//! refuses. `--on-error fail` (the default) stops the process naming the row; `--on-error
//! dead-letter` publishes it to the dead-letter subject instead, with headers saying why, and
//! goes on. Never is one skipped silently.
//!
//! **A dead letter keeps its row's place in commit order.** The first two kinds are known before
//! the row is sent, and its dead letter is simply sent instead. The last two are only known when
//! JetStream answers, after later rows went out: such a row is remembered in [`RefusedRows`] and
//! the session restarts. The next session re-reads from the slot (nothing from the refused row
//! on was confirmed), publishes the dead letter where the row was, and re-sends the rows after
//! it — which fencing had made JetStream refuse, as their predecessor was not stored. The
//! transaction is confirmed only once its dead letter is acked. (Other modules refer here for
//! this rationale.)

use std::collections::BTreeMap;

use async_nats::header::HeaderValue;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;

use crate::event::{EventRef, OutboxEvent, header};
use crate::lsn::Lsn;

pub const HEADER_ERROR: &str = "Outbox-Error";
pub const HEADER_ERROR_KIND: &str = "Outbox-Error-Kind";
pub const HEADER_ORIGINAL_SUBJECT: &str = "Outbox-Original-Subject";
pub const HEADER_EVENT_ID: &str = "Outbox-Event-Id";
pub const HEADER_PAYLOAD_SIZE: &str = "Outbox-Payload-Size";

/// What to do with a row that cannot be published as itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ErrorPolicy {
    /// Stop with a message naming the row; a restart meets it again until it is fixed.
    #[default]
    Fail,
    /// Publish it to this subject, with the reason in headers, and go on.
    DeadLetter { subject: String },
}

/// Why a row went to the dead-letter subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonKind {
    /// NULL subject placeholder, invalid subject, headers not a JSON object, …
    Unmappable,
    /// Payload over the server's max_payload.
    TooLarge,
    /// No stream captures the subject.
    NoStream,
    /// JetStream refused the message itself (e.g. headers over 64 KiB).
    Rejected,
}

impl PoisonKind {
    /// Every kind: the `kind` label values of `poison_rows_total`, each exposed at 0 from the
    /// start (see [`crate::stats`]).
    pub const ALL: [PoisonKind; 4] = [
        PoisonKind::Unmappable,
        PoisonKind::TooLarge,
        PoisonKind::NoStream,
        PoisonKind::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PoisonKind::Unmappable => "unmappable",
            PoisonKind::TooLarge => "too_large",
            PoisonKind::NoStream => "no_stream",
            PoisonKind::Rejected => "rejected",
        }
    }
}

/// A poison row, as much as is known of it.
#[derive(Debug, Clone)]
pub struct PoisonRow {
    pub kind: PoisonKind,
    pub reason: String,
    pub event: EventRef,
    /// The original body; published along when it fits.
    pub payload: Bytes,
    /// The original body's size (the body itself may be unavailable, e.g. when it is too large).
    pub payload_size: usize,
}

impl PoisonRow {
    /// `payload` is the original body as far as it could be read.
    pub fn new(kind: PoisonKind, reason: String, event: EventRef, payload: Bytes) -> Self {
        PoisonRow {
            kind,
            reason,
            event,
            payload_size: payload.len(),
            payload,
        }
    }

    /// The dead-letter message. Its `Nats-Msg-Id` is derived from the event id, so a replay
    /// after a restart is de-duplicated like any event. A payload over `max_payload` is left out
    /// (its size is in a header).
    pub fn into_dead_letter(self, subject: &str, max_payload: usize) -> OutboxEvent {
        let event = &self.event;
        let mut headers = HeaderMap::new();
        let id = header_value(&format!("dead-letter:{}", event.event_id));
        headers.insert(header::MSG_ID, id.clone());
        headers.insert(HEADER_ERROR_KIND, self.kind.as_str());
        headers.insert(HEADER_ERROR, header_value(&self.reason));
        headers.insert(HEADER_EVENT_ID, header_value(&event.event_id));
        headers.insert(header::TABLE, header_value(&event.table));
        headers.insert(
            header::COMMIT_LSN,
            header_value(&event.commit_lsn.to_string()),
        );
        headers.insert(
            header::ROW_INDEX,
            itoa::Buffer::new().format(event.row_index),
        );
        if let Some(original) = &event.subject {
            headers.insert(HEADER_ORIGINAL_SUBJECT, header_value(original.as_str()));
        }
        headers.insert(
            HEADER_PAYLOAD_SIZE,
            header_value(&self.payload_size.to_string()),
        );
        // Headers count against max_payload too; leave them generous room.
        let payload = if self.payload.len() + 4096 <= max_payload {
            self.payload
        } else {
            Bytes::new()
        };
        OutboxEvent {
            subject: Subject::from(subject),
            headers,
            payload,
            id,
        }
    }
}

/// Rows JetStream refused at their ack, remembered across sessions of this process by commit
/// LSN and event id, so that the next session dead-letters them in their place.
#[derive(Debug, Default)]
pub struct RefusedRows {
    by_commit: BTreeMap<Lsn, Vec<RefusedRow>>,
}

#[derive(Debug)]
struct RefusedRow {
    event_id: String,
    kind: PoisonKind,
    reason: String,
}

impl RefusedRows {
    pub fn insert(&mut self, commit_lsn: Lsn, event_id: String, kind: PoisonKind, reason: String) {
        self.by_commit
            .entry(commit_lsn)
            .or_default()
            .push(RefusedRow {
                event_id,
                kind,
                reason,
            });
    }

    /// Why the row `event_id` of the transaction committed at `commit_lsn` was refused, if it was.
    pub fn get(&self, commit_lsn: Lsn, event_id: &str) -> Option<(PoisonKind, &str)> {
        if self.by_commit.is_empty() {
            return None;
        }
        self.by_commit
            .get(&commit_lsn)?
            .iter()
            .find(|row| row.event_id == event_id)
            .map(|row| (row.kind, row.reason.as_str()))
    }

    /// Forgets the rows of transactions that committed before `lsn`: no session reads them again.
    pub fn forget_before(&mut self, lsn: Lsn) {
        self.by_commit = self.by_commit.split_off(&lsn);
    }
}

/// A header value from any text: line breaks and other control characters become spaces,
/// and very long text is cut, so the dead letter itself is always publishable.
fn header_value(text: &str) -> HeaderValue {
    const MAX: usize = 1024;
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() > MAX {
        let mut cut = MAX;
        while !clean.is_char_boundary(cut) {
            cut -= 1;
        }
        clean.truncate(cut);
        clean.push('…');
    }
    HeaderValue::from(clean.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(payload: &'static [u8]) -> PoisonRow {
        PoisonRow {
            kind: PoisonKind::Unmappable,
            reason: "subject placeholder `{event_type}` is NULL\r\nsecond line".into(),
            event: EventRef {
                event_id: "42".into(),
                table: "public.outbox".into(),
                subject: None,
                commit_lsn: Lsn::new(0x1_0000_0010),
                row_index: 3,
            },
            payload: Bytes::from_static(payload),
            payload_size: payload.len(),
        }
    }

    #[test]
    fn carries_the_reason_table_id_lsn_and_payload() {
        let event = row(b"{\"a\":1}").into_dead_letter("outbox.dead", 1 << 20);
        assert_eq!(event.subject.as_str(), "outbox.dead");
        assert_eq!(event.payload.as_ref(), b"{\"a\":1}");
        let h = |name: &str| event.headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            h(header::MSG_ID.as_ref()).as_deref(),
            Some("dead-letter:42")
        );
        assert_eq!(h(HEADER_ERROR_KIND).as_deref(), Some("unmappable"));
        assert_eq!(
            h(HEADER_ERROR).as_deref(),
            Some("subject placeholder `{event_type}` is NULL  second line")
        );
        assert_eq!(h(HEADER_EVENT_ID).as_deref(), Some("42"));
        assert_eq!(h(header::TABLE).as_deref(), Some("public.outbox"));
        assert_eq!(h(header::COMMIT_LSN).as_deref(), Some("1/10"));
        assert_eq!(h(header::ROW_INDEX).as_deref(), Some("3"));
        assert_eq!(h(HEADER_ORIGINAL_SUBJECT), None);
        assert_eq!(h(HEADER_PAYLOAD_SIZE).as_deref(), Some("7"));
    }

    #[test]
    fn leaves_out_a_payload_that_would_not_fit() {
        let event = row(&[b'x'; 5000]).into_dead_letter("dlq", 8192);
        assert!(event.payload.is_empty());
        assert_eq!(
            event.headers.get(HEADER_PAYLOAD_SIZE).map(|v| v.as_str()),
            Some("5000")
        );
    }

    #[test]
    fn refused_rows_are_found_by_commit_and_id_until_forgotten() {
        let mut refused = RefusedRows::default();
        assert_eq!(refused.get(Lsn::new(10), "a"), None);
        refused.insert(
            Lsn::new(10),
            "a".into(),
            PoisonKind::NoStream,
            "no stream".into(),
        );
        refused.insert(
            Lsn::new(10),
            "b".into(),
            PoisonKind::Rejected,
            "too big".into(),
        );
        refused.insert(
            Lsn::new(20),
            "a".into(),
            PoisonKind::Rejected,
            "again".into(),
        );
        assert_eq!(
            refused.get(Lsn::new(10), "b"),
            Some((PoisonKind::Rejected, "too big"))
        );
        assert_eq!(refused.get(Lsn::new(10), "c"), None);
        assert_eq!(refused.get(Lsn::new(15), "a"), None);
        refused.forget_before(Lsn::new(11));
        assert_eq!(refused.get(Lsn::new(10), "a"), None);
        assert_eq!(
            refused.get(Lsn::new(20), "a"),
            Some((PoisonKind::Rejected, "again"))
        );
        refused.forget_before(Lsn::new(21));
        assert_eq!(refused.get(Lsn::new(20), "a"), None);
    }

    #[test]
    fn header_values_are_cleaned_and_bounded() {
        let long = "é".repeat(2000);
        let value = header_value(&long);
        assert!(value.as_str().len() <= 1024 + '…'.len_utf8());
        assert!(value.as_str().ends_with('…'));
        assert_eq!(header_value("a\nb\tc").as_str(), "a b c");
    }
}
