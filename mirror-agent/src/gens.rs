//! Generation identifiers: the recorded history of a node's data that
//! decides resync direction and detects split brain (never wall clocks).
//!
//! The scheme follows DRBD's data generations (design notes §5–7):
//! - `current` (C) names the data as it is now;
//! - `bitmap` (B) is the generation at which the dirty bitmap started
//!   recording changes not on the peer (0 = the bitmap tracks nothing beyond
//!   in-flight writes: the pair was in sync);
//! - `history` holds older generations, most recent first.
//!
//! Transitions live here, as pure functions on [`Generations`] (and, for the
//! lifecycle events that also change flags, on [`SbState`]), so that the
//! replication path, recovery and the model tests share one definition. The
//! decision table that reads these values is [`crate::rules`]; both are
//! described in `docs/resync-rules.md` (section "Transitions").

use bitmap::{Flags, Generations, SbState};

/// The well-known generation of a pair declared identical at creation
/// (`mdctrl init --blank` on both nodes, like DRBD's
/// `new-current-uuid --clear-bitmap`): ASCII "nbdmBLNK".
pub const BLANK: u64 = u64::from_be_bytes(*b"nbdmBLNK");

/// A fresh random generation: never 0 and never [`BLANK`].
pub fn fresh() -> u64 {
    loop {
        let g: u64 = rand::random();
        if g != 0 && g != BLANK {
            return g;
        }
    }
}

/// Push `g` onto the front of the history (dropping the oldest).
fn push_history(gens: &mut Generations, g: u64) {
    if g == 0 || gens.history.first() == Some(&g) {
        return;
    }
    gens.history.rotate_right(1);
    gens.history[0] = g;
}

/// The data is about to change without the peer (mirror break on the active
/// node, or activation without a connected peer): from now on the bitmap
/// records what the peer lacks. If the bitmap already records (an earlier
/// break not yet resynced), the generations stay as they are — one break
/// generation covers every change until the next resync. Returns whether
/// anything changed (so the caller knows a superblock write is needed).
pub fn begin_diverging(gens: &mut Generations) -> bool {
    if gens.bitmap != 0 {
        return false;
    }
    gens.bitmap = gens.current;
    gens.current = fresh();
    true
}

/// A resync finished on the *source*: the peer now holds our data, so the
/// bitmap no longer records anything (B := 0, pushed to history).
pub fn resync_done_source(gens: &mut Generations) {
    let b = std::mem::take(&mut gens.bitmap);
    push_history(gens, b);
}

/// A resync finished on the *target*: adopt the source's current generation.
pub fn resync_done_target(gens: &mut Generations, source_current: u64) {
    if gens.current != source_current {
        let old = gens.current;
        push_history(gens, old);
        gens.current = source_current;
    }
    gens.bitmap = 0;
}

/// Superblock flag bit 6, `FORCED`: an operator force made this
/// node's data the latest while its peer was unreachable (`mdctrl force
/// <this node> RES`). It makes this node win the next reconnect even if the
/// peer diverged too (rule R12), and lets it activate without a reachable
/// peer. Cleared when a resync *from* this node completes, or at the start
/// of a resync *into* it (it lost a later connected force). Persisted as
/// `bitmap::Flags::FORCED` (bit 6).
pub const FORCED: Flags = Flags::FORCED;

/// Activation of this node. `peer_in_sync`: connected and in sync with the
/// peer (replicating). Without it the data diverges from now on
/// ([`begin_diverging`]). A never-synchronised node may only get here through
/// the initial-source case of `rules::may_activate` (both nodes new): it
/// claims the initial source ([`claim_initial_source`]). Returns whether the
/// generations changed.
pub fn on_activate(sb: &mut SbState, peer_in_sync: bool) -> bool {
    sb.flags.insert(Flags::WAS_ACTIVE);
    if sb.flags.contains(Flags::BLANK) {
        return claim_initial_source(sb);
    }
    !peer_in_sync && begin_diverging(&mut sb.gens)
}

/// Initial mirror construction: both nodes were never synchronised (rule R5)
/// and the operator activates this one, so its pre-existing data becomes the
/// content of the mirror. Persisted before the node serves: `BLANK` is
/// cleared and `CONSISTENT` set (the data is now "known", as the source of
/// the initial copy), and the node diverges ([`begin_diverging`]: its data
/// gets a generation the peer never had, and it writes alone until the
/// initial copy is done). The peer is still `BLANK`, so rule R6
/// (`new-member`) makes this node the source of a full resync — durably: a
/// crash or a restart of either node reaches the same decision. Returns
/// whether the generations changed (always true for a BLANK node).
pub fn claim_initial_source(sb: &mut SbState) -> bool {
    sb.flags.remove(Flags::BLANK);
    sb.flags.insert(Flags::CONSISTENT);
    begin_diverging(&mut sb.gens)
}

/// Deactivation. The caller clears WAS_ACTIVE only after every write has
/// completed locally and (if connected) on the peer, or after the mirror
/// broke (which already rotated the generation): rule R8 relies on "equal C
/// and not WAS_ACTIVE ⇒ identical data".
pub fn on_deactivate(sb: &mut SbState) {
    sb.flags.remove(Flags::WAS_ACTIVE);
}

/// The mirror broke (peer lost, network down, or the peer crashed). Only an
/// active node diverges: a standby writes nothing without its peer. Must be
/// persisted before any write completes without the peer. Returns whether
/// the generations changed.
pub fn on_break(sb: &mut SbState, active: bool) -> bool {
    active && begin_diverging(&mut sb.gens)
}

/// `mdctrl force <this node> RES` with the peer unreachable: the local data
/// is declared the latest. The node diverges (so its data has a generation
/// the peer never had) and records [`FORCED`]. A force on a never-synced or
/// interrupted-resync node is the operator's explicit acceptance of that data:
/// BLANK and RESYNC_TARGET are cleared.
pub fn force_alone(sb: &mut SbState) {
    begin_diverging(&mut sb.gens);
    sb.flags.insert(FORCED);
    sb.flags.insert(Flags::CONSISTENT);
    sb.flags.remove(Flags::BLANK);
    sb.flags.remove(Flags::RESYNC_TARGET);
}

/// Resync start on the *source* (before the first region is sent). A source
/// chosen by a connected force may have been new or inconsistent: the
/// operator accepted its data.
pub fn resync_start_source(sb: &mut SbState) {
    sb.flags.insert(Flags::CONSISTENT);
    sb.flags.remove(Flags::BLANK);
    sb.flags.remove(Flags::RESYNC_TARGET);
}

/// Resync start on the *target*, persisted before the first copied region
/// and after the target's bitmap was made to cover every region still to
/// copy (merged with the source's bitmap for a differential resync, all set
/// for a full one): from here until [`resync_finished_target`] the target is
/// inconsistent, even across crashes, and resumes as a target (rule R3).
/// A target lost any force it held, and is not active.
pub fn resync_start_target(sb: &mut SbState) {
    sb.flags.insert(Flags::RESYNC_TARGET);
    sb.flags.remove(Flags::CONSISTENT);
    sb.flags.remove(Flags::BLANK);
    sb.flags.remove(FORCED);
    sb.flags.remove(Flags::WAS_ACTIVE);
}

/// Resync end on the *source*: persisted *before* the target is told the
/// resync is done (so a target that adopted our generation never sees a
/// stale B or FORCED here; a target that crashes in between still says
/// RESYNC_TARGET and resumes an empty resync).
pub fn resync_finished_source(sb: &mut SbState) {
    resync_done_source(&mut sb.gens);
    sb.flags.remove(FORCED);
    sb.flags.insert(Flags::INITIAL_SYNC_DONE);
}

/// Resync end on the *target*: adopt the source's generation, become
/// consistent.
pub fn resync_finished_target(sb: &mut SbState, source_current: u64) {
    resync_done_target(&mut sb.gens, source_current);
    sb.flags.remove(Flags::RESYNC_TARGET);
    sb.flags.remove(Flags::BLANK);
    sb.flags.remove(FORCED);
    sb.flags.insert(Flags::CONSISTENT);
    sb.flags.insert(Flags::INITIAL_SYNC_DONE);
}

/// Replication (re)started: the pair is in sync (decision "in sync", or a
/// resync finished). A node that is not serving drops a WAS_ACTIVE left by a
/// crash: the write intents it stood for were resolved by this handshake
/// (rule R9), and keeping it would make a later crash of the other node look
/// like two active nodes (rule R10).
pub fn on_replicating(sb: &mut SbState, active: bool) {
    if !active {
        sb.flags.remove(Flags::WAS_ACTIVE);
    }
}

/// Generations of a freshly created, blank pair member.
pub fn blank() -> Generations {
    Generations {
        current: BLANK,
        bitmap: 0,
        history: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diverging_is_idempotent_until_resync() {
        let mut g = Generations {
            current: 7,
            ..Default::default()
        };
        assert!(begin_diverging(&mut g));
        assert_eq!(g.bitmap, 7);
        assert_ne!(g.current, 7);
        let c = g.current;
        assert!(!begin_diverging(&mut g));
        assert_eq!((g.current, g.bitmap), (c, 7));
        resync_done_source(&mut g);
        assert_eq!((g.current, g.bitmap, g.history[0]), (c, 0, 7));
    }

    #[test]
    fn target_adopts_source_generation() {
        let mut t = Generations {
            current: 7,
            ..Default::default()
        };
        resync_done_target(&mut t, 9);
        assert_eq!((t.current, t.bitmap, t.history[0]), (9, 0, 7));
    }

    #[test]
    fn force_alone_rotates_and_marks() {
        let mut sb = SbState {
            gens: Generations {
                current: 7,
                ..Default::default()
            },
            ..Default::default()
        };
        sb.flags.insert(Flags::RESYNC_TARGET);
        force_alone(&mut sb);
        assert_eq!(sb.gens.bitmap, 7);
        assert_ne!(sb.gens.current, 7);
        assert!(sb.flags.contains(FORCED) && !sb.flags.contains(Flags::RESYNC_TARGET));
        resync_finished_source(&mut sb);
        assert!(!sb.flags.contains(FORCED));
        assert_eq!((sb.gens.bitmap, sb.gens.history[0]), (0, 7));
    }

    #[test]
    fn target_flags_span_the_resync() {
        let mut sb = SbState::default();
        sb.flags.insert(FORCED);
        sb.flags.insert(Flags::BLANK);
        resync_start_target(&mut sb);
        assert!(sb.flags.contains(Flags::RESYNC_TARGET));
        assert!(!sb.flags.contains(FORCED) && !sb.flags.contains(Flags::BLANK));
        resync_finished_target(&mut sb, 42);
        assert!(!sb.flags.contains(Flags::RESYNC_TARGET));
        assert_eq!(sb.gens.current, 42);
    }

    #[test]
    fn only_an_active_node_diverges_on_break() {
        let mut sb = SbState {
            gens: Generations {
                current: 7,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!on_break(&mut sb, false));
        assert_eq!(sb.gens.current, 7);
        assert!(!on_activate(&mut sb, true));
        assert!(sb.flags.contains(Flags::WAS_ACTIVE));
        assert!(on_break(&mut sb, true));
        assert_eq!(sb.gens.bitmap, 7);
    }

    #[test]
    fn initial_claim_makes_a_source_for_r6() {
        let mut sb = SbState {
            gens: Generations {
                current: 7,
                ..Default::default()
            },
            ..Default::default()
        };
        sb.flags.insert(Flags::BLANK);
        // Activation of a never-synced node (allowed only when both are new).
        assert!(on_activate(&mut sb, false));
        assert!(!sb.flags.contains(Flags::BLANK));
        assert!(sb.flags.contains(Flags::CONSISTENT) && sb.flags.contains(Flags::WAS_ACTIVE));
        assert_eq!(sb.gens.bitmap, 7, "diverged from its pre-mirror generation");
        assert_ne!(sb.gens.current, 7);
        // A second activation (after a restart) does not rotate again.
        let c = sb.gens.current;
        assert!(!on_activate(&mut sb, false));
        assert_eq!(sb.gens.current, c);
    }

    #[test]
    fn fresh_is_never_special() {
        for _ in 0..1000 {
            let g = fresh();
            assert!(g != 0 && g != BLANK);
        }
    }
}
