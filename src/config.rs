//! Command line and environment. Every flag `--some-flag` also reads `OUTBOX_CDC_SOME_FLAG`;
//! `--database-url` falls back to `DATABASE_URL` and `--nats-url` to `NATS_URL`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::lsn::Lsn;
use crate::mapping::{DEFAULT_SUBJECT_TEMPLATE, MappingConfig, SubjectTemplate};
use crate::pipeline::PipelineSettings;
use crate::secret::Secret;
use crate::sink::{NatsAuth, SinkConfig};
use crate::source::connection::{DatabaseUrl, DatabaseUrlError};
use crate::source::{PublicationName, SlotName, SourceConfig};

#[derive(Debug, Parser)]
#[command(
    name = "outbox-cdc",
    version,
    about = "Publishes a PostgreSQL outbox table to NATS JetStream from the WAL, in commit order."
)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log pipelines. The level comes from RUST_LOG
    /// (default `info`).
    #[arg(long, global = true, env = "OUTBOX_CDC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream inserted outbox rows to JetStream until stopped (SIGTERM/SIGINT).
    Run(Box<RunArgs>),
    /// Try it: throwaway PostgreSQL and NATS, a sample producer and a subscriber, live.
    Demo(crate::demo::DemoArgs),
    /// Check the server and create what is missing: outbox table, publication, slot.
    Setup(crate::admin::SetupArgs),
    /// Show the slot: holder, confirmed and restart LSN, lag in bytes, wal_status.
    Status(crate::admin::StatusArgs),
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

    /// Subject with {column} placeholders filled from the row.
    #[arg(long, env = "OUTBOX_CDC_SUBJECT_TEMPLATE", default_value = DEFAULT_SUBJECT_TEMPLATE)]
    pub subject_template: SubjectTemplate,

    /// Column holding the whole subject; used instead of the template when not NULL.
    #[arg(long, env = "OUTBOX_CDC_SUBJECT_COLUMN")]
    pub subject_column: Option<String>,

    /// Publishes awaiting their JetStream ack at most.
    #[arg(long, env = "OUTBOX_CDC_MAX_IN_FLIGHT", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_in_flight: u32,

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

    /// KV bucket of the checkpoint (used with --replay-window); the key is the slot name.
    #[arg(
        long,
        env = "OUTBOX_CDC_CHECKPOINT_BUCKET",
        default_value = "outbox_cdc"
    )]
    pub checkpoint_bucket: String,

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
    pub fn resolve(&self) -> Result<(Secret, NatsAuth), ConfigError> {
        let nats_url = self.url().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
        for url in nats_url.split(',').map(str::trim) {
            let parsed = if url.contains("://") {
                url::Url::parse(url).map(|_| ())
            } else {
                url::Url::parse(&format!("nats://{url}")).map(|_| ())
            };
            if let Err(e) = parsed {
                return Err(ConfigError::NatsUrl(
                    crate::sink::redact_nats_url(url),
                    e.to_string(),
                ));
            }
        }
        let auth = NatsAuth {
            creds_file: self.nats_creds.clone(),
            nkey_file: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
        };
        Ok((Secret::new(nats_url), auth))
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

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 500ms, 1s or 10m: {e}"))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no PostgreSQL URL: pass --database-url or set OUTBOX_CDC_DATABASE_URL or DATABASE_URL"
    )]
    NoDatabaseUrl,
    #[error(transparent)]
    DatabaseUrl(#[from] DatabaseUrlError),
    #[error("invalid --nats-url `{0}`: {1}")]
    NatsUrl(String, String),
    #[error("--status-interval must be at least 10ms")]
    StatusInterval,
}

/// Everything `run` needs, checked.
#[derive(Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub sink: SinkConfig,
    pub pipeline: PipelineSettings,
    pub standby_retry: Duration,
    pub http_addr: Option<std::net::SocketAddr>,
    pub replay: ReplayConfig,
}

/// Where to start and how much history to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayConfig {
    pub start_lsn: Option<Lsn>,
    pub window: Duration,
    pub checkpoint_bucket: String,
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
        let capture_subjects = vec![self.subject_template.capture_filter()];
        Ok(RunConfig {
            source: SourceConfig {
                database,
                slot: self.slot,
                publication: self.publication,
                create_slot: !self.no_create_slot,
                status_interval: self.status_interval,
            },
            sink: SinkConfig {
                urls: nats_urls,
                auth: nats_auth,
                stream: self.stream,
                capture_subjects,
                duplicate_window: self.duplicate_window,
                ack_timeout: self.ack_timeout,
                max_in_flight: self.max_in_flight as usize,
            },
            pipeline: PipelineSettings {
                mapping: MappingConfig {
                    id_column: self.id_column,
                    payload_column: self.payload_column,
                    headers_column: self.headers_column,
                    subject_template: self.subject_template,
                    subject_column: self.subject_column,
                },
                max_in_flight: self.max_in_flight as usize,
                shutdown_timeout: self.shutdown_timeout,
            },
            standby_retry: self.standby_retry,
            http_addr: self.http_addr.0,
            replay: ReplayConfig {
                start_lsn: self.start_lsn,
                window: self.replay_window,
                checkpoint_bucket: self.checkpoint_bucket,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut full = vec!["outbox-cdc", "run"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full)
    }

    fn run_args(cli: Cli) -> RunArgs {
        match cli.command {
            Command::Run(args) => *args,
            other => panic!("not a run command: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_sane() {
        let args = run_args(parse(&["--database-url", "postgres://u@h/d"]).unwrap());
        let config = args.resolve().unwrap();
        assert_eq!(config.source.slot.as_str(), "outbox_cdc");
        assert_eq!(config.source.publication.as_str(), "outbox_pub");
        assert!(config.source.create_slot);
        assert_eq!(config.source.status_interval, Duration::from_secs(1));
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
    fn database_url_is_required_and_checked() {
        let args = run_args(parse(&["--database-url", "mysql://u:pw@h/d"]).unwrap());
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("scheme") && !err.contains("pw"), "{err}");
    }
}
