//! Test support: [`MemEngine`], a complete in-memory [`BlockEngine`].
//!
//! It is a real engine (bytes are stored and read back, ranges are checked)
//! so NBD tests exercise the server without depending on files or io_uring.
//! It also records how many flushes it saw, so durability ordering can be
//! asserted.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::engine::{BlockEngine, EngineFuture};

/// An in-memory volume behind a lock.
#[derive(Debug)]
pub struct MemEngine {
    data: Mutex<Vec<u8>>,
    size: u64,
    flushes: AtomicU64,
}

impl MemEngine {
    /// A zero-filled volume of `size` bytes.
    pub fn new(size: usize) -> Arc<MemEngine> {
        Arc::new(MemEngine {
            data: Mutex::new(vec![0; size]),
            size: size as u64,
            flushes: AtomicU64::new(0),
        })
    }

    /// A copy of the whole volume.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Number of completed flushes (explicit, or FUA on a write).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the Vec inconsistent.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset as usize..end as usize),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn fill_zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.lock()[r].fill(0);
        if fua {
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl BlockEngine for MemEngine {
    fn size(&self) -> u64 {
        self.size
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        let r = self
            .range(offset, len as u64)
            .map(|r| self.lock()[r].to_vec());
        Box::pin(async move { r })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        let r = self.range(offset, data.len() as u64).map(|r| {
            self.lock()[r].copy_from_slice(&data);
            if fua {
                self.flushes.fetch_add(1, Ordering::SeqCst);
            }
        });
        Box::pin(async move { r })
    }

    fn flush(&self) -> EngineFuture<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        let r = self.fill_zero(offset, len, false);
        Box::pin(async move { r })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, fua: bool) -> EngineFuture<()> {
        let r = self.fill_zero(offset, len, fua);
        Box::pin(async move { r })
    }
}
