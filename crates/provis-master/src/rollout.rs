//! Staged rollouts: `rollout.toml` in the config repository says how a
//! commit reaches the minions it changes (a canary, then batches), how
//! long to wait between stages and which health call gates each stage.
//! This module owns the policy, the plan of a rollout, its record in
//! `provis_rollouts` and the gate call; the desired-state loop
//! ([`crate::desired`]) drives it on the leading master.
//!
//! ```toml
//! wait_s = 10                 # between stages (default 0)
//! converge_timeout_s = 120    # for a stage's minions to run the commit
//! [[stages]]
//! name = "canary"
//! count = 1                   # or percent = 10: the total switched after it
//! [[stages]]
//! percent = 50                # a last stage for the rest is implied
//! [gate]
//! call = "health.check"
//! timeout_s = 10
//! failure_budget = 0          # minions per stage that may fail
//! [roles.db]                  # minions of role db (or db.*) follow this instead
//! wait_s = 60
//! stages = [{ count = 1 }]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt as _;
use provis_core::master_api::{
    AppliedRecord, GateOutcome, GateSpec, RolloutRecord, RolloutStatus, StageRecord, StageState,
};
use provis_core::{MinionId, RoleName};
use serde::Deserialize;

/// The file in the config repository.
pub const ROLLOUT_FILE: &str = "rollout.toml";

/// The key naming the commit being rolled out.
const ACTIVE_KEY: &str = "active";

/// The policy every minion without a role override follows.
pub const DEFAULT_POLICY: &str = "default";

/// `rollout.toml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPolicy {
    #[serde(flatten)]
    pub default: StagePolicy,
    /// How long a stage's minions may take to run the commit. Default: 120.
    #[serde(default)]
    pub converge_timeout_s: Option<u64>,
    /// Role → the policy its minions follow instead.
    #[serde(default)]
    pub roles: BTreeMap<RoleName, StagePolicy>,
}

/// Stages, the wait between them, and the gate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagePolicy {
    #[serde(default)]
    pub stages: Vec<StageSpec>,
    #[serde(default)]
    pub wait_s: u64,
    #[serde(default)]
    pub gate: Option<GateSpec>,
}

/// How many minions have the commit once a stage is done.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub count: Option<usize>,
    #[serde(default)]
    pub percent: Option<f64>,
}

const DEFAULT_CONVERGE_TIMEOUT_S: u64 = 120;

impl RolloutPolicy {
    /// Reads `rollout.toml` from `text`, with every problem found.
    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        let policy: Self = toml::from_str(text).map_err(|err| vec![err.to_string()])?;
        let problems = policy.problems();
        if problems.is_empty() {
            Ok(policy)
        } else {
            Err(problems)
        }
    }

    fn problems(&self) -> Vec<String> {
        let policies = std::iter::once((DEFAULT_POLICY.to_owned(), &self.default)).chain(
            self.roles
                .iter()
                .map(|(role, policy)| (format!("roles.{role}"), policy)),
        );
        let mut problems = Vec::new();
        for (at, policy) in policies {
            for (n, stage) in policy.stages.iter().enumerate() {
                match (stage.count, stage.percent) {
                    (Some(0), None) => {
                        problems.push(format!("{at}: stage {} counts no minion", n + 1))
                    }
                    (Some(_), None) => {}
                    (None, Some(p)) if p > 0.0 && p <= 100.0 => {}
                    (None, Some(p)) => problems.push(format!(
                        "{at}: stage {} percent {p} is not in (0, 100]",
                        n + 1
                    )),
                    _ => problems.push(format!(
                        "{at}: stage {} needs exactly one of count and percent",
                        n + 1
                    )),
                }
            }
            if let Some(gate) = &policy.gate {
                let parts: Vec<&str> = gate.call.split('.').collect();
                if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                    problems.push(format!(
                        "{at}: gate call {:?} is not service.method",
                        gate.call
                    ));
                }
                if gate.timeout_s == 0 {
                    problems.push(format!("{at}: gate timeout_s must be at least 1"));
                }
            }
        }
        problems
    }

    /// Whether a commit under this policy goes out in more than one step
    /// or through a gate (else it is simply applied everywhere at once).
    pub fn stages_anything(&self) -> bool {
        std::iter::once(&self.default)
            .chain(self.roles.values())
            .any(|p| !p.stages.is_empty() || p.gate.is_some())
    }

    /// The policy a minion with `roles` follows: the first of its roles
    /// (or their parents) with an override, else the default.
    fn policy_of(&self, roles: &[RoleName]) -> (String, &StagePolicy) {
        let mut levels: Vec<&str> = roles
            .iter()
            .flat_map(RoleName::ancestors_and_self)
            .collect();
        levels.sort();
        levels
            .into_iter()
            .find_map(|level| {
                self.roles
                    .iter()
                    .find(|(role, _)| role.as_str() == level)
                    .map(|(role, policy)| (role.to_string(), policy))
            })
            .unwrap_or_else(|| (DEFAULT_POLICY.to_owned(), &self.default))
    }
}

/// How many of `total` have the commit after each stage of `stages`: each
/// stage adds at least one, the last reaches everyone.
fn stage_targets(stages: &[StageSpec], total: usize) -> Vec<usize> {
    let mut targets = Vec::new();
    let mut reached = 0;
    for stage in stages {
        let wanted = match (stage.count, stage.percent) {
            (Some(count), _) => count,
            (None, Some(p)) => (total as f64 * p / 100.0).ceil() as usize,
            (None, None) => total,
        };
        let target = wanted.max(reached + 1).min(total);
        if target > reached {
            targets.push(target);
            reached = target;
        }
    }
    if reached < total {
        targets.push(total);
    }
    targets
}

/// The plan of a rollout of `commit` over the `affected` minions (id and
/// roles, the live ones whose desired state it changes).
pub fn plan(
    policy: &RolloutPolicy,
    commit: &str,
    summary: &str,
    from: Option<AppliedRecord>,
    affected: Vec<(MinionId, Vec<RoleName>)>,
    unaffected: usize,
    now_ms: i64,
) -> RolloutRecord {
    let mut groups: BTreeMap<String, (&StagePolicy, Vec<MinionId>)> = BTreeMap::new();
    for (id, roles) in &affected {
        let (name, stage_policy) = policy.policy_of(roles);
        groups
            .entry(name)
            .or_insert_with(|| (stage_policy, Vec::new()))
            .1
            .push(id.clone());
    }
    let mut stages: Vec<StageRecord> = Vec::new();
    let mut gates = BTreeMap::new();
    for (name, (stage_policy, mut members)) in groups {
        // A canary chosen afresh for every commit, the same on every master.
        members.sort_by_key(|id| {
            let mut hasher = DefaultHasher::new();
            (commit, id.as_str()).hash(&mut hasher);
            hasher.finish()
        });
        if let Some(gate) = &stage_policy.gate {
            gates.insert(name.clone(), gate.clone());
        }
        let mut start = 0;
        for (n, target) in stage_targets(&stage_policy.stages, members.len())
            .into_iter()
            .enumerate()
        {
            if stages.len() <= n {
                let named = policy.default.stages.get(n).and_then(|s| s.name.clone());
                stages.push(StageRecord {
                    name: named.unwrap_or_else(|| format!("stage {}", n + 1)),
                    groups: BTreeMap::new(),
                    wait_s: 0,
                    state: StageState::Pending,
                    results: BTreeMap::new(),
                    switched_unix_ms: None,
                    ended_unix_ms: None,
                });
            }
            let stage = &mut stages[n];
            if n > 0 {
                stage.wait_s = stage.wait_s.max(stage_policy.wait_s);
            }
            stage
                .groups
                .insert(name.clone(), members[start..target].to_vec());
            start = target;
        }
    }
    RolloutRecord {
        commit: commit.to_owned(),
        summary: summary.to_owned(),
        from,
        status: RolloutStatus::Running,
        stage: 0,
        stages,
        gates,
        converge_timeout_s: policy
            .converge_timeout_s
            .unwrap_or(DEFAULT_CONVERGE_TIMEOUT_S),
        unaffected,
        late: BTreeMap::new(),
        held_back: BTreeSet::new(),
        reason: None,
        started_unix_ms: now_ms,
        updated_unix_ms: now_ms,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutStoreError {
    #[error("cannot {what} in {}", provis_core::storage::BUCKET_ROLLOUTS)]
    Kv {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot encode the rollout of {commit}")]
    Encode {
        commit: String,
        #[source]
        source: serde_json::Error,
    },
}

fn kv_error<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> RolloutStoreError {
    move |source| RolloutStoreError::Kv {
        what,
        source: Box::new(source),
    }
}

/// `provis_rollouts`: every rollout by commit, and which one is active.
#[derive(Debug, Clone)]
pub struct RolloutStore {
    kv: kv::Store,
}

impl RolloutStore {
    pub fn new(kv: kv::Store) -> Self {
        Self { kv }
    }

    /// Writes `record` (and marks it active while it is).
    pub async fn save(&self, record: &RolloutRecord) -> Result<(), RolloutStoreError> {
        let value = serde_json::to_vec(record).map_err(|source| RolloutStoreError::Encode {
            commit: record.commit.clone(),
            source,
        })?;
        self.kv
            .put(record.commit.as_str(), value.into())
            .await
            .map_err(kv_error("write a rollout"))?;
        let active = if record.status.active() {
            record.commit.clone()
        } else {
            String::new()
        };
        self.kv
            .put(ACTIVE_KEY, active.into_bytes().into())
            .await
            .map_err(kv_error("mark the active rollout"))?;
        Ok(())
    }

    pub async fn get(&self, commit: &str) -> Result<Option<RolloutRecord>, RolloutStoreError> {
        let value = self
            .kv
            .get(commit)
            .await
            .map_err(kv_error("read a rollout"))?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The rollout being driven, if one is.
    pub async fn active(&self) -> Result<Option<RolloutRecord>, RolloutStoreError> {
        let commit = self
            .kv
            .get(ACTIVE_KEY)
            .await
            .map_err(kv_error("read the active rollout"))?;
        match commit.map(|c| String::from_utf8_lossy(&c).into_owned()) {
            Some(commit) if !commit.is_empty() => self.get(&commit).await,
            _ => Ok(None),
        }
    }

    /// Every rollout recorded, the newest first.
    pub async fn history(&self) -> Result<Vec<RolloutRecord>, RolloutStoreError> {
        let mut keys = self.kv.keys().await.map_err(kv_error("list rollouts"))?;
        let mut records = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(kv_error("list rollouts"))?;
            if key == ACTIVE_KEY {
                continue;
            }
            if let Some(record) = self.get(&key).await? {
                records.push(record);
            }
        }
        records.sort_by_key(|r| std::cmp::Reverse(r.started_unix_ms));
        Ok(records)
    }
}

/// Calls `gate` on `minions` and says how each answered; a minion that
/// did not answer in time failed it.
pub async fn run_gate(
    client: provis_core::Client,
    minions: Vec<MinionId>,
    gate: GateSpec,
) -> BTreeMap<String, GateOutcome> {
    let mut outcomes = BTreeMap::new();
    if minions.is_empty() {
        return outcomes;
    }
    let request = match provis_core::CallRequest::parse_function(
        &gate.call,
        serde_json::Value::Null,
        Duration::from_secs(gate.timeout_s.max(1)),
    ) {
        Ok(request) => request,
        Err(err) => {
            let error = format!("gate call {:?}: {err}", gate.call);
            return minions
                .into_iter()
                .map(|id| {
                    let outcome = GateOutcome {
                        ok: false,
                        error: Some(error.clone()),
                    };
                    (id.to_string(), outcome)
                })
                .collect();
        }
    };
    let target = provis_core::CallTarget::Minions(minions.clone());
    match client.call(&target, &request).await {
        Ok(report) => {
            for line in report.replies {
                let ok = line.status == provis_core::ReplyStatus::Ok;
                let error = (!ok).then(|| {
                    line.error
                        .as_ref()
                        .map(|e| e.message.clone())
                        .unwrap_or_else(|| format!("{:?}", line.status).to_lowercase())
                });
                outcomes.insert(line.minion, GateOutcome { ok, error });
            }
        }
        Err(err) => {
            let error = provis_core::error_chain(&err);
            for id in &minions {
                outcomes.insert(
                    id.to_string(),
                    GateOutcome {
                        ok: false,
                        error: Some(error.clone()),
                    },
                );
            }
        }
    }
    for id in minions {
        outcomes.entry(id.to_string()).or_insert(GateOutcome {
            ok: false,
            error: Some("no reply".to_owned()),
        });
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<(MinionId, Vec<RoleName>)> {
        (0..n)
            .map(|i| {
                let role: RoleName = if i % 4 == 0 { "db" } else { "web" }.parse().expect("role");
                (format!("m{i}").parse().expect("id"), vec![role])
            })
            .collect()
    }

    #[test]
    fn stages_are_cumulative_and_reach_everyone() {
        let spec = |count: Option<usize>, percent: Option<f64>| StageSpec {
            name: None,
            count,
            percent,
        };
        assert_eq!(
            stage_targets(&[spec(Some(1), None), spec(None, Some(50.0))], 10),
            vec![1, 5, 10]
        );
        assert_eq!(stage_targets(&[spec(Some(5), None)], 3), vec![3]);
        assert_eq!(
            stage_targets(&[spec(None, Some(1.0))], 1000),
            vec![10, 1000]
        );
        assert_eq!(stage_targets(&[], 4), vec![4]);
        assert!(stage_targets(&[spec(Some(1), None)], 0).is_empty());
    }

    #[test]
    fn a_plan_puts_each_minion_in_one_stage_with_its_role_s_policy() {
        let policy = RolloutPolicy::parse(
            "wait_s = 3\n[[stages]]\nname = \"canary\"\ncount = 1\n[[stages]]\npercent = 50\n\
             [gate]\ncall = \"health.check\"\n[roles.db]\nstages = [{ count = 2 }]\n",
        )
        .expect("policy");
        let record = plan(&policy, "c1", "s", None, ids(12), 2, 0);
        assert_eq!(record.stages[0].name, "canary");
        let mut seen = BTreeSet::new();
        for stage in &record.stages {
            for id in stage.minions() {
                assert!(seen.insert(id.clone()), "{id} twice");
            }
        }
        assert_eq!(seen.len(), 12);
        assert_eq!(record.stages[0].groups[DEFAULT_POLICY].len(), 1);
        assert_eq!(record.stages[0].groups["db"].len(), 2);
        assert_eq!(record.stages[1].wait_s, 3);
        assert!(record.gates.contains_key(DEFAULT_POLICY) && !record.gates.contains_key("db"));
        assert!(
            !record.switched("m1"),
            "nothing switched before the first stage"
        );
    }

    #[test]
    fn bad_policies_say_what_is_wrong() {
        let problems = RolloutPolicy::parse(
            "[[stages]]\ncount = 1\npercent = 5\n[[stages]]\npercent = 150\n[gate]\ncall = \"nodot\"\n",
        )
        .expect_err("invalid");
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
