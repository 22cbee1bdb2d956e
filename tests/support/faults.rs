//! The fault suite's workload, invariant sampler and verdict.
//!
//! A scenario runs concurrent writers (a backlog, then a live stream), injects its fault while
//! a sampler checks that the slot's confirmed position never passes what JetStream holds, and
//! ends with the stream compared to the `test_decoding` oracle: lost, duplicated and reordered
//! events are counted, printed on one line with the scenario's figures, and must all be 0.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use super::{
    CommittedRow, Publisher, Received, TestEnv, read_stream, rows_committed_through,
    stream_message_count, wait_for_messages, wait_for_metric,
};

/// Writers inserting outbox rows until they have written `total` between them or are stopped.
/// They survive server restarts: a failed transaction is retried on a new connection (the
/// oracle, not the writers' count, says what committed).
pub struct Workload {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Workload {
    /// `writers` concurrent writers, transactions of 1..=`max_txn` rows, pausing `pause`
    /// between transactions (zero: as fast as possible).
    pub fn start(
        env: &TestEnv,
        name: &str,
        writers: usize,
        total: u64,
        max_txn: u64,
        pause: Duration,
    ) -> Workload {
        Self::start_with(
            env,
            super::INSERT_EVENTS,
            name,
            writers,
            total,
            max_txn,
            pause,
        )
    }

    /// As [`Workload::start`], each transaction running `statement` with the writer's name
    /// (`$1`) and its number of events (`$2`).
    pub fn start_with(
        env: &TestEnv,
        statement: &'static str,
        name: &str,
        writers: usize,
        total: u64,
        max_txn: u64,
        pause: Duration,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let tasks = (0..writers)
            .map(|w| {
                let (stop, written) = (stop.clone(), written.clone());
                let url = env.database_url.clone();
                let writer = format!("{name}-{w}");
                tokio::spawn(async move {
                    let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ (w as u64 + 1);
                    let mut client = None;
                    while !stop.load(Ordering::Relaxed) && written.load(Ordering::Relaxed) < total {
                        let Some(c) = connected(&url, &mut client).await else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        seed = xorshift(seed);
                        let rows = 1 + seed % max_txn;
                        let result = c.execute(statement, &[&writer, &(rows as i32)]).await;
                        match result {
                            Ok(_) => {
                                written.fetch_add(rows, Ordering::Relaxed);
                            }
                            Err(_) => {
                                client = None;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Workload {
            stop,
            written,
            tasks,
        }
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Waits until the writers have written `rows`.
    pub async fn wait_written(&self, rows: u64) {
        while self.written() < rows {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the writers to reach their total (or stops them now, with `stop`).
    pub async fn finish(self, stop: bool) -> u64 {
        if stop {
            self.stop.store(true, Ordering::Relaxed);
        }
        for task in self.tasks {
            let _ = task.await;
        }
        self.written.load(Ordering::Relaxed)
    }
}

async fn connected<'a>(
    url: &str,
    client: &'a mut Option<tokio_postgres::Client>,
) -> Option<&'a tokio_postgres::Client> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let (c, conn) = tokio_postgres::connect(url, NoTls).await.ok()?;
        tokio::spawn(conn);
        *client = Some(c);
    }
    client.as_ref()
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A seeded random source for fault timing; the seed is printed so a run can be repeated
/// (`OUTBOX_CDC_FAULT_SEED`).
pub struct Chaos(u64);

impl Chaos {
    pub fn new() -> Chaos {
        let seed = std::env::var("OUTBOX_CDC_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        println!("fault seed {seed} (OUTBOX_CDC_FAULT_SEED={seed} repeats it)");
        Chaos(seed)
    }

    /// A duration in [low, high).
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        self.0 = xorshift(self.0);
        let span = (high - low).as_micros().max(1) as u64;
        low + Duration::from_micros(self.0 % span)
    }
}

/// Samples (slot confirmed position, stream size) pairs while a scenario runs, reading the slot
/// first: a stream read afterwards can only hold more, so a violation found is a real one.
/// The stream only grows; a count below one seen before is a stale answer (a cluster node that
/// just restarted) and is not used.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<(u64, u64)>>,
}

impl Sampler {
    pub fn start(env: &TestEnv, slot: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, slot) = (env.database_url.clone(), slot.to_owned());
        let mut counter = StreamCounter::new(env);
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut most = 0;
            let mut client = None;
            while !flag.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let Some(c) = connected(&url, &mut client).await else {
                    continue;
                };
                let confirmed = match c
                    .query_opt(
                        "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                {
                    Ok(Some(row)) => row.get::<_, Option<i64>>(0).unwrap_or(0) as u64,
                    Ok(None) => continue,
                    Err(_) => {
                        client = None;
                        continue;
                    }
                };
                if let Some(stored) = counter.count().await
                    && stored >= most
                {
                    most = stored;
                    samples.push((confirmed, most));
                }
            }
            samples
        });
        Sampler { stop, task }
    }

    pub async fn finish(self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("sampler")
    }
}

/// Reads a stream's message count while servers fail: a request gives up after 500 ms and a
/// failed one drops the connection, so that a node that just died or a server still restarting
/// delays a reading by that much at most, not by the client's request timeout (two requests of
/// 5 s: recovery figures of exactly 10.01 s) or its reconnect backoff.
pub struct StreamCounter {
    urls: String,
    stream: String,
    context: Option<async_nats::jetstream::Context>,
}

impl StreamCounter {
    const TIMEOUT: Duration = Duration::from_millis(500);

    pub fn new(env: &TestEnv) -> StreamCounter {
        StreamCounter {
            urls: env.nats_url.clone(),
            stream: env.stream.clone(),
            context: None,
        }
    }

    /// The stream's message count, or None when no server answered in time.
    pub async fn count(&mut self) -> Option<u64> {
        if self.context.is_none() {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Self::TIMEOUT)
                .connect(super::server_addrs(&self.urls))
                .await
                .ok()?;
            self.context = Some(
                async_nats::jetstream::ContextBuilder::new()
                    .timeout(Self::TIMEOUT)
                    .build(client),
            );
        }
        let context = self.context.as_ref()?;
        // One request: the stream's info comes with it. In a cluster, while the stream has no
        // leader, its followers answer with what they have applied, which can lag what the
        // leader acked: such an answer is no reading.
        match context.get_stream(&self.stream).await {
            Ok(stream) => {
                let info = stream.cached_info();
                let leaderless = info
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.leader.as_deref().unwrap_or_default().is_empty());
                (!leaderless).then_some(info.state.messages)
            }
            Err(_) => {
                self.context = None;
                None
            }
        }
    }

    /// The count once a server answers.
    pub async fn count_when_reachable(&mut self) -> u64 {
        loop {
            if let Some(count) = self.count().await {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until the stream holds `count` messages, up to `timeout`; the time it took.
pub async fn time_until_stored(
    js: &async_nats::jetstream::Context,
    stream: &str,
    count: u64,
    timeout: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if stream_message_count(js, stream).await >= count {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// What a scenario found.
#[derive(Debug)]
pub struct Verdict {
    pub events: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub reordered: usize,
    /// Samples where the slot had confirmed more than the stream held.
    pub ahead_of_stream: usize,
    pub samples: usize,
    /// Samples taken while the stream did not yet hold every event: the ones that could have
    /// caught the slot running ahead of it.
    pub telling_samples: usize,
}

/// Fewest samples a scenario must take for "no sample had the slot ahead" to mean something:
/// the sampler reads every 20 ms, and every scenario streams for over a second.
const MIN_SAMPLES: usize = 10;
const MIN_TELLING_SAMPLES: usize = 3;

/// Panics unless the sampler watched the scenario while events were still on their way.
pub fn assert_sampled(scenario: &str, verdict: &Verdict) {
    assert!(
        verdict.samples >= MIN_SAMPLES && verdict.telling_samples >= MIN_TELLING_SAMPLES,
        "{scenario}: the sampler took {} samples, {} of them before the stream held every event; \
         it needs at least {MIN_SAMPLES} and {MIN_TELLING_SAMPLES} to vouch for the slot never \
         running ahead",
        verdict.samples,
        verdict.telling_samples
    );
}

/// Compares the stream with the oracle and the samples with both; prints one line of figures
/// and panics unless nothing was lost, duplicated, reordered or confirmed too early.
pub fn verdict(
    scenario: &str,
    faults: usize,
    recovery: &[Duration],
    stream: &[Received],
    oracle: &[CommittedRow],
    samples: &[(u64, u64)],
) -> Verdict {
    let verdict = compare(scenario, faults, recovery, stream, oracle, samples);
    assert_eq!(
        (
            verdict.lost,
            verdict.duplicated,
            verdict.reordered,
            verdict.ahead_of_stream
        ),
        (0, 0, 0, 0),
        "{scenario}: {verdict:?}"
    );
    assert_eq!(
        stream.len(),
        oracle.len(),
        "{scenario}: the stream holds events the oracle does not"
    );
    assert_sampled(scenario, &verdict);
    verdict
}

/// What [`verdict`] checks, counted and printed, without judging.
pub fn compare(
    scenario: &str,
    faults: usize,
    recovery: &[Duration],
    stream: &[Received],
    oracle: &[CommittedRow],
    samples: &[(u64, u64)],
) -> Verdict {
    let mut seen = HashSet::new();
    let duplicated = stream
        .iter()
        .filter(|m| !seen.insert(m.id.as_str()))
        .count();
    let position: HashMap<&str, usize> = oracle
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let lost = oracle
        .iter()
        .filter(|r| !seen.contains(r.id.as_str()))
        .count();
    // An event stored after one that committed later.
    let mut reordered = 0;
    let mut newest = None;
    for m in stream {
        if let Some(&p) = position.get(m.id.as_str()) {
            if newest.is_some_and(|n| p < n) {
                reordered += 1;
            }
            newest = Some(newest.map_or(p, |n: usize| n.max(p)));
        }
    }
    let ahead: Vec<(u64, usize, u64)> = samples
        .iter()
        .map(|&(confirmed, stored)| (confirmed, rows_committed_through(oracle, confirmed), stored))
        .filter(|&(_, covered, stored)| covered as u64 > stored)
        .collect();
    let ahead_of_stream = ahead.len();
    let telling_samples = samples
        .iter()
        .filter(|&&(_, stored)| (stored as usize) < oracle.len())
        .count();
    if !ahead.is_empty() {
        println!(
            "{scenario}: samples with the slot ahead of the stream (confirmed LSN, events it covers, events stored): {:?}",
            &ahead[..ahead.len().min(10)]
        );
    }
    if lost > 0 {
        let missing: Vec<usize> = oracle
            .iter()
            .enumerate()
            .filter(|(_, r)| !seen.contains(r.id.as_str()))
            .map(|(i, _)| i)
            .collect();
        println!(
            "{scenario}: {lost} lost at commit positions {}..={} (first {:?}); stream holds {}",
            missing[0],
            missing[missing.len() - 1],
            &missing[..missing.len().min(5)],
            stream.len()
        );
    }
    let worst = recovery.iter().max().copied().unwrap_or_default();
    println!(
        "FAULTS {scenario}: events={} faults={faults} recovery_max={:.2}s lost={lost} duplicated={duplicated} reordered={reordered} slot_ahead_of_stream={ahead_of_stream}/{} samples ({telling_samples} telling)",
        oracle.len(),
        worst.as_secs_f64(),
        samples.len()
    );
    Verdict {
        events: oracle.len(),
        lost,
        duplicated,
        reordered,
        ahead_of_stream,
        samples: samples.len(),
        telling_samples,
    }
}

/// The end of a scenario: waits until the stream holds `expected` events and nothing is in
/// flight, stops the publisher with SIGTERM (it must exit cleanly), and reads the stream. Also
/// returns the publisher's last metrics.
pub async fn stored_after_clean_stop(
    env: &TestEnv,
    publisher: &mut Publisher,
    expected: usize,
) -> (Vec<Received>, String) {
    let js = env.jetstream().await;
    wait_for_messages(
        &js,
        &env.stream,
        expected as u64,
        Duration::from_secs(180),
        || publisher.log(),
    )
    .await;
    let metrics = wait_for_metric(publisher, "outbox_cdc_in_flight", 0.0).await;
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());
    (read_stream(&js, &env.stream).await, metrics)
}
