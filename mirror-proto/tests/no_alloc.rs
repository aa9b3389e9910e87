//! `check` never allocates, and oversized headers are rejected without allocating — measured
//! with a counting global allocator (per thread, so other test threads do not interfere).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{Bytes, BytesMut};
use common::*;
use mirror_proto::*;
use proptest::prelude::*;

struct Counting;

thread_local! {
    // const-initialized Cell without destructor: safe to touch from inside the allocator.
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
    static ALLOC_BYTES: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    ALLOCS.with(|c| c.set(c.get() + 1));
    ALLOC_BYTES.with(|c| c.set(c.get() + bytes));
}

// SAFETY: forwards every call unchanged to the system allocator; only bumps a counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as our caller's: layout has non-zero size.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was returned by System.alloc/realloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: forwarded unchanged; caller guarantees the realloc contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f`, returning its result and the number of allocations it made.
fn allocs_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let ((r, n), _) = alloc_stats(f);
    (r, n)
}

/// Runs `f`, returning its result, allocation count and allocated bytes.
fn alloc_stats<T>(f: impl FnOnce() -> T) -> ((T, usize), usize) {
    let before = (ALLOCS.with(Cell::get), ALLOC_BYTES.with(Cell::get));
    let r = f();
    (
        (r, ALLOCS.with(Cell::get) - before.0),
        ALLOC_BYTES.with(Cell::get) - before.1,
    )
}

#[test]
fn counter_works() {
    let (_v, n) = allocs_during(|| vec![1u8; 10]);
    assert!(n >= 1, "the counting allocator must see allocations");
}

#[test]
fn four_gib_header_rejected_without_allocating() {
    let mut h = raw_frame(1, MessageKind::Write.as_u8(), 0, 1, &[]);
    h[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    fix_header_crc(&mut h);
    let bytes = Bytes::from(h);
    let mut buf = BytesMut::from(&bytes[..]);
    buf.reserve(64); // make sure the decoder has no reason to grow the buffer itself
    let mut dec = Decoder::new();

    let (r, n) = allocs_during(|| check(&bytes));
    assert!(matches!(r, Err(ProtoError::TooLarge { .. })));
    assert_eq!(n, 0, "check allocated");
    let (r, n) = allocs_during(|| Frame::parse(&bytes));
    assert!(matches!(r, Err(ProtoError::TooLarge { .. })));
    assert_eq!(n, 0, "parse allocated");
    let (r, n) = allocs_during(|| dec.decode(&mut buf));
    assert!(matches!(r, Err(ProtoError::TooLarge { .. })));
    assert_eq!(n, 0, "decoder allocated");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// check() allocates nothing on valid frames (any prefix) nor on arbitrary bytes.
    #[test]
    fn check_never_allocates(frame in arb_frame(), junk in prop::collection::vec(any::<u8>(), 0..300)) {
        let wire = encode(&frame);
        for n in [0, 1, HEADER_LEN - 1, HEADER_LEN, wire.len() / 2, wire.len()] {
            let n = n.min(wire.len());
            let (_, count) = allocs_during(|| check(&wire[..n]));
            prop_assert_eq!(count, 0);
        }
        let (_, count) = allocs_during(|| check(&junk));
        prop_assert_eq!(count, 0);
        // Parsing data frames never copies the data: at most the `bytes` crate's one small
        // shared-refcount header when a Vec-backed buffer is first sliced, independent of size.
        if matches!(frame.msg, Message::Write { .. } | Message::ResyncData { .. } | Message::BitmapChunk(_)) {
            let ((r, count), bytes) = alloc_stats(|| Frame::parse(&wire));
            prop_assert_eq!(&r?, &frame);
            prop_assert!(count <= 1 && bytes <= 64, "parse allocated {} times, {} bytes", count, bytes);
        }
        if matches!(frame.msg, Message::Ping { .. } | Message::Ack2 { .. } | Message::Flush) {
            let (r, count) = allocs_during(|| Frame::parse(&wire));
            prop_assert_eq!(&r?, &frame);
            prop_assert_eq!(count, 0, "fixed-size parse allocated");
        }
    }
}
