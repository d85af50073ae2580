//! AMQP upstream end to end: sensors publish QoS 1 through the real binary to one MQTT
//! (mosquitto) and one AMQP (a private RabbitMQ node) upstream at once. Both get every message
//! in order; the AMQP copy is persistent, routed as `sensors.x`, with `message_id` equal to the
//! MQTT copy's `sg-seq`; a RabbitMQ outage delays its copy (the backlog arrives in order after
//! the restart) and never holds up mosquitto's. A message no queue is bound for is returned by
//! the broker, logged, and does not hold up the ones after it.
//!
//! A RabbitMQ node takes several seconds to boot: the file keeps to two tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::sn::TopicType;
use sensorgate_tests::{RabbitMq, Rig, Script};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// The `[[upstream]]` section of the AMQP upstream for `rabbit`.
fn amqp_section(rabbit: &RabbitMq) -> String {
    format!(
        "\n[[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\nurl = \"{}\"\n\
         exchange = \"amq.topic\"\nheartbeat = \"5s\"\nbackoff_initial = \"100ms\"\n\
         backoff_max = \"1s\"\n",
        rabbit.url()
    )
}

fn obs(args: &[&str]) -> Script {
    Script::python(
        "amqp_obs.py",
        &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .unwrap()
}

/// Declares the durable queue bound with `sensors.#` before anything is published.
fn declare_queue(rabbit: &RabbitMq) {
    let s = obs(&["declare", "--port", &rabbit.port().to_string()]);
    s.expect_line("READY", WAIT, |l| l == "READY").unwrap();
}

/// `n` JSON lines from an observer (before its DONE).
fn json_lines(s: &Script, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let l = s
                .expect_line(&format!("message {i} of {n}"), WAIT, |l| l.starts_with('{'))
                .unwrap();
            serde_json::from_str(&l).unwrap()
        })
        .collect()
}

fn payload(v: &Value, key: &str) -> String {
    let hex = v[key].as_str().unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    String::from_utf8(bytes).unwrap()
}

fn get_amqp(rabbit: &RabbitMq, n: usize) -> Vec<Value> {
    let count = n.to_string();
    let port = rabbit.port().to_string();
    let s = obs(&["get", "--port", &port, "--count", &count]);
    json_lines(&s, n)
}

#[test]
fn both_upstreams_get_every_message_in_order_with_the_same_sequence_id() {
    let rabbit = RabbitMq::start().unwrap();
    declare_queue(&rabbit);
    let rig = Rig::start_with(|c| {
        c.extra_sections.push_str(&amqp_section(&rabbit));
        Ok(())
    })
    .unwrap();
    let mqtt = obs(&[
        "mqtt",
        "--port",
        &rig.broker.port().to_string(),
        "--count",
        "20",
    ]);
    mqtt.expect_line("READY", WAIT, |l| l == "READY").unwrap();

    let mut c = rig.connected("amqp-both").unwrap();
    // No queue is bound for `unrouted.x`: RabbitMQ returns it; the upstream counts it as
    // refused (warn) and the drain moves on to the next.
    let unrouted = c.register("unrouted/x").unwrap();
    c.publish_qos1_ok(TopicType::Normal, unrouted, b"nobody")
        .unwrap();
    let id = c.register("sensors/x").unwrap();
    for i in 0..20 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    let from_mqtt = json_lines(&mqtt, 20);
    let from_amqp = get_amqp(&rabbit, 20);
    for (i, (m, a)) in from_mqtt.iter().zip(&from_amqp).enumerate() {
        let want = format!("m{i}");
        assert_eq!(payload(m, "payload_hex"), want, "MQTT order");
        assert_eq!(payload(a, "body_hex"), want, "AMQP order");
        assert_eq!(a["routing_key"], "sensors.x");
        assert_eq!(a["delivery_mode"], 2, "persistent");
        assert_eq!(a["headers"]["sg-topic"], "sensors/x");
        assert_eq!(a["headers"]["sg-qos"], 1);
        assert!(m["seq"].is_string(), "sg-seq present: {m}");
        assert_eq!(a["message_id"], m["seq"], "message_id == sg-seq");
    }
    let log = rig.gateway.log();
    assert!(
        log.contains("AMQP broker returned a message as unroutable"),
        "{log}"
    );
}

#[test]
fn a_rabbitmq_outage_delays_only_the_amqp_copy_and_its_backlog_arrives_in_order() {
    let mut rabbit = RabbitMq::start().unwrap();
    declare_queue(&rabbit);
    let rig = Rig::start_with(|c| {
        c.extra_sections.push_str(&amqp_section(&rabbit));
        Ok(())
    })
    .unwrap();
    let mqtt = obs(&[
        "mqtt",
        "--port",
        &rig.broker.port().to_string(),
        "--count",
        "30",
    ]);
    mqtt.expect_line("READY", WAIT, |l| l == "READY").unwrap();
    let mut c = rig.connected("amqp-outage").unwrap();
    let id = c.register("sensors/x").unwrap();
    for i in 0..10 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    let before = json_lines(&mqtt, 10);
    // Wait until the AMQP link has delivered the first ten (they sit in the durable queue).
    std::thread::sleep(Duration::from_secs(1));

    rabbit.stop().unwrap();
    for i in 10..30 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    // mosquitto keeps receiving while RabbitMQ is down.
    let during = json_lines(&mqtt, 20);
    let live: Vec<String> = before
        .iter()
        .chain(&during)
        .map(|m| payload(m, "payload_hex"))
        .collect();
    assert_eq!(live, (0..30).map(|i| format!("m{i}")).collect::<Vec<_>>());

    rabbit.restart().unwrap();
    // At least once: a message in flight at the stop may come twice; drop repeats by
    // message_id, then every message is there, in order.
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    let mut ids = std::collections::HashSet::new();
    while seen.len() < 30 && std::time::Instant::now() < deadline {
        let port = rabbit.port().to_string();
        let s = obs(&["get", "--port", &port, "--count", "1", "--timeout", "10"]);
        let l = s
            .expect_line("a message", WAIT, |l| l.starts_with('{') || l == "DONE")
            .unwrap();
        if l == "DONE" {
            continue;
        }
        let v: Value = serde_json::from_str(&l).unwrap();
        if ids.insert(v["message_id"].as_str().unwrap().to_owned()) {
            seen.push(payload(&v, "body_hex"));
        }
    }
    assert_eq!(seen, (0..30).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // The outage went through the link-loss path and a reconnect, each logged.
    let log = rig.gateway.log();
    assert!(log.contains("AMQP upstream link lost"), "{log}");
    assert!(
        log.matches("AMQP upstream connected.").count() >= 2,
        "{log}"
    );
}
