//! Catch-up throughput: a backlog of outbox rows written first, then `outbox-cdc run` started,
//! timed from start to the last JetStream ack — once per `--max-in-flight` window, on the same
//! data, beside `pg_recvlogical` reading the same publication (the walsender's ceiling).
//!
//! `cargo bench --bench catchup`. Sizes come from the environment so CI can run a small version:
//! - `OUTBOX_CDC_BENCH_ROWS` (default 200000): rows in the backlog;
//! - `OUTBOX_CDC_BENCH_TXN_ROWS` (default 100): rows per transaction;
//! - `OUTBOX_CDC_BENCH_WINDOWS` (default `256,1024,4096,8192`): windows to compare.
//!
//! Every run checks that the stream holds each row exactly once, in commit order.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outbox_cdc::embedded::find_postgres_binary;
use support::{TestEnv, unique};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`. Test runners (`cargo test --benches`, nextest listing)
    // call without it: there is no quick test in here, so list nothing and do nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rows: usize = env_or("OUTBOX_CDC_BENCH_ROWS", 200_000);
    let per_txn: usize = env_or("OUTBOX_CDC_BENCH_TXN_ROWS", 100);
    let windows: Vec<usize> = env_or("OUTBOX_CDC_BENCH_WINDOWS", "256,1024,4096,8192".to_owned())
        .split(',')
        .map(|w| {
            w.trim()
                .parse()
                .expect("OUTBOX_CDC_BENCH_WINDOWS: comma-separated numbers")
        })
        .collect();

    let env = TestEnv::start().await;
    let sql = env.sql().await;
    // One slot per run, all created before the backlog, so each run reads the same WAL.
    let recvlogical_slot = unique("recv");
    let slots: Vec<String> = windows.iter().map(|w| unique(&format!("w{w}"))).collect();
    for slot in slots.iter().chain(std::iter::once(&recvlogical_slot)) {
        sql.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await
        .expect("create slot");
    }
    let oracle = env.oracle().await;

    let started = Instant::now();
    support::write_events(&sql, "bench", rows, per_txn).await;
    let end_lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("wal lsn")
        .get(0);
    println!(
        "backlog: {rows} rows in {}-row transactions, written in {:.2} s",
        per_txn,
        started.elapsed().as_secs_f64()
    );
    let committed = oracle.rows(&env).await;
    assert_eq!(committed.len(), rows, "the oracle sees every written row");

    let recvlogical = find_postgres_binary("pg_recvlogical").expect("pg_recvlogical");
    let started = Instant::now();
    let status = Command::new(recvlogical)
        .args([
            "-d",
            &env.database_url,
            "-S",
            &recvlogical_slot,
            "--start",
            "--no-loop",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=outbox_pub",
        ])
        .args(["-E", &end_lsn, "-f", "/dev/null"])
        .stdout(Stdio::null())
        .status()
        .expect("run pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed: {status}");
    let ceiling = rows as f64 / started.elapsed().as_secs_f64();
    println!(
        "{:<28} {:>10.0} rows/s",
        "pg_recvlogical (ceiling)", ceiling
    );

    let js = env.jetstream().await;
    for (window, slot) in windows.iter().zip(&slots) {
        // A fresh stream per run so each run's count and order can be checked on its own.
        let _ = js.delete_stream(&env.stream).await;
        env.create_stream().await;
        let window_arg = window.to_string();
        let started = Instant::now();
        let mut publisher = env.publisher(&[
            "--slot",
            slot,
            "--no-create-slot",
            "--max-in-flight",
            &window_arg,
        ]);
        let deadline = Instant::now() + Duration::from_secs(600);
        while support::stream_message_count(&js, &env.stream).await < rows as u64 {
            assert!(
                publisher.is_running() && Instant::now() < deadline,
                "outbox-cdc stopped or stalled before publishing the backlog; log:\n{}",
                publisher.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let peak_kib = publisher.peak_rss_kib().unwrap_or(0);
        publisher.terminate(Duration::from_secs(30)).await;
        let stream = support::read_stream(&js, &env.stream).await;
        support::assert_exactly_once_in_order(&stream, &committed);
        let rate = rows as f64 / elapsed;
        println!(
            "{:<28} {:>10.0} rows/s  {:>5.2} × ceiling  {:>6.2} s  peak RSS {:.1} MiB",
            format!("outbox-cdc window {window}"),
            rate,
            rate / ceiling,
            elapsed,
            peak_kib as f64 / 1024.0
        );
    }
}
