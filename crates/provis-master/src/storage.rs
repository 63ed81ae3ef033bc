//! The fleet's JetStream storage (DESIGN.md): two streams, four key-value
//! buckets and an object store. `ensure` is idempotent and runs on every
//! master start, so an upgrade that changes a limit applies it in place.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use provis_core::Subjects;
use provis_core::storage::*;
use serde::{Deserialize, Serialize};

/// Retention of the fleet's streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageLimits {
    /// How long events are kept. Default: 30 days.
    pub events_max_age_s: u64,
    /// Most bytes of events kept. Default: 1 GiB.
    pub events_max_bytes: i64,
    /// How long state samples are kept; at least 8 days so a week can be asked. Default: 8 days.
    pub state_max_age_s: u64,
    /// Most bytes of state samples kept. Default: 4 GiB.
    pub state_max_bytes: i64,
}

impl Default for StorageLimits {
    fn default() -> Self {
        Self {
            events_max_age_s: 30 * 86_400,
            events_max_bytes: 1 << 30,
            state_max_age_s: 8 * 86_400,
            state_max_bytes: 4 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "cannot create stream {name} (is JetStream enabled on the nats-server? start it with -js)"
    )]
    Stream {
        name: &'static str,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot create or set up bucket {name}")]
    Bucket {
        name: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

/// Creates or updates every stream and bucket of the fleet.
pub async fn ensure(
    js: &jetstream::Context,
    subjects: &Subjects,
    limits: &StorageLimits,
) -> Result<(), StorageError> {
    let streams = [
        (
            STREAM_EVENTS,
            subjects.wildcard("event"),
            limits.events_max_age_s,
            limits.events_max_bytes,
        ),
        (
            STREAM_STATE,
            subjects.wildcard("state"),
            limits.state_max_age_s,
            limits.state_max_bytes,
        ),
    ];
    for (name, subject, max_age_s, max_bytes) in streams {
        js.create_or_update_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![subject],
            max_age: Duration::from_secs(max_age_s),
            max_bytes,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|err| StorageError::Stream {
            name,
            source: Box::new(err),
        })?;
    }
    let buckets = [
        (
            BUCKET_SERVICES,
            "service name → current bundle digest, manifest, signature",
            10,
        ),
        (BUCKET_ROLES, "role → services and role config", 10),
        (
            BUCKET_ASSIGNMENTS,
            "minion id → roles and per-minion settings",
            10,
        ),
        (
            BUCKET_MINIONS,
            "registry: live minions, facts, versions, heartbeat",
            1,
        ),
        (
            BUCKET_CONFIG,
            "applied and rejected commits, role overlay",
            10,
        ),
    ];
    for (name, description, history) in buckets {
        js.create_or_update_key_value(kv::Config {
            bucket: name.to_owned(),
            description: description.to_owned(),
            history,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|err| StorageError::Bucket {
            name,
            source: Box::new(err),
        })?;
    }
    // Minions write the registry: a rollup header on their own key would
    // wipe everyone's entries, so the stream takes none (nothing purges it).
    let registry_stream = format!("KV_{BUCKET_MINIONS}");
    let mut registry =
        js.get_stream(&registry_stream)
            .await
            .map_err(|err| StorageError::Bucket {
                name: BUCKET_MINIONS,
                source: Box::new(err),
            })?;
    let mut config = registry
        .info()
        .await
        .map_err(|err| StorageError::Bucket {
            name: BUCKET_MINIONS,
            source: Box::new(err),
        })?
        .config
        .clone();
    if config.allow_rollup {
        config.allow_rollup = false;
        js.update_stream(config)
            .await
            .map_err(|err| StorageError::Bucket {
                name: BUCKET_MINIONS,
                source: Box::new(err),
            })?;
    }
    if js.get_object_store(BUCKET_BUNDLES).await.is_err() {
        js.create_object_store(object_store::Config {
            bucket: BUCKET_BUNDLES.to_owned(),
            description: Some("service bundles, named by content digest".to_owned()),
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|err| StorageError::Bucket {
            name: BUCKET_BUNDLES,
            source: Box::new(err),
        })?;
    }
    Ok(())
}
