//! Several outbox tables in one process, one slot: each table of the publication mapped its own
//! way by a section of the config file (its subject, id, payload and headers columns, its
//! `--on-error`), written in the same transactions. The stream holds every event once, in the
//! one commit order across tables, through `kill -9`s; ids stay unique across tables.

mod support;

use std::time::Duration;

use support::faults::{Chaos, Sampler, Workload, stored_after_clean_stop, verdict};
use support::*;

const SLOT: &str = "outbox_cdc";

/// Three tables of different shapes, the publication, and a function that writes into all three
/// in one transaction: `n` rows each, interleaved.
fn schema(prefix: &str) -> String {
    format!(
        r#"
        CREATE SCHEMA billing;
        CREATE TABLE billing.invoice_outbox (
            event_id   text PRIMARY KEY,
            kind       text NOT NULL,
            customer   text NOT NULL,
            body       jsonb NOT NULL,
            meta       jsonb
        );
        CREATE TABLE shipment_events (
            seq    bigserial PRIMARY KEY,
            topic  text NOT NULL,
            data   bytea NOT NULL
        );
        ALTER PUBLICATION outbox_pub ADD TABLE billing.invoice_outbox, shipment_events;
        CREATE FUNCTION write_three(w text, n int) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            FOR g IN 1..n LOOP
                INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                VALUES ('order', w || '-' || g, 'created', jsonb_build_object('n', g));
                INSERT INTO billing.invoice_outbox (event_id, kind, customer, body, meta)
                VALUES (gen_random_uuid()::text, 'issued', w, jsonb_build_object('n', g),
                        jsonb_build_object('tenant', w));
                INSERT INTO shipment_events (topic, data)
                VALUES ('{prefix}.shipping.packed', decode('00ff' || lpad(to_hex(g), 4, '0'), 'hex'));
            END LOOP;
        END $$;
        "#
    )
}

/// The config file: the flags map `outbox`; the other two tables their own way.
fn config(prefix: &str) -> String {
    format!(
        r#"
        [tables."billing.invoice_outbox"]
        id_column = "event_id"
        payload_column = "body"
        headers_column = "meta"
        subject_template = "{prefix}.billing.{{kind}}"

        [tables.shipment_events]
        id_column = "seq"
        payload_column = "data"
        subject_column = "topic"
        "#
    )
}

/// Every committed insert of the three tables, in commit order, with its id as outbox-cdc
/// qualifies it (`schema.table:<id>`).
async fn oracle_rows(oracle: &Oracle, env: &TestEnv) -> Vec<CommittedRow> {
    oracle
        .committed(env, |data| {
            let quoted = |after: &str| {
                let (_, rest) = data.split_once(after)?;
                rest.split_once('\'').map(|(v, _)| v.to_owned())
            };
            if data.starts_with("table public.outbox: INSERT:") {
                return quoted("id[uuid]:'").map(|id| format!("public.outbox:{id}"));
            }
            if data.starts_with("table billing.invoice_outbox: INSERT:") {
                return quoted("event_id[text]:'").map(|id| format!("billing.invoice_outbox:{id}"));
            }
            if data.starts_with("table public.shipment_events: INSERT:") {
                let (_, rest) = data.split_once("seq[bigint]:")?;
                let seq: String = rest.chars().take_while(char::is_ascii_digit).collect();
                return Some(format!("public.shipment_events:{seq}"));
            }
            None
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tables_mapped_their_own_ways_keep_one_commit_order_through_kill_9() {
    let total: u64 = env_or("OUTBOX_CDC_MULTI_TABLE_EVENTS", 6_000);
    let env = TestEnv::start().await;
    let p = env.subject_prefix.clone();
    env.sql()
        .await
        .batch_execute(&schema(&p))
        .await
        .expect("the three tables");
    env.create_stream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("outbox-cdc.toml");
    std::fs::write(&file, config(&p)).expect("config file");
    let file = file.to_string_lossy().into_owned();
    let args = ["--config", file.as_str()];
    let oracle = env.oracle().await;
    let mut publisher = env.publisher(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sampler = Sampler::start(&env, SLOT);
    // Each transaction: 1 to 5 rows in each table (the workload counts per call's `n`).
    let writers = Workload::start_with(
        &env,
        "SELECT write_three($1::text, $2::int)",
        "w",
        2,
        total / 3,
        5,
        Duration::from_millis(1),
    );
    let mut chaos = Chaos::new();
    for round in 1..=3 {
        writers.wait_written(total / 3 * round / 4).await;
        tokio::time::sleep(chaos.between(Duration::ZERO, Duration::from_millis(300))).await;
        publisher.kill9();
        publisher = env.publisher(&args);
        publisher
            .wait_for_log("this instance is the leader", Duration::from_secs(60))
            .await;
    }
    writers.finish(false).await;
    let committed = oracle_rows(&oracle, &env).await;
    let (stream, _) = stored_after_clean_stop(&env, &mut publisher, committed.len()).await;
    let samples = sampler.finish().await;
    verdict(
        "three tables, one slot, kill -9 x3",
        3,
        &[],
        &stream,
        &committed,
        &samples,
    );
    // Each table's own mapping.
    let of = |table: &'static str| {
        stream
            .iter()
            .filter(move |m| header(m, "Outbox-Table") == Some(table))
    };
    assert!(of("public.outbox").all(|m| m.subject == format!("{p}.order.created")));
    let invoices: Vec<&Received> = of("billing.invoice_outbox").collect();
    assert!(!invoices.is_empty());
    for m in &invoices {
        assert_eq!(m.subject, format!("{p}.billing.issued"));
        assert!(header(m, "tenant").is_some(), "its headers column: {m:?}");
        assert!(
            String::from_utf8_lossy(&m.payload).starts_with("{\"n\":"),
            "{m:?}"
        );
    }
    let shipments: Vec<&Received> = of("public.shipment_events").collect();
    assert!(!shipments.is_empty());
    for m in &shipments {
        assert_eq!(m.subject, format!("{p}.shipping.packed"));
        assert_eq!(&m.payload[..2], [0x00, 0xff], "bytea as bytes: {m:?}");
    }
    assert_eq!(
        invoices.len() + shipments.len() + of("public.outbox").count(),
        stream.len()
    );
}

/// A section for a table the publication does not publish is a mistake, said at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_section_naming_no_table_of_the_publication_stops_at_start() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("outbox-cdc.toml");
    std::fs::write(&file, "[tables.invoice_outbx]\nid_column = \"x\"\n").expect("file");
    let file = file.to_string_lossy().into_owned();
    let mut publisher = env.publisher(&["--config", &file]);
    let status = publisher.wait_exit(Duration::from_secs(60)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(
        log.contains("[tables.\"invoice_outbx\"]") && log.contains("public.outbox"),
        "{log}"
    );
}

/// A section's `stream`: the table's events (and its dead letters) go to a stream of their own,
/// created at start like `--stream`'s; the other tables' to the streams that capture theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_section_sends_its_events_to_a_stream_of_its_own() {
    let env = TestEnv::start().await;
    let p = env.subject_prefix.clone();
    env.sql()
        .await
        .batch_execute(&schema(&p))
        .await
        .expect("the three tables");
    let js = env.jetstream().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{p}.order.>"), format!("{p}.shipping.>")],
        ..Default::default()
    })
    .await
    .expect("the other tables' stream");
    let billing = format!("{}_BILLING", env.stream);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("outbox-cdc.toml");
    std::fs::write(
        &file,
        format!(
            r#"
            [tables."billing.invoice_outbox"]
            id_column = "event_id"
            payload_column = "body"
            subject_template = "{p}.billing.{{kind}}"
            stream = "{billing}"

            [tables.shipment_events]
            id_column = "seq"
            payload_column = "data"
            subject_column = "topic"
            "#
        ),
    )
    .expect("config file");
    let file = file.to_string_lossy().into_owned();
    let publisher = env.publisher(&["--config", &file]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sql = env.sql().await;
    for _ in 0..5 {
        sql.execute("SELECT write_three('w', 3)", &[])
            .await
            .expect("write");
    }
    wait_for_messages(&js, &billing, 15, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    wait_for_messages(&js, &env.stream, 30, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let own = read_stream(&js, &billing).await;
    assert!(
        own.iter()
            .all(|m| header(m, "Outbox-Table") == Some("billing.invoice_outbox")),
        "{own:?}"
    );
    let rest = read_stream(&js, &env.stream).await;
    assert!(
        rest.iter()
            .all(|m| header(m, "Outbox-Table") != Some("billing.invoice_outbox")),
        "{rest:?}"
    );
    assert_eq!((own.len(), rest.len()), (15, 30));
}
