//! One mirrored resource (`md1`) on this node: its data partition (an
//! engine), its cluster partition (metadata + dirty bitmap), and its NBD
//! export while active.
//!
//! A standalone resource (a config with one server) serves its local data
//! directly. A mirrored one has a [`Pair`]: activation needs the peer's grant
//! over the data link, and the export serves the replicated volume.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::admin::AdminError;
use crate::changes::Changes;
use crate::config::{self, Config};
use crate::engine::{self, BlockEngine};
use crate::meta::Meta;
use crate::nbd::{self, BlockSizes, Export, NbdServer};
use crate::pair::{LocalDevices, Pair, PairError};
use crate::status::{NbdCounters, ResourceStatus, Role, Watched};

/// Errors attaching a resource at agent start.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The data partition could not be opened.
    #[error("resource {resource}: cannot open data partition {path}: {source} (run `mdctrl init {resource}` first?)")]
    Data {
        /// Resource name.
        resource: String,
        /// Data path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The cluster partition could not be attached.
    #[error("resource {resource}: {source}")]
    Meta {
        /// Resource name.
        resource: String,
        /// Metadata error.
        source: crate::meta::MetaAttachError,
    },
    /// The peer link could not be started.
    #[error(transparent)]
    Pair(#[from] PairError),
    /// The resource has no section for this node.
    #[error("resource {resource} has no [resource.server.{node}] section in {config}")]
    NotOnNode {
        /// Resource name.
        resource: String,
        /// Node name.
        node: String,
        /// Config file.
        config: String,
    },
}

/// Serving state of a resource.
enum Serving {
    Inactive,
    Active {
        server: Arc<NbdServer>,
        accept_tasks: Vec<JoinHandle<()>>,
        since: Instant,
        /// What the export serves (the replicated volume when mirrored).
        volume: Arc<dyn BlockEngine>,
        /// The local `/dev/nbdX` attached to the export (`nbd_device`).
        device: Option<crate::kernel::KernelAttachment>,
    },
}

/// A resource attached on this node.
pub struct Resource {
    /// Resource name.
    pub name: String,
    node: String,
    cfg: config::Resource,
    me: config::ResourceNode,
    peer: Option<String>,
    engine: Arc<dyn BlockEngine>,
    /// The data disk's and the cluster partition's requests, for stall
    /// detection (shared with the pair, which tells the peer).
    stalls: Arc<engine::Stalls>,
    meta: Arc<Meta>,
    pair: Option<Arc<Pair>>,
    /// Status changes (`mdctrl status --watch`, `recover --wait`), shared with the pair.
    changes: Arc<Changes>,
    serving: Mutex<Serving>,
    /// Counters of NBD servers that were active earlier (status reports totals).
    past: std::sync::Mutex<NbdCounters>,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Resource {
    /// Attach the resource's data and cluster partitions on `node`.
    /// For a mirrored resource this also starts its peer link (until `shutdown`).
    pub async fn attach(
        config: &Config,
        cfg: &config::Resource,
        node: &str,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Resource, AttachError> {
        let me = cfg
            .node(node)
            .cloned()
            .ok_or_else(|| AttachError::NotOnNode {
                resource: cfg.name.clone(),
                node: node.to_string(),
                config: config.path.display().to_string(),
            })?;
        let opts = engine_options(cfg);
        let engine = engine::open(&me.data_path, &opts).map_err(|source| AttachError::Data {
            resource: cfg.name.clone(),
            path: me.data_path.display().to_string(),
            source,
        })?;
        // Every user of the data disk (NBD, replication, resync) goes through
        // this engine, so its stall shows whatever the role.
        let io = Arc::new(engine::IoWatch::default());
        let engine: Arc<dyn BlockEngine> = Arc::new(engine::Timed::new(engine, io.clone()));
        let meta =
            Meta::attach(cfg, &me, node, engine.size()).map_err(|source| AttachError::Meta {
                resource: cfg.name.clone(),
                source,
            })?;
        let meta = Arc::new(meta);
        let stalls = Arc::new(engine::Stalls {
            data: io,
            metadata: meta.io_watch().clone(),
            threshold: config.timeouts.io_stall,
        });
        let changes = Arc::new(Changes::new());
        let pair = if cfg.is_mirrored() {
            Some(Pair::start(
                config,
                cfg,
                node,
                LocalDevices {
                    engine: engine.clone(),
                    meta: meta.clone(),
                    stalls: stalls.clone(),
                },
                changes.clone(),
                shutdown.clone(),
            )?)
        } else {
            None
        };
        spawn_stall_watch(
            cfg.name.clone(),
            stalls.clone(),
            pair.as_ref(),
            changes.clone(),
            shutdown.clone(),
        );
        spawn_metadata_check(
            cfg.name.clone(),
            &meta,
            pair.as_ref(),
            changes.clone(),
            config.timeouts.metadata_check_interval,
            shutdown,
        );
        tracing::info!(
            resource = %cfg.name,
            engine = engine.name(),
            size = engine.size(),
            data = %me.data_path.display(),
            cluster_partition = %me.cluster_partition.display(),
            "resource attached"
        );
        Ok(Resource {
            name: cfg.name.clone(),
            node: node.to_string(),
            peer: cfg.peer_of(node).map(str::to_string),
            cfg: cfg.clone(),
            me,
            engine,
            stalls,
            meta,
            pair,
            changes,
            serving: Mutex::new(Serving::Inactive),
            past: std::sync::Mutex::new(NbdCounters::default()),
        })
    }

    /// Start serving the NBD export on this node.
    pub async fn activate(&self, nomount: bool) -> Result<ResourceStatus, AdminError> {
        let mut serving = self.serving.lock().await;
        if let Serving::Active { .. } = *serving {
            return Err(AdminError::refused(
                format!("{} is already active on {}", self.name, self.node),
                format!(
                    "nothing to do; `mdctrl status {}` shows its state",
                    self.name
                ),
            ));
        }
        if let Err(e) = self.meta.check_activatable() {
            return Err(AdminError::refused(
                e,
                format!("`mdctrl dump-md {}` shows the metadata", self.name),
            ));
        }

        let volume: Arc<dyn BlockEngine> = match &self.pair {
            Some(pair) => pair.activate().await?,
            None => Arc::clone(&self.engine),
        };
        let mut export = Export::new(self.name.clone(), Arc::clone(&volume));
        export.description = format!("nbd-mirror resource {} on {}", self.name, self.node);
        export.block_sizes = BlockSizes {
            minimum: self.cfg.nbd_block_size_min as u32,
            preferred: 4096.max(self.cfg.nbd_block_size_min as u32),
            maximum: self.cfg.nbd_max_request as u32,
        };
        let limits = nbd::Limits {
            idle_poll: self.cfg.nbd_idle_poll,
            ..nbd::Limits::default()
        };
        let server = NbdServer::new(vec![export], limits)
            .map_err(|e| AdminError::internal(format!("cannot create NBD server: {e}")))?;
        let unix = nbd::bind_unix(&self.me.nbd_socket, None).map_err(|e| {
            AdminError::internal(format!(
                "cannot listen on NBD socket {}: {e}",
                self.me.nbd_socket.display()
            ))
        })?;
        let tcp = match self.me.nbd_tcp {
            Some(addr) => Some(nbd::bind_tcp(addr).await.map_err(|e| {
                let _ = std::fs::remove_file(&self.me.nbd_socket);
                AdminError::internal(format!("cannot listen on NBD TCP {addr}: {e}"))
            })?),
            None => None,
        };
        self.meta.record_activation(true).await.map_err(|e| {
            AdminError::internal(format!(
                "cannot record activation in the cluster partition: {e}"
            ))
        })?;

        let mut accept_tasks = Vec::new();
        let s = Arc::clone(&server);
        accept_tasks.push(tokio::spawn(async move {
            if let Err(e) = s.serve_unix(unix).await {
                tracing::error!("NBD unix accept loop ended: {e}");
            }
        }));
        if let Some(tcp) = tcp {
            let s = Arc::clone(&server);
            accept_tasks.push(tokio::spawn(async move {
                if let Err(e) = s.serve_tcp(tcp).await {
                    tracing::error!("NBD TCP accept loop ended: {e}");
                }
            }));
        }
        // The kernel device (and mount) last: it needs the export running.
        let device = match crate::kernel::activate_device(
            Arc::clone(&server),
            &self.name,
            &self.me,
            nomount,
            Default::default(),
        )
        .await
        {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&self.me.nbd_socket);
                server.shutdown().await;
                for t in accept_tasks {
                    let _ = t.await;
                }
                let _ = volume.flush().await;
                if let Some(pair) = &self.pair {
                    let _ = pair.deactivate().await;
                }
                let _ = self.meta.record_activation(false).await;
                return Err(AdminError::internal(format!(
                    "cannot attach {} to {}: {e}",
                    self.me
                        .nbd_device
                        .as_ref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default(),
                    self.name
                )));
            }
        };
        tracing::info!(resource = %self.name, socket = %self.me.nbd_socket.display(), tcp = ?self.me.nbd_tcp, device = ?self.me.nbd_device, "activated: serving NBD");
        *serving = Serving::Active {
            server,
            accept_tasks,
            since: Instant::now(),
            volume,
            device,
        };
        drop(serving);
        Ok(self.status().await)
    }

    /// Stop accepting, let in-flight requests finish, flush, record state.
    pub async fn deactivate(&self) -> Result<ResourceStatus, AdminError> {
        let mut serving = self.serving.lock().await;
        if let Serving::Active {
            device: Some(att), ..
        } = &mut *serving
        {
            // Unmount and detach first; a busy mount refuses and we stay active.
            if let Err(e) = crate::kernel::deactivate_device(att, &self.me).await {
                return Err(AdminError::refused(
                    format!("cannot deactivate {}: {e}", self.name),
                    "stop the processes using the mount point, then retry",
                ));
            }
        }
        let Serving::Active {
            server,
            accept_tasks,
            since,
            volume,
            device: _,
        } = std::mem::replace(&mut *serving, Serving::Inactive)
        else {
            return Err(AdminError::refused(
                format!("{} is not active on {}", self.name, self.node),
                "nothing to do",
            ));
        };
        // Remove the socket first so no new client finds it while we drain.
        let _ = std::fs::remove_file(&self.me.nbd_socket);
        server.shutdown().await;
        for t in accept_tasks {
            let _ = t.await;
        }
        let counters = counters_of(&server);
        {
            let mut past = self.past.lock().unwrap_or_else(|p| p.into_inner());
            add_counters(&mut past, &counters);
        }
        // Flush through the served volume: in sync mode that is a barrier on the peer too.
        let flushed = volume.flush().await;
        drop(volume);
        let released = match &self.pair {
            Some(pair) => pair.deactivate().await,
            None => Ok(()),
        };
        let recorded = self.meta.record_activation(false).await;
        tracing::info!(resource = %self.name, active_for = ?since.elapsed(), "deactivated");
        flushed.map_err(|e| {
            AdminError::internal(format!(
                "flush of {} failed after deactivation: {e}",
                self.me.data_path.display()
            ))
        })?;
        released?;
        recorded.map_err(|e| {
            AdminError::internal(format!(
                "cannot record deactivation in the cluster partition: {e}"
            ))
        })?;
        drop(serving);
        Ok(self.status().await)
    }

    fn pair_or_refuse(&self, verb: &str) -> Result<&Arc<Pair>, AdminError> {
        self.pair.as_ref().ok_or_else(|| {
            AdminError::refused(
                format!(
                    "{} is not mirrored (one server in the configuration): nothing to {verb}",
                    self.name
                ),
                "add the second server to the resource in the configuration",
            )
        })
    }

    /// Something the status shows changed (an admin action ran).
    pub fn changed(&self) {
        self.changes.bump();
    }

    /// `watch`: the status with its version; with `seen`, first wait until
    /// the version moved past it (a change) or `timeout` passed.
    pub async fn watch(&self, seen: Option<u64>, timeout: std::time::Duration) -> Watched {
        let version = match seen {
            Some(v) => {
                let deadline = tokio::time::Instant::now() + timeout;
                self.changes.wait_past(v, deadline).await
            }
            None => self.changes.version(),
        };
        Watched {
            version,
            status: self.status().await,
        }
    }

    /// `mdctrl recover`: start the decided resync; the status shows its progress.
    pub async fn recover(&self) -> Result<ResourceStatus, AdminError> {
        let msg = self.pair_or_refuse("recover")?.recover().await?;
        tracing::info!(resource = %self.name, "{msg}");
        Ok(self.status().await)
    }

    /// `mdctrl force WINNER`.
    pub async fn force(&self, winner: &str) -> Result<ResourceStatus, AdminError> {
        let msg = self.pair_or_refuse("force")?.force(winner).await?;
        tracing::warn!(resource = %self.name, "{msg}");
        Ok(self.status().await)
    }

    /// `mdctrl break`.
    pub async fn break_mirror(&self) -> Result<ResourceStatus, AdminError> {
        let msg = self
            .pair_or_refuse("break")?
            .break_mirror("mdctrl break")
            .await?;
        tracing::warn!(resource = %self.name, "{msg}");
        Ok(self.status().await)
    }

    /// `mdctrl verify`: the summary line.
    pub async fn verify(&self) -> Result<String, AdminError> {
        self.pair_or_refuse("verify")?.verify().await
    }

    /// Whether the NBD export is being served.
    pub async fn is_active(&self) -> bool {
        matches!(*self.serving.lock().await, Serving::Active { .. })
    }

    /// What stalls, if the data disk or the cluster partition has had
    /// requests pending with none completing for `timeouts.io_stall`.
    pub fn stall(&self) -> Option<String> {
        self.stalls.first().map(|s| {
            format!(
                "the {} of {} has completed none of its {} pending requests for {} s",
                s.what, self.name, s.pending, s.secs
            )
        })
    }

    /// Snapshot for `mdctrl status`.
    pub async fn status(&self) -> ResourceStatus {
        let serving = self.serving.lock().await;
        let mut nbd = self.past.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (role, socket, tcp) = match &*serving {
            Serving::Active { server, .. } => {
                let now = counters_of(server);
                add_counters(&mut nbd, &now);
                nbd.connections_open = now.connections_open;
                (
                    Role::Active,
                    Some(self.me.nbd_socket.display().to_string()),
                    self.me.nbd_tcp.map(|a| a.to_string()),
                )
            }
            Serving::Inactive => (Role::Inactive, None, None),
        };
        drop(serving);
        let (mut disk, pair) = self.disk_and_pair();
        let st = &self.stalls;
        disk.io_stalled_secs = st.data.stalled_secs(st.threshold);
        disk.io_pending = st.data.pending() as u64;
        disk.metadata_stalled_secs = st.metadata.stalled_secs(st.threshold);
        let (color, next_step) = self.color_and_next_step(role, &disk, pair.as_ref());
        ResourceStatus {
            resource: self.name.clone(),
            node: self.node.clone(),
            peer: self.peer.clone(),
            role,
            size: self.engine.size(),
            region_size: self.cfg.region_size,
            mode: self.cfg.mode.as_str().to_string(),
            engine: self.engine.describe(),
            nbd_socket: socket,
            nbd_tcp: tcp,
            nbd,
            disk,
            pair,
            color: color.to_string(),
            next_step,
        }
    }

    /// The disk's and the pair's status as one snapshot. They change at different instants:
    /// a resync target's recovery record exists before RESYNC_TARGET is set and is marked
    /// finished only after it was cleared. One disk read before the pair's and one after that
    /// agree on consistency mean the pair's read saw the recovery that explains it; without
    /// this a read spanning the end of a resync paired "inconsistent" with "finished" and
    /// said RED "interrupted resync" for a moment.
    fn disk_and_pair(&self) -> (crate::status::DiskStatus, Option<crate::status::PairStatus>) {
        settled_snapshot(
            || self.meta.disk_status(),
            || self.pair.as_ref().map(|p| p.status()),
            |a, b| a.consistent == b.consistent,
        )
    }

    /// The ancestor's mirror colour for this node and the one-line advice.
    fn color_and_next_step(
        &self,
        role: Role,
        disk: &crate::status::DiskStatus,
        pair: Option<&crate::status::PairStatus>,
    ) -> (&'static str, String) {
        let r = &self.name;
        // Where an active node whose own disk or cluster partition failed moves
        // the service: its connected peer, which received every write.
        let move_away = || {
            pair.filter(|p| role == Role::Active && p.connection == "connected")
                .map(|p| {
                    let peer = &p.peer;
                    let steps = failover_steps("this node", peer, r);
                    format!("move the service to {peer} ({steps} on {peer})")
                })
        };
        if disk.disk_error {
            return match move_away() {
                Some(m) => ("RED", format!("the data partition of {r} reported an error: {m}, then replace the disk (maintenance guide §6.7)")),
                None => ("RED", format!("the data partition of {r} reported an error: replace the disk (maintenance guide §6.7)")),
            };
        }
        if let Some(why) = &disk.metadata_error {
            // No write intent can be recorded (safety property 1), so every
            // client write fails; what is on the partition stays valid.
            let failed = format!("the cluster partition of {r} failed ({why})");
            let repair = format!(
                "repair or replace {} and restart this agent (a replaced one needs `mdctrl init {r} --force` first)",
                self.me.cluster_partition.display()
            );
            return match move_away() {
                Some(m) => ("RED", format!("{failed}: writes fail; {m}, then {repair}")),
                None if role == Role::Active => ("RED", format!("{failed}: writes fail; {repair}")),
                None => (
                    "RED",
                    format!("{failed}: this node cannot be activated; {repair}"),
                ),
            };
        }
        // A stalled standby's own account (the ended session's writes it
        // waits for) says more than this one.
        let draining = pair.is_some_and(|p| p.ended_session_writes_secs.is_some());
        if let (Some((what, secs)), false) = (disk.stall(), draining) {
            let stalled = format!("the {what} of {r} has completed no request for {secs} s: it is stalled (check `dmesg` and the device)");
            return match (role, move_away()) {
                (Role::Active, Some(m)) => (
                    "RED",
                    format!("{stalled}; client I/O waits for it. If it does not recover: {m}"),
                ),
                (Role::Active, None) => ("RED", format!("{stalled}; client I/O waits for it")),
                (Role::Inactive, _) => ("RED", stalled),
            };
        }
        let recovering = pair
            .and_then(|p| p.recovery.as_ref())
            .is_some_and(|r| !r.finished && r.error.is_none());
        if !disk.consistent && recovering {
            return ("YELLOW", format!("resync into this node running: the local data of {r} is inconsistent until it finishes (`mdctrl recover {r} --wait` follows it)"));
        }
        if !disk.consistent {
            return ("RED", format!("the local data of {r} is inconsistent (interrupted resync): it must be resynced from the peer"));
        }
        let Some(p) = pair else {
            return match role {
                Role::Active => (
                    "GREEN",
                    format!("serving; `mdctrl deactivate {r}` stops it"),
                ),
                Role::Inactive => (
                    "GREEN",
                    format!("ready; `mdctrl activate {r}` starts serving"),
                ),
            };
        };
        let peer = &p.peer;
        let peer_meta_failed = p
            .peer_disk
            .as_ref()
            .and_then(|d| d.metadata_error.as_deref())
            .filter(|_| p.connection == "connected");
        if let Some(why) = peer_meta_failed {
            let failed = format!("the cluster partition of {peer} failed ({why})");
            let repair = format!("repair or replace it and restart the agent on {peer}");
            return match (role, p.peer_role) {
                // Its writes fail; this node received every one it acknowledged.
                (Role::Inactive, Some(Role::Active)) => (
                    "GREEN",
                    format!("{failed}: its writes fail; move the service here ({} on this node), then {repair}", failover_steps(peer, &self.node, r)),
                ),
                (Role::Inactive, _) if p.in_sync => (
                    "GREEN",
                    format!("{failed}: it cannot be activated; `mdctrl activate {r}` here starts serving; {repair}"),
                ),
                (Role::Active, _) => (
                    "GREEN",
                    format!("{failed}: {peer} cannot be activated, so there is no failover target until it is repaired; {repair}"),
                ),
                (Role::Inactive, _) => (
                    "GRAY",
                    format!("{failed}: {repair}; the nodes compare their states when it is back"),
                ),
            };
        }
        let peer_disk_failed =
            p.peer_disk_error || p.peer_disk.as_ref().is_some_and(|d| d.disk_error);
        if peer_disk_failed {
            return match (role, p.peer_role) {
                // The failed disk is the active's: this node still receives every
                // write (a local error does not break the mirror), and no resync
                // can run onto a failed disk (R1).
                (Role::Inactive, Some(Role::Active)) => (
                    "GREEN",
                    format!("{peer} reported a data disk error while active: move the service here ({} on this node), then replace its disk", failover_steps(peer, &self.node, r)),
                ),
                _ => (
                    "GREEN",
                    format!("{peer} reported a disk error: replace its disk, then recover the mirror"),
                ),
            };
        }
        let peer_stalled = p
            .peer_disk
            .as_ref()
            .and_then(|d| d.stalled.as_deref())
            .filter(|_| p.connection == "connected");
        if let Some(what) = peer_stalled {
            let stalled =
                format!("{peer} reports its {what} stalled (requests pending, none completing)");
            return match (role, p.peer_role) {
                // This node received every write the active acknowledged.
                (Role::Inactive, Some(Role::Active)) => (
                    "GREEN",
                    format!("{stalled}: its clients' I/O waits; if it does not recover, move the service here ({} on this node)", failover_steps(peer, &self.node, r)),
                ),
                _ => ("GREEN", format!("{stalled}: check that device on {peer}")),
            };
        }
        if let Some(secs) = p.ended_session_writes_secs {
            return ("GRAY", format!("writes {peer} sent before the last session ended are still completing on the local disk ({secs} s): the next session and an activation wait for them; if this does not end, the data disk is stalled: check it"));
        }
        if p.connection != "connected" {
            return match role {
                Role::Active => ("GREEN", format!("{peer} is unreachable ({}): writes are kept dirty for the later resync; start its agent or check the network", p.connection)),
                Role::Inactive => ("GRAY", format!("{peer} is unreachable ({}): whether this node holds the latest data is unknown", p.connection)),
            };
        }
        if p.in_sync {
            return match (role, p.peer_role) {
                (Role::Active, _) if p.replicating => {
                    ("GREEN", format!("mirroring to {peer}; nothing to do"))
                }
                (Role::Active, _) => ("YELLOW", format!("active, replication to {peer} starting")),
                (Role::Inactive, Some(Role::Active)) => {
                    ("GREEN", format!("standby for {peer}; nothing to do"))
                }
                (Role::Inactive, _) => (
                    "GREEN",
                    format!(
                        "in sync with {peer}; `mdctrl activate {r}` on one node starts serving"
                    ),
                ),
            };
        }
        if p.sync == crate::pair::DECIDING {
            return match role {
                Role::Active => ("GREEN", format!("serving; connected to {peer}, comparing the nodes' states (a moment): `mdctrl status {r}` again")),
                Role::Inactive => ("GRAY", format!("connected to {peer}, comparing the nodes' states (a moment): whether this node holds the latest data is not known yet")),
            };
        }
        if let Some(rec) = p
            .recovery
            .as_ref()
            .filter(|r| !r.finished && r.error.is_none())
        {
            let color = if rec.role == "source" {
                "GREEN"
            } else {
                "YELLOW"
            };
            return (color, format!("mirror recovery running ({} {}, {:.1}%): wait; `mdctrl recover {r} --wait` follows it", rec.kind, rec.direction, rec.percent));
        }
        // Out of sync: green on the side holding the latest data.
        let newer_here = p
            .decision
            .as_deref()
            .is_some_and(|d| d.contains(&format!("resync {} ->", self.node)));
        let color = if newer_here { "GREEN" } else { "RED" };
        let what = p.decision.clone().unwrap_or_else(|| p.sync.clone());
        let next = if what.contains("split brain") || what.contains("unrelated") {
            format!("name the winner: `mdctrl force <server> {r}` (the loser's regions are saved first)")
        } else if what.contains("resync") {
            match &p.auto_recovery {
                Some(why) => format!("`mdctrl recover {r}` (automatic recovery waits: {why})"),
                None => "automatic recovery is starting".to_string(),
            }
        } else {
            format!("`mdctrl status {r}` on both nodes")
        };
        (color, format!("mirror recovery required ({what}): {next}"))
    }
}

/// The commands that move the service of `r` from `failed` (a node whose
/// data disk or cluster partition failed while active) to `to`, which
/// received every write.
fn failover_steps(failed: &str, to: &str, r: &str) -> String {
    format!("stop the agent on {failed}, then `mdctrl force {to} {r}` and `mdctrl activate {r}`")
}

/// Reads `first`, then `second`, then `first` again until the two reads of `first` agree
/// (`same`), at most three times; returns the later read of `first` with the `second`
/// read between them. Used where `second` explains a change of `first` that it precedes
/// (see [`Resource::disk_and_pair`]). If `first` keeps changing, the last reads, taken
/// close together, are returned.
fn settled_snapshot<A, B>(
    first: impl Fn() -> A,
    second: impl Fn() -> B,
    same: impl Fn(&A, &A) -> bool,
) -> (A, B) {
    let mut before = first();
    for _ in 0..3 {
        let b = second();
        let after = first();
        if same(&before, &after) {
            return (after, b);
        }
        before = after;
    }
    (before, second())
}

/// Waits `period`; false once `shutdown` is signalled (or its sender is
/// gone): the periodic tasks below end then.
async fn sleep_unless_shutdown(
    period: std::time::Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => !*shutdown.borrow(),
        _ = shutdown.changed() => false,
    }
}

/// A change of this node's devices: the peer is told at once (if connected)
/// and the status watchers are woken.
async fn announce(pair: &Option<std::sync::Weak<Pair>>, changes: &Changes) {
    if let Some(pair) = pair.as_ref().and_then(std::sync::Weak::upgrade) {
        pair.send_state().await;
    }
    changes.bump();
}

/// Logs when a device of the resource starts or stops stalling
/// ([`engine::Stalls`]), bumps the status watchers, and tells the peer at
/// once (its status then names the device and, on the standby of a stalled
/// active, the failover; the state sent every few seconds would tell it
/// too, later). Checked every 250 ms, until `shutdown`.
fn spawn_stall_watch(
    resource: String,
    stalls: Arc<engine::Stalls>,
    pair: Option<&Arc<Pair>>,
    changes: Arc<Changes>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let pair = pair.map(Arc::downgrade);
    tokio::spawn(async move {
        let mut stalled: Option<(&'static str, std::time::Instant)> = None;
        while sleep_unless_shutdown(std::time::Duration::from_millis(250), &mut shutdown).await {
            let now = stalls.first();
            match (stalled, now) {
                (Some((what, since)), None) => {
                    tracing::info!(%resource, "the {what} answers again (reported stalled {:.1} s ago)", since.elapsed().as_secs_f64());
                    stalled = None;
                }
                (prev, Some(s)) if prev.map(|(what, _)| what) != Some(s.what) => {
                    tracing::warn!(%resource, "the {} has completed none of its {} pending requests for {} s: it is stalled (check `dmesg` and the device)", s.what, s.pending, s.secs);
                    stalled = Some((s.what, std::time::Instant::now()));
                }
                _ => continue,
            }
            announce(&pair, &changes).await;
        }
    });
}

/// Checks every `interval` that the cluster partition still takes writes
/// ([`bitmap::ClusterPartition::check_writable`]), until `shutdown`. A node
/// may write no metadata for hours (a standby, an idle node): without the
/// check its failed cluster partition would be found only by the next
/// metadata write, possibly the first client write after a failover to it.
/// A failed check poisons the partition: status shows it (RED, "Cluster
/// Partition FAILED") on this node and, through the control link, on the
/// peer, and activation is refused. One check at a time: a check that hangs
/// on a stalled partition delays the next, it does not pile them up.
fn spawn_metadata_check(
    resource: String,
    meta: &Arc<Meta>,
    pair: Option<&Arc<Pair>>,
    changes: Arc<Changes>,
    interval: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // Weak: the task must not keep the partition (and its exclusive lock) or
    // the pair alive once the resource is gone.
    let meta = Arc::downgrade(meta);
    let pair = pair.map(Arc::downgrade);
    tokio::spawn(async move {
        while sleep_unless_shutdown(interval, &mut shutdown).await {
            let Some(meta) = meta.upgrade() else { return };
            let cp = meta.partition().clone();
            if cp.poisoned().is_some() {
                // Failed earlier (and reported then): nothing left to find.
                return;
            }
            // Skipped when metadata was written and synced within the interval
            // anyway (a busy active): that showed the device takes writes.
            let check = move || cp.check_writable_unless_synced_within(Some(interval));
            match tokio::task::spawn_blocking(check).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::error!(%resource, path = %meta.path().display(), %error, "the cluster partition failed its periodic write check: this node cannot be activated, and client writes fail if it is active; repair or replace it, then restart this agent");
                    announce(&pair, &changes).await;
                    return;
                }
                Err(error) => {
                    tracing::error!(%resource, %error, "the cluster partition check panicked");
                    return;
                }
            }
        }
    });
}

fn engine_options(cfg: &config::Resource) -> engine::EngineOptions {
    engine::EngineOptions {
        kind: match cfg.engine {
            config::EngineChoice::Auto => engine::EngineKind::Auto,
            config::EngineChoice::IoUring => engine::EngineKind::IoUring,
            config::EngineChoice::Portable => engine::EngineKind::Portable,
        },
        direct_io: match cfg.direct_io {
            config::DirectIo::Auto => engine::DirectIo::Auto,
            config::DirectIo::On => engine::DirectIo::On,
            config::DirectIo::Off => engine::DirectIo::Off,
        },
        write_behind: cfg.write_behind,
        ..Default::default()
    }
}

fn counters_of(server: &NbdServer) -> NbdCounters {
    let s = server.stats();
    NbdCounters {
        connections_open: s.connections_open,
        connections_total: s.connections_total,
        requests: s.requests,
        read_bytes: s.read_bytes,
        written_bytes: s.written_bytes,
        errors: s.errors,
    }
}

fn add_counters(into: &mut NbdCounters, c: &NbdCounters) {
    into.connections_total += c.connections_total;
    into.requests += c.requests;
    into.read_bytes += c.read_bytes;
    into.written_bytes += c.written_bytes;
    into.errors += c.errors;
}

#[cfg(test)]
mod tests {
    use super::settled_snapshot;
    use std::cell::Cell;

    /// A resync target's end as `status` sees it: the superblock turns consistent, then the
    /// recovery is marked finished, wherever that falls among the reads. No snapshot may
    /// pair "inconsistent" with a finished recovery (the old single disk-then-pair read
    /// did, when both changes fell between its two reads).
    #[test]
    fn a_snapshot_never_pairs_the_old_disk_state_with_the_new_recovery_state() {
        for change_at in 0..6 {
            // Time advances with every read. Between read `change_at` and the next one the
            // disk turns consistent and then the recovery finishes (as in `run_target`).
            let t = Cell::new(0u32);
            let tick = || {
                let now = t.get();
                t.set(now + 1);
                now
            };
            let disk_consistent = || tick() > change_at;
            let recovery_finished = || tick() > change_at;
            let (consistent, finished) =
                settled_snapshot(disk_consistent, recovery_finished, |a, b| a == b);
            assert!(
                consistent || !finished,
                "change at read {change_at}: inconsistent paired with a finished recovery"
            );
        }
    }

    /// A `first` that never settles still gives an answer after a bounded number of reads.
    #[test]
    fn a_value_that_keeps_changing_is_read_a_bounded_number_of_times() {
        let n = Cell::new(0u32);
        let (_, _) = settled_snapshot(
            || {
                n.set(n.get() + 1);
                n.get()
            },
            || (),
            |a, b| a == b,
        );
        assert_eq!(n.get(), 4);
    }
}
