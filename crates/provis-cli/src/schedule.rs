//! `provis schedule list|run-now|pause|resume`: the applied commit's
//! schedules as the leading master runs them, and what an admin operator
//! changes about them without a commit.

use std::process::ExitCode;

use clap::Subcommand;
use provis_core::master_api::{ScheduleAction, ScheduleRequest, Schedules};

use crate::fleet_args::FleetArgs;

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Every schedule: its clock, call, last and next slot, runs and missed slots
    List {
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Run a schedule at once, outside its clock (a job like any run)
    RunNow {
        #[command(flatten)]
        fleet: FleetArgs,
        name: String,
    },
    /// Take no more slots until resumed
    Pause {
        #[command(flatten)]
        fleet: FleetArgs,
        name: String,
    },
    /// Take slots again, from now on (those passed while paused are not run)
    Resume {
        #[command(flatten)]
        fleet: FleetArgs,
        name: String,
    },
}

fn when(unix_ms: Option<i64>) -> String {
    unix_ms
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        })
        .unwrap_or_else(|| "-".to_owned())
}

pub async fn run(command: ScheduleCommand) -> anyhow::Result<ExitCode> {
    let (fleet, action, name) = match command {
        ScheduleCommand::List { fleet } => (fleet, ScheduleAction::List, None),
        ScheduleCommand::RunNow { fleet, name } => (fleet, ScheduleAction::RunNow, Some(name)),
        ScheduleCommand::Pause { fleet, name } => (fleet, ScheduleAction::Pause, Some(name)),
        ScheduleCommand::Resume { fleet, name } => (fleet, ScheduleAction::Resume, Some(name)),
    };
    let master = fleet.master().await?;
    let answer = master
        .request::<Schedules>(&ScheduleRequest {
            action,
            name: name.clone(),
        })
        .await?;
    if let Some(name) = name {
        let done = match action {
            ScheduleAction::RunNow => "runs at the leader's next tick",
            ScheduleAction::Pause => "paused",
            ScheduleAction::Resume => "resumed",
            ScheduleAction::List => "",
        };
        outln!("{name}: {done}");
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:20}  {:34}  {:22}  {:20}  {:20}  {:>5}  {:>6}  STATE",
        "SCHEDULE",
        "CLOCK",
        "CALL",
        "LAST",
        "NEXT",
        "RUNS",
        "MISSED"
    );
    for s in answer.schedules {
        outln!(
            "{:20}  {:34}  {:22}  {:20}  {:20}  {:>5}  {:>6}  {}",
            s.name,
            s.clock,
            format!("{} on {}", s.call, s.subject),
            when(s.last_due_unix_ms),
            when(s.next_due_unix_ms),
            s.runs,
            s.missed,
            if s.paused { "paused" } else { "active" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
