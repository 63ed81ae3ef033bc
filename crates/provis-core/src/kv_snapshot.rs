//! Reading a whole key-value bucket in one pass: one consumer delivering the
//! last value of every key, instead of a request per key.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use futures::StreamExt;

/// How long a snapshot may take before it is given up.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

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
    tokio::time::timeout(SNAPSHOT_TIMEOUT, read)
        .await
        .map_err(|_| SnapshotError::Timeout(store.name.clone()))?
}
