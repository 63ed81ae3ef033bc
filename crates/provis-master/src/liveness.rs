//! Who is live: every master follows the registry into its view and hears
//! every heartbeat (`<prefix>.heartbeat.*`, core NATS), judging each by its
//! own clock on receipt. The leading master marks a minion offline when it
//! misses three of its heartbeat intervals (`minion.offline`, reason
//! `missed_heartbeats`) and online again when its heartbeats come back
//! (`minion.online`, reason `heartbeats_resumed`). A minion that stops
//! cleanly marks itself stopped and says so itself.
//!
//! A master whose connection was away excuses the silence: it heard nobody
//! through no fault of theirs, so everyone gets a fresh grace.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Store;
use futures::{FutureExt as _, StreamExt};
use provis_core::presence::{Heartbeat, Liveness};
use provis_core::registry::{MinionRecord, MinionStatus};
use provis_core::signed_entry::{EntryError, Followed, follow as follow_entries};
use provis_core::storage::BUCKET_MINIONS;
use provis_core::{Subjects, event};

use crate::fleet_view::FleetView;
use serde_json::json;

/// How often silent minions are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The longest one status write may hold the loop (a stream electing its
/// leader): heartbeats must keep being heard.
const MARK_TIMEOUT: Duration = Duration::from_secs(2);

/// Follows the registry and the heartbeats into `view` until `stop` fires,
/// asks the desired-state loop to recompute the assignment of a minion that
/// appears or changes its facts, and, while leading, marks minions offline
/// and online again.
pub async fn follow(
    js: async_nats::jetstream::Context,
    outbox: provis_core::outbox::Outbox,
    subjects: Subjects,
    view: &FleetView,
    desired: tokio::sync::mpsc::Sender<crate::desired::DesiredRequest>,
    leadership: crate::leadership::Leadership,
    stop: tokio_util::sync::CancellationToken,
) {
    let nats = js.client();
    let mut marks = Marks {
        js: js.clone(),
        registry: None,
        outbox,
        subjects: subjects.clone(),
        reviving: HashSet::new(),
    };
    let mut entries = follow_entries(js, BUCKET_MINIONS, ">", registry_record());
    let heartbeat_prefix = format!("{}.heartbeat.", subjects.prefix());
    let mut heartbeats = subscribe_heartbeats(&nats, &subjects).await;
    let mut connects = connect_count(&nats);
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    // A sweep that fell behind runs once, not in a burst of catch-up ticks.
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Heartbeats first: a sweep must never judge a minion whose
        // heartbeat already arrived and waits to be read.
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            Some(message) = next_heartbeat(&mut heartbeats) => {
                let revived = hear(view, &heartbeat_prefix, &message);
                if let Some(id) = revived
                    && leadership.term().is_some()
                {
                    marks.online(&id).await;
                }
            }
            followed = entries.next() => match followed {
                Some(Followed::Taken { key, value: record, .. }) => {
                    taken(view, &desired, &mut marks, key, record);
                }
                Some(Followed::Removed { key }) => {
                    view.registry_mut().remove(&key);
                    view.presence().forget(&key);
                }
                Some(Followed::Refused { key, error }) => {
                    tracing::warn!(%key, %error, "registry entry skipped");
                }
                Some(Followed::Current) => view.mark_registry_loaded(),
                None => return,
            },
            _ = sweep.tick() => {
                let now_connects = connect_count(&nats);
                if now_connects != connects {
                    connects = now_connects;
                    tracing::info!("connection back: every minion's silence is excused");
                    view.presence().excuse_silence(Instant::now());
                }
                // Without heartbeats nobody can be judged silent.
                let Some(subscription) = heartbeats.as_mut() else {
                    heartbeats = subscribe_heartbeats(&nats, &subjects).await;
                    view.presence().excuse_silence(Instant::now());
                    continue;
                };
                // Offline marks are writes: the leader's.
                if leadership.term().is_none() {
                    continue;
                }
                for (key, record) in silent(view) {
                    // Each mark waits on the bucket: hear what arrived
                    // meanwhile, and judge again, before writing.
                    while let Some(Some(message)) = subscription.next().now_or_never() {
                        hear(view, &heartbeat_prefix, &message);
                    }
                    let still_silent = view.presence().liveness(&record, Instant::now())
                        == Liveness::Late;
                    if still_silent && leadership.term().is_some() {
                        marks.offline(&key, &record).await;
                    }
                }
            }
        }
    }
}

/// Subscribes to every minion's heartbeats; None (said loudly, tried again
/// at the next sweep) when the bus refuses.
async fn subscribe_heartbeats(
    nats: &async_nats::Client,
    subjects: &Subjects,
) -> Option<async_nats::Subscriber> {
    match nats.subscribe(subjects.wildcard("heartbeat")).await {
        Ok(heartbeats) => Some(heartbeats),
        Err(err) => {
            tracing::error!(error = %err, "cannot hear heartbeats; nobody is marked offline until they are heard");
            None
        }
    }
}

/// Takes one heartbeat into the view; the minion's id when its record says
/// offline (it is back).
fn hear(view: &FleetView, heartbeat_prefix: &str, message: &async_nats::Message) -> Option<String> {
    let id = message.subject.as_str().strip_prefix(heartbeat_prefix)?;
    let Ok(heartbeat) = serde_json::from_slice::<Heartbeat>(&message.payload) else {
        tracing::debug!(minion = %id, "unreadable heartbeat skipped");
        return None;
    };
    let interval = Duration::from_millis(heartbeat.interval_ms);
    view.presence().heard(id, interval, Instant::now());
    view.heartbeats_heard
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let offline = view
        .registry()
        .get(id)
        .is_some_and(|record| record.status == MinionStatus::Offline);
    offline.then(|| id.to_owned())
}

/// Takes a registry record into the view. A record the minion wrote anew is
/// a sign of life; one whose facts changed may change its assignment.
fn taken(
    view: &FleetView,
    desired: &tokio::sync::mpsc::Sender<crate::desired::DesiredRequest>,
    marks: &mut Marks,
    key: String,
    record: MinionRecord,
) {
    let previous = view.registry_mut().insert(key.clone(), record.clone());
    let rewritten = previous.as_ref().is_none_or(|old| {
        old.written_unix_ms != record.written_unix_ms || old.status != record.status
    });
    if rewritten && record.status == MinionStatus::Online {
        view.presence()
            .heard(&key, record.heartbeat_interval(), Instant::now());
    }
    if record.status != MinionStatus::Offline {
        marks.reviving.remove(&key);
    }
    if previous.is_none_or(|old| old.facts != record.facts) {
        // Its assignment may depend on who it is and on its facts.
        let _ = desired.try_send(crate::desired::DesiredRequest::Minion(key));
    }
}

/// The next heartbeat heard; never, while there is no subscription.
async fn next_heartbeat(
    heartbeats: &mut Option<async_nats::Subscriber>,
) -> Option<async_nats::Message> {
    match heartbeats {
        Some(heartbeats) => heartbeats.next().await,
        None => std::future::pending().await,
    }
}

fn connect_count(nats: &async_nats::Client) -> u64 {
    nats.statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Online records whose minion has not been heard from for too long.
fn silent(view: &FleetView) -> Vec<(String, MinionRecord)> {
    let registry = view.registry();
    let presence = view.presence();
    let now = Instant::now();
    registry
        .iter()
        .filter(|(_, record)| presence.liveness(record, now) == Liveness::Late)
        .map(|(key, record)| (key.clone(), record.clone()))
        .collect()
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

/// The leader's writes of a minion's status into its record.
struct Marks {
    js: async_nats::jetstream::Context,
    registry: Option<Store>,
    outbox: provis_core::outbox::Outbox,
    subjects: Subjects,
    /// Marked online again, not yet seen so in the registry.
    reviving: HashSet<String>,
}

impl Marks {
    async fn store(&mut self) -> Option<&Store> {
        if self.registry.is_none() {
            self.registry = provis_core::registry::open_registry(&self.js).await.ok();
        }
        self.registry.as_ref()
    }

    /// Marks `key` offline, unless its record changed since `seen` (the
    /// minion wrote meanwhile: it lives).
    async fn offline(&mut self, key: &str, seen: &MinionRecord) {
        let written = self
            .set_status(key, MinionStatus::Offline, |stored| {
                stored.written_unix_ms == seen.written_unix_ms
                    && stored.status == MinionStatus::Online
            })
            .await;
        let Some(offline) = written else {
            return; // it just wrote again, or the bucket is away
        };
        tracing::warn!(minion = %key, "minion missed its heartbeats; marked offline");
        event::emit(
            &self.outbox,
            &self.subjects,
            "master",
            "minion.offline",
            json!({ "minion": key, "reason": "missed_heartbeats", "interval_ms": offline.heartbeat_interval_ms }),
        );
    }

    /// Marks `key` online again: its heartbeats are back.
    async fn online(&mut self, key: &str) {
        if !self.reviving.insert(key.to_owned()) {
            return;
        }
        let written = self
            .set_status(key, MinionStatus::Online, |stored| {
                stored.status == MinionStatus::Offline
            })
            .await;
        let Some(record) = written else {
            self.reviving.remove(key);
            return;
        };
        tracing::info!(minion = %key, "heartbeats back; marked online");
        event::emit(
            &self.outbox,
            &self.subjects,
            "master",
            "minion.online",
            json!({ "minion": key, "reason": "heartbeats_resumed", "roles": record.roles }),
        );
    }

    /// Writes `status` into `key`'s record if the stored record is still
    /// what `expected` says, by compare-and-set (a minion writing at the
    /// same moment wins). Returns the record written.
    async fn set_status(
        &mut self,
        key: &str,
        status: MinionStatus,
        expected: impl Fn(&MinionRecord) -> bool,
    ) -> Option<MinionRecord> {
        let store = self.store().await?;
        let current = tokio::time::timeout(MARK_TIMEOUT, store.entry(key))
            .await
            .ok()?
            .ok()??;
        let mut record = serde_json::from_slice::<MinionRecord>(&current.value).ok()?;
        if !expected(&record) {
            return None;
        }
        record.status = status;
        let value = serde_json::to_vec(&record).ok()?;
        tokio::time::timeout(
            MARK_TIMEOUT,
            store.update(key, value.into(), current.revision),
        )
        .await
        .ok()?
        .ok()?;
        Some(record)
    }
}
