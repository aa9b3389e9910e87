//! Saving the loser's divergent regions before a forced resync overwrites
//! them (design notes property 8).
//!
//! Layout: `<dir>/<resource>-<node>-<unix seconds>.img`, a sparse file of the
//! volume's size holding the saved regions at their own offsets, and next to
//! it `<same>.regions`, one line per saved region: `region offset length`.
//! The directory (exists or creatable, writable) and its free space are
//! checked before the first byte is written ([`check_save_dir`],
//! [`check_save_space`]; the agent also checks them at start); any failure
//! is reported with the path and the cause, and the resync is refused
//! (nothing is overwritten).

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

/// The directory `dir` exists and is writable, or can be created: returns
/// the existing directory whose file system will hold the saves (`dir` itself
/// or its nearest existing ancestor). Nothing is created. Errors name the
/// path and the cause (the lesson of seed 001: a state transfer that fails
/// late, for a reason that could have been checked up front).
pub fn check_save_dir(dir: &Path) -> Result<PathBuf, String> {
    let key = "divergent_save_dir";
    match std::fs::metadata(dir) {
        Ok(md) if !md.is_dir() => {
            return Err(format!(
                "{key} {} exists but is not a directory",
                dir.display()
            ))
        }
        Ok(_) => {
            // Probe with a real file: catches read-only file systems, ACLs
            // and quotas that permission bits alone do not show.
            let probe = dir.join(format!(".nbd-mirror-probe-{}", std::process::id()));
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .map_err(|e| {
                    format!(
                        "{key} {} is not writable: creating {} failed: {e}",
                        dir.display(),
                        probe.display()
                    )
                })?;
            let _ = std::fs::remove_file(&probe);
            return Ok(dir.to_path_buf());
        }
        Err(e) if !missing(&e) => {
            return Err(format!("{key} {}: {e}", dir.display()));
        }
        Err(_) => {}
    }
    let mut base = dir.parent();
    while let Some(b) = base {
        let b = if b.as_os_str().is_empty() {
            Path::new(".")
        } else {
            b
        };
        match std::fs::metadata(b) {
            Ok(md) if md.is_dir() => {
                let c = std::ffi::CString::new(b.as_os_str().as_bytes())
                    .map_err(|_| format!("{key} {}: path contains a NUL byte", dir.display()))?;
                // SAFETY: `c` is a valid NUL-terminated path; access only reads it.
                let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
                if rc != 0 {
                    return Err(format!(
                        "{key} {} does not exist and cannot be created: {} is not writable ({})",
                        dir.display(),
                        b.display(),
                        std::io::Error::last_os_error()
                    ));
                }
                return Ok(b.to_path_buf());
            }
            Ok(_) => {
                return Err(format!(
                    "{key} {} cannot be created: {} is not a directory",
                    dir.display(),
                    b.display()
                ))
            }
            Err(e) if missing(&e) => base = b.parent(),
            Err(e) => {
                return Err(format!(
                    "{key} {} cannot be created: {}: {e}",
                    dir.display(),
                    b.display()
                ))
            }
        }
    }
    Err(format!(
        "{key} {}: no existing ancestor directory",
        dir.display()
    ))
}

/// A path component does not exist (or a file stands where a directory would be).
fn missing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// Bytes to keep free beyond the saved data (region list, file-system overhead).
pub fn save_margin(need: u64) -> u64 {
    need / 64 + (1 << 20)
}

/// Enough free space under `dir` (an existing directory, see
/// [`check_save_dir`]) to save `regions` regions of `need` bytes in all;
/// otherwise the error says how much is missing.
pub fn check_save_space(dir: &Path, regions: u64, need: u64) -> Result<(), String> {
    let free = free_bytes(dir)?;
    let margin = save_margin(need);
    let want = need.saturating_add(margin);
    if free < want {
        return Err(format!(
            "divergent_save_dir on {}: saving {regions} regions needs {need} bytes (+{margin} margin), {free} bytes are free: {} bytes missing; free space or point divergent_save_dir elsewhere",
            dir.display(),
            want - free
        ));
    }
    Ok(())
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
    check_save_dir(dir)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create divergent_save_dir {}: {e}", dir.display()))?;
    let need: u64 = regions
        .iter()
        .map(|&r| part.region_bytes(r).end - part.region_bytes(r).start)
        .sum();
    check_save_space(dir, regions.len() as u64, need)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_dir_checks_name_the_path_and_cause() {
        let t = tempfile::tempdir().expect("tempdir");
        // Existing, writable: itself; the probe file is gone afterwards.
        assert_eq!(check_save_dir(t.path()).expect("usable"), t.path());
        assert_eq!(std::fs::read_dir(t.path()).expect("read_dir").count(), 0);
        // Missing but creatable: the nearest existing ancestor.
        let nested = t.path().join("a/b/c");
        assert_eq!(check_save_dir(&nested).expect("creatable"), t.path());
        // A file where the directory should be.
        let file = t.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let e = check_save_dir(&file).unwrap_err();
        assert!(
            e.contains(&file.display().to_string()) && e.contains("not a directory"),
            "{e}"
        );
        let e = check_save_dir(&file.join("sub")).unwrap_err();
        assert!(
            e.contains("cannot be created") && e.contains("not a directory"),
            "{e}"
        );
        // Space: fine for nothing, names what is missing for too much.
        check_save_space(t.path(), 0, 0).expect("nothing to save");
        let e = check_save_space(t.path(), 1 << 40, u64::MAX / 4).unwrap_err();
        assert!(
            e.contains("bytes missing") && e.contains(&t.path().display().to_string()),
            "{e}"
        );
    }
}
