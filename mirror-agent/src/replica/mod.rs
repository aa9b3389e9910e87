//! Replication data path (`docs/protocol.md` §9; design notes properties 1–4).
//!
//! Module map:
//!
//! - [`active`]: [`ActiveVolume`], the [`BlockEngine`](crate::engine::BlockEngine)
//!   the NBD server serves on the active node: dirty marking before data,
//!   overlapping writes serialised, every write/trim/zeroes shipped to the
//!   standby, completion by mode (sync/semi/async), bitmap clearing only after
//!   Ack2, ack timeouts and mirror breaks recorded durably before any write
//!   completes local-only, the RPO meter ([`RpoSnapshot`]).
//! - [`standby`]: [`StandbySink`] and [`run_standby`], the standby's side: Ack1 on receipt,
//!   overlapping writes applied in `seq` order, Ack2 only once durable (group
//!   commit by default, per-write FUA as an option), Flush as a barrier.
//! - [`link`]: the session interface the data path needs ([`FrameTx`],
//!   [`CloseSignal`], [`ReplicaLink`]), implemented by `crate::peer` sessions
//!   (`ReplicaLink::from(session)`), and [`memory_pair`] (two in-process ends
//!   without a codec) for unit tests.
//! - [`testing`] (test support): `GatedEngine`, which holds or delays a disk's requests,
//!   for tests of this path.
//! - `range_lock` (private): the FIFO range lock both sides use for ordering.
//!
//! Events for the resource owner ([`ReplicaEvent`]) go through an mpsc
//! channel returned by [`ActiveVolume::new`].

pub mod active;
pub mod link;
mod range_lock;
pub mod standby;
pub mod testing;

pub use active::{AckSink, ActiveConfig, ActiveVolume, RpoSnapshot};
pub use link::{memory_pair, CloseSignal, FrameTx, LinkClosed, ReplicaLink};
pub use standby::{
    run_standby, run_standby_with, DiskError, Durability, SinkClosed, StandbyEnd, StandbyOptions,
    StandbySink,
};

/// What the active side reports to its owner (the resource).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaEvent {
    /// The mirror broke: the session was closed, an ack timed out, the peer
    /// reported a disk error, the async budget overflowed, or the peer broke
    /// the protocol. The break is being recorded in the superblock; writes go
    /// local-only (regions stay dirty) until a resync and a new attach.
    MirrorBroken {
        /// Human-readable cause.
        reason: String,
        /// The peer reported a failed write or flush (its disk is bad):
        /// reconnecting will not help until an operator looks.
        peer_disk_error: bool,
    },
    /// The break was durably recorded (generations diverged, break time set).
    BreakRecorded,
    /// Recording the break failed (metadata poisoned): local-only writes fail
    /// with EIO rather than complete unrecorded.
    BreakRecordFailed {
        /// The metadata error.
        error: String,
    },
    /// The local data disk failed a request (the first failure only): the
    /// owner records `DISK_ERROR` in the superblock and tells the peer. The
    /// request itself failed with its errno; its regions stay dirty.
    LocalDiskError(crate::engine::DiskErrorReport),
    /// A write's intent could not be recorded in the cluster partition (the
    /// first refusal only): that write and every later one fail with EIO
    /// until the agent restarts on a working partition. The owner tells the
    /// peer (its state carries the partition's failure).
    MetadataFailed {
        /// The metadata error.
        error: String,
    },
}

/// Errors of the replication layer.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The peer sent a frame not allowed on the data path in this role.
    #[error("protocol error from peer: {0}")]
    Protocol(String),
    /// `attach` while a session is attached.
    #[error("a session is already attached (attach id {0})")]
    AlreadyAttached(u64),
    /// Recording the mirror break in the superblock failed.
    #[error("recording the mirror break failed: {0}")]
    BreakRecord(String),
}
