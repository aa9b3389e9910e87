//! The tracker's two small indexes for hot extents (the activity log, see
//! `docs/on-disk-format.md` §"Hot extents"):
//!
//! * [`Lru`] — the bounded, least-recently-used set of *hot extents*. An extent is
//!   `2^shift` consecutive regions; while it is hot its regions are left dirty on disk so that
//!   writes into it need no metadata write.
//! * [`IntentSet`] — the regions that are dirty only for write intent, grouped by extent (one
//!   small bit set per extent), so the clearer visits the few extents that have any instead of
//!   every region, and the set stays compact when whole extents are marked at once.

use std::collections::{BTreeMap, HashMap};

/// Most regions one extent may span (bounds the per-extent bit set to 8 KiB).
pub const MAX_EXTENT_REGIONS: u64 = 1 << 16;

/// Keep-dirty LRU of hot extents (keys are extent indices).
#[derive(Debug, Default)]
pub(crate) struct Lru {
    pub(crate) cap: usize,
    tick: u64,
    by_key: HashMap<u64, u64>,
    by_tick: BTreeMap<u64, u64>,
}

impl Lru {
    pub(crate) fn with_capacity(cap: usize) -> Lru {
        Lru {
            cap,
            ..Lru::default()
        }
    }

    /// Makes `k` the most recently used (inserting it, evicting the coldest beyond `cap`).
    pub(crate) fn touch(&mut self, k: u64) {
        if self.cap == 0 {
            return;
        }
        self.tick += 1;
        if let Some(old) = self.by_key.insert(k, self.tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.tick, k);
        self.shrink();
    }

    pub(crate) fn shrink(&mut self) {
        while self.by_key.len() > self.cap {
            let (_, k) = self.by_tick.pop_first().expect("non-empty");
            self.by_key.remove(&k);
        }
    }

    pub(crate) fn contains(&self, k: u64) -> bool {
        self.by_key.contains_key(&k)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Forgets every entry (the capacity stays).
    pub(crate) fn clear(&mut self) {
        self.by_key.clear();
        self.by_tick.clear();
    }

    pub(crate) fn heap_bytes(&self) -> u64 {
        (self.by_key.capacity() * 17) as u64 + (self.by_tick.len() as u64) * 32
    }
}

#[derive(Debug)]
struct ExtentBits {
    count: u32,
    words: Box<[u64]>,
}

/// Set of region indices, stored as one bit set per extent of `2^shift` regions.
#[derive(Debug, Default)]
pub(crate) struct IntentSet {
    shift: u32,
    map: HashMap<u64, ExtentBits>,
    len: u64,
}

impl IntentSet {
    pub(crate) fn new(shift: u32) -> IntentSet {
        assert!(1u64 << shift <= MAX_EXTENT_REGIONS);
        IntentSet {
            shift,
            ..IntentSet::default()
        }
    }

    fn words_per_extent(&self) -> usize {
        (1usize << self.shift).div_ceil(64)
    }

    fn split(&self, r: u64) -> (u64, usize, u64) {
        let i = r & ((1u64 << self.shift) - 1);
        (r >> self.shift, (i / 64) as usize, 1u64 << (i % 64))
    }

    /// Adds `r`; true if it was not there.
    pub(crate) fn insert(&mut self, r: u64) -> bool {
        let (e, w, m) = self.split(r);
        let n = self.words_per_extent();
        let x = self.map.entry(e).or_insert_with(|| ExtentBits {
            count: 0,
            words: vec![0; n].into_boxed_slice(),
        });
        if x.words[w] & m != 0 {
            return false;
        }
        x.words[w] |= m;
        x.count += 1;
        self.len += 1;
        true
    }

    /// Removes `r`; true if it was there.
    pub(crate) fn remove(&mut self, r: u64) -> bool {
        let (e, w, m) = self.split(r);
        let Some(x) = self.map.get_mut(&e) else {
            return false;
        };
        if x.words[w] & m == 0 {
            return false;
        }
        x.words[w] &= !m;
        x.count -= 1;
        self.len -= 1;
        if x.count == 0 {
            self.map.remove(&e);
        }
        true
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, r: u64) -> bool {
        let (e, w, m) = self.split(r);
        self.map.get(&e).is_some_and(|x| x.words[w] & m != 0)
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.len = 0;
    }

    /// Extents holding at least one member.
    pub(crate) fn extents(&self) -> impl Iterator<Item = u64> + '_ {
        self.map.keys().copied()
    }

    /// Members inside extent `e`, ascending.
    pub(crate) fn members_of(&self, e: u64) -> Vec<u64> {
        let Some(x) = self.map.get(&e) else {
            return Vec::new();
        };
        let base = e << self.shift;
        let mut v = Vec::with_capacity(x.count as usize);
        for (wi, &w) in x.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                v.push(base + wi as u64 * 64 + w.trailing_zeros() as u64);
                w &= w - 1;
            }
        }
        v
    }

    /// All members (any order).
    fn all(&self) -> Vec<u64> {
        let mut v = Vec::with_capacity(self.len as usize);
        for e in self.extents() {
            v.extend(self.members_of(e));
        }
        v
    }

    /// Keeps only the members for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        for r in self.all() {
            if !keep(r) {
                self.remove(r);
            }
        }
    }

    /// Re-indexes with extents of `2^shift` regions (same members).
    pub(crate) fn set_shift(&mut self, shift: u32) {
        let all = self.all();
        *self = IntentSet::new(shift);
        for r in all {
            self.insert(r);
        }
    }

    pub(crate) fn heap_bytes(&self) -> u64 {
        let per = 8 * self.words_per_extent() as u64 + 16;
        (self.map.capacity() as u64) * 33 + (self.map.len() as u64) * per
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn intent_set_matches_a_btreeset() {
        for shift in [0u32, 1, 6, 7, 10] {
            let mut s = IntentSet::new(shift);
            let mut m = BTreeSet::new();
            let mut x = 12345u64;
            for _ in 0..5000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (x >> 33) % 3000;
                if x & 1 == 0 {
                    assert_eq!(s.insert(r), m.insert(r));
                } else {
                    assert_eq!(s.remove(r), m.remove(&r));
                }
                assert_eq!(s.len(), m.len() as u64);
            }
            let mut all = s.all();
            all.sort_unstable();
            assert_eq!(all, m.iter().copied().collect::<Vec<_>>());
            for r in 0..3000 {
                assert_eq!(s.contains(r), m.contains(&r));
            }
            s.set_shift(3);
            let mut all = s.all();
            all.sort_unstable();
            assert_eq!(all, m.iter().copied().collect::<Vec<_>>());
            s.retain(|r| r % 2 == 0);
            assert_eq!(s.len(), m.iter().filter(|r| *r % 2 == 0).count() as u64);
            s.clear();
            assert_eq!((s.len(), s.extents().count()), (0, 0));
        }
    }

    #[test]
    fn lru_evicts_the_coldest() {
        let mut l = Lru::with_capacity(2);
        l.touch(1);
        l.touch(2);
        l.touch(1);
        l.touch(3);
        assert!(l.contains(1) && l.contains(3) && !l.contains(2));
        assert_eq!(l.len(), 2);
        l.cap = 0;
        l.shrink();
        assert_eq!(l.len(), 0);
    }
}
