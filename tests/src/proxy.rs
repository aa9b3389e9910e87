//! [`Proxy`]: a fault-injecting TCP proxy for the link between two agents.
//!
//! It listens on one address (where the dialing agent connects, the
//! listening agent's `address`) and forwards every connection to a target
//! (the listening agent's `listen_address`). These faults apply to both
//! directions of every connection, current and future:
//!
//! - [`Proxy::delay`]: every chunk is forwarded `d` after it was read (a delay
//!   line: throughput is kept, latency grows).
//! - [`Proxy::stall`]: nothing is forwarded (bytes are held, connections stay
//!   open); [`Proxy::heal`] releases them.
//! - [`Proxy::blackhole`]: bytes are read and dropped.
//! - [`Proxy::reset`]: every current connection is closed with RST (linger 0).
//! - [`Proxy::cut`]: reset, and new connections are refused (accepted and
//!   reset at once) until [`Proxy::heal`].
//!
//! One fault applies to one direction only: [`Proxy::drop_one_way`] drops the
//! bytes going one [`Dir`] (an asymmetric link: the other direction keeps
//! flowing, on its own or under the two-way fault) until [`Proxy::heal`].

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A direction of the proxied connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the connecting side (the dialer) to the target.
    ToTarget,
    /// From the target back to the connecting side.
    FromTarget,
}

/// The fault currently applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward as is.
    None,
    /// Forward each chunk this long after it was read.
    Delay(Duration),
    /// Hold everything.
    Stall,
    /// Drop everything.
    Blackhole,
    /// Refuse (reset) new connections.
    Cut,
}

#[derive(Debug)]
struct Shared {
    fault: Mutex<Fault>,
    /// Bytes going this way are dropped (on top of `fault`).
    one_way: Mutex<Option<Dir>>,
    conns: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    forwarded: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drops(&self, dir: Dir) -> bool {
        *self.one_way.lock().unwrap_or_else(|p| p.into_inner()) == Some(dir)
    }
}

/// A running proxy (stopped, with every connection reset, on drop).
#[derive(Debug)]
pub struct Proxy {
    listen: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

/// Closes `s` with an RST instead of a FIN once its last handle is dropped,
/// and wakes the threads blocked reading it.
fn abort(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `s` owns a valid socket fd for the duration of the call; the
    // option value is a properly initialised `linger` of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = s.shutdown(Shutdown::Read);
}

impl Proxy {
    /// Starts forwarding connections to `listen` to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> Proxy {
        let l = TcpListener::bind(listen)
            .unwrap_or_else(|e| panic!("proxy: cannot listen on {listen}: {e}"));
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            one_way: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let sh = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("proxy-{listen}"))
            .spawn(move || accept_loop(l, target, sh))
            .expect("spawning the proxy thread");
        Proxy {
            listen,
            target,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where it listens.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Where it forwards to.
    pub fn target_addr(&self) -> SocketAddr {
        self.target
    }

    /// Connections accepted so far (including refused ones while cut).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Bytes forwarded so far (both directions).
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> usize {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn set(&self, f: Fault) {
        *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Delays every chunk by `d`.
    pub fn delay(&self, d: Duration) {
        self.set(Fault::Delay(d));
    }

    /// Holds every byte until [`heal`](Self::heal).
    pub fn stall(&self) {
        self.set(Fault::Stall);
    }

    /// Drops every byte until [`heal`](Self::heal).
    pub fn blackhole(&self) {
        self.set(Fault::Blackhole);
    }

    /// Drops every byte going `dir` until [`heal`](Self::heal); the other
    /// direction is forwarded (under the two-way fault, if any).
    pub fn drop_one_way(&self, dir: Dir) {
        *self
            .shared
            .one_way
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(dir);
    }

    /// Back to plain forwarding in both directions (held bytes are released).
    pub fn heal(&self) {
        *self
            .shared
            .one_way
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.set(Fault::None);
    }

    /// Resets every current connection (new ones are accepted).
    pub fn reset(&self) {
        let conns =
            std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, a, b) in &conns {
            abort(a);
            abort(b);
        }
    }

    /// Resets every connection and refuses new ones until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.set(Fault::Cut);
        self.reset();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.reset();
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.listen, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(l: TcpListener, target: SocketAddr, sh: Arc<Shared>) {
    for conn in l.incoming() {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        sh.accepted.fetch_add(1, Ordering::Relaxed);
        if sh.fault() == Fault::Cut {
            abort(&client);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
            abort(&client);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        sh.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, c3, s3));
        pump(client, s2, Dir::ToTarget, id, Arc::clone(&sh));
        pump(server, c2, Dir::FromTarget, id, Arc::clone(&sh));
    }
}

/// Forwards `from` → `to` through a delay line: a reader thread stamps each
/// chunk, a writer thread applies the fault when forwarding it.
fn pump(mut from: TcpStream, mut to: TcpStream, dir: Dir, id: u64, sh: Arc<Shared>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let sh_r = Arc::clone(&sh);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        drop(sh_r);
    });
    std::thread::spawn(move || {
        let _ = to.set_write_timeout(Some(Duration::from_millis(500)));
        'chunks: while let Ok((at, chunk)) = rx.recv() {
            loop {
                if !sh
                    .conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .any(|c| c.0 == id)
                {
                    break 'chunks;
                }
                if sh.drops(dir) {
                    continue 'chunks;
                }
                match sh.fault() {
                    Fault::None | Fault::Cut => break,
                    Fault::Blackhole => continue 'chunks,
                    Fault::Stall => std::thread::sleep(Duration::from_millis(5)),
                    Fault::Delay(d) => {
                        let due = at + d;
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        std::thread::sleep((due - now).min(Duration::from_millis(20)));
                    }
                }
            }
            let mut off = 0;
            while off < chunk.len() {
                match to.write(&chunk[off..]) {
                    Ok(0) => break 'chunks,
                    Ok(n) => {
                        off += n;
                        sh.forwarded.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if !sh
                            .conns
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .iter()
                            .any(|c| c.0 == id)
                        {
                            break 'chunks;
                        }
                    }
                    Err(_) => break 'chunks,
                }
            }
        }
        // One direction ended: end the whole connection (RST), like a dead link.
        let mut conns = sh.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = conns.iter().position(|c| c.0 == id) {
            let (_, a, b) = conns.remove(i);
            abort(&a);
            abort(&b);
        }
        abort(&to);
    });
}
