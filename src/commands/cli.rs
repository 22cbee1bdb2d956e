//! The command line: the clap tree, which owns each command's arguments; the TOML config file
//! layered under it (flags > environment > file > defaults); every command's flags checked into
//! what it runs with ([`Task`]) before anything is connected; and `--print-config`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use super::args::{ENV_FALLBACKS, heading};
use super::backfill::{Backfill, BackfillArgs};
use super::demo::DemoArgs;
pub use super::error::ConfigError;
use super::error::clap_message;
use super::run::{Run, RunArgs};
use super::setup::{Setup, SetupArgs};
use super::status::{Status, StatusArgs};
use super::tables::TableSections;
use super::verify::{Verify, VerifyArgs};
use crate::pipeline::mapping::DEFAULT_SUBJECT_TEMPLATE;
use crate::sink::redact_nats_url;
use crate::source::connection::redact_url;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-cdc",
    version = crate::VERSION,
    about = "Publishes a PostgreSQL outbox table to NATS JetStream from the WAL, in commit order.",
    after_help = "Each option can also be set by the environment variable named in its help, or \
                  in the --config file; `outbox-cdc <command> --print-config` shows what applies."
)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log pipelines
    ///
    /// The level comes from RUST_LOG (default `info`). Whatever the format, an error that ends
    /// the process is printed last as `error: <message>` on stderr; with `json` it is also
    /// logged as an ERROR record.
    #[arg(long, global = true, env = "OUTBOX_CDC_LOG_FORMAT", value_enum,
          default_value_t = LogFormat::Text, help_heading = heading::OPERATIONS)]
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
    /// Stream inserted outbox rows to JetStream until stopped (SIGTERM/SIGINT)
    Run(Box<RunArgs>),
    /// Re-publish rows from the outbox table, with run's mapping, skipping what the stream holds
    Backfill(Box<BackfillArgs>),
    /// Audit a stream: commit order, the predecessor chain, no id twice; against the table too
    ///
    /// Given a database URL (--database-url, or its variables; set empty for the stream alone),
    /// also the rows of the publication's tables the stream lacks, and the events the tables
    /// lack. Exit 1 on a finding.
    Verify(Box<VerifyArgs>),
    /// Try it: throwaway PostgreSQL and NATS, a sample producer and a subscriber, live
    Demo(DemoArgs),
    /// Check the server and create what is missing: outbox table, publication, slot
    Setup(Box<SetupArgs>),
    /// Show the slot: holder, confirmed and restart LSN, lag, wal_status, the checkpoint
    Status(Box<StatusArgs>),
}

/// A command with its flags checked: what it runs with.
#[derive(Debug)]
pub enum Task {
    Run(Box<Run>),
    Backfill(Box<Backfill>),
    Verify(Box<Verify>),
    Demo(DemoArgs),
    Setup(Box<Setup>),
    Status(Box<Status>),
}

impl Command {
    /// Checks the flags, and the config file's per-table `sections`, as the command checks them
    /// before connecting anywhere.
    pub fn resolve(self, sections: &TableSections) -> Result<Task, ConfigError> {
        Ok(match self {
            Command::Run(args) => Task::Run(Box::new(args.resolve_with(sections)?)),
            Command::Backfill(args) => Task::Backfill(Box::new(args.resolve_with(sections)?)),
            Command::Verify(args) => Task::Verify(Box::new(args.resolve_with(sections)?)),
            Command::Demo(args) => Task::Demo(args),
            Command::Setup(args) => Task::Setup(Box::new(args.resolve()?)),
            Command::Status(args) => Task::Status(Box::new(args.resolve()?)),
        })
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Run this, logging in this format.
    Task { log_format: LogFormat, task: Task },
    /// `--print-config`: the effective configuration, ready to print.
    PrintConfig(String),
}

/// The clap tree as `--help` shows it: environment variables named, their values not (they
/// may be secret; `--print-config` shows what applies, redacted).
pub fn command() -> clap::Command {
    Cli::command()
        .mut_args(|arg| arg.hide_env_values(true))
        .mut_subcommands(|sub| sub.mut_args(|arg| arg.hide_env_values(true)))
}

/// Parses the command line, with the config file (`--config FILE` or `OUTBOX_CDC_CONFIG`)
/// supplying values for flags given neither on the command line nor in the environment, and
/// checks the result as the command would.
pub fn parse_cli<I, T>(argv: I) -> Result<Invocation, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut command = with_env_fallbacks(command());
    let mut from_file = BTreeSet::new();
    let mut sections = TableSections::default();
    if let Some((name, path)) = config_file(&command, &argv) {
        let (values, file_sections) = read_config_file(&command, &name, &path)?;
        sections = file_sections;
        for FileValue {
            id,
            values,
            top_level,
        } in values
        {
            // A value from the file satisfies a required flag, as one given would.
            let set = |arg: clap::Arg| arg.default_values(values.clone()).required(false);
            command = if top_level {
                command.mut_arg(&id, set)
            } else {
                command.mut_subcommand(&name, |sub| sub.mut_arg(&id, set))
            };
            from_file.insert(id);
        }
    }
    let matches = command.clone().try_get_matches_from(&argv)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let Some((name, sub)) = matches.subcommand() else {
        // clap requires a subcommand; this is not reached.
        return Err(clap::Error::new(clap::error::ErrorKind::MissingSubcommand).into());
    };
    let print_config = sub.get_flag("print_config");
    let task = cli.command.resolve(&sections)?;
    if print_config {
        let mut text = render_effective_config(&command, name, &matches, sub, &from_file);
        if !sections.is_empty() {
            text.push_str(&format!(
                "\n# Tables (from the config file)\n{}",
                sections.to_toml()
            ));
        }
        return Ok(Invocation::PrintConfig(text));
    }
    Ok(Invocation::Task {
        log_format: cli.log_format,
        task,
    })
}

/// `DATABASE_URL` and `NATS_URL` stand in for `OUTBOX_CDC_DATABASE_URL` and
/// `OUTBOX_CDC_NATS_URL` when those are unset or empty: below them, above the config file.
fn with_env_fallbacks(mut command: clap::Command) -> clap::Command {
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    let names: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .collect();
    for name in names {
        for (id, fallback) in ENV_FALLBACKS {
            let Some(arg) = command
                .find_subcommand(&name)
                .and_then(|sub| sub.get_arguments().find(|a| a.get_id() == id))
            else {
                continue;
            };
            if arg.get_env().is_some_and(|own| set(&own.to_string_lossy())) {
                continue;
            }
            let env = set(fallback).then_some(fallback);
            command = command.mut_subcommand(&name, |sub| sub.mut_arg(id, |arg| arg.env(env)));
        }
    }
    command
}

/// Which command runs and the config file it reads, if any: the command line read leniently
/// (a required flag may come from the file itself). `--help` and `--version` read no file.
fn config_file(command: &clap::Command, argv: &[OsString]) -> Option<(String, PathBuf)> {
    let matches = command
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(argv)
        .ok()?;
    let (name, sub) = matches.subcommand()?;
    let path = sub.get_one::<PathBuf>("config")?;
    (!path.as_os_str().is_empty()).then(|| (name.to_owned(), path.clone()))
}

/// Flags that make no sense inside the file itself.
const NOT_IN_FILE: &[&str] = &["config", "print_config", "help", "version"];

/// One key of the config file that the command takes, checked by its flag's own parser.
struct FileValue {
    /// The argument's id.
    id: String,
    values: Vec<String>,
    /// A flag of the top-level command (global), not of the subcommand.
    top_level: bool,
}

/// The keys of the file that `name` takes. A key only other commands take is left to them; a
/// key no command takes is an error.
fn read_config_file(
    command: &clap::Command,
    name: &str,
    path: &Path,
) -> Result<(Vec<FileValue>, TableSections), ConfigError> {
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
    let sub = command
        .find_subcommand(name)
        .expect("the command line named it");
    let takes = |cmd: &clap::Command, long: &str| {
        cmd.get_arguments()
            .find(|arg| arg.get_long() == Some(long))
            .filter(|arg| !NOT_IN_FILE.contains(&arg.get_id().as_str()))
            .cloned()
    };
    let mut values = Vec::new();
    let mut sections = TableSections::default();
    for (key, value) in &table {
        // Per-table sections, for the commands that map rows (see super::tables).
        if key == TABLES_KEY {
            if TAKE_TABLES.contains(&name) {
                sections = TableSections::parse(&file, value)?;
            }
            continue;
        }
        let long = key.replace('_', "-");
        let (arg, top_level) = match (takes(sub, &long), takes(command, &long)) {
            (Some(arg), _) => (arg, false),
            (None, Some(arg)) => (arg, true),
            (None, None) if command.get_subcommands().any(|c| takes(c, &long).is_some()) => {
                continue;
            }
            (None, None) if NOT_IN_FILE.contains(&key.replace('-', "_").as_str()) => {
                return Err(ConfigError::NotInFile {
                    file,
                    key: key.clone(),
                });
            }
            (None, None) => {
                return Err(ConfigError::UnknownKey {
                    file,
                    key: key.clone(),
                });
            }
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
            check_value(&arg, text).map_err(invalid)?;
        }
        values.push(FileValue {
            id: arg.get_id().to_string(),
            values: texts,
            top_level,
        });
    }
    Ok((values, sections))
}

/// The config file's key of per-table sections, and the commands that read it.
const TABLES_KEY: &str = "tables";
const TAKE_TABLES: [&str; 3] = ["run", "backfill", "verify"];

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

/// Flags whose values are secret in part.
fn redact(id: &str, value: &str) -> String {
    match id {
        "database_url" | "standby_url" => redact_url(value),
        "nats_url" => redact_nats_url(value),
        _ => value.to_owned(),
    }
}

/// What applies when a flag is not set and its default is not a fixed value clap knows.
fn when_unset(command: &str, id: &str, sub: &clap::ArgMatches) -> Result<String, &'static str> {
    let given = |id: &str| sub.try_contains_id(id).unwrap_or(false);
    match id {
        "subject_template" if !given("subject_column") => Ok(DEFAULT_SUBJECT_TEMPLATE.to_owned()),
        "subject_template" => Err("the subject comes from --subject-column"),
        "id_column" => Err("`id` when the table has it, else <commit LSN>:<row index>"),
        "headers_column" => Err("`headers` when the table has it"),
        "created_column" => Err("`created_at` when the table has it"),
        "order_by" => Err("the created-at column, then the primary key"),
        "database_url" if command == "verify" => Err("the stream alone, no table check"),
        "stream" => Err("streams are yours to create"),
        "dead_letter_subject" => Err("no dead letters"),
        "stream_max_age" => Err("events kept for ever"),
        "stream_max_bytes" => Err("no limit of the stream's own"),
        "checkpoint_replicas" => Err("as many as the outbox's streams keep"),
        _ => Err(""),
    }
}

/// The effective configuration of `command` as TOML, one key per flag, each with its source,
/// grouped as `--help` groups them.
fn render_effective_config(
    command: &clap::Command,
    name: &str,
    top: &clap::ArgMatches,
    sub: &clap::ArgMatches,
    from_file: &BTreeSet<String>,
) -> String {
    let subcommand = command
        .find_subcommand(name)
        .expect("the command line named it");
    let mut args: Vec<(&clap::Arg, &clap::ArgMatches)> = subcommand
        .get_arguments()
        .map(|arg| (arg, sub))
        .chain(command.get_arguments().map(|arg| (arg, top)))
        .filter(|(arg, _)| !NOT_IN_FILE.contains(&arg.get_id().as_str()))
        .collect();
    let rank = |arg: &clap::Arg| {
        arg.get_help_heading()
            .and_then(|h| heading::ORDER.iter().position(|o| *o == h))
            .map_or(0, |i| i + 1)
    };
    // Within a heading, the order of `--help`.
    args.sort_by_key(|(arg, _)| (rank(arg), arg.get_display_order()));
    let mut out = format!("# outbox-cdc {name}: effective configuration (secrets redacted)\n");
    let mut heading_shown = None;
    for (arg, matches) in args {
        let id = arg.get_id().as_str();
        let heading = arg.get_help_heading();
        if heading_shown != Some(heading) {
            let _ = writeln!(out, "\n# {}", heading.unwrap_or(name));
            heading_shown = Some(heading);
        }
        let key = arg
            .get_long()
            .map_or_else(|| id.to_owned(), |long| long.replace('-', "_"));
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "flag".to_owned(),
            Some(ValueSource::EnvVariable) => format!(
                "environment ({})",
                arg.get_env().unwrap_or_default().to_string_lossy()
            ),
            Some(ValueSource::DefaultValue) if from_file.contains(id) => "config file".to_owned(),
            Some(ValueSource::DefaultValue) => "default".to_owned(),
            Some(_) => "other".to_owned(),
            None => String::new(),
        };
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|raw| raw.map(|v| redact(id, &v.to_string_lossy())).collect())
            .unwrap_or_default();
        let list = matches!(arg.get_action(), clap::ArgAction::Append);
        let (value, source) = match (values.as_slice(), list) {
            ([], _) => match when_unset(name, id, sub) {
                Ok(value) => (toml_scalar(&value), "default".to_owned()),
                Err(_) if list => ("[]".to_owned(), "default".to_owned()),
                Err("") => {
                    let _ = writeln!(out, "# {key} = (unset)");
                    continue;
                }
                Err(meaning) => {
                    let _ = writeln!(out, "# {key} = (unset: {meaning})");
                    continue;
                }
            },
            (_, true) => {
                let items: Vec<String> = values.iter().map(|v| toml_scalar(v)).collect();
                (format!("[{}]", items.join(", ")), source)
            }
            ([one], false) => (toml_scalar(one), source),
            (many, false) => (toml_scalar(&many.join(",")), source),
        };
        let _ = writeln!(out, "{key} = {value}  # {source}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn with_file(toml: &str, flags: &[&str]) -> Result<Invocation, ConfigError> {
        with_file_for("run", toml, flags)
    }

    fn with_file_for(command: &str, toml: &str, flags: &[&str]) -> Result<Invocation, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox-cdc.toml");
        std::fs::write(&path, toml).unwrap();
        let mut argv = vec!["outbox-cdc", command, "--config", path.to_str().unwrap()];
        argv.extend_from_slice(flags);
        parse_cli(argv)
    }

    fn task(invocation: Invocation) -> (LogFormat, Task) {
        match invocation {
            Invocation::Task { log_format, task } => (log_format, task),
            Invocation::PrintConfig(text) => panic!("printed config:\n{text}"),
        }
    }

    fn run_of(invocation: Invocation) -> Run {
        match task(invocation).1 {
            Task::Run(run) => *run,
            other => panic!("not run: {other:?}"),
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
        let run = run_of(with_file(file, &["--slot", "from_flag"]).unwrap());
        assert_eq!(run.config.source.slot.as_str(), "from_flag");
        assert_eq!(run.config.sink.max_in_flight, 512);
        assert!(!run.config.source.create_slot);
        assert_eq!(
            run.config.source.status_interval,
            Duration::from_millis(250)
        );
        assert_eq!(
            run.config.source.publication.as_str(),
            "outbox_pub",
            "default kept"
        );
        let (log_format, _) = task(with_file(file, &[]).unwrap());
        assert_eq!(log_format, LogFormat::Json, "global flags too");
    }

    #[test]
    fn config_file_keys_may_use_dashes() {
        let file = "max-in-flight = 7\ndatabase_url = \"postgres://u@h/d\"\n";
        assert_eq!(
            run_of(with_file(file, &[]).unwrap())
                .config
                .sink
                .max_in_flight,
            7
        );
    }

    #[test]
    fn every_command_takes_the_keys_it_knows_and_leaves_the_others() {
        let file = r#"
            database_url = "postgres://u@h/d"
            slot = "orders_outbox"
            max_in_flight = 512
            table = "app.outbox"
            stream = "ORDERS"
        "#;
        let Task::Status(status) = task(with_file_for("status", file, &[]).unwrap()).1 else {
            panic!("not status")
        };
        assert_eq!(status.slot.as_str(), "orders_outbox");
        let Task::Setup(setup) = task(with_file_for("setup", file, &[]).unwrap()).1 else {
            panic!("not setup")
        };
        assert_eq!(
            (setup.slot.as_str(), setup.table.as_str()),
            ("orders_outbox", "app.outbox")
        );
        // `stream` is required by verify: the file gives it.
        let Task::Verify(verify) = task(with_file_for("verify", file, &[]).unwrap()).1 else {
            panic!("not verify")
        };
        assert_eq!(verify.stream, "ORDERS");
        let err = with_file_for("status", "slots = \"x\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `slots`"), "{err}");
    }

    #[test]
    fn config_file_errors_name_the_key() {
        for (toml, needle) in [
            ("max_inflight = 3", "unknown key `max_inflight`"),
            (
                "config = \"x.toml\"",
                "`config` cannot be set in the config file",
            ),
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
            nats_url = "nats://u:s3cret@n1:4222,nats://u:s3cret@n2:4222"
            max_in_flight = 512
        "#;
        let Invocation::PrintConfig(text) =
            with_file(file, &["--print-config", "--slot", "s1"]).unwrap()
        else {
            panic!("no config printed")
        };
        for secret in ["hunter2", "hunter3", "s3cret"] {
            assert!(!text.contains(secret), "{secret} in\n{text}");
        }
        for line in [
            "slot = \"s1\"  # flag",
            "max_in_flight = 512  # config file",
            "publication = \"outbox_pub\"  # default",
            "nats_url = \"nats://u:***@n1:4222,nats://u:***@n2:4222\"  # config file",
            "subject_template = \"outbox.{aggregate_type}.{event_type}\"  # default",
            "# id_column = (unset: `id` when the table has it",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // The output is itself a valid config file.
        let printed: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(printed["max_in_flight"].as_integer(), Some(512));
    }

    #[test]
    fn print_config_shows_the_production_stream_settings() {
        let file = r#"
            database_url = "postgres://app@db/app"
            stream = "OUTBOX"
            stream_replicas = 3
            stream_max_bytes = "50GiB"
        "#;
        let Invocation::PrintConfig(text) =
            with_file(file, &["--print-config", "--stream-max-age", "7d"]).unwrap()
        else {
            panic!("no config printed")
        };
        for line in [
            "stream_replicas = 3  # config file",
            "stream_max_bytes = \"50GiB\"  # config file",
            "stream_max_age = \"7d\"  # flag",
            "stream_discard = \"new\"  # default",
            "duplicate_window = \"10m\"  # default",
            "# checkpoint_replicas = (unset: as many as the outbox's streams keep)",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // Refused as the command refuses them: no --stream for them to describe.
        let err = with_file(
            "database_url = \"postgres://app@db/app\"\nstream_replicas = 3\n",
            &["--print-config"],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("there is no --stream"), "{err}");
    }

    #[test]
    fn print_config_refuses_what_the_command_refuses() {
        let file = "database_url = \"postgres://u@h/d\"\n";
        let err = with_file(file, &["--print-config", "--on-error", "dead-letter"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--dead-letter-subject"), "{err}");
    }
}
