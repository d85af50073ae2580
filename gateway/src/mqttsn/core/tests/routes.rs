//! Routing as the core sees it: a publish no route takes is refused with rc 0x03 and never
//! acknowledged; every uplink message carries its origin.

use std::sync::Arc;

use sensorgate_bridges::message::{Origin, Protocol};

use super::*;

#[test]
fn a_qos1_or_qos2_publish_no_route_takes_gets_not_supported_never_an_ack() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 60);
    let rejections = h.core.stats().rejections;
    for (qos, msg_id) in [(QoS::AtLeastOnce, 3), (QoS::ExactlyOnce, 4)] {
        h.send(&p, publish(qos, TopicRef::Predefined(1), msg_id, b"x"));
        let (_, token) = single_publish(h.events());
        h.core
            .handle_publish_result(h.now, token.unwrap(), PublishOutcome::NoRoute);
        assert_eq!(
            decode(&h.reply(&p)),
            Packet::PubAck {
                topic_id: 1,
                msg_id,
                rc: ReturnCode::NotSupported
            },
            "{qos:?}: refused with PUBACK, never PUBREC"
        );
    }
    assert_eq!(h.core.stats().rejections, rejections + 2);
    // The refused QoS 2 message was not taken: its retransmission is a new publish.
    h.send(
        &p,
        publish(QoS::ExactlyOnce, TopicRef::Predefined(1), 4, b"x"),
    );
    let (_, token) = single_publish(h.events());
    assert!(token.is_some());
    assert!(h.transmits().is_empty(), "no PUBREC before a verdict");
}

#[test]
fn uplink_messages_carry_the_session_origin_sharing_its_client_id() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 60);
    h.send(
        &p,
        publish(QoS::AtMostOnce, TopicRef::Predefined(1), 0, b"1"),
    );
    h.send(
        &p,
        publish(QoS::AtMostOnce, TopicRef::Predefined(1), 0, b"2"),
    );
    let messages = publishes(h.events());
    assert_eq!(messages.len(), 2);
    let expected = Origin {
        protocol: Protocol::MqttSn,
        client_id: Some(Arc::from("alice")),
        peer: Some(Arc::from("127.0.0.1:1000")),
    };
    assert_eq!(messages[0].origin, expected);
    let (first, second) = (&messages[0].origin, &messages[1].origin);
    assert!(
        Arc::ptr_eq(
            first.client_id.as_ref().unwrap(),
            second.client_id.as_ref().unwrap()
        ) && Arc::ptr_eq(first.peer.as_ref().unwrap(), second.peer.as_ref().unwrap()),
        "shared, not made per message"
    );
    // Reconnecting from another address changes the peer, not the client id.
    let q = peer(2000);
    h.connect(&q, "alice", 60);
    h.send(
        &q,
        publish(QoS::AtMostOnce, TopicRef::Predefined(1), 0, b"3"),
    );
    let (msg, _) = single_publish(h.events());
    assert_eq!(msg.origin.peer.as_deref(), Some("127.0.0.1:2000"));
    assert_eq!(msg.origin.client_id.as_deref(), Some("alice"));
}

#[test]
fn qos_minus_one_and_wills_carry_their_origin() {
    let mut h = Harness::new(config());
    let anonymous = peer(1);
    h.send(
        &anonymous,
        publish(QoS::MinusOne, TopicRef::Predefined(1), 0, b"m1"),
    );
    let (msg, _) = single_publish(h.events());
    assert_eq!(
        msg.origin,
        Origin {
            protocol: Protocol::MqttSn,
            client_id: None,
            peer: Some(Arc::from("127.0.0.1:1")),
        }
    );
    let a = peer(2);
    h.connect_with_will(&a, "a", "wills/a", b"a-lost");
    h.send(
        &a,
        publish(QoS::MinusOne, TopicRef::Predefined(1), 0, b"m1"),
    );
    let (msg, _) = single_publish(h.events());
    assert_eq!(
        msg.origin.client_id.as_deref(),
        Some("a"),
        "a connected sender"
    );
    h.advance(Duration::from_secs(15));
    let wills = publishes(h.events());
    assert_eq!(wills.len(), 1);
    assert_eq!(
        wills[0].origin,
        Origin {
            protocol: Protocol::MqttSn,
            client_id: Some(Arc::from("a")),
            peer: Some(Arc::from("127.0.0.1:2")),
        }
    );
}
