//! The replication connection, behind [`ReplicationStream`] so the
//! transport crate (`pgwire-replication` 0.5, pinned) can be swapped.
//!
//! The stream yields transaction boundaries, raw pgoutput messages (decoded
//! by [`super::pgoutput`]), logical messages and keepalives, and accepts
//! confirmations of durable positions.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{
    Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode as WireSsl, TlsConfig,
};

use crate::config::pgurl::SslMode;
use crate::config::SourceSettings;
use crate::source::pg;

/// One thing from the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// A transaction starts.
    Begin {
        /// Its top-level transaction id.
        xid: u32,
        /// LSN of its commit record.
        final_lsn: u64,
    },
    /// A pgoutput message inside a transaction (Relation, Insert, …).
    Data(Bytes),
    /// The transaction ended; `end_lsn` is where the next one starts.
    Commit {
        /// End of the commit record.
        end_lsn: u64,
    },
    /// `pg_logical_emit_message()` output.
    Message {
        /// Emitted inside a transaction?
        transactional: bool,
        /// Its LSN.
        lsn: u64,
        /// Prefix.
        prefix: String,
        /// Content.
        content: Bytes,
    },
    /// The server is alive and has sent everything up to `wal_end`.
    KeepAlive {
        /// Server position.
        wal_end: u64,
    },
}

/// A failure of the replication connection.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StreamError {
    /// What happened.
    pub message: String,
    /// The server said the slot is in use by another process.
    pub slot_in_use: bool,
    /// Retrying cannot help (TLS configuration, authentication): an
    /// operator must fix something.
    pub fatal: bool,
}

/// A logical replication stream.
pub trait ReplicationStream: Send {
    /// Next event; `None` when the stream ended.
    fn recv(&mut self) -> impl Future<Output = Result<Option<StreamEvent>, StreamError>> + Send;
    /// Everything up to `lsn` is durable: the server may release it.
    fn confirm(&self, lsn: u64);
    /// Closes the connection.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// The `pgwire-replication` implementation.
pub struct PgwireStream {
    client: ReplicationClient,
}

fn wire_error(e: pgwire_replication::PgWireError) -> StreamError {
    let message = e.to_string();
    let fatal =
        e.is_auth() || message.contains("TLS config error") || message.contains("pg_hba.conf");
    let hint = if message.contains("is an IP address") {
        " (sslmode=verify-full checks the host name: put the name the server's certificate \
         was issued for in source.url, or use sslmode=verify-ca)"
    } else if message.contains("pg_hba.conf") {
        " (the server must allow replication connections for this role: a `replication` \
         line in pg_hba.conf)"
    } else {
        ""
    };
    StreamError {
        slot_in_use: message.contains("is active for PID") || message.contains("55006"),
        fatal,
        message: format!("replication connection: {message}{hint}"),
    }
}

/// Opens a stream on `slot`/`publication` starting at `start` (0: the
/// slot's confirmed position), reporting `ack` as durable until confirmed.
pub async fn open(
    settings: &SourceSettings,
    start: u64,
    ack: u64,
) -> Result<PgwireStream, StreamError> {
    let url = &settings.url;
    let password = pg::password(settings)
        .map_err(|e| StreamError {
            message: e.message,
            slot_in_use: false,
            fatal: true,
        })?
        .map(|s| s.expose().to_string())
        .unwrap_or_default();
    let tls = match url.sslmode {
        SslMode::Disable => TlsConfig::disabled(),
        SslMode::Prefer => TlsConfig {
            mode: WireSsl::Prefer,
            ..TlsConfig::default()
        },
        SslMode::Require => TlsConfig::require(),
        SslMode::VerifyCa => TlsConfig::verify_ca(url.sslrootcert.clone()),
        SslMode::VerifyFull => TlsConfig::verify_full(url.sslrootcert.clone()),
    };
    let cfg = ReplicationConfig::new(
        url.host.clone(),
        url.user.clone(),
        password,
        url.dbname.clone(),
        settings.replication.slot.clone(),
        settings.replication.publication.clone(),
    )
    .with_port(url.port)
    .with_tls(tls)
    .with_start_lsn(Lsn::from_u64(start))
    .with_ack_lsn(Lsn::from_u64(ack))
    .with_status_interval(Duration::from_millis(500))
    .with_wakeup_interval(Duration::from_secs(5))
    .with_buffer_size(4096)
    .with_application_name(pg::APPLICATION_NAME)
    .with_options("-c DateStyle=ISO,YMD -c TimeZone=UTC -c IntervalStyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex");
    let mut client = ReplicationClient::connect(cfg).await.map_err(wire_error)?;
    client.wait_started().await.map_err(wire_error)?;
    Ok(PgwireStream { client })
}

impl ReplicationStream for PgwireStream {
    async fn recv(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        let ev = self.client.recv().await.map_err(wire_error)?;
        Ok(ev.and_then(|e| match e {
            ReplicationEvent::KeepAlive { wal_end, .. } => Some(StreamEvent::KeepAlive {
                wal_end: wal_end.as_u64(),
            }),
            ReplicationEvent::Begin { final_lsn, xid, .. } => Some(StreamEvent::Begin {
                xid,
                final_lsn: final_lsn.as_u64(),
            }),
            ReplicationEvent::XLogData { data, .. } => Some(StreamEvent::Data(data)),
            ReplicationEvent::Commit { end_lsn, .. } => Some(StreamEvent::Commit {
                end_lsn: end_lsn.as_u64(),
            }),
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => Some(StreamEvent::Message {
                transactional,
                lsn: lsn.as_u64(),
                prefix,
                content,
            }),
            ReplicationEvent::StoppedAt { .. } => None,
            #[allow(unreachable_patterns)]
            _ => Some(StreamEvent::KeepAlive { wal_end: 0 }),
        }))
    }

    fn confirm(&self, lsn: u64) {
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
    }

    async fn close(mut self) {
        let _ = self.client.shutdown().await;
    }
}
