//! Saving the loser's divergent regions before a forced resync overwrites
//! them (design notes property 8).
//!
//! Layout: `<dir>/<resource>-<node>-<unix seconds>.img`, a sparse file of the
//! volume's size holding the saved regions at their own offsets, and next to
//! it `<same>.regions`, one line per saved region: `region offset length`.
//! Free space is checked before the first byte is written; any failure is
//! reported with the path and the cause, and the resync is refused (nothing
//! is overwritten).

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bitmap::ClusterPartition;

use crate::engine::BlockEngine;

/// Free bytes for an unprivileged writer on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64, String> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| format!("{}: path contains a NUL byte", dir.display()))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable
    // memory of the right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(format!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    // fsblkcnt_t and c_ulong are u64 here but narrower on some targets.
    #[allow(clippy::unnecessary_cast)]
    let (avail, frsize) = (st.f_bavail as u64, st.f_frsize as u64);
    Ok(avail.saturating_mul(frsize))
}

/// Save `regions` of `engine` under `dir`; returns the image path.
pub async fn save_regions(
    engine: &Arc<dyn BlockEngine>,
    part: &ClusterPartition,
    dir: &Path,
    resource: &str,
    node: &str,
    regions: &[u64],
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create divergent_save_dir {}: {e}", dir.display()))?;
    let need: u64 = regions
        .iter()
        .map(|&r| part.region_bytes(r).end - part.region_bytes(r).start)
        .sum();
    let free = free_bytes(dir)?;
    // Keep a margin for the region list and file-system overhead.
    let margin = need / 64 + (1 << 20);
    if free < need + margin {
        return Err(format!(
            "{} has {free} bytes free, saving {} regions needs {need} bytes (+{margin} margin): free space or point divergent_save_dir elsewhere",
            dir.display(),
            regions.len()
        ));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let img = dir.join(format!("{resource}-{node}-{now}.img"));
    let list = dir.join(format!("{resource}-{node}-{now}.img.regions"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&img)
        .map_err(|e| format!("cannot create {}: {e}", img.display()))?;
    f.set_len(part.volume_size())
        .map_err(|e| format!("cannot size {}: {e}", img.display()))?;
    let mut lines = String::new();
    for &r in regions {
        let b = part.region_bytes(r);
        let data = engine
            .read(b.start, (b.end - b.start) as usize)
            .await
            .map_err(|e| format!("reading region {r} at {} of the data to save: {e}", b.start))?;
        f.write_all_at(&data, b.start)
            .map_err(|e| format!("writing {} at {}: {e}", img.display(), b.start))?;
        lines.push_str(&format!("{r} {} {}\n", b.start, b.end - b.start));
    }
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", img.display()))?;
    let mut l = std::fs::File::create(&list)
        .map_err(|e| format!("cannot create {}: {e}", list.display()))?;
    l.write_all(lines.as_bytes())
        .and_then(|_| l.sync_all())
        .map_err(|e| format!("writing {}: {e}", list.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    tracing::warn!(image = %img.display(), regions = regions.len(), bytes = need, "saved the divergent regions before the forced resync overwrites them");
    Ok(img)
}
