//! Fixed newstyle handshake and option haggling.
//!
//! Supported options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (one
//! context, `base:allocation`; both need structured replies first, as block
//! status replies are structured). Everything else (STARTTLS, extended
//! headers, unknown numbers) gets `NBD_REP_ERR_UNSUP` after its data is
//! consumed. Protocol violations that make the stream unusable (bad magic,
//! unknown client flags, oversized or truncated options) close the
//! connection with the reason returned as an [`NbdError`].

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::error::NbdError;
use super::input::Input;
use super::proto::*;
use super::server::{Export, NbdServer};

/// What the handshake negotiated for the transmission phase.
#[derive(Debug)]
pub(crate) struct Session {
    /// Index into the server's exports.
    pub(crate) export: usize,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub(crate) structured: bool,
    /// The last `NBD_OPT_SET_META_CONTEXT` selected `base:allocation` for
    /// this export: `NBD_CMD_BLOCK_STATUS` is allowed.
    pub(crate) block_status: bool,
}

/// Result of the handshake: go to transmission, or the client aborted.
#[derive(Debug)]
pub(crate) enum Outcome {
    Transmission(Session),
    Aborted,
}

fn io_err(phase: &'static str) -> impl FnOnce(std::io::Error) -> NbdError {
    move |source| NbdError::Io { phase, source }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), NbdError> {
    w.write_all(bytes)
        .await
        .map_err(io_err("handshake write"))?;
    w.flush().await.map_err(io_err("handshake write"))
}

/// Runs the handshake on a fresh connection.
pub(crate) async fn negotiate<R, W>(
    server: &NbdServer,
    input: &mut Input<R>,
    w: &mut W,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Outcome, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(w, &hello).await?;

    if !input.fill(4).await.map_err(io_err("client flags"))? {
        return Err(NbdError::Truncated {
            what: "client flags",
            got: input.buf.len(),
            expected: 4,
        });
    }
    let client_flags = be_u32(&input.buf[..4]);
    let _ = input.buf.split_to(4);
    let unknown = client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if unknown != 0 {
        return Err(NbdError::BadClientFlags {
            flags: client_flags,
            unknown,
        });
    }
    // Clients without FIXED_NEWSTYLE only ever send EXPORT_NAME, which is
    // answered identically, so both kinds are served by the same loop.
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export whose `base:allocation` the last SET_META_CONTEXT selected.
    let mut meta_for: Option<usize> = None;

    loop {
        // Data first: an option that already arrived during shutdown is
        // answered NBD_REP_ERR_SHUTDOWN rather than dropped.
        let got = tokio::select! {
            biased;
            r = input.fill(OPTION_HEADER_LEN) => r.map_err(io_err("option header"))?,
            _ = shutdown.wait_for(|s| *s) => return Err(NbdError::Shutdown),
        };
        if !got {
            if input.buf.is_empty() {
                // A client may simply hang up during negotiation.
                return Err(NbdError::Truncated {
                    what: "option haggling (no option)",
                    got: 0,
                    expected: OPTION_HEADER_LEN,
                });
            }
            return Err(NbdError::Truncated {
                what: "option header",
                got: input.buf.len(),
                expected: OPTION_HEADER_LEN,
            });
        }
        let magic = be_u64(&input.buf[0..8]);
        if magic != IHAVEOPT {
            return Err(NbdError::BadOptionMagic {
                expected: IHAVEOPT,
                actual: magic,
            });
        }
        let option = be_u32(&input.buf[8..12]);
        let length = be_u32(&input.buf[12..16]);
        if length > server.limits.max_option_len {
            return Err(NbdError::OptionTooLong {
                option,
                length,
                bound: server.limits.max_option_len,
            });
        }
        let total = OPTION_HEADER_LEN + length as usize;
        if !input.fill(total).await.map_err(io_err("option data"))? {
            return Err(NbdError::Truncated {
                what: "option data",
                got: input.buf.len() - OPTION_HEADER_LEN,
                expected: length as usize,
            });
        }
        let msg = input.buf.split_to(total);
        let data = &msg[OPTION_HEADER_LEN..];
        tracing::debug!(option, length, "NBD option");

        let mut out = Vec::new();
        if *shutdown.borrow() {
            let rep = if option == OPT_ABORT {
                REP_ACK
            } else {
                REP_ERR_SHUTDOWN
            };
            put_option_reply(&mut out, option, rep, b"");
            send(w, &out).await?;
            return Err(NbdError::Shutdown);
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                let Some(idx) = lookup(server, &name) else {
                    return Err(NbdError::UnknownExport(name.into_owned()));
                };
                let e = &server.exports[idx];
                out.extend_from_slice(&e.engine.size().to_be_bytes());
                out.extend_from_slice(&e.transmission_flags(structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(w, &out).await?;
                return Ok(Outcome::Transmission(Session {
                    export: idx,
                    structured,
                    block_status: meta_for == Some(idx),
                }));
            }
            OPT_ABORT => {
                put_option_reply(&mut out, option, REP_ACK, b"");
                // The client may already have closed; a failed ACK is fine.
                let _ = send(w, &out).await;
                return Ok(Outcome::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    put_option_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    );
                } else {
                    for e in &server.exports {
                        let mut item = Vec::with_capacity(4 + e.name.len());
                        item.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        item.extend_from_slice(e.name.as_bytes());
                        put_option_reply(&mut out, option, REP_SERVER, &item);
                    }
                    put_option_reply(&mut out, option, REP_ACK, b"");
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    put_option_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    structured = true;
                    put_option_reply(&mut out, option, REP_ACK, b"");
                }
            }
            OPT_INFO | OPT_GO => match InfoRequest::decode(data) {
                Err(e) => {
                    put_option_reply(&mut out, option, REP_ERR_INVALID, e.to_string().as_bytes());
                }
                Ok(req) => match lookup(server, &req.name) {
                    None => {
                        let msg = format!("unknown export {:?}", req.name);
                        put_option_reply(
                            &mut out,
                            option,
                            REP_ERR_UNKNOWN,
                            cut_to_string_limit(&msg).as_bytes(),
                        );
                    }
                    Some(idx) => {
                        put_export_info(&mut out, option, &server.exports[idx], &req, structured);
                        put_option_reply(&mut out, option, REP_ACK, b"");
                        if option == OPT_GO {
                            send(w, &out).await?;
                            return Ok(Outcome::Transmission(Session {
                                export: idx,
                                structured,
                                block_status: meta_for == Some(idx),
                            }));
                        }
                    }
                },
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection, even when it fails.
                    meta_for = None;
                }
                meta_context(server, option, data, structured, &mut out, &mut meta_for);
            }
            _ => {
                // STARTTLS, extended headers and unknown options.
                let msg = format!("option {option} not supported");
                put_option_reply(&mut out, option, REP_ERR_UNSUP, msg.as_bytes());
            }
        }
        send(w, &out).await?;
    }
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` into
/// `out`. The one context is `base:allocation`. LIST with no query, or with
/// `base:` or `base:allocation`, lists it (id 0, reserved for LIST); SET
/// selects it only when asked by its full name (the protocol has SET ignore
/// `base:`), records the export in `meta_for` and answers its id. Queries in
/// other namespaces, or other leaves of `base:`, are ignored, as the protocol
/// requires; an unknown export is `ERR_UNKNOWN`, a malformed payload
/// `ERR_INVALID` naming the fault.
fn meta_context(
    server: &NbdServer,
    option: u32,
    data: &[u8],
    structured: bool,
    out: &mut Vec<u8>,
    meta_for: &mut Option<usize>,
) {
    let set = option == OPT_SET_META_CONTEXT;
    if !structured {
        let msg: &[u8] = b"metadata contexts need NBD_OPT_STRUCTURED_REPLY first";
        put_option_reply(out, option, REP_ERR_INVALID, msg);
        return;
    }
    let req = match MetaContextRequest::decode(data) {
        Ok(req) => req,
        Err(e) => {
            // The message may quote a query of up to 4096 bytes: cut to the limit.
            let msg = e.to_string();
            put_option_reply(
                out,
                option,
                REP_ERR_INVALID,
                cut_to_string_limit(&msg).as_bytes(),
            );
            return;
        }
    };
    let Some(idx) = lookup(server, &req.name) else {
        let msg = format!("unknown export {:?}", req.name);
        put_option_reply(
            out,
            option,
            REP_ERR_UNKNOWN,
            cut_to_string_limit(&msg).as_bytes(),
        );
        return;
    };
    let named = req.queries.iter().any(|q| q == META_BASE_ALLOCATION);
    if set && named {
        put_meta_context(out, option, META_BASE_ALLOCATION_ID, META_BASE_ALLOCATION);
        *meta_for = Some(idx);
    } else if !set && (named || req.queries.is_empty() || req.queries.iter().any(|q| q == "base:"))
    {
        put_meta_context(out, option, 0, META_BASE_ALLOCATION);
    }
    put_option_reply(out, option, REP_ACK, b"");
}

fn lookup(server: &NbdServer, name: &str) -> Option<usize> {
    let e = server.find_export(name)?;
    server.exports.iter().position(|x| std::ptr::eq(x, e))
}

/// `NBD_REP_INFO` items: EXPORT always, BLOCK_SIZE always (the server
/// enforces non-default constraints, so it announces them unasked), NAME and
/// DESCRIPTION when requested.
fn put_export_info(
    out: &mut Vec<u8>,
    option: u32,
    e: &Export,
    req: &InfoRequest,
    structured: bool,
) {
    let mut item = Vec::with_capacity(14);
    item.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    item.extend_from_slice(&e.engine.size().to_be_bytes());
    item.extend_from_slice(&e.transmission_flags(structured).to_be_bytes());
    put_option_reply(out, option, REP_INFO, &item);

    item.clear();
    item.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    item.extend_from_slice(&e.block_sizes.minimum.to_be_bytes());
    item.extend_from_slice(&e.block_sizes.preferred.to_be_bytes());
    item.extend_from_slice(&e.block_sizes.maximum.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &item);

    if req.infos.contains(&INFO_NAME) {
        item.clear();
        item.extend_from_slice(&INFO_NAME.to_be_bytes());
        item.extend_from_slice(e.name.as_bytes());
        put_option_reply(out, option, REP_INFO, &item);
    }
    if req.infos.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
        item.clear();
        item.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        item.extend_from_slice(e.description.as_bytes());
        put_option_reply(out, option, REP_INFO, &item);
    }
}
