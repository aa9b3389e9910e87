//! Buffered, cancel-safe reading of the client stream.
//!
//! [`Input::fill`] only ever appends to an owned buffer through
//! `read_buf`, so a `select!` that drops it half-way loses no bytes: the
//! connection can wait for "next header or shutdown" without desynchronising
//! the stream.

use std::os::fd::RawFd;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::engine::buf::IoBuf;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Read-ahead per `read` call while waiting for small messages.
const READ_AHEAD: usize = 64 * 1024;
/// Room [`Input::try_recv`] keeps free: a request header and a 4 KiB payload.
const REQUEST_READ_MIN: usize = 8 * 1024;

/// A write payload being received (see [`Input::start_payload`]).
#[derive(Debug)]
pub(crate) struct Payload {
    buf: IoBuf,
    filled: usize,
}

impl Payload {
    pub(crate) fn is_complete(&self) -> bool {
        self.filled == self.buf.len()
    }

    /// Bytes received so far.
    pub(crate) fn received(&self) -> usize {
        self.filled
    }

    /// The whole payload; only once [`Payload::is_complete`].
    pub(crate) fn into_bytes(self) -> Bytes {
        debug_assert!(self.is_complete());
        self.buf.into_bytes()
    }
}

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

    /// Starts receiving a payload of exactly `len` bytes into its own buffer
    /// (so the engine can hold it without pinning the read-ahead buffer): a
    /// pooled, page-aligned [`IoBuf`] that O_DIRECT can write as it is,
    /// returned to the pool when the engine drops the `Bytes`. What is
    /// already buffered is copied; [`Input::read_payload_some`] reads the
    /// rest from the socket straight into it.
    pub(crate) fn start_payload(&mut self, len: usize) -> Payload {
        let mut buf = IoBuf::new(len);
        let buffered = self.buf.len().min(len);
        buf[..buffered].copy_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        Payload {
            buf,
            filled: buffered,
        }
    }

    /// One socket read into the rest of `p`: `Ok(false)` at end of stream.
    /// Cancel-safe (a cancelled read has read nothing), so the connection
    /// can serve completions while a large payload trickles in.
    pub(crate) async fn read_payload_some(&mut self, p: &mut Payload) -> std::io::Result<bool> {
        if p.is_complete() {
            return Ok(true);
        }
        let n = self.reader.read(&mut p.buf[p.filled..]).await?;
        p.filled += n;
        Ok(n > 0)
    }

    /// One non-blocking `recv` from `fd` into the read-ahead buffer:
    /// `Some(n)` bytes received (0 = end of stream), `None` if nothing is
    /// waiting. `fd` must be the socket `reader` reads (the connection's
    /// idle polling, which reads it directly so as not to park in epoll);
    /// the bytes land in `buf` in stream order like any other read.
    pub(crate) fn try_recv(&mut self, fd: RawFd) -> std::io::Result<Option<usize>> {
        if self.buf.capacity() - self.buf.len() < REQUEST_READ_MIN {
            self.buf.reserve(READ_AHEAD);
        }
        let spare = self.buf.spare_capacity_mut();
        // SAFETY: the kernel writes at most `spare.len()` bytes into the
        // spare capacity, which is allocated and unaliased for the call.
        let r = unsafe {
            libc::recv(
                fd,
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        let n = r as usize;
        // SAFETY: the kernel initialised the first `n` bytes of the spare
        // capacity (n <= spare.len()).
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Ok(Some(n))
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
