//! SSE downlink (`GET /v1/subscribe`) through the real binary: `curl -N` and httpx_sse read
//! the stream (first the `ready` event, then one `message` event per downlink message) while
//! paho-mqtt publishes to the broker, and while an MQTT-SN client, a CoAP client and another
//! HTTP device publish locally. Text payloads come as `payload`, binary ones as
//! `payload_b64` (always with `encoding=base64`). Streams share upstream subscriptions by
//! reference count: the upstream UNSUBSCRIBE goes only when the last stream of a filter
//! closed, and after it the broker sends the gateway nothing more for it (a barrier stream on
//! another filter proves the order). A stream that does not read overflows its bounded queue
//! (counted, announced by `event: dropped`, memory bounded) without holding up the others;
//! with `sse_queue_full = "close"` it is ended instead. An HTTP publish reaches an MQTT-SN
//! subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use sensorgate_tests::coap::libcoap;
use sensorgate_tests::http::{
    CurlSse, Device, HTTP_TIMEOUT, HttpRig, HttpSetup, RawHttp, SseEvent, TOKEN1, TOKEN2,
    await_sse_live, bearer, curl, metric, py_client, request, rss_kib,
};
use sensorgate_tests::sn::{Qos, SubTopic, TopicType};
use sensorgate_tests::{
    DELIVERY_TIMEOUT, GATEWAY_ID, PROBE_PREFIX, SnClient, UpMsg, poll_until, publish_upstream,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// dev1 subscribes under `cmd/dev1` and `ctl/dev1`; dev2 may publish to `cmd/dev1` (a local
/// publish from another HTTP device).
fn sse_setup(lines: &str) -> HttpSetup {
    HttpSetup::new()
        .unwrap()
        .devices(vec![
            Device::new("dev1", TOKEN1).subscribe(&["cmd/dev1", "ctl/dev1"]),
            Device::new("dev2", TOKEN2).publish(&["sensors/dev2", "cmd/dev1"]),
        ])
        .lines(lines)
}

fn stream(rig: &HttpRig, query: &str) -> CurlSse {
    CurlSse::start(
        &rig.url(&format!("/v1/subscribe?{query}")),
        &["-H", &bearer(TOKEN1)],
    )
    .unwrap()
}

/// The next message event on `topic` (others and late probes skipped).
fn expect_on(s: &mut CurlSse, topic: &str) -> SseEvent {
    let deadline = std::time::Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ev = s
            .message(left, PROBE_PREFIX)
            .unwrap_or_else(|e| panic!("waiting for {topic}: {e:#}\n{}", s.stderr()));
        if ev.topic().as_deref() == Some(topic) {
            return ev;
        }
    }
}

fn upstream_id() -> String {
    format!("sensorgate-{GATEWAY_ID}-local")
}

#[test]
fn curl_receives_broker_and_local_publishes_as_message_events() {
    let rig = HttpRig::start_with(&sse_setup(""), |c| {
        c.with_coap()?;
        Ok(())
    })
    .unwrap();
    let port = rig.rig.broker.port();
    let mut s = stream(&rig, "filter=cmd/dev1/%23");
    assert_eq!(s.ready().unwrap(), json!({"filters": ["cmd/dev1/#"]}));
    let mut b64 = stream(&rig, "filter=cmd/dev1/%23&encoding=base64");
    b64.ready().unwrap();
    await_sse_live(&mut s, port, "cmd/dev1/probe").unwrap();

    // From the broker: text at QoS 0 and binary at QoS 1 (delivered at the stream's QoS 0).
    publish_upstream(
        port,
        &[
            UpMsg::new("cmd/dev1/led", "on", 0),
            UpMsg::new("cmd/dev1/bin", [0xff, 0x00, 0x80], 1),
        ],
    )
    .unwrap();
    let led = expect_on(&mut s, "cmd/dev1/led");
    assert_eq!(
        led.json().unwrap(),
        json!({"topic": "cmd/dev1/led", "payload": "on", "qos": 0, "retain": false})
    );
    let bin = expect_on(&mut s, "cmd/dev1/bin");
    assert_eq!(bin.json().unwrap()["payload_b64"], "/wCA", "{bin:?}");
    assert!(bin.json().unwrap().get("payload").is_none(), "{bin:?}");
    let (a, b): (u64, u64) = (
        led.id.as_deref().unwrap().parse().unwrap(),
        bin.id.as_deref().unwrap().parse().unwrap(),
    );
    assert!(b > a, "event ids increase: {a} then {b}");
    // The same messages on the base64 stream, with the same ids.
    let led64 = expect_on(&mut b64, "cmd/dev1/led");
    assert_eq!(led64.json().unwrap()["payload_b64"], "b24=", "{led64:?}");
    assert_eq!(led64.id, led.id);

    // Local publishes: MQTT-SN, CoAP and another HTTP device.
    let mut sn = SnClient::new(rig.rig.gateway.sn_addr()).unwrap();
    sn.connect_ok("sse-sn").unwrap();
    let id = sn.register("cmd/dev1/sn").unwrap();
    sn.publish_qos1_ok(TopicType::Normal, id, b"from-sn")
        .unwrap();
    assert_eq!(
        expect_on(&mut s, "cmd/dev1/sn").payload().unwrap(),
        b"from-sn"
    );

    let coap = format!("coap://{}/ps/cmd/dev1/coap", rig.rig.gateway.coap_addr());
    let out = libcoap(&["-m", "put", "-e", "from-coap", "-B", "5", &coap]).unwrap();
    assert!(out.contains("2.04"), "{out}");
    assert_eq!(
        expect_on(&mut s, "cmd/dev1/coap").payload().unwrap(),
        b"from-coap"
    );

    let r = curl(&[
        "-X",
        "POST",
        "-H",
        &bearer(TOKEN2),
        "--data-binary",
        "from-http",
        &rig.url("/v1/publish/cmd/dev1/http"),
    ])
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        expect_on(&mut s, "cmd/dev1/http").payload().unwrap(),
        b"from-http"
    );
}

#[test]
fn the_stream_has_the_event_stream_headers_and_httpx_sse_reads_it() {
    let rig = HttpRig::start(&sse_setup("")).unwrap();
    let port = rig.rig.broker.port();
    // Headers, exactly as sent.
    let mut c = RawHttp::connect(rig.addr()).unwrap();
    c.send(&request(
        "GET",
        "/v1/subscribe?filter=cmd/dev1/a&filter=cmd/dev1/b",
        &[&bearer(TOKEN1)],
        b"",
    ))
    .unwrap();
    let head = c.read_head(HTTP_TIMEOUT).unwrap();
    assert_eq!(head.status, 200, "{}", head.describe());
    assert!(
        head.header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "{}",
        head.describe()
    );
    assert_eq!(
        head.header("cache-control"),
        Some("no-cache"),
        "{}",
        head.describe()
    );
    c.wait_for(b"event: ready", HTTP_TIMEOUT).unwrap();
    drop(c);

    let args: Vec<String> = [
        "sse",
        "--base",
        &rig.base(),
        "--filter",
        "cmd/dev1/#",
        "--token",
        TOKEN1,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let py = py_client(&args).unwrap();
    let ready = py
        .expect_line("READY", WAIT, |l| l.starts_with("READY"))
        .unwrap();
    assert!(ready.contains("cmd/dev1/#"), "{ready}");
    // Probes until one arrives (the upstream subscription is in place), then the real ones.
    let mut live = false;
    for round in 0..20 {
        let probe = format!("{PROBE_PREFIX}{round}");
        publish_upstream(port, &[UpMsg::new("cmd/dev1/probe", &probe, 1)]).unwrap();
        if py
            .expect_line("a probe", Duration::from_secs(3), |l| {
                l.contains(PROBE_PREFIX)
            })
            .is_ok()
        {
            live = true;
            break;
        }
    }
    assert!(live, "the httpx_sse stream never received a probe");
    publish_upstream(
        port,
        &[
            UpMsg::new("cmd/dev1/x", "one", 1),
            UpMsg::new("cmd/dev1/y", "two", 0),
        ],
    )
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let line = py
            .expect_line("a message", WAIT, |l| {
                l.starts_with('{') && !l.contains(PROBE_PREFIX)
            })
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "message", "{line}");
        let data: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        got.push((data["topic"].clone(), data["payload"].clone()));
    }
    assert_eq!(
        got,
        [
            (json!("cmd/dev1/x"), json!("one")),
            (json!("cmd/dev1/y"), json!("two"))
        ]
    );
}

#[test]
fn the_upstream_subscription_lives_until_the_last_stream_of_its_filter_closes() {
    let rig = HttpRig::start(&sse_setup("sse_keepalive = \"1s\"\n")).unwrap();
    let port = rig.rig.broker.port();
    let gw = &rig.rig.gateway;
    let mut a = stream(&rig, "filter=cmd/dev1/%23");
    a.ready().unwrap();
    let mut b = stream(&rig, "filter=cmd/dev1/%23");
    b.ready().unwrap();
    let mut barrier = stream(&rig, "filter=ctl/dev1/%23");
    barrier.ready().unwrap();
    await_sse_live(&mut a, port, "cmd/dev1/probe").unwrap();
    await_sse_live(&mut barrier, port, "ctl/dev1/probe").unwrap();
    // One upstream SUBSCRIBE for the two streams.
    let subscribes = || {
        rig.rig
            .broker
            .log()
            .lines()
            .filter(|l| {
                let t: Vec<&str> = l.split_whitespace().collect();
                t.len() == 4 && t[1] == upstream_id() && t[3] == "cmd/dev1/#"
            })
            .count()
    };
    assert_eq!(subscribes(), 1, "{}", rig.rig.broker.log());

    // A goes; B still receives.
    drop(a);
    publish_upstream(port, &[UpMsg::new("cmd/dev1/x", "still", 1)]).unwrap();
    assert_eq!(expect_on(&mut b, "cmd/dev1/x").payload().unwrap(), b"still");
    let is_unsubscribe = |l: &str| {
        let t: Vec<&str> = l.split_whitespace().collect();
        t.len() == 3 && t[1] == upstream_id() && t[2] == "cmd/dev1/#"
    };
    assert!(
        !rig.rig.broker.log().lines().any(is_unsubscribe),
        "unsubscribed while B still listens"
    );

    // B goes: the gateway unsubscribes upstream.
    drop(b);
    rig.rig
        .broker
        .wait_log(
            "the upstream UNSUBSCRIBE of cmd/dev1/#",
            WAIT,
            is_unsubscribe,
        )
        .unwrap();
    // After it, a message on cmd/dev1 no longer reaches the gateway: between two reads of
    // downlink_received, only the barrier's marker arrived.
    let received = || {
        let (code, body) = gw.admin_get("/metrics").unwrap();
        assert_eq!(code, 200, "{body}");
        metric(
            &body,
            "sensorgate_upstream_events_total",
            &[("upstream", "local"), ("event", "downlink_received")],
        )
        .unwrap_or(0.0)
    };
    // A sync marker first: a probe of a slow round may still have been on its way.
    publish_upstream(port, &[UpMsg::new("ctl/dev1/sync", "sync", 1)]).unwrap();
    expect_on(&mut barrier, "ctl/dev1/sync");
    let before = received();
    publish_upstream(
        port,
        &[
            UpMsg::new("cmd/dev1/x", "nobody", 1),
            UpMsg::barrier(),
            UpMsg::new("ctl/dev1/m", "marker", 1),
        ],
    )
    .unwrap();
    assert_eq!(
        expect_on(&mut barrier, "ctl/dev1/m").payload().unwrap(),
        b"marker"
    );
    let after = poll_until(
        "downlink_received to count the marker",
        WAIT,
        Duration::from_millis(100),
        || {
            let n = received();
            Ok((n > before).then_some(n))
        },
    )
    .unwrap();
    assert_eq!(after, before + 1.0, "the broker still sent cmd/dev1/x");
}

/// Sends the subscribe request on a raw socket, reads up to the ready event, and then reads
/// nothing more.
fn stalled_stream(rig: &HttpRig) -> RawHttp {
    let mut c = RawHttp::connect(rig.addr()).unwrap();
    c.send(&request(
        "GET",
        "/v1/subscribe?filter=cmd/dev1/%23",
        &[&bearer(TOKEN1), "Connection: close"],
        b"",
    ))
    .unwrap();
    let head = c.read_head(HTTP_TIMEOUT).unwrap();
    assert_eq!(head.status, 200, "{}", head.describe());
    c.wait_for(b"event: ready", HTTP_TIMEOUT).unwrap();
    c
}

/// 2,000 messages of 2 KiB (more than the socket buffers of a stream that does not read
/// hold), a barrier and an `end` marker.
fn flood(port: u16) {
    let mut msgs: Vec<UpMsg> = (0..2000)
        .map(|i| UpMsg::new("cmd/dev1/flood", format!("{i:04}{}", "x".repeat(2044)), 0))
        .collect();
    msgs.push(UpMsg::barrier());
    msgs.push(UpMsg::new("cmd/dev1/end", "end", 1));
    publish_upstream(port, &msgs).unwrap();
}

#[test]
fn a_stream_that_does_not_read_overflows_its_queue_without_holding_up_the_others() {
    let rig = HttpRig::start(&sse_setup("sse_queue = 4\n")).unwrap();
    let port = rig.rig.broker.port();
    let gw = &rig.rig.gateway;
    let mut stalled = stalled_stream(&rig);
    let mut healthy = stream(&rig, "filter=cmd/dev1/%23");
    healthy.ready().unwrap();
    await_sse_live(&mut healthy, port, "cmd/dev1/probe").unwrap();
    let rss_before = rss_kib(gw.pid().unwrap()).unwrap();

    flood(port);
    // The newest message is never the one dropped: the healthy stream gets the end.
    assert_eq!(
        expect_on(&mut healthy, "cmd/dev1/end").payload().unwrap(),
        b"end"
    );
    let dropped = poll_until(
        "queue_full drops counted",
        WAIT,
        Duration::from_millis(200),
        || {
            let (_, body) = gw.admin_get("/metrics")?;
            let n = metric(
                &body,
                "sensorgate_downlink_dropped_total",
                &[("protocol", "http"), ("reason", "queue_full")],
            )
            .unwrap_or(0.0);
            Ok((n > 0.0).then_some(n))
        },
    )
    .unwrap();
    let rss_after = rss_kib(gw.pid().unwrap()).unwrap();
    eprintln!("dropped {dropped}; gateway RSS {rss_before} KiB -> {rss_after} KiB");
    // 2,000 x 2 KiB went by; a queue of 4 events holds a few KiB. Generous: the allocator
    // may keep what the broker connection's buffers used.
    assert!(
        rss_after < rss_before + 64 * 1024,
        "gateway RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // The stalled stream, once it reads, is told what it lost.
    stalled.wait_for(b"event: dropped", WAIT).unwrap();
}

#[test]
fn with_the_close_policy_an_overflowing_stream_is_ended() {
    let rig = HttpRig::start(&sse_setup("sse_queue = 4\nsse_queue_full = \"close\"\n")).unwrap();
    let port = rig.rig.broker.port();
    let mut stalled = stalled_stream(&rig);
    let mut healthy = stream(&rig, "filter=cmd/dev1/%23");
    healthy.ready().unwrap();
    await_sse_live(&mut healthy, port, "cmd/dev1/probe").unwrap();
    flood(port);
    // Once it reads again, the stalled stream drains and ends (`Connection: close`: EOF).
    stalled.read_to_eof(WAIT).unwrap();
}

#[test]
fn an_http_publish_reaches_an_mqtt_sn_subscriber() {
    let rig = HttpRig::start(&sse_setup("")).unwrap();
    let mut sn = SnClient::new(rig.rig.gateway.sn_addr()).unwrap();
    sn.connect_ok("http-to-sn").unwrap();
    sn.subscribe_ok(Qos::One, SubTopic::Name("sensors/dev2/#"))
        .unwrap();
    let r = curl(&[
        "-X",
        "POST",
        "-H",
        &bearer(TOKEN2),
        "--data-binary",
        "to-sn",
        &rig.url("/v1/publish/sensors/dev2/t?qos=1"),
    ])
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    let got = sn.downlink(1, DELIVERY_TIMEOUT).unwrap();
    assert_eq!(got[0].payload, b"to-sn");
    assert_eq!(got[0].topic.as_deref(), Some("sensors/dev2/t"));
}
