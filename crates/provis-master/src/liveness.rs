//! Noticing minions that go silent: every master follows the registry into
//! its view, and the leading one, when a minion misses its heartbeats (three of its own
//! intervals) it marks the entry offline and emits `minion.offline` with
//! reason `missed_heartbeats`. A minion that stops cleanly marks itself
//! stopped and emits its own event; one that comes back overwrites the mark
//! with its next heartbeat.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use futures::StreamExt;
use provis_core::envelope::now_unix_ms;
use provis_core::registry::{MinionRecord, MinionStatus};
use provis_core::signed_entry::{EntryError, Followed, follow as follow_entries};
use provis_core::storage::BUCKET_MINIONS;
use provis_core::{Subjects, event};

use crate::fleet_view::FleetView;
use serde_json::json;

/// How often silent minions are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Follows the registry into `view` until `stop` fires, asks the
/// desired-state loop to recompute the assignment of a minion that appears
/// or changes its facts, and marks silent minions offline.
pub async fn follow(
    js: async_nats::jetstream::Context,
    outbox: provis_core::outbox::Outbox,
    subjects: Subjects,
    view: &FleetView,
    desired: tokio::sync::mpsc::Sender<crate::desired::DesiredRequest>,
    leadership: crate::leadership::Leadership,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut entries = follow_entries(js.clone(), BUCKET_MINIONS, ">", registry_record());
    let mut known: BTreeMap<String, MinionRecord> = BTreeMap::new();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut registry: Option<Store> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            followed = entries.next() => match followed {
                Some(Followed::Taken { key, value: record, .. }) => {
                    let new_or_changed = known.get(&key).is_none_or(|old| old.facts != record.facts);
                    view.registry_mut().insert(key.clone(), record.clone());
                    known.insert(key.clone(), record);
                    if new_or_changed {
                        // Its assignment may depend on who it is and on its facts.
                        let _ = desired.try_send(crate::desired::DesiredRequest::Minion(key));
                    }
                }
                Some(Followed::Removed { key }) => {
                    known.remove(&key);
                    view.registry_mut().remove(&key);
                }
                Some(Followed::Refused { key, error }) => {
                    tracing::warn!(%key, %error, "registry entry skipped");
                }
                Some(Followed::Current) => view.mark_registry_loaded(),
                None => return,
            },
            _ = sweep.tick() => {
                // Offline marks are writes: the leader's.
                if leadership.term().is_none() {
                    continue;
                }
                let now = now_unix_ms();
                if registry.is_none() {
                    registry = provis_core::registry::open_registry(&js).await.ok();
                }
                let Some(store) = registry.as_ref() else { continue };
                for (key, record) in &mut known {
                    if record.status == MinionStatus::Online && !record.is_live_at(now) {
                        mark_offline(&outbox, &subjects, store, key, record, now).await;
                    }
                }
            }
        }
    }
}

/// Opens a registry entry: a record under its own minion's key only (a
/// minion may write only its own key; a record naming another id is someone
/// speaking for that minion).
fn registry_record() -> impl provis_core::signed_entry::EntryOpener<MinionRecord> + Send + 'static {
    let plain = provis_core::signed_entry::plain::<MinionRecord>();
    move |key: &str, bytes: &[u8], held: Option<provis_core::signed_entry::Stamp>| {
        let opened = plain(key, bytes, held)?;
        if opened.value.id.as_str() != key {
            return Err(EntryError::WrongKey {
                key: key.to_owned(),
                named: opened.value.id.to_string(),
            });
        }
        Ok(opened)
    }
}

async fn mark_offline(
    outbox: &provis_core::outbox::Outbox,
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
        outbox,
        subjects,
        "master",
        "minion.offline",
        json!({ "minion": key, "reason": "missed_heartbeats", "last_seen_unix_ms": offline.heartbeat_unix_ms, "silent_ms": silent_ms }),
    );
}
