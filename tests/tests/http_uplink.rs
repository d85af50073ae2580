//! HTTP uplink with independent clients: curl and httpx (`tests/py/http_client.py`) POST to
//! `/v1/publish/{topic}` and `/v1/publish` (JSON array and NDJSON batches) through the real
//! binary. A paho-mqtt subscriber sees each payload on its topic with the QoS and retain flag
//! the request asked for (query, `QoS-Level`/`Retain` headers, batch item fields) and an
//! `sg-seq` user property; RabbitMQ (pika) gets the same messages with the `sg-topic`,
//! `sg-protocol = "http"` and `sg-client = <device id>` headers, and a route template's
//! `{protocol}`/`{client_id}` are filled from the HTTP request. Success bodies say what was
//! promised: 200 `{"qos":1,"durable":true}`, 202 `{"qos":0,"durable":false}`, a batch's counts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::http::{
    Device, HttpRig, HttpSetup, PyRequest, TOKEN1, TOKEN2, bearer, curl, py_send, two_devices,
};
use sensorgate_tests::{Message, RabbitMq, Script, Subscriber};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn msg(topic: &str, payload: &[u8], qos: u8, retain: bool) -> Message {
    Message {
        topic: topic.into(),
        payload: payload.to_vec(),
        qos,
        retain,
    }
}

fn rig() -> HttpRig {
    HttpRig::start(&HttpSetup::new().unwrap().devices(two_devices())).unwrap()
}

/// An `amqp_obs.py` observer (MQTT mode reports `sg-seq`; `get` reads RabbitMQ).
fn obs(args: &[&str]) -> Script {
    Script::python(
        "amqp_obs.py",
        &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .unwrap()
}

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

fn hex_text(v: &Value, key: &str) -> String {
    let hex = v[key].as_str().unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    String::from_utf8(bytes).unwrap()
}

fn post(rig: &HttpRig, target: &str, body: &str, extra: &[&str]) -> sensorgate_tests::http::Reply {
    let auth = bearer(TOKEN1);
    let url = rig.url(target);
    let mut args = vec!["-X", "POST", "--data-binary", body, "-H", &auth];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args).unwrap()
}

#[test]
fn curl_single_publishes_reach_mosquitto_with_their_qos_retain_and_sg_seq() {
    let rig = rig();
    let port = rig.rig.broker.port();
    let mut sub = Subscriber::start(port, &["sensors/#"]).unwrap();
    let seqs = obs(&["mqtt", "--port", &port.to_string(), "--count", "6"]);
    seqs.expect_line("READY", WAIT, |l| l == "READY").unwrap();

    // QoS 1 (the default and explicit): 200 once durable.
    let r = post(&rig, "/v1/publish/sensors/dev1/temp", "21.5", &[]);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.json().unwrap(), json!({"qos": 1, "durable": true}));
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/dev1/temp", b"21.5", 1, false)
    );
    let r = post(&rig, "/v1/publish/sensors/dev1/temp?qos=1", "21.6", &[]);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/dev1/temp", b"21.6", 1, false)
    );
    // QoS 0: 202, handed to the spool without waiting for the fsync.
    let r = post(&rig, "/v1/publish/sensors/dev1/temp?qos=0", "21.7", &[]);
    assert_eq!(r.status, 202, "{}", r.describe());
    assert_eq!(r.json().unwrap(), json!({"qos": 0, "durable": false}));
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/dev1/temp", b"21.7", 0, false)
    );
    // Hono's `QoS-Level` header, and the `Retain` header.
    let r = post(
        &rig,
        "/v1/publish/sensors/dev1/hdr",
        "h0",
        &["-H", "QoS-Level: 0", "-H", "Retain: true"],
    );
    assert_eq!(r.status, 202, "{}", r.describe());
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/dev1/hdr", b"h0", 0, true)
    );
    // retain in the query; the content type is passed through, the body untouched.
    let r = post(
        &rig,
        "/v1/publish/sensors/dev1/state?retain=true&qos=1",
        "{\"on\": true}",
        &["-H", "Content-Type: application/json"],
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/dev1/state", b"{\"on\": true}", 1, true)
    );
    // A percent-encoded level separator and a space decode once.
    let r = post(&rig, "/v1/publish/sensors%2Fdev1/a%20b?retain=0", "x", &[]);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/dev1/a b", b"x", 1, false)
    );

    // Every copy carries an sg-seq, all different.
    let lines = json_lines(&seqs, 6);
    let mut got: Vec<&str> = lines.iter().map(|m| m["seq"].as_str().unwrap()).collect();
    got.sort_unstable();
    got.dedup();
    assert_eq!(got.len(), 6, "{lines:?}");

    // The broker kept both retained messages.
    let mut late = Subscriber::start(port, &["sensors/dev1/state", "sensors/dev1/hdr"]).unwrap();
    let mut kept: Vec<Message> = (0..2).map(|_| late.expect().unwrap()).collect();
    kept.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(kept[0].topic, "sensors/dev1/hdr");
    assert!(kept.iter().all(|m| m.retain), "{kept:?}");
}

#[test]
fn httpx_single_and_batch_publishes_json_and_ndjson_arrive_in_order() {
    let rig = rig();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();
    let auth = format!("Bearer {TOKEN2}");
    let batch = json!([
        {"topic": "sensors/dev2/t", "payload": "21.5"},
        {"topic": "sensors/dev2/h", "payload": {"rh": 40}},
        {"topic": "sensors/dev2/bin", "payload_b64": "AAEC/w==", "qos": 0},
        {"topic": "sensors/dev2/r", "payload": "kept", "retain": true, "ts": 1_700_000_000_000_u64},
    ]);
    let all_qos0 = json!([
        {"topic": "sensors/dev2/z", "payload": "z1"},
        {"topic": "sensors/dev2/z", "payload": "z2"},
    ]);
    let ndjson = "{\"topic\":\"sensors/dev2/n\",\"payload\":\"n1\"}\n\
                  {\"topic\":\"sensors/dev2/n\",\"payload\":\"n2\",\"qos\":0}\n";
    let reqs = vec![
        PyRequest::post("/v1/publish/sensors/dev2/single", "s1").header("Authorization", &auth),
        PyRequest::post("/v1/publish/sensors/dev2/single?qos=0", "s0")
            .header("Authorization", &auth),
        PyRequest::post("/v1/publish", batch.to_string())
            .header("Authorization", &auth)
            .header("Content-Type", "application/json"),
        // Batch defaults from the query: every item QoS 0 -> 202.
        PyRequest::post("/v1/publish?qos=0", all_qos0.to_string())
            .header("Authorization", &auth)
            .header("Content-Type", "application/json; charset=utf-8"),
        PyRequest::post("/v1/publish", ndjson)
            .header("Authorization", &auth)
            .header("Content-Type", "application/x-ndjson"),
    ];
    let replies = py_send(&rig.base(), &reqs, &[]).unwrap();
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 202, 200, 202, 200], "{replies:#?}");
    assert!(replies.iter().all(|r| r.version == "HTTP/1.1"));
    assert_eq!(
        replies[2].json().unwrap(),
        json!({"items": 4, "durable": 3, "queued": 1})
    );
    assert_eq!(
        replies[3].json().unwrap(),
        json!({"items": 2, "durable": 0, "queued": 2})
    );
    assert_eq!(
        replies[4].json().unwrap(),
        json!({"items": 2, "durable": 1, "queued": 1})
    );

    let want = [
        msg("sensors/dev2/single", b"s1", 1, false),
        msg("sensors/dev2/single", b"s0", 0, false),
        msg("sensors/dev2/t", b"21.5", 1, false),
        // A JSON payload that is not a string is kept as its JSON text.
        msg("sensors/dev2/h", b"{\"rh\":40}", 1, false),
        msg("sensors/dev2/bin", &[0, 1, 2, 0xff], 0, false),
        msg("sensors/dev2/r", b"kept", 1, true),
        msg("sensors/dev2/z", b"z1", 0, false),
        msg("sensors/dev2/z", b"z2", 0, false),
        msg("sensors/dev2/n", b"n1", 1, false),
        msg("sensors/dev2/n", b"n2", 0, false),
    ];
    let got = sub.collect(want.len(), WAIT).unwrap();
    assert_eq!(got, want);
}

#[test]
fn rabbitmq_gets_http_publishes_with_origin_headers_and_templates_see_the_device() {
    let rabbit = RabbitMq::start().unwrap();
    let declared = obs(&["declare", "--port", &rabbit.port().to_string()]);
    declared
        .expect_line("READY", WAIT, |l| l == "READY")
        .unwrap();
    let http = HttpSetup::new()
        .unwrap()
        .devices(vec![Device::new("dev1", TOKEN1)]);
    let rig = HttpRig::start_with(&http, |c| {
        c.extra_sections.push_str(&format!(
            "\n[[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\nurl = \"{}\"\n\
             exchange = \"amq.topic\"\nheartbeat = \"5s\"\nbackoff_initial = \"100ms\"\n\
             backoff_max = \"1s\"\n\n\
             [[route]]\nfilter = \"sensors/#\"\nupstreams = [\"local\"]\n\
             template = \"by/{{protocol}}/{{client_id}}/{{topic}}\"\n\n\
             [[route]]\nfilter = \"sensors/#\"\nupstreams = [\"cloud\"]\n",
            rabbit.url()
        ));
        Ok(())
    })
    .unwrap();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["by/#"]).unwrap();

    let r = post(&rig, "/v1/publish/sensors/dev1/t?qos=1", "a1", &[]);
    assert_eq!(r.status, 200, "{}", r.describe());
    let batch = json!([
        {"topic": "sensors/dev1/t", "payload": "a2"},
        {"topic": "sensors/dev1/u", "payload": "a3", "qos": 0},
    ])
    .to_string();
    let reqs = vec![
        PyRequest::post("/v1/publish", &batch)
            .header("Authorization", &format!("Bearer {TOKEN1}"))
            .header("Content-Type", "application/json"),
    ];
    let replies = py_send(&rig.base(), &reqs, &[]).unwrap();
    assert_eq!(replies[0].status, 200, "{}", replies[0].describe());

    // MQTT: the template filled with the ingress and the device id.
    let got = sub.collect(3, WAIT).unwrap();
    assert_eq!(
        got,
        [
            msg("by/http/dev1/sensors/dev1/t", b"a1", 1, false),
            msg("by/http/dev1/sensors/dev1/t", b"a2", 1, false),
            msg("by/http/dev1/sensors/dev1/u", b"a3", 0, false),
        ]
    );
    // AMQP: routing key from the topic, origin headers.
    let getter = obs(&["get", "--port", &rabbit.port().to_string(), "--count", "3"]);
    let from_amqp = json_lines(&getter, 3);
    let bodies: Vec<String> = from_amqp.iter().map(|a| hex_text(a, "body_hex")).collect();
    assert_eq!(bodies, ["a1", "a2", "a3"], "{from_amqp:?}");
    for (a, key) in from_amqp
        .iter()
        .zip(["sensors.dev1.t", "sensors.dev1.t", "sensors.dev1.u"])
    {
        assert_eq!(a["routing_key"], key, "{a}");
        assert_eq!(a["headers"]["sg-protocol"], "http", "{a}");
        assert_eq!(a["headers"]["sg-client"], "dev1", "{a}");
        assert!(a["message_id"].is_string(), "sg-seq as message_id: {a}");
    }
    assert_eq!(from_amqp[0]["headers"]["sg-topic"], "sensors/dev1/t");
    assert_eq!(from_amqp[0]["delivery_mode"], 2, "QoS 1 is persistent");
}
