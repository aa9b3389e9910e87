//! [`FaultyFile`]: a file whose writes fail on demand, for faults of the
//! devices under the agent (a cluster partition that starts failing).
//!
//! `nbdfuse DIR/file --command nbdkit -s --filter=error file IMAGE
//! error-pwrite-rate=100% error-pwrite=EIO error-pwrite-file=TRIGGER`
//! exposes `IMAGE` as `DIR/file` through the kernel's FUSE: reads and writes
//! pass through to `IMAGE` until [`FaultyFile::fail_writes`] creates
//! `TRIGGER`, from then on every write fails with `EIO` (the caller's
//! `pwrite` returns it) until the trigger is removed again. Reads keep
//! working, as on a disk whose writes fail. Teardown (fusermount3 -u, reap
//! nbdfuse) also runs in `Drop`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::run::{run, CMD_TIMEOUT};
use crate::wait::poll_until;

/// An image file exposed through nbdfuse + nbdkit's error filter.
#[derive(Debug)]
pub struct FaultyFile {
    dir: PathBuf,
    file: PathBuf,
    trigger: PathBuf,
    log: PathBuf,
    nbdfuse: Option<Child>,
}

impl FaultyFile {
    /// Exposes `image` (an existing file) as `work/faulty/file`; writes pass
    /// through until [`fail_writes`](Self::fail_writes)`(true)`.
    pub fn attach(work: &Path, image: &Path) -> FaultyFile {
        let dir = work.join("faulty");
        std::fs::create_dir_all(&dir).expect("creating the faulty file's mount point");
        let trigger = work.join("faulty.trigger");
        let _ = std::fs::remove_file(&trigger);
        let log = work.join("faulty.log");
        let logf = std::fs::File::create(&log).expect("faulty file log");
        let child = Command::new("nbdfuse")
            .arg(dir.join("file"))
            .args(["--command", "nbdkit", "-s", "--filter=error", "file"])
            .arg(image)
            .args(["error-pwrite-rate=100%", "error-pwrite=EIO"])
            .arg(format!("error-pwrite-file={}", trigger.display()))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nbdfuse: {e}"));
        let mut f = FaultyFile {
            file: dir.join("file"),
            dir,
            trigger,
            log,
            nbdfuse: Some(child),
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

    /// The file to hand to the program under test.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// From now on every write fails with `EIO` (`true`), or passes again.
    pub fn fail_writes(&self, fail: bool) {
        if fail {
            std::fs::write(&self.trigger, b"").expect("creating the error trigger");
        } else {
            let _ = std::fs::remove_file(&self.trigger);
        }
    }

    /// What nbdfuse and nbdkit printed (one line per injected error).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn teardown(&mut self) {
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
