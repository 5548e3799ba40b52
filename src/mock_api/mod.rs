//! `cobi-sync mock-api`: a strict, fast local stand-in for the Cobi Data API
//! (DESIGN.md §7, SPEC.md §1–§3), for trials, the demo and tests.
//!
//! Contract:
//! - `POST /v1/data/<type>` (the 14 batch types, paths from the embedded
//!   schema) takes `{"records": [...]}` with 1..=5000 records and needs
//!   `Authorization: Bearer <key>` (401 with the documented body
//!   otherwise; an empty batch is a 400, so any answer but 401/403 proves
//!   the key). Each record is read as it was sent (unknown or repeated
//!   fields rejected, numbers kept as their exact text) and judged by the
//!   mock's *own* validation (`check.rs`: schema.json's types, formats,
//!   required/nullable, enums and bounds — independent of the product's
//!   `model::validate`, so that the two cannot share a bug); its validated
//!   references must name a key stored by an *earlier* request; a
//!   soft-deleted parent still counts. The answer is the SPEC.md envelope:
//!   200 when every record is accepted, 207 when some fail, 400 when all
//!   do; `error` names each failing record by its Cobi key (or `#<index>`)
//!   and the reason — or, with `--opaque-errors`, only how many failed.
//! - Accepted records are upserted by their Cobi key (key fields joined by
//!   `|`, the natural key when an optional key is absent) and stored
//!   exactly as received: what tests read back is what the client sent,
//!   every digit included. Re-sending a record whose content equals the
//!   stored one (whitespace, field order and number spelling aside) is
//!   counted as a duplicate (at-least-once delivery shows up here).
//! - `POST /user-interactions` takes one object, validated the same way
//!   (`student_id` → customers, `item_id` → the type `item_type` names);
//!   201 with the object and a generated `id`, or 400 `{"error", "message"}`.
//!   Every accepted interaction is kept (they have no key).
//! - Faults, on those `POST` endpoints only, decided per request by a
//!   seeded RNG: latency first, then a dropped connection (no response at
//!   all; half of the drops happen *after* the records were applied), then
//!   500, then 429 with `Retry-After: 1`.
//! - Control endpoints, no auth: `GET /_mock/records/<type>` (stored
//!   records, sorted by key), `GET /_mock/stats` ([`MockStats`]),
//!   `POST /_mock/reset`, `POST /_mock/faults`
//!   (`{"fail_rate", "throttle_rate", "drop_rate", "latency_ms"}`, each
//!   optional).
//!
//! - Unknown type: 404; a body that is not `{"records": [...]}`, empty, or
//!   over 5000 records: 400 with the envelope; bodies over 64 MiB: 413.
//!
//! Each type's records sit behind their own lock that is held only to
//! look parents up or to apply. Parsing and validation run outside any
//! lock, on the tokio worker serving the connection (a 5000-record body
//! takes a few milliseconds). `benches/mock_ingest.rs` measures the
//! records per second it ingests over real HTTP, client included.

mod check;
mod faults;
mod keys;
mod parse;
mod server;
mod store;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::model::schema::schema;
use faults::{check_rate, Faults};
use server::Shared;

/// How to run the mock.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// The bearer key requests must carry.
    pub api_key: String,
    /// Share (0..=1) of data/interaction requests answered 500.
    pub fail_rate: f64,
    /// Share (0..=1) of data/interaction requests answered 429 with
    /// `Retry-After: 1`.
    pub throttle_rate: f64,
    /// Share (0..=1) of data/interaction requests whose connection is closed
    /// without an answer: half before the records are applied, half after.
    pub drop_rate: f64,
    /// Delay added to every data/interaction request.
    pub latency: Duration,
    /// Seed of the fault RNG.
    pub seed: u64,
    /// 207/400 answers say how many records failed, not which (SPEC.md
    /// §4.3: the real API's error text has no documented shape).
    pub opaque_errors: bool,
}

impl MockOptions {
    /// A fault-free mock on a free loopback port accepting `api_key`.
    pub fn local(api_key: &str) -> Self {
        MockOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: api_key.to_string(),
            fail_rate: 0.0,
            throttle_rate: 0.0,
            drop_rate: 0.0,
            latency: Duration::ZERO,
            seed: 0,
            opaque_errors: false,
        }
    }
}

/// Parses a fault rate given on the command line (`--fail-rate 0.05`): a
/// share in `0..=1`. The error says what a good value looks like.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number; give a share between 0 and 1 (e.g. 0.05)"))?;
    check_rate("rate", rate)
        .map_err(|_| format!("{s} is out of range; give a share between 0 and 1 (e.g. 0.05)"))
}

/// What the mock has seen, as `GET /_mock/stats` returns it. Maps only hold
/// non-zero entries; types are named as in the URL (`user-interactions`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct MockStats {
    /// Answers to every request outside `/_mock/` by HTTP status
    /// (`"200"`, `"201"`, `"207"`, `"400"`, `"401"`, `"429"`, `"500"`…),
    /// plus `"dropped"` for connections closed without an answer.
    pub requests_by_status: BTreeMap<String, u64>,
    /// Per type: records accepted, re-sends included.
    pub records_accepted: BTreeMap<String, u64>,
    /// Per type: records rejected (validation or references).
    pub records_rejected: BTreeMap<String, u64>,
    /// Records rejected because a validated parent was unknown.
    pub reference_failures: u64,
    /// Per type: accepted records identical to what was already stored for
    /// their key.
    pub duplicates: BTreeMap<String, u64>,
    /// Per type: distinct keys held (interactions: objects held).
    pub stored: BTreeMap<String, u64>,
}

/// A running mock API. Dropping it stops the server, like [`MockServer::stop`].
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Binds `opts.listen` and serves on a spawned task; returns at once.
    /// Fails when the address cannot be bound or a rate is not in 0..=1.
    pub async fn start(opts: MockOptions) -> std::io::Result<MockServer> {
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let faults = Faults::new(
            check_rate("fail_rate", opts.fail_rate).map_err(invalid)?,
            check_rate("throttle_rate", opts.throttle_rate).map_err(invalid)?,
            check_rate("drop_rate", opts.drop_rate).map_err(invalid)?,
            opts.latency,
            opts.seed,
        );
        let listener = TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        // Load the schema now rather than on the first request.
        let _ = schema();
        let shared = Arc::new(Shared {
            store: store::Store::new(),
            api_key: RwLock::new(opts.api_key.as_str().into()),
            faults: Mutex::new(faults),
            requests: Mutex::new(BTreeMap::new()),
            opaque_errors: opts.opaque_errors,
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server::accept_loop(listener, shared.clone(), stopped));
        Ok(MockServer {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, to use as `api.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The stored records of a type (name or alias), as
    /// `GET /_mock/records/<type>` returns them: sorted by key, or in arrival
    /// order for interactions. Empty for an unknown type.
    pub fn records(&self, ty: &str) -> Vec<serde_json::Value> {
        let Some(id) = schema().type_id(ty) else {
            return Vec::new();
        };
        self.shared
            .store
            .records_json(id)
            .iter()
            .map(|r| serde_json::from_slice(r).expect("stored records are JSON"))
            .collect()
    }

    /// The stored records of a type exactly as they were received (JSON
    /// object texts, numbers with every digit they were sent with), in the
    /// order of [`MockServer::records`].
    pub fn records_text(&self, ty: &str) -> Vec<String> {
        let Some(id) = schema().type_id(ty) else {
            return Vec::new();
        };
        self.shared
            .store
            .records_json(id)
            .iter()
            .map(|r| String::from_utf8(r.to_vec()).expect("stored records are UTF-8"))
            .collect()
    }

    /// The counters, as `GET /_mock/stats` returns them.
    pub fn stats(&self) -> MockStats {
        self.shared.stats()
    }

    /// Changes the fault rates and latency at runtime (the RNG continues).
    /// Rates are clamped to 0..=1.
    pub fn set_faults(
        &self,
        fail_rate: f64,
        throttle_rate: f64,
        drop_rate: f64,
        latency: Duration,
    ) {
        let clamp = |r: f64| if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
        let mut f = self.shared.faults.lock();
        f.fail_rate = clamp(fail_rate);
        f.throttle_rate = clamp(throttle_rate);
        f.drop_rate = clamp(drop_rate);
        f.latency = latency;
    }

    /// Changes the accepted bearer key (key rotation tests).
    pub fn set_api_key(&self, key: &str) {
        *self.shared.api_key.write() = key.into();
    }

    /// Forgets every record and counter, like `POST /_mock/reset`.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Takes the API down (chaos tests): stops listening and closes every
    /// connection, so clients get "connection refused"; what it stores is
    /// kept for [`MockServer::come_back`].
    pub async fn go_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Listens again on the same address, with the same records.
    pub async fn come_back(&mut self) -> std::io::Result<()> {
        if self.task.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr).await?;
        let (stop, stopped) = oneshot::channel();
        self.task = Some(tokio::spawn(server::accept_loop(
            listener,
            self.shared.clone(),
            stopped,
        )));
        self.stop = Some(stop);
        Ok(())
    }

    /// Stops accepting, closes every connection and waits for the server
    /// task to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Runs the server until SIGINT/SIGTERM (the `mock-api` subcommand);
/// prints one line `mock-api listening on http://ADDR` to stdout at start.
pub async fn serve_until_signal(opts: MockOptions) -> anyhow::Result<()> {
    use std::io::Write as _;
    use tokio::signal::unix::{signal, SignalKind};

    let listen = opts.listen;
    let server = MockServer::start(opts)
        .await
        .map_err(|e| anyhow::anyhow!("mock-api: cannot listen on {listen}: {e}"))?;
    let mut term = signal(SignalKind::terminate())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "mock-api listening on {}", server.base_url())?;
        out.flush()?;
    }
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("mock-api stopping");
    server.stop().await;
    Ok(())
}
