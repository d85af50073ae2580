//! Store-and-forward through a broker outage over a serial line, as for UDP: QoS 1 publishes
//! acknowledged over the line while mosquitto is down reach it once it is back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use sensorgate_tests::serial::{PtyPair, SerialPeer, add_line, rc, wait_line_up};
use sensorgate_tests::{Gateway, GatewayConfig, Mosquitto, Subscriber};

#[test]
fn qos1_acknowledged_over_serial_during_a_broker_outage_arrives_after_it() {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let mut sub =
        Subscriber::start_session(broker.port(), &["outage/#"], "serial-outage-observer").unwrap();
    let pty = PtyPair::start().unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    add_line(&mut cfg, &pty.gw(), "length", "");
    let gw = Gateway::start(&cfg).unwrap();
    wait_line_up(&gw, 0, 1).unwrap();

    let mut peer = SerialPeer::start(&pty.sensor(), &["--framing", "length"]).unwrap();
    let r = peer
        .step(json!({"op": "connect", "client_id": "spooler", "keep_alive": 60}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");
    peer.step(json!({"op": "register", "topic": "outage/serial"}))
        .unwrap();
    let r = peer
        .step(json!({"op": "publish", "topic": "outage/serial", "qos": 1, "payload": "before"}))
        .unwrap();
    assert_eq!(rc(&r), 0, "{r}");

    broker.stop().unwrap();
    for i in 0..10 {
        let payload = format!("during-{i}");
        let r = peer
            .step(json!({"op": "publish", "topic": "outage/serial", "qos": 1, "payload": payload}))
            .unwrap();
        // Spooled: accepted although the broker is gone.
        assert_eq!(rc(&r), 0, "{payload}: {r}");
    }
    peer.step(json!({"op": "ping"})).unwrap();
    broker.restart().unwrap();

    let want: BTreeSet<String> = std::iter::once("before".to_owned())
        .chain((0..10).map(|i| format!("during-{i}")))
        .collect();
    let mut got = BTreeSet::new();
    // At least once: duplicates may come; every acknowledged payload must.
    for _ in 0..100 {
        if got.is_superset(&want) {
            break;
        }
        match sub.next(Duration::from_secs(60)).unwrap() {
            Some(m) => {
                got.insert(String::from_utf8_lossy(&m.payload).into_owned());
            }
            None => break,
        }
    }
    assert!(
        got.is_superset(&want),
        "missing {:?}",
        want.difference(&got).collect::<Vec<_>>()
    );
}
