//! # vm-harness: real-kernel scenarios under QEMU (TCG)
//!
//! `cargo build --release -p mirror-agent -p cli -p vm-harness`, then
//! `cargo run --release -p vm-harness -- SCENARIO` (or `list`). Each scenario
//! boots a Debian kernel with a busybox initramfs holding *this build's*
//! `mirror-agent`, `mdctrl` and `vm-harness` (the guest helper), prints
//! `PASS`/`FAIL` with the reason and the run directory, and exits 0/1.
//! Design, timings and the planned scenarios: `docs/vm-harness.md`.
//!
//! Module map:
//!
//! - [`cache`]: Debian packages (kernel, busybox-static, nbd-client,
//!   e2fsprogs, QEMU if the host has none) downloaded and unpacked once
//!   under `$VMH_CACHE` (default `~/.cache/nbd-mirror-vmh`).
//! - [`initramfs`]: the guest image (programs with their `ldd` libraries,
//!   module closure, newc cpio, gzip).
//! - [`vm`]: one boot: serial logs, virtual disks, guest watchdog + host
//!   timeout, the `VMH-RESULT` verdict.
//! - [`guest`]: `vm-harness guest ...`, the helper run *inside* the guest
//!   (kernel attach through `mirror_agent::kernel`; `wait-status`).
//! - [`status`]: `mdctrl status --json` as typed data and waits on it
//!   (host for node B, guest for node A).
//! - [`twonode`]: the two-node scenarios `failover` and `partition`: node A
//!   in guests, node B a `mirror-agent` on the host, host-side checks
//!   (nbdfuse + loop mount, e2fsck, image comparison).
//! - [`proxy`]: the userspace fault proxy between the nodes (cut / heal).
//! - `guest-init.sh`, `scenarios/*.sh`: the guest's `/init` and the
//!   scenario scripts it sources (`pair-common.sh` is prepended to the
//!   two-node ones).

mod cache;
mod guest;
mod initramfs;
mod proxy;
mod status;
mod twonode;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// A scenario: name, description, and how it runs.
struct Scenario {
    name: &'static str,
    what: &'static str,
    kind: Kind,
}

/// How a scenario runs.
#[derive(Clone, Copy)]
enum Kind {
    /// One guest whose script decides the verdict.
    Single(fn() -> vm::GuestSpec),
    /// Node A in guests, node B on the host, driven by the harness
    /// (`twonode`): `Ok(summary)` = PASS.
    Pair(fn(cache::Cache, vm::OurBins, PathBuf) -> Result<String>),
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "smoke",
        what: "one guest: mdctrl init, agent ping/activate, /dev/nbd0 via kernel netlink attach: mkfs, mount, files, busy umount, detach, e2fsck, re-attach, nbd-client fallback, restart + RECONFIGURE",
        kind: Kind::Single(smoke_spec),
    },
    Scenario {
        name: "stall",
        what: "the active mirror-agent (mdctrl activate: /dev/nbd0 via netlink) SIGSTOPped 12 s (< 30 s kernel timeout) during fsync writes; the guest sees no error",
        kind: Kind::Single(stall_spec),
    },
    Scenario {
        name: "failover",
        what: "node A in a guest (/dev/nbd0 + ext4, fsynced files acked) is SIGKILLed; node B on the host: forced, activated, files verified; A returns, B -> A resync, failback, images equal",
        kind: Kind::Pair(twonode::failover_main),
    },
    Scenario {
        name: "partition",
        what: "node A in a guest writes through /dev/nbd0 while the harness's fault proxy cuts the link to node B (host) and heals it; A serves alone, auto recovery A -> B converges, images equal, files present",
        kind: Kind::Pair(twonode::partition_main),
    },
];

/// The guest's standalone config: data on `/dev/vda`, cluster partition on `/dev/vdb`.
fn standalone_config() -> String {
    r#"[cluster]
name = "vmh"

[[server]]
name = "nodea"
address = "127.0.0.1"
control_port = 29004
admin_socket = "/run/md/admin.sock"

[[resource]]
name = "md1"
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
"#
    .to_owned()
}

fn disks() -> Vec<(String, u64)> {
    vec![
        ("nodea-data.img".into(), 256 << 20),
        ("nodea-cp.img".into(), 16 << 20),
    ]
}

fn smoke_spec() -> vm::GuestSpec {
    vm::GuestSpec::single(
        include_str!("scenarios/smoke.sh"),
        standalone_config(),
        disks(),
    )
}

fn stall_spec() -> vm::GuestSpec {
    vm::GuestSpec {
        cmdline: "vmh.stall=12".into(),
        guest_watchdog: 300,
        host_timeout: 420,
        ..vm::GuestSpec::single(
            include_str!("scenarios/stall.sh"),
            standalone_config(),
            disks(),
        )
    }
}

/// Real-kernel scenarios for nbd-mirror under QEMU (TCG).
#[derive(Debug, Parser)]
#[command(name = "vm-harness", args_conflicts_with_subcommands = true)]
struct Args {
    /// Scenarios to run, one after the other (`all` = every scenario);
    /// `list` prints them. Exit 0 only if all pass.
    scenarios: Vec<String>,
    /// Run directory (default: a new directory under the cache's `runs/`).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Extra guest kernel command line (scenario knobs such as `vmh.stall=40`;
    /// later values win).
    #[arg(long, default_value = "")]
    cmdline: String,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Inside the guest: the kernel-attach helper.
    #[command(subcommand)]
    Guest(guest::GuestCmd),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Cmd::Guest(g)) = args.cmd {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .init();
        return match guest::run(g) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("ERROR: {e:#}");
                eprintln!("ERROR: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.scenarios.is_empty() {
        eprintln!("vm-harness: name a scenario (`vm-harness list` shows them)");
        return ExitCode::from(2);
    }
    if args.scenarios.iter().any(|n| n == "list") {
        for s in SCENARIOS {
            println!("{:<10} {}", s.name, s.what);
        }
        return ExitCode::SUCCESS;
    }
    let mut todo = Vec::new();
    for name in &args.scenarios {
        if name == "all" {
            todo.extend(SCENARIOS.iter());
            continue;
        }
        let Some(sc) = SCENARIOS.iter().find(|s| s.name == *name) else {
            eprintln!("vm-harness: unknown scenario {name:?}; `vm-harness list` shows them");
            return ExitCode::from(2);
        };
        todo.push(sc);
    }
    if todo.len() > 1 && args.run_dir.is_some() {
        eprintln!("vm-harness: --run-dir needs exactly one scenario");
        return ExitCode::from(2);
    }
    // One guest at a time: each TCG guest keeps two host cores busy.
    let mut failed = Vec::new();
    for sc in &todo {
        if !run_one(sc, &args.cmdline, args.run_dir.clone()) {
            failed.push(sc.name);
        }
    }
    if todo.len() > 1 {
        println!(
            "vm-harness: {} of {} scenarios passed{}",
            todo.len() - failed.len(),
            todo.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", failed.join(" "))
            }
        );
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs one scenario, prints its verdict; true = PASS.
fn run_one(sc: &Scenario, cmdline: &str, run_dir: Option<PathBuf>) -> bool {
    let spec = match sc.kind {
        Kind::Single(f) => f,
        Kind::Pair(f) => return run_pair(sc.name, f, run_dir),
    };
    let mut spec = spec();
    if !cmdline.is_empty() {
        spec.cmdline = format!("{} {}", spec.cmdline, cmdline);
    }
    match run_scenario(sc.name, spec, run_dir) {
        Ok((o, run)) => {
            let guest = o
                .guest_secs
                .map(|g| format!(", guest uptime {g:.1} s"))
                .unwrap_or_default();
            println!(
                "{} {}: {} (wall {:.1} s{guest})",
                if o.pass { "PASS" } else { "FAIL" },
                sc.name,
                o.reason,
                o.wall.as_secs_f64()
            );
            println!("run directory: {}", run.display());
            o.pass
        }
        Err(e) => {
            println!("FAIL {}: harness error: {e:#}", sc.name);
            false
        }
    }
}

fn new_run_dir(cache: &cache::Cache, name: &str, run_dir: Option<PathBuf>) -> Result<PathBuf> {
    let run = match run_dir {
        Some(d) => d,
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            cache.dir.join("runs").join(format!("{name}-{stamp}"))
        }
    };
    std::fs::create_dir_all(&run).with_context(|| format!("create {}", run.display()))?;
    Ok(run)
}

/// Runs a two-node scenario and prints its verdict.
fn run_pair(
    name: &str,
    f: fn(cache::Cache, vm::OurBins, PathBuf) -> Result<String>,
    run_dir: Option<PathBuf>,
) -> bool {
    let t0 = std::time::Instant::now();
    let mut run = None;
    let r = (|| -> Result<String> {
        let cache = cache::prepare(&cache::default_dir())?;
        let bins = vm::OurBins::locate()?;
        let dir = new_run_dir(&cache, name, run_dir)?;
        run = Some(dir.clone());
        eprintln!(
            "vm-harness: {name}: kernel {} / {}; run dir {}",
            cache.kver,
            cache.qemu_version(),
            dir.display()
        );
        f(cache, bins, dir)
    })();
    let wall = t0.elapsed().as_secs_f64();
    let pass = match r {
        Ok(summary) => {
            println!("PASS {name}: {summary} (wall {wall:.1} s)");
            true
        }
        Err(e) => {
            println!("FAIL {name}: {e:#} (wall {wall:.1} s)");
            false
        }
    };
    if let Some(run) = run {
        println!("run directory: {}", run.display());
    }
    pass
}

fn run_scenario(
    name: &str,
    spec: vm::GuestSpec,
    run_dir: Option<PathBuf>,
) -> Result<(vm::Outcome, PathBuf)> {
    let t0 = std::time::Instant::now();
    // Validate the guest config with this build's parser before booting anything.
    mirror_agent::config::Config::parse(
        &spec.config,
        std::path::Path::new("/etc/nbd-mirror/cluster.toml"),
    )
    .map_err(|e| anyhow::anyhow!("guest config invalid: {e}"))?;
    let cache = cache::prepare(&cache::default_dir())?;
    let bins = vm::OurBins::locate()?;
    let run = new_run_dir(&cache, name, run_dir)?;
    eprintln!(
        "vm-harness: {name}: kernel {} / {}; run dir {}",
        cache.kver,
        cache.qemu_version(),
        run.display()
    );
    let initrd = vm::build_initramfs(&cache, &bins, &spec, &run)?;
    eprintln!(
        "vm-harness: prepared in {:.1} s; booting (TCG)",
        t0.elapsed().as_secs_f64()
    );
    let o = vm::boot(&cache, &spec, &initrd, &run)?;
    Ok((o, run))
}
