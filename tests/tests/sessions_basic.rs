//! Sessions: CONNECT/CONNACK, unknown addresses, PINGREQ, DISCONNECT, session takeover by
//! ClientId, SEARCHGW, and the unsupported CONNECT variants.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sensorgate_tests::sn::{self, Packet, Qos, TopicType};
use sensorgate_tests::{GATEWAY_ID, PREDEFINED_ID, Rig};

#[test]
fn packets_from_an_unknown_address_get_disconnect() {
    let rig = Rig::start().unwrap();
    let c = rig.client().unwrap();
    let cases: [(&str, Vec<u8>); 6] = [
        ("PUBLISH QoS 1 normal", sn::publish(0x20, 1, 1, b"x")),
        (
            "PUBLISH QoS 0 short",
            sn::publish(0x02, sn::short_id(b"ab"), 0, b"x"),
        ),
        (
            "PUBLISH QoS 1 predefined",
            sn::publish(0x21, PREDEFINED_ID, 2, b"x"),
        ),
        ("PUBLISH QoS 2", sn::publish(0x40, 1, 3, b"x")),
        ("REGISTER", sn::register(4, b"some/topic")),
        ("PINGREQ", sn::pingreq()),
    ];
    for (what, bytes) in cases {
        c.send(&bytes).unwrap();
        assert_eq!(
            c.next_packet().unwrap(),
            Packet::Disconnect,
            "{what} without a session"
        );
    }
}

#[test]
fn pingreq_gets_pingresp() {
    let rig = Rig::start().unwrap();
    let c = rig.connected("pinger").unwrap();
    for _ in 0..3 {
        c.ping().unwrap();
    }
}

#[test]
fn disconnect_is_answered_and_ends_the_session() {
    let rig = Rig::start().unwrap();
    let mut c = rig.connected("leaver").unwrap();
    let id = c.register("leaver/t").unwrap();
    c.disconnect().unwrap();
    c.publish(Qos::One, TopicType::Normal, id, false, b"late")
        .unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        Packet::Disconnect,
        "PUBLISH after DISCONNECT"
    );
    // And it can come back.
    c.connect_ok("leaver").unwrap();
    c.ping().unwrap();
}

#[test]
fn second_connect_with_the_same_client_id_takes_over_the_session() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["takeover/#"]).unwrap();
    let mut old = rig.connected("same-id").unwrap();
    let old_topic = old.register("takeover/old").unwrap();
    let mut new = rig.connected("same-id").unwrap();
    assert_ne!(old.local_addr().unwrap(), new.local_addr().unwrap());
    // The old address no longer maps to a session.
    old.publish(Qos::One, TopicType::Normal, old_topic, false, b"stale")
        .unwrap();
    assert_eq!(
        old.next_packet().unwrap(),
        Packet::Disconnect,
        "PUBLISH from the replaced address"
    );
    old.send(&sn::pingreq()).unwrap();
    assert_eq!(
        old.next_packet().unwrap(),
        Packet::Disconnect,
        "PINGREQ from the replaced address"
    );
    // The new one works.
    let id = new.register("takeover/new").unwrap();
    new.publish_qos1_ok(TopicType::Normal, id, b"fresh")
        .unwrap();
    assert_eq!(sub.expect().unwrap().payload, b"fresh");
    new.ping().unwrap();
}

#[test]
fn reconnect_with_clean_session_forgets_registrations() {
    let rig = Rig::start().unwrap();
    let mut c = rig.connected("cleaner").unwrap();
    let id = c.register("clean/t").unwrap();
    c.publish_qos1_ok(TopicType::Normal, id, b"before").unwrap();
    c.connect_ok("cleaner").unwrap();
    let msg_id = c
        .publish(Qos::One, TopicType::Normal, id, false, b"after")
        .unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        Packet::Puback {
            topic_id: id,
            msg_id,
            rc: sn::RC_INVALID_TOPIC
        },
        "topic id of the cleaned session"
    );
}

#[test]
fn searchgw_gets_gwinfo_with_the_gateway_id() {
    let rig = Rig::start().unwrap();
    let c = rig.client().unwrap();
    for radius in [0u8, 1, 3] {
        c.send(&sn::searchgw(radius)).unwrap();
        let raw = c
            .recv_raw(sensorgate_tests::REPLY_TIMEOUT)
            .unwrap()
            .expect("GWINFO");
        // Sent by the gateway, GWINFO carries only the GwId: 03 02 07.
        assert_eq!(raw, vec![0x03, sn::GWINFO, GATEWAY_ID], "radius {radius}");
    }
}

#[test]
fn persistent_sessions_are_accepted_and_will_starts_the_handshake() {
    let rig = Rig::start().unwrap();
    let mut c = rig.client().unwrap();
    assert_eq!(
        c.connect_flags("persistent", 0x00).unwrap(),
        sn::RC_ACCEPTED
    );
    // With the Will flag the gateway asks for the Will topic first: 02 06.
    let w = rig.client().unwrap();
    w.send(&sn::connect(
        sn::FLAG_CLEAN | sn::FLAG_WILL,
        30,
        b"with-will",
    ))
    .unwrap();
    assert_eq!(
        w.recv_raw(sensorgate_tests::REPLY_TIMEOUT)
            .unwrap()
            .unwrap(),
        vec![0x02, sn::WILLTOPICREQ]
    );
    // Exact CONNACK bytes for a plain accepted CONNECT: 03 05 00.
    let ok = rig.client().unwrap();
    ok.send(&sn::connect(sn::FLAG_CLEAN, 30, b"exact")).unwrap();
    assert_eq!(
        ok.recv_raw(sensorgate_tests::REPLY_TIMEOUT)
            .unwrap()
            .unwrap(),
        vec![0x03, sn::CONNACK, 0x00]
    );
}

#[test]
fn many_clients_keep_separate_sessions() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["multi/#"]).unwrap();
    let mut clients: Vec<_> = (0..5)
        .map(|i| rig.connected(&format!("multi-{i}")).unwrap())
        .collect();
    let ids: Vec<u16> = clients
        .iter_mut()
        .enumerate()
        .map(|(i, c)| c.register(&format!("multi/{i}")).unwrap())
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.publish_qos1_ok(TopicType::Normal, ids[i], format!("from-{i}").as_bytes())
            .unwrap();
        let m = sub.expect().unwrap();
        assert_eq!(
            (m.topic, m.payload),
            (format!("multi/{i}"), format!("from-{i}").into_bytes())
        );
    }
}
