//! The fault suite: real faults injected while concurrent writers produce a backlog and a live
//! stream; every scenario ends with 0 lost, 0 duplicated, 0 reordered, and a slot that never
//! confirmed past what JetStream held. Each prints one `FAULTS` line of figures.
//!
//! Sizes: `OUTBOX_CDC_FAULT_EVENTS` (default 100,000 for the kill -9 scenario, a fifth of it for
//! the others); `OUTBOX_CDC_FAULT_SEED` repeats a run's fault timing.

mod support;

use std::time::{Duration, Instant};

use outbox_cdc::embedded::EmbeddedNats;

use support::faults::*;
use support::*;

fn events(default: u64) -> u64 {
    std::env::var("OUTBOX_CDC_FAULT_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

const SLOT: &str = "outbox_cdc";

/// Waits for the stream to hold every committed event, then stops `publisher` cleanly and
/// returns the verdict's inputs.
async fn settle(
    env: &TestEnv,
    oracle: &Oracle,
    publisher: &mut Publisher,
) -> (Vec<Received>, Vec<CommittedRow>) {
    let committed = oracle.rows(env).await;
    let js = env.jetstream().await;
    wait_for_messages(
        &js,
        &env.stream,
        committed.len() as u64,
        Duration::from_secs(180),
        || publisher.log(),
    )
    .await;
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());
    (read_stream(&js, &env.stream).await, committed)
}

/// A scenario's writers and invariant sampler: an optional backlog written first, then live
/// writers during the fault; `end` checks the result.
struct Traffic {
    live: Option<Workload>,
    sampler: Sampler,
}

impl Traffic {
    async fn start(
        env: &TestEnv,
        writers: usize,
        backlog: u64,
        live: u64,
        max_txn: u64,
        pause: Duration,
    ) -> Traffic {
        if backlog > 0 {
            Workload::start(env, "backlog", writers, backlog, 50, Duration::ZERO)
                .finish(false)
                .await;
        }
        let live = (live > 0).then(|| Workload::start(env, "live", writers, live, max_txn, pause));
        Traffic {
            live,
            sampler: Sampler::start(env, SLOT),
        }
    }

    /// Returns once the stream holds `count` events: the fault lands mid-stream.
    async fn until_stored(&self, env: &TestEnv, count: u64) {
        let js = env.jetstream().await;
        time_until_stored(&js, &env.stream, count, Duration::from_secs(60))
            .await
            .expect("streaming");
    }

    /// Lets the writers finish, waits for the stream to hold every committed event, stops
    /// `publisher`, and gives the verdict.
    async fn end(
        self,
        env: &TestEnv,
        oracle: &Oracle,
        publisher: &mut Publisher,
        scenario: &str,
        faults: usize,
        recovery: &[Duration],
    ) -> Verdict {
        if let Some(live) = self.live {
            live.finish(false).await;
        }
        let (stream, committed) = settle(env, oracle, publisher).await;
        let samples = self.sampler.finish().await;
        verdict(scenario, faults, recovery, &stream, &committed, &samples)
    }
}

/// Waits until every replica of `stream` is online, in contact with the leader since
/// `restarted` and current, for a second on end; false after `timeout`.
async fn replicas_caught_up(
    env: &TestEnv,
    stream: &str,
    restarted: Instant,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    let js = env.jetstream().await;
    let mut seen = None;
    let mut in_a_row = 0;
    while Instant::now() < deadline {
        let mut caught_up = false;
        if let Ok(mut s) = js.get_stream(stream).await
            && let Ok(info) = s.info().await
            && let Some(cluster) = &info.cluster
        {
            // Under a steady write load a follower is rarely flagged current: a small lag will
            // do. Right after a restart the leader may still describe the replica as it was
            // before the kill: only a contact since the restart counts.
            let led = cluster.leader.as_deref().is_some_and(|l| !l.is_empty());
            caught_up = led
                && cluster.replicas.iter().all(|r| {
                    !r.offline
                        && r.active < restarted.elapsed()
                        && (r.current || r.lag.unwrap_or(0) < 100)
                });
            seen = Some(cluster.clone());
        }
        in_a_row = if caught_up { in_a_row + 1 } else { 0 };
        if in_a_row == 5 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("stream {stream}: replicas not caught up after {timeout:?} ({seen:?})");
    false
}

/// Restarts a killed cluster node and waits until it has caught up with the stream and the
/// checkpoint's bucket. "Back" means caught up: killing a second node while the first still
/// replays its log leaves a stream without a quorum, which no publisher can help; and reading
/// the stream from a replica still catching up stalls.
async fn restart_until_caught_up(env: &TestEnv, node: &mut EmbeddedNats) {
    node.restart().expect("restart node");
    let mut restarted = Instant::now();
    // nats-server 2.15 sometimes leaves a restarted node silent towards the stream's leader
    // (seen: no contact for 30 s, lag frozen): restarted once more, it rejoins.
    let checkpoint = format!("KV_{}", env.checkpoint_bucket());
    for attempt in 0..3 {
        let mut caught_up = true;
        for stream in [env.stream.as_str(), checkpoint.as_str()] {
            caught_up &= replicas_caught_up(env, stream, restarted, Duration::from_secs(20)).await;
        }
        if caught_up {
            return;
        }
        assert!(
            attempt < 2,
            "the restarted node never caught up with the cluster"
        );
        eprintln!("restarting the node again");
        node.restart().expect("restart node");
        restarted = Instant::now();
    }
}

async fn leader(env: &TestEnv, extra: &[&str]) -> Publisher {
    let publisher = env.publisher(extra);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(60))
        .await;
    publisher
}

/// From `since` until publishing has resumed: the stream holds more than it does now, or
/// already holds every row of the outbox table (the writers may have finished). "Now" is a
/// reading a server answered: one taken while NATS is still down would make its return look
/// like progress.
async fn resumed_after(env: &TestEnv, since: Instant, publisher: &Publisher) -> Duration {
    let mut counter = StreamCounter::new(env);
    let deadline = Instant::now() + Duration::from_secs(120);
    let now = tokio::time::timeout_at(deadline.into(), counter.count_when_reachable())
        .await
        .unwrap_or_else(|_| panic!("NATS never answered; log:\n{}", publisher.log()));
    while Instant::now() < deadline {
        let stored = counter.count().await.unwrap_or(0);
        let written = match env.sql_opt().await {
            Some(sql) => sql
                .query_one("SELECT count(*) FROM outbox", &[])
                .await
                .map(|r| r.get::<_, i64>(0) as u64)
                .unwrap_or(u64::MAX),
            None => u64::MAX,
        };
        if stored > now || stored >= written {
            return since.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("publishing never resumed; log:\n{}", publisher.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_kill_9_five_times_during_the_run() {
    let total = events(100_000);
    let env = TestEnv::start().await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut publisher = leader(&env, &[]).await;
    let mut chaos = Chaos::new();

    let traffic =
        Traffic::start(&env, 4, total / 2, total / 2, 50, Duration::from_millis(10)).await;
    let mut recovery = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(chaos.between(Duration::from_millis(200), Duration::from_millis(1500)))
            .await;
        assert!(publisher.is_running(), "{}", publisher.log());
        publisher.kill9();
        let killed = Instant::now();
        tokio::time::sleep(chaos.between(Duration::ZERO, Duration::from_millis(500))).await;
        publisher = env.publisher(&[]);
        // Keep the writers ahead, so that resuming is visible as growth.
        recovery.push(resumed_after(&env, killed, &publisher).await);
    }
    traffic
        .end(&env, &oracle, &mut publisher, "kill -9 x5", 5, &recovery)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_on_the_same_store_mid_stream() {
    let total = events(100_000) / 5;
    let mut env = TestEnv::start().await;
    if env.embedded_nats().is_none() {
        eprintln!("skipped: needs an embedded NATS server to kill");
        return;
    }
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut publisher = leader(&env, &["--ack-timeout", "2s"]).await;
    let traffic = Traffic::start(&env, 2, total / 2, total / 2, 20, Duration::from_millis(5)).await;
    traffic.until_stored(&env, total / 4).await;
    let nats = env.embedded_nats().expect("embedded");
    nats.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().expect("restart NATS on the same store");
    let restarted = Instant::now();
    let recovery = resumed_after(&env, restarted, &publisher).await;
    assert!(
        publisher.log().contains("retrying with backoff"),
        "the session must have ended and been retried: {}",
        publisher.log()
    );
    traffic
        .end(
            &env,
            &oracle,
            &mut publisher,
            "NATS SIGKILL + restart",
            1,
            &[recovery],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_frozen_acks_time_out_and_the_session_restarts() {
    // A server that stops answering without closing the connection: only the ack timeout
    // notices (NATS's own pings take minutes). Without it the session would wait forever.
    let total = events(100_000) / 5;
    let env = TestEnv::start().await;
    let Some(nats_pid) = env.nats_pid() else {
        eprintln!("skipped: needs an embedded NATS server to freeze");
        return;
    };
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut publisher = leader(&env, &["--ack-timeout", "1s"]).await;
    let traffic = Traffic::start(&env, 2, total / 2, total / 2, 20, Duration::from_millis(5)).await;
    traffic.until_stored(&env, total / 4).await;
    signal_pid(nats_pid, libc::SIGSTOP);
    let frozen = Instant::now();
    // The oldest publish's ack, or the checkpoint's write (the same timeout), notices first.
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        publisher.wait_for_log("transient failure", Duration::from_secs(30)),
    )
    .await;
    let detected = frozen.elapsed();
    signal_pid(nats_pid, libc::SIGCONT);
    let thawed = Instant::now();
    assert!(waited.is_ok(), "{}", publisher.log());
    let recovery = resumed_after(&env, thawed, &publisher).await;
    eprintln!(
        "FAULTS NATS frozen: ack timeout noticed {:.2}s after SIGSTOP (--ack-timeout 1s)",
        detected.as_secs_f64()
    );
    traffic
        .end(
            &env,
            &oracle,
            &mut publisher,
            "NATS SIGSTOP until the ack timeout, then SIGCONT",
            1,
            &[recovery],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_at_startup_for_30s() {
    let down: u64 = std::env::var("OUTBOX_CDC_FAULT_NATS_DOWN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let total = events(100_000) / 5;
    let mut env = TestEnv::start().await;
    if env.embedded_nats().is_none() {
        eprintln!("skipped: needs an embedded NATS server to kill");
        return;
    }
    env.create_stream().await;
    let oracle = env.oracle().await;
    // The slot exists before the writers start (as `outbox-cdc setup --apply` leaves it):
    // outbox-cdc creates one only once it has seen the streams, which needs NATS.
    env.sql()
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot('outbox_cdc', 'pgoutput')",
            &[],
        )
        .await
        .expect("create slot");
    env.embedded_nats().expect("embedded").kill();
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("retrying with backoff", Duration::from_secs(30))
        .await;
    let traffic = Traffic::start(&env, 2, 0, total, 20, Duration::from_millis(5)).await;
    tokio::time::sleep(Duration::from_secs(down)).await;
    assert!(
        publisher.is_running(),
        "gave up while NATS was down: {}",
        publisher.log()
    );
    env.embedded_nats()
        .expect("embedded")
        .restart()
        .expect("start NATS");
    let started = Instant::now();
    let js = env.jetstream().await;
    time_until_stored(&js, &env.stream, 1, Duration::from_secs(60))
        .await
        .expect("publishing started");
    let recovery = started.elapsed();
    traffic
        .end(
            &env,
            &oracle,
            &mut publisher,
            &format!("NATS down at startup {down}s"),
            1,
            &[recovery],
        )
        .await;
}

async fn postgres_restart(mode: &str) {
    let total = events(100_000) / 5;
    let env = TestEnv::start().await;
    let Some(pg) = env.embedded_postgres() else {
        eprintln!("skipped: needs an embedded PostgreSQL to restart");
        return;
    };
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut publisher = leader(&env, &[]).await;
    let traffic = Traffic::start(&env, 2, total / 2, total / 2, 20, Duration::from_millis(5)).await;
    traffic.until_stored(&env, total / 4).await;
    pg.stop(mode).expect("stop PostgreSQL");
    pg.start_again().expect("start PostgreSQL");
    let restarted = Instant::now();
    // The session must end and be retried. Until it has, what was already read before the
    // crash is still being published, and would pass for resumed publishing.
    publisher
        .wait_for_log("retrying with backoff", Duration::from_secs(60))
        .await;
    let recovery = resumed_after(&env, restarted, &publisher).await;
    traffic
        .end(
            &env,
            &oracle,
            &mut publisher,
            &format!("PostgreSQL restart -m {mode}"),
            1,
            &[recovery],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_fast_mid_stream() {
    postgres_restart("fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crashed_immediate_mid_stream() {
    postgres_restart("immediate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_the_standby_takes_over() {
    let total = events(100_000) / 5;
    let env = TestEnv::start().await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut first = leader(&env, &[]).await;
    let mut standby = env.publisher(&[]);
    standby
        .wait_for_log("this instance is standby", Duration::from_secs(30))
        .await;
    let traffic = Traffic::start(&env, 2, 0, total, 20, Duration::from_millis(5)).await;
    traffic.until_stored(&env, total / 4).await;
    first.kill9();
    let killed = Instant::now();
    standby
        .wait_for_log("this instance is the leader", Duration::from_secs(60))
        .await;
    let takeover = killed.elapsed();
    let resumed = resumed_after(&env, killed, &standby).await;
    println!(
        "FAULTS leader kill -9: takeover {:.2}s, publishing resumed {:.2}s after the kill",
        takeover.as_secs_f64(),
        resumed.as_secs_f64()
    );
    traffic
        .end(
            &env,
            &oracle,
            &mut standby,
            "leader kill -9, standby takes over",
            1,
            &[resumed],
        )
        .await;
}

fn signal(publisher: &Publisher, signal: libc::c_int) {
    signal_pid(publisher.pid(), signal);
}

/// A test environment with the outbox table whose PostgreSQL ends a walsender it has not heard
/// from for 3 s (`wal_sender_timeout`), so that the scenarios need not wait a minute.
async fn env_with_wal_sender_timeout_3s() -> TestEnv {
    let env = TestEnv::start_bare(outbox_cdc::embedded::PostgresOptions {
        settings: vec![("wal_sender_timeout".into(), "'3s'".into())],
        ..Default::default()
    })
    .await;
    env.sql()
        .await
        .batch_execute(OUTBOX_SQL)
        .await
        .expect("outbox");
    env
}

fn signal_pid(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this test started; no memory is involved.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_leader_is_replaced_and_what_it_sends_on_waking_changes_nothing() {
    let total = events(100_000) / 5;
    // PostgreSQL ends a silent walsender after 3 s: the frozen leader loses the slot.
    let env = env_with_wal_sender_timeout_3s().await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut frozen = leader(&env, &[]).await;
    let mut standby = env.publisher(&[]);
    standby
        .wait_for_log("this instance is standby", Duration::from_secs(30))
        .await;
    let traffic = Traffic::start(&env, 2, 0, total, 20, Duration::from_millis(2)).await;
    traffic.until_stored(&env, total / 4).await;
    signal(&frozen, libc::SIGSTOP);
    let stopped = Instant::now();
    standby
        .wait_for_log("this instance is the leader", Duration::from_secs(60))
        .await;
    let takeover = stopped.elapsed();
    // Wake the old leader at once, while the new one re-sends what it had in flight.
    signal(&frozen, libc::SIGCONT);
    let status = frozen.terminate(Duration::from_secs(30)).await;
    eprintln!("old leader's log:\n{}", frozen.log());
    println!(
        "FAULTS frozen leader: takeover {:.2}s after SIGSTOP (wal_sender_timeout 3s); old leader exited {status:?}",
        takeover.as_secs_f64()
    );
    traffic
        .end(
            &env,
            &oracle,
            &mut standby,
            "leader SIGSTOP/SIGCONT",
            1,
            &[takeover],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_to_postgres_cut_and_restored() {
    let total = events(100_000) / 5;
    let env = TestEnv::start().await;
    let Some(pg) = env.embedded_postgres() else {
        eprintln!("skipped: needs an embedded PostgreSQL behind the proxy");
        return;
    };
    let proxy = support::proxy::TcpProxy::start(pg.port()).await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut args = env.publisher_args();
    let through_proxy = env
        .database_url
        .replace(&format!(":{}/", pg.port()), &format!(":{}/", proxy.port()));
    set_arg(&mut args, "--database-url", &through_proxy);
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let traffic = Traffic::start(&env, 2, total / 2, total / 2, 20, Duration::from_millis(5)).await;
    traffic.until_stored(&env, total / 4).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();
    let restored = Instant::now();
    let recovery = resumed_after(&env, restored, &publisher).await;
    traffic
        .end(
            &env,
            &oracle,
            &mut publisher,
            "network to PostgreSQL cut 3s",
            1,
            &[recovery],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_to_postgres_black_holed() {
    let total = events(100_000) / 5;
    // PostgreSQL ends the walsender that no longer hears from us after 3 s.
    let env = env_with_wal_sender_timeout_3s().await;
    let pg = env.embedded_postgres().expect("an embedded PostgreSQL");
    let proxy = support::proxy::TcpProxy::start(pg.port()).await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut args = env.publisher_args();
    let through_proxy = env
        .database_url
        .replace(&format!(":{}/", pg.port()), &format!(":{}/", proxy.port()));
    set_arg(&mut args, "--database-url", &through_proxy);
    args.extend(["--replication-timeout".to_owned(), "3s".to_owned()]);
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let traffic = Traffic::start(&env, 2, total / 2, total / 2, 20, Duration::from_millis(5)).await;
    traffic.until_stored(&env, total / 4).await;
    // Both connections stay open and hear nothing: no FIN, no RST, no error to read.
    proxy.freeze_open_connections();
    let frozen = Instant::now();
    publisher
        .wait_for_log("reconnecting", Duration::from_secs(60))
        .await;
    let detected = frozen.elapsed();
    let resumed = resumed_after(&env, frozen, &publisher).await;
    println!(
        "FAULTS network to PostgreSQL black-holed: detected after {:.2}s (--replication-timeout 3s), publishing resumed {:.2}s after the freeze",
        detected.as_secs_f64(),
        resumed.as_secs_f64()
    );
    traffic
        .end(
            &env,
            &oracle,
            &mut publisher,
            "network to PostgreSQL black-holed",
            1,
            &[resumed],
        )
        .await;
}

/// `OUTBOX_CDC_FAULT_LARGE_ROWS` (default 200,000; the README's figure is for 1,000,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_transaction_with_the_publisher_killed_halfway() {
    let rows: u64 = std::env::var("OUTBOX_CDC_FAULT_LARGE_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let env = TestEnv::start().await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let mut publisher = leader(&env, &[]).await;
    // No writers: the one transaction is the workload; the sampler still watches.
    let traffic = Traffic::start(&env, 0, 0, 0, 1, Duration::ZERO).await;
    write_events(&env.sql().await, "huge", rows as usize, rows as usize).await;
    let js = env.jetstream().await;
    time_until_stored(&js, &env.stream, rows / 2, Duration::from_secs(600))
        .await
        .expect("half the transaction streamed");
    let peak_before = publisher.peak_rss_kib().unwrap_or(0);
    publisher.kill9();
    let killed = Instant::now();
    let confirmed = env.confirmed_flush_lsn(SLOT).await.expect("slot");
    let mut publisher = env.publisher(&[]);
    let recovery = resumed_after(&env, killed, &publisher).await;
    let mut peak_after = 0;
    while stream_message_count(&js, &env.stream).await < rows {
        peak_after = peak_after.max(publisher.peak_rss_kib().unwrap_or(0));
        assert!(publisher.is_running(), "{}", publisher.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak_after = peak_after.max(publisher.peak_rss_kib().unwrap_or(0));
    let committed = oracle.rows(&env).await;
    assert!(
        (confirmed as usize) < committed.last().map_or(0, |r| r.commit_end as usize),
        "the slot must not confirm a transaction that is half published"
    );
    println!(
        "FAULTS {rows}-row transaction: peak RSS {:.1} MiB before the kill, {:.1} MiB after; the restart re-read the transaction from its start",
        peak_before as f64 / 1024.0,
        peak_after as f64 / 1024.0
    );
    traffic
        .end(
            &env,
            &oracle,
            &mut publisher,
            &format!("{rows}-row transaction, kill -9 halfway"),
            1,
            &[recovery],
        )
        .await;
}

/// The port of the server the publisher connected to last (async-nats logs it).
fn connected_port(publisher: &Publisher) -> Option<u16> {
    let log = publisher.log();
    let plain: String = strip_ansi(&log);
    plain
        .rsplit("connected successfully server=")
        .next()
        .filter(|_| plain.contains("connected successfully server="))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cluster_node_killed_then_the_publishers_own_node() {
    // Three servers and a minute: OUTBOX_CDC_FAULT_CLUSTER=0 skips it.
    if std::env::var("OUTBOX_CDC_FAULT_CLUSTER").is_ok_and(|v| v == "0") {
        eprintln!("skipped: OUTBOX_CDC_FAULT_CLUSTER=0");
        return;
    }
    if std::env::var("OUTBOX_CDC_TEST_NATS_URL").is_ok() {
        eprintln!("skipped: starts its own cluster");
        return;
    }
    let total = events(100_000) / 5;
    let mut env = TestEnv::start().await;
    let mut nodes = nats_cluster().await;
    env.nats_url = nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",");
    // The cluster elects its JetStream meta leader after a moment: retry the R3 stream.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let created = async {
            let client = async_nats::connect(nodes[0].url()).await.ok()?;
            async_nats::jetstream::new(client)
                .create_stream(async_nats::jetstream::stream::Config {
                    name: env.stream.clone(),
                    subjects: vec![format!("{}.>", env.subject_prefix)],
                    duplicate_window: Duration::from_secs(600),
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
                .ok()
        }
        .await;
        if created.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never accepted an R3 stream"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let oracle = env.oracle().await;
    let mut publisher = leader(&env, &["--ack-timeout", "3s"]).await;
    let traffic = Traffic::start(&env, 2, total / 2, total / 2, 20, Duration::from_millis(5)).await;
    traffic.until_stored(&env, total / 4).await;

    let mut recovery = Vec::new();
    // A node the publisher is not connected to, then (after it is back) its own.
    let own = connected_port(&publisher).expect("the publisher logged its server");
    let other = nodes
        .iter()
        .position(|n| n.port() != own)
        .expect("another node");
    nodes[other].kill();
    let killed = Instant::now();
    recovery.push(resumed_after(&env, killed, &publisher).await);
    restart_until_caught_up(&env, &mut nodes[other]).await;
    let own = connected_port(&publisher).expect("the publisher logged its server");
    let own = nodes
        .iter()
        .position(|n| n.port() == own)
        .expect("the publisher's node");
    nodes[own].kill();
    let killed = Instant::now();
    recovery.push(resumed_after(&env, killed, &publisher).await);
    restart_until_caught_up(&env, &mut nodes[own]).await;

    traffic
        .end(
            &env,
            &oracle,
            &mut publisher,
            "NATS 3-node cluster, R3 stream: a node, then the publisher's node, killed",
            2,
            &recovery,
        )
        .await;
}

/// A SIGTERM that arrives while PostgreSQL has already closed the replication connection: the
/// final status update cannot be sent, and the process must exit at once instead of waiting
/// out `--shutdown-timeout` for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_the_replication_connection_already_closed_exits_promptly() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let mut publisher = leader(&env, &["--shutdown-timeout", "120s"]).await;
    write_events(&env.sql().await, "w", 100, 10).await;
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 100, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    signal(&publisher, libc::SIGSTOP);
    let terminated: bool = env
        .sql()
        .await
        .query_one(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .expect("terminate the walsender")
        .get(0);
    assert!(terminated);
    signal(&publisher, libc::SIGTERM);
    signal(&publisher, libc::SIGCONT);
    // Far below the 120 s shutdown timeout: the exit must not wait for a dead connection.
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());
}
