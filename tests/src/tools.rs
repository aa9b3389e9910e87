//! External tools: skip loudly when one is missing on a developer machine,
//! fail in CI (`NBD_MIRROR_REQUIRE_TOOLS=1`, set by `test.sh`).

use std::io::Write;
use std::path::PathBuf;

/// True when every tool must be present (`NBD_MIRROR_REQUIRE_TOOLS=1`).
pub fn tools_required() -> bool {
    std::env::var("NBD_MIRROR_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// The Debian package that ships `tool` (as `test.sh` installs it).
pub fn package_of(tool: &str) -> &'static str {
    match tool {
        "nbdinfo" | "nbdcopy" | "nbdfuse" | "nbdsh" => "libnbd-bin",
        "nbdkit" => "nbdkit",
        "fio" => "fio",
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "mkfs.ext4" | "e2fsck" => "e2fsprogs",
        "losetup" | "mount" | "umount" => "mount",
        "fusermount3" => "fuse3",
        "sha256sum" | "sync" => "coreutils",
        "nft" => "nftables",
        "ip" => "iproute2",
        "prlimit" => "util-linux",
        _ => "(unknown package)",
    }
}

/// Full path of `tool` on `PATH` (plus the sbin directories, which a
/// non-login root shell may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn skip_or_panic(what: &str, install: &str) -> bool {
    if tools_required() {
        panic!("{what}, and NBD_MIRROR_REQUIRE_TOOLS=1 forbids skipping: {install}");
    }
    // Written to the stderr handle, not with eprintln!, so that the test
    // harness's output capture does not hide it for a "passing" test.
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {test}: {what} ({install}; set NBD_MIRROR_REQUIRE_TOOLS=1 to make this a failure)"
    );
    false
}

/// True if `tool` is installed. Otherwise panics when tools are required,
/// else prints a loud `SKIPPED:` line and returns false (the caller returns).
pub fn require_tool(tool: &str) -> bool {
    if which(tool).is_some() {
        return true;
    }
    skip_or_panic(
        &format!("{tool} is not installed"),
        &format!("install the Debian package {}", package_of(tool)),
    )
}

/// [`require_tool`] for several tools; reports every missing one.
pub fn require_tools(tools: &[&str]) -> bool {
    let mut ok = true;
    for t in tools {
        ok &= require_tool(t);
    }
    ok
}

/// True if running as root with the devices a test needs (`/dev/fuse`,
/// `/dev/loop-control`, ...). Otherwise the same skip/panic rule as tools.
pub fn require_root(what: &str, devices: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return skip_or_panic(
            &format!("{what} needs root (running as uid {euid})"),
            "run the tests as root",
        );
    }
    for d in devices {
        if !std::path::Path::new(d).exists() {
            return skip_or_panic(
                &format!("{what} needs {d}"),
                "load the module / give the container the device",
            );
        }
    }
    true
}
