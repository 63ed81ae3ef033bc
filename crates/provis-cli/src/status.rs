//! `provis status` and `provis role …`: the desired state the master applied,
//! who converged on it, and the operator's role overlay.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use provis_core::{MinionId, RoleName};
use serde_json::{Value, json};

use crate::UsageError;
use crate::fleet_args::FleetArgs;

/// Asks the master on `<prefix>.master.<what>`; an `error` in its answer becomes an error.
pub async fn ask_master(fleet: &FleetArgs, what: &str, body: &Value) -> anyhow::Result<Value> {
    let client = fleet.client().await?;
    let subject = client.subjects().master(what);
    let reply = tokio::time::timeout(
        Duration::from_secs(130),
        client
            .nats()
            .request(subject, serde_json::to_vec(body)?.into()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the master did not answer in time"))?
    .map_err(|err| {
        anyhow::anyhow!("cannot reach the master ({err}); is `provis master` running?")
    })?;
    let answer: Value = serde_json::from_slice(&reply.payload)?;
    if let Some(error) = answer["error"].as_str() {
        if answer["usage"] == true {
            return Err(UsageError(error.to_owned()).into());
        }
        anyhow::bail!("{error}");
    }
    Ok(answer)
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON document
    #[arg(long)]
    json: bool,
}

pub async fn run_status(fleet: &FleetArgs, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let status = ask_master(fleet, "status", &json!({})).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        match status["applied"].as_object() {
            None => println!("no config applied yet"),
            Some(applied) => {
                let when = applied["applied_unix_ms"].as_u64().map(|ms| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(ms),
                    )
                    .to_string()
                });
                println!(
                    "applied {} ({}) at {}",
                    applied["commit"].as_str().unwrap_or("?"),
                    applied["summary"].as_str().unwrap_or(""),
                    when.unwrap_or_default()
                );
            }
        }
        if let Some(rejected) = status["rejected"].as_str() {
            println!(
                "last rejected commit: {rejected} (see `provis events --type config.rejected`)"
            );
        }
        let minions = status["minions"].as_array().cloned().unwrap_or_default();
        let live: Vec<&Value> = minions.iter().filter(|m| m["live"] == true).collect();
        let converged = live.iter().filter(|m| m["converged"] == true).count();
        println!("{converged} of {} live minions converged", live.len());
        for minion in live.iter().filter(|m| m["converged"] != true) {
            println!(
                "  {} is on {}",
                minion["minion"].as_str().unwrap_or("?"),
                minion["commit"].as_str().unwrap_or("no commit yet")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Give a minion a role now, over what git assigns (until `provis role reset`)
    Assign { minion: MinionId, role: RoleName },
    /// Take a role from a minion now, over what git assigns (until `provis role reset`)
    Unassign { minion: MinionId, role: RoleName },
    /// Drop a minion's overlay: back to what git assigns
    Reset { minion: MinionId },
}

pub async fn run_role(fleet: &FleetArgs, command: RoleCommand) -> anyhow::Result<ExitCode> {
    let body = match &command {
        RoleCommand::Assign { minion, role } => {
            json!({ "op": "assign", "minion": minion, "role": role })
        }
        RoleCommand::Unassign { minion, role } => {
            json!({ "op": "unassign", "minion": minion, "role": role })
        }
        RoleCommand::Reset { minion } => json!({ "op": "reset", "minion": minion }),
    };
    let answer = ask_master(fleet, "role", &body).await?;
    println!("{}", serde_json::to_string(&answer)?);
    Ok(ExitCode::SUCCESS)
}
