//! Log setup: `tracing` to stderr, JSON or text, filtered by `log.level`
//! (overridden by `RUST_LOG`).
//!
//! What is logged where: record contents and source keys only at `trace`;
//! counts, types, mapping labels and errors at `info`/`warn`/`error`;
//! secrets never (they are [`crate::config::secret::Secret`]s, which print
//! as `***`).

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Safe to call once; later calls are
/// ignored.
pub fn init(settings: &LogSettings) {
    // The replication crate logs its own connection errors at ERROR; the
    // daemon reports them itself (with what to do), so they are silenced
    // unless asked for by name.
    let directive = if settings.level.contains("pgwire_replication") {
        settings.level.clone()
    } else {
        format!("{},pgwire_replication=off", settings.level)
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&directive))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Logging for commands that run before (or without) a configuration.
pub fn init_default() {
    init(&LogSettings {
        format: LogFormat::Text,
        level: "info".into(),
    });
}
