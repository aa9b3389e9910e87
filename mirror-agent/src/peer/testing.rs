//! Testing helpers for modules built on peer sessions (e.g. replication): two connected
//! [`Session`]s over an in-memory duplex pipe, **without** handshake or authentication, and a
//! Hello builder; and [`fuzz_handshake`], the body of the `peer_handshake` fuzz target.
//! Not used by the agent itself.

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

/// Wraps `payload` in a frame header with correct CRCs (kind, flags and seq as given), so
/// that fuzz input reaches the message parsers and the handshake's checks.
fn raw_frame(kind: u8, flags: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    use mirror_proto::{MAGIC, PROTOCOL_VERSION};
    let mut w = Vec::with_capacity(mirror_proto::HEADER_LEN + payload.len());
    w.extend_from_slice(&MAGIC.to_le_bytes());
    w.push(PROTOCOL_VERSION);
    w.push(kind);
    w.extend_from_slice(&flags.to_le_bytes());
    w.extend_from_slice(&seq.to_le_bytes());
    w.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    w.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let hc = crc32fast::hash(&w);
    w.extend_from_slice(&hc.to_le_bytes());
    w.extend_from_slice(payload);
    w
}

/// Body of the `peer_handshake` fuzz target (`mirror-agent/fuzz`), also run by the test
/// suite on generated inputs (`tests/peer_fuzz_inputs.rs`).
///
/// Our side of the session handshake (§8.1) runs against a peer whose every byte comes from
/// `data`, for node `a` of cluster `demo` whose peer is `b`. `data[0]` picks the case: bit 0,
/// we accepted (else we connected); bit 1, a data link of resource `md1` (else the control
/// link); bit 2, the rest is a list of frames with correct headers (records `kind u8,
/// flags u8, length u8, payload`; kind 0xFF: a valid Hello from `b` instead, with the
/// record's flags byte as its role), so the fuzzer gets past framing and the Hello checks to
/// the authentication; else the rest is sent as it is. The secret is one this function drew.
///
/// Asserts that the handshake ends (within 20 s of the input's end), never panics, and never
/// succeeds: without the secret no input can authenticate, because our challenge is a fresh
/// random nonce.
pub fn fuzz_handshake(data: &[u8]) {
    use rand::RngCore;

    use super::handshake::{handshake, local_hello, Side};
    use super::{HelloState, LinkSpec, ResourceSpec};
    use mirror_proto::{Frame, Message, Role};

    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let resource = (mode & 2 != 0).then(|| ResourceSpec {
        name: "md1".into(),
        volume_size: 1 << 30,
        region_size: 64 << 10,
    });
    let mut key = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let spec = LinkSpec {
        cluster: "demo".into(),
        local_node: "a".into(),
        peer_node: "b".into(),
        resource: resource.clone(),
        hello_state: std::sync::Arc::new(|| HelloState {
            role: Role::Standby,
            disk_state: DiskState::UpToDate,
            generation: Generation::default(),
            features: Features::empty(),
        }),
        secret: crate::config::Secret::from_bytes(key),
        timeouts: Timeouts::default(),
        listen_addr: "127.0.0.1:1".into(),
        peer_addr: "127.0.0.1:1".into(),
        tls: None,
    };
    // The expected peer's own view, for its valid Hello.
    let mut peer_spec = spec.clone();
    peer_spec.local_node = "b".into();
    peer_spec.peer_node = "a".into();
    let mut input = Vec::new();
    if mode & 4 != 0 {
        let mut recs = rest;
        let mut seq = 1u64;
        while recs.len() >= 3 {
            let (kind, flags, n) = (recs[0], recs[1], usize::from(recs[2]));
            let n = n.min(recs.len() - 3);
            let payload = &recs[3..3 + n];
            if kind == 0xFF {
                let mut h = local_hello(&peer_spec);
                h.role = if flags & 1 != 0 {
                    Role::Active
                } else {
                    Role::Standby
                };
                let mut out = BytesMut::new();
                Frame::new(seq, Message::Hello(h))
                    .encode(&mut out)
                    .expect("a valid Hello encodes");
                input.extend_from_slice(&out);
            } else {
                input.extend_from_slice(&raw_frame(kind, u16::from(flags), seq, payload));
            }
            seq += 1;
            recs = &recs[3 + n..];
        }
    } else {
        input.extend_from_slice(rest);
    }
    let side = if mode & 1 != 0 {
        Side::Acceptor
    } else {
        Side::Initiator
    };
    let outcome = crate::fuzzing::play(
        &input,
        PIPE_BYTES,
        std::time::Duration::from_secs(20),
        "the handshake",
        |mut stream| async move { handshake(&mut stream, side, &spec, "b").await },
    );
    if let Ok(est) = outcome {
        panic!(
            "a peer without the secret completed the handshake (its Hello: {:?})",
            est.peer_hello
        );
    }
}
