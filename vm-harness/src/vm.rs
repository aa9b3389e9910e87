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
    i.dir("/mnt/md1");
    i.dir("/run/md");
    let out = run.join("initramfs.cpio.gz");
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
    let mut cmd = Command::new(&cache.qemu);
    for (k, v) in &cache.qemu_env {
        cmd.env(k, v);
    }
    for fw in &cache.qemu_firmware {
        cmd.arg("-L").arg(fw);
    }
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m"])
        .arg(spec.mem_mib.to_string())
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&cache.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 loglevel=4 vmh.wd={} {}",
            spec.guest_watchdog, spec.cmdline
        ));
    for log in ["console.log", "agent.log", "helper.log", "dmesg.log"] {
        cmd.arg("-serial")
            .arg(format!("file:{}", run.join(log).display()));
    }
    for (name, size) in &spec.disks {
        let p = run.join(name);
        let f = std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))?;
        f.set_len(*size)?;
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=writeback",
            p.display()
        ));
    }
    let qlog = std::fs::File::create(run.join("qemu.log"))?;
    cmd.stdin(Stdio::null())
        .stdout(qlog.try_clone()?)
        .stderr(qlog);
    std::fs::write(run.join("qemu.cmdline"), format!("{cmd:?}\n"))?;
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
    let status = match rx.recv_timeout(Duration::from_secs(spec.host_timeout)) {
        Ok(r) => Some(r?),
        Err(_) => {
            // SAFETY: kill(2) on the QEMU child we started; its pid is not reaped yet (the waiter holds it).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            None
        }
    };
    let _ = waiter.join();
    let wall = t0.elapsed();
    let console = std::fs::read_to_string(run.join("console.log")).unwrap_or_default();
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
    let outcome = match (verdict, status) {
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
            reason: format!(
                "host timeout: QEMU killed after {} s without a verdict",
                spec.host_timeout
            ),
            wall,
            guest_secs,
        },
        (None, Some(st)) => Outcome {
            pass: false,
            reason: format!("QEMU exited ({st}) without a verdict (see console.log, qemu.log)"),
            wall,
            guest_secs,
        },
    };
    Ok(outcome)
}
