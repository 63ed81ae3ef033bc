//! `provis query`: which minions match an expression now, for a whole
//! window, or at least once in it — answered by the master's state index.

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args};
use provis_core::master_api::{QueryAnswer, QueryMatch, QueryMode, QueryRequest};
use serde_json::Value;

use crate::fleet_args::FleetArgs;
use crate::output::Output;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("window").args(["for_window", "any_window"])))]
#[command(
    after_help = "Exit status: 0 when some minion matches, 1 when none does, 2 for a bad expression.

Examples:
  provis query 'state.mem.free_pct < 10.0'
  provis query 'state.disk.free_pct < 15.0' --for 7d
  provis query 'state.load.one > 4.0 && \"db\" in roles' --any 24h --output json"
)]
pub struct QueryArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// A CEL expression over id, roles, facts, state, labels and services
    expression: String,
    /// The expression held at every point of this window (e.g. 7d)
    #[arg(long = "for", value_name = "WINDOW", value_parser = humantime::parse_duration)]
    for_window: Option<Duration>,
    /// The expression held at least once in this window (e.g. 24h)
    #[arg(long = "any", value_name = "WINDOW", value_parser = humantime::parse_duration)]
    any_window: Option<Duration>,
    /// How to print the answer
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub async fn run(fleet: &FleetArgs, args: QueryArgs) -> anyhow::Result<ExitCode> {
    provis_core::selection::Filter::parse(&args.expression)?;
    let (mode, window) = match (args.for_window, args.any_window) {
        (Some(window), _) => (QueryMode::For, window),
        (None, Some(window)) => (QueryMode::Any, window),
        (None, None) => (QueryMode::Latest, Duration::ZERO),
    };
    let request = QueryRequest {
        expression: args.expression.clone(),
        mode,
        window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
        page: Default::default(),
    };
    let answer = fleet.master().await?.query(request).await?;
    match args.output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&answer)?),
        Output::Table => print_table(&answer, mode, window)?,
    }
    Ok(if answer.matches.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_table(
    answer: &QueryAnswer,
    mode: QueryMode,
    window: Duration,
) -> Result<(), crate::output::OutputError> {
    outln!(
        "{:12}  {:5}  {:>5}  {:>5}  {:>5}  {:>8}  NOTE",
        "MINION",
        "LIVE",
        "MEM%",
        "DISK%",
        "LOAD",
        "COVERAGE"
    );
    let line = |m: &QueryMatch| -> Result<(), crate::output::OutputError> {
        let number = |v: &Value| {
            v.as_f64()
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
        };
        outln!(
            "{:12}  {:5}  {:>5}  {:>5}  {:>5}  {:>8}  {}",
            m.minion,
            if m.live { "yes" } else { "no" },
            number(&m.state["mem"]["free_pct"]),
            number(&m.state["disk"]["free_pct"]),
            m.state["load"]["one"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
            m.coverage_pct
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.0}%")),
            m.note.as_deref().unwrap_or("")
        );
        Ok(())
    };
    for m in answer.matches.iter().chain(&answer.short_history) {
        line(m)?;
    }
    let how = match mode {
        QueryMode::Latest => "now".to_owned(),
        QueryMode::For => format!("for all of the past {}", humantime::format_duration(window)),
        QueryMode::Any => format!(
            "at least once in the past {}",
            humantime::format_duration(window)
        ),
    };
    let short = if answer.short_history.is_empty() {
        String::new()
    } else {
        format!(
            " ({} more held but reported for too little of the window)",
            answer.short_history.len()
        )
    };
    outln!(
        "{} of {} minions match {how}{short}",
        answer.matches.len(),
        answer.considered
    );
    let c = answer.counters;
    if c.malformed + c.out_of_window + c.rate_limited > 0 {
        outln!(
            "samples kept out of the index: {} malformed, {} out of window, {} too fast",
            c.malformed,
            c.out_of_window,
            c.rate_limited
        );
    }
    Ok(())
}
