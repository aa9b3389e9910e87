//! `mdctrl`: the operator's command for nbd-mirror.
//!
//! Module map:
//! - `main.rs` (this file): argument parsing (clap), dispatch, exit codes.
//! - [`aliases`]: the ancestor's `clpmdctrl`/`clpmdstat` spellings rewritten to
//!   subcommands before parsing.
//! - [`render`]: the `clpmdstat --mirror`-style status table.
//!
//! Exit codes (documented in `docs/mdctrl.md`): 0 ok, 1 internal error,
//! 2 bad usage or configuration, 3 refused (the reason is printed), 4 agent
//! not reachable, 5 peer not reachable, 6 metadata damaged or unrecognised.
//! Errors go to stderr.

mod aliases;
mod demo;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mirror_agent::admin::{self, AdminError, ErrorKind, Request};
use mirror_agent::config::{self, Config};
use mirror_agent::status::{ResourceStatus, Watched};

/// Exit codes.
mod exit {
    pub const OK: u8 = 0;
    pub const INTERNAL: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const AGENT_UNREACHABLE: u8 = 4;
    pub const PEER_UNREACHABLE: u8 = 5;
    pub const METADATA: u8 = 6;
}

/// Control nbd-mirror resources (mirrored block devices served over NBD).
#[derive(Debug, Parser)]
#[command(
    name = "mdctrl",
    version,
    after_help = "The ancestor's spellings work too: --create [force] md1, --active [-nomount] md1, --deactive md1, --mirror md1."
)]
struct Cli {
    /// Cluster configuration file.
    #[arg(long, global = true, default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long, global = true)]
    node: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create the cluster partition (and the data file at `size` if missing).
    /// Works while the agent is stopped; refuses to overwrite valid metadata without --force.
    Init {
        /// Resource name.
        resource: String,
        /// Overwrite existing valid metadata (the ancestor's `--create force`).
        #[arg(long)]
        force: bool,
        /// Declare the data partition new and identical to the peer's (run on both
        /// nodes): the pair starts in sync without an initial copy.
        #[arg(long)]
        blank: bool,
    },
    /// Print both superblock slots, generation identifiers and the dirty bitmap summary.
    DumpMd {
        /// Resource name.
        resource: String,
    },
    /// Make this node active for the resource: start serving its NBD export.
    Activate {
        /// Resource name.
        resource: String,
        /// Attach the kernel nbd device (if configured) but skip fsck and mount (the ancestor's `-nomount`).
        #[arg(long)]
        nomount: bool,
    },
    /// Stop serving: stop accepting, drain in-flight requests, flush, record state.
    Deactivate {
        /// Resource name.
        resource: String,
    },
    /// Start the mirror recovery (resync) in the direction the rules decided.
    Recover {
        /// Resource name.
        resource: String,
        /// Show the progress until the resync finished (exit 0) or stopped (exit 1).
        #[arg(long)]
        wait: bool,
    },
    /// Forced recovery: SERVER's data wins. Connected: the other node is resynced
    /// from SERVER (its divergent regions saved first). Peer unreachable and SERVER
    /// is this node: this node's data is declared the latest and may be activated.
    Force {
        /// The server whose data wins.
        server: String,
        /// Resource name.
        resource: String,
    },
    /// Deliberately break the mirror: stop replicating, record the break.
    Break {
        /// Resource name.
        resource: String,
    },
    /// Compare every region with the peer (checksums, online); differing regions are
    /// marked dirty on this node (the active one) and resynchronised.
    Verify {
        /// Resource name.
        resource: String,
    },
    /// Show the state of a resource (all resources without a name).
    #[command(alias = "mirror")]
    Status {
        /// Resource name.
        resource: Option<String>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Keep printing: again on every state change and at least every second
        /// (with --json: one JSON document per line), until interrupted.
        #[arg(long, requires = "resource")]
        watch: bool,
    },
    /// Check that the local agent answers.
    Ping,
    /// Local two-node demo on loopback with sparse files (needs no config).
    Demo {
        /// Keep the demo's directory (config, data, logs) afterwards.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let args = aliases::rewrite(std::env::args().skip(1).collect());
    let cli = match Cli::try_parse_from(std::iter::once("mdctrl".to_string()).chain(args)) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(Failure { code, message }) => {
            eprintln!("mdctrl: {message}");
            ExitCode::from(code)
        }
    }
}

/// An error to print and the exit code that goes with it.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl std::fmt::Display) -> Self {
        Failure {
            code,
            message: message.to_string(),
        }
    }
}

impl From<AdminError> for Failure {
    fn from(e: AdminError) -> Self {
        let code = match e.kind {
            ErrorKind::Refused => exit::REFUSED,
            ErrorKind::NotFound | ErrorKind::BadRequest => exit::USAGE,
            ErrorKind::PeerUnreachable => exit::PEER_UNREACHABLE,
            ErrorKind::Internal => exit::INTERNAL,
        };
        Failure::new(code, e)
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    if let Cmd::Demo { keep } = cli.cmd {
        return demo::run(keep)
            .map_err(|e| Failure::new(exit::INTERNAL, format!("demo failed: {e}")));
    }
    let config = Config::load(&cli.config).map_err(|e| Failure::new(exit::USAGE, e))?;
    let node = cli.node.unwrap_or_else(config::default_node_name);
    let me = config
        .node_check(&node)
        .map_err(|e| Failure::new(exit::USAGE, e))?
        .clone();
    let resource_cfg = |name: &str| {
        config.resource(name).ok_or_else(|| {
            Failure::new(
                exit::USAGE,
                format!(
                    "no resource named {name:?} in {} (configured: {})",
                    config.path.display(),
                    config
                        .resources
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    };
    match cli.cmd {
        Cmd::Init {
            resource,
            force,
            blank,
        } => {
            let rc = resource_cfg(&resource)?;
            let report =
                mirror_agent::meta::init_resource(rc, &node, force, blank).map_err(|e| {
                    let code = if e.is_refusal() {
                        exit::REFUSED
                    } else {
                        exit::INTERNAL
                    };
                    Failure::new(code, e)
                })?;
            println!("{report}");
            Ok(())
        }
        Cmd::DumpMd { resource } => {
            let rc = resource_cfg(&resource)?;
            let rn = rc.node(&node).ok_or_else(|| {
                Failure::new(
                    exit::USAGE,
                    format!("resource {resource} has no section for node {node}"),
                )
            })?;
            let dump = mirror_agent::meta::dump(&rn.cluster_partition)
                .map_err(|e| Failure::new(exit::METADATA, e))?;
            println!("{dump}");
            if dump.is_damaged() {
                return Err(Failure::new(
                    exit::METADATA,
                    format!(
                        "cluster partition {} is damaged (see above)",
                        rn.cluster_partition.display()
                    ),
                ));
            }
            Ok(())
        }
        Cmd::Activate { resource, nomount } => {
            let s: ResourceStatus =
                call(&me.admin_socket, &Request::Activate { resource, nomount })?;
            println!(
                "{}: active on {}, serving {}",
                s.resource,
                s.node,
                s.nbd_socket.as_deref().unwrap_or("-")
            );
            Ok(())
        }
        Cmd::Deactivate { resource } => {
            let s: ResourceStatus = call(&me.admin_socket, &Request::Deactivate { resource })?;
            println!("{}: deactivated on {}", s.resource, s.node);
            Ok(())
        }
        Cmd::Recover { resource, wait } => {
            let s: ResourceStatus = call(
                &me.admin_socket,
                &Request::Recover {
                    resource: resource.clone(),
                },
            )?;
            println!(
                "{}: recovery started ({})",
                s.resource,
                s.pair
                    .as_ref()
                    .and_then(|p| p.decision.clone())
                    .unwrap_or_default()
            );
            if wait {
                wait_recovery(&me.admin_socket, &resource)?;
            }
            Ok(())
        }
        Cmd::Force { server, resource } => {
            let s: ResourceStatus = call(
                &me.admin_socket,
                &Request::Force {
                    resource,
                    winner: server.clone(),
                },
            )?;
            println!(
                "{}: forced, {server}'s data wins; next: {}",
                s.resource, s.next_step
            );
            Ok(())
        }
        Cmd::Break { resource } => {
            let s: ResourceStatus = call(&me.admin_socket, &Request::Break { resource })?;
            println!(
                "{}: mirror broken on {}; `mdctrl recover {}` resumes it",
                s.resource, s.node, s.resource
            );
            Ok(())
        }
        Cmd::Verify { resource } => {
            let v: serde_json::Value = call(&me.admin_socket, &Request::Verify { resource })?;
            println!("{}", v["result"].as_str().unwrap_or("?"));
            Ok(())
        }
        Cmd::Status {
            resource: Some(resource),
            json,
            watch: true,
        } => watch_status(&me.admin_socket, &resource, json),
        Cmd::Status { resource, json, .. } => {
            let list: Vec<ResourceStatus> = match resource {
                Some(r) => vec![call(
                    &me.admin_socket,
                    &Request::Status { resource: Some(r) },
                )?],
                None => call(&me.admin_socket, &Request::Status { resource: None })?,
            };
            if json {
                let v = if list.len() == 1 {
                    serde_json::to_string_pretty(&list[0])
                } else {
                    serde_json::to_string_pretty(&list)
                };
                println!("{}", v.map_err(|e| Failure::new(exit::INTERNAL, e))?);
            } else {
                for s in &list {
                    print!("{}", render::status_table(s));
                }
            }
            Ok(())
        }
        Cmd::Demo { .. } => unreachable!("handled before the config is loaded"),
        Cmd::Ping => {
            let v: serde_json::Value = call(&me.admin_socket, &Request::Ping {})?;
            println!(
                "agent for {} is running (pid {})",
                v["node"].as_str().unwrap_or("?"),
                v["pid"]
            );
            Ok(())
        }
    }
}

/// One `watch` request: the status once it changed since `version` (or at
/// once without one), at most `timeout` later.
fn watch(
    socket: &std::path::Path,
    resource: &str,
    version: Option<u64>,
    timeout: std::time::Duration,
) -> Result<Watched, Failure> {
    call(
        socket,
        &Request::Watch {
            resource: resource.to_string(),
            version,
            timeout_ms: timeout
                .as_millis()
                .clamp(1, u128::from(admin::MAX_WATCH_MS)) as u64,
        },
    )
}

/// `status --watch`: print the status, then again on every change the agent
/// reports and at least every second (progress, times), until interrupted.
fn watch_status(socket: &std::path::Path, resource: &str, json: bool) -> Result<(), Failure> {
    use std::io::{IsTerminal, Write};
    const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
    let tty = std::io::stdout().is_terminal();
    let mut version = None;
    loop {
        let w = watch(socket, resource, version, EVERY)?;
        version = Some(w.version);
        let mut out = std::io::stdout().lock();
        let written = if json {
            let line =
                serde_json::to_string(&w.status).map_err(|e| Failure::new(exit::INTERNAL, e))?;
            writeln!(out, "{line}")
        } else if tty {
            // Redraw in place, like `watch(1)`.
            write!(out, "\x1b[H\x1b[2J{}", render::status_table(&w.status))
        } else {
            writeln!(out, "{}", render::status_table(&w.status))
        };
        // A closed pipe (`| head`) ends the watch quietly.
        if written.and_then(|_| out.flush()).is_err() {
            return Ok(());
        }
    }
}

/// Print the recovery progress every second until it finished or stopped.
/// The agent answers a `watch` as soon as the state changed, so a resync is
/// reported done when it is, not at the next poll.
fn wait_recovery(socket: &std::path::Path, resource: &str) -> Result<(), Failure> {
    use std::time::{Duration, Instant};
    const PRINT_EVERY: Duration = Duration::from_secs(1);
    const GIVE_UP: Duration = Duration::from_secs(7 * 24 * 3600);
    let started = Instant::now();
    let mut seen_running = false;
    let mut version = None;
    let mut last_print: Option<Instant> = None;
    let mut print_due = |now: Instant| {
        let due = last_print.is_none_or(|t| now.duration_since(t) >= PRINT_EVERY);
        if due {
            last_print = Some(now);
        }
        due
    };
    while started.elapsed() < GIVE_UP {
        let w = watch(socket, resource, version, PRINT_EVERY)?;
        version = Some(w.version);
        let s = w.status;
        let p = s.pair.as_ref();
        match p.and_then(|p| p.recovery.as_ref()) {
            Some(r) if r.finished && (seen_running || p.is_some_and(|p| p.in_sync)) => {
                println!(
                    "{}: recovery finished ({}, {} copied in {})",
                    resource,
                    r.direction,
                    render::human(r.done_bytes),
                    render::hms(r.elapsed_secs)
                );
                return Ok(());
            }
            Some(r) if r.error.is_some() => {
                return Err(Failure::new(
                    exit::INTERNAL,
                    format!(
                        "{resource}: recovery stopped: {}",
                        r.error.clone().unwrap_or_default()
                    ),
                ));
            }
            Some(r) => {
                seen_running = true;
                if print_due(Instant::now()) {
                    let bar = if r.preparing {
                        String::new()
                    } else {
                        format!("{} ", render::progress_bar(r.percent, 30))
                    };
                    println!(
                        "{}: {} {}{}, used {}, remain {}",
                        resource,
                        r.direction,
                        bar,
                        render::recovery_progress(r),
                        render::hms(r.elapsed_secs),
                        r.remaining_secs
                            .map(render::hms)
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
            None if p.is_some_and(|p| p.in_sync) => {
                println!("{resource}: in sync");
                return Ok(());
            }
            None => {
                if print_due(Instant::now()) {
                    println!(
                        "{resource}: waiting for the recovery to start ({})",
                        p.map(|p| p.sync.as_str()).unwrap_or("-")
                    );
                }
            }
        }
    }
    Err(Failure::new(exit::INTERNAL, "gave up waiting"))
}

fn call<T: serde::de::DeserializeOwned>(
    socket: &std::path::Path,
    req: &Request,
) -> Result<T, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::INTERNAL, e))?;
    let resp = rt.block_on(admin::request(socket, req)).map_err(|e| match e {
        admin::ClientError::Connect { ref source, ref path } if source.kind() == std::io::ErrorKind::PermissionDenied => Failure::new(
            exit::REFUSED,
            format!("permission denied on the admin socket {}: run mdctrl as root (or as a member of the configured admin_group)", path.display()),
        ),
        admin::ClientError::Connect { .. } => Failure::new(exit::AGENT_UNREACHABLE, e),
        other => Failure::new(exit::INTERNAL, other),
    })?;
    let value = resp.into_result()?;
    serde_json::from_value(value).map_err(|e| {
        Failure::new(
            exit::INTERNAL,
            format!("unexpected answer from the agent: {e}"),
        )
    })
}
