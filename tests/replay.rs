//! Replay from a saved LSN: the replay window keeps WAL, the checkpoint stops an ordinary restart
//! from replaying it, `--start-lsn` re-publishes after a downstream loss, and a position the
//! slot can no longer serve is refused with the oldest one it can.

mod support;

use std::time::Duration;

use outbox_cdc::lsn::Lsn;
use outbox_cdc::pipeline::ProgressRecord;
use support::*;

const SLOT: &str = "outbox_cdc";

async fn checkpoint(env: &TestEnv, bucket: &str) -> Option<Lsn> {
    let kv = env
        .jetstream()
        .await
        .get_key_value(bucket)
        .await
        .expect("checkpoint bucket exists");
    kv.get(SLOT)
        .await
        .expect("read checkpoint")
        .map(|v| ProgressRecord::decode(&v).expect("a progress record").lsn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_window_checkpoint_and_start_lsn_republish_after_a_downstream_loss() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let js = env.jetstream().await;
    let oracle = env.oracle().await;
    let bucket = env.checkpoint_bucket();
    let replay = ["--replay-window", "10m"];

    let mut publisher = env.publisher(&replay);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let slot_at_start = env.confirmed_flush_lsn(SLOT).await.expect("slot");
    let client = env.sql().await;
    write_events(&client, "first", 200, 10).await;
    wait_for_messages(&js, &env.stream, 200, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let first = oracle.rows(&env).await;
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());

    // The window held the slot back, and the checkpoint records what was published.
    let slot = env.confirmed_flush_lsn(SLOT).await.expect("slot");
    assert!(
        slot < first[0].commit_end,
        "the slot moved to {slot:X} inside the replay window (start {slot_at_start:X})"
    );
    let saved = checkpoint(&env, &bucket).await.expect("a checkpoint");
    assert_eq!(saved.as_u64(), first.last().expect("rows").commit_end);

    // `status` shows both positions.
    let status_args = [
        "status".to_owned(),
        "--json".into(),
        "--database-url".into(),
        env.database_url.clone(),
        "--nats-url".into(),
        env.nats_url.clone(),
        "--checkpoint-bucket".into(),
        bucket.clone(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        run_command(&status_args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .expect("join");
    let text = output_text(&output);
    assert!(output.status.success(), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status JSON");
    assert_eq!(json["checkpoint_lsn"], saved.to_string(), "{text}");
    assert_eq!(
        json["confirmed_flush_lsn"],
        Lsn::new(slot).to_string(),
        "{text}"
    );

    // An ordinary restart resumes after the checkpoint: the window is read, not re-sent.
    let publisher = env.publisher(&replay);
    write_events(&client, "second", 100, 10).await;
    wait_for_messages(&js, &env.stream, 300, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let text = wait_for_metric(&publisher, "outbox_cdc_events_published_total", 100.0).await;
    assert_eq!(
        metric(&text, "outbox_cdc_events_duplicate_total"),
        Some(0.0),
        "the restart re-sent events already published:\n{text}"
    );
    assert_eq!(
        metric(
            &text,
            "outbox_cdc_rows_skipped_total{reason=\"before_start_lsn\"}"
        ),
        Some(200.0),
        "{text}"
    );
    drop(publisher);

    // Downstream loss: the stream is deleted and recreated empty. Re-publish from the 11th
    // transaction of the first batch: its predecessor's end LSN is where the operator restarts.
    js.delete_stream(&env.stream).await.expect("delete stream");
    env.create_stream().await;
    let all = oracle.rows(&env).await;
    assert_eq!(all.len(), 300);
    let start = Lsn::new(all[99].commit_end).to_string();
    let publisher = env.publisher(&[&replay[..], &["--start-lsn", &start]].concat());
    wait_for_messages(&js, &env.stream, 200, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let text = wait_for_metric(&publisher, "outbox_cdc_events_published_total", 200.0).await;
    assert_eq!(
        metric(
            &text,
            "outbox_cdc_rows_skipped_total{reason=\"before_start_lsn\"}"
        ),
        Some(100.0),
        "{text}"
    );
    drop(publisher);
    let stream = read_stream(&js, &env.stream).await;
    assert_exactly_once_in_order(&stream, &all[100..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_lsn_the_slot_no_longer_serves_is_refused_naming_the_oldest() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let js = env.jetstream().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "w", 50, 10).await;
    wait_for_messages(&js, &env.stream, 50, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());
    let oldest = Lsn::new(env.confirmed_flush_lsn(SLOT).await.expect("slot"));

    let mut publisher = env.publisher(&["--start-lsn", "0/1"]);
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "--start-lsn 0/1 is older than the oldest position replication slot `{SLOT}` can still serve, {oldest}"
        )),
        "{log}"
    );
    assert_eq!(stream_message_count(&js, &env.stream).await, 50);
}
