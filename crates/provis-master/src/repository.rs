//! A config repository as a directory: the fleet's desired state.
//!
//! ```text
//! assignments.toml        which roles each minion holds: id globs and fact rules (see assignments.rs)
//! minions.toml            per-minion settings: log level, state interval, labels
//! master.toml             the master's own settings that live in git (poll_interval_s)
//! roles/<role>.toml       services = ["site"], [config.<service>] …; file name = role (web.eu.toml)
//! services/<name>/        a service folder: service.toml and ES modules
//! ```
//!
//! [`ConfigRepository::load`] validates everything at once (every manifest,
//! every module compiles, every import resolves, every role names a service
//! that exists) and reports every problem, not just the first: a repository
//! is applied whole or not at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use provis_bundle::PackedBundle;
use provis_core::RoleName;
use provis_core::roles::RoleSpec;

use crate::assignments::Assignments;

/// One thing wrong with a repository, with the file it is in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct RepositoryProblem {
    pub file: String,
    pub reason: String,
}

/// A validated repository, ready to apply.
#[derive(Debug)]
pub struct ConfigRepository {
    pub services: BTreeMap<String, PackedBundle>,
    pub roles: BTreeMap<RoleName, RoleSpec>,
    pub assignments: Assignments,
    pub master: RepositoryMasterSettings,
    /// `policy.toml`: which operator may call what (none: no policy).
    pub policy: Option<provis_core::call_auth::CallPolicy>,
    /// `rollout.toml`: how a commit reaches the fleet (none: at once).
    pub rollout: Option<crate::rollout::RolloutPolicy>,
    /// `reactions.toml`: calls made when events happen.
    pub reactions: Vec<crate::reactions::ReactionSpec>,
    /// `schedules.toml`: calls made on a clock.
    pub schedules: Vec<crate::schedules::ScheduleSpec>,
    /// `secrets/*.toml`: sealed secrets by name.
    pub secrets: BTreeMap<String, provis_core::sealed_secret::SealedSecret>,
}

/// `master.toml`: the master's settings that are kept in git.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryMasterSettings {
    /// How often the master looks for a new commit, in seconds.
    #[serde(default)]
    pub poll_interval_s: Option<u64>,
}

/// Every problem found, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the repository has {} problem(s):\n{}", .0.len(), .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct InvalidRepository(pub Vec<RepositoryProblem>);

impl ConfigRepository {
    /// A repository with nothing in it: what a plan compares with before
    /// any commit was applied.
    pub fn empty() -> Self {
        Self {
            services: BTreeMap::new(),
            roles: BTreeMap::new(),
            assignments: Assignments::default(),
            master: RepositoryMasterSettings::default(),
            policy: None,
            rollout: None,
            reactions: Vec::new(),
            schedules: Vec::new(),
            secrets: BTreeMap::new(),
        }
    }

    pub fn load(root: &Path) -> Result<Self, InvalidRepository> {
        let mut problems = Vec::new();
        let shown = |path: &Path| {
            path.strip_prefix(root)
                .unwrap_or(path)
                .display()
                .to_string()
        };
        let mut services = BTreeMap::new();
        let mut methods = BTreeMap::new();
        for dir in sorted_entries(&root.join("services"), &mut problems, root) {
            if !dir.is_dir() {
                continue;
            }
            let folder = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match PackedBundle::from_dir(&dir) {
                Err(err) => problems.push(RepositoryProblem {
                    file: shown(&dir),
                    reason: err.to_string(),
                }),
                Ok(bundle) if bundle.manifest.name != folder => problems.push(RepositoryProblem {
                    file: format!("{}/service.toml", shown(&dir)),
                    reason: format!(
                        "name {:?} differs from its folder {folder:?}",
                        bundle.manifest.name
                    ),
                }),
                Ok(bundle) => match provis_js::check_bundle(&bundle) {
                    Ok(found) => {
                        methods.insert(folder.clone(), found);
                        services.insert(folder, bundle);
                    }
                    Err(err) => problems.push(RepositoryProblem {
                        file: shown(&dir),
                        reason: err.to_string(),
                    }),
                },
            }
        }
        let mut roles = BTreeMap::new();
        for file in sorted_entries(&root.join("roles"), &mut problems, root) {
            let Some(role) = file
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".toml"))
            else {
                continue;
            };
            let name = match role.parse::<RoleName>() {
                Ok(name) => name,
                Err(err) => {
                    problems.push(RepositoryProblem {
                        file: shown(&file),
                        reason: err.to_string(),
                    });
                    continue;
                }
            };
            let spec = std::fs::read_to_string(&file)
                .map_err(|err| err.to_string())
                .and_then(|text| toml::from_str::<RoleSpec>(&text).map_err(|err| err.to_string()));
            match spec {
                Err(reason) => problems.push(RepositoryProblem {
                    file: shown(&file),
                    reason,
                }),
                Ok(spec) => {
                    for service in spec.services.iter().chain(spec.config.keys()) {
                        if !services.contains_key(service)
                            && !root.join("services").join(service).is_dir()
                        {
                            problems.push(RepositoryProblem {
                                file: shown(&file),
                                reason: format!(
                                    "names service {service:?}, which is not in services/"
                                ),
                            });
                        }
                    }
                    roles.insert(name, spec);
                }
            }
        }
        let (assignments, found) = Assignments::load(root);
        problems.extend(
            found
                .into_iter()
                .map(|(file, reason)| RepositoryProblem { file, reason }),
        );
        for role in assignments.roles_named() {
            if !roles.contains_key(role) {
                problems.push(RepositoryProblem {
                    file: crate::assignments::ASSIGNMENTS_FILE.to_owned(),
                    reason: format!("assigns role {role:?}, which has no roles/{role}.toml"),
                });
            }
        }
        let master = match std::fs::read_to_string(root.join("master.toml")) {
            Err(_) => RepositoryMasterSettings::default(),
            Ok(text) => toml::from_str(&text).unwrap_or_else(|err: toml::de::Error| {
                problems.push(RepositoryProblem {
                    file: "master.toml".to_owned(),
                    reason: err.to_string(),
                });
                RepositoryMasterSettings::default()
            }),
        };
        let policy = match std::fs::read_to_string(root.join("policy.toml")) {
            Err(_) => None,
            Ok(text) => match toml::from_str::<provis_core::call_auth::CallPolicy>(&text) {
                Ok(policy) => {
                    problems.extend(policy.problems().into_iter().map(|reason| {
                        RepositoryProblem {
                            file: "policy.toml".to_owned(),
                            reason,
                        }
                    }));
                    Some(policy)
                }
                Err(err) => {
                    problems.push(RepositoryProblem {
                        file: "policy.toml".to_owned(),
                        reason: err.to_string(),
                    });
                    None
                }
            },
        };
        let rollout = match std::fs::read_to_string(root.join(crate::rollout::ROLLOUT_FILE)) {
            Err(_) => None,
            Ok(text) => match crate::rollout::RolloutPolicy::parse(&text) {
                Ok(policy) => Some(policy),
                Err(reasons) => {
                    problems.extend(reasons.into_iter().map(|reason| RepositoryProblem {
                        file: crate::rollout::ROLLOUT_FILE.to_owned(),
                        reason,
                    }));
                    None
                }
            },
        };
        if let Some(rollout) = &rollout {
            for role in rollout.roles.keys() {
                if !roles.contains_key(role) {
                    problems.push(RepositoryProblem {
                        file: crate::rollout::ROLLOUT_FILE.to_owned(),
                        reason: format!("roles.{role}: no such role in roles/"),
                    });
                }
            }
        }
        let reactions = crate::reactions::load(root, &methods, &mut problems);
        let schedules = crate::schedules::load(root, &methods, &mut problems);
        let secrets = crate::secrets::load(root, &roles, &mut problems);
        problems.extend(crate::secrets::unknown_in_services(
            root, &services, &secrets,
        ));
        if problems.is_empty() {
            Ok(Self {
                services,
                roles,
                assignments,
                master,
                policy,
                rollout,
                reactions,
                schedules,
                secrets,
            })
        } else {
            Err(InvalidRepository(problems))
        }
    }
}

fn sorted_entries(dir: &Path, problems: &mut Vec<RepositoryProblem>, root: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut paths: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| !is_hidden(p))
                .collect();
            paths.sort();
            paths
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => {
            problems.push(RepositoryProblem {
                file: dir.strip_prefix(root).unwrap_or(dir).display().to_string(),
                reason: err.to_string(),
            });
            Vec::new()
        }
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}
