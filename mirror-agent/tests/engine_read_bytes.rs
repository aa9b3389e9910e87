//! `BlockEngine::read_bytes` (the NBD server's read path: pooled buffers,
//! page-cache fast path) returns exactly what `read` returns, for every
//! engine, aligned or not, cached or not, and fails the same way past the end.

use std::sync::Arc;

use bytes::Bytes;
use mirror_agent::engine::{self, BlockEngine, DirectIo, PortableEngine, UringEngine};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;

fn engines(path: &std::path::Path) -> Vec<Arc<dyn BlockEngine>> {
    vec![
        Arc::new(UringEngine::open(path, DirectIo::Off, 16).expect("uring buffered")),
        Arc::new(UringEngine::open(path, DirectIo::Auto, 16).expect("uring auto")),
        Arc::new(PortableEngine::open(path, 16).expect("portable")),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn read_bytes_matches_read_and_written_data() {
    let dir = tempfile::Builder::new()
        .prefix("read-bytes")
        .tempdir_in("/var/tmp")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir");
    let path = dir.path().join("data");
    engine::create_data_file(&path, SIZE).expect("create");
    let mut rng = StdRng::seed_from_u64(7);
    let mut model = vec![0u8; SIZE as usize];
    rng.fill(&mut model[..]);
    let writer = UringEngine::open(&path, DirectIo::Off, 16).expect("writer");
    writer
        .write(0, Bytes::from(model.clone()), true)
        .await
        .expect("fill");
    drop(writer);
    for e in engines(&path) {
        for _ in 0..200 {
            let len = match rng.gen_range(0..4) {
                0 => rng.gen_range(1..=8192),
                1 => 4096 * rng.gen_range(1..=16),
                2 => 1 << 20,
                _ => rng.gen_range(1..=3 << 20),
            };
            let off = rng.gen_range(0..=SIZE - len as u64);
            let got = e
                .read_bytes(off, len)
                .await
                .unwrap_or_else(|err| panic!("{}: read_bytes {off}+{len}: {err}", e.describe()));
            assert_eq!(got.len(), len, "{}", e.describe());
            assert!(
                got[..] == model[off as usize..off as usize + len],
                "{}: read_bytes {off}+{len} differs",
                e.describe()
            );
            let v = e.read(off, len).await.expect("read");
            assert!(
                v[..] == got[..],
                "{}: read and read_bytes differ at {off}+{len}",
                e.describe()
            );
        }
        // A write through the engine is seen by the next read_bytes (page
        // cache fast path and pooled buffers reused in between).
        let patch = vec![0x5au8; 12288];
        e.write(4096, Bytes::from(patch.clone()), false)
            .await
            .expect("write");
        model[4096..4096 + patch.len()].copy_from_slice(&patch);
        let got = e
            .read_bytes(0, 20480)
            .await
            .expect("read_bytes after write");
        assert!(got[..] == model[..20480], "{}", e.describe());
        let err = e.read_bytes(SIZE - 10, 11).await.expect_err("past the end");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{}", e.describe());
        assert!(e.read_bytes(SIZE, 0).await.expect("empty").is_empty());
    }
}
