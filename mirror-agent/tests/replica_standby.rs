//! The standby loop driven frame by frame: a raw peer session plays the
//! active node (`peer::testing::pair_in_memory`), `run_standby` serves the
//! other end over a [`GatedEngine`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mirror_agent::engine::{BlockEngine, EngineOptions, FaultOp, FaultRule, FaultyEngine};
use mirror_agent::nbd::testing::MemEngine;
use mirror_agent::peer::testing::{hello, pair_in_memory};
use mirror_agent::peer::Session;
use mirror_agent::replica::testing::GatedEngine;
use mirror_agent::replica::{
    run_standby_with, Durability, ReplicaError, StandbyEnd, StandbyOptions,
};
use mirror_proto::Message;
use tokio::task::JoinHandle;

const VOL: u64 = 1 << 20;

type Standby = JoinHandle<Result<StandbyEnd, ReplicaError>>;

/// Starts `run_standby_with` over `engine` on one end of an in-memory pair; returns the other
/// end, which the test drives as the active node.
fn start_with(engine: Arc<dyn BlockEngine>, opts: StandbyOptions) -> (Session, Standby) {
    let size = engine.size();
    let (a, b) = pair_in_memory(
        hello("alpha", "c", "r0", size, 4096),
        hello("beta", "c", "r0", size, 4096),
    );
    (a, tokio::spawn(run_standby_with(engine, b.into(), opts)))
}

fn start(engine: Arc<dyn BlockEngine>, durability: Durability) -> (Session, Standby) {
    let opts = StandbyOptions {
        durability,
        ..StandbyOptions::default()
    };
    start_with(engine, opts)
}

/// Closes the active end and returns how the standby ended (it must end without error).
async fn stop(a: &Session, standby: Standby) -> StandbyEnd {
    a.tx.close("done");
    standby.await.unwrap().unwrap()
}

/// A volume of `VOL` zero bytes in memory and a [`GatedEngine`] over it: the test holds or
/// delays operations through the gate and checks contents in memory.
fn gated_volume() -> (Arc<MemEngine>, GatedEngine) {
    let mem = MemEngine::new(VOL as usize);
    let gate = GatedEngine::new(mem.clone());
    (mem, gate)
}

async fn recv(a: &mut Session) -> Message {
    tokio::time::timeout(Duration::from_secs(10), a.rx.recv())
        .await
        .expect("no frame from the standby")
        .expect("closed")
        .msg
}

/// Sends a Write of `data` at `offset`; returns its seq.
async fn send_write(a: &Session, offset: u64, data: Bytes) -> u64 {
    a.tx.send(Message::Write {
        offset,
        fua: false,
        data,
    })
    .await
    .unwrap()
}

/// Sends a Write of `len` bytes `byte` at `offset`; returns its seq.
async fn write(a: &Session, offset: u64, byte: u8, len: usize) -> u64 {
    send_write(a, offset, Bytes::from(vec![byte; len])).await
}

/// Asserts the next two frames are write `seq`'s Ack1 and then its Ack2 with `status`.
async fn assert_ack1_then_ack2(a: &mut Session, seq: u64, status: i32) {
    assert_eq!(recv(a).await, Message::Ack1 { seq });
    assert_eq!(recv(a).await, Message::Ack2 { seq, status });
}

/// Receives frames until `n` Ack2s came, each of them a success; other frames (Ack1) are
/// skipped.
async fn wait_ack2s_ok(a: &mut Session, n: usize) {
    let mut ack2 = 0;
    while ack2 < n {
        if let Message::Ack2 { status, .. } = recv(a).await {
            assert_eq!(status, 0);
            ack2 += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_write_gets_ack2_einval_only() {
    let mem = MemEngine::new(VOL as usize);
    let (mut a, standby) = start(mem.clone(), Durability::GroupCommit);
    let bad = write(&a, VOL - 100, 1, 4096).await;
    assert_eq!(
        recv(&mut a).await,
        Message::Ack2 {
            seq: bad,
            status: -libc::EINVAL
        }
    );
    let good = write(&a, 0, 2, 4096).await;
    assert_ack1_then_ack2(&mut a, good, 0).await;
    assert!(mem.snapshot()[VOL as usize - 100..].iter().all(|&b| b == 0));
    let end = stop(&a, standby).await;
    assert_eq!((end.applied, end.disk_error), (1, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack2_only_after_flush_and_flushes_are_shared() {
    let (_, gate) = gated_volume();
    gate.set_flushes_open(false);
    let (mut a, standby) = start(Arc::new(gate.clone()), Durability::GroupCommit);
    let first = write(&a, 0, 1, 4096).await;
    assert_eq!(recv(&mut a).await, Message::Ack1 { seq: first });
    gate.wait_held(1).await; // the committer's flush is held
    let mut rest = Vec::new();
    for i in 1..10u64 {
        rest.push(write(&a, i * 4096, i as u8, 4096).await);
    }
    for s in &rest {
        assert_eq!(recv(&mut a).await, Message::Ack1 { seq: *s });
    }
    while gate.applied() < 10 {
        tokio::task::yield_now().await;
    }
    assert!(a.rx.try_recv().is_err(), "Ack2 before the data was flushed");
    gate.set_flushes_open(true);
    let mut acked = Vec::new();
    for _ in 0..10 {
        match recv(&mut a).await {
            Message::Ack2 { seq, status: 0 } => acked.push(seq),
            other => panic!("unexpected {other:?}"),
        }
    }
    acked.sort();
    assert_eq!(acked[0], first);
    assert_eq!(&acked[1..], &rest[..]);
    // One flush for the first write, one for the nine that completed while it ran.
    assert_eq!(gate.flushed(), 2);
    assert_eq!(stop(&a, standby).await.flushes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_write_fua_mode_writes_each_request_durably() {
    let (mem, gate) = gated_volume();
    let (mut a, standby) = start(Arc::new(gate.clone()), Durability::PerWriteFua);
    for i in 0..5u64 {
        write(&a, i * 4096, 9, 4096).await;
    }
    wait_ack2s_ok(&mut a, 5).await;
    assert_eq!(
        (mem.flushes(), gate.flushed()),
        (5, 0),
        "FUA per write, no separate flushes"
    );
    stop(&a, standby).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_apply_in_seq_order() {
    let (mem, gate) = gated_volume();
    // The first write is slow, the second fast: without ordering the first would win.
    let mut delays = vec![Duration::ZERO, Duration::from_millis(50)];
    gate.set_delay(move || delays.pop().unwrap_or_default());
    let (mut a, standby) = start(Arc::new(gate.clone()), Durability::GroupCommit);
    write(&a, 0, 1, 8192).await;
    write(&a, 4096, 2, 8192).await;
    wait_ack2s_ok(&mut a, 2).await;
    let snap = mem.snapshot();
    assert!(snap[..4096].iter().all(|&b| b == 1));
    assert!(
        snap[4096..12288].iter().all(|&b| b == 2),
        "older write applied over the newer one"
    );
    stop(&a, standby).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_earlier_writes() {
    let (_, gate) = gated_volume();
    gate.set_writes_open(false);
    let (mut a, standby) = start(Arc::new(gate.clone()), Durability::GroupCommit);
    let w = write(&a, 0, 1, 4096).await;
    let f = a.tx.send(Message::Flush).await.unwrap();
    assert_eq!(recv(&mut a).await, Message::Ack1 { seq: w });
    gate.wait_held(1).await;
    // A later write overtakes the barrier (it need not wait for the flush).
    let later = write(&a, 65536, 3, 4096).await;
    assert_eq!(recv(&mut a).await, Message::Ack1 { seq: later });
    assert!(
        a.rx.try_recv().is_err(),
        "FlushAck before the earlier write completed"
    );
    gate.set_writes_open(true);
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(recv(&mut a).await);
    }
    assert!(got.contains(&Message::FlushAck { seq: f, status: 0 }));
    assert!(got.contains(&Message::Ack2 { seq: w, status: 0 }));
    stop(&a, standby).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_error_is_acked_and_reported() {
    let mem = MemEngine::new(VOL as usize);
    let f = FaultyEngine::new(mem.clone());
    f.add_rule(FaultRule::fail_range(
        &[FaultOp::Write],
        8192,
        4096,
        libc::ENOSPC,
    ));
    let (mut a, standby) = start(Arc::new(f), Durability::GroupCommit);
    let s = write(&a, 8192, 1, 4096).await;
    assert_ack1_then_ack2(&mut a, s, -libc::ENOSPC).await;
    let end = stop(&a, standby).await;
    let de = end.disk_error.unwrap();
    assert_eq!(
        (de.op, de.offset, de.len, de.errno),
        ("write", 8192, 4096, libc::ENOSPC)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexpected_frame_is_a_protocol_error() {
    let mem = MemEngine::new(VOL as usize);
    let (a, standby) = start(mem, Durability::GroupCommit);
    a.tx.send(Message::Ack1 { seq: 3 }).await.unwrap();
    let err = standby.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, ReplicaError::Protocol(m) if m.contains("Ack1")),
        "{err}"
    );
    assert!(
        a.closed.reason().is_some()
            || tokio::time::timeout(Duration::from_secs(10), a.closed.wait())
                .await
                .is_ok()
    );
}

/// Runs `n` writes one at a time; checks Ack1 precedes Ack2 for each and
/// returns how the standby ended.
async fn qd1_writes(engine: Arc<dyn BlockEngine>, opts: StandbyOptions, n: u64) -> StandbyEnd {
    let (mut a, standby) = start_with(engine, opts);
    for i in 0..n {
        let s = write(&a, (i % 64) * 4096, i as u8, 4096).await;
        assert_ack1_then_ack2(&mut a, s, 0).await;
    }
    stop(&a, standby).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack1_is_coalesced_with_ack2_only_while_durability_is_fast() {
    // Fast (in-memory) standby: after the first few writes prove durability
    // fast, Ack1 waits for Ack2 and both leave together.
    let fast = qd1_writes(MemEngine::new(VOL as usize), StandbyOptions::default(), 200).await;
    assert_eq!(fast.applied, 200);
    assert!(fast.coalesced_ack1 > 0, "{fast:?}");
    // Coalescing off: never.
    let off = StandbyOptions {
        coalesce_ack1_below: None,
        ..StandbyOptions::default()
    };
    let never = qd1_writes(MemEngine::new(VOL as usize), off, 50).await;
    assert_eq!(never.coalesced_ack1, 0);
    // Slow standby (every write takes 2 ms, far above the 250 µs bound): Ack1
    // always on acceptance.
    let gate = GatedEngine::new(MemEngine::new(VOL as usize));
    gate.set_delay(|| Duration::from_millis(2));
    let slow = qd1_writes(Arc::new(gate), StandbyOptions::default(), 30).await;
    assert_eq!((slow.applied, slow.coalesced_ack1), (30, 0));
}

/// Drives `qd` concurrent 4 KiB random writes for `dur`; returns Ack2/s.
async fn measure(
    engine: Arc<dyn BlockEngine>,
    durability: Durability,
    qd: usize,
    dur: Duration,
) -> f64 {
    let size = engine.size();
    let (mut a, standby) = start(engine, durability);
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next_off = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % (size / 4096)) * 4096
    };
    let data = Bytes::from(vec![0xa5u8; 4096]);
    for _ in 0..qd {
        send_write(&a, next_off(), data.clone()).await;
    }
    let t0 = Instant::now();
    let mut done = 0u64;
    while t0.elapsed() < dur {
        if let Message::Ack2 { status, .. } = recv(&mut a).await {
            assert_eq!(status, 0);
            done += 1;
            send_write(&a, next_off(), data.clone()).await;
        }
    }
    let rate = done as f64 / t0.elapsed().as_secs_f64();
    stop(&a, standby).await;
    rate
}

/// Group commit vs per-write FUA on a real disk (run explicitly:
/// `cargo test -p mirror-agent --release --test replica_standby -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement on a real disk; run explicitly"]
async fn durability_measurement() {
    let dir = tempfile::Builder::new()
        .prefix("replica-measure")
        .tempdir_in("/var/tmp")
        .unwrap();
    let path = dir.path().join("data");
    // Fully allocated, so fdatasync measures data, not block allocation.
    std::fs::write(&path, vec![0u8; 64 << 20]).unwrap();
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    let engine = mirror_agent::engine::open(&path, &EngineOptions::default()).unwrap();
    println!("engine: {}", engine.describe());
    for qd in [32usize, 1] {
        for d in [Durability::GroupCommit, Durability::PerWriteFua] {
            let r = measure(engine.clone(), d, qd, Duration::from_secs(3)).await;
            println!("QD{qd:<2} 4KiB {d:?}: {r:.0} writes/s");
        }
    }
}

/// One frame of a generated stream from the active.
#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: usize,
        byte: u8,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Zeroes {
        offset: u64,
        len: u64,
        no_hole: bool,
    },
    Flush,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    // Mostly inside a small area (overlaps), some at or past the end.
    let offset = prop_oneof![
        6 => (0u64..64).prop_map(|b| b * 1024),
        1 => Just(VOL - 4096),
        1 => VOL - 8192..VOL + 8192,
        // Far outside (an offset + length that overflows u64 is refused by the codec
        // before it is sent, see mirror-proto).
        1 => Just(u64::MAX / 2),
    ];
    let len = prop_oneof![Just(1u64), 1u64..20_000, Just(4096u64)];
    prop_oneof![
        5 => (offset.clone(), len.clone(), any::<u8>())
            .prop_map(|(offset, len, byte)| Op::Write { offset, len: len as usize, byte }),
        1 => (offset.clone(), len.clone()).prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => (offset, len, any::<bool>())
            .prop_map(|(offset, len, no_hole)| Op::Zeroes { offset, len, no_hole }),
        1 => Just(Op::Flush),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Any stream of writes, trims, write-zeroes and flushes, pipelined without waiting, in
    /// either durability mode, with the disk's completions reordered by random delays: every
    /// frame gets exactly one final ack (Ack2 / FlushAck), an Ack1 only for an accepted
    /// request and before its Ack2; a request reaching outside the volume gets Ack2 -EINVAL
    /// and changes nothing; the volume ends as the accepted requests applied in `seq` order
    /// would leave it (overlapping ones wait for each other).
    #[test]
    fn random_streams_apply_in_order_and_refuse_outside(
        ops in proptest::collection::vec(op(), 1..40),
        per_write: bool,
        delay_seed in 1u64..,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (mem, gate) = gated_volume();
            let mut x = delay_seed;
            gate.set_delay(move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                Duration::from_micros(x % 300)
            });
            let durability = if per_write { Durability::PerWriteFua } else { Durability::GroupCommit };
            let (mut a, standby) = start(Arc::new(gate), durability);
            let mut model = vec![0u8; VOL as usize];
            // seq -> (is a flush, expected final status, Ack1 seen)
            let mut open = std::collections::HashMap::new();
            let inside = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= VOL);
            for op in &ops {
                let (msg, range) = match *op {
                    Op::Write { offset, len, byte } => (
                        Message::Write { offset, fua: false, data: Bytes::from(vec![byte; len]) },
                        Some((offset, len as u64, byte)),
                    ),
                    Op::Trim { offset, len } => (
                        Message::Trim { offset, length: len, fua: false },
                        Some((offset, len, 0)),
                    ),
                    Op::Zeroes { offset, len, no_hole } => (
                        Message::WriteZeroes { offset, length: len, fua: false, no_hole },
                        Some((offset, len, 0)),
                    ),
                    Op::Flush => (Message::Flush, None),
                };
                let seq = a.tx.send(msg).await.unwrap();
                let status = match range {
                    Some((off, len, byte)) if inside(off, len) => {
                        model[off as usize..(off + len) as usize].fill(byte);
                        0
                    }
                    Some(_) => -libc::EINVAL,
                    None => 0,
                };
                open.insert(seq, (range.is_none(), status, false));
            }
            while !open.is_empty() {
                match recv(&mut a).await {
                    Message::Ack1 { seq } => {
                        let e = open.get_mut(&seq).unwrap_or_else(|| panic!("Ack1 for {seq}: unknown or already final"));
                        assert!(!e.0 && e.1 == 0 && !e.2, "Ack1 for {seq}: {e:?}");
                        e.2 = true;
                    }
                    Message::Ack2 { seq, status } => {
                        let e = open.remove(&seq).unwrap_or_else(|| panic!("Ack2 for {seq}: unknown or twice"));
                        assert!(!e.0, "Ack2 for a flush {seq}");
                        assert_eq!(status, e.1, "Ack2 status for {seq}");
                    }
                    Message::FlushAck { seq, status } => {
                        let e = open.remove(&seq).unwrap_or_else(|| panic!("FlushAck for {seq}: unknown or twice"));
                        assert!(e.0, "FlushAck for a write {seq}");
                        assert_eq!(status, 0);
                    }
                    other => panic!("unexpected frame {other:?}"),
                }
            }
            let end = stop(&a, standby).await;
            assert_eq!(end.disk_error, None);
            let got = mem.snapshot();
            if got != model {
                let i = got.iter().zip(&model).position(|(x, y)| x != y).unwrap();
                panic!("volume differs from the model at byte {i}: {} vs {}", got[i], model[i]);
            }
        });
    }
}
