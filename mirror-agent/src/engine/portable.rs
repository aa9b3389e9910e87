//! Portable engine: positioned `pread`/`pwrite` on a fixed set of I/O threads.
//!
//! Buffered I/O only (no O_DIRECT). Requests are queued to at most
//! [`IO_THREADS`] threads of the engine's own (started on demand, kept while
//! the engine lives), like nbdkit's worker threads: no `spawn_blocking` per
//! request, and the thread count (hence memory) stays fixed whatever the
//! queue depth. A semaphore of `queue_depth` permits bounds how many requests
//! are queued or running, so callers beyond that wait (backpressure).
//! Dropping the engine lets the threads finish what is queued and exit.
//! Writes without FUA up to 1 MiB on a memory file system, 64 KiB elsewhere (the
//! policy of both engines, `inline_write_max` in the engine module) are a `pwrite`
//! in the calling task instead: cheaper than two thread hops; on a disk so that
//! a stalled device never holds the runtime (the engine module's `inline`). They
//! are never queued, so they take no queue-depth permit.
//! [`BlockEngine::read_bytes`] likewise first copies what the page cache
//! holds with `preadv2(RWF_NOWAIT)` in the calling task (never blocks) and
//! sends only the rest to an I/O thread.
//! `read_exact_at`/`write_all_at` resubmit short transfers; a read hitting
//! end of file (the file shrank) fails with `EIO`. FUA is `pwrite` followed
//! by `fdatasync`. Discard and write-zeroes use the same fallocate/BLKZEROOUT
//! primitives as the io_uring engine, writing zero buffers where those are
//! unsupported.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use tokio::sync::{oneshot, Semaphore};

use super::buf::IoBuf;

use super::backing::{self, errno, Kind};
use super::{BlockEngine, EngineFuture};

const ZERO_CHUNK: usize = 1 << 20;
/// Most I/O threads per engine (fewer if the queue depth is smaller).
pub const IO_THREADS: usize = 8;

struct Shared {
    file: File,
    kind: Kind,
    size: u64,
    /// `fdatasync` is a no-op on this backing ([`backing::sync_is_noop`]):
    /// flushes complete without an I/O thread.
    sync_noop: bool,
    permits: Semaphore,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    threads: usize,
    closed: bool,
}

/// The engine's I/O threads and their job queue.
struct Workers {
    queue: Mutex<Queue>,
    wake: Condvar,
    max_threads: usize,
}

impl Workers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(self: &Arc<Self>, job: Job) {
        let mut q = self.lock();
        q.jobs.push_back(job);
        if q.idle > 0 {
            self.wake.notify_one();
            return;
        }
        if q.threads >= self.max_threads {
            return; // a busy thread picks it up next
        }
        q.threads += 1;
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("portable-io".into())
            .spawn(move || me.work());
        if let Err(e) = spawned {
            q.threads -= 1;
            tracing::error!(error = %e, "portable engine: cannot start an I/O thread");
            if q.threads == 0 {
                // Nobody would ever run the queue: drop the jobs, whose
                // callers then see ECANCELED (their reply channel closes).
                q.jobs.clear();
            }
        }
    }

    fn work(&self) {
        let mut q = self.lock();
        loop {
            if let Some(job) = q.jobs.pop_front() {
                drop(q);
                job();
                q = self.lock();
                continue;
            }
            if q.closed {
                q.threads -= 1;
                return;
            }
            q.idle += 1;
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            q.idle -= 1;
        }
    }
}

/// Thread-pool block engine; see the module docs.
pub struct PortableEngine {
    shared: Arc<Shared>,
    workers: Arc<Workers>,
}

impl Drop for PortableEngine {
    fn drop(&mut self) {
        // Threads finish the queued jobs, then exit; no join (never block a
        // runtime thread here).
        self.workers.lock().closed = true;
        self.workers.wake.notify_all();
    }
}

impl std::fmt::Debug for PortableEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortableEngine")
            .field("size", &self.shared.size)
            .finish()
    }
}

fn map_eof(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof || e.kind() == io::ErrorKind::WriteZero {
        tracing::warn!(error = %e, "portable engine: transfer made no progress");
        errno(libc::EIO)
    } else {
        e
    }
}

impl PortableEngine {
    /// Open `path` (file or block device) read-write, buffered, with at most
    /// `queue_depth` requests running at once (at least 1).
    pub fn open(path: &Path, queue_depth: u32) -> io::Result<PortableEngine> {
        let b = backing::open(path, false)?;
        let depth = queue_depth.max(1) as usize;
        Ok(PortableEngine {
            shared: Arc::new(Shared {
                sync_noop: backing::sync_is_noop(&b.file, b.kind),
                file: b.file,
                kind: b.kind,
                size: b.size,
                permits: Semaphore::new(depth),
            }),
            workers: Arc::new(Workers {
                queue: Mutex::new(Queue::default()),
                wake: Condvar::new(),
                max_threads: depth.min(IO_THREADS),
            }),
        })
    }

    /// Run `f` on an I/O thread under a queue-depth permit.
    fn run<T, F>(&self, f: F) -> EngineFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> io::Result<T> + Send + 'static,
    {
        let s = self.shared.clone();
        let workers = self.workers.clone();
        Box::pin(async move {
            let _permit = s
                .permits
                .acquire()
                .await
                .map_err(|_| backing::not_performed())?;
            let (tx, rx) = oneshot::channel();
            let s2 = s.clone();
            workers.submit(Box::new(move || {
                // The caller may have gone away; the result is dropped then.
                let _ = tx.send(f(&s2));
            }));
            rx.await.map_err(|_| {
                tracing::error!("portable engine: request dropped without a result");
                backing::not_performed()
            })?
        })
    }
}

/// `preadv2(RWF_NOWAIT)`: the bytes available from the page cache without
/// blocking, 0 on any error (`EAGAIN`, or `EOPNOTSUPP` where unsupported);
/// the caller reads the rest the blocking way.
fn read_nowait(file: &File, buf: &mut [u8], offset: u64) -> usize {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: one iovec over a live, writable, initialised slice that
        // outlives the call; the fd is open.
        let r = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if r <= 0 {
            break;
        }
        done += r as usize;
    }
    done
}

fn zero(s: &Shared, offset: u64, len: u64, trim: bool, fua: bool) -> io::Result<()> {
    backing::check_range(s.size, offset, len)?;
    for (mut off, len) in backing::zero_range_blocking(&s.file, s.kind, offset, len, trim)? {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let end = off + len;
        while off < end {
            let n = (end - off).min(ZERO_CHUNK as u64) as usize;
            s.file.write_all_at(&zeroes[..n], off).map_err(map_eof)?;
            off += n as u64;
        }
    }
    if fua {
        // fallocate changes extents (metadata): full fsync.
        s.file.sync_all()?;
    }
    Ok(())
}

impl BlockEngine for PortableEngine {
    fn size(&self) -> u64 {
        self.shared.size
    }

    fn name(&self) -> &'static str {
        "portable"
    }

    fn describe(&self) -> String {
        "portable (thread pool, buffered)".to_string()
    }

    fn plain_inline_writes(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        self.run(move |s| {
            backing::check_range(s.size, offset, len as u64)?;
            let mut buf = vec![0u8; len];
            s.file.read_exact_at(&mut buf, offset).map_err(map_eof)?;
            Ok(buf)
        })
    }

    fn read_bytes(&self, offset: u64, len: usize) -> EngineFuture<Bytes> {
        if let Err(e) = backing::check_range(self.shared.size, offset, len as u64) {
            return Box::pin(async move { Err(e) });
        }
        // Pooled buffer: no fresh allocation, zero-fill or page faults.
        let mut buf = IoBuf::new(len);
        // What the page cache holds is copied here, without blocking
        // (RWF_NOWAIT); only the rest (a cache miss needs the disk) goes to
        // an I/O thread.
        let got = read_nowait(&self.shared.file, &mut buf, offset);
        if got == len {
            return Box::pin(async move { Ok(buf.into_bytes()) });
        }
        self.run(move |s| {
            s.file
                .read_exact_at(&mut buf[got..], offset + got as u64)
                .map_err(map_eof)?;
            Ok(buf.into_bytes())
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        // FUA means nothing more where fdatasync is a no-op.
        let fua = fua && !self.shared.sync_noop;
        if !fua && data.len() <= super::inline_write_max(self.shared.sync_noop) {
            // A page-cache copy (or, on a memory file system, a memory copy):
            // done in the calling task, without the two thread hops of the
            // queue (see `inline_write_max`, the policy of both engines).
            // No queue-depth permit: nothing is queued, and the copy runs on
            // the caller's thread, so the callers' threads bound how many run
            // at once (as for the io_uring engine's inline writes). A permit
            // cost a semaphore acquire and a locked release per write.
            let s = self.shared.clone();
            return Box::pin(async move {
                backing::check_range(s.size, offset, data.len() as u64)?;
                super::in_task(s.sync_noop, || s.file.write_all_at(&data, offset)).map_err(map_eof)
            });
        }
        self.run(move |s| {
            backing::check_range(s.size, offset, data.len() as u64)?;
            s.file.write_all_at(&data, offset).map_err(map_eof)?;
            if fua {
                s.file.sync_data()?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> EngineFuture<()> {
        if self.shared.sync_noop {
            return Box::pin(async { Ok(()) });
        }
        self.run(|s| s.file.sync_data())
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        self.run(move |s| zero(s, offset, len, true, false))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        self.run(move |s| zero(s, offset, len, may_trim, fua))
    }

    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<super::Extent>> {
        self.run(move |s| backing::extents_blocking(&s.file, s.kind, s.size, offset, len))
    }
}
