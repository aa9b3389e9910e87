//! The backing store under an engine: a regular file or a block device.
//!
//! Shared by the io_uring and portable engines: opening (with or without
//! O_DIRECT), size, direct-I/O alignment, range checks, and the blocking
//! "make this range read as zeroes" primitives (fallocate, BLKZEROOUT).

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

// Block-device ioctls missing from the libc crate. Encoded with the
// asm-generic _IO/_IOR layout (x86_64, aarch64, riscv64).
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272; // _IOR(0x12, 114, size_t)
const BLKZEROOUT: libc::Ioctl = 0x127f; // _IO(0x12, 127), arg: [u64; 2]

/// What the path refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    /// Block device with its logical block size (BLKSSZGET).
    BlockDevice {
        logical_block: u32,
    },
}

/// An opened backing store.
#[derive(Debug)]
pub(crate) struct Backing {
    pub file: File,
    pub kind: Kind,
    pub size: u64,
}

/// `EINVAL` etc. as an `io::Error` with `raw_os_error` set.
pub(crate) fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// The engine could not perform a request at all (its ring or I/O threads are
/// gone, a blocking task failed): `ECANCELED`, which NBD clients see as `EIO`
/// but which is not a failure of the disk ([`super::is_disk_error`]).
pub(crate) fn not_performed() -> io::Error {
    errno(libc::ECANCELED)
}

/// Open read-write, optionally with O_DIRECT.
pub(crate) fn open(path: &Path, direct: bool) -> io::Result<Backing> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(true);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    let file = oo.open(path)?;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    let (kind, size) = if ft.is_block_device() {
        let lbs = blk_logical_block_size(&file)?;
        (Kind::BlockDevice { logical_block: lbs }, blk_size(&file)?)
    } else if ft.is_file() {
        (Kind::File, meta.len())
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: neither a regular file nor a block device",
                path.display()
            ),
        ));
    };
    Ok(Backing { file, kind, size })
}

fn blk_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live, writable u64; the fd is open for the duration of the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn blk_logical_block_size(file: &File) -> io::Result<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a
    // live, writable c_int.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut lbs as *mut libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lbs.max(512) as u32)
}

/// Direct-I/O alignment: `(offset_and_length_align, memory_align)`, or
/// `None` if the kernel reports that this file cannot do direct I/O.
///
/// Preference order: `statx(STATX_DIOALIGN)` (exact, Linux 6.1+), then the
/// logical block size for block devices, then `st_blksize` for files (at
/// least 512; conservative: any multiple of the real requirement works, and a
/// 512-byte guess would fail on 4Kn disks).
pub(crate) fn dio_alignment(file: &File, kind: Kind) -> Option<(usize, usize)> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a valid NUL-terminated empty string used with
    // AT_EMPTY_PATH on an open fd; `stx` is a writable statx buffer that the
    // kernel fills (it is zero-initialised, so every field is initialised
    // whatever the kernel writes).
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if r == 0 {
        // SAFETY: zero-initialised above, and statx succeeded.
        let stx = unsafe { stx.assume_init() };
        if stx.stx_mask & libc::STATX_DIOALIGN != 0 {
            if stx.stx_dio_offset_align == 0 {
                return None;
            }
            let off = stx.stx_dio_offset_align as usize;
            let mem = (stx.stx_dio_mem_align as usize).max(1);
            return Some((off, mem));
        }
    }
    match kind {
        Kind::BlockDevice { logical_block } => {
            Some((logical_block as usize, logical_block as usize))
        }
        Kind::File => {
            let bs = file
                .metadata()
                .map(|m| m.blksize() as usize)
                .unwrap_or(4096);
            let bs = bs.clamp(512, 65536).next_power_of_two();
            Some((bs, bs))
        }
    }
}

/// The file system magic (`statfs.f_type`) of the file's file system.
fn fs_magic(file: &File) -> Option<i64> {
    let mut sfs = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `sfs` is a writable, zero-initialised statfs buffer; the fd is open.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), sfs.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: zero-initialised above and filled by a successful fstatfs.
    let sfs = unsafe { sfs.assume_init() };
    // f_type's integer type differs between architectures, hence the casts.
    #[allow(clippy::unnecessary_cast)]
    Some(sfs.f_type as i64)
}

/// Whether the file lives on tmpfs, where O_DIRECT (accepted since Linux 6.6)
/// still goes through the page cache and would only add alignment costs.
pub(crate) fn on_tmpfs(file: &File) -> bool {
    #[allow(clippy::unnecessary_cast)]
    let tmpfs = libc::TMPFS_MAGIC as i64;
    fs_magic(file) == Some(tmpfs)
}

/// `statfs.f_type` of ramfs (not in the libc crate; `include/uapi/linux/magic.h`).
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Whether `fdatasync` of this backing can never do anything: a regular file
/// on tmpfs or ramfs, whose pages *are* the storage (no volatile cache, no
/// writeback; the kernel's `fsync` there is `noop_fsync`). Such a backing is
/// as durable after a write as after a flush, so an engine may complete a
/// flush (and FUA) at once instead of a system call or an io_uring round
/// trip. Anything else (a disk file system, a block device, or an unknown
/// answer) returns false and keeps every flush.
pub(crate) fn sync_is_noop(file: &File, kind: Kind) -> bool {
    if kind != Kind::File {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let tmpfs = libc::TMPFS_MAGIC as i64;
    matches!(fs_magic(file), Some(m) if m == tmpfs || m == RAMFS_MAGIC)
}

/// `EINVAL` unless `[offset, offset + len)` lies within `size`.
pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => {
            tracing::debug!(offset, len, size, "engine: request beyond end of volume");
            Err(errno(libc::EINVAL))
        }
    }
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA` / `SEEK_HOLE`: `Ok(None)`
/// for `ENXIO` (no data / no hole at or after `offset` before the end).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(|_| errno(libc::EOVERFLOW))?;
    // SAFETY: `lseek` only reads its integer arguments and the descriptor,
    // which `file` keeps open for the duration of the call.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The allocation of `[offset, offset + len)` (inside `size`) for
/// [`super::BlockEngine::extents`], from `SEEK_DATA` / `SEEK_HOLE`: at most
/// [`super::MAX_EXTENTS`] runs. Block devices, and file systems without
/// the two (`EINVAL`, `EOPNOTSUPP`), report one allocated run. Blocking
/// (a few system calls per run). It moves the descriptor's file offset, which
/// the engines never use (all their I/O is positioned).
pub(crate) fn extents_blocking(
    file: &File,
    kind: Kind,
    size: u64,
    offset: u64,
    len: u64,
) -> io::Result<Vec<super::Extent>> {
    check_range(size, offset, len)?;
    let end = offset + len;
    let all_data = || vec![super::Extent { len, hole: false }];
    if len == 0 {
        return Ok(Vec::new());
    }
    if !matches!(kind, Kind::File) {
        return Ok(all_data());
    }
    let mut out: Vec<super::Extent> = Vec::new();
    // Kernels or file systems without SEEK_DATA / SEEK_HOLE.
    let no_seek = |e: &io::Error| unsupported(e) || e.raw_os_error() == Some(libc::EINVAL);
    let mut pos = offset;
    while pos < end {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if no_seek(&e) => return Ok(all_data()),
            Err(e) => return Err(e),
        };
        // No data at or after `pos`: a hole up to the end of the file.
        let data = data.unwrap_or(end).min(end);
        if data > pos {
            if !super::push_run(&mut out, data - pos, true) {
                break;
            }
            pos = data;
            continue;
        }
        let hole = match seek(file, pos, libc::SEEK_HOLE) {
            Ok(h) => h.unwrap_or(end).min(end),
            Err(e) if no_seek(&e) => return Ok(all_data()),
            Err(e) => return Err(e),
        };
        // SEEK_HOLE at a data offset returns a larger offset (the file's end
        // counts as a hole); guard against a file system that says otherwise.
        let next = if hole > pos { hole } else { end };
        if !super::push_run(&mut out, next - pos, false) {
            break;
        }
        pos = next;
    }
    Ok(out)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an open fd; no pointers involved.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn blk_zeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) through the pointer,
    // which points to a live array of two u64.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOTTY)
    )
}

/// Make `[offset, offset + len)` read as zeroes without writing data buffers
/// where the backing allows it. Returns the sub-ranges the caller must still
/// zero with ordinary writes (unsupported operation, or the unaligned edges
/// of a block-device range). Blocking; run on a blocking thread.
///
/// - File, `trim`: `fallocate(PUNCH_HOLE|KEEP_SIZE)`, else `ZERO_RANGE`.
/// - File, `!trim`: `fallocate(ZERO_RANGE|KEEP_SIZE)`: stays allocated.
/// - Block device, `trim`: `fallocate(PUNCH_HOLE|KEEP_SIZE)` on the device
///   (the kernel guarantees zeroes and may unmap), else `BLKZEROOUT`.
/// - Block device, `!trim`: `BLKZEROOUT`, which the kernel issues with
///   NOUNMAP semantics (blocks stay provisioned).
pub(crate) fn zero_range_blocking(
    file: &File,
    kind: Kind,
    offset: u64,
    len: u64,
    trim: bool,
) -> io::Result<Vec<(u64, u64)>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    match kind {
        Kind::File => {
            let keep = libc::FALLOC_FL_KEEP_SIZE;
            if trim {
                match fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len) {
                    Ok(()) => return Ok(Vec::new()),
                    Err(e) if unsupported(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            match fallocate(file, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len) {
                Ok(()) => Ok(Vec::new()),
                Err(e) if unsupported(&e) => Ok(vec![(offset, len)]),
                Err(e) => Err(e),
            }
        }
        Kind::BlockDevice { logical_block } => {
            let lb = logical_block as u64;
            let end = offset + len;
            let mid_start = offset.div_ceil(lb) * lb;
            let mid_end = end / lb * lb;
            if mid_start >= mid_end {
                return Ok(vec![(offset, len)]);
            }
            let mut rest = Vec::new();
            if mid_start > offset {
                rest.push((offset, mid_start - offset));
            }
            if end > mid_end {
                rest.push((mid_end, end - mid_end));
            }
            let mlen = mid_end - mid_start;
            if trim {
                match fallocate(
                    file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    mid_start,
                    mlen,
                ) {
                    Ok(()) => return Ok(rest),
                    Err(e) if unsupported(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            blk_zeroout(file, mid_start, mlen)?;
            Ok(rest)
        }
    }
}

/// See [`super::create_data_file`].
pub(crate) fn create_data_file(path: &Path, size: u64) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let have = blk_size(&file)?;
        if have < size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: block device has {have} bytes, {size} needed",
                    path.display()
                ),
            ));
        }
        return Ok(());
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: neither a regular file nor a block device",
                path.display()
            ),
        ));
    }
    let have = meta.len();
    if have > size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: existing file has {have} bytes, refusing to shrink it to {size}",
                path.display()
            ),
        ));
    }
    if have < size {
        // set_len extends sparsely: no blocks are allocated.
        file.set_len(size)?;
        file.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch file in `dir`, removed on drop.
    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn scratch(dir: &Path) -> Option<(Scratch, File)> {
        let p = dir.join(format!("nbdm-backing-test-{}", std::process::id()));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .ok()?;
        Some((Scratch(p), f))
    }

    /// The flush shortcut holds on tmpfs only, never on a disk file system,
    /// and follows the file system (df) rather than the path.
    #[test]
    fn sync_is_noop_only_where_fsync_is() {
        let fstype = |dir: &str| {
            std::process::Command::new("df")
                .args(["--output=fstype", dir])
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().nth(1).map(|l| l.trim().to_string()))
        };
        let mut checked = 0;
        for dir in ["/dev/shm", env!("CARGO_MANIFEST_DIR")] {
            let (Some(fs), Some((_keep, f))) = (fstype(dir), scratch(Path::new(dir))) else {
                continue;
            };
            let expect = fs == "tmpfs" || fs == "ramfs";
            assert_eq!(sync_is_noop(&f, Kind::File), expect, "{dir} is {fs}");
            assert!(
                !sync_is_noop(&f, Kind::BlockDevice { logical_block: 512 }),
                "a block device always flushes"
            );
            checked += 1;
        }
        assert!(checked > 0, "no directory could be checked");
    }
}
