//! How a minion tells the fleet it is there: its registry record, written
//! when it changes (never on a timer) and retried until it is, and its
//! heartbeats, small core NATS messages the masters judge by their own
//! clock (see [`provis_core::presence`]).
//!
//! Each write of the record is read back: the time nats-server stored it
//! tells the minion how far its own clock is off ([`BusClock::learn`]).

use std::time::Duration;

use async_nats::jetstream::kv::Store;
use provis_core::clock::BusClock;
use provis_core::presence::Heartbeat;
use provis_core::registry::{self, MinionRecord, MinionStatus};
use serde_json::json;
use tokio::sync::watch;

use crate::events;

/// How long one registry write may take before it is tried again.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How soon a failed write is tried again when nothing changed meanwhile.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// True when `a` and `b` say the same, whenever they were written.
pub fn same_record(a: &MinionRecord, b: &MinionRecord) -> bool {
    a.status == b.status
        && a.roles == b.roles
        && a.overlay_roles == b.overlay_roles
        && a.services == b.services
        && a.facts == b.facts
        && a.state == b.state
        && a.converged_commit == b.converged_commit
        && a.failing == b.failing
        && a.grpc_addr == b.grpc_addr
        && a.heartbeat_interval_ms == b.heartbeat_interval_ms
        && a.public_key == b.public_key
}

/// Writes the latest of `records` to the registry whenever it changes,
/// until the minion drops the sender after its last record (stopped).
/// Announces the minion (`minion.online`) once its entry is first written;
/// a failing write is logged once per streak and tried again, with the
/// latest record, until it succeeds.
pub async fn write_registry(
    js: async_nats::jetstream::Context,
    mut records: watch::Receiver<MinionRecord>,
    events: events::EventBus,
    clock: BusClock,
) {
    let mut store: Option<Store> = None;
    let mut announced = false;
    let mut failing = false;
    loop {
        let closed = if failing {
            tokio::select! {
                changed = records.changed() => changed.is_err(),
                () = tokio::time::sleep(RETRY_AFTER) => false,
            }
        } else {
            records.changed().await.is_err()
        };
        let record = records.borrow_and_update().clone();
        // The last record (stopped) is written before the writer ends.
        if closed && record.status != MinionStatus::Stopped {
            return;
        }
        let written = tokio::time::timeout(WRITE_TIMEOUT, async {
            if store.is_none() {
                store = Some(registry::open_registry(&js).await?);
            }
            let Some(store) = &store else {
                return Ok(());
            };
            let asked = clock.local_now_ms();
            let revision = registry::put_record(store, &record).await?;
            let answered = clock.local_now_ms();
            learn_bus_time(store, &record, revision, &clock, asked, answered).await;
            Ok::<(), registry::RegistryError>(())
        })
        .await;
        match written {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!(minion = %record.id, "registry record written again");
                    failing = false;
                }
                if !announced {
                    announced = true;
                    tracing::info!(minion = %record.id, "registered in the fleet");
                    events
                        .emit(
                            "minion.online",
                            json!({ "minion": record.id, "roles": record.roles }),
                        )
                        .await;
                }
            }
            Ok(Err(err)) => {
                if !failing {
                    tracing::warn!(minion = %record.id, error = %provis_core::error_chain(&err), "registry record not written; calls are still answered");
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(minion = %record.id, "registry record not written in time; calls are still answered");
                }
                failing = true;
            }
        }
        if closed {
            return;
        }
    }
}

/// Reads the record just written back and learns the bus's time from the
/// time the server stored it. Only that very write counts: a replica that
/// lags behind may answer with an older entry, stored hours ago.
async fn learn_bus_time(
    store: &Store,
    record: &MinionRecord,
    revision: u64,
    clock: &BusClock,
    asked: i64,
    answered: i64,
) {
    let Ok(Some(entry)) = store.entry(record.id.as_str()).await else {
        return;
    };
    if entry.revision != revision {
        return;
    }
    let stored_ms =
        i64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap_or_default();
    let before = clock.offset_ms();
    let offset = clock.learn(stored_ms, asked, answered);
    if (offset - before).abs() > 1_000 {
        tracing::warn!(minion = %record.id, offset_ms = offset, "this machine's clock is off the bus's; going by the bus's");
    }
}

/// Sends heartbeats on `subject` until dropped: the sequence counts up, so
/// a master can tell a lost one.
#[derive(Debug)]
pub struct Heartbeats {
    nats: async_nats::Client,
    subject: String,
    interval_ms: u64,
    seq: u64,
}

impl Heartbeats {
    pub fn new(nats: async_nats::Client, subject: String, interval: Duration) -> Self {
        Self {
            nats,
            subject,
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            seq: 0,
        }
    }

    /// Sends the next heartbeat, saying how many calls run now; whether it
    /// went out. A lost one costs nothing but the next.
    pub async fn beat(&mut self, in_flight: usize) -> bool {
        self.seq += 1;
        let heartbeat = Heartbeat {
            seq: self.seq,
            interval_ms: self.interval_ms,
            in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
        };
        let Ok(payload) = serde_json::to_vec(&heartbeat) else {
            return false;
        };
        match self
            .nats
            .publish(self.subject.clone(), payload.into())
            .await
        {
            Ok(()) => true,
            Err(err) => {
                tracing::debug!(subject = %self.subject, error = %err, "heartbeat not sent");
                false
            }
        }
    }
}
