//! systemd's `Type=notify`: `READY=1` once a part serves, `STOPPING=1` when
//! it begins to stop, and `WATCHDOG=1` at half the unit's `WatchdogSec=`
//! while the process is alive. Outside systemd (no `NOTIFY_SOCKET`) every
//! call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

fn notify(state: NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(false, &[state]) {
        tracing::debug!(error = %err, "systemd not notified");
    }
}

/// The part serves.
pub fn ready() {
    notify(NotifyState::Ready);
}

/// The part begins its orderly stop.
pub fn stopping() {
    notify(NotifyState::Stopping);
}

/// Pings the watchdog at half its interval until `stop`, when the unit has
/// one. The pings come from the part's own runtime, so a runtime that hangs
/// stops them and systemd restarts the process; a NATS outage does not (a
/// restart would not end it: `/readyz` tells that).
pub async fn watchdog(stop: tokio_util::sync::CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => notify(NotifyState::Watchdog),
        }
    }
}
