//! Prometheus metrics (the `prometheus-client` crate), served at
//! `/metrics` in the text exposition format.
//!
//! Labels are Cobi type names and HTTP statuses only — never record
//! contents or keys.

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
    /// Copy progress per mapping (snapshots, re-copies).
    pub snapshot: std::sync::Arc<crate::source::progress::Board>,
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
        let snapshot = std::sync::Arc::new(crate::source::progress::Board::new(&mut registry));
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
            snapshot,
        }
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
