//! Persistence of sessions: dirty tracking, the changes for the store, and restoring a
//! session into a fresh core as a restarted gateway does.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::mqttsn::persist as record;

/// Every record and removal the core wants stored now.
fn changes(h: &mut Harness) -> Vec<PersistChange> {
    let mut out = Vec::new();
    h.core.take_persist_changes(&mut out);
    out
}

/// The bytes of the last upsert for `client_id` in `changes`.
fn record_of(changes: &[PersistChange], client_id: &str) -> Vec<u8> {
    changes
        .iter()
        .rev()
        .find_map(|c| match c {
            PersistChange::Upsert {
                client_id: id,
                bytes,
            } if &**id == client_id => Some(bytes.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no upsert for {client_id} in {changes:?}"))
}

fn removed(changes: &[PersistChange]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| match c {
            PersistChange::Remove { client_id } => Some(client_id.to_string()),
            PersistChange::Upsert { .. } => None,
        })
        .collect()
}

impl Harness {
    /// CONNECT with CleanSession=0; returns what follows the CONNACK (queued downlink).
    fn connect_persistent(&mut self, from: &Peer, client_id: &str) -> Vec<Vec<u8>> {
        self.send(
            from,
            Packet::Connect {
                will: false,
                clean_session: false,
                duration: 60,
                client_id,
            },
        );
        let mut sent = self.transmits().into_iter();
        let (to, connack) = sent.next().expect("CONNACK");
        assert_eq!(&to, from);
        assert_eq!(
            decode(&connack),
            Packet::ConnAck {
                rc: ReturnCode::Accepted
            }
        );
        sent.map(|(_, bytes)| bytes).collect()
    }

    fn sleep(&mut self, from: &Peer, secs: u16) {
        self.send(
            from,
            Packet::Disconnect {
                duration: Some(secs),
            },
        );
        assert_eq!(
            decode(&self.reply(from)),
            Packet::Disconnect { duration: None }
        );
    }

    /// A fresh core with `records` restored, its clock `later` after this one's.
    fn restarted(&self, config: CoreConfig, later: Duration, records: &[Vec<u8>]) -> Harness {
        let mut h = Harness::new(config);
        h.now = self.now + later;
        for r in records {
            h.core.restore(h.now, r).unwrap();
        }
        h
    }

    /// `bytes` must be a REGISTER of `name`: acknowledges it, returns the topic id.
    fn accept_register(&mut self, to: &Peer, bytes: &[u8], name: &str) -> u16 {
        let Packet::Register {
            topic_id,
            msg_id,
            topic_name,
        } = owned(bytes)
        else {
            panic!("expected REGISTER of {name}")
        };
        assert_eq!(topic_name, name);
        self.send(
            to,
            Packet::RegAck {
                topic_id,
                msg_id,
                rc: ReturnCode::Accepted,
            },
        );
        topic_id
    }

    /// The next datagram must be a REGISTER of `name`: see [`Harness::accept_register`].
    fn accept_register_next(&mut self, to: &Peer, name: &str) -> u16 {
        let bytes = self.reply(to);
        self.accept_register(to, &bytes, name)
    }

    /// Expects a PUBLISH, acknowledges it (QoS 1), returns (dup, topic, payload).
    fn accept_publish(&mut self, to: &Peer) -> (bool, TopicRef, Vec<u8>) {
        let Packet::Publish {
            dup,
            topic,
            msg_id,
            data,
            qos,
            ..
        } = owned(&self.reply(to))
        else {
            panic!("expected PUBLISH")
        };
        assert_eq!(qos, QoS::AtLeastOnce);
        let data = data.to_vec();
        self.send(
            to,
            Packet::PubAck {
                topic_id: topic_id_of(topic),
                msg_id,
                rc: ReturnCode::Accepted,
            },
        );
        (dup, topic, data)
    }
}

#[test]
fn restore_after_sleep_keeps_queued_messages_and_delivers_them_on_pingreq() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "sleepy", 60);
    h.subscribe(&p, "s/t", QoS::AtLeastOnce, 1);
    h.sleep(&p, 60);
    for payload in [&b"m1"[..], b"m2"] {
        let outcome = h.core.handle_downlink(
            h.now,
            "s/t",
            Bytes::from_static(payload),
            Qos::AtLeastOnce,
            false,
            None,
        );
        assert!(
            outcome.needs_durability(),
            "queued for a sleeper: {outcome:?}"
        );
    }
    let stored = record_of(&changes(&mut h), "sleepy");

    let mut g = h.restarted(config(), Duration::from_secs(5), &[stored]);
    assert_eq!(
        g.events(),
        vec![Event::Subscribe {
            filter: "s/t".into(),
            qos: Qos::AtLeastOnce
        }]
    );
    // The full sleep duration (plus tolerance) again, from the restore.
    assert_eq!(g.core.poll_timeout(), Some(g.now + Duration::from_secs(90)));
    assert!(g.transmits().is_empty(), "asleep: nothing is sent");

    // The client wakes from a new address; its registration is unknown after the restart.
    let q = peer(2);
    g.send(
        &q,
        Packet::PingReq {
            client_id: Some("sleepy"),
        },
    );
    let id = g.accept_register_next(&q, "s/t");
    assert_eq!(
        g.accept_publish(&q),
        (false, TopicRef::Normal(id), b"m1".to_vec())
    );
    assert_eq!(
        g.accept_publish(&q),
        (false, TopicRef::Normal(id), b"m2".to_vec())
    );
    assert_eq!(decode(&g.reply(&q)), Packet::PingResp);
    // Delivered: the stored record no longer holds them.
    let again = record::decode(&record_of(&changes(&mut g), "sleepy")).unwrap();
    assert!(again.queue.is_empty(), "{again:?}");
}

#[test]
fn clean_session_0_subscriptions_registrations_and_expiry_are_restored() {
    let mut h = Harness::new(config());
    let p = peer(1);
    let _ = h.connect_persistent(&p, "pers");
    h.subscribe(&p, "a/#", QoS::AtLeastOnce, 1);
    h.subscribe(&p, "b", QoS::ExactlyOnce, 2);
    let (up, _) = h.register(&p, "up/t", 3);
    h.send(&p, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    let stored = record_of(&changes(&mut h), "pers");

    let mut g = h.restarted(config(), Duration::from_secs(1), &[stored]);
    let mut events = g.events();
    events.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        events,
        vec![
            Event::Subscribe {
                filter: "a/#".into(),
                qos: Qos::AtLeastOnce
            },
            Event::Subscribe {
                filter: "b".into(),
                qos: Qos::ExactlyOnce
            },
        ]
    );
    // The session expiry starts again at the restore.
    assert_eq!(
        g.core.poll_timeout(),
        Some(g.now + g.core.config.session_expiry)
    );
    // A QoS 1 message while disconnected is kept, and needs the disk before the broker's ack.
    let outcome = g.core.handle_downlink(
        g.now,
        "a/1",
        Bytes::from_static(b"kept"),
        Qos::AtLeastOnce,
        false,
        None,
    );
    assert!(outcome.needs_durability());

    // Reconnect without subscribing again.
    let q = peer(2);
    let queued = g.connect_persistent(&q, "pers");
    assert_eq!(queued.len(), 1, "REGISTER first");
    let id = g.accept_register(&q, &queued[0], "a/1");
    assert_eq!(
        g.accept_publish(&q),
        (false, TopicRef::Normal(id), b"kept".to_vec())
    );
    // The registration made before the restart still resolves uplink.
    g.send(&q, publish(QoS::AtMostOnce, TopicRef::Normal(up), 0, b"u"));
    let (msg, _) = single_publish(g.events());
    assert_eq!(msg.topic, "up/t");
}

#[test]
fn the_message_in_flight_is_restored_first_and_resent_with_dup() {
    let mut h = Harness::new(config());
    let p = peer(1);
    let _ = h.connect_persistent(&p, "fl");
    let (id, _) = h.subscribe(&p, "f/t", QoS::AtLeastOnce, 1);
    h.downlink("f/t", b"first", Qos::AtLeastOnce);
    h.downlink("f/t", b"second", Qos::AtLeastOnce);
    let Packet::Publish {
        dup: false, data, ..
    } = owned(&h.reply(&p))
    else {
        panic!("expected the first PUBLISH")
    };
    assert_eq!(data, b"first");
    // The gateway stops here, the PUBACK never came.
    let stored = record_of(&changes(&mut h), "fl");

    let mut g = h.restarted(config(), Duration::from_secs(1), &[stored]);
    let q = peer(2);
    let queued = g.connect_persistent(&q, "fl");
    assert_eq!(queued.len(), 1, "REGISTER first");
    let again = g.accept_register(&q, &queued[0], "f/t");
    assert_eq!(again, id, "the registration keeps its id");
    assert_eq!(
        g.accept_publish(&q),
        (true, TopicRef::Normal(id), b"first".to_vec())
    );
    assert_eq!(
        g.accept_publish(&q),
        (false, TopicRef::Normal(id), b"second".to_vec())
    );
}

#[test]
fn a_remove_is_emitted_when_a_session_ends() {
    let mut h = Harness::new(config());
    let (a, b, c) = (peer(1), peer(2), peer(3));
    let _ = h.connect_persistent(&a, "expires");
    h.send(&a, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    h.connect(&b, "sleeper", 60);
    h.sleep(&b, 10);
    h.connect(&c, "replaced", 60);
    h.sleep(&c, 100);
    let _ = h.transmits();
    let first = changes(&mut h);
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(removed(&first).is_empty());

    // A clean CONNECT replaces the sleeper's session with a clean, awake one.
    h.connect(&c, "replaced", 60);
    assert_eq!(removed(&changes(&mut h)), vec!["replaced"]);
    // The sleeper oversleeps (10 s + 50%): lost and gone.
    h.advance(Duration::from_secs(15));
    assert_eq!(removed(&changes(&mut h)), vec!["sleeper"]);
    // The persistent session expires.
    h.advance(h.core.config.session_expiry);
    assert_eq!(removed(&changes(&mut h)), vec!["expires"]);
    assert!(changes(&mut h).is_empty());
}

#[test]
fn a_sleeper_that_reconnects_clean_and_awake_is_removed_not_rewritten() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect(&p, "s", 60);
    h.sleep(&p, 60);
    assert_eq!(changes(&mut h).len(), 1);
    // CONNECT with CleanSession=0 keeps the session, now awake and persistent.
    let _ = h.connect_persistent(&p, "s");
    let c = changes(&mut h);
    assert!(matches!(&c[..], [PersistChange::Upsert { .. }]), "{c:?}");
    // A clean one makes it a new, clean, active session: nothing to keep.
    h.connect(&p, "s", 60);
    assert_eq!(removed(&changes(&mut h)), vec!["s"]);
}

#[test]
fn only_persistent_sessions_produce_changes_each_once_per_take() {
    let mut h = Harness::new(config());
    for port in 0..20 {
        let p = peer(port);
        h.connect(&p, &format!("clean{port}"), 60);
        h.subscribe(&p, "all/t", QoS::AtLeastOnce, 1);
    }
    let p = peer(100);
    let _ = h.connect_persistent(&p, "keeper");
    h.subscribe(&p, "all/t", QoS::AtLeastOnce, 1);
    let _ = h.transmits();
    assert_eq!(changes(&mut h).len(), 1, "only the persistent session");
    assert!(changes(&mut h).is_empty(), "nothing changed since");

    // Many changes to one session in one round: one record.
    h.send(&p, Packet::Disconnect { duration: None });
    for _ in 0..5 {
        let outcome = h.core.handle_downlink(
            h.now,
            "all/t",
            Bytes::from_static(b"x"),
            Qos::AtLeastOnce,
            false,
            None,
        );
        assert_eq!(outcome.queued, 21);
        assert_eq!(outcome.persisted, 1);
    }
    let c = changes(&mut h);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(
        record::decode(&record_of(&c, "keeper"))
            .unwrap()
            .queue
            .len(),
        5
    );

    // QoS 0 is never persisted: no change, no waiting for the disk.
    let outcome = h.core.handle_downlink(
        h.now,
        "all/t",
        Bytes::from_static(b"zero"),
        Qos::AtMostOnce,
        false,
        None,
    );
    assert!(!outcome.needs_durability());
    assert!(changes(&mut h).is_empty());
}

#[test]
fn restored_subscriptions_are_reference_counted_with_live_ones() {
    let mut h = Harness::new(config());
    let (a, b) = (peer(1), peer(2));
    let _ = h.connect_persistent(&a, "a");
    h.subscribe(&a, "shared/t", QoS::AtMostOnce, 1);
    let _ = h.connect_persistent(&b, "b");
    h.subscribe(&b, "shared/t", QoS::AtLeastOnce, 1);
    h.send(&a, Packet::Disconnect { duration: None });
    h.send(&b, Packet::Disconnect { duration: None });
    let _ = h.transmits();
    let c = changes(&mut h);
    let records = [record_of(&c, "a"), record_of(&c, "b")];

    let mut g = h.restarted(config(), Duration::from_secs(1), &records);
    let events = g.events();
    assert_eq!(
        events.last(),
        Some(&Event::Subscribe {
            filter: "shared/t".into(),
            qos: Qos::AtLeastOnce
        }),
        "{events:?}"
    );
    // One of them leaves: the filter stays; the other too: it goes upstream.
    g.connect(&peer(3), "a", 60);
    assert!(g.events().is_empty());
    g.connect(&peer(4), "b", 60);
    assert_eq!(
        g.events(),
        vec![Event::Unsubscribe {
            filter: "shared/t".into()
        }]
    );
}

#[test]
fn a_restored_sleeper_that_never_wakes_publishes_its_will() {
    let mut h = Harness::new(config());
    let p = peer(1);
    h.connect_with_will(&p, "w", "w/gone", b"bye");
    h.sleep(&p, 20);
    let stored = record_of(&changes(&mut h), "w");

    let mut g = h.restarted(config(), Duration::from_secs(1), &[stored]);
    g.advance(Duration::from_secs(29));
    assert!(g.events().is_empty());
    g.advance(Duration::from_secs(1));
    let (msg, _) = single_publish(g.events());
    assert_eq!(
        (msg.topic.as_str(), &msg.payload[..]),
        ("w/gone", &b"bye"[..])
    );
    assert_eq!(removed(&changes(&mut g)), vec!["w"]);
}

#[test]
fn restore_refuses_garbage_duplicates_and_a_full_table_without_changing_anything() {
    let mut h = Harness::new(config());
    let p = peer(1);
    let _ = h.connect_persistent(&p, "dup");
    h.send(&p, Packet::Disconnect { duration: None });
    let stored = record_of(&changes(&mut h), "dup");

    let mut g = Harness::new(CoreConfig {
        max_clients: 1,
        ..config()
    });
    assert!(matches!(
        g.core.restore(g.now, b"\x01garbage"),
        Err(RestoreError::Decode(_))
    ));
    g.core.restore(g.now, &stored).unwrap();
    assert_eq!(
        g.core.restore(g.now, &stored),
        Err(RestoreError::Duplicate("dup".into()))
    );
    let mut other = record::decode(&stored).unwrap();
    other.client_id = "other".into();
    let mut bytes = Vec::new();
    record::encode(&other, &mut bytes).unwrap();
    assert_eq!(g.core.restore(g.now, &bytes), Err(RestoreError::TableFull));
    assert_eq!(g.core.session_count(), 1);
    assert!(
        changes(&mut g).is_empty(),
        "a restored session is stored already"
    );
}

#[test]
fn a_restored_queue_longer_than_the_limit_is_cut_and_rewritten() {
    let mut h = Harness::new(config());
    let p = peer(1);
    let _ = h.connect_persistent(&p, "long");
    h.subscribe(&p, "l/t", QoS::AtLeastOnce, 1);
    h.send(&p, Packet::Disconnect { duration: None });
    for payload in [&b"1"[..], b"2", b"3"] {
        let _ = h.core.handle_downlink(
            h.now,
            "l/t",
            Bytes::from_static(payload),
            Qos::AtLeastOnce,
            false,
            None,
        );
    }
    let stored = record_of(&changes(&mut h), "long");
    let smaller = CoreConfig {
        max_queued_per_client: 2,
        ..config()
    };
    let mut g = h.restarted(smaller, Duration::from_secs(1), &[stored]);
    let rewritten = record::decode(&record_of(&changes(&mut g), "long")).unwrap();
    let kept: Vec<&[u8]> = rewritten.queue.iter().map(|m| &m.payload[..]).collect();
    assert_eq!(kept, vec![&b"2"[..], b"3"], "the oldest went (drop_oldest)");
    assert_eq!(g.core.stats().downlink_dropped, 1);
}

// ---------------------------------------------------------------------------------------------
// Model test: whatever the clients do, the stored records are exactly the persistent sessions'
// current records (no change is missed), and every one of them restores.

#[derive(Debug, Clone)]
enum Op {
    Connect(u16, bool),
    Subscribe(u16, usize, u8),
    Unsubscribe(u16, usize),
    Register(u16, usize),
    Sleep(u16, u16),
    Wake(u16),
    Disconnect(u16),
    Downlink(usize, u8),
    WillTopic(u16, bool),
    WillMsg(u16),
    Answer,
    Advance(u16),
    Take,
}

const TOPICS: [&str; 3] = ["m/a", "m/b", "m/#"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u16..3, any::<bool>()).prop_map(|(c, clean)| Op::Connect(c, clean)),
        2 => (0u16..3, 0..TOPICS.len(), 0u8..3).prop_map(|(c, t, q)| Op::Subscribe(c, t, q)),
        1 => (0u16..3, 0..TOPICS.len()).prop_map(|(c, t)| Op::Unsubscribe(c, t)),
        1 => (0u16..3, 0..2usize).prop_map(|(c, t)| Op::Register(c, t)),
        2 => (0u16..3, 1u16..30).prop_map(|(c, s)| Op::Sleep(c, s)),
        2 => (0u16..3).prop_map(Op::Wake),
        1 => (0u16..3).prop_map(Op::Disconnect),
        4 => (0..2usize, 0u8..3).prop_map(|(t, q)| Op::Downlink(t, q)),
        1 => (0u16..3, any::<bool>()).prop_map(|(c, empty)| Op::WillTopic(c, empty)),
        1 => (0u16..3).prop_map(Op::WillMsg),
        4 => Just(Op::Answer),
        1 => (1u16..60).prop_map(Op::Advance),
        3 => Just(Op::Take),
    ]
}

impl Harness {
    /// Answers everything the gateway sent as a well-behaved client would, until it is quiet.
    fn answer_all(&mut self) {
        for _ in 0..50 {
            let sent = self.transmits();
            if sent.is_empty() {
                return;
            }
            for (to, bytes) in sent {
                match decode(&bytes) {
                    Packet::Register {
                        topic_id, msg_id, ..
                    } => self.send(
                        &to,
                        Packet::RegAck {
                            topic_id,
                            msg_id,
                            rc: ReturnCode::Accepted,
                        },
                    ),
                    Packet::Publish {
                        qos: QoS::AtLeastOnce,
                        topic,
                        msg_id,
                        ..
                    } => self.send(
                        &to,
                        Packet::PubAck {
                            topic_id: topic_id_of(topic),
                            msg_id,
                            rc: ReturnCode::Accepted,
                        },
                    ),
                    Packet::Publish {
                        qos: QoS::ExactlyOnce,
                        msg_id,
                        ..
                    } => self.send(&to, Packet::PubRec { msg_id }),
                    Packet::PubRel { msg_id } => self.send(&to, Packet::PubComp { msg_id }),
                    _ => {}
                }
            }
        }
    }
}

/// A record with what is not tracked as a change normalized: DUP (set when a message in
/// flight is stored, not when it is sent) and the order of the refused set.
fn normalized(bytes: &[u8]) -> SessionRecord {
    let mut r = record::decode(bytes).unwrap();
    for m in &mut r.queue {
        m.dup = false;
    }
    r.refused.sort();
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn stored_records_always_equal_the_persistent_sessions(ops in proptest::collection::vec(op(), 1..80)) {
        let mut h = Harness::new(config());
        let mut store: HashMap<String, Vec<u8>> = HashMap::new();
        let qos = |q: u8| [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(q)];
        let apply = |h: &mut Harness, store: &mut HashMap<String, Vec<u8>>| {
            for c in changes(h) {
                match c {
                    PersistChange::Upsert { client_id, bytes } => {
                        store.insert(client_id.to_string(), bytes);
                    }
                    PersistChange::Remove { client_id } => {
                        store.remove(&*client_id);
                    }
                }
            }
        };
        for op in ops {
            match op {
                Op::Connect(c, clean) => h.send(&peer(c), Packet::Connect {
                    will: false,
                    clean_session: clean,
                    duration: 600,
                    client_id: &format!("c{c}"),
                }),
                Op::Subscribe(c, t, q) => h.send(&peer(c), Packet::Subscribe {
                    dup: false,
                    qos: qos(q),
                    msg_id: 1,
                    topic: SubscribeTopic::Name(TOPICS[t]),
                }),
                Op::Unsubscribe(c, t) => h.send(&peer(c), Packet::Unsubscribe {
                    msg_id: 2,
                    topic: SubscribeTopic::Name(TOPICS[t]),
                }),
                Op::Register(c, t) => h.send(&peer(c), Packet::Register {
                    topic_id: 0,
                    msg_id: 3,
                    topic_name: ["up/x", "up/y"][t],
                }),
                Op::Sleep(c, s) => h.send(&peer(c), Packet::Disconnect { duration: Some(s) }),
                Op::Wake(c) => h.send(&peer(c), Packet::PingReq {
                    client_id: Some(&format!("c{c}")),
                }),
                Op::Disconnect(c) => h.send(&peer(c), Packet::Disconnect { duration: None }),
                Op::Downlink(t, q) => {
                    let level = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce];
                    let _ = h.core.handle_downlink(
                        h.now,
                        TOPICS[t],
                        Bytes::from_static(b"d"),
                        level[usize::from(q)],
                        false,
                        None,
                    );
                }
                Op::WillTopic(c, empty) => h.send(&peer(c), Packet::WillTopicUpd {
                    will: (!empty).then_some(WillFlags {
                        qos: QoS::AtLeastOnce,
                        retain: false,
                    }),
                    topic: if empty { "" } else { "will/t" },
                }),
                Op::WillMsg(c) => h.send(&peer(c), Packet::WillMsgUpd { msg: b"gone" }),
                Op::Answer => h.answer_all(),
                Op::Advance(s) => h.advance(Duration::from_secs(u64::from(s))),
                Op::Take => apply(&mut h, &mut store),
            }
            let _ = h.events();
        }
        apply(&mut h, &mut store);

        let mut expected: HashMap<String, SessionRecord> = HashMap::new();
        for sref in h.core.by_client.values() {
            let s = h.core.session(*sref).unwrap();
            if s.is_persistent() {
                let mut bytes = Vec::new();
                record::encode(&s.record(), &mut bytes).unwrap();
                expected.insert(s.client_id.to_string(), normalized(&bytes));
            }
        }
        let stored: HashMap<String, SessionRecord> =
            store.iter().map(|(id, b)| (id.clone(), normalized(b))).collect();
        prop_assert_eq!(&stored, &expected);

        // And a restarted core takes every record back.
        let mut g = Harness::new(config());
        for bytes in store.values() {
            prop_assert_eq!(g.core.restore(g.now, bytes), Ok(()));
        }
        prop_assert_eq!(g.core.session_count(), store.len());
    }
}
