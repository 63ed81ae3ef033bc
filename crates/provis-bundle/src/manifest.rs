//! `service.toml`: what a service is called, which module is its entry, what
//! it may touch on the machine (capabilities, all denied unless listed) and
//! how much it may use (limits).
//!
//! ```toml
//! name = "site"
//! version = "1.0.0"
//! entry = "main.js"            # default
//!
//! [capabilities]
//! fs = { read = ["/srv/www"], write = ["/srv/www/experimental"] }
//! exec = ["/usr/bin/systemctl"]
//! http = ["127.0.0.1:8080"]
//! fleet_query = false
//! secrets = ["db_password"]   # provis.secrets.get("db_password")
//!
//! [limits]
//! memory_mb = 32               # default
//! call_timeout_ms = 5000       # default
//! ```
//!
//! An unknown key anywhere is an error: a misspelt capability must not be
//! silently ignored (nor silently granted).

use std::path::{Component, Path, PathBuf};

use provis_core::MinionId;
use serde::{Deserialize, Serialize};

/// The manifest's file name inside a service folder.
pub const MANIFEST_FILE: &str = "service.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceManifest {
    /// The service's name: a subject token (`[a-z0-9_-]`). Calls name it.
    pub name: String,
    /// The author's version string, shown to operators; the digest identifies a build.
    pub version: String,
    /// The entry module, relative to the folder. Default: `main.js`.
    #[serde(default = "default_entry")]
    pub entry: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub capabilities: Capabilities,
    #[serde(default)]
    pub limits: Limits,
}

fn default_entry() -> String {
    "main.js".to_owned()
}

/// What the host API grants beyond state, events, logs, facts and config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub fs: FsCapability,
    /// Programs the service may run, by absolute path.
    #[serde(default)]
    pub exec: Vec<PathBuf>,
    /// Hosts (`host` or `host:port`) the service may send HTTP requests to.
    #[serde(default)]
    pub http: Vec<String>,
    /// Whether the service may query the fleet's state database.
    #[serde(default)]
    pub fleet_query: bool,
    /// Secrets (`secrets/<name>.toml` of the config repository) the service
    /// may read with `provis.secrets.get(name)`.
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// Directories the service may read or write, recursively.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsCapability {
    #[serde(default)]
    pub read: Vec<PathBuf>,
    #[serde(default)]
    pub write: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory the service's JavaScript heap may use. Default: 32 MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u32,
    /// Longest a single call may run. Default: 5000 ms.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
}

fn default_memory_mb() -> u32 {
    32
}

fn default_call_timeout_ms() -> u64 {
    5_000
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mb: default_memory_mb(),
            call_timeout_ms: default_call_timeout_ms(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("{MANIFEST_FILE} is not valid: {0}")]
    Parse(String),
    #[error("{MANIFEST_FILE}: service name {0:?} must be lowercase letters, digits, '-' or '_'")]
    BadName(String),
    #[error("{MANIFEST_FILE}: name {0:?} is reserved for the built-in service")]
    Reserved(String),
    #[error("{MANIFEST_FILE}: {what} {path:?} must be an absolute path without '..'")]
    BadPath { what: &'static str, path: PathBuf },
    #[error(
        "{MANIFEST_FILE}: entry {0:?} must be a relative .js, .mjs, .cjs, .ts, .mts or .cts path inside the service"
    )]
    BadEntry(String),
    #[error("{MANIFEST_FILE}: limits.{what} must be between {min} and {max}")]
    BadLimit {
        what: &'static str,
        min: u64,
        max: u64,
    },
    #[error("{MANIFEST_FILE}: http host {0:?} must be 'host' or 'host:port'")]
    BadHost(String),
    #[error("{MANIFEST_FILE}: secret name {0:?} must be lowercase letters, digits, '-' or '_'")]
    BadSecret(String),
}

impl ServiceManifest {
    /// Parses and checks a manifest.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let manifest: Self =
            toml::from_str(text).map_err(|err| ManifestError::Parse(err.to_string()))?;
        manifest.check()?;
        Ok(manifest)
    }

    fn check(&self) -> Result<(), ManifestError> {
        if self.name.parse::<MinionId>().is_err() {
            return Err(ManifestError::BadName(self.name.clone()));
        }
        if self.name == "sys" {
            return Err(ManifestError::Reserved(self.name.clone()));
        }
        if !is_relative_inside(Path::new(&self.entry))
            || ![".js", ".mjs", ".cjs", ".ts", ".mts", ".cts"]
                .iter()
                .any(|ext| self.entry.ends_with(ext))
        {
            return Err(ManifestError::BadEntry(self.entry.clone()));
        }
        let paths = self.capabilities.fs.read.iter().map(|p| ("fs path", p));
        let paths = paths.chain(self.capabilities.fs.write.iter().map(|p| ("fs path", p)));
        let paths = paths.chain(self.capabilities.exec.iter().map(|p| ("exec program", p)));
        for (what, path) in paths {
            if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
                return Err(ManifestError::BadPath {
                    what,
                    path: path.clone(),
                });
            }
        }
        for host in &self.capabilities.http {
            let valid = !host.is_empty()
                && !host.contains(['/', '@', ' ', '?', '#'])
                && host
                    .rsplit_once(':')
                    .is_none_or(|(_, port)| port.parse::<u16>().is_ok());
            if !valid {
                return Err(ManifestError::BadHost(host.clone()));
            }
        }
        if let Some(bad) = self
            .capabilities
            .secrets
            .iter()
            .find(|name| !provis_core::sealed_secret::is_secret_name(name))
        {
            return Err(ManifestError::BadSecret(bad.clone()));
        }
        if !(1..=4096).contains(&self.limits.memory_mb) {
            return Err(ManifestError::BadLimit {
                what: "memory_mb",
                min: 1,
                max: 4096,
            });
        }
        if !(1..=3_600_000).contains(&self.limits.call_timeout_ms) {
            return Err(ManifestError::BadLimit {
                what: "call_timeout_ms",
                min: 1,
                max: 3_600_000,
            });
        }
        Ok(())
    }
}

/// True for a relative path that stays inside its base (no `..`, no root).
pub fn is_relative_inside(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && path.components().next().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_a_minimal_manifest() {
        let manifest = ServiceManifest::parse("name = \"site\"\nversion = \"1\"").unwrap();
        assert_eq!(manifest.entry, "main.js");
        assert_eq!(manifest.limits, Limits::default());
        assert_eq!(manifest.capabilities, Capabilities::default());
    }

    #[test]
    fn an_unknown_capability_is_an_error_naming_it() {
        let err =
            ServiceManifest::parse("name = \"x\"\nversion = \"1\"\n[capabilities]\nnetwork = true")
                .unwrap_err();
        assert!(err.to_string().contains("network"), "{err}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, needle) in [
            ("name = \"Site\"\nversion = \"1\"", "service name"),
            ("name = \"sys\"\nversion = \"1\"", "reserved"),
            (
                "name = \"x\"\nversion = \"1\"\nentry = \"../main.js\"",
                "entry",
            ),
            (
                "name = \"x\"\nversion = \"1\"\n[capabilities.fs]\nread = [\"relative\"]",
                "absolute",
            ),
            (
                "name = \"x\"\nversion = \"1\"\n[capabilities.fs]\nwrite = [\"/srv/../etc\"]",
                "absolute",
            ),
            (
                "name = \"x\"\nversion = \"1\"\n[limits]\nmemory_mb = 0",
                "memory_mb",
            ),
            (
                "name = \"x\"\nversion = \"1\"\n[capabilities]\nhttp = [\"http://x/\"]",
                "http host",
            ),
        ] {
            let err = ServiceManifest::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
