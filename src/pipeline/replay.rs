//! `--replay-window`: the position reported to PostgreSQL trails what JetStream acked by the
//! window, so the slot keeps that much WAL for `--start-lsn`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::lsn::Lsn;

/// Holds the LSN reported to PostgreSQL back by the replay window, so the slot keeps that much
/// WAL and `--start-lsn` can go back that far. With a zero window it releases at once.
#[derive(Debug, Clone)]
pub struct ReplayHold {
    window: Duration,
    /// Positions that became durable downstream, oldest first: (since when, newest LSN then).
    history: VecDeque<(Instant, Lsn)>,
    released: Lsn,
}

/// Positions that become durable within one bucket share an entry, so memory is bounded by
/// window / bucket, not by the transaction rate. A position may be released up to one bucket
/// early.
const HOLD_BUCKET: Duration = Duration::from_millis(100);

impl ReplayHold {
    pub fn new(window: Duration, released: Lsn) -> Self {
        ReplayHold {
            window,
            history: VecDeque::new(),
            released,
        }
    }

    /// The position reported to PostgreSQL.
    pub fn released(&self) -> Lsn {
        self.released
    }

    /// `lsn` is durable downstream as of `now`.
    pub fn record(&mut self, now: Instant, lsn: Lsn) {
        if self.window.is_zero() {
            self.released = self.released.max(lsn);
            return;
        }
        match self.history.back_mut() {
            Some((since, newest)) if now.duration_since(*since) < HOLD_BUCKET => {
                *newest = (*newest).max(lsn)
            }
            _ => self.history.push_back((now, lsn)),
        }
    }

    /// Releases what has been durable for the whole window. True when the released LSN moved.
    pub fn release(&mut self, now: Instant) -> bool {
        let before = self.released;
        while let Some(&(since, lsn)) = self.history.front() {
            if now.duration_since(since) < self.window {
                break;
            }
            self.history.pop_front();
            self.released = self.released.max(lsn);
        }
        self.released > before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn::new(v)
    }

    #[test]
    fn a_zero_replay_window_releases_at_once() {
        let mut hold = ReplayHold::new(Duration::ZERO, lsn(10));
        hold.record(Instant::now(), lsn(20));
        assert_eq!(hold.released(), lsn(20));
        hold.record(Instant::now(), lsn(15));
        assert_eq!(hold.released(), lsn(20), "never moves back");
    }

    #[test]
    fn a_replay_window_releases_positions_once_they_are_that_old() {
        let start = Instant::now();
        let window = Duration::from_secs(60);
        let mut hold = ReplayHold::new(window, lsn(10));
        hold.record(start, lsn(20));
        hold.record(start + Duration::from_secs(30), lsn(30));
        assert!(!hold.release(start + Duration::from_secs(59)));
        assert_eq!(hold.released(), lsn(10), "nothing is a minute old yet");
        assert!(hold.release(start + Duration::from_secs(60)));
        assert_eq!(hold.released(), lsn(20));
        assert!(!hold.release(start + Duration::from_secs(89)));
        assert!(hold.release(start + Duration::from_secs(90)));
        assert_eq!(hold.released(), lsn(30));
    }

    #[test]
    fn a_replay_window_keeps_one_entry_per_bucket() {
        let start = Instant::now();
        let mut hold = ReplayHold::new(Duration::from_secs(1), lsn(0));
        for i in 0..1000u64 {
            // 1000 positions within 50 ms share a bucket.
            hold.record(start + Duration::from_micros(i * 50), lsn(i + 1));
        }
        assert_eq!(hold.history.len(), 1);
        assert!(hold.release(start + Duration::from_secs(1)));
        assert_eq!(
            hold.released(),
            lsn(1000),
            "the bucket holds its newest position"
        );
    }
}
