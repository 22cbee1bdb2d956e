//! What a failover needs, checked for `setup` and `status`: on PostgreSQL 17+, a slot with
//! `failover`, standbys that keep a copy of it (`sync_replication_slots`, `hot_standby_feedback`,
//! a `primary_conninfo` with `dbname`, a physical slot), and `synchronized_standby_slots` on the
//! primary, without which a promoted standby can lack WAL whose events were already published.

use serde::Serialize;

use crate::source::connection::DatabaseUrl;
use crate::source::{Catalog, SlotName, SlotState, SourceError};

/// One thing checked: fine, or what to change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub ok: bool,
    pub text: String,
}

impl Finding {
    fn ok(text: impl Into<String>) -> Finding {
        Finding {
            ok: true,
            text: text.into(),
        }
    }

    fn fix(text: impl Into<String>) -> Finding {
        Finding {
            ok: false,
            text: text.into(),
        }
    }
}

/// The failover picture, for `status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverStatus {
    /// PostgreSQL 17+: slots can be synced to standbys.
    pub supported: bool,
    /// The slot's `failover` flag (PostgreSQL 17+).
    pub slot_failover: Option<bool>,
    pub synchronized_standby_slots: Vec<String>,
    pub standbys: Vec<StandbyStatus>,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StandbyStatus {
    pub url: String,
    /// The slot is on the standby, kept in sync (`pg_replication_slots.synced`).
    pub slot_synced: Option<bool>,
    pub slot_confirmed_flush_lsn: Option<String>,
}

/// Checks the primary `catalog` (and each standby in `standbys`) for what failover needs.
pub async fn check(
    catalog: &Catalog,
    slot: &SlotName,
    slot_state: Option<&SlotState>,
    standbys: &[DatabaseUrl],
) -> Result<FailoverStatus, SourceError> {
    let mut findings = Vec::new();
    let Some(primary) = catalog.primary_failover().await? else {
        findings.push(Finding::fix(format!(
            "PostgreSQL {} has no failover slots (they came with 17): after a failover to a \
             standby the slot is gone, and outbox-cdc stops there naming the events to \
             re-publish from the table",
            version_text(catalog.server_version_num())
        )));
        return Ok(FailoverStatus {
            supported: false,
            slot_failover: None,
            synchronized_standby_slots: Vec::new(),
            standbys: Vec::new(),
            findings,
        });
    };
    match slot_state.and_then(|s| s.failover) {
        Some(true) => findings.push(Finding::ok(format!(
            "replication slot `{slot}` has failover = true: standbys with sync_replication_slots keep a copy"
        ))),
        Some(false) => findings.push(Finding::fix(format!(
            "replication slot `{slot}` was created without failover: after a failover it is gone. \
             `outbox-cdc setup --apply` turns it on (or: psql \"dbname={} replication=database\" \
             -c 'ALTER_REPLICATION_SLOT {slot} (FAILOVER true)')",
            catalog.database().dbname
        ))),
        None => {}
    }
    let physical: Vec<&str> = primary
        .physical_slots
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    if physical.is_empty() {
        findings.push(Finding::fix(
            "no physical replication slot: a standby keeps failover slots in sync only when it \
             streams through one. Create one per standby (`SELECT \
             pg_create_physical_replication_slot('standby1');`) and set primary_slot_name = \
             'standby1' on it",
        ));
    }
    let listed = &primary.synchronized_standby_slots;
    if listed.is_empty() {
        let names = if physical.is_empty() {
            "standby1".to_owned()
        } else {
            physical.join(",")
        };
        findings.push(Finding::fix(format!(
            "synchronized_standby_slots is empty: outbox-cdc may publish WAL a standby has not \
             received yet, and after failing over to that standby the stream holds events the \
             database lost (outbox-cdc then stops). `ALTER SYSTEM SET synchronized_standby_slots \
             = '{names}'; SELECT pg_reload_conf();`"
        )));
    } else {
        for name in listed {
            if !physical.contains(&name.as_str()) {
                findings.push(Finding::fix(format!(
                    "synchronized_standby_slots names `{name}`, which is no physical slot here: \
                     logical walsenders wait for it in vain"
                )));
            }
        }
        if listed.iter().all(|n| physical.contains(&n.as_str())) {
            findings.push(Finding::ok(format!(
                "synchronized_standby_slots = {}: nothing is published before those standbys have it",
                listed.join(",")
            )));
        }
    }
    let mut standby_statuses = Vec::new();
    for url in standbys {
        let (status, mut found) = check_standby(url, slot, listed).await?;
        standby_statuses.push(status);
        findings.append(&mut found);
    }
    Ok(FailoverStatus {
        supported: true,
        slot_failover: slot_state.and_then(|s| s.failover),
        synchronized_standby_slots: listed.clone(),
        standbys: standby_statuses,
        findings,
    })
}

async fn check_standby(
    url: &DatabaseUrl,
    slot: &SlotName,
    synchronized: &[String],
) -> Result<(StandbyStatus, Vec<Finding>), SourceError> {
    let standby = Catalog::connect_any(url).await?;
    let name = url.to_string();
    let mut findings = Vec::new();
    let mut status = StandbyStatus {
        url: name.clone(),
        slot_synced: None,
        slot_confirmed_flush_lsn: None,
    };
    let Some(settings) = standby.standby_failover().await? else {
        findings.push(Finding::fix(format!(
            "standby {name}: PostgreSQL {} cannot keep failover slots (17+)",
            version_text(standby.server_version_num())
        )));
        return Ok((status, findings));
    };
    if !settings.in_recovery {
        findings.push(Finding::fix(format!(
            "{name} is not a standby (not in recovery)"
        )));
        return Ok((status, findings));
    }
    let mut fix = |what: String| findings.push(Finding::fix(format!("standby {name}: {what}")));
    if !settings.sync_replication_slots {
        fix("`ALTER SYSTEM SET sync_replication_slots = on; SELECT pg_reload_conf();`".into());
    }
    if !settings.hot_standby_feedback {
        fix("`ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf();`".into());
    }
    if !settings.conninfo_has_dbname {
        fix("primary_conninfo names no database: add `dbname=<database>` (the slot sync worker connects to one)".into());
    }
    if settings.primary_slot_name.is_empty() {
        fix("primary_slot_name is not set: stream through a physical slot of the primary".into());
    } else if !synchronized.contains(&settings.primary_slot_name) {
        fix(format!(
            "its physical slot `{}` is not in the primary's synchronized_standby_slots",
            settings.primary_slot_name
        ));
    }
    match standby.slot_state(slot).await? {
        Some(state) => {
            status.slot_synced = state.synced;
            status.slot_confirmed_flush_lsn = state.confirmed_flush_lsn.map(|l| l.to_string());
            let at = state
                .confirmed_flush_lsn
                .map_or_else(|| "-".to_owned(), |l| l.to_string());
            if state.synced == Some(true) && !state.temporary {
                findings.push(Finding::ok(format!(
                    "standby {name}: replication slot `{slot}` is synced (confirmed {at})"
                )));
            } else {
                findings.push(Finding::fix(format!(
                    "standby {name}: replication slot `{slot}` is being synced but not usable yet \
                     (it becomes so once the primary's slot has moved past the standby's catalog \
                     xmin: let outbox-cdc confirm a little)"
                )));
            }
        }
        None => findings.push(Finding::fix(format!(
            "standby {name}: replication slot `{slot}` is not on it (yet)"
        ))),
    }
    Ok((status, findings))
}

fn version_text(num: i32) -> String {
    format!("{}.{}", num / 10_000, num % 10_000)
}

/// The findings as lines of `setup`/`status` output.
pub fn render(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(|f| format!("  {}  {}\n", if f.ok { "ok" } else { "->" }, f.text))
        .collect()
}
