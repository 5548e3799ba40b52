//! The configuration file as written: every key of DESIGN.md §3, with its
//! default, and nothing else (`deny_unknown_fields` everywhere).
//!
//! Values that need parsing (durations, sizes, cron, URLs) stay strings
//! here; [`crate::config::validate`] turns them into typed settings with
//! errors that name the key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[source]`
    pub source: RawSource,
    /// `[api]`
    pub api: RawApi,
    /// `[batch]`
    pub batch: RawBatch,
    /// `[state]`
    pub state: RawState,
    /// `[http]`
    pub http: RawHttp,
    /// `[log]`
    pub log: RawLog,
    /// `[ids]`
    pub ids: RawIds,
    /// `[[mapping]]`
    pub mapping: Vec<RawMapping>,
}

/// `[source]`
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSource {
    /// libpq URL of the partner database.
    pub url: String,
    /// File holding the database password.
    pub password_file: Option<String>,
    /// `replication` or `poll`.
    pub mode: String,
    /// Zone in which `timestamp without time zone` values are read.
    pub timezone: String,
    /// `[source.replication]`
    pub replication: RawReplication,
    /// `[source.poll]`
    pub poll: RawPoll,
}

/// Prints the URL without its password (a URL that does not parse is not
/// printed at all: it could hold one anywhere).
impl std::fmt::Debug for RawSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match super::pgurl::PgUrl::parse(self.url.trim()) {
            Ok(u) => u.to_string(),
            Err(_) if self.url.is_empty() => String::new(),
            Err(_) => "(not shown)".into(),
        };
        f.debug_struct("RawSource")
            .field("url", &url)
            .field("password_file", &self.password_file)
            .field("mode", &self.mode)
            .field("timezone", &self.timezone)
            .field("replication", &self.replication)
            .field("poll", &self.poll)
            .finish()
    }
}

impl Default for RawSource {
    fn default() -> Self {
        RawSource {
            url: String::new(),
            password_file: None,
            mode: "replication".into(),
            timezone: "UTC".into(),
            replication: RawReplication::default(),
            poll: RawPoll::default(),
        }
    }
}

/// `[source.replication]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReplication {
    /// Logical replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// `initial` or `never`.
    pub snapshot: String,
    /// Slot lag above which readiness fails.
    pub max_slot_lag: String,
    /// `fail` or `resnapshot`: what happens when the slot is lost.
    pub on_slot_lost: String,
    /// Create the slot with `failover = true` (PostgreSQL 17+).
    pub failover: bool,
}

impl Default for RawReplication {
    fn default() -> Self {
        RawReplication {
            slot: "cobi_sync".into(),
            publication: "cobi_sync".into(),
            snapshot: "initial".into(),
            max_slot_lag: "4GiB".into(),
            on_slot_lost: "fail".into(),
            failover: false,
        }
    }
}

/// `[source.poll]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPoll {
    /// 6-field cron expression.
    pub schedule: String,
    /// IANA zone the schedules are read in.
    pub schedule_timezone: String,
    /// Re-read window.
    pub lookback: String,
    /// Rows per query page.
    pub page_size: i64,
}

impl Default for RawPoll {
    fn default() -> Self {
        RawPoll {
            schedule: "*/30 * * * * *".into(),
            schedule_timezone: "UTC".into(),
            lookback: "2m".into(),
            page_size: 5000,
        }
    }
}

/// `[api]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApi {
    /// API base URL.
    pub base_url: String,
    /// Environment variable holding the key.
    pub api_key_env: String,
    /// File holding the key.
    pub api_key_file: Option<String>,
    /// Allow plain http to a non-loopback host.
    pub allow_insecure_http: bool,
    /// Request timeout.
    pub timeout: String,
    /// Requests in flight.
    pub concurrency: i64,
    /// Client-side request rate limit (0 = none).
    pub requests_per_minute: i64,
    /// First retry delay.
    pub initial_backoff: String,
    /// Longest retry delay.
    pub max_backoff: String,
    /// Extra CA certificates (PEM) trusted for the API, e.g. a
    /// TLS-inspecting proxy's.
    pub ca_file: Option<String>,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            base_url: "https://api.hellocobi.com".into(),
            api_key_env: "COBI_API_KEY".into(),
            api_key_file: None,
            allow_insecure_http: false,
            timeout: "30s".into(),
            concurrency: 4,
            requests_per_minute: 0,
            initial_backoff: "500ms".into(),
            max_backoff: "5m".into(),
            ca_file: None,
        }
    }
}

/// `[batch]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBatch {
    /// Records per request (1..=5000).
    pub max_records: i64,
    /// Bytes per request.
    pub max_bytes: String,
    /// Longest a record waits for its batch to fill.
    pub linger: String,
}

impl Default for RawBatch {
    fn default() -> Self {
        RawBatch {
            max_records: 5000,
            max_bytes: "8MiB".into(),
            linger: "1s".into(),
        }
    }
}

/// `[state]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawState {
    /// State directory.
    pub dir: String,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            dir: "/var/lib/cobi-sync".into(),
        }
    }
}

/// `[http]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// Listen address of the health/metrics endpoint ("" disables).
    pub listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: crate::config::DEFAULT_LISTEN.into(),
        }
    }
}

/// `[log]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `json` or `text`.
    pub format: String,
    /// Level or filter directive.
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "json".into(),
            level: "info".into(),
        }
    }
}

/// `[ids]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIds {
    /// UUIDv5 namespace.
    pub namespace: String,
}

impl Default for RawIds {
    fn default() -> Self {
        RawIds {
            namespace: "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d".into(),
        }
    }
}

/// One `[[mapping]]`.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawMapping {
    /// Cobi type.
    #[serde(rename = "type")]
    pub ty: String,
    /// Source table.
    pub table: Option<String>,
    /// Source query (poll mode).
    pub query: Option<String>,
    /// Key columns.
    pub key: Option<Vec<String>>,
    /// Poll cursor column.
    pub cursor: Option<String>,
    /// `soft` or `ignore`.
    pub on_delete: Option<String>,
    /// `error` or `soft_delete`.
    pub on_truncate: Option<String>,
    /// Cron schedule of hard-delete reconciliation (poll mode).
    pub reconcile: Option<String>,
    /// Cobi field → source spec. Kept as JSON values and parsed by hand so
    /// errors can name `mapping[i].fields.<field>`.
    pub fields: BTreeMap<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_database_password() {
        for url in [
            "postgres://cobi_sync:s3cr3t-pw@db.internal:5432/shop",
            "postgres://cobi_sync@db.internal/shop?password=s3cr3t-pw",
            "not a url s3cr3t-pw",
        ] {
            let raw = RawConfig {
                source: RawSource {
                    url: url.into(),
                    ..RawSource::default()
                },
                ..RawConfig::default()
            };
            let text = format!("{raw:?}");
            assert!(!text.contains("s3cr3t-pw"), "{text}");
            assert!(text.contains("RawSource"), "{text}");
        }
    }
}
