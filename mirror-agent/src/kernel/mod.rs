//! # Kernel attach: `/dev/nbdX` on the agent's own export
//!
//! The active node's applications use the resource as a kernel block device
//! (`/dev/nbd0`, usually with a file system mounted on it). This module
//! connects the kernel NBD driver to the agent's NBD server **without a
//! network hop and without a handshake**: a `socketpair(AF_UNIX,
//! SOCK_STREAM)`, one end handed to the kernel with generic netlink
//! `NBD_CMD_CONNECT`, the other served by
//! [`NbdServer::serve_transmission`](crate::nbd::NbdServer::serve_transmission)
//! (the kernel sends requests at once; size, flags and block size are given
//! out of band in the netlink message). Details and the rationale:
//! `docs/kernel-attach.md`.
//!
//! Module map:
//!
//! - this file: [`attach`] / [`KernelAttachment::detach`], the one-call
//!   [`activate_device`] / [`deactivate_device`] for activation, the
//!   re-attach supervisor, [`AttachOptions`], [`KernelError`] (the layer's
//!   error), the `nbd-client` fallback.
//! - [`netlink`]: raw generic netlink (family resolution, `CONNECT`,
//!   `DISCONNECT`, `RECONFIGURE`, `STATUS`) with libc sockets.
//! - [`mount`](mod@mount): `e2fsck -p`, `mount`, `umount` refusing with the holders
//!   when busy, the `/proc` holder scan.
//! - [`memory`]: `PR_SET_IO_FLUSHER` and `mlockall` for an agent serving a
//!   kernel device on its own host (writeback deadlock avoidance).
//!
//! Order the callers follow (activation): server running → [`attach`] →
//! [`fsck`] → [`mount()`]; (deactivation): [`umount`] → [`KernelAttachment::detach`]
//! → server shutdown.

pub mod memory;
pub mod mount;
pub mod netlink;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::nbd::proto::TFLAG_HAS_FLAGS;
use crate::nbd::{NbdError, NbdServer};

pub use memory::{io_flusher_setup, lock_memory, set_io_flusher, IoFlusherReport};
pub use mount::{fsck, holders, mount, mounted_source, umount, FsckOutcome, Holder};
use netlink::{ConnectParams, NbdNetlink, NetlinkError};

/// Errors of the kernel attach layer.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The device path is not `/dev/nbdN` (or `N` is not a number).
    #[error("{0}: not an nbd device path (expected /dev/nbdN)")]
    NotNbdDevice(PathBuf),
    /// The server has no export of that name.
    #[error("the NBD server has no export {0:?}")]
    UnknownExport(String),
    /// The device is configured (connected) and re-attach was not allowed.
    #[error("{device} is already connected (kernel NBD_CMD_STATUS); refusing to take it over")]
    DeviceInUse {
        /// The device.
        device: PathBuf,
    },
    /// The device was disconnected behind our back (no longer configured in
    /// the kernel), so the supervisor does not revive it.
    #[error("{} is no longer configured in the kernel (disconnected by someone else)", device.display())]
    NotConfigured {
        /// The device.
        device: PathBuf,
    },
    /// The device still has a mounted file system; detaching would yank it.
    #[error("{device} is mounted on {mount_point}: unmount it before detaching")]
    DeviceMounted {
        /// The device.
        device: PathBuf,
        /// Where it is mounted.
        mount_point: String,
    },
    /// A netlink operation failed (the kernel's errno is in the message).
    #[error("nbd netlink on {device}: {source}")]
    Netlink {
        /// The device.
        device: PathBuf,
        /// Cause.
        source: NetlinkError,
    },
    /// Netlink was unavailable and the `nbd-client` fallback failed too.
    #[error("nbd netlink unavailable ({netlink}); fallback `nbd-client` failed: {fallback}")]
    NoAttachMethod {
        /// Why netlink could not be used.
        netlink: String,
        /// Why the fallback failed.
        fallback: Box<KernelError>,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// OS error.
        source: io::Error,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// A program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// Program name.
        program: String,
        /// OS error.
        source: io::Error,
    },
    /// A program failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// The last lines of its output.
        output: String,
    },
    /// The mount point is busy; nothing was unmounted.
    #[error("{} is busy, not unmounted; used by: {}", mount_point.display(), fmt_holders(holders))]
    Busy {
        /// The mount point.
        mount_point: PathBuf,
        /// Who uses it (may be empty if the scan found nobody: e.g. a bind
        /// mount or a kernel user such as swap or a loop device).
        holders: Vec<Holder>,
    },
    /// Something else is already mounted on the mount point.
    #[error("{} already has {source_dev} mounted on it", mount_point.display())]
    AlreadyMounted {
        /// The mount point.
        mount_point: PathBuf,
        /// What is mounted there.
        source_dev: String,
    },
    /// The serving task for the kernel connection failed.
    #[error("serving the kernel connection of {device}: {source}")]
    Serve {
        /// The device.
        device: PathBuf,
        /// Why the connection ended.
        source: NbdError,
    },
}

fn fmt_holders(h: &[Holder]) -> String {
    if h.is_empty() {
        return "no process found in /proc (a kernel user such as a bind mount, swap or loop device?)".into();
    }
    h.iter()
        .map(Holder::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// How to attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMethod {
    /// Netlink; `nbd-client` only if the nbd netlink family cannot be resolved.
    Auto,
    /// Netlink only.
    Netlink,
    /// `nbd-client` only (tests of the fallback).
    NbdClient,
}

/// Options of [`attach`].
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Kernel request timeout (`NBD_ATTR_TIMEOUT`, whole seconds, >= 1).
    /// A server stalled for less is survived; a dead server fails I/O after
    /// it instead of hanging tasks in D state forever.
    pub timeout: Duration,
    /// How long the kernel keeps requests waiting for a new socket after the
    /// connection died (`NBD_ATTR_DEAD_CONN_TIMEOUT`): the window for an
    /// agent restart to [re-attach](AttachOptions::reattach).
    pub dead_conn_timeout: Duration,
    /// Logical block size of the device; `None` = the export's preferred
    /// size clamped to 512..=4096 and at least its minimum.
    pub block_size: Option<u32>,
    /// If the device is still configured (an earlier agent died with it
    /// attached), hand it the new socket with `NBD_CMD_RECONFIGURE` instead
    /// of refusing.
    pub reattach: bool,
    /// Run `modprobe nbd` once when the nbd netlink family is missing.
    pub modprobe: bool,
    /// Method; see [`AttachMethod`].
    pub method: AttachMethod,
    /// The export's unix socket, for the `nbd-client` fallback (which does
    /// its own handshake); `None` disables the fallback.
    pub fallback_socket: Option<PathBuf>,
    /// The `nbd-client` program.
    pub nbd_client: PathBuf,
}

impl Default for AttachOptions {
    /// 30 s timeout, 60 s dead-connection window, reattach and modprobe on,
    /// `Auto`, no fallback socket.
    fn default() -> Self {
        AttachOptions {
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(60),
            block_size: None,
            reattach: true,
            modprobe: true,
            method: AttachMethod::Auto,
            fallback_socket: None,
            nbd_client: PathBuf::from("nbd-client"),
        }
    }
}

/// How a device ended up attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attached {
    /// `NBD_CMD_CONNECT` on a socketpair served in this process.
    Netlink {
        /// True when an already configured device got the socket with
        /// `NBD_CMD_RECONFIGURE` (agent restart).
        reconfigured: bool,
    },
    /// The `nbd-client` program connected to the export's unix socket.
    NbdClient {
        /// Why netlink was not used.
        reason: String,
    },
}

/// A kernel device attached to an export. Detach with
/// [`detach`](Self::detach); dropping it undetached leaves the device
/// configured and (netlink) still served by the spawned task until the
/// process exits — what a crash does; a restarted agent re-attaches.
#[derive(Debug)]
pub struct KernelAttachment {
    device: PathBuf,
    index: u32,
    how: Attached,
    serve: Option<JoinHandle<Result<(), NbdError>>>,
    /// Set before a deliberate disconnect, so the supervisor does not re-attach.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    nbd_client: PathBuf,
    detached: bool,
}

impl KernelAttachment {
    /// The device (`/dev/nbd0`).
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The device index (`0` for `/dev/nbd0`).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How it was attached.
    pub fn method(&self) -> &Attached {
        &self.how
    }

    /// True while the kernel connection is being served (netlink method,
    /// until [`detach`](Self::detach));
    /// false once the kernel closed it (disconnect, timeout) — the device
    /// then fails or waits for a re-attach. Always true for `nbd-client`.
    pub fn is_serving(&self) -> bool {
        !self.detached && self.serve.as_ref().is_none_or(|t| !t.is_finished())
    }

    /// Flushes the device, disconnects it (`NBD_CMD_DISCONNECT`: the kernel
    /// sends `NBD_CMD_DISC` and closes the socket; or `nbd-client -d`) and
    /// waits for the serving task to end. Refuses with
    /// [`KernelError::DeviceMounted`] while a file system on the device is
    /// mounted (unmount first: [`umount`]); the attachment stays usable after
    /// any error, so the caller can retry. Calling it again after success is
    /// a no-op.
    pub async fn detach(&mut self) -> Result<(), KernelError> {
        if self.detached {
            return Ok(());
        }
        if let Some(mp) = device_mount_point(&self.device)? {
            return Err(KernelError::DeviceMounted {
                device: self.device.clone(),
                mount_point: mp,
            });
        }
        let device = self.device.clone();
        let index = self.index;
        let how = self.how.clone();
        let nbd_client = self.nbd_client.clone();
        let stopping = Arc::clone(&self.stopping);
        tokio::task::spawn_blocking(move || -> Result<(), KernelError> {
            match how {
                Attached::Netlink { .. } => {
                    let nl_err = |source| KernelError::Netlink {
                        device: device.clone(),
                        source,
                    };
                    let mut nl = NbdNetlink::open().map_err(nl_err)?;
                    if nl.status(index).map_err(nl_err)? != Some(true) {
                        // Disconnected behind our back: no flush (it would only fail with EIO).
                        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                        tracing::warn!(device = %device.display(), "already disconnected");
                        return Ok(());
                    }
                    flush_device(&device)?;
                    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                    nl.disconnect(index).map_err(nl_err)
                }
                Attached::NbdClient { .. } => {
                    flush_device(&device)?;
                    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                    let mut c = Command::new(&nbd_client);
                    c.arg("-d").arg(&device);
                    run_checked(c, &nbd_client)
                }
            }
        })
        .await
        .map_err(|e| KernelError::Os {
            what: "detach task",
            source: io::Error::other(e.to_string()),
        })?
        .inspect_err(|_| {
            self.stopping
                .store(false, std::sync::atomic::Ordering::SeqCst)
        })?;
        self.detached = true;
        if let Some(t) = self.serve.take() {
            // The kernel sent NBD_CMD_DISC and shut its end down: the task ends promptly.
            match tokio::time::timeout(Duration::from_secs(30), t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::info!(device = %self.device.display(), "kernel connection ended: {e}")
                }
                Ok(Err(e)) => {
                    tracing::warn!(device = %self.device.display(), "kernel connection task failed: {e}")
                }
                Err(_) => {
                    tracing::warn!(device = %self.device.display(), "kernel connection still open 30 s after disconnect")
                }
            }
        }
        tracing::info!(device = %self.device.display(), "kernel device detached");
        Ok(())
    }
}

/// `/dev/nbdN` → `N`.
pub fn device_index(device: &Path) -> Result<u32, KernelError> {
    device
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("nbd"))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| KernelError::NotNbdDevice(device.to_owned()))
}

/// The kernel block size for an export: `requested`, else the export's
/// preferred size, clamped to 512..=4096 (the kernel accepts a power of two
/// up to the page size) and never below the export's minimum.
fn block_size_for(requested: Option<u32>, minimum: u32, preferred: u32) -> u32 {
    requested.unwrap_or(preferred).clamp(512, 4096).max(minimum)
}

/// Activation in one call: if `me.nbd_device` is set, [`attach`] it to
/// `export` (with `opts.fallback_socket` defaulted to `me.nbd_socket`), then,
/// unless `nomount` or no `me.mount_point`, [`fsck`] and [`mount()`] it with
/// `me.fs` / `me.mount_options`. A re-attach (agent restart) whose file system
/// is still mounted from this device keeps that mount (no fsck of a mounted
/// file system). On a fsck/mount failure the device is detached again before
/// the error is returned. `Ok(None)`: no `nbd_device` configured.
pub async fn activate_device(
    server: Arc<NbdServer>,
    export: &str,
    me: &crate::config::ResourceNode,
    nomount: bool,
    mut opts: AttachOptions,
) -> Result<Option<KernelAttachment>, KernelError> {
    let Some(dev) = me.nbd_device.as_deref() else {
        return Ok(None);
    };
    if opts.fallback_socket.is_none() {
        opts.fallback_socket = Some(me.nbd_socket.clone());
    }
    let mut att = attach(server, export, dev, opts).await?;
    let Some(mnt) = me.mount_point.as_deref().filter(|_| !nomount) else {
        return Ok(Some(att));
    };
    let fs = me.fs.clone();
    let options = me.mount_options.clone();
    let (dev2, mnt2) = (dev.to_owned(), mnt.to_owned());
    let r = tokio::task::spawn_blocking(move || -> Result<(), KernelError> {
        if mounted_source(&mnt2)?.as_deref() == Some(&*dev2.to_string_lossy()) {
            tracing::info!(device = %dev2.display(), mount_point = %mnt2.display(), "file system still mounted from this device: kept");
            return Ok(());
        }
        let checked = fsck(&dev2, &fs)?;
        mount(&dev2, &mnt2, &fs, options.as_deref())?;
        tracing::info!(device = %dev2.display(), mount_point = %mnt2.display(), fsck = ?checked, "mounted");
        Ok(())
    })
    .await
    .map_err(|e| KernelError::Os { what: "mount task", source: io::Error::other(e.to_string()) })?;
    match r {
        Ok(()) => Ok(Some(att)),
        Err(e) => {
            if let Err(d) = att.detach().await {
                tracing::error!(device = %dev.display(), "detach after failed mount also failed: {d}");
            }
            Err(e)
        }
    }
}

/// Deactivation in one call: [`umount`] `me.mount_point` (if set) — a busy
/// mount refuses with [`KernelError::Busy`] naming the holders, leaving
/// everything attached and mounted — then [`KernelAttachment::detach`].
pub async fn deactivate_device(
    att: &mut KernelAttachment,
    me: &crate::config::ResourceNode,
) -> Result<(), KernelError> {
    if let Some(mnt) = me.mount_point.clone() {
        tokio::task::spawn_blocking(move || umount(&mnt))
            .await
            .map_err(|e| KernelError::Os {
                what: "umount task",
                source: io::Error::other(e.to_string()),
            })??;
    }
    att.detach().await
}

/// Attaches `device` (`/dev/nbdN`) to export `export` of `server`.
///
/// Netlink path: a socketpair; our end is served by
/// [`NbdServer::serve_transmission`] on a spawned task; the other end goes to
/// the kernel with `NBD_CMD_CONNECT` (index, size, block size, the export's
/// transmission flags, timeouts) — or with `NBD_CMD_RECONFIGURE` when the
/// device is still configured from an earlier agent and
/// [`AttachOptions::reattach`] is set. Then the device's `max_sectors_kb` is
/// capped to the export's maximum request size (netlink has no attribute for
/// it). If the nbd netlink family cannot be resolved (after `modprobe nbd`),
/// falls back to `nbd-client -unix SOCKET DEVICE -name EXPORT ...` when a
/// fallback socket is configured, logging why.
///
/// Must run inside a tokio runtime (it spawns the serving task).
pub async fn attach(
    server: Arc<NbdServer>,
    export: &str,
    device: &Path,
    opts: AttachOptions,
) -> Result<KernelAttachment, KernelError> {
    let index = device_index(device)?;
    let params = server
        .export_params(export)
        .ok_or_else(|| KernelError::UnknownExport(export.to_owned()))?;
    let block_size = block_size_for(
        opts.block_size,
        params.block_sizes.minimum,
        params.block_sizes.preferred,
    );
    let cp = ConnectParams {
        index,
        size: params.size,
        block_size: u64::from(block_size),
        server_flags: u64::from(params.transmission_flags | TFLAG_HAS_FLAGS),
        timeout_secs: opts.timeout.as_secs().max(1),
        dead_conn_timeout_secs: opts.dead_conn_timeout.as_secs(),
    };
    let netlink_reason = if opts.method == AttachMethod::NbdClient {
        "netlink not requested (AttachMethod::NbdClient)".to_owned()
    } else {
        match open_netlink(opts.modprobe).await {
            Ok(_) => {
                return attach_netlink(
                    server,
                    export,
                    device,
                    cp,
                    &opts,
                    params.block_sizes.maximum,
                )
                .await
            }
            Err(NetlinkError::NoFamily(f)) if opts.method == AttachMethod::Auto => {
                format!("generic netlink family {f:?} not found even after `modprobe nbd`")
            }
            Err(source) => {
                return Err(KernelError::Netlink {
                    device: device.to_owned(),
                    source,
                })
            }
        }
    };
    let Some(sock) = opts.fallback_socket.clone() else {
        return Err(KernelError::NoAttachMethod {
            netlink: netlink_reason,
            fallback: Box::new(KernelError::Os {
                what: "nbd-client fallback",
                source: io::Error::other("no export socket configured"),
            }),
        });
    };
    tracing::warn!(device = %device.display(), "nbd netlink unavailable ({netlink_reason}); falling back to nbd-client on {}", sock.display());
    let dev = device.to_owned();
    let exp = export.to_owned();
    let prog = opts.nbd_client.clone();
    let timeout = cp.timeout_secs;
    let r = tokio::task::spawn_blocking(move || {
        nbd_client_attach(&prog, &sock, &dev, &exp, timeout, block_size)
    })
    .await
    .map_err(|e| KernelError::Os {
        what: "nbd-client task",
        source: io::Error::other(e.to_string()),
    })?;
    if let Err(e) = r {
        return Err(KernelError::NoAttachMethod {
            netlink: netlink_reason,
            fallback: Box::new(e),
        });
    }
    cap_max_sectors(device, params.block_sizes.maximum);
    tracing::info!(device = %device.display(), export, "kernel device attached with nbd-client");
    Ok(KernelAttachment {
        device: device.to_owned(),
        index,
        how: Attached::NbdClient {
            reason: netlink_reason,
        },
        serve: None,
        stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        nbd_client: opts.nbd_client,
        detached: false,
    })
}

async fn open_netlink(modprobe: bool) -> Result<NbdNetlink, NetlinkError> {
    tokio::task::spawn_blocking(move || match NbdNetlink::open() {
        Err(NetlinkError::NoFamily(_)) if modprobe => {
            match Command::new("modprobe").arg("nbd").output() {
                Ok(o) if o.status.success() => tracing::info!("loaded the nbd module"),
                Ok(o) => {
                    tracing::info!("modprobe nbd failed: {}", mount::tail(&o.stdout, &o.stderr))
                }
                Err(e) => tracing::info!("cannot run modprobe: {e}"),
            }
            NbdNetlink::open()
        }
        r => r,
    })
    .await
    .map_err(|e| NetlinkError::Io {
        what: "netlink task",
        source: io::Error::other(e.to_string()),
    })?
}

/// Our end of a fresh socketpair as a tokio stream, and the kernel's end.
fn kernel_pair() -> Result<(tokio::net::UnixStream, OwnedFd), KernelError> {
    let (ours, theirs) = socketpair()?;
    let std_stream = std::os::unix::net::UnixStream::from(ours);
    std_stream
        .set_nonblocking(true)
        .map_err(|source| KernelError::Os {
            what: "set_nonblocking",
            source,
        })?;
    let stream =
        tokio::net::UnixStream::from_std(std_stream).map_err(|source| KernelError::Os {
            what: "register socket",
            source,
        })?;
    Ok((stream, theirs))
}

/// Hands `theirs` to the kernel (`CONNECT`, or `RECONFIGURE` when the device
/// is still configured); returns whether it was a reconfigure. With
/// `only_reconfigure`, a device that is no longer configured is an error
/// ([`KernelError::NotConfigured`]) instead of a new `CONNECT`. Blocking.
fn hand_over(
    dev: &Path,
    cp: &ConnectParams,
    theirs: OwnedFd,
    reattach: bool,
    only_reconfigure: bool,
) -> Result<bool, KernelError> {
    let nl_err = |source| KernelError::Netlink {
        device: dev.to_owned(),
        source,
    };
    let mut nl = NbdNetlink::open().map_err(nl_err)?;
    let connected = nl.status(cp.index).map_err(nl_err)?.unwrap_or(false);
    if !connected && only_reconfigure {
        return Err(KernelError::NotConfigured {
            device: dev.to_owned(),
        });
    }
    let fd = theirs.as_raw_fd();
    let reconfigured = if connected {
        if !reattach {
            return Err(KernelError::DeviceInUse {
                device: dev.to_owned(),
            });
        }
        nl.reconfigure(cp, fd).map_err(nl_err)?;
        true
    } else {
        nl.connect(cp, fd).map_err(nl_err)?;
        false
    };
    // The kernel holds its own reference now; our copy of its end must go,
    // or a kernel-side shutdown would never show as EOF on ours.
    drop(theirs);
    Ok(reconfigured)
}

async fn hand_over_async(
    dev: &Path,
    cp: ConnectParams,
    theirs: OwnedFd,
    reattach: bool,
    only_reconfigure: bool,
) -> Result<bool, KernelError> {
    let dev = dev.to_owned();
    tokio::task::spawn_blocking(move || hand_over(&dev, &cp, theirs, reattach, only_reconfigure))
        .await
        .map_err(|e| KernelError::Os {
            what: "netlink task",
            source: io::Error::other(e.to_string()),
        })?
}

/// Serves the kernel connection; when the kernel drops it while we are still
/// meant to serve (its request timeout expired during a stall: it shuts the
/// socket down and holds the requests for `dead_conn_timeout`), hands it a
/// new socketpair with `NBD_CMD_RECONFIGURE` so the held requests are resent
/// instead of failing. Ends on detach or server shutdown.
async fn supervise(
    server: Arc<NbdServer>,
    name: String,
    dev: PathBuf,
    cp: ConnectParams,
    mut stream: tokio::net::UnixStream,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    dead_window: Duration,
) -> Result<(), NbdError> {
    use std::sync::atomic::Ordering;
    loop {
        let r = server.serve_transmission(stream, &name).await;
        if stopping.load(Ordering::SeqCst) || server.is_shutting_down() {
            tracing::info!(device = %dev.display(), "kernel connection closed");
            return r;
        }
        match &r {
            Ok(()) => {
                tracing::warn!(device = %dev.display(), "kernel closed the connection unasked (request timeout?); re-attaching")
            }
            Err(e) => {
                tracing::warn!(device = %dev.display(), "kernel connection ended: {e}; re-attaching")
            }
        }
        let give_up = std::time::Instant::now() + dead_window;
        stream = loop {
            let attempt = async {
                let (ours, theirs) = kernel_pair()?;
                hand_over_async(&dev, cp, theirs, true, true)
                    .await
                    .map(|reconf| (ours, reconf))
            };
            match attempt.await {
                Ok((ours, reconf)) => {
                    tracing::info!(device = %dev.display(), reconfigured = reconf, "kernel device re-attached");
                    break ours;
                }
                // Disconnected by someone else (`nbd-client -d`, another tool): not ours to revive.
                Err(e @ KernelError::NotConfigured { .. }) => {
                    tracing::error!(device = %dev.display(), "{e}: not re-attaching");
                    return r;
                }
                Err(e)
                    if std::time::Instant::now() < give_up && !stopping.load(Ordering::SeqCst) =>
                {
                    tracing::warn!(device = %dev.display(), "re-attach failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::error!(device = %dev.display(), "re-attach failed: {e}; giving up: I/O on the device fails");
                    return r;
                }
            }
        };
    }
}

async fn attach_netlink(
    server: Arc<NbdServer>,
    export: &str,
    device: &Path,
    cp: ConnectParams,
    opts: &AttachOptions,
    max_request: u32,
) -> Result<KernelAttachment, KernelError> {
    let (stream, theirs) = kernel_pair()?;
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Served before the kernel gets its end: it may send requests (partition scan) at once.
    let serve = tokio::spawn(supervise(
        Arc::clone(&server),
        export.to_owned(),
        device.to_owned(),
        cp,
        stream,
        Arc::clone(&stopping),
        opts.dead_conn_timeout,
    ));
    let reconfigured = match hand_over_async(device, cp, theirs, opts.reattach, false).await {
        Ok(r) => r,
        Err(e) => {
            stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            serve.abort();
            return Err(e);
        }
    };
    cap_max_sectors(device, max_request);
    tracing::info!(
        device = %device.display(),
        export,
        size = cp.size,
        block_size = cp.block_size,
        flags = format_args!("{:#x}", cp.server_flags),
        timeout_s = cp.timeout_secs,
        reconfigured,
        "kernel device attached via netlink"
    );
    Ok(KernelAttachment {
        device: device.to_owned(),
        index: cp.index,
        how: Attached::Netlink { reconfigured },
        serve: Some(serve),
        stopping,
        nbd_client: opts.nbd_client.clone(),
        detached: false,
    })
}

fn socketpair() -> Result<(OwnedFd, OwnedFd), KernelError> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints for socketpair to fill.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(KernelError::Os {
            what: "socketpair(AF_UNIX, SOCK_STREAM)",
            source: io::Error::last_os_error(),
        });
    }
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let a = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let b = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((a, b))
}

/// Netlink cannot tell the kernel the server's maximum request size; the
/// queue's `max_sectors_kb` can (the default is 32 MiB requests... larger
/// than a small `nbd_max_request`). Best effort: logged on failure.
fn cap_max_sectors(device: &Path, max_request: u32) {
    let Some(name) = device.file_name() else {
        return;
    };
    let q = Path::new("/sys/block").join(name).join("queue");
    let read = |f: &str| {
        std::fs::read_to_string(q.join(f))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let want = u64::from(max_request) / 1024;
    match (read("max_sectors_kb"), read("max_hw_sectors_kb")) {
        (Some(cur), Some(hw)) if cur > want => {
            let v = want.min(hw).max(4);
            if let Err(e) = std::fs::write(q.join("max_sectors_kb"), v.to_string()) {
                tracing::warn!(device = %device.display(), "cannot cap max_sectors_kb to {v}: {e}");
            }
        }
        _ => {}
    }
}

/// Writes back the device's dirty page cache and sends a FLUSH (`fsync` on
/// the block device), so a disconnect loses nothing written raw (mkfs, dd).
fn flush_device(device: &Path) -> Result<(), KernelError> {
    match std::fs::metadata(device) {
        Ok(m) if m.file_type().is_block_device() => {}
        _ => return Ok(()),
    }
    let f = std::fs::File::open(device).map_err(|source| KernelError::Io {
        what: "open for flush",
        path: device.to_owned(),
        source,
    })?;
    f.sync_all().map_err(|source| KernelError::Io {
        what: "fsync",
        path: device.to_owned(),
        source,
    })
}

/// Where a file system on `device` is mounted, if anywhere (mountinfo's
/// source field, or its major:minor).
fn device_mount_point(device: &Path) -> Result<Option<String>, KernelError> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device)
        .ok()
        .filter(|m| m.file_type().is_block_device())
        .map(|m| m.rdev());
    let majmin = rdev.map(|r| format!("{}:{}", libc::major(r), libc::minor(r)));
    let p = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(p).map_err(|source| KernelError::Io {
        what: "read",
        path: p.to_owned(),
        source,
    })?;
    let dev_s = device.to_string_lossy();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let source = line.split(" - ").nth(1).and_then(|r| r.split(' ').nth(1));
        if f.len() > 4 && (majmin.as_deref() == Some(f[2]) || source == Some(&*dev_s)) {
            return Ok(Some(f[4].to_owned()));
        }
    }
    Ok(None)
}

fn nbd_client_attach(
    prog: &Path,
    sock: &Path,
    device: &Path,
    export: &str,
    timeout: u64,
    block_size: u32,
) -> Result<(), KernelError> {
    let base = |extra: Option<&str>| {
        let mut c = Command::new(prog);
        c.arg("-unix")
            .arg(sock)
            .arg(device)
            .arg("-name")
            .arg(export);
        c.arg("-timeout")
            .arg(timeout.to_string())
            .arg("-block-size")
            .arg(block_size.to_string());
        if let Some(x) = extra {
            c.arg(x);
        }
        c
    };
    match run_checked(base(None), prog) {
        Ok(()) => Ok(()),
        // nbd-client itself prefers netlink; without the family it can still use the ioctls.
        Err(first) => {
            run_checked(base(Some("-nonetlink")), prog).map_err(|second| KernelError::Command {
                command: format!("{} (netlink, then -nonetlink)", prog.display()),
                status: "both failed".into(),
                output: format!("{first} ; {second}"),
            })
        }
    }
}

fn run_checked(c: Command, prog: &Path) -> Result<(), KernelError> {
    mount::run(c, &prog.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_index_parsing() {
        assert_eq!(device_index(Path::new("/dev/nbd0")).unwrap(), 0);
        assert_eq!(device_index(Path::new("/dev/nbd15")).unwrap(), 15);
        for bad in ["/dev/nbd", "/dev/sda", "/dev/nbd0p1", "/dev/nbdx"] {
            assert!(
                matches!(
                    device_index(Path::new(bad)),
                    Err(KernelError::NotNbdDevice(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn block_size_choice() {
        assert_eq!(block_size_for(None, 512, 4096), 4096);
        assert_eq!(block_size_for(None, 512, 65536), 4096);
        assert_eq!(block_size_for(Some(512), 4096, 4096), 4096);
        assert_eq!(block_size_for(Some(1024), 512, 4096), 1024);
    }

    #[test]
    fn busy_error_names_the_holders() {
        let e = KernelError::Busy {
            mount_point: PathBuf::from("/mnt/md1"),
            holders: vec![Holder {
                pid: 42,
                comm: "bash".into(),
                how: "cwd".into(),
            }],
        };
        assert_eq!(
            e.to_string(),
            "/mnt/md1 is busy, not unmounted; used by: pid 42 (bash): cwd"
        );
    }

    #[tokio::test]
    async fn attach_without_the_nbd_family_and_without_fallback_says_why() {
        // On hosts without the nbd module (like the development machine) this
        // exercises family resolution; where nbd exists it must refuse /dev/nbd
        // paths that are not devices before touching the kernel.
        let engine: Arc<dyn crate::engine::BlockEngine> =
            crate::nbd::testing::MemEngine::new(1 << 20);
        let server = NbdServer::new(
            vec![crate::nbd::Export::new("md1", engine)],
            crate::nbd::Limits::default(),
        )
        .unwrap();
        let e = attach(
            Arc::clone(&server),
            "nope",
            Path::new("/dev/nbd0"),
            AttachOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, KernelError::UnknownExport(_)), "{e}");
        if netlink::NbdNetlink::open().is_err() {
            let opts = AttachOptions {
                modprobe: false,
                ..AttachOptions::default()
            };
            let e = attach(server, "md1", Path::new("/dev/nbd0"), opts)
                .await
                .unwrap_err();
            let s = e.to_string();
            assert!(
                s.contains("\"nbd\" not found") && s.contains("no export socket"),
                "{s}"
            );
        }
    }
}
