//! `provis jobs` and `provis job ID`: every call as recorded in
//! `PROVIS_JOBS`, and each minion's result of one, after the caller has gone.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use provis_core::jobs::{Job, JobRecords, JobResult, list_jobs, read_job};
use wildmatch::WildMatch;

use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// How far back, e.g. 1h, 7d
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    since: Duration,
    /// Only this caller's calls (a glob)
    #[arg(long)]
    caller: Option<String>,
    /// Only calls of this function, `service.method` (a glob)
    #[arg(long)]
    function: Option<String>,
    /// Print JSON lines
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// The job id `provis call` printed
    id: String,
    /// Print one JSON document
    #[arg(long)]
    json: bool,
    /// Go on printing results as they come (a queued call's minions as
    /// they return), until every selected minion has one or nothing more
    /// can come: the caller ended and its queue, if any, is over
    #[arg(long)]
    follow: bool,
}

pub async fn run_jobs(fleet: &FleetArgs, args: JobsArgs) -> anyhow::Result<ExitCode> {
    let client = fleet.client().await?;
    let since = SystemTime::now()
        .checked_sub(args.since)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let jobs = list_jobs(client.nats(), client.subjects(), since).await?;
    let caller = args.caller.as_deref().map(WildMatch::new);
    let function = args.function.as_deref().map(WildMatch::new);
    if !args.json {
        outln!(
            "{:36}  {:20}  {:14}  {:20}  {:16}  RESULT",
            "JOB",
            "STARTED",
            "CALLER",
            "FUNCTION",
            "TARGET"
        );
    }
    for provis_core::jobs::JobListing {
        request,
        summary,
        queue,
        ..
    } in jobs
    {
        if caller.as_ref().is_some_and(|c| !c.matches(&request.caller))
            || function
                .as_ref()
                .is_some_and(|f| !f.matches(&request.function))
        {
            continue;
        }
        if args.json {
            outln!(
                "{}",
                serde_json::json!({ "request": request, "summary": summary, "queued_until_unix_ms": queue.map(|q| q.until_unix_ms) })
            );
            continue;
        }
        let started = u64::try_from(request.started_unix_ms)
            .map(|ms| {
                humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
                )
                .to_string()
            })
            .unwrap_or_default();
        let result = summary.map_or_else(
            || format!("{} selected, not ended", request.selected.len()),
            |s| format!("{} ok, {} error, {} no reply", s.ok, s.failed, s.no_reply),
        );
        outln!(
            "{:36}  {:20}  {:14}  {:20}  {:16}  {result}",
            request.job,
            started,
            request.caller,
            request.function,
            request.target
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_job(fleet: &FleetArgs, args: JobArgs) -> anyhow::Result<ExitCode> {
    let client = fleet.client().await?;
    let mut job = read_job(client.nats(), client.subjects(), &args.id).await?;
    if job.request.is_none() && job.results.is_empty() {
        return Err(crate::UsageError(format!("no job {} is recorded", args.id)).into());
    }
    if !args.json {
        print_job(&args.id, &job)?;
    }
    if args.follow {
        let records = JobRecords::open(client.nats(), client.subjects(), &args.id).await?;
        follow(records, &mut job, args.json).await?;
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&job)?);
    }
    let failed = job.results.values().any(|r| r.status != "ok") || !job.without_result().is_empty();
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// How long after a job's time is over its summary may still come.
const SUMMARY_GRACE_MS: i64 = 60_000;

/// Whether more can still come for `job`: a selected minion has no result
/// and the caller has not ended, or its queue is not over.
fn more_may_come(job: &Job) -> bool {
    let now = provis_core::envelope::now_unix_ms();
    if job.summary.is_none() {
        // The caller (or, for batches, the master) is still at it, unless
        // its time is long over: a caller killed mid-call records no summary.
        let over = match (&job.batches, &job.queue, &job.request) {
            (Some(batches), _, _) => batches.until_unix_ms.saturating_add(batches.timeout_ms),
            (None, Some(queue), _) => queue.until_unix_ms,
            (None, None, Some(request)) => {
                request.started_unix_ms.saturating_add(request.timeout_ms)
            }
            (None, None, None) => return true,
        };
        return now <= over.saturating_add(SUMMARY_GRACE_MS);
    }
    match &job.queue {
        None => false,
        Some(queue) if queue.until_unix_ms <= now => false,
        // Until the master says whom it waits for, anyone may still come.
        Some(_) => job.waiting.is_none() || !job.without_result().is_empty(),
    }
}

/// Prints each new result of `job` as it is recorded (its records read
/// again from the first: those already shown are passed over).
async fn follow(mut records: JobRecords, job: &mut Job, quiet: bool) -> anyhow::Result<()> {
    let width = job
        .results
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(6)
        .max(6);
    while more_may_come(job) {
        // Looked at again each second: whether the queue is over.
        let Some((part, payload)) = records.next_within(Duration::from_secs(1)).await? else {
            continue;
        };
        let new_result = part
            .strip_prefix("result.")
            .filter(|minion| !job.results.contains_key(*minion))
            .map(str::to_owned);
        job.take_record(&part, &payload);
        if let Some(result) = new_result.and_then(|minion| job.results.get(&minion))
            && !quiet
        {
            outln!("{}", result_line(result, width));
        }
    }
    Ok(())
}

fn result_line(result: &JobResult, width: usize) -> String {
    let detail = match (&result.result, &result.error) {
        (Some(value), _) => value.to_string(),
        (None, Some(error)) => format!("{}: {}", error.code, error.message),
        (None, None) => String::new(),
    };
    format!(
        "{:width$}  {:8}  {:>7.1}ms  {detail}",
        result.minion, result.status, result.ms
    )
}

fn print_job(id: &str, job: &Job) -> Result<(), crate::output::OutputError> {
    match &job.request {
        Some(request) => outln!(
            "job {id}: {} called {} on {} ({} selected, arguments {})",
            request.caller,
            request.function,
            request.target,
            request.selected.len(),
            request.args_digest
        ),
        None => outln!(
            "job {id}: its request is not recorded (expired, or the caller could not record it)"
        ),
    }
    let width = job
        .results
        .keys()
        .map(String::len)
        .chain(job.without_result().iter().map(String::len))
        .max()
        .unwrap_or(6)
        .max(6);
    outln!("{:width$}  {:8}  {:>9}  RESULT", "MINION", "STATUS", "TIME");
    for result in job.results.values() {
        outln!("{}", result_line(result, width));
    }
    for minion in job.without_result() {
        outln!(
            "{minion:width$}  {:8}  {:>9}  (no result recorded)",
            "-",
            "-"
        );
    }
    if let Some(summary) = &job.summary {
        outln!(
            "the caller saw {} ok, {} error, {} no reply",
            summary.ok,
            summary.failed,
            summary.no_reply
        );
    }
    Ok(())
}
