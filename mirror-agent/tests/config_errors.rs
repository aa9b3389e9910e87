//! Cluster config: every rejected input, one test each. Each asserts the
//! variant and that the message names the file, the key path and what was
//! expected.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use mirror_agent::config::{Config, ConfigError};

/// A valid pair config (the interface example, without comments).
const BASE: &str = r#"[cluster]
name = "demo"
secret_file = "secret"

[[server]]
name = "server1"
address = "127.0.0.1"
control_port = 29004
admin_socket = "run/server1.sock"

[[server]]
name = "server2"
address = "127.0.0.1"
control_port = 29104
admin_socket = "run/server2.sock"

[[resource]]
name = "md1"
size = "256MiB"
mode = "sync"
region_size = "64KiB"
auto_recovery = true

[resource.server.server1]
data_path = "data/server1-md1.img"
cluster_partition = "data/server1-md1.cp"
mirror_port = 29051
nbd_socket = "run/server1-md1.nbd"

[resource.server.server2]
data_path = "data/server2-md1.img"
cluster_partition = "data/server2-md1.cp"
mirror_port = 29151
nbd_socket = "run/server2-md1.nbd"
"#;

const FILE: &str = "/etc/test-cluster/cluster.toml";

/// BASE with each `(from, to)` replaced once (each `from` must occur).
fn edit(edits: &[(&str, &str)]) -> String {
    let mut t = BASE.to_string();
    for (from, to) in edits {
        assert!(
            t.contains(from),
            "test bug: {from:?} not in the base config"
        );
        t = t.replacen(from, to, 1);
    }
    t
}

/// Parses `text` expecting an error whose message contains the file name and
/// every one of `needles`.
fn parse_err(text: &str, needles: &[&str]) -> ConfigError {
    let e = Config::parse(text, Path::new(FILE)).expect_err("config should be rejected");
    let msg = e.to_string();
    assert!(msg.contains(FILE), "message does not name the file: {msg}");
    for n in needles {
        assert!(msg.contains(n), "message does not contain {n:?}: {msg}");
    }
    e
}

#[test]
fn base_config_is_valid() {
    Config::parse(BASE, Path::new(FILE)).unwrap();
}

#[test]
fn unknown_key_in_cluster() {
    let e = parse_err(
        &edit(&[(
            "name = \"demo\"\n",
            "name = \"demo\"\nsecrte_file = \"x\"\n",
        )]),
        &["unknown key `cluster.secrte_file`", "secret_file", ":3:"],
    );
    assert!(
        matches!(e, ConfigError::UnknownKey { line: 3, .. }),
        "{e:?}"
    );
}

#[test]
fn unknown_key_in_resource_server_section() {
    let e = parse_err(
        &edit(&[(
            "mirror_port = 29151\n",
            "mirror_port = 29151\nnbd_sock = \"x\"\n",
        )]),
        &[
            "unknown key `resource[0].server.server2.nbd_sock`",
            "nbd_socket",
        ],
    );
    match e {
        ConfigError::UnknownKey { line, column, .. } => {
            assert_eq!(line, 34);
            assert_eq!(column, 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn resource_key_below_a_node_section_gets_a_hint() {
    parse_err(
        &format!("{BASE}mode = \"async\"\n"),
        &[
            "unknown key `resource[0].server.server2.mode`",
            "put it before the first [resource.server.NAME] section",
        ],
    );
}

#[test]
fn unknown_top_level_table() {
    let e = parse_err(
        &format!("{BASE}\n[extra]\nx = 1\n"),
        &["unknown key `extra`", "resource"],
    );
    assert!(matches!(e, ConfigError::UnknownKey { .. }), "{e:?}");
}

#[test]
fn unknown_key_in_second_server() {
    parse_err(
        &edit(&[("control_port = 29104\n", "control_port = 29104\nport = 1\n")]),
        &["unknown key `server[1].port`", "control_port"],
    );
}

#[test]
fn wrong_value_type_names_key_and_line() {
    let e = parse_err(
        &edit(&[("control_port = 29104", "control_port = \"29104\"")]),
        &["server[1].control_port", ":14:"],
    );
    assert!(matches!(e, ConfigError::Syntax { line: 14, .. }), "{e:?}");
}

#[test]
fn toml_syntax_error_names_line() {
    let e = parse_err(&edit(&[("[[resource]]", "[[resource]")]), &[":17:"]);
    assert!(matches!(e, ConfigError::Syntax { line: 17, .. }), "{e:?}");
}

#[test]
fn missing_cluster_table() {
    let text = BASE.replace("[cluster]\nname = \"demo\"\nsecret_file = \"secret\"\n", "");
    let e = parse_err(
        &text,
        &["missing key `cluster`", "expected a [cluster] table"],
    );
    assert!(matches!(e, ConfigError::MissingKey { .. }), "{e:?}");
}

#[test]
fn missing_cluster_name() {
    parse_err(
        &edit(&[("name = \"demo\"\n", "")]),
        &["missing key `cluster.name`", "expected the cluster name"],
    );
}

#[test]
fn missing_server_name() {
    parse_err(
        &edit(&[("name = \"server2\"\n", "")]),
        &["missing key `server[1].name`", "node name"],
    );
}

#[test]
fn missing_address_in_a_pair() {
    parse_err(
        &edit(&[(
            "name = \"server2\"\naddress = \"127.0.0.1\"\n",
            "name = \"server2\"\n",
        )]),
        &[
            "missing key `server.server2.address`",
            "peer uses to reach this node",
        ],
    );
}

#[test]
fn missing_secret_file_in_a_pair() {
    parse_err(
        &edit(&[("secret_file = \"secret\"\n", "")]),
        &[
            "missing key `cluster.secret_file`",
            "required when two servers are declared",
        ],
    );
}

#[test]
fn missing_data_path() {
    let e = parse_err(
        &edit(&[("data_path = \"data/server2-md1.img\"\n", "")]),
        &[
            "missing key `resource.md1.server.server2.data_path`",
            "block device or file",
        ],
    );
    assert!(matches!(e, ConfigError::MissingKey { .. }), "{e:?}");
}

#[test]
fn missing_nbd_socket() {
    parse_err(
        &edit(&[("nbd_socket = \"run/server1-md1.nbd\"\n", "")]),
        &[
            "missing key `resource.md1.server.server1.nbd_socket`",
            "unix socket",
        ],
    );
}

#[test]
fn missing_cluster_partition() {
    parse_err(
        &edit(&[("cluster_partition = \"data/server1-md1.cp\"\n", "")]),
        &[
            "missing key `resource.md1.server.server1.cluster_partition`",
            "metadata",
        ],
    );
}

#[test]
fn resource_without_section_for_a_declared_server() {
    let text = BASE
        .split("[resource.server.server2]")
        .next()
        .unwrap()
        .to_string();
    let e = parse_err(
        &text,
        &[
            "missing key `resource.md1.server.server2`",
            "one per declared server (server1, server2)",
        ],
    );
    assert!(matches!(e, ConfigError::MissingKey { .. }), "{e:?}");
}

#[test]
fn resource_without_any_server_section() {
    let text = BASE
        .split("[resource.server.server1]")
        .next()
        .unwrap()
        .to_string();
    parse_err(
        &text,
        &["missing key `resource.md1.server`", "server1, server2"],
    );
}

#[test]
fn resource_names_an_undeclared_server() {
    let e = parse_err(
        &edit(&[("[resource.server.server2]", "[resource.server.server3]")]),
        &[
            "resource.md1.server.server3",
            "server \"server3\" is not declared",
            "expected one of the declared servers: server1, server2",
        ],
    );
    assert!(matches!(e, ConfigError::UndeclaredServer { .. }), "{e:?}");
}

#[test]
fn standalone_resource_with_extra_server_section() {
    // One declared server: exactly one section allowed.
    let text = BASE.replace(
        "[[server]]\nname = \"server2\"\naddress = \"127.0.0.1\"\ncontrol_port = 29104\nadmin_socket = \"run/server2.sock\"\n",
        "",
    );
    parse_err(
        &text,
        &["resource.md1.server.server2", "not declared", "server1"],
    );
}

#[test]
fn too_many_servers() {
    let text = edit(&[(
        "[[resource]]",
        "[[server]]\nname = \"server3\"\naddress = \"127.0.0.3\"\n\n[[resource]]",
    )]);
    let e = parse_err(
        &text,
        &[
            "`server`",
            "3 servers declared",
            "expected 1 (standalone) or 2",
        ],
    );
    assert!(
        matches!(e, ConfigError::ServerCount { count: 3, .. }),
        "{e:?}"
    );
}

#[test]
fn no_servers() {
    let e = parse_err(
        "[cluster]\nname = \"x\"\n",
        &["0 servers declared", "expected 1"],
    );
    assert!(
        matches!(e, ConfigError::ServerCount { count: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn duplicate_server_names() {
    let e = parse_err(
        &edit(&[("name = \"server2\"", "name = \"server1\"")]),
        &[
            "duplicate server name \"server1\"",
            "server[0]",
            "server[1]",
            "expected each server name once",
        ],
    );
    assert!(
        matches!(e, ConfigError::DuplicateName { kind: "server", .. }),
        "{e:?}"
    );
}

#[test]
fn duplicate_resource_names() {
    let second = r#"
[[resource]]
name = "md1"
[resource.server.server1]
data_path = "data/b1.img"
cluster_partition = "data/b1.cp"
mirror_port = 29052
nbd_socket = "run/b1.nbd"
[resource.server.server2]
data_path = "data/b2.img"
cluster_partition = "data/b2.cp"
mirror_port = 29152
nbd_socket = "run/b2.nbd"
"#;
    let e = parse_err(
        &format!("{BASE}{second}"),
        &[
            "duplicate resource name \"md1\"",
            "resource[0]",
            "resource[1]",
        ],
    );
    assert!(
        matches!(
            e,
            ConfigError::DuplicateName {
                kind: "resource",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn bad_size_string_unknown_unit() {
    let e = parse_err(
        &edit(&[("size = \"256MiB\"", "size = \"256XB\"")]),
        &[
            "`resource.md1.size` = \"256XB\"",
            "expected a size in bytes",
            "unknown unit `XB`",
        ],
    );
    assert!(matches!(e, ConfigError::InvalidValue { .. }), "{e:?}");
}

#[test]
fn decimal_size_unit_is_rejected() {
    parse_err(
        &edit(&[("size = \"256MiB\"", "size = \"256MB\"")]),
        &["resource.md1.size", "\"256MB\"", "decimal unit `MB`"],
    );
}

#[test]
fn inexact_fractional_size_is_rejected() {
    parse_err(
        &edit(&[("size = \"256MiB\"", "size = \"1.3KiB\"")]),
        &[
            "resource.md1.size",
            "\"1.3KiB\"",
            "not a whole number of bytes",
        ],
    );
}

#[test]
fn size_not_multiple_of_4k() {
    parse_err(
        &edit(&[("size = \"256MiB\"", "size = 1000")]),
        &["resource.md1.size", "1000", "multiple of 4KiB"],
    );
}

#[test]
fn negative_size() {
    parse_err(
        &edit(&[("size = \"256MiB\"", "size = -4096")]),
        &["resource.md1.size", "-4096", "cannot be negative"],
    );
}

#[test]
fn region_size_not_a_power_of_two() {
    parse_err(
        &edit(&[("region_size = \"64KiB\"", "region_size = \"48KiB\"")]),
        &[
            "`resource.md1.region_size` = \"48KiB\"",
            "a power of two between 4KiB and 16MiB",
            "not a power of two",
        ],
    );
}

#[test]
fn region_size_out_of_range() {
    parse_err(
        &edit(&[("region_size = \"64KiB\"", "region_size = \"2KiB\"")]),
        &[
            "resource.md1.region_size",
            "between 4KiB and 16MiB",
            "out of range",
        ],
    );
    parse_err(
        &edit(&[("region_size = \"64KiB\"", "region_size = \"32MiB\"")]),
        &["resource.md1.region_size", "out of range"],
    );
}

#[test]
fn unknown_mode() {
    let e = parse_err(
        &edit(&[("mode = \"sync\"", "mode = \"fast\"")]),
        &[
            "`resource.md1.mode` = \"fast\"",
            "expected one of \"sync\", \"semi\", \"async\"",
        ],
    );
    assert!(matches!(e, ConfigError::InvalidValue { .. }), "{e:?}");
}

#[test]
fn unknown_engine_and_direct_io() {
    parse_err(
        &edit(&[("auto_recovery = true", "engine = \"uring\"")]),
        &[
            "resource.md1.engine",
            "\"uring\"",
            "\"auto\", \"io_uring\", \"portable\"",
        ],
    );
    parse_err(
        &edit(&[("auto_recovery = true", "direct_io = \"yes\"")]),
        &[
            "resource.md1.direct_io",
            "\"yes\"",
            "\"auto\", \"on\", \"off\"",
        ],
    );
}

#[test]
fn write_behind_not_a_boolean() {
    parse_err(
        &edit(&[("auto_recovery = true", "write_behind = \"yes\"")]),
        &["write_behind", "boolean"],
    );
}

#[test]
fn keep_dirty_zero() {
    parse_err(
        &edit(&[("auto_recovery = true", "keep_dirty = 0")]),
        &["resource.md1.keep_dirty", "1..="],
    );
}

#[test]
fn nbd_idle_poll_too_long_or_not_a_duration() {
    parse_err(
        &edit(&[("auto_recovery = true", "nbd_idle_poll = \"2ms\"")]),
        &["resource.md1.nbd_idle_poll", "\"2ms\"", "at most 1ms"],
    );
    parse_err(
        &edit(&[("auto_recovery = true", "nbd_idle_poll = 50")]),
        &["resource.md1.nbd_idle_poll", "a duration string"],
    );
}

#[test]
fn async_queue_smaller_than_max_request() {
    parse_err(
        &edit(&[("auto_recovery = true", "async_queue = \"1MiB\"")]),
        &[
            "resource.md1.async_queue",
            "\"1MiB\"",
            "at least nbd_max_request (32MiB)",
        ],
    );
}

#[test]
fn resync_rate_below_region_size() {
    parse_err(
        &edit(&[("auto_recovery = true", "resync_rate = \"1KiB\"")]),
        &["resource.md1.resync_rate", "at least region_size (64KiB)"],
    );
}

#[test]
fn nbd_block_size_min_out_of_range() {
    parse_err(
        &edit(&[("auto_recovery = true", "nbd_block_size_min = 256")]),
        &["resource.md1.nbd_block_size_min", "between 512 and 4KiB"],
    );
}

#[test]
fn bad_port_number() {
    parse_err(
        &edit(&[("control_port = 29104", "control_port = 70000")]),
        &["server.server2.control_port", "70000", "1..=65535"],
    );
    parse_err(
        &edit(&[("mirror_port = 29051", "mirror_port = 0")]),
        &["resource.md1.server.server1.mirror_port", "1..=65535"],
    );
}

#[test]
fn duplicate_port_control_vs_control() {
    let e = parse_err(
        &edit(&[("control_port = 29104", "control_port = 29004")]),
        &[
            "port 29004 on 127.0.0.1 is used twice",
            "server.server1.control_port",
            "server.server2.control_port",
        ],
    );
    assert!(
        matches!(e, ConfigError::DuplicatePort { port: 29004, .. }),
        "{e:?}"
    );
}

#[test]
fn duplicate_port_control_vs_mirror() {
    parse_err(
        &edit(&[("mirror_port = 29151", "mirror_port = 29004")]),
        &[
            "port 29004",
            "server.server1.control_port",
            "resource.md1.server.server2.mirror_port",
            "expected a distinct port",
        ],
    );
}

#[test]
fn duplicate_port_mirror_vs_mirror() {
    parse_err(
        &edit(&[("mirror_port = 29151", "mirror_port = 29051")]),
        &[
            "port 29051",
            "resource.md1.server.server1.mirror_port",
            "resource.md1.server.server2.mirror_port",
        ],
    );
}

#[test]
fn duplicate_port_nbd_tcp_wildcard_vs_mirror() {
    parse_err(
        &edit(&[(
            "mirror_port = 29151\n",
            "mirror_port = 29151\nnbd_tcp = \"0.0.0.0:29051\"\n",
        )]),
        &[
            "port 29051",
            "resource.md1.server.server1.mirror_port",
            "resource.md1.server.server2.nbd_tcp",
        ],
    );
}

#[test]
fn bad_nbd_tcp_address() {
    parse_err(
        &edit(&[(
            "mirror_port = 29151\n",
            "mirror_port = 29151\nnbd_tcp = \"localhost:10809\"\n",
        )]),
        &[
            "resource.md1.server.server2.nbd_tcp",
            "\"localhost:10809\"",
            "IP socket address",
        ],
    );
}

#[test]
fn duplicate_path_on_one_machine() {
    let e = parse_err(
        &edit(&[(
            "data_path = \"data/server2-md1.img\"",
            "data_path = \"data/server1-md1.img\"",
        )]),
        &[
            "/etc/test-cluster/data/server1-md1.img is used twice",
            "resource.md1.server.server1.data_path",
            "resource.md1.server.server2.data_path",
        ],
    );
    assert!(matches!(e, ConfigError::DuplicatePath { .. }), "{e:?}");
}

#[test]
fn data_path_equal_to_cluster_partition() {
    parse_err(
        &edit(&[(
            "cluster_partition = \"data/server1-md1.cp\"",
            "cluster_partition = \"data/server1-md1.img\"",
        )]),
        &[
            "used twice",
            "resource.md1.server.server1.data_path",
            "resource.md1.server.server1.cluster_partition",
        ],
    );
}

#[test]
fn socket_path_too_long() {
    let long = format!("run/{}.sock", "x".repeat(120));
    parse_err(
        &edit(&[(
            "admin_socket = \"run/server1.sock\"",
            &format!("admin_socket = \"{long}\""),
        )]),
        &["server.server1.admin_socket", "at most 107 bytes"],
    );
}

#[test]
fn bad_names() {
    parse_err(
        &edit(&[("name = \"md1\"", "name = \"md 1\"")]),
        &["resource[0].name", "\"md 1\"", "letters, digits"],
    );
    parse_err(
        &edit(&[("name = \"server1\"", "name = \"\"")]),
        &["server[0].name", "a name of 1 to 64"],
    );
}

#[test]
fn bad_duration_without_unit() {
    let e = parse_err(
        &format!("[timeouts]\nconnect = \"10\"\n{BASE}"),
        &[
            "`timeouts.connect` = \"10\"",
            "expected a duration string",
            "has no unit",
        ],
    );
    assert!(matches!(e, ConfigError::InvalidValue { .. }), "{e:?}");
}

#[test]
fn duration_as_integer_is_rejected() {
    parse_err(
        &format!("[timeouts]\nack = 30\n{BASE}"),
        &[
            "`timeouts.ack` = 30",
            "expected a duration string like \"10s\"",
        ],
    );
}

#[test]
fn zero_duration_is_rejected() {
    parse_err(
        &format!("[timeouts]\nsend = \"0s\"\n{BASE}"),
        &["timeouts.send", "greater than zero"],
    );
}

#[test]
fn zero_metadata_check_interval_is_rejected() {
    parse_err(
        &format!("[timeouts]\nmetadata_check_interval = \"0s\"\n{BASE}"),
        &["timeouts.metadata_check_interval", "greater than zero"],
    );
}

#[test]
fn heartbeat_timeout_too_short() {
    parse_err(
        &format!("[timeouts]\nheartbeat_interval = \"5s\"\nheartbeat_timeout = \"8s\"\n{BASE}"),
        &[
            "`timeouts.heartbeat_timeout` = \"8s\"",
            "at least twice timeouts.heartbeat_interval (5s)",
        ],
    );
}

#[test]
fn tls_table_needs_all_paths() {
    parse_err(
        &edit(&[(
            "secret_file = \"secret\"\n",
            "secret_file = \"secret\"\n[cluster.tls]\ncert = \"a.pem\"\nkey = \"k.pem\"\n",
        )]),
        &["missing key `cluster.tls.ca`", "CA bundle"],
    );
}

#[test]
fn bad_admin_group() {
    parse_err(
        &edit(&[(
            "secret_file = \"secret\"\n",
            "secret_file = \"secret\"\nadmin_group = \"a b\"\n",
        )]),
        &["cluster.admin_group", "\"a b\"", "group name"],
    );
}

#[test]
fn unknown_node() {
    let c = Config::parse(BASE, Path::new(FILE)).unwrap();
    let e = c.node_check("server9").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::UnknownNode { .. }), "{e:?}");
    for n in [
        FILE,
        "\"server9\"",
        "not a declared server",
        "server1, server2",
        "--node",
    ] {
        assert!(msg.contains(n), "{n:?} not in {msg}");
    }
}

#[test]
fn unreadable_config_file_names_path_and_os_error() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("nope.toml");
    let e = Config::load(&p).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert!(
        msg.contains("nope.toml") && msg.contains("No such file or directory"),
        "{msg}"
    );
}

/// Loads BASE from a temp dir (so the secret path is real).
fn loaded(dir: &Path) -> (Config, PathBuf) {
    let dir = dir.canonicalize().unwrap();
    let p = dir.join("cluster.toml");
    fs::write(&p, BASE).unwrap();
    (Config::load(&p).unwrap(), dir.join("secret"))
}

#[test]
fn secret_file_missing_names_path_and_os_error() {
    let t = tempfile::tempdir().unwrap();
    let (c, secret) = loaded(t.path());
    let e = c.read_secret().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::SecretUnreadable { .. }), "{e:?}");
    for n in [
        "cluster.toml",
        "cluster.secret_file",
        &secret.display().to_string(),
        "No such file or directory",
    ] {
        assert!(msg.contains(n), "{n:?} not in {msg}");
    }
}

#[test]
fn secret_file_empty() {
    let t = tempfile::tempdir().unwrap();
    let (c, secret) = loaded(t.path());
    fs::write(&secret, "\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let e = c.read_secret().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::SecretEmpty { .. }), "{e:?}");
    assert!(
        msg.contains(&secret.display().to_string())
            && msg.contains("is empty")
            && msg.contains("cluster.toml"),
        "{msg}"
    );
}

#[test]
fn secret_file_world_readable() {
    let t = tempfile::tempdir().unwrap();
    let (c, secret) = loaded(t.path());
    fs::write(&secret, "abc").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
    let e = c.read_secret().unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, ConfigError::SecretPermissions { mode: 0o644, .. }),
        "{e:?}"
    );
    assert!(
        msg.contains("0644")
            && msg.contains("chmod 600")
            && msg.contains(&secret.display().to_string()),
        "{msg}"
    );
}

#[test]
fn secret_file_too_large() {
    let t = tempfile::tempdir().unwrap();
    let (c, secret) = loaded(t.path());
    fs::write(&secret, vec![b'x'; 70_000]).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let msg = c.read_secret().unwrap_err().to_string();
    assert!(
        msg.contains("cluster.secret_file") && msg.contains("at most 65536 bytes"),
        "{msg}"
    );
}
