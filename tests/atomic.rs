//! `--atomic-transactions`: each transaction is one atomic JetStream batch, so a consumer never
//! sees part of one — not even when the publisher is killed in the middle of a batch; a
//! transaction that cannot be one batch goes out event by event, in order, counted; and a server
//! or stream that cannot take batches is refused at start, with what to change.
//! (Atomic batches need nats-server 2.12+; on older servers only the refusal is tested.)

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use support::faults::{Chaos, Sampler, Workload, stored_after_clean_stop, verdict};
use support::*;

const SLOT: &str = "outbox_cdc";

/// Whether the test's NATS server takes atomic batches.
async fn takes_atomic_batches(js: &jetstream::Context) -> bool {
    let takes = js.client().is_server_compatible(2, 12, 0);
    if !takes {
        eprintln!(
            "skipped: nats-server {} has no atomic batch publish (2.12+)",
            js.client().server_info().version
        );
    }
    takes
}

async fn create_stream(env: &TestEnv, name: &str, subjects: &[String], atomic: bool) {
    env.jetstream()
        .await
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: subjects.to_vec(),
            duplicate_window: Duration::from_secs(600),
            allow_atomic_publish: atomic,
            ..Default::default()
        })
        .await
        .expect("create stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_or_stream_without_atomic_batches_is_refused_at_start() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    let subjects = [format!("{}.>", env.subject_prefix)];
    create_stream(&env, &env.stream, &subjects, false).await;
    let mut publisher = env.publisher(&["--atomic-transactions"]);
    let status = publisher.wait_exit(Duration::from_secs(60)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    if js.client().is_server_compatible(2, 12, 0) {
        assert!(
            log.contains(&format!(
                "stream `{}` does not take atomic batches",
                env.stream
            )) && log.contains("allow_atomic"),
            "{log}"
        );
    } else {
        assert!(
            log.contains("needs nats-server 2.12 or newer"),
            "an older server stores a batch's messages one by one: {log}"
        );
    }
    let output = run_command(&[
        "run",
        "--atomic-transactions",
        "--no-fencing",
        "--database-url",
        &env.database_url,
    ]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "a conflict of flags is a usage error: {}",
        output_text(&output)
    );
    assert!(output_text(&output).contains("drop --no-fencing"));
}

/// Dead letters always go out one by one, so their own stream need not take atomic batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_stream_need_not_take_atomic_batches() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    if !takes_atomic_batches(&js).await {
        return;
    }
    let p = env.subject_prefix.clone();
    let dead = format!("dlq.{p}");
    let dead_stream = format!("{}_DLQ", env.stream);
    create_stream(&env, &env.stream, &[format!("{p}.>")], true).await;
    create_stream(&env, &dead_stream, std::slice::from_ref(&dead), false).await;
    let publisher = env.publisher(&[
        "--atomic-transactions",
        "--on-error",
        "dead-letter",
        "--dead-letter-subject",
        &dead,
    ]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let row = |id: &str, event_type: &str| {
        format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', '{id}', '{event_type}', '{{}}');"
        )
    };
    let sql = env.sql().await;
    for transaction in [
        format!(
            "{}{}{}",
            row("a", "created"),
            row("b", "bad type"),
            row("c", "created")
        ),
        format!("{}{}", row("d", "created"), row("e", "created")),
    ] {
        sql.batch_execute(&format!("BEGIN; {transaction} COMMIT;"))
            .await
            .expect("insert");
    }
    wait_for_messages(&js, &env.stream, 4, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    wait_for_messages(&js, &dead_stream, 1, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let text = wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    let count = |name: &str| metric(&text, name).unwrap_or(0.0);
    assert_eq!(count("outbox_cdc_atomic_batches_total"), 1.0, "{text}");
    assert_eq!(
        count("outbox_cdc_atomic_fallbacks_total{reason=\"dead_letter\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(stream_message_count(&js, &env.stream).await, 4);
    assert_eq!(stream_message_count(&js, &dead_stream).await, 1);
}

/// Per committed transaction (by the oracle): its events' ids in order.
fn transactions(committed: &[CommittedRow]) -> HashMap<&str, (u64, usize, usize)> {
    let mut sizes: HashMap<u64, usize> = HashMap::new();
    for row in committed {
        *sizes.entry(row.commit_end).or_default() += 1;
    }
    let mut position: HashMap<u64, usize> = HashMap::new();
    committed
        .iter()
        .map(|row| {
            let index = position.entry(row.commit_end).or_default();
            let at = *index;
            *index += 1;
            (
                row.id.as_str(),
                (row.commit_end, at, sizes[&row.commit_end]),
            )
        })
        .collect()
}

/// The id of the stream's last message, as a consumer reading to the end sees it: one request
/// (the last message on any subject), which the server answers either before or after a batch
/// it is storing. (Reading the stream's last sequence first and then that message can land in
/// the middle of a batch being stored.)
async fn last_stored_id(js: &jetstream::Context, stream: &str) -> Option<String> {
    let s = js.get_stream_no_info(stream).await.ok()?;
    let message = s.get_last_raw_message_by_subject(">").await.ok()?;
    message
        .headers
        .get("Nats-Msg-Id")
        .map(|v| v.as_str().to_owned())
}

/// Reads the stream's last message every 20 ms, as a consumer reading to the end would see
/// it, for as long as the faults last: each reading must be the last event of a transaction.
struct LastMessageSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl LastMessageSampler {
    fn start(env: &TestEnv) -> LastMessageSampler {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (url, stream) = (env.nats_url.clone(), env.stream.clone());
        let task = tokio::spawn(async move {
            let client = async_nats::connect(url).await.expect("sampler connects");
            let js = jetstream::new(client);
            let mut samples: Vec<String> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(id) = last_stored_id(&js, &stream).await
                    && samples.last() != Some(&id)
                {
                    samples.push(id);
                }
            }
            samples
        });
        LastMessageSampler { stop, task }
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("sampler")
    }
}

/// Every transaction of several events is in the stream as one atomic batch: its messages
/// carry one `Nats-Batch-Id`, and no other message does.
fn assert_whole_batches(stream: &[Received], committed: &[CommittedRow]) {
    let txns = transactions(committed);
    let mut batches: HashMap<u64, HashSet<Option<&str>>> = HashMap::new();
    for message in stream {
        let (commit, _, size) = txns[message.id.as_str()];
        if size > 1 {
            batches
                .entry(commit)
                .or_default()
                .insert(header(message, "Nats-Batch-Id"));
        }
    }
    let torn: Vec<_> = batches
        .iter()
        .filter(|(_, ids)| ids.len() != 1 || ids.contains(&None))
        .collect();
    assert!(
        torn.is_empty(),
        "transactions not stored as one batch (commit, batch ids): {torn:?}"
    );
}

/// Which of the instances leads (its /readyz says `leader`), waiting up to a minute.
async fn leader_of(instances: &[Publisher]) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        for (i, instance) in instances.iter().enumerate() {
            let addr = instance.http_addr().await;
            let (_, body) = tokio::task::spawn_blocking(move || http_get(&addr, "/readyz"))
                .await
                .expect("join");
            if body.trim() == "leader" {
                return i;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no instance became the leader:\n{}",
            instances
                .iter()
                .map(Publisher::log)
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The readings that ended inside a transaction: (reading, event of its transaction, size).
fn inside_a_transaction(
    samples: &[String],
    committed: &[CommittedRow],
) -> Vec<(String, usize, usize)> {
    let txns = transactions(committed);
    samples
        .iter()
        .filter_map(|id| {
            let (_, at, size) = txns
                .get(id.as_str())
                .unwrap_or_else(|| panic!("sampled {id}, which is no committed row"));
            (at + 1 != *size).then(|| (id.clone(), at + 1, *size))
        })
        .collect()
}

/// The guarantee of `--atomic-transactions` at every moment: a reader sampling the stream's end
/// while the publisher is killed (and, racing for the slot, a second instance takes over) never
/// sees it end inside a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_never_leaves_part_of_a_transaction_in_the_stream() {
    let total: u64 = env_or("OUTBOX_CDC_ATOMIC_EVENTS", 30_000);
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    if !takes_atomic_batches(&js).await {
        return;
    }
    create_stream(
        &env,
        &env.stream,
        &[format!("{}.>", env.subject_prefix)],
        true,
    )
    .await;
    let oracle = env.oracle().await;
    let args = ["--atomic-transactions", "--standby-retry", "100ms"];
    let publisher = env.publisher(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sampler = Sampler::start(&env, SLOT);
    let ends = LastMessageSampler::start(&env);
    // Transactions of 1 to 50 events: most of them batches, several in flight at any time.
    let writers = Workload::start(&env, "w", 2, total, 50, Duration::from_millis(1));
    let mut chaos = Chaos::new();
    // A second instance waits for the slot throughout; after each kill the two race for it,
    // and the killed one comes back.
    let mut instances = [publisher, env.publisher(&args)];
    let mut killed = Vec::new();
    for round in 1..=4 {
        writers.wait_written(total * round / 5).await;
        tokio::time::sleep(chaos.between(Duration::ZERO, Duration::from_millis(200))).await;
        let leader = leader_of(&instances).await;
        instances[leader].kill9();
        let dead = std::mem::replace(&mut instances[leader], env.publisher(&args));
        killed.push(dead);
        leader_of(&instances).await;
    }
    writers.finish(false).await;
    // One instance stops; the other finishes alone.
    let [mut publisher, mut standby] = instances;
    let status = standby.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", standby.log());
    leader_of(std::slice::from_ref(&publisher)).await;
    let committed = oracle.rows(&env).await;
    let (stream, text) = stored_after_clean_stop(&env, &mut publisher, committed.len()).await;
    assert!(
        metric(&text, "outbox_cdc_atomic_batches_total").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    let readings = ends.finish().await;
    let torn = inside_a_transaction(&readings, &committed);
    println!(
        "ATOMIC {} readings of the stream's end, {} inside a transaction",
        readings.len(),
        torn.len()
    );
    assert!(
        readings.len() >= 100,
        "too few readings to judge: {}",
        readings.len()
    );
    assert!(
        torn.is_empty(),
        "a reader saw the stream end inside a transaction (id, event, of size): {torn:?}"
    );
    // A batch the killed instance had sent, stored after the next session read the stream's
    // end, makes JetStream refuse that session's batch as a duplicate: it reads the stream
    // again, and never publishes the transaction event by event.
    let logs: Vec<String> = killed
        .iter()
        .chain([&publisher, &standby])
        .map(Publisher::log)
        .collect();
    let looked_again = logs
        .iter()
        .map(|log| log.matches("reading the stream's end again").count())
        .sum::<usize>();
    println!("ATOMIC batches refused as duplicates after a kill, looked for again: {looked_again}");
    for log in &logs {
        assert!(
            !log.contains("event by event") && !log.contains("a second time"),
            "{log}"
        );
    }
    assert_whole_batches(&stream, &committed);
    let samples = sampler.finish().await;
    verdict(
        "kill -9 x4 mid-batch, --atomic-transactions, a standby racing",
        4,
        &[],
        &stream,
        &committed,
        &samples,
    );
    // `verify` follows the chain through the batches: each first message names the sequence
    // before it, the others follow their batch.
    let output = run_command(&[
        "verify",
        "--stream",
        &env.stream,
        "--nats-url",
        &env.nats_url,
        "--database-url",
        &env.database_url,
    ]);
    let report = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert!(
        report.contains("every predecessor named is the message before"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_that_cannot_be_one_batch_go_out_event_by_event_in_order() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    if !takes_atomic_batches(&js).await {
        return;
    }
    let p = env.subject_prefix.clone();
    let dead = format!("{p}.dead");
    let invoices = format!("{}_INV", env.stream);
    create_stream(
        &env,
        &env.stream,
        &[format!("{p}.order.>"), dead.clone()],
        true,
    )
    .await;
    create_stream(&env, &invoices, &[format!("{p}.invoice.>")], true).await;
    let oracle = env.oracle().await;
    let publisher = env.publisher(&[
        "--atomic-transactions",
        "--atomic-max-batch",
        "10",
        "--on-error",
        "dead-letter",
        "--dead-letter-subject",
        &dead,
    ]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let orders = |n: usize, tag: &str| {
        format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', '{tag}-' || g, 'created', '{{}}' FROM generate_series(1, {n}) g;"
        )
    };
    let sql = env.sql().await;
    let transactions = [
        // One batch.
        orders(5, "a"),
        // Over --atomic-max-batch.
        orders(25, "b"),
        // Two streams.
        format!(
            "{} INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('invoice', 'c', 'sent', '{{}}');",
            orders(3, "c")
        ),
        // A poison row (whitespace in a subject token) among the rows: dead-lettered in its place.
        format!(
            "{} INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', 'd', 'bad type', '{{}}'); {}",
            orders(2, "d"),
            orders(1, "d2")
        ),
        // A row JetStream refuses (headers over 64 KiB) makes it refuse the whole batch: the
        // transaction goes again event by event, and the row is dead-lettered in its place.
        format!(
            "{} INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
             VALUES ('order', 'e', 'created', '{{}}', jsonb_build_object('x-big', repeat('v', 200000))); {}",
            orders(2, "e"),
            orders(1, "e2")
        ),
        // One batch again.
        orders(4, "f"),
    ];
    for sql_text in &transactions {
        sql.batch_execute(&format!("BEGIN; {sql_text} COMMIT;"))
            .await
            .unwrap_or_else(|e| panic!("{sql_text}: {e}"));
    }
    let committed = oracle.rows(&env).await;
    assert_eq!(committed.len(), 5 + 25 + 4 + 4 + 4 + 4);
    wait_for_messages(
        &js,
        &env.stream,
        committed.len() as u64 - 1,
        Duration::from_secs(60),
        || publisher.log(),
    )
    .await;
    let text = wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    let count = |name: &str| metric(&text, name).unwrap_or(0.0);
    let fallback = |reason: &str| {
        count(&format!(
            "outbox_cdc_atomic_fallbacks_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(count("outbox_cdc_atomic_batches_total"), 2.0, "{text}");
    assert_eq!(fallback("too_many_events"), 1.0, "{text}");
    assert_eq!(fallback("several_streams"), 1.0, "{text}");
    assert_eq!(fallback("dead_letter"), 1.0, "{text}");
    assert_eq!(fallback("refused"), 1.0, "{text}");
    let log = publisher.log();
    assert!(
        log.contains("not as one atomic batch")
            && log.contains("JetStream refused an atomic batch"),
        "{log}"
    );

    // Every event once, in commit order: the orders and dead letters in one stream, the
    // invoice in the other.
    let orders_stream = read_stream(&js, &env.stream).await;
    let invoice_stream = read_stream(&js, &invoices).await;
    assert_eq!(invoice_stream.len(), 1);
    let event_id = |m: &Received| -> String {
        header(m, "Outbox-Event-Id")
            .map(str::to_owned)
            .unwrap_or_else(|| m.id.clone())
    };
    let mut stored: Vec<String> = orders_stream.iter().map(event_id).collect();
    stored.extend(invoice_stream.iter().map(event_id));
    let position: HashMap<&str, usize> = committed
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut in_order: Vec<usize> = orders_stream
        .iter()
        .map(|m| {
            let id = event_id(m);
            *position
                .get(id.as_str())
                .unwrap_or_else(|| panic!("{id} is not a committed row"))
        })
        .collect();
    assert!(
        in_order.windows(2).all(|w| w[0] < w[1]),
        "out of commit order: {in_order:?}"
    );
    in_order.push(position[event_id(&invoice_stream[0]).as_str()]);
    in_order.sort_unstable();
    assert_eq!(
        in_order,
        (0..committed.len()).collect::<Vec<_>>(),
        "every event once"
    );
    let dead_letters: Vec<&str> = orders_stream
        .iter()
        .filter(|m| m.subject == dead)
        .filter_map(|m| header(m, "Outbox-Error-Kind"))
        .collect();
    assert_eq!(dead_letters, ["unmappable", "rejected"]);
}

/// An id twice in one transaction (a non-unique id column): JetStream refuses a batch holding
/// it twice, and one by one it would store the transaction's events one at a time. It goes out
/// as one batch, the repeated id once — what JetStream's de-duplication makes of it anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_twice_in_one_transaction_still_goes_out_as_one_batch() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    if !takes_atomic_batches(&js).await {
        return;
    }
    let subjects = [format!("{}.>", env.subject_prefix)];
    create_stream(&env, &env.stream, &subjects, true).await;
    let publisher = env.publisher(&["--atomic-transactions", "--id-column", "aggregate_id"]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    env.sql()
        .await
        .batch_execute(
            "BEGIN;
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', k, 'created', '{}' FROM unnest(ARRAY['a', 'b', 'a', 'c']) k;
             COMMIT;",
        )
        .await
        .expect("insert");
    wait_for_messages(&js, &env.stream, 3, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let text = wait_for_metric(&publisher, "outbox_cdc_in_flight", 0.0).await;
    let stream = read_stream(&js, &env.stream).await;
    let ids: Vec<&str> = stream.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"], "{}", publisher.log());
    let batch: HashSet<Option<&str>> = stream.iter().map(|m| header(m, "Nats-Batch-Id")).collect();
    assert_eq!(batch.len(), 1, "one batch: {batch:?}");
    assert!(!batch.contains(&None), "one batch: {batch:?}");
    assert_eq!(
        metric(&text, "outbox_cdc_atomic_batches_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "outbox_cdc_events_duplicate_total"),
        Some(1.0),
        "{text}"
    );
}
