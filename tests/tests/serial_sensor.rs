//! One sensor on a serial line (a socat pty pair): CONNECT, REGISTER, PUBLISH at QoS 0/1/2
//! arriving at mosquitto, SUBSCRIBE and downlink published by paho-mqtt, in both framings (and
//! every SLIP trailer); mqtt-sn-tools' serial-bridge traffic (Length framing, frames back to
//! back in one write); garbage and truncated frames between valid ones (the sensor still served,
//! the line's bad-frame counters in /metrics moving).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use serde_json::json;

use sensorgate_tests::serial::{
    PtyPair, SerialPeer, add_line, await_counter, await_downlink, frames_counter, payloads, rc,
    wait_line_up,
};
use sensorgate_tests::{DELIVERY_TIMEOUT, Rig, UpMsg, publish_upstream};

/// A broker, a pty pair and a gateway serving its `ttyGW` end as line 0.
fn rig(framing: &str, extra: &str) -> (Rig, PtyPair) {
    let pty = PtyPair::start().unwrap();
    let rig = Rig::start_with(|cfg| {
        cfg.with_admin()?;
        add_line(cfg, &pty.gw(), framing, extra);
        Ok(())
    })
    .unwrap();
    wait_line_up(&rig.gateway, 0, 1).unwrap();
    (rig, pty)
}

/// The whole life of a sensor: connect, register, publish QoS 0/1/2 (checked at the broker),
/// subscribe and receive a downlink message, ping, disconnect.
fn serve(rig: &Rig, peer: &mut SerialPeer, name: &str) {
    let topic = format!("serial/{name}");
    let down = format!("down/{name}");
    let mut sub = rig.subscribe(&[&topic]).unwrap();
    let r = peer
        .step(json!({"op": "connect", "client_id": name, "keep_alive": 60}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    let r = peer
        .step(json!({"op": "register", "topic": topic}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    for qos in [0, 1, 2] {
        let r = peer
            .step(
                json!({"op": "publish", "topic": topic, "qos": qos, "payload": format!("q{qos}")}),
            )
            .unwrap();
        if qos > 0 {
            assert_eq!(rc(&r), 0, "{r}");
        }
    }
    let mut got: Vec<(String, String, u8)> = sub
        .collect(3, DELIVERY_TIMEOUT)
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                m.topic,
                String::from_utf8_lossy(&m.payload).into_owned(),
                m.qos,
            )
        })
        .collect();
    got.sort();
    let want: Vec<_> = (0..3u8)
        .map(|q| (topic.clone(), format!("q{q}"), q))
        .collect();
    assert_eq!(got, want);

    let r = peer
        .step(json!({"op": "subscribe", "topic": down, "qos": 1}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    await_downlink(peer, rig.broker.port(), &down, None).unwrap();
    publish_upstream(
        rig.broker.port(),
        &[UpMsg::new(&down, "hello over serial", 1)],
    )
    .unwrap();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let r = peer.step(json!({"op": "expect_publish"})).unwrap();
        seen.extend(payloads(&r));
        if seen.iter().any(|p| p == "hello over serial") {
            break;
        }
    }
    assert!(seen.iter().any(|p| p == "hello over serial"), "{seen:?}");
    peer.step(json!({"op": "ping"})).unwrap();
    peer.step(json!({"op": "disconnect"})).unwrap();
}

#[test]
fn a_sensor_over_length_framing_publishes_and_receives() {
    let (rig, pty) = rig("length", "");
    let mut peer = SerialPeer::start(&pty.sensor(), &["--framing", "length"]).unwrap();
    serve(&rig, &mut peer, "len");
}

#[test]
fn a_sensor_over_slip_with_crc16_publishes_and_receives() {
    let (rig, pty) = rig("slip", "crc = \"crc16\"");
    let mut peer =
        SerialPeer::start(&pty.sensor(), &["--framing", "slip", "--crc", "crc16"]).unwrap();
    serve(&rig, &mut peer, "slip16");
}

#[test]
fn a_sensor_over_slip_with_crc32_publishes_and_receives() {
    let (rig, pty) = rig("slip", "crc = \"crc32\"");
    let mut peer =
        SerialPeer::start(&pty.sensor(), &["--framing", "slip", "--crc", "crc32"]).unwrap();
    serve(&rig, &mut peer, "slip32");
}

#[test]
fn a_sensor_over_slip_without_crc_publishes_and_receives() {
    let (rig, pty) = rig("slip", "crc = \"none\"");
    let mut peer =
        SerialPeer::start(&pty.sensor(), &["--framing", "slip", "--crc", "none"]).unwrap();
    serve(&rig, &mut peer, "slipnone");
}

/// mqtt-sn-tools' `mqtt-sn-serial-bridge` writes each datagram's bytes to the port as they are:
/// Length-framed messages back to back, many in one write.
#[test]
fn serial_bridge_style_frames_back_to_back_are_accepted_as_is() {
    let (rig, pty) = rig("length", "");
    let mut sub = rig.subscribe(&["bridge/#"]).unwrap();
    let mut peer = SerialPeer::start(&pty.sensor(), &["--framing", "length"]).unwrap();
    let r = peer
        .step(json!({"op": "connect", "client_id": "bridge", "keep_alive": 60}))
        .unwrap();
    assert_eq!(rc(&r), 0);
    let r = peer
        .step(json!({"op": "register", "topic": "bridge/t"}))
        .unwrap();
    let topic_id = r["topic_id"].as_u64().unwrap();
    peer.step(json!({"op": "burst", "count": 20, "topic_id": topic_id, "payload_prefix": "b"}))
        .unwrap();
    // The gateway answered the burst's sender in turn: a ping round trip after it.
    peer.step(json!({"op": "ping"})).unwrap();
    let mut got: Vec<String> = sub
        .collect(20, DELIVERY_TIMEOUT)
        .unwrap()
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();
    want.sort();
    assert_eq!(got, want);
}

/// Line noise and a frame cut in half (then silence) before every step: the gateway drops them,
/// counts them, resynchronises and still serves the sensor.
#[test]
fn garbage_and_truncated_frames_between_valid_ones_over_length_framing() {
    let (rig, pty) = rig("length", "");
    let args = ["--framing", "length", "--garbage"];
    let mut peer = SerialPeer::start(&pty.sensor(), &args).unwrap();
    serve(&rig, &mut peer, "noisylen");
    let gw = &rig.gateway;
    assert!(await_counter(gw, 0, "truncated", 5).unwrap() >= 5);
    assert!(await_counter(gw, 0, "garbage", 1).unwrap() >= 1);
    assert!(await_counter(gw, 0, "in", 10).unwrap() >= 10);
}

#[test]
fn garbage_and_truncated_frames_between_valid_ones_over_slip_with_crc16() {
    let (rig, pty) = rig("slip", "crc = \"crc16\"");
    let args = ["--framing", "slip", "--crc", "crc16", "--garbage"];
    let mut peer = SerialPeer::start(&pty.sensor(), &args).unwrap();
    serve(&rig, &mut peer, "noisyslip");
    let gw = &rig.gateway;
    assert!(await_counter(gw, 0, "truncated", 5).unwrap() >= 5);
    // The noise ends at the next frame's leading END: a bad CRC, or too short / a bad escape.
    let bad = frames_counter(gw, 0, "bad_crc").unwrap() + frames_counter(gw, 0, "garbage").unwrap();
    assert!(bad >= 5, "bad_crc + garbage = {bad}");
}
