//! Local delivery: a message one sensor publishes reaches the core's other matching sessions
//! (and the publisher itself) without an upstream, once each, only once it is accepted.

use super::*;

/// Subscribes `from` to `topic` at QoS 2 and takes the SUBACK.
fn subscribe_to(h: &mut Harness, from: &Peer, topic: SubscribeTopic<'_>, msg_id: u16) {
    h.send(
        from,
        Packet::Subscribe {
            dup: false,
            qos: QoS::ExactlyOnce,
            msg_id,
            topic,
        },
    );
    match decode(&h.reply(from)) {
        Packet::SubAck { rc, .. } => assert_eq!(rc, ReturnCode::Accepted),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// A PUBLISH the core sent to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Delivered {
    to: Peer,
    qos: QoS,
    retain: bool,
    topic: TopicRef,
    data: Vec<u8>,
}

/// Takes every datagram the core wants to send and completes each delivery as the receiving
/// client would (REGACK to a REGISTER; PUBACK, or PUBREC then PUBCOMP), until nothing is
/// left; returns the PUBLISHes in order, and the other packets with their peers.
fn deliveries(h: &mut Harness) -> (Vec<Delivered>, Vec<(Peer, Packet<'static>)>) {
    let mut delivered = Vec::new();
    let mut other = Vec::new();
    for _ in 0..1000 {
        let out = h.transmits();
        if out.is_empty() {
            return (delivered, other);
        }
        for (to, bytes) in out {
            match owned(&bytes) {
                Packet::Publish {
                    qos,
                    retain,
                    topic,
                    msg_id,
                    data,
                    ..
                } => {
                    delivered.push(Delivered {
                        to: to.clone(),
                        qos,
                        retain,
                        topic,
                        data: data.to_vec(),
                    });
                    match qos {
                        QoS::AtLeastOnce => h.send(
                            &to,
                            Packet::PubAck {
                                topic_id: topic_id_of(topic),
                                msg_id,
                                rc: ReturnCode::Accepted,
                            },
                        ),
                        QoS::ExactlyOnce => h.send(&to, Packet::PubRec { msg_id }),
                        QoS::AtMostOnce | QoS::MinusOne => {}
                    }
                }
                Packet::PubRel { msg_id } => h.send(&to, Packet::PubComp { msg_id }),
                Packet::Register {
                    topic_id, msg_id, ..
                } => h.send(
                    &to,
                    Packet::RegAck {
                        topic_id,
                        msg_id,
                        rc: ReturnCode::Accepted,
                    },
                ),
                packet => other.push((to, packet)),
            }
        }
    }
    panic!("deliveries did not settle");
}

/// The only upstream publish of `events`, with its token.
fn token_of(events: Vec<Event>) -> Option<u64> {
    single_publish(events).1
}

#[test]
fn every_qos_reaches_the_other_sensor_once_by_name_wildcard_short_and_predefined() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    // Two of bob's filters match room/1/temp: he still gets each message once.
    let (bob_id, rc) = h.subscribe(&bob, "room/1/temp", QoS::ExactlyOnce, 1);
    assert_eq!(rc, ReturnCode::Accepted);
    assert_eq!(
        h.subscribe(&bob, "room/+/temp", QoS::ExactlyOnce, 2),
        (0, ReturnCode::Accepted)
    );
    subscribe_to(&mut h, &bob, SubscribeTopic::Short(*b"ab"), 3);
    subscribe_to(&mut h, &bob, SubscribeTopic::Predefined(1), 4);
    let (alice_id, _) = h.register(&alice, "room/1/temp", 1);
    let _ = h.events();

    let topics = [
        (TopicRef::Normal(alice_id), TopicRef::Normal(bob_id)),
        (TopicRef::Short(*b"ab"), TopicRef::Short(*b"ab")),
        (TopicRef::Predefined(1), TopicRef::Predefined(1)),
    ];
    let mut msg_id = 10;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        for (sent_as, received_as) in topics {
            msg_id += 1;
            let data = format!("{qos:?} {msg_id}");
            h.send(&alice, publish(qos, sent_as, msg_id, data.as_bytes()));
            if let Some(token) = token_of(h.events()) {
                h.core
                    .handle_publish_result(h.now, token, PublishOutcome::Accepted);
            }
            if qos == QoS::ExactlyOnce {
                h.send(&alice, Packet::PubRel { msg_id });
            }
            let (delivered, _) = deliveries(&mut h);
            assert_eq!(
                delivered,
                vec![Delivered {
                    to: bob.clone(),
                    qos,
                    retain: false,
                    topic: received_as,
                    data: data.into_bytes(),
                }],
                "{qos:?} on {sent_as:?}"
            );
        }
    }
    // QoS -1 from a connected sender (its topics resolve through its session): QoS 0 here.
    for topic in [TopicRef::Short(*b"ab"), TopicRef::Predefined(1)] {
        h.send(&alice, publish(QoS::MinusOne, topic, 0, b"m1"));
        let _ = h.events();
        let (delivered, _) = deliveries(&mut h);
        assert_eq!(
            delivered,
            vec![Delivered {
                to: bob.clone(),
                qos: QoS::AtMostOnce,
                retain: false,
                topic,
                data: b"m1".to_vec(),
            }]
        );
    }
    assert_eq!(h.core.stats().local_in, 11);
}

#[test]
fn qos_minus_one_without_a_session_is_delivered_locally() {
    let mut h = Harness::new(config());
    let bob = peer(2);
    h.connect(&bob, "bob", 60);
    subscribe_to(&mut h, &bob, SubscribeTopic::Predefined(1), 1);
    h.send(
        &peer(9),
        publish(QoS::MinusOne, TopicRef::Predefined(1), 0, b"x"),
    );
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].to, bob);
    assert_eq!(delivered[0].qos, QoS::AtMostOnce);
}

#[test]
fn the_delivered_qos_is_the_minimum_of_subscription_and_message() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    h.subscribe(&bob, "t/#", QoS::AtLeastOnce, 1);
    let _ = h.events();
    h.send(
        &alice,
        publish(QoS::ExactlyOnce, TopicRef::Short(*b"t1"), 5, b"x"),
    );
    let token = token_of(h.events()).unwrap();
    h.core
        .handle_publish_result(h.now, token, PublishOutcome::Accepted);
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 0, "t1 is not under t/");
    h.send(&alice, Packet::PubRel { msg_id: 5 });
    let _ = h.transmits();
    let (id, _) = h.register(&alice, "t/x", 2);
    h.send(
        &alice,
        publish(QoS::ExactlyOnce, TopicRef::Normal(id), 6, b"y"),
    );
    let token = token_of(h.events()).unwrap();
    h.core
        .handle_publish_result(h.now, token, PublishOutcome::Accepted);
    let (delivered, other) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].qos, QoS::AtLeastOnce);
    assert!(other.contains(&(alice.clone(), Packet::PubRec { msg_id: 6 })));
}

#[test]
fn a_sensor_receives_its_own_publish() {
    let mut h = Harness::new(config());
    let alice = peer(1);
    h.connect(&alice, "alice", 60);
    let (id, _) = h.subscribe(&alice, "room/temp", QoS::AtLeastOnce, 1);
    let _ = h.events();
    h.send(
        &alice,
        publish(QoS::AtLeastOnce, TopicRef::Normal(id), 7, b"21"),
    );
    let token = token_of(h.events()).unwrap();
    assert!(h.transmits().is_empty(), "nothing before the verdict");
    h.core
        .handle_publish_result(h.now, token, PublishOutcome::Accepted);
    let out: Vec<Packet<'static>> = h.transmits().iter().map(|(_, b)| owned(b)).collect();
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(
        out[0],
        Packet::PubAck {
            topic_id: id,
            msg_id: 7,
            rc: ReturnCode::Accepted
        },
        "the publisher's acknowledgement comes first"
    );
    assert!(matches!(
        out[1],
        Packet::Publish {
            qos: QoS::AtLeastOnce,
            topic: TopicRef::Normal(t),
            data: b"21",
            ..
        } if t == id
    ));
}

#[test]
fn a_congestion_refused_qos1_publish_is_delivered_only_when_the_retry_is_accepted() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    h.subscribe(&bob, "room/#", QoS::AtLeastOnce, 1);
    let (id, _) = h.register(&alice, "room/1", 1);
    let _ = h.events();
    h.send(
        &alice,
        publish(QoS::AtLeastOnce, TopicRef::Normal(id), 8, b"x"),
    );
    let token = token_of(h.events()).unwrap();
    h.core
        .handle_publish_result(h.now, token, PublishOutcome::Congestion);
    let (delivered, other) = deliveries(&mut h);
    assert!(delivered.is_empty(), "refused: not delivered");
    assert_eq!(
        other,
        vec![(
            alice.clone(),
            Packet::PubAck {
                topic_id: id,
                msg_id: 8,
                rc: ReturnCode::Congestion
            }
        )]
    );
    // The sensor retries; this time the spool takes it.
    h.send(
        &alice,
        publish(QoS::AtLeastOnce, TopicRef::Normal(id), 8, b"x"),
    );
    let token = token_of(h.events()).unwrap();
    h.core
        .handle_publish_result(h.now, token, PublishOutcome::Accepted);
    let (delivered, _) = deliveries(&mut h);
    let to_bob: Vec<_> = delivered.iter().filter(|d| d.to == bob).collect();
    assert_eq!(to_bob.len(), 1, "{delivered:?}");
    assert_eq!(to_bob[0].data, b"x");
}

#[test]
fn a_retried_qos2_publish_is_delivered_once() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    h.subscribe(&bob, "room/#", QoS::ExactlyOnce, 1);
    let (id, _) = h.register(&alice, "room/1", 1);
    let _ = h.events();
    let again = |h: &mut Harness| {
        h.send(
            &alice,
            Packet::Publish {
                dup: true,
                qos: QoS::ExactlyOnce,
                retain: false,
                topic: TopicRef::Normal(id),
                msg_id: 9,
                data: b"q2",
            },
        );
    };
    h.send(
        &alice,
        publish(QoS::ExactlyOnce, TopicRef::Normal(id), 9, b"q2"),
    );
    let token = token_of(h.events()).unwrap();
    // Retransmitted before the verdict: not forwarded again.
    again(&mut h);
    assert!(h.events().is_empty());
    h.core
        .handle_publish_result(h.now, token, PublishOutcome::Accepted);
    // PUBREC lost: retransmitted after it, before PUBREL: answered, not forwarded again.
    again(&mut h);
    assert!(h.events().is_empty());
    h.send(&alice, Packet::PubRel { msg_id: 9 });
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0].to, bob);
    assert_eq!(delivered[0].qos, QoS::ExactlyOnce);
}

#[test]
fn an_accepted_publish_is_delivered_even_if_its_sender_left_meanwhile() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    h.subscribe(&bob, "room/#", QoS::AtLeastOnce, 1);
    let (id, _) = h.register(&alice, "room/1", 1);
    let _ = h.events();
    h.send(
        &alice,
        publish(QoS::AtLeastOnce, TopicRef::Normal(id), 3, b"x"),
    );
    let token = token_of(h.events()).unwrap();
    h.send(&alice, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    // The publish was taken upstream before the verdict arrives: it is durable either way.
    h.core
        .handle_publish_result(h.now, token, PublishOutcome::Accepted);
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].to, bob);
}

#[test]
fn a_will_reaches_local_subscribers_once_the_client_is_lost() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect_with_will(&alice, "alice", "lamp/alive", b"gone");
    h.connect(&bob, "bob", 600);
    h.subscribe(&bob, "lamp/+", QoS::AtLeastOnce, 1);
    let _ = h.events();
    // alice's keep-alive is 10 s: lost after 15 s of silence.
    h.advance(Duration::from_secs(15));
    assert_eq!(h.core.stats().wills_published, 1);
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(
        delivered,
        vec![Delivered {
            to: bob.clone(),
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: delivered.first().map_or(TopicRef::Normal(0), |d| d.topic),
            data: b"gone".to_vec(),
        }]
    );
}

#[test]
fn a_sleeping_subscriber_gets_a_local_publish_when_it_wakes() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    h.subscribe(&bob, "ab", QoS::AtLeastOnce, 1);
    h.send(&bob, Packet::Disconnect { duration: Some(60) });
    let _ = h.transmits();
    h.send(
        &alice,
        publish(QoS::AtMostOnce, TopicRef::Short(*b"ab"), 0, b"z"),
    );
    let _ = h.events();
    assert!(h.transmits().is_empty(), "buffered while bob sleeps");
    h.send(
        &bob,
        Packet::PingReq {
            client_id: Some("bob"),
        },
    );
    let (delivered, other) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].data, b"z");
    assert_eq!(other, vec![(bob.clone(), Packet::PingResp)]);
}

#[test]
fn a_retained_local_publish_goes_live_with_its_flag_and_into_the_cache() {
    let mut h = Harness::new(config());
    let (alice, bob, carol) = (peer(1), peer(2), peer(3));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    h.connect(&carol, "carol", 60);
    h.subscribe(&carol, "cfg/x", QoS::AtMostOnce, 1);
    let (id, _) = h.register(&alice, "cfg/x", 1);
    let _ = h.events();
    h.send(
        &alice,
        Packet::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: TopicRef::Normal(id),
            msg_id: 0,
            data: b"on",
        },
    );
    let _ = h.events();
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].to, carol);
    assert!(
        delivered[0].retain,
        "retain as published, like an MQTT 5 downlink"
    );
    // The filter is subscribed upstream already, so a new subscriber is served from the cache.
    h.send(
        &bob,
        Packet::Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 1,
            topic: SubscribeTopic::Name("cfg/x"),
        },
    );
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0].to, bob);
    assert!(delivered[0].retain);
    assert_eq!(delivered[0].data, b"on");
}

#[test]
fn a_disconnected_persistent_subscriber_gets_a_local_qos1_publish_on_reconnect() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    let persistent = |h: &mut Harness| {
        h.send(
            &bob,
            Packet::Connect {
                will: false,
                clean_session: false,
                duration: 60,
                client_id: "bob",
            },
        );
    };
    persistent(&mut h);
    let _ = h.transmits();
    h.subscribe(&bob, "ab", QoS::AtLeastOnce, 1);
    let _ = h.events();
    h.send(&bob, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    h.send(
        &alice,
        publish(QoS::AtLeastOnce, TopicRef::Short(*b"ab"), 4, b"kept"),
    );
    let token = token_of(h.events()).unwrap();
    h.core
        .handle_publish_result(h.now, token, PublishOutcome::Accepted);
    let _ = h.transmits();
    // Part of bob's stored record, like a QoS 1 downlink.
    let mut changes = Vec::new();
    h.core.take_persist_changes(&mut changes);
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, PersistChange::Upsert { client_id, .. } if &**client_id == "bob")),
        "{changes:?}"
    );
    persistent(&mut h);
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].to, bob);
    assert_eq!(delivered[0].data, b"kept");
}

/// Alice publishes `payload` retained at QoS 0 to `topic` (registered as `id`).
fn publish_retained(h: &mut Harness, alice: &Peer, id: u16, payload: &'static [u8]) {
    h.send(
        alice,
        Packet::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: TopicRef::Normal(id),
            msg_id: 0,
            data: payload,
        },
    );
    let _ = h.events();
}

#[test]
fn a_local_retained_message_reaches_a_filter_new_upstream_once_though_the_broker_lacks_it() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    let (id, _) = h.register(&alice, "lamp/state", 1);
    // Nobody subscribes yet: the broker is down, or the spool has not sent it there yet.
    publish_retained(&mut h, &alice, id, b"on");
    let (delivered, _) = deliveries(&mut h);
    assert!(delivered.is_empty(), "{delivered:?}");
    // A filter new upstream: the broker would send its retained messages, but it may not have
    // this one yet, so the cache serves it.
    h.send(
        &bob,
        Packet::Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 1,
            topic: SubscribeTopic::Name("lamp/#"),
        },
    );
    let _ = h.events();
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(
        (delivered[0].to.clone(), delivered[0].retain),
        (bob.clone(), true)
    );
    assert_eq!(delivered[0].data, b"on");
    // The broker's copy, once it has it, goes to no one: bob has it already.
    let now = h.now;
    let _ = h.core.handle_downlink(
        now,
        "lamp/state",
        Bytes::from_static(b"on"),
        Qos::AtMostOnce,
        true,
        None,
    );
    let (delivered, _) = deliveries(&mut h);
    assert!(delivered.is_empty(), "{delivered:?}");
    assert_eq!(h.core.stats().downlink_own_retained, 1);
    // Only that one copy: the next retained message from the broker is delivered.
    let _ = h.core.handle_downlink(
        now,
        "lamp/state",
        Bytes::from_static(b"on"),
        Qos::AtMostOnce,
        true,
        None,
    );
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
}

#[test]
fn a_different_retained_message_from_the_broker_is_delivered_and_replaces_the_local_one() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    h.connect(&alice, "alice", 60);
    h.connect(&bob, "bob", 60);
    let (id, _) = h.register(&alice, "lamp/state", 1);
    publish_retained(&mut h, &alice, id, b"on");
    h.send(
        &bob,
        Packet::Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 1,
            topic: SubscribeTopic::Name("lamp/state"),
        },
    );
    let _ = h.events();
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1, "from the cache: {delivered:?}");
    let now = h.now;
    let _ = h.core.handle_downlink(
        now,
        "lamp/state",
        Bytes::from_static(b"off"),
        Qos::AtMostOnce,
        true,
        None,
    );
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0].data, b"off");
    assert_eq!(h.core.stats().downlink_own_retained, 0);
}

#[test]
fn a_qos2_publish_resent_after_a_reconnect_is_not_taken_as_new() {
    let mut h = Harness::new(config());
    let (alice, bob) = (peer(1), peer(2));
    let connect_persistent = |h: &mut Harness| {
        h.send(
            &alice,
            Packet::Connect {
                will: false,
                clean_session: false,
                duration: 60,
                client_id: "alice",
            },
        );
        assert_eq!(
            decode(&h.reply(&alice)),
            Packet::ConnAck {
                rc: ReturnCode::Accepted
            }
        );
    };
    connect_persistent(&mut h);
    h.connect(&bob, "bob", 60);
    h.subscribe(&bob, "room/#", QoS::ExactlyOnce, 1);
    let (id, _) = h.register(&alice, "room/1", 1);
    let _ = h.events();
    h.send(
        &alice,
        publish(QoS::ExactlyOnce, TopicRef::Normal(id), 7, b"x"),
    );
    let token = token_of(h.events()).unwrap();
    // The client goes before the spool's verdict, which then accepts the message.
    h.send(&alice, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    h.core
        .handle_publish_result(h.now, token, PublishOutcome::Accepted);
    let (delivered, _) = deliveries(&mut h);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    // It never got PUBREC, so it sends the PUBLISH again (DUP) after reconnecting.
    connect_persistent(&mut h);
    h.send(
        &alice,
        Packet::Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: TopicRef::Normal(id),
            msg_id: 7,
            data: b"x",
        },
    );
    let events = h.events();
    assert!(
        !events.iter().any(|e| matches!(e, Event::Publish { .. })),
        "not spooled a second time: {events:?}"
    );
    let (delivered, other) = deliveries(&mut h);
    assert!(delivered.is_empty(), "not delivered twice: {delivered:?}");
    assert!(
        other
            .iter()
            .any(|(to, p)| *to == alice && matches!(p, Packet::PubRec { msg_id: 7 })),
        "{other:?}"
    );
}
