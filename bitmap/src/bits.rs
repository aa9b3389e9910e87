//! [`DirtyBits`]: a dense bit set over region indices, stored as u64 words (LSB first), whose
//! chunk boundaries are word-aligned (32640 bits = 510 words per chunk). Used in memory by the
//! tracker, for snapshots, and for the bitmap exchanged with the peer.

use crate::layout::{
    check_chunk, chunk_words, encode_chunk, ChunkFault, BITS_PER_CHUNK, WORDS_PER_CHUNK,
};
use std::ops::Range;

/// A dense set of region indices `0..len`.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBits {
    words: Vec<u64>,
    len: u64,
}

impl std::fmt::Debug for DirtyBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DirtyBits {{ len: {}, ones: {} }}",
            self.len,
            self.count_ones()
        )
    }
}

/// One decoded bitmap chunk (from disk or from the peer). Its 4096-byte encoding (magic `NMBC`,
/// index, CRC, uuid tag, 32640 bits LSB first) is documented on [`crate::layout::encode_chunk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapChunk {
    /// Chunk index.
    pub index: u32,
    /// Its bit words (as many as the chunk has valid regions, rounded up to words).
    pub words: Vec<u64>,
}

impl DirtyBits {
    /// An empty set over `len` regions.
    pub fn new(len: u64) -> DirtyBits {
        DirtyBits {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// A full set over `len` regions.
    pub fn full(len: u64) -> DirtyBits {
        let mut b = DirtyBits::new(len);
        b.set_range(0..len);
        b
    }

    /// Number of regions covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if it covers no regions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Is region `i` set?
    pub fn get(&self, i: u64) -> bool {
        assert!(i < self.len, "region {i} out of range {}", self.len);
        self.words[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    /// Sets or clears region `i`; returns the previous value.
    pub fn set(&mut self, i: u64, v: bool) -> bool {
        assert!(i < self.len, "region {i} out of range {}", self.len);
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        let old = *w & m != 0;
        if v {
            *w |= m
        } else {
            *w &= !m
        }
        old
    }

    /// Sets every region in `r`.
    pub fn set_range(&mut self, r: Range<u64>) {
        for i in r {
            // Fast enough: full sets happen at create/set_all only, and whole words are rare cases.
            if i % 64 == 0 && i + 64 <= self.len {
                self.words[(i / 64) as usize] = u64::MAX;
            } else {
                self.set(i, true);
            }
        }
    }

    /// Number of set regions.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// First set region `>= from`.
    pub fn next_one(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + w.trailing_zeros() as u64;
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }

    /// Iterates set regions in ascending order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = 0;
        std::iter::from_fn(move || {
            let i = self.next_one(next)?;
            next = i + 1;
            Some(i)
        })
    }

    /// Up to `max` maximal ranges of consecutive set regions, ascending.
    pub fn ranges(&self, max: usize) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut from = 0;
        while out.len() < max {
            let Some(start) = self.next_one(from) else {
                break;
            };
            let mut end = start + 1;
            while end < self.len && self.get(end) {
                end += 1;
            }
            out.push(start..end);
            from = end;
        }
        out
    }

    /// Union with `other` (same length). Returns the chunk indices whose bits changed.
    pub fn union_with(&mut self, other: &DirtyBits) -> Vec<u32> {
        assert_eq!(self.len, other.len);
        let mut changed = Vec::new();
        for (i, (a, b)) in self.words.iter_mut().zip(&other.words).enumerate() {
            if *b & !*a != 0 {
                *a |= *b;
                let c = (i / WORDS_PER_CHUNK) as u32;
                if changed.last() != Some(&c) {
                    changed.push(c);
                }
            }
        }
        changed
    }

    /// Number of chunks covering this set.
    pub fn chunk_count(&self) -> u64 {
        self.len.div_ceil(BITS_PER_CHUNK)
    }

    /// The words of chunk `idx`.
    pub fn chunk_words(&self, idx: u32) -> &[u64] {
        let start = idx as usize * WORDS_PER_CHUNK;
        let end = (start + WORDS_PER_CHUNK).min(self.words.len());
        &self.words[start..end]
    }

    /// Overwrites chunk `idx` with `words` (trailing bits must already be clear).
    pub fn set_chunk_words(&mut self, idx: u32, words: &[u64]) {
        let start = idx as usize * WORDS_PER_CHUNK;
        self.words[start..start + words.len()].copy_from_slice(words);
    }

    /// Sets every region of chunk `idx`.
    pub fn fill_chunk(&mut self, idx: u32) {
        let start = idx as u64 * BITS_PER_CHUNK;
        let end = (start + BITS_PER_CHUNK).min(self.len);
        self.set_range(start..end);
    }

    /// Encodes chunk `idx` in the on-disk/wire chunk format.
    pub fn encode_chunk(&self, idx: u32, tag: u32) -> Vec<u8> {
        encode_chunk(idx, tag, self.chunk_words(idx))
    }

    /// Decodes a chunk in the on-disk/wire format for a bitmap of `len` regions (CRC, magic, index
    /// range and trailing bits are checked; the uuid tag is not, as a peer's differs).
    pub fn decode_chunk(len: u64, bytes: &[u8]) -> Result<BitmapChunk, ChunkFault> {
        let index = check_chunk(bytes, None, None)?;
        let chunk_count = len.div_ceil(BITS_PER_CHUNK);
        if index as u64 >= chunk_count {
            return Err(ChunkFault::IndexOutOfRange { index, chunk_count });
        }
        let valid = (len - index as u64 * BITS_PER_CHUNK).min(BITS_PER_CHUNK);
        Ok(BitmapChunk {
            index,
            words: chunk_words(bytes, valid)?,
        })
    }

    /// Heap bytes used.
    pub fn heap_bytes(&self) -> u64 {
        (self.words.capacity() * 8) as u64
    }

    /// Raw words (LSB-first bit order).
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn set_ops_match_model(len in 1u64..70000, ops in proptest::collection::vec((any::<u64>(), any::<bool>()), 0..200)) {
            let mut b = DirtyBits::new(len);
            let mut m = BTreeSet::new();
            for (i, v) in ops {
                let i = i % len;
                b.set(i, v);
                if v { m.insert(i); } else { m.remove(&i); }
            }
            prop_assert_eq!(b.count_ones(), m.len() as u64);
            prop_assert_eq!(b.iter_ones().collect::<Vec<_>>(), m.iter().copied().collect::<Vec<_>>());
            let flat: Vec<u64> = b.ranges(usize::MAX).into_iter().flatten().collect();
            prop_assert_eq!(flat, m.iter().copied().collect::<Vec<_>>());
            for c in 0..b.chunk_count() as u32 {
                let enc = b.encode_chunk(c, 0);
                let dec = DirtyBits::decode_chunk(len, &enc).unwrap();
                prop_assert_eq!(dec.index, c);
                prop_assert_eq!(&dec.words[..], b.chunk_words(c));
            }
        }

        #[test]
        fn union_is_set_union(len in 1u64..70000, a in proptest::collection::vec(any::<u64>(), 0..50), b in proptest::collection::vec(any::<u64>(), 0..50)) {
            let mut x = DirtyBits::new(len);
            let mut y = DirtyBits::new(len);
            for i in &a { x.set(i % len, true); }
            for i in &b { y.set(i % len, true); }
            let before = x.clone();
            x.union_with(&y);
            for i in 0..len.min(1000) {
                prop_assert_eq!(x.get(i), before.get(i) || y.get(i));
            }
            let want: BTreeSet<u64> = a.iter().chain(&b).map(|i| i % len).collect();
            prop_assert_eq!(x.iter_ones().collect::<BTreeSet<_>>(), want);
        }
    }

    #[test]
    fn full_has_no_trailing_bits() {
        let b = DirtyBits::full(70);
        assert_eq!(b.count_ones(), 70);
        assert_eq!(b.words()[1], (1 << 6) - 1);
    }
}
