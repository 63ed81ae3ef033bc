//! Following this minion's entry in `provis_assignments`: the roles and
//! settings the master assigns it, delivered to the minion's main loop as
//! they change (the current one first).

use futures::StreamExt;
use provis_core::assignment::Assignment;
use provis_core::signed_entry::{Followed, follow as follow_entries, signed_by};
use provis_core::storage::BUCKET_ASSIGNMENTS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Sends every new assignment of `minion` to `updates` until `stop` fires;
/// with `trusted` keys, only assignments one of them signed for this
/// minion, none older than the one taken (others are refused with an
/// event, the current one stays).
pub async fn follow(
    js: async_nats::jetstream::Context,
    minion: String,
    updates: mpsc::Sender<Assignment>,
    trusted: Vec<String>,
    events: crate::events::EventBus,
    stop: CancellationToken,
) {
    let mut entries = follow_entries(
        js,
        BUCKET_ASSIGNMENTS,
        minion.clone(),
        signed_by::<Assignment>(BUCKET_ASSIGNMENTS, trusted),
    );
    loop {
        let followed = tokio::select! {
            () = stop.cancelled() => return,
            followed = entries.next() => followed,
        };
        match followed {
            Some(Followed::Taken { value, .. }) => {
                let sent = tokio::select! {
                    () = stop.cancelled() => return,
                    sent = updates.send(value) => sent,
                };
                if sent.is_err() {
                    return;
                }
            }
            Some(Followed::Refused { key, error }) => {
                tracing::warn!(%minion, %error, "assignment refused");
                events
                    .desired_refused(BUCKET_ASSIGNMENTS, &key, &error)
                    .await;
            }
            Some(Followed::Removed { .. } | Followed::Current) => {}
            None => return,
        }
    }
}
