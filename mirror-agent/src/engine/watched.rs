//! [`Watched`]: a [`BlockEngine`] that passes every request to its inner
//! engine and reports the first disk error ([`is_disk_error`]) to a hook: the
//! node then records `DISK_ERROR` in its cluster partition. Every disk error
//! is logged (the first ten, then one in a thousand: a dying disk can fail
//! every request). Requests and results are not changed.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::{is_disk_error, BlockEngine, EngineFuture, Extent};

/// What failed, for the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskErrorReport {
    /// `read`, `write`, `flush`, `discard` or `write_zeroes`.
    pub op: &'static str,
    /// Byte offset of the failed request (0 for a flush).
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// The error, with its errno.
    pub error: String,
}

/// Called once, with the first disk error.
pub type DiskErrorHook = Box<dyn Fn(DiskErrorReport) + Send + Sync>;

/// Counts a failure that can repeat on every request (a dying disk, a
/// poisoned cluster partition) and says which occurrences to log: the first
/// ten, then one in a thousand.
#[derive(Debug, Default)]
pub struct Repeated(AtomicU64);

impl Repeated {
    /// Counts one occurrence: its number (1 for the first) and whether to log it.
    pub fn count(&self) -> (u64, bool) {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        (n, n <= 10 || n.is_multiple_of(1000))
    }

    /// Occurrences so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct Shared {
    hook: DiskErrorHook,
    /// Disk errors seen so far.
    seen: Repeated,
    /// Who uses the engine, for the log lines ("active", "resync source", ...).
    user: &'static str,
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Watched {
    inner: Arc<dyn BlockEngine>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("user", &self.shared.user)
            .field("inner", &self.inner.describe())
            .finish_non_exhaustive()
    }
}

impl Watched {
    /// `inner`, reporting its first disk error to `hook`; `user` names the
    /// engine's user in the log.
    pub fn new(inner: Arc<dyn BlockEngine>, user: &'static str, hook: DiskErrorHook) -> Watched {
        Watched {
            inner,
            shared: Arc::new(Shared {
                hook,
                seen: Repeated::default(),
                user,
            }),
        }
    }

    /// Disk errors seen so far.
    pub fn disk_errors(&self) -> u64 {
        self.shared.seen.get()
    }

    fn watch<T: Send + 'static>(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        fut: EngineFuture<T>,
    ) -> EngineFuture<T> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let res = fut.await;
            if let Err(e) = &res {
                shared.failed(op, offset, len, e);
            }
            res
        })
    }
}

impl Shared {
    fn failed(&self, op: &'static str, offset: u64, len: u64, e: &io::Error) {
        if !is_disk_error(e) {
            return;
        }
        let (n, log) = self.seen.count();
        if log {
            tracing::error!(user = self.user, op, offset, len, error = %e, failed_so_far = n, "data disk error");
        }
        if n == 1 {
            (self.hook)(DiskErrorReport {
                op,
                offset,
                len,
                error: e.to_string(),
            });
        }
    }
}

impl BlockEngine for Watched {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    /// Not after a disk error: the hook wakes the node's handling of it, which
    /// must not wait behind a blocked write in the worker's LIFO slot (a
    /// failing disk is the one that also stalls; engine::inline).
    fn plain_inline_writes(&self) -> bool {
        self.shared.seen.get() == 0 && self.inner.plain_inline_writes()
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        self.watch("read", offset, len as u64, self.inner.read(offset, len))
    }

    fn read_bytes(&self, offset: u64, len: usize) -> EngineFuture<Bytes> {
        self.watch(
            "read",
            offset,
            len as u64,
            self.inner.read_bytes(offset, len),
        )
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        let len = data.len() as u64;
        self.watch("write", offset, len, self.inner.write(offset, data, fua))
    }

    fn flush(&self) -> EngineFuture<()> {
        self.watch("flush", 0, 0, self.inner.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        self.watch("discard", offset, len, self.inner.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        self.watch(
            "write_zeroes",
            offset,
            len,
            self.inner.write_zeroes(offset, len, may_trim, fua),
        )
    }

    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::engine::{FaultOp, FaultRule, FaultyEngine};
    use crate::nbd::testing::MemEngine;

    fn watched(rules: Vec<FaultRule>) -> (Watched, Arc<Mutex<Vec<DiskErrorReport>>>) {
        let faulty = FaultyEngine::new(MemEngine::new(1 << 20));
        for r in rules {
            faulty.add_rule(r);
        }
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let w = Watched::new(
            Arc::new(faulty),
            "test",
            Box::new(move |r| g.lock().unwrap().push(r)),
        );
        (w, got)
    }

    #[tokio::test]
    async fn first_disk_error_goes_to_the_hook_once_and_results_are_unchanged() {
        let (w, got) = watched(vec![
            FaultRule::fail_range(&[FaultOp::Write, FaultOp::Read], 8192, 4096, libc::EIO),
            FaultRule::fail_range(&[FaultOp::Write], 0, 4096, libc::EINVAL),
            FaultRule::fail_range(&[FaultOp::Write], 4096, 4096, libc::ECANCELED),
        ]);
        w.write(65536, Bytes::from(vec![7u8; 512]), false)
            .await
            .unwrap();
        assert_eq!(w.read(65536, 512).await.unwrap(), vec![7u8; 512]);
        // Not the disk's: no report.
        let e = w
            .write(0, Bytes::from(vec![1u8; 512]), false)
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let e = w
            .write(4096, Bytes::from(vec![1u8; 512]), false)
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECANCELED));
        assert!(got.lock().unwrap().is_empty());
        assert_eq!(w.disk_errors(), 0);
        // The disk's: reported once, with what failed; the caller still gets it.
        let e = w
            .write(8192, Bytes::from(vec![1u8; 1024]), true)
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let e = w.read_bytes(8192, 512).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].op, got[0].offset, got[0].len),
            ("write", 8192, 1024)
        );
        assert!(got[0].error.contains("os error 5"), "{}", got[0].error);
        assert_eq!(w.disk_errors(), 2);
    }

    /// An engine whose inline writes may block plainly stops saying so once
    /// its first disk error went to the hook (engine::inline).
    #[tokio::test]
    async fn no_plain_inline_writes_after_a_disk_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let faulty = FaultyEngine::new(Arc::new(
            crate::engine::PortableEngine::open(&path, 4).unwrap(),
        ));
        faulty.add_rule(FaultRule::fail_range(
            &[FaultOp::Write],
            8192,
            4096,
            libc::EIO,
        ));
        let w = Watched::new(Arc::new(faulty), "test", Box::new(|_| {}));
        assert!(w.plain_inline_writes());
        w.write(0, Bytes::from(vec![1u8; 512]), false)
            .await
            .unwrap();
        assert!(w.plain_inline_writes());
        w.write(8192, Bytes::from(vec![1u8; 512]), false)
            .await
            .unwrap_err();
        assert!(!w.plain_inline_writes());
    }

    #[test]
    fn which_errors_are_the_disks() {
        for errno in [
            libc::EIO,
            libc::ENOSPC,
            libc::EFBIG,
            libc::EROFS,
            libc::ENXIO,
        ] {
            assert!(
                is_disk_error(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [libc::EINVAL, libc::EOPNOTSUPP, libc::ECANCELED] {
            assert!(
                !is_disk_error(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        // No errno: not from the device (e.g. a failed task).
        assert!(!is_disk_error(&io::Error::other("read task panicked")));
    }
}
