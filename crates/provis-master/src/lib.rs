//! The provis master: on every start it creates (or brings up to date) the
//! fleet's JetStream storage, then serves `<prefix>.master.>`.
//!
//! Served subjects (JSON replies; errors are `{"error": "..."}`):
//! - `<prefix>.master.ping`: `{"master": true, "version": "..."}`, for readiness checks;
//! - `<prefix>.master.minions`: every registry entry, with a `live` flag.

pub mod apply;
pub mod liveness;
pub mod repository;
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MasterConfig {
    /// Where the fleet is (NATS URL and subject prefix).
    #[serde(flatten)]
    pub fleet: FleetContext,
    /// Retention of the fleet's streams.
    #[serde(default)]
    pub storage: StorageLimits,
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

    let liveness = {
        let (nats, subjects, js) = (nats.clone(), subjects.clone(), js.clone());
        tokio::spawn(async move {
            loop {
                match registry::open_registry(&js).await {
                    Ok(store) => {
                        if let Err(err) =
                            liveness::watch(nats.clone(), subjects.clone(), store).await
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
                    Some(request) => answer(&nats, &js, &subjects, request).await,
                    None => break,
                },
            }
        }
        liveness.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), nats.drain()).await;
        tracing::info!("master stopped");
    });
    Ok(MasterHandle { shutdown, task })
}

async fn answer(
    nats: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
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
        other => {
            json!({ "error": format!("the master serves no {other:?}; it serves ping, minions") })
        }
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
