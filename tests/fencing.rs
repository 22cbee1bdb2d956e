//! Fencing (`Nats-Expected-Last-Msg-Id`): a publish lost on its way to JetStream while the
//! ones after it arrive — what a JetStream cluster can do when its stream leader changes — must
//! not end up stored after them; and a stream another publisher writes into costs a restart of
//! the session, never an event or the order.

mod support;

use std::time::Duration;

use support::faults::{Sampler, assert_sampled, compare, verdict};
use support::proxy::NatsLossyProxy;
use support::*;

const SLOT: &str = "outbox_cdc";
const ROWS: i32 = 300;
/// The header the proxy recognises the publish to lose by.
const MARKER: &str = "x-lose-me";

/// One transaction of `ROWS` rows whose 150th carries the marker: everything after it is in
/// flight before its ack could come.
async fn write_rows_with_one_marked(env: &TestEnv) {
    env.sql()
        .await
        .execute(
            &format!(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
                 SELECT 'order', 'o-' || g, 'created', jsonb_build_object('n', g),
                        CASE WHEN g = {} THEN jsonb_build_object('{MARKER}', 'yes') END
                   FROM generate_series(1, {ROWS}) g",
                ROWS / 2
            ),
            &[],
        )
        .await
        .expect("insert");
}

/// Runs the publisher through a proxy that loses the marked publish, with `extra` flags, and
/// returns the verdict's counts (printed, not judged).
async fn lose_one_publish(extra: &[&str]) -> (support::faults::Verdict, String, Vec<Received>) {
    let mut env = TestEnv::start().await;
    let Some(nats) = env.embedded_nats() else {
        panic!("needs an embedded NATS server behind the proxy");
    };
    let proxy = NatsLossyProxy::start(nats.port(), MARKER).await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut args = env.publisher_args();
    set_arg(
        &mut args,
        "--nats-url",
        &format!("nats://127.0.0.1:{}", proxy.port()),
    );
    // The lost publish's ack never comes: the session ends when this runs out.
    args.extend(["--ack-timeout", "2s"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sampler = Sampler::start(&env, SLOT);
    write_rows_with_one_marked(&env).await;
    let js = env.jetstream().await;
    wait_for_messages(
        &js,
        &env.stream,
        ROWS as u64,
        Duration::from_secs(60),
        || publisher.log(),
    )
    .await;
    // Whatever the restart re-sends must have been acked too before the stream is read.
    wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    assert!(proxy.dropped(), "the proxy lost the marked publish");
    let status = publisher.terminate(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert!(status.success(), "{log}");
    let stream = read_stream(&js, &env.stream).await;
    let committed = oracle.rows(&env).await;
    let samples = sampler.finish().await;
    let scenario = format!("one publish lost in flight ({})", extra.join(" "));
    (
        {
            let found = compare(&scenario, 1, &[], &stream, &committed, &samples);
            assert_sampled(&scenario, &found);
            found
        },
        log,
        stream,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_lost_in_flight_is_stored_before_what_followed_it() {
    let (found, log, stream) = lose_one_publish(&[]).await;
    assert_eq!(
        (
            found.lost,
            found.duplicated,
            found.reordered,
            found.ahead_of_stream
        ),
        (0, 0, 0, 0),
        "{found:?}\n{log}"
    );
    assert_eq!(found.events, ROWS as usize);
    assert!(
        log.contains("wrong last msg ID") || log.contains("no ack within the ack timeout"),
        "the session ended on the lost publish: {log}"
    );
    // The server stores the expectation with the message: each event names the one before it
    // in the stream, a chain consumers can check for gaps too.
    for pair in stream.windows(2) {
        assert_eq!(
            header(&pair[1], "Nats-Expected-Last-Msg-Id"),
            Some(pair[0].id.as_str()),
            "{:?}",
            pair[1]
        );
    }
}

/// Why fencing is on by default: without it, the re-sent event lands after its successors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fencing_a_publish_lost_in_flight_is_stored_out_of_order() {
    let (found, log, _) = lose_one_publish(&["--no-fencing"]).await;
    assert_eq!(
        (found.lost, found.duplicated, found.ahead_of_stream),
        (0, 0, 0),
        "{log}"
    );
    assert!(
        found.reordered > 0,
        "the lost event was re-sent after the {} that followed it were stored: {found:?}",
        ROWS / 2
    );
}

/// Another publisher's message in the stream between two of ours makes the next publish fail
/// its expectation: the session restarts (warning), re-sends, and nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_publisher_in_the_stream_costs_a_restart_not_an_event() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sampler = Sampler::start(&env, SLOT);
    let sql = env.sql().await;
    let js = env.jetstream().await;
    let foreign_subject = format!("{}.foreign.note", env.subject_prefix);
    for round in 0..5 {
        write_events(&sql, "w", 200, 20).await;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("foreign-{round}").as_str());
        js.publish_with_headers(foreign_subject.clone(), headers, "not ours".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    write_events(&sql, "w", 200, 20).await;
    let committed = oracle.rows(&env).await;
    wait_for_messages(
        &js,
        &env.stream,
        committed.len() as u64 + 5,
        Duration::from_secs(60),
        || publisher.log(),
    )
    .await;
    wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    let status = publisher.terminate(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert!(status.success(), "{log}");
    let stream: Vec<Received> = read_stream(&js, &env.stream)
        .await
        .into_iter()
        .filter(|m| m.subject != foreign_subject)
        .collect();
    let samples = sampler.finish().await;
    assert!(
        log.contains("another publisher wrote into the stream"),
        "a publish after a foreign message failed its expectation: {log}"
    );
    verdict(
        "another publisher writes into the stream",
        5,
        &[],
        &stream,
        &committed,
        &samples,
    );
}
