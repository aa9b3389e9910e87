//! TLS on the peer links between two real agents (separate processes on temp files), with
//! certificates made at test time (rcgen): each node has its own config file naming its own
//! certificate and key (the same CA bundle); writes through NBD reach the standby byte for
//! byte; the listeners speak TLS only (a plain connection is refused with the reason); a
//! TLS node and a plain node refuse each other, naming the cause; an agent with an expired
//! certificate does not start and names the file.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use tests::data::{assert_files_equal, random_bytes, sha256};
use tests::mirror::{connection, MirrorPair, PairOpts};
use tests::nbd_client::NbdClient;
use tests::tls::tls_configs;
use tests::wait::poll_until;
use tests::TestCluster;

const T: Duration = Duration::from_secs(15);

fn status(c: &TestCluster, node: &str) -> Value {
    let out = c.mdctrl_on(node, &["status", "md1", "--json"]);
    serde_json::from_str(&tests::run::stdout(&out)).unwrap_or(Value::Null)
}

#[test]
fn tls_pair_replicates_writes_through_nbd() {
    let c = MirrorPair::configure(&PairOpts::new("sync"));
    let p = tests::tls::start_pair(&c);
    p.wait_connected("server1", T);
    p.wait_connected("server2", T);
    p.activate("server1");
    p.wait_status("server1", "replicating", T, |s| {
        s["pair"]["replicating"] == true
    });

    let mut nbd = NbdClient::connect(&p.socket("server1"), "md1").expect("NBD connect");
    let mut n = 0u64;
    for i in 0..64u64 {
        // 4 KiB .. 1 MiB writes spread over the volume, some FUA.
        let len = ((i % 8) as usize + 1) * ((i % 4) as usize * 32 + 4) * 1024;
        let off = (i * 245_760) % ((16 << 20) - (1 << 20));
        let off = off / 4096 * 4096;
        let data = random_bytes(len, 0x715 + i);
        let err = nbd.write(off, &data, i % 5 == 0).expect("write");
        assert_eq!(err, 0, "write {i} at {off}+{len}");
        n += 1;
    }
    assert_eq!(nbd.flush().expect("flush"), 0);
    let s = p.wait_rpo_zero("server1", T);
    assert!(
        s["pair"]["rpo"]["writes_replicated"].as_u64().unwrap_or(0) >= n,
        "{s:#}"
    );
    assert_eq!(connection(&s), "connected", "{s:#}");
    assert_eq!(connection(&p.status("server2")), "connected");
    nbd.disconnect().expect("disconnect");
    p.deactivate("server1");
    assert_files_equal(&p.data("server1"), &p.data("server2"), None);

    // The listeners speak TLS only: a plain connection gets the reason and is closed.
    let port =
        p.c.config
            .resource("md1")
            .and_then(|r| r.node("server2"))
            .expect("md1 on server2")
            .mirror_port;
    let mut raw = TcpStream::connect(("127.0.0.1", port)).expect("connect to the mirror port");
    raw.set_read_timeout(Some(T)).expect("timeout");
    let mut hello = b"NBMR".to_vec();
    hello.resize(28, 0);
    raw.write_all(&hello).expect("write");
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("requires TLS"), "{answer:?}");
    p.a2.wait_for_log("peer did not start TLS", T);
}

#[test]
fn tls_node_and_plain_node_refuse_each_other() {
    let c = MirrorPair::configure(&PairOpts::new("sync"));
    let (c1, c2) = tls_configs(&c, true, false);
    let sum2 = sha256(&c.data_path_on("server2"));
    let mut a1 = c1.spawn_agent_on("server1");
    let mut a2 = c2.spawn_agent_on("server2");
    a1.wait_ready();
    a2.wait_ready();
    // server1 (TLS) dials server2 (plain): server2 names the cause, server1 too.
    a2.wait_for_log("peer started TLS, but [cluster.tls] is not configured", T);
    a1.wait_for_log("peer did not start TLS", T);
    let refused = poll_until(T, || {
        let s = status(&c1, "server1");
        connection(&s).starts_with("refused").then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "server1 never reports the refusal: {:#}",
            status(&c1, "server1")
        )
    });
    assert!(
        refused.to_string().contains("did not start TLS"),
        "{refused:#}"
    );
    assert_ne!(connection(&status(&c2, "server2")), "connected");
    assert_eq!(
        sha256(&c.data_path_on("server2")),
        sum2,
        "server2's data changed"
    );
}

#[test]
fn agent_with_an_expired_certificate_does_not_start() {
    let c = MirrorPair::configure(&PairOpts::new("sync"));
    let (c1, _c2) = tls_configs(&c, false, true);
    let mut a1 = c1.spawn_agent_on("server1");
    let st = a1.wait_exit(T);
    assert!(
        !st.success(),
        "the agent started with an expired certificate"
    );
    let log = a1.log();
    let cert = c.dir().join("tls").join("server1.crt");
    assert!(
        log.contains("cluster.tls.cert")
            && log.contains(&cert.display().to_string())
            && log.contains("certificate expired"),
        "{log}"
    );
}
