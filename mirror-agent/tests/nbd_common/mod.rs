//! Shared helpers for the NBD integration tests: a raw protocol client
//! written from the spec (independent of the server's codec), test engines,
//! and server setup.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mirror_agent::engine::{BlockEngine, EngineFuture};
use mirror_agent::nbd::testing::MemEngine;
use mirror_agent::nbd::{Export, Limits, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454F5054;
pub const OPT_REPLY_MAGIC: u64 = 0x3e889045565a9;
pub const REQ_MAGIC: u32 = 0x25609513;
pub const SIMPLE_MAGIC: u32 = 0x67446698;
pub const STRUCT_MAGIC: u32 = 0x668e33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_REQ_ONE: u16 = 1 << 3;
/// `base:allocation` statuses.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

/// Bound on every wait in the tests (a hang fails instead of blocking CI).
pub const DEADLINE: Duration = Duration::from_secs(20);

pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("test step timed out")
}

/// `MIRROR_NBD_TEST_ENGINE=portable` (or `uring`) runs the suites on that
/// engine over a temporary file instead of the in-memory engine.
pub struct TestEngine {
    pub engine: Arc<dyn BlockEngine>,
    _dir: Option<tempfile::TempDir>,
}

pub fn make_engine(size: u64) -> TestEngine {
    match std::env::var("MIRROR_NBD_TEST_ENGINE").as_deref() {
        Ok("portable") => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("data.img");
            mirror_agent::engine::create_data_file(&path, size).unwrap();
            let e = mirror_agent::engine::PortableEngine::open(&path, 32).unwrap();
            TestEngine {
                engine: Arc::new(e),
                _dir: Some(dir),
            }
        }
        Ok("uring") => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("data.img");
            mirror_agent::engine::create_data_file(&path, size).unwrap();
            let opts = mirror_agent::engine::EngineOptions {
                kind: mirror_agent::engine::EngineKind::IoUring,
                ..Default::default()
            };
            let e = mirror_agent::engine::open(&path, &opts).unwrap();
            TestEngine {
                engine: e,
                _dir: Some(dir),
            }
        }
        _ => TestEngine {
            engine: MemEngine::new(size as usize),
            _dir: None,
        },
    }
}

/// Wraps an engine; requests overlapping configured ranges fail with an errno.
pub struct FailingEngine {
    pub inner: Arc<dyn BlockEngine>,
    pub rules: Mutex<Vec<(u64, u64, i32)>>,
    pub flush_errno: Mutex<Option<i32>>,
}

impl FailingEngine {
    pub fn new(inner: Arc<dyn BlockEngine>) -> Arc<FailingEngine> {
        Arc::new(FailingEngine {
            inner,
            rules: Mutex::new(Vec::new()),
            flush_errno: Mutex::new(None),
        })
    }
    pub fn fail_range(&self, offset: u64, len: u64, errno: i32) {
        self.rules
            .lock()
            .unwrap()
            .push((offset, offset + len, errno));
    }
    fn check(&self, offset: u64, len: u64) -> Option<io::Error> {
        let rules = self.rules.lock().unwrap();
        rules
            .iter()
            .find(|(s, e, _)| offset < *e && offset + len > *s)
            .map(|(_, _, errno)| io::Error::from_raw_os_error(*errno))
    }
}

impl BlockEngine for FailingEngine {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> &'static str {
        "failing-test"
    }
    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        match self.check(offset, len as u64) {
            Some(e) => Box::pin(async move { Err(e) }),
            None => self.inner.read(offset, len),
        }
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        match self.check(offset, data.len() as u64) {
            Some(e) => Box::pin(async move { Err(e) }),
            None => self.inner.write(offset, data, fua),
        }
    }
    fn flush(&self) -> EngineFuture<()> {
        match *self.flush_errno.lock().unwrap() {
            Some(errno) => Box::pin(async move { Err(io::Error::from_raw_os_error(errno)) }),
            None => self.inner.flush(),
        }
    }
    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        match self.check(offset, len) {
            Some(e) => Box::pin(async move { Err(e) }),
            None => self.inner.discard(offset, len),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        match self.check(offset, len) {
            Some(e) => Box::pin(async move { Err(e) }),
            None => self.inner.write_zeroes(offset, len, may_trim, fua),
        }
    }
}

/// Wraps an engine; reads at `gated_offset` wait until the gate opens, so a
/// test controls completion order without sleeping. Counts reads started.
pub struct GatedEngine {
    pub inner: Arc<dyn BlockEngine>,
    pub gated_offset: u64,
    pub gate: watch::Sender<bool>,
    pub started: AtomicU64,
    pub started_tx: watch::Sender<u64>,
}

impl GatedEngine {
    pub fn new(inner: Arc<dyn BlockEngine>, gated_offset: u64) -> Arc<GatedEngine> {
        Arc::new(GatedEngine {
            inner,
            gated_offset,
            gate: watch::channel(false).0,
            started: AtomicU64::new(0),
            started_tx: watch::channel(0).0,
        })
    }
    pub fn open(&self) {
        self.gate.send_replace(true);
    }
    /// Waits until at least `n` gated operations have started.
    pub async fn wait_started(&self, n: u64) {
        let mut rx = self.started_tx.subscribe();
        within(rx.wait_for(|v| *v >= n)).await.unwrap();
    }
    fn gated<T: Send + 'static>(&self, fut: EngineFuture<T>) -> EngineFuture<T> {
        let mut rx = self.gate.subscribe();
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        self.started_tx.send_replace(n);
        Box::pin(async move {
            let _ = rx.wait_for(|open| *open).await;
            fut.await
        })
    }
}

impl BlockEngine for GatedEngine {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> &'static str {
        "gated-test"
    }
    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        let f = self.inner.read(offset, len);
        if offset == self.gated_offset {
            self.gated(f)
        } else {
            f
        }
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        let f = self.inner.write(offset, data, fua);
        if offset == self.gated_offset {
            self.gated(f)
        } else {
            f
        }
    }
    fn flush(&self) -> EngineFuture<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }
}

pub fn server_with(engine: Arc<dyn BlockEngine>, limits: Limits) -> Arc<NbdServer> {
    let mut e = Export::new("md1", engine);
    e.description = "test resource md1".into();
    NbdServer::new(vec![e], limits).unwrap()
}

/// A connection to the server over a socketpair (`serve_stream`).
pub fn pair(
    server: &Arc<NbdServer>,
) -> (
    UnixStream,
    tokio::task::JoinHandle<Result<(), mirror_agent::nbd::NbdError>>,
) {
    let (a, b) = UnixStream::pair().unwrap();
    let server = Arc::clone(server);
    let h = tokio::spawn(async move { server.serve_stream(b).await });
    (a, h)
}

/// A unix listener in a temp dir served by `serve_unix`.
pub struct Listening {
    pub path: PathBuf,
    pub dir: tempfile::TempDir,
    pub accept: tokio::task::JoinHandle<Result<(), mirror_agent::nbd::NbdError>>,
}

pub fn listen(server: &Arc<NbdServer>) -> Listening {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let l = mirror_agent::nbd::bind_unix(&path, None).unwrap();
    let server = Arc::clone(server);
    let accept = tokio::spawn(async move { server.serve_unix(l).await });
    Listening { path, dir, accept }
}

pub async fn read_u16(s: &mut UnixStream) -> u16 {
    within(s.read_u16()).await.unwrap()
}
pub async fn read_u32(s: &mut UnixStream) -> u32 {
    within(s.read_u32()).await.unwrap()
}
pub async fn read_u64(s: &mut UnixStream) -> u64 {
    within(s.read_u64()).await.unwrap()
}
pub async fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    within(s.read_exact(&mut v)).await.unwrap();
    v
}

/// Expects the server to close the connection (EOF or reset), reading and
/// discarding anything still queued.
pub async fn expect_closed(s: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match within(s.read(&mut buf)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

/// Reads the greeting and sends client flags. Returns the handshake flags.
pub async fn hello(s: &mut UnixStream, client_flags: u32) -> u16 {
    assert_eq!(read_u64(s).await, NBDMAGIC);
    assert_eq!(read_u64(s).await, IHAVEOPT);
    let flags = read_u16(s).await;
    s.write_u32(client_flags).await.unwrap();
    flags
}

pub async fn send_opt(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).await.unwrap();
}

pub async fn opt_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    assert_eq!(read_u64(s).await, OPT_REPLY_MAGIC);
    let opt = read_u32(s).await;
    let typ = read_u32(s).await;
    let len = read_u32(s).await as usize;
    assert!(len <= 64 * 1024, "option reply length {len}");
    (opt, typ, read_n(s, len).await)
}

pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Result of INFO/GO: infos by type, or the error reply type.
pub async fn info_or_go(
    s: &mut UnixStream,
    option: u32,
    name: &str,
    infos: &[u16],
) -> Result<HashMap<u16, Vec<u8>>, u32> {
    send_opt(s, option, &info_data(name, infos)).await;
    let mut got = HashMap::new();
    loop {
        let (opt, typ, data) = opt_reply(s).await;
        assert_eq!(opt, option);
        match typ {
            REP_INFO => {
                let t = u16::from_be_bytes([data[0], data[1]]);
                assert!(
                    got.insert(t, data[2..].to_vec()).is_none(),
                    "info {t} sent twice"
                );
            }
            REP_ACK => return Ok(got),
            e => {
                assert!(e & 0x8000_0000 != 0, "unexpected reply type {e:#x}");
                return Err(e);
            }
        }
    }
}

pub fn export_info(infos: &HashMap<u16, Vec<u8>>) -> (u64, u16) {
    let e = &infos[&0];
    assert_eq!(e.len(), 10);
    (
        u64::from_be_bytes(e[0..8].try_into().unwrap()),
        u16::from_be_bytes([e[8], e[9]]),
    )
}

/// A reply as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub handle: u64,
    pub error: u32,
    pub data: Option<Vec<u8>>,
    /// Structured: the error chunk's offset, if ERROR_OFFSET.
    pub err_offset: Option<u64>,
    pub structured: bool,
    /// A block status chunk: context id and `(length, flags)` descriptors.
    pub status: Option<(u32, Vec<(u32, u32)>)>,
}

/// A transmission-phase client.
pub struct Client {
    pub s: UnixStream,
    pub structured: bool,
    pub size: u64,
    pub tflags: u16,
    /// Outstanding reads: handle -> (offset, length) (simple replies carry no length).
    pending_reads: HashMap<u64, (u64, u32)>,
    partial: HashMap<u64, Reply>,
}

impl Client {
    /// Handshake with GO on `md1` (optionally negotiating structured replies).
    pub async fn connect(mut s: UnixStream, structured: bool) -> Client {
        let flags = hello(&mut s, 3).await;
        assert_eq!(flags, 3);
        if structured {
            send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
            let (_, typ, _) = opt_reply(&mut s).await;
            assert_eq!(typ, REP_ACK);
        }
        let infos = info_or_go(&mut s, OPT_GO, "md1", &[3])
            .await
            .expect("GO failed");
        let (size, tflags) = export_info(&infos);
        Client {
            s,
            structured,
            size,
            tflags,
            pending_reads: HashMap::new(),
            partial: HashMap::new(),
        }
    }

    /// Handshake with structured replies, `base:allocation` selected
    /// (`NBD_OPT_SET_META_CONTEXT`), then GO on `md1`: block status allowed.
    pub async fn connect_meta(mut s: UnixStream) -> Client {
        hello(&mut s, 3).await;
        send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(opt_reply(&mut s).await.1, REP_ACK);
        let sel = meta_data("md1", &["base:allocation"]);
        let got = meta_context(&mut s, OPT_SET_META_CONTEXT, &sel).await;
        assert_eq!(
            got.as_ref().map(|v| v.len()),
            Ok(1),
            "SET_META_CONTEXT: {got:?}"
        );
        let infos = info_or_go(&mut s, OPT_GO, "md1", &[3])
            .await
            .expect("GO failed");
        let (size, tflags) = export_info(&infos);
        Client::connect_raw(s, true, size, tflags)
    }

    /// One block status request: its descriptors, or the errno.
    pub async fn block_status(
        &mut self,
        handle: u64,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, u32> {
        self.request(flags, CMD_BLOCK_STATUS, handle, offset, len, &[])
            .await;
        let r = self.recv().await;
        assert_eq!(r.handle, handle);
        match r.status {
            Some((_, d)) if r.error == 0 => Ok(d),
            _ => {
                assert_ne!(r.error, 0, "block status reply without a status chunk");
                Err(r.error)
            }
        }
    }

    /// Wraps a stream already in transmission phase.
    pub fn connect_raw(s: UnixStream, structured: bool, size: u64, tflags: u16) -> Client {
        Client {
            s,
            structured,
            size,
            tflags,
            pending_reads: HashMap::new(),
            partial: HashMap::new(),
        }
    }

    pub async fn request(
        &mut self,
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&REQ_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        if kind == CMD_READ {
            self.pending_reads.insert(handle, (offset, len));
        }
        within(self.s.write_all(&m)).await.unwrap();
    }

    pub async fn read(&mut self, handle: u64, offset: u64, len: u32) {
        self.request(0, CMD_READ, handle, offset, len, &[]).await
    }

    pub async fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, handle, offset, data.len() as u32, data)
            .await
    }

    /// Reads until one reply is complete and returns it.
    pub async fn recv(&mut self) -> Reply {
        loop {
            let magic = read_u32(&mut self.s).await;
            match magic {
                SIMPLE_MAGIC => {
                    let error = read_u32(&mut self.s).await;
                    let handle = read_u64(&mut self.s).await;
                    let read = self.pending_reads.remove(&handle);
                    assert!(
                        !self.structured || read.is_none(),
                        "simple reply to a read with structured replies on"
                    );
                    let data = match read {
                        Some((_, len)) if error == 0 => {
                            Some(read_n(&mut self.s, len as usize).await)
                        }
                        _ => None,
                    };
                    return Reply {
                        handle,
                        error,
                        data,
                        err_offset: None,
                        structured: false,
                        status: None,
                    };
                }
                STRUCT_MAGIC => {
                    assert!(self.structured, "structured chunk without negotiation");
                    let flags = read_u16(&mut self.s).await;
                    let typ = read_u16(&mut self.s).await;
                    let handle = read_u64(&mut self.s).await;
                    let len = read_u32(&mut self.s).await as usize;
                    let payload = read_n(&mut self.s, len).await;
                    let entry = self.partial.entry(handle).or_insert(Reply {
                        handle,
                        error: 0,
                        data: None,
                        err_offset: None,
                        structured: true,
                        status: None,
                    });
                    match typ {
                        0 => assert_eq!(len, 0),
                        1 => {
                            let (roff, rlen) = self.pending_reads[&handle];
                            let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
                            let d = &payload[8..];
                            assert!(
                                off >= roff && off + d.len() as u64 <= roff + rlen as u64,
                                "chunk outside request"
                            );
                            let buf = entry.data.get_or_insert_with(|| vec![0; rlen as usize]);
                            buf[(off - roff) as usize..(off - roff) as usize + d.len()]
                                .copy_from_slice(d);
                        }
                        0x8001 | 0x8002 => {
                            let err = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                            let mlen = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                            assert!(err != 0);
                            std::str::from_utf8(&payload[6..6 + mlen])
                                .expect("error message is UTF-8");
                            if typ == 0x8002 {
                                assert_eq!(len, 6 + mlen + 8);
                                entry.err_offset = Some(u64::from_be_bytes(
                                    payload[6 + mlen..].try_into().unwrap(),
                                ));
                            } else {
                                assert_eq!(len, 6 + mlen);
                            }
                            entry.error = err;
                        }
                        5 => {
                            assert!(
                                len >= 12 && (len - 4).is_multiple_of(8),
                                "block status length {len}"
                            );
                            assert!(entry.status.is_none(), "two block status chunks");
                            let id = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                            let d = payload[4..]
                                .chunks_exact(8)
                                .map(|c| {
                                    (
                                        u32::from_be_bytes(c[0..4].try_into().unwrap()),
                                        u32::from_be_bytes(c[4..8].try_into().unwrap()),
                                    )
                                })
                                .collect();
                            entry.status = Some((id, d));
                        }
                        t => panic!("unexpected chunk type {t:#x}"),
                    }
                    if flags & 1 != 0 {
                        self.pending_reads.remove(&handle);
                        let mut r = self.partial.remove(&handle).unwrap();
                        if r.error != 0 {
                            r.data = None;
                        }
                        return r;
                    }
                }
                m => panic!("bad reply magic {m:#x}"),
            }
        }
    }

    /// Receives `n` replies, keyed by handle.
    pub async fn recv_n(&mut self, n: usize) -> HashMap<u64, Reply> {
        let mut out = HashMap::new();
        for _ in 0..n {
            let r = self.recv().await;
            assert!(out.insert(r.handle, r).is_none(), "duplicate reply");
        }
        out
    }

    pub async fn disconnect(mut self) {
        self.request(0, CMD_DISC, u64::MAX, 0, 0, &[]).await;
        expect_closed(&mut self.s).await;
    }
}

/// A meta context option payload: export name, then the queries.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Sends a LIST/SET_META_CONTEXT option and collects the contexts it
/// answers `(id, name)`, or the error reply type.
pub async fn meta_context(
    s: &mut UnixStream,
    option: u32,
    data: &[u8],
) -> Result<Vec<(u32, String)>, u32> {
    send_opt(s, option, data).await;
    let mut got = Vec::new();
    loop {
        let (opt, typ, data) = opt_reply(s).await;
        assert_eq!(opt, option);
        match typ {
            REP_META_CONTEXT => {
                let id = u32::from_be_bytes(data[0..4].try_into().unwrap());
                got.push((id, String::from_utf8(data[4..].to_vec()).unwrap()));
            }
            REP_ACK => return Ok(got),
            e => {
                assert!(e & 0x8000_0000 != 0, "unexpected reply type {e:#x}");
                return Err(e);
            }
        }
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Polls `cond` until true or the deadline (for gauges that settle after
/// tasks end); yields to the runtime between checks, no fixed sleeps.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
