//! A minimal blocking NBD client written from the protocol specification
//! (it shares no code with the server): fixed newstyle handshake,
//! `NBD_OPT_GO`, simple replies only, and requests that can be pipelined (send
//! many, read replies on a cloned stream). `mdctrl demo` writes through it, and
//! tests use it where they must know exactly which requests the server
//! acknowledged.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_FLAG_FUA`.
pub const FLAG_FUA: u16 = 1;
/// `NBD_ESHUTDOWN`.
pub const NBD_ESHUTDOWN: u32 = 108;

/// A connected client in transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    stream: UnixStream,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

/// One simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The request's handle.
    pub handle: u64,
    /// 0 or an NBD errno.
    pub error: u32,
}

fn rd<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl NbdClient {
    /// Connects to the unix socket and negotiates `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> io::Result<NbdClient> {
        let mut s = UnixStream::connect(socket)?;
        let magic = u64::from_be_bytes(rd(&mut s)?);
        let opt = u64::from_be_bytes(rd(&mut s)?);
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(bad(format!(
                "not a fixed newstyle server: magic {magic:#x} {opt:#x}"
            )));
        }
        let hflags = u16::from_be_bytes(rd(&mut s)?);
        if hflags & 1 == 0 {
            return Err(bad(format!(
                "server lacks FIXED_NEWSTYLE (flags {hflags:#x})"
            )));
        }
        s.write_all(&(1u32 | u32::from(hflags & 2)).to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut export_info = None;
        loop {
            let m = u64::from_be_bytes(rd(&mut s)?);
            let o = u32::from_be_bytes(rd(&mut s)?);
            let t = u32::from_be_bytes(rd(&mut s)?);
            let len = u32::from_be_bytes(rd(&mut s)?);
            if m != OPT_REPLY_MAGIC || o != OPT_GO {
                return Err(bad(format!("bad option reply: magic {m:#x} option {o}")));
            }
            if len > 64 * 1024 {
                return Err(bad(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            if t & 0x8000_0000 != 0 {
                return Err(bad(format!(
                    "NBD_OPT_GO refused: type {t:#x}: {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            if t == REP_INFO
                && data.len() >= 12
                && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT
            {
                let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                let flags = u16::from_be_bytes([data[10], data[11]]);
                export_info = Some((size, flags));
            }
            if t == REP_ACK {
                break;
            }
        }
        let (size, flags) =
            export_info.ok_or_else(|| bad("no NBD_INFO_EXPORT before ACK".into()))?;
        Ok(NbdClient {
            stream: s,
            size,
            flags,
        })
    }

    /// A second handle on the socket, for reading replies on another thread.
    pub fn reply_reader(&self) -> io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Sends one request (with `payload` for writes).
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(payload);
        self.stream.write_all(&h)
    }

    /// Sends a write.
    pub fn send_write(
        &mut self,
        handle: u64,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> io::Result<()> {
        self.send(
            CMD_WRITE,
            if fua { FLAG_FUA } else { 0 },
            handle,
            offset,
            data.len() as u32,
            data,
        )
    }

    /// Reads one simple reply header (no payload: not for reads).
    pub fn read_reply(r: &mut impl Read) -> io::Result<Reply> {
        let magic = u32::from_be_bytes(rd(r)?);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(bad(format!("reply magic {magic:#x}")));
        }
        let error = u32::from_be_bytes(rd(r)?);
        let handle = u64::from_be_bytes(rd(r)?);
        Ok(Reply { handle, error })
    }

    /// A write, waiting for its reply; returns the NBD error (0 = ok).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u32> {
        self.send_write(1, offset, data, fua)?;
        Ok(Self::read_reply(&mut self.stream)?.error)
    }

    /// A flush, waiting for its reply.
    pub fn flush(&mut self) -> io::Result<u32> {
        self.send(CMD_FLUSH, 0, 2, 0, 0, &[])?;
        Ok(Self::read_reply(&mut self.stream)?.error)
    }

    /// A read, waiting for its reply.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.send(CMD_READ, 0, 3, offset, len, &[])?;
        let r = Self::read_reply(&mut self.stream)?;
        if r.error != 0 {
            return Err(io::Error::other(format!(
                "read failed: NBD error {}",
                r.error
            )));
        }
        let mut v = vec![0u8; len as usize];
        self.stream.read_exact(&mut v)?;
        Ok(v)
    }

    /// `NBD_CMD_DISC` and close.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(CMD_DISC, 0, 0, 0, 0, &[])
    }
}
