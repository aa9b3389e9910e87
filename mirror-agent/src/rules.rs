//! Resync direction rules: what two connecting nodes do, decided from their
//! recorded history only (generation identifiers, flags, dirty-region
//! counts), never from wall clocks.
//!
//! `docs/resync-rules.md` is the normative table; every row there has the
//! stable id of one [`Rule`] constant here (R1…R18 for [`decide`], F1…F4
//! for [`decide_forced`]). The functions are pure and log nothing: the caller
//! logs the rule id and name with the decision, and shows them in status.
//!
//! - [`decide`]: the automatic decision on connect (symmetric:
//!   `decide(a, b)` is `decide(b, a)` mirrored).
//! - [`decide_forced`]: `mdctrl force X` while connected.
//! - [`may_activate`]: design-notes property 7, with a reason and a hint.
//! - [`auto_recovery_allowed`]: the ancestor's auto-mirror-recovery
//!   conditions (§11.10.1) on top of [`decide`].
//!
//! The generation transitions these rules rely on are in [`crate::gens`].

use std::fmt;

use bitmap::{Flags, Generations, SbState};

use crate::gens;

/// What one node tells the other about its copy of a resource on connect
/// (and what it knows about itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Node name (for reasons and hints).
    pub node: String,
    /// Resource name (for hints).
    pub resource: String,
    /// Generation identifiers.
    pub gens: Generations,
    /// Superblock flags.
    pub flags: Flags,
    /// Dirty regions in this node's bitmap (divergence since B, plus write
    /// intents of writes that may have been in flight).
    pub dirty_regions: u64,
    /// The persistent force marker ([`gens::FORCED`]).
    pub forced: bool,
}

impl NodeView {
    /// The view of a node from its superblock state and dirty count.
    pub fn from_state(node: &str, resource: &str, state: &SbState, dirty_regions: u64) -> NodeView {
        NodeView {
            node: node.to_string(),
            resource: resource.to_string(),
            gens: state.gens,
            flags: state.flags,
            dirty_regions,
            forced: state.flags.contains(gens::FORCED),
        }
    }
    /// A resync into this node started and has not finished: its data is a
    /// partial copy (design notes property 6).
    pub fn inconsistent(&self) -> bool {
        self.flags.contains(Flags::RESYNC_TARGET)
    }
    /// Metadata created without `--blank` and never synchronised: the data
    /// contents are unknown.
    pub fn never_synced(&self) -> bool {
        self.flags.contains(Flags::BLANK)
    }
    /// A data-disk I/O error was recorded.
    pub fn disk_error(&self) -> bool {
        self.flags.contains(Flags::DISK_ERROR)
    }
    /// The node was serving the volume when its superblock was last written
    /// (still active, or crashed while active).
    pub fn was_active(&self) -> bool {
        self.flags.contains(Flags::WAS_ACTIVE)
    }
    fn c(&self) -> u64 {
        self.gens.current
    }
    fn b(&self) -> u64 {
        self.gens.bitmap
    }
    fn in_history(&self, g: u64) -> bool {
        g != 0 && self.gens.history.contains(&g)
    }
    fn all_gens(&self) -> impl Iterator<Item = u64> + '_ {
        [self.gens.current, self.gens.bitmap]
            .into_iter()
            .chain(self.gens.history)
            .filter(|&g| g != 0)
    }
}

/// One of the two nodes, from the deciding node's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The node making the decision.
    Local,
    /// Its peer.
    Peer,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Peer,
            Side::Peer => Side::Local,
        }
    }
}

/// How much a resync copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResyncKind {
    /// The regions dirty in either bitmap (their union covers every
    /// difference).
    Differential,
    /// Every region.
    Full,
}

/// A set of regions named by how to compute it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionSet {
    /// The union of both nodes' dirty bitmaps.
    UnionOfBitmaps,
    /// Every region of the volume.
    All,
}

/// The outcome of comparing two nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Identical data: start replicating, nothing to copy (stale write
    /// intents may be cleared).
    InSync,
    /// Copy from `source` to the other side.
    Resync {
        /// The side whose data wins.
        source: Side,
        /// Differential (union of both bitmaps) or full.
        kind: ResyncKind,
        /// Before overwriting, save the target's copy of the regions to be
        /// copied ([`Decision::save_set`]): the target may hold writes the
        /// source lacks (an operator force decided against it).
        save_loser_divergence: bool,
    },
    /// Both sides changed since their last common generation: nothing is
    /// copied until an operator names the winner.
    SplitBrain,
    /// No common history: a full resync only by operator choice.
    Unrelated,
    /// Neither direction is allowed now.
    Blocked {
        /// Why (names nodes, never "local"/"peer", so it reads the same on
        /// both nodes).
        reason: String,
    },
}

impl Decision {
    /// The same decision seen from the peer (sides swapped).
    pub fn mirrored(&self) -> Decision {
        match self {
            Decision::Resync {
                source,
                kind,
                save_loser_divergence,
            } => Decision::Resync {
                source: source.other(),
                kind: *kind,
                save_loser_divergence: *save_loser_divergence,
            },
            other => other.clone(),
        }
    }
    /// Regions a resync copies, if this is a resync.
    pub fn copy_set(&self) -> Option<RegionSet> {
        match self {
            Decision::Resync {
                kind: ResyncKind::Differential,
                ..
            } => Some(RegionSet::UnionOfBitmaps),
            Decision::Resync {
                kind: ResyncKind::Full,
                ..
            } => Some(RegionSet::All),
            _ => None,
        }
    }
    /// Regions of the target to save before they are overwritten (design
    /// notes property 8): the copy set, when the target loses by force.
    pub fn save_set(&self) -> Option<RegionSet> {
        match self {
            Decision::Resync {
                save_loser_divergence: true,
                ..
            } => self.copy_set(),
            _ => None,
        }
    }
    /// The resync source, if any.
    pub fn source(&self) -> Option<Side> {
        match self {
            Decision::Resync { source, .. } => Some(*source),
            _ => None,
        }
    }
}

impl fmt::Display for Decision {
    /// For logs and status, from the deciding node's point of view.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::InSync => f.write_str("in sync"),
            Decision::Resync {
                source,
                kind,
                save_loser_divergence,
            } => {
                let dir = match source {
                    Side::Local => "local -> peer",
                    Side::Peer => "peer -> local",
                };
                let kind = match kind {
                    ResyncKind::Differential => "differential",
                    ResyncKind::Full => "full",
                };
                write!(f, "{kind} resync {dir}")?;
                if *save_loser_divergence {
                    f.write_str(", target's regions saved first")?;
                }
                Ok(())
            }
            Decision::SplitBrain => f.write_str("split brain"),
            Decision::Unrelated => f.write_str("unrelated data"),
            Decision::Blocked { reason } => write!(f, "blocked: {reason}"),
        }
    }
}

/// A row of the rule table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Stable id (`R1`…, `F1`…), as in `docs/resync-rules.md`.
    pub id: &'static str,
    /// Short name for logs and status.
    pub name: &'static str,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.id, self.name)
    }
}

macro_rules! rules {
    ($($c:ident = $id:literal, $name:literal;)*) => {
        $(#[doc = concat!("Rule ", $id, ": ", $name, " (see `docs/resync-rules.md`).")]
        pub const $c: Rule = Rule { id: $id, name: $name };)*
        /// Every rule, in table order.
        pub const ALL_RULES: &[Rule] = &[$($c),*];
    };
}

rules! {
    R1 = "R1", "disk-error";
    R2 = "R2", "both-inconsistent";
    R3 = "R3", "resume-interrupted-resync";
    R4 = "R4", "inconsistent-and-new";
    R5 = "R5", "both-new";
    R6 = "R6", "new-member";
    R7 = "R7", "blank-pair";
    R8 = "R8", "in-sync";
    R9 = "R9", "crash-while-connected";
    R10 = "R10", "both-were-active";
    R11 = "R11", "equal-current-diverged";
    R12 = "R12", "forced-wins";
    R13 = "R13", "both-forced";
    R14 = "R14", "ahead-differential";
    R15 = "R15", "ahead-full";
    R16 = "R16", "split-brain";
    R17 = "R17", "split-brain-related";
    R18 = "R18", "unrelated";
    F1 = "F1", "forced-disk-error";
    F2 = "F2", "forced-winner-inconsistent";
    F3 = "F3", "forced-both-inconsistent";
    F4 = "F4", "forced-winner";
}

fn pick<'a>(local: &'a NodeView, peer: &'a NodeView, side: Side) -> &'a NodeView {
    match side {
        Side::Local => local,
        Side::Peer => peer,
    }
}

fn resync(source: Side, kind: ResyncKind, save: bool) -> Decision {
    Decision::Resync {
        source,
        kind,
        save_loser_divergence: save,
    }
}

/// Whether the union of both bitmaps covers every region where the winner's
/// and the loser's data can differ: both bitmaps record changes since one
/// generation both sides held (or one side's data is that generation).
fn bitmaps_cover(w: &NodeView, l: &NodeView) -> bool {
    w.c() == l.c()
        || (w.b() != 0 && w.b() == l.c())
        || (l.b() != 0 && l.b() == w.c())
        || (w.b() != 0 && w.b() == l.b())
}

/// `x` is provably ahead of `y`: Some(kind) (R14 differential, R15 full).
fn ahead(x: &NodeView, y: &NodeView) -> Option<(ResyncKind, Rule)> {
    if y.b() != 0 {
        // y changed on its own since By: it cannot be merely behind.
        return None;
    }
    if x.b() != 0 && x.b() == y.c() {
        return Some((ResyncKind::Differential, R14));
    }
    if x.in_history(y.c()) {
        return Some((ResyncKind::Full, R15));
    }
    None
}

fn names_with(local: &NodeView, peer: &NodeView, f: impl Fn(&NodeView) -> bool) -> String {
    // Sorted so that the text is the same on both nodes (symmetry).
    let mut v: Vec<&str> = [local, peer]
        .into_iter()
        .filter(|n| f(n))
        .map(|n| n.node.as_str())
        .collect();
    v.sort_unstable();
    v.join(" and ")
}

/// The automatic decision when `local` and `peer` connect. Symmetric:
/// `decide(b, a)` equals `decide(a, b)` with the sides swapped.
pub fn decide(local: &NodeView, peer: &NodeView) -> (Decision, Rule) {
    let (l, p) = (local, peer);
    if l.disk_error() || p.disk_error() {
        let who = names_with(l, p, NodeView::disk_error);
        let reason = format!(
            "data-disk I/O error recorded on {who}: replace the disk and re-create its metadata"
        );
        return (Decision::Blocked { reason }, R1);
    }
    match (l.inconsistent(), p.inconsistent()) {
        (true, true) => {
            let who = names_with(l, p, NodeView::inconsistent);
            let reason = format!(
                "{who} both hold partial copies from an interrupted resync: `mdctrl force <node> {}` names the one to keep",
                l.resource
            );
            return (Decision::Blocked { reason }, R2);
        }
        (true, false) | (false, true) => {
            let src = if l.inconsistent() {
                Side::Peer
            } else {
                Side::Local
            };
            let (s, t) = (pick(l, p, src), pick(l, p, src.other()));
            if s.never_synced() {
                let reason = format!(
                    "{} holds a partial copy and {} was never synchronised: `mdctrl force <node> {}` names the one to keep",
                    t.node, s.node, l.resource
                );
                return (Decision::Blocked { reason }, R4);
            }
            return (resync(src, ResyncKind::Differential, false), R3);
        }
        (false, false) => {}
    }
    match (l.never_synced(), p.never_synced()) {
        (true, true) => return (Decision::Unrelated, R5),
        (true, false) => return (resync(Side::Peer, ResyncKind::Full, false), R6),
        (false, true) => return (resync(Side::Local, ResyncKind::Full, false), R6),
        (false, false) => {}
    }
    if l.c() == p.c() {
        return decide_equal(l, p);
    }
    match (l.forced, p.forced) {
        (true, true) => return (Decision::SplitBrain, R13),
        (true, false) | (false, true) => {
            let src = if l.forced { Side::Local } else { Side::Peer };
            let kind = if bitmaps_cover(pick(l, p, src), pick(l, p, src.other())) {
                ResyncKind::Differential
            } else {
                ResyncKind::Full
            };
            return (resync(src, kind, true), R12);
        }
        (false, false) => {}
    }
    match (ahead(l, p), ahead(p, l)) {
        (Some((kind, rule)), None) => return (resync(Side::Local, kind, false), rule),
        (None, Some((kind, rule))) => return (resync(Side::Peer, kind, false), rule),
        (Some(_), Some(_)) => return (Decision::SplitBrain, R17),
        (None, None) => {}
    }
    if l.b() != 0 && l.b() == p.b() {
        return (Decision::SplitBrain, R16);
    }
    if l.all_gens().any(|g| p.all_gens().any(|h| h == g)) {
        return (Decision::SplitBrain, R17);
    }
    (Decision::Unrelated, R18)
}

/// Equal current generations (R7–R11).
fn decide_equal(l: &NodeView, p: &NodeView) -> (Decision, Rule) {
    if l.c() == gens::BLANK
        && l.b() == 0
        && p.b() == 0
        && l.dirty_regions == 0
        && p.dirty_regions == 0
    {
        return (Decision::InSync, R7);
    }
    if l.b() != 0 || p.b() != 0 {
        // B ≠ 0 means C was made by that node's own divergence; the other can
        // hold it only after a resync that cleared B first. Not reachable by
        // the protocol: leave it to the operator.
        return (Decision::SplitBrain, R11);
    }
    let dirty_active = |n: &NodeView| n.was_active() && n.dirty_regions > 0;
    match (l.was_active(), p.was_active()) {
        (true, true) if dirty_active(l) || dirty_active(p) => (Decision::SplitBrain, R10),
        (true, false) if dirty_active(l) => {
            (resync(Side::Local, ResyncKind::Differential, false), R9)
        }
        (false, true) if dirty_active(p) => {
            (resync(Side::Peer, ResyncKind::Differential, false), R9)
        }
        _ => (Decision::InSync, R8),
    }
}

/// The decision for `mdctrl force <winner> RES` while both nodes are
/// connected (split brain, unrelated data, both inconsistent, or any other
/// state the operator wants to override).
pub fn decide_forced(winner: Side, local: &NodeView, peer: &NodeView) -> (Decision, Rule) {
    let (w, l) = (pick(local, peer, winner), pick(local, peer, winner.other()));
    if w.disk_error() || l.disk_error() {
        let who = names_with(local, peer, NodeView::disk_error);
        let reason = format!("data-disk I/O error recorded on {who}: a resync cannot be trusted; replace the disk first");
        return (Decision::Blocked { reason }, F1);
    }
    if w.inconsistent() && !l.inconsistent() {
        let reason = format!(
            "{} holds a partial copy from an interrupted resync and {} is consistent: `mdctrl recover {}` resumes it (force {} instead)",
            w.node, l.node, w.resource, l.node
        );
        return (Decision::Blocked { reason }, F2);
    }
    if w.inconsistent() {
        return (resync(winner, ResyncKind::Full, true), F3);
    }
    let kind = if l.inconsistent() {
        // The loser's bitmap was made to cover every region still to copy
        // when its resync started (gens::resync_start_target).
        ResyncKind::Differential
    } else if w.never_synced() || l.never_synced() || !bitmaps_cover(w, l) {
        ResyncKind::Full
    } else {
        ResyncKind::Differential
    };
    (resync(winner, kind, true), F4)
}

/// What the local node knows about its peer when it is asked to activate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerKnowledge {
    /// Connected (the handshake exchanged views).
    Connected {
        /// The peer's view.
        view: NodeView,
        /// The peer is serving the volume.
        active: bool,
    },
    /// Not connected; `node` is the configured peer name.
    Unreachable {
        /// The peer's node name.
        node: String,
    },
}

/// Why an activation is refused, and what the operator can do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The precise reason.
    pub reason: String,
    /// What to do about it.
    pub hint: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.hint)
    }
}

fn refuse(reason: String, hint: String) -> Result<(), Refusal> {
    Err(Refusal { reason, hint })
}

/// Design notes property 7: may `local` start serving the volume? Allowed
/// when connected, the peer inactive and the data in sync or `local` the
/// resync source; or the peer unreachable and `local` forced.
pub fn may_activate(local: &NodeView, peer: &PeerKnowledge) -> Result<(), Refusal> {
    let (me, res) = (&local.node, &local.resource);
    if local.disk_error() {
        return refuse(
            format!("the data disk of {me} had an I/O error"),
            format!(
                "replace the disk, re-create the metadata (`mdctrl init {res} --force`) and resync"
            ),
        );
    }
    if local.inconsistent() {
        return refuse(
            format!("the local data of {me} is inconsistent: a resync into this node is running or was interrupted"),
            format!("let the resync finish (`mdctrl status {res}`); activate the resync source instead"),
        );
    }
    if local.never_synced() {
        // Initial mirror construction: both nodes new, connected, the peer
        // inactive. The activating node's data becomes the source
        // (`gens::claim_initial_source`, then R6 copies it in full).
        if initial_source_allowed(local, peer) {
            return Ok(());
        }
        let why = match peer {
            PeerKnowledge::Unreachable { node } => format!("peer {node} is unreachable"),
            PeerKnowledge::Connected { view, active: true } => {
                format!("peer {} is active", view.node)
            }
            PeerKnowledge::Connected { view, .. } if view.never_synced() => {
                let (d, rule) = decide(local, view);
                format!("{d} (rule {rule})")
            }
            PeerKnowledge::Connected { view, .. } => {
                format!("peer {} holds mirrored data", view.node)
            }
        };
        return refuse(
            format!("the local data of {me} was never synchronised ({why})"),
            format!("connect the peer: if both nodes are new, `mdctrl activate {res}` on the node whose data is kept starts the initial full copy; otherwise the resync from the peer makes {me} consistent (`mdctrl force {me} {res}` keeps this node's data instead)"),
        );
    }
    match peer {
        PeerKnowledge::Unreachable { node } => {
            if local.forced {
                return Ok(());
            }
            refuse(
                format!("peer {node} unreachable: cannot prove the local data of {me} is the latest"),
                format!("if {node} is gone, `mdctrl force {me} {res}` (its changes since the break will be saved, not used)"),
            )
        }
        PeerKnowledge::Connected { view, active } => {
            let peer_name = &view.node;
            if *active {
                return refuse(
                    format!("peer {peer_name} is active"),
                    format!("deactivate {res} on {peer_name} first"),
                );
            }
            let (decision, rule) = decide(local, view);
            match decision {
                Decision::InSync | Decision::Resync { source: Side::Local, .. } => Ok(()),
                Decision::Resync { source: Side::Peer, .. } => refuse(
                    format!("local data of {me} is older than {peer_name}'s (rule {rule})"),
                    format!("run `mdctrl recover {res}` and activate {peer_name}, or wait for the resync to finish"),
                ),
                Decision::SplitBrain => refuse(
                    format!("split brain between {me} and {peer_name} (rule {rule})"),
                    format!("`mdctrl force <winner> {res}`; the loser's changes are saved"),
                ),
                Decision::Unrelated => refuse(
                    format!("{me} and {peer_name} hold unrelated data (rule {rule})"),
                    format!("`mdctrl force <winner> {res}` starts a full resync from the winner"),
                ),
                Decision::Blocked { reason } => refuse(
                    format!("{reason} (rule {rule})"),
                    format!("`mdctrl status {res}`"),
                ),
            }
        }
    }
}

/// Initial mirror construction (rule R5 `both-new`, `docs/resync-rules.md`
/// §5 case 4): may the never-synchronised `local` node claim the initial
/// source by activating? Only when connected (the peer's state is known), the
/// peer inactive and new as well, and `decide` says R5 (no disk error, no
/// partial copy on either side). Neither side was ever written through the
/// mirror, so no mirrored data can be lost: the activating node's
/// pre-existing data simply becomes the first content of the mirror.
pub fn initial_source_allowed(local: &NodeView, peer: &PeerKnowledge) -> bool {
    match peer {
        PeerKnowledge::Connected { view, active } => {
            !*active && local.never_synced() && view.never_synced() && decide(local, view).1 == R5
        }
        PeerKnowledge::Unreachable { .. } => false,
    }
}

/// Why an automatic recovery does not start (shown in status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// The peer is not connected: its state is unknown.
    PeerUnknown,
    /// Nothing to copy.
    NoDifference,
    /// The resource is active on neither node.
    NotActive,
    /// The resource is active on both nodes.
    BothActive,
    /// The active node is not the one with the latest data.
    ActiveNotLatest {
        /// The rule that found the other side newer.
        rule: Rule,
    },
    /// Split brain: an operator names the winner.
    SplitBrain {
        /// The rule.
        rule: Rule,
    },
    /// Unrelated data: an operator names the winner.
    Unrelated {
        /// The rule.
        rule: Rule,
    },
    /// A blocked case (disk error, inconsistent data).
    Blocked {
        /// The rule.
        rule: Rule,
        /// Its reason.
        reason: String,
    },
}

impl BlockReason {
    /// Stable short code for status output.
    pub fn code(&self) -> &'static str {
        match self {
            BlockReason::PeerUnknown => "peer-unknown",
            BlockReason::NoDifference => "no-difference",
            BlockReason::NotActive => "not-active",
            BlockReason::BothActive => "both-active",
            BlockReason::ActiveNotLatest { .. } => "active-not-latest",
            BlockReason::SplitBrain { .. } => "split-brain",
            BlockReason::Unrelated { .. } => "unrelated",
            BlockReason::Blocked { .. } => "blocked",
        }
    }
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockReason::PeerUnknown => f.write_str("the peer's state is unknown (not connected)"),
            BlockReason::NoDifference => f.write_str("no difference between the nodes"),
            BlockReason::NotActive => {
                f.write_str("the resource is active on neither node (`mdctrl recover` starts it)")
            }
            BlockReason::BothActive => f.write_str("the resource is active on both nodes"),
            BlockReason::ActiveNotLatest { rule } => {
                write!(
                    f,
                    "the active node does not hold the latest data (rule {rule})"
                )
            }
            BlockReason::SplitBrain { rule } => {
                write!(f, "split brain (rule {rule}): `mdctrl force <winner>`")
            }
            BlockReason::Unrelated { rule } if *rule == R5 => write!(
                f,
                "both nodes new (rule {rule}): `mdctrl activate` on the node whose data is kept starts the initial full copy"
            ),
            BlockReason::Unrelated { rule } => {
                write!(f, "unrelated data (rule {rule}): `mdctrl force <winner>`")
            }
            BlockReason::Blocked { rule, reason } => write!(f, "{reason} (rule {rule})"),
        }
    }
}

/// The ancestor's auto-mirror-recovery conditions (§11.10.1): the resource is
/// active on one side, that side holds the latest data, both nodes are
/// reachable with known states, and differences exist. One addition: an
/// interrupted resync (R3) resumes also while neither node is active. Never in split brain,
/// with unrelated data (latest side unknown) or a blocked case (disk error,
/// inconsistent data).
pub fn auto_recovery_allowed(
    local: &NodeView,
    local_active: bool,
    peer: &PeerKnowledge,
) -> Result<(Decision, Rule), BlockReason> {
    let PeerKnowledge::Connected {
        view,
        active: peer_active,
    } = peer
    else {
        return Err(BlockReason::PeerUnknown);
    };
    let (decision, rule) = decide(local, view);
    let source = match &decision {
        Decision::InSync => return Err(BlockReason::NoDifference),
        Decision::SplitBrain => return Err(BlockReason::SplitBrain { rule }),
        Decision::Unrelated => return Err(BlockReason::Unrelated { rule }),
        Decision::Blocked { reason } => {
            return Err(BlockReason::Blocked {
                rule,
                reason: reason.clone(),
            })
        }
        Decision::Resync { source, .. } => *source,
    };
    let active_side = match (local_active, *peer_active) {
        // An interrupted resync resumes as soon as both nodes are back, like
        // DRBD's: its direction was decided (and made durable as the
        // target's RESYNC_TARGET) when it started, and the target's partial
        // copy is useless until it finishes (docs/resync-rules.md §6).
        (false, false) if rule == R3 => source,
        (false, false) => return Err(BlockReason::NotActive),
        (true, true) => return Err(BlockReason::BothActive),
        (true, false) => Side::Local,
        (false, true) => Side::Peer,
    };
    if active_side != source {
        return Err(BlockReason::ActiveNotLatest { rule });
    }
    Ok((decision, rule))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(node: &str, c: u64, b: u64, h: [u64; 4]) -> NodeView {
        NodeView {
            node: node.into(),
            resource: "md1".into(),
            gens: Generations {
                current: c,
                bitmap: b,
                history: h,
            },
            flags: Flags::CONSISTENT,
            dirty_regions: 0,
            forced: false,
        }
    }
    fn with(mut v: NodeView, f: Flags) -> NodeView {
        v.flags.insert(f);
        v
    }
    fn dirty(mut v: NodeView, n: u64) -> NodeView {
        v.dirty_regions = n;
        v
    }
    fn forced(mut v: NodeView) -> NodeView {
        v.forced = true;
        v.flags.insert(gens::FORCED);
        v
    }
    const H0: [u64; 4] = [0; 4];

    /// Checks the decision both ways round.
    fn check(a: &NodeView, b: &NodeView, want: Decision, rule: Rule) {
        assert_eq!(decide(a, b), (want.clone(), rule), "decide(a, b)");
        assert_eq!(decide(b, a), (want.mirrored(), rule), "decide(b, a)");
    }
    fn diff(source: Side) -> Decision {
        resync(source, ResyncKind::Differential, false)
    }
    fn blocked(d: &Decision) -> bool {
        matches!(d, Decision::Blocked { .. })
    }

    #[test]
    fn r1_disk_error() {
        let a = with(view("s1", 5, 0, H0), Flags::DISK_ERROR);
        let (d, r) = decide(&a, &view("s2", 5, 0, H0));
        assert!(blocked(&d) && r == R1, "{d:?}");
        assert!(format!("{d:?}").contains("s1"));
    }

    #[test]
    fn r2_both_inconsistent() {
        let a = with(view("s1", 5, 0, H0), Flags::RESYNC_TARGET);
        let b = with(view("s2", 6, 0, H0), Flags::RESYNC_TARGET);
        let (d, r) = decide(&a, &b);
        assert!(blocked(&d) && r == R2);
        assert_eq!(decide(&b, &a).0, d, "same reason text on both nodes");
    }

    #[test]
    fn r3_resume_interrupted_resync() {
        // Target crashed mid-resync (old C kept); source diverged meanwhile.
        let t = dirty(with(view("s2", 5, 0, H0), Flags::RESYNC_TARGET), 10);
        let s = view("s1", 9, 5, H0);
        check(&s, &t, diff(Side::Local), R3);
        // Also when the source already finished (B cleared) before the target
        // adopted its generation.
        let s = view("s1", 9, 0, [5, 0, 0, 0]);
        check(&s, &t, diff(Side::Local), R3);
    }

    #[test]
    fn r4_inconsistent_and_new() {
        let t = with(view("s2", 5, 0, H0), Flags::RESYNC_TARGET);
        let n = with(view("s1", 77, 0, H0), Flags::BLANK);
        let (d, r) = decide(&n, &t);
        assert!(blocked(&d) && r == R4);
    }

    #[test]
    fn r5_both_new() {
        let a = with(view("s1", 3, 0, H0), Flags::BLANK);
        let b = with(view("s2", 7, 0, H0), Flags::BLANK);
        check(&a, &b, Decision::Unrelated, R5);
        // Nothing starts by itself: no node is active.
        let conn = |v: &NodeView, active| PeerKnowledge::Connected {
            view: v.clone(),
            active,
        };
        let e = auto_recovery_allowed(&a, false, &conn(&b, false)).unwrap_err();
        assert!(e.to_string().contains("mdctrl activate"), "{e}");
        // Initial mirror construction: either node may claim the initial
        // source while connected and the peer inactive ...
        assert!(initial_source_allowed(&a, &conn(&b, false)));
        assert!(may_activate(&a, &conn(&b, false)).is_ok());
        assert!(may_activate(&b, &conn(&a, false)).is_ok());
        // ... but not without knowing the peer's state, nor next to an active peer.
        let gone = PeerKnowledge::Unreachable { node: "s2".into() };
        assert!(!initial_source_allowed(&a, &gone));
        let e = may_activate(&a, &gone).unwrap_err();
        assert!(
            e.reason.contains("never synchronised") && e.reason.contains("unreachable"),
            "{e}"
        );
        let e = may_activate(&a, &conn(&b, true)).unwrap_err();
        assert!(e.reason.contains("s2 is active"), "{e}");
        // Not when the peer holds a partial copy (R4) or a failed disk (R1).
        let partial = with(b.clone(), Flags::RESYNC_TARGET);
        assert!(!initial_source_allowed(&a, &conn(&partial, false)));
        assert!(may_activate(&a, &conn(&partial, false)).is_err());
        let failed = with(b.clone(), Flags::DISK_ERROR);
        assert!(may_activate(&a, &conn(&failed, false)).is_err());
        // A new node next to a node with mirrored data never claims (R6 instead).
        let old = view("s2", 9, 0, H0);
        assert!(!initial_source_allowed(&a, &conn(&old, false)));
        let e = may_activate(&a, &conn(&old, false)).unwrap_err();
        assert!(e.reason.contains("holds mirrored data"), "{e}");
        // The claim (gens::claim_initial_source, persisted before serving)
        // turns R5 into R6 with the claimant as the full-resync source, and
        // auto recovery starts it from the active claimant; the other node
        // can no longer activate.
        let mut sb = SbState {
            gens: a.gens,
            flags: a.flags,
            break_time: 0,
        };
        gens::on_activate(&mut sb, false);
        let claimed = NodeView::from_state("s1", "md1", &sb, 0);
        check(
            &claimed,
            &b,
            resync(Side::Local, ResyncKind::Full, false),
            R6,
        );
        assert_eq!(
            auto_recovery_allowed(&claimed, true, &conn(&b, false)),
            Ok((resync(Side::Local, ResyncKind::Full, false), R6))
        );
        assert!(may_activate(&b, &conn(&claimed, true)).is_err());
        assert!(may_activate(&b, &conn(&claimed, false)).is_err());
    }

    #[test]
    fn r6_new_member() {
        let n = dirty(with(view("s2", 3, 0, H0), Flags::BLANK), 100);
        let old = view("s1", 9, 4, [1, 0, 0, 0]);
        check(&old, &n, resync(Side::Local, ResyncKind::Full, false), R6);
    }

    #[test]
    fn r7_blank_pair() {
        check(
            &view("s1", gens::BLANK, 0, H0),
            &view("s2", gens::BLANK, 0, H0),
            Decision::InSync,
            R7,
        );
    }

    #[test]
    fn r8_in_sync() {
        check(
            &view("s1", 5, 0, [3, 0, 0, 0]),
            &view("s2", 5, 0, [3, 0, 0, 0]),
            Decision::InSync,
            R8,
        );
        // Stale write intents of a cleanly deactivated node.
        check(
            &dirty(view("s1", 5, 0, H0), 4),
            &view("s2", 5, 0, H0),
            Decision::InSync,
            R8,
        );
        // A blank pair that has dirty intents but no active crash.
        check(
            &dirty(view("s1", gens::BLANK, 0, H0), 4),
            &view("s2", gens::BLANK, 0, H0),
            Decision::InSync,
            R8,
        );
    }

    #[test]
    fn r9_crash_while_connected() {
        let crashed = dirty(with(view("s1", 5, 0, H0), Flags::WAS_ACTIVE), 3);
        check(&crashed, &view("s2", 5, 0, H0), diff(Side::Local), R9);
        // A crashed active of a blank pair.
        let crashed = dirty(with(view("s1", gens::BLANK, 0, H0), Flags::WAS_ACTIVE), 3);
        check(
            &crashed,
            &view("s2", gens::BLANK, 0, H0),
            diff(Side::Local),
            R9,
        );
        // Nothing was in flight: in sync.
        let clean = with(view("s1", 5, 0, H0), Flags::WAS_ACTIVE);
        check(&clean, &view("s2", 5, 0, H0), Decision::InSync, R8);
    }

    #[test]
    fn r10_both_were_active() {
        let a = dirty(with(view("s1", 5, 0, H0), Flags::WAS_ACTIVE), 3);
        let b = with(view("s2", 5, 0, H0), Flags::WAS_ACTIVE);
        check(&a, &b, Decision::SplitBrain, R10);
    }

    #[test]
    fn r11_equal_current_diverged() {
        check(
            &view("s1", 5, 3, H0),
            &view("s2", 5, 0, H0),
            Decision::SplitBrain,
            R11,
        );
    }

    #[test]
    fn r12_forced_wins() {
        // Both diverged from 5; s2 was forced while s1 was unreachable.
        let a = dirty(view("s1", 8, 5, H0), 2);
        let b = forced(view("s2", 9, 5, H0));
        check(
            &a,
            &b,
            resync(Side::Peer, ResyncKind::Differential, true),
            R12,
        );
        // Unrelated data, forced side wins with a full copy.
        let a = view("s1", 8, 0, H0);
        let b = forced(view("s2", 9, 7, H0));
        check(&a, &b, resync(Side::Peer, ResyncKind::Full, true), R12);
        // Even when the generations say the other side is ahead.
        let a = view("s1", 8, 0, [9, 0, 0, 0]);
        let b = forced(view("s2", 9, 0, H0));
        check(&a, &b, resync(Side::Peer, ResyncKind::Full, true), R12);
    }

    #[test]
    fn r13_both_forced() {
        check(
            &forced(view("s1", 8, 5, H0)),
            &forced(view("s2", 9, 5, H0)),
            Decision::SplitBrain,
            R13,
        );
    }

    #[test]
    fn r14_ahead_differential() {
        check(
            &view("s1", 8, 5, H0),
            &view("s2", 5, 0, [2, 0, 0, 0]),
            diff(Side::Local),
            R14,
        );
        // The behind side crashed while active before: its intents join the union.
        let behind = dirty(with(view("s2", 5, 0, H0), Flags::WAS_ACTIVE), 4);
        check(&view("s1", 8, 5, H0), &behind, diff(Side::Local), R14);
    }

    #[test]
    fn r15_ahead_full() {
        check(
            &view("s1", 8, 6, [5, 0, 0, 0]),
            &view("s2", 5, 0, H0),
            resync(Side::Local, ResyncKind::Full, false),
            R15,
        );
        check(
            &view("s1", 8, 0, [5, 0, 0, 0]),
            &view("s2", 5, 0, H0),
            resync(Side::Local, ResyncKind::Full, false),
            R15,
        );
    }

    #[test]
    fn r16_split_brain() {
        check(
            &view("s1", 8, 5, H0),
            &view("s2", 9, 5, H0),
            Decision::SplitBrain,
            R16,
        );
    }

    #[test]
    fn r17_split_brain_related() {
        // s2 diverged from 5 (B=5); s1 diverged from a later 6 but knows 5.
        check(
            &view("s1", 8, 6, [5, 0, 0, 0]),
            &view("s2", 9, 5, H0),
            Decision::SplitBrain,
            R17,
        );
        // Each side's current is in the other's history (only by corruption).
        check(
            &view("s1", 8, 0, [9, 0, 0, 0]),
            &view("s2", 9, 0, [8, 0, 0, 0]),
            Decision::SplitBrain,
            R17,
        );
    }

    #[test]
    fn r18_unrelated() {
        check(
            &view("s1", 8, 3, [1, 0, 0, 0]),
            &view("s2", 9, 4, [2, 0, 0, 0]),
            Decision::Unrelated,
            R18,
        );
    }

    #[test]
    fn f1_forced_disk_error() {
        let a = view("s1", 8, 5, H0);
        let b = with(view("s2", 9, 5, H0), Flags::DISK_ERROR);
        for w in [Side::Local, Side::Peer] {
            let (d, r) = decide_forced(w, &a, &b);
            assert!(blocked(&d) && r == F1);
        }
    }

    #[test]
    fn f2_forced_winner_inconsistent() {
        let a = with(view("s1", 5, 0, H0), Flags::RESYNC_TARGET);
        let b = view("s2", 9, 5, H0);
        let (d, r) = decide_forced(Side::Local, &a, &b);
        assert!(blocked(&d) && r == F2);
        // Forcing the consistent side is the ordinary resume, saving the partial copy anyway.
        assert_eq!(
            decide_forced(Side::Peer, &a, &b),
            (resync(Side::Peer, ResyncKind::Differential, true), F4)
        );
    }

    #[test]
    fn f3_forced_both_inconsistent() {
        let a = with(view("s1", 5, 0, H0), Flags::RESYNC_TARGET);
        let b = with(view("s2", 9, 0, H0), Flags::RESYNC_TARGET);
        assert_eq!(
            decide_forced(Side::Peer, &a, &b),
            (resync(Side::Peer, ResyncKind::Full, true), F3)
        );
    }

    #[test]
    fn f4_forced_winner() {
        // Split brain from a common generation: differential, save the loser's union.
        let a = view("s1", 8, 5, H0);
        let b = view("s2", 9, 5, H0);
        let (d, r) = decide_forced(Side::Peer, &a, &b);
        assert_eq!(
            (d.clone(), r),
            (resync(Side::Peer, ResyncKind::Differential, true), F4)
        );
        assert_eq!(d.save_set(), Some(RegionSet::UnionOfBitmaps));
        // Unrelated: full, save all.
        let (d, _) = decide_forced(Side::Local, &view("s1", 8, 0, H0), &view("s2", 9, 0, H0));
        assert_eq!(d.save_set(), Some(RegionSet::All));
        // Both new (initial sync): full.
        let n1 = with(view("s1", 3, 0, H0), Flags::BLANK);
        let n2 = with(view("s2", 4, 0, H0), Flags::BLANK);
        assert_eq!(
            decide_forced(Side::Local, &n1, &n2).0,
            resync(Side::Local, ResyncKind::Full, true)
        );
        // Forcing the older side of an ahead pair: the union still covers.
        let (d, _) = decide_forced(Side::Peer, &view("s1", 8, 5, H0), &view("s2", 5, 0, H0));
        assert_eq!(d, resync(Side::Peer, ResyncKind::Differential, true));
    }

    #[test]
    fn activation_rules() {
        let me = view("server1", 8, 5, H0);
        let peer_node = PeerKnowledge::Unreachable {
            node: "server2".into(),
        };
        let e = may_activate(&me, &peer_node).unwrap_err();
        assert!(
            e.reason.contains("unreachable") && e.hint.contains("mdctrl force server1 md1"),
            "{e}"
        );
        assert!(may_activate(&forced(me.clone()), &peer_node).is_ok());

        let peer = view("server2", 5, 0, H0);
        let conn = |v: &NodeView, active| PeerKnowledge::Connected {
            view: v.clone(),
            active,
        };
        assert!(
            may_activate(&me, &conn(&peer, false)).is_ok(),
            "local is the source"
        );
        let e = may_activate(&peer, &conn(&me, false)).unwrap_err();
        assert!(
            e.reason.contains("older than server1") && e.reason.contains("R14"),
            "{e}"
        );
        assert!(e.hint.contains("mdctrl recover md1"));
        let e = may_activate(&me, &conn(&peer, true)).unwrap_err();
        assert!(
            e.reason.contains("peer server2 is active") && e.hint.contains("deactivate"),
            "{e}"
        );
        let e = may_activate(&me, &conn(&view("server2", 9, 5, H0), false)).unwrap_err();
        assert!(
            e.reason.contains("split brain") && e.hint.contains("mdctrl force <winner> md1"),
            "{e}"
        );
        let e =
            may_activate(&with(me.clone(), Flags::RESYNC_TARGET), &conn(&peer, false)).unwrap_err();
        assert!(e.reason.contains("inconsistent"), "{e}");
        let e = may_activate(&with(me.clone(), Flags::DISK_ERROR), &peer_node).unwrap_err();
        assert!(e.reason.contains("I/O error"), "{e}");
        let e = may_activate(&with(me.clone(), Flags::BLANK), &peer_node).unwrap_err();
        assert!(e.reason.contains("never synchronised"), "{e}");
        let insync = view("server2", 8, 0, H0);
        let me0 = view("server1", 8, 0, H0);
        assert!(may_activate(&me0, &conn(&insync, false)).is_ok());
    }

    #[test]
    fn auto_recovery_conditions() {
        let ahead = view("s1", 8, 5, H0);
        let behind = view("s2", 5, 0, H0);
        let conn = |v: &NodeView, active| PeerKnowledge::Connected {
            view: v.clone(),
            active,
        };
        assert!(auto_recovery_allowed(&ahead, true, &conn(&behind, false)).is_ok());
        assert_eq!(
            auto_recovery_allowed(
                &ahead,
                true,
                &PeerKnowledge::Unreachable { node: "s2".into() }
            ),
            Err(BlockReason::PeerUnknown)
        );
        assert_eq!(
            auto_recovery_allowed(&ahead, false, &conn(&behind, false)),
            Err(BlockReason::NotActive)
        );
        assert_eq!(
            auto_recovery_allowed(&behind, true, &conn(&ahead, false)),
            Err(BlockReason::ActiveNotLatest { rule: R14 })
        );
        assert_eq!(
            auto_recovery_allowed(&ahead, true, &conn(&behind, true)),
            Err(BlockReason::BothActive)
        );
        // An interrupted resync resumes with neither node active (R3), or
        // from the reactivated source, never from an active target.
        let target = with(view("s2", 5, 0, H0), Flags::RESYNC_TARGET);
        let r3 = (diff(Side::Local), R3);
        assert_eq!(
            auto_recovery_allowed(&ahead, false, &conn(&target, false)),
            Ok(r3.clone())
        );
        assert_eq!(
            auto_recovery_allowed(&ahead, true, &conn(&target, false)),
            Ok(r3)
        );
        assert_eq!(
            auto_recovery_allowed(&target, false, &conn(&ahead, false)),
            Ok((diff(Side::Peer), R3))
        );
        assert_eq!(
            auto_recovery_allowed(&target, true, &conn(&ahead, false)),
            Err(BlockReason::ActiveNotLatest { rule: R3 })
        );
        let same = view("s2", 8, 0, H0);
        assert_eq!(
            auto_recovery_allowed(&view("s1", 8, 0, H0), true, &conn(&same, false)),
            Err(BlockReason::NoDifference)
        );
        let sb = view("s2", 9, 5, H0);
        assert_eq!(
            auto_recovery_allowed(&ahead, true, &conn(&sb, false))
                .unwrap_err()
                .code(),
            "split-brain"
        );
        let err = with(behind.clone(), Flags::DISK_ERROR);
        assert_eq!(
            auto_recovery_allowed(&ahead, true, &conn(&err, false))
                .unwrap_err()
                .code(),
            "blocked"
        );
        let unrel = view("s2", 99, 0, H0);
        assert_eq!(
            auto_recovery_allowed(&ahead, true, &conn(&unrel, false))
                .unwrap_err()
                .code(),
            "unrelated"
        );
    }

    #[test]
    fn decisions_display_for_logs() {
        let d = resync(Side::Peer, ResyncKind::Full, true);
        assert_eq!(
            d.to_string(),
            "full resync peer -> local, target's regions saved first"
        );
        assert_eq!(R12.to_string(), "R12 forced-wins");
    }

    #[test]
    fn every_rule_is_in_the_doc_table() {
        let doc = include_str!("../../docs/resync-rules.md");
        for r in ALL_RULES {
            let row = format!("| {} | `{}` |", r.id, r.name);
            assert!(
                doc.contains(&row),
                "docs/resync-rules.md lacks the row start {row:?}"
            );
        }
    }

    fn arb_view(name: &'static str) -> impl Strategy<Value = NodeView> {
        // Generations from a small pool so that relations (equal, B = C, in
        // history) occur often; 0 and BLANK included.
        let g = prop_oneof![Just(0u64), Just(gens::BLANK), 1u64..6];
        let flags = prop::bits::u32::between(0, 6).prop_map(Flags);
        (
            g.clone(),
            g.clone(),
            [g.clone(), g.clone(), g.clone(), g],
            flags,
            0u64..3,
            any::<bool>(),
        )
            .prop_map(move |(c, b, h, flags, dirty, forced)| NodeView {
                node: name.into(),
                resource: "md1".into(),
                gens: Generations {
                    current: c,
                    bitmap: b,
                    history: h,
                },
                flags,
                dirty_regions: dirty,
                forced,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn decide_is_symmetric(a in arb_view("s1"), b in arb_view("s2")) {
            let (d1, r1) = decide(&a, &b);
            let (d2, r2) = decide(&b, &a);
            prop_assert_eq!(r1, r2);
            prop_assert_eq!(d1.mirrored(), d2);
        }

        #[test]
        fn decide_forced_is_symmetric(a in arb_view("s1"), b in arb_view("s2"), local_wins in any::<bool>()) {
            let w = if local_wins { Side::Local } else { Side::Peer };
            let (d1, r1) = decide_forced(w, &a, &b);
            let (d2, r2) = decide_forced(w.other(), &b, &a);
            prop_assert_eq!(r1, r2);
            prop_assert_eq!(d1.mirrored(), d2);
            // A forced resync always comes from the winner and saves the loser's regions.
            if let Decision::Resync { source, save_loser_divergence, .. } = d1 {
                prop_assert_eq!(source, w);
                prop_assert!(save_loser_divergence);
            }
        }

        #[test]
        fn inconsistent_is_never_a_source(a in arb_view("s1"), b in arb_view("s2")) {
            let (d, _) = decide(&a, &b);
            if let Some(src) = d.source() {
                prop_assert!(!pick(&a, &b, src).inconsistent());
                prop_assert!(!pick(&a, &b, src).disk_error());
            }
        }
    }
}
