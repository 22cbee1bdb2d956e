//! Switching from a polling relay without a gap: `run --initial-backfill <predicate>` creates the
//! slot with an exported snapshot, publishes the rows the old relay had not sent as of that
//! snapshot, then streams from the slot. Tables shaped like the common polling relays'
//! (a `status` column, a `published_at` timestamp, a `sequence_number` key with a flag), with
//! inserts running throughout the switch, and a row the old relay had sent but not marked: the
//! stream ends with every row once.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::*;

struct Shape {
    name: &'static str,
    /// The table, as the relay's users created it (named `outbox`).
    create: &'static str,
    /// The id column (also the old relay's message id).
    id: &'static str,
    /// What the old relay does to a row it sent.
    mark_sent: &'static str,
    /// The rows it had not sent: `--initial-backfill`.
    unsent: &'static str,
}

const SHAPES: [Shape; 3] = [
    Shape {
        name: "status column",
        create: "CREATE TABLE outbox (
                     id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                     aggregate_type text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL,
                     status text NOT NULL DEFAULT 'pending',
                     created_at timestamptz NOT NULL DEFAULT clock_timestamp())",
        id: "id",
        mark_sent: "status = 'sent'",
        unsent: "status = 'pending'",
    },
    Shape {
        name: "published_at timestamp",
        create: "CREATE TABLE outbox (
                     id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                     aggregate_type text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL,
                     published_at timestamptz,
                     created_at timestamptz NOT NULL DEFAULT clock_timestamp())",
        id: "id",
        mark_sent: "published_at = now()",
        unsent: "published_at IS NULL",
    },
    Shape {
        name: "sequence_number and a flag",
        create: "CREATE TABLE outbox (
                     sequence_number bigserial PRIMARY KEY,
                     aggregate_type text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL,
                     dispatched boolean NOT NULL DEFAULT false)",
        id: "sequence_number",
        mark_sent: "dispatched = true",
        unsent: "NOT dispatched",
    },
];

const INSERT: &str = "INSERT INTO outbox (aggregate_type, event_type, payload)
                      SELECT 'order', 'created', jsonb_build_object('n', g)
                        FROM generate_series(1, $1::int) g";

/// How the switch begins.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Before {
    /// The publication exists; `run --initial-backfill` creates the slot.
    Nothing,
    /// The README's way: `outbox-cdc setup --apply` first (the publication and the slot), then
    /// `run --initial-backfill`.
    SetupApply,
}

async fn switch_from(shape: &Shape, before: Before) {
    let env = TestEnv::start_bare(Default::default()).await;
    let sql = env.sql().await;
    let publication = match before {
        Before::Nothing => {
            "CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert');"
        }
        Before::SetupApply => "",
    };
    sql.batch_execute(&format!("{}; {publication}", shape.create))
        .await
        .expect("create the relay's table");
    env.create_stream().await;
    let js = env.jetstream().await;

    // The old relay sent 210 rows (with their ids as Nats-Msg-Id) and marked 200: it crashed
    // between publishing the last ten and marking them.
    sql.execute(INSERT, &[&300]).await.expect("insert");
    let sent: Vec<String> = sql
        .query(
            &format!(
                "SELECT {id}::text AS sent_id FROM outbox ORDER BY {id} LIMIT 210",
                id = shape.id
            ),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &sent {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        js.publish_with_headers(
            format!("{}.order.created", env.subject_prefix),
            headers,
            "{}".into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }
    sql.execute(
        &format!(
            "UPDATE outbox SET {} WHERE {id} IN (SELECT {id} FROM outbox ORDER BY {id} LIMIT 200)",
            shape.mark_sent,
            id = shape.id
        ),
        &[],
    )
    .await
    .expect("mark sent");

    // The old relay is stopped; the services keep inserting throughout the switch.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, url) = (stop.clone(), written.clone(), env.database_url.clone());
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                client.execute(INSERT, &[&3]).await.expect("insert");
                written.fetch_add(3, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    while written.load(Ordering::Relaxed) < 150 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if before == Before::SetupApply {
        let output = run_command(&["setup", "--database-url", &env.database_url, "--apply"]);
        let text = output_text(&output);
        assert!(output.status.success(), "{text}");
        assert!(
            env.confirmed_flush_lsn("outbox_cdc").await.is_some(),
            "setup --apply created the slot: {text}"
        );
    }
    let publisher = env.publisher(&["--initial-backfill", shape.unsent, "--id-column", shape.id]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(60))
        .await;
    let at_switch = written.load(Ordering::Relaxed);
    while written.load(Ordering::Relaxed) < at_switch + 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");

    let rows: HashSet<String> = sql
        .query(&format!("SELECT {}::text FROM outbox", shape.id), &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream_message_count(&js, &env.stream).await < rows.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "{}: the stream lacks events; log:\n{}",
            shape.name,
            publisher.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    let stream = read_stream(&js, &env.stream).await;
    let ids: Vec<&str> = stream.iter().map(|m| m.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    let duplicated = ids.len() - unique.len();
    let lost = rows
        .iter()
        .filter(|id| !unique.contains(id.as_str()))
        .count();
    let extra = unique.iter().filter(|id| !rows.contains(**id)).count();
    // The old relay's, then the snapshot's unsent rows, then the WAL's in commit order.
    let phase = |m: &Received| match (header(m, "Outbox-Backfill"), header(m, "Outbox-Commit-Lsn"))
    {
        (None, None) => 0,
        (Some(_), _) => 1,
        (None, Some(_)) => 2,
    };
    let commit = |m: &Received| {
        header(m, "Outbox-Commit-Lsn")
            .and_then(|l| l.parse::<outbox_cdc::Lsn>().ok())
            .unwrap_or_default()
    };
    let reordered = stream
        .windows(2)
        .filter(|w| {
            phase(&w[0]) > phase(&w[1]) || (phase(&w[0]) == 2 && commit(&w[0]) > commit(&w[1]))
        })
        .count();
    let backfilled = stream.iter().filter(|m| phase(m) == 1).count();
    println!(
        "MIGRATION {}: rows={} old relay=210 backfilled={backfilled} lost={lost} duplicated={duplicated} extra={extra} reordered={reordered}",
        shape.name,
        rows.len()
    );
    assert_eq!(
        (lost, duplicated, extra, reordered),
        (0, 0, 0, 0),
        "{}; log:\n{}",
        shape.name,
        publisher.log()
    );
    assert!(
        backfilled >= 150 - 10,
        "{backfilled} rows from the snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_from_a_relay_with_a_status_column() {
    switch_from(&SHAPES[0], Before::Nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_from_a_relay_with_a_published_at_timestamp() {
    switch_from(&SHAPES[1], Before::Nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_from_a_relay_with_a_sequence_number_and_a_flag() {
    switch_from(&SHAPES[2], Before::Nothing).await;
}

/// The README's steps in order: `setup --apply` (which creates the slot), then
/// `run --initial-backfill`: the slot never streamed, so it makes way for one created with the
/// snapshot the unsent rows are selected in — every row once, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_steps_setup_apply_then_initial_backfill_publish_every_row_once() {
    switch_from(&SHAPES[0], Before::SetupApply).await;
}

/// A slot events were published from, which the checkpoint does not know of: the rows the flag
/// asks for cannot be selected in its snapshot, and dropping it could lose events. Refused at
/// start (exit 2), naming the slot and the two ways on; nothing streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_backfill_with_a_slot_that_streamed_is_refused_naming_the_ways_on() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let js = env.jetstream().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "w", 10, 10).await;
    wait_for_messages(&js, &env.stream, 10, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    let mut args = env.publisher_args();
    set_arg(&mut args, "--checkpoint-bucket", "another_bucket");
    args.extend(["--initial-backfill", "true"].map(String::from));
    let mut refused = Publisher::start(&args);
    let status = refused.wait_exit(Duration::from_secs(60)).await;
    let log = refused.log();
    assert_eq!(exit_code(status), Some(2), "{log}");
    assert!(
        log.contains("replication slot `outbox_cdc` exists already")
            && log.contains("pg_drop_replication_slot('outbox_cdc')")
            && log.contains("outbox-cdc backfill --where"),
        "{log}"
    );
    assert!(!log.contains("this instance is the leader"), "{log}");
    assert_eq!(stream_message_count(&js, &env.stream).await, 10);
}

/// A switch that ended before its snapshot's rows were all published (the process was killed):
/// its slot never streamed, so the next start with the same flag drops it and begins again;
/// without the flag it stops and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_initial_backfill_begins_again() {
    let env = TestEnv::start_bare(Default::default()).await;
    let sql = env.sql().await;
    sql.batch_execute(&format!(
        "{}; CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert');",
        SHAPES[1].create
    ))
    .await
    .expect("create table");
    sql.execute(INSERT, &[&100]).await.expect("insert");
    env.create_stream().await;
    let js = env.jetstream().await;
    // What a killed switch leaves: its mark in the checkpoint, and the slot it created.
    let (mut checkpoint, _) =
        outbox_cdc::sink::Checkpoint::open(&js, &env.checkpoint_bucket(), "outbox_cdc", 1)
            .await
            .expect("bucket");
    checkpoint
        .save(
            r#"{"lsn":"0/0","system_id":null,"timeline":null,"initial_backfill_pending":true}"#
                .into(),
        )
        .await
        .expect("mark");
    sql.execute(
        "SELECT pg_create_logical_replication_slot('outbox_cdc', 'pgoutput')",
        &[],
    )
    .await
    .expect("slot");
    sql.execute(INSERT, &[&50]).await.expect("insert");

    let mut without = env.publisher(&[]);
    let status = without.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit_code(status), Some(1), "{}", without.log());
    assert!(
        without
            .log()
            .contains("an --initial-backfill did not finish"),
        "{}",
        without.log()
    );

    let publisher = env.publisher(&["--initial-backfill", SHAPES[1].unsent]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(60))
        .await;
    assert!(
        publisher
            .log()
            .contains("dropping its slot, which never streamed")
    );
    sql.execute(INSERT, &[&20]).await.expect("insert");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream_message_count(&js, &env.stream).await < 170 {
        assert!(Instant::now() < deadline, "{}", publisher.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    let stream = read_stream(&js, &env.stream).await;
    let unique: HashSet<&str> = stream.iter().map(|m| m.id.as_str()).collect();
    assert_eq!((stream.len(), unique.len()), (170, 170));
}
