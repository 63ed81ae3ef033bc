//! Following the fleet's call policy (`provis_config/policy`): taken up only
//! when a key this minion pins (`trusted_bundle_keys`, the master's) signed
//! it for that key, and never one older than the policy held, so whoever can
//! write the bucket (or have JetStream copy into it) cannot grant themselves
//! calls or bring back a policy that was replaced.

use provis_core::call_auth::CallGuard;
use tokio_util::sync::CancellationToken;

/// Keeps `guard`'s policy in step with the bucket until `stop` fires.
pub async fn follow(
    js: async_nats::jetstream::Context,
    minion: String,
    guard: CallGuard,
    trusted: Vec<String>,
    stop: CancellationToken,
) {
    provis_core::call_auth::follow_policy(js, trusted, stop.cancelled_owned(), move |policy| {
        match &policy {
            Some(policy) => {
                tracing::info!(%minion, operators = policy.operator.len(), "call policy taken up")
            }
            None => tracing::info!(%minion, "call policy removed"),
        }
        guard.set_policy(policy);
    })
    .await;
}
