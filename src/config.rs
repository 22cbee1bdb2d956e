//! Command line and environment. Every flag `--some-flag` also reads `OUTBOX_CDC_SOME_FLAG`;
//! `--database-url` falls back to `DATABASE_URL` and `--nats-url` to `NATS_URL`.

use std::path::PathBuf;
use std::time::Duration;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::Path;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::dead_letter::ErrorPolicy;
use crate::lsn::Lsn;
use crate::mapping::{DEFAULT_SUBJECT_TEMPLATE, MappingConfig, SubjectTemplate};
use crate::pipeline::PipelineSettings;
use crate::secret::Secret;
use crate::sink::{NatsAuth, SinkConfig};
use crate::source::connection::{DatabaseUrl, DatabaseUrlError};
use crate::source::{PublicationName, SlotName, SourceConfig};
use crate::subject_map::{SubjectMap, SubjectRule};

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
pub enum OnError {
    Fail,
    DeadLetter,
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

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    Command(Box<Cli>),
    /// `run --print-config`: the effective configuration, ready to print.
    PrintConfig(String),
}

/// Parses the command line. `run --config FILE` (or `OUTBOX_CDC_CONFIG`) supplies values for
/// flags given neither on the command line nor in the environment: flags > env > file >
/// defaults.
pub fn parse_cli<I, T>(argv: I) -> Result<Invocation, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut command = Cli::command();
    let mut from_file = BTreeSet::new();
    if let Some(path) = config_path(&argv) {
        let values = read_config_file(&command, &path)?;
        for FileValue {
            id,
            values,
            top_level,
        } in values
        {
            from_file.insert(id.clone());
            let set = |arg: clap::Arg| arg.default_values(values.clone());
            command = if top_level {
                command.mut_arg(id, set)
            } else {
                command.mut_subcommand("run", |run| run.mut_arg(id, set))
            };
        }
    }
    let matches = command.clone().try_get_matches_from(&argv)?;
    let cli = Cli::from_arg_matches(&matches)?;
    if let Command::Run(args) = &cli.command
        && args.print_config
    {
        let run = matches
            .subcommand_matches("run")
            .expect("the run subcommand matched");
        // The unmodified command lists the flags in their documented order.
        return Ok(Invocation::PrintConfig(render_effective_config(
            &Cli::command(),
            &matches,
            run,
            &from_file,
        )));
    }
    Ok(Invocation::Command(Box::new(cli)))
}

/// Flags that make no sense inside the file itself.
const NOT_IN_FILE: &[&str] = &["config", "print_config", "help", "version"];

/// `--config FILE`, `--config=FILE` or `OUTBOX_CDC_CONFIG`, when the command is `run`.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let args: Vec<&str> = argv.iter().skip(1).filter_map(|a| a.to_str()).collect();
    if !args.contains(&"run") {
        return None;
    }
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if *arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("OUTBOX_CDC_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// One key of the config file, checked by its flag's own parser.
struct FileValue {
    /// The argument's id.
    id: String,
    values: Vec<String>,
    /// A flag of the top-level command (global), not of `run`.
    top_level: bool,
}

fn read_config_file(command: &clap::Command, path: &Path) -> Result<Vec<FileValue>, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::ConfigFile {
        file: file.clone(),
        detail: e.to_string(),
    })?;
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigError::ConfigFile {
                file: file.clone(),
                detail: e.to_string(),
            })?;
    let run = command.find_subcommand("run").expect("run is a subcommand");
    let mut values = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let id = long.replace('-', "_");
        let found = run
            .get_arguments()
            .map(|arg| (arg, false))
            .chain(command.get_arguments().map(|arg| (arg, true)))
            .find(|(arg, _)| arg.get_long() == Some(long.as_str()))
            .filter(|_| !NOT_IN_FILE.contains(&id.as_str()));
        let Some((arg, top_level)) = found else {
            return Err(ConfigError::UnknownKey {
                file,
                key: key.clone(),
            });
        };
        let invalid = |detail: String| ConfigError::InvalidValue {
            file: file.clone(),
            key: key.clone(),
            detail,
        };
        let texts: Vec<String> = match value {
            toml::Value::Array(items) => {
                if !matches!(arg.get_action(), clap::ArgAction::Append) {
                    return Err(invalid("takes one value, not a list".into()));
                }
                items
                    .iter()
                    .map(scalar_text)
                    .collect::<Result<_, _>>()
                    .map_err(invalid)?
            }
            other => vec![scalar_text(other).map_err(invalid)?],
        };
        for text in &texts {
            check_value(arg, text).map_err(invalid)?;
        }
        values.push(FileValue {
            id: arg.get_id().to_string(),
            values: texts,
            top_level,
        });
    }
    Ok(values)
}

/// Runs the flag's own parser on `text` (so a file value is checked like a flag value).
fn check_value(arg: &clap::Arg, text: &str) -> Result<(), String> {
    if matches!(
        arg.get_action(),
        clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
    ) {
        return match text {
            "true" | "false" => Ok(()),
            _ => Err(format!("`{text}` is not true or false")),
        };
    }
    let long = arg.get_long().unwrap_or_default();
    let probe = arg
        .clone()
        .env(None)
        .default_values(Vec::<String>::new())
        .required(false);
    clap::Command::new("outbox-cdc")
        .no_binary_name(true)
        .arg(probe)
        .try_get_matches_from([format!("--{long}={text}")])
        .map(|_| ())
        .map_err(|e| clap_message(&e))
}

fn scalar_text(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, number or boolean, found {}",
            other.type_str()
        )),
    }
}

/// A clap error's first line without the `error: ` prefix.
fn clap_message(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// Flags whose values are secret in part.
fn redact(id: &str, value: &str) -> String {
    match id {
        "database_url" => crate::source::connection::redact_url(value),
        "nats_url" => crate::sink::redact_nats_url(value),
        _ => value.to_owned(),
    }
}

/// The effective `run` configuration as TOML, one key per flag, each with its source.
fn render_effective_config(
    command: &clap::Command,
    top: &clap::ArgMatches,
    run: &clap::ArgMatches,
    from_file: &BTreeSet<String>,
) -> String {
    use clap::parser::ValueSource;
    let run_command = command.find_subcommand("run").expect("run is a subcommand");
    let mut out = String::from("# outbox-cdc run: effective configuration (secrets redacted)\n");
    let args = command
        .get_arguments()
        .map(|arg| (arg, top))
        .chain(run_command.get_arguments().map(|arg| (arg, run)));
    for (arg, matches) in args {
        let id = arg.get_id().as_str();
        if NOT_IN_FILE.contains(&id) {
            continue;
        }
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "flag",
            Some(ValueSource::EnvVariable) => "environment",
            Some(ValueSource::DefaultValue) if from_file.contains(id) => "config file",
            Some(ValueSource::DefaultValue) => "default",
            Some(_) => "other",
            None => "unset",
        };
        let mut values: Vec<String> = matches
            .get_raw(id)
            .map(|raw| raw.map(|v| redact(id, &v.to_string_lossy())).collect())
            .unwrap_or_default();
        let mut source = source.to_owned();
        let fallback = match id {
            "database_url" => Some("DATABASE_URL"),
            "nats_url" => Some("NATS_URL"),
            _ => None,
        };
        if let (true, Some(var)) = (values.is_empty(), fallback)
            && let Ok(value) = std::env::var(var)
            && !value.is_empty()
        {
            values.push(redact(id, &value));
            source = format!("environment ({var})");
        }
        let value = match (values.as_slice(), arg.get_action()) {
            ([], clap::ArgAction::Append) => "[]".to_owned(),
            ([], _) => {
                let _ = writeln!(out, "# {id} = (unset)");
                continue;
            }
            (_, clap::ArgAction::Append) => {
                let items: Vec<String> = values.iter().map(|v| toml_scalar(v)).collect();
                format!("[{}]", items.join(", "))
            }
            ([one], _) => toml_scalar(one),
            (many, _) => toml_scalar(&many.join(",")),
        };
        let _ = writeln!(out, "{id} = {value}  # {source}");
    }
    out
}

/// Booleans and integers bare, everything else a quoted string.
fn toml_scalar(value: &str) -> String {
    if value == "true" || value == "false" || value.parse::<i64>().is_ok() {
        value.to_owned()
    } else {
        toml::Value::String(value.to_owned()).to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}", clap_message(.0))]
    Cli(#[from] clap::Error),
    #[error("config file {file}: {detail}")]
    ConfigFile { file: String, detail: String },
    #[error(
        "config file {file}: unknown key `{key}`; the keys are the flags of `outbox-cdc run` without the dashes (e.g. max_in_flight = 4096), see `outbox-cdc run --help`"
    )]
    UnknownKey { file: String, key: String },
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
    #[error("invalid --nats-url `{0}`: {1}")]
    NatsUrl(String, String),
    #[error(
        "--stream creates a stream capturing the subjects outbox-cdc publishes, but with --subject-column and no --subject-template they are not known in advance: create the stream yourself (and drop --stream), or give --subject-template"
    )]
    StreamSubjectsUnknown,
    #[error("--on-error dead-letter needs a valid --dead-letter-subject{}", match .0 {
        Some((subject, reason)) => format!(": `{subject}`: {reason}"),
        None => String::new(),
    })]
    DeadLetterSubject(Option<(String, String)>),
    #[error("--replication-timeout must be at least 1s")]
    ReplicationTimeout,
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
        if self.replication_timeout < Duration::from_secs(1) {
            return Err(ConfigError::ReplicationTimeout);
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
                crate::mapping::validate_subject(&subject).map_err(|reason| {
                    ConfigError::DeadLetterSubject(Some((subject.clone(), reason)))
                })?;
                ErrorPolicy::DeadLetter { subject }
            }
        };
        let subject_map = SubjectMap::new(self.subject_map);
        let capture_subjects = match &subject_template {
            Some(template) => subject_map.capture_filters(&template.capture_filter()),
            None if self.stream.is_some() => return Err(ConfigError::StreamSubjectsUnknown),
            // Subjects come from a column: the streams are the user's to define.
            None => Vec::new(),
        };
        let mut capture_subjects = capture_subjects;
        if let ErrorPolicy::DeadLetter { subject } = &on_error
            && !capture_subjects.is_empty()
        {
            // A stream created with --stream keeps the dead letters too.
            crate::subject_map::add_capture_filter(&mut capture_subjects, subject);
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
                duplicate_window: self.duplicate_window,
                ack_timeout: self.ack_timeout,
                max_in_flight: self.max_in_flight as usize,
                fencing: !self.no_fencing,
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
            let args =
                run_args(parse(&["--database-url", "postgres://u@h/d", flag, value]).unwrap());
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains(needle), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn database_url_is_required_and_checked() {
        let args = run_args(parse(&["--database-url", "mysql://u:pw@h/d"]).unwrap());
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
        let config = run_args(parse(&base).unwrap()).resolve().unwrap();
        assert_eq!(config.pipeline.mapping.subject_template, None);
        assert!(config.sink.capture_subjects.is_empty());
        let err = run_args(parse(&[&base[..], &["--stream", "S"]].concat()).unwrap())
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
        let config = run_args(parse(&args).unwrap()).resolve().unwrap();
        assert_eq!(config.sink.capture_subjects, ["outbox.>", "prod.orders.*"]);
        let err = parse(&["--subject-map", "a.*=b.*.*"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("more `*`"), "{err}");
    }

    fn with_file(toml: &str, flags: &[&str]) -> Result<Invocation, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox-cdc.toml");
        std::fs::write(&path, toml).unwrap();
        let mut argv = vec!["outbox-cdc", "run", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(flags);
        parse_cli(argv)
    }

    fn run_of(invocation: Invocation) -> RunArgs {
        match invocation {
            Invocation::Command(cli) => run_args(*cli),
            Invocation::PrintConfig(text) => panic!("printed config:\n{text}"),
        }
    }

    #[test]
    fn config_file_values_beat_defaults_and_flags_beat_the_file() {
        let file = r#"
            database_url = "postgres://u@h/d"
            slot = "from_file"
            max_in_flight = 512
            no_create_slot = true
            status_interval = "250ms"
            log_format = "json"
        "#;
        let args = run_of(with_file(file, &["--slot", "from_flag"]).unwrap());
        assert_eq!(args.slot.as_str(), "from_flag");
        assert_eq!(args.max_in_flight, 512);
        assert!(args.no_create_slot);
        assert_eq!(args.status_interval, Duration::from_millis(250));
        assert_eq!(args.publication.as_str(), "outbox_pub", "default kept");
        let Invocation::Command(cli) = with_file(file, &[]).unwrap() else {
            panic!("not a command")
        };
        assert_eq!(cli.log_format, LogFormat::Json, "global flags too");
    }

    #[test]
    fn config_file_keys_may_use_dashes() {
        let args = run_of(with_file("max-in-flight = 7\n", &[]).unwrap());
        assert_eq!(args.max_in_flight, 7);
    }

    #[test]
    fn config_file_errors_name_the_key() {
        for (toml, needle) in [
            ("max_inflight = 3", "unknown key `max_inflight`"),
            ("config = \"x.toml\"", "unknown key `config`"),
            ("max_in_flight = 0", "invalid value for `max_in_flight`"),
            ("slot = \"Bad-Slot\"", "invalid value for `slot`"),
            (
                "status_interval = \"soon\"",
                "invalid value for `status_interval`",
            ),
            (
                "no_create_slot = \"yes\"",
                "invalid value for `no_create_slot`",
            ),
            (
                "slot = [\"a\", \"b\"]",
                "`slot`: takes one value, not a list",
            ),
            ("slot = {a = 1}", "expected a string, number or boolean"),
            ("slot = ", "TOML parse error"),
        ] {
            let err = with_file(toml, &[]).unwrap_err().to_string();
            assert!(err.contains(needle), "{toml}: {err}");
        }
        let err = parse_cli(["outbox-cdc", "run", "--config", "/nonexistent/x.toml"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.toml"), "{err}");
    }

    #[test]
    fn print_config_redacts_secrets_and_says_where_values_came_from() {
        let file = r#"
            database_url = "postgres://app:hunter2@db/app?password=hunter3"
            nats_url = "nats://u:s3cret@n1:4222,nats://t0ken@n2:4222"
            max_in_flight = 512
        "#;
        let Invocation::PrintConfig(text) =
            with_file(file, &["--print-config", "--slot", "s1"]).unwrap()
        else {
            panic!("no config printed")
        };
        for secret in ["hunter2", "hunter3", "s3cret", "t0ken"] {
            assert!(!text.contains(secret), "{secret} in\n{text}");
        }
        for line in [
            "slot = \"s1\"  # flag",
            "max_in_flight = 512  # config file",
            "publication = \"outbox_pub\"  # default",
            "nats_url = \"nats://u:***@n1:4222,nats://***@n2:4222\"  # config file",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // The output is itself a valid config file.
        let printed: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(printed["max_in_flight"].as_integer(), Some(512));
    }
}
