//! What the master assigns each minion (`provis_assignments/<id>`): its roles
//! and the settings it applies without a restart, with the applied commit
//! they come from. The master computes them (from git and the operator's
//! overlay); the minion follows its own entry.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::subject::RoleName;

/// Settings a minion applies on the fly. Each is optional: absent means the
/// minion keeps its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinionSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl MinionSettings {
    /// Takes what `other` sets over what this sets.
    pub fn refine(&mut self, other: &MinionSettings) {
        if other.log_level.is_some() {
            self.log_level.clone_from(&other.log_level);
        }
        if other.state_interval_ms.is_some() {
            self.state_interval_ms = other.state_interval_ms;
        }
        self.labels
            .extend(other.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

/// What `provis_assignments/<id>` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub roles: Vec<RoleName>,
    /// Roles present only because of the overlay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlay_roles: Vec<RoleName>,
    #[serde(default)]
    pub settings: MinionSettings,
    /// The applied commit this assignment belongs to.
    pub commit: String,
    /// What the minion runs when it has converged on `commit`: service name
    /// → bundle digest. A minion reports the commit only once it runs these
    /// (or tried and failed), not merely once it heard of its roles.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, String>,
    /// Each service's config (its roles' config merged), so that a config
    /// change reaches a minion with its assignment, stage by stage, like a
    /// new digest does.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub configs: BTreeMap<String, serde_json::Value>,
    /// Over how long minions switched together spread their bundle
    /// fetches (each waits a random part of it), so that the object store
    /// is not asked for the same bundle by the whole fleet at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fetch_spread_ms: u64,
    /// The secrets this minion may read: name → the value sealed to its
    /// encryption key (base64). Only it can open them; services read those
    /// their manifest grants (`provis.secrets.get`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}

fn is_zero(ms: &u64) -> bool {
    *ms == 0
}

/// What `provis role assign|unassign` changed for one minion, over git.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayEntry {
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub add: BTreeSet<RoleName>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub remove: BTreeSet<RoleName>,
}
