//! # tests: nbd-mirror integration and fault tests
//!
//! Real `mirror-agent` processes on temporary files, driven by the real
//! `mdctrl` and by real NBD clients (libnbd's tools, qemu, fio, the kernel
//! through nbdfuse + a loop device). The test binaries live in `tests/`:
//!
//! - `tests/clients.rs`: standard clients against a standalone agent, every
//!   test once per local I/O engine (io_uring with O_DIRECT, portable).
//! - `tests/admin.rs`: the admin socket and `mdctrl` (refusals, exit codes,
//!   status counters, socket modes, access control, deactivation under load,
//!   SIGTERM, configuration errors, `init`).
//! - `tests/metadata.rs`: the cluster partition at agent start (blank,
//!   garbage, one or both superblock slots corrupt, a corrupt bitmap chunk).
//! - `tests/replication.rs`: two agents replicating: every mode byte for
//!   byte, `kill -9` of the standby / the active at seeded random points,
//!   refused links (secret, names, size), malformed frames from a fake peer,
//!   network faults through [`proxy::Proxy`] (also one-way loss and a
//!   flapping link under a write stream, plain and TLS) and a netns +
//!   nftables partition.
//!
//! Module map of this library (the harness):
//!
//! - [`bins`]: locating the built `mirror-agent` and `mdctrl` next to the
//!   test executable.
//! - [`cluster`]: [`TestCluster`] (a temp dir with a generated config, free
//!   ports, the secret file) and [`ClusterOpts`]; [`Engine`] and the
//!   [`on_both_engines!`] macro.
//! - [`agent`]: [`Agent`], a spawned `mirror-agent` (log file, readiness by
//!   pinging the admin socket, kill -9 / SIGTERM / restart, log dump when a
//!   test panics).
//! - [`run`](mod@run): running external commands with a deadline and assertions that
//!   print the full command, status and output.
//! - [`tools`]: [`require_tool`] / [`require_root`] (loud skip, or panic in CI
//!   where `NBD_MIRROR_REQUIRE_TOOLS=1`).
//! - [`data`]: reproducible random images with zero holes, file comparison
//!   naming the first difference, pattern checks.
//! - [`fsmount`]: [`FuseLoopMount`], nbdfuse + loop device + mount with a
//!   teardown guard that never leaves mounts behind.
//! - [`nbd_client`]: a minimal NBD client (fixed newstyle, `NBD_OPT_GO`,
//!   simple replies, pipelined writes) for tests that need to know exactly
//!   which requests were acknowledged.
//! - [`mirror`]: [`mirror::MirrorPair`], a two-node cluster with short
//!   timeouts, both sides `init --blank`, both agents running; config
//!   rewrites (timeouts, mode, `listen_address`) and status polling.
//! - [`proxy`]: [`proxy::Proxy`], a fault-injecting TCP proxy between the
//!   agents (delay, stall, blackhole, reset, cut and heal, one-way loss).
//! - [`tls`]: a test CA, node certificates and per-node configs with
//!   `[cluster.tls]` (TLS on the peer links).
//! - [`faultfile`]: [`faultfile::FaultyFile`], a file whose writes fail with
//!   `EIO` on demand, or whose requests stall (nbdkit's error and pause
//!   filters behind nbdfuse; optionally a loop device on top), for a cluster
//!   partition that fails or a data disk that stalls under a running agent.
//! - [`fakepeer`]: [`fakepeer::FakePeer`], a hand-written peer that runs the
//!   real handshake (`docs/protocol.md` §8) and then sends arbitrary, also
//!   malformed, bytes.
//! - [`wait`]: readiness polling with a deadline.

pub mod agent;
pub mod bins;
pub mod cluster;
pub mod data;
pub mod fakepeer;
pub mod faultfile;
pub mod fsmount;
pub mod mirror;
pub mod nbd_client;
pub mod proxy;
pub mod run;
pub mod tls;
pub mod tools;
pub mod wait;

pub use agent::Agent;
pub use cluster::{ClusterOpts, Engine, TestCluster};
pub use fsmount::FuseLoopMount;
pub use run::{run, run_ok, CMD_TIMEOUT};
pub use tools::{require_root, require_tool, require_tools, tools_required};
pub use wait::wait_until;
