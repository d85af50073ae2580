use proptest::prelude::*;

use super::*;

const ALL: [Framing; 4] = [
    Framing::Length,
    Framing::Slip { crc: Crc::None },
    Framing::Slip { crc: Crc::Crc16 },
    Framing::Slip { crc: Crc::Crc32 },
];

/// A PUBLISH with `payload` (short or long Length form as needed, as the codec writes it).
fn publish(payload: &[u8]) -> Vec<u8> {
    let body = [&[0x20, 0x00, 0x01, 0x00, 0x02][..], payload].concat();
    with_length(msg_type::PUBLISH, &body)
}

fn with_length(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let short = body.len() + 2;
    let mut out = if short < 256 {
        vec![short as u8]
    } else {
        let long = (body.len() + 4) as u16;
        vec![0x01, (long >> 8) as u8, long as u8]
    };
    out.push(msg_type);
    out.extend_from_slice(body);
    out
}

/// `inner` wrapped by a forwarder for node `node_id`.
fn encapsulated(node_id: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut out = vec![(3 + node_id.len()) as u8, msg_type::ENCAPSULATED, 0x01];
    out.extend_from_slice(node_id);
    out.extend_from_slice(inner);
    out
}

/// A few messages of every shape: short, long, SLIP specials inside, encapsulated.
fn samples() -> Vec<Vec<u8>> {
    vec![
        vec![0x02, msg_type::PINGREQ],
        publish(b"hello"),
        publish(&[END, ESC, ESC_END, ESC_ESC, END, END]),
        publish(&[0x5A; 300]),
        encapsulated(&[0xC0, 0x01], &publish(b"from a node")),
        // The long form for a short message: legal (spec 5.2.1 "may use").
        vec![0x01, 0x00, 0x04, msg_type::PINGREQ],
    ]
}

fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    decoder.push(bytes, &mut |frame| out.push(frame.to_vec()));
    decoder.check_invariants();
    out
}

fn encode_all(framing: Framing, messages: &[Vec<u8>]) -> Vec<u8> {
    let mut line = Vec::new();
    for message in messages {
        encode(framing, message, &mut line);
    }
    line
}

#[test]
fn crc_known_answers() {
    assert_eq!(CRC16.checksum(b"123456789"), 0x906E);
    assert_eq!(CRC32.checksum(b"123456789"), 0xCBF4_3926);
    let mut line = Vec::new();
    encode(Framing::Slip { crc: Crc::Crc16 }, b"123456789", &mut line);
    assert_eq!(line, b"\xC0123456789\x6E\x90\xC0");
    line.clear();
    encode(Framing::Slip { crc: Crc::Crc32 }, b"123456789", &mut line);
    assert_eq!(line, b"\xC0123456789\x26\x39\xF4\xCB\xC0");
}

#[test]
fn slip_escapes_end_and_esc() {
    let mut line = Vec::new();
    encode(
        Framing::Slip { crc: Crc::None },
        &[1, END, 2, ESC, 3],
        &mut line,
    );
    assert_eq!(line, [END, 1, ESC, ESC_END, 2, ESC, ESC_ESC, 3, END]);
}

#[test]
fn every_framing_round_trips() {
    for framing in ALL {
        let messages = samples();
        let mut decoder = Decoder::new(framing, 1024);
        let line = encode_all(framing, &messages);
        assert_eq!(decode_all(&mut decoder, &line), messages, "{framing:?}");
        let stats = decoder.stats();
        assert_eq!(stats.frames, messages.len() as u64);
        assert_eq!(
            (
                stats.bad_crc,
                stats.oversize,
                stats.truncated,
                stats.garbage_bytes
            ),
            (0, 0, 0, 0)
        );
    }
}

#[test]
fn frames_split_at_every_byte_boundary_come_out_whole() {
    for framing in ALL {
        let messages = samples();
        let line = encode_all(framing, &messages);
        for split in 0..=line.len() {
            let mut decoder = Decoder::new(framing, 1024);
            let (a, b) = line.split_at(split);
            let mut got = decode_all(&mut decoder, a);
            got.extend(decode_all(&mut decoder, b));
            assert_eq!(got, messages, "{framing:?} split at {split}");
        }
        let mut decoder = Decoder::new(framing, 1024);
        let got: Vec<_> = line
            .iter()
            .flat_map(|b| decode_all(&mut decoder, &[*b]))
            .collect();
        assert_eq!(got, messages, "{framing:?} octet by octet");
    }
}

#[test]
fn length_garbage_between_good_frames_is_skipped_octet_by_octet() {
    let good = publish(b"good");
    // Zeros and a long form counting fewer than 4 octets: each octet fails by itself.
    let zeros = [0x00, 0x01, 0x00, 0x00, 0x00];
    // Each octet is followed by an unknown MsgType (0x03, 0x11, 0x99, 0xFF, 0x20, 0x30), the
    // last by the Length 3 of a PINGREQ, also unknown as a MsgType.
    let chain = [0x05, 0x03, 0x11, 0x99, 0xFF, 0x20, 0x30];
    let ping = vec![0x03, msg_type::PINGREQ, b'a'];
    let line = [&good[..], &zeros, &good, &chain, &ping, &good].concat();
    let mut decoder = Decoder::new(Framing::Length, 256);
    assert_eq!(
        decode_all(&mut decoder, &line),
        [good.clone(), good.clone(), ping, good]
    );
    assert_eq!(
        decoder.stats().garbage_bytes,
        (zeros.len() + chain.len()) as u64
    );
    assert_eq!(decoder.stats().frames, 4);
}

#[test]
fn length_truncated_frame_is_dropped_at_idle() {
    let good = publish(b"good");
    let mut decoder = Decoder::new(Framing::Length, 256);
    assert_eq!(decode_all(&mut decoder, &good), vec![good.clone()]);
    // A frame cut short: without the timeout it would swallow the start of the next one.
    assert!(decode_all(&mut decoder, &publish(b"cut short")[..6]).is_empty());
    decoder.idle();
    assert_eq!(decoder.buffered(), 0);
    assert_eq!(decode_all(&mut decoder, &good), vec![good.clone()]);
    decoder.idle();
    assert_eq!(
        decoder.stats().truncated,
        1,
        "idle between frames drops nothing"
    );
}

#[test]
fn length_nested_encapsulation_is_garbage() {
    let good = publish(b"good");
    let nested = encapsulated(&[1], &encapsulated(&[2], &good));
    let mut decoder = Decoder::new(Framing::Length, 256);
    // The outer Length octet is skipped; what follows then reads as a long candidate (0xFE
    // octets), which the frame timeout ends.
    assert!(decode_all(&mut decoder, &nested).is_empty());
    assert_eq!(decoder.stats().garbage_bytes, 1);
    decoder.idle();
    assert_eq!(decode_all(&mut decoder, &good), [good]);
    assert_eq!(decoder.stats().truncated, 1);
}

#[test]
fn length_three_octet_lengths() {
    let long = publish(&[7; 600]);
    assert_eq!(long[..4], [0x01, 0x02, 0x61, msg_type::PUBLISH]);
    let mut decoder = Decoder::new(Framing::Length, 1024);
    assert_eq!(decode_all(&mut decoder, &long), vec![long.clone()]);
    // An encapsulation with a long inner message, and a long-form encapsulation header.
    let wrapped = encapsulated(&[9], &long);
    assert_eq!(decode_all(&mut decoder, &wrapped), vec![wrapped.clone()]);
    let long_header = [&[0x01, 0x00, 0x06, 0xFE, 0x00, 0x09][..], &long].concat();
    assert_eq!(
        decode_all(&mut decoder, &long_header),
        vec![long_header.clone()]
    );
    assert_eq!(decoder.stats().garbage_bytes, 0);
}

#[test]
fn length_oversize_frame_is_counted_down_without_buffering() {
    let max = 64;
    let good = publish(b"good");
    for big in [
        publish(&[1; 100]),
        publish(&[2; 1000]),
        encapsulated(&[3], &publish(&[3; 70])),
    ] {
        let line = [&big[..], &good].concat();
        let mut decoder = Decoder::new(Framing::Length, max);
        let mut got = Vec::new();
        for octet in &line {
            got.extend(decode_all(&mut decoder, &[*octet]));
            assert!(decoder.buffered() <= max);
        }
        assert_eq!(got, vec![good.clone()]);
        assert_eq!(decoder.stats().oversize, 1);
        assert_eq!(decoder.stats().garbage_bytes, 0);
    }
}

#[test]
fn length_oversize_encapsulation_header_skips_its_inner_message() {
    let max = 64;
    let good = publish(b"good");
    let inner = publish(b"inner");
    for node_id in [vec![0x42; 100], vec![0x42; 60]] {
        let line = [&encapsulated(&node_id, &inner)[..], &good].concat();
        let mut decoder = Decoder::new(Framing::Length, max);
        let mut got = Vec::new();
        for octet in &line {
            got.extend(decode_all(&mut decoder, &[*octet]));
        }
        assert_eq!(got, vec![good.clone()], "node id {}", node_id.len());
        assert_eq!(decoder.stats().oversize, 1);
    }
}

#[test]
fn length_idle_ends_a_discard() {
    let mut decoder = Decoder::new(Framing::Length, 64);
    assert!(decode_all(&mut decoder, &publish(&[1; 300])[..100]).is_empty());
    decoder.idle();
    let good = publish(b"good");
    assert_eq!(decode_all(&mut decoder, &good), [good]);
    assert_eq!(
        (decoder.stats().oversize, decoder.stats().truncated),
        (1, 1)
    );
}

#[test]
fn slip_bad_frames_between_good_ones_are_dropped_and_counted() {
    let framing = Framing::Slip { crc: Crc::Crc16 };
    let good = publish(b"good");
    let mut flipped = Vec::new();
    encode(framing, &good, &mut flipped);
    flipped[3] ^= 0x10;
    let line = [
        &encode_all(framing, std::slice::from_ref(&good))[..],
        b"line noise", // ended by the next frame's leading END: bad CRC
        &flipped,      // bad CRC
        &[END, 0x01, ESC, 0x02, 0x03, END], // bad escape: 4 octets of garbage
        &[END, 0x01, END], // too short for its trailer: 1 octet of garbage
        &[END, END, END], // empty frames: ignored
        &encode_all(framing, std::slice::from_ref(&good)),
    ]
    .concat();
    let mut decoder = Decoder::new(framing, 256);
    assert_eq!(decode_all(&mut decoder, &line), [good.clone(), good]);
    let stats = decoder.stats();
    assert_eq!(
        (stats.frames, stats.bad_crc, stats.garbage_bytes),
        (2, 2, 5)
    );
    assert_eq!((stats.oversize, stats.truncated), (0, 0));
}

#[test]
fn slip_without_crc_delivers_what_is_between_ends() {
    let framing = Framing::Slip { crc: Crc::None };
    let mut decoder = Decoder::new(framing, 256);
    let got = decode_all(&mut decoder, &[END, 1, 2, END, ESC, ESC_ESC, END, END]);
    assert_eq!(got, [vec![1, 2], vec![ESC]]);
}

#[test]
fn slip_truncated_frame_is_dropped_at_idle() {
    let framing = Framing::Slip { crc: Crc::Crc32 };
    let good = publish(b"good");
    let line = encode_all(framing, std::slice::from_ref(&good));
    let mut decoder = Decoder::new(framing, 256);
    assert!(decode_all(&mut decoder, &line[..8]).is_empty());
    decoder.idle();
    assert_eq!(decoder.buffered(), 0);
    assert_eq!(decode_all(&mut decoder, &line), [good]);
    assert_eq!((decoder.stats().truncated, decoder.stats().bad_crc), (1, 0));
}

#[test]
fn slip_oversize_frame_is_dropped_until_end_without_buffering() {
    let max = 64;
    let good = publish(b"good");
    for crc in [Crc::None, Crc::Crc16, Crc::Crc32] {
        let framing = Framing::Slip { crc };
        let line = encode_all(framing, &[publish(&[END; 200]), good.clone()]);
        let mut decoder = Decoder::new(framing, max);
        let mut got = Vec::new();
        for octet in &line {
            got.extend(decode_all(&mut decoder, &[*octet]));
            assert!(decoder.buffered() <= max);
        }
        assert_eq!(got, vec![good.clone()], "{crc:?}");
        assert_eq!(decoder.stats().oversize, 1);
    }
    // Exactly max_frame octets still pass, with their trailer.
    let framing = Framing::Slip { crc: Crc::Crc32 };
    let exact = publish(&[0; 57]);
    assert_eq!(exact.len(), max);
    let mut decoder = Decoder::new(framing, max);
    assert_eq!(
        decode_all(
            &mut decoder,
            &encode_all(framing, std::slice::from_ref(&exact))
        ),
        [exact]
    );
}

fn message() -> impl Strategy<Value = Vec<u8>> {
    let plain = (
        prop::sample::select(vec![
            msg_type::CONNECT,
            msg_type::PUBLISH,
            msg_type::PINGREQ,
            msg_type::REGISTER,
            msg_type::SUBSCRIBE,
        ]),
        prop::collection::vec(any::<u8>(), 0..400),
    )
        .prop_map(|(msg_type, body)| with_length(msg_type, &body));
    (
        plain,
        prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
    )
        .prop_map(|(plain, node)| match node {
            Some(node_id) => encapsulated(&node_id, &plain),
            None => plain,
        })
}

/// Whether `needles` occur in `haystack` in order (other frames may come between).
fn is_subsequence(needles: &[Vec<u8>], haystack: &[Vec<u8>]) -> bool {
    let mut rest = haystack.iter();
    needles
        .iter()
        .all(|needle| rest.any(|frame| frame == needle))
}

proptest! {
    #[test]
    fn encode_decode_through_noise_yields_the_messages(
        framing in prop::sample::select(ALL.to_vec()),
        items in prop::collection::vec(
            (prop::collection::vec(any::<u8>(), 0..40), message()), 1..8),
    ) {
        let mut decoder = Decoder::new(framing, 512);
        let mut got = Vec::new();
        for (noise, message) in &items {
            got.extend(decode_all(&mut decoder, noise));
            if framing == Framing::Length {
                // Length framing resynchronises at the frame timeout; Slip at the leading END.
                decoder.idle();
            }
            let mut line = Vec::new();
            encode(framing, message, &mut line);
            got.extend(decode_all(&mut decoder, &line));
            prop_assert!(decoder.buffered() <= 512);
        }
        let messages: Vec<_> = items.into_iter().map(|(_, m)| m).collect();
        prop_assert!(got.iter().all(|frame| !frame.is_empty() && frame.len() <= 512));
        prop_assert!(is_subsequence(&messages, &got), "{:02x?}", got);
    }
}
