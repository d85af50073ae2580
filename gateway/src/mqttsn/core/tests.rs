//! Deterministic core tests: a virtual clock, datagrams in, datagrams and events out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sensorgate_bridges::message::Qos;

use super::*;
use crate::mqttsn::codec::{self, DecodeLimits, Frame, Packet, QoS, ReturnCode, TopicRef};

fn config() -> CoreConfig {
    CoreConfig {
        max_clients: 100,
        max_packet_size: 1024,
        max_client_id_len: 23,
        max_topics_per_client: 4,
        max_inflight_per_client: 2,
        qos_minus_one: true,
        predefined: vec![
            PredefinedTopic {
                id: 1,
                topic: "pre/one".into(),
                clients: ClientSet::All,
            },
            PredefinedTopic {
                id: 2,
                topic: "pre/two".into(),
                clients: ClientSet::Only(vec!["alice".into()]),
            },
        ],
        retry_interval: Duration::from_secs(10),
        max_retries: 3,
        max_queued_per_client: 8,
        max_buffered_per_sleeping_client: 20,
        ..CoreConfig::with_defaults(7)
    }
}

fn peer(port: u16) -> Peer {
    Peer::udp(0, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
}

/// A core plus a virtual clock.
struct Harness {
    core: Core,
    now: Instant,
}

impl Harness {
    #[allow(clippy::disallowed_methods)] // The virtual clock starts at an arbitrary instant.
    fn new(config: CoreConfig) -> Self {
        Harness {
            core: Core::new(config),
            now: Instant::now(),
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.core.handle_timeout(self.now);
    }

    fn send(&mut self, from: &Peer, packet: Packet<'_>) {
        let mut buf = Vec::new();
        packet.encode(&mut buf).unwrap();
        self.core.handle_datagram(self.now, from.clone(), &buf);
    }

    /// Every datagram the core wants to send, decoded (owned copies of the bytes).
    fn transmits(&mut self) -> Vec<(Peer, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(p) = self.core.poll_transmit(&mut buf) {
            out.push((p, buf.clone()));
        }
        out
    }

    /// The single reply expected for `to`, decoded.
    fn reply(&mut self, to: &Peer) -> Vec<u8> {
        let all = self.transmits();
        assert_eq!(all.len(), 1, "expected exactly one reply, got {all:?}");
        let (p, bytes) = all.into_iter().next().unwrap();
        assert_eq!(&p, to);
        bytes
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.core.poll_event()).collect()
    }

    fn connect(&mut self, from: &Peer, client_id: &str, duration: u16) {
        self.send(
            from,
            Packet::Connect {
                will: false,
                clean_session: true,
                duration,
                client_id,
            },
        );
        let bytes = self.reply(from);
        assert_eq!(
            decode(&bytes),
            Packet::ConnAck {
                rc: ReturnCode::Accepted
            }
        );
    }

    fn register(&mut self, from: &Peer, name: &str, msg_id: u16) -> (u16, ReturnCode) {
        self.send(
            from,
            Packet::Register {
                topic_id: 0,
                msg_id,
                topic_name: name,
            },
        );
        match decode(&self.reply(from)) {
            Packet::RegAck {
                topic_id,
                msg_id: m,
                rc,
            } => {
                assert_eq!(m, msg_id);
                (topic_id, rc)
            }
            other => panic!("expected REGACK, got {other:?}"),
        }
    }
}

fn decode(bytes: &[u8]) -> Packet<'_> {
    match codec::decode(bytes, &DecodeLimits::default()).unwrap() {
        Frame::Plain(p) => p,
        Frame::Encapsulated { packet, .. } => packet,
    }
}

fn publish(qos: QoS, topic: TopicRef, msg_id: u16, data: &[u8]) -> Packet<'_> {
    Packet::Publish {
        dup: false,
        qos,
        retain: false,
        topic,
        msg_id,
        data,
    }
}

fn single_publish(events: Vec<Event>) -> (Message, Option<u64>) {
    assert_eq!(events.len(), 1, "expected one event, got {events:?}");
    match events.into_iter().next().unwrap() {
        Event::Publish { message, token } => (message, token),
        other => panic!("expected a publish, got {other:?}"),
    }
}

#[test]
fn connect_is_answered_with_connack_accepted() {
    let mut h = Harness::new(config());
    h.connect(&peer(1000), "alice", 60);
    assert_eq!(h.core.session_count(), 1);
}

#[test]
fn keep_alive_expires_after_one_and_a_half_durations_of_silence() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 10);
    h.advance(Duration::from_millis(14_999));
    assert_eq!(h.core.session_count(), 1);
    h.advance(Duration::from_millis(1));
    assert_eq!(h.core.session_count(), 0);
    assert_eq!(h.core.stats().clients_lost, 1);
    // The expired client's packets now get DISCONNECT.
    h.send(&p, Packet::PingReq { client_id: None });
    assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
}

#[test]
fn any_packet_from_the_client_extends_the_keep_alive() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 10);
    h.advance(Duration::from_secs(10));
    h.send(&p, Packet::PingReq { client_id: None });
    assert_eq!(decode(&h.reply(&p)), Packet::PingResp);
    h.advance(Duration::from_secs(14));
    assert_eq!(h.core.session_count(), 1, "deadline moved to 10 s + 15 s");
    assert_eq!(h.core.poll_timeout(), Some(h.now + Duration::from_secs(1)));
    h.advance(Duration::from_secs(1));
    assert_eq!(h.core.session_count(), 0);
}

#[test]
fn zero_duration_disables_keep_alive_supervision() {
    let mut h = Harness::new(config());
    h.connect(&peer(1000), "alice", 0);
    assert_eq!(h.core.poll_timeout(), None);
    h.advance(Duration::from_secs(1_000_000));
    assert_eq!(h.core.session_count(), 1);
}

#[test]
fn qos1_is_acknowledged_only_after_the_upstream_accepted() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 60);
    let (id, _) = h.register(&p, "a/b", 1);
    h.send(&p, publish(QoS::AtLeastOnce, TopicRef::Normal(id), 9, b"x"));
    assert!(
        h.transmits().is_empty(),
        "no PUBACK before the upstream answered"
    );
    let (msg, token) = single_publish(h.events());
    assert_eq!(
        (msg.topic.as_str(), msg.qos, &msg.payload[..]),
        ("a/b", Qos::AtLeastOnce, &b"x"[..])
    );
    h.core
        .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Accepted);
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::PubAck {
            topic_id: id,
            msg_id: 9,
            rc: ReturnCode::Accepted
        }
    );
    // A token is answered once: a second report is ignored.
    h.core
        .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Accepted);
    assert!(h.transmits().is_empty());
}

#[test]
fn qos1_failure_upstream_is_answered_with_congestion() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 60);
    h.send(
        &p,
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 3, b"x"),
    );
    let (_, token) = single_publish(h.events());
    h.core
        .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Congestion);
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::PubAck {
            topic_id: 1,
            msg_id: 3,
            rc: ReturnCode::Congestion
        }
    );
}

#[test]
fn qos1_retransmission_while_pending_is_not_forwarded_twice() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 60);
    h.send(
        &p,
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 3, b"x"),
    );
    h.send(
        &p,
        Packet::Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicRef::Predefined(1),
            msg_id: 3,
            data: b"x",
        },
    );
    assert_eq!(h.events().len(), 1);
}

#[test]
fn too_many_unacknowledged_publishes_get_congestion() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 60);
    for m in 1..=2 {
        h.send(
            &p,
            publish(QoS::AtLeastOnce, TopicRef::Predefined(1), m, b"x"),
        );
    }
    assert!(h.transmits().is_empty());
    h.send(
        &p,
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 3, b"x"),
    );
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::PubAck {
            topic_id: 1,
            msg_id: 3,
            rc: ReturnCode::Congestion
        }
    );
    assert_eq!(h.events().len(), 2);
}

#[test]
fn qos2_duplicate_before_pubrel_is_never_forwarded_twice() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 60);
    let (id, _) = h.register(&p, "q2", 1);
    let first = publish(QoS::ExactlyOnce, TopicRef::Normal(id), 5, b"once");
    h.send(&p, first);
    let (msg, token) = single_publish(h.events());
    assert_eq!(msg.qos, Qos::ExactlyOnce);
    // Duplicate while the upstream has not answered: dropped silently.
    h.send(&p, first);
    assert!(h.events().is_empty());
    assert!(h.transmits().is_empty());
    h.core
        .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Accepted);
    assert_eq!(decode(&h.reply(&p)), Packet::PubRec { msg_id: 5 });
    // Duplicate after PUBREC (the PUBREC was lost): PUBREC again, not forwarded.
    h.send(&p, first);
    assert_eq!(decode(&h.reply(&p)), Packet::PubRec { msg_id: 5 });
    assert!(h.events().is_empty());
    h.send(&p, Packet::PubRel { msg_id: 5 });
    assert_eq!(decode(&h.reply(&p)), Packet::PubComp { msg_id: 5 });
    // A repeated PUBREL (lost PUBCOMP) is answered again.
    h.send(&p, Packet::PubRel { msg_id: 5 });
    assert_eq!(decode(&h.reply(&p)), Packet::PubComp { msg_id: 5 });
    // After the exchange the MsgId may be reused for a new message.
    h.send(&p, first);
    assert_eq!(h.events().len(), 1);
}

#[test]
fn same_topic_registers_to_the_same_id_and_skips_predefined_ids() {
    let mut h = Harness::new(config());
    let alice = peer(1000);
    let bob = peer(1001);
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    // alice has predefined ids 1 (global) and 2 (her own): her first dynamic id is 3.
    assert_eq!(h.register(&alice, "t/1", 1), (3, ReturnCode::Accepted));
    assert_eq!(h.register(&alice, "t/2", 2), (4, ReturnCode::Accepted));
    assert_eq!(h.register(&alice, "t/1", 3), (3, ReturnCode::Accepted));
    // bob only has the global id 1.
    assert_eq!(h.register(&bob, "t/1", 1), (2, ReturnCode::Accepted));
}

#[test]
fn topic_table_is_bounded_per_client() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "bob", 60);
    for i in 0..4 {
        assert_eq!(h.register(&p, &format!("t/{i}"), i).1, ReturnCode::Accepted);
    }
    assert_eq!(h.register(&p, "t/overflow", 9), (0, ReturnCode::Congestion));
    // Known topics still resolve.
    assert_eq!(h.register(&p, "t/0", 10).1, ReturnCode::Accepted);
}

#[test]
fn register_with_wildcards_is_rejected_as_invalid_topic() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "bob", 60);
    let mut buf = vec![0u8, 0x0A, 0, 0, 0, 7];
    buf.extend_from_slice(b"a/+");
    buf[0] = buf.len() as u8;
    h.core.handle_datagram(h.now, p.clone(), &buf);
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::RegAck {
            topic_id: 0,
            msg_id: 7,
            rc: ReturnCode::InvalidTopicId
        }
    );
}

#[test]
fn topics_a_broker_would_refuse_never_go_upstream() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "bob", 60);
    for (i, name) in ["a\0b", "x\u{1}", "\u{85}", "a\u{FFFF}"].iter().enumerate() {
        let (id, rc) = h.register(&p, name, i as u16);
        assert_eq!((id, rc), (0, ReturnCode::InvalidTopicId), "{name:?}");
    }
    h.send(
        &p,
        publish(QoS::AtLeastOnce, TopicRef::Short(*b"a\0"), 4, b"x"),
    );
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::PubAck {
            topic_id: 0x6100,
            msg_id: 4,
            rc: ReturnCode::InvalidTopicId
        }
    );
    h.send(
        &peer(9),
        publish(QoS::MinusOne, TopicRef::Short(*b"\0\0"), 0, b"x"),
    );
    assert!(h.events().is_empty());
}

#[test]
fn unknown_topic_ids_get_invalid_topic_id() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "bob", 60);
    for (topic, id) in [(TopicRef::Normal(99), 99), (TopicRef::Predefined(2), 2)] {
        h.send(&p, publish(QoS::AtLeastOnce, topic, 4, b"x"));
        assert_eq!(
            decode(&h.reply(&p)),
            Packet::PubAck {
                topic_id: id,
                msg_id: 4,
                rc: ReturnCode::InvalidTopicId
            }
        );
    }
    assert!(h.events().is_empty());
}

#[test]
fn predefined_short_and_retained_publishes_resolve() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 60);
    h.send(
        &p,
        publish(QoS::AtMostOnce, TopicRef::Predefined(2), 0, b"a"),
    );
    h.send(
        &p,
        publish(QoS::AtMostOnce, TopicRef::Short(*b"ab"), 0, b"b"),
    );
    h.send(
        &p,
        Packet::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: TopicRef::Predefined(1),
            msg_id: 0,
            data: b"c",
        },
    );
    let topics: Vec<(String, bool, Option<u64>)> = h
        .events()
        .into_iter()
        .map(|e| match e {
            Event::Publish { message, token } => (message.topic, message.retain, token),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        topics,
        vec![
            ("pre/two".into(), false, None),
            ("ab".into(), false, None),
            ("pre/one".into(), true, None)
        ]
    );
    assert!(h.transmits().is_empty(), "QoS 0 gets no acknowledgement");
}

#[test]
fn qos_minus_one_needs_no_session_but_a_predefined_or_short_topic() {
    let mut h = Harness::new(config());
    let p = peer(2000);
    h.send(
        &p,
        publish(QoS::MinusOne, TopicRef::Predefined(1), 0, b"m1"),
    );
    h.send(
        &p,
        publish(QoS::MinusOne, TopicRef::Short(*b"zz"), 0, b"m1"),
    );
    h.send(&p, publish(QoS::MinusOne, TopicRef::Normal(1), 0, b"m1"));
    // alice's own predefined id is not usable without her session.
    h.send(
        &p,
        publish(QoS::MinusOne, TopicRef::Predefined(2), 0, b"m1"),
    );
    let events = h.events();
    assert_eq!(events.len(), 2);
    assert!(h.transmits().is_empty(), "QoS -1 is never answered");
    assert_eq!(h.core.stats().qos_m1_dropped, 2);

    let mut off = Harness::new(CoreConfig {
        qos_minus_one: false,
        ..config()
    });
    off.send(
        &p,
        publish(QoS::MinusOne, TopicRef::Predefined(1), 0, b"m1"),
    );
    assert!(off.events().is_empty());
}

#[test]
fn packets_from_unknown_addresses_get_disconnect() {
    let mut h = Harness::new(config());
    let p = peer(3000);
    for packet in [
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 1, b"x"),
        publish(QoS::AtMostOnce, TopicRef::Predefined(1), 0, b"x"),
        Packet::Register {
            topic_id: 0,
            msg_id: 1,
            topic_name: "a",
        },
        Packet::PingReq { client_id: None },
        Packet::PubRel { msg_id: 1 },
    ] {
        h.send(&p, packet);
        assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
    }
    assert!(h.events().is_empty());
}

#[test]
fn a_second_connect_with_the_same_client_id_replaces_the_session() {
    let mut h = Harness::new(config());
    let old = peer(1000);
    let new = peer(1001);
    h.connect(&old, "alice", 60);
    let (id, _) = h.register(&old, "x", 1);
    h.send(
        &old,
        publish(QoS::AtLeastOnce, TopicRef::Normal(id), 1, b"x"),
    );
    let (_, token) = single_publish(h.events());
    h.connect(&new, "alice", 60);
    assert_eq!(h.core.session_count(), 1);
    // The old session's pending acknowledgement goes nowhere.
    h.core
        .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Accepted);
    assert!(h.transmits().is_empty());
    // The old address is no longer a session; the new session starts with a clean topic table.
    h.send(&old, Packet::PingReq { client_id: None });
    assert_eq!(
        decode(&h.reply(&old)),
        Packet::Disconnect { duration: None }
    );
    h.send(
        &new,
        publish(QoS::AtLeastOnce, TopicRef::Normal(id), 2, b"x"),
    );
    assert_eq!(
        decode(&h.reply(&new)),
        Packet::PubAck {
            topic_id: id,
            msg_id: 2,
            rc: ReturnCode::InvalidTopicId
        }
    );
}

#[test]
fn session_table_is_bounded() {
    let mut h = Harness::new(CoreConfig {
        max_clients: 2,
        ..config()
    });
    h.connect(&peer(1), "a", 60);
    h.connect(&peer(2), "b", 60);
    let p = peer(3);
    h.send(
        &p,
        Packet::Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: "c",
        },
    );
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::ConnAck {
            rc: ReturnCode::Congestion
        }
    );
    // A known client reconnecting is not refused.
    h.connect(&peer(4), "a", 60);
}

#[test]
fn disconnect_is_answered_and_ends_the_session() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.connect(&p, "alice", 60);
    h.send(&p, Packet::Disconnect { duration: None });
    assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
    assert_eq!(h.core.session_count(), 0);
}

#[test]
fn searchgw_is_answered_with_gwinfo() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    h.send(&p, Packet::SearchGw { radius: 1 });
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::GwInfo {
            gw_id: 7,
            gw_addr: &[]
        }
    );
}

#[test]
fn encapsulated_clients_are_answered_through_their_forwarder() {
    let mut h = Harness::new(config());
    let fwd = Peer::forwarder(0);
    let mut inner = Vec::new();
    Packet::Connect {
        will: false,
        clean_session: true,
        duration: 60,
        client_id: "node",
    }
    .encode(&mut inner)
    .unwrap();
    let mut buf = vec![5u8, 0xFE, 0x00, 0xAB, 0xCD];
    buf.extend_from_slice(&inner);
    h.core.handle_datagram(h.now, fwd.clone(), &buf);
    let out = h.transmits();
    assert_eq!(out.len(), 1);
    let (to, bytes) = &out[0];
    assert_eq!(to.addr, fwd.addr);
    assert_eq!(to.node.as_deref(), Some(&[0xAB, 0xCD][..]));
    match codec::decode(bytes, &DecodeLimits::default()).unwrap() {
        Frame::Encapsulated {
            node_id, packet, ..
        } => {
            assert_eq!(node_id, &[0xAB, 0xCD]);
            assert_eq!(
                packet,
                Packet::ConnAck {
                    rc: ReturnCode::Accepted
                }
            );
        }
        other => panic!("expected an encapsulated CONNACK, got {other:?}"),
    }
}

#[test]
fn malformed_and_oversize_datagrams_are_counted_and_not_answered() {
    let mut h = Harness::new(CoreConfig {
        max_packet_size: 64,
        ..config()
    });
    let p = peer(1000);
    for bad in [
        &[][..],
        &[0x02],
        &[0x05, 0x04, 0x04],
        &[0x02, 0x03],
        &[0x03, 0xFF, 0x00],
    ] {
        h.core.handle_datagram(h.now, p.clone(), bad);
    }
    h.core.handle_datagram(h.now, p.clone(), &[0u8; 65]);
    assert!(h.transmits().is_empty());
    let stats = h.core.stats();
    assert_eq!((stats.malformed, stats.oversize), (5, 1));
}

#[test]
fn timer_heap_stays_proportional_under_connect_churn() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    for i in 0..5_000 {
        h.connect(&p, &format!("c{}", i % 50), 60);
    }
    assert!(h.core.timers.len() <= 2 * h.core.session_count() + 1025);
}

proptest! {
    /// Any datagram sequence from a few peers (one of them a forwarder, whose encapsulations
    /// are decoded) leaves the core consistent and never panics.
    #[test]
    fn arbitrary_datagrams_never_break_the_core(
        datagrams in proptest::collection::vec(
            (0u16..5, proptest::collection::vec(any::<u8>(), 0..80)), 0..200),
        results in proptest::collection::vec(any::<bool>(), 0..50),
        reconfigure_at in 0usize..200,
        lowered in 0usize..4,
    ) {
        let mut h = Harness::new(config());
        // Make some datagrams valid-looking connects so sessions exist.
        for port in 0..4u16 {
            h.connect(&peer(port), &format!("c{port}"), 5);
        }
        for (i, (port, bytes)) in datagrams.iter().enumerate() {
            if i == reconfigure_at {
                // A reload in the middle: lower limits (down to what some sessions hold
                // already), other predefined topics, shorter timers.
                let settings = CoreConfig {
                    max_clients: 2 + lowered,
                    max_topics_per_client: lowered,
                    max_inflight_per_client: lowered,
                    max_subscriptions_per_client: lowered,
                    max_queued_per_client: 1 + lowered,
                    max_buffered_per_sleeping_client: 1 + lowered,
                    max_filters: 1 + lowered,
                    retry_interval: Duration::from_secs(1 + lowered as u64),
                    predefined: vec![PredefinedTopic {
                        id: 2,
                        topic: "pre/moved".into(),
                        clients: ClientSet::All,
                    }],
                    ..config()
                };
                h.core.reconfigure(h.now, settings);
                h.core.check_invariants();
            }
            let from = if *port == 4 { Peer::forwarder(0) } else { peer(*port) };
            h.core.handle_datagram(h.now, from, bytes);
            h.now += Duration::from_millis(100);
            h.core.handle_timeout(h.now);
            h.core.check_invariants();
        }
        let tokens: Vec<u64> = h
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Publish { token, .. } => token,
                _ => None,
            })
            .collect();
        for (token, ok) in tokens.iter().zip(results.iter()) {
            let outcome = if *ok { PublishOutcome::Accepted } else { PublishOutcome::Congestion };
            h.core.handle_publish_result(h.now, *token, outcome);
        }
        let _ = h.transmits();
        prop_assert!(h.core.session_count() <= 4 + datagrams.len());
        prop_assert_eq!(h.core.by_client.len(), h.core.by_peer.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions: subscriptions, downlink, Will, sleep, persistence, discovery.

impl Harness {
    fn subscribe(&mut self, from: &Peer, filter: &str, qos: QoS, msg_id: u16) -> (u16, ReturnCode) {
        self.send(
            from,
            Packet::Subscribe {
                dup: false,
                qos,
                msg_id,
                topic: SubscribeTopic::Name(filter),
            },
        );
        match decode(&self.reply(from)) {
            Packet::SubAck {
                topic_id,
                msg_id: m,
                rc,
                ..
            } => {
                assert_eq!(m, msg_id);
                (topic_id, rc)
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    fn downlink(&mut self, topic: &str, payload: &'static [u8], qos: Qos) {
        let _ = self.core.handle_downlink(
            self.now,
            topic,
            Bytes::from_static(payload),
            qos,
            false,
            None,
        );
    }

    fn connect_with_will(&mut self, from: &Peer, client_id: &str, will_topic: &str, will: &[u8]) {
        self.send(
            from,
            Packet::Connect {
                will: true,
                clean_session: true,
                duration: 10,
                client_id,
            },
        );
        assert_eq!(decode(&self.reply(from)), Packet::WillTopicReq);
        self.send(
            from,
            Packet::WillTopic {
                will: Some(WillFlags {
                    qos: QoS::AtLeastOnce,
                    retain: false,
                }),
                topic: will_topic,
            },
        );
        assert_eq!(decode(&self.reply(from)), Packet::WillMsgReq);
        self.send(from, Packet::WillMsg { msg: will });
        assert_eq!(
            decode(&self.reply(from)),
            Packet::ConnAck {
                rc: ReturnCode::Accepted
            }
        );
    }
}

use crate::mqttsn::codec::{SubscribeTopic, WillFlags};
use bytes::Bytes;

fn owned(bytes: &[u8]) -> Packet<'static> {
    // Tests only: leak to get 'static packets out of transmitted buffers.
    decode(Box::leak(bytes.to_vec().into_boxed_slice()))
}

fn publishes(events: Vec<Event>) -> Vec<Message> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::Publish { message, .. } => Some(message),
            _ => None,
        })
        .collect()
}

#[test]
fn subscriptions_are_reference_counted_upstream() {
    let mut h = Harness::new(config());
    let (a, b) = (peer(1), peer(2));
    h.connect(&a, "a", 60);
    h.connect(&b, "b", 60);
    let (id, rc) = h.subscribe(&a, "room/temp", QoS::AtLeastOnce, 1);
    assert_eq!(rc, ReturnCode::Accepted);
    assert!(id != 0, "a concrete topic gets a topic id");
    assert_eq!(
        h.subscribe(&b, "room/+", QoS::AtMostOnce, 1),
        (0, ReturnCode::Accepted)
    );
    assert_eq!(
        h.subscribe(&b, "room/temp", QoS::AtMostOnce, 2).1,
        ReturnCode::Accepted
    );
    let events = h.events();
    assert_eq!(
        events,
        vec![
            Event::Subscribe {
                filter: "room/temp".into(),
                qos: Qos::AtLeastOnce
            },
            Event::Subscribe {
                filter: "room/+".into(),
                qos: Qos::AtMostOnce
            },
        ],
        "the second subscriber of room/temp adds no upstream subscription"
    );
    h.send(
        &a,
        Packet::Unsubscribe {
            msg_id: 3,
            topic: SubscribeTopic::Name("room/temp"),
        },
    );
    assert_eq!(decode(&h.reply(&a)), Packet::UnsubAck { msg_id: 3 });
    assert!(h.events().is_empty(), "b still holds room/temp");
    // b's session ends: its filters are released.
    h.send(&b, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    let mut released = h.events();
    released.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        released,
        vec![
            Event::Unsubscribe {
                filter: "room/+".into()
            },
            Event::Unsubscribe {
                filter: "room/temp".into()
            },
        ]
    );
}

#[test]
fn invalid_filters_and_too_many_subscriptions_are_refused() {
    let mut h = Harness::new(CoreConfig {
        max_subscriptions_per_client: 1,
        ..config()
    });
    let p = peer(1);
    h.connect(&p, "a", 60);
    assert_eq!(
        h.subscribe(&p, "a/#/b", QoS::AtMostOnce, 1),
        (0, ReturnCode::InvalidTopicId)
    );
    assert_eq!(
        h.subscribe(&p, "x", QoS::AtMostOnce, 2).1,
        ReturnCode::Accepted
    );
    assert_eq!(
        h.subscribe(&p, "y", QoS::AtMostOnce, 3),
        (0, ReturnCode::Congestion)
    );
    // Re-subscribing to a held filter is an update, not a new subscription.
    assert_eq!(
        h.subscribe(&p, "x", QoS::AtLeastOnce, 4).1,
        ReturnCode::Accepted
    );
}

#[test]
fn downlink_registers_unknown_topics_first_and_sends_one_qos1_at_a_time() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "a", 60);
    h.subscribe(&p, "d/#", QoS::AtLeastOnce, 1);
    h.downlink("d/x", b"one", Qos::AtLeastOnce);
    h.downlink("d/x", b"two", Qos::AtLeastOnce);
    let Packet::Register {
        topic_id,
        msg_id,
        topic_name,
    } = owned(&h.reply(&p))
    else {
        panic!("expected REGISTER")
    };
    assert_eq!(topic_name, "d/x");
    h.send(
        &p,
        Packet::RegAck {
            topic_id,
            msg_id,
            rc: ReturnCode::Accepted,
        },
    );
    let Packet::Publish {
        qos,
        topic,
        msg_id,
        data,
        dup,
        ..
    } = owned(&h.reply(&p))
    else {
        panic!("expected PUBLISH")
    };
    assert_eq!(
        (qos, topic, data, dup),
        (
            QoS::AtLeastOnce,
            TopicRef::Normal(topic_id),
            &b"one"[..],
            false
        )
    );
    // The second waits for the first's PUBACK.
    assert!(h.transmits().is_empty());
    h.send(
        &p,
        Packet::PubAck {
            topic_id,
            msg_id,
            rc: ReturnCode::Accepted,
        },
    );
    let Packet::Publish { data, .. } = owned(&h.reply(&p)) else {
        panic!("expected PUBLISH")
    };
    assert_eq!(data, b"two");
}

#[test]
fn downlink_qos_is_the_minimum_of_subscription_and_message() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "a", 60);
    let (id, _) = h.subscribe(&p, "t/q", QoS::AtMostOnce, 1);
    h.downlink("t/q", b"x", Qos::ExactlyOnce);
    let Packet::Publish {
        qos, topic, msg_id, ..
    } = owned(&h.reply(&p))
    else {
        panic!()
    };
    assert_eq!(
        (qos, topic, msg_id),
        (QoS::AtMostOnce, TopicRef::Normal(id), 0)
    );
    assert_eq!(h.core.stats().downlink_delivered, 1);
}

#[test]
fn predefined_and_short_topics_are_used_for_downlink() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "alice", 60);
    h.send(
        &p,
        Packet::Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 1,
            topic: SubscribeTopic::Predefined(2),
        },
    );
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::SubAck {
            qos: QoS::AtMostOnce,
            topic_id: 2,
            msg_id: 1,
            rc: ReturnCode::Accepted
        }
    );
    h.send(
        &p,
        Packet::Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 2,
            topic: SubscribeTopic::Short(*b"ab"),
        },
    );
    let _ = h.transmits();
    h.downlink("pre/two", b"p", Qos::AtMostOnce);
    h.downlink("ab", b"s", Qos::AtMostOnce);
    let out: Vec<Packet<'static>> = h.transmits().iter().map(|(_, b)| owned(b)).collect();
    let topics: Vec<TopicRef> = out
        .iter()
        .map(|p| match p {
            Packet::Publish { topic, .. } => *topic,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        topics,
        vec![TopicRef::Predefined(2), TopicRef::Short(*b"ab")]
    );
}

#[test]
fn retransmission_with_dup_then_the_client_is_lost_and_its_will_published() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect_with_will(&p, "w", "wills/w", b"gone");
    let (id, _) = h.subscribe(&p, "cmd", QoS::AtLeastOnce, 1);
    h.downlink("cmd", b"go", Qos::AtLeastOnce);
    let Packet::Publish {
        dup: false, msg_id, ..
    } = owned(&h.reply(&p))
    else {
        panic!()
    };
    for _ in 0..3 {
        // Keep the session alive (PINGREQ) but never acknowledge the PUBLISH.
        h.send(&p, Packet::PingReq { client_id: None });
        assert_eq!(decode(&h.reply(&p)), Packet::PingResp);
        h.advance(Duration::from_secs(10));
        let Packet::Publish {
            dup,
            msg_id: m,
            topic,
            ..
        } = owned(&h.reply(&p))
        else {
            panic!()
        };
        assert_eq!((dup, m, topic), (true, msg_id, TopicRef::Normal(id)));
    }
    assert!(
        h.events()
            .iter()
            .all(|e| !matches!(e, Event::Publish { .. }))
    );
    h.send(&p, Packet::PingReq { client_id: None });
    let _ = h.transmits();
    h.advance(Duration::from_secs(10));
    let wills = publishes(h.events());
    assert_eq!(wills.len(), 1);
    assert_eq!(
        (wills[0].topic.as_str(), &wills[0].payload[..], wills[0].qos),
        ("wills/w", &b"gone"[..], Qos::AtLeastOnce)
    );
    assert_eq!(h.core.session_count(), 0);
    assert_eq!(h.core.stats().retransmissions, 3);
}

#[test]
fn will_is_published_on_keep_alive_loss_but_never_after_a_clean_disconnect() {
    let mut h = Harness::new(config());
    let (a, b) = (peer(1), peer(2));
    h.connect_with_will(&a, "a", "wills/a", b"a-lost");
    h.connect_with_will(&b, "b", "wills/b", b"b-lost");
    h.send(&b, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    h.advance(Duration::from_secs(15));
    let wills = publishes(h.events());
    assert_eq!(
        wills.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
        vec!["wills/a"]
    );
}

#[test]
fn an_empty_willtopic_means_no_will_and_updates_are_answered() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.send(
        &p,
        Packet::Connect {
            will: true,
            clean_session: true,
            duration: 10,
            client_id: "x",
        },
    );
    assert_eq!(decode(&h.reply(&p)), Packet::WillTopicReq);
    h.send(
        &p,
        Packet::WillTopic {
            will: None,
            topic: "",
        },
    );
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::ConnAck {
            rc: ReturnCode::Accepted
        }
    );
    // No Will yet: a WILLMSGUPD has nothing to attach to.
    h.send(&p, Packet::WillMsgUpd { msg: b"m" });
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::WillMsgResp {
            rc: ReturnCode::NotSupported
        }
    );
    let flags = Some(WillFlags {
        qos: QoS::AtMostOnce,
        retain: true,
    });
    h.send(
        &p,
        Packet::WillTopicUpd {
            will: flags,
            topic: "w/x",
        },
    );
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::WillTopicResp {
            rc: ReturnCode::Accepted
        }
    );
    h.send(&p, Packet::WillMsgUpd { msg: b"bye" });
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::WillMsgResp {
            rc: ReturnCode::Accepted
        }
    );
    h.advance(Duration::from_secs(15));
    let events = h.events();
    let wills = publishes(events);
    assert_eq!(wills.len(), 1);
    assert_eq!(
        (
            wills[0].topic.as_str(),
            &wills[0].payload[..],
            wills[0].retain
        ),
        ("w/x", &b"bye"[..], true)
    );
}

#[test]
fn full_sleep_cycle_delivers_buffered_messages_one_at_a_time_then_pingresp() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "s", 60);
    h.subscribe(&p, "s/in", QoS::AtLeastOnce, 1);
    h.send(
        &p,
        Packet::Disconnect {
            duration: Some(100),
        },
    );
    assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
    for payload in [&b"1"[..], b"2", b"3"] {
        let _ = h.core.handle_downlink(
            h.now,
            "s/in",
            Bytes::copy_from_slice(payload),
            Qos::AtLeastOnce,
            false,
            None,
        );
    }
    assert!(h.transmits().is_empty(), "buffered while asleep");
    h.advance(Duration::from_secs(100));
    // Wakes from a new port (NAT rebinding): PINGREQ carries the ClientId.
    let woken = peer(2);
    h.send(
        &woken,
        Packet::PingReq {
            client_id: Some("s"),
        },
    );
    let mut got = Vec::new();
    loop {
        let out = h.transmits();
        assert_eq!(out.len(), 1, "one at a time: {out:?}");
        let (to, bytes) = &out[0];
        assert_eq!(to, &woken);
        match owned(bytes) {
            Packet::Publish {
                msg_id,
                data,
                topic,
                ..
            } => {
                got.push(data.to_vec());
                h.send(
                    &woken,
                    Packet::PubAck {
                        topic_id: topic_id_of(topic),
                        msg_id,
                        rc: ReturnCode::Accepted,
                    },
                );
            }
            Packet::Register {
                topic_id, msg_id, ..
            } => {
                h.send(
                    &woken,
                    Packet::RegAck {
                        topic_id,
                        msg_id,
                        rc: ReturnCode::Accepted,
                    },
                );
            }
            Packet::PingResp => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
    // Asleep again: the old address cannot act for the session.
    h.send(&p, Packet::PingReq { client_id: None });
    assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
    // Nothing buffered: PINGRESP at once.
    h.send(
        &woken,
        Packet::PingReq {
            client_id: Some("s"),
        },
    );
    assert_eq!(decode(&h.reply(&woken)), Packet::PingResp);
    // The sleep timer (100 s + 10%) expires: lost.
    h.advance(Duration::from_secs(109));
    assert_eq!(h.core.session_count(), 1);
    h.advance(Duration::from_secs(2));
    assert_eq!(h.core.stats().clients_lost, 1);
}

#[test]
fn a_new_sleep_duration_updates_the_timer_and_connect_makes_it_active() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "s", 60);
    h.send(&p, Packet::Disconnect { duration: Some(10) });
    let _ = h.transmits();
    h.send(
        &p,
        Packet::Disconnect {
            duration: Some(1000),
        },
    );
    assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
    h.advance(Duration::from_secs(20));
    assert_eq!(
        h.core.session_count(),
        1,
        "the 10 s timer was replaced by 1000 s"
    );
    h.send(
        &p,
        Packet::Connect {
            will: false,
            clean_session: false,
            duration: 60,
            client_id: "s",
        },
    );
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::ConnAck {
            rc: ReturnCode::Accepted
        }
    );
    h.advance(Duration::from_secs(89));
    assert_eq!(h.core.session_count(), 1);
    h.advance(Duration::from_secs(2));
    assert_eq!(
        h.core.stats().clients_lost,
        1,
        "active again: keep-alive 60 s x 1.5 applies"
    );
}

#[test]
fn a_stolen_address_cannot_inject_into_a_rebound_session() {
    let mut h = Harness::new(config());
    let (old, new) = (peer(1), peer(2));
    h.connect(&old, "victim", 60);
    h.send(&old, Packet::Disconnect { duration: Some(60) });
    let _ = h.transmits();
    h.send(
        &new,
        Packet::PingReq {
            client_id: Some("victim"),
        },
    );
    assert_eq!(decode(&h.reply(&new)), Packet::PingResp);
    // Someone else now holding the old address publishes: not the victim's session.
    h.send(
        &old,
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 1, b"evil"),
    );
    assert_eq!(
        decode(&h.reply(&old)),
        Packet::Disconnect { duration: None }
    );
    assert!(h.events().is_empty());
}

#[test]
fn persistent_sessions_keep_subscriptions_and_qos1_downlink_and_reregister() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.send(
        &p,
        Packet::Connect {
            will: false,
            clean_session: false,
            duration: 60,
            client_id: "ps",
        },
    );
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::ConnAck {
            rc: ReturnCode::Accepted
        }
    );
    let (id, _) = h.subscribe(&p, "ps/cmd", QoS::AtLeastOnce, 1);
    assert_eq!(h.events().len(), 1);
    h.send(&p, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    assert_eq!(h.core.session_count(), 1, "kept after DISCONNECT");
    assert!(h.events().is_empty(), "its subscription stays upstream");
    h.downlink("ps/cmd", b"kept", Qos::AtLeastOnce);
    h.downlink("ps/cmd", b"dropped-qos0", Qos::AtMostOnce);
    let q = peer(2);
    h.send(
        &q,
        Packet::Connect {
            will: false,
            clean_session: false,
            duration: 60,
            client_id: "ps",
        },
    );
    // After the reconnect the client knows no ids: the gateway registers again, same id.
    let out = h.transmits();
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(
        owned(&out[0].1),
        Packet::ConnAck {
            rc: ReturnCode::Accepted
        }
    );
    let Packet::Register {
        topic_id,
        msg_id,
        topic_name,
    } = owned(&out[1].1)
    else {
        panic!()
    };
    assert_eq!((topic_id, topic_name), (id, "ps/cmd"));
    h.send(
        &q,
        Packet::RegAck {
            topic_id,
            msg_id,
            rc: ReturnCode::Accepted,
        },
    );
    let Packet::Publish { data, .. } = owned(&h.reply(&q)) else {
        panic!()
    };
    assert_eq!(data, b"kept");
    // Session expiry removes a disconnected persistent session.
    h.send(&q, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    h.advance(Duration::from_secs(3601));
    assert_eq!(h.core.session_count(), 0);
    assert_eq!(
        h.events(),
        vec![Event::Unsubscribe {
            filter: "ps/cmd".into()
        }]
    );
}

#[test]
fn a_rejecting_regack_stops_the_topic_and_puback_invalid_id_reregisters() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "c", 60);
    h.subscribe(&p, "r/#", QoS::AtLeastOnce, 1);
    h.downlink("r/no", b"x", Qos::AtLeastOnce);
    let Packet::Register {
        topic_id, msg_id, ..
    } = owned(&h.reply(&p))
    else {
        panic!()
    };
    h.send(
        &p,
        Packet::RegAck {
            topic_id,
            msg_id,
            rc: ReturnCode::InvalidTopicId,
        },
    );
    h.downlink("r/no", b"y", Qos::AtLeastOnce);
    assert!(h.transmits().is_empty(), "refused topic is not sent again");

    h.downlink("r/yes", b"z", Qos::AtLeastOnce);
    let Packet::Register {
        topic_id, msg_id, ..
    } = owned(&h.reply(&p))
    else {
        panic!()
    };
    h.send(
        &p,
        Packet::RegAck {
            topic_id,
            msg_id,
            rc: ReturnCode::Accepted,
        },
    );
    let Packet::Publish { msg_id, .. } = owned(&h.reply(&p)) else {
        panic!()
    };
    // The client lost the id: re-REGISTER, then the same message again.
    h.send(
        &p,
        Packet::PubAck {
            topic_id,
            msg_id,
            rc: ReturnCode::InvalidTopicId,
        },
    );
    let Packet::Register {
        topic_id: again,
        msg_id,
        topic_name,
    } = owned(&h.reply(&p))
    else {
        panic!()
    };
    assert_eq!((again, topic_name), (topic_id, "r/yes"));
    h.send(
        &p,
        Packet::RegAck {
            topic_id,
            msg_id,
            rc: ReturnCode::Accepted,
        },
    );
    let Packet::Publish { data, msg_id, .. } = owned(&h.reply(&p)) else {
        panic!()
    };
    assert_eq!(data, b"z");
    h.send(
        &p,
        Packet::PubAck {
            topic_id,
            msg_id,
            rc: ReturnCode::Accepted,
        },
    );
    assert_eq!(h.core.stats().downlink_delivered, 1);
}

#[test]
fn qos2_downlink_does_the_full_exchange() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "c", 60);
    h.subscribe(&p, "q2", QoS::ExactlyOnce, 1);
    h.downlink("q2", b"x", Qos::ExactlyOnce);
    let Packet::Publish {
        qos: QoS::ExactlyOnce,
        msg_id,
        ..
    } = owned(&h.reply(&p))
    else {
        panic!()
    };
    h.send(&p, Packet::PubRec { msg_id });
    assert_eq!(decode(&h.reply(&p)), Packet::PubRel { msg_id });
    // PUBREL is retransmitted until PUBCOMP.
    h.advance(Duration::from_secs(10));
    assert_eq!(decode(&h.reply(&p)), Packet::PubRel { msg_id });
    h.send(&p, Packet::PubComp { msg_id });
    assert!(h.transmits().is_empty());
    assert_eq!(h.core.stats().downlink_delivered, 1);
}

#[test]
fn retained_messages_reach_new_subscribers() {
    let mut h = Harness::new(config());
    // An earlier subscriber of the same filter: the upstream subscription exists, so the
    // broker will not send the retained messages again and the cache serves them.
    let first = peer(9);
    h.connect(&first, "first", 60);
    h.subscribe(&first, "cfg/#", QoS::AtMostOnce, 1);
    let _ = h.core.handle_downlink(
        h.now,
        "cfg/a",
        Bytes::from_static(b"v1"),
        Qos::AtLeastOnce,
        true,
        None,
    );
    let _ = h.core.handle_downlink(
        h.now,
        "cfg/b",
        Bytes::from_static(b"v2"),
        Qos::AtMostOnce,
        true,
        None,
    );
    let _ = h
        .core
        .handle_downlink(h.now, "cfg/b", Bytes::new(), Qos::AtMostOnce, true, None);
    h.transmits();
    let p = peer(1);
    h.connect(&p, "c", 60);
    h.send(
        &p,
        Packet::Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 1,
            topic: SubscribeTopic::Name("cfg/#"),
        },
    );
    let out = h.transmits();
    assert_eq!(out.len(), 2, "SUBACK, then the retained message's REGISTER");
    assert!(matches!(
        owned(&out[0].1),
        Packet::SubAck {
            rc: ReturnCode::Accepted,
            ..
        }
    ));
    let Packet::Register {
        topic_id,
        msg_id,
        topic_name,
    } = owned(&out[1].1)
    else {
        panic!()
    };
    assert_eq!(
        topic_name, "cfg/a",
        "cfg/b was cleared by an empty retained message"
    );
    h.send(
        &p,
        Packet::RegAck {
            topic_id,
            msg_id,
            rc: ReturnCode::Accepted,
        },
    );
    let Packet::Publish {
        retain, data, qos, ..
    } = owned(&h.reply(&p))
    else {
        panic!()
    };
    assert_eq!((retain, data, qos), (true, &b"v1"[..], QoS::AtMostOnce));
}

/// Peers that got at least one datagram, in order, without repeats.
fn recipients(out: &[(Peer, Vec<u8>)]) -> Vec<Peer> {
    let mut who: Vec<Peer> = Vec::new();
    for (p, _) in out {
        if !who.contains(p) {
            who.push(p.clone());
        }
    }
    who
}

#[test]
fn a_new_upstream_filter_leaves_retained_messages_to_the_broker() {
    let mut h = Harness::new(config());
    let (a, b) = (peer(1), peer(2));
    h.connect(&a, "a", 60);
    h.subscribe(&a, "cfg/#", QoS::AtMostOnce, 1);
    let _ = h.core.handle_downlink(
        h.now,
        "cfg/x",
        Bytes::from_static(b"v"),
        Qos::AtMostOnce,
        true,
        None,
    );
    assert_eq!(
        recipients(&h.transmits()),
        std::slice::from_ref(&a),
        "REGISTER of cfg/x to a"
    );
    // b's filter is new upstream: the broker answers its SUBSCRIBE with the retained
    // message, so the cache must not deliver a second copy.
    h.connect(&b, "b", 60);
    h.subscribe(&b, "cfg/x", QoS::AtMostOnce, 1);
    assert!(h.transmits().is_empty());
    assert!(h.core.poll_event().is_some(), "upstream SUBSCRIBE cfg/x");
    // The broker's copy names b's filter: a, subscribed to cfg/# all along, gets nothing.
    let only_x: [Arc<str>; 1] = [Arc::from("cfg/x")];
    let _ = h.core.handle_downlink(
        h.now,
        "cfg/x",
        Bytes::from_static(b"v"),
        Qos::AtMostOnce,
        true,
        Some(&only_x),
    );
    let out = h.transmits();
    assert_eq!(recipients(&out), [b]);
    assert!(matches!(
        owned(&out[0].1),
        Packet::Publish { retain: true, .. }
    ));
}

#[test]
fn each_upstream_copy_goes_to_the_subscribers_of_its_own_filters() {
    let mut h = Harness::new(config());
    let (a, b) = (peer(1), peer(2));
    h.connect(&a, "a", 60);
    h.connect(&b, "b", 60);
    h.subscribe(&a, "dup/#", QoS::AtMostOnce, 1);
    h.subscribe(&b, "dup/t", QoS::AtMostOnce, 1);
    let copy = |h: &mut Harness, filters: Option<&[Arc<str>]>| {
        let _ = h.core.handle_downlink(
            h.now,
            "dup/t",
            Bytes::from_static(b"m"),
            Qos::AtMostOnce,
            false,
            filters,
        );
        let mut out = h.transmits();
        // a's first copy REGISTERs dup/t: acknowledge it so the PUBLISH follows.
        let mut i = 0;
        while let Some((p, bytes)) = out.get(i).cloned() {
            if let Packet::Register {
                topic_id, msg_id, ..
            } = owned(&bytes)
            {
                let rc = ReturnCode::Accepted;
                h.send(
                    &p,
                    Packet::RegAck {
                        topic_id,
                        msg_id,
                        rc,
                    },
                );
                out.extend(h.transmits());
            }
            i += 1;
        }
        recipients(&out)
    };
    // The broker sends one copy per matching upstream filter.
    assert_eq!(
        copy(&mut h, Some(&[Arc::from("dup/#")])),
        std::slice::from_ref(&a)
    );
    assert_eq!(
        copy(&mut h, Some(&[Arc::from("dup/t")])),
        std::slice::from_ref(&b)
    );
    // One copy for both filters (a broker that merges overlapping subscriptions).
    let both: [Arc<str>; 2] = [Arc::from("dup/t"), Arc::from("dup/#")];
    let mut got = copy(&mut h, Some(&both));
    got.sort_by(|x, y| x.addr.cmp(&y.addr));
    assert_eq!(got, [a, b]);
    // Unknown (MQTT 3.1.1): every matching filter.
    assert_eq!(copy(&mut h, None).len(), 2);
    // Filters nobody holds any more, or that do not match the topic, reach nobody.
    assert!(copy(&mut h, Some(&[Arc::from("gone/#")])).is_empty());
    assert!(copy(&mut h, Some(&[Arc::from("dup/u")])).is_empty());
}

#[test]
fn a_wildcard_will_topic_is_answered_with_invalid_topic() {
    let mut h = Harness::new(config());
    let p = peer(1);
    let flags = Some(WillFlags {
        qos: QoS::AtMostOnce,
        retain: false,
    });
    h.send(
        &p,
        Packet::Connect {
            will: true,
            clean_session: true,
            duration: 10,
            client_id: "w",
        },
    );
    assert_eq!(decode(&h.reply(&p)), Packet::WillTopicReq);
    h.send(
        &p,
        Packet::WillTopic {
            will: flags,
            topic: "w/#",
        },
    );
    let rc = ReturnCode::InvalidTopicId;
    assert_eq!(decode(&h.reply(&p)), Packet::ConnAck { rc });
    // Connected without a Will: a WILLTOPICUPD with a wildcard is refused the same way.
    h.connect(&p, "w", 10);
    h.send(
        &p,
        Packet::WillTopicUpd {
            will: flags,
            topic: "w/+",
        },
    );
    assert_eq!(decode(&h.reply(&p)), Packet::WillTopicResp { rc });
}

#[test]
fn queues_are_bounded_with_the_configured_policy() {
    // 30 messages for a sleeper with room for 20: drop_oldest keeps 10..30, drop_new 0..20.
    for (policy, first, last) in [
        (QueueFull::DropOldest, 10u8, 29u8),
        (QueueFull::DropNew, 0, 19),
    ] {
        let mut h = Harness::new(CoreConfig {
            queue_full: policy,
            ..config()
        });
        let p = peer(1);
        h.connect(&p, "c", 60);
        h.subscribe(&p, "t", QoS::AtLeastOnce, 1);
        h.send(
            &p,
            Packet::Disconnect {
                duration: Some(600),
            },
        );
        let _ = h.transmits();
        for i in 0..30u8 {
            let _ = h.core.handle_downlink(
                h.now,
                "t",
                Bytes::from(vec![i]),
                Qos::AtLeastOnce,
                false,
                None,
            );
        }
        assert_eq!(h.core.stats().downlink_dropped, 10, "{policy:?}");
        h.send(
            &p,
            Packet::PingReq {
                client_id: Some("c"),
            },
        );
        let mut got = Vec::new();
        for _ in 0..100 {
            let out = h.transmits();
            let Some((_, bytes)) = out.first() else { break };
            match owned(bytes) {
                Packet::Publish {
                    msg_id,
                    topic,
                    data,
                    ..
                } => {
                    got.extend_from_slice(data);
                    let ack = Packet::PubAck {
                        topic_id: topic_id_of(topic),
                        msg_id,
                        rc: ReturnCode::Accepted,
                    };
                    h.send(&p, ack);
                }
                Packet::PingResp => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, (first..=last).collect::<Vec<u8>>(), "{policy:?}");
    }
}

#[test]
fn advertise_goes_to_configured_destinations_only_while_an_upstream_is_up() {
    let dest = peer(5000);
    let mut h = Harness::new(CoreConfig {
        advertise_to: vec![dest.clone()],
        advertise_interval: Duration::from_secs(900),
        ..config()
    });
    h.core.handle_timeout(h.now);
    assert_eq!(
        decode(&h.reply(&dest)),
        Packet::Advertise {
            gw_id: 7,
            duration: 900
        }
    );
    h.core.set_upstream_available(false);
    h.advance(Duration::from_secs(900));
    assert!(h.transmits().is_empty());
    h.core.set_upstream_available(true);
    h.advance(Duration::from_secs(900));
    assert_eq!(
        decode(&h.reply(&dest)),
        Packet::Advertise {
            gw_id: 7,
            duration: 900
        }
    );
    // No destinations: no ADVERTISE, ever.
    let mut quiet = Harness::new(config());
    quiet.advance(Duration::from_secs(10_000));
    assert!(quiet.transmits().is_empty());
}

#[test]
fn searchgw_can_be_answered_to_the_destinations() {
    let dest = peer(5000);
    let mut h = Harness::new(CoreConfig {
        advertise_to: vec![dest.clone()],
        gwinfo_to_destinations: true,
        ..config()
    });
    h.send(&peer(1), Packet::SearchGw { radius: 2 });
    assert_eq!(
        decode(&h.reply(&dest)),
        Packet::GwInfo {
            gw_id: 7,
            gw_addr: &[]
        }
    );
}

/// A seeded, lossy and reordering link: the gateway's datagrams to the client are dropped with
/// probability 1/4 and delivered in shuffled order; the client acknowledges every PUBLISH and
/// REGISTER it receives. Every message must reach the application exactly once (DUP copies of
/// an already delivered MsgId aside) and the session must survive.
#[test]
fn downlink_over_a_lossy_reordering_link_delivers_every_message_once() {
    use rand::{Rng, SeedableRng, rngs::SmallRng};
    for seed in 0..20u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut h = Harness::new(CoreConfig {
            max_retries: 8,
            max_queued_per_client: 100,
            ..config()
        });
        let p = peer(1);
        h.connect(&p, "lossy", 0);
        h.subscribe(&p, "l/#", QoS::AtLeastOnce, 1);
        for i in 0..20u32 {
            let _ = h.core.handle_downlink(
                h.now,
                &format!("l/{}", i % 3),
                Bytes::from(i.to_be_bytes().to_vec()),
                Qos::AtLeastOnce,
                false,
                None,
            );
        }
        let mut seen_ids = HashSet::new();
        let mut app = Vec::new();
        for _step in 0..2_000 {
            let mut out = h.transmits();
            // Reorder what is in the air at once.
            for i in (1..out.len()).rev() {
                out.swap(i, rng.random_range(0..=i));
            }
            for (_, bytes) in out {
                if rng.random_range(0..4) == 0 {
                    continue;
                }
                match owned(&bytes) {
                    Packet::Publish {
                        msg_id,
                        data,
                        topic,
                        ..
                    } => {
                        if seen_ids.insert((msg_id, data.to_vec())) {
                            app.push(data.to_vec());
                        }
                        h.send(
                            &p,
                            Packet::PubAck {
                                topic_id: topic_id_of(topic),
                                msg_id,
                                rc: ReturnCode::Accepted,
                            },
                        );
                    }
                    Packet::Register {
                        topic_id, msg_id, ..
                    } => h.send(
                        &p,
                        Packet::RegAck {
                            topic_id,
                            msg_id,
                            rc: ReturnCode::Accepted,
                        },
                    ),
                    _ => {}
                }
            }
            if app.len() == 20 {
                break;
            }
            h.advance(Duration::from_secs(10));
        }
        let mut expected: Vec<Vec<u8>> = (0..20u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let mut got = app.clone();
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "seed {seed}");
        assert_eq!(h.core.session_count(), 1, "seed {seed}");
    }
}

#[test]
fn timer_heap_holds_about_one_entry_per_session_under_heavy_downlink() {
    let mut h = Harness::new(CoreConfig {
        max_queued_per_client: 20_000,
        ..config()
    });
    let p = peer(1);
    h.connect(&p, "busy", 60);
    let (id, _) = h.subscribe(&p, "t", QoS::AtLeastOnce, 1);
    for i in 0..2_000u16 {
        h.downlink("t", b"x", Qos::AtMostOnce);
        h.downlink("t", b"y", Qos::AtLeastOnce);
        // Acknowledge whatever QoS 1 PUBLISH is out, so the next one goes.
        for (_, bytes) in h.transmits() {
            if let Packet::Publish {
                qos: QoS::AtLeastOnce,
                msg_id,
                ..
            } = owned(&bytes)
            {
                h.send(
                    &p,
                    Packet::PubAck {
                        topic_id: id,
                        msg_id,
                        rc: ReturnCode::Accepted,
                    },
                );
            }
        }
        h.now += Duration::from_millis(u64::from(i % 3));
    }
    assert!(
        h.core.timers.len() <= 4,
        "{} timer entries",
        h.core.timers.len()
    );
}

mod forwarders;
mod local;
mod observe;
mod peers;
mod persist;
mod reload;
mod routes;
mod security;
mod serial_link;
mod states;
