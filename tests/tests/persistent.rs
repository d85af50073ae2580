//! Persistent sessions (CONNECT with CleanSession=0), raw UDP: subscriptions, registrations
//! and queued QoS 1/2 downlink survive a DISCONNECT and a reconnect from another port (topics
//! REGISTERed to the client again before use; QoS 0 not kept), a CleanSession=1 CONNECT
//! discards the session, `session_expiry` ends it (the upstream subscription goes with it, as
//! the broker's log shows), and the queue of a disconnected session is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, Qos, SubTopic, TopicType};
use sensorgate_tests::{
    DELIVERY_TIMEOUT, Delivery, GATEWAY_ID, Marker, Rig, SnClient, UpMsg, await_live,
};

fn texts(got: &[Delivery]) -> Vec<String> {
    got.iter().map(Delivery::text).collect()
}

fn is_upstream_unsubscribe(line: &str, filter: &str) -> bool {
    let t: Vec<&str> = line.split_whitespace().collect();
    t.len() == 3 && t[1] == format!("sensorgate-{GATEWAY_ID}-local") && t[2] == filter
}

/// A CleanSession=0 client `id` subscribed QoS 1 to the concrete `topic`, live upstream.
fn persistent(rig: &Rig, id: &str, topic: &str) -> SnClient {
    let mut c = rig.client().unwrap();
    assert_eq!(c.connect_full(id, 0x00, 60).unwrap(), sn::RC_ACCEPTED);
    c.subscribe_ok(Qos::One, SubTopic::Name(topic)).unwrap();
    await_live(&mut c, rig.broker.port(), topic).unwrap();
    c
}

#[test]
fn subscriptions_registrations_and_queued_qos1_2_downlink_survive_a_reconnect_elsewhere() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "pers").unwrap();
    let mut a = rig.client().unwrap();
    assert_eq!(a.connect_full("pers", 0x00, 60).unwrap(), 0);
    a.subscribe_ok(Qos::One, SubTopic::Name("pp/#")).unwrap();
    a.subscribe_ok(Qos::Two, SubTopic::Name("pq2/exact"))
        .unwrap();
    let up = a.register("pp-up").unwrap();
    await_live(&mut a, port, "pp/probe").unwrap();
    await_live(&mut a, port, "pq2/exact").unwrap();
    a.disconnect().unwrap();

    marker
        .publish(&[
            UpMsg::new("pp/a", "q1", 1),
            UpMsg::new("pq2/exact", "q2", 2),
            UpMsg::new("pp/a", "zero", 0),
        ])
        .unwrap();

    // Back from another port.
    let mut b = rig.client().unwrap();
    assert_eq!(b.connect_full("pers", 0x00, 60).unwrap(), 0);
    let got = b.downlink(2, DELIVERY_TIMEOUT).unwrap();
    assert_eq!(texts(&got), vec!["q1", "q2"], "QoS 1/2 kept, in order");
    assert_eq!(
        (got[0].topic.as_deref(), got[0].qos),
        (Some("pp/a"), Qos::One),
        "REGISTERed first: {got:?}"
    );
    assert_eq!(
        (got[1].topic.as_deref(), got[1].qos),
        (Some("pq2/exact"), Qos::Two),
        "REGISTERed again, though the old connection had its id from SUBACK: {got:?}"
    );
    b.assert_no_reply()
        .map_err(|e| e.context("the QoS 0 message must not be kept for a disconnected client"))
        .unwrap();

    // The registration made before the disconnect still works for uplink.
    let mut obs = rig.subscribe(&["pp-up"]).unwrap();
    b.publish_qos1_ok(TopicType::Normal, up, b"uplink").unwrap();
    assert_eq!(obs.expect().unwrap().payload, b"uplink");
    // And the subscriptions are live, without subscribing again.
    marker.publish(&[UpMsg::new("pp/b", "live", 1)]).unwrap();
    let got = b.downlink(1, DELIVERY_TIMEOUT).unwrap();
    assert_eq!(
        (texts(&got), got[0].topic.as_deref()),
        (vec!["live".to_owned()], Some("pp/b"))
    );
    // The old port is nobody now.
    a.send(&sn::pingreq()).unwrap();
    assert_eq!(a.next_packet().unwrap(), sn::Packet::Disconnect);
}

#[test]
fn a_clean_session_connect_discards_the_persistent_session() {
    let rig = Rig::start().unwrap();
    let mut marker = Marker::for_rig(&rig, "discard").unwrap();
    let mut a = persistent(&rig, "pers-d", "pd/t");
    let up = a.register("pd-up").unwrap();
    a.disconnect().unwrap();
    marker.publish(&[UpMsg::new("pd/t", "queued", 1)]).unwrap();

    let mut b = rig.client().unwrap();
    assert_eq!(b.connect_full("pers-d", sn::FLAG_CLEAN, 60).unwrap(), 0);
    b.assert_no_reply()
        .map_err(|e| e.context("queued downlink of a discarded session"))
        .unwrap();
    rig.broker
        .wait_log("the upstream UNSUBSCRIBE of pd/t", DELIVERY_TIMEOUT, |l| {
            is_upstream_unsubscribe(l, "pd/t")
        })
        .unwrap();
    marker.publish(&[UpMsg::new("pd/t", "after", 1)]).unwrap();
    b.assert_no_reply().unwrap();
    let rc = b
        .publish_qos1(TopicType::Normal, up, false, b"stale id")
        .unwrap();
    assert_eq!(rc, sn::RC_INVALID_TOPIC, "the registration went too");
}

#[test]
fn a_persistent_session_ends_after_session_expiry() {
    let rig = Rig::start_with(|c| {
        c.mqttsn("session_expiry = \"2s\"");
        Ok(())
    })
    .unwrap();
    let mut marker = Marker::for_rig(&rig, "expiry").unwrap();
    let a = persistent(&rig, "pers-x", "px/t");
    a.disconnect().unwrap();
    let gone = Instant::now();
    // The session (and with it the last holder of px/t) goes after 2 s.
    rig.broker
        .wait_log(
            "the upstream UNSUBSCRIBE of px/t",
            Duration::from_secs(20),
            |l| is_upstream_unsubscribe(l, "px/t"),
        )
        .unwrap();
    assert!(
        gone.elapsed() >= Duration::from_millis(1500),
        "the session ended {:?} after DISCONNECT; session_expiry is 2 s",
        gone.elapsed()
    );
    let mut b = rig.client().unwrap();
    assert_eq!(b.connect_full("pers-x", 0x00, 60).unwrap(), 0);
    marker.publish(&[UpMsg::new("px/t", "late", 1)]).unwrap();
    b.assert_no_reply()
        .map_err(|e| e.context("the expired session's subscription still delivers"))
        .unwrap();
}

#[test]
fn the_queue_of_a_disconnected_persistent_session_is_bounded() {
    let rig = Rig::start_with(|c| {
        c.mqttsn("max_queued_per_client = 2\nqueue_full = \"drop_oldest\"");
        Ok(())
    })
    .unwrap();
    let mut marker = Marker::for_rig(&rig, "pq").unwrap();
    let a = persistent(&rig, "pers-q", "pq/t");
    a.disconnect().unwrap();
    marker
        .publish(
            &(1..=4)
                .map(|i| UpMsg::new("pq/t", format!("m{i}"), 1))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let mut b = rig.client().unwrap();
    assert_eq!(b.connect_full("pers-q", 0x00, 60).unwrap(), 0);
    let got = b.downlink(2, DELIVERY_TIMEOUT).unwrap();
    assert_eq!(texts(&got), vec!["m3", "m4"]);
    b.assert_no_reply().unwrap();
}
