//! Cluster configuration: one TOML file describes the cluster (its servers,
//! its mirrored resources, the link timeouts). `docs/config.md` documents
//! every key with its default; this module is the single place that knows
//! the file format.
//!
//! Module map:
//!
//! - this file: the validated, resolved model ([`Config`], [`Cluster`],
//!   [`Server`], [`Resource`], [`ResourceNode`], [`Timeouts`], the enums)
//!   and its accessors; [`Config::load`] is the entry point.
//! - `raw`: serde structs mirroring the file (`deny_unknown_fields`
//!   everywhere) and the mapping of TOML parser errors (line, column, key
//!   path reconstructed from the error span).
//! - `build`: raw → model: defaults, unit parsing, path resolution against
//!   the config file's directory, and the cross-checks (declared servers,
//!   duplicate names, ports and paths).
//! - `units`: exact size (`"1.5GiB"`) and duration (`"500ms"`) parsing.
//! - `secret`: the shared secret, read lazily by [`Config::read_secret`] so
//!   that commands which do not talk to the peer work without it.
//! - `tls`: the `[cluster.tls]` files, read and checked by [`Config::read_tls`]
//!   when the peer links start ([`TlsMaterial`]).
//! - `example`: generators of valid configs ([`ExampleSpec`]) for the demo
//!   and the tests, with caller-chosen ports so parallel tests never clash.
//! - `error`: [`ConfigError`]; every variant names the file, the key path
//!   and what was expected.
//!
//! Everything in the model is already validated and resolved: sizes are
//! bytes (`u64`), durations are [`Duration`]s, paths are absolute.

mod build;
mod error;
mod example;
mod raw;
mod secret;
mod tls;
mod units;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use error::ConfigError;
pub use example::{free_loopback_ports, ExampleSpec};
pub use secret::Secret;
pub use tls::{crypto_provider, TlsMaterial};
pub use units::{format_duration, format_size, parse_duration, parse_size};

/// Where the agent and `mdctrl` look for the config when not told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nbd-mirror/cluster.toml";

/// Default `control_port` of a server (the ancestor's mirror agent port).
pub const DEFAULT_CONTROL_PORT: u16 = 29004;

/// `mirror_port` of resource number `i` (0-based, file order) defaults to
/// `DEFAULT_MIRROR_PORT_BASE + i`.
pub const DEFAULT_MIRROR_PORT_BASE: u16 = 29051;

/// The host name of this machine: the default node name, so that the same
/// config file can be installed unchanged on both nodes.
///
/// Falls back to `/proc/sys/kernel/hostname`, then to `"localhost"`, so that
/// the caller always gets a name to look up (and [`Config::node_check`]
/// explains when it is not a declared server).
pub fn default_node_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a valid writable buffer of the length passed;
    // gethostname writes at most that many bytes and does not keep the pointer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast::<libc::c_char>(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..end]) {
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A validated cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was loaded from (absolute).
    pub path: PathBuf,
    /// The directory relative paths were resolved against.
    pub dir: PathBuf,
    /// `[cluster]`.
    pub cluster: Cluster,
    /// `[timeouts]` (defaults filled in).
    pub timeouts: Timeouts,
    /// The `[[server]]` tables, in file order (1 or 2).
    pub servers: Vec<Server>,
    /// The `[[resource]]` tables, in file order.
    pub resources: Vec<Resource>,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Cluster name (also tells two clusters' agents apart on the wire).
    pub name: String,
    /// Shared secret for peer authentication (absolute). Required when two
    /// servers are declared; read with [`Config::read_secret`].
    pub secret_file: Option<PathBuf>,
    /// TLS on the agent-to-agent links; `None` (the default) = plain TCP
    /// authenticated by the shared secret.
    pub tls: Option<Tls>,
    /// Group allowed to use the admin socket (mode 0660); `None` = 0600.
    pub admin_group: Option<String>,
}

/// `[cluster.tls]`: all three paths are required when the table is present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// This node's certificate chain (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// CA bundle the peer's certificate must chain to (PEM).
    pub ca: PathBuf,
}

/// `[timeouts]`: cluster-wide link timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing a TCP connection to the peer (control or mirror link).
    pub connect: Duration,
    /// One send on a link making no progress.
    pub send: Duration,
    /// Waiting for the peer's ack1 (received) / ack2 (written) of a write.
    pub ack: Duration,
    /// One receive (a frame started but not finished).
    pub receive: Duration,
    /// Interval between heartbeats on an idle link.
    pub heartbeat_interval: Duration,
    /// No frame at all from the peer for this long = link broken.
    pub heartbeat_timeout: Duration,
    /// Interval of the check that the cluster partition still takes writes
    /// (`ClusterPartition::check_writable`), on every node.
    pub metadata_check_interval: Duration,
    /// Requests pending on the data disk or the cluster partition with none
    /// completing for this long: the status shows the device as stalled.
    pub io_stall: Duration,
}

impl Default for Timeouts {
    /// DRBD/ancestor-like defaults; `docs/config.md` explains each.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            send: Duration::from_secs(30),
            ack: Duration::from_secs(30),
            receive: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(10),
            metadata_check_interval: Duration::from_secs(30),
            io_stall: Duration::from_secs(30),
        }
    }
}

/// One `[[server]]`: a node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Node name (by default the host name, see [`default_node_name`]).
    pub name: String,
    /// How the peer reaches this node (IP address or host name); the control
    /// and mirror listeners bind it.
    pub address: String,
    /// Address this node's control and mirror listeners bind (`listen_address`,
    /// default: [`Server::address`]). Differs from `address` only when
    /// something (a NAT, a test's fault proxy) sits between the nodes.
    pub listen_address: String,
    /// Agent-to-agent control port.
    pub control_port: u16,
    /// Admin socket (absolute) where `mdctrl` talks to this node's agent.
    pub admin_socket: PathBuf,
}

/// Replication mode of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// A write completes when the peer has written it (ack2).
    Sync,
    /// A write completes when the peer has received it (ack1).
    Semi,
    /// A write completes locally; shipping is queued (bounded by `async_queue`).
    Async,
}

/// `engine` of a resource: which local I/O engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineChoice {
    /// io_uring when the kernel supports it, else portable.
    Auto,
    /// io_uring or fail.
    IoUring,
    /// The portable thread-pool engine.
    Portable,
}

/// `direct_io` of a resource: O_DIRECT on the data path and cluster partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DirectIo {
    /// O_DIRECT when the backing accepts it (block devices, most file
    /// systems), buffered I/O plus fsync otherwise (e.g. tmpfs).
    Auto,
    /// O_DIRECT or fail.
    On,
    /// Buffered I/O (durability through fsync/fdatasync).
    Off,
}

macro_rules! keyword_enum {
    ($ty:ident, $expected:expr, $($variant:ident => $s:expr),+) => {
        impl $ty {
            /// The keyword as written in the config file.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $s),+ }
            }
            /// What the config file accepts, for error messages.
            pub const EXPECTED: &'static str = $expected;
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($ty::$variant),)+
                    _ => Err(format!("expected {}, found \"{}\"", $expected, s)),
                }
            }
        }
    };
}

keyword_enum!(Mode, "one of \"sync\", \"semi\", \"async\"", Sync => "sync", Semi => "semi", Async => "async");
keyword_enum!(EngineChoice, "one of \"auto\", \"io_uring\", \"portable\"", Auto => "auto", IoUring => "io_uring", Portable => "portable");
keyword_enum!(DirectIo, "one of \"auto\", \"on\", \"off\"", Auto => "auto", On => "on", Off => "off");

/// One `[[resource]]`: a mirrored (or standalone) block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Resource name.
    pub name: String,
    /// Position in the file (0-based); the default mirror port is
    /// [`DEFAULT_MIRROR_PORT_BASE`] + index.
    pub index: usize,
    /// Size used to create the data path when it does not exist yet
    /// (a multiple of 4096); `None` = the data path must exist.
    pub size: Option<u64>,
    /// Replication mode.
    pub mode: Mode,
    /// Bytes of data per bitmap bit: a power of two in 4KiB..=16MiB.
    pub region_size: u64,
    /// Resync automatically when the peer comes back (no operator needed
    /// unless both sides have been written: that needs a forced recovery).
    pub auto_recovery: bool,
    /// Async mode: bytes of writes queued for the peer before the mirror is
    /// broken (dirty regions then drive a resync instead).
    pub async_queue: u64,
    /// Resync bandwidth limit in bytes/s; `None` = unlimited.
    pub resync_rate: Option<u64>,
    /// Capacity, in hot extents, of the keep-dirty LRU (the activity log:
    /// extents left marked dirty on the cluster partition so that writes
    /// into them need no metadata write).
    pub keep_dirty: usize,
    /// Bytes per hot extent: a power of two from `region_size` up to 1 GiB
    /// (and at most 65536 regions). Default 4 MiB (or `region_size` if
    /// larger).
    pub hot_extent_size: u64,
    /// Local I/O engine.
    pub engine: EngineChoice,
    /// O_DIRECT policy.
    pub direct_io: DirectIo,
    /// With O_DIRECT, lone small writes go through the page cache with
    /// `RWF_DONTCACHE` (`engine::behind`). Default true.
    pub write_behind: bool,
    /// NBD minimum block size (power of two, 512..=4096).
    pub nbd_block_size_min: u64,
    /// NBD maximum request payload (4KiB..=1GiB, a multiple of the minimum
    /// block size); larger requests are refused with EINVAL/EOVERFLOW.
    pub nbd_max_request: u64,
    /// How long an idle NBD connection polls its socket for the next request
    /// before it sleeps (`nbd::Limits::idle_poll`); zero = never. Default
    /// 50 µs, at most 1 ms.
    pub nbd_idle_poll: Duration,
    /// The resource's nodes, one per declared server, in server order.
    pub nodes: Vec<ResourceNode>,
}

/// `[resource.server.NAME]`: a resource's settings on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceNode {
    /// The server (node) name.
    pub server: String,
    /// Data partition: block device or regular file (absolute).
    pub data_path: PathBuf,
    /// Cluster partition (metadata: superblocks + bitmap), absolute.
    pub cluster_partition: PathBuf,
    /// Port of this resource's mirror data link on this node.
    pub mirror_port: u16,
    /// NBD export as a unix socket (absolute).
    pub nbd_socket: PathBuf,
    /// Optional NBD export over TCP (only when configured; any address,
    /// including non-loopback, is taken as the operator's explicit choice).
    pub nbd_tcp: Option<SocketAddr>,
    /// Kernel NBD device to attach (`/dev/nbd0`), if any.
    pub nbd_device: Option<PathBuf>,
    /// Where the file system is mounted on activation, if anywhere.
    pub mount_point: Option<PathBuf>,
    /// File system type (for mount and mkfs).
    pub fs: String,
    /// Extra mount options (`-o`), if any.
    pub mount_options: Option<String>,
    /// Where a forced recovery saves this node's divergent regions before
    /// overwriting them.
    pub divergent_save_dir: PathBuf,
}

impl Config {
    /// [`DEFAULT_CONFIG_PATH`] as a path.
    pub fn default_path() -> PathBuf {
        PathBuf::from(DEFAULT_CONFIG_PATH)
    }

    /// Reads, parses and validates the file at `path`. Relative paths in it
    /// are resolved against the file's (canonical) directory. The secret
    /// file is not read here: see [`Config::read_secret`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let abs = std::path::absolute(path).map_err(read_err)?;
        let parent = abs.parent().unwrap_or(Path::new("/"));
        let dir = parent.canonicalize().map_err(read_err)?;
        let file = dir.join(abs.file_name().unwrap_or_default());
        build::build(&text, &file, &dir)
    }

    /// Parses `text` as if it had been read from `path` (used for error
    /// messages and, through its directory, for relative paths; the path is
    /// made absolute against the current directory but need not exist).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let abs = std::path::absolute(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let dir = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
        build::build(text, &abs, &dir)
    }

    /// The server named `name`.
    pub fn server(&self, name: &str) -> Option<&Server> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// The resource named `name`.
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// The other server of a pair, seen from `node`; `None` when standalone
    /// or when `node` is not declared.
    pub fn peer(&self, node: &str) -> Option<&Server> {
        self.server(node)?;
        self.servers.iter().find(|s| s.name != node)
    }

    /// True when a single server is declared (no peer, no replication).
    pub fn is_standalone(&self) -> bool {
        self.servers.len() == 1
    }

    /// The server this process runs as, or an error naming the declared ones.
    pub fn node_check(&self, node: &str) -> Result<&Server, ConfigError> {
        self.server(node).ok_or_else(|| ConfigError::UnknownNode {
            file: self.path.clone(),
            node: node.to_string(),
            declared: self.server_names(),
        })
    }

    /// The declared server names, comma separated (for messages).
    pub fn server_names(&self) -> String {
        build::names(self.servers.iter().map(|s| s.name.as_str()))
    }

    /// Reads the shared secret (`cluster.secret_file`). Errors: no secret
    /// file configured, unreadable, empty, or readable by others. One
    /// trailing newline (`\n` or `\r\n`) is not part of the secret, so a file
    /// written by `echo` or an editor works the same on both nodes.
    pub fn read_secret(&self) -> Result<Secret, ConfigError> {
        match &self.cluster.secret_file {
            Some(p) => secret::read(&self.path, p),
            None => Err(ConfigError::NoSecret {
                file: self.path.clone(),
            }),
        }
    }

    /// Reads and checks the `[cluster.tls]` files for node `node`; `Ok(None)` when TLS is
    /// not configured. Like the secret, read when the peer links start, not at load.
    ///
    /// Errors ([`ConfigError::Tls`], naming the key and the file): a file missing or
    /// unreadable, not PEM, without a certificate / private key; the certificate expired or
    /// not yet valid, or not valid for `node` (subjectAltName dNSName); the key not matching
    /// the certificate; a CA bundle without a usable certificate.
    pub fn read_tls(&self, node: &str) -> Result<Option<TlsMaterial>, ConfigError> {
        match &self.cluster.tls {
            None => Ok(None),
            Some(t) => tls::read(&self.path, t, node, std::time::SystemTime::now()).map(Some),
        }
    }

    /// Mode bits for the admin socket: 0o660 with `admin_group`, else 0o600.
    pub fn admin_socket_mode(&self) -> u32 {
        if self.cluster.admin_group.is_some() {
            0o660
        } else {
            0o600
        }
    }

    /// The text of a valid two-node-on-loopback config with control ports
    /// `base_port`, `base_port + 1` and mirror ports from `base_port + 2`,
    /// all paths under `dir`. See [`ExampleSpec`] for more control.
    pub fn example_pair(dir: &Path, base_port: u16) -> String {
        ExampleSpec::pair(dir, base_port).render()
    }

    /// The text of a valid standalone (one server) config, paths under `dir`.
    pub fn example_standalone(dir: &Path, base_port: u16) -> String {
        ExampleSpec::standalone(dir, base_port).render()
    }
}

impl Resource {
    /// This resource's settings on `server_name`.
    pub fn node(&self, server_name: &str) -> Option<&ResourceNode> {
        self.nodes.iter().find(|n| n.server == server_name)
    }

    /// The name of the other node of this resource, seen from `server_name`;
    /// `None` when standalone or when `server_name` is not one of its nodes.
    pub fn peer_of(&self, server_name: &str) -> Option<&str> {
        self.node(server_name)?;
        self.nodes
            .iter()
            .find(|n| n.server != server_name)
            .map(|n| n.server.as_str())
    }

    /// The other node's settings, seen from `server_name`.
    pub fn peer_node(&self, server_name: &str) -> Option<&ResourceNode> {
        self.peer_of(server_name).and_then(|p| self.node(p))
    }

    /// True when the resource has a peer to mirror to.
    pub fn is_mirrored(&self) -> bool {
        self.nodes.len() == 2
    }
}
