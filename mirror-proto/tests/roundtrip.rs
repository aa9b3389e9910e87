//! Round trip for every message kind, every-prefix incompleteness, streaming decode and
//! "arbitrary bytes never panic".

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use mirror_proto::*;
use proptest::prelude::*;

/// encode -> check -> parse == original, plus the vectored and streaming paths agree.
fn assert_round_trip(frame: &Frame) -> Result<(), TestCaseError> {
    let wire = encode(frame);
    prop_assert_eq!(
        check(&wire)?,
        Check::Complete {
            frame_len: wire.len()
        }
    );
    let parsed = Frame::parse(&wire)?;
    prop_assert_eq!(&parsed, frame);

    // Header fields as documented.
    let h = Header::decode(&wire)?;
    prop_assert_eq!(h.kind, frame.msg.kind());
    prop_assert_eq!(h.seq, frame.seq);
    prop_assert_eq!(h.flags, frame.msg.flags());
    prop_assert_eq!(h.payload_len as usize, wire.len() - HEADER_LEN);

    // Vectored: prefix + returned tail is byte-identical to the one-shot encoding.
    let mut prefix = BytesMut::new();
    let tail = frame.encode_vectored(&mut prefix)?;
    let mut joined = prefix.to_vec();
    if let Some(t) = &tail {
        joined.extend_from_slice(t);
    }
    prop_assert_eq!(&joined[..], &wire[..]);

    // Data payloads are zero-copy slices of the received buffer.
    let data_ptr = match &parsed.msg {
        Message::Write { data, .. } | Message::ResyncData { data, .. } => Some(data.as_ptr()),
        Message::BitmapChunk(c) => Some(c.bits.as_ptr()),
        _ => None,
    };
    if let Some(p) = data_ptr {
        let range = wire.as_ptr_range();
        prop_assert!(range.contains(&p), "data must point into the input buffer");
    }
    Ok(())
}

macro_rules! round_trip_kind {
    ($($name:ident => $kind:ident),* $(,)?) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]
            $(
                #[test]
                fn $name(msg in arb_message_of(MessageKind::$kind), seq in any::<u64>()) {
                    prop_assert_eq!(msg.kind(), MessageKind::$kind);
                    assert_round_trip(&Frame::new(seq, msg))?;
                }
            )*
        }
    };
}

round_trip_kind! {
    round_trip_hello => Hello,
    round_trip_auth_challenge => AuthChallenge,
    round_trip_auth_response => AuthResponse,
    round_trip_auth_result => AuthResult,
    round_trip_write => Write,
    round_trip_ack1 => Ack1,
    round_trip_ack2 => Ack2,
    round_trip_flush => Flush,
    round_trip_flush_ack => FlushAck,
    round_trip_trim => Trim,
    round_trip_write_zeroes => WriteZeroes,
    round_trip_bitmap_chunk => BitmapChunk,
    round_trip_resync_request => ResyncRequest,
    round_trip_resync_data => ResyncData,
    round_trip_checksum_request => ChecksumRequest,
    round_trip_checksum_reply => ChecksumReply,
    round_trip_ping => Ping,
    round_trip_pong => Pong,
    round_trip_state_change => StateChange,
    round_trip_error => Error,
    round_trip_goodbye => Goodbye,
    round_trip_control => Control,
}

/// The macro above must list every kind; this fails when a kind is added without a test.
#[test]
fn every_kind_has_a_round_trip_test() {
    let src = include_str!("roundtrip.rs");
    for k in MessageKind::ALL {
        let needle = format!("=> {k:?},");
        assert!(src.contains(&needle), "no round-trip test for {k:?}");
    }
}

#[test]
fn round_trip_largest_write_and_resync_data() {
    let data = Bytes::from(vec![0xA5u8; MAX_DATA_LEN]);
    for msg in [
        Message::Write {
            offset: 4096,
            fua: true,
            data: data.clone(),
        },
        Message::resync_data(0, data.clone()),
    ] {
        let f = Frame::new(1, msg);
        assert_round_trip(&f).unwrap();
    }
    // One byte more is refused by the encoder, and out is untouched.
    let big = Bytes::from(vec![0u8; MAX_DATA_LEN + 1]);
    let mut out = BytesMut::from(&b"keep"[..]);
    let err = Frame::new(
        1,
        Message::Write {
            offset: 0,
            fua: false,
            data: big,
        },
    )
    .encode(&mut out)
    .unwrap_err();
    assert!(matches!(
        err,
        ProtoError::Malformed {
            kind: MessageKind::Write,
            field: "length",
            reason: Malformation::TooLong { .. }
        }
    ));
    assert_eq!(&out[..], b"keep");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every strict prefix of a valid frame is Incomplete with the exact shortfall once the
    /// header is in; parse reports Truncated; the decoder returns Ok(None).
    #[test]
    fn every_prefix_is_incomplete(frame in arb_frame()) {
        let wire = encode(&frame);
        for n in 0..wire.len() {
            let prefix = &wire[..n];
            let needed = match check(prefix) {
                Ok(Check::Incomplete { needed }) => needed,
                other => return Err(TestCaseError::fail(format!("prefix {n}/{}: {other:?}", wire.len()))),
            };
            prop_assert!(needed > 0);
            if n < HEADER_LEN {
                prop_assert_eq!(needed, HEADER_LEN - n);
            } else {
                prop_assert_eq!(needed, wire.len() - n);
            }
            prop_assert_eq!(Frame::parse(&wire.slice(..n)), Err(ProtoError::Truncated { needed }));
            let mut buf = BytesMut::from(prefix);
            let mut dec = Decoder::new();
            prop_assert_eq!(dec.decode(&mut buf)?, None);
            prop_assert_eq!(dec.needed(), needed);
            prop_assert_eq!(buf.len(), n, "an incomplete frame must stay in the buffer");
        }
    }

    /// A stream of frames fed in arbitrary chunks decodes to the same frames in order.
    #[test]
    fn streaming_decoder_any_chunking(frames in prop::collection::vec(arb_frame(), 1..8),
                                      cuts in prop::collection::vec(1usize..600, 1..40)) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire)?;
        }
        let wire = wire.freeze();
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < wire.len() {
            let step = cuts[i % cuts.len()].min(wire.len() - pos);
            i += 1;
            buf.extend_from_slice(&wire[pos..pos + step]);
            pos += step;
            while let Some(f) = dec.decode(&mut buf)? {
                got.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    /// check/parse/decoder never panic on arbitrary bytes; anything accepted re-encodes identically.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let b = Bytes::from(bytes);
        let _ = check(&b);
        if let Ok(f) = Frame::parse(&b) {
            prop_assert_eq!(&encode(&f)[..], &b[..]);
        }
        let mut buf = BytesMut::from(&b[..]);
        let mut dec = Decoder::new();
        while let Ok(Some(f)) = dec.decode(&mut buf) {
            let _ = encode(&f);
        }
    }

    /// Valid header + CRCs around a random payload of any kind: exercises every payload
    /// parser on garbage. Never panics; anything accepted re-encodes byte-identically.
    #[test]
    fn random_payload_under_valid_header(kind in prop::sample::select(MessageKind::ALL.to_vec()),
                                         flags in any::<u16>(), seq in any::<u64>(),
                                         payload in prop::collection::vec(any::<u8>(), 0..400)) {
        let raw = Bytes::from(raw_frame(1, kind.as_u8(), flags, seq, &payload));
        match Frame::parse(&raw) {
            Ok(f) => {
                prop_assert_eq!(f.seq, seq);
                prop_assert_eq!(f.msg.kind(), kind);
                prop_assert_eq!(&encode(&f)[..], &raw[..]);
            }
            Err(e) => {
                // Garbage under a good header can only fail field-level checks.
                let field_level = matches!(e, ProtoError::Malformed { .. } | ProtoError::TooLarge { .. }
                    | ProtoError::DataChecksum { .. });
                prop_assert!(field_level, "unexpected error {e:?}");
            }
        }
    }

    /// Corrupting or truncating a valid frame never panics and never yields a different frame
    /// than one that re-encodes to exactly the corrupted bytes.
    #[test]
    fn mutated_frames_never_panic(frame in arb_frame(), idx in any::<prop::sample::Index>(), x in 1u8..=255,
                                  cut in any::<prop::sample::Index>()) {
        let mut wire = encode(&frame).to_vec();
        let i = idx.index(wire.len());
        wire[i] ^= x;
        let n = cut.index(wire.len() + 1);
        for buf in [Bytes::from(wire.clone()), Bytes::from(wire[..n].to_vec())] {
            let _ = check(&buf);
            if let Ok(f) = Frame::parse(&buf) {
                prop_assert_eq!(&encode(&f)[..], &buf[..]);
            }
        }
        // Flipping any single byte of the frame is always detected (header fields by the
        // header CRC, payload by the payload CRC, CRC fields by their own mismatch).
        prop_assert!(Frame::parse(&Bytes::from(wire)).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The prefix helpers for caller-owned buffers produce the same bytes as full encoding.
    #[test]
    fn prefix_helpers_match_full_encoding(seq in any::<u64>(), offset in 0u64..(1 << 50), fua in any::<bool>(),
                                          data in prop::collection::vec(any::<u8>(), 1..3000)) {
        let mut out = BytesMut::new();
        encode_write_prefix(seq, offset, fua, &data, &mut out)?;
        out.extend_from_slice(&data);
        let full = encode(&Frame::new(seq, Message::Write { offset, fua, data: Bytes::from(data.clone()) }));
        prop_assert_eq!(&out[..], &full[..]);

        let crc = crc32fast::hash(&data);
        let mut out = BytesMut::new();
        encode_resync_data_prefix(seq, offset, crc, &data, &mut out)?;
        out.extend_from_slice(&data);
        let full = encode(&Frame::new(seq, Message::resync_data(offset, Bytes::from(data.clone()))));
        prop_assert_eq!(&out[..], &full[..]);
        // The combined payload CRC is the plain CRC-32 of the payload bytes.
        prop_assert_eq!(
            u32::from_le_bytes(full[20..24].try_into().unwrap()),
            crc32fast::hash(&full[28..])
        );

        // A wrong checksum is not re-hashed by the encoder (one pass over the
        // data per side): the frame it yields is rejected by the receiver.
        let mut out = BytesMut::new();
        encode_resync_data_prefix(seq, offset, crc ^ 1, &data, &mut out)?;
        out.extend_from_slice(&data);
        let is_payload_crc_error = matches!(
            Frame::parse(&out.freeze()),
            Err(ProtoError::PayloadChecksum { .. })
        );
        prop_assert!(is_payload_crc_error);
    }
}
