//! `outbox-cdc demo`: the whole path on throwaway servers, in one command.
//!
//! Starts PostgreSQL (`wal_level=logical`) and `nats-server -js` from the installed binaries,
//! creates the recommended outbox table, its publication and a stream, runs the publisher
//! in-process, inserts sample events at a steady rate, and prints what a NATS subscriber receives
//! with its commit→receive latency. The servers' temporary directories go away on exit.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::watch;

use super::args::ConfigArgs;
use super::run::RunArgs;
use super::setup::OUTBOX_SQL;
use crate::embedded::{EmbeddedError, EmbeddedNats, EmbeddedPostgres, PostgresOptions};
use crate::event::header;
use crate::stats::Stats;

const STREAM: &str = "OUTBOX";
const AGGREGATES: [(&str, &str); 4] = [
    ("order", "created"),
    ("order", "paid"),
    ("customer", "registered"),
    ("payment", "captured"),
];

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Sample events inserted per second
    #[arg(long, env = "OUTBOX_CDC_DEMO_RATE", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rate: u32,

    /// Stop after this many events were received [default: run until Ctrl-C]
    #[arg(long, env = "OUTBOX_CDC_DEMO_EVENTS")]
    pub events: Option<u64>,

    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Servers(#[from] EmbeddedError),
    #[error("demo set-up: {0}")]
    Setup(String),
    #[error(transparent)]
    Run(#[from] crate::pipeline::Error),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// Runs until `shutdown` turns true or `args.events` events were received.
pub async fn run(args: DemoArgs, mut shutdown: watch::Receiver<bool>) -> Result<(), DemoError> {
    println!("starting a throwaway PostgreSQL and NATS server…");
    let postgres =
        tokio::task::spawn_blocking(|| EmbeddedPostgres::start(PostgresOptions::default()))
            .await
            .map_err(setup("starting PostgreSQL"))??;
    let nats = tokio::task::spawn_blocking(EmbeddedNats::start)
        .await
        .map_err(setup("starting NATS"))??;
    let database_url = postgres.url("postgres");
    let nats_url = nats.url();
    println!(
        "  PostgreSQL  {database_url}  (data in {})",
        postgres.socket_dir().display()
    );
    println!("  NATS        {nats_url}");

    let (sql, connection) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls)
        .await
        .map_err(setup("connecting to PostgreSQL"))?;
    tokio::spawn(connection);
    sql.batch_execute(OUTBOX_SQL)
        .await
        .map_err(setup("creating the outbox table"))?;
    // The slot before the first insert, so the producer's first events are in it.
    sql.execute(
        "SELECT pg_create_logical_replication_slot('outbox_cdc', 'pgoutput')",
        &[],
    )
    .await
    .map_err(setup("creating the replication slot"))?;
    println!(
        "  created table `outbox`, publication `outbox_pub` (sql/outbox.sql) and slot `outbox_cdc`"
    );

    let subscriber = async_nats::connect(&nats_url)
        .await
        .map_err(setup("connecting the subscriber"))?;
    let mut received = subscriber
        .subscribe("outbox.>")
        .await
        .map_err(setup("subscribing"))?;

    let config = RunArgs::from_flags([
        "--database-url",
        database_url.as_str(),
        "--nats-url",
        nats_url.as_str(),
        "--stream",
        STREAM,
    ])
    .map_err(setup("demo configuration"))?
    .resolve()
    .map_err(setup("demo configuration"))?
    .config;

    // The publisher stops on the caller's shutdown or when enough events were seen.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stats = Stats::default();
    let publisher = crate::pipeline::run(config, &stats, stop_rx);
    tokio::pin!(publisher);

    let mut producer = tokio::time::interval(Duration::from_secs(1) / args.rate);
    producer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut produced: u64 = 0;
    let mut seen: u64 = 0;
    let mut latencies_ms: Vec<f64> = Vec::new();
    println!(
        "inserting {} events/s into `outbox`; a subscriber on `outbox.>` prints what arrives (Ctrl-C stops):",
        args.rate
    );
    let outcome = loop {
        tokio::select! {
            result = &mut publisher => break result,
            _ = shutdown.wait_for(|stop| *stop), if !*stop_tx.borrow() => {
                let _ = stop_tx.send(true);
            }
            _ = producer.tick(), if !*stop_tx.borrow() => {
                let (aggregate, event) = AGGREGATES[(produced % AGGREGATES.len() as u64) as usize];
                produced += 1;
                let inserted = sql.execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
                     VALUES ($1, $2, $3, jsonb_build_object('n', $4::bigint, 'demo', true),
                             jsonb_build_object('producer', 'outbox-cdc demo'))",
                    &[&aggregate, &format!("{aggregate}-{produced}"), &event, &(produced as i64)],
                ).await;
                if let Err(e) = inserted {
                    let _ = stop_tx.send(true);
                    tracing::error!("the demo producer's insert failed: {e}");
                }
            }
            // Up to --events: one inserted meanwhile is not counted.
            Some(message) = received.next(), if args.events.is_none_or(|n| seen < n) => {
                seen += 1;
                let headers = message.headers.as_ref();
                let id = headers.and_then(|h| h.get(header::MSG_ID)).map(|v| v.as_str()).unwrap_or("-");
                let latency = headers
                    .and_then(|h| h.get(header::COMMIT_TIME))
                    .and_then(|v| latency_since(v.as_str()));
                let shown = match latency {
                    Some(ms) => {
                        latencies_ms.push(ms);
                        format!("{ms:7.2} ms")
                    }
                    None => "      ?   ".into(),
                };
                println!("  {:<28} id={id}  commit→receive {shown}", message.subject.as_str());
                if args.events.is_some_and(|n| seen >= n) {
                    let _ = stop_tx.send(true);
                }
            }
        }
    };
    outcome?;
    latencies_ms.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        latencies_ms
            .get(((latencies_ms.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "done: {produced} inserted, {seen} received, {} published to stream {STREAM}; commit→receive p50 {:.2} ms, max {:.2} ms",
        stats.published.get(),
        percentile(0.5),
        percentile(1.0),
    );
    drop(received);
    drop(subscriber);
    drop(sql);
    drop(nats);
    drop(postgres);
    println!("stopped the throwaway servers and removed their directories");
    Ok(())
}

/// Milliseconds from an RFC 3339 commit time until now.
fn latency_since(commit_time: &str) -> Option<f64> {
    let committed =
        time::OffsetDateTime::parse(commit_time, &time::format_description::well_known::Rfc3339)
            .ok()?;
    let now = time::OffsetDateTime::from(SystemTime::now());
    Some((now - committed).as_seconds_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_measured_from_the_commit_time_header() {
        let earlier = time::OffsetDateTime::now_utc() - time::Duration::milliseconds(250);
        let header = earlier
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let ms = latency_since(&header).unwrap();
        assert!((250.0..60_000.0).contains(&ms), "{ms}");
        assert_eq!(latency_since("yesterday"), None);
    }
}
