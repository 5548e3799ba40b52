//! The status report (`cobi-sync status`, `GET /status`): mode, source
//! position, API readiness and per-type counters. Built from the state
//! store and the health flags; it holds counts and positions only — no
//! record contents, no secrets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{Mode, Settings};
use crate::model::schema::schema;
use crate::ops::health::HealthReport;
use crate::state::{Checkpoint, StateError, StateStore, TableSnapshot};

/// Everything `status` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// `replication` or `poll`.
    pub mode: String,
    /// Whether the report comes from the running daemon.
    pub running: bool,
    /// Source side.
    pub source: SourceStatus,
    /// API side.
    pub api: ApiStatus,
    /// Per Cobi type.
    pub types: BTreeMap<String, TypeStatus>,
}

/// The source side of the report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SourceStatus {
    /// Connected now (false when stopped).
    pub connected: bool,
    /// Replication slot name.
    pub slot: Option<String>,
    /// Slot lag in bytes (running daemon only).
    pub lag_bytes: Option<u64>,
    /// Confirmed LSN (`0/16B3748`).
    pub confirmed_lsn: Option<String>,
    /// Snapshot progress per mapping (`done`, `in progress`, `not started`).
    pub snapshot: BTreeMap<String, String>,
    /// Poll cursors per mapping (cursor column value).
    pub cursors: BTreeMap<String, String>,
    /// Last source error.
    pub last_error: Option<String>,
}

/// The API side of the report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ApiStatus {
    /// Accepting requests with the key.
    pub ready: bool,
    /// Last error.
    pub last_error: Option<String>,
}

/// Counters of one type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TypeStatus {
    /// Records read from the source.
    pub read: u64,
    /// Records accepted.
    pub sent: u64,
    /// Dead letters now held.
    pub dead_letters: u64,
    /// Last accepted delivery.
    pub last_success: Option<String>,
}

/// Formats an LSN the PostgreSQL way.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Builds the report. `health` is `None` when the daemon is stopped.
pub fn build(
    settings: &Settings,
    store: &dyn StateStore,
    health: Option<&HealthReport>,
) -> Result<StatusReport, StateError> {
    let mut source = SourceStatus::default();
    if settings.source.mode == Mode::Replication {
        source.slot = Some(settings.source.replication.slot.clone());
    }
    for c in store.checkpoints()? {
        match c {
            Checkpoint::Replication(r) => {
                source.confirmed_lsn = Some(format_lsn(r.lsn));
                for (m, t) in r.tables {
                    source.snapshot.insert(
                        m,
                        match t {
                            TableSnapshot::Done => "done".into(),
                            TableSnapshot::InProgress(_) => "in progress".into(),
                            TableSnapshot::NotStarted => "not started".into(),
                        },
                    );
                }
            }
            Checkpoint::PollCursor { mapping, position } => {
                let v = position
                    .cursor
                    .and_then(|c| c.text)
                    .unwrap_or_else(|| "(start)".into());
                source.cursors.insert(mapping, v);
            }
            Checkpoint::Snapshot { .. } | Checkpoint::PollGuard { .. } => {}
        }
    }
    let mut api = ApiStatus::default();
    if let Some(h) = health {
        source.connected = h.source_connected;
        source.last_error = h.last_source_error.clone();
        if settings.source.mode == Mode::Replication {
            source.lag_bytes = Some(h.slot_lag_bytes);
        }
        api.ready = h.api_ready;
        api.last_error = h.last_api_error.clone();
    }
    let stats = store.stats()?;
    let dead = store.dead_letter_counts()?;
    let mut types = BTreeMap::new();
    let mapped: Vec<_> = settings.mappings.iter().map(|m| m.ty).collect();
    for (id, t) in schema().types.iter().enumerate() {
        let id = id as u8;
        let st = stats.get(&id);
        let d = dead.get(&id).copied().unwrap_or(0);
        if !mapped.contains(&id) && st.is_none() && d == 0 {
            continue;
        }
        types.insert(
            t.name.clone(),
            TypeStatus {
                read: st.map_or(0, |s| s.read),
                sent: st.map_or(0, |s| s.sent),
                dead_letters: d,
                last_success: st.and_then(|s| s.last_success.clone()),
            },
        );
    }
    Ok(StatusReport {
        mode: settings.source.mode.as_str().into(),
        running: health.is_some(),
        source,
        api,
        types,
    })
}

/// Human-readable rendering.
pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "cobi-sync {} mode, daemon {}\n",
        r.mode,
        if r.running {
            "running"
        } else {
            "stopped (state read from disk)"
        }
    ));
    if r.running {
        out.push_str(&format!(
            "source: {}{}\n",
            if r.source.connected {
                "connected"
            } else {
                "NOT connected"
            },
            r.source
                .last_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        ));
        out.push_str(&format!(
            "api:    {}{}\n",
            if r.api.ready { "ready" } else { "NOT ready" },
            r.api
                .last_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        ));
    }
    if let Some(slot) = &r.source.slot {
        out.push_str(&format!(
            "slot {slot}: confirmed {}{}\n",
            r.source.confirmed_lsn.as_deref().unwrap_or("(none yet)"),
            r.source
                .lag_bytes
                .map(|l| format!(", lag {l} bytes"))
                .unwrap_or_default()
        ));
    }
    for (m, s) in &r.source.snapshot {
        if s != "done" {
            out.push_str(&format!("snapshot {m}: {s}\n"));
        }
    }
    for (m, c) in &r.source.cursors {
        out.push_str(&format!("cursor {m}: {c}\n"));
    }
    out.push_str(&format!(
        "{:<20} {:>12} {:>12} {:>12}  {}\n",
        "type", "read", "sent", "dead letters", "last success"
    ));
    for (t, s) in &r.types {
        out.push_str(&format!(
            "{:<20} {:>12} {:>12} {:>12}  {}\n",
            t,
            s.read,
            s.sent,
            s.dead_letters,
            s.last_success.as_deref().unwrap_or("-")
        ));
    }
    out
}
