//! Transient failures mid-stream: the session ends, the next one starts from the slot after a
//! backoff, and the stream still holds every event once, in commit order.

mod support;

use std::time::Duration;

use support::*;

const EVENTS: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_stream() {
    let mut env = TestEnv::start().await;
    if env.embedded_nats().is_none() {
        eprintln!("skipped: needs an embedded NATS server to kill");
        return;
    }
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut publisher = env.publisher(&["--ack-timeout", "2s"]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "nats", EVENTS, 50).await;

    let js = env.jetstream().await;
    while stream_message_count(&js, &env.stream).await < (EVENTS / 4) as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let nats = env.embedded_nats().unwrap();
    nats.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().expect("restart NATS on the same store");

    let js = env.jetstream().await;
    wait_for_messages(
        &js,
        &env.stream,
        EVENTS as u64,
        Duration::from_secs(120),
        || publisher.log(),
    )
    .await;
    assert!(
        publisher.log().contains("retrying with backoff"),
        "{}",
        publisher.log()
    );
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());
    let stream = read_stream(&js, &env.stream).await;
    assert_exactly_once_in_order(&stream, &oracle.rows(&env).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream() {
    let env = TestEnv::start().await;
    let Some(pg) = env.embedded_postgres() else {
        eprintln!("skipped: needs an embedded PostgreSQL to restart");
        return;
    };
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "pg", EVENTS, 50).await;

    let js = env.jetstream().await;
    while stream_message_count(&js, &env.stream).await < (EVENTS / 4) as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pg.stop("fast").expect("stop PostgreSQL");
    pg.start_again().expect("start PostgreSQL");
    // Events written after the restart arrive too.
    write_events(&env.sql().await, "pg-after", 1_000, 10).await;

    wait_for_messages(
        &js,
        &env.stream,
        (EVENTS + 1_000) as u64,
        Duration::from_secs(120),
        || publisher.log(),
    )
    .await;
    assert!(
        publisher.log().contains("retrying with backoff"),
        "{}",
        publisher.log()
    );
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());
    let stream = read_stream(&js, &env.stream).await;
    assert_exactly_once_in_order(&stream, &oracle.rows(&env).await);
}
