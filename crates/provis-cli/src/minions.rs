//! `provis minions`: the registry as the master sees it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use provis_core::envelope::now_unix_ms;
use provis_core::registry::{self, MinionRecord};

use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
pub struct MinionsArgs {
    /// How to print the list
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

pub async fn run(fleet: &FleetArgs, args: MinionsArgs) -> anyhow::Result<ExitCode> {
    let client = fleet.client().await?;
    let store = client.registry().await?;
    let mut records = registry::read_all(&store)
        .await
        .context("reading the registry")?;
    records.sort_by(|a, b| a.id.cmp(&b.id));
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&records)?),
        Output::Table => print_table(&records),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(records: &[MinionRecord]) {
    let now = now_unix_ms();
    println!(
        "{:12}  {:8}  {:24}  {:8}  LAST SEEN",
        "MINION", "STATE", "ROLES", "VERSION"
    );
    for record in records {
        let state = if record.is_live_at(now) {
            "online"
        } else {
            "offline"
        };
        let roles: Vec<&str> = record.roles.iter().map(|r| r.as_str()).collect();
        let ago = Duration::from_millis(u64::try_from(now - record.heartbeat_unix_ms).unwrap_or(0));
        println!(
            "{:12}  {state:8}  {:24}  {:8}  {} ago",
            record.id,
            roles.join(","),
            record.version,
            humantime::format_duration(Duration::from_secs(ago.as_secs()))
        );
    }
    println!("{} minions", records.len());
}
