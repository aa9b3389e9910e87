//! The resync engine (`mirror_agent::resync`) over in-memory peer sessions:
//! differential copies exactly the union of both bitmaps, full copies all,
//! an interrupted resync resumes from the target's bitmap (never from zero,
//! never claiming consistency early), application writes during the copy
//! never leave older data on the target, and a forced resync saves the
//! loser's regions before overwriting them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bitmap::{ClusterPartition, CreateParams, DataIdentity, Flags, Generations, MemStorage};
use bytes::Bytes;
use mirror_agent::engine::BlockEngine;
use mirror_agent::nbd::testing::MemEngine;
use mirror_agent::pair::control::ControlMsg;
use mirror_agent::peer::testing::{hello, pair_in_memory};
use mirror_agent::peer::Session;
use mirror_agent::resync::{self, GatedVolume, Progress, ProgressHandle, WriteGate};
use mirror_agent::rules::{self, Decision, NodeView, ResyncKind, Side};
use mirror_proto::{Frame, Message};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

const REGION: u64 = 16 << 10;
const VOL: u64 = 16 << 20; // 1024 regions

struct Node {
    name: &'static str,
    engine: Arc<MemEngine>,
    part: Arc<ClusterPartition>,
}

async fn node(name: &'static str, gens: Generations, fill: u8) -> Node {
    let id = DataIdentity {
        size: VOL,
        stable_id: String::new(),
    };
    let mut p = CreateParams::new("md1", name, &id);
    p.region_size = REGION;
    p.initially_dirty = false;
    let g = bitmap::Geometry::new(VOL, REGION).unwrap();
    let cp = ClusterPartition::create(
        MemStorage::new(g.required_partition_size() as usize),
        &p,
        false,
    )
    .unwrap();
    cp.update_superblock(|s| {
        s.gens = gens;
        s.flags = Flags::CONSISTENT;
    })
    .unwrap();
    cp.set_keep_dirty_capacity(0);
    let engine = MemEngine::new(VOL as usize);
    if fill != 0 {
        engine
            .write(0, Bytes::from(vec![fill; VOL as usize]), false)
            .await
            .unwrap();
    }
    Node {
        name,
        engine,
        part: Arc::new(cp),
    }
}

fn view(n: &Node) -> NodeView {
    NodeView::from_state(n.name, "md1", &n.part.state(), n.part.dirty_count())
}

fn sessions() -> (Session, Session) {
    pair_in_memory(
        hello("a", "c", "md1", VOL, REGION as u32),
        hello("b", "c", "md1", VOL, REGION as u32),
    )
}

fn progress(role: resync::Role) -> ProgressHandle {
    Arc::new(Mutex::new(Progress::new(
        role,
        "a -> b".into(),
        ResyncKind::Differential,
        "test".into(),
    )))
}

/// Write `pattern` over region `r` of `n` and mark it dirty (a change since B).
async fn change(n: &Node, r: u64, pattern: u8) {
    n.engine
        .write(
            r * REGION,
            Bytes::from(vec![pattern; REGION as usize]),
            false,
        )
        .await
        .unwrap();
    n.part.mark_dirty_regions([r]).unwrap();
}

/// Forward every frame of `rx` to the resync inbox; after `limit` ResyncData
/// frames, close the session instead (an interrupted resync).
fn forward(
    mut rx: mpsc::Receiver<Frame>,
    limit: Option<u64>,
    tx: mirror_agent::peer::SessionSender,
    data_frames: Arc<AtomicU64>,
) -> mpsc::Receiver<Frame> {
    let (ftx, frx) = mpsc::channel(256);
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if matches!(f.msg, Message::ResyncData { .. }) {
                let n = data_frames.fetch_add(1, Ordering::SeqCst) + 1;
                if limit.is_some_and(|l| n > l) {
                    tx.close("test: link cut mid-resync");
                    return;
                }
            }
            if ftx.send(f).await.is_err() {
                return;
            }
        }
    });
    frx
}

/// What the source of a resync a → b runs with: no save, no rate limit.
fn source_spec(a: &Node, kind: ResyncKind, gate: Arc<WriteGate>) -> resync::SourceSpec {
    resync::SourceSpec {
        engine: a.engine.clone(),
        part: a.part.clone(),
        gate,
        kind,
        save: false,
        forced: false,
        rule: "test".into(),
        rate: None,
        peer: "b".into(),
    }
}

/// Spawns the resync source on session `sa` (its inbox forwarded uncut).
fn spawn_source(
    spec: resync::SourceSpec,
    sa: Session,
) -> tokio::task::JoinHandle<Result<resync::SourceDone, resync::ResyncError>> {
    let src_in = forward(sa.rx, None, sa.tx.clone(), Arc::new(AtomicU64::new(0)));
    tokio::spawn(resync::run_source(
        spec,
        sa.tx.clone(),
        src_in,
        progress(resync::Role::Source),
    ))
}

/// What the target `b` of a resync runs with, saving into `save_dir` when asked to.
fn target_spec(b: &Node, save_dir: std::path::PathBuf) -> resync::TargetSpec {
    resync::TargetSpec {
        engine: b.engine.clone(),
        part: b.part.clone(),
        save_dir,
        resource: "md1".into(),
        node: "b".into(),
    }
}

/// Runs the resync target to its end over `inbox`, answering on `tx`.
async fn run_target(
    tspec: resync::TargetSpec,
    full: bool,
    save: bool,
    tx: &mirror_agent::peer::SessionSender,
    inbox: mpsc::Receiver<Frame>,
) -> Result<resync::TargetDone, resync::ResyncError> {
    resync::run_target(
        tspec,
        full,
        save,
        tx.clone(),
        inbox,
        progress(resync::Role::Target),
        Box::new(|| {}),
    )
    .await
}

struct Outcome {
    source: Result<resync::SourceDone, resync::ResyncError>,
    target: Result<resync::TargetDone, resync::ResyncError>,
    data_frames: u64,
}

/// Run one resync a → b with `kind`; `cut_after` interrupts it.
async fn run(
    a: &Node,
    b: &Node,
    kind: ResyncKind,
    save: Option<std::path::PathBuf>,
    gate: Arc<WriteGate>,
    cut_after: Option<u64>,
) -> Outcome {
    let (sa, mut sb) = sessions();
    let frames = Arc::new(AtomicU64::new(0));
    let spec = resync::SourceSpec {
        save: save.is_some(),
        forced: save.is_some(),
        ..source_spec(a, kind, gate)
    };
    let source = spawn_source(spec, sa);
    // The target's dispatcher: the first frame is ResyncBegin.
    let first = sb.rx.recv().await.unwrap();
    let Message::Control { json } = &first.msg else {
        panic!("expected ResyncBegin, got {:?}", first.msg.kind())
    };
    let ControlMsg::ResyncBegin {
        full,
        save: do_save,
        ..
    } = ControlMsg::from_json(json).unwrap()
    else {
        panic!("{json}")
    };
    assert_eq!(full, kind == ResyncKind::Full);
    let tspec = target_spec(b, save.unwrap_or_else(std::env::temp_dir));
    let tgt_in = forward(sb.rx, cut_after, sb.tx.clone(), frames.clone());
    let target = run_target(tspec, full, do_save, &sb.tx, tgt_in).await;
    if target.is_err() {
        sb.tx.close("target stopped");
    }
    let source = source.await.unwrap();
    Outcome {
        source,
        target,
        data_frames: frames.load(Ordering::SeqCst),
    }
}

/// Whether region `r` of the volume image `img` holds only `byte`.
fn region_is(img: &[u8], r: u64, byte: u8) -> bool {
    img[(r * REGION) as usize..((r + 1) * REGION) as usize]
        .iter()
        .all(|&x| x == byte)
}

fn g(c: u64, b: u64) -> Generations {
    Generations {
        current: c,
        bitmap: b,
        history: [0; 4],
    }
}

/// Two zero-filled nodes, clean bitmaps: `a` changed since it last saw `b` in sync (a's
/// bitmap generation is b's current one), `b` did not; a differential a → b is the resync.
async fn a_ahead_of_b() -> (Node, Node) {
    (node("a", g(20, 10), 0).await, node("b", g(10, 0), 0).await)
}

/// A differential resync a → b with a fresh write gate, no save; `cut_after` interrupts it.
async fn differential(a: &Node, b: &Node, cut_after: Option<u64>) -> Outcome {
    run(
        a,
        b,
        ResyncKind::Differential,
        None,
        WriteGate::new(REGION),
        cut_after,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_copies_exactly_the_union() {
    let (a, b) = a_ahead_of_b().await;
    // 1% of the regions changed on the source, 2 write intents on the target.
    let changed: Vec<u64> = (0..10).map(|i| i * 97 + 3).collect();
    for &r in &changed {
        change(&a, r, (r as u8).wrapping_add(0xa0)).await;
    }
    b.part.mark_dirty_regions([500, 3]).unwrap();
    let (d, rule) = rules::decide(&view(&a), &view(&b));
    assert_eq!(rule.id, "R14");
    assert_eq!(
        d,
        Decision::Resync {
            source: Side::Local,
            kind: ResyncKind::Differential,
            save_loser_divergence: false
        }
    );
    let out = differential(&a, &b, None).await;
    let done = out.source.unwrap();
    let t = out.target.unwrap();
    // Union = 10 changed + region 500 (region 3 is in both).
    assert_eq!(done.regions, 11);
    assert_eq!(done.bytes, 11 * REGION);
    assert_eq!(t.bytes, 11 * REGION);
    assert_eq!(out.data_frames, 11);
    assert_eq!(a.engine.snapshot(), b.engine.snapshot());
    // History: source B cleared, target adopted C; both consistent, bitmaps clean.
    assert_eq!(a.part.generations().bitmap, 0);
    assert_eq!(b.part.generations().current, 20);
    assert!(!b.part.flags().contains(Flags::RESYNC_TARGET));
    assert!(b.part.flags().contains(Flags::CONSISTENT));
    assert_eq!(b.part.dirty_count(), 0);
    assert_eq!(a.part.dirty_count(), 0);
    assert_eq!(rules::decide(&view(&a), &view(&b)).0, Decision::InSync);
    drop(done.hold);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_copies_every_region() {
    let a = node("a", g(20, 0), 0x5a).await;
    let b = node("b", g(30, 0), 0x11).await;
    let out = run(&a, &b, ResyncKind::Full, None, WriteGate::new(REGION), None).await;
    let done = out.source.unwrap();
    assert_eq!(done.bytes, VOL);
    assert_eq!(done.regions, VOL / REGION);
    assert_eq!(a.engine.snapshot(), b.engine.snapshot());
    assert_eq!(b.part.generations().current, 20);
    assert_eq!(
        b.part.generations().history[0],
        30,
        "the target's old generation goes to its history"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_resync_resumes_without_recopying() {
    let (a, b) = a_ahead_of_b().await;
    // Scattered regions (one frame each), more than the copy window
    // (resync::WINDOW frames) so that Ack2s flow before the cut.
    let changed: Vec<u64> = (0..400).map(|i| i * 2).collect();
    for &r in &changed {
        change(&a, r, 0x40 + (r % 100) as u8).await;
    }
    let out = differential(&a, &b, Some(150)).await;
    assert!(out.source.is_err(), "the source must see the cut");
    assert!(out.target.is_err(), "the target must see the cut");
    // Still a partial copy, durably, with exactly the remaining regions dirty.
    assert!(b.part.flags().contains(Flags::RESYNC_TARGET));
    assert!(!b.part.flags().contains(Flags::CONSISTENT));
    // At most the 150 forwarded regions were cleared (a region written but
    // whose ack could not be sent any more may stay dirty: clearing late is safe).
    let left = b.part.dirty_count();
    assert!(
        (250..400).contains(&left),
        "150 regions forwarded before the cut, {left} remain dirty"
    );
    assert_ne!(a.engine.snapshot(), b.engine.snapshot());
    // An interrupted target can neither activate nor be a source.
    assert!(rules::may_activate(
        &view(&b),
        &rules::PeerKnowledge::Unreachable { node: "a".into() }
    )
    .is_err());
    let (d, rule) = rules::decide(&view(&a), &view(&b));
    assert_eq!(rule.id, "R3");
    assert_eq!(d.source(), Some(Side::Local));
    // The source cleared its bits for what the target acknowledged durable
    // (per batch; at most the unbatched tail is still set on both sides).
    let union: u64 = {
        let mut u = a.part.snapshot();
        for r in b.part.iter_dirty() {
            u.set(r, true);
        }
        u.count_ones()
    };
    // At most the window in flight at the cut (written there, its Ack2
    // lost) is copied again.
    assert!(
        union <= 400 - 150 + resync::WINDOW as u64,
        "done regions must not be in the resume set: union {union}"
    );
    // Resume: only the union crosses the link, never the whole original set.
    let out = differential(&a, &b, None).await;
    out.source.unwrap();
    out.target.unwrap();
    assert_eq!(a.engine.snapshot(), b.engine.snapshot());
    assert!(!b.part.flags().contains(Flags::RESYNC_TARGET));
    assert_eq!(
        out.data_frames, union,
        "exactly the remaining union is copied on resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_target_resumes_from_its_bitmap_not_from_zero() {
    // The target's remaining bitmap alone decides what is left when the
    // source's bits for the copied regions are gone (its bitmap only holds
    // what changed since B; here: a source whose changes were all intents
    // merged into the target at the start).
    let (a, b) = a_ahead_of_b().await;
    for r in 0..100u64 {
        change(&a, r * 10, 0x40 + r as u8).await;
    }
    let out = differential(&a, &b, Some(40)).await;
    assert!(out.target.is_err());
    let left = b.part.dirty_count();
    assert!(
        (60..100).contains(&left),
        "40 regions forwarded before the cut, {left} remain dirty"
    );
    // Regions the target holds but whose bits the source still has (the
    // unbatched tail) are cleared here as the source would at its next batch:
    // the target's bitmap alone then covers the rest (R3 reads the union).
    let remaining: Vec<u64> = b.part.iter_dirty().collect();
    let done: Vec<u64> = (0..100u64)
        .map(|r| r * 10)
        .filter(|r| !remaining.contains(r))
        .collect();
    a.part.clear_regions(done).unwrap();
    let out = differential(&a, &b, None).await;
    out.source.unwrap();
    assert_eq!(
        out.data_frames,
        remaining.len() as u64,
        "only the regions left are copied"
    );
    assert!(out.data_frames < 100);
    assert_eq!(a.engine.snapshot(), b.engine.snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_writes_during_resync_never_leave_older_data() {
    for seed in 0..4u64 {
        let (a, b) = a_ahead_of_b().await;
        for r in 0..300u64 {
            change(&a, r, r as u8).await;
        }
        let gate = WriteGate::new(REGION);
        let vol: Arc<dyn BlockEngine> = Arc::new(GatedVolume::new(
            a.engine.clone() as Arc<dyn BlockEngine>,
            gate.clone(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        // The application: small writes to hot regions (some being copied).
        let mut apps = Vec::new();
        for w in 0..3u64 {
            let (vol, stop, writes, part) =
                (vol.clone(), stop.clone(), writes.clone(), a.part.clone());
            apps.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 10 + w);
                while !stop.load(Ordering::SeqCst) {
                    let r = rng.gen_range(0..320u64);
                    let off = r * REGION + rng.gen_range(0..REGION / 512) * 512;
                    let len = 512
                        * rng
                            .gen_range(1..8u64)
                            .min((r * REGION + REGION - off) / 512);
                    // Write intent first (as the active volume does).
                    part.mark_dirty_range(off, len).unwrap();
                    let byte: u8 = rng.gen();
                    vol.write(off, Bytes::from(vec![byte; len as usize]), false)
                        .await
                        .unwrap();
                    writes.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
            }));
        }
        let out = run(&a, &b, ResyncKind::Differential, None, gate.clone(), None).await;
        let done = out.source.unwrap();
        out.target.unwrap();
        // With the gate held (replication would attach now) no write is in
        // flight: both sides must be identical.
        let (sa, sb) = (a.engine.snapshot(), b.engine.snapshot());
        let differing = (0..VOL / REGION).filter(|&r| {
            let x = (r * REGION) as usize..((r + 1) * REGION) as usize;
            sa[x.clone()] != sb[x]
        });
        let differing: Vec<u64> = differing.collect();
        assert!(
            differing.is_empty(),
            "seed {seed}: regions differ after the resync: {differing:?}"
        );
        stop.store(true, Ordering::SeqCst);
        drop(done.hold);
        for t in apps {
            t.await.unwrap();
        }
        assert!(
            writes.load(Ordering::SeqCst) > 0,
            "the application wrote during the resync"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_resync_saves_the_losers_regions_first() {
    let dir = tempfile::tempdir().unwrap();
    // Split brain since generation 10; the operator forces a.
    let a = node("a", g(20, 10), 0).await;
    let b = node("b", g(30, 10), 0).await;
    change(&a, 7, 0xaa).await;
    change(&b, 7, 0xbb).await;
    change(&b, 9, 0xb9).await;
    let (d, rule) = rules::decide_forced(Side::Local, &view(&a), &view(&b));
    assert_eq!(rule.id, "F4");
    assert_eq!(d.save_set(), Some(rules::RegionSet::UnionOfBitmaps));
    let out = run(
        &a,
        &b,
        ResyncKind::Differential,
        Some(dir.path().to_path_buf()),
        WriteGate::new(REGION),
        None,
    )
    .await;
    out.source.unwrap();
    let t = out.target.unwrap();
    let img = t.saved.expect("saved image");
    let saved = std::fs::read(&img).unwrap();
    assert_eq!(saved.len() as u64, VOL);
    assert!(region_is(&saved, 7, 0xbb), "b's version of region 7 saved");
    assert!(region_is(&saved, 9, 0xb9), "b's region 9 saved");
    let list = std::fs::read_to_string(format!("{}.regions", img.display())).unwrap();
    assert_eq!(
        list,
        format!("7 {} {REGION}\n9 {} {REGION}\n", 7 * REGION, 9 * REGION)
    );
    assert_eq!(a.engine.snapshot(), b.engine.snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_failure_refuses_the_resync_and_overwrites_nothing() {
    let a = node("a", g(20, 10), 0).await;
    let b = node("b", g(30, 10), 0).await;
    change(&a, 7, 0xaa).await;
    change(&b, 7, 0xbb).await;
    let before = b.engine.snapshot();
    // A file where the directory should be: saving cannot succeed.
    let f = tempfile::NamedTempFile::new().unwrap();
    let out = run(
        &a,
        &b,
        ResyncKind::Differential,
        Some(f.path().join("sub")),
        WriteGate::new(REGION),
        None,
    )
    .await;
    let err = out.source.unwrap_err().to_string();
    assert!(
        err.contains("refused") && err.contains("divergent_save_dir"),
        "{err}"
    );
    assert!(matches!(out.target, Err(resync::ResyncError::Save(_))));
    assert_eq!(b.engine.snapshot(), before, "nothing overwritten");
    assert!(
        !b.part.flags().contains(Flags::RESYNC_TARGET),
        "not marked inconsistent: nothing was copied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_rate_paces_the_copy() {
    let a = node("a", g(20, 0), 0x42).await;
    let b = node("b", g(30, 0), 0).await;
    // 1 MiB at 4 MiB/s takes at least ~250 ms (full resync of 64 regions).
    let small: Vec<u64> = (0..64).collect();
    let (sa, mut sb) = sessions();
    let spec = resync::SourceSpec {
        rule: "rate".into(),
        rate: Some(4 << 20),
        ..source_spec(&a, ResyncKind::Differential, WriteGate::new(REGION))
    };
    a.part.mark_dirty_regions(small.clone()).unwrap();
    let started = std::time::Instant::now();
    let source = spawn_source(spec, sa);
    let _begin = sb.rx.recv().await.unwrap();
    let tspec = target_spec(&b, std::env::temp_dir());
    let tgt_in = forward(sb.rx, None, sb.tx.clone(), Arc::new(AtomicU64::new(0)));
    let t = run_target(tspec, false, false, &sb.tx, tgt_in)
        .await
        .unwrap();
    let done = source.await.unwrap().unwrap();
    assert_eq!(t.bytes, 64 * REGION);
    assert_eq!(done.bytes, 64 * REGION);
    let el = started.elapsed();
    // The last region may go out as soon as its predecessors' time is due.
    assert!(
        el >= std::time::Duration::from_millis(230),
        "1 MiB at 4 MiB/s took only {el:?}"
    );
}
