//! The four positions of a session, and the one rule between them.
//!
//! ```text
//!   acked     the end of the newest transaction whose every event JetStream stored
//!             (the Watermark); with nothing in flight it may follow the server's keepalive
//!   released  acked, held back by the replay window (the ReplayHold, kept across sessions)
//!   saved     what the checkpoint holds (saved every status interval)
//!   told      what PostgreSQL was last told: min(released, saved)
//! ```
//!
//! **PostgreSQL is never told more than `min(released, saved)`.** Not past `released`, so the
//! slot keeps the replay window's WAL for `--start-lsn`; not past `saved`, so a slot found ahead
//! of the checkpoint was moved by someone else and the events in between were never published
//! (see [`super::super::continuity`]). Both trail `acked`, so nothing is confirmed that
//! JetStream did not store.

use tokio::time::Instant;

use crate::lsn::Lsn;
use crate::pipeline::replay::ReplayHold;
use crate::pipeline::watermark::Watermark;

#[derive(Debug)]
pub struct Positions {
    watermark: Watermark,
    hold: ReplayHold,
    saved: Lsn,
    told: Option<Lsn>,
}

impl Positions {
    /// A session's positions: `acked` as far as this process knows, the replay hold carried
    /// over, and what the checkpoint held when the session started.
    pub fn new(acked: Lsn, hold: ReplayHold, saved: Lsn) -> Self {
        Positions {
            watermark: Watermark::new(acked),
            hold,
            saved,
            told: None,
        }
    }

    pub fn acked(&self) -> Lsn {
        self.watermark.confirmed()
    }

    /// The commit LSN of the newest transaction whose every event is stored.
    pub fn last_acked_commit(&self) -> Option<Lsn> {
        self.watermark.last_acked_commit()
    }

    /// What PostgreSQL may be told: the invariant above.
    pub fn reportable(&self) -> Lsn {
        self.hold.released().min(self.saved)
    }

    /// The position to tell PostgreSQL, when it moved since it was last told.
    pub fn report(&mut self) -> Option<Lsn> {
        let lsn = self.reportable();
        (self.told != Some(lsn)).then(|| {
            self.told = Some(lsn);
            lsn
        })
    }

    /// The position the checkpoint lacks: what is acked, when it is newer than what is saved.
    pub fn unsaved(&self) -> Option<Lsn> {
        let acked = self.acked();
        (acked > self.saved).then_some(acked)
    }

    /// The checkpoint now holds `lsn`.
    pub fn saved_at(&mut self, lsn: Lsn) {
        debug_assert!(
            lsn <= self.acked(),
            "a checkpoint past what JetStream stored"
        );
        self.saved = self.saved.max(lsn);
    }

    pub fn begin(&mut self) {
        self.watermark.begin();
    }

    pub fn published(&mut self) {
        self.watermark.published();
    }

    /// A transaction ended; true when `acked` moved.
    pub fn commit(&mut self, commit_lsn: Lsn, end_lsn: Lsn, now: Instant) -> bool {
        let moved = self.watermark.commit(commit_lsn, end_lsn);
        self.record(moved, now)
    }

    /// The oldest publish in flight was stored; true when `acked` moved.
    pub fn acked_one(&mut self, now: Instant) -> bool {
        let moved = self.watermark.acked();
        self.record(moved, now)
    }

    /// The server sent everything up to `wal_end`; true when `acked` moved (only with nothing
    /// in flight and no transaction open).
    pub fn keepalive(&mut self, wal_end: Lsn, now: Instant) -> bool {
        let moved = self.watermark.keepalive(wal_end);
        self.record(moved, now)
    }

    /// Lets the replay window release what has been stored long enough.
    pub fn release(&mut self, now: Instant) {
        self.hold.release(now);
    }

    fn record(&mut self, moved: bool, now: Instant) -> bool {
        if moved {
            self.hold.record(now, self.acked());
            self.hold.release(now);
        }
        moved
    }

    /// What outlives the session: `acked` and the replay hold.
    pub fn into_parts(self) -> (Lsn, ReplayHold) {
        (self.watermark.confirmed(), self.hold)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn::new(v)
    }

    #[test]
    fn postgres_is_told_neither_past_the_checkpoint_nor_past_the_replay_window() {
        let start = Instant::now();
        let mut p = Positions::new(lsn(10), ReplayHold::new(Duration::ZERO, lsn(10)), lsn(10));
        assert_eq!(p.report(), Some(lsn(10)), "the start is told once");
        assert_eq!(p.report(), None);
        p.begin();
        p.published();
        assert!(!p.commit(lsn(20), lsn(21), start));
        assert_eq!(p.unsaved(), None, "nothing acked yet");
        assert!(p.acked_one(start));
        assert_eq!(p.acked(), lsn(21));
        assert_eq!(p.report(), None, "acked, but not in the checkpoint yet");
        assert_eq!(p.unsaved(), Some(lsn(21)));
        p.saved_at(lsn(21));
        assert_eq!(p.unsaved(), None);
        assert_eq!(p.report(), Some(lsn(21)));

        let window = Duration::from_secs(60);
        let mut p = Positions::new(lsn(10), ReplayHold::new(window, lsn(10)), lsn(10));
        assert!(p.keepalive(lsn(50), start));
        p.saved_at(lsn(50));
        assert_eq!(p.reportable(), lsn(10), "held back by the replay window");
        p.release(start + window);
        assert_eq!(p.reportable(), lsn(50));
        let (acked, hold) = p.into_parts();
        assert_eq!((acked, hold.released()), (lsn(50), lsn(50)));
    }

    #[test]
    fn a_checkpoint_ahead_of_this_process_does_not_let_postgres_pass_what_was_acked() {
        // The record of an earlier process may be past the slot; what this session acked is
        // what the replay hold releases.
        let mut p = Positions::new(lsn(10), ReplayHold::new(Duration::ZERO, lsn(10)), lsn(90));
        assert_eq!(p.reportable(), lsn(10));
        assert_eq!(p.unsaved(), None);
        assert!(p.keepalive(lsn(40), Instant::now()));
        assert_eq!(p.reportable(), lsn(40));
    }
}
