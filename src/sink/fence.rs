//! Fencing: every publish names the message its stream must hold last.
//!
//! Events go out pipelined, many before the first ack. If one of them is lost on the way while a
//! later one is stored — a JetStream cluster whose stream leader changes can drop a proposal it
//! had not replicated, while the next message reaches the new leader — the re-send after the
//! session restarts would land behind its successor: out of commit order. De-duplication cannot
//! help, because the lost message was never stored.
//!
//! So each publish carries `Nats-Expected-Last-Msg-Id`: the `Nats-Msg-Id` of the publish before
//! it into the same stream. JetStream checks it in stream order and refuses the message (error
//! 10070, "wrong last msg ID") when its predecessor is not the stream's last message. Every
//! publish after a lost one is refused the same way, the session restarts from the slot, and
//! order holds. JetStream checks for a duplicate before the expectation, so re-sent events are
//! still acked as duplicates.
//!
//! The first publish into a stream in a session expects the stream's last message when the
//! session started (none in an empty stream), so the chain goes on across sessions; when that
//! fails because another publisher wrote in between, the session restarts and sends the event
//! without an expectation (every publish before it was acked, so it is in order). Which stream a subject goes to is read from the streams'
//! subject filters when the session starts; a subject no known stream captures goes out
//! unfenced (and its ack says whether any stream took it).
//!
//! Fencing also makes each stream a record of how far it got: every event in it follows its
//! predecessor, so everything before its last event is in it too. When a session starts, each
//! stream's last event is read, and what the session reads again up to that event's position
//! (commit LSN and row index) is not sent again ([`Fence::already_stored`]). Exactly-once then
//! does not depend on JetStream's duplicate window, nor on how long a restart takes;
//! de-duplication by `Nats-Msg-Id` stays as the second line.
//!
//! Fencing needs the outbox's streams to be written by outbox-cdc alone: another publisher's
//! message in between makes the next publish fail the check. That is survivable (the session
//! restarts and the first publish goes out unfenced) but costs a restart each time, so streams
//! shared with other publishers run with `--no-fencing`.

use async_nats::{HeaderMap, HeaderValue};

use crate::event::{EventRef, header};
use crate::lsn::Lsn;
use crate::subject::SubjectFilter;

/// A stream as a session starts: its name, its subjects and its last message, if any.
#[derive(Debug, Clone)]
pub struct StreamSummary {
    pub name: String,
    pub subjects: Vec<String>,
    pub last: Option<StoredEvent>,
    /// The stream sequence of its last message (0 when it never held one).
    pub last_sequence: u64,
    /// The stream takes atomic batches (`allow_atomic`).
    pub allow_atomic: bool,
}

/// What a stored message says of the event it carries (outbox-cdc's headers), as far as it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub msg_id: Option<String>,
    /// None when the message is not outbox-cdc's.
    pub commit_lsn: Option<Lsn>,
    /// None on messages outbox-cdc did not publish from the WAL (a backfill's, a foreign one).
    pub row_index: Option<u32>,
    pub commit_time: Option<String>,
}

impl StoredEvent {
    /// What the message says, trusting only what outbox-cdc writes: a WAL position only on an
    /// event published from the WAL — never on one `backfill` re-published from the table
    /// (`Outbox-Backfill`), whose other `Outbox-` headers, if any, came from its row.
    pub fn from_headers(headers: &HeaderMap) -> StoredEvent {
        let text = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        let from_wal = headers.get(header::BACKFILL).is_none();
        StoredEvent {
            msg_id: text(header::MSG_ID.as_ref()),
            commit_lsn: text(header::COMMIT_LSN)
                .and_then(|t| t.parse().ok())
                .filter(|_| from_wal),
            row_index: text(header::ROW_INDEX)
                .and_then(|t| t.parse().ok())
                .filter(|_| from_wal),
            commit_time: text(header::COMMIT_TIME).filter(|_| from_wal),
        }
    }

    /// Whether `event` is at or before this one in the WAL.
    fn covers(&self, event: &EventRef) -> bool {
        let Some(stored) = self.commit_lsn else {
            return false;
        };
        match event.commit_lsn.cmp(&stored) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Equal => self.row_index.is_some_and(|r| event.row_index <= r),
            std::cmp::Ordering::Greater => false,
        }
    }
}

/// The newest outbox event any stream holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEnd {
    pub stream: String,
    pub commit_lsn: Lsn,
    pub commit_time: Option<String>,
}

/// The streams publishes may go to, and the last message id sent into each in this session.
#[derive(Debug, Default)]
pub struct Fence {
    streams: Vec<FencedStream>,
    /// The stream of the previous publish: most publishes go where the one before went.
    recent: usize,
}

#[derive(Debug)]
struct FencedStream {
    name: String,
    filters: Vec<SubjectFilter>,
    last_sent: Option<HeaderValue>,
    /// The stream's last message when the session started.
    stored: Option<StoredEvent>,
    /// The sequence the stream's last message has once everything sent so far is stored: an
    /// atomic batch, which cannot name a predecessor by id, names it by this.
    last_sequence: u64,
    allow_atomic: bool,
}

/// Which stream a publish goes to, as [`Fence::stream_of`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamIndex(usize);

impl Fence {
    /// No fencing: every publish goes out without an expectation.
    pub fn off() -> Fence {
        Fence::default()
    }

    /// Fences publishes into `streams`. Filters that do not parse (none should: the server
    /// checked them) are ignored.
    pub fn new(streams: impl IntoIterator<Item = StreamSummary>) -> Fence {
        let streams = streams
            .into_iter()
            .map(|summary| FencedStream {
                name: summary.name,
                filters: summary
                    .subjects
                    .iter()
                    .filter_map(|s| s.parse().ok())
                    .collect(),
                // The first publish follows the stream's last message: the chain of
                // predecessors goes on across sessions.
                last_sent: summary
                    .last
                    .as_ref()
                    .and_then(|last| last.msg_id.as_deref())
                    .and_then(|id| id.parse::<HeaderValue>().ok()),
                stored: summary.last,
                last_sequence: summary.last_sequence,
                allow_atomic: summary.allow_atomic,
            })
            .filter(|s| !s.filters.is_empty())
            .collect();
        Fence { streams, recent: 0 }
    }

    /// Whether `stream` held `event` already when the session started: it is at or before the
    /// stream's last event.
    pub fn already_stored(&self, stream: StreamIndex, event: &EventRef) -> bool {
        self.streams
            .get(stream.0)
            .and_then(|s| s.stored.as_ref())
            .is_some_and(|stored| stored.covers(event))
    }

    /// The newest outbox event the streams held when the session started.
    pub fn end(&self) -> Option<StreamEnd> {
        self.streams
            .iter()
            .filter_map(|s| {
                let stored = s.stored.as_ref()?;
                Some(StreamEnd {
                    stream: s.name.clone(),
                    commit_lsn: stored.commit_lsn?,
                    commit_time: stored.commit_time.clone(),
                })
            })
            .max_by_key(|end| end.commit_lsn)
    }

    pub fn is_on(&self) -> bool {
        !self.streams.is_empty()
    }

    /// The stream capturing `subject`, if a known one does (streams' subjects never overlap).
    pub fn stream_of(&mut self, subject: &str) -> Option<StreamIndex> {
        let captures = |s: &FencedStream| s.filters.iter().any(|f| f.matches(subject));
        if self.streams.get(self.recent).is_some_and(captures) {
            return Some(StreamIndex(self.recent));
        }
        let index = self.streams.iter().position(captures)?;
        self.recent = index;
        Some(StreamIndex(index))
    }

    /// The message id the stream must hold last before the next publish into it: the previous
    /// publish's. None for the first publish into the stream in this session.
    pub fn expected_last(&self, stream: StreamIndex) -> Option<&HeaderValue> {
        self.streams.get(stream.0)?.last_sent.as_ref()
    }

    /// A publish of message `id` into `stream` went out.
    pub fn sent(&mut self, stream: StreamIndex, id: HeaderValue) {
        if let Some(s) = self.streams.get_mut(stream.0) {
            s.last_sent = Some(id);
            s.last_sequence += 1;
        }
    }

    /// The stream sequence of `stream`'s last message once every publish sent into it in this
    /// session is stored. A re-sent event JetStream drops as a duplicate throws it off; the
    /// next batch is then refused, and the session restarts with the stream's real sequence.
    pub fn expected_last_sequence(&self, stream: StreamIndex) -> Option<u64> {
        self.streams.get(stream.0).map(|s| s.last_sequence)
    }

    /// Whether `stream` takes atomic batches (`allow_atomic`).
    pub fn allows_atomic(&self, stream: StreamIndex) -> bool {
        self.streams.get(stream.0).is_some_and(|s| s.allow_atomic)
    }

    pub fn name(&self, stream: StreamIndex) -> Option<&str> {
        self.streams.get(stream.0).map(|s| s.name.as_str())
    }

    pub fn stream_names(&self) -> impl Iterator<Item = &str> {
        self.streams.iter().map(|s| s.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, subjects: &[&str], last: Option<StoredEvent>) -> StreamSummary {
        StreamSummary {
            name: name.to_owned(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            last,
            last_sequence: 10,
            allow_atomic: name == "OUTBOX",
        }
    }

    fn fence() -> Fence {
        Fence::new([
            summary("OUTBOX", &["outbox.>"], None),
            summary("DEAD", &["dlq.outbox", "dlq.other"], None),
            summary("MIRROR", &[], None),
        ])
    }

    fn id(text: &str) -> HeaderValue {
        text.parse().unwrap()
    }

    #[test]
    fn each_publish_expects_the_one_before_it_in_the_same_stream() {
        let mut fence = fence();
        assert!(fence.is_on());
        let outbox = fence.stream_of("outbox.order.created").unwrap();
        assert_eq!(fence.expected_last(outbox), None, "first in the session");
        fence.sent(outbox, id("e1"));
        let dead = fence.stream_of("dlq.outbox").unwrap();
        assert_ne!(dead, outbox);
        assert_eq!(fence.expected_last(dead), None, "streams chain apart");
        fence.sent(dead, id("dead-letter:e2"));
        let again = fence.stream_of("outbox.order.paid").unwrap();
        assert_eq!(again, outbox);
        assert_eq!(fence.expected_last(again).map(|v| v.as_str()), Some("e1"));
        fence.sent(again, id("e3"));
        assert_eq!(fence.expected_last(outbox).map(|v| v.as_str()), Some("e3"));
        assert_eq!(
            fence.expected_last_sequence(outbox),
            Some(12),
            "two sent after the stream's last message, sequence 10"
        );
        assert_eq!(fence.expected_last_sequence(dead), Some(11));
        assert!(fence.allows_atomic(outbox) && !fence.allows_atomic(dead));
    }

    #[test]
    fn subjects_no_known_stream_captures_are_not_fenced() {
        let mut fence = fence();
        assert_eq!(fence.stream_of("invoice.created"), None);
        assert_eq!(fence.stream_of("outbox"), None, "`>` needs a token");
        assert_eq!(
            fence.stream_names().collect::<Vec<_>>(),
            ["OUTBOX", "DEAD"],
            "a stream without subjects (a mirror) captures nothing"
        );
        let mut off = Fence::off();
        assert!(!off.is_on());
        assert_eq!(off.stream_of("outbox.order.created"), None);
    }

    fn event(commit_lsn: u64, row_index: u32) -> EventRef {
        EventRef {
            event_id: "e".into(),
            table: "public.outbox".into(),
            subject: Some("outbox.order.created".into()),
            commit_lsn: Lsn::new(commit_lsn),
            row_index,
        }
    }

    #[test]
    fn a_stream_holds_everything_up_to_its_last_event() {
        let stored = |commit_lsn, row_index| {
            Some(StoredEvent {
                msg_id: Some("x".into()),
                commit_lsn: Some(Lsn::new(commit_lsn)),
                row_index,
                commit_time: Some("2026-12-03T10:00:00Z".into()),
            })
        };
        let mut fence = Fence::new([
            summary("OUTBOX", &["outbox.>"], stored(100, Some(2))),
            summary("DEAD", &["dlq.>"], stored(200, None)),
            summary("EMPTY", &["other.>"], None),
        ]);
        let outbox = fence.stream_of("outbox.order.created").unwrap();
        assert!(fence.already_stored(outbox, &event(90, 7)));
        assert!(fence.already_stored(outbox, &event(100, 2)));
        assert!(!fence.already_stored(outbox, &event(100, 3)));
        assert!(!fence.already_stored(outbox, &event(101, 0)));
        let dead = fence.stream_of("dlq.x").unwrap();
        assert!(fence.already_stored(dead, &event(199, 9)));
        assert!(
            !fence.already_stored(dead, &event(200, 0)),
            "without a row index, the last transaction is not known to be complete"
        );
        let empty = fence.stream_of("other.x").unwrap();
        assert!(!fence.already_stored(empty, &event(1, 0)));
        assert_eq!(
            fence.end(),
            Some(StreamEnd {
                stream: "DEAD".into(),
                commit_lsn: Lsn::new(200),
                commit_time: Some("2026-12-03T10:00:00Z".into()),
            })
        );
        let foreign = StoredEvent::from_headers(&HeaderMap::new());
        assert_eq!(foreign.commit_lsn, None);
        // A backfilled event whose row faked a position (before rows were refused such
        // headers) is no resume point.
        let mut faked = HeaderMap::new();
        faked.insert(header::BACKFILL, "true");
        faked.insert(header::COMMIT_LSN, "FF/FFFFFFFF");
        faked.insert(header::ROW_INDEX, "0");
        let faked = StoredEvent::from_headers(&faked);
        assert_eq!((faked.commit_lsn, faked.row_index), (None, None));
        assert!(
            Fence::new([summary("S", &["s.>"], Some(foreign))])
                .end()
                .is_none()
        );
    }
}
