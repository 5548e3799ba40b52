//! The `source.url` libpq connection URL, parsed once.
//!
//! `postgres://user[:password]@host[:port]/dbname?sslmode=…&sslrootcert=…`.
//! The password (if the URL carries one) is kept as a [`Secret`];
//! [`PgUrl`]'s `Display` never shows it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::secret::Secret;

/// libpq `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it (no verification).
    Prefer,
    /// TLS required, certificate not verified.
    Require,
    /// TLS required, certificate chain verified.
    VerifyCa,
    /// TLS required, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    /// Whether the connection may run unencrypted or to an unverified
    /// server (`disable`, `allow`, `prefer`): anyone on the path can read
    /// or impersonate it.
    pub fn is_unprotected(self) -> bool {
        matches!(self, SslMode::Disable | SslMode::Prefer)
    }

    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A parsed PostgreSQL connection URL.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    /// Host name, IP address, or a Unix socket directory (starts with `/`).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role to connect as.
    pub user: String,
    /// Database.
    pub dbname: String,
    /// Password from the URL, if any.
    pub password: Option<Secret>,
    /// TLS mode.
    pub sslmode: SslMode,
    /// CA bundle for `verify-ca` / `verify-full` (default: the web PKI roots).
    pub sslrootcert: Option<PathBuf>,
    /// How long connecting may take; `None` waits indefinitely (libpq's
    /// `connect_timeout=0`). Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Option<Duration>,
    /// Harmless URL parameters that are ignored, as messages for the
    /// operator (logged as warnings, shown by `check`).
    pub warnings: Vec<String>,
}

/// `connect_timeout` when the URL does not set it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a libpq parameter cobi-sync does not support is refused: each would
/// change how it connects in a way it cannot honour.
fn unsupported(param: &str) -> Option<&'static str> {
    Some(match param {
        "options" => {
            "cobi-sync sets its own session options (time zone, date style, float digits) \
             that its readers rely on; set role defaults with ALTER ROLE … SET instead"
        }
        "target_session_attrs" => {
            "cobi-sync connects to the one host in the URL; point source.url at the primary"
        }
        "keepalives" | "keepalives_idle" | "keepalives_interval" | "keepalives_count" => {
            "cobi-sync always enables TCP keepalives (30 s idle)"
        }
        "sslcert" | "sslkey" | "sslpassword" => {
            "client certificates are not supported; authenticate with a password"
        }
        _ => return None,
    })
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({self})")
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.starts_with('/') {
            write!(
                f,
                "postgres://{}@/{}?host={}",
                self.user, self.dbname, self.host
            )?;
        } else if self.host.contains(':') {
            write!(
                f,
                "postgres://{}@[{}]:{}/{}",
                self.user, self.host, self.port, self.dbname
            )?;
        } else {
            write!(
                f,
                "postgres://{}@{}:{}/{}",
                self.user, self.host, self.port, self.dbname
            )?;
        }
        if self.sslmode != SslMode::Prefer {
            let sep = if self.host.starts_with('/') { '&' } else { '?' };
            write!(f, "{sep}sslmode={}", self.sslmode.as_str())?;
        }
        Ok(())
    }
}

impl PgUrl {
    /// Whether the server is on this machine: a Unix socket, `localhost`
    /// or a loopback address (where the network path needs no TLS).
    pub fn is_local(&self) -> bool {
        self.host.starts_with('/')
            || self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// Parses a libpq URL. The error says what is wrong, never echoing a
    /// password.
    pub fn parse(text: &str) -> Result<PgUrl, String> {
        // libpq allows an empty host (`postgres://user@/db?host=/run/pg`),
        // which the URL parser does not: put a placeholder in.
        let text = match text.split_once("://") {
            Some((scheme, rest)) if rest.starts_with('/') || rest.contains("@/") => {
                let rest = if rest.starts_with('/') {
                    format!("localhost{rest}")
                } else {
                    rest.replacen("@/", "@localhost/", 1)
                };
                format!("{scheme}://{rest}")
            }
            _ => text.to_string(),
        };
        let url = url::Url::parse(&text).map_err(|e| {
            format!("not a URL ({e}); write it as postgres://user@host:5432/dbname")
        })?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(format!(
                "scheme must be postgres:// or postgresql://, not {}://",
                url.scheme()
            ));
        }
        let mut host = url
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .unwrap_or_default();
        let mut port = url.port().unwrap_or(5432);
        let mut user = percent_decode(url.username());
        let mut password = url.password().map(|p| Secret::new(percent_decode(p)));
        let mut dbname = percent_decode(url.path().trim_start_matches('/'));
        let mut sslmode = SslMode::Prefer;
        let mut sslrootcert = None;
        let mut connect_timeout = Some(DEFAULT_CONNECT_TIMEOUT);
        let mut warnings = Vec::new();
        for (k, v) in url.query_pairs() {
            match &*k {
                "host" => host = v.to_string(),
                "port" => {
                    port = v
                        .parse()
                        .map_err(|_| format!("port `{v}` is not a number"))?
                }
                "user" => user = v.to_string(),
                "password" => password = Some(Secret::new(v.to_string())),
                "dbname" => dbname = v.to_string(),
                "sslmode" => {
                    if &*v == "allow" {
                        warnings.push(
                            "sslmode=allow is handled as prefer: TLS when the server offers it, \
                             the certificate not verified; use sslmode=verify-full"
                                .to_string(),
                        );
                    }
                    sslmode = SslMode::parse(&v).ok_or_else(|| {
                        format!(
                            "sslmode `{v}` is not one of disable, allow, prefer, require, \
                             verify-ca, verify-full"
                        )
                    })?
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(&*v)),
                "connect_timeout" => {
                    let secs: u64 = v.parse().map_err(|_| {
                        format!(
                            "connect_timeout `{v}` is not a whole number of seconds \
                             (0 waits indefinitely)"
                        )
                    })?;
                    // As in libpq: zero means no timeout.
                    connect_timeout = (secs > 0).then(|| Duration::from_secs(secs));
                }
                "application_name" | "fallback_application_name" => warnings.push(format!(
                    "source.url: URL parameter `{k}` is ignored: cobi-sync always connects \
                     with application_name=cobi-sync (it recognises its own connections by it)"
                )),
                other => {
                    return Err(match unsupported(other) {
                        Some(why) => {
                            format!("URL parameter `{other}` is not supported: {why}; remove it")
                        }
                        None => format!(
                            "unsupported URL parameter `{other}`; remove it (supported: host, \
                             port, user, password, dbname, sslmode, sslrootcert, \
                             connect_timeout)"
                        ),
                    })
                }
            }
        }
        if host.is_empty() {
            host = std::env::var("PGHOST").unwrap_or_else(|_| "localhost".into());
        }
        if user.is_empty() {
            user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".into());
        }
        if dbname.is_empty() {
            dbname = user.clone();
        }
        Ok(PgUrl {
            host,
            port,
            user,
            dbname,
            password,
            sslmode,
            sslrootcert,
            connect_timeout,
            warnings,
        })
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts() {
        let u = PgUrl::parse(
            "postgres://cobi_sync:s3cr%40t@db.internal:6543/shop?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(u.host, "db.internal");
        assert_eq!(u.port, 6543);
        assert_eq!(u.user, "cobi_sync");
        assert_eq!(u.dbname, "shop");
        assert_eq!(u.password.as_ref().unwrap().expose(), "s3cr@t");
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        let shown = format!("{u} {u:?}");
        assert!(!shown.contains("s3cr"), "{shown}");
        assert_eq!(
            u.to_string(),
            "postgres://cobi_sync@db.internal:6543/shop?sslmode=verify-full"
        );
    }

    #[test]
    fn socket_dirs_and_errors() {
        let u = PgUrl::parse("postgresql://app@/shop?host=/var/run/postgresql").unwrap();
        assert_eq!(u.host, "/var/run/postgresql");
        assert!(PgUrl::parse("mysql://x@y/z")
            .unwrap_err()
            .contains("scheme"));
        assert!(PgUrl::parse("postgres://x@y/z?sslmode=maybe")
            .unwrap_err()
            .contains("verify-full"));
        assert!(PgUrl::parse("db.internal:5432").is_err());
    }

    #[test]
    fn connect_timeout_zero_means_none_as_in_libpq() {
        let t = |q: &str| PgUrl::parse(&format!("postgres://x@y/z{q}")).map(|u| u.connect_timeout);
        assert_eq!(t(""), Ok(Some(DEFAULT_CONNECT_TIMEOUT)));
        assert_eq!(t("?connect_timeout=3"), Ok(Some(Duration::from_secs(3))));
        assert_eq!(t("?connect_timeout=0"), Ok(None));
        let e = t("?connect_timeout=soon").unwrap_err();
        assert!(e.contains("connect_timeout `soon`"), "{e}");
        assert!(t("?connect_timeout=-1").is_err());
    }

    #[test]
    fn unsupported_parameters_are_named_and_harmless_ones_warned() {
        for (param, why) in [
            ("options=-c%20work_mem%3D1MB", "session options"),
            ("target_session_attrs=read-write", "primary"),
            ("keepalives=0", "keepalives"),
            ("keepalives_idle=5", "keepalives"),
            ("sslcert=/etc/c.pem", "client certificates"),
            ("gssencmode=disable", "supported: host"),
        ] {
            let e = PgUrl::parse(&format!("postgres://x@y/z?{param}")).unwrap_err();
            let name = param.split('=').next().unwrap();
            assert!(e.contains(&format!("`{name}`")), "{param}: {e}");
            assert!(e.contains(why), "{param}: want `{why}` in {e}");
            assert!(e.contains("remove it"), "{param}: {e}");
        }
        let u = PgUrl::parse("postgres://x@y/z?application_name=shop-sync").unwrap();
        assert_eq!(u.warnings.len(), 1, "{:?}", u.warnings);
        assert!(
            u.warnings[0].contains("`application_name` is ignored"),
            "{:?}",
            u.warnings
        );
        assert!(PgUrl::parse("postgres://x@y/z")
            .unwrap()
            .warnings
            .is_empty());
    }
}
