//! What replication does with a failure: retry with growing backoff
//! (connection lost, server shutting down, out of resources, a
//! serialization conflict) or stop with a message saying what to do
//! (missing privilege, a table or column that no longer exists, a query
//! cancelled by `statement_timeout`, a data error). Database errors are
//! classified by SQLSTATE ([`class_of`]), never by message text.

use crate::config::pgurl::PgUrl;
use crate::source::{pg, SourceError};

/// Why a replication session ended early.
#[derive(Debug)]
pub enum SessionError {
    /// Reconnect with backoff and resume from the durable position.
    Transient(String),
    /// Stop the daemon (exit 1) with this message.
    Fatal(SourceError),
    /// The slot was dropped, invalidated, or is ahead of the state
    /// directory: changes were missed (`on_slot_lost` decides).
    SlotLost(String),
}

impl From<SourceError> for SessionError {
    fn from(e: SourceError) -> Self {
        SessionError::Fatal(e)
    }
}

impl SessionError {
    /// A fatal error with a message.
    pub fn fatal(msg: impl Into<String>) -> SessionError {
        SessionError::Fatal(SourceError::Fatal(msg.into()))
    }
}

/// What retrying can do for a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retrying later can succeed.
    Retry,
    /// A privilege is missing: an operator must grant it.
    Privilege,
    /// A table, column, function or schema does not exist (the schema
    /// changed, or the role cannot see it).
    Undefined,
    /// The query was cancelled (`statement_timeout`, an administrator).
    Cancelled,
    /// Anything else retrying cannot fix (data errors, internal errors).
    Fatal,
}

/// Classifies a SQLSTATE (`None`: the connection failed without one).
pub fn class_of(sqlstate: Option<&str>) -> ErrorClass {
    let Some(code) = sqlstate else {
        return ErrorClass::Retry;
    };
    match code {
        "42501" => ErrorClass::Privilege,
        "42P01" | "42703" | "42883" | "42704" | "3F000" | "3D000" => ErrorClass::Undefined,
        "57014" => ErrorClass::Cancelled,
        // Lock timeout, an aborted transaction block: try again.
        "55P03" | "25P02" => ErrorClass::Retry,
        c if c.starts_with("08")        // connection exception
            || c.starts_with("57P")     // admin/crash shutdown, cannot connect now
            || c.starts_with("53")      // insufficient resources
            || c.starts_with("40")      // serialization failure, deadlock
            || c.starts_with("58") =>
        // system error (I/O)
        {
            ErrorClass::Retry
        }
        _ => ErrorClass::Fatal,
    }
}

/// A database error while `what`, classified and explained.
pub fn db_error(e: &tokio_postgres::Error, url: &PgUrl, what: &str) -> SessionError {
    let code = e.code().map(|c| c.code());
    let msg = pg::explain(e, url);
    match class_of(code) {
        ErrorClass::Retry => SessionError::Transient(format!("{what}: {msg}")),
        ErrorClass::Privilege => SessionError::fatal(format!(
            "{what}: {msg}. Grant the role what it needs (README, \"The database role\"): \
             GRANT USAGE ON SCHEMA <schema> TO {user}; GRANT SELECT ON <table> TO {user}; \
             then start cobi-sync again",
            user = url.user
        )),
        ErrorClass::Undefined => SessionError::fatal(format!(
            "{what}: {msg}. The database no longer matches the configuration (a table or \
             column was dropped or renamed?): fix the mapping or the table, run `cobi-sync \
             check`, then start cobi-sync again"
        )),
        ErrorClass::Cancelled => SessionError::fatal(format!(
            "{what}: {msg}. A query of cobi-sync was cancelled, most likely by \
             statement_timeout: exempt the role with ALTER ROLE {} SET statement_timeout = 0; \
             then start cobi-sync again",
            url.user
        )),
        ErrorClass::Fatal if matches!(code, Some("22021" | "22P05")) => {
            SessionError::fatal(format!(
                "{what}: {msg}. The table holds text that is not valid in the encoding cobi-sync \
             reads (UTF-8) — typically a SQL_ASCII database holding latin-1 bytes: correct the \
             rows (SELECT the ones whose text does not convert), then start cobi-sync again"
            ))
        }
        ErrorClass::Fatal => SessionError::fatal(format!("{what}: {msg}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        let cases = [
            (None, ErrorClass::Retry),
            (Some("08006"), ErrorClass::Retry),
            (Some("08P01"), ErrorClass::Retry),
            (Some("57P01"), ErrorClass::Retry),
            (Some("57P03"), ErrorClass::Retry),
            (Some("53300"), ErrorClass::Retry),
            (Some("40001"), ErrorClass::Retry),
            (Some("40P01"), ErrorClass::Retry),
            (Some("55P03"), ErrorClass::Retry),
            (Some("58030"), ErrorClass::Retry),
            (Some("42501"), ErrorClass::Privilege),
            (Some("42703"), ErrorClass::Undefined),
            (Some("42P01"), ErrorClass::Undefined),
            (Some("42883"), ErrorClass::Undefined),
            (Some("3F000"), ErrorClass::Undefined),
            (Some("57014"), ErrorClass::Cancelled),
            (Some("22P02"), ErrorClass::Fatal),
            (Some("22003"), ErrorClass::Fatal),
            (Some("XX000"), ErrorClass::Fatal),
            (Some("0A000"), ErrorClass::Fatal),
        ];
        for (code, class) in cases {
            assert_eq!(class_of(code), class, "{code:?}");
        }
    }
}
