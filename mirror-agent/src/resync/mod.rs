//! Resync: copying regions from the source node to the target node over the
//! resource's data link while the source (if active) keeps serving
//! (`docs/resync-rules.md` §4, design notes properties 5, 6 and 8).
//!
//! Module map:
//! - this file: the protocol driven by [`run_source`] and [`run_target`],
//!   [`Progress`] (status rows), [`ResyncError`].
//! - [`gate`]: [`gate::WriteGate`] / [`gate::GatedVolume`], which order the
//!   active node's application writes with the copy of a region.
//! - [`save`]: the loser's divergent regions saved before they are
//!   overwritten (forced recovery).
//!
//! # Protocol (one resync, on one session)
//!
//! ```text
//! source                                   target
//! resync_start_source (durable)
//! Control ResyncBegin{kind,save,forced}  →
//! BitmapChunk × n (differential)         →
//!                                          bitmap := bitmap ∪ source's (or all), durable
//!                                          save divergent regions (if save)
//!                                          resync_start_target (durable: RESYNC_TARGET)
//!                                        ← BitmapChunk × n (the merged bitmap = copy set)
//!                                        ← Control ResyncReady{ok, reason}
//! ResyncData × regions (window)          →
//!                                          write (FUA), clear the region's bit durably
//!                                        ← Ack2{seq, status}
//! (regions the application rewrote during the copy are copied again; the
//!  last pass runs with application writes held by the write gate)
//! resync_finished_source (durable)
//! Control ResyncFinished{source_current} →
//!                                          resync_finished_target + on_replicating (durable)
//!                                        ← Control ResyncComplete
//! ```
//!
//! The target clears a region's bit only once it holds the region durably,
//! and `RESYNC_TARGET` only at the end: a dropped session leaves a target
//! that still says inconsistent and whose bitmap covers exactly what is left
//! (rule R3 resumes it, never from zero).

pub mod gate;
pub mod save;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitmap::{ClusterPartition, DirtyBits};
use bytes::Bytes;
use mirror_proto::{BitmapChunk, Frame, Message};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::engine::BlockEngine;
use crate::gens;
use crate::pair::control::ControlMsg;
use crate::peer::SessionSender;
use crate::rules::ResyncKind;

pub use gate::{GatedVolume, WriteGate};

/// Regions per BitmapChunk frame (8 KiB of bits).
pub const REGIONS_PER_CHUNK: u64 = 65_536;

/// ResyncData frames in flight (sent, no Ack2 yet).
pub const WINDOW: usize = 8;

/// Largest ResyncData payload: regions larger than this are sent in pieces.
pub const MAX_PIECE: u64 = 4 << 20;

/// Passes over rewritten regions before the last one is run with writes held.
const MAX_OPEN_PASSES: usize = 4;

/// Errors of one resync attempt (the session is closed with this text).
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// The session ended.
    #[error("peer link lost during the resync: {0}")]
    LinkLost(String),
    /// The peer refused or violated the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The target refused to start (reason from the target).
    #[error("{node} refused the resync: {reason}")]
    Refused {
        /// Target node.
        node: String,
        /// Its reason.
        reason: String,
    },
    /// Local data I/O failed.
    #[error("{op} at offset {offset} (+{len}) failed: {source}")]
    Io {
        /// read or write.
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// Metadata update failed.
    #[error("cluster partition: {0}")]
    Meta(#[from] bitmap::MetaError),
    /// Saving the loser's regions failed: nothing was overwritten.
    #[error("saving the divergent regions failed: {0}")]
    Save(String),
}

/// Direction of a running resync, from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// This node sends.
    Source,
    /// This node receives.
    Target,
}

/// Live progress of a resync (shared with status).
#[derive(Debug, Clone)]
pub struct Progress {
    /// This node's role.
    pub role: Role,
    /// "server1 -> server2".
    pub direction: String,
    /// Differential or full.
    pub kind: ResyncKind,
    /// Rule that chose it ("R14 ahead-differential").
    pub rule: String,
    /// Bytes to copy (grows if the application rewrites copied regions).
    pub total_bytes: u64,
    /// Bytes copied and acknowledged durable.
    pub done_bytes: u64,
    /// Start.
    pub started: Instant,
    /// Finished (successfully).
    pub finished: bool,
    /// Why it stopped, if it failed.
    pub error: Option<String>,
}

impl Progress {
    /// New progress record.
    pub fn new(role: Role, direction: String, kind: ResyncKind, rule: String) -> Progress {
        Progress {
            role,
            direction,
            kind,
            rule,
            total_bytes: 0,
            done_bytes: 0,
            started: Instant::now(),
            finished: false,
            error: None,
        }
    }

    /// Status snapshot.
    pub fn status(&self) -> crate::status::RecoveryStatus {
        let elapsed = self.started.elapsed().as_secs();
        let percent = if self.finished || self.total_bytes == 0 {
            if self.finished {
                100.0
            } else {
                0.0
            }
        } else {
            (self.done_bytes as f64 * 100.0 / self.total_bytes as f64).min(100.0)
        };
        let eta = if self.done_bytes > 0 && !self.finished {
            let rate = self.done_bytes as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            Some((self.total_bytes.saturating_sub(self.done_bytes) as f64 / rate) as u64)
        } else {
            None
        };
        crate::status::RecoveryStatus {
            role: match self.role {
                Role::Source => "source".into(),
                Role::Target => "target".into(),
            },
            direction: self.direction.clone(),
            kind: match self.kind {
                ResyncKind::Differential => "differential".into(),
                ResyncKind::Full => "full".into(),
            },
            rule: self.rule.clone(),
            percent,
            done_bytes: self.done_bytes,
            total_bytes: self.total_bytes,
            elapsed_secs: elapsed,
            remaining_secs: eta,
            finished: self.finished,
            error: self.error.clone(),
        }
    }
}

/// Shared progress handle.
pub type ProgressHandle = Arc<Mutex<Progress>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the source needs.
pub struct SourceSpec {
    /// Local data (raw, not the replicated volume).
    pub engine: Arc<dyn BlockEngine>,
    /// Local cluster partition.
    pub part: Arc<ClusterPartition>,
    /// Orders application writes with copies (the active's gate; a fresh one when inactive).
    pub gate: Arc<WriteGate>,
    /// Differential or full.
    pub kind: ResyncKind,
    /// Ask the target to save its copy of the regions first.
    pub save: bool,
    /// Chosen by an operator force (the target re-checks with `decide_forced`).
    pub forced: bool,
    /// Rule text for logs.
    pub rule: String,
    /// Bytes per second, `None` = unlimited.
    pub rate: Option<u64>,
    /// Target's name (messages).
    pub peer: String,
}

/// What the target needs.
pub struct TargetSpec {
    /// Local data.
    pub engine: Arc<dyn BlockEngine>,
    /// Local cluster partition.
    pub part: Arc<ClusterPartition>,
    /// Save the divergent regions here first (when the source asks).
    pub save_dir: PathBuf,
    /// Resource name (save file names).
    pub resource: String,
    /// This node's name.
    pub node: String,
}

/// Frames of one session routed to a running resync.
pub type Inbox = mpsc::Receiver<Frame>;

async fn send(tx: &SessionSender, msg: Message) -> Result<u64, ResyncError> {
    tx.send(msg)
        .await
        .map_err(|e| ResyncError::LinkLost(format!("{e:?}")))
}

async fn send_control(tx: &SessionSender, msg: ControlMsg) -> Result<u64, ResyncError> {
    send(
        tx,
        Message::Control {
            json: msg.to_json(),
        },
    )
    .await
}

async fn recv(rx: &mut Inbox) -> Result<Frame, ResyncError> {
    rx.recv()
        .await
        .ok_or_else(|| ResyncError::LinkLost("session ended".into()))
}

/// A control message from a frame (the dispatcher only routes resync ones here).
fn control_of(frame: &Frame) -> Option<ControlMsg> {
    match &frame.msg {
        Message::Control { json } => ControlMsg::from_json(json).ok(),
        _ => None,
    }
}

/// The bitmap as BitmapChunk messages.
pub fn bitmap_chunks(bits: &DirtyBits, region_size: u64) -> Vec<BitmapChunk> {
    let n = bits.len();
    let total = n.div_ceil(REGIONS_PER_CHUNK).max(1) as u32;
    (0..total as u64)
        .map(|i| {
            let first = i * REGIONS_PER_CHUNK;
            let count = (n - first).min(REGIONS_PER_CHUNK);
            let mut bytes = vec![0u8; count.div_ceil(8) as usize];
            for r in first..first + count {
                if bits.get(r) {
                    let k = r - first;
                    bytes[(k / 8) as usize] |= 1 << (k % 8);
                }
            }
            BitmapChunk {
                chunk_index: i as u32,
                total_chunks: total,
                region_size: region_size as u32,
                first_region: first,
                region_count: count as u32,
                bits: Bytes::from(bytes),
            }
        })
        .collect()
}

/// Receives a whole bitmap transfer (checking geometry) into `bits`.
async fn recv_bitmap(
    rx: &mut Inbox,
    bits: &mut DirtyBits,
    region_size: u64,
) -> Result<(), ResyncError> {
    let first = recv(rx).await?;
    recv_bitmap_from(first, rx, bits, region_size).await
}

/// [`recv_bitmap`] whose first frame was already received.
async fn recv_bitmap_from(
    first: Frame,
    rx: &mut Inbox,
    bits: &mut DirtyBits,
    region_size: u64,
) -> Result<(), ResyncError> {
    let mut seen = BTreeSet::new();
    let mut next = Some(first);
    loop {
        let f = match next.take() {
            Some(f) => f,
            None => recv(rx).await?,
        };
        let Message::BitmapChunk(c) = f.msg else {
            return Err(ResyncError::Protocol(format!(
                "expected a BitmapChunk, got {:?}",
                f.msg.kind()
            )));
        };
        if c.region_size as u64 != region_size {
            return Err(ResyncError::Protocol(format!(
                "bitmap region size {} (expected {region_size})",
                c.region_size
            )));
        }
        let end = c.first_region.saturating_add(c.region_count as u64);
        if end > bits.len() || c.bits.len() as u64 != (c.region_count as u64).div_ceil(8) {
            return Err(ResyncError::Protocol(format!(
                "bitmap chunk {} covers regions {}..{end} with {} bytes (volume has {} regions)",
                c.chunk_index,
                c.first_region,
                c.bits.len(),
                bits.len()
            )));
        }
        for k in 0..c.region_count as u64 {
            if c.bits[(k / 8) as usize] & (1 << (k % 8)) != 0 {
                bits.set(c.first_region + k, true);
            }
        }
        seen.insert(c.chunk_index);
        if seen.len() as u32 >= c.total_chunks {
            return Ok(());
        }
    }
}

async fn send_bitmap(
    tx: &SessionSender,
    bits: &DirtyBits,
    region_size: u64,
) -> Result<(), ResyncError> {
    for c in bitmap_chunks(bits, region_size) {
        send(tx, Message::BitmapChunk(c)).await?;
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, bitmap::MetaError> + Send + 'static,
) -> Result<T, ResyncError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ResyncError::Meta(bitmap::MetaError::Poisoned {
                cause: format!("metadata task failed: {e}"),
            })
        })?
        .map_err(ResyncError::Meta)
}

/// Outcome of a successful source run: the write gate is still held
/// exclusively so that the caller can attach replication before any further
/// application write (dropping it releases the writes).
pub struct SourceDone {
    /// Held until replication is attached.
    pub hold: gate::Exclusive,
    /// Regions copied (including recopies).
    pub regions: u64,
    /// Bytes copied.
    pub bytes: u64,
}

/// Run a resync as the source on one session. `rx` receives the frames the
/// dispatcher routes to the resync (Ack2, BitmapChunk, resync control).
pub async fn run_source(
    spec: SourceSpec,
    tx: SessionSender,
    mut rx: Inbox,
    progress: ProgressHandle,
) -> Result<SourceDone, ResyncError> {
    let part = spec.part.clone();
    let rs = part.region_size();
    let n = part.region_count();
    // resync_start_source: before the first region is sent.
    blocking({
        let p = part.clone();
        move || p.update_superblock(gens::resync_start_source).map(|_| ())
    })
    .await?;
    // Track rewrites from now on: a region written after this point is copied (again).
    spec.gate.start_tracking();
    let full = spec.kind == ResyncKind::Full;
    send_control(
        &tx,
        ControlMsg::ResyncBegin {
            full,
            save: spec.save,
            forced: spec.forced,
            rule: spec.rule.clone(),
        },
    )
    .await?;
    if !full {
        send_bitmap(&tx, &part.snapshot(), rs).await?;
    }
    // The target answers with its merged bitmap (the copy set), then Ready.
    let mut copy = DirtyBits::new(n);
    let first = recv(&mut rx).await?;
    let ready = if matches!(first.msg, Message::BitmapChunk(_)) {
        recv_bitmap_from(first, &mut rx, &mut copy, rs).await?;
        recv(&mut rx).await?
    } else {
        first
    };
    match control_of(&ready) {
        Some(ControlMsg::ResyncReady { ok: true, .. }) => {}
        Some(ControlMsg::ResyncReady { ok: false, reason }) => {
            spec.gate.stop_tracking();
            return Err(ResyncError::Refused {
                node: spec.peer.clone(),
                reason: reason.unwrap_or_default(),
            });
        }
        other => {
            return Err(ResyncError::Protocol(format!(
                "expected ResyncReady, got {other:?}"
            )))
        }
    }
    if full {
        copy.set_range(0..n);
    }
    let mut todo: Vec<u64> = copy.iter_ones().collect();
    {
        let mut p = lock(&progress);
        p.total_bytes = todo.iter().map(|&r| region_len(&part, r)).sum();
    }
    tracing::info!(regions = todo.len(), peer = %spec.peer, rule = %spec.rule, "resync source: copying");
    let mut copier = Copier {
        spec: &spec,
        tx: &tx,
        inflight: BTreeMap::new(),
        regions: 0,
        bytes: 0,
        started: Instant::now(),
        copied: BTreeSet::new(),
        acked: Vec::new(),
    };
    // Open passes: application writes continue; regions rewritten meanwhile come back.
    let mut passes = 0;
    loop {
        for &r in &todo {
            copier.copy_region(r, &mut rx, &progress, false).await?;
        }
        copier.drain(&mut rx, &progress, 0).await?;
        copier.clear_acked(false).await?;
        passes += 1;
        todo = spec.gate.take_rewritten();
        if todo.is_empty() || passes >= MAX_OPEN_PASSES || todo.len() <= WINDOW {
            break;
        }
        lock(&progress).total_bytes += todo.iter().map(|&r| region_len(&part, r)).sum::<u64>();
    }
    // Last pass with application writes held: nothing can be rewritten after it.
    let hold = spec.gate.exclusive().await;
    let mut last = todo;
    last.extend(spec.gate.take_rewritten());
    last.sort_unstable();
    last.dedup();
    lock(&progress).total_bytes += last.iter().map(|&r| region_len(&part, r)).sum::<u64>();
    for &r in &last {
        copier.copy_region(r, &mut rx, &progress, true).await?;
    }
    copier.drain(&mut rx, &progress, 0).await?;
    copier.clear_acked(true).await?;
    spec.gate.stop_tracking();
    // Source end first, then tell the target (§4 ordering).
    let source_current = blocking({
        let p = part.clone();
        move || {
            p.update_superblock(gens::resync_finished_source)
                .map(|sb| sb.state.gens.current)
        }
    })
    .await?;
    send_control(&tx, ControlMsg::ResyncFinished { source_current }).await?;
    loop {
        match control_of(&recv(&mut rx).await?) {
            Some(ControlMsg::ResyncComplete {}) => break,
            Some(other) => {
                return Err(ResyncError::Protocol(format!(
                    "expected ResyncComplete, got {other:?}"
                )))
            }
            None => continue,
        }
    }
    // The target holds every copied region: our bits for them can go (lazily
    // where a write is in flight or the region is hot).
    let copied: Vec<u64> = copier.copied.iter().copied().collect();
    blocking({
        let p = part.clone();
        move || p.clear_regions(copied).map(|_| ())
    })
    .await?;
    {
        let mut p = lock(&progress);
        p.finished = true;
        p.done_bytes = p.total_bytes;
    }
    tracing::info!(regions = copier.regions, bytes = copier.bytes, elapsed = ?copier.started.elapsed(), "resync source: finished");
    Ok(SourceDone {
        hold,
        regions: copier.regions,
        bytes: copier.bytes,
    })
}

fn region_len(part: &ClusterPartition, r: u64) -> u64 {
    let b = part.region_bytes(r);
    b.end - b.start
}

struct Copier<'a> {
    spec: &'a SourceSpec,
    tx: &'a SessionSender,
    /// seq → (region, bytes)
    inflight: BTreeMap<u64, (u64, u64)>,
    regions: u64,
    bytes: u64,
    started: Instant,
    copied: BTreeSet<u64>,
    /// Regions whose last piece the target acknowledged durable, not yet cleared here.
    acked: Vec<u64>,
}

/// Acknowledged regions cleared on the source per batch (one metadata write).
const CLEAR_BATCH: usize = 16;

impl Copier<'_> {
    async fn copy_region(
        &mut self,
        r: u64,
        rx: &mut Inbox,
        progress: &ProgressHandle,
        held: bool,
    ) -> Result<(), ResyncError> {
        self.drain(rx, progress, WINDOW - 1).await?;
        if self.acked.len() >= CLEAR_BATCH {
            self.clear_acked(held).await?;
        }
        let range = self.spec.part.region_bytes(r);
        // Read under the gate (unless the caller holds it): no application
        // write to the volume is in flight while the region is read, and the
        // rewrite mark is taken at the same instant.
        let guard = if held {
            None
        } else {
            Some(self.spec.gate.exclusive().await)
        };
        self.spec.gate.forget(r);
        let mut pieces = Vec::new();
        let mut off = range.start;
        while off < range.end {
            let len = (range.end - off).min(MAX_PIECE);
            let data = self
                .spec
                .engine
                .read(off, len as usize)
                .await
                .map_err(|source| ResyncError::Io {
                    op: "read",
                    offset: off,
                    len,
                    source,
                })?;
            pieces.push((off, Bytes::from(data)));
            off += len;
        }
        drop(guard);
        for (off, data) in pieces {
            let len = data.len() as u64;
            let seq = send(self.tx, Message::resync_data(off, data)).await?;
            self.inflight.insert(seq, (r, len));
        }
        self.copied.insert(r);
        self.regions += 1;
        if let Some(rate) = self.spec.rate.filter(|&r| r > 0) {
            // Pace: the bytes sent so far should take at least bytes/rate.
            self.bytes_paced(rate).await;
        }
        Ok(())
    }

    /// The target holds these regions durably: clear them here too, so that
    /// an interrupted resync resumes without recopying them. A region written
    /// since its copy was read keeps its bit (it is copied again); the gate
    /// is held so that no write is between its mark and its bit.
    async fn clear_acked(&mut self, held: bool) -> Result<(), ResyncError> {
        if self.acked.is_empty() {
            return Ok(());
        }
        let guard = if held {
            None
        } else {
            Some(self.spec.gate.exclusive().await)
        };
        let gate = &self.spec.gate;
        let regions: Vec<u64> = std::mem::take(&mut self.acked)
            .into_iter()
            .filter(|&r| !gate.is_rewritten(r))
            .collect();
        let part = self.spec.part.clone();
        let r = blocking(move || part.clear_regions(regions).map(|_| ())).await;
        drop(guard);
        r
    }

    async fn bytes_paced(&self, rate: u64) {
        let sent: u64 = self.bytes + self.inflight.values().map(|v| v.1).sum::<u64>();
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        let el = self.started.elapsed();
        if due > el {
            tokio::time::sleep(due - el).await;
        }
    }

    /// Wait for Ack2s until at most `keep` copies are in flight.
    async fn drain(
        &mut self,
        rx: &mut Inbox,
        progress: &ProgressHandle,
        keep: usize,
    ) -> Result<(), ResyncError> {
        while self.inflight.len() > keep {
            let f = recv(rx).await?;
            match f.msg {
                Message::Ack2 { seq, status } => {
                    let Some((r, len)) = self.inflight.remove(&seq) else {
                        return Err(ResyncError::Protocol(format!(
                            "Ack2 for unknown resync seq {seq}"
                        )));
                    };
                    if status != 0 {
                        return Err(ResyncError::Protocol(format!(
                            "{} could not write region {r}: errno {}",
                            self.spec.peer, -status
                        )));
                    }
                    self.bytes += len;
                    lock(progress).done_bytes += len;
                    // copy_region queues every piece of a region before
                    // returning: none left in flight = the whole region is durable there.
                    if !self.inflight.values().any(|&(x, _)| x == r) {
                        self.acked.push(r);
                    }
                }
                Message::Ack1 { .. } => {}
                other => {
                    return Err(ResyncError::Protocol(format!(
                        "unexpected {:?} during the resync",
                        other.kind()
                    )))
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSpec")
            .field("kind", &self.kind)
            .field("save", &self.save)
            .field("rule", &self.rule)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetSpec")
            .field("resource", &self.resource)
            .field("node", &self.node)
            .field("save_dir", &self.save_dir)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SourceDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceDone")
            .field("regions", &self.regions)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// Why this node cannot be a resync target now, if it cannot.
fn target_unfit(spec: &TargetSpec) -> Option<String> {
    let (have, need) = (spec.engine.size(), spec.part.volume_size());
    if have < need {
        return Some(format!(
            "the data partition of {} holds {have} bytes, the volume needs {need}",
            spec.node
        ));
    }
    if let Some(why) = spec.part.poisoned() {
        return Some(format!(
            "the cluster partition of {} failed earlier ({why}): it cannot record the resync",
            spec.node
        ));
    }
    None
}

/// How the target reached the end.
#[derive(Debug)]
pub struct TargetDone {
    /// Regions received.
    pub regions: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Where the divergent regions were saved (forced recovery).
    pub saved: Option<PathBuf>,
}

/// Run a resync as the target. `begin` is the source's ResyncBegin (already
/// validated by the caller against its own decision).
pub async fn run_target(
    spec: TargetSpec,
    full: bool,
    save: bool,
    tx: SessionSender,
    mut rx: Inbox,
    progress: ProgressHandle,
    on_finished: Box<dyn FnOnce() + Send>,
) -> Result<TargetDone, ResyncError> {
    let part = spec.part.clone();
    let rs = part.region_size();
    let n = part.region_count();
    // 0. Up front: the data partition must hold the whole volume and the
    // metadata must be writable, or nothing starts (exact cause to the source).
    if let Some(why) = target_unfit(&spec) {
        send_control(
            &tx,
            ControlMsg::ResyncReady {
                ok: false,
                reason: Some(why.clone()),
            },
        )
        .await?;
        return Err(ResyncError::Refused {
            node: spec.node.clone(),
            reason: why,
        });
    }
    // 1. bitmap := bitmap ∪ source's (or all), durable.
    if full {
        blocking({
            let p = part.clone();
            move || p.set_all()
        })
        .await?;
    } else {
        let mut theirs = DirtyBits::new(n);
        recv_bitmap(&mut rx, &mut theirs, rs).await?;
        blocking({
            let p = part.clone();
            move || p.merge(&theirs)
        })
        .await?;
    }
    let copy = part.snapshot();
    // 2. Save what will be overwritten (property 8), before RESYNC_TARGET and any copy.
    let mut saved = None;
    if save {
        let regions: Vec<u64> = copy.iter_ones().collect();
        match save::save_regions(
            &spec.engine,
            &part,
            &spec.save_dir,
            &spec.resource,
            &spec.node,
            &regions,
        )
        .await
        {
            Ok(path) => saved = Some(path),
            Err(why) => {
                send_bitmap(&tx, &DirtyBits::new(n), rs).await?;
                send_control(
                    &tx,
                    ControlMsg::ResyncReady {
                        ok: false,
                        reason: Some(why.clone()),
                    },
                )
                .await?;
                return Err(ResyncError::Save(why));
            }
        }
    }
    // 3. RESYNC_TARGET durable before the first copied region.
    blocking({
        let p = part.clone();
        move || p.update_superblock(gens::resync_start_target).map(|_| ())
    })
    .await?;
    lock(&progress).total_bytes = copy.iter_ones().map(|r| region_len(&part, r)).sum();
    send_bitmap(&tx, &copy, rs).await?;
    send_control(
        &tx,
        ControlMsg::ResyncReady {
            ok: true,
            reason: None,
        },
    )
    .await?;
    let (mut regions, mut bytes) = (0u64, 0u64);
    let size = part.volume_size();
    loop {
        let f = recv(&mut rx).await?;
        match &f.msg {
            Message::ResyncData {
                offset,
                checksum,
                data,
            } => {
                let (off, len) = (*offset, data.len() as u64);
                if off.checked_add(len).is_none_or(|e| e > size) {
                    return Err(ResyncError::Protocol(format!(
                        "ResyncData at {off} (+{len}) beyond the volume ({size} bytes)"
                    )));
                }
                if crc32fast::hash(data) != *checksum {
                    return Err(ResyncError::Protocol(format!(
                        "ResyncData at {off}: checksum expected {checksum:#010x}, actual {:#010x}",
                        crc32fast::hash(data)
                    )));
                }
                let status = match spec.engine.write(off, data.clone(), true).await {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::error!(offset = off, len, "resync target write failed: {e}");
                        -e.raw_os_error().unwrap_or(libc::EIO)
                    }
                };
                if status == 0 {
                    // The region is durable here: its bit may go (only when
                    // the whole region arrived: pieces end at its end).
                    let r = part.region_of(off);
                    if off + len == part.region_bytes(r).end {
                        blocking({
                            let p = part.clone();
                            move || p.clear_regions([r]).map(|_| ())
                        })
                        .await?;
                        regions += 1;
                    }
                    bytes += len;
                    lock(&progress).done_bytes += len;
                }
                send(&tx, Message::Ack2 { seq: f.seq, status }).await?;
            }
            Message::Control { .. } => match control_of(&f) {
                Some(ControlMsg::ResyncFinished { source_current }) => {
                    blocking({
                        let p = part.clone();
                        move || {
                            p.update_superblock(|sb| {
                                gens::resync_finished_target(sb, source_current);
                                gens::on_replicating(sb, false);
                            })
                            .map(|_| ())
                        }
                    })
                    .await?;
                    // Anything still set is an intent of the copy itself.
                    let left: Vec<u64> = part.iter_dirty().collect();
                    blocking({
                        let p = part.clone();
                        move || p.clear_regions(left).map(|_| ())
                    })
                    .await?;
                    // The caller becomes the in-sync standby before the source
                    // can attach and send data frames.
                    on_finished();
                    send_control(&tx, ControlMsg::ResyncComplete {}).await?;
                    {
                        let mut p = lock(&progress);
                        p.finished = true;
                        p.done_bytes = p.total_bytes;
                    }
                    return Ok(TargetDone {
                        regions,
                        bytes,
                        saved,
                    });
                }
                other => {
                    return Err(ResyncError::Protocol(format!(
                        "unexpected control message during the resync: {other:?}"
                    )))
                }
            },
            other => {
                return Err(ResyncError::Protocol(format!(
                    "unexpected {:?} during the resync",
                    other.kind()
                )))
            }
        }
    }
}
