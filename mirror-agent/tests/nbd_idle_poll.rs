//! NBD idle polling (`Limits::idle_poll`): a connection with nothing in
//! flight reads the socket directly for a while before parking. Requests
//! that arrive in pieces while it polls, requests back to back, and a client
//! closing while it polls must be served exactly as without polling.
//!
//! Runs on the in-memory engine; `MIRROR_NBD_TEST_ENGINE=portable` runs the
//! same suite on the portable engine over a temporary file.

mod nbd_common;

use std::time::Duration;

use mirror_agent::nbd::Limits;
use nbd_common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const SIZE: u64 = 4 << 20;

fn header(kind: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(28);
    m.extend_from_slice(&REQ_MAGIC.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}

// Two workers, so the client runs while the server polls on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_pieces_back_to_back_and_close_while_polling() {
    for window in [Duration::from_millis(200), Limits::default().idle_poll] {
        let te = make_engine(SIZE);
        let limits = Limits {
            idle_poll: window,
            ..Limits::default()
        };
        let srv = server_with(te.engine.clone(), limits);
        let l = listen(&srv);
        let mut c = Client::connect(UnixStream::connect(&l.path).await.unwrap(), false).await;

        // A write whose header and payload arrive in pieces, with pauses
        // (the server is polling, or parked, in between).
        let data = pattern(3, 8192);
        let mut msg = header(CMD_WRITE, 1, 4096, data.len() as u32);
        msg.extend_from_slice(&data);
        for piece in [
            &msg[..5],
            &msg[5..27],
            &msg[27..28],
            &msg[28..3000],
            &msg[3000..],
        ] {
            c.s.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let r = within(c.recv()).await;
        assert_eq!((r.handle, r.error), (1, 0));
        c.read(2, 4096, 8192).await;
        let r = within(c.recv()).await;
        assert_eq!((r.handle, r.error), (2, 0));
        assert_eq!(r.data.as_deref(), Some(&data[..]));

        // Back to back at QD1, as fio or a kernel client at depth 1 does.
        for i in 0..200u64 {
            let block = pattern(i as u8, 4096);
            let off = (i % 64) * 4096 + 65536;
            c.write(100 + 2 * i, off, &block).await;
            let r = within(c.recv()).await;
            assert_eq!((r.handle, r.error), (100 + 2 * i, 0));
            c.read(101 + 2 * i, off, 4096).await;
            let r = within(c.recv()).await;
            assert_eq!((r.handle, r.error), (101 + 2 * i, 0));
            assert_eq!(r.data.as_deref(), Some(&block[..]), "request {i}");
        }
        // Two requests in one send (replies carry no data: the client
        // helper only knows the reads it sent itself).
        let mut two = header(CMD_WRITE, 900, 0, 512);
        two.extend_from_slice(&[7; 512]);
        two.extend(header(CMD_FLUSH, 901, 0, 0));
        c.s.write_all(&two).await.unwrap();
        let mut handles = vec![];
        for _ in 0..2 {
            let r = within(c.recv()).await;
            assert_eq!(r.error, 0);
            handles.push(r.handle);
        }
        handles.sort();
        assert_eq!(handles, [900, 901]);
        assert_eq!(te.engine.read(0, 512).await.unwrap(), [7; 512]);

        // Half a header, then the client goes away: nothing is executed.
        let before = srv.stats();
        c.s.write_all(&header(CMD_WRITE, 902, 0, 4096)[..10])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        drop(c);
        within(async {
            while srv.stats().connections_open != 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let after = srv.stats();
        assert_eq!(after.requests, before.requests, "{window:?}");
        assert_eq!(after.written_bytes, before.written_bytes);
        assert_eq!(
            te.engine.read(4096, 8192).await.unwrap(),
            data,
            "{window:?}"
        );
        srv.shutdown().await;
        l.accept.await.unwrap().unwrap();
    }
}
