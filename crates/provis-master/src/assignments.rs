//! Who holds which role, and with which settings: `assignments.toml` and
//! `minions.toml` of a config repository, plus the operator's overlay
//! (`provis role assign|unassign`), turned into one [`Assignment`] per minion.
//!
//! ```toml
//! # assignments.toml — the first [[assign]] whose glob matches the id gives
//! # roles; every [[rule]] whose CEL expression holds adds its roles.
//! [[assign]]
//! minions = "web-*"
//! roles = ["web.eu"]
//!
//! [[rule]]
//! when = 'facts.mem_total_mb > 4000 && facts.os == "debian"'
//! roles = ["db"]
//! ```
//!
//! ```toml
//! # minions.toml — settings minions apply without a restart; [[minion]]
//! # entries (globs, in order, later wins) refine the defaults.
//! [defaults]
//! log_level = "info"
//! state_interval_ms = 60000
//! labels = { env = "demo" }
//!
//! [[minion]]
//! minions = "m1"
//! state_interval_ms = 10000
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use provis_core::RoleName;
pub use provis_core::assignment::{Assignment, MinionSettings};
use provis_core::registry::MinionRecord;
use provis_core::selection::{Filter, Verdict};
use serde::Deserialize;
use wildmatch::WildMatch;

pub const ASSIGNMENTS_FILE: &str = "assignments.toml";
pub const MINIONS_FILE: &str = "minions.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignmentsFile {
    #[serde(default)]
    assign: Vec<GlobRule>,
    #[serde(default)]
    rule: Vec<FactRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GlobRule {
    /// A minion id or a glob (`*`, `?`) over ids.
    minions: String,
    roles: Vec<RoleName>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FactRule {
    /// A CEL expression over id, facts, labels (the `--where` language).
    when: String,
    roles: Vec<RoleName>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MinionsFile {
    #[serde(default)]
    defaults: MinionSettings,
    #[serde(default)]
    minion: Vec<MinionEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MinionEntry {
    minions: String,
    #[serde(flatten)]
    settings: MinionSettings,
}

pub use provis_core::assignment::OverlayEntry;

/// The overlay of every minion, as `provis_config/overlay` holds it.
pub type Overlay = BTreeMap<String, OverlayEntry>;

/// The assignment rules of a repository, parsed and checked.
#[derive(Debug, Default)]
pub struct Assignments {
    assign: Vec<GlobRule>,
    rules: Vec<(Filter, Vec<RoleName>)>,
    defaults: MinionSettings,
    minions: Vec<MinionEntry>,
}

impl Assignments {
    /// Reads both files (each optional): what parsed, and every problem as
    /// (file, reason), so a caller can check the rest and report all at once.
    pub fn load(root: &Path) -> (Self, Vec<(String, String)>) {
        let mut problems = Vec::new();
        let read = |name: &str| -> Option<String> { std::fs::read_to_string(root.join(name)).ok() };
        let file: AssignmentsFile = match read(ASSIGNMENTS_FILE).map(|t| toml::from_str(&t)) {
            None => AssignmentsFile::default(),
            Some(Ok(file)) => file,
            Some(Err(err)) => {
                problems.push((ASSIGNMENTS_FILE.to_owned(), err.to_string()));
                AssignmentsFile::default()
            }
        };
        let mut rules = Vec::new();
        for rule in file.rule {
            match Filter::parse(&rule.when) {
                Ok(filter) => rules.push((filter, rule.roles)),
                Err(err) => problems.push((
                    ASSIGNMENTS_FILE.to_owned(),
                    err.to_string().replace("--where", "rule"),
                )),
            }
        }
        let minions: MinionsFile = match read(MINIONS_FILE).map(|t| toml::from_str(&t)) {
            None => MinionsFile::default(),
            Some(Ok(file)) => file,
            Some(Err(err)) => {
                problems.push((MINIONS_FILE.to_owned(), err.to_string()));
                MinionsFile::default()
            }
        };
        let assignments = Self {
            assign: file.assign,
            rules,
            defaults: minions.defaults,
            minions: minions.minion,
        };
        (assignments, problems)
    }

    /// Every role these rules can give, to check against the repository's roles.
    pub fn roles_named(&self) -> BTreeSet<&RoleName> {
        self.assign
            .iter()
            .flat_map(|a| &a.roles)
            .chain(self.rules.iter().flat_map(|(_, roles)| roles))
            .collect()
    }

    /// The roles of the first glob rule matching `id` (used before a minion
    /// has registered, e.g. by `provis up`).
    pub fn glob_roles(&self, id: &str) -> Vec<RoleName> {
        self.assign
            .iter()
            .find(|rule| WildMatch::new(&rule.minions).matches(id))
            .map_or_else(Vec::new, |rule| rule.roles.clone())
    }

    /// The assignment of a registered minion under `commit`, with `overlay`.
    pub fn assign(
        &self,
        record: &MinionRecord,
        overlay: Option<&OverlayEntry>,
        commit: &str,
    ) -> Assignment {
        let mut roles: BTreeSet<RoleName> =
            self.glob_roles(record.id.as_str()).into_iter().collect();
        for (filter, rule_roles) in &self.rules {
            if matches!(filter.evaluate(record), Ok(Verdict::Match)) {
                roles.extend(rule_roles.iter().cloned());
            }
        }
        let mut overlay_roles = Vec::new();
        if let Some(overlay) = overlay {
            for role in &overlay.add {
                if roles.insert(role.clone()) {
                    overlay_roles.push(role.clone());
                }
            }
            for role in &overlay.remove {
                roles.remove(role);
            }
        }
        let mut settings = self.defaults.clone();
        for entry in &self.minions {
            if WildMatch::new(&entry.minions).matches(record.id.as_str()) {
                settings.refine(&entry.settings);
            }
        }
        Assignment {
            roles: roles.into_iter().collect(),
            overlay_roles,
            settings,
            commit: commit.to_owned(),
            ..Assignment::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: &str, mem_total_mb: u64) -> MinionRecord {
        serde_json::from_value(json!({
            "id": id, "hostname": id, "roles": [], "version": "0", "status": "online",
            "started_unix_ms": 0, "heartbeat_unix_ms": 0, "heartbeat_interval_ms": 1000,
            "services": {}, "facts": { "mem_total_mb": mem_total_mb, "os": "debian", "labels": {} }, "state": {}
        }))
        .unwrap()
    }

    fn load(assignments: &str, minions: &str) -> Result<Assignments, Vec<(String, String)>> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ASSIGNMENTS_FILE), assignments).unwrap();
        std::fs::write(dir.path().join(MINIONS_FILE), minions).unwrap();
        let (assignments, problems) = Assignments::load(dir.path());
        if problems.is_empty() {
            Ok(assignments)
        } else {
            Err(problems)
        }
    }

    #[test]
    fn globs_rules_overlay_and_settings_combine() {
        let a = load(
            "[[assign]]\nminions = \"web-*\"\nroles = [\"web.eu\"]\n[[assign]]\nminions = \"*\"\nroles = [\"base\"]\n[[rule]]\nwhen = 'facts.mem_total_mb > 4000 && facts.os == \"debian\"'\nroles = [\"db\"]\n",
            "[defaults]\nstate_interval_ms = 60000\nlabels = { env = \"prod\" }\n[[minion]]\nminions = \"web-1\"\nstate_interval_ms = 5000\nlabels = { team = \"a\" }\n",
        )
        .unwrap();
        let big = a.assign(&record("web-1", 8000), None, "c1");
        assert_eq!(
            big.roles.iter().map(RoleName::as_str).collect::<Vec<_>>(),
            ["db", "web.eu"]
        );
        assert_eq!(big.settings.state_interval_ms, Some(5000));
        assert_eq!(big.settings.labels.len(), 2);
        let small = a.assign(&record("x", 1000), None, "c1");
        assert_eq!(
            small.roles.iter().map(RoleName::as_str).collect::<Vec<_>>(),
            ["base"]
        );
        let overlay = OverlayEntry {
            add: ["cache".parse().unwrap()].into(),
            remove: ["base".parse().unwrap()].into(),
        };
        let overlaid = a.assign(&record("x", 1000), Some(&overlay), "c1");
        assert_eq!(
            overlaid
                .roles
                .iter()
                .map(RoleName::as_str)
                .collect::<Vec<_>>(),
            ["cache"]
        );
        assert_eq!(overlaid.overlay_roles.len(), 1);
    }

    #[test]
    fn every_problem_is_reported_with_its_file() {
        let problems = load(
            "[[rule]]\nwhen = 'facts.mem_total_mb >'\nroles = [\"db\"]\n",
            "[defaults]\nnosuch = 1\n",
        )
        .unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].0, ASSIGNMENTS_FILE);
        assert_eq!(problems[1].0, MINIONS_FILE);
    }
}
