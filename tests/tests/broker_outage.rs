//! Upstream outages: while the broker is down QoS ≥ 1 publishes are still accepted (they are
//! spooled; `spool.rs` checks that they all arrive later); once the broker is back on the
//! same port the gateway reconnects by itself. A gateway started with no broker at all still
//! serves sensors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, Packet, Qos, TopicType};
use sensorgate_tests::{Gateway, GatewayConfig, Mosquitto, Rig, SnClient, free_tcp_port};

const NOTICE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one probe publish waits for its PUBACK before the next probe.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Publishes QoS 1 probes (fresh MsgId and payload each) until one gets PUBACK `want_rc`;
/// returns that probe's payload. Other return codes and silence are retried.
fn publish_until_rc(c: &mut SnClient, topic_id: u16, want_rc: u8, what: &str) -> Vec<u8> {
    let start = Instant::now();
    let mut seen = Vec::new();
    for attempt in 0..1_000 {
        if start.elapsed() > NOTICE_TIMEOUT {
            break;
        }
        let payload = format!("probe-{attempt}").into_bytes();
        let msg_id = c
            .publish(Qos::One, TopicType::Normal, topic_id, false, &payload)
            .unwrap();
        let deadline = Instant::now() + PROBE_WAIT;
        // PUBACKs of earlier probes may still trickle in; look for this probe's.
        while let Some(p) = c
            .recv(deadline.saturating_duration_since(Instant::now()))
            .unwrap()
        {
            match p {
                Packet::Puback { msg_id: m, rc, .. } if m == msg_id => {
                    if rc == want_rc {
                        return payload;
                    }
                    seen.push(rc);
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
                Packet::Puback { .. } => {}
                p => panic!("{what}: unexpected {p:?}"),
            }
        }
    }
    panic!("{what}: no PUBACK rc {want_rc:#04x} within {NOTICE_TIMEOUT:?}; got rcs {seen:?}");
}

#[test]
fn broker_outage_keeps_accepting_then_recovers_on_restart() {
    let mut rig = Rig::start().unwrap();
    let mut c = rig.connected("outage").unwrap();
    let id = c.register("outage/t").unwrap();
    c.publish_qos1_ok(TopicType::Normal, id, b"before").unwrap();

    rig.broker.stop().unwrap();
    // Spooled: accepted although the broker is gone; QoS 2 gets its PUBREC the same way.
    c.publish_qos1_ok(TopicType::Normal, id, b"down").unwrap();
    c.publish_qos2_ok(TopicType::Normal, id, false, b"q2-down")
        .unwrap();
    // The sensor session itself survives the outage.
    c.ping().unwrap();

    rig.broker.restart().unwrap();
    let mut sub = rig.subscribe(&["outage/#"]).unwrap();
    let ok_payload = publish_until_rc(&mut c, id, sn::RC_ACCEPTED, "broker back");
    // The accepted probe reaches the broker (earlier probes may too, if they were retried).
    let mut seen = Vec::new();
    let mut want: &[u8] = &ok_payload;
    while want != b"q2-back" {
        assert!(
            seen.len() < 100,
            "{want:?} never reached the broker; saw {seen:?}"
        );
        let m = sub.expect().unwrap();
        if m.payload == want {
            c.publish_qos2_ok(TopicType::Normal, id, false, b"q2-back")
                .unwrap();
            want = b"q2-back";
        }
        seen.push(String::from_utf8_lossy(&m.payload).into_owned());
    }

    // The counters, logged at shutdown: everything spooled was forwarded, nothing dropped.
    rig.gateway.stop().unwrap();
    let log = rig.gateway.log();
    let field = |line: &str, name: &str| -> u64 {
        let at = line
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("no {name} in {line}"));
        let rest = &line[at + name.len() + 2..];
        rest[..rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len())]
            .parse()
            .unwrap()
    };
    let spool = log
        .lines()
        .rfind(|l| l.contains("Spool status."))
        .expect("spool status logged");
    let drain = log
        .lines()
        .rfind(|l| l.contains("Upstream drain status."))
        .expect("drain status logged");
    let appended = field(spool, "appended");
    assert!(appended >= 5, "{spool}");
    assert_eq!(
        field(spool, "dropped_oldest") + field(spool, "corrupt"),
        0,
        "{spool}"
    );
    assert_eq!(field(drain, "forwarded"), appended, "{drain}");
    assert_eq!(field(drain, "rejected"), 0, "{drain}");
}

#[test]
fn gateway_without_any_broker_serves_connect_and_qos0_then_connects_later() {
    let broker_port = free_tcp_port().unwrap();
    let cfg = GatewayConfig::new(broker_port).unwrap();
    let gateway = Gateway::start(&cfg).unwrap();
    let mut c = SnClient::new(gateway.sn_addr()).unwrap();
    c.connect_ok("lonely").unwrap();
    let id = c.register("lonely/t").unwrap();
    c.publish(Qos::Zero, TopicType::Normal, id, false, b"into the void")
        .unwrap();
    c.publish(
        Qos::Zero,
        TopicType::Short,
        sn::short_id(b"ab"),
        false,
        b"void",
    )
    .unwrap();
    // QoS 0 is not answered, and the session is still there.
    c.ping().unwrap();
    let msg_id = c
        .publish(Qos::One, TopicType::Normal, id, false, b"nobody")
        .unwrap();
    let (_, rc) = c.puback(msg_id, Duration::from_secs(15)).unwrap();
    assert_eq!(
        rc,
        sn::RC_ACCEPTED,
        "QoS 1 with no broker ever reachable is spooled"
    );

    // The broker appears: the gateway connects by itself.
    let broker = Mosquitto::start_on(broker_port).unwrap();
    let mut sub = sensorgate_tests::Subscriber::start(broker.port(), &["lonely/#"]).unwrap();
    let payload = publish_until_rc(&mut c, id, sn::RC_ACCEPTED, "broker appeared");
    for _ in 0..100 {
        if sub.expect().unwrap().payload == payload {
            return;
        }
    }
    panic!("accepted message never reached the broker");
}
