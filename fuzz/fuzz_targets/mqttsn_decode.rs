//! Fuzzes the MQTT-SN decoder: any datagram must decode without panicking, and every frame it
//! accepts must survive encode → decode unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::mqttsn::codec::{DecodeLimits, Frame, MAX_CLIENT_ID_LEN_SPEC, decode};

/// The spec limit, a stricter one, and a roomier one, so the ClientId check runs both ways.
const LIMITS: [DecodeLimits; 3] = [
    DecodeLimits {
        max_client_id_len: MAX_CLIENT_ID_LEN_SPEC,
    },
    DecodeLimits {
        max_client_id_len: 1,
    },
    DecodeLimits {
        max_client_id_len: 1024,
    },
];

fuzz_target!(|data: &[u8]| {
    for limits in &LIMITS {
        let Ok(frame) = decode(data, limits) else {
            continue;
        };
        let mut out = Vec::new();
        frame
            .encode(&mut out)
            .expect("a decoded frame fits its length fields again");
        if let Frame::Plain(packet) = frame {
            assert_eq!(out.len(), packet.encoded_len(), "encoded_len of {packet:?}");
        }
        assert_eq!(decode(&out, limits), Ok(frame), "round trip of {data:02x?}");
    }
});
