//! How many records per second the mock API ingests over real HTTP.
//!
//! Starts the mock in-process, uploads the shop parents, then POSTs valid
//! 15-field transaction batches (5000 and then 1000 records per body) from
//! a few concurrent tasks for a few seconds, and prints the median
//! records/s of 5 runs. Environment: `MOCK_BENCH_TASKS` (default 3),
//! `MOCK_BENCH_SECS` (seconds per run, default 2), `MOCK_BENCH_RUNS`
//! (default 5).
//!
//! `cargo bench --bench mock_ingest`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cobi_sync::mock_api::{MockOptions, MockServer};

const KEY: &str = "bench-key";
const SHOPS: usize = 1000;
/// Distinct transactions across the bodies of one size.
const DISTINCT: usize = 200_000;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn uuid(kind: u32, n: usize) -> String {
    format!("7c9e6679-7425-40de-9{kind:03}-{n:012}")
}

fn shops_body() -> Bytes {
    let mut out = String::from(r#"{"records":["#);
    for n in 0..SHOPS {
        if n > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"shop_id":"{}","name":"Shop number {n}","region":"CA","is_public":true,"created":"2023-01-15T14:30:00Z","updated":"2023-06-22T09:15:30.123456Z","is_deleted":false}}"#,
            uuid(1, n)
        ));
    }
    out.push_str("]}");
    out.into()
}

/// A realistic transaction: every one of the 15 fields set.
fn transaction(out: &mut String, n: usize) {
    out.push_str(&format!(
        concat!(
            r#"{{"transaction_id":"{}","student_id":"{}","shop_id":"{}","offer_id":"{}","#,
            r#""branch_id":"{}","region":"US","source":"{}","savings":{}.25,"amount":{}.5,"#,
            r#""created":"2024-03-0{}T10:1{}:00.000123Z","updated":"2024-03-09T11:00:00Z","#,
            r#""is_deleted":false,"discount_name":"Student deal {}","discount_type":"percentage","#,
            r#""discount_value":{}}}"#
        ),
        uuid(3, n),
        uuid(4, n % 50_000),
        uuid(1, n % SHOPS),
        uuid(5, n % 7_000),
        uuid(2, n % 3_000),
        if n % 2 == 0 { "online" } else { "in-store" },
        n % 10,
        10 + n % 90,
        1 + n % 9,
        n % 10,
        n % 40,
        5 + n % 20,
    ));
}

fn transaction_bodies(per_body: usize) -> Vec<Bytes> {
    (0..DISTINCT / per_body)
        .map(|b| {
            let mut out = String::with_capacity(per_body * 520);
            out.push_str(r#"{"records":["#);
            for i in 0..per_body {
                if i > 0 {
                    out.push(',');
                }
                transaction(&mut out, b * per_body + i);
            }
            out.push_str("]}");
            Bytes::from(out)
        })
        .collect()
}

async fn post(client: &reqwest::Client, url: &str, body: Bytes) {
    let resp = client
        .post(url)
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status.as_u16(), 200, "{}", &text[..text.len().min(500)]);
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Records/s of `tasks` tasks POSTing `bodies` round-robin for `secs`, and
/// the process's CPU microseconds per record (server and client).
async fn run(
    client: &reqwest::Client,
    url: &str,
    bodies: &Arc<Vec<Bytes>>,
    per_body: usize,
    tasks: usize,
    secs: f64,
) -> (f64, f64) {
    let cpu = cpu_time();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (client, url, bodies, next) = (
            client.clone(),
            url.to_string(),
            bodies.clone(),
            next.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut sent = 0usize;
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed) % bodies.len();
                post(&client, &url, bodies[i].clone()).await;
                sent += per_body;
            }
            sent
        }));
    }
    let mut records = 0;
    for h in handles {
        records += h.await.expect("task");
    }
    let cpu = (cpu_time() - cpu).as_secs_f64();
    (
        records as f64 / start.elapsed().as_secs_f64(),
        cpu * 1e6 / records as f64,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let tasks = env_or("MOCK_BENCH_TASKS", 3);
    let secs = env_or("MOCK_BENCH_SECS", 2) as f64;
    let runs = env_or("MOCK_BENCH_RUNS", 5).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let server = MockServer::start(MockOptions::local(KEY)).await.expect("mock starts");
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(16)
            .build()
            .expect("client");
        let base = server.base_url();
        post(&client, &format!("{base}/v1/data/shops"), shops_body()).await;
        let url = format!("{base}/v1/data/transactions");
        println!(
            "mock_ingest: {} worker threads, {tasks} concurrent clients, {runs} runs of {secs} s",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        for per_body in [5000, 1000] {
            let bodies = Arc::new(transaction_bodies(per_body));
            let bytes: usize = bodies.iter().map(|b| b.len()).sum();
            // Warm up: every key inserted once.
            for b in bodies.iter() {
                post(&client, &url, b.clone()).await;
            }
            let mut rates = Vec::new();
            let mut cpu = Vec::new();
            for _ in 0..runs {
                let (rate, us) = run(&client, &url, &bodies, per_body, tasks, secs).await;
                rates.push(rate);
                cpu.push(us);
            }
            let med = median(rates.clone());
            let us = median(cpu);
            println!(
                "mock_ingest/{per_body}-record bodies ({} KiB each): median {:.0} records/s ({:.1} MB/s), \
                 {us:.2} CPU-µs/record (server + client) = {:.0} records/s per busy core; runs: {}",
                bytes / bodies.len() / 1024,
                med,
                med * (bytes as f64 / (bodies.len() * per_body) as f64) / 1e6,
                1e6 / us,
                rates
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let stats = server.stats();
        assert!(stats.records_rejected.is_empty(), "{stats:?}");
        println!(
            "mock_ingest: stored {} transactions, {} accepted ({} duplicates)",
            stats.stored["transactions"],
            stats.records_accepted["transactions"],
            stats.duplicates["transactions"]
        );
        server.stop().await;
    });
}
