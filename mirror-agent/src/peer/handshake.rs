//! Session handshake and mutual authentication (`docs/protocol.md` §8.1).
//!
//! Before authentication only the handshake kinds are read; any other kind is refused from its
//! 28-byte header alone (Error `NOT_AUTHENTICATED`, close) so that no payload of an
//! unauthenticated peer is buffered, let alone delivered (design property 9).

use bytes::BytesMut;
use mirror_proto::auth::{compute_response, verify_response, Direction, Transcript};
use mirror_proto::{
    error_code, negotiate_version, Decoder, Frame, Header, Hello, Message, MessageKind, HEADER_LEN,
    MAC_LEN, NONCE_LEN, SUPPORTED_VERSIONS,
};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{LinkError, LinkSpec, CONTROL_REGION_SIZE, CONTROL_VOLUME_SIZE};

/// Which end of the TCP connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// We connected.
    Initiator,
    /// We accepted.
    Acceptor,
}

/// The outcome of a successful handshake: what the session continues with.
#[derive(Debug)]
pub(crate) struct Established {
    pub peer_hello: Hello,
    /// Seq of our next frame.
    pub next_tx_seq: u64,
    /// Seq the peer's next frame must carry.
    pub next_rx_seq: u64,
    /// Bytes already read past the handshake (start of the first session frame).
    pub buf: BytesMut,
}

/// Frame I/O during the handshake: sequence numbers in both directions, refusal of
/// non-handshake kinds.
struct HsIo<'a, S> {
    stream: &'a mut S,
    peer: &'a str,
    buf: BytesMut,
    decoder: Decoder,
    tx_seq: u64,
    rx_seq: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HsIo<'_, S> {
    /// Receive the peer's AuthResponse for `transcript` and answer with
    /// AuthResult; a wrong one is refused (Error `AUTH_FAILED`, close).
    async fn verify_and_answer(
        &mut self,
        secret: &[u8],
        transcript: &Transcript<'_>,
    ) -> Result<(), LinkError> {
        let their_mac = self.recv_response().await?;
        if !verify_response(secret, transcript, &their_mac) {
            let _ = self.send(Message::AuthResult { accepted: false }).await;
            let err = LinkError::AuthFailed {
                peer: self.peer.to_string(),
            };
            let msg = "authentication failed: the shared secrets differ".to_string();
            return Err(self.refuse(error_code::AUTH_FAILED, msg, err).await);
        }
        self.send(Message::AuthResult { accepted: true }).await
    }

    /// Steps 5+6a (initiator) or 6b+7 (acceptor): send our AuthResponse for
    /// `transcript`, then wait for the peer's AuthResult on it.
    async fn respond_and_await_result(
        &mut self,
        secret: &[u8],
        transcript: &Transcript<'_>,
    ) -> Result<(), LinkError> {
        let mac = compute_response(secret, transcript);
        self.send(Message::AuthResponse { mac }).await?;
        let rejected = || LinkError::AuthRejected {
            peer: self.peer.to_string(),
        };
        match self.recv().await {
            Ok(Message::AuthResult { accepted: true }) => Ok(()),
            Ok(Message::AuthResult { accepted: false }) => Err(rejected()),
            Err(LinkError::PeerError { code, .. }) if code == error_code::AUTH_FAILED => {
                Err(rejected())
            }
            Err(e) => Err(e),
            Ok(m) => Err(self.unexpected("AuthResult", m.kind()).await),
        }
    }

    async fn send(&mut self, msg: Message) -> Result<(), LinkError> {
        let frame = Frame::new(self.tx_seq, msg);
        self.tx_seq += 1;
        let bytes = frame.to_bytes().map_err(|e| LinkError::Protocol {
            peer: self.peer.to_string(),
            detail: format!("cannot encode our own {:?}: {e}", frame.msg.kind()),
        })?;
        let io = |source| LinkError::Io {
            op: "write to",
            addr: self.peer.to_string(),
            source,
        };
        self.stream.write_all(&bytes).await.map_err(io)?;
        // A TLS stream may keep records buffered until flushed (a no-op on a TcpStream);
        // the peer must see each handshake frame before we wait for its answer.
        self.stream.flush().await.map_err(io)
    }

    /// Sends an Error frame (best effort) and returns `err`.
    async fn refuse(&mut self, code: u32, message: String, err: LinkError) -> LinkError {
        let mut message = message;
        truncate_utf8(&mut message, mirror_proto::MAX_ERROR_MESSAGE_LEN);
        let _ = self.send(Message::Error { code, message }).await;
        let _ = self.stream.flush().await;
        let _ = self.stream.shutdown().await;
        err
    }

    async fn recv(&mut self) -> Result<Message, LinkError> {
        loop {
            if self.buf.len() >= HEADER_LEN {
                // Look at the header before buffering any payload: a non-handshake kind is
                // refused here, whatever its length.
                if let Ok(h) = Header::decode(&self.buf[..HEADER_LEN]) {
                    if !h.kind.allowed_before_auth() {
                        let e = LinkError::NotAuthenticated {
                            peer: self.peer.to_string(),
                            kind: h.kind,
                        };
                        let msg = format!("{:?} frame before authentication", h.kind);
                        return Err(self.refuse(error_code::NOT_AUTHENTICATED, msg, e).await);
                    }
                }
            }
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    if frame.seq != self.rx_seq {
                        let detail = format!(
                            "wrong sequence number: expected {}, got {}",
                            self.rx_seq, frame.seq
                        );
                        let e = LinkError::Protocol {
                            peer: self.peer.to_string(),
                            detail: detail.clone(),
                        };
                        return Err(self.refuse(error_code::PROTOCOL, detail, e).await);
                    }
                    self.rx_seq += 1;
                    return match frame.msg {
                        Message::Error { code, message } => Err(LinkError::PeerError {
                            peer: self.peer.to_string(),
                            code,
                            message,
                        }),
                        Message::Goodbye { .. } => Err(LinkError::Closed {
                            peer: self.peer.to_string(),
                        }),
                        m => Ok(m),
                    };
                }
                Ok(None) => {}
                Err(pe) => {
                    let detail = pe.to_string();
                    let e = LinkError::Protocol {
                        peer: self.peer.to_string(),
                        detail: detail.clone(),
                    };
                    return Err(self.refuse(error_code::PROTOCOL, detail, e).await);
                }
            }
            let want = self.decoder.needed().clamp(1, 64 << 10);
            self.buf.reserve(want);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|source| LinkError::Io {
                    op: "read from",
                    addr: self.peer.to_string(),
                    source,
                })?;
            if n == 0 {
                return Err(LinkError::Closed {
                    peer: self.peer.to_string(),
                });
            }
        }
    }

    async fn unexpected(&mut self, expected: &'static str, got: MessageKind) -> LinkError {
        let e = LinkError::UnexpectedMessage {
            peer: self.peer.to_string(),
            expected,
            got,
        };
        let msg = format!("unexpected {got:?} during the handshake, expected {expected}");
        self.refuse(error_code::UNEXPECTED_MESSAGE, msg, e).await
    }

    async fn recv_hello(&mut self) -> Result<Hello, LinkError> {
        match self.recv().await? {
            Message::Hello(h) => Ok(h),
            m => Err(self.unexpected("Hello", m.kind()).await),
        }
    }

    async fn recv_challenge(&mut self) -> Result<[u8; NONCE_LEN], LinkError> {
        match self.recv().await? {
            Message::AuthChallenge { nonce } => Ok(nonce),
            m => Err(self.unexpected("AuthChallenge", m.kind()).await),
        }
    }

    async fn recv_response(&mut self) -> Result<[u8; MAC_LEN], LinkError> {
        match self.recv().await? {
            Message::AuthResponse { mac } => Ok(mac),
            m => Err(self.unexpected("AuthResponse", m.kind()).await),
        }
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Our Hello for `spec`, with the state read now.
pub(crate) fn local_hello(spec: &LinkSpec) -> Hello {
    let st = (spec.hello_state)();
    let (volume_size, region_size) = spec
        .resource
        .as_ref()
        .map_or((CONTROL_VOLUME_SIZE, CONTROL_REGION_SIZE), |r| {
            (r.volume_size, r.region_size)
        });
    Hello {
        versions: SUPPORTED_VERSIONS.to_vec(),
        node_name: spec.local_node.clone(),
        cluster_name: spec.cluster.clone(),
        resource_name: spec.resource_name().to_string(),
        volume_size,
        region_size,
        role: st.role,
        disk_state: st.disk_state,
        features: st.features,
        generation: st.generation,
    }
}

/// Checks the peer's Hello against `spec`; `Err` = (field, expected, got).
fn validate_hello(spec: &LinkSpec, h: &Hello) -> Result<(), (&'static str, String, String)> {
    let cmp = |field: &'static str, expected: String, got: String| {
        if expected == got {
            Ok(())
        } else {
            Err((field, expected, got))
        }
    };
    cmp("cluster name", spec.cluster.clone(), h.cluster_name.clone())?;
    cmp("node name", spec.peer_node.clone(), h.node_name.clone())?;
    cmp(
        "resource name",
        spec.resource_name().to_string(),
        h.resource_name.clone(),
    )?;
    if let Some(r) = &spec.resource {
        cmp(
            "volume size",
            r.volume_size.to_string(),
            h.volume_size.to_string(),
        )?;
        cmp(
            "region size",
            r.region_size.to_string(),
            h.region_size.to_string(),
        )?;
    }
    Ok(())
}

/// Runs the handshake of §8.1 on `stream` as `side`. The caller applies the timeout.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    side: Side,
    spec: &LinkSpec,
    peer: &str,
) -> Result<Established, LinkError> {
    let mut io = HsIo {
        stream,
        peer,
        buf: BytesMut::with_capacity(4096),
        decoder: Decoder::new(),
        tx_seq: 1,
        rx_seq: 1,
    };
    let ours = local_hello(spec);
    // Steps 1–2: the initiator's Hello first; the acceptor checks it before answering.
    let theirs = match side {
        Side::Initiator => {
            io.send(Message::Hello(ours.clone())).await?;
            io.recv_hello().await?
        }
        Side::Acceptor => io.recv_hello().await?,
    };
    if let Err((field, expected, got)) = validate_hello(spec, &theirs) {
        let msg = format!("{field}: expected {expected}, got {got}");
        let e = LinkError::ConfigMismatch {
            peer: peer.to_string(),
            field,
            expected,
            got,
        };
        return Err(io.refuse(error_code::CONFIG_MISMATCH, msg, e).await);
    }
    let Some(version) = negotiate_version(SUPPORTED_VERSIONS, &theirs.versions) else {
        let e = LinkError::VersionMismatch {
            peer: peer.to_string(),
            ours: SUPPORTED_VERSIONS.to_vec(),
            theirs: theirs.versions.clone(),
        };
        let msg = format!(
            "no common protocol version: ours {:?}, yours {:?}",
            SUPPORTED_VERSIONS, theirs.versions
        );
        return Err(io.refuse(error_code::VERSION_MISMATCH, msg, e).await);
    };
    if side == Side::Acceptor {
        io.send(Message::Hello(ours.clone())).await?;
    }

    let mut my_nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut my_nonce);
    let secret = spec.secret.as_bytes();
    let me = spec.local_node.as_str();
    let them = theirs.node_name.as_str();
    let (my_dir, their_dir) = match side {
        Side::Initiator => (
            Direction::InitiatorToAcceptor,
            Direction::AcceptorToInitiator,
        ),
        Side::Acceptor => (
            Direction::AcceptorToInitiator,
            Direction::InitiatorToAcceptor,
        ),
    };
    // 3, 4: the initiator's challenge goes first.
    let their_nonce = match side {
        Side::Initiator => {
            io.send(Message::AuthChallenge { nonce: my_nonce }).await?;
            io.recv_challenge().await?
        }
        Side::Acceptor => {
            let n = io.recv_challenge().await?;
            io.send(Message::AuthChallenge { nonce: my_nonce }).await?;
            n
        }
    };
    let ours_t = Transcript {
        version,
        direction: my_dir,
        responder_name: me,
        verifier_name: them,
        verifier_nonce: &their_nonce,
        responder_nonce: &my_nonce,
    };
    let theirs_t = Transcript {
        version,
        direction: their_dir,
        responder_name: them,
        verifier_name: me,
        verifier_nonce: &my_nonce,
        responder_nonce: &their_nonce,
    };
    match side {
        Side::Initiator => {
            // 5, 6a, then 6b, 7
            io.respond_and_await_result(secret, &ours_t).await?;
            io.verify_and_answer(secret, &theirs_t).await?;
        }
        Side::Acceptor => {
            // 5, 6a — never answer with our own response to an unverified peer — then 6b
            io.verify_and_answer(secret, &theirs_t).await?;
            io.respond_and_await_result(secret, &ours_t).await?;
        }
    }
    io.stream.flush().await.map_err(|source| LinkError::Io {
        op: "write to",
        addr: peer.to_string(),
        source,
    })?;
    Ok(Established {
        peer_hello: theirs,
        next_tx_seq: io.tx_seq,
        next_rx_seq: io.rx_seq,
        buf: io.buf,
    })
}
