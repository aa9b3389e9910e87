//! Cluster config: what valid files load to (values, defaults, path
//! resolution, standalone), the shared secret, and the example generators.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mirror_agent::config::{
    default_node_name, format_duration, format_size, parse_duration, parse_size, Config,
    ConfigError, DirectIo, EngineChoice, ExampleSpec, Mode, Timeouts,
};
use proptest::prelude::*;

/// The example from the interface specification, verbatim.
const BRIEF_EXAMPLE: &str = r#"
[cluster]
name = "demo"
secret_file = "secret"            # shared secret for peer authentication

[[server]]
name = "server1"
address = "127.0.0.1"             # how the peer reaches this node
control_port = 29004              # agent-to-agent control (the ancestor's 29004)
admin_socket = "run/server1.sock" # mdctrl talks to the local agent here

[[server]]
name = "server2"
address = "127.0.0.1"
control_port = 29104
admin_socket = "run/server2.sock"

[[resource]]
name = "md1"
size = "256MiB"                   # needed only when the data path does not exist yet
mode = "sync"                     # sync | semi | async
region_size = "64KiB"
auto_recovery = true

[resource.server.server1]
data_path = "data/server1-md1.img"          # data partition: block device or file
cluster_partition = "data/server1-md1.cp"   # metadata: superblocks + bitmap
mirror_port = 29051                         # this resource's mirror data port
nbd_socket = "run/server1-md1.nbd"          # NBD export (unix socket)
# nbd_tcp = "127.0.0.1:10809"  nbd_device = "/dev/nbd0"  mount_point = "/mnt/md1"  fs = "ext4"

[resource.server.server2]
data_path = "data/server2-md1.img"
cluster_partition = "data/server2-md1.cp"
mirror_port = 29151
nbd_socket = "run/server2-md1.nbd"
"#;

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("cluster.toml");
    fs::write(&p, text).unwrap();
    p
}

fn canonical_tempdir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().canonicalize().unwrap();
    (t, d)
}

#[test]
fn brief_example_parses_with_expected_values() {
    let (_t, dir) = canonical_tempdir();
    let path = write_config(&dir, BRIEF_EXAMPLE);
    let c = Config::load(&path).unwrap();

    assert_eq!(c.path, path);
    assert_eq!(c.dir, dir);
    assert_eq!(c.cluster.name, "demo");
    assert_eq!(
        c.cluster.secret_file.as_deref(),
        Some(dir.join("secret").as_path())
    );
    assert_eq!(c.cluster.tls, None);
    assert_eq!(c.cluster.admin_group, None);
    assert_eq!(c.admin_socket_mode(), 0o600);
    assert_eq!(c.timeouts, Timeouts::default());
    assert!(!c.is_standalone());

    assert_eq!(c.servers.len(), 2);
    let s1 = c.server("server1").unwrap();
    assert_eq!(s1.address, "127.0.0.1");
    assert_eq!(s1.control_port, 29004);
    assert_eq!(s1.admin_socket, dir.join("run/server1.sock"));
    let s2 = c.server("server2").unwrap();
    assert_eq!(s2.control_port, 29104);
    assert_eq!(s2.admin_socket, dir.join("run/server2.sock"));
    assert!(c.server("server3").is_none());
    assert_eq!(c.peer("server1").unwrap().name, "server2");
    assert_eq!(c.peer("server2").unwrap().name, "server1");
    assert!(c.peer("nobody").is_none());

    let r = c.resource("md1").unwrap();
    assert!(c.resource("md2").is_none());
    assert_eq!(r.index, 0);
    assert_eq!(r.size, Some(256 << 20));
    assert_eq!(r.mode, Mode::Sync);
    assert_eq!(r.region_size, 64 << 10);
    assert!(r.auto_recovery);
    assert!(r.is_mirrored());
    assert_eq!(r.peer_of("server1"), Some("server2"));
    assert_eq!(r.peer_of("server2"), Some("server1"));
    assert_eq!(r.peer_of("server3"), None);
    assert_eq!(r.peer_node("server1").unwrap().server, "server2");

    let n1 = r.node("server1").unwrap();
    assert_eq!(n1.server, "server1");
    assert_eq!(n1.data_path, dir.join("data/server1-md1.img"));
    assert_eq!(n1.cluster_partition, dir.join("data/server1-md1.cp"));
    assert_eq!(n1.mirror_port, 29051);
    assert_eq!(n1.nbd_socket, dir.join("run/server1-md1.nbd"));
    let n2 = r.node("server2").unwrap();
    assert_eq!(n2.mirror_port, 29151);
    assert_eq!(n2.data_path, dir.join("data/server2-md1.img"));
    assert!(r.node("server3").is_none());
    // Node order follows server declaration order.
    assert_eq!(
        r.nodes
            .iter()
            .map(|n| n.server.as_str())
            .collect::<Vec<_>>(),
        ["server1", "server2"]
    );
}

#[test]
fn defaults_are_filled_in() {
    let (_t, dir) = canonical_tempdir();
    let c = Config::load(&write_config(&dir, BRIEF_EXAMPLE)).unwrap();
    let r = c.resource("md1").unwrap();
    assert_eq!(r.async_queue, 64 << 20);
    assert_eq!(r.resync_rate, None);
    assert_eq!(r.keep_dirty, 1024);
    assert_eq!(r.hot_extent_size, 4 << 20);
    assert_eq!(r.engine, EngineChoice::Auto);
    assert_eq!(r.direct_io, DirectIo::Auto);
    assert!(r.write_behind);
    assert_eq!(r.nbd_block_size_min, 512);
    assert_eq!(r.nbd_max_request, 32 << 20);
    assert_eq!(r.nbd_idle_poll, std::time::Duration::from_micros(50));
    let n = r.node("server1").unwrap();
    assert_eq!(n.nbd_tcp, None);
    assert_eq!(n.nbd_device, None);
    assert_eq!(n.mount_point, None);
    assert_eq!(n.fs, "ext4");
    assert_eq!(n.mount_options, None);
    assert_eq!(n.divergent_save_dir, dir.join("data/divergent/md1-server1"));
    assert_eq!(
        r.node("server2").unwrap().divergent_save_dir,
        dir.join("data/divergent/md1-server2")
    );

    let t = c.timeouts;
    assert_eq!(t.connect, Duration::from_secs(10));
    assert_eq!(t.send, Duration::from_secs(30));
    assert_eq!(t.ack, Duration::from_secs(30));
    assert_eq!(t.receive, Duration::from_secs(60));
    assert_eq!(t.heartbeat_interval, Duration::from_secs(2));
    assert_eq!(t.heartbeat_timeout, Duration::from_secs(10));
    assert_eq!(t.metadata_check_interval, Duration::from_secs(30));
    assert_eq!(t.io_stall, Duration::from_secs(30));
}

#[test]
fn minimal_pair_gets_default_ports_mode_and_region() {
    let text = r#"
[cluster]
name = "c"
secret_file = "/etc/nbd-mirror/secret"
[[server]]
name = "a"
address = "10.0.0.1"
[[server]]
name = "b"
address = "10.0.0.2"
[[resource]]
name = "r0"
[resource.server.a]
data_path = "/dev/sdb1"
cluster_partition = "/dev/sdb2"
nbd_socket = "/run/nbd-mirror/r0.nbd"
[resource.server.b]
data_path = "/dev/sdb1"
cluster_partition = "/dev/sdb2"
nbd_socket = "/run/nbd-mirror/r0.nbd"
[[resource]]
name = "r1"
[resource.server.a]
data_path = "/dev/sdc1"
cluster_partition = "/dev/sdc2"
nbd_socket = "/run/nbd-mirror/r1.nbd"
[resource.server.b]
data_path = "/dev/sdc1"
cluster_partition = "/dev/sdc2"
nbd_socket = "/run/nbd-mirror/r1.nbd"
"#;
    let c = Config::parse(text, Path::new("/etc/nbd-mirror/cluster.toml")).unwrap();
    assert_eq!(c.server("a").unwrap().control_port, 29004);
    assert_eq!(c.server("b").unwrap().control_port, 29004);
    assert_eq!(
        c.server("a").unwrap().admin_socket,
        Path::new("/run/nbd-mirror/a.sock")
    );
    let r0 = c.resource("r0").unwrap();
    let r1 = c.resource("r1").unwrap();
    assert_eq!(r0.node("a").unwrap().mirror_port, 29051);
    assert_eq!(r0.node("b").unwrap().mirror_port, 29051);
    assert_eq!(r1.index, 1);
    assert_eq!(r1.node("a").unwrap().mirror_port, 29052);
    assert_eq!(r0.mode, Mode::Sync);
    assert_eq!(r0.region_size, 65536);
    assert_eq!(r0.size, None);
    assert!(r0.auto_recovery);
    assert_eq!(
        r0.node("a").unwrap().divergent_save_dir,
        Path::new("/var/lib/nbd-mirror/divergent/r0-a")
    );
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let (_t, dir) = canonical_tempdir();
    let sub = dir.join("etc");
    fs::create_dir_all(&sub).unwrap();
    let text = BRIEF_EXAMPLE
        .replace("\"data/server1-md1.img\"", "\"../img/one.img\"")
        .replace("\"data/server2-md1.cp\"", "\"/abs/two.cp\"");
    write_config(&sub, &text);
    // Load through a path with a `..` component: the directory is canonical.
    let c = Config::load(&sub.join("..").join("etc").join("cluster.toml")).unwrap();
    assert_eq!(c.dir, sub);
    assert_eq!(c.path, sub.join("cluster.toml"));
    let r = c.resource("md1").unwrap();
    assert_eq!(
        r.node("server1").unwrap().data_path,
        sub.join("../img/one.img")
    );
    assert_eq!(
        r.node("server2").unwrap().cluster_partition,
        Path::new("/abs/two.cp")
    );
    assert_eq!(
        c.cluster.secret_file.as_deref(),
        Some(sub.join("secret").as_path())
    );
    assert_eq!(
        c.server("server1").unwrap().admin_socket,
        sub.join("run/server1.sock")
    );

    // `parse` anchors at the given path's directory without touching the disk.
    let c2 = Config::parse(&text, Path::new("/nonexistent/conf/cluster.toml")).unwrap();
    assert_eq!(
        c2.resource("md1")
            .unwrap()
            .node("server2")
            .unwrap()
            .data_path,
        Path::new("/nonexistent/conf/data/server2-md1.img")
    );
}

#[test]
fn standalone_config() {
    let text = r#"
[cluster]
name = "solo"

[[server]]
name = "only"

[[resource]]
name = "md1"
size = "1GiB"
[resource.server.only]
data_path = "data.img"
cluster_partition = "data.cp"
nbd_socket = "md1.nbd"
"#;
    let (_t, dir) = canonical_tempdir();
    let c = Config::load(&write_config(&dir, text)).unwrap();
    assert!(c.is_standalone());
    assert_eq!(c.servers.len(), 1);
    let s = c.node_check("only").unwrap();
    assert_eq!(s.address, "127.0.0.1");
    assert!(c.peer("only").is_none());
    let r = c.resource("md1").unwrap();
    assert!(!r.is_mirrored());
    assert_eq!(r.peer_of("only"), None);
    assert_eq!(r.size, Some(1 << 30));
    let n = r.node("only").unwrap();
    assert_eq!(n.mirror_port, 29051);
    assert_eq!(n.data_path, dir.join("data.img"));
    assert_eq!(c.cluster.secret_file, None);
    let e = c.read_secret().unwrap_err();
    assert!(matches!(e, ConfigError::NoSecret { .. }), "{e}");
    assert!(e.to_string().contains("cluster.secret_file"), "{e}");
}

#[test]
fn every_optional_key() {
    let text = r#"
[cluster]
name = "full"
secret_file = "/etc/nbd-mirror/secret"
admin_group = "mirroradm"
[cluster.tls]
cert = "tls/node.crt"
key = "tls/node.key"
ca = "/etc/ssl/ca.pem"

[timeouts]
connect = "5s"
send = "1m"
ack = "1.5s"
receive = "1m30s"
heartbeat_interval = "500ms"
heartbeat_timeout = "3s"
metadata_check_interval = "2m"
io_stall = "45s"

[[server]]
name = "a"
address = "192.0.2.1"
control_port = 30000
admin_socket = "/run/a.sock"
[[server]]
name = "b"
address = "192.0.2.2"

[[resource]]
name = "db"
size = 1073741824
mode = "async"
region_size = "1M"
auto_recovery = false
async_queue = "128MiB"
resync_rate = "100MiB"
keep_dirty = 256
engine = "portable"
direct_io = "off"
write_behind = false
nbd_block_size_min = 4096
nbd_max_request = "1MiB"
nbd_idle_poll = "20us"
divergent_save_dir = "/var/lib/nbd-mirror/divergent"
[resource.server.a]
data_path = "/dev/vdb"
cluster_partition = "/dev/vdc"
mirror_port = 31000
nbd_socket = "/run/db.nbd"
nbd_tcp = "0.0.0.0:10809"
nbd_device = "/dev/nbd0"
mount_point = "/mnt/db"
fs = "xfs"
mount_options = "noatime,discard"
[resource.server.b]
data_path = "/dev/vdb"
cluster_partition = "/dev/vdc"
nbd_socket = "/run/db.nbd"
nbd_tcp = "[::1]:10809"
divergent_save_dir = "/srv/divergent"

[[resource]]
name = "semi"
mode = "semi"
resync_rate = "unlimited"
engine = "io_uring"
direct_io = "on"
[resource.server.a]
data_path = "/dev/vdd"
cluster_partition = "/dev/vde"
nbd_socket = "/run/semi.nbd"
[resource.server.b]
data_path = "/dev/vdd"
cluster_partition = "/dev/vde"
nbd_socket = "/run/semi.nbd"
"#;
    let c = Config::parse(text, Path::new("/etc/nbd-mirror/cluster.toml")).unwrap();
    assert_eq!(c.cluster.admin_group.as_deref(), Some("mirroradm"));
    assert_eq!(c.admin_socket_mode(), 0o660);
    let tls = c.cluster.tls.as_ref().unwrap();
    assert_eq!(tls.cert, Path::new("/etc/nbd-mirror/tls/node.crt"));
    assert_eq!(tls.key, Path::new("/etc/nbd-mirror/tls/node.key"));
    assert_eq!(tls.ca, Path::new("/etc/ssl/ca.pem"));
    let t = c.timeouts;
    assert_eq!(t.connect, Duration::from_secs(5));
    assert_eq!(t.send, Duration::from_secs(60));
    assert_eq!(t.ack, Duration::from_millis(1500));
    assert_eq!(t.receive, Duration::from_secs(90));
    assert_eq!(t.heartbeat_interval, Duration::from_millis(500));
    assert_eq!(t.heartbeat_timeout, Duration::from_secs(3));
    assert_eq!(t.metadata_check_interval, Duration::from_secs(120));
    assert_eq!(t.io_stall, Duration::from_secs(45));
    assert_eq!(c.server("a").unwrap().control_port, 30000);
    assert_eq!(c.server("b").unwrap().control_port, 29004);

    let r = c.resource("db").unwrap();
    assert_eq!(r.size, Some(1 << 30));
    assert_eq!(r.mode, Mode::Async);
    assert_eq!(r.region_size, 1 << 20);
    assert!(!r.auto_recovery);
    assert_eq!(r.async_queue, 128 << 20);
    assert_eq!(r.resync_rate, Some(100 << 20));
    assert_eq!(r.keep_dirty, 256);
    assert_eq!(r.engine, EngineChoice::Portable);
    assert_eq!(r.direct_io, DirectIo::Off);
    assert!(!r.write_behind);
    assert_eq!(r.nbd_block_size_min, 4096);
    assert_eq!(r.nbd_max_request, 1 << 20);
    assert_eq!(r.nbd_idle_poll, std::time::Duration::from_micros(20));
    let a = r.node("a").unwrap();
    assert_eq!(a.mirror_port, 31000);
    assert_eq!(a.nbd_tcp, Some("0.0.0.0:10809".parse().unwrap()));
    assert_eq!(a.nbd_device.as_deref(), Some(Path::new("/dev/nbd0")));
    assert_eq!(a.mount_point.as_deref(), Some(Path::new("/mnt/db")));
    assert_eq!(a.fs, "xfs");
    assert_eq!(a.mount_options.as_deref(), Some("noatime,discard"));
    assert_eq!(
        a.divergent_save_dir,
        Path::new("/var/lib/nbd-mirror/divergent")
    );
    let b = r.node("b").unwrap();
    assert_eq!(b.mirror_port, 29051);
    assert_eq!(b.nbd_tcp, Some("[::1]:10809".parse().unwrap()));
    assert_eq!(b.divergent_save_dir, Path::new("/srv/divergent"));

    let s = c.resource("semi").unwrap();
    assert_eq!(s.mode, Mode::Semi);
    assert_eq!(s.resync_rate, None);
    assert_eq!(s.engine, EngineChoice::IoUring);
    assert_eq!(s.direct_io, DirectIo::On);
    assert_eq!(s.node("a").unwrap().mirror_port, 29052);
}

#[test]
fn exact_fractional_sizes_are_accepted() {
    let text = BRIEF_EXAMPLE.replace("size = \"256MiB\"", "size = \"1.5GiB\"");
    let c = Config::parse(&text, Path::new("/x/cluster.toml")).unwrap();
    assert_eq!(c.resource("md1").unwrap().size, Some(3 << 29));
}

#[test]
fn same_ports_on_different_addresses_are_fine() {
    let text = BRIEF_EXAMPLE
        .replacen("address = \"127.0.0.1\"", "address = \"127.0.0.2\"", 1)
        .replace("control_port = 29104", "control_port = 29004")
        .replace("mirror_port = 29151", "mirror_port = 29051");
    let c = Config::parse(&text, Path::new("/x/cluster.toml")).unwrap();
    assert_eq!(
        c.server("server1").unwrap().control_port,
        c.server("server2").unwrap().control_port
    );
}

#[test]
fn standalone_mirror_port_is_not_a_listener() {
    // With no peer nothing listens on control/mirror ports, so an NBD TCP
    // export may use the same number.
    let text = r#"
[cluster]
name = "solo"
[[server]]
name = "only"
[[resource]]
name = "md1"
[resource.server.only]
data_path = "d"
cluster_partition = "c"
nbd_socket = "s"
nbd_tcp = "127.0.0.1:29051"
"#;
    Config::parse(text, Path::new("/x/cluster.toml")).unwrap();
}

#[test]
fn secret_is_read_lazily_and_trailing_newline_dropped() {
    let (_t, dir) = canonical_tempdir();
    let path = write_config(&dir, BRIEF_EXAMPLE);
    // Loading does not need the secret.
    let c = Config::load(&path).unwrap();
    let secret = dir.join("secret");
    fs::write(&secret, b"s3cret\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(c.read_secret().unwrap().as_bytes(), b"s3cret");
    fs::write(&secret, b"two\r\n").unwrap();
    assert_eq!(c.read_secret().unwrap().as_bytes(), b"two");
    fs::write(&secret, b"\x00\xffbinary").unwrap();
    assert_eq!(c.read_secret().unwrap().as_bytes(), b"\x00\xffbinary");
    // Group access is allowed (for admin_group).
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o640)).unwrap();
    let s = c.read_secret().unwrap();
    assert!(
        !format!("{s:?}").contains("binary"),
        "Debug must not print the secret"
    );
}

#[test]
fn node_check_accepts_declared_servers() {
    let c = Config::parse(BRIEF_EXAMPLE, Path::new("/x/cluster.toml")).unwrap();
    assert_eq!(c.node_check("server2").unwrap().name, "server2");
    assert_eq!(c.server_names(), "server1, server2");
}

#[test]
fn default_path_and_node_name() {
    assert_eq!(
        Config::default_path(),
        Path::new("/etc/nbd-mirror/cluster.toml")
    );
    let n = default_node_name();
    assert!(!n.is_empty());
    let proc_name = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(n, proc_name.trim());
}

#[test]
fn example_pair_loads_and_uses_the_given_ports() {
    let (_t, dir) = canonical_tempdir();
    let text = Config::example_pair(&dir, 41000);
    let c = Config::parse(&text, &dir.join("cluster.toml")).unwrap();
    assert!(!c.is_standalone());
    assert_eq!(c.server("server1").unwrap().control_port, 41000);
    assert_eq!(c.server("server2").unwrap().control_port, 41001);
    let r = c.resource("md1").unwrap();
    assert_eq!(r.node("server1").unwrap().mirror_port, 41002);
    assert_eq!(r.node("server2").unwrap().mirror_port, 41003);
    assert_eq!(
        r.node("server1").unwrap().data_path,
        dir.join("data/server1-md1.img")
    );
    assert_eq!(r.size, Some(256 << 20));
    assert_eq!(ExampleSpec::pair(&dir, 41000).last_port(), 41003);

    let path = ExampleSpec::pair(&dir, 41000).write().unwrap();
    assert_eq!(path, dir.join("cluster.toml"));
    let c = Config::load(&path).unwrap();
    assert_eq!(c.read_secret().unwrap().as_bytes().len(), 64);
    assert!(dir.join("run").is_dir() && dir.join("data").is_dir());
    let mode = fs::metadata(dir.join("secret"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn example_spec_variants_load() {
    let (_t, dir) = canonical_tempdir();
    let text = Config::example_standalone(&dir, 42000);
    let c = Config::parse(&text, &dir.join("cluster.toml")).unwrap();
    assert!(c.is_standalone());
    assert_eq!(c.cluster.secret_file, None);

    let mut spec = ExampleSpec::pair(&dir, 43000);
    spec.resources = 3;
    spec.mode = Mode::Async;
    spec.size = 64 << 20;
    spec.region_size = 4096;
    spec.timeouts.heartbeat_interval = Duration::from_millis(100);
    spec.timeouts.heartbeat_timeout = Duration::from_millis(500);
    spec.timeouts.connect = Duration::from_secs(1);
    let c = Config::parse(&spec.render(), &dir.join("cluster.toml")).unwrap();
    assert_eq!(c.resources.len(), 3);
    assert_eq!(c.timeouts, spec.timeouts);
    let md3 = c.resource("md3").unwrap();
    assert_eq!(md3.mode, Mode::Async);
    assert_eq!(md3.size, Some(64 << 20));
    assert_eq!(md3.region_size, 4096);
    assert_eq!(md3.node("server2").unwrap().mirror_port, 43000 + 3 + 2 * 2);
    assert_eq!(spec.last_port(), 43007);
}

#[test]
fn example_paths_with_quotes_are_escaped() {
    let dir = Path::new("/tmp/we\"ird dir\\x");
    let c = Config::parse(&Config::example_pair(dir, 44000), &dir.join("cluster.toml")).unwrap();
    assert_eq!(
        c.cluster.secret_file.as_deref(),
        Some(dir.join("secret").as_path())
    );
}

proptest! {
    #[test]
    fn size_format_parse_round_trip(n in any::<u64>()) {
        prop_assert_eq!(parse_size(&format_size(n)), Ok(n));
    }

    #[test]
    fn size_units_scale_exactly(n in 0u64..1 << 20, unit in 0usize..5) {
        let (suffix, mult) = [("", 1u64), ("KiB", 1 << 10), ("M", 1 << 20), ("GiB", 1 << 30), ("t", 1 << 40)][unit];
        let expected = n.checked_mul(mult);
        let got = parse_size(&format!("{n}{suffix}")).ok();
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn half_units_are_exact(n in 0u64..1 << 20) {
        prop_assert_eq!(parse_size(&format!("{n}.5KiB")), Ok(n * 1024 + 512));
    }

    #[test]
    fn duration_format_parse_round_trip(ns in 0u64..u64::MAX / 2) {
        let d = Duration::from_nanos(ns);
        prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }

    #[test]
    fn size_parser_never_panics(s in "\\PC{0,24}") {
        let _ = parse_size(&s);
        let _ = parse_duration(&s);
    }
}

#[test]
fn nbd_idle_poll_can_be_switched_off() {
    for off in [
        "nbd_idle_poll = 0",
        "nbd_idle_poll = \"0\"",
        "nbd_idle_poll = \"off\"",
    ] {
        let (_t, dir) = canonical_tempdir();
        let text =
            BRIEF_EXAMPLE.replacen("name = \"md1\"\n", &format!("name = \"md1\"\n{off}\n"), 1);
        assert!(text.contains(off));
        let c = Config::load(&write_config(&dir, &text)).unwrap();
        assert_eq!(
            c.resource("md1").unwrap().nbd_idle_poll,
            std::time::Duration::ZERO,
            "{off}"
        );
    }
}
