//! Atomic batches (`--atomic-transactions`, nats-server 2.12+, streams with `allow_atomic`): a
//! transaction's events go out as one batch, which JetStream stores whole or not at all, so a
//! consumer never sees part of a transaction.
//!
//! ```text
//!   event 1 … n-1  Nats-Batch-Id, Nats-Batch-Sequence         (no reply subject)
//!   event n        … + Nats-Batch-Commit: 1, reply <inbox>.<seq>  ──▶ one ack for the batch
//! ```
//!
//! Batches are pipelined like single publishes, and the one ack comes back for each of the
//! batch's events, in publish order (see [`super::acks`]), so the pipeline's watermark does not
//! know the difference. `Nats-Msg-Id` stays on every event: JetStream refuses a batch holding an
//! id it has seen (rather than storing part of it).
//!
//! Fencing: a batch cannot name its predecessor by id (`Nats-Expected-Last-Msg-Id` is refused
//! inside a batch); its first message names the stream sequence the stream's last message must
//! have, `Nats-Expected-Last-Sequence`, counted from the stream's last sequence when the session
//! started plus everything sent into it since. A lost publish or batch before it, or another
//! publisher's message, makes the count wrong; JetStream refuses the batch (10071) and the
//! session restarts from the slot, as with a refused id.
//!
//! The protocol is written here rather than taken from the `jetstream-extra` crate: that crate
//! (0.3) is built on async-nats 0.48, whose client is another type than this sink's 0.51 one
//! (so a second connection), publishes one batch at a time, and refuses `Nats-Msg-Id` in a batch.

use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
    NATS_EXPECTED_LAST_SEQUENCE,
};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;

use super::acks::Role;
use super::fence::StreamIndex;
use super::{JetStreamSink, Outgoing, Published, SinkError};
use crate::event::{EventRef, OutboxEvent};

/// Room left for the batch headers when checking a message against `max_payload`.
const BATCH_HEADERS_BYTES: usize = 128;

/// Atomic batches awaiting their ack at most: below nats-server's default of 50 in flight per
/// stream (`max_batch_inflight_per_stream`), since a batch over it is refused whole.
pub const MAX_BATCHES_IN_FLIGHT: usize = 32;

/// Why a transaction's events cannot go out as one batch: they go out one by one, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotBatchable {
    /// No stream of the account is known to capture an event's subject.
    UnknownStream,
    /// The events go to more than one stream: a batch is stored by one.
    SeveralStreams,
    /// An event is too large for the server by itself; one by one it becomes a poison row.
    MessageTooLarge,
}

impl NotBatchable {
    pub const ALL: [NotBatchable; 3] = [
        NotBatchable::UnknownStream,
        NotBatchable::SeveralStreams,
        NotBatchable::MessageTooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotBatchable::UnknownStream => "unknown_stream",
            NotBatchable::SeveralStreams => "several_streams",
            NotBatchable::MessageTooLarge => "message_too_large",
        }
    }
}

/// What [`JetStreamSink::publish_batch`] sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSent {
    /// Events sent (their acks come back one each).
    pub sent: usize,
    /// Events the stream held already when the session started: not sent.
    pub already_stored: usize,
    /// They went out as one atomic batch (else as one message: the only one left).
    pub batched: bool,
}

/// What [`JetStreamSink::publish_batch`] did with a transaction's events.
#[derive(Debug)]
pub enum BatchOutcome<T> {
    Sent(BatchSent),
    /// They cannot be one batch: handed back, unsent.
    NotBatchable(NotBatchable, Vec<Outgoing<T>>),
}

impl<T> JetStreamSink<T> {
    /// Whether these messages can go out as one atomic batch: all into one known stream. A
    /// stream that does not take atomic batches is an error that names it.
    fn batchable<'a>(
        &mut self,
        messages: impl IntoIterator<Item = &'a OutboxEvent>,
    ) -> Result<Result<StreamIndex, NotBatchable>, SinkError> {
        let max_payload = self.max_payload();
        let mut stream: Option<StreamIndex> = None;
        for message in messages {
            let Some(this) = self.fence.stream_of(message.subject.as_str()) else {
                return Ok(Err(NotBatchable::UnknownStream));
            };
            if stream.is_some_and(|s| s != this) {
                return Ok(Err(NotBatchable::SeveralStreams));
            }
            stream = Some(this);
            if wire_size(message) + BATCH_HEADERS_BYTES > max_payload {
                return Ok(Err(NotBatchable::MessageTooLarge));
            }
        }
        let Some(stream) = stream else {
            return Ok(Err(NotBatchable::UnknownStream));
        };
        if !self.fence.allows_atomic(stream) {
            return Err(SinkError::AtomicDisabled {
                stream: self.fence.name(stream).unwrap_or_default().to_owned(),
            });
        }
        Ok(Ok(stream))
    }

    /// Sends a transaction's events as one atomic batch when they can be one (else hands them
    /// back, unsent); each event's ack comes back from [`JetStreamSink::next_ack`] as for single
    /// publishes. Events the stream held already when the session started are left out; a
    /// single event left goes out as a message of its own. With `fenced`, the batch names the
    /// sequence the stream's last message must have.
    pub async fn publish_batch(
        &mut self,
        batch: Vec<Outgoing<T>>,
        fenced: bool,
    ) -> Result<BatchOutcome<T>, SinkError> {
        let stream = match self.batchable(batch.iter().map(|b| &b.message))? {
            Ok(stream) => stream,
            Err(reason) => return Ok(BatchOutcome::NotBatchable(reason, batch)),
        };
        let total = batch.len();
        let batch: Vec<Outgoing<T>> = batch
            .into_iter()
            .filter(|b| {
                b.event.commit_lsn.is_zero() || !self.fence.already_stored(stream, &b.event)
            })
            .collect();
        let already_stored = total - batch.len();
        if batch.len() <= 1 {
            let mut sent = 0;
            for b in batch {
                self.publish(b, fenced).await?;
                sent += 1;
            }
            return Ok(BatchOutcome::Sent(BatchSent {
                sent,
                already_stored,
                batched: false,
            }));
        }
        self.batches_started += 1;
        let batch_id = format!("{}-{}", self.batch_prefix, self.batches_started);
        let expected_sequence = self.fence.expected_last_sequence(stream);
        let last = batch.len() - 1;
        let sent = batch.len();
        for (i, item) in batch.into_iter().enumerate() {
            let Outgoing {
                message:
                    OutboxEvent {
                        subject,
                        mut headers,
                        payload,
                        id,
                    },
                event,
                tag,
            } = item;
            headers.insert(NATS_BATCH_ID, batch_id.as_str());
            headers.insert(NATS_BATCH_SEQUENCE, itoa::Buffer::new().format(i + 1));
            if i == 0
                && fenced
                && let Some(sequence) = expected_sequence
            {
                headers.insert(
                    NATS_EXPECTED_LAST_SEQUENCE,
                    itoa::Buffer::new().format(sequence),
                );
            }
            let role = if i == last {
                headers.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
                Role::CommitsBatch
            } else {
                Role::InBatch
            };
            let reply = (role == Role::CommitsBatch).then(|| self.acks.reply_subject());
            let event = self
                .send_batch_message(subject, reply, headers, payload, event)
                .await?;
            self.acks.sent(Published { event, tag, role }, role);
            self.fence.sent(stream, id);
        }
        Ok(BatchOutcome::Sent(BatchSent {
            sent,
            already_stored,
            batched: true,
        }))
    }

    /// Atomic batches awaiting their ack.
    pub fn batches_in_flight(&self) -> usize {
        self.acks.batches()
    }

    async fn send_batch_message(
        &self,
        subject: Subject,
        reply: Option<Subject>,
        headers: HeaderMap,
        payload: Bytes,
        event: EventRef,
    ) -> Result<EventRef, SinkError> {
        let send = async {
            match reply {
                Some(reply) => {
                    self.client
                        .publish_with_reply_and_headers(subject, reply, headers, payload)
                        .await
                }
                None => {
                    self.client
                        .publish_with_headers(subject, headers, payload)
                        .await
                }
            }
        };
        // As for single publishes: a server that stops reading fills the buffers, and the send
        // waits; the ack timeout bounds that. A failed send leaves the batch uncommitted, and
        // JetStream drops it.
        match tokio::time::timeout(self.ack_timeout, send).await {
            Ok(Ok(())) => Ok(event),
            Ok(Err(err)) => Err(SinkError::Publish {
                event,
                detail: format!("sending a message of an atomic batch: {err}"),
            }),
            Err(_elapsed) => Err(SinkError::Publish {
                event,
                detail: "the NATS connection took no data within the ack timeout".into(),
            }),
        }
    }
}

/// The message's size as the server counts it against `max_payload`: payload and header block.
fn wire_size(message: &OutboxEvent) -> usize {
    let headers: usize = message
        .headers
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    message.payload.len() + headers + b"NATS/1.0\r\n\r\n".len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_a_message_as_the_server_does() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "abc");
        let message = OutboxEvent {
            subject: Subject::from("outbox.a"),
            headers,
            payload: Bytes::from_static(b"12345"),
            id: "abc".parse().unwrap(),
        };
        // "NATS/1.0\r\n" "Nats-Msg-Id: abc\r\n" "\r\n" + 5
        assert_eq!(wire_size(&message), 10 + 18 + 2 + 5);
    }
}
