//! State samples as they travel on `<prefix>.state.<id>` and are kept by the
//! `PROVIS_STATE` stream: JSON `{"minion", "at_unix_ms", "state"}`, where
//! `state` is the minion's sample (memory, disk, CPU, load, uptime) and
//! `at_unix_ms` is when the minion took it (not when it arrived).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::subject::MinionId;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSample {
    pub minion: MinionId,
    pub at_unix_ms: i64,
    pub state: Value,
}
