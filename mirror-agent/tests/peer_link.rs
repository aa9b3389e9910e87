//! Peer links over real TCP on 127.0.0.1: handshake, refusals, pre-auth frames, malformed
//! frames after auth, heartbeat, silent peers, reconnect and replacement.
//!
//! Node "a" sorts lower and dials, node "b" accepts. Raw clients below play node "a" with
//! hand-made frames (via `mirror_proto`) to send what a correct agent never would.

mod peer_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mirror_agent::config::{Config, ExampleSpec, Secret, Timeouts};
use mirror_agent::peer::testing::hello;
use mirror_agent::peer::{
    spawn_link, HelloState, LinkHandle, LinkSpec, LinkState, ResourceSpec, Session,
};
use mirror_proto::auth::{compute_response, verify_response, Direction, Transcript};
use mirror_proto::{
    error_code, Decoder, DiskState, Features, Frame, Generation, Header, Message, MessageKind,
    Role, HEADER_LEN,
};
use peer_common::{
    assert_delivered, assert_no_more_frames, closed_reason, free_port, free_ports, next_session,
    recv_frame, wait_refused, write, Pair, WAIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const HB_TIMEOUT: Duration = Duration::from_millis(500);

fn timeouts() -> Timeouts {
    peer_common::timeouts(HB_TIMEOUT)
}

/// A fresh random secret, read through the config layer like the agent does.
fn secret() -> Secret {
    let dir = tempfile::tempdir().unwrap();
    let path = ExampleSpec::pair(dir.path(), 20000).write().unwrap();
    Config::load(&path).unwrap().read_secret().unwrap()
}

fn md1() -> Option<ResourceSpec> {
    Some(ResourceSpec {
        name: "md1".into(),
        volume_size: 1 << 30,
        region_size: 64 << 10,
    })
}

fn spec(
    local: &str,
    peer: &str,
    port: u16,
    secret: &Secret,
    res: Option<ResourceSpec>,
) -> LinkSpec {
    let role = if local == "a" {
        Role::Active
    } else {
        Role::Standby
    };
    LinkSpec {
        cluster: "demo".into(),
        local_node: local.into(),
        peer_node: peer.into(),
        resource: res,
        hello_state: Arc::new(move || HelloState {
            role,
            disk_state: DiskState::UpToDate,
            generation: Generation {
                current: 7,
                bitmap: 0,
                history: vec![3],
            },
            features: Features::TRIM,
        }),
        secret: secret.clone(),
        timeouts: timeouts(),
        listen_addr: format!("127.0.0.1:{port}"),
        peer_addr: format!("127.0.0.1:{port}"),
        tls: None,
    }
}

/// Links "a" and "b" for `res`, configured alike: one fresh port, one fresh secret.
fn pair(res: Option<ResourceSpec>) -> Pair {
    let s = secret();
    let port = free_port();
    Pair::start(
        spec("a", "b", port, &s, res.clone()),
        spec("b", "a", port, &s, res),
    )
}

/// Link "b" alone (the acceptor) on a fresh port with a fresh secret, for raw clients playing
/// "a"; it runs while this lives.
struct Acceptor {
    link: LinkHandle,
    port: u16,
    secret: Secret,
    _stop: watch::Sender<bool>,
}

impl Acceptor {
    fn start(res: Option<ResourceSpec>) -> Acceptor {
        Acceptor::start_with(res, |_| {})
    }

    /// As `start`, with b's spec adjusted by `adjust` first.
    fn start_with(res: Option<ResourceSpec>, adjust: impl FnOnce(&mut LinkSpec)) -> Acceptor {
        let secret = secret();
        let port = free_port();
        let mut sp = spec("b", "a", port, &secret, res);
        adjust(&mut sp);
        let (stop, rx) = watch::channel(false);
        Acceptor {
            link: spawn_link(sp, rx),
            port,
            secret,
            _stop: stop,
        }
    }

    /// A raw client connected but not yet authenticated.
    async fn raw(&self) -> Raw {
        Raw::connect(self.port).await
    }

    /// A raw client through the whole handshake with the right secret.
    async fn authenticated(&self) -> Raw {
        Raw::authenticate(self.port, &self.secret).await
    }
}

/// Asserts `f` is an Error frame with `code`.
fn assert_error(f: &Frame, code: u32) {
    assert!(
        matches!(f.msg, Message::Error { code: c, .. } if c == code),
        "expected Error {code}, got {f:?}"
    );
}

#[tokio::test]
async fn handshake_succeeds_and_both_see_each_others_hello() {
    let mut p = pair(md1());
    let (mut sa, mut sb) = p.sessions().await;
    assert_eq!(sa.peer_hello.node_name, "b");
    assert_eq!(sa.peer_hello.role, Role::Standby);
    assert_eq!(sb.peer_hello.node_name, "a");
    assert_eq!(sb.peer_hello.role, Role::Active);
    assert_eq!(sb.peer_hello.resource_name, "md1");
    assert_eq!(sb.peer_hello.generation.current, 7);
    assert!(matches!(p.a.state(), LinkState::Connected { .. }));
    assert!(matches!(p.b.state(), LinkState::Connected { .. }));

    // Data flows both ways; the seq returned is the one on the wire.
    let seq = assert_delivered(&sa, &mut sb, write(4096, b"hello")).await;
    assert_delivered(&sb, &mut sa, Message::Ack1 { seq }).await;
}

#[tokio::test]
async fn control_link_handshake() {
    let mut p = pair(None);
    let (mut sa, mut sb) = p.sessions().await;
    assert_eq!(sa.peer_hello.resource_name, "@control");
    assert_eq!(sb.peer_hello.resource_name, "@control");
    let json = r#"{"cmd":"handover","resource":"md1"}"#.to_string();
    assert_delivered(&sa, &mut sb, Message::Control { json }).await;
    assert_delivered(&sb, &mut sa, Message::Control { json: "{}".into() }).await;
}

#[tokio::test]
async fn control_frame_before_auth_is_refused() {
    let mut b = Acceptor::start(None);
    let mut raw = b.raw().await;
    raw.send(Message::Control { json: "{}".into() }).await;
    let f = raw.recv().await.expect("an Error frame");
    assert_error(&f, error_code::NOT_AUTHENTICATED);
    assert!(raw.recv().await.is_none());
    assert!(b.link.sessions.try_recv().is_err());
}

/// Forwards every connection accepted on `listener` to `target` until `cut` fires, then drops
/// all forwarded connections (a network fault between the nodes).
async fn proxy(listener: tokio::net::TcpListener, target: String, cut: watch::Receiver<u32>) {
    loop {
        let (mut inbound, _) = listener.accept().await.unwrap();
        let mut outbound = TcpStream::connect(&target).await.unwrap();
        let mut conn_cut = cut.clone();
        // Only cuts after this connection was made end it.
        conn_cut.borrow_and_update();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = conn_cut.changed() => {}
            }
        });
    }
}

#[tokio::test]
async fn nodes_connect_through_a_proxy_via_listen_address_and_recover_from_a_cut() {
    // server2 listens on 127.0.0.2 and is reached at 127.0.0.3, where the proxy forwards.
    let dir = tempfile::tempdir().unwrap();
    let (base, proxy_listener) = loop {
        let base = free_ports(2);
        let ok2 = std::net::TcpListener::bind(("127.0.0.2", base + 1)).is_ok();
        if let (true, Ok(l)) = (
            ok2,
            tokio::net::TcpListener::bind(("127.0.0.3", base + 1)).await,
        ) {
            break (base, l);
        }
    };
    let path = ExampleSpec::pair(dir.path(), base).write().unwrap();
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "name = \"server2\"\naddress = \"127.0.0.1\"",
        "name = \"server2\"\naddress = \"127.0.0.3\"\nlisten_address = \"127.0.0.2\"",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let mut c = Config::load(&path).unwrap();
    c.timeouts = timeouts();
    let s = c.read_secret().unwrap();
    let st = || spec("a", "b", 0, &s, None).hello_state;
    let s1 = LinkSpec::control(&c, "server1", s.clone(), st()).unwrap();
    let s2 = LinkSpec::control(&c, "server2", s.clone(), st()).unwrap();
    assert_eq!(s1.peer_addr, format!("127.0.0.3:{}", base + 1));
    assert_eq!(s2.listen_addr, format!("127.0.0.2:{}", base + 1));
    let (cut_tx, cut_rx) = watch::channel(0u32);
    tokio::spawn(proxy(proxy_listener, s2.listen_addr.clone(), cut_rx));

    let mut p = Pair::start(s1, s2);
    let (a, b) = p.sessions().await;
    assert_eq!(a.peer_hello.node_name, "server2");
    assert_eq!(b.peer_hello.node_name, "server1");
    // The dialer reached the acceptor through the proxy address.
    assert_eq!(a.peer_addr.ip().to_string(), "127.0.0.3");

    cut_tx.send_modify(|n| *n += 1);
    for r in [closed_reason(&a).await, closed_reason(&b).await] {
        assert!(
            // A cut shows as EOF, as a reset (the proxy's socket closed with
            // data in flight) or, if neither arrives, as silence.
            r.contains("closed the connection")
                || r.contains("Connection reset")
                || r.contains("silent"),
            "{r}"
        );
    }
    // The dialer redials through the proxy; both get a fresh session.
    let (a2, _b2) = p.sessions().await;
    assert!(a2.closed.reason().is_none());
}

#[tokio::test]
async fn wrong_secret_is_refused_by_both_and_no_session_delivered() {
    let port = free_port();
    let mut p = Pair::start(
        spec("a", "b", port, &secret(), md1()),
        spec("b", "a", port, &secret(), md1()),
    );
    let (ra, rb) = p.refused_without_sessions().await;
    assert!(rb.contains("secret") && rb.contains("127.0.0.1"), "{rb}");
    assert!(ra.contains("secret") && ra.contains("127.0.0.1"), "{ra}");
}

/// Links "a" and "b" for md1 (same port and secret), made to differ by `mismatch`, are both
/// refused: b names `field` with what it expected and what it got, and a learns the same from
/// b's Error frame.
async fn refused_naming(
    field: &str,
    expected: &str,
    got: &str,
    mismatch: impl FnOnce(&mut LinkSpec, &mut LinkSpec),
) {
    let s = secret();
    let port = free_port();
    let mut a_spec = spec("a", "b", port, &s, md1());
    let mut b_spec = spec("b", "a", port, &s, md1());
    mismatch(&mut a_spec, &mut b_spec);
    let mut p = Pair::start(a_spec, b_spec);
    let want = format!("{field}: expected {expected}, got {got}");
    let (ra, rb) = p.refused_without_sessions().await;
    assert!(
        rb.contains(&want) && rb.starts_with("refused peer 127.0.0.1:"),
        "{rb} / {want}"
    );
    // The dialer learns why from the Error frame.
    assert!(
        ra.contains(&want) && ra.contains("error 4"),
        "{ra} / {want}"
    );
}

/// The spec's resource (md1 unless changed).
fn resource(sp: &mut LinkSpec) -> &mut ResourceSpec {
    sp.resource.as_mut().unwrap()
}

#[tokio::test]
async fn config_mismatches_are_refused_naming_the_field() {
    refused_naming("cluster name", "demo", "other", |a, _| {
        a.cluster = "other".into()
    })
    .await;
    // b expects a peer called "a2" (still sorting lower, so b still accepts).
    refused_naming("node name", "a2", "a", |_, b| b.peer_node = "a2".into()).await;
    refused_naming("resource name", "md1", "md2", |a, _| {
        resource(a).name = "md2".into()
    })
    .await;
    refused_naming(
        "volume size",
        &(1u64 << 30).to_string(),
        &(1u64 << 20).to_string(),
        |a, _| resource(a).volume_size = 1 << 20,
    )
    .await;
    refused_naming("region size", "65536", "4096", |a, _| {
        resource(a).region_size = 4096
    })
    .await;
    // A control link dialing a data port.
    refused_naming("resource name", "md1", "@control", |a, _| a.resource = None).await;
}

/// A hand-driven client playing node "a".
struct Raw {
    s: TcpStream,
    tx_seq: u64,
    buf: BytesMut,
    dec: Decoder,
}

impl Raw {
    async fn connect(port: u16) -> Raw {
        let deadline = Instant::now() + WAIT;
        loop {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => {
                    return Raw {
                        s,
                        tx_seq: 1,
                        buf: BytesMut::new(),
                        dec: Decoder::new(),
                    }
                }
                Err(e) if Instant::now() < deadline => {
                    // The acceptor's listener is not bound yet: wait for it.
                    let _ = e;
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
    }

    async fn send(&mut self, msg: Message) -> u64 {
        let seq = self.tx_seq;
        self.tx_seq += 1;
        let b = Frame::new(seq, msg).to_bytes().unwrap();
        self.s.write_all(&b).await.unwrap();
        seq
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Next frame, or None at EOF.
    async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            let n = tokio::time::timeout(WAIT, self.s.read_buf(&mut self.buf))
                .await
                .expect("raw read timed out")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Next frame that is not a heartbeat.
    async fn recv_non_ping(&mut self) -> Option<Frame> {
        loop {
            match self.recv().await {
                Some(Frame {
                    msg: Message::Ping { .. } | Message::Pong { .. },
                    ..
                }) => {}
                other => return other,
            }
        }
    }

    /// Full initiator handshake as node "a" with `secret`.
    async fn authenticate(port: u16, secret: &Secret) -> Raw {
        Raw::connect(port).await.handshake(secret).await
    }

    /// The initiator handshake as node "a" with `secret` on this connection.
    async fn handshake(self, secret: &Secret) -> Raw {
        let mut r = self;
        r.send(Message::Hello(hello("a", "demo", "md1", 1 << 30, 64 << 10)))
            .await;
        let Some(Frame {
            msg: Message::Hello(h),
            ..
        }) = r.recv().await
        else {
            panic!("no Hello")
        };
        assert_eq!(h.node_name, "b");
        let my_nonce = [7u8; 32];
        r.send(Message::AuthChallenge { nonce: my_nonce }).await;
        let Some(Frame {
            msg: Message::AuthChallenge { nonce: their },
            ..
        }) = r.recv().await
        else {
            panic!("no challenge")
        };
        let mac = compute_response(
            secret.as_bytes(),
            &Transcript {
                version: 1,
                direction: Direction::InitiatorToAcceptor,
                responder_name: "a",
                verifier_name: "b",
                verifier_nonce: &their,
                responder_nonce: &my_nonce,
            },
        );
        r.send(Message::AuthResponse { mac }).await;
        let f = r.recv().await.unwrap();
        assert_eq!(f.msg, Message::AuthResult { accepted: true });
        let Some(Frame {
            msg: Message::AuthResponse { mac },
            ..
        }) = r.recv().await
        else {
            panic!("no response")
        };
        assert!(verify_response(
            secret.as_bytes(),
            &Transcript {
                version: 1,
                direction: Direction::AcceptorToInitiator,
                responder_name: "b",
                verifier_name: "a",
                verifier_nonce: &my_nonce,
                responder_nonce: &their,
            },
            &mac
        ));
        r.send(Message::AuthResult { accepted: true }).await;
        r
    }
}

#[tokio::test]
async fn data_frame_before_auth_is_refused_and_nothing_delivered() {
    for after_hello in [false, true] {
        let mut b = Acceptor::start(md1());
        let mut raw = b.raw().await;
        if after_hello {
            raw.send(Message::Hello(hello("a", "demo", "md1", 1 << 30, 64 << 10)))
                .await;
            let f = raw.recv().await.unwrap();
            assert_eq!(f.msg.kind(), MessageKind::Hello);
        }
        raw.send(write(0, &[0xAB; 4096])).await;
        let f = raw.recv().await.expect("an Error frame");
        assert_error(&f, error_code::NOT_AUTHENTICATED);
        assert!(raw.recv().await.is_none(), "connection must be closed");
        let reason = wait_refused(&b.link).await;
        assert!(reason.contains("before authentication"), "{reason}");
        assert!(b.link.sessions.try_recv().is_err());
    }
}

#[tokio::test]
async fn oversized_data_frame_before_auth_is_refused_from_its_header() {
    // Only the 28-byte header is sent: the refusal must not wait for the 32 MiB payload.
    let mut b = Acceptor::start(md1());
    let mut raw = b.raw().await;
    let mut hdr = BytesMut::new();
    let f = Frame::new(1, write(0, &vec![1u8; 32 << 20]));
    let tail = f.encode_vectored(&mut hdr).unwrap();
    assert!(tail.is_some());
    raw.send_raw(&hdr[..HEADER_LEN]).await;
    let f = raw.recv().await.expect("an Error frame");
    assert_error(&f, error_code::NOT_AUTHENTICATED);
    assert!(b.link.sessions.try_recv().is_err());
}

/// Authenticates a raw client, sends one good Write, then `bad`; checks the good one is
/// delivered, the bad one is not, and the session closes with a reason containing `want`.
async fn bad_frame_closes_link(bad: impl FnOnce(u64) -> Vec<u8>, want: &str) {
    let mut b = Acceptor::start(md1());
    let mut raw = b.authenticated().await;
    let mut sb = next_session(&mut b.link).await;
    let good = raw.send(write(0, b"good")).await;
    let bad_bytes = bad(raw.tx_seq);
    raw.send_raw(&bad_bytes).await;
    let f = recv_frame(&mut sb).await;
    assert_eq!((f.seq, f.msg), (good, write(0, b"good")));
    let reason = closed_reason(&sb).await;
    assert!(reason.contains(want), "reason {reason:?} lacks {want:?}");
    // Nothing else was delivered.
    assert_no_more_frames(&mut sb).await;
    // The peer got an Error(PROTOCOL) and the connection ends.
    let f = raw.recv_non_ping().await.expect("Error frame");
    assert_error(&f, error_code::PROTOCOL);
    assert!(raw.recv_non_ping().await.is_none());
}

fn encoded(seq: u64, msg: Message) -> Vec<u8> {
    Frame::new(seq, msg).to_bytes().unwrap().to_vec()
}

/// An encoded Write of "evil" with `seq`, then damaged by `damage`.
fn damaged_write(seq: u64, damage: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = encoded(seq, write(0, b"evil"));
    damage(&mut v);
    v
}

fn reseal_header(v: &mut [u8]) {
    let crc = crc32fast::hash(&v[..24]);
    v[24..28].copy_from_slice(&crc.to_le_bytes());
}

#[tokio::test]
async fn bad_header_crc_closes_link() {
    bad_frame_closes_link(
        |seq| damaged_write(seq, |v| v[25] ^= 0xFF),
        "header checksum mismatch",
    )
    .await;
}

#[tokio::test]
async fn bad_payload_crc_closes_link() {
    bad_frame_closes_link(
        |seq| {
            damaged_write(seq, |v| {
                let last = v.len() - 1;
                v[last] ^= 0xFF;
            })
        },
        "payload checksum mismatch",
    )
    .await;
}

#[tokio::test]
async fn bad_magic_closes_link() {
    bad_frame_closes_link(|seq| damaged_write(seq, |v| v[0] = b'X'), "bad frame magic").await;
}

#[tokio::test]
async fn oversized_length_closes_link() {
    bad_frame_closes_link(
        |seq| {
            let h = Header {
                version: 1,
                kind: MessageKind::Ping,
                flags: 0,
                seq,
                payload_len: 16,
                payload_crc: 0,
            };
            let mut v = h.to_bytes().to_vec();
            v[16..20].copy_from_slice(&17u32.to_le_bytes());
            reseal_header(&mut v);
            v
        },
        "exceeds the maximum",
    )
    .await;
}

#[tokio::test]
async fn unknown_kind_closes_link() {
    bad_frame_closes_link(
        |seq| {
            let mut v = encoded(seq, Message::Flush);
            v[5] = 0x7F;
            reseal_header(&mut v);
            v
        },
        "unknown message kind 0x7f",
    )
    .await;
}

#[tokio::test]
async fn wrong_seq_closes_link() {
    bad_frame_closes_link(
        |seq| encoded(seq + 5, write(0, b"evil")),
        "wrong sequence number",
    )
    .await;
}

#[tokio::test]
async fn heartbeat_keeps_an_idle_link_up() {
    let mut p = pair(md1());
    let (sa, sb) = p.sessions().await;
    // Idle for three heartbeat timeouts: Ping/Pong keep both sides alive.
    let closed = tokio::time::timeout(HB_TIMEOUT * 3, async {
        tokio::select! { r = sa.closed.wait() => r, r = sb.closed.wait() => r }
    })
    .await;
    assert!(closed.is_err(), "link closed while idle: {closed:?}");
    assert!(sa.closed.reason().is_none() && sb.closed.reason().is_none());
}

#[tokio::test]
async fn silent_peer_is_closed_after_heartbeat_timeout() {
    let mut b = Acceptor::start(md1());
    let raw = b.authenticated().await;
    let sb = next_session(&mut b.link).await;
    let t0 = Instant::now();
    let reason = closed_reason(&sb).await;
    let took = t0.elapsed();
    assert!(reason.contains("peer silent for 0.500 s"), "{reason}");
    assert!(took >= HB_TIMEOUT - Duration::from_millis(50), "{took:?}");
    assert!(took < HB_TIMEOUT * 4, "{took:?}");
    assert!(matches!(
        b.link.state(),
        LinkState::Connecting | LinkState::Connected { .. }
    ));
    drop(raw);
}

#[tokio::test]
async fn dialer_reconnects_after_the_acceptor_drops_its_session() {
    let s = secret();
    let port = free_port();
    // a's Hello state changes between connections: each Hello must be fresh.
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(100));
    let mut a_spec = spec("a", "b", port, &s, md1());
    let c = counter.clone();
    a_spec.hello_state = Arc::new(move || HelloState {
        role: Role::Active,
        disk_state: DiskState::UpToDate,
        generation: Generation {
            current: c.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            bitmap: 0,
            history: vec![],
        },
        features: Features::empty(),
    });
    let mut p = Pair::start(a_spec, spec("b", "a", port, &s, md1()));
    let (sa, sb) = p.sessions().await;
    let first_gen = sb.peer_hello.generation.current;
    drop(sb);
    let reason = closed_reason(&sa).await;
    assert!(reason.contains("goodbye"), "{reason}");
    let (mut sa2, sb2) = p.sessions().await;
    assert!(sb2.peer_hello.generation.current > first_gen);
    assert_delivered(&sb2, &mut sa2, Message::Flush).await;
}

#[tokio::test]
async fn newer_connection_replaces_the_old_session() {
    let mut b = Acceptor::start(md1());
    let mut raw1 = b.authenticated().await;
    let sb1 = next_session(&mut b.link).await;
    let _raw2 = b.authenticated().await;
    let _sb2 = next_session(&mut b.link).await;
    let reason = closed_reason(&sb1).await;
    assert!(
        reason.contains("replaced by a newer connection"),
        "{reason}"
    );
    let f = raw1.recv_non_ping().await.expect("Goodbye");
    assert!(matches!(f.msg, Message::Goodbye { .. }), "{f:?}");
}

/// Handshakes finish in any order; an older connection whose handshake ends after a newer
/// one's is not used (CI saw it replace the newer session under load).
#[tokio::test]
async fn an_older_connection_finishing_late_does_not_replace_the_newer_session() {
    let mut b = Acceptor::start(md1());
    // Accepted first (the listener's queue is FIFO), but its handshake waits.
    let older = b.raw().await;
    let mut newer = b.authenticated().await;
    let mut sb = next_session(&mut b.link).await;
    let mut older = older.handshake(&b.secret).await;
    let f = older.recv_non_ping().await;
    assert!(
        matches!(
            &f,
            Some(Frame {
                msg: Message::Goodbye { .. },
                ..
            })
        ),
        "the older connection got {f:?}; the newer session: {:?}",
        sb.closed.reason()
    );
    assert!(
        older.recv_non_ping().await.is_none(),
        "closed after Goodbye"
    );
    // The link decided before the Goodbye went out: nothing new, the newer session lives.
    assert!(
        b.link.sessions.try_recv().is_err(),
        "the older session was delivered"
    );
    assert!(sb.closed.reason().is_none(), "{:?}", sb.closed.reason());
    let seq = newer.send(Message::Flush).await;
    let got = sb.rx.recv().await.expect("frame on the newer session");
    assert_eq!((got.seq, got.msg), (seq, Message::Flush));
}

#[tokio::test]
async fn shutdown_closes_the_session_with_goodbye() {
    let mut p = pair(md1());
    let (sa, sb) = p.sessions().await;
    p.stop.send_replace(true);
    for s in [&sa, &sb] {
        // Both stop at once: each side either closes itself first or sees the peer's Goodbye.
        let r = closed_reason(s).await;
        assert!(
            r == "shutting down" || r.contains("peer said goodbye"),
            "{r}"
        );
    }
    tokio::time::timeout(WAIT, async {
        while !(p.a.is_finished() && p.b.is_finished()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("link tasks end after shutdown");
}

/// Link "b" with the given receive (frame) timeout, a raw authenticated peer "a" talking to
/// it, and b's session.
async fn raw_peer_session(receive: Duration) -> (Raw, Session, Acceptor) {
    let mut b = Acceptor::start_with(md1(), |sp| {
        sp.timeouts.receive = receive;
        sp.timeouts.heartbeat_timeout = Duration::from_secs(5);
    });
    let raw = b.authenticated().await;
    let sb = next_session(&mut b.link).await;
    (raw, sb, b)
}

#[tokio::test]
async fn frame_left_incomplete_is_closed_after_the_receive_timeout() {
    let (mut raw, mut sb, _link) = raw_peer_session(Duration::from_millis(200)).await;
    let seq = raw.tx_seq;
    let v = encoded(seq, write(0, &[1u8; 100]));
    raw.send_raw(&v[..HEADER_LEN + 10]).await;
    let t0 = Instant::now();
    let reason = closed_reason(&sb).await;
    assert!(reason.contains("frame incomplete for 0.200 s"), "{reason}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_no_more_frames(&mut sb).await;
}

/// Big frames are received with `SO_RCVLOWAT` raised to what they still need: a frame that
/// arrives in pieces is still delivered once complete, and one left incomplete still ends
/// the session after the receive timeout (the raised mark never hides the stall).
#[tokio::test]
async fn big_frames_arriving_in_pieces_are_delivered_and_a_stalled_one_times_out() {
    let (mut raw, mut sb, _link) = raw_peer_session(Duration::from_millis(500)).await;
    let data: Vec<u8> = (0..900_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let seq = raw.tx_seq;
    let v = encoded(seq, write(1 << 20, &data));
    for piece in v.chunks(200_000) {
        raw.send_raw(piece).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let f = recv_frame(&mut sb).await;
    assert_eq!(f.seq, seq);
    let Message::Write {
        offset, data: got, ..
    } = f.msg
    else {
        panic!("unexpected {:?}", f.msg.kind())
    };
    assert_eq!(offset, 1 << 20);
    assert_eq!(&got[..], &data[..]);
    // The next big frame stops after 300 KB (the reader's mark is then 1 MiB).
    let v = encoded(seq + 1, write(0, &data));
    raw.send_raw(&v[..300_000]).await;
    let t0 = Instant::now();
    let reason = closed_reason(&sb).await;
    assert!(reason.contains("frame incomplete for 0.500 s"), "{reason}");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
}

/// The ports these tests use are below the kernel's ephemeral range, where outgoing
/// connections take their source ports (uniqueness within a process: the unit tests of
/// `config::free_loopback_ports`). A CI failure came from a test's port taken meanwhile.
#[test]
fn test_ports_are_outside_the_ephemeral_range() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let ephemeral_low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    for _ in 0..20 {
        let base = free_ports(4);
        assert!(base + 3 < ephemeral_low, "{base} against {range}");
    }
}
