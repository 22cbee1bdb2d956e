//! Where a session starts, decided from what the supervisor read — the slot, the streams' end,
//! the checkpoint, the server's identity — and nothing else: no I/O here, so every case is a
//! unit test.
//!
//! Three decisions, in the order the supervisor can make them:
//! 1. [`Start::slot`]: use the slot, create it, or create it with `--initial-backfill`'s
//!    snapshot (dropping a slot that never streamed first); or stop at a gap.
//! 2. [`Start::position`]: which transactions are not published again (`skip_before`), and where
//!    the replay window starts.
//! 3. [`Start::history`] and [`Start::record`]: the server's history must hold what was
//!    published; the checkpoint's record goes on from there.
//!
//! A gap found by any of them stops the process, unless `--accept-gap` accepts it — once: the
//! first session that streams clears the flag ([`Gate`]).

use super::continuity::{self, Gap, Published};
use super::error::Error;
use super::progress::ProgressRecord;
use crate::lsn::Lsn;
use crate::source::{ServerIdentity, SlotName, SlotState, SourceError, TimelineAncestry};

/// What the flags say about where to start.
#[derive(Debug, Clone)]
pub struct StartConfig {
    pub slot: SlotName,
    pub create_slot: bool,
    /// `--initial-backfill` was given.
    pub initial_backfill: bool,
    pub start_lsn: Option<Lsn>,
}

/// What this process knows from its earlier sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Process {
    /// A session has streamed: `--start-lsn`, `--initial-backfill` and the checkpoint applied
    /// to the first one.
    pub streamed: bool,
    /// The newest position this process knows JetStream stored.
    pub acked: Lsn,
    /// Transactions that committed before this are not published again.
    pub skip_before: Lsn,
}

/// `--accept-gap`: a gap found is accepted (and remembered as accepted) this once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    accept: bool,
    accepted: bool,
}

impl Gate {
    pub fn new(accept_gap: bool) -> Gate {
        Gate {
            accept: accept_gap,
            accepted: false,
        }
    }

    /// A gap stops the process unless `--accept-gap` accepts it.
    fn check(&mut self, found: Result<(), Box<Gap>>) -> Result<(), Error> {
        match found {
            Ok(()) => Ok(()),
            Err(gap) if self.accept => {
                tracing::warn!(%gap, "--accept-gap: going on past the gap");
                self.accepted = true;
                Ok(())
            }
            Err(gap) => Err(gap.into()),
        }
    }

    /// A gap was accepted: the checkpoint's record is not trusted, the slot's position is.
    pub fn accepted(&self) -> bool {
        self.accepted
    }
}

/// What to do about the slot before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotPlan {
    /// Stream from it as it is.
    Use,
    /// Create it (none exists, and nothing was published before).
    Create,
    /// Create it exporting its snapshot, publish the rows `--initial-backfill` selects in that
    /// snapshot, then stream: every older row from the snapshot, every newer one from the WAL.
    /// `drop_first`: a slot that never streamed is in the way.
    CreateWithBackfill { drop_first: bool },
}

/// Where the session starts reading and what it does not publish again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Transactions that committed before this are read but not published.
    pub skip_before: Lsn,
    /// The newest position known stored (never below the slot's).
    pub acked: Lsn,
    /// The first session: the replay window starts afresh at the slot's position.
    pub replay_from: Option<Lsn>,
}

/// The start of one session, decided step by step.
#[derive(Debug)]
pub struct Start<'a> {
    config: &'a StartConfig,
    process: Process,
    published: Published,
}

impl<'a> Start<'a> {
    /// `published`: the streams' end and the checkpoint's record, as read.
    pub fn new(config: &'a StartConfig, process: Process, published: Published) -> Start<'a> {
        Start {
            config,
            process,
            published,
        }
    }

    /// What was published, as the decisions below see it.
    pub fn published(&self) -> &Published {
        &self.published
    }

    /// The slot: used, created, or created with `--initial-backfill`'s snapshot.
    /// `create_sql` is the SQL that creates it, for the error when it must not be created.
    pub fn slot(
        &mut self,
        slot: Option<&SlotState>,
        gate: &mut Gate,
        create_sql: impl FnOnce() -> String,
    ) -> Result<SlotPlan, Error> {
        let name = &self.config.slot;
        if let Some(pid) = slot.and_then(|s| s.active_pid) {
            return Err(SourceError::SlotBusy {
                slot: name.to_string(),
                pid: Some(pid),
            }
            .into());
        }
        let pending = self
            .published
            .record
            .as_ref()
            .is_some_and(|r| r.initial_backfill_pending);
        if pending {
            // The slot has not streamed: it can go, and the switch begin again.
            if !self.config.initial_backfill {
                return Err(Error::InitialBackfillUnfinished {
                    slot: name.to_string(),
                });
            }
            self.published.record = None;
            gate.check(continuity::before_creating_slot(name, &self.published))?;
            if slot.is_some() {
                tracing::warn!(slot = %name,
                    "an --initial-backfill did not finish: dropping its slot, which never streamed, and beginning again");
            }
            return Ok(SlotPlan::CreateWithBackfill {
                drop_first: slot.is_some(),
            });
        }
        match slot {
            Some(state) => {
                let slot_lsn = state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
                gate.check(continuity::slot_position(name, slot_lsn, &self.published))?;
                if !self.config.initial_backfill || self.process.streamed {
                    return Ok(SlotPlan::Use);
                }
                match (&self.published.record, &self.published.stream_end) {
                    // The switch was made when the slot was created.
                    (Some(_), _) => {
                        tracing::info!(slot = %name,
                            "--initial-backfill: done when outbox-cdc created the slot; streaming from it");
                        Ok(SlotPlan::Use)
                    }
                    // Created outside `run` (`setup --apply`), never streamed from: nothing was
                    // published from it, so it can make way for one with a snapshot.
                    (None, None) => {
                        tracing::warn!(slot = %name,
                            "--initial-backfill: replication slot `{name}` exists but outbox-cdc never streamed from it; dropping it to create it again with the snapshot the rows are selected in");
                        Ok(SlotPlan::CreateWithBackfill { drop_first: true })
                    }
                    (None, Some(_)) => Err(Error::InitialBackfillSlotExists {
                        slot: name.to_string(),
                        published: self.published.to_string(),
                    }),
                }
            }
            None => {
                if !self.config.create_slot {
                    return Err(SourceError::SlotMissing {
                        slot: name.to_string(),
                        create_sql: create_sql(),
                    }
                    .into());
                }
                gate.check(continuity::before_creating_slot(name, &self.published))?;
                Ok(if self.config.initial_backfill && !self.process.streamed {
                    SlotPlan::CreateWithBackfill { drop_first: false }
                } else {
                    SlotPlan::Create
                })
            }
        }
    }

    /// Where the session starts, given the slot's position.
    pub fn position(&self, slot_lsn: Lsn, gate: &Gate) -> Result<Position, Error> {
        let mut skip_before = self.process.skip_before;
        let mut replay_from = None;
        if !self.process.streamed {
            if let Some(start) = self.config.start_lsn
                && start < slot_lsn
            {
                return Err(SourceError::StartLsnUnavailable {
                    slot: self.config.slot.to_string(),
                    requested: start,
                    oldest: slot_lsn,
                }
                .into());
            }
            // What the checkpoint says was published is not sent again — unless a gap was
            // accepted, which says the record does not describe this history.
            let saved = self
                .published
                .record
                .as_ref()
                .map(|r| r.lsn)
                .filter(|_| !gate.accepted());
            skip_before = self.config.start_lsn.or(saved).unwrap_or(Lsn::ZERO);
            replay_from = Some(slot_lsn);
        }
        let acked = self.process.acked.max(slot_lsn);
        Ok(Position {
            skip_before: skip_before.max(acked),
            acked,
            replay_from,
        })
    }

    /// Whether [`Start::history`] needs to know where the recorded timeline stands in the
    /// server's (the supervisor asks the server only then).
    pub fn needs_ancestry(&self, server: &ServerIdentity) -> Option<u32> {
        self.published
            .record
            .as_ref()
            .and_then(|r| r.timeline)
            .filter(|&timeline| timeline != server.timeline)
    }

    /// The server's history must hold what was published.
    pub fn history(
        &self,
        server: &ServerIdentity,
        ancestry: Option<TimelineAncestry>,
        gate: &mut Gate,
    ) -> Result<(), Error> {
        gate.check(continuity::history(server, ancestry, &self.published))
    }

    /// The checkpoint's record for this session: it goes on from what it said, unless a gap was
    /// accepted (then from the slot), on the server's history.
    pub fn record(&self, slot_lsn: Lsn, server: &ServerIdentity, gate: &Gate) -> ProgressRecord {
        let lsn = match &self.published.record {
            Some(record) if !gate.accepted() => record.lsn.max(slot_lsn),
            _ => slot_lsn,
        };
        ProgressRecord {
            lsn,
            system_id: Some(server.system_id.clone()),
            timeline: Some(server.timeline),
            initial_backfill_pending: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::StreamEnd;

    fn lsn(v: u64) -> Lsn {
        Lsn::new(v)
    }

    fn sql() -> String {
        "SELECT pg_create_logical_replication_slot('outbox_cdc', 'pgoutput');".into()
    }

    fn config() -> StartConfig {
        StartConfig {
            slot: "outbox_cdc".parse().unwrap(),
            create_slot: true,
            initial_backfill: false,
            start_lsn: None,
        }
    }

    fn slot(confirmed: u64) -> SlotState {
        SlotState {
            confirmed_flush_lsn: Some(lsn(confirmed)),
            ..SlotState::default()
        }
    }

    fn record(at: u64) -> Option<ProgressRecord> {
        Some(ProgressRecord {
            lsn: lsn(at),
            system_id: Some("42".into()),
            timeline: Some(1),
            initial_backfill_pending: false,
        })
    }

    fn end(at: u64) -> Option<StreamEnd> {
        Some(StreamEnd {
            stream: "OUTBOX".into(),
            commit_lsn: lsn(at),
            commit_time: None,
        })
    }

    fn published(stream_end: Option<StreamEnd>, record: Option<ProgressRecord>) -> Published {
        Published { stream_end, record }
    }

    fn server(timeline: u32, wal_end: u64) -> ServerIdentity {
        ServerIdentity {
            system_id: "42".into(),
            timeline,
            wal_end: lsn(wal_end),
        }
    }

    #[test]
    fn a_busy_slot_makes_a_standby() {
        let config = config();
        let mut start = Start::new(&config, Process::default(), Published::default());
        let busy = SlotState {
            active_pid: Some(7),
            ..slot(10)
        };
        let err = start
            .slot(Some(&busy), &mut Gate::new(false), sql)
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Source(SourceError::SlotBusy { pid: Some(7), .. })
        ));
    }

    #[test]
    fn a_brand_new_set_up_creates_the_slot_and_starts_from_it() {
        let config = config();
        let mut gate = Gate::new(false);
        let mut start = Start::new(&config, Process::default(), Published::default());
        assert_eq!(start.slot(None, &mut gate, sql).unwrap(), SlotPlan::Create);
        let position = start.position(lsn(100), &gate).unwrap();
        assert_eq!(
            position,
            Position {
                skip_before: lsn(100),
                acked: lsn(100),
                replay_from: Some(lsn(100)),
            }
        );
        assert_eq!(start.record(lsn(100), &server(1, 200), &gate).lsn, lsn(100));
        let refuse = StartConfig {
            create_slot: false,
            ..config.clone()
        };
        let mut start = Start::new(&refuse, Process::default(), Published::default());
        assert!(matches!(
            start.slot(None, &mut gate, sql),
            Err(Error::Source(SourceError::SlotMissing { .. }))
        ));
    }

    #[test]
    fn a_missing_slot_after_publishing_stops_unless_the_gap_is_accepted_once() {
        let config = config();
        let was = published(end(0x300), record(0x400));
        let mut start = Start::new(&config, Process::default(), was.clone());
        assert!(matches!(
            start.slot(None, &mut Gate::new(false), sql),
            Err(Error::Gap(_))
        ));
        let mut gate = Gate::new(true);
        let mut start = Start::new(&config, Process::default(), was);
        assert_eq!(start.slot(None, &mut gate, sql).unwrap(), SlotPlan::Create);
        assert!(gate.accepted());
        // Accepted: the record no longer says what was published; the new slot does.
        let position = start.position(lsn(0x900), &gate).unwrap();
        assert_eq!(position.skip_before, lsn(0x900));
        assert_eq!(
            start.record(lsn(0x900), &server(1, 0x1000), &gate).lsn,
            lsn(0x900)
        );
    }

    #[test]
    fn the_checkpoint_says_what_is_not_published_again_on_the_first_session_only() {
        let config = config();
        let gate = Gate::new(false);
        let mut start = Start::new(
            &config,
            Process::default(),
            published(end(0x300), record(0x400)),
        );
        assert_eq!(
            start
                .slot(Some(&slot(0x200)), &mut Gate::new(false), sql)
                .unwrap(),
            SlotPlan::Use
        );
        let position = start.position(lsn(0x200), &gate).unwrap();
        assert_eq!(
            position.skip_before,
            lsn(0x400),
            "the checkpoint is ahead of the slot"
        );
        assert_eq!(position.acked, lsn(0x200));
        assert_eq!(
            start.record(lsn(0x200), &server(1, 0x1000), &gate).lsn,
            lsn(0x400)
        );

        // A later session of the same process goes on from what it acked, and keeps its replay
        // window.
        let later = Process {
            streamed: true,
            acked: lsn(0x500),
            skip_before: lsn(0x400),
        };
        let start = Start::new(&config, later, published(end(0x480), record(0x500)));
        let position = start.position(lsn(0x450), &gate).unwrap();
        assert_eq!(
            position,
            Position {
                skip_before: lsn(0x500),
                acked: lsn(0x500),
                replay_from: None,
            }
        );
    }

    #[test]
    fn a_start_lsn_the_slot_no_longer_has_is_refused() {
        let config = StartConfig {
            start_lsn: Some(lsn(0x100)),
            ..config()
        };
        let gate = Gate::new(false);
        let start = Start::new(&config, Process::default(), Published::default());
        assert!(matches!(
            start.position(lsn(0x200), &gate),
            Err(Error::Source(SourceError::StartLsnUnavailable { .. }))
        ));
        let position = start.position(lsn(0x80), &gate).unwrap();
        assert_eq!(
            position.skip_before,
            lsn(0x100),
            "--start-lsn wins over the slot"
        );
    }

    #[test]
    fn a_slot_ahead_of_the_checkpoint_is_a_gap() {
        let config = config();
        let mut start = Start::new(&config, Process::default(), published(None, record(0x400)));
        assert!(matches!(
            start.slot(Some(&slot(0x900)), &mut Gate::new(false), sql),
            Err(Error::Gap(_))
        ));
    }

    #[test]
    fn initial_backfill_creates_the_slot_with_its_snapshot() {
        let config = StartConfig {
            initial_backfill: true,
            ..config()
        };
        let mut gate = Gate::new(false);
        let mut start = Start::new(&config, Process::default(), Published::default());
        assert_eq!(
            start.slot(None, &mut gate, sql).unwrap(),
            SlotPlan::CreateWithBackfill { drop_first: false }
        );
        // `setup --apply` made the slot, nothing streamed from it: it makes way.
        let mut start = Start::new(&config, Process::default(), Published::default());
        assert_eq!(
            start.slot(Some(&slot(0x100)), &mut gate, sql).unwrap(),
            SlotPlan::CreateWithBackfill { drop_first: true }
        );
        // Done at the slot's creation: the flag left in place changes nothing.
        let mut start = Start::new(
            &config,
            Process::default(),
            published(end(0x300), record(0x300)),
        );
        assert_eq!(
            start.slot(Some(&slot(0x300)), &mut gate, sql).unwrap(),
            SlotPlan::Use
        );
        // Events were published from a slot the checkpoint knows nothing of: refused.
        let mut start = Start::new(&config, Process::default(), published(end(0x300), None));
        let err = start.slot(Some(&slot(0x300)), &mut gate, sql).unwrap_err();
        assert!(err.is_usage(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("pg_drop_replication_slot('outbox_cdc')"),
            "{text}"
        );
        assert!(text.contains("backfill"), "{text}");
        // A second session of the same process just streams.
        let streamed = Process {
            streamed: true,
            ..Process::default()
        };
        let mut start = Start::new(&config, streamed, Published::default());
        assert_eq!(
            start.slot(Some(&slot(0x100)), &mut gate, sql).unwrap(),
            SlotPlan::Use
        );
    }

    #[test]
    fn an_unfinished_initial_backfill_begins_again_only_when_asked() {
        let pending = Some(ProgressRecord {
            initial_backfill_pending: true,
            ..record(0).unwrap()
        });
        let config = StartConfig {
            initial_backfill: true,
            ..config()
        };
        let mut start = Start::new(
            &config,
            Process::default(),
            published(None, pending.clone()),
        );
        assert_eq!(
            start
                .slot(Some(&slot(0x100)), &mut Gate::new(false), sql)
                .unwrap(),
            SlotPlan::CreateWithBackfill { drop_first: true }
        );
        assert_eq!(
            start.published().record,
            None,
            "the pending record is not a witness"
        );
        let without = self::config();
        let mut start = Start::new(&without, Process::default(), published(None, pending));
        let err = start
            .slot(Some(&slot(0x100)), &mut Gate::new(false), sql)
            .unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
    }

    #[test]
    fn the_history_must_hold_what_was_published() {
        let config = config();
        let start = Start::new(
            &config,
            Process::default(),
            published(end(0x300), record(0x400)),
        );
        assert_eq!(start.needs_ancestry(&server(1, 0x500)), None);
        assert_eq!(start.needs_ancestry(&server(2, 0x500)), Some(1));
        let mut gate = Gate::new(false);
        assert!(start.history(&server(1, 0x500), None, &mut gate).is_ok());
        assert!(matches!(
            start.history(&server(1, 0x200), None, &mut gate),
            Err(Error::Gap(_))
        ));
        let branched = Some(TimelineAncestry::BranchedAt(lsn(0x250)));
        assert!(
            start
                .history(&server(2, 0x900), branched, &mut gate)
                .is_err()
        );
        let mut accept = Gate::new(true);
        assert!(
            start
                .history(&server(2, 0x900), branched, &mut accept)
                .is_ok()
        );
        assert_eq!(
            start.record(lsn(0x200), &server(2, 0x900), &accept),
            ProgressRecord {
                lsn: lsn(0x200),
                system_id: Some("42".into()),
                timeline: Some(2),
                initial_backfill_pending: false,
            },
            "past an accepted gap the record starts again from the slot, on the new timeline"
        );
    }
}
