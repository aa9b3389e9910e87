//! Protocol versions and negotiation.
//!
//! Version history (the header's version byte):
//!
//! | version | change |
//! |---------|--------|
//! | 1       | initial protocol: 28-byte header, all message kinds of docs/protocol.md |
//!
//! Hello is always sent with header version 1 ([`HELLO_VERSION`]) so that any two builds can
//! read each other's Hello; all later frames use the version [`negotiate_version`] picked.

/// The version this build encodes with.
pub const PROTOCOL_VERSION: u8 = 1;
/// Header version used for Hello frames regardless of what is negotiated.
pub const HELLO_VERSION: u8 = 1;
/// Versions this build can decode, ascending.
pub const SUPPORTED_VERSIONS: &[u8] = &[1];

/// Picks the highest version present in both lists, or `None` if there is none (the
/// connection must then be closed with [`error_code::VERSION_MISMATCH`](crate::error_code::VERSION_MISMATCH)).
pub fn negotiate_version(ours: &[u8], theirs: &[u8]) -> Option<u8> {
    ours.iter().copied().filter(|v| theirs.contains(v)).max()
}
