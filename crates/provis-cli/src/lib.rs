//! The `provis` command line. Each subcommand has a module; this one parses
//! arguments, sets up logging, and maps errors to exit codes:
//! 0 success, 1 a call where some minion failed or never replied, 2 bad usage
//! or nothing to do (clap's own usage errors exit 2 as well).

#[macro_use]
mod output;

mod apply;
mod bundle;
mod call;
mod dashboard;
mod events;
mod fleet_args;
mod jobs;
mod keys;
mod minions;
mod plan;
mod query;
mod rollout;
mod schedule;
mod secret;
mod serve;
mod service_local;
mod shell;
mod status;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Provision and operate fleets of machines over NATS.
#[derive(Debug, Parser)]
#[command(name = "provis", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Log filter, e.g. `debug` or `provis_minion=debug` [default: info for
    /// up, master and minion; warn for commands that print results]
    #[arg(long, env = "PROVIS_LOG", global = true)]
    log: Option<String>,
    /// Log lines as `text` or `json` (bunyan records) [default: the settings
    /// file's `log_format`, else text]
    #[arg(long, env = "PROVIS_LOG_FORMAT", global = true)]
    log_format: Option<provis_telemetry::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local fleet on this machine: nats-server, a master and minions.
    Up(up::UpArgs),
    /// Run the master: creates the fleet's storage and serves `provis.master.>`.
    Master(serve::MasterArgs),
    /// Run a minion: the agent on each machine.
    Minion(serve::MinionArgs),
    /// Call a function on minions and gather their replies.
    Call(call::CallArgs),
    /// List the minions in the registry.
    Minions(minions::MinionsArgs),
    /// Check and pack a service folder; print its digest and methods.
    Bundle(bundle::BundleArgs),
    /// Write, try, publish and list injected services.
    #[command(subcommand)]
    Service(bundle::ServiceCommand),
    /// Seal secrets into the config repository for the minions that may read them.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// The schedules of the applied commit: list, run now, pause, resume.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// Validate a config repository as a whole and make it the fleet's desired state.
    Apply(apply::ApplyArgs),
    /// Which minions match an expression: now, for a whole window, or at least once in it.
    Query(query::QueryArgs),
    /// The fleet's events, past and as they happen.
    Events(events::EventsArgs),
    /// The config commit applied, when, and which minions converged on it.
    Status(status::StatusArgs),
    /// Change a minion's roles on the fly, over what git assigns.
    #[command(subcommand)]
    Role(status::RoleCommand),
    /// Every call recorded as a job: who called what on whom, and how it ended.
    Jobs(jobs::JobsArgs),
    /// One job: every minion's result, after the caller has gone.
    Job(jobs::JobArgs),
    /// What a revision of the config repository would change (exit 0 none, 2 some, 1 invalid).
    Plan(plan::PlanArgs),
    /// How the applied commit goes out stage by stage; pause, resume, abort.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Identities: create and list keys on this machine; enroll minions
    /// (pending, accept, reject, revoke, one-time tokens).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// The master's dashboard: one-time login links.
    #[command(subcommand)]
    Dashboard(dashboard::DashboardCommand),
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(shell::CompletionsArgs),
    /// Write a man page for every command into a directory.
    Man(shell::ManArgs),
}

/// The `provis-minion` executable: a minion and nothing else, with the
/// flags of `provis minion`.
#[derive(Debug, Parser)]
#[command(name = "provis-minion", version)]
struct MinionCli {
    /// Log filter, e.g. `debug` or `provis_minion=debug` [default: info]
    #[arg(long, env = "PROVIS_LOG")]
    log: Option<String>,
    /// Log lines as `text` or `json` (bunyan records) [default: the settings
    /// file's `log_format`, else text]
    #[arg(long, env = "PROVIS_LOG_FORMAT")]
    log_format: Option<provis_telemetry::LogFormat>,
    #[command(flatten)]
    minion: serve::MinionArgs,
}

/// Runs `provis-minion` and returns the process's exit code. Its
/// executable holds no master, git, bundler or command-line code, so a
/// machine that runs only a minion maps a fraction of `provis`'s code.
pub fn minion_main() -> ExitCode {
    let cli = MinionCli::parse();
    let format = cli
        .log_format
        .or_else(|| serve::log_format_in(cli.minion.config_file()))
        .unwrap_or_default();
    init_logging(
        cli.log.as_deref().unwrap_or("info,async_nats=warn"),
        format,
        "provis-minion",
    );
    run_to_exit(async move { serve::run_minion(&cli.minion.fleet.clone(), cli.minion).await })
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Up(_) | Command::Master(_) | Command::Minion(_) => "info,async_nats=warn",
        Command::Call(_)
        | Command::Minions(_)
        | Command::Bundle(_)
        | Command::Service(_)
        | Command::Secret(_)
        | Command::Schedule(_)
        | Command::Apply(_)
        | Command::Query(_)
        | Command::Events(_)
        | Command::Status(_)
        | Command::Role(_)
        | Command::Rollout(_)
        | Command::Plan(_)
        | Command::Jobs(_)
        | Command::Job(_)
        | Command::Keys(_)
        | Command::Dashboard(_)
        | Command::Completions(_)
        | Command::Man(_) => "warn",
    };
    let (settings_file, name) = match &cli.command {
        Command::Master(args) => (args.config_file(), "provis-master"),
        Command::Minion(args) => (args.config_file(), "provis-minion"),
        _ => (None, "provis"),
    };
    let format = cli
        .log_format
        .or_else(|| serve::log_format_in(settings_file))
        .unwrap_or_default();
    init_logging(cli.log.as_deref().unwrap_or(default_log), format, name);
    run_to_exit(async move {
        match cli.command {
            Command::Up(args) => up::run(&args.fleet.clone(), args).await,
            Command::Master(args) => serve::run_master(&args.fleet.clone(), args).await,
            Command::Minion(args) => serve::run_minion(&args.fleet.clone(), args).await,
            Command::Call(args) => call::run(&args.fleet.clone(), args).await,
            Command::Minions(args) => minions::run(&args.fleet.clone(), args).await,
            Command::Bundle(args) => bundle::run_bundle(args).await,
            Command::Service(command) => bundle::run_service(command).await,
            Command::Secret(command) => secret::run(command).await,
            Command::Schedule(command) => schedule::run(command).await,
            Command::Apply(args) => apply::run(&args.fleet.clone(), args).await,
            Command::Query(args) => query::run(&args.fleet.clone(), args).await,
            Command::Events(args) => events::run(&args.fleet.clone(), args).await,
            Command::Status(args) => status::run_status(&args.fleet.clone(), args).await,
            Command::Role(command) => status::run_role(command).await,
            Command::Rollout(command) => rollout::run(command).await,
            Command::Plan(args) => plan::run(&args.fleet.clone(), args).await,
            Command::Jobs(args) => jobs::run_jobs(&args.fleet.clone(), args).await,
            Command::Job(args) => jobs::run_job(&args.fleet.clone(), args).await,
            Command::Keys(command) => keys::run(command).await,
            Command::Dashboard(command) => dashboard::run(command).await,
            Command::Completions(args) => shell::completions(&args),
            Command::Man(args) => shell::man_pages(&args),
        }
    })
}

/// Runs `command` on a runtime of its own and maps its outcome to the
/// process's exit code.
fn run_to_exit(command: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("provis: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(command);
    // Let the runtime's tasks end before the process does.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(code) => code,
        // The reader of our output went away (`provis … | head -1`): done.
        Err(err) if output::is_closed_stdout(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("provis: {err:#}");
            ExitCode::from(usage_or_failure(&err))
        }
    }
}

/// Exit code for an error: 2 when the user asked for something that cannot be
/// done as asked, 1 when the fleet or the machine failed.
fn usage_or_failure(err: &anyhow::Error) -> u8 {
    let usage = err.chain().any(|cause| {
        cause
            .downcast_ref::<provis_core::subject::NameError>()
            .is_some()
            || cause
                .downcast_ref::<provis_core::envelope::EnvelopeError>()
                .is_some()
            || matches!(
                cause.downcast_ref::<provis_core::ClientError>(),
                Some(provis_core::ClientError::NothingSelected(_))
            )
            || cause.downcast_ref::<UsageError>().is_some()
            || cause
                .downcast_ref::<provis_core::selection::SelectError>()
                .is_some()
            || matches!(
                cause.downcast_ref::<provis_core::ClientError>(),
                Some(provis_core::ClientError::Select(_))
            )
            || cause
                .downcast_ref::<provis_core::master_api::MasterApiError>()
                .is_some_and(provis_core::master_api::MasterApiError::is_usage)
            || cause
                .downcast_ref::<provis_core::master_api::ApiError>()
                .is_some_and(|err| err.kind == provis_core::master_api::ApiErrorKind::Usage)
    });
    if usage { 2 } else { 1 }
}

/// A request that cannot be done as asked (bad arguments the parser could not see).
#[derive(Debug)]
pub(crate) struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Logs to stderr as `format`, records named `name` (for bunyan).
fn init_logging(filter: &str, format: provis_telemetry::LogFormat, name: &str) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let json = format == provis_telemetry::LogFormat::Json;
    tracing_subscriber::registry()
        .with(filter)
        .with((!json).then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only for a person at a terminal, never into a file or pipe.
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
        }))
        .with(json.then(|| provis_telemetry::BunyanLayer::new(name)))
        .init();
    // A minion takes the log level its master assigns.
    provis_minion::set_log_level_hook(move |level| {
        match tracing_subscriber::EnvFilter::try_new(level) {
            Ok(filter) => {
                let _ = handle.reload(filter);
            }
            Err(err) => tracing::warn!(level, error = %err, "assigned log level ignored"),
        }
    });
}
