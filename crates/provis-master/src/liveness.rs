//! Noticing minions that go silent: the master follows the registry with one
//! watch, and when a minion misses its heartbeats (three of its own
//! intervals) it marks the entry offline and emits `minion.offline` with
//! reason `missed_heartbeats`. A minion that stops cleanly marks itself
//! stopped and emits its own event; one that comes back overwrites the mark
//! with its next heartbeat.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use futures::StreamExt;
use provis_core::envelope::now_unix_ms;
use provis_core::registry::{MinionRecord, MinionStatus};
use provis_core::{Subjects, event};

use crate::fleet_view::FleetView;
use serde_json::json;

/// How often silent minions are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Follows the registry until the watch fails; the caller restarts it.
pub async fn watch(
    nats: async_nats::Client,
    subjects: Subjects,
    registry: Store,
    view: &FleetView,
    desired: &tokio::sync::mpsc::Sender<crate::desired::DesiredRequest>,
) -> Result<(), String> {
    let mut entries = registry
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    let mut known: BTreeMap<String, MinionRecord> = BTreeMap::new();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            entry = entries.next() => {
                let entry = entry.ok_or("registry watch closed")?.map_err(|e| e.to_string())?;
                if entry.operation != Operation::Put {
                    known.remove(&entry.key);
                    view.registry_mut().remove(&entry.key);
                } else if let Ok(record) = serde_json::from_slice::<MinionRecord>(&entry.value) {
                    let new_or_changed = known.get(&entry.key).is_none_or(|old| old.facts != record.facts);
                    view.registry_mut().insert(entry.key.clone(), record.clone());
                    known.insert(entry.key.clone(), record);
                    if new_or_changed {
                        // Its assignment may depend on who it is and on its facts.
                        let _ = desired.try_send(crate::desired::DesiredRequest::Minion(entry.key));
                    }
                }
            }
            _ = sweep.tick() => {
                let now = now_unix_ms();
                for (key, record) in &mut known {
                    if record.status == MinionStatus::Online && !record.is_live_at(now) {
                        mark_offline(&nats, &subjects, &registry, key, record, now).await;
                    }
                }
            }
        }
    }
}

async fn mark_offline(
    nats: &async_nats::Client,
    subjects: &Subjects,
    registry: &Store,
    key: &str,
    record: &mut MinionRecord,
    now: i64,
) {
    // Only if the entry is still the silent one: a heartbeat that lands meanwhile wins.
    let Ok(Some(current)) = registry.entry(key).await else {
        return;
    };
    let Ok(stored) = serde_json::from_slice::<MinionRecord>(&current.value) else {
        return;
    };
    if stored.heartbeat_unix_ms != record.heartbeat_unix_ms {
        return;
    }
    let mut offline = stored;
    offline.status = MinionStatus::Offline;
    let Ok(value) = serde_json::to_vec(&offline) else {
        return;
    };
    if registry
        .update(key, value.into(), current.revision)
        .await
        .is_err()
    {
        return; // it just beat again
    }
    record.status = MinionStatus::Offline;
    let silent_ms = now - offline.heartbeat_unix_ms;
    tracing::warn!(minion = %key, silent_ms, "minion missed its heartbeats; marked offline");
    event::emit(
        nats,
        subjects,
        "master",
        "minion.offline",
        json!({ "minion": key, "reason": "missed_heartbeats", "last_seen_unix_ms": offline.heartbeat_unix_ms, "silent_ms": silent_ms }),
    )
    .await;
}
