//! The one public API for calls: the CLI, the master and tests all select
//! and fan out through [`Client`].
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use provis_core::{CallRequest, CallTarget, Client, Subjects};
//! use provis_core::client::{CallPlan, connect_nats};
//! use provis_core::selection::{Filter, Pick};
//!
//! let nats = connect_nats(&provis_core::FleetContext::default(), "my-tool").await?;
//! let client = Client::new(nats, Subjects::default(), "operator:alice");
//! let request = CallRequest::parse_function("site.enable", serde_json::json!({"by": "alice"}), Duration::from_secs(5))?;
//!
//! // 30% of the web servers with less than 10% free memory, the same 30% every time.
//! let target = CallTarget::parse_subject("role.web")?;
//! let filter = Filter::parse("state.mem.free_pct < 10.0")?;
//! let selection = client.select(&target, Some(&filter), Pick::Percent(30.0), Some(1)).await?;
//! let report = client
//!     .call_selected(&target, &selection, &request, &CallPlan::default(), &mut |reply| println!("{reply:?}"))
//!     .await?;
//! println!("{} ok of {}", report.summary.ok, report.summary.selected);
//! # Ok(()) }
//! ```
//!
//! A call to a role or to the whole fleet is a single publish on the role's
//! subject, whatever the size of the fleet; a subset (`--percent`, `--where`,
//! a batch, named minions) is one publish per chosen minion on its own
//! subject, so the broker delivers it to them alone and the envelope stays
//! the same size whatever the selection. Whom to wait for comes from the
//! master (`select`, answered from the fleet view it keeps); only when no
//! master answers does the client read the registry itself. Replies are
//! gathered on one inbox until every selected minion answered or the
//! timeout passed; their signatures are checked on every core.
//!
//! ## From another language, with plain NATS
//!
//! Generate types from `proto/provis/v1/call.proto`, then:
//! 1. build a `provis.v1.CallEnvelope`: a fresh `call_id`, your `caller`,
//!    `service` and `method`, `args_json` (a JSON document), and
//!    `deadline_unix_ms` (now + timeout, in ms since the epoch);
//! 2. subscribe to a fresh inbox subject, then publish the encoded envelope
//!    with that inbox as reply subject on `provis.minion.<id>.call`,
//!    `provis.role.<role>.call` or `provis.all.call`;
//! 3. read one encoded `provis.v1.CallReply` per minion from the inbox: its
//!    `minion`, and either `result_json` or `error` (`code`, `message`,
//!    `stack`). Read the registry (KV bucket `provis_minions`, one JSON record
//!    per minion) or ask the master (`provis.master.select`) to know whom
//!    to wait for.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use provis_proto::v1::{CallReply, call_reply};
use serde::Serialize;
use serde_json::Value;

use crate::envelope::{CallRequest, error_code_name};
use crate::registry::{self, RegistryError};
use crate::selection::{Filter, Pick, Selection};
use crate::subject::{CallTarget, MinionId, Subjects};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach NATS at {url} (start a fleet with `provis up`, or point --nats-url / PROVIS_NATS_URL at a running nats-server)"
    )]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot connect as the configured identity")]
    Identity(#[from] crate::context::ContextError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(
        "cannot select: no master answered and the minion registry could not be read ({0}); a call to a whole role or the fleet (no --where, --percent or --count) still goes out"
    )]
    RegistryUnavailable(String),
    #[error("the master refused the selection")]
    Master(#[source] crate::master_api::MasterApiError),
    #[error("no live minion matches: {0}; `provis minions` shows who is up")]
    NothingSelected(String),
    #[error(transparent)]
    Select(#[from] crate::selection::SelectError),
    #[error("cannot send the call")]
    Publish(#[source] async_nats::Error),
    #[error(
        "{batches} batches of up to {per_batch:?} each (timeout and --batch-wait) may take longer than a signed call lives ({MAX_CALL_LIFETIME:?}): use bigger batches, a shorter --timeout or --batch-wait"
    )]
    BatchesTooLong { batches: usize, per_batch: Duration },
    #[error("no master took the rolling call (batches run on the leading master)")]
    BatchesRefused(#[source] crate::master_api::MasterApiError),
    #[error(
        "the rolling call's job {0} was not finished in time (no master ran it to its end): `provis job {0}` shows what was recorded"
    )]
    RollingUnfinished(String),
    #[error("cannot follow the rolling call's job records")]
    Follow(#[source] crate::jobs::JobsError),
}

use crate::call_auth::MAX_CALL_LIFETIME;

/// Connects to NATS with a bounded wait, so an unreachable server is a clear
/// error rather than a hang.
pub async fn connect_nats(
    fleet: &crate::FleetContext,
    name: &str,
) -> Result<async_nats::Client, ClientError> {
    fleet
        .connect_options_as_configured(name)?
        .connection_timeout(Duration::from_secs(3))
        .connect(fleet.servers())
        .await
        .map_err(|source| ClientError::Connect {
            url: fleet.nats_url.clone(),
            source,
        })
}

/// How one selected minion fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyStatus {
    Ok,
    Error,
    NoReply,
    /// Selected, but its batch never ran (`--stop-on-failure` stopped the call).
    Skipped,
}

/// A structured error as a minion reported it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ReplyError {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
}

/// One line of a call's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct MinionReply {
    pub minion: String,
    pub status: ReplyStatus,
    /// Round trip seen by the caller, in milliseconds; absent without a reply.
    pub ms: Option<f64>,
    pub result: Option<Value>,
    pub error: Option<ReplyError>,
}

impl MinionReply {
    /// A minion whose batch never ran.
    pub fn skipped(minion: &str) -> Self {
        Self {
            minion: minion.to_owned(),
            status: ReplyStatus::Skipped,
            ms: None,
            result: None,
            error: None,
        }
    }
}

/// Counts over the replies of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CallSummary {
    pub selected: usize,
    pub ok: usize,
    pub error: usize,
    pub no_reply: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped: usize,
}

/// Everything a call produced: one reply per selected minion, by minion id.
#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    pub replies: Vec<MinionReply>,
    pub summary: CallSummary,
    /// Who was selected and why, when the registry chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,
    /// Batches run, when the call ran in batches.
    #[serde(skip_serializing_if = "is_zero")]
    pub batches: usize,
    /// Replies that could not be read or arrived twice; they count nowhere else.
    #[serde(skip_serializing_if = "is_zero")]
    pub discarded: usize,
    /// The job the call is recorded as (`provis job <id>`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job: String,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl CallReport {
    /// True when every selected minion answered without error. Without a
    /// registry to say who should have answered, it cannot be told: false.
    pub fn all_ok(&self) -> bool {
        self.summary.ok == self.summary.selected
            && self
                .selection
                .as_ref()
                .is_none_or(|s| s.uncertain.is_none())
    }

    pub fn from_lines(mut replies: Vec<MinionReply>, discarded: usize) -> Self {
        replies.sort_by(|a, b| a.minion.cmp(&b.minion));
        let mut summary = CallSummary {
            selected: replies.len(),
            ..CallSummary::default()
        };
        for reply in &replies {
            match reply.status {
                ReplyStatus::Ok => summary.ok += 1,
                ReplyStatus::Error => summary.error += 1,
                ReplyStatus::NoReply => summary.no_reply += 1,
                ReplyStatus::Skipped => summary.skipped += 1,
            }
        }
        Self {
            replies,
            summary,
            selection: None,
            batches: 0,
            discarded,
            job: String::new(),
        }
    }
}

/// The size of each batch of a rolling call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BatchSize {
    Count(usize),
    /// A share of the selection, rounded up, at least one.
    Percent(f64),
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    /// `10` or `25%`.
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("batch size {text:?} is not N or N% (e.g. 10 or 25%)");
        match text.strip_suffix('%') {
            Some(p) => {
                let p: f64 = p.trim().parse().map_err(|_| bad())?;
                if p > 0.0 && p <= 100.0 {
                    Ok(Self::Percent(p))
                } else {
                    Err(bad())
                }
            }
            None => match text.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(Self::Count(n)),
                _ => Err(bad()),
            },
        }
    }
}

/// How a call runs over its selection: all at once, or in rolling batches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallPlan {
    /// Rolling batches: the next starts when the last one ended.
    pub batch: Option<BatchSize>,
    /// Pause between batches.
    pub batch_wait: Duration,
    /// Stop starting batches once more than this share (percent) of the
    /// minions called so far failed or did not reply.
    pub stop_on_failure_pct: Option<f64>,
    /// Queued this long for minions that are away (at most
    /// [`crate::call_auth::MAX_CALL_LIFETIME`]): the leading master
    /// delivers the call when they return, and their results join the job.
    pub queue: Option<Duration>,
    /// The job id to record the call under (one is drawn when none).
    pub job: Option<String>,
}

impl CallPlan {
    /// Minions per batch out of `chosen` (all of them without batches).
    pub fn batch_size(&self, chosen: usize) -> usize {
        match self.batch {
            None => chosen,
            Some(BatchSize::Count(n)) => n,
            Some(BatchSize::Percent(p)) => ((chosen as f64 * p / 100.0).ceil() as usize).max(1),
        }
        .max(1)
    }
}

/// What a rolling call's envelope lives beyond its batches' timeouts and
/// waits: the master's hand-over and a master taking the lease over.
const ROLLING_SLACK: Duration = Duration::from_secs(60);

/// How long a selection waits for the registry before a call to a whole
/// role or the fleet goes out without it.
pub const REGISTRY_WAIT: Duration = Duration::from_secs(1);

/// How long a selection waits for each part of the master's answer before
/// it reads the registry itself.
pub const MASTER_WAIT: Duration = Duration::from_secs(3);

/// How often a selection asks again for a master that was nobody, while
/// it reads the registry.
const MASTER_RETRY: Duration = Duration::from_millis(200);

/// Calls minions over NATS on behalf of one caller identity.
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    subjects: Subjects,
    caller: String,
    /// Signs every envelope when set (minions that pin callers require it).
    signer: Option<std::sync::Arc<crate::identity::Identity>>,
    registry_wait: Duration,
    master_wait: Duration,
}

impl Client {
    pub fn new(nats: async_nats::Client, subjects: Subjects, caller: impl Into<String>) -> Self {
        Self {
            nats,
            subjects,
            caller: caller.into(),
            signer: None,
            registry_wait: REGISTRY_WAIT,
            master_wait: MASTER_WAIT,
        }
    }

    /// This client, waiting at most `wait` for the registry when it selects.
    pub fn with_registry_wait(mut self, wait: Duration) -> Self {
        self.registry_wait = wait;
        self
    }

    /// Every registry record, or why there are none within the wait (a
    /// bucket without a JetStream leader during a cluster's failover).
    async fn read_registry(&self) -> Result<Vec<crate::registry::MinionRecord>, String> {
        let read = async { registry::read_all(&self.registry().await?).await };
        match tokio::time::timeout(self.registry_wait, read).await {
            Ok(Ok(records)) => Ok(records),
            Ok(Err(err)) => Err(crate::error_chain(&err)),
            Err(_) => Err(format!("no answer within {:?}", self.registry_wait)),
        }
    }

    /// This client, signing every envelope as `signer`.
    pub fn with_signer(mut self, signer: crate::identity::Identity) -> Self {
        self.signer = Some(std::sync::Arc::new(signer));
        self
    }

    /// This client, calling as `caller` (what job records and events name).
    pub fn with_caller(mut self, caller: impl Into<String>) -> Self {
        self.caller = caller.into();
        self
    }

    /// This client, signing every envelope as `signer` (shared).
    pub fn with_shared_signer(mut self, signer: std::sync::Arc<crate::identity::Identity>) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Signs `envelope` when this client has a signer.
    pub fn seal(&self, envelope: &mut provis_proto::v1::CallEnvelope) {
        if let Some(signer) = &self.signer {
            crate::call_auth::sign(envelope, signer);
        }
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The registry bucket, for reading who is in the fleet.
    pub async fn registry(&self) -> Result<async_nats::jetstream::kv::Store, RegistryError> {
        registry::open_registry(&async_nats::jetstream::new(self.nats.clone())).await
    }

    /// Chooses the minions a call reaches: the master selects from its view
    /// of the fleet; without a master, from one snapshot of the registry.
    /// Minions named one by one, with no filter, are taken as named (a
    /// minion missing from the registry then shows as no reply).
    pub async fn select(
        &self,
        target: &CallTarget,
        filter: Option<&Filter>,
        pick: Pick,
        seed: Option<u64>,
    ) -> Result<Selection, ClientError> {
        let pick = pick.check()?;
        if let (CallTarget::Minions(ids), None, Pick::All) = (target, filter, pick) {
            return Ok(self.select_named(target, ids).await);
        }
        let selection = match self.select_by_master(target, filter, pick, seed).await {
            Ok(selection) => selection,
            Err(err) if err.is_usage() => return Err(ClientError::Master(err)),
            Err(err) => {
                tracing::debug!(error = %crate::error_chain(&err), "no selection from a master; reading the registry");
                // A master that reconnects after its node died is briefly
                // nobody: it is asked again while the registry is read, and
                // whichever answers first chooses.
                let master_back = async {
                    if !matches!(err, crate::master_api::MasterApiError::NoMaster { .. }) {
                        return None;
                    }
                    let asking = async {
                        loop {
                            tokio::time::sleep(MASTER_RETRY).await;
                            match self.select_by_master(target, filter, pick, seed).await {
                                Ok(selection) => return selection,
                                Err(err) => {
                                    tracing::debug!(error = %crate::error_chain(&err), "still no master")
                                }
                            }
                        }
                    };
                    tokio::time::timeout(self.registry_wait, asking).await.ok()
                };
                let registry = self.read_registry();
                tokio::pin!(master_back, registry);
                let mut master_gone = false;
                let read = loop {
                    tokio::select! {
                        back = &mut master_back, if !master_gone => match back {
                            Some(selection) => break Ok(Ok(selection)),
                            None => master_gone = true,
                        },
                        read = &mut registry => break read.map(Err),
                    }
                };
                let read = match read {
                    Err(why) if !master_gone => master_back.await.map(Ok).ok_or(why),
                    read => read,
                };
                match read {
                    Ok(Ok(selection)) => selection,
                    Ok(Err(records)) => crate::selection::select(
                        &records,
                        target,
                        filter,
                        pick,
                        seed,
                        &crate::selection::ByStatus,
                    )?,
                    // Nothing to choose by: a whole role or the fleet is
                    // still reachable with one publish; a filter or a pick
                    // is not.
                    Err(why) if filter.is_none() && pick == Pick::All => {
                        return Ok(Selection::whoever_answers(target, why));
                    }
                    Err(why) => return Err(ClientError::RegistryUnavailable(why)),
                }
            }
        };
        if selection.chosen.is_empty() && selection.late.is_empty() {
            return Err(ClientError::NothingSelected(selection.reason));
        }
        Ok(selection)
    }

    async fn select_by_master(
        &self,
        target: &CallTarget,
        filter: Option<&Filter>,
        pick: Pick,
        seed: Option<u64>,
    ) -> Result<Selection, crate::master_api::MasterApiError> {
        let request = crate::master_api::SelectRequest {
            target: target.describe(),
            filter: filter.map(|f| f.source().to_owned()),
            pick,
            seed,
        };
        crate::master_api::MasterClient::new(self.nats.clone(), self.subjects.clone())
            .select(&request, self.master_wait)
            .await
    }

    /// Named minions, taken as named. One named minion alone receives the
    /// call; with several, each could answer in another's name, so their
    /// keys are asked for to check the replies (when anyone can say).
    async fn select_named(&self, target: &CallTarget, ids: &[MinionId]) -> Selection {
        let mut chosen = ids.to_vec();
        chosen.sort();
        chosen.dedup();
        let (keys, uncertain) = if chosen.len() > 1 {
            match self.select_by_master(target, None, Pick::All, None).await {
                Ok(selection) => (selection.keys, None),
                Err(_) => match self.read_registry().await {
                    Ok(records) => (
                        records
                            .into_iter()
                            .filter(|r| chosen.binary_search(&r.id).is_ok())
                            .filter_map(|r| Some((r.id.to_string(), r.public_key?)))
                            .collect(),
                        None,
                    ),
                    Err(why) => (BTreeMap::new(), Some(why)),
                },
            }
        } else {
            Default::default()
        };
        Selection {
            live: chosen.len(),
            matched: chosen.len(),
            reason: format!("named: {} minion(s)", chosen.len()),
            chosen,
            missing_fields: Default::default(),
            filtered: false,
            keys,
            uncertain,
            late: Vec::new(),
        }
    }

    /// Calls every live member of `target` and waits for their replies.
    pub async fn call(
        &self,
        target: &CallTarget,
        request: &CallRequest,
    ) -> Result<CallReport, ClientError> {
        let selection = self.select(target, None, Pick::All, None).await?;
        self.call_selected(
            target,
            &selection,
            request,
            &CallPlan::default(),
            &mut |_| {},
        )
        .await
    }

    /// Calls the minions of `selection`, all at once or in rolling batches,
    /// handing each reply to `on_reply` as it arrives (and each no-reply when
    /// its batch ends). Rolling batches are run by the leading master, so
    /// they go on when this caller stops following them.
    pub async fn call_selected(
        &self,
        target: &CallTarget,
        selection: &Selection,
        request: &CallRequest,
        plan: &CallPlan,
        on_reply: &mut (dyn FnMut(&MinionReply) + Send),
    ) -> Result<CallReport, ClientError> {
        let chosen = &selection.chosen;
        let job = plan
            .job
            .clone()
            .filter(|id| crate::jobs::valid_job_id(id))
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let started_unix_ms = crate::envelope::now_unix_ms();
        let job_request = crate::jobs::JobRequest {
            job: job.clone(),
            caller: self.caller.clone(),
            function: format!("{}.{}", request.service, request.method),
            target: target.describe(),
            selected: chosen.iter().map(ToString::to_string).collect(),
            args_digest: crate::jobs::args_digest(&request.args),
            started_unix_ms,
            timeout_ms: i64::try_from(request.timeout.as_millis()).unwrap_or(i64::MAX),
            batch: plan.batch.as_ref().map(|b| format!("{b:?}")),
        };
        let rolling = plan.batch.is_some() && !chosen.is_empty();
        let batches = rolling
            .then(|| self.hand_over_batches(target, selection, request, plan, &job))
            .transpose()?;
        crate::jobs::record(&self.nats, self.subjects.job(&job, "request"), &job_request).await;
        if let Some(batches) = batches {
            let report = self.call_rolling(batches, on_reply).await?;
            return Ok(CallReport {
                job,
                selection: Some(selection.clone()),
                ..report
            });
        }
        let report = self
            .call_at_once(target, selection, request, plan.queue, &job, on_reply)
            .await?;
        let summary = crate::jobs::JobSummary {
            job: job.clone(),
            ok: report.summary.ok,
            failed: report.summary.error,
            no_reply: report.summary.no_reply,
            ended_unix_ms: crate::envelope::now_unix_ms(),
            batches: 0,
            skipped: 0,
            discarded: report.discarded,
        };
        crate::jobs::record(&self.nats, self.subjects.job(&job, "summary"), &summary).await;
        // A caller that exits right after the call still leaves its summary.
        if let Err(err) = self.nats.flush().await {
            tracing::debug!(error = %err, "job summary not flushed");
        }
        Ok(CallReport { job, ..report })
    }

    /// Every chosen minion at once (one publish on the target's subject
    /// when they are the whole target), for job `job`.
    async fn call_at_once(
        &self,
        target: &CallTarget,
        selection: &Selection,
        request: &CallRequest,
        queue: Option<Duration>,
        job: &str,
        on_reply: &mut (dyn FnMut(&MinionReply) + Send),
    ) -> Result<CallReport, ClientError> {
        let chosen = &selection.chosen;
        // Only a call to every live member may go without naming them;
        // with nobody known to wait for, one publish reaches whoever answers.
        let whole_target = (chosen.len() == selection.live && !selection.filtered)
            || (selection.uncertain.is_some() && chosen.is_empty());
        let late: &[MinionId] = if whole_target { &selection.late } else { &[] };
        let (lines, discarded) = self
            .call_once(
                target,
                chosen,
                late,
                !whole_target,
                &selection.keys,
                request,
                (job, queue),
                on_reply,
            )
            .await?;
        let mut report = CallReport::from_lines(lines, discarded);
        report.selection = Some(selection.clone());
        Ok(report)
    }

    /// The batches of a rolling call, with one envelope signed for all of
    /// them, valid as long as they may take.
    fn hand_over_batches(
        &self,
        target: &CallTarget,
        selection: &Selection,
        request: &CallRequest,
        plan: &CallPlan,
        job: &str,
    ) -> Result<crate::jobs::JobBatches, ClientError> {
        let chosen = &selection.chosen;
        let size = plan.batch_size(chosen.len());
        let batches: Vec<Vec<String>> = chosen
            .chunks(size)
            .map(|batch| batch.iter().map(ToString::to_string).collect())
            .collect();
        let per_batch = request.timeout.saturating_add(plan.batch_wait);
        let too_long = || ClientError::BatchesTooLong {
            batches: batches.len(),
            per_batch,
        };
        let span = u32::try_from(batches.len())
            .ok()
            .and_then(|n| per_batch.checked_mul(n))
            .and_then(|span| span.checked_add(ROLLING_SLACK))
            .filter(|span| *span <= MAX_CALL_LIFETIME)
            .ok_or_else(too_long)?;
        let mut envelope = request.to_envelope(&self.caller, target);
        envelope.job_id = job.to_owned();
        envelope.addressed = true;
        envelope.queue_until_unix_ms = envelope
            .issued_unix_ms
            .saturating_add(i64::try_from(span.as_millis()).unwrap_or(i64::MAX));
        self.seal(&mut envelope);
        Ok(crate::jobs::JobBatches {
            job: job.to_owned(),
            timeout_ms: envelope.timeout_ms,
            batch_wait_ms: i64::try_from(plan.batch_wait.as_millis()).unwrap_or(i64::MAX),
            stop_on_failure_pct: plan.stop_on_failure_pct,
            until_unix_ms: envelope.queue_until_unix_ms,
            envelope: crate::jobs::hex_encode(&envelope.encode_to_vec()),
            batches,
        })
    }

    /// Hands `batches` to the leading master and follows its records of
    /// them until the summary, handing each reply to `on_reply` as its
    /// batch ends.
    async fn call_rolling(
        &self,
        batches: crate::jobs::JobBatches,
        on_reply: &mut (dyn FnMut(&MinionReply) + Send),
    ) -> Result<CallReport, ClientError> {
        let job_id = batches.job.clone();
        // Reading from the job's first record: nothing the master records
        // before the reader opens is missed.
        let mut records = crate::jobs::JobRecords::open(&self.nats, &self.subjects, &job_id)
            .await
            .map_err(ClientError::Follow)?;
        crate::master_api::MasterClient::new(self.nats.clone(), self.subjects.clone())
            .request::<crate::master_api::RunBatches>(&batches)
            .await
            .map_err(ClientError::BatchesRefused)?;
        // The master records the summary once the last batch could have
        // run; long after that, nobody is left to record it.
        let give_up = batches
            .until_unix_ms
            .saturating_add(batches.timeout_ms)
            .saturating_add(i64::try_from(ROLLING_SLACK.as_millis()).unwrap_or(0));
        let mut job = crate::jobs::Job::default();
        let mut lines = Vec::new();
        let mut discarded = 0;
        let mut shown = 0;
        while job.summary.is_none() {
            if crate::envelope::now_unix_ms() > give_up {
                return Err(ClientError::RollingUnfinished(job_id));
            }
            let Some((part, payload)) = records
                .next_within(Duration::from_secs(1))
                .await
                .map_err(ClientError::Follow)?
            else {
                continue;
            };
            job.take_record(&part, &payload);
            while let Some(end) = job.batch_ends.get(&shown) {
                for reply in &end.replies {
                    if reply.status != ReplyStatus::Skipped {
                        on_reply(reply);
                    }
                }
                lines.extend(end.replies.iter().cloned());
                discarded += end.discarded;
                shown += 1;
            }
        }
        let ran: std::collections::BTreeSet<&str> =
            lines.iter().map(|line| line.minion.as_str()).collect();
        let skipped: Vec<MinionReply> = batches
            .batches
            .iter()
            .flatten()
            .filter(|id| !ran.contains(id.as_str()))
            .map(|id| MinionReply::skipped(id))
            .collect();
        lines.extend(skipped);
        let mut report = CallReport::from_lines(lines, discarded);
        report.batches = job.summary.map_or(shown, |summary| summary.batches);
        Ok(report)
    }

    /// One publish on the target's subject, or, for a subset, one per
    /// chosen minion on its own subject; then the gathering of the replies.
    #[allow(clippy::too_many_arguments)]
    async fn call_once(
        &self,
        target: &CallTarget,
        batch: &[MinionId],
        late: &[MinionId],
        subset: bool,
        keys: &BTreeMap<String, String>,
        request: &CallRequest,
        (job, queue): (&str, Option<Duration>),
        on_reply: &mut (dyn FnMut(&MinionReply) + Send),
    ) -> Result<(Vec<MinionReply>, usize), ClientError> {
        let mut envelope = request.to_envelope(&self.caller, target);
        envelope.job_id = job.to_owned();
        let queue = queue.map(|ttl| ttl.min(MAX_CALL_LIFETIME));
        if let Some(ttl) = queue {
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            envelope.queue_until_unix_ms = envelope.issued_unix_ms.saturating_add(ttl_ms);
        }
        let addressed = subset || matches!(target, CallTarget::Minions(_));
        envelope.addressed = addressed;
        let subjects = if addressed {
            batch
                .iter()
                .map(|id| self.subjects.minion_call(id))
                .collect()
        } else {
            self.subjects.call_subjects(target)
        };
        self.seal(&mut envelope);
        let payload = bytes::Bytes::from(envelope.encode_to_vec());
        if queue.is_some() {
            let queued = crate::jobs::JobQueue {
                job: job.to_owned(),
                until_unix_ms: envelope.queue_until_unix_ms,
                issued_unix_ms: envelope.issued_unix_ms,
                timeout_ms: envelope.timeout_ms,
                target: target.describe(),
                whole_target: !addressed,
                selected: batch.iter().map(ToString::to_string).collect(),
                envelope: crate::jobs::hex_encode(&payload),
            };
            crate::jobs::record(&self.nats, self.subjects.job(job, "queue"), &queued).await;
        }
        let delivery = Delivery {
            subjects,
            payload,
            call_id: envelope.call_id,
            timeout: request.timeout,
        };
        delivery
            .gather(&self.nats, batch, late, keys, on_reply)
            .await
    }
}

/// One signed envelope on its way: published on each subject, then the
/// replies gathered until every awaited minion answered or the timeout
/// passed. The caller's one-shot calls and the master's batches both
/// deliver through it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subjects: Vec<String>,
    pub payload: bytes::Bytes,
    pub call_id: String,
    pub timeout: Duration,
}

impl Delivery {
    /// Publishes, then gathers the replies of `batch` (and of `late`, who
    /// may answer without being waited for); with neither, of whoever
    /// answers in time. Each reply goes to `on_reply` as it comes, each
    /// no-reply at the end.
    pub async fn gather(
        self,
        nats: &async_nats::Client,
        batch: &[MinionId],
        late: &[MinionId],
        keys: &BTreeMap<String, String>,
        on_reply: &mut (dyn FnMut(&MinionReply) + Send),
    ) -> Result<(Vec<MinionReply>, usize), ClientError> {
        let inbox = nats.new_inbox();
        let replies = nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ClientError::Publish(Box::new(e)))?;
        let started = Instant::now();
        for subject in self.subjects {
            nats.publish_with_reply(subject, inbox.clone(), self.payload.clone())
                .await
                .map_err(|e| ClientError::Publish(Box::new(e)))?;
        }
        nats.flush()
            .await
            .map_err(|e| ClientError::Publish(Box::new(e)))?;

        let keys = std::sync::Arc::new(keys.clone());
        let mut gathered = if batch.is_empty() && late.is_empty() {
            // Nobody known to wait for: whoever answers in time.
            ReplyGatherer::whoever_answers(self.call_id.clone())
        } else {
            ReplyGatherer::new(batch.to_vec(), self.call_id.clone()).with_late(late)
        }
        .with_keys(keys.clone());
        let mut checked = ReplyChecker::start(replies, keys, started);
        let deadline = tokio::time::Instant::from_std(started + self.timeout);
        while gathered.waiting() {
            let Ok(Some(reply)) = tokio::time::timeout_at(deadline, checked.next()).await else {
                break;
            };
            match reply {
                CheckedReply::Reply {
                    reply,
                    ms,
                    signature,
                } => {
                    if let Some(line) = gathered.accept_checked(reply, ms, signature) {
                        on_reply(line);
                    }
                }
                CheckedReply::Unreadable(err) => {
                    tracing::warn!(error = %err, "unreadable reply discarded");
                    gathered.discard();
                }
            }
        }
        let (lines, discarded) = gathered.into_lines();
        for line in lines.iter().filter(|l| l.status == ReplyStatus::NoReply) {
            on_reply(line);
        }
        Ok((lines, discarded))
    }
}

/// A reply read off the inbox: decoded, its signature checked.
#[derive(Debug)]
enum CheckedReply {
    Reply {
        reply: CallReply,
        ms: f64,
        signature: SignatureCheck,
    },
    Unreadable(prost::DecodeError),
}

/// Whether a reply carries the signature of the minion it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Signed by the key the selection knows for that minion.
    Verified,
    /// The selection knows a key for that minion, and the reply is not
    /// signed by it.
    Failed,
    /// No key is known for that minion (an unsecured fleet).
    NoKey,
}

impl SignatureCheck {
    /// Checks `payload` (a reply in `minion`'s name, with `signature` from
    /// its header) against the key `keys` hold for that minion.
    pub fn of(
        keys: &BTreeMap<String, String>,
        minion: &str,
        payload: &[u8],
        signature: Option<&str>,
    ) -> Self {
        match keys.get(minion) {
            None => Self::NoKey,
            Some(key) => {
                if signature.is_some_and(|signature| {
                    crate::call_auth::reply_signed_by(payload, signature, key)
                }) {
                    Self::Verified
                } else {
                    Self::Failed
                }
            }
        }
    }
}

/// Reads a call's inbox and checks each reply. Signatures cost about as
/// much as everything else a reply takes together, so with keys to check,
/// one task per core decodes and verifies while the caller gathers; with
/// none, replies are decoded as they are read.
struct ReplyChecker {
    checked: tokio::sync::mpsc::Receiver<CheckedReply>,
    /// Ends the reading and checking when the call is over.
    _tasks: Vec<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How many replies may wait between the reader, the checkers and the caller.
const CHECK_QUEUE: usize = 4_096;

impl ReplyChecker {
    fn start(
        mut replies: async_nats::Subscriber,
        keys: std::sync::Arc<BTreeMap<String, String>>,
        started: Instant,
    ) -> Self {
        let (results, checked) = tokio::sync::mpsc::channel(CHECK_QUEUE);
        let workers = if keys.is_empty() {
            0
        } else {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        };
        let mut tasks = Vec::new();
        let mut lanes = Vec::new();
        for _ in 0..workers {
            let (lane, mut incoming) =
                tokio::sync::mpsc::channel::<(async_nats::Message, f64)>(CHECK_QUEUE);
            lanes.push(lane);
            let (results, keys) = (results.clone(), keys.clone());
            tasks.push(AbortOnDrop(tokio::spawn(async move {
                while let Some((message, ms)) = incoming.recv().await {
                    if results.send(check(&message, ms, &keys)).await.is_err() {
                        return;
                    }
                }
            })));
        }
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            let mut next_lane = 0usize;
            while let Some(message) = replies.next().await {
                let ms = started.elapsed().as_secs_f64() * 1_000.0;
                let sent = if lanes.is_empty() {
                    results.send(check(&message, ms, &keys)).await.is_ok()
                } else {
                    next_lane = (next_lane + 1) % lanes.len();
                    lanes[next_lane].send((message, ms)).await.is_ok()
                };
                if !sent {
                    return;
                }
            }
        })));
        Self {
            checked,
            _tasks: tasks,
        }
    }

    async fn next(&mut self) -> Option<CheckedReply> {
        self.checked.recv().await
    }
}

fn check(message: &async_nats::Message, ms: f64, keys: &BTreeMap<String, String>) -> CheckedReply {
    match CallReply::decode(message.payload.as_ref()) {
        Ok(reply) => {
            let signature = message
                .headers
                .as_ref()
                .and_then(|h| h.get(crate::call_auth::REPLY_SIGNATURE_HEADER))
                .map(async_nats::HeaderValue::as_str);
            let signature = SignatureCheck::of(keys, &reply.minion, &message.payload, signature);
            CheckedReply::Reply {
                reply,
                ms,
                signature,
            }
        }
        Err(err) => CheckedReply::Unreadable(err),
    }
}

/// Collects the replies to one call, one per selected minion: every
/// transport (NATS, the minions' gRPC APIs) reports alike. Each reply costs
/// O(log n), so gathering from a large fleet stays linear.
#[derive(Debug)]
pub struct ReplyGatherer {
    selected: std::collections::BTreeSet<String>,
    /// Late members: their replies count, nobody waits for them.
    late: std::collections::BTreeSet<String>,
    /// Selected minions that answered (so waiting is a comparison).
    selected_answered: usize,
    /// No one known to wait for: any minion's first reply counts.
    open: bool,
    call_id: String,
    gathered: BTreeMap<String, MinionReply>,
    discarded: usize,
    keys: std::sync::Arc<BTreeMap<String, String>>,
}

impl ReplyGatherer {
    pub fn new(selected: Vec<MinionId>, call_id: String) -> Self {
        Self {
            selected: selected.into_iter().map(String::from).collect(),
            late: Default::default(),
            selected_answered: 0,
            open: false,
            call_id,
            gathered: BTreeMap::new(),
            discarded: 0,
            keys: Default::default(),
        }
    }

    /// Also takes replies from `late` members, without waiting for them.
    pub fn with_late(mut self, late: &[MinionId]) -> Self {
        self.late = late.iter().map(ToString::to_string).collect();
        self
    }

    /// A gathering with nobody known to wait for (the registry could not be
    /// read): every minion's first reply counts, until the deadline.
    pub fn whoever_answers(call_id: String) -> Self {
        Self {
            open: true,
            ..Self::new(Vec::new(), call_id)
        }
    }

    /// Requires replies in the name of these minions (id → key) to be signed
    /// by their key; others are discarded, so a minion that answers first in
    /// another's name does not hide the real answer.
    pub fn with_keys(mut self, keys: std::sync::Arc<BTreeMap<String, String>>) -> Self {
        self.keys = keys;
        self
    }

    /// True while some selected minion has not answered (always, when
    /// nobody is known to wait for).
    pub fn waiting(&self) -> bool {
        if self.open {
            return true;
        }
        if self.selected.is_empty() {
            // Only late members: whoever of them answers in time.
            return !self.late.is_empty();
        }
        self.selected_answered < self.selected.len()
    }

    /// Takes a reply that arrived `ms` after the call was sent and returns its
    /// line. A reply to another call, from a minion not selected, or a second
    /// reply from one minion is discarded.
    pub fn accept(&mut self, reply: CallReply, ms: f64) -> Option<&MinionReply> {
        let signature = if self.keys.contains_key(&reply.minion) {
            SignatureCheck::Failed
        } else {
            SignatureCheck::NoKey
        };
        self.accept_checked(reply, ms, signature)
    }

    /// Like [`Self::accept`], for a reply whose signature was checked
    /// against the keys given to [`Self::with_keys`] (see
    /// [`SignatureCheck::of`]).
    pub fn accept_checked(
        &mut self,
        reply: CallReply,
        ms: f64,
        signature: SignatureCheck,
    ) -> Option<&MinionReply> {
        let expected = if self.open {
            reply.minion.parse::<MinionId>().is_ok()
        } else {
            self.selected.contains(&reply.minion) || self.late.contains(&reply.minion)
        };
        if reply.call_id != self.call_id || !expected {
            tracing::warn!(call_id = %reply.call_id, minion = %reply.minion, "reply not expected for this call discarded");
            self.discarded += 1;
            None
        } else if signature == SignatureCheck::Failed {
            tracing::warn!(minion = %reply.minion, "reply not signed by that minion's key discarded");
            self.discarded += 1;
            None
        } else if self.gathered.contains_key(&reply.minion) {
            tracing::warn!(minion = %reply.minion, "second reply to one call discarded");
            self.discarded += 1;
            None
        } else {
            let minion = reply.minion.clone();
            if self.selected.contains(&minion) {
                self.selected_answered += 1;
            }
            self.gathered.insert(minion.clone(), reply_line(reply, ms));
            self.gathered.get(&minion)
        }
    }

    /// Counts a reply that could not be read at all.
    pub fn discard(&mut self) {
        self.discarded += 1;
    }

    /// Records a minion that could not be reached at all, with why.
    pub fn unreachable(&mut self, minion: &str, reason: String) {
        self.gathered
            .entry(minion.to_owned())
            .or_insert_with(|| MinionReply {
                minion: minion.to_owned(),
                status: ReplyStatus::NoReply,
                ms: None,
                result: None,
                error: Some(ReplyError {
                    code: "unreachable".into(),
                    message: reason,
                    stack: None,
                }),
            });
    }

    /// Every selected minion's line (no reply for the silent ones) and the
    /// count of discarded replies.
    pub fn into_lines(mut self) -> (Vec<MinionReply>, usize) {
        for id in &self.selected {
            self.gathered
                .entry(id.to_string())
                .or_insert_with(|| MinionReply {
                    minion: id.to_string(),
                    status: ReplyStatus::NoReply,
                    ms: None,
                    result: None,
                    error: None,
                });
        }
        (self.gathered.into_values().collect(), self.discarded)
    }

    /// The report of a call with this one gathering.
    pub fn finish(self) -> CallReport {
        let (lines, discarded) = self.into_lines();
        CallReport::from_lines(lines, discarded)
    }
}

fn reply_line(reply: CallReply, ms: f64) -> MinionReply {
    let (status, result, error) = match reply.outcome {
        Some(call_reply::Outcome::ResultJson(json)) => match serde_json::from_str(&json) {
            Ok(value) => (ReplyStatus::Ok, Some(value), None),
            Err(err) => (
                ReplyStatus::Error,
                None,
                Some(ReplyError {
                    code: "bad_reply".into(),
                    message: format!("result is not JSON: {err}"),
                    stack: None,
                }),
            ),
        },
        Some(call_reply::Outcome::Error(error)) => (
            ReplyStatus::Error,
            None,
            Some(ReplyError {
                code: error_code_name(error.code).to_owned(),
                message: error.message,
                stack: (!error.stack.is_empty()).then_some(error.stack),
            }),
        ),
        None => (
            ReplyStatus::Error,
            None,
            Some(ReplyError {
                code: "bad_reply".into(),
                message: "reply has neither result nor error".into(),
                stack: None,
            }),
        ),
    };
    MinionReply {
        minion: reply.minion,
        status,
        ms: Some(ms),
        result,
        error,
    }
}
