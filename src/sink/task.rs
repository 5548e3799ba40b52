//! The sink task: gathers items into epochs, sends one epoch while the
//! next fills, commits verdicts and progress in order.
//!
//! One epoch is being delivered (HTTP) while the one before it may still
//! be committing to the state store; commits happen in order, and progress
//! marks are published only once their epoch is flushed. The epoch being
//! delivered reads key states and dead letters through an
//! [`Overlay`] of the writes not yet committed, so it sees what the
//! previous epoch decided. Store calls run on blocking threads
//! ([`with_store`]), retried until the store takes them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::model::schema::{schema, TypeId};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::sink::client::ApiClient;
use crate::sink::epoch::{Epoch, Op};
use crate::sink::overlay::Overlay;
use crate::sink::screen::Seen;
use crate::sink::Resend;
use crate::sink::{per_type, policy, Durable, SinkConfig, SinkItem, EPOCH_BYTES, EPOCH_RECORDS};
use crate::state::{Checkpoint, StateError, StateKey, StateStore, TypeStats, Write};

/// Shared by the sink task and the epoch being sent.
pub(super) struct Shared {
    pub client: Arc<ApiClient>,
    pub store: Arc<dyn StateStore>,
    pub cfg: SinkConfig,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub stats: Mutex<BTreeMap<TypeId, TypeStats>>,
    /// Parent keys accepted by this process (the pre-screen).
    pub seen: Mutex<Seen>,
    /// Keys that have (or may have) a dead letter: loaded from the store
    /// when the task starts, then kept up to date with every epoch's
    /// writes. An accept removes the letter of such a key even when the
    /// key's state does not say dead-lettered (a crash between the two
    /// writes of an earlier run); other accepts skip the removal.
    pub lettered: Mutex<rustc_hash::FxHashSet<StateKey>>,
    pub stop: CancellationToken,
}

impl Shared {
    pub(super) fn new(
        cfg: SinkConfig,
        client: Arc<ApiClient>,
        store: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        stop: CancellationToken,
    ) -> Arc<Shared> {
        let stats = store.stats().unwrap_or_default();
        Arc::new(Shared {
            client,
            store,
            cfg,
            metrics,
            health,
            stats: Mutex::new(stats),
            seen: Mutex::new(Seen::default()),
            lettered: Mutex::new(Default::default()),
            stop,
        })
    }
}

/// An epoch whose records have their verdicts, and the writes recording
/// them (not committed yet).
type Delivered = (Epoch, Arc<Vec<Write>>);

pub(super) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Vec<SinkItem>>,
    durable: watch::Sender<Durable>,
) {
    let cfg = &shared.cfg;
    // An epoch holds at most one round of concurrent requests, and at most
    // EPOCH_RECORDS keys of a type / EPOCH_BYTES in all: two epochs (one
    // filling, one in flight) bound the sink's memory whatever the size of
    // a transaction or table.
    let full_records = (cfg.max_records * cfg.concurrency).min(EPOCH_RECORDS);
    let full_bytes = (cfg.max_bytes * cfg.concurrency).min(EPOCH_BYTES);
    let mut open = Epoch::new();
    // One epoch is being delivered (HTTP) while the one before it may still
    // be committing to the state store; commits happen in order. The epoch
    // being delivered reads key states through an overlay of the writes not
    // yet committed, so it sees what the previous epoch decided.
    let mut sending: Option<tokio::task::JoinHandle<Option<Delivered>>> = None;
    let mut committing: Option<tokio::task::JoinHandle<Option<Epoch>>> = None;
    let mut waiting: Option<Delivered> = None;
    let mut overlay: Arc<Overlay> = Arc::new(Overlay::default());
    let mut input_closed = false;
    let mut epochs: u64 = 0;
    let Some(((), lettered)) = with_store(&shared, (), READ_FAILED, |store, ()| {
        Ok(store
            .dead_letters(None)?
            .iter()
            .filter_map(|d| d.key())
            .collect::<rustc_hash::FxHashSet<StateKey>>())
    })
    .await
    else {
        return;
    };
    *shared.lettered.lock().expect("lock") = lettered;
    loop {
        crate::ops::heartbeat::tick();
        if committing.is_none() {
            if let Some((epoch, writes)) = waiting.take() {
                committing = Some(tokio::spawn(commit_epoch(shared.clone(), epoch, writes)));
            }
        }
        let due = !open.is_empty()
            && (open.flush
                || input_closed
                || open.is_full(full_records, full_bytes)
                || open.started.is_some_and(|s| s.elapsed() >= cfg.linger));
        if due && sending.is_none() && waiting.is_none() {
            let epoch = std::mem::replace(&mut open, Epoch::new());
            sending = Some(tokio::spawn(send_epoch(
                shared.clone(),
                epoch,
                overlay.clone(),
            )));
            continue;
        }
        if input_closed
            && open.is_empty()
            && sending.is_none()
            && waiting.is_none()
            && committing.is_none()
        {
            break;
        }
        let accepting = !input_closed && !open.is_full(full_records, full_bytes);
        let linger_at = open
            .started
            .map(|s| tokio::time::Instant::from_std(s + cfg.linger));
        let idle = sending.is_none() && waiting.is_none();
        // For the watchdog, waiting is healthy unless a commit to the state
        // store is what it waits for (that must finish promptly); an epoch
        // in flight is bounded by `api.timeout` and retried with backoff.
        let _healthy_wait = committing
            .is_none()
            .then(crate::ops::heartbeat::Idle::enter);
        tokio::select! {
            items = rx.recv(), if accepting => match items {
                Some(items) => {
                    for item in items {
                        intake(&shared, &mut open, item);
                    }
                }
                None => input_closed = true,
            },
            _ = sleep_until(linger_at), if linger_at.is_some() && idle => {}
            sent = join(&mut sending), if sending.is_some() => {
                sending = None;
                match sent {
                    Some((epoch, writes)) => {
                        overlay = Arc::new(Overlay::of(&writes));
                        waiting = Some((epoch, writes));
                    }
                    None => {
                        debug!("sink stopping with an unconfirmed epoch; it will be re-read after restart");
                        return;
                    }
                }
            }
            done = join(&mut committing), if committing.is_some() => {
                committing = None;
                match done {
                    Some(epoch) => {
                        epochs += 1;
                        let replication = epoch.marks.iter().rev().find_map(|m| match m {
                            Checkpoint::Replication(r) => Some(r.clone()),
                            _ => None,
                        });
                        durable.send_modify(|d| {
                            d.epochs = epochs;
                            if replication.is_some() {
                                d.replication = replication;
                            }
                        });
                        for b in epoch.barriers {
                            let _ = b.send(());
                        }
                    }
                    None => {
                        debug!("sink stopping with an uncommitted epoch; it will be re-read after restart");
                        return;
                    }
                }
            }
            _ = shared.stop.cancelled(), if sending.is_none() && committing.is_none() => return,
        }
    }
    debug!(epochs, "sink drained");
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn join<T>(h: &mut Option<tokio::task::JoinHandle<Option<T>>>) -> Option<T> {
    match h {
        Some(h) => match h.await {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "epoch task failed");
                None
            }
        },
        None => std::future::pending().await,
    }
}

fn intake(shared: &Shared, open: &mut Epoch, item: SinkItem) {
    match item {
        SinkItem::Upsert {
            key,
            record,
            resend,
        } => {
            shared
                .metrics
                .records_read
                .get_or_create(&Metrics::ty(key.ty))
                .inc();
            bump_read(shared, key.ty);
            open.add(key, Op::Upsert { record }, resend);
        }
        SinkItem::Delete { key, basis } => {
            shared
                .metrics
                .records_read
                .get_or_create(&Metrics::ty(key.ty))
                .inc();
            bump_read(shared, key.ty);
            open.add(key, Op::Delete { basis }, Resend::Changed);
        }
        // Not a read from the source: not counted as one.
        SinkItem::Replay {
            key,
            record,
            letter,
        } => open.add(key, Op::Replay { record, letter }, Resend::Changed),
        SinkItem::Mark(c) => open.mark(c),
        SinkItem::Flush => open.flush = true,
        SinkItem::Barrier(tx) => open.barrier(tx),
    }
}

fn bump_read(shared: &Shared, ty: TypeId) {
    shared
        .stats
        .lock()
        .expect("lock")
        .entry(ty)
        .or_default()
        .read += 1;
}

/// Delivers one epoch (levels in order) and returns its writes; the
/// commit is [`commit_epoch`]'s. `None` if abandoned.
async fn send_epoch(
    shared: Arc<Shared>,
    mut epoch: Epoch,
    overlay: Arc<Overlay>,
) -> Option<Delivered> {
    let started = Instant::now();
    let mut writes: Vec<Write> = Vec::new();
    let records = epoch.len();
    let s = schema();
    for level in 0..=s.max_level {
        let types: Vec<TypeId> = (0..s.types.len() as TypeId)
            .filter(|&t| s.ty(t).level == level && epoch.len_of(t) > 0)
            .collect();
        let mut level_futures = FuturesUnordered::new();
        for ty in types {
            let entries = epoch.take_type(ty);
            level_futures.push(per_type::send_type(
                shared.clone(),
                ty,
                entries,
                overlay.clone(),
            ));
        }
        while let Some(result) = level_futures.next().await {
            writes.extend(result?);
        }
    }
    if records > 0 {
        debug!(
            records,
            ms = started.elapsed().as_millis() as u64,
            "epoch delivered"
        );
    }
    Some((epoch, Arc::new(writes)))
}

/// Commits an epoch's writes with its progress marks and counters, then
/// the epoch is durable. `None` on shutdown.
async fn commit_epoch(shared: Arc<Shared>, epoch: Epoch, writes: Arc<Vec<Write>>) -> Option<Epoch> {
    let started = Instant::now();
    let mut all = Vec::with_capacity(epoch.marks.len() + 16);
    for m in &epoch.marks {
        all.push(Write::Checkpoint(m.clone()));
    }
    {
        let stats = shared.stats.lock().expect("lock");
        for (t, st) in stats.iter() {
            all.push(Write::Stats(*t, st.clone()));
        }
    }
    commit(&shared, writes, all).await?;
    debug!(
        writes = epoch.len(),
        marks = epoch.marks.len(),
        ms = started.elapsed().as_millis() as u64,
        "epoch committed"
    );
    Some(epoch)
}

/// Writes and flushes, retrying until the store takes it (disk full,
/// read-only…). `None` on shutdown.
async fn commit(shared: &Arc<Shared>, writes: Arc<Vec<Write>>, last: Vec<Write>) -> Option<()> {
    let state = (writes, Arc::new(last));
    let (_, ()) = with_store(shared, state, WRITE_FAILED, |store, (writes, last)| {
        // As one: a re-open never leaves the marks without the writes,
        // and one before the flush fails it (written again on retry).
        store.write_durably(&[writes.as_ref(), last.as_ref()])
    })
    .await?;
    Some(())
}

/// The ERROR when an epoch's writes cannot be committed.
const WRITE_FAILED: &str = "cannot write the state store; progress is not confirmed until it can \
    (free disk space or fix permissions on state.dir)";
/// The ERROR when key states or dead letters cannot be read.
pub(super) const READ_FAILED: &str = "cannot read the state store; delivery waits until it can \
    (free disk space or fix permissions on state.dir)";

/// Runs a blocking store operation on a blocking thread, retrying until it
/// succeeds: the store is recovered (re-opened as of its last flush) before
/// each retry, `/readyz` and one ERROR (`failed`) say what is wrong, and
/// delivery waits (progress is not confirmed meanwhile). `state` goes in
/// and comes back out (no copies of an epoch's records). `None` on
/// shutdown.
pub(super) async fn with_store<S, T, F>(
    shared: &Shared,
    mut state: S,
    failed: &'static str,
    op: F,
) -> Option<(S, T)>
where
    S: Send + 'static,
    T: Send + 'static,
    F: Fn(&dyn StateStore, &S) -> Result<T, StateError> + Send + Sync + Clone + 'static,
{
    let mut attempt = 0u32;
    loop {
        let store = shared.store.clone();
        let retry = attempt > 0;
        let op = op.clone();
        let (back, result) = tokio::task::spawn_blocking(move || {
            // A failed store (disk full, read-only) must be reopened before
            // it is used again.
            let r = match retry {
                true => store.recover().and_then(|()| op(store.as_ref(), &state)),
                false => op(store.as_ref(), &state),
            };
            (state, r)
        })
        .await
        .expect("state store operations do not panic");
        state = back;
        match result {
            Ok(t) => {
                if !shared.health.set_state(true, None) {
                    info!("state store usable again; delivery and progress resume");
                }
                return Some((state, t));
            }
            Err(e) => {
                if shared.health.set_state(false, Some(e.to_string())) {
                    error!(error = %e, "{failed}");
                }
                let delay = policy::backoff(
                    attempt,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                    rand::random(),
                );
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.stop.cancelled() => return None,
                }
            }
        }
    }
}

/// Now, as dead letters record it (RFC 3339, microseconds, UTC).
pub(super) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}
