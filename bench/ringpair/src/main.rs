//! `ringpair`: a measurement, not part of nbd-mirror. The leanest mirrored write path we
//! could write for this box, to tell what the mirrored targets of `bench/mirror.sh` cost
//! any implementation here from what they cost nbd-mirror's agent (see "Single-ring
//! reference pair" in bench/HISTORY.md; `bench/ringpair.sh` runs it).
//!
//! - `ringpair active SOCK FILE [PEER]`: an NBD server on the unix socket SOCK serving FILE
//!   (O_DIRECT), one connection at a time, each in **one thread driving one io_uring**:
//!   the NBD socket's receives and replies, the disk writes and, with PEER (`host:port`),
//!   the frames to the standby and its acks are all SQEs of the same ring; each pass of
//!   the loop submits everything it produced and waits in one `io_uring_enter`. A write
//!   is answered once the disk completed it and, with a peer, once the peer acknowledged
//!   it (the `sync` mode's contract, minus durability: the standby does not flush).
//! - `ringpair standby ADDR FILE`: accepts one TCP connection on ADDR; one thread reads
//!   frames (`u64 offset`, `u32 tag`, `u32 length`, payload; little-endian), writes each
//!   with `pwrite` and answers the 16-byte header back as the ack, once per read.
//!
//! Left out on purpose, so that it stays *below* any real pair: the payload CRC, the
//! dirty bitmap, authentication, the second ack, heartbeats, flush semantics (FLUSH is
//! answered at once), reads (refused), error handling beyond stopping. Writes must be
//! 4 KiB multiples up to 1 MiB (what fio's jobs send). Only NBD's fixed newstyle
//! handshake with `NBD_OPT_GO` and simple replies is spoken (libnbd copes).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

use anyhow::{bail, ensure, Context, Result};
use io_uring::{opcode, types, IoUring};

/// Frame and ack header: `u64 offset`, `u32 tag` (the slot), `u32 length`.
const HDR: usize = 16;
const PAGE: usize = 4096;
/// Requests in flight at most (fio's jobs use 32).
const SLOTS: usize = 64;
/// Largest write.
const SLOT: usize = 1 << 20;

// user_data: kind in the top 4 bits, slot below.
const RECV_NBD: u64 = 1 << 60;
const SEND_NBD: u64 = 2 << 60;
const RECV_PEER: u64 = 3 << 60;
const SEND_PEER: u64 = 4 << 60;
const DISK: u64 = 5 << 60;
const CANCEL: u64 = 6 << 60;
const KIND: u64 = 0xf << 60;

const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_REPLY_MAGIC: u64 = 0x3_e889_0455_65a9;

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Fixed newstyle handshake up to `NBD_OPT_GO`; every other option is refused.
fn handshake(s: &mut UnixStream, size: u64) -> Result<()> {
    let mut g = Vec::with_capacity(18);
    g.extend_from_slice(b"NBDMAGIC");
    g.extend_from_slice(b"IHAVEOPT");
    g.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&g)?;
    let mut client_flags = [0u8; 4];
    s.read_exact(&mut client_flags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let (opt, len) = (be_u32(&h[8..]), be_u32(&h[12..]) as usize);
        ensure!(len <= 4096, "option {opt} with {len} bytes of data");
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        let mut reply = |typ: u32, d: &[u8]| -> Result<()> {
            let mut r = Vec::with_capacity(20 + d.len());
            r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&typ.to_be_bytes());
            r.extend_from_slice(&(d.len() as u32).to_be_bytes());
            r.extend_from_slice(d);
            Ok(s.write_all(&r)?)
        };
        match opt {
            // NBD_OPT_INFO, NBD_OPT_GO: NBD_INFO_EXPORT (size; HAS_FLAGS | SEND_FLUSH), ACK.
            6 | 7 => {
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&0u16.to_be_bytes());
                d.extend_from_slice(&size.to_be_bytes());
                d.extend_from_slice(&(1u16 | 4).to_be_bytes());
                reply(3, &d)?;
                reply(1, &[])?;
                if opt == 7 {
                    return Ok(());
                }
            }
            2 => bail!("client aborted the handshake"),
            _ => reply((1 << 31) | 1, &[])?, // NBD_REP_ERR_UNSUP
        }
    }
}

/// `SLOTS` page-aligned buffers of `SLOT` bytes for O_DIRECT writes.
struct Slots {
    mem: *mut u8,
    layout: std::alloc::Layout,
}

impl Slots {
    fn new() -> Slots {
        let layout = std::alloc::Layout::from_size_align(SLOTS * SLOT, PAGE).expect("layout");
        // SAFETY: the layout's size is not zero.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!mem.is_null(), "out of memory for the slot buffers");
        Slots { mem, layout }
    }

    fn get(&mut self, idx: usize, len: usize) -> &mut [u8] {
        assert!(idx < SLOTS && len <= SLOT);
        // SAFETY: idx * SLOT is inside the allocation (idx < SLOTS).
        let start = unsafe { self.mem.add(idx * SLOT) };
        // SAFETY: [start, start + len) is inside the allocation (len <= SLOT); `&mut self`
        // makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(start, len) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.mem, self.layout) };
    }
}

/// A byte queue sent by one `Send` SQE at a time: `out` collects, `flight` is being sent.
#[derive(Default)]
struct Outbox {
    out: Vec<u8>,
    flight: Vec<u8>,
    sent: usize,
}

impl Outbox {
    /// The next `Send` to submit, if nothing is in flight and something is waiting.
    fn next_send(&mut self, fd: types::Fd, tag: u64) -> Option<io_uring::squeue::Entry> {
        if !self.flight.is_empty() || self.out.is_empty() {
            return None;
        }
        std::mem::swap(&mut self.flight, &mut self.out);
        self.sent = 0;
        Some(
            opcode::Send::new(fd, self.flight.as_ptr(), self.flight.len() as u32)
                .build()
                .user_data(tag),
        )
    }

    /// A send completed with `res`; returns the SQE for the rest, if any.
    fn sent(
        &mut self,
        res: i32,
        fd: types::Fd,
        tag: u64,
    ) -> Result<Option<io_uring::squeue::Entry>> {
        ensure!(
            res > 0,
            "send failed: {}",
            std::io::Error::from_raw_os_error(-res)
        );
        self.sent += res as usize;
        if self.sent < self.flight.len() {
            let rest = &self.flight[self.sent..];
            return Ok(Some(
                opcode::Send::new(fd, rest.as_ptr(), rest.len() as u32)
                    .build()
                    .user_data(tag),
            ));
        }
        self.flight.clear();
        Ok(None)
    }
}

/// Frames to the standby, sent with `SendMsg` straight from the slots (header + payload
/// iovecs, no copy into a send buffer): `out` collects (slot, length), `iov`/`msg` are the
/// send in flight. A slot is reused only after its ack, so its data outlives the send.
struct FrameOut {
    hdrs: Vec<[u8; HDR]>,
    out: Vec<(usize, usize)>,
    iov: Vec<libc::iovec>,
    /// First iovec not yet sent completely.
    next: usize,
    msg: Box<libc::msghdr>,
}

impl FrameOut {
    fn new() -> FrameOut {
        // SAFETY: msghdr is plain data; all-zero is a valid empty message.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        FrameOut {
            hdrs: vec![[0; HDR]; SLOTS],
            out: Vec::new(),
            iov: Vec::new(),
            next: 0,
            msg: Box::new(msg),
        }
    }

    fn in_flight(&self) -> bool {
        self.next < self.iov.len()
    }

    fn queue(&mut self, idx: usize, off: u64, len: usize) {
        let h = &mut self.hdrs[idx];
        h[..8].copy_from_slice(&off.to_le_bytes());
        h[8..12].copy_from_slice(&(idx as u32).to_le_bytes());
        h[12..].copy_from_slice(&(len as u32).to_le_bytes());
        self.out.push((idx, len));
    }

    fn entry(&mut self, fd: types::Fd) -> io_uring::squeue::Entry {
        self.msg.msg_iov = self.iov[self.next..].as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() - self.next;
        opcode::SendMsg::new(fd, &*self.msg)
            .build()
            .user_data(SEND_PEER)
    }

    /// The next `SendMsg`, if nothing is in flight and frames wait.
    fn next_send(&mut self, fd: types::Fd, slots: &mut Slots) -> Option<io_uring::squeue::Entry> {
        if self.in_flight() || self.out.is_empty() {
            return None;
        }
        self.iov.clear();
        self.next = 0;
        for (idx, len) in self.out.drain(..) {
            let h = &self.hdrs[idx];
            self.iov.push(libc::iovec {
                iov_base: h.as_ptr() as *mut libc::c_void,
                iov_len: HDR,
            });
            let b = slots.get(idx, len);
            self.iov.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: len,
            });
        }
        Some(self.entry(fd))
    }

    /// A send completed with `res`; returns the SQE for the rest, if any.
    fn sent(&mut self, res: i32, fd: types::Fd) -> Result<Option<io_uring::squeue::Entry>> {
        ensure!(
            res > 0,
            "peer send failed: {}",
            std::io::Error::from_raw_os_error(-res)
        );
        let mut n = res as usize;
        while n > 0 {
            let v = &mut self.iov[self.next];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.next += 1;
            } else {
                // SAFETY: n < iov_len, so the new base is still inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        Ok(self.in_flight().then(|| self.entry(fd)))
    }
}

fn push(ring: &mut IoUring, e: &io_uring::squeue::Entry) -> Result<()> {
    if ring.submission().is_full() {
        ring.submit()?;
    }
    // SAFETY: every entry's buffers (in `Bufs`: slots, receive buffers, the replies'
    // `flight`, the frames' iovecs and msghdr) stay untouched until the entry's completion
    // is reaped, and alive for the process's life (`Bufs`).
    unsafe { ring.submission().push(e) }.context("submission queue full")
}

/// Every buffer an SQE may point into. Owned by [`active`] for the process's life: after
/// an error `serve` returns with entries possibly still in flight, and the process then
/// exits with these still allocated (exit cancels the ring's requests before the memory
/// goes).
struct Bufs {
    slots: Slots,
    rbuf: Vec<u8>,
    abuf: Vec<u8>,
    replies: Outbox,
    frames: FrameOut,
}

/// One NBD connection, served until the client disconnects. Returns only when nothing is
/// in flight, or with an error (then the caller exits; see [`Bufs`]).
fn serve(
    c: &UnixStream,
    file: &std::fs::File,
    peer: Option<&TcpStream>,
    bufs: &mut Bufs,
) -> Result<u64> {
    let Bufs {
        slots,
        rbuf,
        abuf,
        replies,
        frames,
    } = bufs;
    replies.out.clear();
    frames.out.clear();
    let cfd = types::Fd(c.as_raw_fd());
    let ffd = types::Fd(file.as_raw_fd());
    let pfd = peer.map(|p| types::Fd(p.as_raw_fd()));
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(512)?;
    let mut free: Vec<usize> = (0..SLOTS).rev().collect();
    // Per slot: the NBD handle and how many completions it still waits for (disk, ack).
    let mut pending: Vec<(u64, u8)> = vec![(0, 0); SLOTS];
    let (mut rlen, mut rstart, mut recv_armed) = (0usize, 0usize, false);
    let (mut alen, mut ack_armed) = (0usize, false);
    let (mut in_flight, mut writes, mut closing) = (0usize, 0u64, false);
    let reply = |out: &mut Vec<u8>, handle: u64| {
        out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&handle.to_be_bytes());
    };
    loop {
        // Requests received so far.
        while !closing && rlen - rstart >= 28 {
            let h = &rbuf[rstart..rstart + 28];
            ensure!(
                be_u32(h) == REQUEST_MAGIC,
                "bad request magic {:#x}",
                be_u32(h)
            );
            let (typ, handle) = (u16::from_be_bytes([h[6], h[7]]), be_u64(&h[8..]));
            let (off, len) = (be_u64(&h[16..]), be_u32(&h[24..]) as usize);
            match typ {
                1 => {
                    ensure!(
                        len > 0 && len <= SLOT && len % PAGE == 0,
                        "write of {len} bytes"
                    );
                    if rlen - rstart < 28 + len {
                        break;
                    }
                    let Some(idx) = free.pop() else { break };
                    let buf = slots.get(idx, len);
                    buf.copy_from_slice(&rbuf[rstart + 28..rstart + 28 + len]);
                    let w = opcode::Write::new(ffd, buf.as_ptr(), len as u32)
                        .offset(off)
                        .build();
                    push(&mut ring, &w.user_data(DISK | idx as u64))?;
                    in_flight += 1;
                    pending[idx] = (handle, 1);
                    if pfd.is_some() {
                        frames.queue(idx, off, len);
                        pending[idx].1 = 2;
                    }
                    rstart += 28 + len;
                }
                2 => {
                    closing = true;
                    rstart += 28;
                }
                3 => {
                    reply(&mut replies.out, handle);
                    rstart += 28;
                }
                _ => bail!("request type {typ} (this prototype takes WRITE, FLUSH and DISC)"),
            }
        }
        if rstart == rlen {
            (rstart, rlen) = (0, 0);
        } else if !recv_armed && rstart > rbuf.len() / 2 {
            rbuf.copy_within(rstart..rlen, 0);
            (rlen, rstart) = (rlen - rstart, 0);
        }
        if !closing && !recv_armed && !free.is_empty() && rlen < rbuf.len() {
            let e = opcode::Recv::new(cfd, rbuf[rlen..].as_mut_ptr(), (rbuf.len() - rlen) as u32);
            push(&mut ring, &e.build().user_data(RECV_NBD))?;
            (recv_armed, in_flight) = (true, in_flight + 1);
        }
        if let Some(p) = pfd {
            if let Some(e) = frames.next_send(p, slots) {
                push(&mut ring, &e)?;
                in_flight += 1;
            }
            if !ack_armed && !closing {
                let e = opcode::Recv::new(p, abuf[alen..].as_mut_ptr(), (abuf.len() - alen) as u32);
                push(&mut ring, &e.build().user_data(RECV_PEER))?;
                (ack_armed, in_flight) = (true, in_flight + 1);
            }
        }
        if let Some(e) = replies.next_send(cfd, SEND_NBD) {
            push(&mut ring, &e)?;
            in_flight += 1;
        }
        let busy = free.len() < SLOTS || !replies.flight.is_empty() || frames.in_flight();
        if closing && !busy {
            // Every request answered: cancel the armed receives, then wait for everything.
            for (armed, tag) in [(recv_armed, RECV_NBD), (ack_armed, RECV_PEER)] {
                if armed {
                    push(
                        &mut ring,
                        &opcode::AsyncCancel::new(tag).build().user_data(CANCEL),
                    )?;
                    in_flight += 1;
                }
            }
            while in_flight > 0 {
                ring.submit_and_wait(1)?;
                in_flight -= ring.completion().count();
            }
            return Ok(writes);
        }
        ring.submit_and_wait(1)?;
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            in_flight -= 1;
            // One of a write's completions (disk, ack) arrived; the last one answers it.
            let mut done = |idx: usize, pending: &mut [(u64, u8)], out: &mut Vec<u8>| {
                pending[idx].1 -= 1;
                if pending[idx].1 == 0 {
                    reply(out, pending[idx].0);
                    free.push(idx);
                    writes += 1;
                }
            };
            match ud & KIND {
                RECV_NBD => {
                    recv_armed = false;
                    ensure!(
                        res >= 0,
                        "NBD receive: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                    if res == 0 {
                        closing = true;
                    }
                    rlen += res as usize;
                }
                SEND_NBD => {
                    if let Some(e) = replies.sent(res, cfd, SEND_NBD)? {
                        push(&mut ring, &e)?;
                        in_flight += 1;
                    }
                }
                SEND_PEER => {
                    let p = pfd.expect("peer");
                    if let Some(e) = frames.sent(res, p)? {
                        push(&mut ring, &e)?;
                        in_flight += 1;
                    }
                }
                RECV_PEER => {
                    ack_armed = false;
                    ensure!(res > 0, "peer receive: {res}");
                    alen += res as usize;
                    let whole = alen / HDR * HDR;
                    for a in abuf[..whole].chunks_exact(HDR) {
                        let idx =
                            u32::from_le_bytes(a[8..12].try_into().expect("4 bytes")) as usize;
                        ensure!(idx < SLOTS && pending[idx].1 > 0, "ack for slot {idx}");
                        done(idx, &mut pending, &mut replies.out);
                    }
                    abuf.copy_within(whole..alen, 0);
                    alen -= whole;
                }
                DISK => {
                    ensure!(
                        res > 0,
                        "disk write: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                    done((ud & !KIND) as usize, &mut pending, &mut replies.out);
                }
                _ => {} // a cancel's own completion
            }
        }
    }
}

fn active(sock: &str, path: &str, peer: Option<&str>) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("open {path} with O_DIRECT"))?;
    let size = file.metadata()?.len();
    let _ = std::fs::remove_file(sock);
    let l = UnixListener::bind(sock).with_context(|| format!("bind {sock}"))?;
    let peer = match peer {
        Some(a) => {
            let s =
                TcpStream::connect(a).with_context(|| format!("connect to the standby at {a}"))?;
            s.set_nodelay(true)?;
            Some(s)
        }
        None => None,
    };
    let mut bufs = Bufs {
        slots: Slots::new(),
        rbuf: vec![0u8; 4 << 20],
        abuf: vec![0u8; 64 << 10],
        replies: Outbox::default(),
        frames: FrameOut::new(),
    };
    eprintln!("ringpair active: ready on {sock}");
    loop {
        let (mut c, _) = l.accept()?;
        handshake(&mut c, size)?;
        let t = std::time::Instant::now();
        let n = match serve(&c, &file, peer.as_ref(), &mut bufs) {
            Ok(n) => n,
            Err(e) => {
                // Exit with `bufs` still allocated: entries may be in flight.
                eprintln!("ringpair active: {e:#}");
                std::process::exit(1);
            }
        };
        eprintln!(
            "ringpair active: {n} writes in {:.3} s",
            t.elapsed().as_secs_f64()
        );
    }
}

fn standby(addr: &str, path: &str) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {path}"))?;
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    eprintln!("ringpair standby: ready on {addr}");
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 4 << 20];
    let (mut len, mut acks) = (0usize, Vec::new());
    loop {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut start = 0;
        while len - start >= HDR {
            let h = &buf[start..start + HDR];
            let (off, plen) = (
                le_u64(h),
                u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as usize,
            );
            ensure!(plen <= SLOT, "frame of {plen} bytes");
            if len - start < HDR + plen {
                break;
            }
            file.write_all_at(&buf[start + HDR..start + HDR + plen], off)?;
            acks.extend_from_slice(h);
            start += HDR + plen;
        }
        if !acks.is_empty() {
            s.write_all(&acks)?;
            acks.clear();
        }
        buf.copy_within(start..len, 0);
        len -= start;
    }
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    match (a.get(1).map(String::as_str), a.len()) {
        (Some("active"), 4 | 5) => active(&a[2], &a[3], a.get(4).map(String::as_str)),
        (Some("standby"), 4) => standby(&a[2], &a[3]),
        _ => bail!("usage: ringpair active SOCK FILE [PEER_ADDR] | ringpair standby ADDR FILE"),
    }
}
