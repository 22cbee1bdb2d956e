//! `outbox-cdc backfill`: after a dropped slot, the rows the stream lacks are re-published from
//! the table with the same mapping, none twice, and `run --accept-gap` goes on: the stream ends
//! with every row of the table once.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;

fn command(env: &TestEnv, sub: &str, extra: &[&str]) -> (bool, String) {
    let mut args: Vec<String> = vec![sub.into()];
    args.extend(env.backfill_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let output = run_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (output.status.success(), output_text(&output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_after_a_dropped_slot_brings_the_stream_to_the_table() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let js = env.jetstream().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sql = env.sql().await;
    write_events(&sql, "published", 1000, 10).await;
    wait_for_messages(&js, &env.stream, 1000, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    write_events(&sql, "waiting", 500, 10).await;
    sql.execute("SELECT pg_drop_replication_slot('outbox_cdc')", &[])
        .await
        .expect("drop slot");
    let mut stopped = env.publisher(&[]);
    let status = stopped.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit_code(status), Some(1), "{}", stopped.log());
    assert!(stopped.log().contains("backfill --since-stream-end"));

    // What it would do, then do it.
    let (ok, dry) = tokio::task::spawn_blocking({
        let env_args = (env.backfill_args(), env.database_url.clone());
        move || {
            let mut args: Vec<String> = vec!["backfill".into()];
            args.extend(env_args.0);
            args.extend(["--since-stream-end", "--dry-run"].map(String::from));
            let output = run_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
            (output.status.success(), output_text(&output))
        }
    })
    .await
    .expect("join");
    assert!(ok, "{dry}");
    assert!(
        dry.contains("backfill public.outbox: 1500 rows where"),
        "{dry}"
    );
    assert!(dry.contains("ordered by created_at, id"), "{dry}");
    assert!(dry.contains("nothing published (--dry-run)"), "{dry}");
    assert_eq!(stream_message_count(&js, &env.stream).await, 1000);

    let (ok, text) = command(&env, "backfill", &["--since-stream-end"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("published 500, already in the stream 1000, dead-lettered 0"),
        "{text}"
    );
    // Again: everything is there now.
    let (ok, text) = command(&env, "backfill", &["--since-stream-end"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("published 0, already in the stream"),
        "{text}"
    );

    // Back to streaming, past the gap the backfill closed.
    let mut publisher = env.publisher(&["--accept-gap"]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&sql, "after", 100, 10).await;
    wait_for_messages(&js, &env.stream, 1600, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());

    let rows: HashSet<String> = sql
        .query("SELECT id::text FROM outbox", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stream = read_stream(&js, &env.stream).await;
    let ids: Vec<&str> = stream.iter().map(|m| m.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "the stream holds duplicates");
    assert_eq!(ids.len(), rows.len(), "0 lost, nothing extra");
    assert!(rows.iter().all(|id| unique.contains(id.as_str())));
    let backfilled: Vec<&Received> = stream
        .iter()
        .filter(|m| header(m, "Outbox-Backfill") == Some("true"))
        .collect();
    assert_eq!(backfilled.len(), 500);
    assert!(
        backfilled
            .iter()
            .all(|m| header(m, "Outbox-Commit-Lsn").is_none()
                && header(m, "Outbox-Table") == Some("public.outbox")),
        "{:?}",
        backfilled[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_where_selects_rows_and_names_bad_flags() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    write_events(&env.sql().await, "w", 30, 10).await;
    let (ok, text) = command(
        &env,
        "backfill",
        &[
            "--where",
            "aggregate_id LIKE 'w-1%'",
            "--order-by",
            "aggregate_id",
        ],
    );
    assert!(ok, "{text}");
    // w-1, w-10 (three transactions of ten rows: w-1 … w-10 each).
    assert!(
        text.contains("published 6, already in the stream 0"),
        "{text}"
    );
    let (ok, text) = command(&env, "backfill", &["--where", "true", "--order-by", "nope"]);
    assert!(!ok);
    assert!(text.contains("no column `nope`"), "{text}");
    let (ok, text) = command(&env, "backfill", &[]);
    assert!(!ok);
    assert!(
        text.contains("required arguments were not provided"),
        "{text}"
    );
}
