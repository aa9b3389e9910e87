//! Locating the workspace binaries the tests drive.
//!
//! Cargo puts a test executable in `target/<profile>/deps/`; the binaries of
//! the same build are in `target/<profile>/`. The tests never build them
//! themselves (that would race with the shared target dir), so a missing
//! binary is a clear panic telling what to run.

use std::path::PathBuf;

/// Directory holding the workspace binaries of the current profile.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NBD_MIRROR_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("cannot determine the test executable's path");
    let mut dir = exe
        .parent()
        .expect("test executable has no parent directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of the workspace binary `name` (`mirror-agent`, `mdctrl`).
///
/// # Panics
/// When it has not been built for this profile.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: run `cargo build --release --workspace --bins` first \
         (the tests use the binaries next to the test executable, in {}; \
         NBD_MIRROR_BIN_DIR overrides)",
        p.display(),
        bin_dir().display()
    );
    p
}

/// The agent binary.
pub fn mirror_agent() -> PathBuf {
    bin("mirror-agent")
}

/// The operator command.
pub fn mdctrl() -> PathBuf {
    bin("mdctrl")
}
