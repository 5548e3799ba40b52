//! Log setup: `tracing` to stderr, JSON or text, filtered by `log.level`
//! (overridden by `RUST_LOG`); the level can be changed while running
//! ([`set_level`], on SIGHUP).
//!
//! Under systemd (`JOURNAL_STREAM` names this process's stderr) every line
//! starts with its syslog priority (`<3>` error, `<4>` warn, `<6>` info,
//! `<7>` debug and trace), so `journalctl -p err` finds every ERROR. Text
//! logs carry ANSI colours only when stderr is a terminal (and `NO_COLOR`
//! is unset): a file or the journal gets plain text.
//!
//! What is logged where: record contents and source keys only at `trace`;
//! counts, types, mapping labels and errors at `info`/`warn`/`error`;
//! secrets never (they are [`crate::config::secret::Secret`]s, which print
//! as `***`).

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LogSettings};

/// The handle that swaps the level filter of the installed subscriber.
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The filter for `level`: the replication crate logs its own connection
/// errors at ERROR; the daemon reports them itself (with what to do), so
/// they are silenced unless asked for by name.
fn filter_for(level: &str) -> Result<EnvFilter, String> {
    let directive = if level.contains("pgwire_replication") {
        level.to_string()
    } else {
        format!("{level},pgwire_replication=off")
    };
    EnvFilter::try_new(&directive).map_err(|e| format!("log.level `{level}`: {e}"))
}

/// The syslog priority prefix journald reads for a level (sd-daemon(3)).
pub fn priority_prefix(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"<3>",
        Level::WARN => b"<4>",
        Level::INFO => b"<6>",
        Level::DEBUG | Level::TRACE => b"<7>",
    }
}

/// Whether `journal_stream` (`JOURNAL_STREAM`, `<dev>:<inode>`) names the
/// file `stderr` is connected to: only then is stderr the journal (a child
/// whose stderr was redirected inherits the variable but not the stream).
pub fn is_journal_stream(journal_stream: &str, stderr: (u64, u64)) -> bool {
    let Some((dev, ino)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    matches!((dev.parse::<u64>(), ino.parse::<u64>()), (Ok(d), Ok(i)) if (d, i) == stderr)
}

/// The device and inode of stderr, if it can be inspected.
fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let fd = std::os::fd::AsFd::as_fd(&std::io::stderr())
        .try_clone_to_owned()
        .ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Whether stderr is connected to the journal.
fn stderr_is_journal() -> bool {
    match (std::env::var("JOURNAL_STREAM"), stderr_identity()) {
        (Ok(js), Some(id)) => is_journal_stream(&js, id),
        _ => false,
    }
}

/// Stderr, with the journald priority prefix on each event when `journal`.
#[derive(Clone, Copy)]
struct Stderr {
    journal: bool,
}

/// One event's writer: the prefix goes before its first byte.
struct EventWriter {
    prefix: Option<&'static [u8]>,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if let Some(p) = self.prefix.take() {
            err.write_all(p)?;
        }
        err.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = EventWriter;
    fn make_writer(&'a self) -> EventWriter {
        EventWriter { prefix: None }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> EventWriter {
        EventWriter {
            prefix: self.journal.then(|| priority_prefix(meta.level())),
        }
    }
}

/// Installs the global subscriber. Safe to call once; later calls are
/// ignored.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| filter_for(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let journal = stderr_is_journal();
    let writer = Stderr { journal };
    let ansi =
        !journal && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let fmt = match settings.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_target(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_target(false)
            .with_writer(writer)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Applies a new `log.level` to the running subscriber (SIGHUP). `RUST_LOG`,
/// when set, keeps precedence: the change is refused with the reason.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Err("RUST_LOG is set and overrides log.level; unset it to change the level".into());
    }
    let filter = filter_for(level)?;
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging is not initialised".to_string())?;
    handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log level: {e}"))
}

/// Logging for commands that run before (or without) a configuration.
pub fn init_default() {
    init(&LogSettings {
        format: LogFormat::Text,
        level: "info".into(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journald_priorities() {
        let cases = [
            (Level::ERROR, "<3>"),
            (Level::WARN, "<4>"),
            (Level::INFO, "<6>"),
            (Level::DEBUG, "<7>"),
            (Level::TRACE, "<7>"),
        ];
        for (level, want) in cases {
            assert_eq!(priority_prefix(&level), want.as_bytes(), "{level}");
        }
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        let cases = [
            ("8:1234", (8, 1234), true),
            (" 8:1234\n", (8, 1234), true),
            ("8:1234", (8, 1235), false),
            ("8:1234", (9, 1234), false),
            ("", (8, 1234), false),
            ("garbage", (8, 1234), false),
            ("8:x", (8, 1234), false),
        ];
        for (js, id, want) in cases {
            assert_eq!(is_journal_stream(js, id), want, "{js:?} vs {id:?}");
        }
    }
}
