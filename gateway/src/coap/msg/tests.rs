use proptest::prelude::*;

use super::*;

fn token(bytes: &[u8]) -> Token {
    Token::new(bytes).unwrap()
}

fn format_reason(datagram: &[u8]) -> FormatError {
    match decode(datagram) {
        Err(DecodeError::Format { reason, .. }) => reason,
        other => panic!("expected a format error for {datagram:02x?}, got {other:?}"),
    }
}

fn request_reason(datagram: &[u8]) -> RequestError {
    match decode(datagram) {
        Err(DecodeError::Request { reason, .. }) => reason,
        other => panic!("expected a request error for {datagram:02x?}, got {other:?}"),
    }
}

// RFC 7252 Figure 16: CON [0x7d34] GET /temperature, no token.
const FIG16_GET: &[u8] = b"\x40\x01\x7d\x34\xbbtemperature";

#[test]
fn decodes_rfc7252_figure16_get() {
    let m = decode(FIG16_GET).unwrap();
    assert_eq!(m.ty, MessageType::Con);
    assert_eq!(m.code, Code::GET);
    assert_eq!(m.message_id, 0x7d34);
    assert!(m.token.is_empty());
    assert_eq!(m.uri_path, ["temperature"]);
    assert!(m.payload.is_empty());
    assert!(m.is_request());
}

#[test]
fn encodes_rfc7252_figure16_piggybacked_content() {
    // ACK [0x7d34] 2.05 Content "22.3 C".
    let mut out = Vec::new();
    encode_response(
        &mut out,
        &Response {
            payload: b"22.3 C",
            ..Response::new(MessageType::Ack, Code::CONTENT, 0x7d34, Token::EMPTY)
        },
    );
    assert_eq!(out, b"\x60\x45\x7d\x34\xff22.3 C");
}

#[test]
fn rfc7252_figure5_get_with_token_and_answer() {
    // CON [0xbc90] GET /temperature, token 0x71; ACK [0xbc90] 2.05 "22.5 C".
    let m = decode(b"\x41\x01\xbc\x90\x71\xbbtemperature").unwrap();
    assert_eq!(m.token, token(&[0x71]));
    assert_eq!(m.message_id, 0xbc90);
    let mut out = vec![0xAA];
    encode_response(
        &mut out,
        &Response {
            payload: b"22.5 C",
            ..Response::new(MessageType::Ack, Code::CONTENT, m.message_id, m.token)
        },
    );
    // Appends: the caller's byte stays.
    assert_eq!(out, b"\xaa\x61\x45\xbc\x90\x71\xff22.5 C");
}

#[test]
fn encodes_empty_ack_rst_and_ping() {
    let mut out = Vec::new();
    encode_empty_ack(&mut out, 0xbc91);
    assert_eq!(out, [0x60, 0x00, 0xbc, 0x91]);
    out.clear();
    encode_rst(&mut out, 0x1234);
    assert_eq!(out, [0x70, 0x00, 0x12, 0x34]);
    out.clear();
    encode_empty(&mut out, MessageType::Con, 7);
    assert_eq!(out, [0x40, 0x00, 0x00, 0x07]);
    assert_eq!(decode(&out), Ok(Message::empty(MessageType::Con, 7)));
}

#[test]
fn decodes_empty_ack_and_rst() {
    assert_eq!(
        decode(&[0x60, 0, 0xbc, 0x91]),
        Ok(Message::empty(MessageType::Ack, 0xbc91))
    );
    assert_eq!(
        decode(&[0x70, 0, 0, 1]),
        Ok(Message::empty(MessageType::Rst, 1))
    );
}

#[test]
fn short_datagrams_are_dropped() {
    for len in 0..4 {
        let e = decode(&FIG16_GET[..len]).unwrap_err();
        assert_eq!(e, DecodeError::Short { len });
        assert_eq!(e.answer(), Answer::Drop);
    }
}

#[test]
fn other_versions_are_ignored() {
    for b0 in [0x00, 0x80, 0xC0] {
        let mut d = FIG16_GET.to_vec();
        d[0] = b0;
        let e = decode(&d).unwrap_err();
        assert_eq!(e, DecodeError::Version { version: b0 >> 6 });
        assert_eq!(e.answer(), Answer::Drop);
        assert_eq!(e.error_code(), "version");
    }
}

#[test]
fn token_length_above_8_is_a_format_error_answered_by_rst() {
    let d = [0x49, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 6, 7, 8, 9];
    assert_eq!(format_reason(&d), FormatError::TokenLength { tkl: 9 });
    assert_eq!(
        decode(&d).unwrap_err().answer(),
        Answer::Reset { message_id: 5 }
    );
    // The same in an ACK is dropped silently.
    let d = [0x6F, 0x45, 0x00, 0x05];
    assert_eq!(format_reason(&d), FormatError::TokenLength { tkl: 15 });
    assert_eq!(decode(&d).unwrap_err().answer(), Answer::Drop);
}

#[test]
fn eight_byte_token_is_accepted() {
    let d = [0x58, 0x02, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8];
    let m = decode(&d).unwrap();
    assert_eq!(m.ty, MessageType::Non);
    assert_eq!(m.token.as_bytes(), [1, 2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn truncated_token_is_a_format_error() {
    assert_eq!(
        format_reason(&[0x44, 0x01, 0, 1, 0xAA]),
        FormatError::TokenTruncated
    );
}

#[test]
fn payload_marker_without_payload_is_a_format_error() {
    let d = b"\x40\x02\x00\x09\xff";
    assert_eq!(format_reason(d), FormatError::EmptyPayload);
    assert_eq!(
        decode(d).unwrap_err().answer(),
        Answer::Reset { message_id: 9 }
    );
    // After options too.
    assert_eq!(
        format_reason(b"\x40\x02\x00\x09\xb2ps\xff"),
        FormatError::EmptyPayload
    );
    // One payload byte is fine.
    assert_eq!(decode(b"\x40\x02\x00\x09\xffx").unwrap().payload, b"x");
}

#[test]
fn empty_message_must_carry_nothing() {
    // Token length 1 with a token byte.
    let d = [0x41, 0x00, 0x00, 0x03, 0x71];
    assert_eq!(format_reason(&d), FormatError::EmptyNotEmpty);
    assert_eq!(
        decode(&d).unwrap_err().answer(),
        Answer::Reset { message_id: 3 }
    );
    // TKL set but no byte; a lone payload marker; an option.
    for d in [
        &[0x41, 0x00, 0x00, 0x03][..],
        &[0x40, 0x00, 0x00, 0x03, 0xFF],
        &[0x60, 0x00, 0x00, 0x03, 0x60],
    ] {
        assert_eq!(format_reason(d), FormatError::EmptyNotEmpty, "{d:02x?}");
    }
    // An empty ACK with junk is dropped, not reset.
    assert_eq!(
        decode(&[0x60, 0x00, 0x00, 0x03, 0x60])
            .unwrap_err()
            .answer(),
        Answer::Drop
    );
}

#[test]
fn option_structure_errors() {
    // Delta nibble 15 with length 0 (not the marker).
    assert_eq!(
        format_reason(&[0x40, 0x01, 0, 1, 0xF0]),
        FormatError::ReservedNibble
    );
    // Length nibble 15.
    assert_eq!(
        format_reason(&[0x40, 0x01, 0, 1, 0xBF]),
        FormatError::ReservedNibble
    );
    // Value runs past the end.
    assert_eq!(
        format_reason(b"\x40\x01\x00\x01\xb5ps"),
        FormatError::OptionTruncated
    );
    // Extended delta/length bytes missing.
    assert_eq!(
        format_reason(&[0x40, 0x01, 0, 1, 0xD0]),
        FormatError::OptionTruncated
    );
    assert_eq!(
        format_reason(&[0x40, 0x01, 0, 1, 0x0E, 0x01]),
        FormatError::OptionTruncated
    );
    // 0xFFFF + 269 twice: beyond 65535.
    assert_eq!(
        format_reason(&[0x40, 0x01, 0, 1, 0xE0, 0xFF, 0xFF, 0xE0, 0xFF, 0xFF]),
        FormatError::OptionNumber
    );
}

#[test]
fn reserved_classes_and_wrong_types() {
    for code in [0x20, 0xC0, 0xE1] {
        assert_eq!(
            format_reason(&[0x40, code, 0, 1]),
            FormatError::ReservedClass { code: Code(code) }
        );
    }
    // A request in an ACK; a non-empty RST (dropped either way).
    for d in [[0x60, 0x01, 0, 1], [0x70, 0x45, 0, 1]] {
        assert!(matches!(format_reason(&d), FormatError::TypeCode { .. }));
        assert_eq!(decode(&d).unwrap_err().answer(), Answer::Drop);
    }
}

#[test]
fn decodes_emqx_style_publish() {
    // CON POST /ps/a/b?qos=1&retain ; token 0x0102 ; Content-Format 0 ; payload "hi".
    let mut d = vec![0x42, 0x02, 0x12, 0x34, 0x01, 0x02];
    d.extend_from_slice(b"\xb2ps\x01a\x01b\x10\x35qos=1\x06retain\xffhi");
    let m = decode(&d).unwrap();
    assert_eq!(m.code, Code::POST);
    assert_eq!(m.token, token(&[1, 2]));
    assert_eq!(m.uri_path, ["ps", "a", "b"]);
    assert_eq!(m.content_format, Some(0));
    assert_eq!(
        m.uri_query,
        [
            Query {
                name: "qos".into(),
                value: Some("1".into())
            },
            Query {
                name: "retain".into(),
                value: None
            }
        ]
    );
    assert_eq!(m.query("qos"), Some(Some("1")));
    assert_eq!(m.query("retain"), Some(None));
    assert_eq!(m.query("id"), None);
    assert_eq!(m.payload, b"hi");
}

#[test]
fn decodes_observe_block_size1_and_no_response() {
    // GET, Observe 0 (empty), Block2 (23) 1/0/64 = 0x12, Block1 27 NUM 0x12345 M=1 SZX 6,
    // Size1 60 = 5000, No-Response 258 = 2.
    let d = [
        0x50, 0x01, 0, 1,    // NON GET
        0x60, // Observe (6), empty = 0
        0xD1, 4, 0x12, // delta 13 + 4 -> 23, Block2 1/0/64
        0x43, 0x12, 0x34, 0x5E, // delta 4 -> 27, Block1
        0xD2, 20, 0x13, 0x88, // delta 13 + 20 -> 60, Size1 5000
        0xD1, 185, 0x02, // delta 13 + 185 -> 258, No-Response 2
    ];
    let m = decode(&d).unwrap();
    assert_eq!(m.observe, Some(0));
    assert_eq!(m.block2, Block::new(1, false, 2));
    assert_eq!(m.block1, Block::new(0x12345, true, 6));
    assert_eq!(m.size1, Some(5000));
    assert_eq!(m.no_response, Some(2));
}

#[test]
fn unknown_critical_option_gets_bad_option() {
    // If-Match (1) in a CON: 4.02 piggy-backed with the token.
    let d = [0x41, 0x03, 0x00, 0x07, 0x99, 0x11, 0xAB];
    assert_eq!(request_reason(&d), RequestError::BadOption { number: 1 });
    assert_eq!(
        decode(&d).unwrap_err().answer(),
        Answer::Respond {
            message_id: 7,
            token: token(&[0x99]),
            code: Code::BAD_OPTION
        }
    );
    // In a NON: rejected with an RST.
    let d = [0x51, 0x03, 0x00, 0x07, 0x99, 0x11, 0xAB];
    assert_eq!(
        decode(&d).unwrap_err().answer(),
        Answer::Reset { message_id: 7 }
    );
    // In a response: a format error.
    let d = [0x61, 0x45, 0x00, 0x07, 0x99, 0x11, 0xAB];
    assert!(matches!(format_reason(&d), FormatError::Option(_)));
    // Proxy-Uri (35) too.
    let d = [0x40, 0x01, 0x00, 0x07, 0xD1, 22, b'x'];
    assert_eq!(request_reason(&d), RequestError::BadOption { number: 35 });
}

#[test]
fn unknown_elective_options_are_ignored() {
    // Option 2048 (even) via the 2-byte extended delta, then a payload.
    let d = [0x40, 0x02, 0, 1, 0xE1, 0x06, 0xF3, 0x00, 0xFF, b'p'];
    let m = decode(&d).unwrap();
    assert_eq!(m.payload, b"p");
    assert!(m.uri_path.is_empty());
}

#[test]
fn block_option_errors() {
    // Block1 SZX 7: 4.00.
    let d = [0x40, 0x02, 0, 1, 0xD1, 14, 0x07];
    assert_eq!(
        request_reason(&d),
        RequestError::InvalidOption { number: 27 }
    );
    assert_eq!(
        decode(&d).unwrap_err().answer(),
        Answer::Respond {
            message_id: 1,
            token: Token::EMPTY,
            code: Code::BAD_REQUEST
        }
    );
    // Block2 of 4 bytes: out of range, critical -> 4.02.
    let d = [0x40, 0x01, 0, 1, 0xD4, 10, 0, 0, 0, 0x10];
    assert_eq!(request_reason(&d), RequestError::BadOption { number: 23 });
    // Block1 twice: 4.02 (supernumerary critical).
    let d = [0x40, 0x02, 0, 1, 0xD1, 14, 0x06, 0x01, 0x16];
    assert_eq!(request_reason(&d), RequestError::BadOption { number: 27 });
}

#[test]
fn invalid_utf8_path_is_bad_request() {
    let d = [0x40, 0x02, 0, 1, 0xB1, 0xFF];
    assert_eq!(
        request_reason(&d),
        RequestError::InvalidOption { number: 11 }
    );
    let d = [0x40, 0x02, 0, 1, 0xF1, 0xC3];
    assert_eq!(format_reason(&d), FormatError::ReservedNibble);
}

#[test]
fn repeated_elective_keeps_first_and_long_observe_is_ignored() {
    // Content-Format 12 twice (40 then 50): the first stays; Observe of 4 bytes ignored.
    let d = [
        0x40, 0x01, 0, 1, 0x64, 1, 2, 3, 4, // Observe, 4 bytes: ignored
        0x61, 40, // Content-Format 40
        0x01, 50, // Content-Format again
    ];
    let m = decode(&d).unwrap();
    assert_eq!(m.observe, None);
    assert_eq!(m.content_format, Some(40));
}

#[test]
fn block_codec() {
    assert_eq!(
        Block::decode(&[]),
        Block::new(0, false, 0).ok_or(BlockError::ReservedSzx)
    );
    assert_eq!(
        Block::decode(&[0x0B]).unwrap(),
        Block::new(0, true, 3).unwrap()
    );
    assert_eq!(
        Block::decode(&[0x01, 0x02]).unwrap(),
        Block::new(16, false, 2).unwrap()
    );
    let max = Block::decode(&[0xFF, 0xFF, 0xFE]).unwrap();
    assert_eq!(
        (max.num(), max.more(), max.szx()),
        (Block::MAX_NUM, true, 6)
    );
    assert_eq!(max.size(), 1024);
    assert_eq!(max.offset(), (Block::MAX_NUM as usize) * 1024);
    assert_eq!(Block::decode(&[0x0F]), Err(BlockError::ReservedSzx));
    assert_eq!(
        Block::decode(&[0, 0, 0, 1]),
        Err(BlockError::TooLong { len: 4 })
    );
    assert_eq!(Block::new(Block::MAX_NUM + 1, false, 0), None);
    assert_eq!(Block::new(0, false, 7), None);
    assert_eq!(Block::szx_for_size(16), Some(0));
    assert_eq!(Block::szx_for_size(1024), Some(6));
    assert_eq!(Block::szx_for_size(2048), None);
    assert_eq!(Block::szx_for_size(100), None);
}

#[test]
fn encodes_block2_size2_etag_observe_known_bytes() {
    // ACK 2.05, token 0x01, ETag 1, Observe 5, CF 0, Block2 0/1/1024, Size2 2000, "x".
    let mut out = Vec::new();
    encode_response(
        &mut out,
        &Response {
            etag: Some(1),
            observe: Some(5),
            content_format: Some(0),
            block2: Block::new(0, true, 6),
            size2: Some(2000),
            payload: b"x",
            ..Response::new(MessageType::Ack, Code::CONTENT, 0x0102, token(&[1]))
        },
    );
    assert_eq!(
        out,
        [
            0x61, 0x45, 0x01, 0x02, 0x01, // header + token
            0x44, 0, 0, 0, 1, // ETag (4)
            0x21, 5,    // Observe (6)
            0x60, // Content-Format (12) = 0
            0xB1, 0x0E, // Block2 (23)
            0x52, 0x07, 0xD0, // Size2 (28)
            0xFF, b'x',
        ]
    );
}

#[test]
fn encodes_413_with_size1_and_block1_and_decodes_back() {
    let mut out = Vec::new();
    let response = Response {
        size1: Some(65536),
        block1: Block::new(0, false, 6),
        max_age: Some(5),
        ..Response::new(
            MessageType::Ack,
            Code::REQUEST_ENTITY_TOO_LARGE,
            9,
            token(&[7, 7]),
        )
    };
    encode_response(&mut out, &response);
    let m = decode(&out).unwrap();
    assert_eq!(m.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(m.size1, Some(65536));
    assert_eq!(m.block1, Block::new(0, false, 6));
    assert_eq!(m.max_age, Some(5));
    assert_eq!(m.token, token(&[7, 7]));
    assert_eq!(Code::REQUEST_ENTITY_TOO_LARGE.to_string(), "4.13");
}

#[test]
fn token_bounds() {
    assert!(Token::new(&[0; 9]).is_none());
    assert_eq!(Token::new(&[]), Some(Token::EMPTY));
    assert_eq!(token(&[1, 2, 3]).len(), 3);
}

#[test]
fn fast_path_takes_the_common_shapes_and_matches_the_reference() {
    let mut publish = vec![0x42, 0x02, 0x12, 0x34, 0x01, 0x02];
    publish.extend_from_slice(b"\xb2ps\x01a\x01b\x10\x35qos=1\x06retain\xffhi");
    let cases: [&[u8]; 5] = [
        &publish,
        // NON PUT /ps/bench/7 with No-Response 2 and a payload.
        b"\x54\x03\x00\x09\x01\x02\x03\x04\xb2ps\x05bench\x017\xd1\xea\x02\xffxyz",
        // Observe, Block2, Block1, Size1, No-Response.
        &[
            0x50, 0x01, 0, 1, 0x60, 0xD1, 4, 0x12, 0x43, 0x12, 0x34, 0x5E, 0xD2, 20, 0x13, 0x88,
            0xD1, 185, 0x02,
        ],
        // A piggy-backed 2.04 with a token (an observer's answer) and an empty ACK.
        &[0x61, 0x44, 0x00, 0x07, 0x99],
        &[0x60, 0x00, 0x00, 0x07],
    ];
    for d in cases {
        let fast = decode_fast(d);
        assert!(fast.is_some(), "{d:02x?} takes the fast path");
        assert_eq!(fast.map(Ok), Some(decode_reference(d)), "{d:02x?}");
        assert_eq!(decode(d), decode_reference(d));
    }
}

#[test]
fn fast_path_leaves_errors_and_other_options_to_the_reference() {
    let cases: [&[u8]; 9] = [
        // If-Match (critical, not typed): 4.02 from the reference.
        &[0x41, 0x03, 0x00, 0x07, 0x99, 0x11, 0xAB],
        // An unknown elective option (2048): ignored by the reference.
        &[0x40, 0x02, 0, 1, 0xE1, 0x06, 0xF3, 0x00, 0xFF, b'p'],
        // Uri-Path not UTF-8: 4.00.
        &[0x40, 0x02, 0, 1, 0xB1, 0xFF],
        // Block1 SZX 7.
        &[0x40, 0x02, 0, 1, 0xD1, 14, 0x07],
        // Payload marker with nothing after it, truncated option, reserved nibble.
        &[0x40, 0x02, 0, 1, 0xFF],
        &[0x40, 0x02, 0, 1, 0xB5, b'p'],
        &[0x40, 0x02, 0, 1, 0xF0],
        // Reserved class, a request in an ACK.
        &[0x40, 0x21, 0, 1],
        &[0x60, 0x01, 0, 1],
    ];
    for d in cases {
        assert_eq!(decode_fast(d), None, "{d:02x?} is left to the reference");
        assert_eq!(decode(d), decode_reference(d));
    }
    // A repeated elective option keeps its first value on both paths (a run of equal numbers).
    let d = [0x40, 0x02, 0, 1, 0xC1, 0x00, 0x01, 0x2A, 0x01, 0x2B];
    assert_eq!(decode_fast(&d).and_then(|m| m.content_format), Some(0));
    assert_eq!(decode(&d), decode_reference(&d));
}

/// One option for [`arb_request`]: a number among the typed ones, a few others, and values of
/// lengths around the limits.
fn arb_option() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let number = prop_oneof![
        proptest::sample::select(FAST_OPTIONS.to_vec()),
        proptest::sample::select(vec![0u16, 1, 2, 5, 8, 35, 39, 2048, 65000, 65535]),
    ];
    let value = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..=5),
        proptest::collection::vec(b'a'..=b'z', 0..=20),
        proptest::collection::vec(any::<u8>(), 0..=300),
    ];
    (number, value)
}

/// A datagram built field by field (valid structure but for the random bits in the header).
fn arb_request() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        prop_oneof![0x00u8..=0x05, 0x40u8..=0x5F, any::<u8>()],
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..=8),
        proptest::collection::vec(arb_option(), 0..6),
        proptest::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(b0, code, mid, token, mut options, payload)| {
            // Version 1 mostly; TKL from the token.
            let b0 = if b0 < 0xE0 {
                0x40 | (b0 & 0x30)
            } else {
                b0 & 0xF0
            };
            let tkl = u8::try_from(token.len()).unwrap_or(0);
            let mut d = vec![b0 | tkl, code];
            d.extend_from_slice(&mid.to_be_bytes());
            d.extend_from_slice(&token);
            options.sort_by_key(|(n, _)| *n);
            let mut last = 0;
            for (number, value) in options {
                write_option(&mut d, number - last, &value);
                last = number;
            }
            if !payload.is_empty() {
                d.push(PAYLOAD_MARKER);
                d.extend_from_slice(&payload);
            }
            d
        })
}

fn arb_block() -> impl Strategy<Value = Option<Block>> {
    proptest::option::of(
        (0..=Block::MAX_NUM, any::<bool>(), 0..=Block::MAX_SZX)
            .prop_map(|(n, m, s)| Block::new(n, m, s).unwrap()),
    )
}

proptest! {
    #[test]
    fn decode_never_panics(d in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode(&d).map_err(|e| e.answer());
    }

    #[test]
    fn decode_equals_the_reference_on_any_bytes(d in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assert_eq!(decode(&d), decode_reference(&d));
    }

    #[test]
    fn decode_equals_the_reference_on_built_messages(d in arb_request()) {
        let fast = decode_fast(&d);
        let reference = decode_reference(&d);
        if let Some(fast) = fast {
            prop_assert_eq!(Ok(fast), reference);
        } else {
            prop_assert_eq!(decode(&d), reference);
        }
    }

    #[test]
    fn response_round_trips(
        ty in prop_oneof![Just(MessageType::Ack), Just(MessageType::Con), Just(MessageType::Non)],
        code in prop_oneof![0x40u8..=0x5F, 0x80u8..=0x9F, 0xA0u8..=0xBF],
        mid in any::<u16>(),
        tok in proptest::collection::vec(any::<u8>(), 0..=8),
        etag in proptest::option::of(any::<u32>()),
        observe in proptest::option::of(0u32..(1 << 24)),
        cf in proptest::option::of(any::<u16>()),
        max_age in proptest::option::of(any::<u32>()),
        block2 in arb_block(),
        block1 in arb_block(),
        size2 in proptest::option::of(any::<u32>()),
        size1 in proptest::option::of(any::<u32>()),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let response = Response {
            etag, observe, content_format: cf, max_age, block2, block1, size2, size1,
            payload: &payload,
            ..Response::new(ty, Code(code), mid, token(&tok))
        };
        let mut out = Vec::new();
        encode_response(&mut out, &response);
        let m = decode(&out).unwrap();
        prop_assert_eq!(m.ty, ty);
        prop_assert_eq!(m.code, Code(code));
        prop_assert_eq!(m.message_id, mid);
        prop_assert_eq!(m.token.as_bytes(), &tok[..]);
        prop_assert_eq!(m.etag, etag.map(|e| e.to_be_bytes().to_vec()));
        prop_assert_eq!(m.observe, observe);
        prop_assert_eq!(m.content_format, cf);
        prop_assert_eq!(m.max_age, max_age);
        prop_assert_eq!(m.block2, block2);
        prop_assert_eq!(m.block1, block1);
        prop_assert_eq!(m.size2, size2);
        prop_assert_eq!(m.size1, size1);
        prop_assert_eq!(m.payload, payload);
    }
}
