//! A serial device that disappears (the pty pair's socat killed, as a USB adapter unplugged)
//! and comes back under the same name: the gateway reopens it and the sensor reconnects; the
//! sensor's Will is published because it stayed away longer than its keep-alive.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use serde_json::json;

use sensorgate_tests::serial::{PtyPair, SerialPeer, add_line, rc, wait_line_up};
use sensorgate_tests::{DELIVERY_TIMEOUT, Rig};

/// Generous: the gateway loses the sensor some keep-alive periods after the line went away.
const WILL_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn the_pty_vanishes_and_returns_the_line_is_reopened_and_the_will_published() {
    let mut pty = PtyPair::start().unwrap();
    let rig = Rig::start_with(|cfg| {
        add_line(cfg, &pty.gw(), "slip", "crc = \"crc16\"");
        Ok(())
    })
    .unwrap();
    wait_line_up(&rig.gateway, 0, 1).unwrap();
    let mut wills = rig.subscribe(&["will/#"]).unwrap();
    let mut data = rig.subscribe(&["back/#"]).unwrap();
    let args = ["--framing", "slip", "--crc", "crc16"];
    let mut peer = SerialPeer::start(&pty.sensor(), &args).unwrap();
    let will = json!({"topic": "will/sensor", "msg": "sensor gone", "qos": 1});
    let r = peer
        .step(json!({"op": "connect", "client_id": "unplugged", "keep_alive": 2, "will": will}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    peer.step(json!({"op": "ping"})).unwrap();

    pty.vanish().unwrap();
    peer.step(json!({"op": "close"})).unwrap();
    let m = wills.next(WILL_TIMEOUT).unwrap().expect("the Will");
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("will/sensor", &b"sensor gone"[..])
    );

    pty.reappear().unwrap();
    wait_line_up(&rig.gateway, 0, 2).unwrap();
    peer.step(json!({"op": "reopen", "timeout": 10})).unwrap();
    let r = peer
        .step(json!({"op": "connect", "client_id": "unplugged", "keep_alive": 60}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    let r = peer
        .step(json!({"op": "register", "topic": "back/t"}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    let r = peer
        .step(json!({"op": "publish", "topic": "back/t", "qos": 1, "payload": "I am back"}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    let m = data
        .next(DELIVERY_TIMEOUT)
        .unwrap()
        .expect("the publish after the reopen");
    assert_eq!(&m.payload[..], b"I am back");
}
