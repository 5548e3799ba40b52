//! SIGHUP (DESIGN.md §2): re-read the configuration file and apply what can
//! change while running; report what cannot, keeping its old value. SIGHUP
//! never stops the daemon — a file with errors is reported and ignored.
//!
//! Applied live: `log.level`, the API key source (`api.api_key_file`,
//! `api.api_key_env`, re-read at once), and the retry delays
//! (`api.initial_backoff`, `api.max_backoff`). Everything else — including
//! batch settings and added or removed mappings, which the running source
//! and sink were built with — is reported as needing a restart.

use std::path::Path;

use tracing::{error, info, warn};

use crate::config::{self, Settings};
use crate::ops::logging;
use crate::sink::client::ApiClient;

/// One live change SIGHUP applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `log.level`.
    LogLevel(String),
    /// `api.api_key_file` / `api.api_key_env`.
    KeySource,
    /// `api.initial_backoff` / `api.max_backoff`.
    Backoff,
}

/// What a re-read configuration changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Applied now.
    pub apply: Vec<Change>,
    /// Dotted keys that changed but need a restart (old values kept).
    pub restart: Vec<&'static str>,
}

/// Compares the running settings with the re-read ones (pure).
pub fn plan(old: &Settings, new: &Settings) -> Plan {
    let mut p = Plan::default();
    if old.log.level != new.log.level {
        p.apply.push(Change::LogLevel(new.log.level.clone()));
    }
    if old.api.key.file != new.api.key.file || old.api.key.env != new.api.key.env {
        p.apply.push(Change::KeySource);
    }
    if (old.api.initial_backoff, old.api.max_backoff)
        != (new.api.initial_backoff, new.api.max_backoff)
    {
        p.apply.push(Change::Backoff);
    }
    let dbg = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let restart: [(&'static str, bool); 16] = [
        ("log.format", old.log.format != new.log.format),
        ("source.url", old.source.url != new.source.url),
        (
            "source.password_file",
            old.source.password_file != new.source.password_file,
        ),
        ("source.mode", old.source.mode != new.source.mode),
        (
            "source.timezone",
            dbg(&old.source.timezone) != dbg(&new.source.timezone),
        ),
        (
            "source.replication",
            dbg(&old.source.replication) != dbg(&new.source.replication),
        ),
        (
            "source.poll",
            dbg(&old.source.poll) != dbg(&new.source.poll),
        ),
        ("api.base_url", old.api.base_url != new.api.base_url),
        ("api.ca_file", old.api.ca_file != new.api.ca_file),
        ("api.timeout", old.api.timeout != new.api.timeout),
        (
            "api.concurrency",
            old.api.concurrency != new.api.concurrency,
        ),
        (
            "api.requests_per_minute",
            old.api.requests_per_minute != new.api.requests_per_minute,
        ),
        ("batch", dbg(&old.batch) != dbg(&new.batch)),
        ("state.dir", old.state.dir != new.state.dir),
        ("http.listen", old.http.listen != new.http.listen),
        ("ids.namespace", old.id_namespace != new.id_namespace),
    ];
    p.restart = restart
        .into_iter()
        .filter_map(|(k, changed)| changed.then_some(k))
        .collect();
    if dbg(&old.mappings) != dbg(&new.mappings) {
        p.restart.push("mapping");
    }
    p
}

/// Handles one SIGHUP: re-reads `path`, applies what can change live to
/// `client` and the log filter, updates `current` to what now runs, and
/// logs each change and each key that needs a restart.
pub fn on_sighup(path: Option<&Path>, current: &mut Settings, client: &ApiClient) {
    let Some(path) = path else {
        warn!("SIGHUP: no configuration file to re-read; nothing changed");
        return;
    };
    let mut new = match config::load(path) {
        Ok(s) => s,
        Err(e) => {
            error!(
                config = %path.display(),
                errors = %e.to_string().trim_end(),
                "SIGHUP: the configuration file has errors; the running configuration is kept"
            );
            return;
        }
    };
    // The installed key path is derived from the config's location.
    new.api.key.installed = current.api.key.installed.clone();
    let p = plan(current, &new);
    for c in &p.apply {
        match c {
            Change::LogLevel(level) => match logging::set_level(level) {
                Ok(()) => {
                    current.log.level = level.clone();
                    info!(level = %level, "SIGHUP: log.level applied");
                }
                Err(e) => warn!(error = %e, "SIGHUP: log.level not applied"),
            },
            Change::KeySource => {
                current.api.key = new.api.key.clone();
                client.set_key_source(new.api.key.clone());
                info!(key_source = %new.api.key.describe(), "SIGHUP: api key source applied");
            }
            Change::Backoff => {
                current.api.initial_backoff = new.api.initial_backoff;
                current.api.max_backoff = new.api.max_backoff;
                client.set_backoff(new.api.initial_backoff, new.api.max_backoff);
                info!(
                    initial_backoff = ?new.api.initial_backoff,
                    max_backoff = ?new.api.max_backoff,
                    "SIGHUP: retry delays applied"
                );
            }
        }
    }
    // Key rotation: the same source, re-read now (a file replaced in place,
    // or the credential after `systemctl reload`).
    if !p.apply.contains(&Change::KeySource) {
        client.set_key_source(current.api.key.clone());
    }
    for key in &p.restart {
        warn!(
            key,
            "SIGHUP: {key} changed but cannot change while running; the old value is kept \
             until a restart (systemctl restart cobi-sync)"
        );
    }
    info!(
        applied = p.apply.len(),
        needs_restart = p.restart.len(),
        "SIGHUP: configuration re-read"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[source]
url = "postgres://cobi_sync@127.0.0.1:5432/shop"
[api]
base_url = "http://127.0.0.1:9"
[log]
level = "info"
[[mapping]]
type = "shops"
table = "public.merchant"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
"#;

    fn settings(edit: (&str, &str)) -> Settings {
        assert!(BASE.contains(edit.0), "{}", edit.0);
        config::load_str(&BASE.replacen(edit.0, edit.1, 1), "<test>").unwrap()
    }

    #[test]
    fn what_sighup_applies_and_what_needs_a_restart() {
        let old = settings(("", ""));
        type Case<'a> = ((&'a str, &'a str), Vec<Change>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (("", ""), vec![], vec![]),
            (
                ("level = \"info\"", "level = \"debug\""),
                vec![Change::LogLevel("debug".into())],
                vec![],
            ),
            (
                (
                    "[api]",
                    "[api]\napi_key_file = \"/etc/cobi-sync/other-key\"",
                ),
                vec![Change::KeySource],
                vec![],
            ),
            (
                ("[api]", "[api]\nmax_backoff = \"1m\""),
                vec![Change::Backoff],
                vec![],
            ),
            (
                ("[api]", "[api]\ntimeout = \"5s\""),
                vec![],
                vec!["api.timeout"],
            ),
            (
                ("[log]", "[batch]\nmax_records = 10\n[log]"),
                vec![],
                vec!["batch"],
            ),
            (("5432/shop", "5432/other"), vec![], vec!["source.url"]),
            (
                ("name = \"trade_name\"", "name = \"label\""),
                vec![],
                vec!["mapping"],
            ),
            (
                ("[log]", "[http]\nlisten = \"\"\n[log]"),
                vec![],
                vec!["http.listen"],
            ),
        ];
        for (edit, apply, restart) in cases {
            let p = plan(&old, &settings(edit));
            assert_eq!(p.apply, apply, "{edit:?}");
            assert_eq!(p.restart, restart, "{edit:?}");
        }
    }
}
