//! What the core reports to the admin listener: sessions by state, refusals and downlink
//! drops by reason, acknowledgements, and the pages of `/clients`.

use crate::observe::model::{
    ClientQuery, DownlinkDropReason, RefusalReason, SessionState, SubscriptionInfo,
};

use super::*;

/// Sends `packet` from `from` and returns every datagram the core answers with, decoded.
fn exchange(h: &mut Harness, from: &Peer, packet: Packet<'_>) -> Vec<Packet<'static>> {
    h.send(from, packet);
    h.transmits()
        .into_iter()
        .map(|(_, bytes)| owned(&bytes))
        .collect()
}

fn connect_as(h: &mut Harness, from: &Peer, client_id: &str, clean_session: bool, secs: u16) {
    let replies = exchange(
        h,
        from,
        Packet::Connect {
            will: false,
            clean_session,
            duration: secs,
            client_id,
        },
    );
    assert_eq!(
        replies.first(),
        Some(&Packet::ConnAck {
            rc: ReturnCode::Accepted
        })
    );
}

fn go_to_sleep(h: &mut Harness, from: &Peer, secs: u16) {
    let replies = exchange(
        h,
        from,
        Packet::Disconnect {
            duration: Some(secs),
        },
    );
    assert_eq!(replies, vec![Packet::Disconnect { duration: None }]);
}

fn refusals(h: &Harness) -> [u64; RefusalReason::COUNT] {
    h.core.report().counters.refusals
}

fn refused(h: &Harness, reason: RefusalReason) -> u64 {
    refusals(h)[reason as usize]
}

fn dropped(h: &Harness, reason: DownlinkDropReason) -> u64 {
    h.core.report().counters.downlink_dropped[reason as usize]
}

fn query(
    prefix: Option<&str>,
    state: Option<SessionState>,
    after: Option<&str>,
    limit: usize,
) -> ClientQuery {
    ClientQuery {
        prefix: prefix.map(str::to_owned),
        state,
        after: after.map(str::to_owned),
        limit,
    }
}

fn ids(h: &Harness, q: &ClientQuery) -> (Vec<String>, bool) {
    let page = h.core.clients(h.now, q);
    (
        page.clients.into_iter().map(|c| c.client_id).collect(),
        page.more,
    )
}

#[test]
fn the_report_counts_sessions_in_every_state() {
    let mut h = Harness::new(config());
    // Lost: a persistent session whose keep-alive (10 s, supervised for 15 s) expired.
    let lost = peer(1);
    connect_as(&mut h, &lost, "lost", false, 10);
    h.advance(Duration::from_secs(15));
    assert_eq!(h.core.stats().clients_lost, 1);

    let active = peer(2);
    connect_as(&mut h, &active, "active", true, 60);
    let asleep = peer(3);
    connect_as(&mut h, &asleep, "asleep", true, 60);
    go_to_sleep(&mut h, &asleep, 100);
    // Awake: woken with a buffered QoS 1 message still unacknowledged.
    let awake = peer(4);
    connect_as(&mut h, &awake, "awake", true, 60);
    h.subscribe(&awake, "awake/in", QoS::AtLeastOnce, 1);
    go_to_sleep(&mut h, &awake, 100);
    h.downlink("awake/in", b"wake", Qos::AtLeastOnce);
    let replies = exchange(
        &mut h,
        &awake,
        Packet::PingReq {
            client_id: Some("awake"),
        },
    );
    assert!(!replies.contains(&Packet::PingResp), "{replies:?}");
    let disconnected = peer(5);
    connect_as(&mut h, &disconnected, "disconnected", false, 60);
    exchange(&mut h, &disconnected, Packet::Disconnect { duration: None });
    // Connecting: the Will handshake has only begun.
    let connecting = peer(6);
    let replies = exchange(
        &mut h,
        &connecting,
        Packet::Connect {
            will: true,
            clean_session: true,
            duration: 60,
            client_id: "connecting",
        },
    );
    assert_eq!(replies, vec![Packet::WillTopicReq]);

    let report = h.core.report();
    assert_eq!(report.protocol, PROTOCOL);
    assert_eq!(report.protocol, "mqtt-sn");
    for state in SessionState::ALL {
        assert_eq!(report.sessions.get(state), 1, "{state}");
    }
    assert_eq!(report.sessions.total(), h.core.session_count() as u64);

    // The lost client comes back: active; then it leaves with DISCONNECT: disconnected.
    connect_as(&mut h, &lost, "lost", false, 60);
    let report = h.core.report();
    assert_eq!(report.sessions.get(SessionState::Lost), 0);
    assert_eq!(report.sessions.get(SessionState::Active), 2);
    exchange(&mut h, &lost, Packet::Disconnect { duration: None });
    let report = h.core.report();
    assert_eq!(report.sessions.get(SessionState::Active), 1);
    assert_eq!(report.sessions.get(SessionState::Disconnected), 2);
}

#[test]
fn a_restored_session_without_a_connection_reports_disconnected() {
    let mut h = Harness::new(config());
    let p = peer(1);
    connect_as(&mut h, &p, "lost", false, 10);
    h.advance(Duration::from_secs(15));
    assert_eq!(h.core.report().sessions.get(SessionState::Lost), 1);
    let mut changes = Vec::new();
    h.core.take_persist_changes(&mut changes);
    let Some(PersistChange::Upsert { bytes, .. }) = changes.pop() else {
        panic!("expected the lost session's record, got {changes:?}");
    };
    let mut restarted = Harness::new(config());
    restarted.core.restore(restarted.now, &bytes).unwrap();
    let report = restarted.core.report();
    assert_eq!(report.sessions.get(SessionState::Disconnected), 1);
    assert_eq!(report.sessions.total(), 1);
}

#[test]
fn refusals_and_acknowledgements_are_counted_by_reason() {
    let mut h = Harness::new(config());
    let p = peer(1000);
    connect_as(&mut h, &p, "alice", true, 60);
    assert_eq!(refusals(&h), [0; RefusalReason::COUNT]);

    // Congestion: one publish beyond `max_inflight_per_client` (2), and a spool refusal.
    for msg_id in 1..=3 {
        h.send(
            &p,
            publish(QoS::AtLeastOnce, TopicRef::Predefined(1), msg_id, b"x"),
        );
    }
    let tokens: Vec<u64> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Publish { token, .. } => token,
            _ => None,
        })
        .collect();
    assert_eq!(tokens.len(), 2);
    assert_eq!(refused(&h, RefusalReason::Congestion), 1);
    h.core
        .handle_publish_result(h.now, tokens[0], PublishOutcome::Congestion);
    assert_eq!(refused(&h, RefusalReason::Congestion), 2);
    // Not allowed: no route takes the topic.
    h.core
        .handle_publish_result(h.now, tokens[1], PublishOutcome::NoRoute);
    assert_eq!(refused(&h, RefusalReason::NotAllowed), 1);
    // Not allowed: a QoS -1 publish to a topic it cannot name.
    h.send(
        &peer(2000),
        publish(QoS::MinusOne, TopicRef::Normal(7), 0, b"x"),
    );
    assert_eq!(refused(&h, RefusalReason::NotAllowed), 2);
    // Invalid topic: an unknown topic id, and a REGISTER of a filter.
    h.send(&p, publish(QoS::AtLeastOnce, TopicRef::Normal(99), 4, b"x"));
    h.transmits();
    assert_eq!(h.register(&p, "a/#", 5).1, ReturnCode::InvalidTopicId);
    assert_eq!(refused(&h, RefusalReason::InvalidTopic), 2);
    // Too large: an oversize datagram, and a ClientId longer than the limit.
    h.core.handle_datagram(h.now, p.clone(), &[0u8; 1025]);
    h.send(
        &peer(3000),
        Packet::Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: "a-client-id-longer-than-23",
        },
    );
    assert_eq!(refused(&h, RefusalReason::TooLarge), 2);
    // Malformed.
    h.core
        .handle_datagram(h.now, p.clone(), &[0x03, 0xFF, 0x00]);
    assert_eq!(refusals(&h), [2, 2, 2, 2, 1, 0]);
    assert_eq!(h.core.report().counters.acks, 0, "nothing accepted yet");

    // Acknowledgements: PUBACK accepted for QoS 1 and PUBREC for QoS 2, after the verdict.
    h.transmits();
    for (qos, msg_id) in [(QoS::AtLeastOnce, 6), (QoS::ExactlyOnce, 7)] {
        h.send(&p, publish(qos, TopicRef::Predefined(1), msg_id, b"x"));
        let (_, token) = single_publish(h.events());
        assert_eq!(h.core.report().counters.acks, u64::from(msg_id) - 6);
        h.core
            .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Accepted);
    }
    let report = h.core.report();
    assert_eq!(report.counters.acks, 2);
    assert_eq!(refusals(&h), [2, 2, 2, 2, 1, 0], "no more refusals");
    let stats = h.core.stats();
    assert_eq!(report.counters.messages_in, stats.publishes);
    assert_eq!(report.counters.messages_in, [0, 0, 3, 1]);
    assert_eq!(report.counters.packets_in, stats.datagrams);
}

#[test]
fn refused_subscriptions_and_will_updates_are_counted() {
    let mut h = Harness::new(CoreConfig {
        max_subscriptions_per_client: 1,
        ..config()
    });
    let p = peer(1);
    connect_as(&mut h, &p, "alice", true, 60);
    assert_eq!(
        h.subscribe(&p, "a/+/#/b", QoS::AtMostOnce, 1).1,
        ReturnCode::InvalidTopicId
    );
    assert_eq!(
        h.subscribe(&p, "a/1", QoS::AtMostOnce, 2).1,
        ReturnCode::Accepted
    );
    assert_eq!(
        h.subscribe(&p, "a/2", QoS::AtMostOnce, 3).1,
        ReturnCode::Congestion
    );
    // WILLMSGUPD without a Will: not supported.
    let replies = exchange(&mut h, &p, Packet::WillMsgUpd { msg: b"bye" });
    assert_eq!(
        replies,
        vec![Packet::WillMsgResp {
            rc: ReturnCode::NotSupported
        }]
    );
    assert_eq!(refusals(&h), [1, 1, 1, 0, 0, 0]);
}

#[test]
fn downlink_drops_are_counted_by_reason() {
    let mut h = Harness::new(CoreConfig {
        max_buffered_per_sleeping_client: 2,
        queue_full: QueueFull::DropNew,
        ..config()
    });
    // Queue full: three messages for a sleeper that buffers two.
    let sleeper = peer(1);
    connect_as(&mut h, &sleeper, "sleeper", true, 60);
    h.subscribe(&sleeper, "s/in", QoS::AtLeastOnce, 1);
    go_to_sleep(&mut h, &sleeper, 1000);
    for _ in 0..3 {
        h.downlink("s/in", b"x", Qos::AtLeastOnce);
    }
    assert_eq!(dropped(&h, DownlinkDropReason::QueueFull), 1);

    // Too large: longer than `max_packet_size` (1024) allows.
    let p = peer(2);
    connect_as(&mut h, &p, "alice", true, 0);
    h.subscribe(&p, "a/in", QoS::AtLeastOnce, 1);
    h.downlink("a/in", &[0; 1020], Qos::AtMostOnce);
    assert_eq!(dropped(&h, DownlinkDropReason::TooLarge), 1);
    assert!(h.transmits().is_empty());

    // Rejected: the client answers the PUBLISH with PUBACK rc 0x03.
    h.downlink("a/in", b"no", Qos::AtLeastOnce);
    let (topic_id, msg_id) = match exchange_first_publish(&mut h, &p) {
        Packet::Publish { topic, msg_id, .. } => (topic_id_of(topic), msg_id),
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    h.send(
        &p,
        Packet::PubAck {
            topic_id,
            msg_id,
            rc: ReturnCode::NotSupported,
        },
    );
    assert_eq!(dropped(&h, DownlinkDropReason::Rejected), 1);

    // Expired: retransmissions exhausted, the CleanSession=1 session ends with one message
    // in flight and one queued.
    h.downlink("a/in", b"1", Qos::AtLeastOnce);
    h.downlink("a/in", b"2", Qos::AtLeastOnce);
    for _ in 0..=config().max_retries {
        h.advance(config().retry_interval);
    }
    assert_eq!(h.core.stats().clients_lost, 1);
    assert_eq!(dropped(&h, DownlinkDropReason::Expired), 2);

    let report = h.core.report();
    assert_eq!(report.counters.downlink_dropped, [1, 1, 1, 2]);
    assert_eq!(report.counters.downlink_retransmitted, 3);
    assert_eq!(
        h.core.stats().downlink_dropped,
        report.counters.downlink_dropped.iter().sum::<u64>()
    );
}

#[test]
fn qos0_downlink_for_a_lost_persistent_session_expires() {
    let mut h = Harness::new(config());
    let p = peer(1);
    connect_as(&mut h, &p, "p", false, 10);
    h.subscribe(&p, "p/in", QoS::AtLeastOnce, 1);
    // Stalled behind an unacknowledged QoS 1 message: QoS 0 waits in the queue.
    h.downlink("p/in", b"1", Qos::AtLeastOnce);
    h.downlink("p/in", b"0", Qos::AtMostOnce);
    h.advance(Duration::from_secs(15));
    assert_eq!(h.core.report().sessions.get(SessionState::Lost), 1);
    // The QoS 1 message is kept for the session's return; the QoS 0 one is not.
    assert_eq!(dropped(&h, DownlinkDropReason::Expired), 1);
    // And QoS 0 for it meanwhile goes nowhere.
    h.downlink("p/in", b"0", Qos::AtMostOnce);
    assert_eq!(dropped(&h, DownlinkDropReason::Expired), 2);
    let page = h.core.clients(h.now, &query(None, None, None, 10));
    assert_eq!(page.clients[0].queued_downlink, 1);
    assert_eq!(page.clients[0].address, None);
}

fn exchange_first_publish(h: &mut Harness, to: &Peer) -> Packet<'static> {
    loop {
        let out = h.transmits();
        let (peer_to, bytes) = out.first().expect("a datagram for the client");
        assert_eq!(peer_to, to);
        match owned(bytes) {
            Packet::Register {
                topic_id, msg_id, ..
            } => h.send(
                to,
                Packet::RegAck {
                    topic_id,
                    msg_id,
                    rc: ReturnCode::Accepted,
                },
            ),
            other => return other,
        }
    }
}

#[test]
fn clients_are_paged_by_client_id_and_filtered_by_prefix_and_state() {
    let mut h = Harness::new(config());
    // Connected out of order: the pages are ordered by ClientId all the same.
    for (port, id) in [
        (5, "s-05"),
        (1, "s-01"),
        (6, "t-01"),
        (3, "s-03"),
        (2, "s-02"),
        (4, "s-04"),
    ] {
        connect_as(&mut h, &peer(port), id, true, 60);
    }
    go_to_sleep(&mut h, &peer(3), 300);

    let q = query(Some("s-"), None, None, 2);
    assert_eq!(ids(&h, &q), (vec!["s-01".into(), "s-02".into()], true));
    let q = query(Some("s-"), None, Some("s-02"), 2);
    assert_eq!(ids(&h, &q), (vec!["s-03".into(), "s-04".into()], true));
    let q = query(Some("s-"), None, Some("s-04"), 2);
    assert_eq!(ids(&h, &q), (vec!["s-05".into()], false));
    let q = query(Some("s-"), None, Some("s-05"), 2);
    assert_eq!(ids(&h, &q), (vec![], false));
    // Exactly a page: nothing more.
    let q = query(None, None, Some("s-04"), 2);
    assert_eq!(ids(&h, &q), (vec!["s-05".into(), "t-01".into()], false));
    // A limit of 0 lists nothing but tells whether there is something.
    assert_eq!(ids(&h, &query(None, None, None, 0)), (vec![], true));
    assert_eq!(ids(&h, &query(Some("x"), None, None, 0)), (vec![], false));
    // By state.
    let q = query(None, Some(SessionState::Asleep), None, 10);
    assert_eq!(ids(&h, &q), (vec!["s-03".into()], false));
    let q = query(Some("s-"), Some(SessionState::Active), Some("s-01"), 10);
    assert_eq!(
        ids(&h, &q),
        (vec!["s-02".into(), "s-04".into(), "s-05".into()], false)
    );
    assert_eq!(
        ids(&h, &query(None, Some(SessionState::Lost), None, 10)),
        (vec![], false)
    );
}

#[test]
fn a_client_shows_its_address_keep_alive_last_packet_subscriptions_and_queue() {
    let mut h = Harness::new(config());
    let p = peer(4242);
    connect_as(&mut h, &p, "sensor-17", true, 60);
    h.subscribe(&p, "cmd/17/#", QoS::AtLeastOnce, 1);
    h.subscribe(&p, "cfg/17", QoS::AtMostOnce, 2);
    // One QoS 1 message in flight (REGISTER sent, unanswered), one waiting behind it.
    h.downlink("cmd/17/a", b"1", Qos::AtLeastOnce);
    h.downlink("cmd/17/b", b"2", Qos::AtLeastOnce);
    h.now += Duration::from_millis(1500);

    let page = h
        .core
        .clients(h.now, &query(Some("sensor-17"), None, None, 10));
    assert!(!page.more);
    let [client] = &page.clients[..] else {
        panic!("expected one client, got {page:?}");
    };
    assert_eq!(client.client_id, "sensor-17");
    assert_eq!(client.protocol, "mqtt-sn");
    assert_eq!(client.address.as_deref(), Some("127.0.0.1:4242"));
    assert_eq!(client.state, SessionState::Active);
    assert_eq!(client.keep_alive_secs, 60);
    assert_eq!(client.last_seen_ms_ago, 1500);
    assert_eq!(
        client.subscriptions,
        vec![
            SubscriptionInfo {
                filter: "cmd/17/#".into(),
                qos: 1
            },
            SubscriptionInfo {
                filter: "cfg/17".into(),
                qos: 0
            },
        ]
    );
    assert_eq!(client.queued_downlink, 2);

    // Asleep: the sleep duration stands for the keep-alive; a clock behind the last packet
    // says 0, never a wrap.
    h.transmits();
    go_to_sleep(&mut h, &p, 900);
    let earlier = h.now - Duration::from_secs(1);
    let page = h.core.clients(earlier, &query(None, None, None, 10));
    let client = &page.clients[0];
    assert_eq!(client.state, SessionState::Asleep);
    assert_eq!(client.keep_alive_secs, 900);
    assert_eq!(client.last_seen_ms_ago, 0);
}
