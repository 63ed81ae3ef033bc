//! The fleet's JetStream storage (DESIGN.md): two streams, key-value
//! buckets and an object store. `ensure` is idempotent and runs on every
//! master start, so an upgrade that changes a limit applies it in place.
//!
//! Every store takes `replicas` copies (3 on a cluster, so a node can die).
//! Creating or updating storage only ever raises what it finds: replicas,
//! ages, sizes and history an operator raised by hand stay as they are, and
//! raising a setting raises the stores.

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
    /// How long job records (every call, each minion's result) are kept. Default: 30 days.
    pub jobs_max_age_s: u64,
    /// Most bytes of job records kept (the oldest go first). Default: 2 GiB.
    pub jobs_max_bytes: i64,
}

impl Default for StorageLimits {
    fn default() -> Self {
        Self {
            events_max_age_s: 30 * 86_400,
            events_max_bytes: 1 << 30,
            state_max_age_s: 8 * 86_400,
            state_max_bytes: 4 << 30,
            jobs_max_age_s: 30 * 86_400,
            jobs_max_bytes: 2 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "cannot create or update stream {name} (is JetStream enabled on every nats-server? with replicas > 1, does the cluster have that many JetStream nodes up?)"
    )]
    Stream {
        name: String,
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

/// What a store of the fleet needs at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub replicas: usize,
    /// Zero: no limit.
    pub max_age: Duration,
    /// -1: no limit.
    pub max_bytes: i64,
    /// Values kept per key (buckets only; zero leaves it as it is).
    pub history: i64,
    /// Consumers the stream may have at once (zero leaves it as it is;
    /// nats-server gives every stream 1,000 unless it says otherwise).
    pub max_consumers: i32,
}

/// Consumers the bundle store may have at once: every bundle fetch holds
/// one until it goes idle, and a stage of thousands of minions fetches at
/// once; the server's default of 1,000 refused fetches at 1,000 minions.
pub const BUNDLE_STORE_MAX_CONSUMERS: i32 = 100_000;

/// Creates or raises every stream, bucket and the object store of the
/// fleet to `replicas` copies and the limits of `limits`.
pub async fn ensure(
    js: &jetstream::Context,
    subjects: &Subjects,
    limits: &StorageLimits,
    replicas: usize,
) -> Result<(), StorageError> {
    let replicas = replicas.max(1);
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
        (
            STREAM_JOBS,
            subjects.wildcard("job"),
            limits.jobs_max_age_s,
            limits.jobs_max_bytes,
        ),
    ];
    for (name, subject, max_age_s, max_bytes) in streams {
        let wanted = Wanted {
            replicas,
            max_age: Duration::from_secs(max_age_s),
            max_bytes,
            history: 0,
            max_consumers: 0,
        };
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![subject],
            max_age: wanted.max_age,
            max_bytes,
            num_replicas: replicas,
            storage: stream::StorageType::File,
            // Events and samples carry their id: a publish retried after a
            // lost acknowledgement is stored once.
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        ensure_stream(js, config, wanted).await?;
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
        (
            BUCKET_ROLLOUTS,
            "commit → its rollout: stages, gates, minions switched",
            1,
        ),
    ];
    for (name, description, history) in buckets {
        ensure_bucket(
            js,
            kv::Config {
                bucket: name.to_owned(),
                description: description.to_owned(),
                history,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
    }
    // Minions write the registry: a rollup header on their own key would
    // wipe everyone's entries, so the stream takes none (nothing purges it).
    let registry_stream = format!("KV_{BUCKET_MINIONS}");
    let bucket_error = |name| {
        move |err: jetstream::context::GetStreamError| StorageError::Bucket {
            name,
            source: Box::new(err),
        }
    };
    let mut registry = js
        .get_stream(&registry_stream)
        .await
        .map_err(bucket_error(BUCKET_MINIONS))?;
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
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|err| StorageError::Bucket {
            name: BUCKET_BUNDLES,
            source: Box::new(err),
        })?;
    }
    raise_stream(
        js,
        &format!("OBJ_{BUCKET_BUNDLES}"),
        Wanted {
            replicas,
            max_age: Duration::ZERO,
            max_bytes: -1,
            history: 0,
            max_consumers: BUNDLE_STORE_MAX_CONSUMERS,
        },
    )
    .await?;
    Ok(())
}

/// Creates the bucket `config` describes, or raises the one there to its
/// replicas and history.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, StorageError> {
    let name = config.bucket.clone();
    let wanted = Wanted {
        replicas: config.num_replicas.max(1),
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        history: config.history,
        max_consumers: 0,
    };
    let bucket_error = |source: async_nats::Error| StorageError::Stream {
        name: format!("KV_{name}"),
        source,
    };
    let store = match js.get_key_value(&name).await {
        Ok(store) => {
            raise_stream(js, &format!("KV_{name}"), wanted).await?;
            store
        }
        Err(_) => js
            .create_key_value(config)
            .await
            .map_err(|err| bucket_error(Box::new(err)))?,
    };
    Ok(store)
}

/// Creates the stream `config` describes, or raises the one there.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    wanted: Wanted,
) -> Result<(), StorageError> {
    let name = config.name.clone();
    if js.get_stream(&name).await.is_ok() {
        return raise_stream(js, &name, wanted).await;
    }
    js.create_stream(config)
        .await
        .map(drop)
        .map_err(|err| StorageError::Stream {
            name,
            source: Box::new(err),
        })
}

/// Raises stream `name` to `wanted` where it falls short; lowers nothing.
async fn raise_stream(
    js: &jetstream::Context,
    name: &str,
    wanted: Wanted,
) -> Result<(), StorageError> {
    let stream_error = |source: async_nats::Error| StorageError::Stream {
        name: name.to_owned(),
        source,
    };
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(|err| stream_error(Box::new(err)))?;
    let current = stream
        .info()
        .await
        .map_err(|err| stream_error(Box::new(err)))?
        .config
        .clone();
    let raised = raise(&current, wanted);
    if raised != current {
        tracing::info!(
            stream = name,
            replicas = raised.num_replicas,
            "raising the stream's settings"
        );
        js.update_stream(raised)
            .await
            .map_err(|err| stream_error(Box::new(err)))?;
    }
    Ok(())
}

/// `current` with every setting at least `wanted` (more replicas, longer
/// ages, more bytes and history; no limit counts as the most).
fn raise(current: &stream::Config, wanted: Wanted) -> stream::Config {
    let mut raised = current.clone();
    raised.num_replicas = current.num_replicas.max(wanted.replicas);
    if !current.max_age.is_zero() && (wanted.max_age.is_zero() || wanted.max_age > current.max_age)
    {
        raised.max_age = wanted.max_age;
    }
    if current.max_bytes >= 0 && (wanted.max_bytes < 0 || wanted.max_bytes > current.max_bytes) {
        raised.max_bytes = wanted.max_bytes;
    }
    if wanted.history > 0 {
        raised.max_messages_per_subject = current.max_messages_per_subject.max(wanted.history);
    }
    if wanted.max_consumers > current.max_consumers.max(0) {
        raised.max_consumers = wanted.max_consumers;
    }
    raised
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_only_ever_rise() {
        let current = stream::Config {
            name: "S".into(),
            num_replicas: 3,
            max_age: Duration::from_secs(100),
            max_bytes: 1_000,
            max_messages_per_subject: 5,
            ..Default::default()
        };
        // Asking for less changes nothing an operator raised.
        let lower = Wanted {
            replicas: 1,
            max_age: Duration::from_secs(10),
            max_bytes: 10,
            history: 1,
            max_consumers: 0,
        };
        assert_eq!(raise(&current, lower), current);
        // Asking for more raises it.
        let higher = Wanted {
            replicas: 5,
            max_age: Duration::from_secs(1_000),
            max_bytes: -1,
            history: 10,
            max_consumers: 5_000,
        };
        let raised = raise(&current, higher);
        assert_eq!(raised.num_replicas, 5);
        assert_eq!(raised.max_age, Duration::from_secs(1_000));
        assert_eq!(raised.max_bytes, -1);
        assert_eq!(raised.max_messages_per_subject, 10);
        assert_eq!(raised.max_consumers, 5_000);
        // No limit is the most: it stays.
        let unlimited = stream::Config {
            max_age: Duration::ZERO,
            max_bytes: -1,
            ..current
        };
        assert_eq!(raise(&unlimited, higher).max_age, Duration::ZERO);
        assert_eq!(raise(&unlimited, lower).max_bytes, -1);
    }
}
