//! Heartbeats and who is live.
//!
//! A minion publishes a [`Heartbeat`] on `<prefix>.heartbeat.<id>` every
//! `heartbeat_interval_ms`: a core NATS message of some forty bytes, never
//! stored, never acknowledged, sent only to whoever subscribes (the
//! masters). Each master keeps a [`Presence`]: when it last heard from each
//! minion, by its own monotonic clock at receipt. A minion whose clock is
//! an hour off is judged like any other; a master judges every minion by
//! one clock.
//!
//! Liveness of a registry record, by [`Presence::liveness`]:
//! - [`Liveness::Gone`]: the record says stopped or offline;
//! - [`Liveness::Live`]: online, and heard from within
//!   [`MISSED_HEARTBEATS_OFFLINE`] of its intervals;
//! - [`Liveness::Late`]: online by its record but silent longer: calls to
//!   its whole role still reach it, nobody waits for it, and the leading
//!   master marks it offline.
//!
//! A master that has just started, or whose connection came back, has heard
//! nobody yet: every online record gets the same grace of three intervals
//! from then, so a restart never marks the fleet offline.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::registry::{MISSED_HEARTBEATS_OFFLINE, MinionRecord};

/// What a minion says with each heartbeat. Its id is the subject's last
/// token (a minion may publish only its own, on a secured fleet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Counts up from 1 at each start: a gap is a heartbeat lost.
    pub seq: u64,
    /// When the next one is due, at the latest.
    pub interval_ms: u64,
    /// Calls running now.
    #[serde(default)]
    pub in_flight: u32,
}

/// Whether a minion should answer a call now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Live,
    /// Online by its record, but not heard from for longer than allowed.
    Late,
    /// Stopped or marked offline.
    Gone,
}

#[derive(Debug, Clone, Copy)]
struct Heard {
    at: Instant,
    interval: Duration,
}

/// When each minion was last heard from, by this process's clock.
#[derive(Debug)]
pub struct Presence {
    /// Minions not heard from yet count as heard at this instant: the start,
    /// or the last time the connection came back.
    grace_from: Instant,
    heard: HashMap<String, Heard>,
}

impl Default for Presence {
    fn default() -> Self {
        Self::new()
    }
}

impl Presence {
    pub fn new() -> Self {
        Self {
            grace_from: Instant::now(),
            heard: HashMap::new(),
        }
    }

    /// Minion `id` gave a sign of life (a heartbeat, or a record it wrote)
    /// at `at`; it sends the next within `interval`.
    pub fn heard(&mut self, id: &str, interval: Duration, at: Instant) {
        match self.heard.get_mut(id) {
            Some(heard) => {
                heard.at = heard.at.max(at);
                heard.interval = interval;
            }
            None => {
                self.heard.insert(id.to_owned(), Heard { at, interval });
            }
        }
    }

    /// Forgets a minion (its record was removed).
    pub fn forget(&mut self, id: &str) {
        self.heard.remove(id);
    }

    /// Nothing was heard for a while through no fault of the minions (the
    /// connection was away): every one starts a fresh grace from `now`.
    pub fn excuse_silence(&mut self, now: Instant) {
        self.grace_from = now;
        for heard in self.heard.values_mut() {
            heard.at = heard.at.max(now);
        }
    }

    /// When `id` was last heard from, if ever since this process started.
    pub fn last_heard(&self, id: &str) -> Option<Instant> {
        self.heard.get(id).map(|heard| heard.at)
    }

    /// How `record`'s minion stands at `now`.
    pub fn liveness(&self, record: &MinionRecord, now: Instant) -> Liveness {
        if !record.is_online() {
            return Liveness::Gone;
        }
        let (at, interval) = match self.heard.get(record.id.as_str()) {
            Some(heard) => (heard.at.max(self.grace_from), heard.interval),
            None => (self.grace_from, record.heartbeat_interval()),
        };
        let allowed = interval.max(Duration::from_millis(100)) * MISSED_HEARTBEATS_OFFLINE;
        if now.saturating_duration_since(at) <= allowed {
            Liveness::Live
        } else {
            Liveness::Late
        }
    }
}

/// How a caller without a master judges records: by their status alone.
pub fn liveness_by_status(record: &MinionRecord) -> Liveness {
    if record.is_online() {
        Liveness::Live
    } else {
        Liveness::Gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::MinionStatus;

    fn record(id: &str, status: MinionStatus) -> MinionRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "hostname": "h", "roles": [], "version": "0",
            "status": status, "started_unix_ms": 0, "written_unix_ms": 0,
            "heartbeat_interval_ms": 1000, "services": {}
        }))
        .unwrap()
    }

    #[test]
    fn liveness_follows_heartbeats_by_the_observers_clock() {
        let start = Instant::now();
        let mut presence = Presence::new();
        let web = record("web", MinionStatus::Online);
        // Not heard yet: the grace since the start.
        assert_eq!(presence.liveness(&web, start), Liveness::Live);
        assert_eq!(
            presence.liveness(&web, start + Duration::from_millis(3_500)),
            Liveness::Late
        );
        presence.heard(
            "web",
            Duration::from_secs(1),
            start + Duration::from_secs(3),
        );
        assert_eq!(
            presence.liveness(&web, start + Duration::from_secs(5)),
            Liveness::Live
        );
        assert_eq!(
            presence.liveness(&web, start + Duration::from_millis(6_001)),
            Liveness::Late
        );
        // A connection that came back excuses the silence before it.
        presence.excuse_silence(start + Duration::from_secs(10));
        assert_eq!(
            presence.liveness(&web, start + Duration::from_secs(12)),
            Liveness::Live
        );
        let stopped = record("web", MinionStatus::Stopped);
        assert_eq!(presence.liveness(&stopped, start), Liveness::Gone);
        assert_eq!(liveness_by_status(&stopped), Liveness::Gone);
        assert_eq!(liveness_by_status(&web), Liveness::Live);
    }
}
