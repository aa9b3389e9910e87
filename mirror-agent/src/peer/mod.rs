//! Peer links: authenticated, sequenced, heartbeated frame streams to the other node
//! (`docs/protocol.md` §8–§10).
//!
//! Module map:
//!
//! - this file: [`LinkSpec`] (what a link needs: names, secret, timeouts, addresses, the
//!   state put in Hello), [`HelloState`], [`ResourceSpec`], the layer's error [`LinkError`].
//! - `handshake`: the Hello exchange, Hello validation and the HMAC challenge/response of
//!   §8.1 over any byte stream; refuses every non-handshake frame before authentication
//!   from its header alone (Error `NOT_AUTHENTICATED`), so no unauthenticated payload is
//!   even buffered.
//! - `session`: a running [`Session`] after authentication: reader task (decode, seq check,
//!   internal Ping/Pong, the owner's [`FrameHook`] that handles frames in the reader task
//!   itself), writer task (bounded queue, vectored coalesced writes, send
//!   timeout), heartbeat; [`SessionSender`] assigns sequence numbers; [`CloseWatch`]. On
//!   plain TCP a sender writes a small frame to the socket itself while the writer task is
//!   idle (one wake-up less per frame); [`corked`] turns that off for bursts.
//! - `link`: [`spawn_link`]: dial or accept per the dialing rule, reconnect after loss,
//!   deliver each new session to the owner ([`LinkHandle`], [`LinkState`]).
//! - `tls`: [`PeerTls`], optional mutual TLS 1.3 under the handshake (`[cluster.tls]`):
//!   certificate and node-name checks both ways, refusal of a plain peer at a TLS node and
//!   of a TLS peer at a plain node.
//! - [`testing`]: [`testing::pair_in_memory`], two connected sessions without sockets or
//!   authentication, for other modules' tests; [`testing::fuzz_handshake`], the body of the
//!   `peer_handshake` fuzz target (`mirror-agent/fuzz`).
//!
//! # Two kinds of links
//!
//! Per pair of nodes there is one *control* link (peer's `address:control_port`, Hello
//! resource name [`CONTROL_RESOURCE`], volume and region size not compared) and one *data*
//! link per mirrored resource (peer's `address:mirror_port`). Both use the same machinery.
//! The control link carries `Message::Control` (JSON text, protocol kind 0x40); sessions
//! deliver it like any other frame.
//!
//! # Byte streams
//!
//! The handshake and the session are generic over the byte stream
//! (`AsyncRead + AsyncWrite + Unpin + Send`): a plain link runs them on the `TcpStream`
//! itself, a TLS link on `tokio_rustls::TlsStream<TcpStream>`. Both are monomorphized, so
//! the plain path has no boxing or dispatch on its frames.
//!
//! # Dialing rule
//!
//! The node whose name sorts lower (byte-wise) dials, the other one listens on its own
//! `listen_address` (never a wildcard) and accepts. The dialer retries after a failed attempt
//! with a back-off of 1 s doubling up to 5 s (reset after a session was established, so a
//! lost session is redialed at once). The acceptor keeps at most one live session per link:
//! a newer authenticated connection from the peer replaces the old session (closed with
//! Goodbye), which is what a restarted dialer needs.

mod handshake;
mod link;
mod session;
pub mod testing;
mod tls;

use std::fmt;
use std::sync::Arc;

use mirror_proto::{DiskState, Features, Generation, Role};

use crate::config::{Config, Secret, Timeouts};

pub use link::{spawn_link, LinkHandle, LinkState};
pub use session::{
    corked, CloseWatch, FrameHook, HookCx, HookFuture, Hooked, LinkClosed, Session, SessionSender,
    TrySendError,
};
pub use tls::PeerTls;

/// Hello `resource_name` of the control link (config names cannot contain `@`, so it never
/// collides with a resource).
pub const CONTROL_RESOURCE: &str = "@control";

/// Volume size put in the control link's Hello (not compared).
pub const CONTROL_VOLUME_SIZE: u64 = 0;

/// Region size put in the control link's Hello (not compared; must be a power of two).
pub const CONTROL_REGION_SIZE: u32 = 4096;

/// Capacity of a session's outgoing frame queue (frames). `send` waits when it is full.
pub const SEND_QUEUE_FRAMES: usize = 256;

/// Capacity of a session's incoming frame channel (frames). The reader stops reading the
/// socket while it is full (TCP back-pressure to the peer).
pub const RECV_QUEUE_FRAMES: usize = 256;

/// The per-connection part of this node's Hello, read fresh for each connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloState {
    /// Current role.
    pub role: Role,
    /// Current disk state.
    pub disk_state: DiskState,
    /// Current generation identifiers.
    pub generation: Generation,
    /// Capabilities of the backing device.
    pub features: Features,
}

/// The resource a data link mirrors; both sides must agree on all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSpec {
    /// Resource name.
    pub name: String,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Bitmap region size in bytes (power of two).
    pub region_size: u32,
}

/// Callback producing the current [`HelloState`].
pub type HelloStateFn = Arc<dyn Fn() -> HelloState + Send + Sync>;

/// Everything one link (control or data) needs.
#[derive(Clone)]
pub struct LinkSpec {
    /// Cluster name (compared with the peer's).
    pub cluster: String,
    /// This node's name.
    pub local_node: String,
    /// The configured peer's name (the peer's Hello must carry it).
    pub peer_node: String,
    /// `None` = control link; `Some` = data link of that resource.
    pub resource: Option<ResourceSpec>,
    /// Current role/disk state/generation/features, called at each connection.
    pub hello_state: HelloStateFn,
    /// Shared secret.
    pub secret: Secret,
    /// Link timeouts: `connect` (per dial attempt and for the whole handshake), `send`,
    /// `heartbeat_interval`, `heartbeat_timeout`.
    pub timeouts: Timeouts,
    /// `host:port` this node listens on (acceptor side only).
    pub listen_addr: String,
    /// `host:port` the peer is dialed at (dialer side only).
    pub peer_addr: String,
    /// TLS under the handshake (`[cluster.tls]`); `None` = plain TCP. Both ends must agree.
    pub tls: Option<Arc<PeerTls>>,
}

impl fmt::Debug for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSpec")
            .field("cluster", &self.cluster)
            .field("local_node", &self.local_node)
            .field("peer_node", &self.peer_node)
            .field("resource", &self.resource)
            .field("secret", &self.secret)
            .field("timeouts", &self.timeouts)
            .field("listen_addr", &self.listen_addr)
            .field("peer_addr", &self.peer_addr)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl LinkSpec {
    /// True when this node dials (its name sorts lower than the peer's).
    pub fn is_dialer(&self) -> bool {
        self.local_node.as_bytes() < self.peer_node.as_bytes()
    }

    /// Resource name put in and expected from Hello.
    pub fn resource_name(&self) -> &str {
        self.resource
            .as_ref()
            .map_or(CONTROL_RESOURCE, |r| r.name.as_str())
    }

    /// The control link of `node` from a loaded config.
    ///
    /// With `[cluster.tls]` the TLS files are read and checked here (so a bad file stops
    /// the link, and the agent, at start with an error naming it).
    ///
    /// Errors: `node` or its peer not declared, or the peer's name not usable as a TLS name
    /// ([`LinkError::Config`]); a `[cluster.tls]` file unusable ([`LinkError::TlsConfig`]).
    pub fn control(
        config: &Config,
        node: &str,
        secret: Secret,
        hello_state: HelloStateFn,
    ) -> Result<LinkSpec, LinkError> {
        let (me, peer, tls) = Self::servers(config, node)?;
        Ok(LinkSpec {
            cluster: config.cluster.name.clone(),
            local_node: me.name.clone(),
            peer_node: peer.name.clone(),
            tls,
            resource: None,
            hello_state,
            secret,
            timeouts: config.timeouts,
            listen_addr: join_host_port(&me.listen_address, me.control_port),
            peer_addr: join_host_port(&peer.address, peer.control_port),
        })
    }

    /// The data link of resource `resource` on `node` from a loaded config.
    ///
    /// Errors as [`LinkSpec::control`], plus unknown or unmirrored resource and a region
    /// size that does not fit the wire's u32.
    pub fn data(
        config: &Config,
        node: &str,
        resource: &str,
        volume_size: u64,
        secret: Secret,
        hello_state: HelloStateFn,
    ) -> Result<LinkSpec, LinkError> {
        let (me, peer, tls) = Self::servers(config, node)?;
        let r = config
            .resource(resource)
            .ok_or_else(|| LinkError::Config(format!("resource {resource} is not declared")))?;
        let (Some(mine), Some(theirs)) = (r.node(&me.name), r.node(&peer.name)) else {
            return Err(LinkError::Config(format!(
                "resource {resource} is not mirrored between {} and {}",
                me.name, peer.name
            )));
        };
        let region_size = u32::try_from(r.region_size).map_err(|_| {
            LinkError::Config(format!(
                "resource {resource}: region size {} does not fit the protocol's u32",
                r.region_size
            ))
        })?;
        Ok(LinkSpec {
            cluster: config.cluster.name.clone(),
            local_node: me.name.clone(),
            peer_node: peer.name.clone(),
            tls,
            resource: Some(ResourceSpec {
                name: r.name.clone(),
                volume_size,
                region_size,
            }),
            hello_state,
            secret,
            timeouts: config.timeouts,
            listen_addr: join_host_port(&me.listen_address, mine.mirror_port),
            peer_addr: join_host_port(&peer.address, theirs.mirror_port),
        })
    }

    #[allow(clippy::type_complexity)]
    fn servers<'c>(
        config: &'c Config,
        node: &str,
    ) -> Result<
        (
            &'c crate::config::Server,
            &'c crate::config::Server,
            Option<Arc<PeerTls>>,
        ),
        LinkError,
    > {
        let me = config
            .server(node)
            .ok_or_else(|| LinkError::Config(format!("node {node} is not declared")))?;
        let peer = config
            .peer(node)
            .ok_or_else(|| LinkError::Config(format!("node {node} has no peer (standalone)")))?;
        let tls = PeerTls::from_config(config, &me.name)?;
        if tls.is_some() {
            tls::server_name(&peer.name)?;
        }
        Ok((me, peer, tls))
    }
}

/// `host:port`, bracketing IPv6 literals.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Errors of the peer link layer. Every variant names the peer address when there is one.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket error (connect, bind, read, write) with its errno.
    #[error("{op} {addr}: {source} (errno {errno})", errno = source.raw_os_error().unwrap_or(0))]
    Io {
        /// What was being done (`connect to`, `bind`, `read from`, `write to`).
        op: &'static str,
        /// Address involved.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The handshake did not complete within `timeouts.connect`.
    #[error("peer {peer}: handshake not complete after {secs:.1} s")]
    HandshakeTimeout {
        /// Peer address.
        peer: String,
        /// The timeout.
        secs: f64,
    },
    /// The peer's Hello does not match our configuration (we refused it).
    #[error("refused peer {peer}: {field}: expected {expected}, got {got}")]
    ConfigMismatch {
        /// Peer address.
        peer: String,
        /// Which field: `cluster name`, `node name`, `resource name`, `volume size`, `region size`.
        field: &'static str,
        /// Our value.
        expected: String,
        /// The peer's value.
        got: String,
    },
    /// No protocol version in common.
    #[error("refused peer {peer}: no common protocol version (ours {ours:?}, theirs {theirs:?})")]
    VersionMismatch {
        /// Peer address.
        peer: String,
        /// Our versions.
        ours: Vec<u8>,
        /// The peer's versions.
        theirs: Vec<u8>,
    },
    /// The peer's AuthResponse did not verify: its shared secret differs from ours.
    #[error(
        "refused peer {peer}: authentication failed, the peer's shared secret differs from ours"
    )]
    AuthFailed {
        /// Peer address.
        peer: String,
    },
    /// The peer rejected our AuthResponse: our shared secret differs from the peer's.
    #[error("peer {peer} rejected our authentication: the shared secrets differ")]
    AuthRejected {
        /// Peer address.
        peer: String,
    },
    /// A non-handshake frame arrived before authentication (answered NOT_AUTHENTICATED).
    #[error("refused peer {peer}: {kind:?} frame before authentication")]
    NotAuthenticated {
        /// Peer address.
        peer: String,
        /// The offending kind.
        kind: mirror_proto::MessageKind,
    },
    /// A frame failed to decode, or had the wrong sequence number.
    #[error("peer {peer}: protocol error: {detail}")]
    Protocol {
        /// Peer address.
        peer: String,
        /// What was wrong.
        detail: String,
    },
    /// A valid frame that is not allowed at this point of the handshake.
    #[error("peer {peer}: unexpected {got:?} frame during the handshake (expected {expected})")]
    UnexpectedMessage {
        /// Peer address.
        peer: String,
        /// What the handshake waited for.
        expected: &'static str,
        /// What arrived.
        got: mirror_proto::MessageKind,
    },
    /// The peer sent an Error frame (e.g. it refused our Hello).
    #[error("peer {peer} refused us: error {code}: {message}")]
    PeerError {
        /// Peer address.
        peer: String,
        /// Error code (`mirror_proto::error_code`).
        code: u32,
        /// Its text.
        message: String,
    },
    /// The peer closed the connection during the handshake.
    #[error("peer {peer} closed the connection during the handshake")]
    Closed {
        /// Peer address.
        peer: String,
    },
    /// The configuration does not describe this link.
    #[error("peer link configuration: {0}")]
    Config(String),
    /// TLS refused the connection: the peer did not start TLS (or started it at a plain
    /// node), or the TLS handshake failed (certificate not trusted, expired, not valid for
    /// the configured node name, the peer rejected ours).
    #[error("refused peer {peer}: {detail}")]
    Tls {
        /// Peer address.
        peer: String,
        /// The cause, e.g. "peer did not start TLS ..." or "TLS handshake failed: ...".
        detail: String,
    },
    /// A `[cluster.tls]` file is unusable (start-up error naming the file).
    #[error("peer link TLS configuration: {0}")]
    TlsConfig(#[source] Box<crate::config::ConfigError>),
}

impl LinkError {
    /// True for refusals caused by configuration or secret differences (as opposed to
    /// transient network failures): these show as [`LinkState::Refused`].
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            LinkError::ConfigMismatch { .. }
                | LinkError::VersionMismatch { .. }
                | LinkError::AuthFailed { .. }
                | LinkError::AuthRejected { .. }
                | LinkError::PeerError { .. }
                | LinkError::NotAuthenticated { .. }
                | LinkError::Tls { .. }
        )
    }
}
