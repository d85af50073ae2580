//! Topic ACLs (`[[acl]]`) across MQTT-SN, CoAP and HTTP through the real binary and real
//! peers: allowed and refused publishes and subscriptions with their exact answers (MQTT-SN
//! REGACK / PUBACK / SUBACK rc 0x03, CoAP 4.03 from libcoap's client, HTTP 403 from curl),
//! refused messages never reaching mosquitto, the refusals counted in `/metrics`, and a SIGHUP
//! that changes the ACL applied to a session that stays connected.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::coap::{libcoap, libcoap_responses};
use sensorgate_tests::http::{
    CurlSse, Device, HttpRig, HttpSetup, TOKEN1, await_sse_live, bearer, curl, expect_status,
};
use sensorgate_tests::sn::{self, Qos, TopicType};
use sensorgate_tests::{
    PROBE_PREFIX, Rig, SnClient, UpMsg, poll_until, publish_upstream, send_signal,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// Devices may publish under their own ClientId / identity and subscribe to their own
/// command topics.
const ACL: &str = "\n[[acl]]\npublish = [\"sensors/{client_id}/#\"]\n\
                   subscribe = [\"cmd/{client_id}/#\"]\n";

/// The PUBACK return code of a QoS 1 publish.
fn publish_rc(c: &mut SnClient, topic_type: TopicType, topic_id: u16, payload: &[u8]) -> u8 {
    c.publish_qos1(topic_type, topic_id, false, payload)
        .unwrap()
}

/// Sends SIGHUP and waits for reload number `count` in `/status`.
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

#[test]
fn mqttsn_acl_refusals_are_rc_3_counted_and_a_reload_widens_it_for_the_same_session() {
    let rig = Rig::start_with(|c| {
        c.with_admin()?;
        c.extra_sections.push_str(ACL);
        Ok(())
    })
    .unwrap();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("dev1").unwrap();

    // REGISTER of another device's topic: REGACK rc 0x03, no topic id.
    let (id, rc) = c.register_rc("sensors/dev2/t").unwrap();
    assert_eq!((id, rc), (0, sn::RC_NOT_SUPPORTED));
    // A predefined topic outside the ACL: PUBACK rc 0x03.
    assert_eq!(
        publish_rc(&mut c, TopicType::Predefined, 1, b"no"),
        sn::RC_NOT_SUPPORTED
    );
    // QoS 0 to it: dropped silently.
    c.publish(Qos::Zero, TopicType::Predefined, 1, false, b"no0")
        .unwrap();
    c.assert_no_reply().unwrap();
    // Its own topic goes through.
    let own = c.register("sensors/dev1/t").unwrap();
    assert_eq!(
        publish_rc(&mut c, TopicType::Normal, own, b"yes"),
        sn::RC_ACCEPTED
    );
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/t", &b"yes"[..]),
        "a refused message reached the broker"
    );
    // Subscriptions: wider than the pattern refused, within it granted.
    let wide = c.subscribe(Qos::One, sn::SubTopic::Name("cmd/#")).unwrap();
    assert_eq!(wide.rc, sn::RC_NOT_SUPPORTED);
    c.subscribe_ok(Qos::One, sn::SubTopic::Name("cmd/dev1/#"))
        .unwrap();
    rig.gateway
        .await_ingress_event("mqtt-sn", "acl_denied_publish", 3.0)
        .unwrap();
    rig.gateway
        .await_ingress_event("mqtt-sn", "acl_denied_subscribe", 1.0)
        .unwrap();
    // The same counts per reason in /status.
    let (_, body) = rig.gateway.admin_get("/status").unwrap();
    let doc: Value = serde_json::from_str(&body).unwrap();
    let sn = doc["protocols"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["protocol"] == "mqtt-sn")
        .unwrap();
    assert_eq!(sn["security"]["acl_denied_publish"], 3, "{sn}");
    assert_eq!(sn["security"]["acl_denied_subscribe"], 1, "{sn}");

    // Widen the ACL; the session is not reconnected.
    let path = rig.gateway.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "publish = [\"sensors/{client_id}/#\"]",
            "publish = [\"sensors/#\"]",
        ),
    )
    .unwrap();
    let r = reload(&rig, 1);
    assert_eq!(r["outcome"], "applied", "{r}");
    let other = c.register("sensors/dev2/t").unwrap();
    assert_eq!(
        publish_rc(&mut c, TopicType::Normal, other, b"after"),
        sn::RC_ACCEPTED
    );
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev2/t", &b"after"[..])
    );
}

#[test]
fn coap_acl_refusals_are_4_03_from_libcoap_and_counted() {
    let rig = Rig::start_with(|c| {
        c.with_admin()?;
        c.with_coap()?;
        c.extra_sections.push_str(ACL);
        Ok(())
    })
    .unwrap();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let url = |path: &str| format!("coap://{}/{path}", rig.gateway.coap_addr());
    let put = |path: &str, payload: &str| {
        let out = libcoap(&["-m", "put", "-e", payload, "-B", "5", &url(path)]).unwrap();
        libcoap_responses(&out)
    };
    assert_eq!(put("ps/sensors/dev2/t?id=dev1", "no"), ["4.03"]);
    assert_eq!(put("ps/sensors/dev1/t", "no-id"), ["4.03"]);
    assert_eq!(put("ps/sensors/dev1/t?id=dev1", "yes"), ["2.04"]);
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/t", &b"yes"[..])
    );
    // Observe within the subscribe pattern (for a second), and outside it.
    let out = libcoap(&[
        "-m",
        "get",
        "-s",
        "1",
        "-B",
        "3",
        &url("ps/cmd/dev1/%2B?id=dev1"),
    ])
    .unwrap();
    assert_eq!(
        libcoap_responses(&out).first().map(String::as_str),
        Some("2.05"),
        "{out}"
    );
    let out = libcoap(&[
        "-m",
        "get",
        "-s",
        "1",
        "-B",
        "3",
        &url("ps/cmd/%23?id=dev1"),
    ])
    .unwrap();
    assert_eq!(libcoap_responses(&out), ["4.03"], "{out}");
    rig.gateway
        .await_ingress_event("coap", "acl_denied_publish", 2.0)
        .unwrap();
    rig.gateway
        .await_ingress_event("coap", "acl_denied_subscribe", 1.0)
        .unwrap();
}

#[test]
fn http_acl_applies_on_top_of_the_device_grants_with_403() {
    // dev1's own grants allow all of sensors/ and cmd/; the ACL narrows them.
    let http = HttpSetup::new().unwrap().devices(vec![
        Device::new("dev1", TOKEN1)
            .publish(&["sensors"])
            .subscribe(&["cmd"]),
    ]);
    let rig = HttpRig::start_with(&http, |c| {
        c.extra_sections.push_str(
            "\n[[acl]]\npublish = [\"sensors/{identity}/#\"]\nsubscribe = [\"cmd/{identity}/#\"]\n",
        );
        Ok(())
    })
    .unwrap();
    let mut sub = rig.rig.subscribe(&["sensors/#"]).unwrap();
    let auth = bearer(TOKEN1);
    let post = |topic: &str, body: &str| {
        curl(&[
            "-H",
            &auth,
            "--data-binary",
            body,
            &rig.url(&format!("/v1/publish/{topic}?qos=1")),
        ])
        .unwrap()
    };
    let r = post("sensors/dev2/t", "no");
    expect_status(&r, 403, Some("forbidden_topic")).unwrap();
    let r = post("sensors/dev1/t", "yes");
    expect_status(&r, 200, None).unwrap();
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/t", &b"yes"[..])
    );
    let r = curl(&["-H", &auth, &rig.url("/v1/subscribe?filter=cmd/%23")]).unwrap();
    expect_status(&r, 403, Some("forbidden_filter")).unwrap();
    rig.rig
        .gateway
        .await_ingress_event("http", "acl_denied_publish", 1.0)
        .unwrap();
    rig.rig
        .gateway
        .await_ingress_event("http", "acl_denied_subscribe", 1.0)
        .unwrap();
}

#[test]
fn http_sse_streams_follow_an_acl_narrowed_by_a_reload() {
    let http = HttpSetup::new()
        .unwrap()
        .devices(vec![Device::new("dev1", TOKEN1).subscribe(&["cmd"])]);
    let rig = HttpRig::start_with(&http, |c| {
        c.extra_sections
            .push_str("\n[[acl]]\nsubscribe = [\"cmd/#\"]\n");
        Ok(())
    })
    .unwrap();
    let port = rig.rig.broker.port();
    let mut s = CurlSse::start(
        &rig.url("/v1/subscribe?filter=cmd/%23"),
        &["-H", &bearer(TOKEN1)],
    )
    .unwrap();
    s.ready().unwrap();
    await_sse_live(&mut s, port, "cmd/dev1/probe").unwrap();

    let path = rig.rig.gateway.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "subscribe = [\"cmd/#\"]",
            "subscribe = [\"cmd/{identity}/#\"]",
        ),
    )
    .unwrap();
    let r = reload(&rig.rig, 1);
    assert_eq!(r["outcome"], "applied", "{r}");
    // The open stream (not reopened) gets only what dev1 may receive now, in order.
    publish_upstream(
        port,
        &[
            UpMsg::new("cmd/dev2/x", "no", 1),
            UpMsg::new("cmd/dev1/x", "yes", 1),
        ],
    )
    .unwrap();
    let ev = s.message(WAIT, PROBE_PREFIX).unwrap();
    assert_eq!(ev.topic().as_deref(), Some("cmd/dev1/x"), "{ev:?}");
    rig.rig
        .gateway
        .await_ingress_event("http", "acl_denied_delivery", 1.0)
        .unwrap();
}
