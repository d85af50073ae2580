//! CoAP at the byte level, with the raw client of `sensorgate_tests::coap` (hand-encoded from
//! RFC 7252 §3, checked first against libcoap's own server): a CON sent three times with one
//! Message ID is published once and answered with identical bytes; with `ack_wait = "0s"` an
//! empty ACK comes first and a separate CON 2.04 follows, retransmitted until ACKed; No-Response
//! suppresses a NON 2.04; a Block1 gap gets 4.08; GET without Observe answers 4.04 / 4.00; an
//! RST answering a CON or NON notification, or a GET with Observe=1, ends that observation (and
//! no notification follows); an unacknowledged CON notification is retransmitted (same bytes)
//! and then ends the observation; CoAP and MQTT-SN publishes reach each other's subscribers
//! once; a Ver 2 datagram is ignored, TKL 9 and a truncated option get an RST, an unknown
//! critical option 4.02; a flood of new peers past `max_peers` gets 5.03 with Max-Age, bounded
//! memory, and leaves the gateway serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use sensorgate_tests::coap::{
    ACK, CON, Msg, NON, RST, RawClient, block_value, codes, libcoap_client, opts,
};
use sensorgate_tests::sn::{Qos, SubTopic, TopicType};
use sensorgate_tests::{
    Rig, Script, Subscriber, UpMsg, free_tcp_port, free_udp_port, poll_until, publish_upstream,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched, after a positive sign that it would have.
const QUIET: Duration = Duration::from_secs(1);

fn rig(extra: &str, admin: bool) -> Rig {
    Rig::start_with(|c| {
        c.with_coap()?.coap(extra);
        if admin {
            c.admin = Some(free_tcp_port()?);
        }
        Ok(())
    })
    .unwrap()
}

fn put(c: &mut RawClient, target: &str, body: &[u8]) -> Msg {
    let (mid, token) = (c.mid(), c.token());
    Msg::request(CON, codes::PUT, mid, &token, target).with_payload(body)
}

/// Publishes a marker through `c` and asserts it is the next message at `sub`: whatever was
/// sent before and should not have been published was not.
fn assert_next_upstream_is_marker(c: &mut RawClient, sub: &mut Subscriber, topic: &str) {
    let req = put(c, &format!("ps/{topic}"), b"marker");
    let resp = c.request(&req, WAIT).unwrap();
    assert_eq!(resp.code, codes::CHANGED, "{}", resp.describe());
    let m = sub.expect().unwrap();
    assert_eq!((m.topic.as_str(), &m.payload[..]), (topic, &b"marker"[..]));
}

#[test]
fn the_raw_client_talks_to_libcoap_s_server() {
    let port = free_udp_port(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let server_bin = libcoap_client().with_file_name("coap-server-notls");
    let mut cmd = Command::new(&server_bin);
    cmd.args(["-A", "127.0.0.1", "-p", &port.to_string()]);
    let _server = Script::spawn("coap-server-notls", &mut cmd).unwrap();
    let mut c = RawClient::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).unwrap();
    // A ping is answered with an RST once the server is up.
    poll_until(
        "coap-server-notls to answer a ping",
        WAIT,
        Duration::ZERO,
        || {
            let ping = Msg::new(CON, codes::EMPTY, c.mid());
            c.send(&ping)?;
            Ok(c.recv(Duration::from_millis(200))?
                .filter(|m| m.ty == RST && m.mid == ping.mid))
        },
    )
    .unwrap();

    let req = put(&mut c, "example_data", b"raw-21.5");
    let resp = c.request(&req, WAIT).unwrap();
    assert_eq!((resp.ty, resp.mid), (ACK, req.mid), "{}", resp.describe());
    assert!(
        resp.code == codes::CREATED || resp.code == codes::CHANGED,
        "{}",
        resp.describe()
    );
    let (mid, token) = (c.mid(), c.token());
    let get = Msg::request(CON, codes::GET, mid, &token, "example_data");
    let resp = c.request(&get, WAIT).unwrap();
    assert_eq!(
        (resp.code, resp.text().as_str()),
        (codes::CONTENT, "raw-21.5")
    );
    assert_eq!(resp.token, token);

    let (mid, token) = (c.mid(), c.token());
    let get = Msg::request(NON, codes::GET, mid, &token, ".well-known/core");
    let resp = c.request(&get, WAIT).unwrap();
    assert_eq!(resp.code, codes::CONTENT, "{}", resp.describe());
    assert_eq!(resp.uint(opts::CONTENT_FORMAT), Some(40));
    assert!(resp.text().contains("</example_data>"), "{}", resp.text());
}

#[test]
fn a_con_put_sent_three_times_is_published_once_with_identical_acks() {
    let rig = rig("", false);
    let mut sub = rig.subscribe(&["dup/#"]).unwrap();
    let mut c = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let req = put(&mut c, "ps/dup/t?id=dup1", b"once");
    let bytes = req.encode();
    let mut acks = Vec::new();
    let mut others = Vec::new();
    for _ in 0..3 {
        c.send_raw(&bytes).unwrap();
        // The answer to this copy: the ACK with the request's MID (2.04 piggy-backed, or an
        // empty ACK when the verdict came later; a separate 2.04 is then ACKed and skipped).
        let ack = c
            .recv_matching(WAIT, &mut others, |m| m.ty == ACK && m.mid == req.mid)
            .unwrap()
            .unwrap_or_else(|| panic!("no ACK for {}", req.describe()));
        acks.push(ack.encode());
    }
    assert_eq!(acks[0], acks[1], "same bytes for a duplicate");
    assert_eq!(acks[0], acks[2], "same bytes for a duplicate");
    let m = sub.expect().unwrap();
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("dup/t", &b"once"[..]));

    // A NON sent twice with one MID: one publish, the same NON 2.04 twice.
    let (mid, token) = (c.mid(), c.token());
    let non = Msg::request(NON, codes::PUT, mid, &token, "ps/dup/non").with_payload(b"n");
    let mut answers = Vec::new();
    for _ in 0..2 {
        c.send(&non).unwrap();
        let r = c
            .recv_matching(WAIT, &mut others, |m| m.token == token)
            .unwrap()
            .expect("a NON 2.04");
        assert_eq!((r.ty, r.code), (NON, codes::CHANGED), "{}", r.describe());
        answers.push(r.encode());
    }
    assert_eq!(answers[0], answers[1]);
    let m = sub.expect().unwrap();
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("dup/non", &b"n"[..]));
    assert_next_upstream_is_marker(&mut c, &mut sub, "dup/marker");
}

#[test]
fn a_block1_gap_gets_4_08_and_publishes_nothing() {
    let rig = rig("", false);
    let mut sub = rig.subscribe(&["gap/#"]).unwrap();
    let mut c = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let token = c.token();
    let block = |c: &mut RawClient, num: u32, more: bool| {
        Msg::request(CON, codes::PUT, c.mid(), &token, "ps/gap/t")
            .with_uint(opts::BLOCK1, block_value(num, more, 2))
            .with_payload(&[b'a' + num as u8; 64])
    };
    let b0 = block(&mut c, 0, true);
    let resp = c.request(&b0, WAIT).unwrap();
    assert_eq!(resp.code, codes::CONTINUE, "{}", resp.describe());
    assert_eq!(
        resp.block(opts::BLOCK1),
        Some((0, true, 2)),
        "{}",
        resp.describe()
    );
    // Block 1 never sent: block 2 leaves a gap.
    let b2 = block(&mut c, 2, false);
    let resp = c.request(&b2, WAIT).unwrap();
    assert_eq!(
        resp.code,
        codes::REQUEST_ENTITY_INCOMPLETE,
        "{}",
        resp.describe()
    );
    assert_next_upstream_is_marker(&mut c, &mut sub, "gap/marker");
}

/// Registers an observation of `target` from `c`; returns the token.
fn observe(c: &mut RawClient, target: &str) -> Vec<u8> {
    let (mid, token) = (c.mid(), c.token());
    let req = Msg::request(CON, codes::GET, mid, &token, target).with_uint(opts::OBSERVE, 0);
    let resp = c.request(&req, WAIT).unwrap();
    assert_eq!(resp.code, codes::CONTENT, "{}", resp.describe());
    assert!(resp.option(opts::OBSERVE).is_some(), "{}", resp.describe());
    token
}

/// The next notification with `token` and payload `payload`.
fn notification(c: &RawClient, token: &[u8], payload: &[u8]) -> Msg {
    let mut skipped = Vec::new();
    c.recv_matching(WAIT, &mut skipped, |m| {
        m.token == token && m.payload == payload && m.option(opts::OBSERVE).is_some()
    })
    .unwrap()
    .unwrap_or_else(|| {
        panic!(
            "no notification {payload:?}; got {:?}",
            skipped.iter().map(Msg::describe).collect::<Vec<_>>()
        )
    })
}

fn filters(rig: &Rig, client_id: &str) -> Vec<String> {
    let (code, body) = rig
        .gateway
        .admin_get(&format!("/clients?prefix={client_id}"))
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    page["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["client_id"] == client_id)
        .flat_map(|c| c["subscriptions"].as_array().cloned().unwrap_or_default())
        .map(|s| s["filter"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn an_rst_answering_a_con_notification_cancels_the_observation() {
    let rig = rig("", true);
    let mut a = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let mut b = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let ta = observe(&mut a, "ps/cmd/raw?id=raw-a");
    let tb = observe(&mut b, "ps/cmd/raw?id=raw-b");
    assert_eq!(filters(&rig, "raw-a"), ["cmd/raw"]);

    publish_upstream(rig.broker.port(), &[UpMsg::new("cmd/raw", b"one", 1)]).unwrap();
    let n = notification(&a, &ta, b"one");
    assert_eq!(
        n.ty,
        CON,
        "QoS 1 downlink: a CON notification: {}",
        n.describe()
    );
    a.send(&Msg::empty(RST, n.mid)).unwrap();
    let n = notification(&b, &tb, b"one");
    if n.ty == CON {
        b.send(&Msg::empty(ACK, n.mid)).unwrap();
    }
    poll_until(
        "raw-a's observation gone",
        WAIT,
        Duration::from_millis(100),
        || Ok(filters(&rig, "raw-a").is_empty().then_some(())),
    )
    .unwrap();

    // The next message reaches b, and nothing reaches a.
    publish_upstream(rig.broker.port(), &[UpMsg::new("cmd/raw", b"two", 1)]).unwrap();
    let n = notification(&b, &tb, b"two");
    if n.ty == CON {
        b.send(&Msg::empty(ACK, n.mid)).unwrap();
    }
    a.assert_silent(QUIET).unwrap();
}

#[test]
fn malformed_datagrams_get_rst_silence_or_4_02() {
    let rig = rig("", false);
    let mut sub = rig.subscribe(&["bad/#"]).unwrap();
    let mut c = RawClient::new(rig.gateway.coap_addr()).unwrap();

    // Ver 2: silently ignored (RFC 7252 §3). A ping right after is the first thing answered.
    let mut v2 = put(&mut c, "ps/bad/v2", b"v2");
    v2.ver = 2;
    c.send(&v2).unwrap();
    let ping = Msg::new(CON, codes::EMPTY, c.mid());
    c.send(&ping).unwrap();
    let first = c.recv(WAIT).unwrap().expect("an RST for the ping");
    assert_eq!(
        (first.ty, first.mid),
        (RST, ping.mid),
        "{}",
        first.describe()
    );

    // TKL 9 is a message format error: RST (RFC 7252 §3, §4.2).
    let mid = c.mid();
    let mut tkl9 = vec![0x49, codes::GET, (mid >> 8) as u8, mid as u8];
    tkl9.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    tkl9.extend_from_slice(&[0xb2, b'p', b's']);
    c.send_raw(&tkl9).unwrap();
    let r = c.recv(WAIT).unwrap().expect("an RST for TKL 9");
    assert_eq!(
        (r.ty, r.code, r.mid),
        (RST, codes::EMPTY, mid),
        "{}",
        r.describe()
    );

    // An unrecognized critical option (9, odd): 4.02 Bad Option, piggy-backed.
    let req = put(&mut c, "ps/bad/opt9", b"x").with_option(9, b"?");
    let r = c.request(&req, WAIT).unwrap();
    assert_eq!(r.code, codes::BAD_OPTION, "{}", r.describe());
    assert_eq!(r.token, req.token);

    // An option whose length runs past the end: format error, RST.
    let mid = c.mid();
    let truncated = vec![0x40, codes::PUT, (mid >> 8) as u8, mid as u8, 0xb5, b'p'];
    c.send_raw(&truncated).unwrap();
    let r = c
        .recv(WAIT)
        .unwrap()
        .expect("an RST for a truncated option");
    assert_eq!((r.ty, r.mid), (RST, mid), "{}", r.describe());

    // An empty message (0.00) with a token, and a payload marker with no payload, are format
    // errors too (RFC 7252 §4.1, §3).
    let mid = c.mid();
    c.send_raw(&[0x41, codes::EMPTY, (mid >> 8) as u8, mid as u8, 7])
        .unwrap();
    let r = c
        .recv(WAIT)
        .unwrap()
        .expect("an RST for an empty CON with a token");
    assert_eq!((r.ty, r.mid), (RST, mid), "{}", r.describe());
    let mid = c.mid();
    let marker_only = [
        0x40,
        codes::PUT,
        (mid >> 8) as u8,
        mid as u8,
        0xb2,
        b'p',
        b's',
        0xff,
    ];
    c.send_raw(&marker_only).unwrap();
    let r = c
        .recv(WAIT)
        .unwrap()
        .expect("an RST for a marker with no payload");
    assert_eq!((r.ty, r.mid), (RST, mid), "{}", r.describe());

    // A datagram larger than max_message_size (1152) : 4.13 with a Size1 hint.
    let req = put(&mut c, "ps/bad/huge", &[b'x'; 1300]);
    let r = c.request(&req, WAIT).unwrap();
    assert_eq!(r.code, codes::REQUEST_ENTITY_TOO_LARGE, "{}", r.describe());
    assert!(r.uint(opts::SIZE1).is_some(), "{}", r.describe());

    // None of them was published; the gateway still serves.
    assert_next_upstream_is_marker(&mut c, &mut sub, "bad/marker");
}

/// Bound on the gateway's RSS growth over the flood.
const RSS_GROWTH_KIB: u64 = 16 * 1024;

/// Resident set size of `pid`, KiB (`VmRSS` in /proc).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

#[test]
fn a_flood_of_new_peers_past_max_peers_gets_5_03_and_the_gateway_keeps_serving() {
    const PEERS: usize = 5_000;
    const MAX: usize = 1_000;
    const BATCH: usize = 50;
    let mut rig = rig(&format!("max_peers = {MAX}\n"), true);
    let server = rig.gateway.coap_addr();
    let rss_before = rss_kib(rig.gateway.pid().unwrap());
    // Each peer its own loopback address: an observation keeps it from being evicted.
    let local = |i: usize| IpAddr::V4(Ipv4Addr::new(127, 77, (i / 250) as u8, (i % 250 + 1) as u8));
    let (mut content, mut busy) = (0usize, 0usize);
    for start in (0..PEERS).step_by(BATCH) {
        let mut batch = Vec::with_capacity(BATCH);
        for i in start..(start + BATCH).min(PEERS) {
            let mut c = RawClient::bind(server, local(i)).unwrap();
            let (mid, token) = (c.mid(), c.token());
            let req = Msg::request(CON, codes::GET, mid, &token, "ps/flood/t?qos=0")
                .with_uint(opts::OBSERVE, 0);
            c.send(&req).unwrap();
            batch.push((c, req));
        }
        for (c, req) in &batch {
            // One retransmission if the first copy got lost in a full socket buffer.
            let mut answer = c.recv(Duration::from_secs(3)).unwrap();
            if answer.is_none() {
                c.send(req).unwrap();
                answer = c.recv(WAIT).unwrap();
            }
            let m = answer.unwrap_or_else(|| panic!("no answer to {}", req.describe()));
            assert_eq!((m.ty, m.mid), (ACK, req.mid), "{}", m.describe());
            match m.code {
                codes::CONTENT => content += 1,
                codes::SERVICE_UNAVAILABLE => {
                    assert!(m.uint(opts::MAX_AGE).is_some(), "5.03 without Max-Age");
                    busy += 1;
                }
                _ => panic!("unexpected {}", m.describe()),
            }
        }
    }
    eprintln!(
        "{content} admitted, {busy} refused, RSS {} KiB before",
        rss_before
    );
    assert!(content <= MAX, "{content} peers admitted, max_peers {MAX}");
    assert!(busy >= PEERS - MAX, "{busy} refused");

    let (_, body) = rig.gateway.admin_get("/status").unwrap();
    let doc: Value = serde_json::from_str(&body).unwrap();
    let coap = doc["protocols"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["protocol"] == "coap")
        .unwrap_or_else(|| panic!("no coap protocol in {body}"));
    let peers = coap["sessions_total"].as_u64().unwrap();
    assert!(peers as usize <= MAX, "{peers} peers tracked: {body}");
    // Refused peers leave no state behind: memory grows with the admitted ones only (a
    // generous bound: 1,000 peers with one observation each are far below it).
    let grown = rss_kib(rig.gateway.pid().unwrap()).saturating_sub(rss_before);
    eprintln!("RSS grew by {grown} KiB");
    assert!(grown < RSS_GROWTH_KIB, "RSS grew by {grown} KiB");

    // A fresh device is served or refused (bounded), and the gateway is alive.
    let mut fresh = RawClient::bind(server, IpAddr::V4(Ipv4Addr::new(127, 78, 0, 1))).unwrap();
    let req = put(&mut fresh, "ps/flood/fresh", b"f");
    let r = fresh.request(&req, WAIT).unwrap();
    assert!(
        r.code == codes::CHANGED || r.code == codes::SERVICE_UNAVAILABLE,
        "{}",
        r.describe()
    );
    assert!(rig.gateway.is_running());
    let ping = Msg::new(CON, codes::EMPTY, fresh.mid());
    fresh.send(&ping).unwrap();
    let r = fresh.recv(WAIT).unwrap().expect("a ping answered");
    assert_eq!((r.ty, r.mid), (RST, ping.mid));
}

#[test]
fn with_ack_wait_0_an_empty_ack_comes_first_then_a_separate_con_2_04_retransmitted_until_acked() {
    let rig = rig("ack_wait = \"0s\"\n", false);
    let mut sub = rig.subscribe(&["sep/#"]).unwrap();
    let mut c = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let req = put(&mut c, "ps/sep/t", b"durable");
    c.send(&req).unwrap();
    let ack = c.recv(WAIT).unwrap().expect("an empty ACK");
    assert_eq!(
        (ack.ty, ack.code, ack.mid),
        (ACK, codes::EMPTY, req.mid),
        "{}",
        ack.describe()
    );
    // The separate response: a CON 2.04 with the request's token and a MID of the gateway's.
    let first = c.recv(WAIT).unwrap().expect("a separate 2.04");
    assert_eq!(
        (first.ty, first.code),
        (CON, codes::CHANGED),
        "{}",
        first.describe()
    );
    assert_eq!(first.token, req.token);
    // A duplicate of the request now gets the empty ACK again, and no second publish.
    c.send(&req).unwrap();
    let mut skipped = Vec::new();
    let again = c
        .recv_matching(WAIT, &mut skipped, |m| m.ty == ACK && m.mid == req.mid)
        .unwrap()
        .expect("an empty ACK for the duplicate");
    assert_eq!(again.code, codes::EMPTY, "{}", again.describe());
    // Unacknowledged, the separate response is retransmitted (ACK_TIMEOUT 2 s .. 3 s), same
    // MID; once ACKed, it stops. (recv_matching ACKed the retransmissions it skipped, if any.)
    let retransmitted = match skipped.iter().find(|m| m.ty == CON) {
        Some(m) => m.clone(),
        None => c.recv(WAIT).unwrap().expect("a retransmitted 2.04"),
    };
    assert_eq!(retransmitted.encode(), first.encode(), "same bytes");
    c.send(&Msg::empty(ACK, first.mid)).unwrap();
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("sep/t", &b"durable"[..])
    );
    assert_next_upstream_is_marker(&mut c, &mut sub, "sep/marker");
}

#[test]
fn no_response_suppresses_the_2_04_of_a_non_put() {
    let rig = rig("", false);
    let mut sub = rig.subscribe(&["nr/#"]).unwrap();
    let mut c = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let (mid, token) = (c.mid(), c.token());
    // No-Response 2: not interested in 2.xx (RFC 7967).
    let req = Msg::request(NON, codes::PUT, mid, &token, "ps/nr/t")
        .with_uint(opts::NO_RESPONSE, 2)
        .with_payload(b"quiet");
    c.send(&req).unwrap();
    let m = sub.expect().unwrap();
    assert_eq!((m.topic.as_str(), m.qos), ("nr/t", 0));
    // The published message is past the gateway; its answer would have come before it.
    c.assert_silent(QUIET).unwrap();
}

#[test]
fn get_without_observe_answers_4_04_unknown_and_4_00_for_a_wildcard() {
    let rig = rig("", false);
    let mut c = RawClient::new(rig.gateway.coap_addr()).unwrap();
    for (target, want) in [
        ("ps/never/published", codes::NOT_FOUND),
        // A wildcard filter can be observed, not read.
        ("ps/cmd/+", codes::BAD_REQUEST),
        ("ps", codes::BAD_REQUEST),
    ] {
        let (mid, token) = (c.mid(), c.token());
        let req = Msg::request(CON, codes::GET, mid, &token, target);
        let r = c.request(&req, WAIT).unwrap();
        assert_eq!(r.code, want, "{target}: {}", r.describe());
    }
}

#[test]
fn a_non_registration_gets_non_notifications_for_qos_0_and_an_rst_cancels_it() {
    let rig = rig("", true);
    let mut a = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let mut b = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let (mid, ta) = (a.mid(), a.token());
    let reg =
        Msg::request(NON, codes::GET, mid, &ta, "ps/cmd/non?id=non-a").with_uint(opts::OBSERVE, 0);
    let r = a.request(&reg, WAIT).unwrap();
    assert_eq!((r.ty, r.code), (NON, codes::CONTENT), "{}", r.describe());
    let tb = observe(&mut b, "ps/cmd/non?id=non-b");
    assert_eq!(filters(&rig, "non-a"), ["cmd/non"]);

    publish_upstream(rig.broker.port(), &[UpMsg::new("cmd/non", b"n1", 0)]).unwrap();
    let n = notification(&a, &ta, b"n1");
    assert_eq!(n.ty, NON, "QoS 0: a NON notification: {}", n.describe());
    a.send(&Msg::empty(RST, n.mid)).unwrap();
    notification(&b, &tb, b"n1");
    poll_until(
        "non-a's observation gone",
        WAIT,
        Duration::from_millis(100),
        || Ok(filters(&rig, "non-a").is_empty().then_some(())),
    )
    .unwrap();
    publish_upstream(rig.broker.port(), &[UpMsg::new("cmd/non", b"n2", 0)]).unwrap();
    notification(&b, &tb, b"n2");
    a.assert_silent(QUIET).unwrap();
}

#[test]
fn observe_1_ends_the_observation() {
    let rig = rig("", true);
    let mut a = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let ta = observe(&mut a, "ps/cmd/bye?id=bye-a");
    assert_eq!(filters(&rig, "bye-a"), ["cmd/bye"]);
    let (mid, _) = (a.mid(), a.token());
    let cancel =
        Msg::request(CON, codes::GET, mid, &ta, "ps/cmd/bye?id=bye-a").with_uint(opts::OBSERVE, 1);
    let r = a.request(&cancel, WAIT).unwrap();
    // Answered like a plain GET: nothing retained -> 4.04 (or 2.05 with a value).
    assert!(
        r.code == codes::NOT_FOUND || r.code == codes::CONTENT,
        "{}",
        r.describe()
    );
    assert!(filters(&rig, "bye-a").is_empty());
    // Nothing observes cmd/bye any more: a message there reaches nobody.
    publish_upstream(rig.broker.port(), &[UpMsg::new("cmd/bye", b"gone", 1)]).unwrap();
    a.assert_silent(QUIET).unwrap();
}

#[test]
fn a_proxy_uri_request_gets_5_05_proxying_not_supported() {
    let rig = rig("", false);
    let mut c = RawClient::new(rig.gateway.coap_addr()).unwrap();
    // Proxy-Uri (35): the gateway is no forward proxy (RFC 7252 §5.7.2).
    let (mid, token) = (c.mid(), c.token());
    let mut req = Msg::new(CON, codes::GET, mid).with_option(35, b"coap://192.0.2.1/x");
    req.token = token;
    let r = c.request(&req, WAIT).unwrap();
    assert_eq!(
        r.code,
        sensorgate_tests::coap::code(5, 5),
        "{}",
        r.describe()
    );
}

#[test]
fn publishes_on_the_gateway_reach_coap_observers_and_mqtt_sn_subscribers_once() {
    let rig = rig("", false);
    let mut obs = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let mut dev = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let token = observe(&mut obs, "ps/loc/t");
    let mut sn = rig.connected("sn-loc").unwrap();
    sn.subscribe_ok(Qos::One, SubTopic::Name("loc/t")).unwrap();

    // A CoAP PUT: the CoAP observer and the MQTT-SN subscriber each get it once.
    let req = put(&mut dev, "ps/loc/t", b"from-coap");
    let r = dev.request(&req, WAIT).unwrap();
    assert_eq!(r.code, codes::CHANGED, "{}", r.describe());
    let n = notification(&obs, &token, b"from-coap");
    if n.ty == CON {
        obs.send(&Msg::empty(ACK, n.mid)).unwrap();
    }
    let d = sn.downlink(1, WAIT).unwrap();
    assert_eq!(d[0].payload, b"from-coap");

    // An MQTT-SN publish reaches the CoAP observer, also once.
    let id = sn.register("loc/t").unwrap();
    sn.publish_qos1_ok(TopicType::Normal, id, b"from-sn")
        .unwrap();
    let n = notification(&obs, &token, b"from-sn");
    if n.ty == CON {
        obs.send(&Msg::empty(ACK, n.mid)).unwrap();
    }
    // The MQTT-SN publisher's own copy (it subscribed) marks that both went around.
    let d = sn.downlink(1, WAIT).unwrap();
    assert_eq!(d[0].payload, b"from-sn");
    obs.assert_silent(QUIET).unwrap();
    // Nothing more for the MQTT-SN client either (no second copy of either message).
    sn.assert_no_reply().unwrap();
}

#[test]
fn an_unacknowledged_con_notification_is_retransmitted_then_the_observation_ends() {
    // Short RFC timers so exhaustion comes within seconds; every 2nd notification is CON.
    let rig = rig(
        "ack_timeout = \"200ms\"\nack_wait = \"100ms\"\nmax_retransmit = 2\n\
         notification_check_count = 2\n",
        true,
    );
    let mut a = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let token = observe(&mut a, "ps/cmd/t?id=tm&qos=0");
    publish_upstream(
        rig.broker.port(),
        &[UpMsg::new("cmd/t", b"a", 0), UpMsg::new("cmd/t", b"b", 0)],
    )
    .unwrap();
    let n = notification(&a, &token, b"a");
    assert_eq!(n.ty, NON, "QoS 0: NON: {}", n.describe());
    // The 2nd goes CON (notification_check_count) to learn whether the observer is alive.
    let con = notification(&a, &token, b"b");
    assert_eq!(con.ty, CON, "{}", con.describe());
    // Never acknowledged: sent again max_retransmit times, the same bytes each time.
    for i in 0..2 {
        let again = a
            .recv(WAIT)
            .unwrap()
            .unwrap_or_else(|| panic!("retransmission {i} missing"));
        assert_eq!(again.encode(), con.encode(), "retransmission {i}");
    }
    // Then the observer counts as gone: the observation ends and nothing more comes.
    poll_until(
        "the observation gone",
        WAIT,
        Duration::from_millis(100),
        || Ok(filters(&rig, "tm").is_empty().then_some(())),
    )
    .unwrap();
    publish_upstream(rig.broker.port(), &[UpMsg::new("cmd/t", b"c", 0)]).unwrap();
    a.assert_silent(QUIET).unwrap();
}
