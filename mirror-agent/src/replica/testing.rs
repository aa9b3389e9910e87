//! Test support for the replication path: [`GatedEngine`], a wrapper engine
//! whose modifying requests and flushes can be held at a gate (a stalled
//! standby disk) or delayed (reordering completions), while it counts what it
//! held and applied. The wrapped engine does the real I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::link::lock;
use crate::engine::{BlockEngine, EngineFuture};

type DelayFn = Box<dyn FnMut() -> Duration + Send>;

struct Shared {
    inner: Arc<dyn BlockEngine>,
    writes_open: watch::Sender<bool>,
    flushes_open: watch::Sender<bool>,
    held: watch::Sender<usize>,
    applied: AtomicU64,
    flushed: AtomicU64,
    delay: Mutex<Option<DelayFn>>,
}

/// See the module docs. Clones share the gates and counters.
#[derive(Clone)]
pub struct GatedEngine {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for GatedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatedEngine")
            .field("held", &self.held())
            .field("applied", &self.applied())
            .finish()
    }
}

impl GatedEngine {
    /// Wraps `inner`; both gates open, no delay.
    pub fn new(inner: Arc<dyn BlockEngine>) -> GatedEngine {
        GatedEngine {
            sh: Arc::new(Shared {
                inner,
                writes_open: watch::channel(true).0,
                flushes_open: watch::channel(true).0,
                held: watch::channel(0).0,
                applied: AtomicU64::new(0),
                flushed: AtomicU64::new(0),
                delay: Mutex::new(None),
            }),
        }
    }

    /// Holds (or releases) modifying requests (write, discard, write-zeroes).
    pub fn set_writes_open(&self, open: bool) {
        self.sh.writes_open.send_replace(open);
    }

    /// Holds (or releases) flushes.
    pub fn set_flushes_open(&self, open: bool) {
        self.sh.flushes_open.send_replace(open);
    }

    /// Every modifying request first sleeps for `f()` (after the gate).
    pub fn set_delay(&self, f: impl FnMut() -> Duration + Send + 'static) {
        *lock(&self.sh.delay) = Some(Box::new(f));
    }

    /// Requests waiting at a gate now.
    pub fn held(&self) -> usize {
        *self.sh.held.borrow()
    }

    /// Waits until at least `n` requests wait at a gate.
    pub async fn wait_held(&self, n: usize) {
        let mut rx = self.sh.held.subscribe();
        let _ = rx.wait_for(|h| *h >= n).await;
    }

    /// Modifying requests that completed successfully in the inner engine.
    pub fn applied(&self) -> u64 {
        self.sh.applied.load(Ordering::SeqCst)
    }

    /// Flushes that completed successfully in the inner engine.
    pub fn flushed(&self) -> u64 {
        self.sh.flushed.load(Ordering::SeqCst)
    }

    fn modify(
        &self,
        op: impl FnOnce(&dyn BlockEngine) -> EngineFuture<()> + Send + 'static,
    ) -> EngineFuture<()> {
        let sh = self.sh.clone();
        Box::pin(async move {
            pass(&sh, &sh.writes_open).await;
            let d = lock(&sh.delay).as_mut().map(|f| f());
            if let Some(d) = d.filter(|d| !d.is_zero()) {
                tokio::time::sleep(d).await;
            }
            op(&*sh.inner).await?;
            sh.applied.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

async fn pass(sh: &Shared, gate: &watch::Sender<bool>) {
    let mut rx = gate.subscribe();
    if *rx.borrow() {
        return;
    }
    sh.held.send_modify(|h| *h += 1);
    let _ = rx.wait_for(|open| *open).await;
    sh.held.send_modify(|h| *h -= 1);
}

impl BlockEngine for GatedEngine {
    fn size(&self) -> u64 {
        self.sh.inner.size()
    }

    fn name(&self) -> &'static str {
        "gated"
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        self.sh.inner.read(offset, len)
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        self.modify(move |e| e.write(offset, data, fua))
    }

    fn flush(&self) -> EngineFuture<()> {
        let sh = self.sh.clone();
        Box::pin(async move {
            pass(&sh, &sh.flushes_open).await;
            sh.inner.flush().await?;
            sh.flushed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        self.modify(move |e| e.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        self.modify(move |e| e.write_zeroes(offset, len, may_trim, fua))
    }
}
