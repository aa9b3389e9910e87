//! The fixed 28-byte frame header and the allocation-free [`check`] step.
//!
//! ```text
//! offset size field        notes
//!      0    4 magic        bytes "NBMR" (u32 LE 0x524D424E)
//!      4    1 version      protocol version of this frame (see crate::version)
//!      5    1 kind         MessageKind
//!      6    2 flags        u16 LE; bits allowed per kind, all others must be zero
//!      8    8 seq          u64 LE; sender's sequence number of this frame
//!     16    4 payload_len  u32 LE; bytes following the header
//!     20    4 payload_crc  u32 LE; CRC-32 (IEEE, crc32fast) of the payload (0 when empty)
//!     24    4 header_crc   u32 LE; CRC-32 of header bytes 0..24
//! ```

use crate::error::{Malformation, ProtoError};
use crate::kind::MessageKind;
use crate::limits::RESYNC_DATA_FIXED;
use crate::version::SUPPORTED_VERSIONS;
use crate::MAGIC;

/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 28;

/// A validated frame header (see the module doc for the byte layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version byte.
    pub version: u8,
    /// Message kind.
    pub kind: MessageKind,
    /// Header flags (already checked against [`MessageKind::allowed_flags`]).
    pub flags: u16,
    /// Sender's sequence number.
    pub seq: u64,
    /// Payload length (already checked against [`MessageKind::max_payload`]).
    pub payload_len: u32,
    /// CRC-32 of the payload.
    pub payload_crc: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Header {
    /// Validates the first [`HEADER_LEN`] bytes of `buf`, in this order: magic, version,
    /// header CRC, kind, payload length bound, flags. The version is checked before the CRC
    /// so that a peer speaking a newer layout gets `UnsupportedVersion`, not a checksum error.
    ///
    /// Returns [`ProtoError::Truncated`] if `buf` is shorter than a header. Never allocates.
    pub fn decode(buf: &[u8]) -> Result<Header, ProtoError> {
        if buf.len() < HEADER_LEN {
            return Err(ProtoError::Truncated {
                needed: HEADER_LEN - buf.len(),
            });
        }
        let magic = le_u32(buf, 0);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic { got: magic });
        }
        let version = buf[4];
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(ProtoError::UnsupportedVersion {
                got: version,
                supported: SUPPORTED_VERSIONS,
            });
        }
        let expected = le_u32(buf, 24);
        let actual = crc32fast::hash(&buf[..24]);
        if expected != actual {
            return Err(ProtoError::HeaderChecksum { expected, actual });
        }
        let kind = MessageKind::from_u8(buf[5]).ok_or(ProtoError::UnknownKind { kind: buf[5] })?;
        let payload_len = le_u32(buf, 16);
        let max = kind.max_payload();
        if payload_len > max {
            return Err(ProtoError::TooLarge {
                len: u64::from(payload_len),
                max: u64::from(max),
            });
        }
        let flags = u16::from_le_bytes([buf[6], buf[7]]);
        let bad = flags & !kind.allowed_flags();
        if bad != 0 {
            return Err(ProtoError::Malformed {
                kind,
                field: "flags",
                reason: Malformation::UnknownFlags {
                    bits: u32::from(bad),
                },
            });
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&buf[8..16]);
        Ok(Header {
            version,
            kind,
            flags,
            seq: u64::from_le_bytes(seq),
            payload_len,
            payload_crc: le_u32(buf, 20),
        })
    }

    /// Serializes the header, computing the header CRC.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.version;
        b[5] = self.kind.as_u8();
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Total frame length (header + payload).
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// Outcome of [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The buffer holds only a prefix of a frame; at least `needed` more bytes are required.
    /// This is the normal state of a stream, not an error.
    Incomplete {
        /// Minimum number of additional bytes before calling again is useful.
        needed: usize,
    },
    /// The buffer starts with a complete frame of `frame_len` bytes whose header and payload
    /// CRCs are correct.
    Complete {
        /// Length of that frame (header + payload).
        frame_len: usize,
    },
}

/// Step one of decoding: validates the frame at the start of `buf` without allocating.
///
/// Header errors are reported as soon as the 28 header bytes are present, so an oversized
/// length (e.g. 4 GiB) is rejected with [`ProtoError::TooLarge`] from the header alone. Once
/// the whole payload is present its CRC is verified. Bytes after the frame are ignored.
pub fn check(buf: &[u8]) -> Result<Check, ProtoError> {
    if buf.len() < HEADER_LEN {
        return Ok(Check::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    }
    let header = Header::decode(buf)?;
    let frame_len = header.frame_len();
    if buf.len() < frame_len {
        return Ok(Check::Incomplete {
            needed: frame_len - buf.len(),
        });
    }
    let payload = &buf[HEADER_LEN..frame_len];
    if header.kind == MessageKind::ResyncData && payload.len() >= RESYNC_DATA_FIXED {
        // The data is hashed once: its CRC checks the data checksum field
        // and, combined with the fixed fields' CRC, the payload CRC.
        let (fields, data) = payload.split_at(RESYNC_DATA_FIXED);
        let data_crc = crc32fast::hash(data);
        let actual = crc_of_parts(fields, data_crc, data.len());
        if actual != header.payload_crc {
            return Err(ProtoError::PayloadChecksum {
                expected: header.payload_crc,
                actual,
            });
        }
        let expected = u32::from_le_bytes(fields[8..12].try_into().expect("4 bytes"));
        if data_crc != expected {
            return Err(ProtoError::DataChecksum {
                offset: u64::from_le_bytes(fields[..8].try_into().expect("8 bytes")),
                expected,
                actual: data_crc,
            });
        }
        return Ok(Check::Complete { frame_len });
    }
    let actual = crc32fast::hash(payload);
    if actual != header.payload_crc {
        return Err(ProtoError::PayloadChecksum {
            expected: header.payload_crc,
            actual,
        });
    }
    Ok(Check::Complete { frame_len })
}

/// CRC-32 of `fields ‖ data` from the CRC of `data` (`data_crc` over
/// `data_len` bytes) without reading the data again (CRC combination).
pub(crate) fn crc_of_parts(fields: &[u8], data_crc: u32, data_len: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(fields);
    h.combine(&crc32fast::Hasher::new_with_initial_len(
        data_crc,
        data_len as u64,
    ));
    h.finalize()
}
