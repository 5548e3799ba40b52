//! What `/readyz` and `status` report: shared flags every stage updates.
//!
//! Ready means: the source is connected, the API has been reached once and
//! accepts the key, the slot lag is under `max_slot_lag`, and the state
//! store is writable. Each last error carries its time and is cleared when
//! its condition clears (the source reconnects, the API accepts again, the
//! store writes again). Snapshot progress per mapping
//! ([`Health::snapshot_progress`]) feeds `status` and `/metrics`.
//!
//! The `source_connected` and `api_ready` metrics are these flags: setting
//! a flag sets its gauge, so every source and client reports both through
//! one call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::ops::metrics::{MappingLabel, Metrics};

/// An error and when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamped {
    message: String,
    at: SystemTime,
}

impl Stamped {
    fn now(message: String) -> Stamped {
        Stamped {
            message,
            at: SystemTime::now(),
        }
    }
}

/// RFC 3339 UTC, seconds.
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// One mapping's snapshot copy, as `status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TableProgress {
    /// Rows copied so far.
    pub rows: u64,
    /// PostgreSQL's estimate of the table's rows (`reltuples`), if known.
    pub estimate: Option<u64>,
    /// Rows per second since the copy started (in this process).
    pub rows_per_second: Option<f64>,
    /// Seconds left at that rate, when the estimate is known.
    pub eta_seconds: Option<u64>,
    /// The copy finished.
    pub done: bool,
}

/// The rate and ETA of a copy (pure): `rows` copied in `elapsed` seconds
/// of `estimate`.
pub fn rate_and_eta(rows: u64, estimate: Option<u64>, elapsed: f64) -> (Option<f64>, Option<u64>) {
    if elapsed < 0.5 || rows == 0 {
        return (None, None);
    }
    let rate = rows as f64 / elapsed;
    let eta = estimate.map(|e| (e.saturating_sub(rows) as f64 / rate).ceil() as u64);
    (Some(rate), eta)
}

/// Progress state of one mapping's copy.
#[derive(Debug)]
struct Copy {
    started: Instant,
    rows: u64,
    estimate: Option<u64>,
    done: bool,
}

/// Shared health flags.
#[derive(Debug)]
pub struct Health {
    source_connected: AtomicBool,
    api_ok: AtomicBool,
    state_ok: AtomicBool,
    slot_lag: AtomicU64,
    slot_lag_limit: AtomicU64,
    /// The API answered with a verdict at least once.
    api_reached: AtomicBool,
    last_api_error: Mutex<Option<Stamped>>,
    last_source_error: Mutex<Option<Stamped>>,
    last_state_error: Mutex<Option<Stamped>>,
    started: SystemTime,
    snapshot: Mutex<BTreeMap<String, Copy>>,
    /// Mirrors `source_connected` (1/0).
    source_gauge: Gauge,
    /// Mirrors `api_ok` (1/0).
    api_gauge: Gauge,
    /// Mirror the snapshot progress.
    snapshot_rows: Family<MappingLabel, Gauge>,
    snapshot_estimate: Family<MappingLabel, Gauge>,
    /// Unix time of each mapping's last completed poll.
    last_poll: Family<MappingLabel, Gauge>,
}

impl Default for Health {
    /// Flags whose gauges are registered nowhere (checks, tests).
    fn default() -> Self {
        Self::with_gauges(&Metrics::new())
    }
}

impl Health {
    /// Flags that keep `metrics.source_connected` and `metrics.api_ready`
    /// equal to the source and API flags.
    pub fn new(metrics: &Metrics) -> Self {
        Self::with_gauges(metrics)
    }

    fn with_gauges(metrics: &Metrics) -> Self {
        let h = Health {
            source_connected: AtomicBool::new(false),
            api_ok: AtomicBool::new(true),
            state_ok: AtomicBool::new(true),
            slot_lag: AtomicU64::new(0),
            slot_lag_limit: AtomicU64::new(u64::MAX),
            api_reached: AtomicBool::new(false),
            last_api_error: Mutex::new(None),
            last_source_error: Mutex::new(None),
            last_state_error: Mutex::new(None),
            started: SystemTime::now(),
            snapshot: Mutex::new(BTreeMap::new()),
            source_gauge: metrics.source_connected.clone(),
            api_gauge: metrics.api_ready.clone(),
            snapshot_rows: metrics.snapshot_rows.clone(),
            snapshot_estimate: metrics.snapshot_rows_estimated.clone(),
            last_poll: metrics.last_poll.clone(),
        };
        h.source_gauge.set(0);
        h.api_gauge.set(0);
        h
    }
}

/// A snapshot of the flags.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HealthReport {
    /// Everything ready.
    pub ready: bool,
    /// Source connected.
    pub source_connected: bool,
    /// API accepts the key and answers.
    pub api_ready: bool,
    /// State store writable.
    pub state_ok: bool,
    /// Slot lag in bytes (replication mode).
    pub slot_lag_bytes: u64,
    /// Why not ready, one reason per failing check.
    pub reasons: Vec<String>,
    /// Last API error, if any (cleared when the API accepts again).
    pub last_api_error: Option<String>,
    /// When it happened (RFC 3339).
    #[serde(default)]
    pub last_api_error_at: Option<String>,
    /// Last source error, if any (cleared when the source reconnects).
    pub last_source_error: Option<String>,
    /// When it happened (RFC 3339).
    #[serde(default)]
    pub last_source_error_at: Option<String>,
    /// When this process started (RFC 3339).
    #[serde(default)]
    pub started_at: String,
    /// Seconds since then.
    #[serde(default)]
    pub uptime_seconds: u64,
    /// Snapshot copy progress per mapping (label `mapping[i] (type)` or
    /// the mapping id the source reports).
    #[serde(default)]
    pub snapshot: BTreeMap<String, TableProgress>,
}

impl Health {
    /// Sets the source connection flag and its gauge (and the error when
    /// disconnected).
    pub fn set_source(&self, connected: bool, error: Option<String>) {
        self.source_connected.store(connected, Ordering::Relaxed);
        self.source_gauge.set(i64::from(connected));
        record(&self.last_source_error, connected, error);
    }

    /// Sets the API flag and its gauge; returns the previous value. `ok`
    /// also means the API has been reached.
    pub fn set_api(&self, ok: bool, error: Option<String>) -> bool {
        record(&self.last_api_error, ok, error);
        if ok {
            self.api_reached.store(true, Ordering::Relaxed);
        }
        let was = self.api_ok.swap(ok, Ordering::Relaxed);
        self.api_gauge
            .set(i64::from(ok && self.api_reached.load(Ordering::Relaxed)));
        was
    }

    /// Sets the state store flag; returns the previous value.
    pub fn set_state(&self, ok: bool, error: Option<String>) -> bool {
        record(&self.last_state_error, ok, error);
        self.state_ok.swap(ok, Ordering::Relaxed)
    }

    /// Reports a mapping's snapshot copy: `rows` copied so far of about
    /// `estimate`. The first call starts its clock (for the rate and ETA);
    /// so does the first call after [`snapshot_done`](Self::snapshot_done)
    /// (a re-copy: `resync`, a lost slot).
    pub fn snapshot_progress(&self, mapping: &str, rows: u64, estimate: Option<u64>) {
        let mut m = self.snapshot.lock().expect("lock");
        let fresh = || Copy {
            started: Instant::now(),
            rows: 0,
            estimate: None,
            done: false,
        };
        let c = m.entry(mapping.to_string()).or_insert_with(fresh);
        if c.done {
            *c = fresh();
        }
        c.rows = rows;
        c.estimate = estimate.or(c.estimate);
        let label = MappingLabel {
            mapping: mapping.to_string(),
        };
        self.snapshot_rows
            .get_or_create(&label)
            .set(i64::try_from(rows).unwrap_or(i64::MAX));
        if let Some(e) = c.estimate {
            self.snapshot_estimate
                .get_or_create(&label)
                .set(i64::try_from(e).unwrap_or(i64::MAX));
        }
    }

    /// Marks a mapping's snapshot copy finished.
    pub fn snapshot_done(&self, mapping: &str) {
        if let Some(c) = self.snapshot.lock().expect("lock").get_mut(mapping) {
            c.done = true;
        }
    }

    /// Records that `mapping` was polled completely at `at`.
    pub fn polled(&self, mapping: &str, at: SystemTime) {
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_poll
            .get_or_create(&MappingLabel {
                mapping: mapping.to_string(),
            })
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// Records the slot lag and its limit.
    pub fn set_slot_lag(&self, lag: u64, limit: u64) {
        self.slot_lag.store(lag, Ordering::Relaxed);
        self.slot_lag_limit.store(limit, Ordering::Relaxed);
    }

    /// Is the API flag set?
    pub fn api_ok(&self) -> bool {
        self.api_ok.load(Ordering::Relaxed)
    }

    /// Everything, now.
    pub fn report(&self) -> HealthReport {
        let source = self.source_connected.load(Ordering::Relaxed);
        let api = self.api_ok.load(Ordering::Relaxed);
        let state = self.state_ok.load(Ordering::Relaxed);
        let lag = self.slot_lag.load(Ordering::Relaxed);
        let limit = self.slot_lag_limit.load(Ordering::Relaxed);
        let mut reasons = Vec::new();
        if !source {
            reasons.push("source database not connected".to_string());
        }
        let reached = self.api_reached.load(Ordering::Relaxed);
        if !api {
            reasons.push("Cobi API not accepting requests (see last_api_error)".to_string());
        } else if !reached {
            reasons.push("Cobi API not reached yet".to_string());
        }
        if !state {
            reasons.push(format!(
                "state store not writable: {}",
                self.last_state_error
                    .lock()
                    .expect("lock")
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default()
            ));
        }
        if lag > limit {
            reasons.push(format!(
                "slot lag {lag} bytes is above max_slot_lag ({limit})"
            ));
        }
        let api_err = self.last_api_error.lock().expect("lock").clone();
        let source_err = self.last_source_error.lock().expect("lock").clone();
        let snapshot = self
            .snapshot
            .lock()
            .expect("lock")
            .iter()
            .map(|(m, c)| {
                let (rate, eta) = if c.done {
                    (None, None)
                } else {
                    rate_and_eta(c.rows, c.estimate, c.started.elapsed().as_secs_f64())
                };
                (
                    m.clone(),
                    TableProgress {
                        rows: c.rows,
                        estimate: c.estimate,
                        rows_per_second: rate,
                        eta_seconds: eta,
                        done: c.done,
                    },
                )
            })
            .collect();
        HealthReport {
            ready: reasons.is_empty(),
            source_connected: source,
            api_ready: api && reached,
            state_ok: state,
            slot_lag_bytes: lag,
            reasons,
            last_api_error: api_err.as_ref().map(|e| e.message.clone()),
            last_api_error_at: api_err.map(|e| rfc3339(e.at)),
            last_source_error: source_err.as_ref().map(|e| e.message.clone()),
            last_source_error_at: source_err.map(|e| rfc3339(e.at)),
            started_at: rfc3339(self.started),
            uptime_seconds: self.started.elapsed().map_or(0, |d| d.as_secs()),
            snapshot,
        }
    }
}

/// Keeps a flag's last error: a new error replaces it (with the time now);
/// the condition clearing (`ok`) clears it.
fn record(slot: &Mutex<Option<Stamped>>, ok: bool, error: Option<String>) {
    let mut s = slot.lock().expect("lock");
    match error {
        Some(e) => *s = Some(Stamped::now(e)),
        None if ok => *s = None,
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_every_check() {
        let h = Health::default();
        assert!(!h.report().ready, "not ready before the source connects");
        h.set_source(true, None);
        let r = h.report();
        assert!(!r.ready, "not ready before the API was reached once");
        assert_eq!(r.reasons, vec!["Cobi API not reached yet".to_string()]);
        h.set_api(true, None);
        assert!(h.report().ready);
        h.set_api(false, Some("401 Unauthorized".into()));
        let r = h.report();
        assert!(!r.ready && !r.api_ready);
        assert_eq!(r.last_api_error.as_deref(), Some("401 Unauthorized"));
        let at = r.last_api_error_at.expect("the error has its time");
        assert!(at.ends_with('Z') && at.starts_with("20"), "{at}");
        h.set_api(true, None);
        let r = h.report();
        assert_eq!(r.last_api_error, None, "cleared once the API accepts again");
        assert_eq!(r.last_api_error_at, None);
        h.set_source(false, Some("connection refused".into()));
        assert!(h.report().last_source_error_at.is_some());
        h.set_source(true, None);
        assert_eq!(h.report().last_source_error, None, "cleared on reconnect");
        h.set_slot_lag(10, 5);
        assert!(h.report().reasons[0].contains("slot lag 10"));
        h.set_slot_lag(1, 5);
        h.set_state(false, Some("No space left on device".into()));
        assert!(h.report().reasons[0].contains("No space left"));
        h.set_state(true, None);
        assert!(h.report().ready);
    }

    #[test]
    fn copy_rate_and_eta() {
        let cases = [
            (0, Some(100), 10.0, None, None),
            (50, Some(100), 0.1, None, None),
            (50, Some(100), 10.0, Some(5.0), Some(10)),
            (50, None, 10.0, Some(5.0), None),
            (150, Some(100), 10.0, Some(15.0), Some(0)),
        ];
        for (rows, est, secs, rate, eta) in cases {
            assert_eq!(
                rate_and_eta(rows, est, secs),
                (rate, eta),
                "{rows} {est:?} {secs}"
            );
        }
    }

    /// The value of `cobi_sync_<name>` in the rendered metrics.
    fn gauge(m: &Metrics, name: &str) -> String {
        let prefix = format!("cobi_sync_{name} ");
        m.render()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .unwrap_or_else(|| panic!("{name} not exported:\n{}", m.render()))
    }

    #[test]
    fn the_flags_set_their_gauges() {
        let m = Metrics::new();
        let h = Health::new(&m);
        assert_eq!(gauge(&m, "source_connected"), "0");
        assert_eq!(
            gauge(&m, "api_ready"),
            "0",
            "not before the API was reached"
        );
        h.set_api(true, None);
        assert_eq!(gauge(&m, "api_ready"), "1");
        h.set_source(true, None);
        assert_eq!(gauge(&m, "source_connected"), "1");
        h.set_source(false, Some("connection refused".into()));
        assert_eq!(gauge(&m, "source_connected"), "0");
        h.set_api(false, Some("HTTP 401".into()));
        assert_eq!(gauge(&m, "api_ready"), "0");
        assert!(!h.set_api(true, None), "returns the previous flag");
        // Snapshot progress reaches the report and the gauges.
        h.snapshot_progress("shops/public.merchant", 40, Some(100));
        let r = h.report();
        let p = &r.snapshot["shops/public.merchant"];
        assert_eq!((p.rows, p.estimate, p.done), (40, Some(100), false));
        assert!(m
            .render()
            .contains("cobi_sync_snapshot_rows_estimated{mapping=\"shops/public.merchant\"} 100"));
        h.snapshot_done("shops/public.merchant");
        assert!(h.report().snapshot["shops/public.merchant"].done);
        // A re-copy of the same mapping starts over (not done, new count).
        h.snapshot_progress("shops/public.merchant", 0, Some(100));
        let p = &h.report().snapshot["shops/public.merchant"];
        assert_eq!((p.rows, p.estimate, p.done), (0, Some(100), false));
        assert_eq!(gauge(&m, "api_ready"), "1");
        // The flags and the gauges agree.
        assert!(h.report().api_ready && !h.report().source_connected);
    }
}
