//! A mirrored resource's side of the pair: the data link to the peer, the
//! coordination of roles over it, the resync decision and its execution, and
//! the wiring of the replication data path (`replica`) to each live session.
//!
//! Module map:
//! - this file: [`Pair`] — link sessions, routing of received frames (acks
//!   to the active volume and data to the standby applier straight from the
//!   session's reader task, see `Pair::data_hook`; through the dispatcher
//!   task: control messages, acks to the running resync, resync data to the
//!   resync target),
//!   the per-session decision (`rules::decide`, logged with its rule id),
//!   activation (`rules::may_activate`) and grants, automatic recovery
//!   (`rules::auto_recovery_allowed`), `recover` / `force` / `break`, status.
//! - [`control`]: the JSON control messages (state, activation, resync).
//! - `adapt` (private): `peer::Session` pieces as the `replica` link traits.
//!
//! # Roles over one session
//!
//! Both agents send a `State` control message when a session starts, on
//! every change, and every few seconds. On the first state of a session each
//! side computes `rules::decide` on both `NodeView`s (docs/resync-rules.md);
//! the decision is re-evaluated on every state until the pair is in sync or
//! a resync runs. A node becomes active only after `may_activate` agrees and
//! the peer granted an `ActivateRequest` over the live session (or, with the
//! peer unreachable, when the local node is `FORCED`). The active attaches
//! replication only with the write gate held and a fresh "in sync" decision,
//! and tells the standby (`State.replicating`) before its first data frame.
//! A resync ([`crate::resync`]) is started by its source: automatically when
//! `auto_recovery` is on and `auto_recovery_allowed` agrees, or by `mdctrl
//! recover` / `mdctrl force`.

pub mod control;

mod adapt;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bitmap::Flags;
use mirror_proto::{DiskState, Features, Frame, Generation, Message, Role};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::admin::{AdminError, ErrorKind};
use crate::changes::Changes;
use crate::config::{self, Config, Timeouts};
use crate::engine::{self, BlockEngine};
use crate::gens;
use crate::meta::Meta;
use crate::peer::{self, HelloState, LinkSpec, LinkState, Session, SessionSender};
use crate::replica::{self, ActiveConfig, ActiveVolume, ReplicaEvent};
use crate::resync::{self, GatedVolume, Progress, ProgressHandle, WriteGate};
use crate::rules::{self, Decision, NodeView, PeerKnowledge, ResyncKind, Rule, Side};

use control::{ControlMsg, NodeState, PeerRole};

/// How long the end of a session waits for its local writes before it says
/// so in the log (`SessionWriters`).
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// How often each side re-sends its state (status freshness).
pub const STATE_INTERVAL: Duration = Duration::from_secs(2);

/// Frames queued from the session dispatcher to the resync or a verify; the
/// dispatcher stops reading the socket when full.
const FORWARD_QUEUE: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How far the session dispatcher got: the seq of the last frame it finished
/// (the reader hook's ordering check, see [`Pair::data_hook`]).
#[derive(Default)]
struct Dispatched {
    seq: std::sync::atomic::AtomicU64,
    advanced: Notify,
}

impl Dispatched {
    fn seq(&self) -> u64 {
        self.seq.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn advance(&self, seq: u64) {
        self.seq.store(seq, std::sync::atomic::Ordering::SeqCst);
        self.advanced.notify_waiters();
    }

    async fn wait_for(&self, seq: u64) {
        loop {
            let n = self.advanced.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.seq() >= seq {
                return;
            }
            n.await;
        }
    }
}

/// Who takes a received data-path frame ([`Pair::data_hook`]).
enum Consumer {
    Active(replica::AckSink),
    Standby(replica::StandbySink),
}

impl Consumer {
    /// Hands `frame` over: bounded work (the active's ack handling), or a
    /// `Run` future (the standby's accept step, usually ready at once).
    /// `Pass` when the active attachment ended meanwhile.
    fn take(self, frame: Frame, more: bool) -> peer::Hooked {
        match self {
            Consumer::Active(a) => match a.deliver(frame) {
                None => peer::Hooked::Done,
                Some(f) => peer::Hooked::Pass(f),
            },
            // Err: the session is closing; the frame dies with it.
            Consumer::Standby(s) => peer::Hooked::Run(Box::pin(async move {
                let _ = s.accept(frame, more).await;
                None
            })),
        }
    }
}

/// Where the pair stands in the current session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mirror {
    /// No session, or no peer state yet.
    Unknown,
    /// The rules decided something other than "in sync" (or the active
    /// has not attached yet).
    Decided {
        /// The decision (from this node's point of view).
        decision: Decision,
        /// Its rule.
        rule: Rule,
    },
    /// A resync runs on this session.
    Resyncing,
    /// Same data: replication may run.
    InSync,
}

/// Live session handles.
struct Live {
    id: u64,
    tx: SessionSender,
    closed: peer::CloseWatch,
    peer_addr: std::net::SocketAddr,
    /// The attached active volume's receiving end: the reader hook hands it
    /// Ack1/Ack2/FlushAck.
    active: Option<replica::AckSink>,
    /// The standby applier: the reader hook hands it Write/Trim/WriteZeroes/Flush.
    standby: Option<replica::StandbySink>,
    to_resync: Option<mpsc::Sender<Frame>>,
    /// A running `mdctrl verify` (ChecksumReply frames).
    to_verify: Option<mpsc::Sender<Frame>>,
    /// Automatic recovery was refused by the peer on this session: not retried until reconnect.
    auto_suppressed: bool,
    /// An attach task is running.
    attaching: bool,
}

struct St {
    live: Option<Live>,
    peer: Option<NodeState>,
    peer_seen: Option<Instant>,
    role: PeerRole,
    activating: bool,
    volume: Option<ActiveVolume>,
    next_req: u64,
    pending: HashMap<u64, oneshot::Sender<(bool, Option<String>)>>,
    last_break: Option<String>,
    peer_disk_error: bool,
    sessions: u64,
    mirror: Mirror,
    /// Last logged decision text (log only changes).
    logged: Option<String>,
    recovery: Option<ProgressHandle>,
    auto_block: Option<String>,
    /// `mdctrl break`: no attach, no automatic recovery until `recover`/`force`.
    operator_break: Option<String>,
    /// Since when the ended session's writer tasks are being waited for.
    draining_since: Option<Instant>,
}

/// One mirrored resource's pair state on this node.
pub struct Pair {
    resource: String,
    node: String,
    peer_name: String,
    cfg: config::Resource,
    timeouts: Timeouts,
    engine: Arc<dyn BlockEngine>,
    meta: Arc<Meta>,
    /// This node's devices, watched for stalls (the peer is told, see
    /// [`NodeState::stalled`]).
    stalls: Arc<engine::Stalls>,
    link_state: watch::Receiver<LinkState>,
    st: Mutex<St>,
    /// Shared with the resource: status changes (`mdctrl status --watch`).
    changed: Arc<Changes>,
    gate: Arc<WriteGate>,
    save_dir: std::path::PathBuf,
    /// The standby applier and the resync target of the sessions (see
    /// [`SessionWriters`]).
    writers: SessionWriters,
}

/// Counts the tasks of peer sessions that write the local disk: a session's
/// standby applier and its resync target. Their writes can outlive the
/// session (a stalled disk holds one, an overlapping later one waits for it
/// in the applier's range lock), and a write of an ended session landing
/// after a later write to the same region would leave older data under a
/// bitmap that says "in sync": the next session's resync, or the client
/// writes after an activation, would be silently undone. So a session ends
/// only when these tasks have ended (each finishes its accepted writes
/// first, [`replica::StandbySink::finish`], `resync::run_target`), and
/// activation waits for them too (DRBD's equivalent: the peer requests of
/// a connection must complete before it is torn down).
#[derive(Debug)]
struct SessionWriters(Arc<watch::Sender<usize>>);

/// One running writer task of [`SessionWriters`]; dropping it ends it.
struct WriterGuard(Arc<watch::Sender<usize>>);

impl SessionWriters {
    fn new() -> Self {
        SessionWriters(Arc::new(watch::channel(0).0))
    }

    fn enter(&self) -> WriterGuard {
        self.0.send_modify(|n| *n += 1);
        WriterGuard(self.0.clone())
    }

    fn busy(&self) -> bool {
        *self.0.borrow() > 0
    }

    /// Until no writer task runs.
    async fn idle(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`: `wait_for` cannot see it closed.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("resource", &self.resource)
            .field("peer", &self.peer_name)
            .finish_non_exhaustive()
    }
}

/// Errors starting the pair.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The shared secret could not be read.
    #[error(transparent)]
    Secret(#[from] crate::config::ConfigError),
    /// The link could not be specified.
    #[error("resource {resource}: peer link: {source}")]
    Link {
        /// Resource.
        resource: String,
        /// Why.
        source: peer::LinkError,
    },
    /// `divergent_save_dir` is unusable (checked at start, design notes
    /// property 8: a forced recovery must be able to save the loser's data).
    #[error("resource {resource}: {cause}")]
    SaveDir {
        /// Resource.
        resource: String,
        /// The path and why (not a directory, not writable, cannot be created).
        cause: String,
    },
}

/// Prefix of a dispatch error caused by a frame not valid in this state: the
/// session is then closed with Error(UNEXPECTED_MESSAGE).
const UNEXPECTED: &str = "unexpected message: ";

/// `PairStatus::sync` while connected and the two nodes' states are not compared yet (the
/// peer's first State of the session follows the connection by a moment).
pub const DECIDING: &str = "deciding";

fn describe_decision(decision: &Decision, rule: Rule, local: &str, peer: &str) -> String {
    let text = match decision {
        Decision::Resync {
            source,
            kind,
            save_loser_divergence,
        } => {
            let (s, t) = match source {
                Side::Local => (local, peer),
                Side::Peer => (peer, local),
            };
            let kind = match kind {
                ResyncKind::Differential => "differential",
                ResyncKind::Full => "full",
            };
            let save = if *save_loser_divergence {
                format!(", {t}'s regions saved first")
            } else {
                String::new()
            };
            format!("{kind} resync {s} -> {t}{save}")
        }
        other => other.to_string(),
    };
    format!("{} {}: {text}", rule.id, rule.name)
}

/// A resource's devices on this node, as the pair uses them.
pub struct LocalDevices {
    /// The data disk's engine.
    pub engine: Arc<dyn BlockEngine>,
    /// The cluster partition.
    pub meta: Arc<Meta>,
    /// Both, watched for stalls.
    pub stalls: Arc<engine::Stalls>,
}

impl std::fmt::Debug for LocalDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDevices")
            .field("engine", &self.engine.describe())
            .field("meta", &self.meta)
            .field("stalls", &self.stalls)
            .finish()
    }
}

impl Pair {
    /// Start the data link of `rc` on `node` and the task that serves its sessions.
    pub fn start(
        config: &Config,
        rc: &config::Resource,
        node: &str,
        devices: LocalDevices,
        changed: Arc<Changes>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Pair>, PairError> {
        let LocalDevices {
            engine,
            meta,
            stalls,
        } = devices;
        let peer_name = rc.peer_of(node).unwrap_or_default().to_string();
        let save_dir = rc
            .nodes
            .iter()
            .find(|n| n.server == node)
            .map(|n| n.divergent_save_dir.clone())
            .unwrap_or_else(|| std::env::temp_dir().join("nbd-mirror-divergent"));
        // The save directory must be usable before anything can be lost into
        // it; its free space is only warned about here (the worst case, every
        // dirty region, is checked again when a save is due).
        let save_base =
            resync::save::check_save_dir(&save_dir).map_err(|cause| PairError::SaveDir {
                resource: rc.name.clone(),
                cause,
            })?;
        let part = meta.partition();
        let dirty = part.dirty_count();
        let worst: u64 = dirty.saturating_mul(part.region_size());
        if let Err(why) = resync::save::check_save_space(&save_base, dirty, worst) {
            tracing::warn!(resource = %rc.name, "{why} (a forced recovery that makes {node} lose would be refused until then)");
        }
        let secret = config.read_secret()?;
        // The Hello callback needs the pair, which needs the link state: break the
        // cycle with a slot filled right after construction.
        let slot: Arc<std::sync::OnceLock<std::sync::Weak<Pair>>> =
            Arc::new(std::sync::OnceLock::new());
        let hello_slot = slot.clone();
        let hello_meta = meta.clone();
        let hello_state: peer::HelloStateFn = Arc::new(move || {
            let role = hello_slot
                .get()
                .and_then(|w| w.upgrade())
                .map(|p| p.role())
                .unwrap_or(PeerRole::Inactive);
            hello_state_of(&hello_meta, role)
        });
        let spec = LinkSpec::data(config, node, &rc.name, engine.size(), secret, hello_state)
            .map_err(|source| PairError::Link {
                resource: rc.name.clone(),
                source,
            })?;
        let mut handle = peer::spawn_link(spec, shutdown);
        let restored_break = meta
            .partition()
            .flags()
            .contains(Flags::OPERATOR_BREAK)
            .then(|| "recorded in the cluster partition before the agent started".to_string());
        if let Some(why) = &restored_break {
            tracing::warn!(resource = %rc.name, "mirror broken by the operator ({why}): no automatic recovery until `mdctrl recover {}`", rc.name);
        }
        let pair = Arc::new(Pair {
            resource: rc.name.clone(),
            node: node.to_string(),
            peer_name,
            cfg: rc.clone(),
            timeouts: config.timeouts,
            gate: WriteGate::new(meta.partition().region_size()),
            engine,
            meta,
            stalls,
            link_state: handle.state_watch(),
            st: Mutex::new(St {
                live: None,
                peer: None,
                peer_seen: None,
                role: PeerRole::Inactive,
                activating: false,
                volume: None,
                next_req: 0,
                pending: HashMap::new(),
                last_break: None,
                peer_disk_error: false,
                sessions: 0,
                mirror: Mirror::Unknown,
                logged: None,
                recovery: None,
                auto_block: None,
                // A `mdctrl break` survives agent restarts (flag OPERATOR_BREAK).
                operator_break: restored_break,
                draining_since: None,
            }),
            changed,
            save_dir,
            writers: SessionWriters::new(),
        });
        let _ = slot.set(Arc::downgrade(&pair));
        let p = pair.clone();
        tokio::spawn(async move {
            while let Some(session) = handle.sessions.recv().await {
                p.clone().run_session(session).await;
            }
        });
        Ok(pair)
    }

    fn role(&self) -> PeerRole {
        lock(&self.st).role
    }

    /// This node's state as sent to the peer.
    fn local_state(&self) -> NodeState {
        let st = lock(&self.st);
        let replicating = st.role == PeerRole::Active
            && st.volume.as_ref().map(|v| v.is_attached()).unwrap_or(false);
        self.local_state_as(st.role, replicating)
    }

    /// This node's state with `role` (for callers holding the state lock).
    fn local_state_as(&self, role: PeerRole, replicating: bool) -> NodeState {
        let sb = self.meta.partition().superblock();
        NodeState {
            role,
            gens: sb.state.gens.into(),
            flags: sb.state.flags.0,
            dirty_regions: self.meta.partition().dirty_count(),
            total_regions: self.meta.partition().region_count(),
            last_update: sb.last_update_time,
            break_time: sb.state.break_time,
            replicating,
            metadata_error: self.meta.partition().poisoned(),
            stalled: self.stalls.first().map(|s| s.what.to_string()),
        }
    }

    /// This node's view for the rules (fresh from the superblock).
    pub fn local_view(&self) -> NodeView {
        let cp = self.meta.partition();
        NodeView::from_state(&self.node, &self.resource, &cp.state(), cp.dirty_count())
    }

    fn peer_view(&self, s: &NodeState) -> NodeView {
        let state = bitmap::SbState {
            gens: s.gens.into(),
            flags: Flags(s.flags),
            ..self.meta.partition().state()
        };
        NodeView::from_state(&self.peer_name, &self.resource, &state, s.dirty_regions)
    }

    fn knowledge(&self, st: &St) -> PeerKnowledge {
        match (&st.live, &st.peer) {
            (Some(_), Some(p)) => PeerKnowledge::Connected {
                view: self.peer_view(p),
                active: p.role == PeerRole::Active,
            },
            _ => PeerKnowledge::Unreachable {
                node: self.peer_name.clone(),
            },
        }
    }

    fn is_in_sync(st: &St) -> bool {
        st.mirror == Mirror::InSync
    }

    async fn send_control(&self, tx: &SessionSender, msg: ControlMsg) {
        if tx
            .send(Message::Control {
                json: msg.to_json(),
            })
            .await
            .is_err()
        {
            tracing::debug!(resource = %self.resource, "control message not sent: session closed");
        }
    }

    /// The local data disk failed a request: record `DISK_ERROR` (rule R1)
    /// and tell the peer.
    async fn record_local_disk_error(&self, r: engine::DiskErrorReport) {
        tracing::error!(resource = %self.resource, "data disk error on this node: {} at {} (+{}): {}; recording it (the disk is not trusted any more: replace it, then `mdctrl init {} --force`)", r.op, r.offset, r.len, r.error, self.resource);
        match self.meta.record_disk_error().await {
            Ok(()) => self.send_state().await,
            Err(err) => {
                tracing::error!(resource = %self.resource, "cannot record the disk error: {err}")
            }
        }
        self.changed.bump();
    }

    /// The local engine for a resync, reporting its first disk error as
    /// [`Self::record_local_disk_error`] (`user`: the role, for the log).
    fn resync_engine(self: &Arc<Self>, user: &'static str) -> Arc<dyn BlockEngine> {
        let me = Arc::downgrade(self);
        Arc::new(engine::Watched::new(
            self.engine.clone(),
            user,
            Box::new(move |r| {
                if let Some(me) = me.upgrade() {
                    tokio::spawn(async move { me.record_local_disk_error(r).await });
                }
            }),
        ))
    }

    /// Sends this node's state to the peer now, if connected (a change it
    /// must see before the next periodic state, such as a failed or stalled
    /// device).
    pub(crate) async fn send_state(&self) {
        let tx = lock(&self.st).live.as_ref().map(|l| l.tx.clone());
        if let Some(tx) = tx {
            self.send_control(&tx, ControlMsg::State(self.local_state()))
                .await;
        }
    }

    /// Serve one authenticated session until it ends.
    async fn run_session(self: Arc<Self>, session: Session) {
        let Session {
            peer_hello,
            tx,
            mut rx,
            closed,
            peer_addr,
        } = session;
        let id = {
            let mut st = lock(&self.st);
            st.sessions += 1;
            let id = st.sessions;
            st.live = Some(Live {
                id,
                tx: tx.clone(),
                closed: closed.clone(),
                peer_addr,
                active: None,
                standby: None,
                to_resync: None,
                to_verify: None,
                auto_suppressed: false,
                attaching: false,
            });
            st.peer = None;
            st.mirror = Mirror::Unknown;
            st.logged = None;
            // The previous session's verdict; the first evaluation of this one sets it.
            st.auto_block = None;
            id
        };
        tracing::info!(resource = %self.resource, peer = %self.peer_name, %peer_addr, peer_generation = format_args!("{:016x}", peer_hello.generation.current), "peer connected");
        // Installed before this node's first State: the peer sends no data-path
        // frame before it has that State (it attaches on it).
        let progress = Arc::new(Dispatched::default());
        tx.set_hook(Some(self.data_hook(id, progress.clone())));
        self.changed.bump();
        self.send_control(&tx, ControlMsg::State(self.local_state()))
            .await;
        let mut tick = tokio::time::interval(STATE_INTERVAL);
        tick.tick().await;
        let end = loop {
            tokio::select! {
                f = rx.recv() => match f {
                    Some(frame) => {
                        let seq = frame.seq;
                        let res = self.dispatch(id, &tx, frame).await;
                        progress.advance(seq);
                        if let Err(why) = res {
                            tracing::warn!(resource = %self.resource, peer = %self.peer_name, "closing peer session: {why}");
                            if why.starts_with(UNEXPECTED) {
                                // The peer broke the protocol: tell it why (Error frame), not just Goodbye.
                                tx.close_with_error(&why, mirror_proto::error_code::UNEXPECTED_MESSAGE);
                            } else {
                                tx.close(&why);
                            }
                            break why;
                        }
                    }
                    None => break closed.reason().unwrap_or_else(|| "session ended".into()),
                },
                reason = closed.wait() => break reason,
                _ = tick.tick() => self.send_control(&tx, ControlMsg::State(self.local_state())).await,
            }
        };
        let draining = {
            let mut st = lock(&self.st);
            if st.live.as_ref().map(|l| l.id) == Some(id) {
                st.live = None;
                st.mirror = Mirror::Unknown;
            }
            // Under the same lock: an activation never sees the session gone
            // without seeing its writes pending.
            if self.writers.busy() {
                st.draining_since = Some(Instant::now());
            }
            for (_, w) in st.pending.drain() {
                let _ = w.send((false, Some(format!("peer link lost: {end}"))));
            }
            st.draining_since
        };
        tracing::warn!(resource = %self.resource, peer = %self.peer_name, "peer session ended: {end}");
        self.changed.bump();
        // The next session (and an activation) waits for this one's local
        // writes (`SessionWriters`). Closing ends its standby applier (on
        // `closed`) and its resync target (its frame channel went with `live`).
        tx.close(&end);
        if let Some(since) = draining {
            // Usually a matter of milliseconds; longer is worth a line.
            if tokio::time::timeout(DRAIN_QUIET, self.writers.idle())
                .await
                .is_err()
            {
                tracing::warn!(resource = %self.resource, peer = %self.peer_name, "waiting for the local writes of the ended session (standby applier, resync target) to complete before the next session");
                self.writers.idle().await;
                tracing::info!(resource = %self.resource, peer = %self.peer_name, waited_ms = since.elapsed().as_millis() as u64, "the local writes of the ended session completed");
            }
            lock(&self.st).draining_since = None;
            self.changed.bump();
        }
    }

    /// The session reader's hook ([`peer::SessionSender::set_hook`]): acks go
    /// straight to the attached active volume and data frames to the standby
    /// applier, in the reader task (no dispatcher task, no channel hop).
    /// Everything else, and data-path frames without a consumer, go to
    /// [`Self::dispatch`] through the session's channel.
    ///
    /// Order: a data-path frame is handled here only once the dispatcher has
    /// finished every frame passed to it before ([`peer::HookCx::passed`]):
    /// the State that makes this node the standby (or a data frame passed
    /// before the applier existed) is then handled before it, as when every
    /// frame went through the dispatcher. Otherwise the reader waits for the
    /// dispatcher (rare: a control frame just before a data frame).
    fn data_hook(self: &Arc<Self>, id: u64, progress: Arc<Dispatched>) -> peer::FrameHook {
        let weak = Arc::downgrade(self);
        Arc::new(move |frame: Frame, cx: peer::HookCx| {
            let Some(me) = weak.upgrade() else {
                return peer::Hooked::Pass(frame);
            };
            let Some(consumer) = me.consumer(id, &frame.msg) else {
                // The dispatcher decides (resync, late ack, protocol error), in order.
                return peer::Hooked::Pass(frame);
            };
            if progress.seq() >= cx.passed {
                return consumer.take(frame, cx.more);
            }
            let progress = progress.clone();
            peer::Hooked::Run(Box::pin(async move {
                progress.wait_for(cx.passed).await;
                // The dispatcher may have changed the consumer meanwhile.
                match me.consumer(id, &frame.msg) {
                    Some(c) => match c.take(frame, cx.more) {
                        peer::Hooked::Done => None,
                        peer::Hooked::Run(f) => f.await,
                        peer::Hooked::Pass(f) => Some(f),
                    },
                    None => Some(frame),
                }
            }))
        })
    }

    /// The data-path consumer of `msg` on session `id`, if any: the attached
    /// active volume for acks, the standby applier for data frames.
    fn consumer(&self, id: u64, msg: &Message) -> Option<Consumer> {
        let st = lock(&self.st);
        let l = st.live.as_ref().filter(|l| l.id == id)?;
        match msg {
            Message::Ack1 { .. } | Message::Ack2 { .. } | Message::FlushAck { .. } => l
                .active
                .as_ref()
                .filter(|a| !a.ended())
                .cloned()
                .map(Consumer::Active),
            Message::Write { .. }
            | Message::Trim { .. }
            | Message::WriteZeroes { .. }
            | Message::Flush => l.standby.clone().map(Consumer::Standby),
            _ => None,
        }
    }

    /// Route one received frame. `Err` closes the session.
    async fn dispatch(
        self: &Arc<Self>,
        id: u64,
        tx: &SessionSender,
        frame: Frame,
    ) -> Result<(), String> {
        // Data-path frames the reader hook passed (no consumer then): one may
        // exist now (this node became the standby on the State before).
        let frame = match frame.msg {
            Message::Ack1 { .. }
            | Message::Ack2 { .. }
            | Message::FlushAck { .. }
            | Message::Write { .. }
            | Message::Trim { .. }
            | Message::WriteZeroes { .. }
            | Message::Flush => match self.consumer(id, &frame.msg) {
                Some(c) => match c.take(frame, false) {
                    peer::Hooked::Done => return Ok(()),
                    peer::Hooked::Run(f) => match f.await {
                        None => return Ok(()),
                        Some(f) => f,
                    },
                    peer::Hooked::Pass(f) => f,
                },
                None => frame,
            },
            _ => frame,
        };
        let to_resync = lock(&self.st)
            .live
            .as_ref()
            .and_then(|l| l.to_resync.clone());
        match &frame.msg {
            Message::Control { json } => {
                let msg = ControlMsg::from_json(json)?;
                if msg.is_resync() {
                    return match to_resync {
                        Some(to) => to.send(frame).await.map_err(|_| "resync ended".to_string()),
                        None => Err(format!("peer {} sent a resync message while no resync runs", self.peer_name)),
                    };
                }
                self.on_control(id, tx, msg).await;
                Ok(())
            }
            Message::Ack1 { .. } | Message::Ack2 { .. } | Message::FlushAck { .. } => match to_resync {
                Some(to) => to.send(frame).await.map_err(|_| "resync ended".to_string()),
                None => {
                    tracing::debug!(resource = %self.resource, seq = frame.seq, "late acknowledgement ignored (not replicating)");
                    Ok(())
                }
            },
            Message::ResyncData { .. } | Message::BitmapChunk(_) => match to_resync {
                Some(to) => to.send(frame).await.map_err(|_| "resync ended".to_string()),
                None if matches!(frame.msg, Message::BitmapChunk(_)) => {
                    // The bitmap of a resync this node refused: nothing to do with it.
                    tracing::debug!(resource = %self.resource, "bitmap chunk of a refused resync ignored");
                    Ok(())
                }
                None => Err(format!("{UNEXPECTED}peer {} sent resync data while {} is not its resync target: nothing applied", self.peer_name, self.node)),
            },
            Message::Write { .. } | Message::Trim { .. } | Message::WriteZeroes { .. } | Message::Flush => Err(format!(
                    "{UNEXPECTED}peer {} sent {:?} data while {} is not its standby (not granted, or not in sync): nothing applied",
                    self.peer_name,
                    frame.msg.kind(),
                    self.node
                )),
            Message::ChecksumRequest { region_size, entries } => {
                let reply = self.checksums(*region_size, entries.iter().map(|e| e.region)).await?;
                tx.send(Message::ChecksumReply { request_seq: frame.seq, region_size: *region_size, entries: reply })
                    .await
                    .map_err(|_| "session closed".to_string())?;
                Ok(())
            }
            Message::ChecksumReply { .. } => {
                let to = lock(&self.st).live.as_ref().and_then(|l| l.to_verify.clone());
                match to {
                    Some(to) => to.send(frame).await.map_err(|_| "verify ended".to_string()),
                    None => Ok(()),
                }
            }
            other => Err(format!("{UNEXPECTED}{:?} frame on the data link", other.kind())),
        }
    }

    /// CRC-32 of each region's bytes (`region_size` must be ours).
    async fn checksums(
        &self,
        region_size: u32,
        regions: impl Iterator<Item = u64>,
    ) -> Result<Vec<mirror_proto::RegionChecksum>, String> {
        let cp = self.meta.partition();
        if region_size as u64 != cp.region_size() {
            return Err(format!(
                "checksum request for {region_size}-byte regions, {} uses {}",
                self.resource,
                cp.region_size()
            ));
        }
        let mut out = Vec::new();
        for region in regions {
            if region >= cp.region_count() {
                return Err(format!(
                    "checksum request for region {region} of {}",
                    cp.region_count()
                ));
            }
            let b = cp.region_bytes(region);
            let data = self
                .engine
                .read(b.start, (b.end - b.start) as usize)
                .await
                .map_err(|e| format!("verify: reading region {region} at {}: {e}", b.start))?;
            out.push(mirror_proto::RegionChecksum {
                region,
                checksum: crc32fast::hash(&data),
            });
        }
        Ok(out)
    }

    /// `mdctrl verify`: compare every region's checksum with the peer's,
    /// online. Differing regions are marked dirty here (this node is the
    /// source side: the active node, or either when neither is active) and
    /// the generation moves so that the next resync copies them.
    pub async fn verify(self: &Arc<Self>) -> Result<String, AdminError> {
        self.require_connected().await?;
        let (tx, mut rx, id, active) = {
            let mut st = lock(&self.st);
            if st.mirror != Mirror::InSync {
                return Err(AdminError::refused(
                    format!(
                        "{} is not in sync ({}): verify compares an in-sync pair",
                        self.resource,
                        match &st.mirror {
                            Mirror::Decided { decision, rule } =>
                                describe_decision(decision, *rule, &self.node, &self.peer_name),
                            Mirror::Resyncing => "resync running".into(),
                            _ => DECIDING.into(),
                        }
                    ),
                    format!("`mdctrl recover {}` first", self.resource),
                ));
            }
            if st.role != PeerRole::Active
                && st.peer.as_ref().is_some_and(|p| p.role == PeerRole::Active)
            {
                return Err(AdminError::refused(
                    format!("{} is active on {}", self.resource, self.peer_name),
                    format!(
                        "run `mdctrl verify {}` on {} (the active node)",
                        self.resource, self.peer_name
                    ),
                ));
            }
            let active = st.role == PeerRole::Active;
            let Some(live) = st.live.as_mut() else {
                return Err(self.unreachable());
            };
            if live.to_verify.is_some() {
                return Err(AdminError::refused(
                    format!("a verify of {} is already running", self.resource),
                    "wait for it",
                ));
            }
            let (ftx, frx) = mpsc::channel(4);
            live.to_verify = Some(ftx);
            (live.tx.clone(), frx, live.id, active)
        };
        let r = self.verify_run(&tx, &mut rx, active).await;
        if let Some(l) = lock(&self.st).live.as_mut().filter(|l| l.id == id) {
            l.to_verify = None;
        }
        let differing = r?;
        let total = self.meta.partition().region_count();
        if differing.is_empty() {
            tracing::info!(resource = %self.resource, regions = total, "verify: every region identical on {} and {}", self.node, self.peer_name);
            return Ok(format!(
                "verify of {}: {total} regions compared, 0 differ",
                self.resource
            ));
        }
        let n = differing.len();
        tracing::warn!(resource = %self.resource, differing = n, first = ?differing.iter().take(16).collect::<Vec<_>>(), "verify: regions differ between {} and {}", self.node, self.peer_name);
        let cp = self.meta.partition().clone();
        tokio::task::spawn_blocking(move || {
            cp.mark_dirty_regions(differing)?;
            cp.update_superblock(|sb| {
                gens::begin_diverging(&mut sb.gens);
            })
            .map(|_| ())
        })
        .await
        .map_err(|e| AdminError::internal(format!("verify: {e}")))?
        .map_err(|e| AdminError::internal(format!("verify: marking the differing regions: {e}")))?;
        let vol = lock(&self.st).volume.clone();
        if let Some(vol) = vol {
            // The pair is no longer in sync: stop replicating; reconnecting
            // decides R14 and automatic recovery copies the marked regions.
            vol.detach(&format!("verify found {n} differing regions"))
                .await
                .map_err(|e| AdminError::internal(format!("verify: detaching replication: {e}")))?;
        } else {
            self.evaluate_after(id, |st| st.mirror = Mirror::Unknown);
        }
        Ok(format!(
            "verify of {}: {total} regions compared, {n} differ; marked dirty on {} (the source side): {}",
            self.resource,
            self.node,
            if active { "the mirror re-synchronises them now".to_string() } else { format!("`mdctrl recover {}` copies them", self.resource) }
        ))
    }

    async fn verify_run(
        &self,
        tx: &SessionSender,
        rx: &mut mpsc::Receiver<Frame>,
        active: bool,
    ) -> Result<Vec<u64>, AdminError> {
        const BATCH: u64 = 64;
        let cp = self.meta.partition().clone();
        let (n, rs) = (cp.region_count(), cp.region_size() as u32);
        let mut differing = Vec::new();
        let mut first = 0;
        while first < n {
            let regions = first..(first + BATCH).min(n);
            first = regions.end;
            // With the gate held no application write is in flight; in sync
            // mode every completed write is durable on the peer.
            let hold = if active {
                Some(self.gate.exclusive().await)
            } else {
                None
            };
            let mine = self
                .checksums(rs, regions.clone())
                .await
                .map_err(AdminError::internal)?;
            let seq = tx
                .send(Message::ChecksumRequest {
                    region_size: rs,
                    entries: mine.clone(),
                })
                .await
                .map_err(|_| self.unreachable())?;
            let theirs = loop {
                let f =
                    tokio::time::timeout(self.timeouts.ack.max(Duration::from_secs(10)), rx.recv())
                        .await
                        .map_err(|_| AdminError {
                            kind: ErrorKind::PeerUnreachable,
                            message: format!(
                                "{} did not answer the checksum request",
                                self.peer_name
                            ),
                            hint: None,
                        })?
                        .ok_or_else(|| self.unreachable())?;
                if let Message::ChecksumReply {
                    request_seq,
                    entries,
                    ..
                } = f.msg
                {
                    if request_seq == seq {
                        break entries;
                    }
                }
            };
            drop(hold);
            if theirs.len() != mine.len() {
                return Err(AdminError::internal(format!(
                    "{} answered {} checksums for {} regions",
                    self.peer_name,
                    theirs.len(),
                    mine.len()
                )));
            }
            for (m, t) in mine.iter().zip(&theirs) {
                if m.region != t.region {
                    return Err(AdminError::internal(format!(
                        "{} answered region {} for {}",
                        self.peer_name, t.region, m.region
                    )));
                }
                if m.checksum != t.checksum {
                    differing.push(m.region);
                }
            }
        }
        Ok(differing)
    }

    async fn on_control(self: &Arc<Self>, id: u64, tx: &SessionSender, msg: ControlMsg) {
        match msg {
            ControlMsg::State(s) => {
                // Installed and evaluated under one lock: a status read in between would
                // show the new state beside the previous decision's auto-recovery verdict.
                self.evaluate_after(id, |st| {
                    st.peer = Some(s);
                    st.peer_seen = Some(Instant::now());
                });
                self.changed.bump();
            }
            ControlMsg::ActivateRequest { id: req } => {
                let verdict = self.grant(id);
                if verdict.is_ok() {
                    tracing::info!(resource = %self.resource, peer = %self.peer_name, "granted activation to the peer: standing by");
                }
                let (ok, reason) = match verdict {
                    Ok(()) => (true, None),
                    Err(r) => {
                        tracing::warn!(resource = %self.resource, peer = %self.peer_name, "refused the peer's activation: {r}");
                        (false, Some(r))
                    }
                };
                self.send_control(
                    tx,
                    ControlMsg::ActivateReply {
                        id: req,
                        ok,
                        reason,
                    },
                )
                .await;
                self.evaluate(id);
            }
            ControlMsg::ActivateReply {
                id: req,
                ok,
                reason,
            }
            | ControlMsg::StartReply {
                id: req,
                ok,
                reason,
            } => {
                if let Some(w) = lock(&self.st).pending.remove(&req) {
                    let _ = w.send((ok, reason));
                }
            }
            ControlMsg::StartResync { id: req, forced } => {
                // An operator's recover/force on either node ends an operator break.
                let cleared = self.set_operator_break(None).await;
                let r = if let Err(e) = cleared {
                    Err(e)
                } else if forced {
                    self.start_forced_local().await
                } else {
                    self.start_decided(false).await
                };
                let (ok, reason) = match r {
                    Ok(_) => (true, None),
                    Err(e) => (false, Some(e.to_string())),
                };
                self.send_control(
                    tx,
                    ControlMsg::StartReply {
                        id: req,
                        ok,
                        reason,
                    },
                )
                .await;
            }
            ControlMsg::ResyncBegin {
                full,
                save,
                forced,
                rule,
            } => {
                if let Err(why) = self.begin_target(id, tx, full, save, forced, &rule) {
                    tracing::warn!(resource = %self.resource, peer = %self.peer_name, "refused the peer's resync ({rule}): {why}");
                    self.send_control(
                        tx,
                        ControlMsg::ResyncReady {
                            ok: false,
                            reason: Some(why),
                        },
                    )
                    .await;
                }
            }
            ControlMsg::ResyncReady { .. }
            | ControlMsg::ResyncFinished { .. }
            | ControlMsg::ResyncComplete {} => {}
        }
    }

    /// May the peer become active? On yes, mark it active (so its data frames are accepted).
    fn grant(&self, _id: u64) -> Result<(), String> {
        let mut st = lock(&self.st);
        if st.role == PeerRole::Active {
            return Err(format!("{} is active for {}", self.node, self.resource));
        }
        if st.activating && self.node.as_bytes() < self.peer_name.as_bytes() {
            return Err(format!(
                "{} is activating {} at the same moment and takes precedence",
                self.node, self.resource
            ));
        }
        let Some(peer) = st.peer.as_ref() else {
            return Err("the state of the pair is not known yet".into());
        };
        // The requester's may_activate, seen from here: it must hold the latest data.
        let (local, requester) = (self.local_view(), self.peer_view(peer));
        let both_new = PeerKnowledge::Connected {
            view: requester.clone(),
            active: false,
        };
        if rules::initial_source_allowed(&local, &both_new) {
            // Initial mirror construction (R5): the requester's data becomes
            // the source; it records the claim before serving, then R6.
            tracing::info!(resource = %self.resource, peer = %self.peer_name, "both nodes new (rule {}): {} claims the initial source, {} will be copied in full", rules::R5, self.peer_name, self.node);
            if let Some(p) = st.peer.as_mut() {
                p.role = PeerRole::Active;
            }
            return Ok(());
        }
        let (decision, rule) = rules::decide(&local, &requester);
        match decision {
            Decision::InSync
            | Decision::Resync {
                source: Side::Peer, ..
            } => {}
            other => {
                return Err(format!(
                    "{} (rule {rule}) as seen by {}",
                    describe_decision(&other, rule, &self.node, &self.peer_name),
                    self.node
                ))
            }
        }
        if let Some(p) = st.peer.as_mut() {
            p.role = PeerRole::Active;
        }
        Ok(())
    }

    /// Re-evaluate the session: decide (until in sync or resyncing), attach
    /// replication, start the standby applier, start automatic recovery.
    fn evaluate(self: &Arc<Self>, id: u64) {
        self.evaluate_after(id, |_| {});
    }

    /// [`Self::evaluate`] after `update`, under the same lock, so that no status read sees
    /// the update without its evaluation. Neither happens unless session `id` is the live one.
    fn evaluate_after(self: &Arc<Self>, id: u64, update: impl FnOnce(&mut St)) {
        let mut st = lock(&self.st);
        if st.live.as_ref().map(|l| l.id) != Some(id) {
            return;
        }
        update(&mut st);
        let Some(peer) = st.peer.clone() else { return };
        let peer_active = peer.role == PeerRole::Active;
        let local_active = st.role == PeerRole::Active;
        // The active peer attached with a fresh "in sync" decision and told us
        // before its first data frame: follow it.
        if peer.replicating
            && peer_active
            && !local_active
            && st.mirror != Mirror::Resyncing
            && st.mirror != Mirror::InSync
        {
            tracing::info!(resource = %self.resource, peer = %self.peer_name, "peer {} replicates to {}: in sync", self.peer_name, self.node);
            st.mirror = Mirror::InSync;
        }
        if matches!(st.mirror, Mirror::Unknown | Mirror::Decided { .. }) {
            let (decision, rule) = rules::decide(&self.local_view(), &self.peer_view(&peer));
            let text = describe_decision(&decision, rule, &self.node, &self.peer_name);
            if st.logged.as_deref() != Some(text.as_str()) {
                tracing::info!(resource = %self.resource, peer = %self.peer_name, rule = rule.id, rule_name = rule.name, "decision {text}");
                st.logged = Some(text);
            }
            if decision == Decision::InSync && !local_active {
                st.mirror = Mirror::InSync;
                // R7/R8: replication (re)starts; stale intents and WAS_ACTIVE go.
                let cp = self.meta.partition().clone();
                tokio::task::spawn_blocking(move || {
                    let _ = cp.update_superblock(|sb| gens::on_replicating(sb, false));
                    let dirty: Vec<u64> = cp.iter_dirty().collect();
                    if !dirty.is_empty() {
                        let _ = cp.clear_regions(dirty);
                    }
                });
            } else {
                st.mirror = Mirror::Decided {
                    decision: decision.clone(),
                    rule,
                };
                if decision == Decision::InSync && local_active {
                    self.spawn_attach(&mut st, id);
                }
            }
        }
        if local_active
            && st.mirror == Mirror::InSync
            && !st.volume.as_ref().map(|v| v.is_attached()).unwrap_or(true)
        {
            self.spawn_attach(&mut st, id);
        }
        let in_sync = Self::is_in_sync(&st);
        let Some(live) = st.live.as_mut() else { return };
        if !local_active && peer_active && in_sync && live.standby.is_none() {
            let sink = replica::StandbySink::new(
                self.engine.clone(),
                adapt::frame_tx(&live.tx),
                replica::StandbyOptions::default(),
            );
            live.standby = Some(sink.clone());
            let closed = live.closed.clone();
            let me = self.clone();
            let writer = self.writers.enter();
            tracing::info!(resource = %self.resource, peer = %self.peer_name, "standby: applying the active peer's writes");
            tokio::spawn(async move {
                let reason = closed.wait().await;
                let end = sink.finish(reason).await;
                me.standby_ended(id, Ok(end)).await;
                drop(writer);
            });
        }
        // Automatic recovery (ancestor §11.10.1).
        let auto = self.auto_check(&st, &peer);
        st.auto_block = auto.as_ref().err().cloned();
        if let Ok(()) = auto {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.start_decided(true).await {
                    tracing::warn!(resource = %me.resource, "automatic recovery did not start: {e}");
                }
            });
        }
    }

    /// `Ok` when an automatic recovery should start now from this node.
    fn auto_check(&self, st: &St, peer: &NodeState) -> Result<(), String> {
        if let Some(why) = &st.operator_break {
            return Err(format!(
                "mirror broken by the operator ({why}): `mdctrl recover {}`",
                self.resource
            ));
        }
        if st.mirror == Mirror::Resyncing {
            return Err("a resync is running".into());
        }
        if st.mirror == Mirror::InSync {
            return Err("no-difference: in sync".into());
        }
        let knowledge = PeerKnowledge::Connected {
            view: self.peer_view(peer),
            active: peer.role == PeerRole::Active,
        };
        match rules::auto_recovery_allowed(
            &self.local_view(),
            st.role == PeerRole::Active,
            &knowledge,
        ) {
            Err(b) => Err(format!("{}: {b}", b.code())),
            Ok((d, _)) if d.source() != Some(Side::Local) => {
                Err("the peer starts it (it is the source)".into())
            }
            Ok(_) if !self.cfg.auto_recovery => Err(format!(
                "auto_recovery is off: `mdctrl recover {}`",
                self.resource
            )),
            Ok(_) if st.live.as_ref().map(|l| l.auto_suppressed).unwrap_or(true) => {
                Err("the last automatic attempt was refused on this session (see the log)".into())
            }
            Ok(_) => Ok(()),
        }
    }

    /// Attach replication with the write gate held and a fresh decision.
    fn spawn_attach(self: &Arc<Self>, st: &mut St, id: u64) {
        let Some(live) = st.live.as_mut().filter(|l| l.id == id) else {
            return;
        };
        if live.attaching {
            return;
        }
        live.attaching = true;
        let me = self.clone();
        tokio::spawn(async move {
            let hold = me.gate.exclusive().await;
            me.attach_held(id, false);
            me.send_state().await;
            drop(hold);
            if let Some(l) = lock(&me.st).live.as_mut().filter(|l| l.id == id) {
                l.attaching = false;
            }
            me.changed.bump();
        });
    }

    /// With the gate held (no application write in flight): attach if the
    /// pair is in sync now (`after_resync`: a resync just made it so).
    fn attach_held(self: &Arc<Self>, id: u64, after_resync: bool) {
        let mut st = lock(&self.st);
        if st.operator_break.is_some() || st.role != PeerRole::Active {
            return;
        }
        let Some(peer) = st.peer.clone() else { return };
        if !after_resync {
            let (decision, rule) = rules::decide(&self.local_view(), &self.peer_view(&peer));
            if decision != Decision::InSync {
                tracing::info!(resource = %self.resource, rule = rule.id, "not attaching: {}", describe_decision(&decision, rule, &self.node, &self.peer_name));
                st.mirror = Mirror::Decided { decision, rule };
                return;
            }
        }
        st.mirror = Mirror::InSync;
        let volume = st.volume.clone();
        let Some(live) = st.live.as_mut().filter(|l| l.id == id) else {
            return;
        };
        let Some(vol) = volume else { return };
        if vol.is_attached() || live.active.is_some() {
            return;
        }
        match vol.attach_sink(adapt::frame_tx(&live.tx), adapt::close_signal(&live.closed)) {
            Ok(sink) => {
                live.active = Some(sink);
                tracing::info!(resource = %self.resource, peer = %self.peer_name, mode = %self.cfg.mode, "mirroring: writes are replicated");
            }
            Err(e) => tracing::error!(resource = %self.resource, "cannot attach replication: {e}"),
        }
    }

    async fn standby_ended(
        &self,
        id: u64,
        end: Result<replica::StandbyEnd, replica::ReplicaError>,
    ) {
        {
            let mut st = lock(&self.st);
            if let Some(l) = st.live.as_mut().filter(|l| l.id == id) {
                l.standby = None;
            }
        }
        match end {
            Ok(e) => {
                tracing::info!(resource = %self.resource, applied = e.applied, bytes = e.applied_bytes, flushes = e.flushes, "standby applier ended: {}", e.reason);
                if let Some(d) = e.disk_error {
                    tracing::error!(resource = %self.resource, "standby disk error: {} at {} (+{}): errno {}", d.op, d.offset, d.len, d.errno);
                    if let Err(err) = self.meta.record_disk_error().await {
                        tracing::error!(resource = %self.resource, "cannot record the disk error: {err}");
                    }
                }
            }
            Err(e) => tracing::warn!(resource = %self.resource, "standby applier: {e}"),
        }
    }

    /// Wait until a session is up and the peer's state is known, up to `limit`.
    async fn wait_peer_state(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = lock(&self.st);
                if st.live.is_some() && st.peer.is_some() {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    fn new_volume(self: &Arc<Self>) -> Arc<dyn BlockEngine> {
        let (vol, events) = ActiveVolume::new(
            self.engine.clone(),
            self.meta.partition().clone(),
            ActiveConfig::from_config(&self.cfg, &self.timeouts),
        );
        {
            let mut st = lock(&self.st);
            st.role = PeerRole::Active;
            st.volume = Some(vol.clone());
        }
        self.spawn_event_consumer(events);
        Arc::new(GatedVolume::new(Arc::new(vol), self.gate.clone()))
    }

    /// Become active: `rules::may_activate` and the peer's grant (or, with the
    /// peer unreachable, the local FORCED flag). Returns the engine to serve
    /// (the replicated volume behind the resync write gate).
    pub async fn activate(self: &Arc<Self>) -> Result<Arc<dyn BlockEngine>, AdminError> {
        // Writes of an ended session must not land over the client's. (The
        // live session's own writers are the rules' business: a standby
        // applier means an active peer, a resync target an inconsistent node.)
        let draining = lock(&self.st).draining_since.is_some();
        if draining
            && tokio::time::timeout(self.timeouts.ack, self.writers.idle())
                .await
                .is_err()
        {
            let secs = lock(&self.st)
                .draining_since
                .map(|t| t.elapsed().as_secs())
                .unwrap_or(0);
            return Err(AdminError::refused(
                format!("writes {} sent before the last session ended have not completed on the local disk yet (waiting for {secs} s): serving now could let them land over newer writes", self.peer_name),
                "check the local data disk (a stalled device holds them); activate again once `mdctrl status` no longer says it is waiting for them",
            ));
        }
        let connected = self.wait_peer_state(self.timeouts.connect).await;
        let knowledge = self.knowledge(&lock(&self.st));
        if let Err(r) = rules::may_activate(&self.local_view(), &knowledge) {
            let kind = if connected {
                ErrorKind::Refused
            } else {
                ErrorKind::PeerUnreachable
            };
            let link = describe_link(&self.link_state.borrow());
            let message = if connected {
                r.reason
            } else {
                format!("{} (link: {link})", r.reason)
            };
            return Err(AdminError {
                kind,
                message,
                hint: Some(r.hint),
            });
        }
        if !connected {
            tracing::warn!(resource = %self.resource, peer = %self.peer_name, "activating without the peer: {} is FORCED", self.node);
            let vol = self.new_volume();
            // Divergence is recorded now (before the first write): on_activate(false).
            let cp = self.meta.partition().clone();
            tokio::task::spawn_blocking(move || {
                cp.update_superblock(|sb| {
                    gens::on_activate(sb, false);
                })
            })
            .await
            .map_err(|e| AdminError::internal(format!("recording the activation: {e}")))?
            .map_err(|e| {
                AdminError::internal(format!(
                    "recording the activation in the cluster partition: {e}"
                ))
            })?;
            return Ok(vol);
        }
        let (req, reply, tx) = {
            let mut st = lock(&self.st);
            let Some(tx) = st.live.as_ref().map(|l| l.tx.clone()) else {
                return Err(AdminError::refused("the peer link dropped", "retry"));
            };
            st.next_req += 1;
            let req = st.next_req;
            let (w, r) = oneshot::channel();
            st.pending.insert(req, w);
            st.activating = true;
            (req, r, tx)
        };
        self.send_control(&tx, ControlMsg::ActivateRequest { id: req })
            .await;
        let answer = tokio::time::timeout(self.timeouts.ack, reply).await;
        let done = |st: &mut St| {
            st.activating = false;
            st.pending.remove(&req);
        };
        let (ok, reason) = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => (false, Some("the request was dropped".into())),
            Err(_) => (
                false,
                Some(format!("no answer within {:?}", self.timeouts.ack)),
            ),
        };
        if !ok {
            done(&mut lock(&self.st));
            return Err(AdminError::refused(
                format!(
                    "{} refused the activation of {}: {}",
                    self.peer_name,
                    self.resource,
                    reason.unwrap_or_default()
                ),
                format!("`mdctrl status {}` shows both sides", self.resource),
            ));
        }
        if self.local_view().never_synced() {
            // Granted as the initial source (both nodes new, rule R5): record
            // the claim before the first write, so the full copy to the peer
            // (rule R6) is decided the same way after any crash or restart.
            let cp = self.meta.partition().clone();
            let claimed = tokio::task::spawn_blocking(move || {
                cp.update_superblock(|sb| {
                    gens::claim_initial_source(sb);
                })
            })
            .await;
            let failed = match claimed {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = failed {
                done(&mut lock(&self.st));
                return Err(AdminError::internal(format!(
                    "recording the initial-source claim in the cluster partition: {e}"
                )));
            }
            tracing::warn!(resource = %self.resource, peer = %self.peer_name, "initial mirror construction: the data of {} is the source; {} will be overwritten by a full resync", self.node, self.peer_name);
        }
        let vol = self.new_volume();
        let id = {
            let mut st = lock(&self.st);
            done(&mut st);
            st.live.as_ref().map(|l| l.id)
        };
        if let Some(id) = id {
            self.evaluate(id);
        }
        self.send_state().await;
        Ok(vol)
    }

    fn spawn_event_consumer(self: &Arc<Self>, mut events: mpsc::UnboundedReceiver<ReplicaEvent>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let Some(me) = me.upgrade() else { return };
                match ev {
                    ReplicaEvent::MirrorBroken {
                        reason,
                        peer_disk_error,
                    } => {
                        tracing::warn!(resource = %me.resource, peer = %me.peer_name, peer_disk_error, "mirror break: {reason}");
                        let mut st = lock(&me.st);
                        st.last_break = Some(reason);
                        st.peer_disk_error |= peer_disk_error;
                        if st.mirror == Mirror::InSync {
                            st.mirror = Mirror::Unknown;
                        }
                        if let Some(l) = st.live.as_mut() {
                            l.active = None;
                        }
                    }
                    ReplicaEvent::BreakRecorded => {
                        tracing::info!(resource = %me.resource, "mirror break recorded in the cluster partition (generations moved)");
                        me.send_state().await;
                    }
                    ReplicaEvent::BreakRecordFailed { error } => {
                        tracing::error!(resource = %me.resource, "recording the mirror break failed: {error}");
                    }
                    ReplicaEvent::LocalDiskError(r) => me.record_local_disk_error(r).await,
                    ReplicaEvent::MetadataFailed { error } => {
                        tracing::error!(resource = %me.resource, peer = %me.peer_name, "the cluster partition failed, client writes fail until the agent restarts on a working one: {error}");
                        me.send_state().await;
                    }
                }
                me.changed.bump();
            }
        });
    }

    /// Stop being active (after the NBD server drained): wait for the peer's
    /// acknowledgements, then release the volume and tell the peer.
    pub async fn deactivate(&self) -> Result<(), AdminError> {
        let vol = {
            let mut st = lock(&self.st);
            st.role = PeerRole::Inactive;
            st.volume.take()
        };
        if let Some(vol) = vol {
            let clean = vol.release(self.timeouts.ack).await.map_err(|e| {
                AdminError::internal(format!("releasing the replicated volume: {e}"))
            })?;
            if clean {
                // The peer holds every write: the keep-dirty regions can go, so the
                // next activation (on either node) starts from a clean bitmap.
                let cp = self.meta.partition().clone();
                let keep = cp.keep_dirty_capacity();
                let cleared = tokio::task::spawn_blocking(move || {
                    cp.set_keep_dirty_capacity(0);
                    let r = cp.flush_clears();
                    cp.set_keep_dirty_capacity(keep);
                    r
                })
                .await
                .map_err(|e| AdminError::internal(format!("clearing the bitmap: {e}")))?;
                match cleared {
                    Ok(n) => {
                        tracing::info!(resource = %self.resource, cleared = n, "released: peer holds every write, bitmap cleared")
                    }
                    Err(e) => {
                        tracing::error!(resource = %self.resource, "clearing the bitmap after release failed: {e}")
                    }
                }
            } else {
                tracing::warn!(resource = %self.resource, "released with writes unacknowledged by {}: mirror break recorded", self.peer_name);
            }
        }
        {
            let mut st = lock(&self.st);
            if let Some(l) = st.live.as_mut() {
                l.active = None;
            }
        }
        self.send_state().await;
        Ok(())
    }

    // ----- recovery -----

    fn running(&self) -> Option<String> {
        let st = lock(&self.st);
        if st.mirror == Mirror::Resyncing {
            let dir = st
                .recovery
                .as_ref()
                .map(|p| lock(p).direction.clone())
                .unwrap_or_default();
            return Some(format!(
                "a resync of {} is already running ({dir})",
                self.resource
            ));
        }
        None
    }

    /// `mdctrl recover`: start the resync `decide` chose (this node or the
    /// peer as source). Returns a description of what started.
    pub async fn recover(self: &Arc<Self>) -> Result<String, AdminError> {
        if let Some(r) = self.running() {
            return Err(AdminError::refused(
                r,
                format!("`mdctrl status {}` shows its progress", self.resource),
            ));
        }
        self.require_connected().await?;
        self.set_operator_break(None).await?;
        let (decision, rule) = {
            let st = lock(&self.st);
            if st.mirror == Mirror::InSync {
                return Err(AdminError::refused(
                    format!(
                        "{} is in sync between {} and {}: nothing to recover",
                        self.resource, self.node, self.peer_name
                    ),
                    format!("nothing to do; `mdctrl status {}`", self.resource),
                ));
            }
            let Some(peer) = st.peer.clone() else {
                return Err(self.unreachable());
            };
            rules::decide(&self.local_view(), &self.peer_view(&peer))
        };
        match decision.source() {
            Some(Side::Local) => self.start_decided(false).await,
            Some(Side::Peer) => self.ask_peer(false).await,
            None => Err(self.no_resync_refusal(&decision, rule)),
        }
    }

    fn no_resync_refusal(&self, decision: &Decision, rule: Rule) -> AdminError {
        let r = &self.resource;
        let hint = match decision {
            Decision::InSync => format!("nothing to do; `mdctrl status {r}`"),
            Decision::SplitBrain | Decision::Unrelated => format!("name the winner: `mdctrl force <server> {r}` (the loser's regions are saved first)"),
            _ => format!("`mdctrl status {r}` on both nodes; `mdctrl force <server> {r}` overrides"),
        };
        AdminError::refused(
            format!(
                "no resync to start for {r}: {}",
                describe_decision(decision, rule, &self.node, &self.peer_name)
            ),
            hint,
        )
    }

    fn unreachable(&self) -> AdminError {
        AdminError {
            kind: ErrorKind::PeerUnreachable,
            message: format!(
                "peer {} is unreachable ({})",
                self.peer_name,
                describe_link(&self.link_state.borrow())
            ),
            hint: Some(format!(
                "start the agent on {}, or check the network; if {} is gone, `mdctrl force {} {}`",
                self.peer_name, self.peer_name, self.node, self.resource
            )),
        }
    }

    async fn require_connected(&self) -> Result<(), AdminError> {
        if self.wait_peer_state(self.timeouts.connect).await {
            Ok(())
        } else {
            Err(self.unreachable())
        }
    }

    /// `mdctrl force WINNER`: connected → forced resync winner → loser;
    /// peer unreachable and WINNER is this node → `gens::force_alone`.
    pub async fn force(self: &Arc<Self>, winner: &str) -> Result<String, AdminError> {
        if winner != self.node && winner != self.peer_name {
            return Err(AdminError {
                kind: ErrorKind::BadRequest,
                message: format!(
                    "{winner:?} is not a server of {} (servers: {}, {})",
                    self.resource, self.node, self.peer_name
                ),
                hint: Some(format!(
                    "`mdctrl force {} {}` or `mdctrl force {} {}`",
                    self.node, self.resource, self.peer_name, self.resource
                )),
            });
        }
        if let Some(r) = self.running() {
            return Err(AdminError::refused(
                r,
                format!(
                    "wait for it, or stop the peer link; `mdctrl status {}`",
                    self.resource
                ),
            ));
        }
        let connected = self.wait_peer_state(self.timeouts.connect).await;
        self.set_operator_break(None).await?;
        if !connected {
            if winner != self.node {
                return Err(AdminError {
                    kind: ErrorKind::PeerUnreachable,
                    message: format!(
                        "peer {winner} is unreachable: its data cannot be made the latest from {}",
                        self.node
                    ),
                    hint: Some(format!(
                        "run `mdctrl force {winner} {}` on {winner}",
                        self.resource
                    )),
                });
            }
            let cp = self.meta.partition().clone();
            let sb = tokio::task::spawn_blocking(move || cp.update_superblock(gens::force_alone))
                .await
                .map_err(|e| AdminError::internal(format!("force: {e}")))?
                .map_err(|e| AdminError {
                    kind: ErrorKind::Internal,
                    message: format!("force: cannot update the cluster partition: {e}"),
                    hint: None,
                })?;
            tracing::warn!(resource = %self.resource, generation = format_args!("{:016x}", sb.state.gens.current), "forced alone: the data of {} is declared the latest ({} unreachable)", self.node, self.peer_name);
            self.send_state().await;
            return Ok(format!(
                "{} forced on {} with {} unreachable: this node's data is the latest (generation {:016x}); `mdctrl activate {}` may now serve it, and {} will be resynced from {} when it returns (its divergent regions saved first)",
                self.resource, self.node, self.peer_name, sb.state.gens.current, self.resource, self.peer_name, self.node
            ));
        }
        if winner == self.node {
            self.start_forced_local().await
        } else {
            self.ask_peer(true).await
        }
    }

    /// Ask the peer to start its resync (it is the source / the forced winner).
    async fn ask_peer(self: &Arc<Self>, forced: bool) -> Result<String, AdminError> {
        let (req, reply, tx) = {
            let mut st = lock(&self.st);
            let Some(tx) = st.live.as_ref().map(|l| l.tx.clone()) else {
                return Err(self.unreachable());
            };
            st.next_req += 1;
            let req = st.next_req;
            let (w, r) = oneshot::channel();
            st.pending.insert(req, w);
            (req, r, tx)
        };
        self.send_control(&tx, ControlMsg::StartResync { id: req, forced })
            .await;
        let answer =
            tokio::time::timeout(self.timeouts.ack.max(Duration::from_secs(5)), reply).await;
        lock(&self.st).pending.remove(&req);
        match answer {
            Ok(Ok((true, _))) => Ok(format!(
                "resync of {} started on {} (source) -> {}",
                self.resource, self.peer_name, self.node
            )),
            Ok(Ok((false, reason))) => Err(AdminError::refused(
                format!(
                    "{} did not start the resync: {}",
                    self.peer_name,
                    reason.unwrap_or_default()
                ),
                format!("`mdctrl status {}` on both nodes", self.resource),
            )),
            Ok(Err(_)) => Err(self.unreachable()),
            Err(_) => Err(AdminError {
                kind: ErrorKind::PeerUnreachable,
                message: format!("{} did not answer within the ack timeout", self.peer_name),
                hint: None,
            }),
        }
    }

    /// Start, as the source, the resync `decide` chose (auto: only if still allowed).
    async fn start_decided(self: &Arc<Self>, auto: bool) -> Result<String, AdminError> {
        let (decision, rule) = {
            let st = lock(&self.st);
            let Some(peer) = st.peer.clone() else {
                return Err(self.unreachable());
            };
            if auto {
                self.auto_check(&st, &peer)
                    .map_err(|w| AdminError::refused(w, "automatic recovery"))?;
            }
            rules::decide(&self.local_view(), &self.peer_view(&peer))
        };
        if decision.source() != Some(Side::Local) {
            return Err(self.no_resync_refusal(&decision, rule));
        }
        self.start_source(decision, rule, false, auto)
    }

    /// Start the forced resync with this node as the winner (`decide_forced`).
    async fn start_forced_local(self: &Arc<Self>) -> Result<String, AdminError> {
        let (decision, rule) = {
            let st = lock(&self.st);
            let Some(peer) = st.peer.clone() else {
                return Err(self.unreachable());
            };
            rules::decide_forced(Side::Local, &self.local_view(), &self.peer_view(&peer))
        };
        if decision.source() != Some(Side::Local) {
            return Err(self.no_resync_refusal(&decision, rule));
        }
        self.start_source(decision, rule, true, false)
    }

    fn start_source(
        self: &Arc<Self>,
        decision: Decision,
        rule: Rule,
        forced: bool,
        auto: bool,
    ) -> Result<String, AdminError> {
        let Decision::Resync {
            kind,
            save_loser_divergence,
            ..
        } = decision
        else {
            return Err(AdminError::internal("not a resync decision"));
        };
        let text = describe_decision(&decision, rule, &self.node, &self.peer_name);
        let (id, tx, rx, progress) = {
            let mut st = lock(&self.st);
            if st.mirror == Mirror::Resyncing {
                return Err(AdminError::refused(
                    format!("a resync of {} is already running", self.resource),
                    "wait for it",
                ));
            }
            if st
                .peer
                .as_ref()
                .map(|p| p.role == PeerRole::Active)
                .unwrap_or(false)
            {
                return Err(AdminError::refused(
                    format!(
                        "the resync target {} is active: a resync never writes into a serving node",
                        self.peer_name
                    ),
                    format!("deactivate {} on {} first", self.resource, self.peer_name),
                ));
            }
            let Some(live) = st.live.as_mut() else {
                return Err(self.unreachable());
            };
            let (ftx, frx) = mpsc::channel(FORWARD_QUEUE);
            live.to_resync = Some(ftx);
            let (id, tx) = (live.id, live.tx.clone());
            let progress = Arc::new(Mutex::new(Progress::new(
                resync::Role::Source,
                format!("{} -> {}", self.node, self.peer_name),
                kind,
                format!("{} {}", rule.id, rule.name),
            )));
            st.recovery = Some(progress.clone());
            st.mirror = Mirror::Resyncing;
            (id, tx, frx, progress)
        };
        tracing::info!(resource = %self.resource, peer = %self.peer_name, rule = rule.id, rule_name = rule.name, auto, "resync starting as source: {text}");
        self.changed.bump();
        let spec = resync::SourceSpec {
            engine: self.resync_engine("resync source"),
            part: self.meta.partition().clone(),
            // Always the pair's gate (the one the served volume writes through),
            // also when this node is inactive now: it may be activated while the
            // resync runs (an interrupted resync resumes before the cluster
            // manager reactivates the source), and its writes must then be
            // ordered with the copies and marked for recopy.
            gate: self.gate.clone(),
            kind,
            save: save_loser_divergence,
            forced,
            rule: format!("{} {}", rule.id, rule.name),
            rate: self.cfg.resync_rate,
            peer: self.peer_name.clone(),
        };
        let me = self.clone();
        tokio::spawn(async move {
            let r = resync::run_source(spec, tx.clone(), rx, progress.clone()).await;
            match r {
                Ok(done) => {
                    tracing::info!(resource = %me.resource, peer = %me.peer_name, regions = done.regions, bytes = done.bytes, "resync finished: {} holds the data of {}", me.peer_name, me.node);
                    {
                        let mut st = lock(&me.st);
                        if let Some(l) = st.live.as_mut().filter(|l| l.id == id) {
                            l.to_resync = None;
                        }
                        st.mirror = Mirror::InSync;
                    }
                    // Attach before any further application write (the gate is held).
                    me.attach_held(id, true);
                    me.send_state().await;
                    drop(done.hold);
                }
                Err(e) => {
                    tracing::error!(resource = %me.resource, peer = %me.peer_name, "resync (source) failed: {e}");
                    lock(&progress).error = Some(e.to_string());
                    let refused = matches!(e, resync::ResyncError::Refused { .. });
                    {
                        let mut st = lock(&me.st);
                        if let Some(l) = st.live.as_mut().filter(|l| l.id == id) {
                            l.to_resync = None;
                            l.auto_suppressed = true;
                        }
                        st.mirror = Mirror::Unknown;
                    }
                    if !refused {
                        tx.close(&format!("resync failed: {e}"));
                    }
                }
            }
            me.changed.bump();
        });
        Ok(format!("resync of {} started: {text}", self.resource))
    }

    /// The peer's ResyncBegin: check it against our own decision, then run as target.
    fn begin_target(
        self: &Arc<Self>,
        id: u64,
        tx: &SessionSender,
        full: bool,
        save: bool,
        forced: bool,
        rule_text: &str,
    ) -> Result<(), String> {
        let mut st = lock(&self.st);
        if let Some(why) = &st.operator_break {
            return Err(format!(
                "the mirror was broken by the operator on {} ({why}): `mdctrl recover {}` there",
                self.node, self.resource
            ));
        }
        if st.role == PeerRole::Active {
            return Err(format!(
                "{} is active: a resync never writes into a serving node",
                self.node
            ));
        }
        if st.mirror == Mirror::Resyncing {
            return Err("a resync is already running".into());
        }
        let Some(peer) = st.peer.clone() else {
            return Err("the peer's state is not known yet".into());
        };
        let (local, pv) = (self.local_view(), self.peer_view(&peer));
        let (decision, rule) = if forced {
            rules::decide_forced(Side::Peer, &local, &pv)
        } else {
            rules::decide(&local, &pv)
        };
        let Decision::Resync {
            source: Side::Peer,
            kind,
            save_loser_divergence,
        } = decision
        else {
            return Err(format!(
                "{} does not agree: {}",
                self.node,
                describe_decision(&decision, rule, &self.node, &self.peer_name)
            ));
        };
        if kind == ResyncKind::Full && !full {
            return Err(format!(
                "rule {rule} needs a full resync, a differential one was offered"
            ));
        }
        if save_loser_divergence && !save {
            return Err(format!(
                "rule {rule} saves {}'s regions first, the offer does not",
                self.node
            ));
        }
        let Some(live) = st.live.as_mut().filter(|l| l.id == id) else {
            return Err("session ended".into());
        };
        let (ftx, frx) = mpsc::channel(FORWARD_QUEUE);
        live.to_resync = Some(ftx);
        let kind = if full {
            ResyncKind::Full
        } else {
            ResyncKind::Differential
        };
        let progress = Arc::new(Mutex::new(Progress::new(
            resync::Role::Target,
            format!("{} -> {}", self.peer_name, self.node),
            kind,
            rule_text.to_string(),
        )));
        st.recovery = Some(progress.clone());
        st.mirror = Mirror::Resyncing;
        drop(st);
        self.changed.bump();
        tracing::info!(resource = %self.resource, peer = %self.peer_name, rule = rule.id, offered = rule_text, full, save, forced, "resync starting as target");
        let spec = resync::TargetSpec {
            engine: self.resync_engine("resync target"),
            part: self.meta.partition().clone(),
            save_dir: self.save_dir.clone(),
            resource: self.resource.clone(),
            node: self.node.clone(),
        };
        let me = self.clone();
        let tx = tx.clone();
        let writer = self.writers.enter();
        tokio::spawn(async move {
            let _writer = writer;
            let me2 = me.clone();
            let on_finished: Box<dyn FnOnce() + Send> = Box::new(move || {
                {
                    let mut st = lock(&me2.st);
                    st.mirror = Mirror::InSync;
                    if let Some(l) = st.live.as_mut().filter(|l| l.id == id) {
                        l.to_resync = None;
                    }
                }
                me2.evaluate(id);
            });
            match resync::run_target(
                spec,
                full,
                save,
                tx.clone(),
                frx,
                progress.clone(),
                on_finished,
            )
            .await
            {
                Ok(done) => {
                    tracing::info!(resource = %me.resource, peer = %me.peer_name, regions = done.regions, bytes = done.bytes, saved = ?done.saved, "resync finished: {} holds the data of {}", me.node, me.peer_name);
                    me.send_state().await;
                }
                Err(e) => {
                    tracing::error!(resource = %me.resource, peer = %me.peer_name, "resync (target) stopped: {e}; {} stays inconsistent and resumes on the next connection", me.node);
                    lock(&progress).error = Some(e.to_string());
                    {
                        let mut st = lock(&me.st);
                        if let Some(l) = st.live.as_mut().filter(|l| l.id == id) {
                            l.to_resync = None;
                        }
                        st.mirror = Mirror::Unknown;
                    }
                    if !matches!(
                        e,
                        resync::ResyncError::Save(_) | resync::ResyncError::Refused { .. }
                    ) {
                        tx.close(&format!("resync failed: {e}"));
                    }
                }
            }
            me.changed.bump();
        });
        Ok(())
    }

    /// Set (`mdctrl break`) or clear (`recover`, `force`) the operator break,
    /// in memory and durably (superblock flag `OPERATOR_BREAK`), so that an
    /// agent restart neither forgets a deliberate break nor keeps a cleared one.
    async fn set_operator_break(&self, why: Option<&str>) -> Result<(), AdminError> {
        lock(&self.st).operator_break = why.map(str::to_string);
        let want = why.is_some();
        let cp = self.meta.partition().clone();
        if cp.flags().contains(Flags::OPERATOR_BREAK) == want {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || {
            cp.update_superblock(|sb| sb.flags.set(Flags::OPERATOR_BREAK, want))
                .map(|_| ())
        })
        .await
        .map_err(|e| AdminError::internal(format!("recording the operator break: {e}")))?
        .map_err(|e| {
            AdminError::internal(format!(
                "recording the operator break in the cluster partition: {e}"
            ))
        })
    }

    /// `mdctrl break`: stop replicating on purpose and record it.
    pub async fn break_mirror(self: &Arc<Self>, why: &str) -> Result<String, AdminError> {
        let (vol, tx) = {
            let mut st = lock(&self.st);
            if st.mirror == Mirror::Resyncing {
                return Err(AdminError::refused(
                    format!("a resync of {} is running", self.resource),
                    "wait for it to finish, then break",
                ));
            }
            st.operator_break = Some(why.to_string());
            st.last_break = Some(format!("broken by the operator on {}: {why}", self.node));
            st.mirror = Mirror::Unknown;
            if let Some(l) = st.live.as_mut() {
                l.active = None;
            }
            (st.volume.clone(), st.live.as_ref().map(|l| l.tx.clone()))
        };
        // Durable before anything else: after an agent restart the mirror
        // stays broken (no automatic recovery) until `recover` / `force`.
        self.set_operator_break(Some(why)).await?;
        if let Some(vol) = vol {
            // Records begin_diverging (gens::on_break) before any write completes alone.
            vol.detach(&format!("broken by the operator: {why}"))
                .await
                .map_err(|e| AdminError::internal(format!("detaching replication: {e}")))?;
            tracing::warn!(resource = %self.resource, "mirror broken by the operator on {} (active): writes stay local, divergence recorded", self.node);
            return Ok(format!("mirror of {} broken on {} (active): writes are local only until `mdctrl recover {}`", self.resource, self.node, self.resource));
        }
        if let Some(tx) = tx {
            tx.close(&format!("mirror broken by the operator on {}", self.node));
        }
        tracing::warn!(resource = %self.resource, "mirror broken by the operator on {} (standby)", self.node);
        Ok(format!(
            "mirror of {} broken on {}: replication from {} stopped until `mdctrl recover {}`",
            self.resource, self.node, self.peer_name, self.resource
        ))
    }

    /// Status of the pair for `mdctrl status`.
    pub fn status(&self) -> crate::status::PairStatus {
        let st = lock(&self.st);
        let link = describe_link(&self.link_state.borrow());
        let connected = st.live.is_some();
        // While a resync runs, re-deciding would name the resume rule (the
        // target carries RESYNC_TARGET by then): show the running one's.
        let running = st
            .recovery
            .as_ref()
            .map(|p| lock(p).status())
            .filter(|r| st.mirror == Mirror::Resyncing && !r.finished && r.error.is_none());
        let decision = match running {
            Some(r) => Some(format!(
                "{}: {} resync {} (running)",
                r.rule, r.kind, r.direction
            )),
            None => st
                .peer
                .as_ref()
                .filter(|_| connected && st.mirror != Mirror::InSync)
                .map(|p| {
                    let (d, r) = rules::decide(&self.local_view(), &self.peer_view(p));
                    describe_decision(&d, r, &self.node, &self.peer_name)
                }),
        };
        let in_sync = st.mirror == Mirror::InSync;
        // Shown once it lasts (usually it takes milliseconds).
        let draining = st
            .draining_since
            .filter(|t| t.elapsed() >= DRAIN_QUIET)
            .map(|t| t.elapsed().as_secs());
        let sync = match (&st.mirror, connected) {
            (_, false) if draining.is_some() => format!(
                "waiting for the ended session's writes to complete on the local disk ({} s)",
                draining.unwrap_or(0)
            ),
            (_, false) if st.peer.is_none() => {
                "unknown (peer state not received since the agent started)".to_string()
            }
            (_, false) => "unknown (peer not connected)".to_string(),
            (Mirror::InSync, _) => "in sync".to_string(),
            (Mirror::Resyncing, _) => "resync running".to_string(),
            (Mirror::Decided { decision, rule }, _) => {
                describe_decision(decision, *rule, &self.node, &self.peer_name)
            }
            (Mirror::Unknown, _) => DECIDING.to_string(),
        };
        crate::status::PairStatus {
            peer: self.peer_name.clone(),
            connection: if connected { "connected".into() } else { link },
            peer_address: st.live.as_ref().map(|l| l.peer_addr.to_string()),
            // Only while connected: a peer that went away may have been
            // activated elsewhere since; its last known role would mislead.
            peer_role: st
                .peer
                .as_ref()
                .filter(|_| connected)
                .map(|p| match p.role {
                    PeerRole::Active => crate::status::Role::Active,
                    PeerRole::Inactive => crate::status::Role::Inactive,
                }),
            peer_disk: st.peer.as_ref().map(|p| crate::status::PeerDisk {
                consistent: !Flags(p.flags).contains(Flags::RESYNC_TARGET),
                disk_error: Flags(p.flags).contains(Flags::DISK_ERROR),
                metadata_error: p.metadata_error.clone(),
                stalled: p.stalled.clone(),
                dirty_regions: p.dirty_regions,
                difference_percent: if p.total_regions == 0 {
                    0.0
                } else {
                    p.dirty_regions as f64 * 100.0 / p.total_regions as f64
                },
                last_update: Some(p.last_update).filter(|&t| t > 0),
                break_time: Some(p.break_time).filter(|&t| t > 0),
                current_generation: format!("{:016x}", p.gens.current),
            }),
            peer_state_age_ms: st.peer_seen.map(|t| t.elapsed().as_millis() as u64),
            in_sync,
            sync,
            replicating: st.volume.as_ref().map(|v| v.is_attached()).unwrap_or(false),
            standby_applying: st
                .live
                .as_ref()
                .map(|l| l.standby.is_some())
                .unwrap_or(false),
            last_break: st.last_break.clone(),
            peer_disk_error: st.peer_disk_error,
            rpo: st.volume.as_ref().map(|v| v.rpo()),
            decision,
            auto_recovery: if in_sync {
                None
            } else if connected {
                st.auto_block.clone()
            } else {
                Some("peer-unknown: the peer is not connected".into())
            },
            recovery: st.recovery.as_ref().map(|p| lock(p).status()),
            ended_session_writes_secs: draining,
        }
    }
}

fn describe_link(s: &LinkState) -> String {
    match s {
        LinkState::Connecting => "connecting".into(),
        LinkState::Connected { peer_addr, .. } => format!("connected to {peer_addr}"),
        LinkState::Refused { reason } => format!("refused: {reason}"),
    }
}

/// The Hello state of this node for `meta` in `role`.
fn hello_state_of(meta: &Meta, role: PeerRole) -> HelloState {
    let sb = meta.partition().superblock();
    let flags = sb.state.flags;
    let disk_state = if flags.contains(Flags::DISK_ERROR) {
        DiskState::Failed
    } else if flags.contains(Flags::RESYNC_TARGET) {
        DiskState::Inconsistent
    } else {
        DiskState::Consistent
    };
    HelloState {
        role: match role {
            PeerRole::Active => Role::Active,
            PeerRole::Inactive => Role::Standby,
        },
        disk_state,
        generation: Generation {
            current: sb.state.gens.current,
            bitmap: sb.state.gens.bitmap,
            history: sb
                .state
                .gens
                .history
                .iter()
                .copied()
                .filter(|&g| g != 0)
                .collect(),
        },
        features: Features::ALL,
    }
}

#[cfg(test)]
mod tests {
    use super::control::*;

    #[test]
    fn state_json_is_stable() {
        let s = NodeState {
            role: PeerRole::Inactive,
            gens: WireGens {
                current: 1,
                bitmap: 0,
                history: [0; 4],
            },
            flags: 0,
            dirty_regions: 0,
            total_regions: 1,
            last_update: 0,
            break_time: 0,
            replicating: false,
            metadata_error: None,
            stalled: None,
        };
        let j = ControlMsg::State(s).to_json();
        assert!(j.starts_with("{\"type\":\"state\""), "{j}");
    }
}
