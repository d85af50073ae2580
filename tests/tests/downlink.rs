//! Downlink delivery, raw UDP: retransmission with DUP after `retry_interval` up to
//! `max_retries` and then the client is lost (its Will published), PUBACK rc 0x02 making the
//! gateway REGISTER again and resend, the QoS 2 exchange (PUBLISH → PUBREC → PUBREL →
//! PUBCOMP, with PUBREL retransmitted), one QoS 1/2 message in flight per client, and the
//! bounded per-client queue (`max_queued_per_client`, `queue_full`).
//!
//! Timer assertions use generous bounds; messages are injected with paho-mqtt.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, Packet, Qos, SubTopic};
use sensorgate_tests::{
    DELIVERY_TIMEOUT, Marker, REPLY_TIMEOUT, Rig, SnClient, UpMsg, await_live, publish_upstream,
};

/// Tretry in these tests.
const RETRY: Duration = Duration::from_secs(1);

fn rig_with(extra: &str) -> Rig {
    let extra = extra.to_owned();
    Rig::start_with(move |c| {
        c.mqttsn(&extra);
        Ok(())
    })
    .unwrap()
}

/// A client connected as `id`, subscribed QoS `qos` to the concrete `topic` (so downlink
/// comes without REGISTER), with the upstream subscription live. Returns the topic id.
fn subscribed(rig: &Rig, id: &str, qos: Qos, topic: &str) -> (SnClient, u16) {
    let mut c = rig.connected(id).unwrap();
    let topic_id = c.subscribe_ok(qos, SubTopic::Name(topic)).unwrap();
    assert_ne!(topic_id, 0);
    await_live(&mut c, rig.broker.port(), topic).unwrap();
    (c, topic_id)
}

/// The next packet must be a PUBLISH; returns (flags, topic id, msg id, data).
fn publish(c: &SnClient, timeout: Duration) -> (u8, u16, u16, Vec<u8>) {
    match c.recv(timeout).unwrap() {
        Some(Packet::Publish {
            flags,
            topic_id,
            msg_id,
            data,
        }) => (flags, topic_id, msg_id, data),
        other => panic!("expected PUBLISH within {timeout:?}, got {other:?}"),
    }
}

#[test]
fn unacknowledged_publish_is_retransmitted_with_dup_then_the_client_is_lost_with_its_will() {
    let rig = rig_with("retry_interval = \"1s\"\nmax_retries = 2\n");
    let mut wills = rig.subscribe(&["rt-will/#"]).unwrap();
    let mut c = rig.client().unwrap();
    c.connect_with_will(
        "rt-lost",
        true,
        600,
        Qos::One,
        false,
        "rt-will/lost",
        b"gone",
    )
    .unwrap();
    let id = c.subscribe_ok(Qos::One, SubTopic::Name("rtx/t")).unwrap();
    await_live(&mut c, rig.broker.port(), "rtx/t").unwrap();

    publish_upstream(rig.broker.port(), &[UpMsg::new("rtx/t", "unacked", 1)]).unwrap();
    let (flags, tid, msg_id, data) = publish(&c, DELIVERY_TIMEOUT);
    let first = Instant::now();
    assert_eq!(
        (flags, tid, &data[..]),
        (0x20, id, &b"unacked"[..]),
        "QoS 1, no DUP"
    );
    // Not acknowledged: two retransmissions, each the same message with DUP set, each at least
    // most of Tretry after the previous one.
    let mut last = first;
    for n in 1..=2 {
        let (flags, tid, m, data) = publish(&c, RETRY * 10);
        let gap = last.elapsed();
        last = Instant::now();
        assert_eq!(
            (flags, tid, m, &data[..]),
            (0x20 | sn::FLAG_DUP, id, msg_id, &b"unacked"[..]),
            "retransmission {n}: same MsgId, DUP set"
        );
        assert!(
            gap >= RETRY.mul_f32(0.8),
            "retransmission {n} came after {gap:?}, Tretry is {RETRY:?}"
        );
    }
    // Then the client is lost: its Will goes upstream...
    let m = wills.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.qos),
        ("rt-will/lost", &b"gone"[..], 1)
    );
    assert!(
        first.elapsed() >= RETRY.mul_f32(2.5),
        "lost after {:?}, before three Tretry had passed",
        first.elapsed()
    );
    // ...and its session is gone.
    c.send(&sn::pingreq()).unwrap();
    assert_eq!(c.next_packet().unwrap(), Packet::Disconnect);
}

#[test]
fn acknowledging_a_retransmission_completes_the_delivery() {
    let rig = rig_with("retry_interval = \"1s\"\nmax_retries = 3\n");
    let (mut c, id) = subscribed(&rig, "rt-late", Qos::One, "rtl/t");
    publish_upstream(
        rig.broker.port(),
        &[UpMsg::new("rtl/t", "one", 1), UpMsg::new("rtl/t", "two", 1)],
    )
    .unwrap();
    let (_, _, msg_id, data) = publish(&c, DELIVERY_TIMEOUT);
    assert_eq!(data, b"one");
    let (flags, _, m, data) = publish(&c, RETRY * 10);
    assert!(sn::is_dup(flags) && m == msg_id && data == b"one");
    c.send(&sn::puback(id, msg_id, sn::RC_ACCEPTED)).unwrap();
    // The next message follows, new MsgId, no DUP; "one" is not sent again.
    let got = c.downlink(1, DELIVERY_TIMEOUT).unwrap();
    assert_eq!(got[0].text(), "two");
    assert!(!got[0].dup && got[0].msg_id != msg_id, "{got:?}");
    c.assert_no_reply().unwrap();
    c.ping().unwrap();
}

#[test]
fn puback_invalid_topic_id_makes_the_gateway_register_again_and_resend() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut c = rig.connected("re-reg").unwrap();
    c.subscribe_ok(Qos::One, SubTopic::Name("rr/#")).unwrap();
    await_live(&mut c, port, "rr/probe").unwrap();

    publish_upstream(port, &[UpMsg::new("rr/a", "payload", 1)]).unwrap();
    let Packet::Register {
        topic_id,
        msg_id,
        name,
    } = c.next_packet().unwrap()
    else {
        panic!("expected REGISTER")
    };
    assert_eq!(name, "rr/a");
    c.send(&sn::regack(topic_id, msg_id, sn::RC_ACCEPTED))
        .unwrap();
    let (flags, tid, pub_id, data) = publish(&c, REPLY_TIMEOUT);
    assert_eq!((flags, tid, &data[..]), (0x20, topic_id, &b"payload"[..]));

    // The device lost its table (rebooted): PUBACK rc 0x02.
    c.send(&sn::puback(tid, pub_id, sn::RC_INVALID_TOPIC))
        .unwrap();
    let (topic_id2, msg_id2) = match c.next_packet().unwrap() {
        Packet::Register {
            topic_id,
            msg_id,
            name,
        } => {
            assert_eq!(name, "rr/a", "the same topic registered again");
            (topic_id, msg_id)
        }
        p => panic!("PUBACK rc 0x02 answered with {p:?} instead of REGISTER"),
    };
    assert_ne!(topic_id2, 0);
    c.send(&sn::regack(topic_id2, msg_id2, sn::RC_ACCEPTED))
        .unwrap();
    let (flags, tid, pub_id2, data) = publish(&c, REPLY_TIMEOUT);
    assert_eq!(
        (flags & !sn::FLAG_DUP, tid, &data[..]),
        (0x20, topic_id2, &b"payload"[..]),
        "the same message again, on the new registration"
    );
    c.send(&sn::puback(tid, pub_id2, sn::RC_ACCEPTED)).unwrap();
    c.assert_no_reply().unwrap();

    // Later messages use the new registration directly.
    publish_upstream(port, &[UpMsg::new("rr/a", "next", 1)]).unwrap();
    let (_, tid, m, data) = publish(&c, DELIVERY_TIMEOUT);
    assert_eq!((tid, &data[..]), (topic_id2, &b"next"[..]));
    c.send(&sn::puback(tid, m, sn::RC_ACCEPTED)).unwrap();
}

#[test]
fn qos2_downlink_publish_pubrec_pubrel_pubcomp_with_pubrel_retransmitted() {
    let rig = rig_with("retry_interval = \"1s\"\nmax_retries = 3\n");
    let port = rig.broker.port();
    let (c, id) = subscribed(&rig, "q2-down", Qos::Two, "q2d/t");
    publish_upstream(
        port,
        &[
            UpMsg::new("q2d/t", "first", 2),
            UpMsg::new("q2d/t", "second", 2),
        ],
    )
    .unwrap();

    let (flags, tid, msg_id, data) = publish(&c, DELIVERY_TIMEOUT);
    assert_eq!((flags, tid, &data[..]), (0x40, id, &b"first"[..]), "QoS 2");
    assert_ne!(msg_id, 0);
    c.send(&sn::pubrec(msg_id)).unwrap();
    assert_eq!(c.next_packet().unwrap(), Packet::Pubrel { msg_id });
    // PUBCOMP withheld: PUBREL comes again after Tretry, and "second" waits.
    let t = Instant::now();
    assert_eq!(
        c.recv(RETRY * 10).unwrap(),
        Some(Packet::Pubrel { msg_id }),
        "PUBREL retransmitted"
    );
    assert!(t.elapsed() >= RETRY.mul_f32(0.8), "after {:?}", t.elapsed());
    c.send(&sn::pubcomp(msg_id)).unwrap();

    let (flags, tid, msg_id2, data) = publish(&c, DELIVERY_TIMEOUT);
    assert_eq!((flags, tid, &data[..]), (0x40, id, &b"second"[..]));
    assert_ne!(msg_id2, msg_id);
    c.send(&sn::pubrec(msg_id2)).unwrap();
    assert_eq!(c.next_packet().unwrap(), Packet::Pubrel { msg_id: msg_id2 });
    c.send(&sn::pubcomp(msg_id2)).unwrap();
    c.assert_no_reply().unwrap();
}

#[test]
fn qos2_publish_without_pubrec_is_retransmitted_with_dup() {
    let rig = rig_with("retry_interval = \"1s\"\nmax_retries = 3\n");
    let (c, id) = subscribed(&rig, "q2-dup", Qos::Two, "q2u/t");
    publish_upstream(rig.broker.port(), &[UpMsg::new("q2u/t", "x", 2)]).unwrap();
    let (flags, _, msg_id, _) = publish(&c, DELIVERY_TIMEOUT);
    assert_eq!(flags, 0x40);
    let (flags, tid, m, data) = publish(&c, RETRY * 10);
    assert_eq!(
        (flags, tid, m, &data[..]),
        (0x40 | sn::FLAG_DUP, id, msg_id, &b"x"[..])
    );
    c.send(&sn::pubrec(msg_id)).unwrap();
    assert_eq!(c.next_packet().unwrap(), Packet::Pubrel { msg_id });
    c.send(&sn::pubcomp(msg_id)).unwrap();
    c.assert_no_reply().unwrap();
}

#[test]
fn one_qos1_message_in_flight_per_client_in_order() {
    let rig = Rig::start().unwrap();
    let mut marker = Marker::for_rig(&rig, "flight").unwrap();
    let (slow, id) = subscribed(&rig, "slow", Qos::One, "fl/t");
    marker
        .publish(&[
            UpMsg::new("fl/t", "m1", 1),
            UpMsg::new("fl/t", "m2", 1),
            UpMsg::new("fl/t", "m3", 1),
        ])
        .unwrap();
    // All three are at the gateway; only m1 is sent until it is acknowledged.
    let mut next = Vec::new();
    for want in ["m1", "m2", "m3"] {
        let (flags, tid, msg_id, data) = publish(&slow, DELIVERY_TIMEOUT);
        assert_eq!((flags, tid), (0x20, id));
        assert_eq!(String::from_utf8_lossy(&data), want, "in order");
        slow.assert_no_reply()
            .map_err(|e| e.context(format!("a second message in flight while {want} is")))
            .unwrap();
        next.push(msg_id);
        slow.send(&sn::puback(tid, msg_id, sn::RC_ACCEPTED))
            .unwrap();
    }
    slow.assert_no_reply().unwrap();
    next.dedup();
    assert_eq!(next.len(), 3, "distinct MsgIds: {next:?}");
}

/// `queue_full` with `max_queued_per_client = 2`: m1 is in flight (unacknowledged), m2..m5
/// arrive; returns what follows m1 once it is acknowledged.
fn queue_overflow(policy: &str) -> Vec<String> {
    let rig = rig_with(&format!(
        "max_queued_per_client = 2\nqueue_full = \"{policy}\"\nretry_interval = \"60s\"\n"
    ));
    let mut marker = Marker::for_rig(&rig, "queue").unwrap();
    let (mut c, id) = subscribed(&rig, "queued", Qos::One, "qf/t");
    publish_upstream(rig.broker.port(), &[UpMsg::new("qf/t", "m1", 1)]).unwrap();
    let (_, _, m1, data) = publish(&c, DELIVERY_TIMEOUT);
    assert_eq!(data, b"m1");
    marker
        .publish(
            &(2..=5)
                .map(|i| UpMsg::new("qf/t", format!("m{i}"), 1))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    c.assert_no_reply().unwrap();
    c.send(&sn::puback(id, m1, sn::RC_ACCEPTED)).unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        match c.recv(REPLY_TIMEOUT).unwrap() {
            Some(p @ Packet::Publish { .. }) => {
                got.push(c.accept(&p).unwrap().unwrap().text());
                if got.len() == 2 {
                    break;
                }
            }
            Some(p) => panic!("unexpected {p:?}"),
            None => break,
        }
    }
    c.assert_no_reply().unwrap();
    got
}

#[test]
fn full_queue_drops_the_oldest_message_by_default_policy() {
    assert_eq!(queue_overflow("drop_oldest"), vec!["m4", "m5"]);
}

#[test]
fn full_queue_drops_the_new_message_with_drop_new() {
    assert_eq!(queue_overflow("drop_new"), vec!["m2", "m3"]);
}
