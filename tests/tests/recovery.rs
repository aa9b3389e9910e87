//! Resync and recovery between two real agents (separate processes on temp
//! files): automatic recovery after a standby restart; `force` after the
//! active crashed (divergent regions saved); split brain resolved by `force`;
//! a resync interrupted by `kill -9` of the target and of the source resumes
//! without recopying; application writes during a resync; a differential
//! resync copies only the dirty regions; `break` / `recover --wait` and
//! `verify`; initial mirror construction of two new nodes by activating one. Every scenario ends by comparing both data files byte for byte.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tests::cluster::TestCluster;
use tests::data::{random_bytes, random_image, read_range, seed};
use tests::mirror::{in_sync, set_resource_key, set_timeouts, MirrorPair, PairOpts};
use tests::nbd_client::NbdClient;
use tests::run::describe;
use tests::wait::wait_until;

const REGION: u64 = 64 << 10;
const T: Duration = Duration::from_secs(30);

fn recovery_u64(s: &Value, key: &str) -> u64 {
    s["pair"]["recovery"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no pair.recovery.{key}: {s:#}"))
}

/// Scenario 1: Standby killed and restarted: automatic recovery, identical.
#[test]
fn standby_restart_recovers_automatically() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(16 << 20, &[]));
    p.activate("server1");
    p.fill("server1", 0, 2 << 20, 0xab);
    p.a2.kill9();
    p.fill("server1", 1 << 20, 128 << 10, 0x11);
    p.fill("server1", 10 << 20, 64 << 10, 0x22);
    p.a2.start_again();
    p.a2.wait_ready();
    let s = p.wait_recovered("server1", T);
    // The session's decision is reported while the recovery is pending; once
    // finished, the recovery row keeps the rule that chose it.
    assert_eq!(
        s["pair"]["recovery"]["rule"], "R14 ahead-differential",
        "{s:#}"
    );
    assert_eq!(s["pair"]["recovery"]["kind"], "differential", "{s:#}");
    assert_eq!(
        s["pair"]["recovery"]["direction"], "server1 -> server2",
        "{s:#}"
    );
    assert_eq!(s["color"], "GREEN", "{s:#}");
    assert!(recovery_u64(&s, "done_bytes") >= 192 << 10, "{s:#}");
    p.a1.assert_log_contains(
        "decision R14 ahead-differential: differential resync server1 -> server2",
    );
    p.wait_in_sync("server2", T);
    p.assert_identical();
    p.fill("server1", 3 << 20, 64 << 10, 0x33);
    p.assert_identical();
}

/// Scenario 2: Active crashes after writing alone; the standby is forced, activated
/// and written; the old active returns, is resynced and its divergent
/// regions are saved.
#[test]
fn force_after_active_crash_saves_divergent_regions() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(16 << 20, &[]));
    p.activate("server1");
    p.fill("server1", 0, 1 << 20, 0xab);
    p.a2.terminate();
    p.fill("server1", 8 << 20, 64 << 10, 0x77);
    p.a1.kill9();
    let _ = std::fs::remove_file(p.socket("server1"));
    p.a2.start_again();
    p.a2.wait_ready();
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 5);
    assert!(out.contains("force server2"), "no force hint: {out}");
    p.mdctrl_ok("server2", &["force", "server2", "md1"]);
    p.activate("server2");
    p.fill("server2", 4 << 20, 64 << 10, 0x55);
    p.a1.start_again();
    p.a1.wait_ready();
    let s = p.wait_recovered("server2", T);
    assert_eq!(
        s["pair"]["recovery"]["direction"], "server2 -> server1",
        "{s:#}"
    );
    p.assert_identical();
    assert_eq!(
        read_range(&p.data("server1"), 8 << 20, 4),
        vec![0; 4],
        "server1's lone write survived the resync"
    );
    let (img, regions) = p.saved_image("server1");
    p.assert_saved_region(&img, &regions, 8 << 20, 64 << 10, 0x77);
    p.expect_code("server1", &["activate", "md1", "--nomount"], 3);
}

/// Scenario 3: Split brain: both sides forced and written alone; on reunion both
/// are RED, activation is refused, `force server1` resolves it.
#[test]
fn split_brain_resolved_by_force() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(16 << 20, &[]));
    p.activate("server1");
    p.fill("server1", 0, 1 << 20, 0xab);
    p.deactivate("server1");
    p.wait_in_sync("server1", T);
    // server2 alone: forced, written.
    p.a1.kill9();
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 5);
    assert!(out.contains("force"), "{out}");
    p.mdctrl_ok("server2", &["force", "server2", "md1"]);
    p.activate("server2");
    p.fill("server2", 4 << 20, 64 << 10, 0x22);
    p.a2.kill9();
    let _ = std::fs::remove_file(p.socket("server2"));
    // server1 alone: forced, written.
    p.a1.start_again();
    p.a1.wait_ready();
    p.mdctrl_ok("server1", &["force", "server1", "md1"]);
    p.activate("server1");
    p.fill("server1", 6 << 20, 64 << 10, 0x11);
    p.deactivate("server1");
    // Heal.
    p.a2.start_again();
    p.a2.wait_ready();
    for n in ["server1", "server2"] {
        let s = p.wait_status(n, "split brain", T, |s| {
            s["pair"]["connection"] == "connected"
                && s["pair"]["sync"]
                    .as_str()
                    .unwrap_or("")
                    .to_lowercase()
                    .contains("split")
        });
        assert_eq!(s["color"], "RED", "{n}: {s:#}");
        assert!(
            s["next_step"].as_str().unwrap_or("").contains("force"),
            "{n}: {s:#}"
        );
    }
    for n in ["server1", "server2"] {
        let out = p.expect_code(n, &["activate", "md1", "--nomount"], 3);
        eprintln!("activate on {n} during split brain: {out}");
    }
    p.mdctrl_ok("server1", &["force", "server1", "md1"]);
    p.wait_recovered("server1", T);
    p.wait_in_sync("server2", T);
    p.assert_identical();
    assert!(read_range(&p.data("server2"), 6 << 20, 64 << 10)
        .iter()
        .all(|&b| b == 0x11));
    let (img, regions) = p.saved_image("server2");
    p.assert_saved_region(&img, &regions, 4 << 20, 64 << 10, 0x22);
}

/// Breaks the mirror by stopping server2 and dirties `dirty` bytes from 0
/// on server1 (active), then restarts server2; returns the first status
/// with a running recovery.
fn dirty_and_reconnect(p: &mut MirrorPair, dirty: u64) -> Value {
    p.activate("server1");
    p.a2.kill9();
    p.fill("server1", 0, dirty, 0x5a);
    p.a2.start_again();
    p.a2.wait_ready();
    // total_bytes is 0 until the copy set (the merged bitmap) is known.
    p.wait_status("server1", "a running recovery with its copy set", T, |s| {
        s["pair"]["recovery"]["total_bytes"].as_u64().unwrap_or(0) > 0
    })
}

/// Scenario 4a: kill -9 of the target mid-resync: it resumes without recopying, the
/// inconsistent target cannot be activated, the pair converges.
#[test]
fn resync_resumes_after_target_kill() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(
        64 << 20,
        &[("resync_rate", "\"8MiB\"")],
    ));
    let s = dirty_and_reconnect(&mut p, 32 << 20);
    let total = recovery_u64(&s, "total_bytes");
    assert!(total >= 32 << 20, "{s:#}");
    let s = p.wait_status("server1", "a third of the resync", T, |s| {
        s["pair"]["recovery"]["done_bytes"].as_u64().unwrap_or(0) >= total / 3
    });
    let done_before = recovery_u64(&s, "done_bytes");
    p.a2.kill9();
    p.a2.start_again();
    p.a2.wait_ready();
    let st = p.status("server2");
    assert_eq!(
        st["disk"]["consistent"], false,
        "target after kill mid-resync: {st:#}"
    );
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    assert!(
        out.contains("inconsistent"),
        "refusal does not name the inconsistent data: {out}"
    );
    let s = p.wait_status("server1", "the resumed recovery", T, |s| {
        s["pair"]["connection"] == "connected"
            && s["pair"]["recovery"]["total_bytes"]
                .as_u64()
                .is_some_and(|t| t < total)
    });
    let resumed_total = recovery_u64(&s, "total_bytes");
    eprintln!(
        "first total {total}, done before the kill {done_before}, resumed total {resumed_total}"
    );
    // Slack: regions copied but not yet cleared in the persistent bitmap
    // when the process died (bitmap clears are flushed lazily).
    assert!(
        resumed_total <= total - done_before + (2 << 20),
        "resumed resync recopies: first total {total}, {done_before} done before the kill, resumed total {resumed_total}"
    );
    p.wait_recovered("server1", Duration::from_secs(60));
    p.a1.assert_log_contains(
        "decision R3 resume-interrupted-resync: differential resync server1 -> server2",
    );
    p.wait_in_sync("server2", T);
    p.assert_identical();
}

/// Scenario 4b: kill -9 of the source (the active) mid-resync: after its
/// restart the interrupted resync resumes by itself (rule R3, neither node
/// active, as DRBD does) from the bitmaps without recopying; the cluster
/// manager then reactivates the source during the resumed resync, its writes
/// are ordered with the copies, and the pair converges.
#[test]
fn resync_resumes_after_source_kill() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(
        64 << 20,
        &[("resync_rate", "\"4MiB\"")],
    ));
    let s = dirty_and_reconnect(&mut p, 32 << 20);
    let total = recovery_u64(&s, "total_bytes");
    let s = p.wait_status("server1", "a third of the resync", T, |s| {
        s["pair"]["recovery"]["done_bytes"].as_u64().unwrap_or(0) >= total / 3
    });
    let done_before = recovery_u64(&s, "done_bytes");
    p.a1.kill9();
    let _ = std::fs::remove_file(p.socket("server1"));
    p.a1.start_again();
    p.a1.wait_ready();
    // Neither node is active: the interrupted resync resumes anyway (R3).
    let s = p.wait_status("server1", "the resumed recovery", T, |s| {
        s["pair"]["connection"] == "connected"
            && s["pair"]["recovery"]["total_bytes"]
                .as_u64()
                .is_some_and(|t| t > 0 && t < total)
    });
    let resumed_total = recovery_u64(&s, "total_bytes");
    eprintln!(
        "first total {total}, done before the kill {done_before}, resumed total {resumed_total}"
    );
    // Slack: regions copied but not yet cleared in the persistent bitmap
    // when the process died (bitmap clears are flushed lazily).
    assert!(
        resumed_total <= total - done_before + (2 << 20),
        "resumed resync recopies: first total {total}, {done_before} done before the kill, resumed total {resumed_total}"
    );
    p.a1.assert_log_contains(
        "decision R3 resume-interrupted-resync: differential resync server1 -> server2",
    );
    // The cluster manager reactivates the source while the resync runs; it
    // serves writes inside the copy set and outside it.
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    assert!(out.contains("inconsistent"), "{out}");
    p.activate("server1");
    p.fill("server1", 30 << 20, 1 << 20, 0x6b);
    p.fill("server1", 40 << 20, 1 << 20, 0x6c);
    let s = p.status("server1");
    assert!(
        s["pair"]["recovery"]["finished"] == false,
        "the writes did not happen during the resumed resync (too slow a machine?): {s:#}"
    );
    p.wait_recovered("server1", Duration::from_secs(60));
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    p.assert_identical();
}

/// Scenario 5: A client keeps writing hot regions while the recovery runs.
#[test]
fn writes_during_resync_converge() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(
        32 << 20,
        &[("resync_rate", "\"8MiB\"")],
    ));
    dirty_and_reconnect(&mut p, 16 << 20);
    let stop = Arc::new(AtomicBool::new(false));
    let sock = p.socket("server1");
    let res = p.c.resource().to_string();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = NbdClient::connect(&sock, &res).expect("NBD connect");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Hot regions inside the dirty set (still to copy or copied) and outside it.
                let off = [0u64, 5 << 20, 15 << 20, 20 << 20, 31 << 20][(n % 5) as usize]
                    + (n % 16) * 4096;
                let data = random_bytes(4096, n);
                assert_eq!(c.write(off, &data, false).expect("write"), 0);
                n += 1;
            }
            assert_eq!(c.flush().expect("flush"), 0);
            n
        })
    };
    p.wait_status("server1", "half of the resync", T, |s| {
        let r = &s["pair"]["recovery"];
        r["done_bytes"].as_u64().unwrap_or(0) * 2 >= r["total_bytes"].as_u64().unwrap_or(u64::MAX)
            || r["finished"] == true
    });
    // The target counts recopies of rewritten regions into its total too:
    // its progress never claims more done than there is to do.
    let mut target_samples = 0;
    p.wait_status("server2", "the target's view of the resync", T, |s| {
        let r = &s["pair"]["recovery"];
        if let (Some(done), Some(total)) = (r["done_bytes"].as_u64(), r["total_bytes"].as_u64()) {
            assert!(
                done <= total,
                "target progress {done} of {total} bytes: {r}"
            );
            target_samples += 1;
        }
        r["finished"] == true || in_sync(s)
    });
    eprintln!("target progress sampled {target_samples} times");
    p.wait_recovered("server1", Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().expect("writer");
    assert!(n > 10, "only {n} writes");
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    p.assert_identical();
}

/// Scenario 6: A differential resync of 1% dirty regions copies about 1% of the volume.
#[test]
fn differential_resync_copies_only_dirty_regions() {
    const VOL: u64 = 4 << 30;
    let mut p = MirrorPair::start(&PairOpts::sync_sized(VOL, &[("keep_dirty", "8")]));
    p.activate("server1");
    p.a2.kill9();
    let regions = VOL / REGION;
    let dirty = regions.div_ceil(100);
    {
        let mut c = p.connect("server1");
        let data = vec![0xc3u8; REGION as usize];
        for i in 0..dirty {
            let off = (i * (regions / dirty)) * REGION;
            assert_eq!(c.write(off, &data, false).expect("write"), 0);
        }
        assert_eq!(c.flush().expect("flush"), 0);
    }
    p.a2.start_again();
    p.a2.wait_ready();
    let s = p.wait_recovered("server1", Duration::from_secs(60));
    let copied = recovery_u64(&s, "done_bytes");
    eprintln!(
        "{dirty} of {regions} regions dirty, {copied} bytes copied ({:.3}% of the volume)",
        copied as f64 * 100.0 / VOL as f64
    );
    let lo = dirty * REGION;
    let hi = VOL * 15 / 1000 + 8 * REGION;
    assert!(
        (lo..=hi).contains(&copied),
        "copied {copied} bytes, expected within [{lo}, {hi}] (1% dirty of {VOL}): {s:#}"
    );
    assert!(VOL / 100 <= copied + REGION, "copied {copied} < 1%");
    p.wait_in_sync("server2", T);
    p.assert_identical();
}

/// Scenario 7: `break` then `recover --wait`; `verify` counts corrupted regions.
#[test]
fn break_recover_and_verify() {
    let p = MirrorPair::start(&PairOpts::sync_sized(16 << 20, &[]));
    p.activate("server1");
    p.fill("server1", 0, 2 << 20, 0xab);
    p.mdctrl_ok("server1", &["break", "md1"]);
    p.fill("server1", 5 << 20, 3 << 20, 0x99);
    p.wait_status("server2", "out of sync", T, |s| {
        s["pair"]["in_sync"] == false
    });
    p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    let out = p.mdctrl_ok("server2", &["recover", "md1", "--wait"]);
    assert!(out.contains("recovery finished"), "{out}");
    p.assert_identical();
    p.wait_in_sync("server1", T);
    let out = p.mdctrl_ok("server1", &["verify", "md1"]);
    assert!(out.contains("256 regions compared, 0 differ"), "{out}");
    // Corrupt 3 regions of the standby behind the agent's back.
    for off in [(1 << 20) + 10, 6 << 20, (15 << 20) + 5] {
        tests::data::overwrite(&p.data("server2"), off, 4, b'X');
    }
    let out = p.mdctrl_ok("server1", &["verify", "md1"]);
    assert!(out.contains("3 differ"), "{out}");
    let (a, b) = (p.data("server1"), p.data("server2"));
    wait_until("the repair resync to make both files identical", T, || {
        (std::fs::read(&a).expect("read") == std::fs::read(&b).expect("read")).then_some(())
    });
    p.wait_in_sync("server1", T);
    p.assert_identical();
    let out = p.mdctrl_ok("server1", &["verify", "md1"]);
    assert!(out.contains("0 differ"), "{out}");
}

/// `recover --wait` on a resync paced to ~2 s prints progress lines with a
/// bar, the bytes and the remaining time, then the end.
#[test]
fn recover_wait_shows_progress_with_a_bar() {
    let p = MirrorPair::start(&PairOpts::sync_sized(
        16 << 20,
        &[("resync_rate", "\"4MiB\"")],
    ));
    p.activate("server1");
    p.wait_in_sync("server1", T);
    p.mdctrl_ok("server1", &["break", "md1"]);
    p.fill("server1", 0, 8 << 20, 0x6b);
    let out = p.mdctrl_ok("server1", &["recover", "md1", "--wait"]);
    let progress: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("server1 -> server2 [") && l.contains("remain"))
        .collect();
    assert!(!progress.is_empty(), "no progress line with a bar:\n{out}");
    assert!(
        progress[0].contains('%') && progress[0].contains("MiB"),
        "{out}"
    );
    assert!(out.contains("recovery finished"), "{out}");
    p.wait_in_sync("server2", T);
    p.assert_identical();
}

/// `status --watch --json` prints a new line when the state changes (the
/// agent answers its `watch` request at the change): a break and the
/// recovery after it appear as they happen, and the watcher keeps running.
#[test]
fn status_watch_follows_break_and_recovery() {
    use std::io::BufRead;
    let p = MirrorPair::start(&PairOpts::sync_sized(16 << 20, &[]));
    p.activate("server1");
    p.wait_in_sync("server1", T);
    let mut child =
        p.c.mdctrl_cmd_on("server1", &["status", "md1", "--watch", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn mdctrl status --watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("--watch --json printed a line that is not JSON ({e}): {line}")
            });
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let next_matching = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = std::time::Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => continue,
                Err(e) => panic!("status --watch: no line showing {what} ({e})"),
            }
        }
    };
    let first = next_matching("the first status", &|_| true);
    assert_eq!(first["resource"], "md1", "{first:#}");
    p.mdctrl_ok("server1", &["break", "md1"]);
    next_matching("the mirror out of sync after `break`", &|v| {
        v["pair"]["in_sync"] == false
    });
    p.fill("server1", 0, 1 << 20, 0x5a);
    // What was written during the break is not on server2: the RPO meter ages it.
    let rpo_age = |v: &Value| v["pair"]["rpo"]["oldest_not_durable_ms"].as_u64();
    p.wait_status(
        "server1",
        "an RPO age for the writes made during the break",
        T,
        |v| rpo_age(v).unwrap_or(0) > 0,
    );
    p.mdctrl_ok("server1", &["recover", "md1"]);
    next_matching("the recovery finished and in sync", &|v| {
        v["pair"]["recovery"]["finished"] == true && v["pair"]["in_sync"] == true
    });
    // The resync copied them: nothing is missing on the peer any more.
    p.wait_status(
        "server1",
        "the RPO age back to 0 after the recovery",
        T,
        |v| rpo_age(v) == Some(0) && v["pair"]["replicating"] == true,
    );
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "status --watch exited on its own"
    );
    child.kill().expect("kill the watcher");
    let _ = child.wait();
    reader.join().expect("reader thread");
    p.assert_identical();
}

/// Scenario 8: Initial mirror construction. Two new nodes (`init` without
/// `--blank`) with different pre-existing contents: `activate` on server1
/// needs no force (rule R5: neither was ever written through the mirror), its
/// data becomes the source and the full copy to server2 (rule R6) starts by
/// itself while server1 serves writes; server2 cannot be activated meanwhile.
#[test]
fn initial_construction_by_activation() {
    let o = PairOpts::sync_sized(32 << 20, &[("resync_rate", "\"8MiB\"")]);
    let c = TestCluster::pair(o.cluster.clone());
    set_timeouts(&c, &o.timing);
    set_resource_key(&c, "mode", &format!("\"{}\"", o.mode));
    for (i, n) in ["server1", "server2"].into_iter().enumerate() {
        let out = c.mdctrl_on(n, &["init", c.resource()]);
        assert!(out.status.success(), "{}", describe("mdctrl init", &out));
        let path = c.data_path_on(n);
        let len = std::fs::metadata(&path).expect("data file").len();
        random_image(&path, len, seed("initial-construction") + i as u64);
    }
    assert_ne!(
        read_range(&c.data_path_on("server1"), 0, 1 << 20),
        read_range(&c.data_path_on("server2"), 0, 1 << 20),
        "pre-existing contents must differ"
    );
    let source_before = read_range(&c.data_path_on("server1"), 8 << 20, 1 << 20);
    let p = MirrorPair::start_on(c);
    let s = p.wait_status("server2", "the both-new decision", T, |s| {
        s["pair"]["decision"]
            .as_str()
            .is_some_and(|d| d.starts_with("R5 both-new"))
    });
    assert!(
        s["pair"]["auto_recovery"]
            .as_str()
            .unwrap_or("")
            .contains("mdctrl activate"),
        "status does not tell how to start the initial copy: {s:#}"
    );
    p.activate("server1");
    p.wait_status("server1", "the initial full copy", T, |s| {
        s["pair"]["recovery"]["total_bytes"].as_u64().unwrap_or(0) > 0
    });
    // The target is new, then inconsistent: never activatable while copied.
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    assert!(
        out.contains("inconsistent") || out.contains("server1 is active"),
        "refusal does not name the reason: {out}"
    );
    // Application writes during the initial copy, inside and across regions.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let sock = p.socket("server1");
        let res = p.c.resource().to_string();
        std::thread::spawn(move || {
            let mut c = NbdClient::connect(&sock, &res).expect("NBD connect");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = [0u64, 3 << 20, 17 << 20, 30 << 20][(n % 4) as usize] + (n % 40) * 4096;
                let data = random_bytes(8192, 1000 + n);
                assert_eq!(c.write(off, &data, false).expect("write"), 0);
                n += 1;
            }
            assert_eq!(c.flush().expect("flush"), 0);
            n
        })
    };
    let s = p.wait_recovered("server1", Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().expect("writer");
    assert!(n > 10, "only {n} writes during the initial copy");
    assert!(
        recovery_u64(&s, "total_bytes") >= 32 << 20,
        "not a full copy: {s:#}"
    );
    p.a1.assert_log_contains("decision R6 new-member: full resync server1 -> server2");
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    p.assert_identical();
    // server1's untouched pre-existing data is the mirror's content.
    assert_eq!(
        read_range(&p.data("server2"), 8 << 20, 1 << 20),
        source_before,
        "server2 does not hold server1's pre-existing data"
    );
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    assert!(out.contains("server1 is active"), "{out}");
}

/// Scenario 9: `mdctrl break` survives an agent restart (flag `OPERATOR_BREAK`
/// in the cluster partition): the restarted and reactivated node does not
/// start the automatic recovery; `recover` clears the flag and converges.
#[test]
fn operator_break_survives_restart() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(16 << 20, &[]));
    p.activate("server1");
    p.fill("server1", 0, 1 << 20, 0x11);
    p.mdctrl_ok("server1", &["break", "md1"]);
    p.fill("server1", 4 << 20, 2 << 20, 0x22);
    let dump = p.mdctrl_ok("server1", &["dump-md", "md1"]);
    assert!(
        dump.contains("operator-break"),
        "flag not recorded:\n{dump}"
    );
    p.a1.kill9();
    let _ = std::fs::remove_file(p.socket("server1"));
    p.a1.start_again();
    p.a1.wait_ready();
    p.activate("server1");
    // Without the flag, auto recovery would start now (server1 active and ahead, R14).
    let s = p.wait_status("server1", "the remembered operator break", T, |s| {
        s["pair"]["connection"] == "connected"
            && s["pair"]["auto_recovery"]
                .as_str()
                .is_some_and(|a| a.contains("broken by the operator"))
    });
    assert!(s["pair"]["recovery"].is_null(), "a recovery started: {s:#}");
    assert_eq!(s["pair"]["in_sync"], false, "{s:#}");
    p.fill("server1", 8 << 20, 1 << 20, 0x33);
    let out = p.mdctrl_ok("server1", &["recover", "md1", "--wait"]);
    assert!(out.contains("recovery finished"), "{out}");
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    let dump = p.mdctrl_ok("server1", &["dump-md", "md1"]);
    assert!(
        !dump.contains("operator-break"),
        "flag not cleared:\n{dump}"
    );
    p.assert_identical();
}

/// Scenario 10: an unusable `divergent_save_dir` (a file stands where the
/// directory should be) stops the agent at start with the path and the cause,
/// instead of failing later when a forced recovery must save the loser's data.
#[test]
fn unusable_save_dir_is_refused_at_start() {
    let c = MirrorPair::configure(&PairOpts::sync_sized(16 << 20, &[]));
    let dir = c.config.resources[0]
        .node("server1")
        .expect("node of the resource")
        .divergent_save_dir
        .clone();
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).expect("parent of divergent_save_dir");
    }
    std::fs::write(&dir, b"not a directory").expect("file in the way");
    let mut a = c.spawn_agent_on("server1");
    let status = a.wait_exit(T);
    assert!(
        !status.success(),
        "the agent started with {}",
        dir.display()
    );
    let log = a.log();
    assert!(
        log.contains(&dir.display().to_string()) && log.contains("not a directory"),
        "the error does not name the path and the cause:\n{log}"
    );
}
