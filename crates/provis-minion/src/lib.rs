//! The provis minion: one agent per machine. It connects to NATS (retrying
//! with backoff for as long as it takes), listens on its own call subject, the
//! fleet-wide one and every level of each of its roles, keeps its registry
//! entry fresh, and answers each call with exactly one reply.
//!
//! A minion never dies of a message: every payload is checked before it is
//! dispatched, and a bad one gets a structured error reply where a reply
//! subject exists.

pub mod assignment;
pub mod config;
pub mod dispatch;
pub mod events;
pub mod grpc;
pub mod listener;
pub mod machine;
pub mod policy;
pub mod services;
pub mod sys;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Store;
use prost::Message;
use provis_core::Subjects;
use provis_core::envelope::{
    check_envelope, decode_envelope, error_reply, is_selected, now_unix_ms,
};
use provis_core::registry::{self, MinionRecord, MinionStatus};
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

pub use config::MinionConfig;
use dispatch::Dispatcher;
use sys::SysService;

#[derive(Debug, thiserror::Error)]
pub enum MinionError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot subscribe to {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
    #[error("cannot open the state database: {0}")]
    State(#[from] provis_js::state::StateError),
    #[error("cannot serve gRPC on {addr}: {reason}")]
    Grpc { addr: String, reason: String },
}

/// A running minion. Dropping the handle leaves it running; call
/// [`MinionHandle::stop`] for a clean exit or [`MinionHandle::kill`] to make
/// it vanish as a crashed machine would.
#[derive(Debug)]
pub struct MinionHandle {
    id: String,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MinionHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops taking calls, marks the registry entry stopped, and closes the
    /// connection after in-flight replies are sent.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Ends the minion at once without a word to the fleet.
    pub fn kill(self) {
        self.task.abort();
    }

    /// Waits until the minion ends (after a stop signal).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Asks the minion to stop without waiting.
    pub fn request_stop(&self) {
        let _ = self.shutdown.send(true);
    }
}

/// Connects and starts serving. Returns once the minion listens on all its
/// subjects (the connection itself may still be on its way: calls and
/// heartbeats start when it is up).
pub async fn start(config: MinionConfig) -> Result<MinionHandle, MinionError> {
    let url = config.fleet.nats_url.clone();
    let identity = provis_core::identity::Identity::load_or_create(&config.identity_path())
        .map_err(|err| MinionError::Connect {
            url: url.clone(),
            reason: err.to_string(),
        })?;
    tracing::info!(minion = %config.id, key = %identity.public_key(), "connecting with this key");
    let minion = config.id.clone();
    // The user name is the id this minion claims; the master's auth
    // callout admits it only for the key enrolled under that id.
    let mut options = config
        .fleet
        .connect_options_as(&format!("provis-minion-{}", config.id), &identity)
        .user_and_password(config.id.to_string(), String::new());
    if let Some(token) = &config.enrollment_token {
        options = options.token(token.clone());
    }
    let nats = options
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
        .connect(&url)
        .await
        .map_err(|err| MinionError::Connect {
            url: url.clone(),
            reason: err.to_string(),
        })?;
    start_inner(config, nats, true, Some(Arc::new(identity))).await
}

/// Starts a minion on a NATS connection it shares with others, as the
/// testkit's simulated fleets do (many minions per process); it never closes
/// that connection.
pub async fn start_on(
    config: MinionConfig,
    nats: async_nats::Client,
) -> Result<MinionHandle, MinionError> {
    start_inner(config, nats, false, None).await
}

async fn start_inner(
    config: MinionConfig,
    nats: async_nats::Client,
    owns_connection: bool,
    // Signs every reply; minions sharing a connection (simulated ones) have none.
    signer: Option<Arc<provis_core::identity::Identity>>,
) -> Result<MinionHandle, MinionError> {
    let subjects = Subjects::new(config.fleet.prefix.clone());
    let (mut listener, calls) =
        listener::Listener::new(nats.clone(), subjects.clone(), config.id.clone());
    listener.listen_for(&config.roles).await?;

    let started = Instant::now();
    let hostname = hostname::get()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
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
        started,
    };
    let (shared_roles, shared_facts) = (sys.roles.clone(), sys.machine_facts.clone());
    let facts = sys.facts();
    let dispatcher = Arc::new(Dispatcher::new(sys, table.clone()));
    let events = events::EventBus::new(nats.clone(), subjects.clone(), config.id.to_string());

    // Bounded: what services emit waits here, outside their memory limits.
    let (service_events, service_events_rx) = tokio::sync::mpsc::channel(4096);
    let mut background = vec![tokio::spawn(services::forward_service_events(
        service_events_rx,
        events.clone(),
    ))];
    let (desired, desired_rx) = watch::channel(services::DesiredRoles {
        roles: config.roles.clone(),
        ..services::DesiredRoles::default()
    });
    let (converged_tx, converged) = watch::channel(None);
    let (assignments_tx, assignments) = tokio::sync::mpsc::channel(16);
    background.push(tokio::spawn(assignment::follow(
        nats.clone(),
        config.id.to_string(),
        assignments_tx,
        config.trusted_bundle_keys.clone(),
        events.clone(),
    )));
    let guard = provis_core::call_auth::CallGuard::new(config.trusted_callers.clone());
    background.push(tokio::spawn(policy::follow(
        nats.clone(),
        config.id.to_string(),
        guard.clone(),
        config.trusted_bundle_keys.clone(),
    )));
    if config.inject_services {
        background.push(tokio::spawn(services::reconcile_forever(
            nats.clone(),
            table,
            services::HostTemplate {
                minion: config.id.to_string(),
                trusted_bundle_keys: config.trusted_bundle_keys.clone(),
                facts: facts.clone(),
                state: state.clone(),
                service_events,
                fleet: fleet_query(nats.clone(), subjects.master("query")),
            },
            events.clone(),
            desired_rx,
            converged_tx,
        )));
    }
    let grpc_tls = config.grpc_tls_cert.is_some();
    let grpc_addr = if config.grpc_listen == "off" {
        None
    } else {
        let tls = grpc::tls_identity(&config)?;
        let wanted: std::net::SocketAddr =
            config.grpc_listen.parse().map_err(|_| MinionError::Grpc {
                addr: config.grpc_listen.clone(),
                reason: "grpc_listen must be IP:PORT (e.g. 127.0.0.1:7422) or off".into(),
            })?;
        if !wanted.ip().is_loopback() && tls.is_none() {
            return Err(MinionError::Grpc {
                addr: config.grpc_listen.clone(),
                reason:
                    "a gRPC API off loopback must serve TLS: set grpc_tls_cert and grpc_tls_key"
                        .into(),
            });
        }
        let listener =
            tokio::net::TcpListener::bind(wanted)
                .await
                .map_err(|err| MinionError::Grpc {
                    addr: config.grpc_listen.clone(),
                    reason: err.to_string(),
                })?;
        let addr = listener.local_addr().map_err(|err| MinionError::Grpc {
            addr: config.grpc_listen.clone(),
            reason: err.to_string(),
        })?;
        let api = grpc::MinionApi {
            guard: guard.clone(),
            dispatcher: dispatcher.clone(),
            state: state.clone(),
            events: events.clone(),
            nats: nats.clone(),
            roles: shared_roles.clone(),
            started,
        };
        background.push(tokio::spawn(grpc::serve(api, listener, tls)));
        tracing::info!(minion = %config.id, %addr, "gRPC API listening");
        Some(addr.to_string())
    };
    let record = MinionRecord {
        id: config.id.clone(),
        hostname,
        roles: config.roles.clone(),
        version: provis_core::VERSION.to_owned(),
        status: MinionStatus::Online,
        started_unix_ms: now_unix_ms(),
        heartbeat_unix_ms: now_unix_ms(),
        heartbeat_interval_ms: i64::try_from(config.heartbeat_interval().as_millis())
            .unwrap_or(i64::MAX),
        services: dispatcher.service_versions(),
        facts,
        state: machine.sample(),
        grpc_addr,
        grpc_tls,
        converged_commit: None,
        overlay_roles: Vec::new(),
        public_key: signer.as_ref().map(|s| s.public_key().to_owned()),
    };
    let max_calls = u32::try_from(config.max_concurrent_calls.clamp(1, 65_536)).unwrap_or(1);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let runtime_events = events;
    let runtime = Runtime {
        nats,
        subjects: subjects.clone(),
        state_interval: config.state_interval(),
        machine,
        events: runtime_events.clone(),
        dispatcher,
        record,
        heartbeat_interval: config.heartbeat_interval(),
        limit: Arc::new(Semaphore::new(max_calls as usize)),
        max_calls,
        background: BackgroundTasks(background),
        owns_connection,
        listener,
        refusals: events::RefusalReporter::new(runtime_events.clone()),
        guard: guard.clone(),
        signer,
        labels: config.labels.clone(),
        shared_roles,
        shared_facts,
        desired,
        inject_services: config.inject_services,
    };
    let id = config.id.to_string();
    let task = tokio::spawn(runtime.serve(calls, assignments, converged, shutdown_rx));
    Ok(MinionHandle { id, shutdown, task })
}

struct Runtime {
    nats: async_nats::Client,
    subjects: Subjects,
    state_interval: Duration,
    machine: machine::Machine,
    events: events::EventBus,
    dispatcher: Arc<Dispatcher>,
    record: MinionRecord,
    heartbeat_interval: Duration,
    limit: Arc<Semaphore>,
    max_calls: u32,
    /// Tasks that live as long as the minion: reconciler, event forwarder, gRPC.
    background: BackgroundTasks,
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
}

/// Tasks aborted when the minion's main task ends or is aborted, so a killed
/// in-process minion leaves nothing behind.
struct BackgroundTasks(Vec<JoinHandle<()>>);

impl Drop for BackgroundTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Runtime {
    async fn serve(
        mut self,
        mut calls: tokio::sync::mpsc::Receiver<async_nats::Message>,
        mut assignments: tokio::sync::mpsc::Receiver<provis_core::assignment::Assignment>,
        mut converged: watch::Receiver<Option<String>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let id = self.record.id.to_string();
        let mut heartbeat = tokio::time::interval(self.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut registry: Option<Store> = None;
        let mut announced = false;
        let mut sampling = tokio::time::interval(self.state_interval);
        sampling.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(minion = %id, roles = ?self.record.roles, "minion started");
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = heartbeat.tick() => {
                    if self.beat(&mut registry).await && !announced {
                        announced = true;
                        tracing::info!(minion = %id, "registered in the fleet");
                        self.events.emit("minion.online", json!({ "minion": id, "roles": self.record.roles })).await;
                    }
                }
                _ = sampling.tick() => self.publish_sample().await,
                Some(assignment) = assignments.recv() => {
                    if let Some(interval) = self.take_assignment(assignment).await {
                        sampling = tokio::time::interval(interval);
                        sampling.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    self.beat(&mut registry).await;
                }
                Ok(()) = converged.changed() => {
                    self.record.converged_commit = converged.borrow_and_update().clone();
                    self.beat(&mut registry).await;
                }
                message = calls.recv() => match message {
                    Some(message) => self.accept(message).await,
                    None => break,
                },
            }
        }
        self.leave(registry.as_ref()).await;
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
                tracing::warn!(minion = %id, error = %err, "cannot listen for the new roles");
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
        });
        if !self.inject_services {
            // No services to converge: taking the assignment is converging.
            self.record.converged_commit = Some(assignment.commit);
        }
        interval
    }

    /// Publishes a state sample on `<prefix>.state.<id>`, kept by `PROVIS_STATE`.
    async fn publish_sample(&mut self) {
        self.record.state = self.machine.sample();
        let sample = provis_core::state::StateSample {
            minion: self.record.id.clone(),
            at_unix_ms: now_unix_ms(),
            state: self.record.state.clone(),
        };
        let subject = self.subjects.state(&self.record.id);
        match serde_json::to_vec(&sample) {
            Ok(payload) => {
                if let Err(err) = self.nats.publish(subject, payload.into()).await {
                    tracing::warn!(minion = %self.record.id, error = %err, "state sample not published");
                }
            }
            Err(err) => tracing::warn!(error = %err, "state sample not serialisable"),
        }
    }

    /// Refreshes the registry entry; true when it was written.
    async fn beat(&mut self, registry: &mut Option<Store>) -> bool {
        if registry.is_none() {
            let js = async_nats::jetstream::new(self.nats.clone());
            match registry::open_registry(&js).await {
                Ok(store) => *registry = Some(store),
                Err(err) => {
                    tracing::warn!(minion = %self.record.id, error = %err, "registry not reachable yet");
                    return false;
                }
            }
        }
        let Some(store) = registry.as_ref() else {
            return false;
        };
        self.record.heartbeat_unix_ms = now_unix_ms();
        self.record.services = self.dispatcher.service_versions();
        self.record.state = self.machine.sample();
        match registry::put_record(store, &self.record).await {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(minion = %self.record.id, error = %err, "heartbeat not written");
                false
            }
        }
    }

    /// Takes one message off a call subject and answers it on a task of its own,
    /// so a slow call never holds up the others.
    async fn accept(&self, message: async_nats::Message) {
        let minion = self.record.id.to_string();
        let Some(reply_to) = message.reply.clone() else {
            tracing::warn!(%minion, subject = %message.subject, "call without a reply subject ignored");
            self.refusals
                .refused(message.subject.as_str(), "no reply subject")
                .await;
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
        tokio::spawn(async move {
            let Ok(_permit) = limit.acquire_owned().await else {
                return;
            };
            let started = Instant::now();
            let checked = decode_envelope(&message.payload).and_then(|envelope| {
                if !is_selected(&envelope, &minion) {
                    return Ok(None); // a subset that leaves this minion out
                }
                let call_id = envelope.call_id.clone();
                let denied = |err: provis_core::call_auth::CallAuthError| {
                    (
                        call_id.clone(),
                        provis_core::envelope::EnvelopeError::Denied(err.to_string()),
                    )
                };
                let signer = guard.admit(&envelope).map_err(denied)?;
                let call = check_envelope(envelope).map_err(|err| (call_id.clone(), err))?;
                if let Some(signer) = signer {
                    guard
                        .authorize(&signer, &call.service, &call.method, &roles)
                        .map_err(denied)?;
                }
                Ok(Some(call))
            });
            let reply = match checked {
                Ok(None) => return,
                Ok(Some(call)) => {
                    tracing::debug!(%minion, call_id = %call.call_id, caller = %call.caller,
                        function = %format!("{}.{}", call.service, call.method), "call");
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
            let payload = reply.encode_to_vec();
            let mut headers = async_nats::HeaderMap::new();
            if let Some(signer) = &signer {
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
        });
    }

    /// Says goodbye: marks the entry stopped so callers stop waiting for it,
    /// and lets in-flight replies out before the connection closes.
    async fn leave(mut self, registry: Option<&Store>) {
        let id = self.record.id.to_string();
        // Every permit back means every in-flight call has sent its reply.
        let in_flight_done = self.limit.acquire_many(self.max_calls);
        if tokio::time::timeout(Duration::from_secs(10), in_flight_done)
            .await
            .is_err()
        {
            tracing::warn!(minion = %id, "calls still running after 10 s; leaving anyway");
        }
        self.record.status = MinionStatus::Stopped;
        if let Some(store) = registry
            && let Err(err) = registry::put_record(store, &self.record).await
        {
            tracing::warn!(minion = %id, error = %err, "could not mark the registry entry stopped");
        }
        drop(std::mem::replace(
            &mut self.background,
            BackgroundTasks(Vec::new()),
        ));
        self.events
            .emit(
                "minion.offline",
                json!({ "minion": id, "reason": "stopped" }),
            )
            .await;
        if self.owns_connection {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.nats.drain()).await;
        } else {
            let _ = self.nats.flush().await;
        }
        tracing::info!(minion = %id, "minion stopped");
    }
}

/// `provis.fleet.query` for this minion's services: a request to the master,
/// made from the service's own thread.
fn fleet_query(nats: async_nats::Client, subject: String) -> provis_js::host::FleetQuery {
    let runtime = tokio::runtime::Handle::current();
    provis_js::host::FleetQuery(Arc::new(
        move |expression: &str, mode: &str, window_ms: i64, timeout: Duration| {
            let request = json!({ "expression": expression, "mode": mode, "window_ms": window_ms });
            let (nats, subject) = (nats.clone(), subject.clone());
            runtime.block_on(async move {
                let reply = tokio::time::timeout(
                    timeout,
                    nats.request(subject, request.to_string().into()),
                )
                .await
                .map_err(|_| format!("the master did not answer within {timeout:?}"))?
                .map_err(|err| format!("cannot ask the master: {err}"))?;
                let body: serde_json::Value =
                    serde_json::from_slice(&reply.payload).map_err(|err| err.to_string())?;
                match body["error"].as_str() {
                    Some(error) => Err(error.to_owned()),
                    None => Ok(body),
                }
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
