//! Write-behind of lone small writes on an O_DIRECT engine.
//!
//! With O_DIRECT a write completes when the device has it: at queue depth 1 a
//! 4 KiB write then costs the device's latency (bench/README.md: 50-60 µs on
//! the bench's virtio disk, against 25-35 µs for a page-cache copy). A client
//! that issues one small write at a time waits for all of it.
//!
//! Write-behind answers such a write from the page cache instead, the way
//! nbdkit's `cache=none` and the kernel's own `RWF_DONTCACHE` do: the write
//! goes through a second, buffered fd with `pwritev2(RWF_DONTCACHE)`, which
//! copies the data into the page cache, starts its writeback at once and
//! drops the pages when the writeback is done. The memory footprint stays
//! what O_DIRECT's is (nothing stays cached), only the wait for the device
//! moves off the request.
//!
//! Which writes: at most [`WRITE_BEHIND_MAX`] bytes, without FUA, issued
//! while the caller says the request is alone ([`lone_request`]: the NBD
//! connection, when it has no other request in flight) and while the engine
//! has nothing in flight. Everything else keeps O_DIRECT: at higher queue
//! depths the device's latency overlaps and O_DIRECT is cheaper per write
//! (one submission, no copy; measured: write-behind for every small write
//! cost a quarter of the 4 KiB QD32 rate, bench/HISTORY.md). FUA writes stay
//! O_DIRECT with `RWF_DSYNC`, so everything that must be durable when it is
//! answered (FUA, the standby's per-write acknowledgements) never passes here.
//!
//! What does not change:
//! - **Durability.** A write without FUA is durable after the next flush in
//!   both paths; `fdatasync` on the direct fd writes back the page cache of
//!   the same inode.
//! - **Coherence.** The kernel keeps buffered and O_DIRECT I/O on one file
//!   coherent as long as they do not run at the same time on one page: an
//!   O_DIRECT read or write of a range first writes back (and a write then
//!   invalidates) the page-cache pages of that range; `fallocate` and
//!   `BLKZEROOUT` write back and drop them. At the same time they are not:
//!   a buffered write of a few bytes of a page reads the whole page in, and
//!   if an O_DIRECT write of *other* sectors of that page (the direct I/O
//!   alignment is often 512 bytes, a page 4 KiB) lands meanwhile, the page
//!   written back later carries their old contents over the new ones; the
//!   kernel only warns ("Page cache invalidation failure on direct I/O").
//!   Two NBD writes to different bytes must both take effect, so a write
//!   going behind holds the engine's read-modify-write lock exclusively:
//!   no O_DIRECT write, write-zeroes or discard runs during the copy. Once
//!   the copy is done the page is dirty or under writeback, and a later
//!   O_DIRECT request of its range waits for that writeback first. Reads need
//!   no exclusion (an O_DIRECT read of other sectors of the page reads what
//!   the disk has, which is what they hold).
//!
//! What changes: a device error in the writeback of such a write is not
//! reported on the write (it was answered) but on the next flush, or on the
//! next O_DIRECT request of that range, as for any buffered write.
//!
//! Where the kernel or the file system does not know `RWF_DONTCACHE`
//! (`EOPNOTSUPP`: kernels before 6.14, file systems without it, block devices
//! on 6.18), write-behind is off from the open on (a one-byte `preadv2` with
//! the flag asks), and should a write still be refused, that write is done
//! with O_DIRECT and write-behind turns off; the engine's status line says
//! which.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

/// The largest write that may go behind. Small enough that the extra copy
/// costs nothing measurable; a larger write is rarely alone and latency
/// bound.
pub const WRITE_BEHIND_MAX: usize = 16 * 1024;

thread_local! {
    /// The request being polled on this thread is alone ([`lone_request`]).
    static LONE: Cell<bool> = const { Cell::new(false) };
}

/// Marks, until the guard is dropped, the requests polled on this thread as
/// alone on their connection (the previous setting is back on drop): their
/// small writes may go behind on an O_DIRECT engine.
pub fn lone_request() -> LoneRequest {
    LoneRequest(LONE.with(|l| l.replace(true)))
}

/// Guard of [`lone_request`]; holds the previous setting.
#[derive(Debug)]
pub struct LoneRequest(bool);

impl Drop for LoneRequest {
    fn drop(&mut self) {
        LONE.with(|l| l.set(self.0));
    }
}

pub(crate) fn is_lone() -> bool {
    LONE.with(Cell::get)
}

/// Whether `pwritev2` will take `RWF_DONTCACHE` on `file`, asked with a
/// one-byte `preadv2` with the flag (the kernel checks the flag the same way
/// for both; a read changes nothing). Kernels before 6.14 do not know it,
/// and file systems say whether they support it (on 6.18 ext4 does, block
/// devices do not).
fn dontcache_probe(file: &File) -> io::Result<()> {
    let mut b = [0u8; 1];
    let iov = libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: b.len(),
    };
    loop {
        // SAFETY: `iov` describes `b`, a live, writable one-byte buffer; the
        // fd is open for the duration of the call.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, 0, libc::RWF_DONTCACHE) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The buffered fd of an O_DIRECT engine and whether write-behind is on.
#[derive(Debug)]
pub(crate) struct WriteBehind {
    /// The same file or device, opened without O_DIRECT.
    file: File,
    on: AtomicBool,
    /// `RWF_DONTCACHE`; replaced by tests to simulate a kernel without it.
    flags: AtomicI32,
    /// Writes that went behind.
    writes: AtomicU64,
}

/// What [`WriteBehind::write_at`] did.
pub(crate) enum Outcome {
    /// Written into the page cache, writeback started.
    Done,
    /// Write-behind is not available here (now off); nothing was written.
    Unsupported,
}

impl WriteBehind {
    /// Write-behind through `file` (the backing opened buffered), on if the
    /// kernel and the file system take `RWF_DONTCACHE` ([`dontcache_probe`]).
    pub(crate) fn new(file: File) -> WriteBehind {
        let on = match dontcache_probe(&file) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(error = %e, "write-behind off: RWF_DONTCACHE not supported here (every write stays O_DIRECT)");
                false
            }
        };
        WriteBehind {
            file,
            on: AtomicBool::new(on),
            flags: AtomicI32::new(libc::RWF_DONTCACHE),
            writes: AtomicU64::new(0),
        }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub(crate) fn set_flags(&self, flags: i32) {
        self.flags.store(flags, Ordering::Relaxed);
    }

    /// Writes all of `data` at `offset` through the page cache. Blocking (a
    /// copy, and the start of the writeback): call it through the engine's
    /// inline-write path.
    pub(crate) fn write_at(&self, data: &[u8], offset: u64) -> io::Result<Outcome> {
        let flags = self.flags.load(Ordering::Relaxed);
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: `iov` describes `rest`, a live slice that outlives the
            // call; the kernel only reads from it. The fd is owned by `self`.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    flags,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Unknown flag (older kernel) or a file system without
                    // it; only possible before anything was written.
                    Some(libc::EOPNOTSUPP) if done == 0 => {
                        if self.on.swap(false, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "write-behind (RWF_DONTCACHE) not supported here: small writes stay O_DIRECT");
                        }
                        return Ok(Outcome::Unsupported);
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                tracing::warn!(
                    offset,
                    len = data.len(),
                    "write-behind: write made no progress"
                );
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            done += n as usize;
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(Outcome::Done)
    }
}
