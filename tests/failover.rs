//! A PostgreSQL primary with a streaming standby; the primary crashes while outbox-cdc streams
//! and writers write, the standby is promoted, and outbox-cdc — given both hosts in a libpq
//! multi-host URL — finds the new primary by itself. Events were also committed while
//! outbox-cdc was down before.
//!
//! On PostgreSQL 17+ the slot is a failover slot, synced to the standby (with
//! `synchronized_standby_slots` on the primary): the stream must end up holding every row of the
//! new primary's table once, in commit order, and nothing else. Before 17 the standby has no
//! slot: outbox-cdc must stop, naming the gap, instead of creating a new slot and going on.
//!
//! The oracle is the new primary's table (a row committed on the old primary that never reached
//! the standby is in neither) and the events' own commit LSNs, which must only grow.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outbox_cdc::embedded::EmbeddedPostgres;
use support::*;

const SLOT: &str = "outbox_cdc";

/// Writers that follow the primary across the failover (libpq's read-write host choice).
struct Writers {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(conninfo: String, name: &str, count: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let tasks = (0..count)
            .map(|w| {
                let (stop, written, conninfo) = (stop.clone(), written.clone(), conninfo.clone());
                let writer = format!("{name}-{w}");
                tokio::spawn(async move {
                    let mut client: Option<tokio_postgres::Client> = None;
                    while !stop.load(Ordering::Relaxed) {
                        if client.as_ref().is_none_or(|c| c.is_closed()) {
                            match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                                Ok((c, conn)) => {
                                    tokio::spawn(conn);
                                    client = Some(c);
                                }
                                Err(_) => {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            }
                        }
                        let c = client.as_ref().expect("connected");
                        match c.execute(INSERT_EVENTS, &[&writer, &5]).await {
                            Ok(_) => {
                                written.fetch_add(5, Ordering::Relaxed);
                            }
                            Err(_) => client = None,
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Writers {
            stop,
            written,
            tasks,
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    async fn wait_written(&self, rows: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.written() < rows {
            assert!(Instant::now() < deadline, "the writers are stuck");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn query_one_i64(url: &str, sql: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Waits until the standby has replayed the primary's WAL up to now, and (with failover slots)
/// holds a persistent synced copy of the slot.
async fn wait_for_standby(primary: &str, standby: &str, failover_slots: bool) {
    let target = query_one_i64(primary, "SELECT (pg_current_wal_lsn() - '0/0')::bigint").await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let replayed =
            query_one_i64(standby, "SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint").await;
        let synced = !failover_slots
            || query_one_i64(
                standby,
                "SELECT count(*) FROM pg_replication_slots
                  WHERE slot_name = 'outbox_cdc' AND synced AND NOT temporary",
            )
            .await
                == 1;
        if replayed >= target && synced {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never caught up (replayed {replayed:X} of {target:X}, slot synced: {synced})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_crashes_the_standby_is_promoted_and_nothing_is_lost_or_doubled() {
    let env = TestEnv::start().await;
    let Some(primary) = env.embedded_postgres() else {
        eprintln!("skipped: needs embedded PostgreSQL servers to crash and promote");
        return;
    };
    let version = query_one_i64(
        &env.database_url,
        "SELECT current_setting('server_version_num')::bigint",
    )
    .await;
    let failover_slots = version >= 170_000;
    let standby_settings: &[(&str, &str)] = if failover_slots {
        &[
            ("sync_replication_slots", "on"),
            ("hot_standby_feedback", "on"),
        ]
    } else {
        &[("hot_standby_feedback", "on")]
    };
    let standby: EmbeddedPostgres = primary
        .start_standby("standby1", standby_settings)
        .expect("start the standby");
    let standby_url = standby.url("postgres");
    let admin = |command: &str, extra: &[&str]| {
        let mut args: Vec<String> = vec![
            command.into(),
            "--database-url".into(),
            env.database_url.clone(),
            "--standby-url".into(),
            standby_url.clone(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let output = run_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
        output_text(&output)
    };
    if failover_slots {
        // `setup` names what a failover still needs: here the primary's list of standbys.
        let advice = admin("setup", &[]);
        assert!(
            advice.contains("synchronized_standby_slots is empty")
                && advice.contains("synchronized_standby_slots = 'standby1'"),
            "{advice}"
        );
        // Logical walsenders send nothing the standby has not received: a promoted standby
        // then never lacks WAL whose events were published.
        primary
            .psql("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
            .and_then(|_| primary.psql("SELECT pg_reload_conf()"))
            .expect("synchronized_standby_slots");
    } else {
        let advice = admin("setup", &[]);
        assert!(advice.contains("has no failover slots"), "{advice}");
    }
    let (p, s) = (primary.port(), standby.port());
    let both = format!(
        "postgres://postgres@127.0.0.1:{p},127.0.0.1:{s}/postgres?sslmode=disable&target_session_attrs=read-write"
    );
    let writers_conninfo = format!(
        "host=127.0.0.1,127.0.0.1 port={p},{s} user=postgres dbname=postgres target_session_attrs=read-write"
    );
    env.create_stream().await;
    let js = env.jetstream().await;
    let mut args = env.publisher_args();
    set_arg(&mut args, "--database-url", &both);

    // Streaming, then down while events are committed, then streaming again.
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(60))
        .await;
    write_events(&env.sql().await, "before", 300, 10).await;
    wait_for_messages(&js, &env.stream, 300, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    publisher.kill9();
    write_events(&env.sql().await, "down", 500, 10).await;
    let mut publisher = Publisher::start(&args);
    let writers = Writers::start(writers_conninfo, "live", 2);
    writers.wait_written(400).await;
    wait_for_messages(&js, &env.stream, 1000, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    wait_for_standby(&env.database_url, &standby_url, failover_slots).await;
    if failover_slots {
        let status = admin("status", &[]);
        for needle in [
            "failover              yes",
            "synchronized_standby_slots = standby1",
            "replication slot `outbox_cdc` is synced",
        ] {
            assert!(status.contains(needle), "{needle:?} in:\n{status}");
        }
        assert!(!status.contains("  ->  "), "nothing left to do:\n{status}");
    }

    // The primary crashes under load; the standby takes over.
    let written_before = writers.written();
    primary.stop("immediate").expect("crash the primary");
    standby.promote().expect("promote the standby");
    let standby_sql = {
        let (client, conn) = tokio_postgres::connect(&standby_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the new primary");
        tokio::spawn(conn);
        client
    };

    if !failover_slots {
        // No slot on the new primary: outbox-cdc must stop at the gap, not create a slot and go
        // on past the events committed meanwhile.
        let status = publisher.wait_exit(Duration::from_secs(120)).await;
        writers.stop().await;
        let log = publisher.log();
        assert_eq!(exit_code(status), Some(1), "{log}");
        for needle in [
            &format!(
                "replication slot `{SLOT}` does not exist, but outbox-cdc has published from it before"
            )[..],
            "--accept-gap",
            "backfill",
        ] {
            assert!(log.contains(needle), "{needle:?} in:\n{log}");
        }
        let slots = standby_sql
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT],
            )
            .await
            .expect("slots")
            .get::<_, i64>(0);
        assert_eq!(slots, 0, "no slot was created past the gap");
        println!("FAILOVER PostgreSQL {version}: no failover slots; outbox-cdc stopped at the gap");
        return;
    }

    writers.wait_written(written_before + 500).await;
    writers.stop().await;
    let rows: Vec<String> = standby_sql
        .query("SELECT id::text FROM outbox", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_for_messages(
        &js,
        &env.stream,
        rows.len() as u64,
        Duration::from_secs(120),
        || publisher.log(),
    )
    .await;
    wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    let status = publisher.terminate(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert!(status.success(), "{log}");
    let stream = read_stream(&js, &env.stream).await;

    let table: HashSet<&str> = rows.iter().map(String::as_str).collect();
    let mut seen = HashSet::new();
    let duplicated = stream
        .iter()
        .filter(|m| !seen.insert(m.id.as_str()))
        .count();
    let lost = table.iter().filter(|id| !seen.contains(*id)).count();
    let phantom = seen.iter().filter(|id| !table.contains(*id)).count();
    let position = |m: &Received| {
        let lsn: outbox_cdc::Lsn = header(m, "Outbox-Commit-Lsn")
            .expect("commit LSN")
            .parse()
            .expect("an LSN");
        let row: u32 = header(m, "Outbox-Row-Index")
            .expect("row index")
            .parse()
            .expect("a number");
        (lsn, row)
    };
    let reordered = stream
        .windows(2)
        .filter(|w| position(&w[0]) >= position(&w[1]))
        .count();
    println!(
        "FAILOVER PostgreSQL {version}: events={} lost={lost} duplicated={duplicated} phantom={phantom} reordered={reordered}",
        rows.len()
    );
    assert_eq!(
        (lost, duplicated, phantom, reordered),
        (0, 0, 0, 0),
        "{log}"
    );
    assert!(
        log.contains("another timeline than when outbox-cdc last confirmed"),
        "the new timeline was checked: {log}"
    );
}
