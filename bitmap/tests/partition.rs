//! Scenario tests for create/open, slot selection, corruption handling, EIO, dump and memory.

use bitmap::layout::{Geometry, BITMAP_OFFSET, BITS_PER_CHUNK, CHUNK_SIZE, SB_SLOT_SIZE};
use bitmap::testing::{CrashMode, FaultyStorage, OpKind};
use bitmap::*;
use std::sync::Arc;

const RS: u64 = 4096;

fn params(regions: u64) -> CreateParams {
    CreateParams {
        resource: "r0".into(),
        node: "alpha".into(),
        volume_size: regions * RS,
        data_size: regions * RS + 8192,
        data_stable_id: "wwn-0x5000".into(),
        region_size: RS,
        initially_dirty: false,
    }
}

fn check_for(p: &CreateParams) -> AttachCheck {
    AttachCheck {
        resource: p.resource.clone(),
        node: p.node.clone(),
        data_size: p.data_size,
        data_stable_id: p.data_stable_id.clone(),
    }
}

fn storage_for(p: &CreateParams) -> FaultyStorage {
    let g = Geometry::new(p.volume_size, p.region_size).unwrap();
    FaultyStorage::new(g.required_partition_size() as usize)
}

fn create(p: &CreateParams) -> (ClusterPartition, FaultyStorage) {
    let s = storage_for(p);
    let cp = ClusterPartition::create(s.clone(), p, false).unwrap();
    (cp, s)
}

fn reopen(img: Vec<u8>, p: &CreateParams) -> Result<(ClusterPartition, LoadReport)> {
    ClusterPartition::open(MemStorage::from_vec(img), &check_for(p))
}

#[test]
fn create_then_open_roundtrip() {
    let p = params(70_000);
    let (cp, s) = create(&p);
    assert_eq!(cp.region_count(), 70_000);
    assert_eq!(cp.chunk_count(), 3);
    assert!(cp.flags().contains(Flags::BLANK));
    assert_ne!(cp.generations().current, 0);
    let t = cp.begin_write(5 * RS, 3 * RS).unwrap();
    cp.end_write(t, false);
    let sb = cp.update_superblock(|st| {
        st.flags.remove(Flags::BLANK);
        st.flags.insert(Flags::CONSISTENT);
        st.gens.bitmap = 42;
        st.break_time = 1234;
    })
    .unwrap();
    let (cp2, rep) = reopen(s.durable_image(), &p).unwrap();
    assert!(rep.is_clean(), "{rep}");
    assert_eq!(rep.seq, sb.seq);
    assert_eq!(cp2.superblock(), sb);
    assert_eq!(cp2.iter_dirty().collect::<Vec<_>>(), vec![5, 6, 7]);
    assert_eq!(cp2.break_time(), 1234);
    assert_eq!(cp2.identity(), cp.identity());
}

#[test]
fn initially_dirty_create_is_all_dirty() {
    let mut p = params(70_000);
    p.initially_dirty = true;
    let (cp, s) = create(&p);
    assert_eq!(cp.dirty_count(), 70_000);
    let (cp2, _) = reopen(s.durable_image(), &p).unwrap();
    assert_eq!(cp2.dirty_count(), 70_000);
    assert_eq!(cp2.dirty_percent(), 100.0);
}

#[test]
fn create_refuses_existing_metadata_without_force() {
    let p = params(100);
    let (cp, s) = create(&p);
    let uuid = cp.identity().uuid;
    drop(cp);
    let img = s.durable_image();
    let mut other = p.clone();
    other.resource = "r1".into();
    let err = ClusterPartition::create(MemStorage::from_vec(img.clone()), &other, false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, MetaError::AlreadyInitialised { .. }), "{msg}");
    assert!(msg.contains("\"r0\"") && msg.contains("\"alpha\"") && msg.contains(&uuid.to_string()), "{msg}");
    let cp = ClusterPartition::create(MemStorage::from_vec(img), &other, true).unwrap();
    assert_eq!(cp.identity().resource, "r1");
    assert_ne!(cp.identity().uuid, uuid);
}

#[test]
fn create_refuses_unrecognised_content_without_force() {
    let p = params(100);
    let mut img = vec![0u8; storage_for(&p).len().unwrap() as usize];
    img[..4].copy_from_slice(b"XFSB");
    let err = ClusterPartition::create(MemStorage::from_vec(img.clone()), &p, false).unwrap_err();
    assert!(matches!(err, MetaError::Unrecognised { .. }), "{err}");
    assert!(err.to_string().contains("bad magic"), "{err}");
    ClusterPartition::create(MemStorage::from_vec(img), &p, true).unwrap();
}

#[test]
fn create_rejects_small_partition_and_bad_params() {
    let mut p = params(40_000);
    let err = ClusterPartition::create(MemStorage::new(BITMAP_OFFSET as usize + CHUNK_SIZE), &p, false).unwrap_err();
    assert!(matches!(err, MetaError::TooSmall { need, .. } if need == BITMAP_OFFSET + 2 * CHUNK_SIZE as u64), "{err}");
    p.region_size = 5000;
    assert!(matches!(ClusterPartition::create(MemStorage::new(1 << 20), &p, false), Err(MetaError::InvalidParams(_))));
    let mut p = params(10);
    p.volume_size = p.data_size + 1;
    assert!(matches!(ClusterPartition::create(MemStorage::new(1 << 20), &p, false), Err(MetaError::InvalidParams(_))));
}

#[test]
fn open_rejects_wrong_identity_naming_expected_and_found() {
    let p = params(100);
    let (_cp, s) = create(&p);
    let img = s.durable_image();
    let mut want = check_for(&p);
    want.resource = "r9".into();
    want.node = "beta".into();
    want.data_size += 1;
    want.data_stable_id = "wwn-other".into();
    let err = ClusterPartition::open(MemStorage::from_vec(img), &want).unwrap_err();
    let msg = err.to_string();
    match &err {
        MetaError::IdentityMismatch { mismatches } => assert_eq!(mismatches.len(), 4, "{msg}"),
        e => panic!("unexpected {e}"),
    }
    for s in ["resource: expected \"r9\", found \"r0\"", "node: expected \"beta\", found \"alpha\"", "data stable id", "wwn-other"] {
        assert!(msg.contains(s), "{msg} lacks {s}");
    }
}

#[test]
fn all_zero_partition_is_blank() {
    let p = params(100);
    let err = ClusterPartition::open(MemStorage::new(1 << 16), &check_for(&p)).unwrap_err();
    assert!(matches!(err, MetaError::Blank), "{err}");
    // Zero superblocks over non-zero bitmap bytes is not blank.
    let mut img = vec![0u8; 1 << 16];
    img[40_000] = 1;
    let err = ClusterPartition::open(MemStorage::from_vec(img), &check_for(&p)).unwrap_err();
    assert!(matches!(err, MetaError::ZeroSuperblocksNotBlank { offset: 40_000 }), "{err}");
    // Blank is accepted by create without force.
    ClusterPartition::create(MemStorage::new(1 << 16), &p, false).unwrap();
}

#[test]
fn garbage_is_reported_with_reason() {
    let p = params(100);
    let mut img = vec![0u8; 1 << 16];
    img[..8].copy_from_slice(b"GARBAGE!");
    let err = ClusterPartition::open(MemStorage::from_vec(img), &check_for(&p)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("slot 0: bad magic") && msg.contains("GARBAGE!") && msg.contains("slot 1: all zero"), "{msg}");
}

#[test]
fn torn_superblock_write_leaves_other_slot_valid() {
    let p = params(100);
    for prefix in [0usize, 1, 24, 100, 2048, 4095] {
        let (cp, s) = create(&p);
        let before = cp.update_superblock(|st| st.gens.current = 7).unwrap();
        s.tear_write(0, prefix);
        let err = cp.update_superblock(|st| st.gens.current = 8).unwrap_err();
        assert!(err.to_string().contains("write superblock"), "{err}");
        assert_eq!(cp.superblock(), before, "in-memory superblock unchanged on failure");
        assert!(matches!(cp.update_superblock(|_| {}), Err(MetaError::Poisoned { .. })));
        let (cp2, rep) = reopen(s.durable_image(), &p).unwrap();
        assert_eq!(cp2.generations().current, 7, "prefix {prefix}");
        assert_eq!(rep.chosen_slot, before.slot());
        if prefix > 0 {
            let (slot, why) = rep.ignored_slot.clone().expect("torn slot reported");
            assert_eq!(slot, 1 - before.slot());
            assert!(why.contains("CRC mismatch") || why.contains("magic"), "{why}");
        }
    }
}

#[test]
fn superblock_alternates_slots_and_newest_wins() {
    let p = params(100);
    let (cp, s) = create(&p);
    for i in 0..5u64 {
        let sb = cp.update_superblock(|st| st.gens.history[0] = i).unwrap();
        let (cp2, rep) = reopen(s.durable_image(), &p).unwrap();
        assert_eq!(rep.chosen_slot, sb.slot());
        assert_eq!(cp2.generations().history[0], i);
        // The previous slot still holds the previous superblock.
        assert!(matches!(rep.slots[1 - sb.slot()], SlotStatus::Valid { seq, .. } if seq == sb.seq - 1));
    }
}

#[test]
fn both_slots_corrupt_names_expected_and_actual_crc() {
    let p = params(100);
    let (_cp, s) = create(&p);
    let mut img = s.durable_image();
    img[100] ^= 0xff;
    img[SB_SLOT_SIZE + 200] ^= 0x01;
    let err = reopen(img, &p).unwrap_err();
    let msg = err.to_string();
    match &err {
        MetaError::NoValidSuperblock { slot0, slot1 } => {
            for st in [slot0, slot1] {
                match st {
                    SlotStatus::BadCrc { expected, actual, .. } => {
                        assert_ne!(expected, actual);
                        assert!(msg.contains(&format!("{expected:#010x}")) && msg.contains(&format!("{actual:#010x}")), "{msg}");
                    }
                    other => panic!("slot status {other:?}"),
                }
            }
        }
        e => panic!("unexpected {e}"),
    }
    assert!(msg.contains("slot 0") && msg.contains("slot 1") && msg.contains("expected") && msg.contains("actual"), "{msg}");
}

#[test]
fn newer_slot_with_unsupported_version_is_an_error_not_a_fallback() {
    let p = params(100);
    let (cp, s) = create(&p);
    let sb = cp.update_superblock(|_| {}).unwrap();
    let mut img = s.durable_image();
    let off = sb.slot() * SB_SLOT_SIZE;
    img[off + 8..off + 12].copy_from_slice(&2u32.to_le_bytes());
    let crc = bitmap::layout::crc_with_hole(&img[off..off + SB_SLOT_SIZE], 24);
    img[off + 24..off + 28].copy_from_slice(&crc.to_le_bytes());
    let err = reopen(img, &p).unwrap_err();
    assert!(matches!(err, MetaError::BadSuperblock { .. }), "{err}");
    assert!(err.to_string().contains("unsupported format version 2"), "{err}");
}

#[test]
fn corrupt_chunk_loads_all_dirty_and_is_reported() {
    let p = params(70_000);
    let (cp, s) = create(&p);
    let t = cp.begin_write(0, RS).unwrap();
    cp.end_write(t, false);
    let mut img = s.durable_image();
    let off = (BITMAP_OFFSET + CHUNK_SIZE as u64) as usize + 1000;
    img[off] ^= 0x40;
    let (cp2, rep) = reopen(img, &p).unwrap();
    assert_eq!(rep.bad_chunks.len(), 1);
    assert_eq!(rep.bad_chunks[0].0, 1);
    assert!(matches!(rep.bad_chunks[0].1, ChunkFault::BadCrc { .. }));
    assert!(rep.to_string().contains("chunk 1"), "{rep}");
    assert_eq!(cp2.dirty_count(), 1 + BITS_PER_CHUNK);
    assert!(cp2.is_dirty(BITS_PER_CHUNK) && cp2.is_dirty(2 * BITS_PER_CHUNK - 1));
    assert!(!cp2.is_dirty(2 * BITS_PER_CHUNK));
    assert!(cp2.is_durably_dirty(BITS_PER_CHUNK + 5));
    // A resync clear rewrites the chunk properly.
    cp2.clear_regions(BITS_PER_CHUNK..2 * BITS_PER_CHUNK).unwrap();
    assert_eq!(cp2.dirty_count(), 1);
}

#[test]
fn chunk_from_previous_create_is_rejected_by_tag() {
    let p = params(70_000);
    let (_cp, s) = create(&p);
    let old = s.durable_image();
    let (_cp2, s2) = create(&p);
    let mut img = s2.durable_image();
    let c2 = (BITMAP_OFFSET + 2 * CHUNK_SIZE as u64) as usize;
    img[c2..c2 + CHUNK_SIZE].copy_from_slice(&old[c2..c2 + CHUNK_SIZE]);
    let (_cp3, rep) = reopen(img, &p).unwrap();
    assert!(matches!(rep.bad_chunks[..], [(2, ChunkFault::TagMismatch { .. })]), "{rep}");
}

#[test]
fn eio_surfaces_with_operation_and_offset() {
    let p = params(70_000);
    // Read error while loading the bitmap.
    let (_cp, s) = create(&p);
    let s2 = FaultyStorage::from_image(s.durable_image());
    s2.fail_op(OpKind::Read, 1);
    let err = ClusterPartition::open(s2, &check_for(&p)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, MetaError::Io { offset, .. } if offset == BITMAP_OFFSET), "{msg}");
    assert!(msg.contains("read bitmap chunks") && msg.contains("offset 8192"), "{msg}");

    // Write error on a begin_write: error, not a silently clean bitmap; partition poisoned.
    let (cp, s) = create(&p);
    s.fail_op(OpKind::Write, 0);
    let err = cp.begin_write(BITS_PER_CHUNK * RS, RS).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("write bitmap chunks") && msg.contains(&format!("offset {}", BITMAP_OFFSET + CHUNK_SIZE as u64)), "{msg}");
    assert!(cp.is_dirty(BITS_PER_CHUNK), "memory stays dirty");
    assert_eq!(cp.inflight(BITS_PER_CHUNK), 0, "not counted in flight: the write was never allowed");
    assert!(matches!(cp.begin_write(0, RS), Err(MetaError::Poisoned { .. })));
    assert!(cp.try_begin_write_fast(BITS_PER_CHUNK * RS, RS).is_none());

    // Sync error.
    let (cp, s) = create(&p);
    s.fail_op(OpKind::Sync, 0);
    let err = cp.mark_dirty_range(0, RS).unwrap_err();
    assert!(err.to_string().contains("sync bitmap"), "{err}");
    assert!(matches!(cp.flush_clears(), Err(MetaError::Poisoned { .. })));
}

#[test]
fn out_of_range_is_rejected() {
    let p = params(100);
    let (cp, _s) = create(&p);
    assert!(matches!(cp.begin_write(99 * RS, 2 * RS), Err(MetaError::OutOfRange { .. })));
    assert!(matches!(cp.begin_write(u64::MAX, 2), Err(MetaError::OutOfRange { .. })));
    assert!(cp.clear_regions([100]).is_err());
    let t = cp.begin_write(5 * RS, 0).unwrap();
    assert_eq!(t.regions(), 0..0);
    cp.end_write(t, true);
}

#[test]
fn write_intent_lifecycle_with_lru() {
    let p = params(1000);
    let (cp, s) = create(&p);
    cp.set_keep_dirty_capacity(2);
    // region 1 written and acknowledged by the peer.
    let t = cp.begin_write(RS, 100).unwrap();
    assert!(cp.is_durably_dirty(1));
    // Fast path works for a durably dirty region, no I/O.
    let (_, w0, _) = s.op_counts();
    let t2 = cp.try_begin_write_fast(RS + 200, 10).expect("fast path");
    assert_eq!(s.op_counts().1, w0);
    assert_eq!(cp.inflight(1), 2);
    assert!(cp.try_begin_write_fast(2 * RS, 10).is_none(), "clean region needs the slow path");
    cp.end_write(t, true);
    assert_eq!(cp.flush_clears().unwrap(), 0, "in flight and in LRU");
    cp.end_write(t2, true);
    assert_eq!(cp.flush_clears().unwrap(), 0, "still in the keep-dirty LRU");
    // Push region 1 out of the LRU.
    for r in [2u64, 3] {
        let t = cp.begin_write(r * RS, 1).unwrap();
        cp.end_write(t, true);
    }
    assert_eq!(cp.clearable_count(), 1);
    assert_eq!(cp.flush_clears().unwrap(), 1);
    assert!(!cp.is_dirty(1));
    let (cp2, _) = reopen(s.durable_image(), &p).unwrap();
    assert_eq!(cp2.iter_dirty().collect::<Vec<_>>(), vec![2, 3], "LRU regions stay dirty on disk");

    // A write not acknowledged by the peer makes the region sticky: flush_clears never clears it.
    let t = cp.begin_write(10 * RS, 1).unwrap();
    cp.end_write(t, false);
    for r in [20u64, 21, 22] {
        let t = cp.begin_write(r * RS, 1).unwrap();
        cp.end_write(t, true);
    }
    cp.flush_clears().unwrap();
    assert!(cp.is_dirty(10));
    // Resync clears it.
    assert!(cp.clear_region(10).unwrap());
    assert!(!cp.is_dirty(10));
    // A dropped ticket counts as not peer-durable.
    let t = cp.begin_write(30 * RS, 1).unwrap();
    drop(t);
    for r in [31u64, 32, 33] {
        let t = cp.begin_write(r * RS, 1).unwrap();
        cp.end_write(t, true);
    }
    cp.flush_clears().unwrap();
    assert!(cp.is_dirty(30));
    assert_eq!(cp.inflight(30), 0);
}

#[test]
fn clear_region_with_write_in_flight_is_deferred() {
    let p = params(100);
    let (cp, _s) = create(&p);
    cp.set_keep_dirty_capacity(0);
    cp.mark_dirty_range(5 * RS, RS).unwrap();
    let t = cp.begin_write(5 * RS, RS).unwrap();
    assert!(!cp.clear_region(5).unwrap(), "not cleared while a write is in flight");
    assert!(cp.is_dirty(5));
    assert_eq!(cp.flush_clears().unwrap(), 0);
    cp.end_write(t, true);
    assert_eq!(cp.flush_clears().unwrap(), 1);
    assert!(!cp.is_dirty(5));
}

#[test]
fn set_all_merge_and_chunk_exchange() {
    let p = params(70_000);
    let (a, sa) = create(&p);
    let (b, _sb) = create(&p);
    a.mark_dirty_regions([1, 40_000]).unwrap();
    b.mark_dirty_regions([2, 69_999]).unwrap();
    for c in 0..b.chunk_count() as u32 {
        let bytes = b.export_chunk(c).unwrap();
        let chunk = a.decode_chunk(&bytes).unwrap();
        a.merge_chunk(&chunk).unwrap();
    }
    assert_eq!(a.iter_dirty().collect::<Vec<_>>(), vec![1, 2, 40_000, 69_999]);
    let (a2, _) = reopen(sa.durable_image(), &p).unwrap();
    assert_eq!(a2.iter_dirty().collect::<Vec<_>>(), vec![1, 2, 40_000, 69_999], "merge is durable");
    let mut bad = b.export_chunk(0).unwrap();
    bad[100] ^= 1;
    assert!(matches!(a.decode_chunk(&bad), Err(MetaError::BadChunk(ChunkFault::BadCrc { .. }))));
    assert!(a.export_chunk(3).is_err());
    let small = DirtyBits::new(5);
    assert!(matches!(a.merge(&small), Err(MetaError::GeometryMismatch { .. })));
    a.set_all().unwrap();
    assert_eq!(a.dirty_count(), 70_000);
    let (a3, _) = reopen(sa.durable_image(), &p).unwrap();
    assert_eq!(a3.dirty_count(), 70_000);
    assert_eq!(a3.dirty_ranges(10), vec![0..70_000]);
}

#[test]
fn concurrent_writers_share_metadata_syncs() {
    let p = params(70_000);
    let (cp, s) = create(&p);
    let cp = Arc::new(cp);
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let (_, _, syncs0) = s.op_counts();
    let handles: Vec<_> = (0..8u64)
        .map(|i| {
            let cp = cp.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for k in 0..50u64 {
                    let r = (i * 1000 + k * 7) % 70_000;
                    let t = cp.begin_write(r * RS, RS).unwrap();
                    assert!(cp.is_durably_dirty(r), "begin_write returned before the bit was durable");
                    cp.end_write(t, k % 5 != 0);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let syncs = s.op_counts().2 - syncs0;
    assert!(syncs <= 400, "at most one sync per begin_write ({syncs})");
    assert_eq!(cp.stats().syncs, syncs);
    for i in 0..8u64 {
        for k in 0..50u64 {
            assert!(cp.is_dirty((i * 1000 + k * 7) % 70_000));
        }
    }
    let n = cp.flush_clears().unwrap();
    assert!(n > 0);
    let (cp2, _) = reopen(s.durable_image(), &p).unwrap();
    assert_eq!(cp2.snapshot(), cp.snapshot());
}

#[test]
fn crash_between_create_steps_never_yields_valid_superblock_over_old_bitmap() {
    let p = params(70_000);
    let (cp, s) = create(&p);
    cp.mark_dirty_regions([3]).unwrap();
    drop(cp);
    let base = s.durable_image();
    for n in 0..6 {
        let s2 = FaultyStorage::from_image(base.clone());
        s2.crash_after_ops(n);
        let res = ClusterPartition::create(s2.clone(), &p, true);
        let img = s2.image_after_crash(CrashMode::DropUnsynced);
        match reopen(img, &p) {
            Ok((cp2, _)) => {
                assert!(res.is_ok() || n == 0, "crash after {n} ops");
                if res.is_ok() {
                    assert_eq!(cp2.dirty_count(), 0);
                } else {
                    assert!(cp2.is_dirty(3), "old metadata intact");
                }
            }
            Err(e) => assert!(matches!(e, MetaError::ZeroSuperblocksNotBlank { .. }), "crash after {n}: {e}"),
        }
    }
}

#[test]
fn memory_for_16_tib_at_64_kib_regions() {
    let vol: u64 = 16 << 40;
    let est = estimate_memory(vol, DEFAULT_REGION_SIZE, DEFAULT_KEEP_DIRTY, 4096);
    assert!(est < 40 << 20, "{est}");
    let p = CreateParams {
        resource: "big".into(),
        node: "alpha".into(),
        volume_size: vol,
        data_size: vol,
        data_stable_id: String::new(),
        region_size: DEFAULT_REGION_SIZE,
        initially_dirty: false,
    };
    let g = Geometry::new(vol, DEFAULT_REGION_SIZE).unwrap();
    assert_eq!(g.region_count, 256 << 20);
    assert_eq!(g.chunk_count, 8225);
    let cp = ClusterPartition::create(MemStorage::new(g.required_partition_size() as usize), &p, false).unwrap();
    // Some writes in flight and some in the LRU.
    let tickets: Vec<_> = (0..1000u64).map(|i| cp.begin_write(i * 7919 * DEFAULT_REGION_SIZE, 4096).unwrap()).collect();
    let used = cp.memory_bytes();
    assert!(used >= 32 << 20, "dense bitmap is 32 MiB ({used})");
    assert!(used < 64 << 20, "tracker uses {used} bytes");
    for t in tickets {
        cp.end_write(t, true);
    }
}

#[test]
fn dump_describes_everything() {
    let p = params(70_000);
    let (cp, s) = create(&p);
    cp.mark_dirty_regions([1, 2, 3, 10]).unwrap();
    cp.update_superblock(|st| st.flags.insert(Flags::RESYNC_TARGET)).unwrap();
    let mut img = s.durable_image();
    let off = (BITMAP_OFFSET + 2 * CHUNK_SIZE as u64) as usize + 50;
    img[off] ^= 1;
    let mut st = MemStorage::from_vec(img);
    let rep = dump(&mut st, 2).unwrap();
    let text = rep.to_string();
    assert_eq!(rep.dirty_count, 4 + (70_000 - 2 * BITS_PER_CHUNK));
    assert_eq!(rep.dirty_ranges, vec![1..4, 10..11]);
    assert!(rep.more_ranges);
    for s in ["resource: r0", "node: alpha", "resync-target", "regions 1..4", "bad chunk 2", "slot 0 @ 0: valid", "slot 1 @ 4096: valid", "more dirty ranges"] {
        assert!(text.contains(s), "{text}\nlacks {s}");
    }
    let mut blank = MemStorage::new(1 << 16);
    let rep = dump(&mut blank, 10).unwrap();
    assert!(rep.superblock.is_none());
    assert!(rep.to_string().contains("blank"), "{rep}");
}

#[test]
fn file_storage_end_to_end() {
    let p = params(1000);
    let tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.as_file().set_len(Geometry::new(p.volume_size, RS).unwrap().required_partition_size()).unwrap();
    let cp = ClusterPartition::create(FileStorage::open(tmp.path()).unwrap(), &p, false).unwrap();
    let t = cp.begin_write(0, 3 * RS).unwrap();
    cp.end_write(t, false);
    drop(cp);
    let (cp, rep) = ClusterPartition::open(FileStorage::open(tmp.path()).unwrap(), &check_for(&p)).unwrap();
    assert!(rep.is_clean());
    assert_eq!(cp.dirty_count(), 3);
}
