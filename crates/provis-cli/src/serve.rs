//! `provis master` and `provis minion`: run one part of the fleet in the
//! foreground until SIGINT or SIGTERM.
//!
//! Settings come in layers, later ones winning: defaults, the context file
//! (`nats_url`, `prefix`), the `--config` file, then flags and env vars. Each
//! setting has one name in all of them (`heartbeat_interval_ms`,
//! `--heartbeat-interval-ms`, `PROVIS_HEARTBEAT_INTERVAL_MS`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use provis_core::master_api::SyncOutcome;
use provis_core::{MinionId, RoleName};
use provis_master::MasterConfig;
use provis_minion::MinionConfig;
use serde::Deserialize as _;
use serde::de::DeserializeOwned;

use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
pub struct MasterArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Master settings file (TOML; see MasterConfig); reloaded on change or SIGHUP
    #[arg(long, env = "PROVIS_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The config repository to follow: a local path or a file:// or git:// URL
    #[arg(long, env = "PROVIS_REPOSITORY")]
    repository: Option<String>,
    /// The branch followed [default: main]
    #[arg(long, env = "PROVIS_BRANCH")]
    branch: Option<String>,
    /// How often the branch is fetched, in seconds [default: 10]
    #[arg(long, env = "PROVIS_POLL_INTERVAL_S")]
    poll_interval_s: Option<u64>,
    /// Where the master keeps its mirror of the repository
    #[arg(long, env = "PROVIS_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The master's private key (signs bundles; its NATS identity) [default: <data_dir>/master.key]
    #[arg(long, env = "PROVIS_SIGNING_KEY", global = true)]
    signing_key: Option<PathBuf>,
    /// Public keys admitted as operators besides the call policy's, comma-separated
    #[arg(long, env = "PROVIS_OPERATORS", value_delimiter = ',')]
    operators: Option<Vec<String>>,
    /// Public keys admitted as observers (read events, state and the registry; nothing else), comma-separated
    #[arg(long, env = "PROVIS_OBSERVERS", value_delimiter = ',')]
    observers: Option<Vec<String>>,
    /// Serve Prometheus metrics, /healthz and /readyz here, e.g. 127.0.0.1:9464 [default: off]
    #[arg(long, env = "PROVIS_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Serve the dashboard here, a loopback address, e.g. 127.0.0.1:8080 [default: off]
    #[arg(long, env = "PROVIS_HTTP_ADDR")]
    http_addr: Option<std::net::SocketAddr>,
    /// Serve nats-server's auth callout [default: true]
    #[arg(long, env = "PROVIS_AUTH_CALLOUT")]
    auth_callout: Option<bool>,
    /// New minions that may wait for acceptance at once [default: 1000]
    #[arg(long, env = "PROVIS_MAX_PENDING_MINIONS")]
    max_pending_minions: Option<u64>,
    /// On stop, seconds that requests and an apply in flight may take to finish [default: 30]
    #[arg(long, env = "PROVIS_DRAIN_TIMEOUT_S")]
    drain_timeout_s: Option<u64>,
    /// Copies of every stream and bucket: 1 on one server, 3 on a cluster [default: 1]
    #[arg(long, env = "PROVIS_REPLICAS")]
    replicas: Option<u64>,
    /// This master's name among the fleet's masters [default: <hostname>-<pid>]
    #[arg(long, env = "PROVIS_MASTER_ID")]
    master_id: Option<String>,
    #[command(subcommand)]
    action: Option<MasterAction>,
}

#[derive(Debug, clap::Subcommand)]
pub enum MasterAction {
    /// Ask the running master to fetch its repository now and apply what is new
    Sync,
    /// Print the nats-server settings that send every connection to this
    /// master's auth callout (accounts, callout user, issuer); add listen,
    /// TLS and JetStream store to make a server config
    NatsConfig,
}

impl MasterArgs {
    fn overrides(&self) -> anyhow::Result<toml::Table> {
        let mut overrides = toml::Table::new();
        if let Some(repository) = &self.repository {
            overrides.insert("repository".into(), repository.as_str().into());
        }
        if let Some(branch) = &self.branch {
            overrides.insert("branch".into(), branch.as_str().into());
        }
        if let Some(seconds) = self.poll_interval_s {
            overrides.insert("poll_interval_s".into(), toml_int(seconds)?);
        }
        for (setting, path) in [
            ("data_dir", &self.data_dir),
            ("signing_key", &self.signing_key),
        ] {
            if let Some(path) = path {
                overrides.insert(
                    setting.into(),
                    path.to_str().context("path is not UTF-8")?.into(),
                );
            }
        }
        for (setting, keys) in [
            ("operators", &self.operators),
            ("observers", &self.observers),
        ] {
            if let Some(keys) = keys {
                let keys: Vec<toml::Value> = keys.iter().map(|k| k.as_str().into()).collect();
                overrides.insert(setting.into(), keys.into());
            }
        }
        for (setting, addr) in [
            ("metrics_addr", self.metrics_addr),
            ("http_addr", self.http_addr),
        ] {
            if let Some(addr) = addr {
                overrides.insert(setting.into(), addr.to_string().into());
            }
        }
        if let Some(on) = self.auth_callout {
            overrides.insert("auth_callout".into(), on.into());
        }
        if let Some(n) = self.max_pending_minions {
            overrides.insert("max_pending_minions".into(), toml_int(n)?);
        }
        if let Some(seconds) = self.drain_timeout_s {
            overrides.insert("drain_timeout_s".into(), toml_int(seconds)?);
        }
        if let Some(replicas) = self.replicas {
            overrides.insert("replicas".into(), toml_int(replicas)?);
        }
        if let Some(id) = &self.master_id {
            overrides.insert("master_id".into(), id.as_str().into());
        }
        Ok(overrides)
    }
}

#[derive(Debug, Args)]
pub struct MinionArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Minion settings file (TOML; see MinionConfig)
    #[arg(long, env = "PROVIS_CONFIG")]
    config: Option<PathBuf>,
    /// This minion's id [default: the hostname, made a valid id]
    #[arg(long, env = "PROVIS_ID")]
    id: Option<MinionId>,
    /// Roles, comma-separated, e.g. web.eu,db
    #[arg(long, env = "PROVIS_ROLES", value_delimiter = ',')]
    roles: Option<Vec<RoleName>>,
    /// Heartbeat period in milliseconds [default: 5000]
    #[arg(long, env = "PROVIS_HEARTBEAT_INTERVAL_MS")]
    heartbeat_interval_ms: Option<u64>,
    /// Calls run at once [default: 256]
    #[arg(long, env = "PROVIS_MAX_CONCURRENT_CALLS")]
    max_concurrent_calls: Option<usize>,
    /// Calls that may wait for a turn; more are answered `busy` [default: 1024]
    #[arg(long, env = "PROVIS_MAX_QUEUED_CALLS")]
    max_queued_calls: Option<usize>,
    /// Where the minion keeps its state database [default: ~/.local/state/provis/<id>]
    #[arg(long, env = "PROVIS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where the local gRPC API listens: `unix` (grpc.sock in the data dir,
    /// owner and group only), `unix:PATH`, `IP:PORT` (every RPC signed), or
    /// `off` [default: unix]
    #[arg(long, env = "PROVIS_GRPC_LISTEN")]
    grpc_listen: Option<String>,
    /// PEM certificate of the gRPC API (serves TLS with --grpc-tls-key)
    #[arg(long, env = "PROVIS_GRPC_TLS_CERT")]
    grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of the gRPC API
    #[arg(long, env = "PROVIS_GRPC_TLS_KEY")]
    grpc_tls_key: Option<PathBuf>,
    /// Public keys whose signature a bundle needs to run here, comma-separated
    #[arg(long, env = "PROVIS_TRUSTED_BUNDLE_KEYS", value_delimiter = ',')]
    trusted_bundle_keys: Option<Vec<String>>,
    /// Public keys of the callers whose signed calls run here, comma-separated
    #[arg(long, env = "PROVIS_TRUSTED_CALLERS", value_delimiter = ',')]
    trusted_callers: Option<Vec<String>>,
    /// One-time enrollment token (`provis keys token`): accepted at once on first connect
    #[arg(long, env = "PROVIS_ENROLLMENT_TOKEN")]
    enrollment_token: Option<String>,
    /// On stop, seconds that calls in flight may take to finish and reply [default: 30]
    #[arg(long, env = "PROVIS_DRAIN_TIMEOUT_S")]
    drain_timeout_s: Option<u64>,
    /// Serve Prometheus metrics, /healthz and /readyz here, e.g. 127.0.0.1:9465 [default: off]
    #[arg(long, env = "PROVIS_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

impl MasterArgs {
    /// The settings file, if one is given.
    pub fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }
}

impl MinionArgs {
    /// The settings file, if one is given.
    pub fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }
}

/// The `log_format` a settings file names, if it is readable and names one
/// (logging starts before the settings are read as a whole).
pub fn log_format_in(file: Option<&Path>) -> Option<provis_telemetry::LogFormat> {
    let text = std::fs::read_to_string(file?).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    table.get("log_format")?.as_str()?.parse().ok()
}

/// Tells systemd the part serves and pings its watchdog until `stop`.
fn notify_systemd(stop: tokio_util::sync::CancellationToken) {
    provis_telemetry::systemd::ready();
    tokio::spawn(provis_telemetry::systemd::watchdog(stop));
}

pub async fn run_master(fleet: &FleetArgs, args: MasterArgs) -> anyhow::Result<ExitCode> {
    let load = || -> anyhow::Result<MasterConfig> {
        layered_config(fleet, args.config.as_deref(), args.overrides()?)
    };
    match args.action {
        Some(MasterAction::Sync) => return sync_now(fleet).await,
        Some(MasterAction::NatsConfig) => {
            let config = load()?;
            let path = config
                .signing_key
                .clone()
                .unwrap_or_else(|| config.data_dir().join("master.key"));
            let identity = provis_core::identity::Identity::load_or_create(&path)
                .with_context(|| format!("the master's key {}", path.display()))?;
            out!("{}", provis_core::bus_access::server_auth_config(&identity));
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    let modified = |path: &Option<PathBuf>| {
        path.as_ref()
            .and_then(|p| std::fs::metadata(p).ok()?.modified().ok())
    };
    // Noted before reading, so a change made while the master starts is not missed.
    let mut seen = modified(&args.config);
    let mut config = load()?;
    tracing::info!(nats_url = %config.fleet.nats_url, repository = ?config.repository, "starting master");
    let master = provis_master::start(config.clone())
        .await
        .context("starting the master")?;
    let watchdog = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = config.http_addr {
        let dashboard = provis_dashboard::Dashboard::bind(addr, master.control().feed())
            .await
            .context("starting the dashboard")?;
        tracing::info!(url = %format!("http://{}/", dashboard.addr()), "dashboard served (log in with `provis dashboard token`)");
        tokio::spawn(dashboard.serve(watchdog.clone()));
    }
    notify_systemd(watchdog.clone());
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut check = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        let reload = tokio::select! {
            () = shutdown_signal() => break,
            _ = hangup.recv() => true,
            _ = check.tick() => {
                let now = modified(&args.config);
                let changed = now != seen;
                seen = now;
                changed
            }
        };
        if !reload {
            continue;
        }
        match load() {
            Ok(new) => {
                if (&new.fleet, &new.storage, new.state_bucket_s, new.replicas)
                    != (
                        &config.fleet,
                        &config.storage,
                        config.state_bucket_s,
                        config.replicas,
                    )
                {
                    tracing::warn!(
                        "nats_url, prefix, storage, state_bucket_s and replicas take effect at the next start"
                    );
                }
                master.control().reload(&new);
                tracing::info!(repository = ?new.repository, branch = %new.branch, poll_interval_s = new.poll_interval_s, "settings reloaded");
                config = new;
            }
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "settings not reloaded; keeping the current ones")
            }
        }
    }
    provis_telemetry::systemd::stopping();
    master.stop().await;
    watchdog.cancel();
    Ok(ExitCode::SUCCESS)
}

async fn sync_now(fleet: &FleetArgs) -> anyhow::Result<ExitCode> {
    let answer = fleet.master().await?.sync().await?;
    outln!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(match answer.outcome {
        SyncOutcome::Rejected | SyncOutcome::RejectedBefore => ExitCode::from(1),
        SyncOutcome::Applied | SyncOutcome::AlreadyApplied | SyncOutcome::Unchanged => {
            ExitCode::SUCCESS
        }
    })
}

pub async fn run_minion(fleet: &FleetArgs, args: MinionArgs) -> anyhow::Result<ExitCode> {
    let mut overrides = toml::Table::new();
    if let Some(id) = &args.id {
        overrides.insert("id".into(), id.to_string().into());
    }
    if let Some(roles) = &args.roles {
        let roles: Vec<toml::Value> = roles.iter().map(|r| r.to_string().into()).collect();
        overrides.insert("roles".into(), roles.into());
    }
    if let Some(ms) = args.heartbeat_interval_ms {
        overrides.insert("heartbeat_interval_ms".into(), toml_int(ms)?);
    }
    if let Some(n) = args.max_concurrent_calls {
        overrides.insert("max_concurrent_calls".into(), toml_int(n as u64)?);
    }
    if let Some(n) = args.max_queued_calls {
        overrides.insert("max_queued_calls".into(), toml_int(n as u64)?);
    }
    if let Some(seconds) = args.drain_timeout_s {
        overrides.insert("drain_timeout_s".into(), toml_int(seconds)?);
    }
    if let Some(addr) = args.metrics_addr {
        overrides.insert("metrics_addr".into(), addr.to_string().into());
    }
    if let Some(dir) = &args.data_dir {
        let dir = dir.to_str().context("--data-dir is not UTF-8")?;
        overrides.insert("data_dir".into(), dir.into());
    }
    if let Some(listen) = &args.grpc_listen {
        overrides.insert("grpc_listen".into(), listen.as_str().into());
    }
    if let Some(token) = &args.enrollment_token {
        overrides.insert("enrollment_token".into(), token.as_str().into());
    }
    for (setting, keys) in [
        ("trusted_bundle_keys", &args.trusted_bundle_keys),
        ("trusted_callers", &args.trusted_callers),
    ] {
        if let Some(keys) = keys {
            let keys: Vec<toml::Value> = keys.iter().map(|k| k.as_str().into()).collect();
            overrides.insert(setting.into(), keys.into());
        }
    }
    for (key, path) in [
        ("grpc_tls_cert", &args.grpc_tls_cert),
        ("grpc_tls_key", &args.grpc_tls_key),
    ] {
        if let Some(path) = path {
            overrides.insert(
                key.into(),
                path.to_str().context("path is not UTF-8")?.into(),
            );
        }
    }
    let mut config: toml::Table = layered_config(fleet, args.config.as_deref(), overrides)?;
    if !config.contains_key("id") {
        config.insert("id".into(), id_from_hostname()?.to_string().into());
    }
    let config =
        MinionConfig::deserialize(toml::Value::Table(config)).context("invalid minion settings")?;
    tracing::info!(minion = %config.id, nats_url = %config.fleet.nats_url, "starting minion");
    let minion = provis_minion::start(config)
        .await
        .context("starting the minion")?;
    let watchdog = tokio_util::sync::CancellationToken::new();
    notify_systemd(watchdog.clone());
    shutdown_signal().await;
    provis_telemetry::systemd::stopping();
    minion.stop().await;
    watchdog.cancel();
    Ok(ExitCode::SUCCESS)
}

fn toml_int(n: u64) -> anyhow::Result<toml::Value> {
    Ok(toml::Value::Integer(
        i64::try_from(n).context("number too large")?,
    ))
}

/// Defaults < context file < settings file < flags and env, deserialized as `T`.
fn layered_config<T: DeserializeOwned>(
    fleet: &FleetArgs,
    file: Option<&Path>,
    overrides: toml::Table,
) -> anyhow::Result<T> {
    let mut context = fleet.resolve_file_only()?;
    let mut table = toml::Table::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read settings file {}", path.display()))?;
        table = toml::from_str(&text)
            .with_context(|| format!("settings file {} is not valid TOML", path.display()))?;
    }
    // The settings file's own fleet settings win over the context file's.
    if let Some(url) = table.get("nats_url").and_then(toml::Value::as_str) {
        context.nats_url = url.to_owned();
    }
    if let Some(prefix) = table.get("prefix").and_then(toml::Value::as_str) {
        context.prefix = prefix.parse().with_context(|| {
            format!(
                "bad prefix in {}",
                file.map(Path::display)
                    .map(|d| d.to_string())
                    .unwrap_or_default()
            )
        })?;
    }
    if let Some(ca) = table.get("tls_ca").and_then(toml::Value::as_str) {
        context.tls_ca = Some(PathBuf::from(ca));
    }
    fleet.apply(&mut context);
    table.insert("nats_url".into(), context.nats_url.into());
    table.insert("prefix".into(), context.prefix.to_string().into());
    if let Some(ca) = &context.tls_ca {
        table.insert(
            "tls_ca".into(),
            ca.to_str().context("tls_ca is not UTF-8")?.into(),
        );
    }
    // A master or minion is never the context file's identity (an
    // operator's key): only its settings file or an explicit flag name one.
    if let Some(identity) = &fleet.identity {
        table.insert(
            "identity".into(),
            identity.to_str().context("identity is not UTF-8")?.into(),
        );
    }
    table.extend(overrides);
    let what = file.map_or_else(|| "flags".to_owned(), |path| path.display().to_string());
    T::deserialize(toml::Value::Table(table)).with_context(|| format!("invalid settings ({what})"))
}

/// The hostname, lowercased, with anything a minion id cannot hold made '-'.
fn id_from_hostname() -> anyhow::Result<MinionId> {
    let raw = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(provis_core::subject::MAX_TOKEN_LEN)
        .collect();
    cleaned
        .parse()
        .context("cannot derive a minion id from the hostname; give one with --id")
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGTERM; only Ctrl-C stops this");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
