//! The single error type of the protocol layer.
//!
//! No variant allocates: [`check`](crate::check) returns errors without touching the heap,
//! and every variant carries the detail needed to diagnose the peer (expected vs actual,
//! declared length vs bound, offending field).

use core::fmt;

use crate::kind::MessageKind;

/// Everything that can go wrong while checking, parsing or encoding a frame.
///
/// For the two checksum variants, `expected` is the value the frame *declares* and
/// `actual` is the value computed over the bytes that were received (or, when encoding,
/// over the bytes handed in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The first four bytes are not [`MAGIC`](crate::MAGIC): not our protocol or the stream is desynchronized.
    #[error("bad frame magic {got:#010x} (expected {expected:#010x})", expected = crate::MAGIC)]
    BadMagic {
        /// The first four header bytes, read as a little-endian u32.
        got: u32,
    },
    /// The header's version byte is not one this build speaks.
    #[error("unsupported protocol version {got} (supported: {supported:?})")]
    UnsupportedVersion {
        /// Version byte found in the header.
        got: u8,
        /// Versions this build accepts.
        supported: &'static [u8],
    },
    /// The header CRC does not match the header bytes.
    #[error("header checksum mismatch: header declares {expected:#010x}, computed {actual:#010x}")]
    HeaderChecksum {
        /// CRC stored in the header.
        expected: u32,
        /// CRC computed over header bytes 0..24.
        actual: u32,
    },
    /// The payload CRC does not match the payload bytes.
    #[error(
        "payload checksum mismatch: header declares {expected:#010x}, computed {actual:#010x}"
    )]
    PayloadChecksum {
        /// CRC stored in the header.
        expected: u32,
        /// CRC computed over the payload.
        actual: u32,
    },
    /// The end-to-end data checksum of a ResyncData frame does not match its data.
    #[error("resync data checksum mismatch at offset {offset}: frame declares {expected:#010x}, computed {actual:#010x}")]
    DataChecksum {
        /// Device offset of the data.
        offset: u64,
        /// Checksum field of the frame.
        expected: u32,
        /// CRC computed over the data.
        actual: u32,
    },
    /// A declared payload length exceeds the bound for its message kind.
    #[error("payload of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Declared (or, when encoding, produced) payload length.
        len: u64,
        /// The bound for this message kind.
        max: u64,
    },
    /// The header's kind byte names no known message.
    #[error("unknown message kind {kind:#04x}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// A field violates the payload layout or a documented constraint.
    #[error("malformed {kind:?} frame: field `{field}`: {reason}")]
    Malformed {
        /// Message kind being decoded or encoded.
        kind: MessageKind,
        /// Name of the offending field, as in docs/protocol.md.
        field: &'static str,
        /// What is wrong with it.
        reason: Malformation,
    },
    /// [`Frame::parse`](crate::Frame::parse) was handed less than one complete frame.
    #[error("frame incomplete: at least {needed} more bytes needed")]
    Truncated {
        /// Minimum number of additional bytes required.
        needed: usize,
    },
    /// [`Frame::parse`](crate::Frame::parse) was handed more than one frame.
    #[error("{extra} trailing bytes after a frame of {frame_len} bytes")]
    TrailingBytes {
        /// Length of the frame at the start of the buffer.
        frame_len: usize,
        /// Bytes left over after it.
        extra: usize,
    },
}

/// Why a field is malformed (the `reason` of [`ProtoError::Malformed`]). Copy, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformation {
    /// The field needs more bytes than the payload has left.
    Truncated {
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the payload.
        have: usize,
    },
    /// A string or list is longer than its bound.
    TooLong {
        /// Declared length (bytes or elements).
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A string or list that must not be empty is empty, or a length/count that must be positive is zero.
    Empty,
    /// A string field is not valid UTF-8.
    InvalidUtf8,
    /// Bytes remain after the last field of a fixed layout.
    TrailingBytes {
        /// Number of unconsumed bytes.
        extra: usize,
    },
    /// Flag bits that are reserved (must be zero) or not allowed on this message kind are set.
    UnknownFlags {
        /// The offending bits.
        bits: u32,
    },
    /// An enumerated field holds a value with no meaning.
    InvalidValue {
        /// The value found.
        value: u64,
    },
    /// A length field disagrees with the data that follows it.
    LengthMismatch {
        /// Length declared by the field.
        declared: u64,
        /// Length actually present (or implied).
        actual: u64,
    },
    /// `offset + length` overflows u64.
    RangeOverflow {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        length: u64,
    },
    /// A documented constraint is violated (the text names it).
    Constraint(&'static str),
}

impl fmt::Display for Malformation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Malformation::Truncated { need, have } => {
                write!(
                    f,
                    "needs {need} bytes but only {have} remain in the payload"
                )
            }
            Malformation::TooLong { len, max } => write!(f, "length {len} exceeds the bound {max}"),
            Malformation::Empty => f.write_str("must not be empty or zero"),
            Malformation::InvalidUtf8 => f.write_str("not valid UTF-8"),
            Malformation::TrailingBytes { extra } => {
                write!(f, "{extra} unexpected bytes after the last field")
            }
            Malformation::UnknownFlags { bits } => {
                write!(f, "reserved or disallowed flag bits {bits:#x} set")
            }
            Malformation::InvalidValue { value } => write!(f, "invalid value {value}"),
            Malformation::LengthMismatch { declared, actual } => {
                write!(f, "declares {declared} bytes but {actual} are present")
            }
            Malformation::RangeOverflow { offset, length } => {
                write!(f, "range offset {offset} + length {length} overflows u64")
            }
            Malformation::Constraint(what) => f.write_str(what),
        }
    }
}
