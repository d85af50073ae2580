//! Slow and greedy clients against the real binary's HTTP listener: a head trickled byte by
//! byte (slowloris) is cut off after `header_timeout` without an answer while a normal curl
//! on another connection is still served; a body trickled past `request_timeout` is answered
//! 408 `request_timeout` with `Connection: close`; beyond `max_connections` a request waits
//! in the accept queue and is answered once another connection closes.
//!
//! The trickling clients pause between bytes: that is the scenario, not a wait for a result.
//! Every result is waited for as a condition (an answer, an EOF) with a generous bound.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sensorgate_tests::http::{
    HTTP_TIMEOUT, HttpRig, HttpSetup, RawHttp, TOKEN1, bearer, curl, expect_status, request,
    two_devices,
};

const TRICKLE: Duration = Duration::from_millis(500);

/// Writes `bytes` one at a time, [`TRICKLE`] apart, until done, stopped, or the peer closed.
fn trickle(stream: &TcpStream, bytes: Vec<u8>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let mut s = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        for b in bytes {
            if stop.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(TRICKLE);
        }
    })
}

struct StopOnDrop(Arc<AtomicBool>);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_trickled_head_is_closed_after_header_timeout_while_others_are_served() {
    let http = HttpSetup::new()
        .unwrap()
        .devices(two_devices())
        .lines("header_timeout = \"2s\"\n");
    let rig = HttpRig::start(&http).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let _stopper = StopOnDrop(stop.clone());
    // Ten slowloris connections; each head would take minutes to complete.
    let mut victims = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..10 {
        let c = RawHttp::connect(rig.addr()).unwrap();
        let mut head = b"POST /v1/publish/sensors/dev1/t HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_vec();
        head.extend_from_slice(b"X-Slow: ");
        head.extend_from_slice(&[b'a'; 10_000]);
        writers.push(trickle(c.stream(), head, stop.clone()));
        victims.push(c);
    }
    // Meanwhile, a normal client is served at once on its own connection.
    let r = curl(&[
        "-X",
        "POST",
        "--data-binary",
        "ok",
        "-H",
        &bearer(TOKEN1),
        &rig.url("/v1/publish/sensors/dev1/t"),
    ])
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    // Every slow head is cut off without a response: the request never existed.
    for mut c in victims {
        let n = c.read_to_eof(HTTP_TIMEOUT).unwrap();
        assert_eq!(n, 0, "the gateway answered an incomplete head");
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
}

#[test]
fn a_body_trickled_past_request_timeout_is_408_with_connection_close() {
    let http = HttpSetup::new()
        .unwrap()
        .devices(two_devices())
        .lines("request_timeout = \"2s\"\n");
    let rig = HttpRig::start(&http).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let _stopper = StopOnDrop(stop.clone());
    let mut c = RawHttp::connect(rig.addr()).unwrap();
    c.send(&request(
        "POST",
        "/v1/publish/sensors/dev1/slow",
        &[&bearer(TOKEN1), "Content-Length: 100"],
        b"0123456789",
    ))
    .unwrap();
    let writer = trickle(c.stream(), vec![b'z'; 90], stop.clone());
    let r = c.read_reply(HTTP_TIMEOUT).unwrap();
    expect_status(&r, 408, Some("request_timeout")).unwrap();
    assert_eq!(
        r.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "{}",
        r.describe()
    );
    c.read_to_eof(HTTP_TIMEOUT).unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // The same body sent in time is accepted (nothing about the request itself was wrong).
    let r = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &"z".repeat(100),
        "-H",
        &bearer(TOKEN1),
        &rig.url("/v1/publish/sensors/dev1/slow"),
    ])
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
}

#[test]
fn beyond_max_connections_a_request_waits_until_another_connection_closes() {
    let http = HttpSetup::new()
        .unwrap()
        .devices(two_devices())
        .lines("max_connections = 4\nheader_timeout = \"60s\"\n");
    let rig = HttpRig::start(&http).unwrap();
    let auth = bearer(TOKEN1);
    let publish = |body: &[u8]| {
        request(
            "POST",
            "/v1/publish/sensors/dev1/conn",
            &[auth.as_str()],
            body,
        )
    };
    // Four kept-alive connections, each answered once: they hold the four permits.
    let mut held: Vec<RawHttp> = (0..4)
        .map(|i| {
            let mut c = RawHttp::connect(rig.addr()).unwrap();
            let r = c
                .exchange(&publish(format!("held-{i}").as_bytes()))
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.describe());
            c
        })
        .collect();
    // A fifth: the kernel accepts the TCP connection, the gateway does not serve it yet.
    let mut fifth = RawHttp::connect(rig.addr()).unwrap();
    fifth.send(&publish(b"fifth")).unwrap();
    let early = fifth.read_head(Duration::from_secs(2));
    assert!(
        early.is_err(),
        "a fifth connection was served while four were open: {early:?}"
    );
    // One held connection goes: the fifth is served.
    drop(held.pop());
    let r = fifth.read_reply(HTTP_TIMEOUT).unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    // The others still work on their kept-alive connections.
    for c in &mut held {
        let r = c.exchange(&publish(b"again")).unwrap();
        assert_eq!(r.status, 200, "{}", r.describe());
    }
}
