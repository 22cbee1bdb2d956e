//! The consumer's contract (docs/messages.md), kept by the example consumer in Python
//! (`examples/consumer.py`, nats-py) against a stream outbox-cdc filled — including the events
//! it sends again: a replay JetStream de-duplicates (acked, not stored), the same replay after the
//! duplicate window (stored twice), a backfill after a lost slot, and a dead letter. The
//! consumer handles every committed row exactly once, in commit order, whether it reads with a
//! durable consumer and acks or with an ordered consumer from its own stored sequence.
//!
//! The Python environment: `OUTBOX_CDC_PYTHON` names an interpreter with nats-py; otherwise a
//! virtualenv with `examples/requirements.txt` is made once under the target directory (PyPI).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::stream;
use outbox_cdc::lsn::Lsn;
use support::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An interpreter with the example's requirements installed.
fn python() -> PathBuf {
    python_venv(&root().join("examples/requirements.txt"), "consumer-venv")
}

/// What one run of the example consumer reported.
#[derive(Debug, Default)]
struct Consumed {
    /// Ids handled, in the order handled.
    handled: Vec<String>,
    duplicates: usize,
    backfilled: usize,
    dead_letters: usize,
    summary: serde_json::Value,
}

async fn consume(env: &TestEnv, mode: &[&str], store: &Path) -> Consumed {
    let mut command = Command::new(python());
    command
        .arg(root().join("examples/consumer.py"))
        .args(["--nats-url", &env.nats_url, "--stream", &env.stream])
        .args(["--subject", &format!("{}.>", env.subject_prefix)])
        .args(mode)
        .arg("--store")
        .arg(store);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run the example consumer");
    let text = output_text(&output);
    assert!(output.status.success(), "consumer.py {mode:?}: {text}");
    let mut consumed = Consumed::default();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if !json["summary"].is_null() {
            consumed.summary = json["summary"].clone();
            continue;
        }
        assert_eq!(json["in_order"], true, "{line}");
        match json["action"].as_str() {
            Some("handled") => {
                consumed
                    .handled
                    .push(json["id"].as_str().expect("an id").to_owned());
                consumed.backfilled += usize::from(json["backfill"] == true);
                consumed.dead_letters += usize::from(json["error_kind"].is_string());
            }
            Some("duplicate") => consumed.duplicates += 1,
            other => panic!("{other:?}: {line}"),
        }
    }
    assert!(consumed.summary.is_object(), "no summary: {text}");
    assert!(consumed.summary["out_of_order"].is_null(), "{text}");
    consumed
}

async fn set_duplicate_window(env: &TestEnv, window: Duration) {
    let js = env.jetstream().await;
    let stream = js.get_stream(&env.stream).await.expect("get stream");
    let mut config = stream.cached_info().config.clone();
    config.duplicate_window = window;
    js.update_stream(&config).await.expect("update stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_consumer_handles_every_row_once_in_order_through_resends() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    js.create_stream(stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.subject_prefix)],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .expect("create stream");
    let sql = env.sql().await;
    let store = tempfile::tempdir().expect("tempdir");
    let durable_store = store.path().join("durable.db");
    let durable = ["--durable", "billing"];
    let replay = ["--replay-window", "10m"];

    // 100 events in transactions of 10; the durable consumer handles them.
    let mut publisher = env.publisher(&replay);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    // Where the slot starts: replays begin there.
    let start = Lsn::new(env.confirmed_flush_lsn("outbox_cdc").await.expect("slot")).to_string();
    write_events(&sql, "first", 100, 10).await;
    wait_for_messages(&js, &env.stream, 100, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    let first = consume(&env, &durable, &durable_store).await;
    assert_eq!(first.handled.len(), 100, "{:?}", first.summary);

    // Sent again within the duplicate window (a replay without fencing): JetStream acks them
    // as duplicates and stores nothing.
    let resend: Vec<&str> = [&replay[..], &["--no-fencing", "--start-lsn", &start]].concat();
    let mut publisher = env.publisher(&resend);
    let text = wait_for_metric(&publisher, "outbox_cdc_events_duplicate_total", 100.0).await;
    assert_eq!(
        metric(&text, "outbox_cdc_events_published_total"),
        Some(0.0)
    );
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    assert_eq!(stream_message_count(&js, &env.stream).await, 100);

    // Sent again after the window: the stream holds each of them twice.
    set_duplicate_window(&env, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut publisher = env.publisher(&resend);
    wait_for_metric(&publisher, "outbox_cdc_events_published_total", 100.0).await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    assert_eq!(stream_message_count(&js, &env.stream).await, 200);
    set_duplicate_window(&env, Duration::from_secs(600)).await;

    // A lost slot: 30 rows re-published by `backfill`, then 20 live rows and one poison row,
    // dead-lettered in its place.
    write_events(&sql, "gap", 30, 10).await;
    sql.execute("SELECT pg_drop_replication_slot('outbox_cdc')", &[])
        .await
        .expect("drop slot");
    let mut stopped = env.publisher(&[]);
    let status = stopped.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit_code(status), Some(1), "{}", stopped.log());
    let mut args = vec!["backfill".to_owned()];
    args.extend(env.backfill_args());
    args.push("--since-stream-end".into());
    let output = tokio::task::spawn_blocking(move || {
        run_command(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .expect("join");
    let text = output_text(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("published 30,"), "{text}");
    let dead_subject = format!("{}.dead", env.subject_prefix);
    let mut publisher = env.publisher(&[
        "--accept-gap",
        "--on-error",
        "dead-letter",
        "--dead-letter-subject",
        &dead_subject,
    ]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&sql, "live", 10, 5).await;
    let poison: String = sql
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('bad type', 'x', 'created', '{}') RETURNING id::text",
            &[],
        )
        .await
        .expect("insert a poison row")
        .get(0);
    write_events(&sql, "live2", 10, 5).await;
    wait_for_messages(&js, &env.stream, 251, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());

    // The durable consumer resumes after what it acked: the second copies are skipped.
    let second = consume(&env, &durable, &durable_store).await;
    assert_eq!(second.duplicates, 100, "{:?}", second.summary);
    assert_eq!(second.backfilled, 30, "{:?}", second.summary);
    assert_eq!(second.dead_letters, 1, "{:?}", second.summary);
    assert_eq!(second.handled.len(), 51, "{:?}", second.summary);

    // Exactly once: every committed row, its dead letter for the poison row.
    let mut rows: HashSet<String> = sql
        .query("SELECT id::text FROM outbox", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(rows.remove(&poison));
    rows.insert(format!("dead-letter:{poison}"));
    let handled: Vec<String> = [first.handled.clone(), second.handled.clone()].concat();
    let mut times: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &handled {
        *times.entry(id.as_str()).or_default() += 1;
    }
    assert!(
        times.values().all(|&n| n == 1),
        "handled twice: {:?}",
        times.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    let handled_set: HashSet<String> = handled.iter().cloned().collect();
    assert_eq!(
        handled_set, rows,
        "the handled events are the committed rows"
    );

    // An ordered consumer from the start, resuming from its own store, sees the same.
    let ordered = consume(&env, &["--ordered"], &store.path().join("ordered.db")).await;
    assert_eq!(ordered.handled, handled);
    assert_eq!(ordered.duplicates, 100);
    // Run again, it resumes after the stream sequence it stored: nothing new.
    let again = consume(&env, &["--ordered"], &store.path().join("ordered.db")).await;
    assert!(
        again.handled.is_empty() && again.duplicates == 0,
        "{:?}",
        again.summary
    );
}
