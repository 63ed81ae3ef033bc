//! Driving a rollout on the leading master: each tick moves it one step
//! (switch the next stage after its wait, see its minions converge, gate
//! them, pass or roll back), and writes the record before acting on it, so
//! that a successor resumes at the same stage: a stage already switched is
//! not switched again (its assignments hold), one not switched is not
//! skipped.

use std::collections::BTreeMap;
use std::sync::Arc;

use provis_core::MinionId;
use provis_core::envelope::now_unix_ms;
use provis_core::master_api::{
    ApiError, GateOutcome, Problem, RolloutAction, RolloutAnswer, RolloutRecord, RolloutStatus,
    StageState,
};
use serde_json::json;

use super::DesiredState;
use crate::apply::apply;
use crate::git_source::GitSource;
use crate::repository::ConfigRepository;
use crate::rollout::{plan, run_gate};

/// How long after its stage switched a minion that reports the commit as
/// failing is still waited for: a failed fetch is retried (1 s, 2 s, 4 s…)
/// and usually heals; a failure that lasts longer fails the gate.
const FAILING_GRACE_MS: i64 = 15_000;

/// Steps one tick may take: enough to pass a stage and switch the next.
const MAX_STEPS_PER_TICK: usize = 4;

impl DesiredState {
    /// Plans the rollout of the commit just applied, when the repository
    /// stages commits and there is a last good commit to stage from.
    pub(super) async fn start_rollout(
        &mut self,
        commit: &str,
        summary: &str,
        repo: &ConfigRepository,
        from: Option<provis_core::master_api::AppliedRecord>,
    ) {
        self.rollout = None;
        let (Some(policy), Some((from_commit, from_repo))) = (&repo.rollout, &self.previous) else {
            self.previous = None;
            return;
        };
        if !policy.stages_anything() {
            self.previous = None;
            return;
        }
        let overlay = self.overlay().await;
        let mut affected = Vec::new();
        let mut unaffected = 0;
        let records = self
            .view
            .map_records(|record, live, _| (record.clone(), live));
        for (id, (record, live)) in records {
            let before = super::assignment_under(
                from_commit,
                from_repo,
                &record,
                overlay.get(id.as_str()),
                0,
            );
            let after = super::assignment_under(commit, repo, &record, overlay.get(id.as_str()), 0);
            let changes = provis_core::assignment::Assignment {
                commit: commit.to_owned(),
                ..before
            } != after;
            if changes {
                // Live minions first: a canary that is offline gates nothing.
                affected.push((!live, record.id.clone(), after.roles));
            } else {
                unaffected += 1;
            }
        }
        affected.sort_by_key(|(offline, _, _)| *offline);
        let mut record = plan(
            policy,
            commit,
            summary,
            from,
            Vec::new(),
            unaffected,
            now_unix_ms(),
        );
        // Offline minions go last: plan each half, then join them stage by stage.
        let (online, offline): (Vec<_>, Vec<_>) =
            affected.into_iter().partition(|(off, _, _)| !off);
        let strip = |v: Vec<(bool, MinionId, Vec<provis_core::RoleName>)>| {
            v.into_iter()
                .map(|(_, id, roles)| (id, roles))
                .collect::<Vec<_>>()
        };
        let online_plan = plan(policy, commit, summary, None, strip(online), 0, 0);
        let offline_plan = plan(policy, commit, summary, None, strip(offline), 0, 0);
        record.stages = online_plan.stages;
        record.gates = online_plan.gates;
        if let Some(last) = record.stages.len().checked_sub(1) {
            for stage in offline_plan.stages {
                for (group, members) in stage.groups {
                    record.stages[last]
                        .groups
                        .entry(group)
                        .or_default()
                        .extend(members);
                }
            }
            record.gates.extend(offline_plan.gates);
        } else {
            record.stages = offline_plan.stages;
            record.gates = offline_plan.gates;
        }
        if record.stages.is_empty() {
            record.status = RolloutStatus::Done;
            record.stage = 0;
        }
        tracing::info!(%commit, stages = record.stages.len(), "rollout planned");
        self.emit(
            "rollout.started",
            json!({
                "commit": commit,
                "from": record.from.as_ref().map(|f| f.commit.clone()),
                "stages": record.stages.iter().map(|s| json!({ "name": s.name, "minions": s.len() })).collect::<Vec<_>>(),
                "unaffected": unaffected,
            }),
        )
        .await;
        self.save_rollout(&record).await;
        self.rollout = Some(record);
    }

    /// Takes up the rollout of `commit` a former leader left running.
    pub(super) async fn resume_rollout(&mut self, commit: &str, source: &GitSource) {
        let record = match self.rollouts.active().await {
            Ok(Some(record)) if record.commit == commit && record.status.active() => record,
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(error = %provis_core::error_chain(&err), "cannot read the active rollout");
                return;
            }
        };
        let Some(from) = record.from.clone() else {
            return;
        };
        let source = source.clone();
        let from_commit = from.commit.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let fetched = source
                .export(&from_commit)
                .map_err(|err| provis_core::error_chain(&err))?;
            ConfigRepository::load(&fetched.dir).map_err(|err| err.to_string())
        })
        .await;
        match loaded {
            Ok(Ok(repo)) => {
                tracing::info!(%commit, stage = record.stage, "resuming the rollout a former leader drove");
                self.previous = Some((from.commit.clone(), Arc::new(repo)));
                self.rollout = Some(record);
            }
            Ok(Err(reason)) => {
                tracing::warn!(%commit, from = %from.commit, %reason, "cannot load the last good commit; the rollout cannot resume");
            }
            Err(err) => tracing::warn!(error = %err, "cannot load the last good commit"),
        }
    }

    pub(super) async fn save_rollout(&self, record: &RolloutRecord) {
        if let Err(err) = self.rollouts.save(record).await {
            tracing::warn!(commit = %record.commit, error = %provis_core::error_chain(&err), "rollout not recorded");
        }
    }

    /// The steps of the rollout that are due now: a step that moved it
    /// (a stage switched, gated, passed) is followed at once by the next,
    /// rather than a tick later.
    pub(super) async fn drive_rollout(&mut self) {
        for _ in 0..MAX_STEPS_PER_TICK {
            let Some(mut record) = self.rollout.clone() else {
                return;
            };
            let before = (
                record.status,
                record.stage,
                record.stages.get(record.stage).map(|s| s.state),
            );
            if record.status == RolloutStatus::Running && record.stage < record.stages.len() {
                self.drive_stage(&mut record).await;
            } else if matches!(record.status, RolloutStatus::Running | RolloutStatus::Done) {
                self.gate_late(&mut record).await;
                return;
            }
            let after = self
                .rollout
                .as_ref()
                .map(|r| (r.status, r.stage, r.stages.get(r.stage).map(|s| s.state)));
            if after == Some(before) || after.is_none() {
                return;
            }
        }
    }

    async fn drive_stage(&mut self, record: &mut RolloutRecord) {
        let now = now_unix_ms();
        let index = record.stage;
        let commit = record.commit.clone();
        match record.stages[index].state {
            StageState::Pending => {
                let waited_since = index
                    .checked_sub(1)
                    .and_then(|before| record.stages[before].ended_unix_ms)
                    .unwrap_or(record.started_unix_ms);
                let wait_ms = i64::try_from(record.stages[index].wait_s.saturating_mul(1000))
                    .unwrap_or(i64::MAX);
                if now < waited_since.saturating_add(wait_ms) {
                    return;
                }
                let stage = &mut record.stages[index];
                stage.state = StageState::Switched;
                stage.switched_unix_ms = Some(now);
                let (name, minions) = (stage.name.clone(), stage.len());
                record.updated_unix_ms = now;
                // Recorded first: a successor finds the stage switched.
                self.save_rollout(record).await;
                self.rollout = Some(record.clone());
                self.assign_minions(None).await;
                tracing::info!(%commit, stage = %name, minions, "rollout stage switched");
                self.emit(
                    "rollout.stage_started",
                    json!({ "commit": commit, "stage": name, "index": index, "minions": minions }),
                )
                .await;
            }
            StageState::Switched => {
                let Some(switched_at) = record.stages[index].switched_unix_ms else {
                    return;
                };
                let timed_out = now
                    > switched_at.saturating_add(
                        i64::try_from(record.converge_timeout_s.saturating_mul(1000))
                            .unwrap_or(i64::MAX),
                    );
                let members: Vec<MinionId> = record.stages[index].minions().cloned().collect();
                let failing_counts =
                    timed_out || now > switched_at.saturating_add(FAILING_GRACE_MS);
                let Some((results, converged)) =
                    self.converged_members(&commit, &members, timed_out, failing_counts)
                else {
                    return;
                };
                let stage = &mut record.stages[index];
                stage.results = results;
                stage.state = StageState::Gating;
                record.updated_unix_ms = now;
                self.save_rollout(record).await;
                self.rollout = Some(record.clone());
                self.start_gate(record, converged, false);
            }
            StageState::Gating => {
                if self.gate.is_none() {
                    // Resumed by a new leader: gate who has no result yet.
                    let stage = &record.stages[index];
                    let members: Vec<MinionId> = stage
                        .minions()
                        .filter(|m| !stage.results.contains_key(m.as_str()))
                        .cloned()
                        .collect();
                    let Some((_, converged)) =
                        self.converged_members(&commit, &members, true, true)
                    else {
                        return;
                    };
                    self.start_gate(record, converged, false);
                    return;
                }
                let Some(outcomes) = self.gate_outcomes(false).await else {
                    return;
                };
                let stage = &mut record.stages[index];
                stage.results.extend(outcomes);
                let failed: Vec<(String, String)> = stage
                    .results
                    .iter()
                    .filter(|(_, outcome)| !outcome.ok)
                    .map(|(id, outcome)| (id.clone(), outcome.error.clone().unwrap_or_default()))
                    .collect();
                let budget = record
                    .gates
                    .values()
                    .map(|gate| gate.failure_budget)
                    .min()
                    .unwrap_or(0);
                let name = stage.name.clone();
                stage.ended_unix_ms = Some(now);
                if failed.len() > budget {
                    stage.state = StageState::Failed;
                    let reason = format!(
                        "stage {name:?}: {} of {} minion(s) failed the gate (budget {budget}): {}",
                        failed.len(),
                        stage.len(),
                        failed
                            .iter()
                            .map(|(id, why)| format!("{id}: {why}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    );
                    self.roll_back(record, RolloutStatus::RolledBack, reason)
                        .await;
                    return;
                }
                stage.state = StageState::Passed;
                record.stage += 1;
                record.updated_unix_ms = now;
                let done = record.stage >= record.stages.len();
                if done {
                    record.status = RolloutStatus::Done;
                }
                self.save_rollout(record).await;
                self.rollout = Some(record.clone());
                self.emit(
                    "rollout.stage_passed",
                    json!({ "commit": commit, "stage": name, "index": index, "failed": failed.len() }),
                )
                .await;
                if done {
                    tracing::info!(%commit, "rollout done");
                    self.assign_minions(None).await;
                    self.emit("rollout.done", json!({ "commit": commit })).await;
                }
            }
            StageState::Passed | StageState::Failed => {}
        }
    }

    /// Of `members`, who runs `commit` (to be gated) and who failed to
    /// (their outcome); `None` while some live member is still on its
    /// way and `timed_out` is not, or reports failing and `failing_counts`
    /// is not yet (its retries may still heal it). Offline members are left
    /// out: they are gated when they return.
    fn converged_members(
        &self,
        commit: &str,
        members: &[MinionId],
        timed_out: bool,
        failing_counts: bool,
    ) -> Option<(BTreeMap<String, GateOutcome>, Vec<MinionId>)> {
        let registry = self.view.registry();
        let mut results = BTreeMap::new();
        let mut converged = Vec::new();
        for id in members {
            let Some(record) = registry.get(id.as_str()) else {
                continue;
            };
            if record.converged_commit.as_deref() == Some(commit) {
                converged.push(id.clone());
            } else if let Some(failing) = record.failing.as_ref().filter(|f| f.commit == commit) {
                if !failing_counts {
                    return None;
                }
                let why = failing
                    .services
                    .iter()
                    .map(|(service, reason)| format!("{service}: {reason}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                results.insert(
                    id.to_string(),
                    GateOutcome {
                        ok: false,
                        error: Some(format!("did not converge: {why}")),
                    },
                );
            } else if !self.view.is_live(record) {
                continue;
            } else if timed_out {
                results.insert(
                    id.to_string(),
                    GateOutcome {
                        ok: false,
                        error: Some("did not converge in time".to_owned()),
                    },
                );
            } else {
                return None;
            }
        }
        Some((results, converged))
    }

    /// Sends the gate of each member's policy to `members`.
    fn start_gate(&mut self, record: &RolloutRecord, members: Vec<MinionId>, late: bool) {
        let policy_of: BTreeMap<&str, &str> = record
            .stages
            .iter()
            .flat_map(|stage| {
                stage.groups.iter().flat_map(|(group, ids)| {
                    ids.iter().map(move |id| (id.as_str(), group.as_str()))
                })
            })
            .collect();
        let mut calls: BTreeMap<String, Vec<MinionId>> = BTreeMap::new();
        let mut passed = BTreeMap::new();
        for id in members {
            let group = policy_of
                .get(id.as_str())
                .copied()
                .unwrap_or(crate::rollout::DEFAULT_POLICY);
            if record.gates.contains_key(group) {
                calls.entry(group.to_owned()).or_default().push(id);
            } else {
                passed.insert(
                    id.to_string(),
                    GateOutcome {
                        ok: true,
                        error: None,
                    },
                );
            }
        }
        let gates: Vec<_> = calls
            .into_iter()
            .filter_map(|(group, ids)| Some((ids, record.gates.get(&group)?.clone())))
            .collect();
        let client = self.gate_client.clone();
        let task = tokio::spawn(async move {
            let mut outcomes = passed;
            for (ids, gate) in gates {
                outcomes.extend(run_gate(client.clone(), ids, gate).await);
            }
            outcomes
        });
        self.gate = Some((task, late));
    }

    /// The outcomes of the gate under way (of the kind asked), once it ended.
    async fn gate_outcomes(&mut self, late: bool) -> Option<BTreeMap<String, GateOutcome>> {
        match &self.gate {
            Some((task, kind)) if *kind == late && task.is_finished() => {}
            _ => return None,
        }
        let (task, _) = self.gate.take()?;
        match task.await {
            Ok(outcomes) => Some(outcomes),
            Err(err) => {
                tracing::warn!(error = %err, "gate task failed; gating again");
                None
            }
        }
    }

    /// Gates minions of passed stages that were offline when their stage
    /// came and now run the commit; one that fails goes back to the last
    /// good commit (held back).
    async fn gate_late(&mut self, record: &mut RolloutRecord) {
        if let Some(outcomes) = self.gate_outcomes(true).await {
            let failed: Vec<String> = outcomes
                .iter()
                .filter(|(_, o)| !o.ok)
                .map(|(id, _)| id.clone())
                .collect();
            record.late.extend(outcomes);
            record.held_back.extend(failed.iter().cloned());
            record.updated_unix_ms = now_unix_ms();
            self.save_rollout(record).await;
            self.rollout = Some(record.clone());
            if !failed.is_empty() {
                self.assign_minions(None).await;
                self.emit(
                    "rollout.late_gate_failed",
                    json!({ "commit": record.commit, "minions": failed }),
                )
                .await;
            }
            return;
        }
        if self.gate.is_some() {
            return;
        }
        let registry = self.view.registry();
        let due: Vec<MinionId> = record
            .stages
            .iter()
            .filter(|stage| stage.state == StageState::Passed)
            .flat_map(|stage| {
                stage
                    .minions()
                    .filter(|id| !stage.results.contains_key(id.as_str()))
            })
            .filter(|id| !record.late.contains_key(id.as_str()))
            .filter(|id| {
                registry
                    .get(id.as_str())
                    .is_some_and(|r| r.converged_commit.as_deref() == Some(record.commit.as_str()))
            })
            .cloned()
            .collect();
        drop(registry);
        if !due.is_empty() {
            tracing::info!(commit = %record.commit, minions = due.len(), "gating minions that came back");
            self.start_gate(record, due, true);
        }
    }

    /// Puts every minion back on the last good commit and ends the
    /// rollout as `status`, saying why; the commit is then kept out like
    /// a rejected one until a newer commit comes.
    async fn roll_back(
        &mut self,
        record: &mut RolloutRecord,
        status: RolloutStatus,
        reason: String,
    ) {
        let commit = record.commit.clone();
        record.status = status;
        record.reason = Some(reason.clone());
        record.updated_unix_ms = now_unix_ms();
        self.save_rollout(record).await;
        if let Some((task, _)) = self.gate.take() {
            task.abort();
        }
        self.rollout = None;
        let Some((from_commit, from_repo)) = self.previous.take() else {
            return;
        };
        tracing::warn!(%commit, back_to = %from_commit, %reason, "rolling back");
        if let Some(term) = self.leadership.term()
            && let Err(err) = apply(&self.js, &from_repo, Some(&self.identity), term).await
        {
            tracing::warn!(error = %provis_core::error_chain(&err), "the last good services and roles are not all written back");
        }
        self.applied.clone_from(&record.from);
        if let Some(applied) = &self.applied
            && let Ok(value) = serde_json::to_vec(applied)
            && let Err(err) = self.config.put("applied", value.into()).await
        {
            tracing::warn!(error = %err, "the rolled-back-to commit is not recorded");
        }
        let problems = vec![Problem {
            file: crate::rollout::ROLLOUT_FILE.to_owned(),
            reason: reason.clone(),
        }];
        let data = json!({ "commit": commit, "summary": record.summary, "problems": problems, "keeping": from_commit });
        if let Ok(value) = serde_json::to_vec(&data)
            && let Err(err) = self.config.put("rejected", value.into()).await
        {
            tracing::warn!(error = %err, "the rolled-back commit is not recorded");
        }
        self.rejected = Some(commit.clone());
        self.take_loaded(from_commit.clone(), from_repo);
        self.publish();
        self.assign_minions(None).await;
        let kind = match status {
            RolloutStatus::Aborted => "rollout.aborted",
            _ => "rollout.rolled_back",
        };
        self.emit(
            kind,
            json!({ "commit": commit, "back_to": from_commit, "reason": reason }),
        )
        .await;
    }

    /// `provis rollout pause|resume|abort`.
    pub(super) async fn control_rollout(
        &mut self,
        action: RolloutAction,
    ) -> Result<RolloutAnswer, ApiError> {
        let Some(mut record) = self.rollout.clone().filter(|r| r.status.active()) else {
            return Err(ApiError::conflict("no rollout is running"));
        };
        match action {
            RolloutAction::Pause => record.status = RolloutStatus::Paused,
            RolloutAction::Resume => record.status = RolloutStatus::Running,
            RolloutAction::Abort => {
                self.roll_back(
                    &mut record,
                    RolloutStatus::Aborted,
                    "aborted by an operator".to_owned(),
                )
                .await;
                return Ok(RolloutAnswer {
                    rollout: Some(record),
                });
            }
        }
        record.updated_unix_ms = now_unix_ms();
        self.save_rollout(&record).await;
        self.rollout = Some(record.clone());
        let kind = match action {
            RolloutAction::Pause => "rollout.paused",
            _ => "rollout.resumed",
        };
        self.emit(kind, json!({ "commit": record.commit })).await;
        Ok(RolloutAnswer {
            rollout: Some(record),
        })
    }
}
