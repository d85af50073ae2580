//! Uplink: MQTT-SN PUBLISH from a sensor reaches the MQTT broker with the right topic, payload,
//! QoS and retain flag, for every QoS, every topic id type, both MQTT versions, IPv6, the
//! largest datagram, and the PyPI `mqtt_sn_pub` CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, UdpSocket};
use std::time::Duration;

use sensorgate_tests::sn::{self, Qos, TopicType};
use sensorgate_tests::{Message, PREDEFINED_ID, PREDEFINED_TOPIC, Predefined, Rig, Subscriber};

fn msg(topic: &str, payload: &[u8], qos: u8, retain: bool) -> Message {
    Message {
        topic: topic.into(),
        payload: payload.to_vec(),
        qos,
        retain,
    }
}

#[test]
fn qos0_publish_to_registered_topic_reaches_broker() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("qos0-client").unwrap();
    let id = c.register("sensors/a/temp").unwrap();
    c.publish(Qos::Zero, TopicType::Normal, id, false, b"21.5")
        .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/a/temp", b"21.5", 0, false)
    );
}

#[test]
fn qos1_publish_gets_puback_and_reaches_broker() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("qos1-client").unwrap();
    let id = c.register("sensors/b/hum").unwrap();
    let msg_id = c
        .publish(Qos::One, TopicType::Normal, id, false, b"55%")
        .unwrap();
    // The exact PUBACK: topic id, msg id, rc 0.
    let p = c.next_packet().unwrap();
    assert_eq!(
        p,
        sn::Packet::Puback {
            topic_id: id,
            msg_id,
            rc: sn::RC_ACCEPTED
        }
    );
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/b/hum", b"55%", 1, false)
    );
}

#[test]
fn qos1_is_acknowledged_once_spooled_even_while_the_broker_is_frozen() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["sensors/ack/#"]).unwrap();
    let mut c = rig.connected("ack-waiter").unwrap();
    let id = c.register("sensors/ack/wait").unwrap();
    c.publish_qos1_ok(TopicType::Normal, id, b"warm").unwrap();
    assert_eq!(sub.expect().unwrap().payload, b"warm");

    // A frozen broker (SIGSTOP) acknowledges nothing; the spool does, once the message is
    // on disk, and forwards it when the broker answers again.
    rig.broker.pause().unwrap();
    let msg_id = c
        .publish(Qos::One, TopicType::Normal, id, false, b"held")
        .unwrap();
    let (_, rc) = c.puback(msg_id, Duration::from_secs(10)).unwrap();
    rig.broker.resume().unwrap();
    assert_eq!(rc, sn::RC_ACCEPTED, "PUBACK once spooled");
    // Duplicates are allowed (the gateway may reconnect and resend).
    loop {
        let m = sub.expect().unwrap();
        if m.payload == b"held" {
            break;
        }
        assert_eq!(m.payload, b"warm", "unexpected {m:?}");
    }
}

#[test]
fn qos2_publish_full_flow_reaches_broker() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("qos2-client").unwrap();
    let id = c.register("sensors/c/press").unwrap();
    c.publish_qos2_ok(TopicType::Normal, id, false, b"1013")
        .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/c/press", b"1013", 2, false)
    );
}

#[test]
fn register_returns_stable_distinct_ids_that_avoid_predefined_ones() {
    let rig = Rig::start_with(|cfg| {
        for id in [2u16, 3, 4, 5, 100] {
            cfg.predefined.push(Predefined {
                id,
                topic: format!("sensors/predefined/{id}"),
                clients: vec!["*".into()],
            });
        }
        Ok(())
    })
    .unwrap();
    let predefined: HashSet<u16> = rig.config.predefined.iter().map(|p| p.id).collect();
    let mut c = rig.connected("registrar").unwrap();
    let mut ids = HashSet::new();
    for i in 0..40 {
        let id = c.register(&format!("reg/topic/{i}")).unwrap();
        assert!(id != 0x0000 && id != 0xFFFF, "reserved topic id {id:#06x}");
        assert!(!predefined.contains(&id), "REGACK gave predefined id {id}");
        assert!(ids.insert(id), "topic id {id} given to two topics");
    }
    let first = c.register("reg/topic/0").unwrap();
    let again = c.register("reg/topic/0").unwrap();
    assert_eq!(
        first, again,
        "same topic registered twice got different ids"
    );
    assert!(ids.contains(&first));
}

#[test]
fn predefined_topic_publishes_at_every_qos() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("predef-client").unwrap();
    c.publish(
        Qos::Zero,
        TopicType::Predefined,
        PREDEFINED_ID,
        false,
        b"p0",
    )
    .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg(PREDEFINED_TOPIC, b"p0", 0, false)
    );
    c.publish_qos1_ok(TopicType::Predefined, PREDEFINED_ID, b"p1")
        .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg(PREDEFINED_TOPIC, b"p1", 1, false)
    );
    c.publish_qos2_ok(TopicType::Predefined, PREDEFINED_ID, false, b"p2")
        .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg(PREDEFINED_TOPIC, b"p2", 2, false)
    );
}

#[test]
fn short_topic_publishes_at_every_qos() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["ab"]).unwrap();
    let mut c = rig.connected("short-client").unwrap();
    let id = sn::short_id(b"ab");
    c.publish(Qos::Zero, TopicType::Short, id, false, b"s0")
        .unwrap();
    assert_eq!(sub.expect().unwrap(), msg("ab", b"s0", 0, false));
    c.publish_qos1_ok(TopicType::Short, id, b"s1").unwrap();
    assert_eq!(sub.expect().unwrap(), msg("ab", b"s1", 1, false));
    c.publish_qos2_ok(TopicType::Short, id, false, b"s2")
        .unwrap();
    assert_eq!(sub.expect().unwrap(), msg("ab", b"s2", 2, false));
}

#[test]
fn qos_minus_one_without_session_is_forwarded() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["sensors/#", "zz"]).unwrap();
    // Never connected.
    let mut c = rig.client().unwrap();
    c.publish(
        Qos::MinusOne,
        TopicType::Predefined,
        PREDEFINED_ID,
        false,
        b"m1",
    )
    .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg(PREDEFINED_TOPIC, b"m1", 0, false)
    );
    c.publish(
        Qos::MinusOne,
        TopicType::Short,
        sn::short_id(b"zz"),
        false,
        b"m2",
    )
    .unwrap();
    assert_eq!(sub.expect().unwrap(), msg("zz", b"m2", 0, false));
    // QoS -1 is fire and forget: no reply at all (in particular no DISCONNECT).
    c.assert_no_reply().unwrap();
}

#[test]
fn unknown_topic_id_gets_puback_invalid_topic_id() {
    let rig = Rig::start().unwrap();
    let mut c = rig.connected("unknown-topic").unwrap();
    for (tt, topic_id) in [(TopicType::Normal, 999u16), (TopicType::Predefined, 77)] {
        let msg_id = c.publish(Qos::One, tt, topic_id, false, b"x").unwrap();
        assert_eq!(
            c.next_packet().unwrap(),
            sn::Packet::Puback {
                topic_id,
                msg_id,
                rc: sn::RC_INVALID_TOPIC
            },
            "{tt:?} topic id {topic_id}"
        );
    }
}

#[test]
fn retain_flag_is_carried_to_the_broker() {
    let rig = Rig::start().unwrap();
    let mut live = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("retainer").unwrap();
    let id = c.register("sensors/retained").unwrap();
    let rc = c
        .publish_qos1(TopicType::Normal, id, true, b"kept")
        .unwrap();
    assert_eq!(rc, sn::RC_ACCEPTED);
    // MQTT 5 retain-as-published: the live subscriber sees the flag as the gateway set it.
    assert_eq!(
        live.expect().unwrap(),
        msg("sensors/retained", b"kept", 1, true)
    );
    // A later subscriber gets the retained copy from the broker.
    let mut later = rig.subscribe(&["sensors/retained"]).unwrap();
    assert_eq!(
        later.expect().unwrap(),
        msg("sensors/retained", b"kept", 1, true)
    );
    // A non-retained publish is delivered without the flag.
    c.publish(Qos::Zero, TopicType::Normal, id, false, b"live")
        .unwrap();
    assert_eq!(
        live.expect().unwrap(),
        msg("sensors/retained", b"live", 0, false)
    );
}

/// The configured max_packet_size (4KiB).
const MAX: usize = 4096;
/// PUBLISH overhead in the 3-octet length form: 0x01, u16 length, type, flags, topic, msg id.
const LONG_PUBLISH_OVERHEAD: usize = 9;

#[test]
fn largest_datagram_is_accepted_and_one_more_octet_is_dropped() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["big/#"]).unwrap();
    let mut c = rig.connected("big-sender").unwrap();
    let id = c.register("big/payload").unwrap();

    // A medium payload that needs the 3-octet length form.
    let medium: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
    c.publish_qos1_ok(TopicType::Normal, id, &medium).unwrap();
    assert_eq!(sub.expect().unwrap().payload, medium);

    // Exactly max_packet_size.
    let max_payload: Vec<u8> = (0..MAX - LONG_PUBLISH_OVERHEAD)
        .map(|i| (i % 253) as u8)
        .collect();
    let msg_id = c.msg_id();
    let dgram = sn::frame_long(
        sn::PUBLISH,
        &sn::publish_body(0x20, id, msg_id, &max_payload),
    );
    assert_eq!(dgram.len(), MAX);
    c.send(&dgram).unwrap();
    assert_eq!(
        c.puback(msg_id, Duration::from_secs(10)).unwrap(),
        (id, sn::RC_ACCEPTED)
    );
    let got = sub.expect().unwrap();
    assert_eq!(
        (got.topic.as_str(), got.payload.len()),
        ("big/payload", max_payload.len())
    );
    assert_eq!(got.payload, max_payload);

    // One octet more (with a truthful length field): dropped without a reply.
    let over_payload = vec![0x5Au8; MAX - LONG_PUBLISH_OVERHEAD + 1];
    let msg_id = c.msg_id();
    let dgram = sn::frame_long(
        sn::PUBLISH,
        &sn::publish_body(0x20, id, msg_id, &over_payload),
    );
    assert_eq!(dgram.len(), MAX + 1);
    c.send(&dgram).unwrap();
    c.assert_no_reply().unwrap();

    // Not forwarded either: the next message at the broker is the marker.
    c.publish_qos1_ok(TopicType::Normal, id, b"marker").unwrap();
    assert_eq!(sub.expect().unwrap().payload, b"marker");
}

#[test]
fn three_octet_length_form_is_accepted_for_a_short_message() {
    // 5.2.1: lengths under 256 *may* use one octet, so the long form is legal for them too.
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["ab"]).unwrap();
    let mut c = rig.connected("long-form").unwrap();
    let msg_id = c.msg_id();
    let body = sn::publish_body(0x22, sn::short_id(b"ab"), msg_id, b"tiny");
    c.send(&sn::frame_long(sn::PUBLISH, &body)).unwrap();
    let (_, rc) = c.puback(msg_id, Duration::from_secs(10)).unwrap();
    assert_eq!(rc, sn::RC_ACCEPTED);
    assert_eq!(sub.expect().unwrap(), msg("ab", b"tiny", 1, false));
}

#[test]
fn remote_prefix_is_prepended_to_every_topic() {
    let rig = Rig::start_with(|cfg| {
        cfg.remote_prefix = "site1/".into();
        Ok(())
    })
    .unwrap();
    let mut sub = rig.subscribe(&["#"]).unwrap();
    let mut c = rig.connected("prefixed").unwrap();
    let id = c.register("sensors/p").unwrap();
    c.publish_qos1_ok(TopicType::Normal, id, b"n").unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg("site1/sensors/p", b"n", 1, false)
    );
    c.publish_qos1_ok(TopicType::Predefined, PREDEFINED_ID, b"p")
        .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg(&format!("site1/{PREDEFINED_TOPIC}"), b"p", 1, false)
    );
    c.publish_qos1_ok(TopicType::Short, sn::short_id(b"ab"), b"s")
        .unwrap();
    assert_eq!(sub.expect().unwrap(), msg("site1/ab", b"s", 1, false));
}

#[test]
fn mqtt_sn_pub_cli_publishes_qos0_qos1_and_minus1() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["cli/#", "sensors/#"]).unwrap();
    let gw = rig.gateway.sn_addr();
    let cases: [(&[&str], Message); 3] = [
        (
            &["-q", "0", "-t", "cli/zero", "-m", "hello0", "-i", "cli-q0"],
            msg("cli/zero", b"hello0", 0, false),
        ),
        (
            &["-q", "1", "-t", "cli/one", "-m", "hello1", "-i", "cli-q1"],
            msg("cli/one", b"hello1", 1, false),
        ),
        (
            &["-q", "-1", "-T", "1", "-m", "hellom1"],
            msg(PREDEFINED_TOPIC, b"hellom1", 0, false),
        ),
    ];
    for (args, want) in cases {
        let out = sensorgate_tests::mqtt_sn_pub(gw, args).unwrap();
        assert!(
            out.status.success(),
            "mqtt_sn_pub {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sub.expect().unwrap(), want, "mqtt_sn_pub {args:?}");
    }
}

#[test]
fn mqtt_311_upstream_carries_every_qos() {
    let rig = Rig::start_with(|cfg| {
        cfg.protocol = "3.1.1".into();
        Ok(())
    })
    .unwrap();
    let mut sub = Subscriber::start_with(rig.broker.port(), &["v311/#"], "3.1.1").unwrap();
    let mut c = rig.connected("v311-client").unwrap();
    let id = c.register("v311/t").unwrap();
    c.publish(Qos::Zero, TopicType::Normal, id, false, b"a")
        .unwrap();
    assert_eq!(sub.expect().unwrap(), msg("v311/t", b"a", 0, false));
    c.publish_qos1_ok(TopicType::Normal, id, b"b").unwrap();
    assert_eq!(sub.expect().unwrap(), msg("v311/t", b"b", 1, false));
    c.publish_qos2_ok(TopicType::Normal, id, false, b"c")
        .unwrap();
    assert_eq!(sub.expect().unwrap(), msg("v311/t", b"c", 2, false));
    // Retain through a 3.1.1 upstream: checked through the broker's retained store.
    c.publish_qos1(TopicType::Normal, id, true, b"r").unwrap();
    assert_eq!(sub.expect().unwrap().payload, b"r");
    let mut later = Subscriber::start_with(rig.broker.port(), &["v311/t"], "3.1.1").unwrap();
    assert_eq!(later.expect().unwrap(), msg("v311/t", b"r", 1, true));
}

#[test]
fn ipv6_listener_serves_clients() {
    if let Err(e) = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)) {
        panic!("this test needs IPv6 loopback, but [::1] cannot be bound here: {e}");
    }
    let rig = Rig::start_with(|cfg| cfg.listen_on(IpAddr::V6(Ipv6Addr::LOCALHOST))).unwrap();
    assert!(rig.gateway.sn_addr().is_ipv6());
    let mut sub = rig.subscribe(&["v6/#"]).unwrap();
    let mut c = rig.connected("v6-client").unwrap();
    assert!(c.local_addr().unwrap().is_ipv6());
    let id = c.register("v6/t").unwrap();
    c.publish_qos1_ok(TopicType::Normal, id, b"six").unwrap();
    assert_eq!(sub.expect().unwrap(), msg("v6/t", b"six", 1, false));
    c.ping().unwrap();
    c.disconnect().unwrap();
}

#[test]
fn predefined_topic_limited_to_listed_clients() {
    let rig = Rig::start_with(|cfg| {
        cfg.predefined.push(Predefined {
            id: 2,
            topic: "sensors/alice-only".into(),
            clients: vec!["alice".into()],
        });
        Ok(())
    })
    .unwrap();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut alice = rig.connected("alice").unwrap();
    alice
        .publish_qos1_ok(TopicType::Predefined, 2, b"from alice")
        .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/alice-only", b"from alice", 1, false)
    );

    let mut bob = rig.connected("bob").unwrap();
    let msg_id = bob
        .publish(Qos::One, TopicType::Predefined, 2, false, b"from bob")
        .unwrap();
    assert_eq!(
        bob.next_packet().unwrap(),
        sn::Packet::Puback {
            topic_id: 2,
            msg_id,
            rc: sn::RC_INVALID_TOPIC
        },
        "predefined id 2 is alice's only"
    );
    // Everyone's predefined topic still works for bob.
    bob.publish_qos1_ok(TopicType::Predefined, PREDEFINED_ID, b"bob on 1")
        .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg(PREDEFINED_TOPIC, b"bob on 1", 1, false)
    );

    // A QoS -1 sender has no ClientId, so alice's topic is not available to it; the marker on
    // the everyone-topic, sent the same way, must be the next message at the broker.
    let mut anon = rig.client().unwrap();
    anon.publish(Qos::MinusOne, TopicType::Predefined, 2, false, b"anon on 2")
        .unwrap();
    anon.publish(
        Qos::MinusOne,
        TopicType::Predefined,
        PREDEFINED_ID,
        false,
        b"marker",
    )
    .unwrap();
    assert_eq!(
        sub.expect().unwrap(),
        msg(PREDEFINED_TOPIC, b"marker", 0, false)
    );
}

/// `run` takes `[[route]]` and the backlog caps from the config: a catch-all route to the one
/// upstream delivers as without routes.
#[test]
fn a_catch_all_route_and_a_backlog_cap_deliver_as_before() {
    let rig = Rig::start_with(|c| {
        c.extra_sections = "max_backlog = \"1GiB\"\nmax_backlog_age = \"7d\"\n\n\
                            [[route]]\nfilter = \"#\"\nupstreams = [\"local\"]\nqos_max = 2\n"
            .into();
        Ok(())
    })
    .unwrap();
    let mut sub = rig.subscribe(&["sensors/#"]).unwrap();
    let mut c = rig.connected("routed-client").unwrap();
    let id = c.register("sensors/r/temp").unwrap();
    let msg_id = c
        .publish(Qos::One, TopicType::Normal, id, false, b"19.0")
        .unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        sn::Packet::Puback {
            topic_id: id,
            msg_id,
            rc: sn::RC_ACCEPTED
        }
    );
    assert_eq!(
        sub.expect().unwrap(),
        msg("sensors/r/temp", b"19.0", 1, false)
    );
}
