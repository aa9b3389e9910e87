//! Replication data path, end to end in one process: an [`ActiveVolume`] over
//! a MemEngine + cluster partition on MemStorage, connected through
//! `peer::testing::pair_in_memory` (real codec and sessions) to
//! `run_standby` over a [`GatedEngine`] wrapping a second MemEngine.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bitmap::{ClusterPartition, CreateParams, DataIdentity, MemStorage, MetaStorage};
use bytes::Bytes;
use mirror_agent::config::Mode;
use mirror_agent::engine::{BlockEngine, FaultOp, FaultRule, FaultyEngine};
use mirror_agent::gens;
use mirror_agent::nbd::testing::MemEngine;
use mirror_agent::peer::testing::{hello, pair_in_memory};
use mirror_agent::replica::testing::GatedEngine;
use mirror_agent::replica::{
    run_standby, ActiveConfig, ActiveVolume, ReplicaEvent, ReplicaLink, StandbyEnd,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const VOL: u64 = 1 << 20;
const REGION: u64 = 4096;

/// MemStorage whose superblock writes can be held (to observe what completes
/// before the break is recorded).
#[derive(Clone)]
struct GatedStorage {
    inner: Arc<Mutex<MemStorage>>,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl GatedStorage {
    fn new(len: usize) -> GatedStorage {
        GatedStorage {
            inner: Arc::new(Mutex::new(MemStorage::new(len))),
            gate: Arc::new((Mutex::new(true), Condvar::new())),
        }
    }
    fn set_superblock_open(&self, open: bool) {
        *self.gate.0.lock().unwrap() = open;
        self.gate.1.notify_all();
    }
}

impl MetaStorage for GatedStorage {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.lock().unwrap().read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if offset < bitmap::layout::BITMAP_OFFSET {
            let mut open = self.gate.0.lock().unwrap();
            while !*open {
                open = self.gate.1.wait(open).unwrap();
            }
        }
        self.inner.lock().unwrap().write_at(offset, buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.lock().unwrap().sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.lock().unwrap().len()
    }
}

fn partition() -> (Arc<ClusterPartition>, GatedStorage) {
    let id = DataIdentity {
        size: VOL,
        stable_id: String::new(),
    };
    let mut p = CreateParams::new("r0", "alpha", &id);
    p.region_size = REGION;
    p.initially_dirty = false;
    let g = bitmap::Geometry::new(VOL, REGION).unwrap();
    let st = GatedStorage::new(g.required_partition_size() as usize);
    let cp = ClusterPartition::create(st.clone(), &p, false).unwrap();
    cp.update_superblock(|s| s.gens = gens::blank()).unwrap();
    cp.set_keep_dirty_capacity(0);
    (Arc::new(cp), st)
}

struct Pair {
    vol: ActiveVolume,
    events: mpsc::UnboundedReceiver<ReplicaEvent>,
    part: Arc<ClusterPartition>,
    meta: GatedStorage,
    local: Arc<MemEngine>,
    remote: Arc<MemEngine>,
    gate: GatedEngine,
    standby_tx: mirror_agent::peer::SessionSender,
    standby: JoinHandle<Result<StandbyEnd, mirror_agent::replica::ReplicaError>>,
}

fn cfg(mode: Mode) -> ActiveConfig {
    ActiveConfig {
        mode,
        ack_timeout: Duration::from_secs(20),
        async_queue: 64 << 20,
    }
}

fn setup_with(
    cfg: ActiveConfig,
    standby_engine: impl FnOnce(Arc<MemEngine>) -> Arc<dyn BlockEngine>,
) -> Pair {
    let (part, meta) = partition();
    let local = MemEngine::new(VOL as usize);
    let remote = MemEngine::new(VOL as usize);
    let gate = GatedEngine::new(standby_engine(remote.clone()));
    let (a, b) = pair_in_memory(
        hello("alpha", "c", "r0", VOL, REGION as u32),
        hello("beta", "c", "r0", VOL, REGION as u32),
    );
    let standby_tx = b.tx.clone();
    let (vol, events) = ActiveVolume::new(local.clone(), part.clone(), cfg);
    vol.attach(a.into()).unwrap();
    let standby = tokio::spawn(run_standby(Arc::new(gate.clone()), b.into()));
    Pair {
        vol,
        events,
        part,
        meta,
        local,
        remote,
        gate,
        standby_tx,
        standby,
    }
}

fn setup(cfg: ActiveConfig) -> Pair {
    setup_with(cfg, |m| m)
}

/// Polls `cond` until true (readiness, bounded by 10 s).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Bytes::from((0..len).map(|_| rng.gen()).collect::<Vec<u8>>())
}

async fn quiesce(p: &Pair) {
    wait_until("no request in flight to the peer", || {
        let r = p.vol.rpo();
        r.unacked1_writes == 0 && r.unacked2_writes == 0
    })
    .await;
}

async fn next_break(events: &mut mpsc::UnboundedReceiver<ReplicaEvent>) -> (String, bool) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no event")
            .expect("closed")
        {
            ReplicaEvent::MirrorBroken {
                reason,
                peer_disk_error,
            } => return (reason, peer_disk_error),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_leaves_both_sides_identical() {
    for mode in [Mode::Sync, Mode::Semi, Mode::Async] {
        let mut p = setup(cfg(mode));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let vol = p.vol.clone();
            let off = rng.gen_range(0..VOL / 512 - 64) * 512;
            let len = rng.gen_range(1..64u64) * 512;
            let kind = rng.gen_range(0..10);
            tasks.push(tokio::spawn(async move {
                match kind {
                    0 => vol.discard(off, len).await,
                    1 => vol.write_zeroes(off, len, i % 2 == 0, false).await,
                    _ => vol.write(off, pattern(i, len as usize), i % 7 == 0).await,
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        p.vol.flush().await.unwrap();
        quiesce(&p).await;
        let (l, rm) = (p.local.snapshot(), p.remote.snapshot());
        let first = l.iter().zip(&rm).position(|(a, b)| a != b);
        let ev = p.events.try_recv();
        assert!(
            first.is_none(),
            "{mode}: volumes differ at {first:?}: {:?} {ev:?}",
            p.vol.rpo()
        );
        let r = p.vol.rpo();
        assert_eq!(
            (r.writes_replicated, r.breaks, r.writes_local_only),
            (200, 0, 0),
            "{mode}: {r:?}"
        );
        // Every region written was dirty only for intent: clearing empties the bitmap.
        p.vol.clear_now().await.unwrap();
        assert_eq!(p.part.dirty_count(), 0, "{mode}");
        assert_eq!(
            p.part.generations(),
            gens::blank(),
            "{mode}: no break recorded"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_write_completes_only_after_ack2() {
    let p = setup(cfg(Mode::Sync));
    p.gate.set_writes_open(false);
    let vol = p.vol.clone();
    let w = tokio::spawn(async move { vol.write(8192, pattern(1, 4096), false).await });
    p.gate.wait_held(1).await;
    // Ack1 arrives (the standby queued the write) but the client still waits.
    wait_until("Ack1", || p.vol.rpo().unacked2_writes == 1).await;
    tokio::task::yield_now().await;
    assert!(
        !w.is_finished(),
        "sync write completed before the standby wrote it"
    );
    assert!(p.part.is_durably_dirty(2));
    p.gate.set_writes_open(true);
    w.await.unwrap().unwrap();
    assert_eq!(p.remote.snapshot()[8192..12288], pattern(1, 4096)[..]);
    // Ack2 means durable: the standby flushed before acking.
    assert!(p.gate.flushed() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semi_write_completes_after_ack1() {
    let p = setup(cfg(Mode::Semi));
    p.gate.set_writes_open(false);
    p.vol.write(0, pattern(2, 4096), false).await.unwrap();
    assert_eq!(
        p.gate.applied(),
        0,
        "completed although the standby did not write"
    );
    let r = p.vol.rpo();
    assert_eq!(
        (r.unacked1_writes, r.unacked2_writes, r.unacked2_bytes),
        (0, 1, 4096)
    );
    p.gate.set_writes_open(true);
    quiesce(&p).await;
    assert!(p.local.snapshot() == p.remote.snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_budget_overflow_breaks_mirror_but_writes_succeed() {
    let mut p = setup(ActiveConfig {
        mode: Mode::Async,
        ack_timeout: Duration::from_secs(20),
        async_queue: 64 * 1024,
    });
    p.gate.set_writes_open(false);
    for i in 0..32u64 {
        p.vol
            .write(i * REGION, pattern(i, 4096), false)
            .await
            .unwrap();
    }
    let (reason, disk) = next_break(&mut p.events).await;
    assert!(reason.contains("async queue budget exceeded"), "{reason}");
    assert!(!disk);
    assert!(!p.vol.is_attached());
    // Every region written is dirty (needs resync) and stays so after clearing.
    p.vol.clear_now().await.unwrap();
    for i in 0..32 {
        assert!(p.part.is_durably_dirty(i), "region {i} not dirty");
    }
    let g = p.part.generations();
    assert_eq!(g.bitmap, gens::BLANK);
    assert_ne!(g.current, gens::BLANK);
    assert!(p.part.break_time() > 0);
    // Writes after the break keep working, local-only and dirty.
    p.vol
        .write(40 * REGION, pattern(99, 4096), false)
        .await
        .unwrap();
    assert!(p.part.is_durably_dirty(40));
    assert_eq!(
        p.local.snapshot()[40 * 4096..41 * 4096],
        pattern(99, 4096)[..]
    );
    p.gate.set_writes_open(true);
    let end = p.standby.await.unwrap().unwrap();
    assert!(end.disk_error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_closed_mid_stream_completes_locally_after_break_recorded() {
    let mut p = setup(cfg(Mode::Sync));
    p.gate.set_writes_open(false);
    let mut writes = Vec::new();
    for i in 0..4u64 {
        let vol = p.vol.clone();
        writes.push(tokio::spawn(async move {
            vol.write(i * REGION, pattern(i, 4096), false).await
        }));
    }
    p.gate.wait_held(4).await;
    // Hold superblock writes: nothing may complete local-only before the break is on disk.
    p.meta.set_superblock_open(false);
    p.standby_tx.close("test: cable pulled");
    let (reason, disk) = next_break(&mut p.events).await;
    assert!(
        reason.contains("cable pulled") || reason.contains("closed"),
        "{reason}"
    );
    assert!(!disk);
    let vol = p.vol.clone();
    let late = tokio::spawn(async move { vol.write(10 * REGION, pattern(10, 4096), false).await });
    tokio::task::yield_now().await;
    assert!(
        writes.iter().all(|w| !w.is_finished()) && !late.is_finished(),
        "completed before the break was recorded"
    );
    assert_eq!(p.part.generations(), gens::blank());
    p.meta.set_superblock_open(true);
    for w in writes {
        w.await.unwrap().unwrap();
    }
    late.await.unwrap().unwrap();
    let g = p.part.generations();
    assert_eq!(g.bitmap, gens::BLANK, "bitmap generation = old current");
    assert_ne!(g.current, gens::BLANK);
    assert!(p.part.break_time() > 0);
    p.vol.clear_now().await.unwrap();
    for r in [0, 1, 2, 3, 10] {
        assert!(p.part.is_durably_dirty(r), "region {r}");
    }
    assert_eq!(p.local.snapshot()[..4096], pattern(0, 4096)[..]);
    assert!(p.vol.rpo().breaks == 1 && p.vol.rpo().writes_local_only == 5);
    p.gate.set_writes_open(true);
    let _ = p.standby.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_timeout_breaks_and_completes_locally() {
    let mut p = setup(ActiveConfig {
        mode: Mode::Sync,
        ack_timeout: Duration::from_millis(300),
        async_queue: 1 << 20,
    });
    p.gate.set_writes_open(false);
    let t0 = std::time::Instant::now();
    p.vol
        .write(5 * REGION, pattern(5, 4096), true)
        .await
        .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let (reason, disk) = next_break(&mut p.events).await;
    assert!(reason.contains("ack timeout"), "{reason}");
    assert!(!disk);
    p.vol.clear_now().await.unwrap();
    assert!(p.part.is_durably_dirty(5));
    assert_ne!(p.part.generations().current, gens::BLANK);
    p.gate.set_writes_open(true);
    let _ = p.standby.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack2_error_breaks_with_peer_disk_error() {
    let mut p = setup_with(cfg(Mode::Sync), |m| {
        let f = FaultyEngine::new(m);
        f.add_rule(FaultRule::fail_range(
            &[FaultOp::Write],
            3 * REGION,
            REGION,
            libc::EIO,
        ));
        Arc::new(f)
    });
    p.vol.write(0, pattern(0, 4096), false).await.unwrap();
    // The standby fails this one: the client still succeeds (local copy is fine).
    p.vol
        .write(3 * REGION, pattern(3, 4096), false)
        .await
        .unwrap();
    let (reason, disk) = next_break(&mut p.events).await;
    assert!(disk, "{reason}");
    assert!(reason.contains("-5"), "{reason}");
    p.vol.clear_now().await.unwrap();
    assert!(p.part.is_durably_dirty(3));
    assert!(!p.part.is_dirty(0), "the acked write's region was cleared");
    let end = p.standby.await.unwrap().unwrap();
    let de = end.disk_error.expect("standby reports its disk error");
    assert_eq!(
        (de.op, de.offset, de.errno),
        ("write", 3 * REGION, libc::EIO)
    );
}

/// A request the active's own disk fails: the client gets the errno, the
/// region stays dirty, replication goes on (the standby has the write), and
/// `LocalDiskError` is emitted once, for the first failure only; `EINVAL`
/// (a request error) and `ECANCELED` (not performed) are not disk errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_disk_error_is_reported_once_and_replication_goes_on() {
    let (part, _meta) = partition();
    let local = MemEngine::new(VOL as usize);
    let remote = MemEngine::new(VOL as usize);
    let faulty = Arc::new(FaultyEngine::new(local.clone()));
    faulty.add_rule(FaultRule::fail_range(
        &[FaultOp::Write, FaultOp::Read],
        5 * REGION,
        REGION,
        libc::EIO,
    ));
    faulty.add_rule(FaultRule::fail_range(
        &[FaultOp::Write],
        9 * REGION,
        REGION,
        libc::EINVAL,
    ));
    faulty.add_rule(FaultRule::fail_range(
        &[FaultOp::Write],
        11 * REGION,
        REGION,
        libc::ECANCELED,
    ));
    let (a, b) = pair_in_memory(
        hello("alpha", "c", "r0", VOL, REGION as u32),
        hello("beta", "c", "r0", VOL, REGION as u32),
    );
    let (vol, mut events) = ActiveVolume::new(faulty, part.clone(), cfg(Mode::Sync));
    vol.attach(a.into()).unwrap();
    let standby = tokio::spawn(run_standby(remote.clone(), b.into()));

    vol.write(0, pattern(0, 4096), false).await.unwrap();
    // EINVAL from the engine: the request's error, not a disk error; ECANCELED:
    // the engine could not perform it.
    let e = vol
        .write(11 * REGION, pattern(11, 4096), false)
        .await
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECANCELED));
    let e = vol
        .write(9 * REGION, pattern(9, 4096), false)
        .await
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let e = vol
        .write(5 * REGION, pattern(5, 4096), false)
        .await
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("no event")
        .expect("closed");
    match ev {
        ReplicaEvent::LocalDiskError(r) => {
            assert_eq!(
                (r.op, r.offset, r.len),
                ("write", 5 * REGION, 4096),
                "{}",
                r.error
            );
            assert!(r.error.contains("os error 5"), "{}", r.error);
        }
        other => panic!("expected LocalDiskError, got {other:?}"),
    }
    // A failing read, and another failing write: no second event.
    let e = vol.read(5 * REGION, 512).await.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    vol.write(5 * REGION, pattern(6, 512), false)
        .await
        .unwrap_err();
    // Replication goes on: later writes are replicated and acknowledged.
    vol.write(REGION, pattern(1, 4096), false).await.unwrap();
    assert!(vol.is_attached());
    assert!(
        part.is_durably_dirty(5),
        "the failed write's region must stay dirty"
    );
    // The standby got the failed writes (they fail only on this node's disk);
    // the second one overwrote the first 512 bytes.
    let snap = remote.snapshot();
    let at = 5 * REGION as usize;
    assert!(
        snap[at..at + 512] == pattern(6, 512)[..]
            && snap[at + 512..at + 4096] == pattern(5, 4096)[512..],
        "the standby lacks the writes that failed on the active's disk"
    );
    assert!(
        events.try_recv().is_err(),
        "a second event for the same disk"
    );
    vol.detach("test end").await.unwrap();
    let _ = standby.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_clears_only_after_ack2() {
    let p = setup(cfg(Mode::Semi));
    p.gate.set_flushes_open(false);
    p.vol
        .write(7 * REGION, pattern(7, 4096), false)
        .await
        .unwrap();
    wait_until("standby applied", || p.gate.applied() == 1).await;
    // Written on both sides but not yet durable on the peer: no Ack2, region stays dirty.
    assert_eq!(p.vol.clear_now().await.unwrap(), 0);
    assert!(p.part.is_durably_dirty(7));
    assert_eq!(p.part.inflight(7), 1);
    p.gate.set_flushes_open(true);
    quiesce(&p).await;
    wait_until("ticket ended", || p.part.inflight(7) == 0).await;
    assert_eq!(p.vol.clear_now().await.unwrap(), 1);
    assert!(!p.part.is_dirty(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_flush_is_a_barrier_on_the_standby() {
    let p = setup(cfg(Mode::Sync));
    p.gate.set_writes_open(false);
    let vol = p.vol.clone();
    let w = tokio::spawn(async move { vol.write(0, pattern(11, 4096), false).await });
    p.gate.wait_held(1).await;
    let vol = p.vol.clone();
    let f = tokio::spawn(async move { vol.flush().await });
    wait_until("local flush", || p.local.flushes() >= 1).await;
    tokio::task::yield_now().await;
    assert!(
        !f.is_finished(),
        "FlushAck before an earlier write was applied"
    );
    let flushed = p.gate.flushed();
    p.gate.set_writes_open(true);
    f.await.unwrap().unwrap();
    w.await.unwrap().unwrap();
    assert!(p.gate.flushed() > flushed);
    assert!(p.local.snapshot() == p.remote.snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpo_meter_tracks_a_stalled_standby() {
    let p = setup(cfg(Mode::Async));
    assert_eq!(p.vol.rpo().oldest_not_durable_ms, 0);
    p.gate.set_writes_open(false);
    for i in 0..5u64 {
        p.vol
            .write(i * REGION, pattern(i, 4096), false)
            .await
            .unwrap();
    }
    let mut last = p.vol.rpo();
    wait_until("Ack1s and some age", || {
        last = p.vol.rpo();
        last.unacked2_writes == 5 && last.oldest_not_durable_ms > 0
    })
    .await;
    assert_eq!(
        (
            last.unacked1_writes,
            last.unacked2_bytes,
            last.writes_replicated
        ),
        (0, 5 * 4096, 0)
    );
    let json = serde_json::to_value(&last).unwrap();
    assert_eq!(json["unacked2_writes"], 5);
    p.gate.set_writes_open(true);
    quiesce(&p).await;
    let r = p.vol.rpo();
    assert_eq!(
        (r.unacked1_bytes, r.unacked2_bytes, r.oldest_not_durable_ms),
        (0, 0, 0)
    );
    assert_eq!((r.writes_replicated, r.bytes_replicated), (5, 5 * 4096));
}

/// After a break the RPO meter's age keeps counting the writes the peer
/// lacks (completed without it), not only the ones in flight; attaching again
/// (which needs an in-sync peer) resets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpo_age_counts_writes_made_during_a_break_until_reattached() {
    let mut p = setup(cfg(Mode::Sync));
    p.vol.write(0, pattern(1, 4096), false).await.unwrap();
    quiesce(&p).await;
    assert_eq!(p.vol.rpo().oldest_not_durable_ms, 0);
    p.standby_tx.close("test: cable pulled");
    next_break(&mut p.events).await;
    wait_until("detached", || !p.vol.is_attached()).await;
    assert_eq!(
        p.vol.rpo().oldest_not_durable_ms,
        0,
        "no write since the break: nothing the peer lacks"
    );
    p.vol.write(REGION, pattern(2, 4096), false).await.unwrap();
    assert_eq!(p.vol.rpo().writes_local_only, 1);
    wait_until("the local-only write ages", || {
        p.vol.rpo().oldest_not_durable_ms >= 20
    })
    .await;
    let r = p.vol.rpo();
    assert_eq!((r.unacked1_writes, r.unacked2_writes), (0, 0));
    // A later write does not make the oldest younger.
    p.vol
        .write(2 * REGION, pattern(3, 4096), false)
        .await
        .unwrap();
    assert!(p.vol.rpo().oldest_not_durable_ms >= r.oldest_not_durable_ms);
    let _ = p.standby.await.unwrap();

    // Reattached (in the agent: after the resync brought the peer in sync).
    let (a, b) = pair_in_memory(
        hello("alpha", "c", "r0", VOL, REGION as u32),
        hello("beta", "c", "r0", VOL, REGION as u32),
    );
    let standby_tx = b.tx.clone();
    p.vol.attach(a.into()).unwrap();
    let standby = tokio::spawn(run_standby(Arc::new(p.gate.clone()), b.into()));
    assert_eq!(p.vol.rpo().oldest_not_durable_ms, 0);
    p.vol
        .write(3 * REGION, pattern(4, 4096), false)
        .await
        .unwrap();
    let r = p.vol.rpo();
    assert_eq!((r.unacked2_writes, r.oldest_not_durable_ms), (0, 0));
    assert_eq!(p.vol.rpo().writes_local_only, 2);
    standby_tx.close("test: done");
    let _ = standby.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_attached_volume_records_divergence_before_first_write() {
    let (part, meta) = partition();
    let local = MemEngine::new(VOL as usize);
    let (vol, _ev) = ActiveVolume::new(local.clone(), part.clone(), cfg(Mode::Sync));
    meta.set_superblock_open(false);
    let v = vol.clone();
    let w = tokio::spawn(async move { v.write(0, pattern(1, 4096), false).await });
    tokio::task::yield_now().await;
    assert!(!w.is_finished());
    assert_eq!(
        local.snapshot()[..4096],
        [0u8; 4096][..],
        "data written before divergence was recorded"
    );
    meta.set_superblock_open(true);
    w.await.unwrap().unwrap();
    assert_eq!(part.generations().bitmap, gens::BLANK);
    assert!(part.is_durably_dirty(0));
}

fn ordering_case(seed: u64, ops: Vec<(u64, u64, u8)>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let p = setup(cfg(Mode::Semi));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        p.gate
            .set_delay(move || Duration::from_micros(rng.gen_range(0..2000)));
        let mut tasks = Vec::new();
        for (i, (off, len, kind)) in ops.into_iter().enumerate() {
            let vol = p.vol.clone();
            tasks.push(tokio::spawn(async move {
                match kind {
                    0 => vol.discard(off * 512, len * 512).await,
                    1 => vol.write_zeroes(off * 512, len * 512, false, false).await,
                    _ => {
                        vol.write(
                            off * 512,
                            pattern(seed ^ i as u64, (len * 512) as usize),
                            false,
                        )
                        .await
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        quiesce(&p).await;
        assert!(p.local.snapshot() == p.remote.snapshot(), "volumes differ");
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    /// Random overlapping writes (all inside 32 KiB) with random standby delays
    /// end with identical bytes on both sides.
    #[test]
    fn overlapping_writes_apply_in_the_same_order(
        seed in any::<u64>(),
        ops in proptest::collection::vec((0u64..56, 1u64..9, 0u8..6), 10..60),
    ) {
        ordering_case(seed, ops);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_waits_for_acks_and_records_nothing() {
    let p = setup(cfg(Mode::Async));
    p.gate.set_writes_open(false);
    p.vol.write(0, pattern(3, 4096), false).await.unwrap();
    let vol = p.vol.clone();
    let rel = tokio::spawn(async move { vol.release(Duration::from_secs(10)).await });
    p.gate.wait_held(1).await;
    tokio::task::yield_now().await;
    assert!(
        !rel.is_finished(),
        "released while a write was not durable on the peer"
    );
    p.gate.set_writes_open(true);
    assert!(rel.await.unwrap().unwrap(), "clean release expected");
    assert!(!p.vol.is_attached());
    assert_eq!(
        p.part.generations(),
        gens::blank(),
        "a clean release records no divergence"
    );
    // (The volume does not close the session; a peer Session whose `rx` is
    // dropped closes itself, which is why the owner routes frames through its
    // own channel.)
    assert!(p.local.snapshot() == p.remote.snapshot());
}

/// The pair's owner routes a session's frames to the volume through its own
/// channel and stops routing once the volume is released (deactivation). The
/// channel ending right after a clean release is not a mirror break: before
/// the fix the receiver task, woken by the release but polled only after
/// the route was dropped, saw the end first and recorded a break, rotating
/// the generations of a node that had deactivated cleanly. A current-thread
/// runtime makes that interleaving certain.
#[tokio::test(flavor = "current_thread")]
async fn route_dropped_right_after_release_is_not_a_break() {
    let (part, _meta) = partition();
    let local = MemEngine::new(VOL as usize);
    let remote = MemEngine::new(VOL as usize);
    let (a, b) = pair_in_memory(
        hello("alpha", "c", "r0", VOL, REGION as u32),
        hello("beta", "c", "r0", VOL, REGION as u32),
    );
    let (route_tx, route_rx) = mpsc::channel(64);
    let mut session_rx = a.rx;
    let route = Arc::new(Mutex::new(Some(route_tx)));
    let forward = {
        let route = route.clone();
        tokio::spawn(async move {
            while let Some(f) = session_rx.recv().await {
                let tx = route.lock().unwrap().clone();
                if let Some(tx) = tx {
                    let _ = tx.send(f).await;
                }
            }
        })
    };
    let (vol, mut events) = ActiveVolume::new(local.clone(), part.clone(), cfg(Mode::Sync));
    vol.attach(ReplicaLink {
        tx: Arc::new(a.tx),
        rx: route_rx,
        closed: Arc::new(a.closed),
    })
    .unwrap();
    let standby = tokio::spawn(run_standby(remote.clone(), b.into()));
    vol.write(0, pattern(5, 4096), false).await.unwrap();
    assert!(vol.release(Duration::from_secs(10)).await.unwrap());
    // No await between the release and dropping the route.
    route.lock().unwrap().take();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        part.generations(),
        gens::blank(),
        "a clean release followed by the end of the route recorded a divergence"
    );
    while let Ok(e) = events.try_recv() {
        assert!(
            !matches!(e, ReplicaEvent::MirrorBroken { .. }),
            "mirror break reported after a clean release: {e:?}"
        );
    }
    assert!(local.snapshot() == remote.snapshot());
    forward.abort();
    standby.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_times_out_into_a_recorded_break() {
    let p = setup(cfg(Mode::Async));
    p.gate.set_writes_open(false);
    p.vol.write(0, pattern(3, 4096), false).await.unwrap();
    assert!(!p.vol.release(Duration::from_millis(100)).await.unwrap());
    assert_eq!(p.part.generations().bitmap, gens::BLANK);
    assert!(p.part.is_durably_dirty(0));
    p.gate.set_writes_open(true);
    let _ = p.standby.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_extents_while_replicating_cooled_after_a_break() {
    let mut p = setup(cfg(Mode::Sync));
    p.part.set_keep_dirty_capacity(4);
    p.part.set_hot_extent_size(16 * REGION).unwrap();
    // First write into extent 0 (regions 0..16): the whole extent turns dirty
    // in one metadata write.
    p.vol
        .write(3 * REGION, pattern(1, 4096), false)
        .await
        .unwrap();
    assert_eq!(
        p.part.iter_dirty().collect::<Vec<_>>(),
        (0..16).collect::<Vec<_>>()
    );
    assert!((0..16).all(|r| p.part.is_durably_dirty(r)));
    // Later writes anywhere in the hot extent: no metadata I/O at all.
    let before = p.part.stats();
    for r in [0u64, 7, 10, 15] {
        p.vol
            .write(r * REGION, pattern(r, 4096), false)
            .await
            .unwrap();
    }
    let after = p.part.stats();
    assert_eq!(
        (after.chunk_writes, after.syncs),
        (before.chunk_writes, before.syncs)
    );
    // The hot extent stays dirty (every write has its Ack2, but it is hot).
    quiesce(&p).await;
    p.vol.clear_now().await.unwrap();
    assert_eq!(p.part.dirty_count(), 16);
    // A break: once it is recorded, the hot set is cooled (every write to it
    // reached the peer), so the next resync copies nothing from it.
    p.standby_tx.close("test: standby goes away");
    next_break(&mut p.events).await;
    wait_until("hot extents cooled", || p.part.dirty_count() == 0).await;
    assert_eq!(p.part.hot_extent_count(), 0);
    // Local-only writes mark only their own regions.
    p.vol
        .write(40 * REGION, pattern(40, 4096), false)
        .await
        .unwrap();
    assert_eq!(p.part.iter_dirty().collect::<Vec<_>>(), vec![40]);
    p.vol.clear_now().await.unwrap();
    assert_eq!(p.part.iter_dirty().collect::<Vec<_>>(), vec![40], "sticky");
}
