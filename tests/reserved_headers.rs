//! Row data never steers the broker or outbox-cdc's own bookkeeping: a header whose name begins
//! with `Nats-` or `Outbox-` (in any case) in a row's headers is a poison row on every path —
//! `run`, `backfill`, `run --initial-backfill`, the table-less messages — while names that merely
//! start with the same letters pass unchanged; the resume point is read only from what
//! outbox-cdc wrote; and a `--where` predicate can never write.

mod support;

use std::time::Duration;

use async_nats::jetstream::stream;
use outbox_cdc::commands::setup::OUTBOX_EMIT_SQL;
use support::*;

fn command(env: &TestEnv, sub: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut args: Vec<String> = vec![sub.into()];
    args.extend(env.backfill_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let output = run_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (output.status.code(), output_text(&output))
}

fn insert(aggregate_id: &str, headers: &str) -> String {
    format!(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
         VALUES ('order', '{aggregate_id}', 'created', '{{}}', '{headers}');"
    )
}

/// A stream that lets publishers roll it up (as some teams enable for other publishers).
async fn create_rollup_stream(env: &TestEnv) {
    env.jetstream()
        .await
        .create_stream(stream::Config {
            name: env.stream.clone(),
            subjects: vec![format!("{}.>", env.subject_prefix)],
            duplicate_window: Duration::from_secs(600),
            allow_rollup: true,
            ..Default::default()
        })
        .await
        .expect("create stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_cannot_purge_the_stream_with_a_rollup_header() {
    let env = TestEnv::start().await;
    create_rollup_stream(&env).await;
    let js = env.jetstream().await;
    let sql = env.sql().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&sql, "w", 100, 10).await;
    wait_for_messages(&js, &env.stream, 100, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    sql.batch_execute(&insert("rollup", r#"{"Nats-Rollup": "all"}"#))
        .await
        .expect("insert");
    let status = publisher.wait_exit(Duration::from_secs(60)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(
        log.contains("header `Nats-Rollup`") && log.contains("reserved"),
        "the refusal names the header: {log}"
    );
    assert_eq!(
        stream_message_count(&js, &env.stream).await,
        100,
        "every event before it is still there"
    );

    // Dead-lettered in its place: the stream keeps everything, the dead letter says why.
    let dead = format!("{}.dead", env.subject_prefix);
    let publisher = env.publisher(&["--on-error", "dead-letter", "--dead-letter-subject", &dead]);
    wait_for_messages(&js, &env.stream, 101, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    write_events(&sql, "after", 10, 10).await;
    wait_for_messages(&js, &env.stream, 111, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let stream = read_stream(&js, &env.stream).await;
    assert_eq!(stream.len(), 111);
    let letter = &stream[100];
    assert_eq!(letter.subject, dead);
    assert_eq!(header(letter, "Outbox-Error-Kind"), Some("unmappable"));
    assert!(
        header(letter, "Outbox-Error").is_some_and(|e| e.contains("Nats-Rollup")),
        "{:?}",
        letter.headers
    );
    assert_eq!(header(letter, "Nats-Rollup"), None);
}

/// A backfilled event whose row faked outbox-cdc's position headers: refused as a poison row
/// now; and should such a message end a stream (a foreign publisher, data from before), the
/// next `run` does not take it for its resume point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_cannot_fake_the_resume_point() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let js = env.jetstream().await;
    let sql = env.sql().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&sql, "w", 20, 10).await;
    wait_for_messages(&js, &env.stream, 20, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());

    let fake = r#"{"Outbox-Commit-Lsn": "FF/FFFFFFFF", "Outbox-Row-Index": "0"}"#;
    sql.batch_execute(&insert("faked", fake))
        .await
        .expect("insert");
    let (code, text) = command(&env, "backfill", &["--where", "aggregate_id = 'faked'"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("header `Outbox-Commit-Lsn`") && text.contains("reserved"),
        "{text}"
    );
    assert_eq!(stream_message_count(&js, &env.stream).await, 20);

    // What such a row left at a stream's end before it was refused: a backfilled event with a
    // position outbox-cdc never published.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "faked");
    headers.insert("Outbox-Backfill", "true");
    headers.insert("Outbox-Commit-Lsn", "FF/FFFFFFFF");
    headers.insert("Outbox-Row-Index", "0");
    js.publish_with_headers(
        format!("{}.order.created", env.subject_prefix),
        headers,
        "{}".into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    // The faked row is in the WAL too: dead-lettered in its place.
    let dead = format!("{}.dead", env.subject_prefix);
    let publisher = env.publisher(&["--on-error", "dead-letter", "--dead-letter-subject", &dead]);
    write_events(&sql, "after", 50, 10).await;
    wait_for_messages(&js, &env.stream, 72, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(
        !publisher.log().contains("FF/FFFFFFFF"),
        "{}",
        publisher.log()
    );
}

/// Every reserved prefix, in any case, on every path; and names that only start with the same
/// letters pass through as they are. Subjects carry the aggregate id, so each event and each
/// dead letter (by its `Outbox-Original-Subject`) says which row it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_prefixes_are_refused_on_every_path_and_look_alikes_pass() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let js = env.jetstream().await;
    let sql = env.sql().await;
    sql.batch_execute(OUTBOX_EMIT_SQL)
        .await
        .expect("outbox_emit");
    let p = env.subject_prefix.clone();
    let dead = format!("{p}.dead");
    let template = format!("{p}.row.{{aggregate_id}}");
    let policy = ["--on-error", "dead-letter", "--dead-letter-subject", &dead].map(String::from);
    let mut base = env.publisher_args();
    set_arg(&mut base, "--subject-template", &template);
    base.extend(policy.iter().cloned());
    let rows = |path: &str| {
        format!(
            "{}{}{}",
            insert(&format!("{path}-nats"), r#"{"nats-ttl": "1s"}"#),
            insert(&format!("{path}-outbox"), r#"{"OUTBOX-Table": "x"}"#),
            insert(
                &format!("{path}-alike"),
                r#"{"Nats-ish": "a", "outboxer": "b"}"#
            ),
        )
    };

    // --initial-backfill: rows there before the slot, selected in its snapshot.
    sql.batch_execute(&rows("initial")).await.expect("insert");
    let mut args = base.clone();
    args.extend(
        [
            "--initial-backfill",
            "aggregate_id LIKE 'initial-%'",
            "--message-prefix",
            "outbox",
        ]
        .map(String::from),
    );
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    // run: rows and table-less messages from the WAL.
    sql.batch_execute(&format!("BEGIN; {} COMMIT;", rows("run")))
        .await
        .expect("insert");
    sql.batch_execute(
        "BEGIN;
         SELECT outbox_emit('order', 'message-nats', 'created', '{}', '{\"NATS-Expected-Stream\": \"x\"}');
         SELECT outbox_emit('order', 'message-outbox', 'created', '{}', '{\"outbox-row-index\": \"9\"}');
         SELECT outbox_emit('order', 'message-alike', 'created', '{}', '{\"Nats-ish\": \"a\", \"outboxer\": \"b\"}');
         COMMIT;",
    )
    .await
    .expect("emit");
    wait_for_messages(&js, &env.stream, 9, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    // backfill: rows read from the table.
    sql.batch_execute(&rows("backfill")).await.expect("insert");
    let mut args: Vec<String> = vec!["backfill".into()];
    args.extend(env.backfill_args());
    set_arg(&mut args, "--subject-template", &template);
    args.extend(policy.iter().cloned());
    args.extend(["--where", "aggregate_id LIKE 'backfill-%'"].map(String::from));
    let output = run_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", output_text(&output));

    let stream = read_stream(&js, &env.stream).await;
    assert_eq!(stream.len(), 12, "{stream:#?}");
    let row = |m: &Received| {
        let subject = header(m, "Outbox-Original-Subject").unwrap_or(&m.subject);
        subject.rsplit('.').next().unwrap_or_default().to_owned()
    };
    for path in ["initial", "run", "message", "backfill"] {
        for (refused, name) in [("nats", "nats-ttl"), ("outbox", "OUTBOX-Table")] {
            let id = format!("{path}-{refused}");
            let letter = stream
                .iter()
                .find(|m| row(m) == id)
                .unwrap_or_else(|| panic!("nothing for {id}: {stream:#?}"));
            assert_eq!(letter.subject, dead, "{id}: {letter:?}");
            assert_eq!(
                header(letter, "Outbox-Error-Kind"),
                Some("unmappable"),
                "{id}"
            );
            let reason = header(letter, "Outbox-Error").unwrap_or_default();
            let name = if path == "message" {
                if refused == "nats" {
                    "NATS-Expected-Stream"
                } else {
                    "outbox-row-index"
                }
            } else {
                name
            };
            assert!(
                reason.contains(&format!("header `{name}`")) && reason.contains("reserved"),
                "{id}: {reason}"
            );
        }
        let id = format!("{path}-alike");
        let alike = stream
            .iter()
            .find(|m| row(m) == id)
            .unwrap_or_else(|| panic!("{id} was not published: {stream:#?}"));
        assert_ne!(alike.subject, dead, "{id}: {alike:?}");
        assert_eq!(header(alike, "Nats-ish"), Some("a"), "{id}");
        assert_eq!(header(alike, "outboxer"), Some("b"), "{id}");
    }
}

/// `--where` is the user's SQL, run read-only and as one statement: it cannot write, nor end the
/// transaction to run statements of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_where_predicate_can_never_write() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let sql = env.sql().await;
    write_events(&sql, "w", 10, 10).await;
    sql.batch_execute("CREATE SEQUENCE touched")
        .await
        .expect("sequence");
    let count = || async {
        let sql = env.sql().await;
        let rows: i64 = sql
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .expect("count")
            .get(0);
        let touched: bool = sql
            .query_one("SELECT is_called FROM touched", &[])
            .await
            .expect("sequence")
            .get(0);
        (rows, touched)
    };
    for predicate in [
        "true); COMMIT; DELETE FROM outbox; SELECT (1",
        "nextval('touched') > 0",
    ] {
        let (code, text) = command(&env, "backfill", &["--where", predicate]);
        assert_ne!(code, Some(0), "{predicate}: {text}");
        assert_eq!(count().await, (10, false), "{predicate}: {text}");
        let output = run_command(&[
            "verify",
            "--stream",
            &env.stream,
            "--nats-url",
            &env.nats_url,
            "--database-url",
            &env.database_url,
            "--where",
            predicate,
        ]);
        assert_ne!(output.status.code(), Some(0), "{}", output_text(&output));
        assert_eq!(
            count().await,
            (10, false),
            "{predicate}: {}",
            output_text(&output)
        );
    }
}
