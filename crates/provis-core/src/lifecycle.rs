//! How a running part of provis (a master, a minion) owns its tasks and
//! stops: first it stops taking work, then it lets the work in flight
//! finish within a deadline, then its background tasks flush and end.
//!
//! Every task of a part is spawned through its [`Lifecycle`] and tracked,
//! so nothing runs detached: [`Lifecycle::spawn_work`] for work a caller
//! waits on (a call, a request, an apply), [`Lifecycle::spawn_background`]
//! for loops that live as long as the part (followers, forwarders, servers).
//! A background loop ends when [`Lifecycle::stopping`] fires, or, if it
//! must outlive the work in flight (an event forwarder that in-flight calls
//! still feed), when [`Lifecycle::closing`] fires.
//!
//! The part's main task runs [`Lifecycle::drain`] once it has stopped
//! taking work, then says goodbye (marks itself stopped, flushes its
//! connection); [`PartHandle`] is what `start` returns to whoever runs the
//! part.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// The tasks of one running part and the signals that stop them.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// Fired first: stop taking work.
    stop: CancellationToken,
    /// Fired once the work in flight finished (or its deadline passed).
    close: CancellationToken,
    work: TaskTracker,
    background: TaskTracker,
}

/// What was still running when a drain's deadline passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Work tasks abandoned at the deadline.
    pub work_left: usize,
    /// Background tasks still running at the deadline.
    pub background_left: usize,
}

impl DrainReport {
    /// True when everything ended in time.
    pub fn complete(&self) -> bool {
        self.work_left == 0 && self.background_left == 0
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` as work in flight: a drain waits for it.
    pub fn spawn_work<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.work.spawn(task)
    }

    /// Runs `task` for as long as the part lives; it must end on
    /// [`Self::stopping`] or [`Self::closing`].
    pub fn spawn_background<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.background.spawn(task)
    }

    /// Asks the part to stop taking work (idempotent).
    pub fn request_stop(&self) {
        self.stop.cancel();
    }

    /// Resolves once the part is asked to stop.
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// A guard that asks the part to stop when dropped: held while a part
    /// starts, so a start that fails or is abandoned leaves nothing running;
    /// disarmed once the part runs.
    pub fn stop_on_drop(&self) -> tokio_util::sync::DropGuard {
        self.stop.clone().drop_guard()
    }

    /// An owned copy of the stop signal, for tasks that outlive a borrow.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves once the work in flight is done: time to flush and end.
    pub fn closing(&self) -> WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    /// An owned copy of the close signal.
    pub fn close_token(&self) -> CancellationToken {
        self.close.clone()
    }

    /// Work tasks running now.
    pub fn work_in_flight(&self) -> usize {
        self.work.len()
    }

    /// Stops taking work (if not yet), waits for the work in flight, then
    /// signals [`Self::closing`] and waits for the background tasks, all
    /// within `deadline` (the background gets at least a second to flush).
    /// Called once, by the part's main task.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        let started = tokio::time::Instant::now();
        self.stop.cancel();
        self.work.close();
        let work_done = tokio::time::timeout(deadline, self.work.wait())
            .await
            .is_ok();
        let work_left = if work_done { 0 } else { self.work.len() };
        self.close.cancel();
        self.background.close();
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        let background_done = tokio::time::timeout(left, self.background.wait())
            .await
            .is_ok();
        let background_left = if background_done {
            0
        } else {
            self.background.len()
        };
        DrainReport {
            work_left,
            background_left,
        }
    }
}

/// How long a goodbye may take to reach the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends what is still buffered on `nats` to the server and, when the part
/// owns the connection, drains it (its subscriptions end, then it closes).
/// `drain` only asks for that, so the flush comes first: a process that
/// exits right after still got its last messages out.
pub async fn close_connection(nats: &async_nats::Client, owned: bool) {
    if let Err(err) = tokio::time::timeout(FLUSH_TIMEOUT, nats.flush())
        .await
        .unwrap_or(Ok(()))
    {
        tracing::debug!(error = %err, "last messages not flushed");
    }
    if owned && let Err(err) = nats.drain().await {
        tracing::debug!(error = %err, "connection not drained");
    }
}

/// A running part as its starter holds it: stop it (and wait until it
/// drained and said goodbye), or just wait until it ends. `C` is what else
/// the part can be told while it runs (the master takes new settings).
#[derive(Debug)]
pub struct PartHandle<C = ()> {
    name: String,
    lifecycle: Lifecycle,
    main: JoinHandle<()>,
    control: C,
}

impl<C> PartHandle<C> {
    /// `main` is the part's main task: it returns once the part drained.
    pub fn new(
        name: impl Into<String>,
        lifecycle: Lifecycle,
        main: JoinHandle<()>,
        control: C,
    ) -> Self {
        Self {
            name: name.into(),
            lifecycle,
            main,
            control,
        }
    }

    /// The part's name (a minion's id, `master`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the part takes while it runs.
    pub fn control(&self) -> &C {
        &self.control
    }

    /// Asks the part to stop without waiting.
    pub fn request_stop(&self) {
        self.lifecycle.request_stop();
    }

    /// Stops the part: it takes no more work, lets the work in flight
    /// finish, says goodbye, and ends; returns once it has.
    pub async fn stop(self) {
        self.lifecycle.request_stop();
        self.wait().await;
    }

    /// Waits until the part ends (after a stop, or on its own).
    pub async fn wait(self) {
        if let Err(err) = self.main.await {
            tracing::error!(part = %self.name, error = %err, "the part's main task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn work_finishes_before_background_closes() {
        let lifecycle = Lifecycle::new();
        let work_done = Arc::new(AtomicBool::new(false));
        let seen_by_background = Arc::new(AtomicBool::new(false));
        {
            let done = work_done.clone();
            lifecycle.spawn_work(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                done.store(true, Ordering::SeqCst);
            });
        }
        {
            let (life, done, seen) = (
                lifecycle.clone(),
                work_done.clone(),
                seen_by_background.clone(),
            );
            lifecycle.spawn_background(async move {
                life.closing().await;
                seen.store(done.load(Ordering::SeqCst), Ordering::SeqCst);
            });
        }
        let report = lifecycle.drain(Duration::from_secs(5)).await;
        assert!(report.complete(), "{report:?}");
        assert!(seen_by_background.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_drain_gives_up_at_its_deadline_and_says_what_was_left() {
        let lifecycle = Lifecycle::new();
        lifecycle.spawn_work(std::future::pending::<()>());
        let report = lifecycle.drain(Duration::from_millis(50)).await;
        assert_eq!(report.work_left, 1);
        assert!(!report.complete());
    }
}
