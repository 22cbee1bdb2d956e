//! End-to-end benchmark: outbox-cdc beside the machine's limits, on the same data, in one run.
//!
//! `cargo bench --bench e2e` prints one table and writes `target/bench/e2e.json`:
//! - **catch-up**: a backlog written first (100-row transactions; single-row transactions;
//!   100-event transactions of the table-less outbox, `outbox_emit` messages with no row; and
//!   100-row transactions again, each published as one atomic batch), then `outbox-cdc run`
//!   started: rows/s from start to the last row stored in JetStream.
//!   Beside it, on the same WAL and messages: `pg_recvlogical` reading the same publication through
//!   a pgoutput slot to /dev/null (the walsender's ceiling) and a raw publish loop of the very
//!   messages outbox-cdc stored through outbox-cdc's own sink (the broker's ceiling on the same
//!   publish path, start-up included as in outbox-cdc's run);
//! - **live**: single-row transactions at a steady rate; latency from commit (the producer's
//!   `clock_timestamp()` in the inserting statement, so a little before the commit) to a JetStream
//!   subscriber receiving the message;
//! - **cost**: peak RSS and CPU seconds of outbox-cdc, WAL bytes and row writes per event.
//!
//! Every run checks the stream against a `test_decoding` slot: each committed row once, in commit
//! order. A violation panics: a fast wrong answer is not a result.
//!
//! Sizes come from the environment, so CI can run a small version:
//! - `OUTBOX_CDC_E2E_BATCHED_ROWS` (default 1000000): backlog in 100-row transactions;
//! - `OUTBOX_CDC_E2E_SINGLE_ROWS` (default 200000): backlog in single-row transactions;
//! - `OUTBOX_CDC_E2E_MESSAGE_EVENTS` (default 1000000): backlog of emitted messages, 100 per
//!   transaction;
//! - `OUTBOX_CDC_E2E_ATOMIC_ROWS` (default 1000000): backlog in 100-row transactions published
//!   with `--atomic-transactions` (skipped on nats-server before 2.12);
//! - `OUTBOX_CDC_E2E_LIVE_RATES` (default `1000,10000`): events/s of the live runs;
//! - `OUTBOX_CDC_E2E_LIVE_SECS` (default 30): length of each live run;
//! - `OUTBOX_CDC_E2E_PRODUCERS` (default 8): connections inserting during the live runs;
//! - `OUTBOX_CDC_E2E_STORAGE` (default `file`): `memory` puts the stream in memory;
//! - `OUTBOX_CDC_E2E_REPORT` (default `e2e.json`): the report's file name in `target/bench/`;
//! - `OUTBOX_CDC_E2E_ARGS` (default empty): extra `outbox-cdc run` flags, e.g.
//!   `--max-in-flight 1024`; the raw publish loop uses the same window.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer};
use async_nats::{HeaderMap, Subject};
use futures::StreamExt;
use outbox_cdc::Lsn;
use outbox_cdc::embedded::find_postgres_binary;
use outbox_cdc::event::{EventRef, OutboxEvent};
use outbox_cdc::sink::{JetStreamSink, NatsAuth, Outgoing, SinkConfig};
use serde::Serialize;
use support::{Publisher, Received, TestEnv, env_or, unique};

struct Settings {
    batched_rows: usize,
    single_rows: usize,
    message_events: usize,
    atomic_rows: usize,
    live_rates: Vec<u32>,
    live_secs: u64,
    producers: usize,
    extra_args: Vec<String>,
    window: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let extra_args: Vec<String> = env_or("OUTBOX_CDC_E2E_ARGS", String::new())
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let window = extra_args
            .iter()
            .position(|a| a == "--max-in-flight")
            .and_then(|i| extra_args.get(i + 1))
            .map(|w| w.parse().expect("--max-in-flight: a number"))
            .unwrap_or(DEFAULT_WINDOW);
        Settings {
            batched_rows: env_or("OUTBOX_CDC_E2E_BATCHED_ROWS", 1_000_000),
            single_rows: env_or("OUTBOX_CDC_E2E_SINGLE_ROWS", 200_000),
            message_events: env_or("OUTBOX_CDC_E2E_MESSAGE_EVENTS", 1_000_000),
            atomic_rows: env_or("OUTBOX_CDC_E2E_ATOMIC_ROWS", 1_000_000),
            live_rates: env_or("OUTBOX_CDC_E2E_LIVE_RATES", "1000,10000".to_owned())
                .split(',')
                .filter(|r| !r.trim().is_empty())
                .map(|r| {
                    r.trim()
                        .parse()
                        .expect("OUTBOX_CDC_E2E_LIVE_RATES: comma-separated numbers")
                })
                .collect(),
            live_secs: env_or("OUTBOX_CDC_E2E_LIVE_SECS", 30),
            producers: env_or("OUTBOX_CDC_E2E_PRODUCERS", 8usize).max(1),
            extra_args,
            window,
        }
    }
}

/// Where a catch-up case's events come from.
#[derive(Clone, Copy, PartialEq)]
enum Outbox {
    /// Rows inserted into the outbox table.
    Table,
    /// `outbox_emit(…)` messages (`pg_logical_emit_message`), no row.
    Messages,
    /// Rows, each transaction published as one atomic batch (`--atomic-transactions`).
    Atomic,
}

/// The table-less outbox's backlog: `$2` messages in one transaction, as writer `$1`.
const EMIT_EVENTS: &str = "SELECT count(outbox_emit('order', $1 || '-' || g, 'created',
                              jsonb_build_object('writer', $1::text, 'n', g),
                              jsonb_build_object('writer', $1::text)))
       FROM generate_series(1, $2::int) g";

/// `outbox-cdc run`'s default `--max-in-flight`.
const DEFAULT_WINDOW: usize = 4096;

#[derive(Serialize)]
struct Machine {
    cores: usize,
    postgres: String,
    nats_server: String,
    outbox_cdc_args: Vec<String>,
}

#[derive(Serialize)]
struct CatchUp {
    case: String,
    rows: usize,
    rows_per_transaction: usize,
    pg_recvlogical_rows_per_s: f64,
    raw_nats_publish_rows_per_s: f64,
    outbox_cdc_rows_per_s: f64,
    outbox_cdc_seconds: f64,
    ratio_to_pg_recvlogical: f64,
    ratio_to_raw_nats_publish: f64,
    peak_rss_mib: f64,
    cpu_seconds: f64,
    /// Where the machine's CPU went while outbox-cdc published the backlog.
    nats_server_cpu_seconds: f64,
    walsender_cpu_seconds: f64,
    machine_busy_percent: f64,
    /// The same for pg_recvlogical's run (its walsender and itself).
    pg_recvlogical_machine_busy_percent: f64,
    insert_wal_bytes_per_event: f64,
    wal_bytes_per_event_while_publishing: f64,
    extra_row_writes_per_event: f64,
}

#[derive(Serialize)]
struct Live {
    target_events_per_s: u32,
    achieved_events_per_s: f64,
    events: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    peak_rss_mib: f64,
    cpu_seconds: f64,
    /// The share of the machine's CPU in use while the producers ran (they, the servers, the
    /// subscriber and outbox-cdc share the cores).
    machine_busy_percent: f64,
    wal_bytes_per_event: f64,
    extra_row_writes_per_event: f64,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    catch_up: Vec<CatchUp>,
    live: Vec<Live>,
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; test runners listing benches call without it.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let settings = Settings::from_env();
    let env = TestEnv::start().await;
    let sql = env.sql().await;
    let postgres: String = sql
        .query_one("SHOW server_version", &[])
        .await
        .expect("server version")
        .get(0);
    let nats_server = env.jetstream().await.client().server_info().version.clone();
    let machine = Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        postgres,
        nats_server,
        outbox_cdc_args: settings.extra_args.clone(),
    };
    println!(
        "machine: {} cores, PostgreSQL {}, nats-server {}, outbox-cdc args {:?}",
        machine.cores, machine.postgres, machine.nats_server, machine.outbox_cdc_args
    );

    let mut catch_up = Vec::new();
    sql.batch_execute(outbox_cdc::commands::setup::OUTBOX_EMIT_SQL)
        .await
        .expect("create outbox_emit");
    let atomic_batches = env
        .jetstream()
        .await
        .client()
        .is_server_compatible(2, 12, 0);
    let cases = [
        (
            "100-row transactions",
            Outbox::Table,
            settings.batched_rows,
            100,
        ),
        (
            "single-row transactions",
            Outbox::Table,
            settings.single_rows,
            1,
        ),
        (
            "100-message transactions",
            Outbox::Messages,
            settings.message_events,
            100,
        ),
        (
            "100-row transactions, atomic",
            Outbox::Atomic,
            settings.atomic_rows,
            100,
        ),
    ];
    for (case, outbox, rows, per_txn) in cases {
        if outbox == Outbox::Atomic && !atomic_batches {
            println!("catch-up, {case}: skipped (atomic batches need nats-server 2.12+)");
            continue;
        }
        if rows > 0 {
            catch_up.push(run_catch_up(&env, &settings, case, outbox, rows, per_txn).await);
        }
    }
    let mut live = Vec::new();
    for &rate in &settings.live_rates {
        live.push(run_live(&env, &settings, rate).await);
    }

    let report = Report {
        machine,
        catch_up,
        live,
    };
    print_report(&report);
    let dir = std::path::Path::new(
        &std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned()),
    )
    .join("bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join(env_or("OUTBOX_CDC_E2E_REPORT", "e2e.json".to_owned()));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).expect("report as JSON"),
    )
    .expect("write e2e.json");
    println!("wrote {}", path.display());
}

async fn run_catch_up(
    env: &TestEnv,
    settings: &Settings,
    case: &str,
    outbox: Outbox,
    rows: usize,
    per_txn: usize,
) -> CatchUp {
    println!("catch-up, {case}: writing {rows} rows");
    let sql = env.sql().await;
    // Both slots exist before the backlog, so both readers see exactly the same WAL.
    let recvlogical_slot = unique("recv");
    let slot = unique("cdc");
    for name in [&recvlogical_slot, &slot] {
        sql.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[name],
        )
        .await
        .expect("create slot");
    }
    let oracle = env.oracle().await;

    let before_insert = wal_lsn(&sql).await;
    {
        // Its own connection, closed after writing: a backend flushes its statistics on exit.
        let writer = env.sql().await;
        match outbox {
            Outbox::Table | Outbox::Atomic => {
                support::write_events(&writer, "bench", rows, per_txn).await
            }
            Outbox::Messages => {
                for start in (0..rows).step_by(per_txn) {
                    let n = per_txn.min(rows - start) as i32;
                    writer
                        .execute(EMIT_EVENTS, &[&format!("bench{start}"), &n])
                        .await
                        .expect("emit events");
                }
            }
        }
    }
    let end_lsn = wal_lsn(&sql).await;
    let insert_wal_bytes_per_event = (end_lsn - before_insert) as f64 / rows as f64;
    let committed = match outbox {
        Outbox::Table | Outbox::Atomic => oracle.rows(env).await,
        Outbox::Messages => oracle.rows_and_messages(env, "outbox").await,
    };
    assert_eq!(committed.len(), rows, "the oracle sees every written row");

    let machine_before = MachineBusy::start();
    let started = Instant::now();
    let status = Command::new(find_postgres_binary("pg_recvlogical").expect("pg_recvlogical"))
        .args(["-d", &env.database_url, "-S", &recvlogical_slot])
        .args(["--start", "--no-loop", "-o", "proto_version=1"])
        .args(["-o", "publication_names=outbox_pub", "-o", "messages=true"])
        .args(["-f", "/dev/null"])
        .args(["-E", &format_lsn(end_lsn)])
        .stdout(Stdio::null())
        .status()
        .expect("run pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed: {status}");
    let pg_recvlogical = rows as f64 / started.elapsed().as_secs_f64();
    let pg_recvlogical_machine_busy_percent = machine_before.percent();

    let js = env.jetstream().await;
    let _ = js.delete_stream(&env.stream).await;
    create_stream(env).await;
    // Give backends' statistics a moment to land before the baseline.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let writes_before = row_writes(&sql).await;
    let wal_before = wal_lsn(&sql).await;
    let mut args = vec!["--slot", &slot, "--no-create-slot"];
    match outbox {
        Outbox::Messages => args.extend(["--message-prefix", "outbox", "--id-column", "id"]),
        Outbox::Atomic => args.push("--atomic-transactions"),
        Outbox::Table => {}
    }
    args.extend(settings.extra_args.iter().map(String::as_str));
    let nats_cpu_before = env.nats_pid().and_then(support::cpu_seconds);
    let machine_before = MachineBusy::start();
    let started = Instant::now();
    let mut publisher = start_publisher(env, &args);
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut walsender = None;
    while support::stream_message_count(&js, &env.stream).await < rows as u64 {
        if walsender.is_none() {
            walsender = slot_pid(&sql, &slot).await;
        }
        assert!(
            publisher.is_running() && Instant::now() < deadline,
            "outbox-cdc stopped or stalled before publishing the backlog; log:\n{}",
            publisher.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let machine_busy_percent = machine_before.percent();
    // The walsender is the replication connection's own backend: all its CPU time is this run's.
    let walsender_cpu_seconds = walsender.and_then(support::cpu_seconds).unwrap_or(0.0);
    let nats_server_cpu_seconds = match (
        nats_cpu_before,
        env.nats_pid().and_then(support::cpu_seconds),
    ) {
        (Some(before), Some(after)) => after - before,
        _ => 0.0,
    };
    let wal_after = wal_lsn(&sql).await;
    let (peak_rss_mib, cpu_seconds) = usage(&publisher);
    publisher.terminate(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let writes_after = row_writes(&sql).await;

    let stored = support::read_stream(&js, &env.stream).await;
    support::assert_exactly_once_in_order(&stored, &committed);
    let outbox_cdc = rows as f64 / seconds;

    let _ = js.delete_stream(&env.stream).await;
    create_stream(env).await;
    let raw = raw_publish(&env.nats_url, &stored, settings).await;
    assert_eq!(
        support::stream_message_count(&js, &env.stream).await,
        rows as u64,
        "the raw publish loop stored every message"
    );
    drop(stored);
    drop_slots(&sql).await;

    CatchUp {
        case: case.to_owned(),
        rows,
        rows_per_transaction: per_txn,
        pg_recvlogical_rows_per_s: pg_recvlogical,
        raw_nats_publish_rows_per_s: raw,
        outbox_cdc_rows_per_s: outbox_cdc,
        outbox_cdc_seconds: seconds,
        ratio_to_pg_recvlogical: outbox_cdc / pg_recvlogical,
        ratio_to_raw_nats_publish: outbox_cdc / raw,
        peak_rss_mib,
        cpu_seconds,
        nats_server_cpu_seconds,
        walsender_cpu_seconds,
        machine_busy_percent,
        pg_recvlogical_machine_busy_percent,
        insert_wal_bytes_per_event,
        wal_bytes_per_event_while_publishing: (wal_after - wal_before) as f64 / rows as f64,
        extra_row_writes_per_event: (writes_after - writes_before) as f64 / rows as f64,
    }
}

/// The broker's ceiling: the same subjects, headers and bodies, published through outbox-cdc's
/// own sink (`JetStreamSink`: the same publish, ack and fencing path, the same window) from
/// messages built beforehand, on a single-threaded runtime of its own as outbox-cdc runs. Timed
/// like outbox-cdc's run: from before connecting to the last ack.
async fn raw_publish(nats_url: &str, messages: &[Received], settings: &Settings) -> f64 {
    let prepared: Vec<(OutboxEvent, EventRef)> = messages
        .iter()
        .map(|m| {
            let mut headers = HeaderMap::new();
            for (name, value) in &m.headers {
                // The sink names each publish's predecessor itself, and publishes one by one
                // (stored messages of atomic batches keep their batch headers).
                if name != "Nats-Expected-Last-Msg-Id"
                    && name != "Nats-Expected-Last-Sequence"
                    && !name.starts_with("Nats-Batch-")
                {
                    headers.append(name.as_str(), value.as_str());
                }
            }
            let subject = Subject::from(m.subject.as_str());
            let event = EventRef {
                event_id: m.id.clone(),
                table: Arc::from("public.outbox"),
                subject: Some(subject.clone()),
                commit_lsn: Lsn::ZERO,
                row_index: 0,
            };
            let message = OutboxEvent {
                subject,
                headers,
                payload: m.payload.clone(),
                id: m.id.as_str().into(),
            };
            (message, event)
        })
        .collect();
    let count = prepared.len();
    let config = SinkConfig {
        urls: nats_url.parse().expect("the test's NATS URL"),
        auth: NatsAuth::default(),
        streams: Vec::new(),
        capture_subjects: Vec::new(),
        event_subjects: Vec::new(),
        checkpoint_replicas: None,
        ack_timeout: Duration::from_secs(10),
        max_in_flight: settings.window,
        fencing: !settings.extra_args.iter().any(|a| a == "--no-fencing"),
        atomic: false,
    };
    let window = settings.window;
    let publish_all = move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the raw publish loop");
        runtime.block_on(async move {
            let started = Instant::now();
            let mut sink = JetStreamSink::<()>::connect(&config)
                .await
                .expect("connect to NATS");
            sink.prepare(&config).await.expect("read the streams");
            for (message, event) in prepared {
                while sink.in_flight() >= window {
                    let (_, ack) = sink.next_ack().await;
                    ack.expect("raw publish acked");
                }
                let outgoing = Outgoing {
                    message,
                    event,
                    tag: (),
                };
                sink.publish(outgoing, true)
                    .await
                    .expect("raw publish sent");
            }
            while sink.in_flight() > 0 {
                let (_, ack) = sink.next_ack().await;
                ack.expect("raw publish acked");
            }
            started.elapsed()
        })
    };
    let elapsed = tokio::task::spawn_blocking(publish_all)
        .await
        .expect("raw publish loop");
    count as f64 / elapsed.as_secs_f64()
}

const INSERT_ONE: &str =
    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
     VALUES ('order', $1, 'created', jsonb_build_object('writer', $1::text, 'n', 1),
             jsonb_build_object('writer', $1::text))
     RETURNING id::text, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

async fn run_live(env: &TestEnv, settings: &Settings, rate: u32) -> Live {
    println!(
        "live: {rate} events/s for {} s from {} connections",
        settings.live_secs, settings.producers
    );
    let sql = env.sql().await;
    let js = env.jetstream().await;
    let _ = js.delete_stream(&env.stream).await;
    let stream = create_stream(env).await;
    let oracle = env.oracle().await;
    let slot = unique("live");
    let mut args = vec!["--slot", &slot];
    args.extend(settings.extra_args.iter().map(String::as_str));
    let mut publisher = start_publisher(env, &args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(60))
        .await;

    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .expect("subscriber");
    let mut messages = consumer.messages().await.expect("subscribe");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(None::<usize>);
    let subscriber = tokio::spawn(async move {
        let mut received: Vec<(String, i64, i64)> = Vec::new();
        loop {
            if let Some(total) = *stop_rx.borrow()
                && received.len() >= total
            {
                return received;
            }
            tokio::select! {
                message = messages.next() => {
                    let message = message.expect("subscription open").expect("message");
                    let at = micros_now();
                    let id = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.to_string())
                        .expect("a Nats-Msg-Id header");
                    // When JetStream stored it: splits the latency into before and after.
                    let stored = message
                        .info()
                        .map_or(0, |i| (i.published.unix_timestamp_nanos() / 1000) as i64);
                    received.push((id, at, stored));
                }
                _ = stop_rx.changed() => {}
            }
        }
    });

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let writes_before = row_writes(&sql).await;
    let wal_before = wal_lsn(&sql).await;
    let total = rate as usize * settings.live_secs as usize;
    let interval = Duration::from_secs_f64(settings.producers as f64 / rate as f64);
    let machine_before = MachineBusy::start();
    let started = tokio::time::Instant::now();
    let mut producers = Vec::new();
    for p in 0..settings.producers {
        let client = env.sql().await;
        let count = total / settings.producers + usize::from(p < total % settings.producers);
        // Staggered so the connections together send at an even pace.
        let first = started + interval.mul_f64(p as f64 / settings.producers as f64);
        producers.push(tokio::spawn(async move {
            let insert = client.prepare(INSERT_ONE).await.expect("prepare insert");
            let writer = format!("live{p}");
            let mut committed = Vec::with_capacity(count);
            for k in 0..count {
                tokio::time::sleep_until(first + interval.mul_f64(k as f64)).await;
                let row = client.query_one(&insert, &[&writer]).await.expect("insert");
                committed.push((row.get::<_, String>(0), row.get::<_, i64>(1)));
            }
            committed
        }));
    }
    let mut commit_times: HashMap<String, i64> = HashMap::with_capacity(total);
    for producer in producers {
        commit_times.extend(producer.await.expect("producer"));
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let machine_busy_percent = machine_before.percent();
    stop_tx.send_replace(Some(total));
    let received = tokio::time::timeout(Duration::from_secs(120), subscriber)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the subscriber did not receive all {total} events; log:\n{}",
                publisher.log()
            )
        })
        .expect("subscriber");
    let wal_after = wal_lsn(&sql).await;
    let (peak_rss_mib, cpu_seconds) = usage(&publisher);
    publisher.terminate(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let writes_after = row_writes(&sql).await;

    let mut latencies: Vec<i64> = received
        .iter()
        .map(|(id, at, _)| {
            let committed = commit_times
                .get(id)
                .unwrap_or_else(|| panic!("received {id}, which no producer wrote"));
            at - committed
        })
        .collect();
    print_slow_windows(&received, &commit_times);
    latencies.sort_unstable();
    let committed = oracle.rows(env).await;
    let stored = support::read_stream(&js, &env.stream).await;
    support::assert_exactly_once_in_order(&stored, &committed);
    drop_slots(&sql).await;

    let percentile = |q: f64| {
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1] as f64 / 1000.0
    };
    // The subject template's inserts commit alone; their WAL is the insert's own.
    Live {
        target_events_per_s: rate,
        achieved_events_per_s: achieved,
        events: total,
        p50_ms: percentile(0.5),
        p99_ms: percentile(0.99),
        p999_ms: percentile(0.999),
        max_ms: percentile(1.0),
        peak_rss_mib,
        cpu_seconds,
        machine_busy_percent,
        wal_bytes_per_event: (wal_after - wal_before) as f64 / total as f64,
        extra_row_writes_per_event: (writes_after - writes_before - total as i64) as f64
            / total as f64,
    }
}

fn print_report(report: &Report) {
    println!();
    println!(
        "machine: {} cores, PostgreSQL {}, nats-server {}",
        report.machine.cores, report.machine.postgres, report.machine.nats_server
    );
    println!();
    println!(
        "{:<24} {:>9} {:>11} {:>11} {:>11} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>8}",
        "catch-up",
        "rows",
        "pg_recvlog",
        "raw NATS",
        "outbox-cdc",
        "×recv",
        "×NATS",
        "RSS MiB",
        "CPU s",
        "WAL B/ev",
        "+WAL B/ev",
        "+writes"
    );
    for c in &report.catch_up {
        println!(
            "{:<24} {:>9} {:>11.0} {:>11.0} {:>11.0} {:>7.2} {:>7.2} {:>7.1} {:>6.1} {:>9.0} {:>9.2} {:>8.3}",
            c.case,
            c.rows,
            c.pg_recvlogical_rows_per_s,
            c.raw_nats_publish_rows_per_s,
            c.outbox_cdc_rows_per_s,
            c.ratio_to_pg_recvlogical,
            c.ratio_to_raw_nats_publish,
            c.peak_rss_mib,
            c.cpu_seconds,
            c.insert_wal_bytes_per_event,
            c.wal_bytes_per_event_while_publishing,
            c.extra_row_writes_per_event,
        );
    }
    println!("(rows/s; WAL B/ev = the inserts' own WAL per event; +WAL and +writes = what the");
    println!(" database wrote per event while outbox-cdc published the backlog; messages = the");
    println!(" table-less outbox: outbox_emit() in the transaction, no row)");
    for c in &report.catch_up {
        println!(
            "{}: CPU while outbox-cdc ran: machine {:.0} % busy; outbox-cdc {:.1} s, nats-server {:.1} s, walsender {:.1} s (pg_recvlogical's run: machine {:.0} % busy)",
            c.case,
            c.machine_busy_percent,
            c.cpu_seconds,
            c.nats_server_cpu_seconds,
            c.walsender_cpu_seconds,
            c.pg_recvlogical_machine_busy_percent,
        );
    }
    println!();
    println!(
        "{:<16} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>9} {:>8}",
        "live events/s",
        "achieved",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "events",
        "RSS MiB",
        "CPU s",
        "busy %",
        "WAL B/ev",
        "+writes"
    );
    for l in &report.live {
        println!(
            "{:<16} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8} {:>7.1} {:>6.1} {:>6.0} {:>9.0} {:>8.3}",
            l.target_events_per_s,
            l.achieved_events_per_s,
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            l.events,
            l.peak_rss_mib,
            l.cpu_seconds,
            l.machine_busy_percent,
            l.wal_bytes_per_event,
            l.extra_row_writes_per_event,
        );
    }
    println!("(latency: producer's clock_timestamp() in the insert → JetStream subscriber;");
    println!(" busy % = the share of all cores in use while the producers ran;");
    println!(" +writes = row writes per event beyond the event's own insert)");
}

/// Where the tail comes from: the 100 ms windows (by commit time) whose slowest event took over
/// 20 ms, and how much of that passed before JetStream stored the message.
fn print_slow_windows(received: &[(String, i64, i64)], commit_times: &HashMap<String, i64>) {
    let start = commit_times.values().copied().min().unwrap_or(0);
    let mut windows: std::collections::BTreeMap<i64, (i64, i64)> = Default::default();
    for (id, received_at, stored_at) in received {
        let committed = commit_times[id];
        let window = windows.entry((committed - start) / 100_000).or_default();
        window.0 = window.0.max(received_at - committed);
        window.1 = window.1.max(stored_at - committed);
    }
    let mut slow: Vec<_> = windows.iter().filter(|(_, w)| w.0 > 20_000).collect();
    if slow.is_empty() {
        return;
    }
    println!(
        "  {} of {} 100-ms windows had an event slower than 20 ms; the slowest:",
        slow.len(),
        windows.len()
    );
    slow.sort_by_key(|(_, w)| std::cmp::Reverse(w.0));
    for (window, (worst, stored)) in slow.into_iter().take(5) {
        println!(
            "    at {:.1} s: {:.0} ms commit→receive, {:.0} ms of it before JetStream stored it",
            *window as f64 / 10.0,
            *worst as f64 / 1000.0,
            *stored as f64 / 1000.0
        );
    }
}

/// The test's stream, on file storage unless `OUTBOX_CDC_E2E_STORAGE=memory`.
/// The benchmark's stream, taking atomic batches where the server can.
async fn create_stream(env: &TestEnv) -> jetstream::stream::Stream {
    let storage = match env_or("OUTBOX_CDC_E2E_STORAGE", "file".to_owned()).as_str() {
        "memory" => jetstream::stream::StorageType::Memory,
        "file" => jetstream::stream::StorageType::File,
        other => panic!("OUTBOX_CDC_E2E_STORAGE={other:?}: file or memory"),
    };
    let js = env.jetstream().await;
    let allow_atomic_publish = js.client().is_server_compatible(2, 12, 0);
    js.create_stream(jetstream::stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.subject_prefix)],
        duplicate_window: Duration::from_secs(600),
        storage,
        allow_atomic_publish,
        ..Default::default()
    })
    .await
    .expect("create stream")
}

/// `outbox-cdc run` with the harness's connection flags and otherwise its own defaults (the
/// harness's shorter `--status-interval` is a test convenience, not what users run).
fn start_publisher(env: &TestEnv, extra: &[&str]) -> Publisher {
    let mut args = env.publisher_args();
    if let Some(at) = args.iter().position(|a| a == "--status-interval") {
        args.drain(at..at + 2);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    Publisher::start(&args)
}

fn micros_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The share of all cores' time that was busy since `start`.
struct MachineBusy(Option<(u64, u64)>);

impl MachineBusy {
    fn start() -> MachineBusy {
        MachineBusy(support::machine_cpu_ticks())
    }

    fn percent(&self) -> f64 {
        match (self.0, support::machine_cpu_ticks()) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                100.0 * (busy1 - busy0) as f64 / (total1 - total0) as f64
            }
            _ => 0.0,
        }
    }
}

/// The process id of the walsender streaming from `slot`, once one is.
async fn slot_pid(sql: &tokio_postgres::Client, slot: &str) -> Option<u32> {
    sql.query_one(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .ok()?
    .get::<_, Option<i32>>(0)
    .map(|pid| pid as u32)
}

fn usage(publisher: &Publisher) -> (f64, f64) {
    (
        publisher.peak_rss_kib().unwrap_or(0) as f64 / 1024.0,
        publisher.cpu_seconds().unwrap_or(0.0),
    )
}

async fn wal_lsn(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .expect("current WAL position")
        .get(0)
}

/// Rows inserted, updated or deleted in every database, as the statistics system counts them.
async fn row_writes(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT sum(tup_inserted + tup_updated + tup_deleted)::bigint FROM pg_stat_database",
        &[],
    )
    .await
    .expect("row statistics")
    .get(0)
}

async fn drop_slots(sql: &tokio_postgres::Client) {
    sql.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active",
        &[],
    )
    .await
    .expect("drop slots");
}

fn format_lsn(lsn: i64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}
