//! `secrets/` of a config repository: sealed secrets, checked with the
//! commit (well formed, roles that exist, every secret a service asks for
//! present, every member of its roles a recipient) and handed to each
//! member in its assignment. The master never holds a value: it passes on
//! copies sealed to each minion's key, which only that minion can open.

use std::collections::BTreeMap;
use std::path::Path;

use provis_bundle::PackedBundle;
use provis_core::registry::MinionRecord;
use provis_core::roles::RoleSpec;
use provis_core::sealed_secret::{Candidate, SECRETS_DIR, SealedSecret, is_secret_name};
use provis_core::subject::RoleName;

use crate::repository::RepositoryProblem;

/// Reads `secrets/*.toml` under `root`; what is wrong goes to `problems`.
pub fn load(
    root: &Path,
    roles: &BTreeMap<RoleName, RoleSpec>,
    problems: &mut Vec<RepositoryProblem>,
) -> BTreeMap<String, SealedSecret> {
    let mut secrets = BTreeMap::new();
    let dir = root.join(SECRETS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return secrets;
    };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for file in files {
        let Some(name) = file
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".toml"))
        else {
            continue;
        };
        let shown = format!("{SECRETS_DIR}/{name}.toml");
        let mut problem = |reason: String| {
            problems.push(RepositoryProblem {
                file: shown.clone(),
                reason,
            });
        };
        if !is_secret_name(name) {
            problem(format!(
                "{name:?} cannot name a secret: lowercase letters, digits, '-' and '_'"
            ));
            continue;
        }
        let parsed = std::fs::read_to_string(&file)
            .map_err(|err| err.to_string())
            .and_then(|text| SealedSecret::parse(&text).map_err(|err| err.to_string()));
        let secret = match parsed {
            Ok(secret) => secret,
            Err(reason) => {
                problem(reason);
                continue;
            }
        };
        if secret.roles.is_empty() && secret.minions.is_empty() {
            problem("names no roles and no minions: nobody may read it".to_owned());
        }
        for role in &secret.roles {
            match role.parse::<RoleName>() {
                Ok(role) if roles.contains_key(&role) => {}
                Ok(_) => problem(format!("role {role:?} has no roles/{role}.toml")),
                Err(err) => problem(format!("role {role:?}: {err}")),
            }
        }
        for copy in secret.sealed.values().chain(secret.escrow.values()) {
            if !provis_core::sealing::is_encryption_key(&copy.key) {
                problem(format!(
                    "a copy is sealed to {:?}, which is not an encryption key",
                    copy.key
                ));
            }
        }
        secrets.insert(name.to_owned(), secret);
    }
    secrets
}

/// A problem for every secret a service's manifest grants that is not in
/// `secrets/`, naming the manifest's line.
pub fn unknown_in_services(
    root: &Path,
    services: &BTreeMap<String, PackedBundle>,
    secrets: &BTreeMap<String, SealedSecret>,
) -> Vec<RepositoryProblem> {
    let mut problems = Vec::new();
    for (folder, bundle) in services {
        let manifest = format!(
            "services/{folder}/{}",
            provis_bundle::manifest::MANIFEST_FILE
        );
        let text = std::fs::read_to_string(root.join(&manifest)).unwrap_or_default();
        for name in &bundle.manifest.capabilities.secrets {
            if secrets.contains_key(name) {
                continue;
            }
            let quoted = format!("\"{name}\"");
            let line = text
                .lines()
                .position(|line| line.contains(&quoted))
                .map_or(0, |at| at + 1);
            problems.push(RepositoryProblem {
                file: manifest.clone(),
                reason: format!(
                    "line {line}: secret {name:?} is not in {SECRETS_DIR}/ (provis secret seal --role ROLE {name})"
                ),
            });
        }
    }
    problems
}

/// A problem for every secret not sealed to every member it has among
/// `records`, whose roles `roles_of` tells.
pub fn unsealed_members(
    secrets: &BTreeMap<String, SealedSecret>,
    records: &[MinionRecord],
    roles_of: impl Fn(&MinionRecord) -> Vec<RoleName>,
) -> Vec<RepositoryProblem> {
    let roles: Vec<(&MinionRecord, Vec<RoleName>)> =
        records.iter().map(|r| (r, roles_of(r))).collect();
    secrets
        .iter()
        .filter_map(|(name, secret)| {
            let missing = secret.missing(roles.iter().map(|(record, roles)| Candidate {
                id: record.id.as_str(),
                roles,
                encryption_key: record.bound_encryption_key(),
            }));
            (!missing.is_empty()).then(|| RepositoryProblem {
                file: format!("{SECRETS_DIR}/{name}.toml"),
                reason: format!(
                    "not sealed to every member: missing {} (provis secret reseal {name}, then commit)",
                    missing.join(", ")
                ),
            })
        })
        .collect()
}

/// The copies `record`'s minion (holding `roles`) may read: name → sealed value.
pub fn sealed_for(
    secrets: &BTreeMap<String, SealedSecret>,
    record: &MinionRecord,
    roles: &[RoleName],
) -> BTreeMap<String, String> {
    let candidate = Candidate {
        id: record.id.as_str(),
        roles,
        encryption_key: record.bound_encryption_key(),
    };
    secrets
        .iter()
        .filter_map(|(name, secret)| {
            let copy = secret.copy_for(&candidate)?;
            Some((name.clone(), copy.value.clone()))
        })
        .collect()
}
