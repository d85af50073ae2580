//! The fleet view on the upstream's own connection (`[fleet]`), against mosquitto and a
//! private RabbitMQ node, through the real binary:
//!
//! - MQTT birth after a broker outage comes before the records spooled meanwhile (a
//!   persistent-session subscriber on a persistent broker sees the order the gateway sent).
//! - MQTT birth: a retained `sensorgate/7/state` `online` document, read by a subscriber that
//!   comes after it; death on SIGTERM (retained `offline`, reason `shutdown`); the Will on
//!   `kill -9` (retained `offline`, reason `connection_lost`), with MQTT 3.1.1 and 5.
//! - AMQP birth on connect and death on SIGTERM, read with pika from a queue bound to the
//!   state routing key; the connection is named after the state topic (what RabbitMQ's
//!   `connection.closed` event carries after a crash).
//! - Heartbeats (`heartbeat = "1s"`): QoS 0 on `/status`, with message counts that move with
//!   real sensor traffic and the upstream's cursor; none at all with `heartbeat = "0s"`.
//! - Events: a second upstream's outage is reported on the first as `upstream_down`, then
//!   `upstream_up` with how long it was down.
//!
//! - A reload that reconnects an upstream (a new `keep_alive`) announces the birth again and
//!   keeps the Will; a reload that changes `[fleet]` is reported as restart-required.
//! - The JSON Schemas (schemas/state.json, status.json, event.json) accept the real payloads
//!   (python `jsonschema`), and reject a wrong one.
//!
//! "Nothing arrives" (heartbeat off) is shown with a marker published after the window.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use sensorgate_tests::http::metric;
use sensorgate_tests::sn::{self, TopicType};
use sensorgate_tests::{
    GATEWAY_ID, Gateway, GatewayConfig, Message, Mosquitto, RabbitMq, Rig, Script, SnClient,
    Subscriber, UpMsg, poll_until, publish_upstream, send_signal, validate_json_schema,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn topic(leaf: &str) -> String {
    format!("sensorgate/{GATEWAY_ID}/{leaf}")
}

fn json(m: &Message) -> Value {
    serde_json::from_slice(&m.payload)
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {:?}", m.topic, m.payload))
}

/// A rig whose gateway has `[fleet]` on with `lines`.
fn fleet_rig(lines: &str) -> Rig {
    Rig::start_with(|c| {
        c.with_fleet(lines);
        Ok(())
    })
    .unwrap()
}

/// The next message on `topic` (others are skipped), within [`WAIT`].
fn next_on(sub: &mut Subscriber, topic: &str) -> Message {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.next(left).unwrap() {
            Some(m) if m.topic == topic => return m,
            Some(_) => {}
            None => panic!("nothing on {topic} within {WAIT:?}"),
        }
    }
}

fn assert_state(m: &Message, state: &str, reason: &str) {
    let v = json(m);
    assert_eq!(v["state"], state, "{v}");
    assert_eq!(v["reason"], reason, "{v}");
    assert_eq!(v["gateway_id"], GATEWAY_ID, "{v}");
    assert_eq!(v["upstream"], "local", "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");
    assert!(v["started_ms"].as_u64().unwrap() > 1_600_000_000_000, "{v}");
    assert!(v["gateway_name"].is_string(), "{v}");
    assert_eq!(m.qos, 1, "[fleet] qos default");
}

#[test]
fn birth_is_retained_for_a_late_subscriber_and_sigterm_publishes_the_death() {
    let mut rig = fleet_rig("heartbeat = \"0s\"\n");
    let state = topic("state");
    // Whenever the gateway's connection came, a subscriber now sees the birth (live or
    // retained); one that subscribes after it gets the retained copy.
    let mut first = rig.subscribe(&[&state]).unwrap();
    assert_state(&next_on(&mut first, &state), "online", "connected");
    let mut late = rig.subscribe(&[&state]).unwrap();
    let m = next_on(&mut late, &state);
    assert!(m.retain, "a late subscriber gets the retained birth");
    assert_state(&m, "online", "connected");
    // The fleet topics are the gateway's own: a sensor cannot announce it offline (nor ask
    // for replays), though no [[acl]] is configured.
    let mut spoofer = rig.connected("spoofer").unwrap();
    for leaf in ["state", "replay"] {
        let (_, rc) = spoofer.register_rc(&topic(leaf)).unwrap();
        assert_eq!(rc, sn::RC_NOT_SUPPORTED, "REGISTER {leaf}");
    }

    let status = rig.gateway.stop().unwrap();
    assert!(status.success(), "{status:?}");
    let m = next_on(&mut late, &state);
    assert_state(&m, "offline", "shutdown");
    // Retained: the death is what the next subscriber reads (not the Will: a clean
    // DISCONNECT discards it, so there is exactly one offline message).
    let mut after = rig.subscribe(&[&state]).unwrap();
    let m = next_on(&mut after, &state);
    assert!(m.retain);
    assert_state(&m, "offline", "shutdown");
    assert!(
        after.next(Duration::from_secs(1)).unwrap().is_none(),
        "one retained state only"
    );
}

#[test]
fn kill_9_makes_the_broker_publish_the_will_with_mqtt_311_and_5() {
    // MQTT 5 with a remote_prefix: the Will's topic gets it too, as sensor data does.
    for (protocol, prefix) in [("3.1.1", ""), ("5", "site-7/")] {
        let mut rig = Rig::start_with(|c| {
            c.protocol = protocol.into();
            c.remote_prefix = prefix.into();
            c.with_fleet("heartbeat = \"0s\"\n");
            Ok(())
        })
        .unwrap();
        let state = format!("{prefix}{}", topic("state"));
        let mut sub = rig.subscribe(&[&state]).unwrap();
        assert_state(&next_on(&mut sub, &state), "online", "connected");
        rig.gateway.kill9().unwrap();
        // The kernel closes the socket: mosquitto publishes the Will at once (no keep-alive
        // wait), retained.
        let m = next_on(&mut sub, &state);
        assert_state(&m, "offline", "connection_lost");
        let mut late = rig.subscribe(&[&state]).unwrap();
        let m = next_on(&mut late, &state);
        assert!(m.retain, "MQTT {protocol}: the Will is retained");
        assert_state(&m, "offline", "connection_lost");
        // A restart announces itself again.
        rig.gateway.restart().unwrap();
        assert_state(&next_on(&mut late, &state), "online", "connected");
    }
}

#[test]
fn a_text_state_payload_is_the_bare_word_for_birth_will_and_death() {
    let mut rig = fleet_rig("heartbeat = \"0s\"\nstate_payload = \"text\"\n");
    let state = topic("state");
    let mut sub = rig.subscribe(&[&state]).unwrap();
    let word = |m: &Message| String::from_utf8_lossy(&m.payload).into_owned();
    let birth = next_on(&mut sub, &state);
    assert_eq!((word(&birth).as_str(), birth.retain), ("online", true));
    rig.gateway.kill9().unwrap();
    assert_eq!(word(&next_on(&mut sub, &state)), "offline", "the Will");
    rig.gateway.restart().unwrap();
    assert_eq!(word(&next_on(&mut sub, &state)), "online");
    assert!(rig.gateway.stop().unwrap().success());
    assert_eq!(word(&next_on(&mut sub, &state)), "offline", "the death");
    let mut late = rig.subscribe(&[&state]).unwrap();
    let m = next_on(&mut late, &state);
    assert_eq!((word(&m).as_str(), m.retain), ("offline", true));
}

#[test]
fn heartbeats_move_with_real_traffic() {
    let rig = Rig::start_with(|c| {
        c.with_fleet("heartbeat = \"1s\"\n");
        c.with_admin()?;
        Ok(())
    })
    .unwrap();
    let status = topic("status");
    let mut sub = rig.subscribe(&[&status]).unwrap();
    let first = next_on(&mut sub, &status);
    assert_eq!(first.qos, 0, "heartbeats are QoS 0");
    assert!(!first.retain, "heartbeats are not retained");
    let v = json(&first);
    assert_eq!(v["upstream"], "local");
    assert_eq!(v["interval_secs"], 1);
    assert_eq!(v["upstreams"][0]["name"], "local");
    assert!(v["spool"]["disk_free_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["sessions"]["mqtt-sn"].is_object(), "{v}");

    let mut c = rig.connected("hb-1").unwrap();
    let id = c.register("sensors/hb").unwrap();
    const N: u64 = 12;
    for i in 0..N {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    // The windows add up to the traffic: every message in and out, once.
    let (mut got_in, mut got_out) = (0, 0);
    let mut last = Value::Null;
    let deadline = Instant::now() + WAIT;
    while (got_in < N || got_out < N) && Instant::now() < deadline {
        let v = json(&next_on(&mut sub, &status));
        got_in += v["messages"]["in"].as_u64().unwrap();
        got_out += v["messages"]["out"].as_u64().unwrap();
        last = v;
    }
    assert_eq!((got_in, got_out), (N, N), "last heartbeat: {last}");
    assert_eq!(last["sessions"]["mqtt-sn"]["active"], 1, "{last}");
    // The cursor follows the acknowledgements (the drain moves it just after counting them):
    // all N records (ids 1..=N) acknowledged, nothing waiting.
    let mut v = last;
    while v["upstreams"][0]["cursor"] != N + 1 && Instant::now() < deadline {
        v = json(&next_on(&mut sub, &status));
    }
    assert_eq!(v["upstreams"][0]["cursor"], N + 1, "{v}");
    assert_eq!(v["spool"]["next_seq"], N + 1, "{v}");
    assert_eq!(v["upstreams"][0]["backlog"]["records"], 0, "{v}");
    assert!(v["uptime_secs"].as_u64().is_some());
    // /metrics counts the heartbeats this subscriber saw (each counted once handed over).
    let seen = v["fleet"]["heartbeats_sent"].as_u64().unwrap() + 1;
    let sent = poll_until(
        "heartbeats counted",
        WAIT,
        Duration::from_millis(50),
        || {
            let (_, text) = rig.gateway.admin_get("/metrics")?;
            let sent = metric(
                &text,
                "sensorgate_fleet_heartbeats_total",
                &[("outcome", "sent")],
            );
            Ok(sent.filter(|&n| n >= seen as f64))
        },
    )
    .unwrap();
    assert!(sent >= seen as f64);
    // /status says where the fleet view publishes, with the same counters.
    let (_, status) = rig.gateway.admin_get("/status").unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    let fleet = &status["fleet"];
    assert_eq!(fleet["topic_prefix"], "sensorgate/7", "{status}");
    assert_eq!(fleet["heartbeat_secs"], 1);
    assert_eq!(fleet["replay"], true);
    assert!(fleet["counts"]["heartbeats_sent"].as_u64().unwrap() >= seen);
}

#[test]
fn heartbeat_0s_sends_none() {
    let rig = fleet_rig("heartbeat = \"0s\"\n");
    let mut sub = rig.subscribe(&[&topic("status"), "marker/#"]).unwrap();
    // The birth says the link is up; then three would-be heartbeat periods of silence, then a
    // marker: it must be the first thing seen.
    let mut state = rig.subscribe(&[&topic("state")]).unwrap();
    next_on(&mut state, &topic("state"));
    std::thread::sleep(Duration::from_secs(3));
    publish_upstream(rig.broker.port(), &[UpMsg::new("marker/x", b"m", 1)]).unwrap();
    let m = sub.next(WAIT).unwrap().expect("the marker");
    assert_eq!(
        m.topic, "marker/x",
        "a heartbeat came with heartbeat = \"0s\""
    );
}

#[test]
fn an_upstream_outage_is_reported_on_the_other_with_its_duration() {
    let mut other = Mosquitto::start().unwrap();
    let rig = Rig::start_with(|c| {
        c.with_fleet("heartbeat = \"0s\"\n");
        c.with_admin()?;
        c.extra_sections.push_str(&format!(
            "\n[[upstream]]\nname = \"cloud\"\nkind = \"mqtt\"\nurl = \"{}\"\nprotocol = \"5\"\n\
             backoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\n",
            other.url()
        ));
        Ok(())
    })
    .unwrap();
    let events = topic("events");
    let mut sub = rig.subscribe(&[&events]).unwrap();
    // The monitor saw the second upstream up (its event is in /status; it may have gone
    // out before the subscriber came).
    poll_until(
        "cloud up in /status",
        WAIT,
        Duration::from_millis(100),
        || {
            let (_, body) = rig.gateway.admin_get("/status")?;
            let doc: Value = serde_json::from_str(&body)?;
            Ok(doc["events"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["kind"] == "upstream_up" && e["upstream"] == "cloud")
                .then_some(()))
        },
    )
    .unwrap();
    let event_of = |sub: &mut Subscriber, kind: &str| loop {
        let m = next_on(sub, &events);
        assert_eq!(m.qos, 1, "events at [fleet] qos");
        let v = json(&m);
        if v["kind"] == kind && v["upstream"] == "cloud" {
            break v;
        }
    };

    other.stop().unwrap();
    let down_at = Instant::now();
    let down = event_of(&mut sub, "upstream_down");
    assert_eq!(down["upstream"], "cloud", "{down}");
    assert_eq!(down["level"], "warning", "{down}");
    assert_eq!(down["gateway_id"], GATEWAY_ID, "{down}");
    assert!(down["duration_secs"].is_u64(), "time it was up: {down}");
    std::thread::sleep(Duration::from_secs(3));
    other.restart().unwrap();
    let up = event_of(&mut sub, "upstream_up");
    let outage = down_at.elapsed().as_secs();
    assert_eq!(up["upstream"], "cloud", "{up}");
    let secs = up["duration_secs"].as_u64().unwrap();
    assert!(
        (2..=outage + 1).contains(&secs),
        "down for {secs}s, the outage lasted about {outage}s: {up}"
    );
    assert!(up["message"].as_str().unwrap().contains("down"), "{up}");
}

/// pika: consumes up to `count` messages from `queue` (bound to `sensorgate.7.state`).
fn amqp_get(rabbit: &RabbitMq, queue: &str, count: usize) -> Vec<Value> {
    let port = rabbit.port().to_string();
    let n = count.to_string();
    let s = Script::python(
        "amqp_obs.py",
        &[
            "get",
            "--port",
            &port,
            "--queue",
            queue,
            "--count",
            &n,
            "--timeout",
            "30",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<_>>(),
    )
    .unwrap();
    let got = (0..count)
        .map(|i| {
            let l = s
                .expect_line(&format!("message {i}"), WAIT, |l| l.starts_with('{'))
                .unwrap();
            serde_json::from_str(&l).unwrap()
        })
        .collect();
    // Its acknowledgements are sent before DONE; killed earlier, the broker would redeliver.
    s.expect_line("DONE", WAIT, |l| l == "DONE").unwrap();
    got
}

fn body(v: &Value) -> Value {
    let hex = v["body_hex"].as_str().unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn amqp_birth_on_connect_and_death_on_sigterm() {
    let rabbit = RabbitMq::start().unwrap();
    let key = format!("sensorgate.{GATEWAY_ID}.state");
    let declare = Script::python(
        "amqp_obs.py",
        &[
            "declare",
            "--port",
            &rabbit.port().to_string(),
            "--queue",
            "fleet-state",
            "--binding",
            &key,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<_>>(),
    )
    .unwrap();
    declare
        .expect_line("READY", WAIT, |l| l == "READY")
        .unwrap();
    let mut rig = Rig::start_with(|c| {
        c.with_fleet("heartbeat = \"0s\"\n");
        c.extra_sections.push_str(&format!(
            "\n[[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\nurl = \"{}\"\n\
             exchange = \"amq.topic\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n",
            rabbit.url()
        ));
        Ok(())
    })
    .unwrap();
    let birth = amqp_get(&rabbit, "fleet-state", 1).remove(0);
    assert_eq!(birth["routing_key"], key.as_str());
    assert_eq!(birth["headers"]["sg-retain"], true, "{birth}");
    let b = body(&birth);
    assert_eq!(
        (b["state"].as_str(), b["reason"].as_str()),
        (Some("online"), Some("connected"))
    );
    assert_eq!(b["upstream"], "cloud");
    assert_eq!(b["gateway_id"], GATEWAY_ID);
    // The broker shows the connection under the state topic's name.
    let names = rabbit
        .ctl(&[
            "list_connections",
            "--no-table-headers",
            "client_properties",
        ])
        .unwrap();
    assert!(names.contains(&topic("state")), "{names}");

    assert!(rig.gateway.stop().unwrap().success());
    let death = amqp_get(&rabbit, "fleet-state", 1).remove(0);
    let d = body(&death);
    assert_eq!(
        (d["state"].as_str(), d["reason"].as_str()),
        (Some("offline"), Some("shutdown"))
    );
    assert_eq!(d["upstream"], "cloud");
}

#[test]
fn real_payloads_match_their_json_schemas() {
    let mut rig = fleet_rig("heartbeat = \"1s\"\n");
    let (state, status, events) = (topic("state"), topic("status"), topic("events"));
    let mut sub = rig.subscribe(&[&topic("#")]).unwrap();
    let birth = next_on(&mut sub, &state);
    let mut c = rig.connected("schema-1").unwrap();
    let id = c.register("sensors/schema").unwrap();
    c.publish_qos1_ok(TopicType::Normal, id, b"x").unwrap();
    let beat = next_on(&mut sub, &status);
    // A reload is an event (`config_reloaded`).
    send_signal(rig.gateway.pid().unwrap(), "HUP").unwrap();
    let event = loop {
        let m = next_on(&mut sub, &events);
        if json(&m)["kind"] == "config_reloaded" {
            break m;
        }
    };
    assert!(rig.gateway.stop().unwrap().success());
    let death = loop {
        let m = next_on(&mut sub, &state);
        if json(&m)["state"] == "offline" {
            break m;
        }
    };
    for (schema, docs) in [
        ("state.json", vec![&birth.payload[..], &death.payload[..]]),
        ("status.json", vec![&beat.payload[..]]),
        ("event.json", vec![&event.payload[..]]),
    ] {
        let (ok, out) = validate_json_schema(schema, &docs).unwrap();
        assert!(ok, "{schema}: {out}");
        assert_eq!(out.matches("OK ").count(), docs.len(), "{out}");
    }
    // The validator can fail: a state that is neither online nor offline, a heartbeat without
    // its cursor.
    let (ok, out) = validate_json_schema(
        "state.json",
        &[br#"{"state":"maybe","reason":"connected","gateway_id":7,"gateway_name":"g","version":"1","started_ms":1,"upstream":"u"}"#],
    )
    .unwrap();
    assert!(!ok && out.contains("INVALID"), "{out}");
    let mut v = json(&beat);
    v["upstreams"][0].as_object_mut().unwrap().remove("cursor");
    let (ok, out) =
        validate_json_schema("status.json", &[&serde_json::to_vec(&v).unwrap()]).unwrap();
    assert!(!ok && out.contains("cursor"), "{out}");
}

#[test]
fn amqp_crash_is_seen_on_the_event_exchange_under_the_state_topic() {
    let rabbit = RabbitMq::start_with_plugins(&["rabbitmq_event_exchange"]).unwrap();
    let watch = Script::python(
        "amqp_events.py",
        &["--port".to_owned(), rabbit.port().to_string()],
    )
    .unwrap();
    watch.expect_line("READY", WAIT, |l| l == "READY").unwrap();
    let mut rig = Rig::start_with(|c| {
        c.with_fleet("heartbeat = \"0s\"\n");
        c.extra_sections.push_str(&format!(
            "\n[[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\nurl = \"{}\"\n\
             exchange = \"amq.topic\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n",
            rabbit.url()
        ));
        Ok(())
    })
    .unwrap();
    // Connected: the broker lists the connection under the state topic's name.
    poll_until(
        "the AMQP connection",
        WAIT,
        Duration::from_millis(200),
        || {
            let names = rabbit.ctl(&[
                "list_connections",
                "--no-table-headers",
                "client_properties",
            ])?;
            Ok(names.contains(&topic("state")).then_some(()))
        },
    )
    .unwrap();
    rig.gateway.kill9().unwrap();
    let closed = watch
        .expect_line("connection.closed of the gateway", WAIT, |l| {
            l.starts_with('{') && l.contains(&topic("state"))
        })
        .unwrap();
    let v: Value = serde_json::from_str(&closed).unwrap();
    assert_eq!(v["routing_key"], "connection.closed", "{v}");
    assert_eq!(v["headers"]["user_provided_name"], topic("state"), "{v}");
}

#[test]
fn a_reload_that_reconnects_keeps_the_will_and_fleet_changes_wait_for_a_restart() {
    let mut rig = Rig::start_with(|c| {
        c.with_fleet("heartbeat = \"0s\"\n");
        c.with_admin()?;
        Ok(())
    })
    .unwrap();
    let state = topic("state");
    let mut sub = rig.subscribe(&[&state]).unwrap();
    assert_state(&next_on(&mut sub, &state), "online", "connected");
    let path = rig.gateway.config_path();
    let reload = |rig: &Rig, count: u64| -> Value {
        send_signal(rig.gateway.pid().unwrap(), "HUP").unwrap();
        poll_until("the reload", WAIT, Duration::from_millis(100), || {
            let (_, body) = rig.gateway.admin_get("/status")?;
            let doc: Value = serde_json::from_str(&body)?;
            Ok((doc["reload"]["count"] == count).then(|| doc["reload"].clone()))
        })
        .unwrap()
    };
    // A connection setting of the upstream: it reconnects, and says so with a new birth.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}keep_alive = \"20s\"\n")).unwrap();
    let r = reload(&rig, 1);
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_state(&next_on(&mut sub, &state), "online", "connected");
    // `[fleet]` is restart-only: reported, not applied.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "[fleet]\nenabled = true\n",
            "[fleet]\nenabled = true\nqos = 0\n",
        ),
    )
    .unwrap();
    let r = reload(&rig, 2);
    assert_eq!(r["restart_required"], serde_json::json!(["[fleet]"]), "{r}");
    // The new connection carries the Will still.
    rig.gateway.kill9().unwrap();
    let m = next_on(&mut sub, &state);
    assert_state(&m, "offline", "connection_lost");
}

#[test]
fn after_an_outage_the_birth_precedes_the_spooled_records() {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let state = topic("state");
    let mut sub =
        Subscriber::start_session(broker.port(), &[&state, "sensors/#"], "fleet-order").unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    cfg.with_fleet("heartbeat = \"0s\"\n");
    let gateway = Gateway::start(&cfg).unwrap();
    assert_state(&next_on(&mut sub, &state), "online", "connected");

    broker.stop().unwrap();
    let mut c = SnClient::new(gateway.sn_addr()).unwrap();
    c.connect_ok("fleet-order-1").unwrap();
    let id = c.register("sensors/order").unwrap();
    const N: usize = 5;
    for i in 0..N {
        // Acknowledged once durable in the spool: the broker is away.
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    broker.restart().unwrap();
    // mosquitto publishes the Will of the connection its own shutdown cut (to the subscriber,
    // and again from the saved session when that delivery was not acknowledged): it comes
    // first, then what the gateway sent on its new connection.
    let mut first = sub.next(WAIT).unwrap().expect("the Will or the birth");
    while first.topic == state && json(&first)["reason"] == "connection_lost" {
        first = sub.next(WAIT).unwrap().expect("the birth");
    }
    let got: Vec<Message> = std::iter::once(first)
        .chain((0..N).map(|_| sub.next(WAIT).unwrap().expect("the records")))
        .collect();
    assert_eq!(got[0].topic, state, "the birth first: {got:?}");
    assert_state(&got[0], "online", "connected");
    for (i, m) in got[1..].iter().enumerate() {
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice()),
            ("sensors/order", format!("m{i}").as_bytes()),
            "{got:?}"
        );
    }
}
