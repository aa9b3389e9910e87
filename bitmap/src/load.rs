//! Reading a cluster partition: choosing the superblock slot, the blank check, and loading the
//! bitmap chunks (a chunk that fails its checks is loaded as all dirty and reported).

use crate::bits::DirtyBits;
use crate::error::{MetaError, Result};
use crate::layout::{
    check_chunk, check_slot, chunk_words, uuid_tag, ChunkFault, Geometry, SlotStatus, Superblock,
    BITMAP_OFFSET, CHUNK_SIZE, SB_SLOT_SIZE,
};
use crate::storage::MetaStorage;
use std::fmt;

/// Chunks read per I/O when loading the bitmap (1 MiB).
pub(crate) const CHUNKS_PER_IO: u64 = 256;

/// What `open` found and repaired or ignored while loading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// Slot the superblock was loaded from.
    pub chosen_slot: usize,
    /// Its sequence number.
    pub seq: u64,
    /// Status of both slots (magic/CRC check).
    pub slots: [SlotStatus; 2],
    /// The other slot, if it was unusable, with why (it is rewritten by the next superblock update).
    pub ignored_slot: Option<(usize, String)>,
    /// Bitmap chunks that failed their checks; all their regions were loaded as dirty.
    pub bad_chunks: Vec<(u32, ChunkFault)>,
}

impl LoadReport {
    /// True if nothing was ignored or repaired.
    pub fn is_clean(&self) -> bool {
        self.ignored_slot.is_none() && self.bad_chunks.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "superblock from slot {} (seq {})",
            self.chosen_slot, self.seq
        )?;
        if let Some((slot, why)) = &self.ignored_slot {
            write!(f, "; ignored slot {slot}: {why}")?;
        }
        if !self.bad_chunks.is_empty() {
            write!(
                f,
                "; {} bitmap chunk(s) failed checks and were loaded as all dirty:",
                self.bad_chunks.len()
            )?;
            for (i, fault) in &self.bad_chunks {
                write!(f, " [chunk {i}: {fault}]")?;
            }
        }
        Ok(())
    }
}

/// A superblock chosen from the two slots.
#[derive(Debug)]
pub(crate) struct ChosenSuperblock {
    pub sb: Superblock,
    pub slots: [SlotStatus; 2],
    pub chosen: usize,
    pub ignored: Option<(usize, String)>,
}

pub(crate) fn read_slots<S: MetaStorage + ?Sized>(st: &mut S) -> Result<(u64, Vec<u8>)> {
    let len = st.len().map_err(|e| MetaError::io("size query", 0, 0, e))?;
    if len < BITMAP_OFFSET {
        return Err(MetaError::TooSmall {
            len,
            need: BITMAP_OFFSET,
            what: "the two superblock slots".into(),
        });
    }
    let mut buf = vec![0u8; 2 * SB_SLOT_SIZE];
    st.read_at(0, &mut buf)
        .map_err(|e| MetaError::io("read superblock slots", 0, buf.len() as u64, e))?;
    Ok((len, buf))
}

/// Scans `from..len` for a non-zero byte.
pub(crate) fn first_nonzero<S: MetaStorage + ?Sized>(
    st: &mut S,
    from: u64,
    len: u64,
) -> Result<Option<u64>> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = from;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        st.read_at(off, &mut buf[..n])
            .map_err(|e| MetaError::io("read (blank check)", off, n as u64, e))?;
        if let Some(p) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(off + p as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

/// Chooses the superblock: among slots with good magic and CRC the highest sequence number wins.
/// If that slot's contents are unusable the load fails (never falls back to older state).
pub(crate) fn read_superblock<S: MetaStorage + ?Sized>(st: &mut S) -> Result<ChosenSuperblock> {
    let (len, buf) = read_slots(st)?;
    let slot_bytes = |i: usize| &buf[i * SB_SLOT_SIZE..(i + 1) * SB_SLOT_SIZE];
    let slots = [check_slot(slot_bytes(0)), check_slot(slot_bytes(1))];
    if slots.iter().all(|s| *s == SlotStatus::Zero) {
        return match first_nonzero(st, BITMAP_OFFSET, len)? {
            None => Err(MetaError::Blank),
            Some(offset) => Err(MetaError::ZeroSuperblocksNotBlank { offset }),
        };
    }
    let seq_of = |s: &SlotStatus| match s {
        SlotStatus::Valid { seq, .. } => Some(*seq),
        _ => None,
    };
    let chosen = match (seq_of(&slots[0]), seq_of(&slots[1])) {
        (None, None) => {
            let [slot0, slot1] = slots;
            return Err(MetaError::NoValidSuperblock { slot0, slot1 });
        }
        (Some(_), None) => 0,
        (None, Some(_)) => 1,
        (Some(a), Some(b)) => usize::from(b > a),
    };
    let sb = Superblock::parse(slot_bytes(chosen)).map_err(|reason| MetaError::BadSuperblock {
        slot: chosen,
        seq: seq_of(&slots[chosen]).unwrap_or_default(),
        reason,
    })?;
    let other = 1 - chosen;
    let ignored = match &slots[other] {
        SlotStatus::Valid { .. } => Superblock::parse(slot_bytes(other))
            .err()
            .map(|why| (other, format!("unusable contents: {why}"))),
        s => Some((other, s.to_string())),
    };
    Ok(ChosenSuperblock {
        sb,
        slots,
        chosen,
        ignored,
    })
}

/// Loads every bitmap chunk; a chunk failing any check becomes all dirty and is reported.
pub(crate) fn read_bitmap<S: MetaStorage + ?Sized>(
    st: &mut S,
    sb: &Superblock,
) -> Result<(DirtyBits, Vec<(u32, ChunkFault)>)> {
    let g: Geometry = sb.geometry;
    let len = st.len().map_err(|e| MetaError::io("size query", 0, 0, e))?;
    let need = g.required_partition_size();
    if len < need {
        return Err(MetaError::TooSmall {
            len,
            need,
            what: format!(
                "the bitmap of {} regions ({} chunks)",
                g.region_count, g.chunk_count
            ),
        });
    }
    let tag = uuid_tag(&sb.identity.uuid);
    let mut bits = DirtyBits::new(g.region_count);
    let mut bad = Vec::new();
    let mut buf = vec![0u8; (CHUNKS_PER_IO as usize) * CHUNK_SIZE];
    let mut idx = 0u64;
    while idx < g.chunk_count {
        let n = (g.chunk_count - idx).min(CHUNKS_PER_IO);
        let bytes = &mut buf[..n as usize * CHUNK_SIZE];
        let off = Geometry::chunk_offset(idx);
        st.read_at(off, bytes)
            .map_err(|e| MetaError::io("read bitmap chunks", off, bytes.len() as u64, e))?;
        for k in 0..n {
            let c = (idx + k) as u32;
            let chunk = &bytes[k as usize * CHUNK_SIZE..(k as usize + 1) * CHUNK_SIZE];
            let res = check_chunk(chunk, Some(c), Some(tag))
                .and_then(|_| chunk_words(chunk, g.bits_in_chunk(c as u64)));
            match res {
                Ok(words) => bits.set_chunk_words(c, &words),
                Err(fault) => {
                    // Fail safe: an unreadable chunk may have held dirty bits.
                    bits.fill_chunk(c);
                    bad.push((c, fault));
                }
            }
        }
        idx += n;
    }
    Ok((bits, bad))
}
