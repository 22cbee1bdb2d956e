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
    /// An atomic batch refused twice as holding a stored id, while the stream's end, read in
    /// between, does not hold its transaction.
    #[error(
        "{refused}, a second time, although the stream's end, read again since, does not hold \
         the transaction: one of its event ids was used by an earlier event (within the \
         stream's duplicate window). outbox-cdc stops rather than publish the transaction event \
         by event, where consumers would see part of it and JetStream would drop the event with \
         the repeated id. Give every row its own id (see --id-column), then restart; or run \
         without --atomic-transactions, where JetStream drops a repeated id as a duplicate"
    )]
    IdUsedTwice { refused: Box<SinkError> },
    #[error(
        "an --initial-backfill did not finish: start again with the same --initial-backfill (it \
         drops the slot `{slot}`, which never streamed, and begins again), or drop the slot \
         (`SELECT pg_drop_replication_slot('{slot}');`)"
    )]
    InitialBackfillUnfinished { slot: String },
    #[error(
        "--initial-backfill publishes the rows it selects in the snapshot of a slot it creates, \
         but replication slot `{slot}` exists already and events were published from it \
         ({published}), which the checkpoint does not record. Either drop the slot \
         (`SELECT pg_drop_replication_slot('{slot}');`) and start again with \
         --initial-backfill, or start without it and publish the rows the stream lacks with \
         `outbox-cdc backfill --where …` (it skips the ids the stream holds)"
    )]
    InitialBackfillSlotExists { slot: String, published: String },
    #[error(
        "the config file's section `[tables.\"{section}\"]` names no table of publication \
         `{publication}`; its tables: {}",
        tables.join(", ")
    )]
    NoSuchTable {
        section: String,
        publication: String,
        tables: Vec<String>,
    },
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
            Error::Sink(_)
            | Error::Source(_)
            | Error::Schema(_)
            | Error::Gap(_)
            | Error::IdUsedTwice { .. }
            | Error::InitialBackfillUnfinished { .. }
            | Error::InitialBackfillSlotExists { .. }
            | Error::NoSuchTable { .. } => Disposition::Fatal,
        }
    }

    /// A combination of flags and state the process cannot honour, found before anything was
    /// published: exit 2, as for a wrong flag.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::InitialBackfillSlotExists { .. })
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
