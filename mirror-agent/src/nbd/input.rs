//! Buffered, cancel-safe reading of the client stream.
//!
//! [`Input::fill`] only ever appends to an owned buffer through
//! `read_buf`, so a `select!` that drops it half-way loses no bytes: the
//! connection can wait for "next header or shutdown" without desynchronising
//! the stream.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::engine::buf::IoBuf;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Read-ahead per `read` call while waiting for small messages.
const READ_AHEAD: usize = 64 * 1024;

/// The read side of a connection with its read-ahead buffer.
#[derive(Debug)]
pub(crate) struct Input<R> {
    reader: R,
    /// Bytes received and not consumed yet (bounded by `READ_AHEAD` + the
    /// largest message being assembled).
    pub(crate) buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Input<R> {
    pub(crate) fn new(reader: R) -> Self {
        Input {
            reader,
            buf: BytesMut::with_capacity(READ_AHEAD),
        }
    }

    /// Waits until at least `n` bytes are buffered. `Ok(false)` on end of
    /// stream before that (whatever arrived stays in `buf`). Cancel-safe.
    pub(crate) async fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.buf.len() < n {
            let missing = n - self.buf.len();
            if self.buf.capacity() - self.buf.len() < missing.min(READ_AHEAD) {
                self.buf.reserve(missing.max(READ_AHEAD));
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads a payload of exactly `len` bytes into its own buffer (so the
    /// engine can hold it without pinning the read-ahead buffer): a pooled,
    /// page-aligned [`IoBuf`] that O_DIRECT can write as it is, returned to
    /// the pool when the engine drops the `Bytes`. The socket reads go
    /// straight into it. `Ok(Err(got))` if the stream ends first. Not
    /// cancel-safe: callers only abandon it when the connection is being
    /// closed anyway.
    pub(crate) async fn read_payload(
        &mut self,
        len: usize,
    ) -> std::io::Result<Result<Bytes, usize>> {
        let mut payload = IoBuf::new(len);
        let buffered = self.buf.len().min(len);
        payload[..buffered].copy_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        let mut filled = buffered;
        while filled < len {
            match self.reader.read(&mut payload[filled..]).await? {
                0 => return Ok(Err(filled)),
                n => filled += n,
            }
        }
        Ok(Ok(payload.into_bytes()))
    }

    /// Consumes and drops `len` bytes without holding them in memory.
    /// `Ok(Err(got))` if the stream ends first.
    pub(crate) async fn skip(&mut self, len: usize) -> std::io::Result<Result<(), usize>> {
        let mut done = 0;
        while done < len {
            if self.buf.is_empty() {
                self.buf.reserve(READ_AHEAD);
                let room = (len - done).min(READ_AHEAD);
                if self
                    .reader
                    .read_buf(&mut (&mut self.buf).limit(room))
                    .await?
                    == 0
                {
                    return Ok(Err(done));
                }
            }
            let take = self.buf.len().min(len - done);
            self.buf.advance(take);
            done += take;
        }
        Ok(Ok(()))
    }
}
