//! Heartbeats of the pipeline's tasks, which feed the systemd watchdog
//! ([`crate::ops::watchdog`]).
//!
//! A watched task — spawned with [`spawn`] by code running [`within`] a
//! [`Registry`], or by another watched task — owns a [`Beat`]: a counter
//! it bumps ([`tick`]) on every turn of its loop (a message from the
//! replication stream, a batch of rows, a poll tick, an epoch, an HTTP
//! attempt), and an idle depth it raises while it waits on a condition
//! that is healthy by construction ([`idle`], [`Idle`]): an empty channel,
//! the timer to the next poll, a backoff sleep between retries that log
//! what fails, an HTTP exchange bounded by `api.timeout`, or another
//! watched task. Anything else a task awaits — a database statement, a
//! state-store call on a blocking thread — must finish within the
//! watchdog's window, or the task counts as wedged.
//!
//! The calls find their beat in a task-local, so no signature carries it.
//! Outside a registry (the `snapshot` and `dlq replay` commands, the HTTP
//! handlers, unit tests) every call here is a no-op and [`spawn`] is
//! `tokio::spawn`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The beats of the running watched tasks.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    beats: Mutex<BTreeMap<u64, Arc<Beat>>>,
}

/// One watched task's heartbeat.
pub struct Beat {
    name: &'static str,
    count: AtomicU64,
    idle: AtomicUsize,
}

/// A beat as the watchdog samples it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Unique for the registry's life (a restarted task is a new beat).
    pub id: u64,
    /// The task's name (`source`, `sink`, `sink: sending an epoch`…).
    pub name: &'static str,
    /// Turns so far.
    pub count: u64,
    /// Waiting on a healthy condition right now.
    pub idle: bool,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Every live beat, by id.
    pub fn samples(&self) -> Vec<Sample> {
        self.beats
            .lock()
            .expect("lock")
            .iter()
            .map(|(id, b)| Sample {
                id: *id,
                name: b.name,
                count: b.count.load(Ordering::Relaxed),
                idle: b.idle.load(Ordering::Relaxed) > 0,
            })
            .collect()
    }

    fn register(&self, name: &'static str) -> (u64, Arc<Beat>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let beat = Arc::new(Beat {
            name,
            count: AtomicU64::new(0),
            idle: AtomicUsize::new(0),
        });
        self.beats.lock().expect("lock").insert(id, beat.clone());
        (id, beat)
    }
}

#[derive(Clone)]
struct Scope {
    registry: Arc<Registry>,
    beat: Option<Arc<Beat>>,
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// Runs `fut` so that the tasks it spawns through [`spawn`] are watched in
/// `registry` (the daemon's main task runs in one).
pub async fn within<F: Future>(registry: Arc<Registry>, fut: F) -> F::Output {
    SCOPE
        .scope(
            Scope {
                registry,
                beat: None,
            },
            fut,
        )
        .await
}

/// Removes a beat from its registry when its task ends (or is aborted).
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.beats.lock().expect("lock").remove(&self.id);
    }
}

/// Spawns `fut` as a watched task named `name` when called within a
/// registry (see [`within`]); a plain `tokio::spawn` otherwise.
pub fn spawn<F>(name: &'static str, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match SCOPE.try_with(|s| s.registry.clone()) {
        Ok(registry) => {
            let (id, beat) = registry.register(name);
            let registered = Registered {
                registry: registry.clone(),
                id,
            };
            let scope = Scope {
                registry,
                beat: Some(beat),
            };
            tokio::spawn(SCOPE.scope(scope, async move {
                let _registered = registered;
                fut.await
            }))
        }
        Err(_) => tokio::spawn(fut),
    }
}

fn with_beat(f: impl FnOnce(&Beat)) {
    let _ = SCOPE.try_with(|s| {
        if let Some(b) = &s.beat {
            f(b)
        }
    });
}

/// One turn of the current task's loop: it is making progress.
pub fn tick() {
    with_beat(|b| {
        b.count.fetch_add(1, Ordering::Relaxed);
    });
}

/// While alive, the current task waits on a healthy condition (see the
/// module doc); dropping it counts as a turn.
pub struct Idle {
    beat: Option<Arc<Beat>>,
}

impl Idle {
    /// Marks the current task idle until the guard is dropped.
    pub fn enter() -> Idle {
        let beat = SCOPE.try_with(|s| s.beat.clone()).ok().flatten();
        if let Some(b) = &beat {
            b.idle.fetch_add(1, Ordering::Relaxed);
        }
        Idle { beat }
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        if let Some(b) = &self.beat {
            b.count.fetch_add(1, Ordering::Relaxed);
            b.idle.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Awaits `fut` as a healthy wait (see the module doc).
pub async fn idle<F: Future>(fut: F) -> F::Output {
    let _idle = Idle::enter();
    fut.await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn by_name(r: &Registry, name: &str) -> Option<Sample> {
        r.samples().into_iter().find(|s| s.name == name)
    }

    // The registry scope only spawns: the handle is awaited outside it.
    #[allow(clippy::async_yields_async)]
    #[tokio::test]
    async fn watched_tasks_tick_idle_and_unregister() {
        let registry = Registry::new();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (ticked_tx, ticked_rx) = tokio::sync::oneshot::channel::<()>();
        let task = within(registry.clone(), async {
            spawn("worker", async move {
                tick();
                tick();
                let _ = ticked_tx.send(());
                // Waits for the test, as a healthy wait.
                idle(go_rx).await.unwrap();
                // A child registers its own beat.
                spawn("child", async { tick() }).await.unwrap();
            })
        })
        .await;
        ticked_rx.await.unwrap();
        // Let the worker reach its idle wait.
        let mut s = by_name(&registry, "worker").expect("registered");
        for _ in 0..100 {
            if s.idle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            s = by_name(&registry, "worker").unwrap();
        }
        assert!(s.idle, "{s:?}");
        assert_eq!(s.count, 2);
        go_tx.send(()).unwrap();
        task.await.unwrap();
        assert_eq!(registry.samples(), vec![], "ended tasks leave the registry");
        assert_eq!(registry.next.load(Ordering::Relaxed), 2, "worker and child");
    }

    // The registry scope only spawns: the handle is awaited outside it.
    #[allow(clippy::async_yields_async)]
    #[tokio::test]
    async fn aborted_tasks_leave_the_registry() {
        let registry = Registry::new();
        let task = within(registry.clone(), async {
            spawn("stuck", std::future::pending::<()>())
        })
        .await;
        assert_eq!(registry.samples().len(), 1);
        task.abort();
        let _ = task.await;
        assert_eq!(registry.samples(), vec![]);
    }

    #[tokio::test]
    async fn outside_a_registry_everything_is_a_no_op() {
        tick();
        idle(async {}).await;
        assert_eq!(spawn("plain", async { 7 }).await.unwrap(), 7);
    }
}
