//! One guest run: builds the initramfs for a scenario, boots QEMU (TCG) with
//! a host timeout, and reads the verdict from the console log.
//!
//! Serial ports (each a file in the run directory): `ttyS0` → `console.log`
//! (kernel console, `/init`, the scenario's `VMH` lines and its one
//! `VMH-RESULT` line), `ttyS1` → `agent.log`, `ttyS2` → `helper.log`,
//! `ttyS3` → `dmesg.log` (written at the end). Virtual disks are raw sparse
//! files in the run directory (`/dev/vda`, `/dev/vdb`, ...).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cache::Cache;
use crate::initramfs::Initramfs;

/// Modules every guest loads (dependencies are added from `modules.dep`).
pub const MODULES: &[&str] = &[
    "nbd",
    "ext4",
    "virtio_blk",
    "virtio_pci",
    "virtio_net",
    "crc32c_generic",
    "crc32c_intel",
];

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Scenario script (sourced by `/init`).
    pub script: &'static str,
    /// Config written to `/etc/nbd-mirror/cluster.toml`.
    pub config: String,
    /// Raw disks: (file name in the run dir, size in bytes).
    pub disks: Vec<(String, u64)>,
    /// Extra kernel command line (`vmh.*` knobs).
    pub cmdline: String,
    /// Guest watchdog, seconds.
    pub guest_watchdog: u64,
    /// Host timeout, seconds (kills QEMU).
    pub host_timeout: u64,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// QEMU user networking (`virtio-net`, guest `10.0.2.15`, host reachable
    /// as `10.0.2.2`); `false` = `-nic none`.
    pub net: bool,
    /// Create the disks empty (truncate); `false` reuses existing files (a
    /// second boot of the same node), creating only missing ones.
    pub fresh_disks: bool,
    /// Appended to the serial log names (`console{suffix}.log`), so several
    /// boots of one run keep their logs apart.
    pub log_suffix: String,
    /// Extra files in the initramfs: (path in the guest, content, mode).
    pub extra_files: Vec<(String, Vec<u8>, u32)>,
}

impl GuestSpec {
    /// A single-boot spec with the defaults of the one-guest scenarios.
    pub fn single(script: &'static str, config: String, disks: Vec<(String, u64)>) -> GuestSpec {
        GuestSpec {
            script,
            config,
            disks,
            cmdline: String::new(),
            guest_watchdog: 420,
            host_timeout: 600,
            mem_mib: 1024,
            net: false,
            fresh_disks: true,
            log_suffix: String::new(),
            extra_files: Vec::new(),
        }
    }

    /// The console log of this boot.
    pub fn console(&self, run: &Path) -> PathBuf {
        run.join(format!("console{}.log", self.log_suffix))
    }
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Outcome {
    /// True for `VMH-RESULT PASS`.
    pub pass: bool,
    /// The reason (text after PASS/FAIL, or why there was no verdict).
    pub reason: String,
    /// Wall time of the QEMU process.
    pub wall: Duration,
    /// Guest uptime at the verdict, if printed.
    pub guest_secs: Option<f64>,
}

/// Binaries of this build that go into the guest.
#[derive(Debug, Clone)]
pub struct OurBins {
    /// `mirror-agent`.
    pub agent: PathBuf,
    /// `mdctrl`.
    pub mdctrl: PathBuf,
    /// This program (the guest helper).
    pub harness: PathBuf,
}

impl OurBins {
    /// `mirror-agent` and `mdctrl` next to this executable (target/release).
    pub fn locate() -> Result<OurBins> {
        let me = std::env::current_exe().context("current_exe")?;
        let dir = me
            .parent()
            .context("executable without a directory")?
            .to_owned();
        let agent = dir.join("mirror-agent");
        let mdctrl = dir.join("mdctrl");
        for p in [&agent, &mdctrl] {
            if !p.is_file() {
                bail!(
                    "{} not found: build the guest binaries of this tree first:\n  cargo build --release -p mirror-agent -p cli -p vm-harness",
                    p.display()
                );
            }
        }
        let (ta, th) = (mtime(&agent), mtime(&me));
        if ta + 600 < th {
            eprintln!("vm-harness: warning: {} is older than vm-harness by {} s (rebuild with cargo build --release -p mirror-agent -p cli)", agent.display(), th - ta);
        }
        Ok(OurBins {
            agent,
            mdctrl,
            harness: me,
        })
    }
}

fn mtime(p: &Path) -> u64 {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Assembles the initramfs for `spec` into `run/initramfs.cpio.gz`.
pub fn build_initramfs(
    cache: &Cache,
    bins: &OurBins,
    spec: &GuestSpec,
    run: &Path,
) -> Result<PathBuf> {
    let mut i = Initramfs::new();
    i.file("/bin/busybox", &cache.bin("bin/busybox")?, 0o755)?;
    i.symlink("/bin/sh", "busybox");
    for (src, dest) in [
        ("sbin/mke2fs", "/sbin/mke2fs"),
        ("sbin/e2fsck", "/sbin/e2fsck"),
        ("sbin/nbd-client", "/sbin/nbd-client"),
    ] {
        i.program(cache, &cache.bin(src)?, dest, false)?;
    }
    i.symlink("/sbin/mkfs.ext4", "mke2fs");
    i.symlink("/sbin/fsck.ext4", "e2fsck");
    if let Ok(conf) = cache.bin("etc/mke2fs.conf") {
        i.file("/etc/mke2fs.conf", &conf, 0o644)?;
    }
    // The loader at the path the ELF interpreter names.
    i.file(
        "/lib64/ld-linux-x86-64.so.2",
        Path::new("/lib64/ld-linux-x86-64.so.2"),
        0o755,
    )?;
    i.program(cache, &bins.agent, "/usr/sbin/mirror-agent", true)?;
    i.program(cache, &bins.mdctrl, "/usr/sbin/mdctrl", true)?;
    i.program(cache, &bins.harness, "/usr/sbin/vm-harness", true)?;
    i.modules(cache, MODULES)?;
    i.bytes("/init", include_str!("guest-init.sh"), 0o755);
    i.bytes("/scenario.sh", spec.script, 0o644);
    i.bytes("/etc/nbd-mirror/cluster.toml", spec.config.clone(), 0o644);
    for (path, data, mode) in &spec.extra_files {
        i.bytes(path, data.clone(), *mode);
    }
    i.dir("/mnt/md1");
    i.dir("/run/md");
    let out = run.join(format!("initramfs{}.cpio.gz", spec.log_suffix));
    let size = i.write(&out)?;
    eprintln!(
        "vm-harness: initramfs {} ({:.1} MiB)",
        out.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(out)
}

/// Boots the guest and waits for its verdict (or the host timeout).
pub fn boot(cache: &Cache, spec: &GuestSpec, initrd: &Path, run: &Path) -> Result<Outcome> {
    spawn(cache, spec, initrd, run)?.wait()
}

/// A running guest. Dropping it kills QEMU (a harness error never leaves a
/// TCG guest burning both cores).
pub struct Running {
    waiter: Option<std::thread::JoinHandle<()>>,
    rx: std::sync::mpsc::Receiver<std::io::Result<std::process::ExitStatus>>,
    status: Option<std::process::ExitStatus>,
    pid: u32,
    t0: Instant,
    host_timeout: Duration,
    console: PathBuf,
}

/// Starts QEMU for `spec` and returns at once.
pub fn spawn(cache: &Cache, spec: &GuestSpec, initrd: &Path, run: &Path) -> Result<Running> {
    let mut cmd = Command::new(&cache.qemu);
    for (k, v) in &cache.qemu_env {
        cmd.env(k, v);
    }
    for fw in &cache.qemu_firmware {
        cmd.arg("-L").arg(fw);
    }
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m"])
        .arg(spec.mem_mib.to_string())
        .args(["-display", "none", "-monitor", "none", "-no-reboot"]);
    if spec.net {
        // Slirp: the guest is 10.0.2.15, the host's 127.0.0.1 is 10.0.2.2.
        // romfile= : no PXE option ROM needed (and none in the unpacked QEMU).
        cmd.args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]);
    } else {
        cmd.args(["-nic", "none"]);
    }
    cmd.arg("-kernel")
        .arg(&cache.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 loglevel=4 vmh.wd={} {}",
            spec.guest_watchdog, spec.cmdline
        ));
    for log in ["console", "agent", "helper", "dmesg"] {
        cmd.arg("-serial").arg(format!(
            "file:{}",
            run.join(format!("{log}{}.log", spec.log_suffix)).display()
        ));
    }
    for (name, size) in &spec.disks {
        let p = run.join(name);
        if spec.fresh_disks || !p.exists() {
            let f = std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))?;
            f.set_len(*size)?;
        }
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=writeback",
            p.display()
        ));
    }
    let qlog = std::fs::File::create(run.join(format!("qemu{}.log", spec.log_suffix)))?;
    cmd.stdin(Stdio::null())
        .stdout(qlog.try_clone()?)
        .stderr(qlog);
    std::fs::write(
        run.join(format!("qemu{}.cmdline", spec.log_suffix)),
        format!("{cmd:?}\n"),
    )?;
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", cache.qemu.display()))?;
    let pid = child.id();
    // A thread owns the wait so the host timeout is a channel deadline, not polling.
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let r = child.wait();
        let _ = tx.send(r);
    });
    Ok(Running {
        waiter: Some(waiter),
        rx,
        status: None,
        pid,
        t0,
        host_timeout: Duration::from_secs(spec.host_timeout),
        console: spec.console(run),
    })
}

impl Running {
    /// The console log so far.
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// True once QEMU has exited (non-blocking).
    pub fn exited(&mut self) -> bool {
        if self.status.is_some() {
            return true;
        }
        match self.rx.try_recv() {
            Ok(r) => {
                self.status =
                    Some(r.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(-1)));
                true
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => false,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => true,
        }
    }

    /// SIGKILL QEMU (power loss of the guest) and reap it.
    pub fn kill(&mut self) {
        if !self.exited() {
            // SAFETY: kill(2) on the QEMU child we started; its pid is not reaped yet (the waiter holds it).
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            if let Ok(r) = self.rx.recv() {
                self.status = r.ok();
            }
        }
        if let Some(w) = self.waiter.take() {
            let _ = w.join();
        }
    }

    /// Waits for QEMU to exit (or the host timeout, then kills it) and reads
    /// the verdict from the console log.
    pub fn wait(mut self) -> Result<Outcome> {
        let left = self.host_timeout.saturating_sub(self.t0.elapsed());
        let status = match self.status.take() {
            Some(s) => Some(s),
            None => match self.rx.recv_timeout(left) {
                Ok(r) => Some(r?),
                Err(_) => {
                    self.kill();
                    None
                }
            },
        };
        if let Some(w) = self.waiter.take() {
            let _ = w.join();
        }
        let wall = self.t0.elapsed();
        let console = self.console_text();
        Ok(verdict(&console, status, wall, self.host_timeout.as_secs()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The verdict in a console log.
pub fn verdict(
    console: &str,
    status: Option<std::process::ExitStatus>,
    wall: Duration,
    host_timeout: u64,
) -> Outcome {
    let verdict = console.lines().find_map(|l| {
        l.split_once("VMH-RESULT ")
            .map(|(_, r)| r.trim().to_owned())
    });
    // Uptime of the "verdict" line printed just before VMH-RESULT.
    let guest_secs = console
        .lines()
        .filter_map(|l| {
            l.strip_prefix("VMH ")
                .and_then(|r| r.strip_suffix(" verdict"))
        })
        .find_map(|s| s.trim().parse().ok());
    match (verdict, status) {
        (Some(v), _) => {
            let pass = v.starts_with("PASS");
            let reason = v
                .split_once(' ')
                .map_or(String::new(), |(_, r)| r.to_owned());
            Outcome {
                pass,
                reason,
                wall,
                guest_secs,
            }
        }
        (None, None) => Outcome {
            pass: false,
            reason: format!("host timeout: QEMU killed after {host_timeout} s without a verdict"),
            wall,
            guest_secs,
        },
        (None, Some(st)) => Outcome {
            pass: false,
            reason: format!("QEMU exited ({st}) without a verdict (see console.log, qemu.log)"),
            wall,
            guest_secs,
        },
    }
}
