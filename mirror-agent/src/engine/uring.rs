//! io_uring engine.
//!
//! # Architecture
//!
//! One dedicated thread owns the ring. Requests reach it through a bounded
//! tokio mpsc channel (capacity = queue depth) and complete through oneshot
//! channels. The thread pulls requests only while fewer than `queue_depth`
//! are in flight, so the total outstanding work is bounded and callers wait
//! (`send().await`) when the engine is saturated: backpressure, never an error.
//!
//! The thread blocks in `io_uring_enter(min_complete = 1)`. To be woken when a
//! request arrives while it sleeps, it keeps a read of an eventfd (the
//! "doorbell") in flight in the ring. A submitter rings the doorbell only if
//! the thread announced it is going to sleep (`sleeping` flag, Dekker-style
//! with SeqCst fences on both sides), so a busy engine takes no extra syscall
//! per request, and all requests pulled in one pass are submitted with a
//! single `io_uring_enter`.
//!
//! # `user_data` key space
//!
//! - `0 .. queue_depth`: index of the in-flight slot (slab) holding the
//!   request, its buffer and its reply channel.
//! - `u64::MAX` (`DOORBELL`): the eventfd read.
//!
//! # Buffer lifetime
//!
//! Each slot owns its buffer (`Vec<u8>` for reads, `Bytes` or an aligned copy
//! for writes) until the CQE of its last SQE has been reaped. If the caller
//! drops its future, the reply send fails and the buffer is freed by the ring
//! thread after the completion, never before. At shutdown the thread drains
//! every in-flight entry, including the doorbell read (it rings its own bell),
//! before the ring and buffers are dropped.
//!
//! # Short transfers and large requests
//!
//! A read or write completing short is resubmitted for the remainder from the
//! same slot. A single SQE moves at most [`MAX_SQE_BYTES`] (the kernel caps
//! one transfer below 2 GiB anyway); larger requests are continued the same
//! way. A read returning 0 before the end (file shrank) fails with `EIO`.
//!
//! # O_DIRECT and unaligned requests
//!
//! O_DIRECT is used when the backing accepts it ([`DirectIo`]); the offset and
//! length alignment and the memory alignment come from `statx(STATX_DIOALIGN)`
//! (else the logical block size or `st_blksize`). A file whose size is not a
//! multiple of the alignment is opened buffered (a read-modify-write of its
//! last block would grow it).
//!
//! With O_DIRECT, everything goes through the one direct fd (no second,
//! buffered fd, so there is no page-cache coherence question):
//! - unaligned reads read the enclosing aligned span and copy out the part
//!   asked for;
//! - unaligned writes do read-modify-write of the enclosing aligned span under
//!   the exclusive side of a `RwLock` that every other modifying request
//!   (aligned writes, discard, write-zeroes) takes shared. Two requests that
//!   touch different bytes of one block therefore never lose each other's
//!   bytes. Unaligned writes are rare (a client with smaller sectors than the
//!   backing), so serialising them is cheap in practice;
//! - write buffers whose memory is not aligned are copied once into an
//!   aligned buffer; aligned `Bytes` are submitted without a copy.
//!
//! A future dropped before completion leaves the outcome of its request
//! unspecified (the SQE may still run), as for any cancelled block request.
//!
//! # Metadata operations
//!
//! Discard and write-zeroes run `fallocate`/`BLKZEROOUT` on tokio's blocking
//! pool (see `backing::zero_range_blocking`), falling back to writing zero
//! buffers through the ring where the backing does not support them.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, RwLock};

use super::backing::{self, errno, Kind};
use super::{BlockEngine, DirectIo, EngineFuture};

/// `user_data` of the doorbell (eventfd) read.
const DOORBELL: u64 = u64::MAX;
/// Largest transfer put in one SQE; longer requests continue from the slot.
pub const MAX_SQE_BYTES: usize = 1 << 30;
/// Largest queue depth accepted (larger values are clamped).
pub const MAX_QUEUE_DEPTH: u32 = 4096;
/// Chunk used when zeroes must be written as data.
const ZERO_CHUNK: usize = 1 << 20;

/// Check that this process may create an io_uring (not blocked by seccomp,
/// `kernel.io_uring_disabled` or an old kernel).
pub fn probe() -> io::Result<()> {
    IoUring::new(2).map(|_| ())
}

/// Heap buffer with a chosen alignment (O_DIRECT needs aligned memory; a
/// `Vec<u8>` must be freed with alignment 1, so it cannot be over-aligned).
struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Vec<u8>); no shared
// interior state.
unsafe impl Send for AlignedBuf {}
// SAFETY: only `&[u8]` access through `&self`; no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn zeroed(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).expect("aligned buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes, uniquely
        // borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A low-level ring operation. Buffers are owned here until completion.
enum Op {
    /// Read `len` bytes at `offset` into `buf[start..start + len]`.
    Read { offset: u64, buf: Vec<u8>, start: usize, len: usize },
    /// Write all of `buf` at `offset` with `rw_flags` (RWF_DSYNC for FUA).
    Write { offset: u64, buf: Bytes, flags: i32 },
    /// fdatasync.
    Fsync,
}

enum Reply {
    Read(Vec<u8>),
    Done,
}

struct Request {
    op: Op,
    reply: oneshot::Sender<io::Result<Reply>>,
}

struct Slot {
    req: Request,
    done: usize,
}

impl Slot {
    fn total(&self) -> usize {
        match &self.req.op {
            Op::Read { len, .. } => *len,
            Op::Write { buf, .. } => buf.len(),
            Op::Fsync => 0,
        }
    }

    /// The SQE for the remaining part of this slot's operation.
    fn sqe(&mut self, fd: RawFd, key: u64) -> squeue::Entry {
        let done = self.done;
        let fd = types::Fd(fd);
        match &mut self.req.op {
            Op::Read { offset, buf, start, len } => {
                let n = (*len - done).min(MAX_SQE_BYTES) as u32;
                debug_assert!(*start + *len <= buf.len());
                // `start + done < buf.len()`: checked by the debug_assert
                // above and `done < len` (slot not finished).
                let ptr = buf[*start + done..].as_mut_ptr();
                opcode::Read::new(fd, ptr, n).offset(*offset + done as u64).build().user_data(key)
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
            Op::Fsync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(key),
        }
    }
}

/// The ring thread's state.
struct RingThread {
    ring: IoUring,
    fd: RawFd,
    bell_fd: RawFd,
    bell_buf: Box<u64>,
    bell_armed: bool,
    slab: Vec<Option<Slot>>,
    free: Vec<usize>,
    pushed: bool,
}

impl RingThread {
    fn push(&mut self, e: &squeue::Entry) {
        // SAFETY: every buffer an SQE points to is owned by a slab slot (or is
        // `bell_buf`) and stays alive and unmoved until its CQE is reaped; the
        // SQ has at least queue_depth + 1 entries and at most that many SQEs
        // are ever outstanding, so the push cannot overflow.
        let r = unsafe { self.ring.submission().push(e) };
        if r.is_err() {
            // Unreachable by the sizing above; submit to make room and retry.
            let _ = self.ring.submit();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(e) }.expect("io_uring SQ full after submit");
        }
        self.pushed = true;
    }

    fn arm_bell(&mut self) {
        let ptr = &mut *self.bell_buf as *mut u64 as *mut u8;
        let e = opcode::Read::new(types::Fd(self.bell_fd), ptr, 8).build().user_data(DOORBELL);
        self.push(&e);
        self.bell_armed = true;
    }

    fn start(&mut self, req: Request) {
        let idx = self.free.pop().expect("start() called with a free slot");
        let mut slot = Slot { req, done: 0 };
        let e = slot.sqe(self.fd, idx as u64);
        self.slab[idx] = Some(slot);
        self.push(&e);
    }

    fn finish(&mut self, idx: usize, res: io::Result<()>) {
        let slot = self.slab[idx].take().expect("completion for a live slot");
        self.free.push(idx);
        if let Err(e) = &res {
            // Context for the log; the error itself stays a plain errno.
            let (op, offset) = match &slot.req.op {
                Op::Read { offset, .. } => ("read", *offset),
                Op::Write { offset, .. } => ("write", *offset),
                Op::Fsync => ("fsync", 0),
            };
            tracing::debug!(op, offset, len = slot.total(), done = slot.done, error = %e, "io_uring request failed");
        }
        let reply = match res {
            Err(e) => Err(e),
            Ok(()) => Ok(match slot.req.op {
                Op::Read { buf, .. } => Reply::Read(buf),
                _ => Reply::Done,
            }),
        };
        // The caller may have gone away; then the buffer is simply dropped.
        let _ = slot.req.reply.send(reply);
    }

    fn complete(&mut self, key: u64, res: i32, closed: bool) {
        if key == DOORBELL {
            self.bell_armed = false;
            if !closed {
                self.arm_bell();
            }
            return;
        }
        let idx = key as usize;
        if res < 0 {
            let e = -res;
            if e == libc::EINTR || e == libc::EAGAIN {
                let slot = self.slab[idx].as_mut().expect("live slot");
                let sqe = slot.sqe(self.fd, key);
                self.push(&sqe);
            } else {
                self.finish(idx, Err(errno(e)));
            }
            return;
        }
        let slot = self.slab[idx].as_mut().expect("live slot");
        if matches!(slot.req.op, Op::Fsync) {
            self.finish(idx, Ok(()));
            return;
        }
        if res == 0 {
            // No progress: EOF on read (file shrank) or a device refusing to
            // take more; never report a short transfer as success.
            tracing::warn!(op = if matches!(slot.req.op, Op::Read { .. }) { "read" } else { "write" },
                done = slot.done, total = slot.total(), "io_uring: transfer made no progress");
            self.finish(idx, Err(errno(libc::EIO)));
            return;
        }
        slot.done += res as usize;
        if slot.done < slot.total() {
            let sqe = slot.sqe(self.fd, key);
            self.push(&sqe);
        } else {
            self.finish(idx, Ok(()));
        }
    }

    fn submit(&mut self, wait: bool) {
        let r = if wait { self.ring.submit_and_wait(1) } else { self.ring.submit() };
        self.pushed = false;
        if let Err(e) = r {
            match e.raw_os_error() {
                // Transient: unsubmitted SQEs stay in the SQ and go with the
                // next io_uring_enter; EBUSY means reap completions first.
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
                _ => {
                    tracing::error!(error = %e, "io_uring_enter failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Request>, sleeping: Arc<AtomicBool>) {
        let depth = self.slab.len();
        let mut closed = false;
        let mut cq: Vec<(u64, i32)> = Vec::with_capacity(depth * 2);
        self.arm_bell();
        loop {
            // Intake, bounded by free slots.
            while !closed && !self.free.is_empty() {
                match rx.try_recv() {
                    Ok(req) => self.start(req),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => closed = true,
                }
            }
            cq.clear();
            cq.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let reaped = !cq.is_empty();
            for &(key, res) in &cq {
                self.complete(key, res, closed);
            }
            if closed && self.free.len() == depth {
                break;
            }
            if self.pushed {
                self.submit(false);
                continue;
            }
            if reaped {
                continue;
            }
            // Idle: announce sleep, then look once more (pairs with the
            // submitter's fence + swap in `Shared::call`).
            if !closed && !self.free.is_empty() {
                sleeping.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match rx.try_recv() {
                    Ok(req) => {
                        sleeping.store(false, Ordering::SeqCst);
                        self.start(req);
                        continue;
                    }
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => {
                        sleeping.store(false, Ordering::SeqCst);
                        closed = true;
                        continue;
                    }
                }
            }
            self.submit(true);
            sleeping.store(false, Ordering::SeqCst);
        }
        // Retire the doorbell read before its buffer and the ring go away.
        while self.bell_armed {
            ring_bell(self.bell_fd);
            self.submit(true);
            cq.clear();
            cq.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(key, res) in &cq {
                self.complete(key, res, true);
            }
        }
    }
}

fn ring_bell(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    let r = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    if r < 0 {
        // Only possible if the counter would overflow, i.e. it is already
        // non-zero and the reader will wake anyway.
        tracing::debug!(error = %io::Error::last_os_error(), "doorbell write failed");
    }
}

struct RingHandle {
    tx: Option<mpsc::Sender<Request>>,
    bell: OwnedFd,
    sleeping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RingHandle {
    fn drop(&mut self) {
        // Close the channel, wake the thread so it notices, wait for it to
        // drain what is in flight (at most queue_depth requests).
        self.tx.take();
        ring_bell(self.bell.as_raw_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
    /// Shared by modifying requests, exclusive for read-modify-write (direct
    /// mode only).
    rmw: RwLock<()>,
    ring: RingHandle,
}

fn ring_gone() -> io::Error {
    tracing::error!("io_uring thread is gone");
    errno(libc::EIO)
}

fn join_err(e: tokio::task::JoinError) -> io::Error {
    tracing::error!(error = %e, "blocking engine task failed");
    errno(libc::EIO)
}

impl Shared {
    async fn call(&self, op: Op) -> io::Result<Reply> {
        let (reply, rx) = oneshot::channel();
        let tx = self.ring.tx.as_ref().ok_or_else(ring_gone)?;
        tx.send(Request { op, reply }).await.map_err(|_| ring_gone())?;
        fence(Ordering::SeqCst);
        if self.ring.sleeping.swap(false, Ordering::SeqCst) {
            ring_bell(self.ring.bell.as_raw_fd());
        }
        rx.await.map_err(|_| ring_gone())?
    }

    /// Raw read of `len` bytes at `offset` (aligned when direct).
    async fn read_raw(&self, offset: u64, len: usize, head: usize, want: usize) -> io::Result<Vec<u8>> {
        let slack = self.mem_align.saturating_sub(1);
        let buf = vec![0u8; len + slack];
        let start = buf.as_ptr().align_offset(self.mem_align);
        match self.call(Op::Read { offset, buf, start, len }).await? {
            Reply::Read(mut buf) => {
                let from = start + head;
                if from != 0 {
                    buf.copy_within(from..from + want, 0);
                }
                buf.truncate(want);
                Ok(buf)
            }
            Reply::Done => unreachable!("read completes with its buffer"),
        }
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        backing::check_range(self.size, offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let a = self.align as u64;
        let lo = offset / a * a;
        let hi = (offset + len as u64).div_ceil(a) * a;
        self.read_raw(lo, (hi - lo) as usize, (offset - lo) as usize, len).await
    }

    /// Write with the alignment rules; caller has checked the range.
    async fn write_unchecked(&self, offset: u64, data: Bytes, flags: i32) -> io::Result<()> {
        if !self.direct {
            self.call(Op::Write { offset, buf: data, flags }).await?;
            return Ok(());
        }
        let a = self.align as u64;
        let len = data.len() as u64;
        if offset.is_multiple_of(a) && len.is_multiple_of(a) {
            let _shared = self.rmw.read().await;
            let buf = if (data.as_ptr() as usize).is_multiple_of(self.mem_align) {
                data
            } else {
                let mut ab = AlignedBuf::zeroed(data.len(), self.mem_align);
                ab.as_mut_slice().copy_from_slice(&data);
                Bytes::from_owner(ab)
            };
            self.call(Op::Write { offset, buf, flags }).await?;
            return Ok(());
        }
        // Read-modify-write of the enclosing aligned span, exclusive against
        // every other modifying request.
        let lo = offset / a * a;
        let hi = (offset + len).div_ceil(a) * a;
        let span = (hi - lo) as usize;
        let _excl = self.rmw.write().await;
        let old = self.read_raw(lo, span, 0, span).await?;
        let mut ab = AlignedBuf::zeroed(span, self.mem_align);
        let s = ab.as_mut_slice();
        s.copy_from_slice(&old);
        let head = (offset - lo) as usize;
        s[head..head + data.len()].copy_from_slice(&data);
        self.call(Op::Write { offset: lo, buf: Bytes::from_owner(ab), flags }).await?;
        Ok(())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        backing::check_range(self.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return if fua { self.flush().await } else { Ok(()) };
        }
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        self.write_unchecked(offset, data, flags).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.call(Op::Fsync).await.map(|_| ())
    }

    async fn zero(self: Arc<Self>, offset: u64, len: u64, trim: bool, fua: bool) -> io::Result<()> {
        backing::check_range(self.size, offset, len)?;
        if len > 0 {
            let rest = {
                let _shared = if self.direct { Some(self.rmw.read().await) } else { None };
                let me = self.clone();
                tokio::task::spawn_blocking(move || backing::zero_range_blocking(&me.file, me.kind, offset, len, trim))
                    .await
                    .map_err(join_err)??
            };
            if !rest.is_empty() {
                let zeroes = Bytes::from_owner(AlignedBuf::zeroed(ZERO_CHUNK, self.mem_align));
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
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Err(format!("O_DIRECT refused at open: {e}"))),
        Err(e) => return Err(e),
    };
    if b.kind == Kind::File && backing::on_tmpfs(&b.file) {
        return Ok(Err("tmpfs has no direct I/O (the page cache is always used)".into()));
    }
    let Some((align, mem_align)) = backing::dio_alignment(&b.file, b.kind) else {
        return Ok(Err("statx reports no direct I/O support".into()));
    };
    if !b.size.is_multiple_of(align as u64) {
        return Ok(Err(format!("size {} is not a multiple of the direct I/O alignment {align}", b.size)));
    }
    // Some filesystems accept the flag at open and refuse at I/O time.
    if b.size >= align as u64 {
        let mut probe = AlignedBuf::zeroed(align, mem_align.max(align));
        if let Err(e) = b.file.read_at(probe.as_mut_slice(), 0) {
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
        let (b, direct, align, mem_align, why) = match direct_io {
            DirectIo::Off => (backing::open(path, false)?, false, 1, 1, "direct_io = off".to_string()),
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
        let bell = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if bell < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `bell` is a freshly created fd that nothing else owns.
        let bell = unsafe { OwnedFd::from_raw_fd(bell) };
        let file = Arc::new(b.file);
        let (tx, rx) = mpsc::channel(depth);
        let sleeping = Arc::new(AtomicBool::new(false));
        let rt = RingThread {
            ring,
            fd: file.as_raw_fd(),
            bell_fd: bell.as_raw_fd(),
            bell_buf: Box::new(0),
            bell_armed: false,
            slab: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            pushed: false,
        };
        let thread_file = file.clone();
        let thread_sleeping = sleeping.clone();
        let thread = std::thread::Builder::new().name("io_uring".into()).spawn(move || {
            // The thread keeps the data fd open while SQEs may reference it.
            let _keep = thread_file;
            rt.run(rx, thread_sleeping);
        })?;
        let shared = Shared {
            file,
            kind: b.kind,
            size: b.size,
            direct,
            align,
            mem_align,
            description,
            rmw: RwLock::new(()),
            ring: RingHandle { tx: Some(tx), bell, sleeping, thread: Some(thread) },
        };
        Ok(UringEngine { shared: Arc::new(shared) })
    }

    /// Whether O_DIRECT is in use.
    pub fn direct(&self) -> bool {
        self.shared.direct
    }

    /// Offset/length alignment of direct I/O (1 when buffered).
    pub fn alignment(&self) -> usize {
        self.shared.align
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
        self.shared.description.clone()
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        let s = self.shared.clone();
        Box::pin(async move { s.read(offset, len).await })
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
}
