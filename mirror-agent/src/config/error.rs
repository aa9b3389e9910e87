//! [`ConfigError`]: the one error type of the config layer. Every variant
//! names the config file, the key path (`resource.md1.size`,
//! `resource[0].server.server3`, `server.server2.control_port`) and what was
//! expected, so an operator can fix the file without reading the source.

use std::io;
use std::path::PathBuf;

/// Everything that can be wrong with a cluster configuration or the files it
/// points at.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file itself could not be read.
    #[error("{}: cannot read config file: {source}", file.display())]
    Read {
        /// The config file.
        file: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// TOML syntax error, or a value of the wrong TOML type, as reported by
    /// the TOML parser (with line and column).
    #[error("{}:{line}:{column}: {key}: {message}", file.display())]
    Syntax {
        /// The config file.
        file: PathBuf,
        /// Key path of the innermost table (or key) the error is in.
        key: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },

    /// A key that the format does not define (often a typo).
    #[error("{}:{line}:{column}: unknown key `{key}`; expected one of: {expected}", file.display())]
    UnknownKey {
        /// The config file.
        file: PathBuf,
        /// Full key path of the unknown key.
        key: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The keys that are allowed at that place.
        expected: String,
    },

    /// A required key is absent.
    #[error("{}: missing key `{key}`: expected {expected}", file.display())]
    MissingKey {
        /// The config file.
        file: PathBuf,
        /// Full key path.
        key: String,
        /// What should be there.
        expected: String,
    },

    /// A value that does not parse or is out of range (bad size string,
    /// region size not a power of two, unknown mode, port 0, ...).
    #[error("{}: `{key}` = {value}: expected {expected}", file.display())]
    InvalidValue {
        /// The config file.
        file: PathBuf,
        /// Full key path.
        key: String,
        /// The offending value, as written (quoted when it was a string).
        value: String,
        /// What was expected, and why the value is not it.
        expected: String,
    },

    /// Two servers, or two resources, with the same name.
    #[error("{}: duplicate {kind} name \"{name}\" (`{first}` and `{second}`): expected each {kind} name once", file.display())]
    DuplicateName {
        /// The config file.
        file: PathBuf,
        /// `"server"` or `"resource"`.
        kind: &'static str,
        /// The repeated name.
        name: String,
        /// Key path of the first declaration.
        first: String,
        /// Key path of the second declaration.
        second: String,
    },

    /// Two listeners would bind the same address and port.
    #[error("{}: port {port} on {address} is used twice (`{first}` and `{second}`): expected a distinct port for every listener on one address", file.display())]
    DuplicatePort {
        /// The config file.
        file: PathBuf,
        /// The address both listen on.
        address: String,
        /// The port.
        port: u16,
        /// Key path of the first listener.
        first: String,
        /// Key path of the second listener.
        second: String,
    },

    /// Two things on one machine would use the same file, device or socket.
    #[error("{}: path {} is used twice on one machine (`{first}` and `{second}`): expected distinct paths", file.display(), path.display())]
    DuplicatePath {
        /// The config file.
        file: PathBuf,
        /// The resolved path.
        path: PathBuf,
        /// Key path of the first use.
        first: String,
        /// Key path of the second use.
        second: String,
    },

    /// A resource names a server that no `[[server]]` declares.
    #[error("{}: `{key}`: server \"{name}\" is not declared; expected one of the declared servers: {declared}", file.display())]
    UndeclaredServer {
        /// The config file.
        file: PathBuf,
        /// Key path of the resource's server section.
        key: String,
        /// The undeclared server name.
        name: String,
        /// The declared server names, comma separated.
        declared: String,
    },

    /// The number of `[[server]]` tables is not 1 or 2.
    #[error("{}: `server`: {count} servers declared; expected 1 (standalone) or 2 (mirrored pair)", file.display())]
    ServerCount {
        /// The config file.
        file: PathBuf,
        /// How many there are.
        count: usize,
    },

    /// The node this process runs as is not one of the declared servers.
    #[error("{}: this node is \"{node}\", which is not a declared server; expected one of: {declared} (pass --node NAME)", file.display())]
    UnknownNode {
        /// The config file.
        file: PathBuf,
        /// The node name asked for.
        node: String,
        /// The declared server names, comma separated.
        declared: String,
    },

    /// The secret is needed (a peer exists) but `cluster.secret_file` is not set.
    #[error("{}: missing key `cluster.secret_file`: expected the path of the shared secret file (required when two servers are declared)", file.display())]
    NoSecret {
        /// The config file.
        file: PathBuf,
    },

    /// The secret file could not be read.
    #[error("{}: `cluster.secret_file`: cannot read {}: {source}", file.display(), path.display())]
    SecretUnreadable {
        /// The config file.
        file: PathBuf,
        /// The secret file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The secret file is empty (after removing a trailing newline).
    #[error("{}: `cluster.secret_file`: {} is empty; expected a shared secret (e.g. 32 random bytes)", file.display(), path.display())]
    SecretEmpty {
        /// The config file.
        file: PathBuf,
        /// The secret file.
        path: PathBuf,
    },

    /// A `[cluster.tls]` file is unusable: unreadable, not PEM, no certificate or key in it,
    /// expired, not valid for this node's name, key not matching the certificate, ...
    #[error("{}: `{key}`: {}: {problem}", file.display(), path.display())]
    Tls {
        /// The config file.
        file: PathBuf,
        /// `cluster.tls.cert`, `cluster.tls.key` or `cluster.tls.ca`.
        key: &'static str,
        /// The file that is wrong.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// The secret file can be read by every user of the machine.
    #[error("{}: `cluster.secret_file`: {} has mode {mode:04o} (readable by others); expected no access for others (chmod 600 or 640)", file.display(), path.display())]
    SecretPermissions {
        /// The config file.
        file: PathBuf,
        /// The secret file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}
