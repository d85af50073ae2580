//! Fuzzes the CoAP decoder: any datagram decodes (or fails with an answer) without panicking,
//! to the same result through the fast path (`decode`) as through the coap-lite reference
//! (`decode_reference`), and a decoded request re-encoded as a response with its own ID and
//! token decodes again to the same header, token, options and payload.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::coap::msg::{
    Code, MessageType, Response, decode, decode_reference, encode_response,
};

fuzz_target!(|data: &[u8]| {
    let decoded = decode(data);
    assert_eq!(decoded, decode_reference(data));
    let message = match decoded {
        Ok(message) => message,
        Err(error) => {
            let _ = error.answer();
            return;
        }
    };
    if !message.is_request() {
        return;
    }
    let ty = match message.ty {
        MessageType::Con => MessageType::Ack,
        _ => MessageType::Non,
    };
    let response = Response {
        observe: message.observe,
        content_format: message.content_format,
        max_age: message.max_age,
        block1: message.block1,
        block2: message.block2,
        size1: message.size1,
        size2: message.size2,
        payload: &message.payload,
        ..Response::new(ty, Code::CONTENT, message.message_id, message.token)
    };
    let mut out = Vec::new();
    encode_response(&mut out, &response);
    let back = decode(&out).expect("an encoded response decodes");
    assert_eq!(back.ty, ty);
    assert_eq!(back.code, Code::CONTENT);
    assert_eq!(back.message_id, message.message_id);
    assert_eq!(back.token, message.token);
    assert_eq!(back.observe, message.observe);
    assert_eq!(back.content_format, message.content_format);
    assert_eq!(back.max_age, message.max_age);
    assert_eq!(back.block1, message.block1);
    assert_eq!(back.block2, message.block2);
    assert_eq!(back.size1, message.size1);
    assert_eq!(back.size2, message.size2);
    assert_eq!(back.payload, message.payload);
});
