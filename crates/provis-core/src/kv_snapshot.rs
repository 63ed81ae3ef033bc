//! Reading a whole key-value bucket in one pass, leaving nothing behind on
//! the server: batched direct gets (`multi_last`, nats-server 2.11+) where
//! the bucket holds at most [`DIRECT_BATCH_LIMIT`] keys, else one consumer
//! delivering the last value of every key, deleted as soon as it is read.
//! Never a request per key, never a consumer left to expire: a script
//! calling in a loop, or ten thousand minions reconnecting at once, leave
//! no server resource behind.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::consumer;
use async_nats::jetstream::kv::Store;
use futures::StreamExt;

/// How long a snapshot may take, all attempts together, before it is given up.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one attempt may take: a bucket whose stream lost its leader (a
/// node of the cluster died) answers again once another is elected, so a
/// stuck attempt is dropped and another made.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2_500);
/// The most subjects nats-server answers one `multi_last` request for.
pub const DIRECT_BATCH_LIMIT: usize = 1_024;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read bucket {bucket}")]
    Read {
        bucket: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("reading bucket {0} took longer than {SNAPSHOT_TIMEOUT:?}")]
    Timeout(String),
}

/// The current value of every key (deleted keys left out).
pub async fn read_all(store: &Store) -> Result<BTreeMap<String, bytes::Bytes>, SnapshotError> {
    let started = tokio::time::Instant::now();
    loop {
        let left = SNAPSHOT_TIMEOUT.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(SnapshotError::Timeout(store.name.clone()));
        }
        match tokio::time::timeout(ATTEMPT_TIMEOUT.min(left), read_once(store)).await {
            Ok(outcome) => return outcome,
            Err(_) => tracing::debug!(bucket = %store.name, "bucket snapshot stuck; trying again"),
        }
    }
}

/// Like [`read_all`], by batched direct gets when the bucket is small
/// enough (no consumer at all), else as [`read_all`] does.
pub async fn read_all_direct(
    nats: &async_nats::Client,
    store: &Store,
) -> Result<BTreeMap<String, bytes::Bytes>, SnapshotError> {
    let started = tokio::time::Instant::now();
    loop {
        let left = SNAPSHOT_TIMEOUT.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(SnapshotError::Timeout(store.name.clone()));
        }
        match tokio::time::timeout(ATTEMPT_TIMEOUT.min(left), by_direct_gets(nats, store)).await {
            Ok(Ok(Some(values))) => return Ok(values),
            // Too many keys, or a server without batched gets.
            Ok(Ok(None)) => return read_all(store).await,
            Ok(Err(err)) => return Err(err),
            Err(_) => tracing::debug!(bucket = %store.name, "bucket snapshot stuck; trying again"),
        }
    }
}

/// One `multi_last` batch: the last message of every key, each a reply on
/// one inbox, ended by a `204 EOB` status. None when the server cannot
/// answer it that way (more keys than it allows, an older server).
async fn by_direct_gets(
    nats: &async_nats::Client,
    store: &Store,
) -> Result<Option<BTreeMap<String, bytes::Bytes>>, SnapshotError> {
    let read_err = |source: async_nats::Error| SnapshotError::Read {
        bucket: store.name.clone(),
        source,
    };
    let request = serde_json::json!({
        "multi_last": [format!("{}>", store.prefix)],
        "batch": DIRECT_BATCH_LIMIT,
    });
    let inbox = nats.new_inbox();
    let mut replies = nats
        .subscribe(inbox.clone())
        .await
        .map_err(|err| read_err(Box::new(err)))?;
    nats.publish_with_reply(
        format!("$JS.API.DIRECT.GET.{}", store.stream_name),
        inbox,
        request.to_string().into(),
    )
    .await
    .map_err(|err| read_err(Box::new(err)))?;
    let mut values = BTreeMap::new();
    while let Some(message) = replies.next().await {
        match message.status.map(|status| status.as_u16()) {
            // The end of the batch.
            Some(204) => return Ok(Some(values)),
            // The bucket is empty.
            Some(404) => return Ok(Some(BTreeMap::new())),
            // Anything else (413: too many keys) is for the consumer to read.
            Some(status) if status >= 300 => {
                tracing::debug!(bucket = %store.name, status, "no batched direct get; reading by a consumer");
                return Ok(None);
            }
            _ => {}
        }
        let Some(headers) = message.headers.as_ref() else {
            return Ok(None);
        };
        let Some(subject) = headers.get("Nats-Subject") else {
            return Ok(None);
        };
        let Some(key) = subject.as_str().strip_prefix(store.prefix.as_str()) else {
            continue;
        };
        let removed = headers
            .get("KV-Operation")
            .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
        if !removed {
            values.insert(key.to_owned(), message.payload);
        }
        // An answer of only messages (no end marker) is an older server's
        // single direct get: not a batch.
        if headers.get("Nats-Num-Pending").is_none() {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Reads through a consumer of its own that delivers the last message of
/// every key, then deletes it.
async fn read_once(store: &Store) -> Result<BTreeMap<String, bytes::Bytes>, SnapshotError> {
    let read_err = |source: async_nats::Error| SnapshotError::Read {
        bucket: store.name.clone(),
        source,
    };
    let consumer = store
        .stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            filter_subject: format!("{}>", store.prefix),
            ack_policy: consumer::AckPolicy::None,
            memory_storage: true,
            // Gone by itself should this reader die before deleting it.
            inactive_threshold: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .map_err(|err| read_err(Box::new(err)))?;
    let name = consumer.cached_info().name.clone();
    let pending = consumer.cached_info().num_pending;
    let read = async {
        let mut values = BTreeMap::new();
        let mut received = 0u64;
        while received < pending {
            let mut batch = consumer
                .fetch()
                .max_messages(
                    usize::try_from(pending - received)
                        .unwrap_or(usize::MAX)
                        .min(10_000),
                )
                .messages()
                .await
                .map_err(|err| read_err(Box::new(err)))?;
            let mut got = 0u64;
            while let Some(message) = batch.next().await {
                let message = message.map_err(&read_err)?;
                got += 1;
                let Some(key) = message.subject.as_str().strip_prefix(store.prefix.as_str()) else {
                    continue;
                };
                let removed = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
                if removed {
                    values.remove(key);
                } else {
                    values.insert(key.to_owned(), message.payload.clone());
                }
            }
            if got == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            received += got;
        }
        Ok(values)
    }
    .await;
    if let Err(err) = store.stream.delete_consumer(&name).await {
        tracing::debug!(bucket = %store.name, error = %err, "snapshot consumer not deleted; it expires by itself");
    }
    read
}
