//! Sessions across a gateway restart, real mosquitto and the real binary: a sleeping client's
//! buffered QoS 1 downlink survives a SIGTERM restart and a `kill -9` (once the gateway has
//! acknowledged the message to the broker, it is on disk), and a CleanSession=0 client's
//! subscription and queued downlink survive a restart without subscribing again.
//!
//! Messages for clients that are away are published through a [`Marker`], so the gateway has
//! handled them before it is stopped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::sn::{self, Qos, SubTopic};
use sensorgate_tests::{
    DELIVERY_TIMEOUT, Delivery, Marker, Rig, SnClient, UpMsg, await_live, is_probe, poll_until,
    publish_upstream,
};

fn texts(got: &[Delivery]) -> Vec<String> {
    got.iter().map(Delivery::text).collect()
}

/// A clean client `id`, subscribed QoS 1 to `topic` (live upstream), gone to sleep for a
/// minute.
fn sleeper(rig: &Rig, id: &str, topic: &str) -> SnClient {
    let mut c = rig.client().unwrap();
    assert_eq!(c.connect_full(id, sn::FLAG_CLEAN, 60).unwrap(), 0);
    c.subscribe_ok(Qos::One, SubTopic::Name(topic)).unwrap();
    await_live(&mut c, rig.broker.port(), topic).unwrap();
    c.sleep(60).unwrap();
    c
}

/// The gateway's log without terminal colour codes (`ESC [ ... m`).
fn plain_log(rig: &Rig) -> String {
    let log = rig.gateway.log();
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How many broker acknowledgements the session store has released so far (its debug log
/// line "Session changes durable." carries `acks=N` per commit).
fn durable_acks(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("Session changes durable."))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|field| field.strip_prefix("acks="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

fn restored(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Persisted sessions restored."))
        .map(str::to_owned)
        .collect()
}

#[test]
fn downlink_to_a_sleeping_client_survives_a_gateway_restart() {
    let mut rig = Rig::start().unwrap();
    let mut marker = Marker::for_rig(&rig, "rs-term").unwrap();
    let mut c = sleeper(&rig, "sleeper-term", "rst/t");
    marker.publish(&[UpMsg::new("rst/t", "kept", 1)]).unwrap();
    c.assert_no_reply().unwrap();

    let status = rig.gateway.stop().unwrap();
    assert!(status.success(), "{status}\n{}", rig.gateway.log());
    rig.gateway.restart().unwrap();
    let log = plain_log(&rig);
    assert!(
        restored(&log)
            .last()
            .is_some_and(|l| l.contains("restored=1")),
        "{log}"
    );

    // Woken from the same port: the message, REGISTERed first (the client knows no ids after
    // the restart), then PINGRESP.
    let got = c.wake("sleeper-term").unwrap();
    assert_eq!(texts(&got), vec!["kept"]);
    assert_eq!(
        (got[0].topic.as_deref(), got[0].qos),
        (Some("rst/t"), Qos::One)
    );

    // Its subscription was made upstream again at start: downlink is buffered again.
    let mut marker = Marker::for_rig(&rig, "rs-term-2").unwrap();
    marker.publish(&[UpMsg::new("rst/t", "after", 1)]).unwrap();
    c.assert_no_reply().unwrap();
    assert_eq!(texts(&c.wake("sleeper-term").unwrap()), vec!["after"]);
    assert!(rig.gateway.stop().unwrap().success());
}

#[test]
fn downlink_acknowledged_to_the_broker_survives_kill_9() {
    let mut rig = Rig::start().unwrap();
    let mut marker = Marker::for_rig(&rig, "rs-kill").unwrap();
    let mut c = sleeper(&rig, "sleeper-kill", "rsk/t");
    let before = durable_acks(&plain_log(&rig));
    marker
        .publish(&[UpMsg::new("rsk/t", "k1", 1), UpMsg::new("rsk/t", "k2", 1)])
        .unwrap();
    // The gateway acknowledges both to the broker only once they are on disk.
    poll_until(
        "the session store to release both acknowledgements",
        DELIVERY_TIMEOUT,
        Duration::from_millis(50),
        || Ok((durable_acks(&plain_log(&rig)) >= before + 2).then_some(())),
    )
    .unwrap();

    rig.gateway.kill9().unwrap();
    rig.gateway.restart().unwrap();
    assert_eq!(texts(&c.wake("sleeper-kill").unwrap()), vec!["k1", "k2"]);
    // Delivered: gone from the store too; after another restart nothing comes again.
    assert!(rig.gateway.stop().unwrap().success());
    rig.gateway.restart().unwrap();
    assert!(c.wake("sleeper-kill").unwrap().is_empty());
}

#[test]
fn a_clean_session_0_subscription_and_its_queue_survive_a_restart() {
    let mut rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "rs-pers").unwrap();
    let mut a = rig.client().unwrap();
    assert_eq!(a.connect_full("pers-restart", 0x00, 60).unwrap(), 0);
    a.subscribe_ok(Qos::One, SubTopic::Name("rsp/#")).unwrap();
    await_live(&mut a, port, "rsp/probe").unwrap();
    a.disconnect().unwrap();
    marker
        .publish(&[
            UpMsg::new("rsp/q", "queued", 1),
            UpMsg::new("rsp/q", "zero", 0),
        ])
        .unwrap();

    let status = rig.gateway.stop().unwrap();
    assert!(status.success(), "{status}\n{}", rig.gateway.log());
    rig.gateway.restart().unwrap();

    // Reconnect with CleanSession=0 from another port, without subscribing again.
    let mut b = rig.client().unwrap();
    assert_eq!(b.connect_full("pers-restart", 0x00, 60).unwrap(), 0);
    let got = b.downlink(1, DELIVERY_TIMEOUT).unwrap();
    assert_eq!(texts(&got), vec!["queued"], "QoS 1 kept, QoS 0 not");
    assert_eq!(got[0].topic.as_deref(), Some("rsp/q"), "REGISTERed first");
    // The subscription is live upstream: a new message arrives.
    await_live(&mut b, port, "rsp/probe").unwrap();
    publish_upstream(port, &[UpMsg::new("rsp/new", "new", 1)]).unwrap();
    let is_new = |p: &sn::Packet| matches!(p, sn::Packet::Publish { data, .. } if data == b"new");
    let (before, p) = b
        .downlink_until("the new message", DELIVERY_TIMEOUT, is_new)
        .unwrap();
    assert!(
        before.iter().all(is_probe),
        "only late probes before it: {before:?}"
    );
    let new = b.accept(&p).unwrap().unwrap();
    assert_eq!((new.topic.as_deref(), new.qos), (Some("rsp/new"), Qos::One));
    b.assert_no_reply().unwrap();
}
