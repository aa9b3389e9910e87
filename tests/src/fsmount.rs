//! [`FuseLoopMount`]: a real file system on the NBD export through the
//! kernel: `nbdfuse DIR/nbd URI` exposes the export as a file, `losetup`
//! makes it a block device, `mkfs.ext4` + `mount` put a file system on it.
//!
//! Teardown runs in `Drop` too (in the right order: umount, losetup -d,
//! fusermount3 -u, reap nbdfuse), so a failing test never leaves a mount, a
//! loop device or a FUSE mount behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::run::{run, run_ok, stdout, CMD_TIMEOUT};
use crate::wait::{poll_until, wait_until};

/// nbdfuse + loop device (+ optionally a mounted file system).
#[derive(Debug)]
pub struct FuseLoopMount {
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
    fuse_mounted: bool,
    loopdev: Option<String>,
    mnt: PathBuf,
    mounted: bool,
    log: PathBuf,
}

impl FuseLoopMount {
    /// Starts nbdfuse on `uri` under `work/fuse` and attaches the exposed
    /// file to a free loop device. `work/mnt` is the mount point.
    pub fn attach(work: &Path, uri: &str) -> FuseLoopMount {
        let fuse_dir = work.join("fuse");
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&fuse_dir).expect("creating fuse dir");
        std::fs::create_dir_all(&mnt).expect("creating mount point");
        let log = work.join("nbdfuse.log");
        let logf = std::fs::File::create(&log).expect("nbdfuse log");
        let child = Command::new("nbdfuse")
            .arg(fuse_dir.join("nbd"))
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nbdfuse: {e}"));
        let mut m = FuseLoopMount {
            fuse_dir,
            nbdfuse: Some(child),
            fuse_mounted: true,
            loopdev: None,
            mnt,
            mounted: false,
            log,
        };
        let file = m.fuse_dir.join("nbd");
        let ready = poll_until(Duration::from_secs(30), || {
            if let Some(c) = m.nbdfuse.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    return Some(Err(s));
                }
            }
            file.exists().then_some(Ok(()))
        });
        match ready {
            Some(Ok(())) => {}
            Some(Err(s)) => {
                m.nbdfuse = None;
                m.fuse_mounted = false;
                panic!(
                    "nbdfuse exited ({s}) before exposing {}: {}",
                    file.display(),
                    m.nbdfuse_log()
                );
            }
            None => panic!(
                "nbdfuse did not expose {} within 30s: {}",
                file.display(),
                m.nbdfuse_log()
            ),
        }
        let out = run_ok(
            Command::new("losetup").args(["-f", "--show"]).arg(&file),
            CMD_TIMEOUT,
        );
        let dev = stdout(&out).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        m.loopdev = Some(dev);
        m
    }

    /// What nbdfuse printed.
    pub fn nbdfuse_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The loop device (`/dev/loopN`).
    pub fn device(&self) -> &str {
        self.loopdev.as_deref().expect("loop device attached")
    }

    /// The mount point.
    pub fn mount_point(&self) -> &Path {
        &self.mnt
    }

    /// `mkfs.ext4 -q -F DEV`.
    pub fn mkfs_ext4(&self) {
        run_ok(
            Command::new("mkfs.ext4").args(["-q", "-F", self.device()]),
            Duration::from_secs(120),
        );
    }

    /// `mount DEV MNT`.
    pub fn mount(&mut self) {
        run_ok(
            Command::new("mount").arg(self.device()).arg(&self.mnt),
            CMD_TIMEOUT,
        );
        self.mounted = true;
    }

    /// `umount MNT`.
    pub fn umount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mnt), CMD_TIMEOUT);
        self.mounted = false;
    }

    /// `e2fsck -fn DEV` must report a clean file system (exit 0).
    pub fn fsck_clean(&self) {
        assert!(!self.mounted, "fsck of a mounted file system");
        run_ok(
            Command::new("e2fsck").args(["-fn", self.device()]),
            Duration::from_secs(120),
        );
    }

    /// Full teardown, in order; panics if a step fails (Drop retries quietly).
    pub fn teardown(mut self) {
        self.teardown_steps(true);
    }

    fn teardown_steps(&mut self, strict: bool) {
        let mut errors = Vec::new();
        if self.mounted {
            let out = run(Command::new("umount").arg(&self.mnt), CMD_TIMEOUT);
            if !out.status.success() {
                errors.push(format!(
                    "umount {}: {}",
                    self.mnt.display(),
                    crate::run::all_output(&out)
                ));
                let _ = run(Command::new("umount").arg("-l").arg(&self.mnt), CMD_TIMEOUT);
            }
            self.mounted = false;
        }
        if let Some(dev) = self.loopdev.take() {
            let out = run(Command::new("losetup").args(["-d", &dev]), CMD_TIMEOUT);
            if !out.status.success() {
                errors.push(format!(
                    "losetup -d {dev}: {}",
                    crate::run::all_output(&out)
                ));
            }
        }
        if self.fuse_mounted {
            let out = run(
                Command::new("fusermount3").arg("-u").arg(&self.fuse_dir),
                CMD_TIMEOUT,
            );
            if !out.status.success() {
                errors.push(format!(
                    "fusermount3 -u {}: {}",
                    self.fuse_dir.display(),
                    crate::run::all_output(&out)
                ));
                let _ = run(
                    Command::new("umount").arg("-l").arg(&self.fuse_dir),
                    CMD_TIMEOUT,
                );
            }
            self.fuse_mounted = false;
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let exited = poll_until(Duration::from_secs(20), || child.try_wait().ok().flatten());
            if exited.is_none() {
                errors.push("nbdfuse did not exit after fusermount3 -u".into());
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if strict && !errors.is_empty() {
            panic!(
                "teardown failed:\n{}\nnbdfuse log:\n{}",
                errors.join("\n"),
                self.nbdfuse_log()
            );
        }
    }
}

impl Drop for FuseLoopMount {
    fn drop(&mut self) {
        self.teardown_steps(false);
    }
}

/// Waits until `path` is no longer a mount point (per /proc/self/mounts).
pub fn wait_unmounted(path: &Path) {
    let p = path.display().to_string();
    wait_until(
        &format!("{p} to be unmounted"),
        Duration::from_secs(20),
        || {
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            (!mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(p.as_str())))
            .then_some(())
        },
    );
}
