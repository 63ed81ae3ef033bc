//! Calls queued for minions that were away (`provis call --queue TTL`): the
//! leading master keeps every queued job until its time is up, and when a
//! minion it waits for is live again (and the first delivery's timeout has
//! passed), publishes the caller's signed envelope, unchanged, on that
//! minion's own call subject. The minion checks it like any call (the
//! caller's signature, the queue time it signed, the replay cache) and
//! records its result under the job, which is how the master learns it
//! need not deliver again.
//!
//! State is the job stream itself: a master that takes the lease reads the
//! queued jobs still in time and their results, so none is lost with a
//! master and none is delivered to a minion that already answered.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use provis_core::jobs::{JobQueue, JobResult, list_jobs, read_job};
use provis_core::{CallTarget, MinionId, Subjects};
use tokio_util::sync::CancellationToken;

use crate::fleet_view::FleetView;
use crate::leadership::Leadership;

/// How often waiting minions are looked at.
const DELIVERY_TICK: Duration = Duration::from_secs(1);

/// A delivery with no result after its timeout and this is tried again
/// (the minion went away again, or the delivery was lost).
const REDELIVER_GRACE: Duration = Duration::from_secs(5);

/// One queued job and whom it still waits for.
#[derive(Debug)]
struct Queued {
    queue: JobQueue,
    target: Option<CallTarget>,
    answered: BTreeSet<String>,
    /// Minion → when it was last delivered to.
    delivered: BTreeMap<String, tokio::time::Instant>,
    /// Whether whom it waits for was recorded (for `provis job --follow`).
    announced: bool,
}

impl Queued {
    fn new(queue: JobQueue) -> Self {
        Self {
            target: CallTarget::parse_subject(&queue.target).ok(),
            queue,
            answered: BTreeSet::new(),
            delivered: BTreeMap::new(),
            announced: false,
        }
    }

    /// Whom it is meant for: the selected minions, and with a whole
    /// target every member the registry knows.
    fn meant_for(&self, view: &FleetView) -> BTreeSet<MinionId> {
        let registry = view.registry();
        let mut ids: BTreeSet<MinionId> = self
            .queue
            .selected
            .iter()
            .filter_map(|id| id.parse().ok())
            .collect();
        if self.queue.whole_target
            && let Some(target) = &self.target
        {
            ids.extend(
                registry
                    .values()
                    .filter(|record| record.is_addressed_by(target))
                    .map(|record| record.id.clone()),
            );
        }
        ids
    }

    /// Whom it still waits for.
    fn waiting(&self, view: &FleetView) -> Vec<MinionId> {
        self.meant_for(view)
            .into_iter()
            .filter(|id| !self.answered.contains(id.as_str()))
            .collect()
    }
}

/// Delivers queued calls while this master leads, until `stop` fires.
pub async fn deliver(
    nats: async_nats::Client,
    subjects: Subjects,
    view: Arc<FleetView>,
    leadership: Leadership,
    stop: CancellationToken,
) {
    leadership
        .each_term(&stop, || {
            deliver_while_leading(&nats, &subjects, &view, &leadership)
        })
        .await;
}

async fn deliver_while_leading(
    nats: &async_nats::Client,
    subjects: &Subjects,
    view: &FleetView,
    leadership: &Leadership,
) {
    let subscribed = async {
        let queues = nats.subscribe(subjects.job("*", "queue")).await?;
        let results = nats.subscribe(subjects.job("*", "result.*")).await?;
        Ok::<_, async_nats::SubscribeError>((queues, results))
    };
    let (mut queues, mut results) = match subscribed.await {
        Ok(subscriptions) => subscriptions,
        Err(err) => {
            tracing::warn!(error = %err, "queued calls not followed; trying again");
            tokio::time::sleep(DELIVERY_TICK).await;
            return;
        }
    };
    // Subscribed first, then read back: nothing falls between the two.
    let mut queued = recover(nats, subjects).await;
    let mut tick = tokio::time::interval(DELIVERY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while leadership.term().is_some() {
        tokio::select! {
            Some(message) = queues.next() => {
                if let Ok(queue) = serde_json::from_slice::<JobQueue>(&message.payload) {
                    tracing::info!(job = %queue.job, target = %queue.target, "call queued for minions that are away");
                    queued.entry(queue.job.clone()).or_insert_with(|| Queued::new(queue));
                }
            }
            Some(message) = results.next() => {
                if let Ok(result) = serde_json::from_slice::<JobResult>(&message.payload)
                    && message.subject.as_str() == subjects.job(&result.job, &format!("result.{}", result.minion))
                    && let Some(job) = queued.get_mut(&result.job)
                {
                    job.answered.insert(result.minion);
                }
            }
            _ = tick.tick() => deliver_due(nats, subjects, view, &mut queued).await,
        }
    }
}

/// The queued jobs still in time, with who already answered each.
async fn recover(nats: &async_nats::Client, subjects: &Subjects) -> BTreeMap<String, Queued> {
    let since = SystemTime::now()
        .checked_sub(provis_core::call_auth::MAX_CALL_LIFETIME)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let now = provis_core::envelope::now_unix_ms();
    let listed = match list_jobs(nats, subjects, since).await {
        Ok(listed) => listed,
        Err(err) => {
            tracing::warn!(error = %provis_core::error_chain(&err), "queued calls not recovered");
            return BTreeMap::new();
        }
    };
    let mut queued = BTreeMap::new();
    for queue in listed.into_iter().filter_map(|listing| listing.queue) {
        if queue.until_unix_ms <= now {
            continue;
        }
        let mut job = Queued::new(queue);
        if let Ok(recorded) = read_job(nats, subjects, &job.queue.job).await {
            job.answered.extend(recorded.results.into_keys());
        }
        queued.insert(job.queue.job.clone(), job);
    }
    if !queued.is_empty() {
        tracing::info!(jobs = queued.len(), "queued calls taken over");
    }
    queued
}

/// Delivers every queued job to each minion it waits for that is live,
/// once its first delivery had time to answer; forgets jobs out of time.
async fn deliver_due(
    nats: &async_nats::Client,
    subjects: &Subjects,
    view: &FleetView,
    queued: &mut BTreeMap<String, Queued>,
) {
    let now_ms = provis_core::envelope::now_unix_ms();
    queued.retain(|_, job| job.queue.until_unix_ms > now_ms);
    let now = tokio::time::Instant::now();
    for job in queued.values_mut() {
        let timeout = Duration::from_millis(u64::try_from(job.queue.timeout_ms).unwrap_or(0));
        if now_ms
            < job
                .queue
                .issued_unix_ms
                .saturating_add(job.queue.timeout_ms)
        {
            continue; // the first delivery may still be answered
        }
        let Some(envelope) = job.queue.envelope_bytes() else {
            continue;
        };
        if !job.announced {
            let waiting = provis_core::jobs::JobWaiting {
                job: job.queue.job.clone(),
                minions: job
                    .meant_for(view)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            };
            provis_core::jobs::record(nats, subjects.job(&job.queue.job, "waiting"), &waiting)
                .await;
            job.announced = true;
        }
        for id in job.waiting(view) {
            let live = view
                .registry()
                .get(id.as_str())
                .is_some_and(|record| view.is_live(record));
            let recently = job
                .delivered
                .get(id.as_str())
                .is_some_and(|at| now.duration_since(*at) < timeout + REDELIVER_GRACE);
            if !live || recently {
                continue;
            }
            tracing::info!(job = %job.queue.job, minion = %id, "delivering a queued call");
            // Replies go nowhere: the minion's result is in the job.
            let inbox = nats.new_inbox();
            if let Err(err) = nats
                .publish_with_reply(subjects.minion_call(&id), inbox, envelope.clone().into())
                .await
            {
                tracing::warn!(job = %job.queue.job, minion = %id, error = %err, "queued call not delivered");
                continue;
            }
            job.delivered.insert(id.to_string(), now);
        }
    }
}
