//! What nats-server refused a connection: its permission violations, as the
//! client hears them, for tests that check the server enforces least
//! privilege.

use std::time::Duration;

use tokio::sync::mpsc;

/// The server errors one connection received.
#[derive(Debug)]
pub struct ServerRefusals {
    received: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl ServerRefusals {
    /// `options` that report every server error of their connection here.
    pub fn watch(options: async_nats::ConnectOptions) -> (async_nats::ConnectOptions, Self) {
        let (sender, received) = mpsc::unbounded_channel();
        let options = options.event_callback(move |event| {
            let sender = sender.clone();
            async move {
                if let async_nats::Event::ServerError(err) = event {
                    let _ = sender.send(err.to_string());
                }
            }
        });
        (
            options,
            Self {
                received,
                seen: Vec::new(),
            },
        )
    }

    /// Waits until the server has refused each of `subjects` (a permission
    /// violation naming it), or fails listing what it refused instead.
    pub async fn expect(&mut self, subjects: &[&str]) -> anyhow::Result<()> {
        let missing = |seen: &[String]| -> Vec<String> {
            subjects
                .iter()
                .filter(|subject| {
                    !seen.iter().any(|refusal| {
                        refusal.contains("Permissions Violation") && refusal.contains(**subject)
                    })
                })
                .map(|subject| (*subject).to_owned())
                .collect()
        };
        while !missing(&self.seen).is_empty() {
            match tokio::time::timeout(Duration::from_secs(5), self.received.recv()).await {
                Ok(Some(refusal)) => self.seen.push(refusal),
                _ => anyhow::bail!(
                    "nats-server did not refuse {:?}; it refused: {:?}",
                    missing(&self.seen),
                    self.seen
                ),
            }
        }
        Ok(())
    }
}
