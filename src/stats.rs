//! The process's counters and gauges, updated on the hot path with relaxed atomics and exposed
//! by the HTTP endpoint in Prometheus text format. No label carries a subject or an id: label
//! values are fixed sets, so the number of series is bounded.
//!
//! Every series of a labelled counter exists from the start, at 0: each label value comes from
//! its enum's `ALL` ([`SkipReason`], [`PoisonKind`] × [`PoisonAction`], [`Fallback`],
//! [`PublishErrorKind`]). Prometheus sees a counter's first increment only as a change from a
//! value it scraped before: a series born at 1 has no `increase()`, so an alert on the first
//! poison row of a kind — or on the one that stops the process right after it — would never
//! fire.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::pipeline::Fallback;
use crate::pipeline::poison::PoisonKind;
use crate::sink::PublishErrorKind;

type U64Gauge = Gauge<u64, AtomicU64>;
type Label = [(&'static str, &'static str); 1];

/// What this instance is doing, for `/readyz` and the `role` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Starting = 0,
    /// Streams from the slot.
    Leader = 1,
    /// Waits for the slot another instance holds.
    Standby = 2,
    /// PostgreSQL or NATS is unreachable; retrying with backoff.
    Reconnecting = 3,
}

impl Role {
    const ALL: [Role; 4] = [
        Role::Starting,
        Role::Leader,
        Role::Standby,
        Role::Reconnecting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Leader => "leader",
            Role::Standby => "standby",
            Role::Reconnecting => "reconnecting",
        }
    }
}

/// Why a change was not published: the `reason` label of `rows_skipped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Update,
    Delete,
    Truncate,
    /// Type, origin and logical messages, and tags the decoder does not know.
    Other,
    /// An insert of a transaction that committed before `--start-lsn` or the checkpoint.
    BeforeStartLsn,
    /// A message with a `--message-prefix` emitted outside a transaction.
    NonTransactionalMessage,
}

impl SkipReason {
    pub const ALL: [SkipReason; 6] = [
        SkipReason::Update,
        SkipReason::Delete,
        SkipReason::Truncate,
        SkipReason::Other,
        SkipReason::BeforeStartLsn,
        SkipReason::NonTransactionalMessage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Update => "update",
            SkipReason::Delete => "delete",
            SkipReason::Truncate => "truncate",
            SkipReason::Other => "other",
            SkipReason::BeforeStartLsn => "before_start_lsn",
            SkipReason::NonTransactionalMessage => "non_transactional_message",
        }
    }
}

/// The changes one transaction skipped, tallied while it is read and counted when it commits:
/// a session that reads it again (after a restart, or inside the replay window) must not count
/// them twice, and one that dies halfway through it must not count half.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SkippedChanges([u32; SkipReason::ALL.len()]);

impl SkippedChanges {
    pub fn add(&mut self, reason: SkipReason) {
        let n = &mut self.0[reason as usize];
        *n = n.saturating_add(1);
    }
}

/// What was done with a poison row: the `action` label of `poison_rows_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonAction {
    /// Published to the dead-letter subject in its place (`--on-error dead-letter`).
    DeadLetter,
    /// The process stopped at it (`--on-error fail`, or a dead letter JetStream refused).
    Fail,
}

impl PoisonAction {
    pub const ALL: [PoisonAction; 2] = [PoisonAction::DeadLetter, PoisonAction::Fail];

    pub fn as_str(self) -> &'static str {
        match self {
            PoisonAction::DeadLetter => "dead_letter",
            PoisonAction::Fail => "fail",
        }
    }
}

pub struct Stats {
    /// Events JetStream stored.
    pub published: Counter,
    /// Events JetStream already had (re-sent after a restart), acked as duplicates.
    pub duplicates: Counter,
    /// Events read again after a restart that their stream held already: not sent again.
    pub already_stored: Counter,
    /// Transactions published as one atomic batch (`--atomic-transactions`).
    pub atomic_batches: Counter,
    atomic_fallbacks: Family<Label, Counter>,
    pub transactions: Counter,
    pub reconnects: Counter,
    publish_errors: Family<Label, Counter>,
    skipped: Family<Label, Counter>,
    poison_rows: Family<[(&'static str, &'static str); 2], Counter>,
    pub in_flight: U64Gauge,
    pub confirmed_lsn: U64Gauge,
    pub last_acked_commit_lsn: U64Gauge,
    pub server_wal_end: U64Gauge,
    slot_lag_bytes: U64Gauge,
    /// Seconds from a transaction's commit to the ack of its last row.
    commit_to_ack: Histogram,
    role_gauges: Family<Label, U64Gauge>,
    role: AtomicU8,
    /// Unix milliseconds of the pipeline's last sign of life.
    heartbeat_ms: AtomicU64,
    /// `/metrics` reads answered, the Unix milliseconds of the last one, and the time between
    /// the last two.
    scrapes: AtomicU64,
    last_scrape_ms: AtomicU64,
    scrape_interval_ms: AtomicU64,
    registry: Registry,
}

impl Default for Stats {
    fn default() -> Self {
        let stats = Stats {
            published: Counter::default(),
            duplicates: Counter::default(),
            already_stored: Counter::default(),
            atomic_batches: Counter::default(),
            atomic_fallbacks: Family::default(),
            transactions: Counter::default(),
            reconnects: Counter::default(),
            publish_errors: Family::default(),
            skipped: Family::default(),
            poison_rows: Family::default(),
            in_flight: U64Gauge::default(),
            confirmed_lsn: U64Gauge::default(),
            last_acked_commit_lsn: U64Gauge::default(),
            server_wal_end: U64Gauge::default(),
            slot_lag_bytes: U64Gauge::default(),
            // 0.5 ms … ~33 s
            commit_to_ack: Histogram::new(exponential_buckets(0.0005, 2.0, 17)),
            role_gauges: Family::default(),
            role: AtomicU8::new(Role::Starting as u8),
            heartbeat_ms: AtomicU64::new(now_ms()),
            scrapes: AtomicU64::new(0),
            last_scrape_ms: AtomicU64::new(0),
            scrape_interval_ms: AtomicU64::new(0),
            registry: Registry::with_prefix("outbox_cdc"),
        };
        stats.register()
    }
}

impl Stats {
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "events_published",
            "Events JetStream stored",
            self.published.clone(),
        );
        r.register(
            "events_duplicate",
            "Events JetStream already held (re-sent after a restart) and dropped",
            self.duplicates.clone(),
        );
        r.register(
            "events_already_stored",
            "Events read again after a restart that their stream held already, not sent again",
            self.already_stored.clone(),
        );
        r.register(
            "atomic_batches",
            "Transactions published as one atomic JetStream batch (--atomic-transactions)",
            self.atomic_batches.clone(),
        );
        r.register(
            "atomic_fallbacks",
            "Transactions of several events published event by event under --atomic-transactions, by reason",
            self.atomic_fallbacks.clone(),
        );
        r.register(
            "transactions",
            "Transactions read from the slot",
            self.transactions.clone(),
        );
        r.register(
            "reconnects",
            "Sessions restarted after a transient failure",
            self.reconnects.clone(),
        );
        r.register(
            "publish_errors",
            "Failed publishes by kind",
            self.publish_errors.clone(),
        );
        r.register(
            "rows_skipped",
            "Changes skipped by reason (updates, deletes, truncates, other messages)",
            self.skipped.clone(),
        );
        r.register(
            "poison_rows",
            "Rows that could not be published as themselves, by kind and action (dead_letter or fail)",
            self.poison_rows.clone(),
        );
        r.register(
            "in_flight",
            "Publishes awaiting their JetStream ack",
            self.in_flight.clone(),
        );
        r.register(
            "confirmed_lsn",
            "Flush LSN reported to PostgreSQL, as a number",
            self.confirmed_lsn.clone(),
        );
        r.register(
            "last_acked_commit_lsn",
            "Commit LSN of the newest fully acked transaction (save it to replay from)",
            self.last_acked_commit_lsn.clone(),
        );
        r.register(
            "server_wal_lsn",
            "Server WAL position from the last keepalive, as a number",
            self.server_wal_end.clone(),
        );
        r.register(
            "slot_lag_bytes",
            "WAL between the server's position and the confirmed LSN",
            self.slot_lag_bytes.clone(),
        );
        r.register(
            "commit_to_ack_seconds",
            "From a transaction's commit to the JetStream ack of its last row",
            self.commit_to_ack.clone(),
        );
        r.register(
            "role",
            "1 for the instance's current role",
            self.role_gauges.clone(),
        );
        self.set_role(Role::Starting);
        // Every labelled series at 0 from the start (see the module doc).
        for reason in SkipReason::ALL {
            self.skipped
                .get_or_create(&[("reason", reason.as_str())])
                .inc_by(0);
        }
        for kind in PoisonKind::ALL {
            for action in PoisonAction::ALL {
                self.poison_rows
                    .get_or_create(&[("kind", kind.as_str()), ("action", action.as_str())])
                    .inc_by(0);
            }
        }
        for reason in Fallback::ALL {
            self.atomic_fallbacks
                .get_or_create(&[("reason", reason.as_str())])
                .inc_by(0);
        }
        for kind in PublishErrorKind::ALL {
            self.publish_errors
                .get_or_create(&[("kind", kind.as_str())])
                .inc_by(0);
        }
        self
    }

    /// A transaction read for the first time in this process, and the changes it skipped.
    pub fn transaction_read(&self, skipped: &SkippedChanges) {
        self.transactions.inc();
        for reason in SkipReason::ALL {
            let n = skipped.0[reason as usize];
            if n > 0 {
                self.skipped(reason, u64::from(n));
            }
        }
    }

    /// `n` changes skipped for `reason`. A transaction's are counted through
    /// [`Stats::transaction_read`]; this is for those outside any (non-transactional messages).
    pub fn skipped(&self, reason: SkipReason, n: u64) {
        self.skipped
            .get_or_create(&[("reason", reason.as_str())])
            .inc_by(n);
    }

    #[cfg(test)]
    fn skipped_count(&self, reason: SkipReason) -> u64 {
        self.skipped
            .get(&[("reason", reason.as_str())])
            .map_or(0, |c| c.get())
    }

    /// A row that could not be published as itself, and what was done with it.
    pub fn poison_row(&self, kind: PoisonKind, action: PoisonAction) {
        self.poison_rows
            .get_or_create(&[("kind", kind.as_str()), ("action", action.as_str())])
            .inc();
    }

    /// A transaction published event by event under `--atomic-transactions`, and why.
    pub fn atomic_fallback(&self, reason: Fallback) {
        self.atomic_fallbacks
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    pub fn publish_error(&self, kind: PublishErrorKind) {
        self.publish_errors
            .get_or_create(&[("kind", kind.as_str())])
            .inc();
    }

    /// Records the commit→ack latency of a transaction committed at `commit_time`.
    pub fn transaction_acked(&self, commit_time: SystemTime) {
        if let Ok(elapsed) = SystemTime::now().duration_since(commit_time) {
            self.commit_to_ack.observe(elapsed.as_secs_f64());
        }
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
        for r in Role::ALL {
            self.role_gauges
                .get_or_create(&[("role", r.as_str())])
                .set(u64::from(r == role));
        }
        self.beat();
    }

    pub fn role(&self) -> Role {
        let current = self.role.load(Ordering::Relaxed);
        Role::ALL
            .into_iter()
            .find(|r| *r as u8 == current)
            .unwrap_or(Role::Starting)
    }

    /// The pipeline (or the supervisor) is alive.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// `/metrics` was read (and its text made).
    pub fn scraped(&self) {
        let now = now_ms();
        let last = self.last_scrape_ms.swap(now, Ordering::Relaxed);
        if last > 0 {
            self.scrape_interval_ms
                .store(now.saturating_sub(last), Ordering::Relaxed);
        }
        self.scrapes.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times `/metrics` was read.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::Relaxed)
    }

    /// The time between the last two reads of `/metrics`, once there were two.
    pub fn scrape_interval(&self) -> Option<Duration> {
        (self.scrapes() >= 2)
            .then(|| Duration::from_millis(self.scrape_interval_ms.load(Ordering::Relaxed)))
    }

    pub fn since_last_beat(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)))
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        self.slot_lag_bytes.set(
            self.server_wal_end
                .get()
                .saturating_sub(self.confirmed_lsn.get()),
        );
        let mut text = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("published", &self.published.get())
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_counters_roles_lag_and_latency() {
        let stats = Stats::default();
        stats.published.inc();
        let mut skipped = SkippedChanges::default();
        skipped.add(SkipReason::Update);
        skipped.add(SkipReason::Update);
        skipped.add(SkipReason::BeforeStartLsn);
        stats.transaction_read(&skipped);
        stats.publish_error(PublishErrorKind::TooLarge);
        stats.server_wal_end.set(1_000);
        stats.confirmed_lsn.set(400);
        stats.set_role(Role::Leader);
        stats.transaction_acked(SystemTime::now() - Duration::from_millis(3));
        let text = stats.encode();
        for needle in [
            "outbox_cdc_events_published_total 1",
            "outbox_cdc_transactions_total 1",
            "outbox_cdc_rows_skipped_total{reason=\"update\"} 2",
            "outbox_cdc_rows_skipped_total{reason=\"before_start_lsn\"} 1",
            "outbox_cdc_publish_errors_total{kind=\"too_large\"} 1",
            "outbox_cdc_slot_lag_bytes 600",
            "outbox_cdc_role{role=\"leader\"} 1",
            "outbox_cdc_role{role=\"standby\"} 0",
            "outbox_cdc_commit_to_ack_seconds_count 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        assert_eq!(stats.role(), Role::Leader);
        assert_eq!(stats.skipped_count(SkipReason::Update), 2);
        assert_eq!(stats.skipped_count(SkipReason::Delete), 0);
    }

    /// Every series a labelled counter can have is in `/metrics` from the start, at 0, so that
    /// `increase()` sees its first increment. The label values come from the enums, as in
    /// `Stats::register`; the expected lines are spelled out here.
    #[test]
    fn every_labelled_series_is_exposed_at_zero_from_the_start() {
        let text = Stats::default().encode();
        let mut expected = Vec::new();
        for reason in [
            "update",
            "delete",
            "truncate",
            "other",
            "before_start_lsn",
            "non_transactional_message",
        ] {
            expected.push(format!(
                "outbox_cdc_rows_skipped_total{{reason=\"{reason}\"}} 0"
            ));
        }
        for kind in ["unmappable", "too_large", "no_stream", "rejected"] {
            for action in ["dead_letter", "fail"] {
                expected.push(format!(
                    "outbox_cdc_poison_rows_total{{kind=\"{kind}\",action=\"{action}\"}} 0"
                ));
            }
        }
        for reason in [
            "too_many_events",
            "dead_letter",
            "refused",
            "unknown_stream",
            "several_streams",
            "message_too_large",
        ] {
            expected.push(format!(
                "outbox_cdc_atomic_fallbacks_total{{reason=\"{reason}\"}} 0"
            ));
        }
        for kind in [
            "connect",
            "disconnected",
            "stream_setup",
            "checkpoint",
            "no_stream",
            "too_large",
            "rejected",
            "fenced",
            "atomic_duplicate",
            "atomic_refused",
            "publish",
            "permission",
            "stream_full",
        ] {
            expected.push(format!(
                "outbox_cdc_publish_errors_total{{kind=\"{kind}\"}} 0"
            ));
        }
        for line in &expected {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        // Nothing else: each family has exactly these series.
        for family in [
            "outbox_cdc_rows_skipped_total{",
            "outbox_cdc_poison_rows_total{",
            "outbox_cdc_atomic_fallbacks_total{",
            "outbox_cdc_publish_errors_total{",
        ] {
            let exposed = text.lines().filter(|l| l.starts_with(family)).count();
            let wanted = expected.iter().filter(|l| l.starts_with(family)).count();
            assert_eq!(exposed, wanted, "{family}\n{text}");
        }
        // Each enum's `ALL` holds every label value once.
        for (family, values) in [
            (
                "rows_skipped",
                SkipReason::ALL.map(SkipReason::as_str).to_vec(),
            ),
            (
                "poison_kind",
                PoisonKind::ALL.map(PoisonKind::as_str).to_vec(),
            ),
            (
                "atomic_fallbacks",
                Fallback::ALL.map(Fallback::as_str).to_vec(),
            ),
            (
                "publish_errors",
                PublishErrorKind::ALL.map(PublishErrorKind::as_str).to_vec(),
            ),
        ] {
            let unique: std::collections::HashSet<&str> = values.iter().copied().collect();
            assert_eq!(unique.len(), values.len(), "{family}: {values:?}");
        }
    }
}
