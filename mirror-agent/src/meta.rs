//! The agent's side of the cluster partition: attach at start (initialising
//! an all-zero partition, refusing anything unrecognised), `mdctrl init`,
//! `mdctrl dump-md`, and the state transitions recorded in the superblock.
//!
//! The format itself lives in the `bitmap` crate (`docs/on-disk-format.md`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bitmap::{
    AttachCheck, ClusterPartition, CreateParams, FileStorage, Flags, Geometry, MetaError,
};

use crate::config::{self, ResourceNode};
use crate::engine::IoWatch;
use crate::status::DiskStatus;

/// Why the cluster partition could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum MetaAttachError {
    /// The file or device could not be opened or locked.
    #[error("cluster partition {path}: {source} (run `mdctrl init {resource}` to create it)")]
    Open {
        /// Path.
        path: PathBuf,
        /// Resource.
        resource: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The data partition's identity could not be read.
    #[error("data partition {path}: {source}")]
    DataIdentity {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The content is not usable metadata; the agent refuses to start.
    #[error("cluster partition {path} is not usable: {source}")]
    Refused {
        /// Path.
        path: PathBuf,
        /// Why.
        source: MetaError,
    },
    /// The metadata's region size differs from the configuration.
    #[error("cluster partition {path} was created with region size {on_disk} but the config says {configured}; re-create it with `mdctrl init --force` (a full resync follows) or fix region_size")]
    RegionSize {
        /// Path.
        path: PathBuf,
        /// Region size on disk.
        on_disk: u64,
        /// Region size configured.
        configured: u64,
    },
}

/// Errors of `mdctrl init`.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The resource has no section for this node.
    #[error("resource {resource} has no [resource.server.{node}] section")]
    NotOnNode {
        /// Resource.
        resource: String,
        /// Node.
        node: String,
    },
    /// The data file does not exist and no size is configured.
    #[error("data partition {path} does not exist and resource {resource} has no `size` to create it with")]
    NoSize {
        /// Path.
        path: PathBuf,
        /// Resource.
        resource: String,
    },
    /// `--blank` on a data file that holds data.
    #[error("data partition {path} is not blank (non-zero byte at offset {offset}): --blank would declare unrelated data identical")]
    NotBlank {
        /// Path.
        path: PathBuf,
        /// First non-zero byte.
        offset: u64,
    },
    /// File-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The metadata layer refused or failed.
    #[error("cluster partition {path}: {source}{}", init_hint(.source))]
    Meta {
        /// Path.
        path: PathBuf,
        /// Error.
        source: MetaError,
    },
}

fn init_hint(e: &MetaError) -> &'static str {
    match e {
        MetaError::AlreadyInitialised { .. } | MetaError::Unrecognised { .. } => {
            "\n  hint: `mdctrl init --force` re-creates it; every region becomes dirty and the next resync copies everything"
        }
        _ => "",
    }
}

impl InitError {
    /// True when init refused on purpose (existing metadata, agent running),
    /// as opposed to failing.
    pub fn is_refusal(&self) -> bool {
        match self {
            InitError::Meta { source, .. } => {
                matches!(
                    source,
                    MetaError::AlreadyInitialised { .. } | MetaError::Unrecognised { .. }
                )
            }
            InitError::Io { source, .. } => source.kind() == std::io::ErrorKind::WouldBlock,
            InitError::NotBlank { .. } => true,
            _ => false,
        }
    }
}

/// What `mdctrl init` did.
#[derive(Debug)]
pub struct InitReport {
    blank: bool,
    resource: String,
    node: String,
    data_path: PathBuf,
    data_created: bool,
    data_size: u64,
    cluster_partition: PathBuf,
    uuid: String,
    region_size: u64,
    region_count: u64,
}

impl fmt::Display for InitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: initialised on {}", self.resource, self.node)?;
        writeln!(
            f,
            "  data partition    {} ({} bytes{})",
            self.data_path.display(),
            self.data_size,
            if self.data_created {
                ", created sparse"
            } else {
                ", existing"
            }
        )?;
        writeln!(
            f,
            "  cluster partition {} (metadata uuid {})",
            self.cluster_partition.display(),
            self.uuid
        )?;
        if self.blank {
            write!(
                f,
                "  regions           {} x {} bytes, clean: declared blank (generation {:016x}); the peer must be initialised with --blank too",
                self.region_count,
                self.region_size,
                crate::gens::BLANK
            )
        } else {
            write!(
                f,
                "  regions           {} x {} bytes, all marked dirty until the first sync",
                self.region_count, self.region_size
            )
        }
    }
}

/// Create the data file (if missing, at the configured size) and the
/// cluster partition of `resource` on `node`. Refuses to overwrite valid
/// metadata unless `force`. The cluster partition is locked while this
/// runs, so it fails if an agent has it attached.
///
/// With `blank`, the operator declares this node's data partition new
/// (sparse or zeroed) and identical to the peer's, which is initialised the
/// same way: the metadata gets the well-known blank generation and a clean
/// bitmap, so the pair connects in sync without an initial copy (DRBD's
/// `new-current-uuid --clear-bitmap`). A regular file that holds data refuses
/// `blank`; a block device is taken on the operator's word.
pub fn init_resource(
    rc: &config::Resource,
    node: &str,
    force: bool,
    blank: bool,
) -> Result<InitReport, InitError> {
    let me = rc.node(node).ok_or_else(|| InitError::NotOnNode {
        resource: rc.name.clone(),
        node: node.to_string(),
    })?;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| InitError::Io { what, path, source }
    };
    let mut data_created = false;
    if !me.data_path.exists() {
        let size = rc.size.ok_or_else(|| InitError::NoSize {
            path: me.data_path.clone(),
            resource: rc.name.clone(),
        })?;
        if let Some(dir) = me.data_path.parent() {
            std::fs::create_dir_all(dir).map_err(io("creating directory", dir))?;
        }
        crate::engine::create_data_file(&me.data_path, size)
            .map_err(io("creating data file", &me.data_path))?;
        data_created = true;
    }
    if blank && !data_created {
        if let Some(off) =
            first_data_offset(&me.data_path).map_err(io("checking", &me.data_path))?
        {
            return Err(InitError::NotBlank {
                path: me.data_path.clone(),
                offset: off,
            });
        }
    }
    let ident =
        bitmap::data_partition_identity(&me.data_path).map_err(io("reading", &me.data_path))?;
    let volume_size = ident.size;
    let geometry = Geometry::new(volume_size, rc.region_size).map_err(|e| InitError::Meta {
        path: me.cluster_partition.clone(),
        source: MetaError::InvalidParams(e),
    })?;
    ensure_cp_file(&me.cluster_partition, geometry.required_partition_size())
        .map_err(io("creating", &me.cluster_partition))?;
    let storage =
        FileStorage::open(&me.cluster_partition).map_err(io("opening", &me.cluster_partition))?;
    let mut params = CreateParams::new(rc.name.clone(), node, &ident);
    params.region_size = rc.region_size;
    params.initially_dirty = !blank;
    let meta_err = |source| InitError::Meta {
        path: me.cluster_partition.clone(),
        source,
    };
    let cp = ClusterPartition::create(storage, &params, force).map_err(meta_err)?;
    if blank {
        cp.update_superblock(|sb| {
            sb.gens = crate::gens::blank();
            sb.flags = Flags::CONSISTENT;
            sb.flags.insert(Flags::INITIAL_SYNC_DONE);
        })
        .map_err(meta_err)?;
    }
    Ok(InitReport {
        blank,
        resource: rc.name.clone(),
        node: node.to_string(),
        data_path: me.data_path.clone(),
        data_created,
        data_size: volume_size,
        cluster_partition: me.cluster_partition.clone(),
        uuid: cp.identity().uuid.to_string(),
        region_size: cp.region_size(),
        region_count: cp.region_count(),
    })
}

/// Offset of the first byte of data in a regular file (`SEEK_DATA`, then a
/// scan of the data extents for non-zero bytes); `None` if it reads as all
/// zeroes. Block devices are not scanned (`None`).
fn first_data_offset(path: &Path) -> std::io::Result<Option<u64>> {
    use std::io::Read;
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path)?;
    let md = f.metadata()?;
    if !md.file_type().is_file() {
        return Ok(None);
    }
    let len = md.len();
    let mut pos: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None); // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (data as u64, hole as u64);
        let mut off = start;
        let mut r = std::io::BufReader::new(&f);
        std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(start))?;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            r.read_exact(&mut buf[..n])?;
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Ok(Some(off + i as u64));
            }
            off += n as u64;
        }
        pos = end;
    }
    Ok(None)
}

/// Make sure a regular-file cluster partition exists and is at least `size`
/// bytes (zero-filled, i.e. blank). Block devices are used as they are.
fn ensure_cp_file(path: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => Ok(()),
        Ok(m) if m.len() >= size => Ok(()),
        Ok(_) | Err(_) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(path)?;
            if f.metadata()?.len() < size {
                f.set_len(size)?;
            }
            f.sync_all()
        }
    }
}

/// `mdctrl dump-md`: everything readable from a cluster partition, without
/// identity checks (works on damaged metadata too).
pub fn dump(path: &Path) -> Result<Dump, std::io::Error> {
    let mut storage = ReadOnlyFile::open(path)?;
    let report = bitmap::dump(&mut storage, 32).map_err(std::io::Error::other)?;
    Ok(Dump {
        path: path.to_path_buf(),
        report,
    })
}

/// A dump plus the path it came from.
#[derive(Debug)]
pub struct Dump {
    path: PathBuf,
    report: bitmap::DumpReport,
}

impl Dump {
    /// True when no superblock could be chosen or a bitmap chunk is bad.
    pub fn is_damaged(&self) -> bool {
        self.report.error.is_some() || !self.report.bad_chunks.is_empty()
    }
}

impl fmt::Display for Dump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# {}", self.path.display())?;
        write!(f, "{}", self.report)
    }
}

/// Read-only access for `dump-md`: must work while the agent holds the lock.
struct ReadOnlyFile(std::fs::File);

impl ReadOnlyFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        std::fs::File::open(path)
            .map(ReadOnlyFile)
            .map_err(|e| std::io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))
    }
}

impl bitmap::MetaStorage for ReadOnlyFile {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "dump-md never writes",
        ))
    }
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        use std::io::Seek;
        (&self.0).seek(std::io::SeekFrom::End(0))
    }
}

/// A [`MetaStorage`](bitmap::MetaStorage) that counts its reads, writes and
/// syncs in an [`IoWatch`], so that a stalled cluster partition shows in the
/// status (`disk.metadata_stalled_secs`).
struct TimedStorage<S> {
    inner: S,
    watch: Arc<IoWatch>,
}

impl<S: bitmap::MetaStorage> bitmap::MetaStorage for TimedStorage<S> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let _io = self.watch.begin();
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let _io = self.watch.begin();
        self.inner.write_at(offset, buf)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        let _io = self.watch.begin();
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
}

/// The attached cluster partition of one resource.
#[derive(Debug)]
pub struct Meta {
    cp: Arc<ClusterPartition>,
    path: PathBuf,
    /// The cluster partition's requests (see [`TimedStorage`]).
    io: Arc<IoWatch>,
}

impl Meta {
    /// Attach at agent start. An all-zero partition is initialised (as the
    /// ancestor did after `dd if=/dev/zero`); anything unrecognised, damaged
    /// beyond repair, or belonging to another resource/node/data partition
    /// makes the agent refuse to start, naming the file and why.
    pub fn attach(
        rc: &config::Resource,
        me: &ResourceNode,
        node: &str,
        _data_size: u64,
    ) -> Result<Meta, MetaAttachError> {
        let path = me.cluster_partition.clone();
        let ident = bitmap::data_partition_identity(&me.data_path).map_err(|source| {
            MetaAttachError::DataIdentity {
                path: me.data_path.clone(),
                source,
            }
        })?;
        let io = Arc::new(IoWatch::default());
        let open_storage = || {
            FileStorage::open(&path)
                .map(|inner| TimedStorage {
                    inner,
                    watch: io.clone(),
                })
                .map_err(|source| MetaAttachError::Open {
                    path: path.clone(),
                    resource: rc.name.clone(),
                    source,
                })
        };
        let check = AttachCheck::new(rc.name.clone(), node, &ident);
        let cp = match ClusterPartition::open(open_storage()?, &check) {
            Ok((cp, report)) => {
                if !report.is_clean() {
                    tracing::warn!(cluster_partition = %path.display(), "metadata repaired at attach: {report:?}");
                }
                cp
            }
            Err(MetaError::Blank) => {
                tracing::warn!(cluster_partition = %path.display(), "cluster partition is all zero: initialising it (every region dirty)");
                let mut params = CreateParams::new(rc.name.clone(), node, &ident);
                params.region_size = rc.region_size;
                ClusterPartition::create(open_storage()?, &params, false).map_err(|source| {
                    MetaAttachError::Refused {
                        path: path.clone(),
                        source,
                    }
                })?
            }
            Err(source) => return Err(MetaAttachError::Refused { path, source }),
        };
        if cp.region_size() != rc.region_size {
            return Err(MetaAttachError::RegionSize {
                path,
                on_disk: cp.region_size(),
                configured: rc.region_size,
            });
        }
        cp.set_keep_dirty_capacity(rc.keep_dirty);
        cp.set_hot_extent_size(rc.hot_extent_size)
            .map_err(|source| MetaAttachError::Refused {
                path: path.clone(),
                source,
            })?;
        Ok(Meta {
            cp: Arc::new(cp),
            path,
            io,
        })
    }

    /// The cluster partition's pending requests and progress (stall detection).
    pub fn io_watch(&self) -> &Arc<IoWatch> {
        &self.io
    }

    /// The cluster partition (for the data path's write intents).
    pub fn partition(&self) -> &Arc<ClusterPartition> {
        &self.cp
    }

    /// The cluster partition's path (for log lines).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Refusal reason if the local data must not be served.
    pub fn check_activatable(&self) -> Result<(), String> {
        let flags = self.cp.flags();
        if flags.contains(Flags::DISK_ERROR) {
            return Err(format!(
                "the data partition had an I/O error (recorded in {})",
                self.path.display()
            ));
        }
        if flags.contains(Flags::RESYNC_TARGET) {
            return Err(
                "the local data is inconsistent: a resync into this node has not finished".into(),
            );
        }
        if let Some(why) = self.cp.poisoned() {
            return Err(format!(
                "the cluster partition {} failed earlier: {why}",
                self.path.display()
            ));
        }
        Ok(())
    }

    /// Record activation/deactivation (the was-active flag) durably.
    pub async fn record_activation(&self, active: bool) -> Result<(), MetaError> {
        let cp = Arc::clone(&self.cp);
        tokio::task::spawn_blocking(move || {
            cp.update_superblock(|sb| sb.flags.set(Flags::WAS_ACTIVE, active))
                .map(|_| ())
        })
        .await
        .map_err(|e| MetaError::Poisoned {
            cause: format!("metadata task failed: {e}"),
        })?
    }

    /// Record a data-disk error durably (the disk must not be trusted any more).
    pub async fn record_disk_error(&self) -> Result<(), MetaError> {
        let cp = Arc::clone(&self.cp);
        tokio::task::spawn_blocking(move || {
            cp.update_superblock(|sb| sb.flags.insert(Flags::DISK_ERROR))
                .map(|_| ())
        })
        .await
        .map_err(|e| MetaError::Poisoned {
            cause: format!("metadata task failed: {e}"),
        })?
    }

    /// Disk part of `status`.
    pub fn disk_status(&self) -> DiskStatus {
        let sb = self.cp.superblock();
        let flags = self.cp.flags();
        DiskStatus {
            consistent: !flags.contains(Flags::RESYNC_TARGET),
            disk_error: flags.contains(Flags::DISK_ERROR),
            metadata_error: self.cp.poisoned(),
            // Filled in by the resource, which knows the threshold and the data engine.
            io_stalled_secs: None,
            metadata_stalled_secs: None,
            io_pending: 0,
            dirty_regions: self.cp.dirty_count(),
            total_regions: self.cp.region_count(),
            difference_percent: self.cp.dirty_percent(),
            last_update: Some(self.cp.last_update_time()).filter(|&t| t > 0),
            break_time: Some(self.cp.break_time()).filter(|&t| t > 0),
            current_generation: format!("{:016x}", sb.state.gens.current),
        }
    }
}
