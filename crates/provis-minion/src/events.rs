//! The minion's events: every one goes to NATS (`<prefix>.event.<minion>.<kind>`,
//! kept by `PROVIS_EVENTS`) and to local watchers of the gRPC `WatchEvents`.

use provis_core::Subjects;
use provis_core::event::CloudEvent;
use serde_json::Value;
use tokio::sync::broadcast;

/// Events a slow local watcher may fall behind by before it misses some.
const LOCAL_BACKLOG: usize = 1024;

#[derive(Debug, Clone)]
pub struct EventBus {
    nats: async_nats::Client,
    subjects: Subjects,
    minion: String,
    local: broadcast::Sender<CloudEvent>,
}

impl EventBus {
    pub fn new(nats: async_nats::Client, subjects: Subjects, minion: String) -> Self {
        Self {
            nats,
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
        event.publish(&self.nats, &self.subjects).await;
    }

    /// Events from now on, for a local watcher.
    pub fn subscribe(&self) -> broadcast::Receiver<CloudEvent> {
        self.local.subscribe()
    }
}
