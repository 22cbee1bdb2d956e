//! Would JetStream fast batch publishing pay for outbox-cdc? A probe, not a feature benchmark.
//!
//! `OUTBOX_CDC_NATS_SERVER=.venv-nats/bin/nats-server cargo bench --bench fast_batch` publishes the
//! the same messages (headers like outbox-cdc's and a 300-byte body, built before the clock
//! starts) into a file-storage stream on a throwaway nats-server ≥ 2.14 (a new one per run),
//! four ways:
//! - **per message**, as `sink::acks` does it: a reply subject of our own per publish, one
//!   wildcard subscription for the acks, a window of 4096;
//! - **fast batch** (stream option `allow_batched`): the reply subject
//!   `<inbox>.<flow>.fail.<batch sequence>.<operation>.$FI` carries the batch protocol, the server
//!   acks every `flow` messages, the publisher stalls once `flow × 4` are unacked;
//!
//! each with and without `Nats-Expected-Last-Msg-Id` (outbox-cdc's fencing, on by default), in
//! interleaved rounds. It prints msgs/s and nats-server's CPU seconds per round and the medians,
//! and checks that the stream holds every message once (and, for a batch, that its final ack
//! counts them all). It skips, saying so, on an older server.
//!
//! First it checks, and prints, what outbox-cdc would rely on inside a batch: `Nats-Msg-Id`
//! de-duplication, a wrong `Nats-Expected-Last-Msg-Id` refused, and a hole ending the batch with
//! nothing after it stored.
//!
//! - `OUTBOX_CDC_FB_MESSAGES` (default 300000): messages per run;
//! - `OUTBOX_CDC_FB_ROUNDS` (default 3): interleaved rounds;
//! - `OUTBOX_CDC_FB_FLOW` (default 1000): the ack cadence asked of the server.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use outbox_cdc::embedded::EmbeddedNats;
use support::{cpu_seconds, env_or};

const WINDOW: u64 = 4096;
const OUTSTANDING_ACKS: u64 = 4;
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq)]
enum Way {
    PerMessage,
    FastBatch,
}

struct Message {
    subject: String,
    headers: HeaderMap,
    reply: String,
}

/// The messages of one run, with their reply subjects, so that only publishing is timed.
fn messages(run: &str, n: u64, way: Way, fenced: bool, flow: u64) -> Vec<Message> {
    let id = |i: u64| format!("{run}-0/1A2B3C4D:{i}");
    (0..n)
        .map(|i| {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id(i).as_str());
            if fenced && i > 0 {
                headers.insert("Nats-Expected-Last-Msg-Id", id(i - 1).as_str());
            }
            headers.insert("Outbox-Event-Type", "created");
            headers.insert(
                "Outbox-Aggregate-Id",
                "4f6c2c1e-8a43-4d0b-9a57-0d4b3f0c9e21",
            );
            headers.insert("Outbox-Commit-Lsn", "0/1A2B3C4D");
            headers.insert("Outbox-Commit-Time", "2026-12-01T21:00:00.123456Z");
            let reply = match way {
                Way::PerMessage => format!("_INBOX.{run}.{i}"),
                Way::FastBatch => {
                    let sequence = i + 1;
                    let operation = match sequence {
                        1 => 0,           // start
                        s if s == n => 2, // commit with this message
                        _ => 1,           // add
                    };
                    format!("_INBOX.{run}.{flow}.fail.{sequence}.{operation}.$FI")
                }
            };
            Message {
                subject: format!("fb.{run}.order.created"),
                headers,
                reply,
            }
        })
        .collect()
}

async fn create_stream(client: &Client, run: &str, batched: bool) {
    // async-nats 0.51's stream config has no `allow_batched`: the API request by hand.
    let config = serde_json::json!({
        "name": run.to_uppercase(),
        "subjects": [format!("fb.{run}.>")],
        "storage": "file",
        "duplicate_window": 600_000_000_000u64,
        "allow_batched": batched,
    });
    let answer = client
        .request(
            format!("$JS.API.STREAM.CREATE.{}", run.to_uppercase()),
            config.to_string().into(),
        )
        .await
        .expect("create stream");
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).expect("JSON");
    assert!(answer["error"].is_null(), "create stream: {answer}");
}

async fn stream_messages(client: &Client, run: &str) -> u64 {
    let answer = client
        .request(
            format!("$JS.API.STREAM.INFO.{}", run.to_uppercase()),
            "".into(),
        )
        .await
        .expect("stream info");
    let info: serde_json::Value = serde_json::from_slice(&answer.payload).expect("JSON");
    info["state"]["messages"].as_u64().expect("messages")
}

/// The next ack frame's JSON, failing the run on a timeout.
async fn next_frame(acks: &mut async_nats::Subscriber) -> serde_json::Value {
    let message = tokio::time::timeout(ACK_TIMEOUT, acks.next())
        .await
        .expect("an ack within 10 s")
        .expect("subscription open");
    serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
        panic!(
            "ack frame: {:?} {:?}",
            message.status,
            String::from_utf8_lossy(&message.payload)
        )
    })
}

async fn publish(client: &Client, message: Message, body: &Bytes) {
    client
        .publish_with_reply_and_headers(
            message.subject,
            message.reply,
            message.headers,
            body.clone(),
        )
        .await
        .expect("publish");
}

async fn per_message(client: &Client, run: &str, messages: Vec<Message>, body: &Bytes) {
    let n = messages.len() as u64;
    let mut acks = client
        .subscribe(format!("_INBOX.{run}.>"))
        .await
        .expect("subscribe");
    let (mut sent, mut acked) = (0u64, 0u64);
    for message in messages {
        publish(client, message, body).await;
        sent += 1;
        while sent - acked > WINDOW {
            let ack = next_frame(&mut acks).await;
            assert!(ack["error"].is_null(), "refused: {ack}");
            acked += 1;
        }
    }
    while acked < n {
        let ack = next_frame(&mut acks).await;
        assert!(ack["error"].is_null(), "refused: {ack}");
        acked += 1;
    }
}

/// What the server has said about a fast batch so far.
struct BatchAcks {
    /// The server answered the start (its first ack, which persists nothing yet).
    started: bool,
    /// Every batch sequence up to this one is stored (gap mode `fail`).
    persisted: u64,
    /// The ack cadence; the server may lower it.
    flow: u64,
}

impl BatchAcks {
    /// Takes in one frame; the final ack's message count once the batch has ended.
    fn apply(&mut self, frame: &serde_json::Value) -> Option<u64> {
        match frame["type"].as_str() {
            Some("ack") => {
                self.started = true;
                self.persisted = frame["seq"].as_u64().expect("seq");
                self.flow = frame["msgs"].as_u64().unwrap_or(self.flow);
                None
            }
            Some(other) => panic!("batch frame {other}: {frame}"),
            None => {
                assert!(frame["error"].is_null(), "batch failed: {frame}");
                Some(frame["count"].as_u64().expect("count"))
            }
        }
    }
}

async fn fast_batch(client: &Client, run: &str, messages: Vec<Message>, body: &Bytes, flow: u64) {
    let n = messages.len() as u64;
    let mut acks = client
        .subscribe(format!("_INBOX.{run}.>"))
        .await
        .expect("subscribe");
    let mut state = BatchAcks {
        started: false,
        persisted: 0,
        flow,
    };
    for (i, message) in messages.into_iter().enumerate() {
        let sequence = i as u64 + 1;
        publish(client, message, body).await;
        if sequence == n {
            break;
        }
        // The start is answered before more goes out; then at most `flow × 4` unacked.
        while !state.started || state.persisted + state.flow * OUTSTANDING_ACKS < sequence {
            let frame = next_frame(&mut acks).await;
            assert!(
                state.apply(&frame).is_none(),
                "the batch ended early: {frame}"
            );
        }
    }
    client.flush().await.expect("flush");
    loop {
        let frame = next_frame(&mut acks).await;
        if let Some(count) = state.apply(&frame) {
            assert_eq!(count, n, "the batch's final ack counts every message");
            return;
        }
    }
}

/// Publishes `(batch sequence, operation, message id, expected predecessor)` into one fast batch
/// and returns every frame the server answers with, until 2 s pass without one.
async fn raw_batch(
    client: &Client,
    run: &str,
    batch: &str,
    messages: &[(u64, u8, &str, Option<&str>)],
) -> Vec<serde_json::Value> {
    let inbox = format!("_INBOX.{batch}");
    let mut acks = client
        .subscribe(format!("{inbox}.>"))
        .await
        .expect("subscribe");
    let mut frames = Vec::new();
    for &(sequence, operation, id, expected) in messages {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        if let Some(expected) = expected {
            headers.insert("Nats-Expected-Last-Msg-Id", expected);
        }
        let reply = format!("{inbox}.1.fail.{sequence}.{operation}.$FI");
        client
            .publish_with_reply_and_headers(format!("fb.{run}.x"), reply, headers, "x".into())
            .await
            .expect("publish");
        if operation == 0 {
            frames.push(next_frame(&mut acks).await);
        }
    }
    client.flush().await.expect("flush");
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), acks.next()).await {
        frames.push(serde_json::from_slice(&m.payload).unwrap_or_default());
    }
    frames
}

/// What outbox-cdc would rely on inside a batch, asserted and printed.
async fn semantics(client: &Client) {
    let run = "semantics";
    create_stream(client, run, true).await;
    let ids: Vec<String> = (0..8).map(|i| format!("e{i}")).collect();
    let batch = |from: usize, to: usize| -> Vec<(u64, u8, &str, Option<&str>)> {
        (from..to)
            .enumerate()
            .map(|(k, i)| {
                let operation = match k {
                    0 => 0,
                    k if k + 1 == to - from => 2,
                    _ => 1,
                };
                (k as u64 + 1, operation, ids[i].as_str(), None)
            })
            .collect()
    };
    raw_batch(client, run, "dedup1", &batch(0, 4)).await;
    raw_batch(client, run, "dedup2", &batch(2, 6)).await;
    let stored = stream_messages(client, run).await;
    assert_eq!(
        stored, 6,
        "a batch re-sending e2 and e3 stores only e4 and e5"
    );
    println!("inside a batch: re-sent Nats-Msg-Ids are dropped as duplicates (6 of 8 stored)");

    let frames = raw_batch(
        client,
        run,
        "fence",
        &[(1, 0, "f1", Some("e5")), (2, 2, "f2", Some("wrong"))],
    )
    .await;
    assert!(
        frames
            .iter()
            .any(|f| f["error"]["err_code"].as_u64() == Some(10070)),
        "a wrong predecessor is refused: {frames:?}"
    );
    assert_eq!(
        stream_messages(client, run).await,
        7,
        "f1 stored, f2 refused"
    );
    println!("inside a batch: a wrong Nats-Expected-Last-Msg-Id is refused (10070)");

    let frames = raw_batch(
        client,
        run,
        "hole",
        &[
            (1, 0, "h1", None),
            (2, 1, "h2", None),
            (4, 1, "h4", None),
            (5, 2, "h5", None),
        ],
    )
    .await;
    assert!(
        frames.iter().any(|f| f["type"] == "gap"),
        "the hole is reported: {frames:?}"
    );
    assert_eq!(
        stream_messages(client, run).await,
        9,
        "h1 and h2 stored, nothing after the hole: {frames:?}"
    );
    println!("inside a batch: a hole ends the batch; nothing after it is stored\n");
}

struct Round {
    way: Way,
    fenced: bool,
    rate: f64,
    server_cpu: f64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = env_or("OUTBOX_CDC_FB_MESSAGES", 300_000);
    let rounds: usize = env_or("OUTBOX_CDC_FB_ROUNDS", 3);
    let flow: u64 = env_or("OUTBOX_CDC_FB_FLOW", 1000);
    let body = Bytes::from(vec![b'x'; 300]);
    let mut results = Vec::new();
    let mut version = String::new();
    {
        let nats = EmbeddedNats::start().expect("start nats-server");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        if !supports_fast_batch(&client.server_info().version) {
            println!(
                "fast batch publishing needs nats-server ≥ 2.14; this is {}: skipped \
                 (set OUTBOX_CDC_NATS_SERVER, e.g. to .venv-nats/bin/nats-server)",
                client.server_info().version
            );
            return;
        }
        semantics(&client).await;
    }
    for round in 0..rounds {
        for way in [Way::PerMessage, Way::FastBatch] {
            for fenced in [true, false] {
                // A fresh server per run: equal store sizes, no leftover state.
                let nats = EmbeddedNats::start().expect("start nats-server");
                let pid = nats.pid().expect("pid");
                let client = async_nats::connect(nats.url()).await.expect("connect");
                version = client.server_info().version;
                let run = format!("r{round}{}{}", way as u8, u8::from(fenced));
                create_stream(&client, &run, way == Way::FastBatch).await;
                let messages = messages(&run, n, way, fenced, flow);
                let cpu_before = cpu_seconds(pid).expect("nats-server CPU");
                let started = Instant::now();
                match way {
                    Way::PerMessage => per_message(&client, &run, messages, &body).await,
                    Way::FastBatch => fast_batch(&client, &run, messages, &body, flow).await,
                }
                let elapsed = started.elapsed().as_secs_f64();
                let server_cpu = cpu_seconds(pid).expect("nats-server CPU") - cpu_before;
                assert_eq!(stream_messages(&client, &run).await, n, "each message once");
                let rate = n as f64 / elapsed;
                println!(
                    "round {round}: {:<11} fenced={fenced:<5} {rate:>9.0} msgs/s  nats-server {server_cpu:.2} CPU-s",
                    name(way)
                );
                results.push(Round {
                    way,
                    fenced,
                    rate,
                    server_cpu,
                });
            }
        }
    }
    println!("\nnats-server {version}, {n} messages per run, flow {flow}, medians of {rounds}:");
    println!("| publishes | fenced | msgs/s | nats-server CPU-s |\n|---|---|---|---|");
    for way in [Way::PerMessage, Way::FastBatch] {
        for fenced in [true, false] {
            let of = |f: fn(&Round) -> f64| {
                let mut v: Vec<f64> = results
                    .iter()
                    .filter(|r| r.way == way && r.fenced == fenced)
                    .map(f)
                    .collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "| {} | {} | {:.0} | {:.2} |",
                name(way),
                if fenced { "yes" } else { "no" },
                of(|r| r.rate),
                of(|r| r.server_cpu)
            );
        }
    }
}

fn supports_fast_batch(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    matches!((parts.next(), parts.next()), (Some(Some(major)), Some(Some(minor))) if (major, minor) >= (2, 14))
}

fn name(way: Way) -> &'static str {
    match way {
        Way::PerMessage => "per message",
        Way::FastBatch => "fast batch",
    }
}
