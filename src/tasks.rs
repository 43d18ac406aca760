//! The daemon's background work, owned: every task that outlives the request that started it
//! (token refresh, the push queue, the site's listeners, downloads into the cache, lookahead
//! and prefetch walks, the watchdog) is spawned here, so shutdown can tell them to stop and
//! wait for them, instead of leaving them to the runtime's drop.
//!
//! Two kinds: [`Tasks::spawn`] for work that should finish if it can (a download whose bytes
//! the cache will keep), which shutdown waits for until its deadline; [`Tasks::spawn_until_stopped`]
//! for work that is only worth doing while the daemon serves (a walk ahead of Nix, a refresh
//! loop), which ends as soon as shutdown starts. Tasks that feed one response (a file's chunks,
//! a progress stream) are not here: they end when their receiver, which the response's
//! connection owns, is dropped.

use std::future::Future;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `work` to its end; shutdown waits for it (up to its deadline).
    pub fn spawn<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(work);
    }

    /// Runs `work` until it ends or shutdown starts, whichever is first.
    pub fn spawn_until_stopped<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = work => {}
                () = stop.cancelled() => {}
            }
        });
    }

    /// Resolves once shutdown has started (for loops that stop between steps).
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        self.stop.clone().cancelled_owned()
    }

    /// Tells every task to stop: discardable work ends now, and no new task is taken after
    /// those already running.
    pub fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
    }

    /// Waits for every task until `deadline` (after [`Tasks::stop`]); whether all ended.
    pub async fn wait(&self, deadline: Instant) -> bool {
        let ended = tokio::time::timeout_at(deadline.into(), self.tracker.wait())
            .await
            .is_ok();
        if !ended {
            tracing::warn!(
                tasks = self.tracker.len(),
                "background work still running at the end of the shutdown grace; abandoned"
            );
        }
        ended
    }

    /// How many tasks are running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn stop_ends_discardable_work_at_once_and_waits_for_the_rest() {
        let tasks = Tasks::new();
        let finished = Arc::new(AtomicBool::new(false));
        tasks.spawn_until_stopped(std::future::pending());
        let done = finished.clone();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            done.store(true, Ordering::SeqCst);
        });
        let stopping = tasks.stopping();
        tasks.spawn(stopping);
        assert_eq!(tasks.running(), 3);
        let deadline = Instant::now() + Duration::from_secs(5);
        tasks.stop();
        assert!(tasks.wait(deadline).await, "every task ended");
        assert!(
            finished.load(Ordering::SeqCst),
            "work to finish was waited for"
        );
        assert_eq!(tasks.running(), 0);
    }

    #[tokio::test]
    async fn stop_gives_up_at_the_deadline() {
        let tasks = Tasks::new();
        tasks.spawn(std::future::pending());
        let deadline = Instant::now() + Duration::from_millis(50);
        tasks.stop();
        assert!(!tasks.wait(deadline).await);
        assert_eq!(tasks.running(), 1);
    }
}
