//! Property test: random request sequences (valid and invalid) against a
//! model written from the spec's rules. Every reply carries the errno the
//! model predicts, the connection never desynchronises, and the volume ends
//! up exactly as the model's.

mod nbd_common;

use mirror_agent::nbd::testing::MemEngine;
use mirror_agent::nbd::{BlockSizes, Export, Limits, NbdServer};
use nbd_common::*;
use proptest::prelude::*;

const SIZE: u64 = 256 * 1024;
const MAX: u32 = 64 * 1024;

#[derive(Debug, Clone)]
struct Req {
    kind: u16,
    flags: u16,
    offset: u64,
    len: u32,
    seed: u8,
}

fn req() -> impl Strategy<Value = Req> {
    let kind = prop_oneof![
        4 => Just(CMD_WRITE),
        3 => Just(CMD_READ),
        1 => Just(CMD_TRIM),
        1 => Just(CMD_WRITE_ZEROES),
        1 => Just(CMD_FLUSH),
        1 => prop_oneof![Just(5u16), Just(7), Just(8), Just(200)],
    ];
    let flags = prop_oneof![
        6 => Just(0u16),
        2 => Just(FLAG_FUA),
        1 => Just(FLAG_NO_HOLE),
        1 => Just(FLAG_DF),
        1 => Just(0x0100u16),
    ];
    // Mostly aligned, in range; sometimes unaligned or past the end.
    let offset = prop_oneof![
        8 => (0..SIZE / 512).prop_map(|b| b * 512),
        1 => 0..SIZE + 4096,
        1 => Just(u64::MAX - 1023),
    ];
    let len = prop_oneof![
        8 => (1u32..=16).prop_map(|b| b * 512),
        1 => Just(0u32),
        1 => 1u32..2000,
        1 => Just(MAX + 512),
    ];
    (kind, flags, offset, len, any::<u8>()).prop_map(|(kind, flags, offset, len, seed)| {
        let (offset, len) = if kind == CMD_FLUSH && flags != 0x0100 {
            (0, 0)
        } else {
            (offset, len)
        };
        Req {
            kind,
            flags,
            offset,
            len,
            seed,
        }
    })
}

/// The spec's errno for a request (same check order as documented by the server).
fn expected_errno(r: &Req, structured: bool) -> u32 {
    let allowed = match r.kind {
        CMD_READ if structured => FLAG_FUA | FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => FLAG_FUA,
        CMD_WRITE_ZEROES => FLAG_FUA | FLAG_NO_HOLE,
        _ => return EINVAL,
    };
    if r.flags & !allowed != 0 {
        return EINVAL;
    }
    if r.kind == CMD_FLUSH {
        return if r.offset == 0 && r.len == 0 {
            0
        } else {
            EINVAL
        };
    }
    if r.len == 0 || !r.offset.is_multiple_of(512) || !r.len.is_multiple_of(512) {
        return EINVAL;
    }
    if r.kind != CMD_TRIM && r.len > MAX {
        return EINVAL;
    }
    let beyond = r.offset.checked_add(r.len as u64).is_none_or(|e| e > SIZE);
    if beyond {
        return if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
    }
    0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_requests_match_model(reqs in proptest::collection::vec(req(), 1..40), structured: bool) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let engine = MemEngine::new(SIZE as usize);
            let mut e = Export::new("md1", engine.clone());
            e.block_sizes = BlockSizes { minimum: 512, preferred: 4096, maximum: MAX };
            let srv = NbdServer::new(vec![e], Limits::default()).unwrap();
            let (s, _h) = pair(&srv);
            let mut c = Client::connect(s, structured).await;
            let mut model = vec![0u8; SIZE as usize];
            for (i, r) in reqs.iter().enumerate() {
                let handle = i as u64 + 1;
                let payload = if r.kind == CMD_WRITE { pattern(r.seed, r.len as usize) } else { Vec::new() };
                c.request(r.flags, r.kind, handle, r.offset, r.len, &payload).await;
                let reply = c.recv().await;
                let want = expected_errno(r, structured);
                assert_eq!((reply.handle, reply.error), (handle, want), "request {r:?}");
                if want == 0 {
                    let range = r.offset as usize..(r.offset + r.len as u64) as usize;
                    match r.kind {
                        CMD_WRITE => model[range].copy_from_slice(&payload),
                        CMD_TRIM | CMD_WRITE_ZEROES => model[range].fill(0),
                        CMD_READ => assert_eq!(reply.data.as_deref(), Some(&model[range]), "read {r:?}"),
                        _ => {}
                    }
                } else {
                    assert!(reply.data.is_none());
                }
            }
            assert_eq!(engine.snapshot(), model);
            c.disconnect().await;
        });
    }
}
