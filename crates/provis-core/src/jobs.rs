//! Jobs: every call is recorded in `PROVIS_JOBS`, so that who asked what of
//! whom, and what each minion answered, outlives the caller's terminal
//! (Salt's `jobs.lookup_jid`, Choria's audit).
//!
//! ```text
//! <prefix>.job.<job>.request          the caller: selection, caller, function, argument digest
//! <prefix>.job.<job>.result.<minion>  each minion, as it replies: status, time, result or error
//! <prefix>.job.<job>.summary          the caller, when the call ended: counts
//! <prefix>.job.<job>.queue            the caller of `--queue TTL`: the signed envelope, for
//!                                     the leading master to deliver to minions that return
//! <prefix>.job.<job>.waiting          the leading master: every minion a queued call waits for
//! <prefix>.job.<job>.batches          the leading master, asked by the caller of `--batch`: the
//!                                     batches and the signed envelope it runs them with
//! <prefix>.job.<job>.batch.<n>        the leading master, as batch n ends: every reply of it
//! ```
//!
//! A rolling call (`--batch`) is run by the leading master, not by the
//! caller: the caller signs one envelope (valid while the batches may take,
//! at most an hour) and hands the batches over; the master delivers them one
//! after the other, records each batch's replies as it ends and the summary
//! when the last ends. The caller, or `provis job ID --follow`, reads those
//! records; a master that takes the lease over resumes the first batch with
//! no record, delivering only to its minions with no result recorded.
//!
//! The job id is a UUID the caller draws once per call (every batch of a
//! rolling call carries it in its envelopes). Records are plain publishes
//! captured by the stream: recording never slows a call down, and a record
//! lost with a dying node loses that record only, not the call.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::{MinionReply, ReplyStatus};
use crate::storage::STREAM_JOBS;
use crate::subject::Subjects;

/// What the caller asked, as `<prefix>.job.<job>.request` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub job: String,
    pub caller: String,
    /// `service.method`.
    pub function: String,
    /// `all`, `role.<role>` or `minion.<id>[,…]`.
    pub target: String,
    /// The minions chosen (empty when the registry could not be read and
    /// the call went to whoever answers).
    pub selected: Vec<String>,
    /// `sha256:<hex>` of the arguments' JSON: what was asked, without
    /// keeping what may be a secret.
    pub args_digest: String,
    pub started_unix_ms: i64,
    pub timeout_ms: i64,
    /// Rolling batches, when the call ran in batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
}

/// One minion's answer, as `<prefix>.job.<job>.result.<minion>` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub job: String,
    pub minion: String,
    /// `ok` or `error`.
    pub status: String,
    /// How long the minion took, in milliseconds.
    pub ms: f64,
    pub at_unix_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

/// How the call ended, as the caller saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub job: String,
    pub ok: usize,
    pub failed: usize,
    pub no_reply: usize,
    pub ended_unix_ms: i64,
    /// Batches run, for a rolling call.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub batches: usize,
    /// Minions whose batch never ran (`--stop-on-failure`, or out of time).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: usize,
    /// Replies that could not be read or came twice.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub discarded: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A rolling call handed to the leading master, as
/// `<prefix>.job.<job>.batches` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobBatches {
    pub job: String,
    /// Minion ids, batch by batch, in the order they run.
    pub batches: Vec<Vec<String>>,
    /// How long each batch waits for replies.
    pub timeout_ms: i64,
    /// The pause between one batch's end and the next one's start.
    pub batch_wait_ms: i64,
    /// Start no further batch once more than this share (percent) of the
    /// minions called so far failed or did not reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_on_failure_pct: Option<f64>,
    /// Until when the envelope is valid: a batch not started by then is skipped.
    pub until_unix_ms: i64,
    /// The signed envelope, hex, delivered to each minion on its own subject.
    pub envelope: String,
}

impl JobBatches {
    pub fn envelope_bytes(&self) -> Option<Vec<u8>> {
        hex_decode(&self.envelope)
    }

    /// The envelope decoded, when it is one.
    pub fn call_envelope(&self) -> Option<provis_proto::v1::CallEnvelope> {
        use prost::Message as _;
        provis_proto::v1::CallEnvelope::decode(self.envelope_bytes()?.as_slice()).ok()
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.timeout_ms).unwrap_or(0))
    }

    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.batch_wait_ms).unwrap_or(0))
    }

    /// Whether, after `lines`, no further batch may start.
    pub fn stops_after(&self, lines: &[MinionReply]) -> bool {
        let Some(limit) = self.stop_on_failure_pct else {
            return false;
        };
        let failed = lines
            .iter()
            .filter(|l| matches!(l.status, ReplyStatus::Error | ReplyStatus::NoReply))
            .count();
        !lines.is_empty() && failed as f64 * 100.0 / lines.len() as f64 > limit
    }
}

/// One batch of a rolling call as it ended, as
/// `<prefix>.job.<job>.batch.<n>` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobBatchEnd {
    pub job: String,
    pub index: usize,
    pub ended_unix_ms: i64,
    /// Every minion of the batch: skipped when the batch never ran.
    pub replies: Vec<MinionReply>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub discarded: usize,
}

/// A call queued for minions that were away (`provis call --queue TTL`),
/// as `<prefix>.job.<job>.queue` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobQueue {
    pub job: String,
    /// Until when it may still be delivered.
    pub until_unix_ms: i64,
    /// When it was issued and how long it runs: it is delivered again
    /// only once the first delivery's timeout passed.
    pub issued_unix_ms: i64,
    pub timeout_ms: i64,
    /// `all`, `role.<role>` or `minion.<id>[,…]`.
    pub target: String,
    /// Every member of the target is waited for (no `--where`, no subset);
    /// else only `selected`.
    pub whole_target: bool,
    pub selected: Vec<String>,
    /// The signed envelope, hex: delivered as it is.
    pub envelope: String,
}

impl JobQueue {
    pub fn envelope_bytes(&self) -> Option<Vec<u8>> {
        hex_decode(&self.envelope)
    }
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

/// Every minion a queued call is meant for, as the leading master counts
/// them once the first delivery's timeout passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobWaiting {
    pub job: String,
    pub minions: Vec<String>,
}

/// One job as `list_jobs` finds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobListing {
    pub request: JobRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<JobSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<JobQueue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<JobBatches>,
}

/// Everything recorded of one job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub request: Option<JobRequest>,
    /// Minion → its result.
    pub results: BTreeMap<String, JobResult>,
    pub summary: Option<JobSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<JobQueue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<JobWaiting>,
    /// A rolling call's batches, as the master runs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<JobBatches>,
    /// Batch index → how it ended.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub batch_ends: BTreeMap<usize, JobBatchEnd>,
}

impl Job {
    /// Takes one record published on `<prefix>.job.<job>.<part>`.
    pub fn take_record(&mut self, part: &str, payload: &[u8]) {
        match part {
            "request" => self.request = serde_json::from_slice(payload).ok(),
            "summary" => self.summary = serde_json::from_slice(payload).ok(),
            "queue" => self.queue = serde_json::from_slice(payload).ok(),
            "waiting" => self.waiting = serde_json::from_slice(payload).ok(),
            "batches" => self.batches = serde_json::from_slice(payload).ok(),
            _ => {
                if let Some(index) = part.strip_prefix("batch.") {
                    if let (Ok(index), Ok(end)) = (
                        index.parse::<usize>(),
                        serde_json::from_slice::<JobBatchEnd>(payload),
                    ) && end.index == index
                    {
                        self.batch_ends.insert(index, end);
                    }
                } else if let Ok(result) = serde_json::from_slice::<JobResult>(payload) {
                    // Only the minion the subject names may publish there.
                    if part == format!("result.{}", result.minion) {
                        self.results.insert(result.minion.clone(), result);
                    }
                }
            }
        }
    }

    /// The minions it is meant for (the selected ones, and those a queued
    /// call waits for) with no result recorded.
    pub fn without_result(&self) -> Vec<String> {
        let meant: std::collections::BTreeSet<&String> = self
            .request
            .iter()
            .flat_map(|r| r.selected.iter())
            .chain(self.waiting.iter().flat_map(|w| w.minions.iter()))
            .collect();
        meant
            .into_iter()
            .filter(|id| !self.results.contains_key(id.as_str()))
            .cloned()
            .collect()
    }
}

/// Whether `id` may name a job in a subject: what a caller sends is checked
/// before a minion builds a subject from it.
pub fn valid_job_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `sha256:<hex>` of `args`.
pub fn args_digest(args: &Value) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, args.to_string().as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Publishes `record` on `subject`; a failure is logged, never the call's.
pub async fn record<T: Serialize>(nats: &async_nats::Client, subject: String, record: &T) {
    match serde_json::to_vec(record) {
        Ok(payload) => {
            if let Err(err) = nats.publish(subject, payload.into()).await {
                tracing::debug!(error = %err, "job record not published");
            }
        }
        Err(err) => tracing::debug!(error = %err, "job record not encoded"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("cannot read the job stream {STREAM_JOBS} (is a provis master running?)")]
    Stream(#[source] async_nats::Error),
    #[error("{0:?} is not a job id")]
    BadId(String),
}

/// How long reading waits for the stream to answer at all.
const STREAM_WAIT: Duration = Duration::from_secs(5);

/// Every record on `filter` since `since` (none: from the start), in order.
async fn read_records(
    nats: &async_nats::Client,
    filter: String,
    since: Option<SystemTime>,
) -> Result<Vec<async_nats::jetstream::Message>, JobsError> {
    crate::stream_read::read_since(nats, STREAM_JOBS, filter, since, None)
        .await
        .map_err(|err| JobsError::Stream(Box::new(err)))
}

fn boxed_error<T, E: std::error::Error + Send + Sync + 'static>(
    result: Result<T, E>,
) -> Result<T, async_nats::Error> {
    result.map_err(|err| Box::new(err) as async_nats::Error)
}

/// The records of one job as they come, from its first: what `--follow`
/// and a rolling call's caller read (through the stream, which every
/// identity that may read jobs can read, unlike the live subjects).
pub struct JobRecords {
    messages: consumer::pull::Ordered,
    prefix: String,
}

impl std::fmt::Debug for JobRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRecords")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl JobRecords {
    pub async fn open(
        nats: &async_nats::Client,
        subjects: &Subjects,
        id: &str,
    ) -> Result<Self, JobsError> {
        if !valid_job_id(id) {
            return Err(JobsError::BadId(id.to_owned()));
        }
        let js = jetstream::new(nats.clone());
        let config = consumer::pull::OrderedConfig {
            filter_subject: subjects.job(id, ">"),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        let open = async {
            let stream = js.get_stream(STREAM_JOBS).await?;
            let consumer = boxed_error(stream.create_consumer(config).await)?;
            boxed_error(consumer.messages().await)
        };
        let messages = tokio::time::timeout(STREAM_WAIT, open)
            .await
            .map_err(|_| JobsError::Stream("no answer in time".into()))?
            .map_err(JobsError::Stream)?;
        Ok(Self {
            messages,
            prefix: subjects.job(id, ""),
        })
    }

    /// The next record as (part after `job.<id>.`, payload), or none
    /// within `wait`.
    pub async fn next_within(
        &mut self,
        wait: Duration,
    ) -> Result<Option<(String, bytes::Bytes)>, JobsError> {
        match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(JobsError::Stream("the job stream ended".into())),
            Ok(Some(Err(err))) => Err(JobsError::Stream(Box::new(err))),
            Ok(Some(Ok(message))) => {
                let part = message
                    .subject
                    .strip_prefix(&self.prefix)
                    .unwrap_or_default()
                    .to_owned();
                Ok(Some((part, message.payload.clone())))
            }
        }
    }
}

/// Everything recorded of job `id`.
pub async fn read_job(
    nats: &async_nats::Client,
    subjects: &Subjects,
    id: &str,
) -> Result<Job, JobsError> {
    if !valid_job_id(id) {
        return Err(JobsError::BadId(id.to_owned()));
    }
    let mut job = Job::default();
    for message in read_records(nats, subjects.job(id, ">"), None).await? {
        let part = message
            .subject
            .strip_prefix(&subjects.job(id, ""))
            .unwrap_or_default();
        job.take_record(part, &message.payload);
    }
    Ok(job)
}

/// Every job started since `since`, the oldest first, with its summary
/// when the caller recorded one (and its queue, when queued).
pub async fn list_jobs(
    nats: &async_nats::Client,
    subjects: &Subjects,
    since: SystemTime,
) -> Result<Vec<JobListing>, JobsError> {
    let mut jobs: Vec<JobListing> = Vec::new();
    let mut index = BTreeMap::new();
    for message in read_records(nats, subjects.job("*", "*"), Some(since)).await? {
        let payload = &message.payload;
        if message.subject.ends_with(".request") {
            if let Ok(request) = serde_json::from_slice::<JobRequest>(payload) {
                index.insert(request.job.clone(), jobs.len());
                jobs.push(JobListing {
                    request,
                    summary: None,
                    queue: None,
                    batches: None,
                });
            }
        } else if message.subject.ends_with(".queue") {
            if let Ok(queue) = serde_json::from_slice::<JobQueue>(payload)
                && let Some(&at) = index.get(&queue.job)
            {
                jobs[at].queue = Some(queue);
            }
        } else if message.subject.ends_with(".batches") {
            if let Ok(batches) = serde_json::from_slice::<JobBatches>(payload)
                && let Some(&at) = index.get(&batches.job)
            {
                jobs[at].batches = Some(batches);
            }
        } else if let Ok(summary) = serde_json::from_slice::<JobSummary>(payload)
            && let Some(&at) = index.get(&summary.job)
        {
            jobs[at].summary = Some(summary);
        }
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_survive_hex() {
        let bytes = vec![0u8, 1, 127, 128, 255];
        assert_eq!(hex_decode(&hex_encode(&bytes)), Some(bytes));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
    }

    #[test]
    fn only_plain_ids_name_a_job() {
        assert!(valid_job_id("0b1c6f1e-58f4-4a3b-9b61-1f7a2b3c4d5e"));
        for bad in ["", "a.b", "a*", "a>", "a b", &"x".repeat(65)] {
            assert!(!valid_job_id(bad), "{bad:?}");
        }
    }
}
