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
//!    store of phase 1;
//! 3. three re-syncs of the unchanged UUID table (lookups, nothing
//!    changed: only the epoch's checkpoint is written), measuring how the
//!    directory grows.
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

fn uuid_of(n: u64) -> String {
    // Spread like random v4 UUIDs, reproducible.
    let a = n.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17) ^ 0x5851_f42d_4c95_7f2d;
    uuid::Uuid::from_u64_pair(a, n.wrapping_mul(0xbf58_476d_1ce4_e5b9)).to_string()
}

struct Shape {
    name: &'static str,
    key: fn(u64) -> String,
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
        let (c0, t0) = (cpu_secs(), Instant::now());
        let mut batch = Vec::with_capacity(EPOCH as usize);
        let mut records = 0;
        for k in keys {
            batch.push(StateKey {
                ty,
                mapping: self.mapping.clone(),
                source_key: k,
            });
            if batch.len() as u64 == EPOCH {
                epoch(&self.store, &batch, 1, &self.image, &mut self.lsn);
                records += batch.len() as u64;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            records += batch.len() as u64;
            epoch(&self.store, &batch, 1, &self.image, &mut self.lsn);
        }
        Measured {
            what,
            records,
            tracked,
            cpu: cpu_secs() - c0,
            wall: t0.elapsed().as_secs_f64(),
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
        Json::Str(uuid_of(1).into()),
    );
    r.set(t.field("shop_id").unwrap(), Json::Str(uuid_of(2).into()));
    r.set(t.field("region").unwrap(), Json::Str("GB".into()));
    r.set(t.field("savings").unwrap(), Json::Num("1.50".into()));
    r.set(t.field("amount").unwrap(), Json::Num("12.34".into()));
    let image = cobi_sync::state::image::encode(&r);
    let shapes = [
        Shape {
            name: "integer keys",
            key: |n| (n + 1).to_string(),
            image: None,
        },
        Shape {
            name: "UUID keys",
            key: uuid_of,
            image: None,
        },
        Shape {
            name: "integer keys + delete image",
            key: |n| (n + 1).to_string(),
            image: image.clone(),
        },
        Shape {
            name: "UUID keys + delete image",
            key: uuid_of,
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
            // A snapshot reads in key order: sorted keys.
            let mut keys: Vec<String> = (0..n).map(shape.key).collect();
            if !shape.name.starts_with("integer keys") {
                keys.sort_unstable();
            }
            rows.push(run.phase(format!("initial sync, {}", shape.name), keys.into_iter(), n));
            if shape.name.starts_with("UUID keys") {
                rows.push(run.phase(
                    format!("burst of new random keys into {n}, {}", shape.name),
                    (n..n + burst).map(shape.key),
                    n + burst,
                ));
                for i in 1..=if shape.image.is_some() { 1 } else { 3 } {
                    let mut keys: Vec<String> = (0..n + burst).map(shape.key).collect();
                    keys.sort_unstable();
                    rows.push(run.phase(
                        format!("re-sync {i} of the unchanged table, {}", shape.name),
                        keys.into_iter(),
                        n + burst,
                    ));
                }
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
