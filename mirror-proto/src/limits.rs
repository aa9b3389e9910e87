//! Every bound the codec enforces before allocating or slicing. See docs/protocol.md §Limits.

/// Largest data block in one Write, ResyncData or BitmapChunk (32 MiB).
pub const MAX_DATA_LEN: usize = 32 * 1024 * 1024;
/// Slack on top of [`MAX_DATA_LEN`] for the fixed fields of data-carrying frames.
pub const PAYLOAD_SLACK: usize = 64;
/// Absolute payload bound for any frame: [`MAX_DATA_LEN`] + [`PAYLOAD_SLACK`].
pub const MAX_PAYLOAD: usize = MAX_DATA_LEN + PAYLOAD_SLACK;
/// Longest node / cluster / resource name in bytes (u8 length prefix).
pub const MAX_NAME_LEN: usize = 255;
/// Longest Error message text in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 4096;
/// Most entries in a generation history list.
pub const MAX_GENERATION_HISTORY: usize = 16;
/// Most entries in Hello's supported-versions list.
pub const MAX_VERSIONS: usize = 16;
/// Most (region, checksum) pairs in a ChecksumRequest / ChecksumReply.
pub const MAX_CHECKSUM_ENTRIES: usize = 8192;
/// Longest Control JSON text in bytes (64 KiB).
pub const MAX_CONTROL_LEN: usize = 64 * 1024;
/// Length of an authentication nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 authentication response.
pub const MAC_LEN: usize = 32;

/// Fixed fields of Write: offset u64 + length u32.
pub(crate) const WRITE_FIXED: usize = 12;
/// Fixed fields of ResyncData: offset u64 + checksum u32 + length u32.
pub(crate) const RESYNC_DATA_FIXED: usize = 16;
/// Fixed fields of BitmapChunk: chunk_index, total_chunks, region_size, region_count (u32 each) + first_region u64.
pub(crate) const BITMAP_FIXED: usize = 24;
/// Encoded generation block at its largest: current, bitmap, count u8, history.
pub(crate) const GENERATION_MAX_LEN: usize = 8 + 8 + 1 + 8 * MAX_GENERATION_HISTORY;
/// Hello payload at its largest.
pub(crate) const HELLO_MAX_PAYLOAD: usize =
    1 + MAX_VERSIONS + 3 * (1 + MAX_NAME_LEN) + 8 + 4 + 1 + 1 + 2 + GENERATION_MAX_LEN;

const _: () = assert!(WRITE_FIXED <= PAYLOAD_SLACK);
const _: () = assert!(RESYNC_DATA_FIXED <= PAYLOAD_SLACK);
const _: () = assert!(BITMAP_FIXED <= PAYLOAD_SLACK);
const _: () = assert!(HELLO_MAX_PAYLOAD <= MAX_PAYLOAD);
const _: () = assert!(16 + 12 * MAX_CHECKSUM_ENTRIES <= MAX_PAYLOAD);
