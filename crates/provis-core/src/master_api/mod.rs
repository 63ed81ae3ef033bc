//! The master's API: one [`Endpoint`] per request the master answers, each
//! with its request and response type, served as the NATS service
//! `provis-master` (so `$SRV.PING`, `$SRV.INFO.provis-master` and
//! `$SRV.STATS.provis-master` list the endpoints and their counters) and
//! asked through [`MasterClient`].
//!
//! Each endpoint listens on `<prefix>.master.<subject>` and takes a JSON
//! request (an empty payload is `{}`); it answers with JSON, or with the
//! services protocol's error headers (`Nats-Service-Error-Code`,
//! `Nats-Service-Error`) that [`MasterClient`] turns into an [`ApiError`].
//! Answers that grow with the fleet are paged: pass a page's `next` back
//! as `cursor`; the master ends a page before it would outgrow the bus's
//! maximum payload.
//!
//! Adding an endpoint: a request and a response type and an [`Endpoint`]
//! impl here (and its name in [`ENDPOINTS`]), a handler in the master's
//! `api` module registered in its list, and, if callers want one, a method
//! on [`MasterClient`]. The compiler checks every caller and the handler
//! against the types.

mod client;
mod dashboard;
mod error;
mod page;
mod plan;
mod rollout;
mod schedules;

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use client::MasterClient;
pub use dashboard::{
    DashboardTokenAnswer, DashboardTokenRecord, DashboardTokenRequest, MAX_DASHBOARD_TOKEN_TTL_S,
    SIGNED_LOGIN_WINDOW_MS, dashboard_token_key, signed_login_message,
};
pub use error::{ApiError, ApiErrorKind, MasterApiError};
pub use page::{PageRequest, Paged, take_page};
pub use plan::{Change, MinionsChange, PlanAnswer, PlanRequest, RoleChange, ServiceChange};
pub use rollout::{
    GateOutcome, GateSpec, RolloutAction, RolloutAnswer, RolloutControlRequest, RolloutHistory,
    RolloutHistoryRequest, RolloutRecord, RolloutStatus, RolloutStatusRequest, StageRecord,
    StageState,
};
pub use schedules::{
    ScheduleAction, ScheduleAnswer, ScheduleInfo, ScheduleRequest, ScheduleState,
    schedule_state_key,
};

use crate::assignment::OverlayEntry;
use crate::registry::MinionRecord;
use crate::subject::{MinionId, RoleName};

/// The name the master's endpoints are served under in the services protocol.
pub const SERVICE_NAME: &str = "provis-master";

/// One request the master answers.
pub trait Endpoint {
    /// The subject after `<prefix>.master.`, e.g. `enroll.token`.
    const SUBJECT: &'static str;
    /// The endpoint's name in the services protocol (`nats micro info`).
    const NAME: &'static str;
    /// How long a caller waits for the answer.
    const TIMEOUT: Duration = Duration::from_secs(10);
    /// Only the leading master serves it (it writes desired state): while
    /// masters hand the lease over nobody does, and callers try again.
    const LEADER_ONLY: bool = false;
    type Request: Serialize + DeserializeOwned + Send + Sync + 'static;
    type Response: Serialize + DeserializeOwned + Send + 'static;
}

/// The subjects of every endpoint, for discovery checks and permissions.
pub const ENDPOINTS: &[&str] = &[
    Ping::SUBJECT,
    Select::SUBJECT,
    Minions::SUBJECT,
    Query::SUBJECT,
    Stats::SUBJECT,
    SyncNow::SUBJECT,
    Status::SUBJECT,
    Role::SUBJECT,
    EnrollList::SUBJECT,
    EnrollDecide::SUBJECT,
    EnrollToken::SUBJECT,
    RolloutShow::SUBJECT,
    RolloutHistoryList::SUBJECT,
    RolloutControl::SUBJECT,
    Plan::SUBJECT,
    RunBatches::SUBJECT,
    DashboardToken::SUBJECT,
    Schedules::SUBJECT,
];

/// The endpoints that only read: calling operators may ask them.
pub const READ_ONLY_ENDPOINTS: &[&str] = &[
    Ping::SUBJECT,
    Select::SUBJECT,
    Minions::SUBJECT,
    Query::SUBJECT,
    Stats::SUBJECT,
    Status::SUBJECT,
    RolloutShow::SUBJECT,
    RolloutHistoryList::SUBJECT,
];

/// The endpoints a calling operator may ask: the read-only ones and the
/// hand-over of its rolling calls (whose envelope it signed itself, and
/// which minions check against the call policy like any call).
pub const CALLER_ENDPOINTS: &[&str] = &[RunBatches::SUBJECT];

/// A request's JSON as the master reads it: an empty payload is `{}`.
pub fn decode_request<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ApiError> {
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|err| ApiError::usage(format!("bad request: {err}")))
}

macro_rules! endpoint {
    ($(#[$doc:meta])* $ty:ident, $subject:literal, $name:literal, $request:ty, $response:ty $(, $timeout:expr)? $(, leader_only: $leader:expr)?) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $ty;
        impl Endpoint for $ty {
            const SUBJECT: &'static str = $subject;
            const NAME: &'static str = $name;
            $(const TIMEOUT: Duration = $timeout;)?
            $(const LEADER_ONLY: bool = $leader;)?
            type Request = $request;
            type Response = $response;
        }
    };
}

endpoint!(
    /// Who the master is: for readiness checks and pinning its key.
    Ping, "ping", "ping", PingRequest, PingAnswer
);
endpoint!(
    /// Whom a call reaches, chosen from the master's view of the fleet
    /// (liveness by its clock, the latest state samples). The answer comes
    /// in parts on the request's inbox (see [`SelectPart`]).
    Select, "select", "select", SelectRequest, SelectPart, Duration::from_secs(5)
);
endpoint!(
    /// The registry: every minion with a `live` flag (paged).
    Minions, "minions", "minions", MinionsRequest, MinionsPage
);
endpoint!(
    /// Which minions match an expression now or over a window (paged).
    Query, "query", "query", QueryRequest, QueryPage, Duration::from_secs(30)
);
endpoint!(
    /// The state index in numbers.
    Stats, "stats", "stats", StatsRequest, IndexStats
);
endpoint!(
    /// Fetch the config repository now and apply what is new.
    SyncNow, "sync", "sync", SyncRequest, SyncAnswer, Duration::from_secs(130), leader_only: true
);
endpoint!(
    /// The applied commit and who converged on it (paged).
    Status, "status", "status", StatusRequest, StatusPage
);
endpoint!(
    /// Change one minion's roles over what git assigns.
    Role, "role", "role", RoleRequest, RoleAnswer, Duration::from_secs(130), leader_only: true
);
endpoint!(
    /// Enrollment records, pending ones or all (paged).
    EnrollList, "enroll.list", "enroll-list", EnrollListRequest, EnrollmentPage
);
endpoint!(
    /// Accept, reject or revoke a minion's key.
    EnrollDecide, "enroll.decide", "enroll-decide", EnrollDecision, EnrollDecided
);
endpoint!(
    /// Issue a one-time enrollment token.
    EnrollToken, "enroll.token", "enroll-token", TokenRequest, TokenAnswer
);

endpoint!(
    /// The schedules and their state; run one now, pause or resume it
    /// (admin operators only).
    Schedules, "schedule", "schedule", ScheduleRequest, ScheduleAnswer
);
endpoint!(
    /// A one-time login token for the dashboard (admin operators only).
    DashboardToken, "dashboard.token", "dashboard-token", DashboardTokenRequest, DashboardTokenAnswer
);
endpoint!(
    /// What a revision would change, without applying it.
    Plan, "plan", "plan", PlanRequest, PlanAnswer, Duration::from_secs(130), leader_only: true
);
endpoint!(
    /// Run a rolling call's batches (`provis call --batch`): the leading
    /// master records them and delivers them one after the other.
    RunBatches, "job.batches", "job-batches", crate::jobs::JobBatches, BatchesTaken, Duration::from_secs(30), leader_only: true
);
endpoint!(
    /// The active rollout, else the last one.
    RolloutShow, "rollout.status", "rollout-status", RolloutStatusRequest, RolloutAnswer
);
endpoint!(
    /// The latest rollouts, member lists left out.
    RolloutHistoryList, "rollout.history", "rollout-history", RolloutHistoryRequest, RolloutHistory
);
endpoint!(
    /// Pause, resume or abort the active rollout.
    RolloutControl, "rollout.control", "rollout-control", RolloutControlRequest, RolloutAnswer, Duration::from_secs(130), leader_only: true
);

/// A rolling call the leading master took and recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchesTaken {
    pub job: String,
}

/// `ping` takes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingAnswer {
    /// The provis version the master runs.
    pub version: String,
    /// The master's key (`ed25519:<hex>`): minions pin it for bundles and desired state.
    pub public_key: String,
}

/// Whom to select: a call's target, narrowed and cut as `provis call` does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectRequest {
    /// `all`, `role.<role>` or `minion.<id>[,<id>…]`.
    pub target: String,
    /// A `--where` expression (CEL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default = "pick_all")]
    pub pick: crate::selection::Pick,
    /// The same seed picks the same minions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn pick_all() -> crate::selection::Pick {
    crate::selection::Pick::All
}

/// A selected minion and the key its replies must be signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectedMinion {
    pub id: MinionId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The numbers of a selection, and why it is what it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectionSummary {
    pub live: usize,
    pub matched: usize,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub missing_fields: std::collections::BTreeMap<String, usize>,
    pub reason: String,
    #[serde(default)]
    pub filtered: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertain: Option<String>,
    /// How many minions all the parts carry (chosen, late and named): a
    /// part lost on the way is told, not taken for a smaller selection.
    /// (Absent from a master of an earlier version: not checked.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<usize>,
}

/// One part of a selection. A selection of any size is answered as parts
/// that each fit the bus's maximum payload, sent in order to the request's
/// inbox; the last carries the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectPart {
    pub chosen: Vec<SelectedMinion>,
    /// Members whose heartbeat is late: reached by a call to the whole
    /// target, their replies count, nobody waits for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late: Vec<SelectedMinion>,
    /// Minions named one by one that are neither (stopped, offline): a
    /// caller calls them as named all the same, and needs their keys to
    /// tell their replies from forgeries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named: Vec<SelectedMinion>,
    /// Present on the last part only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<SelectionSummary>,
}

/// Which list of a [`SelectPart`] a minion travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    Chosen,
    Late,
    Named,
}

/// An answer that comes as several messages, the last one saying so.
pub trait Parts {
    fn is_last(&self) -> bool;
}

impl Parts for SelectPart {
    fn is_last(&self) -> bool {
        self.summary.is_some()
    }
}

impl SelectPart {
    /// Splits `selection` into parts of at most `budget` bytes of members.
    pub fn split(selection: &crate::selection::Selection, budget: usize) -> Vec<Self> {
        let member = |id: &MinionId| SelectedMinion {
            id: id.clone(),
            key: selection.keys.get(id.as_str()).cloned(),
        };
        // id, key and JSON punctuation
        let size =
            |m: &SelectedMinion| m.id.as_str().len() + m.key.as_ref().map_or(0, String::len) + 24;
        let empty = || Self {
            chosen: Vec::new(),
            late: Vec::new(),
            named: Vec::new(),
            summary: None,
        };
        let listed: std::collections::BTreeSet<&str> = selection
            .chosen
            .iter()
            .chain(&selection.late)
            .map(MinionId::as_str)
            .collect();
        let named_only = selection
            .keys
            .iter()
            .filter(|(id, _)| !listed.contains(id.as_str()))
            .filter_map(|(id, key)| {
                Some(SelectedMinion {
                    id: id.parse().ok()?,
                    key: Some(key.clone()),
                })
            });
        let tagged = selection
            .chosen
            .iter()
            .map(|id| (Membership::Chosen, member(id)))
            .chain(
                selection
                    .late
                    .iter()
                    .map(|id| (Membership::Late, member(id))),
            )
            .chain(named_only.map(|m| (Membership::Named, m)));
        let mut parts = vec![empty()];
        let mut bytes = 0usize;
        let mut members = 0usize;
        for (membership, member) in tagged {
            members += 1;
            let grows = size(&member);
            if bytes > 0 && bytes + grows > budget {
                parts.push(empty());
                bytes = 0;
            }
            bytes += grows;
            if let Some(part) = parts.last_mut() {
                match membership {
                    Membership::Chosen => part.chosen.push(member),
                    Membership::Late => part.late.push(member),
                    Membership::Named => part.named.push(member),
                }
            }
        }
        if let Some(last) = parts.last_mut() {
            last.summary = Some(SelectionSummary {
                live: selection.live,
                matched: selection.matched,
                missing_fields: selection.missing_fields.clone(),
                reason: selection.reason.clone(),
                filtered: selection.filtered,
                uncertain: selection.uncertain.clone(),
                members: Some(members),
            });
        }
        parts
    }

    /// Puts the parts of one answer back together; an error when some
    /// part did not arrive.
    pub fn join(parts: Vec<Self>) -> Result<crate::selection::Selection, MasterApiError> {
        let mut received = 0usize;
        let mut sent = None;
        let mut selection = crate::selection::Selection {
            chosen: Vec::new(),
            live: 0,
            matched: 0,
            missing_fields: Default::default(),
            reason: String::new(),
            filtered: false,
            keys: Default::default(),
            uncertain: None,
            late: Vec::new(),
        };
        for part in parts {
            let members = part
                .chosen
                .into_iter()
                .map(|m| (Membership::Chosen, m))
                .chain(part.late.into_iter().map(|m| (Membership::Late, m)))
                .chain(part.named.into_iter().map(|m| (Membership::Named, m)));
            for (membership, member) in members {
                received += 1;
                if let Some(key) = member.key {
                    selection.keys.insert(member.id.to_string(), key);
                }
                match membership {
                    Membership::Chosen => selection.chosen.push(member.id),
                    Membership::Late => selection.late.push(member.id),
                    Membership::Named => {}
                }
            }
            if let Some(summary) = part.summary {
                selection.live = summary.live;
                selection.matched = summary.matched;
                selection.missing_fields = summary.missing_fields;
                selection.reason = summary.reason;
                selection.filtered = summary.filtered;
                selection.uncertain = summary.uncertain;
                sent = summary.members;
            }
        }
        match sent {
            Some(sent) if sent != received => Err(MasterApiError::PartsLost { sent, received }),
            _ => Ok(selection),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinionsRequest {
    #[serde(flatten)]
    pub page: PageRequest,
}

/// A registry record and whether the minion is live now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinionEntry {
    #[serde(flatten)]
    pub record: MinionRecord,
    pub live: bool,
    /// How long ago the master last heard from it (a heartbeat or a record
    /// it wrote), when it has since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heard_ms_ago: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinionsPage {
    pub minions: Vec<MinionEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryMode {
    #[default]
    Latest,
    For,
    Any,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRequest {
    /// A CEL expression over id, roles, facts, state, labels and services.
    pub expression: String,
    #[serde(default)]
    pub mode: QueryMode,
    /// The window of `for` and `any`, ending now.
    #[serde(default)]
    pub window_ms: i64,
    #[serde(flatten)]
    pub page: PageRequest,
}

/// One minion in a query's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryMatch {
    pub minion: String,
    /// Whether it is live in the registry now.
    pub live: bool,
    /// Share of the window its samples cover (windows only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Its latest state.
    pub state: Value,
}

/// What happened to the state samples the master has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexCounters {
    pub accepted: u64,
    pub malformed: u64,
    pub out_of_window: u64,
    pub rate_limited: u64,
}

/// One page of a query's answer: the matches among the minions after the
/// request's cursor, in id order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryPage {
    pub matches: Vec<QueryMatch>,
    /// Minions for which it held over the part of the window they reported,
    /// but whose history does not cover enough of it (`for` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub short_history: Vec<QueryMatch>,
    /// Minions looked at, in the whole answer.
    pub considered: usize,
    pub counters: IndexCounters,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A whole query answer, every page taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryAnswer {
    pub matches: Vec<QueryMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub short_history: Vec<QueryMatch>,
    pub considered: usize,
    pub counters: IndexCounters,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRequest {
    /// Also a digest of the whole index (it reads all of it).
    #[serde(default)]
    pub fingerprint: bool,
}

/// How the state index came back after the master started.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RebuildReport {
    pub samples: u64,
    pub seconds: f64,
}

/// The state index in numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexStats {
    pub minions: usize,
    pub counters: IndexCounters,
    pub approximate_bytes: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Absent while the index is still being rebuilt from the stream.
    pub rebuild: Option<RebuildReport>,
}

/// `sync` takes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncOutcome {
    /// A new commit, valid, now the fleet's desired state.
    Applied,
    /// Applied before (by this or an earlier master); nothing written.
    AlreadyApplied,
    /// The branch has not moved.
    Unchanged,
    /// Invalid: the fleet keeps the last good commit.
    Rejected,
    /// Rejected before; not looked at again.
    RejectedBefore,
}

/// One reason a commit is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub file: String,
    pub reason: String,
}

/// What changed when a config was applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplySummary {
    /// Services whose pointer now names a new digest.
    pub services_changed: Vec<String>,
    pub services_removed: Vec<String>,
    pub roles_changed: Vec<String>,
    pub roles_removed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncAnswer {
    pub commit: String,
    pub outcome: SyncOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<ApplySummary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

/// The applied config, as `provis_config/applied` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRecord {
    pub commit: String,
    pub summary: String,
    pub applied_unix_ms: i64,
    pub changes: ApplySummary,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    #[serde(flatten)]
    pub page: PageRequest,
}

/// Where one registered minion stands with the applied commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinionConvergence {
    pub minion: MinionId,
    pub live: bool,
    pub converged: bool,
    /// The commit it converged on last, if any.
    pub commit: Option<String>,
    /// Why it cannot converge on the applied commit: service → reason.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub failed: std::collections::BTreeMap<String, String>,
}

/// A master that runs, as it says in `provis_leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterPresence {
    pub id: String,
    pub version: String,
    pub started_unix_ms: i64,
    /// Whether it holds the lease: it does the writing work.
    pub leading: bool,
    /// Its term, while it leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusPage {
    /// Every master that runs, the leader first (on the first page).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masters: Vec<MasterPresence>,
    pub applied: Option<AppliedRecord>,
    /// The last rejected commit, if any.
    pub rejected: Option<String>,
    pub minions: Vec<MinionConvergence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The whole status, every page taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// Every master that runs, the leader first.
    pub masters: Vec<MasterPresence>,
    pub applied: Option<AppliedRecord>,
    pub rejected: Option<String>,
    pub minions: Vec<MinionConvergence>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleOp {
    Assign,
    Unassign,
    Reset,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRequest {
    pub op: RoleOp,
    pub minion: MinionId,
    /// The role to assign or unassign (none for `reset`).
    #[serde(default)]
    pub role: Option<RoleName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAnswer {
    pub minion: MinionId,
    /// The minion's overlay now (none: back to what git assigns).
    pub overlay: Option<OverlayEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentStatus {
    Pending,
    Accepted,
    Rejected,
    Revoked,
}

/// What the fleet knows of one minion id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    pub minion: MinionId,
    /// The key bound to the id (`ed25519:<hex>`).
    pub key: String,
    pub status: EnrollmentStatus,
    /// When the status last changed.
    pub since_unix_ms: i64,
    /// Who changed it: an operator, `token`, or `minion` for a request.
    pub by: String,
    /// Where the last connection attempt came from.
    #[serde(default)]
    pub host: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollListRequest {
    /// Only records with this status (none: every record).
    #[serde(default)]
    pub status: Option<EnrollmentStatus>,
    #[serde(flatten)]
    pub page: PageRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentPage {
    pub minions: Vec<EnrollmentRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// An operator's decision on an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Accept,
    Reject,
    Revoke,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollDecision {
    pub minion: MinionId,
    pub decision: Decision,
    /// Who decides, as the operator's tool says (recorded, informational).
    #[serde(default)]
    pub by: Option<String>,
    /// The key the operator checked; the decision applies only to it.
    #[serde(default)]
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollDecided {
    pub record: EnrollmentRecord,
    /// Live connections closed (a revocation).
    pub disconnected: usize,
}

/// The longest a one-time enrollment token may stay valid.
pub const MAX_TOKEN_TTL_S: u64 = 30 * 86_400;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// How long the token is valid, in seconds. Default: 3600.
    #[serde(default = "default_token_ttl_s")]
    pub ttl_s: u64,
    /// The only id the token enrolls (none: any new id).
    #[serde(default)]
    pub minion: Option<MinionId>,
}

fn default_token_ttl_s() -> u64 {
    3_600
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenAnswer {
    pub token: String,
    pub ttl_s: u64,
}

impl Paged for MinionsPage {
    type Item = MinionEntry;
    fn next(&self) -> Option<&str> {
        self.next.as_deref()
    }
}

impl Paged for StatusPage {
    type Item = MinionConvergence;
    fn next(&self) -> Option<&str> {
        self.next.as_deref()
    }
}

impl Paged for EnrollmentPage {
    type Item = EnrollmentRecord;
    fn next(&self) -> Option<&str> {
        self.next.as_deref()
    }
}

impl Paged for QueryPage {
    type Item = QueryMatch;
    fn next(&self) -> Option<&str> {
        self.next.as_deref()
    }
}

/// Requests that take a page.
pub trait PagedRequest {
    fn page_mut(&mut self) -> &mut PageRequest;
}

impl PagedRequest for MinionsRequest {
    fn page_mut(&mut self) -> &mut PageRequest {
        &mut self.page
    }
}

impl PagedRequest for QueryRequest {
    fn page_mut(&mut self) -> &mut PageRequest {
        &mut self.page
    }
}

impl PagedRequest for StatusRequest {
    fn page_mut(&mut self) -> &mut PageRequest {
        &mut self.page
    }
}

impl PagedRequest for EnrollListRequest {
    fn page_mut(&mut self) -> &mut PageRequest {
        &mut self.page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_has_a_distinct_subject_and_protocol_name() {
        let mut subjects = ENDPOINTS.to_vec();
        subjects.sort_unstable();
        subjects.dedup();
        assert_eq!(subjects.len(), ENDPOINTS.len());
        for name in [
            Ping::NAME,
            EnrollToken::NAME,
            EnrollDecide::NAME,
            EnrollList::NAME,
        ] {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{name}"
            );
        }
        for read_only in READ_ONLY_ENDPOINTS {
            assert!(ENDPOINTS.contains(read_only));
        }
    }

    #[test]
    fn an_empty_payload_is_an_empty_request_and_a_wrong_shape_is_a_usage_error() {
        let ping: PingRequest = decode_request(b"").unwrap();
        assert_eq!(ping, PingRequest {});
        let token: TokenRequest = decode_request(b" ").unwrap();
        assert_eq!(token.ttl_s, 3_600);
        let err = decode_request::<RoleRequest>(br#"{"op": 5}"#).unwrap_err();
        assert_eq!(err.kind, ApiErrorKind::Usage);
        let err = decode_request::<RoleRequest>(b"not json").unwrap_err();
        assert_eq!(err.kind, ApiErrorKind::Usage);
        let page: MinionsRequest = decode_request(br#"{"cursor": "m9", "limit": 2}"#).unwrap();
        assert_eq!(page.page.cursor.as_deref(), Some("m9"));
        assert_eq!(page.page.limit, Some(2));
        let select: SelectRequest = decode_request(br#"{"target": "role.web"}"#).unwrap();
        assert_eq!(select.pick, crate::selection::Pick::All);
        let select: SelectRequest =
            decode_request(br#"{"target": "all", "pick": {"percent": 30}}"#).unwrap();
        assert_eq!(select.pick, crate::selection::Pick::Percent(30.0));
    }

    #[test]
    fn a_selection_of_any_size_splits_into_parts_and_joins_back_whole() {
        let ids: Vec<MinionId> = (0..10_000)
            .map(|n| format!("swarm{n:05}").parse().unwrap())
            .collect();
        let selection = crate::selection::Selection {
            keys: ids
                .iter()
                .map(|id| (id.to_string(), format!("ed25519:{}", "ab".repeat(32))))
                .collect(),
            // The last ten are named but neither chosen nor late (stopped):
            // their keys travel all the same.
            chosen: ids[..9_980].to_vec(),
            late: ids[9_980..9_990].to_vec(),
            live: 9_990,
            matched: 9_990,
            missing_fields: Default::default(),
            reason: "9990 live in all".into(),
            filtered: false,
            uncertain: None,
        };
        let budget = 48 * 1024;
        let parts = SelectPart::split(&selection, budget);
        assert!(parts.len() > 10, "{} parts", parts.len());
        for part in &parts {
            let bytes = serde_json::to_vec(part).unwrap().len();
            assert!(bytes <= budget + 1_024, "a part of {bytes} bytes");
        }
        assert_eq!(parts.iter().filter(|p| p.is_last()).count(), 1);
        assert!(parts.last().unwrap().is_last());
        let mut lost = parts.clone();
        lost.remove(1);
        assert!(matches!(
            SelectPart::join(lost),
            Err(MasterApiError::PartsLost { .. })
        ));
        assert_eq!(SelectPart::join(parts).unwrap(), selection);
    }
}
