//! Shared helpers for the peer link integration tests (`peer_link`, `peer_tls`): test
//! timeouts, free ports, a pair of links started as two nodes start them, and waits that fail
//! the test after `WAIT` instead of hanging.
//!
//! In both tests the node whose name sorts lower ("a", "alpha") dials and the other ("b",
//! "beta") accepts.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use mirror_agent::config::Timeouts;
use mirror_agent::peer::{spawn_link, LinkHandle, LinkSpec, LinkState, Session};
use mirror_proto::{Frame, Message};
use tokio::sync::watch;

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Short link timeouts (3 s; heartbeat every 100 ms) with the given heartbeat timeout.
pub fn timeouts(heartbeat_timeout: Duration) -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(3),
        send: Duration::from_secs(3),
        ack: Duration::from_secs(3),
        receive: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout,
        ..Timeouts::default()
    }
}

/// A TCP port on 127.0.0.1, free when checked; see [`free_ports`].
pub fn free_port() -> u16 {
    free_ports(1)
}

/// `n` consecutive TCP ports on 127.0.0.1 no other test of this process was given, below
/// the ephemeral range ([`mirror_agent::config::free_loopback_ports`], 10000-15999).
pub fn free_ports(n: u16) -> u16 {
    mirror_agent::config::free_loopback_ports(10_000..16_000, n).unwrap_or_else(|e| panic!("{e}"))
}

/// A Write of a copy of `data` at `offset`.
pub fn write(offset: u64, data: &[u8]) -> Message {
    write_bytes(offset, Bytes::copy_from_slice(data))
}

/// A Write of `data` at `offset` (no copy).
pub fn write_bytes(offset: u64, data: Bytes) -> Message {
    Message::Write {
        offset,
        fua: false,
        data,
    }
}

/// The link's next session.
pub async fn next_session(h: &mut LinkHandle) -> Session {
    tokio::time::timeout(WAIT, h.sessions.recv())
        .await
        .expect("no session within the wait")
        .expect("link ended")
}

/// Waits until the link's latest attempt was refused; returns why.
pub async fn wait_refused(h: &LinkHandle) -> String {
    let mut w = h.state_watch();
    let st = tokio::time::timeout(WAIT, w.wait_for(|s| matches!(s, LinkState::Refused { .. })))
        .await
        .expect("not refused within the wait")
        .unwrap()
        .clone();
    match st {
        LinkState::Refused { reason } => reason,
        _ => unreachable!(),
    }
}

/// The next frame the session delivers.
pub async fn recv_frame(s: &mut Session) -> Frame {
    tokio::time::timeout(WAIT, s.rx.recv())
        .await
        .expect("no frame within the wait")
        .expect("session delivered no more frames")
}

/// Asserts the session delivers no further frame: its receiver ends.
pub async fn assert_no_more_frames(s: &mut Session) {
    let next = tokio::time::timeout(WAIT, s.rx.recv())
        .await
        .expect("receiver did not end within the wait");
    assert!(next.is_none(), "unexpected frame {next:?}");
}

/// Why the session closed.
pub async fn closed_reason(s: &Session) -> String {
    tokio::time::timeout(WAIT, s.closed.wait())
        .await
        .expect("session not closed within the wait")
}

/// Sends `msg` on `from` and asserts `to` receives exactly it, with the seq the send returned
/// (the one on the wire); returns that seq.
pub async fn assert_delivered(from: &Session, to: &mut Session, msg: Message) -> u64 {
    let seq = from.tx.send(msg.clone()).await.unwrap();
    let f = recv_frame(to).await;
    assert_eq!((f.seq, f.msg), (seq, msg));
    seq
}

/// Two links started as the nodes start them: the acceptor `b` first, then the dialer `a`.
/// Both run until `stop` is set or the pair is dropped.
pub struct Pair {
    /// The dialer's link.
    pub a: LinkHandle,
    /// The acceptor's link.
    pub b: LinkHandle,
    /// Set to true to shut both links down.
    pub stop: watch::Sender<bool>,
}

impl Pair {
    pub fn start(a: LinkSpec, b: LinkSpec) -> Pair {
        let (stop, rx) = watch::channel(false);
        let b = spawn_link(b, rx.clone());
        let a = spawn_link(a, rx);
        Pair { a, b, stop }
    }

    /// The next session of each link: (a's, b's).
    pub async fn sessions(&mut self) -> (Session, Session) {
        let sa = next_session(&mut self.a).await;
        let sb = next_session(&mut self.b).await;
        (sa, sb)
    }

    /// Waits until both links were refused and returns why (a's, b's); asserts that neither
    /// link delivered a session.
    pub async fn refused_without_sessions(&mut self) -> (String, String) {
        let (ra, rb) = tokio::join!(wait_refused(&self.a), wait_refused(&self.b));
        eprintln!("a refused: {ra}\nb refused: {rb}");
        assert!(self.a.sessions.try_recv().is_err(), "a got a session");
        assert!(self.b.sessions.try_recv().is_err(), "b got a session");
        (ra, rb)
    }
}
