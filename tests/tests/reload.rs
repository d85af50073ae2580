//! Live reload (SIGHUP): a good config applies what can change live without dropping sensor
//! sessions; a bad one is kept out, every error logged with file, line and column; keys only a
//! restart applies are reported, not applied. The outcome is read from `/status`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::notify::NotifySocket;
use sensorgate_tests::sn::{self, Qos, TopicType};
use sensorgate_tests::{
    Gateway, GatewayConfig, LaunchOptions, Mosquitto, Rig, Subscriber, poll_until, send_signal,
};
use serde_json::Value;

/// Generous bound for a reload to show in `/status`.
const WAIT: Duration = Duration::from_secs(20);

/// A rig with the admin listener on (the reload outcome is in `/status`).
fn rig(edit: impl FnOnce(&mut GatewayConfig)) -> Rig {
    Rig::start_with(|c| {
        c.with_admin()?;
        edit(c);
        Ok(())
    })
    .unwrap()
}

/// Rewrites the running gateway's config file with `edit` applied to its text.
fn rewrite(rig: &Rig, edit: impl FnOnce(String) -> String) {
    let path = rig.gateway.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
}

/// Sends SIGHUP and waits for reload number `count` in `/status`; returns its `reload` object.
fn reload(rig: &Rig, count: u64) -> Value {
    send_signal(rig.gateway.pid().unwrap(), "HUP").unwrap();
    poll_until(
        "the reload in /status",
        WAIT,
        Duration::from_millis(50),
        || {
            let (code, body) = rig.gateway.admin_get("/status")?;
            if code != 200 {
                return Ok(None);
            }
            let doc: Value = serde_json::from_str(&body)?;
            Ok(doc
                .get("reload")
                .filter(|r| r["count"].as_u64() == Some(count))
                .cloned())
        },
    )
    .unwrap()
}

/// Publishes at QoS 1 on `client`'s registered `topic_id` and checks the PUBACK's code.
fn publish_rc(c: &mut sensorgate_tests::SnClient, topic_id: u16, payload: &[u8]) -> u8 {
    let msg_id = c
        .publish(Qos::One, TopicType::Normal, topic_id, false, payload)
        .unwrap();
    match c.next_packet().unwrap() {
        sn::Packet::Puback { msg_id: m, rc, .. } if m == msg_id => rc,
        other => panic!("expected a PUBACK, got {other:?}"),
    }
}

#[test]
fn a_bad_config_is_kept_out_every_error_is_logged_and_sensors_are_served_on() {
    let rig = rig(|_| {});
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("hup-bad").unwrap();
    let id = c.register("sensors/hup/bad").unwrap();

    // Two errors in two sections; the running config stays.
    let good = std::fs::read_to_string(rig.gateway.config_path()).unwrap();
    rewrite(&rig, |t| {
        t.replace("[log]\n", "[log]\nbogus_key = 1\n")
            .replace("max_clients = 100000", "max_clients = \"many\"")
    });
    let r = reload(&rig, 1);
    assert_eq!(r["outcome"], "rejected", "{r}");
    let errors: Vec<&str> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    let file = rig.gateway.config_path().display().to_string();
    for e in &errors {
        // file:line:column: error: ...
        let rest = e
            .strip_prefix(&format!("{file}:"))
            .unwrap_or_else(|| panic!("{e}"));
        let mut parts = rest.splitn(3, ':');
        let line: usize = parts.next().unwrap().parse().unwrap();
        let column: usize = parts.next().unwrap().parse().unwrap();
        assert!(line > 0 && column > 0, "{e}");
    }
    assert!(errors.iter().any(|e| e.contains("bogus_key")), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("max_clients")),
        "{errors:?}"
    );
    let log = rig.gateway.log();
    for e in &errors {
        let first_line = e.lines().next().unwrap();
        assert!(log.contains(first_line), "not logged: {first_line}\n{log}");
    }

    // The session was not touched and is served as before.
    assert_eq!(publish_rc(&mut c, id, b"after"), sn::RC_ACCEPTED);
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/hup/bad", &b"after"[..])
    );
    // And `sensorgate status` shows the refusal (it reads the admin address from the file:
    // with the file fixed, not reloaded yet).
    std::fs::write(rig.gateway.config_path(), good).unwrap();
    let out = sensorgate_tests::sensorgate_status(&rig.gateway.config_path(), &[]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Last reload: rejected"), "{text}");
}

#[test]
fn restart_only_keys_are_reported_and_not_applied() {
    let rig = rig(|_| {});
    let mut c = rig.connected("hup-restart").unwrap();
    let id = c.register("sensors/hup/restart").unwrap();
    let old = rig.gateway.sn_addr().to_string();
    // Another port for the MQTT-SN listener, and the spool's size.
    rewrite(&rig, |t| {
        t.replace(&old, "127.0.0.1:1") + "\n[spool]\nmax_bytes = \"10MiB\"\n"
    });
    let r = reload(&rig, 1);
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(
        r["restart_required"],
        serde_json::json!(["[mqttsn] listen", "[spool]"]),
        "{r}"
    );
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .contains("restart needed for [mqttsn] listen, [spool]"),
        "{r}"
    );
    // Still listening where it was, with the same session.
    assert_eq!(publish_rc(&mut c, id, b"x"), sn::RC_ACCEPTED);
    let log = rig.gateway.log();
    assert!(
        log.contains("only a restart applies it") && log.contains("[mqttsn] listen"),
        "{log}"
    );
}

#[test]
fn a_route_change_takes_effect_for_the_sessions_already_connected() {
    // Only `a/#` goes upstream at first.
    let rig = rig(|c| {
        c.extra_sections = "\n[[route]]\nfilter = \"a/#\"\nupstreams = [\"local\"]\n".into();
    });
    let mut sub = rig.subscribe(&["a/#", "b/#"]).unwrap();
    let mut c = rig.connected("hup-route").unwrap();
    let a = c.register("a/1").unwrap();
    let b = c.register("b/1").unwrap();
    assert_eq!(publish_rc(&mut c, a, b"a-before"), sn::RC_ACCEPTED);
    assert_ne!(
        publish_rc(&mut c, b, b"b-before"),
        sn::RC_ACCEPTED,
        "no route takes b/1 yet"
    );
    // A sensor subscription no route maps upstream yet.
    c.subscribe_ok(Qos::Zero, sn::SubTopic::Name("cmd/hup-route/#"))
        .unwrap();

    rewrite(&rig, |t| t.replace("filter = \"a/#\"", "filter = \"#\""));
    let r = reload(&rig, 1);
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(r["applied"], serde_json::json!(["[[route]]"]), "{r}");

    // The same session, not reconnected: b/1 now goes through.
    assert_eq!(publish_rc(&mut c, b, b"b-after"), sn::RC_ACCEPTED);
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("a/1", &b"a-before"[..])
    );
    let m = sub.expect().unwrap();
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("b/1", &b"b-after"[..]));
    // And its subscription was made upstream by the reload: downlink arrives.
    sensorgate_tests::await_live(&mut c, rig.broker.port(), "cmd/hup-route/probe").unwrap();
}

#[test]
fn predefined_topics_and_limits_change_live_and_sessions_survive() {
    let rig = rig(|_| {});
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("hup-pre").unwrap();
    let publish_predefined = |c: &mut sensorgate_tests::SnClient, id: u16, payload: &[u8]| {
        let msg_id = c
            .publish(Qos::One, TopicType::Predefined, id, false, payload)
            .unwrap();
        match c.next_packet().unwrap() {
            sn::Packet::Puback { msg_id: m, rc, .. } if m == msg_id => rc,
            other => panic!("expected a PUBACK, got {other:?}"),
        }
    };
    assert_eq!(
        publish_predefined(&mut c, 9, b"before"),
        sn::RC_INVALID_TOPIC
    );

    // Topic id 9 is defined; at most one client from now on (one is connected).
    rewrite(&rig, |t| {
        t.replace("max_clients = 100000", "max_clients = 1")
            + "\n[[mqttsn.predefined_topic]]\nid = 9\ntopic = \"sensors/pre/9\"\nclients = [\"*\"]\n"
    });
    let r = reload(&rig, 1);
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(r["applied"], serde_json::json!(["[mqttsn]"]), "{r}");

    // The session is the same one: no CONNECT since.
    assert_eq!(publish_predefined(&mut c, 9, b"after"), sn::RC_ACCEPTED);
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("sensors/pre/9", &b"after"[..])
    );
    // The lowered limit applies to the next CONNECT.
    let mut other = rig.client().unwrap();
    assert_eq!(other.connect("hup-pre-2").unwrap(), sn::RC_CONGESTION);
}

#[test]
fn systemd_hears_reloading_then_ready_with_the_outcome_and_status_keeps_it() {
    let broker = Mosquitto::start().unwrap();
    let mut notify = NotifySocket::start().unwrap();
    let mut config = GatewayConfig::new(broker.port()).unwrap();
    config.log_level = "info".into();
    let gw = Gateway::start_with(
        &config,
        LaunchOptions {
            env: notify.env(),
            watchdog_pid: false,
            no_wait: true,
        },
    )
    .unwrap();
    notify
        .expect("READY=1", WAIT, |n| n.has("READY", "1"))
        .unwrap();
    let path = gw.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("level = \"info\"", "level = \"debug\"")).unwrap();
    send_signal(gw.pid().unwrap(), "HUP").unwrap();
    let reloading = notify
        .expect("RELOADING=1", WAIT, |n| n.has("RELOADING", "1"))
        .unwrap();
    assert!(
        reloading.get("MONOTONIC_USEC").is_some(),
        "{}",
        reloading.text
    );
    let ready = notify
        .expect("READY=1 after the reload", WAIT, |n| n.has("READY", "1"))
        .unwrap();
    assert_eq!(
        ready.get("STATUS"),
        Some("reload #1: applied [log] level"),
        "{}",
        ready.text
    );
    // The periodic STATUS= line ends with the outcome too.
    let status = notify
        .expect("a STATUS= line with the reload", WAIT, |n| {
            n.get("STATUS")
                .is_some_and(|s| s.starts_with("serving:") && s.ends_with("applied [log] level"))
        })
        .unwrap();
    assert!(status.text.contains("upstreams local"), "{}", status.text);
}

#[test]
fn a_lower_log_level_shows_debug_lines_from_then_on() {
    let rig = rig(|c| c.log_level = "info".into());
    let c = rig.client().unwrap();
    // A malformed datagram is logged at debug only.
    let garbage = [0x03, 0xff, 0x00];
    c.send(&garbage).unwrap();
    // Served on: the next client is answered (the datagram above was handled before it).
    let probe = rig.connected("hup-log-1").unwrap();
    probe.ping().unwrap();
    assert!(
        !rig.gateway.log().contains("Malformed datagram dropped"),
        "debug line at info"
    );
    rewrite(&rig, |t| t.replace("level = \"info\"", "level = \"debug\""));
    let r = reload(&rig, 1);
    assert_eq!(r["applied"], serde_json::json!(["[log] level"]), "{r}");
    c.send(&garbage).unwrap();
    poll_until("the debug line", WAIT, Duration::from_millis(50), || {
        Ok(rig
            .gateway
            .log()
            .contains("Malformed datagram dropped")
            .then_some(()))
    })
    .unwrap();
}

#[test]
fn an_upstream_url_change_moves_the_link_and_messages_follow_it() {
    let rig = rig(|_| {});
    let second = Mosquitto::start().unwrap();
    let mut first_sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut second_sub = Subscriber::start(second.port(), &["sensors/#"]).unwrap();
    let mut c = rig.connected("hup-url").unwrap();
    let id = c.register("sensors/hup/url").unwrap();
    assert_eq!(publish_rc(&mut c, id, b"to-first"), sn::RC_ACCEPTED);
    assert_eq!(first_sub.expect().unwrap().payload, b"to-first");

    let old = format!("mqtt://127.0.0.1:{}", rig.broker.port());
    let new = format!("mqtt://127.0.0.1:{}", second.port());
    rewrite(&rig, |t| t.replace(&old, &new));
    let r = reload(&rig, 1);
    assert_eq!(
        r["applied"],
        serde_json::json!(["[[upstream]] local"]),
        "{r}"
    );
    assert!(
        r["notes"]
            .to_string()
            .contains("reconnecting with the new settings"),
        "{r}"
    );
    // The same session publishes on; the message reaches the second broker.
    assert_eq!(publish_rc(&mut c, id, b"to-second"), sn::RC_ACCEPTED);
    assert_eq!(second_sub.expect().unwrap().payload, b"to-second");
}
