//! `outbox-cdc status`: where the slot stands, how much WAL it holds back, and whether it
//! survives a failover to a standby.

use std::fmt::Write as _;

use serde::Serialize;

use super::args::{
    CheckpointArgs, ConfigArgs, DatabaseArgs, JsonArgs, NatsArgs, SlotArgs, StandbyArgs,
};
use super::error::{AdminError, ConfigError};
use super::failover::{self, FailoverStatus};
use crate::lsn::Lsn;
use crate::pipeline::ProgressRecord;
use crate::sink::{Checkpoint, NatsAuth, NatsUrls};
use crate::source::connection::DatabaseUrl;
use crate::source::{Catalog, SlotName};

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub slot: SlotArgs,

    #[command(flatten)]
    pub standbys: StandbyArgs,

    // NATS, for the checkpoint: where `run` got to (a note says why when it is not read).
    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub checkpoint: CheckpointArgs,

    #[command(flatten)]
    pub output: JsonArgs,

    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `status`, its flags checked.
#[derive(Debug, Clone)]
pub struct Status {
    pub database: DatabaseUrl,
    pub slot: SlotName,
    pub standbys: Vec<DatabaseUrl>,
    pub nats: (NatsUrls, NatsAuth),
    pub checkpoint_bucket: String,
    pub json: bool,
}

impl StatusArgs {
    pub fn resolve(self) -> Result<Status, ConfigError> {
        Ok(Status {
            database: self.database.resolve()?,
            slot: self.slot.slot,
            standbys: self.standbys.resolve()?,
            nats: self.nats.resolve()?,
            checkpoint_bucket: self.checkpoint.checkpoint_bucket,
            json: self.output.json,
        })
    }
}

/// The slot as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub slot: String,
    pub plugin: String,
    pub database: String,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub server_wal_lsn: String,
    /// WAL between the confirmed position and the server's current position, in bytes.
    pub lag_bytes: Option<u64>,
    /// WAL the slot keeps on disk (from `restart_lsn`), in bytes.
    pub retained_bytes: Option<u64>,
    pub wal_status: Option<String>,
    /// The newest position confirmed, saved in NATS KV by `run`.
    pub checkpoint_lsn: Option<String>,
    /// Why there is no checkpoint position, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_note: Option<String>,
    /// Whether the slot survives a failover, and what it still needs.
    pub failover: FailoverStatus,
}

/// Prints the slot's state; an error when the slot is missing or invalidated.
pub async fn status(args: Status) -> Result<(), AdminError> {
    let catalog = Catalog::connect(&args.database).await?;
    let slot = &args.slot;
    let state = catalog
        .slot_state(slot)
        .await?
        .ok_or_else(|| AdminError::SlotMissing {
            slot: slot.to_string(),
        })?;
    let server = catalog.current_wal_lsn().await?;
    let failover = failover::check(&catalog, slot, Some(&state), &args.standbys).await?;
    let behind = |lsn: Option<Lsn>| lsn.map(|lsn| server.bytes_since(lsn));
    let (urls, auth) = &args.nats;
    let (checkpoint_lsn, checkpoint_note) =
        match Checkpoint::read(urls, auth, &args.checkpoint_bucket, slot.as_str()).await {
            Ok(Some(value)) => match ProgressRecord::decode(&value) {
                Ok(record) => (Some(record.lsn.to_string()), None),
                Err(e) => (None, Some(format!("unreadable: {e}"))),
            },
            Ok(None) => (
                None,
                Some(format!("none saved in bucket `{}`", args.checkpoint_bucket)),
            ),
            Err(e) => (None, Some(format!("not read: {e}"))),
        };
    let status = SlotStatus {
        slot: slot.to_string(),
        plugin: state.plugin.clone(),
        database: state.database.clone(),
        active: state.active_pid.is_some(),
        active_pid: state.active_pid,
        confirmed_flush_lsn: state.confirmed_flush_lsn.map(|l| l.to_string()),
        restart_lsn: state.restart_lsn.map(|l| l.to_string()),
        server_wal_lsn: server.to_string(),
        lag_bytes: behind(state.confirmed_flush_lsn),
        retained_bytes: behind(state.restart_lsn),
        wal_status: state.wal_status.clone(),
        checkpoint_lsn,
        checkpoint_note,
        failover,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{}", render_status(&status));
    }
    if status.wal_status.as_deref() == Some("lost") {
        return Err(AdminError::SlotLost {
            slot: slot.to_string(),
        });
    }
    Ok(())
}

fn render_status(s: &SlotStatus) -> String {
    let none = || "-".to_owned();
    let bytes = |b: Option<u64>| b.map_or_else(none, |b| format!("{b} bytes"));
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{key:<22}{value}");
    };
    line("slot", s.slot.clone());
    line("plugin", s.plugin.clone());
    line("database", s.database.clone());
    line(
        "active",
        match s.active_pid {
            Some(pid) => format!("yes (pid {pid})"),
            None => "no".into(),
        },
    );
    line(
        "confirmed_flush_lsn",
        s.confirmed_flush_lsn.clone().unwrap_or_else(none),
    );
    line("restart_lsn", s.restart_lsn.clone().unwrap_or_else(none));
    line("server WAL LSN", s.server_wal_lsn.clone());
    line("lag", bytes(s.lag_bytes));
    line("retained WAL", bytes(s.retained_bytes));
    line("wal_status", s.wal_status.clone().unwrap_or_else(none));
    line(
        "checkpoint",
        match (&s.checkpoint_lsn, &s.checkpoint_note) {
            (Some(lsn), _) => lsn.clone(),
            (None, Some(note)) => format!("- ({note})"),
            (None, None) => none(),
        },
    );
    let _ = writeln!(
        out,
        "failover              {}",
        match (s.failover.supported, s.failover.slot_failover) {
            (false, _) => "no: PostgreSQL before 17 has no failover slots",
            (true, Some(true)) => "yes: synced to standbys with sync_replication_slots",
            (true, _) => "no: the slot was created without failover",
        }
    );
    out.push_str(&failover::render(&s.failover.findings));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_shows_lag_and_holder() {
        let text = render_status(&SlotStatus {
            slot: "outbox_cdc".into(),
            plugin: "pgoutput".into(),
            database: "app".into(),
            active: true,
            active_pid: Some(42),
            confirmed_flush_lsn: Some("0/10".into()),
            restart_lsn: None,
            server_wal_lsn: "0/20".into(),
            lag_bytes: Some(16),
            retained_bytes: None,
            wal_status: Some("reserved".into()),
            checkpoint_lsn: Some("0/18".into()),
            checkpoint_note: None,
            failover: FailoverStatus {
                supported: false,
                slot_failover: None,
                synchronized_standby_slots: Vec::new(),
                standbys: Vec::new(),
                findings: Vec::new(),
            },
        });
        assert!(text.contains("checkpoint            0/18"), "{text}");
        assert!(text.contains("yes (pid 42)"), "{text}");
        assert!(text.contains("16 bytes"), "{text}");
        assert!(text.contains("retained WAL          -"), "{text}");
        assert!(
            text.contains("failover              no: PostgreSQL before 17"),
            "{text}"
        );
    }
}
