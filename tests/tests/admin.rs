//! The agent's admin behaviour through the real `mdctrl`: refusals and exit
//! codes, status counters, socket lifetimes and modes, access control,
//! deactivation under a streaming client, SIGTERM, configuration errors and
//! `init`.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tests::nbd_client::{NbdClient, NBD_ESHUTDOWN};
use tests::run::{all_output, cmdline, describe, run};
use tests::wait::wait_until;
use tests::{require_root, require_tool, ClusterOpts, TestCluster, CMD_TIMEOUT};

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn assert_socket_0600(p: &Path) {
    let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    assert!(
        md.file_type().is_socket(),
        "{} is not a socket",
        p.display()
    );
    assert_eq!(mode_of(p), 0o600, "mode of {}", p.display());
}

#[test]
fn activate_twice_is_refused() {
    let (c, agent) = TestCluster::standalone_active(ClusterOpts::default());
    let out = c.mdctrl_expect(&["activate", "md1"], 3);
    assert!(out.contains("already active"), "{out}");
    // The refusal changed nothing: still serving.
    assert!(c.nbd_socket().exists());
    assert_eq!(c.status_json()["role"], "active");
    agent.wait_for_log("activate refused", Duration::from_secs(5));
}

#[test]
fn deactivate_when_inactive_is_refused() {
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    let agent = c.start_agent();
    let out = c.mdctrl_expect(&["deactivate", "md1"], 3);
    assert!(out.contains("not active"), "{out}");
    // The ancestor's spelling too.
    let out = c.mdctrl_expect(&["--deactive", "md1"], 3);
    assert!(out.contains("not active"), "{out}");
    agent.wait_for_log("deactivate refused", Duration::from_secs(5));
}

#[test]
fn status_json_tracks_client_io() {
    if !require_tool("qemu-io") {
        return;
    }
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    let _agent = c.start_agent();
    let s = c.status_json();
    assert_eq!(s["resource"], "md1", "{s:#}");
    assert_eq!(s["role"], "inactive", "{s:#}");
    assert_eq!(s["size"], c.opts.size, "{s:#}");
    assert_eq!(s["nbd_socket"], serde_json::Value::Null, "{s:#}");
    for k in [
        "connections_open",
        "connections_total",
        "requests",
        "errors",
        "read_bytes",
        "written_bytes",
    ] {
        assert_eq!(s["nbd"][k], 0, "{k} before any client: {s:#}");
    }

    c.activate();
    let s = c.status_json();
    assert_eq!(s["role"], "active", "{s:#}");
    assert_eq!(
        s["nbd_socket"],
        c.nbd_socket().display().to_string(),
        "{s:#}"
    );

    let out = run(
        std::process::Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x11 0 1M",
                "-c",
                "read -P 0x11 0 1M",
            ])
            .arg(c.nbd_uri()),
        CMD_TIMEOUT,
    );
    assert!(
        out.status.success() && !all_output(&out).contains("fail"),
        "qemu-io: {}",
        all_output(&out)
    );
    // The server notices the disconnect asynchronously.
    let s = wait_until(
        "connections_open to drop to 0",
        Duration::from_secs(10),
        || {
            let s = c.status_json();
            (s["nbd"]["connections_open"] == 0).then_some(s)
        },
    );
    let n = &s["nbd"];
    assert!(n["connections_total"].as_u64() >= Some(1), "{s:#}");
    assert!(n["requests"].as_u64() >= Some(2), "{s:#}");
    assert!(n["written_bytes"].as_u64() >= Some(1 << 20), "{s:#}");
    assert!(n["read_bytes"].as_u64() >= Some(1 << 20), "{s:#}");
    assert_eq!(n["errors"], 0, "{s:#}");

    // An out-of-range read is an error reply, counted.
    let mut client = NbdClient::connect(&c.nbd_socket(), "md1").expect("NBD connect");
    assert_eq!(client.size, c.opts.size);
    assert!(
        client.read(c.opts.size, 4096).is_err(),
        "read past the end succeeded"
    );
    let s2 = c.status_json();
    assert_eq!(s2["nbd"]["connections_open"], 1, "{s2:#}");
    assert_eq!(s2["nbd"]["errors"], 1, "{s2:#}");
    client.disconnect().expect("disconnect");

    // Counters survive deactivation (totals of past servers).
    c.deactivate();
    let s3 = c.status_json();
    assert_eq!(s3["role"], "inactive", "{s3:#}");
    assert_eq!(s3["nbd"]["errors"], 1, "{s3:#}");
    assert!(
        s3["nbd"]["written_bytes"].as_u64() >= Some(1 << 20),
        "{s3:#}"
    );
    assert_eq!(s3["nbd"]["connections_open"], 0, "{s3:#}");
}

#[test]
fn sockets_exist_only_while_active_with_mode_0600() {
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    let _agent = c.start_agent();
    assert_socket_0600(&c.admin_socket());
    assert!(
        !c.nbd_socket().exists(),
        "NBD socket exists before activation"
    );
    for _ in 0..2 {
        c.activate();
        assert_socket_0600(&c.nbd_socket());
        c.deactivate();
        assert!(
            !c.nbd_socket().exists(),
            "NBD socket still exists after deactivation"
        );
    }
    assert_socket_0600(&c.admin_socket());
}

/// `mdctrl ARGS` as uid/gid 65534 (nobody). The binary is copied into the
/// (world-readable) test dir: the build tree may not be reachable for nobody.
fn mdctrl_as_nobody(c: &TestCluster, args: &[&str]) -> (std::process::Output, String) {
    let copy = c.dir().join("mdctrl-for-nobody");
    if !copy.exists() {
        std::fs::copy(tests::bins::mdctrl(), &copy).expect("copying mdctrl");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
            .expect("chmod mdctrl copy");
        // A process forked by another test thread while the copy was open for
        // writing holds that fd until it execs: exec then fails with ETXTBSY
        // for a moment. Wait until the copy can be executed.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::process::Command::new(&copy).arg("--version").output() {
                Err(e)
                    if e.raw_os_error() == Some(libc::ETXTBSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot execute {}: {e}", copy.display()),
                Ok(_) => break,
            }
        }
    }
    let mut cmd = std::process::Command::new(&copy);
    cmd.arg("--config")
        .arg(&c.config_path)
        .arg("--node")
        .arg(c.node())
        .args(args);
    cmd.uid(65534).gid(65534);
    let line = cmdline(&cmd);
    (run(&mut cmd, CMD_TIMEOUT), line)
}

/// A standalone cluster whose admin socket nobody (uid 65534) can connect
/// to: the mode widened to 0666, so that the SO_PEERCRED check (the real
/// gate; the mode is defence in depth) is what refuses.
fn cluster_with_open_admin_socket() -> (TestCluster, tests::Agent) {
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    c.make_world_readable();
    let agent = c.start_agent();
    std::fs::set_permissions(c.admin_socket(), std::fs::Permissions::from_mode(0o666))
        .expect("chmod admin socket");
    (c, agent)
}

#[test]
fn non_root_caller_is_refused_by_the_credential_check_and_logged() {
    if !require_root("running mdctrl as another user", &[]) {
        return;
    }
    let (c, agent) = cluster_with_open_admin_socket();
    let (out, line) = mdctrl_as_nobody(&c, &["activate", "md1"]);
    assert!(
        !out.status.success(),
        "nobody's activate succeeded\n{}",
        describe(&line, &out)
    );
    agent.wait_for_log("refused connection", Duration::from_secs(5));
    agent.assert_log_contains("uid 65534");
    // Nothing happened, and root still gets in.
    assert_eq!(c.status_json()["role"], "inactive");
    assert!(!c.nbd_socket().exists());
}

#[test]
fn non_root_caller_gets_exit_3_permission_denied() {
    if !require_root("running mdctrl as another user", &[]) {
        return;
    }
    let (c, agent) = cluster_with_open_admin_socket();
    for _ in 0..5 {
        let (out, line) = mdctrl_as_nobody(&c, &["status", "md1"]);
        assert_eq!(out.status.code(), Some(3), "{}", describe(&line, &out));
        assert!(
            all_output(&out)
                .to_lowercase()
                .contains("permission denied"),
            "{}",
            describe(&line, &out)
        );
    }
    agent.assert_log_contains("refused connection");
}

#[test]
fn non_root_caller_is_refused_with_the_default_socket_mode() {
    if !require_root("running mdctrl as another user", &[]) {
        return;
    }
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    c.make_world_readable();
    let _agent = c.start_agent();
    let (out, line) = mdctrl_as_nobody(&c, &["activate", "md1"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a permission refusal is exit 3 (refused)\n{}",
        describe(&line, &out)
    );
    assert!(
        all_output(&out)
            .to_lowercase()
            .contains("permission denied"),
        "{}",
        describe(&line, &out)
    );
    assert_eq!(c.status_json()["role"], "inactive");
}

/// Shared state of the streaming client.
#[derive(Default)]
struct Stream {
    /// seq -> block index, for every write sent.
    sent: HashMap<u64, u64>,
    /// seq -> NBD error of its reply.
    replies: HashMap<u64, u32>,
    /// Replies with error 0.
    ok: u64,
    /// The reply stream ended (EOF or error).
    closed: Option<String>,
}

const BLOCK: usize = 4096;

fn block_pattern(seq: u64, block: u64) -> Vec<u8> {
    let mut v = vec![(seq as u8) ^ 0x5a; BLOCK];
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v[8..16].copy_from_slice(&block.to_le_bytes());
    v
}

#[test]
fn deactivate_while_a_client_streams_writes() {
    let (c, agent) = TestCluster::standalone_active(ClusterOpts::default());
    let nblocks = c.opts.size / BLOCK as u64;
    let window = 16usize;
    let mut client = NbdClient::connect(&c.nbd_socket(), "md1").expect("NBD connect");
    let mut reader = client.reply_reader().expect("clone socket");
    let state = Arc::new((Mutex::new(Stream::default()), Condvar::new()));

    let st = Arc::clone(&state);
    let reader_thread = std::thread::spawn(move || loop {
        let r = NbdClient::read_reply(&mut reader);
        let (m, cv) = &*st;
        let mut g = m.lock().unwrap();
        match r {
            Ok(rep) => {
                assert!(
                    g.sent.contains_key(&rep.handle),
                    "reply for unknown handle {}",
                    rep.handle
                );
                assert!(
                    g.replies.insert(rep.handle, rep.error).is_none(),
                    "two replies for handle {}",
                    rep.handle
                );
                if rep.error == 0 {
                    g.ok += 1;
                }
            }
            Err(e) => {
                g.closed = Some(e.to_string());
                cv.notify_all();
                return;
            }
        }
        cv.notify_all();
    });

    let st = Arc::clone(&state);
    let writer_thread = std::thread::spawn(move || {
        let mut seq = 0u64;
        loop {
            {
                let (m, cv) = &*st;
                let mut g = m.lock().unwrap();
                while g.sent.len() - g.replies.len() >= window && g.closed.is_none() {
                    g = cv.wait_timeout(g, Duration::from_millis(100)).unwrap().0;
                }
                if g.closed.is_some() {
                    return format!("reply stream closed after {seq} writes sent");
                }
                seq += 1;
                g.sent.insert(seq, seq % nblocks);
            }
            let block = seq % nblocks;
            if let Err(e) =
                client.send_write(seq, block * BLOCK as u64, &block_pattern(seq, block), false)
            {
                return format!("send failed after {seq} writes: {e}");
            }
        }
    });

    // Let the stream run, then deactivate under it.
    wait_until("300 acknowledged writes", Duration::from_secs(30), || {
        (state.0.lock().unwrap().ok >= 300).then_some(())
    });
    let acked_before = state.0.lock().unwrap().ok;
    c.deactivate();
    let (m, cv) = &*state;
    {
        let mut g = m.lock().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while g.closed.is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the connection was not closed within 20s of deactivation"
            );
            g = cv.wait_timeout(g, Duration::from_millis(100)).unwrap().0;
        }
    }
    let why = writer_thread.join().expect("writer thread");
    reader_thread.join().expect("reader thread");
    eprintln!("writer stopped: {why}");
    agent.assert_log_contains("deactivated");

    let g = m.lock().unwrap();
    let shut = g.replies.values().filter(|e| **e == NBD_ESHUTDOWN).count();
    eprintln!(
        "sent {} writes, {} acknowledged ({acked_before} before deactivate), {shut} refused with ESHUTDOWN, {} unanswered",
        g.sent.len(),
        g.ok,
        g.sent.len() - g.replies.len()
    );
    assert!(g.ok >= acked_before, "acknowledged writes went backwards");
    // Later requests failed (ESHUTDOWN) or were never answered; nothing else.
    for (seq, err) in &g.replies {
        assert!(
            *err == 0 || *err == NBD_ESHUTDOWN,
            "write {seq} failed with NBD error {err}"
        );
    }
    // Every acknowledged write is in the data file; a block whose later
    // write was sent but never answered may hold that one instead.
    let mut last_ok: HashMap<u64, u64> = HashMap::new();
    for (seq, err) in &g.replies {
        if *err == 0 {
            let b = g.sent[seq];
            let e = last_ok.entry(b).or_insert(*seq);
            *e = (*e).max(*seq);
        }
    }
    let data = std::fs::read(c.data_path()).expect("reading the data file");
    let mut ambiguous = 0;
    for (block, ok_seq) in &last_ok {
        let off = *block as usize * BLOCK;
        let got = &data[off..off + BLOCK];
        let unanswered: Vec<u64> = g
            .sent
            .iter()
            .filter(|(s, b)| *b == block && **s > *ok_seq && !g.replies.contains_key(s))
            .map(|(s, _)| *s)
            .collect();
        if got == block_pattern(*ok_seq, *block).as_slice() {
            continue;
        }
        ambiguous += 1;
        assert!(
            unanswered
                .iter()
                .any(|s| got == block_pattern(*s, *block).as_slice()),
            "block {block}: acknowledged write {ok_seq} lost (file holds seq {})",
            u64::from_le_bytes(got[..8].try_into().unwrap())
        );
    }
    assert!(
        ambiguous <= window,
        "{ambiguous} blocks hold unanswered writes, more than the window {window}"
    );
    let s = c.status_json();
    assert_eq!(s["role"], "inactive", "{s:#}");
    assert_eq!(s["nbd"]["connections_open"], 0, "{s:#}");
}

#[test]
fn misaligned_request_is_refused_and_the_connection_survives() {
    let (c, _agent) = TestCluster::standalone_active(ClusterOpts::default());
    let min = c.config.resources[0].nbd_block_size_min;
    assert!(
        min > 1,
        "the export advertises byte granularity; nothing to test"
    );
    let mut client = NbdClient::connect(&c.nbd_socket(), "md1").expect("NBD connect");
    let err = client
        .write(1, &vec![0xaa; min as usize], false)
        .expect("write reply");
    assert_eq!(err, 22, "misaligned write: expected NBD_EINVAL");
    assert_eq!(
        client
            .write(0, &vec![0xbb; min as usize], true)
            .expect("write reply"),
        0
    );
    assert_eq!(
        client.read(0, min as u32).expect("read"),
        vec![0xbb; min as usize]
    );
    assert_eq!(client.flush().expect("flush reply"), 0);
    client.disconnect().expect("disconnect");
    let s = c.status_json();
    assert_eq!(s["nbd"]["errors"], 1, "{s:#}");
}

#[test]
fn sigterm_deactivates_cleanly_and_removes_sockets() {
    let (c, mut agent) = TestCluster::standalone_active(ClusterOpts::default());
    let status = agent.terminate();
    assert!(
        status.success(),
        "agent exit status after SIGTERM: {status}"
    );
    agent.assert_log_contains("SIGTERM");
    agent.assert_log_contains("deactivated");
    agent.assert_log_contains("agent stopped");
    assert!(!c.nbd_socket().exists(), "NBD socket left behind");
    assert!(!c.admin_socket().exists(), "admin socket left behind");
    // The deactivation was recorded: the was-active flag is clear.
    let out = c.mdctrl_ok(&["dump-md", "md1"]);
    let flags = out
        .lines()
        .find(|l| l.starts_with("flags:"))
        .unwrap_or_else(|| panic!("no flags line:\n{out}"));
    assert!(
        !flags.contains("was-active"),
        "was-active still set after a clean shutdown:\n{out}"
    );
    // And a restart works, inactive.
    agent.restart();
    assert_eq!(c.status_json()["role"], "inactive");
}

#[test]
fn unknown_resource_names_the_configured_ones() {
    let c = TestCluster::standalone(ClusterOpts::default());
    // Without an agent: refused by mdctrl itself.
    let out = c.mdctrl_expect(&["dump-md", "md9"], 2);
    assert!(out.contains("md9") && out.contains("md1"), "{out}");
    c.init();
    let _agent = c.start_agent();
    for args in [
        &["status", "md9"][..],
        &["activate", "md9"],
        &["deactivate", "md9"],
    ] {
        let out = c.mdctrl_expect(args, 2);
        assert!(
            out.contains("md9") && out.contains("md1"),
            "{args:?}: {out}"
        );
    }
}

fn replace_line(text: &str, starts_with: &str, new: &str) -> String {
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if !found && l.trim_start().starts_with(starts_with) {
                found = true;
                new.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "no line starting with {starts_with:?} in:\n{text}");
    out.join("\n") + "\n"
}

#[test]
fn config_unknown_key_is_a_usage_error_naming_file_and_key() {
    let c = TestCluster::standalone(ClusterOpts::default());
    let text = c.config_text();
    c.write_config_text(&replace_line(
        &text,
        "mode =",
        "mode = \"sync\"\nbogus_key = 1",
    ));
    let out = c.mdctrl_expect(&["status", "md1"], 2);
    assert!(
        out.contains("resource[0].bogus_key") || out.contains("resource.md1.bogus_key"),
        "message does not name the key:\n{out}"
    );
    assert!(
        out.contains(&c.config_path.display().to_string()),
        "message does not name the file:\n{out}"
    );
    // The agent refuses to start on it, with the same detail.
    let mut agent = c.spawn_agent_on(c.node());
    let status = agent.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    agent.assert_log_contains("bogus_key");
}

#[test]
fn config_bad_size_is_a_usage_error_naming_file_and_key() {
    let c = TestCluster::standalone(ClusterOpts::default());
    let text = c.config_text();
    c.write_config_text(&replace_line(&text, "size =", "size = \"64 potatoes\""));
    let out = c.mdctrl_expect(&["init", "md1"], 2);
    assert!(
        out.contains("resource.md1.size") || out.contains("resource[0].size"),
        "message does not name the key:\n{out}"
    );
    assert!(
        out.contains("potatoes"),
        "message does not quote the bad value:\n{out}"
    );
    assert!(
        out.contains(&c.config_path.display().to_string()),
        "message does not name the file:\n{out}"
    );
    assert!(
        !c.data_path().exists(),
        "init created a data file from a bad config"
    );
}

fn uuid_of(init_output: &str) -> String {
    init_output
        .split("metadata uuid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no uuid in init output:\n{init_output}"))
        .to_string()
}

#[test]
fn init_refuses_to_overwrite_and_force_works() {
    let c = TestCluster::standalone(ClusterOpts::default());
    let first = c.mdctrl_ok(&["init", "md1"]);
    assert!(first.contains("created sparse"), "{first}");
    assert_eq!(
        std::fs::metadata(c.data_path()).expect("data file").len(),
        c.opts.size
    );
    let out = c.mdctrl_expect(&["init", "md1"], 3);
    assert!(
        out.contains("--force"),
        "refusal should tell about --force:\n{out}"
    );
    let out = c.mdctrl_expect(&["--create", "md1"], 3);
    assert!(out.contains("--force"), "{out}");
    let second = c.mdctrl_ok(&["init", "--force", "md1"]);
    assert!(second.contains("existing"), "{second}");
    assert_ne!(
        uuid_of(&first),
        uuid_of(&second),
        "--force did not re-create the metadata"
    );
    let third = c.mdctrl_ok(&["--create", "force", "md1"]);
    assert_ne!(
        uuid_of(&second),
        uuid_of(&third),
        "--create force did not re-create the metadata"
    );
    // While an agent holds the cluster partition, even --force is refused.
    let _agent = c.start_agent();
    let out = c.mdctrl_expect(&["init", "--force", "md1"], 3);
    assert!(!out.is_empty());
    let dump = c.mdctrl_ok(&["dump-md", "md1"]);
    assert!(
        dump.contains(&uuid_of(&third)),
        "metadata changed under the agent:\n{dump}"
    );
}

/// One raw admin request line on a fresh connection; the parsed response.
fn admin_raw(socket: &Path, line: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect admin socket");
    s.write_all(format!("{line}\n").as_bytes())
        .expect("send request");
    let mut resp = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut resp)
        .expect("read response");
    serde_json::from_str(&resp).unwrap_or_else(|e| panic!("response is not JSON ({e}): {resp}"))
}

/// The `watch` request: answers at once without a version; with one, waits
/// for a change (here: an activation from another connection) and returns
/// the new version; a timeout above the limit is a bad request.
#[test]
fn watch_waits_for_a_change_and_bounds_its_timeout() {
    let c = TestCluster::standalone(ClusterOpts::default());
    c.init();
    let _agent = c.start_agent();
    let sock = c.admin_socket();
    let r = admin_raw(&sock, r#"{"op":"watch","resource":"md1"}"#);
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["result"]["status"]["role"], "inactive", "{r:#}");
    let v0 = r["result"]["version"].as_u64().expect("version");
    let r = admin_raw(
        &sock,
        r#"{"op":"watch","resource":"md1","timeout_ms":600000}"#,
    );
    assert_eq!(r["ok"], false, "{r:#}");
    assert_eq!(r["error"]["kind"], "bad_request", "{r:#}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("timeout_ms 600000"),
        "{r:#}"
    );
    // A watcher waiting up to 60 s returns with a newer version once another
    // client activates (without the change it would time out at v0).
    let sock2 = sock.clone();
    let watcher = std::thread::spawn(move || {
        admin_raw(
            &sock2,
            &format!(r#"{{"op":"watch","resource":"md1","version":{v0},"timeout_ms":60000}}"#),
        )
    });
    c.mdctrl_ok(&["activate", "md1", "--nomount"]);
    let r = watcher.join().expect("watcher thread");
    assert_eq!(r["ok"], true, "{r:#}");
    assert!(
        r["result"]["version"].as_u64().expect("version") > v0,
        "the activation did not bump the version: {r:#}"
    );
    assert_eq!(r["result"]["status"]["role"], "active", "{r:#}");
}

/// A data disk that stalls under client writes (a buffered data file behind
/// nbdkit's pause filter; buffered, because FUSE takes no O_DIRECT) holds
/// those writes, not the agent: `mdctrl status` still answers while they
/// wait, and they complete once the disk answers again. The status says so
/// once nothing completed for `timeouts.io_stall` (1 s here): RED,
/// `disk.io_stalled_secs`, `Disk Error STALLED` in the table; GREEN again
/// after the disk resumed.
/// Until 2026-12-06 the engines wrote up to 64 KiB into the page cache in
/// the calling task: one such write, stalled, kept a runtime worker, and with
/// it the admin socket, from answering (the portable engine's run, every
/// time).
fn status_answers_while_the_data_disk_stalls(engine: tests::cluster::Engine) {
    if !tests::require_tools(&["nbdfuse", "nbdkit", "fusermount3"]) {
        return;
    }
    let c = TestCluster::standalone(ClusterOpts::new(engine));
    c.set_timeout("io_stall", "1s");
    c.init();
    let disk = tests::faultfile::FaultyFile::take_over(&c.data_path());
    let mut agent = c.start_agent();
    c.activate();
    let mut nbd = NbdClient::connect(&c.nbd_socket(), "md1").expect("NBD connect");
    assert_eq!(nbd.write(0, &[0x91; 4096], false).expect("write"), 0);
    assert!(c.status_json()["disk"]["io_stalled_secs"].is_null());

    let paused = disk.pause();
    // Small writes (the size the engines copy into the page cache themselves)
    // and a large one, pipelined, from a client thread (sending blocks once
    // the socket is full).
    let replies = std::thread::spawn(move || {
        for (i, len) in [4096usize, 65536, 4096, 1 << 20].into_iter().enumerate() {
            nbd.send_write(i as u64 + 1, (i as u64) << 21, &vec![0x92; len], false)
                .expect("send");
        }
        let mut r = nbd.reply_reader().expect("reader");
        (0..4)
            .map(|_| NbdClient::read_reply(&mut r).expect("reply").error)
            .collect::<Vec<_>>()
    });
    for _ in 0..3 {
        let mut cmd = c.mdctrl_cmd_on(c.node(), &["status", "md1", "--json"]);
        let out = run(&mut cmd, Duration::from_secs(10));
        assert!(
            out.status.success(),
            "status while the data disk stalls: {}",
            all_output(&out)
        );
    }
    let s = tests::wait::poll_until(Duration::from_secs(20), || {
        let s = c.status_json();
        s["disk"]["io_stalled_secs"].is_u64().then_some(s)
    })
    .expect("the status reports the stalled data disk");
    assert_eq!(s["color"], "RED", "{s:#}");
    let next = s["next_step"].as_str().unwrap_or("");
    assert!(
        next.contains("the data disk of md1 has completed no request for")
            && next.contains("stalled")
            && next.contains("client I/O waits"),
        "{s:#}"
    );
    let table = c.mdctrl_ok(&["status", "md1"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Disk Error") && l.contains("STALLED")),
        "{table}"
    );
    agent.wait_for_log(
        "the data disk has completed none of its",
        Duration::from_secs(10),
    );
    assert!(
        !replies.is_finished(),
        "the writes did not wait for the stalled disk"
    );
    paused.resume();
    assert_eq!(replies.join().expect("replies"), vec![0; 4]);
    let s = c.status_json();
    assert!(s["disk"]["io_stalled_secs"].is_null(), "{s:#}");
    assert_eq!(s["color"], "GREEN", "{s:#}");
    agent.wait_for_log("the data disk answers again", Duration::from_secs(10));
    agent.terminate();
}

#[test]
fn status_answers_while_the_data_disk_stalls_portable() {
    status_answers_while_the_data_disk_stalls(tests::cluster::Engine::Portable);
}

/// The product's default engine choice (io_uring here; buffered, as FUSE
/// takes no O_DIRECT).
#[test]
fn status_answers_while_the_data_disk_stalls_default_engine() {
    status_answers_while_the_data_disk_stalls(tests::cluster::Engine::Default);
}

/// An active standalone agent on a data file behind nbdkit's pause filter,
/// with `timeouts.io_stall` set to `io_stall`, and a client connected to it
/// that wrote one block (0x93 at 0).
fn agent_on_a_pausable_disk(
    io_stall: &str,
) -> Option<(
    TestCluster,
    tests::faultfile::FaultyFile,
    tests::agent::Agent,
    NbdClient,
)> {
    if !tests::require_tools(&["nbdfuse", "nbdkit", "fusermount3"]) {
        return None;
    }
    let c = TestCluster::standalone(ClusterOpts::default());
    c.set_timeout("io_stall", io_stall);
    c.init();
    let disk = tests::faultfile::FaultyFile::take_over(&c.data_path());
    let agent = c.start_agent();
    c.activate();
    let mut nbd = NbdClient::connect(&c.nbd_socket(), "md1").expect("NBD connect");
    assert_eq!(nbd.write(0, &[0x93; 4096], false).expect("write"), 0);
    Some((c, disk, agent, nbd))
}

/// Sends writes on `nbd` from a thread (its disk is paused) and returns once
/// the agent has them in progress. The thread ends when the agent closes the
/// connection.
fn stalled_writes(c: &TestCluster, nbd: NbdClient) -> std::thread::JoinHandle<()> {
    let offsets = (1..=4u64).map(|i| i << 20).collect();
    let client = tests::nbd_client::writes_in_background(nbd, offsets, 0x94);
    wait_until(
        "the writes to wait on the stalled disk",
        Duration::from_secs(20),
        || (c.status_json()["disk"]["io_pending"].as_u64() >= Some(1)).then_some(()),
    );
    client
}

/// An agent whose data disk stalls gives up its graceful stop: the wind-down
/// (drain the NBD requests, flush, record the state) would wait as long as
/// the disk stalls, keeping the node's links alive, and an operator stops
/// the agent precisely to move the service away from a node in trouble. It
/// is abandoned once the disk made no progress for `timeouts.io_stall` (1 s
/// here), with the reason in the log, while the disk still stalls; the
/// process exits (non-zero) once the kernel lets go of the thread blocked in
/// the stalled request. The data is as after a crash: a restarted agent
/// serves what was acknowledged.
#[test]
fn stopping_an_agent_whose_data_disk_stalls_does_not_wait_for_the_disk() {
    let Some((c, disk, mut agent, nbd)) = agent_on_a_pausable_disk("1s") else {
        return;
    };
    let paused = disk.pause();
    let client = stalled_writes(&c, nbd);
    agent.send_sigterm();
    agent.wait_for_log(
        "shutdown abandoned: the data disk of md1 has completed none of its",
        Duration::from_secs(20),
    );
    paused.resume();
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status:?}");
    client.join().expect("client thread");
    agent.start_again();
    agent.wait_ready();
    c.activate();
    let mut nbd = NbdClient::connect(&c.nbd_socket(), "md1").expect("NBD connect");
    assert_eq!(nbd.read(0, 4096).expect("read"), vec![0x93; 4096]);
    let _ = nbd.disconnect();
    assert!(agent.terminate().success());
}

/// A second SIGTERM ends a wind-down that waits for a stalled disk before
/// `timeouts.io_stall` (30 s, the default) has passed.
#[test]
fn a_second_sigterm_ends_a_shutdown_that_waits_for_the_disk() {
    let Some((c, disk, mut agent, nbd)) = agent_on_a_pausable_disk("30s") else {
        return;
    };
    let paused = disk.pause();
    let client = stalled_writes(&c, nbd);
    agent.send_sigterm();
    agent.wait_for_log("SIGTERM: shutting down", Duration::from_secs(10));
    assert!(
        agent.is_running(),
        "the wind-down waits for the stalled writes"
    );
    agent.send_sigterm();
    agent.wait_for_log(
        "shutdown abandoned: a second SIGTERM",
        Duration::from_secs(10),
    );
    paused.resume();
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status:?}");
    client.join().expect("client thread");
}
