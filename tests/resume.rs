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
