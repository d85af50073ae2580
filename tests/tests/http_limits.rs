//! The HTTP ingress at its limits, through the real binary and independent clients:
//!
//! - **503 busy**: the spool writer stalled on a frozen file system (`fsfreeze` on a
//!   loop-mounted ext4 holding the state dir; root only, `#[ignore]`d) with `[spool] queue =
//!   1`: once the writer's queue stays full for `[http] queue_wait`, QoS 1 requests get 503
//!   `busy` with `Retry-After`; after the thaw every 200 arrives at mosquitto and no 503 does.
//! - **503 stopping**: a request whose body is still arriving when the gateway gets SIGTERM is
//!   answered 503 `stopping` (with `Retry-After` and `Connection: close`) once its body is in,
//!   and is not stored; a request on an idle keep-alive connection is never served after it.
//!   The same over h2c: curl streams the body from a FIFO, the server sends GOAWAY and the
//!   stream in flight gets 503 `stopping`.
//!   With the writer stalled (root), requests already appended and waiting for their verdict
//!   at SIGTERM get no status at all (their connections are dropped after the server's grace),
//!   never an error: nothing refused is stored after the thaw.
//! - **413 over HTTP/2** (h2c by prior knowledge, and ALPN h2 over TLS), driven frame by frame
//!   with the Python `h2` library: an oversized body, announced or not, gets a complete 413
//!   while the client is still sending (it sent a small part of the body, held by flow
//!   control); the stream is at most reset after the response, with `NO_ERROR`, and the
//!   connection serves the next stream.
//! - **SSE `drop_new`**: a reader stalled with SIGSTOP and a queue of 4: it gets the oldest
//!   events (a contiguous prefix), never the newest, `dropped` notices accounting for the
//!   rest, and the `queue_full` counter moves by exactly what the notices say. With `close`:
//!   the oldest events, one notice, then the end of the stream; every message that reached
//!   the closed stream is counted, and a stream on another filter is untouched.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sensorgate_tests::http::{
    CurlSse, Device, HTTP_TIMEOUT, HttpRig, HttpSetup, RawHttp, Reply, SseEvent, TOKEN1, TOKEN2,
    await_sse_live, bearer, curl_cmd, expect_status, make_ca, metric, py_client, request,
    two_devices, wait_http_ready,
};
use sensorgate_tests::{
    Gateway, GatewayConfig, Mosquitto, PROBE_PREFIX, Script, Subscriber, UpMsg, free_tcp_port,
    poll_until, publish_upstream, require_root, run_bounded, send_signal, temp_dir,
};
use serde_json::Value;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(60);

/// Asserts status and error code, with the whole reply in the message.
#[track_caller]
fn check(r: &Reply, status: u16, error: &str) {
    if let Err(e) = expect_status(r, status, Some(error)) {
        panic!("{e:#}");
    }
}

fn header_lc(r: &Reply, name: &str) -> Option<String> {
    r.header(name).map(str::to_ascii_lowercase)
}

/// `sensorgate_packets_in_total{protocol="http"}`: requests that reached a handler.
fn http_requests(gw: &Gateway) -> f64 {
    let (_, body) = gw.admin_get("/metrics").unwrap();
    metric(
        &body,
        "sensorgate_packets_in_total",
        &[("protocol", "http")],
    )
    .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// 503 stopping.

#[test]
fn a_request_in_flight_at_sigterm_gets_503_stopping_and_is_not_stored() {
    let http = HttpSetup::new().unwrap().devices(two_devices());
    let mut rig = HttpRig::start(&http).unwrap();
    let addr = rig.addr();
    let a = bearer(TOKEN1);
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();

    // An idle keep-alive connection: one request served on it, then nothing.
    let mut idle = RawHttp::connect(addr).unwrap();
    let r = idle
        .exchange(&request(
            "POST",
            "/v1/publish/sensors/dev1/before",
            &[&a],
            b"before",
        ))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(sub.expect().unwrap().payload, b"before");

    // A request whose body is half sent: its handler waits for the rest.
    let gw = &rig.rig.gateway;
    let before = http_requests(gw);
    let mut late = RawHttp::connect(addr).unwrap();
    late.send(&request(
        "POST",
        "/v1/publish/sensors/dev1/late?qos=1",
        &[&a, "Content-Length: 10"],
        b"late-",
    ))
    .unwrap();
    poll_until(
        "the half-sent request to reach its handler",
        WAIT,
        Duration::from_millis(20),
        || Ok((http_requests(gw) > before).then_some(())),
    )
    .unwrap();

    send_signal(gw.pid().unwrap(), "TERM").unwrap();
    // The listener closes once the ingress saw the stop: new connections are refused.
    poll_until(
        "the HTTP listener to close",
        WAIT,
        Duration::from_millis(10),
        || {
            Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .is_err()
                .then_some(()))
        },
    )
    .unwrap();

    // The rest of the body, within the server's grace (HTTP_GRACE, 4 s): nothing new is
    // appended once stopping, so the answer is 503 stopping, and the connection closes.
    late.send(b"body!").unwrap();
    let r = late.read_reply(HTTP_TIMEOUT).unwrap();
    check(&r, 503, "stopping");
    assert!(r.header("retry-after").is_some(), "{}", r.describe());
    assert_eq!(
        header_lc(&r, "connection").as_deref(),
        Some("close"),
        "{}",
        r.describe()
    );
    late.read_to_eof(HTTP_TIMEOUT).unwrap();

    // The idle keep-alive connection is not served any more: closed, or at most 503 stopping.
    let sent = idle.send(&request(
        "POST",
        "/v1/publish/sensors/dev1/idle",
        &[&a],
        b"idle",
    ));
    if sent.is_ok()
        && let Ok(r) = idle.read_reply(HTTP_TIMEOUT)
    {
        check(&r, 503, "stopping");
    }

    let gw = &mut rig.rig.gateway;
    let status = poll_until(
        "the gateway to exit after SIGTERM",
        WAIT,
        Duration::from_millis(50),
        || gw.exited(),
    )
    .unwrap();
    assert!(status.success(), "{status}\n{}", gw.log());

    // Neither refused message was stored: after a restart on the same spool, the next
    // message the broker gets is one published now.
    gw.restart().unwrap();
    wait_http_ready(addr).unwrap();
    let mut c = RawHttp::connect(addr).unwrap();
    let r = c
        .exchange(&request(
            "POST",
            "/v1/publish/sensors/dev1/after",
            &[&a],
            b"after",
        ))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/after", &b"after"[..]),
        "a refused message reached the broker"
    );
}

#[test]
fn an_h2_stream_in_flight_at_sigterm_gets_503_stopping() {
    let http = HttpSetup::new().unwrap().devices(two_devices());
    let mut rig = HttpRig::start(&http).unwrap();
    let addr = rig.addr();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();
    // curl uploads from a FIFO (`-T`: streamed as it is read, no length), over h2c.
    let dir = temp_dir().unwrap();
    let fifo = dir.path().join("body");
    let out = run_bounded(Command::new("mkfifo").arg(&fifo), HTTP_TIMEOUT).unwrap();
    assert!(out.status.success(), "mkfifo: {out:?}");
    let head = dir.path().join("head");
    let body = dir.path().join("reply");
    let gw = &rig.rig.gateway;
    let before = http_requests(gw);
    let a = bearer(TOKEN1);
    let mut cmd = curl_cmd();
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "60"])
        .args(["--http2-prior-knowledge", "-X", "POST", "-H", &a])
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code} %{http_version}\n", "-T"])
        .arg(&fifo)
        .arg(rig.url("/v1/publish/sensors/dev1/late?qos=1"));
    let curl = Script::spawn("curl-h2-upload", &mut cmd).unwrap();
    // Opening the FIFO waits for curl to open it.
    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    writer.write_all(b"half-").unwrap();
    writer.flush().unwrap();
    poll_until(
        "the h2 stream to reach its handler",
        WAIT,
        Duration::from_millis(20),
        || Ok((http_requests(gw) > before).then_some(())),
    )
    .unwrap();
    send_signal(gw.pid().unwrap(), "TERM").unwrap();
    poll_until(
        "the HTTP listener to close",
        WAIT,
        Duration::from_millis(10),
        || {
            Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .is_err()
                .then_some(()))
        },
    )
    .unwrap();
    // The rest of the body and its end, within the server's grace (GOAWAY was sent; the
    // stream in flight goes on).
    writer.write_all(b"body!").unwrap();
    drop(writer);
    let printed = curl
        .expect_line("curl's status", WAIT, |l| !l.is_empty())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", curl.stderr()));
    assert_eq!(printed, "503 2", "{}", curl.stderr());
    let head = std::fs::read_to_string(&head).unwrap().to_ascii_lowercase();
    assert!(head.contains("retry-after:"), "{head}");
    let reply: Value = serde_json::from_slice(&std::fs::read(&body).unwrap()).unwrap();
    assert_eq!(reply["error"], "stopping", "{reply}");

    let gw = &mut rig.rig.gateway;
    let status = poll_until(
        "the gateway to exit after SIGTERM",
        WAIT,
        Duration::from_millis(50),
        || gw.exited(),
    )
    .unwrap();
    assert!(status.success(), "{status}\n{}", gw.log());
    gw.restart().unwrap();
    wait_http_ready(addr).unwrap();
    let r = RawHttp::connect(addr)
        .unwrap()
        .exchange(&request(
            "POST",
            "/v1/publish/sensors/dev1/after",
            &[&a],
            b"after",
        ))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/after", &b"after"[..]),
        "a refused message reached the broker"
    );
}

// ---------------------------------------------------------------------------------------------
// 413 over HTTP/2.

/// `[http] max_body_size` of the 413 rigs.
const MAX_BODY: u64 = 1024;
/// What the client announces (or would send without a length): 100 MB.
const HUGE: u64 = 100_000_000;
/// The most body bytes the client may have sent when its 413 comes: hyper's h2 windows
/// (`H2_STREAM_WINDOW` 64 KiB, `H2_CONN_WINDOW` 256 KiB) without a WINDOW_UPDATE, and
/// `max_body_size` read beyond the first window when no length was announced. Far below
/// `HUGE`: the body was not read.
const SENT_BOUND: u64 = 1024 * 1024;

/// Runs `http_client.py h2-early` once; returns its result line and its `then` line.
fn h2_early(base: &str, declare: bool, extra: &[&str]) -> (Value, Value) {
    let mut args: Vec<String> = [
        "h2-early",
        "--base",
        base,
        "--path",
        "/v1/publish/sensors/dev1/huge",
        "--length",
        &HUGE.to_string(),
        "--token",
        TOKEN1,
        "--then",
        "/v1/publish/sensors/dev1/then",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if declare {
        args.push("--declare".into());
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let script = py_client(&args).unwrap();
    let line = script
        .expect_line("the h2 result", WAIT, |l| l.starts_with("{\"status\""))
        .unwrap();
    let then = script
        .expect_line("the next stream's result", WAIT, |l| {
            l.starts_with("{\"then_status\"")
        })
        .unwrap();
    script.expect_line("DONE", WAIT, |l| l == "DONE").unwrap();
    (
        serde_json::from_str(&line).unwrap(),
        serde_json::from_str(&then).unwrap(),
    )
}

/// The h2 413 properties (module doc) of one `h2_early` run.
fn check_h2_413(declare: bool, v: &Value, then: &Value) {
    let what = if declare {
        "with content-length"
    } else {
        "without content-length"
    };
    eprintln!("{what}: {v} then {then}");
    assert_eq!(v["status"], 413, "{what}: {v}");
    assert_eq!(
        v["ended"], true,
        "{what}: the 413 is a complete response: {v}"
    );
    let body = sensorgate_tests::http::b64_decode(v["body_b64"].as_str().unwrap()).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "too_large", "{what}: {body}");
    assert_eq!(body["limit"], MAX_BODY, "{what}: {body}");
    let sent = v["sent"].as_u64().unwrap();
    assert!(
        sent < SENT_BOUND,
        "{what}: the client sent {sent} of {HUGE} bytes before the 413: the body was read"
    );
    // RFC 9113 section 8.1: after a complete response the server may reset the stream, with
    // NO_ERROR, so that the client stops sending; any other code would let the client discard
    // the response.
    if !v["reset"].is_null() {
        assert_eq!(v["reset"], 0, "{what}: RST_STREAM code: {v}");
        assert_eq!(
            v["reset_after_end"], true,
            "{what}: reset before the end: {v}"
        );
    }
    assert!(
        v["goaway"].is_null(),
        "{what}: the connection was ended: {v}"
    );
    assert_eq!(then["then_status"], 200, "{what}: the next stream: {then}");
}

#[test]
fn an_oversized_h2c_body_is_413_before_it_is_sent_and_the_connection_serves_on() {
    let http = HttpSetup::new()
        .unwrap()
        .devices(two_devices())
        .lines("max_body_size = \"1KiB\"\n");
    let rig = HttpRig::start(&http).unwrap();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();
    for declare in [true, false] {
        let (v, then) = h2_early(&rig.base(), declare, &[]);
        check_h2_413(declare, &v, &then);
        // Only the next stream's message was stored, never a part of the huge one.
        let m = sub.expect().unwrap();
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice()),
            ("sensors/dev1/then", &b"after"[..])
        );
    }
}

#[test]
fn an_oversized_body_over_alpn_h2_is_413_before_it_is_sent() {
    let dir = temp_dir().unwrap();
    let pki = make_ca(dir.path()).unwrap();
    let p = |path: &Path| path.to_str().unwrap().to_owned();
    let mut http = HttpSetup::new()
        .unwrap()
        .devices(two_devices())
        .lines(&format!(
            "max_body_size = \"1KiB\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            p(&pki.server_cert),
            p(&pki.server_key)
        ));
    http.tls_listen = vec![SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        free_tcp_port().unwrap(),
    ))];
    let rig = HttpRig::start(&http).unwrap();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();
    let base = format!("https://{}", rig.tls_addr.unwrap());
    for declare in [true, false] {
        let (v, then) = h2_early(&base, declare, &["--cacert", &p(&pki.ca)]);
        check_h2_413(declare, &v, &then);
        let m = sub.expect().unwrap();
        assert_eq!(m.payload, b"after");
    }
}

// ---------------------------------------------------------------------------------------------
// SSE overflow policies with a stalled reader.

/// Messages in the flood, and the size of each.
const FLOOD: usize = 500;
const FLOOD_BYTES: usize = 16 * 1024;

/// A stream on `cmd/dev1/#` whose reader (curl) is about to be stalled, a healthy one on
/// `ctl/dev1/#`, both live upstream, with `sse_queue = 4` and `policy`.
struct Stalled {
    rig: HttpRig,
    stalled: CurlSse,
    healthy: CurlSse,
    dropped_before: f64,
    unmatched_before: f64,
    received_before: f64,
}

impl Stalled {
    fn start(policy: &str) -> Stalled {
        let http = HttpSetup::new()
            .unwrap()
            .devices(vec![
                Device::new("dev1", TOKEN1).subscribe(&["cmd/dev1", "ctl/dev1"]),
                Device::new("dev2", TOKEN2),
            ])
            .lines(&format!("sse_queue = 4\nsse_queue_full = \"{policy}\"\n"));
        let rig = HttpRig::start(&http).unwrap();
        let port = rig.rig.broker.port();
        let a = bearer(TOKEN1);
        let mut stalled =
            CurlSse::start(&rig.url("/v1/subscribe?filter=cmd/dev1/%23"), &["-H", &a]).unwrap();
        stalled.ready().unwrap();
        await_sse_live(&mut stalled, port, "cmd/dev1/probe").unwrap();
        // The healthy stream is on another filter: it only tells when the flood went through.
        let mut healthy =
            CurlSse::start(&rig.url("/v1/subscribe?filter=ctl/dev1/%23"), &["-H", &a]).unwrap();
        healthy.ready().unwrap();
        await_sse_live(&mut healthy, port, "ctl/dev1/probe").unwrap();
        let mut s = Stalled {
            rig,
            stalled,
            healthy,
            dropped_before: 0.0,
            unmatched_before: 0.0,
            received_before: 0.0,
        };
        s.dropped_before = s.dropped_total();
        s.unmatched_before = s.unmatched_total();
        s.received_before = s.received_total();
        s
    }

    /// `sensorgate_downlink_dropped_total{protocol="http",reason="queue_full"}`.
    fn dropped_total(&self) -> f64 {
        let (_, body) = self.rig.rig.gateway.admin_get("/metrics").unwrap();
        metric(
            &body,
            "sensorgate_downlink_dropped_total",
            &[("protocol", "http"), ("reason", "queue_full")],
        )
        .unwrap_or(0.0)
    }

    /// `sensorgate_router_downlink_dropped_total{reason="unmatched"}`: downlink no stream (nor
    /// any other ingress) subscribed for, e.g. once a closed stream has unregistered.
    fn unmatched_total(&self) -> f64 {
        let (_, body) = self.rig.rig.gateway.admin_get("/metrics").unwrap();
        metric(
            &body,
            "sensorgate_router_downlink_dropped_total",
            &[("reason", "unmatched")],
        )
        .unwrap_or(0.0)
    }

    /// `sensorgate_router_downlink_received_total`: downlink the gateway took from the broker.
    fn received_total(&self) -> f64 {
        let (_, body) = self.rig.rig.gateway.admin_get("/metrics").unwrap();
        metric(&body, "sensorgate_router_downlink_received_total", &[]).unwrap_or(0.0)
    }

    /// Stops curl (SIGSTOP: the socket buffers fill, then the queue), publishes [`FLOOD`]
    /// messages `<i:04>xxx..` on `cmd/dev1/flood`, then `newest` on `cmd/dev1/newest`; returns
    /// once the gateway handled all of them (the healthy stream got its marker, published
    /// after them on the same connection), with the `queue_full` counter's rise.
    fn stall_and_flood(&mut self) -> f64 {
        send_signal(self.stalled.pid().unwrap(), "STOP").unwrap();
        let pad = "x".repeat(FLOOD_BYTES - 4);
        let mut msgs: Vec<UpMsg> = (0..FLOOD)
            .map(|i| UpMsg::new("cmd/dev1/flood", format!("{i:04}{pad}"), 0))
            .collect();
        msgs.push(UpMsg::barrier());
        msgs.push(UpMsg::new("cmd/dev1/newest", "newest", 1));
        msgs.push(UpMsg::new("ctl/dev1/end", "end", 1));
        publish_upstream(self.rig.rig.broker.port(), &msgs).unwrap();
        let end = self.healthy.message(WAIT, PROBE_PREFIX).unwrap();
        assert_eq!(end.topic().as_deref(), Some("ctl/dev1/end"), "{end:?}");
        let dropped = self.dropped_total() - self.dropped_before;
        assert!(dropped > 0.0, "the stalled stream's queue never overflowed");
        send_signal(self.stalled.pid().unwrap(), "CONT").unwrap();
        dropped
    }
}

/// What a stalled stream read after it resumed.
#[derive(Debug, Default)]
struct Read {
    /// Indices of the flood messages, in order.
    flood: Vec<usize>,
    /// The sum of the `dropped` notices.
    notices: u64,
    /// Whether `cmd/dev1/newest` came.
    newest: bool,
}

impl Read {
    /// Takes one event; true for `cmd/dev1/after`.
    fn take(&mut self, ev: &SseEvent) -> bool {
        match (ev.event.as_str(), ev.topic().as_deref()) {
            ("dropped", _) => self.notices += ev.json().unwrap()["dropped"].as_u64().unwrap(),
            ("message", Some("cmd/dev1/flood")) => {
                let p = ev.payload().unwrap();
                self.flood
                    .push(String::from_utf8_lossy(&p[..4]).parse().unwrap());
            }
            ("message", Some("cmd/dev1/newest")) => self.newest = true,
            ("message", Some("cmd/dev1/after")) => return true,
            _ => {}
        }
        false
    }

    /// The oldest were kept: the flood from its first message on, in order, not all of it.
    /// `contiguous`: nothing is missing before the last one read (`close`: once closed, the
    /// queue takes nothing more). Without it (`drop_new`) there may be gaps: a stalled socket
    /// can still take a little now and then (the kernel's buffers), which frees the queue for
    /// whichever message comes next; every gap is announced (the callers count the notices).
    fn assert_oldest_kept(&self, contiguous: bool) {
        if contiguous {
            let prefix: Vec<usize> = (0..self.flood.len()).collect();
            assert_eq!(
                self.flood, prefix,
                "the kept events are not the oldest, in order"
            );
        } else {
            assert_eq!(self.flood.first(), Some(&0), "the oldest event was lost");
            assert!(
                self.flood.windows(2).all(|w| w[0] < w[1]),
                "the kept events are not in order: {:?}",
                self.flood
            );
        }
        assert!(self.flood.len() < FLOOD, "nothing of the flood was dropped");
        assert!(!self.newest, "the newest message was delivered");
    }
}

#[test]
fn with_drop_new_a_stalled_stream_keeps_the_oldest_events_and_loses_the_newest() {
    let mut s = Stalled::start("drop_new");
    let port = s.rig.rig.broker.port();
    s.stall_and_flood();
    // The stalled stream reads again: what it gets up to a message published now (repeated
    // until one arrives: one published while its queue is still full is dropped too).
    let mut read = Read::default();
    let mut after_sent = 0;
    let mut arrived = false;
    let deadline = Instant::now() + WAIT;
    'outer: while Instant::now() < deadline {
        publish_upstream(port, &[UpMsg::new("cmd/dev1/after", "after", 1)]).unwrap();
        after_sent += 1;
        let round = Instant::now() + Duration::from_secs(3);
        while let Some(ev) = s
            .stalled
            .next(round.saturating_duration_since(Instant::now()))
            .unwrap()
        {
            if read.take(&ev) {
                arrived = true;
                break 'outer;
            }
        }
    }
    assert!(arrived, "no `after` arrived within {WAIT:?}");
    eprintln!("drop_new: {read:?} (flood read {})", read.flood.len());
    read.assert_oldest_kept(false);
    // Every message not delivered was announced (the flood's rest, `newest`, and any `after`
    // published while the queue was still full), and counted: the counter moved by exactly
    // what the notices say.
    let missing = (FLOOD - read.flood.len()) as u64 + 1;
    assert!(
        read.notices >= missing && read.notices < missing + after_sent,
        "{} announced for {missing} lost (+ up to {} `after`)",
        read.notices,
        after_sent - 1
    );
    assert_eq!(s.dropped_total() - s.dropped_before, read.notices as f64);
}

#[test]
fn with_close_a_stalled_stream_gets_the_oldest_events_and_a_notice_then_ends() {
    let mut s = Stalled::start("close");
    let dropped = s.stall_and_flood();
    // The stream was closed at its first overflow: once it reads, it gets what it had, one
    // notice for the overflow, and its end (curl exits).
    let mut read = Read::default();
    let deadline = Instant::now() + WAIT;
    let mut ended = false;
    while Instant::now() < deadline {
        match s
            .stalled
            .next(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(Some(ev)) => assert!(!read.take(&ev)),
            Ok(None) => break,
            Err(_) => {
                ended = true;
                break;
            }
        }
    }
    assert!(
        ended,
        "the stream did not end: {read:?}\n{}",
        s.stalled.stderr()
    );
    eprintln!(
        "close: {read:?} (flood read {}), counter {dropped}",
        read.flood.len()
    );
    read.assert_oldest_kept(true);
    assert_eq!(
        read.notices, 1,
        "one notice, for the overflow that closed it"
    );
    // Every message that reached the gateway and was not read is counted lost. Those that
    // reached the closed stream count as its `queue_full`; once the server has written out what
    // the closed queue held (when the stalled socket still had room for it) the stream ends and
    // unsubscribes: what the broker still sent finds nobody subscribed (the router's
    // `unmatched`), and what it published after the UNSUBSCRIBE never reaches the gateway. So
    // the router's `received` (less the healthy stream's `end`) is what was read + counted.
    let unmatched = s.unmatched_total() - s.unmatched_before;
    let received = s.received_total() - s.received_before - 1.0;
    assert!(dropped >= 1.0, "the overflow itself was not counted");
    assert!(received <= (FLOOD + 1) as f64, "received {received}");
    assert_eq!(
        read.flood.len() as f64 + f64::from(u8::from(read.newest)) + dropped + unmatched,
        received,
        "read {} + queue_full {dropped} + unmatched {unmatched} != received {received}",
        read.flood.len()
    );
    // The healthy stream (another filter, its own queue) was not touched.
    let port = s.rig.rig.broker.port();
    publish_upstream(port, &[UpMsg::new("ctl/dev1/still", "still", 1)]).unwrap();
    let ev = s.healthy.message(WAIT, PROBE_PREFIX).unwrap();
    assert_eq!(ev.topic().as_deref(), Some("ctl/dev1/still"), "{ev:?}");
}

// ---------------------------------------------------------------------------------------------
// 503 busy (root: a frozen file system stalls the spool writer).

/// An ext4 image mounted on a temp dir through a loop device; unmounted on drop.
struct LoopFs {
    mount: TempDir,
    _image: TempDir,
}

fn sh(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = run_bounded(cmd, Duration::from_secs(30)).map_err(|e| format!("{what}: {e:#}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LoopFs {
    fn mount() -> Result<LoopFs, String> {
        let image = temp_dir().map_err(|e| e.to_string())?;
        let file = image.path().join("fs.img");
        let mount = temp_dir().map_err(|e| e.to_string())?;
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| e.to_string())?;
        sh(
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file),
            "mkfs.ext4",
        )?;
        sh(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&file)
                .arg(mount.path()),
            "mount -o loop",
        )?;
        Ok(LoopFs {
            mount,
            _image: image,
        })
    }

    fn path(&self) -> &Path {
        self.mount.path()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(self.mount.path());
            sh(&mut cmd, "umount").is_ok()
        };
        if !umount(false) && !umount(true) {
            eprintln!("cannot unmount {}", self.mount.path().display());
        }
    }
}

/// A frozen file system (`fsfreeze -f`): every write to it blocks until the thaw, which
/// dropping this does. It must be dropped before anything blocked on it is waited for (the
/// gateway: a process in a frozen write cannot even be killed).
struct Frozen(PathBuf);

impl Frozen {
    fn freeze(path: &Path) -> Frozen {
        sh(Command::new("fsfreeze").arg("-f").arg(path), "fsfreeze -f").unwrap();
        Frozen(path.to_owned())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = sh(
            Command::new("fsfreeze").arg("-u").arg(&self.0),
            "fsfreeze -u",
        ) {
            eprintln!("{e}");
        }
    }
}

/// Concurrent QoS 1 publishes while the writer cannot take from its queue.
const BURST: usize = 8;

/// A broker, an observer and a gateway whose state dir is on a [`LoopFs`], with `[spool]
/// queue = 1` and `[http] queue_wait = 200ms`. Fields drop in order: the gateway first.
struct SpoolRig {
    gateway: Gateway,
    sub: Subscriber,
    _broker: Mosquitto,
    fs: LoopFs,
    addr: SocketAddr,
}

impl SpoolRig {
    fn start() -> SpoolRig {
        require_root("mounts an ext4 image and freezes it (fsfreeze) to stall the spool writer");
        let fs = LoopFs::mount().unwrap_or_else(|reason| {
            panic!("cannot mount a loop ext4 ({reason}): this test did not test anything")
        });
        let broker = Mosquitto::start().unwrap();
        let sub = Subscriber::start(broker.port(), &["sensors/#"]).unwrap();
        let mut cfg = GatewayConfig::new(broker.port()).unwrap();
        let http = HttpSetup::new()
            .unwrap()
            .devices(two_devices())
            .lines("queue_wait = \"200ms\"\nretry_after = \"3s\"\nrate_per_device = 0\n");
        cfg.extra_sections.push_str(&http.render().unwrap());
        // min_free_bytes: the image is small; the writer must stall, not refuse.
        cfg.extra_sections
            .push_str("\n[spool]\nqueue = 1\nmin_free_bytes = \"0B\"\n");
        let text = cfg.render(&fs.path().join("state"));
        let gateway = Gateway::start_in(temp_dir().unwrap(), &text, cfg.sn_addr()).unwrap();
        let addr = http.addr();
        wait_http_ready(addr).unwrap();
        let mut rig = SpoolRig {
            gateway,
            sub,
            _broker: broker,
            fs,
            addr,
        };
        let r = publish(addr, "warm-up").unwrap();
        assert_eq!(r.status, 200, "{}", r.describe());
        assert_eq!(rig.sub.expect().unwrap().payload, b"warm-up");
        rig
    }

    /// The payloads the broker gets up to a `marker` published now (the spool forwards in
    /// order: they are exactly what was stored before it).
    fn stored_before_marker(&mut self) -> BTreeSet<Vec<u8>> {
        let r = publish(self.addr, "marker").unwrap();
        assert_eq!(r.status, 200, "{}", r.describe());
        let mut got = BTreeSet::new();
        loop {
            let m = self
                .sub
                .next(WAIT)
                .unwrap()
                .unwrap_or_else(|| panic!("no marker; got {got:?}\n{}", self.gateway.log()));
            if m.payload == b"marker" {
                return got;
            }
            got.insert(m.payload);
        }
    }
}

/// One QoS 1 publish of `payload` on its own connection; `Err`: the connection closed
/// without an answer.
fn publish(addr: SocketAddr, payload: &str) -> Result<Reply, String> {
    let mut c = RawHttp::connect(addr).map_err(|e| format!("{e:#}"))?;
    c.send(&request(
        "POST",
        "/v1/publish/sensors/dev1/busy?qos=1",
        &[&bearer(TOKEN1), "Connection: close"],
        payload.as_bytes(),
    ))
    .map_err(|e| format!("{e:#}"))?;
    c.read_reply(Duration::from_secs(120))
        .map_err(|e| format!("{e:#}"))
}

/// [`BURST`] concurrent publishes (`burst-<i>`), each on its own thread; every outcome comes
/// on the channel.
fn burst(addr: SocketAddr) -> mpsc::Receiver<(String, Result<Reply, String>)> {
    let (tx, rx) = mpsc::channel();
    for i in 0..BURST {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let payload = format!("burst-{i}");
            let outcome = publish(addr, &payload);
            let _ = tx.send((payload, outcome));
        });
    }
    rx
}

/// Waits for the first outcome of a burst while the writer is stuck: a 503 busy.
fn first_busy(
    rx: &mpsc::Receiver<(String, Result<Reply, String>)>,
) -> (String, Result<Reply, String>) {
    let (payload, outcome) = rx.recv_timeout(WAIT).expect("no answer while frozen");
    let busy = outcome.as_ref().unwrap();
    check(busy, 503, "busy");
    assert_eq!(busy.header("retry-after"), Some("3"), "{}", busy.describe());
    (payload, outcome)
}

#[test]
#[ignore = "needs root: freezes a loop-mounted ext4 to stall the spool writer"]
fn a_writer_queue_full_past_queue_wait_is_503_busy_and_every_200_arrives() {
    let mut rig = SpoolRig::start();
    // Declared after the rig: thawed before the gateway is killed, even on a panic (a process
    // in a frozen write cannot even be killed).
    let frozen = Frozen::freeze(rig.fs.path());
    let rx = burst(rig.addr);
    // The writer is stuck in a write and its queue holds at most one: the others wait
    // `queue_wait` for room, then get 503 busy while the file system is still frozen.
    let mut outcomes = vec![first_busy(&rx)];
    drop(frozen);
    outcomes.extend(rx.iter());
    assert_eq!(outcomes.len(), BURST);

    let mut acked = BTreeSet::new();
    for (payload, outcome) in &outcomes {
        let r = outcome.as_ref().unwrap();
        match r.status {
            200 => {
                acked.insert(payload.clone().into_bytes());
            }
            _ => check(r, 503, "busy"),
        }
    }
    eprintln!(
        "{} of {BURST} acknowledged, the others 503 busy",
        acked.len()
    );
    assert!(!acked.is_empty(), "no request was appended at all");
    assert!(acked.len() < BURST, "every request was appended");
    assert_eq!(
        rig.stored_before_marker(),
        acked,
        "the stored messages are not exactly the 200s"
    );
}

#[test]
#[ignore = "needs root: freezes a loop-mounted ext4 to stall the spool writer"]
fn at_sigterm_a_request_waiting_for_its_verdict_gets_no_error_status() {
    let mut rig = SpoolRig::start();
    let frozen = Frozen::freeze(rig.fs.path());
    let rx = burst(rig.addr);
    let mut outcomes = vec![first_busy(&rx)];
    // Some requests are appended and wait for their verdict; the gateway stops meanwhile. The
    // server lets them run for its grace (HTTP_GRACE), then drops their connections: no
    // status at all, since their messages may yet be stored. Never an error.
    send_signal(rig.gateway.pid().unwrap(), "TERM").unwrap();
    outcomes.extend(rx.iter());
    assert_eq!(outcomes.len(), BURST);
    drop(frozen);

    let mut refused = BTreeSet::new();
    let mut unanswered = BTreeSet::new();
    for (payload, outcome) in &outcomes {
        match outcome {
            Ok(r) if r.status == 503 && r.error_code().as_deref() == Some("stopping") => {
                refused.insert(payload.clone().into_bytes());
            }
            Ok(r) => {
                check(r, 503, "busy");
                refused.insert(payload.clone().into_bytes());
            }
            Err(_) => {
                unanswered.insert(payload.clone().into_bytes());
            }
        }
    }
    eprintln!(
        "{} refused, {} left unanswered at the stop",
        refused.len(),
        unanswered.len()
    );
    assert!(
        !unanswered.is_empty(),
        "no request was waiting for its verdict"
    );
    let gw = &mut rig.gateway;
    let status = poll_until(
        "the gateway to exit after the thaw",
        WAIT,
        Duration::from_millis(50),
        || gw.exited(),
    )
    .unwrap();
    eprintln!("gateway exit: {status}");
    gw.restart().unwrap();
    wait_http_ready(rig.addr).unwrap();
    // Nothing refused was stored; what was left unanswered may have been (no promise either
    // way), nothing else.
    let stored = rig.stored_before_marker();
    let text: Vec<String> = stored
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    eprintln!("stored after the restart: {text:?}");
    assert!(
        stored.is_disjoint(&refused),
        "refused yet stored: {:?}",
        stored.intersection(&refused).collect::<Vec<_>>()
    );
    assert!(
        stored.is_subset(&unanswered),
        "stored {stored:?}, unanswered {unanswered:?}"
    );
}
