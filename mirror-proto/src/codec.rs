//! [`Frame`]: step two of decoding ([`Frame::parse`], zero-copy for data payloads) and encoding
//! ([`Frame::encode`], [`Frame::encode_vectored`]).
//!
//! Encoding validates exactly what parsing validates, so a frame that encodes successfully
//! always parses back to an equal frame.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Malformation, ProtoError};
use crate::header::{check, crc_of_parts, Check, Header, HEADER_LEN};
use crate::kind::{MessageKind, FLAG_FUA, FLAG_NO_HOLE};
use crate::limits::*;
use crate::message::*;
use crate::version::{HELLO_VERSION, PROTOCOL_VERSION};

/// One protocol frame: the sender's sequence number and the message.
///
/// Layout on the wire: the 28-byte [`Header`] followed by the message payload. The header's
/// flags are derived from the message ([`Message::flags`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Sender's sequence number for this frame; acks refer to it.
    pub seq: u64,
    /// The message.
    pub msg: Message,
}

type Res<T> = Result<T, ProtoError>;

fn malformed(kind: MessageKind, field: &'static str, reason: Malformation) -> ProtoError {
    ProtoError::Malformed {
        kind,
        field,
        reason,
    }
}

// ---- shared validation (used by both parse and encode) ----

fn v_name(kind: MessageKind, field: &'static str, s: &str) -> Res<()> {
    if s.is_empty() {
        return Err(malformed(kind, field, Malformation::Empty));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(malformed(
            kind,
            field,
            Malformation::TooLong {
                len: s.len(),
                max: MAX_NAME_LEN,
            },
        ));
    }
    Ok(())
}

fn v_range(kind: MessageKind, offset: u64, length: u64) -> Res<()> {
    if length == 0 {
        return Err(malformed(kind, "length", Malformation::Empty));
    }
    if offset.checked_add(length).is_none() {
        return Err(malformed(
            kind,
            "length",
            Malformation::RangeOverflow { offset, length },
        ));
    }
    Ok(())
}

fn v_data_len(kind: MessageKind, field: &'static str, len: usize) -> Res<()> {
    if len == 0 {
        return Err(malformed(kind, field, Malformation::Empty));
    }
    if len > MAX_DATA_LEN {
        return Err(malformed(
            kind,
            field,
            Malformation::TooLong {
                len,
                max: MAX_DATA_LEN,
            },
        ));
    }
    Ok(())
}

fn v_region_size(kind: MessageKind, v: u32) -> Res<()> {
    if !v.is_power_of_two() {
        return Err(malformed(
            kind,
            "region_size",
            Malformation::Constraint("must be a power of two"),
        ));
    }
    Ok(())
}

fn v_status(kind: MessageKind, status: i32) -> Res<()> {
    if status > 0 {
        return Err(malformed(
            kind,
            "status",
            Malformation::Constraint("must be 0 or a negative errno"),
        ));
    }
    Ok(())
}

fn v_versions(kind: MessageKind, versions: &[u8]) -> Res<()> {
    if versions.is_empty() {
        return Err(malformed(kind, "versions", Malformation::Empty));
    }
    if versions.len() > MAX_VERSIONS {
        return Err(malformed(
            kind,
            "versions",
            Malformation::TooLong {
                len: versions.len(),
                max: MAX_VERSIONS,
            },
        ));
    }
    if versions[0] == 0 {
        return Err(malformed(
            kind,
            "versions",
            Malformation::Constraint("version 0 is not valid"),
        ));
    }
    if versions.windows(2).any(|w| w[0] >= w[1]) {
        return Err(malformed(
            kind,
            "versions",
            Malformation::Constraint("must be strictly ascending"),
        ));
    }
    Ok(())
}

fn v_history(kind: MessageKind, len: usize) -> Res<()> {
    if len > MAX_GENERATION_HISTORY {
        return Err(malformed(
            kind,
            "generation.history",
            Malformation::TooLong {
                len,
                max: MAX_GENERATION_HISTORY,
            },
        ));
    }
    Ok(())
}

fn v_entries(kind: MessageKind, len: usize, allow_empty: bool) -> Res<()> {
    if len == 0 && !allow_empty {
        return Err(malformed(kind, "entries", Malformation::Empty));
    }
    if len > MAX_CHECKSUM_ENTRIES {
        return Err(malformed(
            kind,
            "entries",
            Malformation::TooLong {
                len,
                max: MAX_CHECKSUM_ENTRIES,
            },
        ));
    }
    Ok(())
}

fn v_bitmap(c: &BitmapChunk) -> Res<()> {
    let k = MessageKind::BitmapChunk;
    if c.total_chunks == 0 {
        return Err(malformed(k, "total_chunks", Malformation::Empty));
    }
    if c.chunk_index >= c.total_chunks {
        return Err(malformed(
            k,
            "chunk_index",
            Malformation::Constraint("must be below total_chunks"),
        ));
    }
    v_region_size(k, c.region_size)?;
    if c.region_count == 0 {
        return Err(malformed(k, "region_count", Malformation::Empty));
    }
    if c.first_region
        .checked_add(u64::from(c.region_count))
        .is_none()
    {
        return Err(malformed(
            k,
            "region_count",
            Malformation::RangeOverflow {
                offset: c.first_region,
                length: u64::from(c.region_count),
            },
        ));
    }
    let want = (c.region_count as usize).div_ceil(8);
    if c.bits.len() != want {
        return Err(malformed(
            k,
            "bits",
            Malformation::LengthMismatch {
                declared: want as u64,
                actual: c.bits.len() as u64,
            },
        ));
    }
    if want > MAX_DATA_LEN {
        return Err(malformed(
            k,
            "bits",
            Malformation::TooLong {
                len: want,
                max: MAX_DATA_LEN,
            },
        ));
    }
    let used = c.region_count % 8;
    if used != 0 {
        let last = c.bits[want - 1];
        if last >> used != 0 {
            return Err(malformed(
                k,
                "bits",
                Malformation::Constraint("padding bits of the last byte must be zero"),
            ));
        }
    }
    Ok(())
}

fn v_error_message(msg: &str) -> Res<()> {
    if msg.len() > MAX_ERROR_MESSAGE_LEN {
        return Err(malformed(
            MessageKind::Error,
            "message",
            Malformation::TooLong {
                len: msg.len(),
                max: MAX_ERROR_MESSAGE_LEN,
            },
        ));
    }
    Ok(())
}

fn v_control_len(len: usize) -> Res<()> {
    if len == 0 {
        return Err(malformed(
            MessageKind::Control,
            "length",
            Malformation::Empty,
        ));
    }
    if len > MAX_CONTROL_LEN {
        return Err(malformed(
            MessageKind::Control,
            "length",
            Malformation::TooLong {
                len,
                max: MAX_CONTROL_LEN,
            },
        ));
    }
    Ok(())
}

// ---- parsing ----

/// Cursor over one payload. Every read is bounds-checked against the payload before slicing.
struct Reader<'a> {
    payload: &'a Bytes,
    pos: usize,
    kind: MessageKind,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.payload.len() - self.pos
    }

    fn take(&mut self, field: &'static str, n: usize) -> Res<&'a [u8]> {
        let have = self.remaining();
        if n > have {
            return Err(malformed(
                self.kind,
                field,
                Malformation::Truncated { need: n, have },
            ));
        }
        let payload: &'a Bytes = self.payload;
        let s = &payload[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Res<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(field, N)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Res<u8> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Res<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn i32(&mut self, field: &'static str) -> Res<i32> {
        Ok(i32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// Zero-copy sub-slice of the received frame.
    fn bytes(&mut self, field: &'static str, n: usize) -> Res<Bytes> {
        let have = self.remaining();
        if n > have {
            return Err(malformed(
                self.kind,
                field,
                Malformation::Truncated { need: n, have },
            ));
        }
        let b = self.payload.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    fn string(&mut self, field: &'static str, len: usize) -> Res<String> {
        let raw = self.take(field, len)?;
        match core::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(malformed(self.kind, field, Malformation::InvalidUtf8)),
        }
    }

    fn name(&mut self, field: &'static str) -> Res<String> {
        let len = self.u8(field)? as usize;
        let s = self.string(field, len)?;
        v_name(self.kind, field, &s)?;
        Ok(s)
    }

    fn generation(&mut self) -> Res<Generation> {
        let current = self.u64("generation.current")?;
        let bitmap = self.u64("generation.bitmap")?;
        let n = self.u8("generation.history_count")? as usize;
        v_history(self.kind, n)?;
        // Bounded by MAX_GENERATION_HISTORY above and by the payload length below.
        let have = self.remaining();
        if n * 8 > have {
            return Err(malformed(
                self.kind,
                "generation.history",
                Malformation::Truncated { need: n * 8, have },
            ));
        }
        let mut history = Vec::with_capacity(n);
        for _ in 0..n {
            history.push(self.u64("generation.history")?);
        }
        Ok(Generation {
            current,
            bitmap,
            history,
        })
    }

    fn entries(&mut self, allow_empty: bool) -> Res<Vec<RegionChecksum>> {
        let n = self.u32("count")? as usize;
        v_entries(self.kind, n, allow_empty)?;
        let need = n * 12;
        let have = self.remaining();
        if need != have {
            return Err(malformed(
                self.kind,
                "entries",
                Malformation::LengthMismatch {
                    declared: need as u64,
                    actual: have as u64,
                },
            ));
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let region = self.u64("entries.region")?;
            let checksum = self.u32("entries.checksum")?;
            v.push(RegionChecksum { region, checksum });
        }
        Ok(v)
    }

    /// The data block that ends the payload: its declared length must equal what is left.
    fn data_tail(&mut self, declared: u32) -> Res<Bytes> {
        let have = self.remaining();
        if declared as usize != have {
            return Err(malformed(
                self.kind,
                "length",
                Malformation::LengthMismatch {
                    declared: u64::from(declared),
                    actual: have as u64,
                },
            ));
        }
        v_data_len(self.kind, "length", have)?;
        self.bytes("data", have)
    }

    fn finish(&self) -> Res<()> {
        let extra = self.remaining();
        if extra != 0 {
            return Err(malformed(
                self.kind,
                "payload",
                Malformation::TrailingBytes { extra },
            ));
        }
        Ok(())
    }
}

fn enum_err(kind: MessageKind, field: &'static str, v: u8) -> ProtoError {
    malformed(
        kind,
        field,
        Malformation::InvalidValue {
            value: u64::from(v),
        },
    )
}

fn parse_payload(header: &Header, payload: &Bytes) -> Res<Message> {
    let kind = header.kind;
    let mut r = Reader {
        payload,
        pos: 0,
        kind,
    };
    let fua = header.flags & FLAG_FUA != 0;
    let msg = match kind {
        MessageKind::Hello => {
            let n = r.u8("version_count")? as usize;
            if n > MAX_VERSIONS {
                return Err(malformed(
                    kind,
                    "versions",
                    Malformation::TooLong {
                        len: n,
                        max: MAX_VERSIONS,
                    },
                ));
            }
            let versions = r.take("versions", n)?.to_vec();
            v_versions(kind, &versions)?;
            let node_name = r.name("node_name")?;
            let cluster_name = r.name("cluster_name")?;
            let resource_name = r.name("resource_name")?;
            let volume_size = r.u64("volume_size")?;
            let region_size = r.u32("region_size")?;
            v_region_size(kind, region_size)?;
            let role_b = r.u8("role")?;
            let role = Role::from_u8(role_b).ok_or_else(|| enum_err(kind, "role", role_b))?;
            let ds_b = r.u8("disk_state")?;
            let disk_state =
                DiskState::from_u8(ds_b).ok_or_else(|| enum_err(kind, "disk_state", ds_b))?;
            let fbits = r.u16("features")?;
            let features = Features::from_bits(fbits).ok_or(malformed(
                kind,
                "features",
                Malformation::UnknownFlags {
                    bits: u32::from(fbits & !Features::ALL.bits()),
                },
            ))?;
            let generation = r.generation()?;
            Message::Hello(Hello {
                versions,
                node_name,
                cluster_name,
                resource_name,
                volume_size,
                region_size,
                role,
                disk_state,
                features,
                generation,
            })
        }
        MessageKind::AuthChallenge => Message::AuthChallenge {
            nonce: r.array("nonce")?,
        },
        MessageKind::AuthResponse => Message::AuthResponse {
            mac: r.array("mac")?,
        },
        MessageKind::AuthResult => {
            let b = r.u8("accepted")?;
            match b {
                0 => Message::AuthResult { accepted: false },
                1 => Message::AuthResult { accepted: true },
                _ => return Err(enum_err(kind, "accepted", b)),
            }
        }
        MessageKind::Write => {
            let offset = r.u64("offset")?;
            let length = r.u32("length")?;
            let data = r.data_tail(length)?;
            v_range(kind, offset, u64::from(length))?;
            Message::Write { offset, fua, data }
        }
        MessageKind::Ack1 => Message::Ack1 { seq: r.u64("seq")? },
        MessageKind::Ack2 | MessageKind::FlushAck => {
            let seq = r.u64("seq")?;
            let status = r.i32("status")?;
            v_status(kind, status)?;
            if kind == MessageKind::Ack2 {
                Message::Ack2 { seq, status }
            } else {
                Message::FlushAck { seq, status }
            }
        }
        MessageKind::Flush => Message::Flush,
        MessageKind::Trim | MessageKind::WriteZeroes => {
            let offset = r.u64("offset")?;
            let length = r.u64("length")?;
            v_range(kind, offset, length)?;
            if kind == MessageKind::Trim {
                Message::Trim {
                    offset,
                    length,
                    fua,
                }
            } else {
                Message::WriteZeroes {
                    offset,
                    length,
                    fua,
                    no_hole: header.flags & FLAG_NO_HOLE != 0,
                }
            }
        }
        MessageKind::BitmapChunk => {
            let chunk_index = r.u32("chunk_index")?;
            let total_chunks = r.u32("total_chunks")?;
            let region_size = r.u32("region_size")?;
            let region_count = r.u32("region_count")?;
            let first_region = r.u64("first_region")?;
            let n = r.remaining();
            let bits = r.bytes("bits", n)?;
            let c = BitmapChunk {
                chunk_index,
                total_chunks,
                region_size,
                first_region,
                region_count,
                bits,
            };
            v_bitmap(&c)?;
            Message::BitmapChunk(c)
        }
        MessageKind::ResyncRequest => {
            let offset = r.u64("offset")?;
            let length = r.u32("length")?;
            v_data_len(kind, "length", length as usize)?;
            v_range(kind, offset, u64::from(length))?;
            Message::ResyncRequest { offset, length }
        }
        MessageKind::ResyncData => {
            let offset = r.u64("offset")?;
            let checksum = r.u32("checksum")?;
            let length = r.u32("length")?;
            let data = r.data_tail(length)?;
            v_range(kind, offset, u64::from(length))?;
            // The data checksum was verified by `check` (one pass over the
            // data for both CRCs); parse_payload only runs after it.
            Message::ResyncData {
                offset,
                checksum,
                data,
            }
        }
        MessageKind::ChecksumRequest => {
            let region_size = r.u32("region_size")?;
            v_region_size(kind, region_size)?;
            let entries = r.entries(false)?;
            Message::ChecksumRequest {
                region_size,
                entries,
            }
        }
        MessageKind::ChecksumReply => {
            let request_seq = r.u64("request_seq")?;
            let region_size = r.u32("region_size")?;
            v_region_size(kind, region_size)?;
            let entries = r.entries(true)?;
            Message::ChecksumReply {
                request_seq,
                region_size,
                entries,
            }
        }
        MessageKind::Ping | MessageKind::Pong => {
            let nonce = r.u64("nonce")?;
            let timestamp_ns = r.u64("timestamp_ns")?;
            if kind == MessageKind::Ping {
                Message::Ping {
                    nonce,
                    timestamp_ns,
                }
            } else {
                Message::Pong {
                    nonce,
                    timestamp_ns,
                }
            }
        }
        MessageKind::StateChange => {
            let role_b = r.u8("role")?;
            let role = Role::from_u8(role_b).ok_or_else(|| enum_err(kind, "role", role_b))?;
            let ds_b = r.u8("disk_state")?;
            let disk_state =
                DiskState::from_u8(ds_b).ok_or_else(|| enum_err(kind, "disk_state", ds_b))?;
            let generation = r.generation()?;
            Message::StateChange {
                role,
                disk_state,
                generation,
            }
        }
        MessageKind::Error => {
            let code = r.u32("code")?;
            let len = r.u16("message")? as usize;
            if len > MAX_ERROR_MESSAGE_LEN {
                return Err(malformed(
                    kind,
                    "message",
                    Malformation::TooLong {
                        len,
                        max: MAX_ERROR_MESSAGE_LEN,
                    },
                ));
            }
            let message = r.string("message", len)?;
            Message::Error { code, message }
        }
        MessageKind::Goodbye => {
            let b = r.u8("reason")?;
            let reason = GoodbyeReason::from_u8(b).ok_or_else(|| enum_err(kind, "reason", b))?;
            Message::Goodbye { reason }
        }
        MessageKind::Control => {
            let len = r.u32("length")? as usize;
            v_control_len(len)?;
            let json = r.string("json", len)?;
            Message::Control { json }
        }
    };
    r.finish()?;
    Ok(msg)
}

// ---- encoding ----

fn put_name(out: &mut BytesMut, kind: MessageKind, field: &'static str, s: &str) -> Res<()> {
    v_name(kind, field, s)?;
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
    Ok(())
}

fn put_generation(out: &mut BytesMut, kind: MessageKind, g: &Generation) -> Res<()> {
    v_history(kind, g.history.len())?;
    out.put_u64_le(g.current);
    out.put_u64_le(g.bitmap);
    out.put_u8(g.history.len() as u8);
    for h in &g.history {
        out.put_u64_le(*h);
    }
    Ok(())
}

fn put_entries(
    out: &mut BytesMut,
    kind: MessageKind,
    e: &[RegionChecksum],
    allow_empty: bool,
) -> Res<()> {
    v_entries(kind, e.len(), allow_empty)?;
    out.put_u32_le(e.len() as u32);
    for x in e {
        out.put_u64_le(x.region);
        out.put_u32_le(x.checksum);
    }
    Ok(())
}

/// Writes the fixed fields of `msg` to `out`; returns the trailing data block (not copied).
fn encode_fields<'m>(msg: &'m Message, out: &mut BytesMut) -> Res<Option<&'m Bytes>> {
    let kind = msg.kind();
    match msg {
        Message::Hello(h) => {
            v_versions(kind, &h.versions)?;
            out.put_u8(h.versions.len() as u8);
            out.put_slice(&h.versions);
            put_name(out, kind, "node_name", &h.node_name)?;
            put_name(out, kind, "cluster_name", &h.cluster_name)?;
            put_name(out, kind, "resource_name", &h.resource_name)?;
            v_region_size(kind, h.region_size)?;
            out.put_u64_le(h.volume_size);
            out.put_u32_le(h.region_size);
            out.put_u8(h.role as u8);
            out.put_u8(h.disk_state as u8);
            out.put_u16_le(h.features.bits());
            put_generation(out, kind, &h.generation)?;
        }
        Message::AuthChallenge { nonce } => out.put_slice(nonce),
        Message::AuthResponse { mac } => out.put_slice(mac),
        Message::AuthResult { accepted } => out.put_u8(u8::from(*accepted)),
        Message::Write { offset, data, .. } => {
            v_data_len(kind, "length", data.len())?;
            v_range(kind, *offset, data.len() as u64)?;
            out.put_u64_le(*offset);
            out.put_u32_le(data.len() as u32);
            return Ok(Some(data));
        }
        Message::Ack1 { seq } => out.put_u64_le(*seq),
        Message::Ack2 { seq, status } | Message::FlushAck { seq, status } => {
            v_status(kind, *status)?;
            out.put_u64_le(*seq);
            out.put_i32_le(*status);
        }
        Message::Flush => {}
        Message::Trim { offset, length, .. } | Message::WriteZeroes { offset, length, .. } => {
            v_range(kind, *offset, *length)?;
            out.put_u64_le(*offset);
            out.put_u64_le(*length);
        }
        Message::BitmapChunk(c) => {
            v_bitmap(c)?;
            out.put_u32_le(c.chunk_index);
            out.put_u32_le(c.total_chunks);
            out.put_u32_le(c.region_size);
            out.put_u32_le(c.region_count);
            out.put_u64_le(c.first_region);
            return Ok(Some(&c.bits));
        }
        Message::ResyncRequest { offset, length } => {
            v_data_len(kind, "length", *length as usize)?;
            v_range(kind, *offset, u64::from(*length))?;
            out.put_u64_le(*offset);
            out.put_u32_le(*length);
        }
        Message::ResyncData {
            offset,
            checksum,
            data,
        } => {
            v_data_len(kind, "length", data.len())?;
            v_range(kind, *offset, data.len() as u64)?;
            // Not re-hashed here: the payload CRC is derived from `checksum`
            // (see encode_vectored), so a checksum that does not match the
            // data makes the receiver reject the frame.
            out.put_u64_le(*offset);
            out.put_u32_le(*checksum);
            out.put_u32_le(data.len() as u32);
            return Ok(Some(data));
        }
        Message::ChecksumRequest {
            region_size,
            entries,
        } => {
            v_region_size(kind, *region_size)?;
            out.put_u32_le(*region_size);
            put_entries(out, kind, entries, false)?;
        }
        Message::ChecksumReply {
            request_seq,
            region_size,
            entries,
        } => {
            v_region_size(kind, *region_size)?;
            out.put_u64_le(*request_seq);
            out.put_u32_le(*region_size);
            put_entries(out, kind, entries, true)?;
        }
        Message::Ping {
            nonce,
            timestamp_ns,
        }
        | Message::Pong {
            nonce,
            timestamp_ns,
        } => {
            out.put_u64_le(*nonce);
            out.put_u64_le(*timestamp_ns);
        }
        Message::StateChange {
            role,
            disk_state,
            generation,
        } => {
            out.put_u8(*role as u8);
            out.put_u8(*disk_state as u8);
            put_generation(out, kind, generation)?;
        }
        Message::Error { code, message } => {
            v_error_message(message)?;
            out.put_u32_le(*code);
            out.put_u16_le(message.len() as u16);
            out.put_slice(message.as_bytes());
        }
        Message::Goodbye { reason } => out.put_u8(*reason as u8),
        Message::Control { json } => {
            v_control_len(json.len())?;
            out.put_u32_le(json.len() as u32);
            out.put_slice(json.as_bytes());
        }
    }
    Ok(None)
}

/// Writes a header for `kind` plus `fields` into `out`; the payload is `fields ‖ data`, and the
/// caller sends `data` right after (vectored write). Validation is the caller's job.
fn put_prefix(
    out: &mut BytesMut,
    kind: MessageKind,
    flags: u16,
    seq: u64,
    fields: &[u8],
    data: &[u8],
    data_crc: Option<u32>,
) -> Res<()> {
    let payload_len = fields.len() + data.len();
    let max = kind.max_payload();
    if payload_len > max as usize {
        return Err(ProtoError::TooLarge {
            len: payload_len as u64,
            max: u64::from(max),
        });
    }
    let payload_crc = match data_crc {
        Some(c) => crc_of_parts(fields, c, data.len()),
        None => {
            let mut crc = crc32fast::Hasher::new();
            crc.update(fields);
            crc.update(data);
            crc.finalize()
        }
    };
    let header = Header {
        version: PROTOCOL_VERSION,
        kind,
        flags,
        seq,
        payload_len: payload_len as u32,
        payload_crc,
    };
    out.reserve(HEADER_LEN + fields.len());
    out.put_slice(&header.to_bytes());
    out.put_slice(fields);
    Ok(())
}

/// Writes header + fixed fields of a Write frame to `out` for data the caller holds in any
/// buffer (e.g. an aligned I/O buffer that is not `Bytes`); the caller then sends `data`
/// unchanged. Equivalent on the wire to encoding `Message::Write { offset, fua, data }`.
/// On error `out` is unchanged.
pub fn encode_write_prefix(
    seq: u64,
    offset: u64,
    fua: bool,
    data: &[u8],
    out: &mut BytesMut,
) -> Result<(), ProtoError> {
    let kind = MessageKind::Write;
    v_data_len(kind, "length", data.len())?;
    v_range(kind, offset, data.len() as u64)?;
    let mut fields = [0u8; WRITE_FIXED];
    fields[..8].copy_from_slice(&offset.to_le_bytes());
    fields[8..].copy_from_slice(&(data.len() as u32).to_le_bytes());
    put_prefix(
        out,
        kind,
        if fua { FLAG_FUA } else { 0 },
        seq,
        &fields,
        data,
        None,
    )
}

/// Writes header + fixed fields of a ResyncData frame for `data` held by the caller, who then
/// sends `data` unchanged. `checksum` must be the CRC-32 of `data` computed when it was read;
/// it is not recomputed here (the data is hashed once per side): the payload CRC is combined
/// from it, so a wrong checksum makes the receiver's [`check`] reject the frame
/// ([`ProtoError::PayloadChecksum`]). On error `out` is unchanged.
pub fn encode_resync_data_prefix(
    seq: u64,
    offset: u64,
    checksum: u32,
    data: &[u8],
    out: &mut BytesMut,
) -> Result<(), ProtoError> {
    let kind = MessageKind::ResyncData;
    v_data_len(kind, "length", data.len())?;
    v_range(kind, offset, data.len() as u64)?;
    let mut fields = [0u8; RESYNC_DATA_FIXED];
    fields[..8].copy_from_slice(&offset.to_le_bytes());
    fields[8..12].copy_from_slice(&checksum.to_le_bytes());
    fields[12..].copy_from_slice(&(data.len() as u32).to_le_bytes());
    put_prefix(out, kind, 0, seq, &fields, data, Some(checksum))
}

impl Frame {
    /// Builds a frame.
    pub fn new(seq: u64, msg: Message) -> Frame {
        Frame { seq, msg }
    }

    /// Header flags this frame is encoded with (derived from the message).
    pub fn flags(&self) -> u16 {
        self.msg.flags()
    }

    /// Step two of decoding: parses `buf`, which must hold exactly one frame (as delimited by
    /// [`check`]). Runs [`check`] itself, so it is safe on arbitrary input. Data payloads
    /// (Write, ResyncData, BitmapChunk) are zero-copy slices of `buf`.
    ///
    /// Errors: [`ProtoError::Truncated`] if `buf` holds less than a frame,
    /// [`ProtoError::TrailingBytes`] if it holds more, otherwise the header/payload errors.
    pub fn parse(buf: &Bytes) -> Result<Frame, ProtoError> {
        match check(buf)? {
            Check::Incomplete { needed } => Err(ProtoError::Truncated { needed }),
            Check::Complete { frame_len } if frame_len != buf.len() => {
                Err(ProtoError::TrailingBytes {
                    frame_len,
                    extra: buf.len() - frame_len,
                })
            }
            Check::Complete { .. } => Frame::parse_checked(buf),
        }
    }

    /// [`Frame::parse`] of exactly one frame that [`check`] already
    /// accepted (the streaming decoder): the payload is not hashed again.
    pub(crate) fn parse_checked(buf: &Bytes) -> Result<Frame, ProtoError> {
        let header = Header::decode(buf)?;
        let payload = buf.slice(HEADER_LEN..);
        let msg = parse_payload(&header, &payload)?;
        Ok(Frame {
            seq: header.seq,
            msg,
        })
    }

    /// Encodes the whole frame into `out` (data is copied once, into `out`).
    /// On error `out` is left as it was.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), ProtoError> {
        if let Some(tail) = self.encode_vectored(out)? {
            out.extend_from_slice(&tail);
        }
        Ok(())
    }

    /// Encodes the header and fixed fields into `out` and returns the trailing data block
    /// (Write/ResyncData data, BitmapChunk bits) *without copying it*: the wire frame is
    /// `out`'s new bytes followed immediately by the returned `Bytes`, e.g. for a vectored
    /// write. Returns `None` for messages without a data block. On error `out` is left as it was.
    pub fn encode_vectored(&self, out: &mut BytesMut) -> Result<Option<Bytes>, ProtoError> {
        let start = out.len();
        out.reserve(HEADER_LEN + 64);
        out.put_bytes(0, HEADER_LEN);
        let tail = match encode_fields(&self.msg, out) {
            Ok(t) => t,
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        };
        let fields = start + HEADER_LEN;
        let tail_len = tail.map_or(0, |t| t.len());
        let payload_len = (out.len() - fields) + tail_len;
        let kind = self.msg.kind();
        let max = kind.max_payload();
        if payload_len > max as usize {
            out.truncate(start);
            return Err(ProtoError::TooLarge {
                len: payload_len as u64,
                max: u64::from(max),
            });
        }
        let payload_crc = match (&self.msg, tail) {
            // The data's CRC is its checksum field: combined, not recomputed.
            (Message::ResyncData { checksum, .. }, Some(t)) => {
                crc_of_parts(&out[fields..], *checksum, t.len())
            }
            _ => {
                let mut crc = crc32fast::Hasher::new();
                crc.update(&out[fields..]);
                if let Some(t) = tail {
                    crc.update(t);
                }
                crc.finalize()
            }
        };
        let header = Header {
            version: if kind == MessageKind::Hello {
                HELLO_VERSION
            } else {
                PROTOCOL_VERSION
            },
            kind,
            flags: self.flags(),
            seq: self.seq,
            payload_len: payload_len as u32,
            payload_crc,
        };
        out[start..fields].copy_from_slice(&header.to_bytes());
        Ok(tail.cloned())
    }

    /// Convenience: encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, ProtoError> {
        let mut out = BytesMut::new();
        self.encode(&mut out)?;
        Ok(out.freeze())
    }
}
