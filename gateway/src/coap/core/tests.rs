//! Deterministic core tests: a virtual clock, datagrams built by hand (RFC 7252 section 3) in,
//! datagrams decoded with [`msg::decode`] and events out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sensorgate_bridges::message::{Protocol, Qos};

use super::*;
use crate::coap::msg::{self, Block, Code, Message, MessageType};

const CON: u8 = 0;
const NON: u8 = 1;
const ACK: u8 = 2;
const RST: u8 = 3;
const GET: u8 = 0x01;
const POST: u8 = 0x02;
const PUT: u8 = 0x03;
const DELETE: u8 = 0x04;

fn peer(port: u16) -> Peer {
    Peer::udp(0, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
}

/// Writes one option (delta/length nibbles with their extensions).
fn option(out: &mut Vec<u8>, delta: u16, value: &[u8]) {
    fn nibble(n: usize) -> (u8, Vec<u8>) {
        match n {
            0..=12 => (n as u8, vec![]),
            13..=268 => (13, vec![(n - 13) as u8]),
            _ => (14, ((n - 269) as u16).to_be_bytes().to_vec()),
        }
    }
    let (d, de) = nibble(usize::from(delta));
    let (l, le) = nibble(value.len());
    out.push((d << 4) | l);
    out.extend(de);
    out.extend(le);
    out.extend_from_slice(value);
}

/// A request datagram: `uri` is `path?query&query`, `extra` more options.
fn request(
    ty: u8,
    code: u8,
    mid: u16,
    token: &[u8],
    uri: &str,
    extra: &[(u16, Vec<u8>)],
    payload: &[u8],
) -> Vec<u8> {
    let mut opts: Vec<(u16, Vec<u8>)> = extra.to_vec();
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        opts.push((11, seg.as_bytes().to_vec()));
    }
    for q in query.split('&').filter(|s| !s.is_empty()) {
        opts.push((15, q.as_bytes().to_vec()));
    }
    opts.sort_by_key(|(n, _)| *n);
    let mut out = vec![0x40 | (ty << 4) | token.len() as u8, code];
    out.extend(mid.to_be_bytes());
    out.extend_from_slice(token);
    let mut last = 0;
    for (n, v) in &opts {
        option(&mut out, n - last, v);
        last = *n;
    }
    if !payload.is_empty() {
        out.push(0xFF);
        out.extend_from_slice(payload);
    }
    out
}

fn empty(ty: u8, mid: u16) -> Vec<u8> {
    let mut out = vec![0x40 | (ty << 4), 0];
    out.extend(mid.to_be_bytes());
    out
}

fn test_config() -> CoreConfig {
    CoreConfig {
        max_peers: 8,
        ..CoreConfig::default()
    }
}

struct Harness {
    core: Core,
    now: Instant,
    start: Instant,
}

impl Harness {
    #[allow(clippy::disallowed_methods)] // The virtual clock starts at an arbitrary instant.
    fn new(config: CoreConfig) -> Self {
        let now = Instant::now();
        Harness {
            core: Core::new(config, 7),
            now,
            start: now,
        }
    }

    fn send(&mut self, port: u16, datagram: &[u8]) {
        self.core.handle_datagram(self.now, peer(port), datagram);
        self.core.check_invariants();
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.core.handle_timeout(self.now);
        self.core.check_invariants();
    }

    /// Advances to the next deadline (if any); returns whether there was one.
    fn step(&mut self) -> bool {
        match self.core.poll_timeout() {
            Some(at) => {
                self.now = self.now.max(at);
                self.core.handle_timeout(self.now);
                self.core.check_invariants();
                true
            }
            None => false,
        }
    }

    fn raw(&mut self) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(p) = self.core.poll_transmit(&mut buf) {
            assert!(buf.len() <= self.core.config().max_message_size);
            let PeerAddr::Udp { addr, .. } = p.addr else {
                panic!("udp only")
            };
            out.push((addr.port(), buf.clone()));
        }
        out
    }

    fn out(&mut self) -> Vec<(u16, Message)> {
        self.raw()
            .into_iter()
            .map(|(p, b)| (p, msg::decode(&b).expect("the core sends valid CoAP")))
            .collect()
    }

    /// The one datagram expected, to `port`.
    fn one(&mut self, port: u16) -> Message {
        let out = self.out();
        assert_eq!(out.len(), 1, "expected one datagram, got {out:?}");
        let (p, m) = out.into_iter().next().unwrap();
        assert_eq!(p, port);
        m
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.core.poll_event()).collect()
    }

    /// The events, with every Subscribe answered `accepted` (as the driver does).
    fn events_answered(&mut self, accepted: bool) -> Vec<Event> {
        let events = self.events();
        for e in &events {
            if let Event::Subscribe { filter, .. } = e {
                self.core
                    .handle_subscribe_result(self.now, filter, accepted);
            }
        }
        self.core.check_invariants();
        events
    }

    fn publish_token(&mut self) -> (Upstream, Option<u64>) {
        let events = self.events();
        assert_eq!(events.len(), 1, "{events:?}");
        match events.into_iter().next().unwrap() {
            Event::Publish { message, token } => (message, token),
            other => panic!("not a publish: {other:?}"),
        }
    }

    fn verdict(&mut self, token: u64, outcome: PublishOutcome) {
        self.core.handle_publish_result(self.now, token, outcome);
        self.core.check_invariants();
    }

    /// Registers an observation of `uri` from `port` with `token` (CON), answered; returns the
    /// registration's Observe value.
    fn observe(&mut self, port: u16, mid: u16, token: &[u8], uri: &str) -> u32 {
        self.send(
            port,
            &request(CON, GET, mid, token, uri, &[(6, vec![])], b""),
        );
        let _ = self.events_answered(true);
        let m = self.one(port);
        assert_eq!(
            (m.ty, m.code, m.message_id),
            (MessageType::Ack, Code::CONTENT, mid)
        );
        assert_eq!(m.token.as_bytes(), token);
        m.observe.expect("registration answer carries Observe")
    }

    fn downlink(&mut self, topic: &str, payload: &'static [u8], qos: Qos) -> usize {
        let o = self.core.handle_downlink(
            self.now,
            topic,
            Bytes::from_static(payload),
            qos,
            false,
            None,
        );
        self.core.check_invariants();
        assert_eq!(o.persisted, 0);
        o.queued
    }
}

// ---------------------------------------------------------------------------------------
// Uplink: the request table.

#[test]
fn con_put_is_answered_piggybacked_after_the_verdict() {
    let mut h = Harness::new(test_config());
    h.send(
        1,
        &request(
            CON,
            PUT,
            0x1234,
            b"tk",
            "/ps/sensors/t1?id=dev1",
            &[],
            b"21.5",
        ),
    );
    let (message, token) = h.publish_token();
    assert_eq!(message.topic, "sensors/t1");
    assert_eq!(&message.payload[..], b"21.5");
    assert_eq!(message.qos, Qos::AtLeastOnce);
    assert!(!message.retain);
    assert_eq!(message.origin.protocol, Protocol::Coap);
    assert_eq!(message.origin.client_id.as_deref(), Some("dev1"));
    assert_eq!(message.origin.peer.as_deref(), Some("127.0.0.1:1"));
    // Nothing before the verdict (durable first).
    assert!(h.out().is_empty());
    h.advance(Duration::from_millis(100));
    assert!(h.out().is_empty());
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.code, m.message_id, m.token.as_bytes()),
        (MessageType::Ack, Code::CHANGED, 0x1234, &b"tk"[..])
    );
    assert_eq!(h.core.stats().acks, 1);
    assert_eq!(h.core.report().counters.messages_in, [0, 0, 1, 0]);
}

#[test]
fn post_and_queries_qos_retain_clientid() {
    let mut h = Harness::new(test_config());
    h.send(
        1,
        &request(
            CON,
            POST,
            1,
            b"a",
            "/ps/x?qos=2&retain=true&clientid=c9&token=secret",
            &[],
            b"v",
        ),
    );
    let (message, token) = h.publish_token();
    assert_eq!(message.qos, Qos::ExactlyOnce);
    assert!(message.retain);
    assert_eq!(message.origin.client_id.as_deref(), Some("c9"));
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    assert_eq!(h.one(1).code, Code::CHANGED);
    // id wins over clientid; qos=0 on a CON is answered at once without a token.
    h.send(
        1,
        &request(
            CON,
            PUT,
            2,
            b"b",
            "/ps/x?clientid=c9&id=d1&qos=0",
            &[],
            b"v",
        ),
    );
    let (message, token) = h.publish_token();
    assert_eq!(token, None);
    assert_eq!(message.qos, Qos::AtMostOnce);
    assert_eq!(message.origin.client_id.as_deref(), Some("d1"));
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Ack, Code::CHANGED, 2)
    );
    // Without an identity query the origin has no client id, only the address.
    h.send(1, &request(NON, PUT, 3, b"c", "/ps/x", &[], b"v"));
    let (message, token) = h.publish_token();
    assert_eq!((message.qos, token), (Qos::AtMostOnce, None));
    assert_eq!(message.origin.client_id, None);
    let m = h.one(1);
    assert_eq!((m.ty, m.code), (MessageType::Non, Code::CHANGED));
    assert_eq!(m.token.as_bytes(), b"c");
}

#[test]
fn late_verdict_gets_empty_ack_then_separate_con_retransmitted_until_acked() {
    let mut h = Harness::new(test_config());
    h.send(1, &request(CON, PUT, 7, b"tok", "/ps/a", &[], b"1"));
    let (_, token) = h.publish_token();
    h.advance(Duration::from_millis(499));
    assert!(h.out().is_empty());
    h.advance(Duration::from_millis(1));
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Ack, Code::EMPTY, 7)
    );
    h.advance(Duration::from_secs(3));
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let first = h.raw();
    assert_eq!(first.len(), 1);
    let m = msg::decode(&first[0].1).unwrap();
    assert_eq!((m.ty, m.code), (MessageType::Con, Code::CHANGED));
    assert_eq!(m.token.as_bytes(), b"tok");
    let sent_at = h.now;
    // Retransmissions: the first after [2 s, 3 s], then doubling; identical bytes.
    let mut gaps = Vec::new();
    let mut last = sent_at;
    for _ in 0..2 {
        assert!(h.step());
        let again = h.raw();
        assert_eq!(again, first);
        gaps.push(h.now - last);
        last = h.now;
    }
    assert!(
        gaps[0] >= Duration::from_secs(2) && gaps[0] <= Duration::from_secs(3),
        "{gaps:?}"
    );
    assert_eq!(gaps[1], gaps[0] * 2);
    assert_eq!(h.core.stats().retransmissions, 2);
    // The client's ACK completes it: nothing more.
    h.send(1, &empty(ACK, m.message_id));
    while h.step() {
        assert!(h.out().is_empty());
        if h.now - h.start > Duration::from_secs(1000) {
            break;
        }
    }
    let stats = h.core.stats();
    assert_eq!(
        (
            stats.empty_acks,
            stats.separate_responses,
            stats.separate_expired
        ),
        (1, 1, 0)
    );
}

#[test]
fn separate_response_exhaustion_is_counted_and_rst_stops_it() {
    let mut h = Harness::new(test_config());
    h.send(1, &request(CON, PUT, 7, b"t", "/ps/a", &[], b"1"));
    let (_, token) = h.publish_token();
    h.advance(Duration::from_secs(1));
    let _ = h.out();
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    assert_eq!(h.out().len(), 1);
    let mut transmissions = 1;
    let mut guard = 0;
    while h.step() {
        transmissions += h.out().len();
        guard += 1;
        assert!(guard < 100);
    }
    // 1 + MAX_RETRANSMIT transmissions, then given up.
    assert_eq!(transmissions, 5);
    assert_eq!(h.core.stats().separate_expired, 1);

    // An RST completes a separate response too.
    h.send(2, &request(CON, PUT, 8, b"u", "/ps/a", &[], b"1"));
    let (_, token) = h.publish_token();
    h.advance(Duration::from_secs(1));
    let _ = h.out();
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let m = h.one(2);
    h.send(2, &empty(RST, m.message_id));
    let mut guard = 0;
    while h.step() {
        assert!(h.out().is_empty(), "nothing after the RST");
        guard += 1;
        assert!(guard < 50);
    }
    assert_eq!(h.core.stats().separate_expired, 1);
}

#[test]
fn ack_wait_zero_always_acks_empty_first() {
    let mut h = Harness::new(CoreConfig {
        ack_wait: Duration::ZERO,
        ..test_config()
    });
    h.send(1, &request(CON, PUT, 7, b"t", "/ps/a", &[], b"1"));
    let (_, token) = h.publish_token();
    assert_eq!(h.one(1).code, Code::EMPTY);
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let m = h.one(1);
    assert_eq!((m.ty, m.code), (MessageType::Con, Code::CHANGED));
}

#[test]
fn duplicate_con_never_publishes_twice() {
    let mut h = Harness::new(test_config());
    let put = request(CON, PUT, 9, b"t", "/ps/a", &[], b"1");
    h.send(1, &put);
    let (_, token) = h.publish_token();
    // Before the verdict: an empty ACK (the client's timer fired), nothing published.
    h.send(1, &put);
    assert!(h.events().is_empty());
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Ack, Code::EMPTY, 9)
    );
    // The ack_wait timer then sends nothing more.
    h.advance(Duration::from_secs(1));
    assert!(h.out().is_empty());
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let m = h.one(1);
    assert_eq!((m.ty, m.code), (MessageType::Con, Code::CHANGED));
    // After: the empty ACK again, never a second publish.
    h.send(1, &put);
    assert!(h.events().is_empty());
    assert_eq!(h.one(1).code, Code::EMPTY);

    // Piggy-backed answer: a duplicate gets the identical bytes.
    let put = request(CON, PUT, 10, b"u", "/ps/a", &[], b"2");
    h.send(1, &put);
    let (_, token) = h.publish_token();
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let first = h.raw();
    h.send(1, &put);
    h.send(1, &put);
    assert!(h.events().is_empty());
    let again = h.raw();
    assert_eq!(again, [first.clone(), first].concat());
    assert_eq!(h.core.stats().duplicates, 4);
    assert_eq!(h.core.stats().publishes, [0, 0, 2, 0]);
}

#[test]
fn duplicate_non_is_dropped_or_answered_the_same() {
    let mut h = Harness::new(test_config());
    let put = request(NON, PUT, 5, b"n", "/ps/a", &[], b"1");
    h.send(1, &put);
    assert_eq!(h.events().len(), 1);
    let first = h.raw();
    h.send(1, &put);
    assert!(h.events().is_empty());
    assert_eq!(h.raw(), first);
    // NON qos=1: answered after the verdict; a duplicate meanwhile is dropped.
    let put = request(NON, PUT, 6, b"m", "/ps/a?qos=1", &[], b"1");
    h.send(1, &put);
    let (_, token) = h.publish_token();
    h.send(1, &put);
    assert!(h.events().is_empty());
    h.advance(Duration::from_secs(5));
    assert!(h.out().is_empty());
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let m = h.one(1);
    assert_eq!((m.ty, m.code), (MessageType::Non, Code::CHANGED));
    assert_eq!(m.token.as_bytes(), b"m");
}

#[test]
fn dedup_expires_after_the_exchange_lifetime() {
    let mut h = Harness::new(test_config());
    let put = request(NON, PUT, 5, b"n", "/ps/a", &[], b"1");
    h.send(1, &put);
    assert_eq!(h.events().len(), 1);
    let _ = h.out();
    h.advance(Duration::from_secs(144));
    h.send(1, &put);
    assert!(h.events().is_empty());
    h.advance(Duration::from_secs(1));
    h.send(1, &put);
    assert_eq!(h.events().len(), 1, "NON_LIFETIME passed: a new message");
}

#[test]
fn mid_wrap_gives_no_false_duplicate() {
    let mut h = Harness::new(test_config());
    let mut published = 0;
    for i in 0..70_000u32 {
        let mid = (0xFF00u32 + i) as u16;
        h.core.handle_datagram(
            h.now,
            peer(1),
            &request(NON, PUT, mid, b"", "/ps/a", &[(258, vec![2])], b"x"),
        );
        published += h.events().len();
        assert!(h.out().is_empty(), "No-Response 2 suppresses the 2.04");
    }
    assert_eq!(published, 70_000);
    h.core.check_invariants();
    assert!(h.core.stats().dedup_evicted_early > 0);
}

#[test]
fn verdict_refusals_map_to_503_and_403() {
    let mut h = Harness::new(test_config());
    h.send(1, &request(CON, PUT, 1, b"a", "/ps/a", &[], b"1"));
    let (_, token) = h.publish_token();
    h.verdict(token.unwrap(), PublishOutcome::Congestion);
    let m = h.one(1);
    assert_eq!((m.code, m.max_age), (Code::SERVICE_UNAVAILABLE, Some(5)));
    h.send(1, &request(CON, PUT, 2, b"b", "/ps/a", &[], b"1"));
    let (_, token) = h.publish_token();
    h.verdict(token.unwrap(), PublishOutcome::NoRoute);
    let m = h.one(1);
    assert_eq!(m.code, Code::FORBIDDEN);
    assert_eq!(m.payload, b"no route");
    let r = h.core.report().counters.refusals;
    assert_eq!(r[RefusalReason::Congestion as usize], 1);
    assert_eq!(r[RefusalReason::NotAllowed as usize], 1);
    assert_eq!(h.core.stats().acks, 0);
}

fn answer_code(h: &mut Harness, datagram: &[u8]) -> Message {
    h.send(1, datagram);
    assert!(h.events().is_empty(), "an error publishes nothing");
    h.one(1)
}

#[test]
fn error_rows_of_the_request_table() {
    let mut h = Harness::new(CoreConfig {
        max_body_size: 100,
        ..test_config()
    });
    let cases: Vec<(Vec<u8>, Code)> = vec![
        (
            request(CON, PUT, 1, b"t", "/other", &[], b"1"),
            Code::NOT_FOUND,
        ),
        (request(CON, GET, 2, b"t", "/", &[], b""), Code::NOT_FOUND),
        (
            request(CON, DELETE, 3, b"t", "/ps/a", &[], b""),
            Code::METHOD_NOT_ALLOWED,
        ),
        (
            request(CON, PUT, 4, b"t", "/.well-known/core", &[], b""),
            Code::METHOD_NOT_ALLOWED,
        ),
        (
            request(CON, PUT, 5, b"t", "/ps", &[], b"1"),
            Code::BAD_REQUEST,
        ),
        (
            request(CON, PUT, 6, b"t", "/ps/a/+", &[], b"1"),
            Code::BAD_REQUEST,
        ),
        (
            request(CON, PUT, 7, b"t", "/ps/a?qos=3", &[], b"1"),
            Code::BAD_REQUEST,
        ),
        (
            request(CON, PUT, 8, b"t", "/ps/a?retain=yes", &[], b"1"),
            Code::BAD_REQUEST,
        ),
        (
            request(CON, PUT, 9, b"t", "/ps/a?id=", &[], b"1"),
            Code::BAD_REQUEST,
        ),
        (
            request(
                CON,
                PUT,
                10,
                b"t",
                &format!("/ps/a?id={}", "x".repeat(65)),
                &[],
                b"1",
            ),
            Code::BAD_REQUEST,
        ),
        (
            request(CON, PUT, 11, b"t", "/ps/a", &[(9, vec![1])], b"1"),
            Code::BAD_OPTION,
        ),
        (
            request(CON, GET, 15, b"t", "", &[(35, b"coap://x/".to_vec())], b""),
            Code::PROXYING_NOT_SUPPORTED,
        ),
        (
            request(CON, PUT, 12, b"t", "/ps/a", &[], &[0; 101]),
            Code::REQUEST_ENTITY_TOO_LARGE,
        ),
        (
            request(CON, GET, 13, b"t", "/ps/a/#", &[], b""),
            Code::BAD_REQUEST,
        ),
        (
            request(CON, GET, 14, b"t", "/ps/none", &[], b""),
            Code::NOT_FOUND,
        ),
    ];
    for (datagram, code) in cases {
        let m = answer_code(&mut h, &datagram);
        assert_eq!((m.ty, m.code), (MessageType::Ack, code), "{datagram:02x?}");
        assert_eq!(m.message_id, u16::from_be_bytes([datagram[2], datagram[3]]));
        if code == Code::REQUEST_ENTITY_TOO_LARGE {
            assert_eq!(m.size1, Some(100));
        }
    }
    // A NON request's error is a NON response.
    let m = answer_code(&mut h, &request(NON, PUT, 20, b"t", "/nope", &[], b"1"));
    assert_eq!((m.ty, m.code), (MessageType::Non, Code::NOT_FOUND));
    let r = h.core.report().counters.refusals;
    assert_eq!(r[RefusalReason::TooLarge as usize], 1);
    assert_eq!(r[RefusalReason::InvalidTopic as usize], 3);
}

#[test]
fn malformed_and_message_layer_rows() {
    let mut h = Harness::new(test_config());
    // Empty CON (ping) -> RST.
    h.send(1, &empty(CON, 0x0102));
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Rst, Code::EMPTY, 0x0102)
    );
    // TKL 9 CON -> RST; Version 2 -> silence; a truncated option in a NON -> RST.
    h.send(1, &[0x49, 0x01, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(h.one(1).ty, MessageType::Rst);
    h.send(1, &[0x80, 0x01, 0, 6]);
    assert!(h.out().is_empty());
    h.send(1, &[0x50, 0x03, 0, 7, 0xB5, b'p']);
    assert_eq!(h.one(1).ty, MessageType::Rst);
    // Unknown ACK / RST: ignored, no peer made.
    h.send(2, &empty(ACK, 1));
    h.send(2, &empty(RST, 1));
    assert!(h.out().is_empty());
    assert_eq!(h.core.stats().peers, 0);
    // A response code in a CON -> RST; in a NON -> dropped.
    h.send(1, &request(CON, 0x45, 9, b"", "", &[], b""));
    assert_eq!(h.one(1).ty, MessageType::Rst);
    h.send(1, &request(NON, 0x45, 10, b"", "", &[], b""));
    assert!(h.out().is_empty());
    assert_eq!(h.core.stats().malformed, 3);
}

#[test]
fn oversize_datagram_gets_413_with_size1_without_state() {
    let mut h = Harness::new(test_config());
    let big = request(CON, PUT, 3, b"tt", "/ps/a", &[], &[7; 1200]);
    h.send(4, &big);
    let m = h.one(4);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Ack, Code::REQUEST_ENTITY_TOO_LARGE, 3)
    );
    assert_eq!(m.token.as_bytes(), b"tt");
    assert!(m.size1.is_some());
    assert!(h.events().is_empty());
    assert_eq!(h.core.stats().peers, 0);
    // NON oversize: dropped.
    h.send(4, &request(NON, PUT, 4, b"tt", "/ps/a", &[], &[7; 1200]));
    assert!(h.out().is_empty());
}

fn block1(num: u32, more: bool, szx: u8) -> (u16, Vec<u8>) {
    let v = (num << 4) | (u32::from(more) << 3) | u32::from(szx);
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    (27, b[skip..].to_vec())
}

#[test]
fn block1_upload_is_reassembled_and_published_once() {
    let mut h = Harness::new(test_config());
    let body: Vec<u8> = (0..160u8).collect();
    let put = |mid: u16, num: u32, more: bool| {
        let start = num as usize * 64;
        let end = (start + 64).min(body.len());
        request(
            CON,
            PUT,
            mid,
            b"t",
            "/ps/big?id=d",
            &[block1(num, more, 2)],
            &body[start..end],
        )
    };
    h.send(1, &put(1, 0, true));
    assert!(
        h.events().is_empty(),
        "nothing published before the last block"
    );
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Ack, Code::CONTINUE, 1)
    );
    assert_eq!(m.block1, Some(Block::new(0, true, 2).unwrap()));
    // The same MID again: the same 2.31 bytes (dedup), a resend under a new MID: 2.31 again.
    let first = {
        h.send(1, &put(1, 0, true));
        h.raw()
    };
    assert_eq!(msg::decode(&first[0].1).unwrap().code, Code::CONTINUE);
    h.send(1, &put(2, 0, true));
    assert_eq!(h.one(1).code, Code::CONTINUE);
    h.send(1, &put(3, 1, true));
    assert_eq!(h.one(1).block1, Some(Block::new(1, true, 2).unwrap()));
    h.send(1, &put(4, 1, true));
    assert_eq!(h.one(1).code, Code::CONTINUE, "a block held already");
    h.send(1, &put(5, 2, false));
    let (message, token) = h.publish_token();
    assert_eq!(&message.payload[..], &body[..]);
    assert_eq!(message.topic, "big");
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let m = h.one(1);
    assert_eq!((m.code, m.message_id), (Code::CHANGED, 5));
    assert_eq!(m.block1, Some(Block::new(2, false, 2).unwrap()));
    assert!(h.events().is_empty());
}

#[test]
fn block1_gap_size_and_expiry() {
    let mut h = Harness::new(CoreConfig {
        max_body_size: 100,
        ..test_config()
    });
    let blk = |mid: u16, num: u32, more: bool, len: usize| {
        request(
            CON,
            PUT,
            mid,
            b"t",
            "/ps/a",
            &[block1(num, more, 1)],
            &vec![7; len],
        )
    };
    // Reordered: 0 then 2 -> 4.08.
    h.send(1, &blk(1, 0, true, 32));
    assert_eq!(h.one(1).code, Code::CONTINUE);
    h.send(1, &blk(2, 2, true, 32));
    assert_eq!(h.one(1).code, Code::REQUEST_ENTITY_INCOMPLETE);
    // A block with no transfer -> 4.08.
    h.send(1, &blk(3, 1, true, 32));
    assert_eq!(h.one(1).code, Code::REQUEST_ENTITY_INCOMPLETE);
    // A non-final block of the wrong size -> 4.00.
    h.send(1, &blk(4, 0, true, 10));
    assert_eq!(h.one(1).code, Code::BAD_REQUEST);
    // Beyond max_body_size -> 4.13 + Size1.
    for (mid, num) in [(5, 0), (6, 1), (7, 2)] {
        h.send(1, &blk(mid, num, true, 32));
        let _ = h.out();
    }
    h.send(1, &blk(8, 3, true, 32));
    let m = h.one(1);
    assert_eq!(
        (m.code, m.size1),
        (Code::REQUEST_ENTITY_TOO_LARGE, Some(100))
    );
    // Size1 announcing too much -> 4.13 at once.
    h.send(
        1,
        &request(
            CON,
            PUT,
            9,
            b"t",
            "/ps/a",
            &[block1(0, true, 1), (60, vec![200])],
            &[7; 32],
        ),
    );
    assert_eq!(h.one(1).code, Code::REQUEST_ENTITY_TOO_LARGE);
    // Idle beyond block_lifetime -> dropped; the next block gets 4.08.
    h.send(1, &blk(10, 0, true, 32));
    assert_eq!(h.one(1).code, Code::CONTINUE);
    h.advance(Duration::from_secs(248));
    assert_eq!(h.core.stats().block1_expired, 1);
    h.send(1, &blk(11, 1, true, 32));
    assert_eq!(h.one(1).code, Code::REQUEST_ENTITY_INCOMPLETE);
    assert!(h.events().is_empty());
}

#[test]
fn block2_serves_large_reads_and_notifications() {
    let mut h = Harness::new(test_config());
    let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let big: &'static [u8] = Box::leak(big.into_boxed_slice());
    let _ = h.core.handle_downlink(
        h.now,
        "big",
        Bytes::from_static(big),
        Qos::AtMostOnce,
        true,
        None,
    );
    h.send(1, &request(CON, GET, 1, b"g", "/ps/big", &[], b""));
    let m = h.one(1);
    assert_eq!(m.code, Code::CONTENT);
    assert_eq!(m.block2, Some(Block::new(0, true, 6).unwrap()));
    assert_eq!(m.size2, Some(3000));
    let etag = m.etag.clone().expect("ETag with a block-wise body");
    let mut got = m.payload.clone();
    for num in 1..3u32 {
        h.send(
            1,
            &request(
                CON,
                GET,
                1 + num as u16,
                b"g",
                "/ps/big",
                &[(23, vec![(num << 4) as u8 | 6])],
                b"",
            ),
        );
        let m = h.one(1);
        assert_eq!(m.etag.as_ref(), Some(&etag));
        assert_eq!(m.block2.unwrap().more(), num < 2);
        got.extend(m.payload);
    }
    assert_eq!(got, big);
    // A smaller size asked for is honoured.
    h.send(
        1,
        &request(CON, GET, 9, b"g", "/ps/big", &[(23, vec![0x02])], b""),
    );
    let m = h.one(1);
    assert_eq!(
        (m.block2, m.payload.len()),
        (Some(Block::new(0, true, 2).unwrap()), 64)
    );
    // A block beyond the body -> 4.00.
    h.send(
        1,
        &request(
            CON,
            GET,
            10,
            b"g",
            "/ps/big",
            &[(23, vec![0x0F, 0xF6])],
            b"",
        ),
    );
    assert_eq!(h.one(1).code, Code::BAD_REQUEST);
    // A large notification carries block 0; the rest comes from the cache.
    h.observe(2, 1, b"o", "/ps/n?qos=0");
    let _ = h.events();
    h.downlink("n", big, Qos::AtMostOnce);
    let m = h.one(2);
    assert_eq!(m.block2, Some(Block::new(0, true, 6).unwrap()));
    assert!(m.observe.is_some() && m.etag.is_some());
    h.send(
        2,
        &request(CON, GET, 2, b"f", "/ps/n", &[(23, vec![0x16])], b""),
    );
    let f = h.one(2);
    assert_eq!(f.payload, &big[1024..2048]);
    assert_eq!(f.etag, m.etag);
}

#[test]
fn oversize_datagram_hints_block1() {
    let mut h = Harness::new(test_config());
    h.send(4, &request(CON, PUT, 3, b"tt", "/ps/a", &[], &[7; 1200]));
    let m = h.one(4);
    assert_eq!(m.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(m.size1, Some(65536));
    assert_eq!(m.block1, Some(Block::new(0, false, 6).unwrap()));
}

#[test]
fn no_response_suppresses_answers() {
    let mut h = Harness::new(test_config());
    // NON qos 0 with No-Response 2 (no 2.xx): silence.
    h.send(
        1,
        &request(NON, PUT, 1, b"a", "/ps/a", &[(258, vec![2])], b"1"),
    );
    assert_eq!(h.events().len(), 1);
    assert!(h.out().is_empty());
    // A CON with No-Response 2: the ACK is empty.
    h.send(
        1,
        &request(CON, PUT, 2, b"b", "/ps/a", &[(258, vec![2])], b"1"),
    );
    let (_, token) = h.publish_token();
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Ack, Code::EMPTY, 2)
    );
    // Errors still come unless 4.xx is suppressed too (8).
    h.send(
        1,
        &request(NON, PUT, 3, b"c", "/nope", &[(258, vec![2])], b"1"),
    );
    assert_eq!(h.one(1).code, Code::NOT_FOUND);
    h.send(
        1,
        &request(NON, PUT, 4, b"c", "/nope", &[(258, vec![8])], b"1"),
    );
    assert!(h.out().is_empty());
}

#[test]
fn get_reads_the_retained_cache_and_well_known_core() {
    let mut h = Harness::new(test_config());
    let _ = h.core.handle_downlink(
        h.now,
        "cmd/dev1",
        Bytes::from_static(b"on"),
        Qos::AtLeastOnce,
        true,
        None,
    );
    h.send(1, &request(CON, GET, 1, b"g", "/ps/cmd/dev1", &[], b""));
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Ack, Code::CONTENT, 1)
    );
    assert_eq!(m.payload, b"on");
    assert_eq!(m.observe, None);
    // A retained PUT from a device updates it once accepted; an empty one clears it.
    h.send(
        1,
        &request(CON, PUT, 2, b"p", "/ps/cmd/dev1?retain=true", &[], b"off"),
    );
    let (_, token) = h.publish_token();
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let _ = h.out();
    h.send(1, &request(NON, GET, 3, b"g", "/ps/cmd/dev1", &[], b""));
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.payload.as_slice()),
        (MessageType::Non, &b"off"[..])
    );
    let _ = h
        .core
        .handle_downlink(h.now, "cmd/dev1", Bytes::new(), Qos::AtMostOnce, true, None);
    h.send(1, &request(CON, GET, 4, b"g", "/ps/cmd/dev1", &[], b""));
    assert_eq!(h.one(1).code, Code::NOT_FOUND);
    h.send(
        1,
        &request(CON, GET, 5, b"w", "/.well-known/core", &[], b""),
    );
    let m = h.one(1);
    assert_eq!((m.code, m.content_format), (Code::CONTENT, Some(40)));
    assert_eq!(m.payload, br#"</ps>;rt="core.ps";obs"#);
}

// ---------------------------------------------------------------------------------------
// Bounds.

#[test]
fn peer_table_evicts_idle_peers_and_refuses_when_none_can_go() {
    let mut h = Harness::new(CoreConfig {
        max_peers: 2,
        ..test_config()
    });
    // Two peers waiting for verdicts: not evictable.
    h.send(1, &request(CON, PUT, 1, b"a", "/ps/a", &[], b"1"));
    h.send(2, &request(CON, PUT, 1, b"a", "/ps/a", &[], b"1"));
    let tokens: Vec<u64> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Publish { token, .. } => token,
            _ => None,
        })
        .collect();
    h.send(3, &request(CON, PUT, 1, b"a", "/ps/a", &[], b"1"));
    let m = h.one(3);
    assert_eq!((m.code, m.max_age), (Code::SERVICE_UNAVAILABLE, Some(5)));
    assert!(h.events().is_empty());
    assert_eq!(h.core.stats().peers_full, 1);
    // A NON from a newcomer is dropped.
    h.send(3, &request(NON, PUT, 2, b"a", "/ps/a", &[], b"1"));
    assert!(h.out().is_empty());
    // Once answered, the least recently seen goes for the newcomer.
    for t in tokens {
        h.verdict(t, PublishOutcome::Accepted);
    }
    let _ = h.out();
    h.send(3, &request(CON, PUT, 3, b"a", "/ps/a?qos=0", &[], b"1"));
    assert_eq!(h.events().len(), 1);
    assert_eq!(h.one(3).code, Code::CHANGED);
    assert_eq!(h.core.stats().peers, 2);
    assert_eq!(h.core.stats().peers_evicted, 1);
    // Idle peers are forgotten after EXCHANGE_LIFETIME.
    h.advance(Duration::from_secs(248));
    assert_eq!(h.core.stats().peers, 0);
}

#[test]
fn exchanges_per_peer_are_bounded() {
    let mut h = Harness::new(CoreConfig {
        max_exchanges_per_peer: 2,
        ..test_config()
    });
    for mid in 1..=2 {
        h.send(1, &request(CON, PUT, mid, b"a", "/ps/a", &[], b"1"));
    }
    assert_eq!(h.events().len(), 2);
    h.send(1, &request(CON, PUT, 3, b"a", "/ps/a", &[], b"1"));
    assert!(h.events().is_empty());
    assert_eq!(h.one(1).code, Code::SERVICE_UNAVAILABLE);
}

// ---------------------------------------------------------------------------------------
// Observe.

#[test]
fn observe_lifecycle_register_notify_cancel() {
    let mut h = Harness::new(test_config());
    h.send(
        1,
        &request(CON, GET, 1, b"o1", "/ps/cmd/dev1", &[(6, vec![])], b""),
    );
    // The answer waits for the router.
    assert!(h.out().is_empty());
    let events = h.events_answered(true);
    assert_eq!(
        events,
        vec![Event::Subscribe {
            filter: Arc::from("cmd/dev1"),
            qos: Qos::AtLeastOnce
        }]
    );
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Ack, Code::CONTENT, 1)
    );
    let seq0 = m.observe.unwrap();
    // A second observer of the same filter: no new Subscribe, answered at once.
    let seq_b = h.observe(2, 1, b"o2", "/ps/cmd/dev1?qos=0");
    assert!(h.events().is_empty());
    let _ = seq_b;
    // QoS 1 downlink: CON to the QoS 1 observer, NON to the QoS 0 one.
    assert_eq!(h.downlink("cmd/dev1", b"on", Qos::AtLeastOnce), 2);
    let out = h.out();
    assert_eq!(out.len(), 2);
    let to1 = out.iter().find(|(p, _)| *p == 1).unwrap().1.clone();
    let to2 = out.iter().find(|(p, _)| *p == 2).unwrap().1.clone();
    assert_eq!(
        (to1.ty, to1.code, to1.payload.as_slice()),
        (MessageType::Con, Code::CONTENT, &b"on"[..])
    );
    assert_eq!(to1.observe, Some((seq0 + 1) & 0xFF_FFFF));
    assert_eq!(to1.token.as_bytes(), b"o1");
    assert_eq!(to2.ty, MessageType::Non);
    // The next QoS 1 notification waits for the ACK (one CON at a time, order kept).
    h.downlink("cmd/dev1", b"off", Qos::AtLeastOnce);
    let out = h.out();
    assert_eq!(out.len(), 1, "only the NON one: {out:?}");
    h.send(1, &empty(ACK, to1.message_id));
    let m = h.one(1);
    assert_eq!(
        (m.ty, m.payload.as_slice()),
        (MessageType::Con, &b"off"[..])
    );
    assert_eq!(m.observe, Some((seq0 + 2) & 0xFF_FFFF));
    h.send(1, &empty(ACK, m.message_id));
    assert_eq!(h.core.stats().downlink_delivered, 4);
    // Observe=1 cancels (answered as a plain GET: nothing retained -> 4.04).
    h.send(
        1,
        &request(CON, GET, 2, b"o1", "/ps/cmd/dev1", &[(6, vec![1])], b""),
    );
    assert_eq!(h.one(1).code, Code::NOT_FOUND);
    // Peer 2 still observes, at QoS 0: the upstream subscription drops to it.
    assert_eq!(
        h.events_answered(true),
        vec![Event::Subscribe {
            filter: Arc::from("cmd/dev1"),
            qos: Qos::AtMostOnce
        }]
    );
    h.send(
        2,
        &request(NON, GET, 2, b"o2", "/ps/cmd/dev1", &[(6, vec![1])], b""),
    );
    let _ = h.out();
    assert_eq!(
        h.events(),
        vec![Event::Unsubscribe {
            filter: Arc::from("cmd/dev1")
        }]
    );
    assert_eq!(h.core.stats().observers, 0);
}

#[test]
fn registration_carries_the_retained_value_and_reregistration_keeps_seq() {
    let mut h = Harness::new(test_config());
    let _ = h.core.handle_downlink(
        h.now,
        "t",
        Bytes::from_static(b"r"),
        Qos::AtMostOnce,
        true,
        None,
    );
    h.send(1, &request(CON, GET, 1, b"o", "/ps/t", &[(6, vec![])], b""));
    let _ = h.events_answered(true);
    let m = h.one(1);
    assert_eq!(m.payload, b"r");
    let seq = m.observe.unwrap();
    h.downlink("t", b"x", Qos::AtMostOnce);
    let n = h.one(1);
    assert_eq!(n.observe, Some((seq + 1) & 0xFF_FFFF));
    // Same token again: a re-registration (at QoS 0: the upstream follows it down), the
    // sequence continues.
    h.send(
        1,
        &request(CON, GET, 2, b"o", "/ps/t?qos=0", &[(6, vec![])], b""),
    );
    assert_eq!(
        h.events_answered(true),
        vec![Event::Subscribe {
            filter: Arc::from("t"),
            qos: Qos::AtMostOnce
        }]
    );
    let m = h.one(1);
    assert_eq!(m.observe, Some((seq + 1) & 0xFF_FFFF));
    // Same token, another path: replaces it (Unsubscribe t, Subscribe u).
    h.send(
        1,
        &request(CON, GET, 3, b"o", "/ps/u/+", &[(6, vec![])], b""),
    );
    let events = h.events_answered(true);
    assert_eq!(
        events,
        vec![
            Event::Unsubscribe {
                filter: Arc::from("t")
            },
            Event::Subscribe {
                filter: Arc::from("u/+"),
                qos: Qos::AtLeastOnce
            }
        ]
    );
    let m = h.one(1);
    assert_eq!(m.payload, b"", "no single retained value for a wildcard");
    assert_eq!(h.core.stats().observers, 1);
    h.downlink("u/1", b"w", Qos::AtMostOnce);
    assert_eq!(h.one(1).payload, b"w");
}

#[test]
fn refused_subscription_answers_503_and_keeps_nothing() {
    let mut h = Harness::new(test_config());
    h.send(1, &request(CON, GET, 1, b"o", "/ps/t", &[(6, vec![])], b""));
    let _ = h.events_answered(false);
    let m = h.one(1);
    assert_eq!((m.code, m.max_age), (Code::SERVICE_UNAVAILABLE, Some(5)));
    assert_eq!(h.core.stats().observers, 0);
    assert!(
        h.events().is_empty(),
        "no Unsubscribe for a filter never held"
    );
    // Missing token: 4.00.
    h.send(1, &request(CON, GET, 2, b"", "/ps/t", &[(6, vec![])], b""));
    assert_eq!(h.one(1).code, Code::BAD_REQUEST);
}

#[test]
fn rst_to_a_con_or_a_non_notification_cancels_the_observation() {
    let mut h = Harness::new(test_config());
    h.observe(1, 1, b"a", "/ps/t");
    h.observe(1, 2, b"b", "/ps/t?qos=0");
    let _ = h.events();
    h.downlink("t", b"1", Qos::AtLeastOnce);
    let out = h.out();
    let con = out
        .iter()
        .find(|(_, m)| m.ty == MessageType::Con)
        .unwrap()
        .1
        .clone();
    let non = out
        .iter()
        .find(|(_, m)| m.ty == MessageType::Non)
        .unwrap()
        .1
        .clone();
    assert_eq!(con.token.as_bytes(), b"a");
    h.send(1, &empty(RST, con.message_id));
    assert_eq!(h.core.stats().observers, 1);
    assert_eq!(
        h.events(),
        vec![Event::Subscribe {
            filter: Arc::from("t"),
            qos: Qos::AtMostOnce
        }]
    );
    h.send(1, &empty(RST, non.message_id));
    assert_eq!(h.core.stats().observers, 0);
    assert_eq!(
        h.events(),
        vec![Event::Unsubscribe {
            filter: Arc::from("t")
        }]
    );
    assert_eq!(
        h.core.report().counters.downlink_dropped[DownlinkDropReason::Rejected as usize],
        1
    );
}

#[test]
fn exhausted_con_notification_ends_the_peers_observations() {
    let mut h = Harness::new(test_config());
    h.observe(1, 1, b"a", "/ps/t");
    h.observe(1, 2, b"b", "/ps/v");
    let _ = h.events();
    h.downlink("t", b"1", Qos::AtLeastOnce);
    h.downlink("t", b"2", Qos::AtLeastOnce);
    assert_eq!(h.out().len(), 1);
    let mut sends = 0;
    let mut guard = 0;
    while h.core.stats().observers > 0 {
        assert!(h.step());
        sends += h.out().len();
        guard += 1;
        assert!(guard < 50);
    }
    assert_eq!(sends, 4, "MAX_RETRANSMIT retransmissions");
    let mut events = h.events();
    events.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        events,
        vec![
            Event::Unsubscribe {
                filter: Arc::from("t")
            },
            Event::Unsubscribe {
                filter: Arc::from("v")
            }
        ]
    );
    let dropped = h.core.report().counters.downlink_dropped;
    assert_eq!(dropped[DownlinkDropReason::Expired as usize], 2);
}

#[test]
fn every_nth_non_notification_is_con() {
    let mut h = Harness::new(CoreConfig {
        notification_check_count: 3,
        ..test_config()
    });
    h.observe(1, 1, b"a", "/ps/t?qos=0");
    let _ = h.events();
    let mut types = Vec::new();
    for _ in 0..6 {
        h.downlink("t", b"x", Qos::AtMostOnce);
        for (_, m) in h.out() {
            types.push(m.ty);
            if m.ty == MessageType::Con {
                h.send(1, &empty(ACK, m.message_id));
            }
        }
    }
    assert_eq!(
        types,
        [false, false, true, false, false, true].map(|con| if con {
            MessageType::Con
        } else {
            MessageType::Non
        })
    );
}

#[test]
fn a_con_notification_after_the_check_interval() {
    let mut h = Harness::new(CoreConfig {
        notification_check_interval: Duration::from_secs(60),
        observer_ping_interval: Duration::ZERO,
        ..test_config()
    });
    h.observe(1, 1, b"a", "/ps/t?qos=0");
    h.downlink("t", b"x", Qos::AtMostOnce);
    assert_eq!(h.one(1).ty, MessageType::Non);
    h.advance(Duration::from_secs(60));
    h.downlink("t", b"x", Qos::AtMostOnce);
    assert_eq!(h.one(1).ty, MessageType::Con);
}

#[test]
fn observer_ping_and_its_exhaustion() {
    let mut h = Harness::new(CoreConfig {
        observer_ping_interval: Duration::from_secs(100),
        ..test_config()
    });
    h.observe(1, 1, b"a", "/ps/t");
    let _ = h.events();
    h.advance(Duration::from_secs(100));
    let m = h.one(1);
    assert_eq!((m.ty, m.code), (MessageType::Con, Code::EMPTY));
    // RST is a ping's normal answer: alive.
    h.send(1, &empty(RST, m.message_id));
    assert_eq!(h.core.stats().observers, 1);
    h.advance(Duration::from_secs(100));
    let m = h.one(1);
    assert_eq!(m.code, Code::EMPTY);
    // No answer at all: gone after the retransmissions.
    let mut guard = 0;
    while h.core.stats().observers > 0 {
        assert!(h.step());
        let _ = h.out();
        guard += 1;
        assert!(guard < 50);
    }
    assert_eq!(
        h.events(),
        vec![Event::Unsubscribe {
            filter: Arc::from("t")
        }]
    );
    assert_eq!(h.core.stats().pings, 2);
}

#[test]
fn observer_bounds_and_queue_full() {
    let mut h = Harness::new(CoreConfig {
        max_observers_per_peer: 2,
        max_observers: 3,
        max_filters: 2,
        max_queued_per_observer: 2,
        ..test_config()
    });
    h.observe(1, 1, b"a", "/ps/t");
    h.observe(1, 2, b"b", "/ps/u");
    let _ = h.events();
    h.send(1, &request(CON, GET, 3, b"c", "/ps/t", &[(6, vec![])], b""));
    assert_eq!(h.one(1).code, Code::SERVICE_UNAVAILABLE, "per peer");
    h.send(2, &request(CON, GET, 3, b"c", "/ps/w", &[(6, vec![])], b""));
    assert_eq!(h.one(2).code, Code::SERVICE_UNAVAILABLE, "filters");
    h.observe(2, 4, b"d", "/ps/t");
    h.send(3, &request(CON, GET, 3, b"c", "/ps/t", &[(6, vec![])], b""));
    assert_eq!(h.one(3).code, Code::SERVICE_UNAVAILABLE, "observers");
    // Queue: one CON in flight, two queued, the oldest queued dropped beyond.
    for p in [&b"1"[..], b"2", b"3", b"4"] {
        let p: &'static [u8] = Box::leak(p.to_vec().into_boxed_slice());
        let _ = h.core.handle_downlink(
            h.now,
            "u",
            Bytes::from_static(p),
            Qos::AtLeastOnce,
            false,
            None,
        );
    }
    let m = h.one(1);
    assert_eq!(m.payload, b"1");
    h.send(1, &empty(ACK, m.message_id));
    let m = h.one(1);
    assert_eq!(m.payload, b"3", "2 was dropped (drop_oldest)");
    assert_eq!(
        h.core.report().counters.downlink_dropped[DownlinkDropReason::QueueFull as usize],
        1
    );
}

#[test]
fn local_delivery_qos0_at_once_qos1_after_accepted() {
    let mut h = Harness::new(test_config());
    h.observe(1, 1, b"a", "/ps/s/+");
    let _ = h.events();
    h.send(2, &request(NON, PUT, 1, b"", "/ps/s/1", &[], b"q0"));
    let out = h.out();
    let notif = out
        .iter()
        .find(|(p, _)| *p == 1)
        .expect("QoS 0 delivered at once");
    assert_eq!(notif.1.payload, b"q0");
    let _ = h.events();
    h.send(2, &request(CON, PUT, 2, b"t", "/ps/s/1", &[], b"q1"));
    let (_, token) = h.publish_token();
    assert!(h.out().is_empty());
    h.verdict(token.unwrap(), PublishOutcome::Congestion);
    let out = h.out();
    assert_eq!(out.len(), 1, "refused: only the 5.03");
    h.send(2, &request(CON, PUT, 3, b"t", "/ps/s/1", &[], b"q1"));
    let (_, token) = h.publish_token();
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let out = h.out();
    assert_eq!(out.len(), 2);
    assert!(out.iter().any(|(p, m)| *p == 1 && m.payload == b"q1"));
}

#[test]
fn downlink_with_filters_reaches_only_those_filters() {
    let mut h = Harness::new(test_config());
    h.observe(1, 1, b"a", "/ps/s/+?qos=0");
    h.observe(2, 1, b"b", "/ps/s/1?qos=0");
    let _ = h.events();
    let filters = [Arc::from("s/1")];
    let o = h.core.handle_downlink(
        h.now,
        "s/1",
        Bytes::from_static(b"x"),
        Qos::AtMostOnce,
        false,
        Some(&filters),
    );
    assert_eq!(o.queued, 1);
    assert_eq!(h.one(2).payload, b"x");
}

#[test]
fn report_and_clients() {
    let mut h = Harness::new(test_config());
    h.observe(1, 1, b"a", "/ps/t");
    h.send(
        2,
        &request(CON, PUT, 1, b"t", "/ps/x?id=dev2&qos=0", &[], b"1"),
    );
    let _ = h.events();
    let _ = h.out();
    let report = h.core.report();
    assert_eq!(report.protocol, "coap");
    assert_eq!(report.sessions.get(SessionState::Active), 2);
    let page = h.core.clients(
        h.now,
        &ClientQuery {
            limit: 10,
            ..ClientQuery::default()
        },
    );
    let ids: Vec<&str> = page.clients.iter().map(|c| c.client_id.as_str()).collect();
    assert_eq!(ids, vec!["127.0.0.1:1", "dev2"]);
    assert_eq!(page.clients[0].subscriptions[0].filter, "t");
    assert!(!page.more);
    let page = h.core.clients(
        h.now,
        &ClientQuery {
            limit: 1,
            ..ClientQuery::default()
        },
    );
    assert!(page.more);
}

#[test]
fn seq_wraps_at_24_bits() {
    let mut h = Harness::new(test_config());
    h.observe(1, 1, b"a", "/ps/t?qos=0");
    let _ = h.events();
    // Force the sequence near the end of its space.
    for o in h.core.obs.iter_mut().flatten() {
        o.seq = 0xFF_FFFF;
    }
    h.downlink("t", b"x", Qos::AtMostOnce);
    assert_eq!(h.one(1).observe, Some(0));
}

#[test]
fn registrations_wait_for_a_pending_subscription_together() {
    let mut h = Harness::new(test_config());
    h.send(1, &request(CON, GET, 1, b"a", "/ps/t", &[(6, vec![])], b""));
    h.send(2, &request(CON, GET, 1, b"b", "/ps/t", &[(6, vec![])], b""));
    assert!(h.out().is_empty(), "both wait for the router");
    let events = h.events_answered(false);
    assert_eq!(events.len(), 1, "one Subscribe: {events:?}");
    let out = h.out();
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|(_, m)| m.code == Code::SERVICE_UNAVAILABLE));
    assert_eq!(h.core.stats().observers, 0);
    assert!(h.events().is_empty());
}

#[test]
fn filter_events_follow_a_refcount_model() {
    use std::collections::HashMap as Map;
    // Random registrations/cancels from 3 peers x 3 tokens over 3 filters: the Subscribe /
    // Unsubscribe stream always describes exactly the filters observed, at their max QoS.
    let mut rng = SmallRng::seed_from_u64(3);
    let mut h = Harness::new(test_config());
    let mut upstream: Map<String, Qos> = Map::new();
    let mut model: Map<(u16, u8), (String, u8)> = Map::new();
    for step in 0..2000u32 {
        let port = rng.random_range(1..=3u16);
        let tok = rng.random_range(1..=3u8);
        let filter = ["a", "b/+", "#"][rng.random_range(0..3usize)];
        let qos = rng.random_range(0..=2u8);
        let mid = step as u16;
        if rng.random_bool(0.6) {
            let uri = format!("/ps/{filter}?qos={qos}");
            h.send(
                port,
                &request(NON, GET, mid, &[tok], &uri, &[(6, vec![])], b""),
            );
            model.insert((port, tok), (filter.to_owned(), qos));
        } else {
            let uri = format!("/ps/{filter}");
            h.send(
                port,
                &request(NON, GET, mid, &[tok], &uri, &[(6, vec![1])], b""),
            );
            model.remove(&(port, tok));
        }
        for e in h.events_answered(true) {
            match e {
                Event::Subscribe { filter, qos } => {
                    upstream.insert(filter.to_string(), qos);
                }
                Event::Unsubscribe { filter } => {
                    assert!(upstream.remove(&*filter).is_some());
                }
                Event::Publish { .. } => panic!("no publish"),
            }
        }
        let _ = h.out();
        let mut expected: Map<String, Qos> = Map::new();
        for (f, q) in model.values() {
            let e = expected.entry(f.clone()).or_insert(Qos::AtMostOnce);
            *e = upstream_qos((*q).max(qos_level(*e)));
        }
        assert_eq!(upstream, expected, "step {step}");
    }
}

#[test]
fn lossy_link_publishes_each_request_exactly_once() {
    use std::collections::HashMap as Map;
    // Three clients, NSTART 1 each, over a link losing 20% of datagrams both ways; verdicts
    // come after a random 0..2 s. Every request is published once however often it (or its
    // answer) is retransmitted, and a 2.04 only ever follows an accepted verdict.
    let mut rng = SmallRng::seed_from_u64(11);
    let mut h = Harness::new(test_config());
    struct Client {
        next: u16,
        sent_at: Instant,
        tries: u32,
        empty_acked: bool,
        done: u16,
    }
    let mut clients: Map<u16, Client> = (1..=3)
        .map(|p| {
            (
                p,
                Client {
                    next: 1,
                    sent_at: h.now,
                    tries: 0,
                    empty_acked: false,
                    done: 0,
                },
            )
        })
        .collect();
    const PER_CLIENT: u16 = 30;
    let mut published: Map<(String, Vec<u8>), u32> = Map::new();
    let mut verdicts: Vec<(Instant, u64)> = Vec::new();
    let mut accepted: std::collections::HashSet<Vec<u8>> = Default::default();
    let mut token_payload: Map<u64, Vec<u8>> = Map::new();
    let mut gave_up = 0;
    let mut completed = 0;
    let put = |port: u16, n: u16| {
        request(
            CON,
            PUT,
            1000 + n,
            &[port as u8, n as u8],
            "/ps/l",
            &[],
            &[port as u8, n as u8],
        )
    };
    for round in 0..20_000 {
        // Clients (re)send.
        for (port, c) in clients.iter_mut() {
            if c.next > PER_CLIENT {
                continue;
            }
            let due =
                c.tries == 0 || (!c.empty_acked && h.now - c.sent_at >= Duration::from_secs(2));
            if due {
                if c.tries > 6 {
                    gave_up += 1;
                    c.next += 1;
                    c.tries = 0;
                    c.empty_acked = false;
                    continue;
                }
                c.tries += 1;
                c.sent_at = h.now;
                if rng.random_bool(0.8) {
                    h.core
                        .handle_datagram(h.now, peer(*port), &put(*port, c.next));
                }
            }
        }
        for e in h.events() {
            if let Event::Publish { message, token } = e {
                *published
                    .entry((message.topic.clone(), message.payload.to_vec()))
                    .or_default() += 1;
                let t = token.unwrap();
                token_payload.insert(t, message.payload.to_vec());
                let delay = Duration::from_millis(rng.random_range(0..2000));
                verdicts.push((h.now + delay, t));
            }
        }
        verdicts.sort();
        while verdicts.first().is_some_and(|(at, _)| *at <= h.now) {
            let (_, t) = verdicts.remove(0);
            let outcome = if rng.random_bool(0.9) {
                accepted.insert(token_payload[&t].clone());
                PublishOutcome::Accepted
            } else {
                PublishOutcome::Congestion
            };
            h.verdict(t, outcome);
        }
        // Server -> clients.
        for (port, m) in h.out() {
            if !rng.random_bool(0.8) {
                continue;
            }
            let c = clients.get_mut(&port).unwrap();
            let empty_ack = (m.ty, m.code) == (MessageType::Ack, Code::EMPTY);
            if empty_ack && m.message_id == 1000 + c.next {
                c.empty_acked = true;
            }
            // A separate response: ACK it (the ACK may be lost too).
            if m.ty == MessageType::Con && rng.random_bool(0.8) {
                h.core
                    .handle_datagram(h.now, peer(port), &empty(ACK, m.message_id));
            }
            if m.code == Code::CHANGED || m.code == Code::SERVICE_UNAVAILABLE {
                let payload = m.token.as_bytes().to_vec();
                if m.code == Code::CHANGED {
                    assert!(
                        accepted.contains(&payload),
                        "2.04 without an accepted verdict"
                    );
                }
                if payload == [port as u8, c.next as u8] {
                    if m.code == Code::CHANGED {
                        c.done += 1;
                        completed += 1;
                    }
                    c.next += 1;
                    c.tries = 0;
                    c.empty_acked = false;
                }
            }
        }
        h.core.check_invariants();
        if clients.values().all(|c| c.next > PER_CLIENT) && verdicts.is_empty() {
            break;
        }
        h.advance(Duration::from_millis(100));
        assert!(round < 19_999, "livelock");
    }
    assert!(
        published.values().all(|n| *n == 1),
        "a request was published twice"
    );
    assert!(completed >= 60, "completed {completed}, gave up {gave_up}");
    assert!(
        h.core.stats().duplicates > 0,
        "the link did make duplicates"
    );
}

#[test]
fn unanswering_peer_gets_non_notifications_at_the_probing_rate() {
    let mut h = Harness::new(CoreConfig {
        max_queued_per_observer: 8,
        ..test_config()
    });
    h.observe(1, 1, b"a", "/ps/t");
    h.observe(1, 2, b"b", "/ps/u?qos=0");
    let _ = h.events();
    h.downlink("t", b"1", Qos::AtLeastOnce);
    let con = h.one(1);
    // Before any retransmission the peer counts as answering: NONs flow.
    h.downlink("u", b"x", Qos::AtMostOnce);
    assert_eq!(h.one(1).ty, MessageType::Non);
    assert!(h.step());
    assert_eq!(h.one(1).message_id, con.message_id, "retransmitted");
    // Now unanswering: one message, then PROBING_RATE (1 byte/s) holds the rest.
    for _ in 0..3 {
        h.downlink("u", b"x", Qos::AtMostOnce);
    }
    assert_eq!(h.out().len(), 1);
    h.advance(Duration::from_millis(500));
    h.downlink("u", b"x", Qos::AtMostOnce);
    assert!(h.out().is_empty());
    // The peer answers: the held notifications go, in order.
    h.send(1, &empty(ACK, con.message_id));
    let out = h.out();
    assert_eq!(out.len(), 3);
    let seqs: Vec<u32> = out.iter().map(|(_, m)| m.observe.unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == (w[0] + 1) & 0xFF_FFFF),
        "{seqs:?}"
    );
}

#[test]
fn block1_uploads_count_against_exchanges_per_peer() {
    let mut h = Harness::new(CoreConfig {
        max_exchanges_per_peer: 2,
        ..test_config()
    });
    let blk = |mid: u16, path: &str, num: u32, more: bool| {
        request(CON, PUT, mid, b"t", path, &[block1(num, more, 1)], &[7; 32])
    };
    h.send(1, &blk(1, "/ps/a", 0, true));
    h.send(1, &blk(2, "/ps/b", 0, true));
    let codes: Vec<Code> = h.out().into_iter().map(|(_, m)| m.code).collect();
    assert_eq!(codes, vec![Code::CONTINUE, Code::CONTINUE]);
    // A third upload, or a publish waiting for a verdict: 5.03.
    h.send(1, &blk(3, "/ps/c", 0, true));
    assert_eq!(h.one(1).code, Code::SERVICE_UNAVAILABLE);
    h.send(1, &request(CON, PUT, 4, b"t", "/ps/d", &[], b"1"));
    assert_eq!(h.one(1).code, Code::SERVICE_UNAVAILABLE);
    assert!(h.events().is_empty());
    // Restarting a known upload is allowed; finishing one frees its slot.
    h.send(1, &blk(5, "/ps/a", 0, true));
    assert_eq!(h.one(1).code, Code::CONTINUE);
    h.send(1, &blk(6, "/ps/a", 1, false));
    let (_, token) = h.publish_token();
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    assert_eq!(h.one(1).code, Code::CHANGED);
    h.send(1, &blk(7, "/ps/c", 0, true));
    assert_eq!(h.one(1).code, Code::CONTINUE);
    // Idle uploads expire with the table's lifetime: room again, and the peer may go.
    h.advance(Duration::from_secs(248));
    h.send(1, &blk(8, "/ps/e", 0, true));
    h.send(1, &blk(9, "/ps/f", 0, true));
    let codes: Vec<Code> = h.out().into_iter().map(|(_, m)| m.code).collect();
    assert_eq!(codes, vec![Code::CONTINUE, Code::CONTINUE]);
}

mod reload;
mod security;
