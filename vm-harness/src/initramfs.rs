//! The guest's initramfs: an in-memory list of entries (directories, files,
//! symlinks) written as a `newc` cpio archive and compressed with `gzip -1`.
//!
//! Binaries are added with the libraries `ldd` lists (resolved against the
//! package cache first), kernel modules with their dependency closure from
//! `modules.dep`, in load order.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cache::Cache;

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// The archive being assembled, keyed by path inside the guest (no leading `/`).
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

fn rel(p: &str) -> String {
    p.trim_start_matches('/').to_owned()
}

impl Initramfs {
    /// A tree with the usual top-level directories.
    pub fn new() -> Self {
        let mut i = Initramfs::default();
        for d in [
            "bin",
            "sbin",
            "etc",
            "proc",
            "sys",
            "dev",
            "mnt",
            "tmp",
            "run",
            "lib64",
            "lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu",
            "usr/bin",
            "usr/sbin",
            "lib/modules",
            "root",
        ] {
            i.dir(d);
        }
        i
    }

    /// A directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let mut cur = String::new();
        for part in rel(path).split('/').filter(|s| !s.is_empty()) {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            self.entries.entry(cur.clone()).or_insert(Entry::Dir);
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((p, _)) = rel(path).rsplit_once('/') {
            self.dir(p);
        }
    }

    /// A file with `data`.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.parent(path);
        self.entries.insert(
            rel(path),
            Entry::File {
                data: data.into(),
                mode,
            },
        );
    }

    /// A copy of host file `src` (symlinks followed).
    pub fn file(&mut self, path: &str, src: &Path, mode: u32) -> Result<()> {
        let data = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
        self.bytes(path, data, mode);
        Ok(())
    }

    /// A symlink.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.entries
            .insert(rel(path), Entry::Symlink(target.to_owned()));
    }

    /// A dynamically linked program at `dest` plus every library `ldd`
    /// lists, placed where the dynamic loader looks (the host path, with the
    /// cache root prefix removed for libraries unpacked there). `strip`
    /// drops debug info first (our release binaries carry `debug = 1`).
    pub fn program(&mut self, cache: &Cache, src: &Path, dest: &str, strip: bool) -> Result<()> {
        if strip {
            let tmp = std::env::temp_dir().join(format!(
                "vmh-strip-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            let st = Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&tmp)
                .arg(src)
                .status()
                .context("run strip")?;
            if !st.success() {
                bail!("strip {} failed", src.display());
            }
            let r = self.file(dest, &tmp, 0o755);
            let _ = std::fs::remove_file(&tmp);
            r?;
        } else {
            self.file(dest, src, 0o755)?;
        }
        let out = Command::new("ldd")
            .arg(src)
            .env("LD_LIBRARY_PATH", cache.lib_path())
            .output()
            .context("run ldd")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(());
        }
        for line in text.lines() {
            let line = line.trim();
            if line.contains("not found") {
                bail!("{}: library missing: {line}", src.display());
            }
            let lib = match line.split_once(" => ") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
            };
            let Some(lib) = lib.filter(|l| l.starts_with('/')) else {
                continue;
            };
            let host = PathBuf::from(lib);
            let inside = host
                .strip_prefix(&cache.root)
                .map(|p| format!("/{}", p.display()))
                .unwrap_or_else(|_| lib.to_owned());
            if !self.entries.contains_key(&rel(&inside)) {
                self.file(&inside, &host, 0o755)?;
            }
        }
        Ok(())
    }

    /// Kernel modules `want` (names as in `lsmod`) and their dependencies;
    /// writes `/lib/modules/load-order` (one path per line, dependencies first).
    pub fn modules(&mut self, cache: &Cache, want: &[&str]) -> Result<Vec<String>> {
        let mdir = cache.root.join("lib/modules").join(&cache.kver);
        let depfile = mdir.join("modules.dep");
        let text = std::fs::read_to_string(&depfile)
            .with_context(|| format!("read {}", depfile.display()))?;
        let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut by_name: BTreeMap<String, String> = BTreeMap::new();
        for line in text.lines() {
            let Some((m, d)) = line.split_once(':') else {
                continue;
            };
            let m = m.trim().to_owned();
            let name = Path::new(&m)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let name = name
                .split(".ko")
                .next()
                .unwrap_or_default()
                .replace('-', "_");
            by_name.insert(name, m.clone());
            deps.insert(m, d.split_whitespace().map(str::to_owned).collect());
        }
        fn visit(m: &str, deps: &BTreeMap<String, Vec<String>>, order: &mut Vec<String>) {
            if order.iter().any(|o| o == m) {
                return;
            }
            // modules.dep lists the full closure; the last entries load first.
            for d in deps.get(m).into_iter().flatten().rev() {
                visit(d, deps, order);
            }
            if !order.iter().any(|o| o == m) {
                order.push(m.to_owned());
            }
        }
        let mut order = Vec::new();
        for w in want {
            let m = by_name
                .get(&w.replace('-', "_"))
                .with_context(|| format!("module {w} not in {}", depfile.display()))?;
            visit(m, &deps, &mut order);
        }
        for m in &order {
            self.file(&format!("/lib/modules/{m}"), &mdir.join(m), 0o644)?;
        }
        self.bytes("/lib/modules/load-order", order.join("\n") + "\n", 0o644);
        Ok(order)
    }

    /// Writes the archive, gzip-compressed, to `out`.
    pub fn write(&self, out: &Path) -> Result<u64> {
        let mut cpio = Vec::with_capacity(64 << 20);
        let mut ino = 1u32;
        let mut put = |name: &str, mode: u32, data: &[u8]| {
            let hdr = format!(
                "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
                ino,
                mode,
                0,
                0,
                1,
                0,
                data.len(),
                0,
                0,
                0,
                0,
                name.len() + 1,
                0
            );
            ino += 1;
            cpio.extend_from_slice(hdr.as_bytes());
            cpio.extend_from_slice(name.as_bytes());
            cpio.push(0);
            while cpio.len() % 4 != 0 {
                cpio.push(0);
            }
            cpio.extend_from_slice(data);
            while cpio.len() % 4 != 0 {
                cpio.push(0);
            }
        };
        for (name, e) in &self.entries {
            match e {
                Entry::Dir => put(name, 0o040755, &[]),
                Entry::File { data, mode } => put(name, 0o100000 | mode, data),
                Entry::Symlink(t) => put(name, 0o120777, t.as_bytes()),
            }
        }
        put("TRAILER!!!", 0, &[]);
        let f = std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
        let mut gz = Command::new("gzip")
            .arg("-1")
            .stdin(Stdio::piped())
            .stdout(f)
            .spawn()
            .context("run gzip")?;
        gz.stdin
            .take()
            .context("gzip stdin")?
            .write_all(&cpio)
            .context("write to gzip")?;
        if !gz.wait()?.success() {
            bail!("gzip failed");
        }
        Ok(std::fs::metadata(out)?.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_readable_by_busybox_or_cpio() {
        let d = std::env::temp_dir().join(format!("vmh-cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let mut i = Initramfs::new();
        i.bytes("/etc/hello", "hi\n", 0o644);
        i.symlink("/bin/sh", "busybox");
        let out = d.join("a.cpio.gz");
        i.write(&out).unwrap();
        // gzip -t proves the compression; listing with `gzip -dc | cpio -t` needs cpio, often absent.
        assert!(Command::new("gzip")
            .arg("-t")
            .arg(&out)
            .status()
            .unwrap()
            .success());
        let raw = Command::new("gzip")
            .arg("-dc")
            .arg(&out)
            .output()
            .unwrap()
            .stdout;
        let s = String::from_utf8_lossy(&raw);
        assert!(s.contains("etc/hello") && s.contains("TRAILER!!!"));
        assert_eq!(raw.len() % 4, 0);
        let _ = std::fs::remove_dir_all(&d);
    }
}
