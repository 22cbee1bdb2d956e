//! What can go wrong on the NATS side, and which of it a retry can fix.

use async_nats::jetstream;

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
    #[error("publishing {event} failed: {detail}")]
    Publish {
        event: EventRef,
        detail: String,
        transient: bool,
    },
}

impl SinkError {
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Connect { transient, .. } | SinkError::Publish { transient, .. } => {
                *transient
            }
            SinkError::Disconnected
            | SinkError::Checkpoint { .. }
            | SinkError::StreamUnavailable(_)
            | SinkError::Fenced { .. } => true,
            SinkError::Stream(_)
            | SinkError::AtomicDisabled { .. }
            | SinkError::AtomicUnsupported { .. }
            | SinkError::NoStream { .. }
            | SinkError::TooLarge { .. }
            | SinkError::Rejected { .. } => false,
        }
    }

    /// The `kind` label of the publish-errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Connect { .. } => "connect",
            SinkError::Disconnected => "disconnected",
            SinkError::Stream(_)
            | SinkError::StreamUnavailable(_)
            | SinkError::AtomicDisabled { .. }
            | SinkError::AtomicUnsupported { .. } => "stream_setup",
            SinkError::Checkpoint { .. } => "checkpoint",
            SinkError::NoStream { .. } => "no_stream",
            SinkError::TooLarge { .. } => "too_large",
            SinkError::Rejected { .. } => "rejected",
            SinkError::Fenced { .. } => "fenced",
            SinkError::Publish { .. } => "publish",
        }
    }
}

/// Reading a stream failed: transient when the request went unanswered or JetStream said it is
/// unavailable (5xx), permanent otherwise (e.g. an invalid name, no permission).
pub(super) fn get_stream_error(name: &str, err: jetstream::context::GetStreamError) -> SinkError {
    let detail = format!("reading stream `{name}`: {err}");
    match err.kind() {
        jetstream::context::GetStreamErrorKind::Request => SinkError::StreamUnavailable(detail),
        jetstream::context::GetStreamErrorKind::JetStream(e) if e.code() >= 500 => {
            SinkError::StreamUnavailable(detail)
        }
        _ => SinkError::Stream(detail),
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
}
