//! Stall detection: [`IoWatch`] tells how long a device has had requests
//! pending without completing any of them; [`Timed`] is a [`BlockEngine`]
//! that reports its requests to one.
//!
//! A disk that stops answering fails nothing: every request just waits. A
//! node whose data disk or cluster partition stalls would otherwise say
//! GREEN while its clients hang. The status shows the stall once it lasts
//! `timeouts.io_stall` (`disk.io_stalled_secs`, `disk.metadata_stalled_secs`).
//!
//! What counts is progress, not the age of one request: with requests
//! pending, the time since the last completion (or since the device went
//! from idle to busy, if later). A slow but working disk under a deep queue
//! completes something all the time and never shows as stalled; one request
//! that waits longer than the threshold on an otherwise idle device does.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{BlockEngine, EngineFuture, Extent};

/// Pending requests and the time of the last progress of one device. Two
/// atomic updates and one clock read per request.
#[derive(Debug)]
pub struct IoWatch {
    base: Instant,
    pending: AtomicUsize,
    /// Microseconds after `base` when `pending` last left zero (set before
    /// the increment, so a reader never pairs a new request with an old
    /// idle time: see [`IoWatch::begin`]).
    busy_since: AtomicU64,
    /// Microseconds after `base` of the last completion.
    last_done: AtomicU64,
}

impl Default for IoWatch {
    fn default() -> Self {
        IoWatch {
            base: Instant::now(),
            pending: AtomicUsize::new(0),
            busy_since: AtomicU64::new(0),
            last_done: AtomicU64::new(0),
        }
    }
}

/// One pending request; completes it when dropped (also when the request's
/// future is dropped unfinished: nothing waits for it any more).
#[derive(Debug)]
pub struct IoGuard(Arc<IoWatch>);

impl Drop for IoGuard {
    fn drop(&mut self) {
        let w = &self.0;
        // Progress first, then the count: a reader that still sees this
        // request pending also sees the fresh completion time.
        w.last_done.store(w.now_us(), Ordering::Release);
        w.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl IoWatch {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// A request starts. If the device looks idle, the busy time is set
    /// before the count rises. When the count rises from zero without this
    /// thread having seen it at zero, a completion brought it there just
    /// before, and that completion's time is as recent.
    pub fn begin(self: &Arc<Self>) -> IoGuard {
        if self.pending.load(Ordering::Acquire) == 0 {
            self.busy_since.store(self.now_us(), Ordering::Release);
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        IoGuard(self.clone())
    }

    /// Requests pending now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// With requests pending: how long none of them has completed (since
    /// the last completion, or since the device became busy if that is
    /// later). `None` while idle.
    pub fn without_progress(&self) -> Option<Duration> {
        if self.pending() == 0 {
            return None;
        }
        let since = self
            .busy_since
            .load(Ordering::Acquire)
            .max(self.last_done.load(Ordering::Acquire));
        Some(Duration::from_micros(self.now_us().saturating_sub(since)))
    }

    /// Whole seconds without progress once they reach `threshold`, for
    /// status; `None` below it and while idle.
    pub fn stalled_secs(&self, threshold: Duration) -> Option<u64> {
        self.without_progress()
            .filter(|d| *d >= threshold)
            .map(|d| d.as_secs())
    }
}

/// [`Stall::what`] of the data disk (also in status and the control message
/// `NodeState::stalled`).
pub const DATA_DISK: &str = "data disk";
/// [`Stall::what`] of the cluster partition.
pub const CLUSTER_PARTITION: &str = "cluster partition";

/// The two devices of a resource on a node, watched for stalls with one
/// threshold (`timeouts.io_stall`).
#[derive(Debug)]
pub struct Stalls {
    /// The data disk (every role's requests: [`Timed`] around its engine).
    pub data: Arc<IoWatch>,
    /// The cluster partition.
    pub metadata: Arc<IoWatch>,
    /// Requests pending with none completing for this long = stalled.
    pub threshold: Duration,
}

/// A stalled device of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// [`DATA_DISK`] or [`CLUSTER_PARTITION`].
    pub what: &'static str,
    /// Whole seconds without progress (at least the threshold).
    pub secs: u64,
    /// Requests pending on it.
    pub pending: usize,
}

impl Stalls {
    /// The data disk's stall, else the cluster partition's, if any.
    pub fn first(&self) -> Option<Stall> {
        [(&self.data, DATA_DISK), (&self.metadata, CLUSTER_PARTITION)]
            .into_iter()
            .find_map(|(w, what)| {
                w.stalled_secs(self.threshold).map(|secs| Stall {
                    what,
                    secs,
                    pending: w.pending(),
                })
            })
    }
}

/// A [`BlockEngine`] that passes every request to its inner engine and counts
/// it in an [`IoWatch`] from the call until its future completes or is
/// dropped. Requests and results are not changed.
#[derive(Clone)]
pub struct Timed {
    inner: Arc<dyn BlockEngine>,
    watch: Arc<IoWatch>,
}

impl std::fmt::Debug for Timed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timed")
            .field("inner", &self.inner.describe())
            .field("pending", &self.watch.pending())
            .finish()
    }
}

impl Timed {
    /// `inner`, reporting its requests to `watch`.
    pub fn new(inner: Arc<dyn BlockEngine>, watch: Arc<IoWatch>) -> Timed {
        Timed { inner, watch }
    }

    fn timed<T: Send + 'static>(&self, fut: EngineFuture<T>) -> EngineFuture<T> {
        let guard = self.watch.begin();
        Box::pin(async move {
            let res = fut.await;
            drop(guard);
            res
        })
    }
}

impl BlockEngine for Timed {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn plain_inline_writes(&self) -> bool {
        self.inner.plain_inline_writes()
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        self.timed(self.inner.read(offset, len))
    }

    fn read_bytes(&self, offset: u64, len: usize) -> EngineFuture<Bytes> {
        self.timed(self.inner.read_bytes(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        self.timed(self.inner.write(offset, data, fua))
    }

    fn flush(&self) -> EngineFuture<()> {
        self.timed(self.inner.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        self.timed(self.inner.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        self.timed(self.inner.write_zeroes(offset, len, may_trim, fua))
    }

    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<Extent>> {
        self.timed(self.inner.extents(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testing::MemEngine;

    #[test]
    fn idle_busy_and_progress() {
        let w = Arc::new(IoWatch::default());
        assert_eq!(w.without_progress(), None);
        let a = w.begin();
        let b = w.begin();
        assert_eq!(w.pending(), 2);
        std::thread::sleep(Duration::from_millis(30));
        let stalled = w.without_progress().expect("busy");
        assert!(stalled >= Duration::from_millis(30), "{stalled:?}");
        assert_eq!(w.stalled_secs(Duration::from_millis(20)), Some(0));
        assert_eq!(w.stalled_secs(Duration::from_secs(1)), None);
        // A completion is progress, although one request is still pending.
        drop(a);
        assert!(w.without_progress().expect("still busy") < Duration::from_millis(30));
        drop(b);
        assert_eq!(w.without_progress(), None);
        // Long idle, then a new request: measured from its start, not the
        // last completion.
        std::thread::sleep(Duration::from_millis(30));
        let _c = w.begin();
        assert!(w.without_progress().expect("busy") < Duration::from_millis(30));
    }

    #[tokio::test]
    async fn timed_engine_counts_until_completion_or_drop() {
        let w = Arc::new(IoWatch::default());
        let e = Timed::new(MemEngine::new(1 << 20), w.clone());
        let f = e.write(4096, Bytes::from(vec![7u8; 4096]), false);
        assert_eq!(w.pending(), 1, "counted from the call");
        f.await.unwrap();
        assert_eq!(w.pending(), 0);
        assert_eq!(e.read(4096, 4096).await.unwrap(), vec![7u8; 4096]);
        let f = e.flush();
        assert_eq!(w.pending(), 1);
        drop(f);
        assert_eq!(w.pending(), 0, "a dropped request is no longer pending");
    }
}
