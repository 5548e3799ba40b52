//! Progress of long reads (snapshots, re-copies): a progress bar with
//! rows/s and ETA when stdout is a terminal, a log line every 10 seconds
//! otherwise, and — when a [`Board`] is given — the same numbers per table
//! in `status` and `/metrics` (rows, the planner's estimate from
//! `reltuples`, rate, ETA).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tracing::info;

/// One table's copy, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableProgress {
    /// Rows copied so far.
    pub rows: u64,
    /// The planner's estimate of the table's rows, if it has one.
    pub estimate: Option<u64>,
    /// Rows per second since the copy started.
    pub rows_per_sec: f64,
    /// Seconds left at this rate, when there is an estimate.
    pub eta_seconds: Option<u64>,
    /// The copy finished.
    pub done: bool,
}

/// `mapping="mapping[3] (branches)"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MappingLabel {
    /// The mapping's label.
    pub mapping: String,
}

/// Copy progress per mapping, for `status` and `/metrics`.
pub struct Board {
    tables: Mutex<BTreeMap<String, TableProgress>>,
    rows: Family<MappingLabel, Gauge>,
    estimate: Family<MappingLabel, Gauge>,
    rate: Family<MappingLabel, Gauge<f64, AtomicU64>>,
    eta: Family<MappingLabel, Gauge>,
}

impl Board {
    /// A board whose gauges are registered in `registry`.
    pub fn new(registry: &mut Registry) -> Board {
        let b = Board {
            tables: Mutex::new(BTreeMap::new()),
            rows: Family::default(),
            estimate: Family::default(),
            rate: Family::default(),
            eta: Family::default(),
        };
        registry.register(
            "snapshot_rows",
            "Rows copied by the running snapshot or re-copy, per mapping",
            b.rows.clone(),
        );
        registry.register(
            "snapshot_rows_estimate",
            "The planner's estimate of the rows of a table being copied (reltuples)",
            b.estimate.clone(),
        );
        registry.register(
            "snapshot_rows_per_second",
            "Copy rate of a table being copied",
            b.rate.clone(),
        );
        registry.register(
            "snapshot_eta_seconds",
            "Seconds left of a table's copy at its current rate",
            b.eta.clone(),
        );
        b
    }

    /// Every table's progress (copies of this process).
    pub fn snapshot(&self) -> BTreeMap<String, TableProgress> {
        self.tables.lock().expect("lock").clone()
    }

    fn publish(&self, label: &str, p: TableProgress) {
        let l = MappingLabel {
            mapping: label.to_string(),
        };
        self.rows.get_or_create(&l).set(p.rows as i64);
        self.estimate
            .get_or_create(&l)
            .set(p.estimate.unwrap_or(0) as i64);
        self.rate.get_or_create(&l).set(p.rows_per_sec);
        self.eta
            .get_or_create(&l)
            .set(p.eta_seconds.unwrap_or(0) as i64);
        self.tables
            .lock()
            .expect("lock")
            .insert(label.to_string(), p);
    }
}

/// Seconds left to copy `estimate` rows when `rows` took `elapsed`
/// (`None` without an estimate or a rate; 0 once past the estimate).
pub fn eta(rows: u64, estimate: Option<u64>, elapsed: Duration) -> Option<u64> {
    let estimate = estimate?;
    let rate = rows as f64 / elapsed.as_secs_f64();
    if rows == 0 || !rate.is_finite() || rate <= 0.0 {
        return None;
    }
    Some((estimate.saturating_sub(rows) as f64 / rate).ceil() as u64)
}

/// Progress of one mapping's read.
pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    board: Option<Arc<Board>>,
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
            board: None,
            estimate: total,
            done: 0,
            started: now,
            last_log: now,
        }
    }

    /// Also reports to `board` (`status`, `/metrics`).
    pub fn on_board(mut self, board: Arc<Board>) -> Progress {
        self.board = Some(board);
        self.publish(false);
        self
    }

    fn publish(&self, done: bool) {
        if let Some(b) = &self.board {
            let elapsed = self.started.elapsed();
            b.publish(
                &self.label,
                TableProgress {
                    rows: self.done,
                    estimate: self.estimate,
                    rows_per_sec: self.rate(),
                    eta_seconds: if done {
                        Some(0)
                    } else {
                        eta(self.done, self.estimate, elapsed)
                    },
                    done,
                },
            );
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
            let elapsed = self.started.elapsed();
            info!(mapping = %self.label, rows = self.done, estimate = self.estimate,
                rows_per_sec = self.rate() as u64,
                eta_seconds = eta(self.done, self.estimate, elapsed),
                "snapshot progress");
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
    fn eta_from_rate_and_estimate() {
        let s = Duration::from_secs;
        let cases = [
            (1000, Some(3000), s(10), Some(20)),
            (1000, Some(1000), s(10), Some(0)),
            (1500, Some(1000), s(10), Some(0)),
            (0, Some(1000), s(10), None),
            (1000, None, s(10), None),
            (1, Some(4), s(3), Some(9)),
        ];
        for (rows, estimate, elapsed, want) in cases {
            assert_eq!(
                eta(rows, estimate, elapsed),
                want,
                "{rows} of {estimate:?} in {elapsed:?}"
            );
        }
    }

    #[test]
    fn the_board_reports_per_mapping() {
        let mut registry = Registry::default();
        let board = Arc::new(Board::new(&mut registry));
        let mut p = Progress::new("mapping[1] (shops)", Some(100)).on_board(board.clone());
        p.add(40);
        let now = board.snapshot();
        assert_eq!(now["mapping[1] (shops)"].rows, 40);
        assert_eq!(now["mapping[1] (shops)"].estimate, Some(100));
        assert!(!now["mapping[1] (shops)"].done);
        p.finish();
        let now = board.snapshot();
        assert!(now["mapping[1] (shops)"].done);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("snapshot_rows{mapping=\"mapping[1] (shops)\"} 40"),
            "{text}"
        );
        assert!(
            text.contains("snapshot_rows_estimate{mapping=\"mapping[1] (shops)\"} 100"),
            "{text}"
        );
    }
}
