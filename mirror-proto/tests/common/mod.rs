//! Shared test helpers: proptest strategies for every message kind and a raw frame builder.
#![allow(dead_code)]

use bytes::Bytes;
use mirror_proto::*;
use proptest::prelude::*;

/// Builds a frame byte by byte from docs/protocol.md (independent of the crate's encoder),
/// with correct header and payload CRCs.
pub fn raw_frame(version: u8, kind: u8, flags: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(28 + payload.len());
    h.extend_from_slice(b"NBMR");
    h.push(version);
    h.push(kind);
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    h.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let hc = crc32fast::hash(&h[..24]);
    h.extend_from_slice(&hc.to_le_bytes());
    h.extend_from_slice(payload);
    h
}

/// Recomputes the header CRC after a test edited header bytes 0..24.
pub fn fix_header_crc(frame: &mut [u8]) {
    let c = crc32fast::hash(&frame[..24]);
    frame[24..28].copy_from_slice(&c.to_le_bytes());
}

pub fn encode(f: &Frame) -> Bytes {
    f.to_bytes().expect("valid frame encodes")
}

fn name() -> impl Strategy<Value = String> {
    // Mix ASCII and multi-byte UTF-8; bound by bytes, not chars.
    prop::collection::vec(
        prop_oneof![
            any::<char>(),
            "[a-z0-9-]".prop_map(|s: String| s.chars().next().unwrap_or('a'))
        ],
        1..80,
    )
    .prop_map(|cs| {
        let mut s = String::new();
        for c in cs {
            if s.len() + c.len_utf8() > MAX_NAME_LEN {
                break;
            }
            s.push(c);
        }
        s
    })
}

fn data(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 1..max).prop_map(Bytes::from)
}

fn generation() -> impl Strategy<Value = Generation> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(any::<u64>(), 0..=MAX_GENERATION_HISTORY),
    )
        .prop_map(|(current, bitmap, history)| Generation {
            current,
            bitmap,
            history,
        })
}

fn role() -> impl Strategy<Value = Role> {
    prop::sample::select(vec![Role::None, Role::Standby, Role::Active])
}

fn disk_state() -> impl Strategy<Value = DiskState> {
    prop::sample::select(vec![
        DiskState::UpToDate,
        DiskState::Consistent,
        DiskState::Outdated,
        DiskState::Inconsistent,
        DiskState::Failed,
        DiskState::Diskless,
    ])
}

fn region_size() -> impl Strategy<Value = u32> {
    (0u32..32).prop_map(|s| 1u32 << s)
}

/// (offset, length) with length >= 1 and no overflow.
fn range(max_len: u64) -> impl Strategy<Value = (u64, u64)> {
    (1..=max_len).prop_flat_map(|len| (0..=u64::MAX - len, Just(len)))
}

fn status() -> impl Strategy<Value = i32> {
    prop_oneof![Just(0), i32::MIN..=0]
}

fn entries(min: usize) -> impl Strategy<Value = Vec<RegionChecksum>> {
    prop::collection::vec(
        (any::<u64>(), any::<u32>())
            .prop_map(|(region, checksum)| RegionChecksum { region, checksum }),
        min..200,
    )
}

/// A strategy producing valid messages of exactly `kind`.
pub fn arb_message_of(kind: MessageKind) -> BoxedStrategy<Message> {
    match kind {
        MessageKind::Hello => (
            prop::collection::btree_set(1u8..=255, 1..=MAX_VERSIONS),
            (name(), name(), name()),
            (any::<u64>(), region_size(), role(), disk_state(), 0u16..8),
            generation(),
        )
            .prop_map(
                |(vs, (n, c, r), (volume_size, region_size, role, disk_state, f), generation)| {
                    Message::Hello(Hello {
                        versions: vs.into_iter().collect(),
                        node_name: n,
                        cluster_name: c,
                        resource_name: r,
                        volume_size,
                        region_size,
                        role,
                        disk_state,
                        features: Features::from_bits(f).unwrap(),
                        generation,
                    })
                },
            )
            .boxed(),
        MessageKind::AuthChallenge => any::<[u8; 32]>()
            .prop_map(|nonce| Message::AuthChallenge { nonce })
            .boxed(),
        MessageKind::AuthResponse => any::<[u8; 32]>()
            .prop_map(|mac| Message::AuthResponse { mac })
            .boxed(),
        MessageKind::AuthResult => any::<bool>()
            .prop_map(|accepted| Message::AuthResult { accepted })
            .boxed(),
        MessageKind::Write => (any::<bool>(), data(4096))
            .prop_flat_map(|(fua, data)| {
                let len = data.len() as u64;
                (0..=u64::MAX - len).prop_map(move |offset| Message::Write {
                    offset,
                    fua,
                    data: data.clone(),
                })
            })
            .boxed(),
        MessageKind::Ack1 => any::<u64>().prop_map(|seq| Message::Ack1 { seq }).boxed(),
        MessageKind::Ack2 => (any::<u64>(), status())
            .prop_map(|(seq, status)| Message::Ack2 { seq, status })
            .boxed(),
        MessageKind::Flush => Just(Message::Flush).boxed(),
        MessageKind::FlushAck => (any::<u64>(), status())
            .prop_map(|(seq, status)| Message::FlushAck { seq, status })
            .boxed(),
        MessageKind::Trim => (range(u64::MAX), any::<bool>())
            .prop_map(|((offset, length), fua)| Message::Trim {
                offset,
                length,
                fua,
            })
            .boxed(),
        MessageKind::WriteZeroes => (range(u64::MAX), any::<bool>(), any::<bool>())
            .prop_map(|((offset, length), fua, no_hole)| Message::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
            })
            .boxed(),
        MessageKind::BitmapChunk => (1u32..1000, region_size(), 1u32..20_000)
            .prop_flat_map(|(total, rs, count)| {
                let nbytes = count.div_ceil(8) as usize;
                (
                    0..total,
                    Just(total),
                    Just(rs),
                    0..=u64::MAX - u64::from(count),
                    Just(count),
                    prop::collection::vec(any::<u8>(), nbytes),
                )
            })
            .prop_map(
                |(chunk_index, total_chunks, region_size, first_region, region_count, mut bits)| {
                    let used = region_count % 8;
                    if used != 0 {
                        let last = bits.len() - 1;
                        bits[last] &= (1u8 << used) - 1;
                    }
                    Message::BitmapChunk(BitmapChunk {
                        chunk_index,
                        total_chunks,
                        region_size,
                        first_region,
                        region_count,
                        bits: Bytes::from(bits),
                    })
                },
            )
            .boxed(),
        MessageKind::ResyncRequest => range(MAX_DATA_LEN as u64)
            .prop_map(|(offset, length)| Message::ResyncRequest {
                offset,
                length: length as u32,
            })
            .boxed(),
        MessageKind::ResyncData => data(4096)
            .prop_flat_map(|data| {
                let len = data.len() as u64;
                (0..=u64::MAX - len)
                    .prop_map(move |offset| Message::resync_data(offset, data.clone()))
            })
            .boxed(),
        MessageKind::ChecksumRequest => (region_size(), entries(1))
            .prop_map(|(region_size, entries)| Message::ChecksumRequest {
                region_size,
                entries,
            })
            .boxed(),
        MessageKind::ChecksumReply => (any::<u64>(), region_size(), entries(0))
            .prop_map(
                |(request_seq, region_size, entries)| Message::ChecksumReply {
                    request_seq,
                    region_size,
                    entries,
                },
            )
            .boxed(),
        MessageKind::Ping => (any::<u64>(), any::<u64>())
            .prop_map(|(nonce, timestamp_ns)| Message::Ping {
                nonce,
                timestamp_ns,
            })
            .boxed(),
        MessageKind::Pong => (any::<u64>(), any::<u64>())
            .prop_map(|(nonce, timestamp_ns)| Message::Pong {
                nonce,
                timestamp_ns,
            })
            .boxed(),
        MessageKind::StateChange => (role(), disk_state(), generation())
            .prop_map(|(role, disk_state, generation)| Message::StateChange {
                role,
                disk_state,
                generation,
            })
            .boxed(),
        MessageKind::Error => (any::<u32>(), ".{0,300}")
            .prop_map(|(code, mut message): (u32, String)| {
                while message.len() > MAX_ERROR_MESSAGE_LEN {
                    message.pop();
                }
                Message::Error { code, message }
            })
            .boxed(),
        MessageKind::Goodbye => prop::sample::select(vec![
            GoodbyeReason::Shutdown,
            GoodbyeReason::Handover,
            GoodbyeReason::ConfigChange,
            GoodbyeReason::Error,
        ])
        .prop_map(|reason| Message::Goodbye { reason })
        .boxed(),
        MessageKind::Control => prop_oneof![
            // Any UTF-8 (the codec does not parse JSON), including multi-byte characters.
            ".{1,300}",
            Just("{\"cmd\":\"status\",\"args\":[1,2]}".to_string()),
            // Near the 64 KiB bound.
            (1usize..=8).prop_map(|k| "x".repeat(MAX_CONTROL_LEN + 1 - k)),
        ]
        .prop_map(|json| Message::Control { json })
        .boxed(),
    }
}

/// A valid frame of any kind.
pub fn arb_frame() -> impl Strategy<Value = Frame> {
    prop::sample::select(MessageKind::ALL.to_vec())
        .prop_flat_map(arb_message_of)
        .prop_flat_map(|msg| any::<u64>().prop_map(move |seq| Frame::new(seq, msg.clone())))
}
