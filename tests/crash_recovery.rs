//! `kill -9` of the publisher in the middle of a backlog, then a restart: nothing missing, no
//! duplicate in the stream, order kept, and the slot's confirmed_flush_lsn never passes what
//! JetStream holds.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backlog_then_restart_loses_and_duplicates_nothing() {
    const BACKLOG: usize = 30_000;

    let env = TestEnv::start().await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    // Create the slot before the backlog is written, as a deployed publisher would have.
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    publisher.kill9();

    let client = env.sql().await;
    write_events(&client, "backlog", BACKLOG, 100).await;
    let committed = oracle.rows(&env).await;
    assert_eq!(committed.len(), BACKLOG);

    let js = env.jetstream().await;
    let mut publisher = env.publisher(&[]);
    // Sample the invariant while streaming: read the slot's position first, then the stream;
    // the stream only grows, so a violation seen this way is a real one.
    let mut samples = 0;
    loop {
        let confirmed = env.confirmed_flush_lsn("outbox_cdc").await.unwrap_or(0);
        let stored = stream_message_count(&js, &env.stream).await as usize;
        let required = rows_committed_through(&committed, confirmed);
        assert!(
            stored >= required,
            "slot confirmed {confirmed:X}, covering {required} events, but the stream holds only {stored}"
        );
        samples += 1;
        if stored >= BACKLOG / 3 {
            break;
        }
        assert!(
            publisher.is_running(),
            "publisher died; log:\n{}",
            publisher.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.kill9();
    let stored_at_kill = stream_message_count(&js, &env.stream).await as usize;
    let confirmed = env.confirmed_flush_lsn("outbox_cdc").await.unwrap_or(0);
    assert!(stored_at_kill >= rows_committed_through(&committed, confirmed));
    println!(
        "killed with {stored_at_kill} of {BACKLOG} events stored after {samples} invariant samples"
    );
    assert!(stored_at_kill < BACKLOG, "the kill must land mid-backlog");

    let mut publisher = env.publisher(&[]);
    wait_for_messages(
        &js,
        &env.stream,
        BACKLOG as u64,
        Duration::from_secs(120),
        || publisher.log(),
    )
    .await;
    // Let the restarted publisher finish re-sending (duplicates are acked, not stored).
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());

    let stream = read_stream(&js, &env.stream).await;
    assert_exactly_once_in_order(&stream, &committed);
}
