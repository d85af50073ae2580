//! Fuzzes the DTLS layer's own record reader (`sensorgate::dtls::record`), which sees every
//! datagram from an address without a session: any input parses or fails without panicking;
//! a parsed ClientHello re-emitted with its own fields parses to the same (and is its first
//! record byte for byte when that record holds nothing else), its cookie-less copy parses to
//! the same random, session id and rest (message_seq 0, record sequence 0, no cookie), and a
//! HelloVerifyRequest for it is a handshake record that is not taken for a ClientHello.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::dtls::record::{
    RecordError, hello_verify_request, is_epoch0_handshake, parse_client_hello,
};

fuzz_target!(|data: &[u8]| {
    let Ok(hello) = parse_client_hello(data) else {
        return;
    };
    assert!(is_epoch0_handshake(data));
    let again = hello.emit(hello.message_seq, hello.record_sequence, hello.cookie);
    assert_eq!(
        parse_client_hello(&again),
        Ok(hello),
        "re-emitted parses differently"
    );
    // When the record holds the ClientHello alone (no further handshake message after it),
    // the re-emitted record is the first record byte for byte.
    let record_len = data
        .get(11..13)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    if record_len == Some(again.len() - 13) {
        assert!(data.starts_with(&again), "re-emitted differs");
    }
    let bare = hello.without_cookie();
    let parsed = parse_client_hello(&bare).expect("the cookie-less copy parses");
    assert_eq!(parsed.cookie, b"");
    assert_eq!(parsed.message_seq, 0);
    assert_eq!(parsed.record_sequence, [0; 6]);
    assert_eq!(
        (
            parsed.random,
            parsed.session_id,
            parsed.rest,
            parsed.client_version
        ),
        (
            hello.random,
            hello.session_id,
            hello.rest,
            hello.client_version
        )
    );
    let mut hvr = Vec::new();
    hello_verify_request(hello.record_sequence, hello.random, &mut hvr);
    assert!(is_epoch0_handshake(&hvr));
    assert_eq!(parse_client_hello(&hvr), Err(RecordError::NotClientHello));
});
