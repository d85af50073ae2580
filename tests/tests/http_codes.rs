//! Every refusal of the HTTP ingress's request table (design section 2), provoked through the
//! real binary with exact bytes (the raw client) or curl, and checked: status, the JSON
//! `error` code and its extra fields, and the headers that go with it (`WWW-Authenticate`,
//! `Allow`, `Accept-Post`, `Retry-After`, `Connection: close`). Refused messages never reach
//! the broker: a later accepted message is the next one the subscriber sees. Checks run in
//! the documented order, so an unauthenticated client never makes the gateway read a body.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::http::{
    CurlSse, Device, HTTP_TIMEOUT, HttpRig, HttpSetup, PyRequest, RawHttp, Reply, TOKEN1, TOKEN2,
    bearer, curl, expect_status, py_send, request, two_devices,
};
use sensorgate_tests::{Subscriber, poll_until, temp_dir};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
/// `[http] max_body_size` of [`codes_rig`].
const MAX_BODY: usize = 1024;

/// dev1/dev2, plus topics granted to dev1 that no route takes (`other/dev1`), small limits.
fn codes_rig() -> HttpRig {
    let http = HttpSetup::new()
        .unwrap()
        .devices(vec![
            Device::new("dev1", TOKEN1).publish(&["sensors/dev1", "other/dev1"]),
            Device::new("dev2", TOKEN2),
        ])
        .lines(
            "max_body_size = \"1KiB\"\nmax_batch_size = \"8KiB\"\nmax_batch_items = 3\n\
             max_filters_per_stream = 2\nmax_header_size = \"16KiB\"\n",
        );
    HttpRig::start_with(&http, |c| {
        c.extra_sections.push_str(
            "\n[[route]]\nfilter = \"sensors/#\"\nupstreams = [\"local\"]\n\n\
             [[route]]\nfilter = \"cmd/#\"\nupstreams = [\"local\"]\n",
        );
        Ok(())
    })
    .unwrap()
}

/// One request on a fresh connection (`Connection: close`), exact bytes.
fn raw(rig: &HttpRig, method: &str, target: &str, headers: &[&str], body: &[u8]) -> Reply {
    let mut all = headers.to_vec();
    all.push("Connection: close");
    let mut c = RawHttp::connect(rig.addr()).unwrap();
    if method == "HEAD" {
        // A response to HEAD has no body, whatever its Content-Length says.
        c.send(&request(method, target, &all, body)).unwrap();
        return c.read_head(HTTP_TIMEOUT).unwrap();
    }
    c.exchange(&request(method, target, &all, body)).unwrap()
}

fn auth1() -> String {
    bearer(TOKEN1)
}

/// Asserts status and error code, with the whole reply in the message.
#[track_caller]
fn check(r: &Reply, status: u16, error: &str) {
    if let Err(e) = expect_status(r, status, Some(error)) {
        panic!("{e:#}");
    }
}

#[test]
fn missing_or_bad_credentials_are_401_with_www_authenticate_before_any_body_is_read() {
    let rig = codes_rig();
    // No credentials at all: the challenge without an error.
    for (method, target) in [
        ("POST", "/v1/publish/sensors/dev1/t"),
        ("POST", "/v1/publish"),
        ("GET", "/v1/subscribe?filter=cmd/dev1/%23"),
    ] {
        let r = raw(&rig, method, target, &[], b"");
        check(&r, 401, "unauthorized");
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer") && challenge.contains("realm=\"sensorgate\""),
            "{}",
            r.describe()
        );
        assert!(!challenge.contains("invalid_token"), "{}", r.describe());
    }
    // An unknown token, another scheme, a token with characters a b64token cannot have.
    for auth in [
        "Authorization: Bearer not-the-token-0123456789".to_owned(),
        "Authorization: Basic ZGV2MTpzZWNyZXQ=".to_owned(),
        "Authorization: Bearer a\"b".to_owned(),
        format!("Authorization: Bearer {}", "x".repeat(600)),
    ] {
        let r = raw(&rig, "POST", "/v1/publish/sensors/dev1/t", &[&auth], b"x");
        check(&r, 401, "unauthorized");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|c| c.contains("error=\"invalid_token\"")),
            "{auth}: {}",
            r.describe()
        );
    }
    // The scheme is case-insensitive.
    let r = raw(
        &rig,
        "POST",
        "/v1/publish/sensors/dev1/t",
        &[&format!("Authorization: bearer {TOKEN1}")],
        b"x",
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    // Auth comes before the length check: an unauthenticated head announcing 100 MB is
    // answered 401 at once, with no body byte sent.
    let mut c = RawHttp::connect(rig.addr()).unwrap();
    c.send(&request(
        "POST",
        "/v1/publish/sensors/dev1/t",
        &["Content-Length: 100000000"],
        b"",
    ))
    .unwrap();
    let r = c.read_reply(HTTP_TIMEOUT).unwrap();
    check(&r, 401, "unauthorized");
}

#[test]
fn topics_and_filters_outside_the_grants_or_the_routes_are_403_and_nothing_is_appended() {
    let rig = codes_rig();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["#"]).unwrap();
    let a = auth1();
    let json_ct = "Content-Type: application/json";
    // Another device's topic; a prefix that is only a string prefix (dev10 is not dev1).
    for target in [
        "/v1/publish/sensors/dev2/t",
        "/v1/publish/sensors/dev10/t",
        "/v1/publish/sensors",
    ] {
        let r = raw(&rig, "POST", target, &[&a], b"no");
        check(&r, 403, "forbidden_topic");
    }
    // A batch with one forbidden item is refused whole, naming the first bad index.
    let batch = json!([
        {"topic": "sensors/dev1/ok", "payload": "no"},
        {"topic": "sensors/dev2/t", "payload": "no"},
        {"topic": "sensors/dev2/u", "payload": "no"},
    ])
    .to_string();
    let r = raw(
        &rig,
        "POST",
        "/v1/publish",
        &[&a, json_ct],
        batch.as_bytes(),
    );
    check(&r, 403, "forbidden_topic");
    assert_eq!(r.json().unwrap()["index"], 1, "{}", r.describe());
    // Granted but no route takes it: single and batch (pre-checked, nothing appended).
    let r = raw(&rig, "POST", "/v1/publish/other/dev1/x", &[&a], b"no");
    check(&r, 403, "no_route");
    let batch = json!([
        {"topic": "sensors/dev1/ok", "payload": "no"},
        {"topic": "other/dev1/x", "payload": "no"},
    ])
    .to_string();
    let r = raw(
        &rig,
        "POST",
        "/v1/publish",
        &[&a, json_ct],
        batch.as_bytes(),
    );
    check(&r, 403, "no_route");
    // Filters outside `subscribe = ["cmd/dev1"]`, or with a wildcard over the prefix.
    for filter in ["cmd/dev2/%23", "cmd/%2B/x", "%23", "cmd"] {
        let r = raw(
            &rig,
            "GET",
            &format!("/v1/subscribe?filter={filter}"),
            &[&a],
            b"",
        );
        check(&r, 403, "forbidden_filter");
    }
    // Nothing refused reached the broker: the next message it has is this one.
    let r = raw(
        &rig,
        "POST",
        "/v1/publish/sensors/dev1/marker",
        &[&a],
        b"yes",
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/marker", &b"yes"[..])
    );
}

#[test]
fn malformed_topics_parameters_batches_and_filters_are_400() {
    let rig = codes_rig();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["#"]).unwrap();
    let a = auth1();
    for target in [
        "/v1/publish/",
        "/v1/publish/sensors/dev1/%23",
        "/v1/publish/sensors/dev1/%2B",
        // `+` in a path is a literal plus, so a wildcard.
        "/v1/publish/sensors/dev1/a+b",
        "/v1/publish/sensors/dev1/%00",
        "/v1/publish/sensors/dev1/%FF%FE",
    ] {
        let r = raw(&rig, "POST", target, &[&a], b"x");
        check(&r, 400, "bad_topic");
    }
    for (target, headers, error) in [
        ("/v1/publish/sensors/dev1/t?qos=2", vec![], "bad_qos"),
        ("/v1/publish/sensors/dev1/t?qos=x", vec![], "bad_qos"),
        (
            "/v1/publish/sensors/dev1/t",
            vec!["QoS-Level: 3"],
            "bad_qos",
        ),
        // Query and header disagree.
        (
            "/v1/publish/sensors/dev1/t?qos=0",
            vec!["QoS-Level: 1"],
            "bad_qos",
        ),
        (
            "/v1/publish/sensors/dev1/t?retain=maybe",
            vec![],
            "bad_retain",
        ),
        (
            "/v1/publish/sensors/dev1/t",
            vec!["Retain: 2"],
            "bad_retain",
        ),
    ] {
        let mut h = headers.clone();
        h.push(&a);
        let r = raw(&rig, "POST", target, &h, b"x");
        check(&r, 400, error);
    }
    let json_ct = "Content-Type: application/json";
    for (body, index) in [
        (
            json!({"topic": "sensors/dev1/t", "payload": "x"}).to_string(),
            None,
        ),
        (
            "[{\"topic\": \"sensors/dev1/t\", \"payload\": ".to_owned(),
            None,
        ),
        (
            json!([{"topic": "sensors/dev1/t", "payload": "x", "colour": "red"}]).to_string(),
            Some(0),
        ),
        (
            json!([{"topic": "sensors/dev1/t", "payload": "x"},
                   {"topic": "sensors/dev1/t", "payload": "x", "payload_b64": "eA=="}])
            .to_string(),
            Some(1),
        ),
        (
            json!([{"topic": "sensors/dev1/t", "payload": "x"},
                   {"topic": "sensors/dev1/t"}])
            .to_string(),
            Some(1),
        ),
        (
            json!([{"topic": "sensors/dev1/t", "payload": "x"},
                   {"topic": "sensors/dev1/t", "payload_b64": "***"}])
            .to_string(),
            Some(1),
        ),
        (
            json!([{"topic": "sensors/dev1/t", "payload": "x", "retain": "yes"}]).to_string(),
            Some(0),
        ),
        (
            json!([{"topic": "sensors/dev1/t", "payload": "x", "ts": "yesterday"}]).to_string(),
            Some(0),
        ),
    ] {
        let r = raw(&rig, "POST", "/v1/publish", &[&a, json_ct], body.as_bytes());
        check(&r, 400, "bad_batch");
        if let Some(i) = index {
            assert_eq!(r.json().unwrap()["index"], i, "{body}: {}", r.describe());
        }
    }
    let r = raw(
        &rig,
        "POST",
        "/v1/publish",
        &[&a, json_ct],
        json!([{"topic": "sensors/dev1/t", "payload": "x", "qos": 2}])
            .to_string()
            .as_bytes(),
    );
    check(&r, 400, "bad_qos");
    let r = raw(
        &rig,
        "POST",
        "/v1/publish",
        &[&a, json_ct],
        json!([{"topic": "sensors/dev1/#", "payload": "x"}])
            .to_string()
            .as_bytes(),
    );
    check(&r, 400, "bad_topic");
    // NDJSON: the bad line is named.
    let r = raw(
        &rig,
        "POST",
        "/v1/publish",
        &[&a, "Content-Type: application/x-ndjson"],
        b"{\"topic\":\"sensors/dev1/t\",\"payload\":\"x\"}\nnot json\n",
    );
    check(&r, 400, "bad_batch");
    assert!(r.json().unwrap()["index"].is_u64(), "{}", r.describe());
    for target in [
        "/v1/subscribe",
        "/v1/subscribe?filter=",
        "/v1/subscribe?filter=cmd/dev1/%23/x",
        "/v1/subscribe?filter=cmd/dev1/a%2Bb",
        // max_filters_per_stream = 2
        "/v1/subscribe?filter=cmd/dev1/a&filter=cmd/dev1/b&filter=cmd/dev1/c",
    ] {
        let r = raw(&rig, "GET", target, &[&a], b"");
        check(&r, 400, "bad_filter");
    }
    // Nothing malformed reached the broker.
    let r = raw(
        &rig,
        "POST",
        "/v1/publish/sensors/dev1/marker",
        &[&a],
        b"yes",
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(sub.expect().unwrap().topic, "sensors/dev1/marker");
}

#[test]
fn unknown_paths_are_404_and_other_methods_405_with_allow_before_auth() {
    let rig = codes_rig();
    for target in [
        "/v1/messages?filter=cmd/dev1/%23&wait=5",
        "/nope",
        "/",
        "/v2/publish/x",
    ] {
        let r = raw(&rig, "GET", target, &[], b"");
        check(&r, 404, "not_found");
    }
    let r = raw(&rig, "POST", "/v1/publish-all", &[&auth1()], b"x");
    check(&r, 404, "not_found");
    for (method, target, allow) in [
        ("GET", "/v1/publish/sensors/dev1/t", "POST"),
        ("PUT", "/v1/publish/sensors/dev1/t", "POST"),
        ("DELETE", "/v1/publish", "POST"),
        ("OPTIONS", "/v1/publish", "POST"),
        ("HEAD", "/v1/publish/sensors/dev1/t", "POST"),
        ("POST", "/v1/subscribe?filter=cmd/dev1/x", "GET"),
        ("PUT", "/v1/subscribe", "GET"),
    ] {
        let r = raw(&rig, method, target, &[], b"");
        assert_eq!(r.status, 405, "{method} {target}: {}", r.describe());
        if method != "HEAD" {
            check(&r, 405, "method_not_allowed");
        }
        assert!(
            r.header("allow").is_some_and(|v| v.contains(allow)),
            "{method} {target}: {}",
            r.describe()
        );
    }
}

#[test]
fn bodies_over_the_limits_are_413_and_a_huge_one_is_refused_before_it_is_sent() {
    let rig = codes_rig();
    let a = auth1();
    // 100 MB announced, 10 bytes sent: the answer comes while 99,999,990 were never sent.
    let mut c = RawHttp::connect(rig.addr()).unwrap();
    c.send(&request(
        "POST",
        "/v1/publish/sensors/dev1/t",
        &[&a, "Content-Length: 100000000"],
        b"0123456789",
    ))
    .unwrap();
    let r = c.read_reply(HTTP_TIMEOUT).unwrap();
    check(&r, 413, "too_large");
    assert_eq!(r.json().unwrap()["limit"], MAX_BODY, "{}", r.describe());
    assert_eq!(
        r.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "{}",
        r.describe()
    );
    // ... and the gateway closes the connection rather than read the rest.
    c.read_to_eof(HTTP_TIMEOUT).unwrap();

    // One byte over, with a length.
    let body = vec![b'x'; MAX_BODY + 1];
    let r = raw(&rig, "POST", "/v1/publish/sensors/dev1/t", &[&a], &body);
    check(&r, 413, "too_large");
    // Exactly the limit is fine.
    let r = raw(
        &rig,
        "POST",
        "/v1/publish/sensors/dev1/t",
        &[&a],
        &body[..MAX_BODY],
    );
    assert_eq!(r.status, 200, "{}", r.describe());

    // Chunked, growing past the limit (curl uploads a file in chunks).
    let dir = temp_dir().unwrap();
    let file = dir.path().join("big.bin");
    std::fs::write(&file, vec![b'y'; 4 * MAX_BODY]).unwrap();
    let r = curl(&[
        "-X",
        "POST",
        "-H",
        &a,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", file.display()),
        &rig.url("/v1/publish/sensors/dev1/t"),
    ])
    .unwrap();
    check(&r, 413, "too_large");

    let json_ct = "Content-Type: application/json";
    // More items than max_batch_items.
    let items: Vec<_> = (0..4)
        .map(|i| json!({"topic": "sensors/dev1/t", "payload": format!("{i}")}))
        .collect();
    let r = raw(
        &rig,
        "POST",
        "/v1/publish",
        &[&a, json_ct],
        serde_json::to_vec(&items).unwrap().as_slice(),
    );
    check(&r, 413, "too_large");
    assert_eq!(r.json().unwrap()["limit"], 3, "{}", r.describe());
    // An item's payload over max_body_size.
    let big = json!([{"topic": "sensors/dev1/t", "payload": "z".repeat(MAX_BODY + 1)}]);
    let r = raw(
        &rig,
        "POST",
        "/v1/publish",
        &[&a, json_ct],
        big.to_string().as_bytes(),
    );
    check(&r, 413, "too_large");
    assert_eq!(r.json().unwrap()["limit"], MAX_BODY, "{}", r.describe());
    // A batch body over max_batch_size (8 KiB), refused from its Content-Length.
    let mut c = RawHttp::connect(rig.addr()).unwrap();
    c.send(&request(
        "POST",
        "/v1/publish",
        &[&a, json_ct, "Content-Length: 9000"],
        b"[",
    ))
    .unwrap();
    let r = c.read_reply(HTTP_TIMEOUT).unwrap();
    check(&r, 413, "too_large");
    assert_eq!(r.json().unwrap()["limit"], 8 * 1024, "{}", r.describe());
}

#[test]
fn a_batch_of_another_media_type_is_415_with_accept_post() {
    let rig = codes_rig();
    let a = auth1();
    let body = json!([{"topic": "sensors/dev1/t", "payload": "x"}]).to_string();
    for ct in [
        Some("Content-Type: text/plain"),
        Some("Content-Type: application/x-www-form-urlencoded"),
        None,
    ] {
        let mut h = vec![a.as_str()];
        h.extend(ct);
        let r = raw(&rig, "POST", "/v1/publish", &h, body.as_bytes());
        check(&r, 415, "unsupported_media_type");
        let accept = r.header("accept-post").unwrap_or_default();
        assert!(
            accept.contains("application/json") && accept.contains("application/x-ndjson"),
            "{}",
            r.describe()
        );
    }
    // Accepted media types, with parameters.
    for ct in [
        "application/json; charset=utf-8",
        "application/ndjson",
        "application/jsonl",
    ] {
        let body = if ct.starts_with("application/json;") {
            body.clone()
        } else {
            "{\"topic\":\"sensors/dev1/t\",\"payload\":\"x\"}\n".to_owned()
        };
        let r = raw(
            &rig,
            "POST",
            "/v1/publish",
            &[&a, &format!("Content-Type: {ct}")],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{ct}: {}", r.describe());
    }
}

#[test]
fn a_head_over_max_header_size_is_431_and_the_connection_closes() {
    let rig = codes_rig();
    let big = format!("X-Big: {}", "b".repeat(32 * 1024));
    let mut c = RawHttp::connect(rig.addr()).unwrap();
    c.send(&request(
        "POST",
        "/v1/publish/sensors/dev1/t",
        &[&auth1(), &big],
        b"x",
    ))
    .unwrap();
    let r = c.read_head(HTTP_TIMEOUT).unwrap();
    assert_eq!(r.status, 431, "{}", r.describe());
    c.read_to_eof(HTTP_TIMEOUT).unwrap();
    // Too many header fields: 431 too (max_headers, default 64).
    let many: Vec<String> = (0..100).map(|i| format!("X-H{i}: v")).collect();
    let mut h: Vec<&str> = many.iter().map(String::as_str).collect();
    let a = auth1();
    h.push(&a);
    let r = raw(&rig, "POST", "/v1/publish/sensors/dev1/t", &h, b"x");
    assert_eq!(r.status, 431, "{}", r.describe());
}

#[test]
fn a_device_over_its_rate_is_429_with_retry_after_and_other_devices_are_not() {
    let http = HttpSetup::new()
        .unwrap()
        .devices(two_devices())
        .lines("rate_per_device = 0.001\nrate_burst = 1\n");
    let rig = HttpRig::start(&http).unwrap();
    let a = auth1();
    let r = raw(&rig, "POST", "/v1/publish/sensors/dev1/t", &[&a], b"1");
    assert_eq!(r.status, 200, "{}", r.describe());
    // The bucket holds one token and refills one per 1000 s.
    let r = raw(&rig, "POST", "/v1/publish/sensors/dev1/t", &[&a], b"2");
    check(&r, 429, "rate_limited");
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((900..=1000).contains(&after), "{}", r.describe());
    assert_eq!(
        r.json().unwrap()["retry_after_secs"],
        after,
        "{}",
        r.describe()
    );
    // Subscribing costs a token too.
    let r = raw(&rig, "GET", "/v1/subscribe?filter=cmd/dev1/x", &[&a], b"");
    check(&r, 429, "rate_limited");
    // dev2 has its own bucket.
    let r = raw(
        &rig,
        "POST",
        "/v1/publish/sensors/dev2/t",
        &[&bearer(TOKEN2)],
        b"1",
    );
    assert_eq!(r.status, 200, "{}", r.describe());
}

#[test]
fn require_content_length_refuses_a_chunked_upload_with_411() {
    let http = HttpSetup::new()
        .unwrap()
        .devices(two_devices())
        .lines("require_content_length = true\n");
    let rig = HttpRig::start(&http).unwrap();
    let a = auth1();
    let r = curl(&[
        "-X",
        "POST",
        "-H",
        &a,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "21.5",
        &rig.url("/v1/publish/sensors/dev1/t"),
    ])
    .unwrap();
    check(&r, 411, "length_required");
    assert!(r.json().unwrap()["limit"].is_u64(), "{}", r.describe());
    let r = curl(&[
        "-X",
        "POST",
        "-H",
        &a,
        "--data-binary",
        "21.5",
        &rig.url("/v1/publish/sensors/dev1/t"),
    ])
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
}

#[test]
fn a_full_spool_without_a_broker_is_503_spool_full_with_retry_after_until_it_drains() {
    let http = HttpSetup::new()
        .unwrap()
        .anonymous()
        .lines("retry_after = \"7s\"\nrate_per_device = 0\n");
    let mut rig = HttpRig::start_with(&http, |c| {
        c.extra_sections.push_str(
            "\n[spool]\nmax_bytes = \"1MiB\"\nsegment_bytes = \"64KiB\"\nwhen_full = \"reject_new\"\n",
        );
        Ok(())
    })
    .unwrap();
    rig.rig.broker.stop().unwrap();
    // About a thousand 1000-byte bodies fill a 1 MiB spool; 2,000 are sent.
    let body = vec![b'f'; 1000];
    let reqs: Vec<PyRequest> = (0..2000)
        .map(|i| PyRequest::post(&format!("/v1/publish/full/{i}?qos=1"), &body))
        .collect();
    let replies = py_send(&rig.base(), &reqs, &[]).unwrap();
    let accepted = replies.iter().take_while(|r| r.status == 200).count();
    assert!(
        accepted > 500,
        "only {accepted} accepted before the spool was full"
    );
    let full = replies
        .iter()
        .find(|r| r.status != 200)
        .expect("the 1 MiB spool never filled");
    check(full, 503, "spool_full");
    assert_eq!(full.header("retry-after"), Some("7"), "{}", full.describe());
    assert!(
        replies.iter().all(|r| r.status == 200 || r.status == 503),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    // A batch on a full spool: 503, every item listed as refused, none accepted.
    // QoS 0 promises only that the message was handed to the spool: 202, as documented.
    let r = raw(&rig, "POST", "/v1/publish/full/q0?qos=0", &[], &body);
    assert_eq!(r.status, 202, "{}", r.describe());
    // Items as large as the singles that were refused (a smaller record could still fit).
    let item = "f".repeat(1000);
    let batch = json!([
        {"topic": "full/b", "payload": item},
        {"topic": "full/b", "payload": item},
    ])
    .to_string();
    let r = raw(
        &rig,
        "POST",
        "/v1/publish",
        &["Content-Type: application/json"],
        batch.as_bytes(),
    );
    assert_eq!(r.status, 503, "{}", r.describe());
    assert_eq!(r.header("retry-after"), Some("7"), "{}", r.describe());
    let v = r.json().unwrap();
    assert_eq!(v["accepted"], 0, "{v}");
    let mut refused: Vec<u64> = v["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["index"].as_u64().unwrap())
        .collect();
    refused.sort_unstable();
    assert_eq!(refused, [0, 1], "{v}");

    // The broker back, the backlog drains and publishes are durable again.
    rig.rig.broker.restart().unwrap();
    poll_until("a 200 again", WAIT, Duration::from_millis(500), || {
        let r = raw(&rig, "POST", "/v1/publish/full/again", &[], b"x");
        Ok((r.status == 200).then_some(()))
    })
    .unwrap();
}

#[test]
fn stream_limits_are_429_per_device_and_503_for_the_gateway() {
    let http = HttpSetup::new()
        .unwrap()
        .devices(vec![
            Device::new("dev1", TOKEN1),
            Device::new("dev2", TOKEN2),
            Device::new("dev3", "dev3-token-0123456789abcdef"),
        ])
        .lines("max_streams = 2\nmax_streams_per_device = 1\nmax_filters = 2\n");
    let rig = HttpRig::start(&http).unwrap();
    let a1 = auth1();
    let mut s1 =
        CurlSse::start(&rig.url("/v1/subscribe?filter=cmd/dev1/%23"), &["-H", &a1]).unwrap();
    s1.ready().unwrap();
    // dev1's second stream.
    let r = raw(&rig, "GET", "/v1/subscribe?filter=cmd/dev1/x", &[&a1], b"");
    check(&r, 429, "too_many_streams");
    assert!(r.header("retry-after").is_some(), "{}", r.describe());
    // Two new filters where the hub has room for one more.
    let a2 = bearer(TOKEN2);
    let r = raw(
        &rig,
        "GET",
        "/v1/subscribe?filter=cmd/dev2/a&filter=cmd/dev2/b",
        &[&a2],
        b"",
    );
    check(&r, 503, "subscribe_refused");
    assert!(r.header("retry-after").is_some(), "{}", r.describe());
    // The refusal rolled back: one new filter still fits.
    let mut s2 =
        CurlSse::start(&rig.url("/v1/subscribe?filter=cmd/dev2/%23"), &["-H", &a2]).unwrap();
    s2.ready().unwrap();
    // The gateway's two streams are taken.
    let r = raw(
        &rig,
        "GET",
        "/v1/subscribe?filter=cmd/dev3/%23",
        &[&bearer("dev3-token-0123456789abcdef")],
        b"",
    );
    check(&r, 503, "too_many_streams");
    assert!(r.header("retry-after").is_some(), "{}", r.describe());
}
