//! [`NbdServer`]: exports, limits, accept loops, statistics and shutdown.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Notify, Semaphore};

use super::conn;
use super::error::NbdError;
use super::proto::*;
use crate::engine::BlockEngine;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE` and enforced
/// on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Alignment of every offset and length (power of two, 1..=65536).
    pub minimum: u32,
    /// Preferred I/O size (power of two, >= max(minimum, 512)).
    pub preferred: u32,
    /// Largest read/write/write-zeroes length (multiple of `minimum`).
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// 512 / 4096 / 32 MiB.
    fn default() -> Self {
        BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 32 * 1024 * 1024,
        }
    }
}

/// One export served by the NBD server (one per resource).
#[derive(Clone)]
pub struct Export {
    /// Export name; the resource name (e.g. `md1`).
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`); may be empty.
    pub description: String,
    /// Where the data lives.
    pub engine: Arc<dyn BlockEngine>,
    /// Advertise `NBD_FLAG_READ_ONLY` and fail writes with `EPERM`.
    pub read_only: bool,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
}

impl Export {
    /// A writable export with default block sizes and no description.
    pub fn new(name: impl Into<String>, engine: Arc<dyn BlockEngine>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            engine,
            read_only: false,
            block_sizes: BlockSizes::default(),
        }
    }

    /// Transmission flags for this export; `NBD_FLAG_SEND_DF` only once
    /// structured replies were negotiated (a read reply is always one chunk,
    /// so DF holds trivially).
    pub(crate) fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        if structured {
            f |= TFLAG_SEND_DF;
        }
        f
    }
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("engine", &self.engine.name())
            .field("size", &self.engine.size())
            .field("read_only", &self.read_only)
            .field("block_sizes", &self.block_sizes)
            .finish()
    }
}

/// Export parameters for a client configured out of band.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportParams {
    /// Export size in bytes.
    pub size: u64,
    /// `NBD_FLAG_*` transmission flags (without structured-reply-only flags).
    pub transmission_flags: u16,
    /// Block size constraints the server enforces.
    pub block_sizes: BlockSizes,
}

/// Resource limits of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest option data accepted during the handshake; beyond it the
    /// connection is closed.
    pub max_option_len: u32,
    /// Bytes of read/write data in flight per connection (payloads received
    /// and not yet replied to, read data not yet sent). When exhausted the
    /// connection stops reading requests (backpressure).
    pub conn_inflight_bytes: usize,
    /// Same, across all connections.
    pub global_inflight_bytes: usize,
    /// Requests in flight per connection (bounds tasks for payload-less
    /// commands such as trim and flush).
    pub conn_inflight_requests: usize,
    /// Time a client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// After [`NbdServer::shutdown`], how long a connection may still take
    /// to deliver a request it started sending before it is closed.
    pub shutdown_grace: Duration,
    /// Replies queued per connection for the writer task.
    pub reply_queue: usize,
    /// Longest a connection with nothing in flight polls its socket for the
    /// next request before it parks (zero: never). Spends up to this much
    /// CPU per idle period to spare a client issuing one request after
    /// another the server's wake-up; adaptive, so idle clients cost
    /// almost nothing (see `conn.rs`, `IdlePoll`). Unix and TCP listeners
    /// only.
    pub idle_poll: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_option_len: 64 * 1024,
            conn_inflight_bytes: 64 * 1024 * 1024,
            global_inflight_bytes: 1024 * 1024 * 1024,
            conn_inflight_requests: 256,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            reply_queue: 64,
            idle_poll: Duration::from_micros(50),
        }
    }
}

/// A snapshot of the server counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Connections currently open (handshake or transmission).
    pub connections_open: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Transmission requests received (including rejected ones).
    pub requests: u64,
    /// Bytes returned by successful reads.
    pub read_bytes: u64,
    /// Bytes written by successful writes.
    pub written_bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Server tasks alive (connection, writer and request tasks); returns to
    /// 0 when every connection is gone.
    pub tasks_alive: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) tasks_alive: AtomicU64,
}

/// Decrements a gauge when dropped (panic- and cancellation-proof).
#[derive(Debug)]
pub(crate) struct GaugeGuard {
    server: Arc<NbdServer>,
    kind: Gauge,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Gauge {
    Connection,
    Task,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        match self.kind {
            Gauge::Connection => {
                self.server
                    .counters
                    .connections_open
                    .fetch_sub(1, Ordering::SeqCst);
            }
            Gauge::Task => {
                self.server
                    .counters
                    .tasks_alive
                    .fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.server.changed.notify_waiters();
    }
}

/// The NBD server: a set of exports served over any number of connections.
///
/// Protocol: fixed newstyle handshake with `NBD_OPT_EXPORT_NAME`, `INFO`,
/// `GO`, `LIST`, `ABORT` and `STRUCTURED_REPLY`; transmission with `READ`,
/// `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (+ `NO_HOLE`), `DISC`, FUA and DF.
/// Requests are executed concurrently and answered out of order.
pub struct NbdServer {
    pub(crate) exports: Vec<Export>,
    pub(crate) limits: Limits,
    pub(crate) global_bytes: Arc<Semaphore>,
    pub(crate) counters: Counters,
    shutdown_tx: watch::Sender<bool>,
    /// Signalled whenever a gauge goes down.
    changed: Notify,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.exports)
            .field("limits", &self.limits)
            .field("stats", &self.stats())
            .finish()
    }
}

impl NbdServer {
    /// Validates the exports and limits and builds the server.
    pub fn new(exports: Vec<Export>, limits: Limits) -> Result<Arc<NbdServer>, NbdError> {
        let cfg = |m: String| Err(NbdError::Config(m));
        if exports.is_empty() {
            return cfg("no exports".into());
        }
        if limits.conn_inflight_requests == 0 || limits.reply_queue == 0 {
            return cfg("conn_inflight_requests and reply_queue must be > 0".into());
        }
        for (what, v) in [
            ("global_inflight_bytes", limits.global_inflight_bytes),
            ("conn_inflight_bytes", limits.conn_inflight_bytes),
            ("conn_inflight_requests", limits.conn_inflight_requests),
        ] {
            if v > Semaphore::MAX_PERMITS {
                return cfg(format!(
                    "{what} {v} too large (at most {})",
                    Semaphore::MAX_PERMITS
                ));
            }
        }
        for (i, e) in exports.iter().enumerate() {
            if e.name.len() > 4096 || e.name.contains('\0') {
                return cfg(format!(
                    "export name {:?}: longer than 4096 bytes or contains NUL",
                    e.name
                ));
            }
            if e.description.len() > 4096 || e.description.contains('\0') {
                return cfg(format!(
                    "export {:?}: description longer than 4096 bytes or contains NUL",
                    e.name
                ));
            }
            if exports[..i].iter().any(|o| o.name == e.name) {
                return cfg(format!("duplicate export name {:?}", e.name));
            }
            let b = e.block_sizes;
            if !b.minimum.is_power_of_two() || b.minimum > 65536 {
                return cfg(format!(
                    "export {:?}: minimum block size {} is not a power of two <= 65536",
                    e.name, b.minimum
                ));
            }
            if !b.preferred.is_power_of_two() || b.preferred < b.minimum.max(512) {
                return cfg(format!(
                    "export {:?}: preferred block size {} must be a power of two >= max(minimum {}, 512)",
                    e.name, b.preferred, b.minimum
                ));
            }
            if !b.maximum.is_multiple_of(b.minimum) || b.maximum < b.minimum {
                return cfg(format!(
                    "export {:?}: maximum block size {} is not a positive multiple of minimum {}",
                    e.name, b.maximum, b.minimum
                ));
            }
            if (b.maximum as u64) < (b.preferred as u64).min(e.engine.size()) {
                return cfg(format!(
                    "export {:?}: maximum block size {} below preferred {} and export size {}",
                    e.name,
                    b.maximum,
                    b.preferred,
                    e.engine.size()
                ));
            }
            // A request must be able to obtain its in-flight permits, or it would wait forever.
            if b.maximum as usize > limits.conn_inflight_bytes
                || b.maximum as usize > limits.global_inflight_bytes
            {
                return cfg(format!(
                    "export {:?}: maximum block size {} exceeds the in-flight byte limits ({} per connection, {} global)",
                    e.name, b.maximum, limits.conn_inflight_bytes, limits.global_inflight_bytes
                ));
            }
            if !e.engine.size().is_multiple_of(b.minimum as u64) {
                tracing::warn!(
                    export = %e.name,
                    size = e.engine.size(),
                    minimum = b.minimum,
                    "export size is not a multiple of the minimum block size; the tail is unreachable"
                );
            }
        }
        let (shutdown_tx, _) = watch::channel(false);
        Ok(Arc::new(NbdServer {
            global_bytes: Arc::new(Semaphore::new(limits.global_inflight_bytes)),
            exports,
            limits,
            counters: Counters::default(),
            shutdown_tx,
            changed: Notify::new(),
        }))
    }

    /// The export a client asked for: exact name, or the only export for the
    /// empty (default) name.
    pub(crate) fn find_export(&self, name: &str) -> Option<&Export> {
        if let Some(e) = self.exports.iter().find(|e| e.name == name) {
            return Some(e);
        }
        if name.is_empty() && self.exports.len() == 1 {
            return self.exports.first();
        }
        None
    }

    /// The configured limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NbdStats {
        let c = &self.counters;
        NbdStats {
            connections_open: c.connections_open.load(Ordering::SeqCst),
            connections_total: c.connections_total.load(Ordering::SeqCst),
            requests: c.requests.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            written_bytes: c.written_bytes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            tasks_alive: c.tasks_alive.load(Ordering::SeqCst),
        }
    }

    /// True once [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown_tx.borrow()
    }

    pub(crate) fn subscribe_shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    pub(crate) fn gauge(self: &Arc<Self>, kind: Gauge) -> GaugeGuard {
        match kind {
            Gauge::Connection => {
                self.counters
                    .connections_open
                    .fetch_add(1, Ordering::SeqCst);
                self.counters
                    .connections_total
                    .fetch_add(1, Ordering::SeqCst);
            }
            Gauge::Task => {
                self.counters.tasks_alive.fetch_add(1, Ordering::SeqCst);
            }
        }
        GaugeGuard {
            server: Arc::clone(self),
            kind,
        }
    }

    /// Stops accepting connections and drains the existing ones: requests
    /// already in flight complete and are answered; requests received after
    /// this call are answered with `ESHUTDOWN`; each connection closes once
    /// its replies are sent; clients still in the handshake are answered
    /// `NBD_REP_ERR_SHUTDOWN` or disconnected. Returns when every connection
    /// is closed. The caller flushes the engines afterwards.
    pub async fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        self.wait_idle().await;
    }

    /// Waits until no connection is open and no server task is alive.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register before checking, so a decrement in between is not missed.
            notified.as_mut().enable();
            let s = self.stats();
            if s.connections_open == 0 && s.tasks_alive == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Serves one already-connected client to completion (handshake, then
    /// transmission). Used by the accept loops and directly for socketpairs
    /// handed to the kernel NBD client. The returned error is the reason the
    /// connection was closed (also logged).
    pub async fn serve_stream<S>(self: &Arc<Self>, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let guard = self.gauge(Gauge::Connection);
        conn::run(
            Arc::clone(self),
            stream,
            guard,
            "stream".to_owned(),
            None,
            None,
        )
        .await
    }

    /// Serves a client that skips the handshake because it was configured
    /// out of band with [`export_params`](Self::export_params) — the Linux
    /// kernel NBD driver on one end of a socketpair. Transmission starts at
    /// once on export `name`, with simple replies.
    pub async fn serve_transmission<S>(
        self: &Arc<Self>,
        stream: S,
        name: &str,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let idx = self
            .exports
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| NbdError::UnknownExport(name.to_owned()))?;
        let guard = self.gauge(Gauge::Connection);
        conn::run(
            Arc::clone(self),
            stream,
            guard,
            format!("preconnected:{name}"),
            Some(idx),
            None,
        )
        .await
    }

    /// What a client negotiating export `name` would be told (simple
    /// replies): size, transmission flags, block sizes. For configuring a
    /// client out of band (kernel netlink `NBD_ATTR_SIZE_BYTES`,
    /// `NBD_ATTR_SERVER_FLAGS`, `NBD_ATTR_BLOCK_SIZE_BYTES`).
    pub fn export_params(&self, name: &str) -> Option<ExportParams> {
        let e = self.exports.iter().find(|e| e.name == name)?;
        Some(ExportParams {
            size: e.engine.size(),
            transmission_flags: e.transmission_flags(false),
            block_sizes: e.block_sizes,
        })
    }

    fn spawn_connection<S>(
        self: &Arc<Self>,
        stream: S,
        peer: String,
        poll_fd: Option<std::os::fd::RawFd>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Counted before spawning, so shutdown() cannot miss a just-accepted client.
        let conn_guard = self.gauge(Gauge::Connection);
        let task_guard = self.gauge(Gauge::Task);
        let server = Arc::clone(self);
        tokio::spawn(async move {
            let _task = task_guard;
            let _ = conn::run(server, stream, conn_guard, peer, None, poll_fd).await;
        });
    }

    /// Accepts unix-socket clients until shutdown.
    pub async fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> Result<(), NbdError> {
        let mut shutdown = self.subscribe_shutdown();
        loop {
            tokio::select! {
                // Wrapped so the non-Send watch::Ref never lives in the select output.
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => return Ok(()),
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        set_unix_sndbuf(&stream);
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
                        self.spawn_connection(stream, "unix".to_owned(), Some(fd))
                    }
                    Err(e) => accept_error(e).await,
                },
            }
        }
    }

    /// Accepts TCP clients until shutdown (with `TCP_NODELAY`, as the protocol recommends).
    pub async fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> Result<(), NbdError> {
        let mut shutdown = self.subscribe_shutdown();
        loop {
            tokio::select! {
                // Wrapped so the non-Send watch::Ref never lives in the select output.
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => return Ok(()),
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                        }
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
                        self.spawn_connection(stream, peer.to_string(), Some(fd));
                    }
                    Err(e) => accept_error(e).await,
                },
            }
        }
    }
}

/// Send buffer asked for on unix-socket NBD connections (the kernel doubles
/// it for its bookkeeping and caps it at `net.core.wmem_max`). With the
/// default (~208 KiB) a 1 MiB read reply takes five or more partial writes,
/// each waiting for the client to drain the socket and for an epoll
/// wake-up; with this, one reply of up to 1 MiB goes in one `sendmsg`.
/// Kernel memory per connection stays bounded by it (TCP keeps its own
/// autotuning).
const UNIX_SNDBUF: libc::c_int = 1 << 20;

fn set_unix_sndbuf(stream: &tokio::net::UnixStream) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = UNIX_SNDBUF;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int;
    // the fd is the accepted socket, open for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        // Only a performance matter: the default buffer works, just slower.
        tracing::debug!(error = %io::Error::last_os_error(), "cannot set SO_SNDBUF on an NBD connection");
    }
}

/// Accept errors (EMFILE, ECONNABORTED, ...) are per-attempt: log and go on,
/// pausing briefly when out of descriptors so the loop does not spin.
async fn accept_error(e: io::Error) {
    tracing::warn!(error = %e, "NBD accept failed");
    if matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    ) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a unix listener at `path` with permissions `mode` (0600 if
/// `None`). A stale socket file (nobody accepting on it) is removed first; a
/// live socket or anything else at `path` is an error. The socket is bound
/// under a temporary name, chmod-ed, then renamed into place, so it is never
/// reachable with wider permissions.
pub fn bind_unix(path: &Path, mode: Option<u32>) -> Result<UnixListener, NbdError> {
    let mode = mode.unwrap_or(0o600);
    let target = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            // A socket someone still accepts on belongs to a live server: never steal it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(NbdError::Listen {
                    what: "refusing to replace socket in use",
                    target,
                    source: io::Error::from(io::ErrorKind::AddrInUse),
                });
            }
            std::fs::remove_file(path).map_err(|source| NbdError::Listen {
                what: "remove stale socket",
                target: target.clone(),
                source,
            })?;
        }
        Ok(md) => {
            return Err(NbdError::NotASocket {
                path: path.to_owned(),
                mode: md.mode() & libc::S_IFMT,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NbdError::Listen {
                what: "stat",
                target,
                source,
            })
        }
    }
    let file_name = path.file_name().ok_or_else(|| NbdError::Listen {
        what: "bind",
        target: target.clone(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "socket path has no file name"),
    })?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(
        ".tmp{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let tmp = path.with_file_name(tmp_name);
    let listener = UnixListener::bind(&tmp).map_err(|source| NbdError::Listen {
        what: "bind",
        target: tmp.display().to_string(),
        source,
    })?;
    let finish = || -> Result<(), NbdError> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(
            |source| NbdError::Listen {
                what: "chmod",
                target: tmp.display().to_string(),
                source,
            },
        )?;
        std::fs::rename(&tmp, path).map_err(|source| NbdError::Listen {
            what: "rename socket into",
            target: target.clone(),
            source,
        })
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Binds a TCP listener (the agent chooses the address; default `127.0.0.1:10809`).
pub async fn bind_tcp(addr: std::net::SocketAddr) -> Result<TcpListener, NbdError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NbdError::Listen {
            what: "bind",
            target: addr.to_string(),
            source,
        })
}
