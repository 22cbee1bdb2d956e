//! JetStream acks matched to publishes by a sequence number in the reply subject.
//!
//! async-nats's JetStream publish is a request: per message a oneshot channel, a timer, a map
//! entry, a semaphore permit and a boxed future, then a generic JSON parse of the ack. The
//! pipeline already orders its publishes and bounds them with its window, so the sink publishes
//! with a reply subject of its own, `<inbox>.<sequence>`, receives every ack on one wildcard
//! subscription, and hands them back in publish order. One timer covers the oldest publish.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, StatusCode, Subject, Subscriber};
use futures::StreamExt;
use tokio::time::{Instant, Sleep};

/// JetStream stored the message (or already had it, by `Nats-Msg-Id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub duplicate: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AckError {
    /// Nothing listens on the subject: no stream captures it, or (in a cluster) its stream has
    /// no leader for a moment.
    #[error("no responders: no JetStream stream answered for this subject")]
    NoResponders,
    #[error("no ack within the ack timeout ({0:?})")]
    TimedOut(Duration),
    #[error("JetStream refused the message: {0}")]
    JetStream(jetstream::Error),
    #[error("unexpected answer to a publish: {0}")]
    Unexpected(String),
    #[error("the NATS connection closed before the ack arrived")]
    Closed,
}

pub type AckOutcome = Result<Ack, AckError>;

/// The publishes awaiting their ack, oldest first, each with its label, and the acks that
/// arrived out of turn.
#[derive(Debug)]
struct AckQueue<L> {
    /// Sequence of the oldest entry of `pending`.
    first: u64,
    pending: VecDeque<Pending<L>>,
    /// Atomic batches whose commit is pending.
    batches: usize,
}

#[derive(Debug)]
struct Pending<L> {
    sent: Instant,
    label: L,
    outcome: Option<AckOutcome>,
    role: Role,
}

/// A publish's part in an atomic batch: only a batch's last message is answered, for all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A message of its own.
    Single,
    /// A batch's message before its last: its outcome is the batch's.
    InBatch,
    /// A batch's last message, carrying `Nats-Batch-Commit`: its answer is the batch's.
    CommitsBatch,
}

impl<L> Default for AckQueue<L> {
    fn default() -> Self {
        AckQueue {
            first: 0,
            pending: VecDeque::new(),
            batches: 0,
        }
    }
}

impl<L> AckQueue<L> {
    /// The sequence the next publish carries.
    fn next_sequence(&self) -> u64 {
        self.first + self.pending.len() as u64
    }

    fn sent(&mut self, at: Instant, label: L, role: Role) {
        if role == Role::CommitsBatch {
            self.batches += 1;
        }
        self.pending.push_back(Pending {
            sent: at,
            label,
            outcome: None,
            role,
        });
    }

    /// Records the outcome of publish `sequence` (for a batch's commit, of the whole batch). An
    /// answer for a publish no longer pending (a late ack after a timeout, a stray message) is
    /// ignored.
    fn record(&mut self, sequence: u64, outcome: AckOutcome) {
        let Some(index) = sequence
            .checked_sub(self.first)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        let Some(entry) = self.pending.get_mut(index) else {
            return;
        };
        if entry.outcome.is_some() {
            return;
        }
        if entry.role == Role::CommitsBatch {
            for earlier in self.pending.range_mut(..index).rev() {
                if earlier.role != Role::InBatch {
                    break;
                }
                if earlier.outcome.is_none() {
                    earlier.outcome = Some(outcome.clone());
                }
            }
        }
        if let Some(entry) = self.pending.get_mut(index) {
            entry.outcome = Some(outcome);
        }
    }

    /// The oldest publish's label and outcome, once the outcome is known.
    fn pop_ready(&mut self) -> Option<(L, AckOutcome)> {
        if self.pending.front()?.outcome.is_some() {
            self.first += 1;
            let pending = self.pending.pop_front()?;
            if pending.role == Role::CommitsBatch {
                self.batches -= 1;
            }
            return pending.outcome.map(|outcome| (pending.label, outcome));
        }
        None
    }

    /// Marks the oldest publish as failed if it has no outcome yet.
    fn fail_oldest(&mut self, err: AckError) {
        if let Some(front) = self.pending.front_mut()
            && front.outcome.is_none()
        {
            front.outcome = Some(Err(err));
        }
    }

    fn oldest_sent(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.sent)
    }

    fn len(&self) -> usize {
        self.pending.len()
    }
}

/// Reply subjects for publishes, and their acks back in publish order, each with the label it
/// was sent with.
pub struct Acks<L> {
    subscription: Subscriber,
    /// `<inbox>.`; a publish's reply subject is this and its sequence.
    prefix: String,
    queue: AckQueue<L>,
    timeout: Duration,
    /// Fires no earlier than the oldest publish's deadline; re-armed only when it fires early,
    /// so that acks flowing in do not each touch the timer wheel.
    timer: std::pin::Pin<Box<Sleep>>,
}

impl<L> Acks<L> {
    pub async fn subscribe(
        client: &Client,
        timeout: Duration,
    ) -> Result<Self, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let subscription = client.subscribe(format!("{inbox}.*")).await?;
        Ok(Acks {
            subscription,
            prefix: format!("{inbox}."),
            queue: AckQueue::default(),
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
        })
    }

    /// The reply subject for the next publish; call [`Acks::sent`] once it is sent.
    pub fn reply_subject(&self) -> Subject {
        let mut subject = String::with_capacity(self.prefix.len() + 20);
        subject.push_str(&self.prefix);
        subject.push_str(itoa::Buffer::new().format(self.queue.next_sequence()));
        Subject::from(subject)
    }

    /// The publish with the last [`Acks::reply_subject`] went out; `label` comes back with its
    /// ack. For a message of an atomic batch but its last, sent with no reply subject, `role` is
    /// [`Role::InBatch`], and it takes the sequence a reply subject would have.
    pub fn sent(&mut self, label: L, role: Role) {
        self.queue.sent(Instant::now(), label, role);
    }

    /// Publishes awaiting their ack.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Atomic batches awaiting their commit's ack.
    pub fn batches(&self) -> usize {
        self.queue.batches
    }

    /// The label and outcome of the oldest pending publish. Cancel-safe; pending forever when
    /// nothing is in flight.
    pub async fn next(&mut self) -> (L, AckOutcome) {
        loop {
            if let Some(outcome) = self.queue.pop_ready() {
                return outcome;
            }
            let Some(oldest_sent) = self.queue.oldest_sent() else {
                return std::future::pending().await;
            };
            let deadline = oldest_sent + self.timeout;
            tokio::select! {
                biased;
                message = self.subscription.next() => match message {
                    Some(message) => self.on_message(message),
                    None => self.queue.fail_oldest(AckError::Closed),
                },
                () = &mut self.timer => {
                    if Instant::now() >= deadline {
                        self.queue.fail_oldest(AckError::TimedOut(self.timeout));
                    } else {
                        self.timer.as_mut().reset(deadline);
                    }
                }
            }
        }
    }

    fn on_message(&mut self, message: async_nats::Message) {
        let sequence = message
            .subject
            .as_str()
            .strip_prefix(self.prefix.as_str())
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(sequence) = sequence {
            self.queue
                .record(sequence, outcome(message.status, &message.payload));
        }
    }
}

/// Reads JetStream's answer to one publish.
fn outcome(status: Option<StatusCode>, payload: &[u8]) -> AckOutcome {
    match status {
        None | Some(StatusCode::OK) => {}
        Some(StatusCode::NO_RESPONDERS) => return Err(AckError::NoResponders),
        Some(other) => return Err(AckError::Unexpected(format!("status {other}"))),
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Option<jetstream::Error>,
        // Every ack names the stream; its absence means the answer is something else.
        #[serde(default)]
        seq: Option<u64>,
        #[serde(default)]
        duplicate: bool,
    }
    match serde_json::from_slice::<Answer>(payload) {
        Ok(Answer {
            error: Some(error), ..
        }) => Err(AckError::JetStream(error)),
        Ok(Answer {
            seq: Some(_),
            duplicate,
            ..
        }) => Ok(Ack { duplicate }),
        Ok(_) | Err(_) => Err(AckError::Unexpected(
            String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_acks_duplicates_and_errors() {
        assert_eq!(
            outcome(None, br#"{"stream":"OUTBOX","seq":7}"#).unwrap(),
            Ack { duplicate: false }
        );
        assert_eq!(
            outcome(
                None,
                br#"{"stream":"OUTBOX","domain":"hub","seq":7,"duplicate":true}"#
            )
            .unwrap(),
            Ack { duplicate: true }
        );
        let Err(AckError::JetStream(error)) = outcome(
            None,
            br#"{"error":{"code":400,"err_code":10097,"description":"header size exceeds maximum allowed of 64kb"}}"#,
        ) else {
            panic!("an error answer is an error");
        };
        assert_eq!(error.code(), 400);
        assert!(matches!(
            outcome(Some(StatusCode::NO_RESPONDERS), b""),
            Err(AckError::NoResponders)
        ));
        assert!(matches!(
            outcome(None, b"+OK"),
            Err(AckError::Unexpected(text)) if text == "+OK"
        ));
        assert!(matches!(outcome(None, b"{}"), Err(AckError::Unexpected(_))));
    }

    #[test]
    fn hands_acks_back_in_publish_order_whatever_order_they_arrive_in() {
        let mut queue = AckQueue::<u32>::default();
        let now = Instant::now();
        for label in 0..3 {
            queue.sent(now, label, Role::Single);
        }
        queue.record(2, Ok(Ack { duplicate: true }));
        queue.record(1, Err(AckError::NoResponders));
        assert!(queue.pop_ready().is_none(), "the oldest has no ack yet");
        queue.record(0, Ok(Ack { duplicate: false }));
        queue.record(0, Err(AckError::Closed));
        assert!(matches!(
            queue.pop_ready(),
            Some((0, Ok(Ack { duplicate: false })))
        ));
        assert!(matches!(
            queue.pop_ready(),
            Some((1, Err(AckError::NoResponders)))
        ));
        assert!(matches!(
            queue.pop_ready(),
            Some((2, Ok(Ack { duplicate: true })))
        ));
        assert!(queue.pop_ready().is_none());
        assert_eq!(queue.next_sequence(), 3);
        // Late or stray answers change nothing.
        queue.record(1, Ok(Ack { duplicate: false }));
        queue.record(99, Ok(Ack { duplicate: false }));
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn a_timeout_fails_only_the_oldest_publish_without_an_answer() {
        let mut queue = AckQueue::<u32>::default();
        let now = Instant::now();
        queue.sent(now, 0, Role::Single);
        queue.sent(now, 1, Role::Single);
        queue.fail_oldest(AckError::TimedOut(Duration::from_secs(1)));
        assert!(matches!(
            queue.pop_ready(),
            Some((0, Err(AckError::TimedOut(_))))
        ));
        queue.record(1, Ok(Ack { duplicate: false }));
        queue.fail_oldest(AckError::Closed);
        assert!(
            matches!(queue.pop_ready(), Some((1, Ok(_)))),
            "an ack that arrived stands"
        );
    }

    #[test]
    fn a_batch_is_answered_once_for_all_its_messages() {
        let mut queue = AckQueue::<u32>::default();
        let now = Instant::now();
        queue.sent(now, 0, Role::Single);
        queue.sent(now, 1, Role::InBatch);
        queue.sent(now, 2, Role::InBatch);
        queue.sent(now, 3, Role::CommitsBatch);
        queue.sent(now, 4, Role::InBatch);
        queue.sent(now, 5, Role::CommitsBatch);
        assert_eq!(queue.batches, 2);
        queue.record(5, Err(AckError::Closed));
        queue.record(3, Ok(Ack { duplicate: false }));
        assert!(
            queue.pop_ready().is_none(),
            "the single message has no ack yet"
        );
        queue.record(0, Ok(Ack { duplicate: false }));
        let popped: Vec<(u32, bool)> = std::iter::from_fn(|| queue.pop_ready())
            .map(|(label, outcome)| (label, outcome.is_ok()))
            .collect();
        assert_eq!(
            popped,
            [
                (0, true),
                (1, true),
                (2, true),
                (3, true),
                (4, false),
                (5, false)
            ],
            "each batch's answer reaches its own messages, and no others"
        );
        assert_eq!(queue.batches, 0);
    }
}
