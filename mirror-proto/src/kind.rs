//! Message kinds (header byte 5), per-kind payload bounds and the header flag bits.

use crate::limits::*;

/// Header flag bit 0: Force Unit Access — the receiver must make this operation durable
/// (write-through) before sending Ack2. Allowed on Write, Trim and WriteZeroes only.
pub const FLAG_FUA: u16 = 1 << 0;
/// Header flag bit 1: the receiver must not deallocate (punch a hole) while zeroing.
/// Allowed on WriteZeroes only.
pub const FLAG_NO_HOLE: u16 = 1 << 1;

/// The message kind carried in header byte 5. Values are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MessageKind {
    /// 0x01 — session opening, identity and version list.
    Hello = 0x01,
    /// 0x02 — 32-byte authentication nonce.
    AuthChallenge = 0x02,
    /// 0x03 — HMAC-SHA256 over the handshake transcript.
    AuthResponse = 0x03,
    /// 0x04 — verdict on the peer's AuthResponse.
    AuthResult = 0x04,
    /// 0x10 — replicate a data write.
    Write = 0x10,
    /// 0x11 — "received" acknowledgement of a Write/Trim/WriteZeroes/ResyncData.
    Ack1 = 0x11,
    /// 0x12 — "durable" acknowledgement with status.
    Ack2 = 0x12,
    /// 0x13 — flush/barrier.
    Flush = 0x13,
    /// 0x14 — flush completion with status.
    FlushAck = 0x14,
    /// 0x15 — discard a range.
    Trim = 0x15,
    /// 0x16 — zero a range.
    WriteZeroes = 0x16,
    /// 0x20 — a slice of the dirty bitmap.
    BitmapChunk = 0x20,
    /// 0x21 — ask the sync source for a range.
    ResyncRequest = 0x21,
    /// 0x22 — resync data with end-to-end checksum.
    ResyncData = 0x22,
    /// 0x23 — online verify: the sender's region checksums.
    ChecksumRequest = 0x23,
    /// 0x24 — online verify: the receiver's checksums for the same regions.
    ChecksumReply = 0x24,
    /// 0x30 — heartbeat.
    Ping = 0x30,
    /// 0x31 — heartbeat answer (echoes the Ping).
    Pong = 0x31,
    /// 0x32 — role / disk state / generation change.
    StateChange = 0x32,
    /// 0x33 — error report (code + text).
    Error = 0x33,
    /// 0x34 — orderly close.
    Goodbye = 0x34,
    /// 0x40 — control-link message: JSON text (only after authentication).
    Control = 0x40,
}

impl MessageKind {
    /// Every kind, in wire-value order.
    pub const ALL: [MessageKind; 22] = [
        MessageKind::Hello,
        MessageKind::AuthChallenge,
        MessageKind::AuthResponse,
        MessageKind::AuthResult,
        MessageKind::Write,
        MessageKind::Ack1,
        MessageKind::Ack2,
        MessageKind::Flush,
        MessageKind::FlushAck,
        MessageKind::Trim,
        MessageKind::WriteZeroes,
        MessageKind::BitmapChunk,
        MessageKind::ResyncRequest,
        MessageKind::ResyncData,
        MessageKind::ChecksumRequest,
        MessageKind::ChecksumReply,
        MessageKind::Ping,
        MessageKind::Pong,
        MessageKind::StateChange,
        MessageKind::Error,
        MessageKind::Goodbye,
        MessageKind::Control,
    ];

    /// Decodes the header kind byte.
    pub fn from_u8(v: u8) -> Option<MessageKind> {
        MessageKind::ALL.iter().copied().find(|k| *k as u8 == v)
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Header flag bits this kind may carry; every other bit must be zero.
    pub fn allowed_flags(self) -> u16 {
        match self {
            MessageKind::Write | MessageKind::Trim => FLAG_FUA,
            MessageKind::WriteZeroes => FLAG_FUA | FLAG_NO_HOLE,
            _ => 0,
        }
    }

    /// Largest payload this kind can legally have; [`check`](crate::check) rejects
    /// anything bigger with [`TooLarge`](crate::ProtoError::TooLarge) from the header alone.
    pub fn max_payload(self) -> u32 {
        let v: usize = match self {
            MessageKind::Hello => HELLO_MAX_PAYLOAD,
            MessageKind::AuthChallenge => NONCE_LEN,
            MessageKind::AuthResponse => MAC_LEN,
            MessageKind::AuthResult => 1,
            MessageKind::Write => WRITE_FIXED + MAX_DATA_LEN,
            MessageKind::Ack1 => 8,
            MessageKind::Ack2 | MessageKind::FlushAck => 12,
            MessageKind::Flush => 0,
            MessageKind::Trim | MessageKind::WriteZeroes => 16,
            MessageKind::BitmapChunk => BITMAP_FIXED + MAX_DATA_LEN,
            MessageKind::ResyncRequest => 12,
            MessageKind::ResyncData => RESYNC_DATA_FIXED + MAX_DATA_LEN,
            MessageKind::ChecksumRequest => 8 + 12 * MAX_CHECKSUM_ENTRIES,
            MessageKind::ChecksumReply => 16 + 12 * MAX_CHECKSUM_ENTRIES,
            MessageKind::Ping | MessageKind::Pong => 16,
            MessageKind::StateChange => 2 + GENERATION_MAX_LEN,
            MessageKind::Error => 6 + MAX_ERROR_MESSAGE_LEN,
            MessageKind::Goodbye => 1,
            MessageKind::Control => 4 + MAX_CONTROL_LEN,
        };
        // All bounds are far below u32::MAX (largest is 32 MiB + 24).
        v as u32
    }

    /// True for the kinds a receiver may accept before both sides are authenticated
    /// (Hello, AuthChallenge, AuthResponse, AuthResult, Error, Goodbye). Any other frame
    /// received before authentication completes must be answered with
    /// [`error_code::NOT_AUTHENTICATED`](crate::error_code::NOT_AUTHENTICATED) and the
    /// connection closed.
    pub fn allowed_before_auth(self) -> bool {
        matches!(
            self,
            MessageKind::Hello
                | MessageKind::AuthChallenge
                | MessageKind::AuthResponse
                | MessageKind::AuthResult
                | MessageKind::Error
                | MessageKind::Goodbye
        )
    }
}
