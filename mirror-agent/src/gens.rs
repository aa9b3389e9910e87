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
//! Transitions live here, as pure functions on [`Generations`], so that the
//! replication path, recovery and the model tests share one definition.

use bitmap::Generations;

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

/// Generations of a freshly created, blank pair member.
pub fn blank() -> Generations {
    Generations { current: BLANK, bitmap: 0, history: Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diverging_is_idempotent_until_resync() {
        let mut g = Generations { current: 7, ..Default::default() };
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
        let mut t = Generations { current: 7, ..Default::default() };
        resync_done_target(&mut t, 9);
        assert_eq!((t.current, t.bitmap, t.history[0]), (9, 0, 7));
    }

    #[test]
    fn fresh_is_never_special() {
        for _ in 0..1000 {
            let g = fresh();
            assert!(g != 0 && g != BLANK);
        }
    }
}
