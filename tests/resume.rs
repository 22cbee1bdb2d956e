//! Exactly once without leaning on JetStream's duplicate window: a restart resumes after what
//! each stream holds (its last event's commit LSN and row index), so restarts slower than the
//! window store nothing twice; and event ids cannot collide between the tables of one
//! publication.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream;
use support::faults::{Chaos, Sampler, Workload, stored_after_clean_stop, verdict};
use support::*;

const SLOT: &str = "outbox_cdc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_three_times_with_restarts_slower_than_a_3s_duplicate_window() {
    let total: u64 = env_or("OUTBOX_CDC_RESUME_EVENTS", 60_000);
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    js.create_stream(stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.subject_prefix)],
        duplicate_window: Duration::from_secs(3),
        ..Default::default()
    })
    .await
    .expect("create stream");
    let oracle = env.oracle().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sampler = Sampler::start(&env, SLOT);
    let writers = Workload::start(&env, "w", 2, total, 20, Duration::from_millis(2));
    let mut chaos = Chaos::new();
    let mut already_stored = 0.0;
    for round in 0..3 {
        writers.wait_written(total * (round + 1) / 5).await;
        tokio::time::sleep(chaos.between(Duration::ZERO, Duration::from_millis(500))).await;
        publisher.kill9();
        // Longer than the duplicate window: JetStream forgets the ids of what was in flight.
        tokio::time::sleep(Duration::from_secs(6)).await;
        publisher = env.publisher(&[]);
        publisher
            .wait_for_log("this instance is the leader", Duration::from_secs(60))
            .await;
        let text = metrics_of(&publisher).await;
        already_stored += metric(&text, "outbox_cdc_events_already_stored_total").unwrap_or(0.0);
    }
    writers.finish(false).await;
    let committed = oracle.rows(&env).await;
    let (stream, text) = stored_after_clean_stop(&env, &mut publisher, committed.len()).await;
    already_stored += metric(&text, "outbox_cdc_events_already_stored_total").unwrap_or(0.0);
    let samples = sampler.finish().await;
    println!("RESUME events read again and not re-sent: {already_stored}");
    verdict(
        "kill -9 x3, restarted after 6s, 3s duplicate window",
        3,
        &[],
        &stream,
        &committed,
        &samples,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_with_the_same_ids_in_one_publication_collide_in_nothing() {
    let env = TestEnv::start_bare(Default::default()).await;
    let sql = env.sql().await;
    sql.batch_execute(
        "CREATE TABLE orders_outbox (
             id bigserial PRIMARY KEY, aggregate_type text NOT NULL, aggregate_id text NOT NULL,
             event_type text NOT NULL, payload jsonb NOT NULL, headers jsonb);
         CREATE TABLE billing_outbox (LIKE orders_outbox INCLUDING ALL);
         CREATE SEQUENCE billing_ids OWNED BY billing_outbox.id;
         ALTER TABLE billing_outbox ALTER COLUMN id SET DEFAULT nextval('billing_ids');
         CREATE PUBLICATION outbox_pub FOR TABLE orders_outbox, billing_outbox
             WITH (publish = 'insert');",
    )
    .await
    .expect("create tables");
    env.create_stream().await;
    let js = env.jetstream().await;
    let publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    for table in ["orders_outbox", "billing_outbox"] {
        sql.execute(
            &format!(
                "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
                 SELECT 'order', g::text, 'created', '{{}}' FROM generate_series(1, 500) g"
            ),
            &[],
        )
        .await
        .expect("insert");
    }
    let ids: Vec<i64> = sql
        .query(
            "SELECT id FROM orders_outbox INTERSECT SELECT id FROM billing_outbox",
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 500, "the tables' ids are the same");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream_message_count(&js, &env.stream).await < 1000 {
        assert!(Instant::now() < deadline, "{}", publisher.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    let text = metrics_of(&publisher).await;
    assert_eq!(
        metric(&text, "outbox_cdc_events_duplicate_total"),
        Some(0.0),
        "no event was taken for another's duplicate:\n{text}"
    );
    let stream = read_stream(&js, &env.stream).await;
    let unique: HashSet<&str> = stream.iter().map(|m| m.id.as_str()).collect();
    assert_eq!((stream.len(), unique.len()), (1000, 1000));
    for message in &stream {
        let table = header(message, "Outbox-Table").expect("table");
        assert!(message.id.starts_with(&format!("{table}:")), "{message:?}");
    }
    assert!(
        publisher
            .log()
            .contains("event ids (Nats-Msg-Id) are `schema.table:<id>`"),
        "{}",
        publisher.log()
    );
}

/// A backfill's messages carry no WAL position. When they end a stream, a restart resumes after
/// the newest event before them that has one — not on the duplicate window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_at_the_stream_end_does_not_hide_the_resume_point() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    js.create_stream(stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.subject_prefix)],
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .expect("create stream");
    let sql = env.sql().await;
    // Rows from before the slot: only a backfill publishes them.
    write_events(&sql, "old", 5, 5).await;
    // PostgreSQL and the checkpoint hear nothing before the kill: the restart reads it all again.
    let mut args = env.publisher_args();
    set_arg(&mut args, "--status-interval", "10min");
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&sql, "live", 50, 5).await;
    wait_for_messages(&js, &env.stream, 50, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    publisher.kill9();
    let confirmed: String = sql
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .expect("slot")
        .get(0);
    let stream = read_stream(&js, &env.stream).await;
    let last_lsn = header(&stream[49], "Outbox-Commit-Lsn").expect("a live event's LSN");
    let lsn = |text: &str| text.parse::<outbox_cdc::lsn::Lsn>().expect("an LSN");
    assert!(
        lsn(&confirmed) < lsn(last_lsn),
        "the slot must still hold the published events (confirmed {confirmed}, last {last_lsn})"
    );

    let mut backfill = vec!["backfill".to_owned()];
    backfill.extend(env.backfill_args());
    backfill.extend(["--where", "aggregate_id LIKE 'old-%'"].map(String::from));
    let output = run_command(&backfill.iter().map(String::as_str).collect::<Vec<_>>());
    let text = output_text(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("published 5,"), "{text}");
    // Longer than the duplicate window: JetStream has forgotten the live events' ids.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&sql, "after", 1, 1).await;
    wait_for_messages(&js, &env.stream, 56, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let text = wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    assert_eq!(
        metric(&text, "outbox_cdc_events_already_stored_total"),
        Some(50.0),
        "{text}"
    );
    let stream = read_stream(&js, &env.stream).await;
    let ids: HashSet<&str> = stream.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(stream.len(), 56, "the live events were stored again");
    assert_eq!(ids.len(), 56);
}
