//! The README's *Install and upgrade* commands, run as written.
//!
//! `cargo install` builds the release profile from nothing, minutes on CI's two cores; CI builds
//! that profile once already (`make image-replay`, the same `cargo build --release --locked`).
//! So here both commands run with `--debug`, into a temporary `--root`, sharing this test run's
//! target directory (under nextest, which holds no lock on it while tests run; under `cargo
//! test`, which does, a directory of their own). Building there re-links
//! `target/debug/outbox-cdc`, the binary every other test starts, so nextest runs this test
//! alone (`.config/nextest.toml`) and the test puts the suite's binary back when it ends. What
//! they prove is that the lock file is current (`--locked`), that the git form finds the
//! package by name in a clone of the committed tree and builds it with nothing else, and that
//! the installed binary runs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The commands in the README's *Install and upgrade* code blocks.
fn readme_install_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Install and upgrade\n")
        .nth(1)
        .expect("the README has an *Install and upgrade* section")
        .split("\n## ")
        .next()
        .expect("a section");
    let mut in_block = false;
    let mut commands = Vec::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
        } else if in_block && !line.trim().is_empty() {
            commands.push(line.trim().to_owned());
        }
    }
    commands
}

/// `cargo` with a user's environment: without the variables cargo sets for a test (build
/// scripts such as ring's rebuild when `CARGO_PKG_NAME` or `CARGO_MANIFEST_DIR` change, and
/// everything above them with them).
fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if (name.starts_with("CARGO_") && name != "CARGO_HOME") || name == "OUT_DIR" {
            command.env_remove(name.as_ref());
        }
    }
    command
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?}: {text}");
    text
}

#[test]
fn readme_names_the_install_commands_and_the_rust_version_cargo_toml_declares() {
    let commands = readme_install_commands();
    assert_eq!(
        commands,
        [
            "cargo install --locked --path .",
            "cargo install --locked --git <repository-url> outbox-cdc",
        ]
    );
    let metadata: serde_json::Value = serde_json::from_str(&run(cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root())))
    .expect("cargo metadata prints JSON");
    let package = &metadata["packages"][0];
    assert_eq!(package["name"], "outbox-cdc");
    assert!(
        package["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .any(|t| t["name"] == "outbox-cdc" && t["kind"][0] == "bin"),
        "`cargo install … outbox-cdc` installs the outbox-cdc binary"
    );
    let rust_version = package["rust_version"].as_str().expect("rust-version");
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    assert!(
        readme.contains(&format!("With Rust {rust_version} or newer")),
        "the README names Cargo.toml's rust-version, {rust_version}"
    );
}

fn shares_the_suites_target_dir() -> bool {
    std::env::var_os("NEXTEST_RUN_ID").is_some()
}

/// Where `cargo install` builds: this run's target directory under nextest, else one of its own.
fn target_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    if shares_the_suites_target_dir() {
        tmp.parent().expect("the target directory").to_owned()
    } else {
        tmp.join("install")
    }
}

fn install(command: &str, url: Option<&str>, cwd: &Path, into: &Path) -> PathBuf {
    let mut words: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
    assert_eq!(words[..2], ["cargo", "install"], "{command}");
    if let Some(url) = url {
        for word in &mut words {
            if word == "<repository-url>" {
                *word = url.to_owned();
            }
        }
    }
    run(cargo()
        .args(&words[1..])
        .args(["--debug", "--jobs", "1", "--root"])
        .arg(into)
        .arg("--target-dir")
        .arg(target_dir())
        .current_dir(cwd));
    let binary = into.join("bin/outbox-cdc");
    let version = run(Command::new(&binary).arg("--version"));
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "{command}: {version}"
    );
    binary
}

/// Keeps the suite's own `outbox-cdc` binary while `cargo install` re-links that path in the
/// shared target directory, and puts it back on drop (also when the test fails).
struct SuiteBinary {
    path: PathBuf,
    kept: Option<PathBuf>,
}

impl SuiteBinary {
    fn keep() -> Self {
        let path = PathBuf::from(env!("CARGO_BIN_EXE_outbox-cdc"));
        if shares_the_suites_target_dir() {
            let kept = path.with_extension("kept-by-install-test");
            // cargo replaces the file (unlink, then link), so a hard link keeps this one intact.
            let _ = std::fs::remove_file(&kept);
            std::fs::hard_link(&path, &kept).expect("keep the suite's outbox-cdc binary");
            return Self {
                path,
                kept: Some(kept),
            };
        }
        Self { path, kept: None }
    }
}

impl Drop for SuiteBinary {
    fn drop(&mut self) {
        if let Some(kept) = &self.kept
            && let Err(error) = std::fs::rename(kept, &self.path)
        {
            eprintln!("could not put the suite's outbox-cdc binary back: {error}");
        }
    }
}

#[test]
fn readme_install_commands_install_a_binary_that_runs() {
    let commands = readme_install_commands();
    let _suite_binary = SuiteBinary::keep();
    let dir = tempfile::tempdir().expect("tempdir");

    // The path form, from the checkout.
    install(&commands[0], None, &root(), &dir.path().join("from-path"));

    // The git form, from a clone of the committed tree (what a git URL serves).
    let clone = dir.path().join("clone");
    run(Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(root())
        .arg(&clone));
    let url = format!("file://{}", clone.display());
    // Upgrading is the same command again: it reinstalls what changed.
    let into = dir.path().join("from-git");
    install(&commands[1], Some(&url), dir.path(), &into);
    run(Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(["commit", "--quiet", "--allow-empty", "-m", "a newer commit"])
        .current_dir(&clone));
    let again = run(cargo()
        .args(
            commands[1]
                .replace("<repository-url>", &url)
                .split_whitespace()
                .skip(1),
        )
        .args(["--debug", "--jobs", "1", "--root"])
        .arg(&into)
        .arg("--target-dir")
        .arg(target_dir())
        .current_dir(dir.path()));
    assert!(
        again.contains("Replacing") || again.contains("Replaced"),
        "{again}"
    );
}

/// The binary `cargo install` and the image ship is stripped; `--profile profiling`, which
/// docs/benchmarks.md gives for `perf`, is the same build with symbols and line tables.
#[test]
fn release_is_stripped_and_profiling_is_release_with_line_tables() {
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("Cargo.toml is TOML");
    let profile = &manifest["profile"];
    let release = &profile["release"];
    assert!(
        matches!(release.get("strip"), Some(toml::Value::Boolean(true)))
            || release.get("strip").and_then(|s| s.as_str()) == Some("symbols"),
        "{release:?}"
    );
    assert_eq!(release.get("debug"), None, "{release:?}");
    let profiling = &profile["profiling"];
    assert_eq!(profiling["inherits"].as_str(), Some("release"));
    assert_eq!(profiling["debug"].as_str(), Some("line-tables-only"));
    assert_eq!(profiling["strip"].as_bool(), Some(false));
}
