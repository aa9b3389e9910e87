//! Fault-injecting engine for tests.
//!
//! [`FaultyEngine`] wraps any [`BlockEngine`] and, per request, checks its
//! rules in the order they were added; the first rule that fires decides the
//! outcome. Decisions are taken when the request is *issued* (the trait method
//! is called), so "the Nth request" means the Nth call, whatever order the
//! requests complete in.
//!
//! - [`FaultAction::Fail`]: the request fails with the given errno
//!   (`raw_os_error()` set) and the inner engine never sees it.
//! - [`FaultAction::TornWrite`]: for a write, only the first `keep` bytes are
//!   written to the inner engine, then the request fails with `EIO` (a write
//!   torn by a crash or a failing disk). For other operations it acts like
//!   `Fail(EIO)`.
//!
//! Crash point ([`FaultyEngine::crash_after_writes`]): the next N modifying
//! requests (write, write-zeroes, discard) pass; from then on the engine
//! behaves like a process that died: every modifying request and every flush
//! is dropped without reaching the inner engine and fails with `EIO`, so a
//! caller that ignored errors could not mistake it for success. Reads still
//! pass through and show exactly what reached the disk before the crash.
//!
//! [`FaultyEngine::counters`] counts every request seen (including failed and
//! dropped ones), faults injected and writes dropped after the crash point.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::backing::errno;
use super::{BlockEngine, EngineFuture};

/// Operation kinds a rule can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// [`BlockEngine::read`] and [`BlockEngine::read_bytes`].
    Read,
    /// [`BlockEngine::write`].
    Write,
    /// [`BlockEngine::flush`].
    Flush,
    /// [`BlockEngine::discard`].
    Discard,
    /// [`BlockEngine::write_zeroes`].
    WriteZeroes,
}

impl FaultOp {
    fn modifies(self) -> bool {
        matches!(
            self,
            FaultOp::Write | FaultOp::Discard | FaultOp::WriteZeroes
        )
    }
}

/// When a rule fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultTrigger {
    /// Requests overlapping `[start, end)` (flush has no range: never matches).
    Range {
        /// First byte of the range.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// The `n`-th (1-based) request of the rule's operations issued after the
    /// rule was added.
    Nth(u64),
    /// Every request of the rule's operations.
    Always,
}

/// What a firing rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fail with this errno (e.g. `libc::EIO`, `libc::ENOSPC`).
    Fail(i32),
    /// Write only the first `keep` bytes, then fail with `EIO`.
    TornWrite {
        /// Bytes applied before the failure.
        keep: usize,
    },
}

/// One injection rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// Operations the rule applies to; empty means all.
    pub ops: Vec<FaultOp>,
    /// When it fires.
    pub trigger: FaultTrigger,
    /// What it does.
    pub action: FaultAction,
    /// How many times it may fire; `None` for unlimited.
    pub times: Option<u64>,
}

impl FaultRule {
    /// Fail requests of `ops` (empty: all) touching `[offset, offset + len)`
    /// with `errno`.
    pub fn fail_range(ops: &[FaultOp], offset: u64, len: u64, errno: i32) -> FaultRule {
        FaultRule {
            ops: ops.to_vec(),
            trigger: FaultTrigger::Range {
                start: offset,
                end: offset.saturating_add(len),
            },
            action: FaultAction::Fail(errno),
            times: None,
        }
    }

    /// Fail the `n`-th (1-based) request of `ops` (empty: all) with `errno`.
    pub fn fail_nth(ops: &[FaultOp], n: u64, errno: i32) -> FaultRule {
        FaultRule {
            ops: ops.to_vec(),
            trigger: FaultTrigger::Nth(n),
            action: FaultAction::Fail(errno),
            times: Some(1),
        }
    }

    /// Tear the `n`-th (1-based) write: apply its first `keep` bytes, fail EIO.
    pub fn torn_write_nth(n: u64, keep: usize) -> FaultRule {
        FaultRule {
            ops: vec![FaultOp::Write],
            trigger: FaultTrigger::Nth(n),
            action: FaultAction::TornWrite { keep },
            times: Some(1),
        }
    }

    /// Tear writes touching `[offset, offset + len)`.
    pub fn torn_write_range(offset: u64, len: u64, keep: usize) -> FaultRule {
        FaultRule {
            ops: vec![FaultOp::Write],
            trigger: FaultTrigger::Range {
                start: offset,
                end: offset.saturating_add(len),
            },
            action: FaultAction::TornWrite { keep },
            times: None,
        }
    }

    /// Limit how many times the rule fires.
    pub fn times(mut self, n: u64) -> FaultRule {
        self.times = Some(n);
        self
    }
}

/// Snapshot of what a [`FaultyEngine`] has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounters {
    /// Read requests issued.
    pub reads: u64,
    /// Write requests issued.
    pub writes: u64,
    /// Flush requests issued.
    pub flushes: u64,
    /// Discard requests issued.
    pub discards: u64,
    /// Write-zeroes requests issued.
    pub write_zeroes: u64,
    /// Requests a rule made fail (or tore).
    pub injected: u64,
    /// Modifying requests and flushes dropped after the crash point.
    pub dropped: u64,
}

#[derive(Debug)]
struct RuleState {
    id: u64,
    rule: FaultRule,
    seen: u64,
    fired: u64,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<RuleState>,
    next_id: u64,
    counters: FaultCounters,
    /// Modifying requests still allowed before the crash point.
    crash_budget: Option<u64>,
    crashed: bool,
}

enum Decision {
    Pass,
    Fail(i32),
    Torn(usize),
    Dropped,
}

/// Fault-injecting wrapper; see the module docs.
pub struct FaultyEngine {
    inner: Arc<dyn BlockEngine>,
    state: Mutex<State>,
}

impl std::fmt::Debug for FaultyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyEngine")
            .field("inner", &self.inner.describe())
            .field("state", &self.state)
            .finish()
    }
}

impl FaultyEngine {
    /// Wrap `inner` with no rules (everything passes).
    pub fn new(inner: Arc<dyn BlockEngine>) -> FaultyEngine {
        FaultyEngine {
            inner,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The wrapped engine (bypasses all rules).
    pub fn inner(&self) -> &Arc<dyn BlockEngine> {
        &self.inner
    }

    /// Add a rule; returns its id for [`FaultyEngine::remove_rule`].
    pub fn add_rule(&self, rule: FaultRule) -> u64 {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.rules.push(RuleState {
            id,
            rule,
            seen: 0,
            fired: 0,
        });
        id
    }

    /// Remove a rule; `false` if no such rule.
    pub fn remove_rule(&self, id: u64) -> bool {
        let mut st = self.lock();
        let before = st.rules.len();
        st.rules.retain(|r| r.id != id);
        st.rules.len() != before
    }

    /// Remove every rule (the crash point is kept).
    pub fn clear_rules(&self) {
        self.lock().rules.clear();
    }

    /// Let `n` more modifying requests through, then behave as crashed.
    pub fn crash_after_writes(&self, n: u64) {
        let mut st = self.lock();
        st.crash_budget = Some(n);
        st.crashed = false;
    }

    /// Whether the crash point has been reached.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Forget the crash point ("restart the process").
    pub fn reset_crash(&self) {
        let mut st = self.lock();
        st.crash_budget = None;
        st.crashed = false;
    }

    /// Counters so far.
    pub fn counters(&self) -> FaultCounters {
        self.lock().counters
    }

    /// How many times rule `id` has fired (`None` if unknown).
    pub fn fired(&self, id: u64) -> Option<u64> {
        self.lock()
            .rules
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.fired)
    }

    fn decide(&self, op: FaultOp, range: Option<(u64, u64)>) -> Decision {
        let mut st = self.lock();
        let c = &mut st.counters;
        match op {
            FaultOp::Read => c.reads += 1,
            FaultOp::Write => c.writes += 1,
            FaultOp::Flush => c.flushes += 1,
            FaultOp::Discard => c.discards += 1,
            FaultOp::WriteZeroes => c.write_zeroes += 1,
        }
        if op != FaultOp::Read {
            if st.crashed {
                st.counters.dropped += 1;
                return Decision::Dropped;
            }
            if op.modifies() {
                if let Some(b) = st.crash_budget.as_mut() {
                    if *b == 0 {
                        st.crashed = true;
                        st.counters.dropped += 1;
                        tracing::info!("fault engine: crash point reached");
                        return Decision::Dropped;
                    }
                    *b -= 1;
                }
            }
        }
        let mut decision = Decision::Pass;
        for r in st.rules.iter_mut() {
            if !r.rule.ops.is_empty() && !r.rule.ops.contains(&op) {
                continue;
            }
            r.seen += 1;
            if !matches!(decision, Decision::Pass) {
                continue; // keep counting `seen` for later Nth rules
            }
            if r.rule.times.is_some_and(|t| r.fired >= t) {
                continue;
            }
            let hit = match r.rule.trigger {
                FaultTrigger::Always => true,
                FaultTrigger::Nth(n) => r.seen == n,
                FaultTrigger::Range { start, end } => match range {
                    Some((off, len)) => off < end && start < off.saturating_add(len.max(1)),
                    None => false,
                },
            };
            if hit {
                r.fired += 1;
                decision = match r.rule.action {
                    FaultAction::Fail(e) => Decision::Fail(e),
                    FaultAction::TornWrite { keep } if op == FaultOp::Write => Decision::Torn(keep),
                    FaultAction::TornWrite { .. } => Decision::Fail(libc::EIO),
                };
            }
        }
        if !matches!(decision, Decision::Pass) {
            st.counters.injected += 1;
        }
        decision
    }
}

fn fail<T: Send + 'static>(e: i32) -> EngineFuture<T> {
    Box::pin(async move { Err(errno(e)) })
}

impl BlockEngine for FaultyEngine {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn name(&self) -> &'static str {
        "faulty"
    }

    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    fn plain_inline_writes(&self) -> bool {
        self.inner.plain_inline_writes()
    }

    fn read(&self, offset: u64, len: usize) -> EngineFuture<Vec<u8>> {
        match self.decide(FaultOp::Read, Some((offset, len as u64))) {
            Decision::Pass => self.inner.read(offset, len),
            Decision::Fail(e) => fail(e),
            Decision::Torn(_) | Decision::Dropped => fail(libc::EIO),
        }
    }

    fn read_bytes(&self, offset: u64, len: usize) -> EngineFuture<Bytes> {
        match self.decide(FaultOp::Read, Some((offset, len as u64))) {
            Decision::Pass => self.inner.read_bytes(offset, len),
            Decision::Fail(e) => fail(e),
            Decision::Torn(_) | Decision::Dropped => fail(libc::EIO),
        }
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        match self.decide(FaultOp::Write, Some((offset, data.len() as u64))) {
            Decision::Pass => self.inner.write(offset, data, fua),
            Decision::Fail(e) => fail(e),
            Decision::Dropped => fail(libc::EIO),
            Decision::Torn(keep) => {
                let keep = keep.min(data.len());
                if keep == 0 {
                    return fail(libc::EIO);
                }
                let partial = self.inner.write(offset, data.slice(..keep), fua);
                Box::pin(async move {
                    partial.await?;
                    Err(errno(libc::EIO))
                })
            }
        }
    }

    fn flush(&self) -> EngineFuture<()> {
        match self.decide(FaultOp::Flush, None) {
            Decision::Pass => self.inner.flush(),
            Decision::Fail(e) => fail(e),
            Decision::Torn(_) | Decision::Dropped => fail(libc::EIO),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> EngineFuture<()> {
        match self.decide(FaultOp::Discard, Some((offset, len))) {
            Decision::Pass => self.inner.discard(offset, len),
            Decision::Fail(e) => fail(e),
            Decision::Torn(_) | Decision::Dropped => fail(libc::EIO),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> EngineFuture<()> {
        match self.decide(FaultOp::WriteZeroes, Some((offset, len))) {
            Decision::Pass => self.inner.write_zeroes(offset, len, may_trim, fua),
            Decision::Fail(e) => fail(e),
            Decision::Torn(_) | Decision::Dropped => fail(libc::EIO),
        }
    }

    /// Passed through: a query, no fault rule applies to it.
    fn extents(&self, offset: u64, len: u64) -> EngineFuture<Vec<super::Extent>> {
        self.inner.extents(offset, len)
    }
}
