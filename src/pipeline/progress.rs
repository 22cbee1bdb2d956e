//! How far outbox-cdc got, kept in the checkpoint (a NATS KV key per slot): the newest
//! position durable in JetStream, and the database history it was read from (system identifier
//! and timeline).
//!
//! The position reported to PostgreSQL never passes what is saved here, so a slot found ahead of
//! the record was moved by someone else — recreated, or advanced — and the events in between
//! were never published (see [`super::continuity`]).

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::sink::{Checkpoint, SinkError};

/// The checkpoint's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressRecord {
    /// Every event before this position is in JetStream.
    pub lsn: Lsn,
    /// Which database cluster (`IDENTIFY_SYSTEM`); None while an initial backfill is pending
    /// (no session has read the server's identity yet).
    pub system_id: Option<String>,
    /// The timeline `lsn` was on (None likewise).
    pub timeline: Option<u32>,
    /// A slot was created for `--initial-backfill`, whose rows are not all published yet:
    /// nothing was streamed from it, and a new start drops it and begins again.
    pub initial_backfill_pending: bool,
}

impl ProgressRecord {
    /// Reads a saved value.
    pub fn decode(bytes: &[u8]) -> Result<ProgressRecord, String> {
        let text = String::from_utf8_lossy(bytes);
        #[derive(serde::Deserialize)]
        struct Saved {
            lsn: String,
            system_id: Option<String>,
            timeline: Option<u32>,
            #[serde(default)]
            initial_backfill_pending: bool,
        }
        let saved: Saved = serde_json::from_slice(bytes)
            .map_err(|e| format!("`{text}` is not a progress record: {e}"))?;
        Ok(ProgressRecord {
            lsn: saved.lsn.parse().map_err(|e| format!("`{text}`: {e}"))?,
            system_id: saved.system_id,
            timeline: saved.timeline,
            initial_backfill_pending: saved.initial_backfill_pending,
        })
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(
            serde_json::json!({
                "lsn": self.lsn.to_string(),
                "system_id": self.system_id,
                "timeline": self.timeline,
                "initial_backfill_pending": self.initial_backfill_pending,
            })
            .to_string(),
        )
    }
}

/// A session's handle on the record: saves newer positions, and says what is saved.
pub struct Progress {
    checkpoint: Checkpoint,
    saved: ProgressRecord,
}

impl Progress {
    /// Marks an initial backfill as under way (before its slot is created).
    pub async fn initial_backfill_pending(checkpoint: &mut Checkpoint) -> Result<(), SinkError> {
        let record = ProgressRecord {
            lsn: Lsn::ZERO,
            system_id: None,
            timeline: None,
            initial_backfill_pending: true,
        };
        checkpoint.save(record.encode()).await
    }

    /// Saves `record` at once (the session's start: a new history, or a gap accepted).
    pub async fn start(
        mut checkpoint: Checkpoint,
        record: ProgressRecord,
    ) -> Result<Progress, SinkError> {
        checkpoint.save(record.encode()).await?;
        Ok(Progress {
            checkpoint,
            saved: record,
        })
    }

    /// Saves `lsn` when it is newer than what was saved.
    pub async fn save(&mut self, lsn: Lsn) -> Result<(), SinkError> {
        if lsn <= self.saved.lsn {
            return Ok(());
        }
        let record = ProgressRecord {
            lsn,
            ..self.saved.clone()
        };
        self.checkpoint.save(record.encode()).await?;
        self.saved = record;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes_and_refuses_anything_else() {
        let record = ProgressRecord {
            lsn: Lsn::new(0x1_0000_0010),
            system_id: Some("7714996357554463444".into()),
            timeline: Some(2),
            initial_backfill_pending: true,
        };
        assert_eq!(ProgressRecord::decode(&record.encode()), Ok(record));
        for bad in [&b"yesterday"[..], b"0/16B3748", br#"{"lsn":"x"}"#, b"{}"] {
            assert!(ProgressRecord::decode(bad).is_err());
        }
    }
}
