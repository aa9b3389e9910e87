//! `mdctrl status RES --json` as typed data, used on both sides: by the host
//! for node B and, through `vm-harness guest wait-status`, inside the guest
//! for node A. Waits poll the agent (100–200 ms) until a condition holds or a
//! deadline passes; every change of the one-line summary is reported.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mirror_agent::status::{ResourceStatus, Role};

/// How to reach one node's agent through `mdctrl`.
#[derive(Debug, Clone)]
pub struct Mdctrl {
    /// The `mdctrl` binary.
    pub bin: PathBuf,
    /// Cluster configuration.
    pub config: PathBuf,
    /// Node name.
    pub node: String,
}

/// Output of one `mdctrl` call.
#[derive(Debug)]
pub struct Out {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// stdout followed by stderr.
    pub text: String,
}

impl Mdctrl {
    /// Runs `mdctrl --config C --node N ARGS...`.
    pub fn run(&self, args: &[&str]) -> Result<Out> {
        let o = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(&self.node)
            .args(args)
            .output()
            .with_context(|| format!("run {}", self.bin.display()))?;
        let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&o.stderr));
        Ok(Out {
            code: o.status.code().unwrap_or(-1),
            text,
        })
    }

    /// Runs `mdctrl ARGS` and fails unless it exits 0.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self.run(args)?;
        if o.code != 0 {
            bail!(
                "mdctrl {} on {} exited {}: {}",
                args.join(" "),
                self.node,
                o.code,
                o.text.trim()
            );
        }
        Ok(o.text)
    }

    /// `mdctrl status RES --json`.
    pub fn status(&self, res: &str) -> Result<ResourceStatus> {
        let o = self.run(&["status", res, "--json"])?;
        if o.code != 0 {
            bail!(
                "mdctrl status {res} --json on {} exited {}: {}",
                self.node,
                o.code,
                o.text.trim()
            );
        }
        let v: serde_json::Value = serde_json::from_str(o.text.trim())
            .with_context(|| format!("status JSON of {}: {}", self.node, o.text.trim()))?;
        // `status RES` prints one object; be lenient about a one-element list.
        let v = match v {
            serde_json::Value::Array(mut a) if a.len() == 1 => a.remove(0),
            v => v,
        };
        serde_json::from_value(v).with_context(|| format!("status JSON of {}", self.node))
    }

    /// Polls the status until every condition in `until` holds; prints each
    /// new summary line through `report`. Errors with the last summary at the
    /// deadline.
    pub fn wait(
        &self,
        res: &str,
        until: &[Cond],
        timeout: Duration,
        report: &mut dyn FnMut(&str),
    ) -> Result<ResourceStatus> {
        let t0 = Instant::now();
        let mut last: String;
        let mut last_key = String::new();
        loop {
            match self.status(res) {
                Ok(s) => {
                    let line = summary(&s);
                    let key = coarse(&s);
                    if key != last_key {
                        report(&format!("{} status: {line}", self.node));
                        last_key = key;
                    }
                    last = line;
                    if until.iter().all(|c| c.holds(&s)) {
                        return Ok(s);
                    }
                }
                Err(e) => {
                    let line = format!("{e:#}");
                    if line != last_key {
                        report(&format!("{} status: {line}", self.node));
                        last_key = line.clone();
                    }
                    last = line;
                }
            }
            if t0.elapsed() > timeout {
                bail!(
                    "{} did not reach {:?} within {} s; last status: {last}",
                    self.node,
                    until,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }
}

/// A condition on a node's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Cond {
    /// The peer link is up.
    Connected,
    /// The peer link is down.
    Disconnected,
    /// Both sides hold the same data.
    InSync,
    /// Not in sync.
    NotInSync,
    /// The peer reports inactive.
    PeerInactive,
    /// This node serves the export.
    Active,
    /// This node does not serve the export.
    Inactive,
    /// A resync has run in this session and finished.
    RecoveryFinished,
}

impl Cond {
    /// Whether the condition holds for `s`.
    pub fn holds(self, s: &ResourceStatus) -> bool {
        let pair = s.pair.as_ref();
        match self {
            Cond::Connected => pair.is_some_and(|p| p.connection == "connected"),
            Cond::Disconnected => pair.is_some_and(|p| p.connection != "connected"),
            Cond::InSync => pair.is_some_and(|p| p.in_sync),
            Cond::NotInSync => pair.is_some_and(|p| !p.in_sync),
            Cond::PeerInactive => pair.is_some_and(|p| {
                p.connection == "connected" && p.peer_role == Some(Role::Inactive)
            }),
            Cond::Active => s.role == Role::Active,
            Cond::Inactive => s.role == Role::Inactive,
            Cond::RecoveryFinished => pair
                .and_then(|p| p.recovery.as_ref())
                .is_some_and(|r| r.finished),
        }
    }
}

/// What counts as a change worth a report: everything in [`summary`]
/// except byte and dirty counts, with resync progress in 25 % steps.
pub fn coarse(s: &ResourceStatus) -> String {
    let mut c = s.clone();
    c.disk.dirty_regions = 0;
    if let Some(r) = c.pair.as_mut().and_then(|p| p.recovery.as_mut()) {
        r.percent = (r.percent / 25.0).floor() * 25.0;
        r.done_bytes = 0;
        r.total_bytes = 0;
    }
    summary(&c)
}

/// One line: role, link, peer role, sync, decision, resync progress, dirty regions.
pub fn summary(s: &ResourceStatus) -> String {
    let mut out = format!("role={} dirty={}", s.role, s.disk.dirty_regions);
    if let Some(p) = &s.pair {
        out.push_str(&format!(
            " link={} peer_role={} in_sync={} sync=\"{}\"",
            p.connection,
            p.peer_role.map_or("?".into(), |r| r.to_string()),
            p.in_sync,
            p.sync
        ));
        if let Some(d) = &p.decision {
            out.push_str(&format!(" decision=\"{d}\""));
        }
        if let Some(a) = &p.auto_recovery {
            out.push_str(&format!(" auto_recovery=\"{a}\""));
        }
        if let Some(r) = &p.recovery {
            out.push_str(&format!(
                " recovery=[{} {} {} {:.0}% {}/{} B finished={}{}]",
                r.direction,
                r.kind,
                r.rule,
                r.percent,
                r.done_bytes,
                r.total_bytes,
                r.finished,
                r.error
                    .as_deref()
                    .map(|e| format!(" error={e}"))
                    .unwrap_or_default()
            ));
        }
        if let Some(b) = &p.last_break {
            out.push_str(&format!(" last_break=\"{b}\""));
        }
    }
    out
}

/// Path of `mdctrl` next to the running executable (host) or in `PATH` (guest).
pub fn mdctrl_bin() -> PathBuf {
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("mdctrl")))
        .filter(|p| p.is_file());
    here.unwrap_or_else(|| Path::new("/usr/sbin/mdctrl").to_owned())
}
