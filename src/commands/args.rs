//! The argument groups and value parsers the commands share. Every flag that more than one
//! command takes is declared here once — one name, one environment variable, one default — and
//! flattened into each command that uses it; a flag only one command takes lives in that
//! command's module. A leaf: it imports no other command module but [`super::error`].
//!
//! Doc comments are the help: the first paragraph is what `-h` shows, all of it `--help`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::error::ConfigError;
use crate::pipeline::mapping::{
    CloudEventsConfig, CloudEventsMode, DEFAULT_SUBJECT_TEMPLATE, MappingConfig, Mappings,
    SubjectTemplate, Template,
};
use crate::pipeline::poison::ErrorPolicy;
use crate::sink::{Discard, NatsAuth, NatsUrls, SinkConfig, StreamLimits, StreamSpec};
use crate::source::connection::DatabaseUrl;
use crate::source::{PublicationName, SlotName};
use crate::subject::{
    SubjectMap, SubjectRule, add_capture_filter, filters_overlap, validate_subject,
};

/// The headings `--help` groups options under.
pub mod heading {
    pub const CONNECTION: &str = "Connection";
    pub const MAPPING: &str = "Mapping";
    pub const DELIVERY: &str = "Delivery";
    pub const RECOVERY: &str = "Recovery";
    pub const OPERATIONS: &str = "Operations";
    /// In the order `--help` and `--print-config` show them, after a command's own options.
    pub const ORDER: [&str; 5] = [CONNECTION, MAPPING, DELIVERY, RECOVERY, OPERATIONS];
}

/// Flags read from a second environment variable when their own is unset or empty: the names
/// other PostgreSQL and NATS tools use.
pub const ENV_FALLBACKS: [(&str, &str); 2] =
    [("database_url", "DATABASE_URL"), ("nats_url", "NATS_URL")];

/// The default NATS server.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Where PostgreSQL is.
#[derive(Debug, Clone, Default, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string [env: OUTBOX_CDC_DATABASE_URL, then DATABASE_URL]
    ///
    /// libpq's two forms: a URL (postgresql://user:password@a:5432,b:5432/app?sslmode=verify-full)
    /// or key/value pairs (host=a,b dbname=app user=outbox sslmode=verify-full). With several
    /// hosts the first primary is used (target_session_attrs=any: the first that answers).
    ///
    /// Honoured as libpq honours them: host, hostaddr (not with host), port, dbname, user,
    /// password, sslmode,
    /// sslrootcert (a file, or `system`; without it verify-ca and verify-full read
    /// ~/.postgresql/root.crt, and with a root certificate sslmode=require verifies the chain),
    /// sslcert, sslkey (default ~/.postgresql/postgresql.crt and .key when they exist),
    /// connect_timeout (seconds for each host; default here 10), channel_binding,
    /// load_balance_hosts, application_name, fallback_application_name, target_session_attrs.
    /// Any other parameter is refused at start. The replication connection cannot bind to the TLS
    /// channel: `run` refuses channel_binding=require (use sslmode=verify-full). The PG*
    /// environment variables (PGHOST, PGPASSWORD, PGSSLMODE, …) and ~/.pgpass are not read: put
    /// every setting in this string.
    #[arg(
        long,
        env = "OUTBOX_CDC_DATABASE_URL",
        hide_env = true,
        value_name = "URL",
        help_heading = heading::CONNECTION
    )]
    pub database_url: Option<String>,
}

impl DatabaseArgs {
    /// The connection string, parsed; it is required.
    pub fn resolve(&self) -> Result<DatabaseUrl, ConfigError> {
        self.resolve_optional()?.ok_or(ConfigError::NoDatabaseUrl)
    }

    /// The connection string, parsed, when one is given.
    pub fn resolve_optional(&self) -> Result<Option<DatabaseUrl>, ConfigError> {
        match self.database_url.as_deref().filter(|url| !url.is_empty()) {
            Some(url) => Ok(Some(url.parse()?)),
            None => Ok(None),
        }
    }
}

/// Where NATS is and how to authenticate to it.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URLs, comma-separated [env: OUTBOX_CDC_NATS_URL, then NATS_URL]
    ///
    /// e.g. nats://host1:4222,nats://host2:4222; a user and password or a token may be given in
    /// the URLs (nats://user:password@host:4222), the same for every server.
    #[arg(
        long,
        env = "OUTBOX_CDC_NATS_URL",
        hide_env = true,
        value_name = "URLS",
        default_value = DEFAULT_NATS_URL,
        help_heading = heading::CONNECTION
    )]
    pub nats_url: String,

    /// NATS credentials file (user JWT and NKey seed), e.g. from `nsc generate creds`
    #[arg(long, env = "OUTBOX_CDC_NATS_CREDS", value_name = "FILE", help_heading = heading::CONNECTION)]
    pub nats_creds: Option<PathBuf>,

    /// File holding the NKey seed (`SU…`) to authenticate to NATS with
    #[arg(long, env = "OUTBOX_CDC_NATS_NKEY", value_name = "FILE", help_heading = heading::CONNECTION)]
    pub nats_nkey: Option<PathBuf>,

    /// CA certificate (PEM) to verify the NATS server with; turns TLS on
    #[arg(long, env = "OUTBOX_CDC_NATS_TLS_CA", value_name = "FILE", help_heading = heading::CONNECTION)]
    pub nats_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS with NATS; needs --nats-tls-key
    #[arg(long, env = "OUTBOX_CDC_NATS_TLS_CERT", value_name = "FILE", help_heading = heading::CONNECTION)]
    pub nats_tls_cert: Option<PathBuf>,

    /// Client private key (PEM) for mutual TLS with NATS
    #[arg(long, env = "OUTBOX_CDC_NATS_TLS_KEY", value_name = "FILE", help_heading = heading::CONNECTION)]
    pub nats_tls_key: Option<PathBuf>,
}

impl NatsArgs {
    /// Checked URLs and authentication settings.
    pub fn resolve(&self) -> Result<(NatsUrls, NatsAuth), ConfigError> {
        let url = match self.nats_url.as_str() {
            "" => DEFAULT_NATS_URL,
            url => url,
        };
        let auth = NatsAuth {
            creds_file: self.nats_creds.clone(),
            nkey_file: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
        };
        Ok((url.parse()?, auth))
    }
}

/// The replication slot.
#[derive(Debug, Clone, Args)]
pub struct SlotArgs {
    /// Logical replication slot (pgoutput)
    ///
    /// `run` creates it when missing (unless --no-create-slot); on PostgreSQL 17+ with
    /// failover = true.
    #[arg(long, env = "OUTBOX_CDC_SLOT", default_value = "outbox_cdc", help_heading = heading::CONNECTION)]
    pub slot: SlotName,
}

/// The publication of the outbox table(s).
#[derive(Debug, Clone, Args)]
pub struct PublicationArgs {
    /// Publication of the outbox table(s)
    #[arg(long, env = "OUTBOX_CDC_PUBLICATION", default_value = "outbox_pub", help_heading = heading::CONNECTION)]
    pub publication: PublicationName,
}

/// The outbox's JetStream stream.
#[derive(Debug, Clone, Default, Args)]
pub struct StreamArgs {
    /// Create this JetStream stream for the events' subjects when it does not exist
    ///
    /// It captures the subjects the template (and --subject-map) can produce, and the dead
    /// letters'. Without it, streams are yours to create.
    #[arg(long, env = "OUTBOX_CDC_STREAM", help_heading = heading::DELIVERY)]
    pub stream: Option<String>,
}

/// The event id column, in `run`'s mapping and for `verify`.
#[derive(Debug, Clone, Default, Args)]
pub struct IdColumnArgs {
    /// Column whose text becomes the event id (Nats-Msg-Id) [default: `id` when the table has it]
    ///
    /// Without such a column, events from the WAL get `<commit LSN>:<row index>`, which a table
    /// row alone cannot reproduce: `backfill` and `verify` then need this flag.
    #[arg(long, env = "OUTBOX_CDC_ID_COLUMN", value_name = "COLUMN", help_heading = heading::MAPPING)]
    pub id_column: Option<String>,
}

/// How a row becomes a message.
#[derive(Debug, Clone, Args)]
pub struct MappingArgs {
    #[command(flatten)]
    pub id: IdColumnArgs,

    /// Column holding the message body
    ///
    /// json, jsonb and text as they are; bytea as raw bytes; NULL is an empty body.
    #[arg(long, env = "OUTBOX_CDC_PAYLOAD_COLUMN", value_name = "COLUMN", default_value = "payload",
          help_heading = heading::MAPPING)]
    pub payload_column: String,

    /// Column holding a JSON object of extra NATS headers [default: `headers` when the table has it]
    #[arg(long, env = "OUTBOX_CDC_HEADERS_COLUMN", value_name = "COLUMN", help_heading = heading::MAPPING)]
    pub headers_column: Option<String>,

    /// Column holding the whole subject, used instead of the template when not NULL
    #[arg(long, env = "OUTBOX_CDC_SUBJECT_COLUMN", value_name = "COLUMN", help_heading = heading::MAPPING)]
    pub subject_column: Option<String>,

    /// Subject with {column} placeholders filled from the row [default: outbox.{aggregate_type}.{event_type}]
    ///
    /// With --subject-column, the template is only the fallback for rows whose subject column is
    /// NULL, and has no default.
    #[arg(long, env = "OUTBOX_CDC_SUBJECT_TEMPLATE", value_name = "TEMPLATE", help_heading = heading::MAPPING)]
    pub subject_template: Option<SubjectTemplate>,

    /// Rewrite subjects before publishing: FROM=TO, repeatable, the first match wins
    ///
    /// NATS wildcards: `*` one token, a final `>` the rest, e.g. `outbox.order.*=prod.orders.*`.
    #[arg(long, env = "OUTBOX_CDC_SUBJECT_MAP", value_name = "FROM=TO", value_delimiter = ',',
          action = clap::ArgAction::Append, help_heading = heading::MAPPING)]
    pub subject_map: Vec<SubjectRule>,

    /// Publish CloudEvents 1.0: `binary` (ce-* headers, the payload as the body) or `structured`
    ///
    /// As the CloudEvents NATS binding lays them out: ce-specversion, ce-id (the event id),
    /// ce-source, ce-type, ce-time (the commit time), ce-subject (the aggregate id) and
    /// content-type; `structured` puts the whole event, JSON, in the body
    /// (`application/cloudevents+json`).
    #[arg(long, env = "OUTBOX_CDC_CLOUDEVENTS", value_name = "MODE", value_enum,
          help_heading = heading::MAPPING)]
    pub cloudevents: Option<CloudEventsArg>,

    /// CloudEvents source [default: /outbox-cdc/<database>/<schema.table>]
    #[arg(long, env = "OUTBOX_CDC_CLOUDEVENTS_SOURCE", value_name = "URI", help_heading = heading::MAPPING)]
    pub cloudevents_source: Option<String>,

    /// CloudEvents type, with {column} placeholders [default: {event_type}, else schema.table]
    #[arg(long, env = "OUTBOX_CDC_CLOUDEVENTS_TYPE", value_name = "TEMPLATE", help_heading = heading::MAPPING)]
    pub cloudevents_type: Option<Template>,

    /// Column of the CloudEvents subject [default: aggregate_id when the table has it]
    #[arg(long, env = "OUTBOX_CDC_CLOUDEVENTS_SUBJECT_COLUMN", value_name = "COLUMN",
          help_heading = heading::MAPPING)]
    pub cloudevents_subject_column: Option<String>,
}

/// `--cloudevents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CloudEventsArg {
    Binary,
    Structured,
}

impl MappingArgs {
    /// The mapping; `database` is the database's name (for the CloudEvents source).
    pub fn resolve(self, database: &str) -> Result<MappingConfig, ConfigError> {
        let cloudevents = match self.cloudevents {
            Some(mode) => Some(CloudEventsConfig {
                mode: match mode {
                    CloudEventsArg::Binary => CloudEventsMode::Binary,
                    CloudEventsArg::Structured => CloudEventsMode::Structured,
                },
                source: self.cloudevents_source,
                database: database.to_owned(),
                type_template: self.cloudevents_type,
                subject_column: self.cloudevents_subject_column,
            }),
            None if self.cloudevents_source.is_some()
                || self.cloudevents_type.is_some()
                || self.cloudevents_subject_column.is_some() =>
            {
                return Err(ConfigError::CloudEventsOff);
            }
            None => None,
        };
        let subject_template = match (self.subject_template, &self.subject_column) {
            (Some(template), _) => Some(template),
            (None, Some(_)) => None,
            (None, None) => Some(
                DEFAULT_SUBJECT_TEMPLATE
                    .parse()
                    .expect("the default template is valid"),
            ),
        };
        Ok(MappingConfig {
            id_column: self.id.id_column,
            payload_column: self.payload_column,
            headers_column: self.headers_column,
            subject_template,
            subject_column: self.subject_column,
            subject_map: SubjectMap::new(self.subject_map),
            cloudevents,
        })
    }
}

/// What to do with a row that cannot be published as itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    Fail,
    DeadLetter,
}

/// Poison rows.
#[derive(Debug, Clone, Args)]
pub struct PoisonArgs {
    /// What to do with a row that cannot be published as itself
    ///
    /// Unmappable, over max_payload, or no stream captures its subject. `fail` stops with a
    /// message naming it (and meets it again at the next start until it is fixed);
    /// `dead-letter` publishes it to --dead-letter-subject with the reason in headers, and goes
    /// on.
    #[arg(long, env = "OUTBOX_CDC_ON_ERROR", value_enum, default_value_t = OnError::Fail,
          help_heading = heading::DELIVERY)]
    pub on_error: OnError,

    /// Subject for dead letters (required with --on-error dead-letter)
    #[arg(long, env = "OUTBOX_CDC_DEAD_LETTER_SUBJECT", value_name = "SUBJECT", help_heading = heading::DELIVERY)]
    pub dead_letter_subject: Option<String>,
}

impl PoisonArgs {
    pub fn resolve(self) -> Result<ErrorPolicy, ConfigError> {
        match (self.on_error, self.dead_letter_subject) {
            (OnError::Fail, _) => Ok(ErrorPolicy::Fail),
            (OnError::DeadLetter, None) => Err(ConfigError::DeadLetterSubject(None)),
            (OnError::DeadLetter, Some(subject)) => {
                validate_subject(&subject).map_err(|reason| {
                    ConfigError::DeadLetterSubject(Some((subject.clone(), reason)))
                })?;
                Ok(ErrorPolicy::DeadLetter { subject })
            }
        }
    }
}

/// Publishing to JetStream.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub stream: StreamArgs,

    /// Duplicate window of a stream created with --stream
    ///
    /// JetStream drops an event whose id it stored this recently. Make it longer than the
    /// longest restart you expect (a NATS cluster upgrade, a database failover): after a longer
    /// one only fencing keeps re-sent events out, and with --no-fencing nothing does.
    #[arg(long, env = "OUTBOX_CDC_DUPLICATE_WINDOW", value_name = "DURATION", default_value = "10m",
          value_parser = parse_duration, help_heading = heading::DELIVERY)]
    pub duplicate_window: Duration,

    /// Copies of each event in a stream created with --stream: 3 in a production cluster
    ///
    /// A JetStream cluster of three nodes keeps an R3 stream, and publishing to it, through the
    /// loss of one node; 1 on a single server. At most 5.
    #[arg(long, env = "OUTBOX_CDC_STREAM_REPLICAS", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5), help_heading = heading::DELIVERY)]
    pub stream_replicas: u8,

    /// A stream created with --stream removes events older than this [default: kept for ever]
    ///
    /// Whether consumers read them or not; e.g. 7d. At least --duplicate-window.
    #[arg(long, env = "OUTBOX_CDC_STREAM_MAX_AGE", value_name = "DURATION",
          value_parser = parse_duration, help_heading = heading::DELIVERY)]
    pub stream_max_age: Option<Duration>,

    /// The most a stream created with --stream holds, e.g. 50GiB [default: no limit of its own]
    ///
    /// Bytes, or with a unit: KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (of 1024).
    /// When it is full, --stream-discard decides.
    #[arg(long, env = "OUTBOX_CDC_STREAM_MAX_BYTES", value_name = "SIZE",
          value_parser = parse_size, help_heading = heading::DELIVERY)]
    pub stream_max_bytes: Option<u64>,

    /// What a full stream created with --stream does (at --stream-max-bytes)
    ///
    /// `new`: it refuses new events, and outbox-cdc stops (exit 1) with an error naming the
    /// stream; nothing is lost, the events wait in the replication slot, whose WAL grows on the
    /// database server until there is room. `old`: it removes its oldest events to make room,
    /// whether consumers read them or not.
    #[arg(long, env = "OUTBOX_CDC_STREAM_DISCARD", value_enum, value_name = "POLICY",
          default_value_t = StreamDiscard::New, help_heading = heading::DELIVERY)]
    pub stream_discard: StreamDiscard,

    /// Publishes awaiting their JetStream ack at most
    #[arg(long, env = "OUTBOX_CDC_MAX_IN_FLIGHT", value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=65536), help_heading = heading::DELIVERY)]
    pub max_in_flight: u32,

    /// How long to wait for a JetStream ack (`run` then starts its session over)
    #[arg(long, env = "OUTBOX_CDC_ACK_TIMEOUT", value_name = "DURATION", default_value = "10s",
          value_parser = parse_duration, help_heading = heading::DELIVERY)]
    pub ack_timeout: Duration,

    /// Do not name each publish's predecessor in its stream (for streams others write into)
    ///
    /// Fencing (`Nats-Expected-Last-Msg-Id`) keeps commit order when a publish is lost while a
    /// later one is stored (a JetStream cluster's stream leader changing), and lets a restart
    /// skip what the stream holds; it needs the outbox's streams to be written by outbox-cdc
    /// alone.
    #[arg(long, env = "OUTBOX_CDC_NO_FENCING", help_heading = heading::DELIVERY)]
    pub no_fencing: bool,
}

/// What a full stream does (`--stream-discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StreamDiscard {
    New,
    Old,
}

impl PublishArgs {
    /// The streams to create: `--stream`'s and the config file's per-table ones, each
    /// (name, subjects); none without either, where the `--stream-*` flags have nothing to
    /// apply to.
    fn stream_specs(
        &self,
        wanted: Vec<(String, Vec<String>)>,
        atomic: bool,
    ) -> Result<Vec<StreamSpec>, ConfigError> {
        let limits = StreamLimits {
            max_age: self.stream_max_age.filter(|age| !age.is_zero()),
            max_bytes: self.stream_max_bytes,
            discard: match self.stream_discard {
                StreamDiscard::New => Discard::New,
                StreamDiscard::Old => Discard::Old,
            },
        };
        if wanted.is_empty() {
            let given = [
                ("--stream-replicas", self.stream_replicas != 1),
                ("--stream-max-age", self.stream_max_age.is_some()),
                ("--stream-max-bytes", self.stream_max_bytes.is_some()),
                (
                    "--stream-discard",
                    self.stream_discard != StreamDiscard::New,
                ),
            ];
            return match given.iter().find(|(_, set)| *set) {
                Some((flag, _)) => Err(ConfigError::StreamFlagWithoutStream(flag)),
                None => Ok(Vec::new()),
            };
        }
        if let Some(age) = limits.max_age
            && age < self.duplicate_window
        {
            return Err(ConfigError::MaxAgeUnderDuplicateWindow {
                max_age: humantime::format_duration(age).to_string(),
                window: humantime::format_duration(self.duplicate_window).to_string(),
            });
        }
        Ok(wanted
            .into_iter()
            .map(|(name, subjects)| StreamSpec {
                name,
                subjects,
                replicas: usize::from(self.stream_replicas),
                limits,
                duplicate_window: self.duplicate_window,
                allow_atomic: atomic,
            })
            .collect())
    }
}

/// The JetStream side of `run` and `backfill`: where to publish the events each table's mapping
/// makes, and the dead letters of each table's `--on-error`.
pub fn sink_config(
    nats: &NatsArgs,
    publish: PublishArgs,
    mappings: &Mappings,
    table_streams: &[(String, String)],
    atomic: bool,
) -> Result<SinkConfig, ConfigError> {
    let (urls, auth) = nats.resolve()?;
    let mut event_subjects: Vec<String> = Vec::new();
    let mut capture_subjects: Vec<String> = Vec::new();
    // (stream, the subjects it captures, the tables whose they are)
    let mut streams: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let default_stream = publish.stream.stream.clone();
    let tables = std::iter::once(("(the flags)", &mappings.default)).chain(
        mappings
            .tables
            .iter()
            .map(|(name, settings)| (name.as_str(), settings)),
    );
    for (table, settings) in tables {
        let own = table_streams
            .iter()
            .find(|(name, _)| name == table)
            .map(|(_, stream)| stream.clone());
        let stream = own.or_else(|| default_stream.clone());
        let mapping = &settings.mapping;
        let mut subjects = match &mapping.subject_template {
            Some(template) => mapping
                .subject_map
                .capture_filters(&template.capture_filter()),
            None if stream.is_some() => return Err(ConfigError::StreamSubjectsUnknown),
            // Subjects come from a column: the streams are the user's to define.
            None => continue,
        };
        for filter in &subjects {
            add_capture_filter(&mut event_subjects, filter);
        }
        if let ErrorPolicy::DeadLetter { subject } = &settings.on_error {
            // A stream outbox-cdc creates keeps its tables' dead letters too.
            add_capture_filter(&mut subjects, subject);
        }
        for filter in &subjects {
            add_capture_filter(&mut capture_subjects, filter);
        }
        let Some(stream) = stream else {
            continue;
        };
        match streams.iter_mut().find(|(name, _, _)| *name == stream) {
            Some((_, filters, owners)) => {
                for filter in subjects {
                    add_capture_filter(filters, &filter);
                }
                owners.push(table.to_owned());
            }
            None => streams.push((stream, subjects, vec![table.to_owned()])),
        }
    }
    // Two streams may not capture one subject: JetStream would refuse the second.
    for (i, (a, a_subjects, a_tables)) in streams.iter().enumerate() {
        for (b, b_subjects, b_tables) in &streams[i + 1..] {
            for x in a_subjects {
                if let Some(y) = b_subjects.iter().find(|y| filters_overlap(x, y)) {
                    return Err(ConfigError::StreamsOverlap {
                        first: format!("{a} ({}: `{x}`)", a_tables.join(", ")),
                        second: format!("{b} ({}: `{y}`)", b_tables.join(", ")),
                    });
                }
            }
        }
    }
    Ok(SinkConfig {
        urls,
        auth,
        streams: publish.stream_specs(
            streams
                .into_iter()
                .map(|(name, subjects, _)| (name, subjects))
                .collect(),
            atomic,
        )?,
        capture_subjects,
        event_subjects,
        checkpoint_replicas: None,
        ack_timeout: publish.ack_timeout,
        max_in_flight: publish.max_in_flight as usize,
        fencing: !publish.no_fencing,
        atomic,
    })
}

/// The checkpoint's KV bucket.
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// NATS KV bucket of the checkpoint (key: the slot)
    ///
    /// Where outbox-cdc got to, and on which database history.
    #[arg(long, env = "OUTBOX_CDC_CHECKPOINT_BUCKET", value_name = "BUCKET", default_value = "outbox_cdc",
          help_heading = heading::RECOVERY)]
    pub checkpoint_bucket: String,
}

/// Standbys to check for what a failover needs.
#[derive(Debug, Clone, Default, Args)]
pub struct StandbyArgs {
    /// A standby to check for what failover needs, repeatable
    ///
    /// sync_replication_slots, hot_standby_feedback, primary_conninfo with dbname, its physical
    /// slot, and whether it holds a synced copy of the slot. A connection string like
    /// --database-url.
    #[arg(long, value_name = "URL", action = clap::ArgAction::Append, help_heading = heading::CONNECTION)]
    pub standby_url: Vec<String>,
}

impl StandbyArgs {
    pub fn resolve(&self) -> Result<Vec<DatabaseUrl>, ConfigError> {
        self.standby_url
            .iter()
            .filter(|url| !url.is_empty())
            .map(|url| url.parse().map_err(ConfigError::StandbyUrl))
            .collect()
    }
}

/// A filter on the table's rows.
#[derive(Debug, Clone, Default, Args)]
pub struct WhereArgs {
    /// Only the table rows this SQL condition selects, e.g. `created_at > now() - interval '1 hour'`
    ///
    /// `backfill` re-publishes them; `verify` compares them with the stream, and then does not
    /// look for events the table lacks.
    #[arg(long = "where", value_name = "SQL")]
    pub where_sql: Option<String>,
}

/// Output for scripts.
#[derive(Debug, Clone, Default, Args)]
pub struct JsonArgs {
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

/// The config file, and printing what it all adds up to.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// TOML file of settings: each key a flag without the dashes (max_in_flight = 4096)
    ///
    /// Every command reads it and takes the keys it has a flag for; a key no command has is an
    /// error. Flags and environment variables override it: flag > environment > file > default.
    #[arg(long, env = "OUTBOX_CDC_CONFIG", value_name = "FILE", help_heading = heading::OPERATIONS)]
    pub config: Option<PathBuf>,

    /// Print the effective configuration and where each value came from, then exit
    ///
    /// Defaults applied, checked as the command checks them (exit 2 when it would refuse them),
    /// secrets redacted. Nothing is connected to.
    #[arg(long, help_heading = heading::OPERATIONS)]
    pub print_config: bool,
}

/// Where the HTTP endpoint listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpAddr(pub Option<std::net::SocketAddr>);

pub fn parse_http_addr(text: &str) -> Result<HttpAddr, String> {
    if text == "off" {
        return Ok(HttpAddr(None));
    }
    text.parse()
        .map(|addr| HttpAddr(Some(addr)))
        .map_err(|e| format!("`{text}` is not an address like 127.0.0.1:9187 or off: {e}"))
}

/// A size in bytes: a number, or one with a unit (KB, MB, GB, TB: powers of 1000; KiB, MiB,
/// GiB, TiB: of 1024), e.g. 50GiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || format!("`{text}` is not a size like 1073741824, 500MB or 50GiB");
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(invalid()),
    };
    match number.checked_mul(factor) {
        Some(0) => Err(format!(
            "`{text}`: a size of 0 holds nothing; leave the flag out for no limit"
        )),
        Some(bytes) => Ok(bytes),
        None => Err(invalid()),
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 500ms, 1s or 10m: {e}"))
}

/// An RFC 3339 time, e.g. 2026-12-03T10:00:00Z.
pub fn parse_time(text: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("`{text}` is not an RFC 3339 time like 2026-12-03T10:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_name_what_they_expected() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert_eq!(parse_http_addr("off"), Ok(HttpAddr(None)));
        assert!(
            parse_http_addr("here")
                .unwrap_err()
                .contains("127.0.0.1:9187")
        );
        assert!(parse_time("2026-12-03T10:00:00Z").is_ok());
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("50GiB"), Ok(50 << 30));
        assert_eq!(parse_size("2 kib"), Ok(2048));
        for bad in ["", "10 parsecs", "GiB", "-1", "99999999999TiB"] {
            assert!(parse_size(bad).unwrap_err().contains("not a size"), "{bad}");
        }
        assert!(parse_size("0").unwrap_err().contains("no limit"));
    }

    #[test]
    fn the_subject_template_has_a_default_unless_a_column_names_the_subject() {
        let mapping = |column: Option<&str>| MappingArgs {
            id: IdColumnArgs::default(),
            payload_column: "payload".into(),
            headers_column: None,
            subject_column: column.map(String::from),
            subject_template: None,
            subject_map: Vec::new(),
            cloudevents: None,
            cloudevents_source: None,
            cloudevents_type: None,
            cloudevents_subject_column: None,
        };
        let config = mapping(None).resolve("app").unwrap();
        assert_eq!(
            config.subject_template.map(|t| t.to_string()).as_deref(),
            Some(DEFAULT_SUBJECT_TEMPLATE)
        );
        let config = mapping(Some("topic")).resolve("app").unwrap();
        assert!(config.subject_template.is_none());
        let without = MappingArgs {
            cloudevents_source: Some("/orders".into()),
            ..mapping(None)
        };
        assert!(matches!(
            without.resolve("app"),
            Err(ConfigError::CloudEventsOff)
        ));
    }
}
