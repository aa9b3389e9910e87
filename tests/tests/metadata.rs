//! The cluster partition at agent start and in `mdctrl dump-md`: a blank
//! partition is initialised, garbage is refused, one corrupt superblock slot
//! is survived, two are refused (exit 6 naming expected and actual CRC), a
//! corrupt bitmap chunk is reported and its regions count as dirty; and a
//! partition that starts failing under a running agent.
//! Layout (docs/on-disk-format.md): slot 0 at 0, slot 1 at 4096, bitmap
//! chunks from 8192, 4096 bytes each.

use std::time::Duration;

use tests::data::{overwrite, random_bytes};
use tests::faultfile::FaultyFile;
use tests::nbd_client::NbdClient;
use tests::{ClusterOpts, TestCluster};

const SLOT_SIZE: u64 = 4096;
const BITMAP_OFFSET: u64 = 8192;

fn regions(c: &TestCluster) -> u64 {
    c.opts.size / c.opts.region_size
}

/// Corrupts the inside of a superblock slot (magic intact: a CRC failure).
fn corrupt_slot(c: &TestCluster, slot: u64) {
    overwrite(&c.cp_path(), slot * SLOT_SIZE + 1024, 64, 0xee);
}

#[test]
fn agent_initialises_an_all_zero_cluster_partition() {
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    let len = std::fs::metadata(c.cp_path()).expect("cp").len();
    overwrite(&c.cp_path(), 0, len as usize, 0);
    let agent = c.start_agent();
    agent.assert_log_contains("all zero: initialising");
    let dump = c.mdctrl_ok(&["dump-md", "md1"]);
    assert!(dump.contains("resource: md1"), "{dump}");
    c.activate();
}

#[test]
fn agent_refuses_a_cluster_partition_with_garbage() {
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    let len = std::fs::metadata(c.cp_path()).expect("cp").len() as usize;
    std::fs::write(c.cp_path(), random_bytes(len, 7)).expect("garbage");
    let mut agent = c.spawn_agent_on(c.node());
    let status = agent.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "agent started on garbage metadata");
    let log = agent.log();
    assert!(
        log.contains(&c.cp_path().display().to_string()),
        "log does not name the cluster partition:\n{log}"
    );
    assert!(log.contains("not usable"), "log does not say why:\n{log}");
    assert!(
        !c.admin_socket().exists(),
        "admin socket left by a refused start"
    );
    let out = c.mdctrl_expect(&["dump-md", "md1"], 6);
    assert!(out.contains("bad magic"), "{out}");
}

#[test]
fn one_corrupt_superblock_slot_is_survived() {
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    // A start/activate/stop cycle so both slots have been written.
    let mut agent = c.start_agent();
    c.activate();
    agent.terminate();
    // Corrupt the newest slot (the one `open` would choose): the harder case.
    let before = c.mdctrl_ok(&["dump-md", "md1"]);
    let newest: u64 = before
        .lines()
        .find_map(|l| l.strip_prefix("chosen: slot "))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no chosen slot in:\n{before}"));
    corrupt_slot(&c, newest);
    let dump = c.mdctrl_ok(&["dump-md", "md1"]);
    let bad = format!("slot {newest}");
    let line = dump
        .lines()
        .find(|l| l.starts_with(&bad))
        .unwrap_or_else(|| panic!("no {bad} line:\n{dump}"));
    assert!(
        line.contains("CRC mismatch") && line.contains("expected") && line.contains("actual"),
        "{dump}"
    );
    assert!(
        dump.contains(&format!("chosen: slot {}", 1 - newest)),
        "{dump}"
    );
    agent.start_again();
    agent.wait_ready();
    c.activate();
    assert_eq!(c.status_json()["role"], "active");
}

#[test]
fn both_superblock_slots_corrupt_are_refused() {
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    let mut agent = c.start_agent();
    agent.terminate();
    corrupt_slot(&c, 0);
    corrupt_slot(&c, 1);
    agent.start_again();
    let status = agent.wait_exit(Duration::from_secs(20));
    assert!(
        !status.success(),
        "agent started with both superblock slots corrupt"
    );
    let log = agent.log();
    assert!(
        log.contains(&c.cp_path().display().to_string()),
        "log does not name the cluster partition:\n{log}"
    );
    let out = c.mdctrl_expect(&["dump-md", "md1"], 6);
    for slot in ["slot 0", "slot 1"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(slot))
            .unwrap_or_else(|| panic!("no {slot} line:\n{out}"));
        assert!(
            line.contains("CRC mismatch") && line.contains("expected") && line.contains("actual"),
            "{out}"
        );
    }
    assert!(out.contains("damaged"), "{out}");
}

#[test]
fn corrupt_bitmap_chunk_is_reported_and_its_regions_are_dirty() {
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    // Clear every region through the metadata library, as a finished resync would.
    {
        let ident = bitmap::data_partition_identity(c.data_path()).expect("data identity");
        let storage = bitmap::FileStorage::open(c.cp_path()).expect("open cp");
        let check = bitmap::AttachCheck::new("md1", c.node(), &ident);
        let (cp, _) = bitmap::ClusterPartition::open(storage, &check).expect("attach cp");
        cp.clear_regions(0..cp.region_count())
            .expect("clear regions");
        assert_eq!(cp.dirty_count(), 0);
    }
    let dump = c.mdctrl_ok(&["dump-md", "md1"]);
    assert!(
        dump.contains(&format!("dirty: 0 of {}", regions(&c))),
        "{dump}"
    );
    // Damage chunk 0's bits (its header intact: a CRC failure).
    overwrite(&c.cp_path(), BITMAP_OFFSET + 512, 32, 0x00);
    overwrite(&c.cp_path(), BITMAP_OFFSET + 100, 8, 0xff);
    let out = c.mdctrl_expect(&["dump-md", "md1"], 6);
    assert!(
        out.contains("bad chunk 0") && out.contains("CRC mismatch"),
        "{out}"
    );
    assert!(
        out.contains(&format!("dirty: {n} of {n}", n = regions(&c))),
        "bad chunk's regions not dirty:\n{out}"
    );
    // The agent starts and treats the chunk's regions as dirty.
    let _agent = c.start_agent();
    let s = c.status_json();
    assert_eq!(s["disk"]["dirty_regions"], regions(&c), "{s:#}");
}

/// A cluster partition that fails under an idle agent: nothing is active,
/// so nothing writes metadata, yet the periodic write check
/// (`timeouts.metadata_check_interval`) finds it. The status turns RED with
/// `metadata_error` naming the check, and `activate` is refused, before any
/// client depended on this node.
#[test]
fn idle_agent_finds_a_failed_cluster_partition_by_its_periodic_check() {
    if !tests::require_tools(&["nbdfuse", "nbdkit", "fusermount3"]) {
        return;
    }
    let c = TestCluster::standalone(ClusterOpts::default());
    c.set_timeout("metadata_check_interval", "300ms");
    c.init();
    let faulty = FaultyFile::take_over(&c.cp_path());
    let mut agent = c.start_agent();
    assert_eq!(c.status_json()["color"], "GREEN");
    faulty.fail_writes(true);
    let s = tests::wait::poll_until(Duration::from_secs(20), || {
        let s = c.status_json();
        s["disk"]["metadata_error"].is_string().then_some(s)
    })
    .expect("the periodic check finds the failed cluster partition");
    assert_eq!(s["color"], "RED", "{s:#}");
    let why = s["disk"]["metadata_error"].as_str().unwrap_or("");
    assert!(
        why.contains("check: rewrite spare superblock slot") || why.contains("sync"),
        "{s:#}"
    );
    let next = s["next_step"].as_str().unwrap_or("");
    assert!(next.contains("cannot be activated"), "{s:#}");
    let out = c.mdctrl_expect(&["activate", "md1", "--nomount"], 3);
    assert!(out.contains("cluster partition"), "{out}");
    agent.wait_for_log("failed its periodic write check", Duration::from_secs(5));
    faulty.fail_writes(false);
    agent.terminate();
}

/// A FaultyFile whose test process died without its teardown (killed from
/// outside: simulated here by a work directory that names a dead process as
/// its owner, and a FaultyFile that is never dropped) is torn down by the
/// next FaultyFile made in the same temp dir: the mount is gone, its nbdfuse
/// no longer runs, the directory is removed. One owned by a live process
/// stays.
#[test]
fn a_faulty_file_left_by_a_killed_test_is_swept() {
    if !tests::require_tools(&["nbdfuse", "nbdkit", "fusermount3"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let image = tmp.path().join("image");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
    let abandoned = FaultyFile::attach_in(tmp.path(), &image);
    let work = abandoned.work_dir().to_path_buf();
    let nbdfuse = abandoned.nbdfuse_pid().expect("nbdfuse runs");
    let mut dead = std::process::Command::new("true").spawn().expect("true");
    let dead_pid = dead.id();
    dead.wait().expect("reaping true");
    std::fs::write(work.join("owner.pid"), dead_pid.to_string()).expect("owner.pid");
    std::mem::forget(abandoned);
    let mounted = || {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .contains(&work.join("mnt").display().to_string())
    };
    assert!(mounted(), "the abandoned file is mounted");

    let live = FaultyFile::attach_in(tmp.path(), &image);
    assert!(!mounted(), "the abandoned mount is gone");
    assert!(!work.exists(), "the abandoned work dir is removed");
    let state = std::fs::read_to_string(format!("/proc/{nbdfuse}/stat")).unwrap_or_default();
    let running = state
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .is_some_and(|s| s != "Z");
    assert!(!running, "the abandoned nbdfuse still runs: {state}");
    assert!(live.path().exists(), "the new faulty file works");
    tests::faultfile::sweep_abandoned(tmp.path());
    assert!(
        live.work_dir().exists(),
        "a live owner's file is left alone"
    );
}

/// A cluster partition that stalls (nbdkit's pause filter) under an idle
/// agent: its periodic check (every 300 ms here) waits, nothing completes,
/// and once that lasts `timeouts.io_stall` (1 s here) the status, which still
/// answers, says so: RED, `disk.metadata_stalled_secs`, `Cluster Partition
/// STALLED` in the table. When the device answers again the check completes,
/// nothing failed, and the node is GREEN.
#[test]
fn a_stalled_cluster_partition_shows_in_the_status() {
    if !tests::require_tools(&["nbdfuse", "nbdkit", "fusermount3"]) {
        return;
    }
    let c = TestCluster::standalone(ClusterOpts::default());
    c.set_timeout("metadata_check_interval", "300ms");
    c.set_timeout("io_stall", "1s");
    c.init();
    let faulty = FaultyFile::take_over(&c.cp_path());
    let mut agent = c.start_agent();
    assert_eq!(c.status_json()["color"], "GREEN");
    let paused = faulty.pause();
    let s = tests::wait::poll_until(Duration::from_secs(20), || {
        let s = c.status_json();
        s["disk"]["metadata_stalled_secs"].is_u64().then_some(s)
    })
    .expect("the status reports the stalled cluster partition");
    assert_eq!(s["color"], "RED", "{s:#}");
    assert!(s["disk"]["metadata_error"].is_null(), "{s:#}");
    let next = s["next_step"].as_str().unwrap_or("");
    assert!(
        next.contains("the cluster partition of md1 has completed no request for")
            && next.contains("stalled"),
        "{s:#}"
    );
    let table = c.mdctrl_ok(&["status", "md1"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Cluster Partition") && l.contains("STALLED")),
        "{table}"
    );
    agent.wait_for_log(
        "the cluster partition has completed none of its",
        Duration::from_secs(10),
    );
    paused.resume();
    let s = tests::wait::poll_until(Duration::from_secs(20), || {
        let s = c.status_json();
        s["disk"]["metadata_stalled_secs"].is_null().then_some(s)
    })
    .expect("the stall ends with the pause");
    assert_eq!(s["color"], "GREEN", "{s:#}");
    assert!(s["disk"]["metadata_error"].is_null(), "{s:#}");
    agent.wait_for_log(
        "the cluster partition answers again",
        Duration::from_secs(10),
    );
    agent.terminate();
}

/// A cluster partition that starts failing its writes under a running
/// standalone agent (behind nbdkit's error filter). A standalone volume
/// records no write intents (nothing is mirrored), so client writes go on;
/// the failure shows at the next metadata write, here `deactivate` (exit
/// non-zero naming it; serving stops all the same). The status is then RED
/// with `metadata_error`, `Cluster Partition FAILED` and the repair as next
/// step, and `activate` is refused. Once the device works again a restarted
/// agent activates on the same partition and serves the data intact.
#[test]
fn cluster_partition_failing_under_a_standalone_agent() {
    if !tests::require_tools(&["nbdfuse", "nbdkit", "fusermount3"]) {
        return;
    }
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    let faulty = FaultyFile::take_over(&c.cp_path());
    let mut agent = c.start_agent();
    c.activate();
    let far = c.opts.size - (64 << 10);
    let mut nbd = NbdClient::connect(&c.nbd_socket(), "md1").expect("NBD connect");
    assert_eq!(nbd.write(0, &[0x71; 4096], false).expect("write"), 0);
    faulty.fail_writes(true);
    assert_eq!(nbd.write(far, &[0x72; 4096], false).expect("write"), 0);
    let _ = nbd.disconnect();

    let out = c.mdctrl(&["deactivate", "md1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("cannot record deactivation in the cluster partition"),
        "deactivate: {out:?}"
    );
    let s = c.status_json();
    assert!(s["disk"]["metadata_error"].is_string(), "{s:#}");
    assert_eq!(s["color"], "RED", "{s:#}");
    assert_eq!(s["role"], "inactive", "{s:#}");
    let next = s["next_step"].as_str().unwrap_or("");
    assert!(
        next.contains("cannot be activated") && next.contains("restart this agent"),
        "{s:#}"
    );
    let table = c.mdctrl_ok(&["status", "md1"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Cluster Partition") && l.contains("FAILED")),
        "{table}"
    );
    let out = c.mdctrl_expect(&["activate", "md1", "--nomount"], 3);
    assert!(out.contains("cluster partition"), "{out}");

    faulty.fail_writes(false);
    agent.terminate();
    agent.start_again();
    agent.wait_ready();
    c.activate();
    let s = c.status_json();
    assert!(s["disk"]["metadata_error"].is_null(), "{s:#}");
    assert_eq!(s["color"], "GREEN", "{s:#}");
    let mut nbd = NbdClient::connect(&c.nbd_socket(), "md1").expect("NBD connect");
    assert_eq!(nbd.read(0, 4096).expect("read"), vec![0x71; 4096]);
    assert_eq!(nbd.read(far, 4096).expect("read"), vec![0x72; 4096]);
    let _ = nbd.disconnect();
    agent.terminate();
}
