//! [`TestCluster`]: a temporary directory holding a generated cluster config
//! (the product's own [`ExampleSpec`] generator, so the tests follow the real
//! format), free ports, the secret file for a pair, and helpers to run
//! `mdctrl` and start agents against it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use mirror_agent::config::{Config, ExampleSpec};

use crate::agent::Agent;
use crate::run::{cmdline, describe, run};

/// The local I/O engine a test cluster's resources use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `engine = "io_uring"`, `direct_io = "on"` (O_DIRECT exercised), data
    /// under `/var/tmp` (a real disk on usual systems, unlike a tmpfs `/tmp`).
    IoUring,
    /// `engine = "portable"` (buffered pread/pwrite), data under the temp dir.
    Portable,
    /// No engine keys: the product's defaults.
    Default,
}

impl Engine {
    /// The engines every client test runs on.
    pub const BOTH: [Engine; 2] = [Engine::IoUring, Engine::Portable];

    /// Extra `[[resource]]` keys selecting this engine.
    pub fn config_keys(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Engine::IoUring => &[("engine", "\"io_uring\""), ("direct_io", "\"on\"")],
            Engine::Portable => &[("engine", "\"portable\"")],
            Engine::Default => &[],
        }
    }

    /// Where this engine's test directories are created
    /// (`NBD_MIRROR_TEST_DIR` overrides both).
    pub fn base_dir(self) -> PathBuf {
        if let Some(d) = std::env::var_os("NBD_MIRROR_TEST_DIR") {
            return PathBuf::from(d);
        }
        match self {
            Engine::IoUring => PathBuf::from("/var/tmp"),
            Engine::Portable | Engine::Default => std::env::temp_dir(),
        }
    }

    /// What `mdctrl status --json`'s `engine` field starts with.
    pub fn status_prefix(self) -> Option<&'static str> {
        match self {
            Engine::IoUring => Some("io_uring, O_DIRECT"),
            Engine::Portable => Some("portable"),
            Engine::Default => None,
        }
    }
}

/// Runs a test function once per engine, as two `#[test]`s named
/// `NAME::io_uring` and `NAME::portable` (so they run in parallel and a
/// failure names the engine). Each `NAME` must be a `fn NAME(Engine)`.
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn io_uring() {
                    super::$name($crate::Engine::IoUring)
                }
                #[test]
                fn portable() {
                    super::$name($crate::Engine::Portable)
                }
            }
        )+
    };
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Local I/O engine of the resource.
    pub engine: Engine,
    /// Volume size in bytes (multiple of 4096).
    pub size: u64,
    /// Region size in bytes.
    pub region_size: u64,
    /// Extra `key = value` lines (value already TOML) for the `[[resource]]` table.
    pub resource_keys: Vec<(String, String)>,
}

impl ClusterOpts {
    /// 64 MiB, 64 KiB regions, on `engine`.
    pub fn new(engine: Engine) -> Self {
        ClusterOpts {
            engine,
            size: 64 << 20,
            region_size: 64 << 10,
            resource_keys: Vec::new(),
        }
    }

    /// With another volume size.
    pub fn size(mut self, size: u64) -> Self {
        self.size = size;
        self
    }

    /// With an extra resource key (`value` is TOML: quote strings).
    pub fn resource_key(mut self, key: &str, value: &str) -> Self {
        self.resource_keys
            .push((key.to_string(), value.to_string()));
        self
    }
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts::new(Engine::Default)
    }
}

/// Picks `n` consecutive free TCP ports on 127.0.0.1 no other test of this process was
/// given, below the ephemeral range ([`mirror_agent::config::free_loopback_ports`],
/// 20000-31999).
pub fn free_ports(n: u16) -> u16 {
    mirror_agent::config::free_loopback_ports(20_000..32_000, n).unwrap_or_else(|e| panic!("{e}"))
}

/// A generated cluster in a temp dir (removed when the last user drops it).
#[derive(Debug)]
pub struct TestCluster {
    dir: Arc<tempfile::TempDir>,
    /// The config file.
    pub config_path: PathBuf,
    /// The config as the product parses it (paths of everything).
    pub config: Config,
    /// The options it was made with.
    pub opts: ClusterOpts,
}

impl TestCluster {
    /// One server (`server1`), one resource `md1`.
    pub fn standalone(opts: ClusterOpts) -> Self {
        Self::create(opts, 1)
    }

    /// Two servers on 127.0.0.1 (`server1`, `server2`) with a shared secret.
    pub fn pair(opts: ClusterOpts) -> Self {
        Self::create(opts, 2)
    }

    fn create(opts: ClusterOpts, servers: usize) -> Self {
        let base = opts.engine.base_dir();
        std::fs::create_dir_all(&base)
            .unwrap_or_else(|e| panic!("creating {}: {e}", base.display()));
        let dir = tempfile::Builder::new()
            .prefix("nbd-mirror-test-")
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("creating a temp dir under {}: {e}", base.display()));
        let mut spec = if servers == 2 {
            ExampleSpec::pair(dir.path(), 0)
        } else {
            ExampleSpec::standalone(dir.path(), 0)
        };
        spec.size = opts.size;
        spec.region_size = opts.region_size;
        spec.base_port = 1;
        let span = spec.last_port() - spec.base_port + 1;
        spec.base_port = free_ports(span);
        let config_path = spec.write().expect("writing the generated config");
        std::fs::create_dir_all(dir.path().join("logs")).expect("creating logs dir");
        let text = inject_resource_keys(&spec.render(), &opts);
        std::fs::write(&config_path, &text).expect("writing the config");
        let config = Config::load(&config_path).unwrap_or_else(|e| {
            panic!("the generated config does not load: {e}\n--- config ---\n{text}")
        });
        if servers == 2 {
            let secret = dir.path().join("secret");
            let mode = std::fs::metadata(&secret)
                .expect("secret file")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "secret file mode");
        }
        TestCluster {
            dir: Arc::new(dir),
            config_path,
            config,
            opts,
        }
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A handle keeping the temp dir alive (for agents).
    pub fn dir_handle(&self) -> Arc<tempfile::TempDir> {
        Arc::clone(&self.dir)
    }

    /// The first (for a standalone cluster: the only) node.
    pub fn node(&self) -> &str {
        &self.config.servers[0].name
    }

    /// The resource (`md1`).
    pub fn resource(&self) -> &str {
        &self.config.resources[0].name
    }

    fn rnode(&self, node: &str) -> &mirror_agent::config::ResourceNode {
        self.config.resources[0]
            .node(node)
            .unwrap_or_else(|| panic!("no node {node} in the test config"))
    }

    /// Data partition of the resource on `node`.
    pub fn data_path_on(&self, node: &str) -> PathBuf {
        self.rnode(node).data_path.clone()
    }

    /// Data partition on the first node.
    pub fn data_path(&self) -> PathBuf {
        self.data_path_on(self.node())
    }

    /// Cluster partition on `node`.
    pub fn cp_path_on(&self, node: &str) -> PathBuf {
        self.rnode(node).cluster_partition.clone()
    }

    /// Cluster partition on the first node.
    pub fn cp_path(&self) -> PathBuf {
        self.cp_path_on(self.node())
    }

    /// NBD socket on `node`.
    pub fn nbd_socket_on(&self, node: &str) -> PathBuf {
        self.rnode(node).nbd_socket.clone()
    }

    /// NBD socket on the first node.
    pub fn nbd_socket(&self) -> PathBuf {
        self.nbd_socket_on(self.node())
    }

    /// Admin socket of `node`.
    pub fn admin_socket_on(&self, node: &str) -> PathBuf {
        self.config
            .server(node)
            .unwrap_or_else(|| panic!("no server {node}"))
            .admin_socket
            .clone()
    }

    /// Admin socket of the first node.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket_on(self.node())
    }

    /// `nbd+unix:///md1?socket=PATH` of `node`.
    pub fn nbd_uri_on(&self, node: &str) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.resource(),
            self.nbd_socket_on(node).display()
        )
    }

    /// NBD URI of the first node.
    pub fn nbd_uri(&self) -> String {
        self.nbd_uri_on(self.node())
    }

    /// Where `node`'s agent logs.
    pub fn log_path(&self, node: &str) -> PathBuf {
        self.dir().join("logs").join(format!("{node}-agent.log"))
    }

    /// The config text as written.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config_path).expect("reading the config")
    }

    /// Replaces the config file's text (for configuration error tests).
    pub fn write_config_text(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("writing the config");
    }

    /// Sets `timeouts.<key>` to the duration `value` (`"1s"`), replacing the
    /// line the generated config has for every key.
    pub fn set_timeout(&self, key: &str, value: &str) {
        let text = self.config_text();
        let prefix = format!("{key} = ");
        let mut found = false;
        let new: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with(&prefix) && !found {
                    found = true;
                    format!("{key} = \"{value}\"")
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert!(found, "no `{key}` line in the config:\n{text}");
        self.write_config_text(&(new.join("\n") + "\n"));
    }

    /// The same cluster (same temp dir, paths and ports) seen through another
    /// config file `name` in the temp dir holding `text`: for a node whose
    /// configuration disagrees with its peer's.
    pub fn with_config_text(&self, name: &str, text: &str) -> TestCluster {
        let path = self.dir().join(name);
        std::fs::write(&path, text).expect("writing the second config");
        let config = Config::load(&path)
            .unwrap_or_else(|e| panic!("the second config does not load: {e}\n{text}"));
        TestCluster {
            dir: Arc::clone(&self.dir),
            config_path: path,
            config,
            opts: self.opts.clone(),
        }
    }

    /// `mdctrl --config C --node NODE ARGS...` as a command (not run).
    pub fn mdctrl_cmd_on(&self, node: &str, args: &[&str]) -> Command {
        let mut c = Command::new(crate::bins::mdctrl());
        c.arg("--config")
            .arg(&self.config_path)
            .arg("--node")
            .arg(node)
            .args(args);
        c
    }

    /// Runs `mdctrl` for `node` and returns its output (any exit status).
    pub fn mdctrl_on(&self, node: &str, args: &[&str]) -> Output {
        run(&mut self.mdctrl_cmd_on(node, args), Duration::from_secs(60))
    }

    /// Runs `mdctrl` for the first node.
    pub fn mdctrl(&self, args: &[&str]) -> Output {
        self.mdctrl_on(self.node(), args)
    }

    /// Runs `mdctrl` for the first node, panics (with its output) unless it
    /// exits 0; returns stdout.
    pub fn mdctrl_ok(&self, args: &[&str]) -> String {
        let mut c = self.mdctrl_cmd_on(self.node(), args);
        let line = cmdline(&c);
        let out = run(&mut c, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "mdctrl failed\n{}",
            describe(&line, &out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `mdctrl` for the first node and asserts its exit code; returns
    /// stdout + stderr.
    pub fn mdctrl_expect(&self, args: &[&str], code: i32) -> String {
        let mut c = self.mdctrl_cmd_on(self.node(), args);
        let line = cmdline(&c);
        let out = run(&mut c, Duration::from_secs(60));
        assert_eq!(
            out.status.code(),
            Some(code),
            "unexpected exit code\n{}",
            describe(&line, &out)
        );
        crate::run::all_output(&out)
    }

    /// `mdctrl init md1` on the first node (creates the data file and the
    /// cluster partition).
    pub fn init(&self) {
        self.mdctrl_ok(&["init", self.resource()]);
    }

    /// `mdctrl status md1 --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.mdctrl_ok(&["status", self.resource(), "--json"]);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
    }

    /// Spawns `node`'s agent without waiting for it.
    pub fn spawn_agent_on(&self, node: &str) -> Agent {
        Agent::spawn(self, node)
    }

    /// Starts `node`'s agent and waits until it answers on its admin socket.
    pub fn start_agent_on(&self, node: &str) -> Agent {
        let mut a = Agent::spawn(self, node);
        a.wait_ready();
        a
    }

    /// Starts the first node's agent, ready.
    pub fn start_agent(&self) -> Agent {
        self.start_agent_on(self.node())
    }

    /// `mdctrl activate md1` and a check that the NBD socket is there.
    pub fn activate(&self) {
        self.mdctrl_ok(&["activate", self.resource()]);
        assert!(
            self.nbd_socket().exists(),
            "NBD socket {} missing after activate",
            self.nbd_socket().display()
        );
    }

    /// `mdctrl deactivate md1`.
    pub fn deactivate(&self) {
        self.mdctrl_ok(&["deactivate", self.resource()]);
    }

    /// A standalone cluster, initialised, agent running, resource active.
    pub fn standalone_active(opts: ClusterOpts) -> (TestCluster, Agent) {
        let c = TestCluster::standalone(opts);
        c.init();
        let agent = c.start_agent();
        c.activate();
        (c, agent)
    }

    /// Makes the test directory, its subdirectories and the config readable
    /// by every user (the secret file stays 0600), for tests running
    /// `mdctrl` as an unprivileged user.
    pub fn make_world_readable(&self) {
        for d in [
            self.dir().to_path_buf(),
            self.dir().join("run"),
            self.dir().join("data"),
            self.dir().join("logs"),
        ] {
            if d.exists() {
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod dir");
            }
        }
        std::fs::set_permissions(&self.config_path, std::fs::Permissions::from_mode(0o644))
            .expect("chmod config");
    }
}

/// Adds the engine keys and `opts.resource_keys` to every `[[resource]]`
/// table of the generated text (right after its `name` line).
fn inject_resource_keys(text: &str, opts: &ClusterOpts) -> String {
    let mut extra = String::new();
    for (k, v) in opts.engine.config_keys() {
        extra.push_str(&format!("{k} = {v}\n"));
    }
    for (k, v) in &opts.resource_keys {
        extra.push_str(&format!("{k} = {v}\n"));
    }
    let mut out = String::new();
    let mut in_resource_header = false;
    let mut injected = 0;
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim() == "[[resource]]" {
            in_resource_header = true;
        } else if in_resource_header && line.trim_start().starts_with("name") {
            out.push_str(&extra);
            in_resource_header = false;
            injected += 1;
        }
    }
    assert!(
        injected > 0,
        "generated config has no [[resource]] name line:\n{text}"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_config_has_two_nodes_free_ports_and_a_private_secret() {
        let c =
            TestCluster::pair(ClusterOpts::new(Engine::Portable).resource_key("keep_dirty", "8"));
        assert_eq!(c.config.servers.len(), 2);
        assert_eq!(c.config.resources[0].nodes.len(), 2);
        assert_eq!(c.config.resources[0].keep_dirty, 8);
        assert_eq!(
            c.config.resources[0].engine,
            mirror_agent::config::EngineChoice::Portable
        );
        let secret = c.config.read_secret().expect("the secret reads back");
        drop(secret);
        assert_eq!(
            std::fs::metadata(c.dir().join("secret"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_ne!(c.data_path_on("server1"), c.data_path_on("server2"));
        assert_ne!(c.admin_socket_on("server1"), c.admin_socket_on("server2"));
        let mut ports: Vec<u16> = c.config.servers.iter().map(|s| s.control_port).collect();
        ports.extend(c.config.resources[0].nodes.iter().map(|n| n.mirror_port));
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 4, "ports must be distinct: {ports:?}");
        for p in ports {
            std::net::TcpListener::bind(("127.0.0.1", p))
                .unwrap_or_else(|e| panic!("port {p} not free: {e}"));
        }
    }

    #[test]
    fn io_uring_clusters_ask_for_direct_io() {
        let c = TestCluster::standalone(ClusterOpts::new(Engine::IoUring));
        assert_eq!(
            c.config.resources[0].engine,
            mirror_agent::config::EngineChoice::IoUring
        );
        assert_eq!(
            c.config.resources[0].direct_io,
            mirror_agent::config::DirectIo::On
        );
        assert!(c.dir().starts_with(Engine::IoUring.base_dir()));
        assert!(
            c.nbd_uri().starts_with("nbd+unix:///md1?socket=/"),
            "{}",
            c.nbd_uri()
        );
    }

    #[test]
    fn free_port_blocks_differ_within_a_process() {
        let a = free_ports(4);
        let b = free_ports(4);
        assert!(a.abs_diff(b) >= 4, "{a} and {b} overlap");
    }
}
