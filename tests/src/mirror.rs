//! [`MirrorPair`]: a two-node [`TestCluster`] with short timeouts, both data
//! partitions initialised blank (declared identical), both agents running;
//! plus config rewrites the replication tests need (timeouts, replication
//! mode, a `listen_address` for a proxy between the nodes) and status helpers.

use std::time::Duration;

use serde_json::Value;

use crate::agent::Agent;
use crate::cluster::{ClusterOpts, TestCluster};
use crate::data::assert_files_equal;
use crate::nbd_client::NbdClient;
use crate::run::{all_output, describe};
use crate::wait::poll_until;

/// The `[timeouts]` values a replication test cluster uses (short, so that
/// breaks are detected within about a second).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// `timeouts.connect`.
    pub connect: Duration,
    /// `timeouts.send`.
    pub send: Duration,
    /// `timeouts.ack`.
    pub ack: Duration,
    /// `timeouts.receive`.
    pub receive: Duration,
    /// `timeouts.heartbeat_interval`.
    pub heartbeat_interval: Duration,
    /// `timeouts.heartbeat_timeout`.
    pub heartbeat_timeout: Duration,
    /// `timeouts.metadata_check_interval`.
    pub metadata_check_interval: Duration,
    /// `timeouts.io_stall`.
    pub io_stall: Duration,
}

impl Timing {
    /// heartbeat 200 ms / 1 s, ack 2 s, connect 2 s, send 2 s, receive 4 s,
    /// cluster partition check every 500 ms, io stall 30 s (the default).
    pub fn fast() -> Timing {
        Timing {
            connect: Duration::from_secs(2),
            send: Duration::from_secs(2),
            ack: Duration::from_secs(2),
            receive: Duration::from_secs(4),
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_secs(1),
            metadata_check_interval: Duration::from_millis(500),
            io_stall: Duration::from_secs(30),
        }
    }

    fn render(&self) -> String {
        let ms = |d: Duration| format!("\"{}ms\"", d.as_millis());
        format!(
            "[timeouts]\nconnect = {}\nsend = {}\nack = {}\nreceive = {}\nheartbeat_interval = {}\nheartbeat_timeout = {}\nmetadata_check_interval = {}\nio_stall = {}\n",
            ms(self.connect),
            ms(self.send),
            ms(self.ack),
            ms(self.receive),
            ms(self.heartbeat_interval),
            ms(self.heartbeat_timeout),
            ms(self.metadata_check_interval),
            ms(self.io_stall)
        )
    }
}

/// Replaces the `[timeouts]` table of the config text.
pub fn set_timeouts(c: &TestCluster, t: &Timing) {
    let text = c.config_text();
    let start = text
        .find("[timeouts]")
        .expect("generated config has a [timeouts] table");
    let end = text[start..]
        .find("\n\n")
        .map(|i| start + i + 1)
        .unwrap_or(text.len());
    let new = format!("{}{}{}", &text[..start], t.render(), &text[end..]);
    c.write_config_text(&new);
}

/// Sets `key = value` (value already TOML) in the `[[resource]]` table,
/// replacing an existing line of that key.
pub fn set_resource_key(c: &TestCluster, key: &str, value: &str) {
    let text = c.config_text();
    let mut out = String::new();
    let mut in_res = false;
    let mut done = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            if in_res && !done {
                panic!("no `{key}` line in the [[resource]] table to replace:\n{text}");
            }
            in_res = t == "[[resource]]";
        }
        if in_res && !done && t.split('=').next().map(str::trim) == Some(key) {
            out.push_str(&format!("{key} = {value}\n"));
            done = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(done, "no `{key}` line in the [[resource]] table:\n{text}");
    c.write_config_text(&out);
}

/// Adds `key = value` (TOML value) to the `[[server]]` table of `node`.
pub fn add_server_key(c: &TestCluster, node: &str, key: &str, value: &str) {
    let text = c.config_text();
    let mut out = String::new();
    let mut in_server = false;
    let mut done = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_server = t == "[[server]]";
        }
        out.push_str(line);
        out.push('\n');
        if in_server && !done && t == format!("name = \"{node}\"") {
            out.push_str(&format!("{key} = {value}\n"));
            done = true;
        }
    }
    assert!(done, "no [[server]] named {node}:\n{text}");
    c.write_config_text(&out);
}

/// A pair cluster with both agents running.
#[derive(Debug)]
pub struct MirrorPair {
    /// The cluster (config, paths, `mdctrl`).
    pub c: TestCluster,
    /// `server1`'s agent (the node that dials).
    pub a1: Agent,
    /// `server2`'s agent (the node that listens).
    pub a2: Agent,
}

/// How to build a [`MirrorPair`].
#[derive(Debug, Clone)]
pub struct PairOpts {
    /// Cluster options (engine, size, region size, extra resource keys).
    pub cluster: ClusterOpts,
    /// Replication mode (`sync`, `semi`, `async`).
    pub mode: String,
    /// Timeouts.
    pub timing: Timing,
    /// `listen_address` of `server2` (for a proxy on `server2`'s `address`).
    pub server2_listen: Option<String>,
}

impl PairOpts {
    /// `mode`, 16 MiB portable volume, 64 KiB regions, [`Timing::fast`].
    pub fn new(mode: &str) -> PairOpts {
        PairOpts {
            cluster: ClusterOpts::new(crate::cluster::Engine::Portable).size(16 << 20),
            mode: mode.to_string(),
            timing: Timing::fast(),
            server2_listen: None,
        }
    }

    /// Mode `sync`, a portable `size`-byte volume, extra resource keys (raw
    /// TOML values): what the recovery and rule-scenario tests start from.
    pub fn sync_sized(size: u64, keys: &[(&str, &str)]) -> PairOpts {
        let mut o = PairOpts::new("sync");
        let mut c = ClusterOpts::new(crate::cluster::Engine::Portable).size(size);
        for (k, v) in keys {
            c = c.resource_key(k, v);
        }
        o.cluster = c;
        o
    }
}

impl MirrorPair {
    /// Generates the cluster, applies `opts`, `init --blank` on both nodes,
    /// starts both agents (ready). Does not activate.
    pub fn start(opts: &PairOpts) -> MirrorPair {
        let c = Self::configure(opts);
        Self::start_on(c)
    }

    /// The cluster of [`start`](Self::start), configured and initialised,
    /// without agents.
    pub fn configure(opts: &PairOpts) -> TestCluster {
        let c = TestCluster::pair(opts.cluster.clone());
        set_timeouts(&c, &opts.timing);
        set_resource_key(&c, "mode", &format!("\"{}\"", opts.mode));
        if let Some(l) = &opts.server2_listen {
            add_server_key(&c, "server2", "listen_address", &format!("\"{l}\""));
        }
        for n in ["server1", "server2"] {
            let out = c.mdctrl_on(n, &["init", c.resource(), "--blank"]);
            assert!(
                out.status.success(),
                "init --blank on {n}\n{}",
                describe("mdctrl init --blank", &out)
            );
        }
        c
    }

    /// Starts both agents of an already configured cluster.
    pub fn start_on(c: TestCluster) -> MirrorPair {
        let a1 = c.spawn_agent_on("server1");
        let a2 = c.spawn_agent_on("server2");
        let mut p = MirrorPair { c, a1, a2 };
        p.a1.wait_ready();
        p.a2.wait_ready();
        p
    }

    /// `mdctrl --node NODE ARGS` and its output, asserting exit 0.
    pub fn mdctrl_ok(&self, node: &str, args: &[&str]) -> String {
        let out = self.c.mdctrl_on(node, args);
        assert!(
            out.status.success(),
            "mdctrl on {node} failed\n{}",
            describe(&args.join(" "), &out)
        );
        crate::run::all_output(&out)
    }

    /// `mdctrl activate md1 --nomount` on `node` (waits for the peer session).
    pub fn activate(&self, node: &str) {
        self.mdctrl_ok(node, &["activate", self.c.resource(), "--nomount"]);
    }

    /// `mdctrl deactivate md1` on `node`.
    pub fn deactivate(&self, node: &str) {
        self.mdctrl_ok(node, &["deactivate", self.c.resource()]);
    }

    /// `mdctrl status md1 --json` on `node`, parsed (panics unless exit 0).
    pub fn status(&self, node: &str) -> Value {
        let out = self.mdctrl_ok(node, &["status", self.c.resource(), "--json"]);
        let json = out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("status --json of {node} is not JSON ({e}):\n{out}"))
    }

    /// Polls `node`'s status until `pred` holds; panics with the last status.
    pub fn wait_status(
        &self,
        node: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        let got = poll_until(timeout, || {
            let s = self.status(node);
            let ok = pred(&s);
            last = s;
            ok.then(|| last.clone())
        });
        got.unwrap_or_else(|| {
            panic!("{node}: timed out after {timeout:?} waiting for {what}; last status:\n{last:#}")
        })
    }

    /// Waits until both sides report a connected, in-sync pair (after activation:
    /// replicating).
    pub fn wait_connected(&self, node: &str, timeout: Duration) -> Value {
        // Connected and the peer's state received (the session's first
        // control message follows the connection by a moment).
        self.wait_status(node, "a connected pair", timeout, |s| {
            connection(s) == "connected" && !s["pair"]["peer_disk"].is_null()
        })
    }

    /// `pair.rpo` unacknowledged writes (both levels) are zero.
    pub fn wait_rpo_zero(&self, node: &str, timeout: Duration) -> Value {
        self.wait_status(node, "rpo zero", timeout, |s| {
            let r = &s["pair"]["rpo"];
            r["unacked1_writes"].as_u64() == Some(0) && r["unacked2_writes"].as_u64() == Some(0)
        })
    }

    /// The data path of `node`.
    pub fn data(&self, node: &str) -> std::path::PathBuf {
        self.c.data_path_on(node)
    }

    /// The NBD socket of `node`.
    pub fn socket(&self, node: &str) -> std::path::PathBuf {
        self.c.nbd_socket_on(node)
    }

    /// An NBD client on `node`'s export (panics if the connection fails).
    pub fn connect(&self, node: &str) -> NbdClient {
        NbdClient::connect(&self.socket(node), self.c.resource())
            .unwrap_or_else(|e| panic!("NBD connect to {node}: {e}"))
    }

    /// Writes `len` bytes of `byte` at `off` through `node`'s export, then
    /// flushes; panics on any NBD error.
    pub fn fill(&self, node: &str, off: u64, len: u64, byte: u8) {
        let mut c = self.connect(node);
        let chunk = vec![byte; (1u64 << 20).min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            let err = c
                .write(off + done, &chunk[..n], false)
                .unwrap_or_else(|e| panic!("write at {}: {e}", off + done));
            assert_eq!(
                err,
                0,
                "write at {} failed with NBD error {err}",
                off + done
            );
            done += n as u64;
        }
        assert_eq!(c.flush().expect("flush"), 0, "flush failed");
        let _ = c.disconnect();
    }

    /// `mdctrl ARGS` on `node` expecting exit `code`; returns stdout+stderr.
    pub fn expect_code(&self, node: &str, args: &[&str], code: i32) -> String {
        let out = self.c.mdctrl_on(node, args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "expected exit {code}\n{}",
            describe(&args.join(" "), &out)
        );
        all_output(&out)
    }

    /// Waits until `node` reports a connected, in-sync pair.
    pub fn wait_in_sync(&self, node: &str, timeout: Duration) -> Value {
        self.wait_status(node, "an in-sync pair", timeout, in_sync)
    }

    /// Waits until `node` reports a finished recovery and an in-sync pair.
    pub fn wait_recovered(&self, node: &str, timeout: Duration) -> Value {
        self.wait_status(
            node,
            "a finished recovery and an in-sync pair",
            timeout,
            |s| in_sync(s) && s["pair"]["recovery"]["finished"] == true,
        )
    }

    /// Both nodes' data files are identical byte for byte.
    pub fn assert_identical(&self) {
        assert_files_equal(&self.data("server1"), &self.data("server2"), None);
    }

    /// The agent of `node`.
    pub fn agent(&self, node: &str) -> &Agent {
        if node == "server1" {
            &self.a1
        } else {
            &self.a2
        }
    }

    /// The agent of `node`, to stop or restart it.
    pub fn agent_mut(&mut self, node: &str) -> &mut Agent {
        if node == "server1" {
            &mut self.a1
        } else {
            &mut self.a2
        }
    }

    /// The configured `divergent_save_dir` of `node`.
    pub fn divergent_dir(&self, node: &str) -> std::path::PathBuf {
        self.c.config.resources[0]
            .node(node)
            .expect("node of the resource")
            .divergent_save_dir
            .clone()
    }

    /// The saved divergent image of `node` (exactly one expected) and its
    /// regions (`index offset length` per line of its `.regions` file).
    pub fn saved_image(&self, node: &str) -> (std::path::PathBuf, Vec<(u64, u64, u64)>) {
        let dir = self.divergent_dir(node);
        let prefix = format!("{}-{node}-", self.c.resource());
        let imgs: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|f| {
                let n = f.file_name().unwrap().to_string_lossy().to_string();
                n.starts_with(&prefix) && n.ends_with(".img")
            })
            .collect();
        assert_eq!(
            imgs.len(),
            1,
            "expected one saved image of {node} in {}: {imgs:?}",
            dir.display()
        );
        let img = imgs[0].clone();
        let regions_path = std::path::PathBuf::from(format!("{}.regions", img.display()));
        let text = std::fs::read_to_string(&regions_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", regions_path.display()));
        let regions = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| {
                let f: Vec<u64> = l
                    .split_whitespace()
                    .map(|x| x.parse().unwrap_or_else(|e| panic!("{l:?}: {e}")))
                    .collect();
                assert_eq!(f.len(), 3, "regions line {l:?}");
                (f[0], f[1], f[2])
            })
            .collect();
        (img, regions)
    }

    /// Every region of `off..off+len` is listed in `regions` (from
    /// [`Self::saved_image`]) and the saved image holds `byte` there.
    pub fn assert_saved_region(
        &self,
        img: &std::path::Path,
        regions: &[(u64, u64, u64)],
        off: u64,
        len: u64,
        byte: u8,
    ) {
        let region = self.c.config.resources[0].region_size;
        for r in off / region..=(off + len - 1) / region {
            assert!(
                regions
                    .iter()
                    .any(|&(i, o, l)| i == r && o == r * region && l == region),
                "region {r} missing from the .regions list of {}: {regions:?}",
                img.display()
            );
        }
        let got = crate::data::read_range(img, off, len as usize);
        assert!(
            got.iter().all(|&b| b == byte),
            "saved image {} at {off}+{len} is not all {byte:#x}",
            img.display()
        );
    }
}

/// The status shows a connected, in-sync pair.
pub fn in_sync(s: &Value) -> bool {
    s["pair"]["in_sync"] == true && s["pair"]["connection"] == "connected"
}

/// `pair.connection` of a status (`""` if absent).
pub fn connection(s: &Value) -> String {
    s["pair"]["connection"].as_str().unwrap_or("").to_string()
}

/// Read-only access to a cluster partition while its agent holds the lock.
struct ReadOnly(std::fs::File);

impl bitmap::MetaStorage for ReadOnly {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only"))
    }
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

/// The dirty regions (indices) recorded in the cluster partition at `cp`
/// (read with the product's own dump code, read-only, while the agent runs).
pub fn dirty_regions(cp: &std::path::Path) -> std::collections::BTreeSet<u64> {
    let f = std::fs::File::open(cp).unwrap_or_else(|e| panic!("opening {}: {e}", cp.display()));
    let rep = bitmap::dump(&mut ReadOnly(f), 1 << 20)
        .unwrap_or_else(|e| panic!("dumping {}: {e}", cp.display()));
    assert!(
        rep.error.is_none() && rep.bad_chunks.is_empty(),
        "damaged cluster partition {}: {rep}",
        cp.display()
    );
    assert!(!rep.more_ranges, "too many dirty ranges");
    rep.dirty_ranges.iter().flat_map(|r| r.clone()).collect()
}
