//! `provis minions`: the registry, filtered with the same expressions as
//! `provis call --where`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use provis_core::master_api::{ApiErrorKind, MinionEntry};
use provis_core::registry::{self, MinionRecord, MinionStatus};
use provis_core::selection::{Filter, Verdict};

use crate::fleet_args::FleetArgs;
use crate::output::Output;

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  provis minions\n  provis minions --where 'state.mem.free_pct < 10.0'\n  provis minions --where '\"web\" in roles' --output json"
)]
pub struct MinionsArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Only minions for which this CEL expression holds (see `provis call --help`)
    #[arg(long = "where", value_name = "EXPRESSION")]
    filter: Option<String>,
    /// How to print the list
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub async fn run(fleet: &FleetArgs, args: MinionsArgs) -> anyhow::Result<ExitCode> {
    let filter = args.filter.as_deref().map(Filter::parse).transpose()?;
    let client = fleet.client().await?;
    let master = provis_core::master_api::MasterClient::new(
        client.nats().clone(),
        client.subjects().clone(),
    );
    // The master's view, in pages; the bucket itself when no master answers
    // (then a record's status is all there is to go by).
    let mut entries: Vec<MinionEntry> = match master.minions().await {
        Ok(entries) => entries,
        Err(err)
            if err
                .kind()
                .is_none_or(|kind| kind == ApiErrorKind::Unavailable) =>
        {
            tracing::info!(error = %provis_core::error_chain(&err), "reading the registry bucket instead of asking the master");
            let store = client.registry().await?;
            registry::read_all(&store)
                .await
                .context("reading the registry")?
                .into_iter()
                .map(|record| MinionEntry {
                    live: record.is_online(),
                    heard_ms_ago: None,
                    record,
                })
                .collect()
        }
        Err(err) => return Err(err.into()),
    };
    entries.sort_by(|a, b| a.record.id.cmp(&b.record.id));
    if let Some(filter) = &filter {
        let mut kept = Vec::new();
        for entry in entries {
            if filter.evaluate(&entry.record)? == Verdict::Match {
                kept.push(entry);
            }
        }
        entries = kept;
    }
    match args.output {
        Output::Json => {
            let records: Vec<&MinionRecord> = entries.iter().map(|e| &e.record).collect();
            outln!("{}", serde_json::to_string_pretty(&records)?)
        }
        Output::Table => print_table(&entries)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(entries: &[MinionEntry]) -> Result<(), crate::output::OutputError> {
    outln!(
        "{:12}  {:8}  {:16}  {:26}  {:>5}  {:>5}  {:>5}  LAST SEEN",
        "MINION",
        "STATE",
        "ROLES",
        "SERVICES",
        "MEM%",
        "DISK%",
        "LOAD"
    );
    for MinionEntry {
        record,
        live,
        heard_ms_ago,
    } in entries
    {
        let state = match record.status {
            MinionStatus::Online if *live => "online",
            MinionStatus::Online => "late",
            MinionStatus::Stopped => "stopped",
            MinionStatus::Offline => "offline",
        };
        // Roles given by `provis role assign` rather than git are marked with a '+'.
        let roles: Vec<String> = record
            .roles
            .iter()
            .map(|r| {
                if record.overlay_roles.contains(r) {
                    format!("{r}+")
                } else {
                    r.to_string()
                }
            })
            .collect();
        let services: Vec<String> = record
            .services
            .iter()
            .filter(|(name, _)| name.as_str() != "sys")
            .map(|(name, version)| format!("{name}@{version}"))
            .collect();
        let number = |value: &serde_json::Value| {
            value
                .as_f64()
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
        };
        let mem_free = number(&record.state["mem"]["free_pct"]);
        let disk_free = number(&record.state["disk"]["free_pct"]);
        let load = record.state["load"]["one"]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let seen = heard_ms_ago.map_or_else(
            || "-".to_owned(),
            |ms| {
                format!(
                    "{} ago",
                    humantime::format_duration(Duration::from_secs(ms / 1000))
                )
            },
        );
        outln!(
            "{:12}  {state:8}  {:16}  {:26}  {mem_free:>5}  {disk_free:>5}  {load:>5}  {seen}",
            record.id,
            roles.join(","),
            if services.is_empty() {
                "-".to_owned()
            } else {
                services.join(",")
            },
        );
    }
    outln!(
        "{} minions (MEM% and DISK% are free space; LAST SEEN by the master's clock)",
        entries.len()
    );
    Ok(())
}
