//! `peer::Session` pieces presented as the `replica` link traits, so the
//! replication data path runs over real sessions unchanged. The session's
//! received data-path frames reach the replica consumers through the
//! session reader's hook (`Pair::data_hook`), not through a link channel.

use std::sync::Arc;

use crate::peer::{CloseWatch, SessionSender};
use crate::replica::{CloseSignal, FrameTx};

/// The session's sender as the data path's [`FrameTx`]. `SessionSender` and
/// `CloseWatch` are the link traits' own implementations
/// (`replica::link`), so nothing here can drift from them (e.g.
/// `close_with_error` sending the Error frame).
pub(super) fn frame_tx(tx: &SessionSender) -> Arc<dyn FrameTx> {
    Arc::new(tx.clone())
}

/// The session's close watch as the data path's [`CloseSignal`].
pub(super) fn close_signal(closed: &CloseWatch) -> Arc<dyn CloseSignal> {
    Arc::new(closed.clone())
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
        let tx = frame_tx(&a.tx);
        let closed = close_signal(&a.closed);
        tx.close_with_error(
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
        assert!(closed.reason().is_some());
    }
}
