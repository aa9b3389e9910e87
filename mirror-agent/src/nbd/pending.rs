//! A set of in-flight request futures polled by the connection task itself
//! (what `futures::stream::FuturesUnordered` does, reduced to what the
//! connection needs).
//!
//! Why not one spawned task per request: on the multi-thread runtime every
//! request task, and the writer it hands its reply to, is a separate runnable
//! task; whenever two become runnable at once on a worker, tokio wakes a
//! parked worker to steal one (a `futex` wake and, shortly after, a `futex`
//! wait when it parks again). With 32 requests in flight that happened more
//! than once per request (bench/HISTORY.md). Here a completion wakes only the
//! connection task, once per batch, and only the futures that were woken are
//! polled again.

use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use crate::engine::BlockEngine;

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the per-future wakers share with the set.
#[derive(Default)]
struct Shared {
    /// Slots woken since the set last looked.
    ready: Mutex<Vec<usize>>,
    /// The task polling the set.
    parent: Mutex<Option<Waker>>,
}

/// Waker of one slot. Reused by later futures in the same slot: a late wake
/// from an earlier occupant only causes one spurious poll.
struct SlotWaker {
    idx: usize,
    /// Already in `ready` (avoids queueing a slot twice).
    queued: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        lock(&self.shared.ready).push(self.idx);
        // Cloned out so the parent is not woken under the lock.
        let parent = lock(&self.shared.parent).clone();
        if let Some(w) = parent {
            w.wake();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded data are plain lists; a panic elsewhere cannot leave them
    // inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Slot<T> {
    fut: Option<BoxFut<T>>,
    waker: Arc<SlotWaker>,
    /// `Waker` of `waker`, built once per slot.
    handle: Waker,
}

/// In-flight futures, each polled only after its own waker fired.
pub(crate) struct Pending<T> {
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
    /// Woken slots taken from `shared.ready`, not polled yet.
    batch: Vec<usize>,
    len: usize,
    shared: Arc<Shared>,
    /// The engine of the connection polling the set
    /// ([`Pending::serve_engine`]).
    engine: Option<Arc<dyn BlockEngine>>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            slots: Vec::new(),
            free: Vec::new(),
            batch: Vec::new(),
            len: 0,
            shared: Arc::default(),
            engine: None,
        }
    }
}

impl<T> Pending<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks the set as an NBD connection's requests on `engine`. Then:
    /// - their inline writes on `engine` may block the worker plainly while
    ///   they are polled (`engine::allow_plain`), in each pass where the
    ///   engine says so (`BlockEngine::plain_inline_writes`, asked per pass:
    ///   it can change its mind, after a disk error): the only task they woke
    ///   before is the connection's reply writer;
    /// - a request polled alone in the set is marked lone
    ///   (`engine::lone_request`), so that its small write may go behind.
    pub(crate) fn serve_engine(&mut self, engine: Arc<dyn BlockEngine>) {
        self.engine = Some(engine);
    }

    /// Adds a future; it is polled on the next [`Pending::next`].
    pub(crate) fn push(&mut self, fut: BoxFut<T>) {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let idx = self.slots.len();
                let waker = Arc::new(SlotWaker {
                    idx,
                    queued: AtomicBool::new(false),
                    shared: Arc::clone(&self.shared),
                });
                let handle = Waker::from(Arc::clone(&waker));
                self.slots.push(Slot {
                    fut: None,
                    waker,
                    handle,
                });
                idx
            }
        };
        self.slots[idx].fut = Some(fut);
        self.len += 1;
        // Queued as woken so that it is polled a first time (without waking
        // the parent: it is the caller, and polls the set next anyway).
        let w = &self.slots[idx].waker;
        if !w.queued.swap(true, Ordering::AcqRel) {
            lock(&self.shared.ready).push(idx);
        }
    }

    /// Drops every future (their requests' outcome is then unspecified, as
    /// for aborted tasks).
    pub(crate) fn clear(&mut self) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.fut.take().is_some() {
                self.free.push(i);
            }
        }
        self.len = 0;
    }

    /// Output of the next future to complete; `None` once the set is empty.
    pub(crate) fn next(&mut self) -> impl Future<Output = Option<T>> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if self.len == 0 {
            return Poll::Ready(None);
        }
        {
            let mut p = lock(&self.shared.parent);
            if !p.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *p = Some(cx.waker().clone());
            }
        }
        // io_uring SQEs of the futures polled in this pass go to the kernel
        // in one submission when the pass ends (see `engine::Plug`).
        let _plug = crate::engine::plug();
        let plain = self
            .engine
            .as_ref()
            .is_some_and(|e| e.plain_inline_writes());
        let _plain = plain.then(crate::engine::allow_plain);
        // A request alone on the connection: an O_DIRECT engine may answer
        // its small write from the page cache (`engine::behind`), also the
        // local write of a replicated one (it runs while the frame goes to
        // the peer; bench/HISTORY.md, "Write-behind of lone small writes").
        let _lone = (self.engine.is_some() && self.len == 1).then(crate::engine::lone_request);
        // Bounded, so futures that keep waking themselves (coop budget) do
        // not starve the rest of the connection task.
        let mut polls = 0;
        loop {
            let Some(idx) = self.batch.pop() else {
                std::mem::swap(&mut self.batch, &mut lock(&self.shared.ready));
                if self.batch.is_empty() {
                    return Poll::Pending;
                }
                // Oldest wake first.
                self.batch.reverse();
                continue;
            };
            if polls > 2 * self.slots.len() {
                self.batch.push(idx);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let slot = &mut self.slots[idx];
            // Cleared before polling: a wake during the poll queues it again.
            slot.waker.queued.store(false, Ordering::Release);
            let Some(fut) = slot.fut.as_mut() else {
                continue; // late wake of a finished occupant
            };
            polls += 1;
            let mut scx = Context::from_waker(&slot.handle);
            // A panicking request ends alone, as a panicking task would: it
            // is logged and gets no reply; the connection goes on.
            let polled = panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut scx)));
            let out = match polled {
                Ok(Poll::Pending) => continue,
                Ok(Poll::Ready(v)) => Some(v),
                Err(_) => {
                    tracing::error!("NBD request panicked; it gets no reply");
                    None
                }
            };
            slot.fut = None;
            self.free.push(idx);
            self.len -= 1;
            if let Some(v) = out {
                return Poll::Ready(Some(v));
            }
            if self.len == 0 {
                return Poll::Ready(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn completes_in_wake_order_and_reuses_slots() {
        let mut p: Pending<u32> = Pending::default();
        assert!(p.next().await.is_none());
        let mut txs = Vec::new();
        for i in 0..4u32 {
            let (tx, rx) = oneshot::channel::<u32>();
            txs.push(tx);
            p.push(Box::pin(async move { rx.await.unwrap() + i * 100 }));
        }
        assert_eq!(p.len(), 4);
        // Nothing ready yet: the first polls register the wakers.
        let pending = std::future::poll_fn(|cx| Poll::Ready(p.poll_next(cx).is_pending())).await;
        assert!(pending);
        let tx2 = txs.remove(2);
        tx2.send(7).unwrap();
        assert_eq!(p.next().await, Some(207));
        assert_eq!(p.len(), 3);
        // The freed slot is reused.
        p.push(Box::pin(async { 5 }));
        assert_eq!(p.next().await, Some(5));
        for (i, tx) in txs.into_iter().enumerate() {
            tx.send(i as u32).unwrap();
        }
        let mut got = Vec::new();
        while let Some(v) = p.next().await {
            got.push(v);
        }
        got.sort();
        assert_eq!(got, vec![0, 101, 302]);
        assert!(p.is_empty());
    }

    #[tokio::test]
    async fn wakes_from_another_thread() {
        let mut p: Pending<u32> = Pending::default();
        let (tx, rx) = oneshot::channel::<u32>();
        p.push(Box::pin(async move { rx.await.unwrap() }));
        let t = std::thread::spawn(move || tx.send(9).unwrap());
        assert_eq!(p.next().await, Some(9));
        t.join().unwrap();
    }

    #[tokio::test]
    async fn a_panicking_future_is_dropped_alone() {
        let mut p: Pending<u32> = Pending::default();
        p.push(Box::pin(async { panic!("request bug") }));
        p.push(Box::pin(async { 3 }));
        assert_eq!(p.next().await, Some(3));
        assert!(p.is_empty());
        assert!(p.next().await.is_none());
    }

    /// A future polled while it is the only one in the set sees the
    /// lone-request mark (`engine::behind`), one polled with others does not;
    /// and only for a connection that named its engine.
    #[tokio::test]
    async fn the_only_request_in_flight_is_polled_as_lone() {
        use crate::engine::behind::is_lone;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        crate::engine::create_data_file(&path, 1 << 20).unwrap();
        let engine = crate::engine::open(&path, &Default::default()).unwrap();

        let mut p: Pending<bool> = Pending::default();
        p.push(Box::pin(async { is_lone() }));
        assert_eq!(p.next().await, Some(false), "no engine named: never lone");

        p.serve_engine(engine);
        p.push(Box::pin(async { is_lone() }));
        assert_eq!(p.next().await, Some(true), "alone in the set");

        let (tx, rx) = oneshot::channel::<()>();
        p.push(Box::pin(async move {
            rx.await.unwrap();
            is_lone()
        }));
        p.push(Box::pin(async { is_lone() }));
        assert_eq!(p.next().await, Some(false), "two in the set");
        tx.send(()).unwrap();
        assert_eq!(p.next().await, Some(true), "the other one, now alone");
        assert!(!is_lone(), "the mark ends with the polling pass");
    }

    #[tokio::test]
    async fn clear_drops_futures() {
        let mut p: Pending<u32> = Pending::default();
        let (tx, rx) = oneshot::channel::<u32>();
        p.push(Box::pin(async move { rx.await.unwrap_or(0) }));
        p.clear();
        assert!(p.is_empty());
        assert!(tx.is_closed());
        assert!(p.next().await.is_none());
    }
}
