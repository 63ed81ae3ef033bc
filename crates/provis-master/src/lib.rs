//! The provis master: on every start it creates (or brings up to date) the
//! fleet's JetStream storage, then serves `<prefix>.master.>`.
//!
//! Served subjects (JSON replies; errors are `{"error": "..."}`):
//! - `<prefix>.master.ping`: `{"master": true, "version": "..."}`, for readiness checks;
//! - `<prefix>.master.minions`: every registry entry, with a `live` flag;
//! - `<prefix>.master.query`: a [`query::QueryRequest`] answered with a
//!   [`query::QueryAnswer`] from the registry and the state index;
//! - `<prefix>.master.stats`: the state index in numbers;
//! - `<prefix>.master.enroll.list|decide|token`: enrollment (see [`enrollment`]).
//!
//! The master also answers nats-server's auth callout ([`admission`]) when
//! the server is configured for it: every other connection is admitted by it.

pub mod admission;
pub mod apply;
pub mod assignments;
pub mod desired;
pub mod enrollment;
pub mod fleet_view;
pub mod git_source;
pub mod liveness;
pub mod query;
pub mod repository;
pub mod state_index;
pub mod storage;

use std::time::Duration;

use futures::StreamExt;
use provis_core::envelope::now_unix_ms;
use provis_core::registry;
use provis_core::{FleetContext, Subjects, event};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
    /// Serve nats-server's auth callout (harmless when the server does not
    /// use one). Default: true.
    #[serde(default = "default_auth_callout")]
    pub auth_callout: bool,
    /// New minions that may wait for acceptance at once; more are refused
    /// until some are accepted or rejected. Default: 1000.
    #[serde(default = "default_max_pending_minions")]
    pub max_pending_minions: usize,
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
            state_bucket_s: default_state_bucket_s(),
            repository: None,
            branch: default_branch(),
            poll_interval_s: default_poll_interval_s(),
            data_dir: None,
            signing_key: None,
            operators: Vec::new(),
            auth_callout: true,
            max_pending_minions: default_max_pending_minions(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error("cannot serve {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
    #[error("the master's key: {0}")]
    Identity(#[from] provis_core::identity::IdentityError),
    #[error("{0}")]
    Settings(String),
}

/// A running master.
#[derive(Debug)]
pub struct MasterHandle {
    shutdown: watch::Sender<bool>,
    settings: watch::Sender<desired::SourceSettings>,
    task: JoinHandle<()>,
}

impl MasterHandle {
    /// Takes up new settings without dropping connections. Repository,
    /// branch and poll interval change at once; the others need a restart.
    pub fn reload(&self, config: &MasterConfig) {
        self.settings.send_replace(config.source());
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    pub fn request_stop(&self) {
        let _ = self.shutdown.send(true);
    }

    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Connects (waiting for NATS as long as it takes), ensures storage, and
/// serves. Returns once the master answers requests.
pub async fn start(config: MasterConfig) -> Result<MasterHandle, MasterError> {
    let url = config.fleet.nats_url.clone();
    let subjects = Subjects::new(config.fleet.prefix.clone());
    admission::check_operators(&config.operators).map_err(MasterError::Settings)?;
    let key_path = config
        .signing_key
        .clone()
        .unwrap_or_else(|| config.data_dir().join("master.key"));
    let identity = std::sync::Arc::new(provis_core::identity::Identity::load_or_create(&key_path)?);
    let connect = |name: &str, options: async_nats::ConnectOptions| {
        let url = url.clone();
        let name = name.to_owned();
        async move {
            options
                .retry_on_initial_connect()
                .connect(&url)
                .await
                .map_err(|err| MasterError::Connect {
                    url,
                    reason: format!("{name}: {err}"),
                })
        }
    };
    // The callout comes first: on a fleet that uses it, even the master's
    // own fleet connection is admitted by it.
    let gatekeeper = std::sync::Arc::new(admission::Gatekeeper::new(
        &identity,
        subjects.clone(),
        config.operators.clone(),
    ));
    let mut background = Vec::new();
    // Where enrollment is kept: in the callout's own account when there is
    // one, which no fleet identity can reach, not even through the server
    // copying a stream's messages onto a subject they choose.
    let mut enrollment_js = None;
    if config.auth_callout {
        let service = identity.derived(provis_core::identity::DerivedKey::CalloutService);
        let seed = service
            .seed()
            .map_err(|err| MasterError::Settings(err.to_string()))?;
        let callout = connect_when_up(
            &url,
            config
                .fleet
                .connect_options("provis-master-callout")
                .nkey(seed),
        )
        .await;
        let requests = admission::Gatekeeper::listen(&callout)
            .await
            .map_err(|reason| MasterError::Subscribe {
                subject: provis_core::bus_access::CALLOUT_SUBJECT.to_owned(),
                reason,
            })?;
        enrollment_js = Some(async_nats::jetstream::new(callout.clone()));
        background.push(tokio::spawn(gatekeeper.clone().serve(callout, requests)));
    }
    let nats = connect(
        "fleet",
        config.fleet.connect_options_as("provis-master", &identity),
    )
    .await?;
    let js = async_nats::jetstream::new(nats.clone());
    storage::ensure(&js, &subjects, &config.storage).await?;
    let enrollment_js = enrollment_js.unwrap_or_else(|| js.clone());
    let enrollment = enrollment::Enrollment::open(&enrollment_js, config.max_pending_minions)
        .await
        .map_err(|err| MasterError::Settings(err.to_string()))?;
    gatekeeper.ready(enrollment.clone(), nats.clone());
    if config.auth_callout {
        let system = connect(
            "system account",
            config
                .fleet
                .connect_options_as("provis-master-system", &identity)
                .user_and_password(
                    provis_core::bus_access::SYSTEM_USER.to_owned(),
                    String::new(),
                ),
        )
        .await?;
        gatekeeper.set_system(system);
        background.push(tokio::spawn(gatekeeper.clone().follow_policy(js.clone())));
    }

    let subject = subjects.wildcard("master");
    let requests = nats
        .subscribe(subject.clone())
        .await
        .map_err(|err| MasterError::Subscribe {
            subject,
            reason: err.to_string(),
        })?;
    nats.flush().await.map_err(|err| MasterError::Connect {
        url,
        reason: err.to_string(),
    })?;
    event::emit(
        &nats,
        &subjects,
        "master",
        "master.started",
        json!({ "version": provis_core::VERSION }),
    )
    .await;
    tracing::info!(prefix = %subjects.prefix(), "master serving");

    let view = std::sync::Arc::new(fleet_view::FleetView::new(config.index_limits()));
    let state_feed = {
        let (view, js, subjects) = (view.clone(), js.clone(), subjects.clone());
        tokio::spawn(async move { view.follow_state(js, subjects).await })
    };
    let (desired_tx, desired_rx) = tokio::sync::mpsc::channel(1024);
    let (settings, settings_rx) = watch::channel(config.source());
    tracing::info!(public_key = %identity.public_key(), "bundles are signed with this key; pin it on minions (trusted_bundle_keys)");
    let public_key = identity.public_key().to_owned();
    let desired = desired::DesiredState::open(
        js.clone(),
        nats.clone(),
        subjects.clone(),
        view.clone(),
        config.data_dir(),
        identity,
    )
    .await
    .map_err(|reason| MasterError::Subscribe {
        subject: "provis_config".into(),
        reason,
    })?;
    let desired_loop = tokio::spawn(desired.run(settings_rx, desired_rx));
    if config.repository.is_some() {
        // Take up the repository at once rather than after a poll interval.
        let (reply, _) = tokio::sync::oneshot::channel();
        let _ = desired_tx.send(desired::DesiredRequest::Sync(reply)).await;
    }
    let liveness = {
        let (nats, subjects, js, view) = (nats.clone(), subjects.clone(), js.clone(), view.clone());
        let desired_tx = desired_tx.clone();
        tokio::spawn(async move {
            loop {
                match registry::open_registry(&js).await {
                    Ok(store) => {
                        let watched = liveness::watch(
                            nats.clone(),
                            subjects.clone(),
                            store,
                            &view,
                            &desired_tx,
                        );
                        if let Err(err) = watched.await {
                            tracing::warn!(error = %err, "registry watch ended; starting again");
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "registry not reachable"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let context = std::sync::Arc::new(Served {
        public_key,
        nats: nats.clone(),
        js,
        subjects,
        view,
        desired: desired_tx,
        enrollment,
        gatekeeper,
    });
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut requests = requests;
        loop {
            tokio::select! {
                _ = shutdown_rx.changed() => break,
                request = requests.next() => match request {
                    // Each on a task of its own: a slow sync never holds up a ping.
                    Some(request) => { tokio::spawn(answer(context.clone(), request)); }
                    None => break,
                },
            }
        }
        liveness.abort();
        state_feed.abort();
        for task in background {
            task.abort();
        }
        desired_loop.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), nats.drain()).await;
        tracing::info!("master stopped");
    });
    Ok(MasterHandle {
        shutdown,
        settings,
        task,
    })
}

/// Connects once the server is up, however long that takes: the first
/// connection of a master that may start before its nats-server.
async fn connect_when_up(url: &str, options: async_nats::ConnectOptions) -> async_nats::Client {
    let mut delay = Duration::from_millis(100);
    loop {
        match options.clone().connect(url).await {
            Ok(client) => return client,
            Err(err) => {
                tracing::warn!(%url, error = %err, "NATS not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// What requests on `<prefix>.master.>` are answered from.
struct Served {
    public_key: String,
    nats: async_nats::Client,
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    view: std::sync::Arc<fleet_view::FleetView>,
    desired: tokio::sync::mpsc::Sender<desired::DesiredRequest>,
    enrollment: enrollment::Enrollment,
    gatekeeper: std::sync::Arc<admission::Gatekeeper>,
}

async fn answer(served: std::sync::Arc<Served>, request: async_nats::Message) {
    let Some(reply_to) = request.reply.clone() else {
        return;
    };
    // The master may publish anywhere; a reply subject chosen by the asker
    // must not make it write somewhere else (a bucket, another's subject).
    if !reply_to.starts_with("_INBOX.") {
        tracing::warn!(subject = %request.subject, reply = %reply_to, "request with a reply subject outside _INBOX ignored");
        return;
    }
    let what = request
        .subject
        .as_str()
        .strip_prefix(&served.subjects.master(""))
        .unwrap_or_default()
        .to_owned();
    let body = match what.as_str() {
        "ping" => {
            json!({ "master": true, "version": provis_core::VERSION, "public_key": served.public_key })
        }
        "minions" => list_minions(&served.js).await,
        "query" => run_query(&served.view, &request.payload),
        "stats" => {
            let with_fingerprint = serde_json::from_slice::<Value>(&request.payload)
                .is_ok_and(|body| body["fingerprint"] == true);
            serde_json::to_value(served.view.stats(with_fingerprint)).unwrap_or(Value::Null)
        }
        "sync" => ask_desired(&served, desired::DesiredRequest::Sync).await,
        "status" => ask_desired(&served, desired::DesiredRequest::Status).await,
        "role" => match serde_json::from_slice::<RoleRequest>(&request.payload) {
            Ok(role) => {
                ask_desired(&served, |reply| desired::DesiredRequest::Role {
                    op: role.op,
                    minion: role.minion,
                    role: role.role,
                    reply,
                })
                .await
            }
            Err(err) => json!({ "error": format!("not a role request: {err}"), "usage": true }),
        },
        "enroll.list" => match served.enrollment.list().await {
            Ok(records) => json!({ "minions": records }),
            Err(err) => json!({ "error": err.to_string() }),
        },
        "enroll.decide" => decide_enrollment(&served, &request.payload).await,
        "enroll.token" => {
            let body = serde_json::from_slice::<Value>(&request.payload).unwrap_or_default();
            let ttl_s = body["ttl_s"].as_u64().unwrap_or(3_600);
            let minion = body["minion"]
                .as_str()
                .and_then(|id| id.parse::<provis_core::MinionId>().ok());
            match served
                .enrollment
                .issue_token(Duration::from_secs(ttl_s), minion)
                .await
            {
                Ok(token) => json!({ "token": token, "ttl_s": ttl_s }),
                Err(err) => json!({ "error": err.to_string() }),
            }
        }
        other => json!({
            "error": format!("the master serves no {other:?}; it serves ping, minions, query, stats, sync, status, role, enroll.list, enroll.decide, enroll.token")
        }),
    };
    if let Err(err) = served.nats.publish(reply_to, body.to_string().into()).await {
        tracing::warn!(error = %err, "master reply not sent");
    }
}

/// A request on `<prefix>.master.enroll.decide`.
#[derive(Debug, Deserialize)]
struct EnrollDecision {
    minion: provis_core::MinionId,
    decision: enrollment::Decision,
    /// Who decides, as the operator's tool says (recorded, informational).
    #[serde(default)]
    by: Option<String>,
    /// The key the operator checked; the decision applies only to it.
    #[serde(default)]
    key: Option<String>,
}

async fn decide_enrollment(served: &Served, payload: &[u8]) -> Value {
    let request = match serde_json::from_slice::<EnrollDecision>(payload) {
        Ok(request) => request,
        Err(err) => {
            return json!({ "error": format!("not an enrollment decision: {err}"), "usage": true });
        }
    };
    let by = request.by.unwrap_or_else(|| "operator".to_owned());
    match served
        .enrollment
        .decide(
            &request.minion,
            request.decision,
            &by,
            request.key.as_deref(),
        )
        .await
    {
        Ok(record) => {
            let kicked = if request.decision == enrollment::Decision::Revoke {
                served.gatekeeper.kick(&request.minion).await
            } else {
                0
            };
            let kind = match request.decision {
                enrollment::Decision::Accept => "minion.accepted",
                enrollment::Decision::Reject => "minion.rejected",
                enrollment::Decision::Revoke => "minion.revoked",
            };
            event::emit(
                &served.nats,
                &served.subjects,
                "master",
                kind,
                json!({ "minion": record.minion, "key": record.key, "by": by, "disconnected": kicked }),
            )
            .await;
            json!({ "record": record, "disconnected": kicked })
        }
        Err(err) => json!({ "error": err.to_string() }),
    }
}

/// A request on `<prefix>.master.role`.
#[derive(Debug, Deserialize)]
struct RoleRequest {
    op: desired::RoleOp,
    minion: provis_core::MinionId,
    #[serde(default)]
    role: Option<provis_core::RoleName>,
}

async fn ask_desired(
    served: &Served,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Value>) -> desired::DesiredRequest,
) -> Value {
    let (reply, answer) = tokio::sync::oneshot::channel();
    if served.desired.send(make(reply)).await.is_err() {
        return json!({ "error": "the master's desired-state loop stopped" });
    }
    match tokio::time::timeout(Duration::from_secs(120), answer).await {
        Ok(Ok(value)) => value,
        _ => json!({ "error": "the master did not finish in time" }),
    }
}

async fn list_minions(js: &async_nats::jetstream::Context) -> Value {
    let records = match registry::open_registry(js).await {
        Ok(store) => registry::read_all(&store).await,
        Err(err) => Err(err),
    };
    match records {
        Ok(records) => {
            let now = now_unix_ms();
            let minions: Vec<Value> = records
                .into_iter()
                .map(|record| {
                    let live = record.is_live_at(now);
                    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
                    value["live"] = json!(live);
                    value
                })
                .collect();
            json!({ "minions": minions })
        }
        Err(err) => json!({ "error": err.to_string() }),
    }
}

fn run_query(view: &fleet_view::FleetView, payload: &[u8]) -> Value {
    let request = match serde_json::from_slice::<query::QueryRequest>(payload) {
        Ok(request) => request,
        Err(err) => return json!({ "error": format!("not a query request: {err}") }),
    };
    if !view.rebuilt() {
        return json!({ "error": "the state index is still being rebuilt from the stream; try again in a moment" });
    }
    let registry = view.registry().clone();
    let index = view.index();
    match query::answer(&request, &registry, &index, now_unix_ms()) {
        Ok(answer) => serde_json::to_value(answer).unwrap_or(Value::Null),
        Err(err) => json!({ "error": err.to_string(), "usage": true }),
    }
}
