//! Serial smoke test: a sensor on the far end of a pty pair (`tests/py/serial_peer.py`,
//! length framing) does CONNECT, REGISTER and PUBLISH at QoS 1; the messages reach mosquitto,
//! and the line shows in /status (as a listener, with its counters) and /metrics. The full
//! serial suite (both framings, forwarders, outages) is `serial_*.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use serde_json::json;

use sensorgate_tests::serial::{PtyPair, SerialPeer, add_line, rc, wait_line_up};
use sensorgate_tests::{Gateway, GatewayConfig, Mosquitto, Subscriber, poll_until};

#[test]
fn a_serial_sensor_publishes_at_qos1_through_to_the_broker() {
    let broker = Mosquitto::start().unwrap();
    let mut sub = Subscriber::start(broker.port(), &["sensors/serial/#"]).unwrap();
    let pty = PtyPair::start().unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    add_line(&mut cfg, &pty.gw(), "length", "");
    cfg.with_admin().unwrap();
    let gw = Gateway::start(&cfg).unwrap();
    wait_line_up(&gw, 0, 1).unwrap();

    let mut peer = SerialPeer::start(&pty.sensor(), &["--framing", "length"]).unwrap();
    let topic = "sensors/serial/smoke";
    let r = peer
        .step(json!({"op": "connect", "client_id": "smoke", "keep_alive": 60}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    let r = peer
        .step(json!({"op": "register", "topic": topic}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    for k in 0..3 {
        let r = peer
            .step(json!({"op": "publish", "topic": topic, "qos": 1, "payload": format!("t{k}")}))
            .unwrap();
        assert_eq!(rc(&r), 0, "{r}\ngateway log:\n{}", gw.log());
    }
    peer.step(json!({"op": "disconnect"})).unwrap();
    let got = sub.collect(3, Duration::from_secs(20)).unwrap();
    let got: Vec<(&str, &[u8], u8)> = got
        .iter()
        .map(|m| (m.topic.as_str(), &m.payload[..], m.qos))
        .collect();
    assert_eq!(
        got,
        [
            ("sensors/serial/smoke", &b"t0"[..], 1),
            ("sensors/serial/smoke", &b"t1"[..], 1),
            ("sensors/serial/smoke", &b"t2"[..], 1),
        ]
    );

    // The line is listed (as a listener and with its counters) and measured. The last
    // frame out is counted once written, which the sensor may see first: waited for.
    let (body, doc) = poll_until(
        "the line's counters in /status",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            let (code, body) = gw.admin_get("/status")?;
            let doc: serde_json::Value = serde_json::from_str(&body)?;
            Ok((code == 200 && doc["serial"][0]["frames_out"] == 6).then_some((body, doc)))
        },
    )
    .unwrap();
    let device = pty.gw().display().to_string();
    assert!(
        doc["listeners"].as_array().unwrap().iter().any(|l| {
            l["transport"] == "serial" && l["protocol"] == "mqtt-sn" && l["address"] == device
        }),
        "{body}"
    );
    let line = &doc["serial"][0];
    assert_eq!(
        (&line["line"], &line["device"], &line["up"]),
        (&0.into(), &device.clone().into(), &true.into())
    );
    // CONNECT, REGISTER, 3 PUBLISH, DISCONNECT in; CONNACK, REGACK, 3 PUBACK, DISCONNECT out.
    assert_eq!(
        (&line["frames_in"], &line["frames_out"]),
        (&6.into(), &6.into()),
        "{body}"
    );
    let (code, metrics) = gw.admin_get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains(&format!(
            "sensorgate_serial_up{{line=\"0\",device=\"{device}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("sensorgate_serial_frames_total{line=\"0\",event=\"in\"} 6"),
        "{metrics}"
    );
}
