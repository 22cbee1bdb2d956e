//! The NATS server's permission refusals. A server that denies a user a subject does not answer
//! the request or publish that needed it: it sends `-ERR 'Permissions Violation for Publish to
//! "<subject>"'` (or `… for Subscription to …`) on the connection, which async-nats hands to the
//! event callback only. Without this module a denied request would time out and be retried
//! forever. Here each connection's first refusal is kept ([`Denials`]), and whatever is waiting
//! on the server fails at once with an error naming the subject ([`Denials::guard`]). A refusal
//! is never transient: the user's permissions must change.

use std::fmt;
use std::future::Future;

use tokio::sync::watch;

use super::SinkError;

/// What the server refused, and on which subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionDenied {
    pub operation: DeniedOperation,
    pub subject: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeniedOperation {
    /// Publishing to the subject (a JetStream API request is a publish too).
    Publish,
    /// Publishing with the subject as the reply subject.
    PublishReply,
    /// Subscribing to the subject (the client's reply inbox, `_INBOX.>`).
    Subscribe,
}

impl DeniedOperation {
    /// The permission list (`publish` or `subscribe`) that must allow the subject.
    pub fn list(self) -> &'static str {
        match self {
            DeniedOperation::Publish | DeniedOperation::PublishReply => "publish",
            DeniedOperation::Subscribe => "subscribe",
        }
    }
}

impl fmt::Display for PermissionDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.operation {
            DeniedOperation::Publish => "publish to",
            DeniedOperation::PublishReply => "publish with the reply subject",
            DeniedOperation::Subscribe => "subscribe to",
        };
        write!(f, "{what} `{}`", self.subject)
    }
}

impl PermissionDenied {
    /// Reads a server error's text (`-ERR` without the quotes, as async-nats reports it); None
    /// for any other error.
    pub fn parse(text: &str) -> Option<PermissionDenied> {
        let rest = text
            .trim()
            .trim_matches('\'')
            .strip_prefix("Permissions Violation for ")?;
        let (operation, quoted) = [
            ("Publish with Reply of ", DeniedOperation::PublishReply),
            ("Publish to ", DeniedOperation::Publish),
            ("Subscription to ", DeniedOperation::Subscribe),
        ]
        .into_iter()
        .find_map(|(prefix, op)| rest.strip_prefix(prefix).map(|r| (op, r)))?;
        // `"subject"`, for a queue subscription followed by ` using queue "q"`.
        let subject = quoted.strip_prefix('"')?.split('"').next()?;
        (!subject.is_empty()).then(|| PermissionDenied {
            operation,
            subject: subject.to_owned(),
        })
    }
}

/// Records a connection's permission refusals; the sender half lives in the connection's event
/// callback.
#[derive(Debug, Clone)]
pub struct DenialRecorder(watch::Sender<Option<PermissionDenied>>);

impl DenialRecorder {
    /// Keeps `text`'s refusal if it is one and none was kept before (the first is the cause;
    /// later ones may follow from it). Returns whether it was one.
    pub fn server_error(&self, text: &str) -> bool {
        let Some(denied) = PermissionDenied::parse(text) else {
            return false;
        };
        tracing::error!(denied = %denied, "the NATS server refused a permission");
        self.0.send_if_modified(|first| {
            if first.is_none() {
                *first = Some(denied);
                true
            } else {
                false
            }
        });
        true
    }
}

/// A connection's first permission refusal, when there was one.
#[derive(Debug, Clone)]
pub struct Denials(watch::Receiver<Option<PermissionDenied>>);

impl Denials {
    pub fn new() -> (DenialRecorder, Denials) {
        let (tx, rx) = watch::channel(None);
        (DenialRecorder(tx), Denials(rx))
    }

    /// The refusal seen so far, as the error to stop with.
    pub fn error(&self) -> Option<SinkError> {
        self.0.borrow().clone().map(SinkError::from)
    }

    /// Resolves with the first refusal (never when there is none).
    pub async fn wait(&self) -> SinkError {
        let mut rx = self.0.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(denied) => SinkError::from(denied.clone().expect("waited for Some")),
            Err(_) => std::future::pending().await,
        }
    }

    /// Runs `operation`, but fails as soon as the server refuses a permission; a failure of the
    /// operation after a refusal (a request that could not be answered) is the refusal.
    pub async fn guard<T>(
        &self,
        operation: impl Future<Output = Result<T, SinkError>>,
    ) -> Result<T, SinkError> {
        let result = tokio::select! {
            biased;
            denied = self.wait() => return Err(denied),
            result = operation => result,
        };
        result.map_err(|err| self.error().unwrap_or(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_servers_permission_violations() {
        for (text, operation, subject) in [
            (
                "Permissions Violation for Publish to \"$JS.API.STREAM.INFO.OUTBOX\"",
                DeniedOperation::Publish,
                "$JS.API.STREAM.INFO.OUTBOX",
            ),
            (
                "'Permissions Violation for Publish to \"outbox.order.created\"'",
                DeniedOperation::Publish,
                "outbox.order.created",
            ),
            (
                "Permissions Violation for Subscription to \"_INBOX.abc.*\"",
                DeniedOperation::Subscribe,
                "_INBOX.abc.*",
            ),
            (
                "Permissions Violation for Subscription to \"q.>\" using queue \"workers\"",
                DeniedOperation::Subscribe,
                "q.>",
            ),
            (
                "Permissions Violation for Publish with Reply of \"_INBOX.x.1\"",
                DeniedOperation::PublishReply,
                "_INBOX.x.1",
            ),
        ] {
            assert_eq!(
                PermissionDenied::parse(text),
                Some(PermissionDenied {
                    operation,
                    subject: subject.to_owned()
                }),
                "{text}"
            );
        }
        for other in [
            "Authorization Violation",
            "Maximum Payload Violation",
            "Permissions Violation for Publish to \"\"",
            "Slow Consumer",
        ] {
            assert_eq!(PermissionDenied::parse(other), None, "{other}");
        }
    }

    #[test]
    fn a_refusal_is_fatal_and_names_the_subject_and_the_list() {
        let err = SinkError::from(PermissionDenied {
            operation: DeniedOperation::Publish,
            subject: "$KV.outbox_cdc.outbox_cdc".into(),
        });
        assert!(!err.is_transient());
        assert_eq!(err.kind().as_str(), "permission");
        let text = err.to_string();
        assert!(
            text.contains("publish to `$KV.outbox_cdc.outbox_cdc`")
                && text.contains("`publish` permissions")
                && text.contains("docs/permissions.md"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_guarded_request_fails_at_the_first_refusal_not_at_its_timeout() {
        let (recorder, denials) = Denials::new();
        assert!(denials.error().is_none());
        // Not a refusal: nothing changes.
        assert!(!recorder.server_error("Slow Consumer"));
        let waiting = denials.guard(async {
            std::future::pending::<()>().await;
            Ok::<(), SinkError>(())
        });
        let refuse = async {
            assert!(
                recorder.server_error("Permissions Violation for Subscription to \"_INBOX.abc.*\"")
            );
            // A later refusal does not replace the first.
            recorder.server_error("Permissions Violation for Publish to \"other\"");
        };
        let (result, ()) = tokio::join!(waiting, refuse);
        let err = result.expect_err("the refusal ends the wait");
        assert!(
            err.to_string().contains("subscribe to `_INBOX.abc.*`"),
            "{err}"
        );
        // An operation that failed on its own after a refusal reports the refusal.
        let failed = denials
            .guard(async { Err::<(), _>(SinkError::StreamUnavailable("timed out".into())) })
            .await
            .expect_err("failed");
        assert!(matches!(failed, SinkError::PermissionDenied(_)), "{failed}");
    }
}
