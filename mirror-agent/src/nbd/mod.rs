//! # NBD server
//!
//! Serves the agent's resources to NBD clients (the Linux kernel client via a
//! socketpair, `qemu`, `nbdkit`/`libnbd` tools) over unix sockets, TCP or any
//! byte stream. Follows `doc/proto.md` of the NetworkBlockDevice/nbd project.
//!
//! Module map:
//!
//! - [`server`]: the public API — [`Export`], [`BlockSizes`], [`Limits`],
//!   [`NbdServer`] (accept loops, `serve_stream`, `serve_transmission` for a
//!   kernel socketpair, `shutdown`, `stats`), [`ExportParams`],
//!   [`NbdStats`], and the listener helpers [`bind_unix`] / [`bind_tcp`].
//! - `handshake`: fixed newstyle negotiation (`EXPORT_NAME`, `INFO`, `GO`,
//!   `LIST`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//!   `SET_META_CONTEXT` for `base:allocation`; everything else `ERR_UNSUP`).
//! - `conn`: one connection's transmission phase — reader (which also polls
//!   the requests in flight, `pending`), reply writer; validation, errno
//!   mapping, bounded in-flight memory, block status descriptors, drain on
//!   `NBD_CMD_DISC` and on shutdown.
//! - `input`: cancel-safe buffered reading of the client stream.
//! - [`proto`]: wire constants and codecs (big-endian, as NBD mandates).
//! - [`error`]: [`NbdError`], the layer's error (also the reason a
//!   connection was closed).
//! - [`client`]: a small blocking NBD client (demo, tests).
//! - [`testing`]: [`testing::MemEngine`], an in-memory `BlockEngine` for tests,
//!   and [`testing::fuzz_session`], the body of the `nbd_session` fuzz target
//!   (`mirror-agent/fuzz`).
//!
//! Block status: one metadata context, `base:allocation`, from the local
//! engine's [`extents`](crate::engine::BlockEngine::extents) (`SEEK_DATA` /
//! `SEEK_HOLE` on files; block devices and engines without an allocation map
//! report everything allocated). On a mirrored volume it describes the
//! active node's own data file.
//!
//! Not implemented: TLS (`NBD_OPT_STARTTLS` answers `ERR_UNSUP`), other
//! metadata contexts (ignored, as the protocol asks), extended headers,
//! `NBD_CMD_CACHE` and fast zero (not advertised; `EINVAL`).

pub mod client;
mod conn;
pub mod error;
mod handshake;
mod input;
mod pending;
pub mod proto;
pub mod server;
pub mod testing;

pub use error::NbdError;
pub use server::{
    bind_tcp, bind_unix, BlockSizes, Export, ExportParams, Limits, NbdServer, NbdStats,
};
