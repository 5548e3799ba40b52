//! Prometheus metrics (the `prometheus-client` crate), served at
//! `/metrics` in the text exposition format.
//!
//! Labels are Cobi type names, mapping ids (`<type>/<schema.table>`),
//! HTTP statuses and the version only — never record contents or keys.
//! The dead-letter and state-size gauges are read at scrape time
//! ([`Metrics::refresh`]).

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::model::schema::{schema, TypeId};

/// `type="shops"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// Cobi type.
    pub r#type: String,
}

/// `type="shops",status="200"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// Cobi type.
    pub r#type: String,
    /// HTTP status, or `error` for connection failures and timeouts.
    pub status: String,
}

/// `mapping="shops/public.merchant"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MappingLabel {
    /// Mapping id.
    pub mapping: String,
}

/// `version="0.1.0"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    /// The daemon's version.
    pub version: String,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Records read from the source, per type.
    pub records_read: Family<TypeLabel, Counter>,
    /// Records accepted by the API, per type.
    pub records_sent: Family<TypeLabel, Counter>,
    /// Records that became dead letters, per type.
    pub records_dead_lettered: Family<TypeLabel, Counter>,
    /// Records skipped because identical to what was last accepted.
    pub records_unchanged: Family<TypeLabel, Counter>,
    /// HTTP requests by type and status.
    pub requests: Family<RequestLabel, Counter>,
    /// Retried requests, per type.
    pub retries: Family<TypeLabel, Counter>,
    /// Time from sending a batch to its final answer, per type.
    pub batch_latency: Family<TypeLabel, Histogram>,
    /// Replication slot lag in bytes.
    pub slot_lag_bytes: Gauge<i64, AtomicI64>,
    /// Unix time of the last accepted delivery, per type.
    pub last_success: Family<TypeLabel, Gauge<f64, AtomicU64>>,
    /// Truncates seen on mapped tables, per type.
    pub truncates: Family<TypeLabel, Counter>,
    /// Whether the source is connected (1) or not (0).
    pub source_connected: Gauge,
    /// Whether the API accepts the key (1) or not (0).
    pub api_ready: Gauge,
    /// Dead letters held now, per type (set at scrape time).
    pub dead_letters: Family<TypeLabel, Gauge>,
    /// 1, labelled with the version.
    pub build_info: Family<BuildLabel, Gauge>,
    /// Seconds between the newest change seen and now, from heartbeats
    /// (replication mode; set by the source).
    pub replication_lag_seconds: Gauge<f64, AtomicU64>,
    /// Unix time of each mapping's last completed poll.
    pub last_poll: Family<MappingLabel, Gauge>,
    /// Rows copied by the snapshot, per mapping.
    pub snapshot_rows: Family<MappingLabel, Gauge>,
    /// PostgreSQL's row estimate of each mapping's table during its copy.
    pub snapshot_rows_estimated: Family<MappingLabel, Gauge>,
    /// Bytes the state dir takes on disk (set at scrape time).
    pub state_store_bytes: Gauge,
}

/// Bytes of the regular files under `dir` (0 if unreadable).
pub fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cobi_sync");
        let records_read = Family::<TypeLabel, Counter>::default();
        let records_sent = Family::<TypeLabel, Counter>::default();
        let records_dead_lettered = Family::<TypeLabel, Counter>::default();
        let records_unchanged = Family::<TypeLabel, Counter>::default();
        let requests = Family::<RequestLabel, Counter>::default();
        let retries = Family::<TypeLabel, Counter>::default();
        let batch_latency = Family::<TypeLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let slot_lag_bytes = Gauge::<i64, AtomicI64>::default();
        let last_success = Family::<TypeLabel, Gauge<f64, AtomicU64>>::default();
        let truncates = Family::<TypeLabel, Counter>::default();
        let source_connected = Gauge::default();
        let api_ready = Gauge::default();
        let dead_letters = Family::<TypeLabel, Gauge>::default();
        let build_info = Family::<BuildLabel, Gauge>::default();
        let replication_lag_seconds = Gauge::<f64, AtomicU64>::default();
        let last_poll = Family::<MappingLabel, Gauge>::default();
        let snapshot_rows = Family::<MappingLabel, Gauge>::default();
        let snapshot_rows_estimated = Family::<MappingLabel, Gauge>::default();
        let state_store_bytes = Gauge::default();
        build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register(
            "dead_letters",
            "Dead letters held now",
            dead_letters.clone(),
        );
        registry.register(
            "build_info",
            "1, labelled with the cobi-sync version",
            build_info.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Seconds between the newest change or heartbeat seen and now",
            replication_lag_seconds.clone(),
        );
        registry.register(
            "last_poll_timestamp_seconds",
            "Unix time of each mapping's last completed poll",
            last_poll.clone(),
        );
        registry.register(
            "snapshot_rows",
            "Rows copied by the snapshot",
            snapshot_rows.clone(),
        );
        registry.register(
            "snapshot_rows_estimated",
            "PostgreSQL's row estimate of the table being copied",
            snapshot_rows_estimated.clone(),
        );
        registry.register(
            "state_store_bytes",
            "Bytes the state dir takes on disk",
            state_store_bytes.clone(),
        );
        registry.register(
            "records_read",
            "Records read from the source",
            records_read.clone(),
        );
        registry.register(
            "records_sent",
            "Records accepted by the Cobi API",
            records_sent.clone(),
        );
        registry.register(
            "records_dead_lettered",
            "Records stored as dead letters",
            records_dead_lettered.clone(),
        );
        registry.register(
            "records_unchanged",
            "Records not re-sent because identical to the last accepted version",
            records_unchanged.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests to the Cobi API",
            requests.clone(),
        );
        registry.register("retries", "Retried HTTP requests", retries.clone());
        registry.register(
            "batch_latency_seconds",
            "Time from first sending a batch to its final answer",
            batch_latency.clone(),
        );
        registry.register(
            "slot_lag_bytes",
            "Bytes of WAL between the server and the slot's confirmed position",
            slot_lag_bytes.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last accepted delivery",
            last_success.clone(),
        );
        registry.register(
            "truncates",
            "TRUNCATEs seen on mapped tables",
            truncates.clone(),
        );
        registry.register(
            "source_connected",
            "1 when the source database is connected",
            source_connected.clone(),
        );
        registry.register(
            "api_ready",
            "1 when the Cobi API accepts the key",
            api_ready.clone(),
        );
        Metrics {
            registry,
            records_read,
            records_sent,
            records_dead_lettered,
            records_unchanged,
            requests,
            retries,
            batch_latency,
            slot_lag_bytes,
            last_success,
            truncates,
            source_connected,
            api_ready,
            dead_letters,
            build_info,
            replication_lag_seconds,
            last_poll,
            snapshot_rows,
            snapshot_rows_estimated,
            state_store_bytes,
        }
    }

    /// Sets the scrape-time gauges: dead letters per type (every mapped or
    /// held type, 0 included) and the state dir's size.
    pub fn refresh(
        &self,
        dead: &std::collections::BTreeMap<TypeId, u64>,
        types: &[TypeId],
        state_dir: &std::path::Path,
    ) {
        for ty in types.iter().chain(dead.keys()) {
            self.dead_letters
                .get_or_create(&Self::ty(*ty))
                .set(i64::try_from(dead.get(ty).copied().unwrap_or(0)).unwrap_or(i64::MAX));
        }
        self.state_store_bytes
            .set(i64::try_from(dir_size(state_dir)).unwrap_or(i64::MAX));
    }

    /// The label of a type.
    pub fn ty(ty: TypeId) -> TypeLabel {
        TypeLabel {
            r#type: schema().ty(ty).name.clone(),
        }
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String cannot fail");
        out
    }
}
