//! QoS 2 uplink: PUBREC once the message is durable in the spool (even while the broker is
//! frozen), a duplicate PUBLISH before PUBREL is never forwarded twice, PUBREL → PUBCOMP, and
//! MsgIds are reusable afterwards.
//!
//! "Forwarded exactly once" is checked without waiting for silence: after the exchange, the
//! same client publishes a marker on the same topic through the same upstream, so any duplicate
//! would reach the subscriber before the marker. The marker is QoS 2 like the messages it
//! follows: the gateway keeps order in what it sends, but the broker passes a QoS 2 message on
//! only when the gateway's PUBREL comes, and a QoS 1 message at once, so a QoS 1 marker sent
//! while the QoS 2 exchange upstream is still open overtakes it at the subscriber (MQTT keeps
//! order per QoS level only). Between QoS 2 messages the order of the gateway's PUBRELs, which
//! follows its PUBLISHes, is the order the subscriber sees.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::sn::{self, Qos, TopicType};
use sensorgate_tests::{Rig, SnClient, Subscriber};

/// A QoS 1 subscriber: a QoS 2 delivery is handed to the test only on the broker's PUBREL to
/// the subscriber, a later step than a QoS 1 delivery; at QoS 1 they all come in the order the
/// broker sends them.
fn ordered_sub(rig: &Rig) -> Subscriber {
    Subscriber::start_full(rig.broker.port(), &["q2/#"], "5", 1).unwrap()
}

fn payloads_until_marker(sub: &mut Subscriber, marker: &[u8]) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    for _ in 0..20 {
        let m = sub.expect().unwrap();
        if m.payload == marker {
            return seen;
        }
        seen.push(m.payload);
    }
    panic!("marker never arrived; saw {seen:?}");
}

/// Publishes the marker at QoS 2, the QoS of the messages it follows (see the module docs).
fn send_marker(c: &mut SnClient, topic_id: u16) {
    c.publish_qos2_ok(TopicType::Normal, topic_id, false, b"marker")
        .unwrap();
}

#[test]
fn qos2_pubrec_then_pubrel_pubcomp_and_exactly_one_copy() {
    let rig = Rig::start().unwrap();
    let mut sub = ordered_sub(&rig);
    let mut c = rig.connected("q2-basic").unwrap();
    let id = c.register("q2/basic").unwrap();
    let msg_id = c
        .publish(Qos::Two, TopicType::Normal, id, false, b"once")
        .unwrap();
    assert_eq!(c.next_packet().unwrap(), sn::Packet::Pubrec { msg_id });
    c.send(&sn::pubrel(msg_id)).unwrap();
    assert_eq!(c.next_packet().unwrap(), sn::Packet::Pubcomp { msg_id });
    send_marker(&mut c, id);
    assert_eq!(
        payloads_until_marker(&mut sub, b"marker"),
        vec![b"once".to_vec()]
    );
}

#[test]
fn qos2_pubrec_comes_once_spooled_even_while_the_broker_is_frozen() {
    let rig = Rig::start().unwrap();
    let mut c = rig.connected("q2-wait").unwrap();
    let id = c.register("q2/wait").unwrap();
    c.publish_qos2_ok(TopicType::Normal, id, false, b"warm")
        .unwrap();

    rig.broker.pause().unwrap();
    let msg_id = c
        .publish(Qos::Two, TopicType::Normal, id, false, b"held")
        .unwrap();
    let got = c.expect("PUBREC", Duration::from_secs(10), |p| {
        *p == sn::Packet::Pubrec { msg_id }
    });
    rig.broker.resume().unwrap();
    got.unwrap();
    c.pubrel_ok(msg_id).unwrap();
}

#[test]
fn duplicate_publish_after_pubrec_is_not_forwarded_twice() {
    let rig = Rig::start().unwrap();
    let mut sub = ordered_sub(&rig);
    let mut c = rig.connected("q2-dup").unwrap();
    let id = c.register("q2/dup").unwrap();
    let msg_id = c.msg_id();
    let first = sn::publish(
        sn::flags(Qos::Two, false, TopicType::Normal),
        id,
        msg_id,
        b"d1",
    );
    let dup = sn::publish(
        sn::FLAG_DUP | sn::flags(Qos::Two, false, TopicType::Normal),
        id,
        msg_id,
        b"d1",
    );
    c.send(&first).unwrap();
    assert_eq!(c.next_packet().unwrap(), sn::Packet::Pubrec { msg_id });
    // The sensor lost the PUBREC and retransmits: it must get PUBREC again, nothing forwarded.
    c.send(&dup).unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        sn::Packet::Pubrec { msg_id },
        "PUBREC for the DUP"
    );
    c.send(&dup).unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        sn::Packet::Pubrec { msg_id },
        "PUBREC for the 2nd DUP"
    );
    c.pubrel_ok(msg_id).unwrap();
    send_marker(&mut c, id);
    assert_eq!(
        payloads_until_marker(&mut sub, b"marker"),
        vec![b"d1".to_vec()]
    );
}

#[test]
fn duplicate_publish_while_the_broker_has_not_acked_is_not_forwarded_twice() {
    let rig = Rig::start().unwrap();
    let mut sub = ordered_sub(&rig);
    let mut c = rig.connected("q2-racer").unwrap();
    let id = c.register("q2/race").unwrap();
    let msg_id = c.msg_id();
    let flags = sn::flags(Qos::Two, false, TopicType::Normal);
    // Back to back: the duplicate arrives while the first is still on its way to the broker.
    c.send(&sn::publish(flags, id, msg_id, b"r1")).unwrap();
    c.send(&sn::publish(sn::FLAG_DUP | flags, id, msg_id, b"r1"))
        .unwrap();
    c.expect("PUBREC", Duration::from_secs(10), |p| {
        *p == sn::Packet::Pubrec { msg_id }
    })
    .unwrap();
    // A second PUBREC for the duplicate is allowed; anything else is not.
    c.send(&sn::pubrel(msg_id)).unwrap();
    let mut pubrecs = 1;
    loop {
        match c.next_packet().unwrap() {
            sn::Packet::Pubrec { msg_id: m } if m == msg_id && pubrecs < 2 => pubrecs += 1,
            sn::Packet::Pubcomp { msg_id: m } if m == msg_id => break,
            p => panic!("unexpected {p:?} after PUBREL"),
        }
    }
    send_marker(&mut c, id);
    assert_eq!(
        payloads_until_marker(&mut sub, b"marker"),
        vec![b"r1".to_vec()]
    );
}

#[test]
fn retransmitted_pubrel_gets_pubcomp_again() {
    // The sensor lost the PUBCOMP and retransmits PUBREL (6.13): it must not be left stuck.
    let rig = Rig::start().unwrap();
    let mut c = rig.connected("q2-pubrel").unwrap();
    let id = c.register("q2/pubrel").unwrap();
    let msg_id = c
        .publish(Qos::Two, TopicType::Normal, id, false, b"x")
        .unwrap();
    assert_eq!(c.next_packet().unwrap(), sn::Packet::Pubrec { msg_id });
    c.pubrel_ok(msg_id).unwrap();
    c.send(&sn::pubrel(msg_id)).unwrap();
    assert_eq!(c.next_packet().unwrap(), sn::Packet::Pubcomp { msg_id });
}

#[test]
fn msg_id_is_reusable_after_pubcomp() {
    let rig = Rig::start().unwrap();
    let mut sub = ordered_sub(&rig);
    let mut c = rig.connected("q2-reuse").unwrap();
    let id = c.register("q2/reuse").unwrap();
    let flags = sn::flags(Qos::Two, false, TopicType::Normal);
    for payload in [&b"first"[..], b"second"] {
        // Same MsgId 42 both times, no DUP: two distinct messages.
        c.send(&sn::publish(flags, id, 42, payload)).unwrap();
        assert_eq!(c.next_packet().unwrap(), sn::Packet::Pubrec { msg_id: 42 });
        c.pubrel_ok(42).unwrap();
    }
    send_marker(&mut c, id);
    assert_eq!(
        payloads_until_marker(&mut sub, b"marker"),
        vec![b"first".to_vec(), b"second".to_vec()]
    );
}
