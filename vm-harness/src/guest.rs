//! Guest-side helper (`vm-harness guest ...`), run inside the VM: serves a
//! resource's data partition with the agent's NBD server and attaches
//! `/dev/nbdX` through `mirror_agent::kernel` — the path the agent's
//! activation will take once wired — then exercises a real file system.
//!
//! Subcommands:
//! - `kernel-smoke`: attach (netlink), mkfs.ext4, fsck, mount, write files,
//!   busy-umount refusal naming the holder, umount, detach, `e2fsck -fn` of
//!   the *backing* device, re-attach, verify checksums, then the same
//!   through the `nbd-client` fallback, detach.
//! - `serve`: attach (re-attaching a still-configured device with
//!   `NBD_CMD_RECONFIGURE`) and serve until SIGTERM, then detach. Used to
//!   test agent death/restart and SIGSTOP stalls from the guest script.
//! - `wait-status`: polls `mdctrl status RES --json` until conditions hold
//!   (connected, in sync, peer inactive, ...): how node A's script follows
//!   node B in the two-node scenarios.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mirror_agent::config::Config;
use mirror_agent::engine::{self, BlockEngine};
use mirror_agent::kernel::{self, AttachMethod, AttachOptions, Attached, KernelError};
use mirror_agent::nbd::{self, BlockSizes, Export, NbdServer};
use sha2::{Digest, Sha256};

/// Common arguments of the guest subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct GuestArgs {
    /// Cluster configuration.
    #[arg(long, default_value = "/etc/nbd-mirror/cluster.toml")]
    config: PathBuf,
    /// Node name.
    #[arg(long, default_value = "nodea")]
    node: String,
    /// Resource.
    #[arg(long, default_value = "md1")]
    resource: String,
    /// Kernel request timeout, seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// `vm-harness guest ...`.
#[derive(Debug, clap::Subcommand)]
pub enum GuestCmd {
    /// Attach, file system round trip, re-attach, fallback; see the module doc.
    KernelSmoke {
        #[command(flatten)]
        args: GuestArgs,
        /// Files of 4 MiB to write.
        #[arg(long, default_value_t = 8)]
        files: usize,
    },
    /// Attach and serve until SIGTERM, then detach.
    Serve {
        #[command(flatten)]
        args: GuestArgs,
        /// Written once attached: `attached netlink reconfigured=BOOL`.
        #[arg(long)]
        ready: PathBuf,
        /// Also fsck + mount on attach and umount before detach, through
        /// `kernel::activate_device` / `deactivate_device` (what activation does).
        #[arg(long)]
        mount: bool,
    },
    /// Polls `mdctrl status RES --json` until every `--until` condition
    /// holds (exit 0) or `--timeout` seconds pass (exit 1); prints each
    /// status change as one line.
    WaitStatus {
        /// Cluster configuration.
        #[arg(long, default_value = "/etc/nbd-mirror/cluster.toml")]
        config: PathBuf,
        /// Node name.
        #[arg(long, default_value = "nodea")]
        node: String,
        /// Resource.
        #[arg(long, default_value = "md1")]
        resource: String,
        /// Conditions (all must hold).
        #[arg(long, value_enum, value_delimiter = ',', required = true)]
        until: Vec<crate::status::Cond>,
        /// Seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

/// Runs a guest subcommand. IO_FLUSHER and mlockall are set up first, before
/// the runtime's threads exist, so every worker inherits the flag.
pub fn run(cmd: GuestCmd) -> Result<()> {
    if let GuestCmd::WaitStatus {
        config,
        node,
        resource,
        until,
        timeout,
    } = cmd
    {
        let md = crate::status::Mdctrl {
            bin: crate::status::mdctrl_bin(),
            config,
            node,
        };
        let s = md.wait(&resource, &until, Duration::from_secs(timeout), &mut |l| {
            println!("{l}")
        })?;
        println!("reached {until:?}: {}", crate::status::summary(&s));
        return Ok(());
    }
    let flusher = kernel::io_flusher_setup();
    println!(
        "io_flusher={} mlockall={}",
        ok(&flusher.io_flusher),
        ok(&flusher.mlockall)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            GuestCmd::KernelSmoke { args, files } => kernel_smoke(args, files).await,
            GuestCmd::Serve { args, ready, mount } => serve(args, ready, mount).await,
            GuestCmd::WaitStatus { .. } => unreachable!("handled above"),
        }
    })
}

fn ok<E: std::fmt::Display>(r: &Result<(), E>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("FAILED({e})"),
    }
}

struct Setup {
    server: Arc<NbdServer>,
    engine: Arc<dyn BlockEngine>,
    device: PathBuf,
    mount_point: PathBuf,
    fs: String,
    mount_options: Option<String>,
    socket: PathBuf,
    opts: AttachOptions,
}

/// Opens the data partition and builds the server the way activation does
/// (block sizes from the config), listening on the export's unix socket too
/// (the `nbd-client` fallback connects there).
async fn setup(a: &GuestArgs) -> Result<Setup> {
    let cfg = Config::load(&a.config).with_context(|| format!("load {}", a.config.display()))?;
    let rc = cfg
        .resource(&a.resource)
        .with_context(|| format!("no resource {}", a.resource))?
        .clone();
    let me = rc
        .node(&a.node)
        .with_context(|| format!("resource {} has no node {}", a.resource, a.node))?
        .clone();
    let device = me
        .nbd_device
        .clone()
        .context("the config sets no nbd_device for this node")?;
    let mount_point = me
        .mount_point
        .clone()
        .context("the config sets no mount_point for this node")?;
    let engine = engine::open(&me.data_path, &engine::EngineOptions::default())
        .with_context(|| format!("open data partition {}", me.data_path.display()))?;
    let mut export = Export::new(rc.name.clone(), Arc::clone(&engine));
    export.block_sizes = BlockSizes {
        minimum: rc.nbd_block_size_min as u32,
        preferred: 4096.max(rc.nbd_block_size_min as u32),
        maximum: rc.nbd_max_request as u32,
    };
    let server = NbdServer::new(vec![export], nbd::Limits::default())?;
    let listener = nbd::bind_unix(&me.nbd_socket, None)?;
    let s = Arc::clone(&server);
    tokio::spawn(async move {
        let _ = s.serve_unix(listener).await;
    });
    let opts = AttachOptions {
        timeout: Duration::from_secs(a.timeout),
        fallback_socket: Some(me.nbd_socket.clone()),
        ..AttachOptions::default()
    };
    Ok(Setup {
        server,
        engine,
        device,
        mount_point,
        fs: me.fs.clone(),
        mount_options: me.mount_options.clone(),
        socket: me.nbd_socket,
        opts,
    })
}

struct Steps {
    t0: Instant,
}

impl Steps {
    fn step(&self, what: &str) {
        println!("STEP {:>7.2}s {what}", self.t0.elapsed().as_secs_f64());
        let _ = std::io::stdout().flush();
    }
}

fn sh(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let o = cmd.output().with_context(|| format!("run {shown}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() {
        bail!("{shown} failed ({}): {}", o.status, text.trim());
    }
    Ok(text)
}

fn sysfs_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Writes `n` files of 4 MiB random data under `dir`, each fsynced; returns
/// (name, sha256) pairs and also writes them to `dir/SUMS` (sha256sum format).
fn write_files(dir: &Path, n: usize) -> Result<Vec<(String, String)>> {
    let mut sums = Vec::new();
    let mut buf = vec![0u8; 4 << 20];
    for i in 0..n {
        rand::Rng::fill(&mut rand::thread_rng(), &mut buf[..]);
        let name = format!("f{i}");
        let mut f = std::fs::File::create(dir.join(&name))?;
        f.write_all(&buf)?;
        f.sync_all()?;
        sums.push((name, hex(&Sha256::digest(&buf))));
    }
    let text: String = sums.iter().map(|(n, h)| format!("{h}  {n}\n")).collect();
    let mut f = std::fs::File::create(dir.join("SUMS"))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(sums)
}

fn verify_files(dir: &Path, sums: &[(String, String)]) -> Result<()> {
    for (name, want) in sums {
        let mut data = Vec::new();
        std::fs::File::open(dir.join(name))?.read_to_end(&mut data)?;
        let got = hex(&Sha256::digest(&data));
        ensure!(&got == want, "{name}: sha256 {got}, expected {want}");
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn kernel_smoke(a: GuestArgs, files: usize) -> Result<()> {
    let s = setup(&a).await?;
    let st = Steps { t0: Instant::now() };
    let dev = s.device.clone();
    let devname = dev
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("nbd0")
        .to_owned();
    let size_path = format!("/sys/block/{devname}/size");

    st.step("attach via netlink");
    let mut o = s.opts.clone();
    o.method = AttachMethod::Netlink;
    let att = kernel::attach(Arc::clone(&s.server), &a.resource, &dev, o.clone()).await?;
    ensure!(
        matches!(
            att.method(),
            Attached::Netlink {
                reconfigured: false
            }
        ),
        "unexpected attach method {:?}",
        att.method()
    );
    let sectors = sysfs_u64(&size_path).context("read device size")?;
    ensure!(
        sectors * 512 == s.engine.size(),
        "{devname} has {} bytes, export has {}",
        sectors * 512,
        s.engine.size()
    );
    println!(
        "device {} bytes, logical block {:?}, max_sectors_kb {:?}",
        sectors * 512,
        sysfs_u64(&format!("/sys/block/{devname}/queue/logical_block_size")),
        sysfs_u64(&format!("/sys/block/{devname}/queue/max_sectors_kb"))
    );

    st.step("mkfs.ext4");
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev))?;
    st.step("fsck -p");
    println!("fsck: {:?}", kernel::fsck(&dev, &s.fs)?);
    st.step("mount");
    kernel::mount(&dev, &s.mount_point, &s.fs, s.mount_options.as_deref())?;
    ensure!(
        kernel::mounted_source(&s.mount_point)?.is_some(),
        "mount point not in mountinfo after mount"
    );

    st.step(&format!("write {files} x 4 MiB, fsync each"));
    let w0 = s.server.stats().written_bytes;
    let sums = write_files(&s.mount_point, files)?;
    let written = s.server.stats().written_bytes - w0;
    ensure!(
        written >= (files as u64) << 22,
        "server saw only {written} bytes written for {} bytes of files",
        files << 22
    );
    println!("server wrote {written} bytes for the files");

    st.step("umount refused while a process holds the mount");
    let mut holder = Command::new("sh")
        .arg("-c")
        .arg("exec sleep 600")
        .current_dir(&s.mount_point)
        .spawn()?;
    let pid = holder.id();
    let cwd = PathBuf::from(format!("/proc/{pid}/cwd"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(&cwd)
        .map(|p| p != s.mount_point)
        .unwrap_or(true)
    {
        ensure!(Instant::now() < deadline, "holder never reached its cwd");
        tokio::task::yield_now().await;
    }
    let busy = kernel::umount(&s.mount_point);
    let _ = holder.kill();
    let _ = holder.wait();
    match busy {
        Err(KernelError::Busy { holders, .. }) => {
            ensure!(
                holders.iter().any(|h| h.pid == pid),
                "Busy but holder {pid} not named: {holders:?}"
            );
            println!(
                "busy umount refused: {}",
                KernelError::Busy {
                    mount_point: s.mount_point.clone(),
                    holders
                }
            );
        }
        other => bail!("umount with a holder returned {other:?}, expected Busy"),
    }
    st.step("detach refused while mounted");
    let mut att = att;
    match att.detach().await {
        Err(KernelError::DeviceMounted { mount_point, .. }) => {
            println!("detach refused: mounted on {mount_point}")
        }
        other => bail!("detach of a mounted device returned {other:?}, expected DeviceMounted"),
    }
    ensure!(att.is_serving(), "the refused detach stopped serving");
    st.step("umount");
    kernel::umount(&s.mount_point)?;
    st.step("detach");
    att.detach().await?;
    ensure!(!att.is_serving(), "still serving after detach");
    ensure!(
        sysfs_u64(&size_path) == Some(0),
        "{devname} still has a size after disconnect"
    );

    st.step("e2fsck -fn on the backing data partition");
    let cfg = Config::load(&a.config)?;
    let data = cfg
        .resource(&a.resource)
        .and_then(|r| r.node(&a.node))
        .map(|n| n.data_path.clone())
        .context("data path")?;
    s.engine.flush().await.context("engine flush")?;
    drop_caches();
    let out = sh(Command::new("e2fsck").arg("-fn").arg(&data))?;
    let summary = out
        .lines()
        .find(|l| l.contains(" files, "))
        .unwrap_or_default();
    println!("e2fsck -fn {}: clean: {summary}", data.display());

    st.step("re-attach, mount, verify checksums");
    let mut att = kernel::attach(Arc::clone(&s.server), &a.resource, &dev, o.clone()).await?;
    println!("fsck: {:?}", kernel::fsck(&dev, &s.fs)?);
    kernel::mount(&dev, &s.mount_point, &s.fs, s.mount_options.as_deref())?;
    drop_caches();
    let r0 = s.server.stats().read_bytes;
    verify_files(&s.mount_point, &sums)?;
    let read = s.server.stats().read_bytes - r0;
    ensure!(
        read >= (files as u64) << 22,
        "server served only {read} bytes for the verification reads"
    );
    println!("verified {files} files; server read {read} bytes");
    kernel::umount(&s.mount_point)?;
    att.detach().await?;

    st.step("nbd-client fallback: attach, mount read-only, verify, detach");
    let mut fo = s.opts.clone();
    fo.method = AttachMethod::NbdClient;
    match kernel::attach(Arc::clone(&s.server), &a.resource, &dev, fo).await {
        Ok(mut att) => {
            kernel::mount(&dev, &s.mount_point, &s.fs, Some("ro"))?;
            drop_caches();
            verify_files(&s.mount_point, &sums)?;
            kernel::umount(&s.mount_point)?;
            att.detach().await?;
            println!("nbd-client fallback OK (socket {})", s.socket.display());
        }
        Err(e) => bail!("nbd-client fallback failed: {e}"),
    }
    st.step("done");
    s.server.shutdown().await;
    s.engine.flush().await?;
    println!("KERNEL-SMOKE OK");
    Ok(())
}

async fn serve(a: GuestArgs, ready: PathBuf, mount: bool) -> Result<()> {
    let s = setup(&a).await?;
    let cfg = Config::load(&a.config)?;
    let me = cfg
        .resource(&a.resource)
        .and_then(|r| r.node(&a.node))
        .context("resource node")?
        .clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut att = if mount {
        kernel::activate_device(
            Arc::clone(&s.server),
            &a.resource,
            &me,
            false,
            s.opts.clone(),
        )
        .await?
        .context("no nbd_device")?
    } else {
        kernel::attach(
            Arc::clone(&s.server),
            &a.resource,
            &s.device,
            s.opts.clone(),
        )
        .await?
    };
    let how = match att.method() {
        Attached::Netlink { reconfigured } => {
            format!("attached netlink reconfigured={reconfigured}")
        }
        Attached::NbdClient { reason } => format!("attached nbd-client ({reason})"),
    };
    println!("{how}");
    std::fs::write(&ready, format!("{how}\n"))?;
    loop {
        term.recv().await;
        println!("SIGTERM: detaching");
        let r = if mount {
            kernel::deactivate_device(&mut att, &me).await
        } else {
            att.detach().await
        };
        match r {
            Ok(()) => break,
            // Like a refused `mdctrl deactivate`: stay active and serving.
            Err(e @ KernelError::Busy { .. }) => {
                println!("deactivate refused: {e}");
                let _ = std::io::stdout().flush();
            }
            Err(e) => return Err(e.into()),
        }
    }
    s.server.shutdown().await;
    s.engine.flush().await?;
    println!("detached; stats {:?}", s.server.stats());
    Ok(())
}
