//! Malformed datagrams are dropped silently and the gateway keeps serving.
//!
//! For each class of malformed input an attacker socket (connected first when the class is about
//! packets that need a session) sends the datagrams, then proves it got no reply: it sends
//! SEARCHGW and the very next packet must be GWINFO. After each class a fresh, healthy client
//! connects, publishes QoS 1, gets PUBACK rc 0, and the message reaches the broker.
//!
//! Encapsulations are decoded only from an allow-listed forwarder: the classes about them are
//! sent from [`FORWARDER`] (the gateway's `[mqttsn] forwarders`), so the decoder sees them;
//! well-formed encapsulations from any other address are refused unanswered (a class of its
//! own).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use sensorgate_tests::sn::{self, Qos, TopicType};
use sensorgate_tests::{Rig, SnClient, Subscriber, XorShift64};

/// The configured max_packet_size.
const MAX: usize = 4096;

/// The source address of the one allow-listed forwarder.
const FORWARDER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A rig whose gateway takes encapsulations from [`FORWARDER`].
fn rig() -> Rig {
    Rig::start_with(|c| {
        c.mqttsn(&format!("forwarders = [\"{FORWARDER}\"]"));
        Ok(())
    })
    .unwrap()
}

static HEALTHY: AtomicU32 = AtomicU32::new(0);

/// A fresh client connects, registers, publishes QoS 1 with payload `tag`; PUBACK rc 0 and the
/// broker delivers it.
fn assert_healthy(rig: &Rig, sub: &mut Subscriber, tag: &str) {
    let n = HEALTHY.fetch_add(1, Ordering::Relaxed);
    let mut c = rig
        .connected(&format!("healthy-{n}"))
        .unwrap_or_else(|e| panic!("after {tag}: healthy CONNECT failed: {e:#}"));
    let id = c
        .register("healthy/topic")
        .unwrap_or_else(|e| panic!("after {tag}: {e:#}"));
    c.publish_qos1_ok(TopicType::Normal, id, tag.as_bytes())
        .unwrap_or_else(|e| panic!("after {tag}: {e:#}"));
    for _ in 0..50 {
        let m = sub
            .expect()
            .unwrap_or_else(|e| panic!("after {tag}: {e:#}"));
        if m.payload == tag.as_bytes() {
            return;
        }
    }
    panic!("after {tag}: healthy message never reached the broker");
}

struct Class {
    name: &'static str,
    /// Send from a connected client (the packet types need a session to be meaningful).
    with_session: bool,
    /// Send from the allow-listed forwarder's address.
    from_forwarder: bool,
    datagrams: Vec<Vec<u8>>,
}

fn class(name: &'static str, with_session: bool, datagrams: Vec<Vec<u8>>) -> Class {
    Class {
        name,
        with_session,
        from_forwarder: false,
        datagrams,
    }
}

/// A class sent by the allow-listed forwarder.
fn forwarded(name: &'static str, datagrams: Vec<Vec<u8>>) -> Class {
    Class {
        from_forwarder: true,
        ..class(name, false, datagrams)
    }
}

fn with_first(mut v: Vec<u8>, first: u8) -> Vec<u8> {
    v[0] = first;
    v
}

fn classes() -> Vec<Class> {
    let pub_q1 = sn::flags(Qos::One, false, TopicType::Short);
    let ab = sn::short_id(b"ab");
    let good_connect = sn::connect(sn::FLAG_CLEAN, 60, b"lenliar");
    let good_publish = sn::publish(pub_q1, ab, 9, b"payload");
    let mut nested = sn::pingreq();
    for i in 0..40u8 {
        nested = sn::encapsulate(0, &[i, i], &nested);
    }
    let max_udp = 65_507;
    vec![
        class("empty datagram", false, vec![vec![]]),
        class(
            "truncated header",
            false,
            vec![
                vec![0x05],
                vec![0x01],
                vec![0x01, 0x00],
                vec![0x01, 0x00, 0x05],
            ],
        ),
        class(
            "length field larger than datagram",
            false,
            vec![
                vec![0x08, sn::PINGREQ],
                with_first(good_connect.clone(), good_connect[0] + 1),
                with_first(good_publish.clone(), 0xFF),
            ],
        ),
        class(
            "length field smaller than datagram",
            false,
            vec![
                vec![0x02, sn::PINGREQ, 0x00, 0x00],
                with_first(good_connect.clone(), good_connect[0] - 1),
                vec![0x03, sn::SEARCHGW, 0x00, 0xAA],
            ],
        ),
        class(
            "length field below the header size",
            false,
            vec![
                vec![0x00, sn::PINGREQ],
                vec![0x01, 0x00, 0x00, sn::PINGREQ],
                vec![0x01, 0x00, 0x02, sn::PINGREQ],
                vec![0x01, 0x00, 0x03, sn::PINGREQ],
            ],
        ),
        class(
            "3-octet length form that lies",
            false,
            vec![
                vec![0x01, 0x00, 0x10, sn::PINGREQ],
                vec![0x01, 0x00, 0x04, sn::PINGREQ, 0x00],
                {
                    let mut v = vec![0x01, 0xFF, 0xFF, sn::SEARCHGW];
                    v.extend_from_slice(&[0u8; 20]);
                    v
                },
                {
                    let mut v = sn::frame_long(sn::CONNECT, &good_connect[2..]);
                    v[2] += 1;
                    v
                },
            ],
        ),
        class(
            "reserved message types without a session",
            false,
            [0x03u8, 0x11, 0x19, 0x1E, 0x80, 0xFD, 0xFF]
                .iter()
                .flat_map(|&t| [sn::frame(t, &[]), sn::frame(t, &[1, 2, 3])])
                .collect(),
        ),
        class(
            "reserved message types in a session",
            true,
            [0x03u8, 0x11, 0x19, 0x1E, 0x80, 0xFD, 0xFF]
                .iter()
                .flat_map(|&t| [sn::frame(t, &[]), sn::frame(t, &[0x20, 0, 1, 0, 1])])
                .collect(),
        ),
        class(
            "topic id type 0b11",
            true,
            [Qos::Zero, Qos::One, Qos::Two, Qos::MinusOne]
                .iter()
                .map(|&q| sn::publish(sn::flags(q, false, TopicType::Reserved), 1, 5, b"r"))
                .collect(),
        ),
        // Empty or over-limit ClientIds are well-formed: they get CONNACK rc 0x03
        // (connect_refused.rs). Beyond the decoder's hard cap they are malformed.
        class(
            "ClientId longer than the decoder's cap (1024 octets)",
            false,
            vec![
                sn::connect(sn::FLAG_CLEAN, 60, &[b'x'; 1025]),
                sn::connect(sn::FLAG_CLEAN, 60, &[b'y'; 4000]),
            ],
        ),
        class(
            "invalid UTF-8 in ClientId",
            false,
            vec![
                sn::connect(sn::FLAG_CLEAN, 60, b"ab\xff\xfe"),
                sn::connect(sn::FLAG_CLEAN, 60, b"\xc3\x28"),
                sn::connect(sn::FLAG_CLEAN, 60, b"\xed\xa0\x80surrogate"),
            ],
        ),
        class(
            "invalid UTF-8 in REGISTER topic",
            true,
            vec![
                sn::register(0x0101, b"sensors/\xff"),
                sn::register(0x0102, b"\xc3\x28"),
                sn::register(0x0103, b"a/\xed\xa0\x80"),
            ],
        ),
        class(
            "bad protocol id",
            false,
            [0x00u8, 0x02, 0x10, 0xFF]
                .iter()
                .map(|&p| sn::connect_with_protocol(sn::FLAG_CLEAN, p, 60, b"badproto"))
                .collect(),
        ),
        class(
            "truncated PUBLISH",
            true,
            vec![
                vec![0x02, sn::PUBLISH],
                vec![0x03, sn::PUBLISH, pub_q1],
                vec![0x04, sn::PUBLISH, pub_q1, b'a'],
                vec![0x05, sn::PUBLISH, pub_q1, b'a', b'b'],
                vec![0x06, sn::PUBLISH, pub_q1, b'a', b'b', 0x00],
            ],
        ),
        class(
            "truncated CONNECT, REGISTER, PUBREL, SEARCHGW, DISCONNECT",
            true,
            vec![
                vec![0x02, sn::CONNECT],
                vec![0x04, sn::CONNECT, sn::FLAG_CLEAN, 0x01],
                vec![0x05, sn::CONNECT, sn::FLAG_CLEAN, 0x01, 0x00],
                vec![0x05, sn::REGISTER, 0x00, 0x00, 0x00],
                vec![0x03, sn::PUBREL, 0x00],
                vec![0x02, sn::SEARCHGW],
                vec![0x03, sn::DISCONNECT, 0x00],
            ],
        ),
        class(
            "oversize datagrams",
            true,
            vec![
                sn::frame_long(
                    sn::PUBLISH,
                    &sn::publish_body(pub_q1, ab, 11, &vec![0x42; MAX + 1 - 9]),
                ),
                sn::frame_long(
                    sn::PUBLISH,
                    &sn::publish_body(pub_q1, ab, 12, &vec![0x43; max_udp - 9]),
                ),
                {
                    // Claims to be small, but the datagram is oversize.
                    let mut v = sn::publish(pub_q1, ab, 13, b"x");
                    v.resize(MAX + 100, 0);
                    v
                },
            ],
        ),
        forwarded(
            "nested 0xFE encapsulation",
            vec![
                sn::encapsulate(
                    0,
                    &[0x01, 0x02],
                    &sn::encapsulate(0, &[0x03], &sn::pingreq()),
                ),
                sn::encapsulate(
                    1,
                    &[0x0A],
                    &sn::encapsulate(1, &[0x0B], &sn::connect(sn::FLAG_CLEAN, 60, b"nested")),
                ),
                nested,
                // An encapsulation header that claims less than its own fixed part.
                vec![0x02, sn::ENCAPSULATED, 0x00, 0x02, sn::PINGREQ],
                // A well-formed header around a truncated message.
                sn::encapsulate(0, &[0x07], &[0x05, sn::PINGREQ]),
            ],
        ),
        class(
            "well-formed encapsulation from an address not in the forwarders list",
            false,
            vec![
                sn::encapsulate(0, &[0x01], &sn::connect(sn::FLAG_CLEAN, 60, b"spoofed")),
                sn::encapsulate(1, &[0x02, 0x03], &sn::searchgw(1)),
                sn::encapsulate(0, &[0x04], &sn::pingreq()),
            ],
        ),
    ]
}

#[test]
fn every_class_of_malformed_datagram_is_dropped_silently() {
    let rig = rig();
    let mut sub = rig.subscribe(&["healthy/#"]).unwrap();
    assert_healthy(&rig, &mut sub, "before anything");
    let mut failures = Vec::new();
    for (i, class) in classes().into_iter().enumerate() {
        let mut attacker = if class.from_forwarder {
            SnClient::bind(rig.gateway.sn_addr(), FORWARDER).unwrap()
        } else {
            SnClient::new(rig.gateway.sn_addr()).unwrap()
        };
        if class.with_session {
            attacker.connect_ok(&format!("attacker-{i}")).unwrap();
        }
        for d in &class.datagrams {
            attacker.send(d).unwrap();
        }
        // Collect rather than stop at the first class, so one run reports every bad class.
        if let Err(e) = attacker.assert_no_reply() {
            failures.push(format!(
                "{}: {e:#} (datagrams: {:02x?})",
                class.name,
                short(&class)
            ));
            // Drain whatever else the class caused before moving on.
            while let Ok(Some(_)) = attacker.recv_raw(std::time::Duration::from_millis(300)) {}
        }
        if class.with_session {
            // A dropped datagram must not have cost the sender its session.
            if let Err(e) = attacker.ping() {
                failures.push(format!("{}: session lost: {e:#}", class.name));
            }
        }
        assert_healthy(&rig, &mut sub, class.name);
    }
    let mut rig = rig;
    assert!(
        rig.gateway.is_running(),
        "gateway died:\n{}",
        rig.gateway.log()
    );
    assert!(
        failures.is_empty(),
        "malformed datagrams got replies:\n{}",
        failures.join("\n")
    );
}

fn short(class: &Class) -> Vec<Vec<u8>> {
    class
        .datagrams
        .iter()
        .map(|d| d.iter().take(24).copied().collect())
        .collect()
}

#[test]
fn seeded_random_garbage_does_not_hurt_the_gateway() {
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["healthy/#"]).unwrap();
    let mut rng = XorShift64::new(0x5EED_F00D_6A7B_A6E5);
    let attackers: Vec<SnClient> = (0..8)
        .map(|_| SnClient::new(rig.gateway.sn_addr()).unwrap())
        .collect();
    // Half of the datagrams get a plausible length and message type so the body parsers are
    // exercised too, not only the header check.
    let types = [
        sn::SEARCHGW,
        sn::CONNECT,
        sn::REGISTER,
        sn::PUBLISH,
        sn::PUBACK,
        sn::PUBREL,
        sn::PINGREQ,
        sn::DISCONNECT,
        sn::ENCAPSULATED,
        0x07,
        0x09,
        0x12,
        0x14,
        0x1A,
        0x1C,
    ];
    for i in 0..2_000usize {
        let len = match rng.below(20) {
            0 => 128 + rng.below(5_000) as usize,
            1..=5 => 16 + rng.below(112) as usize,
            _ => rng.below(16) as usize,
        };
        let mut d = rng.bytes(len);
        if rng.below(2) == 0 && (2..=255).contains(&len) {
            d[0] = len as u8;
            d[1] = types[rng.below(types.len() as u64) as usize];
        }
        attackers[i % attackers.len()].send(&d).unwrap();
        if i % 250 == 249 {
            assert_healthy(&rig, &mut sub, &format!("garbage {}", i + 1));
        }
    }
    assert_healthy(&rig, &mut sub, "all garbage");
    let mut rig = rig;
    assert!(
        rig.gateway.is_running(),
        "gateway died:\n{}",
        rig.gateway.log()
    );
}

#[test]
fn bit_flipped_and_truncated_valid_packets_do_not_hurt_the_gateway() {
    let rig = rig();
    let mut sub = rig.subscribe(&["healthy/#"]).unwrap();
    let mut rng = XorShift64::new(42);
    let mut victim = rig.connected("victim").unwrap();
    let id = victim.register("victim/t").unwrap();
    let valid = [
        sn::connect(sn::FLAG_CLEAN, 60, b"mutant"),
        sn::register(3, b"mutant/topic"),
        sn::publish(
            sn::flags(Qos::One, false, TopicType::Normal),
            id,
            4,
            b"payload",
        ),
        sn::publish(
            sn::flags(Qos::Two, true, TopicType::Short),
            sn::short_id(b"ab"),
            5,
            b"x",
        ),
        sn::publish(
            sn::flags(Qos::MinusOne, false, TopicType::Predefined),
            1,
            0,
            b"m",
        ),
        sn::pubrel(5),
        sn::pingreq(),
        sn::searchgw(0),
        sn::encapsulate(0, &[1, 2, 3], &sn::pingreq()),
    ];
    // Every other datagram from the forwarder, so mutated encapsulations reach the decoder.
    let mutants = [
        SnClient::new(rig.gateway.sn_addr()).unwrap(),
        SnClient::bind(rig.gateway.sn_addr(), FORWARDER).unwrap(),
    ];
    for i in 0..2_000usize {
        let mut d = valid[i % valid.len()].clone();
        match rng.below(3) {
            0 => {
                let bit = rng.below(d.len() as u64 * 8) as usize;
                d[bit / 8] ^= 1 << (bit % 8);
            }
            1 => d.truncate(rng.below(d.len() as u64) as usize),
            _ => {
                let n = 1 + rng.below(8) as usize;
                d.extend(rng.bytes(n));
            }
        }
        mutants[i % 2].send(&d).unwrap();
    }
    assert_healthy(&rig, &mut sub, "mutated packets");
    let mut rig = rig;
    assert!(
        rig.gateway.is_running(),
        "gateway died:\n{}",
        rig.gateway.log()
    );
}

#[test]
fn topic_names_with_nul_never_reach_the_broker() {
    // MQTT forbids U+0000 in topic names (MQTT 3.1.1 4.7.3, MQTT 5 4.7.3): forwarding one makes
    // the broker drop the gateway's upstream connection, and every sensor gets congestion.
    let rig = Rig::start().unwrap();
    let mut sub = rig.subscribe(&["healthy/#"]).unwrap();

    // Without a session: QoS -1 to the short topic "a\0".
    let anon = SnClient::new(rig.gateway.sn_addr()).unwrap();
    anon.send(&sn::publish(
        sn::flags(Qos::MinusOne, false, TopicType::Short),
        sn::short_id(b"a\0"),
        0,
        b"p",
    ))
    .unwrap();
    anon.assert_no_reply().unwrap();
    assert_healthy(&rig, &mut sub, "QoS -1 to short topic a\\0");

    // In a session: REGISTER "a\0b" must be refused (no reply or a REGACK rejection).
    let mut c = rig.connected("nul-topic").unwrap();
    c.send(&sn::register(77, b"a\0b")).unwrap();
    if let Some(p) = c.recv(std::time::Duration::from_secs(2)).unwrap() {
        match p {
            sn::Packet::Regack {
                msg_id: 77,
                rc,
                topic_id,
            } => {
                if rc == sn::RC_ACCEPTED {
                    c.publish(Qos::Zero, TopicType::Normal, topic_id, false, b"p")
                        .unwrap();
                }
            }
            p => panic!("REGISTER a\\0b answered with {p:?}"),
        }
    }
    let short = c.publish(
        Qos::One,
        TopicType::Short,
        sn::short_id(b"\0\0"),
        false,
        b"q",
    );
    let (_, rc) = c
        .puback(short.unwrap(), std::time::Duration::from_secs(3))
        .unwrap_or((0, 0xEE));
    assert_ne!(
        rc,
        sn::RC_ACCEPTED,
        "QoS 1 to short topic \\0\\0 was accepted"
    );
    assert_healthy(&rig, &mut sub, "REGISTER a\\0b and short \\0\\0");
}
