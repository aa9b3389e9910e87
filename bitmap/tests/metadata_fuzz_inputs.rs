//! The `metadata` fuzz target's body ([`fuzz_metadata`]) on generated inputs, so that every
//! test run checks what the fuzzer checks: superblock slots, bitmap chunks and whole cluster
//! partitions with arbitrary contents (behind correct checksums, or not) are refused or
//! accepted, never a panic; what decodes re-encodes to the same thing. The fuzzer itself
//! lives in `bitmap/fuzz`.

use bitmap::testing::fuzz_metadata;
use proptest::prelude::*;

/// An edit record as `fuzz_metadata` reads it: offset / 64 (u16 le), length, bytes.
fn edit() -> impl Strategy<Value = Vec<u8>> {
    // Offsets in the superblock slots, the first chunk header, or anywhere.
    let at = prop_oneof![0u16..64, 128u16..129, 192u16..193, any::<u16>()];
    (at, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(at, bytes)| {
        let mut e = at.to_le_bytes().to_vec();
        e.push(bytes.len() as u8);
        e.extend_from_slice(&bytes);
        e
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, failure_persistence: None, ..ProptestConfig::default() })]

    /// Edited partitions, checksums resealed or not.
    #[test]
    fn edited_partitions(mode in any::<u8>(), edits in prop::collection::vec(edit(), 0..8)) {
        let mut input = vec![mode];
        for e in &edits {
            input.extend_from_slice(e);
        }
        fuzz_metadata(&input);
    }

    /// Plain random bytes.
    #[test]
    fn random_bytes(input in prop::collection::vec(any::<u8>(), 0..600)) {
        fuzz_metadata(&input);
    }
}
