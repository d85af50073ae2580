//! Packets are acted on only in a session state that allows them, and a SUBSCRIBE is refused
//! rather than acknowledged for a filter the gateway could not hold upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sensorgate_tests::sn::{self, Qos, SubTopic, TopicType};
use sensorgate_tests::{PREDEFINED_ID, PREDEFINED_TOPIC, Rig};

#[test]
fn a_publish_during_the_will_handshake_gets_disconnect_and_never_reaches_the_broker() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&[PREDEFINED_TOPIC]).unwrap();
    let mut c = rig.client().unwrap();
    c.send(&sn::connect(
        sn::FLAG_CLEAN | sn::FLAG_WILL,
        60,
        b"handshaking",
    ))
    .unwrap();
    assert_eq!(c.next_packet().unwrap(), sn::Packet::WillTopicReq);
    // Not connected yet: "CONNECT first".
    c.send(&sn::publish(
        sn::flags(Qos::One, false, TopicType::Predefined),
        PREDEFINED_ID,
        1,
        b"early",
    ))
    .unwrap();
    assert_eq!(c.next_packet().unwrap(), sn::Packet::Disconnect);
    // The handshake itself goes on.
    c.send(&sn::willtopic(Qos::Zero, false, "wills/handshaking"))
        .unwrap();
    assert_eq!(c.next_packet().unwrap(), sn::Packet::WillMsgReq);
    c.send(&sn::willmsg(b"gone")).unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        sn::Packet::Connack {
            rc: sn::RC_ACCEPTED
        }
    );
    c.publish_qos1_ok(TopicType::Predefined, PREDEFINED_ID, b"late")
        .unwrap();
    // The first (and only) message the broker got is the one sent once connected.
    assert_eq!(sub.expect().unwrap().payload, b"late");
}

#[test]
fn a_subscribe_beyond_max_filters_gets_congestion() {
    let rig = Rig::start_with(|cfg| {
        cfg.mqttsn("max_filters = 2");
        Ok(())
    })
    .unwrap();
    let mut a = rig.connected("filters-a").unwrap();
    let mut b = rig.connected("filters-b").unwrap();
    a.subscribe_ok(Qos::One, SubTopic::Name("f/1")).unwrap();
    a.subscribe_ok(Qos::One, SubTopic::Name("f/+")).unwrap();
    // A third distinct filter would not fit the upstream's table (sized by max_filters).
    let refused = b.subscribe(Qos::One, SubTopic::Name("f/3")).unwrap();
    assert_eq!(refused.rc, sn::RC_CONGESTION);
    // Filters the gateway holds are shared freely.
    b.subscribe_ok(Qos::One, SubTopic::Name("f/1")).unwrap();
    // Room again once the last subscriber of a filter leaves.
    a.unsubscribe(SubTopic::Name("f/+")).unwrap();
    b.subscribe_ok(Qos::One, SubTopic::Name("f/3")).unwrap();
}
