//! One real-agent scenario per row of the resync rule table
//! (`docs/resync-rules.md` §2): two agents (separate processes on temp
//! files) driven by operator actions, faults and, for the rows the protocol
//! never produces by itself, a restored backup of one node. Each scenario
//! asserts the `pair.decision` text of `mdctrl status --json` (rule id, name
//! and outcome: resync direction and kind, blocked, split brain, unrelated)
//! and, where a resync follows, that it converges and both data files are
//! identical byte for byte.
//!
//! Rows with a scenario elsewhere (`tests/recovery.rs`): R3
//! (`resync_resumes_after_target_kill`, `resync_resumes_after_source_kill`),
//! R5/R6 by activation (`initial_construction_by_activation`), R12
//! (`force_after_active_crash_saves_divergent_regions`), R13
//! (`split_brain_resolved_by_force`), R14
//! (`standby_restart_recovers_automatically`).
//!
//! Rows here, produced by operator actions and faults only: R1 (a standby
//! write failing with `EFBIG` under a file-size limit; the same on the
//! active, then the failover to the standby; the same in a resync target), R4 (source killed mid-resync, its metadata re-created), R6 (one
//! node's metadata re-created while the other holds data), R7 (fresh
//! `--blank` pair), R8 (clean stop of both after a resync rotated the
//! generation), R9 (active killed with writes in flight), R15 (one node
//! re-created `--blank` after a resync pushed `gens::BLANK` into the other's
//! history), R18 (one node re-created `--blank` next to a pair built by
//! initial construction, whose histories hold no `gens::BLANK`).
//!
//! Also here, with the same helpers: a cluster partition that starts failing
//! its writes (behind [`tests::faultfile::FaultyFile`]) on the active, then
//! the failover and R12 once it works again; and on the standby.
//!
//! Rows the protocol never produces by itself (R2, R10, R11, R16, R17:
//! "not produced by the protocol", `docs/resync-rules.md` §2) are reached the
//! way they arise in the field: a stopped node's data disk and cluster
//! partition are rolled back to a copy taken earlier from that same node (a
//! VM snapshot or backup restored), every other state is produced by the
//! agents themselves (scenarios `*_after_restored_backup` at the end):
//!
//! - R2 `both-inconsistent`: server2 backed up as a partial copy (killed
//!   mid-resync), later server1 killed mid-resync in the other direction,
//!   server2 rolled back; resolved by `force` (F3, full).
//! - R10 `both-were-active`: server1 backed up while crashed active, rolled
//!   back to an in-sync backup, server2 crashes active, server1 rolled
//!   forward to its crash backup.
//! - R11 `equal-current-diverged`: server1 backed up while diverged, the
//!   pair resynced (R14), server1 rolled back.
//! - R16 `split-brain`: two timelines diverging alone from one generation
//!   (server1's from a backup), differential `force` with server1's region
//!   saved.
//! - R17 `split-brain-related`: as R16 after server2's divergence was
//!   resynced to server1 (so its B moved into history); full `force`.
//!
//! Without such a roll-back the rows cannot be reached by operator actions
//! or faults: a node becomes `RESYNC_TARGET` only as the target of a running
//! resync whose source never is one (R2); one node is active at a time and
//! a crashed active's `WAS_ACTIVE` is cleared at the next handshake (R10);
//! the source clears B before the target adopts C (R11); writing alone with
//! the peer unreachable needs `force` (then R12/R13 decide) and with the
//! peer connected the node that writes alone is "ahead" (R14) of the other,
//! which is refused activation (R16, R17). Each also has a unit test
//! (`cargo test -p mirror-agent --lib rules`) and the model test checks
//! that the protocol's own transitions never produce R10, R11 or R17.
//!
//! Status note: `pair.decision` is shown only while the pair is not in sync
//! (`null` once in sync), so the in-sync rows R7 and R8 are checked in the
//! agent's decision log line (`decision R7 blank-pair: in sync`) plus a
//! status saying in sync with no recovery.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tests::agent::Agent;
use tests::cluster::TestCluster;
use tests::data::{random_bytes, random_image, read_range, seed};
use tests::faultfile::FaultyFile;
use tests::mirror::{set_resource_key, set_timeouts, MirrorPair, PairOpts};
use tests::nbd_client::NbdClient;
use tests::run::describe;
use tests::wait::wait_until;

const T: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// `mdctrl init md1 [extra]` on a node whose agent is stopped.
fn init(c: &TestCluster, node: &str, extra: &[&str]) {
    let mut args = vec!["init", c.resource()];
    args.extend_from_slice(extra);
    let out = c.mdctrl_on(node, &args);
    assert!(
        out.status.success(),
        "{}",
        describe(&format!("mdctrl init on {node}"), &out)
    );
}

fn decision(s: &Value) -> &str {
    s["pair"]["decision"].as_str().unwrap_or("")
}

/// Waits until `node`'s `pair.decision` starts with `prefix` (rule id and
/// name) and returns the whole text.
fn wait_decision(p: &MirrorPair, node: &str, prefix: &str) -> String {
    let s = p.wait_status(node, &format!("decision {prefix}"), T, |s| {
        s["pair"]["connection"] == "connected" && decision(s).starts_with(prefix)
    });
    decision(&s).to_string()
}

/// Like [`wait_decision`] for a decision that starts a resync at once: the
/// resync may finish before a status poll sees the session's decision, so
/// a finished recovery naming the same rule is accepted too; the agent's
/// log line `decision <text>` must then carry the expected text.
fn wait_resync_decision(p: &MirrorPair, node: &str, rule: &str, text: &str) {
    let expected = format!("{rule}: {text}");
    let s = p.wait_status(node, &format!("decision {expected}"), T, |s| {
        decision(s).starts_with(rule)
            || s["pair"]["recovery"]["rule"]
                .as_str()
                .is_some_and(|r| r == rule)
    });
    if decision(&s).starts_with(rule) {
        // A running resync is shown with a " (running)" suffix.
        assert!(decision(&s).starts_with(&expected), "{node}: {s:#}");
    }
    p.agent(node)
        .wait_for_log(&format!("decision {expected}"), T);
}

/// No recovery ran in this agent process.
fn assert_no_recovery(s: &Value) {
    assert!(s["pair"]["recovery"].is_null(), "a recovery ran: {s:#}");
}

/// No recovery is running (an earlier one of this agent process, finished
/// or failed, may still be shown).
fn assert_no_running_recovery(s: &Value) {
    let r = &s["pair"]["recovery"];
    assert!(
        r.is_null() || r["finished"] == true || !r["error"].is_null(),
        "a recovery is running: {s:#}"
    );
}

/// An in-sync decision: status shows `pair.decision` only while the pair is
/// not in sync (`null` once in sync), so the rule is checked in the agent's
/// decision log line and the status must say in sync with no decision.
fn wait_in_sync_rule(p: &MirrorPair, node: &str, rule: &str) -> Value {
    p.agent(node)
        .wait_for_log(&format!("decision {rule}: in sync"), T);
    let s = p.wait_in_sync(node, T);
    assert!(s["pair"]["decision"].is_null(), "{node}: {s:#}");
    assert_eq!(s["pair"]["sync"], "in sync", "{node}: {s:#}");
    s
}

/// A pair whose generation was rotated by a resync (so it is no longer
/// `BLANK`): server1 active writes (`byte`), server2 is killed, server1 writes
/// more (`byte + 1`), server2 returns and R14 resyncs it; returns once both
/// report in sync.
fn pair_after_r14(byte: u8) -> MirrorPair {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(8 * MIB, &[]));
    p.activate("server1");
    p.fill("server1", 0, MIB, byte);
    p.a2.kill9();
    p.fill("server1", 2 * MIB, 512 << 10, byte + 1);
    start(&mut p, "server2");
    resync_converges(
        &p,
        "server1",
        "server2",
        "R14 ahead-differential",
        "differential resync server1 -> server2",
    );
    p
}

/// A resync from `source` decided by `rule` (log text `text`) runs to the
/// end: the source's recovery finished, both in sync, nothing unacknowledged.
fn resync_converges(p: &MirrorPair, source: &str, target: &str, rule: &str, text: &str) {
    wait_resync_decision(p, source, rule, text);
    p.wait_recovered(source, T);
    p.wait_in_sync(target, T);
    p.wait_rpo_zero(source, T);
}

/// Stops (SIGTERM) the agent of `node` of `p`.
fn stop(p: &mut MirrorPair, node: &str) {
    let a = p.agent_mut(node);
    if a.is_running() {
        a.terminate();
    }
    let _ = std::fs::remove_file(p.c.nbd_socket_on(node));
}

/// Starts the stopped agent of `node` and waits until it is ready.
fn start(p: &mut MirrorPair, node: &str) {
    let a = p.agent_mut(node);
    a.start_again();
    a.wait_ready();
}

/// Overwrites `node`'s whole data file with zeros (a new, empty disk).
fn zero_data(c: &TestCluster, node: &str) {
    let path = c.data_path_on(node);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let len = f.metadata().expect("metadata").len();
    f.set_len(0).expect("truncate");
    f.set_len(len).expect("extend");
    f.sync_all().expect("sync");
}

/// R7 blank-pair: two nodes created with `--blank` are in sync at once; the
/// first writes are replicated without any copy.
#[test]
fn r7_blank_pair_in_sync_at_once() {
    let p = MirrorPair::start(&PairOpts::sync_sized(4 * MIB, &[]));
    for n in ["server1", "server2"] {
        let s = wait_in_sync_rule(&p, n, "R7 blank-pair");
        assert_no_recovery(&s);
    }
    p.activate("server1");
    p.fill("server1", MIB, 256 << 10, 0x17);
    p.wait_rpo_zero("server1", T);
    assert_no_recovery(&p.status("server1"));
    p.assert_identical();
}

/// R8 in-sync: after a resync rotated the generation (so the pair is no
/// longer `BLANK`, which would be R7), a clean deactivation and a clean stop
/// of both agents; on restart they are in sync without a copy.
#[test]
fn r8_clean_restart_of_both_in_sync_without_copy() {
    let mut p = pair_after_r14(0x21);
    p.fill("server1", 5 * MIB, 64 << 10, 0x23);
    p.wait_rpo_zero("server1", T);
    p.deactivate("server1");
    p.wait_in_sync("server1", T);
    stop(&mut p, "server1");
    stop(&mut p, "server2");
    start(&mut p, "server1");
    start(&mut p, "server2");
    for n in ["server1", "server2"] {
        let s = wait_in_sync_rule(&p, n, "R8 in-sync");
        assert_no_recovery(&s);
    }
    p.assert_identical();
    // Still in sync when used again: writes replicate, no resync.
    p.activate("server1");
    p.fill("server1", 6 * MIB, 64 << 10, 0x24);
    p.wait_rpo_zero("server1", T);
    assert_no_recovery(&p.status("server1"));
    p.assert_identical();
}

/// R9 crash-while-connected: the active is killed -9 while connected, in
/// sync, with writes in flight. On its restart both nodes decide a
/// differential resync from the old active (its write intents); it starts
/// when the old active is activated again.
#[test]
fn r9_active_killed_with_writes_in_flight() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(16 * MIB, &[]));
    p.activate("server1");
    p.wait_in_sync("server1", T);
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let written = written.clone();
        let sock = p.socket("server1");
        let res = p.c.resource().to_string();
        std::thread::spawn(move || {
            let mut c = NbdClient::connect(&sock, &res).expect("NBD connect");
            let mut n = 0u64;
            loop {
                // 16 regions (1 MiB) of the 16 MiB volume.
                let off = (n % 16) * (64 << 10) + (n / 16 % 16) * 4096;
                match c.write(off, &random_bytes(4096, n), false) {
                    Ok(0) => {}
                    _ => break,
                }
                n += 1;
                written.store(n, Ordering::Relaxed);
            }
        })
    };
    wait_until("200 writes through server1", T, || {
        (written.load(Ordering::Relaxed) >= 200).then_some(())
    });
    crash(&mut p, "server1");
    writer.join().expect("writer");
    // The old active's write intents: the hot extent (activity log, 4 MiB
    // by default) holding the written regions.
    let intents = tests::mirror::dirty_regions(&p.c.cp_path_on("server1"));
    assert!(
        (0..16).all(|r| intents.contains(&r)),
        "written regions missing from server1's intents: {intents:?}"
    );
    start(&mut p, "server1");
    let expected = "R9 crash-while-connected: differential resync server1 -> server2";
    for n in ["server1", "server2"] {
        assert_eq!(wait_decision(&p, n, "R9 "), expected);
    }
    // Nothing starts while neither node is active (§6).
    let s = p.status("server1");
    assert_no_recovery(&s);
    assert!(
        s["pair"]["auto_recovery"]
            .as_str()
            .is_some_and(|a| a.contains("not-active") || a.contains("not active")),
        "{s:#}"
    );
    // The standby is not the source: its activation is refused.
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    eprintln!("activate server2 after R9: {out}");
    p.activate("server1");
    let s = p.wait_recovered("server1", T);
    assert_eq!(
        s["pair"]["recovery"]["rule"], "R9 crash-while-connected",
        "{s:#}"
    );
    assert_eq!(s["pair"]["recovery"]["kind"], "differential", "{s:#}");
    assert_eq!(
        s["pair"]["recovery"]["direction"], "server1 -> server2",
        "{s:#}"
    );
    assert!(
        s["pair"]["recovery"]["total_bytes"]
            .as_u64()
            .unwrap_or(u64::MAX)
            <= 4 * MIB,
        "not differential: {s:#}"
    );
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    p.assert_identical();
}

/// R6 new-member: server2's metadata is re-created (`init --force`, a
/// replaced disk holding other data) while server1 is active with data: a
/// full resync server1 → server2 starts by itself.
#[test]
fn r6_recreated_member_gets_full_resync() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(8 * MIB, &[]));
    p.activate("server1");
    p.fill("server1", 0, 2 * MIB, 0x61);
    p.wait_rpo_zero("server1", T);
    stop(&mut p, "server2");
    init(&p.c, "server2", &["--force"]);
    random_image(&p.data("server2"), 8 * MIB, seed("r6-replaced-disk"));
    p.fill("server1", 4 * MIB, 64 << 10, 0x62);
    start(&mut p, "server2");
    wait_resync_decision(
        &p,
        "server1",
        "R6 new-member",
        "full resync server1 -> server2",
    );
    let s = p.wait_recovered("server1", T);
    assert_eq!(s["pair"]["recovery"]["kind"], "full", "{s:#}");
    assert!(
        s["pair"]["recovery"]["total_bytes"].as_u64().unwrap_or(0) >= 8 * MIB,
        "not a full copy: {s:#}"
    );
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    p.assert_identical();
}

/// A pair of two new nodes (`init` without `--blank`) with random contents,
/// built by activating server1 (R5, then the initial full copy R6), then
/// deactivated and in sync: both hold a fresh random generation, no `BLANK`.
fn constructed_pair(size: u64, name: &str) -> MirrorPair {
    let o = PairOpts::sync_sized(size, &[]);
    let c = TestCluster::pair(o.cluster.clone());
    set_timeouts(&c, &o.timing);
    set_resource_key(&c, "mode", &format!("\"{}\"", o.mode));
    for (i, n) in ["server1", "server2"].into_iter().enumerate() {
        init(&c, n, &[]);
        random_image(&c.data_path_on(n), size, seed(name) + i as u64);
    }
    let p = MirrorPair::start_on(c);
    wait_decision(&p, "server1", "R5 ");
    p.activate("server1");
    p.wait_recovered("server1", T);
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    p.deactivate("server1");
    p.wait_in_sync("server1", T);
    p.assert_identical();
    p
}

/// R18 unrelated: next to a pair built by initial construction (its
/// generations are random, `gens::BLANK` is in no history), server2's
/// metadata is re-created with `--blank` on an empty disk: no generation is
/// shared. Nothing starts, activation is refused on both, `force server1`
/// resyncs in full.
#[test]
fn r18_unrelated_after_blank_recreation() {
    let mut p = constructed_pair(4 * MIB, "r18-unrelated");
    stop(&mut p, "server2");
    zero_data(&p.c, "server2");
    init(&p.c, "server2", &["--force", "--blank"]);
    start(&mut p, "server2");
    for n in ["server1", "server2"] {
        let d = wait_decision(&p, n, "R18 ");
        assert!(d.starts_with("R18 unrelated: "), "{n}: {d}");
        let s = p.status(n);
        assert_eq!(s["pair"]["in_sync"], false, "{n}: {s:#}");
        assert_no_running_recovery(&s);
    }
    for n in ["server1", "server2"] {
        let out = p.expect_code(n, &["activate", "md1", "--nomount"], 3);
        assert!(
            out.contains("unrelated") || out.contains("R18"),
            "{n}: {out}"
        );
    }
    p.mdctrl_ok("server1", &["force", "server1", "md1"]);
    let s = p.wait_recovered("server1", T);
    assert_eq!(
        s["pair"]["recovery"]["direction"], "server1 -> server2",
        "{s:#}"
    );
    assert_eq!(s["pair"]["recovery"]["kind"], "full", "{s:#}");
    p.wait_in_sync("server2", T);
    p.assert_identical();
}

/// R4 inconsistent-and-new: the source (active) is killed -9 mid-resync and
/// its disk replaced (`init --force`, `BLANK`) while the target holds a
/// partial copy. Both block; activation is refused on both; `force` of the
/// new node resyncs it in full onto the partial copy.
#[test]
fn r4_partial_target_next_to_recreated_source() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(
        16 * MIB,
        &[("resync_rate", "\"4MiB\"")],
    ));
    p.activate("server1");
    p.a2.kill9();
    p.fill("server1", 0, 8 * MIB, 0x44);
    start(&mut p, "server2");
    let s = p.wait_status("server1", "a quarter of the resync", T, |s| {
        let r = &s["pair"]["recovery"];
        let total = r["total_bytes"].as_u64().unwrap_or(0);
        total > 0 && r["done_bytes"].as_u64().unwrap_or(0) >= total / 4
    });
    assert_eq!(s["pair"]["recovery"]["finished"], false, "{s:#}");
    crash(&mut p, "server1");
    let st = p.status("server2");
    assert_eq!(st["disk"]["consistent"], false, "{st:#}");
    init(&p.c, "server1", &["--force"]);
    start(&mut p, "server1");
    let expected_prefix = "R4 inconsistent-and-new: ";
    for n in ["server1", "server2"] {
        let d = wait_decision(&p, n, "R4 ");
        assert!(d.starts_with(expected_prefix), "{n}: {d}");
        assert!(d.to_lowercase().contains("blocked"), "{n}: {d}");
        assert_no_running_recovery(&p.status(n));
    }
    for n in ["server1", "server2"] {
        let out = p.expect_code(n, &["activate", "md1", "--nomount"], 3);
        eprintln!("activate {n} under R4: {out}");
    }
    // The partial copy cannot win (F2).
    let out = p.c.mdctrl_on("server2", &["force", "server2", "md1"]);
    assert!(
        !out.status.success(),
        "force of the partial copy accepted: {}",
        describe("force server2", &out)
    );
    p.mdctrl_ok("server1", &["force", "server1", "md1"]);
    let s = p.wait_recovered("server1", T);
    assert_eq!(
        s["pair"]["recovery"]["direction"], "server1 -> server2",
        "{s:#}"
    );
    // F4: differential because the loser is a resync target; the union
    // holds every region (the new node's bitmap is all dirty).
    assert_eq!(s["pair"]["recovery"]["kind"], "differential", "{s:#}");
    assert_eq!(s["pair"]["recovery"]["rule"], "F4 forced-winner", "{s:#}");
    assert_eq!(
        s["pair"]["recovery"]["total_bytes"].as_u64(),
        Some(16 * MIB),
        "{s:#}"
    );
    p.wait_in_sync("server2", T);
    p.assert_identical();
}

/// `node`'s agent with `RLIMIT_FSIZE` at 4 MiB (set by `prlimit` before the
/// agent starts, so also after `start_again`) and SIGXFSZ ignored: a write
/// beyond 4 MiB of its data file fails with `EFBIG`, as on a failing disk.
fn agent_with_4mib_file_limit(c: &TestCluster, node: &str) -> Agent {
    Agent::spawn_wrapped(
        c,
        node,
        &[
            "prlimit",
            "--fsize=4194304:4194304",
            "sh",
            "-c",
            "trap '' XFSZ; exec \"$@\"",
            "sh",
        ],
    )
}

/// An 8 MiB `sync` pair whose `limited` node runs under
/// [`agent_with_4mib_file_limit`], server1 active and in sync.
fn limited_pair(limited: &str) -> MirrorPair {
    let c = MirrorPair::configure(&PairOpts::sync_sized(8 * MIB, &[]));
    let spawn = |node: &str| {
        if node == limited {
            agent_with_4mib_file_limit(&c, node)
        } else {
            c.spawn_agent_on(node)
        }
    };
    let (a1, a2) = (spawn("server1"), spawn("server2"));
    let mut p = MirrorPair { c, a1, a2 };
    p.a1.wait_ready();
    p.a2.wait_ready();
    p.activate("server1");
    p.wait_in_sync("server1", T);
    p
}

/// `node`'s failed disk "replaced": its agent stopped, its metadata
/// re-created (`init --force`), a plain agent (no file-size limit) started;
/// then R6 copies everything from `source`, and both files are identical.
fn replace_disk_and_resync(p: &mut MirrorPair, node: &str, source: &str) {
    stop(p, node);
    init(&p.c, node, &["--force"]);
    *p.agent_mut(node) = p.c.spawn_agent_on(node);
    p.agent_mut(node).wait_ready();
    resync_converges(
        p,
        source,
        node,
        "R6 new-member",
        &format!("full resync {source} -> {node}"),
    );
    p.assert_identical();
}

/// R1 disk-error: server2's agent runs with `RLIMIT_FSIZE` lowered below
/// the volume size (and SIGXFSZ ignored), so a replicated write beyond the
/// limit fails with `EFBIG` on the standby, which records `DISK_ERROR`.
/// After its restart both nodes decide R1 (blocked), nothing starts. The
/// disk is then "replaced" (`init --force`), the agent restarted without the
/// limit: R6 full resync, identical.
#[test]
fn r1_standby_write_error_blocks() {
    if !tests::require_tool("prlimit") {
        return;
    }
    let mut p = limited_pair("server2");
    p.fill("server1", 0, 64 << 10, 0x11);
    // Beyond the limit on server2: its write fails, the mirror breaks.
    p.fill("server1", 6 * MIB, 64 << 10, 0x12);
    p.wait_status("server2", "the recorded disk error", T, |s| {
        s["disk"]["disk_error"] == true
    });
    stop(&mut p, "server2");
    // Restarted without the limit (a plain agent): the flag persists.
    p.a2 = p.c.spawn_agent_on("server2");
    p.a2.wait_ready();
    for n in ["server1", "server2"] {
        let d = wait_decision(&p, n, "R1 ");
        assert!(d.starts_with("R1 disk-error: "), "{n}: {d}");
        assert!(d.to_lowercase().contains("blocked"), "{n}: {d}");
        assert_no_running_recovery(&p.status(n));
    }
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    eprintln!("activate server2 with a disk error: {out}");
    // Replace the disk: re-create its metadata; R6 copies it in full.
    replace_disk_and_resync(&mut p, "server2", "server1");
    assert!(read_range(&p.data("server2"), 6 * MIB, 64 << 10)
        .iter()
        .all(|&b| b == 0x12));
}

/// R1 on the active: server1 (active) gets a file-size limit on its data
/// file, so its write beyond the limit fails with `EFBIG`: the client gets
/// the error, server1 records `DISK_ERROR` (RED, "move the service to
/// server2 ... then replace the disk") and
/// tells server2, whose next step is the failover of `docs/operations.md`
/// ("A disk failed"). Replication went on, so server2 holds every write
/// server1 acknowledged. The failover: server1's agent stopped, `activate`
/// on server2 refused (peer unreachable, exit 5), `force server2`,
/// `activate`. server1's disk is then replaced (`init --force`, no limit):
/// R6, a full resync server2 → server1, identical.
#[test]
fn r1_active_write_error_then_failover() {
    if !tests::require_tool("prlimit") {
        return;
    }
    let mut p = limited_pair("server1");
    p.fill("server1", 0, 256 << 10, 0x31);
    // Beyond the limit on server1's own disk: the client gets the error.
    let mut nbd = NbdClient::connect(&p.socket("server1"), "md1").expect("NBD connect");
    let err = nbd
        .write(6 * MIB, &vec![0x32; 64 << 10], false)
        .expect("write request");
    assert_ne!(err, 0, "a write beyond server1's file size limit succeeded");
    let _ = nbd.disconnect();
    let s1 = p.wait_status("server1", "the recorded disk error", T, |s| {
        s["disk"]["disk_error"] == true
    });
    assert_eq!(s1["color"], "RED", "{s1:#}");
    let next1 = s1["next_step"].as_str().unwrap_or("");
    assert!(
        next1.contains("move the service to server2") && next1.contains("replace the disk"),
        "{s1:#}"
    );
    p.a1.assert_log_contains("data disk error on this node: write at 6291456");
    let s2 = p.wait_status("server2", "the peer's disk error", T, |s| {
        s["pair"]["peer_disk"]["disk_error"] == true
    });
    let next = s2["next_step"].as_str().unwrap_or("");
    assert!(
        next.contains("move the service here") && next.contains("mdctrl force server2 md1"),
        "{s2:#}"
    );
    // Replication went on after the error: this write reaches server2 too.
    p.fill("server1", 1 << 20, 64 << 10, 0x33);
    // The failover.
    stop(&mut p, "server1");
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 5);
    assert!(out.contains("force server2"), "no force hint: {out}");
    p.mdctrl_ok("server2", &["force", "server2", "md1"]);
    p.activate("server2");
    assert!(read_range(&p.data("server2"), 0, 256 << 10)
        .iter()
        .all(|&b| b == 0x31));
    assert!(read_range(&p.data("server2"), 1 << 20, 64 << 10)
        .iter()
        .all(|&b| b == 0x33));
    p.fill("server2", 2 * MIB, 64 << 10, 0x34);
    replace_disk_and_resync(&mut p, "server1", "server2");
}

/// R1 during a resync: server2's agent runs under a file-size limit from the
/// start (`prlimit --fsize`, 4 MiB). A write beyond it on server1 while
/// server2 is stopped makes the differential resync (R14) write there when
/// server2 returns; that write fails with `EFBIG`, server2 records
/// `DISK_ERROR`, and both nodes then decide R1 (blocked): no resync is
/// retried onto the failed disk, however often the pair reconnects. After
/// the disk is "replaced" (`init --force`, an agent without the limit), R6
/// copies everything, identical.
#[test]
fn r1_resync_target_write_error_blocks() {
    if !tests::require_tool("prlimit") {
        return;
    }
    let mut p = limited_pair("server2");
    p.fill("server1", 0, 256 << 10, 0x41);
    stop(&mut p, "server2");
    p.fill("server1", 6 * MIB, 64 << 10, 0x42);
    // Back with the same limit: the resync's write at 6 MiB fails there.
    start(&mut p, "server2");
    p.wait_status("server2", "the recorded disk error", T, |s| {
        s["disk"]["disk_error"] == true
    });
    p.a2.wait_for_log("data disk error on this node: write at 6291456", T);
    for n in ["server1", "server2"] {
        let d = wait_decision(&p, n, "R1 ");
        assert!(d.starts_with("R1 disk-error: "), "{n}: {d}");
        assert_no_running_recovery(&p.status(n));
    }
    let resyncs = |p: &MirrorPair| p.a1.log().matches("resync starting as source").count();
    let before = resyncs(&p);
    // Reconnecting does not start another resync onto the failed disk.
    stop(&mut p, "server2");
    start(&mut p, "server2");
    for n in ["server1", "server2"] {
        wait_decision(&p, n, "R1 ");
    }
    assert_eq!(
        resyncs(&p),
        before,
        "a resync was retried onto the failed disk"
    );
    // server1 kept serving throughout.
    p.fill("server1", MIB, 64 << 10, 0x43);
    replace_disk_and_resync(&mut p, "server2", "server1");
}

/// R15 ahead-full: a `--blank` pair, a resync (R14) makes both rotate and
/// push `gens::BLANK` into their histories; server2's metadata is then
/// re-created with `--blank` on an empty disk (C = `gens::BLANK` again,
/// bitmap clean). server1 once had that generation (history) but its bitmap
/// does not start there: full resync server1 → server2, decided while
/// neither is active, started by server1's activation.
#[test]
fn r15_ahead_full_after_blank_recreation() {
    let mut p = pair_after_r14(0x51);
    p.wait_rpo_zero("server1", T);
    p.deactivate("server1");
    p.wait_in_sync("server1", T);
    stop(&mut p, "server2");
    zero_data(&p.c, "server2");
    init(&p.c, "server2", &["--force", "--blank"]);
    start(&mut p, "server2");
    let expected = "R15 ahead-full: full resync server1 -> server2";
    for n in ["server1", "server2"] {
        assert_eq!(wait_decision(&p, n, "R15 "), expected, "{n}");
    }
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    eprintln!("activate server2 under R15: {out}");
    p.activate("server1");
    let s = p.wait_recovered("server1", T);
    assert_eq!(s["pair"]["recovery"]["rule"], "R15 ahead-full", "{s:#}");
    assert_eq!(s["pair"]["recovery"]["kind"], "full", "{s:#}");
    assert_eq!(
        s["pair"]["recovery"]["direction"], "server1 -> server2",
        "{s:#}"
    );
    assert_eq!(
        s["pair"]["recovery"]["total_bytes"].as_u64(),
        Some(8 * MIB),
        "{s:#}"
    );
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    p.assert_identical();
}

// ---------------------------------------------------------------------------
// Rows the protocol does not produce, reached by restoring a backup.
//
// R2, R10, R11, R16 and R17 guard against metadata the agents never write
// on their own: they appear when a node's disks are rolled back to an
// earlier copy (a VM snapshot, a backup of the data disk and the cluster
// partition, a cloned disk put back). The scenarios below produce every
// state with real agents and only roll a stopped node's two files back to
// a copy taken earlier from that same node, as an operator restoring a
// snapshot would. Each checks that both nodes reach the row's decision,
// that nothing starts and neither node can be activated without a force,
// and that a force converges to identical data.
// ---------------------------------------------------------------------------

/// A stopped node's data file and cluster partition as they were when
/// taken (a backup or VM snapshot of both disks).
struct Snapshot {
    data: Vec<u8>,
    cp: Vec<u8>,
}

/// Copies the two files of `node`, whose agent must be stopped.
fn snapshot(p: &mut MirrorPair, node: &str) -> Snapshot {
    assert!(!p.agent_mut(node).is_running(), "{node} is running");
    let read = |path: PathBuf| {
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    };
    Snapshot {
        data: read(p.data(node)),
        cp: read(p.c.cp_path_on(node)),
    }
}

/// Rolls the two files of the stopped `node` back to `snap`, in place.
fn restore(p: &mut MirrorPair, node: &str, snap: &Snapshot) {
    assert!(!p.agent_mut(node).is_running(), "{node} is running");
    for (path, bytes) in [(p.data(node), &snap.data), (p.c.cp_path_on(node), &snap.cp)] {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        std::io::Write::write_all(&mut f, bytes).expect("write snapshot");
        f.sync_all().expect("sync");
    }
}

/// Kills `node`'s agent with SIGKILL and removes its stale NBD socket.
fn crash(p: &mut MirrorPair, node: &str) {
    p.agent_mut(node).kill9();
    let _ = std::fs::remove_file(p.socket(node));
}

/// Both nodes show `expected` (a split brain or blocked decision), nothing
/// runs, and activation is refused on both (exit 3).
fn assert_stuck(p: &MirrorPair, prefix: &str, expected: &str) {
    for n in ["server1", "server2"] {
        let d = wait_decision(p, n, prefix);
        assert!(d.starts_with(expected), "{n}: {d}");
        let s = p.status(n);
        assert_eq!(s["pair"]["in_sync"], false, "{n}: {s:#}");
        assert_no_running_recovery(&s);
    }
    for n in ["server1", "server2"] {
        if p.status(n)["role"] == "active" {
            continue;
        }
        let out = p.expect_code(n, &["activate", "md1", "--nomount"], 3);
        eprintln!("activate {n} under {prefix}: {out}");
    }
}

/// `mdctrl force WINNER md1` on the winner; waits for the resync from it to
/// finish and both nodes to be in sync, then compares the data files.
fn force_and_converge(p: &MirrorPair, winner: &str, loser: &str) -> Value {
    p.mdctrl_ok(winner, &["force", winner, "md1"]);
    let s = p.wait_recovered(winner, T);
    assert_eq!(
        s["pair"]["recovery"]["direction"],
        format!("{winner} -> {loser}").as_str(),
        "{s:#}"
    );
    p.wait_in_sync(loser, T);
    p.wait_in_sync(winner, T);
    p.assert_identical();
    s
}

/// Deactivates `node`, waits for the pair to be in sync, stops it.
fn deactivate_and_stop(p: &mut MirrorPair, node: &str) {
    p.deactivate(node);
    p.wait_in_sync(node, T);
    stop(p, node);
}

/// R11 equal-current-diverged: server1 diverges alone (server2 killed,
/// writes) and a backup of server1 is taken (B ≠ 0, C = G1); the pair then
/// resyncs (R14), which gives server2 the same C and clears server1's B;
/// server1 is rolled back to the backup. Equal C with a B ≠ 0: split brain,
/// nothing automatic; `force server1` converges.
#[test]
fn r11_equal_current_diverged_after_restored_backup() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(8 * MIB, &[]));
    p.activate("server1");
    p.fill("server1", 0, MIB, 0xb1);
    crash(&mut p, "server2");
    p.fill("server1", 2 * MIB, 256 << 10, 0xb2);
    p.deactivate("server1");
    stop(&mut p, "server1");
    let diverged = snapshot(&mut p, "server1");
    start(&mut p, "server1");
    start(&mut p, "server2");
    assert!(wait_decision(&p, "server1", "R14 ").starts_with("R14 ahead-differential"));
    p.activate("server1");
    p.wait_recovered("server1", T);
    p.wait_in_sync("server2", T);
    deactivate_and_stop(&mut p, "server1");
    restore(&mut p, "server1", &diverged);
    start(&mut p, "server1");
    assert_stuck(&p, "R11 ", "R11 equal-current-diverged: split brain");
    force_and_converge(&p, "server1", "server2");
}

/// Two timelines from one in-sync generation G, made with a backup:
/// server1 is backed up while in sync (clean stop), then diverges alone
/// (server2 killed; writes 0xc2 at 2 MiB) and is backed up again (B = G,
/// C = G1); then server1 is rolled back to the first backup, the pair is in
/// sync again, server2 is activated and diverges alone (server1 killed;
/// writes 0xc3 at 4 MiB: B = G, C = G2). Returns the pair with server1
/// stopped, server2 active and alone, and server1's diverged backup.
fn two_timelines_from_backup() -> (MirrorPair, Snapshot) {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(8 * MIB, &[]));
    p.activate("server1");
    p.fill("server1", 0, MIB, 0xc1);
    deactivate_and_stop(&mut p, "server1");
    let in_sync_backup = snapshot(&mut p, "server1");
    start(&mut p, "server1");
    p.wait_in_sync("server1", T);
    p.activate("server1");
    crash(&mut p, "server2");
    p.fill("server1", 2 * MIB, 64 << 10, 0xc2);
    p.deactivate("server1");
    stop(&mut p, "server1");
    let diverged = snapshot(&mut p, "server1");
    restore(&mut p, "server1", &in_sync_backup);
    start(&mut p, "server1");
    start(&mut p, "server2");
    p.wait_in_sync("server2", T);
    p.activate("server2");
    crash(&mut p, "server1");
    p.fill("server2", 4 * MIB, 64 << 10, 0xc3);
    (p, diverged)
}

/// R16 split-brain: server1 rolled back to its diverged backup (B = G,
/// C = G1) next to server2 that diverged from the same G (B = G, C = G2).
/// Split brain on both, server1 refused activation while server2 keeps
/// serving; `force server2` resyncs differentially (both bitmaps relative to
/// G) and saves server1's divergent region first.
#[test]
fn r16_split_brain_after_restored_backup() {
    let (mut p, diverged) = two_timelines_from_backup();
    restore(&mut p, "server1", &diverged);
    start(&mut p, "server1");
    assert_stuck(&p, "R16 ", "R16 split-brain: split brain");
    let s = force_and_converge(&p, "server2", "server1");
    assert_eq!(s["pair"]["recovery"]["kind"], "differential", "{s:#}");
    assert!(read_range(&p.data("server1"), 4 * MIB, 64 << 10)
        .iter()
        .all(|&b| b == 0xc3));
    // server1's own write is gone from the volume but saved.
    assert!(read_range(&p.data("server1"), 2 * MIB, 64 << 10)
        .iter()
        .all(|&b| b == 0));
    let (img, regions) = p.saved_image("server1");
    p.assert_saved_region(&img, &regions, 2 * MIB, 64 << 10, 0xc2);
}

/// R17 split-brain-related: as for R16, but before server1 is rolled back
/// server2's divergence is resynced to server1 (R14; G moves into server2's
/// history, its B is cleared). Now server1 (B = G, C = G1) and server2
/// (B = 0, C = G2, G in its history) share G but neither is ahead of the
/// other: split brain; `force server2` resyncs in full.
#[test]
fn r17_split_brain_related_after_restored_backup() {
    let (mut p, diverged) = two_timelines_from_backup();
    start(&mut p, "server1");
    resync_converges(
        &p,
        "server2",
        "server1",
        "R14 ahead-differential",
        "differential resync server2 -> server1",
    );
    stop(&mut p, "server1");
    restore(&mut p, "server1", &diverged);
    start(&mut p, "server1");
    assert_stuck(&p, "R17 ", "R17 split-brain-related: split brain");
    let s = force_and_converge(&p, "server2", "server1");
    assert_eq!(s["pair"]["recovery"]["kind"], "full", "{s:#}");
}

/// R10 both-were-active: server1 is backed up in sync, then crashes while
/// active (WAS_ACTIVE, write intents, C = G) and is backed up again; rolled
/// back to the first backup it is in sync with server2, which is activated
/// and crashes the same way; server1 is rolled back to its crash backup.
/// Both were active at G with intents: split brain; `force server1`.
#[test]
fn r10_both_were_active_after_restored_backup() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(8 * MIB, &[]));
    p.activate("server1");
    p.fill("server1", 0, MIB, 0xd1);
    deactivate_and_stop(&mut p, "server1");
    let in_sync_backup = snapshot(&mut p, "server1");
    start(&mut p, "server1");
    p.wait_in_sync("server1", T);
    p.activate("server1");
    p.fill("server1", 2 * MIB, 64 << 10, 0xd2);
    crash(&mut p, "server1");
    let crashed = snapshot(&mut p, "server1");
    restore(&mut p, "server1", &in_sync_backup);
    start(&mut p, "server1");
    p.wait_in_sync("server1", T);
    p.activate("server2");
    p.fill("server2", 4 * MIB, 64 << 10, 0xd3);
    crash(&mut p, "server2");
    stop(&mut p, "server1");
    restore(&mut p, "server1", &crashed);
    start(&mut p, "server1");
    start(&mut p, "server2");
    assert_stuck(&p, "R10 ", "R10 both-were-active: split brain");
    force_and_converge(&p, "server1", "server2");
}

/// R2 both-inconsistent: a resync server1 → server2 is interrupted (server2
/// killed: a partial copy) and server2 is backed up; the resync resumes and
/// finishes; later a resync server2 → server1 is interrupted the same way
/// (server1 killed); server2 is rolled back to its partial-copy backup. Both
/// are partial copies: blocked; `force server2` (F3) copies it in full.
#[test]
fn r2_both_inconsistent_after_restored_backup() {
    let mut p = MirrorPair::start(&PairOpts::sync_sized(
        16 * MIB,
        &[("resync_rate", "\"4MiB\"")],
    ));
    let quarter_done = |p: &MirrorPair, source: &str| {
        p.wait_status(source, "a quarter of the resync", T, |s| {
            let r = &s["pair"]["recovery"];
            let total = r["total_bytes"].as_u64().unwrap_or(0);
            total > 0
                && r["finished"] == false
                && r["done_bytes"].as_u64().unwrap_or(0) >= total / 4
        });
    };
    p.activate("server1");
    crash(&mut p, "server2");
    p.fill("server1", 0, 8 * MIB, 0xe1);
    start(&mut p, "server2");
    quarter_done(&p, "server1");
    crash(&mut p, "server2");
    let partial = snapshot(&mut p, "server2");
    start(&mut p, "server2");
    p.wait_recovered("server1", T);
    p.wait_in_sync("server2", T);
    p.deactivate("server1");
    p.wait_in_sync("server2", T);
    p.activate("server2");
    crash(&mut p, "server1");
    p.fill("server2", 0, 8 * MIB, 0xe2);
    start(&mut p, "server1");
    quarter_done(&p, "server2");
    crash(&mut p, "server1");
    p.deactivate("server2");
    stop(&mut p, "server2");
    restore(&mut p, "server2", &partial);
    start(&mut p, "server1");
    start(&mut p, "server2");
    assert_stuck(&p, "R2 ", "R2 both-inconsistent: blocked");
    let s = force_and_converge(&p, "server2", "server1");
    assert_eq!(
        s["pair"]["recovery"]["rule"], "F3 forced-both-inconsistent",
        "{s:#}"
    );
    assert_eq!(s["pair"]["recovery"]["kind"], "full", "{s:#}");
}

/// An 8 MiB `sync` pair (both agents running, nothing active) whose `node`
/// has its cluster partition behind a [`FaultyFile`]: the initialised
/// partition is moved to an image, and its configured path becomes a
/// symlink to the FUSE file. `None` (a loud skip) without the tools. The
/// pair comes second so that it is dropped first (agents stopped before the
/// file is unmounted).
fn pair_with_faulty_cluster_partition(node: &str) -> Option<(FaultyFile, MirrorPair)> {
    if !tests::require_tools(&["nbdfuse", "nbdkit", "fusermount3"]) {
        return None;
    }
    let c = MirrorPair::configure(&PairOpts::sync_sized(8 * MIB, &[]));
    let faulty = FaultyFile::take_over(&c.cp_path_on(node));
    Some((faulty, MirrorPair::start_on(c)))
}

/// An 8 MiB `sync` pair with `timeouts.io_stall` at 1 s (and the `timeouts`
/// given) whose device at `device(cluster)` lies behind a [`FaultyFile`] that
/// can pause: server1 active, the pair in sync. `None` (a loud skip) without
/// the tools. The pair comes second so that it is dropped first.
fn active_pair_over_a_pausable_device(
    device: impl FnOnce(&TestCluster) -> PathBuf,
    timeouts: &[(&str, &str)],
) -> Option<(FaultyFile, MirrorPair)> {
    if !tests::require_tools(&["nbdfuse", "nbdkit", "fusermount3"]) {
        return None;
    }
    let c = MirrorPair::configure(&PairOpts::sync_sized(8 * MIB, &[]));
    c.set_timeout("io_stall", "1s");
    for (key, value) in timeouts {
        c.set_timeout(key, value);
    }
    let faulty = FaultyFile::take_over(&device(&c));
    let p = MirrorPair::start_on(c);
    p.activate("server1");
    p.wait_in_sync("server1", T);
    Some((faulty, p))
}

/// server2's device `what` ("cluster partition", "data disk") stalls, which
/// its status shows in `disk.<field>`: server2 is RED, and server1 names the
/// peer's stalled device and what to check.
fn standby_stall_is_told(p: &MirrorPair, field: &str, what: &str) {
    let s2 = p.wait_status("server2", &format!("the stalled {what}"), T, |s| {
        s["disk"][field].is_u64()
    });
    assert_eq!(s2["color"], "RED", "{s2:#}");
    let s1 = p.wait_status("server1", &format!("server2's stalled {what}"), T, |s| {
        s["pair"]["peer_disk"]["stalled"] == what
    });
    let next1 = s1["next_step"].as_str().unwrap_or("");
    assert!(
        next1.contains(&format!("server2 reports its {what} stalled"))
            && next1.contains("check that device on server2"),
        "{s1:#}"
    );
}

/// The end of the stall of [`standby_stall_is_told`]: both nodes clear it by
/// themselves and are GREEN. Returns server1's status.
fn standby_stall_end_is_told(p: &MirrorPair, field: &str) -> Value {
    p.wait_status("server2", "the end of the stall", T, |s| {
        s["disk"][field].is_null() && s["color"] == "GREEN"
    });
    let s1 = p.wait_status("server1", "the end of server2's stall", T, |s| {
        s["pair"]["peer_disk"]["stalled"].is_null()
    });
    assert_eq!(s1["color"], "GREEN", "{s1:#}");
    s1
}

/// After a failover by force to server2: server1's agent starts again, learns
/// that it lost (R12 forced-wins, decided by server2) and is resynced from
/// server2 until both are in sync and nothing is left to replicate.
fn rejoin_as_the_forced_failovers_loser(p: &mut MirrorPair) {
    start(p, "server1");
    p.agent("server2")
        .wait_for_log("decision R12 forced-wins", T);
    p.wait_recovered("server2", T);
    p.wait_in_sync("server1", T);
    p.wait_rpo_zero("server2", T);
}

/// The cluster partition of the active fails (server1's lies behind
/// nbdkit's error filter, exposed through nbdfuse; writes fail with `EIO`
/// from a moment on). A write whose intent needs a metadata write is
/// refused with `EIO`, and the poisoned partition then refuses every later
/// write too, also into regions already marked (safety property 1: no data
/// write without its intent on stable storage). server1 says so: RED,
/// `metadata_error`, "Cluster Partition FAILED" in the table, the failover in
/// the next step; so does server2, which received every acknowledged write
/// ("move the service here"). The failover of `docs/operations.md`, then the
/// partition works again and server1's agent restarts on it: what it holds
/// is still valid, server2's force wins (R12), identical.
#[test]
fn active_cluster_partition_failure_then_failover() {
    let Some((faulty, mut p)) = pair_with_faulty_cluster_partition("server1") else {
        return;
    };
    p.activate("server1");
    p.wait_in_sync("server1", T);
    p.fill("server1", 0, 256 << 10, 0x51);

    faulty.fail_writes(true);
    let mut nbd = NbdClient::connect(&p.socket("server1"), "md1").expect("NBD connect");
    // 6 MiB is in a hot extent not marked yet: its intent needs a metadata write.
    let err = nbd
        .write(6 * MIB, &vec![0x52; 64 << 10], false)
        .expect("write request");
    assert_eq!(err, 5, "a write whose intent could not be recorded: EIO");
    // Region 0 is marked already, but the partition is poisoned now.
    let err = nbd
        .write(0, &vec![0x53; 4096], false)
        .expect("write request");
    assert_eq!(err, 5, "a write after the partition failed: EIO");
    let _ = nbd.disconnect();
    assert!(
        faulty
            .log_text()
            .contains("injecting EIO error into pwrite"),
        "{}",
        faulty.log_text()
    );

    let s1 = p.wait_status("server1", "the failed cluster partition", T, |s| {
        s["disk"]["metadata_error"].is_string()
    });
    assert_eq!(s1["color"], "RED", "{s1:#}");
    let next1 = s1["next_step"].as_str().unwrap_or("");
    assert!(
        next1.contains("the cluster partition of md1 failed")
            && next1.contains("writes fail")
            && next1.contains("move the service to server2")
            && next1.contains("`mdctrl force server2 md1`"),
        "{s1:#}"
    );
    assert_eq!(s1["disk"]["disk_error"], false, "{s1:#}");
    let table = p.mdctrl_ok("server1", &["status", "md1"]);
    assert!(
        table.lines().any(|l| l.starts_with("Cluster Partition")
            && l.contains("FAILED")
            && l.trim_end().ends_with("OK")),
        "{table}"
    );
    p.a1.assert_log_contains("the cluster partition failed, client writes fail");
    let s2 = p.wait_status("server2", "the peer's failed cluster partition", T, |s| {
        s["pair"]["peer_disk"]["metadata_error"].is_string()
    });
    let next2 = s2["next_step"].as_str().unwrap_or("");
    assert!(
        next2.contains("the cluster partition of server1 failed")
            && next2.contains("move the service here")
            && next2.contains("`mdctrl force server2 md1`"),
        "{s2:#}"
    );
    // Neither refused write reached server2.
    assert!(read_range(&p.data("server2"), 0, 256 << 10)
        .iter()
        .all(|&b| b == 0x51));
    assert!(read_range(&p.data("server2"), 6 * MIB, 64 << 10)
        .iter()
        .all(|&b| b == 0));

    // The failover.
    stop(&mut p, "server1");
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 5);
    assert!(out.contains("force server2"), "no force hint: {out}");
    p.mdctrl_ok("server2", &["force", "server2", "md1"]);
    p.activate("server2");
    p.fill("server2", 2 * MIB, 64 << 10, 0x54);

    // The partition works again; server1's agent restarts on it.
    faulty.fail_writes(false);
    rejoin_as_the_forced_failovers_loser(&mut p);
    let s1 = p.status("server1");
    assert!(s1["disk"]["metadata_error"].is_null(), "{s1:#}");
    assert_eq!(s1["color"], "GREEN", "{s1:#}");
    p.assert_identical();
    stop(&mut p, "server1");
}

/// The data disk of the active stalls (server1's, behind nbdkit's pause
/// filter) under client writes. Nothing fails, everything waits: server1's
/// status says so once no request completed for `timeouts.io_stall` (1 s
/// here), RED, with the failover as the way out, and server1 tells server2,
/// whose status says "move the service here". Stopping server1's agent
/// does not wait for the disk: its wind-down is abandoned after `io_stall`,
/// its links close, and server2, which holds every acknowledged write, is
/// forced and activated while server1's disk still stalls. Once the disk
/// answers, server1's agent exits; restarted, it learns it lost (R12) and
/// is resynced from server2: identical.
#[test]
fn active_data_disk_stall_then_failover() {
    let Some((disk, mut p)) =
        active_pair_over_a_pausable_device(|c| c.data_path_on("server1"), &[])
    else {
        return;
    };
    p.fill("server1", 0, 256 << 10, 0x71);
    p.wait_rpo_zero("server1", T);

    let paused = disk.pause();
    let nbd = NbdClient::connect(&p.socket("server1"), "md1").expect("NBD connect");
    let offsets = (0..4u64).map(|i| MIB + (i << 16)).collect();
    let client = tests::nbd_client::writes_in_background(nbd, offsets, 0x72);
    let s1 = p.wait_status("server1", "the stalled data disk", T, |s| {
        s["disk"]["io_stalled_secs"].is_u64()
    });
    assert_eq!(s1["color"], "RED", "{s1:#}");
    let next1 = s1["next_step"].as_str().unwrap_or("");
    assert!(
        next1.contains("the data disk of md1 has completed no request")
            && next1.contains("move the service to server2")
            && next1.contains("`mdctrl force server2 md1`"),
        "{s1:#}"
    );

    // server2, connected, is told and says where the service can go.
    let s2 = p.wait_status("server2", "server1's stalled data disk", T, |s| {
        s["pair"]["peer_disk"]["stalled"] == "data disk"
    });
    let next2 = s2["next_step"].as_str().unwrap_or("");
    assert!(
        next2.contains("server1 reports its data disk stalled")
            && next2.contains("move the service here")
            && next2.contains("`mdctrl force server2 md1`"),
        "{s2:#}"
    );
    let table = p.mdctrl_ok("server2", &["status", "md1"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Disk Error") && l.trim_end().ends_with("STALLED")),
        "{table}"
    );

    // The failover, while server1's disk still stalls.
    p.agent("server1").send_sigterm();
    p.agent("server1").wait_for_log(
        "shutdown abandoned: the data disk of md1 has completed none of its",
        T,
    );
    p.wait_status("server2", "the lost link to server1", T, |s| {
        s["pair"]["connection"] != "connected"
    });
    p.mdctrl_ok("server2", &["force", "server2", "md1"]);
    p.activate("server2");
    p.fill("server2", 2 * MIB, 64 << 10, 0x73);
    let mut nbd2 = p.connect("server2");
    assert_eq!(nbd2.read(0, 4096).expect("read"), vec![0x71; 4096]);
    let _ = nbd2.disconnect();

    // The disk answers again: server1's agent exits, restarts, loses (R12).
    paused.resume();
    let status = p.agent_mut("server1").wait_exit(T);
    assert!(!status.success(), "{status:?}");
    client.join().expect("client thread");
    rejoin_as_the_forced_failovers_loser(&mut p);
    p.assert_identical();
    stop(&mut p, "server1");
}

/// The standby's cluster partition stalls (server2's, behind nbdkit's pause
/// filter) while the pair mirrors: its periodic write check waits, and once
/// nothing completed for `timeouts.io_stall` (1 s here) server2 is RED and
/// tells server1, whose status names the stalled device. Replication goes
/// on (a standby writes no metadata per write). When the device answers
/// again both clear it by themselves.
#[test]
fn standby_cluster_partition_stall_is_told_to_the_active_and_its_end_too() {
    let Some((faulty, p)) = active_pair_over_a_pausable_device(|c| c.cp_path_on("server2"), &[])
    else {
        return;
    };

    let paused = faulty.pause();
    standby_stall_is_told(&p, "metadata_stalled_secs", "cluster partition");
    p.fill("server1", 0, 256 << 10, 0x75);
    p.wait_rpo_zero("server1", T);

    paused.resume();
    let s1 = standby_stall_end_is_told(&p, "metadata_stalled_secs");
    assert!(s1["pair"]["in_sync"] == true, "{s1:#}");
    p.assert_identical();
}

/// The standby's data disk stalls (server2's data file behind nbdkit's pause
/// filter; buffered, as FUSE takes no O_DIRECT) under replicated writes. The
/// stalled write holds that write, not server2's agent: its peer link keeps
/// answering heartbeats for several `heartbeat_timeout`s (1 s), server2 is RED
/// and tells server1, whose status names server2's stalled data disk, and the
/// mirror does not break (the ack timeout is set longer than the stall). Once
/// the disk answers the client's writes complete, both nodes clear the stall
/// by themselves, and the nodes are identical.
/// A standby write that blocked its runtime worker plainly (without
/// `block_in_place`) would keep the task it had just woken, the link's
/// sender with the write's ack1, in that worker's LIFO slot, out of the other
/// worker's reach: the heartbeats stop and server1 loses the link
/// (`engine::inline`).
#[test]
fn standby_data_disk_stall_keeps_the_link_and_is_told_to_the_active() {
    let Some((disk, p)) =
        active_pair_over_a_pausable_device(|c| c.data_path_on("server2"), &[("ack", "120s")])
    else {
        return;
    };
    p.fill("server1", 0, 256 << 10, 0x76);
    p.wait_rpo_zero("server1", T);

    let paused = disk.pause();
    let mut nbd = NbdClient::connect(&p.socket("server1"), "md1").expect("NBD connect");
    let client = std::thread::spawn(move || {
        for i in 0..4u64 {
            nbd.send_write(i + 1, MIB + (i << 16), &[0x77; 4096], false)
                .expect("send");
        }
        let mut r = nbd.reply_reader().expect("reader");
        (0..4)
            .map(|_| NbdClient::read_reply(&mut r).expect("reply").error)
            .collect::<Vec<_>>()
    });
    standby_stall_is_told(&p, "io_stalled_secs", "data disk");
    // The link lives on while the stall lasts three heartbeat timeouts.
    p.wait_status("server2", "a stall of 3 s", T, |s2| {
        let s1 = p.status("server1");
        assert_eq!(s1["pair"]["connection"], "connected", "{s1:#}");
        assert_eq!(s1["pair"]["rpo"]["breaks"], 0, "{s1:#}");
        s2["disk"]["io_stalled_secs"].as_u64().unwrap_or(0) >= 3
    });
    assert!(
        !client.is_finished(),
        "the sync writes did not wait for the standby's stalled disk"
    );

    paused.resume();
    assert_eq!(client.join().expect("client thread"), vec![0; 4]);
    let s1 = standby_stall_end_is_told(&p, "io_stalled_secs");
    assert_eq!(s1["pair"]["rpo"]["breaks"], 0, "{s1:#}");
    p.wait_rpo_zero("server1", T);
    p.assert_identical();
}

/// The cluster partition of the standby fails (server2's, behind nbdkit's
/// error filter) while the pair is connected. A standby writes no metadata per
/// replicated write; its periodic write check (`metadata_check_interval`)
/// finds the failure, without a reconnect or any other metadata write.
/// server2 is then RED ("cannot be activated") and refuses `activate`;
/// server1 is told at once, on the same link, and says that server2 cannot
/// take over. server2 serves as a standby meanwhile; after the repair and its
/// agent's restart the pair resyncs what it missed and is identical.
#[test]
fn standby_cluster_partition_failure_is_shown_on_both_nodes() {
    let Some((faulty, mut p)) = pair_with_faulty_cluster_partition("server2") else {
        return;
    };
    p.activate("server1");
    p.wait_in_sync("server1", T);
    p.fill("server1", 0, 256 << 10, 0x61);
    faulty.fail_writes(true);
    // Replication needs no metadata write on the standby.
    p.fill("server1", 6 * MIB, 256 << 10, 0x62);
    p.wait_rpo_zero("server1", T);

    let s2 = p.wait_status("server2", "the failed cluster partition", T, |s| {
        s["disk"]["metadata_error"].is_string()
    });
    assert_eq!(s2["color"], "RED", "{s2:#}");
    let next2 = s2["next_step"].as_str().unwrap_or("");
    assert!(
        next2.contains("the cluster partition of md1 failed")
            && next2.contains("cannot be activated")
            && next2.contains("restart this agent"),
        "{s2:#}"
    );
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    assert!(out.contains("cluster partition"), "{out}");
    let s1 = p.wait_status("server1", "server2's failed cluster partition", T, |s| {
        s["pair"]["peer_disk"]["metadata_error"].is_string() && s["pair"]["in_sync"] == true
    });
    let next1 = s1["next_step"].as_str().unwrap_or("");
    assert!(
        next1.contains("the cluster partition of server2 failed")
            && next1.contains("server2 cannot be activated")
            && next1.contains("no failover target"),
        "{s1:#}"
    );
    // The table on the active shows it too.
    let table = p.mdctrl_ok("server1", &["status", "md1"]);
    assert!(table.contains("FAILED"), "{table}");
    p.fill("server1", 2 * MIB, 64 << 10, 0x63);

    // Repaired: server2's agent restarts on the working partition.
    faulty.fail_writes(false);
    stop(&mut p, "server2");
    start(&mut p, "server2");
    p.wait_recovered("server1", T);
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    let s2 = p.status("server2");
    assert!(s2["disk"]["metadata_error"].is_null(), "{s2:#}");
    p.fill("server1", 3 * MIB, 64 << 10, 0x64);
    p.wait_rpo_zero("server1", T);
    p.assert_identical();
    stop(&mut p, "server2");
}
