//! What the master knows of the fleet at this moment: the registry as its
//! watch last saw it, when it last heard from each minion (heartbeats, by
//! its own clock), and the state index fed from `PROVIS_STATE`. Shared by
//! the watchers that fill it and the requests that read it; selections are
//! made from it, so a call never reads the registry.
//!
//! Locks are taken in one order: registry, presence, index.

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use std::time::Instant;

use provis_core::envelope::now_unix_ms;
use provis_core::presence::{Liveness, Presence};
use provis_core::registry::MinionRecord;
use provis_core::selection::{Filter, Pick, RecordView, SelectError, Selection};
use provis_core::storage::STREAM_STATE;
use provis_core::{CallTarget, Subjects};

pub use provis_core::master_api::{IndexStats, RebuildReport};

use crate::state_index::{IndexLimits, StateIndex};

#[derive(Debug)]
pub struct FleetView {
    pub registry: RwLock<BTreeMap<String, MinionRecord>>,
    pub presence: Mutex<Presence>,
    pub index: Mutex<StateIndex>,
    rebuild: Mutex<Option<RebuildReport>>,
    /// True once the registry's current entries were all read.
    loaded: tokio::sync::watch::Sender<bool>,
    /// Heartbeats heard since the master started (for its metrics).
    pub heartbeats_heard: std::sync::atomic::AtomicU64,
}

impl FleetView {
    pub fn new(limits: IndexLimits) -> Self {
        Self {
            registry: RwLock::default(),
            presence: Mutex::new(Presence::new()),
            index: Mutex::new(StateIndex::new(limits)),
            rebuild: Mutex::new(None),
            loaded: tokio::sync::watch::Sender::new(false),
            heartbeats_heard: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Says the registry's current entries were all read.
    pub fn mark_registry_loaded(&self) {
        self.loaded.send_replace(true);
    }

    /// Resolves once the registry's current entries were all read.
    pub async fn registry_loaded(&self) {
        let mut loaded = self.loaded.subscribe();
        let _ = loaded.wait_for(|loaded| *loaded).await;
    }

    pub fn presence(&self) -> std::sync::MutexGuard<'_, Presence> {
        self.presence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `record`'s minion is live now, as this master heard it.
    pub fn is_live(&self, record: &MinionRecord) -> bool {
        self.presence().liveness(record, Instant::now()) == Liveness::Live
    }

    /// `line` of every registry record, in id order, with what this master
    /// heard of it: whether it is live, and how long ago it was last heard
    /// (ms), if ever since this master started.
    pub fn map_records<T>(
        &self,
        mut line: impl FnMut(&MinionRecord, bool, Option<u64>) -> T,
    ) -> Vec<(String, T)> {
        let registry = self.registry();
        let presence = self.presence();
        let now = Instant::now();
        registry
            .iter()
            .map(|(id, record)| {
                let live = presence.liveness(record, now) == Liveness::Live;
                let heard_ms_ago = presence.last_heard(id).map(|at| {
                    u64::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(u64::MAX)
                });
                (id.clone(), line(record, live, heard_ms_ago))
            })
            .collect()
    }

    /// Whom a call reaches, from this view: liveness by heartbeats heard,
    /// `--where` over the latest state samples.
    pub fn select(
        &self,
        target: &CallTarget,
        filter: Option<&Filter>,
        pick: Pick,
        seed: Option<u64>,
    ) -> Result<Selection, SelectError> {
        let registry = self.registry();
        let presence = self.presence();
        let index = self.index();
        let lens = MasterLens {
            presence: &presence,
            index: &index,
            now: Instant::now(),
        };
        provis_core::selection::select(registry.values(), target, filter, pick, seed, &lens)
    }

    pub fn index(&self) -> std::sync::MutexGuard<'_, StateIndex> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn registry(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, MinionRecord>> {
        self.registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, MinionRecord>> {
        self.registry
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn stats(&self, with_fingerprint: bool) -> IndexStats {
        let rebuild = *self
            .rebuild
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let index = self.index();
        IndexStats {
            minions: index.minions().count(),
            counters: index.counters(),
            approximate_bytes: index.approximate_bytes(),
            fingerprint: with_fingerprint.then(|| index.fingerprint()),
            rebuild,
        }
    }

    /// True once the index has caught up with the stream as it was at start.
    pub fn rebuilt(&self) -> bool {
        self.rebuild
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    /// Feeds the index from `PROVIS_STATE` until `stop` fires: the whole
    /// stream first (the rebuild), then every new sample. A broken consumer
    /// is recreated from the next sequence, so nothing is read twice.
    pub async fn follow_state(
        &self,
        js: jetstream::Context,
        subjects: Subjects,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut next_sequence = 1u64;
        let started = std::time::Instant::now();
        let prefix = format!("{}.state.", subjects.prefix());
        loop {
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                outcome = self.follow_from(&js, &subjects, &prefix, &mut next_sequence, started) => outcome,
            };
            if let Err(err) = outcome {
                tracing::warn!(error = %err, "state stream consumer ended; recreating it");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn follow_from(
        &self,
        js: &jetstream::Context,
        subjects: &Subjects,
        prefix: &str,
        next_sequence: &mut u64,
        started: std::time::Instant,
    ) -> Result<(), String> {
        let mut stream = js
            .get_stream(STREAM_STATE)
            .await
            .map_err(|e| e.to_string())?;
        let last_at_start = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .last_sequence;
        if !self.rebuilt() && last_at_start < *next_sequence {
            self.finish_rebuild(0, started);
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subjects.wildcard("state"),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: *next_sequence,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        let mut seen = 0u64;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let message = message.ok_or("state consumer closed")?.map_err(|e| e.to_string())?;
                    let sequence = message.info().map_err(|e| e.to_string())?.stream_sequence;
                    let minion = message.subject.as_str().strip_prefix(prefix).unwrap_or_default().to_owned();
                    self.index().ingest(&minion, &message.payload, now_unix_ms());
                    *next_sequence = sequence + 1;
                    seen += 1;
                    if !self.rebuilt() && sequence >= last_at_start {
                        self.finish_rebuild(seen, started);
                    }
                }
                _ = prune.tick() => self.index().prune(now_unix_ms()),
            }
        }
    }

    fn finish_rebuild(&self, samples: u64, started: std::time::Instant) {
        let report = RebuildReport {
            samples,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            samples,
            seconds = report.seconds,
            "state index rebuilt from the stream"
        );
        *self
            .rebuild
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(report);
    }
}

/// How the master sees a record when it selects.
struct MasterLens<'a> {
    presence: &'a Presence,
    index: &'a StateIndex,
    now: Instant,
}

impl RecordView for MasterLens<'_> {
    fn liveness(&self, record: &MinionRecord) -> Liveness {
        self.presence.liveness(record, self.now)
    }

    fn state<'r>(&'r self, record: &'r MinionRecord) -> &'r serde_json::Value {
        self.index
            .latest(record.id.as_str())
            .map_or(&record.state, |sample| &sample.state)
    }
}
