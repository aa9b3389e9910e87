//! Shared driver of the stream fuzz harnesses ([`crate::nbd::testing::fuzz_session`],
//! [`crate::peer::testing::fuzz_handshake`]).

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Runs `serve` on one end of an in-memory stream (`buf` bytes each way) on a fresh
/// current-thread runtime, while `input` is written to the other end, which is then
/// half-closed, and whatever `serve` sends back is read and dropped. Returns `serve`'s output.
/// Panics naming `what` if it is not done within `limit` (a hang is a finding).
pub(crate) fn play<F, Fut, T>(input: &[u8], buf: usize, limit: Duration, what: &str, serve: F) -> T
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let (ours, theirs) = tokio::io::duplex(buf);
        let (mut rd, mut wr) = tokio::io::split(ours);
        let feed = async move {
            // The other side may close early (it refuses garbage): stop feeding then.
            let _ = wr.write_all(input).await;
            let _ = wr.shutdown().await;
            // Kept until the end: dropping it would be EOF too, but not before the drain.
            wr
        };
        let drain = async move {
            let mut b = vec![0u8; 16 << 10];
            while let Ok(n) = rd.read(&mut b).await {
                if n == 0 {
                    break;
                }
            }
        };
        let all = async { tokio::join!(feed, drain, serve(theirs)) };
        let (_wr, (), out) = tokio::time::timeout(limit, all).await.unwrap_or_else(|_| {
            panic!("{what} did not end within {limit:?} after its input ended")
        });
        out
    })
}
