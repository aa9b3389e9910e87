//! Generators of valid configs for the demo and the tests: everything under
//! one directory, every port derived from a caller-chosen base so that tests
//! running in parallel never compete for a port.
//!
//! Port layout for base port `B` and resources `0..n`:
//! `server1.control_port = B`, `server2.control_port = B + 1`,
//! `resource i` mirror ports `B + 2 + 2i` (server1) and `B + 3 + 2i` (server2).
//! A standalone config uses the same numbers for server1 (they are unused).

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{format_duration, format_size, Mode, Timeouts};

/// `n` consecutive TCP ports on 127.0.0.1, each free when checked (by binding it), for an
/// example config's `base_port`; an error naming `range` if it has no such run left.
///
/// Ports come from blocks of 8 of `range`, each handed out once per process until all of
/// the range's blocks have been (then they come round again), so tests running in parallel
/// never get the same port (a port taken from the kernel with `bind(:0)` and released can
/// be handed to the next caller too). The start block depends on the process id, so that
/// processes running at the same time usually start apart.
/// Callers pick ranges below the kernel's ephemeral range (`ip_local_port_range`, 32768 and
/// up on Linux), so that no outgoing connection takes one as its source port between this
/// check and the agent's bind. The ranges in use: the agent's tests 10000-15999, the
/// `tests` crate 20000-31999, the demo 16000-19999, the vm harness 9000-9999.
pub fn free_loopback_ports(range: std::ops::Range<u16>, n: u16) -> Result<u16, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let none = || {
        format!(
            "no {n} consecutive free TCP ports on 127.0.0.1 in {}-{}",
            range.start,
            range.end.saturating_sub(1)
        )
    };
    let total = u64::from(range.end.saturating_sub(range.start)) / 8;
    let blocks = u64::from(n).div_ceil(8).max(1);
    if total < blocks {
        return Err(none());
    }
    let pid = u64::from(std::process::id());
    for _ in 0..total {
        let k = NEXT.fetch_add(blocks, Ordering::Relaxed);
        let first = (pid * 97 + k) % total;
        if first + blocks > total {
            continue;
        }
        let base = range.start + (first * 8) as u16;
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    Err(none())
}

/// What [`ExampleSpec::render`] produces. Build with [`ExampleSpec::pair`]
/// or [`ExampleSpec::standalone`], adjust the public fields, then render or
/// [`write`](ExampleSpec::write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExampleSpec {
    /// Directory holding everything (should be absolute; paths in the text
    /// are written as `dir/...`).
    pub dir: PathBuf,
    /// First port; see the module doc for the layout.
    pub base_port: u16,
    /// 2 = `server1` + `server2` on 127.0.0.1; 1 = standalone `server1`.
    pub servers: usize,
    /// Number of resources, named `md1`, `md2`, ...
    pub resources: usize,
    /// `size` of every resource.
    pub size: u64,
    /// `mode` of every resource.
    pub mode: Mode,
    /// `region_size` of every resource.
    pub region_size: u64,
    /// The `[timeouts]` table written.
    pub timeouts: Timeouts,
}

impl ExampleSpec {
    /// Two nodes on 127.0.0.1, one 256MiB sync resource `md1`.
    pub fn pair(dir: &Path, base_port: u16) -> Self {
        ExampleSpec {
            dir: dir.to_path_buf(),
            base_port,
            servers: 2,
            resources: 1,
            size: 256 << 20,
            mode: Mode::Sync,
            region_size: 64 << 10,
            timeouts: Timeouts::default(),
        }
    }

    /// One node (`server1`), one 256MiB resource `md1`, no secret.
    pub fn standalone(dir: &Path, base_port: u16) -> Self {
        ExampleSpec {
            servers: 1,
            ..ExampleSpec::pair(dir, base_port)
        }
    }

    /// The ports used: `base_port ..= last_port()`.
    ///
    /// # Panics
    /// When the layout does not fit below 65536.
    pub fn last_port(&self) -> u16 {
        let last = u32::from(self.base_port) + 3 + 2 * (self.resources.max(1) as u32 - 1);
        assert!(
            self.base_port > 0 && last <= u32::from(u16::MAX),
            "ExampleSpec: base_port {} with {} resources needs ports up to {last}",
            self.base_port,
            self.resources
        );
        last as u16
    }

    /// The config text.
    ///
    /// # Panics
    /// When `servers` is not 1 or 2, or the ports do not fit (see [`last_port`](Self::last_port)).
    pub fn render(&self) -> String {
        assert!(
            matches!(self.servers, 1 | 2),
            "ExampleSpec: servers must be 1 or 2"
        );
        self.last_port();
        let q = |p: &str| toml::Value::String(self.dir.join(p).display().to_string()).to_string();
        let b = self.base_port;
        let names = ["server1", "server2"];
        let mut t = String::new();
        let _ = writeln!(t, "[cluster]\nname = \"demo\"");
        if self.servers == 2 {
            let _ = writeln!(t, "secret_file = {}", q("secret"));
        }
        let to = &self.timeouts;
        let _ = writeln!(
            t,
            "\n[timeouts]\nconnect = \"{}\"\nsend = \"{}\"\nack = \"{}\"\nreceive = \"{}\"\nheartbeat_interval = \"{}\"\nheartbeat_timeout = \"{}\"\nmetadata_check_interval = \"{}\"\nio_stall = \"{}\"",
            format_duration(to.connect),
            format_duration(to.send),
            format_duration(to.ack),
            format_duration(to.receive),
            format_duration(to.heartbeat_interval),
            format_duration(to.heartbeat_timeout),
            format_duration(to.metadata_check_interval),
            format_duration(to.io_stall),
        );
        for (s, name) in names.iter().enumerate().take(self.servers) {
            let _ = writeln!(
                t,
                "\n[[server]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\ncontrol_port = {}\nadmin_socket = {}",
                b + s as u16,
                q(&format!("run/{name}.sock")),
            );
        }
        for r in 0..self.resources {
            let res = format!("md{}", r + 1);
            let _ = writeln!(
                t,
                "\n[[resource]]\nname = \"{res}\"\nsize = \"{}\"\nmode = \"{}\"\nregion_size = \"{}\"\nauto_recovery = true",
                format_size(self.size),
                self.mode,
                format_size(self.region_size),
            );
            for (s, name) in names.iter().enumerate().take(self.servers) {
                let _ = writeln!(
                    t,
                    "\n[resource.server.{name}]\ndata_path = {}\ncluster_partition = {}\nmirror_port = {}\nnbd_socket = {}",
                    q(&format!("data/{name}-{res}.img")),
                    q(&format!("data/{name}-{res}.cp")),
                    b + 2 + 2 * r as u16 + s as u16,
                    q(&format!("run/{name}-{res}.nbd")),
                );
            }
        }
        t
    }

    /// Creates `dir/run` and `dir/data`, writes `dir/secret` (32 random
    /// bytes, hex, mode 0600) for a pair, and `dir/cluster.toml`; returns the
    /// config path.
    pub fn write(&self) -> io::Result<PathBuf> {
        std::fs::create_dir_all(self.dir.join("run"))?;
        std::fs::create_dir_all(self.dir.join("data"))?;
        if self.servers == 2 {
            let bytes: [u8; 32] = rand::random();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(self.dir.join("secret"))?;
            // An existing file keeps its mode on open: enforce 0600.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            writeln!(f, "{hex}")?;
        }
        let path = self.dir.join("cluster.toml");
        std::fs::write(&path, self.render())?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::free_loopback_ports;

    #[test]
    fn loopback_ports_are_handed_out_once_per_process_within_the_range() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..20)
                        .map(|_| free_loopback_ports(40_000..42_000, 9).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut ports: Vec<u16> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .flat_map(|base| base..base + 9)
            .collect();
        let n = ports.len();
        assert!(
            ports.iter().all(|p| (40_000..42_000).contains(p)),
            "{ports:?}"
        );
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), n, "a port was handed out twice");
    }

    #[test]
    fn a_range_too_small_for_the_run_is_an_error_naming_it() {
        assert_eq!(
            free_loopback_ports(40_000..40_008, 9),
            Err("no 9 consecutive free TCP ports on 127.0.0.1 in 40000-40007".to_string())
        );
        assert!(free_loopback_ports(40_000..40_000, 1).is_err());
    }
}
