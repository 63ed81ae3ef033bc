//! The call subjects a minion listens on, changed on the fly when its roles
//! change: one forwarding task per subject into one queue, so a subject can
//! be dropped (its task ends, its subscription with it) without touching
//! the others.

use std::collections::BTreeMap;

use futures::StreamExt;
use provis_core::lifecycle::Lifecycle;
use provis_core::{MinionId, RoleName, Subjects};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Calls waiting to be taken; beyond this, subjects wait (NATS buffers).
const QUEUE: usize = 4096;

#[derive(Debug)]
pub struct Listener {
    nats: async_nats::Client,
    subjects: Subjects,
    id: MinionId,
    queue: mpsc::Sender<async_nats::Message>,
    listening: BTreeMap<String, JoinHandle<()>>,
    /// Owns the forwarding tasks.
    lifecycle: Lifecycle,
}

impl Listener {
    /// A listener and the queue its calls arrive on.
    pub fn new(
        nats: async_nats::Client,
        subjects: Subjects,
        id: MinionId,
        lifecycle: Lifecycle,
    ) -> (Self, mpsc::Receiver<async_nats::Message>) {
        let (queue, calls) = mpsc::channel(QUEUE);
        (
            Self {
                nats,
                subjects,
                id,
                queue,
                listening: BTreeMap::new(),
                lifecycle,
            },
            calls,
        )
    }

    /// Listens on the subjects of `roles` (and the minion's own and the
    /// fleet-wide ones), and on nothing else.
    pub async fn listen_for(&mut self, roles: &[RoleName]) -> Result<(), crate::MinionError> {
        let wanted = self.subjects.minion_listen_subjects(&self.id, roles);
        let stale: Vec<String> = self
            .listening
            .keys()
            .filter(|s| !wanted.contains(s))
            .cloned()
            .collect();
        for subject in stale {
            if let Some(task) = self.listening.remove(&subject) {
                task.abort();
                tracing::debug!(minion = %self.id, %subject, "no longer listening");
            }
        }
        for subject in wanted {
            if self.listening.contains_key(&subject) {
                continue;
            }
            let mut subscription =
                self.nats
                    .subscribe(subject.clone())
                    .await
                    .map_err(|source| crate::MinionError::Subscribe {
                        subject: subject.clone(),
                        source,
                    })?;
            let queue = self.queue.clone();
            let task = self.lifecycle.spawn_background(async move {
                while let Some(message) = subscription.next().await {
                    if queue.send(message).await.is_err() {
                        return;
                    }
                }
            });
            tracing::debug!(minion = %self.id, %subject, "listening");
            self.listening.insert(subject, task);
        }
        Ok(())
    }

    /// Stops listening everywhere: the subscriptions end with their tasks.
    pub fn close(&mut self) {
        for (_, task) in std::mem::take(&mut self.listening) {
            task.abort();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.close();
    }
}
