//! The provis minion: one agent per machine. It connects to NATS (retrying
//! with backoff for as long as it takes), listens on its own call subject, the
//! fleet-wide one and every level of each of its roles, sends heartbeats,
//! writes its registry record when it changes, and answers each call with
//! exactly one reply (`busy` when more calls come than it runs and queues).
//!
//! A minion never dies of a message: every payload is checked before it is
//! dispatched, and a bad one gets a structured error reply where a reply
//! subject exists.
//!
//! [`start`] runs the phases in order and returns a [`MinionHandle`]. On
//! stop the minion unsubscribes (no new calls), marks itself stopped in the
//! registry (callers stop selecting it), lets the calls in flight finish
//! and send their replies within `drain_timeout_s`, says `minion.offline`,
//! and drains its connection.

pub mod assignment;
pub mod config;
pub mod dispatch;
pub mod events;
pub mod grpc;
pub mod listener;
pub mod machine;
mod minion_metrics;
pub mod policy;
pub mod presence;
pub mod services;
pub mod sys;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use provis_core::Subjects;
use provis_core::clock::BusClock;
use provis_core::envelope::{
    Arrival, EnvelopeError, check_envelope, decode_envelope, error_reply, is_selected,
};
use provis_core::identity::Identity;
use provis_core::lifecycle::{Lifecycle, PartHandle};
use provis_core::registry::{MinionRecord, MinionStatus};
use serde_json::json;
use tokio::sync::{Semaphore, watch};

pub use config::MinionConfig;
use dispatch::Dispatcher;
use sys::SysService;

#[derive(Debug, thiserror::Error)]
pub enum MinionError {
    #[error("cannot serve metrics: {0}")]
    Metrics(String),
    #[error("cannot use the minion's key {path}")]
    Identity {
        path: std::path::PathBuf,
        #[source]
        source: provis_core::identity::IdentityError,
    },
    #[error("cannot connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot subscribe to {subject}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("cannot open the state database")]
    State(#[from] provis_js::state::StateError),
    #[error("cannot serve gRPC on {addr}: {reason}")]
    Grpc { addr: String, reason: String },
    #[error("cannot read the gRPC API's TLS file {path}")]
    GrpcTls {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve gRPC on {addr}")]
    GrpcListen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A running minion: [`MinionHandle::stop`] for a clean exit.
pub type MinionHandle = PartHandle;

/// Connects and starts serving. Returns once the minion listens on all its
/// subjects (the connection itself may still be on its way: calls and
/// heartbeats start when it is up).
pub async fn start(config: MinionConfig) -> Result<MinionHandle, MinionError> {
    start_with_clock(config, BusClock::system()).await
}

/// Like [`start`], on a machine whose clock is `clock` (a test or a
/// simulation of a machine whose clock is wrong).
pub async fn start_with_clock(
    config: MinionConfig,
    clock: BusClock,
) -> Result<MinionHandle, MinionError> {
    let path = config.identity_path();
    let identity =
        Identity::load_or_create(&path).map_err(|source| MinionError::Identity { path, source })?;
    tracing::info!(minion = %config.id, key = %identity.public_key(), "connecting with this key");
    let nats = connect(&config, &identity).await?;
    start_inner(config, nats, true, Some(Arc::new(identity)), clock).await
}

/// Starts a minion on a NATS connection it shares with others, as the
/// testkit's simulated fleets do (many minions per process); it never closes
/// that connection.
pub async fn start_on(
    config: MinionConfig,
    nats: async_nats::Client,
) -> Result<MinionHandle, MinionError> {
    start_inner(config, nats, false, None, BusClock::system()).await
}

/// The minion's own connection: it claims its id as user name, which the
/// master's auth callout admits only for the key enrolled under that id.
async fn connect(
    config: &MinionConfig,
    identity: &Identity,
) -> Result<async_nats::Client, MinionError> {
    let url = config.fleet.nats_url.clone();
    let minion = config.id.clone();
    let mut options = config
        .fleet
        .connect_options_as(&format!("provis-minion-{}", config.id), identity)
        .user_and_password(config.id.to_string(), String::new());
    if let Some(token) = &config.enrollment_token {
        options = options.token(token.clone());
    }
    options
        .event_callback(move |event| {
            let minion = minion.clone();
            async move {
                match event {
                    async_nats::Event::ClientError(err) => {
                        tracing::warn!(%minion, error = %err, "cannot connect (a new minion waits for `provis keys accept {minion}`)");
                    }
                    async_nats::Event::ServerError(err) => {
                        tracing::warn!(%minion, error = %err, "NATS refused an operation");
                    }
                    _ => {}
                }
            }
        })
        .retry_on_initial_connect()
        .connect(config.fleet.servers())
        .await
        .map_err(|source| MinionError::Connect { url, source })
}

async fn start_inner(
    config: MinionConfig,
    nats: async_nats::Client,
    owns_connection: bool,
    // Signs every reply; minions sharing a connection (simulated ones) have none.
    signer: Option<Arc<Identity>>,
    clock: BusClock,
) -> Result<MinionHandle, MinionError> {
    let mut minion = Startup::new(config, nats, owns_connection, signer, clock)?;
    if let Err(err) = minion.bring_up().await {
        minion.abandon().await;
        return Err(err);
    }
    Ok(minion.run())
}

/// The minion as it comes up, phase by phase.
struct Startup {
    config: MinionConfig,
    nats: async_nats::Client,
    owns_connection: bool,
    signer: Option<Arc<Identity>>,
    clock: BusClock,
    subjects: Subjects,
    lifecycle: Lifecycle,
    started: Instant,
    state: Arc<provis_js::StateStore>,
    table: Arc<services::ServiceTable>,
    machine: machine::Machine,
    shared_roles: Arc<std::sync::RwLock<Vec<String>>>,
    shared_facts: Arc<std::sync::RwLock<serde_json::Value>>,
    /// The facts at start, as services and the registry first see them.
    facts: serde_json::Value,
    dispatcher: Arc<Dispatcher>,
    events: events::EventBus,
    guard: provis_core::call_auth::CallGuard,
    listener: Option<(
        listener::Listener,
        tokio::sync::mpsc::Receiver<async_nats::Message>,
    )>,
    desired: watch::Sender<services::DesiredRoles>,
    desired_rx: Option<watch::Receiver<services::DesiredRoles>>,
    converged: Option<watch::Receiver<services::Convergence>>,
    assignments: Option<tokio::sync::mpsc::Receiver<provis_core::assignment::Assignment>>,
    grpc_addr: Option<String>,
    metrics: Arc<provis_telemetry::Metrics>,
    outbox: provis_core::outbox::Outbox,
    /// Stops what started if the start fails or is dropped half-way.
    stop_on_drop: tokio_util::sync::DropGuard,
}

impl Startup {
    fn new(
        config: MinionConfig,
        nats: async_nats::Client,
        owns_connection: bool,
        signer: Option<Arc<Identity>>,
        clock: BusClock,
    ) -> Result<Self, MinionError> {
        let subjects = Subjects::new(config.fleet.prefix.clone());
        let state = Arc::new(provis_js::StateStore::open(
            &config.data_dir().join("state"),
        )?);
        let table = Arc::new(services::ServiceTable::default());
        let mut machine = machine::Machine::new();
        let sys = SysService {
            minion: config.id.to_string(),
            roles: Arc::new(std::sync::RwLock::new(
                config.roles.iter().map(ToString::to_string).collect(),
            )),
            machine_facts: Arc::new(std::sync::RwLock::new(machine.facts(&config.labels))),
            started: Instant::now(),
        };
        let (shared_roles, shared_facts, started) =
            (sys.roles.clone(), sys.machine_facts.clone(), sys.started);
        let facts = sys.facts();
        let dispatcher = Arc::new(Dispatcher::new(sys, table.clone()));
        let lifecycle = Lifecycle::new();
        // Events and state samples leave in order, acknowledged, kept on
        // disk while the bus is away.
        let outbox = provis_core::outbox::Outbox::start(
            nats.clone(),
            Some(config.data_dir().join("outbox.jsonl")),
            provis_core::outbox::DEFAULT_MAX_BYTES,
            &lifecycle,
        );
        let events = events::EventBus::new(outbox.clone(), subjects.clone(), config.id.to_string());
        let guard = provis_core::call_auth::CallGuard::new(config.trusted_callers.clone())
            .with_clock(clock.clone());
        let (desired, desired_rx) = watch::channel(services::DesiredRoles {
            roles: config.roles.clone(),
            ..services::DesiredRoles::default()
        });
        Ok(Self {
            nats,
            owns_connection,
            signer,
            clock,
            subjects,
            stop_on_drop: lifecycle.stop_on_drop(),
            lifecycle,
            started,
            state,
            table,
            machine,
            shared_roles,
            shared_facts,
            facts,
            dispatcher,
            events,
            guard,
            listener: None,
            desired,
            desired_rx: Some(desired_rx),
            converged: None,
            assignments: None,
            grpc_addr: None,
            metrics: Arc::new(provis_telemetry::Metrics::minion()),
            outbox,
            config,
        })
    }

    /// The phases of a start, in order.
    async fn bring_up(&mut self) -> Result<(), MinionError> {
        self.listen().await?;
        self.follow_desired_state();
        self.serve_grpc().await?;
        self.serve_metrics().await
    }

    /// Keeps the gauges current, and serves the metrics with `/healthz`
    /// and `/readyz` when `metrics_addr` is set.
    async fn serve_metrics(&mut self) -> Result<(), MinionError> {
        self.lifecycle.spawn_background(minion_metrics::take_gauges(
            self.metrics.clone(),
            self.table.clone(),
            self.outbox.clone(),
            self.lifecycle.stop_token(),
        ));
        let Some(addr) = self.config.metrics_addr else {
            return Ok(());
        };
        let readiness = Arc::new(minion_metrics::MinionReadiness {
            nats: self.nats.clone(),
        });
        let server = provis_telemetry::HttpServer::health(addr, self.metrics.clone(), readiness)
            .await
            .map_err(|err| MinionError::Metrics(provis_core::error_chain(&err)))?;
        tracing::info!(minion = %self.config.id, url = %format!("http://{}/metrics", server.addr()), "metrics, /healthz and /readyz served");
        self.lifecycle
            .spawn_background(server.serve(self.lifecycle.close_token()));
        Ok(())
    }

    /// Undoes a start that failed half-way: what started stops.
    async fn abandon(self) {
        let report = self.lifecycle.drain(Duration::from_secs(2)).await;
        if !report.complete() {
            tracing::warn!(minion = %self.config.id, ?report, "a failed start left work running");
        }
        provis_core::lifecycle::close_connection(&self.nats, self.owns_connection).await;
    }

    /// Subscribes to its call subjects: its own, the fleet's and its roles'.
    async fn listen(&mut self) -> Result<(), MinionError> {
        let (mut listener, calls) = listener::Listener::new(
            self.nats.clone(),
            self.subjects.clone(),
            self.config.id.clone(),
            self.lifecycle.clone(),
        );
        listener.listen_for(&self.config.roles).await?;
        self.listener = Some((listener, calls));
        Ok(())
    }

    /// Follows what the master assigns it, the call policy, and (unless it
    /// runs none) the services of its roles.
    fn follow_desired_state(&mut self) {
        let js = async_nats::jetstream::new(self.nats.clone());
        let (id, trusted) = (
            self.config.id.to_string(),
            self.config.trusted_bundle_keys.clone(),
        );
        let (assignments_tx, assignments) = tokio::sync::mpsc::channel(16);
        self.assignments = Some(assignments);
        self.lifecycle.spawn_background(assignment::follow(
            js.clone(),
            id.clone(),
            assignments_tx,
            trusted.clone(),
            self.events.clone(),
            self.lifecycle.stop_token(),
        ));
        self.lifecycle.spawn_background(policy::follow(
            js.clone(),
            id.clone(),
            self.guard.clone(),
            trusted.clone(),
            self.lifecycle.stop_token(),
        ));
        let (converged_tx, converged) = watch::channel(services::Convergence::default());
        self.converged = Some(converged);
        let Some(desired_rx) = self.desired_rx.take() else {
            return;
        };
        if !self.config.inject_services {
            return;
        }
        // Bounded: what services emit waits here, outside their memory limits.
        let (service_events, service_events_rx) = tokio::sync::mpsc::channel(4096);
        self.lifecycle
            .spawn_background(services::forward_service_events(
                service_events_rx,
                self.events.clone(),
                self.lifecycle.close_token(),
            ));
        let host = services::HostTemplate {
            minion: id,
            trusted_bundle_keys: trusted,
            facts: self.facts(),
            state: self.state.clone(),
            service_events,
            fleet: fleet_query(provis_core::master_api::MasterClient::new(
                self.nats.clone(),
                self.subjects.clone(),
            )),
            bundle_cache: Some(self.config.data_dir().join("bundles")),
            metrics: self.metrics.clone(),
            identity: self.signer.clone(),
        };
        self.lifecycle.spawn_background(services::reconcile_forever(
            js,
            self.table.clone(),
            host,
            self.events.clone(),
            desired_rx,
            converged_tx,
            self.lifecycle.stop_token(),
        ));
    }

    fn facts(&self) -> serde_json::Value {
        self.facts.clone()
    }

    /// Serves the local gRPC API, unless it is `off`.
    async fn serve_grpc(&mut self) -> Result<(), MinionError> {
        let config = &self.config;
        let grpc_error = |reason: String| MinionError::Grpc {
            addr: config.grpc_listen.clone(),
            reason,
        };
        let listen_error = |source| MinionError::GrpcListen {
            addr: config.grpc_listen.clone(),
            source,
        };
        let wanted =
            grpc::GrpcListen::parse(&config.grpc_listen, &config.data_dir()).map_err(grpc_error)?;
        let (listener, advertised, signed_only) = match wanted {
            grpc::GrpcListen::Off => return Ok(()),
            grpc::GrpcListen::Unix(path) => {
                if config.grpc_tls_cert.is_some() {
                    return Err(grpc_error(
                        "TLS is for TCP; a Unix socket needs none (set grpc_listen to IP:PORT for TLS)"
                            .into(),
                    ));
                }
                let listener = grpc::bind_socket(&path).await.map_err(listen_error)?;
                let advertised = provis_core::minion_api::ApiAddress::Unix(path.clone());
                (
                    grpc::ApiListener::Unix(listener, path),
                    advertised.to_string(),
                    false,
                )
            }
            grpc::GrpcListen::Tcp(wanted) => {
                let tls = grpc::tls_identity(config)?;
                if !wanted.ip().is_loopback() && tls.is_none() {
                    return Err(grpc_error(
                        "a gRPC API off loopback must serve TLS: set grpc_tls_cert and grpc_tls_key"
                            .into(),
                    ));
                }
                let listener = tokio::net::TcpListener::bind(wanted)
                    .await
                    .map_err(listen_error)?;
                let addr = listener.local_addr().map_err(listen_error)?;
                (
                    grpc::ApiListener::Tcp(listener, tls),
                    addr.to_string(),
                    true,
                )
            }
        };
        let api = grpc::MinionApi {
            guard: self.guard.clone(),
            dispatcher: self.dispatcher.clone(),
            state: self.state.clone(),
            events: self.events.clone(),
            nats: self.nats.clone(),
            roles: self.shared_roles.clone(),
            started: self.started,
            stop: self.lifecycle.stop_token(),
            clock: self.clock.clone(),
            signed_only,
        };
        self.lifecycle
            .spawn_background(grpc::serve(api, listener, self.lifecycle.stop_token()));
        tracing::info!(minion = %config.id, addr = %advertised, "gRPC API listening");
        self.grpc_addr = Some(advertised);
        Ok(())
    }

    /// Hands the minion to its main loop: register, heartbeat, take
    /// assignments, answer calls, until stopped.
    fn run(mut self) -> MinionHandle {
        let hostname = hostname::get()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let record = MinionRecord {
            id: self.config.id.clone(),
            hostname,
            roles: self.config.roles.clone(),
            version: provis_core::VERSION.to_owned(),
            status: MinionStatus::Online,
            started_unix_ms: self.clock.now_ms(),
            written_unix_ms: self.clock.now_ms(),
            heartbeat_interval_ms: i64::try_from(self.config.heartbeat_interval().as_millis())
                .unwrap_or(i64::MAX),
            services: self.dispatcher.service_versions(),
            facts: self.facts(),
            state: machine::summary(&self.machine.sample()),
            grpc_addr: self.grpc_addr.take(),
            grpc_tls: self.config.grpc_tls_cert.is_some(),
            grpc_tls_cert: self
                .config
                .grpc_tls_cert
                .as_ref()
                .and_then(|path| std::fs::read_to_string(path).ok()),
            converged_commit: None,
            failing: None,
            overlay_roles: Vec::new(),
            public_key: self.signer.as_ref().map(|s| s.public_key().to_owned()),
            encryption_key: self.signer.as_ref().map(|s| s.encryption_public_key()),
            encryption_key_signature: self
                .signer
                .as_ref()
                .map(|s| s.bind_encryption_key(self.config.id.as_str())),
        };
        let max_calls = self.config.max_concurrent_calls.clamp(1, 65_536);
        let (listener, calls) = match self.listener.take() {
            Some(listening) => listening,
            None => {
                let (listener, calls) = listener::Listener::new(
                    self.nats.clone(),
                    self.subjects.clone(),
                    self.config.id.clone(),
                    self.lifecycle.clone(),
                );
                (listener, calls)
            }
        };
        let (_, no_assignments) = tokio::sync::mpsc::channel(1);
        let assignments = self.assignments.take().unwrap_or(no_assignments);
        let converged = self
            .converged
            .take()
            .unwrap_or_else(|| watch::channel(services::Convergence::default()).1);
        let runtime = Runtime {
            nats: self.nats,
            own_call_subject: self.subjects.minion_call(&self.config.id),
            subjects: self.subjects,
            state_interval: self.config.state_interval(),
            machine: self.machine,
            refusals: events::RefusalReporter::new(self.events.clone()),
            events: self.events,
            dispatcher: self.dispatcher,
            record,
            heartbeat_interval: self.config.heartbeat_interval(),
            limit: Arc::new(Semaphore::new(max_calls)),
            max_calls,
            max_queued: self.config.max_queued_calls,
            admitted: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            clock: self.clock,
            drain_timeout: Duration::from_secs(self.config.drain_timeout_s),
            lifecycle: self.lifecycle.clone(),
            owns_connection: self.owns_connection,
            listener,
            guard: self.guard,
            signer: self.signer,
            labels: self.config.labels.clone(),
            shared_roles: self.shared_roles,
            shared_facts: self.shared_facts,
            desired: self.desired,
            inject_services: self.config.inject_services,
            metrics: self.metrics,
        };
        let main = tokio::spawn(runtime.serve(calls, assignments, converged));
        self.stop_on_drop.disarm();
        PartHandle::new(self.config.id.to_string(), self.lifecycle, main, ())
    }
}

struct Runtime {
    nats: async_nats::Client,
    subjects: Subjects,
    /// Where calls for this minion alone arrive (compared on every call).
    own_call_subject: String,
    state_interval: Duration,
    machine: machine::Machine,
    events: events::EventBus,
    dispatcher: Arc<Dispatcher>,
    record: MinionRecord,
    heartbeat_interval: Duration,
    /// A slot per call that may run at once.
    limit: Arc<Semaphore>,
    max_calls: usize,
    /// Calls taken and not yet answered (running or waiting for a slot),
    /// and how many may wait beyond those that run.
    admitted: Arc<std::sync::atomic::AtomicUsize>,
    max_queued: usize,
    /// This machine's clock, corrected by the bus's time.
    clock: BusClock,
    /// How long the calls in flight may take to finish once stopped.
    drain_timeout: Duration,
    /// Every task of the minion, and the signal that stops it.
    lifecycle: Lifecycle,
    /// False when the connection is shared with other minions.
    owns_connection: bool,
    listener: listener::Listener,
    refusals: events::RefusalReporter,
    /// Admits only signed, fresh calls from trusted callers (when any are pinned).
    guard: provis_core::call_auth::CallGuard,
    /// Signs replies, so callers can tell them from replies in this minion's name.
    signer: Option<Arc<provis_core::identity::Identity>>,
    /// Labels from the minion's own settings, under those the master assigns.
    labels: std::collections::BTreeMap<String, String>,
    shared_roles: Arc<std::sync::RwLock<Vec<String>>>,
    shared_facts: Arc<std::sync::RwLock<serde_json::Value>>,
    desired: watch::Sender<services::DesiredRoles>,
    inject_services: bool,
    metrics: Arc<provis_telemetry::Metrics>,
}

impl Runtime {
    async fn serve(
        mut self,
        mut calls: tokio::sync::mpsc::Receiver<async_nats::Message>,
        mut assignments: tokio::sync::mpsc::Receiver<provis_core::assignment::Assignment>,
        mut converged: watch::Receiver<services::Convergence>,
    ) {
        let id = self.record.id.to_string();
        let mut heartbeat = tokio::time::interval(self.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampling = tokio::time::interval(self.state_interval);
        sampling.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(minion = %id, roles = ?self.record.roles, "minion started");
        // The registry is written by a task of its own: a write that waits
        // for JetStream (a stream electing a leader) never holds up calls.
        let (record_tx, records) = watch::channel(self.record.clone());
        record_tx.send_modify(|_| {}); // the first record is written at once
        self.lifecycle.spawn_background(presence::write_registry(
            async_nats::jetstream::new(self.nats.clone()),
            records,
            self.events.clone(),
            self.clock.clone(),
        ));
        let mut heartbeats = presence::Heartbeats::new(
            self.nats.clone(),
            self.subjects.heartbeat(&self.record.id),
            self.heartbeat_interval,
        );
        let lifecycle = self.lifecycle.clone();
        loop {
            tokio::select! {
                () = lifecycle.stopping() => break,
                _ = heartbeat.tick() => {
                    let sent = heartbeats.beat(self.lifecycle.work_in_flight()).await;
                    provis_telemetry::Metrics::outcome(
                        &self.metrics.heartbeats,
                        if sent { "written" } else { "failed" },
                    );
                    self.refresh_record(&record_tx);
                }
                _ = sampling.tick() => {
                    self.publish_sample().await;
                    self.refresh_record(&record_tx);
                }
                Some(assignment) = assignments.recv() => {
                    if let Some(interval) = self.take_assignment(assignment).await {
                        sampling = tokio::time::interval(interval);
                        sampling.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    self.refresh_record(&record_tx);
                }
                Ok(()) = converged.changed() => {
                    let convergence = converged.borrow_and_update().clone();
                    self.record.converged_commit = convergence.converged;
                    self.record.failing = convergence.failing;
                    self.refresh_record(&record_tx);
                }
                message = calls.recv() => match message {
                    Some(message) => self.accept(message).await,
                    None => break,
                },
            }
        }
        // Calls already taken off a subject but not yet started still run.
        self.listener.close();
        while let Ok(message) = calls.try_recv() {
            self.accept(message).await;
        }
        self.leave(record_tx).await;
    }

    /// Takes up what the master assigns: roles (listening and services
    /// follow), settings. Returns the new sampling interval when it changed.
    async fn take_assignment(
        &mut self,
        assignment: provis_core::assignment::Assignment,
    ) -> Option<Duration> {
        let id = self.record.id.to_string();
        if assignment.roles != self.record.roles {
            tracing::info!(minion = %id, roles = ?assignment.roles, commit = %assignment.commit, "roles assigned");
            if let Err(err) = self.listener.listen_for(&assignment.roles).await {
                tracing::warn!(minion = %id, error = %provis_core::error_chain(&err), "cannot listen for the new roles");
            }
            *self
                .shared_roles
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                assignment.roles.iter().map(ToString::to_string).collect();
            self.record.roles = assignment.roles.clone();
        }
        self.record.overlay_roles = assignment.overlay_roles.clone();
        let settings = &assignment.settings;
        let mut labels = self.labels.clone();
        labels.extend(settings.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        if self.record.facts["labels"] != json!(labels) {
            self.record.facts["labels"] = json!(labels);
            self.shared_facts
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)["labels"] = json!(labels);
        }
        if let Some(level) = &settings.log_level {
            apply_log_level(level);
        }
        let interval = settings
            .state_interval_ms
            .map(|ms| Duration::from_millis(ms.max(100)))
            .filter(|interval| *interval != self.state_interval);
        if let Some(interval) = interval {
            self.state_interval = interval;
        }
        self.desired.send_replace(services::DesiredRoles {
            roles: assignment.roles,
            commit: Some(assignment.commit.clone()),
            services: assignment.services,
            configs: assignment.configs,
            fetch_spread: Duration::from_millis(assignment.fetch_spread_ms),
            secrets: assignment.secrets,
        });
        if !self.inject_services {
            // No services to converge: taking the assignment is converging.
            self.record.converged_commit = Some(assignment.commit);
        }
        interval
    }

    /// Publishes a state sample on `<prefix>.state.<id>`, kept by `PROVIS_STATE`.
    async fn publish_sample(&mut self) {
        let mut state = self.machine.sample();
        self.record.state = machine::summary(&state);
        let at_unix_ms = self.clock.now_ms();
        state["at_unix_ms"] = json!(at_unix_ms);
        let sample = provis_core::state::StateSample {
            minion: self.record.id.clone(),
            at_unix_ms,
            state,
        };
        let subject = self.subjects.state(&self.record.id);
        // One id per minion and instant: a sample sent twice is stored once.
        let id = format!("{}-{}", self.record.id, sample.at_unix_ms);
        match serde_json::to_string(&sample) {
            Ok(payload) => self.events.outbox().send(subject, id, payload),
            Err(err) => tracing::warn!(error = %err, "state sample not serialisable"),
        }
    }

    /// Hands the registry record to its writer when it says something new
    /// (services loaded, roles, convergence, the state summary).
    fn refresh_record(&mut self, records: &watch::Sender<MinionRecord>) {
        self.record.services = self.dispatcher.service_versions();
        if presence::same_record(&records.borrow(), &self.record) {
            return;
        }
        self.record.written_unix_ms = self.clock.now_ms();
        records.send_replace(self.record.clone());
    }

    /// Takes one message off a call subject and answers it on a task of its own,
    /// so a slow call never holds up the others. Beyond the calls it runs and
    /// those it queues, a call is answered `busy` at once.
    async fn accept(&self, message: async_nats::Message) {
        let minion = self.record.id.to_string();
        let Some(reply_to) = message.reply.clone() else {
            tracing::warn!(%minion, subject = %message.subject, "call without a reply subject ignored");
            self.refusals
                .refused(message.subject.as_str(), "no reply subject")
                .await;
            return;
        };
        // Its timeout counts from now, by this machine's monotonic clock.
        let arrival = Arrival::now(&self.clock);
        let on_own_subject = self.on_own_subject(&message);
        // Counted as it is taken, not when its task first runs: a burst
        // read off the socket at once must meet the limit too.
        let Some(admission) = Admission::take(
            &self.admitted,
            self.max_calls.saturating_add(self.max_queued),
        ) else {
            self.refuse_busy(&message, reply_to).await;
            return;
        };
        // The slot is awaited inside the task: a minion full of slow calls
        // must keep its heartbeat, its assignments and its shutdown going.
        let limit = self.limit.clone();
        let nats = self.nats.clone();
        let dispatcher = self.dispatcher.clone();
        let refusals = self.refusals.clone();
        let guard = self.guard.clone();
        let signer = self.signer.clone();
        let roles = self.record.roles.clone();
        let subjects = self.subjects.clone();
        let metrics = self.metrics.clone();
        self.lifecycle.spawn_work(async move {
            let _admission = admission;
            let Ok(_permit) = limit.acquire_owned().await else {
                return;
            };
            let started = Instant::now();
            let checked = decode_envelope(&message.payload).and_then(|envelope| {
                if !is_selected(&envelope, &minion, on_own_subject) {
                    return Ok(None); // a subset that leaves this minion out
                }
                let call_id = envelope.call_id.clone();
                let denied = |err: provis_core::call_auth::CallAuthError| {
                    (call_id.clone(), EnvelopeError::Denied(err))
                };
                let signer = guard.admit(&envelope).map_err(denied)?;
                let call = check_envelope(envelope, arrival).map_err(|err| (call_id.clone(), err))?;
                if let Some(signer) = signer {
                    guard
                        .authorize(&signer, &call.service, &call.method, &roles)
                        .map_err(denied)?;
                }
                Ok(Some(call))
            });
            let mut job = None;
            let refused = checked.is_err();
            let reply = match checked {
                Ok(None) => return,
                Ok(Some(call)) => {
                    tracing::debug!(%minion, call_id = %call.call_id, caller = %call.caller,
                        function = %format!("{}.{}", call.service, call.method), "call");
                    job = Some(call.job_id.clone());
                    dispatcher.run(&call).await
                }
                Err((call_id, err)) => {
                    tracing::warn!(%minion, subject = %message.subject, error = %err, "call refused");
                    refusals
                        .refused(message.subject.as_str(), &err.to_string())
                        .await;
                    error_reply(
                        &call_id,
                        &minion,
                        err.code(),
                        err.to_string(),
                        started.elapsed(),
                    )
                }
            };
            send_reply(&nats, reply_to, &reply, signer.as_deref(), &minion).await;
            let status = match (&reply.outcome, refused) {
                (_, true) => "refused",
                (Some(provis_proto::v1::call_reply::Outcome::ResultJson(_)), false) => "ok",
                _ => "error",
            };
            provis_telemetry::Metrics::count(&metrics.calls, status);
            metrics
                .call_duration
                .observe(started.elapsed().as_secs_f64());
            if let Some(job) = job {
                record_job_result(&nats, &subjects, &job, &minion, &reply).await;
            }
        });
    }

    /// Whether `message` came on this minion's own call subject.
    fn on_own_subject(&self, message: &async_nats::Message) -> bool {
        message.subject.as_str() == self.own_call_subject
    }

    /// Answers a call this minion has no room for with the error `busy`.
    async fn refuse_busy(&self, message: &async_nats::Message, reply_to: async_nats::Subject) {
        let minion = self.record.id.to_string();
        let Ok(envelope) = decode_envelope(&message.payload) else {
            return; // not a call: nothing to answer
        };
        if !is_selected(&envelope, &minion, self.on_own_subject(message)) {
            return;
        }
        let err = EnvelopeError::Busy {
            running: self.max_calls,
            queued: self.max_queued,
        };
        tracing::debug!(%minion, call_id = %envelope.call_id, "call refused: busy");
        let reply = error_reply(
            &envelope.call_id,
            &minion,
            err.code(),
            err.to_string(),
            Duration::ZERO,
        );
        send_reply(
            &self.nats,
            reply_to,
            &reply,
            self.signer.as_deref(),
            &minion,
        )
        .await;
    }

    /// Says goodbye: marks the entry stopped so callers stop selecting it,
    /// lets the calls in flight finish and send their replies, then tells
    /// the fleet and closes the connection.
    async fn leave(mut self, records: watch::Sender<MinionRecord>) {
        let id = self.record.id.to_string();
        tracing::info!(minion = %id, in_flight = self.lifecycle.work_in_flight(), "minion stopping: no new calls; finishing those in flight");
        // The writer writes this last and ends (the drain waits for it).
        self.record.status = MinionStatus::Stopped;
        self.record.written_unix_ms = self.clock.now_ms();
        records.send_replace(self.record.clone());
        drop(records);
        // Said now, so it leaves with what the calls in flight emit while
        // they finish: the outbox sends until the minion closes.
        self.events
            .emit(
                "minion.offline",
                json!({ "minion": id, "reason": "stopped" }),
            )
            .await;
        let report = self.lifecycle.drain(self.drain_timeout).await;
        if !report.complete() {
            tracing::warn!(
                minion = %id,
                calls_left = report.work_left,
                background_left = report.background_left,
                "leaving after {:?} with work unfinished",
                self.drain_timeout
            );
        }
        provis_core::lifecycle::close_connection(&self.nats, self.owns_connection).await;
        tracing::info!(minion = %id, "minion stopped");
    }
}

/// One call taken by a minion, counted until it is answered (dropped).
struct Admission(Arc<std::sync::atomic::AtomicUsize>);

impl Admission {
    /// Counts one more call, unless `most` are already taken.
    fn take(admitted: &Arc<std::sync::atomic::AtomicUsize>, most: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < most).then_some(taken + 1)
            })
            .ok()
            .map(|_| Self(admitted.clone()))
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Sends one reply, signed when the minion has a key.
async fn send_reply(
    nats: &async_nats::Client,
    reply_to: async_nats::Subject,
    reply: &provis_proto::v1::CallReply,
    signer: Option<&Identity>,
    minion: &str,
) {
    let payload = reply.encode_to_vec();
    let mut headers = async_nats::HeaderMap::new();
    if let Some(signer) = signer {
        headers.insert(
            provis_core::call_auth::REPLY_SIGNATURE_HEADER,
            provis_core::call_auth::sign_reply(&payload, signer).as_str(),
        );
    }
    if let Err(err) = nats
        .publish_with_headers(reply_to, headers, payload.into())
        .await
    {
        tracing::warn!(%minion, error = %err, "reply not sent");
    }
}

/// Records `reply` as this minion's result of `job` in `PROVIS_JOBS`.
async fn record_job_result(
    nats: &async_nats::Client,
    subjects: &provis_core::Subjects,
    job: &str,
    minion: &str,
    reply: &provis_proto::v1::CallReply,
) {
    use provis_proto::v1::call_reply::Outcome;
    let (status, result, error) = match &reply.outcome {
        Some(Outcome::ResultJson(json)) => ("ok", serde_json::from_str(json).ok(), None),
        Some(Outcome::Error(error)) => (
            "error",
            None,
            Some(provis_core::jobs::JobError {
                code: error.code().as_str_name().to_owned(),
                message: error.message.clone(),
            }),
        ),
        None => ("error", None, None),
    };
    let record = provis_core::jobs::JobResult {
        job: job.to_owned(),
        minion: minion.to_owned(),
        status: status.to_owned(),
        ms: reply.duration_us as f64 / 1000.0,
        at_unix_ms: provis_core::envelope::now_unix_ms(),
        result,
        error,
    };
    let subject = subjects.job(job, &format!("result.{minion}"));
    provis_core::jobs::record(nats, subject, &record).await;
}

/// `provis.fleet.query` for this minion's services: a request to the master,
/// made from the service's own thread.
fn fleet_query(master: provis_core::master_api::MasterClient) -> provis_js::host::FleetQuery {
    let runtime = tokio::runtime::Handle::current();
    provis_js::host::FleetQuery(Arc::new(
        move |question: provis_core::master_api::QueryRequest, timeout: Duration| {
            let master = master.clone();
            runtime.block_on(async move {
                tokio::time::timeout(timeout, master.query(question))
                    .await
                    .map_err(|_| format!("the master did not answer within {timeout:?}"))?
                    .map_err(|err| provis_core::error_chain(&err))
            })
        },
    ))
}

/// What changes the process's log filter when the master assigns a log
/// level; installed by the `provis` binary (in-process fleets have none).
static LOG_LEVEL_HOOK: std::sync::OnceLock<Box<LogLevelHook>> = std::sync::OnceLock::new();

/// Changes the process's log filter to the level given.
pub type LogLevelHook = dyn Fn(&str) + Send + Sync;

/// Installs the process's log-level hook (once).
pub fn set_log_level_hook(hook: impl Fn(&str) + Send + Sync + 'static) {
    let _ = LOG_LEVEL_HOOK.set(Box::new(hook));
}

fn apply_log_level(level: &str) {
    if let Some(hook) = LOG_LEVEL_HOOK.get() {
        hook(level);
    }
}
