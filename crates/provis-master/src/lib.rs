//! The provis master: on every start it creates (or brings up to date) the
//! fleet's JetStream storage, then serves `<prefix>.master.>`.
//!
//! Served subjects (JSON replies; errors are `{"error": "..."}`):
//! - `<prefix>.master.ping`: `{"master": true, "version": "..."}`, for readiness checks;
//! - `<prefix>.master.minions`: every registry entry, with a `live` flag;
//! - `<prefix>.master.query`: a [`query::QueryRequest`] answered with a
//!   [`query::QueryAnswer`] from the registry and the state index;
//! - `<prefix>.master.stats`: the state index in numbers.

pub mod apply;
pub mod fleet_view;
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
}

fn default_state_bucket_s() -> u64 {
    3_600
}

impl MasterConfig {
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
}

/// A running master.
#[derive(Debug)]
pub struct MasterHandle {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MasterHandle {
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
    let nats = async_nats::ConnectOptions::new()
        .name("provis-master")
        .retry_on_initial_connect()
        .connect(&url)
        .await
        .map_err(|err| MasterError::Connect {
            url: url.clone(),
            reason: err.to_string(),
        })?;
    let subjects = Subjects::new(config.fleet.prefix.clone());
    let js = async_nats::jetstream::new(nats.clone());
    storage::ensure(&js, &subjects, &config.storage).await?;

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
    let liveness = {
        let (nats, subjects, js, view) = (nats.clone(), subjects.clone(), js.clone(), view.clone());
        tokio::spawn(async move {
            loop {
                match registry::open_registry(&js).await {
                    Ok(store) => {
                        if let Err(err) =
                            liveness::watch(nats.clone(), subjects.clone(), store, &view).await
                        {
                            tracing::warn!(error = %err, "registry watch ended; starting again");
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "registry not reachable"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut requests = requests;
        loop {
            tokio::select! {
                _ = shutdown_rx.changed() => break,
                request = requests.next() => match request {
                    Some(request) => answer(&nats, &js, &subjects, &view, request).await,
                    None => break,
                },
            }
        }
        liveness.abort();
        state_feed.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), nats.drain()).await;
        tracing::info!("master stopped");
    });
    Ok(MasterHandle { shutdown, task })
}

async fn answer(
    nats: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    view: &fleet_view::FleetView,
    request: async_nats::Message,
) {
    let Some(reply_to) = request.reply.clone() else {
        return;
    };
    let what = request
        .subject
        .as_str()
        .strip_prefix(&subjects.master(""))
        .unwrap_or_default()
        .to_owned();
    let body = match what.as_str() {
        "ping" => json!({ "master": true, "version": provis_core::VERSION }),
        "minions" => list_minions(js).await,
        "query" => run_query(view, &request.payload),
        "stats" => serde_json::to_value(view.stats()).unwrap_or(Value::Null),
        other => json!({
            "error": format!("the master serves no {other:?}; it serves ping, minions, query, stats")
        }),
    };
    if let Err(err) = nats.publish(reply_to, body.to_string().into()).await {
        tracing::warn!(error = %err, "master reply not sent");
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
