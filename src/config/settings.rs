//! Typed settings and the one `validate()` that produces them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use chrono_tz::Tz;

use super::pgurl::PgUrl;
use super::raw::{RawConfig, RawMapping};
use super::secret::KeySource;
use super::ConfigError;
use crate::mapping::spec::{parse_field_spec, FieldSpec, Transform};
use crate::model::schema::{schema, FieldId, TypeId};

/// Everything the daemon needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[source]`
    pub source: SourceSettings,
    /// `[api]`
    pub api: ApiSettings,
    /// `[batch]`
    pub batch: BatchSettings,
    /// `[state]`
    pub state: StateSettings,
    /// `[http]`
    pub http: HttpSettings,
    /// `[log]`
    pub log: LogSettings,
    /// `[ids]` namespace for `uuid5`.
    pub id_namespace: uuid::Uuid,
    /// `[[mapping]]`, in file order.
    pub mappings: Vec<MappingSettings>,
}

/// How changes are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Logical replication (pgoutput).
    Replication,
    /// Scheduled polling.
    Poll,
}

impl Mode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Replication => "replication",
            Mode::Poll => "poll",
        }
    }
}

/// `[source]`
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// Connection URL (password redacted when printed).
    pub url: PgUrl,
    /// Password file, read at connect time.
    pub password_file: Option<PathBuf>,
    /// Capture mode.
    pub mode: Mode,
    /// Zone of `timestamp without time zone` values.
    pub timezone: Tz,
    /// `[source.replication]`
    pub replication: ReplicationSettings,
    /// `[source.poll]`
    pub poll: PollSettings,
}

/// Initial snapshot policy in replication mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Copy existing rows once, then stream.
    Initial,
    /// Stream only.
    Never,
}

/// `[source.replication]`
#[derive(Debug, Clone)]
pub struct ReplicationSettings {
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Initial snapshot policy.
    pub snapshot: SnapshotMode,
    /// Slot lag limit in bytes.
    pub max_slot_lag: u64,
    /// What happens when the slot is dropped, invalidated, or behind the
    /// state directory.
    pub on_slot_lost: OnSlotLost,
    /// Create the slot with `failover = true` (PostgreSQL 17+) so it
    /// survives a promotion of a standby.
    pub failover: bool,
}

/// `source.replication.on_slot_lost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSlotLost {
    /// Stop (exit 1) saying how to recover.
    Fail,
    /// Re-create the slot and publication and re-copy every mapping,
    /// soft-deleting keys the source no longer has.
    Resnapshot,
}

/// `[source.poll]`
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// When to poll.
    pub schedule: cron::Schedule,
    /// The zone `schedule` and `reconcile` are read in.
    pub schedule_timezone: Tz,
    /// Re-read window.
    pub lookback: Duration,
    /// Rows per page.
    pub page_size: u32,
}

/// `[api]`
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Base URL without a trailing slash.
    pub base_url: String,
    /// Where the key comes from.
    pub key: KeySource,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Requests in flight.
    pub concurrency: usize,
    /// Client-side limit (0 = none).
    pub requests_per_minute: u32,
    /// First retry delay.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Extra CA certificates (PEM bundle) trusted for the API besides the
    /// web PKI roots.
    pub ca_file: Option<PathBuf>,
}

/// `[batch]`
#[derive(Debug, Clone)]
pub struct BatchSettings {
    /// Records per request.
    pub max_records: usize,
    /// Bytes per request body.
    pub max_bytes: usize,
    /// Longest a record waits for its batch.
    pub linger: Duration,
}

/// `[state]`
#[derive(Debug, Clone)]
pub struct StateSettings {
    /// The sled directory.
    pub dir: PathBuf,
}

/// `[http]`
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Where to serve health and metrics (`None`: disabled).
    pub listen: Option<SocketAddr>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// `[log]`
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directive.
    pub level: String,
}

/// Where a mapping reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingSource {
    /// A table (or view, in poll mode).
    Table {
        /// Schema name.
        schema: String,
        /// Table name.
        name: String,
    },
    /// A query (poll mode only).
    Query(String),
}

impl MappingSource {
    /// `"schema"."table"` quoted for SQL, or the query in parentheses.
    pub fn sql(&self) -> String {
        match self {
            MappingSource::Table { schema, name } => {
                format!("{}.{}", quote_ident(schema), quote_ident(name))
            }
            MappingSource::Query(q) => format!("({q})"),
        }
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Delete policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    /// Re-send with `is_deleted = true`.
    Soft,
    /// Do nothing.
    Ignore,
}

/// Truncate policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTruncate {
    /// Log an ERROR and count it; send nothing.
    Error,
    /// Send `is_deleted = true` for every key the state store knows.
    SoftDelete,
}

/// One `[[mapping]]`.
#[derive(Debug, Clone)]
pub struct MappingSettings {
    /// Position in the file (`mapping[index]`).
    pub index: usize,
    /// Stable identity in the state store: `<type>/<schema.table>` or
    /// `<type>/query-<hash>`.
    pub id: std::sync::Arc<str>,
    /// Cobi type.
    pub ty: TypeId,
    /// Source.
    pub source: MappingSource,
    /// Key columns (`None`: the table's primary key).
    pub key: Option<Vec<String>>,
    /// Poll cursor column.
    pub cursor: Option<String>,
    /// Delete policy.
    pub on_delete: OnDelete,
    /// Truncate policy.
    pub on_truncate: OnTruncate,
    /// Hard-delete reconciliation schedule (poll mode).
    pub reconcile: Option<cron::Schedule>,
    /// Field specs, sorted by field id.
    pub fields: Vec<(FieldId, FieldSpec)>,
}

impl MappingSettings {
    /// `mapping[i] (type)`, for messages.
    pub fn label(&self) -> String {
        format!("mapping[{}] ({})", self.index, schema().ty(self.ty).name)
    }

    /// Every source column the mapping reads (fields, key and cursor),
    /// without duplicates, in first-use order.
    pub fn columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = Vec::new();
        let mut add = |c: &str| {
            if !cols.iter().any(|x| x == c) {
                cols.push(c.to_string());
            }
        };
        for k in self.key.iter().flatten() {
            add(k);
        }
        if let Some(c) = &self.cursor {
            add(c);
        }
        for (_, spec) in &self.fields {
            if let Some(c) = spec.column() {
                add(c);
            }
        }
        cols
    }

    /// Whether the state store must keep the last-sent record of each key
    /// (soft deletes without a full old row, truncate, reconcile, and the
    /// soft deletes of `snapshot` for keys a table no longer has — in both
    /// modes, so `_mode` no longer matters).
    pub fn needs_last_sent(&self, _mode: Mode) -> bool {
        self.on_delete == OnDelete::Soft
            || self.on_truncate == OnTruncate::SoftDelete
            || self.reconcile.is_some()
    }
}

/// Parses a human duration (`500ms`, `30s`, `5m`, `1h 30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("`{s}` is not a duration ({e})"))
}

/// Parses a human size (`8MiB`, `4GiB`, `512KiB`, `1000000`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    bytesize::ByteSize::from_str(t)
        .map(|b| b.as_u64())
        .map_err(|e| format!("`{s}` is not a size ({e})"))
}

/// Parses a 6-field cron expression (sec min hour dom month dow). The
/// day of week is numbered as in standard cron: 0 or 7 = Sunday,
/// 1 = Monday … 6 = Saturday (names `MON`…`SUN` work too); the `cron`
/// crate counts 1 = Sunday, so numbers are translated.
pub fn parse_cron(s: &str) -> Result<cron::Schedule, String> {
    let fields: Vec<&str> = s.split_whitespace().collect();
    let n = fields.len();
    if n != 6 {
        return Err(format!(
            "`{s}` has {n} fields; write 6: second minute hour day-of-month month day-of-week"
        ));
    }
    let dow = cron_day_of_week(fields[5]).map_err(|e| format!("`{s}`: day of week {e}"))?;
    let translated = format!("{} {dow}", fields[..5].join(" "));
    cron::Schedule::from_str(&translated)
        .map_err(|e| format!("`{s}` is not a cron expression ({e})"))
}

/// Standard cron day-of-week (0/7 = Sunday … 6 = Saturday, names, lists,
/// ranges, steps) → the `cron` crate's numbering (1 = Sunday … 7 =
/// Saturday), as an explicit list.
fn cron_day_of_week(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_string());
    }
    const NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
    let day = |t: &str| -> Result<u32, String> {
        if let Some(i) = NAMES.iter().position(|n| n.eq_ignore_ascii_case(t)) {
            return Ok(i as u32);
        }
        match t.parse::<u32>() {
            Ok(d) if d <= 7 => Ok(d),
            _ => Err(format!(
                "`{t}` is not a day: use 0-7 (0 and 7 = Sunday, 1 = Monday) or MON…SUN"
            )),
        }
    };
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => (
                r,
                st.parse::<u32>()
                    .ok()
                    .filter(|&x| x > 0)
                    .ok_or_else(|| format!("`{item}` has a bad step"))?,
            ),
            None => (item, 1),
        };
        let (lo, hi) = match range {
            "*" => (0, 6),
            r => match r.split_once('-') {
                Some((a, b)) => (day(a)?, day(b)?),
                None if step > 1 => (day(r)?, 6),
                None => (day(r)?, day(r)?),
            },
        };
        if lo > hi {
            return Err(format!("`{item}` is a range that runs backwards"));
        }
        let mut d = lo;
        while d <= hi {
            days[(d % 7) as usize] = true;
            d += step;
        }
    }
    let list: Vec<String> = (0..7)
        .filter(|&d| days[d])
        .map(|d| (d + 1).to_string())
        .collect();
    Ok(list.join(","))
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Records a problem at `key`, with `example` unless it is empty.
fn push_error(errs: &mut Vec<ConfigError>, key: impl Into<String>, msg: String, example: &str) {
    let mut e = ConfigError::new(key, msg);
    if !example.is_empty() {
        e = e.example(example);
    }
    errs.push(e);
}

/// Checks a whole raw configuration, collecting every problem.
pub fn validate(raw: &RawConfig) -> Result<Settings, Vec<ConfigError>> {
    let mut errs: Vec<ConfigError> = Vec::new();
    let mut err = |key: &str, msg: String, example: &str| push_error(&mut errs, key, msg, example);

    // [source]
    let url = if raw.source.url.trim().is_empty() {
        err(
            "source.url",
            "is required".into(),
            "url = \"postgres://cobi_sync@db.internal:5432/shop\"",
        );
        None
    } else {
        match PgUrl::parse(raw.source.url.trim()) {
            Ok(u) => Some(u),
            Err(m) => {
                err(
                    "source.url",
                    m,
                    "url = \"postgres://cobi_sync@db.internal:5432/shop?sslmode=verify-full\"",
                );
                None
            }
        }
    };
    let mode = match raw.source.mode.as_str() {
        "replication" => Mode::Replication,
        "poll" => Mode::Poll,
        other => {
            err(
                "source.mode",
                format!("`{other}` is not a mode; use \"replication\" or \"poll\""),
                "mode = \"replication\"",
            );
            Mode::Replication
        }
    };
    let timezone = match raw.source.timezone.parse::<Tz>() {
        Ok(tz) => tz,
        Err(_) => {
            err(
                "source.timezone",
                format!("`{}` is not an IANA time zone", raw.source.timezone),
                "timezone = \"Europe/London\"",
            );
            Tz::UTC
        }
    };
    let r = &raw.source.replication;
    for (key, v, example) in [
        ("source.replication.slot", &r.slot, "slot = \"cobi_sync\""),
        (
            "source.replication.publication",
            &r.publication,
            "publication = \"cobi_sync\"",
        ),
    ] {
        if !is_identifier(v) {
            err(
                key,
                format!("`{v}` must be 1-63 lower-case letters, digits or underscores"),
                example,
            );
        }
    }
    let snapshot = match r.snapshot.as_str() {
        "initial" => SnapshotMode::Initial,
        "never" => SnapshotMode::Never,
        other => {
            err(
                "source.replication.snapshot",
                format!("`{other}` is not \"initial\" or \"never\""),
                "snapshot = \"initial\"",
            );
            SnapshotMode::Initial
        }
    };
    let max_slot_lag = parse_size(&r.max_slot_lag).unwrap_or_else(|m| {
        err(
            "source.replication.max_slot_lag",
            m,
            "max_slot_lag = \"4GiB\"",
        );
        0
    });
    let on_slot_lost = match r.on_slot_lost.as_str() {
        "fail" => OnSlotLost::Fail,
        "resnapshot" => OnSlotLost::Resnapshot,
        other => {
            err(
                "source.replication.on_slot_lost",
                format!("`{other}` is not \"fail\" or \"resnapshot\""),
                "on_slot_lost = \"fail\"",
            );
            OnSlotLost::Fail
        }
    };
    let p = &raw.source.poll;
    let schedule = match parse_cron(&p.schedule) {
        Ok(s) => Some(s),
        Err(m) => {
            err("source.poll.schedule", m, "schedule = \"*/30 * * * * *\"");
            None
        }
    };
    let schedule_timezone = p.schedule_timezone.parse::<Tz>().unwrap_or_else(|_| {
        err(
            "source.poll.schedule_timezone",
            format!("`{}` is not an IANA time zone", p.schedule_timezone),
            "schedule_timezone = \"Europe/London\"",
        );
        Tz::UTC
    });
    let lookback = parse_duration(&p.lookback).unwrap_or_else(|m| {
        err("source.poll.lookback", m, "lookback = \"2m\"");
        Duration::ZERO
    });
    if !(1..=100_000).contains(&p.page_size) {
        err(
            "source.poll.page_size",
            format!("{} is out of range 1..=100000", p.page_size),
            "page_size = 5000",
        );
    }

    // [api]
    let a = &raw.api;
    let base_url = a.base_url.trim().trim_end_matches('/').to_string();
    match url::Url::parse(&base_url) {
        Ok(u) if u.scheme() == "https" => {}
        Ok(u) if u.scheme() == "http" => {
            let loopback = match u.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
                Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
                None => false,
            };
            if !loopback && !a.allow_insecure_http {
                err(
                    "api.base_url",
                    "plain http is only allowed to a loopback address; use https, \
                     or set api.allow_insecure_http = true if you really mean it"
                        .into(),
                    "base_url = \"https://api.hellocobi.com\"",
                );
            }
        }
        Ok(u) => err(
            "api.base_url",
            format!("scheme `{}` is not http or https", u.scheme()),
            "base_url = \"https://api.hellocobi.com\"",
        ),
        Err(e) => err(
            "api.base_url",
            format!("`{}` is not a URL ({e})", a.base_url),
            "base_url = \"https://api.hellocobi.com\"",
        ),
    }
    if a.api_key_env.trim().is_empty() {
        err(
            "api.api_key_env",
            "must name an environment variable".into(),
            "api_key_env = \"COBI_API_KEY\"",
        );
    }
    let mut dur = |key: &str, v: &str, example: &str| -> Duration {
        match parse_duration(v) {
            Ok(d) if d.is_zero() => {
                err(key, format!("`{v}` must be longer than zero"), example);
                Duration::from_secs(1)
            }
            Ok(d) => d,
            Err(m) => {
                err(key, m, example);
                Duration::from_secs(1)
            }
        }
    };
    let timeout = dur("api.timeout", &a.timeout, "timeout = \"30s\"");
    let initial_backoff = dur(
        "api.initial_backoff",
        &a.initial_backoff,
        "initial_backoff = \"500ms\"",
    );
    let max_backoff = dur("api.max_backoff", &a.max_backoff, "max_backoff = \"5m\"");
    let linger = dur("batch.linger", &raw.batch.linger, "linger = \"1s\"");
    let ca_file = a.ca_file.as_deref().map(str::trim).map(PathBuf::from);
    if let Some(p) = &ca_file {
        if let Err(m) = crate::config::secret::check_ca_file(p) {
            err(
                "api.ca_file",
                m,
                "ca_file = \"/etc/ssl/certs/proxy-ca.pem\"",
            );
        }
    }
    if initial_backoff > max_backoff {
        err(
            "api.initial_backoff",
            "must not be longer than api.max_backoff".into(),
            "initial_backoff = \"500ms\"",
        );
    }
    if !(1..=64).contains(&a.concurrency) {
        err(
            "api.concurrency",
            format!("{} is out of range 1..=64", a.concurrency),
            "concurrency = 4",
        );
    }
    if !(0..=1_000_000).contains(&a.requests_per_minute) {
        err(
            "api.requests_per_minute",
            format!(
                "{} is out of range 0..=1000000 (0 = no limit)",
                a.requests_per_minute
            ),
            "requests_per_minute = 600",
        );
    }

    // [batch]
    let max = schema().max_records_per_request as i64;
    if !(1..=max).contains(&raw.batch.max_records) {
        err(
            "batch.max_records",
            format!(
                "{} is out of range 1..={max} (the API takes at most {max} records per request)",
                raw.batch.max_records
            ),
            "max_records = 5000",
        );
    }
    let max_bytes = match parse_size(&raw.batch.max_bytes) {
        Ok(b) if b >= 1024 => b as usize,
        Ok(b) => {
            err(
                "batch.max_bytes",
                format!("{b} bytes is too small (at least 1KiB)"),
                "max_bytes = \"8MiB\"",
            );
            1024
        }
        Err(m) => {
            err("batch.max_bytes", m, "max_bytes = \"8MiB\"");
            1024
        }
    };

    // [state], [http], [log], [ids]
    if raw.state.dir.trim().is_empty() {
        err(
            "state.dir",
            "is required".into(),
            "dir = \"/var/lib/cobi-sync\"",
        );
    }
    let listen = if raw.http.listen.trim().is_empty() {
        None
    } else {
        match raw.http.listen.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                err(
                    "http.listen",
                    format!(
                        "`{}` is not an address:port (\"\" disables the endpoint)",
                        raw.http.listen
                    ),
                    "listen = \"127.0.0.1:7781\"",
                );
                None
            }
        }
    };
    let format = match raw.log.format.as_str() {
        "json" => LogFormat::Json,
        "text" => LogFormat::Text,
        other => {
            err(
                "log.format",
                format!("`{other}` is not \"json\" or \"text\""),
                "format = \"json\"",
            );
            LogFormat::Json
        }
    };
    if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
        err(
            "log.level",
            format!("`{}` is not a level or filter directive", raw.log.level),
            "level = \"info\"",
        );
    }
    let id_namespace = uuid::Uuid::parse_str(&raw.ids.namespace).unwrap_or_else(|_| {
        err(
            "ids.namespace",
            format!("`{}` is not a UUID", raw.ids.namespace),
            "namespace = \"9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d\"",
        );
        uuid::Uuid::nil()
    });

    // [[mapping]]
    if raw.mapping.is_empty() {
        err(
            "mapping",
            "no [[mapping]] tables: map at least one source table to a Cobi type".into(),
            "[[mapping]] type = \"shops\" table = \"public.merchant\"",
        );
    }
    let mut mappings = Vec::new();
    for (i, m) in raw.mapping.iter().enumerate() {
        if let Some(ms) = validate_mapping(i, m, mode, &mut errs) {
            mappings.push(ms);
        }
    }
    for (i, a) in mappings.iter().enumerate() {
        for b in &mappings[..i] {
            if a.id == b.id {
                errs.push(ConfigError::new(
                    format!("mapping[{}]", a.index),
                    format!(
                        "maps the same source to the same type as mapping[{}]; merge them",
                        b.index
                    ),
                ));
            }
        }
    }

    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Settings {
        source: SourceSettings {
            url: url.expect("checked"),
            password_file: raw.source.password_file.as_ref().map(PathBuf::from),
            mode,
            timezone,
            replication: ReplicationSettings {
                slot: r.slot.clone(),
                publication: r.publication.clone(),
                snapshot,
                max_slot_lag,
                on_slot_lost,
                failover: r.failover,
            },
            poll: PollSettings {
                schedule: schedule.expect("checked"),
                schedule_timezone,
                lookback,
                page_size: p.page_size as u32,
            },
        },
        api: ApiSettings {
            base_url,
            key: KeySource {
                file: a.api_key_file.as_ref().map(PathBuf::from),
                env: a.api_key_env.trim().to_string(),
                installed: None,
            },
            timeout,
            concurrency: a.concurrency as usize,
            requests_per_minute: a.requests_per_minute as u32,
            initial_backoff,
            max_backoff,
            ca_file,
        },
        batch: BatchSettings {
            max_records: raw.batch.max_records as usize,
            max_bytes,
            linger,
        },
        state: StateSettings {
            dir: PathBuf::from(raw.state.dir.trim()),
        },
        http: HttpSettings { listen },
        log: LogSettings {
            format,
            level: raw.log.level.clone(),
        },
        id_namespace,
        mappings,
    })
}

fn validate_mapping(
    i: usize,
    m: &RawMapping,
    mode: Mode,
    errs: &mut Vec<ConfigError>,
) -> Option<MappingSettings> {
    let at = |k: &str| {
        if k.is_empty() {
            format!("mapping[{i}]")
        } else {
            format!("mapping[{i}].{k}")
        }
    };
    let before = errs.len();
    let mut err = |key: String, msg: String, example: &str| push_error(errs, key, msg, example);
    let s = schema();
    let ty = if m.ty.is_empty() {
        err(at("type"), "is required".into(), "type = \"shops\"");
        None
    } else {
        let t = s.type_id(&m.ty);
        if t.is_none() {
            err(
                at("type"),
                format!(
                    "unknown Cobi type `{}`; types are: {}",
                    m.ty,
                    s.type_names().join(", ")
                ),
                "type = \"shops\"",
            );
        }
        t
    };
    let source = match (&m.table, &m.query) {
        (Some(_), Some(_)) => {
            err(
                at(""),
                "set either `table` or `query`, not both".into(),
                "table = \"public.merchant\"",
            );
            None
        }
        (None, None) => {
            err(
                at("table"),
                "is required (or `query` in poll mode)".into(),
                "table = \"public.merchant\"",
            );
            None
        }
        (Some(t), None) => {
            let (schema_name, name) = match t.split_once('.') {
                Some((a, b)) => (
                    a.trim_matches('"').to_string(),
                    b.trim_matches('"').to_string(),
                ),
                None => ("public".to_string(), t.trim_matches('"').to_string()),
            };
            if schema_name.is_empty() || name.is_empty() || name.contains('.') {
                err(
                    at("table"),
                    format!("`{t}` is not a table name"),
                    "table = \"public.merchant\"",
                );
                None
            } else {
                Some(MappingSource::Table {
                    schema: schema_name,
                    name,
                })
            }
        }
        (None, Some(q)) => {
            if mode != Mode::Poll {
                err(
                    at("query"),
                    "queries are only supported in poll mode (logical replication streams \
                     tables); map the table instead or set source.mode = \"poll\""
                        .into(),
                    "table = \"public.merchant\"",
                );
                None
            } else if !q.trim_start().to_ascii_lowercase().starts_with("select")
                && !q.trim_start().to_ascii_lowercase().starts_with("with")
            {
                err(
                    at("query"),
                    "must be a SELECT statement".into(),
                    "query = \"SELECT id, name FROM shop\"",
                );
                None
            } else {
                Some(MappingSource::Query(
                    q.trim().trim_end_matches(';').to_string(),
                ))
            }
        }
    };
    if let Some(k) = &m.key {
        if k.is_empty() || k.iter().any(|c| c.is_empty()) {
            err(
                at("key"),
                "must list at least one column".into(),
                "key = [\"id\"]",
            );
        }
    } else if matches!(source, Some(MappingSource::Query(_))) {
        err(
            at("key"),
            "is required for a query mapping (a query has no primary key)".into(),
            "key = [\"id\"]",
        );
    }
    let on_delete = match m.on_delete.as_deref().unwrap_or("soft") {
        "soft" => OnDelete::Soft,
        "ignore" => OnDelete::Ignore,
        other => {
            err(
                at("on_delete"),
                format!("`{other}` is not \"soft\" or \"ignore\""),
                "on_delete = \"soft\"",
            );
            OnDelete::Soft
        }
    };
    let on_truncate = match m.on_truncate.as_deref().unwrap_or("error") {
        "error" => OnTruncate::Error,
        "soft_delete" => OnTruncate::SoftDelete,
        other => {
            err(
                at("on_truncate"),
                format!("`{other}` is not \"error\" or \"soft_delete\""),
                "on_truncate = \"error\"",
            );
            OnTruncate::Error
        }
    };
    let reconcile = match &m.reconcile {
        None => None,
        Some(_) if mode != Mode::Poll => {
            err(
                at("reconcile"),
                "only applies in poll mode (replication sees deletes directly)".into(),
                "",
            );
            None
        }
        Some(c) => match parse_cron(c) {
            Ok(s) => Some(s),
            Err(msg) => {
                err(at("reconcile"), msg, "reconcile = \"0 0 3 * * *\"");
                None
            }
        },
    };
    if mode == Mode::Poll && m.cursor.as_deref() == Some("") {
        err(
            at("cursor"),
            "must name a column".into(),
            "cursor = \"updated_at\"",
        );
    }

    // Fields.
    let mut fields = Vec::new();
    if let Some(ty) = ty {
        let t = s.ty(ty);
        if m.fields.is_empty() {
            err(
                at("fields"),
                format!(
                    "no fields mapped; {} needs at least {}",
                    t.name,
                    required_list(ty)
                ),
                "[mapping.fields] name = \"trade_name\"",
            );
        }
        for (name, v) in &m.fields {
            let key = at(&format!("fields.{name}"));
            let Some(f) = t.field(name) else {
                let names: Vec<&str> = t.fields.iter().map(|f| f.name.as_str()).collect();
                err(
                    key,
                    format!(
                        "`{name}` is not a field of {}; its fields are: {}",
                        t.name,
                        names.join(", ")
                    ),
                    "",
                );
                continue;
            };
            match parse_field_spec(v, ty, f) {
                Ok(FieldSpec::Const(c)) => {
                    match crate::mapping::engine::check_constant(&c, ty, f) {
                        Ok(()) => fields.push((f, FieldSpec::Const(c))),
                        Err(msg) => err(key, msg, &format!("{name} = {{ column = \"src_col\" }}")),
                    }
                }
                Ok(spec) => fields.push((f, spec)),
                Err(msg) => err(key, msg, &format!("{name} = {{ column = \"src_col\" }}")),
            }
        }
        fields.sort_by_key(|(f, _)| *f);
        if !m.fields.is_empty() {
            for def in &t.fields {
                if def.required && !m.fields.contains_key(&def.name) {
                    err(
                        at(&format!("fields.{}", def.name)),
                        format!("required field of {} is not mapped", t.name),
                        &format!("{} = \"source_column\"", def.name),
                    );
                }
            }
        }
        // uuid5:item needs item_type mapped.
        let uses_item = fields.iter().any(|(_, spec)| {
            matches!(spec, FieldSpec::Column { transforms, .. } if transforms.contains(&Transform::Uuid5Item))
        });
        if uses_item
            && t.field("item_type")
                .is_some_and(|it| !fields.iter().any(|(f, _)| *f == it))
        {
            err(
                at("fields.item_type"),
                "must be mapped when item_id uses uuid5:item".into(),
                "item_type = \"kind\"",
            );
        }
    }
    if errs.len() > before {
        return None;
    }
    let ty = ty?;
    let source = source?;
    let id = match &source {
        MappingSource::Table { schema, name } => format!("{}/{schema}.{name}", s.ty(ty).name),
        MappingSource::Query(q) => {
            format!(
                "{}/query-{:016x}",
                s.ty(ty).name,
                xxhash_rust::xxh3::xxh3_64(q.as_bytes())
            )
        }
    };
    Some(MappingSettings {
        index: i,
        id: id.into(),
        ty,
        source,
        key: m.key.clone(),
        cursor: m.cursor.clone().filter(|c| !c.is_empty()),
        on_delete,
        on_truncate,
        reconcile,
        fields,
    })
}

fn required_list(ty: TypeId) -> String {
    schema()
        .ty(ty)
        .fields
        .iter()
        .filter(|f| f.required)
        .map(|f| f.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::load_str;

    fn base(mapping: &str) -> String {
        format!(
            r#"
[source]
url = "postgres://cobi_sync@localhost:5432/shop"
mode = "poll"
[api]
base_url = "http://127.0.0.1:8080"
{mapping}
"#
        )
    }

    const SHOPS: &str = r#"
[[mapping]]
type = "shops"
table = "public.merchant"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
"#;

    fn first_error(text: &str) -> String {
        match load_str(text, "t.toml") {
            Ok(_) => String::from("<valid>"),
            Err(e) => e.errors[0].to_string(),
        }
    }

    #[test]
    fn cron_day_of_week_counts_like_standard_cron() {
        use chrono::{Datelike, TimeZone};
        // Wednesday 2024-01-03 00:00 UTC; the next matching day's weekday.
        let start = chrono::Utc.with_ymd_and_hms(2024, 1, 3, 0, 0, 0).unwrap();
        let cases = [
            ("0 0 12 * * 1", vec!["Mon"]),
            ("0 0 12 * * 0", vec!["Sun"]),
            ("0 0 12 * * 7", vec!["Sun"]),
            ("0 0 12 * * 1-5", vec!["Mon", "Tue", "Wed", "Thu", "Fri"]),
            ("0 0 12 * * 5-7", vec!["Fri", "Sat", "Sun"]),
            ("0 0 12 * * 6,0", vec!["Sat", "Sun"]),
            (
                "0 0 12 * * MON-FRI",
                vec!["Mon", "Tue", "Wed", "Thu", "Fri"],
            ),
            ("0 0 12 * * */2", vec!["Sun", "Tue", "Thu", "Sat"]),
            (
                "0 0 12 * * *",
                vec!["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"],
            ),
        ];
        for (expr, want) in cases {
            let s = super::parse_cron(expr).unwrap();
            let mut got: Vec<String> = s
                .after(&start)
                .take(7)
                .map(|t| t.weekday().to_string())
                .collect();
            got.sort();
            got.dedup();
            let mut want: Vec<String> = want.iter().map(|d| d.to_string()).collect();
            want.sort();
            assert_eq!(got, want, "{expr}");
        }
        assert!(super::parse_cron("0 0 12 * * 8")
            .unwrap_err()
            .contains("0-7"));
    }

    #[test]
    fn constants_that_can_never_be_valid_are_refused() {
        let with = |field: &str| base(&SHOPS.replace("region =", &format!("{field}\nregion =")));
        let cases = [
            (
                "created = { value = 5 }",
                "mapping[0].fields.created: a integer value cannot become field `created`",
            ),
            (
                "created = { value = \"soon\" }",
                "mapping[0].fields.created",
            ),
        ];
        for (field, want) in &cases {
            let got = first_error(&with(field));
            assert!(got.starts_with(want), "{field}: {got}");
        }
        // A valid constant still passes.
        assert_eq!(
            first_error(&with("created = { value = \"2024-01-02T03:04:05Z\" }")),
            "<valid>"
        );
    }

    #[test]
    fn table_of_bad_values() {
        let cases: Vec<(String, &str)> = vec![
            (
                base(SHOPS).replace("[api]", "[api]\ntimeout = \"soon\""),
                "api.timeout: `soon` is not a duration",
            ),
            (
                base(SHOPS).replace("[api]", "[batch]\nmax_records = 6000\n[api]"),
                "batch.max_records: 6000 is out of range 1..=5000",
            ),
            (
                base(SHOPS).replace("[api]", "[batch]\nmax_bytes = \"lots\"\n[api]"),
                "batch.max_bytes: `lots` is not a size",
            ),
            (
                base(&SHOPS.replace("\"shops\"", "\"shoppes\"")),
                "mapping[0].type: unknown Cobi type `shoppes`",
            ),
            (
                base(&SHOPS.replace(
                    "name = \"trade_name\"",
                    "name = \"trade_name\"\ncolour = \"c\"",
                )),
                "mapping[0].fields.colour: `colour` is not a field of shops",
            ),
            (
                base(&SHOPS.replace("name = \"trade_name\"\n", "")),
                "mapping[0].fields.name: required field of shops is not mapped",
            ),
            (
                base(&SHOPS.replace("transform = \"uuid5\"", "transform = \"uuid5:nosuchtype\"")),
                "mapping[0].fields.shop_id: unknown type `nosuchtype`",
            ),
            (
                base(SHOPS).replace("mode = \"poll\"", "mode = \"push\""),
                "source.mode: `push` is not a mode",
            ),
            (
                base(SHOPS).replace("http://127.0.0.1:8080", "http://api.example.com"),
                "api.base_url: plain http is only allowed to a loopback address",
            ),
            (
                base(SHOPS).replace("[api]", "[source.poll]\nschedule = \"* * * * *\"\n[api]"),
                "source.poll.schedule: `* * * * *` has 5 fields",
            ),
            (
                base(SHOPS).replace(
                    "localhost:5432/shop",
                    "localhost:5432/shop?sslmode=sometimes",
                ),
                "source.url: sslmode `sometimes`",
            ),
            (
                base(SHOPS).replace("[api]", "[source.replication]\nslot = \"Bad-Slot\"\n[api]"),
                "source.replication.slot: `Bad-Slot` must be",
            ),
            (
                base(SHOPS).replace(
                    "[api]",
                    "[source.replication]\npublication = \"Bad-Pub\"\n[api]",
                ),
                "source.replication.publication: `Bad-Pub` must be",
            ),
            (
                base(&SHOPS.replace(
                    "table = \"public.merchant\"",
                    "query = \"SELECT * FROM merchant\"",
                )),
                "mapping[0].key: is required for a query mapping",
            ),
            (
                base(SHOPS).replace("mode = \"poll\"", "timezone = \"Mars/Olympus\""),
                "source.timezone: `Mars/Olympus` is not an IANA time zone",
            ),
            (base(""), "mapping: no [[mapping]] tables"),
        ];
        for (text, want) in cases {
            let got = first_error(&text);
            assert!(got.starts_with(want), "want `{want}`, got `{got}`");
        }
    }

    #[test]
    fn each_name_key_gets_its_own_example() {
        for key in ["slot", "publication"] {
            let text = base(SHOPS).replace(
                "[api]",
                &format!("[source.replication]\n{key} = \"Bad-Name\"\n[api]"),
            );
            let got = first_error(&text);
            assert!(
                got.ends_with(&format!("(example: {key} = \"cobi_sync\")")),
                "{key}: {got}"
            );
        }
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let text = base(SHOPS)
            .replace("[api]", "[api]\ntimeout = \"soon\"\nconcurrency = 0")
            .replace(
                "\"trade_name\"",
                "{ column = \"trade_name\", transform = \"shout\" }",
            );
        let e = load_str(&text, "t.toml").unwrap_err();
        let keys: Vec<&str> = e.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["api.timeout", "api.concurrency", "mapping[0].fields.name"]
        );
        let shown = e.to_string();
        assert!(shown.contains("3 problems"), "{shown}");
    }

    #[test]
    fn typed_values() {
        let s = load_str(
            &base(SHOPS).replace(
                "[api]",
                "[batch]\nlinger = \"250ms\"\nmax_bytes = \"2MiB\"\n[api]",
            ),
            "t",
        )
        .unwrap();
        assert_eq!(s.batch.linger, std::time::Duration::from_millis(250));
        assert_eq!(s.batch.max_bytes, 2 * 1024 * 1024);
        assert_eq!(s.source.replication.max_slot_lag, 4 << 30);
        assert_eq!(&*s.mappings[0].id, "shops/public.merchant");
        assert_eq!(s.mappings[0].columns(), ["id", "trade_name", "country"]);
        assert_eq!(s.http.listen.unwrap().port(), 7781);
    }
}
