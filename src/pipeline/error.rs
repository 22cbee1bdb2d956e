//! The one error type the supervisor looks at, and the one place that decides what each error
//! means: retry, stop, or a poison row (which `--on-error` decides about).

use super::continuity::Gap;
use super::mapping::{MissingColumn, UnmappableRow};
use super::poison::PoisonKind;
use crate::sink::SinkError;
use crate::source::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Unmappable(#[from] UnmappableRow),
    #[error(transparent)]
    Schema(#[from] MissingColumn),
    #[error(transparent)]
    Gap(#[from] Box<Gap>),
}

/// What an error means for the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The server's state or the network: a new session, after a backoff, can succeed.
    Transient,
    /// Configuration or the servers' set-up must change: stop and say what to change.
    Fatal,
    /// One row cannot be published as itself: `--on-error` decides (see [`super::poison`]).
    Poison(PoisonKind),
}

impl Error {
    pub fn disposition(&self) -> Disposition {
        match self {
            Error::Unmappable(_) => Disposition::Poison(PoisonKind::Unmappable),
            Error::Sink(SinkError::TooLarge { .. }) => Disposition::Poison(PoisonKind::TooLarge),
            Error::Sink(SinkError::NoStream { .. }) => Disposition::Poison(PoisonKind::NoStream),
            Error::Sink(SinkError::Rejected { .. }) => Disposition::Poison(PoisonKind::Rejected),
            Error::Sink(e) if e.is_transient() => Disposition::Transient,
            Error::Source(e) if e.is_transient() => Disposition::Transient,
            Error::Sink(_) | Error::Source(_) | Error::Schema(_) | Error::Gap(_) => {
                Disposition::Fatal
            }
        }
    }

    pub fn is_transient(&self) -> bool {
        self.disposition() == Disposition::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventRef;
    use crate::lsn::Lsn;

    fn event() -> EventRef {
        EventRef {
            event_id: "1".into(),
            table: "public.outbox".into(),
            subject: Some("outbox.a.b".into()),
            commit_lsn: Lsn::new(16),
            row_index: 0,
        }
    }

    #[test]
    fn every_error_has_one_disposition() {
        let cases = [
            (Error::from(SinkError::Disconnected), Disposition::Transient),
            (
                SinkError::Fenced {
                    event: event(),
                    detail: "wrong last msg ID".into(),
                }
                .into(),
                Disposition::Transient,
            ),
            (
                SinkError::NoStream { event: event() }.into(),
                Disposition::Poison(PoisonKind::NoStream),
            ),
            (
                SinkError::TooLarge {
                    event: event(),
                    size: 2,
                    max: 1,
                }
                .into(),
                Disposition::Poison(PoisonKind::TooLarge),
            ),
            (
                SinkError::Rejected {
                    event: event(),
                    detail: "headers too large".into(),
                }
                .into(),
                Disposition::Poison(PoisonKind::Rejected),
            ),
            (
                UnmappableRow {
                    event: event(),
                    reason: "NULL".into(),
                }
                .into(),
                Disposition::Poison(PoisonKind::Unmappable),
            ),
            (
                SinkError::Stream("invalid".into()).into(),
                Disposition::Fatal,
            ),
            (SourceError::Ended.into(), Disposition::Transient),
            (
                SourceError::WalLevel {
                    actual: "replica".into(),
                }
                .into(),
                Disposition::Fatal,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(error.disposition(), expected, "{error}");
            assert_eq!(error.is_transient(), expected == Disposition::Transient);
        }
    }
}
