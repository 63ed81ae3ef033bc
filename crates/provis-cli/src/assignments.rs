//! `assignments.toml` of a config repository: which roles each minion holds.
//! Rules are tried in order; the first whose `minions` glob matches the id wins.
//!
//! ```toml
//! [[assign]]
//! minions = "m1"
//! roles = ["web.eu"]
//!
//! [[assign]]
//! minions = "*"
//! roles = ["web"]
//! ```

use std::path::Path;

use anyhow::Context as _;
use provis_core::RoleName;
use serde::Deserialize;
use wildmatch::WildMatch;

pub const FILE_NAME: &str = "assignments.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignments {
    #[serde(default)]
    assign: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    /// A minion id or a glob (`*`, `?`) over ids.
    minions: String,
    roles: Vec<RoleName>,
}

impl Assignments {
    /// Reads `assignments.toml` from a config repository.
    pub fn load(repository: &Path) -> anyhow::Result<Self> {
        let path = repository.join(FILE_NAME);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    /// The roles of the first rule matching `id`; none when no rule matches.
    pub fn roles_for(&self, id: &str) -> &[RoleName] {
        self.assign
            .iter()
            .find(|rule| WildMatch::new(&rule.minions).matches(id))
            .map_or(&[], |rule| &rule.roles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_rule_wins() {
        let assignments: Assignments = toml::from_str(
            r#"
            [[assign]]
            minions = "m1"
            roles = ["web.eu"]
            [[assign]]
            minions = "m*"
            roles = ["db"]
            "#,
        )
        .expect("valid");
        assert_eq!(assignments.roles_for("m1")[0].as_str(), "web.eu");
        assert_eq!(assignments.roles_for("m7")[0].as_str(), "db");
        assert!(assignments.roles_for("x").is_empty());
    }

    #[test]
    fn a_bad_role_is_refused() {
        let bad = toml::from_str::<Assignments>("[[assign]]\nminions = \"*\"\nroles = [\"Web\"]");
        assert!(bad.is_err());
    }

    #[test]
    fn the_examples_parse() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let assignments = Assignments::load(&examples).expect("examples/assignments.toml");
        assert!(!assignments.roles_for("m1").is_empty());
    }
}
