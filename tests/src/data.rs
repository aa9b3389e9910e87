//! Test data: reproducible random images with zero holes, byte-exact file
//! comparison naming the first difference, pattern checks on file ranges.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::{RngCore, SeedableRng};

/// A seed for this test run: `NBD_MIRROR_SEED` or random; printed so a
/// failure can be reproduced.
pub fn seed(what: &str) -> u64 {
    let s = std::env::var("NBD_MIRROR_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{what}: seed {s} (NBD_MIRROR_SEED={s} reproduces)");
    s
}

/// Writes `size` bytes of random data to `path`, with zero holes: every
/// fourth MiB is all zero, and a few unaligned zero runs inside random MiBs
/// (so clients that detect zeroes/sparseness take both paths).
pub fn random_image(path: &Path, size: u64, seed: u64) {
    const MIB: usize = 1 << 20;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let mut buf = vec![0u8; MIB];
    let mut written = 0u64;
    let mut i = 0u64;
    while written < size {
        let n = (size - written).min(MIB as u64) as usize;
        let chunk = &mut buf[..n];
        if i % 4 == 3 {
            chunk.fill(0);
        } else {
            rng.fill_bytes(chunk);
            if i % 4 == 1 && n > 8192 {
                // An unaligned zero run inside random data.
                let start = 1000 + (rng.next_u32() as usize % (n / 2));
                let len = (5000 + rng.next_u32() as usize % 60_000).min(n - start);
                chunk[start..start + len].fill(0);
            }
        }
        f.write_all(chunk).expect("writing image");
        written += n as u64;
        i += 1;
    }
    f.sync_all().expect("syncing image");
}

/// Random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Asserts that the first `len` bytes of `a` and `b` are identical (`len`
/// `None` = whole files, which must have the same size); names the first
/// differing offset.
pub fn assert_files_equal(a: &Path, b: &Path, len: Option<u64>) {
    let fa = std::fs::File::open(a).unwrap_or_else(|e| panic!("opening {}: {e}", a.display()));
    let fb = std::fs::File::open(b).unwrap_or_else(|e| panic!("opening {}: {e}", b.display()));
    let la = fa.metadata().expect("metadata").len();
    let lb = fb.metadata().expect("metadata").len();
    let len = match len {
        Some(l) => {
            assert!(
                la >= l && lb >= l,
                "{} ({la} bytes) or {} ({lb} bytes) is shorter than {l}",
                a.display(),
                b.display()
            );
            l
        }
        None => {
            assert_eq!(
                la,
                lb,
                "sizes differ: {} has {la} bytes, {} has {lb}",
                a.display(),
                b.display()
            );
            la
        }
    };
    const CHUNK: usize = 1 << 20;
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        fa.read_exact_at(&mut ba[..n], off).expect("reading");
        fb.read_exact_at(&mut bb[..n], off).expect("reading");
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at offset {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                off + i as u64,
                ba[i],
                bb[i]
            );
        }
        off += n as u64;
    }
}

/// Reads `len` bytes at `offset` of `path`.
pub fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset)
        .unwrap_or_else(|e| panic!("reading {len} bytes at {offset} of {}: {e}", path.display()));
    v
}

/// Asserts that `len` bytes at `offset` of `path` are all `byte`.
pub fn assert_range_is(path: &Path, offset: u64, len: usize, byte: u8) {
    let v = read_range(path, offset, len);
    if let Some(i) = v.iter().position(|&b| b != byte) {
        panic!(
            "{}: byte at offset {} is {:#04x}, expected {byte:#04x} (range {offset}+{len})",
            path.display(),
            offset + i as u64,
            v[i]
        );
    }
}

/// Overwrites `len` bytes at `offset` of `path` with `byte` (and syncs).
pub fn overwrite(path: &Path, offset: u64, len: usize, byte: u8) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.write_all_at(&vec![byte; len], offset)
        .expect("overwriting");
    f.sync_all().expect("sync");
}

/// SHA-256 of a file, hex, via `sha256sum` (an independent implementation).
pub fn sha256(path: &Path) -> String {
    let out = crate::run::run_ok(
        std::process::Command::new("sha256sum").arg(path),
        crate::run::CMD_TIMEOUT,
    );
    crate::run::stdout(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
