//! The systemd watchdog (`WatchdogSec=`): `WATCHDOG=1` is sent only while
//! every watched task of the pipeline ([`crate::ops::heartbeat`]) is alive —
//! its heartbeat moved within half the watchdog interval, or it is idle
//! waiting on a healthy condition. A task blocked on something that never
//! answers (a database that stopped responding, a state store that hangs)
//! stops the pings: systemd then restarts the daemon, which reads again
//! from its durable progress. The pings resume by themselves if the task
//! moves again before systemd acts.
//!
//! [`judge`] is the rule, a pure function; [`run`] samples the beats every
//! quarter interval and pings when the rule says so.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info};

use crate::ops::heartbeat::{Registry, Sample};
use crate::ops::systemd;

/// What the watchdog remembers of a beat: its count when last sampled,
/// and when it was last seen moving (or idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The count at the last sample.
    pub count: u64,
    /// When the beat last moved or was idle.
    pub alive_at: Instant,
}

/// A task that has not moved for too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    /// The task's name.
    pub name: &'static str,
    /// How long it has not moved.
    pub for_: Duration,
}

/// The rule: given what was seen before, the samples now, and the longest
/// a busy task may go without moving (`stale`), returns what to remember
/// and the tasks that are stuck (ping only when there are none). A beat
/// seen for the first time counts as alive now; beats that disappeared
/// (their task ended) are forgotten.
pub fn judge(
    before: &HashMap<u64, Seen>,
    samples: &[Sample],
    now: Instant,
    stale: Duration,
) -> (HashMap<u64, Seen>, Vec<Stuck>) {
    let mut seen = HashMap::with_capacity(samples.len());
    let mut stuck = Vec::new();
    for s in samples {
        let alive_at = match before.get(&s.id) {
            Some(prev) if !s.idle && prev.count == s.count => prev.alive_at,
            _ => now,
        };
        let quiet = now.saturating_duration_since(alive_at);
        if quiet > stale {
            stuck.push(Stuck {
                name: s.name,
                for_: quiet,
            });
        }
        seen.insert(
            s.id,
            Seen {
                count: s.count,
                alive_at,
            },
        );
    }
    (seen, stuck)
}

/// Feeds the watchdog (interval `watchdog`, from `WATCHDOG_USEC`) while
/// [`judge`] finds no stuck task in `registry`; calls `on_ping` after each
/// ping (the daemon's `STATUS=` line). Logs one ERROR when it stops
/// feeding, one INFO when it resumes. Runs until aborted.
pub async fn run(registry: Arc<Registry>, watchdog: Duration, mut on_ping: impl FnMut() + Send) {
    let stale = watchdog / 2;
    let mut ticker = tokio::time::interval(watchdog / 4);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = HashMap::new();
    let mut withheld = false;
    loop {
        ticker.tick().await;
        let (next, stuck) = judge(&seen, &registry.samples(), Instant::now(), stale);
        seen = next;
        if stuck.is_empty() {
            if withheld {
                withheld = false;
                info!("watchdog: every task moves again; feeding the systemd watchdog");
            }
            systemd::ping();
            on_ping();
        } else if !withheld {
            withheld = true;
            let tasks: Vec<String> = stuck
                .iter()
                .map(|s| format!("{} ({} s)", s.name, s.for_.as_secs()))
                .collect();
            error!(
                tasks = %tasks.join(", "),
                limit_s = stale.as_secs_f64(),
                "watchdog: a task of the pipeline has not moved for longer than half of \
                 WatchdogSec (blocked on a database or state store that does not answer?); the \
                 systemd watchdog is no longer fed, so systemd restarts cobi-sync unless the task \
                 moves again first"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: u64, count: u64, idle: bool) -> Sample {
        Sample {
            id,
            name: if id == 1 { "source" } else { "sink" },
            count,
            idle,
        }
    }

    #[test]
    fn the_watchdog_rule() {
        let t0 = Instant::now();
        let stale = Duration::from_secs(30);
        let s = Duration::from_secs;
        // (what was seen: (id, count, seconds before now), samples now,
        //  stuck names)
        type Case = (Vec<(u64, u64, u64)>, Vec<Sample>, Vec<&'static str>);
        let cases: Vec<Case> = vec![
            // First sight: alive.
            (vec![], vec![sample(1, 0, false)], vec![]),
            // Moved since last time, however long ago that was.
            (vec![(1, 5, 100)], vec![sample(1, 6, false)], vec![]),
            // Same count, but within the limit.
            (vec![(1, 5, 30)], vec![sample(1, 5, false)], vec![]),
            // Same count beyond the limit: wedged.
            (vec![(1, 5, 31)], vec![sample(1, 5, false)], vec!["source"]),
            // Same count beyond the limit but idle: healthy.
            (vec![(1, 5, 600)], vec![sample(1, 5, true)], vec![]),
            // One wedged task is enough; the idle one does not hide it.
            (
                vec![(1, 5, 31), (2, 9, 600)],
                vec![sample(1, 5, false), sample(2, 9, true)],
                vec!["source"],
            ),
            // Both stuck.
            (
                vec![(1, 5, 40), (2, 9, 600)],
                vec![sample(1, 5, false), sample(2, 9, false)],
                vec!["source", "sink"],
            ),
            // A task that ended (no sample) is forgotten, not stuck.
            (vec![(1, 5, 600)], vec![], vec![]),
        ];
        // Build instants relative to a "now" far enough in the future.
        let now = t0 + s(1000);
        for (before, samples, want) in cases {
            let before: HashMap<u64, Seen> = before
                .iter()
                .map(|&(id, count, ago)| {
                    (
                        id,
                        Seen {
                            count,
                            alive_at: now - s(ago),
                        },
                    )
                })
                .collect();
            let (after, stuck) = judge(&before, &samples, now, stale);
            let names: Vec<&str> = stuck.iter().map(|x| x.name).collect();
            assert_eq!(names, want, "{before:?} {samples:?}");
            assert_eq!(after.len(), samples.len());
        }
    }

    #[test]
    fn a_wedged_task_is_found_after_the_limit_and_forgiven_when_it_moves() {
        let stale = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut seen = HashMap::new();
        // Samples every 15 s: moving, then stuck at count 3, then moving.
        let counts = [1, 2, 3, 3, 3, 3, 4];
        let mut stuck_at = Vec::new();
        for (i, c) in counts.iter().enumerate() {
            let (next, stuck) = judge(&seen, &[sample(1, *c, false)], at(15 * i as u64), stale);
            seen = next;
            stuck_at.push(!stuck.is_empty());
        }
        // Count 3 first seen at 30 s: 45 s (15 s quiet) and 60 s (30 s) are
        // fine, 75 s (45 s) is stuck; 90 s moved again.
        assert_eq!(
            stuck_at,
            vec![false, false, false, false, false, true, false]
        );
    }
}
