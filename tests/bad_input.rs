//! Bad configuration and bad data meet a clear error, asserted on its text.

mod support;

use std::time::Duration;

use outbox_cdc::embedded::PostgresOptions;
use support::*;

/// Runs the publisher until it exits by itself; returns its log.
async fn run_to_failure(env: &TestEnv, extra: &[&str]) -> String {
    let mut publisher = env.publisher(extra);
    let status = publisher.wait_exit(Duration::from_secs(60)).await;
    let log = publisher.log();
    assert_eq!(
        status.code(),
        Some(1),
        "must exit with status 1; log:\n{log}"
    );
    log
}

fn assert_contains(log: &str, needle: &str) {
    assert!(log.contains(needle), "expected {needle:?} in:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_not_logical() {
    let env = TestEnv::start_bare(PostgresOptions {
        wal_level: "replica",
        ..Default::default()
    })
    .await;
    let log = run_to_failure(&env, &[]).await;
    assert_contains(&log, "PostgreSQL has wal_level = replica");
    assert_contains(&log, "ALTER SYSTEM SET wal_level = logical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_publication() {
    let env = TestEnv::start_bare(PostgresOptions::default()).await;
    let log = run_to_failure(&env, &["--publication", "nope"]).await;
    assert_contains(&log, "publication `nope` does not exist");
    assert_contains(&log, "CREATE PUBLICATION nope FOR TABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_column_missing_from_the_table() {
    let env = TestEnv::start().await;
    let log = run_to_failure(&env, &["--payload-column", "body"]).await;
    assert_contains(
        &log,
        "table `public.outbox` has no column `body` (configured by --payload-column)",
    );
    assert_contains(
        &log,
        "its columns are: id, aggregate_type, aggregate_id, event_type, payload, headers, created_at",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_created_with_another_plugin() {
    let env = TestEnv::start().await;
    env.sql()
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot('outbox_cdc', 'test_decoding')",
            &[],
        )
        .await
        .unwrap();
    let log = run_to_failure(&env, &[]).await;
    assert_contains(
        &log,
        "replication slot `outbox_cdc` uses the `test_decoding` plugin",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_slot_with_no_create_slot() {
    let env = TestEnv::start().await;
    let log = run_to_failure(&env, &["--no-create-slot"]).await;
    assert_contains(
        &log,
        "replication slot `outbox_cdc` does not exist and --no-create-slot is set",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stream_for_the_subject() {
    let env = TestEnv::start().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let id: String = env
        .sql()
        .await
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('invoice', '1', 'paid', '{}') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let status = publisher.wait_exit(Duration::from_secs(60)).await;
    let log = publisher.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert_contains(
        &log,
        &format!(
            "no JetStream stream captures subject `{}.invoice.paid`",
            env.subject_prefix
        ),
    );
    assert_contains(&log, &format!("event id `{id}`"));
    assert_contains(&log, "commit LSN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_nats_is_retried_with_backoff() {
    let env = TestEnv::start().await;
    let port = outbox_cdc::embedded::free_port().unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let mut args = env.publisher_args();
    set_arg(&mut args, "--nats-url", &url);
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log(
            "cannot connect to NATS at nats://127.0.0.1",
            Duration::from_secs(30),
        )
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while publisher.log().matches("retrying with backoff").count() < 3 {
        assert!(std::time::Instant::now() < deadline, "{}", publisher.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(publisher.is_running(), "keeps retrying instead of exiting");
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "SIGTERM during backoff exits 0:\n{}",
        publisher.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_json_stops_with_the_event_named() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let id: String = env
        .sql()
        .await
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
             VALUES ('order', '1', 'created', '{}', '[1, 2]') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let status = publisher.wait_exit(Duration::from_secs(60)).await;
    let log = publisher.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert_contains(&log, &format!("event id `{id}`"));
    assert_contains(
        &log,
        "headers column `headers` must hold a JSON object, found an array",
    );

    // The row is never skipped: a restart stops at the same row again.
    let log = run_to_failure(&env, &[]).await;
    assert_contains(&log, &format!("event id `{id}`"));
    assert_eq!(
        stream_message_count(&env.jetstream().await, &env.stream).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_flags_are_rejected_before_connecting() {
    let env = TestEnv::start().await;
    let mut publisher = env.publisher(&["--slot", "Not-Valid"]);
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(2), "usage errors exit 2");
    assert_contains(&publisher.log(), "invalid slot name `Not-Valid`");

    // Values checked after parsing exit 2 as well, naming what is wrong, password redacted.
    let cases = [
        (
            "--database-url",
            "postgres://app:s3cret@127.0.0.1:1/db?sslmode=bogus",
            "unknown sslmode `bogus`",
        ),
        (
            "--database-url",
            "no-url-at-all",
            "invalid database URL `no-url-at-all`",
        ),
        (
            "--nats-url",
            "nats://app:s3cret@bad host",
            "invalid --nats-url `nats://app:***@bad host`",
        ),
        ("--status-interval", "1ms", "--status-interval"),
    ];
    for (flag, value, needle) in cases {
        let mut args = env.publisher_args();
        set_arg(&mut args, flag, value);
        let mut publisher = Publisher::start(&args);
        let status = publisher.wait_exit(Duration::from_secs(30)).await;
        let log = publisher.log();
        assert_eq!(status.code(), Some(2), "{flag} {value}: {log}");
        assert_contains(&log, needle);
        assert!(!log.contains("s3cret"), "password in the log: {log}");
    }
}

/// The postmaster's pid, from its data directory.
fn postmaster_pid(env: &TestEnv) -> String {
    let pg = env.embedded_postgres().expect("embedded server");
    let pid_file = pg.socket_dir().join("data").join("postmaster.pid");
    std::fs::read_to_string(&pid_file)
        .expect("postmaster.pid")
        .lines()
        .next()
        .expect("a pid")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_bounds_a_server_that_does_not_answer() {
    let env = TestEnv::start().await;
    if env.embedded_postgres().is_none() {
        eprintln!("skipped: needs an embedded PostgreSQL to freeze");
        return;
    }
    let pid = postmaster_pid(&env);
    let url = format!(
        "{}&connect_timeout=2",
        env.database_url // already has ?sslmode=disable
    );
    // Frozen: the kernel still accepts connections, nobody answers the startup message.
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-cdc"))
        .args(["status", "--database-url", &url])
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start status");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elapsed = started.elapsed();
    signal("-CONT");
    let output = child.wait_with_output().expect("output");
    let text = output_text(&output);
    let status = status.unwrap_or_else(|| panic!("still waiting after 30 s:\n{text}"));
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("no connection within connect_timeout (2s)"),
        "{text}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    // Answering again, the same string connects.
    let output = run_command(&["setup", "--database-url", &url]);
    assert!(output.status.success(), "{}", output_text(&output));
}
