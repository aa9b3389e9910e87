//! Property tests of the write-intent rule over the fault-injecting storage.
//!
//! A model tracks, per region, the writes whose `begin_write` returned and that have not ended,
//! and the regions that must stay dirty until a resync clear (writes that ended without the peer
//! durable, explicit marks, merges). After every operation the durable image (what survives a
//! crash losing every unsynced write) must show all those regions dirty; at the end the disk
//! "crashes" keeping a random subset of unsynced writes, some torn, and the reopened bitmap must
//! still show them dirty. The superblock must come back as the last successful update or the
//! update in progress at the crash.
//!
//! Hot extents (the activity log) are exercised with extents of 1 to 1024 regions: a coarse
//! `begin_write` must leave every region of the extents it touched durably dirty (so writes there
//! need no metadata I/O), and the extents may only ever add dirty regions. A second property
//! checks the other direction: once every write is done and the hot set is cooled, exactly the
//! regions that need resync are dirty — hot extents leak nothing.

use bitmap::layout::Geometry;
use bitmap::testing::{CrashMode, FaultyStorage};
use bitmap::*;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

const RS: u64 = 4096;
const REGIONS: u64 = 70_000;
/// Regions exercised: both ends of every chunk (32640 regions per chunk) and some neighbours.
const INTERESTING: [u64; 14] = [
    0, 1, 2, 3, 63, 64, 65, 32_639, 32_640, 32_641, 65_279, 65_280, 65_281, 69_999,
];

#[derive(Clone, Debug)]
enum Op {
    Begin(usize, u64),
    BeginExact(usize, u64),
    FastBegin(usize),
    End(usize, bool),
    FlushClears,
    Cool,
    Clear(usize),
    MarkDirty(usize),
    Merge(usize),
    UpdateSb,
    SetAll,
    ArmCrash(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let sel = 0..INTERESTING.len();
    prop_oneof![
        4 => (sel.clone(), 1u64..3).prop_map(|(s, n)| Op::Begin(s, n)),
        1 => (sel.clone(), 1u64..3).prop_map(|(s, n)| Op::BeginExact(s, n)),
        2 => sel.clone().prop_map(Op::FastBegin),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(i, d)| Op::End(i, d)),
        3 => Just(Op::FlushClears),
        1 => Just(Op::Cool),
        2 => sel.clone().prop_map(Op::Clear),
        1 => sel.clone().prop_map(Op::MarkDirty),
        1 => sel.prop_map(Op::Merge),
        1 => Just(Op::UpdateSb),
        1 => Just(Op::SetAll),
        1 => (0u64..8).prop_map(Op::ArmCrash),
    ]
}

fn params() -> CreateParams {
    CreateParams {
        resource: "r0".into(),
        node: "alpha".into(),
        volume_size: REGIONS * RS,
        data_size: REGIONS * RS,
        data_stable_id: String::new(),
        region_size: RS,
        initially_dirty: false,
    }
}

fn attach() -> AttachCheck {
    let p = params();
    AttachCheck {
        resource: p.resource,
        node: p.node,
        data_size: p.data_size,
        data_stable_id: p.data_stable_id,
    }
}

#[derive(Default)]
struct Model {
    inflight: HashMap<u64, u32>,
    sticky: HashSet<u64>,
}

impl Model {
    fn required(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .inflight
            .keys()
            .chain(self.sticky.iter())
            .copied()
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

fn check_image(
    img: Vec<u8>,
    model: &Model,
    when: &str,
) -> std::result::Result<ClusterPartition, TestCaseError> {
    let (cp, _rep) = ClusterPartition::open(MemStorage::from_vec(img), &attach())
        .map_err(|e| TestCaseError::fail(format!("{when}: reopen failed: {e}")))?;
    for r in model.required() {
        prop_assert!(
            cp.is_dirty(r),
            "{}: region {} must be dirty on disk (inflight {:?}, sticky {})",
            when,
            r,
            model.inflight.get(&r),
            model.sticky.contains(&r)
        );
    }
    Ok(cp)
}

fn run(
    ops: Vec<Op>,
    lru: usize,
    ext_shift: u32,
    seed: u64,
) -> std::result::Result<(), TestCaseError> {
    let g = Geometry::new(REGIONS * RS, RS).unwrap();
    let disk = FaultyStorage::new(g.required_partition_size() as usize);
    let cp = ClusterPartition::create(disk.clone(), &params(), false).unwrap();
    cp.set_keep_dirty_capacity(lru);
    cp.set_hot_extent_size(RS << ext_shift).unwrap();
    let ext = 1u64 << ext_shift;
    let mut model = Model::default();
    let mut tickets: Vec<WriteTicket> = Vec::new();
    let mut gen = 100u64;
    let mut last_ok_gen = cp.generations().current;
    let mut failed_gen: Option<u64> = None;

    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Begin(s, n) => {
                let r = INTERESTING[s];
                let n = n.min(REGIONS - r);
                if let Ok(t) = cp.begin_write(r * RS + 100, n * RS - 200) {
                    prop_assert_eq!(t.regions(), r..r + n);
                    for q in t.regions() {
                        *model.inflight.entry(q).or_default() += 1;
                    }
                    if lru > 0 {
                        // The whole extents are durably dirty: later writes there are fast.
                        let lo = r / ext * ext;
                        let hi = ((r + n - 1) / ext * ext + ext).min(REGIONS);
                        for q in lo..hi {
                            prop_assert!(
                                cp.is_durably_dirty(q),
                                "step {}: region {} of a hot extent is not durably dirty",
                                step,
                                q
                            );
                        }
                    }
                    tickets.push(t);
                }
            }
            Op::BeginExact(s, n) => {
                let r = INTERESTING[s];
                let n = n.min(REGIONS - r);
                if let Ok(t) = cp.begin_write_exact(r * RS, n * RS) {
                    prop_assert_eq!(t.regions(), r..r + n);
                    for q in t.regions() {
                        *model.inflight.entry(q).or_default() += 1;
                    }
                    tickets.push(t);
                }
            }
            Op::FastBegin(s) => {
                let r = INTERESTING[s];
                let durable_before = cp.is_durably_dirty(r);
                match cp.try_begin_write_fast(r * RS, 512) {
                    Some(t) => {
                        prop_assert!(durable_before);
                        *model.inflight.entry(r).or_default() += 1;
                        tickets.push(t);
                    }
                    None => prop_assert!(!durable_before || cp.poisoned().is_some()),
                }
            }
            Op::End(i, peer_durable) => {
                if !tickets.is_empty() {
                    let t = tickets.swap_remove(i % tickets.len());
                    for q in t.regions() {
                        let c = model.inflight.get_mut(&q).unwrap();
                        *c -= 1;
                        if *c == 0 {
                            model.inflight.remove(&q);
                        }
                        if !peer_durable {
                            model.sticky.insert(q);
                        }
                    }
                    cp.end_write(t, peer_durable);
                }
            }
            Op::FlushClears => {
                let _ = cp.flush_clears();
            }
            Op::Cool => {
                let _ = cp.cool_hot_extents();
            }
            Op::Clear(s) => {
                let r = INTERESTING[s];
                // Requested: from now on the region may legitimately be clean (if not in flight).
                model.sticky.remove(&r);
                let _ = cp.clear_region(r);
            }
            Op::MarkDirty(s) => {
                let r = INTERESTING[s];
                if cp.mark_dirty_range(r * RS, 1).is_ok() {
                    model.sticky.insert(r);
                }
            }
            Op::Merge(s) => {
                let r = INTERESTING[s];
                let mut other = DirtyBits::new(REGIONS);
                other.set(r, true);
                if cp.merge(&other).is_ok() {
                    model.sticky.insert(r);
                }
            }
            Op::UpdateSb => {
                gen += 1;
                let g2 = gen;
                match cp.update_superblock(|st| st.gens.current = g2) {
                    Ok(_) => last_ok_gen = g2,
                    Err(_) => {
                        failed_gen.get_or_insert(g2);
                    }
                }
            }
            Op::SetAll => {
                if cp.set_all().is_ok() {
                    model.sticky.extend(INTERESTING);
                }
            }
            Op::ArmCrash(n) => disk.crash_after_ops(n),
        }
        // In memory: nothing in flight is ever clean.
        for (&r, &n) in &model.inflight {
            prop_assert!(
                cp.is_dirty(r),
                "step {}: region {} in flight but clean in memory",
                step,
                r
            );
            prop_assert_eq!(cp.inflight(r), n);
        }
        // On stable storage, at this instant.
        check_image(
            disk.durable_image(),
            &model,
            &format!("step {step} durable image"),
        )?;
    }

    let img = disk.image_after_crash(CrashMode::Random(seed));
    let cp2 = check_image(img, &model, "after crash")?;
    let got = cp2.generations().current;
    prop_assert!(got == last_ok_gen || Some(got) == failed_gen,
        "superblock generation {} is neither the last successful update {} nor the interrupted one {:?}",
        got, last_ok_gen, failed_gen);
    drop(tickets);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn write_intent_survives_any_crash(ops in proptest::collection::vec(op(), 1..60), lru in 0usize..4,
                                       ext_shift in prop_oneof![Just(0u32), Just(1), Just(6), Just(10)],
                                       seed in any::<u64>()) {
        run(ops, lru, ext_shift, seed)?;
    }

    #[test]
    fn hot_extents_leak_no_dirty_region(ops in proptest::collection::vec(op(), 1..80), lru in 0usize..4,
                                        ext_shift in prop_oneof![Just(0u32), Just(1), Just(6), Just(10)]) {
        no_leak(ops, lru, ext_shift)?;
    }

    #[test]
    fn merge_is_durable_union(a in proptest::collection::btree_set(0..REGIONS, 0..40),
                              b in proptest::collection::btree_set(0..REGIONS, 0..40)) {
        let g = Geometry::new(REGIONS * RS, RS).unwrap();
        let disk = FaultyStorage::new(g.required_partition_size() as usize);
        let cp = ClusterPartition::create(disk.clone(), &params(), false).unwrap();
        cp.mark_dirty_regions(a.iter().copied()).unwrap();
        let mut other = DirtyBits::new(REGIONS);
        for &r in &b { other.set(r, true); }
        cp.merge(&other).unwrap();
        let want: Vec<u64> = a.union(&b).copied().collect();
        prop_assert_eq!(cp.iter_dirty().collect::<Vec<_>>(), want.clone());
        let (cp2, _) = ClusterPartition::open(MemStorage::from_vec(disk.image_after_crash(CrashMode::DropUnsynced)), &attach()).unwrap();
        prop_assert_eq!(cp2.iter_dirty().collect::<Vec<_>>(), want);
    }
}

/// Without faults: after every write ended and the hot set cooled, the dirty regions are exactly
/// those that need resync (writes not durable on the peer, explicit marks) and not cleared since.
fn no_leak(ops: Vec<Op>, lru: usize, ext_shift: u32) -> std::result::Result<(), TestCaseError> {
    let cp = ClusterPartition::create(
        MemStorage::new(
            Geometry::new(REGIONS * RS, RS)
                .unwrap()
                .required_partition_size() as usize,
        ),
        &params(),
        false,
    )
    .unwrap();
    cp.set_keep_dirty_capacity(lru);
    cp.set_hot_extent_size(RS << ext_shift).unwrap();
    let mut sticky: HashSet<u64> = HashSet::new();
    let mut tickets: Vec<WriteTicket> = Vec::new();
    for op in ops {
        match op {
            Op::Begin(s, n) => {
                let r = INTERESTING[s];
                tickets.push(cp.begin_write(r * RS, n.min(REGIONS - r) * RS).unwrap());
            }
            Op::BeginExact(s, n) => {
                let r = INTERESTING[s];
                tickets.push(
                    cp.begin_write_exact(r * RS, n.min(REGIONS - r) * RS)
                        .unwrap(),
                );
            }
            Op::FastBegin(s) => {
                if let Some(t) = cp.try_begin_write_fast(INTERESTING[s] * RS, 1) {
                    tickets.push(t);
                }
            }
            Op::End(i, peer_durable) => {
                if !tickets.is_empty() {
                    let t = tickets.swap_remove(i % tickets.len());
                    if !peer_durable {
                        sticky.extend(t.regions());
                    }
                    cp.end_write(t, peer_durable);
                }
            }
            Op::FlushClears => {
                cp.flush_clears().unwrap();
            }
            Op::Cool => {
                cp.cool_hot_extents().unwrap();
            }
            Op::Clear(s) => {
                sticky.remove(&INTERESTING[s]);
                cp.clear_region(INTERESTING[s]).unwrap();
            }
            Op::MarkDirty(s) => {
                cp.mark_dirty_range(INTERESTING[s] * RS, 1).unwrap();
                sticky.insert(INTERESTING[s]);
            }
            // Bulk operations make the whole volume (or foreign regions) sticky: not modelled here.
            Op::Merge(_) | Op::SetAll | Op::UpdateSb | Op::ArmCrash(_) => {}
        }
    }
    for t in tickets.drain(..) {
        cp.end_write(t, true);
    }
    cp.cool_hot_extents().unwrap();
    let mut want: Vec<u64> = sticky.into_iter().collect();
    want.sort_unstable();
    prop_assert_eq!(cp.iter_dirty().collect::<Vec<_>>(), want);
    prop_assert_eq!(cp.intent_count(), 0);
    Ok(())
}
