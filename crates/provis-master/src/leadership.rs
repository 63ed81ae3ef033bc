//! Which master leads. Any number of masters may run: all admit
//! connections and answer reads, and the one holding the lease in
//! `provis_leader` does the work that writes (applying git, assignments,
//! offline marks). The lease is a key-value entry created with
//! compare-and-set and renewed every second; the bucket keeps entries
//! [`LEASE_TTL`] at most (judged by the servers' clock), so a leader that
//! dies loses its lease within that and another master takes it at its next
//! attempt. A leader that stops hands the lease back at once.
//!
//! The lease's revision when it was taken is the leader's *term*: every
//! desired-state entry the leader signs carries it, and minions refuse an
//! entry of an older term than one they took, so a deposed leader that has
//! not noticed yet cannot overwrite what its successor wrote.
//!
//! Each master also keeps `master.<id>` in the bucket (its version, since
//! when, whether it leads), so `provis status` lists every master.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use provis_core::envelope::now_unix_ms;
use provis_core::storage::BUCKET_LEADER;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use provis_core::master_api::MasterPresence;

/// How long the bucket keeps an entry that is not renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
/// How often the leader renews and the others try to take the lease.
const RENEW: Duration = Duration::from_millis(500);
/// How long one lease operation may take before it counts as failed.
const OPERATION_TIMEOUT: Duration = Duration::from_millis(1_000);
const LEASE_KEY: &str = "lease";

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    master: String,
    since_unix_ms: i64,
}

/// Whether this master leads, and in which term.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// The term this master leads in (the lease's revision when taken);
    /// none while it does not lead.
    pub term: Option<u64>,
    /// Who leads, as far as this master knows.
    pub leader: Option<String>,
}

impl LeaderState {
    pub fn leading(&self) -> bool {
        self.term.is_some()
    }
}

/// A master's view of the lease, kept current by [`campaign`].
#[derive(Debug, Clone)]
pub struct Leadership {
    state: watch::Receiver<LeaderState>,
}

impl Leadership {
    /// The state now.
    pub fn current(&self) -> LeaderState {
        self.state.borrow().clone()
    }

    /// The term this master leads in, if it leads now.
    pub fn term(&self) -> Option<u64> {
        self.state.borrow().term
    }

    /// A receiver that sees every change.
    pub fn watch(&self) -> watch::Receiver<LeaderState> {
        self.state.clone()
    }

    /// Runs `work` each time this master takes the lease, until `stop`;
    /// `work` returns when it stops leading (or gives up, to be run again
    /// while it still leads).
    pub async fn each_term<F, Fut>(&self, stop: &CancellationToken, mut work: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut leading = self.watch();
        loop {
            while !leading.borrow_and_update().leading() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = leading.changed() => if changed.is_err() { return },
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = work() => {}
            }
        }
    }

    /// A leadership that never changes: for a lone master without the
    /// bucket (tests of single parts).
    pub fn fixed(state: LeaderState) -> Self {
        Self {
            state: watch::channel(state).1,
        }
    }
}

/// Opens (or creates, at `replicas` copies) the lease bucket.
pub async fn open_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<kv::Store, crate::storage::StorageError> {
    crate::storage::ensure_bucket(
        js,
        kv::Config {
            bucket: BUCKET_LEADER.to_owned(),
            description: "the leading master's lease; every master's presence".to_owned(),
            history: 1,
            max_age: LEASE_TTL,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await
}

/// Campaigns for the lease as master `id` until `stop` fires, then hands
/// it back if held. Returns at once with the [`Leadership`] it keeps
/// current; the campaign runs on `spawn`.
pub fn campaign(
    store: kv::Store,
    id: String,
    stop: CancellationToken,
) -> (
    Leadership,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (state, receiver) = watch::channel(LeaderState::default());
    let campaign = run(store, id, state, stop);
    (Leadership { state: receiver }, campaign)
}

async fn run(
    store: kv::Store,
    id: String,
    state: watch::Sender<LeaderState>,
    stop: CancellationToken,
) {
    let started = now_unix_ms();
    // Held: (term, revision of the last renewal).
    let mut held: Option<(u64, u64)> = None;
    let mut ticks = tokio::time::interval(RENEW);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let lease = Lease {
            master: id.clone(),
            since_unix_ms: now_unix_ms(),
        };
        let Ok(value) = serde_json::to_vec(&lease) else {
            continue;
        };
        held = match held {
            Some((term, revision)) => {
                match bounded(store.update(LEASE_KEY, value.into(), revision)).await {
                    Ok(revision) => Some((term, revision)),
                    Err(reason) => {
                        tracing::warn!(%reason, term, "lost the lease; no longer leading");
                        None
                    }
                }
            }
            None => match bounded(store.create(LEASE_KEY, value.into())).await {
                Ok(revision) => {
                    tracing::info!(term = revision, "took the lease: leading");
                    Some((revision, revision))
                }
                Err(_) => None,
            },
        };
        let leader = match held {
            Some(_) => Some(id.clone()),
            None => current_leader(&store).await,
        };
        state.send_if_modified(|current| {
            let next = LeaderState {
                term: held.map(|(term, _)| term),
                leader,
            };
            let changed = *current != next;
            *current = next;
            changed
        });
        let presence = MasterPresence {
            id: id.clone(),
            version: provis_core::VERSION.to_owned(),
            started_unix_ms: started,
            leading: held.is_some(),
            term: held.map(|(term, _)| term),
        };
        if let Ok(value) = serde_json::to_vec(&presence)
            && let Err(reason) = bounded(store.put(format!("master.{id}"), value.into())).await
        {
            tracing::debug!(%reason, "presence not written");
        }
    }
    // Stopping: the lease goes back at once, so another master need not
    // wait for it to expire.
    if let Some((term, revision)) = held {
        state.send_replace(LeaderState::default());
        match bounded(store.delete_expect_revision(LEASE_KEY, Some(revision))).await {
            Ok(()) => tracing::info!(term, "handed the lease back"),
            Err(reason) => tracing::warn!(%reason, "lease not handed back; it expires on its own"),
        }
    }
    let _ = bounded(store.delete(format!("master.{id}"))).await;
}

/// Who holds the lease now, if anyone.
async fn current_leader(store: &kv::Store) -> Option<String> {
    let value = bounded(store.get(LEASE_KEY)).await.ok()??;
    serde_json::from_slice::<Lease>(&value)
        .ok()
        .map(|lease| lease.master)
}

/// Every master present in the bucket, the leader first.
pub async fn masters(store: &kv::Store) -> Vec<MasterPresence> {
    let Ok(entries) = provis_core::kv_snapshot::read_all(store).await else {
        return Vec::new();
    };
    let mut masters: Vec<MasterPresence> = entries
        .iter()
        .filter(|(key, _)| key.starts_with("master."))
        .filter_map(|(_, value)| serde_json::from_slice(value).ok())
        .collect();
    masters.sort_by(|a, b| b.leading.cmp(&a.leading).then(a.id.cmp(&b.id)));
    masters
}

/// `operation` within [`OPERATION_TIMEOUT`], its error as text.
async fn bounded<T, E: std::error::Error + 'static>(
    operation: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(provis_core::error_chain(&err)),
        Err(_) => Err(format!("no answer within {OPERATION_TIMEOUT:?}")),
    }
}
