//! Ordering application writes with resync copies on the source.
//!
//! While a resync runs from the active node, the volume keeps serving but is
//! not replicating: application writes land locally only. A copy of region R
//! read before a write to R would leave the target with older data than the
//! source (design notes property 5). [`GatedVolume`] wraps the served volume:
//! every modifying request holds the gate shared for its whole duration and,
//! while tracking, records its regions as *rewritten* before it writes. The
//! copier forgets a region's rewrite mark with the gate held exclusively (no
//! write in flight), then reads it: every write the read can observe (in
//! part or whole) started after that instant and marked the region again, so
//! the region is copied again (and keeps its bit). The read need not finish,
//! or even start, under the gate. The last pass runs with the gate held
//! until replication is attached, after which every write goes to both nodes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use crate::engine::{BlockEngine, EngineFuture, Extent};

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

    /// The region is being copied now (call with the gate held exclusively,
    /// before its read).
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
    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use tokio::sync::Notify;

    /// A memory volume whose reads snapshot the data only when released, so
    /// a test can hold a read "in flight" across a write.
    struct SlowReads {
        data: Arc<StdMutex<Vec<u8>>>,
        release: Arc<Notify>,
    }

    impl BlockEngine for SlowReads {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn name(&self) -> &'static str {
            "slow-reads"
        }
        fn read(&self, _offset: u64, _len: usize) -> EngineFuture<Vec<u8>> {
            unreachable!("the copier reads with read_bytes")
        }
        fn read_bytes(&self, offset: u64, len: usize) -> EngineFuture<Bytes> {
            let (release, data) = (self.release.clone(), self.data.clone());
            Box::pin(async move {
                release.notified().await;
                let d = data.lock().unwrap();
                Ok(Bytes::copy_from_slice(
                    &d[offset as usize..offset as usize + len],
                ))
            })
        }
        fn write(&self, offset: u64, data: Bytes, _fua: bool) -> EngineFuture<()> {
            self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(&data);
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> EngineFuture<()> {
            Box::pin(async { Ok(()) })
        }
        fn discard(&self, _offset: u64, _len: u64) -> EngineFuture<()> {
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, _o: u64, _l: u64, _t: bool, _f: bool) -> EngineFuture<()> {
            Box::pin(async { Ok(()) })
        }
    }

    /// The copier's protocol (`resync::Copier::start_read`): forget the marks
    /// under the exclusive gate, start the read, release the gate before the
    /// read completes. A write landing while that read is in flight must
    /// leave the region marked (so it is copied again and keeps its bit),
    /// and the read may indeed have seen it.
    #[tokio::test]
    async fn a_write_during_a_read_started_under_the_gate_marks_the_region_again() {
        const REGION: u64 = 4096;
        let release = Arc::new(Notify::new());
        let engine = Arc::new(SlowReads {
            data: Arc::new(StdMutex::new(vec![0u8; 4 * REGION as usize])),
            release: release.clone(),
        });
        let gate = WriteGate::new(REGION);
        gate.start_tracking();
        let vol = GatedVolume::new(engine.clone(), gate.clone());

        // A write before the copy marks region 1.
        vol.write(REGION, Bytes::from(vec![1u8; 16]), false)
            .await
            .unwrap();
        assert!(gate.is_rewritten(1));

        let guard = gate.exclusive().await;
        gate.forget(1);
        let read = tokio::spawn(engine.read_bytes(REGION, REGION as usize));
        drop(guard);
        assert!(!gate.is_rewritten(1), "forgotten at the copy");

        // The application writes region 1 while the read is in flight.
        vol.write(REGION + 8, Bytes::from(vec![2u8; 8]), false)
            .await
            .unwrap();
        assert!(
            gate.is_rewritten(1),
            "a write after the copy's instant must mark its region again"
        );
        assert!(!gate.is_rewritten(0) && !gate.is_rewritten(2));

        release.notify_one();
        let copy = read.await.unwrap().unwrap();
        // The read saw the write (the torn case the mark covers).
        assert_eq!(&copy[8..16], &[2u8; 8]);
    }

    /// The exclusive hold waits for a write in flight: no write can be
    /// between a region's forget and the copy's instant.
    #[tokio::test]
    async fn exclusive_waits_for_writes_in_flight() {
        let gate = WriteGate::new(4096);
        let shared = gate.lock.clone().read_owned().await;
        let g = gate.clone();
        let ex = tokio::spawn(async move { g.exclusive().await });
        tokio::task::yield_now().await;
        assert!(!ex.is_finished());
        drop(shared);
        ex.await.unwrap();
    }
}
