//! Fault injection for tests: [`FaultyStorage`] models a disk with a volatile write cache.
//!
//! * Writes go to a cache; `sync` makes them durable. A crash keeps the durable image and, per
//!   [`CrashMode`], none, all, or a random subset (some torn) of the unsynced writes.
//! * A crash point fires after N further write/sync operations ([`FaultyStorage::crash_after_ops`]);
//!   from then on every operation fails with EIO, like a dead machine.
//! * A torn write ([`FaultyStorage::tear_write`]) applies only a prefix of one write to the durable
//!   image and crashes at that instant (power lost mid-write).
//! * EIO can be injected on the Nth read, write or sync ([`FaultyStorage::fail_op`]).
//!
//! Clones share state, so a test keeps a handle after giving one to `ClusterPartition`.
//!
//! [`fuzz_metadata`] is the body of the `metadata` fuzz target (`bitmap/fuzz`), also run by
//! the test suite on generated inputs.

use crate::storage::{range_check, MetaStorage};
use rand::{Rng, SeedableRng};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Kind of storage operation, for fault rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `sync`.
    Sync,
}

/// What survives of unsynced writes at a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced write is lost.
    DropUnsynced,
    /// Every unsynced write made it.
    KeepUnsynced,
    /// Each unsynced write independently made it, was lost, or was torn (a random prefix made it).
    Random(u64),
}

#[derive(Debug, Default)]
struct State {
    durable: Vec<u8>,
    view: Vec<u8>,
    unsynced: Vec<(u64, Vec<u8>)>,
    crashed: bool,
    crash_after: Option<u64>,
    tear: Option<(u64, usize)>,
    fail: Vec<(OpKind, u64)>,
    reads: u64,
    writes: u64,
    syncs: u64,
}

/// A fault-injecting in-memory disk with a volatile cache. See the module doc.
#[derive(Clone, Debug)]
pub struct FaultyStorage {
    st: Arc<Mutex<State>>,
}

fn eio(what: &str) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(libc::EIO).kind(),
        what.to_owned(),
    )
}

fn injected_eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl FaultyStorage {
    /// A zero-filled disk of `len` bytes.
    pub fn new(len: usize) -> FaultyStorage {
        FaultyStorage::from_image(vec![0; len])
    }

    /// A disk whose durable contents are `image`.
    pub fn from_image(image: Vec<u8>) -> FaultyStorage {
        let st = State {
            view: image.clone(),
            durable: image,
            ..State::default()
        };
        FaultyStorage {
            st: Arc::new(Mutex::new(st)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Crash after `n` more write/sync operations have completed (n = 0: at the next one).
    pub fn crash_after_ops(&self, n: u64) {
        let mut st = self.lock();
        st.crash_after = Some(st.writes + st.syncs + n);
    }

    /// Crash now: later operations fail with EIO.
    pub fn crash_now(&self) {
        self.lock().crashed = true;
    }

    /// True once crashed.
    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// The `nth` write from now (0 = next) applies only its first `prefix` bytes durably, fails,
    /// and the disk crashes at that instant.
    pub fn tear_write(&self, nth: u64, prefix: usize) {
        let mut st = self.lock();
        st.tear = Some((st.writes + nth, prefix));
    }

    /// The `nth` operation of `kind` from now (0 = next) fails with EIO (once; no crash).
    pub fn fail_op(&self, kind: OpKind, nth: u64) {
        let mut st = self.lock();
        let base = match kind {
            OpKind::Read => st.reads,
            OpKind::Write => st.writes,
            OpKind::Sync => st.syncs,
        };
        st.fail.push((kind, base + nth));
    }

    /// (reads, writes, syncs) performed so far (including failed ones).
    pub fn op_counts(&self) -> (u64, u64, u64) {
        let st = self.lock();
        (st.reads, st.writes, st.syncs)
    }

    /// The durable image (what survives a crash that loses every unsynced write).
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// What reads currently return (durable + unsynced writes).
    pub fn current_view(&self) -> Vec<u8> {
        self.lock().view.clone()
    }

    /// Marks the disk crashed and returns the image found at the next power-on.
    pub fn image_after_crash(&self, mode: CrashMode) -> Vec<u8> {
        let mut st = self.lock();
        st.crashed = true;
        let mut img = st.durable.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(match mode {
            CrashMode::Random(s) => s,
            _ => 0,
        });
        for (off, data) in &st.unsynced {
            let off = *off as usize;
            let keep = match mode {
                CrashMode::DropUnsynced => 0,
                CrashMode::KeepUnsynced => data.len(),
                CrashMode::Random(_) => match rng.gen_range(0..3) {
                    0 => 0,
                    1 => data.len(),
                    _ => rng.gen_range(0..=data.len()),
                },
            };
            img[off..off + keep].copy_from_slice(&data[..keep]);
        }
        img
    }

    fn take_fail(st: &mut State, kind: OpKind, n: u64) -> bool {
        if let Some(i) = st.fail.iter().position(|&(k, at)| k == kind && at == n) {
            st.fail.swap_remove(i);
            true
        } else {
            false
        }
    }

    fn count_mutation(st: &mut State) -> bool {
        if let Some(at) = st.crash_after {
            if st.writes + st.syncs >= at {
                st.crashed = true;
            }
        }
        st.crashed
    }
}

impl MetaStorage for FaultyStorage {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut st = self.lock();
        if st.crashed {
            return Err(eio("simulated crash: device gone"));
        }
        let n = st.reads;
        st.reads += 1;
        if Self::take_fail(&mut st, OpKind::Read, n) {
            return Err(injected_eio());
        }
        let r = range_check(st.view.len(), offset, buf.len())?;
        buf.copy_from_slice(&st.view[r]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        if Self::count_mutation(&mut st) {
            return Err(eio("simulated crash: device gone"));
        }
        let n = st.writes;
        st.writes += 1;
        let r = range_check(st.view.len(), offset, buf.len())?;
        if Self::take_fail(&mut st, OpKind::Write, n) {
            return Err(injected_eio());
        }
        if let Some((at, prefix)) = st.tear {
            if at == n {
                let p = prefix.min(buf.len());
                let start = r.start;
                st.durable[start..start + p].copy_from_slice(&buf[..p]);
                st.view[start..start + p].copy_from_slice(&buf[..p]);
                st.crashed = true;
                st.tear = None;
                return Err(eio("simulated crash during write (torn)"));
            }
        }
        st.view[r].copy_from_slice(buf);
        st.unsynced.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut st = self.lock();
        if Self::count_mutation(&mut st) {
            return Err(eio("simulated crash: device gone"));
        }
        let n = st.syncs;
        st.syncs += 1;
        if Self::take_fail(&mut st, OpKind::Sync, n) {
            // Like Linux after a writeback error: the cached data may or may not have reached the
            // disk; we model the pessimistic case (lost) and keep serving the cached view.
            st.unsynced.clear();
            return Err(injected_eio());
        }
        let pending = std::mem::take(&mut st.unsynced);
        for (off, data) in pending {
            let off = off as usize;
            st.durable[off..off + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().view.len() as u64)
    }
}

/// Recomputes the CRC of both superblock slots and of every bitmap chunk of `image` whose
/// magic is in place, so that decoding reaches the fields behind the checksums.
fn reseal(image: &mut [u8]) {
    use crate::layout::{
        crc_with_hole, BITMAP_OFFSET, CHUNK_MAGIC, CHUNK_SIZE, CH_OFF_CRC, OFF_CRC, SB_MAGIC,
        SB_SLOT_OFFSETS, SB_SLOT_SIZE,
    };
    for off in SB_SLOT_OFFSETS {
        let slot = &mut image[off as usize..off as usize + SB_SLOT_SIZE];
        if slot[..8] == SB_MAGIC {
            let crc = crc_with_hole(slot, OFF_CRC);
            slot[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    for chunk in image[BITMAP_OFFSET as usize..].chunks_exact_mut(CHUNK_SIZE) {
        if chunk[..4] == CHUNK_MAGIC {
            let crc = crc_with_hole(chunk, CH_OFF_CRC);
            chunk[CH_OFF_CRC..CH_OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Body of the `metadata` fuzz target (`bitmap/fuzz`), also run by the test suite on
/// generated inputs (`tests/metadata_fuzz_inputs.rs`). Three decoders, each fed bytes
/// derived from `data`:
///
/// 1. A superblock slot: `data` padded to a slot, with the magic and a correct CRC, so that
///    [`Superblock::parse`](crate::Superblock::parse) sees the fields; whatever parses must
///    encode and parse back to the same superblock.
/// 2. A bitmap chunk, the same way, through [`check_chunk`](crate::layout::check_chunk) and
///    [`chunk_words`](crate::layout::chunk_words) (with a bit count taken from `data`).
/// 3. A whole cluster partition: a valid one is created (3 chunks, dirty or clean per
///    `data[0]`), then edited by `data` (records of `offset u16-le x 64, length u8, bytes`;
///    bit 0 of `data[0]` re-seals the checksums after the edits), then
///    [`dump`](crate::dump()) and [`ClusterPartition::open`](crate::ClusterPartition::open)
///    read it. Either may refuse it, neither may panic; an image that opens must serve a
///    write intent and its completion, and open again.
pub fn fuzz_metadata(data: &[u8]) {
    use crate::layout::{
        check_chunk, check_slot, chunk_words, encode_chunk, Geometry, SlotStatus, Superblock,
        BITMAP_OFFSET, BITS_PER_CHUNK, CHUNK_MAGIC, CHUNK_SIZE, SB_MAGIC, SB_SLOT_SIZE,
    };
    use crate::partition::{AttachCheck, ClusterPartition, CreateParams};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };

    // 1. One superblock slot.
    let mut img = vec![0u8; BITMAP_OFFSET as usize];
    let n = rest.len().min(SB_SLOT_SIZE);
    img[..n].copy_from_slice(&rest[..n]);
    img[..8].copy_from_slice(&SB_MAGIC);
    reseal(&mut img);
    let slot = &img[..SB_SLOT_SIZE];
    assert!(
        matches!(check_slot(slot), SlotStatus::Valid { .. }),
        "a resealed slot must pass its checks"
    );
    if let Ok(sb) = Superblock::parse(slot) {
        let again = sb.encode();
        assert!(matches!(check_slot(&again), SlotStatus::Valid { .. }));
        assert_eq!(
            Superblock::parse(&again).as_ref(),
            Ok(&sb),
            "superblock round trip"
        );
    }

    // 2. One bitmap chunk.
    let mut chunk = vec![0u8; BITMAP_OFFSET as usize + CHUNK_SIZE];
    let c = &mut chunk[BITMAP_OFFSET as usize..];
    let n = rest.len().min(CHUNK_SIZE);
    c[..n].copy_from_slice(&rest[..n]);
    c[..4].copy_from_slice(&CHUNK_MAGIC);
    reseal(&mut chunk);
    let c = &chunk[BITMAP_OFFSET as usize..];
    let index = check_chunk(c, None, None).expect("a resealed chunk must pass its checks");
    let valid_bits = 1 + u64::from(mode) * BITS_PER_CHUNK / 256;
    if let Ok(words) = chunk_words(c, valid_bits) {
        assert_eq!(words.len() as u64, valid_bits.div_ceil(64));
        let again = encode_chunk(index, 0, &words);
        assert_eq!(
            chunk_words(&again, valid_bits),
            Ok(words),
            "chunk round trip"
        );
    }

    // 3. A whole partition, edited.
    let regions = 70_000u64;
    let params = CreateParams {
        resource: "md1".into(),
        node: "server1".into(),
        volume_size: regions * 4096,
        data_size: regions * 4096,
        data_stable_id: String::new(),
        region_size: 4096,
        initially_dirty: mode & 2 != 0,
    };
    let check = AttachCheck {
        resource: params.resource.clone(),
        node: params.node.clone(),
        data_size: params.data_size,
        data_stable_id: String::new(),
    };
    let len = Geometry::new(params.volume_size, params.region_size)
        .expect("valid geometry")
        .required_partition_size() as usize;
    let disk = FaultyStorage::new(len);
    drop(ClusterPartition::create(disk.clone(), &params, false).expect("create"));
    let mut image = disk.durable_image();
    let mut edits = rest;
    while edits.len() >= 3 {
        let off = usize::from(u16::from_le_bytes([edits[0], edits[1]])) * 64 % len;
        let n = usize::from(edits[2]).min(edits.len() - 3).min(len - off);
        image[off..off + n].copy_from_slice(&edits[3..3 + n]);
        edits = &edits[3 + n..];
    }
    if mode & 1 != 0 {
        reseal(&mut image);
    }
    let disk = FaultyStorage::from_image(image);
    // `dump` only reads; a clone shares the image.
    let _ = crate::dump(&mut disk.clone(), 64);
    if let Ok((cp, _report)) = ClusterPartition::open(disk.clone(), &check) {
        let volume = cp.superblock().geometry.volume_size;
        let _ = cp.dirty_count();
        if volume >= 4096 {
            if let Ok(t) = cp.begin_write(volume - 4096, 4096) {
                cp.end_write(t, true);
                let _ = cp.flush_clears();
            }
        }
        drop(cp);
        let _ = ClusterPartition::open(FaultyStorage::from_image(disk.durable_image()), &check);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_lost_on_crash() {
        let mut s = FaultyStorage::new(16);
        s.write_at(0, &[1, 2]).unwrap();
        s.sync().unwrap();
        s.write_at(2, &[3, 4]).unwrap();
        let mut b = [0u8; 4];
        s.read_at(0, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(
            &s.image_after_crash(CrashMode::DropUnsynced)[..4],
            &[1, 2, 0, 0]
        );
        assert_eq!(
            &s.image_after_crash(CrashMode::KeepUnsynced)[..4],
            &[1, 2, 3, 4]
        );
        assert!(s.write_at(0, &[9]).is_err());
    }

    #[test]
    fn crash_point_and_tear_and_eio() {
        let mut s = FaultyStorage::new(16);
        s.crash_after_ops(2);
        s.write_at(0, &[1]).unwrap();
        s.sync().unwrap();
        assert!(s.write_at(1, &[1]).is_err());
        assert!(s.is_crashed());

        let mut s = FaultyStorage::new(16);
        s.tear_write(1, 2);
        s.write_at(0, &[7]).unwrap();
        assert!(s.write_at(4, &[5, 6, 7, 8]).is_err());
        assert_eq!(&s.durable_image()[..8], &[0, 0, 0, 0, 5, 6, 0, 0]);

        let mut s = FaultyStorage::new(16);
        s.fail_op(OpKind::Sync, 1);
        s.sync().unwrap();
        let e = s.sync().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        s.sync().unwrap();
    }
}
