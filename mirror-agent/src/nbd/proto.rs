//! NBD wire constants and codecs (big-endian, as the NBD protocol mandates;
//! this is the one wire format in the project that is not little-endian,
//! because it is not ours).
//!
//! Reference: `doc/proto.md` of the NetworkBlockDevice/nbd project. The
//! protocol has no version byte or CRC; its magics are checked on every
//! request and every option, and every length is bounded before anything is
//! allocated.
//!
//! Decoders are two-step: [`RequestHeader::decode`] returns `None` when fewer
//! than [`REQUEST_HEADER_LEN`] bytes are available ("incomplete" is normal),
//! and only then checks the magic and parses.

use std::io;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after `NBDMAGIC`, and by the client before each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bits).
/// Server supports fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server will omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME` if asked.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits).
/// Client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client asks the server to omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
/// Always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` supported on reads (only with structured replies).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Flush/FUA effects are visible across all connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
/// Select an export and enter transmission (cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during option haggling.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS (not supported yet).
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts (not supported).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts (not supported).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// 64-bit extended headers (not supported).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// Success / end of a list.
pub const REP_ACK: u32 = 1;
/// One export in an `NBD_OPT_LIST` answer.
pub const REP_SERVER: u32 = 2;
/// One information item in an `NBD_OPT_INFO`/`NBD_OPT_GO` answer.
pub const REP_INFO: u32 = 3;
/// One metadata context in an `NBD_OPT_LIST_META_CONTEXT` /
/// `NBD_OPT_SET_META_CONTEXT` answer: context id (u32), then its name.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option known but forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option known but syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Export not available.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;

// Information types.
/// Size and transmission flags (mandatory).
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum / preferred / maximum block size.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
/// Read.
pub const CMD_READ: u16 = 0;
/// Write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim / discard.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status of a range (answered for the selected metadata contexts).
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read reply must not be fragmented.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent per context, no longer than the request.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply flags and types.
/// Last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// No payload; only valid as the final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Offset + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Block status: context id, then (length u32, flags u32) descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Error without offset.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// Metadata contexts.
/// The one metadata context served: allocation of the backing store.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Its id in `NBD_REP_META_CONTEXT` and block status chunks (any nonzero
/// value would do; ids are per connection and opaque to clients).
pub const META_BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation`: not allocated on the backing store.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// NBD error values (fixed by the protocol, independent of the host errno).
/// Operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Input/output error.
pub const NBD_EIO: u32 = 5;
/// Cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Size of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of an option header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// Maps an engine error to the NBD error value sent to the client.
///
/// The NBD protocol fixes its own numbering; host errnos that have no NBD
/// counterpart become `EIO`, and `EDQUOT`/`EFBIG` become `ENOSPC` as the
/// protocol recommends.
pub fn nbd_errno(err: &io::Error) -> u32 {
    match err.raw_os_error() {
        Some(libc::EPERM) => NBD_EPERM,
        Some(libc::EIO) => NBD_EIO,
        Some(libc::ENOMEM) => NBD_ENOMEM,
        Some(libc::EINVAL) => NBD_EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NBD_ENOSPC,
        Some(libc::EOVERFLOW) => NBD_EOVERFLOW,
        Some(libc::ENOTSUP) => NBD_ENOTSUP,
        Some(libc::ESHUTDOWN) => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// A parsed transmission request header (the payload of a write follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Opaque client handle, echoed in the reply.
    pub handle: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte length (payload length for writes).
    pub length: u32,
}

/// A request header whose magic is not `NBD_REQUEST_MAGIC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic: expected {expected:#010x}, got {actual:#010x}")]
pub struct BadRequestMagic {
    /// `REQUEST_MAGIC`.
    pub expected: u32,
    /// What the client sent.
    pub actual: u32,
}

impl RequestHeader {
    /// Decodes a header from the front of `buf`.
    ///
    /// `Ok(None)` when fewer than [`REQUEST_HEADER_LEN`] bytes are available
    /// (incomplete, not an error); `Err` on a wrong magic.
    pub fn decode(buf: &[u8]) -> Result<Option<RequestHeader>, BadRequestMagic> {
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let magic = be_u32(&buf[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(BadRequestMagic {
                expected: REQUEST_MAGIC,
                actual: magic,
            });
        }
        Ok(Some(RequestHeader {
            flags: be_u16(&buf[4..6]),
            kind: be_u16(&buf[6..8]),
            handle: be_u64(&buf[8..16]),
            offset: be_u64(&buf[16..24]),
            length: be_u32(&buf[24..28]),
        }))
    }

    /// Encodes the header (used by tests and tools acting as a client).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A parsed `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Requested export name (empty = default export).
    pub name: String,
    /// Requested information types.
    pub infos: Vec<u16>,
}

/// Why an `NBD_OPT_INFO`/`NBD_OPT_GO` payload is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoRequestError {
    /// The payload is shorter than its fields say.
    #[error("option data of {actual} bytes is too short: need {expected}")]
    TooShort {
        /// Bytes needed.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The payload is longer than its fields say.
    #[error("option data of {actual} bytes has trailing bytes: expected exactly {expected}")]
    TrailingBytes {
        /// Bytes expected.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The export name is not UTF-8.
    #[error("export name is not valid UTF-8")]
    NameNotUtf8,
}

impl InfoRequest {
    /// Parses the option data of `NBD_OPT_INFO` / `NBD_OPT_GO`: name length,
    /// name, count of information requests, the requests.
    pub fn decode(data: &[u8]) -> Result<InfoRequest, InfoRequestError> {
        let too_short = |expected: usize| InfoRequestError::TooShort {
            expected,
            actual: data.len(),
        };
        if data.len() < 6 {
            return Err(too_short(6));
        }
        let name_len = be_u32(&data[0..4]) as usize;
        // name_len <= data.len() - 6 (checked without overflow).
        if name_len > data.len() - 6 {
            return Err(too_short(name_len.saturating_add(6)));
        }
        let name_end = 4 + name_len;
        let name = std::str::from_utf8(&data[4..name_end])
            .map_err(|_| InfoRequestError::NameNotUtf8)?
            .to_owned();
        let count = be_u16(&data[name_end..name_end + 2]) as usize;
        let expected = name_end + 2 + 2 * count;
        if data.len() < expected {
            return Err(too_short(expected));
        }
        if data.len() > expected {
            return Err(InfoRequestError::TrailingBytes {
                expected,
                actual: data.len(),
            });
        }
        let infos = data[name_end + 2..].chunks_exact(2).map(be_u16).collect();
        Ok(InfoRequest { name, infos })
    }
}

/// A parsed `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`
/// payload: export name length, name, number of queries, each query as
/// length + string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for (empty = default export).
    pub name: String,
    /// The queries, each `namespace:leaf`.
    pub queries: Vec<String>,
}

/// Why a meta context option payload is invalid (`NBD_REP_ERR_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaContextError {
    /// The payload ends inside a field.
    #[error("option data of {actual} bytes ends inside {field}")]
    Truncated {
        /// The field cut short.
        field: &'static str,
        /// Bytes present.
        actual: usize,
    },
    /// Bytes after the last query.
    #[error("option data has {extra} bytes after its last query")]
    TrailingBytes {
        /// Bytes left over.
        extra: usize,
    },
    /// A string longer than the protocol's 4096-byte limit.
    #[error("{field} of {len} bytes is longer than the protocol's 4096-byte limit")]
    TooLong {
        /// Which string.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// Not UTF-8.
    #[error("{field} is not valid UTF-8")]
    NotUtf8 {
        /// Which string.
        field: &'static str,
    },
    /// A query without the `namespace:` the protocol requires.
    #[error("query {query:?} does not start with a namespace and a colon")]
    NoNamespace {
        /// The query.
        query: String,
    },
}

/// Longest string the protocol allows (export names, context queries, error
/// messages).
pub const MAX_STRING: usize = 4096;

/// `s` cut to [`MAX_STRING`] bytes on a character boundary, for messages the
/// server sends (which may quote client input).
pub(crate) fn cut_to_string_limit(s: &str) -> &str {
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl MetaContextRequest {
    /// Parses the option data. Every length is checked against the bytes
    /// present before anything is taken (the option itself is bounded by
    /// `Limits::max_option_len`), so the number of queries is bounded by the
    /// payload (four bytes each at least).
    pub fn decode(data: &[u8]) -> Result<MetaContextRequest, MetaContextError> {
        let mut at = 0usize;
        let mut take = |n: usize, field: &'static str| -> Result<&[u8], MetaContextError> {
            if data.len() - at < n {
                return Err(MetaContextError::Truncated {
                    field,
                    actual: data.len(),
                });
            }
            let b = &data[at..at + n];
            at += n;
            Ok(b)
        };
        let string = |b: &[u8], field: &'static str| -> Result<String, MetaContextError> {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| MetaContextError::NotUtf8 { field })
        };
        let name_len = be_u32(take(4, "the export name length")?) as usize;
        if name_len > MAX_STRING {
            return Err(MetaContextError::TooLong {
                field: "export name",
                len: name_len,
            });
        }
        let name = string(take(name_len, "the export name")?, "export name")?;
        let count = be_u32(take(4, "the number of queries")?) as usize;
        let mut queries = Vec::new();
        for _ in 0..count {
            let len = be_u32(take(4, "a query length")?) as usize;
            if len > MAX_STRING {
                return Err(MetaContextError::TooLong {
                    field: "query",
                    len,
                });
            }
            let q = string(take(len, "a query")?, "query")?;
            if !q.contains(':') {
                return Err(MetaContextError::NoNamespace { query: q });
            }
            queries.push(q);
        }
        if at != data.len() {
            return Err(MetaContextError::TrailingBytes {
                extra: data.len() - at,
            });
        }
        Ok(MetaContextRequest { name, queries })
    }
}

impl MetaContextRequest {
    /// The option data for this request (what [`Self::decode`] parses).
    pub fn encode(&self) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        d.extend_from_slice(self.name.as_bytes());
        d.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }
}

/// Appends one `NBD_REP_META_CONTEXT` reply.
pub fn put_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut item = Vec::with_capacity(4 + name.len());
    item.extend_from_slice(&id.to_be_bytes());
    item.extend_from_slice(name.as_bytes());
    put_option_reply(out, option, REP_META_CONTEXT, &item);
}

/// Appends a complete, final (`DONE`) `NBD_REPLY_TYPE_BLOCK_STATUS` chunk
/// for context `id` with `(length, flags)` descriptors (at least one; the
/// caller bounds their number).
pub fn put_block_status_chunk(out: &mut Vec<u8>, handle: u64, id: u32, descriptors: &[(u32, u32)]) {
    let length = 4 + 8 * descriptors.len();
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        length as u32,
    );
    out.extend_from_slice(&id.to_be_bytes());
    for &(len, flags) in descriptors {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// Appends an option reply header and its data to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Callers only pass data bounded by the 4096-byte string limit or fixed-size items.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends a simple reply header to `out` (read data, if any, follows separately).
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, handle: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// Appends a structured reply chunk header to `out`.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends a complete, final (`DONE`) structured error chunk: `ERROR_OFFSET`
/// when `offset` is given, else `ERROR`. The message is cut to the
/// protocol's 4096-byte string limit on a character boundary.
pub fn put_error_chunk(
    out: &mut Vec<u8>,
    handle: u64,
    error: u32,
    offset: Option<u64>,
    message: &str,
) {
    let msg = cut_to_string_limit(message).as_bytes();
    let (kind, extra) = match offset {
        Some(_) => (REPLY_TYPE_ERROR_OFFSET, 8),
        None => (REPLY_TYPE_ERROR, 0),
    };
    let length = 6 + msg.len() + extra;
    put_chunk_header(out, REPLY_FLAG_DONE, kind, handle, length as u32);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    if let Some(off) = offset {
        out.extend_from_slice(&off.to_be_bytes());
    }
}

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_header_roundtrip(flags: u16, kind: u16, handle: u64, offset: u64, length: u32) {
            let h = RequestHeader { flags, kind, handle, offset, length };
            let enc = h.encode();
            for cut in 0..REQUEST_HEADER_LEN {
                prop_assert_eq!(RequestHeader::decode(&enc[..cut]), Ok(None));
            }
            prop_assert_eq!(RequestHeader::decode(&enc), Ok(Some(h)));
        }

        #[test]
        fn request_header_bad_magic(mut bytes in proptest::collection::vec(any::<u8>(), REQUEST_HEADER_LEN)) {
            if be_u32(&bytes[0..4]) == REQUEST_MAGIC {
                bytes[0] ^= 1;
            }
            let r = RequestHeader::decode(&bytes);
            prop_assert!(r.is_err());
        }

        #[test]
        fn info_request_roundtrip(name in "[a-z0-9]{0,40}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let mut data = Vec::new();
            data.extend_from_slice(&(name.len() as u32).to_be_bytes());
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
            for i in &infos {
                data.extend_from_slice(&i.to_be_bytes());
            }
            prop_assert_eq!(InfoRequest::decode(&data), Ok(InfoRequest { name: name.clone(), infos: infos.clone() }));
            // Every truncation is rejected, never panics.
            for cut in 0..data.len() {
                prop_assert!(InfoRequest::decode(&data[..cut]).is_err());
            }
            data.push(0);
            prop_assert!(InfoRequest::decode(&data).is_err(), "trailing byte must be rejected");
        }

        #[test]
        fn meta_context_request_roundtrip(
            name in "[a-z0-9]{0,20}",
            queries in proptest::collection::vec("[a-z]{1,8}:[a-z:]{0,16}", 0..6),
        ) {
            let data = meta_request(&name, &queries);
            let want = MetaContextRequest { name: name.clone(), queries: queries.clone() };
            prop_assert_eq!(MetaContextRequest::decode(&data), Ok(want));
            for cut in 0..data.len() {
                prop_assert!(MetaContextRequest::decode(&data[..cut]).is_err());
            }
            let mut longer = data.clone();
            longer.push(0);
            prop_assert_eq!(
                MetaContextRequest::decode(&longer),
                Err(MetaContextError::TrailingBytes { extra: 1 })
            );
        }

        #[test]
        fn meta_context_request_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = MetaContextRequest::decode(&data);
        }

        #[test]
        fn info_request_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = InfoRequest::decode(&data);
        }
    }

    fn meta_request(name: &str, queries: &[String]) -> Vec<u8> {
        MetaContextRequest {
            name: name.into(),
            queries: queries.to_vec(),
        }
        .encode()
    }

    #[test]
    fn meta_context_request_refusals_name_the_problem() {
        let no_ns = meta_request("md1", &["allocation".to_string()]);
        assert_eq!(
            MetaContextRequest::decode(&no_ns),
            Err(MetaContextError::NoNamespace {
                query: "allocation".into()
            })
        );
        // A query count far beyond the payload ends at the first missing length.
        let mut huge = meta_request("", &[]);
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = MetaContextRequest::decode(&huge).unwrap_err();
        assert!(
            matches!(
                e,
                MetaContextError::Truncated {
                    field: "a query length",
                    ..
                }
            ),
            "{e}"
        );
        let mut long = Vec::new();
        long.extend_from_slice(&5000u32.to_be_bytes());
        long.extend_from_slice(&[b'a'; 5000]);
        long.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            MetaContextRequest::decode(&long),
            Err(MetaContextError::TooLong {
                field: "export name",
                len: 5000
            })
        );
        let bad = [0, 0, 0, 1, 0xff, 0, 0, 0, 0];
        assert_eq!(
            MetaContextRequest::decode(&bad),
            Err(MetaContextError::NotUtf8 {
                field: "export name"
            })
        );
    }

    #[test]
    fn messages_are_cut_to_the_string_limit_on_a_character_boundary() {
        assert_eq!(cut_to_string_limit("short"), "short");
        let long = "é".repeat(MAX_STRING); // 2 bytes each
        let cut = cut_to_string_limit(&long);
        assert_eq!(cut.len(), MAX_STRING);
        let odd = format!("a{long}");
        assert_eq!(cut_to_string_limit(&odd).len(), MAX_STRING - 1);
    }

    #[test]
    fn block_status_chunk_layout() {
        let mut out = Vec::new();
        put_block_status_chunk(
            &mut out,
            9,
            META_BASE_ALLOCATION_ID,
            &[(4096, 0), (8192, 3)],
        );
        assert_eq!(be_u32(&out[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be_u16(&out[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&out[6..8]), REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(be_u64(&out[8..16]), 9);
        assert_eq!(be_u32(&out[16..20]), 4 + 16);
        assert_eq!(out.len(), 20 + 4 + 16);
        assert_eq!(be_u32(&out[20..24]), META_BASE_ALLOCATION_ID);
        assert_eq!(be_u32(&out[24..28]), 4096);
        assert_eq!(be_u32(&out[28..32]), 0);
        assert_eq!(be_u32(&out[32..36]), 8192);
        assert_eq!(be_u32(&out[36..40]), STATE_HOLE | STATE_ZERO);
    }

    #[test]
    fn errno_mapping() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(nbd_errno(&e(libc::EPERM)), 1);
        assert_eq!(nbd_errno(&e(libc::EIO)), 5);
        assert_eq!(nbd_errno(&e(libc::ENOMEM)), 12);
        assert_eq!(nbd_errno(&e(libc::EINVAL)), 22);
        assert_eq!(nbd_errno(&e(libc::ENOSPC)), 28);
        assert_eq!(nbd_errno(&e(libc::EDQUOT)), 28);
        assert_eq!(nbd_errno(&e(libc::EOVERFLOW)), 75);
        assert_eq!(nbd_errno(&e(libc::ENOTSUP)), 95);
        assert_eq!(nbd_errno(&e(libc::ESHUTDOWN)), 108);
        assert_eq!(nbd_errno(&e(libc::EBADF)), 5);
        assert_eq!(nbd_errno(&io::Error::other("no errno")), 5);
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = Vec::new();
        put_error_chunk(&mut out, 7, NBD_EIO, Some(4096), "boom");
        assert_eq!(be_u32(&out[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be_u16(&out[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&out[6..8]), REPLY_TYPE_ERROR_OFFSET);
        assert_eq!(be_u64(&out[8..16]), 7);
        assert_eq!(be_u32(&out[16..20]) as usize, out.len() - 20);
        assert_eq!(be_u32(&out[20..24]), NBD_EIO);
        assert_eq!(be_u16(&out[24..26]), 4);
        assert_eq!(&out[26..30], b"boom");
        assert_eq!(be_u64(&out[30..38]), 4096);
    }
}
