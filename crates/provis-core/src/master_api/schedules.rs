//! `schedule`: the applied commit's schedules as the leading master runs
//! them (`provis schedule list`), and what an admin operator may change
//! about them without a commit: run one now, pause it, resume it.

use serde::{Deserialize, Serialize};

/// What to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleAction {
    #[default]
    List,
    /// Run it at the leader's next tick, outside its clock.
    RunNow,
    /// Take no more slots until resumed (slots passed while paused are skipped).
    Pause,
    Resume,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRequest {
    #[serde(default)]
    pub action: ScheduleAction,
    /// The schedule acted on (every action but `list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One schedule as the leader keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleInfo {
    pub name: String,
    /// `cron "0 3 * * *" in Europe/Vienna` or `every 30s`.
    pub clock: String,
    pub call: String,
    pub subject: String,
    pub paused: bool,
    /// The last slot taken (run or skipped), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_due_unix_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due_unix_ms: Option<i64>,
    pub runs: u64,
    pub missed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleAnswer {
    pub schedules: Vec<ScheduleInfo>,
}

/// What the config bucket keeps of a schedule (`schedule.<name>`): the
/// slot taken last, compared-and-set so that of several masters exactly
/// one takes each slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub last_due_unix_ms: i64,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub run_now: bool,
    #[serde(default)]
    pub runs: u64,
    #[serde(default)]
    pub missed: u64,
}

/// The config bucket's key for schedule `name`.
pub fn schedule_state_key(name: &str) -> String {
    format!("schedule.{name}")
}
