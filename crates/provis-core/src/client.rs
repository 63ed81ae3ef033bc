//! The one public API for calls: the CLI, the master and tests all fan out
//! through [`Client::call`].
//!
//! A call to a role or to the whole fleet is a single publish on the role's
//! subject; the client knows whom to wait for from one read of the registry,
//! and gathers replies on one inbox until every selected minion answered or
//! the timeout passed.
//!
//! Any program can do the same with plain NATS: publish a protobuf
//! `provis.v1.CallEnvelope` (see `proto/provis/v1/call.proto`) with a reply
//! subject on `provis.minion.<id>.call`, `provis.role.<role>.call` or
//! `provis.all.call`, and read one `provis.v1.CallReply` per minion from it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use provis_proto::v1::{CallReply, call_reply};
use serde::Serialize;
use serde_json::Value;

use crate::envelope::{CallRequest, error_code_name};
use crate::registry::{self, RegistryError};
use crate::subject::{CallTarget, MinionId, Subjects};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach NATS at {url}: {reason} (start a fleet with `provis up`, or point --nats-url / PROVIS_NATS_URL at a running nats-server)"
    )]
    Connect { url: String, reason: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("no live minion matches {0}; `provis call --all sys.ping` shows who is up")]
    NothingSelected(String),
    #[error("cannot send the call: {0}")]
    Publish(String),
}

/// Connects to NATS with a bounded wait, so an unreachable server is a clear
/// error rather than a hang.
pub async fn connect_nats(url: &str, name: &str) -> Result<async_nats::Client, ClientError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(3))
        .connect(url)
        .await
        .map_err(|err| ClientError::Connect {
            url: url.to_owned(),
            reason: err.to_string(),
        })
}

/// How one selected minion fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyStatus {
    Ok,
    Error,
    NoReply,
}

/// A structured error as a minion reported it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplyError {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
}

/// One line of a call's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinionReply {
    pub minion: String,
    pub status: ReplyStatus,
    /// Round trip seen by the caller, in milliseconds; absent without a reply.
    pub ms: Option<f64>,
    pub result: Option<Value>,
    pub error: Option<ReplyError>,
}

/// Counts over the replies of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CallSummary {
    pub selected: usize,
    pub ok: usize,
    pub error: usize,
    pub no_reply: usize,
}

/// Everything a call produced: one reply per selected minion, by minion id.
#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    pub replies: Vec<MinionReply>,
    pub summary: CallSummary,
    /// Replies that could not be read or arrived twice; they count nowhere else.
    #[serde(skip_serializing_if = "is_zero")]
    pub discarded: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl CallReport {
    /// True when every selected minion answered without error.
    pub fn all_ok(&self) -> bool {
        self.summary.ok == self.summary.selected
    }
}

/// Calls minions over NATS on behalf of one caller identity.
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    subjects: Subjects,
    caller: String,
}

impl Client {
    pub fn new(nats: async_nats::Client, subjects: Subjects, caller: impl Into<String>) -> Self {
        Self {
            nats,
            subjects,
            caller: caller.into(),
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

    /// The minions a call to `target` waits for: the named ones, or the live
    /// members the registry lists.
    pub async fn select(&self, target: &CallTarget) -> Result<Vec<MinionId>, ClientError> {
        if let CallTarget::Minions(ids) = target {
            let mut ids = ids.clone();
            ids.sort();
            ids.dedup();
            return Ok(ids);
        }
        let store = self.registry().await?;
        let members = registry::live_members(&store, target).await?;
        if members.is_empty() {
            return Err(ClientError::NothingSelected(target.describe()));
        }
        Ok(members.into_iter().map(|record| record.id).collect())
    }

    /// Sends `request` to `target` and gathers one reply per selected minion
    /// until all answered or `request.timeout` passed.
    pub async fn call(
        &self,
        target: &CallTarget,
        request: &CallRequest,
    ) -> Result<CallReport, ClientError> {
        let selected = self.select(target).await?;
        let envelope = request.to_envelope(&self.caller, target);
        let payload = bytes::Bytes::from(envelope.encode_to_vec());

        let inbox = self.nats.new_inbox();
        let mut replies = self
            .nats
            .subscribe(inbox.clone())
            .await
            .map_err(|err| ClientError::Publish(err.to_string()))?;
        let started = Instant::now();
        for subject in self.subjects.call_subjects(target) {
            self.nats
                .publish_with_reply(subject, inbox.clone(), payload.clone())
                .await
                .map_err(|err| ClientError::Publish(err.to_string()))?;
        }
        self.nats
            .flush()
            .await
            .map_err(|err| ClientError::Publish(err.to_string()))?;

        let mut gathered = ReplyGatherer::new(selected, envelope.call_id.clone());
        let deadline = tokio::time::Instant::from_std(started + request.timeout);
        while gathered.waiting() {
            let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await else {
                break;
            };
            let ms = started.elapsed().as_secs_f64() * 1_000.0;
            match CallReply::decode(message.payload.as_ref()) {
                Ok(reply) => gathered.accept(reply, ms),
                Err(err) => {
                    tracing::warn!(error = %err, "unreadable reply discarded");
                    gathered.discard();
                }
            }
        }
        Ok(gathered.finish())
    }
}

/// Collects the replies to one call, one per selected minion, and turns them
/// into a report: every transport (NATS, the minions' gRPC APIs) reports alike.
#[derive(Debug)]
pub struct ReplyGatherer {
    selected: Vec<MinionId>,
    call_id: String,
    gathered: BTreeMap<String, MinionReply>,
    discarded: usize,
}

impl ReplyGatherer {
    pub fn new(selected: Vec<MinionId>, call_id: String) -> Self {
        Self {
            selected,
            call_id,
            gathered: BTreeMap::new(),
            discarded: 0,
        }
    }

    /// True while some selected minion has not answered.
    pub fn waiting(&self) -> bool {
        self.selected
            .iter()
            .any(|id| !self.gathered.contains_key(id.as_str()))
    }

    /// Takes a reply that arrived `ms` after the call was sent. A reply to
    /// another call or a second reply from one minion is discarded.
    pub fn accept(&mut self, reply: CallReply, ms: f64) {
        if reply.call_id != self.call_id || reply.minion.is_empty() {
            tracing::warn!(call_id = %reply.call_id, minion = %reply.minion, "reply for another call discarded");
            self.discarded += 1;
        } else if self.gathered.contains_key(&reply.minion) {
            tracing::warn!(minion = %reply.minion, "second reply to one call discarded");
            self.discarded += 1;
        } else {
            self.gathered
                .insert(reply.minion.clone(), reply_line(reply, ms));
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

    /// The report: selected minions that never answered count as no reply.
    pub fn finish(mut self) -> CallReport {
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
        let replies: Vec<MinionReply> = self.gathered.into_values().collect();
        let mut summary = CallSummary {
            selected: replies.len(),
            ..CallSummary::default()
        };
        for reply in &replies {
            match reply.status {
                ReplyStatus::Ok => summary.ok += 1,
                ReplyStatus::Error => summary.error += 1,
                ReplyStatus::NoReply => summary.no_reply += 1,
            }
        }
        CallReport {
            replies,
            summary,
            discarded: self.discarded,
        }
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
