//! Fuzz target `decode`: arbitrary bytes through `check`, `Frame::parse` and the streaming
//! `Decoder` (fed in input-dependent chunks). Asserts the decoders agree with each other and
//! that every frame that parses re-encodes to exactly the bytes it was parsed from.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use mirror_proto::{check, Check, Decoder, Frame, ProtoError, HEADER_LEN, MAGIC, PROTOCOL_VERSION};

/// A parsed frame must encode back to the identical bytes, one-shot and vectored.
fn assert_round_trip(frame: &Frame, wire: &[u8]) {
    let mut out = BytesMut::new();
    frame
        .encode(&mut out)
        .expect("a frame that parsed must encode");
    assert_eq!(&out[..], wire, "re-encoding differs from the input");
    let reparsed = Frame::parse(&out.clone().freeze()).expect("re-encoded frame must parse");
    assert_eq!(&reparsed, frame);
    let mut prefix = BytesMut::new();
    let tail = frame.encode_vectored(&mut prefix).expect("vectored encode");
    let mut joined = prefix.to_vec();
    if let Some(t) = tail {
        joined.extend_from_slice(&t);
    }
    assert_eq!(&joined[..], wire, "vectored encoding differs");
}

/// All frames at the front of `input`, then the terminal state, via check + parse.
fn split_with_check(input: &Bytes) -> (Vec<Frame>, Result<usize, ProtoError>) {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let rest = input.slice(pos..);
        match check(&rest) {
            Ok(Check::Incomplete { needed }) => {
                assert!(needed > 0);
                if rest.len() < HEADER_LEN {
                    assert_eq!(needed, HEADER_LEN - rest.len());
                }
                assert_eq!(Frame::parse(&rest), Err(ProtoError::Truncated { needed }));
                return (frames, Ok(rest.len()));
            }
            Ok(Check::Complete { frame_len }) => {
                assert!(frame_len >= HEADER_LEN && frame_len <= rest.len());
                let wire = rest.slice(..frame_len);
                match Frame::parse(&wire) {
                    Ok(f) => {
                        assert_round_trip(&f, &wire);
                        frames.push(f);
                        pos += frame_len;
                    }
                    Err(e) => {
                        // check() already vouched for the header and payload CRC.
                        assert!(
                            matches!(
                                e,
                                ProtoError::Malformed { .. } | ProtoError::DataChecksum { .. }
                            ),
                            "unexpected parse error after Complete: {e:?}"
                        );
                        return (frames, Err(e));
                    }
                }
            }
            Err(e) => {
                assert_eq!(
                    Frame::parse(&rest).unwrap_err(),
                    e,
                    "parse must report what check reports"
                );
                return (frames, Err(e));
            }
        }
    }
}

/// Wraps fuzz bytes as `kind, flags(2), payload...` in a header with correct CRCs, so the
/// payload parsers are reached without the fuzzer having to forge two CRC-32s.
fn framed(data: &[u8]) -> Option<Vec<u8>> {
    let (&kind, rest) = data.split_first()?;
    let (flags, payload) = rest.split_at_checked(2)?;
    let mut w = Vec::with_capacity(HEADER_LEN + payload.len());
    w.extend_from_slice(&MAGIC.to_le_bytes());
    w.push(PROTOCOL_VERSION);
    w.push(kind);
    w.extend_from_slice(flags);
    w.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
    w.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    w.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let hc = crc32fast::hash(&w);
    w.extend_from_slice(&hc.to_le_bytes());
    w.extend_from_slice(payload);
    Some(w)
}

fuzz_target!(|data: &[u8]| {
    decode_all(data);
    if let Some(w) = framed(data) {
        decode_all(&w);
    }
});

fn decode_all(data: &[u8]) {
    let input = Bytes::copy_from_slice(data);
    let (frames, end) = split_with_check(&input);

    // Streaming decoder, fed in chunks whose size depends on the input.
    let chunk = 1 + data.first().map_or(0, |b| usize::from(*b) % 61);
    let mut dec = Decoder::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut err = None;
    'feed: for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => got.push(f),
                Ok(None) => {
                    assert!(dec.needed() > 0);
                    break;
                }
                Err(e) => {
                    err = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got, frames, "streaming decoder disagrees with check/parse");
    match end {
        Ok(leftover) => {
            assert_eq!(err, None);
            assert_eq!(buf.len(), leftover);
        }
        Err(e) => assert_eq!(err, Some(e)),
    }
}
