//! Raw file → validated [`Config`]: defaults, unit parsing, path resolution
//! and the cross-checks. Checks run in file order and the first problem is
//! reported, so the message always points at the earliest wrong key.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{self, RawNode, RawResource, RawServer, RawTimeouts};
use super::units::{parse_duration, parse_size};
use super::{
    Cluster, Config, ConfigError, DirectIo, EngineChoice, Mode, Resource, ResourceNode, Server,
    Timeouts, Tls, DEFAULT_CONTROL_PORT, DEFAULT_MIRROR_PORT_BASE,
};

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_UNIX_SOCKET_PATH: usize = 107;
const MIN_REGION_SIZE: u64 = 4 << 10;
const MAX_REGION_SIZE: u64 = 16 << 20;
const DEFAULT_REGION_SIZE: u64 = 64 << 10;
const DEFAULT_ASYNC_QUEUE: u64 = 64 << 20;
const DEFAULT_KEEP_DIRTY: i64 = bitmap::DEFAULT_KEEP_DIRTY as i64;
const MAX_KEEP_DIRTY: i64 = 1 << 20;
const DEFAULT_HOT_EXTENT_SIZE: u64 = bitmap::DEFAULT_HOT_EXTENT_SIZE;
const MAX_HOT_EXTENT_SIZE: u64 = 1 << 30;
const MAX_HOT_REGIONS: u64 = 1 << 24;
const DEFAULT_NBD_BLOCK_SIZE_MIN: u64 = 512;
const DEFAULT_NBD_MAX_REQUEST: u64 = 32 << 20;
const MAX_NBD_MAX_REQUEST: u64 = 1 << 30;
/// Default and largest `nbd_idle_poll` (see `nbd::Limits::idle_poll`).
const DEFAULT_NBD_IDLE_POLL: Duration = Duration::from_micros(50);
const MAX_NBD_IDLE_POLL: Duration = Duration::from_millis(1);
const MAX_NAME_LEN: usize = 64;
/// Base of the default `divergent_save_dir` when the cluster partition is a device.
const DEFAULT_STATE_DIR: &str = "/var/lib/nbd-mirror";
/// Where admin sockets go when `admin_socket` is not given.
const DEFAULT_ADMIN_SOCKET_DIR: &str = "/run/nbd-mirror";

/// Comma-separated names for messages.
pub(super) fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.collect();
    if v.is_empty() {
        "(none)".to_string()
    } else {
        v.join(", ")
    }
}

/// A string value as written in TOML (quoted and escaped).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

struct Ctx<'a> {
    file: &'a Path,
    dir: &'a Path,
}

impl Ctx<'_> {
    fn missing(&self, key: &str, expected: impl Display) -> ConfigError {
        ConfigError::MissingKey {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            expected: expected.to_string(),
        }
    }

    fn invalid(&self, key: &str, value: impl Display, expected: impl Display) -> ConfigError {
        ConfigError::InvalidValue {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    fn required<T>(&self, v: Option<T>, key: &str, expected: &str) -> Result<T, ConfigError> {
        v.ok_or_else(|| self.missing(key, expected))
    }

    fn name(&self, key: &str, s: &str) -> Result<(), ConfigError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(self.invalid(
                key,
                quoted(s),
                format!("a name of 1 to {MAX_NAME_LEN} letters, digits, '.', '_' or '-' (not starting with '.' or '-')"),
            ))
        }
    }

    /// Resolves a path relative to the config file's directory.
    fn path(&self, key: &str, s: &str) -> Result<PathBuf, ConfigError> {
        if s.is_empty() || s.contains('\0') {
            return Err(self.invalid(key, quoted(s), "a non-empty path"));
        }
        let p = Path::new(s);
        Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        })
    }

    fn socket_path(&self, key: &str, s: &str) -> Result<PathBuf, ConfigError> {
        let p = self.path(key, s)?;
        let len = p.as_os_str().len();
        if len > MAX_UNIX_SOCKET_PATH {
            return Err(self.invalid(
                key,
                quoted(s),
                format!(
                    "a unix socket path of at most {MAX_UNIX_SOCKET_PATH} bytes once resolved (sun_path limit); {} is {len} bytes",
                    p.display()
                ),
            ));
        }
        Ok(p)
    }

    fn size(&self, key: &str, v: &toml::Value) -> Result<u64, ConfigError> {
        const EXPECTED: &str = "a size in bytes: an integer or a string like \"4096\", \"64KiB\", \"256MiB\", \"1.5GiB\" (binary units B, K/KiB, M/MiB, G/GiB, T/TiB)";
        match v {
            toml::Value::Integer(i) => u64::try_from(*i).map_err(|_| {
                self.invalid(key, v, format!("{EXPECTED}; a size cannot be negative"))
            }),
            toml::Value::String(s) => {
                parse_size(s).map_err(|why| self.invalid(key, v, format!("{EXPECTED}; {why}")))
            }
            _ => Err(self.invalid(key, v, EXPECTED)),
        }
    }

    fn duration(&self, key: &str, v: &toml::Value) -> Result<Duration, ConfigError> {
        const EXPECTED: &str =
            "a duration string like \"10s\", \"500ms\", \"1m30s\" (units ns, us, ms, s, m, h)";
        let d = match v {
            toml::Value::String(s) => parse_duration(s)
                .map_err(|why| self.invalid(key, v, format!("{EXPECTED}; {why}")))?,
            _ => return Err(self.invalid(key, v, EXPECTED)),
        };
        if d.is_zero() {
            return Err(self.invalid(key, v, "a duration greater than zero"));
        }
        Ok(d)
    }

    fn port(&self, key: &str, v: i64) -> Result<u16, ConfigError> {
        match u16::try_from(v) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(self.invalid(key, v, "a TCP port number in 1..=65535")),
        }
    }

    fn power_of_two_size(
        &self,
        key: &str,
        v: Option<&toml::Value>,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let n = self.size(key, v)?;
        if !n.is_power_of_two() || n < min || n > max {
            return Err(self.invalid(
                key,
                v,
                format!(
                    "a power of two between {} and {} ({n} bytes is {})",
                    super::format_size(min),
                    super::format_size(max),
                    if n.is_power_of_two() {
                        "out of range"
                    } else {
                        "not a power of two"
                    }
                ),
            ));
        }
        Ok(n)
    }

    fn keyword<T: std::str::FromStr<Err = String>>(
        &self,
        key: &str,
        v: Option<&String>,
        default: T,
    ) -> Result<T, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => s.parse().map_err(|why: String| {
                let expected = why
                    .split(", found")
                    .next()
                    .unwrap_or(&why)
                    .trim_start_matches("expected ")
                    .to_string();
                self.invalid(key, quoted(s), expected)
            }),
        }
    }
}

/// Parses and validates `text`; `file` names the file in errors, `dir`
/// anchors relative paths.
pub(super) fn build(text: &str, file: &Path, dir: &Path) -> Result<Config, ConfigError> {
    let raw = raw::parse(text, file)?;
    let cx = Ctx { file, dir };

    let rc = cx.required(
        raw.cluster,
        "cluster",
        "a [cluster] table with at least `name`",
    )?;
    let cluster_name = cx.required(rc.name, "cluster.name", "the cluster name (a string)")?;
    cx.name("cluster.name", &cluster_name)?;

    let count = raw.server.len();
    if count == 0 || count > 2 {
        return Err(ConfigError::ServerCount {
            file: file.to_path_buf(),
            count,
        });
    }
    let mut servers: Vec<Server> = Vec::with_capacity(count);
    for (i, rs) in raw.server.into_iter().enumerate() {
        let server = build_server(&cx, i, rs, count == 1)?;
        if let Some(j) = servers.iter().position(|s| s.name == server.name) {
            return Err(ConfigError::DuplicateName {
                file: file.to_path_buf(),
                kind: "server",
                name: server.name,
                first: format!("server[{j}]"),
                second: format!("server[{i}]"),
            });
        }
        servers.push(server);
    }

    let secret_file = match rc.secret_file {
        Some(s) => Some(cx.path("cluster.secret_file", &s)?),
        None if count == 2 => {
            return Err(cx.missing(
                "cluster.secret_file",
                "the path of the shared secret file (required when two servers are declared)",
            ))
        }
        None => None,
    };
    let tls = match rc.tls {
        None => None,
        Some(t) => {
            let get = |v: Option<String>, k: &str, what: &str| -> Result<PathBuf, ConfigError> {
                let key = format!("cluster.tls.{k}");
                let s = cx.required(v, &key, what)?;
                cx.path(&key, &s)
            };
            Some(Tls {
                cert: get(t.cert, "cert", "the path of this node's certificate (PEM)")?,
                key: get(t.key, "key", "the path of this node's private key (PEM)")?,
                ca: get(
                    t.ca,
                    "ca",
                    "the path of the CA bundle that signs the peer's certificate (PEM)",
                )?,
            })
        }
    };
    if let Some(g) = &rc.admin_group {
        let ok = !g.is_empty()
            && g.len() <= 32
            && !g
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b == b':' || b == b'/');
        if !ok {
            return Err(cx.invalid(
                "cluster.admin_group",
                quoted(g),
                "a group name (no whitespace, ':' or '/')",
            ));
        }
    }
    let cluster = Cluster {
        name: cluster_name,
        secret_file,
        tls,
        admin_group: rc.admin_group,
    };

    let timeouts = build_timeouts(&cx, raw.timeouts)?;

    let mut resources: Vec<Resource> = Vec::with_capacity(raw.resource.len());
    for (i, rr) in raw.resource.into_iter().enumerate() {
        let r = build_resource(&cx, i, rr, &servers)?;
        if let Some(j) = resources.iter().position(|x| x.name == r.name) {
            return Err(ConfigError::DuplicateName {
                file: file.to_path_buf(),
                kind: "resource",
                name: r.name,
                first: format!("resource[{j}]"),
                second: format!("resource[{i}]"),
            });
        }
        resources.push(r);
    }

    let config = Config {
        path: file.to_path_buf(),
        dir: dir.to_path_buf(),
        cluster,
        timeouts,
        servers,
        resources,
    };
    check_ports(&config)?;
    check_paths(&config)?;
    Ok(config)
}

fn build_server(
    cx: &Ctx<'_>,
    i: usize,
    rs: RawServer,
    standalone: bool,
) -> Result<Server, ConfigError> {
    let name = cx.required(
        rs.name,
        &format!("server[{i}].name"),
        "the server's node name (usually its host name)",
    )?;
    cx.name(&format!("server[{i}].name"), &name)?;
    let key = format!("server.{name}");
    let address = match rs.address {
        Some(a) => {
            let k = format!("{key}.address");
            let ok = a.parse::<IpAddr>().is_ok()
                || (!a.is_empty()
                    && a.len() <= 253
                    && a.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
            if !ok {
                return Err(cx.invalid(
                    &k,
                    quoted(&a),
                    "an IP address or host name the peer uses to reach this node (no port)",
                ));
            }
            a
        }
        // Standalone: nobody connects to this node, the address is unused.
        None if standalone => "127.0.0.1".to_string(),
        None => {
            return Err(cx.missing(
                &format!("{key}.address"),
                "the IP address or host name the peer uses to reach this node",
            ))
        }
    };
    let listen_address = match rs.listen_address {
        Some(a) => {
            let k = format!("{key}.listen_address");
            match a.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() => a,
                _ => {
                    return Err(cx.invalid(
                        &k,
                        quoted(&a),
                        "a specific IP address of this node to bind the control and mirror listeners to (no port, not a wildcard like 0.0.0.0)",
                    ))
                }
            }
        }
        None => address.clone(),
    };
    let control_port = match rs.control_port {
        Some(p) => cx.port(&format!("{key}.control_port"), p)?,
        None => DEFAULT_CONTROL_PORT,
    };
    let admin_socket = match rs.admin_socket {
        Some(s) => cx.socket_path(&format!("{key}.admin_socket"), &s)?,
        None => PathBuf::from(DEFAULT_ADMIN_SOCKET_DIR).join(format!("{name}.sock")),
    };
    Ok(Server {
        name,
        address,
        listen_address,
        control_port,
        admin_socket,
    })
}

fn build_timeouts(cx: &Ctx<'_>, rt: Option<RawTimeouts>) -> Result<Timeouts, ConfigError> {
    let d = Timeouts::default();
    let Some(rt) = rt else { return Ok(d) };
    let get = |v: Option<toml::Value>, k: &str, default: Duration| match v {
        Some(v) => cx.duration(&format!("timeouts.{k}"), &v),
        None => Ok(default),
    };
    let hb_timeout_raw = rt.heartbeat_timeout.clone();
    let t = Timeouts {
        connect: get(rt.connect, "connect", d.connect)?,
        send: get(rt.send, "send", d.send)?,
        ack: get(rt.ack, "ack", d.ack)?,
        receive: get(rt.receive, "receive", d.receive)?,
        heartbeat_interval: get(
            rt.heartbeat_interval,
            "heartbeat_interval",
            d.heartbeat_interval,
        )?,
        heartbeat_timeout: get(
            rt.heartbeat_timeout,
            "heartbeat_timeout",
            d.heartbeat_timeout,
        )?,
        metadata_check_interval: get(
            rt.metadata_check_interval,
            "metadata_check_interval",
            d.metadata_check_interval,
        )?,
        io_stall: get(rt.io_stall, "io_stall", d.io_stall)?,
    };
    // One late heartbeat must not break the mirror.
    if t.heartbeat_timeout < t.heartbeat_interval * 2 {
        let shown = hb_timeout_raw
            .map(|v| v.to_string())
            .unwrap_or_else(|| quoted(&super::format_duration(t.heartbeat_timeout)));
        return Err(cx.invalid(
            "timeouts.heartbeat_timeout",
            shown,
            format!(
                "at least twice timeouts.heartbeat_interval ({}), so that one late heartbeat does not break the link",
                super::format_duration(t.heartbeat_interval)
            ),
        ));
    }
    Ok(t)
}

fn build_resource(
    cx: &Ctx<'_>,
    i: usize,
    rr: RawResource,
    servers: &[Server],
) -> Result<Resource, ConfigError> {
    let name = cx.required(
        rr.name,
        &format!("resource[{i}].name"),
        "the resource name (a string)",
    )?;
    cx.name(&format!("resource[{i}].name"), &name)?;
    let rk = format!("resource.{name}");
    let k = |s: &str| format!("{rk}.{s}");

    let size = match &rr.size {
        None => None,
        Some(v) => {
            let n = cx.size(&k("size"), v)?;
            if n == 0 || n % 4096 != 0 {
                return Err(cx.invalid(
                    &k("size"),
                    v,
                    format!("a size greater than zero and a multiple of 4KiB ({n} bytes is not)"),
                ));
            }
            Some(n)
        }
    };
    let mode = cx.keyword(&k("mode"), rr.mode.as_ref(), Mode::Sync)?;
    let region_size = cx.power_of_two_size(
        &k("region_size"),
        rr.region_size.as_ref(),
        DEFAULT_REGION_SIZE,
        MIN_REGION_SIZE,
        MAX_REGION_SIZE,
    )?;
    let auto_recovery = rr.auto_recovery.unwrap_or(true);
    let nbd_block_size_min = cx.power_of_two_size(
        &k("nbd_block_size_min"),
        rr.nbd_block_size_min.as_ref(),
        DEFAULT_NBD_BLOCK_SIZE_MIN,
        512,
        4096,
    )?;
    let nbd_max_request = match &rr.nbd_max_request {
        None => DEFAULT_NBD_MAX_REQUEST,
        Some(v) => {
            let n = cx.size(&k("nbd_max_request"), v)?;
            if !(4096..=MAX_NBD_MAX_REQUEST).contains(&n) || n % nbd_block_size_min != 0 {
                return Err(cx.invalid(
                    &k("nbd_max_request"),
                    v,
                    format!("a size between 4KiB and 1GiB that is a multiple of nbd_block_size_min ({nbd_block_size_min})"),
                ));
            }
            n
        }
    };
    let nbd_idle_poll = match &rr.nbd_idle_poll {
        None => DEFAULT_NBD_IDLE_POLL,
        Some(toml::Value::Integer(0)) => Duration::ZERO,
        Some(toml::Value::String(s)) if s == "0" || s == "off" => Duration::ZERO,
        Some(v) => {
            let d = cx.duration(&k("nbd_idle_poll"), v)?;
            if d > MAX_NBD_IDLE_POLL {
                return Err(cx.invalid(
                    &k("nbd_idle_poll"),
                    v,
                    "a duration of at most 1ms, or 0 / \"off\"",
                ));
            }
            d
        }
    };
    let async_queue = match &rr.async_queue {
        None => DEFAULT_ASYNC_QUEUE,
        Some(v) => {
            let n = cx.size(&k("async_queue"), v)?;
            if n < nbd_max_request {
                return Err(cx.invalid(
                    &k("async_queue"),
                    v,
                    format!(
                        "at least nbd_max_request ({}), so that one write fits in the queue",
                        super::format_size(nbd_max_request)
                    ),
                ));
            }
            n
        }
    };
    if rr.async_queue.is_none() && async_queue < nbd_max_request {
        return Err(cx.invalid(
            &k("nbd_max_request"),
            super::format_size(nbd_max_request),
            format!(
                "at most async_queue ({}); raise async_queue too",
                super::format_size(async_queue)
            ),
        ));
    }
    let resync_rate = match &rr.resync_rate {
        None => None,
        Some(toml::Value::String(s)) if s == "unlimited" => None,
        Some(v) => {
            let n = cx.size(&k("resync_rate"), v)?;
            if n == 0 {
                None
            } else if n < region_size {
                return Err(cx.invalid(
                    &k("resync_rate"),
                    v,
                    format!(
                        "0 or \"unlimited\", or bytes per second of at least region_size ({})",
                        super::format_size(region_size)
                    ),
                ));
            } else {
                Some(n)
            }
        }
    };
    let keep_dirty = match rr.keep_dirty {
        None => DEFAULT_KEEP_DIRTY,
        Some(n) if (1..=MAX_KEEP_DIRTY).contains(&n) => n,
        Some(n) => {
            return Err(cx.invalid(
                &k("keep_dirty"),
                n,
                format!("a number of hot extents in 1..={MAX_KEEP_DIRTY}"),
            ))
        }
    } as usize;
    let hot_extent_size = cx.power_of_two_size(
        &k("hot_extent_size"),
        rr.hot_extent_size.as_ref(),
        DEFAULT_HOT_EXTENT_SIZE.max(region_size),
        region_size,
        MAX_HOT_EXTENT_SIZE.min(region_size * bitmap::MAX_EXTENT_REGIONS),
    )?;
    // Bounds the tracker's memory for intent bits of hot extents.
    let hot_regions = keep_dirty as u64 * (hot_extent_size / region_size);
    if hot_regions > MAX_HOT_REGIONS {
        return Err(cx.invalid(
            &k("keep_dirty"),
            keep_dirty,
            format!(
                "at most {MAX_HOT_REGIONS} regions kept hot in all: keep_dirty × hot_extent_size / region_size is {hot_regions}"
            ),
        ));
    }
    let engine = cx.keyword(&k("engine"), rr.engine.as_ref(), EngineChoice::Auto)?;
    let direct_io = cx.keyword(&k("direct_io"), rr.direct_io.as_ref(), DirectIo::Auto)?;
    let write_behind = rr.write_behind.unwrap_or(true);
    let divergent_dir = match &rr.divergent_save_dir {
        Some(s) => Some(cx.path(&k("divergent_save_dir"), s)?),
        None => None,
    };

    let declared = names(servers.iter().map(|s| s.name.as_str()));
    let mut map = cx.required(
        rr.server,
        &k("server"),
        &format!("one [resource.server.NAME] section per declared server ({declared})"),
    )?;
    if let Some(undeclared) = map.keys().find(|n| !servers.iter().any(|s| &&s.name == n)) {
        return Err(ConfigError::UndeclaredServer {
            file: cx.file.to_path_buf(),
            key: format!("{rk}.server.{undeclared}"),
            name: undeclared.clone(),
            declared,
        });
    }
    let mut nodes = Vec::with_capacity(servers.len());
    for s in servers {
        let nk = format!("{rk}.server.{}", s.name);
        let rn = map.remove(&s.name).ok_or_else(|| {
            cx.missing(
                &nk,
                format!("a [resource.server.{}] section: every resource needs one per declared server ({declared})", s.name),
            )
        })?;
        nodes.push(build_node(
            cx,
            &nk,
            i,
            &name,
            s,
            rn,
            divergent_dir.as_deref(),
        )?);
    }

    Ok(Resource {
        name,
        index: i,
        size,
        mode,
        region_size,
        auto_recovery,
        async_queue,
        resync_rate,
        keep_dirty,
        hot_extent_size,
        engine,
        direct_io,
        write_behind,
        nbd_block_size_min,
        nbd_max_request,
        nbd_idle_poll,
        nodes,
    })
}

fn build_node(
    cx: &Ctx<'_>,
    nk: &str,
    index: usize,
    resource: &str,
    server: &Server,
    rn: RawNode,
    resource_divergent_dir: Option<&Path>,
) -> Result<ResourceNode, ConfigError> {
    let k = |s: &str| format!("{nk}.{s}");
    let data_path = cx.required(
        rn.data_path,
        &k("data_path"),
        "the data partition: a block device or file path",
    )?;
    let data_path = cx.path(&k("data_path"), &data_path)?;
    let cp = cx.required(
        rn.cluster_partition,
        &k("cluster_partition"),
        "the cluster partition (metadata) path: a block device or file",
    )?;
    let cluster_partition = cx.path(&k("cluster_partition"), &cp)?;
    let mirror_port = match rn.mirror_port {
        Some(p) => cx.port(&k("mirror_port"), p)?,
        None => u16::try_from(index)
            .ok()
            .and_then(|i| DEFAULT_MIRROR_PORT_BASE.checked_add(i))
            .ok_or_else(|| {
                cx.missing(
                    &k("mirror_port"),
                    "an explicit port: the default 29051 + resource index exceeds 65535",
                )
            })?,
    };
    let nbd_socket = cx.required(
        rn.nbd_socket,
        &k("nbd_socket"),
        "the unix socket path of the NBD export",
    )?;
    let nbd_socket = cx.socket_path(&k("nbd_socket"), &nbd_socket)?;
    let nbd_tcp = match rn.nbd_tcp {
        None => None,
        Some(s) => match s.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Some(a),
            _ => {
                return Err(cx.invalid(
                    &k("nbd_tcp"),
                    quoted(&s),
                    "an IP socket address with a non-zero port, like \"127.0.0.1:10809\" or \"[::1]:10809\"",
                ))
            }
        },
    };
    let opt_path = |v: Option<String>, key: &str| v.map(|s| cx.path(&k(key), &s)).transpose();
    let nbd_device = opt_path(rn.nbd_device, "nbd_device")?;
    let mount_point = opt_path(rn.mount_point, "mount_point")?;
    let fs = rn.fs.unwrap_or_else(|| "ext4".to_string());
    if fs.is_empty()
        || fs
            .bytes()
            .any(|b| !(b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    {
        return Err(cx.invalid(
            &k("fs"),
            quoted(&fs),
            "a file system type such as \"ext4\" or \"xfs\"",
        ));
    }
    if let Some(o) = &rn.mount_options {
        if o.is_empty() || o.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(cx.invalid(
                &k("mount_options"),
                quoted(o),
                "comma-separated mount options without spaces, like \"noatime,discard\"",
            ));
        }
    }
    let divergent_save_dir = match (rn.divergent_save_dir, resource_divergent_dir) {
        (Some(s), _) => cx.path(&k("divergent_save_dir"), &s)?,
        (None, Some(d)) => d.to_path_buf(),
        // Next to a file cluster partition; for a device (/dev is a
        // tmpfs, lost at reboot) under the state directory instead.
        (None, None) => {
            let base = if cluster_partition.starts_with("/dev") {
                PathBuf::from(DEFAULT_STATE_DIR)
            } else {
                cluster_partition
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .to_path_buf()
            };
            base.join("divergent")
                .join(format!("{resource}-{}", server.name))
        }
    };
    Ok(ResourceNode {
        server: server.name.clone(),
        data_path,
        cluster_partition,
        mirror_port,
        nbd_socket,
        nbd_tcp,
        nbd_device,
        mount_point,
        fs,
        mount_options: rn.mount_options,
        divergent_save_dir,
    })
}

/// Servers with the same address are taken to be the same machine.
fn host_key(address: &str) -> String {
    match address.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => address.to_ascii_lowercase(),
    }
}

struct Listener {
    host: String,
    bind: Option<IpAddr>,
    bind_text: String,
    port: u16,
    key: String,
}

fn check_ports(c: &Config) -> Result<(), ConfigError> {
    let mut ls: Vec<Listener> = Vec::new();
    let mirrored = c.servers.len() == 2;
    let host_of = |name: &str| {
        c.server(name)
            .map(|s| host_key(&s.address))
            .unwrap_or_default()
    };
    if mirrored {
        for s in &c.servers {
            ls.push(Listener {
                host: host_key(&s.address),
                bind: s.listen_address.parse().ok(),
                bind_text: s.listen_address.clone(),
                port: s.control_port,
                key: format!("server.{}.control_port", s.name),
            });
        }
    }
    for r in &c.resources {
        for n in &r.nodes {
            let s = c
                .server(&n.server)
                .expect("nodes reference declared servers");
            if mirrored {
                ls.push(Listener {
                    host: host_key(&s.address),
                    bind: s.listen_address.parse().ok(),
                    bind_text: s.listen_address.clone(),
                    port: n.mirror_port,
                    key: format!("resource.{}.server.{}.mirror_port", r.name, n.server),
                });
            }
            if let Some(a) = n.nbd_tcp {
                ls.push(Listener {
                    host: host_of(&n.server),
                    bind: Some(a.ip()),
                    bind_text: a.ip().to_string(),
                    port: a.port(),
                    key: format!("resource.{}.server.{}.nbd_tcp", r.name, n.server),
                });
            }
        }
    }
    for (j, b) in ls.iter().enumerate() {
        for a in &ls[..j] {
            let overlap = match (a.bind, b.bind) {
                (Some(x), Some(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
                _ => a.bind_text.eq_ignore_ascii_case(&b.bind_text),
            };
            if a.host == b.host && a.port == b.port && overlap {
                return Err(ConfigError::DuplicatePort {
                    file: c.path.clone(),
                    address: b.bind_text.clone(),
                    port: b.port,
                    first: a.key.clone(),
                    second: b.key.clone(),
                });
            }
        }
    }
    Ok(())
}

fn check_paths(c: &Config) -> Result<(), ConfigError> {
    // (machine, path) → first key that uses it.
    let mut seen: HashMap<(String, PathBuf), String> = HashMap::new();
    let mut add = |host: String, path: &Path, key: String| -> Result<(), ConfigError> {
        match seen.get(&(host.clone(), path.to_path_buf())) {
            Some(first) => Err(ConfigError::DuplicatePath {
                file: c.path.clone(),
                path: path.to_path_buf(),
                first: first.clone(),
                second: key,
            }),
            None => {
                seen.insert((host, path.to_path_buf()), key);
                Ok(())
            }
        }
    };
    for s in &c.servers {
        add(
            host_key(&s.address),
            &s.admin_socket,
            format!("server.{}.admin_socket", s.name),
        )?;
    }
    for r in &c.resources {
        for n in &r.nodes {
            let host = c
                .server(&n.server)
                .map(|s| host_key(&s.address))
                .unwrap_or_default();
            let key = |k: &str| format!("resource.{}.server.{}.{k}", r.name, n.server);
            add(host.clone(), &n.data_path, key("data_path"))?;
            add(host.clone(), &n.cluster_partition, key("cluster_partition"))?;
            add(host.clone(), &n.nbd_socket, key("nbd_socket"))?;
            add(
                host.clone(),
                &n.divergent_save_dir,
                key("divergent_save_dir"),
            )?;
            if let Some(d) = &n.nbd_device {
                add(host.clone(), d, key("nbd_device"))?;
            }
            if let Some(m) = &n.mount_point {
                add(host.clone(), m, key("mount_point"))?;
            }
        }
    }
    Ok(())
}
