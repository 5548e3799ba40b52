//! Progress of long reads (snapshots): a progress bar with records/s and
//! ETA when stdout is a terminal, a log line every 10 seconds otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

/// Progress of one mapping's read.
pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
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
            done: 0,
            started: now,
            last_log: now,
        }
    }

    /// Counts `n` more rows.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if self.last_log.elapsed() >= Duration::from_secs(10) {
            self.last_log = Instant::now();
            info!(mapping = %self.label, rows = self.done, rows_per_sec = self.rate() as u64, "snapshot progress");
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
        if let Some(b) = &self.bar {
            b.finish();
        }
        if self.done > 0 {
            info!(mapping = %self.label, rows = self.done, rows_per_sec = self.rate() as u64, "read complete");
        }
    }
}
