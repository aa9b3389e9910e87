//! One mirrored resource (`md1`) on this node: its data partition (an
//! engine), its cluster partition (metadata + dirty bitmap), and its NBD
//! export while active.
//!
//! Activation rules here are those of a standalone resource (a config with
//! one server) — the peer-aware rules come with replication and recovery.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::admin::AdminError;
use crate::config::{self, Config};
use crate::engine::{self, BlockEngine};
use crate::meta::Meta;
use crate::nbd::{self, BlockSizes, Export, NbdServer};
use crate::status::{NbdCounters, ResourceStatus, Role};

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
    meta: Arc<Meta>,
    serving: Mutex<Serving>,
    /// Counters of NBD servers that were active earlier (status reports totals).
    past: std::sync::Mutex<NbdCounters>,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource").field("name", &self.name).field("node", &self.node).finish_non_exhaustive()
    }
}

impl Resource {
    /// Attach the resource's data and cluster partitions on `node`.
    pub async fn attach(config: &Config, cfg: &config::Resource, node: &str) -> Result<Resource, AttachError> {
        let me = cfg.node(node).cloned().ok_or_else(|| AttachError::NotOnNode {
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
        let meta = Meta::attach(cfg, &me, node, engine.size())
            .map_err(|source| AttachError::Meta { resource: cfg.name.clone(), source })?;
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
            meta: Arc::new(meta),
            serving: Mutex::new(Serving::Inactive),
            past: std::sync::Mutex::new(NbdCounters::default()),
        })
    }

    /// Start serving the NBD export on this node.
    pub async fn activate(&self, _nomount: bool) -> Result<ResourceStatus, AdminError> {
        let mut serving = self.serving.lock().await;
        if let Serving::Active { .. } = *serving {
            return Err(AdminError::refused(
                format!("{} is already active on {}", self.name, self.node),
                format!("nothing to do; `mdctrl status {}` shows its state", self.name),
            ));
        }
        if let Some(peer) = &self.peer {
            return Err(AdminError::refused(
                format!(
                    "{} is a mirrored resource (peer {peer}) and this build has no replication yet: activating it alone would let the two nodes diverge silently",
                    self.name
                ),
                "use a standalone configuration (a single [[server]]) until replication is available",
            ));
        }
        if let Err(e) = self.meta.check_activatable() {
            return Err(AdminError::refused(e, format!("`mdctrl dump-md {}` shows the metadata", self.name)));
        }

        let mut export = Export::new(self.name.clone(), Arc::clone(&self.engine));
        export.description = format!("nbd-mirror resource {} on {}", self.name, self.node);
        export.block_sizes = BlockSizes {
            minimum: self.cfg.nbd_block_size_min as u32,
            preferred: 4096.max(self.cfg.nbd_block_size_min as u32),
            maximum: self.cfg.nbd_max_request as u32,
        };
        let server = NbdServer::new(vec![export], nbd::Limits::default())
            .map_err(|e| AdminError::internal(format!("cannot create NBD server: {e}")))?;
        let unix = nbd::bind_unix(&self.me.nbd_socket, None).map_err(|e| {
            AdminError::internal(format!("cannot listen on NBD socket {}: {e}", self.me.nbd_socket.display()))
        })?;
        let tcp = match self.me.nbd_tcp {
            Some(addr) => Some(nbd::bind_tcp(addr).await.map_err(|e| {
                let _ = std::fs::remove_file(&self.me.nbd_socket);
                AdminError::internal(format!("cannot listen on NBD TCP {addr}: {e}"))
            })?),
            None => None,
        };
        self.meta
            .record_activation(true)
            .await
            .map_err(|e| AdminError::internal(format!("cannot record activation in the cluster partition: {e}")))?;

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
        tracing::info!(resource = %self.name, socket = %self.me.nbd_socket.display(), tcp = ?self.me.nbd_tcp, "activated: serving NBD");
        *serving = Serving::Active { server, accept_tasks, since: Instant::now() };
        drop(serving);
        Ok(self.status().await)
    }

    /// Stop accepting, let in-flight requests finish, flush, record state.
    pub async fn deactivate(&self) -> Result<ResourceStatus, AdminError> {
        let mut serving = self.serving.lock().await;
        let Serving::Active { server, accept_tasks, since } = std::mem::replace(&mut *serving, Serving::Inactive) else {
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
        let flushed = self.engine.flush().await;
        let recorded = self.meta.record_activation(false).await;
        tracing::info!(resource = %self.name, active_for = ?since.elapsed(), "deactivated");
        flushed.map_err(|e| AdminError::internal(format!("flush of {} failed after deactivation: {e}", self.me.data_path.display())))?;
        recorded.map_err(|e| AdminError::internal(format!("cannot record deactivation in the cluster partition: {e}")))?;
        drop(serving);
        Ok(self.status().await)
    }

    /// Whether the NBD export is being served.
    pub async fn is_active(&self) -> bool {
        matches!(*self.serving.lock().await, Serving::Active { .. })
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
                (Role::Active, Some(self.me.nbd_socket.display().to_string()), self.me.nbd_tcp.map(|a| a.to_string()))
            }
            Serving::Inactive => (Role::Inactive, None, None),
        };
        drop(serving);
        let disk = self.meta.disk_status();
        let (color, next_step) = match (role, disk.disk_error, disk.consistent) {
            (_, true, _) => ("RED", format!("the data partition of {} reported an error: replace the disk (maintenance guide §6.7)", self.name)),
            (_, _, false) => ("RED", format!("the local data of {} is inconsistent (interrupted resync)", self.name)),
            (Role::Active, _, _) => ("GREEN", format!("serving; `mdctrl deactivate {}` stops it", self.name)),
            (Role::Inactive, _, _) => ("GREEN", format!("ready; `mdctrl activate {}` starts serving", self.name)),
        };
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
            color: color.to_string(),
            next_step,
        }
    }
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
