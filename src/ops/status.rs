//! The status report (`cobi-sync status`, `GET /status`): mode, source
//! position, API readiness and per-type counters. Built from the state
//! store and the health flags; it holds counts and positions only — no
//! record contents, no secrets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{Mode, Settings};
use crate::model::schema::schema;
use crate::ops::health::{HealthReport, TableProgress};
use crate::state::{Checkpoint, StateError, StateStore, TableSnapshot};

/// Everything `status` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// The version of the cobi-sync that made the report (the running
    /// daemon's, or this command's when stopped).
    #[serde(default)]
    pub version: String,
    /// `replication` or `poll`.
    pub mode: String,
    /// Whether the report comes from the running daemon.
    pub running: bool,
    /// When the running daemon started (RFC 3339).
    #[serde(default)]
    pub started_at: Option<String>,
    /// Seconds it has been running.
    #[serde(default)]
    pub uptime_seconds: Option<u64>,
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
    /// Snapshot state per mapping (`done`, `in progress`, `not started`).
    pub snapshot: BTreeMap<String, String>,
    /// Live copy progress per mapping (rows, estimate, rate, ETA), while
    /// the running daemon copies.
    #[serde(default)]
    pub snapshot_progress: BTreeMap<String, TableProgress>,
    /// Poll cursors per mapping (cursor column value).
    pub cursors: BTreeMap<String, String>,
    /// Last source error (cleared once the source reconnects).
    pub last_error: Option<String>,
    /// When it happened (RFC 3339).
    #[serde(default)]
    pub last_error_at: Option<String>,
}

/// The API side of the report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ApiStatus {
    /// Accepting requests with the key.
    pub ready: bool,
    /// Last error (cleared once the API accepts again).
    pub last_error: Option<String>,
    /// When it happened (RFC 3339).
    #[serde(default)]
    pub last_error_at: Option<String>,
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
        source.last_error_at = h.last_source_error_at.clone();
        source.snapshot_progress = h.snapshot.clone();
        if settings.source.mode == Mode::Replication {
            source.lag_bytes = Some(h.slot_lag_bytes);
        }
        api.ready = h.api_ready;
        api.last_error = h.last_api_error.clone();
        api.last_error_at = h.last_api_error_at.clone();
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
        version: env!("CARGO_PKG_VERSION").into(),
        mode: settings.source.mode.as_str().into(),
        running: health.is_some(),
        started_at: health.map(|h| h.started_at.clone()),
        uptime_seconds: health.map(|h| h.uptime_seconds),
        source,
        api,
        types,
    })
}

/// One copy's progress: `1200 of ~5000 rows (24%), 300 rows/s, ETA 13s`.
pub fn render_progress(p: &TableProgress) -> String {
    if p.done {
        return format!("done, {} rows", p.rows);
    }
    let mut s = match p.estimate {
        Some(e) if e > 0 => format!(
            "{} of ~{e} rows ({}%)",
            p.rows,
            (p.rows.saturating_mul(100) / e).min(100)
        ),
        _ => format!("{} rows", p.rows),
    };
    if let Some(rate) = p.rows_per_second {
        s.push_str(&format!(", {rate:.0} rows/s"));
    }
    if let Some(eta) = p.eta_seconds {
        s.push_str(&format!(
            ", ETA {}",
            humantime::format_duration(std::time::Duration::from_secs(eta))
        ));
    }
    s
}

/// Human-readable rendering.
pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    let since = |at: &Option<String>| at.as_ref().map(|t| format!(" at {t}")).unwrap_or_default();
    out.push_str(&format!(
        "cobi-sync {} {} mode, daemon {}\n",
        r.version,
        r.mode,
        match (r.running, r.uptime_seconds) {
            (true, Some(up)) => format!(
                "running for {} (since {})",
                humantime::format_duration(std::time::Duration::from_secs(up)),
                r.started_at.as_deref().unwrap_or("?")
            ),
            (true, None) => "running".into(),
            _ => "stopped (state read from disk)".into(),
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
                .map(|e| format!(" (last error{}: {e})", since(&r.source.last_error_at)))
                .unwrap_or_default()
        ));
        out.push_str(&format!(
            "api:    {}{}\n",
            if r.api.ready { "ready" } else { "NOT ready" },
            r.api
                .last_error
                .as_ref()
                .map(|e| format!(" (last error{}: {e})", since(&r.api.last_error_at)))
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
        if s != "done" && !r.source.snapshot_progress.contains_key(m) {
            out.push_str(&format!("snapshot {m}: {s}\n"));
        }
    }
    for (m, p) in &r.source.snapshot_progress {
        out.push_str(&format!("snapshot {m}: {}\n", render_progress(p)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        let p = |rows, estimate, rate, eta, done| TableProgress {
            rows,
            estimate,
            rows_per_second: rate,
            eta_seconds: eta,
            done,
        };
        let cases = [
            (
                p(1200, Some(5000), Some(300.0), Some(13), false),
                "1200 of ~5000 rows (24%), 300 rows/s, ETA 13s",
            ),
            (p(10, None, None, None, false), "10 rows"),
            (
                p(6000, Some(5000), None, None, false),
                "6000 of ~5000 rows (100%)",
            ),
            (p(5000, Some(5000), None, None, true), "done, 5000 rows"),
        ];
        for (progress, want) in cases {
            assert_eq!(render_progress(&progress), want);
        }
    }
}
