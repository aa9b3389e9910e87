//! `mirror-proto` — the peer wire protocol between two nbd-mirror agents (active → standby
//! replication). A pure codec: no I/O, no clocks, no randomness. The normative specification
//! is `docs/protocol.md`; the doc comments next to each type repeat its byte layout.
//!
//! # Module map
//!
//! | module        | what it holds |
//! |---------------|---------------|
//! | [`header`]    | the 28-byte frame header ([`Header`]) and step one of decoding, [`check`] (no allocation) |
//! | [`kind`]      | [`MessageKind`] wire values, header flag bits, per-kind payload bounds, which kinds are allowed before authentication |
//! | [`message`]   | message bodies ([`Message`], [`Hello`], [`BitmapChunk`], [`Generation`], enums) with their payload layouts |
//! | [`codec`]     | [`Frame`]: step two of decoding ([`Frame::parse`], zero-copy data) and encoding ([`Frame::encode`], [`Frame::encode_vectored`], [`encode_write_prefix`] for vectored sends of caller-owned buffers) |
//! | [`decoder`]   | streaming [`Decoder`] over a `BytesMut` receive buffer |
//! | [`auth`]      | HMAC-SHA256 challenge/response over a transcript, constant-time verification |
//! | [`version`]   | version history, supported versions, [`negotiate_version`] |
//! | [`limits`]    | every bound enforced before allocating ([`MAX_PAYLOAD`], name/list bounds) |
//! | [`error`]     | the layer's error enum [`ProtoError`] and [`Malformation`] detail |
//! | [`error_code`]| codes carried by the Error message |
//!
//! # Decoding in two steps
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use mirror_proto::{check, Check, Frame, Message};
//!
//! let frame = Frame::new(7, Message::Ping { nonce: 1, timestamp_ns: 2 });
//! let mut wire = BytesMut::new();
//! frame.encode(&mut wire).unwrap();
//! let wire: Bytes = wire.freeze();
//!
//! // Step 1: no allocation; tells how much is missing or how long the frame is.
//! assert_eq!(check(&wire[..10]).unwrap(), Check::Incomplete { needed: 18 });
//! let Check::Complete { frame_len } = check(&wire).unwrap() else { unreachable!() };
//! // Step 2: parse exactly that frame.
//! assert_eq!(Frame::parse(&wire.slice(..frame_len)).unwrap(), frame);
//! ```

pub mod auth;
pub mod codec;
pub mod decoder;
pub mod error;
pub mod header;
pub mod kind;
pub mod limits;
pub mod message;
pub mod version;

pub use codec::{encode_resync_data_prefix, encode_write_prefix, Frame};
pub use decoder::Decoder;
pub use error::{Malformation, ProtoError};
pub use header::{check, Check, Header, HEADER_LEN};
pub use kind::{MessageKind, FLAG_FUA, FLAG_NO_HOLE};
pub use limits::*;
pub use message::{
    BitmapChunk, DiskState, Features, Generation, GoodbyeReason, Hello, Message, RegionChecksum,
    Role,
};
pub use version::{negotiate_version, HELLO_VERSION, PROTOCOL_VERSION, SUPPORTED_VERSIONS};

/// Frame magic: the bytes `b"NBMR"` at offset 0, i.e. this value read as u32 little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"NBMR");

/// Codes carried in [`Message::Error`]. Receivers accept unknown codes (treat as fatal).
pub mod error_code {
    /// A frame other than the handshake kinds arrived before both sides were authenticated.
    pub const NOT_AUTHENTICATED: u32 = 1;
    /// The peer's AuthResponse did not verify.
    pub const AUTH_FAILED: u32 = 2;
    /// No common protocol version.
    pub const VERSION_MISMATCH: u32 = 3;
    /// Cluster/resource name, volume size or region size differ.
    pub const CONFIG_MISMATCH: u32 = 4;
    /// A frame failed to decode (any [`ProtoError`](crate::ProtoError)).
    pub const PROTOCOL: u32 = 5;
    /// Generation identifiers show split brain; operator action needed.
    pub const SPLIT_BRAIN: u32 = 6;
    /// Data of the two sides is unrelated (no common generation).
    pub const UNRELATED_DATA: u32 = 7;
    /// A message arrived that is not valid in the current state (e.g. Write to a non-standby).
    pub const UNEXPECTED_MESSAGE: u32 = 8;
    /// Internal error of the sender.
    pub const INTERNAL: u32 = 9;
}
