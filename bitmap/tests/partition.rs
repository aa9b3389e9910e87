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
    let t = cp.begin_write_exact(5 * RS, 3 * RS).unwrap();
    cp.end_write(t, false);
    let sb = cp
        .update_superblock(|st| {
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
    let err =
        ClusterPartition::create(MemStorage::from_vec(img.clone()), &other, false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, MetaError::AlreadyInitialised { .. }), "{msg}");
    assert!(
        msg.contains("\"r0\"") && msg.contains("\"alpha\"") && msg.contains(&uuid.to_string()),
        "{msg}"
    );
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
    let err = ClusterPartition::create(
        MemStorage::new(BITMAP_OFFSET as usize + CHUNK_SIZE),
        &p,
        false,
    )
    .unwrap_err();
    assert!(
        matches!(err, MetaError::TooSmall { need, .. } if need == BITMAP_OFFSET + 2 * CHUNK_SIZE as u64),
        "{err}"
    );
    p.region_size = 5000;
    assert!(matches!(
        ClusterPartition::create(MemStorage::new(1 << 20), &p, false),
        Err(MetaError::InvalidParams(_))
    ));
    let mut p = params(10);
    p.volume_size = p.data_size + 1;
    assert!(matches!(
        ClusterPartition::create(MemStorage::new(1 << 20), &p, false),
        Err(MetaError::InvalidParams(_))
    ));
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
    for s in [
        "resource: expected \"r9\", found \"r0\"",
        "node: expected \"beta\", found \"alpha\"",
        "data stable id",
        "wwn-other",
    ] {
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
    assert!(
        matches!(err, MetaError::ZeroSuperblocksNotBlank { offset: 40_000 }),
        "{err}"
    );
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
    assert!(
        msg.contains("slot 0: bad magic")
            && msg.contains("GARBAGE!")
            && msg.contains("slot 1: all zero"),
        "{msg}"
    );
}

#[test]
fn torn_superblock_write_leaves_other_slot_valid() {
    let p = params(100);
    // The new image differs from the slot's old one in seq (16..24), CRC (24..28), the current
    // generation (104..112) and maybe the update time (160..168); a prefix covering all
    // differences is a complete write, which must then be accepted as the newer superblock.
    for prefix in [0usize, 1, 24, 100, 111, 300, 2048] {
        let (cp, s) = create(&p);
        let before = cp.update_superblock(|st| st.gens.current = 7).unwrap();
        s.tear_write(0, prefix);
        let err = cp.update_superblock(|st| st.gens.current = 8).unwrap_err();
        assert!(err.to_string().contains("write superblock"), "{err}");
        assert_eq!(
            cp.superblock(),
            before,
            "in-memory superblock unchanged on failure"
        );
        assert!(matches!(
            cp.update_superblock(|_| {}),
            Err(MetaError::Poisoned { .. })
        ));
        let (cp2, rep) = reopen(s.durable_image(), &p).unwrap();
        // Byte 104 (the low byte of the generation, 7 -> 8) is the last byte that surely differs.
        if prefix > 104 && cp2.generations().current == 8 {
            assert_eq!(rep.chosen_slot, 1 - before.slot());
            continue;
        }
        assert_eq!(cp2.generations().current, 7, "prefix {prefix}");
        assert_eq!(rep.chosen_slot, before.slot());
        match rep.ignored_slot.clone() {
            Some((slot, why)) => {
                assert_eq!(slot, 1 - before.slot());
                assert!(
                    why.contains("CRC mismatch") || why.contains("magic"),
                    "{why}"
                );
            }
            // A prefix equal to the old contents leaves the older superblock intact.
            None => assert!(
                matches!(rep.slots[1 - before.slot()], SlotStatus::Valid { seq, .. } if seq < before.seq),
                "prefix {prefix}: {rep}"
            ),
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
        assert!(
            matches!(rep.slots[1 - sb.slot()], SlotStatus::Valid { seq, .. } if seq == sb.seq - 1)
        );
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
                    SlotStatus::BadCrc {
                        expected, actual, ..
                    } => {
                        assert_ne!(expected, actual);
                        assert!(
                            msg.contains(&format!("{expected:#010x}"))
                                && msg.contains(&format!("{actual:#010x}")),
                            "{msg}"
                        );
                    }
                    other => panic!("slot status {other:?}"),
                }
            }
        }
        e => panic!("unexpected {e}"),
    }
    assert!(
        msg.contains("slot 0")
            && msg.contains("slot 1")
            && msg.contains("expected")
            && msg.contains("actual"),
        "{msg}"
    );
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
    assert!(
        err.to_string().contains("unsupported format version 2"),
        "{err}"
    );
}

#[test]
fn corrupt_chunk_loads_all_dirty_and_is_reported() {
    let p = params(70_000);
    let (cp, s) = create(&p);
    let t = cp.begin_write_exact(0, RS).unwrap();
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
    cp2.clear_regions(BITS_PER_CHUNK..2 * BITS_PER_CHUNK)
        .unwrap();
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
    assert!(
        matches!(rep.bad_chunks[..], [(2, ChunkFault::TagMismatch { .. })]),
        "{rep}"
    );
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
    assert!(
        matches!(err, MetaError::Io { offset, .. } if offset == BITMAP_OFFSET),
        "{msg}"
    );
    assert!(
        msg.contains("read bitmap chunks") && msg.contains("offset 8192"),
        "{msg}"
    );

    // Write error on a begin_write: error, not a silently clean bitmap; partition poisoned.
    let (cp, s) = create(&p);
    s.fail_op(OpKind::Write, 0);
    let err = cp.begin_write_exact(BITS_PER_CHUNK * RS, RS).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("write bitmap chunks")
            && msg.contains(&format!("offset {}", BITMAP_OFFSET + CHUNK_SIZE as u64)),
        "{msg}"
    );
    assert!(cp.is_dirty(BITS_PER_CHUNK), "memory stays dirty");
    assert_eq!(
        cp.inflight(BITS_PER_CHUNK),
        0,
        "not counted in flight: the write was never allowed"
    );
    assert!(matches!(
        cp.begin_write(0, RS),
        Err(MetaError::Poisoned { .. })
    ));
    assert!(cp.try_begin_write_fast(BITS_PER_CHUNK * RS, RS).is_none());

    // Sync error.
    let (cp, s) = create(&p);
    s.fail_op(OpKind::Sync, 0);
    let err = cp.mark_dirty_range(0, RS).unwrap_err();
    assert!(err.to_string().contains("sync bitmap"), "{err}");
    assert!(matches!(cp.flush_clears(), Err(MetaError::Poisoned { .. })));
}

/// `check_writable` rewrites the spare superblock slot with what it holds: nothing on the disk
/// changes, and a write torn at any point (a crash during the check) leaves the current
/// superblock the one `open` picks.
#[test]
fn writable_check_changes_nothing_and_a_torn_check_keeps_the_superblock() {
    let p = params(100);
    let (cp, s) = create(&p);
    cp.update_superblock(|st| st.gens.current = 7).unwrap();
    let sb = cp.update_superblock(|st| st.gens.current = 8).unwrap();
    let before = s.durable_image();
    let (_, _, syncs) = s.op_counts();
    cp.check_writable().unwrap();
    assert_eq!(
        s.op_counts().2,
        syncs + 1,
        "the check reaches stable storage"
    );
    assert_eq!(s.durable_image(), before, "the check changes no byte");
    assert_eq!(cp.stats().checks, 1);
    assert_eq!(cp.superblock(), sb);
    // A write + sync that succeeded recently already showed the device takes writes.
    let ops = s.op_counts();
    assert!(!cp
        .check_writable_unless_synced_within(Some(std::time::Duration::from_secs(3600)))
        .unwrap());
    assert_eq!(s.op_counts(), ops, "skipped: no I/O");
    assert!(cp
        .check_writable_unless_synced_within(Some(std::time::Duration::ZERO))
        .unwrap());
    assert_eq!(cp.stats().checks, 2);

    for prefix in [0usize, 1, 100, 2048, 4095] {
        let (cp, s) = create(&p);
        cp.update_superblock(|st| st.gens.current = 7).unwrap();
        let sb = cp.update_superblock(|st| st.gens.current = 8).unwrap();
        s.tear_write(0, prefix);
        let err = cp.check_writable().unwrap_err();
        assert!(
            err.to_string()
                .contains("check: rewrite spare superblock slot"),
            "{err}"
        );
        let (cp2, rep) = reopen(s.durable_image(), &p).unwrap();
        assert_eq!(cp2.superblock(), sb, "prefix {prefix}");
        assert_eq!(rep.chosen_slot, sb.slot());
    }
}

/// A cluster partition that fails the check (read, write or sync) is poisoned as by any failed
/// metadata write: the error names the step, and no write intent or superblock update passes.
#[test]
fn a_failed_writable_check_poisons_the_partition() {
    let p = params(100);
    for (kind, what) in [
        (OpKind::Read, "check: read spare superblock slot"),
        (OpKind::Write, "check: rewrite spare superblock slot"),
        (OpKind::Sync, "sync"),
    ] {
        let (cp, s) = create(&p);
        s.fail_op(kind, 0);
        let err = cp.check_writable().unwrap_err();
        assert!(err.to_string().contains(what), "{kind:?}: {err}");
        let why = cp.poisoned().expect("poisoned");
        assert!(why.contains(what), "{kind:?}: {why}");
        assert_eq!(cp.stats().checks, 0);
        assert!(matches!(
            cp.begin_write(0, RS),
            Err(MetaError::Poisoned { .. })
        ));
        assert!(matches!(
            cp.update_superblock(|_| {}),
            Err(MetaError::Poisoned { .. })
        ));
        assert!(matches!(
            cp.check_writable(),
            Err(MetaError::Poisoned { .. })
        ));
    }
}

#[test]
fn out_of_range_is_rejected() {
    let p = params(100);
    let (cp, _s) = create(&p);
    assert!(matches!(
        cp.begin_write(99 * RS, 2 * RS),
        Err(MetaError::OutOfRange { .. })
    ));
    assert!(matches!(
        cp.begin_write(u64::MAX, 2),
        Err(MetaError::OutOfRange { .. })
    ));
    assert!(cp.clear_regions([100]).is_err());
    let t = cp.begin_write(5 * RS, 0).unwrap();
    assert_eq!(t.regions(), 0..0);
    cp.end_write(t, true);
}

#[test]
fn write_intent_lifecycle_with_lru() {
    let p = params(1000);
    let (cp, s) = create(&p);
    // One region per extent: the LRU of single regions.
    cp.set_hot_extent_size(RS).unwrap();
    assert_eq!(cp.hot_extent_size(), RS);
    cp.set_keep_dirty_capacity(2);
    // region 1 written and acknowledged by the peer.
    let t = cp.begin_write(RS, 100).unwrap();
    assert!(cp.is_durably_dirty(1));
    // Fast path works for a durably dirty region, no I/O.
    let (_, w0, _) = s.op_counts();
    let t2 = cp.try_begin_write_fast(RS + 200, 10).expect("fast path");
    assert_eq!(s.op_counts().1, w0);
    assert_eq!(cp.inflight(1), 2);
    assert!(
        cp.try_begin_write_fast(2 * RS, 10).is_none(),
        "clean region needs the slow path"
    );
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
    assert_eq!(
        cp2.iter_dirty().collect::<Vec<_>>(),
        vec![2, 3],
        "LRU regions stay dirty on disk"
    );

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
    assert!(
        !cp.clear_region(5).unwrap(),
        "not cleared while a write is in flight"
    );
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
    assert_eq!(
        a.iter_dirty().collect::<Vec<_>>(),
        vec![1, 2, 40_000, 69_999]
    );
    let (a2, _) = reopen(sa.durable_image(), &p).unwrap();
    assert_eq!(
        a2.iter_dirty().collect::<Vec<_>>(),
        vec![1, 2, 40_000, 69_999],
        "merge is durable"
    );
    let mut bad = b.export_chunk(0).unwrap();
    bad[100] ^= 1;
    assert!(matches!(
        a.decode_chunk(&bad),
        Err(MetaError::BadChunk(ChunkFault::BadCrc { .. }))
    ));
    assert!(a.export_chunk(3).is_err());
    let small = DirtyBits::new(5);
    assert!(matches!(
        a.merge(&small),
        Err(MetaError::GeometryMismatch { .. })
    ));
    a.set_all().unwrap();
    assert_eq!(a.dirty_count(), 70_000);
    let (a3, _) = reopen(sa.durable_image(), &p).unwrap();
    assert_eq!(a3.dirty_count(), 70_000);
    assert_eq!(a3.dirty_ranges(10), vec![0..70_000]);
}

/// Reads region `r`'s bit from a raw partition image.
fn bit_in_image(img: &[u8], r: u64) -> bool {
    let (c, i) = (r / BITS_PER_CHUNK, r % BITS_PER_CHUNK);
    let byte = (BITMAP_OFFSET + c * CHUNK_SIZE as u64) as usize + 16 + (i / 8) as usize;
    img[byte] >> (i % 8) & 1 == 1
}

fn region_for(i: u64, k: u64) -> u64 {
    // Odd steps hit a small shared set, so threads race on the same regions and chunks.
    if k.is_multiple_of(2) {
        (i * 1000 + k * 7) % 70_000
    } else {
        (k * 31 + i) % 17
    }
}

#[test]
fn concurrent_writers_and_clears_keep_write_intent() {
    let p = params(70_000);
    let (cp, s) = create(&p);
    cp.set_keep_dirty_capacity(4);
    let cp = Arc::new(cp);
    let barrier = Arc::new(std::sync::Barrier::new(9));
    let (_, _, syncs0) = s.op_counts();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clearer = {
        let (cp, barrier, stop) = (cp.clone(), barrier.clone(), stop.clone());
        std::thread::spawn(move || {
            barrier.wait();
            let mut cleared = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                cleared += cp.flush_clears().unwrap();
                std::thread::yield_now();
            }
            cleared
        })
    };
    let handles: Vec<_> = (0..8u64)
        .map(|i| {
            let cp = cp.clone();
            let barrier = barrier.clone();
            let s = s.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut calls = 0u64;
                for k in 0..50u64 {
                    let r = region_for(i, k);
                    let t = match cp.try_begin_write_fast(r * RS, RS) {
                        Some(t) => t,
                        None => {
                            calls += 1;
                            cp.begin_write(r * RS, RS).unwrap()
                        }
                    };
                    assert!(
                        cp.is_durably_dirty(r),
                        "region {r} not durably dirty after begin_write"
                    );
                    assert!(
                        bit_in_image(&s.durable_image(), r),
                        "region {r} not dirty in the durable image"
                    );
                    cp.end_write(t, k % 5 != 0);
                }
                calls
            })
        })
        .collect();
    let slow_calls: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cleared = clearer.join().unwrap();
    // Group commit: never more than one bitmap flush per slow-path begin_write plus the clearer's.
    assert!(
        cp.stats().flushes <= slow_calls + cleared as u64,
        "{:?} slow {slow_calls}",
        cp.stats()
    );
    assert_eq!(cp.stats().syncs, s.op_counts().2 - syncs0);
    for i in 0..8u64 {
        for k in (0..50u64).filter(|k| k % 5 == 0) {
            assert!(
                cp.is_dirty(region_for(i, k)),
                "peer-not-durable write must leave the region dirty"
            );
        }
    }
    cp.flush_clears().unwrap();
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
                // Either the new metadata (create finished) or the old one (zeroing not durable).
                if res.is_ok() {
                    assert_eq!(cp2.dirty_count(), 0);
                } else {
                    assert!(cp2.is_dirty(3), "old metadata intact");
                }
            }
            Err(e) => assert!(
                matches!(e, MetaError::ZeroSuperblocksNotBlank { .. }),
                "crash after {n}: {e}"
            ),
        }
    }
}

#[test]
fn memory_for_16_tib_at_64_kib_regions() {
    let vol: u64 = 16 << 40;
    let est = estimate_memory(
        vol,
        DEFAULT_REGION_SIZE,
        DEFAULT_KEEP_DIRTY,
        DEFAULT_HOT_EXTENT_SIZE,
        4096,
    );
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
    let cp = ClusterPartition::create(
        MemStorage::new(g.required_partition_size() as usize),
        &p,
        false,
    )
    .unwrap();
    // Some writes in flight and some in the LRU.
    let tickets: Vec<_> = (0..1000u64)
        .map(|i| {
            cp.begin_write(i * 7919 * DEFAULT_REGION_SIZE, 4096)
                .unwrap()
        })
        .collect();
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
    cp.update_superblock(|st| st.flags.insert(Flags::RESYNC_TARGET))
        .unwrap();
    let mut img = s.durable_image();
    let off = (BITMAP_OFFSET + 2 * CHUNK_SIZE as u64) as usize + 50;
    img[off] ^= 1;
    let mut st = MemStorage::from_vec(img);
    let rep = dump(&mut st, 2).unwrap();
    let text = rep.to_string();
    assert_eq!(rep.dirty_count, 4 + (70_000 - 2 * BITS_PER_CHUNK));
    assert_eq!(rep.dirty_ranges, vec![1..4, 10..11]);
    assert!(rep.more_ranges);
    for s in [
        "resource: r0",
        "node: alpha",
        "resync-target",
        "regions 1..4",
        "bad chunk 2",
        "slot 0 @ 0: valid",
        "slot 1 @ 4096: valid",
        "more dirty ranges",
    ] {
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
    tmp.as_file()
        .set_len(
            Geometry::new(p.volume_size, RS)
                .unwrap()
                .required_partition_size(),
        )
        .unwrap();
    let cp = ClusterPartition::create(FileStorage::open(tmp.path()).unwrap(), &p, false).unwrap();
    let t = cp.begin_write_exact(0, 3 * RS).unwrap();
    cp.end_write(t, false);
    drop(cp);
    let (cp, rep) =
        ClusterPartition::open(FileStorage::open(tmp.path()).unwrap(), &check_for(&p)).unwrap();
    assert!(rep.is_clean());
    assert_eq!(cp.dirty_count(), 3);
}

/// A storage whose syncs block until the test opens the gate.
#[derive(Clone)]
struct GatedStorage {
    mem: Arc<std::sync::Mutex<MemStorage>>,
    gate: Arc<(std::sync::Mutex<(bool, u64)>, std::sync::Condvar)>,
}

impl MetaStorage for GatedStorage {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.lock().unwrap().read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.mem.lock().unwrap().write_at(offset, buf)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        let (m, cv) = &*self.gate;
        let mut st = m.lock().unwrap();
        st.1 += 1;
        cv.notify_all();
        while !st.0 {
            st = cv.wait(st).unwrap();
        }
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.mem.lock().unwrap().len()
    }
}

struct OpenGate<'a>(&'a GatedStorage);

impl Drop for OpenGate<'_> {
    fn drop(&mut self) {
        let (m, cv) = &*self.0.gate;
        m.lock().unwrap_or_else(|p| p.into_inner()).0 = true;
        cv.notify_all();
    }
}

#[test]
fn group_commit_shares_one_sync_among_waiters() {
    let p = params(70_000);
    let g = Geometry::new(p.volume_size, RS).unwrap();
    let gs = GatedStorage {
        mem: Arc::new(std::sync::Mutex::new(MemStorage::new(
            g.required_partition_size() as usize,
        ))),
        gate: Arc::new((std::sync::Mutex::new((true, 0)), std::sync::Condvar::new())),
    };
    let cp = ClusterPartition::create(gs.clone(), &p, false).unwrap();
    // One region per extent: each writer's single region is in its own chunk.
    cp.set_hot_extent_size(RS).unwrap();
    let (m, cv) = &*gs.gate;
    let base_syncs = {
        let mut st = m.lock().unwrap();
        st.0 = false; // close the gate
        st.1
    };
    std::thread::scope(|s| {
        let _open_on_panic = OpenGate(&gs);
        let first = s.spawn(|| {
            let t = cp.begin_write(0, RS).unwrap();
            cp.end_write(t, true);
        });
        // Wait until the first flusher is inside sync.
        {
            let mut st = m.lock().unwrap();
            while st.1 == base_syncs {
                st = cv.wait(st).unwrap();
            }
        }
        let others: Vec<_> = [100u64, 40_000, 69_000]
            .into_iter()
            .map(|r| {
                let cp = &cp;
                s.spawn(move || {
                    let t = cp.begin_write(r * RS, RS).unwrap();
                    assert!(cp.is_durably_dirty(r));
                    cp.end_write(t, true);
                })
            })
            .collect();
        // Readiness: all three are queued behind the running flush.
        while cp.stats().commit_waits < 3 {
            std::thread::yield_now();
        }
        {
            let mut st = m.lock().unwrap();
            st.0 = true;
            cv.notify_all();
        }
        first.join().unwrap();
        for h in others {
            h.join().unwrap();
        }
    });
    let stats = cp.stats();
    assert_eq!(
        stats.flushes, 2,
        "one flush for the first writer, one shared by the other three: {stats:?}"
    );
    assert_eq!(
        stats.chunk_writes,
        1 + 3,
        "three different chunks in the shared flush"
    );
    assert_eq!(m.lock().unwrap().1 - base_syncs, 2);
}

#[test]
fn no_ticket_before_the_bit_is_durable_and_fast_path_is_per_region() {
    let p = params(70_000);
    let g = Geometry::new(p.volume_size, RS).unwrap();
    let gs = GatedStorage {
        mem: Arc::new(std::sync::Mutex::new(MemStorage::new(
            g.required_partition_size() as usize,
        ))),
        gate: Arc::new((std::sync::Mutex::new((true, 0)), std::sync::Condvar::new())),
    };
    let cp = ClusterPartition::create(gs.clone(), &p, false).unwrap();
    cp.mark_dirty_regions([7]).unwrap(); // durable before the gate closes
    let (m, cv) = &*gs.gate;
    let base_syncs = {
        let mut st = m.lock().unwrap();
        st.0 = false;
        st.1
    };
    let returned = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // If an assertion fails, open the gate so the scope's threads finish and the test fails
        // instead of hanging.
        let _open_on_panic = OpenGate(&gs);
        let a = s.spawn(|| {
            let t = cp.begin_write(5 * RS, RS).unwrap();
            cp.end_write(t, true);
        });
        {
            let mut st = m.lock().unwrap();
            while st.1 == base_syncs {
                st = cv.wait(st).unwrap();
            }
        }
        // Region 5's chunk write is issued but not synced.
        assert!(cp.is_dirty(5) && !cp.is_durably_dirty(5));
        assert!(cp.try_begin_write_fast(5 * RS, RS).is_none());
        // Region 7 in the same chunk was durable already: the fast path still serves it.
        let t7 = cp
            .try_begin_write_fast(7 * RS, RS)
            .expect("durable region in a chunk being flushed");
        cp.end_write(t7, true);
        let b = s.spawn(|| {
            let t = cp.begin_write(5 * RS + 512, 512).unwrap();
            returned.store(true, std::sync::atomic::Ordering::SeqCst);
            cp.end_write(t, true);
        });
        while cp.stats().commit_waits < 1 {
            assert!(
                !returned.load(std::sync::atomic::Ordering::SeqCst),
                "second begin_write returned while region 5 was not yet durable"
            );
            std::thread::yield_now();
        }
        assert!(!returned.load(std::sync::atomic::Ordering::SeqCst));
        {
            let mut st = m.lock().unwrap();
            st.0 = true;
            cv.notify_all();
        }
        a.join().unwrap();
        b.join().unwrap();
    });
    assert!(returned.into_inner());
    assert!(cp.is_durably_dirty(5));
}

/// MemStorage whose superblock writes wait until the test opens the gate.
struct HeldSuperblock {
    inner: MemStorage,
    entered: std::sync::mpsc::Sender<()>,
    open: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>,
}

impl MetaStorage for HeldSuperblock {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        if offset < BITMAP_OFFSET {
            let _ = self.entered.send(());
            self.open.lock().unwrap().recv().unwrap();
        }
        self.inner.write_at(offset, buf)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
}

#[test]
fn superblock_readers_do_not_wait_for_a_slow_superblock_write() {
    // Status reads generations while a break is being recorded on a hung
    // metadata disk: it must see the old durable state, not block.
    let p = params(64);
    let img = {
        let (cp, s) = create(&p);
        drop(cp);
        s.durable_image()
    };
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    let st = HeldSuperblock {
        inner: MemStorage::from_vec(img),
        entered: entered_tx,
        open: Arc::new(std::sync::Mutex::new(open_rx)),
    };
    let (cp, _) = ClusterPartition::open(st, &check_for(&p)).unwrap();
    let cp = Arc::new(cp);
    let before = cp.superblock();
    let writer = {
        let cp = cp.clone();
        std::thread::spawn(move || cp.update_superblock(|s| s.break_time = 1234).unwrap())
    };
    entered_rx.recv().unwrap();
    // The write is in progress and held: readers get the old, durable state.
    assert_eq!(cp.break_time(), before.state.break_time);
    assert_eq!(cp.superblock().seq, before.seq);
    open_tx.send(()).unwrap();
    let after = writer.join().unwrap();
    assert_eq!(after.seq, before.seq + 1);
    assert_eq!(cp.break_time(), 1234);
}

#[test]
fn hot_extent_is_marked_whole_with_one_metadata_write() {
    let p = params(10_000);
    let (cp, s) = create(&p);
    assert_eq!(cp.keep_dirty_capacity(), DEFAULT_KEEP_DIRTY);
    assert_eq!(cp.hot_extent_size(), DEFAULT_HOT_EXTENT_SIZE);
    cp.set_hot_extent_size(64 * RS).unwrap();
    cp.set_keep_dirty_capacity(2);
    let (_, w0, s0) = s.op_counts();
    let t = cp.begin_write(130 * RS, 10).unwrap();
    let (_, w1, s1) = s.op_counts();
    assert_eq!((w1 - w0, s1 - s0), (1, 1), "one chunk write + one sync");
    // The whole extent 128..192 is durably dirty, on disk too.
    let (cp2, _) = reopen(s.durable_image(), &p).unwrap();
    assert_eq!(cp2.dirty_ranges(10), vec![128..192]);
    assert_eq!(cp.intent_count(), 64);
    assert_eq!(cp.hot_extent_count(), 1);
    // Every other region of the extent: fast path, no I/O.
    let mut ts = vec![t];
    for r in (128..192).step_by(7) {
        ts.push(
            cp.try_begin_write_fast(r * RS, RS)
                .expect("hot extent: fast path"),
        );
    }
    assert_eq!(s.op_counts().1, w1);
    assert!(
        cp.try_begin_write_fast(192 * RS, 1).is_none(),
        "next extent is cold"
    );
    for t in ts {
        cp.end_write(t, true);
    }
    assert_eq!(cp.flush_clears().unwrap(), 0, "hot extent stays dirty");
    // A range over an extent boundary marks both extents.
    let t = cp.begin_write(255 * RS, 2 * RS).unwrap();
    assert_eq!(cp.dirty_ranges(10), vec![128..320]);
    cp.end_write(t, true);
    // Capacity 2: that write made extents 3 and 4 hot, evicting extent 2 (128..192); one more
    // extent evicts extent 3 (192..256).
    assert_eq!(cp.clearable_count(), 64);
    let t = cp.begin_write(1000 * RS, 1).unwrap();
    cp.end_write(t, true);
    assert_eq!(cp.hot_extent_count(), 2);
    assert_eq!(cp.clearable_count(), 128);
    assert_eq!(cp.flush_clears().unwrap(), 128);
    assert_eq!(cp.dirty_ranges(10), vec![256..320, 960..1024]);
    // The last region is in a short extent (10_000 is not a multiple of 64).
    let t = cp.begin_write(9_999 * RS, 1).unwrap();
    assert!(cp.is_durably_dirty(9_984) && cp.is_durably_dirty(9_999));
    cp.end_write(t, true);
    // Cooling clears every intent region; sticky ones stay.
    let t = cp.begin_write(300 * RS, 1).unwrap();
    cp.end_write(t, false);
    let cooled = cp.cool_hot_extents().unwrap();
    assert_eq!(cp.hot_extent_count(), 0);
    assert_eq!(cp.iter_dirty().collect::<Vec<_>>(), vec![300]);
    assert_eq!(cooled as u64, 64 + 64 + 16 - 1);
    let (cp3, _) = reopen(s.durable_image(), &p).unwrap();
    assert_eq!(cp3.iter_dirty().collect::<Vec<_>>(), vec![300]);
}

#[test]
fn exact_writes_and_disabled_lru_mark_only_the_written_regions() {
    let p = params(1000);
    let (cp, _s) = create(&p);
    cp.set_hot_extent_size(64 * RS).unwrap();
    let t = cp.begin_write_exact(70 * RS, RS).unwrap();
    assert_eq!(cp.iter_dirty().collect::<Vec<_>>(), vec![70]);
    assert_eq!(cp.hot_extent_count(), 0);
    cp.end_write(t, false);
    cp.set_keep_dirty_capacity(0);
    let t = cp.begin_write(200 * RS, RS).unwrap();
    assert_eq!(cp.iter_dirty().collect::<Vec<_>>(), vec![70, 200]);
    cp.end_write(t, true);
    assert_eq!(cp.flush_clears().unwrap(), 1);
    assert_eq!(cp.iter_dirty().collect::<Vec<_>>(), vec![70]);
}

#[test]
fn resync_clear_inside_a_hot_extent_is_deferred_until_it_cools() {
    let p = params(1000);
    let (cp, _s) = create(&p);
    cp.set_hot_extent_size(16 * RS).unwrap();
    cp.mark_dirty_regions([5]).unwrap();
    let t = cp.begin_write(3 * RS, 1).unwrap();
    cp.end_write(t, true);
    assert!(
        cp.is_dirty(5),
        "sticky region stays sticky when its extent turns hot"
    );
    assert_eq!(cp.flush_clears().unwrap(), 0);
    assert_eq!(cp.clear_regions([5]).unwrap(), 0, "hot: deferred");
    assert!(cp.is_dirty(5));
    assert_eq!(cp.cool_hot_extents().unwrap(), 16);
    assert_eq!(cp.dirty_count(), 0);
}

#[test]
fn hot_extent_size_is_validated() {
    let p = params(100);
    let (cp, _s) = create(&p);
    assert!(cp.set_hot_extent_size(3 * RS).is_err());
    assert!(cp.set_hot_extent_size(RS * MAX_EXTENT_REGIONS * 2).is_err());
    cp.set_hot_extent_size(RS * MAX_EXTENT_REGIONS).unwrap();
    cp.set_hot_extent_size(512).unwrap();
    assert_eq!(cp.hot_extent_size(), RS, "at least one region");
}

#[test]
fn deferred_clear_is_in_memory_until_wait_durable_and_a_later_mark_wins() {
    let p = params(100);
    let (cp, s) = create(&p);
    cp.mark_dirty_regions([5, 6]).unwrap();
    let (cleared, epoch) = cp.clear_regions_deferred([5, 6]).unwrap();
    assert_eq!(cleared, 2);
    let epoch = epoch.expect("something was cleared");
    assert!(
        !cp.is_dirty(5) && !cp.is_dirty(6),
        "cleared in memory at once"
    );
    // Not on disk yet: a crash now keeps both bits (the regions are copied again).
    let (crashed, _) = reopen(s.durable_image(), &p).unwrap();
    assert_eq!(crashed.iter_dirty().collect::<Vec<_>>(), vec![5, 6]);
    // A write to region 6 after the clear sets its bit again; the commit of
    // the clear must not undo that.
    cp.mark_dirty_regions([6]).unwrap();
    cp.wait_durable(epoch).unwrap();
    let (after, _) = reopen(s.durable_image(), &p).unwrap();
    assert_eq!(after.iter_dirty().collect::<Vec<_>>(), vec![6]);
    // Nothing cleared: no epoch to wait for.
    assert_eq!(cp.clear_regions_deferred([7]).unwrap(), (0, None));
}
