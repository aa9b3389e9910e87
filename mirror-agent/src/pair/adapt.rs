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
