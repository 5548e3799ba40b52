//! What `/readyz` and `status` report: shared flags every stage updates.
//!
//! Ready means: the source is connected, the API accepts the key, the slot
//! lag is under `max_slot_lag`, and the state store is writable.
//!
//! The `source_connected` and `api_ready` metrics are these flags: setting
//! a flag sets its gauge, so every source and client reports both through
//! one call.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;

use crate::ops::metrics::Metrics;

/// Shared health flags.
#[derive(Debug)]
pub struct Health {
    source_connected: AtomicBool,
    api_ok: AtomicBool,
    state_ok: AtomicBool,
    slot_lag: AtomicU64,
    slot_lag_limit: AtomicU64,
    last_api_error: Mutex<Option<String>>,
    last_source_error: Mutex<Option<String>>,
    last_state_error: Mutex<Option<String>>,
    /// Mirrors `source_connected` (1/0).
    source_gauge: Gauge,
    /// Mirrors `api_ok` (1/0).
    api_gauge: Gauge,
}

impl Default for Health {
    /// Flags whose gauges are registered nowhere (checks, tests).
    fn default() -> Self {
        Self::with_gauges(Gauge::default(), Gauge::default())
    }
}

impl Health {
    /// Flags that keep `metrics.source_connected` and `metrics.api_ready`
    /// equal to the source and API flags.
    pub fn new(metrics: &Metrics) -> Self {
        Self::with_gauges(metrics.source_connected.clone(), metrics.api_ready.clone())
    }

    fn with_gauges(source_gauge: Gauge, api_gauge: Gauge) -> Self {
        let h = Health {
            source_connected: AtomicBool::new(false),
            api_ok: AtomicBool::new(true),
            state_ok: AtomicBool::new(true),
            slot_lag: AtomicU64::new(0),
            slot_lag_limit: AtomicU64::new(u64::MAX),
            last_api_error: Mutex::new(None),
            last_source_error: Mutex::new(None),
            last_state_error: Mutex::new(None),
            source_gauge,
            api_gauge,
        };
        h.source_gauge.set(0);
        h.api_gauge.set(1);
        h
    }
}

/// A snapshot of the flags.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Last API error, if any.
    pub last_api_error: Option<String>,
    /// Last source error, if any.
    pub last_source_error: Option<String>,
}

impl Health {
    /// Sets the source connection flag and its gauge (and the error when
    /// disconnected).
    pub fn set_source(&self, connected: bool, error: Option<String>) {
        self.source_connected.store(connected, Ordering::Relaxed);
        self.source_gauge.set(i64::from(connected));
        if let Some(e) = error {
            *self.last_source_error.lock().expect("lock") = Some(e);
        }
    }

    /// Sets the API flag and its gauge; returns the previous value.
    pub fn set_api(&self, ok: bool, error: Option<String>) -> bool {
        if let Some(e) = error {
            *self.last_api_error.lock().expect("lock") = Some(e);
        }
        self.api_gauge.set(i64::from(ok));
        self.api_ok.swap(ok, Ordering::Relaxed)
    }

    /// Sets the state store flag; returns the previous value.
    pub fn set_state(&self, ok: bool, error: Option<String>) -> bool {
        if let Some(e) = error {
            *self.last_state_error.lock().expect("lock") = Some(e);
        }
        self.state_ok.swap(ok, Ordering::Relaxed)
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
        if !api {
            reasons.push("Cobi API not accepting requests (see last_api_error)".to_string());
        }
        if !state {
            reasons.push(format!(
                "state store not writable: {}",
                self.last_state_error
                    .lock()
                    .expect("lock")
                    .clone()
                    .unwrap_or_default()
            ));
        }
        if lag > limit {
            reasons.push(format!(
                "slot lag {lag} bytes is above max_slot_lag ({limit})"
            ));
        }
        HealthReport {
            ready: reasons.is_empty(),
            source_connected: source,
            api_ready: api,
            state_ok: state,
            slot_lag_bytes: lag,
            reasons,
            last_api_error: self.last_api_error.lock().expect("lock").clone(),
            last_source_error: self.last_source_error.lock().expect("lock").clone(),
        }
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
        assert!(h.report().ready);
        h.set_api(false, Some("401 Unauthorized".into()));
        let r = h.report();
        assert!(!r.ready && !r.api_ready);
        assert_eq!(r.last_api_error.as_deref(), Some("401 Unauthorized"));
        h.set_api(true, None);
        h.set_slot_lag(10, 5);
        assert!(h.report().reasons[0].contains("slot lag 10"));
        h.set_slot_lag(1, 5);
        h.set_state(false, Some("No space left on device".into()));
        assert!(h.report().reasons[0].contains("No space left"));
        h.set_state(true, None);
        assert!(h.report().ready);
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
        assert_eq!(gauge(&m, "api_ready"), "1", "api_ok starts true");
        h.set_source(true, None);
        assert_eq!(gauge(&m, "source_connected"), "1");
        h.set_source(false, Some("connection refused".into()));
        assert_eq!(gauge(&m, "source_connected"), "0");
        h.set_api(false, Some("HTTP 401".into()));
        assert_eq!(gauge(&m, "api_ready"), "0");
        assert!(!h.set_api(true, None), "returns the previous flag");
        assert_eq!(gauge(&m, "api_ready"), "1");
        // The flags and the gauges agree.
        assert!(h.report().api_ready && !h.report().source_connected);
    }
}
