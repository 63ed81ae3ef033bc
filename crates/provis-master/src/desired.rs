//! Desired state from git: the master follows one branch of a repository,
//! validates each new commit as a whole, applies a valid one (bundles, service
//! pointers, roles, then every minion's assignment) and announces it with
//! `config.applied`; an invalid one is announced with `config.rejected`,
//! every reason and file in it, and the fleet keeps the last good state.
//! Reverting a commit is a new commit with the old content: a rollback.
//!
//! What was applied is recorded in `provis_config/applied`, so a master
//! restart applies nothing twice. Assignments are recomputed for a minion
//! when it appears or its facts change, and for everyone after an apply or
//! an overlay change; only entries that differ are written.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use provis_core::envelope::now_unix_ms;
use provis_core::master_api::{
    ApiError, GateOutcome, Problem, RoleAnswer, RoleOp, RoleRequest, RolloutAction, RolloutAnswer,
    RolloutRecord, RolloutStatus, SyncAnswer, SyncOutcome,
};
use provis_core::storage::{BUCKET_ASSIGNMENTS, BUCKET_CONFIG, BUCKET_ROLLOUTS};
use provis_core::{Subjects, event};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use crate::apply::apply;
use crate::assignments::{Overlay, OverlayEntry};
use crate::fleet_view::FleetView;
use crate::git_source::GitSource;
use crate::repository::ConfigRepository;
use crate::rollout::RolloutStore;
use provis_core::assignment::Assignment;

mod driving;
mod planning;

/// How often a running rollout is looked at (stage switched, converged,
/// gate answered).
const ROLLOUT_TICK: Duration = Duration::from_millis(500);

/// A gate call under way, and whether it gates late minions (else the
/// current stage).
type GateTask = (tokio::task::JoinHandle<BTreeMap<String, GateOutcome>>, bool);
pub use provis_core::master_api::AppliedRecord;

/// What the desired-state loop has applied and rejected, as requests read
/// it without waiting for the loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishedConfig {
    pub applied: Option<AppliedRecord>,
    /// The last rejected commit.
    pub rejected: Option<String>,
}

/// Where desired state comes from: the part of the master's settings
/// ([`crate::MasterConfig::source`]) the loop follows and takes up on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSettings {
    pub repository: Option<String>,
    pub branch: String,
    pub poll_interval_s: u64,
}

/// A request the desired-state loop answers.
#[derive(Debug)]
pub enum DesiredRequest {
    /// Fetch now and apply what is new.
    Sync(oneshot::Sender<Result<SyncAnswer, ApiError>>),
    /// Change the role overlay of one minion.
    Role {
        request: RoleRequest,
        reply: oneshot::Sender<Result<RoleAnswer, ApiError>>,
    },
    /// Recompute one minion's assignment (it appeared or its facts changed).
    Minion(String),
    /// What a revision would change.
    Plan {
        rev: Option<String>,
        reply: oneshot::Sender<Result<provis_core::master_api::PlanAnswer, ApiError>>,
    },
    /// Pause, resume or abort the active rollout.
    Rollout {
        action: RolloutAction,
        reply: oneshot::Sender<Result<RolloutAnswer, ApiError>>,
    },
}

pub struct DesiredState {
    js: jetstream::Context,
    outbox: provis_core::outbox::Outbox,
    subjects: Subjects,
    view: Arc<FleetView>,
    work_dir: PathBuf,
    /// Signs every bundle the master publishes.
    identity: Arc<provis_core::identity::Identity>,
    config: kv::Store,
    assignments: kv::Store,
    loaded: Option<(String, Arc<ConfigRepository>)>,
    applied: Option<AppliedRecord>,
    rejected: Option<String>,
    last_source_error: Option<String>,
    published: watch::Sender<PublishedConfig>,
    /// The loaded commit's reactions, for the reactor.
    reactions: watch::Sender<Vec<crate::reactions::ReactionSpec>>,
    /// The loaded commit's schedules, for the scheduler and `provis schedule`.
    schedules: watch::Sender<Vec<crate::schedules::ScheduleSpec>>,
    /// Only the leading master writes desired state.
    leadership: crate::leadership::Leadership,
    rollouts: RolloutStore,
    /// The rollout of the loaded commit, while this master knows it.
    rollout: Option<RolloutRecord>,
    /// The last good commit, where minions not yet switched stay.
    previous: Option<(String, Arc<ConfigRepository>)>,
    gate: Option<GateTask>,
    /// Calls gates, as the master.
    gate_client: provis_core::Client,
}

impl std::fmt::Debug for DesiredState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredState")
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl DesiredState {
    pub async fn open(
        js: jetstream::Context,
        outbox: provis_core::outbox::Outbox,
        subjects: Subjects,
        view: Arc<FleetView>,
        work_dir: PathBuf,
        identity: Arc<provis_core::identity::Identity>,
        leadership: crate::leadership::Leadership,
    ) -> Result<Self, jetstream::context::KeyValueError> {
        let config = js.get_key_value(BUCKET_CONFIG).await?;
        let assignments = js.get_key_value(BUCKET_ASSIGNMENTS).await?;
        let rollouts = RolloutStore::new(js.get_key_value(BUCKET_ROLLOUTS).await?);
        let gate_client = provis_core::Client::new(js.client(), subjects.clone(), "master")
            .with_shared_signer(identity.clone());
        let applied = match config.get("applied").await {
            Ok(Some(value)) => serde_json::from_slice(&value).ok(),
            _ => None,
        };
        let rejected = match config.get("rejected").await {
            Ok(Some(value)) => serde_json::from_slice::<Value>(&value)
                .ok()
                .and_then(|v| v["commit"].as_str().map(str::to_owned)),
            _ => None,
        };
        let published = watch::Sender::new(PublishedConfig {
            applied: applied.clone(),
            rejected: rejected.clone(),
        });
        Ok(Self {
            js,
            outbox,
            subjects,
            view,
            work_dir,
            identity,
            config,
            assignments,
            loaded: None,
            applied,
            rejected,
            last_source_error: None,
            published,
            reactions: watch::Sender::new(Vec::new()),
            schedules: watch::Sender::new(Vec::new()),
            leadership,
            rollouts,
            rollout: None,
            previous: None,
            gate: None,
            gate_client,
        })
    }

    /// The reactions of the loaded commit, kept current.
    pub fn reactions(&self) -> watch::Receiver<Vec<crate::reactions::ReactionSpec>> {
        self.reactions.subscribe()
    }

    /// The schedules of the loaded commit, kept current.
    pub fn schedules(&self) -> watch::Receiver<Vec<crate::schedules::ScheduleSpec>> {
        self.schedules.subscribe()
    }

    /// Takes `repo` of `commit` as the loaded one, with its reactions and schedules.
    fn take_loaded(&mut self, commit: String, repo: Arc<ConfigRepository>) {
        fn replace<T: PartialEq + Clone>(sender: &watch::Sender<Vec<T>>, new: &[T]) {
            sender.send_if_modified(|current| {
                let changed = current.as_slice() != new;
                if changed {
                    *current = new.to_vec();
                }
                changed
            });
        }
        replace(&self.reactions, &repo.reactions);
        replace(&self.schedules, &repo.schedules);
        self.loaded = Some((commit, repo));
    }

    /// What this loop has applied and rejected, kept current.
    pub fn published(&self) -> watch::Receiver<PublishedConfig> {
        self.published.subscribe()
    }

    fn publish(&self) {
        self.published.send_replace(PublishedConfig {
            applied: self.applied.clone(),
            rejected: self.rejected.clone(),
        });
    }

    /// Serves until `stop` fires: polls the branch, answers requests,
    /// follows settings changes. Whatever it is doing when `stop` fires (an
    /// apply) it finishes first; requests still queued then are dropped,
    /// which their askers hear as "stopping".
    pub async fn run(
        mut self,
        mut settings: watch::Receiver<SourceSettings>,
        mut requests: mpsc::Receiver<DesiredRequest>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        // The next poll is fixed when the last one ran, so a stream of other
        // requests never pushes it back.
        let mut last_poll = tokio::time::Instant::now();
        let mut leading = self.leadership.watch();
        let mut led = false;
        let mut rollout_tick = tokio::time::interval(ROLLOUT_TICK);
        rollout_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let current = settings.borrow().clone();
            let poll = self
                .loaded
                .as_ref()
                .and_then(|(_, repo)| repo.master.poll_interval_s)
                .unwrap_or(current.poll_interval_s)
                .max(1);
            let leads = leading.borrow_and_update().leading();
            if leads && !led {
                // Just took the lease: catch up with the repository (what
                // a former leader left half done included) and with every
                // minion's assignment.
                tracing::info!("leading: desired state is this master's to write");
                self.take_over(&current).await;
                last_poll = tokio::time::Instant::now();
            } else if led && !leads {
                tracing::info!("no longer leading: desired state is the new leader's");
                // Its successor resumes the rollout from the record.
                self.rollout = None;
                if let Some((task, _)) = self.gate.take() {
                    task.abort();
                }
            }
            led = leads;
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                changed = leading.changed() => if changed.is_err() { return },
                _ = rollout_tick.tick(), if leads && self.rollout.is_some() => {
                    self.drive_rollout().await;
                }
                _ = tokio::time::sleep_until(last_poll + Duration::from_secs(poll)) => {
                    last_poll = tokio::time::Instant::now();
                    if leads && current.repository.is_some() {
                        let _ = self.sync(&current).await;
                    }
                }
                changed = settings.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tracing::info!(settings = ?*settings.borrow(), "desired-state settings reloaded");
                    let current = settings.borrow().clone();
                    if leads && current.repository.is_some() {
                        let _ = self.sync(&current).await;
                    }
                }
                request = requests.recv() => match request {
                    None => return,
                    Some(DesiredRequest::Sync(reply)) => {
                        let outcome = match self.leadership.term() {
                            Some(_) => self.sync(&current).await,
                            None => Err(not_leading()),
                        };
                        let _ = reply.send(outcome);
                    }
                    Some(DesiredRequest::Role { request, reply }) => {
                        let outcome = match self.leadership.term() {
                            Some(_) => self.change_overlay(request).await,
                            None => Err(not_leading()),
                        };
                        let _ = reply.send(outcome);
                    }
                    Some(DesiredRequest::Minion(id)) => {
                        if leads {
                            self.assign_minions(Some(&id)).await;
                        }
                    }
                    Some(DesiredRequest::Plan { rev, reply }) => {
                        let outcome = match self.leadership.term() {
                            Some(_) => self.plan(&current, rev).await,
                            None => Err(not_leading()),
                        };
                        let _ = reply.send(outcome);
                    }
                    Some(DesiredRequest::Rollout { action, reply }) => {
                        let outcome = match self.leadership.term() {
                            Some(_) => self.control_rollout(action).await,
                            None => Err(not_leading()),
                        };
                        let _ = reply.send(outcome);
                    }
                },
            }
        }
    }

    /// What a master does when it takes the lease: its records may be
    /// stale (another master led), so it reads them again, applies the
    /// repository's head if that is new, and rewrites every assignment
    /// that differs.
    async fn take_over(&mut self, settings: &SourceSettings) {
        self.applied = match self.config.get("applied").await {
            Ok(Some(value)) => serde_json::from_slice(&value).ok(),
            _ => self.applied.take(),
        };
        self.publish();
        if settings.repository.is_some() {
            let _ = self.sync(settings).await;
        } else {
            self.assign_minions(None).await;
        }
    }

    async fn emit(&self, kind: &str, data: Value) {
        event::emit(&self.outbox, &self.subjects, "master", kind, data);
    }

    /// Fetches the branch and applies what is new; returns what happened.
    pub async fn sync(&mut self, settings: &SourceSettings) -> Result<SyncAnswer, ApiError> {
        let Some(repository) = settings.repository.clone() else {
            return Err(ApiError::conflict(
                "the master follows no repository (set repository in its settings)",
            ));
        };
        let source = GitSource::new(&repository, &settings.branch, &self.work_dir.join("git"));
        let fetch = {
            let source = source.clone();
            tokio::task::spawn_blocking(move || source.fetch_head()).await
        };
        let head = match fetch {
            Ok(Ok(head)) => {
                self.last_source_error = None;
                head
            }
            Ok(Err(err)) => return self.source_failed(provis_core::error_chain(&err)).await,
            Err(err) => return self.source_failed(provis_core::error_chain(&err)).await,
        };
        if self
            .loaded
            .as_ref()
            .is_some_and(|(commit, _)| *commit == head)
        {
            return Ok(answer(head, SyncOutcome::Unchanged));
        }
        if self.rejected.as_deref() == Some(head.as_str()) {
            return Ok(answer(head, SyncOutcome::RejectedBefore));
        }
        let exporter = source.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            // A failed export (disk full, permissions) says nothing about the
            // commit: it is a source failure, tried again, never a rejection.
            let fetched = source
                .export(&head)
                .map_err(|err| provis_core::error_chain(&err))?;
            Ok(ConfigRepository::load(&fetched.dir)
                .map(|repo| (fetched.commit.clone(), fetched.summary.clone(), repo))
                .map_err(|invalid| {
                    let problems = invalid
                        .0
                        .iter()
                        .map(|p| Problem {
                            file: p.file.clone(),
                            reason: p.reason.clone(),
                        })
                        .collect();
                    (fetched.commit, fetched.summary, problems)
                }))
        })
        .await;
        let (commit, summary, repo) = match loaded {
            Ok(Ok(Ok(loaded))) => loaded,
            Ok(Ok(Err((commit, summary, problems)))) => {
                return self.reject(commit, summary, problems).await;
            }
            Ok(Err(reason)) => return self.source_failed(reason).await,
            Err(err) => return self.source_failed(provis_core::error_chain(&err)).await,
        };
        let repo = Arc::new(repo);
        if self
            .applied
            .as_ref()
            .is_some_and(|applied| applied.commit == commit)
        {
            // Already applied (before a master restart): take it up, write nothing.
            tracing::info!(%commit, "config already applied; nothing to write");
            self.take_loaded(commit.clone(), repo);
            self.resume_rollout(&commit, &exporter).await;
            self.assign_minions(None).await;
            return Ok(answer(commit, SyncOutcome::AlreadyApplied));
        }
        // Every member of a secret's roles must be able to open it: the
        // fleet as it is now decides who the members are.
        let unsealed = {
            let overlay = self.overlay().await;
            let records: Vec<_> = self.view.registry().values().cloned().collect();
            crate::secrets::unsealed_members(&repo.secrets, &records, |record| {
                repo.assignments
                    .assign(record, overlay.get(record.id.as_str()), &commit)
                    .roles
            })
        };
        if !unsealed.is_empty() {
            let problems = unsealed
                .into_iter()
                .map(|p| Problem {
                    file: p.file,
                    reason: p.reason,
                })
                .collect();
            return self.reject(commit, summary, problems).await;
        }
        let Some(term) = self.leadership.term() else {
            return Err(not_leading());
        };
        let changes = match apply(&self.js, &repo, Some(&self.identity), term).await {
            Ok(changes) => changes,
            Err(err) => {
                let err = provis_core::error_chain(&err);
                tracing::warn!(%commit, error = %err, "config could not be written; will try again");
                return Err(ApiError::failed(format!(
                    "commit {commit} could not be written (tried again at the next poll): {err}"
                )));
            }
        };
        // Where minions not yet switched stay: the last good commit, also
        // when a newer commit supersedes a rollout under way.
        let (from_record, from_repo) = match self.rollout.take() {
            Some(mut superseded) if superseded.status.active() => {
                superseded.status = RolloutStatus::Aborted;
                superseded.reason = Some(format!("superseded by commit {commit}"));
                superseded.updated_unix_ms = now_unix_ms();
                self.save_rollout(&superseded).await;
                (superseded.from.clone(), self.previous.take())
            }
            _ => (self.applied.clone(), self.loaded.take()),
        };
        self.previous = from_repo;
        let record = AppliedRecord {
            commit: commit.clone(),
            summary: summary.clone(),
            applied_unix_ms: now_unix_ms(),
            changes: changes.clone(),
        };
        if let Ok(value) = serde_json::to_vec(&record)
            && let Err(err) = self.config.put("applied", value.into()).await
        {
            tracing::warn!(%commit, error = %err, "the applied commit is not recorded; a restart applies it again");
        }
        self.applied = Some(record);
        self.publish();
        self.publish_policy(&repo).await;
        self.take_loaded(commit.clone(), repo.clone());
        self.start_rollout(&commit, &summary, &repo, from_record)
            .await;
        self.assign_minions(None).await;
        tracing::info!(%commit, %summary, "config applied");
        self.emit(
            "config.applied",
            json!({ "commit": commit, "summary": summary, "changes": changes }),
        )
        .await;
        Ok(SyncAnswer {
            changes: Some(changes),
            ..answer(commit, SyncOutcome::Applied)
        })
    }

    /// Publishes the repository's call policy, signed by the master, in
    /// `provis_config/policy` (or removes it when the repository has none).
    async fn publish_policy(&self, repo: &ConfigRepository) {
        let outcome = match &repo.policy {
            None => self
                .config
                .delete("policy")
                .await
                .map_err(|e| e.to_string()),
            Some(policy) => {
                let current = self.config.get("policy").await.ok().flatten();
                let current = current.as_deref();
                if provis_core::signed_entry::holds(
                    BUCKET_CONFIG,
                    "policy",
                    current,
                    policy,
                    Some(self.identity.public_key()),
                ) {
                    return;
                }
                let Some(term) = self.leadership.term() else {
                    return;
                };
                let stamp = provis_core::signed_entry::Stamp {
                    term,
                    at_ms: provis_core::signed_entry::next_written_at(current, now_unix_ms()),
                };
                match provis_core::signed_entry::sign(
                    BUCKET_CONFIG,
                    "policy",
                    policy,
                    &self.identity,
                    stamp,
                ) {
                    Ok(value) => self
                        .config
                        .put("policy", value.into())
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(err) => Err(err.to_string()),
                }
            }
        };
        if let Err(err) = outcome {
            tracing::warn!(error = %err, "call policy not published");
        }
    }

    async fn reject(
        &mut self,
        commit: String,
        summary: String,
        problems: Vec<Problem>,
    ) -> Result<SyncAnswer, ApiError> {
        tracing::warn!(%commit, problems = problems.len(), "config rejected");
        let data = json!({ "commit": commit, "summary": summary, "problems": problems, "keeping": self.applied.as_ref().map(|a| a.commit.clone()) });
        if let Ok(value) = serde_json::to_vec(&data)
            && let Err(err) = self.config.put("rejected", value.into()).await
        {
            tracing::warn!(%commit, error = %err, "the rejected commit is not recorded");
        }
        self.rejected = Some(commit.clone());
        self.publish();
        self.emit("config.rejected", data).await;
        Ok(SyncAnswer {
            problems,
            ..answer(commit, SyncOutcome::Rejected)
        })
    }

    async fn source_failed(&mut self, reason: String) -> Result<SyncAnswer, ApiError> {
        if self.last_source_error.as_deref() != Some(reason.as_str()) {
            tracing::warn!(%reason, "config repository unreachable; the fleet keeps its state");
            self.emit("config.source_failed", json!({ "reason": reason, "keeping": self.applied.as_ref().map(|a| a.commit.clone()) })).await;
            self.last_source_error = Some(reason.clone());
        }
        Err(ApiError::failed(format!(
            "the config repository cannot be read: {reason}"
        )))
    }

    async fn overlay(&self) -> Overlay {
        match self.config.get("overlay").await {
            Ok(Some(value)) => serde_json::from_slice(&value).unwrap_or_default(),
            _ => Overlay::new(),
        }
    }

    async fn change_overlay(&mut self, request: RoleRequest) -> Result<RoleAnswer, ApiError> {
        let RoleRequest { op, minion, role } = request;
        if self.loaded.is_none() {
            return Err(ApiError::conflict(
                "the master has applied no config repository; roles come from the minions' own settings",
            ));
        }
        let mut overlay = self.overlay().await;
        let entry = overlay.entry(minion.to_string()).or_default();
        match (op, role.clone()) {
            (RoleOp::Assign, Some(role)) => {
                entry.remove.remove(&role);
                entry.add.insert(role);
            }
            (RoleOp::Unassign, Some(role)) => {
                entry.add.remove(&role);
                entry.remove.insert(role);
            }
            (RoleOp::Reset, _) => *entry = OverlayEntry::default(),
            (_, None) => return Err(ApiError::usage("assign and unassign need a role")),
        }
        if *entry == OverlayEntry::default() {
            overlay.remove(minion.as_str());
        }
        let value = serde_json::to_vec(&overlay)
            .map_err(|err| ApiError::failed(format!("cannot encode the overlay: {err}")))?;
        self.config
            .put("overlay", value.into())
            .await
            .map_err(|err| ApiError::failed(format!("cannot record the overlay: {err}")))?;
        let kind = match op {
            RoleOp::Assign => "role.assigned",
            RoleOp::Unassign => "role.unassigned",
            RoleOp::Reset => "role.reset",
        };
        self.emit(kind, json!({ "minion": minion, "role": role }))
            .await;
        self.assign_minions(Some(minion.as_str())).await;
        Ok(RoleAnswer {
            overlay: overlay.get(minion.as_str()).cloned(),
            minion,
        })
    }

    /// Writes the assignment of `only` (or of every registered minion) where it changed.
    async fn assign_minions(&self, only: Option<&str>) {
        let Some((commit, repo)) = &self.loaded else {
            return;
        };
        let overlay = self.overlay().await;
        let spread = fetch_spread_ms(self.view.registry().len());
        let records: Vec<_> = {
            let registry = self.view.registry();
            registry
                .values()
                .filter(|r| only.is_none_or(|id| r.id.as_str() == id))
                .cloned()
                .collect()
        };
        let current = match only {
            Some(id) => match self.assignments.get(id).await {
                Ok(Some(value)) => BTreeMap::from([(id.to_owned(), value)]),
                _ => BTreeMap::new(),
            },
            None => provis_core::kv_snapshot::read_all(&self.assignments)
                .await
                .unwrap_or_default(),
        };
        for record in records {
            let id = record.id.as_str();
            let target = assignment_under(commit, repo, &record, overlay.get(id), spread);
            let assignment = match (&self.rollout, &self.previous) {
                (Some(rollout), Some((from, from_repo)))
                    if rollout.commit == *commit && !rollout.switched(id) =>
                {
                    let before =
                        assignment_under(from, from_repo, &record, overlay.get(id), spread);
                    // A minion the commit does not change takes it at once.
                    let unchanged = Assignment {
                        commit: commit.clone(),
                        ..before.clone()
                    } == target;
                    if unchanged && !rollout.held_back.contains(id) {
                        target
                    } else {
                        before
                    }
                }
                _ => target,
            };
            let stored = current.get(record.id.as_str()).map(|v| v.as_ref());
            if provis_core::signed_entry::holds(
                BUCKET_ASSIGNMENTS,
                record.id.as_str(),
                stored,
                &assignment,
                Some(self.identity.public_key()),
            ) {
                continue;
            }
            // Fenced: a master that lost the lease writes nothing more,
            // and what it wrote in its term loses to its successor's.
            let Some(term) = self.leadership.term() else {
                return;
            };
            let stamp = provis_core::signed_entry::Stamp {
                term,
                at_ms: provis_core::signed_entry::next_written_at(stored, now_unix_ms()),
            };
            let Ok(value) = provis_core::signed_entry::sign(
                BUCKET_ASSIGNMENTS,
                record.id.as_str(),
                &assignment,
                &self.identity,
                stamp,
            ) else {
                continue;
            };
            if let Err(err) = self.assignments.put(record.id.as_str(), value.into()).await {
                tracing::warn!(minion = %record.id, error = %err, "assignment not written");
            }
        }
    }
}

/// What `record`'s minion is assigned under `commit` of `repo`: roles
/// from the assignments and the overlay, each service's digest and config.
fn assignment_under(
    commit: &str,
    repo: &ConfigRepository,
    record: &provis_core::registry::MinionRecord,
    overlay: Option<&OverlayEntry>,
    spread: u64,
) -> Assignment {
    let mut assignment = repo.assignments.assign(record, overlay, commit);
    for (name, config) in provis_core::roles::services_for(&assignment.roles, &repo.roles) {
        if let Some(bundle) = repo.services.get(&name) {
            assignment
                .services
                .insert(name.clone(), bundle.digest.clone());
            assignment.configs.insert(name, config);
        }
    }
    assignment.fetch_spread_ms = spread;
    assignment.secrets = crate::secrets::sealed_for(&repo.secrets, record, &assignment.roles);
    assignment
}

/// Over how long minions spread their fetches of a new bundle: about a
/// millisecond per minion (a thousand fetches a second at most), rounded
/// down to a power of ten so that a growing fleet rewrites no assignment
/// but at 100, 1,000, 10,000… minions; none below 100.
fn fetch_spread_ms(fleet: usize) -> u64 {
    if fleet < 100 {
        return 0;
    }
    10u64.pow(fleet.ilog10())
}

/// What a master that does not lead answers a request to write.
fn not_leading() -> ApiError {
    ApiError::unavailable("this master does not lead (any more); ask again: the leader answers")
}

fn answer(commit: String, outcome: SyncOutcome) -> SyncAnswer {
    SyncAnswer {
        commit,
        outcome,
        changes: None,
        problems: Vec::new(),
    }
}
