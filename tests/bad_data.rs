//! Bad data, tried on purpose, table-driven: each row below is inserted in its own transaction
//! into a table of awkward shape (no `id` column, an enum in the subject, a nullable text
//! payload), through a publication that also publishes updates and deletes. Every row ends
//! where the documented policy says — published as is, or dead-lettered with its reason — in
//! commit order; nothing panics, nothing is lost.

mod support;

use std::time::Duration;

use support::*;

#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Published with this body.
    Published(&'static str),
    /// Sent to the dead-letter subject with this `Outbox-Error-Kind`.
    DeadLetter(&'static str),
}

struct Case {
    name: &'static str,
    kind: Option<&'static str>,
    headers: &'static str,
    body: Option<&'static str>,
    fate: Fate,
}

const CASES: &[Case] = &[
    Case {
        name: "plain row",
        kind: Some("plain"),
        headers: "NULL",
        body: Some("{\"ok\":true}"),
        fate: Fate::Published("{\"ok\":true}"),
    },
    Case {
        name: "empty payload",
        kind: Some("empty"),
        headers: "NULL",
        body: Some(""),
        fate: Fate::Published(""),
    },
    Case {
        name: "NULL payload",
        kind: Some("null"),
        headers: "NULL",
        body: None,
        fate: Fate::Published(""),
    },
    Case {
        name: "non-ASCII text",
        kind: Some("unicode"),
        headers: "'{\"x-note\": \"grüße ✓\"}'",
        body: Some("héllo ✓"),
        fate: Fate::Published("héllo ✓"),
    },
    Case {
        name: "large header value (60 kB: JetStream takes up to 64 KiB of headers)",
        kind: Some("largeheader"),
        headers: "jsonb_build_object('x-big', repeat('v', 60000))",
        body: Some("large header"),
        fate: Fate::Published("large header"),
    },
    Case {
        name: "huge header value (200 kB: JetStream refuses the message)",
        kind: Some("hugeheader"),
        headers: "jsonb_build_object('x-big', repeat('v', 200000))",
        body: Some("big header"),
        fate: Fate::DeadLetter("rejected"),
    },
    Case {
        name: "header value over max_payload",
        kind: Some("hugerheader"),
        headers: "jsonb_build_object('x-big', repeat('v', 1100000))",
        body: Some("too big"),
        fate: Fate::DeadLetter("too_large"),
    },
    Case {
        name: "header name with a space",
        kind: Some("badname"),
        headers: "'{\"bad name\": \"v\"}'",
        body: Some("x"),
        fate: Fate::DeadLetter("unmappable"),
    },
    Case {
        name: "header name with a colon",
        kind: Some("colon"),
        headers: "'{\"a:b\": \"v\"}'",
        body: Some("x"),
        fate: Fate::DeadLetter("unmappable"),
    },
    Case {
        name: "header value with a line break",
        kind: Some("linebreak"),
        headers: "'{\"x-note\": \"a\\nb\"}'",
        body: Some("x"),
        fate: Fate::DeadLetter("unmappable"),
    },
    Case {
        name: "headers not a JSON object",
        kind: Some("array"),
        headers: "'[1, 2]'",
        body: Some("x"),
        fate: Fate::DeadLetter("unmappable"),
    },
    Case {
        name: "NULL subject placeholder",
        kind: None,
        headers: "NULL",
        body: Some("x"),
        fate: Fate::DeadLetter("unmappable"),
    },
    Case {
        name: "subject token with a space",
        kind: Some("has space"),
        headers: "NULL",
        body: Some("x"),
        fate: Fate::DeadLetter("unmappable"),
    },
    Case {
        name: "subject token with a wildcard",
        kind: Some("star*"),
        headers: "NULL",
        body: Some("x"),
        fate: Fate::DeadLetter("unmappable"),
    },
    Case {
        name: "last row, after all the others",
        kind: Some("last"),
        headers: "NULL",
        body: Some("{\"last\":true}"),
        fate: Fate::Published("{\"last\":true}"),
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_row_ends_where_the_policy_says() {
    let env = TestEnv::start_bare(Default::default()).await;
    let p = env.subject_prefix.clone();
    let sql = env.sql().await;
    sql.batch_execute(
        "CREATE TYPE mood AS ENUM ('calm', 'angry');
         -- No id column: event ids fall back to <commit LSN>:<row index>.
         CREATE TABLE odd (
             kind    text,
             mood    mood NOT NULL DEFAULT 'calm',
             tags    int[] DEFAULT '{1,2}',
             amount  numeric DEFAULT 12.50,
             headers jsonb,
             body    text);
         ALTER TABLE odd REPLICA IDENTITY FULL;
         -- Publishes updates and deletes too: they are skipped and counted.
         CREATE PUBLICATION outbox_pub FOR TABLE odd;",
    )
    .await
    .expect("create table");
    env.create_stream().await;
    let dead = format!("{p}.dead");
    let template = format!("{p}.{{mood}}.{{kind}}");
    let mut args = env.publisher_args();
    set_arg(&mut args, "--subject-template", &template);
    args.extend(
        [
            "--payload-column",
            "body",
            "--on-error",
            "dead-letter",
            "--dead-letter-subject",
            &dead,
        ]
        .map(String::from),
    );
    let publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    for case in CASES {
        sql.execute(
            &format!(
                "INSERT INTO odd (kind, headers, body) VALUES ($1, {}, $2)",
                case.headers
            ),
            &[&case.kind, &case.body],
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    }
    sql.batch_execute(
        "UPDATE odd SET mood = 'angry' WHERE kind = 'plain';
         DELETE FROM odd WHERE kind = 'empty';",
    )
    .await
    .expect("update and delete");

    let js = env.jetstream().await;
    wait_for_messages(
        &js,
        &env.stream,
        CASES.len() as u64,
        Duration::from_secs(30),
        || publisher.log(),
    )
    .await;
    let text = wait_for_metric(
        &publisher,
        "outbox_cdc_rows_skipped_total{reason=\"delete\"}",
        1.0,
    )
    .await;
    assert_eq!(
        metric(&text, "outbox_cdc_rows_skipped_total{reason=\"update\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(publisher.log().lines().all(|l| !l.contains("panicked")));
    let messages = read_stream(&js, &env.stream).await;
    assert_eq!(messages.len(), CASES.len(), "{messages:#?}");

    // Which case each message is: by its subject, or a dead letter's original subject.
    let case_of = |m: &Received| -> Option<usize> {
        let subject = if m.subject == dead {
            header(m, "Outbox-Original-Subject")
        } else {
            Some(m.subject.as_str())
        };
        match subject {
            Some(subject) => CASES
                .iter()
                .position(|c| c.kind.is_some_and(|k| subject == format!("{p}.calm.{k}"))),
            None => CASES.iter().position(|c| c.kind.is_none()),
        }
    };
    let mut problems = Vec::new();
    let mut order = Vec::new();
    for message in &messages {
        let Some(index) = case_of(message) else {
            problems.push(format!("unexpected message {message:?}"));
            continue;
        };
        let case = &CASES[index];
        let event_id = header(message, "Outbox-Event-Id").unwrap_or(&message.id);
        if !event_id.contains(':') || !event_id.contains('/') {
            problems.push(format!(
                "{}: id `{event_id}` is not <LSN>:<index>",
                case.name
            ));
        }
        match case.fate {
            Fate::Published(body) => {
                if message.subject == dead || message.payload.as_ref() != body.as_bytes() {
                    problems.push(format!(
                        "{}: expected it published with body {body:?}, got {} with {:?}",
                        case.name,
                        message.subject,
                        String::from_utf8_lossy(&message.payload)
                    ));
                }
                order.push(index);
            }
            Fate::DeadLetter(kind) => {
                if message.subject != dead || header(message, "Outbox-Error-Kind") != Some(kind) {
                    problems.push(format!(
                        "{}: expected a `{kind}` dead letter, got {} {:?}",
                        case.name, message.subject, message.headers
                    ));
                }
                // Also those found out only at the ack (rejected, no_stream): fencing keeps
                // what follows from being stored first.
                order.push(index);
            }
        }
    }
    if order.windows(2).any(|w| w[0] >= w[1]) {
        problems.push(format!("out of commit order: cases {order:?}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let by_case = |name: &str| {
        let index = CASES
            .iter()
            .position(|c| c.name.starts_with(name))
            .expect("case");
        messages
            .iter()
            .find(|m| case_of(m) == Some(index))
            .expect("message")
    };
    assert_eq!(
        header(by_case("large header"), "x-big").map(str::len),
        Some(60000),
        "the large header arrives whole"
    );
    assert_eq!(header(by_case("non-ASCII"), "x-note"), Some("grüße ✓"));
}

/// A table with an id column whose value is NULL: the row is a poison row (its id is what
/// consumers de-duplicate by), dead-lettered in its place here, never given a made-up id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_id_is_a_poison_row() {
    let env = TestEnv::start_bare(Default::default()).await;
    let p = env.subject_prefix.clone();
    let sql = env.sql().await;
    sql.batch_execute(
        "CREATE TABLE outbox (id text, aggregate_type text, event_type text, payload jsonb);
         CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert');",
    )
    .await
    .expect("create table");
    env.create_stream().await;
    let dead = format!("{p}.dead");
    let mut args = env.publisher_args();
    args.extend(["--on-error", "dead-letter", "--dead-letter-subject", &dead].map(String::from));
    let publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    for id in [Some("a"), None, Some("c")] {
        sql.execute(
            "INSERT INTO outbox VALUES ($1, 'order', 'created', '{}')",
            &[&id],
        )
        .await
        .expect("insert");
    }
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 3, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    let messages = read_stream(&js, &env.stream).await;
    assert_eq!(messages[0].id, "a");
    assert_eq!(messages[1].subject, dead, "{:?}", messages[1]);
    assert_eq!(
        header(&messages[1], "Outbox-Error-Kind"),
        Some("unmappable")
    );
    assert!(
        header(&messages[1], "Outbox-Error")
            .is_some_and(|e| e.contains("the id column `id` is NULL")),
        "{:?}",
        messages[1]
    );
    assert_eq!(messages[2].id, "c");
}
