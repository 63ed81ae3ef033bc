//! `provis plan [REV]`: what a revision of the config repository would
//! change if it were applied now, per service, role and minion.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Problem;
use crate::subject::{MinionId, RoleName};

/// Which revision to plan: a commit id (full or short), the followed
/// branch's head (none, `HEAD`), or `HEAD~N`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
}

/// How one thing would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Added,
    Replaced,
    Removed,
}

impl Change {
    /// `+`, `~` or `-`, as plans print them.
    pub fn sign(self) -> char {
        match self {
            Self::Added => '+',
            Self::Replaced => '~',
            Self::Removed => '-',
        }
    }
}

/// A service whose bundle (or, for a minion, config) would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceChange {
    pub name: String,
    pub change: Change,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Only its config changes (the digest stays).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub config_only: bool,
}

/// A role whose spec would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChange {
    pub role: RoleName,
    pub change: Change,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services_added: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services_removed: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub config_changed: bool,
}

/// Minions for which the revision changes the same things.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinionsChange {
    pub minions: Vec<MinionId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles_added: Vec<RoleName>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles_removed: Vec<RoleName>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceChange>,
    /// Settings before and after, when they change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<(Value, Value)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanAnswer {
    /// The revision, resolved to a commit.
    pub commit: String,
    pub summary: String,
    /// The commit it is compared with (the one applied), if any.
    pub current: Option<String>,
    /// Every problem when the revision is invalid (nothing else is said then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceChange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<RoleChange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub minions: Vec<MinionsChange>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub policy_changed: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollout_changed: bool,
}

impl PlanAnswer {
    pub fn valid(&self) -> bool {
        self.problems.is_empty()
    }

    /// Whether applying it would change anything.
    pub fn changes(&self) -> bool {
        !self.services.is_empty()
            || !self.roles.is_empty()
            || !self.minions.is_empty()
            || self.policy_changed
            || self.rollout_changed
    }
}
