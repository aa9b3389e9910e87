//! Raw generic netlink for the kernel NBD driver (`drivers/block/nbd.c`,
//! uapi `linux/nbd-netlink.h`): family resolution through the `nlctrl`
//! family, then `NBD_CMD_CONNECT` / `DISCONNECT` / `RECONFIGURE` / `STATUS`.
//!
//! Netlink is host-endian (not the NBD wire's big-endian): every integer here
//! is native-endian, as the kernel reads it. Messages are built with
//! [`MsgBuilder`] and decoded with [`parse_attrs`] (bounds checked: a
//! truncated or overlong attribute is an error naming the offset, never a
//! panic).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// --- nlctrl (linux/genetlink.h) ---
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// --- netlink header (linux/netlink.h) ---
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

// --- nbd (linux/nbd-netlink.h) ---
/// Generic netlink family name of the kernel NBD driver.
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;

/// `NBD_CMD_*` of the nbd genl family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NbdCmd {
    /// Configure a device with sockets and start it.
    Connect = 1,
    /// Send `NBD_CMD_DISC` on every socket and tear the device down.
    Disconnect = 2,
    /// Replace dead sockets / change timeouts of a configured device.
    Reconfigure = 3,
    /// Query whether devices are configured.
    Status = 5,
}

/// `NBD_ATTR_*`.
pub mod attr {
    /// u32: device index (`/dev/nbdN`).
    pub const INDEX: u16 = 1;
    /// u64: device size in bytes.
    pub const SIZE_BYTES: u16 = 2;
    /// u64: logical block size in bytes.
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    /// u64: request timeout in seconds.
    pub const TIMEOUT: u16 = 4;
    /// u64: NBD transmission flags (`NBD_FLAG_*`) the server advertises.
    pub const SERVER_FLAGS: u16 = 5;
    /// u64: `NBD_CFLAG_*`.
    pub const CLIENT_FLAGS: u16 = 6;
    /// nested: `NBD_SOCK_ITEM` { `NBD_SOCK_FD` u32 }.
    pub const SOCKETS: u16 = 7;
    /// u64: seconds to wait for a `RECONFIGURE` after a socket died.
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    /// nested: `NBD_DEVICE_ITEM` { `NBD_DEVICE_INDEX` u32, `NBD_DEVICE_CONNECTED` u8 }.
    pub const DEVICE_LIST: u16 = 9;
    /// `NBD_SOCK_ITEM` inside [`SOCKETS`].
    pub const SOCK_ITEM: u16 = 1;
    /// `NBD_SOCK_FD` inside a socket item.
    pub const SOCK_FD: u16 = 1;
    /// `NBD_DEVICE_ITEM` inside [`DEVICE_LIST`].
    pub const DEVICE_ITEM: u16 = 1;
    /// `NBD_DEVICE_INDEX` inside a device item.
    pub const DEVICE_INDEX: u16 = 1;
    /// `NBD_DEVICE_CONNECTED` inside a device item.
    pub const DEVICE_CONNECTED: u16 = 2;
}

/// Errors of this layer (converted to `KernelError` by the caller).
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A socket system call failed.
    #[error("netlink {what}: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// OS error.
        source: io::Error,
    },
    /// The kernel answered a request with an error.
    #[error("kernel refused {what}: {source}")]
    Kernel {
        /// The request.
        what: &'static str,
        /// The errno the kernel returned.
        source: io::Error,
    },
    /// The generic netlink family is not registered (module not loaded or
    /// not built).
    #[error("generic netlink family {0:?} not found (nbd module not loaded?)")]
    NoFamily(String),
    /// A reply could not be decoded.
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> NetlinkError {
    move |source| NetlinkError::Io { what, source }
}

/// Builds one generic netlink request: header, genl header, attributes.
#[derive(Debug)]
pub struct MsgBuilder {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl MsgBuilder {
    /// A request of `family` with generic netlink command `cmd`; `seq` is
    /// filled in by [`GenlSocket::request`].
    pub fn new(family: u16, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set in finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq
        buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        MsgBuilder {
            buf,
            nests: Vec::new(),
        }
    }

    fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// A u32 attribute.
    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }

    /// A u64 attribute.
    pub fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn string(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut p = s.as_bytes().to_vec();
        p.push(0);
        self.put(ty, &p)
    }

    /// Opens a nested attribute; close it with [`end_nest`](Self::end_nest).
    pub fn begin_nest(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost nested attribute.
    ///
    /// # Panics
    /// Without a matching [`begin_nest`](Self::begin_nest) (a programming error).
    pub fn end_nest(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("end_nest without begin_nest");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished message with sequence number `seq`.
    ///
    /// # Panics
    /// With a nest still open (a programming error).
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        assert!(self.nests.is_empty(), "unclosed netlink nest");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// One decoded attribute: type (without the nested/byte-order flags) and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// Attribute type.
    pub ty: u16,
    /// Payload (without padding).
    pub data: &'a [u8],
}

impl Attr<'_> {
    /// The payload as a native-endian u16.
    pub fn as_u16(&self) -> Result<u16, NetlinkError> {
        self.data
            .try_into()
            .map(u16::from_ne_bytes)
            .map_err(|_| self.bad_len(2))
    }

    /// The payload as a native-endian u32.
    pub fn as_u32(&self) -> Result<u32, NetlinkError> {
        self.data
            .try_into()
            .map(u32::from_ne_bytes)
            .map_err(|_| self.bad_len(4))
    }

    /// The payload as a u8.
    pub fn as_u8(&self) -> Result<u8, NetlinkError> {
        match self.data {
            [b] => Ok(*b),
            _ => Err(self.bad_len(1)),
        }
    }

    fn bad_len(&self, expected: usize) -> NetlinkError {
        NetlinkError::Malformed(format!(
            "attribute {}: expected {expected} payload bytes, found {}",
            self.ty,
            self.data.len()
        ))
    }
}

/// Decodes a run of attributes (a message body or a nested payload).
/// Trailing bytes shorter than an attribute header are padding and ignored.
pub fn parse_attrs(mut buf: &[u8]) -> Result<Vec<Attr<'_>>, NetlinkError> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while buf.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return Err(NetlinkError::Malformed(format!(
                "attribute at offset {off}: length {len} outside {NLA_HDRLEN}..={}",
                buf.len()
            )));
        }
        out.push(Attr {
            ty,
            data: &buf[NLA_HDRLEN..len],
        });
        let step = align4(len).min(buf.len());
        buf = &buf[step..];
        off += step;
    }
    Ok(out)
}

/// One decoded netlink message of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `NLMSG_ERROR` with error 0: the acknowledgement ending a request.
    Ack,
    /// `NLMSG_ERROR` with a negative errno.
    Error(i32),
    /// `NLMSG_DONE`.
    Done,
    /// A data message: its type and the bytes after the netlink header
    /// (for generic netlink: genl header + attributes).
    Data {
        /// `nlmsg_type` (the family id).
        ty: u16,
        /// Sequence number.
        seq: u32,
        /// Payload after the netlink header.
        payload: Vec<u8>,
    },
}

/// Splits a datagram into messages (with their sequence numbers).
pub fn parse_messages(mut buf: &[u8]) -> Result<Vec<(u32, Reply)>, NetlinkError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(NetlinkError::Malformed(format!(
                "message length {len} outside {NLMSG_HDRLEN}..={}",
                buf.len()
            )));
        }
        let body = &buf[NLMSG_HDRLEN..len];
        let reply = match ty {
            NLMSG_ERROR => {
                let e: [u8; 4] =
                    body.get(0..4)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| {
                            NetlinkError::Malformed(format!(
                                "NLMSG_ERROR body of {} bytes",
                                body.len()
                            ))
                        })?;
                match i32::from_ne_bytes(e) {
                    0 => Reply::Ack,
                    e => Reply::Error(e),
                }
            }
            NLMSG_DONE => Reply::Done,
            _ => Reply::Data {
                ty,
                seq,
                payload: body.to_vec(),
            },
        };
        out.push((seq, reply));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// A blocking `NETLINK_GENERIC` socket.
#[derive(Debug)]
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    /// Opens and binds a generic netlink socket (the kernel assigns the port id).
    pub fn open() -> Result<GenlSocket, NetlinkError> {
        // SAFETY: plain socket(2) call; the result is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(NetlinkError::Io {
                what: "socket(AF_NETLINK, NETLINK_GENERIC)",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a freshly created descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value (nl_pid 0 = kernel assigns).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sa is a valid sockaddr_nl and the length matches it.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(NetlinkError::Io {
                what: "bind",
                source: io::Error::last_os_error(),
            });
        }
        // A reply the kernel never sends must not hang the agent forever.
        let tv = libc::timeval {
            tv_sec: 30,
            tv_usec: 0,
        };
        // SAFETY: tv is a valid timeval and the length matches it.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(NetlinkError::Io {
                what: "setsockopt(SO_RCVTIMEO)",
                source: io::Error::last_os_error(),
            });
        }
        Ok(GenlSocket {
            fd,
            seq: rand::random::<u32>() >> 1,
        })
    }

    /// Sends a request and collects its data replies until the kernel's
    /// acknowledgement. A negative errno from the kernel becomes
    /// [`NetlinkError::Kernel`] naming `what`.
    pub fn request(
        &mut self,
        what: &'static str,
        msg: MsgBuilder,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: bytes is a valid buffer of bytes.len() bytes; the fd is open.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(NetlinkError::Io {
                what: "send",
                source: io::Error::last_os_error(),
            });
        }
        let mut data = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is a valid writable buffer of buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("recv")(e));
            }
            for (s, reply) in parse_messages(&buf[..n as usize])? {
                if s != seq {
                    continue; // a stale answer to an earlier, timed-out request
                }
                match reply {
                    Reply::Ack | Reply::Done => return Ok(data),
                    Reply::Error(e) => {
                        return Err(NetlinkError::Kernel {
                            what,
                            source: io::Error::from_raw_os_error(-e),
                        })
                    }
                    Reply::Data { payload, .. } => data.push(payload),
                }
            }
        }
    }

    /// Resolves a generic netlink family id by name (`CTRL_CMD_GETFAMILY`).
    pub fn resolve_family(&mut self, name: &str) -> Result<u16, NetlinkError> {
        let mut m = MsgBuilder::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
        m.string(CTRL_ATTR_FAMILY_NAME, name);
        let replies = match self.request("CTRL_CMD_GETFAMILY", m) {
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                return Err(NetlinkError::NoFamily(name.to_owned()))
            }
            r => r?,
        };
        for p in &replies {
            let attrs = parse_attrs(p.get(GENL_HDRLEN..).unwrap_or_default())?;
            if let Some(a) = attrs.iter().find(|a| a.ty == CTRL_ATTR_FAMILY_ID) {
                return a.as_u16();
            }
        }
        Err(NetlinkError::Malformed(format!(
            "CTRL_CMD_GETFAMILY reply for {name:?} without CTRL_ATTR_FAMILY_ID"
        )))
    }
}

/// The kernel NBD driver's netlink interface.
#[derive(Debug)]
pub struct NbdNetlink {
    sock: GenlSocket,
    family: u16,
}

/// What `NBD_CMD_CONNECT` configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectParams {
    /// Device index (`/dev/nbdN`).
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size.
    pub block_size: u64,
    /// Transmission flags advertised by the server.
    pub server_flags: u64,
    /// Request timeout, seconds (0 = none: a dead server hangs I/O forever).
    pub timeout_secs: u64,
    /// Seconds to wait for a new socket after the connection died.
    pub dead_conn_timeout_secs: u64,
}

impl NbdNetlink {
    /// Opens a socket and resolves the `nbd` family.
    pub fn open() -> Result<NbdNetlink, NetlinkError> {
        let mut sock = GenlSocket::open()?;
        let family = sock.resolve_family(NBD_GENL_FAMILY_NAME)?;
        Ok(NbdNetlink { sock, family })
    }

    /// The resolved family id.
    pub fn family(&self) -> u16 {
        self.family
    }

    fn msg(&self, cmd: NbdCmd) -> MsgBuilder {
        MsgBuilder::new(self.family, cmd as u8, NBD_GENL_VERSION)
    }

    /// `NBD_CMD_CONNECT` with one socket (`sock_fd`, a descriptor of this
    /// process; the kernel takes its own reference). Returns the index the
    /// kernel reports (equal to `p.index`).
    pub fn connect(&mut self, p: &ConnectParams, sock_fd: RawFd) -> Result<u32, NetlinkError> {
        let mut m = self.msg(NbdCmd::Connect);
        m.u32(attr::INDEX, p.index)
            .u64(attr::SIZE_BYTES, p.size)
            .u64(attr::BLOCK_SIZE_BYTES, p.block_size)
            .u64(attr::SERVER_FLAGS, p.server_flags)
            .u64(attr::TIMEOUT, p.timeout_secs)
            .u64(attr::DEAD_CONN_TIMEOUT, p.dead_conn_timeout_secs);
        sockets(&mut m, sock_fd);
        let replies = self.sock.request("NBD_CMD_CONNECT", m)?;
        for r in &replies {
            for a in parse_attrs(r.get(GENL_HDRLEN..).unwrap_or_default())? {
                if a.ty == attr::INDEX {
                    return a.as_u32();
                }
            }
        }
        Ok(p.index)
    }

    /// `NBD_CMD_RECONFIGURE`: hands `sock_fd` to a configured device whose
    /// socket died, and refreshes the timeouts.
    pub fn reconfigure(&mut self, p: &ConnectParams, sock_fd: RawFd) -> Result<(), NetlinkError> {
        let mut m = self.msg(NbdCmd::Reconfigure);
        m.u32(attr::INDEX, p.index)
            .u64(attr::TIMEOUT, p.timeout_secs)
            .u64(attr::DEAD_CONN_TIMEOUT, p.dead_conn_timeout_secs);
        sockets(&mut m, sock_fd);
        self.sock.request("NBD_CMD_RECONFIGURE", m).map(drop)
    }

    /// `NBD_CMD_DISCONNECT`.
    pub fn disconnect(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut m = self.msg(NbdCmd::Disconnect);
        m.u32(attr::INDEX, index);
        self.sock.request("NBD_CMD_DISCONNECT", m).map(drop)
    }

    /// `NBD_CMD_STATUS` for one device: `Some(connected)`, or `None` when
    /// the device does not exist.
    pub fn status(&mut self, index: u32) -> Result<Option<bool>, NetlinkError> {
        let mut m = self.msg(NbdCmd::Status);
        m.u32(attr::INDEX, index);
        let replies = self.sock.request("NBD_CMD_STATUS", m)?;
        for r in &replies {
            for a in parse_attrs(r.get(GENL_HDRLEN..).unwrap_or_default())? {
                if a.ty != attr::DEVICE_LIST {
                    continue;
                }
                for item in parse_attrs(a.data)?
                    .into_iter()
                    .filter(|i| i.ty == attr::DEVICE_ITEM)
                {
                    let fields = parse_attrs(item.data)?;
                    let idx = fields
                        .iter()
                        .find(|f| f.ty == attr::DEVICE_INDEX)
                        .map(Attr::as_u32)
                        .transpose()?;
                    let conn = fields
                        .iter()
                        .find(|f| f.ty == attr::DEVICE_CONNECTED)
                        .map(Attr::as_u8)
                        .transpose()?;
                    if idx == Some(index) {
                        return Ok(Some(conn.unwrap_or(0) != 0));
                    }
                }
            }
        }
        Ok(None)
    }
}

fn sockets(m: &mut MsgBuilder, fd: RawFd) {
    m.begin_nest(attr::SOCKETS)
        .begin_nest(attr::SOCK_ITEM)
        .u32(attr::SOCK_FD, fd as u32)
        .end_nest()
        .end_nest();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nested_socket_layout_matches_the_kernel_format() {
        let mut m = MsgBuilder::new(0x20, NbdCmd::Connect as u8, 1);
        m.u32(attr::INDEX, 3);
        sockets(&mut m, 7);
        let b = m.finish(42);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 42);
        assert_eq!(&b[16..18], &[NbdCmd::Connect as u8, 1]);
        let attrs = parse_attrs(&b[20..]).unwrap();
        assert_eq!(attrs.len(), 2);
        assert_eq!((attrs[0].ty, attrs[0].as_u32().unwrap()), (attr::INDEX, 3));
        assert_eq!(attrs[1].ty, attr::SOCKETS);
        // NLA_F_NESTED is set on the wire and masked by the parser.
        assert_eq!(
            u16::from_ne_bytes([b[30], b[31]]),
            attr::SOCKETS | NLA_F_NESTED
        );
        let items = parse_attrs(attrs[1].data).unwrap();
        assert_eq!(items.len(), 1);
        let fd = parse_attrs(items[0].data).unwrap();
        assert_eq!((fd[0].ty, fd[0].as_u32().unwrap()), (attr::SOCK_FD, 7));
    }

    #[test]
    fn truncated_attribute_is_an_error_naming_the_offset() {
        let mut m = MsgBuilder::new(0x20, 1, 1);
        m.u64(attr::SIZE_BYTES, 1).u32(attr::INDEX, 1);
        let b = m.finish(1);
        let body = &b[20..b.len() - 2];
        let e = parse_attrs(body).unwrap_err().to_string();
        assert!(e.contains("offset 12"), "{e}");
    }

    #[test]
    fn error_and_ack_messages() {
        let mk = |err: i32, seq: u32| {
            let mut v = Vec::new();
            v.extend_from_slice(&36u32.to_ne_bytes());
            v.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            v.extend_from_slice(&0u16.to_ne_bytes());
            v.extend_from_slice(&seq.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            v.extend_from_slice(&err.to_ne_bytes());
            v.extend_from_slice(&[0u8; 16]); // the echoed request header
            v
        };
        let mut d = mk(0, 5);
        d.extend(mk(-libc::EBUSY, 6));
        let m = parse_messages(&d).unwrap();
        assert_eq!(m, vec![(5, Reply::Ack), (6, Reply::Error(-libc::EBUSY))]);
    }

    proptest! {
        #[test]
        fn attributes_roundtrip(vals in proptest::collection::vec((1u16..0x3fff, any::<u64>(), any::<bool>()), 0..20)) {
            let mut m = MsgBuilder::new(0x20, 1, 1);
            for (ty, v, wide) in &vals {
                if *wide { m.u64(*ty, *v); } else { m.u32(*ty, *v as u32); }
            }
            let b = m.finish(9);
            let attrs = parse_attrs(&b[20..]).unwrap();
            prop_assert_eq!(attrs.len(), vals.len());
            for (a, (ty, v, wide)) in attrs.iter().zip(&vals) {
                prop_assert_eq!(a.ty, *ty);
                if *wide {
                    prop_assert_eq!(u64::from_ne_bytes(a.data.try_into().unwrap()), *v);
                } else {
                    prop_assert_eq!(a.as_u32().unwrap(), *v as u32);
                }
            }
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_attrs(&bytes);
            let _ = parse_messages(&bytes);
        }
    }
}
