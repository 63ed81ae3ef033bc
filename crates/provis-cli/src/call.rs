//! `provis call`: send one function to a target and print who answered,
//! who failed and who never replied.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Args, ValueEnum};
use std::time::Instant;

use provis_core::client::{CallReport, ReplyGatherer, ReplyStatus};
use provis_core::{CallRequest, CallTarget, MinionId};
use provis_proto::v1::minion_client::MinionClient;
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
    /// Transport: NATS, or each minion's local gRPC API (with --minion)
    #[arg(long, value_enum, default_value_t = Via::Nats)]
    via: Via,
    /// The gRPC API to call (with --via grpc and one --minion) instead of
    /// looking its address up in the registry
    #[arg(long, requires = "minion")]
    grpc_addr: Option<String>,
    /// SERVICE.METHOD, e.g. sys.ping
    function: String,
    /// Arguments as one JSON document
    args: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Via {
    Nats,
    Grpc,
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
    let report = if args.via == Via::Grpc {
        call_via_grpc(fleet, &target, &request, args.grpc_addr.as_deref()).await?
    } else {
        let client = fleet.client().await?;
        client
            .call(&target, &request)
            .await
            .with_context(|| format!("calling {} on {}", args.function, target.describe()))?
    };
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

/// Calls each named minion through its local gRPC API, found in the registry
/// (or given with --grpc-addr), and reports exactly as a call over NATS does.
async fn call_via_grpc(
    fleet: &FleetArgs,
    target: &CallTarget,
    request: &CallRequest,
    grpc_addr: Option<&str>,
) -> anyhow::Result<CallReport> {
    let CallTarget::Minions(ids) = target else {
        return Err(UsageError(
            "--via grpc calls minions one by one: name them with --minion".into(),
        )
        .into());
    };
    let addresses: Vec<(MinionId, Result<String, String>)> = match grpc_addr {
        Some(addr) => {
            let [id] = ids.as_slice() else {
                return Err(UsageError(
                    "--grpc-addr names one minion's API: give exactly one --minion".into(),
                )
                .into());
            };
            vec![(id.clone(), Ok(addr.to_owned()))]
        }
        None => {
            let client = fleet.client().await?;
            let records = provis_core::registry::read_all(&client.registry().await?).await?;
            ids.iter()
                .map(|id| {
                    let addr = records
                        .iter()
                        .find(|r| &r.id == id)
                        .ok_or_else(|| format!("{id} is not in the registry"))
                        .and_then(|r| {
                            r.grpc_addr
                                .clone()
                                .ok_or_else(|| format!("{id} serves no gRPC API"))
                        });
                    (id.clone(), addr)
                })
                .collect()
        }
    };
    let envelope = request.to_envelope(&crate::fleet_args::operator_identity(), target);
    let mut gathered = ReplyGatherer::new(ids.clone(), envelope.call_id.clone());
    for (id, addr) in addresses {
        let addr = match addr {
            Ok(addr) => addr,
            Err(reason) => {
                gathered.unreachable(id.as_str(), reason);
                continue;
            }
        };
        let started = Instant::now();
        let attempt = tokio::time::timeout(request.timeout, async {
            let mut api = MinionClient::connect(format!("http://{addr}"))
                .await
                .map_err(|err| err.to_string())?;
            api.call(envelope.clone())
                .await
                .map_err(|status| status.message().to_owned())
        })
        .await;
        match attempt {
            Ok(Ok(reply)) => gathered.accept(
                reply.into_inner(),
                started.elapsed().as_secs_f64() * 1_000.0,
            ),
            Ok(Err(reason)) => {
                gathered.unreachable(id.as_str(), format!("gRPC API at {addr}: {reason}"))
            }
            Err(_) => {} // no reply within the timeout
        }
    }
    Ok(gathered.finish())
}
