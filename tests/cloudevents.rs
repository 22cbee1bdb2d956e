//! `--cloudevents` and `--annotation-prefix`, as consumers use them: the official CloudEvents SDK
//! for Python decodes the messages read from the stream (binary and structured mode), and a
//! consumer reads the producer's W3C trace id from every event — set per transaction by
//! `outbox_annotate()`, or per row in the headers column.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use outbox_cdc::commands::setup::OUTBOX_EMIT_SQL;
use support::*;

/// A Python with the CloudEvents SDK (`tests/python/requirements.txt`).
fn python() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    python_venv(
        &root.join("tests/python/requirements.txt"),
        "cloudevents-venv",
    )
}

/// The events the CloudEvents SDK decodes from `messages`, one JSON object each.
fn decode_with_the_sdk(messages: &[Received]) -> Vec<serde_json::Value> {
    let input: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            let headers: serde_json::Map<String, serde_json::Value> = m
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                .collect();
            let hex: String = m.payload.iter().map(|b| format!("{b:02x}")).collect();
            serde_json::json!({ "headers": headers, "body_hex": hex })
        })
        .collect();
    let python = python();
    let mut child = Command::new(&python)
        .arg(format!(
            "{}/tests/python/decode_cloudevents.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::Value::from(input).to_string().as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("python");
    assert!(
        output.status.success(),
        "the CloudEvents SDK refused a message:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect()
}

async fn publish_and_read(env: &TestEnv, mode: &str, count: u64) -> Vec<Received> {
    let js = env.jetstream().await;
    let publisher = env.publisher(&[
        "--cloudevents",
        mode,
        "--cloudevents-source",
        "/shop/orders",
        "--cloudevents-type",
        "com.shop.{aggregate_type}.{event_type}",
    ]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "w", count as usize, 5).await;
    wait_for_messages(&js, &env.stream, count, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    read_stream(&js, &env.stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloudevents_sdk_decodes_binary_mode_events() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let stream = publish_and_read(&env, "binary", 10).await;
    let events = decode_with_the_sdk(&stream);
    assert_eq!(events.len(), 10);
    for (event, message) in events.iter().zip(&stream) {
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], message.id.as_str(), "ce-id is the event id");
        assert_eq!(event["source"], "/shop/orders");
        assert_eq!(event["type"], "com.shop.order.created");
        assert_eq!(
            event["time"].as_str().map(|t| t.get(..19)),
            header(message, "Outbox-Commit-Time").map(|t| t.get(..19)),
            "ce-time is the commit time"
        );
        assert!(
            event["subject"]
                .as_str()
                .is_some_and(|s| s.starts_with("w-")),
            "ce-subject is the aggregate id: {event}"
        );
        assert_eq!(event["datacontenttype"], "application/json");
        assert_eq!(event["data"]["writer"], "w", "{event}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloudevents_sdk_decodes_structured_mode_events() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let stream = publish_and_read(&env, "structured", 10).await;
    assert!(
        stream
            .iter()
            .all(|m| header(m, "content-type")
                == Some("application/cloudevents+json; charset=utf-8"))
    );
    let events = decode_with_the_sdk(&stream);
    assert_eq!(events.len(), 10);
    for (event, message) in events.iter().zip(&stream) {
        assert_eq!(event["id"], message.id.as_str());
        assert_eq!(event["type"], "com.shop.order.created");
        assert_eq!(event["datacontenttype"], "application/json");
        assert_eq!(event["data"]["writer"], "w", "{event}");
    }
}

/// W3C trace context end to end: the producer's span id goes in with the transaction (an
/// annotation) or the row (its headers column); every event carries the producer's trace id,
/// which the consumer reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_carries_its_producers_trace_context() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let js = env.jetstream().await;
    let sql = env.sql().await;
    sql.batch_execute(OUTBOX_EMIT_SQL)
        .await
        .expect("outbox_emit");
    let publisher = env.publisher(&[
        "--annotation-prefix",
        "outbox-annotations",
        "--message-prefix",
        "outbox",
    ]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let trace = |n: u32| format!("{n:032x}");
    let insert = |id: &str| {
        format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', '{id}', 'created', '{{}}');"
        )
    };
    // Transactions annotated with their producer's trace context: rows and messages alike.
    for n in 1..=5u32 {
        sql.batch_execute(&format!(
            "BEGIN;
             SELECT outbox_annotate('{{\"traceparent\": \"00-{}-00f067aa0ba902b7-01\", \"tracestate\": \"shop=1\"}}');
             {} {}
             SELECT outbox_emit('order', 'm{n}', 'paid', '{{}}');
             COMMIT;",
            trace(n),
            insert(&format!("a{n}")),
            insert(&format!("b{n}")),
        ))
        .await
        .expect("annotated transaction");
    }
    // A row that carries its own, and a transaction with none.
    sql.batch_execute(&format!(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
         VALUES ('order', 'own', 'created', '{{}}', '{{\"traceparent\": \"00-{}-00f067aa0ba902b7-01\"}}');
         {}",
        trace(99),
        insert("none")
    ))
    .await
    .expect("insert");
    wait_for_messages(&js, &env.stream, 17, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let stream = read_stream(&js, &env.stream).await;
    // The consumer: the trace id is the traceparent's second field.
    let trace_id = |m: &Received| {
        header(m, "traceparent").and_then(|t| t.split('-').nth(1).map(str::to_owned))
    };
    for n in 1..=5u32 {
        let events: Vec<&Received> = stream
            .iter()
            .filter(|m| {
                let subject_of = |what: &str| m.subject.ends_with(what);
                m.payload.as_ref() == b"{}"
                    && (subject_of("created") || subject_of("paid"))
                    && header(m, "Outbox-Commit-Lsn").is_some()
            })
            .filter(|m| trace_id(m).as_deref() == Some(trace(n).as_str()))
            .collect();
        assert_eq!(events.len(), 3, "transaction {n}: two rows and a message");
        assert!(
            events
                .iter()
                .all(|m| header(m, "tracestate") == Some("shop=1"))
        );
    }
    let own: Vec<_> = stream
        .iter()
        .filter(|m| trace_id(m).as_deref() == Some(trace(99).as_str()))
        .collect();
    assert_eq!(own.len(), 1, "the row's own trace context");
    assert_eq!(
        stream.iter().filter(|m| trace_id(m).is_none()).count(),
        1,
        "the unannotated row has none"
    );
}
