//! The agent process: load the config, attach every resource of this node,
//! serve the admin socket, and shut down gracefully on SIGTERM/SIGINT
//! (deactivate what is active: drain, flush, record state), unless a device
//! stalls (no progress for `timeouts.io_stall`) or a second signal comes:
//! then the wind-down is abandoned and the process exits non-zero, as after
//! a crash for the data.

use std::path::Path;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::admin::{self, AccessPolicy, AdminError, Request, Response};
use crate::config::{Config, ConfigError};
use crate::resource::{AttachError, Resource};

/// Why the agent could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A resource could not be attached.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// The admin socket could not be created.
    #[error("admin socket {path}: {source}")]
    AdminSocket {
        /// Socket path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Runtime or signal setup failed.
    #[error("agent runtime: {0}")]
    Runtime(std::io::Error),
    /// The graceful shutdown was abandoned (a stalled disk, a second
    /// signal): the agent exited with requests still pending.
    #[error("shutdown abandoned: {0}; exited with requests still pending (none was acknowledged to its client; their regions stay dirty)")]
    ShutdownAbandoned(String),
}

/// Everything the agent serves on this node.
#[derive(Debug)]
pub struct Agent {
    /// This node's name.
    pub node: String,
    /// Attached resources, in config order.
    pub resources: Vec<Arc<Resource>>,
}

impl Agent {
    fn find(&self, name: &str) -> Result<&Arc<Resource>, AdminError> {
        self.resources
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| {
                AdminError::not_found(
                    name,
                    &self
                        .resources
                        .iter()
                        .map(|r| r.name.clone())
                        .collect::<Vec<_>>(),
                )
            })
    }

    /// Answer one admin request.
    pub async fn handle(&self, req: Request) -> Response {
        tracing::debug!(?req, "admin request");
        match req {
            Request::Ping {} => {
                Response::ok(serde_json::json!({ "node": self.node, "pid": std::process::id() }))
            }
            Request::Status {
                resource: Some(name),
            } => match self.find(&name) {
                Ok(r) => Response::ok(r.status().await),
                Err(e) => Response::err(e),
            },
            Request::Status { resource: None } => {
                let mut all = Vec::new();
                for r in &self.resources {
                    all.push(r.status().await);
                }
                Response::ok(all)
            }
            Request::Watch {
                resource,
                version,
                timeout_ms,
            } => {
                if timeout_ms > crate::admin::MAX_WATCH_MS {
                    return Response::err(AdminError {
                        kind: crate::admin::ErrorKind::BadRequest,
                        message: format!(
                            "watch timeout_ms {timeout_ms} is above the limit of {} ms",
                            crate::admin::MAX_WATCH_MS
                        ),
                        hint: Some("ask again after each answer".into()),
                    });
                }
                match self.find(&resource) {
                    Ok(r) => Response::ok(
                        r.watch(version, std::time::Duration::from_millis(timeout_ms))
                            .await,
                    ),
                    Err(e) => Response::err(e),
                }
            }
            Request::Activate { resource, nomount } => {
                self.act("activate", &resource, |r| r.activate(nomount))
                    .await
            }
            Request::Deactivate { resource } => {
                self.act("deactivate", &resource, |r| r.deactivate()).await
            }
            Request::Recover { resource } => self.act("recover", &resource, |r| r.recover()).await,
            Request::Force { resource, winner } => {
                self.act("force", &resource, |r| r.force(&winner)).await
            }
            Request::Break { resource } => self.act("break", &resource, |r| r.break_mirror()).await,
            Request::Verify { resource } => {
                self.act("verify", &resource, |r| async move {
                    r.verify()
                        .await
                        .map(|text| serde_json::json!({ "result": text }))
                })
                .await
            }
        }
    }

    /// An admin action on the named resource: its outcome, with the status
    /// version bumped afterwards either way (watchers re-read the status
    /// after every action), and a refusal logged.
    async fn act<'a, T, F, Fut>(&'a self, op: &str, resource: &str, f: F) -> Response
    where
        T: serde::Serialize,
        F: FnOnce(&'a Arc<Resource>) -> Fut,
        Fut: std::future::Future<Output = Result<T, AdminError>> + 'a,
    {
        let r = match self.find(resource) {
            Ok(r) => r,
            Err(e) => return Response::err(e),
        };
        let out = f(r).await;
        r.changed();
        match out {
            Ok(v) => Response::ok(v),
            Err(e) => {
                tracing::warn!(resource, "{op} refused: {}", e.message);
                Response::err(e)
            }
        }
    }

    /// Resolves once a resource's data disk or cluster partition is stalled
    /// (no progress for `timeouts.io_stall`), with what stalls.
    async fn first_stall(&self) -> String {
        loop {
            if let Some(why) = self.resources.iter().find_map(|r| r.stall()) {
                return why;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Deactivate every active resource (graceful shutdown).
    async fn shutdown(&self) {
        for r in &self.resources {
            if r.is_active().await {
                if let Err(e) = r.deactivate().await {
                    tracing::error!(resource = %r.name, "deactivation at shutdown failed: {e}");
                }
            }
        }
    }
}

/// Run the agent for `node` until SIGTERM or SIGINT.
pub fn run(config_path: &Path, node: &str) -> Result<(), DaemonError> {
    let config = Config::load(config_path)?;
    config.node_check(node)?;
    // TLS files are checked up front (missing, not PEM, expired, key/cert
    // mismatch): a bad file stops the agent here, naming it, whatever links
    // it would have been used on.
    config.read_tls(node)?;
    // Serving a kernel nbd device on this host: writeback may have to go
    // through this process, so it must not block on reclaim (before the
    // runtime: the flag is per thread and inherited by the workers).
    if config
        .resources
        .iter()
        .any(|r| r.node(node).is_some_and(|n| n.nbd_device.is_some()))
    {
        let report = crate::kernel::io_flusher_setup();
        tracing::info!(
            ?report,
            "kernel nbd device configured: IO_FLUSHER + mlockall"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let res = rt.block_on(run_async(config, node.to_string()));
    // Threads still blocked on a stalled device (an abandoned shutdown) are
    // not waited for; after a graceful one nothing is left to wait for.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    res
}

async fn run_async(config: Config, node: String) -> Result<(), DaemonError> {
    let me = config.node_check(&node)?.clone();
    // One shutdown signal for every long-lived task (peer links, ...).
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut resources = Vec::new();
    for rc in &config.resources {
        resources.push(Arc::new(
            Resource::attach(&config, rc, &node, shutdown_rx.clone()).await?,
        ));
    }
    let _control = spawn_control_link(&config, &node, shutdown_rx.clone());
    let agent = Arc::new(Agent {
        node: node.clone(),
        resources,
    });

    let policy = AccessPolicy::for_current_process(config.cluster.admin_group.as_deref()).map_err(
        |source| DaemonError::AdminSocket {
            path: me.admin_socket.display().to_string(),
            source,
        },
    )?;
    let listener = admin::bind_admin_socket(&me.admin_socket, &policy).map_err(|source| {
        DaemonError::AdminSocket {
            path: me.admin_socket.display().to_string(),
            source,
        }
    })?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
    tracing::info!(
        node = %node,
        admin_socket = %me.admin_socket.display(),
        resources = %agent.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(","),
        "agent ready"
    );
    let policy = Arc::new(policy);
    let mut admin_tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let agent = Arc::clone(&agent);
                    let policy = Arc::clone(&policy);
                    admin_tasks.spawn(async move {
                        admin::serve_connection(stream, &policy, |req| {
                            let agent = Arc::clone(&agent);
                            async move { agent.handle(req).await }
                        }).await;
                    });
                }
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = admin_tasks.join_next(), if !admin_tasks.is_empty() => {}
        }
    }
    // Stop taking admin requests, then wind the resources down. A stalled
    // disk would hold the wind-down for as long as it stalls (its requests
    // never complete), and the operator stops an agent precisely to fail
    // over from a node in trouble. So the wind-down is abandoned once a
    // resource's data disk or cluster partition has made no progress for
    // `timeouts.io_stall`, or at a second signal. For the data that is a
    // crash, which the cluster partition is built for (every region written
    // is dirty until both sides hold it); none of the abandoned requests was
    // acknowledged.
    let _ = std::fs::remove_file(&me.admin_socket);
    admin_tasks.abort_all();
    let wind_down = async {
        while admin_tasks.join_next().await.is_some() {}
        agent.shutdown().await;
    };
    let outcome = tokio::select! {
        () = wind_down => Ok(()),
        why = agent.first_stall() => Err(why),
        _ = sigterm.recv() => Err("a second SIGTERM".to_string()),
        _ = sigint.recv() => Err("a second SIGINT".to_string()),
    };
    let _ = shutdown_tx.send(true);
    match outcome {
        Ok(()) => {
            tracing::info!("agent stopped");
            Ok(())
        }
        Err(why) => {
            let e = DaemonError::ShutdownAbandoned(why);
            tracing::error!("{e}");
            Err(e)
        }
    }
}

/// The per-node control link to the peer's agent (heartbeats; the peer's
/// liveness independent of any resource). `None` when standalone.
fn spawn_control_link(
    config: &Config,
    node: &str,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    config.peer(node)?;
    let secret = match config.read_secret() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("control link not started: {e}");
            return None;
        }
    };
    let hello: crate::peer::HelloStateFn = Arc::new(|| crate::peer::HelloState {
        role: mirror_proto::Role::None,
        disk_state: mirror_proto::DiskState::Diskless,
        generation: mirror_proto::Generation {
            current: 0,
            bitmap: 0,
            history: Vec::new(),
        },
        features: mirror_proto::Features::empty(),
    });
    let spec = match crate::peer::LinkSpec::control(config, node, secret, hello) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("control link not started: {e}");
            return None;
        }
    };
    let mut handle = crate::peer::spawn_link(spec, shutdown);
    Some(tokio::spawn(async move {
        while let Some(session) = handle.sessions.recv().await {
            tracing::info!(peer = %session.peer_hello.node_name, addr = %session.peer_addr, "control link up");
            let crate::peer::Session { mut rx, closed, .. } = session;
            // Nothing flows on the control link yet but heartbeats (handled by the session).
            loop {
                tokio::select! {
                    f = rx.recv() => match f {
                        Some(f) => tracing::debug!(kind = ?f.msg.kind(), "control link frame ignored"),
                        None => break,
                    },
                    reason = closed.wait() => { tracing::warn!("control link down: {reason}"); break; }
                }
            }
        }
    }))
}
