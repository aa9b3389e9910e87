//! Local block I/O engines.
//!
//! Every byte the agent reads from or writes to a data partition goes through
//! [`BlockEngine`], so that the NBD server, replication and resync are written
//! once and tests can swap the engine for one that injects faults.
//!
//! Requests own their buffers (`Bytes` in, `Vec<u8>` or `Bytes` out): an io_uring
//! submission must not borrow memory that the caller could free before the
//! completion arrives.
//!
//! Errors are `std::io::Error` carrying the OS errno (`raw_os_error()`), so the
//! NBD layer can map EIO/ENOSPC/... to the matching NBD error per request.
//! Errors the engine detects itself use the errno a syscall would have
//! returned (a range past the end is `EINVAL`, a file that shrank under us is
//! `EIO`), so `raw_os_error()` is always set.
//!
//! Module map:
//!
//! - [`uring`]: [`UringEngine`], io_uring submitted from the calling task and
//!   reaped on the tokio runtime (eventfd), O_DIRECT where the backing
//!   supports it (read-modify-write for unaligned writes).
//! - [`portable`]: [`PortableEngine`], `pread`/`pwrite` on a fixed set of I/O
//!   threads, buffered I/O; for kernels without io_uring and as a reference.
//! - [`behind`]: write-behind of lone small writes on an O_DIRECT engine
//!   (through the page cache with `RWF_DONTCACHE`, when the NBD connection
//!   says the request is alone: [`lone_request`]).
//! - [`buf`]: [`buf::IoBuf`], pooled page-aligned buffers for request data
//!   (write payloads, read replies): no per-request allocation, zero-fill or
//!   O_DIRECT bounce copy.
//! - [`fault`]: [`FaultyEngine`], wraps any engine and injects errors, torn
//!   writes and a crash point by rules (tests).
//! - [`watched`]: [`Watched`], wraps any engine and reports its first disk
//!   error ([`is_disk_error`]) to a hook (the node records `DISK_ERROR`).
//! - [`stall`]: [`IoWatch`], how long a device has had requests pending
//!   without completing any (a stalled disk fails nothing, it just waits),
//!   and [`Timed`], which wraps any engine and counts its requests in one.
//! - `inline` (private): the buffered writes both engines do in the calling
//!   task on a device-backed file: plainly, with a watchdog thread that wakes
//!   an idle runtime worker when one blocks (for the NBD connection), else
//!   inside `block_in_place`.
//! - `backing` (private): opening the file or block device, its size and
//!   direct-I/O alignment, and the blocking discard/zeroing primitives
//!   (fallocate, BLKZEROOUT) both real engines share.
//! - [`open`] picks and builds an engine from [`EngineOptions`];
//!   [`create_data_file`] makes the sparse data file for `mdctrl init`.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

mod backing;
pub(crate) use backing::check_range;
pub mod behind;
pub mod buf;
pub mod fault;
mod inline;
pub mod portable;
pub mod stall;
pub mod uring;
pub mod watched;

pub use behind::{lone_request, LoneRequest, WRITE_BEHIND_MAX};
pub use fault::{FaultAction, FaultCounters, FaultOp, FaultRule, FaultTrigger, FaultyEngine};
pub use portable::PortableEngine;
pub use stall::{IoGuard, IoWatch, Stall, Stalls, Timed};
pub use uring::{plug, Plug, UringEngine};
pub use watched::{DiskErrorHook, DiskErrorReport, Repeated, Watched};

/// Whether an engine error is a failure of the disk (the data partition),
/// as opposed to one that describes the request (`EINVAL`, `EOPNOTSUPP`),
/// says the engine could not perform it at all (`ECANCELED`: its ring or I/O
/// threads are gone), or carries no errno (a failed task, not a syscall). A
/// node records the former as `DISK_ERROR`.
pub fn is_disk_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(n) if !matches!(n, libc::EINVAL | libc::EOPNOTSUPP | libc::ECANCELED)
    )
}

/// Buffered (non-direct) writes without FUA up to this size, on a memory file
/// system (tmpfs, ramfs: `backing::sync_is_noop`), are a plain `pwrite` in the
/// calling task instead of an SQE (a job of the pool). There a write is only a
/// copy into memory, with no device to wait for and no dirty throttling: doing
/// it in the calling task saves the two thread hops of io-wq (the pool) and
/// their wake-ups, and the data, just received, is still in this CPU's cache
/// (the standby of bench/mirror.sh keeps its data on tmpfs; bench/HISTORY.md,
/// "Mirrored modes"). It costs the copy, about 0.1 ms per MiB.
pub const INLINE_WRITE_MAX_MEMFS: usize = 1 << 20;
/// The same for a file backed by a device: writes up to this size are a
/// `pwrite` in the calling task too ([`in_task`]). There a buffered write can
/// block for as long as the device stalls (dirty throttling behind a slow
/// disk, a stalled device behind FUSE or NFS), and a runtime worker blocked in
/// it must not stall the whole runtime (the admin socket and the peer links
/// going deaf: `status_answers_while_the_data_disk_stalls_*` in
/// tests/tests/admin.rs): the `inline` module's watchdog, or
/// `block_in_place`, see to that. Only on a multi-thread runtime (elsewhere
/// such writes go to io-wq or the pool). Measured in bench/HISTORY.md
/// ("Inline buffered writes on a disk", "Plain inline writes with a
/// watchdog"): io-wq doubled the QD1 latency of these writes, and
/// `block_in_place` on each halved the rate at queue depth 32.
pub const INLINE_WRITE_MAX_DISK: usize = 64 * 1024;
/// The largest write without FUA that an engine does in the calling task on a buffered
/// file: [`INLINE_WRITE_MAX_MEMFS`] where `fdatasync` is a no-op (`sync_noop`: a memory
/// file system), else [`INLINE_WRITE_MAX_DISK`] on a multi-thread runtime, else none.
/// Both engines follow this policy and write through [`in_task`].
pub(crate) fn inline_write_max(sync_noop: bool) -> usize {
    if sync_noop {
        INLINE_WRITE_MAX_MEMFS
    } else if on_multi_thread_runtime() {
        INLINE_WRITE_MAX_DISK
    } else {
        0
    }
}

fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Runs an inline write `f` in the calling task: as it is where `sync_noop` (a
/// memory copy), else so that a stalled device cannot hold the runtime: plainly
/// with a watchdog where the caller allows it, else inside `block_in_place`
/// (the `inline` module). Only for a write [`inline_write_max`]
/// admitted: off a memory file system it admits none outside a multi-thread
/// runtime, where `block_in_place` would panic.
pub(crate) fn in_task<T>(sync_noop: bool, f: impl FnOnce() -> T) -> T {
    if sync_noop {
        f()
    } else {
        inline::write(f)
    }
}

pub(crate) use inline::allow_plain;

/// One run of [`BlockEngine::extents`]: `len` bytes that are all allocated
/// on the backing store, or all a hole (not allocated; reads as zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in this run (never zero).
    pub len: u64,
    /// Not allocated on the backing store: reads as zeroes.
    pub hole: bool,
}

/// Most runs one [`BlockEngine::extents`] call reports: it bounds the work
/// and the reply of one NBD block status request (the client asks again from
/// where the answer stopped).
pub const MAX_EXTENTS: usize = 1024;

/// Appends `len` bytes of `hole` (or data) to `runs`, merging with the last
/// run when it has the same kind. False, with nothing appended, when that
/// would take a run beyond [`MAX_EXTENTS`]: the answer ends there.
pub(crate) fn push_run(runs: &mut Vec<Extent>, len: u64, hole: bool) -> bool {
    let full = runs.len() == MAX_EXTENTS;
    match runs.last_mut() {
        Some(last) if last.hole == hole => last.len += len,
        _ if full => return false,
        _ => runs.push(Extent { len, hole }),
    }
    true
}

/// A boxed, sendable future returned by engine operations.
pub type EngineFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'static>>;

/// A block device or file that serves positioned reads and writes.
///
/// Implementations must be safe to call concurrently from many tasks; there is
/// no ordering between requests in flight at the same time (as in NBD), but a
/// request issued after another one *completed* observes its effects.
pub trait BlockEngine: Send + Sync + 'static {
    /// Size of the volume in bytes.
    fn size(&self) -> u64;

    /// Short engine name for status and logs (`"io_uring"`, `"portable"`, ...).
    fn name(&self) -> &'static str;

    /// Read exactly `len` bytes at `offset`. Reading past the end is an error
    /// (`EINVAL`); callers bound requests first.
    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>>;

    /// [`BlockEngine::read`] returning `Bytes`, for callers that only pass
    /// the data on (the NBD server): engines may return a pooled, aligned
    /// buffer without a copy ([`buf::IoBuf`]). The default wraps `read`'s
    /// `Vec` (no copy either).
    fn read_bytes(&self, offset: u64, len: usize) -> EngineFuture<Bytes> {
        let f = self.read(offset, len);
        Box::pin(async move { f.await.map(Bytes::from) })
    }

    /// Write `data` at `offset`. With `fua`, the data is on stable storage
    /// when the future resolves (RWF_DSYNC / O_DSYNC / write + fdatasync).
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()>;

    /// Make every write that completed before this call durable (fdatasync).
    fn flush(&self) -> EngineFuture<()>;

    /// Discard (trim) a range: afterwards it reads as zeroes (punch hole on
    /// files, BLKDISCARD + zeroing guarantee on devices, else explicit zeroes).
    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()>;

    /// Write zeroes to a range. With `may_trim`, the engine may deallocate
    /// (punch a hole); without it (NBD `NO_HOLE`), the range stays allocated.
    /// With `fua`, the result is durable when the future resolves.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()>;

    /// Allocation of the range `[offset, offset + len)` (inside the volume;
    /// callers check): consecutive runs from `offset`, at most
    /// [`MAX_EXTENTS`] of them, covering at least one byte and at most `len`
    /// (less when the runs ran out). Serves NBD's `base:allocation`. A
    /// snapshot: writes completed before the call are reflected, concurrent
    /// ones may or may not be. The default reports the whole range as
    /// allocated, which is always true enough (a hole that is reported as
    /// data costs a client only the zeroes it copies).
    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<Extent>> {
        let _ = offset;
        let runs = if len == 0 {
            Vec::new()
        } else {
            vec![Extent { len, hole: false }]
        };
        Box::pin(async move { Ok(runs) })
    }

    /// Whether this engine's inline writes ([`inline_write_max`]: buffered,
    /// on a device-backed file) may block the calling worker plainly, without
    /// `block_in_place` (the engine module's `inline` part), where the caller
    /// allows it. Only for an engine that wakes no other task before such a
    /// write: a task woken just before waits in the blocked worker's LIFO
    /// slot, out of the other workers' reach, as long as the write blocks.
    /// The NBD connection allows it for the engines that say so, asking
    /// before each polling pass (`Watched` says no after a disk error). Wrappers
    /// that add no such wake report their inner engine's answer; the default
    /// is `false` (a replicated volume wakes its peer link first).
    fn plain_inline_writes(&self) -> bool {
        false
    }

    /// One-line description for status output, e.g.
    /// `"io_uring, O_DIRECT (align 512)"`. Defaults to [`BlockEngine::name`].
    fn describe(&self) -> String {
        self.name().to_string()
    }
}

/// Which engine [`open`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring if the kernel allows creating a ring, else portable.
    #[default]
    Auto,
    /// io_uring or fail.
    #[serde(rename = "io_uring", alias = "io-uring", alias = "iouring")]
    IoUring,
    /// Thread-pool `pread`/`pwrite`.
    Portable,
}

/// Whether to bypass the page cache (O_DIRECT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectIo {
    /// O_DIRECT when the backing accepts it, else buffered (logged).
    #[default]
    Auto,
    /// O_DIRECT or fail to open (io_uring engine only).
    On,
    /// Always buffered.
    Off,
}

/// Options for [`open`] (the `[engine]`-style config section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineOptions {
    /// Engine choice.
    pub kind: EngineKind,
    /// O_DIRECT policy.
    pub direct_io: DirectIo,
    /// Maximum requests in flight in the engine; more wait (backpressure).
    pub queue_depth: u32,
    /// With O_DIRECT: lone small writes go through the page cache with
    /// `RWF_DONTCACHE` ([`behind`]). Default on.
    pub write_behind: bool,
}

/// Default [`EngineOptions::queue_depth`].
pub const DEFAULT_QUEUE_DEPTH: u32 = 128;

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            kind: EngineKind::Auto,
            direct_io: DirectIo::Auto,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            write_behind: true,
        }
    }
}

/// Open `path` (regular file or block device, read-write) with the engine
/// `opts` selects. With [`EngineKind::Auto`], io_uring is used when a probe
/// ring can be created; EPERM/ENOSYS (seccomp, `io_uring_disabled`, old
/// kernel) and other setup errors fall back to the portable engine. The choice
/// and its reason are logged with `tracing::info!`.
pub fn open(path: &Path, opts: &EngineOptions) -> io::Result<Arc<dyn BlockEngine>> {
    let depth = opts.queue_depth.max(1);
    let use_uring = match opts.kind {
        EngineKind::IoUring => true,
        EngineKind::Portable => false,
        EngineKind::Auto => match uring::probe() {
            Ok(()) => {
                tracing::info!(path = %path.display(), "engine: io_uring (probe ring created)");
                true
            }
            Err(e) => {
                tracing::info!(path = %path.display(), error = %e, "engine: portable (io_uring unavailable)");
                false
            }
        },
    };
    if use_uring {
        let eng = UringEngine::open_with(path, opts.direct_io, depth, opts.write_behind)?;
        tracing::info!(path = %path.display(), engine = %eng.describe(), "engine opened");
        Ok(Arc::new(eng))
    } else {
        if opts.direct_io == DirectIo::On {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "direct_io = \"on\" needs the io_uring engine; the portable engine is buffered",
            ));
        }
        let eng = PortableEngine::open(path, depth)?;
        tracing::info!(path = %path.display(), engine = %eng.describe(), "engine opened");
        Ok(Arc::new(eng))
    }
}

/// Create a sparse data file of `size` bytes at `path` if it does not exist.
///
/// An existing file smaller than `size` is grown (sparsely); one larger than
/// `size` is refused (`ErrorKind::InvalidInput`, message with both sizes)
/// rather than shrunk, which would destroy data. A block device is accepted
/// if it is at least `size` bytes.
pub fn create_data_file(path: &Path, size: u64) -> io::Result<()> {
    backing::create_data_file(path, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_run_merges_alike_runs_and_stops_at_the_bound() {
        let mut runs = Vec::new();
        assert!(push_run(&mut runs, 4096, false));
        assert!(push_run(&mut runs, 512, false));
        assert_eq!(
            runs,
            vec![Extent {
                len: 4608,
                hole: false
            }]
        );
        for i in 1..MAX_EXTENTS {
            assert!(push_run(&mut runs, 1, i % 2 == 1));
        }
        assert_eq!(runs.len(), MAX_EXTENTS);
        let last = *runs.last().unwrap();
        assert!(push_run(&mut runs, 7, last.hole), "merging stays possible");
        assert!(!push_run(&mut runs, 1, !last.hole), "a new run is refused");
        assert_eq!(runs.len(), MAX_EXTENTS);
        assert_eq!(runs.last().unwrap().len, last.len + 7);
    }
}
