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
//!   (kernel attach through `mirror_agent::kernel`).
//! - `guest-init.sh`, `scenarios/*.sh`: the guest's `/init` and the
//!   scenario scripts it sources.

mod cache;
mod guest;
mod initramfs;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// A scenario: name, description, and how to build its guest (None = designed, not built).
struct Scenario {
    name: &'static str,
    what: &'static str,
    spec: Option<fn() -> vm::GuestSpec>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "smoke",
        what: "one guest: mdctrl init, agent ping/activate, /dev/nbd0 via kernel netlink attach: mkfs, mount, files, busy umount, detach, e2fsck, re-attach, nbd-client fallback, restart + RECONFIGURE",
        spec: Some(smoke_spec),
    },
    Scenario {
        name: "stall",
        what: "the process serving /dev/nbd0 SIGSTOPped 12 s (< 30 s kernel timeout) during fsync writes; the guest sees no error",
        spec: Some(stall_spec),
    },
    Scenario {
        name: "failover",
        what: "(designed, not built) node A in a guest with /dev/nbd0 + ext4, killed hard; node B forced, verified; A returns and resyncs",
        spec: None,
    },
    Scenario {
        name: "partition",
        what: "(designed, not built) link between the nodes cut and healed during a write stream; auto recovery converges",
        spec: None,
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
    vm::GuestSpec {
        script: include_str!("scenarios/smoke.sh"),
        config: standalone_config(),
        disks: disks(),
        cmdline: String::new(),
        guest_watchdog: 420,
        host_timeout: 600,
        mem_mib: 1024,
    }
}

fn stall_spec() -> vm::GuestSpec {
    vm::GuestSpec {
        script: include_str!("scenarios/stall.sh"),
        config: standalone_config(),
        disks: disks(),
        cmdline: "vmh.stall=12".into(),
        guest_watchdog: 300,
        host_timeout: 420,
        mem_mib: 1024,
    }
}

/// Real-kernel scenarios for nbd-mirror under QEMU (TCG).
#[derive(Debug, Parser)]
#[command(name = "vm-harness", args_conflicts_with_subcommands = true)]
struct Args {
    /// Scenario to run; `list` prints them.
    scenario: Option<String>,
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
    let Some(name) = args.scenario else {
        eprintln!("vm-harness: name a scenario (`vm-harness list` shows them)");
        return ExitCode::from(2);
    };
    if name == "list" {
        for s in SCENARIOS {
            println!("{:<10} {}", s.name, s.what);
        }
        return ExitCode::SUCCESS;
    }
    let Some(sc) = SCENARIOS.iter().find(|s| s.name == name) else {
        eprintln!("vm-harness: unknown scenario {name:?}; `vm-harness list` shows them");
        return ExitCode::from(2);
    };
    let Some(spec) = sc.spec else {
        println!(
            "FAIL {}: designed in docs/vm-harness.md but not built yet; nothing was run",
            sc.name
        );
        return ExitCode::FAILURE;
    };
    let mut spec = spec();
    if !args.cmdline.is_empty() {
        spec.cmdline = format!("{} {}", spec.cmdline, args.cmdline);
    }
    match run_scenario(sc.name, spec, args.run_dir) {
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
            if o.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("FAIL {}: harness error: {e:#}", sc.name);
            ExitCode::FAILURE
        }
    }
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
