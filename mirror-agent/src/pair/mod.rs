//! A mirrored resource's side of the pair: the data link to the peer, the
//! coordination of roles over it, and the wiring of the replication data path
//! (`replica`) to each live session.
//!
//! Module map:
//! - this file: [`Pair`] — link sessions, dispatch of received frames
//!   (control messages here, acks to the active volume, data to the standby
//!   applier), activation requests, the decision whether the two sides are in
//!   sync, status.
//! - [`control`]: the JSON control messages (state, activation request/reply).
//! - `adapt` (private): `peer::Session` pieces as the `replica` link traits.
//!
//! # Roles over one session
//!
//! Both agents send a `State` control message when a session starts, on
//! every change, and every few seconds. A node becomes active only after the
//! peer granted an `ActivateRequest` over the live session (the peer must not
//! be active itself; two simultaneous requests are settled in favour of the
//! node whose name sorts lower). The standby applies data frames only while it
//! has granted the peer's activation and the two sides are in sync; data
//! frames at any other time are a protocol violation that closes the session
//! without touching the disk.

pub mod control;

mod adapt;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bitmap::Flags;
use mirror_proto::{DiskState, Features, Frame, Generation, Message, Role};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::admin::AdminError;
use crate::config::{self, Config, Timeouts};
use crate::engine::BlockEngine;
use crate::meta::Meta;
use crate::peer::{self, HelloState, LinkSpec, LinkState, Session, SessionSender};
use crate::replica::{self, ActiveConfig, ActiveVolume, ReplicaEvent};

use control::{ControlMsg, NodeState, PeerRole};

/// How often each side re-sends its state (status freshness).
pub const STATE_INTERVAL: Duration = Duration::from_secs(2);

/// Frames queued from the session dispatcher to the active volume or the
/// standby applier; the dispatcher stops reading the socket when full.
const FORWARD_QUEUE: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the two sides hold the same data, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncState {
    /// No peer state known since the agent started.
    Unknown,
    /// Same generation, nothing recorded as differing.
    InSync,
    /// The sides differ; the text says how (and which side is newer if known).
    OutOfSync(String),
}

/// Live session handles.
struct Live {
    id: u64,
    tx: SessionSender,
    closed: peer::CloseWatch,
    peer_addr: std::net::SocketAddr,
    to_active: Option<mpsc::Sender<Frame>>,
    to_standby: Option<mpsc::Sender<Frame>>,
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
    link_state: watch::Receiver<LinkState>,
    st: Mutex<St>,
    changed: Notify,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").field("resource", &self.resource).field("peer", &self.peer_name).finish_non_exhaustive()
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
}

impl Pair {
    /// Start the data link of `rc` on `node` and the task that serves its sessions.
    pub fn start(
        config: &Config,
        rc: &config::Resource,
        node: &str,
        engine: Arc<dyn BlockEngine>,
        meta: Arc<Meta>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Pair>, PairError> {
        let peer_name = rc.peer_of(node).unwrap_or_default().to_string();
        let secret = config.read_secret()?;
        // The Hello callback needs the pair, which needs the link state: break the
        // cycle with a slot filled right after construction.
        let slot: Arc<std::sync::OnceLock<std::sync::Weak<Pair>>> = Arc::new(std::sync::OnceLock::new());
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
            .map_err(|source| PairError::Link { resource: rc.name.clone(), source })?;
        let mut handle = peer::spawn_link(spec, shutdown);
        let pair = Arc::new(Pair {
            resource: rc.name.clone(),
            node: node.to_string(),
            peer_name,
            cfg: rc.clone(),
            timeouts: config.timeouts,
            engine,
            meta,
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
            }),
            changed: Notify::new(),
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
        self.local_state_as(self.role())
    }

    /// This node's state with `role` (for callers holding the state lock).
    fn local_state_as(&self, role: PeerRole) -> NodeState {
        let sb = self.meta.partition().superblock();
        NodeState {
            role,
            gens: sb.state.gens.into(),
            flags: sb.state.flags.0,
            dirty_regions: self.meta.partition().dirty_count(),
            total_regions: self.meta.partition().region_count(),
            last_update: sb.last_update_time,
            break_time: sb.state.break_time,
        }
    }

    /// Compare the two sides. Conservative: anything recorded as possibly
    /// differing (a bitmap generation, dirty regions, an unfinished resync)
    /// means out of sync.
    fn sync_state(&self, role: PeerRole, peer: Option<&NodeState>) -> SyncState {
        let Some(peer) = peer else { return SyncState::Unknown };
        let local = self.local_state_as(role);
        let (lf, pf) = (Flags(local.flags), Flags(peer.flags));
        if lf.contains(Flags::RESYNC_TARGET) || pf.contains(Flags::RESYNC_TARGET) {
            return SyncState::OutOfSync("a resync did not finish (one side is inconsistent)".into());
        }
        if local.gens.current != peer.gens.current {
            let why = if local.gens.bitmap != 0 && local.gens.bitmap == peer.gens.current {
                format!("{} has changes {} lacks (since its mirror break)", self.node, self.peer_name)
            } else if peer.gens.bitmap != 0 && peer.gens.bitmap == local.gens.current {
                format!("{} has changes {} lacks (since its mirror break)", self.peer_name, self.node)
            } else if local.gens.bitmap != 0 && local.gens.bitmap == peer.gens.bitmap {
                "split brain: both sides changed since their last common generation".to_string()
            } else {
                "the generations are unrelated (different data histories)".to_string()
            };
            return SyncState::OutOfSync(why);
        }
        if local.gens.bitmap != 0 || peer.gens.bitmap != 0 {
            return SyncState::OutOfSync("a mirror break is recorded and not yet resynced".into());
        }
        // Keep-dirty regions of the active side are expected while it runs.
        let active_dirty_ok = |s: &NodeState, other_active| s.role == PeerRole::Active || other_active;
        if local.dirty_regions > 0 && !active_dirty_ok(&local, false) {
            return SyncState::OutOfSync(format!("{} regions on {} may differ (write intents left by a crash)", local.dirty_regions, self.node));
        }
        if peer.dirty_regions > 0 && !active_dirty_ok(peer, false) {
            return SyncState::OutOfSync(format!("{} regions on {} may differ (write intents left by a crash)", peer.dirty_regions, self.peer_name));
        }
        SyncState::InSync
    }

    async fn send_control(&self, tx: &SessionSender, msg: ControlMsg) {
        if tx.send(Message::Control { json: msg.to_json() }).await.is_err() {
            tracing::debug!(resource = %self.resource, "control message not sent: session closed");
        }
    }

    async fn send_state(&self) {
        let tx = lock(&self.st).live.as_ref().map(|l| l.tx.clone());
        if let Some(tx) = tx {
            self.send_control(&tx, ControlMsg::State(self.local_state())).await;
        }
    }

    /// Serve one authenticated session until it ends.
    async fn run_session(self: Arc<Self>, session: Session) {
        let Session { peer_hello, tx, mut rx, closed, peer_addr } = session;
        let id = {
            let mut st = lock(&self.st);
            st.sessions += 1;
            let id = st.sessions;
            st.live = Some(Live { id, tx: tx.clone(), closed: closed.clone(), peer_addr, to_active: None, to_standby: None });
            st.peer = None;
            id
        };
        tracing::info!(resource = %self.resource, peer = %self.peer_name, %peer_addr, peer_generation = format_args!("{:016x}", peer_hello.generation.current), "peer connected");
        self.changed.notify_waiters();
        self.send_control(&tx, ControlMsg::State(self.local_state())).await;
        let mut tick = tokio::time::interval(STATE_INTERVAL);
        tick.tick().await;
        let end = loop {
            tokio::select! {
                f = rx.recv() => match f {
                    Some(frame) => {
                        if let Err(why) = self.dispatch(id, &tx, frame).await {
                            tracing::warn!(resource = %self.resource, peer = %self.peer_name, "closing peer session: {why}");
                            tx.close(&why);
                            break why;
                        }
                    }
                    None => break closed.reason().unwrap_or_else(|| "session ended".into()),
                },
                reason = closed.wait() => break reason,
                _ = tick.tick() => self.send_control(&tx, ControlMsg::State(self.local_state())).await,
            }
        };
        {
            let mut st = lock(&self.st);
            if st.live.as_ref().map(|l| l.id) == Some(id) {
                st.live = None;
            }
            for (_, w) in st.pending.drain() {
                let _ = w.send((false, Some(format!("peer link lost: {end}"))));
            }
        }
        tracing::warn!(resource = %self.resource, peer = %self.peer_name, "peer session ended: {end}");
        self.changed.notify_waiters();
    }

    /// Route one received frame. `Err` closes the session.
    async fn dispatch(self: &Arc<Self>, id: u64, tx: &SessionSender, frame: Frame) -> Result<(), String> {
        match &frame.msg {
            Message::Control { json } => {
                let msg = ControlMsg::from_json(json)?;
                self.on_control(id, tx, msg).await;
                Ok(())
            }
            Message::Ack1 { .. } | Message::Ack2 { .. } | Message::FlushAck { .. } => {
                let to = lock(&self.st).live.as_ref().and_then(|l| l.to_active.clone());
                match to {
                    Some(to) => to.send(frame).await.map_err(|_| "active volume gone".to_string()),
                    None => {
                        tracing::debug!(resource = %self.resource, seq = frame.seq, "late acknowledgement ignored (not replicating)");
                        Ok(())
                    }
                }
            }
            Message::Write { .. } | Message::Trim { .. } | Message::WriteZeroes { .. } | Message::Flush => {
                let to = lock(&self.st).live.as_ref().and_then(|l| l.to_standby.clone());
                match to {
                    Some(to) => to.send(frame).await.map_err(|_| "standby applier ended".to_string()),
                    None => Err(format!(
                        "peer {} sent {:?} data while {} is not its standby (not granted, or not in sync): nothing applied",
                        self.peer_name,
                        frame.msg.kind(),
                        self.node
                    )),
                }
            }
            other => Err(format!("unexpected {:?} frame on the data link", other.kind())),
        }
    }

    async fn on_control(self: &Arc<Self>, id: u64, tx: &SessionSender, msg: ControlMsg) {
        match msg {
            ControlMsg::State(s) => {
                {
                    let mut st = lock(&self.st);
                    st.peer = Some(s);
                    st.peer_seen = Some(Instant::now());
                }
                self.evaluate(id);
                self.changed.notify_waiters();
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
                self.send_control(tx, ControlMsg::ActivateReply { id: req, ok, reason }).await;
                self.evaluate(id);
            }
            ControlMsg::ActivateReply { id: req, ok, reason } => {
                if let Some(w) = lock(&self.st).pending.remove(&req) {
                    let _ = w.send((ok, reason));
                }
            }
        }
    }

    /// May the peer become active? On yes, mark it active (so its data frames are accepted).
    fn grant(&self, _id: u64) -> Result<(), String> {
        let mut st = lock(&self.st);
        if st.role == PeerRole::Active {
            return Err(format!("{} is active for {}", self.node, self.resource));
        }
        if st.activating && self.node.as_bytes() < self.peer_name.as_bytes() {
            return Err(format!("{} is activating {} at the same moment and takes precedence", self.node, self.resource));
        }
        match self.sync_state(st.role, st.peer.as_ref()) {
            SyncState::InSync => {}
            SyncState::Unknown => return Err("the state of the pair is not known yet".into()),
            SyncState::OutOfSync(why) => return Err(format!("the pair is not in sync: {why}")),
        }
        if let Some(p) = st.peer.as_mut() {
            p.role = PeerRole::Active;
        }
        Ok(())
    }

    /// Start what the current state calls for: replication from the active
    /// volume, or the standby applier.
    fn evaluate(self: &Arc<Self>, id: u64) {
        let mut st = lock(&self.st);
        let in_sync = self.sync_state(st.role, st.peer.as_ref()) == SyncState::InSync;
        let peer_active = st.peer.as_ref().map(|p| p.role == PeerRole::Active).unwrap_or(false);
        let role = st.role;
        let volume = st.volume.clone();
        let Some(live) = st.live.as_mut().filter(|l| l.id == id) else { return };
        if role == PeerRole::Active && in_sync && live.to_active.is_none() {
            if let Some(vol) = volume {
                if !vol.is_attached() {
                    let (ftx, frx) = mpsc::channel(FORWARD_QUEUE);
                    let link = adapt::replica_link(live.tx.clone(), live.closed.clone(), frx);
                    match vol.attach(link) {
                        Ok(()) => {
                            live.to_active = Some(ftx);
                            tracing::info!(resource = %self.resource, peer = %self.peer_name, mode = %self.cfg.mode, "mirroring: writes are replicated");
                        }
                        Err(e) => tracing::error!(resource = %self.resource, "cannot attach replication: {e}"),
                    }
                }
            }
        }
        if role == PeerRole::Inactive && peer_active && in_sync && live.to_standby.is_none() {
            let (ftx, frx) = mpsc::channel(FORWARD_QUEUE);
            let link = adapt::replica_link(live.tx.clone(), live.closed.clone(), frx);
            live.to_standby = Some(ftx);
            let me = self.clone();
            let engine = self.engine.clone();
            tracing::info!(resource = %self.resource, peer = %self.peer_name, "standby: applying the active peer's writes");
            tokio::spawn(async move {
                let end = replica::run_standby(engine, link).await;
                me.standby_ended(id, end).await;
            });
        }
    }

    async fn standby_ended(&self, id: u64, end: Result<replica::StandbyEnd, replica::ReplicaError>) {
        {
            let mut st = lock(&self.st);
            if let Some(l) = st.live.as_mut().filter(|l| l.id == id) {
                l.to_standby = None;
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

    /// Become active: the checks and the peer's grant. Returns the engine to
    /// serve (the replicated volume).
    pub async fn activate(self: &Arc<Self>) -> Result<Arc<dyn BlockEngine>, AdminError> {
        if !self.wait_peer_state(self.timeouts.connect).await {
            let link = describe_link(&self.link_state.borrow());
            return Err(AdminError {
                kind: crate::admin::ErrorKind::PeerUnreachable,
                message: format!(
                    "peer {} is unreachable ({link}): cannot prove the local data of {} is the latest",
                    self.peer_name, self.resource
                ),
                hint: Some(format!(
                    "start the agent on {}, or check the network; if {} is gone for good, a forced recovery (`mdctrl force {} {}`) makes this node's data the latest",
                    self.peer_name, self.peer_name, self.node, self.resource
                )),
            });
        }
        let (req, reply, tx) = {
            let mut st = lock(&self.st);
            if let Some(p) = &st.peer {
                if p.role == PeerRole::Active {
                    return Err(AdminError::refused(
                        format!("{} is active on {}", self.resource, self.peer_name),
                        format!("deactivate it there first (`mdctrl --node {} deactivate {}`)", self.peer_name, self.resource),
                    ));
                }
            }
            match self.sync_state(st.role, st.peer.as_ref()) {
                SyncState::InSync => {}
                SyncState::Unknown => return Err(AdminError::refused("the state of the pair is not known yet", "retry in a few seconds")),
                SyncState::OutOfSync(why) => {
                    return Err(AdminError::refused(
                        format!("{} is not in sync with {}: {why}", self.resource, self.peer_name),
                        "a resync must bring the pair together first (not available in this build); `mdctrl status` shows both sides",
                    ))
                }
            }
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
        self.send_control(&tx, ControlMsg::ActivateRequest { id: req }).await;
        let answer = tokio::time::timeout(self.timeouts.ack, reply).await;
        let done = |st: &mut St| {
            st.activating = false;
            st.pending.remove(&req);
        };
        let (ok, reason) = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => (false, Some("the request was dropped".into())),
            Err(_) => (false, Some(format!("no answer within {:?}", self.timeouts.ack))),
        };
        if !ok {
            done(&mut lock(&self.st));
            return Err(AdminError::refused(
                format!("{} refused the activation of {}: {}", self.peer_name, self.resource, reason.unwrap_or_default()),
                "`mdctrl status` shows both sides",
            ));
        }
        let (vol, events) = ActiveVolume::new(self.engine.clone(), self.meta.partition().clone(), ActiveConfig::from_config(&self.cfg, &self.timeouts));
        let id = {
            let mut st = lock(&self.st);
            done(&mut st);
            st.role = PeerRole::Active;
            st.volume = Some(vol.clone());
            st.live.as_ref().map(|l| l.id)
        };
        self.spawn_event_consumer(events);
        if let Some(id) = id {
            self.evaluate(id);
        }
        self.send_state().await;
        Ok(Arc::new(vol))
    }

    fn spawn_event_consumer(self: &Arc<Self>, mut events: mpsc::UnboundedReceiver<ReplicaEvent>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let Some(me) = me.upgrade() else { return };
                match ev {
                    ReplicaEvent::MirrorBroken { reason, peer_disk_error } => {
                        tracing::warn!(resource = %me.resource, peer = %me.peer_name, peer_disk_error, "mirror break: {reason}");
                        let mut st = lock(&me.st);
                        st.last_break = Some(reason);
                        st.peer_disk_error |= peer_disk_error;
                        if let Some(l) = st.live.as_mut() {
                            l.to_active = None;
                        }
                    }
                    ReplicaEvent::BreakRecorded => {
                        tracing::info!(resource = %me.resource, "mirror break recorded in the cluster partition (generations moved)");
                        me.send_state().await;
                    }
                    ReplicaEvent::BreakRecordFailed { error } => {
                        tracing::error!(resource = %me.resource, "recording the mirror break failed: {error}");
                    }
                }
                me.changed.notify_waiters();
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
            let clean = vol
                .release(self.timeouts.ack)
                .await
                .map_err(|e| AdminError::internal(format!("releasing the replicated volume: {e}")))?;
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
                    Ok(n) => tracing::info!(resource = %self.resource, cleared = n, "released: peer holds every write, bitmap cleared"),
                    Err(e) => tracing::error!(resource = %self.resource, "clearing the bitmap after release failed: {e}"),
                }
            } else {
                tracing::warn!(resource = %self.resource, "released with writes unacknowledged by {}: mirror break recorded", self.peer_name);
            }
        }
        {
            let mut st = lock(&self.st);
            if let Some(l) = st.live.as_mut() {
                l.to_active = None;
            }
        }
        self.send_state().await;
        Ok(())
    }

    /// Status of the pair for `mdctrl status`.
    pub fn status(&self) -> crate::status::PairStatus {
        let st = lock(&self.st);
        let link = describe_link(&self.link_state.borrow());
        let sync = self.sync_state(st.role, st.peer.as_ref());
        let connected = st.live.is_some();
        crate::status::PairStatus {
            peer: self.peer_name.clone(),
            connection: if connected { "connected".into() } else { link },
            peer_address: st.live.as_ref().map(|l| l.peer_addr.to_string()),
            peer_role: st.peer.as_ref().map(|p| match p.role {
                PeerRole::Active => crate::status::Role::Active,
                PeerRole::Inactive => crate::status::Role::Inactive,
            }),
            peer_disk: st.peer.as_ref().map(|p| crate::status::PeerDisk {
                consistent: !Flags(p.flags).contains(Flags::RESYNC_TARGET),
                disk_error: Flags(p.flags).contains(Flags::DISK_ERROR),
                dirty_regions: p.dirty_regions,
                difference_percent: if p.total_regions == 0 { 0.0 } else { p.dirty_regions as f64 * 100.0 / p.total_regions as f64 },
                last_update: Some(p.last_update).filter(|&t| t > 0),
                break_time: Some(p.break_time).filter(|&t| t > 0),
                current_generation: format!("{:016x}", p.gens.current),
            }),
            peer_state_age_ms: st.peer_seen.map(|t| t.elapsed().as_millis() as u64),
            in_sync: matches!(sync, SyncState::InSync),
            sync: match &sync {
                SyncState::Unknown => "unknown (peer state not received since the agent started)".into(),
                SyncState::InSync => "in sync".into(),
                SyncState::OutOfSync(w) => w.clone(),
            },
            replicating: st.volume.as_ref().map(|v| v.is_attached()).unwrap_or(false),
            standby_applying: st.live.as_ref().map(|l| l.to_standby.is_some()).unwrap_or(false),
            last_break: st.last_break.clone(),
            peer_disk_error: st.peer_disk_error,
            rpo: st.volume.as_ref().map(|v| v.rpo()),
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
            history: sb.state.gens.history.iter().copied().filter(|&g| g != 0).collect(),
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
            gens: WireGens { current: 1, bitmap: 0, history: [0; 4] },
            flags: 0,
            dirty_regions: 0,
            total_regions: 1,
            last_update: 0,
            break_time: 0,
        };
        let j = ControlMsg::State(s).to_json();
        assert!(j.starts_with("{\"type\":\"state\""), "{j}");
    }
}
