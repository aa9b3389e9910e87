//! [`ClusterPartition`]: create/open (identity checks), the superblock update path, and the dirty
//! tracker built around the write-intent rule:
//!
//! > a region whose data write may have been issued is dirty on stable storage until explicitly
//! > cleared.
//!
//! # Tracker state (all under one mutex, never held across I/O)
//!
//! * `bits` — the dense bitmap (1 bit per region): what is, or is about to be, on disk.
//! * `inflight` — `HashMap<region, count>` of regions with data writes in flight (sparse: only
//!   regions being written right now have an entry).
//! * `intent` — the dirty regions that are dirty *only* because of write intent (every write so
//!   far ended with the peer durable), grouped by extent (`hot::IntentSet`). Only these
//!   may be cleared by [`ClusterPartition::flush_clears`]; every other dirty region is "sticky"
//!   (needs resync) until [`ClusterPartition::clear_regions`] — which keeps the sticky state
//!   implicit and needs no second dense bitmap.
//! * `lru` — the *hot extents* (an activity log in DRBD's sense): a bounded LRU of extents of
//!   `2^ext_shift` regions (default 4 MiB). [`ClusterPartition::begin_write`] marks *every* region
//!   of each extent it touches dirty in the same chunk write + sync as the written regions, and
//!   makes the extents hot; later writes anywhere in a hot extent find their regions durably
//!   dirty and take the fast path with no metadata I/O. The intent regions of an extent are
//!   cleared lazily once it has left the LRU and none of them has a write in flight. Nothing on
//!   disk records which extents are hot: after a crash their regions are simply dirty bits, so
//!   resync copies them (at most `keep_dirty` extents more than the writes in flight).
//! * group commit: `pending` chunks changed in the open epoch; `region_epoch[region]` is the epoch
//!   in which a newly *set* bit becomes durable (bulk operations — `set_all`, `merge` — record it
//!   per chunk in `chunk_epoch` instead, so no map ever grows with the volume). One flusher at a time takes the open
//!   epoch's chunks, writes them, syncs, and publishes `durable_epoch`; everyone who changed a
//!   chunk meanwhile waits on the condvar and is served by the next flush. All chunk writes go
//!   through this single flusher, so two writes of one chunk are never in flight together.
//!
//! A region is *durably dirty* iff its bit is set and neither it nor its chunk has a set-epoch
//! newer than `durable_epoch` (every later write of the chunk encodes the bit as set, since a clear
//! resets the bit in memory first); that is the fast-path test of
//! [`ClusterPartition::try_begin_write_fast`], so a hot region is not held up by unrelated new
//! regions in the same chunk.
//!
//! After any failed metadata write or sync the partition is poisoned: the on-disk state is
//! unknown and a retried fsync may falsely succeed, so every later metadata write fails.

use crate::bits::{BitmapChunk, DirtyBits};
use crate::error::{MetaError, Mismatch, Result};
use crate::hot::{IntentSet, Lru, MAX_EXTENT_REGIONS};
use crate::layout::{
    uuid_tag, Flags, Generations, Geometry, Identity, SbState, Superblock, BITMAP_OFFSET,
    BITS_PER_CHUNK, CHUNK_SIZE, DEFAULT_REGION_SIZE, NAME_MAX, SB_SLOT_OFFSETS, SB_SLOT_SIZE,
    STABLE_ID_MAX,
};
use crate::load::{read_bitmap, read_superblock, LoadReport, CHUNKS_PER_IO};
use crate::storage::{DataIdentity, MetaStorage};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Default capacity of the keep-dirty LRU, in hot extents (with the default extent size: 4 GiB
/// of the volume may be written with no metadata write, and is resynced after a crash).
pub const DEFAULT_KEEP_DIRTY: usize = 1024;

/// Default size of a hot extent in bytes (rounded up to one region if regions are larger).
pub const DEFAULT_HOT_EXTENT_SIZE: u64 = 4 << 20;

/// Parameters for [`ClusterPartition::create`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateParams {
    /// Resource name (1..=63 bytes).
    pub resource: String,
    /// This node's name (1..=63 bytes).
    pub node: String,
    /// Bytes mirrored (≤ `data_size`).
    pub volume_size: u64,
    /// Size of the data partition (identity).
    pub data_size: u64,
    /// Stable id of the data partition (≤ 255 bytes; empty for files).
    pub data_stable_id: String,
    /// Region size, power of two in 4 KiB..=1 GiB.
    pub region_size: u64,
    /// Start with every region dirty (true: the usual, nothing is known about the data).
    pub initially_dirty: bool,
}

impl CreateParams {
    /// Parameters for mirroring the whole data partition with the default region size, all dirty.
    pub fn new(
        resource: impl Into<String>,
        node: impl Into<String>,
        data: &DataIdentity,
    ) -> CreateParams {
        CreateParams {
            resource: resource.into(),
            node: node.into(),
            volume_size: data.size,
            data_size: data.size,
            data_stable_id: data.stable_id.clone(),
            region_size: DEFAULT_REGION_SIZE,
            initially_dirty: true,
        }
    }
}

/// What the caller expects to find at attach; every field must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachCheck {
    /// Resource name from the configuration.
    pub resource: String,
    /// This node's name.
    pub node: String,
    /// Current size of the data partition.
    pub data_size: u64,
    /// Current stable id of the data partition.
    pub data_stable_id: String,
}

impl AttachCheck {
    /// Builds the check from the configuration names and the data partition's identity.
    pub fn new(
        resource: impl Into<String>,
        node: impl Into<String>,
        data: &DataIdentity,
    ) -> AttachCheck {
        AttachCheck {
            resource: resource.into(),
            node: node.into(),
            data_size: data.size,
            data_stable_id: data.stable_id.clone(),
        }
    }
}

/// Counters of metadata I/O (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaStats {
    /// Group-commit flushes that wrote something.
    pub flushes: u64,
    /// Bitmap chunks written.
    pub chunk_writes: u64,
    /// Syncs issued (bitmap and superblock).
    pub syncs: u64,
    /// Superblock writes.
    pub superblock_writes: u64,
    /// Times a caller found a flush in progress and waited to join the next one (group commit).
    pub commit_waits: u64,
    /// Successful [`ClusterPartition::check_writable`] probes.
    pub checks: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug)]
struct Inner {
    bits: DirtyBits,
    inflight: HashMap<u64, u32>,
    intent: IntentSet,
    lru: Lru,
    /// log2 of the regions per hot extent.
    ext_shift: u32,
    pending: BTreeSet<u32>,
    chunk_epoch: HashMap<u32, u64>,
    region_epoch: HashMap<u64, u64>,
    open_epoch: u64,
    durable_epoch: u64,
    flushing: bool,
    poisoned: Option<String>,
    stats: MetaStats,
    /// When a write + sync of this partition last succeeded (bitmap chunks, superblock or
    /// [`ClusterPartition::check_writable`]).
    last_sync_ok: Option<Instant>,
}

impl Inner {
    /// A write + sync of the partition succeeded.
    fn synced(&mut self) {
        self.stats.syncs += 1;
        self.last_sync_ok = Some(Instant::now());
    }

    /// A metadata write or sync failed: the partition is poisoned (the first cause is kept).
    fn poison(&mut self, e: MetaError) -> MetaError {
        self.poisoned.get_or_insert_with(|| e.to_string());
        e
    }

    fn check_poison(&self) -> Result<()> {
        match &self.poisoned {
            Some(cause) => Err(MetaError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Epoch after which region `r`'s set bit is durable (0 if it already is).
    fn set_pending_epoch(&self, r: u64) -> u64 {
        let c = (r / BITS_PER_CHUNK) as u32;
        let pending = |e: Option<&u64>| e.copied().filter(|&e| e > self.durable_epoch).unwrap_or(0);
        pending(self.chunk_epoch.get(&c)).max(pending(self.region_epoch.get(&r)))
    }

    fn durably_dirty(&self, r: u64) -> bool {
        self.bits.get(r) && self.set_pending_epoch(r) == 0
    }

    /// Hot extent holding region `r`.
    fn extent(&self, r: u64) -> u64 {
        r >> self.ext_shift
    }

    /// Is region `r` kept dirty because its extent is hot?
    fn hot(&self, r: u64) -> bool {
        self.lru.contains(self.extent(r))
    }

    /// Intent regions that may be cleared now: their extent is not hot and no write is in flight.
    /// Visits extents, not regions, so a large hot set costs nothing here.
    fn clearable(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for e in self.intent.extents() {
            if self.lru.contains(e) {
                continue;
            }
            v.extend(
                self.intent
                    .members_of(e)
                    .into_iter()
                    .filter(|r| !self.inflight.contains_key(r)),
            );
        }
        v
    }

    /// Marks `r` dirty in memory (queued for the open epoch); returns the epoch to wait for.
    fn set_dirty(&mut self, r: u64, as_intent: bool) -> u64 {
        if self.bits.set(r, true) {
            if !as_intent {
                self.intent.remove(r);
            }
            self.set_pending_epoch(r)
        } else {
            if as_intent {
                self.intent.insert(r);
            }
            let c = (r / BITS_PER_CHUNK) as u32;
            self.pending.insert(c);
            self.region_epoch.insert(r, self.open_epoch);
            self.open_epoch
        }
    }

    fn clear(&mut self, r: u64) {
        self.bits.set(r, false);
        self.intent.remove(r);
        self.pending.insert((r / BITS_PER_CHUNK) as u32);
    }

    fn end(&mut self, regions: Range<u64>, peer_durable: bool) {
        for r in regions {
            match self.inflight.get_mut(&r) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    self.inflight.remove(&r);
                }
                None => debug_assert!(false, "end_write without begin_write for region {r}"),
            }
            if !peer_durable {
                // Mirror broken for this write: the region needs resync, not a lazy clear.
                self.intent.remove(r);
            }
        }
    }
}

struct Shared {
    storage: Mutex<Box<dyn MetaStorage>>,
    /// The durable superblock. Held only to copy or publish, never across
    /// I/O, so readers (status) never wait on a slow metadata disk.
    sb: Mutex<Superblock>,
    /// Serializes superblock updates (read-modify-write-sync-publish).
    sb_writer: Mutex<()>,
    geom: Geometry,
    tag: u32,
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("geom", &self.geom)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves state that is at worst "more dirty": keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Permission to issue a data write: the covered regions are durably dirty and counted in flight.
/// Give it back with [`ClusterPartition::end_write`]; dropping it unfinished counts as "peer not
/// durable" (the regions stay dirty for resync), the safe default.
#[must_use = "pass the ticket to end_write when the data write completes"]
pub struct WriteTicket {
    shared: Arc<Shared>,
    regions: Range<u64>,
    done: bool,
}

impl WriteTicket {
    /// Region indices covered.
    pub fn regions(&self) -> Range<u64> {
        self.regions.clone()
    }
}

impl fmt::Debug for WriteTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteTicket")
            .field("regions", &self.regions)
            .field("done", &self.done)
            .finish()
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            lock(&self.shared.inner).end(self.regions.clone(), false);
        }
    }
}

/// An attached cluster partition: superblock plus dirty bitmap. Cheap to share (`Arc` inside);
/// all methods take `&self` and are thread-safe. Methods returning `Result` may block on I/O.
#[derive(Debug, Clone)]
pub struct ClusterPartition {
    shared: Arc<Shared>,
}

fn validate_params(p: &CreateParams) -> Result<Geometry> {
    let bad = |s: String| Err(MetaError::InvalidParams(s));
    for (what, v) in [("resource name", &p.resource), ("node name", &p.node)] {
        if v.is_empty() || v.len() > NAME_MAX {
            return bad(format!("{what} {v:?} must be 1..={NAME_MAX} bytes"));
        }
    }
    if p.data_stable_id.len() > STABLE_ID_MAX {
        return bad(format!(
            "data stable id is {} bytes, max {STABLE_ID_MAX}",
            p.data_stable_id.len()
        ));
    }
    if p.volume_size > p.data_size {
        return bad(format!(
            "volume size {} exceeds data size {}",
            p.volume_size, p.data_size
        ));
    }
    Geometry::new(p.volume_size, p.region_size).map_err(MetaError::InvalidParams)
}

fn write_sync(st: &mut dyn MetaStorage, off: u64, buf: &[u8], what: &'static str) -> Result<()> {
    st.write_at(off, buf)
        .map_err(|e| MetaError::io(what, off, buf.len() as u64, e))?;
    st.sync()
        .map_err(|e| MetaError::io("sync", off, buf.len() as u64, e))
}

impl ClusterPartition {
    /// Initialises the cluster partition. Without `force` it proceeds only on a blank (all-zero)
    /// partition; valid metadata is reported as [`MetaError::AlreadyInitialised`] and anything
    /// else as [`MetaError::Unrecognised`].
    ///
    /// Order (crash-safe): zero both superblock slots + sync, write all chunks + sync, write both
    /// slots + sync. A crash before the end leaves zero superblocks (refused by `open`), never a
    /// valid superblock over a half-written bitmap.
    pub fn create<S: MetaStorage + 'static>(
        mut storage: S,
        params: &CreateParams,
        force: bool,
    ) -> Result<ClusterPartition> {
        let geom = validate_params(params)?;
        if !force {
            match read_superblock(&mut storage) {
                Ok(found) => {
                    let id = found.sb.identity;
                    return Err(MetaError::AlreadyInitialised {
                        resource: id.resource,
                        node: id.node,
                        uuid: id.uuid,
                    });
                }
                Err(MetaError::Blank) => {}
                Err(e @ (MetaError::Io { .. } | MetaError::TooSmall { .. })) => return Err(e),
                Err(e) => {
                    return Err(MetaError::Unrecognised {
                        reason: e.to_string(),
                    })
                }
            }
        }
        let len = storage
            .len()
            .map_err(|e| MetaError::io("size query", 0, 0, e))?;
        let need = geom.required_partition_size();
        if len < need {
            return Err(MetaError::TooSmall {
                len,
                need,
                what: format!(
                    "a bitmap of {} regions of {} bytes",
                    geom.region_count, geom.region_size
                ),
            });
        }
        write_sync(
            &mut storage,
            0,
            &vec![0u8; 2 * SB_SLOT_SIZE],
            "write (zero superblock slots)",
        )?;

        let uuid = Uuid::new_v4();
        let tag = uuid_tag(&uuid);
        let bits = if params.initially_dirty {
            DirtyBits::full(geom.region_count)
        } else {
            DirtyBits::new(geom.region_count)
        };
        let mut idx = 0u64;
        while idx < geom.chunk_count {
            let n = (geom.chunk_count - idx).min(CHUNKS_PER_IO);
            let mut buf = Vec::with_capacity(n as usize * CHUNK_SIZE);
            for c in idx..idx + n {
                buf.extend_from_slice(&bits.encode_chunk(c as u32, tag));
            }
            let off = Geometry::chunk_offset(idx);
            storage
                .write_at(off, &buf)
                .map_err(|e| MetaError::io("write bitmap chunks", off, buf.len() as u64, e))?;
            idx += n;
        }
        storage
            .sync()
            .map_err(|e| MetaError::io("sync bitmap", BITMAP_OFFSET, 0, e))?;

        let t = now();
        let mut sb = Superblock {
            seq: 1,
            identity: Identity {
                uuid,
                resource: params.resource.clone(),
                node: params.node.clone(),
                data_size: params.data_size,
                data_stable_id: params.data_stable_id.clone(),
            },
            geometry: geom,
            state: SbState {
                flags: Flags::BLANK,
                gens: Generations {
                    current: rand::random::<u64>() | 1,
                    bitmap: 0,
                    history: [0; 4],
                },
                break_time: 0,
            },
            created_time: t,
            last_update_time: t,
        };
        for seq in [1u64, 2] {
            sb.seq = seq;
            let off = SB_SLOT_OFFSETS[sb.slot()];
            let enc = sb.encode();
            storage
                .write_at(off, &enc)
                .map_err(|e| MetaError::io("write superblock", off, enc.len() as u64, e))?;
        }
        storage
            .sync()
            .map_err(|e| MetaError::io("sync superblock", 0, 0, e))?;
        Ok(ClusterPartition::build(Box::new(storage), sb, bits))
    }

    /// Attaches to existing metadata, checking its identity against `expected`.
    ///
    /// Errors: [`MetaError::Blank`] for an all-zero partition; [`MetaError::NoValidSuperblock`]
    /// (with both slots' expected/actual CRC or magic) when neither slot is usable;
    /// [`MetaError::IdentityMismatch`] naming every differing field. One bad slot or bad chunks
    /// are tolerated and listed in the [`LoadReport`] (bad chunks load as all dirty).
    pub fn open<S: MetaStorage + 'static>(
        mut storage: S,
        expected: &AttachCheck,
    ) -> Result<(ClusterPartition, LoadReport)> {
        let chosen = read_superblock(&mut storage)?;
        let id = &chosen.sb.identity;
        let mut mismatches = Vec::new();
        let mut cmp = |field: &'static str, e: String, f: String| {
            if e != f {
                mismatches.push(Mismatch {
                    field,
                    expected: e,
                    found: f,
                });
            }
        };
        cmp("resource", expected.resource.clone(), id.resource.clone());
        cmp("node", expected.node.clone(), id.node.clone());
        cmp(
            "data size",
            expected.data_size.to_string(),
            id.data_size.to_string(),
        );
        cmp(
            "data stable id",
            expected.data_stable_id.clone(),
            id.data_stable_id.clone(),
        );
        if !mismatches.is_empty() {
            return Err(MetaError::IdentityMismatch { mismatches });
        }
        let (bits, bad_chunks) = read_bitmap(&mut storage, &chosen.sb)?;
        let report = LoadReport {
            chosen_slot: chosen.chosen,
            seq: chosen.sb.seq,
            slots: chosen.slots,
            ignored_slot: chosen.ignored,
            bad_chunks,
        };
        Ok((
            ClusterPartition::build(Box::new(storage), chosen.sb, bits),
            report,
        ))
    }

    fn build(storage: Box<dyn MetaStorage>, sb: Superblock, bits: DirtyBits) -> ClusterPartition {
        let geom = sb.geometry;
        let tag = uuid_tag(&sb.identity.uuid);
        let ext_shift = extent_shift(DEFAULT_HOT_EXTENT_SIZE, geom.region_size)
            .expect("the default extent size is valid for every region size");
        let inner = Inner {
            bits,
            inflight: HashMap::new(),
            intent: IntentSet::new(ext_shift),
            lru: Lru::with_capacity(DEFAULT_KEEP_DIRTY),
            ext_shift,
            pending: BTreeSet::new(),
            chunk_epoch: HashMap::new(),
            region_epoch: HashMap::new(),
            open_epoch: 1,
            durable_epoch: 0,
            flushing: false,
            poisoned: None,
            last_sync_ok: None,
            stats: MetaStats::default(),
        };
        ClusterPartition {
            shared: Arc::new(Shared {
                storage: Mutex::new(storage),
                sb: Mutex::new(sb),
                sb_writer: Mutex::new(()),
                geom,
                tag,
                inner: Mutex::new(inner),
                cv: Condvar::new(),
            }),
        }
    }

    // ----- superblock -----

    /// A copy of the current superblock.
    pub fn superblock(&self) -> Superblock {
        lock(&self.shared.sb).clone()
    }

    /// Mutable state (flags, generations, break time).
    pub fn state(&self) -> SbState {
        lock(&self.shared.sb).state
    }

    /// Generation identifiers.
    pub fn generations(&self) -> Generations {
        self.state().gens
    }

    /// Flags.
    pub fn flags(&self) -> Flags {
        self.state().flags
    }

    /// Identity (uuid, names, data size and stable id).
    pub fn identity(&self) -> Identity {
        lock(&self.shared.sb).identity.clone()
    }

    /// Unix seconds of the last superblock write (informational).
    pub fn last_update_time(&self) -> u64 {
        lock(&self.shared.sb).last_update_time
    }

    /// Unix seconds when the mirror last broke (informational).
    pub fn break_time(&self) -> u64 {
        self.state().break_time
    }

    /// Changes the superblock state atomically on disk: writes the slot not holding the current
    /// superblock (sequence + 1) and syncs; a torn write leaves the current slot valid. Returns the
    /// new superblock. On failure the in-memory superblock is unchanged and the partition is
    /// poisoned.
    pub fn update_superblock<F: FnOnce(&mut SbState)>(&self, f: F) -> Result<Superblock> {
        let _writer = lock(&self.shared.sb_writer);
        lock(&self.shared.inner).check_poison()?;
        let mut next = lock(&self.shared.sb).clone();
        f(&mut next.state);
        if next.state.flags.0 & !Flags::ALL_V1.0 != 0 {
            return Err(MetaError::InvalidParams(format!(
                "unknown flag bits {:#x}",
                next.state.flags.0
            )));
        }
        next.seq += 1;
        next.last_update_time = now();
        let off = SB_SLOT_OFFSETS[next.slot()];
        let res = {
            let mut st = lock(&self.shared.storage);
            write_sync(&mut **st, off, &next.encode(), "write superblock")
        };
        let mut inner = lock(&self.shared.inner);
        match res {
            Ok(()) => {
                inner.stats.superblock_writes += 1;
                inner.synced();
                *lock(&self.shared.sb) = next.clone();
                Ok(next)
            }
            Err(e) => Err(inner.poison(e)),
        }
    }

    /// Checks that the cluster partition still takes writes, without changing what it holds:
    /// reads the superblock slot that does not hold the current superblock and writes the same
    /// bytes back, then syncs. Nothing else may be written for long stretches (a standby, an idle
    /// node), so without this a failed partition would go unnoticed until the next metadata
    /// write, which may be the first write after a failover.
    ///
    /// Why that slot: the next superblock update overwrites it anyway, and a torn write there
    /// leaves the current slot, which `open` picks, intact (the same reasoning as
    /// [`Self::update_superblock`]). Serialized with superblock updates. A failure poisons the
    /// partition like any failed metadata write: every later write intent fails.
    pub fn check_writable(&self) -> Result<()> {
        self.check_writable_unless_synced_within(None).map(|_| ())
    }

    /// [`Self::check_writable`], skipped (returning `false`) if a write + sync of this partition
    /// succeeded less than `recent` ago: that already showed the device takes writes, and a
    /// busy node's metadata flushes then do not wait for the check. Returns whether it checked.
    pub fn check_writable_unless_synced_within(&self, recent: Option<Duration>) -> Result<bool> {
        if let Some(d) = recent {
            let g = lock(&self.shared.inner);
            g.check_poison()?;
            if g.last_sync_ok.is_some_and(|t| t.elapsed() < d) {
                return Ok(false);
            }
        }
        let _writer = lock(&self.shared.sb_writer);
        lock(&self.shared.inner).check_poison()?;
        let off = SB_SLOT_OFFSETS[1 - lock(&self.shared.sb).slot()];
        let res = {
            let mut st = lock(&self.shared.storage);
            let mut buf = vec![0u8; SB_SLOT_SIZE];
            st.read_at(off, &mut buf)
                .map_err(|e| {
                    MetaError::io(
                        "check: read spare superblock slot",
                        off,
                        buf.len() as u64,
                        e,
                    )
                })
                .and_then(|()| {
                    write_sync(&mut **st, off, &buf, "check: rewrite spare superblock slot")
                })
        };
        let mut inner = lock(&self.shared.inner);
        match res {
            Ok(()) => {
                inner.stats.checks += 1;
                inner.synced();
                Ok(true)
            }
            Err(e) => Err(inner.poison(e)),
        }
    }

    // ----- geometry -----

    /// Bytes per region.
    pub fn region_size(&self) -> u64 {
        self.shared.geom.region_size
    }

    /// Number of regions.
    pub fn region_count(&self) -> u64 {
        self.shared.geom.region_count
    }

    /// Mirrored volume size in bytes.
    pub fn volume_size(&self) -> u64 {
        self.shared.geom.volume_size
    }

    /// Number of bitmap chunks.
    pub fn chunk_count(&self) -> u64 {
        self.shared.geom.chunk_count
    }

    /// Geometry.
    pub fn geometry(&self) -> Geometry {
        self.shared.geom
    }

    /// Region containing byte `offset`.
    pub fn region_of(&self, offset: u64) -> u64 {
        offset / self.shared.geom.region_size
    }

    /// Byte range of region `r` (the last one may be short).
    pub fn region_bytes(&self, r: u64) -> Range<u64> {
        let g = &self.shared.geom;
        let start = r * g.region_size;
        start..(start + g.region_size).min(g.volume_size)
    }

    /// Regions covered by a byte range (empty for `len == 0`).
    pub fn regions_of(&self, offset: u64, len: u64) -> Result<Range<u64>> {
        let g = &self.shared.geom;
        match offset.checked_add(len) {
            Some(end) if end <= g.volume_size => {
                if len == 0 {
                    Ok(0..0)
                } else {
                    Ok(offset / g.region_size..(end - 1) / g.region_size + 1)
                }
            }
            _ => Err(MetaError::OutOfRange {
                offset,
                len,
                volume_size: g.volume_size,
            }),
        }
    }

    // ----- group commit -----

    /// Waits until `need` is durable, flushing ourselves if nobody else is.
    fn commit<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
        need: u64,
    ) -> Result<MutexGuard<'a, Inner>> {
        let mut counted = false;
        loop {
            g.check_poison()?;
            if g.durable_epoch >= need {
                return Ok(g);
            }
            if g.flushing {
                if !counted {
                    g.stats.commit_waits += 1;
                    counted = true;
                }
                g = self.shared.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let epoch = g.open_epoch;
            g.open_epoch += 1;
            let chunks = std::mem::take(&mut g.pending);
            let bufs: Vec<(u32, Vec<u8>)> = chunks
                .into_iter()
                .map(|c| (c, g.bits.encode_chunk(c, self.shared.tag)))
                .collect();
            g.flushing = true;
            drop(g);
            let res = if bufs.is_empty() {
                Ok(())
            } else {
                self.write_chunks(&bufs)
            };
            g = lock(&self.shared.inner);
            g.flushing = false;
            self.shared.cv.notify_all();
            match res {
                Ok(()) => {
                    g.durable_epoch = epoch;
                    g.chunk_epoch.retain(|_, e| *e > epoch);
                    g.region_epoch.retain(|_, e| *e > epoch);
                    if !bufs.is_empty() {
                        g.stats.flushes += 1;
                        g.stats.chunk_writes += bufs.len() as u64;
                        g.synced();
                    }
                }
                Err(e) => return Err(g.poison(e)),
            }
        }
    }

    /// Writes chunk images (sorted by index, contiguous runs coalesced) and syncs.
    fn write_chunks(&self, bufs: &[(u32, Vec<u8>)]) -> Result<()> {
        let mut st = lock(&self.shared.storage);
        let mut i = 0;
        while i < bufs.len() {
            let mut j = i + 1;
            while j < bufs.len()
                && bufs[j].0 == bufs[j - 1].0 + 1
                && (j - i) < CHUNKS_PER_IO as usize
            {
                j += 1;
            }
            let off = Geometry::chunk_offset(bufs[i].0 as u64);
            let res = if j == i + 1 {
                st.write_at(off, &bufs[i].1)
            } else {
                st.write_at(
                    off,
                    &bufs[i..j]
                        .iter()
                        .flat_map(|(_, b)| b.iter().copied())
                        .collect::<Vec<u8>>(),
                )
            };
            res.map_err(|e| {
                MetaError::io("write bitmap chunks", off, ((j - i) * CHUNK_SIZE) as u64, e)
            })?;
            i = j;
        }
        st.sync().map_err(|e| {
            MetaError::io(
                "sync bitmap",
                Geometry::chunk_offset(bufs[0].0 as u64),
                0,
                e,
            )
        })
    }

    fn commit_if(&self, g: MutexGuard<'_, Inner>, need: u64) -> Result<()> {
        if need > g.durable_epoch {
            drop(self.commit(g, need)?);
        }
        Ok(())
    }

    // ----- write intent -----

    /// Before issuing a data write of `len` bytes at `offset`: marks the covered regions dirty,
    /// counts them in flight, and returns once they are dirty on stable storage (group commit:
    /// concurrent callers share one chunk write + sync). Blocking.
    ///
    /// With a non-zero keep-dirty capacity, every region of each hot extent the range touches is
    /// marked too (in the same chunk write + sync) and the extents become hot, so later writes
    /// into them take [`Self::try_begin_write_fast`]. Use [`Self::begin_write_exact`] for writes
    /// that will need resync anyway (mirror broken).
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<WriteTicket> {
        self.begin(offset, len, true)
    }

    /// [`Self::begin_write`] marking only the written regions, without making extents hot: for
    /// writes that go to the local disk only (mirror broken), whose regions need resync anyway —
    /// marking their whole extents would only enlarge that resync.
    pub fn begin_write_exact(&self, offset: u64, len: u64) -> Result<WriteTicket> {
        self.begin(offset, len, false)
    }

    fn begin(&self, offset: u64, len: u64, whole_extents: bool) -> Result<WriteTicket> {
        let regions = self.regions_of(offset, len)?;
        let mut g = lock(&self.shared.inner);
        g.check_poison()?;
        let mut need = 0;
        for r in regions.clone() {
            *g.inflight.entry(r).or_insert(0) += 1;
            need = need.max(g.set_dirty(r, true));
        }
        if whole_extents && g.lru.cap > 0 && !regions.is_empty() {
            let n = self.shared.geom.region_count;
            let (first, last) = (g.extent(regions.start), g.extent(regions.end - 1));
            for e in first..=last {
                let lo = e << g.ext_shift;
                let hi = ((e + 1) << g.ext_shift).min(n);
                for r in (lo..hi).filter(|r| !regions.contains(r)) {
                    need = need.max(g.set_dirty(r, true));
                }
                g.lru.touch(e);
            }
        }
        let ticket = WriteTicket {
            shared: self.shared.clone(),
            regions,
            done: false,
        };
        if need > g.durable_epoch {
            if let Err(e) = self.commit(g, need) {
                // Not issued: the ticket's drop undoes the in-flight counts (regions stay dirty).
                drop(ticket);
                return Err(e);
            }
        }
        Ok(ticket)
    }

    /// Non-blocking `begin_write`: succeeds (without I/O) only if every covered region is already
    /// durably dirty — the common case for writes into hot extents. `None` means "call
    /// `begin_write`" (also on errors such as out of range or poisoned, which it will report).
    pub fn try_begin_write_fast(&self, offset: u64, len: u64) -> Option<WriteTicket> {
        let regions = self.regions_of(offset, len).ok()?;
        let mut g = lock(&self.shared.inner);
        if g.poisoned.is_some() || !regions.clone().all(|r| g.durably_dirty(r)) {
            return None;
        }
        for r in regions.clone() {
            *g.inflight.entry(r).or_insert(0) += 1;
        }
        if !regions.is_empty() {
            for e in g.extent(regions.start)..=g.extent(regions.end - 1) {
                g.lru.touch(e);
            }
        }
        Some(WriteTicket {
            shared: self.shared.clone(),
            regions,
            done: false,
        })
    }

    /// After the data write completed locally: `peer_durable` says whether the peer acknowledged
    /// it durably (ack2). If not, the regions become sticky dirty (need resync) until cleared by
    /// [`Self::clear_regions`]. No I/O.
    pub fn end_write(&self, mut ticket: WriteTicket, peer_durable: bool) {
        debug_assert!(
            Arc::ptr_eq(&ticket.shared, &self.shared),
            "ticket from another partition"
        );
        ticket.done = true;
        lock(&ticket.shared.inner).end(ticket.regions.clone(), peer_durable);
    }

    /// Lazily clears regions that are dirty only for write intent, have no write in flight, and
    /// whose extent is not hot; writes their chunks and syncs. Returns how many were cleared.
    pub fn flush_clears(&self) -> Result<usize> {
        let mut g = lock(&self.shared.inner);
        g.check_poison()?;
        let clearable = g.clearable();
        for &r in &clearable {
            g.clear(r);
        }
        if clearable.is_empty() {
            return Ok(0);
        }
        let need = g.open_epoch;
        drop(self.commit(g, need)?);
        Ok(clearable.len())
    }

    /// Number of regions `flush_clears` would clear now.
    pub fn clearable_count(&self) -> usize {
        lock(&self.shared.inner).clearable().len()
    }

    /// Cools every hot extent and clears (durably) the intent regions with no write in flight —
    /// for when the peer holds every acknowledged write and the hot set's only remaining effect
    /// would be a larger resync: a mirror break, a clean release. Extents become hot again at
    /// their next write. Returns how many regions were cleared.
    pub fn cool_hot_extents(&self) -> Result<usize> {
        lock(&self.shared.inner).lru.clear();
        self.flush_clears()
    }

    /// Sets the keep-dirty capacity in hot extents (0 disables hot extents: every region is
    /// cleared as soon as its writes are done); shrinking evicts the coldest.
    pub fn set_keep_dirty_capacity(&self, cap: usize) {
        let mut g = lock(&self.shared.inner);
        g.lru.cap = cap;
        g.lru.shrink();
    }

    /// Keep-dirty capacity, in hot extents.
    pub fn keep_dirty_capacity(&self) -> usize {
        lock(&self.shared.inner).lru.cap
    }

    /// Sets the hot extent size in bytes: a power of two; sizes up to one region mean one region
    /// per extent; at most 65536 regions per extent. Every extent becomes cold (its intent
    /// regions become lazily clearable).
    pub fn set_hot_extent_size(&self, bytes: u64) -> Result<()> {
        let shift = extent_shift(bytes, self.shared.geom.region_size)?;
        let mut g = lock(&self.shared.inner);
        if shift != g.ext_shift {
            g.lru.clear();
            g.intent.set_shift(shift);
            g.ext_shift = shift;
        }
        Ok(())
    }

    /// Bytes per hot extent.
    pub fn hot_extent_size(&self) -> u64 {
        self.shared.geom.region_size << lock(&self.shared.inner).ext_shift
    }

    /// Number of extents hot now.
    pub fn hot_extent_count(&self) -> usize {
        lock(&self.shared.inner).lru.len()
    }

    /// Number of regions dirty only for write intent (hot extents and writes in flight, all
    /// acknowledged by the peer so far): what a resync would copy beyond the real difference.
    pub fn intent_count(&self) -> u64 {
        lock(&self.shared.inner).intent.len()
    }

    // ----- explicit marking and clearing -----

    /// Durably marks the regions of a byte range dirty as needing resync (no in-flight tracking):
    /// used while the mirror is broken, and by verify.
    pub fn mark_dirty_range(&self, offset: u64, len: u64) -> Result<()> {
        let regions = self.regions_of(offset, len)?;
        self.mark_dirty_regions(regions)
    }

    /// Collects region indices, rejecting the whole batch if one is out of range.
    fn checked_regions(&self, regions: impl IntoIterator<Item = u64>) -> Result<Vec<u64>> {
        let n = self.region_count();
        let v: Vec<u64> = regions.into_iter().collect();
        match v.iter().find(|&&r| r >= n) {
            Some(&region) => Err(MetaError::RegionOutOfRange {
                region,
                region_count: n,
            }),
            None => Ok(v),
        }
    }

    /// Durably marks regions dirty as needing resync.
    pub fn mark_dirty_regions(&self, regions: impl IntoIterator<Item = u64>) -> Result<()> {
        let regions = self.checked_regions(regions)?;
        let mut g = lock(&self.shared.inner);
        g.check_poison()?;
        let mut need = 0;
        for r in regions {
            need = need.max(g.set_dirty(r, false));
        }
        self.commit_if(g, need)
    }

    /// Durably marks every region dirty (full resync).
    pub fn set_all(&self) -> Result<()> {
        let mut g = lock(&self.shared.inner);
        g.check_poison()?;
        let n = g.bits.len();
        g.bits.set_range(0..n);
        g.intent.clear();
        let epoch = g.open_epoch;
        for c in 0..self.shared.geom.chunk_count as u32 {
            g.pending.insert(c);
            g.chunk_epoch.insert(c, epoch);
        }
        self.commit(g, epoch).map(|_| ())
    }

    /// Resync copied these regions: clears them durably (one batched write + sync). A region with
    /// a write in flight or in a hot extent is not cleared now but becomes lazily clearable
    /// (cleared by a later `flush_clears` once safe). Returns how many were cleared now.
    pub fn clear_regions(&self, regions: impl IntoIterator<Item = u64>) -> Result<usize> {
        let (cleared, need) = self.clear_regions_deferred(regions)?;
        if let Some(need) = need {
            self.wait_durable(need)?;
        }
        Ok(cleared)
    }

    /// [`ClusterPartition::clear_regions`] without waiting for the disk: the regions are
    /// cleared in memory now (a later `mark` of one of them sets it again, and that mark's
    /// commit writes the chunk as it is then), and the returned epoch becomes durable with
    /// the next commit; [`ClusterPartition::wait_durable`] waits for it (committing itself
    /// if nobody else does). A crash before then leaves the bits set: the regions are copied
    /// again, nothing is lost. Returns how many were cleared now and the epoch to wait for
    /// (`None` when nothing was cleared).
    pub fn clear_regions_deferred(
        &self,
        regions: impl IntoIterator<Item = u64>,
    ) -> Result<(usize, Option<u64>)> {
        let regions = self.checked_regions(regions)?;
        let mut g = lock(&self.shared.inner);
        g.check_poison()?;
        let mut cleared = 0;
        for r in regions {
            if !g.bits.get(r) {
                continue;
            }
            if g.inflight.contains_key(&r) || g.hot(r) {
                g.intent.insert(r);
            } else {
                g.clear(r);
                cleared += 1;
            }
        }
        Ok((cleared, (cleared > 0).then_some(g.open_epoch)))
    }

    /// Wait until commit epoch `need` (from [`ClusterPartition::clear_regions_deferred`])
    /// is on disk, writing and syncing the pending chunks if no commit is under way.
    pub fn wait_durable(&self, need: u64) -> Result<()> {
        let g = lock(&self.shared.inner);
        drop(self.commit(g, need)?);
        Ok(())
    }

    /// `clear_regions` for one region; true if cleared now.
    pub fn clear_region(&self, r: u64) -> Result<bool> {
        Ok(self.clear_regions([r])? == 1)
    }

    /// Durable union with another bitmap of the same geometry (e.g. the peer's).
    pub fn merge(&self, other: &DirtyBits) -> Result<()> {
        let mut g = lock(&self.shared.inner);
        g.check_poison()?;
        if other.len() != g.bits.len() {
            return Err(MetaError::GeometryMismatch {
                expected: g.bits.len(),
                found: other.len(),
            });
        }
        let changed = g.bits.union_with(other);
        g.intent.retain(|r| !other.get(r));
        let epoch = g.open_epoch;
        for c in changed {
            g.pending.insert(c);
            g.chunk_epoch.insert(c, epoch);
        }
        // Also wait for bits already set but not yet durable.
        let need = g
            .chunk_epoch
            .values()
            .chain(g.region_epoch.values())
            .copied()
            .max()
            .unwrap_or(0);
        self.commit_if(g, need)
    }

    /// Durable union with one chunk (from [`decode_chunk`](Self::decode_chunk)).
    pub fn merge_chunk(&self, chunk: &BitmapChunk) -> Result<()> {
        let mut other = DirtyBits::new(self.region_count());
        if chunk.index as u64 >= self.chunk_count() {
            return Err(MetaError::BadChunk(
                crate::layout::ChunkFault::IndexOutOfRange {
                    index: chunk.index,
                    chunk_count: self.chunk_count(),
                },
            ));
        }
        other.set_chunk_words(chunk.index, &chunk.words);
        self.merge(&other)
    }

    /// Decodes a chunk received from the peer (checks CRC, index range, trailing bits).
    pub fn decode_chunk(&self, bytes: &[u8]) -> Result<BitmapChunk> {
        DirtyBits::decode_chunk(self.region_count(), bytes).map_err(MetaError::BadChunk)
    }

    /// Chunk `idx` of the in-memory bitmap in the chunk format (4096 bytes with CRC), for sending.
    pub fn export_chunk(&self, idx: u32) -> Result<Vec<u8>> {
        if idx as u64 >= self.chunk_count() {
            return Err(MetaError::BadChunk(
                crate::layout::ChunkFault::IndexOutOfRange {
                    index: idx,
                    chunk_count: self.chunk_count(),
                },
            ));
        }
        Ok(lock(&self.shared.inner)
            .bits
            .encode_chunk(idx, self.shared.tag))
    }

    // ----- queries -----

    /// Is region `r` dirty (in memory; durable unless a begin_write/mark is still committing)?
    pub fn is_dirty(&self, r: u64) -> bool {
        lock(&self.shared.inner).bits.get(r)
    }

    /// Is region `r` dirty on stable storage (as far as this process knows)?
    pub fn is_durably_dirty(&self, r: u64) -> bool {
        lock(&self.shared.inner).durably_dirty(r)
    }

    /// Number of writes in flight to region `r`.
    pub fn inflight(&self, r: u64) -> u32 {
        lock(&self.shared.inner)
            .inflight
            .get(&r)
            .copied()
            .unwrap_or(0)
    }

    /// Number of dirty regions.
    pub fn dirty_count(&self) -> u64 {
        lock(&self.shared.inner).bits.count_ones()
    }

    /// Dirty regions as a percentage of all regions.
    pub fn dirty_percent(&self) -> f64 {
        self.dirty_count() as f64 * 100.0 / self.region_count() as f64
    }

    /// First dirty region `>= from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        lock(&self.shared.inner).bits.next_one(from)
    }

    /// Dirty region indices (from a snapshot taken now).
    pub fn iter_dirty(&self) -> impl Iterator<Item = u64> {
        let snap = self.snapshot();
        let mut next = 0;
        std::iter::from_fn(move || {
            let i = snap.next_one(next)?;
            next = i + 1;
            Some(i)
        })
    }

    /// Up to `max` ranges of consecutive dirty regions.
    pub fn dirty_ranges(&self, max: usize) -> Vec<Range<u64>> {
        lock(&self.shared.inner).bits.ranges(max)
    }

    /// A copy of the in-memory bitmap.
    pub fn snapshot(&self) -> DirtyBits {
        lock(&self.shared.inner).bits.clone()
    }

    /// Metadata I/O counters.
    pub fn stats(&self) -> MetaStats {
        lock(&self.shared.inner).stats
    }

    /// The cause if the partition is poisoned.
    pub fn poisoned(&self) -> Option<String> {
        lock(&self.shared.inner).poisoned.clone()
    }

    /// Heap bytes used by the tracker now (dense bitmap + sparse maps; capacities, not lengths).
    pub fn memory_bytes(&self) -> u64 {
        let g = lock(&self.shared.inner);
        // hashbrown: one control byte per bucket plus the entry.
        let map = |cap: usize, entry: usize| (cap * (entry + 1)) as u64;
        g.bits.heap_bytes()
            + map(g.inflight.capacity(), 16)
            + g.intent.heap_bytes()
            + g.lru.heap_bytes()
            + (g.pending.len() as u64) * 16
            + map(g.chunk_epoch.capacity(), 16)
            + map(g.region_epoch.capacity(), 16)
    }
}

/// log2 of the regions per hot extent of `bytes` (a power of two; at least one region).
fn extent_shift(bytes: u64, region_size: u64) -> Result<u32> {
    if !bytes.is_power_of_two() {
        return Err(MetaError::InvalidParams(format!(
            "hot extent size {bytes} is not a power of two"
        )));
    }
    let regions = (bytes / region_size).max(1);
    if regions > MAX_EXTENT_REGIONS {
        return Err(MetaError::InvalidParams(format!(
            "hot extent size {bytes} spans {regions} regions of {region_size} bytes, max {MAX_EXTENT_REGIONS}"
        )));
    }
    Ok(regions.trailing_zeros())
}

/// Estimated steady-state tracker memory for a volume: the dense bitmap plus the sparse maps
/// sized for `keep_dirty` hot extents of `hot_extent_size` bytes (their intent bits) and
/// `max_inflight_regions` regions with writes in flight.
pub fn estimate_memory(
    volume_size: u64,
    region_size: u64,
    keep_dirty: usize,
    hot_extent_size: u64,
    max_inflight_regions: usize,
) -> u64 {
    let regions = volume_size.div_ceil(region_size);
    let dense = regions.div_ceil(64) * 8;
    let ext_regions = (hot_extent_size / region_size).max(1);
    // LRU entry (map + order) + intent map entry + the extent's intent bit set.
    let per_extent = 17 + 32 + 33 + 16 + ext_regions.div_ceil(64) * 8;
    let per_inflight = 17 + 16; // in-flight count + a pending region epoch
    dense + (keep_dirty as u64 * per_extent + max_inflight_regions as u64 * per_inflight) * 2
}
