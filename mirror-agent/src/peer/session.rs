//! A running, authenticated peer session: reader, writer and heartbeat tasks around one
//! byte stream, exposed to the owner as channels ([`Session`]).
//!
//! Sequence numbers (§9.1): [`SessionSender`] assigns them under one ordering lock together
//! with the enqueue into the writer's FIFO, so seq order is wire order; the reader checks that
//! each received frame carries the previous seq + 1. Internal Ping/Pong use the same counter.
//!
//! Writing: frames go through a bounded queue to the writer task, which coalesces them into
//! vectored writes. On plain TCP (`into_split`, no lock between the halves) a sender writes
//! its frame to the socket itself when the writer task is idle and nothing is queued, under
//! the same ordering lock ([`Shared::commit`]); [`corked`] scopes opt out for small frames,
//! so bursts still leave in one write. Large Write frames are written or encoded by their
//! sender, on the CPU whose cache holds their data (see [`BIG_WRITE_BYTES`]).
//!
//! Reading: on plain TCP the reader raises `SO_RCVLOWAT` while a big frame is arriving
//! ([`RcvLowat`]), so it is woken once per frame part of up to 1 MiB, not per TCP segment.
//!
//! Closing: the first reason wins and is published on [`CloseWatch`]. A local
//! [`SessionSender::close`] flushes what is queued and ends with Goodbye; a protocol error
//! ends with an Error frame (best effort); a lost or silent peer just closes.

use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mirror_proto::{error_code, Decoder, Frame, GoodbyeReason, Hello, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::handshake::Established;
use super::{RECV_QUEUE_FRAMES, SEND_QUEUE_FRAMES};
use crate::config::Timeouts;

/// Frames taken from the queue for one (vectored) write.
const MAX_BATCH_FRAMES: usize = 64;
/// At most this many iovecs per `write_vectored` call (well under IOV_MAX).
const MAX_IOVECS: usize = 128;
/// Write frames with more data than this are "big": their sender writes them to the socket
/// itself whenever the writer task is idle, corked or not, and encodes them (payload CRC)
/// itself when they are queued. The sender has just received the data (the NBD payload),
/// so it is in this CPU's cache; the writer task often runs on the other worker, where the
/// CRC and the socket copy read it from memory. Measured on a 1 MiB QD8 write stream
/// (bench/HISTORY.md, "Seq write round"): the pair used 5-12% less CPU per MiB and
/// wrote 8-15% faster; the writer's wake-up costs less than that. Batching such frames
/// with others saves nothing.
const BIG_WRITE_BYTES: usize = 64 << 10;

/// One authenticated connection to the peer.
///
/// The session stays up while its `rx` is alive (dropping `rx` closes it with Goodbye).
/// Frames on `rx` are every received frame except the ones the session handles itself:
/// Ping (answered with Pong), Pong, Goodbye and Error (both close the session, the reason is
/// on `closed`).
#[derive(Debug)]
pub struct Session {
    /// The peer's Hello (its role, disk state, generation, features at connection time).
    pub peer_hello: Hello,
    /// Sending half; clone it freely.
    pub tx: SessionSender,
    /// Received frames, in wire order, seq already checked.
    pub rx: mpsc::Receiver<Frame>,
    /// Fires once with the reason the session ended.
    pub closed: CloseWatch,
    /// The peer's socket address.
    pub peer_addr: SocketAddr,
}

/// The session is closed; carries the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer link closed: {reason}")]
pub struct LinkClosed {
    /// Why the session ended.
    pub reason: String,
}

/// Why [`SessionSender::try_send`] did not queue the frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError {
    /// The outgoing queue is full (back-pressure; retry or use `send`).
    #[error("peer link send queue is full")]
    Full,
    /// The session is closed.
    #[error(transparent)]
    Closed(#[from] LinkClosed),
}

/// A boxed, sendable future (a [`Hooked::Run`] step); `Some(frame)`: deliver the frame on
/// [`Session::rx`] after all.
pub type HookFuture = Pin<Box<dyn std::future::Future<Output = Option<Frame>> + Send + 'static>>;

/// What the reader knows when it offers a frame to the [`FrameHook`].
#[derive(Debug, Clone, Copy)]
pub struct HookCx {
    /// Seq of the last frame the reader delivered on [`Session::rx`] (0: none yet). A hook
    /// that must not overtake those frames compares it with its consumer's progress.
    pub passed: u64,
    /// More received bytes are buffered behind this frame (a burst: the hook may cork
    /// what it sends).
    pub more: bool,
}

/// What a [`FrameHook`] did with a frame.
pub enum Hooked {
    /// Handled completely.
    Done,
    /// Not the hook's: delivered on [`Session::rx`] as usual.
    Pass(Frame),
    /// Handled by this future, which the reader awaits before it decodes the next frame
    /// (so the frame's handling keeps its place in the wire order; usually ready at the
    /// first poll). If it yields the frame back, it is delivered on [`Session::rx`].
    /// Dropped unfinished if the session closes meanwhile.
    Run(HookFuture),
}

impl fmt::Debug for Hooked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hooked::Done => f.write_str("Done"),
            Hooked::Pass(fr) => write!(f, "Pass({:?} seq {})", fr.msg.kind(), fr.seq),
            Hooked::Run(_) => f.write_str("Run(..)"),
        }
    }
}

/// A handler run by the session's reader task on each received frame that would go to
/// [`Session::rx`], before it is queued there; see [`SessionSender::set_hook`].
pub type FrameHook = Arc<dyn Fn(Frame, HookCx) -> Hooked + Send + Sync + 'static>;

/// What the writer sends last.
#[derive(Debug)]
enum Final {
    /// Flush the queue, then Goodbye.
    Goodbye(GoodbyeReason),
    /// Error frame right away (queued frames are dropped).
    Error { code: u32, message: String },
    /// Nothing (peer gone, socket broken).
    Nothing,
}

/// What the writer task writes: a whole frame, a whole frame its sender already encoded,
/// or the unwritten rest of a frame a sender started writing itself (always the first item
/// in the queue when present).
enum Out {
    Frame(Frame),
    /// A large Write frame encoded by its sender ([`encode_big`]): header and fields in
    /// `head`, the data block as is in `tail`.
    Encoded {
        seq: u64,
        head: Bytes,
        tail: Option<Bytes>,
    },
    Rest {
        head: Bytes,
        tail: Option<Bytes>,
    },
}

/// Sequencing and wire state, under one lock: seq order is queue order is wire order.
struct Order {
    next_seq: u64,
    closing: bool,
    /// Items sent into the queue and not yet claimed by the writer (claims happen under
    /// this lock, see [`writer`]).
    queued: usize,
    /// The writer task has nothing claimed and waits for the queue.
    writer_idle: bool,
    /// Seq of the next frame to start on the wire (the final Error continues from here).
    wire_next: u64,
    /// Plain TCP: the socket, for senders' direct writes while the writer is idle. Taken
    /// (set to `None`) by the writer when it ends, so the write half shuts down with it.
    direct: Option<Arc<OwnedWriteHalf>>,
    /// Header buffer of direct writes (reused).
    scratch: BytesMut,
}

impl Order {
    /// A sender may write its frame(s) to the socket itself: the writer task is idle with
    /// nothing queued (so it cannot overtake a queued frame), plain TCP, and not corked
    /// unless the frame is a big Write (`big`, see [`is_big_write`]).
    fn may_write_direct(&self, big: bool) -> bool {
        self.writer_idle
            && self.queued == 0
            && self.direct.is_some()
            && (big || !CORK.try_with(|c| *c).unwrap_or(false))
    }
}

struct Shared {
    order: Mutex<Order>,
    /// The reader's [`FrameHook`] (cleared when the reader ends, which breaks the reference
    /// cycle a hook holding a [`SessionSender`] would make).
    hook: Mutex<Option<FrameHook>>,
    queue: mpsc::Sender<Out>,
    close_tx: watch::Sender<Option<String>>,
    fin: Mutex<Option<Final>>,
    peer: SocketAddr,
}

impl Shared {
    fn closed_err(&self) -> LinkClosed {
        LinkClosed {
            reason: self
                .close_tx
                .borrow()
                .clone()
                .unwrap_or_else(|| "closing".to_string()),
        }
    }

    /// Assigns the next seq and enqueues, atomically; `permit` was reserved beforehand.
    ///
    /// Direct path (plain TCP): when the writer task is idle and nothing is queued, the
    /// frame is written to the socket right here with one non-blocking vectored write,
    /// under the ordering lock, so seq order stays wire order. This saves the wake-up of
    /// the writer task (on a loopback or a busy box the biggest part of a small frame's
    /// cost) and, for a big Write, a second CPU reading its data from memory (its copy into
    /// the socket, up to the socket's free space, then runs under this lock). If the socket
    /// takes only part of it, the rest is queued as the writer's first item; if it takes
    /// nothing (or errors), the frame is queued as usual and the writer deals with it. The
    /// permit is held until then, so back-pressure is unchanged.
    fn commit(
        &self,
        permit: mpsc::Permit<'_, Out>,
        f: impl FnOnce(u64) -> Message,
    ) -> Result<u64, LinkClosed> {
        let mut o = self.open_order()?;
        let seq = o.next_seq;
        o.next_seq += 1;
        let frame = Frame::new(seq, f(seq));
        if o.may_write_direct(is_big_write(&frame)) {
            if let Some(rest) = write_direct(&mut o, &frame) {
                o.wire_next = seq + 1;
                if let Some(rest) = rest {
                    o.queued += 1;
                    permit.send(rest);
                }
                return Ok(seq);
            }
        }
        o.queued += 1;
        permit.send(encode_big(frame));
        Ok(seq)
    }

    /// [`Shared::commit`] for several frames with consecutive seqs: on the direct path
    /// they leave in one write (one system call, one wake-up of the peer's reader).
    /// `permits` holds one permit per message.
    fn commit_all(
        &self,
        mut permits: mpsc::PermitIterator<'_, Out>,
        msgs: Vec<Message>,
    ) -> Result<u64, LinkClosed> {
        let mut o = self.open_order()?;
        let first = o.next_seq;
        let frames: Vec<Frame> = msgs
            .into_iter()
            .map(|m| {
                let f = Frame::new(o.next_seq, m);
                o.next_seq += 1;
                f
            })
            .collect();
        // Batches carry no data block (see `write_direct_all`): never big.
        if o.may_write_direct(false) {
            if let Some(rest) = write_direct_all(&mut o, &frames) {
                o.wire_next = o.next_seq;
                if let Some(rest) = rest {
                    o.queued += 1;
                    permits.next().expect("one permit per frame").send(rest);
                }
                return Ok(first);
            }
        }
        for f in frames {
            o.queued += 1;
            permits
                .next()
                .expect("one permit per frame")
                .send(encode_big(f));
        }
        Ok(first)
    }

    /// The ordering lock, unless the session is closing.
    fn open_order(&self) -> Result<std::sync::MutexGuard<'_, Order>, LinkClosed> {
        let o = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if o.closing {
            drop(o);
            return Err(self.closed_err());
        }
        Ok(o)
    }

    fn try_send_with(&self, f: impl FnOnce(u64) -> Message) -> Result<u64, TrySendError> {
        match self.queue.try_reserve() {
            Ok(p) => Ok(self.commit(p, f)?),
            Err(mpsc::error::TrySendError::Full(())) => {
                if self.is_closing() {
                    Err(TrySendError::Closed(self.closed_err()))
                } else {
                    Err(TrySendError::Full)
                }
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                Err(TrySendError::Closed(self.closed_err()))
            }
        }
    }

    fn is_closing(&self) -> bool {
        self.order.lock().unwrap_or_else(|p| p.into_inner()).closing
    }

    /// Starts closing; the first call wins. Returns false if already closing.
    fn shut(&self, reason: String, fin: Final) -> bool {
        {
            let mut o = self.order.lock().unwrap_or_else(|p| p.into_inner());
            if o.closing {
                return false;
            }
            o.closing = true;
        }
        *self.fin.lock().unwrap_or_else(|p| p.into_inner()) = Some(fin);
        match self.fin.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(Final::Goodbye(_)) => {
                tracing::info!(peer = %self.peer, %reason, "peer link closed")
            }
            _ => tracing::warn!(peer = %self.peer, %reason, "peer link closed"),
        }
        self.close_tx.send_replace(Some(reason));
        true
    }
}

tokio::task_local! {
    /// Set by [`corked`]: frames sent in that scope skip the direct path.
    static CORK: bool;
}

/// Runs `fut` with the direct write path off for the frames it sends: they are queued and
/// the writer task sends them together in one vectored write. For bursts (many frames
/// from one task, or many requests in flight), where one write per frame would cost more
/// system calls and peer wake-ups than the one wake-up of the writer task it saves.
pub async fn corked<F: std::future::Future>(fut: F) -> F::Output {
    CORK.scope(true, fut).await
}

/// A Write frame with more than [`BIG_WRITE_BYTES`] of data.
fn is_big_write(frame: &Frame) -> bool {
    matches!(&frame.msg, Message::Write { data, .. } if data.len() > BIG_WRITE_BYTES)
}

/// A queued frame for the writer task. Big Write frames are encoded here, by the sender:
/// the payload CRC reads the whole data block, which is in this CPU's cache now (see
/// [`BIG_WRITE_BYTES`]; a 1 MiB CRC costs about 20 µs from cache, 95 µs from memory on
/// the bench machine). Small frames are left to the writer's batch encoding; a frame that
/// does not encode is left to the writer, which reports it.
fn encode_big(frame: Frame) -> Out {
    if !is_big_write(&frame) {
        return Out::Frame(frame);
    }
    let mut head = BytesMut::with_capacity(64);
    match frame.encode_vectored(&mut head) {
        Ok(tail) => Out::Encoded {
            seq: frame.seq,
            head: head.freeze(),
            tail,
        },
        Err(_) => Out::Frame(frame),
    }
}

/// One non-blocking write of `frame` to `o.direct`. `None`: nothing was written (socket
/// full, error, not a data-path frame or not encodable), queue the frame. `Some(None)`:
/// all of it went out. `Some(Some(rest))`: part of it went out, `rest` must be next on the wire.
fn write_direct(o: &mut Order, frame: &Frame) -> Option<Option<Out>> {
    let Order {
        direct, scratch, ..
    } = o;
    let sock = direct.as_ref()?;
    // Data-path frames; the others (bitmap chunks, resync traffic) go through the writer.
    let direct_kind = matches!(
        &frame.msg,
        Message::Write { .. }
            | Message::Ack1 { .. }
            | Message::Ack2 { .. }
            | Message::FlushAck { .. }
            | Message::Flush
            | Message::Trim { .. }
            | Message::WriteZeroes { .. }
            | Message::Ping { .. }
            | Message::Pong { .. }
    );
    if !direct_kind {
        return None;
    }
    scratch.clear();
    let tail = frame.encode_vectored(scratch).ok()?;
    let total = scratch.len() + tail.as_ref().map_or(0, |t| t.len());
    let n = {
        let mut iov = [IoSlice::new(&scratch[..]), IoSlice::new(&[])];
        let k = match &tail {
            Some(t) if !t.is_empty() => {
                iov[1] = IoSlice::new(t);
                2
            }
            _ => 1,
        };
        match sock.try_write_vectored(&iov[..k]) {
            Ok(n) if n > 0 => n,
            // WouldBlock (or an error the writer will meet and report): nothing written.
            _ => return None,
        }
    };
    if n == total {
        return Some(None);
    }
    let h = scratch.len();
    let (head, tail) = if n < h {
        (Bytes::copy_from_slice(&scratch[n..]), tail)
    } else {
        (Bytes::new(), tail.map(|t| t.slice(n - h..)))
    };
    Some(Some(Out::Rest { head, tail }))
}

/// One non-blocking write of several small frames without data blocks (acks, Flush, ...)
/// to `o.direct`; results as [`write_direct`]. Any frame with a data block: `None`.
fn write_direct_all(o: &mut Order, frames: &[Frame]) -> Option<Option<Out>> {
    let Order {
        direct, scratch, ..
    } = o;
    let sock = direct.as_ref()?;
    scratch.clear();
    for f in frames {
        if matches!(f.msg, Message::Write { .. }) {
            return None;
        }
        match f.encode_vectored(scratch) {
            Ok(None) => {}
            Ok(Some(t)) if t.is_empty() => {}
            _ => return None,
        }
    }
    let n = match sock.try_write(&scratch[..]) {
        Ok(n) if n > 0 => n,
        _ => return None,
    };
    if n == scratch.len() {
        return Some(None);
    }
    Some(Some(Out::Rest {
        head: Bytes::copy_from_slice(&scratch[n..]),
        tail: None,
    }))
}

/// Sending half of a [`Session`]. Cheap to clone; all clones share one seq counter.
#[derive(Clone)]
pub struct SessionSender {
    shared: Arc<Shared>,
}

impl fmt::Debug for SessionSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSender")
            .field("peer", &self.shared.peer)
            .field("closed", &self.is_closed())
            .field("queued_frames", &self.queued_frames())
            .finish()
    }
}

impl SessionSender {
    /// Queues `msg`, waiting while the queue is full. Returns the seq assigned to it (the
    /// key the peer's Ack1/Ack2/FlushAck/ChecksumReply will refer to).
    pub async fn send(&self, msg: Message) -> Result<u64, LinkClosed> {
        self.send_with(move |_| msg).await
    }

    /// Queues the message built by `f`, waiting while the queue is full.
    ///
    /// `f` receives the seq this frame will carry and runs under the sender's ordering lock,
    /// right before the frame is enqueued: whatever it registers (e.g. an in-flight write
    /// keyed by seq) is in place before the frame can reach the wire, and seq order equals
    /// wire order across all clones. Keep `f` short and non-blocking. `f` is not called when
    /// the session is closed.
    ///
    /// A message the codec refuses to encode (a caller bug, e.g. an oversized Write) closes
    /// the session with a reason naming the seq and the error.
    pub async fn send_with<F>(&self, f: F) -> Result<u64, LinkClosed>
    where
        F: FnOnce(u64) -> Message,
    {
        let mut closed = self.shared.close_tx.subscribe();
        let permit = tokio::select! {
            p = self.shared.queue.reserve() => p.map_err(|_| self.shared.closed_err())?,
            _ = closed_signal(&mut closed) => return Err(self.shared.closed_err()),
        };
        self.shared.commit(permit, f)
    }

    /// Queues `msgs` as frames with consecutive seqs (nothing in between), waiting while
    /// the queue lacks room for all of them. Small frames without data blocks leave in one
    /// write when the writer task is idle. Returns the first frame's seq.
    pub async fn send_all(&self, msgs: Vec<Message>) -> Result<u64, LinkClosed> {
        if msgs.is_empty() {
            return Err(LinkClosed {
                reason: "send_all: nothing to send".to_string(),
            });
        }
        let mut closed = self.shared.close_tx.subscribe();
        let permits = tokio::select! {
            p = self.shared.queue.reserve_many(msgs.len()) => p.map_err(|_| self.shared.closed_err())?,
            _ = closed_signal(&mut closed) => return Err(self.shared.closed_err()),
        };
        self.shared.commit_all(permits, msgs)
    }

    /// Queues `msg` without waiting: [`TrySendError::Full`] when the queue is full.
    pub fn try_send(&self, msg: Message) -> Result<u64, TrySendError> {
        self.shared.try_send_with(move |_| msg)
    }

    /// Non-waiting form of [`SessionSender::send_with`].
    pub fn try_send_with<F>(&self, f: F) -> Result<u64, TrySendError>
    where
        F: FnOnce(u64) -> Message,
    {
        self.shared.try_send_with(f)
    }

    /// Closes the session: frames already queued are written, then Goodbye(Shutdown), then
    /// the connection is shut down. `reason` is what [`CloseWatch`] reports.
    pub fn close(&self, reason: &str) {
        self.close_with(reason, GoodbyeReason::Shutdown);
    }

    /// Like [`SessionSender::close`] with an explicit Goodbye reason.
    pub fn close_with(&self, reason: &str, goodbye: GoodbyeReason) {
        self.shared
            .shut(reason.to_string(), Final::Goodbye(goodbye));
    }

    /// Closes the session with an Error frame (`code` from
    /// `mirror_proto::error_code`) instead of a Goodbye: for a peer that broke
    /// the protocol. Queued frames are dropped; `reason` is what
    /// [`CloseWatch`] reports.
    pub fn close_with_error(&self, reason: &str, code: u32) {
        self.shared.shut(
            reason.to_string(),
            Final::Error {
                code,
                message: reason.to_string(),
            },
        );
    }

    /// Installs (or with `None` removes) the reader's frame hook. From the next received
    /// frame on, the reader task offers every frame it would deliver on [`Session::rx`] to
    /// the hook first, which saves the receive channel's hop (and a task wake-up) for the
    /// frames it handles. The hook runs in the reader task: it must do bounded,
    /// non-blocking work, and put anything that may wait into a [`Hooked::Run`] future
    /// (the reader reads nothing else meanwhile: that is the back-pressure). Frames it
    /// passes keep their order on `rx`; the order between passed and handled frames is
    /// the hook's business ([`HookCx::passed`]). Removed when the session ends.
    pub fn set_hook(&self, hook: Option<FrameHook>) {
        *self.shared.hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// True once the session is closing or closed (no more frames are accepted).
    pub fn is_closed(&self) -> bool {
        self.shared.is_closing()
    }

    /// Frames queued and not yet taken by the writer.
    pub fn queued_frames(&self) -> usize {
        self.shared.queue.max_capacity() - self.shared.queue.capacity()
    }

    /// A watch on this session's end.
    pub fn close_watch(&self) -> CloseWatch {
        CloseWatch {
            rx: self.shared.close_tx.subscribe(),
        }
    }
}

/// Observes the end of a session.
#[derive(Debug, Clone)]
pub struct CloseWatch {
    rx: watch::Receiver<Option<String>>,
}

impl CloseWatch {
    /// Waits until the session is closed and returns the reason.
    pub async fn wait(&self) -> String {
        let mut rx = self.rx.clone();
        let r = match rx.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().unwrap_or_default(),
            // Unreachable in practice: every task publishes a reason before dropping.
            Err(_) => "session dropped".to_string(),
        };
        r
    }

    /// The reason, if the session is closed.
    pub fn reason(&self) -> Option<String> {
        self.rx.borrow().clone()
    }
}

/// Resolves once a close reason is published (the borrow guard is not held across awaits).
async fn closed_signal(rx: &mut watch::Receiver<Option<String>>) {
    let _ = rx.wait_for(|r| r.is_some()).await;
}

/// A byte stream a session runs on, split into a reading and a writing half.
pub(crate) trait SessionIo: Send + 'static {
    /// Reading half (the reader task's).
    type R: AsyncRead + Unpin + Send + 'static;
    /// Writing half (the writer task's).
    type W: AsyncWrite + Unpin + Send + 'static;
    /// Splits the stream; the third part, when present, lets senders write frames
    /// to the socket themselves while the writer task is idle ([`Shared::commit`]).
    fn split_io(self) -> (Self::R, Self::W, Option<Arc<OwnedWriteHalf>>);

    /// The TCP socket under the reading half, when the frames' bytes are the socket's
    /// bytes (plain TCP, not TLS), for [`RcvLowat`]. Valid while that half lives.
    fn rx_fd(_r: &Self::R) -> Option<RawFd> {
        None
    }
}

/// Plain TCP: `into_split` (no lock between the halves, unlike `tokio::io::split`) and
/// the direct write path.
impl SessionIo for TcpStream {
    type R = OwnedReadHalf;
    type W = TcpWriter;
    fn split_io(self) -> (Self::R, Self::W, Option<Arc<OwnedWriteHalf>>) {
        let (r, w) = self.into_split();
        let w = Arc::new(w);
        (r, TcpWriter(w.clone()), Some(w))
    }

    fn rx_fd(r: &Self::R) -> Option<RawFd> {
        Some(r.as_ref().as_raw_fd())
    }
}

/// A frame that still needs at least this many bytes is received with `SO_RCVLOWAT`
/// raised to what it still needs (at most [`RCVLOWAT_MAX`]): the kernel then wakes the
/// reader once the bytes are there instead of for every TCP segment (16 per MiB on
/// loopback). Each wake-up is a cross-CPU scheduling of the reader, paid on loopback by
/// the sending agent itself (it runs the receive path). Reads stay non-blocking and
/// return whatever is queued, so nothing else changes; the frame timeout still runs.
const RCVLOWAT_MIN: usize = 128 << 10;
/// Upper bound of the raised `SO_RCVLOWAT` (the kernel also caps it at half the socket's
/// receive buffer limit).
const RCVLOWAT_MAX: usize = 1 << 20;

/// The reader's `SO_RCVLOWAT` setting (see [`RCVLOWAT_MIN`]).
struct RcvLowat {
    fd: Option<RawFd>,
    current: usize,
}

impl RcvLowat {
    /// Sets the low-water mark for a frame that still needs `needed` bytes; a failing
    /// `setsockopt` only disables the optimisation.
    fn set_for(&mut self, needed: usize) {
        let Some(fd) = self.fd else { return };
        let want = if needed >= RCVLOWAT_MIN {
            needed.min(RCVLOWAT_MAX)
        } else {
            1
        };
        if want == self.current {
            return;
        }
        let v = want as libc::c_int;
        // SAFETY: plain setsockopt on an fd the reader's socket half keeps open, with a
        // pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            self.current = want;
        } else {
            tracing::debug!(error = %io::Error::last_os_error(), "SO_RCVLOWAT not settable; not used");
            self.fd = None;
        }
    }
}

/// TLS: the record layer needs `&mut` for every write, so no direct path.
impl SessionIo for super::tls::TlsStream {
    type R = tokio::io::ReadHalf<Self>;
    type W = tokio::io::WriteHalf<Self>;
    fn split_io(self) -> (Self::R, Self::W, Option<Arc<OwnedWriteHalf>>) {
        let (r, w) = tokio::io::split(self);
        (r, w, None)
    }
}

/// In-memory pipes of the tests.
impl SessionIo for tokio::io::DuplexStream {
    type R = tokio::io::ReadHalf<Self>;
    type W = tokio::io::WriteHalf<Self>;
    fn split_io(self) -> (Self::R, Self::W, Option<Arc<OwnedWriteHalf>>) {
        let (r, w) = tokio::io::split(self);
        (r, w, None)
    }
}

/// The writer task's handle on a TCP write half it shares with the direct path:
/// readiness-based writes, which need only `&`. The write half is shut down when the
/// last handle is dropped (`OwnedWriteHalf`'s drop), not by `poll_shutdown`.
pub(crate) struct TcpWriter(Arc<OwnedWriteHalf>);

impl TcpWriter {
    fn poll_try<T>(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&TcpStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        let s: &TcpStream = (*self.0).as_ref();
        loop {
            ready!(s.poll_write_ready(cx))?;
            match op(s) {
                // Readiness was stale (try_* cleared it): wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncWrite for TcpWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_try(cx, |s| s.try_write(buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_try(cx, |s| s.try_write_vectored(bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Starts the tasks of a session on `stream` after the handshake `est`.
pub(crate) fn start<S: SessionIo>(
    stream: S,
    est: Established,
    peer_addr: SocketAddr,
    timeouts: Timeouts,
) -> Session {
    let (r, w, direct) = stream.split_io();
    let lowat = RcvLowat {
        fd: S::rx_fd(&r),
        current: 1,
    };
    let (queue_tx, queue_rx) = mpsc::channel(SEND_QUEUE_FRAMES);
    let (in_tx, in_rx) = mpsc::channel(RECV_QUEUE_FRAMES);
    let (close_tx, close_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        order: Mutex::new(Order {
            next_seq: est.next_tx_seq,
            closing: false,
            queued: 0,
            writer_idle: false,
            wire_next: est.next_tx_seq,
            direct,
            scratch: BytesMut::with_capacity(256),
        }),
        hook: Mutex::new(None),
        queue: queue_tx,
        close_tx,
        fin: Mutex::new(None),
        peer: peer_addr,
    });
    tokio::spawn(writer(w, shared.clone(), queue_rx, timeouts.send));
    tokio::spawn(reader(
        r,
        lowat,
        shared.clone(),
        in_tx,
        est.buf,
        est.next_rx_seq,
        timeouts,
    ));
    tokio::spawn(heartbeat(shared.clone(), timeouts.heartbeat_interval));
    Session {
        peer_hello: est.peer_hello,
        tx: SessionSender { shared },
        rx: in_rx,
        closed: CloseWatch { rx: close_rx },
        peer_addr,
    }
}

async fn heartbeat(shared: Arc<Shared>, interval: Duration) {
    let start = Instant::now();
    let mut closed = shared.close_tx.subscribe();
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            _ = closed_signal(&mut closed) => return,
            _ = tick.tick() => {
                nonce += 1;
                let timestamp_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                // A full queue means frames are flowing to the peer anyway: skip this Ping.
                match shared.try_send_with(|_| Message::Ping { nonce, timestamp_ns }) {
                    Ok(_) | Err(TrySendError::Full) => {}
                    Err(TrySendError::Closed(_)) => return,
                }
            }
        }
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.3}")
    }
}

async fn reader<R: AsyncRead + Unpin>(
    mut r: R,
    mut lowat: RcvLowat,
    shared: Arc<Shared>,
    in_tx: mpsc::Sender<Frame>,
    mut buf: BytesMut,
    mut next_rx: u64,
    timeouts: Timeouts,
) {
    // The peer sends at least heartbeats; a frame must finish within the receive timeout.
    let (silent_after, frame_timeout) = (timeouts.heartbeat_timeout, timeouts.receive);
    let mut closed = shared.close_tx.subscribe();
    // The hook goes with the reader: it may hold a sender (a reference cycle otherwise).
    struct ClearHook<'a>(&'a Shared);
    impl Drop for ClearHook<'_> {
        fn drop(&mut self) {
            self.0.hook.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }
    let _clear = ClearHook(&shared);
    // Seq of the last frame delivered on `in_tx` (see `HookCx::passed`).
    let mut passed = 0u64;
    let mut dec = Decoder::new();
    // When the frame at the front of `buf` started arriving (None: no partial frame).
    let mut partial_since: Option<Instant> = None;
    let protocol = |shared: &Shared, detail: String| {
        shared.shut(
            format!("protocol error: {detail}"),
            Final::Error {
                code: error_code::PROTOCOL,
                message: detail,
            },
        );
    };
    loop {
        loop {
            let frame = match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    partial_since = None;
                    f
                }
                Ok(None) => break,
                Err(e) => return protocol(&shared, e.to_string()),
            };
            if frame.seq != next_rx {
                return protocol(
                    &shared,
                    format!(
                        "wrong sequence number: expected {next_rx}, got {} ({:?})",
                        frame.seq,
                        frame.msg.kind()
                    ),
                );
            }
            next_rx += 1;
            match frame.msg {
                Message::Ping {
                    nonce,
                    timestamp_ns,
                } => {
                    // Skipped when the queue is full: the peer then receives frames anyway.
                    let _ = shared.try_send_with(|_| Message::Pong {
                        nonce,
                        timestamp_ns,
                    });
                }
                Message::Pong { .. } => {}
                Message::Goodbye { reason } => {
                    shared.shut(format!("peer said goodbye ({reason:?})"), Final::Nothing);
                    return;
                }
                Message::Error { code, message } => {
                    shared.shut(
                        format!("peer reported error {code}: {message}"),
                        Final::Nothing,
                    );
                    return;
                }
                Message::Hello(_)
                | Message::AuthChallenge { .. }
                | Message::AuthResponse { .. }
                | Message::AuthResult { .. } => {
                    let detail = format!("unexpected {:?} after authentication", frame.msg.kind());
                    shared.shut(
                        detail.clone(),
                        Final::Error {
                            code: error_code::UNEXPECTED_MESSAGE,
                            message: detail,
                        },
                    );
                    return;
                }
                _ => {
                    let hook = shared
                        .hook
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let frame = match hook {
                        None => frame,
                        Some(h) => match h(
                            frame,
                            HookCx {
                                passed,
                                more: !buf.is_empty(),
                            },
                        ) {
                            Hooked::Done => continue,
                            Hooked::Run(fut) => {
                                let back = tokio::select! {
                                    f = fut => f,
                                    _ = closed_signal(&mut closed) => return,
                                };
                                match back {
                                    Some(f) => f,
                                    None => continue,
                                }
                            }
                            Hooked::Pass(f) => f,
                        },
                    };
                    passed = frame.seq;
                    tokio::select! {
                        res = in_tx.send(frame) => if res.is_err() {
                            shared.shut("session receiver dropped".to_string(),
                                Final::Goodbye(GoodbyeReason::Shutdown));
                            return;
                        },
                        _ = closed_signal(&mut closed) => return,
                    }
                }
            }
        }
        if buf.is_empty() {
            partial_since = None;
        } else if partial_since.is_none() {
            partial_since = Some(Instant::now());
        }
        // The header (if any) is validated already, so `needed` is bounded by the kind's limit.
        buf.reserve(dec.needed().max(16 << 10));
        lowat.set_for(dec.needed());
        let silent_deadline = tokio::time::Instant::now() + silent_after;
        let frame_deadline =
            partial_since.map(|t| tokio::time::Instant::from_std(t + frame_timeout));
        let deadline = frame_deadline.map_or(silent_deadline, |f| f.min(silent_deadline));
        tokio::select! {
            _ = closed_signal(&mut closed) => return,
            _ = in_tx.closed() => {
                shared.shut("session receiver dropped".to_string(),
                    Final::Goodbye(GoodbyeReason::Shutdown));
                return;
            }
            res = tokio::time::timeout_at(deadline, r.read_buf(&mut buf)) => match res {
                Err(_) if frame_deadline.is_some_and(|f| f <= silent_deadline) => {
                    shared.shut(format!(
                        "frame incomplete for {} s ({} bytes read, {} more needed)",
                        secs(frame_timeout), buf.len(), dec.needed()), Final::Nothing);
                    return;
                }
                Err(_) => {
                    shared.shut(format!("peer silent for {} s", secs(silent_after)), Final::Nothing);
                    return;
                }
                Ok(Ok(0)) => {
                    let reason = if buf.is_empty() {
                        "peer closed the connection".to_string()
                    } else {
                        format!("peer closed the connection in the middle of a frame ({} bytes buffered)", buf.len())
                    };
                    shared.shut(reason, Final::Nothing);
                    return;
                }
                // TLS reports a close without close_notify this way (a socket returns 0).
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    shared.shut(format!("peer closed the connection ({e})"), Final::Nothing);
                    return;
                }
                Ok(Err(e)) => {
                    shared.shut(format!("read error: {e} (errno {})", e.raw_os_error().unwrap_or(0)), Final::Nothing);
                    return;
                }
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// A run of encoded header/field bytes in the batch buffer, or a data block sent as is.
enum Seg {
    Buf(Range<usize>),
    Data(Bytes),
}

/// Why [`write_frames`] stopped; each carries the reason the session reports.
#[derive(Debug)]
enum WriteFailed {
    /// The socket refused the bytes (EPIPE, ECONNRESET, ...): the peer may have closed
    /// after telling us why, in frames the reader has not decoded yet.
    Socket(String),
    /// Blocked past the send timeout, or a frame of ours did not encode.
    Other(String),
}

/// Encodes `frames` into `buf` (headers and fixed fields, contiguous runs) and writes them
/// with vectored writes; Write/ResyncData data and bitmap bits are not copied.
async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Out],
    buf: &mut BytesMut,
    send_timeout: Duration,
) -> Result<(), WriteFailed> {
    buf.clear();
    let mut segs = Vec::with_capacity(frames.len() * 2);
    let mut run = 0;
    for out in frames {
        let f = match out {
            Out::Frame(f) => f,
            Out::Encoded { head, tail, .. } | Out::Rest { head, tail } => {
                segs.push(Seg::Buf(run..buf.len()));
                segs.push(Seg::Data(head.clone()));
                if let Some(t) = tail {
                    segs.push(Seg::Data(t.clone()));
                }
                run = buf.len();
                continue;
            }
        };
        let tail = f.encode_vectored(buf).map_err(|e| {
            WriteFailed::Other(format!(
                "cannot encode our own {:?} frame seq {}: {e}",
                f.msg.kind(),
                f.seq
            ))
        })?;
        if let Some(t) = tail {
            segs.push(Seg::Buf(run..buf.len()));
            segs.push(Seg::Data(t));
            run = buf.len();
        }
    }
    segs.push(Seg::Buf(run..buf.len()));
    let mut parts: Vec<&[u8]> = segs
        .iter()
        .map(|s| match s {
            Seg::Buf(r) => &buf[r.clone()],
            Seg::Data(b) => &b[..],
        })
        .filter(|p| !p.is_empty())
        .collect();
    let mut i = 0;
    while i < parts.len() {
        let iov: Vec<IoSlice<'_>> = parts[i..]
            .iter()
            .take(MAX_IOVECS)
            .map(|p| IoSlice::new(p))
            .collect();
        let n = match tokio::time::timeout(send_timeout, w.write_vectored(&iov)).await {
            Err(_) => {
                return Err(WriteFailed::Other(format!(
                    "send blocked for more than {} s",
                    secs(send_timeout)
                )))
            }
            Ok(Err(e)) => {
                return Err(WriteFailed::Socket(format!(
                    "write error: {e} (errno {})",
                    e.raw_os_error().unwrap_or(0)
                )))
            }
            Ok(Ok(0)) => {
                return Err(WriteFailed::Socket(
                    "write error: connection accepts no more data".to_string(),
                ))
            }
            Ok(Ok(n)) => n,
        };
        drop(iov);
        let mut n = n;
        while n > 0 {
            let l = parts[i].len();
            if n >= l {
                n -= l;
                i += 1;
            } else {
                parts[i] = &parts[i][n..];
                n = 0;
            }
        }
    }
    match tokio::time::timeout(send_timeout, w.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(WriteFailed::Socket(format!("write error: {e}"))),
        Err(_) => Err(WriteFailed::Other(format!(
            "send blocked for more than {} s",
            secs(send_timeout)
        ))),
    }
}

/// How long a failed write waits for the reader task to close the session with the
/// peer's reason (see the writer task).
const READER_GRACE: Duration = Duration::from_millis(500);

/// Seq after the last whole frame in `batch` (`None` if it holds only a rest).
fn last_seq(batch: &[Out]) -> Option<u64> {
    batch.iter().rev().find_map(|o| match o {
        Out::Frame(f) => Some(f.seq + 1),
        Out::Encoded { seq, .. } => Some(seq + 1),
        Out::Rest { .. } => None,
    })
}

/// The writer task. Items are *claimed* from the queue only under the ordering lock
/// (`Order::queued`, `Order::writer_idle`), which is what lets [`Shared::commit`] write
/// directly while the writer is idle without ever overtaking a queued frame.
async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<Out>,
    send_timeout: Duration,
) {
    let mut closed = shared.close_tx.subscribe();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut batch: Vec<Out> = Vec::with_capacity(MAX_BATCH_FRAMES);
    // Seq after the last batch written, not yet published in `Order::wire_next`.
    let mut written: Option<u64> = None;
    // False once a write was abandoned mid-frame: the stream can carry nothing more.
    let mut stream_ok = true;
    let lock_order = || shared.order.lock().unwrap_or_else(|p| p.into_inner());
    'run: loop {
        // Claim: `batch` holds at most one item received outside the lock.
        {
            let mut o = lock_order();
            if let Some(n) = written.take() {
                o.wire_next = n;
            }
            o.queued -= batch.len();
            while batch.len() < MAX_BATCH_FRAMES {
                match queue.try_recv() {
                    Ok(x) => {
                        o.queued -= 1;
                        batch.push(x);
                    }
                    Err(_) => break,
                }
            }
            o.writer_idle = batch.is_empty();
        }
        if batch.is_empty() {
            tokio::select! {
                biased;
                _ = closed_signal(&mut closed) => break 'run,
                x = queue.recv() => match x {
                    Some(x) => batch.push(x),
                    None => break 'run,
                },
            }
            continue;
        }
        let graceful_only = |fin: &Mutex<Option<Final>>| {
            matches!(
                fin.lock().unwrap_or_else(|p| p.into_inner()).as_ref(),
                Some(Final::Goodbye(_))
            )
        };
        let res = {
            let fut = write_frames(&mut w, &batch, &mut buf, send_timeout);
            tokio::pin!(fut);
            tokio::select! {
                r = &mut fut => Some(r),
                _ = closed_signal(&mut closed) => {
                    // A graceful close lets the batch finish; any other close abandons it.
                    if graceful_only(&shared.fin) { Some(fut.await) } else { None }
                }
            }
        };
        match res {
            Some(Ok(())) => written = last_seq(&batch).or(written),
            Some(Err(failed)) => {
                let reason = match failed {
                    // A peer that closed after a Goodbye or an Error frame makes our next
                    // write fail, often before the reader task has decoded that frame from
                    // the socket. The peer's own reason is the true one, so the reader gets
                    // a short grace to report it first; a dead connection ends its read at
                    // once (EOF or reset), so this rarely waits.
                    WriteFailed::Socket(reason) => {
                        let _ =
                            tokio::time::timeout(READER_GRACE, closed_signal(&mut closed)).await;
                        reason
                    }
                    // A stalled peer tells the reader nothing either.
                    WriteFailed::Other(reason) => reason,
                };
                shared.shut(reason, Final::Nothing);
                stream_ok = false;
                break;
            }
            None => {
                stream_ok = false;
                break;
            }
        }
        batch.clear();
    }
    // `closing` is set (every way out of the loop follows a close): no direct writes any
    // more, and the direct handle is dropped so the write half shuts down with `w`.
    let (wire_next, direct) = {
        let mut o = lock_order();
        if let Some(n) = written.take() {
            o.wire_next = n;
        }
        (o.wire_next, o.direct.take())
    };
    drop(direct);
    let fin = shared.fin.lock().unwrap_or_else(|p| p.into_inner()).take();
    if stream_ok {
        // Anything claimed but not written (the item received when the close came).
        let mut pending: Vec<Out> = std::mem::take(&mut batch);
        queue.close();
        while let Ok(x) = queue.try_recv() {
            pending.push(x);
        }
        let last = match fin {
            Some(Final::Goodbye(reason)) => {
                // Everything enqueued before close() still goes out, then Goodbye.
                let seq = last_seq(&pending).unwrap_or(wire_next);
                batch = pending;
                Some(Frame::new(seq, Message::Goodbye { reason }))
            }
            Some(Final::Error { code, message }) => {
                // Queued frames are dropped, but a frame a sender started on the wire is
                // completed first (it is always first in the queue).
                batch.extend(
                    pending
                        .into_iter()
                        .take(1)
                        .filter(|o| matches!(o, Out::Rest { .. })),
                );
                Some(Frame::new(wire_next, Message::Error { code, message }))
            }
            Some(Final::Nothing) | None => None,
        };
        if let Some(f) = last {
            batch.push(Out::Frame(f));
            let _ = write_frames(&mut w, &batch, &mut buf, send_timeout).await;
        }
    }
    let _ = tokio::time::timeout(send_timeout, w.shutdown()).await;
    drop(w);
    // Make sure the session reads as closed even if the queue ended without a reason.
    shared.shut("session ended".to_string(), Final::Nothing);
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// Records each write call; accepts everything.
    #[derive(Default)]
    struct Recorder {
        calls: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                self.bytes.extend_from_slice(b);
                n += b.len();
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn pattern(seq: u64, len: usize) -> Bytes {
        (0..len)
            .map(|i| (seq as usize * 31 + i) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    /// Many tasks sending small and large frames over a real TCP socket with a tiny send
    /// buffer: direct writes (whole and partial) and the writer task interleave, yet the
    /// peer sees every frame once, in seq order (its reader closes on any gap), with the
    /// right bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_queued_writes_keep_seq_order_on_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_send_buffer_size(16 << 10).unwrap();
        let (a, b) = tokio::join!(sock.connect(addr), listener.accept());
        let (a, (b, _)) = (a.unwrap(), b.unwrap());
        let est = || Established {
            peer_hello: crate::peer::testing::hello("n", "c", "r", 1 << 30, 4096),
            next_tx_seq: 1,
            next_rx_seq: 1,
            buf: BytesMut::new(),
        };
        let t = Timeouts::default();
        let sa = start(a, est(), addr, t);
        let mut sb = start(b, est(), addr, t);
        const TASKS: u64 = 8;
        const PER_TASK: u64 = 50;
        let mut senders = Vec::new();
        for k in 0..TASKS {
            let tx = sa.tx.clone();
            senders.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    // Sizes around the direct-path limit, and a few bursts (corked).
                    let len = [512, 4096, 60_000, 70_000, 200_000][((k + i) % 5) as usize];
                    let send = tx.send_with(move |seq| Message::Write {
                        offset: seq * 4096,
                        fua: false,
                        data: pattern(seq, len),
                    });
                    if i % 7 == 0 {
                        corked(send).await.unwrap();
                    } else {
                        send.await.unwrap();
                    }
                }
            }));
        }
        // Heartbeat Pings take seqs too (the session consumes them): seqs rise, with gaps.
        let mut last = 0;
        for _ in 0..TASKS * PER_TASK {
            let f = sb.rx.recv().await.expect("session ended early");
            assert!(f.seq > last, "seq {} after {last}", f.seq);
            last = f.seq;
            let Message::Write { offset, data, .. } = f.msg else {
                panic!("unexpected {:?}", f.msg.kind())
            };
            assert_eq!(offset, f.seq * 4096);
            assert_eq!(data, pattern(f.seq, data.len()), "seq {}", f.seq);
        }
        for s in senders {
            s.await.unwrap();
        }
        // A graceful close still ends with Goodbye after everything (seq continues).
        sa.tx.close("done");
        assert!(sb.closed.wait().await.starts_with("peer said goodbye"));
        assert!(sb.rx.recv().await.is_none());
    }

    /// A stream whose writes fail with EPIPE (each failure signalled to the test), and
    /// whose reads come from an in-memory pipe the test controls: a peer that said
    /// Goodbye and closed, seen by a writer that fails before the reader has decoded the
    /// Goodbye.
    struct DeadPeer {
        rx: tokio::io::DuplexStream,
        failed: Arc<tokio::sync::Notify>,
    }

    struct BrokenPipe(Arc<tokio::sync::Notify>);

    impl AsyncWrite for BrokenPipe {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.notify_one();
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl SessionIo for DeadPeer {
        type R = tokio::io::DuplexStream;
        type W = BrokenPipe;
        fn split_io(self) -> (Self::R, Self::W, Option<Arc<OwnedWriteHalf>>) {
            (self.rx, BrokenPipe(self.failed), None)
        }
    }

    /// The peer's Goodbye, still in the socket when our write fails with EPIPE, is the
    /// reason the session reports (CI once saw "write error: Broken pipe" instead).
    #[tokio::test]
    async fn a_write_error_leaves_the_peers_goodbye_as_the_reason() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let failed = Arc::new(tokio::sync::Notify::new());
        let est = Established {
            peer_hello: crate::peer::testing::hello("n", "c", "r", 1 << 30, 4096),
            next_tx_seq: 1,
            next_rx_seq: 1,
            buf: BytesMut::new(),
        };
        let io = DeadPeer {
            rx: ours,
            failed: failed.clone(),
        };
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let s = start(io, est, addr, Timeouts::default());
        s.tx.send(Message::Flush).await.unwrap();
        failed.notified().await;
        // The writer has failed; only now does the Goodbye reach the reader.
        let mut bytes = BytesMut::new();
        Frame::new(
            1,
            Message::Goodbye {
                reason: GoodbyeReason::Shutdown,
            },
        )
        .encode(&mut bytes)
        .unwrap();
        theirs.write_all(&bytes).await.unwrap();
        let reason = s.closed.wait().await;
        assert!(reason.starts_with("peer said goodbye"), "{reason}");
    }

    fn rcvlowat(fd: RawFd) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt on a live socket into a c_int of the given size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        v
    }

    #[tokio::test]
    async fn the_receive_low_water_mark_follows_what_a_big_frame_still_needs() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_a, (b, _)) = (a.unwrap(), b.unwrap());
        let (r, _w, _direct) = b.split_io();
        let fd = <TcpStream as SessionIo>::rx_fd(&r).expect("plain TCP has an fd");
        let mut lw = RcvLowat {
            fd: Some(fd),
            current: 1,
        };
        lw.set_for(28);
        assert_eq!(rcvlowat(fd), 1, "small frames: the default mark");
        lw.set_for(600_000);
        assert_eq!(rcvlowat(fd), 600_000);
        lw.set_for(32 << 20);
        assert_eq!(rcvlowat(fd), RCVLOWAT_MAX as libc::c_int, "capped");
        lw.set_for(RCVLOWAT_MIN - 1);
        assert_eq!(rcvlowat(fd), 1, "back to the default below the threshold");
        // Test pipes (like TLS): no fd, nothing to set.
        let (pipe, _other) = tokio::io::duplex(64);
        let (pr, _pw, _) = pipe.split_io();
        assert!(<tokio::io::DuplexStream as SessionIo>::rx_fd(&pr).is_none());
    }

    #[tokio::test]
    async fn frames_encoded_by_their_sender_go_out_byte_identical() {
        let big = Frame::new(
            7,
            Message::Write {
                offset: 1 << 20,
                fua: true,
                data: pattern(7, BIG_WRITE_BYTES + 4096),
            },
        );
        let small = Frame::new(
            9,
            Message::Write {
                offset: 0,
                fua: false,
                data: pattern(9, 4096),
            },
        );
        let ack = Frame::new(8, Message::Ack1 { seq: 3 });
        let outs = vec![
            encode_big(big.clone()),
            encode_big(ack.clone()),
            encode_big(small.clone()),
        ];
        assert!(matches!(outs[0], Out::Encoded { seq: 7, .. }));
        assert!(matches!(outs[1], Out::Frame(_)));
        assert!(matches!(outs[2], Out::Frame(_)));
        assert_eq!(last_seq(&outs[..1]), Some(8));
        let mut w = Recorder::default();
        let mut buf = BytesMut::new();
        write_frames(&mut w, &outs, &mut buf, Duration::from_secs(1))
            .await
            .unwrap();
        let mut expect = Vec::new();
        for f in [&big, &ack, &small] {
            expect.extend_from_slice(&f.to_bytes().unwrap());
        }
        assert_eq!(w.bytes, expect);
        // The receiver's decoder accepts the pre-encoded frame (CRC included).
        let mut rx = BytesMut::from(&expect[..]);
        let mut dec = Decoder::new();
        assert_eq!(dec.decode(&mut rx).unwrap(), Some(big));
        assert_eq!(dec.decode(&mut rx).unwrap(), Some(ack));
        assert_eq!(dec.decode(&mut rx).unwrap(), Some(small));
    }

    #[tokio::test]
    async fn queued_frames_are_coalesced_into_one_vectored_write() {
        let data = Bytes::from(vec![0x11u8; 100_000]);
        let frames: Vec<Out> = (1..=20u64)
            .map(|seq| {
                let msg = if seq % 5 == 0 {
                    Message::Write {
                        offset: seq * 4096,
                        fua: false,
                        data: data.clone(),
                    }
                } else {
                    Message::Ack1 { seq }
                };
                Out::Frame(Frame::new(seq, msg))
            })
            .collect();
        let mut w = Recorder::default();
        let mut buf = BytesMut::new();
        write_frames(&mut w, &frames, &mut buf, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(w.calls, 1, "20 frames, 4 with data, in one syscall");
        // The bytes are exactly the frames' encodings, in order.
        let mut expect = Vec::new();
        for f in &frames {
            let Out::Frame(f) = f else { unreachable!() };
            expect.extend_from_slice(&f.to_bytes().unwrap());
        }
        assert_eq!(w.bytes, expect);
        // The header buffer never held the data blocks (they went out as their own iovecs).
        assert!(
            buf.len() < 20 * 64,
            "header buffer holds {} bytes",
            buf.len()
        );
    }
}
