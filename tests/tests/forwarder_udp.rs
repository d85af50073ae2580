//! A UDP forwarder (MQTT-SN 5.5) carrying 50 wireless nodes through the real gateway, with a
//! real mosquitto and paho-mqtt publishing the downlink.
//!
//! The forwarder sends from 127.0.0.2, the only `[mqttsn] forwarders` entry (an address without
//! a port, so it may restart on any port); direct clients and the spoofer send from 127.0.0.1
//! and 127.0.0.3. Every node CONNECTs, publishes QoS 1 (checked at the broker), subscribes
//! and receives its own downlink only; the forwarder restarts on a new port and its nodes go
//! on without reconnecting; a node id encapsulated from an address not in the list is refused
//! (counted, unanswered) and the real node's session is untouched.
//!
//! A second test runs an IPv6 forwarder whose entry names its port, on a dual-stack gateway:
//! another port of the same address is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Result, bail};
use sensorgate_tests::forwarder::Forwarder;
use sensorgate_tests::http::metric;
use sensorgate_tests::sn::{self, Qos};
use sensorgate_tests::{
    DELIVERY_TIMEOUT, PROBE_PREFIX, REPLY_TIMEOUT, Rig, SnClient, Subscriber, UpMsg, free_udp_port,
    publish_upstream,
};

const NODES: usize = 50;
const FORWARDER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const SPOOFER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Two-octet Wireless Node Ids: 10 00, 10 01, ...
fn node(i: usize) -> Vec<u8> {
    vec![0x10, i as u8]
}

fn client_id(i: usize) -> String {
    format!("fwd-node-{i}")
}

fn up_topic(i: usize) -> String {
    format!("fwd/up/{i}")
}

fn down_topic(i: usize) -> String {
    format!("fwd/down/{i}")
}

/// Every node publishes `up-{i}-{round}` at QoS 1 (pipelined) and gets PUBACK rc 0; the
/// broker's subscriber sees each on its node's topic.
fn publish_round(fwd: &mut Forwarder, topic_ids: &[u16], sub: &mut Subscriber, round: u32) {
    let msg_ids: Vec<u16> = (0..NODES)
        .map(|i| {
            fwd.send_publish_qos1(&node(i), topic_ids[i], format!("up-{i}-{round}").as_bytes())
                .unwrap()
        })
        .collect();
    for (i, msg_id) in msg_ids.into_iter().enumerate() {
        let rc = fwd.puback(&node(i), msg_id, REPLY_TIMEOUT).unwrap();
        assert_eq!(rc, sn::RC_ACCEPTED, "round {round}: node {i} PUBACK rc");
    }
    let got: BTreeSet<(String, String)> = sub
        .collect(NODES, DELIVERY_TIMEOUT)
        .unwrap()
        .into_iter()
        .map(|m| (m.topic, String::from_utf8_lossy(&m.payload).into_owned()))
        .collect();
    let want: BTreeSet<(String, String)> = (0..NODES)
        .map(|i| (up_topic(i), format!("up-{i}-{round}")))
        .collect();
    assert_eq!(got, want, "round {round} at the broker");
}

/// Waits until the gateway's upstream subscription for `topic` (node `i`'s) is live: probes
/// published by paho until the node receives one.
fn await_live(fwd: &mut Forwarder, i: usize, broker_port: u16) -> Result<()> {
    for round in 0..20 {
        let probe = format!("{PROBE_PREFIX}{round}");
        publish_upstream(broker_port, &[UpMsg::new(&down_topic(i), &probe, 1)])?;
        match fwd.downlink(&node(i), Duration::from_secs(3)) {
            Ok((_, data)) if data.starts_with(PROBE_PREFIX.as_bytes()) => return Ok(()),
            Ok(other) => bail!("node {i}: waiting for a probe, got {other:?}"),
            Err(_) => continue,
        }
    }
    bail!("the subscription of node {i} never went live")
}

/// paho publishes `{tag}-{i}` to every node's topic and `{tag}-direct` to the direct
/// client's; each node gets exactly its own message on its subscribed topic id, and no other
/// (a late probe aside).
fn downlink_round(
    fwd: &mut Forwarder,
    sub_ids: &[u16],
    direct: &mut SnClient,
    broker_port: u16,
    tag: &str,
) {
    let mut msgs: Vec<UpMsg> = (0..NODES)
        .map(|i| UpMsg::new(&down_topic(i), format!("{tag}-{i}"), 1))
        .collect();
    msgs.push(UpMsg::new("fwd/down/direct", format!("{tag}-direct"), 1));
    publish_upstream(broker_port, &msgs).unwrap();
    for (i, &sub_id) in sub_ids.iter().enumerate() {
        let want = format!("{tag}-{i}");
        loop {
            let (topic_id, data) = fwd.downlink(&node(i), DELIVERY_TIMEOUT).unwrap();
            if data.starts_with(PROBE_PREFIX.as_bytes()) {
                continue;
            }
            assert_eq!(
                (topic_id, String::from_utf8_lossy(&data).into_owned()),
                (sub_id, want),
                "node {i}: {tag}"
            );
            break;
        }
    }
    let got = direct.downlink(1, DELIVERY_TIMEOUT).unwrap();
    assert_eq!(got[0].text(), format!("{tag}-direct"));
    // Nothing else for anyone: each message was queued for its own node only.
    for (n, packets) in fwd.drain(Duration::from_millis(500)).unwrap() {
        for p in packets {
            if let sn::Packet::Publish { data, .. } = &p {
                assert!(
                    data.starts_with(PROBE_PREFIX.as_bytes()),
                    "node {n:02x?} got another message: {p:?}"
                );
            }
        }
    }
}

fn refused_not_allowed(rig: &Rig) -> f64 {
    let (status, text) = rig.gateway.admin_get("/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    metric(
        &text,
        "sensorgate_refusals_total",
        &[("protocol", "mqtt-sn"), ("reason", "forwarder_not_allowed")],
    )
    .unwrap_or(0.0)
}

#[test]
fn fifty_nodes_behind_a_udp_forwarder_are_served_apart_and_survive_its_restart() {
    let rig = Rig::start_with(|c| {
        c.mqttsn(&format!("forwarders = [\"{FORWARDER_IP}\"]"));
        c.with_admin()?;
        Ok(())
    })
    .unwrap();
    let gw = rig.gateway.sn_addr();
    let broker_port = rig.broker.port();
    let mut sub = rig.subscribe(&["fwd/up/#"]).unwrap();
    let mut fwd = Forwarder::bind(gw, IpAddr::V4(FORWARDER_IP)).unwrap();

    // Every node connects, registers its uplink topic and subscribes to its downlink topic,
    // pipelined: the answers come back mixed and are sorted by node id.
    for i in 0..NODES {
        fwd.send(
            &node(i),
            &sn::connect(sn::FLAG_CLEAN, 60, client_id(i).as_bytes()),
        )
        .unwrap();
    }
    for i in 0..NODES {
        assert_eq!(
            fwd.connack(&node(i), REPLY_TIMEOUT).unwrap(),
            sn::RC_ACCEPTED,
            "node {i}"
        );
    }
    let reg: Vec<u16> = (0..NODES)
        .map(|i| fwd.send_register(&node(i), &up_topic(i)).unwrap())
        .collect();
    let topic_ids: Vec<u16> = (0..NODES)
        .map(|i| fwd.regack(&node(i), reg[i], REPLY_TIMEOUT).unwrap())
        .collect();
    let subs: Vec<u16> = (0..NODES)
        .map(|i| {
            fwd.send_subscribe(&node(i), &down_topic(i), Qos::One)
                .unwrap()
        })
        .collect();
    let sub_ids: Vec<u16> = (0..NODES)
        .map(|i| fwd.suback(&node(i), subs[i], REPLY_TIMEOUT).unwrap())
        .collect();
    // A direct client beside them, from 127.0.0.1.
    let mut direct = rig.connected("fwd-direct").unwrap();
    direct
        .subscribe_ok(Qos::One, sn::SubTopic::Name("fwd/down/direct"))
        .unwrap();

    publish_round(&mut fwd, &topic_ids, &mut sub, 0);
    // Subscriptions go upstream in order: the last one live means all are.
    await_live(&mut fwd, NODES - 1, broker_port).unwrap();
    downlink_round(&mut fwd, &sub_ids, &mut direct, broker_port, "down");

    // The admin listener shows each node at the forwarder's entry with its node id.
    let (status, page) = rig
        .gateway
        .admin_get("/clients?prefix=fwd-node-7&limit=1")
        .unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("forwarder:0 node 1007"), "{page}");

    // The forwarder restarts on another port: its nodes go on without reconnecting.
    let before = fwd.local_addr().unwrap();
    fwd.restart().unwrap();
    assert_ne!(fwd.local_addr().unwrap().port(), before.port());
    publish_round(&mut fwd, &topic_ids, &mut sub, 1);
    downlink_round(
        &mut fwd,
        &sub_ids,
        &mut direct,
        broker_port,
        "after-restart",
    );

    // Node 0's id from addresses not in the list: a CONNECT to take over its ClientId, a
    // DISCONNECT and a PUBLISH in its name. None is answered, each is counted.
    let refused = refused_not_allowed(&rig);
    let spoofer = SnClient::bind(gw, IpAddr::V4(SPOOFER_IP)).unwrap();
    let flags = sn::flags(Qos::Zero, false, sn::TopicType::Normal);
    for from in [&spoofer, &direct] {
        from.send(&sn::encapsulate(
            0,
            &node(0),
            &sn::connect(sn::FLAG_CLEAN, 60, client_id(0).as_bytes()),
        ))
        .unwrap();
        from.send(&sn::encapsulate(0, &node(0), &sn::disconnect()))
            .unwrap();
        from.send(&sn::encapsulate(
            0,
            &node(0),
            &sn::publish(flags, topic_ids[0], 0, b"forged"),
        ))
        .unwrap();
        // No CONNACK (nor anything else) before the probe's GWINFO.
        from.assert_no_reply().unwrap();
    }
    assert_eq!(refused_not_allowed(&rig), refused + 6.0);

    // The real node 0 is still connected under its own session: it pings and publishes.
    fwd.ping(&node(0), REPLY_TIMEOUT).unwrap();
    let msg_id = fwd
        .send_publish_qos1(&node(0), topic_ids[0], b"real")
        .unwrap();
    assert_eq!(
        fwd.puback(&node(0), msg_id, REPLY_TIMEOUT).unwrap(),
        sn::RC_ACCEPTED
    );
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("fwd/up/0", &b"real"[..])
    );
    // The direct client kept its session too.
    direct.ping().unwrap();

    let mut rig = rig;
    assert!(
        rig.gateway.is_running(),
        "gateway died:\n{}",
        rig.gateway.log()
    );
}

/// A UDP port free on both 127.0.0.1 and ::1 a moment ago.
fn dual_stack_port() -> u16 {
    for _ in 0..50 {
        let port = free_udp_port(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        if UdpSocket::bind((Ipv6Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no UDP port free on both 127.0.0.1 and ::1")
}

#[test]
fn an_ipv6_forwarder_entry_with_a_port_admits_that_port_only() {
    let port = dual_stack_port();
    let gw4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let gw6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    // Bound first: its port goes into the entry (any port but the gateway's).
    let mut fwd = loop {
        let fwd = Forwarder::bind(gw6, IpAddr::V6(Ipv6Addr::LOCALHOST)).unwrap();
        if fwd.local_addr().unwrap().port() != port {
            break fwd;
        }
    };
    let entry = fwd.local_addr().unwrap();
    let rig = Rig::start_with(|c| {
        c.listen = vec![gw4, gw6];
        c.mqttsn(&format!("forwarders = [\"{entry}\"]"));
        c.with_admin()?;
        Ok(())
    })
    .unwrap();
    let mut sub = rig.subscribe(&["fwd6/#"]).unwrap();
    let node = [0xAA, 0xBB, 0xCC];
    assert_eq!(
        fwd.connect(&node, "fwd6-node", REPLY_TIMEOUT).unwrap(),
        sn::RC_ACCEPTED
    );
    let reg = fwd.send_register(&node, "fwd6/t").unwrap();
    let topic_id = fwd.regack(&node, reg, REPLY_TIMEOUT).unwrap();
    let msg_id = fwd.send_publish_qos1(&node, topic_id, b"v6").unwrap();
    assert_eq!(
        fwd.puback(&node, msg_id, REPLY_TIMEOUT).unwrap(),
        sn::RC_ACCEPTED
    );
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("fwd6/t", &b"v6"[..])
    );

    // The same address from another port is not the entry: refused, unanswered, counted.
    let refused = refused_not_allowed(&rig);
    let other_port = SnClient::bind(gw6, IpAddr::V6(Ipv6Addr::LOCALHOST)).unwrap();
    other_port
        .send(&sn::encapsulate(
            0,
            &node,
            &sn::connect(sn::FLAG_CLEAN, 60, b"fwd6-node"),
        ))
        .unwrap();
    other_port.assert_no_reply().unwrap();
    assert_eq!(refused_not_allowed(&rig), refused + 1.0);
    fwd.ping(&node, REPLY_TIMEOUT).unwrap();

    let mut rig = rig;
    assert!(
        rig.gateway.is_running(),
        "gateway died:\n{}",
        rig.gateway.log()
    );
}
