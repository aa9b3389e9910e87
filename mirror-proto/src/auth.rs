//! Mutual authentication: HMAC-SHA256 over a transcript binding both nonces, both node names,
//! the protocol version and the direction, so a response can neither be replayed in another
//! session (fresh nonces) nor reflected back to its sender (direction label + name order).
//!
//! Transcript bytes (fed to HMAC-SHA256 keyed with the shared secret):
//!
//! ```text
//! "nbd-mirror-auth\0"                 16 bytes, domain separation
//! u8    version                       negotiated protocol version
//! str64 direction label               "initiator->acceptor" or "acceptor->initiator"
//! str64 responder node name           the side computing the response
//! str64 verifier node name            the side checking it
//! u8×32 verifier nonce                the challenge being answered
//! u8×32 responder nonce               the responder's own challenge
//! ```
//!
//! `str64` is a u64 little-endian byte length followed by the UTF-8 bytes.
//! The nonces come from a CSPRNG of the caller (this crate does no I/O and has no RNG).
//! The shared secret should be at least 32 random bytes.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::limits::{MAC_LEN, NONCE_LEN};

/// Domain-separation prefix of the transcript.
pub const TRANSCRIPT_DOMAIN: &[u8; 16] = b"nbd-mirror-auth\0";

/// Which way a response travels, relative to who opened the TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by the side that connected, checked by the side that accepted.
    InitiatorToAcceptor,
    /// Sent by the side that accepted, checked by the side that connected.
    AcceptorToInitiator,
}

impl Direction {
    /// The label hashed into the transcript.
    pub fn label(self) -> &'static str {
        match self {
            Direction::InitiatorToAcceptor => "initiator->acceptor",
            Direction::AcceptorToInitiator => "acceptor->initiator",
        }
    }
}

/// Everything an AuthResponse is bound to. Both sides build the same transcript for a given
/// response: the responder with its own name/nonce as `responder_*`, the verifier likewise
/// with the peer's.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// Negotiated protocol version.
    pub version: u8,
    /// Direction of this response.
    pub direction: Direction,
    /// Node name of the side computing the response.
    pub responder_name: &'a str,
    /// Node name of the side verifying it.
    pub verifier_name: &'a str,
    /// Nonce the verifier sent in its AuthChallenge (the challenge being answered).
    pub verifier_nonce: &'a [u8; NONCE_LEN],
    /// Nonce the responder sent in its own AuthChallenge.
    pub responder_nonce: &'a [u8; NONCE_LEN],
}

fn put_str(mac: &mut Hmac<Sha256>, s: &str) {
    // u64 length prefix: unambiguous for any input, not only codec-valid names.
    mac.update(&(s.len() as u64).to_le_bytes());
    mac.update(s.as_bytes());
}

fn keyed(secret: &[u8], t: &Transcript<'_>) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(TRANSCRIPT_DOMAIN);
    mac.update(&[t.version]);
    put_str(&mut mac, t.direction.label());
    put_str(&mut mac, t.responder_name);
    put_str(&mut mac, t.verifier_name);
    mac.update(t.verifier_nonce);
    mac.update(t.responder_nonce);
    mac
}

/// Computes the AuthResponse MAC for `transcript` under the shared `secret`.
pub fn compute_response(secret: &[u8], transcript: &Transcript<'_>) -> [u8; MAC_LEN] {
    keyed(secret, transcript).finalize().into_bytes().into()
}

/// Checks a received AuthResponse in constant time.
pub fn verify_response(
    secret: &[u8],
    transcript: &Transcript<'_>,
    response: &[u8; MAC_LEN],
) -> bool {
    let expected = compute_response(secret, transcript);
    expected.ct_eq(response).into()
}
