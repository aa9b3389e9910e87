//! Interoperability with real NBD clients (libnbd's `nbdinfo`/`nbdcopy`,
//! `qemu-io`) against the in-process server on a unix socket.
//!
//! A client binary that is not installed makes its test print a notice and
//! return; on the development machines all three are in /usr/bin.

mod nbd_common;

use std::path::Path;
use std::process::Command;

use mirror_agent::nbd::Limits;
use nbd_common::*;

const SIZE: u64 = 8 << 20;

fn have(bin: &str) -> bool {
    let ok = Path::new("/usr/bin").join(bin).exists();
    if !ok {
        eprintln!("{bin} not installed; skipping");
    }
    ok
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///md1?socket={}", sock.display())
}

/// Runs a client command off the runtime threads and returns its stdout.
async fn run(cmd: &str, args: Vec<String>) -> String {
    let cmd = cmd.to_owned();
    let out = within(tokio::task::spawn_blocking(move || {
        Command::new(&cmd).args(&args).output().unwrap()
    }))
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}\nstdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_sees_export_and_flags() {
    if !have("nbdinfo") {
        return;
    }
    let te = make_engine(SIZE);
    let srv = server_with(te.engine.clone(), Limits::default());
    let l = listen(&srv);
    let json = run("nbdinfo", vec!["--json".into(), uri(&l.path)]).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "md1");
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["description"], "test resource md1");
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_df"], true);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(v["protocol"], "newstyle-fixed");

    let list = run(
        "nbdinfo",
        vec![
            "--list".into(),
            "--json".into(),
            format!("nbd+unix://?socket={}", l.path.display()),
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v["exports"][0]["export-name"], "md1");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_reads_and_flushes() {
    if !have("qemu-io") {
        return;
    }
    let te = make_engine(SIZE);
    let srv = server_with(te.engine.clone(), Limits::default());
    let l = listen(&srv);
    let args: Vec<String> = [
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -P 0xcd 1M 4k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0xcd 1M 4k",
        "-c",
        "read -P 0 64k 64k",
        "-c",
        "discard 1M 4k",
        "-c",
        "read -P 0 1M 4k",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([uri(&l.path)])
    .collect();
    let out = run("qemu-io", args).await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(te.engine.read(0, 65536).await.unwrap(), vec![0xab; 65536]);
    assert_eq!(te.engine.read(1 << 20, 4096).await.unwrap(), vec![0; 4096]);
    assert!(srv.stats().written_bytes >= 65536 + 4096);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_roundtrip_multi_conn() {
    if !have("nbdcopy") {
        return;
    }
    let te = make_engine(SIZE);
    let srv = server_with(te.engine.clone(), Limits::default());
    let l = listen(&srv);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    // Data with zero runs, so nbdcopy uses both writes and write-zeroes.
    let mut img = pattern(3, SIZE as usize);
    img[(1 << 20)..(3 << 20)].fill(0);
    std::fs::write(&src, &img).unwrap();
    std::fs::write(&back, b"").unwrap();
    run(
        "nbdcopy",
        vec![
            "--connections=4".into(),
            "--requests=16".into(),
            src.display().to_string(),
            uri(&l.path),
        ],
    )
    .await;
    assert_eq!(te.engine.read(0, SIZE as usize).await.unwrap(), img);
    run(
        "nbdcopy",
        vec![
            "--connections=4".into(),
            uri(&l.path),
            back.display().to_string(),
        ],
    )
    .await;
    assert_eq!(std::fs::read(&back).unwrap(), img);
    within(srv.wait_idle()).await;
    assert_eq!(srv.stats().errors, 0);
    srv.shutdown().await;
}
