//! Authentication: response binds nonces, names, version and direction; constant-time verify;
//! a full handshake run through the codec in the order docs/protocol.md prescribes.

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use mirror_proto::auth::{
    compute_response, verify_response, Direction, Transcript, TRANSCRIPT_DOMAIN,
};
use mirror_proto::*;
use proptest::prelude::*;
use sha2::Sha256;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn t<'a>(
    dir: Direction,
    resp: &'a str,
    ver: &'a str,
    vn: &'a [u8; 32],
    rn: &'a [u8; 32],
) -> Transcript<'a> {
    Transcript {
        version: 1,
        direction: dir,
        responder_name: resp,
        verifier_name: ver,
        verifier_nonce: vn,
        responder_nonce: rn,
    }
}

#[test]
fn transcript_layout_matches_the_spec() {
    // Recompute the MAC from the byte layout in docs/protocol.md, independently of the crate.
    let (na, nb) = ([1u8; 32], [2u8; 32]);
    let mut bytes = TRANSCRIPT_DOMAIN.to_vec();
    assert_eq!(&bytes[..], b"nbd-mirror-auth\0");
    bytes.push(1);
    for s in ["initiator->acceptor", "node-a", "node-b"] {
        bytes.extend_from_slice(&(s.len() as u64).to_le_bytes());
        bytes.extend_from_slice(s.as_bytes());
    }
    bytes.extend_from_slice(&nb); // verifier nonce
    bytes.extend_from_slice(&na); // responder nonce
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET).unwrap();
    mac.update(&bytes);
    let want: [u8; 32] = mac.finalize().into_bytes().into();
    let got = compute_response(
        SECRET,
        &t(Direction::InitiatorToAcceptor, "node-a", "node-b", &nb, &na),
    );
    assert_eq!(got, want);
}

#[test]
fn reflection_and_tampering_fail() {
    let (na, nb) = ([0xAAu8; 32], [0xBBu8; 32]);
    let good = t(Direction::InitiatorToAcceptor, "a", "b", &nb, &na);
    let r = compute_response(SECRET, &good);
    assert!(verify_response(SECRET, &good, &r));
    // Reflection: the same bytes presented as the other direction / other name order fail.
    assert!(!verify_response(
        SECRET,
        &t(Direction::AcceptorToInitiator, "a", "b", &nb, &na),
        &r
    ));
    assert!(!verify_response(
        SECRET,
        &t(Direction::InitiatorToAcceptor, "b", "a", &na, &nb),
        &r
    ));
    assert!(!verify_response(
        SECRET,
        &t(Direction::AcceptorToInitiator, "b", "a", &na, &nb),
        &r
    ));
    // Wrong secret, wrong nonce, wrong version.
    assert!(!verify_response(b"other secret", &good, &r));
    assert!(!verify_response(
        SECRET,
        &t(Direction::InitiatorToAcceptor, "a", "b", &[0u8; 32], &na),
        &r
    ));
    let mut v2 = good;
    v2.version = 2;
    assert!(!verify_response(SECRET, &v2, &r));
    // Name boundaries are unambiguous ("ab"+"c" vs "a"+"bc").
    let x = compute_response(
        SECRET,
        &t(Direction::InitiatorToAcceptor, "ab", "c", &nb, &na),
    );
    let y = compute_response(
        SECRET,
        &t(Direction::InitiatorToAcceptor, "a", "bc", &nb, &na),
    );
    assert_ne!(x, y);
}

proptest! {
    #[test]
    fn any_bit_flip_in_the_response_is_rejected(na in any::<[u8; 32]>(), nb in any::<[u8; 32]>(),
                                                 bit in 0usize..256) {
        let tr = t(Direction::AcceptorToInitiator, "standby-1", "active-1", &na, &nb);
        let mut r = compute_response(SECRET, &tr);
        prop_assert!(verify_response(SECRET, &tr, &r));
        r[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(!verify_response(SECRET, &tr, &r));
    }
}

/// One side of the handshake, driven purely through encode/Decoder.
struct Side {
    name: &'static str,
    secret: &'static [u8],
    nonce: [u8; 32],
    peer_nonce: Option<[u8; 32]>,
    peer_name: Option<String>,
    peer_verified: bool,
    peer_accepted_us: bool,
    seq: u64,
    dec: Decoder,
    rx: BytesMut,
}

impl Side {
    fn new(name: &'static str, secret: &'static [u8], nonce: [u8; 32]) -> Side {
        Side {
            name,
            secret,
            nonce,
            peer_nonce: None,
            peer_name: None,
            peer_verified: false,
            peer_accepted_us: false,
            seq: 0,
            dec: Decoder::new(),
            rx: BytesMut::new(),
        }
    }
    fn send(&mut self, to: &mut Side, msg: Message) {
        self.seq += 1;
        Frame::new(self.seq, msg).encode(&mut to.rx).unwrap();
    }
    fn recv(&mut self) -> Message {
        self.dec
            .decode(&mut self.rx)
            .unwrap()
            .expect("a frame is waiting")
            .msg
    }
    fn authenticated(&self) -> bool {
        self.peer_verified && self.peer_accepted_us
    }
    fn hello(&self) -> Message {
        Message::Hello(Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            node_name: self.name.into(),
            cluster_name: "c".into(),
            resource_name: "r0".into(),
            volume_size: 1 << 30,
            region_size: 1 << 20,
            role: Role::Standby,
            disk_state: DiskState::UpToDate,
            features: Features::TRIM | Features::FUA,
            generation: Generation {
                current: 7,
                bitmap: 0,
                history: vec![3],
            },
        })
    }
    fn on_hello(&mut self) {
        let Message::Hello(h) = self.recv() else {
            panic!("expected Hello")
        };
        assert_eq!(negotiate_version(SUPPORTED_VERSIONS, &h.versions), Some(1));
        self.peer_name = Some(h.node_name);
    }
    fn on_challenge(&mut self) {
        let Message::AuthChallenge { nonce } = self.recv() else {
            panic!("expected AuthChallenge")
        };
        self.peer_nonce = Some(nonce);
    }
    fn response(&self, dir: Direction) -> Message {
        let peer_name = self.peer_name.clone().unwrap();
        let peer_nonce = self.peer_nonce.unwrap();
        let tr = t(dir, self.name, &peer_name, &peer_nonce, &self.nonce);
        Message::AuthResponse {
            mac: compute_response(self.secret, &tr),
        }
    }
    fn check_response(&mut self, dir: Direction) -> bool {
        let Message::AuthResponse { mac } = self.recv() else {
            panic!("expected AuthResponse")
        };
        let peer_name = self.peer_name.clone().unwrap();
        let peer_nonce = self.peer_nonce.unwrap();
        let tr = t(dir, &peer_name, self.name, &self.nonce, &peer_nonce);
        self.peer_verified = verify_response(self.secret, &tr, &mac);
        self.peer_verified
    }
    fn on_result(&mut self) {
        let Message::AuthResult { accepted } = self.recv() else {
            panic!("expected AuthResult")
        };
        self.peer_accepted_us = accepted;
    }
}

fn handshake(secret_i: &'static [u8], secret_a: &'static [u8]) -> (Side, Side) {
    let mut i = Side::new("node-i", secret_i, [0x11; 32]);
    let mut a = Side::new("node-a", secret_a, [0x22; 32]);
    // 1-2: Hello both ways.
    let h = i.hello();
    i.send(&mut a, h);
    a.on_hello();
    let h = a.hello();
    a.send(&mut i, h);
    i.on_hello();
    // 3-4: challenges.
    i.send(&mut a, Message::AuthChallenge { nonce: i.nonce });
    a.on_challenge();
    a.send(&mut i, Message::AuthChallenge { nonce: a.nonce });
    i.on_challenge();
    // 5: initiator responds first.
    let r = i.response(Direction::InitiatorToAcceptor);
    i.send(&mut a, r);
    // 6: acceptor verifies, reports, and only on success answers with its own response.
    let ok = a.check_response(Direction::InitiatorToAcceptor);
    a.send(&mut i, Message::AuthResult { accepted: ok });
    i.on_result();
    if !ok {
        return (i, a);
    }
    let r = a.response(Direction::AcceptorToInitiator);
    a.send(&mut i, r);
    // 7: initiator verifies and reports.
    let ok = i.check_response(Direction::AcceptorToInitiator);
    i.send(&mut a, Message::AuthResult { accepted: ok });
    a.on_result();
    (i, a)
}

#[test]
fn full_handshake_same_secret_authenticates_both() {
    let (i, a) = handshake(SECRET, SECRET);
    assert!(i.authenticated() && a.authenticated());
    assert!(i.rx.is_empty() && a.rx.is_empty());
}

#[test]
fn full_handshake_wrong_secret_authenticates_neither() {
    let (i, a) = handshake(SECRET, b"a different secret, 32 bytes....");
    assert!(!a.peer_verified);
    assert!(!i.authenticated() && !a.authenticated());
    // The acceptor never sent its own response to an unverified peer.
    assert!(i.peer_nonce.is_some() && !i.peer_verified);
}
