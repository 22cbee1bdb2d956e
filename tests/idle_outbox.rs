//! An idle outbox on a busy database: `pgbench` writes other tables while nothing is inserted
//! into the outbox. The slot's lag (`pg_current_wal_lsn() - confirmed_flush_lsn`) must stay
//! bounded, because the confirmed position follows the server's keepalives when nothing is in
//! flight; without that, the slot would pin every byte of WAL written meanwhile.
//!
//! `OUTBOX_CDC_TEST_BUSY_SECS` sets the pgbench run (default 60 s).

mod support;

use std::time::{Duration, Instant};

use outbox_cdc::embedded::find_postgres_binary;
use support::*;

/// The most WAL the slot may hold back. Measured here: at most 0.5 MiB while pgbench writes
/// about 2.5 MiB/s (the confirmed position trails the server's keepalives by a status
/// interval); without following the keepalives the lag is all the WAL written meanwhile.
const LAG_LIMIT: u64 = 4 * 1024 * 1024;

async fn wal_position(env: &TestEnv) -> u64 {
    env.sql()
        .await
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .expect("wal position")
        .get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_lag_stays_bounded_while_other_tables_are_busy() {
    let seconds: u64 = std::env::var("OUTBOX_CDC_TEST_BUSY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let env = TestEnv::start().await;
    let Some(pg) = env.embedded_postgres() else {
        eprintln!("skipped: needs the embedded server (pgbench runs against its socket)");
        return;
    };
    env.create_stream().await;
    let publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    // One event, so the slot has confirmed something of ours before the busy phase.
    write_events(&env.sql().await, "w", 1, 1).await;
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 1, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;

    let pgbench = find_postgres_binary("pgbench").expect("pgbench");
    let connect = |cmd: &mut std::process::Command| {
        cmd.arg("-h")
            .arg(pg.socket_dir())
            .args(["-p", &pg.port().to_string(), "-U", "postgres"]);
    };
    let mut init = std::process::Command::new(&pgbench);
    connect(&mut init);
    let status = init
        .args(["-i", "-q", "-s", "2", "postgres"])
        .output()
        .expect("pgbench -i");
    assert!(status.status.success(), "{status:?}");

    let start_wal = wal_position(&env).await;
    let mut run = std::process::Command::new(&pgbench);
    connect(&mut run);
    let mut bench = tokio::process::Command::from(run)
        .args(["-n", "-c", "2", "-T", &seconds.to_string(), "postgres"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench run");

    let started = Instant::now();
    let mut max_lag = 0;
    loop {
        if let Ok(Some(_)) = bench.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let confirmed = env.confirmed_flush_lsn("outbox_cdc").await.expect("slot");
        let lag = wal_position(&env).await.saturating_sub(confirmed);
        max_lag = max_lag.max(lag);
        assert!(
            started.elapsed() < Duration::from_secs(seconds + 60),
            "pgbench did not finish"
        );
    }
    let output = bench.wait_with_output().await.expect("pgbench output");
    assert!(output.status.success(), "{output:?}");
    let written = wal_position(&env).await - start_wal;
    // Give the last keepalive a status interval to be confirmed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end_lag =
        wal_position(&env).await - env.confirmed_flush_lsn("outbox_cdc").await.expect("slot");
    let metrics = metrics_of(&publisher).await;
    let metric_lag = metric(&metrics, "outbox_cdc_slot_lag_bytes").expect("slot lag metric");
    println!(
        "idle outbox, busy database: {seconds}s of pgbench wrote {} MiB of WAL; slot lag max {} KiB, at the end {} KiB (metric {} KiB)",
        written >> 20,
        max_lag >> 10,
        end_lag >> 10,
        metric_lag as u64 >> 10
    );
    assert!(
        written > 4 * LAG_LIMIT,
        "pgbench wrote {written} bytes of WAL: too little to tell a slot that follows the \
         keepalives from one that pins everything (it must write more than 4 × {LAG_LIMIT})"
    );
    assert!(end_lag < LAG_LIMIT, "slot lag {end_lag} bytes at the end");
    assert!(max_lag < LAG_LIMIT, "slot lag reached {max_lag} bytes");
    assert!((metric_lag as u64) < LAG_LIMIT, "{metrics}");
    assert_eq!(stream_message_count(&js, &env.stream).await, 1);
}
