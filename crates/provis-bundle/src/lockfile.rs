//! What the author's lockfile says about the packages a bundle holds:
//! version, license and integrity, for operators auditing what runs, and a
//! check that `node_modules/` is what the lockfile pinned (so the same
//! lockfile gives the same bundle). npm's `package-lock.json` (version 2
//! and 3) is read; other package managers' packages are listed from their
//! `package.json`, without integrity.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::module_graph::BundledPackage;

/// npm's lockfile, next to `package.json`.
pub const NPM_LOCKFILE: &str = "package-lock.json";

#[derive(Debug, thiserror::Error)]
pub enum LockfileError {
    #[error("{NPM_LOCKFILE}: not a lockfile npm 7 or later wrote: {0}")]
    Unreadable(String),
    #[error(
        "{path} is {installed} but {NPM_LOCKFILE} pins {locked}: node_modules is out of date (run npm ci)"
    )]
    Stale {
        path: String,
        installed: String,
        locked: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
struct NpmLockfile {
    #[serde(default)]
    packages: BTreeMap<String, LockedPackage>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct LockedPackage {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    resolved: Option<String>,
    #[serde(default)]
    integrity: Option<String>,
    #[serde(default)]
    license: Option<String>,
}

/// One package of a bundle, as `provis bundle --output json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditedPackage {
    pub name: String,
    pub version: Option<String>,
    pub license: Option<String>,
    /// The lockfile's `integrity` (a Subresource Integrity hash of the tarball).
    pub integrity: Option<String>,
    /// Where the package manager fetched it from.
    pub resolved: Option<String>,
    /// Its folder in the service.
    pub path: String,
}

/// Lists `packages` with what the lockfile in `dir` says of them, refusing
/// a package whose installed version is not the one locked.
pub fn audit(
    dir: &Path,
    packages: &[BundledPackage],
) -> Result<Vec<AuditedPackage>, LockfileError> {
    let lockfile = match std::fs::read_to_string(dir.join(NPM_LOCKFILE)) {
        Ok(text) => serde_json::from_str::<NpmLockfile>(&text)
            .map_err(|err| LockfileError::Unreadable(err.to_string()))?,
        Err(_) => NpmLockfile::default(),
    };
    packages
        .iter()
        .map(|package| {
            let locked = lockfile.packages.get(&package.path);
            if let (Some(locked), Some(installed)) = (
                locked.and_then(|l| l.version.as_ref()),
                package.version.as_ref(),
            ) && locked != installed
            {
                return Err(LockfileError::Stale {
                    path: package.path.clone(),
                    installed: installed.clone(),
                    locked: locked.clone(),
                });
            }
            Ok(AuditedPackage {
                name: package.name.clone(),
                version: package.version.clone(),
                license: package
                    .license
                    .clone()
                    .or_else(|| locked.and_then(|l| l.license.clone())),
                integrity: locked.and_then(|l| l.integrity.clone()),
                resolved: locked.and_then(|l| l.resolved.clone()),
                path: package.path.clone(),
            })
        })
        .collect()
}
