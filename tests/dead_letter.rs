//! Poison rows: with `--on-error dead-letter` they go to the dead-letter subject with headers
//! saying why, and the pipeline goes on; with `fail` the process stops, and a restart meets the
//! same row again.

mod support;

use std::time::Duration;

use async_nats::jetstream::stream;
use support::*;

/// A stream capturing `<prefix>.order.>` and the dead-letter subject only, so `invoice`
/// events have no stream.
async fn narrow_stream(env: &TestEnv) -> String {
    let dead = format!("{}.dead", env.subject_prefix);
    env.jetstream()
        .await
        .create_stream(stream::Config {
            name: env.stream.clone(),
            subjects: vec![format!("{}.order.>", env.subject_prefix), dead.clone()],
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .expect("create stream");
    dead
}

/// One outbox row, as an INSERT statement.
fn row(aggregate_type: &str, id: &str, payload: &str, headers: &str) -> String {
    format!(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers)
         VALUES ('{id}', '{aggregate_type}', 'a', 'created', {payload}, {headers});"
    )
}

async fn insert(env: &TestEnv, aggregate_type: &str, id: &str, payload: &str, headers: &str) {
    env.sql()
        .await
        .batch_execute(&row(aggregate_type, id, payload, headers))
        .await
        .expect("insert");
}

const GOOD_1: &str = "00000000-0000-0000-0000-000000000001";
const UNMAPPABLE: &str = "00000000-0000-0000-0000-000000000002";
const TOO_LARGE: &str = "00000000-0000-0000-0000-000000000003";
const NO_STREAM: &str = "00000000-0000-0000-0000-000000000004";
const GOOD_2: &str = "00000000-0000-0000-0000-000000000005";
const REJECTED: &str = "00000000-0000-0000-0000-000000000006";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_go_to_the_dead_letter_subject_and_the_pipeline_goes_on() {
    let env = TestEnv::start().await;
    // Updates and deletes too, so that the metrics show whether a transaction read again by
    // the session that follows a refusal is counted again.
    env.sql()
        .await
        .batch_execute("ALTER PUBLICATION outbox_pub SET (publish = 'insert, update, delete');")
        .await
        .expect("alter publication");
    let dead = narrow_stream(&env).await;
    let publisher = env.publisher(&["--on-error", "dead-letter", "--dead-letter-subject", &dead]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    insert(&env, "order", GOOD_1, "'{\"n\":1}'", "NULL").await;
    insert(&env, "order", UNMAPPABLE, "'{\"n\":2}'", "'[1, 2]'").await;
    insert(
        &env,
        "order",
        TOO_LARGE,
        "jsonb_build_object('big', repeat('x', 1100000))",
        "NULL",
    )
    .await;
    // One transaction, so that the rows after REJECTED go out before its ack says that
    // JetStream refused it (headers over 64 KiB), and the update and delete are read (before
    // NO_STREAM, which waits for every ack) by the session that the refusal ends.
    let rows = [
        row(
            "order",
            REJECTED,
            "'{\"n\":6}'",
            "jsonb_build_object('x-big', repeat('v', 70000))",
        ),
        format!("UPDATE outbox SET event_type = 'updated' WHERE id = '{GOOD_1}';"),
        format!("DELETE FROM outbox WHERE id = '{UNMAPPABLE}';"),
        row("invoice", NO_STREAM, "'{\"n\":4}'", "NULL"),
        row("order", GOOD_2, "'{\"n\":5}'", "NULL"),
    ];
    env.sql()
        .await
        .batch_execute(&format!("BEGIN; {} COMMIT;", rows.concat()))
        .await
        .expect("insert");

    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 6, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    let messages = read_stream(&js, &env.stream).await;
    let by_event = |id: &str| {
        messages
            .iter()
            .position(|m| m.id == id || header(m, "Outbox-Event-Id") == Some(id))
            .unwrap_or_else(|| panic!("{id} is in neither place: {messages:#?}"))
    };
    // Every dead letter in its row's place, also those only an ack could tell: the message
    // JetStream refused (the publishes after it were fenced on it and refused too, and the
    // session restarted to put the dead letter in its place), and the subject no stream
    // captures (nothing is fenced on it, so nothing went out after it before its ack).
    let order = [GOOD_1, UNMAPPABLE, TOO_LARGE, REJECTED, NO_STREAM, GOOD_2].map(by_event);
    assert!(order.is_sorted(), "commit order: {order:?}");
    assert_eq!(messages.len(), 6, "each once: {messages:#?}");

    for (id, kind, original, body) in [
        (UNMAPPABLE, "unmappable", true, Some(&b"{\"n\": 2}"[..])),
        (TOO_LARGE, "too_large", true, Some(&b""[..])),
        (NO_STREAM, "no_stream", true, Some(&b"{\"n\": 4}"[..])),
        (REJECTED, "rejected", true, Some(&b"{\"n\": 6}"[..])),
    ] {
        let m = &messages[by_event(id)];
        assert_eq!(m.subject, dead, "{m:#?}");
        assert_eq!(m.id, format!("dead-letter:{id}"));
        assert_eq!(header(m, "Outbox-Error-Kind"), Some(kind), "{m:#?}");
        assert!(header(m, "Outbox-Error").is_some_and(|e| !e.is_empty()));
        assert_eq!(header(m, "Outbox-Table"), Some("public.outbox"));
        assert!(header(m, "Outbox-Commit-Lsn").is_some_and(|l| l.contains('/')));
        assert_eq!(
            header(m, "Outbox-Original-Subject").is_some(),
            original,
            "{m:#?}"
        );
        if let Some(body) = body {
            assert_eq!(m.payload.as_ref(), body, "{kind}");
        }
    }
    assert!(
        header(&messages[by_event(NO_STREAM)], "Outbox-Original-Subject")
            .is_some_and(|s| s.ends_with(".invoice.created"))
    );

    let text = wait_for_metric(
        &publisher,
        "outbox_cdc_poison_rows_total{kind=\"no_stream\",action=\"dead_letter\"}",
        1.0,
    )
    .await;
    for kind in ["unmappable", "too_large", "rejected"] {
        let name =
            format!("outbox_cdc_poison_rows_total{{kind=\"{kind}\",action=\"dead_letter\"}}");
        assert_eq!(metric(&text, &name), Some(1.0), "{text}");
    }
    // The refusal restarted the session, which read the last transaction again: counted once.
    let text = wait_for_metric(&publisher, "outbox_cdc_transactions_total", 4.0).await;
    for reason in ["update", "delete"] {
        let name = format!("outbox_cdc_rows_skipped_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&text, &name), Some(1.0), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fail_a_poison_row_stops_the_process_and_a_restart_meets_it_again() {
    let env = TestEnv::start().await;
    narrow_stream(&env).await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    insert(&env, "order", GOOD_1, "'{\"n\":1}'", "NULL").await;
    insert(&env, "invoice", NO_STREAM, "'{\"n\":4}'", "NULL").await;
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(log.contains(NO_STREAM), "names the event: {log}");
    assert!(log.contains(".invoice.created"), "names the subject: {log}");
    // Nothing read /metrics: it exits at once.
    assert!(!log.contains("waiting for /metrics"), "{log}");

    // The row is not skipped: the slot stays before it, and a restart stops on it again.
    let mut publisher = env.publisher(&[]);
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(log.contains(NO_STREAM), "{log}");
    let js = env.jetstream().await;
    assert_eq!(
        stream_message_count(&js, &env.stream).await,
        1,
        "only the good row"
    );
}

/// A process that stops at a poison row counts it and exits; Prometheus sees that count only if
/// it reads `/metrics` in between. So when something reads `/metrics`, the process waits for
/// its next read (as long as between the last two, plus a second) before exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_at_a_poison_row_waits_for_the_next_metrics_read() {
    let env = TestEnv::start().await;
    narrow_stream(&env).await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let fail = "outbox_cdc_poison_rows_total{kind=\"no_stream\",action=\"fail\"}";
    // A scraper reading every 2 s.
    assert_eq!(metric(&metrics_of(&publisher).await, fail), Some(0.0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(metric(&metrics_of(&publisher).await, fail), Some(0.0));
    insert(&env, "invoice", NO_STREAM, "'{\"n\":4}'", "NULL").await;
    publisher
        .wait_for_log(
            "waiting for /metrics to be read once more",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(metric(&metrics_of(&publisher).await, fail), Some(1.0));
    let status = publisher.wait_exit(Duration::from_secs(5)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(log.contains(NO_STREAM), "{log}");
}
