//! Two-node scenarios: node A (`nodea`) in a TCG guest with `/dev/nbd0`,
//! node B (`nodeb`) a `mirror-agent` on the host, joined by QEMU user
//! networking (`docs/vm-harness.md`, "failover" and "partition").
//!
//! Topology: `nodea` sorts first, so A dials: it reaches B's listeners at
//! `10.0.2.2:PORT` (slirp's alias of the host's loopback). B listens on
//! `127.0.0.1` directly (failover) or on `127.0.0.2` behind the harness's
//! fault proxy on `127.0.0.1` (partition, [`crate::proxy`]). A's own ports
//! stay unused while it is the dialer, so no host port forward is needed.
//!
//! The host drives B with `mdctrl` and reads A's progress from the guest
//! console (`VMH ...`, `VMH-ACK name sha256`, `VMH-RESULT ...`); the guest
//! follows B's state through its own agent's status (`vm-harness guest
//! wait-status`), so no host → guest channel is needed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::cache::Cache;
use crate::status::{Cond, Mdctrl};
use crate::vm::{self, GuestSpec, OurBins, Running};

/// Node A's script for `failover` (common part + scenario).
const FAILOVER_SH: &str = concat!(
    include_str!("scenarios/pair-common.sh"),
    include_str!("scenarios/failover.sh")
);
/// Node A's script for `partition`.
const PARTITION_SH: &str = concat!(
    include_str!("scenarios/pair-common.sh"),
    include_str!("scenarios/partition.sh")
);

/// Size of both data partitions.
pub const DATA_SIZE: u64 = 256 << 20;
/// Size of A's cluster partition (B's is created by `mdctrl init`).
pub const CP_SIZE: u64 = 16 << 20;

/// Everything a two-node run shares.
pub struct Ctx {
    /// The package cache.
    pub cache: Cache,
    /// This build's binaries.
    pub bins: OurBins,
    /// Run directory.
    pub run: PathBuf,
    /// The cluster config (same text on both nodes).
    pub config: String,
    /// Start of the run.
    pub t0: Instant,
    log: std::fs::File,
}

impl Ctx {
    /// Creates the run directory's host log and writes the config + secret.
    pub fn new(cache: Cache, bins: OurBins, run: PathBuf, config: String) -> Result<Ctx> {
        let log = std::fs::File::create(run.join("host.log"))?;
        std::fs::write(run.join("cluster.toml"), &config)?;
        let secret: [u8; 32] = rand::random();
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let sp = run.join("secret");
        std::fs::write(&sp, format!("{hex}\n"))?;
        std::fs::set_permissions(&sp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(Ctx {
            cache,
            bins,
            run,
            config,
            t0: Instant::now(),
            log,
        })
    }

    /// One progress line on stderr and in `host.log`.
    pub fn step(&mut self, msg: &str) {
        let line = format!("[{:7.1}] {msg}", self.t0.elapsed().as_secs_f64());
        eprintln!("vm-harness: {line}");
        let _ = writeln!(self.log, "{line}");
    }

    /// Node B's `mdctrl`.
    pub fn b(&self) -> Mdctrl {
        Mdctrl {
            bin: self.bins.mdctrl.clone(),
            config: self.run.join("cluster.toml"),
            node: "nodeb".into(),
        }
    }

    /// The secret (for the guest's initramfs).
    pub fn secret(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(self.run.join("secret"))?)
    }

    /// A guest spec for node A: the config and secret in `/etc/nbd-mirror`,
    /// A's disks in the run directory, networking on.
    pub fn guest(&self, script: &'static str, suffix: &str, cmdline: &str) -> Result<GuestSpec> {
        Ok(GuestSpec {
            cmdline: cmdline.to_owned(),
            guest_watchdog: 420,
            host_timeout: 480,
            net: true,
            fresh_disks: false,
            log_suffix: suffix.to_owned(),
            extra_files: vec![("/etc/nbd-mirror/secret".into(), self.secret()?, 0o600)],
            ..GuestSpec::single(
                script,
                self.config.clone(),
                vec![
                    ("nodea-data.img".into(), DATA_SIZE),
                    ("nodea-cp.img".into(), CP_SIZE),
                ],
            )
        })
    }

    /// Builds the initramfs for `spec` and starts QEMU.
    pub fn boot(&mut self, spec: &GuestSpec) -> Result<Running> {
        let initrd = vm::build_initramfs(&self.cache, &self.bins, spec, &self.run)?;
        self.step(&format!("booting node A (console{}.log)", spec.log_suffix));
        vm::spawn(&self.cache, spec, &initrd, &self.run)
    }
}

/// `N` consecutive TCP ports on 127.0.0.1, each checked free, from 9000-9999: below the
/// kernel's ephemeral range, so that no outgoing connection (QEMU's slirp, the other node's
/// agent) takes one as its source port in the seconds between this check and node B's bind
/// ([`mirror_agent::config::free_loopback_ports`]; a port from `bind(:0)` is an ephemeral one).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let base = mirror_agent::config::free_loopback_ports(9000..10_000, N as u16)
        .map_err(anyhow::Error::msg)?;
    Ok(std::array::from_fn(|i| base + i as u16))
}

/// The pair's config. `b_listen`: where B's listeners bind; A dials
/// `10.0.2.2` at the same ports (reaching the host's `127.0.0.1`).
pub fn pair_config(run: &Path, b_control: u16, b_mirror: u16, b_listen: &str) -> String {
    let r = run.display();
    format!(
        r#"[cluster]
name = "vmh-pair"
secret_file = "secret"

[[server]]
name = "nodea"
address = "127.0.0.1"
listen_address = "10.0.2.15"
control_port = 29004
admin_socket = "/run/md/admin.sock"

[[server]]
name = "nodeb"
address = "10.0.2.2"
listen_address = "{b_listen}"
control_port = {b_control}
admin_socket = "{r}/nodeb.sock"

[[resource]]
name = "md1"
size = "{DATA_SIZE}"
mode = "sync"
region_size = "64KiB"

[resource.server.nodea]
data_path = "/dev/vda"
cluster_partition = "/dev/vdb"
mirror_port = 29051
nbd_socket = "/run/md/md1.nbd"
nbd_device = "/dev/nbd0"
mount_point = "/mnt/md1"
fs = "ext4"
mount_options = "noatime"
divergent_save_dir = "/run/md/divergent"

[resource.server.nodeb]
data_path = "{r}/nodeb-data.img"
cluster_partition = "{r}/nodeb-cp.img"
mirror_port = {b_mirror}
nbd_socket = "{r}/nodeb-md1.nbd"
divergent_save_dir = "{r}/divergent"
"#
    )
}

/// Node B's agent on the host. Dropping it kills the agent.
pub struct HostAgent {
    child: Option<Child>,
}

impl HostAgent {
    /// Starts `mirror-agent --node nodeb` (log: `nodeb.log`) and waits for ping.
    pub fn start(ctx: &mut Ctx, logname: &str) -> Result<HostAgent> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(ctx.run.join(logname))?;
        let child = Command::new(&ctx.bins.agent)
            .arg("--config")
            .arg(ctx.run.join("cluster.toml"))
            .arg("--node")
            .arg("nodeb")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start mirror-agent for nodeb")?;
        let mut a = HostAgent { child: Some(child) };
        let b = ctx.b();
        let t0 = Instant::now();
        loop {
            if b.run(&["ping"])?.code == 0 {
                break;
            }
            if let Some(c) = a.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!(
                        "nodeb's mirror-agent exited ({st}) before answering ping (see {logname})"
                    );
                }
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "nodeb's mirror-agent did not answer ping within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ctx.step(&format!("nodeb agent up (pid {})", a.pid()));
        Ok(a)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGTERM and wait (at most 30 s, then SIGKILL); the exit status.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("agent already stopped")?;
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                let st = c.wait()?;
                bail!("nodeb's mirror-agent ignored SIGTERM for 30 s (killed: {st})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `pred` holds for the console text so far; fails on
/// a `VMH-RESULT` (the guest gave up), QEMU exiting, or the deadline.
pub fn wait_console(
    g: &mut Running,
    what: &str,
    timeout: Duration,
    pred: &dyn Fn(&str) -> bool,
) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let text = g.console_text();
        if pred(&text) {
            return Ok(text);
        }
        if let Some(r) = text.lines().find_map(|l| l.split_once("VMH-RESULT ")) {
            bail!("guest finished while waiting for {what}: {}", r.1.trim());
        }
        if g.exited() {
            bail!("QEMU exited while waiting for {what} (see console, qemu logs)");
        }
        if t0.elapsed() > timeout {
            let last = text
                .lines()
                .rev()
                .find(|l| l.starts_with("VMH "))
                .unwrap_or("(no VMH line)")
                .to_owned();
            bail!(
                "no {what} within {} s; last guest line: {last}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `VMH-ACK name sha256` lines of a console log, in order.
pub fn acks(console: &str) -> Vec<(String, String)> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("VMH-ACK "))
        .filter_map(|r| {
            let mut it = r.split_whitespace();
            let (n, s) = (it.next()?, it.next()?);
            (s.len() == 64).then(|| (n.to_owned(), s.to_owned()))
        })
        .collect()
}

fn sha256_file(p: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let o = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&o.stderr));
    if !o.status.success() {
        bail!("{shown} failed ({}): {}", o.status, text.trim());
    }
    Ok(text)
}

/// Host-side view of B's export without nbd.ko: `nbdfuse` file → loop
/// device → `mount -o ro` (ext4 replays its journal through the export, as
/// a real failover mount would). Torn down in reverse order on drop.
struct HostMount {
    fuse_dir: PathBuf,
    mnt: PathBuf,
    nbdfuse: Option<Child>,
    loopdev: Option<String>,
    mounted: bool,
}

impl HostMount {
    fn open(run: &Path, socket: &Path) -> Result<HostMount> {
        let fuse_dir = run.join("fuse");
        let mnt = run.join("mnt");
        std::fs::create_dir_all(&fuse_dir)?;
        std::fs::create_dir_all(&mnt)?;
        let log = std::fs::File::create(run.join("nbdfuse.log"))?;
        let child = Command::new("nbdfuse")
            .arg(fuse_dir.join("nbd"))
            .arg(format!("nbd+unix:///md1?socket={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start nbdfuse (apt-get install libnbd-bin fuse3)")?;
        let mut m = HostMount {
            fuse_dir,
            mnt,
            nbdfuse: Some(child),
            loopdev: None,
            mounted: false,
        };
        let file = m.fuse_dir.join("nbd");
        let t0 = Instant::now();
        while std::fs::metadata(&file).map_or(0, |md| md.len()) != DATA_SIZE {
            if let Some(c) = m.nbdfuse.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("nbdfuse exited ({st}): see nbdfuse.log");
                }
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(20),
                "nbdfuse file did not appear with size {DATA_SIZE}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let l = run_cmd(Command::new("losetup").arg("-f").arg("--show").arg(&file))?;
        m.loopdev = Some(l.trim().to_owned());
        Ok(m)
    }

    fn dev(&self) -> &str {
        self.loopdev.as_deref().unwrap_or_default()
    }

    fn mount_ro(&mut self) -> Result<()> {
        run_cmd(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "ro"])
                .arg(self.dev())
                .arg(&self.mnt),
        )?;
        self.mounted = true;
        Ok(())
    }

    fn umount(&mut self) -> Result<()> {
        if self.mounted {
            run_cmd(Command::new("umount").arg(&self.mnt))?;
            self.mounted = false;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        self.umount()?;
        if let Some(l) = self.loopdev.take() {
            run_cmd(Command::new("losetup").arg("-d").arg(&l))?;
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.fuse_dir)
                .status();
            let t0 = Instant::now();
            while c.try_wait()?.is_none() {
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Mounts B's export on the host (read-only), checks every acknowledged
/// file's checksum, unmounts, `e2fsck -fn` on the loop device. Returns a
/// one-line summary.
pub fn verify_b_export(ctx: &mut Ctx, expected: &[(String, String)]) -> Result<String> {
    let socket = ctx.run.join("nodeb-md1.nbd");
    let mut m = HostMount::open(&ctx.run, &socket)?;
    ctx.step(&format!("B's export on the host: nbdfuse + {}", m.dev()));
    m.mount_ro()?;
    let mut bad = Vec::new();
    for (name, sha) in expected {
        match sha256_file(&m.mnt.join(name)) {
            Ok(got) if &got == sha => {}
            Ok(got) => bad.push(format!("{name}: sha256 {got}, acked {sha}")),
            Err(e) => bad.push(format!("{name}: {e:#}")),
        }
    }
    let present = std::fs::read_dir(&m.mnt)?.count();
    m.umount()?;
    let fsck = Command::new("e2fsck").arg("-fn").arg(m.dev()).output()?;
    let fsck_text =
        String::from_utf8_lossy(&fsck.stdout).into_owned() + &String::from_utf8_lossy(&fsck.stderr);
    std::fs::write(ctx.run.join("e2fsck-b.log"), &fsck_text)?;
    m.close()?;
    ensure!(
        bad.is_empty(),
        "{} of {} acknowledged files wrong or missing on B: {}",
        bad.len(),
        expected.len(),
        bad.join("; ")
    );
    ensure!(
        fsck.status.success(),
        "e2fsck -fn of B's volume not clean ({}): {}",
        fsck.status,
        fsck_text
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join(" / ")
    );
    Ok(format!(
        "all {} acked files match on B ({present} entries in the root), e2fsck -fn clean",
        expected.len()
    ))
}

/// sha256 of both data images (after both nodes deactivated).
pub fn compare_images(ctx: &mut Ctx) -> Result<String> {
    let a = sha256_file(&ctx.run.join("nodea-data.img"))?;
    let b = sha256_file(&ctx.run.join("nodeb-data.img"))?;
    ctx.step(&format!("sha256 nodea-data.img {a}"));
    ctx.step(&format!("sha256 nodeb-data.img {b}"));
    ensure!(a == b, "data images differ: nodea {a}, nodeb {b}");
    Ok(a)
}

/// `name sha` lines for the guest (`/etc/vmh/expected`).
pub fn expected_file(acks: &[(String, String)]) -> Vec<u8> {
    let mut s = String::new();
    for (n, h) in acks {
        s.push_str(&format!("{h}  {n}\n"));
    }
    s.into_bytes()
}

/// Prepares B: sparse data file and `mdctrl init md1 --blank`, then starts its agent.
pub fn start_b(ctx: &mut Ctx) -> Result<HostAgent> {
    let data = ctx.run.join("nodeb-data.img");
    std::fs::File::create(&data)?.set_len(DATA_SIZE)?;
    let _ = std::fs::remove_file(ctx.run.join("nodeb-cp.img"));
    let out = ctx.b().ok(&["init", "md1", "--blank"])?;
    ctx.step(&format!(
        "nodeb: mdctrl init md1 --blank: {}",
        out.lines().next().unwrap_or("")
    ));
    HostAgent::start(ctx, "nodeb.log")
}

fn has_line(text: &str, needle: &str) -> bool {
    text.lines().any(|l| l.contains(needle))
}

/// The whole failover scenario. `Ok(summary)` = PASS.
pub fn failover(ctx: &mut Ctx, n_acks: usize) -> Result<String> {
    let b_agent = start_b(ctx)?;
    let b = ctx.b();

    // Boot 1: A initialises, connects, activates, writes and acks files.
    let spec1 = ctx.guest(FAILOVER_SH, "-1", "vmh.phase=1")?;
    let mut g1 = ctx.boot(&spec1)?;
    wait_console(&mut g1, "activation on A", Duration::from_secs(240), &|t| {
        has_line(t, "MARK-A-ACTIVE")
    })?;
    ctx.step("A activated: /dev/nbd0 attached by the agent, ext4 mounted in the guest");
    let st = b.status("md1")?;
    ctx.step(&format!("B: {}", crate::status::summary(&st)));
    ensure!(
        Cond::Connected.holds(&st) && Cond::InSync.holds(&st),
        "B does not see a connected, in-sync peer while A is active: {}",
        crate::status::summary(&st)
    );
    wait_console(
        &mut g1,
        &format!("{n_acks} VMH-ACK lines"),
        Duration::from_secs(240),
        &|t| acks(t).len() >= n_acks,
    )?;
    // Power loss of A: nothing is flushed beyond what the guest already acked.
    g1.kill();
    let console1 = g1.console_text();
    let acked = acks(&console1);
    ctx.step(&format!(
        "QEMU of A SIGKILLed after {} acked files (last {})",
        acked.len(),
        acked.last().map_or("-", |a| a.0.as_str())
    ));
    drop(g1);

    // B sees the break; plain activation must be refused; force; activate.
    let st = b.wait(
        "md1",
        &[Cond::Disconnected],
        Duration::from_secs(60),
        &mut |l| ctx.step(l),
    )?;
    ctx.step(&format!(
        "B sees the break: {}",
        crate::status::summary(&st)
    ));
    let refused = b.run(&["activate", "md1"])?;
    // 5 = peer unreachable, 3 = refused (docs/mdctrl.md); either way not activated.
    ensure!(
        matches!(refused.code, 3 | 5) && refused.text.contains("force"),
        "mdctrl activate md1 on B with A unreachable and no force: expected a refusal (exit 3/5) with a force hint, got exit {}: {}",
        refused.code,
        refused.text.trim()
    );
    ctx.step(&format!(
        "B: activate without force refused: {}",
        refused.text.lines().next().unwrap_or("").trim()
    ));
    let out = b.ok(&["force", "nodeb", "md1"])?;
    ctx.step(&format!(
        "B: mdctrl force nodeb md1: {}",
        out.lines().next().unwrap_or("").trim()
    ));
    b.ok(&["activate", "md1"])?;
    let st = b.status("md1")?;
    ensure!(
        Cond::Active.holds(&st),
        "B not active after activate: {}",
        crate::status::summary(&st)
    );
    ctx.step(&format!("B active: {}", crate::status::summary(&st)));

    let v = verify_b_export(ctx, &acked)?;
    ctx.step(&format!("B verified on the host: {v}"));

    // Boot 2: A returns on the same disks, B -> A resync, then A takes over.
    let mut spec2 = ctx.guest(FAILOVER_SH, "-2", "vmh.phase=2")?;
    spec2
        .extra_files
        .push(("/etc/vmh/expected".into(), expected_file(&acked), 0o644));
    let mut g2 = ctx.boot(&spec2)?;
    let mut seen = Vec::new();
    let st = {
        let t0 = Instant::now();
        loop {
            if g2.exited() {
                bail!(
                    "A's second boot ended before B was in sync: {}",
                    last_vmh(&g2.console_text())
                );
            }
            let s = b.status("md1")?;
            let key = crate::status::coarse(&s);
            if seen.last() != Some(&key) {
                ctx.step(&format!("B: {}", crate::status::summary(&s)));
                seen.push(key);
            }
            if Cond::Connected.holds(&s)
                && Cond::InSync.holds(&s)
                && Cond::RecoveryFinished.holds(&s)
            {
                break s;
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(300),
                "B not in sync with the returned A within 300 s: {}",
                crate::status::summary(&s)
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    };
    let rec = b_recovery(&st, "nodeb", "nodea", "source")?;
    ctx.step(&format!(
        "resync {} {} ({}) finished: {} of {} bytes; status lines seen on B: {}",
        rec.direction,
        rec.kind,
        rec.rule,
        rec.done_bytes,
        rec.total_bytes,
        seen.len()
    ));
    wait_console(&mut g2, "A in sync", Duration::from_secs(120), &|t| {
        has_line(t, "MARK-A-IN-SYNC")
    })?;
    b.ok(&["deactivate", "md1"])?;
    ctx.step("B deactivated; A activates in the guest");
    let o = g2.wait()?;
    ctx.step(&format!(
        "A's second boot: {} {} (wall {:.1} s)",
        if o.pass { "PASS" } else { "FAIL" },
        o.reason,
        o.wall.as_secs_f64()
    ));
    ensure!(o.pass, "A (second boot): {}", o.reason);
    let st = b.status("md1")?;
    ctx.step(&format!(
        "B after A's shutdown: {}",
        crate::status::summary(&st)
    ));
    ensure!(Cond::Inactive.holds(&st), "B is active at the end");
    let rc = b_agent.stop()?;
    ensure!(
        rc.success(),
        "nodeb's mirror-agent exit status {rc} after SIGTERM"
    );
    let sha = compare_images(ctx)?;
    Ok(format!(
        "{} acked files survived A's power loss on B (host mount + e2fsck clean); B -> A {} resync ({}, {} bytes); files verified on A after failback; data images identical (sha256 {}...)",
        acked.len(),
        rec.kind,
        rec.rule,
        rec.done_bytes,
        &sha[..16]
    ))
}

fn last_vmh(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| l.starts_with("VMH"))
        .unwrap_or("(no VMH line)")
        .to_owned()
}

/// Entry point of `vm-harness failover`: ports, config, context, scenario.
pub fn failover_main(cache: Cache, bins: OurBins, run: PathBuf) -> Result<String> {
    let [c, m] = free_ports()?;
    let config = pair_config(&run, c, m, "127.0.0.1");
    validate(&config, &run)?;
    let mut ctx = Ctx::new(cache, bins, run, config)?;
    ctx.step(&format!(
        "nodeb listens on 127.0.0.1:{c} (control) and :{m} (mirror); A dials 10.0.2.2"
    ));
    failover(&mut ctx, 12)
}

/// Parses the pair config with this build's parser (host path), before anything runs.
pub fn validate(config: &str, run: &Path) -> Result<()> {
    mirror_agent::config::Config::parse(config, &run.join("cluster.toml"))
        .map_err(|e| anyhow::anyhow!("pair config invalid: {e}"))?;
    Ok(())
}

/// Entry point of `vm-harness partition`: B listens on 127.0.0.2 behind the
/// fault proxy on 127.0.0.1 (where A's slirp connections arrive).
pub fn partition_main(cache: Cache, bins: OurBins, run: PathBuf) -> Result<String> {
    let [c, m] = free_ports()?;
    let config = pair_config(&run, c, m, "127.0.0.2");
    validate(&config, &run)?;
    let proxy = crate::proxy::Proxy::start(&[c, m], std::net::Ipv4Addr::new(127, 0, 0, 2).into())?;
    let mut ctx = Ctx::new(cache, bins, run, config)?;
    ctx.step(&format!(
        "nodeb listens on 127.0.0.2:{c} (control) and :{m} (mirror); fault proxy on 127.0.0.1 (A dials 10.0.2.2)"
    ));
    partition(&mut ctx, &proxy)
}

/// The partition scenario. `Ok(summary)` = PASS.
pub fn partition(ctx: &mut Ctx, proxy: &crate::proxy::Proxy) -> Result<String> {
    let b_agent = start_b(ctx)?;
    let b = ctx.b();
    let spec = ctx.guest(PARTITION_SH, "", "")?;
    let mut g = ctx.boot(&spec)?;
    wait_console(&mut g, "activation on A", Duration::from_secs(240), &|t| {
        has_line(t, "MARK-A-ACTIVE")
    })?;
    let st = b.status("md1")?;
    ctx.step(&format!("A active; B: {}", crate::status::summary(&st)));
    ensure!(
        Cond::Connected.holds(&st) && Cond::InSync.holds(&st),
        "B not connected and in sync while A is active: {}",
        crate::status::summary(&st)
    );
    wait_console(
        &mut g,
        "6 acked files before the cut",
        Duration::from_secs(120),
        &|t| acks(t).len() >= 6,
    )?;
    let before = acks(&g.console_text()).len();
    let cut_at = Instant::now();
    proxy.cut();
    ctx.step(&format!("link CUT (blackhole both directions) after {before} acked files; proxy so far: {:?} (conns, bytes)", proxy.counters()));
    let st = b.wait(
        "md1",
        &[Cond::Disconnected],
        Duration::from_secs(90),
        &mut |l| ctx.step(l),
    )?;
    ctx.step(&format!(
        "B saw the break {:.1} s after the cut: {}",
        cut_at.elapsed().as_secs_f64(),
        crate::status::summary(&st)
    ));
    // A must keep serving alone: at least 3 more files acked after A saw the break.
    let text = wait_console(
        &mut g,
        "3 files acked by A alone during the cut",
        Duration::from_secs(120),
        &|t| {
            t.find("MARK-A-SAW-BREAK")
                .is_some_and(|i| acks(&t[i..]).len() >= 3)
        },
    )?;
    let during = acks(&text).len() - before;
    ctx.step(&format!(
        "A kept writing through the cut: {during} files acked since the cut ({:.1} s)",
        cut_at.elapsed().as_secs_f64()
    ));
    let st = b.status("md1")?;
    ensure!(
        Cond::Disconnected.holds(&st),
        "B reconnected while the link is cut: {}",
        crate::status::summary(&st)
    );
    proxy.heal();
    let cut_secs = cut_at.elapsed().as_secs_f64();
    ctx.step(&format!("link HEALED after {cut_secs:.1} s"));
    let st = b.wait(
        "md1",
        &[Cond::Connected, Cond::InSync, Cond::RecoveryFinished],
        Duration::from_secs(300),
        &mut |l| ctx.step(l),
    )?;
    let rec = b_recovery(&st, "nodea", "nodeb", "target")?;
    ctx.step(&format!(
        "auto recovery {} {} ({}) finished: {} bytes",
        rec.direction, rec.kind, rec.rule, rec.done_bytes
    ));
    let o = g.wait()?;
    ctx.step(&format!(
        "A: {} {} (wall {:.1} s)",
        if o.pass { "PASS" } else { "FAIL" },
        o.reason,
        o.wall.as_secs_f64()
    ));
    ensure!(o.pass, "A: {}", o.reason);
    let acked = acks(&std::fs::read_to_string(spec.console(&ctx.run)).unwrap_or_default());
    let st = b.status("md1")?;
    ensure!(Cond::Inactive.holds(&st), "B is active at the end");
    let rc = b_agent.stop()?;
    ensure!(
        rc.success(),
        "nodeb's mirror-agent exit status {rc} after SIGTERM"
    );
    let sha = compare_images(ctx)?;
    let v = verify_image(&ctx.run, &ctx.run.join("nodeb-data.img"), &acked)?;
    ctx.step(&format!("B's data image: {v}"));
    Ok(format!(
        "cut {cut_secs:.0} s during a write stream ({during} files acked by A alone), healed, auto recovery {} {} ({}, {} bytes), {} acked files present on B's image, e2fsck -fn clean, data images identical (sha256 {}...)",
        rec.direction,
        rec.kind,
        rec.rule,
        rec.done_bytes,
        acked.len(),
        &sha[..16]
    ))
}

/// Mounts a data image read-only through a loop device (the node is
/// stopped), checks the acknowledged files, unmounts, `e2fsck -fn`.
pub fn verify_image(run: &Path, img: &Path, expected: &[(String, String)]) -> Result<String> {
    let mnt = run.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let l = run_cmd(
        Command::new("losetup")
            .args(["-f", "--show", "-r"])
            .arg(img),
    )?;
    let dev = l.trim().to_owned();
    let r = (|| -> Result<String> {
        run_cmd(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "ro,noload"])
                .arg(&dev)
                .arg(&mnt),
        )?;
        let mut bad = Vec::new();
        for (name, sha) in expected {
            match sha256_file(&mnt.join(name)) {
                Ok(got) if &got == sha => {}
                Ok(got) => bad.push(format!("{name}: sha256 {got}, acked {sha}")),
                Err(e) => bad.push(format!("{name}: {e:#}")),
            }
        }
        run_cmd(Command::new("umount").arg(&mnt))?;
        ensure!(
            bad.is_empty(),
            "{} of {} acknowledged files wrong or missing: {}",
            bad.len(),
            expected.len(),
            bad.join("; ")
        );
        let fsck = Command::new("e2fsck").arg("-fn").arg(&dev).output()?;
        let text = String::from_utf8_lossy(&fsck.stdout).into_owned()
            + &String::from_utf8_lossy(&fsck.stderr);
        ensure!(
            fsck.status.success(),
            "e2fsck -fn not clean ({}): {}",
            fsck.status,
            text.lines().rev().take(3).collect::<Vec<_>>().join(" / ")
        );
        Ok(format!(
            "all {} acked files match, e2fsck -fn clean",
            expected.len()
        ))
    })();
    let _ = Command::new("umount")
        .arg(&mnt)
        .stderr(Stdio::null())
        .status();
    let _ = run_cmd(Command::new("losetup").arg("-d").arg(&dev));
    r
}

/// B's finished recovery record, checked to have gone `from -> to` with B in
/// `role` (source/target).
fn b_recovery(
    st: &mirror_agent::status::ResourceStatus,
    from: &str,
    to: &str,
    role: &str,
) -> Result<mirror_agent::status::RecoveryStatus> {
    let rec = st
        .pair
        .as_ref()
        .and_then(|p| p.recovery.clone())
        .context("no recovery record on B")?;
    ensure!(
        rec.direction.replace(' ', "") == format!("{from}->{to}") && rec.role == role,
        "resync went {} (B role {}), expected {from} -> {to} with B the {role}",
        rec.direction,
        rec.role
    );
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_parse_only_complete_lines() {
        let sha = "a".repeat(64);
        let text = format!(
            "VMH 1.0 x\nVMH-ACK f0001 {sha}\nVMH-ACK f0002 {}\nnoise VMH-ACK f0003 {sha}\nVMH-ACK f0004 {sha}\n",
            &sha[..10]
        );
        let a = acks(&text);
        assert_eq!(
            a,
            vec![
                ("f0001".to_owned(), sha.clone()),
                ("f0004".to_owned(), sha.clone())
            ]
        );
        assert_eq!(
            String::from_utf8(expected_file(&a)).unwrap(),
            format!("{sha}  f0001\n{sha}  f0004\n")
        );
    }

    /// The host-side file check can fail: a wrong checksum and a missing
    /// file are reported, the right ones pass (needs root, loop devices, mkfs.ext4).
    #[test]
    fn verify_image_detects_wrong_and_missing_files() {
        let have = is_root()
            && Command::new("mkfs.ext4").arg("-V").output().is_ok()
            && Path::new("/dev/loop-control").exists();
        if !have {
            eprintln!("SKIP verify_image test: needs root, /dev/loop-control and mkfs.ext4");
            assert!(
                std::env::var("NBD_MIRROR_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "NBD_MIRROR_REQUIRE_TOOLS=1 but the verify_image test cannot run"
            );
            return;
        }
        let run = std::env::temp_dir().join(format!("vmh-verify-{}", std::process::id()));
        std::fs::create_dir_all(run.join("mnt")).unwrap();
        let img = run.join("t.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        run_cmd(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img)).unwrap();
        run_cmd(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(run.join("mnt")),
        )
        .unwrap();
        std::fs::write(run.join("mnt/f0001"), b"hello").unwrap();
        run_cmd(Command::new("umount").arg(run.join("mnt"))).unwrap();
        let good = sha256_file(&{
            let p = run.join("hello");
            std::fs::write(&p, b"hello").unwrap();
            p
        })
        .unwrap();
        let ok = verify_image(&run, &img, &[("f0001".into(), good.clone())]);
        assert!(ok.is_ok(), "{ok:?}");
        let bad = verify_image(&run, &img, &[("f0001".into(), "0".repeat(64))]);
        assert!(format!("{bad:?}").contains("f0001: sha256"), "{bad:?}");
        let missing = verify_image(
            &run,
            &img,
            &[("f0001".into(), good), ("f0002".into(), "0".repeat(64))],
        );
        assert!(format!("{missing:?}").contains("f0002"), "{missing:?}");
        let _ = std::fs::remove_dir_all(&run);
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
            })
            .unwrap_or(false)
    }

    #[test]
    fn pair_config_parses() {
        let run = std::env::temp_dir().join("vmh-pair-config-test");
        validate(&pair_config(&run, 40001, 40002, "127.0.0.2"), &run).unwrap();
    }
}
