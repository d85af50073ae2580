//! QoS 0 through the spool, end to end: a sensor sends a burst of QoS 0 messages several times
//! larger than the upstream's `max_inflight` and then falls silent; every message must still
//! reach the broker. Nothing acknowledges a QoS 0 message, so no later event would wake a
//! drain that stopped at a full window: the messages would sit in the spool until more traffic
//! came (issue 11, part 2).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::sn::{Qos, TopicType};
use sensorgate_tests::{Rig, Subscriber};

/// The upstream's window: small, so that a cheap burst is many windows long.
const MAX_INFLIGHT: usize = 8;
/// Messages the sensor sends.
const MESSAGES: usize = 3000;
/// Messages sent between two PINGREQs.
const BURST: usize = 50;
/// A generous bound for all of them to arrive once sent; a drain that stalls never finishes.
const ARRIVAL_BOUND: Duration = Duration::from_secs(60);

#[test]
fn a_qos0_burst_beyond_the_window_reaches_the_broker_after_the_sensor_stops() {
    let rig = Rig::start_with(|cfg| {
        // `extra_sections` follows the `[[upstream]]` lines, so this key belongs to it.
        cfg.extra_sections
            .push_str(&format!("max_inflight = {MAX_INFLIGHT}\n"));
        Ok(())
    })
    .unwrap();
    // QoS 1 subscription: delivery follows the broker's order (QoS 0 messages arrive as QoS 0).
    let mut sub = Subscriber::start_full(rig.broker.port(), &["qos0drain/#"], "5", 1).unwrap();
    let mut c = rig.connected("qos0-burst").unwrap();
    let id = c.register("qos0drain/burst").unwrap();
    for start in (0..MESSAGES).step_by(BURST) {
        for i in start..(start + BURST).min(MESSAGES) {
            c.publish(
                Qos::Zero,
                TopicType::Normal,
                id,
                false,
                format!("{i:06}").as_bytes(),
            )
            .unwrap();
        }
        // The gateway answers a PINGREQ after it handled every datagram before it: the
        // sensor's messages never pile up in the socket buffer, so none is lost on the way in
        // (QoS 0 over UDP has no retry), and the gateway took all of them.
        c.ping().unwrap();
    }
    // The sensor is silent from here on.

    let got = sub
        .collect(MESSAGES, ARRIVAL_BOUND)
        .unwrap_or_else(|e| panic!("{e}\ngateway log tail:\n{}", tail(&rig.gateway.log())));
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.topic, "qos0drain/burst");
        assert_eq!(m.qos, 0);
        assert_eq!(
            String::from_utf8_lossy(&m.payload),
            format!("{i:06}"),
            "message {i} out of order or altered"
        );
    }
}

/// The last lines of a log, for a failure message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
