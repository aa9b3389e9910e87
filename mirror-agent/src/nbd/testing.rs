//! Test support: [`MemEngine`], a complete in-memory [`BlockEngine`], and
//! [`fuzz_session`], the body of the `nbd_session` fuzz target.
//!
//! [`MemEngine`] is a real engine (bytes are stored and read back, ranges are
//! checked) so NBD tests exercise the server without depending on files or
//! io_uring. It also records how many flushes it saw, so durability ordering
//! can be asserted.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::engine::{push_run, BlockEngine, EngineFuture, Extent};

/// An in-memory volume behind a lock.
#[derive(Debug)]
pub struct MemEngine {
    data: Mutex<Vec<u8>>,
    size: u64,
    flushes: AtomicU64,
}

impl MemEngine {
    /// A zero-filled volume of `size` bytes.
    pub fn new(size: usize) -> Arc<MemEngine> {
        Arc::new(MemEngine {
            data: Mutex::new(vec![0; size]),
            size: size as u64,
            flushes: AtomicU64::new(0),
        })
    }

    /// A copy of the whole volume.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Number of completed flushes (explicit, or FUA on a write).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the Vec inconsistent.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset as usize..end as usize),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn fill_zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.lock()[r].fill(0);
        if fua {
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl BlockEngine for MemEngine {
    fn size(&self) -> u64 {
        self.size
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        let r = self
            .range(offset, len as u64)
            .map(|r| self.lock()[r].to_vec());
        Box::pin(async move { r })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        let r = self.range(offset, data.len() as u64).map(|r| {
            self.lock()[r].copy_from_slice(&data);
            if fua {
                self.flushes.fetch_add(1, Ordering::SeqCst);
            }
        });
        Box::pin(async move { r })
    }

    fn flush(&self) -> EngineFuture<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        let r = self.fill_zero(offset, len, false);
        Box::pin(async move { r })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, fua: bool) -> EngineFuture<()> {
        let r = self.fill_zero(offset, len, fua);
        Box::pin(async move { r })
    }

    /// Memory has no allocation map: every 4 KiB granule (absolute) that
    /// holds only zeroes counts as a hole, so that block status has holes
    /// and data to report in tests.
    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<Extent>> {
        let r = self.range(offset, len).map(|r| {
            let data = self.lock();
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = r.start;
            while pos < r.end {
                let next = ((pos / 4096 + 1) * 4096).min(r.end);
                let hole = data[pos..next].iter().all(|&b| b == 0);
                if !push_run(&mut out, (next - pos) as u64, hole) {
                    break;
                }
                pos = next;
            }
            out
        });
        Box::pin(async move { r })
    }
}

/// What reached the engine during a fuzzed session.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Applied {
    Write { offset: u64, data: Bytes },
    Trim { offset: u64, len: u64 },
    Zeroes { offset: u64, len: u64 },
}

/// A [`MemEngine`] that records every modification it is asked to make.
struct Recording {
    mem: Arc<MemEngine>,
    log: Mutex<Vec<Applied>>,
}

impl Recording {
    fn note(&self, a: Applied) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(a);
    }
}

impl BlockEngine for Recording {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn name(&self) -> &'static str {
        "recording"
    }
    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        self.mem.read(offset, len)
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        self.note(Applied::Write {
            offset,
            data: data.clone(),
        });
        self.mem.write(offset, data, fua)
    }
    fn flush(&self) -> EngineFuture<()> {
        self.mem.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        self.note(Applied::Trim { offset, len });
        self.mem.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        self.note(Applied::Zeroes { offset, len });
        self.mem.write_zeroes(offset, len, may_trim, fua)
    }
    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<Extent>> {
        self.mem.extents(offset, len)
    }
}

/// Size of the fuzzed export (small, so that many offsets are in range).
const FUZZ_VOLUME: usize = 256 << 10;

/// The client's side of a valid handshake for export `md1`, chosen by the bits of `mode`:
/// bit 1 negotiates structured replies first, bit 2 uses `NBD_OPT_GO` (with an
/// `NBD_INFO_BLOCK_SIZE` request) instead of `NBD_OPT_EXPORT_NAME`, bit 4 selects the
/// `base:allocation` metadata context (after structured replies, if any: without them the
/// server refuses it and block status requests are refused too).
fn handshake_prefix(mode: u8) -> Vec<u8> {
    use super::proto::*;
    let mut c = Vec::new();
    c.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let opt = |c: &mut Vec<u8>, code: u32, data: &[u8]| {
        c.extend_from_slice(&IHAVEOPT.to_be_bytes());
        c.extend_from_slice(&code.to_be_bytes());
        c.extend_from_slice(&(data.len() as u32).to_be_bytes());
        c.extend_from_slice(data);
    };
    if mode & 2 != 0 {
        opt(&mut c, OPT_STRUCTURED_REPLY, &[]);
    }
    if mode & 16 != 0 {
        let req = MetaContextRequest {
            name: "md1".into(),
            queries: vec![META_BASE_ALLOCATION.into()],
        };
        opt(&mut c, OPT_SET_META_CONTEXT, &req.encode());
    }
    if mode & 4 != 0 {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"md1");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        opt(&mut c, OPT_GO, &d);
    } else {
        opt(&mut c, OPT_EXPORT_NAME, b"md1");
    }
    c
}

/// Positions in `input` where a request header for `kind` with this offset and length
/// starts (the magic, then flags, type, any handle, offset, length; big-endian).
fn headers_for(input: &[u8], kind: u16, offset: u64, len: u64) -> Vec<usize> {
    let magic = super::proto::REQUEST_MAGIC.to_be_bytes();
    let len32 = match u32::try_from(len) {
        Ok(l) => l,
        Err(_) => return Vec::new(),
    };
    input
        .windows(super::proto::REQUEST_HEADER_LEN)
        .enumerate()
        .filter(|(_, h)| {
            h[..4] == magic
                && h[6..8] == kind.to_be_bytes()
                && h[16..24] == offset.to_be_bytes()
                && h[24..28] == len32.to_be_bytes()
        })
        .map(|(i, _)| i)
        .collect()
}

/// Body of the `nbd_session` fuzz target (`mirror-agent/fuzz`), also run by the test suite
/// on generated inputs (`tests/nbd_fuzz_inputs.rs`).
///
/// `data[0]` picks the mode (bit 0: the rest follows a valid handshake, see
/// `handshake_prefix`, whose bits 1, 2 and 4 it reads; clear: the rest *is* the client's
/// handshake; bit 3: a minimum block size of 1 instead of 512; the export is 256 KiB, its maximum request 64 KiB). The client's bytes
/// are sent to a real [`NbdServer`](super::NbdServer) over an in-memory stream, then the
/// client half-closes; the server's output is read and dropped. Asserts that:
/// - the server neither panics nor hangs: the session ends within 20 s of the input's end;
/// - nothing reaches the volume that the client did not send whole: every write the engine
///   received is a complete `NBD_CMD_WRITE` header in the input followed by exactly the bytes
///   written, and every trim / write-zeroes matches a header of that command with the same
///   offset and length;
/// - the volume was never touched outside its size.
///
/// Returns how many modifications (writes, trims, write-zeroes) reached the volume.
pub fn fuzz_session(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let mut client = if mode & 1 != 0 {
        handshake_prefix(mode)
    } else {
        Vec::new()
    };
    client.extend_from_slice(rest);
    let engine = Arc::new(Recording {
        mem: MemEngine::new(FUZZ_VOLUME),
        log: Mutex::new(Vec::new()),
    });
    let limits = super::Limits {
        max_option_len: 4096,
        conn_inflight_bytes: 256 << 10,
        global_inflight_bytes: 256 << 10,
        conn_inflight_requests: 16,
        handshake_timeout: std::time::Duration::from_secs(5),
        shutdown_grace: std::time::Duration::from_secs(5),
        reply_queue: 8,
        idle_poll: std::time::Duration::ZERO,
    };
    let mut export = super::Export::new("md1", engine.clone() as Arc<dyn BlockEngine>);
    export.block_sizes = super::BlockSizes {
        minimum: if mode & 8 != 0 { 1 } else { 512 },
        preferred: 4096,
        maximum: 64 << 10,
    };
    let server = super::NbdServer::new(vec![export], limits).expect("valid server config");
    // The session's own result is the server's verdict on the input (refusals are
    // errors); only a hang or a panic is a failure here.
    let _verdict = crate::fuzzing::play(
        &client,
        64 << 10,
        std::time::Duration::from_secs(20),
        "the NBD session",
        |stream| async move { server.serve_stream(stream).await },
    );
    use super::proto::{CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, REQUEST_HEADER_LEN};
    let log = engine.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let applied = log.len();
    for a in log {
        match a {
            Applied::Write { offset, data } => {
                let whole = headers_for(&client, CMD_WRITE, offset, data.len() as u64)
                    .into_iter()
                    .any(|at| {
                        let p = at + REQUEST_HEADER_LEN;
                        client.get(p..p + data.len()) == Some(&data[..])
                    });
                assert!(
                    whole,
                    "a write of {} bytes at {offset} reached the volume without a whole WRITE request carrying them",
                    data.len()
                );
                assert!(offset + data.len() as u64 <= FUZZ_VOLUME as u64);
            }
            Applied::Trim { offset, len } => {
                assert!(
                    !headers_for(&client, CMD_TRIM, offset, len).is_empty(),
                    "a trim of {len} bytes at {offset} without a TRIM request"
                );
                assert!(offset + len <= FUZZ_VOLUME as u64);
            }
            Applied::Zeroes { offset, len } => {
                assert!(
                    !headers_for(&client, CMD_WRITE_ZEROES, offset, len).is_empty(),
                    "write-zeroes of {len} bytes at {offset} without a WRITE_ZEROES request"
                );
                assert!(offset + len <= FUZZ_VOLUME as u64);
            }
        }
    }
    applied
}
