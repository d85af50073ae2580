//! HTTP/2 on the plain listener (h2c by prior knowledge): curl (nghttp2) publishes over it,
//! httpx (h2) sends 50 concurrent streams over one connection and every one is durable and
//! arrives; with `http2 = false` the h2c preface is not served as HTTP/2 while HTTP/1.1 still
//! is. (ALPN h2 on the TLS listener is in `http_tls.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::time::Duration;

use sensorgate_tests::Subscriber;
use sensorgate_tests::http::{
    HttpRig, HttpSetup, TOKEN1, bearer, curl, curl_output, py_client, two_devices,
};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn curl_publishes_over_h2c_with_prior_knowledge() {
    let rig = HttpRig::start(&HttpSetup::new().unwrap().devices(two_devices())).unwrap();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();
    let a = bearer(TOKEN1);
    let r = curl(&[
        "--http2-prior-knowledge",
        "-X",
        "POST",
        "-H",
        &a,
        "--data-binary",
        "over-h2",
        &rig.url("/v1/publish/sensors/dev1/h2?qos=1"),
    ])
    .unwrap();
    assert_eq!(
        (r.status, r.version.as_str()),
        (200, "2"),
        "{}",
        r.describe()
    );
    assert_eq!(r.json().unwrap()["durable"], true);
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/h2", &b"over-h2"[..])
    );
    // An error over h2 is the same JSON. A request without a body: an early answer to a POST
    // is followed by RST_STREAM(NO_ERROR) (RFC 9113 section 8.1), which curl 7.88 now and
    // then reports as a framing error (exit 92) instead of the response.
    let r = curl(&[
        "--http2-prior-knowledge",
        &rig.url("/v1/subscribe?filter=cmd/dev1/%23"),
    ])
    .unwrap();
    assert_eq!(
        (r.status, r.version.as_str()),
        (401, "2"),
        "{}",
        r.describe()
    );
    assert_eq!(r.error_code().as_deref(), Some("unauthorized"));
    // `--http2` on plain HTTP asks for an upgrade, which is not offered: HTTP/1.1 it is.
    let r = curl(&[
        "--http2",
        "-X",
        "POST",
        "-H",
        &a,
        "--data-binary",
        "upgrade",
        &rig.url("/v1/publish/sensors/dev1/h2"),
    ])
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(sub.expect().unwrap().payload, b"upgrade");
}

#[test]
fn fifty_concurrent_h2_streams_on_one_connection_are_all_durable() {
    let rig = HttpRig::start(&HttpSetup::new().unwrap().devices(two_devices())).unwrap();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();
    let path = "/v1/publish/sensors/dev1/streams";
    let args: Vec<String> = [
        "streams",
        "--base",
        &rig.base(),
        "--path",
        path,
        "--count",
        "50",
        "--token",
        TOKEN1,
        "--h2c",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let script = py_client(&args).unwrap();
    let mut done = BTreeSet::new();
    for i in 0..50 {
        let line = script
            .expect_line(&format!("answer {i}"), WAIT, |l| l.starts_with('{'))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["status"], 200, "{line}");
        assert_eq!(v["version"], "HTTP/2", "{line}");
        done.insert(v["i"].as_u64().unwrap());
    }
    assert_eq!(done.len(), 50);
    let conns = script
        .expect_line("CONNECTIONS", WAIT, |l| l.starts_with("CONNECTIONS"))
        .unwrap();
    assert_eq!(
        conns, "CONNECTIONS 1",
        "the 50 streams shared one connection"
    );
    // Every stream's message arrives (no order between concurrent streams).
    let got: BTreeSet<Vec<u8>> = sub
        .collect(50, WAIT)
        .unwrap()
        .into_iter()
        .map(|m| m.payload)
        .collect();
    let want: BTreeSet<Vec<u8>> = (0..50)
        .map(|i| format!("{path}:{i}").into_bytes())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn with_http2_off_the_h2c_preface_is_not_served_and_http1_is() {
    let http = HttpSetup::new()
        .unwrap()
        .devices(two_devices())
        .lines("http2 = false\n");
    let rig = HttpRig::start(&http).unwrap();
    let a = bearer(TOKEN1);
    let out = curl_output(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        "-X",
        "POST",
        "-H",
        &a,
        "--data-binary",
        "x",
        &rig.url("/v1/publish/sensors/dev1/t"),
    ])
    .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || !printed.ends_with(" 2"),
        "HTTP/2 was served with http2 = false: {out:?}"
    );
    let r = curl(&[
        "-X",
        "POST",
        "-H",
        &a,
        "--data-binary",
        "x",
        &rig.url("/v1/publish/sensors/dev1/t"),
    ])
    .unwrap();
    assert_eq!(
        (r.status, r.version.as_str()),
        (200, "1.1"),
        "{}",
        r.describe()
    );
}
