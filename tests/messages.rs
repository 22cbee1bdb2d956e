//! The table-less outbox: events emitted with `pg_logical_emit_message(true, 'outbox', …)`
//! (`sql/outbox_emit.sql`) are published like outbox rows, in their place in commit order,
//! only when their transaction commits; other messages are skipped and counted; a kill -9
//! during a workload mixing rows and messages loses, doubles and reorders nothing.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_cdc::commands::setup::OUTBOX_EMIT_SQL;
use support::faults::{Chaos, Sampler, Workload, stored_after_clean_stop, verdict};
use support::*;

const SLOT: &str = "outbox_cdc";

/// Rows and messages interleaved in one transaction: odd events are rows, even ones messages.
const MIXED_EVENTS_SQL: &str = "
    CREATE FUNCTION mixed_events(writer text, n int) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        FOR g IN 1..n LOOP
            IF g % 2 = 0 THEN
                PERFORM outbox_emit('order', writer || '-' || g, 'emitted',
                                    jsonb_build_object('writer', writer, 'n', g));
            ELSE
                INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                VALUES ('order', writer || '-' || g, 'created',
                        jsonb_build_object('writer', writer, 'n', g));
            END IF;
        END LOOP;
    END $$;";

fn insert_row(event_type: &str, n: u32) -> String {
    format!(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('order', '{n}', '{event_type}', '{{\"n\": {n}}}');"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emitted_messages_are_published_in_their_place_and_only_when_committed() {
    let env = TestEnv::start().await;
    let p = env.subject_prefix.clone();
    let sql = env.sql().await;
    sql.batch_execute(OUTBOX_EMIT_SQL)
        .await
        .expect("outbox_emit");
    env.create_stream().await;
    let oracle = env.oracle().await;
    let dead = format!("{p}.dead");
    let publisher = env.publisher(&[
        "--message-prefix",
        "outbox",
        "--id-column",
        "id",
        "--on-error",
        "dead-letter",
        "--dead-letter-subject",
        &dead,
    ]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;

    let transactions = [
        // A row, a message, a row: three events in this order.
        format!(
            "BEGIN; {} SELECT outbox_emit('order', '1', 'paid', '{{\"n\": 2}}', '{{\"trace-id\": \"abc\"}}'); {} COMMIT;",
            insert_row("created", 1),
            insert_row("shipped", 3)
        ),
        // Rolled back: neither the message nor the row exists.
        format!(
            "BEGIN; SELECT outbox_emit('order', '2', 'rolled_back', '{{}}'); {} ROLLBACK;",
            insert_row("rolled_back", 2)
        ),
        // Sent even if its transaction aborted: never published, counted.
        "SELECT pg_logical_emit_message(false, 'outbox',
            '{\"aggregate_type\": \"order\", \"event_type\": \"non_transactional\", \"payload\": 1}');"
            .to_owned(),
        // Somebody else's prefix.
        "SELECT pg_logical_emit_message(true, 'someone_else',
            '{\"aggregate_type\": \"order\", \"event_type\": \"other_prefix\", \"payload\": 1}');"
            .to_owned(),
        // Content that is not a JSON object: a poison row, dead-lettered in its place.
        "SELECT pg_logical_emit_message(true, 'outbox', 'not json');".to_owned(),
        // A NULL subject placeholder: likewise.
        "SELECT outbox_emit(NULL, '5', 'no_type', '{}');".to_owned(),
        // A transaction with nothing but a message.
        "SELECT outbox_emit('order', '6', 'alone', '{\"n\": 6}');".to_owned(),
        insert_row("last", 7),
    ];
    for statement in &transactions {
        sql.batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 7, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    let text = wait_for_metric(
        &publisher,
        "outbox_cdc_rows_skipped_total{reason=\"non_transactional_message\"}",
        1.0,
    )
    .await;
    assert_eq!(
        metric(&text, "outbox_cdc_rows_skipped_total{reason=\"other\"}"),
        Some(1.0),
        "the other prefix's message is skipped: {text}"
    );
    assert!(
        publisher
            .log()
            .contains("emit it with pg_logical_emit_message(true"),
        "the non-transactional message is warned about: {}",
        publisher.log()
    );

    let stream = read_stream(&js, &env.stream).await;
    let subjects: Vec<&str> = stream.iter().map(|m| m.subject.as_str()).collect();
    let order = |event: &str| format!("{p}.order.{event}");
    assert_eq!(
        subjects,
        [
            order("created"),
            order("paid"),
            order("shipped"),
            dead.clone(),
            dead.clone(),
            order("alone"),
            order("last"),
        ],
        "{stream:#?}"
    );
    let paid = &stream[1];
    assert_eq!(
        &paid.payload[..],
        br#"{"n":2}"#,
        "the member's JSON, compact"
    );
    assert_eq!(header(paid, "trace-id"), Some("abc"));
    assert_eq!(header(paid, "Outbox-Table"), Some("message.outbox"));
    assert_eq!(
        header(paid, "Outbox-Commit-Lsn"),
        header(&stream[0], "Outbox-Commit-Lsn"),
        "the message and the rows of its transaction share its commit LSN"
    );
    for (letter, why) in [(&stream[3], "not JSON"), (&stream[4], "is NULL")] {
        assert_eq!(header(letter, "Outbox-Error-Kind"), Some("unmappable"));
        assert!(
            header(letter, "Outbox-Error").is_some_and(|e| e.contains(why)),
            "{letter:?}"
        );
    }
    assert_eq!(
        &stream[3].payload[..],
        b"not json",
        "the content, kept whole"
    );

    // Every committed event the oracle names, in its order, by its id.
    let committed = oracle.rows_and_messages(&env, "outbox").await;
    let published: Vec<&str> = stream
        .iter()
        .filter(|m| m.subject != dead)
        .map(|m| m.id.as_str())
        .collect();
    // The oracle also reads the dead-lettered `no_type` message (its content is an object).
    let no_type = header(&stream[4], "Outbox-Event-Id").expect("the dead letter's event id");
    let expected: Vec<&str> = committed
        .iter()
        .map(|r| r.id.as_str())
        .filter(|id| *id != no_type)
        .collect();
    assert_eq!(published, expected);
    assert!(
        published[1].starts_with("message.outbox:"),
        "ids are qualified: {published:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_workload_of_rows_and_messages() {
    let total: u64 = env_or("OUTBOX_CDC_MESSAGE_EVENTS", 20_000);
    let env = TestEnv::start().await;
    let sql = env.sql().await;
    sql.batch_execute(OUTBOX_EMIT_SQL)
        .await
        .expect("outbox_emit");
    sql.batch_execute(MIXED_EVENTS_SQL)
        .await
        .expect("mixed_events");
    env.create_stream().await;
    let oracle = env.oracle().await;
    let args = ["--message-prefix", "outbox", "--id-column", "id"];
    let mut publisher = env.publisher(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sampler = Sampler::start(&env, SLOT);
    let writers = Workload::start_with(
        &env,
        "SELECT mixed_events($1, $2::int)",
        "w",
        2,
        total,
        10,
        Duration::from_millis(2),
    );
    let mut chaos = Chaos::new();
    for round in 1..=3 {
        writers.wait_written(total * round / 4).await;
        tokio::time::sleep(chaos.between(Duration::ZERO, Duration::from_millis(300))).await;
        publisher.kill9();
        publisher = env.publisher(&args);
        publisher
            .wait_for_log("this instance is the leader", Duration::from_secs(60))
            .await;
    }
    writers.finish(false).await;
    let committed = oracle.rows_and_messages(&env, "outbox").await;
    let messages = committed
        .iter()
        .filter(|r| r.id.starts_with("message."))
        .count();
    assert!(
        messages > 0 && messages < committed.len(),
        "a mix: {messages} of {}",
        committed.len()
    );
    let (stream, _) = stored_after_clean_stop(&env, &mut publisher, committed.len()).await;
    let samples = sampler.finish().await;
    verdict(
        "kill -9 x3, rows and emitted messages",
        3,
        &[],
        &stream,
        &committed,
        &samples,
    );
}

/// With only messages, the publication holds no table: outbox-cdc refuses it without
/// `--message-prefix` (naming the flag), and with it streams the messages; ids made of the
/// commit LSN are the same when the WAL is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_of_no_table_carries_a_table_less_outbox() {
    let env = TestEnv::start_bare(Default::default()).await;
    let sql = env.sql().await;
    sql.batch_execute("CREATE PUBLICATION outbox_pub;")
        .await
        .expect("publication");
    sql.batch_execute(OUTBOX_EMIT_SQL)
        .await
        .expect("outbox_emit");
    env.create_stream().await;

    let mut refused = env.publisher(&[]);
    let status = refused.wait_exit(Duration::from_secs(60)).await;
    let log = refused.log();
    assert_ne!(exit_code(status), Some(0), "{log}");
    assert!(
        log.contains("contains no table") && log.contains("--message-prefix"),
        "{log}"
    );

    let emit = |from: u32, to: u32| {
        format!(
            "SELECT outbox_emit('order', g::text, 'placed', jsonb_build_object('n', g))
               FROM generate_series({from}, {to}) g"
        )
    };
    let mut publisher = env.publisher(&["--message-prefix", "outbox"]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    for batch in 0..10 {
        sql.batch_execute(&emit(batch * 10 + 1, batch * 10 + 10))
            .await
            .expect("emit");
    }
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 100, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());

    // Written while nobody streams; the slot kept them.
    sql.batch_execute(&emit(101, 150)).await.expect("emit");
    let publisher = env.publisher(&["--message-prefix", "outbox"]);
    wait_for_messages(&js, &env.stream, 150, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    let stream = read_stream(&js, &env.stream).await;
    assert_eq!(stream.len(), 150);
    let ids: HashSet<&str> = stream.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), 150, "no id twice");
    for (i, message) in stream.iter().enumerate() {
        let n: serde_json::Value = serde_json::from_slice(&message.payload).expect("JSON");
        assert_eq!(n["n"], i as u64 + 1, "in order");
        let (lsn, index) = message.id.split_once(':').expect("<commit LSN>:<index>");
        assert!(
            lsn.contains('/') && index.parse::<u32>().is_ok(),
            "{}",
            message.id
        );
        assert_eq!(header(message, "Outbox-Table"), Some("message.outbox"));
    }
}
