//! Status change notification: what `mdctrl status --watch` and
//! `mdctrl recover --wait` wait on instead of polling.
//!
//! Every state change a status would show (peer connected or lost, peer
//! state, resync started/finished/failed, activation, deactivation, a mirror
//! break) calls [`Changes::bump`]: a version number goes up and every waiter
//! wakes. A client passes the version it last saw; [`Changes::wait_past`]
//! returns at once if the version moved since, so a change between two
//! requests is never missed. Progress counters (bytes copied, I/O counts)
//! move without a bump: watchers re-read the status on their own timeout.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// Version counter + wake-up for one resource's status.
#[derive(Debug, Default)]
pub struct Changes {
    version: AtomicU64,
    notify: Notify,
}

impl Changes {
    /// A counter at version 0.
    pub fn new() -> Changes {
        Changes::default()
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Something a status shows changed: bump the version, wake every waiter.
    pub fn bump(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// A future completing at the next [`Changes::bump`]; enable it (pinned)
    /// before checking a condition so that a bump in between is not lost.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Wait until the version differs from `seen` or `deadline` passes;
    /// returns the version then.
    pub async fn wait_past(&self, seen: u64, deadline: tokio::time::Instant) -> u64 {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check: a bump after it wakes us.
            notified.as_mut().enable();
            let now = self.version();
            if now != seen {
                return now;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.version();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn returns_at_once_when_the_version_moved() {
        let c = Changes::new();
        c.bump();
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        assert_eq!(c.wait_past(0, far).await, 1);
    }

    #[tokio::test]
    async fn wakes_on_bump_and_times_out_without_one() {
        let c = Arc::new(Changes::new());
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        assert_eq!(
            c.wait_past(0, soon).await,
            0,
            "no bump: the deadline ends the wait"
        );
        let c2 = c.clone();
        let waiter = tokio::spawn(async move {
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            c2.wait_past(0, far).await
        });
        tokio::task::yield_now().await;
        c.bump();
        let v = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("a bump wakes the waiter")
            .unwrap();
        assert_eq!(v, 1);
    }
}
