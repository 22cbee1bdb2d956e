//! The sink: NATS JetStream. Publishes events with their headers and hands their acks back in
//! publish order, so the pipeline can keep many publishes in flight.
//!
//! ```text
//!   publish(event) ──▶ core publish, reply subject <inbox>.<seq> ──▶ JetStream
//!                      (+ Nats-Expected-Last-Msg-Id: the stream's previous publish)
//!   next_ack()     ◀── acks on one subscription, put back in publish order ◀──┘
//! ```
//!
//! It owns the NATS connection, the streams' set-up and the replay checkpoint. It knows nothing
//! of PostgreSQL or of outbox rows: it publishes [`OutboxEvent`]s and names an [`EventRef`] in
//! its errors; whatever else the caller attaches to a publish comes back with its ack.
//!
//! **Invariant: one connection is one session.** The client is built never to reconnect on its
//! own. If the connection drops, publishes queued behind the lost ones would otherwise go out on
//! the new connection and land in the stream before the lost ones are re-sent — out of commit
//! order. Instead the sink reports the disconnect ([`JetStreamSink::connection_lost`]), the
//! pipeline ends the session, and the next session re-sends from the slot's confirmed position
//! on a fresh connection; JetStream drops what it already has by `Nats-Msg-Id`, and fencing
//! ([`fence`]) refuses anything that would land behind a lost publish.

mod acks;
mod batch;
mod checkpoint;
mod connect;
mod error;
pub mod fence;
mod permissions;
mod streams;

use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;

use crate::event::{EventRef, OutboxEvent};

pub use acks::{Ack, AckError, AckOutcome, Role};
pub use batch::{BatchOutcome, BatchSent, MAX_BATCHES_IN_FLIGHT, NotBatchable};
pub use checkpoint::Checkpoint;
pub use connect::{NatsAuth, NatsUrlError, NatsUrls, redact_nats_url};
pub use error::{PublishErrorKind, SinkError};
pub use fence::{Fence, StoredEvent, StreamEnd};
pub use permissions::{Denials, DeniedOperation, PermissionDenied};
pub use streams::{Discard, StoredHeaders, StreamLimits, StreamSpec, StreamStart, read_headers};

/// Duplicate windows shorter than this warn at start: a restart or failover slower than the window
/// would re-publish events JetStream no longer recognises.
pub const MIN_SAFE_DUPLICATE_WINDOW: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub urls: NatsUrls,
    pub auth: NatsAuth,
    /// The streams to create when missing (`--stream`: one, capturing `capture_subjects`).
    pub streams: Vec<StreamSpec>,
    /// What outbox-cdc publishes on, where the subject template tells: `event_subjects` and the
    /// dead letters' subject.
    pub capture_subjects: Vec<String>,
    /// The events' subjects, where the subject template tells: with `atomic`, the streams that
    /// capture them must take atomic batches (checked at start).
    pub event_subjects: Vec<String>,
    /// Copies the checkpoint's KV bucket keeps when it is created; None: as many as the
    /// outbox's streams (see [`JetStreamSink::replicas`]).
    pub checkpoint_replicas: Option<usize>,
    pub ack_timeout: Duration,
    pub max_in_flight: usize,
    /// Name each publish's predecessor in its stream (`Nats-Expected-Last-Msg-Id`); see
    /// [`fence`].
    pub fencing: bool,
    /// Transactions go out as atomic batches (see [`batch`]): the server and the streams must
    /// take them.
    pub atomic: bool,
}

/// An event to publish: its message, which row it is, and what the caller attaches (`T`), which
/// comes back with its ack.
#[derive(Debug)]
pub struct Outgoing<T> {
    pub message: OutboxEvent,
    pub event: EventRef,
    pub tag: T,
}

/// A publish awaiting its ack: the row it carries, what the caller attached (`T`), and its part
/// in an atomic batch.
#[derive(Debug)]
pub struct Published<T> {
    pub event: EventRef,
    pub tag: T,
    pub role: Role,
}

/// How a publish went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Fenced within its stream, or fencing is off: the next publish may follow at once.
    Pipelined,
    /// Fencing is on, but no stream of the account is known to capture the subject, so nothing
    /// after it can be fenced on it: if no stream takes it, a publish sent after it could be
    /// stored before its dead letter. Nothing may follow it before its ack.
    AwaitAck,
    /// Not sent: its stream held it already when the session started (see [`fence`]).
    AlreadyStored,
}

/// A session's JetStream connection. `T` is what the caller attaches to each publish and gets
/// back with its ack.
pub struct JetStreamSink<T> {
    client: async_nats::Client,
    /// For stream management and the checkpoint; events go out through `acks`.
    context: jetstream::Context,
    acks: acks::Acks<Published<T>>,
    fence: Fence,
    /// A publish went out with fencing on but no stream known for its subject (warned once).
    warned_unfenced: bool,
    ack_timeout: Duration,
    disconnected: watch::Receiver<bool>,
    /// The server's permission refusals on this connection.
    denials: Denials,
    /// The most copies a stream of the account keeps (1 until the streams are read).
    replicas: usize,
    /// Atomic batch ids are `<batch_prefix>-<n>`.
    batch_prefix: String,
    batches_started: u64,
}

impl<T> JetStreamSink<T> {
    /// The server's largest accepted message.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    /// Sends one event; its ack comes back, in publish order and with `tag`, from
    /// [`JetStreamSink::next_ack`]. With `fenced`, and fencing on, it names the previous publish
    /// into its stream as the message the stream must hold last. An event its stream held
    /// already when the session started is not sent ([`Sent::AlreadyStored`]).
    pub async fn publish(
        &mut self,
        outgoing: Outgoing<T>,
        fenced: bool,
    ) -> Result<Sent, SinkError> {
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
        } = outgoing;
        let size = payload.len();
        let stream = self.fence.stream_of(subject.as_str());
        // A backfilled row has no WAL position (commit LSN 0/0) to resume after.
        if let Some(stream) = stream
            && !event.commit_lsn.is_zero()
            && self.fence.already_stored(stream, &event)
        {
            return Ok(Sent::AlreadyStored);
        }
        if fenced && let Some(previous) = stream.and_then(|s| self.fence.expected_last(s)) {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
                previous.clone(),
            );
        }
        let send = self.client.publish_with_reply_and_headers(
            subject,
            self.acks.reply_subject(),
            headers,
            payload,
        );
        // A server that stops reading (frozen, or a black-holed network) fills the client's
        // buffers, and the send waits; the ack timeout bounds that wait too. The timer is only
        // armed when the send does not complete at once.
        match tokio::time::timeout(self.ack_timeout, send).await {
            Err(_elapsed) => {
                return Err(SinkError::Publish {
                    event,
                    detail: "the NATS connection took no data within the ack timeout".into(),
                });
            }
            Ok(Err(err)) => {
                return Err(match err.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                        SinkError::TooLarge {
                            event,
                            size,
                            max: self.max_payload(),
                        }
                    }
                    _ => SinkError::Publish {
                        event,
                        detail: err.to_string(),
                    },
                });
            }
            Ok(Ok(())) => {}
        }
        // Only what went out is a predecessor: a message refused before sending (too large) is
        // not one, and the next publish still expects the one before it.
        let subject_unknown = stream.is_none() && self.fence.is_on();
        if subject_unknown && !self.warned_unfenced {
            self.warned_unfenced = true;
            tracing::warn!(
                subject = event.subject_str(),
                "no stream of this NATS account is known to capture this subject: its publishes \
                 wait for their ack before the next goes out (slow). A stream created since the \
                 session started is learnt by the next one; if a stream of another account \
                 captures these subjects, run with --no-fencing"
            );
        }
        self.acks.sent(
            Published {
                event,
                tag,
                role: Role::Single,
            },
            Role::Single,
        );
        if let Some(stream) = stream {
            self.fence.sent(stream, id);
        }
        Ok(if subject_unknown {
            Sent::AwaitAck
        } else {
            Sent::Pipelined
        })
    }

    /// The oldest publish still in flight and its ack; pending forever when there is none.
    /// Cancel-safe.
    pub async fn next_ack(&mut self) -> (Published<T>, AckOutcome) {
        self.acks.next().await
    }

    /// Publishes sent whose ack [`JetStreamSink::next_ack`] has not handed out yet.
    pub fn in_flight(&self) -> usize {
        self.acks.pending()
    }

    /// Turns a failed ack into an error that says what to do.
    pub async fn ack_error(&self, event: EventRef, err: AckError) -> SinkError {
        // A publish or the ack subscription refused by the server: the ack never came.
        if let Some(denied) = self.denials.error() {
            return denied;
        }
        let publish_error = |event, err: AckError| SinkError::Publish {
            event,
            detail: err.to_string(),
        };
        match err {
            // A stream may be missing, or (in a cluster) briefly leaderless.
            AckError::NoResponders => {
                let subject = event.subject_str().to_owned();
                match self.context.stream_by_subject(subject).await {
                    Err(e)
                        if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound =>
                    {
                        SinkError::NoStream { event }
                    }
                    _ => publish_error(event, err),
                }
            }
            AckError::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID
                    || api.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE =>
            {
                SinkError::Fenced {
                    event,
                    detail: api.to_string(),
                }
            }
            // A stream with `discard: new` at its limits: it refuses every publish until someone
            // makes room, so retrying would only loop.
            AckError::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED
                    && api.to_string().contains("maximum") =>
            {
                let stream = match self
                    .context
                    .stream_by_subject(event.subject_str().to_owned())
                    .await
                {
                    Ok(name) => name,
                    Err(_) => format!("capturing {}", event.subject_str()),
                };
                SinkError::StreamFull {
                    stream,
                    detail: api.to_string(),
                }
            }
            AckError::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::ATOMIC_PUBLISH_DISABLED =>
            {
                let stream = match self
                    .context
                    .stream_by_subject(event.subject_str().to_owned())
                    .await
                {
                    Ok(name) => name,
                    Err(_) => format!("capturing {}", event.subject_str()),
                };
                SinkError::AtomicDisabled { stream }
            }
            AckError::JetStream(api)
                if api.error_code()
                    == jetstream::ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE =>
            {
                SinkError::AtomicDuplicate {
                    event,
                    detail: api.to_string(),
                }
            }
            // Too many batches in flight: sent again, whole, by the next session. (An incomplete
            // batch — one of its messages refused on its own, or the batch too slow to arrive —
            // is refused like a message, below.)
            AckError::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::ATOMIC_PUBLISH_TOO_MANY_INFLIGHT =>
            {
                publish_error(event, AckError::JetStream(api))
            }
            AckError::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH =>
            {
                SinkError::AtomicRefused {
                    event,
                    detail: format!(
                        "{api}. Nothing of the transaction was stored. Lower --atomic-max-batch \
                         to the server's max_batch_size, or raise that server limit"
                    ),
                }
            }
            // 400: JetStream refuses this message itself (e.g. headers over 64 KiB); sending it
            // again cannot help. Other codes (503 no leader, 500) are about the server's state.
            AckError::JetStream(api) if api.code() == 400 => SinkError::Rejected {
                event,
                detail: api.to_string(),
            },
            other => publish_error(event, other),
        }
    }

    /// Resolves when this sink's connection has dropped or the server refused a permission on
    /// it; held apart from the sink so that it can be awaited beside
    /// [`JetStreamSink::next_ack`].
    pub fn connection_lost(&self) -> ConnectionLost {
        ConnectionLost {
            lost: self.disconnected.clone(),
            denials: self.denials.clone(),
        }
    }

    /// The server's permission refusals on this connection.
    pub fn denials(&self) -> &Denials {
        &self.denials
    }

    /// Flushes what the client buffered, so that shutdown does not wait on unsent publishes.
    pub async fn flush(&self) {
        let _ = self.client.flush().await;
    }
}

/// See [`JetStreamSink::connection_lost`].
pub struct ConnectionLost {
    lost: watch::Receiver<bool>,
    denials: Denials,
}

impl ConnectionLost {
    /// Resolves, with the error that ends the session, when the connection has dropped
    /// ([`SinkError::Disconnected`]) or the server refused a permission on it (never
    /// otherwise).
    pub async fn wait(&mut self) -> SinkError {
        let lost = async {
            if self.lost.wait_for(|lost| *lost).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            denied = self.denials.wait() => denied,
            () = lost => SinkError::Disconnected,
        }
    }
}
