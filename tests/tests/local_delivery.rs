//! Local delivery end to end: a message one sensor publishes reaches the gateway's other
//! sensors subscribed to it exactly once, with an MQTT 5 upstream (No Local: the broker sends
//! no echo) and an MQTT 3.1.1 upstream (the broker echoes, the gateway drops the echo), while
//! the broker runs and while it is stopped (then the spool drains later, and its echo must not
//! deliver a second copy either).
//!
//! Two subscribers with overlapping filters (`site/+/switch` and `site/1/switch`), so the
//! upstream holds two subscriptions matching the published topic.
//!
//! "Exactly once" needs a negative check. While the broker runs, a QoS 0 barrier published by
//! an independent client after the broker routed the sensor's messages (seen by an observer)
//! reaches the gateway behind any echo of them (mosquitto queues messages to one connection in
//! order), so a duplicate would arrive before the barrier. While the broker is stopped there is
//! no such barrier: the test then watches for [`QUIET`] after the last expected message. That
//! wait is bounded on purpose: a duplicate from local delivery would be sent in the same
//! gateway round as the original (microseconds on loopback), so [`QUIET`] is generous; it can
//! only make the test pass late, never fail it wrongly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use sensorgate_tests::sn::{Packet, Qos, SubTopic, TopicType};
use sensorgate_tests::{
    DELIVERY_TIMEOUT, Delivery, Rig, SnClient, Subscriber, UpMsg, await_live, is_probe,
    publish_upstream,
};

/// How long a subscriber is watched for a duplicate after its last expected message, where no
/// barrier through the broker is possible (see the module docs).
const QUIET: Duration = Duration::from_secs(2);

/// The topic the switch publishes to.
const TOPIC: &str = "site/1/switch";

/// What each subscriber must get, once each, in this order (QoS 0 is delivered on receipt,
/// QoS 1/2 once durable, each after the previous was acknowledged to the switch).
const PAYLOADS: [&[u8]; 3] = [b"q0", b"q1", b"q2"];

/// The gateway's sensors: a publisher and two subscribers with overlapping filters.
struct Site {
    rig: Rig,
    switch: SnClient,
    topic_id: u16,
    lamp: SnClient,
    panel: SnClient,
}

impl Site {
    fn start(protocol: &str) -> Site {
        let protocol = protocol.to_owned();
        let rig = Rig::start_with(move |c| {
            c.protocol = protocol;
            Ok(())
        })
        .unwrap();
        let port = rig.broker.port();
        let mut lamp = rig.connected("lamp").unwrap();
        lamp.subscribe_ok(Qos::Two, SubTopic::Name("site/+/switch"))
            .unwrap();
        await_live(&mut lamp, port, TOPIC).unwrap();
        let mut panel = rig.connected("panel").unwrap();
        panel.subscribe_ok(Qos::Two, SubTopic::Name(TOPIC)).unwrap();
        await_live(&mut panel, port, TOPIC).unwrap();
        let mut switch = rig.connected("switch").unwrap();
        let topic_id = switch.register(TOPIC).unwrap();
        Site {
            rig,
            switch,
            topic_id,
            lamp,
            panel,
        }
    }

    /// The switch publishes [`PAYLOADS`] at QoS 0, 1 and 2 (the latter two acknowledged).
    fn publish_all(&mut self, tag: &str) {
        let id = self.topic_id;
        let [q0, q1, q2] = PAYLOADS.map(|p| [tag.as_bytes(), p].concat());
        self.switch
            .publish(Qos::Zero, TopicType::Normal, id, false, &q0)
            .unwrap();
        self.switch
            .publish_qos1_ok(TopicType::Normal, id, &q1)
            .unwrap();
        self.switch
            .publish_qos2_ok(TopicType::Normal, id, false, &q2)
            .unwrap();
    }
}

/// Everything `c` receives within `window` (answered as a client does), probes left out.
fn receive_for(c: &mut SnClient, window: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    for _ in 0..10_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match c.recv(left).unwrap() {
            Some(p) => got.extend(c.accept(&p).unwrap()),
            None => break,
        }
    }
    got.retain(|d| !is_probe(d) && !d.payload.starts_with(BARRIER_PREFIX.as_bytes()));
    got
}

/// Receives until `n` non-probe messages arrived (bounded by [`DELIVERY_TIMEOUT`]).
fn receive_n(c: &mut SnClient, n: usize) -> Vec<Delivery> {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    let mut got = Vec::new();
    for _ in 0..10_000 {
        if got.len() >= n {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "only {got:?} of {n} within the bound");
        let p = c.recv(left).unwrap();
        let Some(p) = p else {
            panic!("only {got:?} of {n} within {DELIVERY_TIMEOUT:?}");
        };
        got.extend(
            c.accept(&p)
                .unwrap()
                .filter(|d| !is_probe(d) && !d.payload.starts_with(BARRIER_PREFIX.as_bytes())),
        );
    }
    got
}

/// Payload prefix of the barriers of [`receive_until_barrier`].
const BARRIER_PREFIX: &str = "barrier-";

/// Everything `c` receives until a QoS 0 barrier an independent client publishes now on
/// `topic` arrives (it follows any echo already queued toward the gateway); probes and
/// barriers (also those for the other subscriber) left out.
fn receive_until_barrier(
    c: &mut SnClient,
    broker_port: u16,
    topic: &str,
    name: &str,
) -> Vec<Delivery> {
    let barrier = format!("{BARRIER_PREFIX}{name}");
    publish_upstream(broker_port, &[UpMsg::new(topic, &barrier, 0)]).unwrap();
    let (mut got, last) = c
        .downlink_until(
            "barrier",
            DELIVERY_TIMEOUT,
            |p| matches!(p, Packet::Publish { data, .. } if *data == barrier.as_bytes()),
        )
        .unwrap();
    assert!(matches!(last, Packet::Publish { .. }));
    got.retain(|d| !is_probe(d) && !d.payload.starts_with(BARRIER_PREFIX.as_bytes()));
    got
}

/// The payloads of `got`, and their QoS levels.
fn payloads_and_qos(got: &[Delivery]) -> Vec<(String, Qos)> {
    got.iter().map(|d| (d.text(), d.qos)).collect()
}

fn expected(tag: &str) -> Vec<(String, Qos)> {
    PAYLOADS
        .iter()
        .zip([Qos::Zero, Qos::One, Qos::Two])
        .map(|(p, q)| (format!("{tag}{}", String::from_utf8_lossy(p)), q))
        .collect()
}

/// Waits until `observer` saw every message of `tag` (they reached the broker).
fn broker_has(observer: &mut Subscriber, tag: &str) {
    let mut seen = Vec::new();
    for _ in 0..100 {
        let m = observer.expect().unwrap();
        if m.payload.starts_with(tag.as_bytes()) {
            seen.push(m.payload);
        }
        if seen.len() == PAYLOADS.len() {
            return;
        }
    }
    panic!("the broker never had all of {tag}: {seen:?}");
}

fn broker_up(protocol: &str) {
    let mut site = Site::start(protocol);
    let port = site.rig.broker.port();
    let mut observer = site.rig.subscribe(&["site/1/#"]).unwrap();
    site.publish_all("up-");
    // Uplink still works, and the broker has routed them: any echo is on its way now.
    broker_has(&mut observer, "up-");
    for (name, c) in [("lamp", &mut site.lamp), ("panel", &mut site.panel)] {
        let mut got = receive_n(c, PAYLOADS.len());
        got.extend(receive_until_barrier(c, port, TOPIC, name));
        assert_eq!(payloads_and_qos(&got), expected("up-"), "{name}");
    }
}

fn broker_stopped(protocol: &str) {
    let mut site = Site::start(protocol);
    // Stopped by PID (SIGTERM, SIGKILL after a bound); the gateway keeps its sensors working.
    site.rig.broker.stop().unwrap();
    site.publish_all("down-");
    for (name, c) in [("lamp", &mut site.lamp), ("panel", &mut site.panel)] {
        let mut got = receive_n(c, PAYLOADS.len());
        got.extend(receive_for(c, QUIET));
        assert_eq!(
            payloads_and_qos(&got),
            expected("down-"),
            "{name} during the outage"
        );
    }
    // The broker comes back and the spool drains the three messages to it (in order, then a
    // later one of the same sender): their echo (MQTT 3.1.1) must not deliver them again.
    site.rig.broker.restart().unwrap();
    let port = site.rig.broker.port();
    await_live(&mut site.lamp, port, TOPIC).unwrap();
    let mut observer = site.rig.subscribe(&["site/1/#"]).unwrap();
    let id = site.topic_id;
    site.switch
        .publish_qos1_ok(TopicType::Normal, id, b"after-q1")
        .unwrap();
    for _ in 0..100 {
        if observer.expect().unwrap().payload == b"after-q1" {
            break;
        }
    }
    for (name, c) in [("lamp", &mut site.lamp), ("panel", &mut site.panel)] {
        let got = receive_until_barrier(c, port, TOPIC, name);
        assert_eq!(
            payloads_and_qos(&got),
            vec![("after-q1".to_owned(), Qos::One)],
            "{name}: after the outage, only the new message, once"
        );
    }
}

#[test]
fn sensors_get_each_others_messages_once_with_mqtt5() {
    broker_up("5");
}

#[test]
fn sensors_get_each_others_messages_once_with_mqtt311() {
    broker_up("3.1.1");
}

#[test]
fn sensors_get_each_others_messages_once_through_an_outage_with_mqtt5() {
    broker_stopped("5");
}

#[test]
fn sensors_get_each_others_messages_once_through_an_outage_with_mqtt311() {
    broker_stopped("3.1.1");
}

/// A retained message one sensor publishes while another holds the filter: the holder gets it
/// live once (retain flag as published), and a sensor subscribing later gets it once from the
/// gateway's retained cache (the filter is held upstream already, so the broker does not send
/// it again), which local delivery keeps current.
fn retained_reaches_later_subscribers_once(protocol: &str) {
    const STATE: &str = "site/2/state";
    let mut site = Site::start(protocol);
    let port = site.rig.broker.port();
    let mut first = site.rig.connected("first").unwrap();
    first.subscribe_ok(Qos::One, SubTopic::Name(STATE)).unwrap();
    await_live(&mut first, port, STATE).unwrap();
    let id = site.switch.register(STATE).unwrap();
    let rc = site
        .switch
        .publish_qos1(TopicType::Normal, id, true, b"on")
        .unwrap();
    assert_eq!(rc, 0);
    let got = receive_n(&mut first, 1);
    assert_eq!((got[0].text().as_str(), got[0].retain), ("on", true));
    let mut second = site.rig.connected("second").unwrap();
    second
        .subscribe_ok(Qos::One, SubTopic::Name(STATE))
        .unwrap();
    let got = receive_n(&mut second, 1);
    assert_eq!((got[0].text().as_str(), got[0].retain), ("on", true));
    for (name, c) in [("first", &mut first), ("second", &mut second)] {
        let more = receive_until_barrier(c, port, STATE, name);
        assert!(more.is_empty(), "{name} got more: {more:?}");
    }
}

#[test]
fn a_retained_message_reaches_later_subscribers_once_with_mqtt5() {
    retained_reaches_later_subscribers_once("5");
}

#[test]
fn a_retained_message_reaches_later_subscribers_once_with_mqtt311() {
    retained_reaches_later_subscribers_once("3.1.1");
}
