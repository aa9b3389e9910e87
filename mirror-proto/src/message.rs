//! Message bodies and their field types. The byte layout of every payload is shown next to
//! its variant; all integers are little-endian. `str8` is a u8 length followed by that many
//! UTF-8 bytes; `str16` the same with a u16 length.

use bytes::Bytes;

use crate::kind::{MessageKind, FLAG_FUA, FLAG_NO_HOLE};
use crate::limits::MAC_LEN;
use crate::limits::NONCE_LEN;

/// Replication role of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// 0 — neither exporting nor accepting replication.
    None = 0,
    /// 1 — receives replicated writes.
    Standby = 1,
    /// 2 — exports the device and ships writes.
    Active = 2,
}

impl Role {
    /// Decodes the wire byte.
    pub fn from_u8(v: u8) -> Option<Role> {
        match v {
            0 => Some(Role::None),
            1 => Some(Role::Standby),
            2 => Some(Role::Active),
            _ => None,
        }
    }
}

/// State of a node's local backing disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DiskState {
    /// 1 — holds the latest data.
    UpToDate = 1,
    /// 2 — consistent, but not known to be the latest (peer unreachable).
    Consistent = 2,
    /// 3 — consistent but known to be older than the peer's.
    Outdated = 3,
    /// 4 — a resync target mid-resync: not usable.
    Inconsistent = 4,
    /// 5 — I/O errors, detached.
    Failed = 5,
    /// 6 — no local disk attached.
    Diskless = 6,
}

impl DiskState {
    /// Decodes the wire byte.
    pub fn from_u8(v: u8) -> Option<DiskState> {
        match v {
            1 => Some(DiskState::UpToDate),
            2 => Some(DiskState::Consistent),
            3 => Some(DiskState::Outdated),
            4 => Some(DiskState::Inconsistent),
            5 => Some(DiskState::Failed),
            6 => Some(DiskState::Diskless),
            _ => None,
        }
    }
}

/// Why a peer closes the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GoodbyeReason {
    /// 1 — orderly shutdown of the agent.
    Shutdown = 1,
    /// 2 — role handover (switchover) in progress.
    Handover = 2,
    /// 3 — configuration changed; reconnect expected.
    ConfigChange = 3,
    /// 4 — closing after an Error frame.
    Error = 4,
}

impl GoodbyeReason {
    /// Decodes the wire byte.
    pub fn from_u8(v: u8) -> Option<GoodbyeReason> {
        match v {
            1 => Some(GoodbyeReason::Shutdown),
            2 => Some(GoodbyeReason::Handover),
            3 => Some(GoodbyeReason::ConfigChange),
            4 => Some(GoodbyeReason::Error),
            _ => None,
        }
    }
}

/// Capability bits advertised in Hello (u16). Unknown bits are rejected (strict).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(u16);

impl Features {
    /// Bit 0: the sender's backing device supports discard (Trim).
    pub const TRIM: Features = Features(1 << 0);
    /// Bit 1: the sender's backing device supports write-zeroes.
    pub const WRITE_ZEROES: Features = Features(1 << 1);
    /// Bit 2: the sender can honour FUA.
    pub const FUA: Features = Features(1 << 2);
    /// All bits defined in this version.
    pub const ALL: Features = Features(0b111);

    /// No capability.
    pub const fn empty() -> Features {
        Features(0)
    }
    /// Builds from wire bits; `None` if an undefined bit is set.
    pub const fn from_bits(bits: u16) -> Option<Features> {
        if bits & !Features::ALL.0 == 0 {
            Some(Features(bits))
        } else {
            None
        }
    }
    /// The wire bits.
    pub const fn bits(self) -> u16 {
        self.0
    }
    /// True if every bit of `other` is set in `self`.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

/// Data generation identifiers (see docs/resync-rules.md).
///
/// ```text
/// 0  u64 current
/// 8  u64 bitmap         (0 = no bitmap generation)
/// 16 u8  history_count  (<= MAX_GENERATION_HISTORY = 16)
/// 17 u64 × history_count history, newest first
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Generation {
    /// Current generation id.
    pub current: u64,
    /// Generation the dirty bitmap is relative to (0 if none).
    pub bitmap: u64,
    /// Older generation ids, newest first, at most [`MAX_GENERATION_HISTORY`](crate::MAX_GENERATION_HISTORY).
    pub history: Vec<u64>,
}

/// Session opening message; the first frame each side sends.
///
/// ```text
/// u8      version_count (1..=16)
/// u8 × n  versions, strictly ascending, non-zero
/// str8    node_name      (1..=255 bytes)
/// str8    cluster_name   (1..=255 bytes)
/// str8    resource_name  (1..=255 bytes)
/// u64     volume_size    bytes
/// u32     region_size    bytes, a power of two
/// u8      role           (Role)
/// u8      disk_state     (DiskState)
/// u16     features       (Features)
/// ...     generation     (Generation layout)
/// ```
/// The version list comes first so that future versions can always find it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hello {
    /// Protocol versions the sender supports, strictly ascending.
    pub versions: Vec<u8>,
    /// Sender's node name.
    pub node_name: String,
    /// Cluster name; both sides must agree.
    pub cluster_name: String,
    /// Replicated resource name; both sides must agree.
    pub resource_name: String,
    /// Size of the replicated volume in bytes.
    pub volume_size: u64,
    /// Bitmap region size in bytes (power of two).
    pub region_size: u32,
    /// Sender's current role.
    pub role: Role,
    /// Sender's disk state.
    pub disk_state: DiskState,
    /// Sender's capabilities.
    pub features: Features,
    /// Sender's generation identifiers.
    pub generation: Generation,
}

/// One slice of a dirty bitmap.
///
/// ```text
/// 0  u32 chunk_index   (< total_chunks)
/// 4  u32 total_chunks  (>= 1)
/// 8  u32 region_size   bytes, a power of two
/// 12 u32 region_count  number of valid bits (>= 1)
/// 16 u64 first_region  region index of bit 0
/// 24 ..  bits          ceil(region_count / 8) bytes; bit i of byte j (LSB first) is
///                      region first_region + 8*j + i; padding bits of the last byte must be 0
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BitmapChunk {
    /// Index of this chunk, 0-based.
    pub chunk_index: u32,
    /// Number of chunks in this bitmap transfer.
    pub total_chunks: u32,
    /// Region size the bits refer to.
    pub region_size: u32,
    /// Region index of the first bit.
    pub first_region: u64,
    /// Number of valid bits.
    pub region_count: u32,
    /// Bit data (zero-copy slice of the received frame).
    pub bits: Bytes,
}

/// One (region, checksum) pair of online verify.
///
/// ```text
/// 0 u64 region    region index
/// 8 u32 checksum  CRC-32 of the region's bytes
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionChecksum {
    /// Region index.
    pub region: u64,
    /// CRC-32 (IEEE) of the region's contents.
    pub checksum: u32,
}

/// A message body. The header's `seq` and flags live in [`Frame`](crate::Frame); header flags
/// are derived from the message (`fua`, `no_hole`), so a Frame cannot disagree with itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// `u8 × 32 nonce` — fresh random bytes from a CSPRNG, never reused.
    AuthChallenge {
        /// The challenge nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// `u8 × 32 mac` — [`auth::compute_response`](crate::auth::compute_response) over the transcript.
    AuthResponse {
        /// HMAC-SHA256 output.
        mac: [u8; MAC_LEN],
    },
    /// `u8 accepted` (0 = rejected, 1 = accepted; other values malformed).
    AuthResult {
        /// Whether the peer's AuthResponse verified.
        accepted: bool,
    },
    /// `u64 offset, u32 length (1..=32 MiB, == data len), u8 × length data`; header flag FUA allowed.
    Write {
        /// Byte offset on the volume.
        offset: u64,
        /// Force unit access (header flag bit 0).
        fua: bool,
        /// The data (zero-copy slice of the received frame).
        data: Bytes,
    },
    /// `u64 seq` — the frame with that seq was received (acks Write, Trim, WriteZeroes, ResyncData).
    Ack1 {
        /// Seq of the acknowledged frame.
        seq: u64,
    },
    /// `u64 seq, i32 status` — the frame with that seq is durable (status 0) or failed (negative errno).
    Ack2 {
        /// Seq of the acknowledged frame.
        seq: u64,
        /// 0 or a negative errno.
        status: i32,
    },
    /// Empty payload. Barrier + flush: answered by FlushAck once every earlier write is stable.
    Flush,
    /// `u64 seq, i32 status` — completion of the Flush with that seq.
    FlushAck {
        /// Seq of the Flush.
        seq: u64,
        /// 0 or a negative errno.
        status: i32,
    },
    /// `u64 offset, u64 length (>= 1)`; header flag FUA allowed. Acked with Ack1/Ack2.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        length: u64,
        /// Force unit access.
        fua: bool,
    },
    /// `u64 offset, u64 length (>= 1)`; header flags FUA and NO_HOLE allowed. Acked with Ack1/Ack2.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        length: u64,
        /// Force unit access.
        fua: bool,
        /// Must not deallocate.
        no_hole: bool,
    },
    /// See [`BitmapChunk`].
    BitmapChunk(BitmapChunk),
    /// `u64 offset, u32 length (1..=32 MiB)` — ask the sync source for that range.
    ResyncRequest {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        length: u32,
    },
    /// `u64 offset, u32 checksum, u32 length (1..=32 MiB, == data len), u8 × length data`.
    /// `checksum` is CRC-32 of `data`, computed where the data was read; the decoder and the
    /// encoder both verify it ([`ProtoError::DataChecksum`](crate::ProtoError::DataChecksum)).
    ResyncData {
        /// Byte offset.
        offset: u64,
        /// CRC-32 of `data`.
        checksum: u32,
        /// The data (zero-copy slice of the received frame).
        data: Bytes,
    },
    /// `u32 region_size, u32 count (1..=8192), RegionChecksum × count` — the sender's checksums.
    ChecksumRequest {
        /// Region size in bytes (power of two).
        region_size: u32,
        /// The sender's checksums.
        entries: Vec<RegionChecksum>,
    },
    /// `u64 request_seq, u32 region_size, u32 count (0..=8192), RegionChecksum × count` —
    /// the receiver's checksums for the regions of the request.
    ChecksumReply {
        /// Seq of the ChecksumRequest.
        request_seq: u64,
        /// Region size in bytes (power of two).
        region_size: u32,
        /// The receiver's checksums.
        entries: Vec<RegionChecksum>,
    },
    /// `u64 nonce, u64 timestamp_ns` — heartbeat; timestamp is the sender's monotonic clock.
    Ping {
        /// Arbitrary value echoed by Pong.
        nonce: u64,
        /// Sender's monotonic clock, nanoseconds.
        timestamp_ns: u64,
    },
    /// `u64 nonce, u64 timestamp_ns` — copies both fields of the Ping it answers.
    Pong {
        /// Ping's nonce.
        nonce: u64,
        /// Ping's timestamp.
        timestamp_ns: u64,
    },
    /// `u8 role, u8 disk_state, Generation`.
    StateChange {
        /// New role.
        role: Role,
        /// New disk state.
        disk_state: DiskState,
        /// New generation identifiers.
        generation: Generation,
    },
    /// `u32 code, str16 message (0..=4096 bytes)`.
    Error {
        /// One of [`error_code`](crate::error_code) (unknown codes are accepted).
        code: u32,
        /// Human-readable detail.
        message: String,
    },
    /// `u8 reason` (GoodbyeReason).
    Goodbye {
        /// Why the sender closes.
        reason: GoodbyeReason,
    },
    /// `u32 length (1..=64 KiB), u8 × length json` — a control-link message as UTF-8 JSON
    /// text. The codec checks length and UTF-8; the JSON is the receiver's to parse.
    /// Allowed only after authentication.
    Control {
        /// The JSON text.
        json: String,
    },
}

impl Message {
    /// The message kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::AuthChallenge { .. } => MessageKind::AuthChallenge,
            Message::AuthResponse { .. } => MessageKind::AuthResponse,
            Message::AuthResult { .. } => MessageKind::AuthResult,
            Message::Write { .. } => MessageKind::Write,
            Message::Ack1 { .. } => MessageKind::Ack1,
            Message::Ack2 { .. } => MessageKind::Ack2,
            Message::Flush => MessageKind::Flush,
            Message::FlushAck { .. } => MessageKind::FlushAck,
            Message::Trim { .. } => MessageKind::Trim,
            Message::WriteZeroes { .. } => MessageKind::WriteZeroes,
            Message::BitmapChunk(_) => MessageKind::BitmapChunk,
            Message::ResyncRequest { .. } => MessageKind::ResyncRequest,
            Message::ResyncData { .. } => MessageKind::ResyncData,
            Message::ChecksumRequest { .. } => MessageKind::ChecksumRequest,
            Message::ChecksumReply { .. } => MessageKind::ChecksumReply,
            Message::Ping { .. } => MessageKind::Ping,
            Message::Pong { .. } => MessageKind::Pong,
            Message::StateChange { .. } => MessageKind::StateChange,
            Message::Error { .. } => MessageKind::Error,
            Message::Goodbye { .. } => MessageKind::Goodbye,
            Message::Control { .. } => MessageKind::Control,
        }
    }

    /// Header flags implied by this message.
    pub fn flags(&self) -> u16 {
        let fua = |b: bool| if b { FLAG_FUA } else { 0 };
        match self {
            Message::Write { fua: f, .. } | Message::Trim { fua: f, .. } => fua(*f),
            Message::WriteZeroes {
                fua: f, no_hole, ..
            } => fua(*f) | if *no_hole { FLAG_NO_HOLE } else { 0 },
            _ => 0,
        }
    }

    /// Builds a ResyncData computing the checksum of `data`.
    pub fn resync_data(offset: u64, data: Bytes) -> Message {
        let checksum = crc32fast::hash(&data);
        Message::ResyncData {
            offset,
            checksum,
            data,
        }
    }
}
