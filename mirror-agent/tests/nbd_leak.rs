//! 1,000 connections opened and dropped at every stage of the protocol leave
//! no connection, task or file descriptor behind. (Alone in its test binary:
//! the descriptor count is process-wide.)

mod nbd_common;

use std::sync::Arc;

use mirror_agent::nbd::testing::MemEngine;
use mirror_agent::nbd::{Limits, NbdServer};
use nbd_common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn one(path: std::path::PathBuf, i: usize) {
    let mut s = UnixStream::connect(&path).await.unwrap();
    match i % 5 {
        // Dropped before reading the greeting.
        0 => {}
        // Dropped in the middle of an option.
        1 => {
            hello(&mut s, 3).await;
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&OPT_GO.to_be_bytes());
            m.extend_from_slice(&20u32.to_be_bytes());
            m.extend_from_slice(b"\0\0");
            s.write_all(&m).await.unwrap();
        }
        // Dropped with a read in flight (reply never read).
        2 => {
            let mut c = Client::connect(s, i.is_multiple_of(2)).await;
            c.read(1, 0, 65536).await;
            c.read(2, 65536, 4096).await;
            return;
        }
        // Dropped in the middle of a write payload.
        3 => {
            let mut c = Client::connect(s, false).await;
            c.request(0, CMD_WRITE, 1, 0, 8192, &[9u8; 3000]).await;
            return;
        }
        // Dropped in the middle of a request header.
        _ => {
            let mut c = Client::connect(s, true).await;
            c.s.write_all(&REQ_MAGIC.to_be_bytes()).await.unwrap();
            c.s.write_all(&[0, 0, 0]).await.unwrap();
            return;
        }
    }
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_dropped_connections_leak_nothing() {
    let engine = MemEngine::new(1 << 20);
    let srv: Arc<NbdServer> = server_with(engine.clone(), Limits::default());
    let l = listen(&srv);

    // Warm up (runtime internals, blocking pool) before taking the baseline.
    let mut c = Client::connect(UnixStream::connect(&l.path).await.unwrap(), false).await;
    c.read(1, 0, 512).await;
    c.recv().await;
    c.disconnect().await;
    within(srv.wait_idle()).await;
    let baseline = fd_count();
    let before = srv.stats();

    let total = 1000;
    let batch = 100;
    for b in 0..total / batch {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..batch {
            set.spawn(one(l.path.clone(), b * batch + i));
        }
        while let Some(r) = within(set.join_next()).await {
            r.unwrap();
        }
    }

    within(srv.wait_idle()).await;
    let st = srv.stats();
    assert_eq!(st.connections_open, 0);
    assert_eq!(st.tasks_alive, 0);
    assert_eq!(
        st.connections_total - before.connections_total,
        total as u64
    );
    eventually("fd count back to baseline", || fd_count() <= baseline).await;
    assert_eq!(fd_count(), baseline);
    // No partial write was applied.
    assert_eq!(engine.snapshot(), vec![0u8; 1 << 20]);
    assert_eq!(st.written_bytes, 0);

    // Still serving.
    let mut c = Client::connect(UnixStream::connect(&l.path).await.unwrap(), true).await;
    c.write(1, 0, &[1u8; 512]).await;
    assert_eq!(c.recv().await.error, 0);
    c.disconnect().await;
}
