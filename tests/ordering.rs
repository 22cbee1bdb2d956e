//! 20,000 events from 4 concurrent writers reach the stream exactly once, in commit order, and
//! a clean shutdown confirms the slot up to the last acked transaction.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_arrive_once_in_commit_order() {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 5_000;
    const TOTAL: usize = WRITERS * PER_WRITER;

    let env = TestEnv::start().await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;

    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = env.sql().await;
        writers.push(tokio::spawn(async move {
            // Transactions of 1 to 20 rows, varying per writer.
            write_events(&client, &format!("w{w}"), PER_WRITER, 1 + w * 6).await;
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let js = env.jetstream().await;
    wait_for_messages(
        &js,
        &env.stream,
        TOTAL as u64,
        Duration::from_secs(120),
        || publisher.log(),
    )
    .await;
    let elapsed = started.elapsed();
    println!(
        "20k test: {TOTAL} events from {WRITERS} writers delivered in {:.2}s ({:.0} events/s, write time included)",
        elapsed.as_secs_f64(),
        TOTAL as f64 / elapsed.as_secs_f64()
    );

    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "clean shutdown exits 0; log:\n{}",
        publisher.log()
    );

    let committed = oracle.rows(&env).await;
    assert_eq!(committed.len(), TOTAL);
    let stream = read_stream(&js, &env.stream).await;
    assert_exactly_once_in_order(&stream, &committed);

    // Every message carries the tool's headers; subjects follow the template.
    let first = &stream[0];
    for header in [
        "Outbox-Commit-Lsn",
        "Outbox-Table",
        "Outbox-Commit-Time",
        "writer",
    ] {
        assert!(
            first.headers.iter().any(|(k, _)| k == header),
            "missing {header}: {first:?}"
        );
    }
    assert_eq!(
        first.subject,
        format!("{}.order.created", env.subject_prefix)
    );

    // The final status update confirmed everything that was acked.
    let confirmed = env.confirmed_flush_lsn("outbox_cdc").await.expect("slot");
    let last_commit = committed.last().unwrap().commit_end;
    assert!(
        confirmed >= last_commit,
        "confirmed_flush_lsn {confirmed:X} is behind the last acked commit {last_commit:X}"
    );
}
