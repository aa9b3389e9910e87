//! NBD transmission phase: commands, replies, pipelining, hostile requests,
//! engine errors, backpressure, disconnect and shutdown drain.
//!
//! Runs on the in-memory engine; `MIRROR_NBD_TEST_ENGINE=portable` runs the
//! same suite on the portable engine over a temporary file.

mod nbd_common;

use std::sync::Arc;

use mirror_agent::engine::BlockEngine;
use mirror_agent::nbd::{BlockSizes, Export, Limits, NbdError, NbdServer};
use nbd_common::*;
use tokio::io::AsyncWriteExt;

const SIZE: u64 = 4 << 20;

/// (what, flags, command, offset, length, payload, expected errno)
type Case<'a> = (&'a str, u16, u16, u64, u32, &'a [u8], u32);

async fn engine_bytes(e: &dyn BlockEngine, off: u64, len: usize) -> Vec<u8> {
    e.read(off, len).await.unwrap()
}

/// A server for `md1` on `te` with a 512-byte minimum and a 1 MiB maximum block size.
fn server_512(te: &TestEngine) -> Arc<NbdServer> {
    let mut export = Export::new("md1", te.engine.clone());
    export.block_sizes = BlockSizes {
        minimum: 512,
        preferred: 4096,
        maximum: 1 << 20,
    };
    NbdServer::new(vec![export], Limits::default()).unwrap()
}

async fn connect(srv: &Arc<NbdServer>, structured: bool) -> Client {
    let (s, _h) = pair(srv);
    Client::connect(s, structured).await
}

#[tokio::test]
async fn commands_roundtrip_simple_and_structured() {
    for structured in [false, true] {
        let te = make_engine(SIZE);
        let srv = server_with(te.engine.clone(), Limits::default());
        let mut c = connect(&srv, structured).await;
        let a = pattern(1, 8192);
        let b = pattern(2, 4096);
        c.write(1, 0, &a).await;
        c.request(FLAG_FUA, CMD_WRITE, 2, 65536, b.len() as u32, &b)
            .await;
        let r = c.recv_n(2).await;
        assert!(r.values().all(|r| r.error == 0 && r.data.is_none()));
        c.read(3, 0, 8192).await;
        assert_eq!(c.recv().await.data.unwrap(), a);
        c.request(FLAG_DF, CMD_READ, 4, 65536, 4096, &[]).await;
        let r = c.recv().await;
        if structured {
            assert_eq!(r.data.unwrap(), b, "DF read is one chunk");
        } else {
            assert_eq!(
                r.error, EINVAL,
                "DF not negotiated without structured replies"
            );
        }
        // Trim and write-zeroes (with and without NO_HOLE) read back as zero.
        c.request(FLAG_FUA, CMD_TRIM, 5, 0, 4096, &[]).await;
        c.request(0, CMD_WRITE_ZEROES, 6, 4096, 4096, &[]).await;
        c.request(
            FLAG_NO_HOLE | FLAG_FUA,
            CMD_WRITE_ZEROES,
            7,
            65536,
            4096,
            &[],
        )
        .await;
        c.request(0, CMD_FLUSH, 8, 0, 0, &[]).await;
        let r = c.recv_n(4).await;
        assert!(r.values().all(|r| r.error == 0), "{r:?}");
        c.read(9, 0, 8192).await;
        assert_eq!(c.recv().await.data.unwrap(), vec![0; 8192]);
        assert_eq!(
            engine_bytes(te.engine.as_ref(), 65536, 4096).await,
            vec![0; 4096]
        );
        let st = srv.stats();
        assert_eq!(st.written_bytes, 8192 + 4096);
        assert_eq!(
            st.read_bytes,
            8192 + 8192 + if structured { 4096 } else { 0 }
        );
        assert_eq!(st.requests, 9);
        c.disconnect().await;
    }
}

#[tokio::test]
async fn replies_complete_out_of_order() {
    for structured in [false, true] {
        let te = make_engine(SIZE);
        te.engine
            .write(0, pattern(9, 4096).into(), false)
            .await
            .unwrap();
        let gated = GatedEngine::new(te.engine.clone(), 0);
        let srv = server_with(gated.clone(), Limits::default());
        let mut c = connect(&srv, structured).await;
        c.read(1, 0, 4096).await; // blocked in the engine
        c.read(2, 4096, 4096).await;
        c.write(3, 8192, &pattern(3, 512)).await;
        gated.wait_started(1).await;
        let later = c.recv_n(2).await;
        assert!(
            later.contains_key(&2) && later.contains_key(&3),
            "requests behind a slow one complete first"
        );
        gated.open();
        let first = c.recv().await;
        assert_eq!(first.handle, 1);
        assert_eq!(first.data.unwrap(), pattern(9, 4096));
        c.disconnect().await;
    }
}

#[tokio::test]
async fn many_pipelined_requests() {
    let te = make_engine(SIZE);
    let srv = server_with(te.engine.clone(), Limits::default());
    let mut c = connect(&srv, true).await;
    let n = 200u64;
    for i in 0..n {
        c.write(i, i * 4096, &pattern(i as u8, 4096)).await;
    }
    let r = c.recv_n(n as usize).await;
    assert!(r.values().all(|r| r.error == 0));
    for i in 0..n {
        c.read(1000 + i, i * 4096, 4096).await;
    }
    let r = c.recv_n(n as usize).await;
    for i in 0..n {
        assert_eq!(
            r[&(1000 + i)].data.as_deref().unwrap(),
            &pattern(i as u8, 4096)[..]
        );
    }
    c.disconnect().await;
}

/// Every invalid request gets the spec's errno, write payloads are consumed,
/// nothing is written, and the connection stays usable.
#[tokio::test]
async fn hostile_requests_get_errno_and_connection_survives() {
    for structured in [false, true] {
        let te = make_engine(SIZE);
        let srv = server_512(&te);
        let mut c = connect(&srv, structured).await;
        let big = vec![0xAAu8; 2 << 20];
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("read beyond end", 0, CMD_READ, SIZE - 512, 1024, &[], EINVAL),
            ("write beyond end", 0, CMD_WRITE, SIZE - 512, 1024, &big[..1024], ENOSPC),
            ("trim beyond end", 0, CMD_TRIM, SIZE, 512, &[], EINVAL),
            ("zeroes beyond end", 0, CMD_WRITE_ZEROES, SIZE - 512, 1024, &[], ENOSPC),
            ("offset overflow", 0, CMD_WRITE, u64::MAX - 511, 1024, &big[..1024], ENOSPC),
            ("zero-length read", 0, CMD_READ, 0, 0, &[], EINVAL),
            ("zero-length write", 0, CMD_WRITE, 0, 0, &[], EINVAL),
            ("zero-length trim", 0, CMD_TRIM, 0, 0, &[], EINVAL),
            ("read above maximum", 0, CMD_READ, 0, 2 << 20, &[], EINVAL),
            ("write above maximum", 0, CMD_WRITE, 0, 2 << 20, &big, EINVAL),
            ("zeroes above maximum", 0, CMD_WRITE_ZEROES, 0, 2 << 20, &[], EINVAL),
            ("unaligned offset", 0, CMD_WRITE, 100, 512, &big[..512], EINVAL),
            ("unaligned length", 0, CMD_WRITE, 0, 700, &big[..700], EINVAL),
            ("unaligned read", 0, CMD_READ, 512, 100, &[], EINVAL),
            ("cache (not advertised)", 0, 5, 0, 512, &[], EINVAL),
            ("block status (no context)", 0, CMD_BLOCK_STATUS, 0, 512, &[], EINVAL),
            ("unknown command", 0, 99, 0, 512, &[], EINVAL),
            ("unknown flag on write", 0x8000, CMD_WRITE, 0, 512, &big[..512], EINVAL),
            ("NO_HOLE on read", FLAG_NO_HOLE, CMD_READ, 0, 512, &[], EINVAL),
            ("fast zero (not advertised)", 16, CMD_WRITE_ZEROES, 0, 512, &[], EINVAL),
            ("flush with range", 0, CMD_FLUSH, 512, 512, &[], EINVAL),
        ];
        for (i, (what, flags, kind, off, len, payload, errno)) in cases.into_iter().enumerate() {
            let h = 100 + i as u64;
            c.request(flags, kind, h, off, len, payload).await;
            let r = c.recv().await;
            assert_eq!(
                (r.handle, r.error),
                (h, errno),
                "{what} (structured={structured})"
            );
            assert!(r.data.is_none(), "{what}");
            // Still in sync: a valid read right after.
            c.read(h + 1000, 0, 512).await;
            let ok = c.recv().await;
            assert_eq!((ok.handle, ok.error), (h + 1000, 0), "after {what}");
        }
        assert_eq!(
            engine_bytes(te.engine.as_ref(), 0, SIZE as usize).await,
            vec![0; SIZE as usize],
            "nothing written"
        );
        assert_eq!(srv.stats().written_bytes, 0);
        c.disconnect().await;
    }
}

#[tokio::test]
async fn bad_request_magic_closes_connection_only() {
    let te = make_engine(SIZE);
    let srv = server_with(te.engine.clone(), Limits::default());
    let (s, conn) = pair(&srv);
    let mut c = Client::connect(s, false).await;
    let mut other = connect(&srv, false).await;
    c.s.write_all(&[0x55u8; 28]).await.unwrap();
    expect_closed(&mut c.s).await;
    assert!(matches!(
        within(conn).await.unwrap(),
        Err(NbdError::BadRequestMagic(_))
    ));
    other.read(1, 0, 512).await;
    assert_eq!(other.recv().await.error, 0);
    other.disconnect().await;
}

#[tokio::test]
async fn oversized_write_payload_closes_connection() {
    let te = make_engine(SIZE);
    let srv = server_with(te.engine.clone(), Limits::default());
    let (s, conn) = pair(&srv);
    let mut c = Client::connect(s, false).await;
    // 64 MiB announced (above 32 MiB max and the skip bound): header only.
    c.request(0, CMD_WRITE, 1, 0, 64 << 20, &[]).await;
    expect_closed(&mut c.s).await;
    assert!(matches!(
        within(conn).await.unwrap(),
        Err(NbdError::PayloadTooLarge { .. })
    ));
    assert_eq!(srv.stats().written_bytes, 0);
}

#[tokio::test]
async fn truncated_write_payload_is_never_applied() {
    let te = make_engine(SIZE);
    let srv = server_with(te.engine.clone(), Limits::default());
    let (s, conn) = pair(&srv);
    let mut c = Client::connect(s, false).await;
    let data = pattern(7, 65536);
    c.request(0, CMD_WRITE, 1, 0, 65536, &data[..30000]).await;
    c.s.shutdown().await.unwrap();
    // No reply: the server closes without acknowledging anything.
    expect_closed(&mut c.s).await;
    let err = within(conn).await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            NbdError::Truncated {
                what: "write payload",
                got: 30000,
                expected: 65536
            }
        ),
        "{err}"
    );
    assert_eq!(
        engine_bytes(te.engine.as_ref(), 0, 65536).await,
        vec![0; 65536]
    );
    assert_eq!(srv.stats().written_bytes, 0);
}

#[tokio::test]
async fn read_only_export_refuses_writes() {
    let te = make_engine(SIZE);
    let mut e = Export::new("md1", te.engine.clone());
    e.read_only = true;
    let srv = NbdServer::new(vec![e], Limits::default()).unwrap();
    let mut c = connect(&srv, false).await;
    assert_eq!(c.tflags & 2, 2, "READ_ONLY advertised");
    assert_eq!(
        c.tflags & (8 | 32 | 64),
        0,
        "no FUA/TRIM/WRITE_ZEROES on a read-only export"
    );
    c.write(1, 0, &[1u8; 512]).await;
    c.request(0, CMD_TRIM, 2, 0, 512, &[]).await;
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 512, &[]).await;
    c.read(4, 0, 512).await;
    let r = c.recv_n(4).await;
    assert_eq!(
        [r[&1].error, r[&2].error, r[&3].error, r[&4].error],
        [EPERM, EPERM, EPERM, 0]
    );
    c.disconnect().await;
}

#[tokio::test]
async fn engine_errors_reach_only_their_request() {
    for structured in [false, true] {
        let te = make_engine(SIZE);
        let failing = FailingEngine::new(te.engine.clone());
        failing.fail_range(65536, 4096, libc::EIO);
        failing.fail_range(131072, 4096, libc::ENOSPC);
        failing.fail_range(196608, 4096, libc::EBADF); // unmapped errno -> EIO
        let srv = server_with(failing.clone(), Limits::default());
        let mut c = connect(&srv, structured).await;
        c.read(1, 65536, 4096).await;
        c.write(2, 131072, &[1u8; 4096]).await;
        c.read(3, 0, 4096).await;
        c.write(4, 4096, &[2u8; 4096]).await;
        c.request(0, CMD_TRIM, 5, 196608, 4096, &[]).await;
        c.request(0, CMD_WRITE_ZEROES, 6, 131072, 4096, &[]).await;
        let r = c.recv_n(6).await;
        assert_eq!(r[&1].error, EIO);
        assert!(r[&1].data.is_none());
        assert_eq!(r[&2].error, ENOSPC);
        assert_eq!(
            (r[&3].error, r[&3].data.as_ref().map(Vec::len)),
            (0, Some(4096))
        );
        assert_eq!(r[&4].error, 0);
        assert_eq!(r[&5].error, EIO);
        assert_eq!(r[&6].error, ENOSPC);
        if structured {
            assert_eq!(
                r[&1].err_offset,
                Some(65536),
                "engine read error carries its offset"
            );
        }
        *failing.flush_errno.lock().unwrap() = Some(libc::EIO);
        c.request(0, CMD_FLUSH, 7, 0, 0, &[]).await;
        assert_eq!(c.recv().await.error, EIO);
        *failing.flush_errno.lock().unwrap() = None;
        c.request(0, CMD_FLUSH, 8, 0, 0, &[]).await;
        assert_eq!(c.recv().await.error, 0);
        assert_eq!(srv.stats().errors, 5);
        c.disconnect().await;
    }
}

#[tokio::test]
async fn disconnect_finishes_in_flight_requests() {
    let te = make_engine(SIZE);
    let gated = GatedEngine::new(te.engine.clone(), 0);
    let srv = server_with(gated.clone(), Limits::default());
    let (s, conn) = pair(&srv);
    let mut c = Client::connect(s, false).await;
    c.write(1, 0, &pattern(4, 4096)).await;
    c.request(0, CMD_DISC, 2, 0, 0, &[]).await;
    gated.wait_started(1).await;
    gated.open();
    let r = c.recv().await;
    assert_eq!(
        (r.handle, r.error),
        (1, 0),
        "in-flight write answered after DISC"
    );
    expect_closed(&mut c.s).await;
    assert!(within(conn).await.unwrap().is_ok());
    assert_eq!(
        engine_bytes(te.engine.as_ref(), 0, 4096).await,
        pattern(4, 4096)
    );
    srv.wait_idle().await;
}

/// The per-connection byte budget stops the reader: a request behind one
/// that holds the whole budget is not even started until that one's reply
/// is sent, so it completes after it.
#[tokio::test]
async fn backpressure_per_connection_budget() {
    let te = make_engine(SIZE);
    let gated = GatedEngine::new(te.engine.clone(), 0);
    let mut e = Export::new("md1", gated.clone() as Arc<dyn BlockEngine>);
    e.block_sizes.maximum = 65536;
    let limits = Limits {
        conn_inflight_bytes: 65536,
        ..Limits::default()
    };
    let srv = NbdServer::new(vec![e], limits).unwrap();
    let mut c = connect(&srv, false).await;
    c.read(1, 0, 65536).await; // holds the whole budget, gated
    c.read(2, 65536, 512).await;
    gated.wait_started(1).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while srv.stats().requests < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    gated.open();
    assert_eq!(c.recv().await.handle, 1);
    assert_eq!(c.recv().await.handle, 2);
    c.disconnect().await;
}

/// The global budget is shared: a second connection's read waits for the
/// first connection's reply.
#[tokio::test]
async fn backpressure_global_budget() {
    let te = make_engine(SIZE);
    let gated = GatedEngine::new(te.engine.clone(), 0);
    let mut e = Export::new("md1", gated.clone() as Arc<dyn BlockEngine>);
    e.block_sizes.maximum = 65536;
    let limits = Limits {
        global_inflight_bytes: 65536,
        ..Limits::default()
    };
    let srv = NbdServer::new(vec![e], limits).unwrap();
    let mut a = connect(&srv, false).await;
    let mut b = connect(&srv, false).await;
    a.read(1, 0, 65536).await;
    gated.wait_started(1).await;
    b.read(2, 65536, 512).await;
    let gate = gated.gate.subscribe();
    let brecv = tokio::spawn(async move {
        let r = b.recv().await;
        // Only possible after A's permits were released, i.e. after the gate opened.
        assert!(*gate.borrow(), "B completed while A held the global budget");
        (r, b)
    });
    // Let B's request be parsed, then give the (single-threaded) runtime
    // ample turns: without a shared budget B would be answered now.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while srv.stats().requests < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
    assert!(
        !brecv.is_finished(),
        "B completed while A held the global budget"
    );
    gated.open();
    assert_eq!(a.recv().await.handle, 1);
    let (r, b) = within(brecv).await.unwrap();
    assert_eq!((r.handle, r.error), (2, 0));
    a.disconnect().await;
    b.disconnect().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_and_refuses_new_requests() {
    let te = make_engine(SIZE);
    let gated = GatedEngine::new(te.engine.clone(), 0);
    let srv = server_with(gated.clone(), Limits::default());
    let l = listen(&srv);
    let s = tokio::net::UnixStream::connect(&l.path).await.unwrap();
    let mut c = Client::connect(s, true).await;
    // A second client still negotiating.
    let mut idle = tokio::net::UnixStream::connect(&l.path).await.unwrap();
    hello(&mut idle, 3).await;

    c.write(1, 0, &pattern(5, 4096)).await;
    gated.wait_started(1).await;
    let srv2 = Arc::clone(&srv);
    let shutdown = tokio::spawn(async move { srv2.shutdown().await });
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !srv.is_shutting_down() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    // New request while the write is in flight: ESHUTDOWN.
    c.read(2, 4096, 512).await;
    let r = c.recv().await;
    assert_eq!((r.handle, r.error), (2, ESHUTDOWN));
    expect_closed(&mut idle).await;
    // The in-flight write completes and is acknowledged, then the connection closes.
    gated.open();
    let r = c.recv().await;
    assert_eq!((r.handle, r.error), (1, 0));
    expect_closed(&mut c.s).await;
    within(shutdown).await.unwrap();
    assert_eq!(srv.stats().connections_open, 0);
    assert!(within(l.accept).await.unwrap().is_ok(), "accept loop ended");
    assert_eq!(
        engine_bytes(te.engine.as_ref(), 0, 4096).await,
        pattern(5, 4096)
    );
    // The listener is gone: nobody accepts new clients any more.
    match tokio::net::UnixStream::connect(&l.path).await {
        Err(_) => {}
        Ok(mut s) => expect_closed(&mut s).await,
    }
}

/// A client that stops reading replies cannot hold the server's shutdown
/// past the grace period: the connection, waiting for room in the reply
/// queue (its writer is stuck on the full socket), still watches the grace
/// timer (the reply queue is polled first there, see `Replies::send`).
#[tokio::test]
async fn client_not_reading_replies_is_closed_after_the_shutdown_grace() {
    let te = make_engine(SIZE);
    let limits = Limits {
        shutdown_grace: std::time::Duration::from_millis(200),
        reply_queue: 1,
        ..Limits::default()
    };
    let srv = server_with(te.engine.clone(), limits);
    let (s, conn) = pair(&srv);
    let mut c = Client::connect(s, false).await;
    // 64 x 64 KiB of read replies, far more than the socket buffer holds;
    // the client never reads them.
    for i in 0..64u64 {
        c.read(i, i * 65536, 65536).await;
    }
    // Eight replies (512 KiB) are more than the socket and the writer's
    // buffer take: from then on the connection cannot finish by itself.
    eventually("requests parsed", || srv.stats().requests >= 8).await;
    within(srv.shutdown()).await;
    let r = within(conn).await.unwrap();
    assert!(
        matches!(r, Err(NbdError::ShutdownGraceExpired(_))),
        "connection ended with {r:?}"
    );
    assert_eq!(srv.stats().connections_open, 0);
    drop(c);
}

#[tokio::test]
async fn handshake_client_during_shutdown_is_closed() {
    let te = make_engine(SIZE);
    let srv = server_with(te.engine.clone(), Limits::default());
    let (mut s, conn) = pair(&srv);
    hello(&mut s, 3).await;
    // Send the option before shutdown so it is buffered when the flag flips.
    let srv2 = Arc::clone(&srv);
    let shut = tokio::spawn(async move { srv2.shutdown().await });
    send_opt(&mut s, OPT_LIST, &[]).await;
    // Either the option is answered ERR_SHUTDOWN or the connection is simply closed.
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 8];
    if within(s.read_exact(&mut head)).await.is_ok() {
        let _opt = read_u32(&mut s).await;
        let typ = read_u32(&mut s).await;
        assert!(
            typ == REP_ERR_SHUTDOWN || typ == REP_SERVER,
            "reply {typ:#x}"
        );
    }
    expect_closed(&mut s).await;
    within(shut).await.unwrap();
    let _ = within(conn).await.unwrap();
}

/// The kernel path: no handshake, transmission at once with simple replies;
/// the parameters the agent gives the kernel come from `export_params`.
#[tokio::test]
async fn preconnected_transmission_without_handshake() {
    let te = make_engine(SIZE);
    let srv = server_with(te.engine.clone(), Limits::default());
    let p = srv.export_params("md1").unwrap();
    assert_eq!(p.size, SIZE);
    assert_eq!(p.transmission_flags, 1 | 4 | 8 | 32 | 64 | 256);
    assert_eq!(p.block_sizes.minimum, 512);
    assert!(srv.export_params("md9").is_none());

    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let srv2 = Arc::clone(&srv);
    let conn = tokio::spawn(async move { srv2.serve_transmission(b, "md1").await });
    let mut c = Client::connect_raw(a, false, p.size, p.transmission_flags);
    c.request(FLAG_FUA, CMD_WRITE, 1, 8192, 4096, &pattern(8, 4096))
        .await;
    assert_eq!(c.recv().await.error, 0);
    c.read(2, 8192, 4096).await;
    assert_eq!(c.recv().await.data.unwrap(), pattern(8, 4096));
    c.disconnect().await;
    assert!(within(conn).await.unwrap().is_ok());

    let (_a, b) = tokio::net::UnixStream::pair().unwrap();
    assert!(matches!(
        srv.serve_transmission(b, "md9").await,
        Err(NbdError::UnknownExport(_))
    ));
    assert_eq!(srv.stats().connections_open, 0);
}

/// Status of byte `x` in descriptors starting at `offset`.
fn status_at(d: &[(u32, u32)], offset: u64, x: u64) -> Option<u32> {
    let mut at = offset;
    for &(len, flags) in d {
        if x >= at && x < at + len as u64 {
            return Some(flags);
        }
        at += len as u64;
    }
    None
}

/// `NBD_CMD_BLOCK_STATUS` with `base:allocation` (spec "Metadata querying"):
/// written data is reported allocated, trimmed ranges as holes that read as
/// zeroes, descriptors follow the protocol's rules (nonzero multiples of the
/// minimum block size, within the request, adjacent ones differ, one with
/// REQ_ONE); bad requests get EINVAL and the connection goes on. Runs on the
/// memory engine by default and on real files with `MIRROR_NBD_TEST_ENGINE`.
#[tokio::test]
async fn block_status_reports_data_and_holes() {
    const K: u64 = 1024;
    let te = make_engine(SIZE);
    let srv = server_512(&te);
    let (s, _h) = pair(&srv);
    let mut c = Client::connect_meta(s).await;
    c.write(1, 64 * K, &pattern(1, 64 * K as usize)).await;
    c.write(2, 256 * K, &pattern(2, 128 * K as usize)).await;
    assert!(c.recv_n(2).await.values().all(|r| r.error == 0));
    c.request(0, CMD_TRIM, 3, 256 * K, 128 * K as u32, &[])
        .await;
    assert_eq!(c.recv().await.error, 0);

    // The whole volume, longer than the maximum block size (a hint only).
    let d = c.block_status(10, 0, 0, SIZE as u32).await.unwrap();
    assert!(!d.is_empty());
    let total: u64 = d.iter().map(|&(l, _)| l as u64).sum();
    assert!((384 * K..=SIZE).contains(&total), "covered {total}");
    for &(len, flags) in &d {
        assert!(len > 0 && len % 512 == 0, "{d:?}");
        assert!(flags == 0 || flags == STATE_HOLE | STATE_ZERO, "{d:?}");
    }
    assert!(
        d.windows(2).all(|w| w[0].1 != w[1].1),
        "adjacent descriptors differ: {d:?}"
    );
    for x in [64 * K, 100 * K, 128 * K - 1] {
        assert_eq!(status_at(&d, 0, x), Some(0), "written byte {x}: {d:?}");
    }
    for x in [256 * K, 300 * K, 384 * K - 1] {
        assert_eq!(
            status_at(&d, 0, x),
            Some(STATE_HOLE | STATE_ZERO),
            "trimmed byte {x}: {d:?}"
        );
    }
    // Whatever is reported as a hole reads as zeroes.
    let mut at = 0u64;
    for &(len, flags) in &d {
        if flags & STATE_ZERO != 0 {
            let n = (len as u64).min(64 * K) as usize;
            assert_eq!(
                engine_bytes(te.engine.as_ref(), at, n).await,
                vec![0; n],
                "hole at {at}"
            );
        }
        at += len as u64;
    }

    // REQ_ONE: one descriptor, within the request.
    let one = c
        .block_status(11, FLAG_REQ_ONE, 64 * K, 512 * K as u32)
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].1, 0);
    assert!(one[0].0 as u64 <= 64 * K && one[0].0 > 0, "{one:?}");
    let one = c
        .block_status(12, FLAG_REQ_ONE, 256 * K, 4 * K as u32)
        .await
        .unwrap();
    assert_eq!(one, vec![(4 * K as u32, STATE_HOLE | STATE_ZERO)]);
    // FUA is accepted on any command (and means nothing here).
    assert!(c.block_status(13, FLAG_FUA, 0, 4096).await.is_ok());

    #[rustfmt::skip]
    let bad: [(&str, u16, u64, u32); 5] = [
        ("beyond end", 0, SIZE - 512, 1024),
        ("zero length", 0, 0, 0),
        ("unaligned offset", 0, 100, 512),
        ("unaligned length", 0, 0, 700),
        ("DF flag", FLAG_DF, 0, 512),
    ];
    for (i, (what, flags, off, len)) in bad.into_iter().enumerate() {
        assert_eq!(
            c.block_status(20 + i as u64, flags, off, len).await,
            Err(EINVAL),
            "{what}"
        );
    }
    c.read(30, 64 * K, 4096).await;
    assert_eq!(
        c.recv().await.data.unwrap(),
        pattern(1, 64 * K as usize)[..4096]
    );
    c.disconnect().await;
}
