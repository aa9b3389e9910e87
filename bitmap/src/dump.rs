//! Human-readable dump of a cluster partition (for `mdctrl dump-md`): both slots raw, the chosen
//! superblock, and a bitmap summary. Reads only; never fails on content, only on I/O.

use crate::error::{MetaError, Result};
use crate::layout::{
    check_slot, ChunkFault, SlotStatus, Superblock, SB_SLOT_OFFSETS, SB_SLOT_SIZE,
};
use crate::load::{read_bitmap, read_slots, read_superblock};
use crate::storage::MetaStorage;
use std::fmt;
use std::ops::Range;

/// One superblock slot as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotDump {
    /// Byte offset of the slot.
    pub offset: u64,
    /// Magic/CRC status (with stored and computed CRC).
    pub status: SlotStatus,
    /// The decoded superblock if the slot is valid and parses.
    pub superblock: Option<Superblock>,
    /// Why a CRC-valid slot does not parse.
    pub parse_error: Option<String>,
}

/// Everything `dump` found.
#[derive(Clone, Debug)]
pub struct DumpReport {
    /// Storage size in bytes.
    pub storage_len: u64,
    /// Both slots.
    pub slots: Vec<SlotDump>,
    /// Why no superblock could be chosen (blank, both bad, ...), if so.
    pub error: Option<String>,
    /// Slot chosen by `open`'s rule.
    pub chosen_slot: Option<usize>,
    /// The chosen superblock.
    pub superblock: Option<Superblock>,
    /// Dirty regions (bad chunks count as all dirty).
    pub dirty_count: u64,
    /// First dirty region ranges (region indices, end exclusive).
    pub dirty_ranges: Vec<Range<u64>>,
    /// True if more dirty ranges exist than listed.
    pub more_ranges: bool,
    /// Chunks that failed their checks.
    pub bad_chunks: Vec<(u32, ChunkFault)>,
}

impl DumpReport {
    /// Dirty percentage (0 if no superblock).
    pub fn dirty_percent(&self) -> f64 {
        match &self.superblock {
            Some(sb) => self.dirty_count as f64 * 100.0 / sb.geometry.region_count as f64,
            None => 0.0,
        }
    }
}

/// Reads and describes a cluster partition without checking its identity.
pub fn dump<S: MetaStorage + ?Sized>(storage: &mut S, max_ranges: usize) -> Result<DumpReport> {
    let (storage_len, raw) = read_slots(storage)?;
    let slots = (0..2)
        .map(|i| {
            let bytes = &raw[i * SB_SLOT_SIZE..(i + 1) * SB_SLOT_SIZE];
            let status = check_slot(bytes);
            let (superblock, parse_error) = match status {
                SlotStatus::Valid { .. } => match Superblock::parse(bytes) {
                    Ok(sb) => (Some(sb), None),
                    Err(e) => (None, Some(e)),
                },
                _ => (None, None),
            };
            SlotDump {
                offset: SB_SLOT_OFFSETS[i],
                status,
                superblock,
                parse_error,
            }
        })
        .collect();
    let mut rep = DumpReport {
        storage_len,
        slots,
        error: None,
        chosen_slot: None,
        superblock: None,
        dirty_count: 0,
        dirty_ranges: Vec::new(),
        more_ranges: false,
        bad_chunks: Vec::new(),
    };
    let chosen = match read_superblock(storage) {
        Ok(c) => c,
        Err(e @ MetaError::Io { .. }) => return Err(e),
        Err(e) => {
            rep.error = Some(e.to_string());
            return Ok(rep);
        }
    };
    match read_bitmap(storage, &chosen.sb) {
        Ok((bits, bad)) => {
            rep.dirty_count = bits.count_ones();
            rep.dirty_ranges = bits.ranges(max_ranges.saturating_add(1));
            rep.more_ranges = rep.dirty_ranges.len() > max_ranges;
            rep.dirty_ranges.truncate(max_ranges);
            rep.bad_chunks = bad;
        }
        Err(e @ MetaError::Io { .. }) => return Err(e),
        Err(e) => rep.error = Some(e.to_string()),
    }
    rep.chosen_slot = Some(chosen.chosen);
    rep.superblock = Some(chosen.sb);
    Ok(rep)
}

fn fmt_time(t: u64) -> String {
    if t == 0 {
        "never".into()
    } else {
        format!("{t} (unix seconds)")
    }
}

impl fmt::Display for DumpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cluster partition: {} bytes", self.storage_len)?;
        for (i, s) in self.slots.iter().enumerate() {
            write!(f, "slot {i} @ {}: {}", s.offset, s.status)?;
            if let Some(e) = &s.parse_error {
                write!(f, " — unusable: {e}")?;
            }
            writeln!(f)?;
        }
        if let (Some(slot), Some(sb)) = (self.chosen_slot, &self.superblock) {
            let id = &sb.identity;
            let g = &sb.geometry;
            let st = &sb.state;
            writeln!(f, "chosen: slot {slot}, seq {}", sb.seq)?;
            writeln!(
                f,
                "resource: {}  node: {}  uuid: {}",
                id.resource, id.node, id.uuid
            )?;
            writeln!(
                f,
                "data partition: {} bytes, stable id {:?}",
                id.data_size,
                if id.data_stable_id.is_empty() {
                    "(none)"
                } else {
                    &id.data_stable_id
                }
            )?;
            writeln!(
                f,
                "volume: {} bytes, region size {} bytes, {} regions in {} chunks",
                g.volume_size, g.region_size, g.region_count, g.chunk_count
            )?;
            writeln!(
                f,
                "generations: current {:#018x} bitmap {:#018x} history [{}]",
                st.gens.current,
                st.gens.bitmap,
                st.gens
                    .history
                    .iter()
                    .map(|h| format!("{h:#018x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
            writeln!(f, "flags: {}", st.flags)?;
            writeln!(
                f,
                "created: {}  last update: {}  break: {} (times are informational only)",
                fmt_time(sb.created_time),
                fmt_time(sb.last_update_time),
                fmt_time(st.break_time)
            )?;
            writeln!(
                f,
                "dirty: {} of {} regions ({:.3}%)",
                self.dirty_count,
                g.region_count,
                self.dirty_percent()
            )?;
            for r in &self.dirty_ranges {
                let bytes_end = (r.end * g.region_size).min(g.volume_size);
                writeln!(
                    f,
                    "  regions {}..{} (bytes {}..{})",
                    r.start,
                    r.end,
                    r.start * g.region_size,
                    bytes_end
                )?;
            }
            if self.more_ranges {
                writeln!(f, "  ... more dirty ranges not shown")?;
            }
            for (c, fault) in &self.bad_chunks {
                writeln!(f, "bad chunk {c} (loaded as all dirty): {fault}")?;
            }
        }
        if let Some(e) = &self.error {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}
