//! A radio modem in transparent mode on a serial line (`forwarder = true`): 50 nodes behind it,
//! each in the 0xFE encapsulation with its own Wireless Node Id, each its own session,
//! publishing and receiving its own downlink. Encapsulated frames on a line that is not a
//! forwarder's are dropped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use serde_json::json;

use sensorgate_tests::serial::{
    PtyPair, SerialPeer, add_line, await_counter, await_downlink, payloads, rc, wait_line_up,
};
use sensorgate_tests::{DELIVERY_TIMEOUT, PROBE_PREFIX, Rig, UpMsg, publish_upstream};

const NODES: usize = 50;

fn node_id(i: usize) -> String {
    // Two octets, one of them 0xC0 (SLIP's END) for some nodes: escaped on the line.
    format!("{:02x}{:02x}", 0xC0 - (i % 2) * 0x40, i)
}

#[test]
fn a_forwarder_line_carries_50_nodes_each_with_its_own_session() {
    let pty = PtyPair::start().unwrap();
    let rig = Rig::start_with(|cfg| {
        // Room for the whole downlink burst (one message per node at once); the default
        // write_queue (32) would drop some and leave them to the QoS 1 retry.
        add_line(
            cfg,
            &pty.gw(),
            "slip",
            "crc = \"crc16\"\nforwarder = true\nwrite_queue = 128",
        );
        Ok(())
    })
    .unwrap();
    wait_line_up(&rig.gateway, 0, 1).unwrap();
    let mut sub = rig.subscribe(&["fwd/up/#"]).unwrap();
    let args = ["--framing", "slip", "--crc", "crc16", "--forwarder"];
    let mut peer = SerialPeer::start(&pty.sensor(), &args).unwrap();

    for i in 0..NODES {
        let node = node_id(i);
        let r = peer
            .step(json!({"op": "connect", "node": node, "client_id": format!("node-{i}")}))
            .unwrap();
        assert_eq!(rc(&r), 0, "node {i}: {r}");
        let topic = format!("fwd/up/{i}");
        let r = peer
            .step(json!({"op": "register", "node": node, "topic": topic}))
            .unwrap();
        assert_eq!(rc(&r), 0, "node {i}: {r}");
        let r = peer
            .step(
                json!({"op": "publish", "node": node, "topic": topic, "qos": 1,
                         "payload": format!("up-{i}")}),
            )
            .unwrap();
        assert_eq!(rc(&r), 0, "node {i}: {r}");
        let r = peer
            .step(
                json!({"op": "subscribe", "node": node, "topic": format!("fwd/down/{i}"),
                         "qos": 1}),
            )
            .unwrap();
        assert_eq!(rc(&r), 0, "node {i}: {r}");
    }
    let mut up: Vec<(String, String)> = sub
        .collect(NODES, DELIVERY_TIMEOUT)
        .unwrap()
        .into_iter()
        .map(|m| (m.topic, String::from_utf8_lossy(&m.payload).into_owned()))
        .collect();
    up.sort();
    let mut want: Vec<_> = (0..NODES)
        .map(|i| (format!("fwd/up/{i}"), format!("up-{i}")))
        .collect();
    want.sort();
    assert_eq!(up, want);

    // The gateway subscribes upstream in SUBACK order: the last node's being live means all are.
    let last = NODES - 1;
    await_downlink(
        &mut peer,
        rig.broker.port(),
        &format!("fwd/down/{last}"),
        Some(&node_id(last)),
    )
    .unwrap();
    let downlink: Vec<UpMsg> = (0..NODES)
        .map(|i| UpMsg::new(&format!("fwd/down/{i}"), format!("down-{i}"), 1))
        .collect();
    publish_upstream(rig.broker.port(), &downlink).unwrap();
    for i in 0..NODES {
        let node = node_id(i);
        let mut got = Vec::new();
        for _ in 0..5 {
            let r = peer
                .step(json!({"op": "expect_publish", "node": node}))
                .unwrap();
            got.extend(payloads(&r));
            if got.iter().any(|p| !p.starts_with(PROBE_PREFIX)) {
                break;
            }
        }
        let real: Vec<_> = got
            .iter()
            .filter(|p| !p.starts_with(PROBE_PREFIX))
            .collect();
        assert_eq!(real, [&format!("down-{i}")], "node {i}");
    }
    // Sessions apart: every downlink message went to its own node only.
    let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for event in peer.received() {
        if event["type"] == "PUBLISH" {
            let payload = event["payload"].as_str().unwrap_or_default().to_owned();
            if payload.starts_with("down-") {
                by_node
                    .entry(event["node"].as_str().unwrap_or("none").to_owned())
                    .or_default()
                    .push(payload);
            }
        }
    }
    assert_eq!(by_node.len(), NODES);
    for i in 0..NODES {
        assert_eq!(by_node[&node_id(i)], [format!("down-{i}")], "node {i}");
    }
}

#[test]
fn encapsulated_frames_on_a_line_that_is_not_a_forwarder_are_dropped_and_counted() {
    let pty = PtyPair::start().unwrap();
    let rig = Rig::start_with(|cfg| {
        cfg.with_admin()?;
        add_line(cfg, &pty.gw(), "length", "");
        Ok(())
    })
    .unwrap();
    wait_line_up(&rig.gateway, 0, 1).unwrap();
    let mut peer = SerialPeer::start(&pty.sensor(), &["--framing", "length"]).unwrap();
    // A CONNECT ("spoof", clean, keep-alive 60) from node 00 01, radius 1.
    let spoof = "05fe010001".to_owned() + "0b040401003c" + "73706f6f66";
    peer.step(json!({"op": "raw", "hex": spoof})).unwrap();
    let r = peer
        .step(json!({"op": "connect", "client_id": "plain", "keep_alive": 60}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    assert_eq!(
        await_counter(&rig.gateway, 0, "encapsulated_dropped", 1).unwrap(),
        1
    );
    // Only the plain CONNECT was answered, and nothing encapsulated came back.
    let connacks = peer
        .received()
        .iter()
        .filter(|e| e["type"] == "CONNACK")
        .count();
    assert_eq!(connacks, 1, "{:?}", peer.received());
    assert!(
        peer.received().iter().all(|e| e["event"] == "recv"),
        "{:?}",
        peer.received()
    );
}
