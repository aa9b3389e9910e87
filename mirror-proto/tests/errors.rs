//! One test per typed error, with the detail (expected/actual, got/supported, len/max) checked.

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use mirror_proto::*;

fn ping() -> Bytes {
    encode(&Frame::new(
        42,
        Message::Ping {
            nonce: 1,
            timestamp_ns: 2,
        },
    ))
}

fn hello_payload(node: &[u8]) -> Vec<u8> {
    let mut p = vec![1, 1]; // version_count = 1, versions = [1]
    p.push(node.len() as u8);
    p.extend_from_slice(node);
    for n in [&b"c"[..], b"r"] {
        p.push(n.len() as u8);
        p.extend_from_slice(n);
    }
    p.extend_from_slice(&1u64.to_le_bytes()); // volume_size
    p.extend_from_slice(&4096u32.to_le_bytes()); // region_size
    p.push(Role::Standby as u8);
    p.push(DiskState::UpToDate as u8);
    p.extend_from_slice(&0u16.to_le_bytes()); // features
    p.extend_from_slice(&5u64.to_le_bytes()); // generation.current
    p.extend_from_slice(&0u64.to_le_bytes()); // generation.bitmap
    p.push(0); // history_count
    p
}

fn parse(v: Vec<u8>) -> Result<Frame, ProtoError> {
    Frame::parse(&Bytes::from(v))
}

#[test]
fn raw_builder_matches_encoder() {
    // The test-side byte-by-byte builder (from docs/protocol.md) agrees with the encoder.
    let mut p = 1u64.to_le_bytes().to_vec();
    p.extend_from_slice(&2u64.to_le_bytes());
    assert_eq!(raw_frame(1, 0x30, 0, 42, &p), ping().to_vec());
    let f = parse(raw_frame(1, 0x01, 0, 0, &hello_payload(b"node-a"))).unwrap();
    let Message::Hello(h) = f.msg else {
        panic!("not hello")
    };
    assert_eq!(h.node_name, "node-a");
    assert_eq!(h.versions, vec![1]);
}

#[test]
fn bad_magic() {
    let mut w = ping().to_vec();
    w[0..4].copy_from_slice(b"XXXX");
    let want = ProtoError::BadMagic {
        got: u32::from_le_bytes(*b"XXXX"),
    };
    assert_eq!(check(&w), Err(want));
    assert_eq!(parse(w), Err(want));
    assert!(want.to_string().contains("0x58585858"), "{want}");
}

#[test]
fn unsupported_version_reports_got_and_supported() {
    let mut w = ping().to_vec();
    w[4] = 9;
    fix_header_crc(&mut w);
    let err = check(&w).unwrap_err();
    assert_eq!(
        err,
        ProtoError::UnsupportedVersion {
            got: 9,
            supported: &[1]
        }
    );
    // Version is checked before the header CRC: a newer peer is told "version", not "corrupt".
    w[24] ^= 0xFF;
    assert_eq!(check(&w).unwrap_err(), err);
    assert!(
        err.to_string().contains("9") && err.to_string().contains("[1]"),
        "{err}"
    );
}

#[test]
fn header_checksum_mismatch_reports_expected_and_actual() {
    let mut w = ping().to_vec();
    let declared = u32::from_le_bytes(w[24..28].try_into().unwrap());
    w[8] ^= 1; // seq bit flip
    let actual = crc32fast::hash(&w[..24]);
    assert_ne!(declared, actual);
    let want = ProtoError::HeaderChecksum {
        expected: declared,
        actual,
    };
    assert_eq!(
        check(&w[..HEADER_LEN]),
        Err(want),
        "detected on the header alone"
    );
    assert_eq!(parse(w), Err(want));
}

#[test]
fn payload_checksum_mismatch_reports_expected_and_actual() {
    let mut w = ping().to_vec();
    let declared = u32::from_le_bytes(w[20..24].try_into().unwrap());
    w[HEADER_LEN + 3] ^= 0x80;
    let actual = crc32fast::hash(&w[HEADER_LEN..]);
    let want = ProtoError::PayloadChecksum {
        expected: declared,
        actual,
    };
    assert_eq!(check(&w), Err(want));
    let mut buf = BytesMut::from(&w[..]);
    assert_eq!(Decoder::new().decode(&mut buf), Err(want));
}

#[test]
fn too_large_from_the_header_alone() {
    // A Write header declaring ~4 GiB: rejected with only the 28 header bytes present.
    let mut h = raw_frame(1, MessageKind::Write.as_u8(), 0, 1, &[]);
    h[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    fix_header_crc(&mut h);
    let want = ProtoError::TooLarge {
        len: u64::from(u32::MAX),
        max: (MAX_DATA_LEN + 12) as u64,
    };
    assert_eq!(check(&h), Err(want));
    assert_eq!(parse(h.clone()), Err(want));
    let mut buf = BytesMut::from(&h[..]);
    assert_eq!(Decoder::new().decode(&mut buf), Err(want));
    // Per-kind bound: a 17-byte Ping is too large for Ping's fixed 16 bytes.
    let w = raw_frame(1, MessageKind::Ping.as_u8(), 0, 1, &[0u8; 17]);
    assert_eq!(
        check(&w[..HEADER_LEN]),
        Err(ProtoError::TooLarge { len: 17, max: 16 })
    );
    // Every kind's bound is within MAX_PAYLOAD.
    for k in MessageKind::ALL {
        assert!(k.max_payload() as usize <= MAX_PAYLOAD, "{k:?}");
    }
}

#[test]
fn unknown_kind() {
    for kind in [0x00u8, 0x05, 0x7F, 0xFF] {
        let w = raw_frame(1, kind, 0, 1, &[]);
        assert_eq!(check(&w), Err(ProtoError::UnknownKind { kind }));
    }
}

#[test]
fn unknown_or_disallowed_flags_are_malformed() {
    // FUA on a Ping: not allowed for that kind.
    let w = raw_frame(1, MessageKind::Ping.as_u8(), FLAG_FUA, 1, &[0u8; 16]);
    assert_eq!(
        check(&w),
        Err(ProtoError::Malformed {
            kind: MessageKind::Ping,
            field: "flags",
            reason: Malformation::UnknownFlags { bits: 1 }
        })
    );
    // Reserved bit 15 on a Write.
    let mut p = 0u64.to_le_bytes().to_vec();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.push(0xAB);
    let w = raw_frame(1, MessageKind::Write.as_u8(), 0x8001, 1, &p);
    assert_eq!(
        check(&w),
        Err(ProtoError::Malformed {
            kind: MessageKind::Write,
            field: "flags",
            reason: Malformation::UnknownFlags { bits: 0x8000 }
        })
    );
    // NO_HOLE only on WriteZeroes.
    let w = raw_frame(1, MessageKind::Trim.as_u8(), FLAG_NO_HOLE, 1, &[1u8; 16]);
    assert!(matches!(
        check(&w),
        Err(ProtoError::Malformed { field: "flags", .. })
    ));
}

#[test]
fn name_length_past_payload_end() {
    let mut p = vec![1, 1];
    p.push(200); // node_name claims 200 bytes
    p.extend_from_slice(b"short");
    let err = parse(raw_frame(1, 0x01, 0, 0, &p)).unwrap_err();
    assert_eq!(
        err,
        ProtoError::Malformed {
            kind: MessageKind::Hello,
            field: "node_name",
            reason: Malformation::Truncated { need: 200, have: 5 }
        }
    );
    assert!(err.to_string().contains("node_name"), "{err}");
}

#[test]
fn invalid_utf8_name_and_error_message() {
    let err = parse(raw_frame(
        1,
        0x01,
        0,
        0,
        &hello_payload(&[b'a', 0xFF, 0xFE]),
    ))
    .unwrap_err();
    assert_eq!(
        err,
        ProtoError::Malformed {
            kind: MessageKind::Hello,
            field: "node_name",
            reason: Malformation::InvalidUtf8
        }
    );
    let mut p = 7u32.to_le_bytes().to_vec();
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&[0xC3, 0x28]);
    let err = parse(raw_frame(1, MessageKind::Error.as_u8(), 0, 0, &p)).unwrap_err();
    assert_eq!(
        err,
        ProtoError::Malformed {
            kind: MessageKind::Error,
            field: "message",
            reason: Malformation::InvalidUtf8
        }
    );
}

#[test]
fn empty_name_and_bounded_lists() {
    assert_eq!(
        parse(raw_frame(1, 0x01, 0, 0, &hello_payload(b""))).unwrap_err(),
        ProtoError::Malformed {
            kind: MessageKind::Hello,
            field: "node_name",
            reason: Malformation::Empty
        }
    );
    // Error message length above 4096 is refused before reading it.
    let mut p = 7u32.to_le_bytes().to_vec();
    p.extend_from_slice(&5000u16.to_le_bytes());
    let err = parse(raw_frame(1, MessageKind::Error.as_u8(), 0, 0, &p)).unwrap_err();
    assert_eq!(
        err,
        ProtoError::Malformed {
            kind: MessageKind::Error,
            field: "message",
            reason: Malformation::TooLong {
                len: 5000,
                max: MAX_ERROR_MESSAGE_LEN
            }
        }
    );
    // Generation history count above 16.
    let mut p = vec![Role::Active as u8, DiskState::UpToDate as u8];
    p.extend_from_slice(&[0u8; 16]);
    p.push(17); // count checked against the bound before the entries are read
    let err = parse(raw_frame(1, MessageKind::StateChange.as_u8(), 0, 0, &p)).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::Malformed {
            field: "generation.history",
            reason: Malformation::TooLong { len: 17, max: 16 },
            ..
        }
    ));
    // Checksum entry count that disagrees with the payload.
    let mut p = 4096u32.to_le_bytes().to_vec();
    p.extend_from_slice(&3u32.to_le_bytes());
    p.extend_from_slice(&[0u8; 12]);
    let err = parse(raw_frame(1, MessageKind::ChecksumRequest.as_u8(), 0, 0, &p)).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::Malformed {
            field: "entries",
            reason: Malformation::LengthMismatch {
                declared: 36,
                actual: 12
            },
            ..
        }
    ));
}

#[test]
fn invalid_enum_values_and_trailing_bytes() {
    let err = parse(raw_frame(1, MessageKind::Goodbye.as_u8(), 0, 0, &[9])).unwrap_err();
    assert_eq!(
        err,
        ProtoError::Malformed {
            kind: MessageKind::Goodbye,
            field: "reason",
            reason: Malformation::InvalidValue { value: 9 }
        }
    );
    let err = parse(raw_frame(1, MessageKind::AuthResult.as_u8(), 0, 0, &[2])).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::Malformed {
            field: "accepted",
            ..
        }
    ));
    // Ack1 with 8 bytes + 4 extra (fits the bound of nothing: Ack1's bound is 8 → TooLarge).
    let err = parse(raw_frame(1, MessageKind::Ack1.as_u8(), 0, 0, &[0u8; 12])).unwrap_err();
    assert_eq!(err, ProtoError::TooLarge { len: 12, max: 8 });
    // Hello with a byte after the generation block.
    let mut p = hello_payload(b"n");
    p.push(0);
    let err = parse(raw_frame(1, 0x01, 0, 0, &p)).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::Malformed {
            reason: Malformation::TrailingBytes { extra: 1 },
            ..
        }
    ));
}

#[test]
fn write_length_field_must_match_data() {
    let mut p = 0u64.to_le_bytes().to_vec();
    p.extend_from_slice(&10u32.to_le_bytes());
    p.extend_from_slice(&[1, 2, 3]);
    let err = parse(raw_frame(1, MessageKind::Write.as_u8(), 0, 0, &p)).unwrap_err();
    assert_eq!(
        err,
        ProtoError::Malformed {
            kind: MessageKind::Write,
            field: "length",
            reason: Malformation::LengthMismatch {
                declared: 10,
                actual: 3
            }
        }
    );
    // offset + length overflow.
    let mut p = (u64::MAX - 1).to_le_bytes().to_vec();
    p.extend_from_slice(&3u32.to_le_bytes());
    p.extend_from_slice(&[1, 2, 3]);
    let err = parse(raw_frame(1, MessageKind::Write.as_u8(), 0, 0, &p)).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::Malformed {
            reason: Malformation::RangeOverflow { .. },
            ..
        }
    ));
}

#[test]
fn resync_data_checksum_mismatch() {
    let data = [7u8; 100];
    let good = crc32fast::hash(&data);
    let mut p = 512u64.to_le_bytes().to_vec();
    p.extend_from_slice(&(good ^ 1).to_le_bytes());
    p.extend_from_slice(&100u32.to_le_bytes());
    p.extend_from_slice(&data);
    let want = ProtoError::DataChecksum {
        offset: 512,
        expected: good ^ 1,
        actual: good,
    };
    assert_eq!(
        parse(raw_frame(1, MessageKind::ResyncData.as_u8(), 0, 0, &p)),
        Err(want)
    );
    // The encoder does not hash the data again: it derives the payload CRC
    // from the (wrong) checksum, so the receiver rejects the frame.
    let f = Frame::new(
        0,
        Message::ResyncData {
            offset: 512,
            checksum: good ^ 1,
            data: Bytes::copy_from_slice(&data),
        },
    );
    let wire = f.to_bytes().expect("encodes");
    assert!(
        matches!(
            Frame::parse(&wire),
            Err(ProtoError::PayloadChecksum { expected, actual }) if expected != actual
        ),
        "{:?}",
        Frame::parse(&wire)
    );
    // A correct checksum round-trips (payload CRC combined = computed).
    let ok = Frame::new(
        0,
        Message::ResyncData {
            offset: 512,
            checksum: good,
            data: Bytes::copy_from_slice(&data),
        },
    );
    assert_eq!(Frame::parse(&ok.to_bytes().unwrap()), Ok(ok));
}

#[test]
fn bitmap_padding_and_index() {
    let mut p = Vec::new();
    for v in [0u32, 1, 4096, 3] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(&0u64.to_le_bytes());
    p.push(0b0000_1111); // region_count 3 but bit 3 set
    let err = parse(raw_frame(1, MessageKind::BitmapChunk.as_u8(), 0, 0, &p)).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::Malformed {
            field: "bits",
            reason: Malformation::Constraint(_),
            ..
        }
    ));
    p[24] = 0b0000_0111;
    assert!(parse(raw_frame(1, MessageKind::BitmapChunk.as_u8(), 0, 0, &p)).is_ok());
    p[0] = 1; // chunk_index 1 of total 1
    let err = parse(raw_frame(1, MessageKind::BitmapChunk.as_u8(), 0, 0, &p)).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::Malformed {
            field: "chunk_index",
            ..
        }
    ));
}

#[test]
fn parse_wants_exactly_one_frame() {
    let w = ping();
    assert_eq!(
        Frame::parse(&w.slice(..30)),
        Err(ProtoError::Truncated {
            needed: w.len() - 30
        })
    );
    let mut two = w.to_vec();
    two.extend_from_slice(&w);
    assert_eq!(
        Frame::parse(&Bytes::from(two.clone())),
        Err(ProtoError::TrailingBytes {
            frame_len: w.len(),
            extra: w.len()
        })
    );
    // check() itself ignores what follows the first frame.
    assert_eq!(check(&two), Ok(Check::Complete { frame_len: w.len() }));
}

#[test]
fn encoder_refuses_invalid_messages_and_leaves_output_untouched() {
    let hello = |node: &str, versions: Vec<u8>| {
        Message::Hello(Hello {
            versions,
            node_name: node.into(),
            cluster_name: "c".into(),
            resource_name: "r".into(),
            volume_size: 1,
            region_size: 4096,
            role: Role::None,
            disk_state: DiskState::Consistent,
            features: Features::empty(),
            generation: Generation::default(),
        })
    };
    let long = "x".repeat(256);
    let cases: Vec<(Message, &'static str)> = vec![
        (hello(&long, vec![1]), "node_name"),
        (hello("", vec![1]), "node_name"),
        (hello("a", vec![]), "versions"),
        (hello("a", vec![2, 1]), "versions"),
        (hello("a", vec![0, 1]), "versions"),
        (
            Message::Error {
                code: 1,
                message: "e".repeat(4097),
            },
            "message",
        ),
        (Message::Ack2 { seq: 1, status: 5 }, "status"),
        (
            Message::Write {
                offset: 0,
                fua: false,
                data: Bytes::new(),
            },
            "length",
        ),
        (
            Message::Trim {
                offset: 1,
                length: u64::MAX,
                fua: false,
            },
            "length",
        ),
        (
            Message::ChecksumRequest {
                region_size: 4096,
                entries: vec![],
            },
            "entries",
        ),
        (
            Message::ChecksumReply {
                request_seq: 1,
                region_size: 3,
                entries: vec![],
            },
            "region_size",
        ),
        (
            Message::StateChange {
                role: Role::Active,
                disk_state: DiskState::UpToDate,
                generation: Generation {
                    current: 1,
                    bitmap: 0,
                    history: vec![0; 17],
                },
            },
            "generation.history",
        ),
    ];
    for (msg, field) in cases {
        let mut out = BytesMut::from(&b"prefix"[..]);
        match Frame::new(1, msg.clone()).encode(&mut out) {
            Err(ProtoError::Malformed { field: f, .. }) => assert_eq!(f, field, "{msg:?}"),
            other => panic!("{msg:?}: expected Malformed({field}), got {other:?}"),
        }
        assert_eq!(&out[..], b"prefix");
    }
}

#[test]
fn negotiation_picks_highest_common() {
    assert_eq!(negotiate_version(&[1, 2, 3], &[2, 3, 4]), Some(3));
    assert_eq!(negotiate_version(&[1], &[2]), None);
    assert_eq!(
        negotiate_version(SUPPORTED_VERSIONS, SUPPORTED_VERSIONS),
        Some(PROTOCOL_VERSION)
    );
    assert_eq!(negotiate_version(&[], &[1]), None);
}

#[test]
fn handshake_kinds_allowed_before_auth() {
    let allowed: Vec<_> = MessageKind::ALL
        .iter()
        .filter(|k| k.allowed_before_auth())
        .collect();
    assert_eq!(
        allowed,
        [
            &MessageKind::Hello,
            &MessageKind::AuthChallenge,
            &MessageKind::AuthResponse,
            &MessageKind::AuthResult,
            &MessageKind::Error,
            &MessageKind::Goodbye
        ]
    );
    for k in [
        MessageKind::Write,
        MessageKind::Trim,
        MessageKind::ResyncData,
        MessageKind::BitmapChunk,
    ] {
        assert!(!k.allowed_before_auth());
    }
}

#[test]
fn control_payload_errors() {
    let k = MessageKind::Control.as_u8();
    let ctl = |len: u32, text: &[u8]| {
        let mut p = len.to_le_bytes().to_vec();
        p.extend_from_slice(text);
        parse(raw_frame(1, k, 0, 1, &p))
    };
    assert_eq!(
        ctl(0, b""),
        Err(ProtoError::Malformed {
            kind: MessageKind::Control,
            field: "length",
            reason: Malformation::Empty
        })
    );
    // A declared length over the bound is refused before reading the text.
    assert_eq!(
        ctl(MAX_CONTROL_LEN as u32 + 1, b"{}"),
        Err(ProtoError::Malformed {
            kind: MessageKind::Control,
            field: "length",
            reason: Malformation::TooLong {
                len: MAX_CONTROL_LEN + 1,
                max: MAX_CONTROL_LEN
            }
        })
    );
    assert!(matches!(
        ctl(2, &[0xC3, 0x28]),
        Err(ProtoError::Malformed {
            kind: MessageKind::Control,
            reason: Malformation::InvalidUtf8,
            ..
        })
    ));
    assert!(matches!(
        ctl(1, b"{}"),
        Err(ProtoError::Malformed {
            kind: MessageKind::Control,
            reason: Malformation::TrailingBytes { extra: 1 },
            ..
        })
    ));
    assert!(matches!(
        ctl(3, b"{}"),
        Err(ProtoError::Malformed {
            kind: MessageKind::Control,
            reason: Malformation::Truncated { .. },
            ..
        })
    ));
    // Payload over the kind's bound: refused from the header.
    let big = vec![b'x'; MAX_CONTROL_LEN + 1];
    assert!(matches!(
        ctl(big.len() as u32, &big),
        Err(ProtoError::TooLarge { .. })
    ));
    // Encoding refuses what parsing refuses.
    let f = Frame::new(
        1,
        Message::Control {
            json: String::new(),
        },
    );
    assert!(f.to_bytes().is_err());
    let f = Frame::new(
        1,
        Message::Control {
            json: "x".repeat(MAX_CONTROL_LEN + 1),
        },
    );
    assert!(f.to_bytes().is_err());
    assert!(!MessageKind::Control.allowed_before_auth());
}
