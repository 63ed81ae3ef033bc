//! Keeps the master's metrics current, and says whether it is ready.
//!
//! Calls are counted from the job records every call leaves
//! (`job.<id>.request`, `job.<id>.result.<minion>`), so a master counts the
//! fleet's calls whoever made them; the gauges (minions live, converged,
//! failing; convergence lag; events spooled) are taken from the master's
//! view every [`GAUGE_TICK`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;
use futures::future::BoxFuture;
use provis_core::Subjects;
use provis_core::jobs::JobResult;
use provis_core::outbox::Outbox;
use provis_telemetry::Metrics;
use provis_telemetry::metrics::{CommitLabel, StateLabel};
use tokio_util::sync::CancellationToken;

use crate::desired::PublishedConfig;
use crate::fleet_view::FleetView;
use crate::leadership::Leadership;

/// How often the gauges are taken from the view.
const GAUGE_TICK: Duration = Duration::from_secs(2);

/// How many characters of a commit label its lag.
const COMMIT_LABEL_LEN: usize = 12;

/// What the metrics are kept from.
#[derive(Debug)]
pub struct FleetMetrics {
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    pub view: Arc<FleetView>,
    /// The applied commit (none on a master that follows no repository).
    pub published: Option<tokio::sync::watch::Receiver<PublishedConfig>>,
    pub outbox: Outbox,
    pub metrics: Arc<Metrics>,
}

/// Counts calls and takes the gauges until `stop`.
pub async fn run(fleet: FleetMetrics, stop: CancellationToken) {
    let subscribed = async {
        let requests = fleet
            .nats
            .subscribe(fleet.subjects.job("*", "request"))
            .await?;
        let results = fleet
            .nats
            .subscribe(fleet.subjects.job("*", "result.*"))
            .await?;
        Ok::<_, async_nats::SubscribeError>((requests, results))
    };
    let (mut requests, mut results) = match subscribed.await {
        Ok(subscriptions) => subscriptions,
        Err(err) => {
            tracing::warn!(error = %err, "calls not counted in the metrics");
            return;
        }
    };
    let mut tick = tokio::time::interval(GAUGE_TICK);
    let mut taken = Taken::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            Some(_) = requests.next() => { fleet.metrics.calls_recorded.inc(); }
            Some(message) = results.next() => {
                if let Ok(result) = serde_json::from_slice::<JobResult>(&message.payload) {
                    let status = if result.status == "ok" { "ok" } else { "error" };
                    Metrics::count(&fleet.metrics.call_replies, status);
                    fleet.metrics.call_duration.observe(result.ms / 1000.0);
                }
            }
            _ = tick.tick() => fleet.take_gauges(&mut taken),
        }
    }
}

/// What the gauges were last set from: counters kept elsewhere are added by
/// difference, and the lag of a commit no longer applied is removed.
#[derive(Debug, Default)]
struct Taken {
    heartbeats: u64,
    failed_sends: u64,
    commit: Option<String>,
}

impl FleetMetrics {
    fn take_gauges(&self, taken: &mut Taken) {
        let metrics = &self.metrics;
        let heartbeats = self.view.heartbeats_heard.load(Ordering::Relaxed);
        metrics
            .heartbeats
            .get_or_create(&provis_telemetry::metrics::OutcomeLabel {
                outcome: "received",
            })
            .inc_by(heartbeats.saturating_sub(taken.heartbeats));
        taken.heartbeats = heartbeats;
        let outbox = self.outbox.stats();
        metrics
            .events_spooled
            .set(i64::try_from(outbox.waiting).unwrap_or(i64::MAX));
        metrics
            .jetstream_errors
            .inc_by(outbox.failed_sends.saturating_sub(taken.failed_sends));
        taken.failed_sends = outbox.failed_sends;

        let applied = self
            .published
            .as_ref()
            .and_then(|published| published.borrow().applied.clone());
        let commit = applied.as_ref().map(|a| a.commit.clone());
        let counts: Vec<(bool, bool, bool)> = self
            .view
            .map_records(|record, live, _| {
                let converged = commit.is_some() && record.converged_commit == commit;
                let failing = record
                    .failing
                    .as_ref()
                    .is_some_and(|failing| Some(&failing.commit) == commit.as_ref());
                (live, live && converged, failing)
            })
            .into_iter()
            .map(|(_, counted)| counted)
            .collect();
        let count = |pick: fn(&(bool, bool, bool)) -> bool| {
            i64::try_from(counts.iter().filter(|c| pick(c)).count()).unwrap_or(i64::MAX)
        };
        for (state, value) in [
            ("live", count(|c| c.0)),
            ("converged", count(|c| c.1)),
            ("failing", count(|c| c.2)),
        ] {
            metrics
                .minions
                .get_or_create(&StateLabel { state })
                .set(value);
        }
        let label = commit.as_ref().map(|commit| CommitLabel {
            commit: commit.chars().take(COMMIT_LABEL_LEN).collect(),
        });
        if taken.commit.as_ref() != label.as_ref().map(|l| &l.commit)
            && let Some(old) = taken.commit.take()
        {
            metrics.convergence_lag.remove(&CommitLabel { commit: old });
        }
        if let (Some(label), Some(applied)) = (label, applied) {
            let behind = counts
                .iter()
                .any(|(live, converged, _)| *live && !converged);
            let lag = if behind {
                let now = provis_core::envelope::now_unix_ms();
                now.saturating_sub(applied.applied_unix_ms) as f64 / 1000.0
            } else {
                0.0
            };
            metrics.convergence_lag.get_or_create(&label).set(lag);
            taken.commit = Some(label.commit);
        }
    }
}

/// Ready when connected to NATS, JetStream answers, and a leader is known.
#[derive(Debug)]
pub struct MasterReadiness {
    pub nats: async_nats::Client,
    pub leadership: Leadership,
}

impl provis_telemetry::Readiness for MasterReadiness {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            provis_core::readiness::connected(&self.nats)?;
            async_nats::jetstream::new(self.nats.clone())
                .query_account()
                .await
                .map_err(|err| format!("JetStream does not answer: {err}"))?;
            if self.leadership.current().leader.is_none() {
                return Err("no leading master is known".into());
            }
            Ok(())
        })
    }
}
