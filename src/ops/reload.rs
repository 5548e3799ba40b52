//! SIGHUP (DESIGN.md §2): re-read the configuration file and apply what can
//! change while running; report what cannot, keeping its old value. SIGHUP
//! never stops the daemon — a file with errors is reported (one ERROR per
//! problem, naming its key) and the running configuration is kept.
//!
//! Three kinds of keys ([`plan`]):
//! - applied in place: `log.level`, the API key source (`api.api_key_file`,
//!   `api.api_key_env`, re-read at once — also the key rotation path under
//!   systemd) and the retry delays (`api.initial_backoff`,
//!   `api.max_backoff`);
//! - applied by restarting the pipeline in-process ([`REBUILD_KEYS`]):
//!   `[batch]`, `api.timeout`, `api.concurrency`,
//!   `api.requests_per_minute` and added, removed or changed mappings. The
//!   daemon drains the running pipeline exactly as on SIGTERM (the source
//!   stops reading, the sink delivers and commits what it holds), then
//!   starts source and sink again with the new settings from the durable
//!   progress. Added, changed and removed mappings are first checked
//!   against the database ([`preflight`]); if they do not fit, the
//!   mapping changes are reported and not applied (the running mappings
//!   stay), the rest is;
//! - needing a real restart (everything else: the database, the mode, the
//!   state dir, the endpoint, slot and publication names, poll schedule…):
//!   reported with a WARN each; the old values stay in force.

pub mod preflight;

use std::path::Path;

use tracing::{error, info, warn};

use crate::config::{self, MappingSettings, Settings};
use crate::model::schema::schema;
use crate::ops::logging;
use crate::sink::client::ApiClient;

/// One change SIGHUP applies in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `log.level`.
    LogLevel(String),
    /// `api.api_key_file` / `api.api_key_env`.
    KeySource,
    /// `api.initial_backoff` / `api.max_backoff`.
    Backoff,
}

/// The keys a pipeline restart applies.
pub const REBUILD_KEYS: [&str; 7] = [
    "batch.max_records",
    "batch.max_bytes",
    "batch.linger",
    "api.timeout",
    "api.concurrency",
    "api.requests_per_minute",
    "mapping",
];

/// What a re-read configuration changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Applied in place.
    pub apply: Vec<Change>,
    /// Applied by restarting the pipeline (keys of [`REBUILD_KEYS`]).
    pub rebuild: Vec<&'static str>,
    /// Dotted keys that changed but need a restart (old values kept).
    pub restart: Vec<&'static str>,
}

/// Mappings added, removed or changed, by their state-store id.
#[derive(Debug, Clone, Default)]
pub struct MappingDiff {
    /// In the new file only.
    pub added: Vec<MappingSettings>,
    /// In the running configuration only.
    pub removed: Vec<MappingSettings>,
    /// In both, with other fields, key, cursor or policies (new version).
    pub changed: Vec<MappingSettings>,
}

impl MappingDiff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Compares mappings by id; a mapping that only moved in the file is not a
/// change.
pub fn diff_mappings(old: &[MappingSettings], new: &[MappingSettings]) -> MappingDiff {
    let same = |a: &MappingSettings, b: &MappingSettings| {
        let unplaced = |m: &MappingSettings| {
            format!(
                "{:?}",
                MappingSettings {
                    index: 0,
                    ..m.clone()
                }
            )
        };
        unplaced(a) == unplaced(b)
    };
    let mut d = MappingDiff::default();
    for n in new {
        match old.iter().find(|o| o.id == n.id) {
            None => d.added.push(n.clone()),
            Some(o) if !same(o, n) => d.changed.push(n.clone()),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|n| n.id == o.id) {
            d.removed.push(o.clone());
        }
    }
    d
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
    let mode_changed = old.source.mode != new.source.mode;
    let rebuild: [(&'static str, bool); 7] = [
        (
            "batch.max_records",
            old.batch.max_records != new.batch.max_records,
        ),
        (
            "batch.max_bytes",
            old.batch.max_bytes != new.batch.max_bytes,
        ),
        ("batch.linger", old.batch.linger != new.batch.linger),
        ("api.timeout", old.api.timeout != new.api.timeout),
        (
            "api.concurrency",
            old.api.concurrency != new.api.concurrency,
        ),
        (
            "api.requests_per_minute",
            old.api.requests_per_minute != new.api.requests_per_minute,
        ),
        // Mappings were validated for the new file's mode: with another
        // mode they wait for the restart that changes the mode.
        (
            "mapping",
            !mode_changed && !diff_mappings(&old.mappings, &new.mappings).is_empty(),
        ),
    ];
    p.rebuild = rebuild
        .into_iter()
        .filter_map(|(k, changed)| changed.then_some(k))
        .collect();
    let restart: [(&'static str, bool); 13] = [
        ("log.format", old.log.format != new.log.format),
        ("source.url", old.source.url != new.source.url),
        (
            "source.password_file",
            old.source.password_file != new.source.password_file,
        ),
        ("source.mode", mode_changed),
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
        ("state.dir", old.state.dir != new.state.dir),
        ("http.listen", old.http.listen != new.http.listen),
        ("ids.namespace", old.id_namespace != new.id_namespace),
        (
            "mapping",
            mode_changed && !diff_mappings(&old.mappings, &new.mappings).is_empty(),
        ),
    ];
    p.restart = restart
        .into_iter()
        .filter_map(|(k, changed)| changed.then_some(k))
        .collect();
    p
}

/// The settings the restarted pipeline runs with: `current`, with the keys
/// of `rebuild` taken from `new` (everything else keeps its running value).
pub fn rebuilt(current: &Settings, new: &Settings, rebuild: &[&str]) -> Settings {
    let mut next = current.clone();
    for key in rebuild {
        match *key {
            "batch.max_records" => next.batch.max_records = new.batch.max_records,
            "batch.max_bytes" => next.batch.max_bytes = new.batch.max_bytes,
            "batch.linger" => next.batch.linger = new.batch.linger,
            "api.timeout" => next.api.timeout = new.api.timeout,
            "api.concurrency" => next.api.concurrency = new.api.concurrency,
            "api.requests_per_minute" => next.api.requests_per_minute = new.api.requests_per_minute,
            "mapping" => next.mappings = new.mappings.clone(),
            other => unreachable!("{other} is not a rebuild key"),
        }
    }
    next
}

/// A pipeline restart SIGHUP asks for.
#[derive(Debug, Clone)]
pub struct Rebuild {
    /// The settings to restart with.
    pub next: Settings,
    /// The keys it applies.
    pub keys: Vec<&'static str>,
    /// The mapping changes among them.
    pub mappings: MappingDiff,
}

/// Handles one SIGHUP: re-reads `path`, applies what can change in place
/// to `client`, the log filter and `current`, logs each change and each key
/// that needs a restart, and returns the pipeline restart the rest needs
/// (see [`settle`]).
pub fn on_sighup(
    path: Option<&Path>,
    current: &mut Settings,
    client: &ApiClient,
) -> Option<Rebuild> {
    let Some(path) = path else {
        warn!("SIGHUP: no configuration file to re-read; nothing changed");
        return None;
    };
    let mut new = match config::load(path) {
        Ok(s) => s,
        Err(e) => {
            for problem in &e.errors {
                error!(
                    config = %path.display(),
                    key = %problem.key,
                    problem = %problem,
                    "SIGHUP: invalid configuration: {problem}"
                );
            }
            error!(
                config = %path.display(),
                problems = e.errors.len(),
                "SIGHUP: the configuration file has errors; the running configuration is kept \
                 (fix the file, then reload again)"
            );
            return None;
        }
    };
    // The installed key path is derived from the config's location.
    new.api.key.installed = current.api.key.installed.clone();
    let p = plan(current, &new);
    apply_in_place(&p.apply, current, &new, client);
    for key in &p.restart {
        warn!(
            key,
            "SIGHUP: {key} changed but cannot change while running; the old value is kept \
             until a restart (systemctl restart cobi-sync)"
        );
    }
    info!(
        applied = p.apply.len(),
        pipeline_restart = p.rebuild.len(),
        needs_restart = p.restart.len(),
        "SIGHUP: configuration re-read"
    );
    if p.rebuild.is_empty() {
        return None;
    }
    Some(Rebuild {
        next: rebuilt(current, &new, &p.rebuild),
        mappings: if p.rebuild.contains(&"mapping") {
            diff_mappings(&current.mappings, &new.mappings)
        } else {
            MappingDiff::default()
        },
        keys: p.rebuild,
    })
}

fn apply_in_place(apply: &[Change], current: &mut Settings, new: &Settings, client: &ApiClient) {
    for c in apply {
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
    if !apply.contains(&Change::KeySource) {
        client.set_key_source(current.api.key.clone());
    }
}

/// Checks the mapping changes of `rebuild` against the database
/// ([`preflight::check`]); when they do not fit, logs why (ERROR) and
/// keeps the running mappings. Logs what happens to each added, removed or
/// changed mapping. Returns the settings to restart the pipeline with, or
/// `None` when nothing is left to apply.
pub async fn settle(mut rebuild: Rebuild, current: &Settings) -> Option<Settings> {
    let d = &rebuild.mappings;
    if !d.is_empty() {
        let to_check: Vec<MappingSettings> = d.added.iter().chain(&d.changed).cloned().collect();
        if let Err(problems) = preflight::check(&rebuild.next, &to_check, &d.removed).await {
            for p in &problems {
                error!(problem = %p, "SIGHUP: mapping change not applied: {p}");
            }
            error!(
                "SIGHUP: the mapping changes were not applied; the running mappings are kept \
                 (fix what is named above, then reload again)"
            );
            rebuild.next.mappings = current.mappings.clone();
            rebuild.keys.retain(|k| *k != "mapping");
        } else {
            log_mapping_changes(d, rebuild.next.source.mode);
        }
    }
    if rebuild.keys.is_empty() {
        return None;
    }
    Some(rebuild.next)
}

fn log_mapping_changes(d: &MappingDiff, mode: config::Mode) {
    let type_name = |m: &MappingSettings| schema().ty(m.ty).name.clone();
    for m in &d.added {
        info!(
            mapping = %m.label(),
            id = %m.id,
            "SIGHUP: mapping added; it starts with {}",
            match mode {
                config::Mode::Replication =>
                    "a copy of its table while the stream runs (as source.replication.snapshot says), then its changes",
                config::Mode::Poll => "a first read of its table, then its changes",
            }
        );
    }
    for m in &d.changed {
        info!(
            mapping = %m.label(),
            id = %m.id,
            "SIGHUP: mapping changed; rows read from now on use the new version (records already \
             sent are not re-sent: run `cobi-sync resync --type {}` for that)",
            type_name(m)
        );
    }
    for m in &d.removed {
        warn!(
            mapping = %m.label(),
            id = %m.id,
            "SIGHUP: mapping removed; its changes are no longer read or sent. What Cobi received \
             stays there (nothing is deleted); its key states and dead letters stay in the state \
             store (`cobi-sync dlq list --type {}`); mapping it again resumes {}",
            type_name(m),
            match mode {
                config::Mode::Replication => "with a new copy of its table",
                config::Mode::Poll => "from its last poll cursor",
            }
        );
    }
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

    const BRANCHES: &str = r#"
[[mapping]]
type = "branches"
table = "public.branch"
[mapping.fields]
branch_id = "id"
shop_id = "shop_id"
name = "name"
region = "region"
"#;

    fn settings(edit: (&str, &str)) -> Settings {
        assert!(BASE.contains(edit.0), "{}", edit.0);
        config::load_str(&BASE.replacen(edit.0, edit.1, 1), "<test>").unwrap()
    }

    fn with_branches() -> Settings {
        config::load_str(&format!("{BASE}{BRANCHES}"), "<test>").unwrap()
    }

    #[test]
    fn what_sighup_applies_and_what_needs_a_restart() {
        let old = settings(("", ""));
        type Case<'a> = ((&'a str, &'a str), Vec<Change>, Vec<&'a str>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (("", ""), vec![], vec![], vec![]),
            (
                ("level = \"info\"", "level = \"debug\""),
                vec![Change::LogLevel("debug".into())],
                vec![],
                vec![],
            ),
            (
                (
                    "[api]",
                    "[api]\napi_key_file = \"/etc/cobi-sync/other-key\"",
                ),
                vec![Change::KeySource],
                vec![],
                vec![],
            ),
            (
                ("[api]", "[api]\nmax_backoff = \"1m\""),
                vec![Change::Backoff],
                vec![],
                vec![],
            ),
            (
                ("[api]", "[api]\ntimeout = \"5s\""),
                vec![],
                vec!["api.timeout"],
                vec![],
            ),
            (
                ("[api]", "[api]\nconcurrency = 2\nrequests_per_minute = 60"),
                vec![],
                vec!["api.concurrency", "api.requests_per_minute"],
                vec![],
            ),
            (
                ("[log]", "[batch]\nmax_records = 10\n[log]"),
                vec![],
                vec!["batch.max_records"],
                vec![],
            ),
            (
                (
                    "[log]",
                    "[batch]\nmax_bytes = \"1MiB\"\nlinger = \"2s\"\n[log]",
                ),
                vec![],
                vec!["batch.max_bytes", "batch.linger"],
                vec![],
            ),
            (
                ("5432/shop", "5432/other"),
                vec![],
                vec![],
                vec!["source.url"],
            ),
            (
                ("name = \"trade_name\"", "name = \"label\""),
                vec![],
                vec!["mapping"],
                vec![],
            ),
            // A new mode: mappings wait for the restart with it.
            (
                ("[api]", "mode = \"poll\"\n[api]"),
                vec![],
                vec![],
                vec!["source.mode"],
            ),
            (
                ("[log]", "[http]\nlisten = \"\"\n[log]"),
                vec![],
                vec![],
                vec!["http.listen"],
            ),
            (
                ("[log]", "[source.replication]\nslot = \"other\"\n[log]"),
                vec![],
                vec![],
                vec!["source.replication"],
            ),
        ];
        for (edit, apply, rebuild, restart) in cases {
            let p = plan(&old, &settings(edit));
            assert_eq!(p.apply, apply, "{edit:?}");
            assert_eq!(p.rebuild, rebuild, "{edit:?}");
            assert_eq!(p.restart, restart, "{edit:?}");
        }
    }

    #[test]
    fn mapping_changes_under_a_new_mode_wait_for_a_restart() {
        let old = settings(("", ""));
        let new = config::load_str(
            &format!("{BASE}{BRANCHES}").replacen("[api]", "mode = \"poll\"\n[api]", 1),
            "<test>",
        )
        .unwrap();
        let p = plan(&old, &new);
        assert_eq!(p.rebuild, Vec::<&str>::new());
        assert_eq!(p.restart, vec!["source.mode", "mapping"]);
    }

    #[test]
    fn mapping_diffs_by_id() {
        let one = settings(("", ""));
        let two = with_branches();
        let renamed = settings(("name = \"trade_name\"", "name = \"label\""));
        // Same mappings in another order: no change.
        let swapped = config::load_str(
            &BASE.replacen(
                "[[mapping]]\ntype = \"shops\"",
                &format!("{}\n\n[[mapping]]\ntype = \"shops\"", BRANCHES.trim()),
                1,
            ),
            "<test>",
        )
        .unwrap();
        assert_eq!(swapped.mappings[0].id.as_ref(), "branches/public.branch");
        let ids = |v: &[MappingSettings]| v.iter().map(|m| m.id.to_string()).collect::<Vec<_>>();
        let d = diff_mappings(&one.mappings, &two.mappings);
        assert_eq!(ids(&d.added), vec!["branches/public.branch"]);
        assert!(d.removed.is_empty() && d.changed.is_empty());
        let d = diff_mappings(&two.mappings, &one.mappings);
        assert_eq!(ids(&d.removed), vec!["branches/public.branch"]);
        assert!(d.added.is_empty() && d.changed.is_empty());
        let d = diff_mappings(&one.mappings, &renamed.mappings);
        assert_eq!(ids(&d.changed), vec!["shops/public.merchant"]);
        assert!(d.added.is_empty() && d.removed.is_empty());
        assert!(diff_mappings(&two.mappings, &swapped.mappings).is_empty());
    }

    #[test]
    fn a_rebuild_takes_only_its_keys_from_the_new_file() {
        let old = settings(("", ""));
        let new = config::load_str(
            &format!("{BASE}{BRANCHES}")
                .replacen("5432/shop", "5432/other", 1)
                .replacen("[log]", "[batch]\nmax_records = 7\n[log]", 1),
            "<test>",
        )
        .unwrap();
        let p = plan(&old, &new);
        assert_eq!(p.rebuild, vec!["batch.max_records", "mapping"]);
        let next = rebuilt(&old, &new, &p.rebuild);
        assert_eq!(next.batch.max_records, 7);
        assert_eq!(next.mappings.len(), 2);
        // source.url needs a restart: the pipeline keeps the running one.
        assert_eq!(next.source.url, old.source.url);
        assert_eq!(next.batch.linger, old.batch.linger);
    }
}
