//! Live reconfiguration ([`Core::reconfigure`]): sessions and what they hold survive, new
//! predefined topics work at once, a removed one gets rc 0x02, lowered limits apply to what
//! comes next, timers take a new duration when next armed.

use super::*;

/// A QoS 1 PUBLISH from `from`; returns the topic it went upstream with, or the PUBACK's rc
/// when it was refused at once.
fn publish_qos1(
    h: &mut Harness,
    from: &Peer,
    topic: TopicRef,
    msg_id: u16,
) -> Result<String, ReturnCode> {
    h.send(from, publish(QoS::AtLeastOnce, topic, msg_id, b"v"));
    let events = h.events();
    if events.is_empty() {
        return match decode(&h.reply(from)) {
            Packet::PubAck { rc, msg_id: m, .. } => {
                assert_eq!(m, msg_id);
                Err(rc)
            }
            other => panic!("expected PUBACK, got {other:?}"),
        };
    }
    let (message, token) = single_publish(events);
    h.core
        .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Accepted);
    match decode(&h.reply(from)) {
        Packet::PubAck { rc, .. } => assert_eq!(rc, ReturnCode::Accepted),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    Ok(message.topic)
}

/// `config()` with predefined id 1 removed, id 2 (alice's) pointing elsewhere and id 3 new
/// for every client.
fn new_predefined() -> CoreConfig {
    CoreConfig {
        predefined: vec![
            PredefinedTopic {
                id: 2,
                topic: "pre/two-b".into(),
                clients: ClientSet::Only(vec!["alice".into()]),
            },
            PredefinedTopic {
                id: 3,
                topic: "pre/three".into(),
                clients: ClientSet::All,
            },
        ],
        ..config()
    }
}

#[test]
fn predefined_topics_change_live_and_sessions_keep_everything() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    let (registered, rc) = h.register(&alice, "a/reg", 1);
    assert_eq!(rc, ReturnCode::Accepted);
    // Alice subscribes through predefined id 1, bob by name; bob gets a QoS 1 message that
    // stays in flight (unacknowledged) across the reconfigure.
    h.send(
        &alice,
        Packet::Subscribe {
            dup: false,
            qos: QoS::AtLeastOnce,
            msg_id: 2,
            topic: SubscribeTopic::Predefined(1),
        },
    );
    assert!(matches!(
        decode(&h.reply(&alice)),
        Packet::SubAck {
            rc: ReturnCode::Accepted,
            ..
        }
    ));
    h.subscribe(&bob, "pre/one", QoS::AtLeastOnce, 1);
    let _ = h.events();
    h.downlink("pre/one", b"before", Qos::AtLeastOnce);
    // Both know id 1 as predefined: the message goes with it to each, unacknowledged.
    let mut in_flight = HashMap::new();
    for (to, bytes) in h.transmits() {
        let Packet::Publish {
            topic: TopicRef::Predefined(1),
            msg_id,
            ..
        } = owned(&bytes)
        else {
            panic!("expected a PUBLISH with predefined id 1 to {to}")
        };
        in_flight.insert(to, msg_id);
    }
    assert_eq!(in_flight.len(), 2);
    h.core.check_invariants();

    let notes = h.core.reconfigure(h.now, new_predefined());
    h.core.check_invariants();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("1 added, 1 changed, 1 removed"),
        "{notes:?}"
    );
    assert_eq!(h.core.session_count(), 2);
    assert!(
        h.transmits().is_empty(),
        "nothing sent by the reconfigure itself"
    );

    // New and changed ids work at once; the removed one gets rc 0x02 (invalid topic id).
    assert_eq!(
        publish_qos1(&mut h, &alice, TopicRef::Predefined(3), 10),
        Ok("pre/three".into())
    );
    assert_eq!(
        publish_qos1(&mut h, &bob, TopicRef::Predefined(3), 10),
        Ok("pre/three".into())
    );
    assert_eq!(
        publish_qos1(&mut h, &alice, TopicRef::Predefined(2), 11),
        Ok("pre/two-b".into())
    );
    assert_eq!(
        publish_qos1(&mut h, &alice, TopicRef::Predefined(1), 12),
        Err(ReturnCode::InvalidTopicId)
    );
    // QoS -1 from a sender without a session: the new global id works, the removed one is
    // dropped.
    let stranger = peer(99);
    h.send(
        &stranger,
        publish(QoS::MinusOne, TopicRef::Predefined(3), 0, b"m"),
    );
    let (message, token) = single_publish(h.events());
    assert_eq!((message.topic.as_str(), token), ("pre/three", None));
    h.send(
        &stranger,
        publish(QoS::MinusOne, TopicRef::Predefined(1), 0, b"m"),
    );
    assert!(h.events().is_empty());
    assert!(h.transmits().is_empty());
    // Registrations survive.
    assert_eq!(
        publish_qos1(&mut h, &alice, TopicRef::Normal(registered), 13),
        Ok("a/reg".into())
    );
    // The exchanges in flight go on as they started: alice's completes, bob's is
    // retransmitted as it was built (predefined id 1, which bob's configuration still has).
    h.send(
        &alice,
        Packet::PubAck {
            topic_id: 1,
            msg_id: in_flight[&alice],
            rc: ReturnCode::Accepted,
        },
    );
    assert!(h.transmits().is_empty());
    h.advance(Duration::from_secs(10));
    assert_eq!(
        owned(&h.reply(&bob)),
        Packet::Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicRef::Predefined(1),
            msg_id: in_flight[&bob],
            data: b"before",
        }
    );
    // The subscription made through id 1 stays, by topic name: the next message for it is
    // registered first (the gateway no longer knows id 1), then published.
    h.downlink("pre/one", b"after", Qos::AtMostOnce);
    let to_alice: Vec<_> = h
        .transmits()
        .into_iter()
        .filter(|(p, _)| *p == alice)
        .collect();
    let Packet::Register { topic_name, .. } = owned(&to_alice[0].1) else {
        panic!("expected REGISTER, got {to_alice:?}")
    };
    assert_eq!(topic_name, "pre/one");
    h.core.check_invariants();
}

#[test]
fn lowered_limits_keep_what_is_there_and_refuse_what_comes_next() {
    let mut h = Harness::new(config());
    let peers: Vec<Peer> = (1..=3).map(peer).collect();
    for (i, p) in peers.iter().enumerate() {
        h.connect(p, &format!("c{i}"), 60);
    }
    let p = &peers[0];
    for (n, name) in ["t/1", "t/2", "t/3"].into_iter().enumerate() {
        assert_eq!(h.register(p, name, n as u16 + 1).1, ReturnCode::Accepted);
    }
    // Subscriptions to registered names: no more topic ids.
    assert_eq!(
        h.subscribe(p, "t/1", QoS::AtMostOnce, 10).1,
        ReturnCode::Accepted
    );
    assert_eq!(
        h.subscribe(p, "t/3", QoS::AtMostOnce, 11).1,
        ReturnCode::Accepted
    );
    let _ = h.events();

    let lowered = CoreConfig {
        max_clients: 2,
        max_topics_per_client: 2,
        max_subscriptions_per_client: 1,
        ..config()
    };
    let notes = h.core.reconfigure(h.now, lowered);
    h.core.check_invariants();
    let keys: Vec<&str> = notes
        .iter()
        .map(|n| n.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "max_clients",
            "max_topics_per_client",
            "max_subscriptions_per_client"
        ],
        "{notes:?}"
    );
    // Nothing was dropped.
    assert_eq!(h.core.session_count(), 3);
    assert!(h.events().is_empty(), "no subscription released");

    // A new ClientId is refused with congestion; a known one may still connect.
    let newcomer = peer(9);
    h.send(
        &newcomer,
        Packet::Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: "new",
        },
    );
    assert_eq!(
        decode(&h.reply(&newcomer)),
        Packet::ConnAck {
            rc: ReturnCode::Congestion
        }
    );
    h.connect(&peers[2], "c2", 60);
    assert_eq!(h.core.session_count(), 3);

    // Registrations: known names keep their ids, a new one is refused.
    assert_eq!(h.register(p, "t/2", 20).1, ReturnCode::Accepted);
    assert_eq!(h.register(p, "t/4", 21).1, ReturnCode::Congestion);
    // Subscriptions: both kept (each still delivers), a third refused.
    assert_eq!(
        h.subscribe(p, "t/2", QoS::AtMostOnce, 22).1,
        ReturnCode::Congestion
    );
    for topic in ["t/1", "t/3"] {
        h.downlink(topic, b"x", Qos::AtMostOnce);
        assert!(
            matches!(owned(&h.reply(p)), Packet::Publish { data, .. } if data == b"x"),
            "{topic}"
        );
    }
    h.core.check_invariants();

    // Raised again: what was refused is taken.
    h.core.reconfigure(h.now, config());
    h.core.check_invariants();
    assert_eq!(h.register(p, "t/4", 23).1, ReturnCode::Accepted);
    h.connect(&newcomer, "new", 60);
    assert_eq!(h.core.session_count(), 4);
}

#[test]
fn a_new_retry_interval_applies_from_the_next_arming() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "a", 0);
    h.subscribe(&p, "pre/one", QoS::AtLeastOnce, 1);
    let _ = h.events();
    h.downlink("pre/one", b"m", Qos::AtLeastOnce);
    assert!(matches!(
        owned(&h.reply(&p)),
        Packet::Publish { dup: false, .. }
    ));
    // Sent with Tretry = 10 s; lowered to 2 s now.
    h.core.reconfigure(
        h.now,
        CoreConfig {
            retry_interval: Duration::from_secs(2),
            ..config()
        },
    );
    h.core.check_invariants();
    h.advance(Duration::from_secs(3));
    assert!(
        h.transmits().is_empty(),
        "the armed retransmission keeps its 10 s"
    );
    h.advance(Duration::from_secs(7));
    assert!(matches!(
        owned(&h.reply(&p)),
        Packet::Publish { dup: true, .. }
    ));
    // The next one is armed with the new interval.
    h.advance(Duration::from_secs(2));
    assert!(matches!(
        owned(&h.reply(&p)),
        Packet::Publish { dup: true, .. }
    ));
    h.core.check_invariants();
}

#[test]
fn a_changed_gw_id_goes_out_with_the_next_gwinfo() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.core.reconfigure(
        h.now,
        CoreConfig {
            gw_id: 42,
            ..config()
        },
    );
    h.send(&p, Packet::SearchGw { radius: 0 });
    assert_eq!(
        decode(&h.reply(&p)),
        Packet::GwInfo {
            gw_id: 42,
            gw_addr: &[]
        }
    );
}

#[test]
fn max_filters_is_capped_at_what_the_router_was_sized_for() {
    let mut h = Harness::new(CoreConfig {
        max_filters: 2,
        ..config()
    });
    let p = peer(1);
    h.connect(&p, "a", 60);
    let notes = h.core.reconfigure(
        h.now,
        CoreConfig {
            max_filters: 3,
            ..config()
        },
    );
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("max_filters 3 is above the 2"),
        "{notes:?}"
    );
    for (n, filter) in ["f/1/#", "f/2/#"].into_iter().enumerate() {
        assert_eq!(
            h.subscribe(&p, filter, QoS::AtMostOnce, n as u16 + 1).1,
            ReturnCode::Accepted
        );
    }
    assert_eq!(
        h.subscribe(&p, "f/3/#", QoS::AtMostOnce, 3).1,
        ReturnCode::Congestion
    );
    h.core.check_invariants();
}
