//! The crate's error type: one enum for the metadata layer, every variant carrying the detail an
//! operator needs (operation, offset, expected vs found).

use crate::layout::{ChunkFault, SlotStatus};
use std::fmt;
use std::io;

/// One identity field that did not match at attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Field name.
    pub field: &'static str,
    /// What the caller expected (from configuration / the data partition).
    pub expected: String,
    /// What the cluster partition holds.
    pub found: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {:?}, found {:?}",
            self.field, self.expected, self.found
        )
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Errors of the cluster-partition layer.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A storage operation failed.
    #[error("cluster partition I/O error: {op} at offset {offset} (length {len}): {source}")]
    Io {
        /// "read", "write" or "sync" plus what was being done.
        op: &'static str,
        /// Byte offset (0 for sync).
        offset: u64,
        /// Length in bytes (0 for sync).
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The partition is all zero: not initialised yet (like after `dd if=/dev/zero`).
    #[error("cluster partition is blank (all zero); it must be initialised")]
    Blank,
    /// Both superblock slots are zero but other bytes are not: not ours, or an interrupted create.
    #[error(
        "both superblock slots are all zero but the partition has non-zero data at offset {offset} \
         (interrupted create, or not a cluster partition); refusing to guess"
    )]
    ZeroSuperblocksNotBlank {
        /// First non-zero byte found.
        offset: u64,
    },
    /// The partition is smaller than the layout needs.
    #[error("cluster partition too small: {len} bytes, {what} needs {need} bytes")]
    TooSmall {
        /// Actual size.
        len: u64,
        /// Required size.
        need: u64,
        /// What needs it.
        what: String,
    },
    /// Neither slot has a valid superblock.
    #[error("no valid superblock: slot 0: {slot0}; slot 1: {slot1}")]
    NoValidSuperblock {
        /// Status of slot 0.
        slot0: SlotStatus,
        /// Status of slot 1.
        slot1: SlotStatus,
    },
    /// The newest CRC-valid slot cannot be used (unsupported version, inconsistent fields).
    /// Never silently falls back to the older slot: that could resurrect old generations.
    #[error("superblock slot {slot} (seq {seq}) has a valid CRC but is unusable: {reason}")]
    BadSuperblock {
        /// Slot index.
        slot: usize,
        /// Its sequence number.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// The metadata belongs to another resource, node or data partition.
    #[error("metadata does not belong to this data partition/resource: {}", join(.mismatches))]
    IdentityMismatch {
        /// Every field that differs.
        mismatches: Vec<Mismatch>,
    },
    /// `create` without force found valid metadata.
    #[error(
        "refusing to overwrite existing metadata without force: resource {resource:?}, node {node:?}, uuid {uuid}"
    )]
    AlreadyInitialised {
        /// Resource name found.
        resource: String,
        /// Node name found.
        node: String,
        /// Metadata UUID found.
        uuid: uuid::Uuid,
    },
    /// `create` without force found something that is neither blank nor valid metadata.
    #[error("refusing to overwrite unrecognised content without force: {reason}")]
    Unrecognised {
        /// What was found.
        reason: String,
    },
    /// Invalid parameters.
    #[error("invalid parameter: {0}")]
    InvalidParams(String),
    /// A byte range outside the volume.
    #[error("range offset {offset} length {len} is outside the volume ({volume_size} bytes)")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Volume size.
        volume_size: u64,
    },
    /// A region index outside the bitmap.
    #[error("region {region} is outside the bitmap ({region_count} regions)")]
    RegionOutOfRange {
        /// Region index.
        region: u64,
        /// Number of regions.
        region_count: u64,
    },
    /// A bitmap from elsewhere (peer) has a different geometry.
    #[error("bitmap geometry mismatch: expected {expected} regions, found {found}")]
    GeometryMismatch {
        /// Our region count.
        expected: u64,
        /// Theirs.
        found: u64,
    },
    /// A chunk given to `decode_chunk`/import was rejected.
    #[error("bad bitmap chunk: {0}")]
    BadChunk(ChunkFault),
    /// An earlier metadata write or sync failed; after that the on-disk state is unknown (and a
    /// retried fsync can falsely succeed), so no further metadata writes are attempted.
    #[error("cluster partition failed earlier and accepts no more metadata writes until re-opened: {cause}")]
    Poisoned {
        /// The original failure.
        cause: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = MetaError> = std::result::Result<T, E>;

impl MetaError {
    pub(crate) fn io(op: &'static str, offset: u64, len: u64, source: io::Error) -> MetaError {
        MetaError::Io {
            op,
            offset,
            len,
            source,
        }
    }
}
