//! Portable engine: positioned `pread`/`pwrite` on tokio's blocking pool.
//!
//! Buffered I/O only (no O_DIRECT). Each request runs as one blocking task;
//! a semaphore of `queue_depth` permits bounds how many run at once, so
//! callers beyond that wait (backpressure) instead of piling up threads.
//! `read_exact_at`/`write_all_at` resubmit short transfers; a read hitting
//! end of file (the file shrank) fails with `EIO`. FUA is `pwrite` followed
//! by `fdatasync`. Discard and write-zeroes use the same fallocate/BLKZEROOUT
//! primitives as the io_uring engine, writing zero buffers where those are
//! unsupported.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::backing::{self, errno, Kind};
use super::{BlockEngine, EngineFuture};

const ZERO_CHUNK: usize = 1 << 20;

struct Shared {
    file: File,
    kind: Kind,
    size: u64,
    permits: Semaphore,
}

/// Thread-pool block engine; see the module docs.
pub struct PortableEngine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PortableEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortableEngine").field("size", &self.shared.size).finish()
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
            shared: Arc::new(Shared { file: b.file, kind: b.kind, size: b.size, permits: Semaphore::new(depth) }),
        })
    }

    /// Run `f` on the blocking pool under a queue-depth permit.
    fn run<T, F>(&self, f: F) -> EngineFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> io::Result<T> + Send + 'static,
    {
        let s = self.shared.clone();
        Box::pin(async move {
            let _permit = s.permits.acquire().await.map_err(|_| errno(libc::EIO))?;
            let s2 = s.clone();
            tokio::task::spawn_blocking(move || f(&s2)).await.map_err(|e| {
                tracing::error!(error = %e, "portable engine task failed");
                errno(libc::EIO)
            })?
        })
    }
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

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        self.run(move |s| {
            backing::check_range(s.size, offset, len as u64)?;
            let mut buf = vec![0u8; len];
            s.file.read_exact_at(&mut buf, offset).map_err(map_eof)?;
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
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
        self.run(|s| s.file.sync_data())
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        self.run(move |s| zero(s, offset, len, true, false))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        self.run(move |s| zero(s, offset, len, may_trim, fua))
    }
}
