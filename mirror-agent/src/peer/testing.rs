//! Testing helpers for modules built on peer sessions (e.g. replication): two connected
//! [`Session`]s over an in-memory duplex pipe, **without** handshake or authentication, and a
//! Hello builder. Not used by the agent itself.

use std::net::{Ipv4Addr, SocketAddr};

use bytes::BytesMut;
use mirror_proto::{DiskState, Features, Generation, Hello, Role, SUPPORTED_VERSIONS};

use super::handshake::Established;
use super::session::{self, Session};
use crate::config::Timeouts;

/// Bytes buffered in each direction of the in-memory pipe.
const PIPE_BYTES: usize = 1 << 20;

/// A valid Hello for tests: Standby, UpToDate, no features, generation 0.
pub fn hello(
    node: &str,
    cluster: &str,
    resource: &str,
    volume_size: u64,
    region_size: u32,
) -> Hello {
    Hello {
        versions: SUPPORTED_VERSIONS.to_vec(),
        node_name: node.to_string(),
        cluster_name: cluster.to_string(),
        resource_name: resource.to_string(),
        volume_size,
        region_size,
        role: Role::Standby,
        disk_state: DiskState::UpToDate,
        features: Features::empty(),
        generation: Generation::default(),
    }
}

/// Two connected sessions with default [`Timeouts`]: `.0` is node A (its `peer_hello` is
/// `b_hello`), `.1` node B. Their `peer_addr`s are placeholders (127.0.0.1 port 1 and 2).
/// Must be called inside a tokio runtime.
pub fn pair_in_memory(a_hello: Hello, b_hello: Hello) -> (Session, Session) {
    pair_in_memory_with(a_hello, b_hello, Timeouts::default())
}

/// [`pair_in_memory`] with explicit timeouts (heartbeat, send).
pub fn pair_in_memory_with(
    a_hello: Hello,
    b_hello: Hello,
    timeouts: Timeouts,
) -> (Session, Session) {
    let (x, y) = tokio::io::duplex(PIPE_BYTES);
    let est = |peer_hello| Established {
        peer_hello,
        next_tx_seq: 1,
        next_rx_seq: 1,
        buf: BytesMut::new(),
    };
    let addr = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let a = session::start(x, est(b_hello), addr(2), timeouts);
    let b = session::start(y, est(a_hello), addr(1), timeouts);
    (a, b)
}
