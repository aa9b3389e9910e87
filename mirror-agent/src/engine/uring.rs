//! io_uring engine.
//!
//! # Architecture
//!
//! There is no ring thread on the request path. The ring, the in-flight slots
//! and the free list live behind one mutex (`Core`):
//!
//! - **Submission** happens in the calling task: it takes a slot permit (a
//!   semaphore of `queue_depth` permits, so callers wait when the engine is
//!   saturated: backpressure, never an error), pushes its SQE, calls
//!   `io_uring_enter` and reaps whatever completed meanwhile. Page-cache reads
//!   complete inside that `io_uring_enter`, so they finish without any
//!   wake-up or thread hop.
//! - **Completion** of everything else is reaped by a *reaper* task on the
//!   tokio runtime: an eventfd registered with the ring
//!   (`IORING_REGISTER_EVENTFD`) is watched with `AsyncFd`, so a CQE posted by
//!   the kernel wakes the runtime's own I/O driver. The reaper is spawned on
//!   the first request, on the runtime of the caller; if that runtime goes
//!   away (or has no I/O driver, or there is no runtime) a blocking reaper
//!   thread that `poll`s the eventfd takes over.
//!
//! Whoever reaps a CQE finishes its slot: resubmits the rest of a short
//! transfer, or sends the result through the request's oneshot and frees the
//! slot (returning the permit).
//!
//! This removes, per request, the channel hop to a ring thread, the doorbell
//! `write`, that thread's wake-up and the cross-thread completion wake-up
//! (bench/HISTORY.md: measured 3.6 context switches per QD1 write on the ring
//! thread alone).
//!
//! # `user_data` key space
//!
//! - `0 .. queue_depth`: index of the in-flight slot (slab) holding the
//!   request, its buffer and its reply channel.
//! - Nothing else is submitted (the doorbell read of the former ring thread is
//!   gone; the eventfd is signalled by the kernel itself).
//!
//! # Buffer lifetime
//!
//! Each slot owns its buffer (`Vec<u8>` spare capacity or a pooled
//! [`IoBuf`] for reads, `Bytes` for writes) until the CQE of its last SQE has
//! been reaped. If the caller drops its future, the reply send fails and the
//! buffer is freed by whoever reaps the completion, never before. When the
//! engine is dropped the reaper keeps reaping until nothing is in flight, and
//! dropping `Core` (the last owner of the ring and the slab) first waits in
//! `io_uring_enter` for every outstanding CQE.
//!
//! # Short transfers and large requests
//!
//! A read or write completing short is resubmitted for the remainder from the
//! same slot. A single SQE moves at most [`MAX_SQE_BYTES`] (the kernel caps
//! one transfer below 2 GiB anyway); larger requests are continued the same
//! way. A read returning 0 before the end (file shrank) fails with `EIO`.
//!
//! # Read buffers
//!
//! [`BlockEngine::read`] reads into the spare capacity of a
//! `Vec::with_capacity` (no zero-fill) and sets its length only once the
//! kernel has reported every byte written; on error the `Vec` is dropped with
//! length 0, so uninitialised bytes are never exposed.
//! [`BlockEngine::read_bytes`] reads into a pooled, page-aligned [`IoBuf`]
//! and returns it as `Bytes` (no copy; the buffer returns to the pool when
//! the NBD reply has been written).
//!
//! # O_DIRECT and unaligned requests
//!
//! O_DIRECT is used when the backing accepts it ([`DirectIo`]); the offset and
//! length alignment and the memory alignment come from `statx(STATX_DIOALIGN)`
//! (else the logical block size or `st_blksize`). A file whose size is not a
//! multiple of the alignment is opened buffered (a read-modify-write of its
//! last block would grow it).
//!
//! With O_DIRECT, everything goes through the one direct fd, except the lone
//! small writes that go behind through a second, buffered fd (`behind`
//! module: `RWF_DONTCACHE`, when the caller says the request is alone and the
//! engine has nothing in flight). The kernel keeps the two fds coherent only
//! while they do not run at once on one page, so such a write holds the
//! read-modify-write lock below exclusively (see there). On the direct fd:
//! - reads go to an aligned pooled buffer covering the enclosing aligned span;
//!   unaligned ones return the part asked for;
//! - unaligned writes do read-modify-write of the enclosing aligned span under
//!   the exclusive side of a `RwLock` that every other modifying request
//!   (aligned writes, discard, write-zeroes) takes shared. Two requests that
//!   touch different bytes of one block therefore never lose each other's
//!   bytes. Unaligned writes are rare (a client with smaller sectors than the
//!   backing), so serialising them is cheap in practice;
//! - write buffers whose memory is not aligned are copied once into an
//!   aligned buffer; aligned `Bytes` (NBD payloads are pooled [`IoBuf`]s) are
//!   submitted without a copy.
//!
//! A future dropped before completion leaves the outcome of its request
//! unspecified (the SQE may still run), as for any cancelled block request.
//!
//! # Metadata operations
//!
//! Discard and write-zeroes run `fallocate`/`BLKZEROOUT` on tokio's blocking
//! pool (see `backing::zero_range_blocking`), falling back to writing zero
//! buffers through the ring where the backing does not support them.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, OwnedSemaphorePermit, RwLock, Semaphore};

use super::backing::{self, errno, Kind};
use super::behind::{self, Outcome, WriteBehind, WRITE_BEHIND_MAX};
use super::buf::IoBuf;
use super::{BlockEngine, DirectIo, EngineFuture};

/// Largest transfer put in one SQE; longer requests continue from the slot.
pub const MAX_SQE_BYTES: usize = 1 << 30;
/// O_DIRECT reads of at least this size are submitted at once even under a
/// [`Plug`]: in a batch, adjacent large reads (a sequential reader's queue)
/// are merged by the block layer into requests of several MiB, which the
/// bench's virtio disk served ~7% slower than the same bytes as separate
/// 1 MiB requests in parallel (bench/HISTORY.md, "Direct seq read round"); at
/// this size one `io_uring_enter` per read costs little against the transfer.
pub const UNPLUGGED_READ_MIN: usize = 512 * 1024;
/// Largest queue depth accepted (larger values are clamped).
pub const MAX_QUEUE_DEPTH: u32 = 4096;
/// Chunk used when zeroes must be written as data.
const ZERO_CHUNK: usize = 1 << 20;

/// Check that this process may create an io_uring (not blocked by seccomp,
/// `kernel.io_uring_disabled` or an old kernel).
pub fn probe() -> io::Result<()> {
    IoUring::new(2).map(|_| ())
}

/// Where a read lands.
enum ReadBuf {
    /// The spare capacity of an empty `Vec` (capacity >= the read length);
    /// its length is set when the read has completed.
    Vec(Vec<u8>),
    /// A pooled buffer of at least the read length (initialised memory).
    Io(IoBuf),
}

/// A low-level ring operation. Buffers are owned here until completion.
enum Op {
    /// Read `len` bytes at `offset` into the start of `buf`.
    Read {
        offset: u64,
        buf: ReadBuf,
        len: usize,
    },
    /// Write all of `buf` at `offset` with `rw_flags` (RWF_DSYNC for FUA).
    Write { offset: u64, buf: Bytes, flags: i32 },
    /// fdatasync.
    Fsync,
}

enum Reply {
    Read(ReadBuf),
    Done,
}

type ReplyTx = oneshot::Sender<io::Result<Reply>>;

struct Slot {
    op: Op,
    done: usize,
    reply: ReplyTx,
    /// Queue-depth permit, returned when the slot is freed.
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn total(&self) -> usize {
        match &self.op {
            Op::Read { len, .. } => *len,
            Op::Write { buf, .. } => buf.len(),
            Op::Fsync => 0,
        }
    }

    /// The SQE for the remaining part of this slot's operation.
    fn sqe(&mut self, fd: RawFd, key: u64) -> squeue::Entry {
        let done = self.done;
        let fd = types::Fd(fd);
        match &mut self.op {
            Op::Read { offset, buf, len } => {
                let n = (*len - done).min(MAX_SQE_BYTES) as u32;
                // `done < len <= capacity`: the slice index cannot fail; the
                // kernel writes at most `n` bytes from there, within `len`.
                let ptr = match buf {
                    ReadBuf::Vec(v) => v.spare_capacity_mut()[done..*len].as_mut_ptr().cast::<u8>(),
                    ReadBuf::Io(b) => b[done..*len].as_mut_ptr(),
                };
                opcode::Read::new(fd, ptr, n)
                    .offset(*offset + done as u64)
                    .build()
                    .user_data(key)
            }
            Op::Write { offset, buf, flags } => {
                let n = (buf.len() - done).min(MAX_SQE_BYTES) as u32;
                let ptr = buf[done..].as_ptr();
                opcode::Write::new(fd, ptr, n)
                    .offset(*offset + done as u64)
                    .rw_flags(*flags)
                    .build()
                    .user_data(key)
            }
            Op::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(key),
        }
    }
}

/// Results to send once the ring lock is released.
type Deliveries = Vec<(ReplyTx, io::Result<Reply>)>;

/// The ring and its in-flight slots (behind [`Core::state`]).
struct State {
    ring: IoUring,
    fd: RawFd,
    slab: Vec<Option<Slot>>,
    free: Vec<usize>,
    pushed: bool,
    /// Scratch for reaped CQEs (kept to avoid an allocation per reap).
    cq: Vec<(u64, i32)>,
}

impl State {
    fn in_flight(&self) -> usize {
        self.slab.len() - self.free.len()
    }

    fn push(&mut self, e: &squeue::Entry) {
        // SAFETY: every buffer an SQE points to is owned by a slab slot and
        // stays alive and unmoved until its CQE is reaped (slots are only
        // freed in `finish`, after their last CQE; `Core`'s Drop waits for all
        // CQEs); the SQ has at least queue_depth + 1 entries and each of the
        // at most queue_depth slots has at most one SQE outstanding, so the
        // push cannot overflow.
        let r = unsafe { self.ring.submission().push(e) };
        if r.is_err() {
            // Unreachable by the sizing above; submit to make room and retry.
            let _ = self.ring.submit();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(e) }.expect("io_uring SQ full after submit");
        }
        self.pushed = true;
    }

    fn start(&mut self, op: Op, reply: ReplyTx, permit: OwnedSemaphorePermit) {
        // A permit is held per occupied slot, so a slot is free.
        let idx = self.free.pop().expect("slot permit without a free slot");
        let mut slot = Slot {
            op,
            done: 0,
            reply,
            _permit: permit,
        };
        let e = slot.sqe(self.fd, idx as u64);
        self.slab[idx] = Some(slot);
        self.push(&e);
    }

    fn finish(&mut self, idx: usize, res: io::Result<()>, out: &mut Deliveries) {
        let slot = self.slab[idx].take().expect("completion for a live slot");
        self.free.push(idx);
        if let Err(e) = &res {
            // Context for the log; the error itself stays a plain errno.
            let (op, offset) = match &slot.op {
                Op::Read { offset, .. } => ("read", *offset),
                Op::Write { offset, .. } => ("write", *offset),
                Op::Fsync => ("fsync", 0),
            };
            tracing::debug!(op, offset, len = slot.total(), done = slot.done, error = %e, "io_uring request failed");
        }
        let reply = match res {
            Err(e) => Err(e),
            Ok(()) => Ok(match slot.op {
                Op::Read {
                    buf: ReadBuf::Vec(mut v),
                    len,
                    ..
                } => {
                    debug_assert!(len <= v.capacity());
                    // SAFETY: the kernel reported `len` bytes written in total
                    // to `[0, len)` of the spare capacity (each SQE covered
                    // `[done, done + n)` and `done` only grew by what it
                    // reported), so the first `len` bytes are initialised, and
                    // `len <= capacity`.
                    unsafe { v.set_len(len) };
                    Reply::Read(ReadBuf::Vec(v))
                }
                Op::Read { buf, .. } => Reply::Read(buf),
                _ => Reply::Done,
            }),
        };
        // The permit goes with `slot._permit` when the reply is delivered.
        out.push((slot.reply, reply));
    }

    fn complete(&mut self, key: u64, res: i32, out: &mut Deliveries) {
        let idx = key as usize;
        if res < 0 {
            let e = -res;
            if e == libc::EINTR || e == libc::EAGAIN {
                let fd = self.fd;
                let slot = self.slab[idx].as_mut().expect("live slot");
                let sqe = slot.sqe(fd, key);
                self.push(&sqe);
            } else {
                self.finish(idx, Err(errno(e)), out);
            }
            return;
        }
        let fd = self.fd;
        let slot = self.slab[idx].as_mut().expect("live slot");
        if matches!(slot.op, Op::Fsync) {
            self.finish(idx, Ok(()), out);
            return;
        }
        if res == 0 {
            // No progress: EOF on read (file shrank) or a device refusing to
            // take more; never report a short transfer as success.
            tracing::warn!(
                op = if matches!(slot.op, Op::Read { .. }) {
                    "read"
                } else {
                    "write"
                },
                done = slot.done,
                total = slot.total(),
                "io_uring: transfer made no progress"
            );
            self.finish(idx, Err(errno(libc::EIO)), out);
            return;
        }
        slot.done += res as usize;
        if slot.done < slot.total() {
            let sqe = slot.sqe(fd, key);
            self.push(&sqe);
        } else {
            self.finish(idx, Ok(()), out);
        }
    }

    /// `io_uring_enter` for what was pushed. `false` if the kernel refused
    /// for now (the SQEs stay queued for the next attempt).
    fn submit(&mut self) -> bool {
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.pushed = false;
                    return true;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // EAGAIN/EBUSY: transient (resources, CQ backlog); others
                    // are logged. Either way the SQEs stay in the SQ and the
                    // caller arranges a retry.
                    if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) {
                        tracing::error!(error = %e, "io_uring_enter failed; will retry");
                    }
                    return false;
                }
            }
        }
    }

    /// Submits what was pushed and reaps every available completion (which
    /// may push continuations), until nothing is left to do without waiting.
    /// `false` if a submission must be retried later.
    fn pump(&mut self, out: &mut Deliveries) -> bool {
        loop {
            if self.pushed && !self.submit() {
                return false;
            }
            let mut cq = std::mem::take(&mut self.cq);
            cq.clear();
            cq.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let any = !cq.is_empty();
            for &(key, res) in &cq {
                self.complete(key, res, out);
            }
            self.cq = cq;
            if !any && !self.pushed {
                return true;
            }
        }
    }
}

thread_local! {
    /// Rings with SQEs pushed but not yet submitted while a [`Plug`] is held
    /// on this thread; `None` when no plug is held.
    static PLUGGED: RefCell<Option<Vec<Arc<Core>>>> = const { RefCell::new(None) };
}

/// Batches io_uring submissions: while a `Plug` is alive, requests started
/// on this thread only push their SQEs; dropping the plug submits them with
/// one `io_uring_enter` per ring (and reaps what completed). A caller that
/// polls many request futures in one go (the NBD connection task) thereby
/// hands the kernel one batch: the block layer plugs and kicks the device
/// once per batch instead of once per request (with O_DIRECT on a virtio
/// disk each kick is a VM exit; bench/HISTORY.md).
///
/// Only for a synchronous section: create it and drop it within one poll,
/// never hold it across an `.await` (the SQEs would wait for the drop). Nested
/// plugs are no-ops; without a plug, requests submit at once as before.
#[must_use]
#[derive(Debug)]
pub struct Plug {
    outer: bool,
    /// Thread-bound (the list is thread-local).
    _not_send: std::marker::PhantomData<*const ()>,
}

/// Starts a [`Plug`] on this thread.
pub fn plug() -> Plug {
    let outer = PLUGGED.with(|p| {
        let mut p = p.borrow_mut();
        if p.is_some() {
            false
        } else {
            *p = Some(Vec::new());
            true
        }
    });
    Plug {
        outer,
        _not_send: std::marker::PhantomData,
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let cores = PLUGGED.with(|p| p.borrow_mut().take()).unwrap_or_default();
        for core in cores {
            core.pump();
        }
    }
}

/// Records `core` for the current plug; `false` if no plug is held.
fn defer_to_plug(core: &Arc<Core>) -> bool {
    PLUGGED.with(|p| match p.borrow_mut().as_mut() {
        Some(list) => {
            if !list.iter().any(|c| Arc::ptr_eq(c, core)) {
                list.push(Arc::clone(core));
            }
            true
        }
        None => false,
    })
}

/// Shared by the engine, its callers and the reaper.
struct Core {
    state: Mutex<State>,
    /// Eventfd registered with the ring (non-blocking).
    bell: OwnedFd,
    /// Keeps the data fd open while SQEs may reference it.
    _file: Arc<File>,
    /// One permit per slot.
    slots: Arc<Semaphore>,
    /// A reaper (task or thread) is running or being started.
    reaper_alive: AtomicBool,
    /// The engine was dropped: the reaper exits once nothing is in flight.
    closing: AtomicBool,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent enough
        // to keep reaping (slots are plain data); do not cascade panics.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Submits and reaps under the lock, then delivers the results.
    fn pump(&self) {
        let mut out = Deliveries::new();
        let ok = self.lock().pump(&mut out);
        for (tx, r) in out {
            // The caller may have gone away; the buffer is dropped then.
            let _ = tx.send(r);
        }
        if !ok {
            // Have the reaper retry the submission soon.
            ring_bell(self.bell.as_raw_fd());
        }
    }

    /// Clears the eventfd counter (non-blocking).
    fn drain_bell(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our eventfd.
        let _ = unsafe { libc::read(self.bell.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    fn finished(&self) -> bool {
        self.closing.load(Ordering::SeqCst) && self.lock().in_flight() == 0
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // Last owner: no caller and no reaper is left. Wait for every CQE so
        // no buffer is freed while the kernel may still use it.
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut out = Deliveries::new();
        while st.in_flight() > 0 {
            st.pump(&mut out);
            out.clear();
            if st.in_flight() > 0 {
                if let Err(e) = st.ring.submit_and_wait(1) {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        tracing::error!(error = %e, "io_uring: waiting for in-flight requests at close");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        }
    }
}

fn ring_bell(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    let r = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    if r < 0 {
        // Only possible if the counter would overflow, i.e. it is already
        // non-zero and the reader will wake anyway.
        tracing::debug!(error = %io::Error::last_os_error(), "eventfd write failed");
    }
}

/// Clears `reaper_alive` when the reaper ends (or its task is dropped
/// unpolled), so the next request starts a new one.
struct AliveGuard(Arc<Core>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.reaper_alive.store(false, Ordering::SeqCst);
    }
}

/// The eventfd as seen by `AsyncFd` (the `Arc` keeps the fd open).
struct BellFd(Arc<Core>);

impl AsRawFd for BellFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.bell.as_raw_fd()
    }
}

/// Reaper on the tokio runtime; see the module docs.
async fn reaper_task(guard: AliveGuard) {
    let core = guard.0.clone();
    // Registration panics (rather than failing) on a runtime without an I/O
    // driver; every runtime of ours enables it, but never leave requests
    // without a reaper: fall back to the thread.
    let registered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `BellFd::as_raw_fd` always returns the eventfd owned by the
        // `Core` that `BellFd` keeps alive, so the fd stays open and the same
        // for the whole life of the `AsyncFd`.
        unsafe { AsyncFd::register_with_interest(BellFd(core.clone()), Interest::READABLE) }
    }));
    let afd = match registered {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "io_uring: cannot watch the completion eventfd on this runtime; reaping on a thread");
            start_reaper_thread(guard);
            return;
        }
        Err(_) => {
            tracing::debug!("io_uring: runtime without an I/O driver; reaping on a thread");
            start_reaper_thread(guard);
            return;
        }
    };
    loop {
        match afd.readable().await {
            Ok(mut g) => {
                // Clear the counter, then the readiness seen so far; a CQE
                // posted after the read signals again (new readiness).
                core.drain_bell();
                g.clear_ready();
            }
            Err(e) => {
                tracing::warn!(error = %e, "io_uring: completion eventfd failed; reaping on a thread");
                drop(afd);
                start_reaper_thread(guard);
                return;
            }
        }
        core.pump();
        if core.finished() {
            return;
        }
    }
}

fn start_reaper_thread(guard: AliveGuard) {
    let spawned = std::thread::Builder::new()
        .name("io_uring-reap".into())
        .spawn(move || {
            let core = guard.0.clone();
            loop {
                let mut pfd = libc::pollfd {
                    fd: core.bell.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let _ = unsafe { libc::poll(&mut pfd, 1, -1) };
                core.drain_bell();
                core.pump();
                if core.finished() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        // The guard was dropped with the closure: the next request retries.
        tracing::error!(error = %e, "io_uring: cannot start the completion thread");
    }
}

impl Core {
    /// Makes sure a reaper runs (spawned on the caller's runtime if any).
    fn ensure_reaper(self: &Arc<Self>) {
        if self.reaper_alive.load(Ordering::Acquire) {
            return;
        }
        if self
            .reaper_alive
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let guard = AliveGuard(self.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(reaper_task(guard));
            }
            Err(_) => start_reaper_thread(guard),
        }
        // Completions that arrived while no reaper ran are picked up by the
        // new one: the eventfd is already readable when it registers.
    }
}

struct Shared {
    file: Arc<File>,
    kind: Kind,
    size: u64,
    direct: bool,
    /// Offset/length alignment; 1 when buffered.
    align: usize,
    /// Memory alignment; 1 when buffered.
    mem_align: usize,
    description: String,
    /// `fdatasync` is a no-op on this backing (tmpfs/ramfs,
    /// [`backing::sync_is_noop`]): flushes and FUA complete without an
    /// io_uring request (an fsync SQE is always punted to an io-wq worker).
    sync_noop: bool,
    /// Shared by modifying requests, exclusive for read-modify-write and for
    /// a write going behind (direct mode only).
    rmw: RwLock<()>,
    /// Write-behind of lone small writes (direct mode, when configured).
    behind: Option<WriteBehind>,
    /// Slot permits in all (`queue_depth`): all free = nothing in flight.
    depth: usize,
    core: Arc<Core>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // No caller is left; let the reaper finish what is in flight and exit.
        self.core.closing.store(true, Ordering::SeqCst);
        ring_bell(self.core.bell.as_raw_fd());
    }
}

fn ring_gone() -> io::Error {
    tracing::error!("io_uring engine is closed");
    backing::not_performed()
}

fn join_err(e: tokio::task::JoinError) -> io::Error {
    tracing::error!(error = %e, "blocking engine task failed");
    backing::not_performed()
}

impl Shared {
    async fn call(&self, op: Op) -> io::Result<Reply> {
        let core = &self.core;
        core.ensure_reaper();
        let permit = core
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ring_gone())?;
        let (reply, rx) = oneshot::channel();
        let mut out = Deliveries::new();
        let unplugged =
            self.direct && matches!(op, Op::Read { len, .. } if len >= UNPLUGGED_READ_MIN);
        let ok = {
            let mut st = core.lock();
            st.start(op, reply, permit);
            // Under a `Plug` the SQE waits for the plug's single submission
            // (large direct reads excepted: see UNPLUGGED_READ_MIN).
            (!unplugged && defer_to_plug(core)) || st.pump(&mut out)
        };
        for (tx, r) in out {
            let _ = tx.send(r);
        }
        if !ok {
            ring_bell(core.bell.as_raw_fd());
        }
        rx.await.map_err(|_| ring_gone())?
    }

    /// Reads the aligned span around `[offset, offset + len)` into a pooled
    /// buffer; returns it and where the asked-for bytes start in it.
    async fn read_span(&self, offset: u64, len: usize) -> io::Result<(IoBuf, usize)> {
        let a = self.align as u64;
        let lo = offset / a * a;
        let hi = (offset + len as u64).div_ceil(a) * a;
        let span = (hi - lo) as usize;
        let buf = IoBuf::with_align(span, self.mem_align);
        match self
            .call(Op::Read {
                offset: lo,
                buf: ReadBuf::Io(buf),
                len: span,
            })
            .await?
        {
            Reply::Read(ReadBuf::Io(buf)) => Ok((buf, (offset - lo) as usize)),
            _ => unreachable!("read completes with its buffer"),
        }
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        backing::check_range(self.size, offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.direct {
            let (buf, head) = self.read_span(offset, len).await?;
            return Ok(buf[head..head + len].to_vec());
        }
        let buf = ReadBuf::Vec(Vec::with_capacity(len));
        match self.call(Op::Read { offset, buf, len }).await? {
            Reply::Read(ReadBuf::Vec(v)) => Ok(v),
            _ => unreachable!("read completes with its buffer"),
        }
    }

    async fn read_bytes(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        backing::check_range(self.size, offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let (buf, head) = self.read_span(offset, len).await?;
        if head == 0 && buf.len() == len {
            return Ok(buf.into_bytes());
        }
        Ok(buf.into_bytes().slice(head..head + len))
    }

    /// Write with the alignment rules; caller has checked the range.
    async fn write_unchecked(&self, offset: u64, data: Bytes, flags: i32) -> io::Result<()> {
        if !self.direct {
            if flags == 0 && data.len() <= super::inline_write_max(self.sync_noop) {
                // See super::inline_write_max: a page-cache copy, done here.
                return super::in_task(self.sync_noop, || self.file.write_all_at(&data, offset))
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::WriteZero {
                            tracing::warn!(
                                offset,
                                len = data.len(),
                                "io_uring engine: inline write made no progress"
                            );
                            errno(libc::EIO)
                        } else {
                            e
                        }
                    });
            }
            self.call(Op::Write {
                offset,
                buf: data,
                flags,
            })
            .await?;
            return Ok(());
        }
        if flags == 0 {
            if let Some(wb) = self.behind_now(data.len()) {
                // Exclusive: no O_DIRECT write may run while a page is
                // being dirtied (see the `behind` module, "Coherence").
                let _excl = self.rmw.write().await;
                match super::in_task(false, || wb.write_at(&data, offset))? {
                    Outcome::Done => return Ok(()),
                    Outcome::Unsupported => {} // now off; O_DIRECT below
                }
            }
        }
        let a = self.align as u64;
        let len = data.len() as u64;
        if offset.is_multiple_of(a) && len.is_multiple_of(a) {
            let _shared = self.rmw.read().await;
            let buf = if (data.as_ptr() as usize).is_multiple_of(self.mem_align) {
                data
            } else {
                let mut ab = IoBuf::with_align(data.len(), self.mem_align);
                ab.copy_from_slice(&data);
                ab.into_bytes()
            };
            self.call(Op::Write { offset, buf, flags }).await?;
            return Ok(());
        }
        // Read-modify-write of the enclosing aligned span, exclusive against
        // every other modifying request.
        let _excl = self.rmw.write().await;
        let (mut span, head) = self.read_span(offset, data.len()).await?;
        span[head..head + data.len()].copy_from_slice(&data);
        let lo = offset - head as u64;
        self.call(Op::Write {
            offset: lo,
            buf: span.into_bytes(),
            flags,
        })
        .await?;
        Ok(())
    }

    /// The write-behind path, if a write of `len` bytes without FUA may take
    /// it now: configured and supported, small, alone on its connection
    /// (`behind::is_lone`), nothing in flight in the engine, and on a
    /// multi-thread runtime (the inline-write path needs one).
    fn behind_now(&self, len: usize) -> Option<&WriteBehind> {
        self.behind.as_ref().filter(|wb| {
            len <= WRITE_BEHIND_MAX
                && wb.is_on()
                && behind::is_lone()
                && self.core.slots.available_permits() == self.depth
                && super::inline_write_max(false) >= len
        })
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        backing::check_range(self.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return if fua { self.flush().await } else { Ok(()) };
        }
        let flags = if fua && !self.sync_noop {
            libc::RWF_DSYNC
        } else {
            0
        };
        self.write_unchecked(offset, data, flags).await
    }

    async fn flush(&self) -> io::Result<()> {
        if self.sync_noop {
            return Ok(());
        }
        self.call(Op::Fsync).await.map(|_| ())
    }

    async fn zero(self: Arc<Self>, offset: u64, len: u64, trim: bool, fua: bool) -> io::Result<()> {
        backing::check_range(self.size, offset, len)?;
        if len > 0 {
            let rest = {
                let _shared = if self.direct {
                    Some(self.rmw.read().await)
                } else {
                    None
                };
                let me = self.clone();
                tokio::task::spawn_blocking(move || {
                    backing::zero_range_blocking(&me.file, me.kind, offset, len, trim)
                })
                .await
                .map_err(join_err)??
            };
            if !rest.is_empty() {
                let mut z = IoBuf::with_align(ZERO_CHUNK, self.mem_align);
                z.fill(0);
                let zeroes = z.into_bytes();
                for (mut off, len) in rest {
                    let end = off + len;
                    while off < end {
                        let n = (end - off).min(ZERO_CHUNK as u64) as usize;
                        self.write_unchecked(off, zeroes.slice(..n), 0).await?;
                        off += n as u64;
                    }
                }
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }
}

/// io_uring block engine; see the module docs.
pub struct UringEngine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("size", &self.shared.size)
            .field("mode", &self.shared.description)
            .finish()
    }
}

/// Try O_DIRECT: `Ok(Ok((backing, align, mem_align)))`, `Ok(Err(reason))` if
/// the backing cannot usefully do it, `Err` for other open errors.
fn try_direct(path: &Path) -> io::Result<Result<(backing::Backing, usize, usize), String>> {
    let b = match backing::open(path, true) {
        Ok(b) => b,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Ok(Err(format!("O_DIRECT refused at open: {e}")))
        }
        Err(e) => return Err(e),
    };
    if b.kind == Kind::File && backing::on_tmpfs(&b.file) {
        return Ok(Err(
            "tmpfs has no direct I/O (the page cache is always used)".into(),
        ));
    }
    let Some((align, mem_align)) = backing::dio_alignment(&b.file, b.kind) else {
        return Ok(Err("statx reports no direct I/O support".into()));
    };
    if !b.size.is_multiple_of(align as u64) {
        return Ok(Err(format!(
            "size {} is not a multiple of the direct I/O alignment {align}",
            b.size
        )));
    }
    // Some filesystems accept the flag at open and refuse at I/O time.
    if b.size >= align as u64 {
        let mut probe = IoBuf::with_align(align, mem_align.max(align));
        if let Err(e) = b.file.read_at(&mut probe, 0) {
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(Err(format!("O_DIRECT read probe failed: {e}")));
            }
            return Err(e);
        }
    }
    Ok(Ok((b, align, mem_align)))
}

impl UringEngine {
    /// Open `path` (file or block device) read-write with `queue_depth`
    /// requests in flight at most (clamped to 1..=[`MAX_QUEUE_DEPTH`]).
    ///
    /// `DirectIo::Auto` uses O_DIRECT when the backing accepts it and logs why
    /// not otherwise; `On` fails with `EINVAL` instead; `Off` is buffered.
    pub fn open(path: &Path, direct_io: DirectIo, queue_depth: u32) -> io::Result<UringEngine> {
        Self::open_with(path, direct_io, queue_depth, true)
    }

    /// [`UringEngine::open`], with write-behind of lone small writes
    /// (`behind` module) on or off; it applies only with O_DIRECT.
    pub fn open_with(
        path: &Path,
        direct_io: DirectIo,
        queue_depth: u32,
        write_behind: bool,
    ) -> io::Result<UringEngine> {
        let (b, direct, align, mem_align, why) = match direct_io {
            DirectIo::Off => (
                backing::open(path, false)?,
                false,
                1,
                1,
                "direct_io = off".to_string(),
            ),
            DirectIo::On | DirectIo::Auto => match try_direct(path)? {
                Ok((b, a, m)) => (b, true, a, m, String::new()),
                Err(reason) => {
                    if direct_io == DirectIo::On {
                        tracing::error!(path = %path.display(), %reason, "direct_io = on but O_DIRECT unusable");
                        return Err(errno(libc::EINVAL));
                    }
                    tracing::info!(path = %path.display(), %reason, "io_uring engine: falling back to buffered I/O");
                    (backing::open(path, false)?, false, 1, 1, reason)
                }
            },
        };
        let description = if direct {
            format!("io_uring, O_DIRECT (offset align {align}, memory align {mem_align})")
        } else {
            format!("io_uring, buffered ({why})")
        };
        let depth = queue_depth.clamp(1, MAX_QUEUE_DEPTH) as usize;
        let ring = IoUring::builder().build(((depth + 1) as u32).next_power_of_two())?;
        // SAFETY: plain syscall; the returned fd is checked before use.
        let bell = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if bell < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `bell` is a freshly created fd that nothing else owns.
        let bell = unsafe { OwnedFd::from_raw_fd(bell) };
        ring.submitter().register_eventfd(bell.as_raw_fd())?;
        let sync_noop = backing::sync_is_noop(&b.file, b.kind);
        let description = if sync_noop {
            format!("{description}; flush is a no-op (memory file system)")
        } else {
            description
        };
        let behind = if direct && write_behind {
            Some(WriteBehind::new(backing::open(path, false)?.file))
        } else {
            None
        };
        let file = Arc::new(b.file);
        let state = State {
            ring,
            fd: file.as_raw_fd(),
            slab: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            pushed: false,
            cq: Vec::with_capacity(depth),
        };
        let core = Arc::new(Core {
            state: Mutex::new(state),
            bell,
            _file: file.clone(),
            slots: Arc::new(Semaphore::new(depth)),
            reaper_alive: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        });
        let shared = Shared {
            file,
            kind: b.kind,
            size: b.size,
            direct,
            align,
            mem_align,
            description,
            sync_noop,
            rmw: RwLock::new(()),
            behind,
            depth,
            core,
        };
        Ok(UringEngine {
            shared: Arc::new(shared),
        })
    }

    /// Whether O_DIRECT is in use.
    pub fn direct(&self) -> bool {
        self.shared.direct
    }

    /// Offset/length alignment of direct I/O (1 when buffered).
    pub fn alignment(&self) -> usize {
        self.shared.align
    }

    /// Whether lone small writes go behind (`behind` module): configured,
    /// O_DIRECT, and not found unsupported.
    pub fn write_behind(&self) -> bool {
        self.shared.behind.as_ref().is_some_and(WriteBehind::is_on)
    }

    /// Writes that went behind so far.
    pub fn behind_writes(&self) -> u64 {
        self.shared.behind.as_ref().map_or(0, WriteBehind::writes)
    }

    /// Tests: the `pwritev2` flags of write-behind instead of
    /// `RWF_DONTCACHE` (a flag the kernel does not know simulates a kernel
    /// or file system without it).
    #[doc(hidden)]
    pub fn set_write_behind_flags(&self, flags: i32) {
        if let Some(wb) = &self.shared.behind {
            wb.set_flags(flags);
        }
    }
}

impl BlockEngine for UringEngine {
    fn size(&self) -> u64 {
        self.shared.size
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn describe(&self) -> String {
        match &self.shared.behind {
            None => self.shared.description.clone(),
            Some(wb) if wb.is_on() => format!(
                "{}; lone writes up to {} KiB behind (RWF_DONTCACHE)",
                self.shared.description,
                WRITE_BEHIND_MAX / 1024
            ),
            Some(_) => format!(
                "{}; no write-behind (RWF_DONTCACHE not supported here)",
                self.shared.description
            ),
        }
    }

    fn plain_inline_writes(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        let s = self.shared.clone();
        Box::pin(async move { s.read(offset, len).await })
    }

    fn read_bytes(&self, offset: u64, len: usize) -> EngineFuture<Bytes> {
        let s = self.shared.clone();
        Box::pin(async move { s.read_bytes(offset, len).await })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        let s = self.shared.clone();
        Box::pin(async move { s.write(offset, data, fua).await })
    }

    fn flush(&self) -> EngineFuture<()> {
        let s = self.shared.clone();
        Box::pin(async move { s.flush().await })
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        let s = self.shared.clone();
        Box::pin(s.zero(offset, len, true, false))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        let s = self.shared.clone();
        Box::pin(s.zero(offset, len, may_trim, fua))
    }

    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<super::Extent>> {
        let s = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                backing::extents_blocking(&s.file, s.kind, s.size, offset, len)
            })
            .await
            .map_err(join_err)?
        })
    }
}
