//! nbd-mirror cluster partition: superblocks, generation identifiers and the persistent dirty
//! bitmap for one mirrored resource on one node. The byte-level format is specified in
//! `docs/on-disk-format.md`.
//!
//! # Module map
//!
//! * [`layout`] — on-disk constants and codecs: the two 4 KiB superblock slots ([`Superblock`],
//!   [`Flags`], [`Generations`]) and the 4 KiB bitmap chunks (header + CRC + 32640 bits).
//! * [`bits`] — [`DirtyBits`], the dense in-memory bitmap (also the peer-exchange form) and
//!   [`BitmapChunk`].
//! * [`storage`] — the [`MetaStorage`] trait, [`FileStorage`] (pwrite + fdatasync on a file or
//!   block device, exclusively locked), [`MemStorage`], and [`data_partition_identity`] (size and
//!   WWID/serial of the data partition).
//! * `load` — choosing the superblock slot, the blank check, loading chunks ([`LoadReport`]).
//! * [`partition`] — [`ClusterPartition`]: `create`/`open` with identity checks, atomic
//!   superblock updates, and the write-intent dirty tracker (group commit, hot extents,
//!   in-flight counts, lazy clears).
//! * `hot` — the tracker's hot-extent LRU (the activity log) and its per-extent index of
//!   intent-only regions.
//! * [`dump`](mod@dump) — [`dump()`](fn@dump) and [`DumpReport`] for `mdctrl dump-md`.
//! * [`testing`] — [`testing::FaultyStorage`]: volatile-cache disk model with crash points, torn
//!   writes and injected EIO, for this crate's and other crates' tests;
//!   [`testing::fuzz_metadata`], the body of the `metadata` fuzz target (`bitmap/fuzz`).
//! * [`error`] — [`MetaError`], the one error type of this layer.
//!
//! # The rule everything serves
//!
//! A region whose data write may have been issued is dirty on stable storage until explicitly
//! cleared ([`ClusterPartition::begin_write`] returns only then); a region is cleared only when no
//! write to it is in flight and every write to it reached the peer durably (or resync copied it).
//! Hot extents only ever add dirty regions to that set (more to resync after a crash, never less).

pub mod bits;
pub mod dump;
pub mod error;
mod hot;
pub mod layout;
mod load;
pub mod partition;
pub mod storage;
pub mod testing;

pub use bits::{BitmapChunk, DirtyBits};
pub use dump::{dump, DumpReport, SlotDump};
pub use error::{MetaError, Mismatch, Result};
pub use hot::MAX_EXTENT_REGIONS;
pub use layout::{
    ChunkFault, Flags, Generations, Geometry, Identity, SbState, SlotStatus, Superblock,
    DEFAULT_REGION_SIZE, FORMAT_VERSION,
};
pub use load::LoadReport;
pub use partition::{
    estimate_memory, AttachCheck, ClusterPartition, CreateParams, MetaStats, WriteTicket,
    DEFAULT_HOT_EXTENT_SIZE, DEFAULT_KEEP_DIRTY,
};
pub use storage::{data_partition_identity, DataIdentity, FileStorage, MemStorage, MetaStorage};

#[cfg(test)]
mod tests {
    /// The agent shares the partition and tickets across tokio tasks and threads.
    #[test]
    fn partition_and_ticket_are_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<crate::ClusterPartition>();
        check::<crate::WriteTicket>();
        check::<crate::MetaError>();
    }
}
