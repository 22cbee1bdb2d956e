//! `--atomic-transactions`: a transaction's events are held until its commit and published as
//! one atomic JetStream batch (the sink's `batch` module), which consumers see whole or not at
//! all. A transaction that cannot be one batch goes out event by event, in the same order and
//! with the same guarantees as without the flag, and says so: a warning (once per reason and
//! session) and `atomic_fallbacks_total{reason}`.
//!
//! Holding a transaction costs memory up to the batch limit (1,000 events by default); past it
//! the transaction falls back, and what was held goes out first.

use crate::sink::NotBatchable;

/// Why a transaction of several events was not published as one atomic batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// More events than `--atomic-max-batch`.
    TooManyEvents,
    /// One of its rows is a poison row going to the dead-letter subject: the row's place in
    /// the transaction is kept, not its atomicity.
    DeadLetter,
    /// JetStream refused the batch as a whole (a row it cannot take, a duplicate id): event by
    /// event, each is taken, de-duplicated or refused on its own.
    Refused,
    /// The sink cannot send it as one batch.
    Sink(NotBatchable),
}

impl Fallback {
    /// Every reason: the `reason` label values of `atomic_fallbacks_total`, each exposed at 0
    /// from the start (see [`crate::stats`]).
    pub const ALL: [Fallback; 6] = [
        Fallback::TooManyEvents,
        Fallback::DeadLetter,
        Fallback::Refused,
        Fallback::Sink(NotBatchable::UnknownStream),
        Fallback::Sink(NotBatchable::SeveralStreams),
        Fallback::Sink(NotBatchable::MessageTooLarge),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::TooManyEvents => "too_many_events",
            Fallback::DeadLetter => "dead_letter",
            Fallback::Refused => "refused",
            Fallback::Sink(reason) => reason.as_str(),
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Fallback::TooManyEvents => {
                "it has more events than --atomic-max-batch (the server's max_batch_size): raise both, or keep transactions smaller"
            }
            Fallback::DeadLetter => "one of its rows is dead-lettered",
            Fallback::Refused => {
                "JetStream refused it as a batch; event by event, each is taken or refused on its own"
            }
            Fallback::Sink(NotBatchable::UnknownStream) => {
                "no stream of the account is known to capture one of its subjects"
            }
            Fallback::Sink(NotBatchable::SeveralStreams) => {
                "its events go to more than one stream, and a batch is stored by one"
            }
            Fallback::Sink(NotBatchable::MessageTooLarge) => {
                "one of its events is over the server's max_payload"
            }
        }
    }

    const COUNT: usize = Fallback::ALL.len();

    fn index(self) -> usize {
        match self {
            Fallback::TooManyEvents => 0,
            Fallback::DeadLetter => 1,
            Fallback::Refused => 2,
            Fallback::Sink(NotBatchable::UnknownStream) => 3,
            Fallback::Sink(NotBatchable::SeveralStreams) => 4,
            Fallback::Sink(NotBatchable::MessageTooLarge) => 5,
        }
    }
}

/// What [`OpenBatch::hold`] did with an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Held<T> {
    Yes,
    /// The transaction goes out event by event already: publish this one now.
    No(T),
    /// The transaction falls back with this event: publish what was held, then this one.
    FallsBack(T, Fallback),
}

/// The open transaction's events, held for its batch.
#[derive(Debug)]
pub struct OpenBatch<T> {
    max: usize,
    events: Vec<T>,
    /// Set once the transaction falls back: its remaining events go out at once.
    per_event: Option<Fallback>,
    warned: [bool; Fallback::COUNT],
}

impl<T> OpenBatch<T> {
    pub fn new(max: usize) -> Self {
        OpenBatch {
            max,
            events: Vec::new(),
            per_event: None,
            warned: [false; Fallback::COUNT],
        }
    }

    /// A transaction begins; `per_event` when it is known already that it cannot be a batch.
    pub fn begin(&mut self, per_event: Option<Fallback>) {
        self.events.clear();
        self.per_event = per_event;
    }

    /// Holds `event` for the batch, or hands it back when the transaction goes out event by
    /// event: with the reason when it falls back just now (`fallback`, why this event cannot
    /// join the batch, or the limit reached), so that the caller publishes what was held first.
    pub fn hold(&mut self, event: T, fallback: Option<Fallback>) -> Held<T> {
        if self.per_event.is_some() {
            return Held::No(event);
        }
        let fallback =
            fallback.or((self.events.len() >= self.max).then_some(Fallback::TooManyEvents));
        match fallback {
            Some(reason) => Held::FallsBack(event, reason),
            None => {
                self.events.push(event);
                Held::Yes
            }
        }
    }

    /// The transaction falls back (from [`OpenBatch::hold`], or at its commit for a reason the
    /// sink gave): returns the events held so far, to go out first, and whether this reason is
    /// news worth a warning (its first time in the session).
    pub fn fall_back(&mut self, reason: Fallback) -> (Vec<T>, bool) {
        self.per_event = Some(reason);
        let first = !std::mem::replace(&mut self.warned[reason.index()], true);
        (std::mem::take(&mut self.events), first)
    }

    /// The held events at the transaction's commit.
    pub fn take(&mut self) -> Vec<T> {
        std::mem::take(&mut self.events)
    }
}

/// The warning for a transaction that falls back.
pub fn warn(reason: Fallback, commit_lsn: crate::lsn::Lsn) {
    tracing::warn!(reason = reason.as_str(), %commit_lsn,
        "a transaction is published event by event, not as one atomic batch: {} (said once per reason; counted in atomic_fallbacks_total)",
        reason.explain());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_once_in_index_order() {
        for (i, reason) in Fallback::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
        for reason in NotBatchable::ALL {
            assert!(
                Fallback::ALL.contains(&Fallback::Sink(reason)),
                "{reason:?}"
            );
        }
    }

    #[test]
    fn holds_up_to_the_limit_then_falls_back() {
        let mut batch = OpenBatch::new(2);
        batch.begin(None);
        assert_eq!(batch.hold(1, None), Held::Yes);
        assert_eq!(batch.hold(2, None), Held::Yes);
        assert_eq!(
            batch.hold(3, None),
            Held::FallsBack(3, Fallback::TooManyEvents),
            "over the limit"
        );
        assert_eq!(batch.fall_back(Fallback::TooManyEvents), (vec![1, 2], true));
        assert_eq!(
            batch.hold(4, None),
            Held::No(4),
            "the rest goes out at once"
        );
        batch.begin(None);
        assert_eq!(batch.hold(5, None), Held::Yes);
        assert_eq!(
            batch.hold(6, Some(Fallback::DeadLetter)),
            Held::FallsBack(6, Fallback::DeadLetter)
        );
        assert_eq!(batch.fall_back(Fallback::DeadLetter), (vec![5], true));
        batch.begin(None);
        assert_eq!(batch.hold(7, None), Held::Yes);
        assert_eq!(batch.hold(8, None), Held::Yes);
        assert!(matches!(batch.hold(9, None), Held::FallsBack(9, _)));
        assert_eq!(
            batch.fall_back(Fallback::TooManyEvents),
            (vec![7, 8], false),
            "warned once per reason"
        );
        batch.begin(Some(Fallback::Refused));
        assert_eq!(batch.hold(10, None), Held::No(10));
        batch.begin(None);
        assert_eq!(batch.hold(11, None), Held::Yes);
        assert_eq!(batch.take(), vec![11]);
    }
}
