//! [`FaultyFile`]: a file whose writes fail on demand, for faults of the
//! devices under the agent (a cluster partition that starts failing).
//!
//! `nbdfuse DIR/file --command nbdkit -s --filter=pause --filter=error file
//! IMAGE pause-control=SOCKET error-pwrite-rate=100% error-pwrite=EIO
//! error-pwrite-file=TRIGGER` exposes `IMAGE` as `DIR/file` through the
//! kernel's FUSE: reads and writes pass through to `IMAGE` until
//! [`FaultyFile::fail_writes`] creates `TRIGGER`, from then on every write
//! fails with `EIO` (the caller's `pwrite` returns it) until the trigger is
//! removed again. Reads keep working, as on a disk whose writes fail.
//! [`FaultyFile::pause`] makes every later request hang until its guard
//! ([`Paused`]) resumes them (a stalled disk: nbdkit's pause filter, driven
//! over its control socket). [`FaultyFile::loop_device`] puts a loop device
//! on top (a block device that takes O_DIRECT, as production disks do; its
//! stalls then hold the device's requests, not the caller's threads). The
//! mount point, the trigger and the control
//! socket live in a temporary directory of their own. Teardown
//! (fusermount3 -u, reap nbdfuse) runs in `Drop`; what a test process killed
//! from outside left behind is torn down by the next FaultyFile made in the
//! same temp dir ([`sweep_abandoned`]: the work directory records its
//! owner's PID).
//!
//! Order of teardown in a test: a process blocked in a paused request
//! cannot even die (the FUSE request waits uninterruptibly), so the
//! [`Paused`] guard must be dropped (resuming) before the agents are
//! stopped, and the agents stopped before the [`FaultyFile`] is dropped
//! (unmounting): hold the file first, then the agents, then the guard.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::run::{run, CMD_TIMEOUT};
use crate::wait::poll_until;

/// Prefix of a FaultyFile's work directory in the temp dir.
const WORK_PREFIX: &str = "nbd-mirror-faulty-";
/// In the work directory: the PID of the test process that made it.
const OWNER_FILE: &str = "owner.pid";
/// In the work directory: the PID of its nbdfuse.
const NBDFUSE_FILE: &str = "nbdfuse.pid";

/// Tears down the FaultyFiles under `tmp` whose test process is gone: one
/// killed from outside (SIGKILL, `timeout`) never ran its `Drop`, and left
/// its FUSE mount, its nbdfuse and maybe a loop device behind. The loop
/// devices over the file are detached, the mount is unmounted lazily, nbdfuse
/// is killed (which also fails the requests of any process still blocked in
/// the mount), and the directory is removed. Work directories of a live
/// process (this one's included) are left alone.
pub fn sweep_abandoned(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    let pid_in = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(WORK_PREFIX) {
            continue;
        }
        let work = e.path();
        let Some(owner) = pid_in(work.join(OWNER_FILE)) else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let mnt = work.join("mnt");
        let out = run(
            Command::new("losetup").arg("-j").arg(mnt.join("file")),
            CMD_TIMEOUT,
        );
        for dev in crate::run::stdout(&out)
            .lines()
            .filter_map(|l| l.split(':').next())
        {
            let _ = run(Command::new("losetup").args(["-d", dev]), CMD_TIMEOUT);
        }
        let _ = run(
            Command::new("fusermount3").args(["-u", "-z"]).arg(&mnt),
            CMD_TIMEOUT,
        );
        if let Some(pid) = pid_in(work.join(NBDFUSE_FILE)) {
            // Only if it still is an nbdfuse: the PID may have been reused.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "nbdfuse" {
                let _ = run(
                    Command::new("kill").arg("-9").arg(pid.to_string()),
                    CMD_TIMEOUT,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&work);
        eprintln!(
            "faultfile: removed {} (its test process {owner} is gone)",
            work.display()
        );
    }
}

/// An image file exposed through nbdfuse + nbdkit's error filter.
#[derive(Debug)]
pub struct FaultyFile {
    dir: PathBuf,
    file: PathBuf,
    trigger: PathBuf,
    log: PathBuf,
    control: PathBuf,
    nbdfuse: Option<Child>,
    loopdev: Option<String>,
    // Last: removed after the unmount.
    _work: tempfile::TempDir,
}

/// Requests to a [`FaultyFile`] hang while this lives; dropping it (or
/// [`Paused::resume`]) lets them go on.
#[derive(Debug)]
pub struct Paused<'a> {
    file: &'a FaultyFile,
    resumed: bool,
}

impl Paused<'_> {
    /// Lets the held requests and every later one go on.
    pub fn resume(mut self) {
        self.file.control_command(b'r', b'R');
        self.resumed = true;
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        // Also while unwinding: never panic here.
        if !self.resumed {
            let _ = self.file.try_control_command(b'r', b'R');
        }
    }
}

impl FaultyFile {
    /// Exposes `image` (an existing file) as a file of a new FUSE mount;
    /// writes pass through until [`fail_writes`](Self::fail_writes)`(true)`.
    pub fn attach(image: &Path) -> FaultyFile {
        FaultyFile::attach_in(&std::env::temp_dir(), image)
    }

    /// [`attach`](Self::attach) with its work directory in `tmp` (after
    /// sweeping the abandoned ones there, [`sweep_abandoned`]).
    pub fn attach_in(tmp: &Path, image: &Path) -> FaultyFile {
        sweep_abandoned(tmp);
        let work = tempfile::Builder::new()
            .prefix(WORK_PREFIX)
            .tempdir_in(tmp)
            .expect("temp dir of the faulty file");
        std::fs::write(work.path().join(OWNER_FILE), std::process::id().to_string())
            .expect("recording the faulty file's owner");
        let dir = work.path().join("mnt");
        std::fs::create_dir_all(&dir).expect("creating the faulty file's mount point");
        let trigger = work.path().join("trigger");
        let log = work.path().join("log");
        let control = work.path().join("pause.sock");
        let logf = std::fs::File::create(&log).expect("faulty file log");
        let child = Command::new("nbdfuse")
            .arg(dir.join("file"))
            .args([
                "--command",
                "nbdkit",
                "-s",
                "--filter=pause",
                "--filter=error",
            ])
            .arg("file")
            .arg(image)
            .arg(format!("pause-control={}", control.display()))
            .args(["error-pwrite-rate=100%", "error-pwrite=EIO"])
            .arg(format!("error-pwrite-file={}", trigger.display()))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nbdfuse: {e}"));
        let _ = std::fs::write(work.path().join(NBDFUSE_FILE), child.id().to_string());
        let mut f = FaultyFile {
            file: dir.join("file"),
            dir,
            trigger,
            log,
            control,
            nbdfuse: Some(child),
            loopdev: None,
            _work: work,
        };
        let ready = poll_until(Duration::from_secs(30), || {
            if let Some(c) = f.nbdfuse.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    return Some(Err(s));
                }
            }
            f.file.exists().then_some(Ok(()))
        });
        match ready {
            Some(Ok(())) => f,
            Some(Err(s)) => {
                f.nbdfuse = None;
                panic!(
                    "nbdfuse exited ({s}) before exposing the file: {}",
                    f.log_text()
                )
            }
            None => panic!(
                "nbdfuse did not expose the file within 30s: {}",
                f.log_text()
            ),
        }
    }

    /// Puts the file at `path` (a data file or cluster partition a config
    /// names) behind a FaultyFile: the file moves to `PATH.faulty-image`
    /// beside it, and `path` becomes a symlink to the exposed file.
    pub fn take_over(path: &Path) -> FaultyFile {
        let image = Self::move_aside(path);
        let f = FaultyFile::attach(&image);
        std::os::unix::fs::symlink(f.path(), path).expect("symlink to the faulty file");
        f
    }

    /// [`take_over`](Self::take_over), with `path` a symlink to a
    /// [`loop_device`](Self::loop_device) over the exposed file instead.
    pub fn take_over_as_loop_device(path: &Path) -> FaultyFile {
        let image = Self::move_aside(path);
        let mut f = FaultyFile::attach(&image);
        std::os::unix::fs::symlink(f.loop_device(), path).expect("symlink to the loop device");
        f
    }

    fn move_aside(path: &Path) -> PathBuf {
        let mut image = path.as_os_str().to_owned();
        image.push(".faulty-image");
        let image = PathBuf::from(image);
        std::fs::rename(path, &image)
            .unwrap_or_else(|e| panic!("moving {} aside: {e}", path.display()));
        image
    }

    /// A loop device over the file (`losetup -f --show`), detached at
    /// teardown; the same device on every call.
    pub fn loop_device(&mut self) -> String {
        if let Some(d) = &self.loopdev {
            return d.clone();
        }
        let out = crate::run::run_ok(
            Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&self.file),
            CMD_TIMEOUT,
        );
        let dev = crate::run::stdout(&out).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loopdev = Some(dev.clone());
        dev
    }

    /// The file to hand to the program under test.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The work directory (mount point, trigger, control socket, PIDs).
    pub fn work_dir(&self) -> &Path {
        self._work.path()
    }

    /// The PID of its nbdfuse, while it runs.
    pub fn nbdfuse_pid(&self) -> Option<u32> {
        self.nbdfuse.as_ref().map(|c| c.id())
    }

    /// From now on every write fails with `EIO` (`true`), or passes again.
    pub fn fail_writes(&self, fail: bool) {
        if fail {
            std::fs::write(&self.trigger, b"").expect("creating the error trigger");
        } else {
            let _ = std::fs::remove_file(&self.trigger);
        }
    }

    /// From now on every request hangs until the guard is dropped or
    /// resumed; returns once the requests received before are done.
    pub fn pause(&self) -> Paused<'_> {
        self.control_command(b'p', b'P');
        Paused {
            file: self,
            resumed: false,
        }
    }

    /// One command of the pause filter's control socket, panicking unless
    /// it is echoed.
    fn control_command(&self, cmd: u8, echo: u8) {
        if let Err(e) = self.try_control_command(cmd, echo) {
            panic!(
                "pause control {} ({:?}): {e}",
                self.control.display(),
                cmd as char
            );
        }
    }

    fn try_control_command(&self, cmd: u8, echo: u8) -> std::io::Result<()> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.control)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(&[cmd])?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        if b[0] != echo {
            return Err(std::io::Error::other(format!("echo {:?}", b[0] as char)));
        }
        Ok(())
    }

    /// What nbdfuse and nbdkit printed (one line per injected error).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn teardown(&mut self) {
        if let Some(dev) = self.loopdev.take() {
            let _ = run(Command::new("losetup").args(["-d", &dev]), CMD_TIMEOUT);
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let out = run(
                Command::new("fusermount3").arg("-u").arg(&self.dir),
                CMD_TIMEOUT,
            );
            if !out.status.success() {
                let _ = run(Command::new("umount").arg("-l").arg(&self.dir), CMD_TIMEOUT);
            }
            if poll_until(Duration::from_secs(20), || child.try_wait().ok().flatten()).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for FaultyFile {
    fn drop(&mut self) {
        self.teardown();
    }
}
