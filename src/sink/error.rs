//! What can go wrong on the NATS side, and which of it a retry can fix.

use async_nats::jetstream;

use super::permissions::PermissionDenied;
use crate::event::EventRef;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot connect to NATS at {target}: {detail}")]
    Connect {
        target: String,
        detail: String,
        transient: bool,
    },
    #[error("the NATS connection was lost")]
    Disconnected,
    #[error("JetStream stream setup: {0}")]
    Stream(String),
    /// JetStream did not answer a stream request in time, or answered that it is unavailable
    /// (a cluster electing a leader, a server starting): retried.
    #[error("JetStream is not answering stream requests yet: {0}")]
    StreamUnavailable(String),
    #[error("checkpoint in KV bucket `{bucket}`: {detail}")]
    Checkpoint { bucket: String, detail: String },
    #[error(
        "no JetStream stream captures subject `{subject}` ({event}); create a stream for it \
         (e.g. `nats stream add OUTBOX --subjects '{subject}'`) or start with --stream NAME",
        subject = event.subject_str()
    )]
    NoStream { event: EventRef },
    #[error(
        "{event}: its {size}-byte payload plus headers is over the NATS server's max_payload of \
         {max} bytes; raise max_payload on the server or make the event smaller"
    )]
    TooLarge {
        event: EventRef,
        size: usize,
        max: usize,
    },
    #[error(
        "JetStream rejected {event}: {detail}; fix the row (or the stream's limits) and restart, \
         or run with --on-error dead-letter"
    )]
    Rejected { event: EventRef, detail: String },
    /// The stream's last message was not the publish before this one: that one was lost, or
    /// another publisher wrote into the stream. Transient: the session restarts from the slot.
    #[error(
        "JetStream refused {event} because the message before it in the stream is not the one \
         outbox-cdc published before it ({detail}): a publish was lost on the way (e.g. in a \
         stream leader change) or another publisher wrote into the stream; re-sending from the \
         slot, in order. If other publishers share this stream, run with --no-fencing"
    )]
    Fenced { event: EventRef, detail: String },
    #[error(
        "stream `{stream}` does not take atomic batches, which --atomic-transactions needs: \
         enable atomic publish on it (stream config `allow_atomic: true`, nats-server 2.12+), or \
         drop --atomic-transactions"
    )]
    AtomicDisabled { stream: String },
    #[error(
        "--atomic-transactions needs nats-server 2.12 or newer (atomic batch publish); the \
         server is {version}, which would store a batch's messages one by one: upgrade it, or \
         drop --atomic-transactions"
    )]
    AtomicUnsupported { version: String },
    /// JetStream refused an atomic batch because it holds an event id the stream already
    /// stored: the batch's transaction is in the stream (a batch sent by a session that ended
    /// was stored after this session read the stream's end), or an id was used again.
    #[error(
        "JetStream refused the atomic batch of the transaction at commit LSN {commit_lsn} \
         ({event}, the batch's first event): it holds an event id the stream already stored \
         ({detail})",
        commit_lsn = event.commit_lsn
    )]
    AtomicDuplicate { event: EventRef, detail: String },
    /// JetStream refused an atomic batch as a batch (not one of its messages): it would be
    /// refused again.
    #[error(
        "JetStream refused the atomic batch of the transaction at commit LSN {commit_lsn}: \
         {detail}",
        commit_lsn = event.commit_lsn
    )]
    AtomicRefused { event: EventRef, detail: String },
    /// The server refused this user a subject (see [`super::permissions`]).
    #[error(
        "the NATS server denied this user permission to {0}: add it to the user's `{list}` \
         permissions (what each command needs: docs/permissions.md)",
        list = .0.operation.list()
    )]
    PermissionDenied(PermissionDenied),
    /// A stream with `discard: new` reached one of its limits and refuses new messages: nothing
    /// of it is removed, so retrying cannot help until someone makes room.
    #[error(
        "stream `{stream}` is full and refuses new events ({detail}; it has discard policy \
         `new`): nothing was lost — the events wait in the replication slot, whose WAL grows on \
         the database server until there is room. Raise the stream's limits (e.g. `nats stream \
         edit {stream} --max-bytes …`), let its max age expire old events, or purge what every \
         consumer has read; then start again (docs/streams.md)"
    )]
    StreamFull { stream: String, detail: String },
    /// Sending or acknowledging a publish failed for a reason of the connection or the
    /// server's state: the session restarts from the slot.
    #[error("publishing {event} failed: {detail}")]
    Publish { event: EventRef, detail: String },
}

impl From<PermissionDenied> for SinkError {
    fn from(denied: PermissionDenied) -> Self {
        SinkError::PermissionDenied(denied)
    }
}

impl SinkError {
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Connect { transient, .. } => *transient,
            SinkError::Publish { .. }
            | SinkError::AtomicDuplicate { .. }
            | SinkError::Disconnected
            | SinkError::Checkpoint { .. }
            | SinkError::StreamUnavailable(_)
            | SinkError::Fenced { .. } => true,
            SinkError::Stream(_)
            | SinkError::AtomicDisabled { .. }
            | SinkError::AtomicUnsupported { .. }
            | SinkError::AtomicRefused { .. }
            | SinkError::NoStream { .. }
            | SinkError::TooLarge { .. }
            | SinkError::Rejected { .. }
            | SinkError::PermissionDenied(_)
            | SinkError::StreamFull { .. } => false,
        }
    }

    /// The `kind` label of the publish-errors metric.
    pub fn kind(&self) -> PublishErrorKind {
        match self {
            SinkError::Connect { .. } => PublishErrorKind::Connect,
            SinkError::Disconnected => PublishErrorKind::Disconnected,
            SinkError::Stream(_)
            | SinkError::StreamUnavailable(_)
            | SinkError::AtomicDisabled { .. }
            | SinkError::AtomicUnsupported { .. } => PublishErrorKind::StreamSetup,
            SinkError::Checkpoint { .. } => PublishErrorKind::Checkpoint,
            SinkError::NoStream { .. } => PublishErrorKind::NoStream,
            SinkError::TooLarge { .. } => PublishErrorKind::TooLarge,
            SinkError::Rejected { .. } => PublishErrorKind::Rejected,
            SinkError::Fenced { .. } => PublishErrorKind::Fenced,
            SinkError::AtomicDuplicate { .. } => PublishErrorKind::AtomicDuplicate,
            SinkError::AtomicRefused { .. } => PublishErrorKind::AtomicRefused,
            SinkError::Publish { .. } => PublishErrorKind::Publish,
            SinkError::PermissionDenied(_) => PublishErrorKind::Permission,
            SinkError::StreamFull { .. } => PublishErrorKind::StreamFull,
        }
    }
}

/// What kind of error a [`SinkError`] is: the `kind` label of `publish_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishErrorKind {
    Connect,
    Disconnected,
    StreamSetup,
    Checkpoint,
    NoStream,
    TooLarge,
    Rejected,
    Fenced,
    AtomicDuplicate,
    AtomicRefused,
    Publish,
    Permission,
    StreamFull,
}

impl PublishErrorKind {
    /// Every kind, each exposed at 0 from the start (see [`crate::stats`]).
    pub const ALL: [PublishErrorKind; 13] = [
        PublishErrorKind::Connect,
        PublishErrorKind::Disconnected,
        PublishErrorKind::StreamSetup,
        PublishErrorKind::Checkpoint,
        PublishErrorKind::NoStream,
        PublishErrorKind::TooLarge,
        PublishErrorKind::Rejected,
        PublishErrorKind::Fenced,
        PublishErrorKind::AtomicDuplicate,
        PublishErrorKind::AtomicRefused,
        PublishErrorKind::Publish,
        PublishErrorKind::Permission,
        PublishErrorKind::StreamFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PublishErrorKind::Connect => "connect",
            PublishErrorKind::Disconnected => "disconnected",
            PublishErrorKind::StreamSetup => "stream_setup",
            PublishErrorKind::Checkpoint => "checkpoint",
            PublishErrorKind::NoStream => "no_stream",
            PublishErrorKind::TooLarge => "too_large",
            PublishErrorKind::Rejected => "rejected",
            PublishErrorKind::Fenced => "fenced",
            PublishErrorKind::AtomicDuplicate => "atomic_duplicate",
            PublishErrorKind::AtomicRefused => "atomic_refused",
            PublishErrorKind::Publish => "publish",
            PublishErrorKind::Permission => "permission",
            PublishErrorKind::StreamFull => "stream_full",
        }
    }
}

/// Reading a stream failed: transient when the request went unanswered or JetStream said it is
/// unavailable (5xx), permanent otherwise (e.g. an invalid name, no permission).
pub(super) fn get_stream_error(name: &str, err: jetstream::context::GetStreamError) -> SinkError {
    let detail = format!("reading stream `{name}`: {err}");
    match err.kind() {
        jetstream::context::GetStreamErrorKind::Request => SinkError::StreamUnavailable(detail),
        jetstream::context::GetStreamErrorKind::JetStream(e) => api_error(detail, &e),
        _ => SinkError::Stream(detail),
    }
}

/// JetStream answered a stream request with an error: transient when it says it cannot answer
/// now (5xx, e.g. "JetStream system temporarily unavailable" while a cluster that lost a node
/// elects its meta leader), permanent otherwise (a bad request, a missing stream).
pub(super) fn api_error(detail: String, error: &jetstream::Error) -> SinkError {
    if error.code() >= 500 {
        SinkError::StreamUnavailable(detail)
    } else {
        SinkError::Stream(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    #[test]
    fn classifies_errors() {
        assert!(SinkError::Disconnected.is_transient());
        assert!(SinkError::StreamUnavailable("timed out".into()).is_transient());
        assert!(!SinkError::Stream("invalid config".into()).is_transient());
        let event = EventRef {
            event_id: "1".into(),
            table: "public.outbox".into(),
            subject: Some("a".into()),
            commit_lsn: Lsn::new(1),
            row_index: 0,
        };
        let no_stream = SinkError::NoStream { event };
        assert!(!no_stream.is_transient());
        assert!(
            no_stream.to_string().contains("--subjects 'a'"),
            "{no_stream}"
        );
    }

    fn api(code: usize, err_code: u64, description: &str) -> jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": code, "err_code": err_code, "description": description,
        }))
        .expect("a JetStream API error")
    }

    /// A cluster that lost a node answers stream requests with 503 while it elects its meta
    /// leader: seen as a stop ("JetStream stream setup: listing the streams …") where a retry
    /// would have gone on.
    #[test]
    fn jetstream_unavailable_is_retried_and_a_bad_request_is_not() {
        let unavailable = api(503, 10008, "JetStream system temporarily unavailable");
        assert!(api_error("listing".into(), &unavailable).is_transient());
        let not_found = api(404, 10059, "stream not found");
        assert!(!api_error("reading".into(), &not_found).is_transient());
        let bad = api(400, 10052, "stream name is invalid");
        assert!(!api_error("creating".into(), &bad).is_transient());
    }
}
