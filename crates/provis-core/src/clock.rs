//! [`BusClock`]: a process's idea of the fleet's time.
//!
//! Machines' clocks drift and some are simply wrong. Nothing that decides
//! whether a call runs may hang on the minion's clock alone: a call's
//! timeout travels as a duration and counts from its arrival; liveness is
//! judged by the master's clock on receipt. Where a wall-clock time must be
//! compared across machines (a signed call's issue time, a sample's time),
//! the minion corrects its clock by the offset it learns from nats-server's
//! own timestamps (the time JetStream stored the minion's registry record).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::envelope::now_unix_ms;

/// This process's clock, corrected by what the bus says the time is.
#[derive(Debug, Clone, Default)]
pub struct BusClock {
    /// Bus time minus this machine's time, as last learnt.
    offset_ms: Arc<AtomicI64>,
    /// How far this machine's clock is off from the system clock: always
    /// zero, except for a test or simulation of a machine whose clock is
    /// wrong.
    local_skew_ms: i64,
}

impl BusClock {
    /// The system clock, not corrected yet.
    pub fn system() -> Self {
        Self::default()
    }

    /// A machine whose clock is `skew_ms` off the system clock: what a test
    /// uses to run a minion with a wrong clock.
    pub fn with_local_skew(skew_ms: i64) -> Self {
        Self {
            local_skew_ms: skew_ms,
            ..Self::default()
        }
    }

    /// What this machine's clock says now, in ms since the epoch.
    pub fn local_now_ms(&self) -> i64 {
        now_unix_ms().saturating_add(self.local_skew_ms)
    }

    /// The bus's time now: this machine's clock corrected by the offset.
    pub fn now_ms(&self) -> i64 {
        self.local_now_ms()
            .saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Bus time minus this machine's time, as last learnt.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Learns the offset from a server timestamp `server_ms` taken between
    /// `asked_ms` and `answered_ms` (this machine's clock): the server's
    /// time is taken for the midpoint. Returns the new offset.
    pub fn learn(&self, server_ms: i64, asked_ms: i64, answered_ms: i64) -> i64 {
        let midpoint = asked_ms + (answered_ms.saturating_sub(asked_ms)) / 2;
        let offset = server_ms.saturating_sub(midpoint);
        self.offset_ms.store(offset, Ordering::Relaxed);
        offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_clock_is_corrected_by_the_servers_time() {
        let hour = 3_600_000;
        let clock = BusClock::with_local_skew(hour);
        let system = now_unix_ms();
        assert!((clock.local_now_ms() - system - hour).abs() < 1_000);
        // The server stored something at system time, asked and answered
        // within 10 ms by the wrong clock.
        let asked = clock.local_now_ms();
        let offset = clock.learn(system, asked, asked + 10);
        assert!((offset + hour).abs() < 1_000, "{offset}");
        assert!((clock.now_ms() - now_unix_ms()).abs() < 1_000);
        // Clones share what was learnt.
        assert_eq!(clock.clone().offset_ms(), offset);
    }
}
