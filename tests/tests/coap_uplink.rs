//! CoAP uplink with independent clients: libcoap's `coap-client-notls` and aiocoap's
//! `aiocoap-client` PUT/POST to `/ps/{topic}` through the real binary; a paho-mqtt subscriber
//! sees each body on `{topic}` with the QoS the message type or the `qos` query gives (CON 1,
//! NON 0) and the `retain` flag; IPv4 and IPv6 listeners; 4.05 for a wrong method, 4.04 for
//! an unknown path, `/.well-known/core` listing `</ps>`; `/status`, `/metrics`,
//! `sensorgate status` and `/clients` show the `coap` ingress, its listeners and the device
//! named by its `id` query.
//!
//! libcoap exits 0 even on failure: every check reads the PDUs it prints with `-v 7`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::coap::{aiocoap, libcoap, libcoap_pdus, libcoap_responses};
use sensorgate_tests::{Message, Rig, Subscriber, free_tcp_port, poll_until, sensorgate_status};
use serde_json::Value;

fn rig() -> Rig {
    Rig::start_with(|c| {
        c.with_coap()?;
        Ok(())
    })
    .unwrap()
}

fn url(rig: &Rig, target: &str) -> String {
    let a = rig.gateway.coap_addr();
    format!("coap://{a}/{target}")
}

fn msg(topic: &str, payload: &[u8], qos: u8, retain: bool) -> Message {
    Message {
        topic: topic.into(),
        payload: payload.to_vec(),
        qos,
        retain,
    }
}

/// Asserts libcoap got exactly the response `code` (one or more times: a retransmitted
/// response is printed again) and nothing else.
#[track_caller]
fn assert_response(out: &str, code: &str) {
    let got = libcoap_responses(out);
    assert!(
        !got.is_empty() && got.iter().all(|c| c == code),
        "expected {code}, got {got:?}:\n{out}"
    );
}

#[test]
fn libcoap_con_non_and_post_reach_the_broker_with_the_type_s_qos() {
    let rig = rig();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();

    let out = libcoap(&[
        "-m",
        "put",
        "-e",
        "21.5",
        "-B",
        "5",
        &url(&rig, "ps/sensors/t1?id=dev1"),
    ])
    .unwrap();
    assert_response(&out, "2.04");
    assert_eq!(sub.expect().unwrap(), msg("sensors/t1", b"21.5", 1, false));

    // NON: QoS 0, answered with a NON 2.04 (libcoap waits for it).
    let out = libcoap(&[
        "-m",
        "put",
        "-N",
        "-e",
        "22.0",
        "-B",
        "5",
        &url(&rig, "ps/sensors/t1?id=dev1"),
    ])
    .unwrap();
    assert_response(&out, "2.04");
    assert!(
        libcoap_pdus(&out)
            .iter()
            .any(|p| p.ty == "NON" && p.code == "2.04"),
        "{out}"
    );
    assert_eq!(sub.expect().unwrap(), msg("sensors/t1", b"22.0", 0, false));

    // POST is a publish too, answered 2.04 like PUT.
    let out = libcoap(&[
        "-m",
        "post",
        "-e",
        "on",
        "-B",
        "5",
        &url(&rig, "ps/sensors/relay/2"),
    ])
    .unwrap();
    assert_response(&out, "2.04");
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/relay/2", b"on", 1, false)
    );
}

#[test]
fn qos_and_retain_queries_reach_the_broker() {
    let rig = rig();
    let mut sub = rig.subscribe(&["q/#"]).unwrap();
    for (target, qos, retain) in [
        ("ps/q/zero?qos=0&id=dev2", 0, false),
        ("ps/q/two?qos=2", 2, false),
        ("ps/q/kept?retain=true&qos=1", 1, true),
        ("ps/q/plain?retain=false", 1, false),
    ] {
        let out = libcoap(&["-m", "put", "-e", target, "-B", "5", &url(&rig, target)]).unwrap();
        assert_response(&out, "2.04");
        let topic = target
            .strip_prefix("ps/")
            .and_then(|t| t.split('?').next())
            .unwrap();
        assert_eq!(
            sub.expect().unwrap(),
            msg(topic, target.as_bytes(), qos, retain),
            "{target}"
        );
    }
    // The broker kept the retained one: a later subscriber gets it at once.
    let mut late = Subscriber::start(rig.broker.port(), &["q/kept"]).unwrap();
    let m = late.expect().unwrap();
    assert_eq!((m.topic.as_str(), m.retain), ("q/kept", true));
}

#[test]
fn ipv4_and_ipv6_listeners_both_serve() {
    let rig = Rig::start_with(|c| {
        c.with_coap_dual_stack()?;
        Ok(())
    })
    .unwrap();
    let port = rig.gateway.coap_addr().port();
    let mut sub = rig.subscribe(&["dual/#"]).unwrap();
    for (host, body) in [("127.0.0.1", "v4"), ("[::1]", "v6")] {
        let out = libcoap(&[
            "-m",
            "put",
            "-e",
            body,
            "-B",
            "5",
            &format!("coap://{host}:{port}/ps/dual/t"),
        ])
        .unwrap();
        assert_response(&out, "2.04");
        assert_eq!(
            sub.expect().unwrap(),
            msg("dual/t", body.as_bytes(), 1, false)
        );
    }
}

#[test]
fn aiocoap_con_and_non_put_reach_the_broker() {
    let rig = rig();
    let mut sub = rig.subscribe(&["aio/#"]).unwrap();
    let (_, out) = aiocoap(&[
        "-v",
        "-m",
        "PUT",
        "--payload",
        "21.5",
        &url(&rig, "ps/aio/t1?id=aio1"),
    ])
    .unwrap();
    assert!(out.contains("2.04 Changed"), "{out}");
    assert_eq!(sub.expect().unwrap(), msg("aio/t1", b"21.5", 1, false));

    let (_, out) = aiocoap(&[
        "-v",
        "--non",
        "-m",
        "PUT",
        "--payload",
        "22.5",
        &url(&rig, "ps/aio/t1?id=aio1"),
    ])
    .unwrap();
    assert!(out.contains("2.04 Changed"), "{out}");
    assert_eq!(sub.expect().unwrap(), msg("aio/t1", b"22.5", 0, false));
}

#[test]
fn wrong_method_unknown_path_and_well_known_core() {
    let rig = rig();
    let out = libcoap(&["-m", "delete", "-B", "5", &url(&rig, "ps/sensors/t1")]).unwrap();
    assert_response(&out, "4.05");
    let out = libcoap(&["-m", "put", "-e", "x", "-B", "5", &url(&rig, "nope/t1")]).unwrap();
    assert_response(&out, "4.04");
    let (_, out) = aiocoap(&["-m", "PUT", "--payload", "x", &url(&rig, "other")]).unwrap();
    assert!(out.contains("4.04"), "{out}");

    let out = libcoap(&["-m", "get", "-B", "5", &url(&rig, ".well-known/core")]).unwrap();
    assert_response(&out, "2.05");
    let pdu = libcoap_pdus(&out)
        .into_iter()
        .find(|p| p.code == "2.05")
        .unwrap();
    assert!(pdu.line.contains("</ps>"), "{out}");
    // Content-Format 40 (application/link-format).
    assert!(
        pdu.line.contains("Content-Format:application/link-format")
            || pdu.line.contains("Content-Format:40"),
        "{out}"
    );
}

#[test]
fn status_lists_the_coap_ingress_and_its_listeners_and_clients_the_device() {
    let rig = Rig::start_with(|c| {
        c.with_coap_dual_stack()?;
        c.admin = Some(free_tcp_port()?);
        Ok(())
    })
    .unwrap();
    let mut sub = rig.subscribe(&["adm/#"]).unwrap();
    let out = libcoap(&[
        "-m",
        "put",
        "-e",
        "1",
        "-B",
        "5",
        &url(&rig, "ps/adm/t?id=adm-dev"),
    ])
    .unwrap();
    assert_response(&out, "2.04");
    sub.expect().unwrap();

    let (code, body) = rig.gateway.admin_get("/status").unwrap();
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    let coap: Vec<&Value> = doc["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["protocol"] == "coap")
        .collect();
    let mut addrs: Vec<String> = coap
        .iter()
        .map(|l| {
            assert_eq!(l["transport"], "udp", "{l}");
            l["address"].as_str().unwrap().to_owned()
        })
        .collect();
    addrs.sort();
    let port = rig.gateway.coap_addr().port();
    assert_eq!(
        addrs,
        [format!("127.0.0.1:{port}"), format!("[::1]:{port}")],
        "{body}"
    );
    // The protocol's counters move (the uplink counts once the verdict came).
    poll_until(
        "coap messages_in >= 1",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let (_, body) = rig.gateway.admin_get("/status")?;
            let doc: Value = serde_json::from_str(&body)?;
            let p = doc["protocols"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["protocol"] == "coap"))
                .cloned();
            Ok(p.filter(|p| p["messages_in"].as_u64() >= Some(1)))
        },
    )
    .unwrap();

    // /metrics counts it under protocol="coap", QoS 1.
    let (code, body) = rig.gateway.admin_get("/metrics").unwrap();
    assert_eq!(code, 200);
    let counted = body.lines().any(|l| {
        l.starts_with("sensorgate_messages_in_total{")
            && l.contains("protocol=\"coap\"")
            && l.contains("qos=\"1\"")
            && l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v >= 1.0)
    });
    assert!(counted, "no coap QoS 1 sample in /metrics:\n{body}");
    // `sensorgate status` lists the listeners.
    let out = sensorgate_status(&rig.gateway.config_path(), &[]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("coap udp 127.0.0.1:{port}")),
        "{text}"
    );

    let (code, body) = rig.gateway.admin_get("/clients?prefix=adm-").unwrap();
    assert_eq!(code, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    let c = &page["clients"][0];
    assert_eq!(c["client_id"], "adm-dev", "{body}");
    assert_eq!(c["protocol"], "coap", "{body}");
    assert!(
        c["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{body}"
    );
}
