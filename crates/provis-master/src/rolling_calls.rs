//! Rolling calls (`provis call --batch`), run by the leading master so that
//! they outlive the caller's terminal: the caller hands over its batches
//! and one envelope it signed for all of them (`job.batches`); the leader
//! records them in the job stream, delivers one batch after the other to
//! each minion's own subject, records each batch's replies as it ends
//! (`job.<id>.batch.<n>`) and the summary after the last.
//!
//! State is the job stream: a master that takes the lease reads every
//! rolling call with no summary and resumes at its first batch with no
//! record, delivering only to the minions of that batch with no result
//! recorded, so no minion is called twice and none is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use futures::StreamExt as _;
use provis_core::client::{Delivery, MinionReply, ReplyError, ReplyStatus};
use provis_core::jobs::{Job, JobBatchEnd, JobBatches, JobResult, JobSummary, list_jobs, read_job};
use provis_core::master_api::ApiError;
use provis_core::{MinionId, Subjects};
use tokio_util::sync::CancellationToken;

use crate::fleet_view::FleetView;
use crate::leadership::Leadership;

/// How often the runner looks whether it still leads.
const LEADING_TICK: Duration = Duration::from_secs(1);

/// Attempts at recording a batch's end before the runner gives the job up
/// to the next leader.
const RECORD_ATTEMPTS: usize = 5;

/// The most minions one rolling call may name.
const MOST_MINIONS: usize = 100_000;

/// Records a rolling call handed over by its caller, once it is well
/// formed; the runner (on this master, while it leads) picks it up from
/// the stream.
pub async fn take(
    nats: &async_nats::Client,
    subjects: &Subjects,
    batches: &JobBatches,
) -> Result<(), ApiError> {
    check(batches)?;
    let payload = serde_json::to_vec(batches)
        .map_err(|err| ApiError::failed(format!("cannot encode the batches: {err}")))?;
    let js = jetstream::new(nats.clone());
    let subject = subjects.job(&batches.job, "batches");
    let acked = async { js.publish(subject, payload.into()).await?.await };
    acked.await.map_err(|err| {
        ApiError::failed(format!(
            "cannot record the rolling call in the job stream: {err}"
        ))
    })?;
    Ok(())
}

/// What makes a hand-over runnable: a plain job id, batches that name
/// minions, and an envelope of that job valid no longer than a call lives.
fn check(batches: &JobBatches) -> Result<(), ApiError> {
    if !provis_core::jobs::valid_job_id(&batches.job) {
        return Err(ApiError::usage(format!(
            "{:?} is not a job id",
            batches.job
        )));
    }
    let named: usize = batches.batches.iter().map(Vec::len).sum();
    if batches.batches.iter().any(Vec::is_empty) || named == 0 || named > MOST_MINIONS {
        return Err(ApiError::usage(format!(
            "a rolling call names 1 to {MOST_MINIONS} minions, in batches of at least one"
        )));
    }
    if let Some(bad) = batches
        .batches
        .iter()
        .flatten()
        .find(|id| id.parse::<MinionId>().is_err())
    {
        return Err(ApiError::usage(format!("{bad:?} is not a minion id")));
    }
    let envelope = batches
        .call_envelope()
        .ok_or_else(|| ApiError::usage("the envelope is not a hex-encoded call envelope"))?;
    if envelope.job_id != batches.job || envelope.queue_until_unix_ms != batches.until_unix_ms {
        return Err(ApiError::usage(
            "the envelope is not the rolling call's (another job or another time window)",
        ));
    }
    let lifetime =
        i64::try_from(provis_core::call_auth::MAX_CALL_LIFETIME.as_millis()).unwrap_or(i64::MAX);
    if batches
        .until_unix_ms
        .saturating_sub(envelope.issued_unix_ms)
        > lifetime
    {
        return Err(ApiError::usage(
            "the rolling call's window is longer than a call lives",
        ));
    }
    Ok(())
}

/// Runs rolling calls while this master leads, until `stop` fires.
pub async fn run(
    nats: async_nats::Client,
    subjects: Subjects,
    view: Arc<FleetView>,
    leadership: Leadership,
    stop: CancellationToken,
) {
    leadership
        .each_term(&stop, || {
            run_while_leading(&nats, &subjects, &view, &leadership)
        })
        .await;
}

async fn run_while_leading(
    nats: &async_nats::Client,
    subjects: &Subjects,
    view: &Arc<FleetView>,
    leadership: &Leadership,
) {
    let mut handed = match nats.subscribe(subjects.job("*", "batches")).await {
        Ok(subscription) => subscription,
        Err(err) => {
            tracing::warn!(error = %err, "rolling calls not followed; trying again");
            tokio::time::sleep(LEADING_TICK).await;
            return;
        }
    };
    // Subscribed first, then read back: nothing falls between the two.
    let mut started = BTreeSet::new();
    // Dropped when this master stops leading: its runs end with it, and
    // the next leader resumes them from their records.
    let mut running = tokio::task::JoinSet::new();
    for job in unfinished(nats, subjects).await {
        if started.insert(job.clone()) {
            running.spawn(run_job(nats.clone(), subjects.clone(), view.clone(), job));
        }
    }
    let mut tick = tokio::time::interval(LEADING_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while leadership.term().is_some() {
        tokio::select! {
            Some(message) = handed.next() => {
                if let Ok(batches) = serde_json::from_slice::<JobBatches>(&message.payload)
                    && message.subject.as_str() == subjects.job(&batches.job, "batches")
                    && started.insert(batches.job.clone())
                {
                    tracing::info!(job = %batches.job, batches = batches.batches.len(), "rolling call taken");
                    running.spawn(run_job(nats.clone(), subjects.clone(), view.clone(), batches.job));
                }
            }
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = tick.tick() => {}
        }
    }
}

/// Rolling calls of the last call lifetime with no summary.
async fn unfinished(nats: &async_nats::Client, subjects: &Subjects) -> Vec<String> {
    let since = SystemTime::now()
        .checked_sub(provis_core::call_auth::MAX_CALL_LIFETIME)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    match list_jobs(nats, subjects, since).await {
        Ok(listed) => listed
            .into_iter()
            .filter(|job| job.batches.is_some() && job.summary.is_none())
            .map(|job| job.request.job)
            .collect(),
        Err(err) => {
            tracing::warn!(error = %provis_core::error_chain(&err), "rolling calls not recovered");
            Vec::new()
        }
    }
}

/// Runs job `id` from its first batch with no record to its summary.
async fn run_job(nats: async_nats::Client, subjects: Subjects, view: Arc<FleetView>, id: String) {
    let job = match read_job(&nats, &subjects, &id).await {
        Ok(job) => job,
        Err(err) => {
            tracing::warn!(job = %id, error = %provis_core::error_chain(&err), "rolling call not read back");
            return;
        }
    };
    let Some(batches) = job.batches.clone() else {
        return;
    };
    let runner = BatchRunner {
        nats,
        subjects,
        view,
        batches,
    };
    if let Err(err) = runner.run(job).await {
        tracing::warn!(job = %id, error = %err, "rolling call left to the next leader");
    }
}

struct BatchRunner {
    nats: async_nats::Client,
    subjects: Subjects,
    view: Arc<FleetView>,
    batches: JobBatches,
}

impl BatchRunner {
    async fn run(&self, job: Job) -> Result<(), String> {
        let (Some(payload), Some(envelope)) =
            (self.batches.envelope_bytes(), self.batches.call_envelope())
        else {
            return Err("the envelope does not decode".into());
        };
        let call_id = envelope.call_id;
        let payload = bytes::Bytes::from(payload);
        let mut lines: Vec<MinionReply> = Vec::new();
        let mut discarded = 0;
        let mut next = 0;
        while let Some(end) = job.batch_ends.get(&next) {
            lines.extend(end.replies.iter().cloned());
            discarded += end.discarded;
            next += 1;
        }
        if next > 0 {
            tracing::info!(job = %self.batches.job, batch = next, "rolling call resumed");
        }
        let mut last_end = job
            .batch_ends
            .get(&next.wrapping_sub(1))
            .map(|end| end.ended_unix_ms);
        let mut ran = next;
        for (index, batch) in self.batches.batches.iter().enumerate().skip(next) {
            if self.batches.stops_after(&lines) {
                break;
            }
            if let Some(ended) = last_end {
                let wait_until = ended.saturating_add(self.batches.batch_wait_ms);
                let wait = wait_until.saturating_sub(provis_core::envelope::now_unix_ms());
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
                }
            }
            let now = provis_core::envelope::now_unix_ms();
            if now.saturating_add(self.batches.timeout_ms) > self.batches.until_unix_ms {
                tracing::warn!(job = %self.batches.job, batch = index, "rolling call out of time: the rest is skipped");
                break;
            }
            let (replies, batch_discarded) = self
                .deliver(batch, &job.results, &call_id, &payload)
                .await?;
            let end = JobBatchEnd {
                job: self.batches.job.clone(),
                index,
                ended_unix_ms: provis_core::envelope::now_unix_ms(),
                replies,
                discarded: batch_discarded,
            };
            self.record(&format!("batch.{index}"), &self.fitting(end.clone()))
                .await?;
            last_end = Some(end.ended_unix_ms);
            lines.extend(end.replies);
            discarded += batch_discarded;
            ran = index + 1;
        }
        let named: usize = self.batches.batches.iter().map(Vec::len).sum();
        let count = |status| lines.iter().filter(|l| l.status == status).count();
        let summary = JobSummary {
            job: self.batches.job.clone(),
            ok: count(ReplyStatus::Ok),
            failed: count(ReplyStatus::Error),
            no_reply: count(ReplyStatus::NoReply),
            ended_unix_ms: provis_core::envelope::now_unix_ms(),
            batches: ran,
            skipped: named.saturating_sub(lines.len()),
            discarded,
        };
        self.record("summary", &summary).await?;
        tracing::info!(job = %self.batches.job, batches = ran, ok = summary.ok, failed = summary.failed, no_reply = summary.no_reply, skipped = summary.skipped, "rolling call ended");
        Ok(())
    }

    /// Calls the minions of `batch` with no result recorded (a batch begun
    /// by a master that lost the lease keeps what it got), and returns
    /// every minion's line.
    async fn deliver(
        &self,
        batch: &[String],
        recorded: &BTreeMap<String, JobResult>,
        call_id: &str,
        payload: &bytes::Bytes,
    ) -> Result<(Vec<MinionReply>, usize), String> {
        let mut lines: Vec<MinionReply> = batch
            .iter()
            .filter_map(|id| recorded.get(id))
            .map(line_of)
            .collect();
        let waiting: Vec<MinionId> = batch
            .iter()
            .filter(|id| !recorded.contains_key(id.as_str()))
            .filter_map(|id| id.parse().ok())
            .collect();
        if waiting.is_empty() {
            return Ok((lines, 0));
        }
        let keys: BTreeMap<String, String> = {
            let registry = self.view.registry();
            waiting
                .iter()
                .filter_map(|id| {
                    let key = registry.get(id.as_str())?.public_key.clone()?;
                    Some((id.to_string(), key))
                })
                .collect()
        };
        let delivery = Delivery {
            subjects: waiting
                .iter()
                .map(|id| self.subjects.minion_call(id))
                .collect(),
            payload: payload.clone(),
            call_id: call_id.to_owned(),
            timeout: self.batches.timeout(),
        };
        let (replies, discarded) = delivery
            .gather(&self.nats, &waiting, &[], &keys, &mut |_| {})
            .await
            .map_err(|err| provis_core::error_chain(&err))?;
        lines.extend(replies);
        Ok((lines, discarded))
    }

    /// `end` as it fits in one message: results left out (each is in the
    /// minion's own record) when they would not.
    fn fitting(&self, mut end: JobBatchEnd) -> JobBatchEnd {
        let budget = self.nats.server_info().max_payload.max(4_096) * 3 / 4;
        let size = serde_json::to_vec(&end).map_or(usize::MAX, |bytes| bytes.len());
        if size > budget {
            for reply in &mut end.replies {
                reply.result = None;
                if let Some(error) = &mut reply.error {
                    error.stack = None;
                }
            }
        }
        end
    }

    /// Records `record` on `job.<id>.<part>`, acknowledged by the stream.
    async fn record<T: serde::Serialize>(&self, part: &str, record: &T) -> Result<(), String> {
        let payload = serde_json::to_vec(record).map_err(|err| err.to_string())?;
        let js = jetstream::new(self.nats.clone());
        let subject = self.subjects.job(&self.batches.job, part);
        let mut last = String::new();
        for attempt in 0..RECORD_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let published = async {
                js.publish(subject.clone(), payload.clone().into())
                    .await?
                    .await
            };
            match published.await {
                Ok(_) => return Ok(()),
                Err(err) => last = err.to_string(),
            }
        }
        Err(format!("cannot record {part}: {last}"))
    }
}

/// A result a minion recorded, as a line of the call.
fn line_of(result: &JobResult) -> MinionReply {
    MinionReply {
        minion: result.minion.clone(),
        status: if result.status == "ok" {
            ReplyStatus::Ok
        } else {
            ReplyStatus::Error
        },
        ms: Some(result.ms),
        result: result.result.clone(),
        error: result.error.as_ref().map(|error| ReplyError {
            code: error.code.clone(),
            message: error.message.clone(),
            stack: None,
        }),
    }
}
