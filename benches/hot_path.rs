//! Micro-benchmarks of the per-event hot path, without servers: decoding a pgoutput Insert,
//! mapping the row to a message and naming the row (the `EventRef` that travels with the
//! publish), the LSN watermark, and the sink's fencing (the stream of the subject, the expected
//! predecessor).
//!
//! `cargo bench --bench hot_path` reports time per event (Criterion) and, first, allocations per
//! event, counted by a global allocator wrapper over a fixed number of iterations.
//!
//! With `OUTBOX_CDC_HOT_PATH_EVENTS=N` it skips Criterion and runs the whole per-event path N
//! times — decode, map, event reference, the sink's fencing and expectation header, the
//! watermark — for an instruction count that does not depend on the machine's load:
//! `valgrind --tool=callgrind` at two values of N, the difference divided by the difference of N
//! is instructions per event (docs/benchmarks.md, *Build profiles*).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group};
use outbox_cdc::Lsn;
use outbox_cdc::event::{EventRef, OutboxEvent};
use outbox_cdc::pipeline::Watermark;
use outbox_cdc::pipeline::mapping::{MappingConfig, TableMapping, TransactionContext, WalRow};
use outbox_cdc::sink::Fence;
use outbox_cdc::sink::fence::{StoredEvent, StreamSummary};
use outbox_cdc::source::pgoutput::{self, Message, encode};

/// Counts allocations and the bytes they ask for (not frees): what "allocations per event" and
/// "bytes per event" mean below.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(
            new_size.saturating_sub(layout.size()) as u64,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Allocations and allocated bytes per call of `f`, averaged over many calls.
fn allocations_per_call(mut f: impl FnMut()) -> (f64, f64) {
    const CALLS: u64 = 10_000;
    f();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let bytes_before = ALLOCATED_BYTES.load(Ordering::Relaxed);
    for _ in 0..CALLS {
        f();
    }
    (
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / CALLS as f64,
        (ALLOCATED_BYTES.load(Ordering::Relaxed) - bytes_before) as f64 / CALLS as f64,
    )
}

fn print_allocations(what: &str, (allocations, bytes): (f64, f64)) {
    println!("  {what:<28} {allocations:>6.2} {bytes:>8.0}");
}

const RELATION_ID: u32 = 16_384;

/// The recommended outbox table's columns (sql/outbox.sql) with their type OIDs.
fn relation_frame() -> Vec<u8> {
    encode::relation(
        RELATION_ID,
        "public",
        "outbox",
        &[
            ("id", 2950),
            ("aggregate_type", 25),
            ("aggregate_id", 25),
            ("event_type", 25),
            ("payload", 3802),
            ("headers", 3802),
            ("created_at", 1184),
        ],
    )
}

/// A row like the ones the end-to-end benchmark writes.
fn insert_frame() -> Bytes {
    Bytes::from(encode::insert(
        RELATION_ID,
        &[
            Some(b"0b9f6a52-3f4c-4c39-9a53-7c1b2f0e8d11"),
            Some(b"order"),
            Some(b"bench-12345"),
            Some(b"created"),
            Some(br#"{"n": 12345, "writer": "bench", "items": [{"sku": "A-1", "qty": 2}], "total": "19.90"}"#),
            Some(br#"{"writer": "bench"}"#),
            Some(b"2026-11-23 10:00:00.123456+00"),
        ],
    ))
}

fn bound_mapping() -> TableMapping {
    let relation = relation_frame();
    let Ok(Message::Relation(relation)) = pgoutput::decode(&relation) else {
        panic!("the relation frame decodes");
    };
    TableMapping::bind(&MappingConfig::default(), &relation, false).expect("the mapping binds")
}

fn decode(frame: &Bytes) -> usize {
    match pgoutput::decode(frame) {
        Ok(Message::Insert(insert)) => insert.tuple.len(),
        _ => panic!("the insert frame decodes"),
    }
}

fn map(mapping: &TableMapping, frame: &Bytes, txn: &TransactionContext) -> (OutboxEvent, EventRef) {
    let Ok(Message::Insert(insert)) = pgoutput::decode(frame) else {
        panic!("the insert frame decodes");
    };
    let row = WalRow {
        tuple: insert.tuple,
        frame,
    };
    let event = mapping.map(&row, txn, 0).expect("the row maps");
    let reference = mapping.event_ref(&event, txn.commit_lsn, 0);
    (event, reference)
}

/// The watermark's work for one 100-row transaction: begin, 100 publishes, commit, 100 acks.
fn watermark_transaction(watermark: &mut Watermark, commit: &mut u64) {
    watermark.begin();
    for _ in 0..100 {
        watermark.published();
    }
    *commit += 1_000;
    watermark.commit(Lsn::new(*commit), Lsn::new(*commit + 8));
    for _ in 0..100 {
        black_box(watermark.acked());
    }
}

/// The streams of an account like the benchmark's: the checkpoint bucket, the outbox (holding
/// events from before the session), a dead letter stream.
fn fence() -> Fence {
    let stream = |name: &str, subject: &str, last: Option<StoredEvent>| StreamSummary {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        last,
        last_sequence: 1000,
        allow_atomic: false,
    };
    Fence::new([
        stream("KV_outbox_cdc", "$KV.outbox_cdc.>", None),
        stream(
            "OUTBOX",
            "outbox.>",
            Some(StoredEvent {
                msg_id: Some("6c0f10a3-44c1-4a5b-9a3e-0d4c1b2a3f4e".to_owned()),
                commit_lsn: Some(Lsn::new(0x16_0000_0000)),
                row_index: Some(99),
                commit_time: None,
            }),
        ),
        stream("DEAD", "dead.outbox", None),
    ])
}

const SUBJECT: &str = "outbox.order.created";

/// What fencing adds before a publish: the subject's stream, whether the stream held the event
/// already, and a copy of the predecessor's id for the expectation header. (Recording the
/// publish afterwards moves the event's own id.)
fn fence_expectation(fence: &mut Fence, event: &EventRef) -> Option<async_nats::HeaderValue> {
    let stream = fence.stream_of(SUBJECT)?;
    if fence.already_stored(stream, event) {
        return None;
    }
    fence.expected_last(stream).cloned()
}

fn hot_path(c: &mut Criterion) {
    let frame = insert_frame();
    let mapping = bound_mapping();
    let txn = TransactionContext::new(Lsn::new(0x16_B374_D848), 817_000_000_000_000);

    let mut watermark = Watermark::new(Lsn::new(0));
    let mut commit = 0;
    println!("per event                    allocations    bytes");
    print_allocations(
        "decode insert",
        allocations_per_call(|| {
            black_box(decode(&frame));
        }),
    );
    print_allocations(
        "decode + map + event ref",
        allocations_per_call(|| {
            black_box(map(&mapping, &frame, &txn));
        }),
    );
    // An event after the stream's last one, as in a running session.
    let (_, reference) = map(&mapping, &frame, &txn);
    let mut fenced = fence();
    let stream = fenced
        .stream_of(SUBJECT)
        .expect("a stream captures the subject");
    fenced.sent(
        stream,
        "0b9f6a52-3f4c-4c39-9a53-7c1b2f0e8d11".parse().expect("id"),
    );
    print_allocations(
        "fence expectation",
        allocations_per_call(|| {
            black_box(fence_expectation(&mut fenced, &reference));
        }),
    );
    let (allocations, bytes) =
        allocations_per_call(|| watermark_transaction(&mut watermark, &mut commit));
    print_allocations("watermark", (allocations / 100.0, bytes / 100.0));

    let mut group = c.benchmark_group("per_event");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_insert", |b| b.iter(|| decode(black_box(&frame))));
    group.bench_function("decode_map", |b| {
        b.iter(|| map(&mapping, black_box(&frame), &txn))
    });
    group.bench_function("fence_expectation", |b| {
        b.iter(|| fence_expectation(black_box(&mut fenced), &reference))
    });
    group.finish();

    let mut group = c.benchmark_group("per_transaction_of_100");
    group.throughput(Throughput::Elements(100));
    group.bench_function("watermark", |b| {
        b.iter(|| watermark_transaction(&mut watermark, &mut commit))
    });
    group.finish();
}

/// One event from the WAL to the moment the sink hands it to the NATS client, as
/// `JetStreamSink::publish` prepares it: mapped, named, checked against its stream's last event,
/// the predecessor's id in the expectation header, then recorded as the next predecessor.
fn publish_prep(
    mapping: &TableMapping,
    frame: &Bytes,
    txn: &TransactionContext,
    fence: &mut Fence,
) -> OutboxEvent {
    let (mut event, reference) = map(mapping, frame, txn);
    let stream = fence
        .stream_of(event.subject.as_str())
        .expect("a stream captures the subject");
    assert!(!fence.already_stored(stream, &reference));
    if let Some(previous) = fence.expected_last(stream) {
        event.headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
            previous.clone(),
        );
    }
    fence.sent(stream, event.id.clone());
    event
}

/// `events` events in 100-row transactions through [`publish_prep`] and the watermark.
fn fixed_events(events: u64) {
    let frame = insert_frame();
    let mapping = bound_mapping();
    let txn = TransactionContext::new(Lsn::new(0x16_B374_D848), 817_000_000_000_000);
    let mut fence = fence();
    let mut watermark = Watermark::new(Lsn::new(0));
    let mut commit = 0;
    let mut done = 0;
    while done < events {
        let rows = (events - done).min(100);
        watermark.begin();
        for _ in 0..rows {
            black_box(publish_prep(&mapping, black_box(&frame), &txn, &mut fence));
            watermark.published();
        }
        commit += 1_000;
        watermark.commit(Lsn::new(commit), Lsn::new(commit + 8));
        for _ in 0..rows {
            black_box(watermark.acked());
        }
        done += rows;
    }
    println!("{events} events through the hot path");
}

criterion_group!(benches, hot_path);

fn main() {
    if let Ok(events) = std::env::var("OUTBOX_CDC_HOT_PATH_EVENTS") {
        fixed_events(
            events
                .parse()
                .expect("OUTBOX_CDC_HOT_PATH_EVENTS is a number"),
        );
        return;
    }
    // What `criterion_main!` expands to.
    benches();
    Criterion::default().configure_from_args().final_summary();
}
