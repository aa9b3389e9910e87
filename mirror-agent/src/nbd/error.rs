//! The NBD layer's error type: configuration errors from
//! [`NbdServer::new`](super::NbdServer::new) and the listener helpers, and the
//! reason a connection was closed (logged once per connection, returned by
//! [`NbdServer::serve_stream`](super::NbdServer::serve_stream)).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::proto::BadRequestMagic;

/// Errors of the NBD server layer.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The export list or limits are inconsistent.
    #[error("invalid NBD configuration: {0}")]
    Config(String),

    /// The unix socket path exists and is not a socket; it is never removed.
    #[error(
        "refusing to replace {path}: it exists and is not a socket (file type bits {mode:#o})"
    )]
    NotASocket {
        /// The path given to the listener helper.
        path: PathBuf,
        /// `st_mode & S_IFMT` of what is there.
        mode: u32,
    },

    /// Creating or configuring a listener failed.
    #[error("{what} {target}: {source}")]
    Listen {
        /// The step that failed (`"bind"`, `"chmod"`, ...).
        what: &'static str,
        /// Socket path or address.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Socket I/O failed (reset, broken pipe, ...).
    #[error("connection I/O error during {phase}: {source}")]
    Io {
        /// What the server was doing.
        phase: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The client closed the connection in the middle of a message.
    #[error(
        "client closed the connection in the middle of {what} (got {got} of {expected} bytes)"
    )]
    Truncated {
        /// Which message was cut.
        what: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes the message needed.
        expected: usize,
    },

    /// The client did not finish the handshake in time.
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),

    /// The client set client flags that the server did not offer.
    #[error("client flags {flags:#010x} contain unknown bits {unknown:#010x}")]
    BadClientFlags {
        /// Flags the client sent.
        flags: u32,
        /// Bits the server does not know.
        unknown: u32,
    },

    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic: expected {expected:#018x}, got {actual:#018x}")]
    BadOptionMagic {
        /// `IHAVEOPT`.
        expected: u64,
        /// What the client sent.
        actual: u64,
    },

    /// An option announced more data than the server accepts.
    #[error("option {option} announces {length} bytes of data, above the bound of {bound}")]
    OptionTooLong {
        /// Option number.
        option: u32,
        /// Announced length.
        length: u32,
        /// `Limits::max_option_len`.
        bound: u32,
    },

    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (the option
    /// cannot carry an error, so the protocol requires closing).
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),

    /// A transmission request did not start with the request magic.
    #[error(transparent)]
    BadRequestMagic(#[from] BadRequestMagic),

    /// A write announced a payload too large to skip safely.
    #[error(
        "write at offset {offset} announces a {length}-byte payload, above the bound of {bound}"
    )]
    PayloadTooLarge {
        /// Request offset.
        offset: u64,
        /// Announced length.
        length: u32,
        /// Largest payload the server reads or skips.
        bound: u32,
    },

    /// The server is shutting down and closed the connection.
    #[error("server shutting down")]
    Shutdown,

    /// The shutdown grace period ran out while the client still held the connection.
    #[error("shutdown grace period of {0:?} expired")]
    ShutdownGraceExpired(Duration),
}
