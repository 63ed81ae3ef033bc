//! `provis call`: send one function to a target and print who answered,
//! who failed and who never replied.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Args, ValueEnum};
use provis_core::client::{CallReport, ReplyStatus};
use provis_core::{CallRequest, CallTarget, MinionId};
use serde_json::Value;

use crate::UsageError;
use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["subject", "all", "minion"])))]
#[command(
    after_help = "Examples:\n  provis call --subject role.web sys.ping\n  provis call --all sys.facts\n  provis call --minion m1 --minion m2 sys.ping '{\"hello\": 1}'"
)]
pub struct CallArgs {
    /// Target as a subject: `role.<role>[.<sub-role>…]`, `minion.<id>` or `all`
    #[arg(long)]
    subject: Option<String>,
    /// Every minion of the fleet
    #[arg(long)]
    all: bool,
    /// One minion by id (repeat for several)
    #[arg(long)]
    minion: Vec<String>,
    /// How long to wait for replies, e.g. 500ms, 5s
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How to print the outcome
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// SERVICE.METHOD, e.g. sys.ping
    function: String,
    /// Arguments as one JSON document
    args: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

impl CallArgs {
    fn target(&self) -> anyhow::Result<CallTarget> {
        if self.all {
            return Ok(CallTarget::All);
        }
        if let Some(subject) = &self.subject {
            return Ok(CallTarget::parse_subject(subject)?);
        }
        let ids = self
            .minion
            .iter()
            .map(|id| id.parse::<MinionId>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CallTarget::Minions(ids))
    }
}

pub async fn run(fleet: &FleetArgs, args: CallArgs) -> anyhow::Result<ExitCode> {
    let target = args.target()?;
    let call_args: Value = match &args.args {
        None => Value::Null,
        Some(text) => serde_json::from_str(text).map_err(|err| {
            UsageError(format!(
                "arguments {text:?} are not JSON ({err}); quote them, e.g. '{{\"key\": 1}}'"
            ))
        })?,
    };
    if args.timeout.is_zero() {
        return Err(UsageError("--timeout must be more than zero".into()).into());
    }
    let request = CallRequest::parse_function(&args.function, call_args, args.timeout)?;
    let client = fleet.client().await?;
    let report = client
        .call(&target, &request)
        .await
        .with_context(|| format!("calling {} on {}", args.function, target.describe()))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_table(&report, &target, args.timeout),
    }
    Ok(if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_table(report: &CallReport, target: &CallTarget, timeout: Duration) {
    let width = report
        .replies
        .iter()
        .map(|reply| reply.minion.len())
        .max()
        .unwrap_or(0)
        .max("MINION".len());
    println!("{:width$}  {:8}  {:>9}  RESULT", "MINION", "STATUS", "TIME");
    for reply in &report.replies {
        let status = match reply.status {
            ReplyStatus::Ok => "ok",
            ReplyStatus::Error => "error",
            ReplyStatus::NoReply => "no_reply",
        };
        let time = reply
            .ms
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
        let detail = match (&reply.result, &reply.error) {
            (Some(result), _) => result.to_string(),
            (None, Some(error)) => format!("{}: {}", error.code, error.message),
            (None, None) => format!("no reply within {}", humantime::format_duration(timeout)),
        };
        println!("{:width$}  {status:8}  {time:>9}  {detail}", reply.minion);
    }
    let s = report.summary;
    println!(
        "{} selected ({}): {} ok, {} error, {} no reply",
        s.selected,
        target.describe(),
        s.ok,
        s.error,
        s.no_reply
    );
}
