//! One connection: handshake, then the transmission phase.
//!
//! Transmission runs two tasks:
//!
//! - the **reader** (this connection's task) parses request headers,
//!   validates them, obtains in-flight permits (bytes per connection, bytes
//!   globally, requests per connection) and reads write payloads; while
//!   permits are exhausted it stops reading, which is the backpressure. It
//!   also polls the **requests** themselves: one future per request, calling
//!   the [`BlockEngine`](crate::engine::BlockEngine), kept in a set polled by
//!   this task (`pending.rs`; no task is spawned per request), whose outcome
//!   is queued as a reply carrying the request's permits;
//! - the **writer** serialises replies from a bounded channel onto the
//!   socket and releases the permits once a reply is written.
//!
//! The socket's write half sits behind an async mutex. A request that is the
//! only one in flight on its connection (QD1) writes its own reply when the
//! mutex is free, saving the hop to the writer task; with more in flight,
//! replies go through the writer, which batches them into one flush.
//!
//! Replies are therefore sent in completion order, not request order.
//! A write is handed to the engine only after its whole payload arrived, so a
//! client vanishing mid-payload never causes a partial write or a reply.
//! On `NBD_CMD_DISC`, end of stream or an error, the reader stops, waits for
//! the requests in flight, lets the writer flush, and closes.
//!
//! When nothing is in flight and no reply is queued, the connection polls
//! its socket for the next request for a short, adaptive window before it
//! parks in epoll (`IdlePoll`, `Limits::idle_poll`): a client issuing one
//! request after another then does not wait for the server's wake-up.
//!

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, Mutex, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::error::NbdError;
use super::handshake::{self, Outcome, Session};
use super::input::Input;
use super::pending::Pending;
use super::proto::*;
use super::server::{Export, Gauge, GaugeGuard, NbdServer};
use crate::engine::Extent;

/// Largest write payload the server will read (and drop) in order to answer
/// an invalid write with an error instead of closing. The protocol asks
/// servers not to treat lengths below 2^25 as denial of service.
const MIN_SKIPPABLE_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Serves one connection; logs and returns why it ended. With `preselected`
/// the handshake is skipped (the client was configured out of band, e.g. the
/// kernel NBD driver) and transmission starts at once with simple replies.
pub(crate) async fn run<S>(
    server: Arc<NbdServer>,
    stream: S,
    guard: GaugeGuard,
    peer: String,
    preselected: Option<usize>,
    poll_fd: Option<RawFd>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _conn = guard;
    let result = serve(&server, stream, preselected, poll_fd).await;
    match &result {
        Ok(()) => tracing::debug!(%peer, "NBD connection closed"),
        Err(NbdError::Shutdown) => {
            tracing::info!(%peer, "NBD connection closed: server shutting down")
        }
        Err(e) => tracing::warn!(%peer, reason = %e, "NBD connection closed"),
    }
    result
}

async fn serve<S>(
    server: &Arc<NbdServer>,
    stream: S,
    preselected: Option<usize>,
    poll_fd: Option<RawFd>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut input = Input::new(rd);
    let mut shutdown = server.subscribe_shutdown();
    if let Some(export) = preselected {
        let session = Session {
            export,
            structured: false,
            block_status: false,
        };
        return transmission(server, session, input, wr, shutdown, poll_fd).await;
    }
    let timeout = server.limits.handshake_timeout;
    let outcome = tokio::time::timeout(
        timeout,
        handshake::negotiate(server, &mut input, &mut wr, &mut shutdown),
    )
    .await
    .map_err(|_| NbdError::HandshakeTimeout(timeout))??;
    match outcome {
        Outcome::Aborted => Ok(()),
        Outcome::Transmission(session) => {
            transmission(server, session, input, wr, shutdown, poll_fd).await
        }
    }
}

/// Permits held by a request from admission until its reply is written.
#[derive(Debug)]
struct Permits {
    _request: OwnedSemaphorePermit,
    _conn_bytes: Option<OwnedSemaphorePermit>,
    _global_bytes: Option<OwnedSemaphorePermit>,
}

/// A reply on its way to the writer.
#[derive(Debug)]
struct Outgoing {
    handle: u64,
    body: ReplyBody,
    /// Released after the reply is written.
    _permits: Option<Permits>,
}

#[derive(Debug)]
enum ReplyBody {
    /// Success without data.
    Done,
    /// Successful read.
    Data { offset: u64, data: Bytes },
    /// Successful block status: `(length, flags)` descriptors of
    /// `base:allocation` (at least one; structured replies are negotiated).
    BlockStatus { descriptors: Vec<(u32, u32)> },
    /// Failure; `offset` is set for engine errors of ranged commands
    /// (structured `ERROR_OFFSET`), `is_read` forces a structured reply.
    Error {
        errno: u32,
        offset: Option<u64>,
        message: String,
    },
}

/// An admitted request ready for the engine.
#[derive(Debug)]
enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        /// `NBD_CMD_FLAG_REQ_ONE`: one descriptor, within the request.
        one: bool,
        /// The export's minimum block size: every descriptor is a multiple.
        align: u32,
    },
}

/// The verdict on a request header.
#[derive(Debug)]
enum Verdict {
    Execute,
    Disconnect,
    Reject { errno: u32, message: String },
}

/// Checks a request against the negotiated session (spec "Error values" and
/// "Block size constraints"): unknown command or flag, bad alignment, zero
/// or oversized length -> EINVAL; read-only -> EPERM; past the end ->
/// ENOSPC for writes and write-zeroes, EINVAL for reads, trims and block
/// status; block status without a selected metadata context -> EINVAL.
fn validate(h: &RequestHeader, e: &Export, structured: bool, block_status: bool) -> Verdict {
    let reject = |errno: u32, message: String| Verdict::Reject { errno, message };
    let allowed = match h.kind {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_DISC => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS if block_status => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_BLOCK_STATUS => {
            return reject(
                NBD_EINVAL,
                "block status without a metadata context selected (NBD_OPT_SET_META_CONTEXT base:allocation)".into(),
            )
        }
        other => return reject(NBD_EINVAL, format!("unknown command {other}")),
    };
    if h.flags & !allowed != 0 {
        return reject(
            NBD_EINVAL,
            format!(
                "command {} does not accept flags {:#06x}",
                h.kind,
                h.flags & !allowed
            ),
        );
    }
    match h.kind {
        CMD_DISC => return Verdict::Disconnect,
        CMD_FLUSH => {
            if h.offset != 0 || h.length != 0 {
                return reject(NBD_EINVAL, "flush offset and length must be zero".into());
            }
            return Verdict::Execute;
        }
        _ => {}
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && e.read_only {
        return reject(NBD_EPERM, "export is read-only".into());
    }
    if h.length == 0 {
        return reject(NBD_EINVAL, "zero-length request".into());
    }
    let b = e.block_sizes;
    let min = b.minimum as u64;
    if !h.offset.is_multiple_of(min) || !(h.length as u64).is_multiple_of(min) {
        return reject(
            NBD_EINVAL,
            format!(
                "offset {} / length {} not aligned to {}",
                h.offset, h.length, b.minimum
            ),
        );
    }
    // The maximum bounds payloads and work per request; a trim's or a block
    // status's length is neither (the latter is only a hint).
    if !matches!(h.kind, CMD_TRIM | CMD_BLOCK_STATUS) && h.length > b.maximum {
        return reject(
            NBD_EINVAL,
            format!("length {} above maximum block size {}", h.length, b.maximum),
        );
    }
    let size = e.engine.size();
    let beyond = h
        .offset
        .checked_add(h.length as u64)
        .is_none_or(|end| end > size);
    if beyond {
        let errno = if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        };
        return reject(
            errno,
            format!(
                "range {}+{} beyond export size {}",
                h.offset, h.length, size
            ),
        );
    }
    Verdict::Execute
}

/// Signals from the writer to the reader.
#[derive(Debug, Default)]
struct WriterState {
    dead: AtomicBool,
    notify: Notify,
}

enum Event {
    Done(Outgoing),
    Header(std::io::Result<bool>),
    WriterDead,
    GraceExpired,
}

async fn transmission<R, W>(
    server: &Arc<NbdServer>,
    session: Session,
    mut input: Input<R>,
    wr: W,
    mut shutdown: watch::Receiver<bool>,
    poll_fd: Option<RawFd>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = server.exports[session.export].clone();
    let structured = session.structured;
    let block_status = session.block_status;
    let limits = server.limits.clone();
    let conn_bytes = Arc::new(Semaphore::new(limits.conn_inflight_bytes));
    let conn_requests = Arc::new(Semaphore::new(limits.conn_inflight_requests));
    let (tx, rx) = mpsc::channel::<Outgoing>(limits.reply_queue);
    let wstate = Arc::new(WriterState::default());
    let sink = Arc::new(Mutex::new(Sink {
        w: BufWriter::with_capacity(64 * 1024, wr),
        header: Vec::with_capacity(64),
        failed: false,
    }));
    let mut writer = {
        let guard = server.gauge(Gauge::Task);
        let wstate = Arc::clone(&wstate);
        let sink = Arc::clone(&sink);
        tokio::spawn(async move {
            let _task = guard;
            writer_task(sink, rx, structured, wstate).await
        })
    };
    // Requests in the engine, polled by this task (see `pending.rs`).
    let mut pending: Pending<Outgoing> = Pending::default();
    pending.serve_engine(Arc::clone(&export.engine));
    let grace_dur = limits.shutdown_grace;
    let replies = Replies {
        tx,
        sink: Arc::clone(&sink),
        wstate: Arc::clone(&wstate),
        structured,
        grace_dur,
    };
    let mut shutting = *shutdown.borrow();
    let mut grace: Option<Instant> = shutting.then(|| Instant::now() + limits.shutdown_grace);
    let max_payload = export.block_sizes.maximum.max(MIN_SKIPPABLE_PAYLOAD);
    let mut idle = IdlePoll::new(limits.idle_poll);

    // `reader` returns how the loop ended; the cleanup below always runs.
    let result: Result<(), NbdError> = 'reader: loop {
        if shutting && pending.is_empty() {
            break Err(NbdError::Shutdown);
        }
        // Idle: nothing in flight, no reply waiting for the writer, no
        // request buffered. Poll for the next one briefly before parking
        // (see `IdlePoll`); a reply still queued would only be delayed.
        if let Some(fd) = poll_fd {
            if pending.is_empty()
                && input.buf.len() < REQUEST_HEADER_LEN
                && !shutting
                && replies.writer_idle()
            {
                if let Err(source) = idle.poll(&mut input, fd).await {
                    break Err(NbdError::Io {
                        phase: "request header",
                        source,
                    });
                }
            }
        }
        // Headers already received are admitted before the engine futures
        // are polled again, so that the requests of one burst are started
        // in one polling pass (one io_uring submission, see
        // `engine::Plug`). Bounded by the read-ahead buffer and by the
        // in-flight permits (the admission wait serves completions).
        let burst = input.buf.len() >= REQUEST_HEADER_LEN && !wstate.dead.load(Ordering::SeqCst);
        let event = if burst {
            Event::Header(Ok(true))
        } else {
            // Completions first: they are the common case, and polling the
            // writer-death and shutdown waits first would register and
            // deregister their wakers (a lock each) on every request. Both
            // are still polled whenever this task is about to wait.
            tokio::select! {
            biased;
            Some(out) = pending.next(), if !pending.is_empty() => Event::Done(out),
            _ = wait_dead(&wstate) => Event::WriterDead,
            r = shutdown.wait_for(|s| *s), if !shutting => {
                let _ = r;
                shutting = true;
                grace = Some(Instant::now() + limits.shutdown_grace);
                continue;
            }
            _ = sleep_until_opt(grace) => Event::GraceExpired,
            r = input.fill(REQUEST_HEADER_LEN) => Event::Header(r),
            }
        };
        let got = match event {
            Event::Done(out) => {
                let r = replies
                    .send(out, pending.is_empty(), &mut shutdown, grace)
                    .await;
                if let Err(e) = r {
                    break Err(e);
                }
                continue;
            }
            Event::WriterDead => break Err(writer_failed()),
            Event::GraceExpired => {
                break Err(NbdError::ShutdownGraceExpired(limits.shutdown_grace))
            }
            Event::Header(Err(source)) => {
                break Err(NbdError::Io {
                    phase: "request header",
                    source,
                })
            }
            Event::Header(Ok(got)) => got,
        };
        if !got {
            if input.buf.is_empty() {
                // Hard disconnect between requests: not an error of ours.
                tracing::debug!("NBD client closed the connection without NBD_CMD_DISC");
                break Ok(());
            }
            break Err(NbdError::Truncated {
                what: "request header",
                got: input.buf.len(),
                expected: REQUEST_HEADER_LEN,
            });
        }
        let h = match RequestHeader::decode(&input.buf[..REQUEST_HEADER_LEN]) {
            Ok(Some(h)) => h,
            Ok(None) => unreachable!("fill() guaranteed a full header"),
            Err(e) => break Err(e.into()),
        };
        input.buf.advance(REQUEST_HEADER_LEN);
        server.counters.requests.fetch_add(1, Ordering::Relaxed);

        let payload_len = if h.kind == CMD_WRITE { h.length } else { 0 };
        if payload_len > max_payload {
            break Err(NbdError::PayloadTooLarge {
                offset: h.offset,
                length: h.length,
                bound: max_payload,
            });
        }

        let mut verdict = validate(&h, &export, structured, block_status);
        if shutting && matches!(verdict, Verdict::Execute) {
            verdict = Verdict::Reject {
                errno: NBD_ESHUTDOWN,
                message: "server shutting down".into(),
            };
        }

        // Admission: permits before the payload is read, so memory stays bounded.
        let mut permits = None;
        if matches!(verdict, Verdict::Execute) {
            let data_bytes = match h.kind {
                CMD_READ | CMD_WRITE => h.length,
                _ => 0,
            };
            let acquire = acquire_permits(
                &conn_requests,
                &conn_bytes,
                &server.global_bytes,
                data_bytes,
            );
            tokio::pin!(acquire);
            // Completions are served meanwhile: they release the permits.
            loop {
                let out = tokio::select! {
                    biased;
                    // Permits first: usually there (see the main select).
                    p = &mut acquire => {
                        permits = Some(p);
                        break;
                    }
                    _ = wait_dead(&wstate) => break 'reader Err(writer_failed()),
                    r = shutdown.wait_for(|s| *s), if !shutting => {
                        let _ = r;
                        shutting = true;
                        grace = Some(Instant::now() + limits.shutdown_grace);
                        verdict = Verdict::Reject { errno: NBD_ESHUTDOWN, message: "server shutting down".into() };
                        break;
                    }
                    _ = sleep_until_opt(grace) => break 'reader Err(NbdError::ShutdownGraceExpired(limits.shutdown_grace)),
                    // Only while the permits are not there: polling here
                    // when they are would start each request of a burst
                    // in its own pass (one io_uring submission each).
                    Some(out) = pending.next(), if !pending.is_empty() => out,
                };
                let r = replies
                    .send(out, pending.is_empty(), &mut shutdown, grace)
                    .await;
                if let Err(e) = r {
                    break 'reader Err(e);
                }
            }
        }

        match verdict {
            Verdict::Disconnect => {
                tracing::debug!("NBD_CMD_DISC received");
                break Ok(());
            }
            Verdict::Reject { errno, message } => {
                if payload_len > 0 {
                    let skipped = tokio::select! {
                        biased;
                        _ = wait_dead(&wstate) => break 'reader Err(writer_failed()),
                        _ = sleep_until_opt(grace) => break 'reader Err(NbdError::ShutdownGraceExpired(limits.shutdown_grace)),
                        r = input.skip(payload_len as usize) => r,
                    };
                    if let Err(e) = write_payload(skipped, payload_len as usize) {
                        break Err(e);
                    }
                }
                tracing::debug!(handle = h.handle, kind = h.kind, errno, %message, "NBD request rejected");
                server.counters.errors.fetch_add(1, Ordering::Relaxed);
                let out = Outgoing {
                    handle: h.handle,
                    body: ReplyBody::Error {
                        errno,
                        offset: None,
                        message,
                    },
                    _permits: None,
                };
                tokio::select! {
                    biased;
                    _ = wait_dead(&wstate) => break 'reader Err(writer_failed()),
                    _ = sleep_until_opt(grace) => break 'reader Err(NbdError::ShutdownGraceExpired(limits.shutdown_grace)),
                    r = replies.tx.send(out) => if r.is_err() { break 'reader Err(writer_failed()) },
                }
            }
            Verdict::Execute => {
                let op = match h.kind {
                    CMD_READ => Op::Read {
                        offset: h.offset,
                        len: h.length,
                    },
                    CMD_WRITE => {
                        let mut payload = input.start_payload(h.length as usize);
                        let mut done = None;
                        // Completions are served while the payload arrives.
                        let read = loop {
                            if payload.is_complete() {
                                break Ok(Ok(payload.into_bytes()));
                            }
                            tokio::select! {
                                biased;
                                _ = wait_dead(&wstate) => break 'reader Err(writer_failed()),
                                _ = sleep_until_opt(grace) => break 'reader Err(NbdError::ShutdownGraceExpired(limits.shutdown_grace)),
                                Some(out) = pending.next(), if !pending.is_empty() => done = Some(out),
                                r = input.read_payload_some(&mut payload) => match r {
                                    Err(e) => break Err(e),
                                    Ok(false) => break Ok(Err(payload.received())),
                                    Ok(true) => {}
                                },
                            }
                            if let Some(out) = done.take() {
                                let r = replies
                                    .send(out, pending.is_empty(), &mut shutdown, grace)
                                    .await;
                                if let Err(e) = r {
                                    break 'reader Err(e);
                                }
                            }
                        };
                        // A payload that did not fully arrive is never applied, never
                        // acknowledged.
                        match write_payload(read, h.length as usize) {
                            Err(e) => break Err(e),
                            Ok(data) => Op::Write {
                                offset: h.offset,
                                data,
                                fua: h.flags & CMD_FLAG_FUA != 0,
                            },
                        }
                    }
                    CMD_FLUSH => Op::Flush,
                    CMD_TRIM => Op::Trim {
                        offset: h.offset,
                        len: h.length,
                        fua: h.flags & CMD_FLAG_FUA != 0,
                    },
                    CMD_WRITE_ZEROES => Op::WriteZeroes {
                        offset: h.offset,
                        len: h.length,
                        may_trim: h.flags & CMD_FLAG_NO_HOLE == 0,
                        fua: h.flags & CMD_FLAG_FUA != 0,
                    },
                    CMD_BLOCK_STATUS => Op::BlockStatus {
                        offset: h.offset,
                        len: h.length,
                        one: h.flags & CMD_FLAG_REQ_ONE != 0,
                        align: export.block_sizes.minimum,
                    },
                    _ => unreachable!("validate() only executes known commands"),
                };
                let server = Arc::clone(server);
                let engine = Arc::clone(&export.engine);
                let handle = h.handle;
                pending.push(Box::pin(async move {
                    let body = execute(&server, engine.as_ref(), op).await;
                    Outgoing {
                        handle,
                        body,
                        _permits: permits,
                    }
                }));
            }
        }
    };

    // Requests already handed to the engine complete and are answered (if
    // the client is still there) before the connection closes. Only during
    // shutdown is this bounded: after the grace period (e.g. a client that
    // stopped reading replies) the remaining tasks and the writer are aborted.
    let drained = {
        let mut sd = shutdown.clone();
        let pending = &mut pending;
        let writer = &mut writer;
        let drain = async move {
            while let Some(out) = pending.next().await {
                // Fails only when the writer is dead: the reply is dropped
                // with its permits, as nobody can receive it.
                let _ = replies.send(out, pending.is_empty(), &mut sd, grace).await;
            }
            // Closes the queue: the writer ends once it wrote what is queued.
            drop(replies);
            writer.await
        };
        tokio::select! {
            r = drain => Some(r),
            _ = grace_timer(&mut shutdown, grace, limits.shutdown_grace) => None,
        }
    };
    match drained {
        Some(Ok(())) => {}
        Some(Err(e)) => tracing::error!(error = %e, "NBD reply writer task failed"),
        None => {
            tracing::warn!(in_flight = pending.len(), "NBD connection not drained within the shutdown grace period; aborting its requests");
            pending.clear();
            writer.abort();
            let _ = writer.await;
            if result.is_ok() {
                return Err(NbdError::ShutdownGraceExpired(limits.shutdown_grace));
            }
        }
    }
    result
}

/// The outcome of receiving (or skipping) a write payload of `expected` bytes: the
/// socket's error, or the stream ended after `got` bytes, becomes the error that closes
/// the connection.
fn write_payload<T>(r: std::io::Result<Result<T, usize>>, expected: usize) -> Result<T, NbdError> {
    match r {
        Err(source) => Err(NbdError::Io {
            phase: "write payload",
            source,
        }),
        Ok(Err(got)) => Err(NbdError::Truncated {
            what: "write payload",
            got,
            expected,
        }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// The connection task's way to the client: the reply queue of the writer
/// task, and the socket itself for a reply it may write directly.
struct Replies<W> {
    tx: mpsc::Sender<Outgoing>,
    sink: Arc<Mutex<Sink<W>>>,
    wstate: Arc<WriterState>,
    structured: bool,
    grace_dur: std::time::Duration,
}

impl<W: AsyncWrite + Unpin> Replies<W> {
    /// No reply queued for the writer task and none being written.
    fn writer_idle(&self) -> bool {
        self.tx.capacity() == self.tx.max_capacity() && self.sink.try_lock().is_ok()
    }

    /// Hands a finished request's reply on. When it was the only request in
    /// flight and the writer is idle, it is written here (at QD1 this saves the
    /// hop to the writer task); otherwise it is queued for the writer, which
    /// batches replies into one flush. Both waits end with an error when the
    /// writer died or the shutdown grace period expired (e.g. a client that
    /// stopped reading replies).
    async fn send(
        &self,
        out: Outgoing,
        alone: bool,
        shutdown: &mut watch::Receiver<bool>,
        grace: Option<Instant>,
    ) -> Result<(), NbdError> {
        let grace_dur = self.grace_dur;
        if alone {
            if let Ok(mut s) = self.sink.try_lock() {
                return tokio::select! {
                    biased;
                    () = s.send_one(out, self.structured, &self.wstate) => Ok(()),
                    _ = grace_timer(shutdown, grace, grace_dur) => Err(NbdError::ShutdownGraceExpired(grace_dur)),
                };
            }
        }
        // The queue first: it usually has room (see the main select).
        tokio::select! {
            biased;
            r = self.tx.send(out) => r.map_err(|_| writer_failed()),
            _ = wait_dead(&self.wstate) => Err(writer_failed()),
            _ = grace_timer(shutdown, grace, grace_dur) => Err(NbdError::ShutdownGraceExpired(grace_dur)),
        }
    }
}

/// Adaptive polling for the next request when a connection goes idle (see
/// [`Limits::idle_poll`](super::Limits::idle_poll)): after the last reply
/// of a burst, the connection task keeps trying a non-blocking `recv` for up
/// to `window` before it parks in epoll. A client issuing requests one after
/// another (QD1) then finds the server awake, instead of paying for a
/// wake-up per request (on a VM, waking an idle vCPU costs tens of µs). A
/// window that expires is halved, down to nothing; then only every
/// [`IDLE_PROBE_EVERY`]th idle period probes with the full window again, so
/// an idle or slow client costs almost no polling. A hit restores the full
/// window.
#[derive(Debug)]
struct IdlePoll {
    max: Duration,
    window: Duration,
    /// While `window` is zero: idle periods until the next probe.
    probe_in: u32,
}

/// Windows below this are not worth a poll.
const IDLE_POLL_MIN: Duration = Duration::from_micros(4);
/// See [`IdlePoll`].
const IDLE_PROBE_EVERY: u32 = 32;
/// Longest stretch of polling without yielding to the runtime's other tasks.
const IDLE_POLL_SLICE: Duration = Duration::from_micros(20);

impl IdlePoll {
    fn new(max: Duration) -> Self {
        IdlePoll {
            max,
            window: max,
            probe_in: 0,
        }
    }

    /// How long to poll for this idle period (zero: park at once).
    fn window(&mut self) -> Duration {
        if self.window.is_zero() && !self.max.is_zero() {
            self.probe_in = self.probe_in.saturating_sub(1);
            if self.probe_in == 0 {
                return self.max;
            }
        }
        self.window
    }

    /// A request arrived within the window (`hit`) or the window expired.
    fn record(&mut self, hit: bool) {
        if hit {
            self.window = self.max;
            return;
        }
        self.window /= 2;
        if self.window < IDLE_POLL_MIN {
            self.window = Duration::ZERO;
            self.probe_in = IDLE_PROBE_EVERY;
        }
    }

    /// Polls `fd`, the socket under `input`, until a whole request header
    /// is buffered, the stream ends (left to the normal read path to
    /// report) or the window expires.
    async fn poll<R: AsyncRead + Unpin>(
        &mut self,
        input: &mut Input<R>,
        fd: RawFd,
    ) -> std::io::Result<()> {
        let window = self.window();
        if window.is_zero() {
            return Ok(());
        }
        let start = std::time::Instant::now();
        let mut slice = start;
        loop {
            match input.try_recv(fd)? {
                Some(0) => return Ok(()), // end of stream
                Some(_) if input.buf.len() >= REQUEST_HEADER_LEN => {
                    self.record(true);
                    return Ok(());
                }
                _ => {}
            }
            let now = std::time::Instant::now();
            if now - start >= window {
                self.record(false);
                return Ok(());
            }
            if now - slice >= IDLE_POLL_SLICE {
                // Let the worker's other tasks run; yielding on every
                // attempt would wake the other idle worker each time.
                tokio::task::yield_now().await;
                slice = std::time::Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// Completes `grace` after shutdown started (or at the given deadline).
async fn grace_timer(
    shutdown: &mut watch::Receiver<bool>,
    grace: Option<Instant>,
    dur: std::time::Duration,
) {
    let deadline = match grace {
        Some(d) => d,
        None => {
            let _ = shutdown.wait_for(|s| *s).await;
            Instant::now() + dur
        }
    };
    tokio::time::sleep_until(deadline).await
}

fn writer_failed() -> NbdError {
    NbdError::Io {
        phase: "reply write",
        source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reply writer failed"),
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn wait_dead(w: &WriterState) {
    loop {
        let n = w.notify.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if w.dead.load(Ordering::SeqCst) {
            return;
        }
        n.await;
    }
}

async fn acquire_permits(
    requests: &Arc<Semaphore>,
    conn_bytes: &Arc<Semaphore>,
    global_bytes: &Arc<Semaphore>,
    bytes: u32,
) -> Permits {
    // The semaphores are never closed, so acquisition only waits.
    let request = Arc::clone(requests)
        .acquire_owned()
        .await
        .expect("semaphore never closed");
    let (c, g) = if bytes > 0 {
        let c = Arc::clone(conn_bytes)
            .acquire_many_owned(bytes)
            .await
            .expect("semaphore never closed");
        let g = Arc::clone(global_bytes)
            .acquire_many_owned(bytes)
            .await
            .expect("semaphore never closed");
        (Some(c), Some(g))
    } else {
        (None, None)
    };
    Permits {
        _request: request,
        _conn_bytes: c,
        _global_bytes: g,
    }
}

async fn execute(server: &NbdServer, engine: &dyn crate::engine::BlockEngine, op: Op) -> ReplyBody {
    let c = &server.counters;
    let (offset, result) = match op {
        Op::Read { offset, len } => {
            let r = engine
                .read_bytes(offset, len as usize)
                .await
                .and_then(|data| {
                    if data.len() == len as usize {
                        Ok(data)
                    } else {
                        Err(std::io::Error::other(format!(
                            "engine returned {} bytes for a {len}-byte read",
                            data.len()
                        )))
                    }
                });
            match r {
                Ok(data) => {
                    c.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    return ReplyBody::Data { offset, data };
                }
                Err(e) => (Some(offset), Err(e)),
            }
        }
        Op::Write { offset, data, fua } => {
            let len = data.len() as u64;
            let r = engine.write(offset, data, fua).await;
            if r.is_ok() {
                c.written_bytes.fetch_add(len, Ordering::Relaxed);
            }
            (Some(offset), r)
        }
        Op::Flush => (None, engine.flush().await),
        Op::Trim { offset, len, fua } => {
            let mut r = engine.discard(offset, len as u64).await;
            if r.is_ok() && fua {
                r = engine.flush().await;
            }
            (Some(offset), r)
        }
        Op::WriteZeroes {
            offset,
            len,
            may_trim,
            fua,
        } => (
            Some(offset),
            engine.write_zeroes(offset, len as u64, may_trim, fua).await,
        ),
        Op::BlockStatus {
            offset,
            len,
            one,
            align,
        } => match engine.extents(offset, len as u64).await {
            Ok(extents) => {
                return ReplyBody::BlockStatus {
                    descriptors: descriptors(offset, len, &extents, align, one),
                }
            }
            Err(e) => (Some(offset), Err(e)),
        },
    };
    match result {
        Ok(()) => ReplyBody::Done,
        Err(e) => {
            c.errors.fetch_add(1, Ordering::Relaxed);
            let errno = nbd_errno(&e);
            tracing::warn!(engine = engine.name(), ?offset, error = %e, nbd_errno = errno, "NBD request failed in the engine");
            ReplyBody::Error {
                errno,
                offset,
                message: e.to_string(),
            }
        }
    }
}

/// `base:allocation` descriptors for a block status request of `len` bytes
/// at `offset` from the engine's runs (which start at `offset` and cover at
/// most `len`). Every descriptor length is a nonzero multiple of `align` (the
/// export's minimum block size, which `offset` and `len` are multiples of):
/// a hole that does not start or end on that grid is shrunk to it and its
/// edges reported as data (always a safe answer, status 0), and the answer
/// ends on the grid, covering at least one `align` block. Adjacent
/// descriptors differ in status. With `one` (`NBD_CMD_FLAG_REQ_ONE`) only
/// the first descriptor is sent.
fn descriptors(offset: u64, len: u32, runs: &[Extent], align: u32, one: bool) -> Vec<(u32, u32)> {
    let align = u64::from(align.max(1));
    let down = |x: u64| x - (x - offset) % align;
    let up = |x: u64| down(x + align - 1);
    let req_end = offset + u64::from(len);
    // Holes, absolute and shrunk to the grid.
    let mut holes = Vec::new();
    let mut at = offset;
    for r in runs {
        let end = (at + r.len).min(req_end);
        if r.hole {
            let (s, e) = (up(at), down(end));
            if s < e {
                holes.push((s, e));
            }
        }
        at = end;
        if at >= req_end {
            break;
        }
    }
    let covered = down(at).max(offset + align).min(req_end);
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut push = |len: u64, flags: u32| match out.last_mut() {
        Some(last) if last.1 == flags => last.0 += len as u32,
        _ => out.push((len as u32, flags)),
    };
    let mut pos = offset;
    for (s, e) in holes {
        let (s, e) = (s.min(covered), e.min(covered));
        if s >= e {
            break;
        }
        if s > pos {
            push(s - pos, 0);
        }
        push(e - s, STATE_HOLE | STATE_ZERO);
        pos = e;
    }
    if covered > pos {
        push(covered - pos, 0);
    }
    if one {
        out.truncate(1);
    }
    out
}

/// The socket's write half and the writer's state, shared by the writer
/// task and request tasks that reply directly.
struct Sink<W> {
    w: BufWriter<W>,
    /// Scratch for reply headers.
    header: Vec<u8>,
    /// A write failed: the connection is dead, replies are dropped.
    failed: bool,
}

impl<W: AsyncWrite + Unpin> Sink<W> {
    fn fail(&mut self, e: std::io::Error, state: &WriterState) {
        tracing::debug!(error = %e, "NBD reply write failed");
        self.failed = true;
        state.dead.store(true, Ordering::SeqCst);
        state.notify.notify_waiters();
    }

    /// Writes and flushes one reply, then releases its permits.
    async fn send_one(&mut self, out: Outgoing, structured: bool, state: &WriterState) {
        if self.failed {
            return;
        }
        let mut res = write_reply(&mut self.w, &mut self.header, &out, structured).await;
        drop(out); // releases the permits
        if res.is_ok() {
            res = self.w.flush().await;
        }
        if let Err(e) = res {
            self.fail(e, state);
        }
    }
}

/// Writes replies in arrival order, flushing when the queue runs dry. After a
/// socket error it marks the connection dead and keeps draining the queue so
/// request tasks never block on a full channel.
async fn writer_task<W: AsyncWrite + Unpin>(
    sink: Arc<Mutex<Sink<W>>>,
    mut rx: mpsc::Receiver<Outgoing>,
    structured: bool,
    state: Arc<WriterState>,
) {
    while let Some(first) = rx.recv().await {
        let mut guard = sink.lock().await;
        let s = &mut *guard;
        if s.failed {
            continue;
        }
        let mut next = Some(first);
        let mut res = Ok(());
        while let Some(out) = next.take() {
            res = write_reply(&mut s.w, &mut s.header, &out, structured).await;
            drop(out); // releases the permits
            if res.is_err() {
                break;
            }
            next = rx.try_recv().ok();
        }
        if res.is_ok() {
            res = s.w.flush().await;
        }
        if let Err(e) = res {
            s.fail(e, &state);
        }
    }
    let mut s = sink.lock().await;
    if !s.failed {
        let _ = s.w.shutdown().await;
    }
}

/// Read replies at least this large are written with one vectored write
/// (the BufWriter's capacity: smaller ones are copied into it anyway).
const VECTORED_REPLY_MIN: usize = 64 * 1024;

/// `write_all` of `header` then `data` through vectored writes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &[u8],
    data: &[u8],
) -> std::io::Result<()> {
    let mut parts = [std::io::IoSlice::new(header), std::io::IoSlice::new(data)];
    let mut slices = &mut parts[..];
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    header: &mut Vec<u8>,
    out: &Outgoing,
    structured: bool,
) -> std::io::Result<()> {
    header.clear();
    match &out.body {
        ReplyBody::Done => put_simple_reply(header, 0, out.handle),
        ReplyBody::Data { offset, data } => {
            if structured {
                // One chunk, final: the data is complete in memory, so no
                // error can be detected while sending it. Lengths are bounded
                // by the maximum block size (<= 2^32 - 8 checked at config).
                put_chunk_header(
                    header,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    out.handle,
                    8 + data.len() as u32,
                );
                header.extend_from_slice(&offset.to_be_bytes());
            } else {
                put_simple_reply(header, 0, out.handle);
            }
            if data.len() < VECTORED_REPLY_MIN {
                // Small: both are copied into the BufWriter and leave with
                // the other queued replies in one flush.
                w.write_all(header).await?;
                return w.write_all(data).await;
            }
            // Large: header and data in one writev (the BufWriter passes a
            // write larger than its buffer straight to the socket), instead
            // of a separate send of the 16-32 header bytes.
            return write_all_vectored(w, header, data).await;
        }
        ReplyBody::BlockStatus { descriptors } => {
            // Only reachable with a selected context, which needs structured replies.
            debug_assert!(structured);
            put_block_status_chunk(header, out.handle, META_BASE_ALLOCATION_ID, descriptors);
        }
        ReplyBody::Error {
            errno,
            offset,
            message,
        } => {
            if structured {
                put_error_chunk(header, out.handle, *errno, *offset, message);
            } else {
                put_simple_reply(header, *errno, out.handle);
            }
        }
    }
    w.write_all(header).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(len: u64, hole: bool) -> Extent {
        Extent { len, hole }
    }

    #[test]
    fn descriptors_follow_aligned_runs_exactly() {
        let runs = [ext(4096, false), ext(8192, true), ext(4096, false)];
        assert_eq!(
            descriptors(4096, 16384, &runs, 512, false),
            vec![(4096, 0), (8192, STATE_HOLE | STATE_ZERO), (4096, 0)]
        );
        assert_eq!(descriptors(4096, 16384, &runs, 512, true), vec![(4096, 0)]);
    }

    #[test]
    fn descriptors_shrink_holes_to_the_grid_and_end_on_it() {
        // A hole from 1000 to 9000 on a 4096 grid: only 4096..8192 is a whole hole block.
        let runs = [ext(1000, false), ext(8000, true), ext(3288, false)];
        assert_eq!(
            descriptors(0, 12288, &runs, 4096, false),
            vec![(4096, 0), (4096, STATE_HOLE | STATE_ZERO), (4096, 0)]
        );
        // Runs that stop short of the first block still answer one block (as data).
        assert_eq!(
            descriptors(0, 8192, &[ext(100, true)], 4096, false),
            vec![(4096, 0)]
        );
    }

    proptest! {
        /// The protocol's rules for a block status chunk hold for any runs an
        /// engine may return: at least one descriptor, nonzero multiples of the
        /// minimum block size, within the request, adjacent statuses differ,
        /// one descriptor with REQ_ONE, and nothing reported as a hole that the
        /// engine did not report as one.
        #[test]
        fn descriptors_keep_the_protocol_rules(
            align in prop::sample::select(vec![1u32, 512, 4096]),
            start_blocks in 0u64..64,
            len_blocks in 1u32..64,
            runs in prop::collection::vec((1u64..20_000, any::<bool>()), 1..12),
            one: bool,
        ) {
            let offset = start_blocks * align as u64;
            let len = len_blocks * align;
            // Runs as an engine returns them: consecutive, covering at most `len`.
            let mut engine = Vec::new();
            let mut left = len as u64;
            for (l, hole) in runs {
                if left == 0 { break; }
                let l = l.min(left);
                engine.push(ext(l, hole));
                left -= l;
            }
            let d = descriptors(offset, len, &engine, align, one);
            prop_assert!(!d.is_empty());
            prop_assert!(!one || d.len() == 1);
            let total: u64 = d.iter().map(|&(l, _)| l as u64).sum();
            prop_assert!(total >= align as u64 && total <= len as u64);
            for w in d.windows(2) {
                prop_assert_ne!(w[0].1, w[1].1);
            }
            let engine_hole = |x: u64| {
                let mut at = offset;
                engine.iter().any(|r| { let hit = r.hole && x >= at && x < at + r.len; at += r.len; hit })
            };
            let mut at = offset;
            for &(l, flags) in &d {
                prop_assert!(l > 0 && l % align == 0);
                prop_assert!(flags == 0 || flags == STATE_HOLE | STATE_ZERO);
                if flags != 0 {
                    prop_assert!(engine_hole(at) && engine_hole(at + l as u64 - 1));
                    for x in (at..at + l as u64).step_by(97) {
                        prop_assert!(engine_hole(x), "byte {} reported as a hole", x);
                    }
                }
                at += l as u64;
            }
        }
    }

    #[test]
    fn idle_poll_halves_on_misses_then_probes_and_a_hit_restores_it() {
        let max = Duration::from_micros(50);
        let mut p = IdlePoll::new(max);
        assert_eq!(p.window(), max);
        p.record(false);
        assert_eq!(p.window(), max / 2);
        p.record(false);
        p.record(false);
        assert_eq!(p.window(), max / 8);
        p.record(false); // 3.125 µs: below the minimum
        for _ in 1..IDLE_PROBE_EVERY {
            assert_eq!(p.window(), Duration::ZERO);
        }
        assert_eq!(
            p.window(),
            max,
            "every IDLE_PROBE_EVERY-th idle period probes"
        );
        p.record(false);
        assert_eq!(p.window(), Duration::ZERO, "a missed probe parks again");
        for _ in 2..IDLE_PROBE_EVERY {
            p.window();
        }
        assert_eq!(p.window(), max);
        p.record(true);
        assert_eq!(p.window(), max);
        assert_eq!(
            p.window(),
            max,
            "a hit restores polling on every idle period"
        );
    }

    #[test]
    fn idle_poll_zero_never_polls() {
        let mut p = IdlePoll::new(Duration::ZERO);
        for _ in 0..2 * IDLE_PROBE_EVERY {
            assert_eq!(p.window(), Duration::ZERO);
        }
    }
}
