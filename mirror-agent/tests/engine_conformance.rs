//! One conformance suite for every block engine, instantiated for:
//! - `uring_buffered`: io_uring, buffered (`direct_io = off`), file on tmpfs
//!   (`/dev/shm`) when present, else the temp dir;
//! - `uring_direct`: io_uring with O_DIRECT (`direct_io = on`) on a file in
//!   `/var/tmp` (a disk filesystem), so unaligned requests take the
//!   read-modify-write path;
//! - `uring_direct_lone`: the same, every request marked alone on its
//!   connection as the NBD connection marks one ([`Lone`]), so that small
//!   writes go behind through the page cache (`engine::behind`) whenever the
//!   engine has nothing else in flight, mixed with O_DIRECT ones
//!   (`blockdev_uring_512_lone`: the same on a loop device, where the kernel
//!   may refuse write-behind);
//! - `portable`: the thread-pool engine; `portable_tmpfs`: the same on tmpfs
//!   (`/dev/shm`) when present, where writes up to 1 MiB are done inline.
//! - `blockdev_*` (ignored by default: need root and loop devices; run with
//!   `cargo test -p mirror-agent --test engine_conformance -- --ignored`):
//!   io_uring with O_DIRECT and the portable engine on a loop device with
//!   512- and 4096-byte sectors (BLKGETSIZE64, BLKSSZGET, BLKZEROOUT and
//!   fallocate on a block device; 4 KiB read-modify-write).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use mirror_agent::engine::{
    self, BlockEngine, DirectIo, EngineKind, EngineOptions, Extent, PortableEngine, UringEngine,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 80 << 20;

struct Fixture {
    engine: Arc<dyn BlockEngine>,
    _loop: Option<LoopDev>,
    /// The file holding the data (for a loop device: its backing image),
    /// whose length and st_blocks the checks inspect.
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// The same engine, every request marked alone ([`Lone`]).
    fn lone(self) -> Fixture {
        Fixture {
            engine: Arc::new(Lone(self.engine)),
            ..self
        }
    }
}

/// A loop device, detached on drop.
struct LoopDev(PathBuf);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

/// A loop device over a temp file, or `None` (said loudly) where this
/// process cannot create one (not root, no `losetup`, no loop driver). With
/// `NBD_MIRROR_REQUIRE_TOOLS=1` (set by test.sh, i.e. in CI) that is a failure.
fn blockdev(sector: u32, portable_engine: bool) -> Option<Fixture> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let losetup = std::process::Command::new("losetup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !root || !losetup || !Path::new("/dev/loop-control").exists() {
        let why = format!(
            "root={root}, losetup={losetup}, /dev/loop-control={}",
            Path::new("/dev/loop-control").exists()
        );
        if std::env::var("NBD_MIRROR_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
            panic!("block-device conformance needs root and loop devices ({why}), and NBD_MIRROR_REQUIRE_TOOLS=1 forbids skipping");
        }
        eprintln!("SKIPPED: block-device engine conformance (sector {sector}): needs root and loop devices ({why})");
        return None;
    }
    let dir = temp_in("/var/tmp");
    let path = make_file(&dir);
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", "--sector-size", &sector.to_string()])
        .arg(&path)
        .output()
        .expect("run losetup");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = LoopDev(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let engine: Arc<dyn BlockEngine> = if portable_engine {
        Arc::new(PortableEngine::open(&dev.0, 64).expect("open portable"))
    } else {
        let e = UringEngine::open(&dev.0, DirectIo::On, 64)
            .expect("open io_uring O_DIRECT on loop device");
        assert_eq!(e.alignment(), sector as usize, "{}", e.describe());
        Arc::new(e)
    };
    Some(Fixture {
        engine,
        _loop: Some(dev),
        path,
        _dir: dir,
    })
}

fn temp_in(base: &str) -> tempfile::TempDir {
    if Path::new(base).is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("engine-test")
            .tempdir_in(base)
        {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

fn make_file(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("data");
    engine::create_data_file(&path, SIZE).expect("create data file");
    path
}

fn uring_buffered() -> Fixture {
    let dir = temp_in("/dev/shm");
    let path = make_file(&dir);
    let e = UringEngine::open(&path, DirectIo::Off, 64).expect("open io_uring");
    assert!(!e.direct());
    Fixture {
        _dir: dir,
        path,
        engine: Arc::new(e),
        _loop: None,
    }
}

fn uring_direct() -> Fixture {
    direct_fixture(false)
}

/// io_uring with O_DIRECT on a file in `/var/tmp`; with `behind`, write-behind
/// must be on too.
fn direct_fixture(behind: bool) -> Fixture {
    let dir = temp_in("/var/tmp");
    let engine: Arc<dyn BlockEngine> = if behind {
        behind_engine(&dir)
    } else {
        direct_engine(&dir)
    };
    Fixture {
        path: dir.path().join("data"),
        _dir: dir,
        engine,
        _loop: None,
    }
}

/// An engine whose every request is polled as one alone on its connection
/// (`engine::lone_request`, what the NBD connection does when it has one
/// request in flight).
struct Lone(Arc<dyn BlockEngine>);

/// A future polled with the lone-request mark set.
struct LoneFut<T>(engine::EngineFuture<T>);

impl<T> std::future::Future for LoneFut<T> {
    type Output = std::io::Result<T>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let _lone = engine::lone_request();
        self.0.as_mut().poll(cx)
    }
}

fn lone<T: Send + 'static>(f: engine::EngineFuture<T>) -> engine::EngineFuture<T> {
    Box::pin(LoneFut(f))
}

impl BlockEngine for Lone {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn read(&self, offset: u64, len: usize) -> engine::EngineFuture<Vec<u8>> {
        lone(self.0.read(offset, len))
    }
    fn read_bytes(&self, offset: u64, len: usize) -> engine::EngineFuture<Bytes> {
        lone(self.0.read_bytes(offset, len))
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> engine::EngineFuture<()> {
        lone(self.0.write(offset, data, fua))
    }
    fn flush(&self) -> engine::EngineFuture<()> {
        lone(self.0.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> engine::EngineFuture<()> {
        lone(self.0.discard(offset, len))
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> engine::EngineFuture<()> {
        lone(self.0.write_zeroes(offset, len, may_trim, fua))
    }
    fn extents(&self, offset: u64, len: u64) -> engine::EngineFuture<Vec<Extent>> {
        lone(self.0.extents(offset, len))
    }
    fn plain_inline_writes(&self) -> bool {
        self.0.plain_inline_writes()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// io_uring with O_DIRECT on a new data file in `dir` (a disk file system).
fn direct_engine(dir: &tempfile::TempDir) -> Arc<UringEngine> {
    let path = make_file(dir);
    let e = UringEngine::open(&path, DirectIo::On, 64).expect("open io_uring with O_DIRECT");
    assert!(e.direct(), "{}", e.describe());
    assert!(e.alignment() >= 512, "{}", e.describe());
    Arc::new(e)
}

/// [`direct_engine`] with write-behind on, for the write-behind tests.
fn behind_engine(dir: &tempfile::TempDir) -> Arc<UringEngine> {
    let e = direct_engine(dir);
    assert!(e.write_behind(), "{}", e.describe());
    e
}

fn uring_direct_lone() -> Fixture {
    direct_fixture(true).lone()
}

fn portable() -> Fixture {
    portable_in("/var/tmp")
}

fn portable_tmpfs() -> Fixture {
    portable_in("/dev/shm")
}

fn portable_in(base: &str) -> Fixture {
    let dir = temp_in(base);
    let path = make_file(&dir);
    let e = PortableEngine::open(&path, 64).expect("open portable");
    Fixture {
        _dir: dir,
        path,
        engine: Arc::new(e),
        _loop: None,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

async fn write(e: &Arc<dyn BlockEngine>, off: u64, data: &[u8]) {
    e.write(off, Bytes::copy_from_slice(data), false)
        .await
        .unwrap_or_else(|err| panic!("write {off}+{}: {err}", data.len()));
}

async fn read(e: &Arc<dyn BlockEngine>, off: u64, len: usize) -> Vec<u8> {
    let v = e
        .read(off, len)
        .await
        .unwrap_or_else(|err| panic!("read {off}+{len}: {err}"));
    assert_eq!(v.len(), len);
    v
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let i = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: first difference at byte {i} (len got {} want {})",
            got.len(),
            want.len()
        );
    }
}

mod checks {
    use super::*;

    pub async fn size(f: &Fixture) {
        assert_eq!(f.engine.size(), SIZE);
        eprintln!("engine: {}", f.engine.describe());
        assert!(!f.engine.describe().is_empty());
    }

    pub async fn round_trip(f: &Fixture) {
        let e = &f.engine;
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = StdRng::seed_from_u64(7);
        // Fixed awkward cases first, then random ones.
        let mut cases: Vec<(u64, usize)> = vec![
            (0, 1),
            (1, 1),
            (511, 1),
            (3, 511),
            (513, 511),
            (4095, 4097),
            (12345, 4097),
            (SIZE - 1, 1),
            (SIZE - 4097, 4097),
            (8192, 4096),
            (0, 512),
        ];
        for _ in 0..150 {
            let len = match rng.gen_range(0..4) {
                0 => rng.gen_range(1..600),
                1 => rng.gen_range(1..70_000),
                2 => rng.gen_range(1..8) * 4096,
                _ => rng.gen_range(1..1_000_000),
            };
            let off = rng.gen_range(0..SIZE - len as u64);
            cases.push((off, len));
        }
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = pattern(i as u64 + 1000, len);
            write(e, off, &data).await;
            model[off as usize..off as usize + len].copy_from_slice(&data);
            let back = read(e, off, len).await;
            assert_same(&back, &data, &format!("case {i}: {off}+{len}"));
            // An unaligned read overlapping the edges of the write.
            let lo = off.saturating_sub(3);
            let hi = (off + len as u64 + 5).min(SIZE);
            let back = read(e, lo, (hi - lo) as usize).await;
            assert_same(
                &back,
                &model[lo as usize..hi as usize],
                &format!("case {i} with edges"),
            );
        }
        let chunk = 8 << 20;
        let mut off = 0u64;
        while off < SIZE {
            let n = chunk.min((SIZE - off) as usize);
            let back = read(e, off, n).await;
            assert_same(
                &back,
                &model[off as usize..off as usize + n],
                &format!("final sweep at {off}"),
            );
            off += n as u64;
        }
        // Zero-length requests are no-ops.
        assert!(e.read(5, 0).await.expect("empty read").is_empty());
        e.write(5, Bytes::new(), false).await.expect("empty write");
    }

    pub async fn large(f: &Fixture) {
        let e = &f.engine;
        let len = 32 << 20;
        for (seed, off) in [(1u64, 4096u64 * 3), (2, 1_000_001)] {
            let data = pattern(seed, len);
            write(e, off, &data).await;
            let back = read(e, off, len).await;
            assert_same(&back, &data, &format!("32 MiB at {off}"));
        }
    }

    /// Sizes on both sides of the inline-write limit (1 MiB on a memory file
    /// system; 64 KiB was the limit on other file systems until 2026-12-06, kept
    /// as a size to check), at unaligned offsets, each read back; then all of
    /// them again, overlapping, to check the last write wins whichever path each
    /// took.
    pub async fn inline_limits(f: &Fixture) {
        let e = &f.engine;
        let sizes = [
            65_535,
            65_536,
            65_537,
            (1 << 20) - 1,
            1 << 20,
            (1 << 20) + 1,
        ];
        let mut off = 12_345u64;
        for (i, &len) in sizes.iter().enumerate() {
            let data = pattern(100 + i as u64, len);
            write(e, off, &data).await;
            assert_same(&read(e, off, len).await, &data, &format!("{len} at {off}"));
            off += len as u64 + 777;
        }
        let base = 3 << 20;
        let mut last = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            last = pattern(200 + i as u64, len);
            write(e, base, &last).await;
        }
        assert_same(
            &read(e, base, last.len()).await,
            &last,
            "last overlapping write",
        );
    }

    pub async fn concurrent(f: &Fixture) {
        // 64 tasks, disjoint regions whose edges share blocks (odd sizes), so
        // unaligned writes in neighbouring regions touch the same blocks.
        let region = 100_003u64;
        let mut tasks = Vec::new();
        for t in 0..64u64 {
            let e = f.engine.clone();
            tasks.push(tokio::spawn(async move {
                let base = t * region;
                // Several writes per task: whole region, then sub-ranges.
                let mut content = pattern(t, region as usize);
                e.write(base, Bytes::from(content.clone()), false)
                    .await
                    .expect("write");
                let mut rng = StdRng::seed_from_u64(t + 99);
                for k in 0..4 {
                    let len = rng.gen_range(1..20_000usize);
                    let off = rng.gen_range(0..region - len as u64);
                    let d = pattern(t * 100 + k, len);
                    e.write(base + off, Bytes::from(d.clone()), k % 2 == 0)
                        .await
                        .expect("write");
                    content[off as usize..off as usize + len].copy_from_slice(&d);
                }
                content
            }));
        }
        let mut contents = Vec::new();
        for t in tasks {
            contents.push(t.await.expect("task"));
        }
        for (t, want) in contents.iter().enumerate() {
            let back = read(&f.engine, t as u64 * region, region as usize).await;
            assert_same(&back, want, &format!("task {t} region"));
        }
    }

    pub async fn fua_and_flush(f: &Fixture) {
        let e = &f.engine;
        let d = pattern(5, 10_000);
        e.write(777, Bytes::from(d.clone()), true)
            .await
            .expect("fua write");
        e.flush().await.expect("flush");
        assert_same(&read(e, 777, d.len()).await, &d, "after fua");
        e.write_zeroes(777, 100, false, true)
            .await
            .expect("fua write_zeroes");
        assert!(read(e, 777, 100).await.iter().all(|&b| b == 0));
    }

    fn blocks(p: &Path) -> u64 {
        std::fs::metadata(p).expect("stat").blocks()
    }

    pub async fn discard_reads_zeroes(f: &Fixture) {
        let e = &f.engine;
        let base = 4 << 20;
        let d = pattern(11, 2 << 20);
        write(e, base, &d).await;
        e.flush().await.expect("flush");
        let before = blocks(&f.path);
        // Unaligned range, and an aligned one that must deallocate.
        let (zo, zl) = (base + 4096 * 10 + 3, 200_001u64);
        e.discard(zo, zl).await.expect("discard");
        let back = read(e, base, d.len()).await;
        let mut want = d.clone();
        want[(zo - base) as usize..(zo - base + zl) as usize].fill(0);
        assert_same(&back, &want, "after discard");
        e.discard(base + (1 << 20), 1 << 20)
            .await
            .expect("aligned discard");
        want[1 << 20..].fill(0);
        assert_same(
            &read(e, base, d.len()).await,
            &want,
            "after aligned discard",
        );
        let after = blocks(&f.path);
        assert!(
            after < before,
            "punch hole should free blocks: {before} -> {after}"
        );
    }

    /// `extents` (NBD `base:allocation`): written data is allocated, a
    /// discarded range and a never-written one are holes on a (sparse) file,
    /// a block device is all allocated; the runs are consecutive, start at
    /// the offset asked, and holes read as zeroes.
    pub async fn extents(f: &Fixture) {
        let e = &f.engine;
        let mib = 1u64 << 20;
        write(e, 4 * mib, &pattern(21, mib as usize)).await;
        write(e, 8 * mib, &pattern(22, mib as usize)).await;
        e.discard(8 * mib, mib).await.expect("discard");
        e.flush().await.expect("flush");
        let runs = e.extents(0, 16 * mib).await.expect("extents");
        assert!(runs.iter().all(|r| r.len > 0), "{runs:?}");
        assert!(
            runs.windows(2).all(|w| w[0].hole != w[1].hole),
            "adjacent runs differ: {runs:?}"
        );
        let total: u64 = runs.iter().map(|r| r.len).sum();
        assert_eq!(
            total,
            16 * mib,
            "a simple layout is answered in full: {runs:?}"
        );
        let hole_at = |x: u64| {
            let mut at = 0;
            runs.iter().any(|r| {
                let hit = x >= at && x < at + r.len && r.hole;
                at += r.len;
                hit
            })
        };
        if f._loop.is_some() {
            assert_eq!(
                runs,
                vec![Extent {
                    len: 16 * mib,
                    hole: false
                }]
            );
        } else {
            for x in [4 * mib, 5 * mib - 1] {
                assert!(!hole_at(x), "written byte {x}: {runs:?}");
            }
            for x in [8 * mib, 9 * mib - 1, 12 * mib] {
                assert!(hole_at(x), "discarded or never written byte {x}: {runs:?}");
            }
        }
        let mut at = 0;
        for r in &runs {
            if r.hole {
                let n = r.len.min(mib) as usize;
                assert_same(&read(e, at, n).await, &vec![0; n], "a hole reads as zeroes");
            }
            at += r.len;
        }
        assert_eq!(
            e.extents(4 * mib + 4096, 8192).await.expect("inner range"),
            vec![Extent {
                len: 8192,
                hole: false
            }]
        );
        let err = e
            .extents(SIZE - 4096, 8192)
            .await
            .expect_err("beyond the end");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    pub async fn write_zeroes(f: &Fixture) {
        let e = &f.engine;
        for (i, trim) in [(0u64, true), (1, false)] {
            let base = (20 << 20) + i * (4 << 20);
            let d = pattern(20 + i, 2 << 20);
            write(e, base, &d).await;
            e.flush().await.expect("flush");
            let before = blocks(&f.path);
            let (zo, zl) = (base + 1, (1u64 << 20) + 4097);
            e.write_zeroes(zo, zl, trim, false)
                .await
                .expect("write_zeroes");
            let mut want = d.clone();
            want[1..1 + zl as usize].fill(0);
            assert_same(
                &read(e, base, d.len()).await,
                &want,
                &format!("write_zeroes trim={trim}"),
            );
            if !trim {
                e.flush().await.expect("flush");
                let after = blocks(&f.path);
                assert!(
                    after >= before,
                    "NO_HOLE write_zeroes deallocated: {before} -> {after}"
                );
            }
        }
    }

    pub async fn bounds(f: &Fixture) {
        let e = &f.engine;
        let einval = Some(libc::EINVAL);
        for (off, len) in [(SIZE - 10, 20), (SIZE, 1), (u64::MAX - 1, 4)] {
            match e.read(off, len).await {
                Ok(v) => panic!("read {off}+{len} past the end returned {} bytes", v.len()),
                Err(err) => assert_eq!(err.raw_os_error(), einval, "read {off}+{len}: {err}"),
            }
        }
        let w = e.write(SIZE - 1, Bytes::from_static(b"ab"), false).await;
        assert_eq!(w.expect_err("write past end").raw_os_error(), einval);
        assert_eq!(
            e.discard(SIZE - 1, 2)
                .await
                .expect_err("discard past end")
                .raw_os_error(),
            einval
        );
        assert_eq!(
            e.write_zeroes(SIZE, 1, false, false)
                .await
                .expect_err("zeroes past end")
                .raw_os_error(),
            einval
        );
        assert_eq!(
            std::fs::metadata(&f.path).expect("stat").len(),
            SIZE,
            "file must not grow"
        );
        assert_eq!(read(e, SIZE - 10, 10).await.len(), 10);
    }
}

macro_rules! conformance {
    ($name:ident, $setup:expr) => {
        conformance!($name, $setup, );
    };
    ($name:ident, $setup:expr, $(#[$attr:meta])*) => {
        #[allow(unused_attributes)]
        mod $name {
            use super::*;

            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn size() {
                let Some(f) = $setup else { return };
                checks::size(&f).await
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn round_trip() {
                let Some(f) = $setup else { return };
                checks::round_trip(&f).await
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn large_requests() {
                let Some(f) = $setup else { return };
                checks::large(&f).await
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn inline_limits() {
                let Some(f) = $setup else { return };
                checks::inline_limits(&f).await
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn concurrent_writers() {
                let Some(f) = $setup else { return };
                checks::concurrent(&f).await
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn fua_and_flush() {
                let Some(f) = $setup else { return };
                checks::fua_and_flush(&f).await
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn discard_reads_zeroes() {
                let Some(f) = $setup else { return };
                checks::discard_reads_zeroes(&f).await
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn extents() {
                let Some(f) = $setup else { return };
                checks::extents(&f).await
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn write_zeroes() {
                let Some(f) = $setup else { return };
                checks::write_zeroes(&f).await
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread")]
            async fn bounds() {
                let Some(f) = $setup else { return };
                checks::bounds(&f).await
            }
        }
    };
}

conformance!(uring_buffered, Some(uring_buffered()));
conformance!(uring_direct, Some(uring_direct()));
conformance!(uring_direct_lone, Some(uring_direct_lone()));
conformance!(portable, Some(portable()));
conformance!(portable_tmpfs, Some(portable_tmpfs()));
conformance!(blockdev_uring_512, blockdev(512, false));
conformance!(blockdev_uring_4k, blockdev(4096, false));
conformance!(
    blockdev_uring_512_lone,
    blockdev(512, false).map(Fixture::lone)
);
conformance!(blockdev_portable_4k, blockdev(4096, true));

#[tokio::test(flavor = "multi_thread")]
async fn open_auto_picks_an_engine_and_reports_mode() {
    let dir = temp_in("/var/tmp");
    let path = make_file(&dir);
    let e = engine::open(&path, &EngineOptions::default()).expect("open auto");
    assert_eq!(e.size(), SIZE);
    // This test machine has io_uring; the probe must find it.
    assert_eq!(e.name(), "io_uring", "{}", e.describe());
    let p = engine::open(
        &path,
        &EngineOptions {
            kind: EngineKind::Portable,
            ..Default::default()
        },
    )
    .expect("portable");
    assert_eq!(p.name(), "portable");
    let err = engine::open(
        &path,
        &EngineOptions {
            kind: EngineKind::Portable,
            direct_io: DirectIo::On,
            queue_depth: 4,
            write_behind: true,
        },
    )
    .err()
    .expect("portable cannot do O_DIRECT");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_auto_falls_back_when_size_unaligned() {
    let dir = temp_in("/var/tmp");
    let path = dir.path().join("odd");
    engine::create_data_file(&path, 1_000_001).expect("create");
    let e = UringEngine::open(&path, DirectIo::Auto, 8).expect("open");
    assert!(!e.direct(), "{}", e.describe());
    write(&(Arc::new(e) as Arc<dyn BlockEngine>), 1_000_000, b"z").await;
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1_000_001);
    let on = UringEngine::open(&path, DirectIo::On, 8).expect_err("direct on must refuse");
    assert_eq!(on.raw_os_error(), Some(libc::EINVAL));
}

#[test]
fn create_data_file_is_sparse_and_never_shrinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d");
    engine::create_data_file(&path, 1 << 30).expect("create");
    let m = std::fs::metadata(&path).expect("stat");
    assert_eq!(m.len(), 1 << 30);
    assert!(m.blocks() < 1024, "not sparse: {} blocks", m.blocks());
    engine::create_data_file(&path, 1 << 30).expect("same size is fine");
    engine::create_data_file(&path, 1 << 29).expect_err("refuse to shrink");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1 << 30);
}

#[test]
fn options_deserialize() {
    #[derive(serde::Deserialize)]
    struct W {
        engine: EngineOptions,
    }
    let w: W =
        toml::from_str("[engine]\nkind = \"io-uring\"\ndirect_io = \"off\"\nqueue_depth = 32\n")
            .expect("parse");
    assert_eq!(
        w.engine,
        EngineOptions {
            kind: EngineKind::IoUring,
            direct_io: DirectIo::Off,
            queue_depth: 32,
            write_behind: true,
        }
    );
    let w: W = toml::from_str("[engine]\nkind = \"io_uring\"\n").expect("parse");
    assert_eq!(w.engine.kind, EngineKind::IoUring);
    assert_eq!(w.engine.queue_depth, engine::DEFAULT_QUEUE_DEPTH);
    let w: W = toml::from_str("[engine]\nkind = \"portable\"\n").expect("parse");
    assert_eq!(w.engine.kind, EngineKind::Portable);
    assert!(toml::from_str::<W>("[engine]\nkind = \"aio\"\n").is_err());
    assert_eq!(EngineOptions::default().kind, EngineKind::Auto);
    assert!(EngineOptions::default().write_behind);
    let w: W = toml::from_str("[engine]\nwrite_behind = false\n").expect("parse");
    assert!(!w.engine.write_behind);
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_auto_on_tmpfs_opens_and_round_trips() {
    // Older kernels refuse O_DIRECT on tmpfs (EINVAL at open), 6.6+ accept
    // it but still use the page cache: either way `auto` is buffered there.
    let dir = temp_in("/dev/shm");
    if !dir.path().starts_with("/dev/shm") {
        eprintln!("no /dev/shm tmpfs here; checking the fallback on the temp dir only");
    }
    let path = make_file(&dir);
    let e = UringEngine::open(&path, DirectIo::Auto, 8).expect("open auto");
    eprintln!("tmpfs auto: {}", e.describe());
    assert_eq!(e.describe().starts_with("io_uring, O_DIRECT"), e.direct());
    if dir.path().starts_with("/dev/shm") {
        assert!(!e.direct(), "{}", e.describe());
    }
    let e: Arc<dyn BlockEngine> = Arc::new(e);
    write(&e, 3, b"hello").await;
    assert_eq!(read(&e, 2, 7).await, b"\0hello\0");
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_depth_one_applies_backpressure_not_errors() {
    let dir = temp_in("/var/tmp");
    let path = make_file(&dir);
    let engines: Vec<Arc<dyn BlockEngine>> = vec![
        Arc::new(UringEngine::open(&path, DirectIo::Auto, 1).expect("uring")),
        Arc::new(PortableEngine::open(&path, 1).expect("portable")),
    ];
    for e in engines {
        let tasks: Vec<_> = (0..100u64)
            .map(|i| {
                let e = e.clone();
                tokio::spawn(async move {
                    e.write(i * 4096, Bytes::from(vec![i as u8; 4096]), false)
                        .await?;
                    e.read(i * 4096, 4096).await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let back = t
                .await
                .expect("task")
                .unwrap_or_else(|err| panic!("{}: request {i}: {err}", e.name()));
            assert!(back.iter().all(|&b| b == i as u8));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn file_shrinking_underneath_gives_eio_not_short_data() {
    let dir = temp_in("/var/tmp");
    let path = make_file(&dir);
    let engines: Vec<Arc<dyn BlockEngine>> = vec![
        Arc::new(UringEngine::open(&path, DirectIo::Off, 8).expect("uring buffered")),
        Arc::new(UringEngine::open(&path, DirectIo::On, 8).expect("uring direct")),
        Arc::new(PortableEngine::open(&path, 8).expect("portable")),
    ];
    // The engines keep the size they saw at open; cut the file to 1 MiB.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(1 << 20)
        .expect("truncate");
    for e in engines {
        // Spans the new end: the first transfer is short, the retry gets 0.
        let err = match e.read((1 << 20) - 12288, 65536).await {
            Ok(v) => panic!(
                "{}: read across the shrunk end returned {} bytes",
                e.describe(),
                v.len()
            ),
            Err(err) => err,
        };
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "{}: {err}",
            e.describe()
        );
        assert_eq!(
            e.read((1 << 20) - 4096, 4096).await.expect("inside").len(),
            4096
        );
    }
}

/// Lone small writes without FUA go behind, each read back at once through
/// O_DIRECT (which must see them); large, FUA and not-lone writes, and writes
/// while the engine has a request in flight, stay O_DIRECT.
#[tokio::test(flavor = "multi_thread")]
async fn lone_small_writes_go_behind_and_others_stay_direct() {
    let dir = temp_in("/var/tmp");
    let u = behind_engine(&dir);
    let plain: Arc<dyn BlockEngine> = u.clone();
    let e: Arc<dyn BlockEngine> = Arc::new(Lone(u.clone()));
    let mut expect = 0;
    for (i, &(off, len)) in [
        (0u64, 4096usize),
        (4096 * 7 + 512, 512),
        (12_345, 1),
        (1 << 20, engine::WRITE_BEHIND_MAX),
        (3 << 20, 3000),
    ]
    .iter()
    .enumerate()
    {
        let d = pattern(300 + i as u64, len);
        write(&e, off, &d).await;
        expect += 1;
        assert_eq!(u.behind_writes(), expect, "{off}+{len} should go behind");
        assert_same(&read(&plain, off, len).await, &d, &format!("{off}+{len}"));
    }
    // Not behind: one byte too large, FUA, not marked lone.
    write(&e, 5 << 20, &pattern(1, engine::WRITE_BEHIND_MAX + 1)).await;
    e.write(6 << 20, Bytes::from(pattern(2, 4096)), true)
        .await
        .expect("fua write");
    write(&plain, 7 << 20, &pattern(3, 4096)).await;
    assert_eq!(u.behind_writes(), expect);
    // A 32 MiB read of allocated blocks in flight (submitted by its first
    // poll): the engine is busy, so a lone write stays O_DIRECT.
    plain
        .write(40 << 20, Bytes::from(vec![7u8; 32 << 20]), true)
        .await
        .expect("fill");
    let mut big = plain.read(40 << 20, 32 << 20);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(big.as_mut().poll(cx))).await;
    assert!(
        first.is_pending(),
        "a 32 MiB O_DIRECT read completed at submission"
    );
    write(&e, 8 << 20, &pattern(4, 4096)).await;
    assert_eq!(
        u.behind_writes(),
        expect,
        "a write went behind while a read was in flight"
    );
    assert!(big.await.expect("big read").iter().all(|&b| b == 7));
    for (off, seed, len) in [
        (5u64 << 20, 1u64, engine::WRITE_BEHIND_MAX + 1),
        (6 << 20, 2, 4096),
        (7 << 20, 3, 4096),
        (8 << 20, 4, 4096),
    ] {
        assert_same(
            &read(&plain, off, len).await,
            &pattern(seed, len),
            "direct writes",
        );
    }
    assert!(u.describe().contains("RWF_DONTCACHE"), "{}", u.describe());
}

/// A lone write of some sectors of a page and O_DIRECT writes of the other
/// sectors of that page, at the same time: both survive. The direct I/O
/// alignment here is 512 bytes, so an O_DIRECT write can cover part of the
/// page the buffered write reads in and dirties; without the exclusion in
/// `engine::behind` the page's writeback can carry the old sectors over the
/// new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn behind_and_direct_writes_to_one_page_keep_both() {
    let dir = temp_in("/var/tmp");
    let u = behind_engine(&dir);
    if u.alignment() >= 4096 {
        eprintln!(
            "SKIPPED: behind_and_direct_writes_to_one_page_keep_both: direct I/O alignment {} here, no sub-page O_DIRECT write",
            u.alignment()
        );
        return;
    }
    let plain: Arc<dyn BlockEngine> = u.clone();
    let e: Arc<dyn BlockEngine> = Arc::new(Lone(u.clone()));
    const PAGES: u64 = 2000;
    // Allocated and on the disk, not cached: the buffered write has to read
    // its page from the device, which gives the direct write time to land.
    let base = 16u64 << 20;
    plain
        .write(base, Bytes::from(vec![0xee; (PAGES * 4096) as usize]), true)
        .await
        .expect("fill");
    // One page at a time: the lone write starts first, on an idle engine (so
    // it may go behind), and the O_DIRECT write follows after 0-63 µs, while
    // the lone one may still be reading its page in.
    for p in 0..PAGES {
        let page = base + p * 4096;
        let lone = tokio::spawn({
            let e = e.clone();
            async move {
                e.write(page + 3584, Bytes::from(vec![p as u8; 512]), false)
                    .await
            }
        });
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_micros(p % 64) {
            std::hint::spin_loop();
        }
        plain
            .write(page, Bytes::from(vec![!(p as u8); 3072]), false)
            .await
            .expect("direct write");
        lone.await.expect("task").expect("lone write");
    }
    plain.flush().await.expect("flush");
    let behind = u.behind_writes();
    for p in 0..PAGES {
        let page = base + p * 4096;
        let got = read(&plain, page, 4096).await;
        assert!(
            got[..3072].iter().all(|&b| b == !(p as u8)),
            "page {p}: the O_DIRECT write was lost ({behind} writes went behind)"
        );
        assert!(
            got[3072..3584].iter().all(|&b| b == 0xee),
            "page {p}: untouched sector changed"
        );
        assert!(
            got[3584..].iter().all(|&b| b == p as u8),
            "page {p}: the lone write was lost"
        );
    }
    assert!(behind > 0, "no write went behind: the test proved nothing");
    eprintln!("{behind} of {PAGES} lone writes went behind");
}

/// Where `pwritev2` refuses the write-behind flag (a kernel before 6.14 or a
/// file system without `RWF_DONTCACHE`: `EOPNOTSUPP`, simulated here with a
/// flag no kernel knows), the write is done with O_DIRECT, write-behind is
/// off from then on, and the status line says so.
#[tokio::test(flavor = "multi_thread")]
async fn without_dontcache_lone_writes_stay_direct() {
    let dir = temp_in("/var/tmp");
    let u = behind_engine(&dir);
    u.set_write_behind_flags(1 << 30);
    let e: Arc<dyn BlockEngine> = Arc::new(Lone(u.clone()));
    let d = pattern(9, 4096);
    write(&e, 8192, &d).await;
    assert_same(&read(&e, 8192, 4096).await, &d, "first write");
    assert!(!u.write_behind(), "{}", u.describe());
    assert!(u.describe().contains("no write-behind"), "{}", u.describe());
    let d2 = pattern(10, 700);
    write(&e, 100, &d2).await;
    assert_same(&read(&e, 100, 700).await, &d2, "second write");
    assert_eq!(u.behind_writes(), 0);
}

/// `write_behind = false` keeps every write O_DIRECT.
#[tokio::test(flavor = "multi_thread")]
async fn write_behind_off_keeps_every_write_direct() {
    let dir = temp_in("/var/tmp");
    let path = make_file(&dir);
    let u = Arc::new(UringEngine::open_with(&path, DirectIo::On, 8, false).expect("open"));
    assert!(!u.write_behind());
    assert!(!u.describe().contains("RWF_DONTCACHE"), "{}", u.describe());
    let e: Arc<dyn BlockEngine> = Arc::new(Lone(u.clone()));
    write(&e, 0, &pattern(1, 4096)).await;
    assert_eq!(u.behind_writes(), 0);
}

/// On a block device (a loop device here) write-behind is on only if the
/// kernel takes `RWF_DONTCACHE` there (Linux 6.18 does not: every write stays
/// O_DIRECT); whichever it is, the status line and the writes agree with it.
#[tokio::test(flavor = "multi_thread")]
async fn write_behind_on_a_block_device_is_what_the_kernel_allows() {
    let Some(f) = blockdev(512, false) else {
        return;
    };
    let dev = &f._loop.as_ref().expect("loop device").0;
    let u = Arc::new(UringEngine::open(dev, DirectIo::On, 8).expect("open loop device"));
    eprintln!("loop device: {}", u.describe());
    let on = u.write_behind();
    assert_eq!(
        u.describe().contains("RWF_DONTCACHE)"),
        on,
        "{}",
        u.describe()
    );
    assert_eq!(
        u.describe().contains("no write-behind"),
        !on,
        "{}",
        u.describe()
    );
    let e: Arc<dyn BlockEngine> = Arc::new(Lone(u.clone()));
    let d = pattern(11, 4096);
    write(&e, 4096, &d).await;
    assert_same(&read(&e, 4096, 4096).await, &d, "lone write on the device");
    assert_eq!(u.behind_writes(), u64::from(on));
}
