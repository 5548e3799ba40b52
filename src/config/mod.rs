//! Configuration: TOML file + `COBI_SYNC__SECTION__KEY` environment
//! overlay → [`Settings`].
//!
//! [`load`] reads and overlays with the `config` crate, deserialises into
//! [`raw::RawConfig`] (unknown keys are errors, with their exact dotted
//! path) and hands it to [`validate`], which checks every value and
//! collects *all* problems. Each [`ConfigError`] names the key, what is
//! wrong and an example of a good value. The process exits with code 2 on
//! any of them.

pub mod pgurl;
pub mod raw;
pub mod secret;
mod settings;

/// The HTTP endpoint's default address: loopback, on a port outside
/// 9090–9999 and 10000+, which the Prometheus project's default port
/// allocations hand to exporters (postgres_exporter's 9187 runs on many
/// database hosts), and clear of other common agents' ports.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7781";

use std::fmt;
use std::path::Path;

pub use settings::*;

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/cobi-sync/cobi-sync.toml";

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key (`mapping[2].fields.region`), or the file for file-level
    /// problems.
    pub key: String,
    /// What is wrong.
    pub message: String,
    /// A good value, if one helps.
    pub example: Option<String>,
}

impl ConfigError {
    /// A problem at `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
            example: None,
        }
    }

    /// Adds an example of a good value.
    pub fn example(mut self, example: impl Into<String>) -> Self {
        self.example = Some(example.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)?;
        if let Some(e) = &self.example {
            write!(f, " (example: {e})")?;
        }
        Ok(())
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The file that was read (or `<env>` / `<string>`).
    pub origin: String,
    /// The problems, in file order.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        writeln!(
            f,
            "invalid configuration {} ({n} problem{}):",
            self.origin,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads, overlays and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Settings, ConfigErrors> {
    let origin = path.display().to_string();
    if !path.exists() {
        return Err(ConfigErrors {
            origin: origin.clone(),
            errors: vec![ConfigError::new(
                origin,
                "file not found; pass --config PATH or set COBI_SYNC_CONFIG \
                 (a documented example is config/cobi-sync.example.toml)",
            )],
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        origin: origin.clone(),
        errors: vec![ConfigError::new(
            origin.clone(),
            format!("cannot read: {e}"),
        )],
    })?;
    let mut settings = load_str(&text, &origin)?;
    settings.api.key.installed = Some(secret::installed_key_path(path));
    Ok(settings)
}

/// Loads configuration text (TOML) with the environment overlay.
pub fn load_str(text: &str, origin: &str) -> Result<Settings, ConfigErrors> {
    let fail = |errors: Vec<ConfigError>| ConfigErrors {
        origin: origin.to_string(),
        errors,
    };
    // Syntax first, with the line and column of the problem.
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        return Err(fail(vec![ConfigError::new(
            origin,
            syntax_message(&toml_error_message(&e, text)),
        )]));
    }
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("COBI_SYNC")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        )
        .build()
        .map_err(|e| {
            fail(vec![ConfigError::new(
                origin,
                syntax_message(&e.to_string()),
            )])
        })?;
    let raw: raw::RawConfig = serde_path_to_error::deserialize(built).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        fail(vec![serde_error(&path, &inner)])
    })?;
    validate(&raw).map_err(fail)
}

/// Rewrites a serde error at `path` into a [`ConfigError`].
fn serde_error(path: &str, message: &str) -> ConfigError {
    // The config crate appends " for key `…`"; the path already says it.
    let message = match message.find(" for key `") {
        Some(i) => &message[..i],
        None => message,
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        // serde_path_to_error's path already ends with the unknown key.
        let key = if path == "." || path.is_empty() {
            field.to_string()
        } else if path == field || path.ends_with(&format!(".{field}")) {
            path.to_string()
        } else {
            format!("{path}.{field}")
        };
        let expected = expected
            .trim_start_matches(", expected ")
            .replace("one of ", "")
            .replace('`', "");
        return ConfigError::new(
            key,
            format!("unknown key; the keys allowed here are: {expected}"),
        );
    }
    let key = if path == "." { "<root>" } else { path };
    ConfigError::new(key, message.replace("invalid type: ", "wrong type: "))
}

/// The toml error's own message and where it is (`line 3, column 7`),
/// without the source snippet its `Display` adds: that line can hold a
/// secret (a password in `source.url`).
fn toml_error_message(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn syntax_message(message: &str) -> String {
    format!("cannot parse the file as TOML: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[source]
url = "postgres://cobi_sync@db.internal:5432/shop"
[api]
base_url = "https://api.hellocobi.com"
[[mapping]]
type = "shops"
table = "public.merchant"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
"#;

    fn errors(text: &str) -> Vec<String> {
        match load_str(text, "test.toml") {
            Ok(_) => vec![],
            Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn minimal_config_is_valid() {
        let s = load_str(MINIMAL, "test.toml").unwrap();
        assert_eq!(s.mappings.len(), 1);
        assert_eq!(s.batch.max_records, 5000);
        assert_eq!(s.api.concurrency, 4);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let e = errors(&MINIMAL.replace("[api]", "[api]\ncolour = 1"));
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("api.colour: unknown key"), "{e:?}");
        assert!(e[0].contains("base_url"), "{e:?}");
        let e = errors(&MINIMAL.replace(
            "table = \"public.merchant\"",
            "table = \"public.merchant\"\nbogus = 1",
        ));
        assert!(e[0].starts_with("mapping[0].bogus: unknown key"), "{e:?}");
        let e = errors(&format!("surprise = 1\n{MINIMAL}"));
        assert!(e[0].starts_with("surprise: unknown key"), "{e:?}");
    }

    #[test]
    fn wrong_types_are_named_with_their_path() {
        let e = errors(&MINIMAL.replace("[api]", "[api]\nconcurrency = \"many\""));
        assert!(e[0].starts_with("api.concurrency: wrong type"), "{e:?}");
    }

    #[test]
    fn the_example_documents_every_key_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cobi-sync.example.toml");
        let settings = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.mappings.len(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        // Every key the file format has (defaults serialised), plus the
        // optional ones, appears as `key =` or `# key =`.
        let defaults = toml::to_string(&raw::RawConfig::default()).unwrap();
        let mut keys: Vec<String> = defaults
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim().to_string()))
            .filter(|k| k != "mapping")
            .collect();
        keys.extend(
            [
                "password_file",
                "api_key_file",
                "type",
                "table",
                "query",
                "key",
                "cursor",
                "on_delete",
                "on_truncate",
                "reconcile",
            ]
            .map(String::from),
        );
        for k in keys {
            let documented = text.lines().any(|l| {
                let l = l.trim_start_matches('#').trim();
                l.starts_with(&format!("{k} =")) || l.starts_with(&format!("{k}  "))
            });
            assert!(
                documented,
                "config/cobi-sync.example.toml does not document `{k}`"
            );
        }
        // And its stated defaults are the real defaults.
        let d = raw::RawConfig::default();
        for (k, v) in [
            ("mode", format!("{:?}", d.source.mode)),
            ("slot", format!("{:?}", d.source.replication.slot)),
            (
                "max_slot_lag",
                format!("{:?}", d.source.replication.max_slot_lag),
            ),
            ("schedule", format!("{:?}", d.source.poll.schedule)),
            ("lookback", format!("{:?}", d.source.poll.lookback)),
            ("page_size", d.source.poll.page_size.to_string()),
            ("timeout", format!("{:?}", d.api.timeout)),
            ("concurrency", d.api.concurrency.to_string()),
            ("initial_backoff", format!("{:?}", d.api.initial_backoff)),
            ("max_backoff", format!("{:?}", d.api.max_backoff)),
            ("max_records", d.batch.max_records.to_string()),
            ("max_bytes", format!("{:?}", d.batch.max_bytes)),
            ("linger", format!("{:?}", d.batch.linger)),
            ("listen", format!("{:?}", d.http.listen)),
            ("namespace", format!("{:?}", d.ids.namespace)),
        ] {
            let line = format!("{k} = {v}");
            assert!(
                text.lines().any(|l| l.trim().starts_with(&line)),
                "example should say `{line}`"
            );
        }
    }

    #[test]
    fn toml_syntax_errors_are_reported() {
        let e = errors("[source\nurl = 1");
        assert!(e[0].contains("cannot parse the file as TOML"), "{e:?}");
        assert!(e[0].contains("line 1, column"), "{e:?}");
    }

    #[test]
    fn toml_syntax_errors_never_quote_the_line() {
        // A missing closing quote on the line that holds the password.
        let text = MINIMAL.replace(
            "url = \"postgres://cobi_sync@db.internal:5432/shop\"",
            "url = \"postgres://cobi_sync:hunter2-s3cret@db.internal:5432/shop",
        );
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("cannot parse the file as TOML"), "{e:?}");
        assert!(!e[0].contains("hunter2"), "the password leaked: {e:?}");
        // Where the problem is, so the operator can still find it: the
        // url is on line 3 of MINIMAL.
        assert!(e[0].contains("(line 3, column "), "{e:?}");
    }

    #[test]
    fn line_column_counts_from_one_in_characters() {
        let text = "a = 1\nbé = \"x\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (1, 5));
        assert_eq!(line_column(text, 6), (2, 1));
        // After the two-byte `é`: column 3, not 4.
        assert_eq!(line_column(text, 9), (2, 3));
        // Inside `é` and past the end are clamped, not a panic.
        assert_eq!(line_column(text, 8), (2, 2));
        assert_eq!(line_column(text, 1000), (3, 1));
    }
}
