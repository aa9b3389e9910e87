//! The shared secret of the cluster (`cluster.secret_file`), read on demand.
//!
//! A secret readable by every user of the machine is an error, not a
//! warning: anyone who has it can impersonate the peer and write to the
//! mirror. Group access is allowed (the admin group may need it).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::ConfigError;

/// Largest secret file accepted; bounds the allocation before reading.
pub const MAX_SECRET_LEN: u64 = 64 << 10;

/// The shared secret bytes. `Debug` does not print them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The secret.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A secret from bytes, for tests and fuzzing (the agent reads it from its file).
    pub(crate) fn from_bytes(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort: do not leave the secret in freed memory.
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

pub(super) fn read(config_file: &Path, path: &Path) -> Result<Secret, ConfigError> {
    let unreadable = |source| ConfigError::SecretUnreadable {
        file: config_file.to_path_buf(),
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(unreadable)?;
    let meta = f.metadata().map_err(unreadable)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(ConfigError::SecretPermissions {
            file: config_file.to_path_buf(),
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > MAX_SECRET_LEN {
        return Err(ConfigError::InvalidValue {
            file: config_file.to_path_buf(),
            key: "cluster.secret_file".into(),
            value: format!("\"{}\" ({} bytes)", path.display(), meta.len()),
            expected: format!("a secret file of at most {MAX_SECRET_LEN} bytes"),
        });
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // `take` bounds the read even if the file grows after the fstat.
    (&mut f)
        .take(MAX_SECRET_LEN)
        .read_to_end(&mut buf)
        .map_err(unreadable)?;
    if buf.ends_with(b"\r\n") {
        buf.truncate(buf.len() - 2);
    } else if buf.ends_with(b"\n") {
        buf.truncate(buf.len() - 1);
    }
    if buf.is_empty() {
        return Err(ConfigError::SecretEmpty {
            file: config_file.to_path_buf(),
            path: path.to_path_buf(),
        });
    }
    Ok(Secret(buf))
}
