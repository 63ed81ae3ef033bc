//! `provis call`: choose minions, send them one function, and report who
//! answered, who failed and who never replied, as replies come in.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{ArgGroup, Args, ValueEnum};
use provis_core::client::{
    BatchSize, CallPlan, CallReport, MinionReply, ReplyGatherer, ReplyStatus,
};
use provis_core::minion_api::ApiAddress;
use provis_core::selection::{Filter, Pick};
use provis_core::{CallRequest, CallTarget, MinionId};
use provis_proto::v1::minion_client::MinionClient;
use serde_json::{Value, json};

use crate::UsageError;
use crate::fleet_args::FleetArgs;

/// Fan-outs at least this large get a progress bar on a terminal.
const PROGRESS_THRESHOLD: usize = 20;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["subject", "all", "minion"])))]
#[command(group(ArgGroup::new("pick").args(["percent", "count"])))]
#[command(after_help = "Examples:
  provis call --subject role.web sys.ping
  provis call --all sys.facts --output json
  provis call --subject role.web site.enable --percent 30 --seed 7
  provis call --all health.check --where 'state.mem.free_pct < 10.0'
  provis call --subject role.web site.enable --batch 25% --batch-wait 10s --stop-on-failure 10
  provis call --minion m1 --minion m2 sys.ping '{\"hello\": 1}'")]
pub struct CallArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Target as a subject: `role.<role>[.<sub-role>…]`, `minion.<id>` or `all`
    #[arg(long)]
    subject: Option<String>,
    /// Every minion of the fleet
    #[arg(long)]
    all: bool,
    /// One minion by id (repeat for several)
    #[arg(long)]
    minion: Vec<String>,
    /// Only minions for which this CEL expression holds, over id, roles,
    /// facts, state, labels and services (e.g. 'state.mem.free_pct < 10.0')
    #[arg(long = "where", value_name = "EXPRESSION")]
    filter: Option<String>,
    /// This share of the matching live minions (rounded up, at least one)
    #[arg(long)]
    percent: Option<f64>,
    /// This many of the matching live minions
    #[arg(long)]
    count: Option<usize>,
    /// Pick the same minions every time (with --percent or --count)
    #[arg(long)]
    seed: Option<u64>,
    /// Rolling batches of N minions or N% of the selection
    #[arg(long, value_parser = parse_batch)]
    batch: Option<BatchSize>,
    /// Pause between batches, e.g. 10s
    #[arg(long, value_parser = humantime::parse_duration, requires = "batch")]
    batch_wait: Option<Duration>,
    /// Start no further batch once more than this percentage of the minions
    /// called so far failed or did not reply
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent, requires = "batch")]
    stop_on_failure: Option<f64>,
    /// How long to wait for replies (per batch), e.g. 500ms, 5s
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Keep the call this long (at most 1h) for selected minions that are
    /// away: the master delivers it when they return, and their results
    /// join the job (`provis job ID`)
    #[arg(long, value_name = "TTL", value_parser = parse_queue_ttl, conflicts_with = "batch")]
    queue: Option<Duration>,
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
    /// PEM certificate of the authority that signed the minions' gRPC TLS
    /// certificates (needed when their API speaks TLS)
    #[arg(long, env = "PROVIS_GRPC_CA")]
    grpc_ca: Option<std::path::PathBuf>,
    /// The name the minions' gRPC certificates are issued to
    #[arg(long, env = "PROVIS_GRPC_DOMAIN", default_value = "localhost")]
    grpc_domain: String,
    /// Sign the call with this private key (minions that pin callers require
    /// it) [default: the identity this shell connects as, if any]
    #[arg(long, env = "PROVIS_KEY")]
    key: Option<std::path::PathBuf>,
    /// SERVICE.METHOD, e.g. sys.ping
    function: String,
    /// Arguments as one JSON document
    args: Option<String>,
}

fn parse_queue_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|err| err.to_string())?;
    if ttl.is_zero() || ttl > provis_core::call_auth::MAX_CALL_LIFETIME {
        return Err(format!(
            "{text:?}: a queue lasts more than 0 and at most 1h"
        ));
    }
    Ok(ttl)
}

fn parse_batch(text: &str) -> Result<BatchSize, String> {
    text.parse()
}

fn parse_percent(text: &str) -> Result<f64, String> {
    let p: f64 = text
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage"))?;
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{text:?} is not between 0 and 100"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Via {
    Nats,
    Grpc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// A table and a summary line
    Table,
    /// One JSON document at the end
    Json,
    /// One JSON line per reply as it arrives, then a summary line
    Ndjson,
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

    fn pick(&self) -> Pick {
        match (self.percent, self.count) {
            (Some(p), _) => Pick::Percent(p),
            (None, Some(n)) => Pick::Count(n),
            (None, None) => Pick::All,
        }
    }

    fn plan(&self) -> CallPlan {
        CallPlan {
            batch: self.batch,
            batch_wait: self.batch_wait.unwrap_or_default(),
            stop_on_failure_pct: self.stop_on_failure,
            queue: self.queue,
            job: Some(uuid::Uuid::new_v4().to_string()),
        }
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
    let filter = args.filter.as_deref().map(Filter::parse).transpose()?;
    args.pick().check()?;

    let report = if args.via == Via::Grpc {
        if filter.is_some() || args.pick() != Pick::All || args.batch.is_some() {
            return Err(UsageError(
                "--via grpc calls named minions only: drop --where, --percent, --count and --batch"
                    .into(),
            )
            .into());
        }
        let tls = GrpcTls {
            ca: args.grpc_ca.clone(),
            domain: args.grpc_domain.clone(),
        };
        let signer = fleet.operator_key(args.key.as_deref())?;
        call_via_grpc(
            fleet,
            &target,
            &request,
            args.grpc_addr.as_deref(),
            &tls,
            signer.as_ref(),
        )
        .await?
    } else {
        let mut client = fleet.client().await?;
        if let Some(signer) = fleet.operator_key(args.key.as_deref())? {
            client = client.with_signer(signer);
        }
        let selection = client
            .select(&target, filter.as_ref(), args.pick(), args.seed)
            .await?;
        let mut printer = LivePrinter::new(args.output, selection.chosen.len());
        let plan = args.plan();
        if args.output == Output::Table {
            outln!(
                "# selected {}: {}",
                selection.chosen.len(),
                selection.reason
            );
        }
        if let (Some(job), Some(_)) = (&plan.job, &plan.batch) {
            eprintln!(
                "# the batches run on the master as job {job}: `provis job {job} --follow` follows them if this command stops"
            );
        }
        let report = client
            .call_selected(&target, &selection, &request, &plan, &mut |reply| {
                printer.reply(reply)
            })
            .await
            .with_context(|| format!("calling {} on {}", args.function, target.describe()))?;
        crate::output::unless_closed(printer.finish())?;
        report
    };
    // Whoever stops reading, the exit code still says how the call went.
    let printed = match args.output {
        Output::Json => {
            crate::output::write_line(format_args!("{}", serde_json::to_string_pretty(&report)?))
        }
        Output::Ndjson => crate::output::write_line(format_args!(
            "{}",
            json!({ "summary": report.summary, "selection": report.selection })
        )),
        Output::Table => print_table(&report, &target, args.timeout),
    };
    crate::output::unless_closed(printed)?;
    Ok(if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Shows replies as they arrive: one JSON line each for ndjson; a progress
/// bar for a long fan-out on a terminal; nothing otherwise.
struct LivePrinter {
    output: Output,
    bar: Option<indicatif::ProgressBar>,
    /// Why a line could not be written (stdout closed): the call goes on,
    /// the printing does not.
    failed: Option<crate::output::OutputError>,
}

impl LivePrinter {
    fn new(output: Output, selected: usize) -> Self {
        let bar = (output == Output::Table
            && selected >= PROGRESS_THRESHOLD
            && std::io::stderr().is_terminal())
        .then(|| {
            let bar = indicatif::ProgressBar::new(selected as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} replies {msg} [{elapsed}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self {
            output,
            bar,
            failed: None,
        }
    }

    fn reply(&mut self, reply: &MinionReply) {
        if self.output == Output::Ndjson && self.failed.is_none() {
            let line = serde_json::to_string(reply).unwrap_or_default();
            if let Err(err) = crate::output::write_line(format_args!("{line}")) {
                self.failed = Some(err);
            }
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if reply.status != ReplyStatus::Ok {
                bar.set_message(format!("(last failure: {})", reply.minion));
            }
        }
    }

    fn finish(&mut self) -> Result<(), crate::output::OutputError> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.failed.take().map_or(Ok(()), Err)
    }
}

fn print_table(
    report: &CallReport,
    target: &CallTarget,
    timeout: Duration,
) -> Result<(), crate::output::OutputError> {
    let width = report
        .replies
        .iter()
        .map(|reply| reply.minion.len())
        .max()
        .unwrap_or(0)
        .max("MINION".len());
    outln!("{:width$}  {:8}  {:>9}  RESULT", "MINION", "STATUS", "TIME");
    for reply in &report.replies {
        let status = match reply.status {
            ReplyStatus::Ok => "ok",
            ReplyStatus::Error => "error",
            ReplyStatus::NoReply => "no_reply",
            ReplyStatus::Skipped => "skipped",
        };
        let time = reply
            .ms
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
        let detail = match (&reply.result, &reply.error, reply.status) {
            (Some(result), _, _) => result.to_string(),
            (None, Some(error), _) => format!("{}: {}", error.code, error.message),
            (None, None, ReplyStatus::Skipped) => {
                "not called: an earlier batch failed too often".to_owned()
            }
            (None, None, _) => format!("no reply within {}", humantime::format_duration(timeout)),
        };
        outln!("{:width$}  {status:8}  {time:>9}  {detail}", reply.minion);
    }
    let s = report.summary;
    let skipped = if s.skipped > 0 {
        format!(", {} skipped", s.skipped)
    } else {
        String::new()
    };
    let batches = if report.batches > 0 {
        format!(" in {} batches", report.batches)
    } else {
        String::new()
    };
    if let Some(why) = report.selection.as_ref().and_then(|s| s.uncertain.as_ref()) {
        outln!(
            "{} answered ({}) while the registry could not be read ({why}): who else should have is unknown",
            s.selected,
            target.describe(),
        );
        return Ok(());
    }
    let job = if report.job.is_empty() {
        String::new()
    } else {
        format!("; job {}", report.job)
    };
    outln!(
        "{} selected ({}){batches}: {} ok, {} error, {} no reply{skipped}{job}",
        s.selected,
        target.describe(),
        s.ok,
        s.error,
        s.no_reply
    );
    Ok(())
}

/// Calls each named minion through its local gRPC API, found in the registry
/// (or given with --grpc-addr), and reports exactly as a call over NATS does.
/// A minion's gRPC API as its registry entry advertises it.
#[derive(Debug, Clone)]
struct AdvertisedApi {
    /// `unix:/path` or `host:port`.
    addr: String,
    tls: bool,
    /// Its certificate (PEM), pinned when no `--grpc-ca` is given.
    cert: Option<String>,
}

/// How to reach minions' gRPC APIs that speak TLS.
struct GrpcTls {
    ca: Option<std::path::PathBuf>,
    domain: String,
}

impl GrpcTls {
    /// A connection to `api`: over TLS when it speaks TLS, trusting
    /// `--grpc-ca` when given, else the certificate its registry entry pins.
    async fn connect(
        &self,
        api: &AdvertisedApi,
    ) -> Result<MinionClient<tonic::transport::Channel>, String> {
        let (addr, tls) = (api.addr.as_str(), api.tls);
        use tonic::transport::{Certificate, Channel, ClientTlsConfig};
        let describe = |err: tonic::transport::Error| {
            format!(
                "{err}: {}",
                std::error::Error::source(&err)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )
        };
        if let ApiAddress::Unix(path) = ApiAddress::parse(addr) {
            // Only on the minion's machine, as its user or group.
            return provis_core::minion_api::connect_unix(path)
                .await
                .map_err(describe);
        }
        let endpoint = if tls {
            let pem = match (&self.ca, &api.cert) {
                (Some(ca), _) => std::fs::read(ca)
                    .map_err(|err| format!("cannot read {}: {err}", ca.display()))?,
                // A self-signed certificate is its own authority: pinned.
                (None, Some(cert)) => cert.clone().into_bytes(),
                (None, None) => {
                    return Err(
                        "its gRPC API speaks TLS and its registry entry pins no certificate: give --grpc-ca (the certificate that signed it)"
                            .into(),
                    );
                }
            };
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(self.domain.clone());
            Channel::from_shared(format!("https://{addr}"))
                .map_err(|e| e.to_string())?
                .tls_config(config)
                .map_err(|e| e.to_string())?
        } else {
            Channel::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?
        };
        let channel = endpoint.connect().await.map_err(describe)?;
        Ok(MinionClient::new(channel))
    }
}

async fn call_via_grpc(
    fleet: &FleetArgs,
    target: &CallTarget,
    request: &CallRequest,
    grpc_addr: Option<&str>,
    tls: &GrpcTls,
    signer: Option<&provis_core::identity::Identity>,
) -> anyhow::Result<CallReport> {
    let CallTarget::Minions(ids) = target else {
        return Err(UsageError(
            "--via grpc calls minions one by one: name them with --minion".into(),
        )
        .into());
    };
    let addresses: Vec<(MinionId, Result<AdvertisedApi, String>)> = match grpc_addr {
        Some(addr) => {
            let [id] = ids.as_slice() else {
                return Err(UsageError(
                    "--grpc-addr names one minion's API: give exactly one --minion".into(),
                )
                .into());
            };
            let api = AdvertisedApi {
                addr: addr.to_owned(),
                tls: tls.ca.is_some(),
                cert: None,
            };
            vec![(id.clone(), Ok(api))]
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
                                .map(|addr| AdvertisedApi {
                                    addr,
                                    tls: r.grpc_tls,
                                    cert: r.grpc_tls_cert.clone(),
                                })
                                .ok_or_else(|| format!("{id} serves no gRPC API"))
                        });
                    (id.clone(), addr)
                })
                .collect()
        }
    };
    let mut envelope = request.to_envelope(&crate::fleet_args::operator_identity(), target);
    if let Some(signer) = signer {
        provis_core::call_auth::sign(&mut envelope, signer);
    }
    let mut gathered = ReplyGatherer::new(ids.clone(), envelope.call_id.clone());
    for (id, addr) in addresses {
        let advertised = match addr {
            Ok(advertised) => advertised,
            Err(reason) => {
                gathered.unreachable(id.as_str(), reason);
                continue;
            }
        };
        let addr = advertised.addr.clone();
        let started = Instant::now();
        let attempt = tokio::time::timeout(request.timeout, async {
            let mut api = tls.connect(&advertised).await?;
            api.call(envelope.clone())
                .await
                .map_err(|status| status.message().to_owned())
        })
        .await;
        match attempt {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                if reply.minion == id.as_str() {
                    gathered.accept(reply, started.elapsed().as_secs_f64() * 1_000.0);
                } else {
                    // Whoever listens at the address is not who the registry says.
                    gathered.unreachable(
                        id.as_str(),
                        format!("gRPC API at {addr} answered as {:?}", reply.minion),
                    );
                }
            }
            Ok(Err(reason)) => {
                gathered.unreachable(id.as_str(), format!("gRPC API at {addr}: {reason}"))
            }
            Err(_) => {} // no reply within the timeout
        }
    }
    Ok(gathered.finish())
}
