//! # mirror-agent: the nbd-mirror daemon
//!
//! Module map (read this first):
//!
//! - [`config`]: the cluster TOML file (servers, resources, timeouts), parsed
//!   and validated with errors that name the file, the key and what was
//!   expected.
//! - [`engine`]: local block I/O behind the [`engine::BlockEngine`] trait: an
//!   io_uring engine (O_DIRECT where the backing supports it), a portable
//!   thread-pool engine, and a fault-injecting engine for tests.
//! - [`nbd`]: the NBD server (fixed newstyle handshake, options, pipelined
//!   transmission with out-of-order replies, bounded in-flight memory).
//! - [`meta`]: the agent's side of the cluster partition (attach, `init`,
//!   `dump-md`, state recorded in the superblock); the format is the `bitmap`
//!   crate's.
//! - [`resource`]: one resource on this node: data engine + metadata + the NBD
//!   export while active; activation and deactivation.
//! - [`admin`]: the admin socket (JSON lines, `SO_PEERCRED` access control)
//!   and its client, used by `mdctrl`.
//! - [`status`]: the status snapshot shared by the agent and `mdctrl`.
//! - [`peer`]: peer links (control + one data link per resource): dial/accept, handshake and HMAC auth, sequenced sessions with heartbeat, as channels.
//! - [`gens`]: generation identifiers and their transitions (break, resync
//!   done, blank pair).
//! - [`daemon`]: the process: attach resources, serve the admin socket,
//!   graceful shutdown on SIGTERM/SIGINT.
//!
//! The binary `mirror-agent` (`src/main.rs`) parses `--config`/`--node` and
//! calls [`daemon::run`].

pub mod admin;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod gens;
pub mod meta;
pub mod nbd;
pub mod peer;
pub mod resource;
pub mod status;
