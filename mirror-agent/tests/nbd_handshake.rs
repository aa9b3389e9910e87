//! NBD handshake: options, export selection, hostile negotiation input.

mod nbd_common;

use std::sync::Arc;

use mirror_agent::nbd::testing::MemEngine;
use mirror_agent::nbd::{Export, Limits, NbdError, NbdServer};
use nbd_common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const SIZE: u64 = 1 << 20;

fn server() -> Arc<NbdServer> {
    server_with(MemEngine::new(SIZE as usize), Limits::default())
}

#[tokio::test]
async fn greeting_and_go_with_all_infos() {
    let srv = server();
    let (mut s, conn) = pair(&srv);
    let flags = hello(&mut s, 3).await;
    assert_eq!(flags, 0b11, "FIXED_NEWSTYLE | NO_ZEROES");
    let infos = info_or_go(&mut s, OPT_GO, "md1", &[1, 2, 3]).await.unwrap();
    let (size, tflags) = export_info(&infos);
    assert_eq!(size, SIZE);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN; no DF without structured.
    assert_eq!(tflags, 1 | 4 | 8 | 32 | 64 | 256);
    assert_eq!(infos[&1], b"md1");
    assert_eq!(infos[&2], b"test resource md1");
    let bs = &infos[&3];
    assert_eq!(u32::from_be_bytes(bs[0..4].try_into().unwrap()), 512);
    assert_eq!(u32::from_be_bytes(bs[4..8].try_into().unwrap()), 4096);
    assert_eq!(u32::from_be_bytes(bs[8..12].try_into().unwrap()), 32 << 20);
    // In transmission now: a read works.
    let mut c = Client::connect_raw(s, false, size, tflags);
    c.read(1, 0, 512).await;
    let r = c.recv().await;
    assert_eq!(r.error, 0);
    assert_eq!(r.data.unwrap(), vec![0; 512]);
    c.disconnect().await;
    assert!(within(conn).await.unwrap().is_ok());
}

#[tokio::test]
async fn info_then_list_then_structured_go() {
    let srv = server();
    let (mut s, _conn) = pair(&srv);
    hello(&mut s, 1).await;
    // INFO without requests: EXPORT (+ BLOCK_SIZE unasked), no NAME/DESCRIPTION.
    let infos = info_or_go(&mut s, OPT_INFO, "md1", &[]).await.unwrap();
    assert!(infos.contains_key(&0) && infos.contains_key(&3));
    assert!(!infos.contains_key(&1) && !infos.contains_key(&2));
    // LIST: one server entry then ACK.
    send_opt(&mut s, OPT_LIST, &[]).await;
    let (opt, typ, data) = opt_reply(&mut s).await;
    assert_eq!((opt, typ), (OPT_LIST, REP_SERVER));
    assert_eq!(u32::from_be_bytes(data[0..4].try_into().unwrap()), 3);
    assert_eq!(&data[4..7], b"md1");
    assert_eq!(opt_reply(&mut s).await.1, REP_ACK);
    // LIST with data is invalid, connection stays usable.
    send_opt(&mut s, OPT_LIST, b"x").await;
    assert_eq!(opt_reply(&mut s).await.1, REP_ERR_INVALID);
    // STRUCTURED_REPLY then GO: DF advertised.
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(opt_reply(&mut s).await.1, REP_ACK);
    let infos = info_or_go(&mut s, OPT_GO, "", &[]).await.unwrap();
    let (size, tflags) = export_info(&infos);
    assert_ne!(tflags & 128, 0, "SEND_DF with structured replies");
    let mut c = Client::connect_raw(s, true, size, tflags);
    c.read(9, 4096, 4096).await;
    let r = c.recv().await;
    assert!(r.structured);
    assert_eq!(r.data.unwrap().len(), 4096);
    c.disconnect().await;
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    for (client_flags, tail) in [(3u32, 0usize), (1, 124)] {
        let srv = server();
        let (mut s, _conn) = pair(&srv);
        hello(&mut s, client_flags).await;
        send_opt(&mut s, OPT_EXPORT_NAME, b"md1").await;
        assert_eq!(read_u64(&mut s).await, SIZE);
        let tflags = read_u16(&mut s).await;
        assert_eq!(tflags & 1, 1);
        if tail > 0 {
            assert_eq!(read_n(&mut s, tail).await, vec![0; tail]);
        }
        // The next bytes are transmission replies, not zeroes.
        let mut c = Client::connect_raw(s, false, SIZE, tflags);
        c.write(5, 0, &[7u8; 512]).await;
        let r = c.recv().await;
        assert_eq!((r.handle, r.error), (5, 0));
        c.disconnect().await;
    }
}

#[tokio::test]
async fn default_name_selects_single_export() {
    let srv = server();
    let (mut s, _conn) = pair(&srv);
    hello(&mut s, 3).await;
    send_opt(&mut s, OPT_EXPORT_NAME, b"").await;
    assert_eq!(read_u64(&mut s).await, SIZE);
}

#[tokio::test]
async fn default_name_ambiguous_with_two_exports() {
    let a = Export::new("md1", MemEngine::new(4096));
    let b = Export::new("md2", MemEngine::new(8192));
    let srv = NbdServer::new(vec![a, b], Limits::default()).unwrap();
    let (mut s, _conn) = pair(&srv);
    hello(&mut s, 3).await;
    assert_eq!(
        info_or_go(&mut s, OPT_INFO, "", &[]).await.unwrap_err(),
        REP_ERR_UNKNOWN
    );
    let infos = info_or_go(&mut s, OPT_INFO, "md2", &[]).await.unwrap();
    assert_eq!(export_info(&infos).0, 8192);
    let infos = info_or_go(&mut s, OPT_GO, "md1", &[]).await.unwrap();
    assert_eq!(export_info(&infos).0, 4096);
}

#[tokio::test]
async fn unknown_and_unsupported_options() {
    let srv = server();
    let (mut s, _conn) = pair(&srv);
    hello(&mut s, 3).await;
    for opt in [OPT_STARTTLS, OPT_EXTENDED_HEADERS, 4, 12345] {
        send_opt(&mut s, opt, b"").await;
        let (o, typ, _) = opt_reply(&mut s).await;
        assert_eq!((o, typ), (opt, REP_ERR_UNSUP), "option {opt}");
    }
    // Unknown export on INFO and GO: ERR_UNKNOWN, negotiation continues.
    assert_eq!(
        info_or_go(&mut s, OPT_INFO, "nope", &[]).await.unwrap_err(),
        REP_ERR_UNKNOWN
    );
    assert_eq!(
        info_or_go(&mut s, OPT_GO, "nope", &[]).await.unwrap_err(),
        REP_ERR_UNKNOWN
    );
    // Malformed INFO payload (name length beyond data): ERR_INVALID.
    send_opt(&mut s, OPT_INFO, b"\0\0\0\x40md1\0\0").await;
    assert_eq!(opt_reply(&mut s).await.1, REP_ERR_INVALID);
    // STRUCTURED_REPLY with data: ERR_INVALID.
    send_opt(&mut s, OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(opt_reply(&mut s).await.1, REP_ERR_INVALID);
    // Still usable.
    assert!(info_or_go(&mut s, OPT_GO, "md1", &[]).await.is_ok());
}

#[tokio::test]
async fn abort_is_acknowledged_and_closes() {
    let srv = server();
    let (mut s, conn) = pair(&srv);
    hello(&mut s, 3).await;
    send_opt(&mut s, OPT_ABORT, &[]).await;
    let (o, typ, _) = opt_reply(&mut s).await;
    assert_eq!((o, typ), (OPT_ABORT, REP_ACK));
    expect_closed(&mut s).await;
    assert!(within(conn).await.unwrap().is_ok());
}

#[tokio::test]
async fn unknown_export_name_closes() {
    let srv = server();
    let (mut s, conn) = pair(&srv);
    hello(&mut s, 3).await;
    send_opt(&mut s, OPT_EXPORT_NAME, b"md9").await;
    expect_closed(&mut s).await;
    assert!(matches!(within(conn).await.unwrap(), Err(NbdError::UnknownExport(n)) if n == "md9"));
}

/// Each hostile handshake closes that connection with the named reason, and
/// the server keeps serving a well-behaved client afterwards.
#[tokio::test]
async fn hostile_handshakes_close_and_server_keeps_serving() {
    let engine = MemEngine::new(SIZE as usize);
    let srv = server_with(engine.clone(), Limits::default());
    let l = listen(&srv);

    type Check = fn(&NbdError) -> bool;
    let cases: Vec<(&str, Vec<u8>, bool, Check)> = vec![
        (
            "garbage instead of client flags",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            false,
            |e| matches!(e, NbdError::BadClientFlags { .. }),
        ),
        (
            "wrong option magic",
            {
                let mut v = 3u32.to_be_bytes().to_vec();
                v.extend_from_slice(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
                v
            },
            false,
            |e| matches!(e, NbdError::BadOptionMagic { .. }),
        ),
        (
            "truncated option",
            {
                let mut v = 3u32.to_be_bytes().to_vec();
                v.extend_from_slice(&IHAVEOPT.to_be_bytes());
                v.extend_from_slice(&OPT_GO.to_be_bytes());
                v.extend_from_slice(&100u32.to_be_bytes());
                v.extend_from_slice(b"\0\0\0\x03md1");
                v
            },
            true,
            |e| {
                matches!(
                    e,
                    NbdError::Truncated {
                        what: "option data",
                        ..
                    }
                )
            },
        ),
        (
            "option length beyond bound",
            {
                let mut v = 3u32.to_be_bytes().to_vec();
                v.extend_from_slice(&IHAVEOPT.to_be_bytes());
                v.extend_from_slice(&OPT_GO.to_be_bytes());
                v.extend_from_slice(&(1u32 << 30).to_be_bytes());
                v
            },
            false,
            |e| matches!(e, NbdError::OptionTooLong { length, .. } if *length == 1 << 30),
        ),
        ("truncated client flags", vec![0, 0], true, |e| {
            matches!(
                e,
                NbdError::Truncated {
                    what: "client flags",
                    ..
                }
            )
        }),
    ];
    for (what, bytes, half_close, check) in cases {
        let (mut s, conn) = pair(&srv);
        assert_eq!(read_u64(&mut s).await, NBDMAGIC);
        read_n(&mut s, 10).await;
        s.write_all(&bytes).await.unwrap();
        if half_close {
            s.shutdown().await.unwrap();
        }
        expect_closed(&mut s).await;
        let err = within(conn).await.unwrap().expect_err(what);
        assert!(check(&err), "{what}: unexpected reason {err}");
        // The reason is human-readable (this is what the log line carries).
        assert!(!err.to_string().is_empty());

        // A good client over the listener still works.
        let good = tokio::net::UnixStream::connect(&l.path).await.unwrap();
        let mut c = Client::connect(good, false).await;
        c.write(1, 0, &[1u8; 512]).await;
        assert_eq!(c.recv().await.error, 0);
        c.disconnect().await;
    }
    assert_eq!(
        engine.snapshot()[512..],
        vec![0u8; SIZE as usize - 512][..],
        "nothing else written"
    );
}

#[tokio::test]
async fn handshake_timeout_closes_idle_client() {
    let limits = Limits {
        handshake_timeout: std::time::Duration::from_millis(200),
        ..Limits::default()
    };
    let srv = server_with(MemEngine::new(4096), limits);
    let (mut s, conn) = pair(&srv);
    hello(&mut s, 3).await;
    // Send nothing: the server gives up after the timeout.
    expect_closed(&mut s).await;
    assert!(matches!(
        within(conn).await.unwrap(),
        Err(NbdError::HandshakeTimeout(_))
    ));
}

#[tokio::test]
async fn config_validation() {
    let e = || Export::new("md1", MemEngine::new(1 << 20));
    assert!(NbdServer::new(vec![], Limits::default()).is_err());
    assert!(
        NbdServer::new(vec![e(), e()], Limits::default()).is_err(),
        "duplicate names"
    );
    let mut bad = e();
    bad.block_sizes.minimum = 3;
    assert!(NbdServer::new(vec![bad], Limits::default()).is_err());
    let mut bad = e();
    bad.block_sizes.maximum = 1000;
    assert!(NbdServer::new(vec![bad], Limits::default()).is_err());
    let small = Limits {
        conn_inflight_bytes: 1 << 20,
        ..Limits::default()
    };
    assert!(
        NbdServer::new(vec![e()], small).is_err(),
        "max block above per-connection budget"
    );
    assert!(NbdServer::new(vec![e()], Limits::default()).is_ok());
}

#[tokio::test]
async fn unix_listener_permissions_and_stale_socket() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let l = mirror_agent::nbd::bind_unix(&path, None).unwrap();
    let md = std::fs::metadata(&path).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    // A live socket is not stolen.
    assert!(mirror_agent::nbd::bind_unix(&path, None).is_err());
    drop(l);
    // Stale socket is replaced; custom mode honoured.
    let _l = mirror_agent::nbd::bind_unix(&path, Some(0o660)).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o660
    );
    // A regular file is never removed.
    let file = dir.path().join("data");
    std::fs::write(&file, b"keep").unwrap();
    assert!(matches!(
        mirror_agent::nbd::bind_unix(&file, None),
        Err(NbdError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // TCP helper binds an ephemeral loopback port.
    let t = mirror_agent::nbd::bind_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert!(t.local_addr().unwrap().port() != 0);
}

/// The close reason is logged (the operator sees why a client was dropped).
#[tokio::test]
async fn close_reason_is_logged() {
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // current_thread runtime: the server's tasks run on this thread.
    let _g = tracing::subscriber::set_default(sub);
    let srv = server();
    let (mut s, conn) = pair(&srv);
    hello(&mut s, 3).await;
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_INFO.to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    s.write_all(&m).await.unwrap();
    expect_closed(&mut s).await;
    assert!(within(conn).await.unwrap().is_err());
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("NBD connection closed") && log.contains("above the bound of 65536"),
        "log: {log}"
    );
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` (spec
/// "Metadata querying"): one context, `base:allocation`; structured replies
/// first; unknown namespaces ignored; malformed payloads and unknown exports
/// refused with a reply naming the fault, the negotiation going on.
#[tokio::test]
async fn meta_contexts_offer_base_allocation() {
    let srv = server();
    let (mut s, _conn) = pair(&srv);
    hello(&mut s, 3).await;
    let md1 = meta_data("md1", &["base:allocation"]);
    // Before structured replies: refused (block status replies are structured).
    for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        assert_eq!(
            meta_context(&mut s, opt, &md1).await,
            Err(REP_ERR_INVALID),
            "option {opt}"
        );
    }
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(opt_reply(&mut s).await.1, REP_ACK);

    let base = vec![(0, "base:allocation".to_string())];
    // LIST: no query lists everything; `base:` is a wildcard; ids are 0.
    for q in [
        &[][..],
        &["base:"][..],
        &["base:allocation"][..],
        &["x-other:thing", "base:"][..],
    ] {
        let got = meta_context(&mut s, OPT_LIST_META_CONTEXT, &meta_data("md1", q)).await;
        assert_eq!(got, Ok(base.clone()), "LIST {q:?}");
    }
    // Unknown namespace or leaf: nothing, not an error. The default export is md1.
    for q in [&["qemu:dirty-bitmap:b0"][..], &["base:nope"][..]] {
        let got = meta_context(&mut s, OPT_LIST_META_CONTEXT, &meta_data("", q)).await;
        assert_eq!(got, Ok(vec![]), "LIST {q:?}");
    }
    // Refusals, each followed by a usable negotiation.
    let no_colon = meta_data("md1", &["allocation"]);
    let mut truncated = md1.clone();
    truncated.pop();
    let mut trailing = md1.clone();
    trailing.push(0);
    for (what, opt, data, want) in [
        (
            "unknown export",
            OPT_LIST_META_CONTEXT,
            meta_data("nope", &[]),
            REP_ERR_UNKNOWN,
        ),
        (
            "unknown export",
            OPT_SET_META_CONTEXT,
            meta_data("nope", &["base:allocation"]),
            REP_ERR_UNKNOWN,
        ),
        (
            "query without namespace",
            OPT_SET_META_CONTEXT,
            no_colon,
            REP_ERR_INVALID,
        ),
        (
            "truncated query",
            OPT_SET_META_CONTEXT,
            truncated,
            REP_ERR_INVALID,
        ),
        (
            "trailing bytes",
            OPT_LIST_META_CONTEXT,
            trailing,
            REP_ERR_INVALID,
        ),
    ] {
        assert_eq!(meta_context(&mut s, opt, &data).await, Err(want), "{what}");
    }
    // SET: `base:` selects nothing (the protocol has SET ignore it); the full
    // name selects the context with a nonzero id; other namespaces are ignored.
    let got = meta_context(&mut s, OPT_SET_META_CONTEXT, &meta_data("md1", &["base:"])).await;
    assert_eq!(got, Ok(vec![]));
    let got = meta_context(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta_data("md1", &["x-foo:bar", "base:allocation"]),
    )
    .await
    .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, "base:allocation");
    assert_ne!(got[0].0, 0);
    assert!(info_or_go(&mut s, OPT_GO, "md1", &[]).await.is_ok());
}

/// Block status is allowed only when the last SET_META_CONTEXT selected the
/// context for the export that GO then picks: a later SET that fails, or
/// selects nothing, or a GO to another export, leaves it refused (EINVAL).
#[tokio::test]
async fn block_status_needs_the_last_set_for_the_chosen_export() {
    async fn status_errno(s: UnixStream, size: u64, tflags: u16) -> u32 {
        let mut c = Client::connect_raw(s, true, size, tflags);
        c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096, &[]).await;
        let r = c.recv().await;
        assert_eq!(r.handle, 1);
        c.disconnect().await;
        r.error
    }
    let srv = NbdServer::new(
        vec![
            Export::new("md1", MemEngine::new(4096)),
            Export::new("md2", MemEngine::new(8192)),
        ],
        Limits::default(),
    )
    .unwrap();
    let select = meta_data("md1", &["base:allocation"]);
    // (what happens after a successful SET for md1, export for GO, expected errno)
    let cases: [(&str, Option<Vec<u8>>, &str, u32); 4] = [
        ("selected, same export", None, "md1", 0),
        (
            "later SET fails",
            Some(meta_data("nope", &["base:allocation"])),
            "md1",
            EINVAL,
        ),
        (
            "later SET selects nothing",
            Some(meta_data("md1", &[])),
            "md1",
            EINVAL,
        ),
        ("GO to another export", None, "md2", EINVAL),
    ];
    for (what, later, go, want) in cases {
        let (mut s, _conn) = pair(&srv);
        hello(&mut s, 3).await;
        send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(opt_reply(&mut s).await.1, REP_ACK);
        assert_eq!(
            meta_context(&mut s, OPT_SET_META_CONTEXT, &select)
                .await
                .unwrap()
                .len(),
            1
        );
        if let Some(d) = later {
            let _ = meta_context(&mut s, OPT_SET_META_CONTEXT, &d).await;
        }
        let infos = info_or_go(&mut s, OPT_GO, go, &[]).await.unwrap();
        let (size, tflags) = export_info(&infos);
        assert_eq!(status_errno(s, size, tflags).await, want, "{what}");
    }
}
