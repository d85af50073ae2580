//! Fan-out to two real brokers at once: the real binary with an MQTT 5 upstream (mosquitto) and
//! an AMQP upstream (a private RabbitMQ node), no `[[route]]`, several MQTT-SN sensors publishing
//! numbered QoS 1 sequences, and an independent observer on each broker (paho-mqtt, pika).
//!
//! - Every message reaches both brokers, in each sender's order, once; the MQTT copy's `sg-seq`
//!   equals the AMQP copy's `message_id`.
//! - RabbitMQ down for 30 s: mosquitto keeps receiving throughout; RabbitMQ back on the same
//!   port and data dir gets the whole backlog in order.
//! - `kill -9` of the gateway mid-stream: after a restart on the same state dir every message a
//!   sensor got a PUBACK for reaches both brokers (repeats allowed, counted).
//!
//! Each test boots its own RabbitMQ node (several seconds).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sensorgate_tests::fanout::{
    FanoutRig, Plan, Received, Sensor, SensorRun, TOPIC, by_sender, dedup, ensure_in_order, has_all,
};

/// Generous bound for everything to reach a broker.
const WAIT: Duration = Duration::from_secs(90);
/// How long one PUBACK may take on a loaded machine.
const ACK: Duration = Duration::from_secs(15);

fn start_sensors(rig: &FanoutRig, n: usize, first: &[usize], plan: Plan) -> Vec<Sensor> {
    (0..n)
        .map(|k| {
            Sensor::start_at(
                rig.gateway.sn_addr(),
                &format!("fan{k}"),
                first.get(k).copied().unwrap_or(0),
                plan,
            )
            .unwrap()
        })
        .collect()
}

fn acked_payloads(runs: &[SensorRun]) -> HashSet<String> {
    runs.iter()
        .flat_map(|r| r.acked.iter().map(|(_, p)| p.clone()))
        .collect()
}

/// `sg-seq` of each payload's MQTT copy; every copy carries one.
fn seq_by_payload(mqtt: &[Received]) -> HashMap<String, String> {
    mqtt.iter()
        .map(|c| {
            let seq = c
                .seq
                .clone()
                .unwrap_or_else(|| panic!("no sg-seq on {c:?}"));
            (c.payload.clone(), seq)
        })
        .collect()
}

/// Every AMQP copy (repeats included) carries the `message_id` equal to the MQTT copy's
/// `sg-seq` of the same message.
fn assert_same_ids(mqtt: &[Received], amqp: &[Received]) {
    let seqs = seq_by_payload(mqtt);
    for a in amqp {
        let want = seqs
            .get(&a.payload)
            .unwrap_or_else(|| panic!("{a:?} has no MQTT copy"));
        assert_eq!(a.seq.as_ref(), Some(want), "message_id == sg-seq: {a:?}");
    }
}

#[test]
fn qos1_uplink_reaches_both_brokers_in_order_with_one_sequence_id() {
    const SENSORS: usize = 4;
    const PER_SENSOR: usize = 50;
    let rig = FanoutRig::start().unwrap();
    let mqtt = rig.mqtt_observer().unwrap();
    let amqp = rig.amqp_observer().unwrap();

    let plan = Plan {
        count: PER_SENSOR,
        pace: Duration::ZERO,
        ack_timeout: ACK,
    };
    let runs: Vec<SensorRun> = start_sensors(&rig, SENSORS, &[], plan)
        .into_iter()
        .map(|s| s.wait(WAIT).unwrap())
        .collect();
    for r in &runs {
        assert_eq!(r.error, None, "{}", r.name);
        assert_eq!(r.acked.len(), PER_SENSOR, "{}", r.name);
    }
    let want = acked_payloads(&runs);
    assert_eq!(want.len(), SENSORS * PER_SENSOR);

    let from_mqtt = mqtt
        .wait_until("every message", WAIT, |c| has_all(c, &want))
        .unwrap();
    let from_amqp = amqp
        .wait_until("every message", WAIT, |c| has_all(c, &want))
        .unwrap();
    // Once each, in each sender's order (a repeat would show as a gap or step back).
    assert_eq!(from_mqtt.len(), want.len(), "mosquitto copies");
    assert_eq!(from_amqp.len(), want.len(), "RabbitMQ copies");
    ensure_in_order("mosquitto", &from_mqtt).unwrap();
    ensure_in_order("RabbitMQ", &from_amqp).unwrap();
    assert_eq!(by_sender(&from_mqtt).len(), SENSORS);

    assert!(from_mqtt.iter().all(|c| c.topic == TOPIC), "MQTT topic");
    assert!(
        from_amqp.iter().all(|c| c.topic == "sensors.fanout"),
        "AMQP routing key"
    );
    assert_same_ids(&from_mqtt, &from_amqp);
    let distinct: HashSet<&String> = from_mqtt.iter().filter_map(|c| c.seq.as_ref()).collect();
    assert_eq!(distinct.len(), want.len(), "one sequence id per message");
}

#[test]
fn rabbitmq_down_for_30s_keeps_mosquitto_fed_then_its_backlog_drains_in_order() {
    const SENSORS: usize = 3;
    /// The outage the sensors publish through.
    const OUTAGE: Duration = Duration::from_secs(30);
    /// Windows of the outage that must each see mosquitto deliveries and sensor PUBACKs.
    const WINDOW: Duration = Duration::from_secs(5);
    let mut rig = FanoutRig::start().unwrap();
    let mqtt = rig.mqtt_observer().unwrap();
    let before = rig.amqp_observer().unwrap();

    // A steady, bounded rate: each sensor one message per ~200 ms, at most 1,000 each.
    let plan = Plan {
        count: 1_000,
        pace: Duration::from_millis(200),
        ack_timeout: ACK,
    };
    let sensors = start_sensors(&rig, SENSORS, &[], plan);
    // Both upstreams live before the outage.
    mqtt.wait_until("20 copies", WAIT, |c| c.len() >= 20)
        .unwrap();
    before
        .wait_until("20 copies", WAIT, |c| c.len() >= 20)
        .unwrap();

    rig.rabbit.stop().unwrap();
    let down = Instant::now();
    // The sensors keep publishing through the outage (each publish waits for its PUBACK).
    while down.elapsed() < OUTAGE {
        for s in &sensors {
            assert!(!s.is_finished(), "a sensor stopped during the outage");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    rig.rabbit.restart().unwrap();
    let after = rig.amqp_observer().unwrap();
    // New messages queue behind the backlog: keep publishing until RabbitMQ delivers again.
    after
        .wait_until("a copy after the restart", WAIT, |c| !c.is_empty())
        .unwrap();
    let runs: Vec<SensorRun> = sensors.into_iter().map(|s| s.finish().unwrap()).collect();
    for r in &runs {
        assert_eq!(r.error, None, "{}", r.name);
    }
    let want = acked_payloads(&runs);

    let from_mqtt = mqtt
        .wait_until("every message", WAIT, |c| has_all(c, &want))
        .unwrap();
    assert_eq!(from_mqtt.len(), want.len(), "mosquitto copies, once each");
    ensure_in_order("mosquitto", &from_mqtt).unwrap();

    // Throughout the outage: each window saw PUBACKs to the sensors and copies at mosquitto.
    let windows = (OUTAGE.as_secs() / WINDOW.as_secs()) as u32;
    for w in 0..windows {
        let (from, to) = (down + WINDOW * w, down + WINDOW * (w + 1));
        let in_window = |at: Instant| at >= from && at < to;
        let delivered = from_mqtt.iter().filter(|c| in_window(c.at)).count();
        let acked = runs
            .iter()
            .flat_map(|r| &r.acked)
            .filter(|(at, _)| in_window(*at))
            .count();
        eprintln!("outage window {w}: {acked} PUBACKs, {delivered} copies at mosquitto");
        assert!(acked > 0, "no PUBACK in outage window {w}");
        assert!(delivered > 0, "no copy at mosquitto in outage window {w}");
    }

    // RabbitMQ: what came before the stop plus the backlog after the restart. A message in
    // flight at the stop may come twice (at least once); without repeats, everything in order.
    let first = before.copies();
    let rest = after
        .wait_until("the whole backlog", WAIT, |c| {
            has_all(&[first.as_slice(), c].concat(), &want)
        })
        .unwrap();
    let all = [first.as_slice(), rest.as_slice()].concat();
    let (once, repeats) = dedup(&all);
    eprintln!(
        "RabbitMQ: {} messages, {} before the stop, {} after the restart, {repeats} repeats",
        once.len(),
        first.len(),
        rest.len()
    );
    assert_eq!(once.len(), want.len(), "RabbitMQ got nothing unexpected");
    ensure_in_order("RabbitMQ", &once).unwrap();
    assert_same_ids(&from_mqtt, &all);

    let log = rig.gateway.log();
    assert!(log.contains("AMQP upstream link lost"), "{log}");
}

#[test]
fn kill_9_during_fanout_loses_no_acknowledged_message_on_either_broker() {
    const SENSORS: usize = 3;
    const AFTER_RESTART: usize = 10;
    let mut rig = FanoutRig::start().unwrap();
    let mqtt = rig.mqtt_observer().unwrap();
    let amqp = rig.amqp_observer().unwrap();

    let plan = Plan {
        count: 5_000,
        pace: Duration::from_millis(5),
        ack_timeout: Duration::from_secs(5),
    };
    let sensors = start_sensors(&rig, SENSORS, &[], plan);
    // Mid-stream: both upstreams are delivering and the sensors are still publishing.
    mqtt.wait_until("50 copies", WAIT, |c| c.len() >= 50)
        .unwrap();
    amqp.wait_until("50 copies", WAIT, |c| c.len() >= 50)
        .unwrap();
    assert!(sensors.iter().all(|s| !s.is_finished()), "still publishing");
    rig.gateway.kill9().unwrap();
    let before: Vec<SensorRun> = sensors.into_iter().map(|s| s.finish().unwrap()).collect();

    rig.gateway.restart().unwrap();
    // The sensors come back and continue their sequences.
    let next: Vec<usize> = before
        .iter()
        .map(|r| r.acked.len() + usize::from(r.unacked.is_some()))
        .collect();
    let plan = Plan {
        count: AFTER_RESTART,
        pace: Duration::ZERO,
        ack_timeout: ACK,
    };
    let after: Vec<SensorRun> = start_sensors(&rig, SENSORS, &next, plan)
        .into_iter()
        .map(|s| s.wait(WAIT).unwrap())
        .collect();
    for r in &after {
        assert_eq!(r.error, None, "{}", r.name);
        assert_eq!(r.acked.len(), AFTER_RESTART, "{}", r.name);
    }
    let mut want = acked_payloads(&before);
    let acked_before = want.len();
    want.extend(acked_payloads(&after));
    let unacked: Vec<&String> = before.iter().filter_map(|r| r.unacked.as_ref()).collect();

    for (name, obs) in [("mosquitto", &mqtt), ("RabbitMQ", &amqp)] {
        let copies = obs
            .wait_until("every acknowledged message", WAIT, |c| has_all(c, &want))
            .unwrap();
        let (once, repeats) = dedup(&copies);
        let unacked_arrived = unacked
            .iter()
            .filter(|u| once.iter().any(|c| &c.payload == **u))
            .count();
        eprintln!(
            "{name}: {} acknowledged before the kill, {} after; {} copies, {repeats} repeats, \
             {unacked_arrived} of {} unacknowledged arrived",
            acked_before,
            want.len() - acked_before,
            copies.len(),
            unacked.len()
        );
        // Nothing but what the sensors sent; each sender's first copies in its order (an
        // unacknowledged message may be missing, leaving a gap).
        assert_eq!(once.len(), want.len() + unacked_arrived, "{name}");
        for (sender, idx) in by_sender(&once) {
            assert!(
                idx.windows(2).all(|w| w[0] < w[1]),
                "{name}: {sender} out of order: {idx:?}"
            );
        }
    }
}
