//! Following the fleet's call policy (`provis_config/policy`): taken up only
//! when a key this minion pins (`trusted_bundle_keys`, the master's) signed
//! it for that key, and never one older than the policy held, so whoever can
//! write the bucket (or have JetStream copy into it) cannot grant themselves
//! calls or bring back a policy that was replaced.

use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use futures::StreamExt;
use provis_core::call_auth::{CallGuard, CallPolicy};
use provis_core::storage::BUCKET_CONFIG;

/// Keeps `guard`'s policy in step with the bucket for as long as the minion runs.
pub async fn follow(
    nats: async_nats::Client,
    minion: String,
    guard: CallGuard,
    trusted: Vec<String>,
) {
    let js = async_nats::jetstream::new(nats);
    let mut held: Option<i64> = None;
    loop {
        if let Ok(store) = js.get_key_value(BUCKET_CONFIG).await
            && let Ok(mut entries) = store.watch_with_history("policy").await
        {
            while let Some(Ok(entry)) = entries.next().await {
                if entry.operation != Operation::Put {
                    guard.set_policy(None);
                    tracing::info!(%minion, "call policy removed");
                    continue;
                }
                if trusted.is_empty() {
                    // Without a pinned key nobody's policy can be told genuine.
                    continue;
                }
                match provis_core::signed_entry::open::<CallPolicy>(
                    BUCKET_CONFIG,
                    "policy",
                    &entry.value,
                    &trusted,
                )
                .and_then(|opened| opened.not_older_than(held))
                {
                    Ok(opened) => {
                        held = opened.written_at_ms.or(held);
                        let policy = opened.value;
                        tracing::info!(%minion, operators = policy.operator.len(), "call policy taken up");
                        guard.set_policy(Some(policy));
                    }
                    Err(err) => {
                        tracing::warn!(%minion, error = %err, "call policy refused; keeping the previous one")
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
