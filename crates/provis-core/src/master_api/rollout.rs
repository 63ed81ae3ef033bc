//! Rollouts as the master records and shows them (`provis_rollouts`):
//! a commit reaches the minions it changes stage by stage, each stage gated
//! by a health call, and is rolled back by itself when a gate fails.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::AppliedRecord;
use crate::subject::MinionId;

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Stages are switched and gated one after the other.
    Running,
    /// No next stage starts until `provis rollout resume`.
    Paused,
    /// Every stage passed: the commit is the fleet's.
    Done,
    /// A gate failed: every minion is back on the last good commit.
    RolledBack,
    /// An operator aborted it (`provis rollout abort`), or a newer commit
    /// took its place: the minions it switched went back.
    Aborted,
}

impl RolloutStatus {
    /// Still to be driven (or resumed) by the leader.
    pub fn active(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// Where one stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Pending,
    /// Its minions were given the commit; waiting for them to converge.
    Switched,
    /// Its gate call is out.
    Gating,
    Passed,
    Failed,
}

/// The health call that must answer ok on every minion of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateSpec {
    /// `service.method`, e.g. `health.check`.
    pub call: String,
    /// How long the call may take on each minion. Default: 10.
    #[serde(default = "default_gate_timeout_s")]
    pub timeout_s: u64,
    /// How many minions of a stage may fail it before the rollout is
    /// rolled back. Default: 0.
    #[serde(default)]
    pub failure_budget: usize,
}

fn default_gate_timeout_s() -> u64 {
    10
}

/// What a gate (or the convergence before it) said of one minion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateOutcome {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One stage: its minions, by the policy (`default` or a role of
/// rollout.toml's `[roles.<role>]`) whose gate they pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub groups: BTreeMap<String, Vec<MinionId>>,
    /// Seconds to wait after the stage before it passed, before this one.
    pub wait_s: u64,
    pub state: StageState,
    /// Each minion's gate outcome, once known.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub results: BTreeMap<String, GateOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_unix_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_unix_ms: Option<i64>,
}

impl StageRecord {
    pub fn minions(&self) -> impl Iterator<Item = &MinionId> {
        self.groups.values().flatten()
    }

    pub fn len(&self) -> usize {
        self.groups.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One commit's rollout, as `provis_rollouts/<commit>` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub commit: String,
    pub summary: String,
    /// The last good commit: where a rollback goes.
    pub from: Option<AppliedRecord>,
    pub status: RolloutStatus,
    /// The stage being switched or gated (= stages.len() once done).
    pub stage: usize,
    pub stages: Vec<StageRecord>,
    /// Policy → its gate (a policy without one passes once converged).
    #[serde(default)]
    pub gates: BTreeMap<String, GateSpec>,
    /// How long a stage's minions may take to run the commit.
    pub converge_timeout_s: u64,
    /// Minions the commit does not change: switched at once, never gated.
    pub unaffected: usize,
    /// Minions that were offline when their stage came (or joined later):
    /// switched when the rollout is done and they are back, then gated.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub late: BTreeMap<String, GateOutcome>,
    /// Late minions that failed their gate: kept on the last good commit.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub held_back: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_unix_ms: i64,
    pub updated_unix_ms: i64,
}

impl RolloutRecord {
    /// Whether `minion` runs this commit now, as far as the rollout goes.
    pub fn switched(&self, minion: &str) -> bool {
        match self.status {
            RolloutStatus::Running | RolloutStatus::Paused => self
                .stages
                .iter()
                .filter(|stage| stage.state != StageState::Pending)
                .any(|stage| stage.minions().any(|m| m.as_str() == minion)),
            RolloutStatus::Done => !self.held_back.contains(minion),
            RolloutStatus::RolledBack | RolloutStatus::Aborted => false,
        }
    }

    /// Whether `minion` has a stage in this rollout.
    pub fn staged(&self, minion: &str) -> bool {
        self.stages
            .iter()
            .any(|stage| stage.minions().any(|m| m.as_str() == minion))
    }

    /// The same record without the member lists (for history).
    pub fn summarized(&self) -> RolloutRecord {
        let mut record = self.clone();
        for stage in &mut record.stages {
            for members in stage.groups.values_mut() {
                members.clear();
            }
            stage.results.retain(|_, outcome| !outcome.ok);
        }
        record
    }
}

/// `rollout.status` takes nothing: the active rollout, else the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatusRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutAnswer {
    pub rollout: Option<RolloutRecord>,
}

/// `rollout.history`: the latest rollouts first, member lists left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutHistoryRequest {
    #[serde(default = "default_history_limit")]
    pub limit: usize,
}

impl Default for RolloutHistoryRequest {
    fn default() -> Self {
        Self {
            limit: default_history_limit(),
        }
    }
}

fn default_history_limit() -> usize {
    20
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutHistory {
    pub rollouts: Vec<RolloutRecord>,
}

/// What an operator does to the active rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutAction {
    Pause,
    Resume,
    /// Back to the last good commit, and stop.
    Abort,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutControlRequest {
    pub action: RolloutAction,
}
