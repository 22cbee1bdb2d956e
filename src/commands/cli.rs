//! The command line: the clap tree, the TOML config file layered under it
//! (flags > environment > file > defaults), and `run --print-config`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use super::run::RunArgs;
use crate::sink::{NatsUrlError, redact_nats_url};
use crate::source::connection::DatabaseUrlError;

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
    /// Re-publish rows from the outbox table, with run's mapping, skipping what the stream holds.
    Backfill(Box<super::backfill::BackfillArgs>),
    /// Audit a stream: commit order, the predecessor chain, no id twice; against the table too.
    Verify(Box<super::verify::VerifyArgs>),
    /// Try it: throwaway PostgreSQL and NATS, a sample producer and a subscriber, live.
    Demo(super::demo::DemoArgs),
    /// Check the server and create what is missing: outbox table, publication, slot.
    Setup(super::setup::SetupArgs),
    /// Show the slot: holder, confirmed and restart LSN, lag in bytes, wal_status.
    Status(super::status::StatusArgs),
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
                // `backfill` takes `run`'s flags, and so the same file.
                command
                    .mut_subcommand("run", |run| run.mut_arg(&id, set))
                    .mut_subcommand("backfill", |backfill| backfill.mut_arg(&id, set))
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

/// `--config FILE`, `--config=FILE` or `OUTBOX_CDC_CONFIG`, when the command is `run` or
/// `backfill`.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let args: Vec<&str> = argv.iter().skip(1).filter_map(|a| a.to_str()).collect();
    if !args.contains(&"run") && !args.contains(&"backfill") {
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
        "nats_url" => redact_nats_url(value),
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
    #[error(transparent)]
    NatsUrl(#[from] NatsUrlError),
    #[error(
        "--stream creates a stream capturing the subjects outbox-cdc publishes, but with --subject-column and no --subject-template they are not known in advance: create the stream yourself (and drop --stream), or give --subject-template"
    )]
    StreamSubjectsUnknown,
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
    #[error("--message-prefix `{0}`: {1}")]
    MessagePrefix(String, &'static str),
    #[error("--replication-timeout must be at least 1s")]
    ReplicationTimeout,
    #[error("--status-interval must be at least 10ms")]
    StatusInterval,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn run_args(cli: Cli) -> RunArgs {
        match cli.command {
            Command::Run(args) => *args,
            other => panic!("not a run command: {other:?}"),
        }
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
