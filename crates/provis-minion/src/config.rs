//! A minion's settings. Each field has one name in the config file, the CLI
//! flag and the env var (`heartbeat_interval_ms` / `--heartbeat-interval-ms` /
//! `PROVIS_HEARTBEAT_INTERVAL_MS`); the CLI merges them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use provis_core::{FleetContext, MinionId, RoleName};
use serde::{Deserialize, Serialize};

/// Heartbeat period when none is configured: sized for 10,000 minions
/// (2,000 heartbeats a second of about 40 bytes to each master; see
/// docs/scale.md), offline after 15 s of silence.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 5_000;
/// How many calls one minion runs at once; more wait their turn.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 256;
/// How many calls may wait for a turn; more are refused as busy.
pub const DEFAULT_MAX_QUEUED_CALLS: usize = 1_024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinionConfig {
    /// This minion's id, unique in the fleet. Required.
    pub id: MinionId,
    /// Roles this minion holds, e.g. `["web.eu"]`. Default: none.
    #[serde(default)]
    pub roles: Vec<RoleName>,
    /// Where the fleet is (NATS URL and subject prefix).
    #[serde(flatten)]
    pub fleet: FleetContext,
    /// How often the minion sends a heartbeat (`<prefix>.heartbeat.<id>`);
    /// three missed ones and the leading master marks it offline.
    /// Default: 5000 ms.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// How often a state sample goes to `<prefix>.state.<id>`. Default: 60000 ms.
    #[serde(default = "default_state_interval_ms")]
    pub state_interval_ms: u64,
    /// Calls run at once. Default: 256.
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: usize,
    /// Calls that may wait for one of those slots; a call beyond them is
    /// answered at once with the error `busy`, so a flood of calls never
    /// queues without bound. Default: 1024.
    #[serde(default = "default_max_queued_calls")]
    pub max_queued_calls: usize,
    /// Where the minion keeps what must survive a restart (the services'
    /// state database). Default: `$XDG_STATE_HOME/provis/<id>`, else
    /// `~/.local/state/provis/<id>`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Where the local gRPC API listens: `unix` (the socket `grpc.sock` in
    /// the data dir, mode 0660: the minion's user and group only),
    /// `unix:PATH`, `IP:PORT` (TCP: every RPC must be signed by a trusted
    /// caller; TLS required off loopback), or `off`. Default: `unix`. The
    /// registry and `provis call --via grpc` know where.
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: String,
    /// PEM certificate (chain) of the gRPC API; with `grpc_tls_key`, the API
    /// serves TLS. Required when `grpc_listen` is not a loopback address.
    /// Default: none.
    #[serde(default)]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of the gRPC API. Default: none.
    #[serde(default)]
    pub grpc_tls_key: Option<PathBuf>,
    /// Public keys (`ed25519:<hex>`, pinned at install) whose signature a
    /// bundle must carry to run here, usually the master's. Default: none,
    /// which runs unsigned bundles (an unsecured fleet).
    #[serde(default)]
    pub trusted_bundle_keys: Vec<String>,
    /// Public keys of the callers (operators, the master) whose signed calls
    /// this minion runs; any other call is refused. Default: none, which runs
    /// every call (an unsecured fleet).
    #[serde(default)]
    pub trusted_callers: Vec<String>,
    /// Free-form labels, part of the facts (`facts.labels.team == "payments"`). Default: none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether to run injected services. `false` leaves only the built-in
    /// `sys` service (no bucket watches): for minimal agents and simulated
    /// fleets. Default: true.
    #[serde(default = "default_inject_services")]
    pub inject_services: bool,
    /// A one-time enrollment token (`provis keys token`): a new minion
    /// presenting it is accepted at once instead of waiting for
    /// `provis keys accept`. Default: none.
    #[serde(default)]
    pub enrollment_token: Option<String>,
    /// On stop, how long the calls in flight may take to finish and reply,
    /// in seconds. Default: 30.
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: u64,
    /// Where to serve Prometheus metrics (`/metrics`), `/healthz` and
    /// `/readyz`, e.g. `127.0.0.1:9465`. Default: none (not served).
    #[serde(default)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How log lines are written: `text` or `json` (bunyan records).
    /// Default: text.
    #[serde(default)]
    pub log_format: provis_telemetry::LogFormat,
}

fn default_drain_timeout_s() -> u64 {
    30
}

fn default_inject_services() -> bool {
    true
}

fn default_grpc_listen() -> String {
    "unix".to_owned()
}

fn default_heartbeat_interval_ms() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_MS
}

fn default_state_interval_ms() -> u64 {
    60_000
}

fn default_max_concurrent_calls() -> usize {
    DEFAULT_MAX_CONCURRENT_CALLS
}

fn default_max_queued_calls() -> usize {
    DEFAULT_MAX_QUEUED_CALLS
}

impl MinionConfig {
    /// A minion with default settings.
    pub fn new(id: MinionId, roles: Vec<RoleName>, fleet: FleetContext) -> Self {
        Self {
            id,
            roles,
            fleet,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
            max_queued_calls: DEFAULT_MAX_QUEUED_CALLS,
            state_interval_ms: default_state_interval_ms(),
            data_dir: None,
            grpc_listen: default_grpc_listen(),
            grpc_tls_cert: None,
            grpc_tls_key: None,
            trusted_bundle_keys: Vec::new(),
            trusted_callers: Vec::new(),
            labels: BTreeMap::new(),
            inject_services: true,
            enrollment_token: None,
            drain_timeout_s: default_drain_timeout_s(),
            metrics_addr: None,
            log_format: provis_telemetry::LogFormat::default(),
        }
    }

    /// The data directory, defaulted from the environment when not set.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state"))
            })
            .unwrap_or_else(|| PathBuf::from(".provis"));
        base.join("provis").join(self.id.as_str())
    }

    /// The minion's key: the `identity` setting, else `<data_dir>/minion.key`
    /// (created on first start).
    pub fn identity_path(&self) -> PathBuf {
        self.fleet
            .identity
            .clone()
            .unwrap_or_else(|| self.data_dir().join("minion.key"))
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(100))
    }

    pub fn state_interval(&self) -> Duration {
        Duration::from_millis(self.state_interval_ms.max(100))
    }
}
