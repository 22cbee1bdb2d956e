//! `run --config`: flags > environment > file > defaults, seen through `--print-config` of the
//! real binary (the environment cannot be varied safely inside one test process). The other
//! commands' reading of the file: tests/cli.rs.

use std::process::Command;

fn print_config(file: &std::path::Path, env: &[(&str, &str)], flags: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-cdc"))
        .args(["run", "--print-config", "--config"])
        .arg(file)
        .args(["--database-url", "postgres://app@db/app"])
        .args(flags)
        .env_remove("OUTBOX_CDC_MAX_IN_FLIGHT")
        .env_remove("OUTBOX_CDC_SLOT")
        .envs(env.iter().copied())
        .output()
        .expect("run outbox-cdc");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

#[test]
fn flags_beat_environment_beats_file_beats_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("outbox-cdc.toml");
    std::fs::write(&file, "max_in_flight = 512\nslot = \"file_slot\"\n").expect("write");

    let text = print_config(&file, &[], &[]);
    assert!(
        text.contains("max_in_flight = 512  # config file"),
        "{text}"
    );
    assert!(text.contains("ack_timeout = \"10s\"  # default"), "{text}");

    let env = [("OUTBOX_CDC_MAX_IN_FLIGHT", "2048")];
    let text = print_config(&file, &env, &[]);
    assert!(
        text.contains("max_in_flight = 2048  # environment"),
        "{text}"
    );
    assert!(
        text.contains("slot = \"file_slot\"  # config file"),
        "{text}"
    );

    let text = print_config(&file, &env, &["--max-in-flight", "64"]);
    assert!(text.contains("max_in_flight = 64  # flag"), "{text}");
}

#[test]
fn the_file_can_come_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("outbox-cdc.toml");
    std::fs::write(&file, "slot = \"env_file_slot\"\n").expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-cdc"))
        .args([
            "run",
            "--print-config",
            "--database-url",
            "postgres://app@db/app",
        ])
        .env("OUTBOX_CDC_CONFIG", &file)
        .env_remove("OUTBOX_CDC_SLOT")
        .output()
        .expect("run outbox-cdc");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("slot = \"env_file_slot\"  # config file"),
        "{text}"
    );
}

#[test]
fn the_example_config_file_is_valid() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/outbox-cdc.toml");
    let text = print_config(&example, &[], &[]);
    assert!(
        text.contains("stream = \"OUTBOX\"  # config file"),
        "{text}"
    );
}
