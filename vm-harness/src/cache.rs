//! The package cache: Debian packages downloaded with `apt-get download` and
//! unpacked with `dpkg -x` into `CACHE/root`, reused by later runs.
//!
//! Contents: the current `linux-image-amd64` kernel (its versioned package),
//! `busybox-static`, `nbd-client` (+ `libnl-genl-3-200`), `e2fsprogs`, and —
//! when the host has no `qemu-system-x86_64` — QEMU itself with the
//! libraries `apt-get install -s --no-install-recommends qemu-system-x86`
//! says it would install. QEMU is deliberately *not* installed on the host:
//! on Debian 12 with the backported `qemu-utils` 10 that would remove
//! `qemu-utils` (and `qemu-img`) in favour of 7.2. The unpacked QEMU runs with
//! `LD_LIBRARY_PATH` into the cache and `-L` for its firmware.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// What the cache provides to the rest of the harness.
#[derive(Debug, Clone)]
pub struct Cache {
    /// The cache directory.
    pub dir: PathBuf,
    /// Where the packages are unpacked.
    pub root: PathBuf,
    /// Kernel version string (`6.1.0-56-amd64`).
    pub kver: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Extra environment and arguments to run it.
    pub qemu_env: Vec<(String, String)>,
    /// `-L` firmware directories.
    pub qemu_firmware: Vec<PathBuf>,
}

/// `$VMH_CACHE`, else `~/.cache/nbd-mirror-vmh`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMH_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/nbd-mirror-vmh")
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let o = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !o.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// The versioned kernel package `linux-image-amd64` currently depends on.
fn kernel_package() -> Result<String> {
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_owned)
        .context("apt-cache depends linux-image-amd64 names no linux-image-*-amd64 package")
}

/// Packages `apt-get install -s --no-install-recommends PKG` would install.
fn simulated_installs(pkg: &str) -> Result<Vec<String>> {
    let sim =
        output(Command::new("apt-get").args(["install", "-s", "--no-install-recommends", pkg]))?;
    Ok(sim
        .lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Makes sure every package is downloaded and unpacked; returns the cache.
pub fn prepare(dir: &Path) -> Result<Cache> {
    let root = dir.join("root");
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("create {}", debs.display()))?;
    let stamp = dir.join("packages.done");
    let host_qemu = which("qemu-system-x86_64");
    if !stamp.exists() {
        let kpkg = kernel_package()?;
        let mut pkgs: Vec<String> = [
            kpkg.as_str(),
            "busybox-static",
            "nbd-client",
            "libnl-genl-3-200",
            "e2fsprogs",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if host_qemu.is_none() {
            pkgs.extend(simulated_installs("qemu-system-x86")?);
            if !pkgs.iter().any(|p| p == "qemu-system-x86") {
                pkgs.push("qemu-system-x86".into());
            }
        }
        eprintln!(
            "vm-harness: downloading {} Debian packages into {}",
            pkgs.len(),
            debs.display()
        );
        output(
            Command::new("apt-get")
                .arg("download")
                .args(&pkgs)
                .current_dir(&debs),
        )?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        for e in std::fs::read_dir(&debs)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "deb") {
                output(Command::new("dpkg").arg("-x").arg(&p).arg(&root))?;
            }
        }
        let kver = find_kver(&root)?;
        // modules.dep is generated at install time, not shipped: make it with busybox depmod.
        output(
            Command::new(root.join("bin/busybox"))
                .args(["depmod", "-b"])
                .arg(&root)
                .arg(&kver),
        )?;
        std::fs::write(&stamp, format!("{}\n", pkgs.join("\n")))?;
    }
    let kver = find_kver(&root)?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{kver}"));
    let (qemu, qemu_env, qemu_firmware) = match host_qemu {
        Some(q) => (q, Vec::new(), Vec::new()),
        None => {
            let q = root.join("usr/bin/qemu-system-x86_64");
            if !q.exists() {
                bail!("no qemu-system-x86_64 on the host and none in the cache ({}); remove {} to re-download", q.display(), stamp.display());
            }
            let lib = format!(
                "{}:{}",
                root.join("usr/lib/x86_64-linux-gnu").display(),
                root.join("lib/x86_64-linux-gnu").display()
            );
            let fw = vec![
                root.join("usr/share/qemu"),
                root.join("usr/share/seabios"),
                root.join("usr/lib/ipxe/qemu"),
            ];
            (q, vec![("LD_LIBRARY_PATH".to_owned(), lib)], fw)
        }
    };
    Ok(Cache {
        dir: dir.to_owned(),
        root,
        kver,
        vmlinuz,
        qemu,
        qemu_env,
        qemu_firmware,
    })
}

fn find_kver(root: &Path) -> Result<String> {
    let m = root.join("lib/modules");
    let mut v: Vec<String> = std::fs::read_dir(&m)
        .with_context(|| format!("read {}", m.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with("-amd64"))
        .collect();
    v.sort();
    v.pop()
        .with_context(|| format!("no kernel modules under {}", m.display()))
}

impl Cache {
    /// `LD_LIBRARY_PATH` for resolving libraries of binaries unpacked here
    /// (the host's libraries come after).
    pub fn lib_path(&self) -> String {
        format!(
            "{}:{}",
            self.root.join("usr/lib/x86_64-linux-gnu").display(),
            self.root.join("lib/x86_64-linux-gnu").display()
        )
    }

    /// A binary from the unpacked packages (`sbin/mke2fs`, ...).
    pub fn bin(&self, rel: &str) -> Result<PathBuf> {
        for base in ["", "usr/"] {
            let p = self.root.join(format!("{base}{rel}"));
            if p.is_file() {
                return Ok(p);
            }
        }
        bail!("{rel} not found under {}", self.root.display())
    }

    /// `QEMU --version`, first line.
    pub fn qemu_version(&self) -> String {
        let mut c = Command::new(&self.qemu);
        c.arg("--version");
        for (k, v) in &self.qemu_env {
            c.env(k, v);
        }
        output(&mut c)
            .map(|s| s.lines().next().unwrap_or_default().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    }
}
