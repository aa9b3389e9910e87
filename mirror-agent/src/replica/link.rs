//! The replication data path's view of a peer session: a sender that assigns
//! sequence numbers ([`FrameTx`]), the incoming frames, and a close signal.
//!
//! `crate::peer` provides the real sessions; this small interface keeps the
//! data path independent of how frames reach the wire, and
//! [`memory_pair`] connects two in-process ends for tests (sequence numbers,
//! bounded queues and close propagation like a real session; no sockets, no
//! authentication).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use mirror_proto::{Frame, Message};
use tokio::sync::{mpsc, watch};

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Builds the message once its sequence number is known. It runs before the
/// frame is queued, so in-flight state keyed by `seq` can be registered
/// before any ack for it can arrive.
pub type MakeMessage = Box<dyn FnOnce(u64) -> Message + Send + 'static>;

/// The session is closed; nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer link closed")]
pub struct LinkClosed;

/// Sending half of a session.
pub trait FrameTx: Send + Sync + 'static {
    /// Assigns the next sequence number under the sender's ordering lock,
    /// builds the message with `make`, and queues the frame (waiting while the
    /// queue is full). Returns the sequence number.
    fn send_with(&self, make: MakeMessage) -> BoxFuture<Result<u64, LinkClosed>>;
    /// Sends `msgs` in order; a session gives them consecutive seqs and may
    /// put them on the wire in one write. Returns the first seq. The default
    /// sends them one by one (still in order; other senders' frames may come
    /// between them).
    fn send_all(&self, msgs: Vec<Message>) -> BoxFuture<Result<u64, LinkClosed>> {
        let sends: Vec<BoxFuture<Result<u64, LinkClosed>>> = msgs
            .into_iter()
            .map(|m| self.send_with(Box::new(move |_| m)))
            .collect();
        Box::pin(async move {
            let mut first = None;
            for f in sends {
                let s = f.await?;
                first.get_or_insert(s);
            }
            first.ok_or(LinkClosed)
        })
    }
    /// Closes the session with a reason (idempotent).
    fn close(&self, reason: &str);
    /// Closes the session telling the peer it broke the protocol (an Error
    /// frame with `code`); transports without frames just close.
    fn close_with_error(&self, reason: &str, code: u32) {
        let _ = code;
        self.close(reason);
    }
}

/// Close signal of a session.
pub trait CloseSignal: Send + Sync + 'static {
    /// Resolves with the reason once the session is closed.
    fn wait(&self) -> BoxFuture<String>;
    /// The reason if closed.
    fn reason(&self) -> Option<String>;
}

/// One connected session as the data path uses it.
pub struct ReplicaLink {
    /// Sender (cheap to share).
    pub tx: Arc<dyn FrameTx>,
    /// Frames from the peer, in its `seq` order.
    pub rx: mpsc::Receiver<Frame>,
    /// Close signal.
    pub closed: Arc<dyn CloseSignal>,
}

impl std::fmt::Debug for ReplicaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaLink")
            .field("closed", &self.closed.reason())
            .finish_non_exhaustive()
    }
}

/// Queue capacity (frames) of each direction of a [`memory_pair`].
pub const MEMORY_QUEUE_FRAMES: usize = 256;

/// Close state shared by both ends of a [`memory_pair`].
#[derive(Debug)]
struct MemClose {
    tx: watch::Sender<Option<String>>,
}

impl MemClose {
    fn close(&self, reason: &str) {
        self.tx.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason.to_string());
                true
            } else {
                false
            }
        });
    }
}

#[derive(Debug)]
struct MemTx {
    // The tokio mutex is the ordering lock: seq assignment and queueing happen
    // under it, so frames are queued in seq order.
    next: tokio::sync::Mutex<(u64, mpsc::Sender<Frame>)>,
    close: Arc<MemClose>,
}

impl FrameTx for Arc<MemTx> {
    fn send_with(&self, make: MakeMessage) -> BoxFuture<Result<u64, LinkClosed>> {
        let me = self.clone();
        Box::pin(async move {
            let mut closed = me.close.tx.subscribe();
            if closed.borrow().is_some() {
                return Err(LinkClosed);
            }
            let mut g = me.next.lock().await;
            g.0 += 1;
            let seq = g.0;
            let frame = Frame::new(seq, make(seq));
            let out = g.1.clone();
            tokio::select! {
                r = out.send(frame) => r.map(|_| seq).map_err(|_| LinkClosed),
                _ = closed.wait_for(|r| r.is_some()) => Err(LinkClosed),
            }
        })
    }

    fn close(&self, reason: &str) {
        self.close.close(reason);
    }
}

#[derive(Debug)]
struct MemCloseSignal {
    close: Arc<MemClose>,
}

impl CloseSignal for MemCloseSignal {
    fn wait(&self) -> BoxFuture<String> {
        let mut rx = self.close.tx.subscribe();
        Box::pin(async move {
            match rx.wait_for(|r| r.is_some()).await {
                Ok(r) => r.clone().unwrap_or_default(),
                Err(_) => "session dropped".to_string(),
            }
        })
    }

    fn reason(&self) -> Option<String> {
        self.close.tx.borrow().clone()
    }
}

/// Two connected in-process link ends (`a` ↔ `b`), for tests. Each end's
/// sequence numbers start at 2 (1 is the Hello of a real session). Closing
/// either end closes both; frames queued but not yet received are then
/// dropped, as on a broken connection.
pub fn memory_pair() -> (ReplicaLink, ReplicaLink) {
    let (close_tx, _) = watch::channel(None);
    let close = Arc::new(MemClose { tx: close_tx });
    let (a_out, b_in) = mpsc::channel(MEMORY_QUEUE_FRAMES);
    let (b_out, a_in) = mpsc::channel(MEMORY_QUEUE_FRAMES);
    let end = |out, rx| ReplicaLink {
        tx: Arc::new(Arc::new(MemTx {
            next: tokio::sync::Mutex::new((1, out)),
            close: close.clone(),
        })),
        rx,
        closed: Arc::new(MemCloseSignal {
            close: close.clone(),
        }),
    };
    (end(a_out, a_in), end(b_out, b_in))
}

/// Sends `msg` (which does not depend on its own seq).
pub(crate) fn send(tx: &Arc<dyn FrameTx>, msg: Message) -> BoxFuture<Result<u64, LinkClosed>> {
    tx.send_with(Box::new(move |_| msg))
}

/// Guards a value so that a panicking holder does not poison it for others.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ----- adapters for crate::peer sessions -----

impl FrameTx for crate::peer::SessionSender {
    fn send_with(&self, make: MakeMessage) -> BoxFuture<Result<u64, LinkClosed>> {
        let s = self.clone();
        Box::pin(async move {
            crate::peer::SessionSender::send_with(&s, make)
                .await
                .map_err(|_| LinkClosed)
        })
    }

    fn send_all(&self, msgs: Vec<Message>) -> BoxFuture<Result<u64, LinkClosed>> {
        let s = self.clone();
        Box::pin(async move {
            crate::peer::SessionSender::send_all(&s, msgs)
                .await
                .map_err(|_| LinkClosed)
        })
    }

    fn close(&self, reason: &str) {
        crate::peer::SessionSender::close(self, reason);
    }

    fn close_with_error(&self, reason: &str, code: u32) {
        crate::peer::SessionSender::close_with_error(self, reason, code);
    }
}

impl CloseSignal for crate::peer::CloseWatch {
    fn wait(&self) -> BoxFuture<String> {
        let w = self.clone();
        Box::pin(async move { crate::peer::CloseWatch::wait(&w).await })
    }

    fn reason(&self) -> Option<String> {
        crate::peer::CloseWatch::reason(self)
    }
}

impl From<crate::peer::Session> for ReplicaLink {
    /// The data path's view of an authenticated session (the peer's Hello and
    /// address stay with the caller, who read them before).
    fn from(s: crate::peer::Session) -> ReplicaLink {
        ReplicaLink {
            tx: Arc::new(s.tx),
            rx: s.rx,
            closed: Arc::new(s.closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_pair_orders_seqs_and_propagates_close() {
        let (a, mut b) = memory_pair();
        let s1 =
            a.tx.send_with(Box::new(|seq| Message::Ack1 { seq }))
                .await
                .unwrap();
        let s2 = send(&a.tx, Message::Flush).await.unwrap();
        assert_eq!((s1, s2), (2, 3));
        assert_eq!(
            b.rx.recv().await.unwrap(),
            Frame::new(2, Message::Ack1 { seq: 2 })
        );
        assert_eq!(b.rx.recv().await.unwrap().seq, 3);
        assert!(a.closed.reason().is_none());
        b.tx.close("bye");
        assert_eq!(a.closed.wait().await, "bye");
        assert_eq!(send(&a.tx, Message::Flush).await, Err(LinkClosed));
    }
}
