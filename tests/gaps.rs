//! Never go on silently past a gap. The slot is dropped while events wait (then recreated by
//! hand), or the database is swapped for one whose history stops before the stream's last
//! event: outbox-cdc must stop with exit 1 and a message naming the slot, the stream's last
//! commit LSN and what to do — and publish nothing past the gap until told to with
//! `--accept-gap`.

mod support;

use std::time::Duration;

use support::*;

const SLOT: &str = "outbox_cdc";

/// Starts the publisher with `extra`, expects it to stop with exit 1, and returns its log.
async fn stops_at_the_gap(args: &[String], extra: &[&str]) -> String {
    let mut args = args.to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut publisher = Publisher::start(&args);
    let status = publisher.wait_exit(Duration::from_secs(60)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    log
}

fn assert_names(log: &str, needles: &[&str]) {
    for needle in needles {
        assert!(log.contains(needle), "{needle:?} in:\n{log}");
    }
}

/// The stream's last event's commit LSN, as its header says.
async fn stream_end(env: &TestEnv) -> String {
    let stream = read_stream(&env.jetstream().await, &env.stream).await;
    header(stream.last().expect("events"), "Outbox-Commit-Lsn")
        .expect("a commit LSN")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_stops_the_process_until_the_gap_is_accepted() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let js = env.jetstream().await;
    let args = env.publisher_args();
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sql = env.sql().await;
    write_events(&sql, "published", 1000, 10).await;
    wait_for_messages(&js, &env.stream, 1000, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    let end = stream_end(&env).await;

    // 500 events wait in the slot; then the slot is gone.
    write_events(&sql, "waiting", 500, 10).await;
    sql.execute("SELECT pg_drop_replication_slot($1)", &[&SLOT])
        .await
        .expect("drop slot");
    let log = stops_at_the_gap(&args, &[]).await;
    assert_names(
        &log,
        &[
            "replication slot `outbox_cdc` does not exist, but outbox-cdc has published from it before",
            &format!("holds events up to commit LSN {end}"),
            "would never be published",
            "backfill --since-stream-end",
            "--accept-gap",
        ],
    );
    let slots: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "no slot was created past the gap");

    // An operator recreates it (as `setup --apply` does): now it is past what was confirmed.
    sql.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&SLOT],
    )
    .await
    .expect("create slot");
    let log = stops_at_the_gap(&args, &[]).await;
    assert_names(
        &log,
        &[
            "past what outbox-cdc confirmed",
            "recreated or advanced outside outbox-cdc",
            "--accept-gap",
        ],
    );
    assert_eq!(stream_message_count(&js, &env.stream).await, 1000);

    // Told to, it goes on from the slot, and says so; later events flow.
    let mut with_accept = args.clone();
    with_accept.push("--accept-gap".into());
    let mut publisher = Publisher::start(&with_accept);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&sql, "after", 100, 10).await;
    wait_for_messages(&js, &env.stream, 1100, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(
        publisher
            .log()
            .contains("--accept-gap: going on past the gap")
    );
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    // Once: the next start has nothing to accept, and no flag.
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_whose_history_ends_before_the_stream_stops_the_process() {
    let env = TestEnv::start().await;
    let Some(primary) = env.embedded_postgres() else {
        eprintln!("skipped: needs an embedded PostgreSQL to copy");
        return;
    };
    env.create_stream().await;
    let js = env.jetstream().await;
    let args = env.publisher_args();
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sql = env.sql().await;
    write_events(&sql, "first", 300, 10).await;
    wait_for_messages(&js, &env.stream, 300, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    // A copy of the database as it is now: an older backup, or a standby that falls behind.
    let copy = primary
        .start_standby("copy", &[])
        .expect("copy the database");
    let copy_url = copy.url("postgres");
    // Let it catch up to here, then cut it loose: it becomes a primary of its own history.
    let here: i64 = sql
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .expect("lsn")
        .get(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (c, conn) = tokio_postgres::connect(&copy_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the copy");
        tokio::spawn(conn);
        let replayed: i64 = c
            .query_one("SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint", &[])
            .await
            .expect("replay lsn")
            .get(0);
        if replayed >= here {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the copy never caught up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    copy.promote().expect("promote the copy");
    // The original goes on publishing events the copy will never have.
    write_events(&sql, "second", 300, 10).await;
    wait_for_messages(&js, &env.stream, 600, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    let end = stream_end(&env).await;

    // Pointed at the copy (a restore, or a failover to the lagging standby), with a slot there.
    let (c, conn) = tokio_postgres::connect(&copy_url, tokio_postgres::NoTls)
        .await
        .expect("connect to the copy");
    tokio::spawn(conn);
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&SLOT],
    )
    .await
    .expect("create slot on the copy");
    // Its own history goes on past the stream's last position: only the timeline tells the
    // events apart.
    let end_lsn: outbox_cdc::Lsn = end.parse().expect("an LSN");
    loop {
        let at: String = c
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        if at.parse::<outbox_cdc::Lsn>().expect("an LSN") > end_lsn {
            break;
        }
        write_events(&c, "copy", 200, 100).await;
    }
    let mut at_copy = args.clone();
    set_arg(&mut at_copy, "--database-url", &copy_url);
    let log = stops_at_the_gap(&at_copy, &[]).await;
    assert_names(
        &log,
        &[
            "the streams hold events the database no longer has",
            &format!("holds events up to commit LSN {end}"),
            "synchronized_standby_slots",
            "--accept-gap",
        ],
    );
    assert!(
        log.contains("timeline 2 branched off timeline 1 at"),
        "{log}"
    );
    assert_eq!(stream_message_count(&js, &env.stream).await, 600);
}
