//! Model check: random sequences of writes, reads, discards, write-zeroes
//! and flushes against every engine behave exactly like a byte array.
//! Sizes and offsets are arbitrary (mostly unaligned), so the O_DIRECT
//! engine's read-modify-write and zero-buffer fallbacks are covered too.

use std::sync::Arc;

use bytes::Bytes;
use mirror_agent::engine::{self, BlockEngine, DirectIo, PortableEngine, UringEngine};
use proptest::prelude::*;

const SIZE: u64 = 256 << 10;

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: usize,
        seed: u8,
        fua: bool,
    },
    Read {
        off: u64,
        len: usize,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Zeroes {
        off: u64,
        len: u64,
        trim: bool,
    },
    Flush,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (
        0..SIZE,
        prop_oneof![1u64..600, 1u64..20_000, Just(4096u64), Just(512u64)],
    )
        .prop_map(|(off, len)| (off, len.min(SIZE - off)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>(), any::<bool>()).prop_map(|((off, len), seed, fua)| Op::Write { off, len: len as usize, seed, fua }),
        2 => range().prop_map(|(off, len)| Op::Read { off, len: len as usize }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), trim)| Op::Zeroes { off, len, trim }),
        1 => Just(Op::Flush),
    ]
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8) | 1)
        .collect()
}

async fn run(e: Arc<dyn BlockEngine>, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = vec![0u8; SIZE as usize];
    for op in ops {
        match *op {
            Op::Write {
                off,
                len,
                seed,
                fua,
            } => {
                let d = data(seed, len);
                e.write(off, Bytes::from(d.clone()), fua)
                    .await
                    .map_err(|err| TestCaseError::fail(format!("{op:?}: {err}")))?;
                model[off as usize..off as usize + len].copy_from_slice(&d);
            }
            Op::Read { off, len } => {
                let got = e
                    .read(off, len)
                    .await
                    .map_err(|err| TestCaseError::fail(format!("{op:?}: {err}")))?;
                prop_assert!(
                    got == model[off as usize..off as usize + len],
                    "{:?} returned wrong data",
                    op
                );
            }
            Op::Discard { off, len } => {
                e.discard(off, len)
                    .await
                    .map_err(|err| TestCaseError::fail(format!("{op:?}: {err}")))?;
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Zeroes { off, len, trim } => {
                e.write_zeroes(off, len, trim, false)
                    .await
                    .map_err(|err| TestCaseError::fail(format!("{op:?}: {err}")))?;
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => e
                .flush()
                .await
                .map_err(|err| TestCaseError::fail(format!("{op:?}: {err}")))?,
        }
    }
    let all = e
        .read(0, SIZE as usize)
        .await
        .map_err(|err| TestCaseError::fail(format!("final read: {err}")))?;
    if let Some(i) = all.iter().zip(&model).position(|(a, b)| a != b) {
        return Err(TestCaseError::fail(format!(
            "final content differs first at byte {i}"
        )));
    }
    Ok(())
}

fn check(
    open: fn(&std::path::Path) -> Arc<dyn BlockEngine>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let dir = tempfile::Builder::new()
        .prefix("engine-model")
        .tempdir_in("/var/tmp")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir");
    let path = dir.path().join("data");
    engine::create_data_file(&path, SIZE).expect("create");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(open(&path), ops))
}

fn uring_direct(p: &std::path::Path) -> Arc<dyn BlockEngine> {
    Arc::new(UringEngine::open(p, DirectIo::On, 8).expect("io_uring O_DIRECT"))
}
fn uring_buffered(p: &std::path::Path) -> Arc<dyn BlockEngine> {
    Arc::new(UringEngine::open(p, DirectIo::Off, 8).expect("io_uring buffered"))
}
fn portable(p: &std::path::Path) -> Arc<dyn BlockEngine> {
    Arc::new(PortableEngine::open(p, 8).expect("portable"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn uring_direct_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        check(uring_direct, &ops)?;
    }

    #[test]
    fn uring_buffered_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        check(uring_buffered, &ops)?;
    }

    #[test]
    fn portable_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        check(portable, &ops)?;
    }
}
