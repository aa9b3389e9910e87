//! TLS material for peer-link tests: a throw-away CA made at test time
//! (rcgen), node certificates (dNSName = the node name, optionally expired),
//! and per-node config files with a `[cluster.tls]` table.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::mirror::MirrorPair;
use crate::TestCluster;

/// A certificate authority for one test.
pub struct Ca {
    key: KeyPair,
    /// The CA's certificate (PEM via `pem()`).
    pub cert: rcgen::Certificate,
}

impl Ca {
    /// A new self-signed CA.
    pub fn new() -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "nbd-mirror test CA");
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca { key, cert }
    }

    /// Writes `dir/NODE.crt`, `dir/NODE.key` (a certificate for dNSName `node`).
    pub fn issue(&self, dir: &Path, node: &str, expired: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("node key");
        let mut p = CertificateParams::new(vec![node.to_string()]).expect("node params");
        p.distinguished_name.push(DnType::CommonName, node);
        if expired {
            p.not_before = rcgen::date_time_ymd(2001, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 6, 30);
        }
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("node certificate");
        let (c, k) = (
            dir.join(format!("{node}.crt")),
            dir.join(format!("{node}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("writing certificate");
        std::fs::write(&k, key.serialize_pem()).expect("writing key");
        (c, k)
    }
}

/// `text` with a `[cluster.tls]` table for these files.
pub fn with_tls(text: &str, cert: &Path, key: &Path, ca: &Path) -> String {
    let q = |p: &Path| toml_string(&p.display().to_string());
    format!(
        "{text}\n[cluster.tls]\ncert = {}\nkey = {}\nca = {}\n",
        q(cert),
        q(key),
        q(ca)
    )
}

/// `s` as a TOML basic string.
pub fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Per-node config files with TLS: `(server1's view, server2's view)`; `plain2` leaves
/// server2 without `[cluster.tls]`, `expired1` gives server1 an expired certificate.
pub fn tls_configs(c: &TestCluster, plain2: bool, expired1: bool) -> (TestCluster, TestCluster) {
    let tls_dir = c.dir().join("tls");
    std::fs::create_dir_all(&tls_dir).expect("tls dir");
    let ca = Ca::new();
    let ca_path = tls_dir.join("ca.pem");
    std::fs::write(&ca_path, ca.cert.pem()).expect("writing CA");
    let (c1, k1) = ca.issue(&tls_dir, "server1", expired1);
    let (c2, k2) = ca.issue(&tls_dir, "server2", false);
    let text = c.config_text();
    let one = c.with_config_text("server1.toml", &with_tls(&text, &c1, &k1, &ca_path));
    let two = if plain2 {
        c.with_config_text("server2.toml", &text)
    } else {
        c.with_config_text("server2.toml", &with_tls(&text, &c2, &k2, &ca_path))
    };
    (one, two)
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Default for Ca {
    fn default() -> Self {
        Ca::new()
    }
}

/// Starts both agents of the configured pair `c` with TLS on their peer
/// links ([`tls_configs`], valid certificates), ready, and both having logged
/// that their links use TLS. The pair's `c` is server1's view.
pub fn start_pair(c: &TestCluster) -> MirrorPair {
    let t = std::time::Duration::from_secs(15);
    let (c1, c2) = tls_configs(c, false, false);
    let mut a1 = c1.spawn_agent_on("server1");
    let mut a2 = c2.spawn_agent_on("server2");
    a1.wait_ready();
    a2.wait_ready();
    a1.wait_for_log("peer link uses TLS 1.3", t);
    a2.wait_for_log("peer link uses TLS 1.3", t);
    MirrorPair { c: c1, a1, a2 }
}
