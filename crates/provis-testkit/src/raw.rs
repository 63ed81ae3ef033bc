//! The physical limit benchmarks measure provis against: plain NATS
//! request/reply with no provis code in the path, on the same server and
//! the same number of connections as the fleet being measured.

use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::NatsServer;

/// `count` subscribers to one subject, spread over `connections` client
/// connections, each answering every request with `pong`. They answer until
/// closed (or dropped, within a runtime that ends: a connection whose
/// server went away first would otherwise try to reconnect for ever and
/// steal the CPU of what is measured next).
#[derive(Debug)]
pub struct RawResponders {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    clients: Vec<async_nats::Client>,
}

impl RawResponders {
    pub async fn start(
        nats: &NatsServer,
        subject: &str,
        count: usize,
        connections: usize,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(nats.connect().await?);
        }
        let mut tasks = Vec::with_capacity(count);
        for n in 0..count {
            let client = clients[n % clients.len()].clone();
            let mut requests = client.subscribe(subject.to_owned()).await?;
            tasks.push(tokio::spawn(async move {
                while let Some(message) = requests.next().await {
                    if let Some(reply) = message.reply {
                        let _ = client.publish(reply, "pong".into()).await;
                    }
                }
            }));
        }
        for client in &clients {
            client.flush().await?;
        }
        Ok(Self { tasks, clients })
    }

    /// Stops answering and closes every connection, while the server runs.
    pub async fn close(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for client in std::mem::take(&mut self.clients) {
            let _ = client.drain().await;
        }
    }
}

impl Drop for RawResponders {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One publish to `subject`, then the wait for `expected` replies: the raw
/// fan-out, in milliseconds.
pub async fn raw_fanout(
    nats: &async_nats::Client,
    subject: &str,
    expected: usize,
) -> anyhow::Result<f64> {
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await?;
    let started = Instant::now();
    nats.publish_with_reply(subject.to_owned(), inbox, "ping".into())
        .await?;
    nats.flush().await?;
    for _ in 0..expected {
        tokio::time::timeout(Duration::from_secs(30), replies.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the reply subscription ended"))?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// One provis call to `selection`, timed from the first publish to the last
/// reply, in milliseconds: the figure benchmarks set beside [`raw_fanout`].
/// Fails unless all `expected` minions answered.
pub async fn timed_call(
    client: &provis_core::Client,
    target: &provis_core::CallTarget,
    selection: &provis_core::selection::Selection,
    request: &provis_core::CallRequest,
    expected: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let report = client
        .call_selected(
            target,
            selection,
            request,
            &provis_core::client::CallPlan::default(),
            &mut |_| {},
        )
        .await?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        report.summary.ok == expected,
        "{} of {expected} answered",
        report.summary.ok
    );
    Ok(ms)
}
