//! Spawning server processes that die with this process, and stopping them.

use super::*;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

pub(super) type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that never exits. `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked the child exits, not the process, so forking from a Tokio
/// worker or a test thread would kill the server when that thread ends.
pub(super) fn spawn_supervised(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("pgtemp-spawner".to_owned())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });
    let Some(spawner) = spawner else {
        return cmd.spawn();
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    if let Err(mpsc::SendError((mut cmd, _))) = spawner.send((cmd, reply_tx)) {
        return cmd.spawn();
    }
    reply_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("pgtemp spawner thread is gone")))
}

/// Runs as `owner`, with a clean PostgreSQL environment, and dies with this process.
pub(super) fn prepare_command(cmd: &mut Command, owner: Option<Owner>, cwd: &Path) {
    if let Some(o) = owner {
        cmd.uid(o.uid).gid(o.gid);
    }
    for var in [
        "PGDATA",
        "PGPORT",
        "PGHOST",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C").current_dir(cwd).stdin(Stdio::null());
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure only makes async-signal-safe system calls and does not
        // allocate. std runs it after setgid/setuid, so the death signal is not reset
        // by the credential change.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before the death signal was armed.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
}

pub(super) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // A zombie (dead, not yet reaped by whoever inherited it) counts as gone.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => true,
    }
}

pub(super) fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2); the child has not been reaped, so the pid is still ours.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGKILL to the whole process group of the (unreaped) postmaster.
pub(super) fn kill_group(child: &mut Child) {
    // SAFETY: the postmaster leads its own process group (process_group(0)) and has
    // not been reaped, so the group id cannot have been reused.
    unsafe {
        libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
    }
    let _ = child.kill();
}

/// Blocking: SIGQUIT, wait up to 5 s, SIGKILL the process group, reap.
pub(super) fn shutdown_immediately(mut child: Child) {
    signal(child.id(), libc::SIGQUIT);
    let deadline = Instant::now() + IMMEDIATE_STOP_DEADLINE;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => break,
        }
    }
    kill_group(&mut child);
    let _ = child.wait();
}
