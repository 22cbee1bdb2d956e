//! The errors the commands share: [`ConfigError`], a flag, value or config file found wrong
//! before anything is connected (the process exits 2 for it), and [`AdminError`], what `setup`
//! and `status` fail with. A leaf: it imports no other command module.

use crate::sink::NatsUrlError;
use crate::source::SourceError;
use crate::source::connection::DatabaseUrlError;

/// A flag, value or config file found wrong before anything is connected: exit 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}", clap_message(.0))]
    Cli(#[from] clap::Error),
    #[error("config file {file}: {detail}")]
    ConfigFile { file: String, detail: String },
    #[error(
        "config file {file}: unknown key `{key}`: no command of outbox-cdc has a flag --{}; the \
         keys are flags without the dashes (e.g. max_in_flight = 4096), see `outbox-cdc \
         <command> --help`",
        key.replace('_', "-")
    )]
    UnknownKey { file: String, key: String },
    #[error("config file {file}: `{key}` cannot be set in the config file, only as a flag")]
    NotInFile { file: String, key: String },
    #[error("config file {file}: invalid value for `{key}`: {detail}")]
    InvalidValue {
        file: String,
        key: String,
        detail: String,
    },
    #[error(
        "no PostgreSQL URL: pass --database-url or set OUTBOX_CDC_DATABASE_URL or DATABASE_URL"
    )]
    NoDatabaseUrl,
    #[error(transparent)]
    DatabaseUrl(#[from] DatabaseUrlError),
    #[error("--database-url: {0}")]
    ReplicationConnection(&'static str),
    #[error("--standby-url: {0}")]
    StandbyUrl(DatabaseUrlError),
    #[error(transparent)]
    NatsUrl(#[from] NatsUrlError),
    #[error(
        "--stream creates a stream capturing the subjects outbox-cdc publishes, but with --subject-column and no --subject-template they are not known in advance: create the stream yourself (and drop --stream), or give --subject-template"
    )]
    StreamSubjectsUnknown,
    #[error(
        "--cloudevents-source, --cloudevents-type and --cloudevents-subject-column set what \
         --cloudevents publishes: give --cloudevents binary or structured too"
    )]
    CloudEventsOff,
    #[error("--on-error dead-letter needs a valid --dead-letter-subject{}", match .0 {
        Some((subject, reason)) => format!(": `{subject}`: {reason}"),
        None => String::new(),
    })]
    DeadLetterSubject(Option<(String, String)>),
    #[error(
        "--atomic-transactions needs fencing (it learns each batch's stream, and the sequence \
         the batch must follow, from it): drop --no-fencing"
    )]
    AtomicWithoutFencing,
    #[error(
        "{0} describes the stream --stream creates, and there is no --stream: give --stream NAME, \
         or drop {0} (a stream you create yourself is configured with `nats stream add`, see \
         docs/streams.md)"
    )]
    StreamFlagWithoutStream(&'static str),
    #[error(
        "streams {first} and {second} would capture the same subjects, which JetStream refuses: \
         give the tables that have a stream of their own a subject template of their own"
    )]
    StreamsOverlap { first: String, second: String },
    #[error(
        "--stream-max-age {max_age} is shorter than --duplicate-window {window}: JetStream \
         refuses such a stream; lengthen the max age or shorten the window"
    )]
    MaxAgeUnderDuplicateWindow { max_age: String, window: String },
    #[error("--message-prefix `{0}`: {1}")]
    MessagePrefix(String, &'static str),
    #[error("--replication-timeout must be at least 1s")]
    ReplicationTimeout,
    #[error("--status-interval must be at least 10ms")]
    StatusInterval,
}

/// A clap error's first line without the `error: ` prefix.
pub fn clap_message(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// What `setup` and `status` can fail with, once their flags were checked.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(
        "replication slot `{slot}` does not exist; `outbox-cdc setup --apply` or the first `outbox-cdc run` creates it"
    )]
    SlotMissing { slot: String },
    #[error(
        "replication slot `{slot}` is invalidated (wal_status = lost): PostgreSQL removed WAL it still needed. Drop and recreate it (`SELECT pg_drop_replication_slot('{slot}');`), then re-publish what was missed from the table"
    )]
    SlotLost { slot: String },
    #[error("the server is not ready for outbox-cdc: {0} problem(s) listed above")]
    NotReady(usize),
}
