//! FaultyEngine: rules fail only the requests they select, errnos survive,
//! torn writes apply exactly their prefix, the crash point drops later writes.

use std::sync::Arc;

use bytes::Bytes;
use mirror_agent::engine::{
    self, BlockEngine, DirectIo, FaultAction, FaultOp, FaultRule, FaultTrigger, FaultyEngine,
    UringEngine,
};

const SIZE: u64 = 4 << 20;

fn setup() -> (tempfile::TempDir, Arc<FaultyEngine>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data");
    engine::create_data_file(&path, SIZE).expect("create");
    let inner = UringEngine::open(&path, DirectIo::Auto, 16).expect("open");
    (dir, Arc::new(FaultyEngine::new(Arc::new(inner))))
}

fn bytes(v: u8, n: usize) -> Bytes {
    Bytes::from(vec![v; n])
}

#[tokio::test(flavor = "multi_thread")]
async fn eio_on_a_range_fails_only_that_request() {
    let (_d, f) = setup();
    let id = f.add_rule(FaultRule::fail_range(
        &[FaultOp::Write, FaultOp::Read],
        65536,
        4096,
        libc::EIO,
    ));
    // Concurrent requests: only the one touching the range fails.
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            (i, f.write(i * 8192, bytes(i as u8 + 1, 8192), false).await)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.expect("task");
        if i == 8 {
            assert_eq!(
                r.expect_err("range write must fail").raw_os_error(),
                Some(libc::EIO)
            );
        } else {
            r.unwrap_or_else(|e| panic!("write {i} failed: {e}"));
        }
    }
    assert_eq!(f.fired(id), Some(1));
    assert_eq!(
        f.read(65536 + 4095, 1)
            .await
            .expect_err("read in range")
            .raw_os_error(),
        Some(libc::EIO)
    );
    // Just outside the range on both sides: fine.
    assert_eq!(f.read(65536 - 1, 1).await.expect("before"), vec![8]);
    assert_eq!(
        f.read(65536 + 4096, 1).await.expect("after"),
        vec![0],
        "failed write must not have been applied"
    );
    let c = f.counters();
    assert_eq!((c.writes, c.reads, c.injected), (32, 3, 2));
    assert!(f.remove_rule(id));
    f.write(65536, bytes(9, 10), false)
        .await
        .expect("rule removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn enospc_surfaces_with_errno_and_nth_counts() {
    let (_d, f) = setup();
    f.add_rule(FaultRule::fail_nth(&[FaultOp::Write], 3, libc::ENOSPC));
    f.add_rule(FaultRule {
        ops: vec![FaultOp::Flush],
        trigger: FaultTrigger::Always,
        action: FaultAction::Fail(libc::EIO),
        times: Some(2),
    });
    for i in 1..=5u64 {
        let r = f.write(i * 512, bytes(1, 512), false).await;
        if i == 3 {
            assert_eq!(r.expect_err("3rd write").raw_os_error(), Some(libc::ENOSPC));
        } else {
            r.unwrap_or_else(|e| panic!("write {i}: {e}"));
        }
    }
    assert_eq!(
        f.flush().await.expect_err("flush 1").raw_os_error(),
        Some(libc::EIO)
    );
    assert_eq!(
        f.flush().await.expect_err("flush 2").raw_os_error(),
        Some(libc::EIO)
    );
    f.flush().await.expect("rule exhausted");
    f.write_zeroes(0, 512, false, false)
        .await
        .expect("other ops unaffected");
    assert_eq!(f.counters().write_zeroes, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn torn_write_applies_only_prefix() {
    let (_d, f) = setup();
    f.add_rule(FaultRule::torn_write_nth(1, 1000));
    let r = f.write(4096, bytes(0xAB, 4096), false).await;
    assert_eq!(r.expect_err("torn").raw_os_error(), Some(libc::EIO));
    let back = f.read(4096, 4096).await.expect("read");
    assert!(back[..1000].iter().all(|&b| b == 0xAB));
    assert!(back[1000..].iter().all(|&b| b == 0));
    f.write(4096, bytes(0xCD, 4096), false)
        .await
        .expect("second write passes");
    assert!(f
        .read(4096, 4096)
        .await
        .expect("read")
        .iter()
        .all(|&b| b == 0xCD));
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_point_drops_later_writes() {
    let (_d, f) = setup();
    f.crash_after_writes(2);
    f.write(0, bytes(1, 512), false).await.expect("w1");
    f.discard(512, 512).await.expect("w2");
    assert!(!f.crashed());
    let r = f.write(1024, bytes(3, 512), false).await;
    assert_eq!(r.expect_err("after crash").raw_os_error(), Some(libc::EIO));
    assert!(f.crashed());
    assert_eq!(
        f.flush()
            .await
            .expect_err("flush after crash")
            .raw_os_error(),
        Some(libc::EIO)
    );
    // Reads pass and show the write never reached the disk.
    assert_eq!(f.read(1024, 512).await.expect("read"), vec![0; 512]);
    assert_eq!(f.read(0, 1).await.expect("read"), vec![1]);
    assert_eq!(f.counters().dropped, 2);
    f.reset_crash();
    f.write(1024, bytes(3, 512), false)
        .await
        .expect("after restart");
}
