//! The `nbd_session` fuzz target's body ([`fuzz_session`]) on generated inputs, so that
//! every test run checks what the fuzzer checks: a real NBD server fed hostile client
//! streams neither panics nor hangs, and nothing reaches the volume that the client did not
//! send as a whole, well-formed request. Inputs: request streams built from interesting
//! field values (valid and not, payloads whole or cut short) after a valid handshake, raw
//! handshakes, and plain random bytes. The fuzzer itself lives in `mirror-agent/fuzz`.

use mirror_agent::nbd::proto::{
    CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
    CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, IHAVEOPT, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, REQUEST_MAGIC,
};
use mirror_agent::nbd::testing::fuzz_session;
use proptest::prelude::*;

/// The fuzzed export's size (see `fuzz_session`).
const VOLUME: u64 = 256 << 10;

#[derive(Debug, Clone)]
struct Req {
    magic_ok: bool,
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    length: u32,
    /// Payload bytes actually sent after a WRITE header (may be fewer than `length`).
    payload: usize,
    fill: u8,
}

fn req() -> impl Strategy<Value = Req> {
    let flags = prop_oneof![
        Just(0u16),
        Just(CMD_FLAG_FUA),
        Just(CMD_FLAG_NO_HOLE),
        Just(CMD_FLAG_DF),
        Just(CMD_FLAG_REQ_ONE),
        any::<u16>()
    ];
    let kind = prop_oneof![
        4 => prop_oneof![
            Just(CMD_READ),
            Just(CMD_WRITE),
            Just(CMD_FLUSH),
            Just(CMD_TRIM),
            Just(CMD_WRITE_ZEROES),
            Just(CMD_BLOCK_STATUS)
        ],
        1 => Just(CMD_DISC),
        1 => any::<u16>()
    ];
    let offset = prop_oneof![
        Just(0u64),
        (0..VOLUME / 512).prop_map(|b| b * 512),
        0..VOLUME,
        Just(VOLUME - 512),
        Just(VOLUME),
        Just(u64::MAX - 511),
        any::<u64>()
    ];
    let length = prop_oneof![
        Just(0u32),
        Just(1u32),
        Just(512u32),
        Just(4096u32),
        1u32..70_000,
        Just(32 << 20),
        Just(u32::MAX),
        any::<u32>()
    ];
    (
        prop::bool::weighted(0.95),
        flags,
        kind,
        any::<u64>(),
        offset,
        length,
        any::<prop::sample::Index>(),
        prop::bool::weighted(0.8),
        any::<u8>(),
    )
        .prop_map(
            |(magic_ok, flags, kind, handle, offset, length, cut, whole, fill)| {
                let wanted = (length as usize).min(80_000);
                let payload = if whole { wanted } else { cut.index(wanted + 1) };
                Req {
                    magic_ok,
                    flags,
                    kind,
                    handle,
                    offset,
                    length,
                    payload,
                    fill,
                }
            },
        )
}

fn encode(reqs: &[Req]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in reqs {
        let magic = if r.magic_ok {
            REQUEST_MAGIC
        } else {
            REQUEST_MAGIC ^ 0x0100
        };
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&r.flags.to_be_bytes());
        out.extend_from_slice(&r.kind.to_be_bytes());
        out.extend_from_slice(&r.handle.to_be_bytes());
        out.extend_from_slice(&r.offset.to_be_bytes());
        out.extend_from_slice(&r.length.to_be_bytes());
        if r.kind == CMD_WRITE {
            out.extend(std::iter::repeat_n(r.fill, r.payload));
        }
    }
    out
}

/// Client-side handshake options, valid or not, for the raw-handshake mode.
fn option() -> impl Strategy<Value = Vec<u8>> {
    let code = prop_oneof![
        Just(OPT_EXPORT_NAME),
        Just(OPT_ABORT),
        Just(OPT_LIST),
        Just(OPT_INFO),
        Just(OPT_GO),
        Just(OPT_STRUCTURED_REPLY),
        Just(OPT_LIST_META_CONTEXT),
        Just(OPT_SET_META_CONTEXT),
        any::<u32>()
    ];
    let data = prop_oneof![
        Just(b"md1".to_vec()),
        Just(b"".to_vec()),
        Just(b"\x00\x00\x00\x03md1\x00\x01\x00\x03".to_vec()),
        Just(b"\x00\x00\x00\x09md1\x00\x00".to_vec()),
        Just(b"\x00\x00\x00\x03md1\x00\x00\x00\x01\x00\x00\x00\x0fbase:allocation".to_vec()),
        prop::collection::vec(any::<u8>(), 0..64)
    ];
    (code, data, prop::bool::weighted(0.9), any::<u32>()).prop_map(|(code, data, honest, len)| {
        let mut o = IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&code.to_be_bytes());
        let len = if honest { data.len() as u32 } else { len };
        o.extend_from_slice(&len.to_be_bytes());
        o.extend_from_slice(&data);
        o
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Request streams after a valid handshake (all handshake variants).
    #[test]
    fn request_streams(mode in any::<u8>(), reqs in prop::collection::vec(req(), 0..24)) {
        let mut input = vec![mode | 1];
        input.extend_from_slice(&encode(&reqs));
        fuzz_session(&input);
    }

    /// Raw handshakes: client flags, then options valid and not.
    #[test]
    fn raw_handshakes(
        flags in prop_oneof![Just(3u32), Just(1u32), Just(0u32), any::<u32>()],
        opts in prop::collection::vec(option(), 0..6),
        tail in prop::collection::vec(req(), 0..4),
    ) {
        let mut input = vec![0u8];
        input.extend_from_slice(&flags.to_be_bytes());
        for o in &opts {
            input.extend_from_slice(o);
        }
        input.extend_from_slice(&encode(&tail));
        fuzz_session(&input);
    }

    /// Plain random bytes, in both modes.
    #[test]
    fn random_bytes(input in prop::collection::vec(any::<u8>(), 0..2048)) {
        fuzz_session(&input);
    }
}

/// The harness catches what it must: a session whose only write is cut short applies
/// nothing, and one whole write is applied (so the check is not vacuous).
#[test]
fn truncated_write_applies_nothing_and_whole_write_is_seen() {
    let w = |payload| Req {
        magic_ok: true,
        flags: 0,
        kind: CMD_WRITE,
        handle: 7,
        offset: 4096,
        length: 4096,
        payload,
        fill: 0xAB,
    };
    for (payload, applied) in [(0, 0), (1, 0), (4095, 0), (4096, 1)] {
        let mut input = vec![1u8];
        input.extend_from_slice(&encode(&[w(payload)]));
        assert_eq!(fuzz_session(&input), applied, "payload {payload} of 4096");
    }
}
