//! Connecting to the partner database and reading its catalog.
//!
//! [`connect`] opens a `tokio-postgres` connection with the session
//! settings every reader relies on (UTC, ISO dates, exact floats,
//! `standard_conforming_strings`), TLS as `sslmode` says (rustls; `require`
//! encrypts without verifying, `verify-ca` checks the chain, `verify-full`
//! also the host name), and the password from `password_file`, the URL or
//! `PGPASSWORD`. [`explain`] turns connection errors into what to fix.
//! [`table_info`] reads a table's columns, primary key and replica identity.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::Client;

use crate::config::pgurl::{PgUrl, SslMode};
use crate::config::secret::{read_secret_file, Secret};
use crate::config::SourceSettings;
use crate::mapping::value::{oid, PgType};

/// Session settings pinned on every connection so text values and literals
/// round-trip exactly.
pub const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=iso_8601 \
     -c extra_float_digits=3 -c bytea_output=hex -c standard_conforming_strings=on";

/// Application name shown in `pg_stat_activity` (and used to recognise our
/// own stale walsender).
pub const APPLICATION_NAME: &str = "cobi-sync";

/// Why a connection failed, with what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    /// The explanation.
    pub message: String,
    /// Whether retrying can help (network) or an operator must act (auth).
    pub transient: bool,
}

/// The password to use: `password_file`, else the URL's, else `PGPASSWORD`.
/// (The file's permissions are checked once at start, not per connection:
/// [`crate::config::secret::secret_file_permissions`].)
pub fn password(settings: &SourceSettings) -> Result<Option<Secret>, ConnectError> {
    if let Some(path) = &settings.password_file {
        return read_secret_file(path, "the database password")
            .map(Some)
            .map_err(|e| ConnectError {
                message: format!("source.password_file: {e}"),
                transient: false,
            });
    }
    if let Some(p) = &settings.url.password {
        return Ok(Some(p.clone()));
    }
    Ok(std::env::var("PGPASSWORD").ok().map(Secret::new))
}

/// Connects, spawning the connection task.
pub async fn connect(settings: &SourceSettings) -> Result<Client, ConnectError> {
    let pw = password(settings)?;
    connect_url(&settings.url, pw.as_ref()).await
}

/// The server's own `TimeZone` setting (what writers' sessions use unless
/// they set one), read on a short connection that does not pin UTC.
pub async fn server_timezone(settings: &SourceSettings) -> Result<String, ConnectError> {
    let pw = password(settings)?;
    let options = SESSION_OPTIONS.replace("-c TimeZone=UTC ", "");
    let client = connect_url_with(&settings.url, pw.as_ref(), &options).await?;
    client
        .query_one("SHOW TimeZone", &[])
        .await
        .map(|r| r.get(0))
        .map_err(|e| ConnectError {
            transient: is_transient(&e),
            message: explain(&e, &settings.url),
        })
}

/// Connects to `url` with an explicit password.
pub async fn connect_url(url: &PgUrl, password: Option<&Secret>) -> Result<Client, ConnectError> {
    connect_url_with(url, password, SESSION_OPTIONS).await
}

async fn connect_url_with(
    url: &PgUrl,
    password: Option<&Secret>,
    options: &str,
) -> Result<Client, ConnectError> {
    let mut cfg = tokio_postgres::Config::new();
    if url.host.starts_with('/') {
        cfg.host_path(&url.host);
    } else {
        cfg.host(&url.host);
    }
    cfg.port(url.port)
        .user(&url.user)
        .dbname(&url.dbname)
        .application_name(APPLICATION_NAME)
        .options(options)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    if let Some(t) = url.connect_timeout {
        cfg.connect_timeout(t);
    }
    if let Some(p) = password {
        cfg.password(p.expose());
    }
    let explain_err = |e: tokio_postgres::Error| ConnectError {
        transient: is_transient(&e),
        message: explain(&e, url),
    };
    match url.sslmode {
        SslMode::Disable => {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, conn) = cfg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(explain_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        }
        mode => {
            cfg.ssl_mode(if mode == SslMode::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(url)?);
            let (client, conn) = cfg.connect(tls).await.map_err(explain_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The rustls client configuration for `url.sslmode`.
pub fn tls_config(url: &PgUrl) -> Result<rustls::ClientConfig, ConnectError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError {
            message: format!("TLS setup failed: {e}"),
            transient: false,
        })?;
    let config = match url.sslmode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = root_store(url.sslrootcert.as_deref())?;
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| ConnectError {
                message: format!("TLS setup failed: {e}"),
                transient: false,
            })?;
            if url.sslmode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(config)
}

fn root_store(path: Option<&Path>) -> Result<rustls::RootCertStore, ConnectError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match path {
        Some(p) => {
            let certs = CertificateDer::pem_file_iter(p).map_err(|e| ConnectError {
                message: format!("sslrootcert {}: {e}", p.display()),
                transient: false,
            })?;
            for c in certs {
                let c = c.map_err(|e| ConnectError {
                    message: format!("sslrootcert {}: {e}", p.display()),
                    transient: false,
                })?;
                roots.add(c).map_err(|e| ConnectError {
                    message: format!("sslrootcert {}: {e}", p.display()),
                    transient: false,
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

/// `sslmode=require`: encrypt, accept any certificate (libpq's behaviour
/// without a root certificate).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must verify; the host name need not match.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Whether retrying can help.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let c = code.code();
            // 08: connection exception; 57P: operator intervention (shutdown,
            // admin terminate, cannot connect now); 53: insufficient resources;
            // 40: transaction rollback (serialization, deadlock).
            c.starts_with("08")
                || c.starts_with("57P")
                || c.starts_with("53")
                || c.starts_with("40")
        }
        None => true,
    }
}

/// What went wrong and how to fix it, naming the server but never the
/// password.
pub fn explain(e: &tokio_postgres::Error, url: &PgUrl) -> String {
    let server = format!("{}:{}", url.host, url.port);
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let msg = db.message();
        return match code {
            "28P01" => format!(
                "password authentication failed for user {} on {server}: set the password in \
                 source.password_file, the URL, or PGPASSWORD",
                url.user
            ),
            "28000" => format!(
                "{server} refused user {} ({msg}): the DBA must allow this user/host in \
                 pg_hba.conf (with sslmode if it requires TLS)",
                url.user
            ),
            "3D000" => format!(
                "database {} does not exist on {server}: fix source.url",
                url.dbname
            ),
            "42501" => format!("permission denied: {msg}"),
            "57P03" => format!("{server} is starting up or shutting down ({msg}); retrying"),
            "53300" => format!("{server} has too many connections ({msg}); retrying"),
            _ => format!("{server}: {msg} (SQLSTATE {code})"),
        };
    }
    let text = chain(e);
    let lower = text.to_lowercase();
    if lower.contains("refused") {
        format!("cannot connect to {server}: connection refused (is PostgreSQL running and listening there? check host and port in source.url)")
    } else if lower.contains("timed out") || lower.contains("timeout") {
        format!("cannot connect to {server}: timed out (firewall, wrong host, or server down)")
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("ssl") {
        format!(
            "TLS with {server} failed ({text}); sslmode={} — for verify-ca/verify-full point \
             sslrootcert at the CA that signed the server certificate",
            url.sslmode.as_str()
        )
    } else if lower.contains("failed to lookup") || lower.contains("name or service not known") {
        format!("cannot resolve host {}: fix source.url", url.host)
    } else {
        format!("{server}: {text}")
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.contains(&t) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// A column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMeta {
    /// Name.
    pub name: String,
    /// Type (domains resolved to their base type).
    pub ty: PgType,
    /// `NOT NULL`.
    pub not_null: bool,
}

/// What the catalog says about a mapped table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `pg_class.oid`.
    pub oid: u32,
    /// `r` table, `p` partitioned table, `v` view, `m` matview, `f` foreign.
    pub relkind: char,
    /// Is it a partition of another table?
    pub is_partition: bool,
    /// Columns in attribute order.
    pub columns: Vec<ColumnMeta>,
    /// Primary key columns (empty if none).
    pub primary_key: Vec<String>,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    /// Columns sent in the old-key tuple of a DELETE (the primary key for
    /// `d`, the index columns for `i`, every column for `f`).
    pub identity_columns: Vec<String>,
}

impl TableInfo {
    /// A column by name.
    pub fn column(&self, name: &str) -> Option<&ColumnMeta> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// Reads a table's catalog entry; `None` if it does not exist or the role
/// cannot see it.
pub async fn table_info(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<TableInfo>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.oid, c.relkind::text, c.relreplident::text, c.relispartition \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let rel_oid: u32 = row.get(0);
    let relkind: String = row.get(1);
    let replident: String = row.get(2);
    let is_partition: bool = row.get(3);
    let cols = client
        .query(
            "SELECT a.attname::text, \
                    COALESCE(NULLIF(t.typbasetype, 0), a.atttypid) AS base, \
                    format_type(COALESCE(NULLIF(t.typbasetype, 0), a.atttypid), a.atttypmod), \
                    a.attnotnull, \
                    bt.typelem, bt.typcategory::text \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type bt ON bt.oid = COALESCE(NULLIF(t.typbasetype, 0), a.atttypid) \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&rel_oid],
        )
        .await?;
    let columns = cols
        .iter()
        .map(|r| {
            let base: u32 = r.get(1);
            let elem: u32 = r.get(4);
            let category: String = r.get(5);
            ColumnMeta {
                name: r.get(0),
                ty: PgType {
                    oid: base,
                    name: r.get(2),
                    elem: (category == "A" && elem != 0).then_some(elem),
                },
                not_null: r.get(3),
            }
        })
        .collect::<Vec<_>>();
    let key_query = |flag: &str| {
        format!(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND i.{flag} \
             ORDER BY array_position(i.indkey::int2[], a.attnum)"
        )
    };
    let pk: Vec<String> = client
        .query(&key_query("indisprimary"), &[&rel_oid])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let replica_identity = replident.chars().next().unwrap_or('d');
    let identity_columns = match replica_identity {
        'f' => columns.iter().map(|c| c.name.clone()).collect(),
        'i' => client
            .query(&key_query("indisreplident"), &[&rel_oid])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
        'd' => pk.clone(),
        _ => Vec::new(),
    };
    Ok(Some(TableInfo {
        schema: schema.to_string(),
        name: name.to_string(),
        oid: rel_oid,
        relkind: relkind.chars().next().unwrap_or('r'),
        is_partition,
        columns,
        primary_key: pk,
        replica_identity,
        identity_columns,
    }))
}

/// Output columns of a query (for `query = "SELECT …"` mappings).
pub async fn query_columns(
    client: &Client,
    query: &str,
) -> Result<Vec<ColumnMeta>, tokio_postgres::Error> {
    let stmt = client
        .prepare(&format!("SELECT * FROM ({query}) AS q LIMIT 0"))
        .await?;
    Ok(stmt
        .columns()
        .iter()
        .map(|c| {
            let t = c.type_();
            let elem = match t.kind() {
                tokio_postgres::types::Kind::Array(e) => Some(e.oid()),
                _ => None,
            };
            ColumnMeta {
                name: c.name().to_string(),
                ty: PgType {
                    oid: t.oid(),
                    name: t.name().to_string(),
                    elem: elem.or_else(|| oid::array_elem(t.oid())),
                },
                not_null: false,
            }
        })
        .collect())
}

/// Server version number (`server_version_num`, e.g. 150004).
pub async fn server_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?;
    Ok(row.get(0))
}

/// Quotes a string literal (with `standard_conforming_strings = on`).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
