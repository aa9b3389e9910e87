//! Ordering application writes with resync copies on the source.
//!
//! While a resync runs from the active node, the volume keeps serving but is
//! not replicating: application writes land locally only. A copy of region R
//! read before a write to R would leave the target with older data than the
//! source (design notes property 5). [`GatedVolume`] wraps the served volume:
//! every modifying request holds the gate shared for its whole duration and,
//! while tracking, records its regions as *rewritten*. The copier reads a
//! region with the gate held exclusively (no write in flight) and forgets its
//! rewrite mark at that instant, so any later write marks it again and the
//! region is copied again; the last pass runs with the gate held until
//! replication is attached, after which every write goes to both nodes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use crate::engine::{BlockEngine, EngineFuture};

/// Exclusive hold of the gate: no application write is in flight or starts.
pub type Exclusive = OwnedRwLockWriteGuard<()>;

/// The gate shared by a served volume and the resync copier.
#[derive(Debug)]
pub struct WriteGate {
    lock: Arc<RwLock<()>>,
    tracking: AtomicBool,
    rewritten: Mutex<BTreeSet<u64>>,
    region_size: u64,
}

impl WriteGate {
    /// A gate for regions of `region_size` bytes.
    pub fn new(region_size: u64) -> Arc<WriteGate> {
        Arc::new(WriteGate {
            lock: Arc::new(RwLock::new(())),
            tracking: AtomicBool::new(false),
            rewritten: Mutex::new(BTreeSet::new()),
            region_size: region_size.max(1),
        })
    }

    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.rewritten.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start recording rewritten regions (cleared first).
    pub fn start_tracking(&self) {
        self.set().clear();
        self.tracking.store(true, Ordering::SeqCst);
    }

    /// Stop recording.
    pub fn stop_tracking(&self) {
        self.tracking.store(false, Ordering::SeqCst);
        self.set().clear();
    }

    /// Regions written since they were last copied (and forget them).
    pub fn take_rewritten(&self) -> Vec<u64> {
        std::mem::take(&mut *self.set()).into_iter().collect()
    }

    /// Whether `r` was written since it was last copied.
    pub fn is_rewritten(&self, r: u64) -> bool {
        self.set().contains(&r)
    }

    /// The region is being copied now (call with the gate held exclusively).
    pub fn forget(&self, r: u64) {
        self.set().remove(&r);
    }

    /// Hold the gate exclusively (waits for in-flight writes to finish).
    pub async fn exclusive(&self) -> Exclusive {
        self.lock.clone().write_owned().await
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.tracking.load(Ordering::SeqCst) {
            return;
        }
        let (a, b) = (
            offset / self.region_size,
            (offset + len - 1) / self.region_size,
        );
        self.set().extend(a..=b);
    }
}

/// The served volume with its writes ordered against resync copies.
pub struct GatedVolume {
    inner: Arc<dyn BlockEngine>,
    gate: Arc<WriteGate>,
}

impl std::fmt::Debug for GatedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatedVolume")
            .field("inner", &self.inner.describe())
            .finish_non_exhaustive()
    }
}

impl GatedVolume {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn BlockEngine>, gate: Arc<WriteGate>) -> GatedVolume {
        GatedVolume { inner, gate }
    }

    fn modify<F>(&self, offset: u64, len: u64, op: F) -> EngineFuture<()>
    where
        F: FnOnce(&dyn BlockEngine) -> EngineFuture<()> + Send + 'static,
    {
        let (inner, gate) = (self.inner.clone(), self.gate.clone());
        Box::pin(async move {
            let _shared = gate.lock.clone().read_owned().await;
            gate.mark(offset, len);
            op(&*inner).await
        })
    }
}

impl BlockEngine for GatedVolume {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        self.inner.read(offset, len)
    }
    fn read_bytes(&self, offset: u64, len: usize) -> EngineFuture<Bytes> {
        self.inner.read_bytes(offset, len)
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        let len = data.len() as u64;
        self.modify(offset, len, move |e| e.write(offset, data, fua))
    }
    fn flush(&self) -> EngineFuture<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        self.modify(offset, len, move |e| e.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        self.modify(offset, len, move |e| {
            e.write_zeroes(offset, len, may_trim, fua)
        })
    }
}
