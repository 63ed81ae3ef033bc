//! Reading a stream's records on one subject filter from a point in time
//! to its current end, through an ordered consumer (no acknowledgements, so
//! any identity allowed to read the stream may): what jobs, the dashboard's
//! histories and `provis events --since` read.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;

/// How long reading waits for the stream to answer at all, and for each
/// next record.
const STREAM_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StreamReadError {
    #[error("cannot read stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
}

/// Every record of `stream` on `filter` since `since` (none: from the
/// start), in order, at most `most` (the first ones) when given.
pub async fn read_since(
    nats: &async_nats::Client,
    stream: &str,
    filter: String,
    since: Option<SystemTime>,
    most: Option<usize>,
) -> Result<Vec<jetstream::Message>, StreamReadError> {
    let failed = |reason: String| StreamReadError::Stream {
        stream: stream.to_owned(),
        reason,
    };
    let js = jetstream::new(nats.clone());
    let deliver_policy = match since {
        Some(since) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from(since),
        },
        None => consumer::DeliverPolicy::All,
    };
    let config = consumer::pull::OrderedConfig {
        filter_subject: filter,
        deliver_policy,
        ..Default::default()
    };
    let open = async {
        let handle = js.get_stream(stream).await.map_err(|e| e.to_string())?;
        let consumer = handle
            .create_consumer(config)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((handle, consumer))
    };
    let (handle, consumer) = tokio::time::timeout(STREAM_WAIT, open)
        .await
        .map_err(|_| failed("no answer in time".into()))?
        .map_err(failed)?;
    let name = consumer.cached_info().name.clone();
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|err| failed(err.to_string()))?;
    let most = most.unwrap_or(usize::MAX);
    let mut records = Vec::new();
    while pending > 0 && records.len() < most {
        let Ok(Some(message)) = tokio::time::timeout(STREAM_WAIT, messages.next()).await else {
            break;
        };
        let message = message.map_err(|err| failed(err.to_string()))?;
        pending = message
            .info()
            .map(|info| info.pending)
            .unwrap_or(pending.saturating_sub(1));
        records.push(message);
    }
    drop(messages);
    // Gone now rather than when the server notices it idle: a reader
    // leaves nothing behind on the stream.
    if let Err(err) = handle.delete_consumer(&name).await {
        tracing::debug!(%name, error = %err, "read consumer not deleted; the server drops it when idle");
    }
    Ok(records)
}
