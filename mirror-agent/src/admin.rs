//! The admin socket: how `mdctrl` talks to the local agent.
//!
//! # Protocol (JSON lines)
//!
//! A client connects to the agent's `admin_socket` (a unix stream socket),
//! writes one request as a single line of JSON, and reads one response line.
//! It may send further requests on the same connection. A line longer than
//! [`MAX_LINE`] bytes closes the connection (with a log line naming the
//! reason). The full protocol is documented in `docs/admin-protocol.md`.
//!
//! ```text
//! -> {"op":"status","resource":"md1"}
//! <- {"ok":true,"result":{...ResourceStatus...}}
//! -> {"op":"activate","resource":"md1","nomount":true}
//! <- {"ok":false,"error":{"kind":"refused","message":"md1 is already active on server1","hint":"..."}}
//! ```
//!
//! # Access control
//!
//! The admin socket is as sensitive as root. It is created with mode 0600
//! (0660 when `cluster.admin_group` is configured, with that group), and every
//! connection's peer credentials (`SO_PEERCRED`) are checked: root, the
//! agent's own uid, and — when configured — members of the admin group are
//! admitted; anyone else is refused and the attempt is logged.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request or response line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// A request from `mdctrl` to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness check; answers with the agent's node name and pid.
    Ping {},
    /// Status of one resource (or all when `resource` is absent).
    Status {
        /// Resource name; `None` means every resource.
        #[serde(default)]
        resource: Option<String>,
    },
    /// The status of one resource with its change version; with `version`,
    /// answered once the resource's state changed since that version, or
    /// after `timeout_ms` (at most [`MAX_WATCH_MS`]) — what `status --watch`
    /// and `recover --wait` use instead of polling.
    Watch {
        /// Resource name.
        resource: String,
        /// The version of the last answer; absent = answer at once.
        #[serde(default)]
        version: Option<u64>,
        /// Longest wait for a change, in milliseconds.
        #[serde(default = "default_watch_ms")]
        timeout_ms: u64,
    },
    /// Make this node active for the resource and start serving NBD.
    Activate {
        /// Resource name.
        resource: String,
        /// Attach the kernel nbd device (if configured) but skip fsck and mount (the ancestor's `-nomount`).
        #[serde(default)]
        nomount: bool,
    },
    /// Stop serving: stop accepting, drain in-flight requests, flush, record state.
    Deactivate {
        /// Resource name.
        resource: String,
    },
    /// Start the resync `rules::decide` chose (either node may ask; the source runs it).
    Recover {
        /// Resource name.
        resource: String,
    },
    /// Forced recovery: `winner`'s data wins (connected: resync from it, the
    /// loser's regions saved first; peer unreachable and `winner` is this node:
    /// force alone, activation allowed).
    Force {
        /// Resource name.
        resource: String,
        /// The server whose data wins.
        winner: String,
    },
    /// Deliberately break the mirror (detach replication, record the break).
    Break {
        /// Resource name.
        resource: String,
    },
    /// Compare every region's checksum with the peer's (online).
    Verify {
        /// Resource name.
        resource: String,
    },
}

/// Longest `watch` wait the agent accepts (a client re-asks; progress
/// counters move without a version change).
pub const MAX_WATCH_MS: u64 = 60_000;

fn default_watch_ms() -> u64 {
    1_000
}

/// Why a request failed; also decides `mdctrl`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The agent understood and refused (reason in the message).
    Refused,
    /// No such resource on this node.
    NotFound,
    /// The request itself was malformed.
    BadRequest,
    /// The peer node could not be reached.
    PeerUnreachable,
    /// Something failed inside the agent (I/O error, ...).
    Internal,
}

/// Error half of a response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminError {
    /// Category.
    pub kind: ErrorKind,
    /// What happened, with the detail (names, errno, offsets).
    pub message: String,
    /// What the operator can do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl AdminError {
    /// A refusal with a reason and what to do next.
    pub fn refused(message: impl Into<String>, hint: impl Into<String>) -> Self {
        AdminError {
            kind: ErrorKind::Refused,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// A failure inside the agent.
    pub fn internal(message: impl Into<String>) -> Self {
        AdminError {
            kind: ErrorKind::Internal,
            message: message.into(),
            hint: None,
        }
    }

    /// Unknown resource name.
    pub fn not_found(resource: &str, known: &[String]) -> Self {
        AdminError {
            kind: ErrorKind::NotFound,
            message: format!("no resource named {resource:?} on this node"),
            hint: Some(format!("configured resources: {}", known.join(", "))),
        }
    }
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for AdminError {}

/// One response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// `true` when `result` is set, `false` when `error` is.
    pub ok: bool,
    /// The result payload (request specific).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AdminError>,
}

impl Response {
    /// Successful response carrying `value`.
    pub fn ok(value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response::err(AdminError::internal(format!("cannot encode result: {e}"))),
        }
    }

    /// Failed response.
    pub fn err(e: AdminError) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(e),
        }
    }

    /// Convert to a `Result`.
    pub fn into_result(self) -> Result<serde_json::Value, AdminError> {
        match (self.ok, self.result, self.error) {
            (true, r, _) => Ok(r.unwrap_or(serde_json::Value::Null)),
            (false, _, Some(e)) => Err(e),
            (false, _, None) => Err(AdminError::internal(
                "agent answered ok=false without an error",
            )),
        }
    }
}

/// Who may use the admin socket.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// The agent's effective uid (always admitted, as is root).
    pub own_uid: u32,
    /// Members of this group are admitted too (socket mode 0660).
    pub group: Option<(String, u32)>,
}

impl AccessPolicy {
    /// Policy for this process, with an optional admin group name.
    pub fn for_current_process(group: Option<&str>) -> io::Result<Self> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        let group = match group {
            None => None,
            Some(name) => Some((name.to_string(), lookup_group(name)?)),
        };
        Ok(AccessPolicy { own_uid, group })
    }

    /// Decide whether a peer with these credentials is admitted; `Err` names why not.
    pub fn admit(&self, uid: u32, gid: u32, pid: Option<i32>) -> Result<(), String> {
        if uid == 0 || uid == self.own_uid {
            return Ok(());
        }
        if let Some((name, g)) = &self.group {
            if gid == *g
                || pid
                    .map(|p| supplementary_groups(p).contains(g))
                    .unwrap_or(false)
            {
                return Ok(());
            }
            return Err(format!(
                "uid {uid} gid {gid} is neither root, the agent's uid {}, nor in group {name}",
                self.own_uid
            ));
        }
        Err(format!(
            "uid {uid} is neither root nor the agent's uid {}",
            self.own_uid
        ))
    }
}

fn lookup_group(name: &str) -> io::Result<u32> {
    let text = std::fs::read_to_string("/etc/group")?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let _pw = f.next()?;
            let gid = f.next()?.parse::<u32>().ok()?;
            (n == name).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("admin group {name:?} not found in /etc/group"),
            )
        })
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// Create the admin socket at `path` with the policy's permissions.
///
/// A stale socket file is removed first; any other kind of file at `path` is
/// an error (we never delete something that is not a socket).
pub fn bind_admin_socket(path: &Path, policy: &AccessPolicy) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "admin socket {} is in use: is another agent running for this node?",
                        path.display()
                    ),
                ));
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The credential check is the real gate; the mode is defence in depth.
    // bind_unix binds under a temporary name and renames after chmod, so the
    // socket is never reachable with wider permissions.
    let mode = if policy.group.is_some() { 0o660 } else { 0o600 };
    let listener = crate::nbd::bind_unix(path, Some(mode)).map_err(io::Error::other)?;
    if let Some((_, gid)) = &policy.group {
        std::os::unix::fs::chown(path, None, Some(*gid))?;
    }
    Ok(listener)
}

/// Serve one admin connection: read request lines, answer each with `handle`.
pub async fn serve_connection<F, Fut>(stream: UnixStream, policy: &AccessPolicy, handle: F)
where
    F: Fn(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("admin socket: cannot read peer credentials ({e}); connection refused");
            return;
        }
    };
    if let Err(why) = policy.admit(cred.uid(), cred.gid(), cred.pid()) {
        tracing::warn!(pid = ?cred.pid(), uid = cred.uid(), gid = cred.gid(), "admin socket: refused connection: {why}");
        let (r, mut w) = stream.into_split();
        // Read (and ignore) the request first, briefly and bounded: closing with
        // it unread would make the client's write fail with EPIPE instead of
        // showing this refusal.
        let mut reader = BufReader::new(r);
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            read_line_bounded(&mut reader),
        )
        .await;
        let resp = Response::err(AdminError {
            kind: ErrorKind::Refused,
            message: format!("permission denied: {why}"),
            hint: Some("run mdctrl as root (or as a member of the configured admin_group)".into()),
        });
        let _ = write_line(&mut w, &resp).await;
        return;
    }
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    loop {
        let line = match read_line_bounded(&mut reader).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("admin socket: closing connection: {e}");
                return;
            }
        };
        let resp = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handle(req).await,
            Err(e) => Response::err(AdminError {
                kind: ErrorKind::BadRequest,
                message: format!("malformed admin request: {e}"),
                hint: None,
            }),
        };
        if write_line(&mut w, &resp).await.is_err() {
            return;
        }
    }
}

async fn write_line<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    resp: &Response,
) -> io::Result<()> {
    let mut buf = serde_json::to_vec(resp).map_err(io::Error::other)?;
    buf.push(b'\n');
    w.write_all(&buf).await?;
    w.flush().await
}

/// Read one `\n`-terminated line of at most [`MAX_LINE`] bytes; `None` at clean EOF.
async fn read_line_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "request line not terminated by a newline",
                ))
            };
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if line.len() + chunk.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request line longer than {MAX_LINE} bytes"),
            ));
        }
        line.extend_from_slice(chunk);
        match done {
            Some(n) => {
                r.consume(n);
                return Ok(Some(line));
            }
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    }
}

/// Client side: send one request to the agent at `path` and return its response.
pub async fn request(path: &Path, req: &Request) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| ClientError::Connect {
            path: path.to_path_buf(),
            source: e,
        })?;
    let (r, mut w) = stream.into_split();
    let mut buf = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    buf.push(b'\n');
    w.write_all(&buf).await.map_err(|e| ClientError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut reader = BufReader::new(r);
    let line = read_line_bounded(&mut reader)
        .await
        .map_err(|e| ClientError::Io {
            path: path.to_path_buf(),
            source: e,
        })?
        .ok_or_else(|| {
            ClientError::Protocol("agent closed the connection without answering".into())
        })?;
    serde_json::from_slice(&line)
        .map_err(|e| ClientError::Protocol(format!("malformed response: {e}")))
}

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached (agent not running?).
    #[error("cannot reach the agent at {path}: {source} (is mirror-agent running for this node?)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// I/O failed mid-request.
    #[error("admin socket {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The agent's answer was not understood.
    #[error("admin protocol error: {0}")]
    Protocol(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape() {
        let r: Request =
            serde_json::from_str(r#"{"op":"activate","resource":"md1","nomount":true}"#).unwrap();
        assert_eq!(
            r,
            Request::Activate {
                resource: "md1".into(),
                nomount: true
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(r, Request::Status { resource: None });
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"ping","extra":1}"#).is_err());
    }

    #[test]
    fn policy_admits_root_and_self_only() {
        let p = AccessPolicy {
            own_uid: 1000,
            group: None,
        };
        assert!(p.admit(0, 0, None).is_ok());
        assert!(p.admit(1000, 1000, None).is_ok());
        let e = p.admit(1001, 1001, None).unwrap_err();
        assert!(e.contains("uid 1001"), "{e}");
        let p = AccessPolicy {
            own_uid: 0,
            group: Some(("mdadm".into(), 4242)),
        };
        assert!(p.admit(1001, 4242, None).is_ok());
        assert!(p.admit(1001, 1001, None).unwrap_err().contains("mdadm"));
    }

    #[tokio::test]
    async fn oversized_line_is_rejected() {
        let data = vec![b'x'; MAX_LINE + 10];
        let mut r = BufReader::new(&data[..]);
        let e = read_line_bounded(&mut r).await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }
}
