//! [`FakePeer`]: a hand-written peer for protocol fault tests.
//!
//! It runs the real session handshake of `docs/protocol.md` §8.1 (Hello,
//! AuthChallenge, HMAC AuthResponse via `mirror_proto::auth`, AuthResult) with
//! blocking sockets, as initiator (it dials a listening agent) or acceptor (a
//! dialing agent connects to it), echoing the agent's own generation in its
//! Hello. After authentication it numbers frames like the real sender (§9.1)
//! and can send well-formed frames or arbitrary bytes (broken CRCs, bad
//! magic, oversized lengths, unknown kinds), answering the agent's Pings
//! while it waits for something.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mirror_proto::auth::{compute_response, verify_response, Direction, Transcript};
use mirror_proto::{Decoder, DiskState, Features, Frame, Hello, Message, Role, SUPPORTED_VERSIONS};

/// Who this fake peer claims to be.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Own node name.
    pub node: String,
    /// The agent's node name (the peer of this fake).
    pub peer_node: String,
    /// Cluster name.
    pub cluster: String,
    /// Resource name.
    pub resource: String,
    /// Volume size.
    pub volume_size: u64,
    /// Region size.
    pub region_size: u32,
    /// Shared secret bytes.
    pub secret: Vec<u8>,
    /// Role announced in Hello.
    pub role: Role,
}

/// What ended a [`FakePeer::wait_closed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// Error frames (code, message) received before the close.
    pub errors: Vec<(u32, String)>,
    /// Goodbye received.
    pub goodbye: bool,
}

/// An authenticated connection to an agent.
#[derive(Debug)]
pub struct FakePeer {
    s: TcpStream,
    buf: BytesMut,
    dec: Decoder,
    /// Next seq this side sends.
    pub tx_seq: u64,
    /// The agent's Hello.
    pub peer_hello: Hello,
    /// Frames received after authentication, except Pings (answered).
    pub received: Vec<Frame>,
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl FakePeer {
    /// Dials `addr` and runs the handshake as initiator.
    pub fn dial(addr: SocketAddr, id: &Identity) -> io::Result<FakePeer> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        Self::handshake(s, id, true)
    }

    /// Accepts one connection on `l` (within `timeout`) and runs the
    /// handshake as acceptor.
    pub fn accept(l: &TcpListener, id: &Identity, timeout: Duration) -> io::Result<FakePeer> {
        l.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        Self::handshake(s, id, false)
    }

    fn handshake(s: TcpStream, id: &Identity, initiator: bool) -> io::Result<FakePeer> {
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        s.set_nodelay(true)?;
        let mut p = FakePeer {
            s,
            buf: BytesMut::new(),
            dec: Decoder::new(),
            tx_seq: 1,
            peer_hello: Hello {
                versions: vec![1],
                node_name: String::new(),
                cluster_name: String::new(),
                resource_name: String::new(),
                volume_size: 0,
                region_size: 4096,
                role: Role::None,
                disk_state: DiskState::UpToDate,
                features: Features::empty(),
                generation: Default::default(),
            },
            received: Vec::new(),
        };
        let t = Duration::from_secs(5);
        let peer_hello = if initiator {
            // Our Hello first: the generation is unknown yet; send a plain one.
            p.send(Message::Hello(hello(id, Default::default())))?;
            match p.recv_handshake(t)? {
                Message::Hello(h) => h,
                m => return Err(other(format!("expected Hello, got {m:?}"))),
            }
        } else {
            let h = match p.recv_handshake(t)? {
                Message::Hello(h) => h,
                m => return Err(other(format!("expected Hello, got {m:?}"))),
            };
            p.send(Message::Hello(hello(id, h.generation.clone())))?;
            h
        };
        let version = mirror_proto::negotiate_version(SUPPORTED_VERSIONS, &peer_hello.versions)
            .ok_or_else(|| other("no common version".into()))?;
        p.peer_hello = peer_hello;
        let my_nonce: [u8; 32] = rand::random();
        let (dir_mine, dir_theirs) = if initiator {
            (
                Direction::InitiatorToAcceptor,
                Direction::AcceptorToInitiator,
            )
        } else {
            (
                Direction::AcceptorToInitiator,
                Direction::InitiatorToAcceptor,
            )
        };
        let mut their_nonce = [0u8; 32];
        let mut take_challenge = |p: &mut FakePeer| -> io::Result<()> {
            match p.recv_handshake(t)? {
                Message::AuthChallenge { nonce } => {
                    their_nonce = nonce;
                    Ok(())
                }
                m => Err(other(format!("expected AuthChallenge, got {m:?}"))),
            }
        };
        if initiator {
            p.send(Message::AuthChallenge { nonce: my_nonce })?;
            take_challenge(&mut p)?;
        } else {
            take_challenge(&mut p)?;
            p.send(Message::AuthChallenge { nonce: my_nonce })?;
        }
        let my_mac = |their_nonce: &[u8; 32]| {
            compute_response(
                &id.secret,
                &Transcript {
                    version,
                    direction: dir_mine,
                    responder_name: &id.node,
                    verifier_name: &id.peer_node,
                    verifier_nonce: their_nonce,
                    responder_nonce: &my_nonce,
                },
            )
        };
        let check_theirs = |mac: &[u8; 32], their_nonce: &[u8; 32]| {
            verify_response(
                &id.secret,
                &Transcript {
                    version,
                    direction: dir_theirs,
                    responder_name: &id.peer_node,
                    verifier_name: &id.node,
                    verifier_nonce: &my_nonce,
                    responder_nonce: their_nonce,
                },
                mac,
            )
        };
        if initiator {
            p.send(Message::AuthResponse {
                mac: my_mac(&their_nonce),
            })?;
            match p.recv_handshake(t)? {
                Message::AuthResult { accepted: true } => {}
                m => return Err(other(format!("our AuthResponse was not accepted: {m:?}"))),
            }
            let mac = match p.recv_handshake(t)? {
                Message::AuthResponse { mac } => mac,
                m => return Err(other(format!("expected AuthResponse, got {m:?}"))),
            };
            let ok = check_theirs(&mac, &their_nonce);
            p.send(Message::AuthResult { accepted: ok })?;
            if !ok {
                return Err(other("the agent's AuthResponse does not verify".into()));
            }
        } else {
            let mac = match p.recv_handshake(t)? {
                Message::AuthResponse { mac } => mac,
                m => return Err(other(format!("expected AuthResponse, got {m:?}"))),
            };
            let ok = check_theirs(&mac, &their_nonce);
            p.send(Message::AuthResult { accepted: ok })?;
            if !ok {
                return Err(other("the agent's AuthResponse does not verify".into()));
            }
            p.send(Message::AuthResponse {
                mac: my_mac(&their_nonce),
            })?;
            match p.recv_handshake(t)? {
                Message::AuthResult { accepted: true } => {}
                m => return Err(other(format!("our AuthResponse was not accepted: {m:?}"))),
            }
        }
        Ok(p)
    }

    /// Encodes `msg` with the next seq and sends it.
    pub fn send(&mut self, msg: Message) -> io::Result<()> {
        let f = Frame::new(self.tx_seq, msg);
        let mut out = BytesMut::new();
        f.encode(&mut out)
            .map_err(|e| other(format!("encoding: {e}")))?;
        self.tx_seq += 1;
        self.s.write_all(&out)
    }

    /// The encoded bytes of `msg` with the next seq (which is consumed), for
    /// a caller that corrupts them before [`send_raw`](Self::send_raw).
    pub fn encode_next(&mut self, msg: Message) -> Vec<u8> {
        let f = Frame::new(self.tx_seq, msg);
        let mut out = BytesMut::new();
        f.encode(&mut out).expect("encoding a valid frame");
        self.tx_seq += 1;
        out.to_vec()
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    /// Reads one frame (`Ok(None)` at EOF), waiting at most `timeout`.
    fn recv_frame(&mut self, timeout: Duration) -> io::Result<Option<Frame>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self
                .dec
                .decode(&mut self.buf)
                .map_err(|e| other(format!("agent sent a bad frame: {e}")))?
            {
                return Ok(Some(f));
            }
            let mut tmp = [0u8; 64 << 10];
            match self.s.read(&mut tmp) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no frame from the agent",
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn recv_handshake(&mut self, timeout: Duration) -> io::Result<Message> {
        match self.recv_frame(timeout)? {
            None => Err(other("connection closed during the handshake".into())),
            Some(Frame {
                msg: Message::Error { code, message },
                ..
            }) => Err(other(format!(
                "agent refused the handshake: Error {code}: {message}"
            ))),
            Some(f) => Ok(f.msg),
        }
    }

    /// Runs the session for `d`: answers Pings, records everything else.
    /// Returns false if the agent closed the connection meanwhile.
    pub fn idle(&mut self, d: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            match self.recv_frame(deadline.saturating_duration_since(Instant::now())) {
                Ok(None) => return Ok(false),
                Ok(Some(f)) => self.handle(f)?,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn handle(&mut self, f: Frame) -> io::Result<()> {
        if let Message::Ping {
            nonce,
            timestamp_ns,
        } = f.msg
        {
            self.send(Message::Pong {
                nonce,
                timestamp_ns,
            })
        } else {
            self.received.push(f);
            Ok(())
        }
    }

    /// Sends a Ping and waits for its Pong (answering the agent's Pings):
    /// proof that the session is up. Returns the round-trip time.
    pub fn ping(&mut self, timeout: Duration) -> io::Result<Duration> {
        let nonce: u64 = rand::random();
        let t0 = Instant::now();
        self.send(Message::Ping {
            nonce,
            timestamp_ns: 1,
        })?;
        let deadline = t0 + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_frame(left)? {
                None => return Err(other("connection closed while waiting for Pong".into())),
                Some(Frame {
                    msg: Message::Pong { nonce: n, .. },
                    ..
                }) if n == nonce => return Ok(t0.elapsed()),
                Some(f) => self.handle(f)?,
            }
        }
    }

    /// Waits until the agent closes the connection (answering Pings
    /// meanwhile, so it is not silence that ends it); panics after `timeout`.
    /// Returns the Error/Goodbye frames seen before the close.
    pub fn wait_closed(&mut self, timeout: Duration) -> Closed {
        let deadline = Instant::now() + timeout;
        let mut c = Closed {
            errors: Vec::new(),
            goodbye: false,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_frame(left) {
                Ok(None) => return c,
                Ok(Some(Frame {
                    msg: Message::Error { code, message },
                    ..
                })) => c.errors.push((code, message)),
                Ok(Some(Frame {
                    msg: Message::Goodbye { .. },
                    ..
                })) => c.goodbye = true,
                Ok(Some(f)) => {
                    // Pong may fail once the agent has shut its side: that is the close.
                    if self.handle(f).is_err() {
                        return c;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    panic!("the agent did not close the connection within {timeout:?} (seen so far: {c:?})")
                }
                Err(_) => return c,
            }
        }
    }
}

fn hello(id: &Identity, generation: mirror_proto::Generation) -> Hello {
    Hello {
        versions: SUPPORTED_VERSIONS.to_vec(),
        node_name: id.node.clone(),
        cluster_name: id.cluster.clone(),
        resource_name: id.resource.clone(),
        volume_size: id.volume_size,
        region_size: id.region_size,
        role: id.role,
        disk_state: DiskState::UpToDate,
        features: Features::empty(),
        generation,
    }
}

/// CRC-32 (IEEE, reflected 0xEDB88320), as the protocol uses; written here
/// independently of the codec so corrupted frames can be resealed.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Recomputes the header CRC (bytes 24..28) over header bytes 0..24, so a
/// deliberately altered header field is judged on its own merit.
pub fn reseal_header(frame: &mut [u8]) {
    let c = crc32(&frame[..24]);
    frame[24..28].copy_from_slice(&c.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
