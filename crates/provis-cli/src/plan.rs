//! `provis plan [REV]`: what a revision of the config repository would
//! change, per service, role and minion, without applying it. Exit 0 when
//! nothing would change, 2 when something would, 1 when it is invalid.

use std::process::ExitCode;

use clap::Args;
use provis_core::master_api::{PlanAnswer, ServiceChange};

use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// The revision: a commit id (full or short), HEAD~N [default: the followed branch's head]
    rev: Option<String>,
    /// `text` for people, `json` for scripts
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

pub async fn run(fleet: &FleetArgs, args: PlanArgs) -> anyhow::Result<ExitCode> {
    let answer = fleet.master().await?.plan(args.rev.clone()).await?;
    if args.output == "json" {
        outln!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print_plan(&answer)?;
    }
    Ok(ExitCode::from(if !answer.valid() {
        1
    } else if answer.changes() {
        2
    } else {
        0
    }))
}

fn short(digest: &str) -> &str {
    let hex = digest.rsplit(':').next().unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

fn service_line(change: &ServiceChange) -> String {
    let digests = match (&change.from, &change.to) {
        _ if change.config_only => "config".to_owned(),
        (Some(from), Some(to)) => format!("{} → {}", short(from), short(to)),
        (None, Some(to)) => short(to).to_owned(),
        (Some(from), None) => short(from).to_owned(),
        (None, None) => String::new(),
    };
    format!("{} {} {digests}", change.change.sign(), change.name)
}

fn print_plan(answer: &PlanAnswer) -> Result<(), crate::output::OutputError> {
    let current = answer
        .current
        .as_deref()
        .map_or("nothing applied yet".to_owned(), |c| {
            c.get(..12).unwrap_or(c).to_owned()
        });
    outln!(
        "plan of {} ({}) against {current}",
        answer.commit.get(..12).unwrap_or(&answer.commit),
        answer.summary
    );
    if !answer.valid() {
        outln!("invalid: {} problem(s)", answer.problems.len());
        for problem in &answer.problems {
            outln!("  {}: {}", problem.file, problem.reason);
        }
        return Ok(());
    }
    if !answer.changes() {
        outln!("no change");
        return Ok(());
    }
    if !answer.services.is_empty() {
        outln!("services:");
        for change in &answer.services {
            outln!("  {}", service_line(change));
        }
    }
    if !answer.roles.is_empty() {
        outln!("roles:");
        for role in &answer.roles {
            let mut what = Vec::new();
            what.extend(role.services_added.iter().map(|s| format!("+{s}")));
            what.extend(role.services_removed.iter().map(|s| format!("-{s}")));
            if role.config_changed {
                what.push("config".to_owned());
            }
            outln!("  {} {} {}", role.change.sign(), role.role, what.join(" "));
        }
    }
    let changed: usize = answer.minions.iter().map(|m| m.minions.len()).sum();
    if changed > 0 {
        outln!("minions ({changed} would change):");
        for group in &answer.minions {
            let ids: Vec<&str> = group.minions.iter().map(|m| m.as_str()).collect();
            let mut what: Vec<String> = group.services.iter().map(service_line).collect();
            what.extend(group.roles_added.iter().map(|r| format!("+role {r}")));
            what.extend(group.roles_removed.iter().map(|r| format!("-role {r}")));
            if let Some((from, to)) = &group.settings {
                what.push(format!("settings {from} → {to}"));
            }
            outln!("  {}: {}", ids.join(", "), what.join("; "));
        }
    }
    if answer.policy_changed {
        outln!("call policy: changed");
    }
    if answer.rollout_changed {
        outln!("rollout.toml: changed");
    }
    Ok(())
}
