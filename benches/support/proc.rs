//! Child processes of the harness: spawned with `PR_SET_PDEATHSIG = SIGKILL`
//! (so they die with the harness however it ends), killed on drop, reaped
//! with `wait4` (exit status, CPU time), and sampled while they run.
//!
//! Peak RSS is the largest `VmHWM` of `/proc/PID/status`, read every 10 ms
//! from the moment `spawn` returns (after the `exec`). `wait4`'s
//! `ru_maxrss` is NOT used for it: Linux keeps the high-water mark of the
//! pre-`exec` image (a fork of the harness, tens of MiB) in `ru_maxrss`,
//! so a small child would report the harness's size.
//!
//! Spawn children only from the thread that runs the harness's top-level
//! future (the main thread): the kernel delivers the death signal when the
//! *thread* that forked the child exits.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How a child ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// Exit code, or `None` when killed by a signal.
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// `wait4`'s `ru_maxrss`, KiB: includes the pre-exec fork of the
    /// harness, so not the child's own peak (see the module docs).
    #[allow(dead_code)]
    pub maxrss_kib: u64,
    /// User + system CPU seconds.
    pub cpu_secs: f64,
    /// Wall time from spawn to reaping.
    pub wall: Duration,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "unknown exit".into(),
        }
    }
}

/// A running child process.
pub struct Proc {
    pub name: String,
    pid: i32,
    pub started: Instant,
    /// Where its stderr (and stdout unless piped) goes.
    pub log: PathBuf,
    hwm_kib: Arc<AtomicU64>,
    sampler_stop: Arc<AtomicBool>,
    exit: Option<Exit>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log` (unless the
    /// caller set stdout itself, see [`spawn_piped`](Self::spawn_piped)).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let f = open_log(log)?;
        cmd.stdout(f.try_clone()?).stderr(f);
        Self::spawn_raw(name, cmd, log).map(|(p, _)| p)
    }

    /// Spawns `cmd` with stdout piped back (returned) and stderr to `log`.
    pub fn spawn_piped(
        name: &str,
        mut cmd: Command,
        log: &Path,
    ) -> Result<(Proc, std::process::ChildStdout)> {
        let f = open_log(log)?;
        cmd.stdout(Stdio::piped()).stderr(f);
        let (p, out) = Self::spawn_raw(name, cmd, log)?;
        Ok((p, out.expect("piped stdout")))
    }

    fn spawn_raw(
        name: &str,
        mut cmd: Command,
        log: &Path,
    ) -> Result<(Proc, Option<std::process::ChildStdout>)> {
        cmd.stdin(Stdio::null());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let stdout = child.stdout.take();
        let pid = child.id() as i32;
        // The Child handle is dropped without waiting: we reap with wait4.
        drop(child);
        let hwm_kib = Arc::new(AtomicU64::new(0));
        let sampler_stop = Arc::new(AtomicBool::new(false));
        {
            let hwm = hwm_kib.clone();
            let stop = sampler_stop.clone();
            std::thread::Builder::new()
                .name(format!("hwm-{pid}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match read_status_kib(pid, "VmHWM:") {
                            Some(k) => {
                                hwm.fetch_max(k, Ordering::Relaxed);
                            }
                            None => break,
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
                .context("spawning the RSS sampler thread")?;
        }
        Ok((
            Proc {
                name: name.to_owned(),
                pid,
                started,
                log: log.to_path_buf(),
                hwm_kib,
                sampler_stop,
                exit: None,
            },
            stdout,
        ))
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Peak RSS in MiB: the largest `VmHWM` read (every 10 ms while it ran).
    pub fn peak_rss_mib(&self) -> f64 {
        self.hwm_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// Reads the current `VmHWM` into the peak (call before signalling it).
    pub fn sample_now(&self) {
        if let Some(k) = read_status_kib(self.pid, "VmHWM:") {
            self.hwm_kib.fetch_max(k, Ordering::Relaxed);
        }
    }

    /// utime + stime so far, in seconds (from `/proc/PID/stat`).
    pub fn cpu_secs_now(&self) -> Option<f64> {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = &text[text.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); utime is field 14, stime 15.
        let utime: u64 = f.get(11)?.parse().ok()?;
        let stime: u64 = f.get(12)?.parse().ok()?;
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Some((utime + stime) as f64 / tck)
    }

    /// Reaps the child if it has exited.
    pub fn try_reap(&mut self) -> Option<&Exit> {
        if self.exit.is_none() {
            self.sample_now();
            let mut status = 0;
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: plain syscall on our own child.
            let r = unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut ru) };
            if r == self.pid {
                self.exit = Some(exit_of(status, &ru, self.started.elapsed()));
                self.sampler_stop.store(true, Ordering::Relaxed);
            } else if r < 0 {
                // Not our child any more (should not happen): treat as gone.
                self.exit = Some(Exit {
                    code: None,
                    signal: None,
                    maxrss_kib: 0,
                    cpu_secs: 0.0,
                    wall: self.started.elapsed(),
                });
                self.sampler_stop.store(true, Ordering::Relaxed);
            }
        }
        self.exit.as_ref()
    }

    pub fn is_running(&mut self) -> bool {
        self.try_reap().is_none()
    }

    /// Waits for the child to exit on its own, at most `timeout`; kills it
    /// and fails after that.
    pub async fn wait(&mut self, timeout: Duration) -> Result<Exit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_reap() {
                return Ok(e.clone());
            }
            if Instant::now() >= deadline {
                self.kill().await;
                bail!(
                    "{} did not finish within {:?} (killed); log: {}",
                    self.name,
                    timeout,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL.
    pub async fn term(&mut self, grace: Duration) -> Exit {
        if self.exit.is_none() {
            self.sample_now();
            unsafe { libc::kill(self.pid, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Some(e) = self.try_reap() {
                    return e.clone();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            eprintln!(
                "  ! {} did not stop within {:?} of SIGTERM; killing it",
                self.name, grace
            );
        }
        self.kill().await
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) -> Exit {
        if self.exit.is_none() {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            for _ in 0..500 {
                if self.try_reap().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.exit.clone().unwrap_or(Exit {
            code: None,
            signal: Some(libc::SIGKILL),
            maxrss_kib: 0,
            cpu_secs: 0.0,
            wall: self.started.elapsed(),
        })
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sampler_stop.store(true, Ordering::Relaxed);
        if self.exit.is_none() {
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(self.pid, &mut status, 0);
            }
        }
    }
}

fn exit_of(status: i32, ru: &libc::rusage, wall: Duration) -> Exit {
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Exit {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        maxrss_kib: ru.ru_maxrss.max(0) as u64,
        cpu_secs: tv(ru.ru_utime) + tv(ru.ru_stime),
        wall,
    }
}

fn open_log(log: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))
}

/// A `kB` line of `/proc/PID/status`, e.g. `VmHWM:`.
pub fn read_status_kib(pid: i32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The last `n` lines of a file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
