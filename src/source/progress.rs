//! Progress of long reads (snapshots, re-copies): a progress bar with
//! rows/s and ETA when stdout is a terminal, a log line every 10 seconds
//! otherwise, and — when a [`Health`] is given — the same numbers per table
//! in `status` and `/metrics` (rows and the planner's estimate from
//! `reltuples`; [`Health::snapshot_progress`] derives rate and ETA).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

use crate::ops::health::{rate_and_eta, Health};

/// Progress of one mapping's read.
pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    health: Option<Arc<Health>>,
    estimate: Option<u64>,
    done: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// Starts reporting; `total` is an estimate of the rows to read.
    pub fn new(label: &str, total: Option<u64>) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let b = match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            };
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:40} [{bar:30}] {human_pos}/{human_len} {per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(label.to_string());
            b
        });
        let now = Instant::now();
        Progress {
            label: label.to_string(),
            bar,
            health: None,
            estimate: total,
            done: 0,
            started: now,
            last_log: now,
        }
    }

    /// Also reports to `health` (`status`, `/metrics`).
    pub fn on_health(mut self, health: Arc<Health>) -> Progress {
        self.health = Some(health);
        self.publish(false);
        self
    }

    fn publish(&self, done: bool) {
        if let Some(h) = &self.health {
            h.snapshot_progress(&self.label, self.done, self.estimate);
            if done {
                h.snapshot_done(&self.label);
            }
        }
    }

    /// Counts `n` more rows.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        self.publish(false);
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if self.last_log.elapsed() >= Duration::from_secs(10) {
            self.last_log = Instant::now();
            let (_, eta) = rate_and_eta(
                self.done,
                self.estimate,
                self.started.elapsed().as_secs_f64(),
            );
            info!(mapping = %self.label, rows = self.done, estimate = self.estimate,
                rows_per_sec = self.rate() as u64, eta_seconds = eta, "snapshot progress");
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    /// Rows counted so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Ends the bar (or logs the total).
    pub fn finish(self) {
        self.publish(true);
        if let Some(b) = &self.bar {
            b.finish();
        }
        if self.done > 0 {
            info!(mapping = %self.label, rows = self.done, rows_per_sec = self.rate() as u64, "read complete");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reaches_status_and_metrics_through_health() {
        let metrics = crate::ops::metrics::Metrics::new();
        let health = Arc::new(Health::new(&metrics));
        let mut p = Progress::new("mapping[1] (shops)", Some(100)).on_health(health.clone());
        p.add(40);
        let now = health.report().snapshot;
        assert_eq!(now["mapping[1] (shops)"].rows, 40);
        assert_eq!(now["mapping[1] (shops)"].estimate, Some(100));
        assert!(!now["mapping[1] (shops)"].done);
        p.finish();
        assert!(health.report().snapshot["mapping[1] (shops)"].done);
        let text = metrics.render();
        assert!(
            text.contains("snapshot_rows{mapping=\"mapping[1] (shops)\"} 40"),
            "{text}"
        );
        assert!(
            text.contains("snapshot_rows_estimated{mapping=\"mapping[1] (shops)\"} 100"),
            "{text}"
        );
    }
}
