//! Which packets a session may send in which state, CONNECT refusals, and the bound on the
//! distinct filters subscribed upstream.

use super::*;

/// A 33-character ClientId, as in a Paho MQTTSNPacket sample.
const LONG_ID: &str = "paho-mqttsn-sample-client-0123456";

fn connect_packet(client_id: &str, will: bool) -> Packet<'_> {
    Packet::Connect {
        will,
        clean_session: true,
        duration: 60,
        client_id,
    }
}

fn connack(rc: ReturnCode) -> Packet<'static> {
    Packet::ConnAck { rc }
}

#[test]
fn a_client_id_longer_than_the_limit_gets_connack_not_supported() {
    let mut h = Harness::new(config());
    let p = peer(1);
    let request = {
        let mut buf = Vec::new();
        connect_packet(LONG_ID, false).encode(&mut buf).unwrap();
        buf
    };
    h.core.handle_datagram(h.now, p.clone(), &request);
    let answer = h.reply(&p);
    assert_eq!(decode(&answer), connack(ReturnCode::NotSupported));
    // Bounded: the answer is smaller than the request (no amplification), nothing is kept.
    assert!(answer.len() < request.len());
    assert_eq!(h.core.session_count(), 0);
    assert!(h.events().is_empty());
    let stats = h.core.stats();
    assert_eq!(stats.connects_refused, 1);
    assert_eq!(stats.malformed, 0, "a refused CONNECT is not malformed");
    // The limit itself is accepted.
    h.connect(&p, &LONG_ID[..23], 60);
}

#[test]
fn an_empty_client_id_gets_connack_not_supported() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.send(&p, connect_packet("", false));
    assert_eq!(decode(&h.reply(&p)), connack(ReturnCode::NotSupported));
    assert_eq!(h.core.session_count(), 0);
    assert_eq!(h.core.stats().connects_refused, 1);
}

#[test]
fn a_refused_connect_with_the_will_flag_starts_no_will_handshake() {
    let mut h = Harness::new(CoreConfig {
        max_clients: 1,
        ..config()
    });
    let p = peer(1);
    h.send(&p, connect_packet(LONG_ID, true));
    assert_eq!(decode(&h.reply(&p)), connack(ReturnCode::NotSupported));
    h.send(&p, connect_packet("", true));
    assert_eq!(decode(&h.reply(&p)), connack(ReturnCode::NotSupported));
    // A WILLTOPIC now acts on nothing.
    h.send(
        &p,
        Packet::WillTopic {
            will: Some(WillFlags {
                qos: QoS::AtMostOnce,
                retain: false,
            }),
            topic: "w",
        },
    );
    assert!(h.transmits().is_empty());
    // Session table full: congestion, and no handshake either.
    h.connect(&peer(2), "a", 60);
    h.send(&p, connect_packet("b", true));
    assert_eq!(decode(&h.reply(&p)), connack(ReturnCode::Congestion));
    assert_eq!(h.core.session_count(), 1);
    assert_eq!(h.core.stats().connects_refused, 3);
}

#[test]
fn a_connect_refused_for_the_session_limit_leaves_the_address_owner_alone() {
    let mut h = Harness::new(CoreConfig {
        max_clients: 1,
        ..config()
    });
    let p = peer(1);
    h.connect(&p, "a", 60);
    // Another ClientId from the same address, with the table full: refused, and "a" keeps its
    // address.
    h.send(&p, connect_packet("b", false));
    assert_eq!(decode(&h.reply(&p)), connack(ReturnCode::Congestion));
    h.send(&p, Packet::PingReq { client_id: None });
    assert_eq!(decode(&h.reply(&p)), Packet::PingResp);
}

// ---------------------------------------------------------------------------------------------
// The state x packet matrix.

/// Where the client named "c" at `peer(1)` is when the packet arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// No session is bound to the address.
    NoSession,
    /// CONNECT with the Will flag sent, WILLTOPICREQ received.
    WillTopic,
    /// WILLTOPIC sent, WILLMSGREQ received.
    WillMsg,
    Active,
    Asleep,
    /// Woken by PINGREQ(ClientId), a buffered QoS 1 PUBLISH (MsgId 1) waiting for its PUBACK.
    Awake,
    /// CleanSession=0, keep-alive expired: the session waits, unbound, for a CONNECT.
    Lost,
}

const STATES: [At; 7] = [
    At::NoSession,
    At::WillTopic,
    At::WillMsg,
    At::Active,
    At::Asleep,
    At::Awake,
    At::Lost,
];

fn in_state(at: At) -> Harness {
    let mut h = Harness::new(config());
    let p = peer(1);
    let will_flags = Some(WillFlags {
        qos: QoS::AtMostOnce,
        retain: false,
    });
    match at {
        At::NoSession => {}
        At::WillTopic | At::WillMsg => {
            h.send(&p, connect_packet("c", true));
            assert_eq!(decode(&h.reply(&p)), Packet::WillTopicReq);
            if at == At::WillMsg {
                h.send(
                    &p,
                    Packet::WillTopic {
                        will: will_flags,
                        topic: "c/will",
                    },
                );
                assert_eq!(decode(&h.reply(&p)), Packet::WillMsgReq);
            }
        }
        At::Active => h.connect(&p, "c", 60),
        At::Asleep | At::Awake => {
            h.connect(&p, "c", 60);
            h.subscribe(&p, "pre/one", QoS::AtLeastOnce, 1);
            h.send(&p, Packet::Disconnect { duration: Some(60) });
            assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
            if at == At::Awake {
                h.downlink("pre/one", b"x", Qos::AtLeastOnce);
                h.send(
                    &p,
                    Packet::PingReq {
                        client_id: Some("c"),
                    },
                );
                assert!(matches!(
                    decode(&h.reply(&p)),
                    Packet::Publish { msg_id: 1, .. }
                ));
            }
        }
        At::Lost => {
            h.send(
                &p,
                Packet::Connect {
                    will: false,
                    clean_session: false,
                    duration: 10,
                    client_id: "c",
                },
            );
            assert_eq!(decode(&h.reply(&p)), connack(ReturnCode::Accepted));
            h.advance(Duration::from_secs(15));
            assert_eq!(h.core.stats().clients_lost, 1);
        }
    }
    h.events();
    h.transmits();
    h
}

/// Every packet type, as a client could send it from `peer(1)`.
fn every_packet() -> Vec<Packet<'static>> {
    let flags = Some(WillFlags {
        qos: QoS::AtMostOnce,
        retain: false,
    });
    let pre = TopicRef::Predefined(1);
    vec![
        Packet::Advertise {
            gw_id: 1,
            duration: 900,
        },
        Packet::SearchGw { radius: 0 },
        Packet::GwInfo {
            gw_id: 1,
            gw_addr: &[],
        },
        connect_packet("c", false),
        connack(ReturnCode::Accepted),
        Packet::WillTopicReq,
        Packet::WillTopic {
            will: flags,
            topic: "c/will2",
        },
        Packet::WillMsgReq,
        Packet::WillMsg { msg: b"bye" },
        Packet::Register {
            topic_id: 0,
            msg_id: 7,
            topic_name: "c/t",
        },
        Packet::RegAck {
            topic_id: 1,
            msg_id: 1,
            rc: ReturnCode::Accepted,
        },
        publish(QoS::MinusOne, pre, 0, b"m1"),
        publish(QoS::AtMostOnce, pre, 0, b"q0"),
        publish(QoS::AtLeastOnce, pre, 7, b"q1"),
        publish(QoS::ExactlyOnce, pre, 7, b"q2"),
        Packet::PubAck {
            topic_id: 1,
            msg_id: 1,
            rc: ReturnCode::Accepted,
        },
        Packet::PubRec { msg_id: 1 },
        Packet::PubRel { msg_id: 7 },
        Packet::PubComp { msg_id: 1 },
        Packet::Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 7,
            topic: SubscribeTopic::Name("c/sub"),
        },
        Packet::SubAck {
            qos: QoS::AtMostOnce,
            topic_id: 0,
            msg_id: 7,
            rc: ReturnCode::Accepted,
        },
        Packet::Unsubscribe {
            msg_id: 7,
            topic: SubscribeTopic::Name("pre/one"),
        },
        Packet::UnsubAck { msg_id: 7 },
        Packet::PingReq { client_id: None },
        Packet::PingReq {
            client_id: Some("c"),
        },
        Packet::PingResp,
        Packet::Disconnect { duration: None },
        Packet::Disconnect { duration: Some(30) },
        Packet::WillTopicUpd {
            will: flags,
            topic: "c/will3",
        },
        Packet::WillTopicResp {
            rc: ReturnCode::Accepted,
        },
        Packet::WillMsgUpd { msg: b"bye2" },
        Packet::WillMsgResp {
            rc: ReturnCode::Accepted,
        },
    ]
}

/// What a packet must lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Acted on: these replies (by name, in order) and this many upstream events.
    Acted(&'static [&'static str], usize),
    /// Not allowed in this state: answered with DISCONNECT ("CONNECT first", spec 6.12),
    /// nothing else changes.
    Refused,
    /// Not allowed, and no answer: nothing at all changes.
    Ignored,
}

use Outcome::{Acted, Ignored, Refused};

/// The table, written out: (state, packet) -> outcome.
fn expected(at: At, packet: &Packet<'_>) -> Outcome {
    let connected = matches!(at, At::Active);
    let publishes = matches!(at, At::Active | At::Asleep | At::Awake);
    match packet {
        // Only a gateway sends these.
        Packet::Advertise { .. }
        | Packet::GwInfo { .. }
        | Packet::ConnAck { .. }
        | Packet::WillTopicReq
        | Packet::WillMsgReq
        | Packet::SubAck { .. }
        | Packet::UnsubAck { .. }
        | Packet::PingResp
        | Packet::WillTopicResp { .. }
        | Packet::WillMsgResp { .. } => Ignored,
        // Allowed everywhere (no session needed, or it starts one).
        Packet::SearchGw { .. } => Acted(&["GWINFO"], 0),
        Packet::Publish {
            qos: QoS::MinusOne, ..
        } => Acted(&[], 1),
        Packet::Connect { .. } => match at {
            // CleanSession=1 replaces the session: its subscription goes upstream too.
            At::Asleep | At::Awake => Acted(&["CONNACK"], 1),
            _ => Acted(&["CONNACK"], 0),
        },
        Packet::Disconnect { duration } => match (at, duration) {
            (At::Asleep | At::Awake, Some(_)) => Acted(&["DISCONNECT"], 0),
            (At::Active, Some(_)) => Acted(&["DISCONNECT"], 0),
            // Ends the connection; the subscription of a CleanSession=1 session goes.
            (At::Asleep | At::Awake, None) => Acted(&["DISCONNECT"], 1),
            _ => Acted(&["DISCONNECT"], 0),
        },
        // The Will handshake, each in its own stage; a WILLTOPIC retransmitted after a lost
        // WILLMSGREQ is answered again.
        Packet::WillTopic { .. } => match at {
            At::WillTopic | At::WillMsg => Acted(&["WILLMSGREQ"], 0),
            _ => Ignored,
        },
        Packet::WillMsg { .. } => match at {
            At::WillMsg => Acted(&["CONNACK"], 0),
            _ => Ignored,
        },
        Packet::PingReq { client_id: None } => match at {
            At::Active | At::Asleep => Acted(&["PINGRESP"], 0),
            // Still delivering: the PINGRESP comes after the buffer.
            At::Awake => Acted(&["PINGRESP"], 0),
            _ => Refused,
        },
        Packet::PingReq { client_id: Some(_) } => match at {
            At::Active => Acted(&["PINGRESP"], 0),
            // Wakes: nothing buffered, so PINGRESP at once.
            At::Asleep => Acted(&["PINGRESP"], 0),
            // Awake already, its message still in flight: nothing new to send.
            At::Awake => Acted(&[], 0),
            _ => Refused,
        },
        // Answers to the gateway's downlink: only a connected or awake client has any.
        Packet::PubAck { .. } | Packet::PubRec { .. } | Packet::PubComp { .. } => match at {
            At::Active => Acted(&[], 0),
            At::Awake => match packet {
                // Acknowledges the buffered message: the buffer is empty, back to sleep.
                Packet::PubAck { .. } => Acted(&["PINGRESP"], 0),
                _ => Acted(&[], 0),
            },
            _ => Ignored,
        },
        Packet::RegAck { .. } => match at {
            At::Active | At::Awake => Acted(&[], 0),
            _ => Ignored,
        },
        // A sleeping sensor may wake, publish and sleep again: publishing, registering and
        // completing a QoS 2 exchange need a session that is connected, asleep or awake.
        Packet::PubRel { .. } if publishes => Acted(&["PUBCOMP"], 0),
        Packet::Publish { .. } if publishes => Acted(&[], 1),
        Packet::Register { .. } if publishes => Acted(&["REGACK"], 0),
        Packet::PubRel { .. } | Packet::Publish { .. } | Packet::Register { .. } => Refused,
        // Everything else needs an active connection.
        Packet::Subscribe { .. } if connected => Acted(&["SUBACK"], 1),
        Packet::Unsubscribe { .. } if connected => Acted(&["UNSUBACK"], 0),
        Packet::WillTopicUpd { .. } if connected => Acted(&["WILLTOPICRESP"], 0),
        Packet::WillMsgUpd { .. } if connected => Acted(&["WILLMSGRESP"], 0),
        Packet::Subscribe { .. }
        | Packet::Unsubscribe { .. }
        | Packet::WillTopicUpd { .. }
        | Packet::WillMsgUpd { .. } => Refused,
    }
}

/// What of the session a refused or ignored packet must leave unchanged.
fn fingerprint(h: &Harness) -> String {
    let session = h
        .core
        .by_client
        .get("c")
        .and_then(|&sref| h.core.session(sref));
    match session {
        None => "none".into(),
        Some(s) => format!(
            "{:?} peer={:?} topics={} subs={:?} will={:?} up={:?} qos2={:?} queue={} inflight={:?} seen={:?}",
            s.state,
            s.peer,
            s.topics.len(),
            s.subscriptions,
            s.will,
            s.inflight_up,
            s.qos2_received,
            s.queue.len(),
            s.inflight_down
                .as_ref()
                .map(|f| (f.msg_id, f.phase, f.retries)),
            s.last_seen,
        ),
    }
}

#[test]
fn every_packet_in_every_session_state_gets_the_table_outcome() {
    let p = peer(1);
    let mut failures = Vec::new();
    for at in STATES {
        for packet in every_packet() {
            let mut h = in_state(at);
            // Later than the setup, so a refreshed keep-alive shows in the fingerprint.
            h.now += Duration::from_millis(1);
            let before = fingerprint(&h);
            let (refused_before, datagrams_before) = {
                let s = h.core.stats();
                (s.out_of_state, s.datagrams)
            };
            h.send(&p, packet);
            let replies: Vec<&'static str> = h
                .transmits()
                .iter()
                .map(|(to, bytes)| {
                    assert_eq!(to, &p);
                    owned(bytes).name()
                })
                .collect();
            let events = h.events().len();
            let after = fingerprint(&h);
            let refused = h.core.stats().out_of_state - refused_before;
            assert_eq!(h.core.stats().datagrams, datagrams_before + 1);
            let want = expected(at, &packet);
            let ok = match want {
                Acted(r, e) => replies == r && events == e && refused == 0,
                Refused => {
                    replies == ["DISCONNECT"] && events == 0 && before == after && refused == 1
                }
                Ignored => replies.is_empty() && events == 0 && before == after && refused == 1,
            };
            if !ok {
                failures.push(format!(
                    "{at:?} x {}: want {want:?}, got replies {replies:?}, {events} events, \
                     counted {refused}, session {}",
                    packet.name(),
                    if before == after {
                        "unchanged"
                    } else {
                        "changed"
                    },
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_publish_during_the_will_handshake_is_not_forwarded() {
    let mut h = in_state(At::WillMsg);
    let p = peer(1);
    h.send(
        &p,
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 3, b"early"),
    );
    assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
    assert!(h.events().is_empty());
    // The handshake itself still completes.
    h.send(&p, Packet::WillMsg { msg: b"bye" });
    assert_eq!(decode(&h.reply(&p)), connack(ReturnCode::Accepted));
}

#[test]
fn a_lost_session_cannot_be_bound_by_pingreq_and_then_publish() {
    let mut h = in_state(At::Lost);
    let p = peer(1);
    h.send(
        &p,
        Packet::PingReq {
            client_id: Some("c"),
        },
    );
    assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
    h.send(
        &p,
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 3, b"x"),
    );
    assert_eq!(decode(&h.reply(&p)), Packet::Disconnect { duration: None });
    assert!(h.events().is_empty());
}

// ---------------------------------------------------------------------------------------------
// The bound on distinct upstream filters.

fn subscribes(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Subscribe { filter, .. } => Some(filter.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_subscribe_that_would_exceed_max_filters_gets_congestion() {
    let mut h = Harness::new(CoreConfig {
        max_filters: 2,
        ..config()
    });
    let (a, b) = (peer(1), peer(2));
    h.connect(&a, "a", 60);
    h.connect(&b, "b", 60);
    assert_eq!(
        h.subscribe(&a, "f/1", QoS::AtMostOnce, 1).1,
        ReturnCode::Accepted
    );
    assert_eq!(
        h.subscribe(&a, "f/+", QoS::AtMostOnce, 2).1,
        ReturnCode::Accepted
    );
    assert_eq!(subscribes(&h.events()), ["f/1", "f/+"]);
    // A third distinct filter: the upstreams would not hold it.
    assert_eq!(
        h.subscribe(&b, "f/3", QoS::AtMostOnce, 3).1,
        ReturnCode::Congestion
    );
    assert!(h.events().is_empty());
    // Filters already held upstream are shared freely, and a higher QoS is no new filter.
    assert_eq!(
        h.subscribe(&b, "f/1", QoS::AtLeastOnce, 4).1,
        ReturnCode::Accepted
    );
    assert_eq!(
        h.subscribe(&a, "f/+", QoS::AtLeastOnce, 5).1,
        ReturnCode::Accepted
    );
    // Room again once a filter's last subscriber leaves.
    h.send(
        &a,
        Packet::Unsubscribe {
            msg_id: 6,
            topic: SubscribeTopic::Name("f/+"),
        },
    );
    assert_eq!(decode(&h.reply(&a)), Packet::UnsubAck { msg_id: 6 });
    h.events();
    assert_eq!(
        h.subscribe(&b, "f/3", QoS::AtMostOnce, 7).1,
        ReturnCode::Accepted
    );
    assert_eq!(subscribes(&h.events()), ["f/3"]);
}

#[test]
fn restored_sessions_respect_max_filters() {
    // A gateway with room for three filters persists a session holding three.
    let mut h = Harness::new(config());
    let p = peer(1);
    h.send(
        &p,
        Packet::Connect {
            will: false,
            clean_session: false,
            duration: 60,
            client_id: "a",
        },
    );
    assert_eq!(decode(&h.reply(&p)), connack(ReturnCode::Accepted));
    for (i, f) in ["f/1", "f/2", "f/3"].into_iter().enumerate() {
        h.subscribe(&p, f, QoS::AtMostOnce, i as u16 + 1);
    }
    let mut changes = Vec::new();
    h.core.take_persist_changes(&mut changes);
    let Some(PersistChange::Upsert { bytes, .. }) = changes.pop() else {
        panic!("no record in {changes:?}");
    };
    // Restarted with room for two.
    let mut h = Harness::new(CoreConfig {
        max_filters: 2,
        ..config()
    });
    h.core.restore(h.now, &bytes).unwrap();
    assert_eq!(subscribes(&h.events()), ["f/1", "f/2"]);
    // The cut session is rewritten without the filter it lost.
    let mut changes = Vec::new();
    h.core.take_persist_changes(&mut changes);
    let Some(PersistChange::Upsert { bytes, .. }) = changes.pop() else {
        panic!("no record in {changes:?}");
    };
    let record = crate::mqttsn::persist::decode(&bytes).unwrap();
    let filters: Vec<&str> = record.subscriptions.iter().map(|s| &*s.filter).collect();
    assert_eq!(filters, ["f/1", "f/2"]);
}
