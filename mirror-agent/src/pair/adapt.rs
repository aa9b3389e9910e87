//! `peer::Session` pieces presented as the `replica` link traits, so the
//! replication data path runs over real sessions unchanged.

use std::sync::Arc;

use mirror_proto::Frame;
use tokio::sync::mpsc;

use crate::peer::{CloseWatch, SessionSender};
use crate::replica::ReplicaLink;

/// A replica link over a live session; `rx` carries the frames the session
/// dispatcher routes to this consumer.
pub(super) fn replica_link(
    tx: SessionSender,
    closed: CloseWatch,
    rx: mpsc::Receiver<Frame>,
) -> ReplicaLink {
    // `SessionSender` and `CloseWatch` are the link traits' own
    // implementations (`replica::link`), so nothing here can drift from them
    // (e.g. `close_with_error` sending the Error frame).
    ReplicaLink {
        tx: Arc::new(tx),
        rx,
        closed: Arc::new(closed),
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
