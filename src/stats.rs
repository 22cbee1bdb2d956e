//! Counters and gauges the pipeline updates on its hot path (relaxed atomics, no locks).
//! They are logged at shutdown and are what `/metrics` will expose.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::source::pgoutput::SkippedKind;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    /// Events JetStream stored.
    pub published: Counter,
    /// Events JetStream already had (re-sent after a restart), acked as duplicates.
    pub duplicates: Counter,
    pub transactions: Counter,
    pub reconnects: Counter,
    pub skipped_update: Counter,
    pub skipped_delete: Counter,
    pub skipped_truncate: Counter,
    pub skipped_other: Counter,
    pub confirmed_lsn: Gauge,
    pub last_acked_commit_lsn: Gauge,
    pub server_wal_end: Gauge,
}

impl Stats {
    pub fn skipped(&self, kind: SkippedKind) {
        match kind {
            SkippedKind::Update => self.skipped_update.inc(),
            SkippedKind::Delete => self.skipped_delete.inc(),
            SkippedKind::Truncate => self.skipped_truncate.inc(),
            _ => self.skipped_other.inc(),
        }
    }
}
