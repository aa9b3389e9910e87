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
//! ResyncData × runs (window)             →
//!                                          write each frame as it arrives; group
//!                                          commit of the completed writes: flush once
//!                                        ← Ack2{seq, status} (one per frame)
//!                                          clear their regions (one metadata write,
//!                                          beside the next writes and commit)
//! (regions the application rewrote during the copy are copied again; the
//!  last pass runs with application writes held by the write gate)
//! resync_finished_source (durable)
//! Control ResyncFinished{source_current} →
//!                                          resync_finished_target + on_replicating (durable)
//!                                        ← Control ResyncComplete
//! ```
//!
//! The source reads runs of consecutive regions (up to [`MAX_PIECE`]) as one
//! frame, several runs concurrently ([`READ_AHEAD_BYTES`]), one group of
//! reads ahead of the sending, with at most [`INFLIGHT_BYTES`] in flight.
//! The target keeps writing while it flushes (one commit at a time, covering
//! the writes completed before it), clears a region's bit only once it holds
//! the region durably, and `RESYNC_TARGET` only at the end: a dropped session
//! leaves a target that still says inconsistent and whose bitmap covers at
//! least what is left (rule R3 resumes it, never from zero).

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

/// ResyncData frames in flight (sent, no Ack2 yet), at most; also bounded by
/// [`INFLIGHT_BYTES`]. 256: a differential resync's scattered one-region
/// frames go out together and are committed in one or two target flushes
/// (64 made the 1% bench wait on four rounds of flushes).
pub const WINDOW: usize = 256;

/// Bytes of ResyncData in flight (sent, no Ack2 yet), at most. An Ack2
/// waits for the target's flush after the write landed (up to two flushes of
/// ~15-35 ms each on the bench disk), so the window must cover the copy's
/// rate times that: 128 MiB (64 MiB still stalled the source for 0.2-0.4 s
/// of a 1.3 s copy). Memory: sent frames are freed once on the socket, so
/// this bounds the bytes in transit and the target's writes not yet landed
/// (at most this much while its disk lags), not a copy held per frame.
pub const INFLIGHT_BYTES: u64 = 128 << 20;

/// The source reads up to this many bytes of runs concurrently, issued
/// under one short hold of the write gate (scattered regions of a
/// differential resync are read in parallel; a full resync overlaps four
/// large reads, and the next group's reads start while these run).
pub const READ_AHEAD_BYTES: u64 = 16 << 20;

/// Largest ResyncData payload: consecutive regions of the copy set are read
/// and sent together up to this size (one read, one frame); regions larger
/// than this are sent in pieces.
pub const MAX_PIECE: u64 = 4 << 20;

/// Rewritten regions few enough to copy in the last pass, with application
/// writes held (a short pause).
const LAST_PASS_REGIONS: usize = 8;

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
    /// A setting makes the resync impossible (named, with the allowed values).
    #[error("configuration: {0}")]
    Config(String),
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
    /// The copy set is still being built (bitmaps exchanged and merged, the
    /// loser's regions saved): `total_bytes` is not known yet.
    pub preparing: bool,
    /// Bytes to copy (grows if the application rewrites copied regions).
    pub total_bytes: u64,
    /// Bytes copied and acknowledged durable.
    pub done_bytes: u64,
    /// Start.
    pub started: Instant,
    /// When it finished successfully (the elapsed time stops there).
    pub finished_at: Option<Instant>,
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
            preparing: true,
            total_bytes: 0,
            done_bytes: 0,
            started: Instant::now(),
            finished_at: None,
            finished: false,
            error: None,
        }
    }

    /// Status snapshot.
    pub fn status(&self) -> crate::status::RecoveryStatus {
        let elapsed_d = self
            .finished_at
            .map_or_else(|| self.started.elapsed(), |t| t - self.started);
        let elapsed = elapsed_d.as_secs();
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
            preparing: self.preparing && !self.finished && self.error.is_none(),
            percent,
            done_bytes: self.done_bytes,
            total_bytes: self.total_bytes,
            elapsed_secs: elapsed,
            elapsed_ms: elapsed_d.as_millis() as u64,
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
    meta_joined(tokio::task::spawn_blocking(f).await)
}

/// The result of a metadata task (a panicked one counts as a poisoned partition).
fn meta_joined<T>(
    r: Result<Result<T, bitmap::MetaError>, tokio::task::JoinError>,
) -> Result<T, ResyncError> {
    r.map_err(|e| {
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
    // The rate is validated at configuration load; re-checked here so that a
    // resync never starts paced below one region per second (it would look hung).
    if let Some(rate) = spec.rate.filter(|&r| r > 0 && r < rs) {
        return Err(ResyncError::Config(format!(
            "resync_rate {rate} bytes/s is below one region ({rs} bytes) per second: set 0 (unlimited) or at least {rs}"
        )));
    }
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
        p.preparing = false;
    }
    match spec.rate.filter(|&r| r > 0) {
        Some(rate) => {
            let total = lock(&progress).total_bytes;
            tracing::info!(regions = todo.len(), bytes = total, rate, estimated_secs = total / rate, peer = %spec.peer, rule = %spec.rule, "resync source: copying (rate limited by resync_rate)");
        }
        None => {
            tracing::info!(regions = todo.len(), peer = %spec.peer, rule = %spec.rule, "resync source: copying (resync_rate unlimited)")
        }
    }
    let mut copier = Copier {
        spec: &spec,
        tx: &tx,
        inflight: BTreeMap::new(),
        regions: 0,
        bytes: 0,
        started: Instant::now(),
        copied: BTreeSet::new(),
        acked: Vec::new(),
        durable: Vec::new(),
        read_time: Duration::ZERO,
        wait_time: Duration::ZERO,
        clear_time: Duration::ZERO,
    };
    // Open passes: application writes continue; regions rewritten meanwhile come back.
    let copied: Result<gate::Exclusive, ResyncError> = async {
        let mut passes = 0;
        loop {
            copier.copy_pass(&todo, &mut rx, &progress, false).await?;
            passes += 1;
            todo = spec.gate.take_rewritten();
            if todo.is_empty() || passes >= MAX_OPEN_PASSES || todo.len() <= LAST_PASS_REGIONS {
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
        copier.copy_pass(&last, &mut rx, &progress, true).await?;
        Ok(hold)
    }
    .await;
    let hold = match copied {
        Ok(hold) => hold,
        Err(e) => {
            // Best effort: what the target acknowledged durable is cleared
            // here too, so that the resumed resync does not copy it again.
            let _ = copier.clear_acked(false).await;
            return Err(e);
        }
    };
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
        p.finished_at = Some(Instant::now());
        p.done_bytes = p.total_bytes;
    }
    tracing::info!(regions = copier.regions, bytes = copier.bytes, elapsed = ?copier.started.elapsed(), read = ?copier.read_time, window_wait = ?copier.wait_time, clear = ?copier.clear_time, "resync source: finished");
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

/// Groups runs into read groups of at most `limit` bytes (a larger run is a
/// group of its own) and at most `WINDOW / 2` runs.
fn read_groups(
    part: &ClusterPartition,
    runs: Vec<std::ops::RangeInclusive<u64>>,
    limit: u64,
) -> Vec<Vec<std::ops::RangeInclusive<u64>>> {
    let bytes = |r: &std::ops::RangeInclusive<u64>| {
        part.region_bytes(*r.end()).end - part.region_bytes(*r.start()).start
    };
    let mut out: Vec<Vec<std::ops::RangeInclusive<u64>>> = Vec::new();
    let mut cur: Vec<std::ops::RangeInclusive<u64>> = Vec::new();
    let mut n = 0;
    for r in runs {
        let b = bytes(&r);
        if !cur.is_empty() && (n + b > limit || cur.len() >= WINDOW / 2) {
            out.push(std::mem::take(&mut cur));
            n = 0;
        }
        n += b;
        cur.push(r);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Groups sorted regions into runs of consecutive regions of at most
/// `limit` bytes (a larger region is a run of its own): each run is read
/// once and sent as one frame (or as pieces, for a large region).
fn runs(part: &ClusterPartition, sorted: &[u64], limit: u64) -> Vec<std::ops::RangeInclusive<u64>> {
    let mut out: Vec<std::ops::RangeInclusive<u64>> = Vec::new();
    let mut cur: Option<(u64, u64, u64)> = None; // first, last, bytes
    for &r in sorted {
        let len = region_len(part, r);
        cur = match cur {
            Some((a, b, n)) if r == b + 1 && n + len <= limit => Some((a, r, n + len)),
            Some((a, b, _)) => {
                out.push(a..=b);
                Some((r, r, len))
            }
            None => Some((r, r, len)),
        };
    }
    if let Some((a, b, _)) = cur {
        out.push(a..=b);
    }
    out
}

struct Copier<'a> {
    spec: &'a SourceSpec,
    tx: &'a SessionSender,
    /// seq → (first region, last region, bytes) of a frame in flight
    inflight: BTreeMap<u64, (u64, u64, u64)>,
    regions: u64,
    bytes: u64,
    started: Instant,
    copied: BTreeSet<u64>,
    /// Regions whose last piece the target acknowledged durable, not yet cleared here.
    acked: Vec<u64>,
    /// Metadata commits of clears made in memory by the read tasks, not yet seen done.
    durable: Vec<Durable>,
    /// Time spent reading (gate wait + reads), waiting for the window, clearing (logged at the end).
    read_time: Duration,
    wait_time: Duration,
    clear_time: Duration,
}

/// Acknowledged regions cleared on the source per batch (one metadata
/// write, beside the next group's reads). Clearing these in 64 MiB batches
/// instead (and the target's per 64 MiB) was tried: slower full resyncs on
/// the bench disk (median 1.79 s vs 1.39 s), so both sides clear as they go.
/// A lost link recopies nothing: both sides clear what is durable before
/// they report it.
const CLEAR_BATCH: usize = 16;

/// One read group in progress: its reads (and a clear of acknowledged
/// regions), issued under one hold of the gate, run in a task of their own
/// while the copier sends the previous group and waits for window space.
struct ReadAhead {
    group: Vec<std::ops::RangeInclusive<u64>>,
    frames: usize,
    bytes: u64,
    task: tokio::task::JoinHandle<Result<GroupRead, ResyncError>>,
}

/// A deferred clear's metadata commit (see `start_read`).
type Durable = tokio::task::JoinHandle<Result<(), bitmap::MetaError>>;

/// A read group's pieces (offset, CRC-32, data) and its clear's commit, if any.
type GroupRead = (Vec<(u64, u32, Bytes)>, Option<Durable>);

impl Copier<'_> {
    /// One pass over `regions` (sorted): copy them in groups of runs
    /// (consecutive regions each), one group's reads ahead — group k+1 is
    /// read while group k is sent and waits for window space, so the disk
    /// reads back to back — then wait for every Ack2 of the pass.
    async fn copy_pass(
        &mut self,
        regions: &[u64],
        rx: &mut Inbox,
        progress: &ProgressHandle,
        held: bool,
    ) -> Result<(), ResyncError> {
        let part = self.spec.part.clone();
        let mut ahead: Option<ReadAhead> = None;
        // Paced copies go in small groups (a tenth of a second at the
        // rate): a group is sent at once, so a 16 MiB group would be a burst
        // of the link and the disk followed by a long pause, and the
        // progress would jump.
        let limit = match self.spec.rate.filter(|&r| r > 0) {
            Some(rate) => (rate / 10).clamp(1, READ_AHEAD_BYTES),
            None => READ_AHEAD_BYTES,
        };
        let pieces = runs(&part, regions, limit.min(MAX_PIECE));
        for group in read_groups(&part, pieces, limit) {
            let next = self.start_read(group, held);
            if let Some(prev) = ahead.replace(next) {
                self.send_read(prev, rx, progress, held).await?;
            }
        }
        if let Some(prev) = ahead {
            self.send_read(prev, rx, progress, held).await?;
        }
        self.drain_all(rx, progress, held).await
    }

    /// Start reading a group of runs: the reads are issued together under
    /// one hold of the gate (unless the caller holds it; the hold ends once
    /// they are issued, see the comment inside), each run as one
    /// piece (or pieces of at most [`MAX_PIECE`] for a large region).
    fn start_read(&mut self, group: Vec<std::ops::RangeInclusive<u64>>, held: bool) -> ReadAhead {
        let spec: &SourceSpec = self.spec;
        let part = spec.part.clone();
        let mut reads: Vec<(u64, u64)> = Vec::new();
        for run in &group {
            let range = part.region_bytes(*run.start()).start..part.region_bytes(*run.end()).end;
            let mut off = range.start;
            while off < range.end {
                let len = (range.end - off).min(MAX_PIECE);
                reads.push((off, len));
                off += len;
            }
        }
        let bytes: u64 = reads.iter().map(|r| r.1).sum();
        let frames = reads.len();
        let regions: Vec<u64> = group.iter().flat_map(|r| r.clone()).collect();
        // Acknowledged regions are cleared under the same hold of the gate
        // (see clear_acked), their metadata write beside the reads.
        let acked = if self.acked.len() >= CLEAR_BATCH {
            std::mem::take(&mut self.acked)
        } else {
            Vec::new()
        };
        let (engine, gate) = (spec.engine.clone(), spec.gate.clone());
        let task = tokio::spawn(async move {
            // The rewrite marks are forgotten with the gate held: no
            // application write is in flight at that instant, so every write
            // that can reach these regions' bytes after it (also one that
            // lands while the reads below run) starts later and marks its
            // regions again (`GatedVolume` marks before it writes). A read
            // that sees part of such a write is therefore copied again and
            // its bit kept, so the reads need not finish (or start) under the
            // gate: it is released once they are spawned, and the next
            // group's reads start at once (the disk's read queue does not
            // drain between groups; application writes wait less).
            let guard = if held {
                None
            } else {
                Some(gate.exclusive().await)
            };
            for &r in &regions {
                gate.forget(r);
            }
            // All reads in flight at once: spawned, since an engine future
            // may only start its I/O when polled.
            let pending: Vec<_> = reads
                .iter()
                .map(|&(off, len)| (off, len, tokio::spawn(engine.read_bytes(off, len as usize))))
                .collect();
            // Cleared in memory now, under the gate (no write is between the
            // rewrite check and the clear; a later write sets the bit again);
            // made durable below, after the gate is released, so the next
            // group's reads do not wait for this metadata write's sync.
            let clear = if acked.is_empty() {
                None
            } else {
                let regions: Vec<u64> = acked
                    .into_iter()
                    .filter(|&r| !gate.is_rewritten(r))
                    .collect();
                part.clear_regions_deferred(regions)
                    .map_err(ResyncError::Meta)?
                    .1
            };
            drop(guard);
            let mut pieces = Vec::with_capacity(pending.len());
            for (off, len, task) in pending {
                let data = join_io(task).await.map_err(|source| ResyncError::Io {
                    op: "read",
                    offset: off,
                    len,
                    source,
                })?;
                // Hashed here, in the read task, beside the next reads and
                // the copier's sends: the one pass over the data on this side
                // (the encoder combines it into the payload CRC).
                let checksum = crc32fast::hash(&data);
                pieces.push((off, checksum, data));
            }
            let durable = clear.map(|epoch| {
                let p = part.clone();
                tokio::task::spawn_blocking(move || p.wait_durable(epoch))
            });
            Ok((pieces, durable))
        });
        ReadAhead {
            group,
            frames,
            bytes,
            task,
        }
    }

    /// Send a group read by [`Copier::start_read`] once the window has room.
    async fn send_read(
        &mut self,
        ra: ReadAhead,
        rx: &mut Inbox,
        progress: &ProgressHandle,
        held: bool,
    ) -> Result<(), ResyncError> {
        let t = Instant::now();
        let (pieces, durable) = ra.task.await.unwrap_or_else(|e| {
            Err(ResyncError::Io {
                op: "read",
                offset: 0,
                len: ra.bytes,
                source: std::io::Error::other(format!("read task: {e}")),
            })
        })?;
        self.durable.extend(durable);
        self.reap_durable(false).await?;
        self.read_time += t.elapsed();
        self.drain_for(rx, progress, ra.frames, ra.bytes).await?;
        let part = &self.spec.part;
        for (off, checksum, data) in pieces {
            let len = data.len() as u64;
            let (first, last) = (part.region_of(off), part.region_of(off + len - 1));
            let seq = send(
                self.tx,
                Message::ResyncData {
                    offset: off,
                    checksum,
                    data,
                },
            )
            .await?;
            self.inflight.insert(seq, (first, last, len));
        }
        for run in ra.group {
            for r in run {
                self.copied.insert(r);
                self.regions += 1;
            }
        }
        if let Some(rate) = self.spec.rate.filter(|&r| r > 0) {
            self.bytes_paced(rx, progress, rate, held).await?;
        }
        Ok(())
    }

    /// Wait for Ack2s until `frames` more frames of `bytes` fit the window
    /// ([`WINDOW`] frames, [`INFLIGHT_BYTES`] bytes; a group larger than the
    /// byte bound waits for an empty window).
    /// Acknowledged regions are cleared by the next [`Copier::start_read`]
    /// (in batches of at least [`CLEAR_BATCH`], beside its reads), so that an
    /// interruption loses little progress.
    async fn drain_for(
        &mut self,
        rx: &mut Inbox,
        progress: &ProgressHandle,
        frames: usize,
        bytes: u64,
    ) -> Result<(), ResyncError> {
        loop {
            self.poll_acks(rx, progress)?;
            let n = self.inflight.len();
            let b: u64 = self.inflight.values().map(|v| v.2).sum();
            if n == 0 || (n + frames <= WINDOW && b + bytes <= INFLIGHT_BYTES) {
                return Ok(());
            }
            let t = Instant::now();
            self.drain(rx, progress, n - 1).await?;
            self.wait_time += t.elapsed();
        }
    }

    /// Collect the deferred clears' commits: those finished (an error ends
    /// the resync), or with `all` every one.
    async fn reap_durable(&mut self, all: bool) -> Result<(), ResyncError> {
        for d in std::mem::take(&mut self.durable) {
            if all || d.is_finished() {
                meta_joined(d.await)?;
            } else {
                self.durable.push(d);
            }
        }
        Ok(())
    }

    /// Wait for every Ack2 (clearing in batches meanwhile), then clear the rest.
    async fn drain_all(
        &mut self,
        rx: &mut Inbox,
        progress: &ProgressHandle,
        held: bool,
    ) -> Result<(), ResyncError> {
        // frames = WINDOW + 1 never fits: waits until nothing is in flight.
        self.drain_for(rx, progress, WINDOW + 1, 0).await?;
        self.reap_durable(true).await?;
        self.clear_acked(held).await
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
        let t = Instant::now();
        let r = blocking(move || part.clear_regions(regions).map(|_| ())).await;
        self.clear_time += t.elapsed();
        drop(guard);
        r
    }

    /// Pace to `rate`: the bytes sent so far should take at least
    /// bytes/rate. Ack2s arriving meanwhile are handled (progress, clears).
    /// There is time while paced: acknowledged regions are cleared at once,
    /// so an interruption recopies nothing the target acknowledged.
    async fn bytes_paced(
        &mut self,
        rx: &mut Inbox,
        progress: &ProgressHandle,
        rate: u64,
        held: bool,
    ) -> Result<(), ResyncError> {
        let sent: u64 = self.bytes + self.inflight.values().map(|v| v.2).sum::<u64>();
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        let deadline = tokio::time::Instant::from_std(self.started + due);
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, recv(rx)).await {
                Ok(f) => {
                    self.on_frame(f?, progress)?;
                    self.clear_acked(held).await?;
                }
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Handle the Ack2s that already arrived, without waiting.
    fn poll_acks(&mut self, rx: &mut Inbox, progress: &ProgressHandle) -> Result<(), ResyncError> {
        while let Ok(f) = rx.try_recv() {
            self.on_frame(f, progress)?;
        }
        Ok(())
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
            self.on_frame(f, progress)?;
        }
        Ok(())
    }

    /// One frame from the target during the copy: an Ack2 (progress; its
    /// regions become clearable once no piece of them is in flight).
    fn on_frame(&mut self, f: Frame, progress: &ProgressHandle) -> Result<(), ResyncError> {
        match f.msg {
            Message::Ack2 { seq, status } => {
                let Some((first, last, len)) = self.inflight.remove(&seq) else {
                    return Err(ResyncError::Protocol(format!(
                        "Ack2 for unknown resync seq {seq}"
                    )));
                };
                if status != 0 {
                    return Err(ResyncError::Protocol(format!(
                        "{} could not write regions {first}..={last}: errno {}",
                        self.spec.peer, -status
                    )));
                }
                self.bytes += len;
                lock(progress).done_bytes += len;
                // send_read queues every piece of a region before returning:
                // none left in flight = the whole region is durable there.
                for r in first..=last {
                    if !self.inflight.values().any(|&(a, b, _)| a <= r && r <= b) {
                        self.acked.push(r);
                    }
                }
                Ok(())
            }
            Message::Ack1 { .. } => Ok(()),
            other => Err(ResyncError::Protocol(format!(
                "unexpected {:?} during the resync",
                other.kind()
            ))),
        }
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

/// The result of a spawned engine operation (a panicked task is an I/O error).
async fn join_io<T>(
    t: impl std::future::Future<Output = Result<std::io::Result<T>, tokio::task::JoinError>>,
) -> std::io::Result<T> {
    t.await
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("engine task: {e}"))))
}

/// A ResyncData write issued on the target, not yet completed.
struct Issued {
    seq: u64,
    off: u64,
    len: u64,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// A completed write waiting for the next commit: `status` 0, or the
/// negative errno its Ack2 carries.
#[derive(Debug, Clone, Copy)]
struct Landed {
    seq: u64,
    off: u64,
    len: u64,
    status: i32,
}

impl Landed {
    fn of(w: &Issued, r: std::io::Result<()>) -> Landed {
        let status = match r {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(
                    offset = w.off,
                    len = w.len,
                    "resync target write failed: {e}"
                );
                -e.raw_os_error().unwrap_or(libc::EIO)
            }
        };
        Landed {
            seq: w.seq,
            off: w.off,
            len: w.len,
            status,
        }
    }
}

/// What one commit made durable.
#[derive(Debug, Default)]
struct CommitOut {
    /// Regions whose last byte is now durable (their bits may be cleared).
    done: Vec<u64>,
    /// Bytes made durable.
    bytes: u64,
    /// The Ack2s to send: (seq, status).
    acks: Vec<(u64, i32)>,
    flush: Duration,
}

/// A ResyncData frame's payload, checked against the volume and its checksum.
fn checked_data(f: &Frame, size: u64) -> Result<(u64, Bytes), ResyncError> {
    // The data checksum was verified against the data by the frame decoder
    // (mirror_proto::check: one pass over the data for both CRCs).
    let Message::ResyncData { offset, data, .. } = &f.msg else {
        return Err(ResyncError::Protocol(format!(
            "expected ResyncData, got {:?}",
            f.msg.kind()
        )));
    };
    let (off, len) = (*offset, data.len() as u64);
    if len == 0 || off.checked_add(len).is_none_or(|e| e > size) {
        return Err(ResyncError::Protocol(format!(
            "ResyncData at {off} (+{len}) outside the volume ({size} bytes) or empty"
        )));
    }
    Ok((off, data.clone()))
}

/// Commit writes that completed: make them durable with one flush. Every
/// write in `landed` completed before the flush was issued, so the flush
/// covers it; writes issued meanwhile belong to a later commit. The caller
/// then sends the Ack2s (only after the flush: an Ack2 means durable here,
/// and the source clears its bits on it) and clears the completed regions'
/// bits here (clearing late is safe: a bit still set is only recopied).
async fn commit_landed(
    engine: Arc<dyn BlockEngine>,
    mut landed: Vec<Landed>,
    part: Arc<ClusterPartition>,
) -> CommitOut {
    let t = Instant::now();
    if landed.iter().any(|l| l.status == 0) {
        if let Err(e) = engine.flush().await {
            tracing::error!("resync target flush failed: {e}");
            let errno = -e.raw_os_error().unwrap_or(libc::EIO);
            for l in landed.iter_mut().filter(|l| l.status == 0) {
                l.status = errno;
            }
        }
    }
    let flush = t.elapsed();
    // The regions whose last byte is now durable. Pieces of a large region
    // arrive in order and complete in that order (writes land first in,
    // first out, and commits run one at a time): the piece ending at the
    // region's end completes it.
    let mut done = Vec::new();
    let mut bytes = 0u64;
    for l in landed.iter().filter(|l| l.status == 0) {
        bytes += l.len;
        let end = l.off + l.len;
        for r in part.region_of(l.off)..=part.region_of(end - 1) {
            if part.region_bytes(r).end <= end {
                done.push(r);
            }
        }
    }
    CommitOut {
        done,
        bytes,
        acks: landed.iter().map(|l| (l.seq, l.status)).collect(),
        flush,
    }
}

/// Bytes of ResyncData the target holds (issued, landed or committing) before
/// it stops reading frames: twice the source's window, so that a correct
/// source never meets it; it bounds the target's memory against one that
/// ignores its window.
const TARGET_HOLD_BYTES: u64 = 2 * INFLIGHT_BYTES;

type CommitFuture = std::pin::Pin<Box<dyn std::future::Future<Output = CommitOut> + Send>>;
type ClearFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Duration, ResyncError>> + Send>>;

/// Clear durable regions' bits (one metadata write); returns its duration.
fn clear_later(part: &Arc<ClusterPartition>, regions: Vec<u64>) -> ClearFuture {
    let p = part.clone();
    Box::pin(async move {
        let t = Instant::now();
        blocking(move || p.clear_regions(regions).map(|_| ())).await?;
        Ok(t.elapsed())
    })
}

/// The target's copy: writes every ResyncData frame as it arrives (many in
/// flight) and commits completed writes in groups, one commit at a time,
/// while the next writes proceed (a commit = one flush, then the Ack2s; see
/// [`commit_landed`]); the committed regions' bits are cleared by one
/// metadata write at a time, beside the next commit. Returns at the
/// source's ResyncFinished, once every write was committed, with the
/// source's current generation. When the copy fails (the link is lost),
/// what was received is still written, flushed and cleared before the error
/// is returned, so that the resumed resync recopies as little as possible.
async fn target_copy(
    spec: &TargetSpec,
    copy_set: &DirtyBits,
    tx: &SessionSender,
    rx: &mut Inbox,
    progress: &ProgressHandle,
) -> Result<(u64, u64, u64), ResyncError> {
    let part = &spec.part;
    let size = part.volume_size();
    let mut issued: std::collections::VecDeque<Issued> = std::collections::VecDeque::new();
    let mut landed: Vec<Landed> = Vec::new();
    // Bytes received and not yet acknowledged (issued, landed, committing).
    let mut held = 0u64;
    let mut committing_bytes = 0u64;
    let mut commit: Option<CommitFuture> = None;
    let mut clearing: Option<ClearFuture> = None;
    let mut to_clear: Vec<u64> = Vec::new();
    // Regions committed in this resync. One completed again, or one outside
    // the copy set, was rewritten on the source and copied in a later pass:
    // it counts into the total as the source counts it, so done never runs
    // past total.
    let mut committed = DirtyBits::new(part.region_count());
    let (mut regions, mut bytes) = (0u64, 0u64);
    // The copy is bound by the target's commits when their time is close to
    // the copy's: logged at the end.
    let mut commits = 0u64;
    let (mut flush_time, mut clear_time) = (Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    let copied: Result<u64, ResyncError> = async {
        let mut finished: Option<u64> = None;
        loop {
            if commit.is_none() && !landed.is_empty() {
                let batch = std::mem::take(&mut landed);
                committing_bytes = batch.iter().map(|l| l.len).sum();
                commits += 1;
                commit = Some(Box::pin(commit_landed(
                    spec.engine.clone(),
                    batch,
                    part.clone(),
                )));
            }
            if clearing.is_none() && !to_clear.is_empty() {
                clearing = Some(clear_later(part, std::mem::take(&mut to_clear)));
            }
            if commit.is_none() && clearing.is_none() && issued.is_empty() {
                if let Some(source_current) = finished {
                    return Ok(source_current);
                }
            }
            tokio::select! {
                // Commits and completions first: they free the window.
                biased;
                out = async { commit.as_mut().expect("guarded").await }, if commit.is_some() => {
                    commit = None;
                    held -= committing_bytes;
                    regions += out.done.len() as u64;
                    bytes += out.bytes;
                    flush_time += out.flush;
                    let recopied: u64 = out
                        .done
                        .iter()
                        .filter(|&&r| committed.get(r) || !copy_set.get(r))
                        .map(|&r| region_len(part, r))
                        .sum();
                    for &r in &out.done {
                        committed.set(r, true);
                    }
                    {
                        let mut p = lock(progress);
                        p.done_bytes += out.bytes;
                        p.total_bytes += recopied;
                    }
                    to_clear.extend(out.done);
                    for (seq, status) in out.acks {
                        send(tx, Message::Ack2 { seq, status }).await?;
                    }
                }
                r = async { clearing.as_mut().expect("guarded").await }, if clearing.is_some() => {
                    clearing = None;
                    clear_time += r?;
                }
                r = async { join_io(&mut issued.front_mut().expect("guarded").task).await }, if !issued.is_empty() => {
                    let w = issued.pop_front().expect("guarded");
                    landed.push(Landed::of(&w, r));
                }
                f = recv(rx), if finished.is_none() && held < TARGET_HOLD_BYTES => {
                    let f = f?;
                    match &f.msg {
                        Message::ResyncData { .. } => {
                            let (off, data) = checked_data(&f, size)?;
                            let len = data.len() as u64;
                            // Overlapping writes in flight together have no
                            // order: let the earlier ones complete first (the
                            // protocol never sends a region again before its
                            // Ack2, but correctness must not depend on that).
                            if issued.iter().any(|w| w.off < off + len && off < w.off + w.len) {
                                while let Some(mut w) = issued.pop_front() {
                                    let r = join_io(&mut w.task).await;
                                    landed.push(Landed::of(&w, r));
                                }
                            }
                            // Spawned: an engine future may only start its I/O when polled.
                            let task = tokio::spawn(spec.engine.write(off, data, false));
                            held += len;
                            issued.push_back(Issued { seq: f.seq, off, len, task });
                        }
                        Message::Control { .. } => match control_of(&f) {
                            Some(ControlMsg::ResyncFinished { source_current }) => {
                                finished = Some(source_current);
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
        }
    }
    .await;
    match copied {
        Ok(source_current) => {
            tracing::info!(commits, bytes, ?flush_time, ?clear_time, copy = ?started.elapsed(), "resync target: copy done");
            Ok((regions, bytes, source_current))
        }
        Err(e) => {
            // Best effort: what was received and written is durable after a
            // flush, and its bits can go (no Ack2 can be sent any more; the
            // source keeps its bits and R3 reads the union).
            while let Some(mut w) = issued.pop_front() {
                let r = join_io(&mut w.task).await;
                landed.push(Landed::of(&w, r));
            }
            if let Some(c) = commit.take() {
                to_clear.extend(c.await.done);
            }
            if !landed.is_empty() {
                let out = commit_landed(spec.engine.clone(), landed, part.clone()).await;
                to_clear.extend(out.done);
            }
            if let Some(c) = clearing.take() {
                let _ = c.await;
            }
            if !to_clear.is_empty() {
                let _ = clear_later(part, to_clear).await;
            }
            Err(e)
        }
    }
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
    {
        let mut p = lock(&progress);
        p.total_bytes = copy.iter_ones().map(|r| region_len(&part, r)).sum();
        p.preparing = false;
    }
    send_bitmap(&tx, &copy, rs).await?;
    send_control(
        &tx,
        ControlMsg::ResyncReady {
            ok: true,
            reason: None,
        },
    )
    .await?;
    let (regions, bytes, source_current) =
        target_copy(&spec, &copy, &tx, &mut rx, &progress).await?;
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
        p.finished_at = Some(Instant::now());
        p.done_bytes = p.total_bytes;
    }
    Ok(TargetDone {
        regions,
        bytes,
        saved,
    })
}
