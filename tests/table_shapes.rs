//! Existing outbox tables come in many shapes: the mapping flags cover a subject column, a
//! headers column named `metadata`, a `bytea` payload, a `bigserial` id, `--subject-map`, and a
//! partitioned outbox published through its root.

mod support;

use std::time::Duration;

use async_nats::jetstream::stream;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_column_metadata_headers_bytea_payload_bigserial_id_and_a_subject_map() {
    let env = TestEnv::start().await;
    let p = &env.subject_prefix;
    env.sql()
        .await
        .batch_execute(
            "CREATE TABLE app_events (
                 event_id   bigserial PRIMARY KEY,
                 topic      text,
                 metadata   jsonb,
                 body       bytea NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now());
             CREATE PUBLICATION app_pub FOR TABLE app_events WITH (publish = 'insert');",
        )
        .await
        .expect("create table");
    env.create_stream().await;

    let mut args = env.publisher_args();
    let at = args
        .iter()
        .position(|a| a == "--subject-template")
        .expect("harness sets a template");
    args.drain(at..at + 2);
    let map = format!("{p}.orders.*={p}.prod.orders.*");
    args.extend(
        [
            "--publication",
            "app_pub",
            "--id-column",
            "event_id",
            "--subject-column",
            "topic",
            "--headers-column",
            "metadata",
            "--payload-column",
            "body",
            "--subject-map",
            &map,
        ]
        .map(String::from),
    );
    let publisher = Publisher::start(&args);
    // The slot exists once the publisher leads; rows written before it would not be streamed.
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    env.sql()
        .await
        .execute(
            "INSERT INTO app_events (topic, metadata, body) VALUES
                 ($1 || '.orders.created', '{\"trace-id\": \"abc\", \"attempt\": 1}', '\\x00ff10'),
                 ($1 || '.billing.paid', NULL, convert_to('hello', 'UTF8'))",
            &[p],
        )
        .await
        .expect("insert");
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 2, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    let messages = read_stream(&js, &env.stream).await;

    let first = &messages[0];
    assert_eq!(first.subject, format!("{p}.prod.orders.created"), "mapped");
    assert_eq!(first.id, "1", "the bigserial id");
    assert_eq!(
        first.payload.as_ref(),
        [0x00, 0xff, 0x10],
        "bytea as raw bytes"
    );
    assert_eq!(header(first, "trace-id"), Some("abc"));
    assert_eq!(header(first, "attempt"), Some("1"));
    assert_eq!(header(first, "Outbox-Table"), Some("public.app_events"));

    let second = &messages[1];
    assert_eq!(
        second.subject,
        format!("{p}.billing.paid"),
        "no rule matches"
    );
    assert_eq!(second.id, "2");
    assert_eq!(second.payload.as_ref(), b"hello");
    assert_eq!(header(second, "trace-id"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monthly_partitioned_outbox_streams_through_its_root_in_commit_order() {
    let env = TestEnv::start_bare(Default::default()).await;
    env.sql()
        .await
        .batch_execute(
            "CREATE TABLE outbox (
                 id             bigserial,
                 aggregate_type text NOT NULL,
                 aggregate_id   text NOT NULL,
                 event_type     text NOT NULL,
                 payload        jsonb NOT NULL,
                 headers        jsonb,
                 created_at     timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (id, created_at)
             ) PARTITION BY RANGE (created_at);
             CREATE TABLE outbox_2026_10 PARTITION OF outbox
                 FOR VALUES FROM ('2026-10-01') TO ('2026-11-01');
             CREATE TABLE outbox_2026_11 PARTITION OF outbox
                 FOR VALUES FROM ('2026-11-01') TO ('2026-12-01');
             CREATE TABLE outbox_2026_12 PARTITION OF outbox
                 FOR VALUES FROM ('2026-12-01') TO ('2027-01-01');
             CREATE PUBLICATION outbox_pub FOR TABLE outbox
                 WITH (publish = 'insert', publish_via_partition_root = true);",
        )
        .await
        .expect("create partitioned outbox");
    env.create_stream().await;
    let publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let client = env.sql().await;
    // Alternate partitions, one row per transaction: commit order crosses partitions.
    let months = ["2026-10-15", "2026-12-15", "2026-11-15"];
    for i in 0..30 {
        client
            .execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
                 VALUES ('order', $1, 'created', '{}', $2::text::timestamptz)",
                &[&i.to_string(), &months[i % 3]],
            )
            .await
            .expect("insert");
    }
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 30, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    let messages = read_stream(&js, &env.stream).await;
    let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
    let expected: Vec<String> = (1..=30).map(|i| i.to_string()).collect();
    assert_eq!(ids, expected, "commit order across partitions");
    assert!(
        messages
            .iter()
            .all(|m| header(m, "Outbox-Table") == Some("public.outbox")),
        "rows are published as the root table's"
    );
    let info = js
        .get_stream(&env.stream)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(info.config.retention, stream::RetentionPolicy::Limits);
}
