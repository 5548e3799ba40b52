//! One type's share of an epoch: read what the store knows of each key,
//! decide per key, send, and turn the verdicts into state writes.
//!
//! Each step is its own function; the rules they apply are the pure ones
//! of [`decide`](super::decide), [`screen`](super::screen),
//! [`isolate`](super::isolate) and [`verdicts`](super::verdicts). Store
//! reads run on blocking threads ([`with_store`]).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::{debug, trace, warn};

use crate::model::schema::{schema, TypeId};
use crate::model::validate::describe;
use crate::ops::metrics::Metrics;
use crate::sink::decide::{decide, delete_from, Decision, DeleteFrom, Origin, Resend};
use crate::sink::deliver::{cut_batches, deliver_batch, deliver_single, Outgoing};
use crate::sink::epoch::{Entry, Op};
use crate::sink::isolate::Verdict;
use crate::sink::overlay::Overlay;
use crate::sink::screen::{is_parent_type, is_suspect, key_hash};
use crate::sink::task::{now_rfc3339, with_store, Shared, READ_FAILED};
use crate::sink::{verdicts, Outbound};
use crate::state::{ImagePolicy, KeyState, KeyStatus, StateKey, Write};

/// A record going to the API, with what is needed to record its verdict.
struct Prepared {
    key: StateKey,
    out: Outbound,
    prior: Option<KeyState>,
}

/// A dead letter decided without the API (local validation, a soft delete
/// that cannot be built), or after its rejection.
struct Rejected {
    key: StateKey,
    cobi_key: Option<String>,
    json: Bytes,
    fingerprint: u64,
    prior: Option<KeyState>,
    reason: String,
    /// Whether the key's state becomes dead-lettered. A delete that cannot
    /// be built leaves it as it is: Cobi still holds the accepted version.
    mark_key: bool,
}

/// The per-key decisions of one type.
#[derive(Default)]
struct Resolved {
    send: Vec<Prepared>,
    rejected: Vec<Rejected>,
    forget: Vec<StateKey>,
    unchanged: u64,
    stale_replays: u64,
}

/// Resolves, sends and judges one type's entries. Returns the writes;
/// `None` on shutdown.
pub(super) async fn send_type(
    shared: Arc<Shared>,
    ty: TypeId,
    entries: Vec<Entry>,
    overlay: Arc<Overlay>,
) -> Option<Vec<Write>> {
    let (entries, priors) = read_priors(&shared, entries, overlay.clone()).await?;
    let mut r = resolve(ty, entries, priors);
    let local = r.rejected.len();
    let started = Instant::now();
    let (verdicts, requests) = deliver(&shared, ty, &r.send).await?;
    if !r.send.is_empty() {
        shared
            .metrics
            .batch_latency
            .get_or_create(&Metrics::ty(ty))
            .observe(started.elapsed().as_secs_f64());
    }
    remember_parents(&shared, ty, &r.send, &verdicts);
    let now = now_rfc3339();
    let send = std::mem::take(&mut r.send);
    let (mut writes, sent) = judge(&shared, ty, send, verdicts, &mut r.rejected);
    let by_api = r.rejected.len() - local;
    let (letter_writes, again) =
        letters(&shared, std::mem::take(&mut r.rejected), overlay, &now).await?;
    writes.extend(letter_writes);
    for key in std::mem::take(&mut r.forget) {
        writes.extend(verdicts::forgotten(key));
    }
    note_letters(&shared, &writes);
    let counts = Counts {
        sent,
        local,
        by_api,
        again,
        requests,
    };
    tally(&shared, ty, &r, &counts, &now);
    debug!(type = %schema().ty(ty).name, sent, dead = local + by_api, requests,
        ms = started.elapsed().as_millis() as u64, "type delivered");
    Some(writes)
}

/// The writes of accepted records; rejected ones join `rejected`.
/// Returns the writes and the number accepted.
fn judge(
    shared: &Shared,
    ty: TypeId,
    send: Vec<Prepared>,
    verdicts: Vec<Verdict>,
    rejected: &mut Vec<Rejected>,
) -> (Vec<Write>, u64) {
    let mut writes = Vec::with_capacity(2 * send.len() + 2 * rejected.len());
    let mut sent = 0u64;
    let lettered = shared.lettered.lock().expect("lock");
    for (p, v) in send.into_iter().zip(verdicts) {
        match v {
            Verdict::Accepted => {
                sent += 1;
                let copy = delete_image(&shared.cfg.images, &p.key, &p.out);
                let remove = verdicts::remove_letter(p.prior.as_ref(), lettered.contains(&p.key));
                writes.extend(verdicts::accepted(
                    p.key,
                    p.prior.as_ref(),
                    p.out.fingerprint,
                    copy,
                    remove,
                ));
            }
            Verdict::Rejected(reason) => {
                trace!(type = %schema().ty(ty).name, source_key = %p.key.source_key, %reason, "record rejected by the api");
                rejected.push(Rejected {
                    key: p.key,
                    cobi_key: p.out.cobi_key,
                    json: p.out.json,
                    fingerprint: p.out.fingerprint,
                    prior: p.prior,
                    reason,
                    mark_key: true,
                });
            }
        }
    }
    (writes, sent)
}

/// What the store (through the overlay of the epoch before) knows of
/// each entry's key, retrying while it cannot be read.
async fn read_priors(
    shared: &Shared,
    entries: Vec<Entry>,
    overlay: Arc<Overlay>,
) -> Option<(Vec<Entry>, Vec<Option<KeyState>>)> {
    with_store(shared, entries, READ_FAILED, move |store, entries| {
        let keys: Vec<&StateKey> = entries.iter().map(|e| &e.key).collect();
        overlay.key_states(store, &keys)
    })
    .await
}

/// The per-key decisions ([`decide`], [`delete_from`]).
fn resolve(ty: TypeId, entries: Vec<Entry>, priors: Vec<Option<KeyState>>) -> Resolved {
    let mut r = Resolved {
        // Most entries are sent (growing this by doubling was ~2 % of a
        // sync's CPU).
        send: Vec::with_capacity(entries.len()),
        ..Resolved::default()
    };
    for (entry, prior) in entries.into_iter().zip(priors) {
        let (out, origin) = match entry.op {
            Op::Upsert { record } => (
                record,
                Origin::Source {
                    resend: entry.resend,
                },
            ),
            Op::Replay { record, letter } => (record, Origin::Replay { letter }),
            Op::Delete { basis } => match delete_from(ty, basis, prior.as_ref()) {
                // No soft delete for the type (interactions), or a key
                // Cobi never accepted: nothing to send.
                None | Some(DeleteFrom::Nothing) => continue,
                Some(DeleteFrom::Forget) => {
                    r.forget.push(entry.key);
                    continue;
                }
                Some(DeleteFrom::Unbuildable(reason)) => {
                    // The key's delete image is not JSON (and is
                    // missing or unreadable here): the letter names the key.
                    let json = Bytes::from_static(b"{}");
                    r.rejected.push(Rejected {
                        fingerprint: xxhash_rust::xxh3::xxh3_64(&json),
                        key: entry.key,
                        cobi_key: None,
                        json,
                        prior,
                        reason,
                        mark_key: false,
                    });
                    continue;
                }
                Some(DeleteFrom::Record(rec)) => (
                    Outbound::new(&rec, Vec::new()),
                    Origin::Source {
                        resend: Resend::Changed,
                    },
                ),
            },
        };
        match decide(
            origin,
            out.fingerprint,
            !out.problems.is_empty(),
            prior.as_ref(),
        ) {
            Decision::Send => r.send.push(Prepared {
                key: entry.key,
                out,
                prior,
            }),
            Decision::Unchanged => r.unchanged += 1,
            Decision::StaleReplay => r.stale_replays += 1,
            Decision::Invalid => r.rejected.push(Rejected {
                reason: describe(&out.problems),
                key: entry.key,
                cobi_key: out.cobi_key,
                json: out.json,
                fingerprint: out.fingerprint,
                prior,
                mark_key: true,
            }),
        }
    }
    r
}

/// Sends the records (batches, or one request each for interactions).
/// Returns each record's verdict in order and the number of requests;
/// `None` on shutdown.
async fn deliver(shared: &Shared, ty: TypeId, send: &[Prepared]) -> Option<(Vec<Verdict>, usize)> {
    if send.is_empty() {
        return Some((Vec::new(), 0));
    }
    let outgoing = outgoing(shared, send);
    let mut verdicts: Vec<Option<Verdict>> = vec![None; send.len()];
    let mut requests = 0usize;
    let client = &shared.client;
    if schema().ty(ty).batch {
        let batches = cut_batches(outgoing, shared.cfg.max_records, shared.cfg.max_bytes);
        let mut running: FuturesUnordered<_> = batches
            .iter()
            .map(|b| deliver_batch(client, ty, b))
            .collect();
        while let Some(done) = running.next().await {
            let (results, n) = done?;
            requests += n;
            for (i, v) in results {
                verdicts[i] = Some(v);
            }
        }
    } else {
        // Owned futures (borrowing ones trip the `Send` check of the task).
        let mut running = futures_util::stream::iter(outgoing.into_iter().map(|o| {
            let client = shared.client.clone();
            async move { (o.index, deliver_single(&client, ty, &o).await) }
        }))
        .buffer_unordered(shared.cfg.concurrency);
        while let Some((i, v)) = running.next().await {
            requests += 1;
            verdicts[i] = Some(v?);
        }
    }
    let verdicts = verdicts
        .into_iter()
        .map(|v| v.expect("every record judged"));
    Some((verdicts.collect(), requests))
}

/// The records as sent, each flagged by the pre-screen ([`is_suspect`]).
fn outgoing(shared: &Shared, send: &[Prepared]) -> Vec<Outgoing> {
    let seen = shared.seen.lock().expect("lock");
    send.iter()
        .enumerate()
        .map(|(i, p)| {
            let rejected_before = p.prior.as_ref().is_some_and(|s| {
                s.status == KeyStatus::DeadLettered && s.fingerprint == p.out.fingerprint
            });
            Outgoing {
                index: i,
                json: p.out.json.clone(),
                cobi_key: p.out.cobi_key.clone(),
                suspect: is_suspect(rejected_before, &p.out.parents, &seen),
            }
        })
        .collect()
}

/// Remembers which parent keys the API accepted or rejected (for the
/// pre-screen of their children).
fn remember_parents(shared: &Shared, ty: TypeId, send: &[Prepared], verdicts: &[Verdict]) {
    if send.is_empty() || !is_parent_type(ty) {
        return;
    }
    let mut seen = shared.seen.lock().expect("lock");
    for (p, v) in send.iter().zip(verdicts) {
        let Some(k) = &p.out.cobi_key else { continue };
        match v {
            Verdict::Accepted => seen.accepted(key_hash(ty, k)),
            Verdict::Rejected(_) => seen.rejected(key_hash(ty, k)),
        }
    }
}

/// Keeps [`Shared::lettered`] in step with the letters written and removed.
fn note_letters(shared: &Shared, writes: &[Write]) {
    let mut lettered = shared.lettered.lock().expect("lock");
    for w in writes {
        match w {
            Write::DeadLetter(k, _) => {
                lettered.insert(k.clone());
            }
            Write::RemoveDeadLetter(k) => {
                lettered.remove(k);
            }
            _ => {}
        }
    }
}

/// The delete image of an accepted record, kept for building its soft
/// delete later, if its mapping needs one ([`ImagePolicy::keeps`]).
fn delete_image(keep: &ImagePolicy, key: &StateKey, out: &Outbound) -> Option<Bytes> {
    keep.keeps(&key.mapping)
        .then(|| out.image.clone())
        .flatten()
}

/// The writes of dead letters, each counting on from the key's latest
/// letter (read on a blocking thread, through the overlay), and how many
/// of them replace an earlier letter of their key.
async fn letters(
    shared: &Shared,
    rejected: Vec<Rejected>,
    overlay: Arc<Overlay>,
    now: &str,
) -> Option<(Vec<Write>, usize)> {
    if rejected.is_empty() {
        return Some((Vec::new(), 0));
    }
    let (rejected, previous) = with_store(shared, rejected, READ_FAILED, move |store, rejected| {
        let keys: Vec<&StateKey> = rejected.iter().map(|r| &r.key).collect();
        overlay.letters(store, &keys)
    })
    .await?;
    let again = previous.iter().filter(|p| p.is_some()).count();
    let mut writes = Vec::with_capacity(2 * rejected.len());
    for (r, previous) in rejected.into_iter().zip(previous) {
        let letter = verdicts::letter(
            &r.key,
            verdicts::Rejection {
                cobi_key: r.cobi_key,
                json: &r.json,
                reason: r.reason,
                previous: previous.as_ref(),
                now,
            },
        );
        if r.mark_key {
            writes.extend(verdicts::rejected(r.key, r.fingerprint, r.prior, letter));
        } else {
            writes.push(Write::DeadLetter(r.key, Box::new(letter)));
        }
    }
    Some((writes, again))
}

/// What happened to one type's records.
#[derive(Clone, Copy)]
struct Counts {
    /// Accepted by the API.
    sent: u64,
    /// Dead-lettered without the API.
    local: usize,
    /// Rejected by the API.
    by_api: usize,
    /// Dead letters that replace an earlier letter of their key (retried
    /// and rejected again).
    again: usize,
    /// Requests made.
    requests: usize,
}

/// Metrics, counters and the operator's log lines for one type.
fn tally(shared: &Shared, ty: TypeId, r: &Resolved, c: &Counts, now: &str) {
    let Counts {
        sent,
        local,
        by_api,
        again,
        requests,
    } = *c;
    let label = Metrics::ty(ty);
    let name = &schema().ty(ty).name;
    let m = &shared.metrics;
    if r.unchanged > 0 {
        m.records_unchanged
            .get_or_create(&label)
            .inc_by(r.unchanged);
    }
    if r.stale_replays > 0 {
        debug!(type = %name, count = r.stale_replays,
            "replayed dead letters not sent: their keys changed since (a newer version, a delete, or an accept)");
    }
    let dead = (local + by_api) as u64;
    if dead > 0 {
        m.records_dead_lettered.get_or_create(&label).inc_by(dead);
    }
    // An operator hears of new dead letters once; the same letters retried
    // and rejected again (their rows read again) only at debug level — the
    // attempts count in `dlq list` says how often.
    let new = (local + by_api).saturating_sub(again);
    if new > 0 {
        warn!(type = %name, count = new, requests,
            "records were dead-lettered (rejected by the cobi api, failing local validation, or a \
             soft delete that cannot be built); see `cobi-sync dlq list`");
    }
    if again > 0 {
        debug!(type = %name, count = again, requests, "dead letters retried and rejected again");
    }
    if sent > 0 {
        m.records_sent.get_or_create(&label).inc_by(sent);
        m.last_success
            .get_or_create(&label)
            .set(chrono::Utc::now().timestamp_micros() as f64 / 1e6);
        let mut stats = shared.stats.lock().expect("lock");
        let st = stats.entry(ty).or_default();
        st.sent += sent;
        st.last_success = Some(now.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::record::{Json, Record};

    fn key(k: &str) -> StateKey {
        StateKey {
            ty: schema().type_id("shops").unwrap(),
            mapping: "shops/public.shop".into(),
            source_key: k.into(),
        }
    }

    fn shop(name: &str) -> Record {
        let t = schema().type_id("shops").unwrap();
        let mut r = Record::new(t);
        for (f, v) in [
            ("shop_id", "7f0c1b9e-1d2a-4c1e-9a57-0f3f6c8b2a10"),
            ("name", name),
            ("region", "GB"),
        ] {
            r.set(schema().ty(t).field(f).unwrap(), Json::Str(v.into()));
        }
        r
    }

    fn entry(k: &str, op: Op) -> Entry {
        Entry {
            key: key(k),
            op,
            resend: Resend::Changed,
        }
    }

    fn state(status: KeyStatus, r: &Record, copy: bool) -> KeyState {
        let json = Bytes::from(r.to_json());
        KeyState {
            status,
            fingerprint: xxhash_rust::xxh3::xxh3_64(&json),
            delete_image: copy.then(|| crate::state::image::encode(r)).flatten(),
        }
    }

    /// Every path of one type's per-key decisions, in one epoch.
    #[test]
    fn each_change_gets_its_decision() {
        let (a, b) = (shop("A"), shop("B"));
        let up = |r: &Record| Op::Upsert {
            record: Outbound::new(r, vec![]),
        };
        let mut bad = a.clone();
        bad.set(
            schema().ty(bad.ty).field("region").unwrap(),
            Json::Str("gbr".into()),
        );
        let letter_of = |r: &Record| xxhash_rust::xxh3::xxh3_64(&r.to_json());
        let replay = |r: &Record| Op::Replay {
            record: Outbound::new(r, vec![]),
            letter: letter_of(r),
        };
        let del = || Op::Delete { basis: None };
        let entries = vec![
            entry("new", up(&a)),
            entry("same", up(&a)),
            entry("dead-same", up(&a)),
            entry("invalid", up(&bad)),
            entry("replay-stands", replay(&a)),
            entry("replay-stale", replay(&a)),
            entry("del-copy", del()),
            entry("del-never", del()),
            entry("del-unknown", del()),
            entry("del-nocopy", del()),
        ];
        let priors = vec![
            None,
            Some(state(KeyStatus::Accepted, &a, false)),
            Some(state(KeyStatus::DeadLettered, &a, false)),
            None,
            Some(state(KeyStatus::DeadLettered, &a, false)),
            Some(state(KeyStatus::Accepted, &b, false)),
            Some(state(KeyStatus::Accepted, &b, true)),
            Some(state(KeyStatus::DeadLettered, &a, false)),
            None,
            Some(state(KeyStatus::Accepted, &b, false)),
        ];
        let r = resolve(key("x").ty, entries, priors);
        let sent: Vec<&str> = r.send.iter().map(|p| p.key.source_key.as_str()).collect();
        assert_eq!(sent, ["new", "dead-same", "replay-stands", "del-copy"]);
        let deleted = Record::from_json(key("x").ty, &r.send[3].out.json).unwrap();
        assert_eq!(deleted.get_named("name"), Some(&Json::Str("B".into())));
        assert_eq!(deleted.get_named("is_deleted"), Some(&Json::Bool(true)));
        assert_eq!((r.unchanged, r.stale_replays), (1, 1));
        let dead: Vec<(&str, bool)> = r
            .rejected
            .iter()
            .map(|d| (d.key.source_key.as_str(), d.mark_key))
            .collect();
        assert_eq!(dead, [("invalid", true), ("del-nocopy", false)]);
        assert!(r.rejected[0].reason.starts_with("region"));
        assert_eq!(r.forget, [key("del-never")]);
    }
}
