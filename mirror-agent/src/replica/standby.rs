//! The standby's side of the data path: [`StandbySink`] (fed frame by frame
//! by its owner, e.g. the session reader's hook) and [`run_standby`] (a
//! receive loop over a [`ReplicaLink`] feeding a sink).
//!
//! For each Write / Trim / WriteZeroes frame, in arrival (`seq`) order
//! ([`StandbySink::accept`]): validate the range (outside the volume → Ack2
//! `-EINVAL` only, logged), take a share of the in-flight budget
//! (back-pressure: the caller stops reading until it is available, so the
//! peer link's queues fill and the active's ack timeout or async budget
//! eventually decides), register the range in a FIFO range lock, send Ack1,
//! and start the apply task: it runs in the caller's task until it first
//! has to wait (on tmpfs a small write, its no-op flush and its Ack2 finish
//! right there), and is spawned for the rest. Writes run concurrently;
//! overlapping ones are applied strictly in `seq` order. Ack2 is sent only
//! once the request is on stable storage (status 0) or failed (negative
//! errno; the first disk error, [`crate::engine::is_disk_error`], is reported
//! in [`StandbyEnd::disk_error`]).
//!
//! # Durability: group commit vs per-write FUA
//!
//! [`Durability::GroupCommit`] (default): applied requests are collected; one
//! `flush()` (fdatasync) covers every request completed before it started,
//! then all of them get their Ack2. There is no committer task: the apply
//! task that finds no flush running becomes the leader, flushes, acks the
//! batch and repeats while requests completed meanwhile (each round's flush
//! starts after every request it acks completed); everyone else just queues
//! its ack. At QD1 this saves a task hop per write.
//! [`Durability::PerWriteFua`]: each write is issued with FUA (RWF_DSYNC /
//! write + fdatasync) and acked on completion.
//!
//! # Ack1 coalescing
//!
//! Ack1 normally leaves as soon as the frame is accepted. When the standby's
//! recent requests became durable quickly (a moving average of accept →
//! durable below [`StandbyOptions::coalesce_ack1_below`], 250 µs by default:
//! a fast disk, or tmpfs), an accepted write's Ack1 is instead queued
//! together with its Ack2, right before it — the two frames then leave in
//! one vectored write and reach the active in one read, instead of costing a
//! send and a wake-up each. Ack1 still precedes Ack2 for every seq (§9.2);
//! it is late by at most about that average, which only `semi` mode and the
//! RPO meter's Ack1/Ack2 split can notice. Starts in the "slow" state.
//!
//! Measured on the development VM (virtio disk `/dev/vda`, ext4, 64 MiB fully
//! allocated file under `/var/tmp`, io_uring engine with O_DIRECT, 4 KiB
//! random writes, each Ack2 round trip through an in-memory peer session;
//! two runs, shared 2-core machine, so the spread is large):
//!
//! | queue depth | group commit (Ack2/s) | per-write FUA (Ack2/s) |
//! |------------:|----------------------:|-----------------------:|
//! | 32          | 16 601 / 12 760       | 15 407 / 8 995         |
//! | 1           | 2 227 / 1 183         | 589 / 260              |
//!
//! Group commit is faster at both depths (at QD1 the RWF_DSYNC write costs
//! more than write + fdatasync here; at QD32 one fdatasync covers many
//! writes), so it is the default. Reproduce with
//! `cargo test -p mirror-agent --test replica_standby -- --ignored --nocapture
//! durability_measurement`.
//!
//! # Flush barrier (§9.3)
//!
//! A Flush with `seq = s` waits until every request with a smaller `seq` has
//! been applied, then one flush of the device (shared with the group commit)
//! → FlushAck. Later frames are not held up by it.
//!
//! # Frames
//!
//! In [`run_standby`]: Ping/Pong are ignored (the link answers them); Goodbye
//! and Error end the loop normally; any other frame (acks, resync, bitmap,
//! state frames) is a protocol error on this path: the session is closed and
//! [`ReplicaError::Protocol`] returned. In every case the requests already
//! accepted finish locally first ([`StandbySink::finish`]). A sink's owner
//! routes only the four data kinds to it (the pair's dispatcher refuses the
//! others).

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mirror_proto::{Frame, Message, MAX_DATA_LEN};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::link::{lock, send, FrameTx, ReplicaLink};
use super::range_lock::{PendingRange, RangeLock};
use super::ReplicaError;
use crate::engine::BlockEngine;

/// How the standby makes a request durable before its Ack2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// One flush covers every request completed before it (default: faster
    /// at QD1 and QD32 in the measurement in the module docs).
    #[default]
    GroupCommit,
    /// Every write is issued with FUA and acked on its own completion.
    PerWriteFua,
}

/// Options of [`run_standby_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyOptions {
    /// Durability strategy.
    pub durability: Durability,
    /// Bytes of requests accepted but not yet applied; more wait (the loop
    /// stops reading frames). At least [`MAX_DATA_LEN`].
    pub max_inflight_bytes: usize,
    /// Send a write's Ack1 together with its Ack2 while the moving average
    /// of accept → durable is below this (see the module docs); `None`:
    /// always send Ack1 on acceptance.
    pub coalesce_ack1_below: Option<Duration>,
}

/// Default of [`StandbyOptions::coalesce_ack1_below`].
pub const COALESCE_ACK1_BELOW: Duration = Duration::from_micros(250);

impl Default for StandbyOptions {
    fn default() -> Self {
        StandbyOptions {
            durability: Durability::default(),
            max_inflight_bytes: 64 << 20,
            coalesce_ack1_below: Some(COALESCE_ACK1_BELOW),
        }
    }
}

/// A failed local request on the standby (its disk is bad).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskError {
    /// `write`, `trim`, `write_zeroes` or `flush`.
    pub op: &'static str,
    /// Byte offset (0 for flush).
    pub offset: u64,
    /// Byte count (0 for flush).
    pub len: u64,
    /// Positive errno.
    pub errno: i32,
}

/// Why and how [`run_standby`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyEnd {
    /// The close reason, or the peer's Goodbye/Error.
    pub reason: String,
    /// The first local disk error, if any (reported to the active as Ack2 /
    /// FlushAck status too).
    pub disk_error: Option<DiskError>,
    /// Requests applied successfully.
    pub applied: u64,
    /// Their bytes (trim/zeroes count their length).
    pub applied_bytes: u64,
    /// Device flushes issued for durability (group commits and barriers).
    pub flushes: u64,
    /// Writes whose Ack1 was sent together with their Ack2 (Ack1 coalescing).
    pub coalesced_ack1: u64,
}

/// A Write/Trim/WriteZeroes as applied on the standby.
#[derive(Debug, Clone)]
enum Apply {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    },
}

impl Apply {
    fn range(&self) -> (u64, u64) {
        match self {
            Apply::Write { offset, data, .. } => (*offset, data.len() as u64),
            Apply::Trim { offset, len, .. } | Apply::Zeroes { offset, len, .. } => (*offset, *len),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Apply::Write { .. } => "write",
            Apply::Trim { .. } => "trim",
            Apply::Zeroes { .. } => "write_zeroes",
        }
    }

    /// Runs it; with `fua`, durable on return.
    async fn run(&self, e: &dyn BlockEngine, fua: bool) -> io::Result<()> {
        match self.clone() {
            Apply::Write {
                offset,
                data,
                fua: f,
            } => e.write(offset, data, fua || f).await,
            Apply::Trim {
                offset,
                len,
                fua: f,
            } => {
                e.discard(offset, len).await?;
                if fua || f {
                    e.flush().await?;
                }
                Ok(())
            }
            Apply::Zeroes {
                offset,
                len,
                no_hole,
                fua: f,
            } => e.write_zeroes(offset, len, !no_hole, fua || f).await,
        }
    }
}

/// An acknowledgement waiting for a group-commit flush.
enum Commit {
    /// Ack2 for `seq` (and its Ack1 first if `ack1`), accepted at `since`.
    Ack {
        seq: u64,
        ack1: bool,
        since: Instant,
    },
    FlushAck(u64),
}

/// Group-commit state: acks waiting for a flush, and whether a leader runs.
#[derive(Default)]
struct Group {
    waiting: Vec<Commit>,
    leader: bool,
}

struct Shared {
    local: Arc<dyn BlockEngine>,
    tx: Arc<dyn FrameTx>,
    opts: StandbyOptions,
    /// Seqs accepted but not yet applied (the Flush barrier waits on these).
    outstanding: Mutex<BTreeSet<u64>>,
    applied_one: Notify,
    disk_error: Mutex<Option<DiskError>>,
    applied: AtomicU64,
    applied_bytes: AtomicU64,
    flushes: AtomicU64,
    coalesced: AtomicU64,
    group: Mutex<Group>,
    /// Moving average (1/8 weight) of accept → durable, in µs.
    durable_avg_us: AtomicU64,
}

impl Shared {
    fn record_error(&self, op: &'static str, offset: u64, len: u64, e: &io::Error) -> i32 {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        if !crate::engine::is_disk_error(e) {
            // The Ack2 still fails (the active breaks the mirror); the disk is not blamed.
            tracing::error!(op, offset, len, errno, error = %e, "standby could not apply a request");
            return errno;
        }
        tracing::error!(op, offset, len, errno, error = %e, "standby disk error");
        lock(&self.disk_error).get_or_insert(DiskError {
            op,
            offset,
            len,
            errno,
        });
        errno
    }

    fn done(&self, seq: u64) {
        lock(&self.outstanding).remove(&seq);
        self.applied_one.notify_waiters();
    }

    /// Should the write accepted now send its Ack1 only with its Ack2?
    fn coalesce_ack1(&self) -> bool {
        self.opts
            .coalesce_ack1_below
            .is_some_and(|t| self.durable_avg_us.load(Ordering::Relaxed) < t.as_micros() as u64)
    }

    /// Feeds one accept → durable time into the moving average.
    fn record_durable(&self, since: Instant) {
        let us = since.elapsed().as_micros().min(u64::MAX as u128 / 2) as u64;
        // Racy read-modify-write between concurrent acks: an estimate only.
        let avg = self.durable_avg_us.load(Ordering::Relaxed);
        self.durable_avg_us
            .store(avg - avg / 8 + us / 8, Ordering::Relaxed);
    }

    /// Sends a write's acks: its deferred Ack1 (if any) right before the Ack2,
    /// both in one `send_all` (one write on the direct path, one wake-up of the
    /// active's reader).
    async fn send_acks(&self, seq: u64, ack1: bool, status: i32) {
        if ack1 {
            self.coalesced.fetch_add(1, Ordering::Relaxed);
            let _ = self
                .tx
                .send_all(vec![Message::Ack1 { seq }, Message::Ack2 { seq, status }])
                .await;
            return;
        }
        let _ = send(&self.tx, Message::Ack2 { seq, status }).await;
    }

    /// Group commit, step 1: queues `c` for the next flush. True if no
    /// leader runs: the caller must then [`Self::lead`].
    fn queue_commit(&self, c: Commit) -> bool {
        let mut g = lock(&self.group);
        g.waiting.push(c);
        !std::mem::replace(&mut g.leader, true)
    }

    /// Group commit, step 2 (the leader): flush, ack the batch, repeat while
    /// more was queued meanwhile. Every request of a batch completed before
    /// that batch's flush started.
    async fn lead(&self) {
        loop {
            let batch = {
                let mut g = lock(&self.group);
                if g.waiting.is_empty() {
                    g.leader = false;
                    return;
                }
                std::mem::take(&mut g.waiting)
            };
            self.flushes.fetch_add(1, Ordering::Relaxed);
            let status = match self.local.flush().await {
                Ok(()) => 0,
                Err(e) => -self.record_error("flush", 0, 0, &e),
            };
            // Acks of several requests leave together in the session writer's one
            // vectored write; a single request's acks may go out at once.
            if batch.len() > 1 {
                crate::peer::corked(self.ack_batch(batch, status)).await;
            } else {
                self.ack_batch(batch, status).await;
            }
        }
    }

    /// Sends the acks of one group commit.
    async fn ack_batch(&self, batch: Vec<Commit>, status: i32) {
        for c in batch {
            match c {
                Commit::Ack { seq, ack1, since } => {
                    if status == 0 {
                        self.record_durable(since);
                    }
                    self.send_acks(seq, ack1, status).await;
                }
                Commit::FlushAck(seq) => {
                    // Link gone: keep going so every waiter is served.
                    let _ = send(&self.tx, Message::FlushAck { seq, status }).await;
                }
            }
        }
    }

    /// Waits until no request with a smaller seq than `seq` is outstanding.
    async fn barrier(&self, seq: u64) {
        loop {
            let notified = self.applied_one.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.outstanding).range(..seq).next().is_none() {
                return;
            }
            notified.await;
        }
    }
}

/// [`run_standby_with`] with default options (group commit).
pub async fn run_standby(
    local: Arc<dyn BlockEngine>,
    link: ReplicaLink,
) -> Result<StandbyEnd, ReplicaError> {
    run_standby_with(local, link, StandbyOptions::default()).await
}

/// Serves the data path of the standby until the session ends; see the
/// module docs. `Err` only for a protocol violation by the peer (the session
/// is then closed). Frames are taken from `link.rx` and handed to a
/// [`StandbySink`] in order.
pub async fn run_standby_with(
    local: Arc<dyn BlockEngine>,
    link: ReplicaLink,
    opts: StandbyOptions,
) -> Result<StandbyEnd, ReplicaError> {
    let ReplicaLink { tx, mut rx, closed } = link;
    let sink = StandbySink::new(local, tx, opts);
    let mut closed_wait = closed.wait();
    let outcome: Result<String, ReplicaError> = loop {
        let frame = tokio::select! {
            biased;
            f = rx.recv() => f,
            r = &mut closed_wait => break Ok(r),
        };
        let Some(frame) = frame else {
            break Ok(closed.reason().unwrap_or_else(|| "peer link ended".into()));
        };
        let seq = frame.seq;
        match frame.msg {
            Message::Write { .. }
            | Message::Trim { .. }
            | Message::WriteZeroes { .. }
            | Message::Flush => {
                let more = !rx.is_empty();
                let accepted = tokio::select! {
                    biased;
                    a = sink.accept(frame, more) => a,
                    r = &mut closed_wait => break Ok(r),
                };
                if accepted.is_err() {
                    break Ok(closed.reason().unwrap_or_else(|| "peer link closed".into()));
                }
            }
            Message::Ping { .. } | Message::Pong { .. } => {}
            Message::Goodbye { reason } => break Ok(format!("peer said goodbye: {reason:?}")),
            Message::Error { code, message } => {
                break Ok(format!("peer reported error {code}: {message}"))
            }
            other => {
                break Err(ReplicaError::Protocol(format!(
                    "unexpected {:?} frame (seq {seq}) on the standby data path",
                    other.kind()
                )))
            }
        }
    };
    if let Err(e) = &outcome {
        tracing::warn!(error = %e, "standby: closing the session");
        sink.core.shared.tx.close(&e.to_string());
    }
    let end = sink.finish(String::new()).await;
    let reason = outcome?;
    Ok(StandbyEnd { reason, ..end })
}

/// The standby's data path, fed frame by frame by its owner
/// ([`StandbySink::accept`]), for instance from the session's reader task
/// with no task hop in between; [`run_standby_with`] feeds it from a
/// [`ReplicaLink`]. Cheap to clone.
#[derive(Clone)]
pub struct StandbySink {
    core: Arc<Core>,
}

impl std::fmt::Debug for StandbySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandbySink")
            .field("tasks", &self.core.tasks.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The sink's state beyond [`Shared`] (what the receive loop used to own).
struct Core {
    shared: Arc<Shared>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    ranges: RangeLock,
    size: u64,
    /// Apply/barrier tasks running; [`StandbySink::finish`] waits for 0.
    tasks: AtomicU64,
    tasks_done: Notify,
    /// Set by `finish`: later frames are refused (the session is over).
    finished: std::sync::atomic::AtomicBool,
}

/// The sink no longer takes frames: the session closed or the sink finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkClosed;

/// Counts one running task of the sink (also when the task panics).
struct TaskGuard(Arc<Core>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.tasks.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.tasks_done.notify_waiters();
        }
    }
}

impl Core {
    /// Counts the caller as running unless the sink finished. With `finish`
    /// (flag, then count; both SeqCst) either `finish` waits for this guard
    /// or this sees the flag: nothing is applied after `finish` returned.
    fn enter(self: &Arc<Self>) -> Result<TaskGuard, SinkClosed> {
        self.tasks.fetch_add(1, Ordering::SeqCst);
        let guard = TaskGuard(self.clone());
        if self.finished.load(Ordering::SeqCst) {
            return Err(SinkClosed);
        }
        Ok(guard)
    }

    fn spawn(self: &Arc<Self>, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.fetch_add(1, Ordering::SeqCst);
        let guard = TaskGuard(self.clone());
        tokio::spawn(async move {
            let _guard = guard;
            fut.await;
        });
    }

    /// Runs `fut` in the caller's task until it first has to wait, and
    /// spawns only the rest. On a backing whose small writes are page-cache
    /// copies and whose flush is a no-op (tmpfs), an apply finishes here,
    /// Ack2 included, without waking another task. The first poll uses a
    /// no-op waker; the spawned task polls again with its own, and every
    /// future here (tokio primitives, the engines' completions) registers
    /// the waker of the latest poll.
    fn run_or_spawn(self: &Arc<Self>, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.fetch_add(1, Ordering::SeqCst);
        let guard = TaskGuard(self.clone());
        let mut fut = Box::pin(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if fut.as_mut().poll(&mut cx).is_ready() {
            return;
        }
        tokio::spawn(async move {
            let _guard = guard;
            fut.await;
        });
    }
}

impl StandbySink {
    /// A sink applying to `local` and acknowledging over `tx`.
    pub fn new(local: Arc<dyn BlockEngine>, tx: Arc<dyn FrameTx>, opts: StandbyOptions) -> Self {
        let budget_bytes = opts
            .max_inflight_bytes
            .max(MAX_DATA_LEN)
            .min(u32::MAX as usize);
        let shared = Arc::new(Shared {
            local,
            tx,
            opts,
            outstanding: Mutex::new(BTreeSet::new()),
            applied_one: Notify::new(),
            disk_error: Mutex::new(None),
            applied: AtomicU64::new(0),
            applied_bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            group: Mutex::new(Group::default()),
            // Starts "slow": Ack1 on acceptance until durability proves fast.
            durable_avg_us: AtomicU64::new(
                opts.coalesce_ack1_below
                    .map_or(u64::MAX / 2, |t| 4 * t.as_micros() as u64),
            ),
        });
        let size = shared.local.size();
        StandbySink {
            core: Arc::new(Core {
                shared,
                budget: Arc::new(Semaphore::new(budget_bytes)),
                budget_bytes,
                ranges: RangeLock::default(),
                size,
                tasks: AtomicU64::new(0),
                tasks_done: Notify::new(),
                finished: Default::default(),
            }),
        }
    }

    /// Accepts one Write / Trim / WriteZeroes / Flush frame, in `seq` order
    /// (the caller must not start the next frame's `accept` before this one
    /// returned): range check, in-flight budget, range registration, Ack1,
    /// then the apply task is spawned. Ready at the first poll unless the
    /// in-flight budget or the session's send queue is full; while it waits,
    /// the caller reads no further frames (back-pressure). `more`: other
    /// frames are already waiting (the Ack1 may then be batched). Any other
    /// frame kind is ignored here (the caller routes by kind).
    /// `Err(SinkClosed)`: the session is closed (the frame was not accepted).
    pub async fn accept(&self, frame: Frame, more: bool) -> Result<(), SinkClosed> {
        let core = &self.core;
        let shared = &core.shared;
        let _running = core.enter()?;
        let seq = frame.seq;
        let op = match frame.msg {
            Message::Write { offset, fua, data } => Apply::Write { offset, data, fua },
            Message::Trim {
                offset,
                length,
                fua,
            } => Apply::Trim {
                offset,
                len: length,
                fua,
            },
            Message::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
            } => Apply::Zeroes {
                offset,
                len: length,
                no_hole,
                fua,
            },
            Message::Flush => {
                lock(&shared.outstanding).insert(seq);
                let sh = shared.clone();
                core.spawn(async move {
                    sh.barrier(seq).await;
                    match sh.opts.durability {
                        Durability::GroupCommit => {
                            // Queued before `done`, like the writes' acks.
                            let lead = sh.queue_commit(Commit::FlushAck(seq));
                            sh.done(seq);
                            if lead {
                                sh.lead().await;
                            }
                            return;
                        }
                        Durability::PerWriteFua => {
                            sh.flushes.fetch_add(1, Ordering::Relaxed);
                            let status = match sh.local.flush().await {
                                Ok(()) => 0,
                                Err(e) => -sh.record_error("flush", 0, 0, &e),
                            };
                            let _ = send(&sh.tx, Message::FlushAck { seq, status }).await;
                        }
                    }
                    sh.done(seq);
                });
                return Ok(());
            }
            _ => return Ok(()),
        };
        let (offset, len) = op.range();
        if !matches!(offset.checked_add(len), Some(end) if end <= core.size) {
            tracing::warn!(
                seq,
                op = op.name(),
                offset,
                len,
                volume_size = core.size,
                "request outside the volume refused"
            );
            return send(
                &shared.tx,
                Message::Ack2 {
                    seq,
                    status: -libc::EINVAL,
                },
            )
            .await
            .map(|_| ())
            .map_err(|_| SinkClosed);
        }
        let cost = match &op {
            Apply::Write { data, .. } => data.len().clamp(1, core.budget_bytes),
            _ => 4096,
        } as u32;
        // Usually available at once; otherwise the caller stops reading here.
        let permit = match core.budget.clone().try_acquire_many_owned(cost) {
            Ok(p) => p,
            Err(_) => core
                .budget
                .clone()
                .acquire_many_owned(cost)
                .await
                .expect("budget semaphore is never closed"),
        };
        let pending = core.ranges.register(offset, len);
        // Other requests in flight or frames waiting: this Ack1 is part of a
        // burst, let the session batch it (see `crate::peer::corked`).
        let busy = {
            let mut o = lock(&shared.outstanding);
            let busy = !o.is_empty() || more;
            o.insert(seq);
            busy
        };
        let since = Instant::now();
        let defer_ack1 = shared.coalesce_ack1();
        // An immediate Ack1 is queued before the apply task exists, so it
        // precedes the Ack2; a deferred one is sent right before the Ack2.
        let sent = if defer_ack1 {
            Ok(seq)
        } else if busy {
            crate::peer::corked(send(&shared.tx, Message::Ack1 { seq })).await
        } else {
            send(&shared.tx, Message::Ack1 { seq }).await
        };
        let work = apply(shared.clone(), seq, op, pending, permit, defer_ack1, since);
        // In a burst its acks, too, join the session writer's next vectored
        // write instead of one write (and one wake-up of the active) each.
        if busy {
            core.run_or_spawn(crate::peer::corked(work));
        } else {
            core.run_or_spawn(work);
        }
        sent.map(|_| ()).map_err(|_| SinkClosed)
    }

    /// Stops accepting, waits until every accepted request finished locally
    /// (and every group-commit leader its last round), and reports.
    pub async fn finish(&self, reason: String) -> StandbyEnd {
        let core = &self.core;
        core.finished.store(true, Ordering::SeqCst);
        loop {
            let done = core.tasks_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if core.tasks.load(Ordering::SeqCst) == 0 {
                break;
            }
            done.await;
        }
        let shared = &core.shared;
        let disk_error = lock(&shared.disk_error).clone();
        StandbyEnd {
            reason,
            disk_error,
            applied: shared.applied.load(Ordering::Relaxed),
            applied_bytes: shared.applied_bytes.load(Ordering::Relaxed),
            flushes: shared.flushes.load(Ordering::Relaxed),
            coalesced_ack1: shared.coalesced.load(Ordering::Relaxed),
        }
    }
}

async fn apply(
    sh: Arc<Shared>,
    seq: u64,
    op: Apply,
    pending: PendingRange,
    permit: OwnedSemaphorePermit,
    ack1: bool,
    since: Instant,
) {
    let guard = pending.acquire().await;
    let per_write = sh.opts.durability == Durability::PerWriteFua;
    let res = op.run(&*sh.local, per_write).await;
    drop(guard);
    drop(permit);
    let (offset, len) = op.range();
    match res {
        Ok(()) => {
            sh.applied.fetch_add(1, Ordering::Relaxed);
            sh.applied_bytes.fetch_add(len, Ordering::Relaxed);
            if per_write {
                sh.record_durable(since);
                sh.send_acks(seq, ack1, 0).await;
                sh.done(seq);
            } else {
                // Queued before `done`, so a later Flush's commit comes after it.
                let lead = sh.queue_commit(Commit::Ack { seq, ack1, since });
                sh.done(seq);
                if lead {
                    sh.lead().await;
                }
            }
        }
        Err(e) => {
            let errno = sh.record_error(op.name(), offset, len, &e);
            sh.send_acks(seq, ack1, -errno).await;
            sh.done(seq);
        }
    }
}
