//! Replication between two real agents (separate processes on temp files):
//! writes in every mode reach the standby byte for byte; `kill -9` of the
//! standby or of the active at random points; refused links (secret, names,
//! size); malformed frames from an authenticated fake peer; network faults
//! through a proxy (delay, stall, blackhole, reset, cut and heal, one-way
//! loss, a flapping link under a write stream) and, as root with `nft`, a
//! partition between two network namespaces; a standby whose block device
//! stalls (its writes of the ended session land before the next session's).
//!
//! Seeded tests print their seed; `NBD_MIRROR_SEED` reproduces a run and
//! `NBD_MIRROR_TRIALS` changes the number of kill trials.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mirror_proto::{Message, Role};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tests::data::{assert_files_equal, random_bytes, read_range, sha256};
use tests::fakepeer::{FakePeer, Identity};
use tests::mirror::{connection, dirty_regions, MirrorPair, PairOpts};
use tests::nbd_client::NbdClient;
use tests::proxy::{Dir, Proxy};
use tests::wait::poll_until;

const VOL: u64 = 16 << 20;
const REGION: u64 = 64 << 10;
const T: Duration = Duration::from_secs(15);

fn trials(default: usize) -> usize {
    std::env::var("NBD_MIRROR_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn connect(p: &MirrorPair, node: &str) -> NbdClient {
    NbdClient::connect(&p.socket(node), p.c.resource())
        .unwrap_or_else(|e| panic!("NBD connect to {node}: {e}"))
}

/// A write of unique data at a 4 KiB-aligned offset.
fn one_write(c: &mut NbdClient, off: u64, len: usize, tag: u64, shadow: Option<&mut [u8]>) {
    let data = random_bytes(len, tag);
    let err = c
        .write(off, &data, tag.is_multiple_of(5))
        .unwrap_or_else(|e| panic!("write at {off}+{len}: {e}"));
    assert_eq!(err, 0, "write at {off}+{len} failed with NBD error {err}");
    if let Some(s) = shadow {
        s[off as usize..off as usize + len].copy_from_slice(&data);
    }
}

fn break_recorded(s: &Value) -> bool {
    connection(s) != "connected"
        && !s["disk"]["break_time"].is_null()
        && s["pair"]["replicating"] == false
}

/// The status of an active node whose peer is gone: break recorded, peer
/// unreachable, and the advice says so.
fn assert_peer_unreachable(s: &Value) {
    assert_eq!(s["role"], "active", "{s:#}");
    assert_ne!(connection(s), "connected", "{s:#}");
    assert!(
        s["disk"]["break_time"].as_u64().is_some(),
        "no break_time: {s:#}"
    );
    assert_eq!(s["pair"]["in_sync"], false, "{s:#}");
    assert!(s["pair"]["last_break"].is_string(), "no last_break: {s:#}");
    assert!(
        s["next_step"]
            .as_str()
            .unwrap_or("")
            .contains("unreachable"),
        "next_step: {s:#}"
    );
    // The active holds the latest data: green in the ancestor's sense.
    assert_eq!(s["color"], "GREEN", "{s:#}");
}

// ---------------------------------------------------------------------------
// 1. Writes in each mode reach the standby.

fn writes_replicate(mode: &str) {
    let seed = tests::data::seed(&format!("writes_replicate({mode})"));
    let mut rng = StdRng::seed_from_u64(seed);
    let p = MirrorPair::start(&PairOpts::new(mode));
    p.activate("server1");
    let s = p.wait_status("server1", "replicating", T, |s| {
        s["pair"]["replicating"] == true
    });
    assert_eq!(s["pair"]["rpo"]["mode"], mode, "{s:#}");
    let mut shadow = vec![0u8; VOL as usize];
    let mut c = connect(&p, "server1");
    let mut reader = c.reply_reader().expect("reply reader");
    // Windows of pipelined writes to distinct 256 KiB slots (no overlap in
    // flight, so the expected image is defined).
    let mut n = 0u64;
    for w in 0..30 {
        let mut slots: Vec<u64> = (0..64).collect();
        let mut inflight = Vec::new();
        for i in 0..8 {
            let k = rng.gen_range(i..64);
            slots.swap(i, k);
            let off = slots[i] * (256 << 10) + rng.gen_range(0..32u64) * 4096;
            let len = rng.gen_range(1..=32usize) * 4096;
            let len = len.min((slots[i] + 1) as usize * (256 << 10) - off as usize);
            let tag = seed ^ (w * 100 + i as u64);
            let data = random_bytes(len, tag);
            c.send_write(n, off, &data, i % 3 == 0).expect("send write");
            inflight.push((n, off, data));
            n += 1;
        }
        for _ in 0..inflight.len() {
            let r = NbdClient::read_reply(&mut reader).expect("reply");
            assert_eq!(r.error, 0, "write {} failed", r.handle);
        }
        for (_, off, data) in inflight {
            shadow[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        if w % 10 == 9 {
            assert_eq!(c.flush().expect("flush"), 0);
        }
    }
    let s = p.wait_rpo_zero("server1", T);
    assert!(
        s["pair"]["rpo"]["writes_replicated"].as_u64().unwrap_or(0) >= n,
        "{s:#}"
    );
    assert_eq!(s["pair"]["rpo"]["writes_local_only"], 0, "{s:#}");
    assert_eq!(s["pair"]["in_sync"], true, "{s:#}");
    // Reads through NBD see the same data.
    assert_eq!(c.read(0, 1 << 20).expect("read"), &shadow[..1 << 20]);
    c.disconnect().expect("disconnect");
    p.deactivate("server1");
    let img = p.c.dir().join("expected.img");
    std::fs::write(&img, &shadow).expect("writing expected image");
    assert_files_equal(&p.data("server1"), &img, None);
    assert_files_equal(&p.data("server1"), &p.data("server2"), None);
    let s2 = p.status("server2");
    assert_eq!(s2["pair"]["in_sync"], true, "{s2:#}");
    assert_eq!(s2["disk"]["dirty_regions"], 0, "{s2:#}");
}

#[test]
fn writes_replicate_sync() {
    writes_replicate("sync")
}

#[test]
fn writes_replicate_semi() {
    writes_replicate("semi")
}

#[test]
fn writes_replicate_async() {
    writes_replicate("async")
}

// ---------------------------------------------------------------------------
// 2. kill -9 of the standby at random points.

fn sigkill(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions; `pid` is an unreaped
    // child of this process (reaped later by `Agent::kill9`), so it cannot
    // name another process.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

#[test]
fn kill_standby_at_random_points() {
    let seed = tests::data::seed("kill_standby_at_random_points");
    let mut rng = StdRng::seed_from_u64(seed);
    let modes = ["sync", "semi", "async"];
    for trial in 0..trials(20) {
        let mode = modes[trial % 3];
        let delay = Duration::from_millis(rng.gen_range(0..120));
        let tseed: u64 = rng.gen();
        let mut p = MirrorPair::start(&PairOpts::new(mode));
        p.activate("server1");
        p.wait_status("server1", "replicating", T, |s| {
            s["pair"]["replicating"] == true
        });
        let gen_before = p.status("server1")["disk"]["current_generation"].clone();
        let pid = p.a2.pid();
        let killed = Arc::new(AtomicBool::new(false));
        let k2 = Arc::clone(&killed);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            sigkill(pid);
            k2.store(true, Ordering::SeqCst);
        });
        // A write stream over the first half of the volume until the kill
        // happened, and a few writes more.
        let mut c = connect(&p, "server1");
        let mut trng = StdRng::seed_from_u64(tseed);
        let mut after = 0;
        let mut n = 0u64;
        while after < 5 {
            if killed.load(Ordering::SeqCst) {
                after += 1;
            }
            let off = trng.gen_range(0..(VOL / 2 / 4096 - 16)) * 4096;
            one_write(
                &mut c,
                off,
                trng.gen_range(1..=16usize) * 4096,
                tseed ^ n,
                None,
            );
            n += 1;
        }
        killer.join().expect("killer thread");
        p.a2.kill9();
        let s = p.wait_status("server1", "the break to be recorded", T, break_recorded);
        assert_peer_unreachable(&s);
        assert_ne!(
            s["disk"]["current_generation"], gen_before,
            "generation did not move at the break: {s:#}"
        );
        // Writes after the break land in fresh regions of the second half: each is dirty.
        let mut regions = BTreeSet::new();
        for i in 0..6u64 {
            let off = VOL / 2
                + trng.gen_range(0..(VOL / 2 / REGION)) * REGION
                + trng.gen_range(0..8u64) * 4096;
            let len = 4096 * trng.gen_range(1..=8usize);
            one_write(&mut c, off, len, tseed ^ (1000 + i), None);
            assert_eq!(
                c.read(off, len as u32).expect("read back"),
                random_bytes(len, tseed ^ (1000 + i))
            );
            for r in off / REGION..=(off + len as u64 - 1) / REGION {
                regions.insert(r);
            }
        }
        let dirty = dirty_regions(&p.c.cp_path_on("server1"));
        let missing: Vec<_> = regions.difference(&dirty).collect();
        assert!(missing.is_empty(), "trial {trial} ({mode}): regions {missing:?} written after the break are not dirty (dirty: {dirty:?})");
        let s = p.status("server1");
        assert!(
            s["disk"]["dirty_regions"].as_u64().unwrap_or(0) >= regions.len() as u64,
            "{s:#}"
        );
        assert_eq!(s["nbd"]["errors"], 0, "{s:#}");
        assert!(
            s["pair"]["rpo"]["writes_local_only"].as_u64().unwrap_or(0) >= 6,
            "{s:#}"
        );
        assert!(
            s["pair"]["rpo"]["breaks"].as_u64().unwrap_or(0) >= 1,
            "{s:#}"
        );
        // The RPO meter's age counts them: the peer lacks them, in flight or not.
        p.wait_status(
            "server1",
            "the RPO age of the writes made during the break",
            T,
            |s| {
                s["pair"]["rpo"]["oldest_not_durable_ms"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0
            },
        );
        eprintln!(
            "trial {trial}: {mode}, kill after {delay:?}, {n} writes before, dirty {}",
            dirty.len()
        );
    }
}

// ---------------------------------------------------------------------------
// 3. kill -9 of the active in sync mode: no acknowledged write is lost.

#[test]
fn kill_active_in_sync_mode_loses_no_acknowledged_write() {
    let seed = tests::data::seed("kill_active_in_sync_mode");
    let mut rng = StdRng::seed_from_u64(seed);
    for trial in 0..trials(6) {
        let delay = Duration::from_millis(rng.gen_range(20..200));
        let tseed: u64 = rng.gen();
        let mut p = MirrorPair::start(&PairOpts::new("sync"));
        p.activate("server1");
        p.wait_status("server1", "replicating", T, |s| {
            s["pair"]["replicating"] == true
        });
        // Each write goes to its own 4 KiB slot (never overwritten), so
        // every acknowledged write must be found intact on the standby.
        let mut slots: Vec<u64> = (0..VOL / 4096).collect();
        let mut trng = StdRng::seed_from_u64(tseed);
        for i in 0..slots.len() {
            let k = trng.gen_range(i..slots.len());
            slots.swap(i, k);
        }
        let writes: Vec<(u64, usize)> = slots.iter().map(|s| (s * 4096, 4096)).collect();
        let mut c = connect(&p, "server1");
        let mut reader = c.reply_reader().expect("reply reader");
        let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
        let acked2 = Arc::clone(&acked);
        let replies = std::thread::spawn(move || {
            while let Ok(r) = NbdClient::read_reply(&mut reader) {
                if r.error == 0 {
                    acked2.lock().unwrap().push(r.handle);
                }
            }
        });
        let pid = p.a1.pid();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            sigkill(pid);
        });
        // Keep up to 8 writes in flight until the socket dies.
        let mut sent = 0usize;
        while sent < writes.len() {
            let done = acked.lock().unwrap().len();
            if sent - done >= 8 {
                if replies.is_finished() {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let (off, len) = writes[sent];
            if c.send_write(
                sent as u64,
                off,
                &random_bytes(len, tseed ^ sent as u64),
                false,
            )
            .is_err()
            {
                break;
            }
            sent += 1;
        }
        killer.join().expect("killer");
        p.a1.kill9();
        replies.join().expect("reply thread");
        let acked = acked.lock().unwrap().clone();
        assert!(
            sent < writes.len(),
            "trial {trial}: the stream ended before the kill; make the volume larger"
        );
        for h in &acked {
            let (off, len) = writes[*h as usize];
            let got = read_range(&p.data("server2"), off, len);
            assert!(
                got == random_bytes(len, tseed ^ h),
                "trial {trial} (seed {seed}): acknowledged write {h} at {off}+{len} is not on the standby's data path"
            );
        }
        let s2 = p.wait_status("server2", "the standby to see the active gone", T, |s| {
            connection(s) != "connected"
        });
        assert_eq!(s2["role"], "inactive", "{s2:#}");
        eprintln!("trial {trial}: kill after {delay:?}: {} of {sent} writes acknowledged, all on the standby", acked.len());
    }
}

// ---------------------------------------------------------------------------
// 4. Refused links.

/// Starts server1 with the pair's config and server2 with `text2`; returns
/// the pair (a2 runs the second config) and the second cluster view.
fn mismatched(
    mut edit: impl FnMut(&str) -> String,
    res2: &str,
    size2: Option<u64>,
    reason: &[&str],
) {
    let c = MirrorPair::configure(&PairOpts::new("sync"));
    let text2 = edit(&c.config_text());
    let c2 = c.with_config_text("cluster-server2.toml", &text2);
    if let Some(size) = size2 {
        // The volume size in Hello is the data partition's real size.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.data_path_on("server2"))
            .expect("open data");
        f.set_len(size).expect("resizing server2's data path");
    }
    if res2 != "md1" || size2.is_some() {
        // Server2's own view of its resource needs its own metadata.
        let out = c2.mdctrl_on("server2", &["init", res2, "--blank", "--force"]);
        assert!(
            out.status.success(),
            "init on server2: {}",
            tests::run::all_output(&out)
        );
    }
    let sum2 = sha256(&c.data_path_on("server2"));
    let mut a1 = c.spawn_agent_on("server1");
    let mut a2 = c2.spawn_agent_on("server2");
    a1.wait_ready();
    a2.wait_ready();
    // Wait until one side reports the refusal in its status.
    let st = |cl: &tests::TestCluster, node: &str, res: &str| -> Value {
        let out = cl.mdctrl_on(node, &["status", res, "--json"]);
        serde_json::from_str(&tests::run::stdout(&out)).unwrap_or(Value::Null)
    };
    let refused = poll_until(T, || {
        let s1 = st(&c, "server1", "md1");
        let s2 = st(&c2, "server2", res2);
        [connection(&s1), connection(&s2)]
            .into_iter()
            .find(|c| c.starts_with("refused"))
    });
    let logs = format!("{}\n{}", a1.log(), a2.log());
    let refused = refused
        .unwrap_or_else(|| panic!("no side reports a refused connection within {T:?}\n{logs}"));
    let l = refused.to_lowercase();
    assert!(
        reason.iter().any(|r| l.contains(r)),
        "refusal {refused:?} does not name the reason {reason:?}"
    );
    assert!(
        reason.iter().any(|r| logs.to_lowercase().contains(r)),
        "the logs do not name the reason {reason:?}:\n{logs}"
    );
    // Activation cannot find a peer session; whatever it answers, nothing reaches server2.
    let out = c.mdctrl_on("server1", &["activate", "md1", "--nomount"]);
    eprintln!(
        "refusal: {refused}; activate on server1: {}: {}",
        out.status,
        tests::run::all_output(&out).trim()
    );
    if out.status.success() {
        let mut cl = NbdClient::connect(&c.nbd_socket_on("server1"), "md1").expect("connect");
        assert_eq!(cl.write(0, &vec![0xa5; 1 << 20], true).expect("write"), 0);
        assert_eq!(cl.flush().expect("flush"), 0);
        let s1 = st(&c, "server1", "md1");
        assert_eq!(
            s1["pair"]["replicating"], false,
            "replicating over a refused link: {s1:#}"
        );
    } else {
        let text = tests::run::all_output(&out);
        assert!(
            text.contains("refused") || text.contains("rejected"),
            "activation failed without naming the refused link: {text}"
        );
    }
    for (cl, node, res) in [(&c, "server1", "md1"), (&c2, "server2", res2)] {
        let s = st(cl, node, res);
        assert_ne!(
            connection(&s),
            "connected",
            "{node} connected despite the mismatch: {s:#}"
        );
    }
    assert_eq!(
        sha256(&c.data_path_on("server2")),
        sum2,
        "server2's data changed"
    );
    let s2 = st(&c2, "server2", res2);
    assert_eq!(s2["pair"]["standby_applying"], false, "{s2:#}");
}

#[test]
fn refused_wrong_secret() {
    mismatched(
        |t| {
            let dir = t
                .lines()
                .find(|l| l.starts_with("secret_file"))
                .expect("secret_file line");
            let path = dir.split('"').nth(1).expect("quoted path");
            let other = format!("{path}.other");
            std::fs::write(&other, format!("{}\n", "ab".repeat(32))).expect("second secret");
            std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod");
            t.replace(path, &other)
        },
        "md1",
        None,
        &["auth"],
    );
}

#[test]
fn refused_wrong_cluster_name() {
    mismatched(
        |t| t.replacen("name = \"demo\"", "name = \"other-cluster\"", 1),
        "md1",
        None,
        &["cluster name"],
    );
}

#[test]
fn refused_unknown_node_name() {
    // Server2 believes its peer is called server0 (still the dialer).
    mismatched(
        |t| {
            t.replace("name = \"server1\"", "name = \"server0\"")
                .replace("[resource.server.server1]", "[resource.server.server0]")
        },
        "md1",
        None,
        &["node name"],
    );
}

#[test]
fn refused_wrong_resource_name() {
    mismatched(
        |t| t.replace("name = \"md1\"", "name = \"md2\""),
        "md2",
        None,
        &["resource name"],
    );
}

#[test]
fn refused_wrong_volume_size() {
    mismatched(|t| t.to_string(), "md1", Some(VOL * 2), &["volume size"]);
}

// ---------------------------------------------------------------------------
// 5. Malformed frames from an authenticated peer.

fn identity(p: &tests::TestCluster, me: &str, peer: &str) -> Identity {
    Identity {
        node: me.to_string(),
        peer_node: peer.to_string(),
        cluster: "demo".to_string(),
        resource: p.resource().to_string(),
        volume_size: VOL,
        region_size: REGION as u32,
        secret: p.config.read_secret().expect("secret").as_bytes().to_vec(),
        role: Role::None,
    }
}

/// The bad frames: (name, bytes given the fake peer (for seq numbering), a
/// word the agent's log must contain about it).
type BadFrame = (&'static str, fn(&mut FakePeer) -> Vec<u8>, &'static str);

const FAKE_WRITE_OFF: u64 = VOL - REGION;

fn bad_frames() -> Vec<BadFrame> {
    fn write(f: &mut FakePeer) -> Vec<u8> {
        f.encode_next(Message::Write {
            offset: FAKE_WRITE_OFF,
            fua: true,
            data: vec![0xab; 65536].into(),
        })
    }
    vec![
        (
            "bad header CRC",
            |f| {
                let mut b = write(f);
                b[26] ^= 0x40;
                b
            },
            "header checksum",
        ),
        (
            "bad payload CRC",
            |f| {
                let mut b = write(f);
                let n = b.len();
                b[n - 100] ^= 0x01;
                b
            },
            "payload checksum",
        ),
        (
            "bad magic",
            |f| {
                let mut b = write(f);
                b[0] = b'X';
                tests::fakepeer::reseal_header(&mut b);
                b
            },
            "magic",
        ),
        (
            "oversized length",
            |f| {
                let mut b = f.encode_next(Message::Ping {
                    nonce: 1,
                    timestamp_ns: 2,
                });
                b[16..20].copy_from_slice(&(64u32 << 20).to_le_bytes());
                tests::fakepeer::reseal_header(&mut b);
                b
            },
            "exceeds the maximum",
        ),
        (
            "unknown kind",
            |f| {
                let mut b = f.encode_next(Message::Ping {
                    nonce: 1,
                    timestamp_ns: 2,
                });
                b[5] = 0x7e;
                tests::fakepeer::reseal_header(&mut b);
                b
            },
            "unknown message kind",
        ),
        (
            "Write to a node that is not the peer's standby",
            write,
            "not its standby",
        ),
    ]
}

/// Runs every bad frame against the agent at `node` (one fresh session
/// each, from `session`), checking the link is dropped, the reason logged
/// and the agent alive.
fn feed_bad_frames(agent: &mut tests::Agent, mut session: impl FnMut() -> FakePeer) {
    for (name, make, word) in bad_frames() {
        let mut f = session();
        f.ping(Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{name}: session not usable before the bad frame: {e}"));
        let before = agent.log().len();
        let bytes = make(&mut f);
        f.send_raw(&bytes)
            .unwrap_or_else(|e| panic!("{name}: sending: {e}"));
        let t0 = Instant::now();
        let closed = f.wait_closed(Duration::from_secs(5));
        let took = t0.elapsed();
        assert!(agent.is_running(), "{name}: the agent exited");
        if name.starts_with("Write to") {
            // A valid frame in the wrong state: the peer is told why.
            assert!(
                closed
                    .errors
                    .iter()
                    .any(|(code, _)| *code == mirror_proto::error_code::UNEXPECTED_MESSAGE),
                "{name}: expected Error(UNEXPECTED_MESSAGE) before the close, got {closed:?}"
            );
        }
        let found = poll_until(Duration::from_secs(3), || {
            let log = agent.log();
            let new = &log[before.min(log.len())..];
            new.lines()
                .find(|l| (l.contains("closed") || l.contains("ended")) && l.contains(word))
                .map(str::to_string)
        });
        let line = found.unwrap_or_else(|| {
            panic!(
                "{name}: the agent logged no closed link naming {word:?}:\n{}",
                agent.log()
            )
        });
        eprintln!(
            "{name}: link dropped after {took:?}, errors sent {:?}; log: {line}",
            closed.errors
        );
    }
}

#[test]
fn malformed_frames_to_a_standby_are_refused_and_nothing_applied() {
    let c = MirrorPair::configure(&PairOpts::new("sync"));
    tests::data::overwrite(&c.data_path_on("server2"), 0, VOL as usize, 0x11);
    let sum = sha256(&c.data_path_on("server2"));
    let mut a2 = c.start_agent_on("server2");
    let addr: SocketAddr = format!(
        "127.0.0.1:{}",
        c.config.resources[0]
            .node("server2")
            .expect("node")
            .mirror_port
    )
    .parse()
    .unwrap();
    let id = identity(&c, "server1", "server2");
    feed_bad_frames(&mut a2, || {
        poll_until(T, || FakePeer::dial(addr, &id).ok())
            .expect("the fake peer could not complete the handshake with server2")
    });
    assert_eq!(
        sha256(&c.data_path_on("server2")),
        sum,
        "server2's data path changed"
    );
    let out = c.mdctrl_on("server2", &["status", "md1", "--json"]);
    let s: Value = serde_json::from_str(&tests::run::stdout(&out)).expect("status");
    assert_eq!(s["pair"]["standby_applying"], false, "{s:#}");
    assert_eq!(s["role"], "inactive", "{s:#}");
}

#[test]
fn malformed_frames_to_an_active_break_the_mirror_cleanly() {
    let mut p = MirrorPair::start(&PairOpts::new("sync"));
    p.activate("server1");
    p.wait_status("server1", "replicating", T, |s| {
        s["pair"]["replicating"] == true
    });
    let port = p.c.config.resources[0]
        .node("server2")
        .expect("node")
        .mirror_port;
    p.a2.kill9();
    let l = TcpListener::bind(("127.0.0.1", port)).expect("taking over server2's mirror port");
    // A client keeps writing (first half of the volume) the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let mut c = connect(&p, "server1");
    let writer = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop2.load(Ordering::SeqCst) {
            let off = (n * 7 % 2048) * 4096;
            one_write(&mut c, off, 4096, n, None);
            n += 1;
        }
        c.disconnect().expect("disconnect");
        n
    });
    let id = identity(&p.c, "server2", "server1");
    feed_bad_frames(&mut p.a1, || {
        FakePeer::accept(&l, &id, T).expect("server1 did not redial the fake peer")
    });
    stop.store(true, Ordering::SeqCst);
    let n = writer.join().expect("the NBD client saw an error");
    assert!(n > 0);
    tests::data::assert_range_is(&p.data("server1"), FAKE_WRITE_OFF, REGION as usize, 0);
    let out = p.c.mdctrl_on("server1", &["status", "md1", "--json"]);
    let s: Value = serde_json::from_str(&tests::run::stdout(&out)).expect("status");
    assert_eq!(s["role"], "active", "{s:#}");
    assert_eq!(s["nbd"]["errors"], 0, "{s:#}");
    assert!(s["disk"]["break_time"].as_u64().is_some(), "{s:#}");
}

// ---------------------------------------------------------------------------
// 6. Network faults through a proxy between the agents.

/// A pair whose links run through proxies: server2 listens on 127.0.0.2,
/// server1 dials server2's `address` 127.0.0.1 where the proxies listen.
struct Proxied {
    p: MirrorPair,
    /// The data link's proxy (server2's mirror port).
    data: Proxy,
    /// The control link's proxy (server2's control port).
    _control: Proxy,
}

fn proxied(mode: &str) -> Proxied {
    proxied_with(mode, false)
}

/// [`proxied`], with TLS on the peer links when `tls` (each node its own
/// config file and certificate, as in `tests/tls.rs`).
fn proxied_with(mode: &str, tls: bool) -> Proxied {
    let mut o = PairOpts::new(mode);
    o.server2_listen = Some("127.0.0.2".to_string());
    let c = MirrorPair::configure(&o);
    let ctl = c.config.server("server2").expect("server2").control_port;
    let mp = c.config.resources[0]
        .node("server2")
        .expect("node")
        .mirror_port;
    let px = |port: u16| {
        Proxy::start(
            format!("127.0.0.1:{port}").parse().unwrap(),
            format!("127.0.0.2:{port}").parse().unwrap(),
        )
    };
    let control = px(ctl);
    let data = px(mp);
    let p = if tls {
        tests::tls::start_pair(&c)
    } else {
        MirrorPair::start_on(c)
    };
    p.activate("server1");
    p.wait_status("server1", "replicating", T, |s| {
        s["pair"]["replicating"] == true
    });
    assert!(
        data.forwarded() > 0,
        "the data link does not run through the proxy"
    );
    Proxied {
        p,
        data,
        _control: control,
    }
}

/// Median latency of `n` 4 KiB sync writes.
fn median_write_latency(c: &mut NbdClient, n: u64, tag: u64) -> Duration {
    let mut v: Vec<Duration> = (0..n)
        .map(|i| {
            let t = Instant::now();
            one_write(c, (i % 64) * 4096, 4096, tag + i, None);
            t.elapsed()
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}

#[test]
fn proxy_delay_slows_sync_writes_but_they_complete() {
    let x = proxied("sync");
    let mut c = connect(&x.p, "server1");
    let base = median_write_latency(&mut c, 20, 1);
    let delay = Duration::from_millis(50);
    x.data.delay(delay);
    let slow = median_write_latency(&mut c, 20, 100);
    // A sync write waits for Ack2: one round trip through the delayed proxy.
    assert!(
        slow >= delay * 2 - Duration::from_millis(5),
        "sync write latency {slow:?} with a {delay:?} delay each way (base {base:?})"
    );
    let s = x.p.status("server1");
    assert_eq!(connection(&s), "connected", "{s:#}");
    assert_eq!(s["pair"]["replicating"], true, "{s:#}");
    assert_eq!(s["pair"]["rpo"]["breaks"], 0, "{s:#}");
    x.data.heal();
    let healed = median_write_latency(&mut c, 20, 200);
    assert!(healed < delay, "latency {healed:?} after heal");
    eprintln!("sync write latency: base {base:?}, delayed {slow:?}, healed {healed:?}");
    c.disconnect().expect("disconnect");
    x.p.wait_rpo_zero("server1", T);
    x.p.deactivate("server1");
    assert_files_equal(&x.p.data("server1"), &x.p.data("server2"), None);
}

/// After the link came back: connected again. The post-break writes are
/// either still dirty and reported out of sync (no resync: automatic recovery
/// waits, and the status says why), or a resync (running, or about to start:
/// `auto_recovery` null) brought the pair back in sync with identical data.
fn assert_reconnected_after_break(p: &MirrorPair, dirty_written: &BTreeSet<u64>) {
    let s = p.wait_connected("server1", Duration::from_secs(20));
    let s2 = p.wait_connected("server2", T);
    assert_ne!(
        s["pair"]["sync"],
        mirror_agent::pair::DECIDING,
        "states received, not compared: {s:#}"
    );
    if s["pair"]["recovery"].is_null()
        && s["pair"]["in_sync"] == false
        && !s["pair"]["auto_recovery"].is_null()
    {
        assert_eq!(s["pair"]["replicating"], false, "{s:#}");
        assert_ne!(s["pair"]["sync"], "in sync", "{s:#}");
        assert!(
            s["pair"]["sync"].as_str().unwrap_or("").contains("server1"),
            "sync text does not say which side is newer: {s:#}"
        );
        let dirty = dirty_regions(&p.c.cp_path_on("server1"));
        assert!(
            dirty_written.is_subset(&dirty),
            "post-break regions {dirty_written:?} not all dirty: {dirty:?}"
        );
        assert_eq!(s2["pair"]["in_sync"], false, "{s2:#}");
        assert_eq!(
            s2["pair"]["standby_applying"], false,
            "standby applies writes while out of sync: {s2:#}"
        );
        eprintln!(
            "reconnected, out of sync: {} / next step: {}",
            s["pair"]["sync"], s["next_step"]
        );
    } else {
        p.wait_status(
            "server1",
            "the resync to finish",
            Duration::from_secs(30),
            |s| s["pair"]["in_sync"] == true && s["pair"]["replicating"] == true,
        );
        p.wait_rpo_zero("server1", T);
        p.deactivate("server1");
        assert_files_equal(&p.data("server1"), &p.data("server2"), None);
        eprintln!("reconnected and resynced");
    }
}

/// Writes after a break go to regions of the second half; returns them.
fn writes_after_break(c: &mut NbdClient, tag: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for i in 0..5u64 {
        let off = VOL / 2 + (tag * 7 + i * 13) % (VOL / 2 / REGION) * REGION;
        let t = Instant::now();
        one_write(c, off, 8192, tag + i, None);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a write after the break took {:?}",
            t.elapsed()
        );
        set.insert(off / REGION);
    }
    set
}

/// Stall or blackhole the data link for longer than the heartbeat timeout:
/// the write in flight completes (without error), the mirror breaks, the
/// active keeps serving; healing brings the link back.
fn silent_link(blackhole: bool) {
    let x = proxied("sync");
    let mut c = connect(&x.p, "server1");
    one_write(&mut c, 0, 4096, 1, None);
    if blackhole {
        x.data.blackhole();
    } else {
        x.data.stall();
    }
    let t = Instant::now();
    one_write(&mut c, 4096, 4096, 2, None);
    let took = t.elapsed();
    let s = x.p.wait_status("server1", "the break", T, break_recorded);
    assert_peer_unreachable(&s);
    assert!(s["pair"]["last_break"].is_string(), "{s:#}");
    assert!(
        took < Duration::from_secs(5),
        "the write in flight at the stall took {took:?}"
    );
    let dirty = writes_after_break(&mut c, 10);
    assert!(
        dirty_regions(&x.p.c.cp_path_on("server1")).contains(&0),
        "the write in flight at the break is not dirty"
    );
    x.data.heal();
    eprintln!(
        "write in flight at the fault took {took:?}; break: {}",
        s["pair"]["last_break"]
    );
    assert_reconnected_after_break(&x.p, &dirty);
}

#[test]
fn proxy_stall_longer_than_heartbeat_timeout_breaks_the_mirror() {
    silent_link(false)
}

#[test]
fn proxy_blackhole_breaks_the_mirror() {
    silent_link(true)
}

#[test]
fn proxy_reset_breaks_then_the_link_reconnects() {
    let x = proxied("semi");
    let mut c = connect(&x.p, "server1");
    one_write(&mut c, 0, 4096, 1, None);
    let accepted = x.data.accepted();
    x.data.reset();
    let s = x.p.wait_status("server1", "the break", T, |s| {
        !s["disk"]["break_time"].is_null()
    });
    assert!(s["pair"]["last_break"].is_string(), "{s:#}");
    let dirty = writes_after_break(&mut c, 20);
    assert_reconnected_after_break(&x.p, &dirty);
    assert!(
        x.data.accepted() > accepted,
        "no new connection through the proxy"
    );
}

#[test]
fn proxy_cut_and_heal() {
    let x = proxied("sync");
    let mut c = connect(&x.p, "server1");
    one_write(&mut c, 0, 4096, 1, None);
    x.data.cut();
    let s = x.p.wait_status("server1", "the break", T, break_recorded);
    assert_peer_unreachable(&s);
    let dirty = writes_after_break(&mut c, 30);
    // While cut, server1 keeps redialing and is refused each time.
    let accepted = x.data.accepted();
    wait_until_accepted(&x.data, accepted + 1);
    let s = x.p.status("server1");
    assert_ne!(connection(&s), "connected", "{s:#}");
    let s2 = x.p.status("server2");
    assert_ne!(connection(&s2), "connected", "{s2:#}");
    assert_eq!(s2["pair"]["standby_applying"], false, "{s2:#}");
    x.data.heal();
    assert_reconnected_after_break(&x.p, &dirty);
}

/// One direction of the data link loses every byte while the other keeps
/// flowing (a one-way firewall rule, a half-failed link); the control link is
/// untouched. The side that hears nothing gives up on the session, the
/// active's write in flight completes without error, the mirror breaks and the
/// active keeps serving with the regions dirty. Redials go through the half
/// link but no session comes up over it (the handshake needs both ways), and
/// the standby applies nothing; after the heal the pair reconnects.
fn one_way_loss(dir: Dir, tag: u64) {
    let x = proxied("sync");
    let mut c = connect(&x.p, "server1");
    one_write(&mut c, 0, 4096, 1, None);
    x.data.drop_one_way(dir);
    let t = Instant::now();
    one_write(&mut c, 4096, 4096, 2, None);
    let took = t.elapsed();
    let s = x.p.wait_status("server1", "the break", T, break_recorded);
    assert_peer_unreachable(&s);
    assert!(
        took < Duration::from_secs(5),
        "the write in flight at the one-way loss ({dir:?}) took {took:?}"
    );
    assert!(
        dirty_regions(&x.p.c.cp_path_on("server1")).contains(&0),
        "the write in flight at the break is not dirty"
    );
    let dirty = writes_after_break(&mut c, tag);
    let accepted = x.data.accepted();
    wait_until_accepted(&x.data, accepted + 1);
    let s = x.p.status("server1");
    assert_ne!(connection(&s), "connected", "{s:#}");
    assert_eq!(s["pair"]["replicating"], false, "{s:#}");
    let s2 = x.p.status("server2");
    assert_eq!(s2["pair"]["standby_applying"], false, "{s2:#}");
    x.data.heal();
    eprintln!(
        "one-way loss {dir:?}: write in flight took {took:?}; break: {}",
        s["pair"]["last_break"]
    );
    assert_reconnected_after_break(&x.p, &dirty);
}

#[test]
fn proxy_one_way_loss_active_to_standby() {
    one_way_loss(Dir::ToTarget, 40)
}

#[test]
fn proxy_one_way_loss_standby_to_active() {
    one_way_loss(Dir::FromTarget, 50)
}

/// A flapping data link under a steady stream of writes: seeded rounds
/// of a random fault (cut, reset, two-way blackhole, one-way loss either way),
/// each held until the active has lost the link and dials again, then healed, with the
/// writer running throughout; half the rounds first wait for the pair to be
/// connected again, the others strike while it may still be reconnecting or
/// resyncing. No client write may fail; once the link stays up the pair must
/// get back in sync on its own (automatic recovery) with both data files
/// equal to what the client wrote.
fn flapping_link(mode: &str, tls: bool) {
    let seed = tests::data::seed(&format!("flapping_link({mode}, tls {tls})"));
    let mut rng = StdRng::seed_from_u64(seed);
    let x = proxied_with(mode, tls);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let mut c = connect(&x.p, "server1");
        let (stop, done) = (stop.clone(), done.clone());
        let mut wrng = StdRng::seed_from_u64(seed ^ 0x5eed);
        std::thread::spawn(move || {
            let mut shadow = vec![0u8; VOL as usize];
            let mut tag = seed;
            while !stop.load(Ordering::SeqCst) {
                let len = wrng.gen_range(1..=16usize) * 4096;
                let off = wrng.gen_range(0..(VOL as usize - len) / 4096) as u64 * 4096;
                tag = tag.wrapping_add(1);
                one_write(&mut c, off, len, tag, Some(&mut shadow));
                done.fetch_add(1, Ordering::SeqCst);
            }
            c.disconnect().expect("disconnect");
            shadow
        })
    };
    let wait_writes = |n: u64, what: &str| {
        let target = done.load(Ordering::SeqCst) + n;
        tests::wait_until(what, Duration::from_secs(20), || {
            // A write that failed ended the writer with its panic (above).
            assert!(!writer.is_finished(), "the writer stopped: a write failed");
            (done.load(Ordering::SeqCst) >= target).then_some(())
        });
    };
    let mut applied = Vec::new();
    for round in 0..8 {
        wait_writes(rng.gen_range(5..40), "writes before the next fault");
        if rng.gen_bool(0.5) {
            x.p.wait_connected("server1", Duration::from_secs(20));
        }
        let before = x.p.status("server1");
        let accepted = x.data.accepted();
        let fault = rng.gen_range(0..5);
        match fault {
            0 => x.data.cut(),
            1 => x.data.reset(),
            2 => x.data.blackhole(),
            3 => x.data.drop_one_way(Dir::ToTarget),
            _ => x.data.drop_one_way(Dir::FromTarget),
        }
        let names = [
            "cut",
            "reset",
            "blackhole",
            "one-way to standby",
            "one-way to active",
        ];
        applied.push(names[fault]);
        // server1 dials again once its session ended (or at its next retry,
        // if there was none); a status poll could miss a reset session that
        // reconnected within milliseconds.
        tests::wait_until("server1 to redial after the fault", T, || {
            (x.data.accepted() > accepted).then_some(())
        });
        wait_writes(rng.gen_range(0..20), "writes while the link is down");
        x.data.heal();
        eprintln!(
            "round {round}: {} (pair was {}, {}; recovery: {} % done, finished {})",
            names[fault],
            connection(&before),
            before["pair"]["sync"],
            before["pair"]["recovery"]["percent"],
            before["pair"]["recovery"]["finished"]
        );
    }
    wait_writes(20, "writes after the last heal");
    stop.store(true, Ordering::SeqCst);
    let shadow = writer
        .join()
        .expect("the writer failed (a write got an error)");
    let s =
        x.p.wait_status("server1", "in sync again", Duration::from_secs(60), |s| {
            s["pair"]["in_sync"] == true && s["pair"]["replicating"] == true
        });
    assert_eq!(s["nbd"]["errors"], 0, "{s:#}");
    x.p.wait_rpo_zero("server1", T);
    x.p.deactivate("server1");
    let img = x.p.c.dir().join("expected.img");
    std::fs::write(&img, &shadow).expect("writing expected image");
    assert_files_equal(&x.p.data("server1"), &img, None);
    assert_files_equal(&x.p.data("server1"), &x.p.data("server2"), None);
    eprintln!(
        "flapping link ({mode}, tls {tls}): {} writes, faults {applied:?}",
        done.load(Ordering::SeqCst)
    );
}

#[test]
fn proxy_flapping_link_loses_no_write_sync() {
    flapping_link("sync", false)
}

#[test]
fn proxy_flapping_link_loses_no_write_async() {
    flapping_link("async", false)
}

/// The same over TLS peer links (no direct socket writes; the record layer
/// between the frames and the socket).
#[test]
fn proxy_flapping_link_loses_no_write_sync_tls() {
    flapping_link("sync", true)
}

fn wait_until_accepted(p: &Proxy, n: u64) {
    tests::wait_until(
        "server1 to redial through the cut proxy",
        Duration::from_secs(10),
        || (p.accepted() >= n).then_some(()),
    );
}

// ---------------------------------------------------------------------------
// 6b. A real partition: two network namespaces joined by veth, nftables drop.

/// Two network namespaces joined by a veth pair (10.99.0.1/24 and
/// 10.99.0.2/24, inside the namespaces only). Dropping it deletes both
/// namespaces, which removes the veth pair and every nftables rule in them,
/// also when the test panics.
struct Netns {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    tests::run_ok(
        std::process::Command::new("ip").args(args),
        tests::CMD_TIMEOUT,
    );
}

impl Netns {
    fn create() -> Netns {
        let id = std::process::id();
        let n = Netns {
            a: format!("nbdm-a-{id}"),
            b: format!("nbdm-b-{id}"),
        };
        ip(&["netns", "add", &n.a]);
        ip(&["netns", "add", &n.b]);
        let (va, vb) = (
            format!("nbdma{}", id % 100_000),
            format!("nbdmb{}", id % 100_000),
        );
        ip(&[
            "link", "add", &va, "netns", &n.a, "type", "veth", "peer", "name", &vb, "netns", &n.b,
        ]);
        for (ns, dev, addr) in [(&n.a, &va, "10.99.0.1/24"), (&n.b, &vb, "10.99.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }

    /// `nft ARGS` inside namespace `ns`.
    fn nft(ns: &str, args: &[&str]) {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", ns, "nft"]).args(args);
        tests::run_ok(&mut c, tests::CMD_TIMEOUT);
    }

    /// Drops everything between the two addresses, in `a`.
    fn partition(&self) {
        Self::nft(&self.a, &["add", "table", "inet", "nbdm"]);
        Self::nft(
            &self.a,
            &["add chain inet nbdm input { type filter hook input priority 0 ; policy accept ; }"],
        );
        Self::nft(&self.a, &["add chain inet nbdm output { type filter hook output priority 0 ; policy accept ; }"]);
        Self::nft(
            &self.a,
            &[
                "add",
                "rule",
                "inet",
                "nbdm",
                "input",
                "ip",
                "saddr",
                "10.99.0.2",
                "drop",
            ],
        );
        Self::nft(
            &self.a,
            &[
                "add",
                "rule",
                "inet",
                "nbdm",
                "output",
                "ip",
                "daddr",
                "10.99.0.2",
                "drop",
            ],
        );
    }

    fn heal(&self) {
        Self::nft(&self.a, &["delete", "table", "inet", "nbdm"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

#[test]
fn netns_partition_with_nftables_and_heal() {
    if !tests::require_root("network namespaces", &[]) || !tests::require_tools(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::create();
    let c = MirrorPair::configure(&PairOpts::new("sync"));
    let text = c
        .config_text()
        .replace(
            "name = \"server1\"\naddress = \"127.0.0.1\"",
            "name = \"server1\"\naddress = \"10.99.0.1\"",
        )
        .replace(
            "name = \"server2\"\naddress = \"127.0.0.1\"",
            "name = \"server2\"\naddress = \"10.99.0.2\"",
        );
    assert!(
        text.contains("10.99.0.1") && text.contains("10.99.0.2"),
        "addresses not replaced:\n{text}"
    );
    c.write_config_text(&text);
    let mut a1 = tests::Agent::spawn_wrapped(&c, "server1", &["ip", "netns", "exec", &ns.a]);
    let mut a2 = tests::Agent::spawn_wrapped(&c, "server2", &["ip", "netns", "exec", &ns.b]);
    a1.wait_ready();
    a2.wait_ready();
    let p = MirrorPair { c, a1, a2 };
    p.activate("server1");
    let s = p.wait_status("server1", "replicating", T, |s| {
        s["pair"]["replicating"] == true
    });
    assert!(
        s["pair"]["peer_address"]
            .as_str()
            .unwrap_or("")
            .starts_with("10.99.0.2"),
        "{s:#}"
    );
    let mut cl = connect(&p, "server1");
    one_write(&mut cl, 0, 65536, 1, None);
    ns.partition();
    one_write(&mut cl, 65536, 4096, 2, None);
    let s = p.wait_status("server1", "the break", T, break_recorded);
    assert_peer_unreachable(&s);
    let dirty = writes_after_break(&mut cl, 40);
    ns.heal();
    assert_reconnected_after_break(&p, &dirty);
}

/// An 8 MiB `sync` pair on the io_uring engine with O_DIRECT (agents
/// running, nothing active) whose server2 keeps its data on a loop device
/// over a [`tests::faultfile::FaultyFile`]: a block device that can stall.
/// The pair comes second so that it is dropped first.
fn pair_with_stallable_standby_disk() -> Option<(tests::faultfile::FaultyFile, MirrorPair)> {
    if !tests::require_root(
        "a stalling block device",
        &["/dev/fuse", "/dev/loop-control"],
    ) || !tests::require_tools(&["nbdfuse", "nbdkit", "fusermount3", "losetup"])
    {
        return None;
    }
    let mut o = PairOpts::sync_sized(8 << 20, &[]);
    o.cluster = tests::ClusterOpts::new(tests::cluster::Engine::IoUring).size(8 << 20);
    let c = MirrorPair::configure(&o);
    let disk = tests::faultfile::FaultyFile::take_over_as_loop_device(&c.data_path_on("server2"));
    Some((disk, MirrorPair::start_on(c)))
}

/// A standby whose disk stalls holds a replicated write in the disk and an
/// overlapping later one in its range lock; the active's ack timeout breaks
/// the mirror (the client's writes complete locally), the client writes
/// newer data to the same region, and the pair reconnects. Both writes of
/// the ended session must land before the next session writes anything (a
/// resync of that region): otherwise the held write lands after the
/// resync's copy and the standby keeps older data in a region the pair
/// believes in sync. After the disk resumes, the pair is in sync and
/// identical.
#[test]
fn writes_of_an_ended_session_land_before_the_next_session_writes() {
    let Some((disk, p)) = pair_with_stallable_standby_disk() else {
        return;
    };
    p.activate("server1");
    p.wait_in_sync("server1", T);
    p.fill("server1", 0, REGION, 0x81);
    p.wait_rpo_zero("server1", T);

    let paused = disk.pause();
    let mut c = connect(&p, "server1");
    c.send_write(1, 0, &vec![0x82; REGION as usize], false)
        .expect("send");
    c.send_write(2, 0, &vec![0x83; REGION as usize], false)
        .expect("send");
    for _ in 0..2 {
        let r = NbdClient::read_reply(&mut c.reply_reader().expect("reader")).expect("reply");
        assert_eq!(
            r.error, 0,
            "a write failed while the standby's disk stalled"
        );
    }
    // Newer data, local-only (the mirror broke on the ack timeout).
    assert_eq!(
        c.write(0, &vec![0x84; REGION as usize], false)
            .expect("write"),
        0
    );
    let _ = c.disconnect();
    // The next session is either held back until the held writes landed
    // (server2 says so), or (the bug) runs a resync into the stalled disk.
    let held = "waiting for the local writes of the ended session";
    let s = poll_until(T, || {
        let s = p.status("server1");
        let resyncing = !s["pair"]["recovery"].is_null();
        (resyncing || p.a2.log().contains(held)).then_some(s)
    })
    .unwrap_or_else(|| panic!("neither a resync nor a held session:\n{}", p.a2.log()));
    assert!(
        s["pair"]["recovery"].is_null(),
        "a resync into server2 started while writes of the ended session were still pending: {s:#}"
    );
    // server2 answers (its disk stalls, not its agent) and says why it waits.
    let s2 = p.wait_status(
        "server2",
        "the wait for the ended session's writes",
        T,
        |s| s["pair"]["ended_session_writes_secs"].is_u64(),
    );
    let next = s2["next_step"].as_str().unwrap_or("");
    assert!(
        next.contains("still completing on the local disk") && next.contains("stalled"),
        "{s2:#}"
    );
    let out = p.expect_code("server2", &["activate", "md1", "--nomount"], 3);
    assert!(
        out.contains("have not completed on the local disk"),
        "{out}"
    );
    paused.resume();
    p.wait_recovered("server1", T);
    p.wait_in_sync("server2", T);
    p.wait_rpo_zero("server1", T);
    assert!(read_range(&p.data("server2"), 0, REGION as usize)
        .iter()
        .all(|&b| b == 0x84));
    // A block device has no file size: compare the volumes' bytes.
    let size = 8 << 20;
    assert!(
        read_range(&p.data("server1"), 0, size) == read_range(&p.data("server2"), 0, size),
        "the nodes differ after the resync"
    );
}
