//! The provis master: on every start it creates (or brings up to date) the
//! fleet's JetStream storage, then serves the typed endpoints of
//! [`provis_core::master_api`] as the NATS service `provis-master` ([`api`]),
//! follows the registry and the state stream into its view of the fleet,
//! and follows its config repository ([`desired`]).
//!
//! The master also answers nats-server's auth callout ([`admission`]) when
//! the server is configured for it: every other connection is admitted by it.
//!
//! [`start`] runs the phases in order and returns a [`MasterHandle`]; on
//! stop the master takes no more requests, finishes those in flight and
//! the apply it may be in the middle of, says `master.stopped`, and drains
//! its connections.

pub mod admission;
pub mod api;
pub mod apply;
pub mod assignments;
pub mod declared_calls;
pub mod desired;
pub mod enrollment;
pub mod fleet_metrics;
pub mod fleet_view;
pub mod git_source;
pub mod job_events;
pub mod job_queue;
pub mod leadership;
pub mod liveness;
pub mod query;
pub mod reactions;
pub mod repository;
pub mod rolling_calls;
pub mod rollout;
pub mod schedules;
pub mod secrets;
pub mod state_index;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use provis_core::identity::{DerivedKey, Identity};
use provis_core::lifecycle::{Lifecycle, PartHandle};
use provis_core::{FleetContext, Subjects, event};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

pub use storage::StorageLimits;

/// The master's settings; each field has one name in the file, the flag and the env var.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterConfig {
    /// Where the fleet is (NATS URL and subject prefix).
    #[serde(flatten)]
    pub fleet: FleetContext,
    /// Retention of the fleet's streams.
    #[serde(default)]
    pub storage: StorageLimits,
    /// This master's name among the masters of the fleet (in `provis
    /// status` and the lease). Default: the hostname and the process id.
    #[serde(default)]
    pub master_id: Option<String>,
    /// Copies JetStream keeps of every stream, bucket and the object store:
    /// 1 on a single server, 3 on a cluster (one node may die). Raising it
    /// raises the stores; lowering it lowers nothing. Default: 1.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Width of a state history bucket, in seconds. Default: 3600.
    #[serde(default = "default_state_bucket_s")]
    pub state_bucket_s: u64,
    /// The config repository followed: a local path or a file:// or git:// URL. Default: none.
    #[serde(default)]
    pub repository: Option<String>,
    /// The branch followed. Default: main.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// How often the branch is fetched, in seconds. Default: 10.
    #[serde(default = "default_poll_interval_s")]
    pub poll_interval_s: u64,
    /// Where the master keeps its mirror of the repository. Default:
    /// `$XDG_STATE_HOME/provis/master`, else `~/.local/state/provis/master`.
    #[serde(default)]
    pub data_dir: Option<std::path::PathBuf>,
    /// The master's private key, which signs every bundle it publishes
    /// (created on first start). Default: `<data_dir>/master.key`.
    #[serde(default)]
    pub signing_key: Option<std::path::PathBuf>,
    /// Public keys (`ed25519:<hex>`) admitted as operators on the bus besides
    /// those of the call policy (`policy.toml`). Default: none.
    #[serde(default)]
    pub operators: Vec<String>,
    /// Public keys (`ed25519:<hex>`) admitted as observers: they may read
    /// events, state and the registry, and nothing else (dashboards, log
    /// shippers, other tools). Default: none.
    #[serde(default)]
    pub observers: Vec<String>,
    /// Where to serve Prometheus metrics (`/metrics`), `/healthz` and
    /// `/readyz`, e.g. `127.0.0.1:9464`. Default: none (not served).
    #[serde(default)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How log lines are written: `text` or `json` (bunyan records).
    /// Default: text.
    #[serde(default)]
    pub log_format: provis_telemetry::LogFormat,
    /// Where to serve the dashboard (`provis master` serves it), a
    /// loopback address such as `127.0.0.1:8080` (put a TLS proxy in front
    /// to reach it from elsewhere). Default: none (not served).
    #[serde(default)]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Serve nats-server's auth callout (harmless when the server does not
    /// use one). Default: true.
    #[serde(default = "default_auth_callout")]
    pub auth_callout: bool,
    /// New minions that may wait for acceptance at once; more are refused
    /// until some are accepted or rejected. Default: 1000.
    #[serde(default = "default_max_pending_minions")]
    pub max_pending_minions: usize,
    /// On stop, how long requests and an apply in flight may take to
    /// finish, in seconds. Default: 30.
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: u64,
}

fn default_drain_timeout_s() -> u64 {
    30
}

fn default_replicas() -> usize {
    1
}

fn default_max_pending_minions() -> usize {
    1_000
}

fn default_auth_callout() -> bool {
    true
}

fn default_branch() -> String {
    "main".to_owned()
}

fn default_poll_interval_s() -> u64 {
    10
}

fn default_state_bucket_s() -> u64 {
    3_600
}

impl MasterConfig {
    /// The settings the desired-state loop follows (and takes up on reload).
    pub fn source(&self) -> desired::SourceSettings {
        desired::SourceSettings {
            repository: self.repository.clone(),
            branch: self.branch.clone(),
            poll_interval_s: self.poll_interval_s,
        }
    }

    /// The data directory, defaulted from the environment when not set.
    pub fn data_dir(&self) -> std::path::PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        std::env::var_os("XDG_STATE_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|home| std::path::PathBuf::from(home).join(".local/state"))
            })
            .unwrap_or_else(|| std::path::PathBuf::from(".provis"))
            .join("provis")
            .join("master")
    }

    /// This master's name: `master_id`, else `<hostname>-<pid>`.
    pub fn master_id(&self) -> String {
        self.master_id.clone().unwrap_or_else(|| {
            let host = hostname::get()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "master".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }

    /// The master's key: `signing_key`, else `<data_dir>/master.key`.
    pub fn key_path(&self) -> std::path::PathBuf {
        self.signing_key
            .clone()
            .unwrap_or_else(|| self.data_dir().join("master.key"))
    }

    /// The state index's limits from these settings.
    pub fn index_limits(&self) -> state_index::IndexLimits {
        let to_ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        state_index::IndexLimits {
            bucket_ms: to_ms(self.state_bucket_s.max(1)),
            retention_ms: to_ms(self.storage.state_max_age_s),
            ..state_index::IndexLimits::default()
        }
    }
}

impl Default for MasterConfig {
    fn default() -> Self {
        Self {
            fleet: FleetContext::default(),
            storage: StorageLimits::default(),
            master_id: None,
            replicas: default_replicas(),
            state_bucket_s: default_state_bucket_s(),
            repository: None,
            branch: default_branch(),
            poll_interval_s: default_poll_interval_s(),
            data_dir: None,
            signing_key: None,
            operators: Vec::new(),
            observers: Vec::new(),
            metrics_addr: None,
            log_format: provis_telemetry::LogFormat::default(),
            http_addr: None,
            auth_callout: true,
            max_pending_minions: default_max_pending_minions(),
            drain_timeout_s: default_drain_timeout_s(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error("cannot use the master's key {path}")]
    Identity {
        path: std::path::PathBuf,
        #[source]
        source: provis_core::identity::IdentityError,
    },
    #[error("cannot connect to NATS at {url} ({what})")]
    Connect {
        url: String,
        what: &'static str,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error("cannot open the enrollment bucket")]
    Enrollment(#[source] enrollment::EnrollmentError),
    #[error("cannot open the desired state")]
    Desired(#[source] async_nats::jetstream::context::KeyValueError),
    #[error("cannot serve {what}")]
    Serve {
        what: String,
        #[source]
        source: async_nats::Error,
    },
}

/// What a running master takes besides a stop: new settings.
#[derive(Debug)]
pub struct MasterControl {
    settings: watch::Sender<desired::SourceSettings>,
    metrics_addr: Option<std::net::SocketAddr>,
    feed: FleetFeed,
}

/// What a running master knows of the fleet, for views of it in the same
/// process (the dashboard): its view, the applied commit, its connection.
#[derive(Debug, Clone)]
pub struct FleetFeed {
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    pub view: Arc<fleet_view::FleetView>,
    /// The applied commit (none on a master that follows no repository).
    pub published: Option<watch::Receiver<desired::PublishedConfig>>,
    pub metrics: Arc<provis_telemetry::Metrics>,
    /// The keys this master admits as operators and observers.
    pub grants: admission::Grants,
}

impl MasterControl {
    /// What the master knows of the fleet, kept current while it runs.
    pub fn feed(&self) -> FleetFeed {
        self.feed.clone()
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, when they are.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Takes up new settings without dropping connections. Repository,
    /// branch and poll interval change at once; the others need a restart.
    pub fn reload(&self, config: &MasterConfig) {
        self.settings.send_replace(config.source());
    }
}

/// A running master.
pub type MasterHandle = PartHandle<MasterControl>;

/// How long a starting master waits for JetStream to take its storage.
const STORAGE_WAIT: Duration = Duration::from_secs(60);

/// Connects (waiting for NATS as long as it takes), ensures storage, and
/// serves. Returns once the master answers requests.
pub async fn start(config: MasterConfig) -> Result<MasterHandle, MasterError> {
    let mut master = Startup::new(config)?;
    if let Err(err) = master.bring_up().await {
        master.abandon().await;
        return Err(err);
    }
    master.run()
}

/// The master as it comes up, phase by phase.
struct Startup {
    config: MasterConfig,
    subjects: Subjects,
    identity: Arc<Identity>,
    lifecycle: Lifecycle,
    gatekeeper: Arc<admission::Gatekeeper>,
    metrics: Arc<provis_telemetry::Metrics>,
    /// Where metrics are served, once they are.
    metrics_addr: Option<std::net::SocketAddr>,
    /// Connections closed (drained) when the master stops.
    connections: Vec<async_nats::Client>,
    /// The callout's connection, whose account keeps enrollment.
    callout: Option<async_nats::Client>,
    nats: Option<async_nats::Client>,
    js: Option<async_nats::jetstream::Context>,
    /// The master's events leave by it, acknowledged, kept on disk meanwhile.
    outbox: Option<provis_core::outbox::Outbox>,
    enrollment: Option<enrollment::Enrollment>,
    view: Arc<fleet_view::FleetView>,
    desired: Option<DesiredParts>,
    service: Option<api::SharedService>,
    /// Whether this master leads, and the lease bucket.
    leadership: Option<(leadership::Leadership, async_nats::jetstream::kv::Store)>,
    /// Stops what started if the start fails or is dropped half-way.
    stop_on_drop: tokio_util::sync::DropGuard,
}

/// What the desired-state loop hands the rest of the master.
struct DesiredParts {
    requests: tokio::sync::mpsc::Sender<desired::DesiredRequest>,
    published: watch::Receiver<desired::PublishedConfig>,
    settings: watch::Sender<desired::SourceSettings>,
    schedules: watch::Receiver<Vec<schedules::ScheduleSpec>>,
}

impl Startup {
    fn new(config: MasterConfig) -> Result<Self, MasterError> {
        let grants = admission::Grants {
            operators: config.operators.clone(),
            observers: config.observers.clone(),
        };
        grants.check().map_err(MasterError::Settings)?;
        let path = config.key_path();
        let identity =
            Arc::new(
                Identity::load_or_create(&path).map_err(|source| MasterError::Identity {
                    path: path.clone(),
                    source,
                })?,
            );
        let subjects = Subjects::new(config.fleet.prefix.clone());
        let metrics = Arc::new(provis_telemetry::Metrics::master());
        let gatekeeper = Arc::new(admission::Gatekeeper::new(
            &identity,
            subjects.clone(),
            grants,
            metrics.clone(),
        ));
        let lifecycle = Lifecycle::new();
        Ok(Self {
            view: Arc::new(fleet_view::FleetView::new(config.index_limits())),
            metrics,
            metrics_addr: None,
            config,
            subjects,
            identity,
            stop_on_drop: lifecycle.stop_on_drop(),
            lifecycle,
            gatekeeper,
            connections: Vec::new(),
            callout: None,
            nats: None,
            js: None,
            outbox: None,
            enrollment: None,
            desired: None,
            service: None,
            leadership: None,
        })
    }

    /// The phases of a start, in order.
    async fn bring_up(&mut self) -> Result<(), MasterError> {
        self.admit_connections().await?;
        self.connect_fleet().await?;
        self.ensure_storage().await?;
        self.campaign().await?;
        self.open_enrollment().await?;
        self.connect_system().await?;
        self.follow_fleet();
        self.follow_config_repository().await?;
        self.serve_api().await?;
        self.serve_metrics().await?;
        self.announce().await;
        Ok(())
    }

    /// Undoes a start that failed half-way: what started stops, connections close.
    async fn abandon(self) {
        let report = self.lifecycle.drain(Duration::from_secs(2)).await;
        if !report.complete() {
            tracing::warn!(?report, "a failed start left work running");
        }
        for connection in &self.connections {
            provis_core::lifecycle::close_connection(connection, true).await;
        }
    }

    fn url(&self) -> &str {
        &self.config.fleet.nats_url
    }

    /// Answers nats-server's auth callout. It comes first: on a fleet that
    /// uses it, even the master's own fleet connection is admitted by it.
    async fn admit_connections(&mut self) -> Result<(), MasterError> {
        if !self.config.auth_callout {
            return Ok(());
        }
        let service = self.identity.derived(DerivedKey::CalloutService);
        let seed = service
            .seed()
            .map_err(|err| MasterError::Settings(format!("the callout key: {err}")))?;
        let options = self
            .config
            .fleet
            .connect_options("provis-master-callout")
            .nkey(seed);
        let callout = connect_when_up(self.url(), options).await;
        let requests = admission::Gatekeeper::listen(&callout)
            .await
            .map_err(|source| MasterError::Serve {
                what: provis_core::bus_access::CALLOUT_SUBJECT.to_owned(),
                source,
            })?;
        self.lifecycle
            .spawn_background(self.gatekeeper.clone().serve(
                callout.clone(),
                requests,
                self.lifecycle.clone(),
            ));
        self.connections.push(callout.clone());
        self.callout = Some(callout);
        Ok(())
    }

    /// The master's own connection to the fleet's account.
    async fn connect_fleet(&mut self) -> Result<(), MasterError> {
        let options = self
            .config
            .fleet
            .connect_options_as("provis-master", &self.identity);
        let nats = connect(self.url(), "fleet", options).await?;
        self.connections.push(nats.clone());
        self.js = Some(async_nats::jetstream::new(nats.clone()));
        self.outbox = Some(provis_core::outbox::Outbox::start(
            nats.clone(),
            Some(self.config.data_dir().join("outbox.jsonl")),
            provis_core::outbox::DEFAULT_MAX_BYTES,
            &self.lifecycle,
        ));
        self.nats = Some(nats);
        Ok(())
    }

    /// Creates or updates every stream and bucket of the fleet. A cluster
    /// that is still electing its JetStream leader (every node just
    /// started) is waited for, up to a minute.
    async fn ensure_storage(&mut self) -> Result<(), MasterError> {
        let js = self.js()?;
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(250);
        loop {
            match storage::ensure(
                &js,
                &self.subjects,
                &self.config.storage,
                self.config.replicas,
            )
            .await
            {
                Ok(()) => return Ok(()),
                Err(err) if started.elapsed() < STORAGE_WAIT => {
                    tracing::warn!(error = %provis_core::error_chain(&err), "storage not ready yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Campaigns for the lease: the writing work runs while this master leads.
    async fn campaign(&mut self) -> Result<(), MasterError> {
        let store = leadership::open_bucket(&self.js()?, self.config.replicas).await?;
        let (leadership, campaign) = leadership::campaign(
            store.clone(),
            self.config.master_id(),
            self.lifecycle.stop_token(),
        );
        self.lifecycle.spawn_background(campaign);
        self.leadership = Some((leadership, store));
        Ok(())
    }

    fn leading(&self) -> leadership::Leadership {
        self.leadership.as_ref().map_or_else(
            || leadership::Leadership::fixed(leadership::LeaderState::default()),
            |(leadership, _)| leadership.clone(),
        )
    }

    /// Opens enrollment: in the callout's own account when there is one,
    /// which no fleet identity can reach, not even through the server
    /// copying a stream's messages onto a subject they choose.
    async fn open_enrollment(&mut self) -> Result<(), MasterError> {
        let js = match &self.callout {
            Some(callout) => async_nats::jetstream::new(callout.clone()),
            None => self.js()?,
        };
        let enrollment = enrollment::Enrollment::open(
            &js,
            self.config.max_pending_minions,
            self.config.replicas,
        )
        .await
        .map_err(MasterError::Enrollment)?;
        self.gatekeeper.ready(enrollment.clone(), self.outbox()?);
        self.lifecycle
            .spawn_background(enrollment.clone().follow(js, self.lifecycle.stop_token()));
        self.enrollment = Some(enrollment);
        Ok(())
    }

    /// The system account, to kick revoked minions, and the call policy's
    /// operators, whom the callout admits.
    async fn connect_system(&mut self) -> Result<(), MasterError> {
        if !self.config.auth_callout {
            return Ok(());
        }
        let options = self
            .config
            .fleet
            .connect_options_as("provis-master-system", &self.identity)
            .user_and_password(
                provis_core::bus_access::SYSTEM_USER.to_owned(),
                String::new(),
            );
        let system = connect(self.url(), "system account", options).await?;
        self.connections.push(system.clone());
        self.gatekeeper.set_system(system);
        self.lifecycle.spawn_background(
            self.gatekeeper
                .clone()
                .follow_policy(self.js()?, self.lifecycle.stop_token()),
        );
        Ok(())
    }

    /// Follows the state stream into the index; the registry is followed
    /// once the desired-state loop exists (it is told who appears).
    fn follow_fleet(&mut self) {
        let Ok(js) = self.js() else { return };
        let (view, subjects, stop) = (
            self.view.clone(),
            self.subjects.clone(),
            self.lifecycle.stop_token(),
        );
        self.lifecycle
            .spawn_background(async move { view.follow_state(js, subjects, stop).await });
    }

    /// Follows the config repository (if any) and the registry, whose
    /// minions it assigns roles to.
    async fn follow_config_repository(&mut self) -> Result<(), MasterError> {
        let js = self.js()?;
        let desired = desired::DesiredState::open(
            js.clone(),
            self.outbox()?,
            self.subjects.clone(),
            self.view.clone(),
            self.config.data_dir(),
            self.identity.clone(),
            self.leading(),
        )
        .await
        .map_err(MasterError::Desired)?;
        let published = desired.published();
        let reactions = desired.reactions();
        let schedules = desired.schedules();
        let (requests, requests_rx) = tokio::sync::mpsc::channel(1024);
        let (settings, settings_rx) = watch::channel(self.config.source());
        self.lifecycle.spawn_background(desired.run(
            settings_rx,
            requests_rx,
            self.lifecycle.stop_token(),
        ));
        let (view, subjects, stop, assign, outbox, leading) = (
            self.view.clone(),
            self.subjects.clone(),
            self.lifecycle.stop_token(),
            requests.clone(),
            self.outbox()?,
            self.leading(),
        );
        self.lifecycle.spawn_background(async move {
            liveness::follow(js, outbox, subjects, &view, assign, leading, stop).await;
        });
        self.lifecycle.spawn_background(job_queue::deliver(
            self.nats()?,
            self.subjects.clone(),
            self.view.clone(),
            self.leading(),
            self.lifecycle.stop_token(),
        ));
        self.lifecycle.spawn_background(job_events::announce(
            self.nats()?,
            self.subjects.clone(),
            self.outbox()?,
            self.leading(),
            self.lifecycle.stop_token(),
        ));
        self.lifecycle.spawn_background(rolling_calls::run(
            self.nats()?,
            self.subjects.clone(),
            self.view.clone(),
            self.leading(),
            self.lifecycle.stop_token(),
        ));
        let reactor = reactions::Reactor {
            nats: self.nats()?,
            subjects: self.subjects.clone(),
            client: provis_core::Client::new(self.nats()?, self.subjects.clone(), "master")
                .with_shared_signer(self.identity.clone()),
            outbox: self.outbox()?,
            leadership: self.leading(),
            view: self.view.clone(),
        };
        self.lifecycle.spawn_background(reactions::run(
            reactor,
            reactions,
            self.lifecycle.stop_token(),
        ));
        let scheduler = schedules::Scheduler {
            subjects: self.subjects.clone(),
            client: provis_core::Client::new(self.nats()?, self.subjects.clone(), "master")
                .with_shared_signer(self.identity.clone()),
            outbox: self.outbox()?,
            leadership: self.leading(),
            config: self
                .js()?
                .get_key_value(provis_core::storage::BUCKET_CONFIG)
                .await
                .map_err(MasterError::Desired)?,
            view: self.view.clone(),
        };
        self.lifecycle.spawn_background(schedules::run(
            scheduler,
            schedules.clone(),
            self.lifecycle.stop_token(),
        ));
        self.desired = Some(DesiredParts {
            requests,
            published,
            settings,
            schedules,
        });
        Ok(())
    }

    /// Serves the master's endpoints.
    async fn serve_api(&mut self) -> Result<(), MasterError> {
        let (Some(desired), Some(enrollment)) = (&self.desired, &self.enrollment) else {
            return Err(MasterError::Settings(
                "the master's API started before its parts".into(),
            ));
        };
        let served = Arc::new(api::Served {
            public_key: self.identity.public_key().to_owned(),
            nats: self.nats()?,
            outbox: self.outbox()?,
            subjects: self.subjects.clone(),
            view: self.view.clone(),
            desired: desired.requests.clone(),
            config: desired.published.clone(),
            schedules: desired.schedules.clone(),
            enrollment: enrollment.clone(),
            gatekeeper: self.gatekeeper.clone(),
            leadership: self.leading(),
            leader_bucket: self.leadership.as_ref().map(|(_, store)| store.clone()),
            http_addr: self.config.http_addr,
        });
        // Its own connection, which the callout lets publish to inboxes only.
        let options = self
            .config
            .fleet
            .connect_options_as("provis-master-api", &self.identity)
            .user_and_password(provis_core::bus_access::API_USER.to_owned(), String::new());
        let connection = connect(self.url(), "API", options).await?;
        self.connections.push(connection.clone());
        self.service = Some(api::serve(served, &connection, &self.lifecycle).await?);
        // The subscriptions are in place before anyone is told the master runs.
        if let Err(source) = connection.flush().await {
            return Err(MasterError::Serve {
                what: "the master's endpoints".into(),
                source: Box::new(source),
            });
        }
        Ok(())
    }

    /// Keeps the metrics current, and serves them with `/healthz` and
    /// `/readyz` when `metrics_addr` is set.
    async fn serve_metrics(&mut self) -> Result<(), MasterError> {
        let published = self.desired.as_ref().map(|parts| parts.published.clone());
        self.lifecycle.spawn_background(fleet_metrics::run(
            fleet_metrics::FleetMetrics {
                nats: self.nats()?,
                subjects: self.subjects.clone(),
                view: self.view.clone(),
                published,
                outbox: self.outbox()?,
                metrics: self.metrics.clone(),
            },
            self.lifecycle.stop_token(),
        ));
        let Some(addr) = self.config.metrics_addr else {
            return Ok(());
        };
        let readiness = Arc::new(fleet_metrics::MasterReadiness {
            nats: self.nats()?,
            leadership: self.leading(),
        });
        let server = provis_telemetry::HttpServer::health(addr, self.metrics.clone(), readiness)
            .await
            .map_err(|err| MasterError::Settings(provis_core::error_chain(&err)))?;
        let bound = server.addr();
        tracing::info!(url = %format!("http://{bound}/metrics"), "metrics, /healthz and /readyz served");
        self.lifecycle
            .spawn_background(server.serve(self.lifecycle.close_token()));
        self.metrics_addr = Some(bound);
        Ok(())
    }

    async fn announce(&self) {
        if let Ok(outbox) = self.outbox() {
            event::emit(
                &outbox,
                &self.subjects,
                "master",
                "master.started",
                json!({ "version": provis_core::VERSION }),
            );
        }
        tracing::info!(prefix = %self.subjects.prefix(), public_key = %self.identity.public_key(), "master serving; bundles and desired state are signed with this key (pin it on minions: trusted_bundle_keys)");
    }

    /// Hands the running master to its main task: it waits for a stop,
    /// then drains and says goodbye.
    fn run(self) -> Result<MasterHandle, MasterError> {
        let Self {
            config,
            subjects,
            lifecycle,
            connections,
            outbox,
            desired,
            service,
            stop_on_drop,
            metrics_addr,
            nats,
            view,
            metrics,
            ..
        } = self;
        let nats = nats.ok_or_else(|| MasterError::Settings("no fleet connection".into()))?;
        let feed = FleetFeed {
            nats,
            subjects: subjects.clone(),
            view,
            published: desired.as_ref().map(|parts| parts.published.clone()),
            metrics,
            grants: admission::Grants {
                operators: config.operators.clone(),
                observers: config.observers.clone(),
            },
        };
        stop_on_drop.disarm();
        let (settings, _) = watch::channel(config.source());
        let settings = desired.map_or(settings, |parts| parts.settings);
        let drain_timeout = Duration::from_secs(config.drain_timeout_s);
        let life = lifecycle.clone();
        let main = tokio::spawn(async move {
            life.stopping().await;
            tracing::info!(
                in_flight = life.work_in_flight(),
                "master stopping: no new requests; finishing those in flight"
            );
            let service = service.and_then(|shared| {
                shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
            });
            if let Some(service) = service
                && let Err(err) = service.stop().await
            {
                tracing::debug!(error = %err, "service not stopped cleanly");
            }
            // Said now: the outbox sends until the master closes.
            if let Some(outbox) = &outbox {
                event::emit(outbox, &subjects, "master", "master.stopped", json!({}));
            }
            let report = life.drain(drain_timeout).await;
            if !report.complete() {
                tracing::warn!(
                    work_left = report.work_left,
                    background_left = report.background_left,
                    "stopping after {drain_timeout:?} with work unfinished"
                );
            }
            for connection in &connections {
                provis_core::lifecycle::close_connection(connection, true).await;
            }
            tracing::info!("master stopped");
        });
        Ok(PartHandle::new(
            "master",
            lifecycle,
            main,
            MasterControl {
                settings,
                metrics_addr,
                feed,
            },
        ))
    }

    fn nats(&self) -> Result<async_nats::Client, MasterError> {
        self.nats
            .clone()
            .ok_or_else(|| MasterError::Settings("no fleet connection yet".into()))
    }

    fn outbox(&self) -> Result<provis_core::outbox::Outbox, MasterError> {
        self.outbox
            .clone()
            .ok_or_else(|| MasterError::Settings("no fleet connection yet".into()))
    }

    fn js(&self) -> Result<async_nats::jetstream::Context, MasterError> {
        self.js
            .clone()
            .ok_or_else(|| MasterError::Settings("no fleet connection yet".into()))
    }
}

async fn connect(
    url: &str,
    what: &'static str,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::Client, MasterError> {
    options
        .retry_on_initial_connect()
        .connect(provis_core::context::server_list(url))
        .await
        .map_err(|source| MasterError::Connect {
            url: url.to_owned(),
            what,
            source,
        })
}

/// Connects once the server is up, however long that takes: the first
/// connection of a master that may start before its nats-server.
async fn connect_when_up(url: &str, options: async_nats::ConnectOptions) -> async_nats::Client {
    let mut delay = Duration::from_millis(100);
    loop {
        match options
            .clone()
            .connect(provis_core::context::server_list(url))
            .await
        {
            Ok(client) => return client,
            Err(err) => {
                tracing::warn!(%url, error = %err, "NATS not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
