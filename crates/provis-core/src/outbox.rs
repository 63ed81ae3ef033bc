//! What a part publishes and must not lose (events, state samples): each
//! message goes to JetStream with `Nats-Msg-Id` set to its id and counts as
//! sent once the stream acknowledged it. Until then it waits in an
//! [`Outbox`]: in order, on disk when the part has a directory for it, so a
//! bus that is unreachable (or a stream without a leader during a
//! cluster's failover) delays messages rather than losing them, and a
//! restart sends what was left. A message sent twice (its acknowledgement
//! lost) is stored once: the stream drops a repeated id within its
//! duplicate window.
//!
//! The outbox is bounded (`max_bytes`, default 16 MiB of payload): when it
//! is full the oldest messages are dropped, counted and logged, so a minion
//! cut off for days does not fill its disk.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::lifecycle::Lifecycle;

/// Payload bytes an outbox holds at most by default.
pub const DEFAULT_MAX_BYTES: usize = 16 << 20;
/// Messages published before their acknowledgements are awaited.
const IN_FLIGHT: usize = 64;
/// How long an acknowledgement may take before the message is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait between two attempts while the bus does not acknowledge.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a stopping part keeps trying to send what waits.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(3);

/// One message waiting to be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Outgoing {
    subject: String,
    /// `Nats-Msg-Id`: the stream stores one message per id.
    id: String,
    /// The payload as text (events and samples are JSON).
    payload: String,
}

impl Outgoing {
    fn size(&self) -> usize {
        self.payload.len() + self.subject.len() + self.id.len()
    }
}

/// Counters of an outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Messages the stream acknowledged.
    pub acknowledged: u64,
    /// Messages dropped because the outbox was full.
    pub dropped: u64,
    /// Messages waiting now.
    pub waiting: usize,
    /// Sends the stream did not acknowledge (each retried).
    pub failed_sends: u64,
}

/// The queue and its file.
#[derive(Debug)]
struct Queue {
    messages: VecDeque<Outgoing>,
    bytes: usize,
    max_bytes: usize,
    file: Option<PathBuf>,
    /// Messages removed since the file was last rewritten.
    removed_since_rewrite: usize,
    stats: OutboxStats,
}

impl Queue {
    fn push(&mut self, message: Outgoing) {
        self.bytes += message.size();
        if let Some(path) = &self.file {
            let line = serde_json::to_string(&message).unwrap_or_default();
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut file| writeln!(file, "{line}"));
            if let Err(err) = appended {
                tracing::warn!(path = %path.display(), error = %err, "outbox file not written; the message waits in memory only");
            }
        }
        self.messages.push_back(message);
        while self.bytes > self.max_bytes && self.messages.len() > 1 {
            if let Some(oldest) = self.messages.pop_front() {
                self.bytes -= oldest.size();
                self.removed_since_rewrite += 1;
                self.stats.dropped += 1;
                tracing::warn!(subject = %oldest.subject, dropped = self.stats.dropped, "outbox full: the oldest message is dropped");
            }
        }
    }

    /// Removes the messages of `ids` (a prefix of what waited when they
    /// were sent, some perhaps dropped since): the stream has them.
    fn acknowledged(&mut self, ids: &[String]) {
        for id in ids {
            if self.messages.front().is_some_and(|front| front.id == *id)
                && let Some(message) = self.messages.pop_front()
            {
                self.bytes -= message.size();
                self.removed_since_rewrite += 1;
                self.stats.acknowledged += 1;
            }
        }
        self.rewrite_if_due();
    }

    /// Keeps the file to what still waits: emptied at once when nothing
    /// does, rewritten after enough was removed.
    fn rewrite_if_due(&mut self) {
        let Some(path) = &self.file else { return };
        if self.removed_since_rewrite == 0
            || (!self.messages.is_empty() && self.removed_since_rewrite < 1_000)
        {
            return;
        }
        let temporary = path.with_extension("tmp");
        let written = (|| -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&temporary)?);
            for message in &self.messages {
                writeln!(
                    file,
                    "{}",
                    serde_json::to_string(message).unwrap_or_default()
                )?;
            }
            file.into_inner()
                .map_err(|err| err.into_error())?
                .sync_all()?;
            std::fs::rename(&temporary, path)
        })();
        match written {
            Ok(()) => self.removed_since_rewrite = 0,
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "outbox file not rewritten; it may send some messages again (the stream drops repeats)")
            }
        }
    }
}

/// A durable, ordered queue of messages for JetStream; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
}

impl Outbox {
    /// An outbox sending on `nats`, keeping what waits in `file` (none: in
    /// memory only), at most `max_bytes` of it. Its sender runs on
    /// `lifecycle` until the part closes, then tries a little longer to
    /// send what waits; what is still left stays in the file.
    pub fn start(
        nats: async_nats::Client,
        file: Option<PathBuf>,
        max_bytes: usize,
        lifecycle: &Lifecycle,
    ) -> Self {
        let messages = file.as_ref().map(load).unwrap_or_default();
        if !messages.is_empty() {
            tracing::info!(
                waiting = messages.len(),
                "outbox: sending what was left before the last stop"
            );
        }
        let bytes = messages.iter().map(Outgoing::size).sum();
        let outbox = Self {
            queue: Arc::new(Mutex::new(Queue {
                stats: OutboxStats {
                    waiting: messages.len(),
                    ..OutboxStats::default()
                },
                messages,
                bytes,
                max_bytes: max_bytes.max(1),
                file,
                removed_since_rewrite: 0,
            })),
            wake: Arc::new(Notify::new()),
        };
        let sender = Sender {
            js: async_nats::jetstream::new(nats),
            outbox: outbox.clone(),
        };
        lifecycle.spawn_background(sender.run(lifecycle.close_token()));
        outbox
    }

    /// Queues a message; it is sent in order, after everything queued before.
    pub fn send(&self, subject: String, id: String, payload: String) {
        self.lock().push(Outgoing {
            subject,
            id,
            payload,
        });
        self.wake.notify_one();
    }

    pub fn stats(&self) -> OutboxStats {
        let queue = self.lock();
        OutboxStats {
            waiting: queue.messages.len(),
            ..queue.stats
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The first messages waiting, at most `count`.
    fn head(&self, count: usize) -> Vec<Outgoing> {
        self.lock().messages.iter().take(count).cloned().collect()
    }
}

/// Reads what a previous run left in `path`; unreadable lines are skipped.
fn load(path: &PathBuf) -> VecDeque<Outgoing> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return VecDeque::new();
    };
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Sends what waits, in order, until its part closes.
struct Sender {
    js: async_nats::jetstream::Context,
    outbox: Outbox,
}

impl Sender {
    async fn run(self, closing: tokio_util::sync::CancellationToken) {
        let mut failures = 0u32;
        loop {
            let sent = self.send_batch().await;
            let idle = self.outbox.lock().messages.is_empty();
            let wait = match sent {
                Ok(_) => {
                    failures = 0;
                    if !idle {
                        continue;
                    }
                    None
                }
                Err(reason) => {
                    failures = failures.saturating_add(1);
                    self.outbox.lock().stats.failed_sends += 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(%reason, waiting = self.outbox.stats().waiting, "outbox: the bus does not acknowledge; retrying");
                    }
                    Some(
                        Duration::from_millis(100)
                            .saturating_mul(1 << failures.min(6))
                            .min(MAX_BACKOFF),
                    )
                }
            };
            tokio::select! {
                () = closing.cancelled() => break,
                () = self.outbox.wake.notified() => {}
                () = async {
                    match wait {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
        // The part is closing: a last try, then what is left stays on disk.
        let flushed = tokio::time::timeout(FLUSH_ON_CLOSE, async {
            while !self.outbox.lock().messages.is_empty() {
                if self.send_batch().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false);
        if !flushed {
            let waiting = self.outbox.stats().waiting;
            tracing::warn!(
                waiting,
                "outbox: stopping with messages not acknowledged; they are sent at the next start"
            );
        }
        let mut queue = self.outbox.lock();
        queue.removed_since_rewrite = queue.removed_since_rewrite.max(1);
        queue.rewrite_if_due();
    }

    /// Publishes the first messages waiting and removes those the stream
    /// acknowledged; the number sent, or why the first unacknowledged one
    /// was not.
    async fn send_batch(&self) -> Result<usize, String> {
        let batch = self.outbox.head(IN_FLIGHT);
        if batch.is_empty() {
            return Ok(0);
        }
        let mut acks = Vec::with_capacity(batch.len());
        for message in batch {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, message.id.as_str());
            match self
                .js
                .publish_with_headers(
                    message.subject.clone(),
                    headers,
                    message.payload.clone().into(),
                )
                .await
            {
                Ok(ack) => acks.push((message.id, ack)),
                Err(err) => {
                    // What was published before still counts once acknowledged.
                    return self.settle(acks, Some(crate::error_chain(&err))).await;
                }
            }
        }
        self.settle(acks, None).await
    }

    /// Awaits `acks` in order; removes the acknowledged prefix.
    async fn settle(
        &self,
        acks: Vec<(String, async_nats::jetstream::context::PublishAckFuture)>,
        failed: Option<String>,
    ) -> Result<usize, String> {
        let mut acknowledged = Vec::with_capacity(acks.len());
        let mut failure = failed;
        for (id, ack) in acks {
            match tokio::time::timeout(ACK_TIMEOUT, ack.into_future()).await {
                Ok(Ok(_)) => acknowledged.push(id),
                Ok(Err(err)) => {
                    failure = Some(crate::error_chain(&err));
                    break;
                }
                Err(_) => {
                    failure = Some(format!("no acknowledgement within {ACK_TIMEOUT:?}"));
                    break;
                }
            }
        }
        self.outbox.lock().acknowledged(&acknowledged);
        match failure {
            Some(reason) => Err(reason),
            None => Ok(acknowledged.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: usize, size: usize) -> Outgoing {
        Outgoing {
            subject: "s".into(),
            id: format!("{n}"),
            payload: "x".repeat(size),
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_and_the_file_keeps_what_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut queue = Queue {
            messages: VecDeque::new(),
            bytes: 0,
            max_bytes: 300,
            file: Some(path.clone()),
            removed_since_rewrite: 0,
            stats: OutboxStats::default(),
        };
        for n in 0..5 {
            queue.push(message(n, 100));
        }
        assert_eq!(queue.stats.dropped, 3);
        let ids: Vec<&str> = queue.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["3", "4"]);
        assert_eq!(queue.stats.acknowledged, 0);
        queue.acknowledged(&["0".into(), "1".into(), "2".into(), "3".into()]);
        // Not rewritten yet (little removed): a restart may send 0..4 again,
        // which the stream drops by id.
        assert_eq!(load(&path).len(), 5);
        queue.acknowledged(&["4".into()]);
        assert!(queue.messages.is_empty());
        assert!(load(&path).is_empty(), "emptied once nothing waits");
        queue.push(message(9, 10));
        let reloaded: Vec<String> = load(&path).into_iter().map(|m| m.id).collect();
        assert_eq!(reloaded, ["9"]);
    }
}
