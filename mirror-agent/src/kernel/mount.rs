//! File system helpers for an attached device: check (`e2fsck -p`), mount
//! (`mount -t FS [-o OPTS] DEV MNT`), unmount (`umount2(2)`, refusing with the
//! holders when busy) and the holder scan (`/proc/*/{cwd,root,exe,fd,maps}`,
//! like `fuser -m`).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::KernelError;

/// A process using a mount point (`mdctrl deactivate` names them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub comm: String,
    /// How it uses the mount: `cwd`, `root`, `exe`, `fd 3 -> /mnt/x`, `mmap /mnt/lib.so`.
    pub how: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}): {}", self.pid, self.comm, self.how)
    }
}

/// Result of the pre-mount check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsckOutcome {
    /// `e2fsck -p` found nothing to do (exit 0).
    Clean,
    /// `e2fsck -p` repaired something safely (exit 1, or 2: "reboot", which
    /// only matters for a mounted root file system).
    Repaired,
    /// No automatic check for this file system type (its mount replays the log).
    Skipped,
}

/// Checks the file system on `dev` before mounting, for ext2/3/4:
/// `e2fsck -p` (preen: only fixes that are safe without a human; what
/// `fsck -a` runs for ext* but without depending on util-linux's `fsck`
/// wrapper and `fsck.ext4` links). Exit 4 or more (errors left uncorrected,
/// operational error) refuses the mount: mounting a damaged file system on
/// the active node spreads the damage to the peer. Other types (xfs, btrfs)
/// are skipped: their `fsck.*` is a no-op and the mount replays the journal.
pub fn fsck(dev: &Path, fs: &str) -> Result<FsckOutcome, KernelError> {
    if !matches!(fs, "ext2" | "ext3" | "ext4") {
        return Ok(FsckOutcome::Skipped);
    }
    let out = Command::new("e2fsck")
        .arg("-p")
        .arg(dev)
        .output()
        .map_err(|source| KernelError::Spawn {
            program: "e2fsck".into(),
            source,
        })?;
    match out.status.code() {
        Some(0) => Ok(FsckOutcome::Clean),
        Some(1) | Some(2) => {
            tracing::warn!(device = %dev.display(), output = %String::from_utf8_lossy(&out.stdout).trim(), "e2fsck -p repaired the file system");
            Ok(FsckOutcome::Repaired)
        }
        _ => Err(KernelError::Command {
            command: format!("e2fsck -p {}", dev.display()),
            status: out.status.to_string(),
            output: tail(&out.stdout, &out.stderr),
        }),
    }
}

/// `mount -t FS [-o OPTIONS] DEV MNT` (the `mount` program: it splits the
/// options into flags and file system data as the administrator expects).
/// Creates `mnt` if missing. Refuses if something is already mounted there.
pub fn mount(dev: &Path, mnt: &Path, fs: &str, options: Option<&str>) -> Result<(), KernelError> {
    std::fs::create_dir_all(mnt).map_err(|source| KernelError::Io {
        what: "create mount point",
        path: mnt.to_owned(),
        source,
    })?;
    if let Some(src) = mounted_source(mnt)? {
        return Err(KernelError::AlreadyMounted {
            mount_point: mnt.to_owned(),
            source_dev: src,
        });
    }
    let mut cmd = Command::new("mount");
    cmd.arg("-t").arg(fs);
    if let Some(o) = options.filter(|o| !o.is_empty()) {
        cmd.arg("-o").arg(o);
    }
    cmd.arg(dev).arg(mnt);
    run(cmd, "mount")
}

/// Unmounts `mnt` (`umount2(mnt, 0)`: never lazy, never forced, so a busy
/// file system stays consistent and mounted). When busy, returns
/// [`KernelError::Busy`] with the processes using it. Not mounted = Ok.
pub fn umount(mnt: &Path) -> Result<(), KernelError> {
    if mounted_source(mnt)?.is_none() {
        return Ok(());
    }
    let c = CString::new(mnt.as_os_str().as_bytes()).map_err(|_| KernelError::Io {
        what: "umount",
        path: mnt.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"),
    })?;
    // SAFETY: c is a valid NUL-terminated path that outlives the call.
    let r = unsafe { libc::umount2(c.as_ptr(), 0) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) {
        return Err(KernelError::Busy {
            mount_point: mnt.to_owned(),
            holders: holders(mnt),
        });
    }
    Err(KernelError::Io {
        what: "umount",
        path: mnt.to_owned(),
        source: e,
    })
}

/// The device mounted at `mnt` according to `/proc/self/mountinfo`, if any
/// (the last mount there wins, as the kernel stacks them).
pub fn mounted_source(mnt: &Path) -> Result<Option<String>, KernelError> {
    let p = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(p).map_err(|source| KernelError::Io {
        what: "read",
        path: p.to_owned(),
        source,
    })?;
    let want = std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_owned());
    let mut found = None;
    for line in text.lines() {
        // id parent major:minor root mountpoint opts... - fstype source superopts
        let mut f = line.split(' ');
        let mount_point = f.nth(4).map(unescape);
        if mount_point.as_deref() == Some(want.as_os_str().to_str().unwrap_or_default()) {
            let source = line
                .split(" - ")
                .nth(1)
                .and_then(|r| r.split(' ').nth(1))
                .map(unescape);
            found = Some(source.unwrap_or_default());
        }
    }
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Processes using anything under `mnt`: working directory, root, executable,
/// open files and memory mappings (what `fuser -m` reports). Processes that
/// vanish or cannot be read during the scan are skipped.
pub fn holders(mnt: &Path) -> Vec<Holder> {
    let base = std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_owned());
    let under = |p: &Path| p == base || p.starts_with(&base);
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let proc_dir = entry.path();
        let comm = std::fs::read_to_string(proc_dir.join("comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let mut push = |how: String| {
            out.push(Holder {
                pid,
                comm: comm.clone(),
                how,
            })
        };
        for link in ["cwd", "root", "exe"] {
            if let Ok(t) = std::fs::read_link(proc_dir.join(link)) {
                // A process chrooted into the mount has root == mnt; `/` as root is everyone.
                if under(&t) && !(link == "root" && t == Path::new("/")) {
                    push(link.to_owned());
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) {
            for fd in fds.flatten() {
                if let Ok(t) = std::fs::read_link(fd.path()) {
                    if under(&t) {
                        push(format!(
                            "fd {} -> {}",
                            fd.file_name().to_string_lossy(),
                            t.display()
                        ));
                    }
                }
            }
        }
        if let Ok(maps) = std::fs::read_to_string(proc_dir.join("maps")) {
            let mut seen: Vec<PathBuf> = Vec::new();
            for line in maps.lines() {
                // addr perms offset dev inode   path
                let Some(path) = line.split_whitespace().nth(5) else {
                    continue;
                };
                let p = PathBuf::from(path);
                if under(&p) && !seen.contains(&p) {
                    push(format!("mmap {}", p.display()));
                    seen.push(p);
                }
            }
        }
    }
    out
}

/// Runs `cmd` to completion; a spawn failure or a non-zero exit becomes a
/// [`KernelError`] naming the command, its exit status and the tail of its output.
pub(crate) fn run(mut cmd: Command, program: &str) -> Result<(), KernelError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| KernelError::Spawn {
        program: program.into(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(KernelError::Command {
        command: shown,
        status: out.status.to_string(),
        output: tail(&out.stdout, &out.stderr),
    })
}

/// The last lines of a command's output, for error messages.
pub(crate) fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(stderr).trim().to_owned();
    let o = String::from_utf8_lossy(stdout);
    if !o.trim().is_empty() {
        if !s.is_empty() {
            s.push_str(" | ");
        }
        s.push_str(o.trim());
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn root_is_mounted_and_a_fresh_dir_is_not() {
        assert!(mounted_source(Path::new("/")).unwrap().is_some());
        let d = tempfile::tempdir().unwrap();
        assert_eq!(mounted_source(d.path()).unwrap(), None);
        // Unmounting something not mounted is a no-op.
        umount(d.path()).unwrap();
    }

    #[test]
    fn holder_scan_finds_a_child_with_its_cwd_and_an_open_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("held");
        std::fs::write(&f, b"x").unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("exec 3<held; read line")
            .current_dir(d.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Wait until the child has opened fd 3 on `held` (readiness, not a
        // fixed sleep). Existence alone is not enough: between fork and exec
        // the child still has this test process's descriptors, fd 3 among
        // them (flaky before).
        let fd3 = PathBuf::from(format!("/proc/{pid}/fd/3"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(&fd3).map_or(true, |t| t != f) {
            assert!(
                std::time::Instant::now() < deadline,
                "child never opened fd 3"
            );
            std::thread::yield_now();
        }
        let h: Vec<Holder> = holders(d.path())
            .into_iter()
            .filter(|h| h.pid == pid)
            .collect();
        drop(child.stdin.take());
        let _ = child.wait();
        assert!(h.iter().any(|h| h.how == "cwd"), "{h:?}");
        assert!(
            h.iter()
                .any(|h| h.how.starts_with("fd 3 -> ") && h.how.ends_with("held")),
            "{h:?}"
        );
    }
}
