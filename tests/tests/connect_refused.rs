//! A CONNECT the gateway does not accept is answered with a CONNACK carrying the reason
//! (spec 6.2), never left without an answer, and starts nothing (no Will handshake).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sensorgate_tests::{Rig, sn};

#[test]
fn client_ids_the_gateway_refuses_get_connack_not_supported() {
    let rig = Rig::start().unwrap();
    let mut c = rig.client().unwrap();
    // The ClientId of a Paho MQTTSNPacket sample (33 characters), an empty one, long ones.
    let long = "x".repeat(250);
    for id in [
        "paho-mqttsn-sample-client-0123456",
        "",
        "y".repeat(24).as_str(),
        &long,
    ] {
        assert_eq!(
            c.connect(id).unwrap(),
            sn::RC_NOT_SUPPORTED,
            "CONNECT with a ClientId of {} octets",
            id.len()
        );
        c.assert_no_reply().unwrap();
    }
    // With the Will flag: the CONNACK and nothing else (no WILLTOPICREQ).
    c.send(&sn::connect(
        sn::FLAG_CLEAN | sn::FLAG_WILL,
        60,
        &[b'w'; 24],
    ))
    .unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        sn::Packet::Connack {
            rc: sn::RC_NOT_SUPPORTED
        }
    );
    c.assert_no_reply().unwrap();
    // The longest accepted ClientId (max_client_id_len = 23) connects.
    c.connect_ok(&"z".repeat(23)).unwrap();
}

// The session-limit refusal (rc 0x01) is covered by the core's tests (`core/tests/states.rs`):
// the rig's config always sets `max_clients`.
