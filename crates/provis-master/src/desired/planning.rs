//! `provis plan [REV]`: a revision validated and compared with the applied
//! commit, per service, role and minion, without writing anything.

use std::collections::{BTreeMap, BTreeSet};

use provis_core::assignment::Assignment;
use provis_core::master_api::{
    ApiError, Change, MinionsChange, PlanAnswer, Problem, RoleChange, ServiceChange,
};
use serde_json::Value;

use super::{DesiredState, SourceSettings};
use crate::git_source::GitSource;
use crate::repository::ConfigRepository;

impl DesiredState {
    pub(super) async fn plan(
        &mut self,
        settings: &SourceSettings,
        rev: Option<String>,
    ) -> Result<PlanAnswer, ApiError> {
        let Some(repository) = settings.repository.clone() else {
            return Err(ApiError::conflict(
                "the master follows no repository (set repository in its settings)",
            ));
        };
        let source = GitSource::new(&repository, &settings.branch, &self.work_dir.join("git"));
        let loaded = tokio::task::spawn_blocking(move || {
            let head = source
                .fetch_head()
                .map_err(|e| provis_core::error_chain(&e))?;
            let commit = match rev.as_deref() {
                None | Some("") => head,
                Some(rev) => source
                    .resolve(rev)
                    .map_err(|e| provis_core::error_chain(&e))?,
            };
            let fetched = source
                .export(&commit)
                .map_err(|e| provis_core::error_chain(&e))?;
            let loaded = ConfigRepository::load(&fetched.dir).map_err(|invalid| {
                invalid
                    .0
                    .into_iter()
                    .map(|p| Problem {
                        file: p.file,
                        reason: p.reason,
                    })
                    .collect::<Vec<_>>()
            });
            Ok::<_, String>((fetched.commit, fetched.summary, loaded))
        })
        .await
        .map_err(|err| ApiError::failed(err.to_string()))?;
        let (commit, summary, loaded) = loaded
            .map_err(|reason| ApiError::usage(format!("cannot read that revision: {reason}")))?;
        let mut answer = PlanAnswer {
            commit,
            summary,
            current: self.loaded.as_ref().map(|(commit, _)| commit.clone()),
            problems: Vec::new(),
            services: Vec::new(),
            roles: Vec::new(),
            minions: Vec::new(),
            policy_changed: false,
            rollout_changed: false,
        };
        let next = match loaded {
            Ok(next) => next,
            Err(problems) => {
                answer.problems = problems;
                return Ok(answer);
            }
        };
        let empty;
        let current = match &self.loaded {
            Some((_, current)) => current.as_ref(),
            None => {
                empty = ConfigRepository::empty();
                &empty
            }
        };
        answer.services = diff_digests(
            &digests(current.services.iter().map(|(n, b)| (n, &b.digest))),
            &digests(next.services.iter().map(|(n, b)| (n, &b.digest))),
        );
        answer.roles = diff_roles(current, &next);
        answer.policy_changed = current.policy != next.policy;
        answer.rollout_changed = current.rollout != next.rollout;
        let overlay = self.overlay().await;
        let records: Vec<_> = self.view.registry().values().cloned().collect();
        let current_commit = answer.current.clone().unwrap_or_default();
        let mut groups: BTreeMap<String, MinionsChange> = BTreeMap::new();
        for record in records {
            let id = record.id.as_str();
            let before =
                super::assignment_under(&current_commit, current, &record, overlay.get(id), 0);
            let after = super::assignment_under(&answer.commit, &next, &record, overlay.get(id), 0);
            let Some(change) = diff_minion(&before, &after) else {
                continue;
            };
            // Minions with the same change are listed together.
            let key = serde_json::to_string(&change).unwrap_or_default();
            groups
                .entry(key)
                .or_insert(change)
                .minions
                .push(record.id.clone());
        }
        answer.minions = groups.into_values().collect();
        Ok(answer)
    }
}

fn digests<'a>(items: impl Iterator<Item = (&'a String, &'a String)>) -> BTreeMap<String, String> {
    items.map(|(n, d)| (n.clone(), d.clone())).collect()
}

/// Services added, replaced (another digest) or removed from `before` to `after`.
fn diff_digests(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<ServiceChange> {
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let (from, to) = (before.get(name), after.get(name));
            let change = match (from, to) {
                (None, Some(_)) => Change::Added,
                (Some(_), None) => Change::Removed,
                (Some(a), Some(b)) if a != b => Change::Replaced,
                _ => return None,
            };
            Some(ServiceChange {
                name: name.clone(),
                change,
                from: from.cloned(),
                to: to.cloned(),
                config_only: false,
            })
        })
        .collect()
}

fn diff_roles(before: &ConfigRepository, after: &ConfigRepository) -> Vec<RoleChange> {
    let roles: BTreeSet<_> = before.roles.keys().chain(after.roles.keys()).collect();
    roles
        .into_iter()
        .filter_map(|role| {
            let (from, to) = (before.roles.get(role), after.roles.get(role));
            let (change, old, new) = match (from, to) {
                (None, Some(to)) => (Change::Added, Vec::new(), to.services.clone()),
                (Some(from), None) => (Change::Removed, from.services.clone(), Vec::new()),
                (Some(from), Some(to)) if from != to => {
                    (Change::Replaced, from.services.clone(), to.services.clone())
                }
                _ => return None,
            };
            Some(RoleChange {
                role: role.clone(),
                change,
                services_added: new.iter().filter(|s| !old.contains(s)).cloned().collect(),
                services_removed: old.iter().filter(|s| !new.contains(s)).cloned().collect(),
                config_changed: change == Change::Replaced
                    && from.map(|f| &f.config) != to.map(|t| &t.config),
            })
        })
        .collect()
}

/// What changes for one minion, if anything.
fn diff_minion(before: &Assignment, after: &Assignment) -> Option<MinionsChange> {
    let mut services = diff_digests(&before.services, &after.services);
    for (name, config) in &after.configs {
        let same_digest = before.services.get(name) == after.services.get(name);
        if same_digest && before.configs.get(name).is_some_and(|old| old != config) {
            services.push(ServiceChange {
                name: name.clone(),
                change: Change::Replaced,
                from: before.services.get(name).cloned(),
                to: after.services.get(name).cloned(),
                config_only: true,
            });
        }
    }
    let roles_added: Vec<_> = after
        .roles
        .iter()
        .filter(|r| !before.roles.contains(r))
        .cloned()
        .collect();
    let roles_removed: Vec<_> = before
        .roles
        .iter()
        .filter(|r| !after.roles.contains(r))
        .cloned()
        .collect();
    let settings = (before.settings != after.settings).then(|| {
        let value = |s| serde_json::to_value(s).unwrap_or(Value::Null);
        (value(&before.settings), value(&after.settings))
    });
    if services.is_empty()
        && roles_added.is_empty()
        && roles_removed.is_empty()
        && settings.is_none()
    {
        return None;
    }
    Some(MinionsChange {
        minions: Vec::new(),
        roles_added,
        roles_removed,
        services,
        settings,
    })
}
