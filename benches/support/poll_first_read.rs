//! The poll-mode first read: `cobi-sync run` in poll mode from an empty
//! state on the bench table (no index on its cursor), timed until the mock
//! holds every row, with the daemon's CPU per row — to put beside the
//! `snapshot` command on the same table.

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::proc::Proc;
use super::report::Row;

/// Runs `cmd` (a `cobi-sync run` in poll mode on a fresh state dir) until
/// `accepted()` reaches `n`, then stops it with SIGTERM. The row's time is
/// from start to the last record accepted; the notes give the daemon's
/// CPU seconds and CPU microseconds per row at that moment, and its peak
/// RSS.
pub async fn measure<F, Fut>(
    label: &str,
    cmd: Command,
    log: &Path,
    n: u64,
    timeout: Duration,
    mut accepted: F,
) -> Result<Row>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64>>,
{
    let mut p = Proc::spawn("cobi-sync run (poll)", cmd, log)?;
    let started = Instant::now();
    let deadline = started + timeout;
    let mut got = 0;
    while got < n {
        if !p.is_running() {
            bail!(
                "the daemon exited with {got} of {n} rows accepted; log tail:\n{}",
                p.log_tail(30)
            );
        }
        if Instant::now() > deadline {
            p.term(Duration::from_secs(10)).await;
            bail!(
                "{got} of {n} rows accepted after {timeout:?}; log tail:\n{}",
                p.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        got = accepted().await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = p.cpu_secs_now().unwrap_or(f64::NAN);
    p.sample_now();
    let exit = p.term(Duration::from_secs(15)).await;
    let mut row = Row::measured(label, n, secs);
    row.rss_mib = Some(p.peak_rss_mib());
    row.add_note(format!(
        "{cpu:.1} CPU s, {:.1} µs CPU/row (daemon)",
        cpu * 1e6 / n.max(1) as f64
    ));
    if !exit.success() {
        row.add_note(format!("stopped with {}", exit.describe()));
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors = text.lines().filter(|l| l.contains("ERROR")).count();
    if errors > 0 {
        row.add_note(format!("{errors} ERROR log lines (see {})", log.display()));
    }
    Ok(row)
}
