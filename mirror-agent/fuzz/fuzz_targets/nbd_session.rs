//! Fuzz target `nbd_session`: arbitrary client bytes (raw, or after a valid handshake) sent to
//! a real NBD server over an in-memory stream. The checks are in
//! `mirror_agent::nbd::testing::fuzz_session`: no panic, no hang, and nothing reaches the
//! volume that the client did not send as a whole, well-formed request.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mirror_agent::nbd::testing::fuzz_session(data);
});
