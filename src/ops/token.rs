//! The endpoint token: what authenticates `cobi-sync dlq` (and every other
//! endpoint that changes state or shows record contents) to the running
//! daemon. Loopback alone is not authentication: any local user, or a web
//! page through a cross-site request, can reach a loopback port.
//!
//! At start the daemon writes a fresh random token to `<state.dir>/http-token`
//! with mode 0600, owned by the service user (the state dir itself is the
//! service's, 0700 under systemd's `StateDirectory=`). The CLI reads it from
//! there and sends it as `Authorization: Bearer <token>`; so only root and
//! the service user can use those endpoints. A browser cannot attach the
//! header to a cross-site request without a CORS preflight, which the
//! endpoint never grants.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The token file's name in the state dir.
pub const FILE_NAME: &str = "http-token";

/// Where the token lives for a state dir.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Writes a fresh token (256 random bits, hex) to the state dir, mode 0600,
/// replacing any earlier one by rename. Returns it.
pub fn create(state_dir: &Path) -> std::io::Result<String> {
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!("{FILE_NAME}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(state_dir))?;
    Ok(token)
}

/// Reads the token for the CLI. The error says which file and what to do.
pub fn read(state_dir: &Path) -> Result<String, String> {
    let p = path(state_dir);
    match std::fs::read_to_string(&p) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(format!("the endpoint token {} is empty", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(format!(
            "cannot read the endpoint token {} ({e}): run this as root or as the service \
             user (sudo cobi-sync …)",
            p.display()
        )),
        Err(e) => Err(format!(
            "cannot read the endpoint token {} ({e}): is the running daemon using state.dir {}?",
            p.display(),
            state_dir.display()
        )),
    }
}

/// Whether an `Authorization` header value carries `token`, compared in
/// constant time.
pub fn authorizes(header: Option<&str>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let t = create(dir.path()).unwrap();
        assert_eq!(t.len(), 64);
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read(dir.path()).unwrap(), t);
        let t2 = create(dir.path()).unwrap();
        assert_ne!(t, t2, "a fresh token at each start");
        assert_eq!(read(dir.path()).unwrap(), t2);
        let missing = read(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("http-token"), "{missing}");
    }

    #[test]
    fn bearer_header_rule() {
        let cases = [
            (Some("Bearer abc"), true),
            (Some("Bearer abd"), false),
            (Some("Bearer ab"), false),
            (Some("bearer abc"), false),
            (Some("abc"), false),
            (None, false),
        ];
        for (h, want) in cases {
            assert_eq!(authorizes(h, "abc"), want, "{h:?}");
        }
    }
}
