//! Sessions over the in-memory pair (`peer::testing`): ordering of seqs under concurrent
//! senders, `send_with` registration, large vectored writes, graceful close, back-pressure
//! and the send timeout; the reader hook.

mod peer_common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mirror_agent::config::Timeouts;
use mirror_agent::peer::testing::{hello, pair_in_memory, pair_in_memory_with};
use mirror_agent::peer::{Session, TrySendError};
use mirror_proto::{Frame, Hello, Message};
use peer_common::{
    assert_delivered, assert_no_more_frames, closed_reason, recv_frame, write_bytes, WAIT,
};

/// The hellos of nodes "a" and "b" of the same resource.
fn hellos() -> (Hello, Hello) {
    (
        hello("a", "demo", "md1", 1 << 30, 65536),
        hello("b", "demo", "md1", 1 << 30, 65536),
    )
}

fn pair() -> (Session, Session) {
    let (a, b) = hellos();
    pair_in_memory(a, b)
}

#[tokio::test]
async fn in_memory_pair_exchanges_frames_and_hellos() {
    let (a, mut b) = pair();
    assert_eq!(a.peer_hello.node_name, "b");
    assert_eq!(b.peer_hello.node_name, "a");
    let s1 = a.tx.send(Message::Flush).await.unwrap();
    let s2 = a.tx.try_send(Message::Ack1 { seq: 9 }).unwrap();
    assert_eq!(s2, s1 + 1);
    assert_eq!(recv_frame(&mut b).await, Frame::new(s1, Message::Flush));
    assert_eq!(
        recv_frame(&mut b).await,
        Frame::new(s2, Message::Ack1 { seq: 9 })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_get_wire_order_seqs_and_register_before_send() {
    let (a, mut b) = pair();
    let registered: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let tx = a.tx.clone();
        let reg = registered.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                let reg = reg.clone();
                tx.send_with(move |seq| {
                    reg.lock().unwrap().insert(seq);
                    write_bytes((t * 1000 + i) * 512, Bytes::from(vec![t as u8; 512]))
                })
                .await
                .unwrap();
            }
        }));
    }
    let mut last = 0;
    for _ in 0..800 {
        let f = recv_frame(&mut b).await;
        assert!(f.seq > last, "seq {} after {last}", f.seq);
        last = f.seq;
        // Registered before the frame could reach the wire.
        assert!(registered.lock().unwrap().contains(&f.seq));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn large_writes_arrive_intact() {
    let (a, mut b) = pair();
    let data = Bytes::from(
        (0..(4u32 << 20))
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut seqs = Vec::new();
    for k in 0..3u64 {
        seqs.push(
            a.tx.send(Message::Write {
                offset: k << 22,
                fua: k == 1,
                data: data.clone(),
            })
            .await
            .unwrap(),
        );
    }
    for (k, seq) in seqs.into_iter().enumerate() {
        let f = recv_frame(&mut b).await;
        assert_eq!(f.seq, seq);
        let Message::Write {
            offset,
            fua,
            data: d,
        } = f.msg
        else {
            panic!()
        };
        assert_eq!((offset, fua), ((k as u64) << 22, k == 1));
        assert_eq!(d, data);
    }
}

#[tokio::test]
async fn close_flushes_queued_frames_then_says_goodbye() {
    let (a, mut b) = pair();
    for i in 0..50 {
        a.tx.try_send(Message::Ack1 { seq: i }).unwrap();
    }
    a.tx.close("operator said so");
    assert!(a.tx.is_closed());
    assert!(a.tx.send(Message::Flush).await.is_err());
    for i in 0..50 {
        assert_eq!(recv_frame(&mut b).await.msg, Message::Ack1 { seq: i });
    }
    assert_no_more_frames(&mut b).await;
    assert_eq!(closed_reason(&a).await, "operator said so");
    let r = closed_reason(&b).await;
    assert!(r.contains("peer said goodbye (Shutdown)"), "{r}");
}

#[tokio::test]
async fn dropping_rx_closes_the_session() {
    let (a, b) = pair();
    drop(b.rx);
    // `b` is partly moved out (its rx), so wait on its `closed` directly.
    let r = tokio::time::timeout(WAIT, b.closed.wait()).await.unwrap();
    assert_eq!(r, "session receiver dropped");
    let r = closed_reason(&a).await;
    assert!(r.contains("goodbye"), "{r}");
}

#[tokio::test]
async fn backpressure_then_send_timeout_closes_the_link() {
    let t = Timeouts {
        send: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_secs(30),
        ..Timeouts::default()
    };
    // b never reads its rx: its reader stops, the pipe fills, a's writer blocks.
    let (ha, hb) = hellos();
    let (a, _b) = pair_in_memory_with(ha, hb, t);
    let data = Bytes::from(vec![0x5A; 64 << 10]);
    let mut saw_full = false;
    for _ in 0..100_000 {
        match a.tx.try_send(write_bytes(0, data.clone())) {
            Ok(_) => {}
            Err(TrySendError::Full) => {
                saw_full = true;
                break;
            }
            Err(TrySendError::Closed(c)) => panic!("closed early: {c}"),
        }
        tokio::task::yield_now().await;
    }
    assert!(saw_full, "queue never filled");
    assert!(a.tx.queued_frames() > 0);
    let r = closed_reason(&a).await;
    assert!(r.contains("send blocked for more than 0.300 s"), "{r}");
}

/// The reader hook: `Done` consumes a frame, `Pass` delivers it on `rx` in order, and a
/// `Run` future is finished before the hook sees the next frame (the reader waits), and
/// may hand its frame back to `rx`. `HookCx::passed` names the last frame put on `rx`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_hook_consumes_passes_and_runs_in_wire_order() {
    use mirror_agent::peer::{FrameHook, HookCx, Hooked};
    let (a, mut b) = pair();
    // (seq, passed) of every frame the hook saw, in order.
    let seen: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let consumed: Arc<Mutex<Vec<u64>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let started_tx = Mutex::new(Some(started_tx));
    let hook: FrameHook = {
        let (seen, consumed, gate) = (seen.clone(), consumed.clone(), gate.clone());
        Arc::new(move |f: Frame, cx: HookCx| {
            seen.lock().unwrap().push((f.seq, cx.passed));
            match f.msg {
                // Held until the test opens the gate, then consumed.
                Message::Ack1 { seq: 100 } => {
                    let (consumed, gate) = (consumed.clone(), gate.clone());
                    let started = started_tx.lock().unwrap().take();
                    Hooked::Run(Box::pin(async move {
                        let _ = started.unwrap().send(());
                        gate.acquire().await.unwrap().forget();
                        consumed.lock().unwrap().push(f.seq);
                        None
                    }))
                }
                // Handed back to rx after a Run.
                Message::Ack1 { seq: 200 } => Hooked::Run(Box::pin(async move { Some(f) })),
                Message::Ack1 { .. } => {
                    consumed.lock().unwrap().push(f.seq);
                    Hooked::Done
                }
                _ => Hooked::Pass(f),
            }
        })
    };
    b.tx.set_hook(Some(hook));
    let msgs = [
        Message::Flush,             // passed
        Message::Ack1 { seq: 1 },   // consumed
        Message::Ack1 { seq: 100 }, // held, then consumed
        Message::Ack1 { seq: 2 },   // consumed only after the held one
        Message::Flush,             // passed
        Message::Ack1 { seq: 200 }, // back to rx
    ];
    let mut seqs = Vec::new();
    for m in msgs {
        seqs.push(a.tx.send(m).await.unwrap());
    }
    // The first Flush arrives; the held Ack1 stops the reader before Ack1 { seq: 2 }.
    assert_eq!(recv_frame(&mut b).await.seq, seqs[0]);
    tokio::time::timeout(WAIT, started).await.unwrap().unwrap();
    assert_eq!(*consumed.lock().unwrap(), vec![seqs[1]]);
    assert!(
        !seen.lock().unwrap().iter().any(|&(s, _)| s == seqs[3]),
        "the hook saw a frame while an earlier Run was unfinished"
    );
    gate.add_permits(1);
    assert_eq!(recv_frame(&mut b).await.seq, seqs[4]);
    assert_eq!(
        recv_frame(&mut b).await,
        Frame::new(seqs[5], Message::Ack1 { seq: 200 })
    );
    assert_eq!(*consumed.lock().unwrap(), vec![seqs[1], seqs[2], seqs[3]]);
    let seen = seen.lock().unwrap().clone();
    let passed_of = |s: u64| seen.iter().find(|x| x.0 == s).unwrap().1;
    assert_eq!(passed_of(seqs[1]), seqs[0]);
    assert_eq!(passed_of(seqs[5]), seqs[4]);
    // Removing the hook: frames go to rx again.
    b.tx.set_hook(None);
    assert_delivered(&a, &mut b, Message::Ack1 { seq: 3 }).await;
}
