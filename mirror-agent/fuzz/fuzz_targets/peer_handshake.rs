//! Fuzz target `peer_handshake`: our side of the peer session handshake against a peer whose
//! every byte comes from the input (raw, or frames with correct headers, optionally starting
//! with the expected peer's valid Hello). The checks are in
//! `mirror_agent::peer::testing::fuzz_handshake`: no panic, no hang, and no input completes
//! the handshake without the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mirror_agent::peer::testing::fuzz_handshake(data);
});
