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
    let fwd = peer(5000);
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
    /// Any datagram sequence from a few peers leaves the core consistent and never panics.
    #[test]
    fn arbitrary_datagrams_never_break_the_core(
        datagrams in proptest::collection::vec(
            (0u16..4, proptest::collection::vec(any::<u8>(), 0..80)), 0..200),
        results in proptest::collection::vec(any::<bool>(), 0..50),
    ) {
        let mut h = Harness::new(config());
        // Make some datagrams valid-looking connects so sessions exist.
        for port in 0..4u16 {
            h.connect(&peer(port), &format!("c{port}"), 5);
        }
        for (port, bytes) in &datagrams {
            h.core.handle_datagram(h.now, peer(*port), bytes);
            h.now += Duration::from_millis(100);
            h.core.handle_timeout(h.now);
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
