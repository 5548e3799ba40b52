//! Secrets (the API key, the database password) and where they are read from.
//!
//! A [`Secret`] prints as `***` in `Debug` and `Display`, so a secret can
//! sit inside any settings struct that gets logged. Key files are re-read by
//! path on every load, so a file replaced by rename is picked up.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where the API key comes from, in order of precedence
/// (DESIGN.md §6): `api_key_file`, the systemd credential `cobi-api-key`,
/// the environment variable named by `api_key_env`, and last the
/// installed key file `api-key` beside the configuration file
/// (`/etc/cobi-sync/api-key` for the packaged configuration, where the
/// README puts it) — so `check`, `snapshot` and `dlq replay` run from a
/// shell find the same key the unit hands over as a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    /// `api.api_key_file`.
    pub file: Option<PathBuf>,
    /// `api.api_key_env`.
    pub env: String,
    /// `api-key` beside the configuration file, when it was loaded from
    /// one (see [`installed_key_path`]).
    pub installed: Option<PathBuf>,
}

/// The installed key file for a configuration file: `api-key` in the same
/// directory (`/etc/cobi-sync/cobi-sync.toml` → `/etc/cobi-sync/api-key`).
pub fn installed_key_path(config: &Path) -> PathBuf {
    config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("api-key")
}

/// Which place [`KeySource::load`] reads, decided from what exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOrigin {
    /// `api.api_key_file`.
    File(PathBuf),
    /// The systemd credential.
    Credential(PathBuf),
    /// The environment variable (it is set).
    Env(String),
    /// The installed key file beside the configuration.
    Installed(PathBuf),
}

/// The precedence rule, pure: the configured file; else the credential when
/// the credential directory holds it; else the variable when it is set;
/// else the installed file when it exists.
pub fn key_origin(
    file: Option<&Path>,
    credential: Option<&Path>,
    env: (&str, bool),
    installed: Option<&Path>,
) -> Option<KeyOrigin> {
    if let Some(f) = file {
        return Some(KeyOrigin::File(f.to_path_buf()));
    }
    if let Some(c) = credential {
        return Some(KeyOrigin::Credential(c.to_path_buf()));
    }
    if env.1 {
        return Some(KeyOrigin::Env(env.0.to_string()));
    }
    installed.map(|p| KeyOrigin::Installed(p.to_path_buf()))
}

/// The systemd credential name of the API key.
pub const CREDENTIAL_NAME: &str = "cobi-api-key";

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read {what} from {path}: {error}")]
    File {
        /// What the file holds.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file or variable is empty.
    #[error("{what} from {source_desc} is empty")]
    Empty {
        /// What was expected.
        what: &'static str,
        /// Where it was looked for.
        source_desc: String,
    },
    /// Nothing provides the API key.
    #[error(
        "no API key found (looked for api.api_key_file, the systemd credential `cobi-api-key`, \
         the environment variable {env}{installed}): put the key in {target} \
         (sudo install -m 600 /dev/stdin {target} <<< 'your-api-key'), \
         or set api.api_key_file, or export {env}"
    )]
    NoKey {
        /// The variable that was tried.
        env: String,
        /// `, and <path>` when an installed key file was looked for.
        installed: String,
        /// Where to put the key.
        target: String,
    },
}

impl KeySource {
    /// Which place the key is read from now, if any provides one.
    pub fn origin(&self) -> Option<KeyOrigin> {
        let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|dir| Path::new(&dir).join(CREDENTIAL_NAME))
            .filter(|p| p.exists());
        let installed = self.installed.as_deref().filter(|p| p.exists());
        key_origin(
            self.file.as_deref(),
            credential.as_deref(),
            (&self.env, std::env::var_os(&self.env).is_some()),
            installed,
        )
    }

    /// Reads the key now. Whitespace around it is trimmed.
    pub fn load(&self) -> Result<Secret, SecretError> {
        match self.origin() {
            Some(KeyOrigin::File(p) | KeyOrigin::Credential(p)) => {
                read_secret_file(&p, "the API key")
            }
            Some(KeyOrigin::Installed(p)) => {
                read_secret_file(&p, "the API key").map_err(|e| match e {
                    SecretError::File { error, .. }
                        if error.kind() == std::io::ErrorKind::PermissionDenied =>
                    {
                        SecretError::File {
                            what: "the API key (it is root's: run this as root, sudo cobi-sync …)",
                            path: p.clone(),
                            error,
                        }
                    }
                    e => e,
                })
            }
            Some(KeyOrigin::Env(var)) => match std::env::var(&var) {
                Ok(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim())),
                _ => Err(SecretError::Empty {
                    what: "the API key",
                    source_desc: format!("environment variable {var}"),
                }),
            },
            None => Err(SecretError::NoKey {
                env: self.env.clone(),
                installed: self
                    .installed
                    .as_ref()
                    .map(|p| format!(", and {}", p.display()))
                    .unwrap_or_default(),
                target: self
                    .installed
                    .as_ref()
                    .map_or("/etc/cobi-sync/api-key".into(), |p| p.display().to_string()),
            }),
        }
    }

    /// How a new key reaches the running daemon from where it reads it: a
    /// systemd credential is a copy made at start (`LoadCredential=`), so
    /// it needs a restart; files and the environment are re-read.
    pub fn rotation_hint(&self) -> &'static str {
        match self.origin() {
            Some(KeyOrigin::Credential(_)) => {
                "replace /etc/cobi-sync/api-key, then `systemctl restart cobi-sync` (systemd \
                 copies the credential at start; the restart loses nothing)"
            }
            Some(KeyOrigin::Env(_)) => "set the variable and restart cobi-sync",
            _ => "replace the key file; it is re-read every second",
        }
    }

    /// Where the key is read from, for messages (never the key).
    pub fn describe(&self) -> String {
        match self.origin() {
            Some(KeyOrigin::File(p)) => format!("file {}", p.display()),
            Some(KeyOrigin::Credential(_)) => format!("systemd credential {CREDENTIAL_NAME}"),
            Some(KeyOrigin::Env(v)) => format!("environment variable {v}"),
            Some(KeyOrigin::Installed(p)) => format!("file {}", p.display()),
            None => format!(
                "no key: environment variable {} unset{}",
                self.env,
                self.installed
                    .as_ref()
                    .map(|p| format!(", no {}", p.display()))
                    .unwrap_or_default()
            ),
        }
    }
}

/// Reads a secret file, trimming surrounding whitespace.
pub fn read_secret_file(path: &Path, what: &'static str) -> Result<Secret, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|error| SecretError::File {
        what,
        path: path.to_path_buf(),
        error,
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SecretError::Empty {
            what,
            source_desc: format!("file {}", path.display()),
        });
    }
    Ok(Secret::new(trimmed))
}

/// A warning when a secret file can be read by group or others, naming the
/// file and the fix; `None` when it is private (or cannot be inspected).
pub fn permission_warning(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        Some(format!(
            "secret file {} is readable by other users (mode {:o}); fix: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        ))
    } else {
        None
    }
}

/// Whether `path` holds at least one PEM certificate (`api.ca_file`); the
/// error says what is wrong.
pub fn check_ca_file(path: &Path) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let pem = String::from_utf8_lossy(&text);
    if pem.contains("-----BEGIN CERTIFICATE-----") {
        Ok(())
    } else {
        Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ))
    }
}

/// How readable each secret file the settings name is (the API key file,
/// the database password file): every such file that exists, with a
/// [`permission_warning`] when group or others can read it. The one place
/// that decides which files hold secrets: `run` and `snapshot` warn at
/// start, `check` reports each.
pub fn secret_file_permissions(settings: &super::Settings) -> Vec<(&Path, Option<String>)> {
    [
        settings.api.key.file.as_deref(),
        settings.api.key.installed.as_deref(),
        settings.source.password_file.as_deref(),
    ]
    .into_iter()
    .flatten()
    .filter(|path| path.exists())
    .map(|path| (path, permission_warning(path)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn key_file_is_trimmed_reread_and_permissions_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-key");
        std::fs::write(&path, "  first-key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let src = KeySource {
            file: Some(path.clone()),
            env: "COBI_TEST_UNUSED".into(),
            installed: None,
        };
        assert_eq!(src.load().unwrap().expose(), "first-key");
        assert_eq!(permission_warning(&path), None);
        // Replaced by rename: the new content is read.
        let tmp = dir.path().join("api-key.new");
        std::fs::write(&tmp, "second-key").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(src.load().unwrap().expose(), "second-key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = permission_warning(&path).unwrap();
        assert!(w.contains("chmod 600") && w.contains("api-key"), "{w}");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(src.load(), Err(SecretError::Empty { .. })));
    }

    #[test]
    fn missing_env_key_explains_all_sources() {
        let src = KeySource {
            file: None,
            env: "COBI_TEST_SURELY_UNSET_VAR".into(),
            installed: Some("/nonexistent/cobi-sync/api-key".into()),
        };
        let err = src.load().unwrap_err().to_string();
        assert!(err.contains("api_key_file") && err.contains("COBI_TEST_SURELY_UNSET_VAR"));
        assert!(
            err.contains("put the key in /nonexistent/cobi-sync/api-key"),
            "{err}"
        );
    }

    #[test]
    fn key_origin_precedence() {
        let f = Path::new("/etc/key-file");
        let c = Path::new("/run/credentials/cobi-sync.service/cobi-api-key");
        let i = Path::new("/etc/cobi-sync/api-key");
        use KeyOrigin::*;
        type Case<'a> = (
            Option<&'a Path>,
            Option<&'a Path>,
            bool,
            Option<&'a Path>,
            Option<KeyOrigin>,
        );
        let cases: &[Case] = &[
            (Some(f), Some(c), true, Some(i), Some(File(f.into()))),
            (None, Some(c), true, Some(i), Some(Credential(c.into()))),
            (None, None, true, Some(i), Some(Env("K".into()))),
            (None, None, false, Some(i), Some(Installed(i.into()))),
            (None, None, false, None, None),
        ];
        for (file, cred, env_set, inst, want) in cases {
            assert_eq!(&key_origin(*file, *cred, ("K", *env_set), *inst), want);
        }
    }

    #[test]
    fn the_installed_key_sits_beside_the_config_file() {
        assert_eq!(
            installed_key_path(Path::new("/etc/cobi-sync/cobi-sync.toml")),
            Path::new("/etc/cobi-sync/api-key")
        );
        assert_eq!(
            installed_key_path(Path::new("cobi-sync.toml")),
            Path::new("./api-key")
        );
    }
}
