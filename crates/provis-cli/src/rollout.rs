//! `provis rollout status|pause|resume|abort|history`: how the commit the
//! master applied is going out, stage by stage, and the operator's hand on it.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use provis_core::master_api::{RolloutAction, RolloutRecord, StageState};

use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
pub struct RolloutOptions {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// The rollout under way, else the last one: stages, gates, who failed
    Status(RolloutOptions),
    /// Start no next stage until `provis rollout resume`
    Pause(RolloutOptions),
    /// Go on with a paused rollout
    Resume(RolloutOptions),
    /// Put every minion back on the last good commit and stop
    Abort(RolloutOptions),
    /// The latest rollouts, the newest first
    History {
        #[command(flatten)]
        options: RolloutOptions,
        /// How many
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

pub async fn run(command: RolloutCommand) -> anyhow::Result<ExitCode> {
    let (options, action) = match &command {
        RolloutCommand::Status(options) | RolloutCommand::History { options, .. } => {
            (options, None)
        }
        RolloutCommand::Pause(options) => (options, Some(RolloutAction::Pause)),
        RolloutCommand::Resume(options) => (options, Some(RolloutAction::Resume)),
        RolloutCommand::Abort(options) => (options, Some(RolloutAction::Abort)),
    };
    let master = options.fleet.master().await?;
    if let RolloutCommand::History { limit, .. } = command {
        let rollouts = master.rollout_history(limit).await?;
        if options.json {
            outln!("{}", serde_json::to_string_pretty(&rollouts)?);
            return Ok(ExitCode::SUCCESS);
        }
        if rollouts.is_empty() {
            outln!("no rollout yet");
        }
        for rollout in &rollouts {
            outln!("{}", headline(rollout));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rollout = match action {
        Some(action) => master.control_rollout(action).await?,
        None => master.rollout().await?,
    };
    if options.json {
        outln!("{}", serde_json::to_string_pretty(&rollout)?);
        return Ok(ExitCode::SUCCESS);
    }
    match &rollout {
        None => outln!("no rollout yet (rollout.toml in the config repository stages commits)"),
        Some(rollout) => print_rollout(rollout)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

fn headline(rollout: &RolloutRecord) -> String {
    let status = serde_json::to_value(rollout.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let from = rollout
        .from
        .as_ref()
        .map(|f| format!(" from {}", short(&f.commit)))
        .unwrap_or_default();
    format!(
        "rollout of {} ({}){from}: {status}, stage {} of {}",
        short(&rollout.commit),
        rollout.summary,
        (rollout.stage + 1).min(rollout.stages.len()),
        rollout.stages.len()
    )
}

fn print_rollout(rollout: &RolloutRecord) -> Result<(), crate::output::OutputError> {
    outln!("{}", headline(rollout));
    if let Some(reason) = &rollout.reason {
        outln!("  reason: {reason}");
    }
    for (n, stage) in rollout.stages.iter().enumerate() {
        let state = serde_json::to_value(stage.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let ok = stage.results.values().filter(|o| o.ok).count();
        let gated = if matches!(stage.state, StageState::Passed | StageState::Failed) {
            format!(", gate ok on {ok} of {}", stage.results.len())
        } else {
            String::new()
        };
        outln!(
            "  {}. {}: {} minion(s), {state}{gated}",
            n + 1,
            stage.name,
            stage.len()
        );
        for (minion, outcome) in stage.results.iter().filter(|(_, o)| !o.ok) {
            outln!(
                "     {minion} failed: {}",
                outcome.error.as_deref().unwrap_or("")
            );
        }
    }
    if rollout.unaffected > 0 {
        outln!(
            "  {} minion(s) unchanged by the commit took it at once",
            rollout.unaffected
        );
    }
    for (minion, outcome) in &rollout.late {
        let verdict = if outcome.ok {
            "passed"
        } else {
            "failed, held back"
        };
        outln!("  {minion} came back late and was gated: {verdict}");
    }
    Ok(())
}
