//! Streaming [`Decoder`]: feed it the receive buffer, get whole frames out.

use bytes::BytesMut;

use crate::codec::Frame;
use crate::error::ProtoError;
use crate::header::{check, Check};

/// Splits frames off the front of a receive buffer.
///
/// `decode` returns `Ok(None)` while the buffer holds only part of a frame (the normal case);
/// [`Decoder::needed`] then says how many more bytes are required at least. A complete frame
/// is split off the buffer (no copy: data fields of the returned [`Frame`] share its memory).
///
/// After any `Err` the byte stream is desynchronized: send an Error frame if possible and
/// close the connection; do not call `decode` again on the same stream.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    needed: usize,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Minimum number of additional bytes the last `Ok(None)` asked for (0 after a frame).
    pub fn needed(&self) -> usize {
        self.needed
    }

    /// Removes and returns the frame at the front of `buf`, or `Ok(None)` if it is incomplete.
    /// Oversized or corrupt headers are rejected before any payload is buffered or allocated.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        match check(buf)? {
            Check::Incomplete { needed } => {
                self.needed = needed;
                Ok(None)
            }
            Check::Complete { frame_len } => {
                self.needed = 0;
                let bytes = buf.split_to(frame_len).freeze();
                // `check` verified this exact frame: parse without hashing it again.
                Frame::parse_checked(&bytes).map(Some)
            }
        }
    }
}
