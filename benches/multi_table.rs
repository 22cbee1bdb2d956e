//! Several outbox tables: one instance reading them all from one slot (each table mapped by a
//! section of the config file) against one instance per table (a slot and a publication each),
//! on the same backlog, in one run.
//!
//! `cargo bench --bench multi_table` prints a table and writes `target/bench/multi-table.json`:
//! events/s from start to the last event stored, the walsenders' CPU seconds (each slot's
//! walsender decodes the whole WAL, whatever its publication holds) and outbox-cdc's.
//!
//! Sizes from the environment: `OUTBOX_CDC_MT_EVENTS` (default 300000) events in all, a third
//! per table, written in transactions of 10 rows per table.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde::Serialize;
use support::{Publisher, TestEnv, env_or};

const TABLES: [(&str, &str); 3] = [
    ("outbox", "order"),
    ("invoice_outbox", "billing"),
    ("shipment_outbox", "shipping"),
];

#[derive(Debug, Serialize)]
struct Case {
    case: &'static str,
    events: u64,
    seconds: f64,
    events_per_s: f64,
    walsender_cpu_seconds: f64,
    outbox_cdc_cpu_seconds: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: u64 = env_or("OUTBOX_CDC_MT_EVENTS", 300_000);
    let per_table = events / 3;
    let env = TestEnv::start().await;
    let sql = env.sql().await;
    let p = env.subject_prefix.clone();
    for (table, _) in &TABLES[1..] {
        sql.batch_execute(&format!(
            "CREATE TABLE {table} (LIKE outbox INCLUDING ALL);
             ALTER PUBLICATION outbox_pub ADD TABLE {table};
             CREATE PUBLICATION pub_{table} FOR TABLE {table} WITH (publish = 'insert');"
        ))
        .await
        .expect("table");
    }
    sql.batch_execute("CREATE PUBLICATION pub_outbox FOR TABLE outbox WITH (publish = 'insert');")
        .await
        .expect("publication");
    // Every slot before the backlog, so that each reads all of it.
    for slot in [
        "one",
        "per_outbox",
        "per_invoice_outbox",
        "per_shipment_outbox",
    ] {
        sql.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("slot");
    }
    let write = TABLES
        .iter()
        .map(|(table, kind)| {
            format!(
                "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
                 SELECT '{kind}', 'a' || g, 'created', jsonb_build_object('n', g)
                   FROM generate_series(1, 10) g;"
            )
        })
        .collect::<String>();
    let started = Instant::now();
    for _ in 0..per_table / 10 {
        sql.batch_execute(&format!("BEGIN; {write} COMMIT;"))
            .await
            .expect("backlog");
    }
    println!(
        "backlog: {} events in {:.1} s",
        per_table * 3,
        started.elapsed().as_secs_f64()
    );
    let total = per_table * 3;
    let js = env.jetstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sections.toml");
    std::fs::write(
        &config,
        TABLES
            .iter()
            .map(|(table, kind)| {
                format!("[tables.{table}]\nsubject_template = \"{p}.{kind}.{{event_type}}\"\n")
            })
            .collect::<String>(),
    )
    .expect("config");

    create_streams(&js, &p).await;
    let one = run_case(
        &env,
        "one instance, one slot, three tables",
        total,
        vec![vec![
            "--slot".into(),
            "one".into(),
            "--config".into(),
            config.to_string_lossy().into_owned(),
        ]],
        &["one"],
    )
    .await;
    create_streams(&js, &p).await;
    let three = run_case(
        &env,
        "three instances, a slot and a publication each",
        total,
        TABLES
            .iter()
            .map(|(table, kind)| {
                vec![
                    "--slot".into(),
                    format!("per_{table}"),
                    "--publication".into(),
                    format!("pub_{table}"),
                    "--subject-template".into(),
                    format!("{p}.{kind}.{{event_type}}"),
                    "--checkpoint-bucket".into(),
                    format!("cp_{table}_{}", std::process::id()),
                ]
            })
            .collect(),
        &["per_outbox", "per_invoice_outbox", "per_shipment_outbox"],
    )
    .await;
    println!(
        "\n{:<48} {:>9} {:>10} {:>14} {:>12}",
        "case", "events", "events/s", "walsender cpu", "outbox-cdc cpu"
    );
    for case in [&one, &three] {
        println!(
            "{:<48} {:>9} {:>10.0} {:>13.2}s {:>13.2}s",
            case.case,
            case.events,
            case.events_per_s,
            case.walsender_cpu_seconds,
            case.outbox_cdc_cpu_seconds
        );
    }
    println!(
        "one instance: {:.2}x the events/s, {:.2}x the walsender CPU of three",
        one.events_per_s / three.events_per_s,
        one.walsender_cpu_seconds / three.walsender_cpu_seconds.max(f64::EPSILON)
    );
    let out = std::path::Path::new(
        &std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned()),
    )
    .join("bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    let path = out.join("multi-table.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&[one, three]).expect("JSON"),
    )
    .expect("write");
    println!("wrote {}", path.display());
}

/// A stream per table, empty.
async fn create_streams(js: &jetstream::Context, prefix: &str) {
    for (_, kind) in TABLES {
        let name = format!("MT_{kind}");
        let _ = js.delete_stream(&name).await;
        js.create_stream(jetstream::stream::Config {
            name,
            subjects: vec![format!("{prefix}.{kind}.>")],
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .expect("stream");
    }
}

async fn stored(js: &jetstream::Context) -> u64 {
    let mut sum = 0;
    for (_, kind) in TABLES {
        sum += support::stream_message_count(js, &format!("MT_{kind}")).await;
    }
    sum
}

async fn run_case(
    env: &TestEnv,
    case: &'static str,
    total: u64,
    instances: Vec<Vec<String>>,
    slots: &[&str],
) -> Case {
    let js = env.jetstream().await;
    let sql = env.sql().await;
    let started = Instant::now();
    let mut publishers: Vec<Publisher> = instances
        .iter()
        .map(|extra| {
            let mut args = env.publisher_args();
            // The harness's shorter status interval is a test convenience.
            if let Some(at) = args.iter().position(|a| a == "--status-interval") {
                args.drain(at..at + 2);
            }
            // Flags the case sets replace the harness's.
            for flag in ["--checkpoint-bucket", "--subject-template"] {
                if extra.iter().any(|a| a == flag)
                    && let Some(at) = args.iter().position(|a| a == flag)
                {
                    args.drain(at..at + 2);
                }
            }
            args.extend(["--no-create-slot".to_owned()]);
            args.extend(extra.iter().cloned());
            Publisher::start(&args)
        })
        .collect();
    let mut walsenders: Vec<u32> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1800);
    while stored(&js).await < total {
        for slot in slots {
            if let Ok(row) = sql
                .query_one(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                    &[slot],
                )
                .await
                && let Some(pid) = row.get::<_, Option<i32>>(0)
                && !walsenders.contains(&(pid as u32))
            {
                walsenders.push(pid as u32);
            }
        }
        for publisher in &mut publishers {
            assert!(
                publisher.is_running() && Instant::now() < deadline,
                "an instance stopped or stalled; log:\n{}",
                publisher.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let walsender_cpu_seconds = walsenders
        .iter()
        .filter_map(|pid| support::cpu_seconds(*pid))
        .sum();
    let outbox_cdc_cpu_seconds = publishers.iter().filter_map(Publisher::cpu_seconds).sum();
    for publisher in &mut publishers {
        publisher.terminate(Duration::from_secs(30)).await;
    }
    Case {
        case,
        events: total,
        seconds,
        events_per_s: total as f64 / seconds,
        walsender_cpu_seconds,
        outbox_cdc_cpu_seconds,
    }
}
