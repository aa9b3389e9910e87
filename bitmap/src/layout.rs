//! On-disk layout of the cluster partition: constants, superblock and bitmap-chunk codecs.
//!
//! Everything is little-endian. `docs/on-disk-format.md` is the normative description; this module
//! is its implementation. Decoding is two-step: [`check_slot`] / [`check_chunk`] verify magic and
//! CRC without interpreting fields, then [`Superblock::parse`] interprets a slot that passed.
//!
//! ```text
//! offset 0      superblock slot 0   (4096 bytes, written when seq is even)
//! offset 4096   superblock slot 1   (4096 bytes, written when seq is odd)
//! offset 8192   bitmap chunk 0      (4096 bytes: 16-byte header + 32640 region bits)
//! offset 12288  bitmap chunk 1 ...
//! ```

use std::fmt;
use uuid::Uuid;

/// Size of one superblock slot.
pub const SB_SLOT_SIZE: usize = 4096;
/// Byte offsets of the two superblock slots; slot `seq % 2` holds sequence number `seq`.
pub const SB_SLOT_OFFSETS: [u64; 2] = [0, 4096];
/// Byte offset of bitmap chunk 0.
pub const BITMAP_OFFSET: u64 = 8192;
/// Size of one bitmap chunk (header + bits).
pub const CHUNK_SIZE: usize = 4096;
/// Size of the chunk header.
pub const CHUNK_HEADER_SIZE: usize = 16;
/// Region bits carried by one chunk: (4096 - 16) * 8 = 32640 = 510 u64 words.
pub const BITS_PER_CHUNK: u64 = ((CHUNK_SIZE - CHUNK_HEADER_SIZE) * 8) as u64;
/// u64 words of bits per chunk.
pub const WORDS_PER_CHUNK: usize = (BITS_PER_CHUNK / 64) as usize;
/// Superblock magic, bytes 0..8.
pub const SB_MAGIC: [u8; 8] = *b"NBDMIRSB";
/// Bitmap chunk magic, bytes 0..4 of every chunk.
pub const CHUNK_MAGIC: [u8; 4] = *b"NMBC";
/// Current (and highest supported) on-disk format version. See the version history in the doc.
pub const FORMAT_VERSION: u32 = 1;
/// Default region size: 64 KiB (justified in `docs/on-disk-format.md`).
pub const DEFAULT_REGION_SIZE: u64 = 64 * 1024;
/// Smallest allowed region size (one page; smaller gains nothing, NBD I/O is 4 KiB-granular anyway).
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest allowed region size (1 GiB).
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// Maximum length in bytes of the resource and node names.
pub const NAME_MAX: usize = 63;
/// Maximum length in bytes of the data partition's stable id.
pub const STABLE_ID_MAX: usize = 255;
/// Number of generation-history entries.
pub const HISTORY_LEN: usize = 4;

// Superblock field offsets (see the byte table on [`Superblock`]).
const OFF_VERSION: usize = 8;
const OFF_SLOT_SIZE: usize = 12;
const OFF_SEQ: usize = 16;
pub(crate) const OFF_CRC: usize = 24;
const OFF_FLAGS: usize = 28;
const OFF_UUID: usize = 32;
const OFF_DATA_SIZE: usize = 48;
const OFF_VOLUME_SIZE: usize = 56;
const OFF_REGION_SIZE: usize = 64;
const OFF_REGION_COUNT: usize = 72;
const OFF_BITMAP_OFFSET: usize = 80;
const OFF_CHUNK_SIZE: usize = 88;
const OFF_BITS_PER_CHUNK: usize = 92;
const OFF_CHUNK_COUNT: usize = 96;
const OFF_CURRENT_GEN: usize = 104;
const OFF_BITMAP_GEN: usize = 112;
const OFF_HISTORY: usize = 120;
const OFF_CREATED: usize = 152;
const OFF_LAST_UPDATE: usize = 160;
const OFF_BREAK: usize = 168;
const OFF_RESOURCE: usize = 176;
const OFF_NODE: usize = 240;
const OFF_STABLE_ID: usize = 304;
/// First reserved byte; bytes `RESERVED_START..4096` are written as zero in version 1.
pub const RESERVED_START: usize = 560;

// Chunk header offsets.
const CH_OFF_INDEX: usize = 4;
pub(crate) const CH_OFF_CRC: usize = 8;
const CH_OFF_TAG: usize = 12;

/// CRC-32 (IEEE) of `buf` with the 4 bytes at `crc_off` taken as zero.
pub fn crc_with_hole(buf: &[u8], crc_off: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..crc_off]);
    h.update(&[0u8; 4]);
    h.update(&buf[crc_off + 4..]);
    h.finalize()
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Superblock flag bits (u32 at superblock offset 28).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u32);

impl Flags {
    /// Bit 0: the initial full synchronisation with the peer has completed once.
    pub const INITIAL_SYNC_DONE: Flags = Flags(1 << 0);
    /// Bit 1: the local data is consistent and up to date (usable as a resync source / activatable).
    pub const CONSISTENT: Flags = Flags(1 << 1);
    /// Bit 2: this node was active (serving the volume) when the flag was last written.
    pub const WAS_ACTIVE: Flags = Flags(1 << 2);
    /// Bit 3: a data-disk I/O error was seen; the local data must not be trusted.
    pub const DISK_ERROR: Flags = Flags(1 << 3);
    /// Bit 4: this node is (or was, at a crash) a resync target: its data is inconsistent until
    /// the resync finishes.
    pub const RESYNC_TARGET: Flags = Flags(1 << 4);
    /// Bit 5: metadata freshly created; the data contents are unknown/never synchronised.
    pub const BLANK: Flags = Flags(1 << 5);
    /// Bit 6: an operator force made this node's data the latest while its peer was
    /// unreachable (`mdctrl force <this node> RES`); it wins the next reconnect and may
    /// activate without a reachable peer (`docs/resync-rules.md` §3.2, §9).
    pub const FORCED: Flags = Flags(1 << 6);
    /// Bit 7: the operator broke the mirror deliberately (`mdctrl break RES`): no automatic
    /// recovery and no replication until `mdctrl recover` or `mdctrl force` clears it, also
    /// across agent restarts (`docs/resync-rules.md` §8a). Never read by the resync rules.
    pub const OPERATOR_BREAK: Flags = Flags(1 << 7);
    /// All bits defined by format version 1 (bit 6 added with the forced recovery, bit 7
    /// with the persistent operator break).
    pub const ALL_V1: Flags = Flags(0xff);

    /// True if every bit of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Sets the bits of `other`.
    pub fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }
    /// Clears the bits of `other`.
    pub fn remove(&mut self, other: Flags) {
        self.0 &= !other.0;
    }
    /// Sets or clears the bits of `other`.
    pub fn set(&mut self, other: Flags, on: bool) {
        if on {
            self.insert(other)
        } else {
            self.remove(other)
        }
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flags({:#x}: {})", self.0, self)
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(Flags, &str); 8] = [
            (Flags::INITIAL_SYNC_DONE, "initial-sync-done"),
            (Flags::CONSISTENT, "consistent"),
            (Flags::WAS_ACTIVE, "was-active"),
            (Flags::DISK_ERROR, "disk-error"),
            (Flags::RESYNC_TARGET, "resync-target"),
            (Flags::BLANK, "blank"),
            (Flags::FORCED, "forced"),
            (Flags::OPERATOR_BREAK, "operator-break"),
        ];
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        let unknown = self.0 & !Flags::ALL_V1.0;
        if unknown != 0 {
            if !first {
                f.write_str(",")?;
            }
            write!(f, "unknown({unknown:#x})")?;
            first = false;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// Generation identifiers (DRBD-style; the decision table lives in `docs/resync-rules.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Generations {
    /// Current generation of the local data.
    pub current: u64,
    /// Generation at which the dirty bitmap started recording (0 = bitmap not in use / in sync).
    pub bitmap: u64,
    /// Older generations, most recent first.
    pub history: [u64; HISTORY_LEN],
}

/// The mutable part of the superblock, changed through `ClusterPartition::update_superblock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SbState {
    /// Flag bits.
    pub flags: Flags,
    /// Generation identifiers.
    pub gens: Generations,
    /// Unix seconds when the mirror last broke. Informational only: never used to pick a
    /// resync direction (wall clocks differ between nodes).
    pub break_time: u64,
}

/// Identity of the metadata and of the data partition it belongs to; checked at every attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Random UUID made when the metadata was created.
    pub uuid: Uuid,
    /// Resource name (at most 63 bytes of UTF-8).
    pub resource: String,
    /// Node name (at most 63 bytes of UTF-8).
    pub node: String,
    /// Size in bytes of the data partition at creation.
    pub data_size: u64,
    /// Stable id of the data partition (WWID/serial) or empty for files / when unavailable.
    pub data_stable_id: String,
}

/// Bitmap geometry, fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes of the mirrored volume (≤ data size).
    pub volume_size: u64,
    /// Bytes per region (power of two).
    pub region_size: u64,
    /// ceil(volume_size / region_size).
    pub region_count: u64,
    /// ceil(region_count / 32640).
    pub chunk_count: u64,
}

impl Geometry {
    /// Computes the geometry for a volume, validating the region size.
    pub fn new(volume_size: u64, region_size: u64) -> Result<Geometry, String> {
        if !region_size.is_power_of_two()
            || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size)
        {
            return Err(format!(
                "region size {region_size} must be a power of two between {MIN_REGION_SIZE} and {MAX_REGION_SIZE}"
            ));
        }
        if volume_size == 0 {
            return Err("volume size must be > 0".into());
        }
        let region_count = volume_size.div_ceil(region_size);
        let chunk_count = region_count.div_ceil(BITS_PER_CHUNK);
        if chunk_count > u32::MAX as u64 {
            return Err(format!(
                "volume of {volume_size} bytes needs too many bitmap chunks"
            ));
        }
        Ok(Geometry {
            volume_size,
            region_size,
            region_count,
            chunk_count,
        })
    }

    /// Minimum cluster-partition size holding both slots and all bitmap chunks.
    pub fn required_partition_size(&self) -> u64 {
        BITMAP_OFFSET + self.chunk_count * CHUNK_SIZE as u64
    }

    /// Byte offset of chunk `idx`.
    pub fn chunk_offset(idx: u64) -> u64 {
        BITMAP_OFFSET + idx * CHUNK_SIZE as u64
    }

    /// Number of valid region bits in chunk `idx`.
    pub fn bits_in_chunk(&self, idx: u64) -> u64 {
        let start = idx * BITS_PER_CHUNK;
        (self.region_count - start).min(BITS_PER_CHUNK)
    }
}

/// One superblock (a decoded slot).
///
/// Byte layout of a 4096-byte slot (little-endian):
///
/// ```text
/// off  size  field
///   0    8   magic "NBDMIRSB"
///   8    4   format version (1)
///  12    4   slot size (4096)
///  16    8   sequence number (slot index = seq % 2)
///  24    4   CRC-32 (IEEE) of the 4096 bytes with this field taken as zero
///  28    4   flags (see Flags)
///  32   16   metadata UUID
///  48    8   data partition size (identity)
///  56    8   volume size
///  64    8   region size (power of two)
///  72    8   region count
///  80    8   bitmap offset (8192)
///  88    4   chunk size (4096)
///  92    4   bits per chunk (32640)
///  96    8   chunk count
/// 104    8   current generation
/// 112    8   bitmap generation
/// 120   32   generation history [4 x u64], most recent first
/// 152    8   created time (unix seconds)
/// 160    8   last update time (unix seconds, informational)
/// 168    8   break time (unix seconds, informational)
/// 176   64   resource name: u8 length + up to 63 bytes UTF-8, zero padded
/// 240   64   node name: u8 length + up to 63 bytes UTF-8, zero padded
/// 304  256   data stable id: u8 length + up to 255 bytes UTF-8, zero padded
/// 560 3536   reserved, zero
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Sequence number; increases by one per superblock write.
    pub seq: u64,
    /// Identity checked at attach.
    pub identity: Identity,
    /// Bitmap geometry.
    pub geometry: Geometry,
    /// Mutable state.
    pub state: SbState,
    /// Unix seconds at creation.
    pub created_time: u64,
    /// Unix seconds of the last superblock write (informational only).
    pub last_update_time: u64,
}

/// Result of checking one superblock slot (magic and CRC only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotStatus {
    /// The slot is all zero bytes (never written, or wiped).
    Zero,
    /// The magic is wrong.
    BadMagic {
        /// The 8 bytes found.
        got: [u8; 8],
    },
    /// Magic matches but the CRC does not (torn or corrupted write).
    BadCrc {
        /// Sequence number field as found (not trustworthy).
        seq: u64,
        /// CRC stored in the slot.
        expected: u32,
        /// CRC computed over the slot contents.
        actual: u32,
    },
    /// Magic and CRC are good.
    Valid {
        /// Sequence number.
        seq: u64,
        /// Format version field.
        version: u32,
        /// CRC (stored == computed).
        crc: u32,
    },
}

impl fmt::Display for SlotStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotStatus::Zero => f.write_str("all zero"),
            SlotStatus::BadMagic { got } => write!(
                f,
                "bad magic: expected {:?} got {:?} ({:02x?})",
                String::from_utf8_lossy(&SB_MAGIC),
                String::from_utf8_lossy(got),
                got
            ),
            SlotStatus::BadCrc { seq, expected, actual } => write!(
                f,
                "CRC mismatch (seq field {seq}): expected {expected:#010x} (stored), actual {actual:#010x} (computed)"
            ),
            SlotStatus::Valid { seq, version, crc } => {
                write!(f, "valid (seq {seq}, version {version}, crc {crc:#010x})")
            }
        }
    }
}

/// Step one of slot decoding: magic and CRC.
pub fn check_slot(buf: &[u8]) -> SlotStatus {
    assert_eq!(buf.len(), SB_SLOT_SIZE);
    if buf.iter().all(|&b| b == 0) {
        return SlotStatus::Zero;
    }
    let got: [u8; 8] = buf[..8].try_into().expect("8 bytes");
    if got != SB_MAGIC {
        return SlotStatus::BadMagic { got };
    }
    let seq = get_u64(buf, OFF_SEQ);
    let expected = get_u32(buf, OFF_CRC);
    let actual = crc_with_hole(buf, OFF_CRC);
    if expected != actual {
        return SlotStatus::BadCrc {
            seq,
            expected,
            actual,
        };
    }
    SlotStatus::Valid {
        seq,
        version: get_u32(buf, OFF_VERSION),
        crc: actual,
    }
}

fn get_str(buf: &[u8], off: usize, field_len: usize, what: &str) -> Result<String, String> {
    let n = buf[off] as usize;
    if n > field_len - 1 {
        return Err(format!("{what} length {n} exceeds {}", field_len - 1));
    }
    String::from_utf8(buf[off + 1..off + 1 + n].to_vec())
        .map_err(|e| format!("{what} is not UTF-8: {e}"))
}

fn put_str(buf: &mut [u8], off: usize, field_len: usize, s: &str) {
    assert!(s.len() < field_len, "string validated before encoding");
    buf[off] = s.len() as u8;
    buf[off + 1..off + 1 + s.len()].copy_from_slice(s.as_bytes());
}

impl Superblock {
    /// Step two of slot decoding: interprets a slot for which [`check_slot`] returned `Valid`.
    /// Returns why the contents are unusable (unsupported version, inconsistent geometry, ...).
    pub fn parse(buf: &[u8]) -> Result<Superblock, String> {
        let version = get_u32(buf, OFF_VERSION);
        if version == 0 || version > FORMAT_VERSION {
            return Err(format!(
                "unsupported format version {version} (this build supports 1..={FORMAT_VERSION})"
            ));
        }
        let slot_size = get_u32(buf, OFF_SLOT_SIZE);
        if slot_size as usize != SB_SLOT_SIZE {
            return Err(format!("slot size {slot_size}, expected {SB_SLOT_SIZE}"));
        }
        let flags = Flags(get_u32(buf, OFF_FLAGS));
        if flags.0 & !Flags::ALL_V1.0 != 0 {
            return Err(format!(
                "unknown flag bits {:#x}",
                flags.0 & !Flags::ALL_V1.0
            ));
        }
        let volume_size = get_u64(buf, OFF_VOLUME_SIZE);
        let region_size = get_u64(buf, OFF_REGION_SIZE);
        let geometry = Geometry::new(volume_size, region_size)?;
        let checks = [
            (
                "region count",
                get_u64(buf, OFF_REGION_COUNT),
                geometry.region_count,
            ),
            (
                "bitmap offset",
                get_u64(buf, OFF_BITMAP_OFFSET),
                BITMAP_OFFSET,
            ),
            (
                "chunk size",
                get_u32(buf, OFF_CHUNK_SIZE) as u64,
                CHUNK_SIZE as u64,
            ),
            (
                "bits per chunk",
                get_u32(buf, OFF_BITS_PER_CHUNK) as u64,
                BITS_PER_CHUNK,
            ),
            (
                "chunk count",
                get_u64(buf, OFF_CHUNK_COUNT),
                geometry.chunk_count,
            ),
        ];
        for (what, found, expected) in checks {
            if found != expected {
                return Err(format!("{what} is {found}, expected {expected}"));
            }
        }
        let data_size = get_u64(buf, OFF_DATA_SIZE);
        if volume_size > data_size {
            return Err(format!(
                "volume size {volume_size} exceeds data size {data_size}"
            ));
        }
        let uuid = Uuid::from_bytes(buf[OFF_UUID..OFF_UUID + 16].try_into().expect("16 bytes"));
        let mut history = [0u64; HISTORY_LEN];
        for (i, h) in history.iter_mut().enumerate() {
            *h = get_u64(buf, OFF_HISTORY + 8 * i);
        }
        Ok(Superblock {
            seq: get_u64(buf, OFF_SEQ),
            identity: Identity {
                uuid,
                resource: get_str(buf, OFF_RESOURCE, 64, "resource name")?,
                node: get_str(buf, OFF_NODE, 64, "node name")?,
                data_size,
                data_stable_id: get_str(buf, OFF_STABLE_ID, 256, "data stable id")?,
            },
            geometry,
            state: SbState {
                flags,
                gens: Generations {
                    current: get_u64(buf, OFF_CURRENT_GEN),
                    bitmap: get_u64(buf, OFF_BITMAP_GEN),
                    history,
                },
                break_time: get_u64(buf, OFF_BREAK),
            },
            created_time: get_u64(buf, OFF_CREATED),
            last_update_time: get_u64(buf, OFF_LAST_UPDATE),
        })
    }

    /// Encodes into a 4096-byte slot image with CRC.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SB_SLOT_SIZE];
        b[..8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, OFF_VERSION, FORMAT_VERSION);
        put_u32(&mut b, OFF_SLOT_SIZE, SB_SLOT_SIZE as u32);
        put_u64(&mut b, OFF_SEQ, self.seq);
        put_u32(&mut b, OFF_FLAGS, self.state.flags.0);
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(self.identity.uuid.as_bytes());
        put_u64(&mut b, OFF_DATA_SIZE, self.identity.data_size);
        put_u64(&mut b, OFF_VOLUME_SIZE, self.geometry.volume_size);
        put_u64(&mut b, OFF_REGION_SIZE, self.geometry.region_size);
        put_u64(&mut b, OFF_REGION_COUNT, self.geometry.region_count);
        put_u64(&mut b, OFF_BITMAP_OFFSET, BITMAP_OFFSET);
        put_u32(&mut b, OFF_CHUNK_SIZE, CHUNK_SIZE as u32);
        put_u32(&mut b, OFF_BITS_PER_CHUNK, BITS_PER_CHUNK as u32);
        put_u64(&mut b, OFF_CHUNK_COUNT, self.geometry.chunk_count);
        put_u64(&mut b, OFF_CURRENT_GEN, self.state.gens.current);
        put_u64(&mut b, OFF_BITMAP_GEN, self.state.gens.bitmap);
        for (i, h) in self.state.gens.history.iter().enumerate() {
            put_u64(&mut b, OFF_HISTORY + 8 * i, *h);
        }
        put_u64(&mut b, OFF_CREATED, self.created_time);
        put_u64(&mut b, OFF_LAST_UPDATE, self.last_update_time);
        put_u64(&mut b, OFF_BREAK, self.state.break_time);
        put_str(&mut b, OFF_RESOURCE, 64, &self.identity.resource);
        put_str(&mut b, OFF_NODE, 64, &self.identity.node);
        put_str(&mut b, OFF_STABLE_ID, 256, &self.identity.data_stable_id);
        let crc = crc_with_hole(&b, OFF_CRC);
        put_u32(&mut b, OFF_CRC, crc);
        b
    }

    /// Slot index this superblock is written to.
    pub fn slot(&self) -> usize {
        (self.seq % 2) as usize
    }
}

/// The 4-byte tag stored in every chunk header: the first 4 bytes of the metadata UUID, so a chunk
/// left over from an earlier `create` is not mistaken for one of this metadata.
pub fn uuid_tag(uuid: &Uuid) -> u32 {
    u32::from_le_bytes(uuid.as_bytes()[..4].try_into().expect("4 bytes"))
}

/// Why a bitmap chunk was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkFault {
    /// The chunk buffer has the wrong length.
    BadLength {
        /// Expected length.
        expected: usize,
        /// Found length.
        found: usize,
    },
    /// The chunk is all zero (never written).
    Zero,
    /// Wrong magic.
    BadMagic {
        /// Bytes found.
        got: [u8; 4],
    },
    /// CRC mismatch.
    BadCrc {
        /// CRC stored in the header.
        expected: u32,
        /// CRC computed over the chunk.
        actual: u32,
    },
    /// The header's chunk index is not the one expected at this position.
    IndexMismatch {
        /// Expected index.
        expected: u32,
        /// Index found.
        found: u32,
    },
    /// The header's UUID tag is not this metadata's.
    TagMismatch {
        /// Expected tag.
        expected: u32,
        /// Tag found.
        found: u32,
    },
    /// The chunk index is beyond the bitmap.
    IndexOutOfRange {
        /// Index found.
        index: u32,
        /// Number of chunks.
        chunk_count: u64,
    },
    /// Bits set beyond the last region of the bitmap.
    TrailingBits,
}

impl fmt::Display for ChunkFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkFault::BadLength { expected, found } => {
                write!(f, "chunk length {found}, expected {expected}")
            }
            ChunkFault::Zero => f.write_str("chunk is all zero (never written)"),
            ChunkFault::BadMagic { got } => {
                write!(f, "bad chunk magic: expected {CHUNK_MAGIC:02x?} got {got:02x?}")
            }
            ChunkFault::BadCrc { expected, actual } => write!(
                f,
                "chunk CRC mismatch: expected {expected:#010x} (stored), actual {actual:#010x} (computed)"
            ),
            ChunkFault::IndexMismatch { expected, found } => {
                write!(f, "chunk index {found}, expected {expected}")
            }
            ChunkFault::TagMismatch { expected, found } => {
                write!(f, "chunk uuid tag {found:#010x}, expected {expected:#010x}")
            }
            ChunkFault::IndexOutOfRange { index, chunk_count } => {
                write!(f, "chunk index {index} out of range (bitmap has {chunk_count} chunks)")
            }
            ChunkFault::TrailingBits => f.write_str("bits set beyond the last region"),
        }
    }
}

/// Byte layout of a 4096-byte bitmap chunk (little-endian):
///
/// ```text
/// off  size  field
///   0    4   magic "NMBC"
///   4    4   chunk index
///   8    4   CRC-32 (IEEE) of the 4096 bytes with this field taken as zero
///  12    4   uuid tag (first 4 bytes of the metadata UUID)
///  16 4080   bits: region (index*32640 + i) is bit (i % 8) of byte 16 + i/8 (LSB first)
/// ```
///
/// Encodes chunk `index` from its 510 u64 words of bits.
pub fn encode_chunk(index: u32, tag: u32, words: &[u64]) -> Vec<u8> {
    assert!(words.len() <= WORDS_PER_CHUNK);
    let mut b = vec![0u8; CHUNK_SIZE];
    b[..4].copy_from_slice(&CHUNK_MAGIC);
    put_u32(&mut b, CH_OFF_INDEX, index);
    put_u32(&mut b, CH_OFF_TAG, tag);
    for (i, w) in words.iter().enumerate() {
        put_u64(&mut b, CHUNK_HEADER_SIZE + 8 * i, *w);
    }
    let crc = crc_with_hole(&b, CH_OFF_CRC);
    put_u32(&mut b, CH_OFF_CRC, crc);
    b
}

/// Step one of chunk decoding: length, magic, CRC, index and (optionally) tag. On success returns
/// the chunk index found in the header.
pub fn check_chunk(
    buf: &[u8],
    expected_index: Option<u32>,
    expected_tag: Option<u32>,
) -> Result<u32, ChunkFault> {
    if buf.len() != CHUNK_SIZE {
        return Err(ChunkFault::BadLength {
            expected: CHUNK_SIZE,
            found: buf.len(),
        });
    }
    let got: [u8; 4] = buf[..4].try_into().expect("4 bytes");
    if got != CHUNK_MAGIC {
        if buf.iter().all(|&b| b == 0) {
            return Err(ChunkFault::Zero);
        }
        return Err(ChunkFault::BadMagic { got });
    }
    let expected = get_u32(buf, CH_OFF_CRC);
    let actual = crc_with_hole(buf, CH_OFF_CRC);
    if expected != actual {
        return Err(ChunkFault::BadCrc { expected, actual });
    }
    let found = get_u32(buf, CH_OFF_INDEX);
    if let Some(e) = expected_index {
        if e != found {
            return Err(ChunkFault::IndexMismatch { expected: e, found });
        }
    }
    if let Some(e) = expected_tag {
        let t = get_u32(buf, CH_OFF_TAG);
        if e != t {
            return Err(ChunkFault::TagMismatch {
                expected: e,
                found: t,
            });
        }
    }
    Ok(found)
}

/// Step two of chunk decoding: the bit words of a chunk that passed [`check_chunk`], validating
/// that no bit beyond `valid_bits` is set.
pub fn chunk_words(buf: &[u8], valid_bits: u64) -> Result<Vec<u64>, ChunkFault> {
    let nwords = valid_bits.div_ceil(64) as usize;
    let mut words = Vec::with_capacity(nwords);
    for i in 0..WORDS_PER_CHUNK {
        let w = get_u64(buf, CHUNK_HEADER_SIZE + 8 * i);
        if i < nwords {
            let keep_bits = (valid_bits - 64 * i as u64).min(64);
            let mask = if keep_bits == 64 {
                u64::MAX
            } else {
                (1u64 << keep_bits) - 1
            };
            if w & !mask != 0 {
                return Err(ChunkFault::TrailingBits);
            }
            words.push(w);
        } else if w != 0 {
            return Err(ChunkFault::TrailingBits);
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_sb() -> Superblock {
        Superblock {
            seq: 7,
            identity: Identity {
                uuid: Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788),
                resource: "r0".into(),
                node: "alpha".into(),
                data_size: 1 << 30,
                data_stable_id: "wwn-0x5000c500a1b2c3d4".into(),
            },
            geometry: Geometry::new(1 << 30, DEFAULT_REGION_SIZE).unwrap(),
            state: SbState {
                flags: Flags::CONSISTENT,
                gens: Generations {
                    current: 5,
                    bitmap: 3,
                    history: [2, 1, 0, 0],
                },
                break_time: 99,
            },
            created_time: 10,
            last_update_time: 20,
        }
    }

    #[test]
    fn layout_constants() {
        assert_eq!(BITS_PER_CHUNK, 32640);
        assert_eq!(WORDS_PER_CHUNK, 510);
        assert_eq!(OFF_STABLE_ID + 256, RESERVED_START);
    }

    #[test]
    fn superblock_field_offsets_are_as_documented() {
        let b = sample_sb().encode();
        assert_eq!(&b[0..8], b"NBDMIRSB");
        assert_eq!(get_u32(&b, 8), 1);
        assert_eq!(get_u64(&b, 16), 7);
        assert_eq!(get_u32(&b, 28), Flags::CONSISTENT.0);
        assert_eq!(get_u64(&b, 64), 65536);
        assert_eq!(get_u64(&b, 104), 5);
        assert_eq!(b[176], 2);
        assert_eq!(&b[177..179], b"r0");
        assert!(b[RESERVED_START..].iter().all(|&x| x == 0));
    }

    #[test]
    fn operator_break_flag_is_known_and_named() {
        let f = Flags(Flags::OPERATOR_BREAK.0 | Flags::FORCED.0);
        assert_eq!(f.to_string(), "forced,operator-break");
        let mut sb = sample_sb();
        sb.state.flags = f;
        assert_eq!(Superblock::parse(&sb.encode()).unwrap().state.flags, f);
        // The next bit is still unknown: refused, not dropped.
        sb.state.flags = Flags(1 << 8);
        let e = Superblock::parse(&sb.encode()).unwrap_err();
        assert!(e.contains("unknown flag bits 0x100"), "{e}");
    }

    proptest! {
        #[test]
        fn superblock_roundtrip(seq in any::<u64>(), cur in any::<u64>(), bm in any::<u64>(),
                                hist in any::<[u64; 4]>(), flags in 0u32..=Flags::ALL_V1.0, bt in any::<u64>(),
                                res in "[a-z0-9-]{1,63}", node in "[a-z]{1,63}", sid in "[ -~]{0,255}",
                                vol in 1u64..(1u64 << 50), rs_log in 12u32..=30) {
            let mut sb = sample_sb();
            sb.seq = seq;
            sb.state = SbState { flags: Flags(flags), gens: Generations { current: cur, bitmap: bm, history: hist }, break_time: bt };
            sb.identity.resource = res;
            sb.identity.node = node;
            sb.identity.data_stable_id = sid;
            sb.identity.data_size = vol;
            sb.geometry = Geometry::new(vol, 1 << rs_log).unwrap();
            let b = sb.encode();
            prop_assert_eq!(check_slot(&b), SlotStatus::Valid { seq, version: 1, crc: get_u32(&b, OFF_CRC) });
            prop_assert_eq!(Superblock::parse(&b).unwrap(), sb);
        }

        #[test]
        fn any_single_byte_corruption_is_detected(pos in 0usize..SB_SLOT_SIZE, x in 1u8..=255) {
            let mut b = sample_sb().encode();
            b[pos] ^= x;
            let valid = matches!(check_slot(&b), SlotStatus::Valid { .. });
            prop_assert!(!valid);
        }

        #[test]
        fn chunk_roundtrip_and_corruption(words in proptest::collection::vec(any::<u64>(), WORDS_PER_CHUNK),
                                          idx in any::<u32>(), tag in any::<u32>(),
                                          pos in 0usize..CHUNK_SIZE, x in 1u8..=255) {
            let b = encode_chunk(idx, tag, &words);
            prop_assert_eq!(check_chunk(&b, Some(idx), Some(tag)), Ok(idx));
            prop_assert_eq!(chunk_words(&b, BITS_PER_CHUNK).unwrap(), words);
            let mut c = b.clone();
            c[pos] ^= x;
            prop_assert!(check_chunk(&c, Some(idx), Some(tag)).is_err());
        }
    }

    #[test]
    fn trailing_bits_rejected() {
        let mut words = vec![0u64; WORDS_PER_CHUNK];
        words[1] = 1 << 5; // region 69
        let b = encode_chunk(0, 0, &words);
        assert_eq!(chunk_words(&b, 69), Err(ChunkFault::TrailingBits));
        assert_eq!(chunk_words(&b, 70).unwrap().len(), 2);
    }
}
