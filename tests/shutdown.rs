//! Shutdown is bounded by --shutdown-timeout whatever the servers do, and a failure after a
//! session that streamed is retried from the backoff's first step, not after a wait grown during
//! an earlier outage.

mod support;

use std::time::{Duration, Instant};

use support::faults::Workload;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_as_nats_goes_away_exits_within_the_shutdown_timeout_and_loses_nothing() {
    let mut env = TestEnv::start().await;
    if env.embedded_nats().is_none() {
        eprintln!("skipped: needs an embedded NATS server to kill");
        return;
    }
    env.create_stream().await;
    let oracle = env.oracle().await;
    // The slot exists before the first row is written.
    env.sql()
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot('outbox_cdc', 'pgoutput')",
            &[],
        )
        .await
        .expect("create slot");
    let writers = Workload::start(&env, "w", 2, 200_000, 20, Duration::from_millis(2));
    for round in 0..3 {
        let mut publisher = env.publisher(&["--shutdown-timeout", "5s"]);
        publisher
            .wait_for_log("this instance is the leader", Duration::from_secs(60))
            .await;
        writers.wait_written(2_000 * (round + 1)).await;
        // The broker goes away at the moment shutdown begins: the drain's flush, its acks, the
        // checkpoint's write all wait on a connection that is gone.
        env.embedded_nats().expect("embedded").kill();
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(publisher.pid() as i32, libc::SIGTERM) };
        let asked = Instant::now();
        // Bounded by --shutdown-timeout (5 s): a hang (it once took over six minutes) fails.
        let status = publisher.wait_exit(Duration::from_secs(60)).await;
        let took = asked.elapsed();
        println!(
            "SHUTDOWN round {round}: exited {status:?} {:.2}s after SIGTERM",
            took.as_secs_f64()
        );
        assert!(status.success(), "{}", publisher.log());
        env.embedded_nats()
            .expect("embedded")
            .restart()
            .expect("start NATS");
    }
    let written = writers.finish(true).await;
    assert!(written > 0);
    let mut publisher = env.publisher(&[]);
    let committed = oracle.rows(&env).await;
    let js = env.jetstream().await;
    wait_for_messages(
        &js,
        &env.stream,
        committed.len() as u64,
        Duration::from_secs(120),
        || publisher.log(),
    )
    .await;
    wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    let stream = read_stream(&js, &env.stream).await;
    assert_exactly_once_in_order(&stream, &committed);
}

/// `retry_in=…` of each `transient failure` line in the log, in order.
fn retry_delays(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains("transient failure"))
        .filter_map(|l| l.split("retry_in=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|text| humantime::parse_duration(text).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_session_that_streamed_the_backoff_starts_from_its_first_step() {
    let mut env = TestEnv::start().await;
    let (Some(_), Some(pg)) = (env.nats_pid(), env.embedded_postgres()) else {
        eprintln!("skipped: needs embedded servers to stop");
        return;
    };
    let _ = pg;
    env.create_stream().await;
    let js = env.jetstream().await;
    let publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    // A NATS outage long enough for the backoff to grow.
    env.embedded_nats().expect("embedded").kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    while retry_delays(&publisher.log()).len() < 6 {
        assert!(Instant::now() < deadline, "{}", publisher.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let grown = *retry_delays(&publisher.log()).last().expect("a delay");
    env.embedded_nats()
        .expect("embedded")
        .restart()
        .expect("start NATS");
    let failures_before = retry_delays(&publisher.log()).len();
    // Streaming again: an event goes through.
    write_events(&env.sql().await, "w", 10, 10).await;
    wait_for_messages(&js, &env.stream, 10, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let pg = env.embedded_postgres().expect("embedded");
    pg.stop("fast").expect("stop PostgreSQL");
    pg.start_again().expect("start PostgreSQL");
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let delays = retry_delays(&publisher.log());
        if delays.len() > failures_before {
            break delays[failures_before];
        }
        assert!(Instant::now() < deadline, "{}", publisher.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "BACKOFF grown to {grown:?} during the NATS outage; first retry after the PostgreSQL restart {after:?}"
    );
    // The first step is 200 ms plus up to 200 ms of jitter; the grown one is seconds.
    assert!(
        after < Duration::from_millis(400) && grown > Duration::from_secs(2),
        "grown {grown:?}, after {after:?}:\n{}",
        publisher.log()
    );
}

/// One deadline for the whole shutdown: with the broker frozen (SIGSTOP) — so that a checkpoint
/// write or a publish under way when SIGTERM arrives never answers — the drain, the last
/// checkpoint write and the close all end by --shutdown-timeout after the signal, not each in
/// turn (it took 8.7 s with 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_frozen_exits_within_one_shutdown_timeout() {
    let env = TestEnv::start().await;
    let Some(nats_pid) = env.nats_pid() else {
        eprintln!("skipped: needs an embedded NATS server to freeze");
        return;
    };
    env.create_stream().await;
    let timeout = Duration::from_secs(5);
    let writers = Workload::start(&env, "w", 2, 1_000_000, 20, Duration::from_millis(2));
    let mut took = Vec::new();
    for round in 0..3 {
        let mut publisher = env.publisher(&["--shutdown-timeout", "5s"]);
        publisher
            .wait_for_log("this instance is the leader", Duration::from_secs(60))
            .await;
        writers.wait_written(writers.written() + 500).await;
        // The broker stops answering mid-stream; the signal follows at a varying moment, while
        // publishes, their acks or a checkpoint write wait on it.
        // SAFETY: signals to our own child processes.
        unsafe { libc::kill(nats_pid as i32, libc::SIGSTOP) };
        tokio::time::sleep(Duration::from_millis(300 * round)).await;
        unsafe { libc::kill(publisher.pid() as i32, libc::SIGTERM) };
        let asked = Instant::now();
        let status = publisher.wait_exit(Duration::from_secs(60)).await;
        took.push(asked.elapsed());
        unsafe { libc::kill(nats_pid as i32, libc::SIGCONT) };
        assert!(status.success(), "{}", publisher.log());
    }
    writers.finish(true).await;
    println!("SHUTDOWN frozen broker, --shutdown-timeout 5s: exited after {took:?}");
    // The bound is the flag's; the margin covers the process's own start and exit on a busy
    // machine, and is well below a second wait of the timeout.
    for t in &took {
        assert!(
            *t < timeout + timeout / 2,
            "shutdown took {t:?} with --shutdown-timeout {timeout:?}: {took:?}"
        );
    }
}
