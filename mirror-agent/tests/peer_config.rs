//! `listen_address` of a server and the peer-link specs built from a config.

use std::sync::Arc;

use mirror_agent::config::{Config, ExampleSpec};
use mirror_agent::peer::{HelloState, LinkError, LinkSpec};
use mirror_proto::{DiskState, Features, Generation, Role};

fn state() -> mirror_agent::peer::HelloStateFn {
    Arc::new(|| HelloState {
        role: Role::Standby,
        disk_state: DiskState::UpToDate,
        generation: Generation::default(),
        features: Features::empty(),
    })
}

#[test]
fn listen_address_defaults_to_address_and_can_differ() {
    let dir = tempfile::tempdir().unwrap();
    let text = ExampleSpec::pair(dir.path(), 21000).render();
    let c = Config::parse(&text, &dir.path().join("c.toml")).unwrap();
    for s in &c.servers {
        assert_eq!(s.listen_address, s.address);
    }
    let text = text.replacen(
        "name = \"server1\"\naddress = \"127.0.0.1\"",
        "name = \"server1\"\naddress = \"127.0.0.3\"\nlisten_address = \"127.0.0.2\"",
        1,
    );
    let c = Config::parse(&text, &dir.path().join("c.toml")).unwrap();
    let s1 = c.server("server1").unwrap();
    assert_eq!(s1.address, "127.0.0.3");
    assert_eq!(s1.listen_address, "127.0.0.2");
}

#[test]
fn listen_address_must_be_a_specific_ip() {
    let dir = tempfile::tempdir().unwrap();
    let text = ExampleSpec::pair(dir.path(), 21000).render();
    for bad in ["0.0.0.0", "::", "somehost", "127.0.0.1:80"] {
        let t = text.replacen(
            "name = \"server1\"\naddress = \"127.0.0.1\"",
            &format!("name = \"server1\"\naddress = \"127.0.0.1\"\nlisten_address = \"{bad}\""),
            1,
        );
        let e = Config::parse(&t, &dir.path().join("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.server1.listen_address"), "{bad}: {e}");
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn link_specs_from_config_use_listen_and_peer_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let text = ExampleSpec::pair(dir.path(), 21000).render().replacen(
        "name = \"server1\"\naddress = \"127.0.0.1\"",
        "name = \"server1\"\naddress = \"127.0.0.3\"\nlisten_address = \"127.0.0.2\"",
        1,
    );
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, &text).unwrap();
    ExampleSpec::pair(dir.path(), 21000).write().unwrap();
    std::fs::write(&path, &text).unwrap();
    let c = Config::load(&path).unwrap();
    let secret = c.read_secret().unwrap();

    let s1 = LinkSpec::control(&c, "server1", secret.clone(), state()).unwrap();
    assert!(s1.is_dialer());
    assert_eq!(s1.listen_addr, "127.0.0.2:21000");
    assert_eq!(s1.peer_addr, "127.0.0.1:21001");
    assert_eq!(s1.resource_name(), "@control");
    let s2 = LinkSpec::control(&c, "server2", secret.clone(), state()).unwrap();
    assert!(!s2.is_dialer());
    assert_eq!(s2.peer_addr, "127.0.0.3:21000");

    let d2 = LinkSpec::data(&c, "server2", "md1", 1 << 20, secret.clone(), state()).unwrap();
    assert_eq!(d2.listen_addr, "127.0.0.1:21003");
    assert_eq!(d2.peer_addr, "127.0.0.3:21002");
    let r = d2.resource.as_ref().unwrap();
    assert_eq!(
        (r.name.as_str(), r.volume_size, r.region_size),
        ("md1", 1 << 20, 64 << 10)
    );

    let e = LinkSpec::data(&c, "server2", "nope", 1, secret.clone(), state()).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn tls_configured_reads_the_files_when_the_link_is_built() {
    // Without [cluster.tls] the links are plain TCP.
    let dir = tempfile::tempdir().unwrap();
    let path = ExampleSpec::pair(dir.path(), 21000).write().unwrap();
    let mut c = Config::load(&path).unwrap();
    let secret = c.read_secret().unwrap();
    let s = LinkSpec::control(&c, "server1", secret.clone(), state()).unwrap();
    assert!(s.tls.is_none());
    // With it, the files are read and checked when a link spec is built (agent start): a
    // missing file is an error naming the key and the file, not a link that never connects.
    c.cluster.tls = Some(mirror_agent::config::Tls {
        cert: dir.path().join("missing.crt"),
        key: dir.path().join("node.key"),
        ca: dir.path().join("ca.pem"),
    });
    for e in [
        LinkSpec::control(&c, "server1", secret.clone(), state()).unwrap_err(),
        LinkSpec::data(&c, "server2", "md1", 1 << 20, secret.clone(), state()).unwrap_err(),
    ] {
        assert!(matches!(e, LinkError::TlsConfig(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("cluster.tls.cert")
                && msg.contains(&dir.path().join("missing.crt").display().to_string())
                && msg.contains("cannot read"),
            "{msg}"
        );
    }
    // (Working TLS links, and every other file problem: tests/peer_tls.rs.)
}
