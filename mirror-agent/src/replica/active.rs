//! [`ActiveVolume`]: the active node's replicated volume.
//!
//! # Write path (design notes properties 1–4)
//!
//! 1. The range is registered in a FIFO range lock (arrival order), then its
//!    regions are marked dirty on stable storage
//!    (`try_begin_write_fast`, else `begin_write` on the blocking pool). No
//!    data write is issued anywhere before that returns. While attached,
//!    `begin_write` marks whole hot extents (the bitmap's activity log), so
//!    later writes nearby take the fast path with no metadata I/O; while
//!    not attached, `begin_write_exact` marks only the written regions (they
//!    need resync anyway), and once a break is recorded the hot set is
//!    cooled (`cool_hot_extents`) so it does not enlarge the next resync.
//! 2. Once every overlapping earlier request has finished locally *and* been
//!    queued to the peer, the request takes the range. Overlapping requests
//!    therefore get increasing `seq`s in the order they hit the local disk,
//!    and the standby (applying overlapping frames in `seq` order) ends with
//!    the same bytes.
//! 3. Attached: the request is registered in the in-flight table under its
//!    `seq` (inside `send_with`, before the frame is queued), the frame is
//!    queued and the local write issued concurrently. The range is released
//!    when both are done.
//! 4. Completion by mode: `sync` = local + Ack2 status 0 (Ack2 always means
//!    "on the standby's stable storage", §9.2); `semi` = local + Ack1 (or
//!    Ack2); `async` = local only, with the bytes not yet Ack2'd bounded by
//!    `async_queue` (checked, and reserved, before each send: overflow breaks
//!    the mirror; nothing blocks forever, nothing is dropped silently).
//! 5. Bitmap: `end_write(ticket, peer_durable)` exactly once per request,
//!    when both its local completion and its peer outcome are known;
//!    `peer_durable` only for local success + Ack2 status 0. The ticket lives
//!    in the request's state, so in semi/async mode this happens after the
//!    client's completion. Clearing is lazy: a background task calls
//!    `flush_clears` every 100 ms or after 256 durable completions.
//!
//! # Mirror break
//!
//! Causes: the session closed or a send failed, an ack (Ack1/Ack2/FlushAck)
//! waited longer than `timeouts.ack` (a sync-mode write then completes
//! locally, not with an error), an Ack2/FlushAck with an error (peer disk
//! error), the async budget overflowed, a protocol violation, or
//! [`ActiveVolume::detach`]. The break (a) installs a record gate, (b)
//! resolves every in-flight request as not peer-durable, (c) closes the
//! session, (d) records `gens::begin_diverging` + `break_time` in the
//! superblock on the blocking pool, (e) emits
//! [`ReplicaEvent::MirrorBroken`]. Every write that completes without the
//! peer — in flight at the break or issued after it — first waits for the
//! record gate, so the superblock shows the break before any local-only write
//! completes. If the record fails (metadata poisoned) those writes fail with
//! EIO. A volume that was never attached records the divergence lazily at its
//! first write (nothing is written if the generations already diverge).
//!
//! # Local disk errors
//!
//! The local engine is wrapped in [`Watched`]: a request it fails with a disk
//! error ([`crate::engine::is_disk_error`]: not `EINVAL` or `EOPNOTSUPP`,
//! which describe the request, nor `ECANCELED`, a request the engine could
//! not perform at all) fails to the client with that errno, its regions stay
//! dirty, and the first such failure emits [`ReplicaEvent::LocalDiskError`]:
//! the owner records `DISK_ERROR` (rule R1: no resync from or onto this disk,
//! no activation until it is replaced) and tells the peer. Replication goes
//! on, so the standby keeps every write and is the node to fail over to. The
//! standby does the same for its own disk ([`super::standby`]).
//!
//! # Flush and FUA
//!
//! `sync`: FLUSH = local flush + a Flush frame, completed on FlushAck status 0
//! (a barrier on the standby, §9.3). FUA writes are written FUA locally and
//! carry the FUA flag; Ack2 already means durable on the standby. `semi` and
//! `async`: FLUSH is local only — writes those modes completed are, by
//! definition of the mode, not guaranteed on the peer's stable storage; the
//! RPO meter shows what is still missing there.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bitmap::{ClusterPartition, WriteTicket};
use bytes::Bytes;
use mirror_proto::{Frame, Message, MAX_DATA_LEN};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::link::{lock, CloseSignal, FrameTx, MakeMessage, ReplicaLink};
use super::range_lock::{RangeGuard, RangeLock};
use super::{ReplicaError, ReplicaEvent};
use crate::config::{Mode, Resource, Timeouts};
use crate::engine::{BlockEngine, EngineFuture, Extent, Repeated, Watched};
use crate::gens;

/// Interval of the lazy bitmap-clearing task.
pub const CLEAR_INTERVAL: Duration = Duration::from_millis(100);

/// Durable completions after which the clearing task runs early.
pub const CLEAR_BATCH: u64 = 256;

/// Replication settings of an [`ActiveVolume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveConfig {
    /// Completion mode.
    pub mode: Mode,
    /// Longest wait for an Ack1/Ack2/FlushAck before the mirror breaks.
    pub ack_timeout: Duration,
    /// Async mode: bytes sent but not yet Ack2'd before the mirror breaks.
    pub async_queue: u64,
}

impl ActiveConfig {
    /// From the resource's configuration.
    pub fn from_config(res: &Resource, timeouts: &Timeouts) -> ActiveConfig {
        ActiveConfig {
            mode: res.mode,
            ack_timeout: timeouts.ack,
            async_queue: res.async_queue,
        }
    }
}

/// Replication lag and totals, for status output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RpoSnapshot {
    /// Replication mode (`sync`, `semi`, `async`).
    pub mode: String,
    /// A session is attached (writes are being replicated).
    pub attached: bool,
    /// Requests sent but not yet acknowledged as received (Ack1).
    pub unacked1_writes: u64,
    /// Their bytes.
    pub unacked1_bytes: u64,
    /// Requests received by the peer (Ack1) but not yet durable there (Ack2).
    pub unacked2_writes: u64,
    /// Their bytes.
    pub unacked2_bytes: u64,
    /// Age in milliseconds of the oldest write not yet durable on the peer
    /// (0 if none): one in flight, or one that completed without the peer
    /// (mirror broken or not yet attached) and has not reached it since,
    /// i.e. before the volume was last attached to an in-sync peer.
    pub oldest_not_durable_ms: u64,
    /// Requests durably replicated (Ack2 status 0), since start.
    pub writes_replicated: u64,
    /// Their bytes.
    pub bytes_replicated: u64,
    /// Requests completed without the peer (mirror broken or never attached).
    pub writes_local_only: u64,
    /// Mirror breaks since start.
    pub breaks: u64,
}

/// One modifying request.
#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Zeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
}

impl Op {
    fn offset(&self) -> u64 {
        match self {
            Op::Write { offset, .. } | Op::Trim { offset, .. } | Op::Zeroes { offset, .. } => {
                *offset
            }
        }
    }

    fn len(&self) -> u64 {
        match self {
            Op::Write { data, .. } => data.len() as u64,
            Op::Trim { len, .. } | Op::Zeroes { len, .. } => *len,
        }
    }

    fn message(&self) -> Message {
        match self.clone() {
            Op::Write { offset, data, fua } => Message::Write { offset, fua, data },
            Op::Trim { offset, len } => Message::Trim {
                offset,
                length: len,
                fua: false,
            },
            Op::Zeroes {
                offset,
                len,
                may_trim,
                fua,
            } => Message::WriteZeroes {
                offset,
                length: len,
                fua,
                no_hole: !may_trim,
            },
        }
    }

    fn run_local(&self, engine: &dyn BlockEngine) -> EngineFuture<()> {
        match self.clone() {
            Op::Write { offset, data, fua } => engine.write(offset, data, fua),
            Op::Trim { offset, len } => engine.discard(offset, len),
            Op::Zeroes {
                offset,
                len,
                may_trim,
                fua,
            } => engine.write_zeroes(offset, len, may_trim, fua),
        }
    }
}

/// Progress of a request's peer side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Sent,
    Ack1,
    Durable,
    Failed(i32),
    Lost,
}

impl Peer {
    fn is_final(self) -> bool {
        matches!(self, Peer::Durable | Peer::Failed(_) | Peer::Lost)
    }
}

/// State of one replicated request, shared by its writer task, the ack
/// receiver and the break path.
#[derive(Debug)]
struct ReqState {
    peer: Peer,
    /// `None` while the local I/O runs; then whether it succeeded.
    local: Option<bool>,
    ticket: Option<WriteTicket>,
    waiter: Option<oneshot::Sender<Peer>>,
    wake_on_ack1: bool,
}

type Req = Arc<Mutex<ReqState>>;

/// Updates the peer side (final states are never changed) and settles.
fn set_peer(req: &Req, peer: Peer, part: &ClusterPartition) {
    let mut r = lock(req);
    if r.peer.is_final() {
        return;
    }
    r.peer = peer;
    if peer.is_final() || (peer == Peer::Ack1 && r.wake_on_ack1) {
        if let Some(w) = r.waiter.take() {
            let _ = w.send(peer);
        }
    }
    settle(&mut r, part);
}

fn set_local(req: &Req, ok: bool, part: &ClusterPartition) {
    let mut r = lock(req);
    r.local = Some(ok);
    settle(&mut r, part);
}

/// `end_write` once both sides are known: peer-durable only for local
/// success + Ack2 status 0 (property 2).
fn settle(r: &mut ReqState, part: &ClusterPartition) {
    if let (Some(ok), true) = (r.local, r.peer.is_final()) {
        if let Some(t) = r.ticket.take() {
            part.end_write(t, ok && r.peer == Peer::Durable);
        }
    }
}

#[derive(Debug)]
struct Pending {
    req: Req,
    bytes: u64,
    start: Instant,
    acked1: bool,
}

/// In-flight requests of one attachment, keyed by `seq`.
#[derive(Debug, Default)]
struct Table {
    broken: bool,
    writes: BTreeMap<u64, Pending>,
    flushes: HashMap<u64, (Instant, oneshot::Sender<Peer>)>,
    unacked1: (u64, u64),
    unacked2: (u64, u64),
    /// Async budget reservations not yet in `writes` (between check and send).
    reserved: u64,
}

impl Table {
    fn outstanding_bytes(&self) -> u64 {
        self.unacked1.1 + self.unacked2.1 + self.reserved
    }

    fn oldest(&self) -> Option<Instant> {
        let w = self.writes.values().map(|p| p.start);
        w.chain(self.flushes.values().map(|f| f.0)).min()
    }

    fn remove(&mut self, seq: u64) -> Option<Pending> {
        let p = self.writes.remove(&seq)?;
        let c = if p.acked1 {
            &mut self.unacked2
        } else {
            &mut self.unacked1
        };
        c.0 -= 1;
        c.1 -= p.bytes;
        Some(p)
    }
}

/// Whether the superblock records the divergence yet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rec {
    Pending,
    Done,
    Failed(String),
}

type Gate = watch::Receiver<Rec>;

async fn wait_gate(mut gate: Gate) -> io::Result<()> {
    let state = match gate.wait_for(|r| *r != Rec::Pending).await {
        Ok(r) => r.clone(),
        Err(_) => Rec::Failed("break recorder ended".into()),
    };
    match state {
        Rec::Done => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EIO)),
    }
}

/// One attached session.
struct Attachment {
    id: u64,
    tx: Arc<dyn FrameTx>,
    table: Mutex<Table>,
    /// Set (once) by the break of this attachment.
    gate: OnceLock<Gate>,
    /// Released cleanly ([`ActiveVolume::release`]): the tasks stop, nothing is recorded.
    released: std::sync::atomic::AtomicBool,
    /// Signalled when the table empties, and on release.
    changed: Notify,
    /// Signalled when the attachment ends (release or break): its session
    /// watcher and frame forwarder stop.
    stop: Notify,
}

impl Attachment {
    fn ended(&self) -> bool {
        self.gate.get().is_some() || self.released.load(Ordering::SeqCst)
    }
}

enum Slot {
    Attached(Arc<Attachment>),
    /// Not replicating; the gate, once created, records the divergence.
    Detached(Option<Gate>),
}

enum Route {
    Replicate(Arc<Attachment>),
    LocalOnly(Gate),
}

#[derive(Debug, Default)]
struct Totals {
    replicated: AtomicU64,
    replicated_bytes: AtomicU64,
    local_only: AtomicU64,
    breaks: AtomicU64,
    durable_since_clear: AtomicU64,
}

struct Inner {
    local: Arc<dyn BlockEngine>,
    part: Arc<ClusterPartition>,
    cfg: ActiveConfig,
    ranges: RangeLock,
    slot: Mutex<Slot>,
    events: mpsc::UnboundedSender<ReplicaEvent>,
    next_id: AtomicU64,
    totals: Totals,
    clear_kick: Arc<Notify>,
    /// Start of the oldest write that completed without the peer since the
    /// volume was last attached (attaching needs an in-sync peer, so those
    /// writes have reached it then). For the RPO meter's age.
    local_only_since: Mutex<Option<Instant>>,
    /// Writes refused because their write intent could not be recorded.
    intent_failures: Repeated,
}

/// The active node's replicated volume; see the module docs. Cheap to clone
/// (shared state). Must be created inside a tokio runtime (it spawns its
/// background tasks).
#[derive(Clone)]
pub struct ActiveVolume {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ActiveVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveVolume")
            .field("cfg", &self.inner.cfg)
            .field("attached", &self.is_attached())
            .finish()
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ActiveVolume {
    /// A volume over `local` tracking dirty regions in `part`, initially not
    /// attached. Returns the event receiver the owner listens to.
    pub fn new(
        local: Arc<dyn BlockEngine>,
        part: Arc<ClusterPartition>,
        cfg: ActiveConfig,
    ) -> (ActiveVolume, mpsc::UnboundedReceiver<ReplicaEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let tx = events.clone();
        let local: Arc<dyn BlockEngine> = Arc::new(Watched::new(
            local,
            "active",
            Box::new(move |r| {
                let _ = tx.send(ReplicaEvent::LocalDiskError(r));
            }),
        ));
        let inner = Arc::new(Inner {
            local,
            part,
            cfg,
            ranges: RangeLock::default(),
            slot: Mutex::new(Slot::Detached(None)),
            events,
            next_id: AtomicU64::new(0),
            totals: Totals::default(),
            clear_kick: Arc::new(Notify::new()),
            local_only_since: Mutex::new(None),
            intent_failures: Repeated::default(),
        });
        tokio::spawn(clearer(Arc::downgrade(&inner)));
        (ActiveVolume { inner }, rx)
    }

    /// Starts replicating over `link`. Call only when the pair is connected
    /// and in sync (no resync pending). Takes the link's receiving half: the
    /// volume consumes Ack1/Ack2/FlushAck; Goodbye/Error or any other frame
    /// breaks the mirror (Ping/Pong are ignored), and so does the end of
    /// `link.rx`. A task forwards `link.rx` to the [`AckSink`] of
    /// [`Self::attach_sink`].
    pub fn attach(&self, link: ReplicaLink) -> Result<(), ReplicaError> {
        let sink = self.attach_sink(link.tx, link.closed.clone())?;
        tokio::spawn(forward(sink, link.rx, link.closed));
        Ok(())
    }

    /// Starts replicating over a session whose received frames the caller
    /// hands to the returned [`AckSink`] itself (e.g. from the session's
    /// reader task, with no task hop). Same conditions as [`Self::attach`];
    /// the mirror breaks when `closed` fires.
    pub fn attach_sink(
        &self,
        tx: Arc<dyn FrameTx>,
        closed: Arc<dyn CloseSignal>,
    ) -> Result<AckSink, ReplicaError> {
        let inner = &self.inner;
        let att = Arc::new(Attachment {
            id: inner.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            tx,
            table: Mutex::new(Table::default()),
            gate: OnceLock::new(),
            released: Default::default(),
            changed: Notify::new(),
            stop: Notify::new(),
        });
        {
            let mut slot = lock(&inner.slot);
            if let Slot::Attached(cur) = &*slot {
                return Err(ReplicaError::AlreadyAttached(cur.id));
            }
            *slot = Slot::Attached(att.clone());
            // The peer is in sync: what was written without it has reached it.
            *lock(&inner.local_only_since) = None;
        }
        tracing::info!(attach = att.id, mode = %inner.cfg.mode, "replication attached");
        tokio::spawn(watch_session(Arc::downgrade(inner), att.clone(), closed));
        tokio::spawn(sweeper(
            Arc::downgrade(inner),
            att.clone(),
            inner.cfg.ack_timeout,
        ));
        Ok(AckSink {
            inner: Arc::downgrade(inner),
            att,
        })
    }

    /// Stops replicating (a break without a [`ReplicaEvent::MirrorBroken`]
    /// event: the owner asked). Returns once the divergence is recorded.
    /// Without an attached session, only waits for a pending record.
    pub async fn detach(&self, reason: &str) -> Result<(), ReplicaError> {
        let current = match &*lock(&self.inner.slot) {
            Slot::Attached(att) => Ok(att.clone()),
            Slot::Detached(g) => Err(g.clone()),
        };
        let gate = match current {
            Ok(att) => {
                Some(
                    self.inner
                        .break_mirror(&att, format!("detached: {reason}"), false, false),
                )
            }
            Err(g) => g,
        };
        match gate {
            Some(g) => wait_gate(g)
                .await
                .map_err(|e| ReplicaError::BreakRecord(e.to_string())),
            None => Ok(()),
        }
    }

    /// Stops being active cleanly (after the NBD server drained): waits up
    /// to `timeout` until every request sent to the peer has its Ack2 /
    /// FlushAck, then detaches *without* recording a divergence — both nodes
    /// hold the same data — and does not close the session (its frame
    /// receiver is dropped, though). `Ok(true)`: clean
    /// release. `Ok(false)`: something was still unacknowledged (or failed)
    /// at the deadline, so the mirror was broken and the divergence recorded
    /// instead. Without an attached session: like [`Self::detach`], `Ok(false)`.
    pub async fn release(&self, timeout: Duration) -> Result<bool, ReplicaError> {
        let att = match &*lock(&self.inner.slot) {
            Slot::Attached(a) => Some(a.clone()),
            Slot::Detached(_) => None,
        };
        let Some(att) = att else {
            return self.detach("release").await.map(|()| false);
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = att.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if att.ended() {
                break;
            }
            {
                let mut slot = lock(&self.inner.slot);
                let mut t = lock(&att.table);
                if t.writes.is_empty() && t.flushes.is_empty() && t.reserved == 0 {
                    if matches!(&*slot, Slot::Attached(cur) if Arc::ptr_eq(cur, &att)) {
                        *slot = Slot::Detached(None);
                    }
                    // A request racing with the release finds the table broken and
                    // breaks the mirror (recording the divergence) on its own.
                    t.broken = true;
                    att.released.store(true, Ordering::SeqCst);
                    drop(t);
                    drop(slot);
                    att.changed.notify_waiters();
                    att.stop.notify_waiters();
                    tracing::info!(
                        attach = att.id,
                        "replication released cleanly (peer holds every write)"
                    );
                    return Ok(true);
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        let g = self.inner.break_mirror(
            &att,
            format!("release: requests still unacknowledged after {timeout:?}"),
            false,
            false,
        );
        wait_gate(g)
            .await
            .map_err(|e| ReplicaError::BreakRecord(e.to_string()))?;
        Ok(false)
    }

    /// Whether a session is attached.
    pub fn is_attached(&self) -> bool {
        matches!(&*lock(&self.inner.slot), Slot::Attached(_))
    }

    /// The configuration.
    pub fn config(&self) -> ActiveConfig {
        self.inner.cfg
    }

    /// The local engine.
    pub fn local(&self) -> &Arc<dyn BlockEngine> {
        &self.inner.local
    }

    /// Replication lag and totals.
    pub fn rpo(&self) -> RpoSnapshot {
        let inner = &self.inner;
        let att = match &*lock(&inner.slot) {
            Slot::Attached(a) => Some(a.clone()),
            Slot::Detached(_) => None,
        };
        let (u1, u2, in_flight) = match &att {
            Some(a) => {
                let t = lock(&a.table);
                (
                    t.unacked1,
                    t.unacked2,
                    t.writes.values().map(|p| p.start).min(),
                )
            }
            None => ((0, 0), (0, 0), None),
        };
        let oldest = in_flight
            .into_iter()
            .chain(*lock(&inner.local_only_since))
            .min();
        let t = &inner.totals;
        RpoSnapshot {
            mode: inner.cfg.mode.to_string(),
            attached: att.is_some(),
            unacked1_writes: u1.0,
            unacked1_bytes: u1.1,
            unacked2_writes: u2.0,
            unacked2_bytes: u2.1,
            oldest_not_durable_ms: oldest.map(|s| s.elapsed().as_millis() as u64).unwrap_or(0),
            writes_replicated: t.replicated.load(Ordering::Relaxed),
            bytes_replicated: t.replicated_bytes.load(Ordering::Relaxed),
            writes_local_only: t.local_only.load(Ordering::Relaxed),
            breaks: t.breaks.load(Ordering::Relaxed),
        }
    }

    /// Runs `flush_clears` now (on the blocking pool) instead of waiting for
    /// the background task. Returns how many regions were cleared.
    pub async fn clear_now(&self) -> Result<usize, bitmap::MetaError> {
        let p = self.inner.part.clone();
        tokio::task::spawn_blocking(move || p.flush_clears())
            .await
            .unwrap_or_else(|e| {
                Err(bitmap::MetaError::InvalidParams(format!(
                    "flush_clears panicked: {e}"
                )))
            })
    }
}

impl Inner {
    /// Where a new request goes: the attached session, or local-only behind
    /// the record gate (created lazily if the volume was never attached).
    fn route(self: &Arc<Self>) -> Route {
        let mut slot = lock(&self.slot);
        match &mut *slot {
            Slot::Attached(a) => Route::Replicate(a.clone()),
            Slot::Detached(Some(g)) => Route::LocalOnly(g.clone()),
            Slot::Detached(g @ None) => {
                let gate = self.start_record(false);
                *g = Some(gate.clone());
                Route::LocalOnly(gate)
            }
        }
    }

    /// Records the divergence (and, for a break, the break time) in the
    /// superblock on the blocking pool; the gate opens when it is durable.
    fn start_record(self: &Arc<Self>, is_break: bool) -> Gate {
        let (tx, rx) = watch::channel(Rec::Pending);
        let part = self.part.clone();
        let part2 = self.part.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let res = tokio::task::spawn_blocking(move || {
                let mut probe = part.generations();
                if !gens::begin_diverging(&mut probe) && !is_break {
                    return Ok(());
                }
                part.update_superblock(|s| {
                    gens::begin_diverging(&mut s.gens);
                    s.break_time = unix_now();
                })
                .map(|_| ())
                .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("superblock update panicked: {e}")));
            match res {
                Ok(()) => {
                    let _ = tx.send(Rec::Done);
                    if is_break {
                        let _ = events.send(ReplicaEvent::BreakRecorded);
                    }
                    // Not replicating any more: the hot extents' intent regions
                    // (every write to them has its Ack2) would only enlarge the
                    // next resync. Clear them now; regions of writes still in
                    // flight or not durable on the peer stay dirty.
                    let p = part2;
                    match tokio::task::spawn_blocking(move || p.cool_hot_extents()).await {
                        Ok(Ok(n)) => {
                            tracing::debug!(cleared = n, "hot extents cooled after the break")
                        }
                        Ok(Err(error)) => tracing::error!(%error, "cooling the hot extents failed"),
                        Err(error) => tracing::error!(%error, "cool_hot_extents panicked"),
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "recording the mirror break failed: local-only writes will fail");
                    let _ = tx.send(Rec::Failed(error.clone()));
                    let _ = events.send(ReplicaEvent::BreakRecordFailed { error });
                }
            }
        });
        rx
    }

    /// Breaks the mirror of `att` (idempotent: later calls return the first
    /// break's gate). See the module docs for the order of the steps.
    fn break_mirror(
        self: &Arc<Self>,
        att: &Arc<Attachment>,
        reason: String,
        peer_disk_error: bool,
        emit: bool,
    ) -> Gate {
        let gate = {
            let mut slot = lock(&self.slot);
            if let Some(g) = att.gate.get() {
                return g.clone();
            }
            let g = self.start_record(true);
            let _ = att.gate.set(g.clone());
            if matches!(&*slot, Slot::Attached(cur) if Arc::ptr_eq(cur, att)) {
                *slot = Slot::Detached(Some(g.clone()));
            }
            g
        };
        self.totals.breaks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(attach = att.id, %reason, peer_disk_error, "mirror broken");
        let (writes, flushes) = {
            let mut t = lock(&att.table);
            t.broken = true;
            t.unacked1 = (0, 0);
            t.unacked2 = (0, 0);
            t.reserved = 0;
            (
                std::mem::take(&mut t.writes),
                std::mem::take(&mut t.flushes),
            )
        };
        for p in writes.into_values() {
            set_peer(&p.req, Peer::Lost, &self.part);
        }
        for (_, (_, w)) in flushes {
            let _ = w.send(Peer::Lost);
        }
        att.tx.close(&reason);
        att.changed.notify_waiters();
        att.stop.notify_waiters();
        if emit {
            let _ = self.events.send(ReplicaEvent::MirrorBroken {
                reason,
                peer_disk_error,
            });
        }
        gate
    }

    async fn begin_write(&self, offset: u64, len: u64) -> io::Result<WriteTicket> {
        if let Some(t) = self.part.try_begin_write_fast(offset, len) {
            return Ok(t);
        }
        // Hot extents pay off only while replicating: a local-only write needs
        // resync anyway, and marking its whole extent would only enlarge that
        // resync. (A race with an attach or a break costs at most one extent.)
        let hot = matches!(&*lock(&self.slot), Slot::Attached(_));
        let p = self.part.clone();
        match tokio::task::spawn_blocking(move || {
            if hot {
                p.begin_write(offset, len)
            } else {
                p.begin_write_exact(offset, len)
            }
        })
        .await
        {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(error)) => {
                // A failed metadata write poisons the partition: from then on
                // every write lands here, so the log is rate-limited.
                let (n, log) = self.intent_failures.count();
                if log {
                    tracing::error!(offset, len, %error, failed_so_far = n, "marking regions dirty failed: write refused");
                }
                if n == 1 {
                    let _ = self.events.send(ReplicaEvent::MetadataFailed {
                        error: error.to_string(),
                    });
                }
                Err(eio())
            }
            Err(error) => {
                tracing::error!(offset, len, %error, "begin_write panicked");
                Err(eio())
            }
        }
    }

    /// A modifying request of any size: writes above the frame limit are
    /// split (each part ordered and replicated on its own).
    async fn modify(self: Arc<Self>, op: Op) -> io::Result<()> {
        match op.offset().checked_add(op.len()) {
            Some(end) if end <= self.part.volume_size() => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
        if let Op::Write { offset, data, fua } = &op {
            if data.len() > MAX_DATA_LEN {
                let mut at = 0;
                while at < data.len() {
                    let end = (at + MAX_DATA_LEN).min(data.len());
                    let part = Op::Write {
                        offset: offset + at as u64,
                        data: data.slice(at..end),
                        fua: *fua,
                    };
                    self.clone().modify_one(part).await?;
                    at = end;
                }
                return Ok(());
            }
        }
        self.modify_one(op).await
    }

    async fn modify_one(self: Arc<Self>, op: Op) -> io::Result<()> {
        let (offset, len) = (op.offset(), op.len());
        if len == 0 {
            // Nothing to mark or ship (a Write frame carries at least one byte).
            return op.run_local(&*self.local).await;
        }
        let pending = self.ranges.register(offset, len);
        let ticket = self.begin_write(offset, len).await?;
        let guard = pending.acquire().await;
        match self.route() {
            Route::LocalOnly(gate) => self.local_only(gate, op, ticket, guard).await,
            Route::Replicate(att) => self.replicate(att, op, ticket, guard).await,
        }
    }

    /// Local-only completion: only after the break/divergence is recorded.
    async fn local_only(
        &self,
        gate: Gate,
        op: Op,
        ticket: WriteTicket,
        guard: RangeGuard,
    ) -> io::Result<()> {
        let start = Instant::now();
        if let Err(e) = wait_gate(gate).await {
            self.part.end_write(ticket, false);
            return Err(e);
        }
        let res = op.run_local(&*self.local).await;
        self.part.end_write(ticket, false);
        drop(guard);
        self.note_local_only(start, res.is_ok());
        res
    }

    /// Counts a write that completed without the peer, started at `start`;
    /// a successful one is data the peer lacks (the RPO meter's age).
    fn note_local_only(&self, start: Instant, ok: bool) {
        self.totals.local_only.fetch_add(1, Ordering::Relaxed);
        if !ok {
            return;
        }
        let mut since = lock(&self.local_only_since);
        if since.is_none_or(|t| start < t) {
            *since = Some(start);
        }
    }

    async fn replicate(
        self: &Arc<Self>,
        att: Arc<Attachment>,
        op: Op,
        ticket: WriteTicket,
        guard: RangeGuard,
    ) -> io::Result<()> {
        let bytes = op.len();
        let mode = self.cfg.mode;
        if mode == Mode::Async {
            let over = {
                let mut t = lock(&att.table);
                let out = t.outstanding_bytes();
                if !t.broken && out + bytes > self.cfg.async_queue {
                    Some(out)
                } else {
                    t.reserved += bytes;
                    None
                }
            };
            if let Some(out) = over {
                let reason = format!(
                    "async queue budget exceeded: {out} bytes not yet durable on the peer + {bytes} > {} bytes",
                    self.cfg.async_queue
                );
                let gate = self.break_mirror(&att, reason, false, true);
                return self.local_only(gate, op, ticket, guard).await;
            }
        }
        let (wtx, wrx) = oneshot::channel();
        let req: Req = Arc::new(Mutex::new(ReqState {
            peer: Peer::Sent,
            local: None,
            ticket: Some(ticket),
            waiter: (mode != Mode::Async).then_some(wtx),
            wake_on_ack1: mode == Mode::Semi,
        }));
        let start = Instant::now();
        let make: MakeMessage = {
            let (req, att, part, op) = (req.clone(), att.clone(), self.part.clone(), op.clone());
            let is_async = mode == Mode::Async;
            Box::new(move |seq| {
                let mut t = lock(&att.table);
                if t.broken {
                    drop(t);
                    set_peer(&req, Peer::Lost, &part);
                } else {
                    if is_async {
                        t.reserved = t.reserved.saturating_sub(bytes);
                    }
                    t.unacked1.0 += 1;
                    t.unacked1.1 += bytes;
                    t.writes.insert(
                        seq,
                        Pending {
                            req,
                            bytes,
                            start,
                            acked1: false,
                        },
                    );
                }
                op.message()
            })
        };
        // With other requests in flight the frame joins the writer task's next
        // vectored write (batching); alone, the session may write it at once.
        let busy = !lock(&att.table).writes.is_empty();
        let send = att.tx.send_with(make);
        let send = async move {
            if busy {
                crate::peer::corked(send).await
            } else {
                send.await
            }
        };
        // The frame is queued first: the peer's leg (send, apply, flush, acks)
        // is the longer one, so it should not wait for the local submission.
        let (sent, local_res) = tokio::join!(send, op.run_local(&*self.local));
        set_local(&req, local_res.is_ok(), &self.part);
        drop(guard);
        if sent.is_err() {
            self.break_mirror(&att, "peer link closed while sending".into(), false, true);
            set_peer(&req, Peer::Lost, &self.part);
        }
        if let Err(e) = local_res {
            tracing::warn!(offset = op.offset(), len = bytes, error = %e, "local write failed on the active node");
            return Err(e);
        }
        if mode == Mode::Async {
            return Ok(());
        }
        let outcome = match tokio::time::timeout_at((start + self.cfg.ack_timeout).into(), wrx)
            .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => Peer::Lost,
            Err(_) => {
                let what = if mode == Mode::Sync { "Ack2" } else { "Ack1" };
                let reason = format!("ack timeout: no {what} within {:?}", self.cfg.ack_timeout);
                self.break_mirror(&att, reason, false, true);
                Peer::Lost
            }
        };
        match outcome {
            Peer::Durable => Ok(()),
            Peer::Ack1 if mode == Mode::Semi => Ok(()),
            other => {
                // The break is already under way (installed before the outcome
                // was published); this returns its gate.
                let gate = self.break_mirror(
                    &att,
                    format!("request not replicated: {other:?}"),
                    false,
                    true,
                );
                wait_gate(gate).await?;
                self.note_local_only(start, true);
                Ok(())
            }
        }
    }

    async fn flush(self: Arc<Self>) -> io::Result<()> {
        let att = match (&*lock(&self.slot), self.cfg.mode) {
            (Slot::Attached(a), Mode::Sync) => Some(a.clone()),
            _ => None,
        };
        let Some(att) = att else {
            return self.local.flush().await;
        };
        let (ftx, frx) = oneshot::channel();
        let start = Instant::now();
        let make: MakeMessage = {
            let att = att.clone();
            Box::new(move |seq| {
                let mut t = lock(&att.table);
                if t.broken {
                    let _ = ftx.send(Peer::Lost);
                } else {
                    t.flushes.insert(seq, (start, ftx));
                }
                Message::Flush
            })
        };
        let (sent, local_res) = tokio::join!(att.tx.send_with(make), self.local.flush());
        if sent.is_err() {
            self.break_mirror(
                &att,
                "peer link closed while sending a flush".into(),
                false,
                true,
            );
        }
        local_res?;
        let outcome = match tokio::time::timeout_at((start + self.cfg.ack_timeout).into(), frx)
            .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => Peer::Lost,
            Err(_) => {
                let reason = format!("ack timeout: no FlushAck within {:?}", self.cfg.ack_timeout);
                self.break_mirror(&att, reason, false, true);
                Peer::Lost
            }
        };
        if outcome == Peer::Durable {
            return Ok(());
        }
        let gate = self.break_mirror(
            &att,
            format!("flush not replicated: {outcome:?}"),
            false,
            true,
        );
        wait_gate(gate).await
    }

    /// Handles one frame from the standby; `Err` = break the mirror.
    fn on_frame(
        self: &Arc<Self>,
        att: &Arc<Attachment>,
        frame: Frame,
    ) -> Result<(), (String, bool)> {
        match frame.msg {
            Message::Ack1 { seq } => {
                let mut t = lock(&att.table);
                let Some(p) = t.writes.get_mut(&seq) else {
                    return Err((format!("protocol error: Ack1 for unknown seq {seq}"), false));
                };
                if p.acked1 {
                    return Err((format!("protocol error: second Ack1 for seq {seq}"), false));
                }
                p.acked1 = true;
                let (req, bytes) = (p.req.clone(), p.bytes);
                t.unacked1.0 -= 1;
                t.unacked1.1 -= bytes;
                t.unacked2.0 += 1;
                t.unacked2.1 += bytes;
                drop(t);
                set_peer(&req, Peer::Ack1, &self.part);
                Ok(())
            }
            Message::Ack2 { seq, status } => {
                let Some(p) = lock(&att.table).remove(seq) else {
                    return Err((format!("protocol error: Ack2 for unknown seq {seq}"), false));
                };
                att.changed.notify_waiters();
                if status == 0 {
                    self.totals.replicated.fetch_add(1, Ordering::Relaxed);
                    self.totals
                        .replicated_bytes
                        .fetch_add(p.bytes, Ordering::Relaxed);
                    set_peer(&p.req, Peer::Durable, &self.part);
                    if self
                        .totals
                        .durable_since_clear
                        .fetch_add(1, Ordering::Relaxed)
                        + 1
                        >= CLEAR_BATCH
                    {
                        self.totals.durable_since_clear.store(0, Ordering::Relaxed);
                        self.clear_kick.notify_one();
                    }
                    Ok(())
                } else {
                    let reason = format!("peer disk error: Ack2 for seq {seq} has status {status}");
                    self.break_mirror(att, reason, true, true);
                    set_peer(&p.req, Peer::Failed(status), &self.part);
                    Ok(())
                }
            }
            Message::FlushAck { seq, status } => {
                let Some((_, w)) = lock(&att.table).flushes.remove(&seq) else {
                    return Err((
                        format!("protocol error: FlushAck for unknown seq {seq}"),
                        false,
                    ));
                };
                att.changed.notify_waiters();
                if status == 0 {
                    let _ = w.send(Peer::Durable);
                } else {
                    let reason =
                        format!("peer disk error: FlushAck for seq {seq} has status {status}");
                    self.break_mirror(att, reason, true, true);
                    let _ = w.send(Peer::Failed(status));
                }
                Ok(())
            }
            Message::Ping { .. } | Message::Pong { .. } => Ok(()),
            Message::Goodbye { reason } => {
                Err((format!("peer closed the session: {reason:?}"), false))
            }
            Message::Error { code, message } => {
                Err((format!("peer reported error {code}: {message}"), false))
            }
            other => Err((
                format!(
                    "protocol error: unexpected {:?} frame on the active side",
                    other.kind()
                ),
                false,
            )),
        }
    }
}

/// Tells a standby that broke the protocol why the link ends (an Error
/// frame, not a Goodbye), before the mirror breaks.
fn refuse_protocol_error(att: &Attachment, reason: &str) {
    if reason.starts_with("protocol error") {
        att.tx
            .close_with_error(reason, mirror_proto::error_code::UNEXPECTED_MESSAGE);
    }
}

/// The receiving end of one attachment ([`ActiveVolume::attach_sink`]): the
/// standby's frames are handed to [`AckSink::deliver`] by whoever reads them.
#[derive(Clone)]
pub struct AckSink {
    inner: Weak<Inner>,
    att: Arc<Attachment>,
}

impl std::fmt::Debug for AckSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckSink")
            .field("attach", &self.att.id)
            .field("ended", &self.att.ended())
            .finish()
    }
}

impl AckSink {
    /// Handles one frame from the standby: Ack1/Ack2/FlushAck complete their
    /// requests, Ping/Pong are ignored, anything else (or an ack for an
    /// unknown seq) breaks the mirror and closes the session with
    /// Error(UNEXPECTED_MESSAGE). Bounded, non-blocking work (table lock,
    /// request lock, a oneshot send), so it may run in a session's reader
    /// task. `None`: taken. `Some(frame)`: the attachment has ended
    /// (released or broken); the frame is not its to judge.
    pub fn deliver(&self, frame: Frame) -> Option<Frame> {
        if self.att.ended() {
            return Some(frame);
        }
        let Some(inner) = self.inner.upgrade() else {
            return Some(frame);
        };
        if let Err((reason, disk)) = inner.on_frame(&self.att, frame) {
            refuse_protocol_error(&self.att, &reason);
            inner.break_mirror(&self.att, reason, disk, true);
        }
        None
    }

    /// The attachment ended (released, or the mirror broke).
    pub fn ended(&self) -> bool {
        self.att.ended()
    }
}

/// Breaks the mirror when the attachment's session closes (unless the
/// attachment was released cleanly first).
async fn watch_session(weak: Weak<Inner>, att: Arc<Attachment>, closed: Arc<dyn CloseSignal>) {
    let reason = {
        let stop = att.stop.notified();
        tokio::pin!(stop);
        stop.as_mut().enable();
        if att.ended() {
            return;
        }
        tokio::select! {
            r = closed.wait() => format!("peer link closed: {r}"),
            _ = stop => return,
        }
    };
    // A clean release detaches without a divergence: not a mirror break.
    if att.released.load(Ordering::SeqCst) {
        return;
    }
    if let Some(inner) = weak.upgrade() {
        inner.break_mirror(&att, reason, false, true);
    }
}

/// [`ActiveVolume::attach`]: feeds `rx` to the sink; the end of `rx` breaks
/// the mirror (unless the attachment was released cleanly).
async fn forward(sink: AckSink, mut rx: mpsc::Receiver<Frame>, closed: Arc<dyn CloseSignal>) {
    let att = sink.att.clone();
    loop {
        let stop = att.stop.notified();
        tokio::pin!(stop);
        stop.as_mut().enable();
        if att.ended() {
            return;
        }
        let frame = tokio::select! {
            biased;
            f = rx.recv() => f,
            _ = stop => return,
        };
        let Some(frame) = frame else { break };
        if sink.deliver(frame).is_some() {
            return;
        }
    }
    // The owner stops routing frames here after a clean release, so the
    // channel may end before this task saw the release: not a mirror break.
    // Recording one would rotate the generations of a node that just
    // deactivated cleanly.
    if att.released.load(Ordering::SeqCst) {
        return;
    }
    let reason = format!(
        "peer link closed: {}",
        closed.reason().unwrap_or_else(|| "receiver ended".into())
    );
    if let Some(inner) = sink.inner.upgrade() {
        inner.break_mirror(&att, reason, false, true);
    }
}

/// Breaks the mirror when any request of the attachment waits longer than
/// the ack timeout (semi/async requests whose client already completed have
/// no other watcher).
async fn sweeper(weak: Weak<Inner>, att: Arc<Attachment>, ack_timeout: Duration) {
    let tick = (ack_timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        if att.ended() {
            return;
        }
        let Some(inner) = weak.upgrade() else { return };
        let oldest = lock(&att.table).oldest();
        if let Some(age) = oldest.map(|s| s.elapsed()) {
            if age >= ack_timeout {
                let reason = format!(
                    "ack timeout: a request has waited {age:?} for its ack (limit {ack_timeout:?})"
                );
                inner.break_mirror(&att, reason, false, true);
                return;
            }
        }
    }
}

/// Lazy, batched bitmap clearing (property 2: clearing late is always safe).
async fn clearer(weak: Weak<Inner>) {
    loop {
        let Some(kick) = weak.upgrade().map(|i| i.clear_kick.clone()) else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(CLEAR_INTERVAL) => {}
            _ = kick.notified() => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.part.clearable_count() == 0 {
            continue;
        }
        let p = inner.part.clone();
        drop(inner);
        match tokio::task::spawn_blocking(move || p.flush_clears()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, "clearing bitmap regions failed"),
            Err(error) => tracing::error!(%error, "flush_clears panicked"),
        }
    }
}

impl ActiveVolume {
    /// `op()` when `[offset, offset + len)` lies within the volume (which may
    /// be smaller than the local engine's backing), else `EINVAL`.
    fn in_volume<T: Send + 'static>(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> EngineFuture<T>,
    ) -> EngineFuture<T> {
        match crate::engine::check_range(self.size(), offset, len) {
            Ok(()) => op(),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

impl BlockEngine for ActiveVolume {
    fn size(&self) -> u64 {
        self.inner.part.volume_size()
    }

    fn name(&self) -> &'static str {
        "replicated"
    }

    fn describe(&self) -> String {
        format!(
            "replicated ({}) over {}",
            self.inner.cfg.mode,
            self.inner.local.describe()
        )
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        self.in_volume(offset, len as u64, || self.inner.local.read(offset, len))
    }

    // The local engine's own `read_bytes` (pooled buffers, no copy), not the
    // default that wraps `read`'s `Vec`.
    fn read_bytes(&self, offset: u64, len: usize) -> EngineFuture<Bytes> {
        self.in_volume(offset, len as u64, || {
            self.inner.local.read_bytes(offset, len)
        })
    }

    /// The local data's allocation: the active serves its own data.
    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<Extent>> {
        self.in_volume(offset, len, || self.inner.local.extents(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        Box::pin(self.inner.clone().modify(Op::Write { offset, data, fua }))
    }

    fn flush(&self) -> EngineFuture<()> {
        Box::pin(self.inner.clone().flush())
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        Box::pin(self.inner.clone().modify(Op::Trim { offset, len }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        Box::pin(self.inner.clone().modify(Op::Zeroes {
            offset,
            len,
            may_trim,
            fua,
        }))
    }
}
