//! Storage behind the cluster partition: the [`MetaStorage`] trait, the real file/block-device
//! implementation ([`FileStorage`]: pread/pwrite + fdatasync), an in-memory one ([`MemStorage`]),
//! and [`data_partition_identity`], which reads a data partition's size and stable id (WWID/serial).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Byte-addressed storage with an explicit durability point.
///
/// `write_at` may land in a volatile cache; only after `sync` returns Ok is everything written
/// before it durable. Implementations must write all of `buf` or fail.
pub trait MetaStorage: Send {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset` (not yet durable).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True if the size is zero.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl<T: MetaStorage + ?Sized> MetaStorage for Box<T> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
}

/// A cluster partition on a regular file or a block device.
///
/// Block devices are opened with `O_EXCL` (the kernel then refuses a second exclusive opener and a
/// mounted device); regular files take a non-blocking `flock(LOCK_EX)`. Either way two agents cannot
/// drive the same metadata.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    block_device: bool,
}

impl FileStorage {
    /// Opens an existing file or block device read-write and locks it exclusively.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileStorage> {
        let path = path.as_ref();
        let block_device = std::fs::metadata(path)?.file_type().is_block_device();
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if block_device {
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts.open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening cluster partition {}: {e}", path.display()),
            )
        })?;
        if !block_device {
            // SAFETY: flock on a file descriptor we own and that stays open for the call; no
            // memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "locking cluster partition {} (in use by another agent?): {e}",
                        path.display()
                    ),
                ));
            }
        }
        Ok(FileStorage {
            file,
            path: path.to_owned(),
            block_device,
        })
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True if this is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

impl MetaStorage for FileStorage {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        // fdatasync; on a block device this also flushes the device's volatile write cache.
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        // metadata().len() is 0 for block devices; seeking to the end works for both. The file
        // position is irrelevant because all I/O is positional.
        (&self.file).seek(SeekFrom::End(0))
    }
}

/// A cluster partition in memory (tests, tools). Writes are immediately "durable".
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    data: Vec<u8>,
}

impl MemStorage {
    /// A zero-filled storage of `len` bytes.
    pub fn new(len: usize) -> MemStorage {
        MemStorage { data: vec![0; len] }
    }
    /// Wraps an image.
    pub fn from_vec(data: Vec<u8>) -> MemStorage {
        MemStorage { data }
    }
    /// The image.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }
    /// Mutable image (tests corrupt it).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data
    }
    /// Consumes into the image.
    pub fn into_inner(self) -> Vec<u8> {
        self.data
    }
}

pub(crate) fn range_check(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let start =
        usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match start.checked_add(n) {
        Some(end) if end <= len => Ok(start..end),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("access at {offset}+{n} beyond end of storage ({len} bytes)"),
        )),
    }
}

impl MetaStorage for MemStorage {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = range_check(self.data.len(), offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let r = range_check(self.data.len(), offset, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }
}

/// Size and stable id of a data partition, as stored in the superblock identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataIdentity {
    /// Size in bytes.
    pub size: u64,
    /// WWID / serial / dm uuid, or empty for regular files and devices without one.
    pub stable_id: String,
}

fn read_sys(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

fn dev_major_minor(dev: u64) -> (u64, u64) {
    // glibc's gnu_dev_major/minor encoding.
    let major = ((dev & 0x0000_0000_000f_ff00) >> 8) | ((dev & 0xffff_f000_0000_0000) >> 32);
    let minor = (dev & 0xff) | ((dev & 0x0000_0fff_fff0_0000) >> 12);
    (major, minor)
}

/// Stable id of the block device `major:minor` from sysfs: `device/wwid`, `wwid`, `device/serial`,
/// `serial`, `dm/uuid`, `md/uuid`; for a partition the parent disk's id plus `-partN`. Empty if
/// none is available. Truncated to 255 bytes (the field size).
pub fn block_stable_id(major: u64, minor: u64) -> String {
    stable_id_in(Path::new("/sys/dev/block"), major, minor)
}

/// [`block_stable_id`] with the sysfs `dev/block` directory as a parameter (tests use a fake one).
fn stable_id_in(dev_block: &Path, major: u64, minor: u64) -> String {
    let base = dev_block.join(format!("{major}:{minor}"));
    let candidates = [
        "device/wwid",
        "wwid",
        "device/serial",
        "serial",
        "dm/uuid",
        "md/uuid",
    ];
    let find = |dir: &Path| candidates.iter().find_map(|c| read_sys(&dir.join(c)));
    let mut id = find(&base);
    if id.is_none() {
        if let Some(part) = read_sys(&base.join("partition")) {
            // /sys/dev/block/M:m -> .../sda/sda1; the parent directory is the disk.
            if let Ok(real) = std::fs::canonicalize(&base) {
                if let Some(parent) = real.parent() {
                    id = find(parent).map(|p| format!("{p}-part{part}"));
                }
            }
        }
    }
    let mut id = id.unwrap_or_default();
    if id.len() > crate::layout::STABLE_ID_MAX {
        let mut cut = crate::layout::STABLE_ID_MAX;
        while !id.is_char_boundary(cut) {
            cut -= 1;
        }
        id.truncate(cut);
    }
    id
}

/// Reads the size and stable id of a data partition (block device or regular file).
pub fn data_partition_identity(path: impl AsRef<Path>) -> io::Result<DataIdentity> {
    let path = path.as_ref();
    let md = std::fs::metadata(path)?;
    if md.file_type().is_block_device() {
        let f = File::open(path)?;
        let size = (&f).seek(SeekFrom::End(0))?;
        let (major, minor) = dev_major_minor(md.rdev());
        Ok(DataIdentity {
            size,
            stable_id: block_stable_id(major, minor),
        })
    } else {
        Ok(DataIdentity {
            size: md.len(),
            stable_id: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_minor_decoding() {
        // makedev(8, 17) and makedev(259, 3) as glibc encodes them.
        assert_eq!(dev_major_minor(0x811), (8, 17));
        // glibc makedev.
        let makedev = |ma: u64, mi: u64| {
            ((ma & 0xfff) << 8) | ((ma & !0xfff) << 32) | (mi & 0xff) | ((mi & !0xff) << 12)
        };
        assert_eq!(dev_major_minor(makedev(259, 3)), (259, 3));
        assert_eq!(dev_major_minor(makedev(4100, 70000)), (4100, 70000));
    }

    #[test]
    fn stable_id_from_fake_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let devices = root.path().join("devices");
        let dev_block = root.path().join("dev_block");
        std::fs::create_dir_all(dev_block.as_path()).unwrap();
        // Disk with device/wwid and serial: wwid wins.
        let sda = devices.join("sda");
        std::fs::create_dir_all(sda.join("device")).unwrap();
        std::fs::write(sda.join("device/wwid"), "naa.5000c500a1b2c3d4\n").unwrap();
        std::fs::write(sda.join("serial"), "S123\n").unwrap();
        std::os::unix::fs::symlink(&sda, dev_block.join("8:0")).unwrap();
        // Its partition: parent id + -partN.
        let sda1 = sda.join("sda1");
        std::fs::create_dir_all(&sda1).unwrap();
        std::fs::write(sda1.join("partition"), "1\n").unwrap();
        std::os::unix::fs::symlink(&sda1, dev_block.join("8:1")).unwrap();
        // Virtio disk with only a serial; loop device with nothing.
        let vda = devices.join("vda");
        std::fs::create_dir_all(&vda).unwrap();
        std::fs::write(vda.join("serial"), "1996631178972331\n").unwrap();
        std::os::unix::fs::symlink(&vda, dev_block.join("254:0")).unwrap();
        let loop0 = devices.join("loop0");
        std::fs::create_dir_all(&loop0).unwrap();
        std::os::unix::fs::symlink(&loop0, dev_block.join("7:0")).unwrap();

        assert_eq!(stable_id_in(&dev_block, 8, 0), "naa.5000c500a1b2c3d4");
        assert_eq!(stable_id_in(&dev_block, 8, 1), "naa.5000c500a1b2c3d4-part1");
        assert_eq!(stable_id_in(&dev_block, 254, 0), "1996631178972331");
        assert_eq!(stable_id_in(&dev_block, 7, 0), "");
        assert_eq!(stable_id_in(&dev_block, 9, 9), "");
    }

    #[test]
    fn file_storage_roundtrip_and_lock() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(16384).unwrap();
        let mut s = FileStorage::open(tmp.path()).unwrap();
        assert_eq!(s.len().unwrap(), 16384);
        s.write_at(4096, b"hello").unwrap();
        s.sync().unwrap();
        let mut b = [0u8; 5];
        s.read_at(4096, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        let second = FileStorage::open(tmp.path());
        assert!(second.is_err(), "second opener must be refused by flock");
        let mut big = [0u8; 8];
        assert!(s.read_at(16380, &mut big).is_err());
    }

    #[test]
    fn regular_file_identity_has_empty_stable_id() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(123456).unwrap();
        let id = data_partition_identity(tmp.path()).unwrap();
        assert_eq!(
            id,
            DataIdentity {
                size: 123456,
                stable_id: String::new()
            }
        );
    }
}
