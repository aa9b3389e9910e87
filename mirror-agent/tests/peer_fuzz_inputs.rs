//! The `peer_handshake` fuzz target's body ([`fuzz_handshake`]) on generated inputs, so that
//! every test run checks what the fuzzer checks: a peer that does not hold the secret never
//! completes the session handshake, whatever it sends (a valid Hello followed by any
//! authentication frames, frames with correct headers and arbitrary payloads, raw bytes),
//! and the handshake neither panics nor hangs. The fuzzer itself lives in
//! `mirror-agent/fuzz`.

use mirror_agent::peer::testing::fuzz_handshake;
use proptest::prelude::*;

/// A frame record as `fuzz_handshake` reads it: kind, flags, length, payload.
fn record() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![
        // 0xFF: a valid Hello from the expected peer.
        3 => Just(0xFFu8),
        6 => prop::sample::select(vec![0x01u8, 0x02, 0x03, 0x04]),
        2 => prop::sample::select(vec![0x10u8, 0x11, 0x12, 0x30, 0x33, 0x34, 0x40]),
        1 => any::<u8>(),
    ];
    let payload = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..8),
        prop::collection::vec(any::<u8>(), 32..33),
        prop::collection::vec(any::<u8>(), 0..120),
    ];
    (kind, any::<u8>(), payload).prop_map(|(kind, flags, payload)| {
        let mut r = vec![kind, flags, payload.len() as u8];
        r.extend_from_slice(&payload);
        r
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Frames with correct headers, either side, control or data link.
    #[test]
    fn framed_peers(mode in any::<u8>(), recs in prop::collection::vec(record(), 0..8)) {
        let mut input = vec![mode | 4];
        for r in &recs {
            input.extend_from_slice(r);
        }
        fuzz_handshake(&input);
    }

    /// Raw bytes as the peer's stream.
    #[test]
    fn raw_peers(mode in any::<u8>(), bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut input = vec![mode & !4];
        input.extend_from_slice(&bytes);
        fuzz_handshake(&input);
    }
}

/// The closest an impostor gets: the expected peer's valid Hello, then a challenge and a
/// response of the right sizes, in every mode. Refused all the same.
#[test]
fn valid_hello_then_guessed_authentication_is_refused() {
    for mode in 0u8..4 {
        let mut input = vec![mode | 4, 0xFF, 0, 0];
        input.extend_from_slice(&[0x02, 0, 32]);
        input.extend_from_slice(&[0xAA; 32]);
        input.extend_from_slice(&[0x03, 0, 32]);
        input.extend_from_slice(&[0x55; 32]);
        input.extend_from_slice(&[0x04, 0, 1, 1]);
        fuzz_handshake(&input);
    }
}
