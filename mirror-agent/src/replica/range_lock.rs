//! A FIFO range lock: an operation on `[start, end)` waits for every earlier
//! registered operation overlapping it to release.
//!
//! Registration is synchronous and takes the arrival order, so callers
//! register in the order that must be kept (the active node in client arrival
//! order, the standby in `seq` order) and wait afterwards. Releasing is
//! dropping the guard (also on cancellation or panic), so a lost guard can
//! never wedge the range.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

// No channel per range: a range's waiters park their wakers on the held
// entry they wait for, and the release wakes them. An operation used to
// allocate a `watch` channel and notify its eight-way waiter list on
// release, on both nodes, for every write; overlaps are rare, so the common
// case is now one lock to register and one to release, with no allocation
// (bench/HISTORY.md, "Per-write CPU of the replicated write path").
#[derive(Debug)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    /// Tasks waiting for this range's release (later, overlapping ranges).
    waiters: Vec<Waker>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// Registered ranges (held or waiting), not in any order.
    held: Vec<Held>,
}

/// See the module docs.
#[derive(Debug, Clone, Default)]
pub(crate) struct RangeLock {
    state: Arc<Mutex<State>>,
}

/// A registered range still waiting for overlapping predecessors.
#[derive(Debug)]
pub(crate) struct PendingRange {
    start: u64,
    end: u64,
    guard: RangeGuard,
}

/// Holds a range; dropping it releases the range.
#[derive(Debug)]
pub(crate) struct RangeGuard {
    state: Arc<Mutex<State>>,
    id: u64,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // The state is a plain list; a panic elsewhere cannot leave it torn.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RangeLock {
    /// Registers `[offset, offset + len)` behind every overlapping range
    /// registered before. A zero-length range overlaps nothing.
    pub(crate) fn register(&self, offset: u64, len: u64) -> PendingRange {
        let end = offset.saturating_add(len);
        let mut st = lock(&self.state);
        st.next_id += 1;
        let id = st.next_id;
        if len > 0 {
            st.held.push(Held {
                id,
                start: offset,
                end,
                waiters: Vec::new(),
            });
        }
        PendingRange {
            start: offset,
            end,
            guard: RangeGuard {
                state: self.state.clone(),
                id,
            },
        }
    }

    /// Number of registered ranges (held or waiting).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).held.len()
    }
}

impl PendingRange {
    /// Waits until every overlapping predecessor released its range.
    pub(crate) async fn acquire(self) -> RangeGuard {
        poll_fn(|cx| self.poll_free(cx)).await;
        self.guard
    }

    /// Ready once no range registered before this one (a smaller id) and
    /// overlapping it is still registered; ids only grow, so these are exactly
    /// the overlapping ranges that were registered when this one was.
    /// Otherwise parks the task on the first such range found: its release
    /// wakes the task, which then looks again.
    fn poll_free(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.start == self.end {
            return Poll::Ready(());
        }
        let id = self.guard.id;
        let mut st = lock(&self.guard.state);
        let blocker = st
            .held
            .iter_mut()
            .find(|h| h.id < id && h.start < self.end && self.start < h.end);
        match blocker {
            None => Poll::Ready(()),
            Some(h) => {
                if !h.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    h.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let waiters = {
            let mut st = lock(&self.state);
            match st.held.iter().position(|h| h.id == self.id) {
                Some(i) => st.held.swap_remove(i).waiters,
                None => Vec::new(),
            }
        };
        // Woken outside the lock: a woken task may run at once elsewhere.
        for w in waiters {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_waits_in_order_disjoint_does_not() {
        let l = RangeLock::default();
        let a = l.register(0, 10).acquire().await;
        let b = l.register(5, 10);
        let c = l.register(100, 1).acquire().await; // disjoint: immediate
        let d = l.register(12, 1); // overlaps b only
        let mut b = Box::pin(b.acquire());
        assert!(futures_poll(&mut b).is_none(), "b must wait for a");
        let mut d = Box::pin(d.acquire());
        assert!(futures_poll(&mut d).is_none(), "d must wait for b");
        drop(a);
        let b = b.await;
        assert!(futures_poll(&mut d).is_none(), "d still waits for b");
        drop(b);
        drop(d.await);
        drop(c);
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn zero_length_inside_a_held_range_does_not_wait() {
        let l = RangeLock::default();
        let _a = l.register(0, 10);
        let mut z = Box::pin(l.register(5, 0).acquire());
        assert!(futures_poll(&mut z).is_some());
    }

    #[tokio::test]
    async fn waits_for_every_overlapping_predecessor() {
        let l = RangeLock::default();
        let a = l.register(0, 10).acquire().await;
        let b = l.register(20, 10).acquire().await;
        let mut c = Box::pin(l.register(5, 20).acquire()); // overlaps a and b
        assert!(futures_poll(&mut c).is_none());
        drop(b);
        assert!(futures_poll(&mut c).is_none(), "c still waits for a");
        drop(a);
        drop(c.await);
        assert_eq!(l.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_dropped_while_waiting_releases_its_range() {
        let l = RangeLock::default();
        let a = l.register(0, 10).acquire().await;
        let mut b = Box::pin(l.register(0, 10).acquire());
        assert!(futures_poll(&mut b).is_none());
        let mut c = Box::pin(l.register(0, 10).acquire());
        assert!(futures_poll(&mut c).is_none());
        drop(b); // cancelled: its range goes, c now waits for a only
        assert!(futures_poll(&mut c).is_none());
        drop(a);
        drop(c.await);
        assert_eq!(l.len(), 0);
    }

    /// Many tasks on a multi-thread runtime, registered in order on a small
    /// space so that most overlap: no two overlapping ranges are ever held at
    /// once, overlapping ones are taken in registration order, and every
    /// wake-up arrives (the test would hang otherwise).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_overlaps_keep_order_and_exclusion() {
        let l = RangeLock::default();
        let held: Arc<Mutex<Vec<(u64, u64, usize)>>> = Arc::default();
        let taken: Arc<Mutex<Vec<usize>>> = Arc::default();
        let mut ranges = Vec::new();
        let mut tasks = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..400usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (start, len) = (x % 64, 1 + (x >> 8) % 8);
            ranges.push((start, start + len));
            let pending = l.register(start, len);
            let (held, taken) = (held.clone(), taken.clone());
            tasks.push(tokio::spawn(async move {
                let guard = pending.acquire().await;
                {
                    let mut h = held.lock().unwrap();
                    for &(s, e, j) in h.iter() {
                        assert!(
                            e <= start || start + len <= s,
                            "{i} and {j} overlap, both held"
                        );
                    }
                    h.push((start, start + len, i));
                }
                taken.lock().unwrap().push(i);
                tokio::task::yield_now().await;
                held.lock().unwrap().retain(|&(_, _, j)| j != i);
                drop(guard);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let taken = taken.lock().unwrap();
        assert_eq!(taken.len(), 400);
        let mut pos = vec![0; 400];
        for (p, &i) in taken.iter().enumerate() {
            pos[i] = p;
        }
        for i in 0..400 {
            for j in i + 1..400 {
                let ((a, b), (c, d)) = (ranges[i], ranges[j]);
                if a < d && c < b {
                    assert!(pos[i] < pos[j], "{j} overlaps {i} but was taken first");
                }
            }
        }
        assert_eq!(l.len(), 0);
    }

    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
