//! The minion's events: every one goes to NATS (`<prefix>.event.<minion>.<kind>`,
//! kept by `PROVIS_EVENTS`) and to local watchers of the gRPC `WatchEvents`.

use provis_core::Subjects;
use provis_core::event::CloudEvent;
use provis_core::outbox::Outbox;
use serde_json::Value;
use tokio::sync::broadcast;

/// Events a slow local watcher may fall behind by before it misses some.
const LOCAL_BACKLOG: usize = 1024;

#[derive(Debug, Clone)]
pub struct EventBus {
    outbox: Outbox,
    subjects: Subjects,
    minion: String,
    local: broadcast::Sender<CloudEvent>,
}

impl EventBus {
    /// Events of `minion`, sent through `outbox` (which also carries its
    /// state samples, so both keep their order).
    pub fn new(outbox: Outbox, subjects: Subjects, minion: String) -> Self {
        Self {
            outbox,
            subjects,
            minion,
            local: broadcast::channel(LOCAL_BACKLOG).0,
        }
    }

    /// Emits `kind` (checked dot-separated tokens) with `data`.
    pub async fn emit(&self, kind: &str, data: Value) {
        let event = CloudEvent::new(&self.minion, kind, data);
        tracing::debug!(minion = %self.minion, kind, "event");
        let _ = self.local.send(event.clone());
        event.send(&self.outbox, &self.subjects);
    }

    /// The outbox events leave by.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Says a desired-state entry was refused (forged, copied, put back,
    /// unreadable): `desired.refused`.
    pub async fn desired_refused(
        &self,
        bucket: &str,
        key: &str,
        reason: &provis_core::signed_entry::EntryError,
    ) {
        self.emit(
            "desired.refused",
            serde_json::json!({ "bucket": bucket, "key": key, "reason": reason.to_string() }),
        )
        .await;
    }

    /// Events from now on, for a local watcher.
    pub fn subscribe(&self) -> broadcast::Receiver<CloudEvent> {
        self.local.subscribe()
    }
}

/// Reports refused calls (malformed, expired, out of policy) as
/// `call.refused` events, at most one a second: a flood of bad messages must
/// not become a flood of events. The ones held back are counted in the next.
#[derive(Debug, Clone)]
pub struct RefusalReporter {
    bus: EventBus,
    last_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
    held_back: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RefusalReporter {
    pub fn new(bus: EventBus) -> Self {
        Self {
            bus,
            last_ms: Default::default(),
            held_back: Default::default(),
        }
    }

    pub async fn refused(&self, subject: &str, reason: &str) {
        use std::sync::atomic::Ordering;
        let now = provis_core::envelope::now_unix_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now - last < 1_000
            || self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let held_back = self.held_back.swap(0, Ordering::Relaxed);
        let data =
            serde_json::json!({ "subject": subject, "reason": reason, "held_back": held_back });
        self.bus.emit("call.refused", data).await;
    }
}
