//! Which WAL position is safe to confirm: the end of the newest transaction whose every row
//! JetStream acked.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Tracks which WAL position is safe to confirm.
#[derive(Debug, Clone)]
pub struct Watermark {
    /// Publishes issued and acked in this session, counted in order.
    published: u64,
    acked: u64,
    /// Commits whose rows are not all acked yet: (rows published up to this commit, end LSN, commit LSN).
    pending: VecDeque<PendingCommit>,
    in_transaction: bool,
    confirmed: Lsn,
    /// Commit LSN of the newest transaction that is fully acked (for operators to save).
    last_acked_commit: Option<Lsn>,
}

#[derive(Debug, Clone, Copy)]
struct PendingCommit {
    published: u64,
    end_lsn: Lsn,
    commit_lsn: Lsn,
}

impl Watermark {
    pub fn new(confirmed: Lsn) -> Self {
        Watermark {
            published: 0,
            acked: 0,
            pending: VecDeque::new(),
            in_transaction: false,
            confirmed,
            last_acked_commit: None,
        }
    }

    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    pub fn last_acked_commit(&self) -> Option<Lsn> {
        self.last_acked_commit
    }

    pub fn begin(&mut self) {
        self.in_transaction = true;
    }

    pub fn published(&mut self) {
        self.published += 1;
    }

    /// A transaction ended. Returns true when the confirmed LSN moved.
    pub fn commit(&mut self, commit_lsn: Lsn, end_lsn: Lsn) -> bool {
        self.in_transaction = false;
        self.pending.push_back(PendingCommit {
            published: self.published,
            end_lsn,
            commit_lsn,
        });
        self.advance()
    }

    /// The oldest outstanding publish was acked. Returns true when the confirmed LSN moved.
    pub fn acked(&mut self) -> bool {
        debug_assert!(self.acked < self.published, "more acks than publishes");
        self.acked += 1;
        self.advance()
    }

    /// The server has sent everything up to `wal_end`. With nothing in flight and no transaction
    /// open, every event before `wal_end` is durable downstream, so it may be confirmed.
    pub fn keepalive(&mut self, wal_end: Lsn) -> bool {
        if self.in_transaction || self.acked != self.published || !self.pending.is_empty() {
            return false;
        }
        self.raise(wal_end)
    }

    fn advance(&mut self) -> bool {
        let mut moved = false;
        while let Some(front) = self.pending.front().copied() {
            if front.published > self.acked {
                break;
            }
            self.pending.pop_front();
            self.last_acked_commit = Some(front.commit_lsn);
            moved |= self.raise(front.end_lsn);
        }
        moved
    }

    fn raise(&mut self, lsn: Lsn) -> bool {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn::new(v)
    }

    #[test]
    fn confirms_a_transaction_only_when_all_its_rows_are_acked() {
        let mut w = Watermark::new(lsn(10));
        w.begin();
        w.published();
        w.published();
        assert!(!w.commit(lsn(20), lsn(21)));
        assert_eq!(w.confirmed(), lsn(10));
        assert!(!w.acked());
        assert_eq!(w.confirmed(), lsn(10), "one of two rows acked");
        assert!(w.acked());
        assert_eq!(w.confirmed(), lsn(21));
        assert_eq!(w.last_acked_commit(), Some(lsn(20)));
    }

    #[test]
    fn confirms_in_commit_order_across_transactions() {
        let mut w = Watermark::new(lsn(0));
        for (commit, end) in [(100, 101), (200, 201), (300, 301)] {
            w.begin();
            w.published();
            w.commit(lsn(commit), lsn(end));
        }
        w.acked();
        assert_eq!(w.confirmed(), lsn(101));
        w.acked();
        w.acked();
        assert_eq!(w.confirmed(), lsn(301));
    }

    #[test]
    fn a_transaction_without_rows_confirms_once_earlier_ones_are_acked() {
        let mut w = Watermark::new(lsn(0));
        w.begin();
        w.published();
        w.commit(lsn(10), lsn(11));
        w.begin();
        assert!(
            !w.commit(lsn(20), lsn(21)),
            "empty txn waits for the one before it"
        );
        w.acked();
        assert_eq!(w.confirmed(), lsn(21));
    }

    #[test]
    fn a_large_transaction_confirms_nothing_until_its_commit() {
        let mut w = Watermark::new(lsn(5));
        w.begin();
        for _ in 0..1000 {
            w.published();
            assert!(!w.acked());
        }
        assert_eq!(
            w.confirmed(),
            lsn(5),
            "rows acked, but the commit has not arrived"
        );
        assert!(
            !w.keepalive(lsn(999)),
            "no keepalive confirmation inside a transaction"
        );
        assert!(w.commit(lsn(50), lsn(51)));
        assert_eq!(w.confirmed(), lsn(51));
    }

    #[test]
    fn keepalives_confirm_only_when_idle() {
        let mut w = Watermark::new(lsn(0));
        assert!(w.keepalive(lsn(500)), "idle: follow the server");
        assert_eq!(w.confirmed(), lsn(500));
        w.begin();
        w.published();
        w.commit(lsn(600), lsn(601));
        assert!(!w.keepalive(lsn(700)), "a publish is in flight");
        w.acked();
        assert_eq!(w.confirmed(), lsn(601));
        assert!(w.keepalive(lsn(700)));
        assert!(!w.keepalive(lsn(650)), "never moves back");
        assert_eq!(w.confirmed(), lsn(700));
    }

    #[test]
    fn never_moves_backwards() {
        let mut w = Watermark::new(lsn(1000));
        w.begin();
        w.published();
        w.commit(lsn(10), lsn(11));
        assert!(!w.acked());
        assert_eq!(w.confirmed(), lsn(1000));
    }
}
