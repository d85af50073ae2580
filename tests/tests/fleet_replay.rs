//! Fleet view, replay on request (issue 20), end to end through the real binary: a backend
//! (paho MQTT 5 against mosquitto, pika against RabbitMQ) publishes `{"from", "to", "id"}` on
//! `sensorgate/7/replay` on the gateway's own upstream and reads the answer on
//! `sensorgate/7/replay/result`.
//!
//! - A range still held comes again with its original sequence ids (`sg-seq` / AMQP
//!   `message_id`), topics and payloads, then an `ok` answer counting them; the live data
//!   is not disturbed.
//! - A range whose segment was deleted (acknowledged by every upstream, a small spool with
//!   64 KiB segments), or dropped by `when_full = "drop_oldest"` (a 1 MiB spool filled while
//!   a second upstream is down), is refused `gone` with the oldest id still held, and the
//!   newest records are still served.
//! - Malformed requests and ranges are refused with a reason, and beyond
//!   `max_requests_per_minute` (6) requests are refused `rate_limited`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::sn::TopicType;
use sensorgate_tests::{
    GatewayConfig, RabbitMq, Rig, Script, free_tcp_port, poll_until, validate_json_schema,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// `[fleet]` on with its replay defaults (`max_records = 10000`, 6 requests a minute);
/// heartbeats off, so the upstream carries only what these tests read.
fn replay_on(c: &mut GatewayConfig) {
    c.with_fleet("heartbeat = \"0s\"");
}

/// A backend (`tests/py/replay_peer.py`) that sends `requests` once `data` sensor messages
/// arrived; READY already seen.
fn peer(mode: &str, port: u16, data: usize, requests: &[Value], burst: bool) -> Script {
    let mut args = vec![
        mode.to_owned(),
        "--port".into(),
        port.to_string(),
        "--gateway-id".into(),
        "7".into(),
        "--data".into(),
        data.to_string(),
    ];
    for r in requests {
        args.push("--request".into());
        args.push(match r {
            Value::String(raw) => raw.clone(),
            other => other.to_string(),
        });
    }
    if burst {
        args.push("--burst".into());
    }
    let s = Script::python("replay_peer.py", &args).unwrap();
    s.expect_line("READY", WAIT, |l| l == "READY").unwrap();
    s
}

/// Every JSON line the peer printed until DONE (fails on TIMEOUT); every answer among them
/// is checked against `schemas/replay-result.json`.
fn lines_until_done(s: &Script) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let line = s.expect_line("a message or DONE", WAIT, |_| true).unwrap();
        match line.as_str() {
            "DONE" => {
                answers_match_the_schema(&out);
                return out;
            }
            "TIMEOUT" => panic!("the peer timed out; it printed {out:?}"),
            l => out.push(serde_json::from_str(l).unwrap()),
        }
    }
}

/// The answers among `lines` (without the peer's `kind`) are valid `replay-result.json`.
fn answers_match_the_schema(lines: &[Value]) {
    let answers: Vec<Vec<u8>> = of_kind(lines, "result")
        .into_iter()
        .map(|l| {
            let mut answer = l.clone();
            answer.as_object_mut().unwrap().remove("kind");
            serde_json::to_vec(&answer).unwrap()
        })
        .collect();
    if answers.is_empty() {
        return;
    }
    let docs: Vec<&[u8]> = answers.iter().map(Vec::as_slice).collect();
    let (ok, out) = validate_json_schema("replay-result.json", &docs).unwrap();
    assert!(ok, "{out}");
    assert_eq!(out.matches("OK ").count(), docs.len(), "{out}");
}

fn of_kind<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["kind"] == kind).collect()
}

/// `(seq, payload)` of the data lines.
fn data(lines: &[Value]) -> Vec<(String, String)> {
    of_kind(lines, "data")
        .iter()
        .map(|l| {
            (
                l["seq"].as_str().unwrap_or("none").to_owned(),
                l["payload"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn expected(seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, String)> {
    seqs.map(|s| (s.to_string(), format!("m{}", s - 1)))
        .collect()
}

#[test]
fn a_range_still_held_comes_again_with_its_original_ids() {
    let rig = Rig::start_with(|c| {
        replay_on(c);
        c.with_admin()?;
        Ok(())
    })
    .unwrap();
    let request = json!({"from": 3, "to": 6, "id": "r1"});
    // The request is one the documented schema describes.
    let (ok, out) = validate_json_schema(
        "replay-request.json",
        &[&serde_json::to_vec(&request).unwrap()],
    )
    .unwrap();
    assert!(ok, "{out}");
    let backend = peer("mqtt", rig.broker.port(), 10, &[request], false);
    let mut c = rig.connected("replay-held").unwrap();
    let id = c.register("sensors/x").unwrap();
    for i in 0..10 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    let lines = lines_until_done(&backend);
    let got = data(&lines);
    // A fresh spool numbers from 1: the live data, then the replay of 3..=6, as they were.
    let mut want = expected(1..=10);
    want.extend(expected(3..=6));
    assert_eq!(got, want, "{lines:?}");
    assert!(
        of_kind(&lines, "data")
            .iter()
            .all(|l| l["topic"] == "sensors/x")
    );
    let results = of_kind(&lines, "result");
    assert_eq!(results.len(), 1);
    let r = results[0];
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["id"], "r1");
    assert_eq!((r["from"].as_u64(), r["to"].as_u64()), (Some(3), Some(6)));
    assert_eq!(
        (r["sent"].as_u64(), r["missing"].as_u64()),
        (Some(4), Some(0))
    );
    assert!(r["reason"].is_null(), "{r}");
    // The gateway logged the replay, and counted the request as a control message.
    let log = rig.gateway.log();
    assert!(log.contains("Replay sent."), "{log}");
    let (code, metrics) = rig.gateway.admin_get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("sensorgate_router_control_total{outcome=\"taken\"} 1\n"),
        "{metrics}"
    );
    // ...and as served, with its four records (counted before the answer went out).
    for line in [
        "sensorgate_fleet_replay_requests_total{outcome=\"served\"} 1\n",
        "sensorgate_fleet_replay_requests_total{outcome=\"refused\"} 0\n",
        "sensorgate_fleet_replayed_records_total 4\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[test]
fn a_range_no_longer_on_disk_is_refused_with_the_oldest_id_held() {
    let rig = Rig::start_with(|c| {
        // Nothing acknowledged is kept for replays.
        c.with_fleet("heartbeat = \"0s\"\n[fleet.replay]\nkeep_acknowledged = \"0B\"");
        c.extra_sections.push_str(
            "\n[spool]\nmax_bytes = \"1MiB\"\nsegment_bytes = \"64KiB\"\nwhen_full = \"drop_oldest\"\n",
        );
        Ok(())
    })
    .unwrap();
    let backend = peer(
        "mqtt",
        rig.broker.port(),
        33,
        &[
            json!({"from": 1, "to": 5, "id": "old"}),
            json!({"from": 31, "to": 33, "id": "new"}),
        ],
        false,
    );
    let mut c = rig.connected("replay-gone").unwrap();
    let id = c.register("sensors/x").unwrap();
    // 30 records of ~600 bytes: more than an eighth of a segment, so once the upstream has
    // acknowledged them all the spool seals the segment and deletes it.
    let filler = "f".repeat(600);
    for i in 0..30 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}{filler}").as_bytes())
            .unwrap();
    }
    let first_segment = rig
        .gateway
        .dir()
        .join("state/spool/00000000000000000001.seg");
    poll_until(
        "the acknowledged segment deleted",
        WAIT,
        Duration::from_millis(50),
        || Ok((!first_segment.exists()).then_some(())),
    )
    .unwrap();
    for i in 30..33 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    let lines = lines_until_done(&backend);
    let results = of_kind(&lines, "result");
    assert_eq!(results.len(), 2, "{lines:?}");
    let old = results[0];
    assert_eq!(old["id"], "old");
    assert_eq!(old["status"], "refused", "{old}");
    assert_eq!(old["reason"], "gone");
    assert_eq!(old["first_held"].as_u64(), Some(31), "{old}");
    assert_eq!(old["sent"].as_u64(), Some(0));
    let new = results[1];
    assert_eq!(new["status"], "ok", "{new}");
    assert_eq!(new["sent"].as_u64(), Some(3));
    // The live 33, then exactly the three replayed.
    let got = data(&lines);
    assert_eq!(got.len(), 36, "{got:?}");
    assert_eq!(got[33..], expected(31..=33)[..]);
}

#[test]
fn acknowledged_records_stay_replayable_within_keep_acknowledged() {
    // As the test above, with the default `keep_acknowledged` (64 MiB): the acknowledged
    // segment is sealed and kept, and its records served again.
    let rig = Rig::start_with(|c| {
        replay_on(c);
        c.extra_sections
            .push_str("\n[spool]\nmax_bytes = \"1MiB\"\nsegment_bytes = \"64KiB\"\n");
        Ok(())
    })
    .unwrap();
    let backend = peer(
        "mqtt",
        rig.broker.port(),
        31,
        &[json!({"from": 1, "to": 5, "id": "kept"})],
        false,
    );
    let mut c = rig.connected("replay-kept").unwrap();
    let id = c.register("sensors/x").unwrap();
    let filler = "f".repeat(600);
    for i in 0..30 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}{filler}").as_bytes())
            .unwrap();
    }
    // Once the upstream acknowledged them, the housekeeping seals the segment: the next
    // record opens a second one. Probes go to a topic the backend does not count.
    let spool = rig.gateway.dir().join("state/spool");
    let probe = c.register("probe/x").unwrap();
    poll_until(
        "a second segment opened",
        WAIT,
        Duration::from_millis(50),
        || {
            c.publish_qos1_ok(TopicType::Normal, probe, b"p")?;
            let segments = std::fs::read_dir(&spool)?
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
                .count();
            Ok((segments >= 2).then_some(()))
        },
    )
    .unwrap();
    // The 31st record the backend sees sends its request.
    c.publish_qos1_ok(TopicType::Normal, id, b"m30").unwrap();
    let lines = lines_until_done(&backend);
    let results = of_kind(&lines, "result");
    assert_eq!(results.len(), 1, "{lines:?}");
    assert_eq!(results[0]["status"], "ok", "{}", results[0]);
    assert_eq!(results[0]["sent"].as_u64(), Some(5));
    assert!(
        spool.join("00000000000000000001.seg").exists(),
        "the acknowledged segment is kept"
    );
    let got = data(&lines);
    let replayed: Vec<&String> = got[31..].iter().map(|(seq, _)| seq).collect();
    assert_eq!(replayed, ["1", "2", "3", "4", "5"]);
}

#[test]
fn a_range_drop_oldest_gave_up_is_refused_and_the_newest_are_still_served() {
    // A second upstream that never connects holds every record: the 1 MiB spool fills and
    // `drop_oldest` drops its oldest 64 KiB segments while mosquitto gets everything.
    let dead = free_tcp_port().unwrap();
    let rig = Rig::start_with(|c| {
        replay_on(c);
        c.extra_sections.push_str(&format!(
            "\n[[upstream]]\nname = \"dead\"\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{dead}\"\n\
             backoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n\
             \n[spool]\nmax_bytes = \"1MiB\"\nsegment_bytes = \"64KiB\"\nwhen_full = \"drop_oldest\"\n"
        ));
        Ok(())
    })
    .unwrap();
    const N: u64 = 1300;
    let backend = peer(
        "mqtt",
        rig.broker.port(),
        N as usize,
        &[
            json!({"from": 1, "to": 5, "id": "dropped"}),
            json!({"from": N - 2, "to": N, "id": "newest"}),
        ],
        false,
    );
    let mut c = rig.connected("replay-drop").unwrap();
    let id = c.register("sensors/x").unwrap();
    let filler = "f".repeat(1000);
    for i in 0..N {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}{filler}").as_bytes())
            .unwrap();
    }
    let lines = lines_until_done(&backend);
    let results = of_kind(&lines, "result");
    assert_eq!(results.len(), 2, "{results:?}");
    let dropped = results[0];
    assert_eq!(dropped["status"], "refused", "{dropped}");
    assert_eq!(dropped["reason"], "gone");
    let first_held = dropped["first_held"].as_u64().unwrap();
    assert!(first_held > 5 && first_held < N - 2, "{dropped}");
    let newest = results[1];
    assert_eq!(newest["status"], "ok", "{newest}");
    assert_eq!(newest["sent"].as_u64(), Some(3));
    let got = data(&lines);
    assert_eq!(got.len() as u64, N + 3);
    let replayed: Vec<&str> = got[N as usize..].iter().map(|(s, _)| s.as_str()).collect();
    let want: Vec<String> = (N - 2..=N).map(|s| s.to_string()).collect();
    assert_eq!(replayed, want);
    assert!(got[N as usize].1.starts_with(&format!("m{}f", N - 3)));
}

#[test]
fn malformed_requests_and_requests_over_the_rate_are_refused_with_a_reason() {
    let rig = Rig::start_with(|c| {
        replay_on(c);
        c.with_admin()?;
        Ok(())
    })
    .unwrap();
    let ok = |n: u32| json!({"from": 1, "to": 1, "id": format!("ok{n}")});
    let requests = [
        Value::String("not json".into()),
        json!({"from": 5, "to": 1, "id": "inverted"}),
        json!({"from": 1, "to": 10001, "id": "long"}),
        ok(1),
        ok(2),
        ok(3),
        // The bucket holds 6 per minute: the 7th and 8th requests are over.
        ok(4),
        ok(5),
    ];
    let backend = peer("mqtt", rig.broker.port(), 1, &requests, true);
    let mut c = rig.connected("replay-bad").unwrap();
    let id = c.register("sensors/x").unwrap();
    c.publish_qos1_ok(TopicType::Normal, id, b"m0").unwrap();
    let lines = lines_until_done(&backend);
    let results: Vec<(Value, Value, Value)> = of_kind(&lines, "result")
        .iter()
        .map(|r| (r["id"].clone(), r["status"].clone(), r["reason"].clone()))
        .collect();
    let refused = |id: Value, reason: &str| (id, json!("refused"), json!(reason));
    let served = |id: &str| (json!(id), json!("ok"), Value::Null);
    assert_eq!(
        results,
        vec![
            refused(Value::Null, "malformed"),
            refused(json!("inverted"), "invalid_range"),
            refused(json!("long"), "too_long"),
            served("ok1"),
            served("ok2"),
            served("ok3"),
            refused(json!("ok4"), "rate_limited"),
            refused(json!("ok5"), "rate_limited"),
        ],
        "{lines:?}"
    );
    // The three served replays sent seq 1 again; the refused ones nothing.
    assert_eq!(data(&lines), vec![("1".to_owned(), "m0".to_owned()); 4]);
    let (_, metrics) = rig.gateway.admin_get("/metrics").unwrap();
    for line in [
        "sensorgate_fleet_replay_requests_total{outcome=\"served\"} 3\n",
        "sensorgate_fleet_replay_requests_total{outcome=\"refused\"} 5\n",
        "sensorgate_fleet_replay_requests_total{outcome=\"unanswered\"} 0\n",
        "sensorgate_fleet_replayed_records_total 3\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[test]
fn an_amqp_backend_gets_the_replay_with_message_ids_on_its_own_upstream() {
    let rabbit = RabbitMq::start().unwrap();
    let rig = Rig::start_with(|c| {
        replay_on(c);
        c.extra_sections.push_str(&format!(
            "\n[[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\nurl = \"{}\"\n\
             exchange = \"amq.topic\"\nheartbeat = \"5s\"\nbackoff_initial = \"100ms\"\n\
             backoff_max = \"1s\"\n",
            rabbit.url()
        ));
        Ok(())
    })
    .unwrap();
    let backend = peer(
        "amqp",
        rabbit.port(),
        5,
        &[
            json!({"from": 2, "to": 3, "id": "a1"}),
            json!({"from": 4, "to": 9, "id": "a2"}),
        ],
        false,
    );
    // The MQTT backend sees the live data only: the AMQP request is answered on its own link.
    let mqtt = peer("mqtt", rig.broker.port(), 5, &[], false);
    let mut c = rig.connected("replay-amqp").unwrap();
    let id = c.register("sensors/x").unwrap();
    for i in 0..5 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    let lines = lines_until_done(&backend);
    let mut want = expected(1..=5);
    want.extend(expected(2..=3));
    assert_eq!(data(&lines), want, "{lines:?}");
    assert!(
        of_kind(&lines, "data")
            .iter()
            .all(|l| l["topic"] == "sensors.x")
    );
    let results = of_kind(&lines, "result");
    assert_eq!(results[0]["status"], "ok", "{lines:?}");
    assert_eq!(results[0]["sent"].as_u64(), Some(2));
    assert_eq!(results[1]["status"], "refused");
    assert_eq!(results[1]["reason"], "not_written", "{}", results[1]);
    assert_eq!(results[1]["first_held"].as_u64(), Some(1));
    // The MQTT side got no result and no replayed record (its peer sent no request).
    let mut mqtt_lines = Vec::new();
    while let Some(l) = mqtt.line(Duration::from_millis(500)).unwrap() {
        if l.starts_with('{') {
            mqtt_lines.push(serde_json::from_str::<Value>(&l).unwrap());
        }
    }
    assert_eq!(data(&mqtt_lines), expected(1..=5));
    assert!(of_kind(&mqtt_lines, "result").is_empty());
}
