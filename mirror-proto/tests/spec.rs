//! Byte-exact vectors from docs/protocol.md, so the document and the code cannot drift apart.

use bytes::Bytes;
use mirror_proto::*;

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

#[test]
fn spec_worked_example() {
    // docs/protocol.md §2.2
    let want = hex(
        "4e 42 4d 52 01 30 00 00 05 00 00 00 00 00 00 00 10 00 00 00 80 9c 13 47 ae c0 70 aa \
         88 77 66 55 44 33 22 11 40 42 0f 00 00 00 00 00",
    );
    let f = Frame::new(
        5,
        Message::Ping {
            nonce: 0x1122_3344_5566_7788,
            timestamp_ns: 1_000_000,
        },
    );
    assert_eq!(f.to_bytes().unwrap().to_vec(), want);
    assert_eq!(Frame::parse(&Bytes::from(want)).unwrap(), f);
}

#[test]
fn spec_constants() {
    assert_eq!(MAGIC, 0x524D_424E);
    assert_eq!(&MAGIC.to_le_bytes(), b"NBMR");
    assert_eq!(HEADER_LEN, 28);
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32fast::hash(b""), 0);
    assert_eq!(MAX_DATA_LEN, 32 << 20);
    assert_eq!(MAX_PAYLOAD, MAX_DATA_LEN + 64);
    // Per-kind bounds as tabulated in §4.
    let table: [(MessageKind, usize); 22] = [
        (MessageKind::Hello, 946),
        (MessageKind::AuthChallenge, 32),
        (MessageKind::AuthResponse, 32),
        (MessageKind::AuthResult, 1),
        (MessageKind::Write, 12 + MAX_DATA_LEN),
        (MessageKind::Ack1, 8),
        (MessageKind::Ack2, 12),
        (MessageKind::Flush, 0),
        (MessageKind::FlushAck, 12),
        (MessageKind::Trim, 16),
        (MessageKind::WriteZeroes, 16),
        (MessageKind::BitmapChunk, 24 + MAX_DATA_LEN),
        (MessageKind::ResyncRequest, 12),
        (MessageKind::ResyncData, 16 + MAX_DATA_LEN),
        (MessageKind::ChecksumRequest, 8 + 12 * 8192),
        (MessageKind::ChecksumReply, 16 + 12 * 8192),
        (MessageKind::Ping, 16),
        (MessageKind::Pong, 16),
        (MessageKind::StateChange, 147),
        (MessageKind::Error, 6 + 4096),
        (MessageKind::Goodbye, 1),
        (MessageKind::Control, 4 + 65536),
    ];
    for (k, max) in table {
        assert_eq!(k.max_payload() as usize, max, "{k:?}");
    }
    // Kind wire values (§6).
    let values: Vec<u8> = MessageKind::ALL.iter().map(|k| k.as_u8()).collect();
    assert_eq!(
        values,
        [
            0x01, 0x02, 0x03, 0x04, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x20, 0x21, 0x22,
            0x23, 0x24, 0x30, 0x31, 0x32, 0x33, 0x34, 0x40
        ]
    );
    for v in 0..=255u8 {
        assert_eq!(
            MessageKind::from_u8(v).map(MessageKind::as_u8),
            values.contains(&v).then_some(v)
        );
    }
}

#[test]
fn largest_hello_is_exactly_its_bound() {
    let name = "n".repeat(MAX_NAME_LEN);
    let f = Frame::new(
        1,
        Message::Hello(Hello {
            versions: (1..=MAX_VERSIONS as u8).collect(),
            node_name: name.clone(),
            cluster_name: name.clone(),
            resource_name: name,
            volume_size: u64::MAX,
            region_size: 1 << 31,
            role: Role::Active,
            disk_state: DiskState::Diskless,
            features: Features::ALL,
            generation: Generation {
                current: 1,
                bitmap: 2,
                history: vec![3; MAX_GENERATION_HISTORY],
            },
        }),
    );
    let w = f.to_bytes().unwrap();
    assert_eq!(
        w.len() - HEADER_LEN,
        MessageKind::Hello.max_payload() as usize
    );
    assert_eq!(Frame::parse(&w).unwrap(), f);
}
