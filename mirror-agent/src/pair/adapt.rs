//! `peer::Session` pieces presented as the `replica` link traits, so the
//! replication data path runs over real sessions unchanged.

use std::sync::Arc;

use mirror_proto::Frame;
use tokio::sync::mpsc;

use crate::peer::{CloseWatch, SessionSender};
use crate::replica::link::{BoxFuture, CloseSignal, FrameTx, LinkClosed, MakeMessage};
use crate::replica::ReplicaLink;

struct Tx(SessionSender);

impl FrameTx for Tx {
    fn send_with(&self, make: MakeMessage) -> BoxFuture<Result<u64, LinkClosed>> {
        let tx = self.0.clone();
        Box::pin(async move { tx.send_with(make).await.map_err(|_| LinkClosed) })
    }

    fn close(&self, reason: &str) {
        self.0.close(reason);
    }

    // The replica data path closes with an Error frame when the peer broke
    // the protocol (e.g. an Ack for a sequence it was never sent): forward
    // it, or the peer would only see the connection end.
    fn close_with_error(&self, reason: &str, code: u32) {
        self.0.close_with_error(reason, code);
    }
}

struct Closed(CloseWatch);

impl CloseSignal for Closed {
    fn wait(&self) -> BoxFuture<String> {
        let c = self.0.clone();
        Box::pin(async move { c.wait().await })
    }

    fn reason(&self) -> Option<String> {
        self.0.reason()
    }
}

/// A replica link over a live session; `rx` carries the frames the session
/// dispatcher routes to this consumer.
pub(super) fn replica_link(
    tx: SessionSender,
    closed: CloseWatch,
    rx: mpsc::Receiver<Frame>,
) -> ReplicaLink {
    ReplicaLink {
        tx: Arc::new(Tx(tx)),
        rx,
        closed: Arc::new(Closed(closed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::testing::{hello, pair_in_memory};

    #[tokio::test]
    async fn close_with_error_sends_the_error_frame() {
        let (a, b) = pair_in_memory(
            hello("alpha", "c", "r0", 1 << 20, 4096),
            hello("beta", "c", "r0", 1 << 20, 4096),
        );
        let link = replica_link(a.tx.clone(), a.closed.clone(), mpsc::channel(1).1);
        link.tx.close_with_error(
            "Ack2 for unknown seq 7",
            mirror_proto::error_code::UNEXPECTED_MESSAGE,
        );
        let seen = b.closed.wait().await;
        assert!(
            seen.contains(&format!(
                "peer reported error {}",
                mirror_proto::error_code::UNEXPECTED_MESSAGE
            )) && seen.contains("Ack2 for unknown seq 7"),
            "{seen}"
        );
    }
}
