//! `provis status` and `provis role …`: the desired state the master applied,
//! who converged on it, and the operator's role overlay.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use provis_core::master_api::{RoleOp, RoleRequest};
use provis_core::{MinionId, RoleName};

use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Print one JSON document
    #[arg(long)]
    json: bool,
}

pub async fn run_status(fleet: &FleetArgs, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let status = fleet.master().await?.status().await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    for master in &status.masters {
        let role = match master.term {
            Some(term) if master.leading => format!("leads (term {term})"),
            _ => "standby".to_owned(),
        };
        outln!("master {} ({}): {role}", master.id, master.version);
    }
    match &status.applied {
        None => outln!("no config applied yet"),
        Some(applied) => {
            let when = u64::try_from(applied.applied_unix_ms)
                .map(|ms| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(ms),
                    )
                    .to_string()
                })
                .unwrap_or_default();
            outln!("applied {} ({}) at {when}", applied.commit, applied.summary);
        }
    }
    if let Some(rejected) = &status.rejected {
        outln!("last rejected commit: {rejected} (see `provis events --type config.rejected`)");
    }
    let live: Vec<_> = status.minions.iter().filter(|m| m.live).collect();
    let converged = live.iter().filter(|m| m.converged).count();
    let failed = live.iter().filter(|m| !m.failed.is_empty()).count();
    outln!(
        "{converged} of {} live minions converged, {failed} failed",
        live.len()
    );
    for minion in live.iter().filter(|m| !m.converged) {
        let on = minion.commit.as_deref().unwrap_or("no commit yet");
        if minion.failed.is_empty() {
            outln!("  {} is on {on}", minion.minion);
        } else {
            outln!("  {} failed (still on {on}):", minion.minion);
            for (service, reason) in &minion.failed {
                outln!("    {service}: {reason}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Give a minion a role now, over what git assigns (until `provis role reset`)
    Assign {
        #[command(flatten)]
        fleet: FleetArgs,
        minion: MinionId,
        role: RoleName,
    },
    /// Take a role from a minion now, over what git assigns (until `provis role reset`)
    Unassign {
        #[command(flatten)]
        fleet: FleetArgs,
        minion: MinionId,
        role: RoleName,
    },
    /// Drop a minion's overlay: back to what git assigns
    Reset {
        #[command(flatten)]
        fleet: FleetArgs,
        minion: MinionId,
    },
}

pub async fn run_role(command: RoleCommand) -> anyhow::Result<ExitCode> {
    let (fleet, op, minion, role) = match command {
        RoleCommand::Assign {
            fleet,
            minion,
            role,
        } => (fleet, RoleOp::Assign, minion, Some(role)),
        RoleCommand::Unassign {
            fleet,
            minion,
            role,
        } => (fleet, RoleOp::Unassign, minion, Some(role)),
        RoleCommand::Reset { fleet, minion } => (fleet, RoleOp::Reset, minion, None),
    };
    let request = RoleRequest { op, minion, role };
    let answer = fleet.master().await?.change_role(&request).await?;
    outln!("{}", serde_json::to_string(&answer)?);
    Ok(ExitCode::SUCCESS)
}
