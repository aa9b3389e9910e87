//! TLS on the peer links over real TCP on 127.0.0.1, with certificates made at test time
//! (rcgen): frames flow over TLS on data and control links; a certificate from another CA,
//! for another node name or expired is refused (both directions); a plain peer at a TLS node
//! and a TLS peer at a plain node are refused, each side naming the cause; the shared secret
//! is still checked inside TLS; unusable `[cluster.tls]` files are start-up errors naming the
//! file.
//!
//! Node "alpha" sorts lower and dials, node "beta" accepts.

mod peer_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use mirror_agent::config::{Config, ConfigError, ExampleSpec, Secret, Timeouts, Tls, TlsMaterial};
use mirror_agent::peer::{HelloState, HelloStateFn, LinkError, LinkSpec, LinkState, PeerTls};
use mirror_proto::{DiskState, Features, Generation, Message, Role};
use peer_common::{assert_delivered, closed_reason, free_ports, recv_frame, write_bytes, Pair};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::RootCertStore;

const VOLUME: u64 = 256 << 20;

fn timeouts() -> Timeouts {
    peer_common::timeouts(Duration::from_secs(2))
}

fn state(role: Role) -> HelloStateFn {
    Arc::new(move || HelloState {
        role,
        disk_state: DiskState::UpToDate,
        generation: Generation::default(),
        features: Features::empty(),
    })
}

/// A CA made at test time.
struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl Ca {
    fn new(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.self_signed(&key).unwrap();
        Ca { key, cert }
    }

    /// A node certificate for `names` (subjectAltName dNSName); `expired` = valid in 2000 only.
    fn issue(&self, names: &[&str], expired: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        if expired {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2000, 12, 31);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf { key, cert }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

struct Leaf {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl Leaf {
    /// TLS settings from this leaf and `ca`, built directly (bypassing the start-up file
    /// checks, to present what a misconfigured or malicious peer could).
    fn peer_tls(&self, ca: &Ca) -> Arc<PeerTls> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let m = TlsMaterial {
            cert_chain: vec![self.cert.der().clone()],
            key: PrivateKeyDer::from(PrivatePkcs8KeyDer::from(self.key.serialize_der())),
            roots: Arc::new(roots),
            not_after: SystemTime::now(),
            files: Tls {
                cert: "/test/cert.pem".into(),
                key: "/test/key.pem".into(),
                ca: "/test/ca.pem".into(),
            },
        };
        Arc::new(PeerTls::new(m).unwrap())
    }

    /// Writes `NAME.crt` and `NAME.key` under `dir`; returns the paths.
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, self.cert.pem()).unwrap();
        std::fs::write(&k, self.key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A two-node config (alpha, beta) with free ports, loaded, plus its secret.
struct Setup {
    dir: tempfile::TempDir,
    config: Config,
    secret: Secret,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let path = ExampleSpec::pair(dir.path(), free_ports(4))
            .write()
            .unwrap();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("server1", "alpha")
            .replace("server2", "beta");
        std::fs::write(&path, text).unwrap();
        let mut config = Config::load(&path).unwrap();
        config.timeouts = timeouts();
        let secret = config.read_secret().unwrap();
        Setup {
            dir,
            config,
            secret,
        }
    }

    /// `[cluster.tls]` appended to the config file, reloaded (what the agent reads).
    fn with_tls_files(&self, cert: &Path, key: &Path, ca: &Path) -> Config {
        let path = self.config.path.clone();
        let mut text = std::fs::read_to_string(&path).unwrap();
        if let Some(i) = text.find("\n[cluster.tls]") {
            text.truncate(i);
        }
        text.push_str(&format!(
            "\n[cluster.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string()
        ));
        std::fs::write(&path, text).unwrap();
        let mut c = Config::load(&path).unwrap();
        c.timeouts = timeouts();
        c
    }

    fn data_spec(&self, node: &str, tls: Option<Arc<PeerTls>>) -> LinkSpec {
        let role = if node == "alpha" {
            Role::Active
        } else {
            Role::Standby
        };
        let mut s = LinkSpec::data(
            &self.config,
            node,
            "md1",
            VOLUME,
            self.secret.clone(),
            state(role),
        )
        .unwrap();
        s.tls = tls;
        s
    }

    fn control_spec(&self, node: &str, tls: Option<Arc<PeerTls>>) -> LinkSpec {
        let mut s =
            LinkSpec::control(&self.config, node, self.secret.clone(), state(Role::None)).unwrap();
        s.tls = tls;
        s
    }
}

/// Starts beta (acceptor) then alpha (dialer) data links with the given TLS settings and
/// returns both refusal reasons (alpha's, beta's); asserts that neither side ever got a
/// session.
async fn refused(
    s: &Setup,
    alpha: Option<Arc<PeerTls>>,
    beta: Option<Arc<PeerTls>>,
) -> (String, String) {
    Pair::start(s.data_spec("alpha", alpha), s.data_spec("beta", beta))
        .refused_without_sessions()
        .await
}

#[tokio::test]
async fn data_and_control_links_exchange_frames_over_tls() {
    let s = Setup::new();
    let ca = Ca::new("test CA");
    let ca_path = s.dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let (ac, ak) = ca.issue(&["alpha"], false).write(s.dir.path(), "alpha");
    let (bc, bk) = ca.issue(&["beta"], false).write(s.dir.path(), "beta");
    // Each node's specs come from its own config file through the start-up checks.
    let ca_cfg = s.with_tls_files(&ac, &ak, &ca_path);
    let cb_cfg = s.with_tls_files(&bc, &bk, &ca_path);
    let da = LinkSpec::data(
        &ca_cfg,
        "alpha",
        "md1",
        VOLUME,
        s.secret.clone(),
        state(Role::Active),
    )
    .unwrap();
    let db = LinkSpec::data(
        &cb_cfg,
        "beta",
        "md1",
        VOLUME,
        s.secret.clone(),
        state(Role::Standby),
    )
    .unwrap();
    assert!(da.tls.is_some() && db.tls.is_some());
    let ctl_a = LinkSpec::control(&ca_cfg, "alpha", s.secret.clone(), state(Role::None)).unwrap();
    let ctl_b = LinkSpec::control(&cb_cfg, "beta", s.secret.clone(), state(Role::None)).unwrap();

    let mut data = Pair::start(da, db);
    let mut control = Pair::start(ctl_a, ctl_b);
    let (mut sa, mut sb) = data.sessions().await;
    assert_eq!(sa.peer_hello.node_name, "beta");
    assert_eq!(sb.peer_hello.node_name, "alpha");
    assert_eq!(sb.peer_hello.role, Role::Active);

    // Small and large writes (the large one spans many TLS records), in order, intact.
    let big: Bytes = (0..(1u32 << 20)).map(|i| (i * 7 + 3) as u8).collect();
    let small = Bytes::from_static(b"over tls");
    // Both are queued before either is received.
    let s1 = sa.tx.send(write_bytes(0, small.clone())).await.unwrap();
    let s2 = sa.tx.send(write_bytes(1 << 20, big.clone())).await.unwrap();
    for (seq, want) in [(s1, write_bytes(0, small)), (s2, write_bytes(1 << 20, big))] {
        let f = recv_frame(&mut sb).await;
        assert_eq!(f.seq, seq);
        assert_eq!(f.msg, want);
        assert_delivered(&sb, &mut sa, Message::Ack1 { seq }).await;
    }

    let (mut xa, xb) = control.sessions().await;
    assert_eq!(xa.peer_hello.resource_name, "@control");
    let json = r#"{"cmd":"ping"}"#.to_string();
    assert_delivered(&xb, &mut xa, Message::Control { json }).await;
    drop(xb.rx);

    // Heartbeats keep the TLS session up past the heartbeat timeout.
    tokio::time::sleep(timeouts().heartbeat_timeout + Duration::from_millis(500)).await;
    assert!(sa.closed.reason().is_none(), "{:?}", sa.closed.reason());
    assert!(matches!(data.a.state(), LinkState::Connected { .. }));

    // A graceful close over TLS reaches the peer as Goodbye.
    sa.tx.close("test done");
    let r = closed_reason(&sb).await;
    assert!(r.contains("goodbye"), "{r}");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_both_ways() {
    let s = Setup::new();
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let alpha = ca.issue(&["alpha"], false).peer_tls(&ca);
    // beta's certificate is signed by another CA (beta itself trusts ours).
    let beta = other.issue(&["beta"], false).peer_tls(&ca);
    let (ra, rb) = refused(&s, Some(alpha.clone()), Some(beta)).await;
    assert!(
        ra.contains("TLS handshake failed") && ra.contains("unknown issuer"),
        "{ra}"
    );
    assert!(
        rb.contains("TLS handshake failed") && rb.contains("rejected our certificate"),
        "{rb}"
    );

    // The other way round: alpha's certificate is from the other CA.
    let s = Setup::new();
    let alpha = other.issue(&["alpha"], false).peer_tls(&ca);
    let beta = ca.issue(&["beta"], false).peer_tls(&ca);
    let (ra, rb) = refused(&s, Some(alpha), Some(beta)).await;
    assert!(
        rb.contains("TLS handshake failed") && rb.contains("unknown issuer"),
        "{rb}"
    );
    assert!(
        ra.contains("TLS handshake failed") && ra.contains("rejected our certificate"),
        "{ra}"
    );
}

#[tokio::test]
async fn a_certificate_for_another_node_name_is_refused_both_ways() {
    let s = Setup::new();
    let ca = Ca::new("test CA");
    // beta presents a certificate for "gamma": the dialer refuses it.
    let alpha = ca.issue(&["alpha"], false).peer_tls(&ca);
    let beta = ca.issue(&["gamma"], false).peer_tls(&ca);
    let (ra, _rb) = refused(&s, Some(alpha), Some(beta)).await;
    assert!(
        ra.contains("TLS handshake failed")
            && ra.contains("not valid for the peer's configured node name"),
        "{ra}"
    );

    // alpha presents a certificate for "gamma": the acceptor refuses it after TLS and
    // tells alpha why.
    let s = Setup::new();
    let alpha = ca.issue(&["gamma"], false).peer_tls(&ca);
    let beta = ca.issue(&["beta"], false).peer_tls(&ca);
    let (ra, rb) = refused(&s, Some(alpha), Some(beta)).await;
    assert!(
        rb.contains("TLS handshake failed")
            && rb.contains("not valid for the configured peer name \"alpha\""),
        "{rb}"
    );
    assert!(
        ra.contains("your certificate is not valid for \"alpha\""),
        "{ra}"
    );
}

#[tokio::test]
async fn an_expired_certificate_is_refused_both_ways() {
    let s = Setup::new();
    let ca = Ca::new("test CA");
    let alpha = ca.issue(&["alpha"], false).peer_tls(&ca);
    let beta = ca.issue(&["beta"], true).peer_tls(&ca);
    let (ra, rb) = refused(&s, Some(alpha), Some(beta)).await;
    assert!(
        ra.contains("TLS handshake failed") && ra.contains("expired"),
        "{ra}"
    );
    assert!(rb.contains("rejected our certificate"), "{rb}");

    let s = Setup::new();
    let alpha = ca.issue(&["alpha"], true).peer_tls(&ca);
    let beta = ca.issue(&["beta"], false).peer_tls(&ca);
    let (ra, rb) = refused(&s, Some(alpha), Some(beta)).await;
    assert!(
        rb.contains("TLS handshake failed") && rb.contains("expired"),
        "{rb}"
    );
    assert!(ra.contains("rejected our certificate"), "{ra}");
}

#[tokio::test]
async fn a_plain_peer_at_a_tls_node_is_refused_both_ways() {
    let ca = Ca::new("test CA");
    // alpha plain, beta TLS.
    let s = Setup::new();
    let beta = ca.issue(&["beta"], false).peer_tls(&ca);
    let (ra, rb) = refused(&s, None, Some(beta)).await;
    assert!(rb.contains("peer did not start TLS"), "{rb}");
    assert!(ra.contains("requires TLS"), "{ra}");

    // alpha TLS, beta plain.
    let s = Setup::new();
    let alpha = ca.issue(&["alpha"], false).peer_tls(&ca);
    let (ra, rb) = refused(&s, Some(alpha), None).await;
    assert!(ra.contains("peer did not start TLS"), "{ra}");
    assert!(rb.contains("peer started TLS"), "{rb}");

    // The same on the control link.
    let s = Setup::new();
    let beta = ca.issue(&["beta"], false).peer_tls(&ca);
    let (ra, rb) = Pair::start(
        s.control_spec("alpha", None),
        s.control_spec("beta", Some(beta)),
    )
    .refused_without_sessions()
    .await;
    assert!(rb.contains("peer did not start TLS"), "{rb}");
    assert!(ra.contains("requires TLS"), "{ra}");
}

#[tokio::test]
async fn the_shared_secret_is_still_checked_inside_tls() {
    let s = Setup::new();
    let ca = Ca::new("test CA");
    let alpha = ca.issue(&["alpha"], false).peer_tls(&ca);
    let beta = ca.issue(&["beta"], false).peer_tls(&ca);
    let other_secret = Setup::new().secret;
    let mut a_spec = s.data_spec("alpha", Some(alpha));
    a_spec.secret = other_secret;
    let (ra, rb) = Pair::start(a_spec, s.data_spec("beta", Some(beta)))
        .refused_without_sessions()
        .await;
    assert!(ra.contains("secret"), "{ra}");
    assert!(rb.contains("secret"), "{rb}");
}

/// The `ConfigError::Tls` of `config.read_tls("alpha")`, checked to name `key` and `file`,
/// and the same error through the link spec (the agent's start-up path).
fn tls_error(s: &Setup, config: &Config, key: &str, file: &Path) -> String {
    let e = config.read_tls("alpha").unwrap_err();
    let ConfigError::Tls { key: k, path, .. } = &e else {
        panic!("not a TLS error: {e:?}");
    };
    assert_eq!(*k, key, "{e}");
    assert_eq!(path, file, "{e}");
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains(key) && msg.contains(&file.display().to_string()),
        "{msg}"
    );
    let le = LinkSpec::control(config, "alpha", s.secret.clone(), state(Role::None)).unwrap_err();
    assert!(matches!(le, LinkError::TlsConfig(_)), "{le:?}");
    assert!(le.to_string().contains(&file.display().to_string()), "{le}");
    msg
}

#[test]
fn unusable_tls_files_are_start_up_errors_naming_the_file() {
    let s = Setup::new();
    let d = s.dir.path();
    let ca = Ca::new("test CA");
    let ca_path = d.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let alpha = ca.issue(&["alpha"], false);
    let (ac, ak) = alpha.write(d, "alpha");
    let (_bc, bk) = ca.issue(&["beta"], false).write(d, "beta");

    // Good files pass.
    let c = s.with_tls_files(&ac, &ak, &ca_path);
    let m = c.read_tls("alpha").unwrap().unwrap();
    assert_eq!(m.cert_chain.len(), 1);
    assert!(m.not_after > SystemTime::now());

    // Missing file.
    let missing = d.join("nope.crt");
    let msg = tls_error(
        &s,
        &s.with_tls_files(&missing, &ak, &ca_path),
        "cluster.tls.cert",
        &missing,
    );
    assert!(
        msg.contains("cannot read") && msg.contains("No such file"),
        "{msg}"
    );

    // Not PEM.
    let garbage = d.join("garbage.crt");
    std::fs::write(&garbage, alpha.cert.der().as_ref()).unwrap();
    let msg = tls_error(
        &s,
        &s.with_tls_files(&garbage, &ak, &ca_path),
        "cluster.tls.cert",
        &garbage,
    );
    assert!(msg.contains("not a PEM file"), "{msg}");

    // A key file without a key (the certificate given twice).
    let msg = tls_error(
        &s,
        &s.with_tls_files(&ac, &ac, &ca_path),
        "cluster.tls.key",
        &ac,
    );
    assert!(
        msg.contains("no private key") && msg.contains("found: CERTIFICATE"),
        "{msg}"
    );

    // A certificate file without a certificate.
    let msg = tls_error(
        &s,
        &s.with_tls_files(&ak, &ak, &ca_path),
        "cluster.tls.cert",
        &ak,
    );
    assert!(
        msg.contains("no CERTIFICATE") && msg.contains("PRIVATE KEY"),
        "{msg}"
    );

    // Key of another certificate.
    let msg = tls_error(
        &s,
        &s.with_tls_files(&ac, &bk, &ca_path),
        "cluster.tls.key",
        &bk,
    );
    assert!(msg.contains("does not match the certificate"), "{msg}");

    // Expired.
    let (ec, ek) = ca.issue(&["alpha"], true).write(d, "expired");
    let msg = tls_error(
        &s,
        &s.with_tls_files(&ec, &ek, &ca_path),
        "cluster.tls.cert",
        &ec,
    );
    assert!(
        msg.contains("certificate expired") && msg.contains("2000-12-31"),
        "{msg}"
    );

    // Not valid for this node's name.
    let (gc, gk) = ca.issue(&["gamma"], false).write(d, "gamma");
    let msg = tls_error(
        &s,
        &s.with_tls_files(&gc, &gk, &ca_path),
        "cluster.tls.cert",
        &gc,
    );
    assert!(
        msg.contains("not valid for this node's name \"alpha\""),
        "{msg}"
    );

    // A CA bundle without a certificate.
    let msg = tls_error(&s, &s.with_tls_files(&ac, &ak, &ak), "cluster.tls.ca", &ak);
    assert!(msg.contains("no CERTIFICATE"), "{msg}");

    // Unreadable CA bundle (a directory).
    let msg = tls_error(&s, &s.with_tls_files(&ac, &ak, d), "cluster.tls.ca", d);
    assert!(msg.contains("cannot read"), "{msg}");
}

/// QD1 round trips (4 KiB Write, Ack1 back) over one data link; returns sorted latencies.
async fn round_trips(
    s: &Setup,
    tls: Option<(Arc<PeerTls>, Arc<PeerTls>)>,
    n: usize,
) -> Vec<Duration> {
    let (ta, tb) = match tls {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    let mut p = Pair::start(s.data_spec("alpha", ta), s.data_spec("beta", tb));
    let (mut sa, mut sb) = p.sessions().await;
    // The standby side: ack every write at once.
    tokio::spawn(async move {
        while let Some(f) = sb.rx.recv().await {
            if sb.tx.send(Message::Ack1 { seq: f.seq }).await.is_err() {
                break;
            }
        }
    });
    let data = Bytes::from(vec![0x5a; 4096]);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + 500 {
        let t = std::time::Instant::now();
        let seq = sa
            .tx
            .send(write_bytes(i as u64 * 4096, data.clone()))
            .await
            .unwrap();
        let f = recv_frame(&mut sa).await;
        assert_eq!(f.msg, Message::Ack1 { seq });
        if i >= 500 {
            lat.push(t.elapsed());
        }
    }
    lat.sort();
    lat
}

/// Measurement, not a check of speed: `cargo test --release -p mirror-agent --test peer_tls
/// -- --ignored --nocapture qd1_latency`. Prints QD1 4 KiB write→ack1 round-trip latency of
/// a plain and a TLS data link on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check; run explicitly"]
async fn qd1_latency_plain_and_tls() {
    let n = 20_000;
    let ca = Ca::new("test CA");
    let pair = (
        ca.issue(&["alpha"], false).peer_tls(&ca),
        ca.issue(&["beta"], false).peer_tls(&ca),
    );
    for round in 0..2 {
        for (name, tls) in [("plain", None), ("tls", Some(pair.clone()))] {
            let lat = round_trips(&Setup::new(), tls, n).await;
            let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
            let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
            eprintln!(
                "round {round} {name:5}: n={n} mean={mean:?} p50={:?} p90={:?} p99={:?}",
                p(0.5),
                p(0.9),
                p(0.99)
            );
        }
    }
}
