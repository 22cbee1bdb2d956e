//! `outbox-cdc run`: its flags, checked into a [`RunConfig`], then the pipeline with its HTTP
//! endpoint until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use tokio::sync::watch;

use super::cli::ConfigError;
use crate::http::HttpServer;
use crate::lsn::Lsn;
use crate::pipeline::mapping::{DEFAULT_SUBJECT_TEMPLATE, MappingConfig, SubjectTemplate};
use crate::pipeline::poison::ErrorPolicy;
use crate::pipeline::{PipelineSettings, ReplayConfig, RunConfig};
use crate::sink::{NatsAuth, NatsUrls, SinkConfig};
use crate::source::connection::DatabaseUrl;
use crate::source::{PublicationName, SlotName, SourceConfig};
use crate::stats::Stats;
use crate::subject::{SubjectMap, SubjectRule, add_capture_filter, validate_subject};

/// What to do with a row that cannot be published as itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    Fail,
    DeadLetter,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/db?sslmode=require
    /// [env: OUTBOX_CDC_DATABASE_URL, then DATABASE_URL]
    #[arg(long, env = "OUTBOX_CDC_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// Logical replication slot (created with the pgoutput plugin when missing).
    #[arg(long, env = "OUTBOX_CDC_SLOT", default_value = "outbox_cdc")]
    pub slot: SlotName,

    /// Publication that publishes the outbox table.
    #[arg(long, env = "OUTBOX_CDC_PUBLICATION", default_value = "outbox_pub")]
    pub publication: PublicationName,

    /// Fail instead of creating the slot when it does not exist.
    #[arg(long, env = "OUTBOX_CDC_NO_CREATE_SLOT")]
    pub no_create_slot: bool,

    /// How often to report the confirmed position to PostgreSQL.
    #[arg(long, env = "OUTBOX_CDC_STATUS_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub status_interval: Duration,

    /// Give up on a replication connection, and reconnect, when PostgreSQL no longer streams
    /// to it or does not answer within this long whether it does (checked over the SQL
    /// connection every third of it). Catches connections lost without notice, such as a
    /// black-holed network path.
    #[arg(long, env = "OUTBOX_CDC_REPLICATION_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub replication_timeout: Duration,

    /// Column whose text becomes the Nats-Msg-Id header (JetStream de-duplication). Default:
    /// `id` when the table has it, else `<commit LSN>:<row index>`.
    #[arg(long, env = "OUTBOX_CDC_ID_COLUMN")]
    pub id_column: Option<String>,

    /// Column holding the message body (json/jsonb/text as is; bytea as raw bytes).
    #[arg(long, env = "OUTBOX_CDC_PAYLOAD_COLUMN", default_value = "payload")]
    pub payload_column: String,

    /// Column holding a JSON object of extra NATS headers. Default: `headers` when the table has it.
    #[arg(long, env = "OUTBOX_CDC_HEADERS_COLUMN")]
    pub headers_column: Option<String>,

    /// Subject with {column} placeholders filled from the row. Default
    /// `outbox.{aggregate_type}.{event_type}`, unless --subject-column is given: then the template
    /// is only a fallback for rows whose subject column is NULL, and has no default.
    #[arg(long, env = "OUTBOX_CDC_SUBJECT_TEMPLATE")]
    pub subject_template: Option<SubjectTemplate>,

    /// Column holding the whole subject; used instead of the template when not NULL.
    #[arg(long, env = "OUTBOX_CDC_SUBJECT_COLUMN")]
    pub subject_column: Option<String>,

    /// Rewrite subjects before publishing: FROM=TO with NATS wildcards (`*` one token, a final
    /// `>` the rest), e.g. `order.*=prod.orders.*`. Repeatable; the first match wins.
    #[arg(long, env = "OUTBOX_CDC_SUBJECT_MAP", value_name = "FROM=TO", value_delimiter = ',', action = clap::ArgAction::Append)]
    pub subject_map: Vec<SubjectRule>,

    /// What to do with a row that cannot be published as itself (unmappable, over max_payload,
    /// or no stream captures its subject): `fail` stops with a message naming it; `dead-letter`
    /// publishes it to --dead-letter-subject with the reason in headers, and goes on.
    #[arg(long, env = "OUTBOX_CDC_ON_ERROR", value_enum, default_value_t = OnError::Fail)]
    pub on_error: OnError,

    /// Publish transactional logical decoding messages with this prefix
    /// (`pg_logical_emit_message(true, 'PREFIX', '<JSON object>')`) like outbox rows, in their
    /// place in commit order: a table-less outbox. Repeatable.
    #[arg(long, env = "OUTBOX_CDC_MESSAGE_PREFIX", value_name = "PREFIX", value_delimiter = ',',
          action = clap::ArgAction::Append)]
    pub message_prefix: Vec<String>,

    /// Subject for dead letters (required with --on-error dead-letter).
    #[arg(long, env = "OUTBOX_CDC_DEAD_LETTER_SUBJECT")]
    pub dead_letter_subject: Option<String>,

    /// Publishes awaiting their JetStream ack at most.
    #[arg(long, env = "OUTBOX_CDC_MAX_IN_FLIGHT", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_in_flight: u32,

    /// Do not name each publish's predecessor in its stream (`Nats-Expected-Last-Msg-Id`). Fencing
    /// keeps commit order when a publish is lost while a later one is stored (a JetStream
    /// cluster's stream leader changing); it needs the outbox's streams to be written by
    /// outbox-cdc alone. Turn it off for streams other publishers write into.
    #[arg(long, env = "OUTBOX_CDC_NO_FENCING")]
    pub no_fencing: bool,

    /// Publish each transaction's events as one atomic JetStream batch: stored whole or not at
    /// all, so consumers never see part of a transaction (nats-server 2.12+, streams with
    /// `allow_atomic`). A transaction over --atomic-max-batch events, or whose events go to
    /// several streams, goes out event by event, with a warning and a metric.
    #[arg(long, env = "OUTBOX_CDC_ATOMIC_TRANSACTIONS")]
    pub atomic_transactions: bool,

    /// The most events an atomic batch holds: the server's `max_batch_size` (default 1000).
    #[arg(long, env = "OUTBOX_CDC_ATOMIC_MAX_BATCH", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(2..))]
    pub atomic_max_batch: u32,

    /// Create this JetStream stream, capturing the template's subjects, when it does not exist.
    /// Without it, streams are yours to create.
    #[arg(long, env = "OUTBOX_CDC_STREAM")]
    pub stream: Option<String>,

    /// Duplicate window of a stream created with --stream.
    #[arg(long, env = "OUTBOX_CDC_DUPLICATE_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub duplicate_window: Duration,

    /// How long to wait for a JetStream ack before restarting the session.
    #[arg(long, env = "OUTBOX_CDC_ACK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub ack_timeout: Duration,

    /// How often a standby instance retries taking the slot.
    #[arg(long, env = "OUTBOX_CDC_STANDBY_RETRY", default_value = "1s", value_parser = parse_duration)]
    pub standby_retry: Duration,

    /// How long shutdown waits for in-flight acks.
    #[arg(long, env = "OUTBOX_CDC_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Skip transactions that committed before this LSN (`X/Y`). Fails when the slot can no
    /// longer serve it; see --replay-window.
    #[arg(long, env = "OUTBOX_CDC_START_LSN")]
    pub start_lsn: Option<Lsn>,

    /// Hold the slot's confirmed LSN back by this long, so the WAL of that period stays available
    /// to --start-lsn. Progress is then checkpointed in a NATS KV bucket.
    #[arg(long, env = "OUTBOX_CDC_REPLAY_WINDOW", default_value = "0s", value_parser = parse_duration)]
    pub replay_window: Duration,

    /// Go on past the gap found at start — events that may be missing between what the streams
    /// hold and where the slot or the database now is (after a lost slot, a restore, a failover
    /// that lost commits) — once you have re-published them from the table. Applies to that
    /// start only; outbox-cdc stops at any later gap.
    #[arg(long, env = "OUTBOX_CDC_ACCEPT_GAP")]
    pub accept_gap: bool,

    /// When creating the slot, first publish the rows this SQL condition selects as of the
    /// slot's starting point (e.g. `published_at IS NULL`): the switch from a polling relay,
    /// every older unsent row from that snapshot, every newer row from the WAL, none twice.
    /// Ignored when the slot exists.
    #[arg(long, env = "OUTBOX_CDC_INITIAL_BACKFILL", value_name = "SQL")]
    pub initial_backfill: Option<String>,

    /// KV bucket of the checkpoint: where outbox-cdc got to, and on which database history;
    /// the key is the slot name.
    #[arg(
        long,
        env = "OUTBOX_CDC_CHECKPOINT_BUCKET",
        default_value = "outbox_cdc"
    )]
    pub checkpoint_bucket: String,

    /// TOML file of `run` settings: each key is a flag's name (`max_in_flight = 4096`). Flags and
    /// environment variables override it.
    #[arg(long, env = "OUTBOX_CDC_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (secrets redacted) with where each value came from,
    /// then exit.
    #[arg(long)]
    pub print_config: bool,

    /// Address for /healthz, /readyz and /metrics (`off` disables it; port 0 picks a free one).
    #[arg(long, env = "OUTBOX_CDC_HTTP_ADDR", default_value = "127.0.0.1:9187", value_parser = parse_http_addr)]
    pub http_addr: HttpAddr,
}

/// Where NATS is and how to authenticate to it.
#[derive(Debug, Clone, Default, Args)]
pub struct NatsArgs {
    /// NATS server URLs, comma-separated, e.g. nats://host1:4222,nats://host2:4222
    /// [env: OUTBOX_CDC_NATS_URL, then NATS_URL; default nats://127.0.0.1:4222]
    #[arg(long, env = "OUTBOX_CDC_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,

    /// NATS credentials file (user JWT and NKey seed), e.g. from `nsc generate creds`.
    #[arg(long, env = "OUTBOX_CDC_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,

    /// File holding the NKey seed (`SU…`) to authenticate to NATS with.
    #[arg(long, env = "OUTBOX_CDC_NATS_NKEY", value_name = "FILE")]
    pub nats_nkey: Option<PathBuf>,

    /// CA certificate (PEM) to verify the NATS server with; turns TLS on.
    #[arg(long, env = "OUTBOX_CDC_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS with NATS; needs --nats-tls-key.
    #[arg(long, env = "OUTBOX_CDC_NATS_TLS_CERT", value_name = "FILE")]
    pub nats_tls_cert: Option<PathBuf>,

    /// Client private key (PEM) for mutual TLS with NATS.
    #[arg(long, env = "OUTBOX_CDC_NATS_TLS_KEY", value_name = "FILE")]
    pub nats_tls_key: Option<PathBuf>,
}

impl NatsArgs {
    /// The flag's value (or `OUTBOX_CDC_NATS_URL`), else `NATS_URL`.
    pub fn url(&self) -> Option<String> {
        self.nats_url
            .clone()
            .filter(|u| !u.is_empty())
            .or_else(|| std::env::var("NATS_URL").ok().filter(|u| !u.is_empty()))
    }

    /// Checked URLs (default `nats://127.0.0.1:4222`) and authentication settings.
    pub fn resolve(&self) -> Result<(NatsUrls, NatsAuth), ConfigError> {
        let urls: NatsUrls = self
            .url()
            .as_deref()
            .unwrap_or("nats://127.0.0.1:4222")
            .parse()?;
        let auth = NatsAuth {
            creds_file: self.nats_creds.clone(),
            nkey_file: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
        };
        Ok((urls, auth))
    }
}

/// Where the HTTP endpoint listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpAddr(pub Option<std::net::SocketAddr>);

fn parse_http_addr(text: &str) -> Result<HttpAddr, String> {
    if text == "off" {
        return Ok(HttpAddr(None));
    }
    text.parse()
        .map(|addr| HttpAddr(Some(addr)))
        .map_err(|e| format!("`{text}` is not an address like 127.0.0.1:9187 or off: {e}"))
}

/// The flag's (or `OUTBOX_CDC_DATABASE_URL`'s) value, else `DATABASE_URL`, parsed.
pub fn resolve_database_url(flag: Option<String>) -> Result<DatabaseUrl, ConfigError> {
    let url = flag
        .filter(|u| !u.is_empty())
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
        .ok_or(ConfigError::NoDatabaseUrl)?;
    Ok(url.parse()?)
}

pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 500ms, 1s or 10m: {e}"))
}

impl RunArgs {
    /// Parses `run` flags given in code (defaults and environment apply as on the command line).
    pub fn from_flags<'a>(
        flags: impl IntoIterator<Item = &'a str>,
    ) -> Result<RunArgs, clap::Error> {
        #[derive(Parser)]
        struct RunOnly {
            #[command(flatten)]
            args: RunArgs,
        }
        let argv = std::iter::once("outbox-cdc").chain(flags);
        RunOnly::try_parse_from(argv).map(|only| only.args)
    }

    pub fn resolve(self) -> Result<RunConfig, ConfigError> {
        let database = resolve_database_url(self.database_url)?;
        let (nats_urls, nats_auth) = self.nats.resolve()?;
        if self.status_interval < Duration::from_millis(10) {
            return Err(ConfigError::StatusInterval);
        }
        if self.replication_timeout < Duration::from_secs(1) {
            return Err(ConfigError::ReplicationTimeout);
        }
        if self.atomic_transactions && self.no_fencing {
            return Err(ConfigError::AtomicWithoutFencing);
        }
        for (i, prefix) in self.message_prefix.iter().enumerate() {
            if prefix.is_empty() {
                return Err(ConfigError::MessagePrefix(prefix.clone(), "is empty"));
            }
            if self.message_prefix[..i].contains(prefix) {
                return Err(ConfigError::MessagePrefix(prefix.clone(), "is given twice"));
            }
        }
        let subject_template = match (self.subject_template, &self.subject_column) {
            (Some(template), _) => Some(template),
            (None, Some(_)) => None,
            (None, None) => Some(
                DEFAULT_SUBJECT_TEMPLATE
                    .parse()
                    .expect("the default template is valid"),
            ),
        };
        let on_error = match (self.on_error, self.dead_letter_subject) {
            (OnError::Fail, _) => ErrorPolicy::Fail,
            (OnError::DeadLetter, None) => return Err(ConfigError::DeadLetterSubject(None)),
            (OnError::DeadLetter, Some(subject)) => {
                validate_subject(&subject).map_err(|reason| {
                    ConfigError::DeadLetterSubject(Some((subject.clone(), reason)))
                })?;
                ErrorPolicy::DeadLetter { subject }
            }
        };
        let subject_map = SubjectMap::new(self.subject_map);
        let event_subjects = match &subject_template {
            Some(template) => subject_map.capture_filters(&template.capture_filter()),
            None if self.stream.is_some() => return Err(ConfigError::StreamSubjectsUnknown),
            // Subjects come from a column: the streams are the user's to define.
            None => Vec::new(),
        };
        let mut capture_subjects = event_subjects.clone();
        if let ErrorPolicy::DeadLetter { subject } = &on_error
            && !capture_subjects.is_empty()
        {
            // A stream created with --stream keeps the dead letters too.
            add_capture_filter(&mut capture_subjects, subject);
        }
        Ok(RunConfig {
            source: SourceConfig {
                database,
                slot: self.slot,
                publication: self.publication,
                create_slot: !self.no_create_slot,
                status_interval: self.status_interval,
                replication_timeout: self.replication_timeout,
            },
            sink: SinkConfig {
                urls: nats_urls,
                auth: nats_auth,
                stream: self.stream,
                capture_subjects,
                event_subjects,
                duplicate_window: self.duplicate_window,
                ack_timeout: self.ack_timeout,
                max_in_flight: self.max_in_flight as usize,
                fencing: !self.no_fencing,
                atomic: self.atomic_transactions,
            },
            pipeline: PipelineSettings {
                on_error,
                mapping: MappingConfig {
                    id_column: self.id_column,
                    payload_column: self.payload_column,
                    headers_column: self.headers_column,
                    subject_template,
                    subject_column: self.subject_column,
                    subject_map,
                },
                max_in_flight: self.max_in_flight as usize,
                shutdown_timeout: self.shutdown_timeout,
                status_interval: self.status_interval,
                message_prefixes: self.message_prefix,
                atomic_max_batch: self
                    .atomic_transactions
                    .then_some(self.atomic_max_batch as usize),
            },
            standby_retry: self.standby_retry,
            accept_gap: self.accept_gap,
            initial_backfill: self.initial_backfill,
            replay: ReplayConfig {
                start_lsn: self.start_lsn,
                window: self.replay_window,
                checkpoint_bucket: self.checkpoint_bucket,
            },
        })
    }
}

/// Runs the pipeline, and the HTTP endpoint beside it, until `shutdown` turns true or a
/// permanent error.
pub async fn execute(args: RunArgs, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let http_addr = args.http_addr.0;
    let config = args.resolve()?;
    tracing::info!(
        database = %config.source.database,
        nats = %config.sink.urls,
        slot = %config.source.slot,
        publication = %config.source.publication,
        "starting outbox-cdc {}",
        env!("CARGO_PKG_VERSION")
    );
    let stats = Arc::new(Stats::default());
    if let Some(addr) = http_addr {
        let server = HttpServer::bind(addr).await?;
        if let Some(bound) = server.local_addr() {
            tracing::info!("serving /healthz, /readyz and /metrics on http://{bound}");
        }
        tokio::spawn(server.serve(stats.clone(), shutdown.clone()));
    }
    crate::pipeline::run(config, &stats, shutdown).await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        RunArgs::from_flags(args.iter().copied())
    }

    #[test]
    fn defaults_are_sane() {
        let args = parse(&["--database-url", "postgres://u@h/d"]).unwrap();
        let config = args.resolve().unwrap();
        assert_eq!(config.source.slot.as_str(), "outbox_cdc");
        assert_eq!(config.source.publication.as_str(), "outbox_pub");
        assert!(config.source.create_slot);
        assert_eq!(config.source.status_interval, Duration::from_secs(1));
        assert_eq!(config.source.replication_timeout, Duration::from_secs(30));
        assert_eq!(config.sink.capture_subjects, ["outbox.>"]);
        assert_eq!(config.sink.duplicate_window, Duration::from_secs(600));
        assert_eq!(config.pipeline.mapping.payload_column, "payload");
        assert_eq!(config.standby_retry, Duration::from_secs(1));
    }

    #[test]
    fn rejects_bad_values_naming_the_flag() {
        for (args, needle) in [
            (vec!["--slot", "Bad-Slot"], "invalid slot name"),
            (vec!["--status-interval", "soon"], "not a duration"),
            (vec!["--max-in-flight", "0"], "max-in-flight"),
            (
                vec!["--subject-template", "a.{"],
                "invalid subject template",
            ),
        ] {
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn too_short_intervals_are_refused() {
        for (flag, value, needle) in [
            (
                "--status-interval",
                "5ms",
                "--status-interval must be at least",
            ),
            (
                "--replication-timeout",
                "500ms",
                "--replication-timeout must be at least",
            ),
        ] {
            let args = parse(&["--database-url", "postgres://u@h/d", flag, value]).unwrap();
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains(needle), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn database_url_is_required_and_checked() {
        let args = parse(&["--database-url", "mysql://u:pw@h/d"]).unwrap();
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("scheme") && !err.contains("pw"), "{err}");
    }

    #[test]
    fn subject_column_without_template_has_no_default_template() {
        let base = [
            "--database-url",
            "postgres://u@h/d",
            "--subject-column",
            "topic",
        ];
        let config = parse(&base).unwrap().resolve().unwrap();
        assert_eq!(config.pipeline.mapping.subject_template, None);
        assert!(config.sink.capture_subjects.is_empty());
        let err = parse(&[&base[..], &["--stream", "S"]].concat())
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("create the stream yourself"), "{err}");
    }

    #[test]
    fn a_subject_map_adds_what_it_produces_to_the_stream_subjects() {
        let args = [
            "--database-url",
            "postgres://u@h/d",
            "--subject-map",
            "outbox.order.*=prod.orders.*",
            "--subject-map",
            "outbox.x.>=outbox.y.>",
        ];
        let config = parse(&args).unwrap().resolve().unwrap();
        assert_eq!(config.sink.capture_subjects, ["outbox.>", "prod.orders.*"]);
        assert_eq!(config.sink.event_subjects, config.sink.capture_subjects);
        // Dead letters are captured too, but are not events' subjects (they are never batched).
        let mut dead = args.to_vec();
        dead.extend([
            "--on-error",
            "dead-letter",
            "--dead-letter-subject",
            "dlq.outbox",
        ]);
        let config = parse(&dead).unwrap().resolve().unwrap();
        assert_eq!(
            config.sink.capture_subjects,
            ["outbox.>", "prod.orders.*", "dlq.outbox"]
        );
        assert_eq!(config.sink.event_subjects, ["outbox.>", "prod.orders.*"]);
        let err = parse(&["--subject-map", "a.*=b.*.*"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("more `*`"), "{err}");
    }
}
