//! The command line itself, through the real binary and without servers: which flags each
//! command takes, `--help`, `--print-config`, `--config`, how errors look, `--version`; and the
//! shape of `src/commands/` (no import cycle).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

/// `outbox-cdc <args>` with exactly `env` (not the caller's environment), without servers.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox-cdc"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run outbox-cdc")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A config file in a temporary directory.
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox-cdc.toml");
    std::fs::write(&path, text).expect("write config");
    let path = path.display().to_string();
    (dir, path)
}

/// Servers nothing listens on: a command that connected would fail.
const NOWHERE_PG: &str = "postgres://app:pw-s3cret@127.0.0.1:1/app";
const NOWHERE_NATS: &str = "nats://127.0.0.1:1";

/// What each command needs on top of the servers to get past its flags.
const COMMANDS: [(&str, &[&str]); 6] = [
    ("run", &[]),
    ("backfill", &["--where", "true"]),
    ("verify", &["--stream", "OUTBOX"]),
    ("setup", &[]),
    ("status", &[]),
    ("demo", &[]),
];

/// The modules of `src/commands/` each one imports: `super::x` (or `crate::commands::x`) in a
/// child names its sibling `x`, or the parent when `x` is no module; the parent imports the
/// children it names.
fn command_imports() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/commands");
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("src/commands") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read");
            // Comments may name modules without importing them.
            let code: String = text
                .lines()
                .map(|line| line.split("//").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            let stem = path
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned();
            sources.insert(stem, code);
        }
    }
    let modules: BTreeSet<String> = sources.keys().filter(|m| *m != "mod").cloned().collect();
    let ident = |text: &str| -> String {
        text.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    // The first segment of every path after `prefix`, also inside `prefix{a::x, b}`.
    let named_after = |code: &str, prefix: &str| -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (at, _) in code.match_indices(prefix) {
            let rest = &code[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or_default();
                names.extend(group.split(',').map(|p| ident(p.trim())));
            } else {
                names.insert(ident(rest));
            }
        }
        names.remove("");
        names
    };
    let mut graph = BTreeMap::new();
    for (module, code) in &sources {
        let mut names = named_after(code, "crate::commands::");
        let targets: BTreeSet<String> = if module == "mod" {
            for word in code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
                if let Some((first, _)) = word.split_once("::") {
                    names.insert(first.to_owned());
                }
            }
            names.into_iter().filter(|n| modules.contains(n)).collect()
        } else {
            names.extend(named_after(code, "super::"));
            names
                .into_iter()
                .map(|n| {
                    if modules.contains(&n) {
                        n
                    } else {
                        "mod".into()
                    }
                })
                .filter(|n| n != module)
                .collect()
        };
        graph.insert(module.clone(), targets);
    }
    graph
}

#[test]
fn commands_import_each_other_without_a_cycle() {
    let graph = command_imports();
    // Depth-first search; a module met again while still open closes a cycle.
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        open: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = open.iter().position(|m| m == module) {
            let mut cycle = open[at..].to_vec();
            cycle.push(module.to_owned());
            return Some(cycle);
        }
        if done.contains(module) {
            return None;
        }
        open.push(module.to_owned());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, open, done) {
                return Some(cycle);
            }
        }
        open.pop();
        done.insert(module.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let cycle = visit(module, &graph, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "import cycle in src/commands: {}\n{graph:#?}",
            cycle.unwrap_or_default().join(" -> ")
        );
    }
    // The shared pieces are leaves: arguments and errors import no command.
    assert!(graph["error"].is_empty(), "{graph:#?}");
    assert!(graph["args"].iter().all(|m| m == "error"), "{graph:#?}");
    // The parent owns its children: no child imports the clap tree.
    for (module, imports) in &graph {
        assert!(
            !imports.contains("cli") || module == "mod",
            "{module} imports cli"
        );
    }
}

// Issue 21 item 2: --print-config prints the effective configuration and does nothing else.

#[test]
fn print_config_acts_for_no_command_and_shows_what_applies() {
    let servers = [("DATABASE_URL", NOWHERE_PG), ("NATS_URL", NOWHERE_NATS)];
    for (command, extra) in COMMANDS {
        let mut args = vec![command, "--print-config"];
        args.extend_from_slice(extra);
        let output = cli(&args, &servers);
        let text = stdout(&output);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{command}: {text}{}",
            stderr(&output)
        );
        assert!(
            text.starts_with(&format!("# outbox-cdc {command}: effective configuration")),
            "{text}"
        );
        // Nothing was connected to (the servers do not exist), and the password stays secret.
        assert!(stderr(&output).is_empty(), "{command}: {}", stderr(&output));
        assert!(!text.contains("pw-s3cret"), "{text}");
        text.parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("{command}: not TOML: {e}\n{text}"));
    }
    let output = cli(
        &["run", "--print-config", "--database-url", NOWHERE_PG],
        &[],
    );
    let text = stdout(&output);
    for line in [
        "nats_url = \"nats://127.0.0.1:4222\"  # default",
        "subject_template = \"outbox.{aggregate_type}.{event_type}\"  # default",
        "database_url = \"postgres://app:***@127.0.0.1:1/app\"  # flag",
        "# id_column = (unset: `id` when the table has it",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    let output = cli(
        &["run", "--print-config", "--subject-column", "topic"],
        &servers,
    );
    let text = stdout(&output);
    assert!(
        text.contains("# subject_template = (unset: the subject comes from --subject-column)"),
        "{text}"
    );
    assert!(
        text.contains(
            "database_url = \"postgres://app:***@127.0.0.1:1/app\"  # environment (DATABASE_URL)"
        ),
        "{text}"
    );
}

#[test]
fn print_config_refuses_what_the_command_refuses() {
    let db = ("DATABASE_URL", NOWHERE_PG);
    for (args, needle) in [
        (
            &["run", "--print-config", "--on-error", "dead-letter"][..],
            "--on-error dead-letter needs a valid --dead-letter-subject",
        ),
        (
            &[
                "backfill",
                "--print-config",
                "--where",
                "true",
                "--subject-column",
                "t",
                "--stream",
                "S",
            ][..],
            "--stream creates a stream",
        ),
        (
            &["run", "--print-config", "--status-interval", "1ms"][..],
            "--status-interval",
        ),
        (
            &["status", "--print-config", "--standby-url", "nope"][..],
            "--standby-url",
        ),
        (
            &[
                "verify",
                "--print-config",
                "--stream",
                "S",
                "--nats-url",
                "nats://a b",
            ][..],
            "--nats-url",
        ),
    ] {
        let output = cli(args, &[db]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stdout(&output)
        );
        assert!(stdout(&output).is_empty(), "{args:?}: {}", stdout(&output));
        assert!(
            stderr(&output).contains(needle),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    // Without a database URL, as `run` would.
    let output = cli(&["run", "--print-config"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("no PostgreSQL URL"),
        "{}",
        stderr(&output)
    );
}

// Issue 21 item 3: every command reads --config / OUTBOX_CDC_CONFIG.

#[test]
fn every_command_reads_the_config_file_taking_the_keys_it_knows() {
    let (_dir, file) = config_file(
        "slot = \"orders_outbox\"\nmax_in_flight = 512\nstream = \"ORDERS\"\nlog_format = \"json\"\n\
         table = \"app.outbox\"\npublication = \"orders_pub\"\n",
    );
    let env = [("DATABASE_URL", NOWHERE_PG)];
    for (command, extra) in COMMANDS {
        let mut args = vec![command, "--print-config", "--config", &file];
        args.extend_from_slice(extra);
        let output = cli(&args, &env);
        let text = stdout(&output);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{command}: {}",
            stderr(&output)
        );
        assert!(
            text.contains("log_format = \"json\"  # config file"),
            "{command}: {text}"
        );
        // The same through the environment.
        let mut args = vec![command, "--print-config"];
        args.extend_from_slice(extra);
        let via_env = cli(&args, &[env[0], ("OUTBOX_CDC_CONFIG", &file)]);
        assert_eq!(stdout(&via_env), text, "{command}: {}", stderr(&via_env));
    }
    for command in ["status", "setup", "run"] {
        let output = cli(&[command, "--print-config", "--config", &file], &env);
        let text = stdout(&output);
        assert!(
            text.contains("slot = \"orders_outbox\"  # config file"),
            "{command}: {text}"
        );
    }
    let output = cli(&["setup", "--print-config", "--config", &file], &env);
    assert!(stdout(&output).contains("table = \"app.outbox\"  # config file"));
    // `verify --stream` is required: the file gives it.
    let output = cli(&["verify", "--print-config", "--config", &file], &env);
    assert!(
        stdout(&output).contains("stream = \"ORDERS\"  # config file"),
        "{}",
        stderr(&output)
    );
    // A flag beats the file, for every command.
    let output = cli(
        &[
            "status",
            "--print-config",
            "--config",
            &file,
            "--slot",
            "other",
        ],
        &env,
    );
    assert!(stdout(&output).contains("slot = \"other\"  # flag"));
}

#[test]
fn a_key_no_command_knows_is_refused_naming_it() {
    let (_dir, file) = config_file("slot = \"s\"\nmax_inflight = 3\n");
    for (command, extra) in COMMANDS {
        let mut args = vec![command, "--config", &file];
        args.extend_from_slice(extra);
        let output = cli(&args, &[("DATABASE_URL", NOWHERE_PG)]);
        assert_eq!(output.status.code(), Some(2), "{command}");
        assert!(
            stderr(&output).starts_with(&format!(
                "error: config file {file}: unknown key `max_inflight`: no command of outbox-cdc has a flag --max-inflight"
            )),
            "{command}: {}",
            stderr(&output)
        );
    }
    // A bad value of a key this command takes is refused too; one only another command takes is
    // that command's business.
    let (_dir, file) = config_file("slot = \"Bad-Slot\"\nmax_in_flight = 0\n");
    let output = cli(
        &["status", "--config", &file],
        &[("DATABASE_URL", NOWHERE_PG)],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("invalid value for `slot`"),
        "{}",
        stderr(&output)
    );
    assert!(
        !stderr(&output).contains("max_in_flight"),
        "{}",
        stderr(&output)
    );
}

// Issue 21 item 4: each command takes exactly the flags it uses, each declared once.

#[test]
fn backfill_takes_only_the_flags_it_uses() {
    let help = stdout(&cli(&["backfill", "--help"], &[]));
    for flag in [
        "--slot",
        "--status-interval",
        "--replication-timeout",
        "--standby-retry",
        "--shutdown-timeout",
        "--start-lsn",
        "--replay-window",
        "--accept-gap",
        "--initial-backfill",
        "--checkpoint-bucket",
        "--http-addr",
        "--no-create-slot",
        "--message-prefix",
        "--atomic-transactions",
        "--atomic-max-batch",
        "--table ",
    ] {
        assert!(
            !help.contains(flag),
            "backfill --help lists {flag}:\n{help}"
        );
        // Given anyway, it is refused (a switch, or with a value).
        let mut args = vec!["backfill", "--where", "true", flag.trim(), "1"];
        if ["--accept-gap", "--no-create-slot", "--atomic-transactions"].contains(&flag) {
            args.pop();
        }
        let output = cli(&args, &[("DATABASE_URL", NOWHERE_PG)]);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&output).contains("unexpected argument"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    // Its table filter has a name of its own: `setup --table` is the outbox table to create.
    assert!(help.contains("--only-table <TABLE>"), "{help}");
    assert!(stdout(&cli(&["setup", "--help"], &[])).contains("--table <TABLE>"));
}

#[test]
fn a_flag_several_commands_take_has_one_name_variable_and_default() {
    let command = <outbox_cdc::commands::Cli as clap::CommandFactory>::command();
    /// A flag as one command declares it: its environment variable, its defaults, and the
    /// commands that declare it so.
    type Declared = (Option<String>, Vec<String>, Vec<String>);
    let mut seen: BTreeMap<String, Declared> = BTreeMap::new();
    for sub in command.get_subcommands() {
        for arg in sub.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|d| d.to_string_lossy().into_owned())
                .collect();
            let entry = seen
                .entry(long.to_owned())
                .or_insert_with(|| (env.clone(), defaults.clone(), Vec::new()));
            assert_eq!(
                (&entry.0, &entry.1),
                (&env, &defaults),
                "--{long} of `{}` differs from `{}`'s",
                sub.get_name(),
                entry.2.join("`, `")
            );
            entry.2.push(sub.get_name().to_owned());
        }
    }
    // The flags the issue named, where they appear.
    for (long, commands) in [
        (
            "database-url",
            &["run", "backfill", "verify", "setup", "status"][..],
        ),
        ("slot", &["run", "setup", "status"][..]),
        ("publication", &["run", "backfill", "verify", "setup"][..]),
        ("checkpoint-bucket", &["run", "status"][..]),
        ("id-column", &["run", "backfill", "verify"][..]),
        (
            "config",
            &["run", "backfill", "verify", "demo", "setup", "status"][..],
        ),
    ] {
        let mut found = seen[long].2.clone();
        found.sort();
        let mut want: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
        want.sort();
        assert_eq!(found, want, "--{long}");
    }
    assert_eq!(
        seen["database-url"].0.as_deref(),
        Some("OUTBOX_CDC_DATABASE_URL")
    );
    assert!(
        seen["id-column"].1.is_empty(),
        "--id-column is detected, not defaulted"
    );
}

#[test]
fn verify_reads_the_database_url_from_the_environment_too() {
    let output = cli(
        &["verify", "--stream", "OUTBOX", "--print-config"],
        &[("DATABASE_URL", NOWHERE_PG)],
    );
    let text = stdout(&output);
    assert!(
        text.contains(
            "database_url = \"postgres://app:***@127.0.0.1:1/app\"  # environment (DATABASE_URL)"
        ),
        "{text}{}",
        stderr(&output)
    );
    let output = cli(&["verify", "--stream", "OUTBOX", "--print-config"], &[]);
    assert!(
        stdout(&output).contains("# database_url = (unset: the stream alone, no table check)"),
        "{}",
        stdout(&output)
    );
}

// Issue 21 item 5: --help a person can scan.

#[test]
fn help_names_each_variable_once_under_headings_short_and_long() {
    let long = stdout(&cli(&["run", "--help"], &[]));
    let short = stdout(&cli(&["run", "-h"], &[]));
    for help in [&long, &short] {
        assert_eq!(help.matches("OUTBOX_CDC_DATABASE_URL").count(), 1, "{help}");
        assert_eq!(help.matches("OUTBOX_CDC_NATS_URL").count(), 1, "{help}");
        assert_eq!(help.matches("OUTBOX_CDC_SLOT").count(), 1, "{help}");
        // No empty `=` after a variable that is not set.
        assert!(!help.contains("=]"), "{help}");
        for heading in [
            "Connection:",
            "Mapping:",
            "Delivery:",
            "Recovery:",
            "Operations:",
        ] {
            assert!(help.contains(heading), "{heading} in\n{help}");
        }
    }
    // `-h` is a summary, `--help` explains.
    assert!(
        short.lines().count() * 2 < long.lines().count(),
        "-h is not a summary:\n{short}"
    );
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(words(&long).contains("~/.pgpass are not read"), "{long}");
    assert!(!short.contains("~/.pgpass"), "{short}");
    assert!(short.contains("(see more with '--help')"), "{short}");
    // Every option of every command names its variable at most once.
    for (command, _) in COMMANDS {
        let help = stdout(&cli(&[command, "--help"], &[]));
        for variable in help.split("OUTBOX_CDC_").skip(1) {
            let name: String = variable
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            // Whole names: OUTBOX_CDC_STREAM is not counted in OUTBOX_CDC_STREAM_REPLICAS.
            let whole = help
                .match_indices(&format!("OUTBOX_CDC_{name}"))
                .filter(|(at, found)| {
                    help[at + found.len()..]
                        .chars()
                        .next()
                        .is_none_or(|c| !(c.is_ascii_uppercase() || c == '_'))
                })
                .count();
            assert_eq!(
                whole, 1,
                "{command} --help names OUTBOX_CDC_{name} twice:\n{help}"
            );
        }
    }
}

// Issue 21 item 8: one face for errors, and a version that names its commit.

/// Log lines start with a timestamp and a level; the error line does not.
fn has_log_line(text: &str) -> bool {
    text.lines()
        .any(|l| l.contains(" ERROR ") || l.contains(" WARN ") || l.contains(" INFO "))
}

#[test]
fn a_flag_error_and_a_runtime_error_look_the_same() {
    // A value found wrong after parsing: exit 2, one line.
    let output = cli(&["run", "--database-url", "nope"], &[]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(
        text.starts_with("error: invalid database URL `nope`"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "{text}");
    // What clap finds: the same first line, with its usage hint.
    let output = cli(&["run", "--max-in-flight", "0"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).starts_with("error: invalid value '0' for '--max-in-flight"));
    // Refused by the server: exit 1, the same face, no log line around it in text mode.
    let output = cli(
        &["status", "--database-url", "postgres://app@127.0.0.1:1/app"],
        &[("RUST_LOG", "info")],
    );
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: cannot connect to PostgreSQL at postgres://app@127.0.0.1:1/app"),
        "{text}"
    );
    assert_eq!(text.matches("cannot connect").count(), 1, "{text}");
    assert!(!has_log_line(&text), "{text}");
    // JSON logs carry it as a record too, for the log pipeline; the last line is the same.
    let output = cli(
        &[
            "status",
            "--log-format",
            "json",
            "--database-url",
            "postgres://app@127.0.0.1:1/app",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    let record = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON record: {text}"));
    let record: serde_json::Value = serde_json::from_str(record).expect("JSON");
    assert_eq!(record["level"], "ERROR", "{record}");
    assert!(
        text.lines()
            .last()
            .unwrap_or_default()
            .starts_with("error: cannot connect"),
        "{text}"
    );
}

#[test]
fn version_names_the_commit() {
    let version = stdout(&cli(&["--version"], &[]));
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let commit = head.unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(
        version.trim(),
        format!("outbox-cdc {} ({commit})", env!("CARGO_PKG_VERSION"))
    );
}

// Issue 21 item 6: a connection string keeps libpq's promises or is refused at start.

#[test]
fn connection_parameters_outbox_cdc_cannot_honour_are_refused_naming_them() {
    let home = tempfile::tempdir().expect("tempdir");
    let home = home.path().to_str().expect("utf-8");
    for (params, needle) in [
        (
            "connect_timeout=abc",
            "invalid integer value `abc` for connection option `connect_timeout`",
        ),
        (
            "load_balance_hosts=sometimes",
            "invalid load_balance_hosts value `sometimes`",
        ),
        (
            "channel_binding=always",
            "invalid channel_binding value `always`",
        ),
        (
            "sslmode=verify-full",
            "sslmode=verify-full needs the certificate authority",
        ),
        (
            "sslrootcert=system&sslmode=require",
            "weak sslmode `require` may not be used with sslrootcert=system",
        ),
        (
            "sslrootcert=/ca.pem",
            "sslmode=prefer (the default) with a root certificate",
        ),
        ("hostaddr=10.0.0.1", "hostaddr together with host"),
        (
            "sslcrl=/crl.pem",
            "unsupported parameter `sslcrl`: outbox-cdc does not implement",
        ),
        ("keepalives=0", "unsupported parameter `keepalives`"),
        (
            "require_auth=scram-sha-256",
            "unsupported parameter `require_auth`",
        ),
    ] {
        let url = format!("postgres://app:pw-s3cret@db.example/app?{params}");
        for (command, extra) in COMMANDS.iter().filter(|(c, _)| *c != "demo") {
            let mut args = vec![*command, "--database-url", &url];
            args.extend_from_slice(extra);
            let output = cli(&args, &[("HOME", home)]);
            let text = stderr(&output);
            assert_eq!(output.status.code(), Some(2), "{command} {params}: {text}");
            assert!(
                text.starts_with("error: invalid database URL"),
                "{command} {params}: {text}"
            );
            assert!(text.contains(needle), "{command} {params}: {text}");
            assert!(!text.contains("pw-s3cret"), "{text}");
        }
    }
    // The replication connection cannot bind to the channel: `run` refuses what the others honour.
    let url = "postgres://app@db.example/app?sslmode=require&channel_binding=require";
    let output = cli(&["run", "--database-url", url], &[("HOME", home)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("channel_binding=require"),
        "{}",
        stderr(&output)
    );
    let output = cli(
        &["status", "--database-url", url, "--print-config"],
        &[("HOME", home)],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    // --help says what is read and what is not.
    let help = stdout(&cli(&["run", "--help"], &[]));
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        "PG* environment variables",
        "~/.pgpass are not read",
        "connect_timeout",
        "channel_binding=require",
    ] {
        assert!(help.contains(needle), "{needle} in\n{help}");
    }
}
