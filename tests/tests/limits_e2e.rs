//! Per-identity rate and size limits (`[limits]`) through the real binary: over the rate an
//! MQTT-SN QoS 1 publish gets PUBACK rc 0x01 (congestion) and a QoS 0 one is dropped, a CoAP
//! request 4.29 Too Many Requests with Max-Age, an HTTP request 429 with Retry-After; a
//! payload above `max_message_size` is refused (rc 0x03, 4.13, 413); identities have their
//! own buckets; every refusal is counted per protocol in `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::coap::{CON, Msg, RawClient, codes, opts};
use sensorgate_tests::http::{Device, HttpRig, HttpSetup, TOKEN1, TOKEN2, bearer, curl};
use sensorgate_tests::sn::{self, Qos, TopicType};
use sensorgate_tests::{Rig, SnClient};

const WAIT: Duration = Duration::from_secs(20);

/// Two messages at once, then one every ten seconds (a test never waits that long), payloads
/// up to 16 bytes.
const LIMITS: &str = "\n[limits]\nmessages_per_second = 0.1\nmessage_burst = 2\n\
                      max_message_size = \"16B\"\n";

/// The PUBACK return code of a QoS 1 publish on predefined topic 1.
fn publish_rc(c: &mut SnClient, payload: &[u8]) -> u8 {
    c.publish_qos1(TopicType::Predefined, 1, false, payload)
        .unwrap()
}

#[test]
fn mqttsn_over_the_rate_is_congestion_and_too_large_is_rc_3() {
    let rig = Rig::start_with(|c| {
        c.with_admin()?;
        c.extra_sections.push_str(LIMITS);
        Ok(())
    })
    .unwrap();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("dev1").unwrap();
    assert_eq!(publish_rc(&mut c, b"1"), sn::RC_ACCEPTED);
    assert_eq!(publish_rc(&mut c, b"2"), sn::RC_ACCEPTED);
    assert_eq!(publish_rc(&mut c, b"3"), sn::RC_CONGESTION);
    // QoS 0 over the rate: no answer, not forwarded.
    c.publish(Qos::Zero, TopicType::Predefined, 1, false, b"4")
        .unwrap();
    c.assert_no_reply().unwrap();
    // Another identity has its own bucket; too large is refused for good.
    let mut d = rig.connected("dev2").unwrap();
    assert_eq!(
        publish_rc(&mut d, b"0123456789abcdefX"),
        sn::RC_NOT_SUPPORTED
    );
    assert_eq!(publish_rc(&mut d, b"5"), sn::RC_ACCEPTED);
    for want in [&b"1"[..], b"2", b"5"] {
        assert_eq!(sub.expect().unwrap().payload.as_slice(), want);
    }
    rig.gateway
        .await_ingress_event("mqtt-sn", "rate_limited", 2.0)
        .unwrap();
    rig.gateway
        .await_ingress_event("mqtt-sn", "too_large", 1.0)
        .unwrap();
}

#[test]
fn coap_over_the_rate_is_4_29_with_max_age() {
    let rig = Rig::start_with(|c| {
        c.with_admin()?;
        c.with_coap()?;
        c.extra_sections.push_str(LIMITS);
        Ok(())
    })
    .unwrap();
    let mut client = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let mut put = |payload: &[u8]| {
        let mid = client.mid();
        let token = client.token();
        let req = Msg::request(CON, codes::PUT, mid, &token, "ps/sensors/t?id=dev1")
            .with_payload(payload);
        client.request(&req, WAIT).unwrap()
    };
    assert_eq!(put(b"1").code, codes::CHANGED);
    assert_eq!(put(b"2").code, codes::CHANGED);
    let refused = put(b"3");
    assert_eq!(refused.code, 0x9D, "4.29: {}", refused.describe());
    // Ten seconds per token: Max-Age says when to come back (whole seconds, rounded up).
    let max_age = refused.uint(opts::MAX_AGE).unwrap();
    assert!((1..=10).contains(&max_age), "{max_age}");
    let big = put(b"0123456789abcdefX");
    assert_eq!(big.code, codes::REQUEST_ENTITY_TOO_LARGE);
    rig.gateway
        .await_ingress_event("coap", "rate_limited", 1.0)
        .unwrap();
    rig.gateway
        .await_ingress_event("coap", "too_large", 1.0)
        .unwrap();
}

#[test]
fn http_over_the_rate_is_429_with_retry_after() {
    let http = HttpSetup::new().unwrap().devices(vec![
        Device::new("dev1", TOKEN1),
        Device::new("dev2", TOKEN2),
    ]);
    let rig = HttpRig::start_with(&http, |c| {
        c.extra_sections.push_str(LIMITS);
        Ok(())
    })
    .unwrap();
    let post = |token: &str, topic: &str, body: &str| {
        curl(&[
            "-H",
            &bearer(token),
            "--data-binary",
            body,
            &rig.url(&format!("/v1/publish/{topic}?qos=1")),
        ])
        .unwrap()
    };
    assert_eq!(post(TOKEN1, "sensors/dev1/t", "1").status, 200);
    assert_eq!(post(TOKEN1, "sensors/dev1/t", "2").status, 200);
    let r = post(TOKEN1, "sensors/dev1/t", "3");
    assert_eq!(r.status, 429, "{}", r.describe());
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    assert_eq!(post(TOKEN2, "sensors/dev2/t", "1").status, 200);
    let r = post(TOKEN2, "sensors/dev2/t", "0123456789abcdefX");
    assert_eq!(r.status, 413, "{}", r.describe());
    // The shared limits' 429s are in HTTP's one `rate_limited` event.
    rig.rig
        .gateway
        .await_ingress_event("http", "rate_limited", 1.0)
        .unwrap();
    rig.rig
        .gateway
        .await_ingress_event("http", "too_large", 1.0)
        .unwrap();
}
