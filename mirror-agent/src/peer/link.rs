//! Connection management: one long-lived task per link that dials or accepts (per the dialing
//! rule in the module doc of [`crate::peer`]), authenticates, hands each new [`Session`] to the
//! owner and starts over when it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use super::handshake::{handshake, Side};
use super::session::{self, CloseWatch, Session, SessionSender};
use super::{tls, LinkError, LinkSpec};

/// First retry delay after a failed dial; doubled per failure up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Largest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Handshakes an acceptor runs at once; further connections are dropped until one ends
/// (each is bounded by `timeouts.connect` and by the small pre-auth frame sizes).
pub const MAX_PENDING_HANDSHAKES: usize = 16;

/// What a link is doing, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Dialing / waiting for the peer to connect.
    Connecting,
    /// A session is up.
    Connected {
        /// The peer's socket address.
        peer_addr: SocketAddr,
        /// When the session was established.
        since: SystemTime,
    },
    /// The last attempt was refused for configuration or secret reasons (retried anyway,
    /// since the peer may be reconfigured), or the listener cannot bind.
    Refused {
        /// Why, naming the peer and the field / the secret.
        reason: String,
    },
}

/// The owner's side of a link started by [`spawn_link`].
#[derive(Debug)]
pub struct LinkHandle {
    /// Each newly authenticated session, in order. The link redials/accepts after a session
    /// ends; dropping this receiver stops the link.
    pub sessions: mpsc::Receiver<Session>,
    state: watch::Receiver<LinkState>,
    task: JoinHandle<()>,
}

impl LinkHandle {
    /// The current state.
    pub fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    /// A watch on the state (to wait for a change).
    pub fn state_watch(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// True once the link task has ended (after shutdown or when `sessions` was dropped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Starts the link task. It runs until `shutdown` becomes `true` (or its sender is dropped,
/// or `sessions` is dropped), closing the live session with Goodbye on the way out.
///
/// Must be called inside a tokio runtime.
pub fn spawn_link(spec: LinkSpec, shutdown: watch::Receiver<bool>) -> LinkHandle {
    let (s_tx, s_rx) = mpsc::channel(1);
    let (st_tx, st_rx) = watch::channel(LinkState::Connecting);
    let spec = Arc::new(spec);
    if let Some(t) = &spec.tls {
        t.log_start(&link_name(&spec));
    }
    let task = if spec.is_dialer() {
        tokio::spawn(dial_loop(spec, shutdown, s_tx, st_tx))
    } else {
        tokio::spawn(accept_loop(spec, shutdown, s_tx, st_tx))
    };
    LinkHandle {
        sessions: s_rx,
        state: st_rx,
        task,
    }
}

fn link_name(spec: &LinkSpec) -> String {
    match &spec.resource {
        Some(r) => format!("data link of {}", r.name),
        None => "control link".to_string(),
    }
}

/// Resolves when shutdown is requested (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

async fn dial_once(spec: &LinkSpec) -> Result<Session, LinkError> {
    let to = spec.timeouts.connect;
    let io = |op, source| LinkError::Io {
        op,
        addr: spec.peer_addr.clone(),
        source,
    };
    let stream = match tokio::time::timeout(to, TcpStream::connect(&spec.peer_addr)).await {
        Err(_) => {
            return Err(io(
                "connect to",
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            ))
        }
        Ok(r) => r.map_err(|e| io("connect to", e))?,
    };
    let peer_addr = stream.peer_addr().map_err(|e| io("connect to", e))?;
    establish(stream, peer_addr, Side::Initiator, spec).await
}

async fn accept_one(
    stream: TcpStream,
    peer_addr: SocketAddr,
    spec: &LinkSpec,
) -> Result<Session, LinkError> {
    establish(stream, peer_addr, Side::Acceptor, spec).await
}

/// TLS (when configured) and the handshake on a connected stream, all bounded by
/// `timeouts.connect`, then start the session.
async fn establish(
    stream: TcpStream,
    peer_addr: SocketAddr,
    side: Side,
    spec: &LinkSpec,
) -> Result<Session, LinkError> {
    let _ = stream.set_nodelay(true);
    let peer = peer_addr.to_string();
    let to = spec.timeouts.connect;
    let all = async {
        match (&spec.tls, side) {
            (None, Side::Initiator) => authenticate(stream, peer_addr, side, spec, &peer).await,
            (None, Side::Acceptor) => {
                let mut stream = stream;
                tls::refuse_if_tls(&mut stream, &peer).await?;
                authenticate(stream, peer_addr, side, spec, &peer).await
            }
            (Some(t), _) => {
                let s = match side {
                    Side::Initiator => tls::connect(t, stream, &spec.peer_node, &peer).await?,
                    Side::Acceptor => tls::accept(t, stream, &spec.peer_node, &peer).await?,
                };
                authenticate(s, peer_addr, side, spec, &peer)
                    .await
                    .map_err(tls::explain)
            }
        }
    };
    tokio::time::timeout(to, all)
        .await
        .map_err(|_| LinkError::HandshakeTimeout {
            peer: peer.clone(),
            secs: to.as_secs_f64(),
        })?
}

/// The Hello/HMAC handshake on `stream` (plain or TLS), then the session on it.
async fn authenticate<S>(
    mut stream: S,
    peer_addr: SocketAddr,
    side: Side,
    spec: &LinkSpec,
    peer: &str,
) -> Result<Session, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin + session::SessionIo,
{
    let est = handshake(&mut stream, side, spec, peer).await?;
    Ok(session::start(stream, est, peer_addr, spec.timeouts))
}

async fn dial_loop(
    spec: Arc<LinkSpec>,
    mut shutdown: watch::Receiver<bool>,
    sessions: mpsc::Sender<Session>,
    state: watch::Sender<LinkState>,
) {
    let name = link_name(&spec);
    let mut backoff = INITIAL_BACKOFF;
    loop {
        if *shutdown.borrow() || sessions.is_closed() {
            return;
        }
        let attempt = tokio::select! {
            r = dial_once(&spec) => r,
            _ = stopped(&mut shutdown) => return,
            _ = sessions.closed() => return,
        };
        match attempt {
            Ok(session) => {
                backoff = INITIAL_BACKOFF;
                tracing::info!(link = %name, peer = %session.peer_addr, "peer link established");
                let tx = session.tx.clone();
                let closed = session.closed.clone();
                state.send_replace(LinkState::Connected {
                    peer_addr: session.peer_addr,
                    since: SystemTime::now(),
                });
                if sessions.send(session).await.is_err() {
                    tx.close("link owner gone");
                    return;
                }
                tokio::select! {
                    _ = closed.wait() => state.send_replace(LinkState::Connecting),
                    _ = stopped(&mut shutdown) => {
                        tx.close("shutting down");
                        return;
                    }
                };
            }
            Err(e) => {
                tracing::warn!(link = %name, error = %e, retry_in_s = backoff.as_secs_f64(), "peer link attempt failed");
                // The state reflects the latest attempt.
                state.send_replace(if e.is_refusal() {
                    LinkState::Refused {
                        reason: e.to_string(),
                    }
                } else {
                    LinkState::Connecting
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(&mut shutdown) => return,
                    _ = sessions.closed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn accept_loop(
    spec: Arc<LinkSpec>,
    mut shutdown: watch::Receiver<bool>,
    sessions: mpsc::Sender<Session>,
    state: watch::Sender<LinkState>,
) {
    let name = link_name(&spec);
    let listener = loop {
        match TcpListener::bind(&spec.listen_addr).await {
            Ok(l) => break l,
            Err(source) => {
                let e = LinkError::Io {
                    op: "bind",
                    addr: spec.listen_addr.clone(),
                    source,
                };
                tracing::error!(link = %name, error = %e, "cannot listen for the peer");
                state.send_replace(LinkState::Refused {
                    reason: e.to_string(),
                });
                tokio::select! {
                    _ = tokio::time::sleep(MAX_BACKOFF) => {}
                    _ = stopped(&mut shutdown) => return,
                }
            }
        }
    };
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    // Handshakes run concurrently and may finish in any order; each carries the number of
    // its connection in accept order. A connection older than one already used is one the
    // peer gave up on (it dials one at a time): it is closed, never used.
    let (done_tx, mut done_rx) =
        mpsc::channel::<(u64, Result<Session, LinkError>)>(MAX_PENDING_HANDSHAKES);
    let mut accepted: u64 = 0;
    // The newest connection used so far: its number and address.
    let mut newest: Option<(u64, SocketAddr)> = None;
    let mut current: Option<(SessionSender, CloseWatch)> = None;
    loop {
        let watch_current = current.as_ref().map(|c| c.1.clone());
        let current_closed = async move {
            match watch_current {
                Some(c) => c.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stopped(&mut shutdown) => {
                if let Some((tx, _)) = current {
                    tx.close("shutting down");
                }
                return;
            }
            _ = sessions.closed() => {
                if let Some((tx, _)) = current {
                    tx.close("link owner gone");
                }
                return;
            }
            acc = listener.accept() => match acc {
                Ok((stream, addr)) => match pending.clone().try_acquire_owned() {
                    Ok(permit) => {
                        accepted += 1;
                        let n = accepted;
                        let spec = spec.clone();
                        let done = done_tx.clone();
                        tokio::spawn(async move {
                            let r = accept_one(stream, addr, &spec).await;
                            drop(permit);
                            let _ = done.send((n, r)).await;
                        });
                    }
                    Err(_) => tracing::warn!(link = %name, peer = %addr,
                        "too many handshakes in progress; connection dropped"),
                },
                Err(e) => {
                    // E.g. EMFILE: do not spin.
                    tracing::warn!(link = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some((n, r)) = done_rx.recv() => match r {
                Ok(session) => {
                    if let Some((_, addr)) = newest.filter(|(m, _)| *m > n) {
                        session.tx.close(&format!(
                            "superseded: the peer's newer connection from {addr} was used first"
                        ));
                        continue;
                    }
                    newest = Some((n, session.peer_addr));
                    if let Some((old, _)) = current.take() {
                        old.close(&format!("replaced by a newer connection from {}", session.peer_addr));
                    }
                    tracing::info!(link = %name, peer = %session.peer_addr, "peer link established");
                    current = Some((session.tx.clone(), session.closed.clone()));
                    state.send_replace(LinkState::Connected {
                        peer_addr: session.peer_addr,
                        since: SystemTime::now(),
                    });
                    let tx = session.tx.clone();
                    if sessions.send(session).await.is_err() {
                        tx.close("link owner gone");
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(link = %name, error = %e, "peer connection refused");
                    if e.is_refusal() && current.is_none() {
                        state.send_replace(LinkState::Refused { reason: e.to_string() });
                    }
                }
            },
            reason = current_closed => {
                tracing::info!(link = %name, %reason, "peer session ended; waiting for the peer");
                current = None;
                state.send_replace(LinkState::Connecting);
            }
        }
    }
}
