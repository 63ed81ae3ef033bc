//! Reading a whole key-value bucket in one pass: one consumer delivering the
//! last value of every key, instead of a request per key.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use futures::StreamExt;

/// How long a snapshot may take, all attempts together, before it is given up.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one attempt may take: a bucket whose stream lost its leader (a
/// node of the cluster died) answers again once another is elected, so a
/// stuck attempt is dropped and another made.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2_500);

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

async fn read_once(store: &Store) -> Result<BTreeMap<String, bytes::Bytes>, SnapshotError> {
    let read_err = |source: async_nats::Error| SnapshotError::Read {
        bucket: store.name.clone(),
        source,
    };
    // `Store::status` answers from a cache taken when the store was opened;
    // ask the server. An empty bucket must be told apart before watching,
    // because a watch on it would wait for a first entry that never comes.
    let info = store
        .stream
        .get_info()
        .await
        .map_err(|err| read_err(Box::new(err)))?;
    if info.state.messages == 0 {
        return Ok(BTreeMap::new());
    }
    let read = async {
        let mut watch = store
            .watch_with_history(">")
            .await
            .map_err(|err| read_err(Box::new(err)))?;
        let mut values = BTreeMap::new();
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(|err| read_err(Box::new(err)))?;
            if entry.operation == Operation::Put {
                values.insert(entry.key, entry.value);
            } else {
                values.remove(&entry.key);
            }
            if entry.delta == 0 {
                break;
            }
        }
        Ok(values)
    };
    read.await
}
