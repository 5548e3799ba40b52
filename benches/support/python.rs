//! The Python peers' environment: a venv under the target directory with
//! psycopg2-binary and requests, created on first use.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The venv's python, ready to run the peers, or why not.
pub fn ensure_venv(target_dir: &Path) -> Result<PathBuf, String> {
    let venv = target_dir.join("bench-venv");
    let py = venv.join("bin/python");
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", "import psycopg2, psycopg2.extras, requests"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if py.exists() && ok(&py) {
        return Ok(py);
    }
    let python3 = std::env::var("COBI_BENCH_PYTHON3").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python3)
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .map_err(|e| format!("cannot run {python3}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{python3} -m venv` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    eprintln!(
        "  installing psycopg2-binary and requests into {}",
        venv.display()
    );
    let out = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "-q",
            "--disable-pip-version-check",
            "psycopg2-binary",
            "requests",
        ])
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "pip install psycopg2-binary requests failed: {}",
            err.lines().last().unwrap_or("").trim()
        ));
    }
    if ok(&py) {
        Ok(py)
    } else {
        Err("psycopg2/requests still not importable after pip install".into())
    }
}
