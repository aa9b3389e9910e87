//! `mdctrl demo`: the local two-node walk-through. Two agents on loopback
//! with sparse files under a temporary directory, a pattern written through a
//! real NBD connection, the standby killed and brought back, the status at
//! every step, and the two data files compared. No config needed; everything
//! is cleaned up on exit (`--keep` leaves the directory for inspection).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mirror_agent::admin::{self, Request};
use mirror_agent::config::{Config, ExampleSpec};
use mirror_agent::nbd::client::NbdClient;
use mirror_agent::status::ResourceStatus;

use crate::render;

/// A running agent process, killed on drop.
struct AgentProc {
    node: String,
    child: Option<Child>,
}

impl AgentProc {
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Demo {
    dir: PathBuf,
    config_path: PathBuf,
    config: Config,
    agent_bin: PathBuf,
    keep: bool,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.keep {
            println!("\n(kept {} for inspection)", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Ports `base..base+6` all free on loopback, below the kernel's ephemeral range.
fn free_base_port() -> Result<u16, String> {
    mirror_agent::config::free_loopback_ports(16_000..20_000, 6)
        .map_err(|e| format!("ports for the demo: {e}"))
}

fn step(n: u32, what: &str) {
    println!("\n=== {n}. {what}");
}

impl Demo {
    fn rt() -> Result<tokio::runtime::Runtime, String> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    }

    fn admin(&self, node: &str, req: Request) -> Result<serde_json::Value, String> {
        let sock = self
            .config
            .server(node)
            .ok_or("unknown node")?
            .admin_socket
            .clone();
        let resp = Self::rt()?
            .block_on(admin::request(&sock, &req))
            .map_err(|e| e.to_string())?;
        resp.into_result().map_err(|e| e.to_string())
    }

    fn status(&self, node: &str) -> Result<ResourceStatus, String> {
        let v = self.admin(
            node,
            Request::Status {
                resource: Some("md1".into()),
            },
        )?;
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    fn show(&self, node: &str) -> Result<ResourceStatus, String> {
        let s = self.status(node)?;
        println!("$ mdctrl --node {node} status md1");
        print!("{}", render::status_table(&s));
        Ok(s)
    }

    fn start_agent(&self, node: &str) -> Result<AgentProc, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{node}.log")))
            .map_err(|e| e.to_string())?;
        let child = Command::new(&self.agent_bin)
            .arg("--config")
            .arg(&self.config_path)
            .arg("--node")
            .arg(node)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.agent_bin.display()))?;
        let pid = child.id();
        let agent = AgentProc {
            node: node.to_string(),
            child: Some(child),
        };
        // Ready when it answers a ping with its own pid.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(v) = self.admin(node, Request::Ping {}) {
                if v["pid"].as_u64() == Some(u64::from(pid)) {
                    println!(
                        "started mirror-agent for {} (pid {pid}, log {}/{}.log)",
                        agent.node,
                        self.dir.display(),
                        node
                    );
                    return Ok(agent);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "agent {node} did not become ready; see {}/{node}.log",
                    self.dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Poll `node`'s status until `pred` holds (readiness, bounded).
    fn wait_status(
        &self,
        node: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&ResourceStatus) -> bool,
    ) -> Result<ResourceStatus, String> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status(node)?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {what} on {node}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn write_pattern(&self, socket: &Path, offset: u64, len: u64, byte: u8) -> Result<(), String> {
        let mut c = NbdClient::connect(socket, "md1").map_err(|e| format!("NBD connect: {e}"))?;
        let chunk = vec![byte; 1 << 20];
        let mut at = offset;
        while at < offset + len {
            let n = chunk.len().min((offset + len - at) as usize);
            let err = c.write(at, &chunk[..n], false).map_err(|e| e.to_string())?;
            if err != 0 {
                return Err(format!("NBD write at {at} failed with NBD error {err}"));
            }
            at += n as u64;
        }
        let err = c.flush().map_err(|e| e.to_string())?;
        if err != 0 {
            return Err(format!("NBD flush failed with NBD error {err}"));
        }
        let back = c.read(offset, 4096).map_err(|e| e.to_string())?;
        if back.iter().any(|&b| b != byte) {
            return Err("read-back of the pattern differs".into());
        }
        let _ = c.disconnect();
        println!(
            "wrote {} MiB of 0x{byte:02x} at offset {} MiB through NBD ({}), flushed, read back",
            len >> 20,
            offset >> 20,
            socket.display()
        );
        Ok(())
    }
}

/// Run the demo. Errors name the step that failed.
pub fn run(keep: bool) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let agent_bin = exe.with_file_name("mirror-agent");
    if !agent_bin.exists() {
        return Err(format!(
            "{} not found next to mdctrl: build with `cargo build --release --workspace --bins`",
            agent_bin.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("nbd-mirror-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut spec = ExampleSpec::pair(&dir, free_base_port()?);
    spec.size = 64 << 20;
    let config_path = spec
        .write()
        .map_err(|e| format!("writing the demo config: {e}"))?;
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let demo = Demo {
        dir,
        config_path,
        config,
        agent_bin,
        keep,
    };
    let rc = demo
        .config
        .resource("md1")
        .ok_or("demo config has no md1")?
        .clone();
    let sock1 = rc.node("server1").ok_or("no server1")?.nbd_socket.clone();

    step(1, "two nodes on loopback, data on sparse files");
    println!("config: {}", demo.config_path.display());
    for node in ["server1", "server2"] {
        let r =
            mirror_agent::meta::init_resource(&rc, node, false, true).map_err(|e| e.to_string())?;
        println!("$ mdctrl --node {node} init md1 --blank\n{r}");
    }
    let _a1 = demo.start_agent("server1")?;
    let mut a2 = demo.start_agent("server2")?;

    step(2, "activate md1 on server1 (server2 becomes its standby)");
    demo.admin(
        "server1",
        Request::Activate {
            resource: "md1".into(),
            nomount: true,
        },
    )?;
    demo.wait_status("server1", "replication", Duration::from_secs(10), |s| {
        s.pair.as_ref().map(|p| p.replicating).unwrap_or(false)
    })?;
    demo.write_pattern(&sock1, 0, 8 << 20, 0xa1)?;
    demo.show("server1")?;

    step(
        3,
        "kill -9 the standby (server2) and keep writing on server1",
    );
    a2.kill9();
    demo.write_pattern(&sock1, 16 << 20, 4 << 20, 0xb2)?;
    demo.wait_status(
        "server1",
        "the mirror break",
        Duration::from_secs(15),
        |s| s.disk.break_time.is_some(),
    )?;
    demo.show("server1")?;

    step(
        4,
        "bring server2 back: automatic mirror recovery (differential resync)",
    );
    let _a2 = demo.start_agent("server2")?;
    demo.wait_status(
        "server1",
        "the peer to reconnect",
        Duration::from_secs(15),
        |s| {
            s.pair
                .as_ref()
                .map(|p| p.connection == "connected" && p.peer_disk.is_some())
                .unwrap_or(false)
        },
    )?;
    // Show the recovery while it runs, if it is still running.
    if let Ok(s) = demo.status("server1") {
        if s.pair
            .as_ref()
            .map(|p| p.recovery.is_some())
            .unwrap_or(false)
        {
            println!("$ mdctrl --node server1 status md1   (during the resync)");
            print!("{}", render::status_table(&s));
        }
    }
    demo.wait_status(
        "server1",
        "the resync to finish",
        Duration::from_secs(60),
        |s| {
            s.pair
                .as_ref()
                .map(|p| p.in_sync && p.replicating)
                .unwrap_or(false)
        },
    )?;
    demo.show("server2")?;

    step(
        5,
        "write once more, deactivate, and compare what both nodes hold",
    );
    demo.write_pattern(&sock1, 32 << 20, 1 << 20, 0xc3)?;
    demo.admin(
        "server1",
        Request::Deactivate {
            resource: "md1".into(),
        },
    )?;
    let d1 = std::fs::read(&rc.node("server1").ok_or("no server1")?.data_path)
        .map_err(|e| e.to_string())?;
    let d2 = std::fs::read(&rc.node("server2").ok_or("no server2")?.data_path)
        .map_err(|e| e.to_string())?;
    match d1.iter().zip(&d2).position(|(a, b)| a != b) {
        None if d1.len() == d2.len() => println!(
            "data files identical on both nodes ({} MiB)",
            d1.len() >> 20
        ),
        None => return Err("data files differ in length".into()),
        Some(off) => {
            return Err(format!(
                "data files differ at offset {off} after the recovery"
            ))
        }
    }
    println!("\ndemo finished");
    Ok(())
}
