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
//! The first publish into a stream in a session carries no expectation: everything before it was
//! confirmed, so it is stored already. Which stream a subject goes to is read from the streams'
//! subject filters when the session starts; a subject no known stream captures goes out
//! unfenced (and its ack says whether any stream took it).
//!
//! Fencing needs the outbox's streams to be written by outbox-cdc alone: another publisher's
//! message in between makes the next publish fail the check. That is survivable (the session
//! restarts and the first publish goes out unfenced) but costs a restart each time, so streams
//! shared with other publishers run with `--no-fencing`.

use async_nats::HeaderValue;

use crate::subject::SubjectFilter;

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
}

/// Which stream a publish goes to, as [`Fence::stream_of`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamIndex(usize);

impl Fence {
    /// No fencing: every publish goes out without an expectation.
    pub fn off() -> Fence {
        Fence::default()
    }

    /// Fences publishes into `streams`: (name, subject filters) of each. Filters that do not
    /// parse (none should: the server checked them) are ignored.
    pub fn new(streams: impl IntoIterator<Item = (String, Vec<String>)>) -> Fence {
        let streams = streams
            .into_iter()
            .map(|(name, subjects)| FencedStream {
                name,
                filters: subjects.iter().filter_map(|s| s.parse().ok()).collect(),
                last_sent: None,
            })
            .filter(|s| !s.filters.is_empty())
            .collect();
        Fence { streams, recent: 0 }
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
        }
    }

    pub fn stream_names(&self) -> impl Iterator<Item = &str> {
        self.streams.iter().map(|s| s.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence() -> Fence {
        Fence::new([
            ("OUTBOX".to_owned(), vec!["outbox.>".to_owned()]),
            (
                "DEAD".to_owned(),
                vec!["dlq.outbox".to_owned(), "dlq.other".to_owned()],
            ),
            ("MIRROR".to_owned(), vec![]),
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
}
