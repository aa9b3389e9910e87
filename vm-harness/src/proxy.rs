//! Userspace fault proxy between the nodes (netem is absent on the CI
//! machines, and `nft` rules on the host's loopback would be host-wide).
//!
//! For each port it listens on `127.0.0.1:PORT` (what node A reaches as
//! `10.0.2.2:PORT` through slirp) and forwards to `UPSTREAM:PORT` (node B's
//! `listen_address`). [`Proxy::cut`] blackholes the link: no byte moves in
//! either direction and new connections are accepted but never connected
//! upstream (like SYNs and segments lost in a partition: the agents notice
//! only through their own timeouts). [`Proxy::heal`] lets traffic through
//! again; connections that saw the cut are reset (a real peer's TCP would
//! answer the retransmissions of a connection it gave up with RST), new
//! connections work normally.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

#[derive(Debug, Default)]
struct State {
    /// Link cut (blackhole).
    cut: AtomicBool,
    /// Incremented at every cut: connections from an older epoch are reset at heal.
    epoch: AtomicU64,
    /// Set when the proxy is dropped.
    stop: AtomicBool,
    /// Bytes forwarded (both directions).
    bytes: AtomicU64,
    /// Connections accepted.
    conns: AtomicU64,
}

/// A running proxy; dropping it stops the accept loops and pumps.
pub struct Proxy {
    st: Arc<State>,
}

impl Proxy {
    /// Listens on `127.0.0.1:p` for each `p` in `ports`, forwarding to `upstream:p`.
    pub fn start(ports: &[u16], upstream: std::net::IpAddr) -> Result<Proxy> {
        let st = Arc::new(State::default());
        for &p in ports {
            let l = TcpListener::bind(("127.0.0.1", p))
                .with_context(|| format!("fault proxy: bind 127.0.0.1:{p}"))?;
            l.set_nonblocking(true)?;
            let st = Arc::clone(&st);
            let up = SocketAddr::new(upstream, p);
            std::thread::spawn(move || accept_loop(l, up, st));
        }
        Ok(Proxy { st })
    }

    /// Blackholes both directions.
    pub fn cut(&self) {
        self.st.epoch.fetch_add(1, Ordering::SeqCst);
        self.st.cut.store(true, Ordering::SeqCst);
    }

    /// Lets traffic through again (connections that lived through the cut are reset).
    pub fn heal(&self) {
        self.st.cut.store(false, Ordering::SeqCst);
    }

    /// (connections accepted, bytes forwarded).
    pub fn counters(&self) -> (u64, u64) {
        (
            self.st.conns.load(Ordering::Relaxed),
            self.st.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.st.stop.store(true, Ordering::SeqCst);
    }
}

const TICK: Duration = Duration::from_millis(50);

fn accept_loop(l: TcpListener, up: SocketAddr, st: Arc<State>) {
    while !st.stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((down, _)) => {
                st.conns.fetch_add(1, Ordering::Relaxed);
                let st = Arc::clone(&st);
                std::thread::spawn(move || connection(down, up, st));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(TICK),
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

/// One proxied connection: waits out a cut before connecting upstream, then
/// pumps both directions until either side closes, the proxy stops, or a
/// cut it lived through is healed (then both sides are reset).
fn connection(down: TcpStream, up: SocketAddr, st: Arc<State>) {
    let epoch = st.epoch.load(Ordering::SeqCst);
    let cut_at_accept = st.cut.load(Ordering::SeqCst);
    // Accepted during a cut: the "SYN" is lost; hold it until heal, then reset.
    while st.cut.load(Ordering::SeqCst) {
        if st.stop.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(TICK);
    }
    if cut_at_accept || st.epoch.load(Ordering::SeqCst) != epoch {
        reset(&down);
        return;
    }
    let Ok(upc) = TcpStream::connect_timeout(&up, Duration::from_secs(5)) else {
        reset(&down);
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = upc.set_nodelay(true);
    let (d2, u2) = match (down.try_clone(), upc.try_clone()) {
        (Ok(d), Ok(u)) => (d, u),
        _ => return,
    };
    let st2 = Arc::clone(&st);
    let t = std::thread::spawn(move || pump(d2, u2, epoch, st2));
    pump(upc, down, epoch, st);
    let _ = t.join();
}

fn reset(s: &TcpStream) {
    // SO_LINGER 0 + close sends RST, as a peer that forgot the connection would.
    use std::os::fd::AsRawFd;
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket fd owned by `s` (alive for the call), with
    // a pointer to a properly sized, initialised `linger` on our stack.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lg as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    // The RST goes out when the last handle of this socket is dropped (the
    // pumps return right after).
}

fn pump(mut from: TcpStream, mut to: TcpStream, epoch: u64, st: Arc<State>) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if st.stop.load(Ordering::SeqCst) {
            break;
        }
        if st.cut.load(Ordering::SeqCst) {
            // Blackhole: read nothing, send nothing.
            std::thread::sleep(TICK);
            continue;
        }
        if st.epoch.load(Ordering::SeqCst) != epoch {
            // This connection lived through a cut that is now healed.
            reset(&from);
            reset(&to);
            return;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if st.cut.load(Ordering::SeqCst) {
                    // Cut while reading: these bytes are lost, like packets in flight.
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                st.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on 127.0.0.2 behind the proxy: bytes pass, a cut stops
    /// them, heal resets the connection that saw the cut, new ones pass.
    #[test]
    fn cut_blackholes_and_heal_resets() {
        let up = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        let port = up.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in up.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let p = Proxy::start(&[port], "127.0.0.2".parse().unwrap()).expect("proxy");
        let echo = |c: &mut TcpStream, msg: &[u8]| -> std::io::Result<Vec<u8>> {
            c.write_all(msg)?;
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got)?;
            Ok(got)
        };
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert_eq!(echo(&mut c, b"before").unwrap(), b"before");
        p.cut();
        let r = echo(&mut c, b"during");
        assert!(r.is_err(), "bytes passed a cut link: {r:?}");
        let mut c2 = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c2.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            echo(&mut c2, b"new").is_err(),
            "a connection made during the cut passed"
        );
        p.heal();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 16];
        // The connection that lived through the cut ends (RST or EOF), never delivers.
        match c.read(&mut b) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("old connection delivered {n} bytes after heal"),
        }
        let mut c3 = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(echo(&mut c3, b"after").unwrap(), b"after");
        assert!(p.counters().0 >= 3);
    }
}
