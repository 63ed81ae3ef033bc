//! Following the fleet's call policy (`provis_config/policy`): taken up only
//! when a key this minion pins (`trusted_bundle_keys`, the master's) signed
//! it, so whoever can write the bucket cannot grant themselves calls.

use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use futures::StreamExt;
use provis_core::call_auth::{CallGuard, SignedPolicy};
use provis_core::storage::BUCKET_CONFIG;

/// Keeps `guard`'s policy in step with the bucket for as long as the minion runs.
pub async fn follow(
    nats: async_nats::Client,
    minion: String,
    guard: CallGuard,
    trusted: Vec<String>,
) {
    let js = async_nats::jetstream::new(nats);
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
                let signed = match serde_json::from_slice::<SignedPolicy>(&entry.value) {
                    Ok(signed) => signed,
                    Err(err) => {
                        tracing::warn!(%minion, error = %err, "unreadable call policy ignored");
                        continue;
                    }
                };
                match signed.verified(&trusted) {
                    Some(policy) => {
                        tracing::info!(%minion, operators = policy.operator.len(), "call policy taken up");
                        guard.set_policy(Some(policy));
                    }
                    None => {
                        tracing::warn!(%minion, "call policy not signed by a pinned key; keeping the previous one")
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
