//! systemd integration (`Type=notify`): `READY=1` once set up, `STATUS=`
//! lines, and watchdog pings while the pipeline's tasks are alive.
//! Everything here is a no-op outside systemd (no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the daemon is ready.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line shown by `systemctl status`.
pub fn status(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(status)]);
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// The watchdog interval, if systemd asked for pings (`WATCHDOG_USEC`,
/// and `WATCHDOG_PID` naming this process when set).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// The rule of `sd_watchdog_enabled(3)`: a positive `WATCHDOG_USEC` asks
/// for pings unless `WATCHDOG_PID` is set to another process (an
/// environment inherited by a child). Unlike the `sd-notify` crate, an
/// unset `WATCHDOG_PID` does not disable the watchdog, as in libsystemd.
pub fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    match pid.map(|p| p.trim().parse::<u32>()) {
        None => Some(Duration::from_micros(usec)),
        Some(Ok(p)) if p == me => Some(Duration::from_micros(usec)),
        Some(_) => None,
    }
}

/// One watchdog ping.
pub fn ping() {
    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_the_watchdog_is_enabled() {
        let two = Some(Duration::from_secs(2));
        // (WATCHDOG_USEC, WATCHDOG_PID, our pid 7) → interval
        let cases = [
            ((None, None), None),
            ((Some("2000000"), None), two),
            ((Some("2000000"), Some("7")), two),
            ((Some("2000000"), Some("8")), None),
            ((Some("2000000"), Some("x")), None),
            ((Some("0"), None), None),
            ((Some("soon"), None), None),
            ((None, Some("7")), None),
        ];
        for ((usec, pid), want) in cases {
            assert_eq!(watchdog_from(usec, pid, 7), want, "{usec:?} {pid:?}");
        }
    }
}
