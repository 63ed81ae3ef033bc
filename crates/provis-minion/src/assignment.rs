//! Following this minion's entry in `provis_assignments`: the roles and
//! settings the master assigns it, delivered to the minion's main loop as
//! they change (the current one first).

use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use futures::StreamExt;
use provis_core::assignment::Assignment;
use provis_core::storage::BUCKET_ASSIGNMENTS;
use tokio::sync::mpsc;

/// Sends every new assignment of `minion` to `updates` for as long as the
/// minion runs; with `trusted` keys, only assignments one of them signed for
/// this minion, none older than the one taken (others are refused with an
/// event, the current one stays).
pub async fn follow(
    nats: async_nats::Client,
    minion: String,
    updates: mpsc::Sender<Assignment>,
    trusted: Vec<String>,
    events: crate::events::EventBus,
) {
    let js = async_nats::jetstream::new(nats);
    // When the assignment taken was written: an older one is put back, not new.
    let mut held: Option<i64> = None;
    loop {
        match js.get_key_value(BUCKET_ASSIGNMENTS).await {
            Ok(store) => match store.watch_with_history(&minion).await {
                Ok(mut entries) => {
                    while let Some(entry) = entries.next().await {
                        let Ok(entry) = entry else { break };
                        if entry.operation != Operation::Put {
                            continue;
                        }
                        match provis_core::signed_entry::open::<Assignment>(
                            BUCKET_ASSIGNMENTS,
                            &minion,
                            &entry.value,
                            &trusted,
                        )
                        .and_then(|opened| opened.not_older_than(held))
                        {
                            Ok(opened) => {
                                held = opened.written_at_ms.or(held);
                                if updates.send(opened.value).await.is_err() {
                                    return;
                                }
                            }
                            Err(err) => {
                                tracing::warn!(%minion, error = %err, "assignment refused");
                                events
                                    .emit(
                                        "desired.refused",
                                        serde_json::json!({ "bucket": BUCKET_ASSIGNMENTS, "key": minion, "reason": err.to_string() }),
                                    )
                                    .await;
                            }
                        }
                    }
                }
                Err(err) => tracing::warn!(%minion, error = %err, "cannot watch the assignment"),
            },
            Err(err) => {
                tracing::debug!(%minion, error = %err, "assignments bucket not reachable yet")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
