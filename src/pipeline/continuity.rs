//! Never go on past a gap: before a session streams, the slot, the streams and the database
//! must agree that the WAL it is about to read continues what was published.
//!
//! Three witnesses of what was published: the streams' newest event (its commit LSN), the
//! checkpoint's record ([`super::progress`]: the newest position confirmed, the cluster's system
//! identifier and timeline), and the slot's confirmed position. A gap is:
//! - a slot that must be created although events were published before: a new slot starts at
//!   the server's current position, past every event committed since (the slot was dropped,
//!   invalidated, or the database failed over to a standby without a failover slot);
//! - a slot ahead of the record: someone recreated or advanced it, past unpublished events;
//! - a database whose history does not hold what was published: another cluster, a WAL that
//!   ends before the stream's last event, or a timeline that branched off before it (a restore,
//!   or a failover to a standby that had not received those commits: the stream then holds
//!   events whose transactions are gone).
//!
//! Each stops the process with what happened and what to do, unless `--accept-gap` says the
//! operator has seen to it. A brand-new set-up (nothing published, no record) has no gap.

use std::fmt;

use super::progress::ProgressRecord;
use crate::lsn::Lsn;
use crate::sink::StreamEnd;
use crate::source::{ServerIdentity, SlotName, TimelineAncestry};

/// What is known to have been published: the witnesses a gap is measured from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    pub stream_end: Option<StreamEnd>,
    pub record: Option<ProgressRecord>,
}

impl Published {
    fn anything(&self) -> bool {
        self.stream_end.is_some() || self.record.is_some()
    }

    /// The position after which events may be missing.
    fn since(&self) -> Option<Lsn> {
        match (&self.stream_end, &self.record) {
            (Some(end), _) => Some(end.commit_lsn),
            (None, Some(record)) => Some(record.lsn),
            (None, None) => None,
        }
    }
}

impl fmt::Display for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.stream_end {
            Some(end) => {
                write!(
                    f,
                    "stream `{}` holds events up to commit LSN {}",
                    end.stream, end.commit_lsn
                )?;
                if let Some(time) = &end.commit_time {
                    write!(f, ", committed at {time}")?;
                }
            }
            None => f.write_str("the streams hold no outbox-cdc event")?,
        }
        if let Some(record) = &self.record {
            write!(f, "; outbox-cdc last confirmed {}", record.lsn)?;
        }
        Ok(())
    }
}

/// How to close a gap: the same advice for every kind.
fn remedy(published: &Published) -> String {
    let after = match &published.stream_end {
        Some(StreamEnd {
            commit_time: Some(time),
            ..
        }) => format!("committed after {time}"),
        _ => "the stream lacks".to_owned(),
    };
    format!(
        "Re-publish the outbox rows {after} from the table (`outbox-cdc backfill \
         --since-stream-end` does, without storing twice what the stream holds), then start once \
         with --accept-gap to go on from here"
    )
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Gap {
    #[error(
        "replication slot `{slot}` does not exist, but outbox-cdc has published from it before \
         ({published}). A new slot would start at the server's current position, and the events \
         committed since {} would never be published: the slot was dropped or invalidated, or \
         the database failed over to a server without it (on PostgreSQL 17+ outbox-cdc creates \
         it with failover = true; see `outbox-cdc status`). {}",
        published.since().map_or_else(|| "then".to_owned(), |l| l.to_string()),
        remedy(published)
    )]
    SlotMissing { slot: String, published: Published },
    #[error(
        "replication slot `{slot}` is at {slot_lsn}, past what outbox-cdc confirmed, \
         {confirmed} ({published}): it was recreated or advanced outside outbox-cdc, and the \
         events committed between {confirmed} and {slot_lsn} may never be published. {}",
        remedy(published)
    )]
    SlotAhead {
        slot: String,
        slot_lsn: Lsn,
        confirmed: Lsn,
        published: Published,
    },
    #[error(
        "the database is another cluster (system identifier {system_id}) than the one \
         outbox-cdc published from (system identifier {recorded}); {published}. It was \
         re-created, or the URL points elsewhere: the slot's history is not the stream's. If \
         this is meant, {}",
        lowercase_first(&remedy(published))
    )]
    OtherCluster {
        system_id: String,
        recorded: String,
        published: Published,
    },
    #[error(
        "the streams hold events the database no longer has: {published}, but {history}. The \
         database was restored from a backup, or failed over to a standby that had not received \
         those commits: consumers saw events whose transactions are gone. Reconcile them, then \
         start with --accept-gap; against the failover case, list the standbys' physical slots \
         in `synchronized_standby_slots` on the primary (see `outbox-cdc setup`)"
    )]
    HistoryLost {
        published: Published,
        history: String,
    },
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_lowercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The slot does not exist: creating it is a gap when anything was published before.
pub fn before_creating_slot(slot: &SlotName, published: &Published) -> Result<(), Box<Gap>> {
    if published.anything() {
        return Err(Box::new(Gap::SlotMissing {
            slot: slot.to_string(),
            published: published.clone(),
        }));
    }
    Ok(())
}

/// The slot exists: its position must not be past what outbox-cdc confirmed.
pub fn slot_position(
    slot: &SlotName,
    slot_lsn: Lsn,
    published: &Published,
) -> Result<(), Box<Gap>> {
    match &published.record {
        Some(record) if slot_lsn > record.lsn => Err(Box::new(Gap::SlotAhead {
            slot: slot.to_string(),
            slot_lsn,
            confirmed: record.lsn,
            published: published.clone(),
        })),
        _ => Ok(()),
    }
}

/// The server's history must hold what was published. `ancestry` is where the recorded
/// timeline stands in the server's (asked only when the timelines differ).
pub fn history(
    server: &ServerIdentity,
    ancestry: Option<TimelineAncestry>,
    published: &Published,
) -> Result<(), Box<Gap>> {
    let record = published.record.as_ref();
    if let Some(recorded) = record.and_then(|r| r.system_id.as_ref())
        && *recorded != server.system_id
    {
        return Err(Box::new(Gap::OtherCluster {
            system_id: server.system_id.clone(),
            recorded: recorded.clone(),
            published: published.clone(),
        }));
    }
    let Some(newest) = published.since() else {
        return Ok(());
    };
    let lost = |history: String| {
        Box::new(Gap::HistoryLost {
            published: published.clone(),
            history,
        })
    };
    if newest > server.wal_end {
        return Err(lost(format!(
            "the server's WAL ends at {} (timeline {})",
            server.wal_end, server.timeline
        )));
    }
    let recorded_timeline = record.and_then(|r| r.timeline);
    match (recorded_timeline, ancestry) {
        (Some(timeline), Some(TimelineAncestry::BranchedAt(at))) if newest > at => {
            Err(lost(format!(
                "the server's timeline {} branched off timeline {timeline} at {at}",
                server.timeline
            )))
        }
        (Some(timeline), Some(TimelineAncestry::Unrelated)) => Err(lost(format!(
            "timeline {timeline}, which it was read from, is not in the history of the server's \
             timeline {}",
            server.timeline
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> SlotName {
        "outbox_cdc".parse().unwrap()
    }

    fn end(lsn: u64) -> Option<StreamEnd> {
        Some(StreamEnd {
            stream: "OUTBOX".into(),
            commit_lsn: Lsn::new(lsn),
            commit_time: Some("2026-12-03T10:00:00Z".into()),
        })
    }

    fn record(lsn: u64, timeline: u32) -> Option<ProgressRecord> {
        Some(ProgressRecord {
            lsn: Lsn::new(lsn),
            system_id: Some("42".into()),
            timeline: Some(timeline),
            initial_backfill_pending: false,
        })
    }

    fn server(wal_end: u64, timeline: u32) -> ServerIdentity {
        ServerIdentity {
            system_id: "42".into(),
            timeline,
            wal_end: Lsn::new(wal_end),
        }
    }

    #[test]
    fn a_brand_new_set_up_has_no_gap() {
        let nothing = Published::default();
        assert_eq!(before_creating_slot(&slot(), &nothing), Ok(()));
        assert_eq!(slot_position(&slot(), Lsn::new(500), &nothing), Ok(()));
        assert_eq!(history(&server(500, 1), None, &nothing), Ok(()));
    }

    #[test]
    fn a_missing_slot_after_publishing_is_a_gap_naming_the_stream_end_and_the_remedy() {
        for published in [
            Published {
                stream_end: end(0x300),
                record: None,
            },
            Published {
                stream_end: None,
                record: record(0x400, 1),
            },
        ] {
            let gap = before_creating_slot(&slot(), &published).unwrap_err();
            let text = gap.to_string();
            assert!(text.contains("`outbox_cdc` does not exist"), "{text}");
            assert!(text.contains("backfill --since-stream-end"), "{text}");
            assert!(text.contains("--accept-gap"), "{text}");
        }
        let text = before_creating_slot(
            &slot(),
            &Published {
                stream_end: end(0x300),
                record: None,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(text.contains("commit LSN 0/300"), "{text}");
        assert!(
            text.contains("committed after 2026-12-03T10:00:00Z"),
            "{text}"
        );
    }

    #[test]
    fn a_slot_past_what_was_confirmed_is_a_gap() {
        let published = Published {
            stream_end: end(0x300),
            record: record(0x400, 1),
        };
        assert_eq!(slot_position(&slot(), Lsn::new(0x400), &published), Ok(()));
        assert_eq!(slot_position(&slot(), Lsn::new(0x100), &published), Ok(()));
        let text = slot_position(&slot(), Lsn::new(0x900), &published)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("is at 0/900, past what outbox-cdc confirmed, 0/400"),
            "{text}"
        );
    }

    #[test]
    fn a_history_without_the_published_events_is_a_gap() {
        let published = Published {
            stream_end: end(0x300),
            record: record(0x400, 1),
        };
        assert_eq!(history(&server(0x500, 1), None, &published), Ok(()));
        // Failed over: timeline 2 branched off after everything published.
        assert_eq!(
            history(
                &server(0x500, 2),
                Some(TimelineAncestry::BranchedAt(Lsn::new(0x350))),
                &published
            ),
            Ok(())
        );
        for (server, ancestry, needle) in [
            (server(0x200, 1), None, "WAL ends at 0/200"),
            (
                server(0x900, 2),
                Some(TimelineAncestry::BranchedAt(Lsn::new(0x250))),
                "branched off timeline 1 at 0/250",
            ),
            (
                server(0x900, 3),
                Some(TimelineAncestry::Unrelated),
                "not in the history",
            ),
        ] {
            let text = history(&server, ancestry, &published)
                .unwrap_err()
                .to_string();
            assert!(text.contains(needle), "{text}");
            assert!(text.contains("synchronized_standby_slots"), "{text}");
        }
        let other = ServerIdentity {
            system_id: "43".into(),
            ..server(0x500, 1)
        };
        let text = history(&other, None, &published).unwrap_err().to_string();
        assert!(text.contains("another cluster"), "{text}");
    }
}
