//! A FIFO range lock: an operation on `[start, end)` waits for every earlier
//! registered operation overlapping it to release.
//!
//! Registration is synchronous and takes the arrival order, so callers
//! register in the order that must be kept (the active node in client arrival
//! order, the standby in `seq` order) and wait afterwards. Releasing is
//! dropping the guard (also on cancellation or panic), so a lost guard can
//! never wedge the range.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

#[derive(Debug)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    released: watch::Receiver<()>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
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
    waits: Vec<watch::Receiver<()>>,
    guard: RangeGuard,
}

/// Holds a range; dropping it releases the range.
#[derive(Debug)]
pub(crate) struct RangeGuard {
    state: Arc<Mutex<State>>,
    id: u64,
    _release: watch::Sender<()>,
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
        let (tx, rx) = watch::channel(());
        let mut st = lock(&self.state);
        let waits = st
            .held
            .iter()
            .filter(|h| len > 0 && h.start < end && offset < h.end)
            .map(|h| h.released.clone())
            .collect();
        st.next_id += 1;
        let id = st.next_id;
        if len > 0 {
            st.held.push(Held {
                id,
                start: offset,
                end,
                released: rx,
            });
        }
        PendingRange {
            waits,
            guard: RangeGuard {
                state: self.state.clone(),
                id,
                _release: tx,
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
        for mut w in self.waits {
            // `changed` fails once the predecessor's guard (the sender) is dropped.
            while w.changed().await.is_ok() {}
        }
        self.guard
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        if let Some(i) = st.held.iter().position(|h| h.id == self.id) {
            st.held.swap_remove(i);
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

    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
