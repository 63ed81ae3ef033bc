//! A minion's settings. Each field has one name in the config file, the CLI
//! flag and the env var (`heartbeat_interval_ms` / `--heartbeat-interval-ms` /
//! `PROVIS_HEARTBEAT_INTERVAL_MS`); the CLI merges them.

use std::time::Duration;

use provis_core::{FleetContext, MinionId, RoleName};
use serde::{Deserialize, Serialize};

/// Heartbeat period when none is configured.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 2_000;
/// How many calls one minion runs at once; more wait their turn.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinionConfig {
    /// This minion's id, unique in the fleet. Required.
    pub id: MinionId,
    /// Roles this minion holds, e.g. `["web.eu"]`. Default: none.
    #[serde(default)]
    pub roles: Vec<RoleName>,
    /// Where the fleet is (NATS URL and subject prefix).
    #[serde(flatten)]
    pub fleet: FleetContext,
    /// How often the minion refreshes its registry entry. Default: 2000 ms.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Calls run at once. Default: 256.
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: usize,
}

fn default_heartbeat_interval_ms() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_MS
}

fn default_max_concurrent_calls() -> usize {
    DEFAULT_MAX_CONCURRENT_CALLS
}

impl MinionConfig {
    /// A minion with default settings.
    pub fn new(id: MinionId, roles: Vec<RoleName>, fleet: FleetContext) -> Self {
        Self {
            id,
            roles,
            fleet,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(100))
    }
}
