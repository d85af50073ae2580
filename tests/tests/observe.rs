//! The admin listener against real traffic: `/metrics` parsed by the Prometheus project's
//! Python parser (both exposition formats) and checked to move with MQTT-SN publishes from
//! the PyPI mqtt-sn-12 client; a broker stopped (connected goes to 0, the backlog grows, the
//! gateway stays ready but degraded) and restarted (the backlog drains to 0); `/status`,
//! `/clients`, `/healthz`, `/readyz`, the bearer token and bad requests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use sensorgate_tests::sn::{Qos, SubTopic, TopicType};
use sensorgate_tests::{
    Rig, Script, admin_get, free_tcp_port, mqtt_sn_pub, poll_until, py_script, python, run_bounded,
};
use serde_json::Value;

/// Bound on waiting for a change to show (link loss noticed, a backlog drained).
const WAIT: Duration = Duration::from_secs(30);
const EVERY: Duration = Duration::from_millis(200);

/// A rig whose gateway has its admin listener on a free port (with `token`, if any).
fn rig(token: Option<&str>) -> Rig {
    Rig::start_with(|c| {
        c.admin = Some(free_tcp_port()?);
        c.admin_token = token.map(str::to_owned);
        Ok(())
    })
    .unwrap()
}

fn admin(rig: &Rig) -> SocketAddr {
    rig.gateway
        .admin_addr()
        .expect("the admin listener is configured")
}

/// `/metrics` parsed by prometheus_client: sample (`name{labels}`) -> value.
fn scrape(addr: SocketAddr, format: &str, token: Option<&str>) -> BTreeMap<String, Value> {
    let mut cmd = Command::new(python());
    cmd.arg(py_script("scrape.py")).args([
        "--url",
        &format!("http://{addr}/metrics"),
        "--format",
        format,
    ]);
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(30)).unwrap();
    assert!(
        out.status.success(),
        "scrape.py ({format}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn num(m: &BTreeMap<String, Value>, key: &str) -> f64 {
    m.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no sample {key} in {:?}", m.keys().collect::<Vec<_>>()))
}

const UP: &str = r#"{kind="mqtt",upstream="local"}"#;

fn metric(addr: SocketAddr, key: &str) -> f64 {
    num(&scrape(addr, "openmetrics", None), key)
}

fn status(addr: SocketAddr) -> Value {
    let (code, body) = admin_get(addr, "/status", None).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Publishes `n` QoS 1 messages with the mqtt-sn-12 CLI (each waits for its PUBACK).
fn publish_qos1(rig: &Rig, topic: &str, n: usize) {
    for i in 0..n {
        let out = mqtt_sn_pub(
            rig.gateway.sn_addr(),
            &[
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                &format!("reading-{i}"),
                "-i",
                "obs-pub",
            ],
        )
        .unwrap();
        assert!(
            out.status.success(),
            "mqtt_sn_pub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn metrics_follow_publishes_an_outage_and_the_recovery() {
    let mut rig = rig(None);
    let addr = admin(&rig);
    // Both formats parse; the types are what the names say.
    let text = scrape(addr, "text", None);
    let om = scrape(addr, "openmetrics", None);
    let types = om["__types__"].as_object().unwrap();
    assert_eq!(types["sensorgate_messages_in"], "counter");
    assert_eq!(
        types["sensorgate_spool_fsync_duration_seconds"],
        "histogram"
    );
    assert_eq!(types["sensorgate_upstream_connected"], "gauge");
    assert_eq!(
        num(
            &text,
            "sensorgate_build_info{profile=\"debug\",version=\"0.1.0\"}"
        ),
        1.0
    );
    assert!(num(&om, "process_open_fds") > 3.0);
    assert!(num(&om, "process_resident_memory_bytes") > 1e6);
    let up = poll_until("the upstream connected", WAIT, EVERY, || {
        Ok((metric(addr, &format!("sensorgate_upstream_connected{UP}")) == 1.0).then_some(()))
    });
    up.unwrap();

    let before = scrape(addr, "openmetrics", None);
    let q1 = r#"sensorgate_messages_in_total{protocol="mqtt-sn",qos="1"}"#;
    let acks = r#"sensorgate_acks_total{protocol="mqtt-sn"}"#;
    publish_qos1(&rig, "obs/t", 5);
    let after = poll_until("5 messages forwarded", WAIT, EVERY, || {
        let m = scrape(addr, "openmetrics", None);
        let fwd = format!("sensorgate_upstream_forwarded_total{UP}");
        Ok((num(&m, &fwd) >= num(&before, &fwd) + 5.0).then_some(m))
    })
    .unwrap();
    assert_eq!(num(&after, q1) - num(&before, q1), 5.0);
    assert_eq!(num(&after, acks) - num(&before, acks), 5.0);
    assert!(
        num(&after, "sensorgate_spool_appends_total")
            >= num(&before, "sensorgate_spool_appends_total") + 5.0
    );
    assert!(num(&after, "sensorgate_spool_fsyncs_total") >= 1.0);
    assert!(num(&after, "sensorgate_spool_fsync_duration_seconds_count") >= 1.0);
    assert!(
        num(
            &after,
            &format!("sensorgate_upstream_ack_duration_seconds_count{UP}")
        ) >= 5.0
    );
    assert_eq!(
        num(&after, &format!("sensorgate_upstream_backlog_records{UP}")),
        0.0
    );
    // The MQTT client's own counters, per event.
    let acked =
        r#"sensorgate_upstream_events_total{event="acknowledged",kind="mqtt",upstream="local"}"#;
    assert!(num(&after, acked) - num(&before, acked) >= 5.0);
    // The clients' sessions ended with their DISCONNECT.
    assert_eq!(
        num(
            &after,
            r#"sensorgate_sessions{protocol="mqtt-sn",state="active"}"#
        ),
        0.0
    );

    // The broker goes away: the link is seen down, publishes are still acknowledged (spooled),
    // the backlog grows, and the gateway is degraded but ready.
    rig.broker.stop().unwrap();
    poll_until("the link seen down", WAIT, EVERY, || {
        Ok((metric(addr, &format!("sensorgate_upstream_connected{UP}")) == 0.0).then_some(()))
    })
    .unwrap();
    publish_qos1(&rig, "obs/t", 3);
    let down = scrape(addr, "openmetrics", None);
    assert!(num(&down, &format!("sensorgate_upstream_backlog_records{UP}")) >= 3.0);
    assert!(num(&down, &format!("sensorgate_upstream_backlog_bytes{UP}")) > 0.0);
    assert_eq!(num(&down, "sensorgate_ready"), 1.0);
    assert_eq!(num(&down, "sensorgate_degraded"), 1.0);
    let (code, body) = admin_get(addr, "/readyz", None).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("degraded:") && body.contains("upstream `local`"),
        "{body}"
    );
    let (code, body) = admin_get(addr, "/healthz", None).unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let doc = status(addr);
    assert_eq!(doc["health"]["state"], "degraded", "{doc}");
    let upstream = &doc["upstreams"][0];
    assert_eq!(upstream["name"], "local");
    assert_eq!(upstream["connected"], false);
    assert!(upstream["last_error"].is_string(), "{upstream}");
    assert!(
        upstream["backlog"]["records"].as_u64().unwrap() >= 3,
        "{upstream}"
    );
    // Events come from the monitor's once-a-second look at the links, so the link seen down
    // in the metrics may not be an event yet.
    poll_until("the upstream_down event", WAIT, EVERY, || {
        let doc = status(addr);
        let kinds: Vec<String> = doc["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter_map(|e| e["kind"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(
            (kinds.iter().any(|k| k == "started") && kinds.iter().any(|k| k == "upstream_down"))
                .then_some(()),
        )
    })
    .unwrap();

    // Back: the backlog drains to 0 and the gateway is healthy again.
    rig.broker.restart().unwrap();
    let drained = poll_until("the backlog drained", WAIT * 2, EVERY, || {
        let m = scrape(addr, "openmetrics", None);
        let done = num(&m, &format!("sensorgate_upstream_connected{UP}")) == 1.0
            && num(&m, &format!("sensorgate_upstream_backlog_records{UP}")) == 0.0;
        Ok(done.then_some(m))
    })
    .unwrap();
    assert!(num(&drained, &format!("sensorgate_upstream_connects_total{UP}")) >= 2.0);
    assert!(
        num(
            &drained,
            &format!("sensorgate_upstream_reconnects_total{UP}")
        ) >= 1.0
    );
    assert_eq!(
        num(&drained, &format!("sensorgate_upstream_in_flight{UP}")),
        0.0
    );
    let doc = poll_until("healthy again", WAIT, EVERY, || {
        let doc = status(addr);
        Ok((doc["health"]["state"] == "healthy").then_some(doc))
    })
    .unwrap();
    assert!(
        doc["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "upstream_up"),
        "{doc}"
    );
}

#[test]
fn clients_lists_sessions_with_state_subscriptions_and_paging() {
    let rig = rig(None);
    let addr = admin(&rig);
    // An independent client that stays connected with a subscription.
    let args: Vec<String> = [
        "--port",
        &rig.gateway.sn_addr().port().to_string(),
        "--client-id",
        "sensor-17",
        "--sub",
        "1:name:cmd/sensor-17/#",
        "--count",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sub = Script::python("sn_sub.py", &args).unwrap();
    sub.expect_line("SUBSCRIBED", WAIT, |l| l.starts_with("SUBSCRIBED"))
        .unwrap();
    // Another, which goes to sleep.
    let mut sleeper = rig.connected("sensor-18").unwrap();
    let id = sleeper.register("obs/sleep").unwrap();
    sleeper
        .publish_qos1_ok(TopicType::Normal, id, b"before-sleep")
        .unwrap();
    sleeper
        .subscribe_ok(Qos::One, SubTopic::Name("obs/down"))
        .unwrap();
    sleeper.sleep(600).unwrap();

    let (code, body) = admin_get(addr, "/clients?prefix=sensor-1", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    let clients = page["clients"].as_array().unwrap();
    let ids: Vec<&str> = clients
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sensor-17", "sensor-18"], "{body}");
    assert_eq!(page["next"], Value::Null);
    let s17 = &clients[0];
    assert_eq!(s17["protocol"], "mqtt-sn");
    assert_eq!(s17["state"], "active");
    assert!(
        s17["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{s17}"
    );
    assert_eq!(
        s17["subscriptions"][0]["filter"], "cmd/sensor-17/#",
        "{s17}"
    );
    assert_eq!(s17["keep_alive_secs"], 60);
    let s18 = &clients[1];
    assert_eq!(s18["state"], "asleep", "{s18}");
    assert_eq!(s18["keep_alive_secs"], 600, "{s18}");

    // Filter by state; page with limit=1.
    let (_, body) = admin_get(addr, "/clients?state=asleep", None).unwrap();
    let page: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = page["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sensor-18"], "{body}");
    let (_, body) = admin_get(addr, "/clients?prefix=sensor-&limit=1", None).unwrap();
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["clients"][0]["client_id"], "sensor-17", "{body}");
    assert_eq!(page["next"], "sensor-17", "{body}");
    let (_, body) = admin_get(
        addr,
        "/clients?prefix=sensor-&limit=1&after=sensor-17",
        None,
    )
    .unwrap();
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["clients"][0]["client_id"], "sensor-18", "{body}");
    assert_eq!(page["next"], Value::Null, "{body}");

    // The same sessions in /status and /metrics.
    let doc = status(addr);
    let sn = &doc["protocols"][0];
    assert_eq!(sn["protocol"], "mqtt-sn");
    assert_eq!(sn["sessions"]["active"], 1, "{sn}");
    assert_eq!(sn["sessions"]["asleep"], 1, "{sn}");
    let m = scrape(addr, "text", None);
    assert_eq!(
        num(
            &m,
            r#"sensorgate_sessions{protocol="mqtt-sn",state="asleep"}"#
        ),
        1.0
    );

    // Bad requests get a JSON error, not a crash.
    let (code, body) = admin_get(addr, "/clients?state=dreaming", None).unwrap();
    assert_eq!(code, 400, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"], "bad_state");
    let (code, _) = admin_get(addr, "/clients?limit=lots", None).unwrap();
    assert_eq!(code, 400);
    let (code, body) = admin_get(addr, "/no/such/path", None).unwrap();
    assert_eq!(code, 404, "{body}");
    drop(sub);
}

#[test]
fn a_token_guards_everything_but_the_console_page_and_healthz() {
    let token = "obs-test-token-0123456789";
    let rig = rig(Some(token));
    let addr = admin(&rig);
    for path in ["/metrics", "/status", "/clients", "/readyz"] {
        let (code, body) = admin_get(addr, path, None).unwrap();
        assert_eq!(code, 401, "{path}: {body}");
        let (code, _) = admin_get(addr, path, Some("obs-test-token-WRONG-56789")).unwrap();
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, body) = admin_get(addr, path, Some(token)).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
    }
    let (code, body) = admin_get(addr, "/", None).unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains("<html") || body.contains("<!doctype"),
        "{body}"
    );
    let (code, _) = admin_get(addr, "/healthz", None).unwrap();
    assert_eq!(code, 200);
    let m = scrape(addr, "openmetrics", Some(token));
    assert!(m.contains_key("sensorgate_uptime_seconds"));
}
