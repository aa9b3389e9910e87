//! # mirror-agent: the nbd-mirror daemon
//!
//! Module map (read this first):
//!
//! - [`config`]: the cluster TOML file (servers, resources, timeouts), parsed
//!   and validated with errors that name the file, the key and what was
//!   expected.
//! - [`engine`]: local block I/O behind the [`engine::BlockEngine`] trait: an
//!   io_uring engine (O_DIRECT where the backing supports it), a portable
//!   thread-pool engine, a fault-injecting engine for tests, the stall
//!   watch every request of a resource's devices goes through, and the
//!   watchdog that keeps the runtime answering while a buffered write blocks
//!   a worker (`engine::inline`).
//! - [`nbd`]: the NBD server (fixed newstyle handshake, options, pipelined
//!   transmission with out-of-order replies, bounded in-flight memory).
//! - [`kernel`]: attach a local `/dev/nbdX` to an export (generic netlink, socketpair, `nbd-client` fallback), mount/umount with holder scan, IO_FLUSHER + mlockall.
//! - [`meta`]: the agent's side of the cluster partition (attach, `init`,
//!   `dump-md`, state recorded in the superblock); the format is the `bitmap`
//!   crate's.
//! - [`resource`]: one resource on this node: data engine + metadata + the NBD
//!   export while active; activation and deactivation; the periodic cluster
//!   partition check and the stall watch of both devices.
//! - [`pair`]: a mirrored resource's side of the pair: data-link sessions,
//!   role coordination (activation grants), wiring of [`replica`] to each
//!   session, pair status.
//! - [`admin`]: the admin socket (JSON lines, `SO_PEERCRED` access control)
//!   and its client, used by `mdctrl`.
//! - [`status`]: the status snapshot shared by the agent and `mdctrl`;
//!   [`changes`]: its change counter (what `status --watch` and
//!   `recover --wait` wait on).
//! - [`peer`]: peer links (control + one data link per resource): dial/accept, handshake and HMAC auth, sequenced sessions with heartbeat, as channels.
//! - [`replica`]: the replication data path (active volume, standby loop, acks, RPO).
//! - [`gens`]: generation identifiers and their transitions (break, resync
//!   done, blank pair).
//! - [`rules`]: resync direction, forced recovery and activation rules (`docs/resync-rules.md`).
//! - [`resync`]: copying regions source → target over the data link while the
//!   source keeps serving (write gate, progress, divergent-region saving).
//! - [`daemon`]: the process: attach resources, serve the admin socket,
//!   graceful shutdown on SIGTERM/SIGINT.
//! - `fuzzing`: the in-memory stream driver of the fuzz harnesses
//!   (`nbd::testing::fuzz_session`, `peer::testing::fuzz_handshake`; targets in
//!   `mirror-agent/fuzz`).
//!
//! The binary `mirror-agent` (`src/main.rs`) parses `--config`/`--node` and
//! calls [`daemon::run`].

pub mod admin;
pub mod changes;
pub mod config;
pub mod daemon;
pub mod engine;
mod fuzzing;
pub mod gens;
pub mod kernel;
pub mod meta;
pub mod nbd;
pub mod pair;
pub mod peer;
pub mod replica;
pub mod resource;
pub mod resync;
pub mod rules;
pub mod status;
