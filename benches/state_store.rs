//! The state store on its own: CPU per record, bytes on disk per record
//! and RSS for the key shapes partners use, without PostgreSQL or HTTP.
//!
//! `cargo bench --bench state_store` (release). Phases, each on a fresh
//! store in a temp dir, in the sink's pattern (per epoch of 10 000 keys:
//! `get_keys`, `apply` of the verdicts with a checkpoint, `flush`):
//!
//! 1. initial sync of N keys in key order (a snapshot): integer keys;
//!    UUID keys; UUID keys with a ~50-byte delete image each;
//! 2. a streaming burst of 300 000 new random UUID keys into the UUID
//!    store of phase 1 (scattered over its key range);
//! 3. three re-syncs of the unchanged UUID table (lookups, nothing
//!    changed: only the epoch's checkpoint is written), measuring how the
//!    directory grows.
//!
//! Keys are generated as they are used, in the order each phase needs,
//! never held in a vector: the RSS column is the store's (5 M UUID
//! strings held for sorting were ~300 MiB of the bench's own).
//!
//! Environment: `COBI_STATE_BENCH_N` (keys, default 1 000 000; more than
//! one value separated by commas, e.g. `1000000,5000000`),
//! `COBI_STATE_BENCH_BURST` (default 300 000), `COBI_STATE_BENCH_SHAPES`
//! (only the shapes whose name contains one of these comma-separated
//! words, e.g. `integer` or `image`). Prints one table.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;

use cobi_sync::model::schema::schema;
use cobi_sync::state::{
    Checkpoint, KeyState, KeyStatus, ReplicationCheckpoint, SledStore, StateKey, StateStore, Write,
};

const EPOCH: u64 = 10_000;

/// The daemon's allocator and its tuning (src/main.rs).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: Option<&'static std::ffi::c_char> = Some(unsafe {
    // SAFETY: the first byte of a static NUL-terminated string.
    &*c"narenas:1,oversize_threshold:1048576,dirty_decay_ms:300,muzzy_decay_ms:0".as_ptr()
});

fn cpu_secs() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let m = match e.metadata() {
            Ok(m) => m,
            Err(_) => continue,
        };
        total += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

/// The UUID of slot `i` of `n` (variant 0: the initial sync's key;
/// variant 1: a burst's key in the same slot). Keys are generated in key
/// order without being held: slot `i`'s keys sort after slot `i - 1`'s and
/// before slot `i + 1`'s, their low 64 bits look random — so the bench's
/// RSS is the store's, not a vector of millions of key strings.
fn uuid_of(i: u64, variant: u64, n: u64) -> String {
    let step = u128::MAX / u128::from(n.max(1));
    let mix = i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
        ^ variant.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let v = u128::from(i) * step + u128::from(variant) * (step / 2) + u128::from(mix);
    uuid::Uuid::from_u128(v).to_string()
}

/// The burst's slots, in burst order: `burst` distinct slots of `n`,
/// scattered (`j * P mod n`, `P` a prime not dividing `n` whose remainder
/// mod `n` is far from 0 and from `n`: consecutive keys land far apart,
/// a page or so each, like random ones).
fn burst_slot(j: u64, n: u64) -> u64 {
    const P: u64 = 2_654_435_761;
    assert!(
        n % P != 0,
        "COBI_STATE_BENCH_N must not be a multiple of {P}"
    );
    ((u128::from(j) * u128::from(P)) % u128::from(n)) as u64
}

struct Shape {
    name: &'static str,
    uuid: bool,
    image: Option<Bytes>,
}

fn state(fp: u64, image: &Option<Bytes>) -> KeyState {
    KeyState {
        status: KeyStatus::Accepted,
        fingerprint: fp,
        delete_image: image.clone(),
    }
}

struct Measured {
    what: String,
    records: u64,
    /// Keys in the store after the phase.
    tracked: u64,
    cpu: f64,
    wall: f64,
    bytes: u64,
    rss_kib: u64,
}

/// One epoch as the sink does it: look every key up, write the verdicts
/// of the changed ones and the checkpoint, flush.
fn epoch(store: &SledStore, keys: &[StateKey], fp: u64, image: &Option<Bytes>, lsn: &mut u64) {
    let refs: Vec<&StateKey> = keys.iter().collect();
    let priors = store.get_keys(&refs).expect("get_keys");
    let mut writes: Vec<Write> = keys
        .iter()
        .zip(priors)
        .filter(|(_, p)| p.as_ref().is_none_or(|p| p.fingerprint != fp))
        .map(|(k, _)| Write::Key(k.clone(), state(fp, image)))
        .collect();
    *lsn += 1;
    writes.push(Write::Checkpoint(Checkpoint::Replication(
        ReplicationCheckpoint {
            lsn: *lsn,
            tables: Default::default(),
        },
    )));
    store.apply(&writes).expect("apply");
    store.flush().expect("flush");
}

/// One store under test and what its phases share.
struct Run<'a> {
    store: SledStore,
    dir: &'a Path,
    mapping: std::sync::Arc<str>,
    image: Option<Bytes>,
    lsn: u64,
}

impl Run<'_> {
    /// Runs the sink's epochs over `keys`; `tracked`: keys in the store after.
    fn phase(
        &mut self,
        what: String,
        keys: impl Iterator<Item = String>,
        tracked: u64,
    ) -> Measured {
        let ty = schema().type_id("transactions").unwrap();
        // The store's time only: the keys are generated between epochs.
        let (mut cpu, mut wall) = (0.0, 0.0);
        let mut batch = Vec::with_capacity(EPOCH as usize);
        let mut records = 0;
        let mut keys = keys.peekable();
        while keys.peek().is_some() {
            batch.clear();
            batch.extend(keys.by_ref().take(EPOCH as usize).map(|k| StateKey {
                ty,
                mapping: self.mapping.clone(),
                source_key: k,
            }));
            let (c0, t0) = (cpu_secs(), Instant::now());
            epoch(&self.store, &batch, 1, &self.image, &mut self.lsn);
            cpu += cpu_secs() - c0;
            wall += t0.elapsed().as_secs_f64();
            records += batch.len() as u64;
        }
        Measured {
            what,
            records,
            tracked,
            cpu,
            wall,
            bytes: dir_bytes(self.dir),
            rss_kib: status_kib("VmRSS:"),
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("state_store: bench");
        return;
    }
    let ns: Vec<u64> = std::env::var("COBI_STATE_BENCH_N")
        .unwrap_or_else(|_| "1000000".into())
        .split(',')
        .map(|v| {
            v.trim()
                .replace('_', "")
                .parse()
                .expect("COBI_STATE_BENCH_N: numbers")
        })
        .collect();
    let burst: u64 = std::env::var("COBI_STATE_BENCH_BURST")
        .map(|v| {
            v.replace('_', "")
                .parse()
                .expect("COBI_STATE_BENCH_BURST: a number")
        })
        .unwrap_or(300_000);
    // A transactions image: two UUIDs, region, two amounts (~50 bytes).
    let tx = schema().type_id("transactions").unwrap();
    let t = schema().ty(tx);
    let mut r = cobi_sync::model::record::Record::new(tx);
    use cobi_sync::model::record::Json;
    r.set(
        t.field("transaction_id").unwrap(),
        Json::Str(uuid_of(1, 0, 7).into()),
    );
    r.set(
        t.field("shop_id").unwrap(),
        Json::Str(uuid_of(2, 0, 7).into()),
    );
    r.set(t.field("region").unwrap(), Json::Str("GB".into()));
    r.set(t.field("savings").unwrap(), Json::Num("1.50".into()));
    r.set(t.field("amount").unwrap(), Json::Num("12.34".into()));
    let image = cobi_sync::state::image::encode(&r);
    let shapes = [
        Shape {
            name: "integer keys",
            uuid: false,
            image: None,
        },
        Shape {
            name: "UUID keys",
            uuid: true,
            image: None,
        },
        Shape {
            name: "integer keys + delete image",
            uuid: false,
            image: image.clone(),
        },
        Shape {
            name: "UUID keys + delete image",
            uuid: true,
            image: image.clone(),
        },
    ];
    // `COBI_STATE_BENCH_SHAPES`: run only the shapes whose name contains
    // one of these comma-separated words (e.g. `UUID`).
    let only: Option<Vec<String>> = std::env::var("COBI_STATE_BENCH_SHAPES")
        .ok()
        .map(|v| v.split(',').map(|w| w.trim().to_string()).collect());
    let shapes: Vec<Shape> = shapes
        .into_iter()
        .filter(|s| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|w| s.name.contains(w.as_str())))
        })
        .collect();
    let mapping: std::sync::Arc<str> = "transactions/public.bench".into();
    let mut rows: Vec<Measured> = Vec::new();
    for &n in &ns {
        for shape in &shapes {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut run = Run {
                store: SledStore::open(dir.path()).expect("open"),
                dir: dir.path(),
                mapping: mapping.clone(),
                image: shape.image.clone(),
                lsn: 0,
            };
            // A snapshot reads in key order: keys generated sorted.
            if !shape.uuid {
                let keys = (0..n).map(|i| (i + 1).to_string());
                rows.push(run.phase(format!("initial sync, {}", shape.name), keys, n));
                continue;
            }
            let keys = (0..n).map(|i| uuid_of(i, 0, n));
            rows.push(run.phase(format!("initial sync, {}", shape.name), keys, n));
            let burst = burst.min(n);
            rows.push(run.phase(
                format!("burst of new random keys into {n}, {}", shape.name),
                (0..burst).map(|j| uuid_of(burst_slot(j, n), 1, n)),
                n + burst,
            ));
            // Which slots hold a burst key too (a bit each).
            let mut burst_slots = vec![0u64; (n as usize).div_ceil(64)];
            for j in 0..burst {
                let i = burst_slot(j, n) as usize;
                burst_slots[i / 64] |= 1 << (i % 64);
            }
            let burst_slots = &burst_slots;
            for i in 1..=if shape.image.is_some() { 1 } else { 3 } {
                let keys = (0..n).flat_map(move |slot| {
                    let second = burst_slots[slot as usize / 64] & (1 << (slot % 64)) != 0;
                    std::iter::once(uuid_of(slot, 0, n)).chain(second.then(|| uuid_of(slot, 1, n)))
                });
                rows.push(run.phase(
                    format!("re-sync {i} of the unchanged table, {}", shape.name),
                    keys,
                    n + burst,
                ));
            }
        }
    }
    println!(
        "\n| phase | records | CPU µs/record | records/s | state dir bytes | bytes per tracked record | RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for m in &rows {
        let per = format!("{:.1}", m.bytes as f64 / m.tracked.max(1) as f64);
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} | {:.1} |",
            m.what,
            m.records,
            m.cpu * 1e6 / m.records as f64,
            m.records as f64 / m.wall,
            m.bytes,
            per,
            m.rss_kib as f64 / 1024.0
        );
    }
    println!(
        "(peak RSS of the process: {:.1} MiB)",
        status_kib("VmHWM:") as f64 / 1024.0
    );
}
