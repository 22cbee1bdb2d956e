//! Operator commands against real servers: `demo`, `setup`, `status`.

mod support;

use std::time::Duration;

use outbox_cdc::embedded::PostgresOptions;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_shows_events_flowing_and_cleans_up() {
    let output =
        tokio::task::spawn_blocking(|| run_command(&["demo", "--rate", "50", "--events", "12"]))
            .await
            .expect("join");
    let text = output_text(&output);
    assert!(output.status.success(), "demo failed:\n{text}");
    let received: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("commit→receive"))
        .collect();
    assert!(received.len() >= 12, "12 events printed:\n{text}");
    assert!(
        received[0].trim_start().starts_with("outbox.order.created"),
        "the first sample event's subject:\n{text}"
    );
    assert!(
        received.iter().all(|l| l.contains(" ms")),
        "every line has a latency:\n{text}"
    );
    assert!(text.contains("12 received"), "{text}");
    // The throwaway servers' directories are gone.
    let data_dir = text
        .lines()
        .find_map(|l| {
            l.split_once("(data in ")
                .map(|(_, rest)| rest.trim_end_matches(')'))
        })
        .unwrap_or_else(|| panic!("the demo names its data directory:\n{text}"));
    assert!(
        !std::path::Path::new(data_dir).exists(),
        "{data_dir} was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_prints_then_applies_idempotently() {
    let env = TestEnv::start_bare(PostgresOptions::default()).await;
    let url = env.database_url.clone();
    let setup = |apply: bool| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["setup", "--database-url", &url];
            if apply {
                args.push("--apply");
            }
            run_command(&args)
        })
    };

    let printed = setup(false).await.expect("join");
    let text = output_text(&printed);
    assert!(printed.status.success(), "{text}");
    assert!(
        text.contains("CREATE TABLE IF NOT EXISTS outbox ("),
        "{text}"
    );
    assert!(
        text.contains("CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert');"),
        "{text}"
    );
    let sql = env.sql().await;
    let version: i32 = sql
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    // From PostgreSQL 17 on, a failover slot: standbys can keep a copy.
    let create_slot = if version >= 170_000 {
        "pg_create_logical_replication_slot('outbox_cdc', 'pgoutput', false, false, true)"
    } else {
        "pg_create_logical_replication_slot('outbox_cdc', 'pgoutput')"
    };
    assert!(text.contains(create_slot), "{text}");
    assert!(text.contains("failover to a standby:"), "{text}");
    let table = sql
        .query_one("SELECT to_regclass('outbox') IS NULL", &[])
        .await
        .unwrap();
    assert!(
        table.get::<_, bool>(0),
        "without --apply nothing is created"
    );

    let applied = setup(true).await.expect("join");
    assert!(applied.status.success(), "{}", output_text(&applied));
    let created = sql
        .query_one(
            "SELECT to_regclass('outbox') IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_pub' AND pubinsert AND NOT pubupdate),
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'outbox_cdc' AND plugin = 'pgoutput')",
            &[],
        )
        .await
        .unwrap();
    assert!(created.get::<_, bool>(0) && created.get::<_, bool>(1) && created.get::<_, bool>(2));
    if version >= 170_000 {
        let failover: bool = sql
            .query_one(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = 'outbox_cdc'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(failover, "the slot is a failover slot");
    }

    let again = setup(true).await.expect("join");
    let text = output_text(&again);
    assert!(again.status.success(), "{text}");
    assert!(text.contains("nothing to create"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_explains_a_server_without_logical_wal() {
    let env = TestEnv::start_bare(PostgresOptions {
        wal_level: "replica",
        ..Default::default()
    })
    .await;
    let url = env.database_url.clone();
    let output = tokio::task::spawn_blocking(move || {
        run_command(&["setup", "--database-url", &url, "--apply"])
    })
    .await
    .expect("join");
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("ALTER SYSTEM SET wal_level = logical"),
        "{text}"
    );
    assert!(text.contains("not creating the slot"), "{text}");
    assert!(
        text.contains("create the outbox table"),
        "the table is still created:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_slot_and_fails_when_it_is_missing() {
    let env = TestEnv::start().await;
    let (url, nats) = (env.database_url.clone(), env.nats_url.clone());
    let status = move |slot: &'static str| {
        let (url, nats) = (url.clone(), nats.clone());
        tokio::task::spawn_blocking(move || {
            run_command(&[
                "status",
                "--database-url",
                &url,
                "--nats-url",
                &nats,
                "--slot",
                slot,
                "--json",
            ])
        })
    };

    let missing = status("outbox_cdc").await.expect("join");
    let text = output_text(&missing);
    assert_eq!(missing.status.code(), Some(1), "{text}");
    assert!(
        text.contains("replication slot `outbox_cdc` does not exist"),
        "{text}"
    );

    env.create_stream().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "w", 5, 5).await;
    wait_for_messages(
        &env.jetstream().await,
        &env.stream,
        5,
        Duration::from_secs(30),
        || publisher.log(),
    )
    .await;

    let shown = status("outbox_cdc").await.expect("join");
    assert!(shown.status.success(), "{}", output_text(&shown));
    let json: serde_json::Value =
        serde_json::from_slice(&shown.stdout).expect("status --json is JSON");
    assert_eq!(json["slot"], "outbox_cdc");
    assert_eq!(json["plugin"], "pgoutput");
    assert_eq!(json["active"], true);
    assert!(json["active_pid"].as_i64().is_some(), "{json}");
    assert!(json["lag_bytes"].as_u64().is_some(), "{json}");
    assert!(
        json["confirmed_flush_lsn"]
            .as_str()
            .is_some_and(|l| l.contains('/')),
        "{json}"
    );
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
}
