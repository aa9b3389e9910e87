//! [`Agent`]: one spawned `mirror-agent` process.
//!
//! Its stderr goes to `logs/NODE-agent.log` in the cluster's temp dir
//! (appended across restarts, each start marked by a harness line).
//! Readiness is an answered `ping` on the admin socket from this very
//! process (its pid), never a fixed sleep. Dropping an `Agent` kills it with
//! SIGKILL; when the test is panicking the log is printed first, so a
//! failure always shows what the agent said.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::TestCluster;
use crate::wait::{poll_until, wait_until};

/// How long an agent may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A `mirror-agent` process of a [`TestCluster`].
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    last_status: Option<ExitStatus>,
    config: PathBuf,
    node: String,
    log: PathBuf,
    admin_socket: PathBuf,
    /// Command (and arguments) the agent is run under, e.g. `ip netns exec NS`.
    wrapper: Vec<String>,
    _dir: Arc<tempfile::TempDir>,
}

impl Agent {
    /// Spawns the agent for `node` (does not wait for readiness).
    pub fn spawn(cluster: &TestCluster, node: &str) -> Agent {
        Self::spawn_wrapped(cluster, node, &[])
    }

    /// Spawns the agent for `node` under `wrapper` (a command that execs
    /// its arguments, like `ip netns exec NS`, so the pid stays the agent's).
    pub fn spawn_wrapped(cluster: &TestCluster, node: &str, wrapper: &[&str]) -> Agent {
        let mut a = Agent {
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            child: None,
            last_status: None,
            config: cluster.config_path.clone(),
            node: node.to_string(),
            log: cluster.log_path(node),
            admin_socket: cluster.admin_socket_on(node),
            _dir: cluster.dir_handle(),
        };
        a.spawn_process();
        a
    }

    fn spawn_process(&mut self) {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening agent log {}: {e}", self.log.display()));
        let _ = writeln!(
            log,
            "=== harness: starting mirror-agent --node {} ===",
            self.node
        );
        let mut cmd = match self.wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(crate::bins::mirror_agent());
                c
            }
            None => Command::new(crate::bins::mirror_agent()),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(&self.node)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start mirror-agent: {e}"));
        self.child = Some(child);
        self.last_status = None;
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Process id of the running agent.
    ///
    /// # Panics
    /// When it is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent is not running").id()
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &PathBuf {
        &self.log
    }

    /// Everything the agent logged so far (all starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Prints the log to stderr (shown by the test harness on failure).
    pub fn dump_log(&self) {
        eprintln!(
            "===== log of mirror-agent {} ({}) =====\n{}\n===== end of log =====",
            self.node,
            self.log.display(),
            self.log()
        );
    }

    /// True while the process has not exited (reaps it if it has).
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(s)) => {
                self.last_status = Some(s);
                self.child = None;
                false
            }
            Err(e) => panic!("waiting for mirror-agent: {e}"),
        }
    }

    /// Sends one `ping` on the admin socket; `Some(pid)` if answered ok.
    fn ping(&self) -> Option<u64> {
        let mut s = UnixStream::connect(&self.admin_socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"{\"op\":\"ping\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        if v["ok"] != serde_json::Value::Bool(true) {
            return None;
        }
        v["result"]["pid"].as_u64()
    }

    /// Waits until this process answers `ping` on its admin socket.
    ///
    /// # Panics
    /// When it exits first or does not answer within [`READY_TIMEOUT`].
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if !self.is_running() {
                self.dump_log();
                panic!(
                    "mirror-agent {} exited while starting: {:?}",
                    self.node, self.last_status
                );
            }
            let pid = u64::from(self.pid());
            if self.ping() == Some(pid) {
                return;
            }
            if Instant::now() >= deadline {
                self.dump_log();
                panic!(
                    "mirror-agent {} not ready within {READY_TIMEOUT:?}",
                    self.node
                );
            }
            std::thread::sleep(crate::wait::POLL);
        }
    }

    /// Waits for the process to exit (it is expected to) and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let got = poll_until(timeout, || (!self.is_running()).then_some(()));
        if got.is_none() {
            self.dump_log();
            panic!("mirror-agent {} still running after {timeout:?}", self.node);
        }
        self.last_status.expect("status recorded when reaped")
    }

    /// The exit status of the last process, once it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.last_status
    }

    /// SIGKILL and reap (a crash: nothing is flushed or cleaned up by the agent).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.last_status = child.wait().ok();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait_exit(Duration::from_secs(60))
    }

    /// SIGTERM, without waiting.
    pub fn send_sigterm(&self) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own
        // unreaped child, so it cannot name an unrelated process.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill(SIGTERM) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Stops the agent (SIGTERM if running), starts it again and waits until
    /// it is ready.
    pub fn restart(&mut self) {
        if self.is_running() {
            self.terminate();
        }
        self.spawn_process();
        self.wait_ready();
    }

    /// Starts a stopped agent again (after [`kill9`](Self::kill9) or an exit)
    /// without waiting for readiness.
    pub fn start_again(&mut self) {
        assert!(!self.is_running(), "agent {} is still running", self.node);
        self.spawn_process();
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let found = poll_until(timeout, || self.log().contains(needle).then_some(()));
        if found.is_none() {
            self.dump_log();
            panic!(
                "agent log of {} never contained {needle:?} within {timeout:?}",
                self.node
            );
        }
    }

    /// Asserts that the log contains `needle` now (printing the log if not).
    pub fn assert_log_contains(&self, needle: &str) {
        let log = self.log();
        assert!(
            log.contains(needle),
            "agent log of {} lacks {needle:?}:\n{log}",
            self.node
        );
    }

    /// Waits until `path` exists (a socket appearing, ...).
    pub fn wait_for_path(&self, path: &std::path::Path, timeout: Duration) {
        wait_until(&format!("{} to exist", path.display()), timeout, || {
            path.exists().then_some(())
        });
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_log();
        }
        self.kill9();
    }
}
