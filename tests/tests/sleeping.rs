//! Sleeping clients, raw UDP: DISCONNECT with a duration (answered `02 18`), downlink buffered
//! while asleep, PINGREQ(ClientId) delivering the buffer one message at a time (each
//! acknowledged, REGISTER first where needed) and then PINGRESP `02 17`, NAT rebinding (waking
//! from a new port by PINGREQ or CONNECT keeps the session; the old port cannot act for it),
//! CONNECT making a sleeper active, the sleep timer tolerance, and the buffer bound.
//!
//! Messages published "while asleep" are published through a [`Marker`], so they have reached
//! the gateway before the client wakes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::sn::{self, Packet, Qos, SubTopic, TopicType};
use sensorgate_tests::{Delivery, Marker, Rig, SnClient, UpMsg, await_live};

fn texts(got: &[Delivery]) -> Vec<String> {
    got.iter().map(Delivery::text).collect()
}

/// The next packet must be a PUBLISH; returns (flags, topic id, msg id, data).
fn publish(c: &SnClient) -> (u8, u16, u16, Vec<u8>) {
    match c.next_packet().unwrap() {
        Packet::Publish {
            flags,
            topic_id,
            msg_id,
            data,
        } => (flags, topic_id, msg_id, data),
        p => panic!("expected PUBLISH, got {p:?}"),
    }
}

#[test]
fn buffered_downlink_is_delivered_one_message_at_a_time_on_pingreq_then_pingresp() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "sleep").unwrap();
    let mut c = rig.client().unwrap();
    assert_eq!(c.connect_full("zz", sn::FLAG_CLEAN, 60).unwrap(), 0);
    let id = c.subscribe_ok(Qos::One, SubTopic::Name("sl/t")).unwrap();
    let q0 = c.subscribe_ok(Qos::Zero, SubTopic::Name("sl0/t")).unwrap();
    c.subscribe_ok(Qos::One, SubTopic::Name("slw/#")).unwrap();
    await_live(&mut c, port, "sl/t").unwrap();
    await_live(&mut c, port, "sl0/t").unwrap();
    await_live(&mut c, port, "slw/probe").unwrap();

    c.sleep(60).unwrap();
    marker
        .publish(&[
            UpMsg::new("sl/t", "m1", 1),
            UpMsg::new("slw/a", "w1", 1),
            UpMsg::new("sl0/t", "z1", 0),
            UpMsg::new("sl/t", "m2", 1),
        ])
        .unwrap();
    // Asleep: nothing is sent.
    c.assert_no_reply().unwrap();

    c.send(&sn::pingreq_with_id(b"zz")).unwrap();
    let (flags, tid, msg_id, data) = publish(&c);
    assert_eq!((flags, tid, &data[..]), (0x20, id, &b"m1"[..]));
    c.assert_no_reply()
        .map_err(|e| e.context("a second message before m1 was acknowledged"))
        .unwrap();
    c.send(&sn::puback(tid, msg_id, sn::RC_ACCEPTED)).unwrap();
    // slw/a has no id at the client yet: REGISTER, acknowledged before its PUBLISH.
    let (w_id, reg_msg) = match c.next_packet().unwrap() {
        Packet::Register {
            topic_id,
            msg_id,
            name,
        } => {
            assert_eq!(name, "slw/a");
            (topic_id, msg_id)
        }
        p => panic!("expected REGISTER for slw/a, got {p:?}"),
    };
    c.assert_no_reply()
        .map_err(|e| e.context("PUBLISH before the REGACK"))
        .unwrap();
    c.send(&sn::regack(w_id, reg_msg, sn::RC_ACCEPTED)).unwrap();
    let (flags, tid, msg_id, data) = publish(&c);
    assert_eq!((flags, tid, &data[..]), (0x20, w_id, &b"w1"[..]));
    c.send(&sn::puback(tid, msg_id, sn::RC_ACCEPTED)).unwrap();
    // QoS 0 needs no acknowledgement; m2 follows it directly.
    let (flags, tid, msg_id, data) = publish(&c);
    assert_eq!((flags, tid, msg_id, &data[..]), (0x00, q0, 0, &b"z1"[..]));
    let (flags, tid, msg_id, data) = publish(&c);
    assert_eq!((flags, tid, &data[..]), (0x20, id, &b"m2"[..]));
    c.assert_no_reply()
        .map_err(|e| e.context("PINGRESP before the last PUBACK"))
        .unwrap();
    c.send(&sn::puback(tid, msg_id, sn::RC_ACCEPTED)).unwrap();
    c.expect_raw("PINGRESP", &[0x02, sn::PINGRESP]).unwrap();

    // Asleep again: buffered again, until the next PINGREQ.
    marker.publish(&[UpMsg::new("sl/t", "m3", 1)]).unwrap();
    c.assert_no_reply().unwrap();
    assert_eq!(texts(&c.wake("zz").unwrap()), vec!["m3"]);
    // Nothing buffered: PINGRESP at once.
    c.send(&sn::pingreq_with_id(b"zz")).unwrap();
    c.expect_raw("PINGRESP", &[0x02, sn::PINGRESP]).unwrap();
}

#[test]
fn waking_from_a_new_port_moves_the_session_and_the_old_port_cannot_act_for_it() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "nat").unwrap();
    let mut old = rig.connected("nat").unwrap();
    let id = old.subscribe_ok(Qos::One, SubTopic::Name("nat/t")).unwrap();
    let up = old.register("nat/up").unwrap();
    await_live(&mut old, port, "nat/t").unwrap();
    old.sleep(60).unwrap();
    marker
        .publish(&[UpMsg::new("nat/t", "n1", 1), UpMsg::new("nat/t", "n2", 1)])
        .unwrap();

    // The NAT gave the device a new port.
    let mut new = rig.client().unwrap();
    let got = new.wake("nat").unwrap();
    assert_eq!(texts(&got), vec!["n1", "n2"]);
    assert!(got.iter().all(|d| d.topic_id == id && d.qos == Qos::One));

    // The old port no longer speaks for the session.
    let cases: [(&str, Vec<u8>); 5] = [
        ("PUBLISH", sn::publish(0x20, up, 77, b"inject")),
        ("REGISTER", sn::register(78, b"nat/evil")),
        (
            "SUBSCRIBE",
            sn::subscribe(Qos::One, 79, &SubTopic::Name("nat/#")),
        ),
        ("UNSUBSCRIBE", sn::unsubscribe(80, &SubTopic::Name("nat/t"))),
        ("PINGREQ", sn::pingreq()),
    ];
    for (what, bytes) in cases {
        old.send(&bytes).unwrap();
        assert_eq!(
            old.next_packet().unwrap(),
            Packet::Disconnect,
            "{what} from the old port"
        );
    }
    // The session is intact (subscription kept, nothing unsubscribed) and bound to the new
    // port, still asleep.
    marker.publish(&[UpMsg::new("nat/t", "n3", 1)]).unwrap();
    old.assert_no_reply().unwrap();
    new.assert_no_reply().unwrap();
    assert_eq!(texts(&new.wake("nat").unwrap()), vec!["n3"]);
    // Its uplink works from the new port (CONNECT makes it active again, CleanSession=0
    // keeps the session).
    assert_eq!(new.connect_full("nat", 0x00, 60).unwrap(), 0);
    let mut obs = rig.subscribe(&["nat/up"]).unwrap();
    let rc = new
        .publish_qos1(TopicType::Normal, up, false, b"from-new")
        .unwrap();
    assert_eq!(rc, sn::RC_ACCEPTED);
    let m = obs.expect().unwrap();
    assert_eq!(m.payload, b"from-new", "and nothing injected before it");
}

#[test]
fn connect_from_a_new_port_while_asleep_resumes_the_session_with_its_buffer() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "resume").unwrap();
    let mut a = rig.client().unwrap();
    assert_eq!(a.connect_full("resume", 0x00, 60).unwrap(), 0);
    a.subscribe_ok(Qos::One, SubTopic::Name("rs/t")).unwrap();
    await_live(&mut a, port, "rs/t").unwrap();
    a.sleep(60).unwrap();
    marker
        .publish(&[UpMsg::new("rs/t", "r1", 1), UpMsg::new("rs/t", "r2", 1)])
        .unwrap();

    let mut b = rig.client().unwrap();
    assert_eq!(b.connect_full("resume", 0x00, 60).unwrap(), 0);
    // Active now: the buffer comes without PINGREQ, the topic registered to the (new)
    // client first.
    let got = b.downlink(2, sensorgate_tests::DELIVERY_TIMEOUT).unwrap();
    assert_eq!(texts(&got), vec!["r1", "r2"]);
    assert!(
        got.iter().all(|d| d.topic.as_deref() == Some("rs/t")),
        "REGISTER before PUBLISH after the reconnect: {got:?}"
    );
    // Live downlink flows directly, as to any active client.
    marker.publish(&[UpMsg::new("rs/t", "r3", 1)]).unwrap();
    assert_eq!(
        texts(&b.downlink(1, sensorgate_tests::DELIVERY_TIMEOUT).unwrap()),
        vec!["r3"]
    );
    a.send(&sn::pingreq()).unwrap();
    assert_eq!(a.next_packet().unwrap(), Packet::Disconnect, "old port");
    b.ping().unwrap();
}

#[test]
fn connect_from_the_same_port_makes_a_sleeper_active() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "active").unwrap();
    let mut c = rig.client().unwrap();
    assert_eq!(c.connect_full("back", 0x00, 60).unwrap(), 0);
    c.subscribe_ok(Qos::One, SubTopic::Name("bk/t")).unwrap();
    await_live(&mut c, port, "bk/t").unwrap();
    c.sleep(60).unwrap();
    assert_eq!(c.connect_full("back", 0x00, 60).unwrap(), 0);
    marker.publish(&[UpMsg::new("bk/t", "live", 1)]).unwrap();
    let got = c.downlink(1, sensorgate_tests::DELIVERY_TIMEOUT).unwrap();
    assert_eq!(texts(&got), vec!["live"]);
    // Active: a PINGREQ without ClientId is a keep-alive ping.
    c.ping().unwrap();
}

#[test]
fn sleep_timer_allows_fifty_percent_more_then_the_client_is_lost() {
    let rig = Rig::start().unwrap();
    let mut c = rig.connected("timer").unwrap();
    c.sleep(4).unwrap();
    // Past the 4 s duration but within +50% (6 s): still there.
    std::thread::sleep(Duration::from_millis(4600));
    assert!(c.wake("timer").unwrap().is_empty());
    // The timer restarted with PINGRESP; now past 6 s: lost.
    std::thread::sleep(Duration::from_millis(7500));
    c.send(&sn::pingreq_with_id(b"timer")).unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        Packet::Disconnect,
        "a client asleep for 7.5 s of 4 s (+50%) should be lost"
    );
}

/// Publishes m1..m5 to a sleeper whose buffer holds 3 (`queue_full = policy`); returns what
/// it gets on waking.
fn overflow_sleeper(policy: &str) -> Vec<String> {
    let policy = policy.to_owned();
    let rig = Rig::start_with(move |c| {
        c.mqttsn(&format!(
            "max_buffered_per_sleeping_client = 3\nqueue_full = \"{policy}\"\n"
        ));
        Ok(())
    })
    .unwrap();
    let mut marker = Marker::for_rig(&rig, "buf").unwrap();
    let mut c = rig.connected("buffered").unwrap();
    c.subscribe_ok(Qos::One, SubTopic::Name("bf/t")).unwrap();
    await_live(&mut c, rig.broker.port(), "bf/t").unwrap();
    c.sleep(60).unwrap();
    marker
        .publish(
            &(1..=5)
                .map(|i| UpMsg::new("bf/t", format!("m{i}"), 1))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    texts(&c.wake("buffered").unwrap())
}

#[test]
fn sleeping_buffer_is_bounded_and_drops_the_oldest() {
    assert_eq!(overflow_sleeper("drop_oldest"), vec!["m3", "m4", "m5"]);
}

#[test]
fn sleeping_buffer_is_bounded_and_drops_the_new_with_drop_new() {
    assert_eq!(overflow_sleeper("drop_new"), vec!["m1", "m2", "m3"]);
}
