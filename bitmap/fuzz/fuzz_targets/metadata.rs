//! Fuzz target `metadata`: superblock slots, bitmap chunks and whole cluster partitions built
//! from arbitrary bytes (behind correct checksums, or not). The checks are in
//! `bitmap::testing::fuzz_metadata`: no panic, and what decodes re-encodes to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bitmap::testing::fuzz_metadata(data);
});
