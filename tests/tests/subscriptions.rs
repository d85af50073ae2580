//! Subscriptions and downlink: SUBSCRIBE / SUBACK for every topic id type, UNSUBSCRIBE, the
//! upstream subscription union (observed in the broker's log), QoS = min(subscription,
//! message), REGISTER before the first PUBLISH on a wildcard match (and a rejecting REGACK),
//! retained messages, and the PyPI mqtt-sn-12 client (library and `mqtt_sn_sub` CLI) receiving
//! downlink. Downlink is injected with paho-mqtt (`tests/py/pub.py`).
//!
//! "Nothing was sent" is proven with a [`Marker`]: messages published before the marker have
//! been handled by the gateway once the marker arrives; then [`SnClient::assert_no_reply`]
//! shows nothing is pending for the client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, Packet, Qos, SubTopic, TopicType};
use sensorgate_tests::{
    DELIVERY_TIMEOUT, GATEWAY_ID, Marker, PREDEFINED_ID, PREDEFINED_TOPIC, REPLY_TIMEOUT, Rig,
    Script, SubAck, UpMsg, await_live, is_probe, publish_upstream, venv_script,
};

/// The gateway's client id at the broker: `sensorgate-<gateway.id>-<upstream name>`.
fn upstream_id() -> String {
    format!("sensorgate-{GATEWAY_ID}-local")
}

/// A broker log line `<time>: <client> <qos> <filter>` for the gateway's SUBSCRIBE of `filter`.
fn is_upstream_subscribe(line: &str, filter: &str) -> bool {
    let t: Vec<&str> = line.split_whitespace().collect();
    t.len() == 4 && t[1] == upstream_id() && t[3] == filter
}

/// A broker log line `<time>: <client> <filter>` for the gateway's UNSUBSCRIBE of `filter`.
fn is_upstream_unsubscribe(line: &str, filter: &str) -> bool {
    let t: Vec<&str> = line.split_whitespace().collect();
    t.len() == 3 && t[1] == upstream_id() && t[2] == filter
}

#[test]
fn suback_carries_the_granted_qos_and_the_topic_id_for_every_topic_type() {
    let rig = Rig::start_with(|c| {
        c.mqttsn("max_subscriptions_per_client = 5");
        Ok(())
    })
    .unwrap();
    let mut c = rig.connected("subacks").unwrap();

    // A wildcard filter, exact bytes: 08 13 Flags(QoS 1) TopicId(0) MsgId rc.
    let m = c.msg_id();
    c.send(&sn::subscribe(Qos::One, m, &SubTopic::Name("sa/+/x")))
        .unwrap();
    let [hi, lo] = m.to_be_bytes();
    c.expect_raw("SUBACK", &[0x08, sn::SUBACK, 0x20, 0, 0, hi, lo, 0])
        .unwrap();

    // A concrete name at QoS 2: granted 2, a registered id, the one REGISTER gives too.
    let ack = c.subscribe(Qos::Two, SubTopic::Name("sa/exact")).unwrap();
    assert_eq!((ack.qos, ack.rc), (Qos::Two, sn::RC_ACCEPTED), "{ack:?}");
    assert!(
        ack.topic_id != 0 && ack.topic_id != 0xFFFF && ack.topic_id != PREDEFINED_ID,
        "{ack:?}"
    );
    assert_eq!(c.register("sa/exact").unwrap(), ack.topic_id);

    // A predefined id at QoS 0: the id itself.
    assert_eq!(
        c.subscribe(Qos::Zero, SubTopic::Predefined(PREDEFINED_ID))
            .unwrap(),
        SubAck {
            qos: Qos::Zero,
            topic_id: PREDEFINED_ID,
            rc: sn::RC_ACCEPTED
        }
    );

    // A short topic name: accepted at QoS 1 (its id is "not relevant" per the spec; the
    // gateway sends the short id).
    let ack = c.subscribe(Qos::One, SubTopic::Short(*b"sh")).unwrap();
    assert_eq!((ack.qos, ack.rc), (Qos::One, sn::RC_ACCEPTED), "{ack:?}");
    assert_eq!(ack.topic_id, sn::short_id(b"sh"));

    // An unknown predefined id: rejected, invalid topic id.
    let ack = c.subscribe(Qos::One, SubTopic::Predefined(0x4242)).unwrap();
    assert_eq!(ack.rc, sn::RC_INVALID_TOPIC, "{ack:?}");

    // Not a valid MQTT filter: rejected.
    for bad in ["sa/#/x", "sa/x+"] {
        let ack = c.subscribe(Qos::One, SubTopic::Name(bad)).unwrap();
        assert_ne!(ack.rc, sn::RC_ACCEPTED, "{bad}: {ack:?}");
    }

    // Four held; the fifth fits, the sixth is refused with congestion.
    assert_eq!(
        c.subscribe(Qos::One, SubTopic::Name("sa/five")).unwrap().rc,
        sn::RC_ACCEPTED
    );
    assert_eq!(
        c.subscribe(Qos::One, SubTopic::Name("sa/six")).unwrap().rc,
        sn::RC_CONGESTION
    );
    // Subscribing again to a held filter is no new subscription; it changes the QoS.
    let ack = c.subscribe(Qos::Zero, SubTopic::Name("sa/+/x")).unwrap();
    assert_eq!(
        ack,
        SubAck {
            qos: Qos::Zero,
            topic_id: 0,
            rc: sn::RC_ACCEPTED
        }
    );
    // Unsubscribing frees a place.
    c.unsubscribe(SubTopic::Name("sa/five")).unwrap();
    assert_eq!(
        c.subscribe(Qos::One, SubTopic::Name("sa/six")).unwrap().rc,
        sn::RC_ACCEPTED
    );
}

#[test]
fn downlink_qos_is_the_minimum_of_subscription_and_message() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut c = rig.connected("qos-min").unwrap();
    for s in 0..3u8 {
        let filter = format!("qm/{s}/+");
        c.subscribe_ok(Qos::from_level(s), SubTopic::Name(&filter))
            .unwrap();
        await_live(&mut c, port, &format!("qm/{s}/probe")).unwrap();
    }
    let mut msgs = Vec::new();
    for s in 0..3u8 {
        for m in 0..3u8 {
            msgs.push(UpMsg::new(&format!("qm/{s}/m{m}"), format!("s{s}m{m}"), m));
        }
    }
    publish_upstream(port, &msgs).unwrap();
    let got: BTreeMap<String, _> = c
        .downlink(9, DELIVERY_TIMEOUT)
        .unwrap()
        .into_iter()
        .filter(|d| !is_probe(d))
        .map(|d| (d.text(), d))
        .collect();
    assert_eq!(got.len(), 9, "{got:?}");
    for s in 0..3u8 {
        for m in 0..3u8 {
            let d = &got[&format!("s{s}m{m}")];
            assert_eq!(d.qos.level(), s.min(m), "sub {s}, msg {m}: {d:?}");
            assert_eq!(d.topic.as_deref(), Some(format!("qm/{s}/m{m}").as_str()));
            assert_eq!(d.topic_type, TopicType::Normal);
            assert!(!d.retain && !d.dup, "{d:?}");
            if d.qos == Qos::Zero {
                assert_eq!(d.msg_id, 0, "QoS 0 PUBLISH carries MsgId 0: {d:?}");
            } else {
                assert_ne!(d.msg_id, 0, "{d:?}");
            }
        }
    }
}

#[test]
fn wildcard_match_is_registered_before_publish_and_a_rejecting_regack_stops_the_topic() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "reg").unwrap();
    let mut c = rig.connected("reg-client").unwrap();
    assert_eq!(c.subscribe_ok(Qos::One, SubTopic::Name("rg/#")).unwrap(), 0);
    await_live(&mut c, port, "rg/probe").unwrap();

    publish_upstream(port, &[UpMsg::new("rg/a", "a1", 1)]).unwrap();
    let (topic_id, reg_msg_id) = match c.next_packet().unwrap() {
        Packet::Register {
            topic_id,
            msg_id,
            name,
        } => {
            assert_eq!(name, "rg/a");
            (topic_id, msg_id)
        }
        p => panic!("expected REGISTER for rg/a, got {p:?}"),
    };
    assert!(
        topic_id != 0 && topic_id != 0xFFFF && topic_id != PREDEFINED_ID,
        "REGISTER topic id {topic_id:#06x} (0, 0xFFFF and predefined ids are taken)"
    );
    assert_ne!(reg_msg_id, 0);
    // Nothing before the REGACK.
    c.assert_no_reply().unwrap();
    c.send(&sn::regack(topic_id, reg_msg_id, sn::RC_ACCEPTED))
        .unwrap();
    match c.next_packet().unwrap() {
        Packet::Publish {
            flags,
            topic_id: t,
            msg_id,
            data,
        } => {
            assert_eq!(flags, 0x20, "QoS 1, normal topic id, no DUP/retain");
            assert_eq!((t, &data[..]), (topic_id, &b"a1"[..]));
            assert_ne!(msg_id, 0);
            c.send(&sn::puback(t, msg_id, sn::RC_ACCEPTED)).unwrap();
        }
        p => panic!("expected PUBLISH a1, got {p:?}"),
    }

    // Registered now: the next message on rg/a comes without REGISTER.
    publish_upstream(port, &[UpMsg::new("rg/a", "a2", 1)]).unwrap();
    match c.next_packet().unwrap() {
        Packet::Publish {
            topic_id: t,
            msg_id,
            data,
            ..
        } => {
            assert_eq!((t, &data[..]), (topic_id, &b"a2"[..]));
            c.send(&sn::puback(t, msg_id, sn::RC_ACCEPTED)).unwrap();
        }
        p => panic!("expected PUBLISH a2 without REGISTER, got {p:?}"),
    }

    // rg/b is refused by the client: neither b1 nor b2 is delivered, a3 still is.
    publish_upstream(
        port,
        &[
            UpMsg::new("rg/b", "b1", 1),
            UpMsg::new("rg/b", "b2", 1),
            UpMsg::new("rg/a", "a3", 1),
        ],
    )
    .unwrap();
    match c.next_packet().unwrap() {
        Packet::Register {
            topic_id: b_id,
            msg_id,
            name,
        } => {
            assert_eq!(name, "rg/b");
            assert_ne!(b_id, topic_id, "two topics, one id");
            c.send(&sn::regack(b_id, msg_id, sn::RC_NOT_SUPPORTED))
                .unwrap();
        }
        p => panic!("expected REGISTER for rg/b, got {p:?}"),
    }
    match c.next_packet().unwrap() {
        Packet::Publish {
            topic_id: t,
            msg_id,
            data,
            ..
        } => {
            assert_eq!(
                (t, String::from_utf8_lossy(&data).as_ref()),
                (topic_id, "a3"),
                "after the rejected REGACK only rg/a is delivered"
            );
            c.send(&sn::puback(t, msg_id, sn::RC_ACCEPTED)).unwrap();
        }
        p => panic!("expected PUBLISH a3, got {p:?}"),
    }
    // Later messages on rg/b stay stopped for this client.
    marker.publish(&[UpMsg::new("rg/b", "b3", 1)]).unwrap();
    c.assert_no_reply().unwrap();
}

#[test]
fn unsubscribe_stops_downlink_and_the_last_client_leaving_unsubscribes_upstream() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "unsub").unwrap();
    let mut a = rig.connected("un-a").unwrap();
    let mut b = rig.connected("un-b").unwrap();
    a.subscribe_ok(Qos::One, SubTopic::Name("un/#")).unwrap();
    b.subscribe_ok(Qos::One, SubTopic::Name("un/#")).unwrap();
    await_live(&mut a, port, "un/probe").unwrap();
    assert!(is_probe(&b.downlink(1, DELIVERY_TIMEOUT).unwrap()[0]));

    // One upstream subscription for both clients.
    rig.broker
        .wait_log("the upstream SUBSCRIBE of un/#", REPLY_TIMEOUT, |l| {
            is_upstream_subscribe(l, "un/#")
        })
        .unwrap();

    // A leaves (UNSUBACK 04 15 MsgId): B still receives, A does not.
    let m = a.msg_id();
    a.send(&sn::unsubscribe(m, &SubTopic::Name("un/#")))
        .unwrap();
    let [hi, lo] = m.to_be_bytes();
    a.expect_raw("UNSUBACK", &[0x04, sn::UNSUBACK, hi, lo])
        .unwrap();
    marker.publish(&[UpMsg::new("un/x", "after-a", 1)]).unwrap();
    let got = b.downlink(1, DELIVERY_TIMEOUT).unwrap();
    assert_eq!(got[0].text(), "after-a");
    a.assert_no_reply().unwrap();
    let log = rig.broker.log();
    assert_eq!(
        log.lines()
            .filter(|l| is_upstream_subscribe(l, "un/#"))
            .count(),
        1,
        "the union holds un/# once:\n{log}"
    );
    assert!(
        !log.lines().any(|l| is_upstream_unsubscribe(l, "un/#")),
        "un/# was unsubscribed upstream while B still holds it:\n{log}"
    );

    // B leaves too: the gateway unsubscribes upstream, and nobody receives.
    b.unsubscribe(SubTopic::Name("un/#")).unwrap();
    rig.broker
        .wait_log("the upstream UNSUBSCRIBE of un/#", DELIVERY_TIMEOUT, |l| {
            is_upstream_unsubscribe(l, "un/#")
        })
        .unwrap();
    marker.publish(&[UpMsg::new("un/y", "after-b", 1)]).unwrap();
    a.assert_no_reply().unwrap();
    b.assert_no_reply().unwrap();
}

#[test]
fn predefined_and_short_subscriptions_receive_downlink_and_unsubscribe() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "ps").unwrap();
    let mut c = rig.connected("pre-short").unwrap();
    c.subscribe_ok(Qos::One, SubTopic::Predefined(PREDEFINED_ID))
        .unwrap();
    c.subscribe_ok(Qos::One, SubTopic::Short(*b"ps")).unwrap();
    await_live(&mut c, port, PREDEFINED_TOPIC).unwrap();
    await_live(&mut c, port, "ps").unwrap();

    publish_upstream(
        port,
        &[
            UpMsg::new(PREDEFINED_TOPIC, "to-predefined", 1),
            UpMsg::new("ps", "to-short", 1),
        ],
    )
    .unwrap();
    let got = c.downlink(2, DELIVERY_TIMEOUT).unwrap();
    let pre = got.iter().find(|d| d.text() == "to-predefined").unwrap();
    assert_eq!(
        (pre.topic_type, pre.topic_id, pre.qos),
        (TopicType::Predefined, PREDEFINED_ID, Qos::One),
        "{pre:?}"
    );
    let short = got.iter().find(|d| d.text() == "to-short").unwrap();
    assert_eq!(
        (short.topic_type, short.topic_id, short.qos),
        (TopicType::Short, sn::short_id(b"ps"), Qos::One),
        "{short:?}"
    );

    c.unsubscribe(SubTopic::Predefined(PREDEFINED_ID)).unwrap();
    c.unsubscribe(SubTopic::Short(*b"ps")).unwrap();
    for filter in [PREDEFINED_TOPIC, "ps"] {
        rig.broker
            .wait_log("the upstream UNSUBSCRIBE", DELIVERY_TIMEOUT, |l| {
                is_upstream_unsubscribe(l, filter)
            })
            .unwrap();
    }
    marker
        .publish(&[
            UpMsg::new(PREDEFINED_TOPIC, "late", 1),
            UpMsg::new("ps", "late", 1),
        ])
        .unwrap();
    c.assert_no_reply().unwrap();
}

#[test]
fn retained_messages_reach_new_subscribers_through_the_broker_and_the_cache() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    publish_upstream(
        port,
        &[
            UpMsg::retained("rt/a", "ra", 1),
            UpMsg::retained("rt/b/c", "rbc", 0),
        ],
    )
    .unwrap();

    // The first subscriber: the broker sends the retained messages on the new upstream
    // subscription.
    let mut a = rig.connected("ret-a").unwrap();
    a.subscribe_ok(Qos::One, SubTopic::Name("rt/#")).unwrap();
    let check = |got: &[sensorgate_tests::Delivery], who: &str| {
        let by: BTreeMap<String, _> = got.iter().map(|d| (d.text(), d)).collect();
        assert_eq!(by.len(), 2, "{who}: {got:?}");
        let ra = by["ra"];
        assert!(ra.retain, "{who}: {ra:?}");
        assert_eq!(
            (ra.topic.as_deref(), ra.qos),
            (Some("rt/a"), Qos::One),
            "{who}"
        );
        let rbc = by["rbc"];
        assert!(rbc.retain, "{who}: {rbc:?}");
        assert_eq!(
            (rbc.topic.as_deref(), rbc.qos),
            (Some("rt/b/c"), Qos::Zero),
            "{who}"
        );
    };
    check(
        &a.downlink(2, DELIVERY_TIMEOUT).unwrap(),
        "first subscriber",
    );

    // A later subscriber of the same filter: the upstream subscription exists already, so
    // these come from the gateway's retained cache.
    let mut b = rig.connected("ret-b").unwrap();
    b.subscribe_ok(Qos::One, SubTopic::Name("rt/#")).unwrap();
    check(
        &b.downlink(2, DELIVERY_TIMEOUT).unwrap(),
        "second subscriber",
    );

    // A live message that is not retained arrives without the flag.
    publish_upstream(port, &[UpMsg::new("rt/a", "live", 1)]).unwrap();
    for (who, c) in [("first", &mut a), ("second", &mut b)] {
        let got = c.downlink(1, DELIVERY_TIMEOUT).unwrap();
        assert_eq!(
            (got[0].text(), got[0].retain),
            ("live".to_owned(), false),
            "{who} subscriber"
        );
    }

    // A concrete subscription at QoS 0 gets the QoS 1 retained message at QoS 0, on the
    // topic id its SUBACK gave.
    let mut c = rig.connected("ret-c").unwrap();
    let id = c.subscribe_ok(Qos::Zero, SubTopic::Name("rt/a")).unwrap();
    let got = c.downlink(1, DELIVERY_TIMEOUT).unwrap();
    assert_eq!(
        (got[0].topic_id, got[0].qos, got[0].retain, got[0].text()),
        (id, Qos::Zero, true, "ra".to_owned())
    );
}

#[test]
fn a_new_filter_does_not_replay_retained_messages_to_existing_subscribers() {
    // The broker answers the gateway's SUBSCRIBE of a new filter with the matching retained
    // messages; those are for the new subscriber only. A client already subscribed (to a
    // covering filter) got them when it subscribed and must not get them again.
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut marker = Marker::for_rig(&rig, "replay").unwrap();
    publish_upstream(port, &[UpMsg::retained("rp/a", "once", 1)]).unwrap();
    let mut a = rig.connected("rp-a").unwrap();
    a.subscribe_ok(Qos::One, SubTopic::Name("rp/#")).unwrap();
    let got = a.downlink(1, DELIVERY_TIMEOUT).unwrap();
    assert_eq!((got[0].text(), got[0].retain), ("once".to_owned(), true));

    let mut b = rig.connected("rp-b").unwrap();
    b.subscribe_ok(Qos::One, SubTopic::Name("rp/a")).unwrap();
    let got = b.downlink(1, DELIVERY_TIMEOUT).unwrap();
    assert_eq!((got[0].text(), got[0].retain), ("once".to_owned(), true));
    // The broker's replay for B's new upstream filter has been handled once the marker
    // (published after it) arrived: neither A nor B may have another copy pending.
    marker.sync().unwrap();
    let a_again = a.assert_no_reply().err().map(|e| format!("{e:#}"));
    let b_again = b.assert_no_reply().err().map(|e| format!("{e:#}"));
    assert!(
        a_again.is_none() && b_again.is_none(),
        "retained message replayed: to rp-a (already subscribed to rp/#) when rp-b subscribed: \
         {a_again:?}; to rp-b a second time: {b_again:?}"
    );
}

#[test]
fn mqtt_sn_12_client_receives_downlink_on_names_short_and_predefined_topics() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let args: Vec<String> = [
        "--port",
        &rig.gateway.sn_addr().port().to_string(),
        "--client-id",
        "py-sub",
        "--sub",
        "1:name:pyd/+/t",
        "--sub",
        "1:name:pyd/exact",
        "--sub",
        "1:name:py",
        "--sub",
        &format!("1:predefined:{PREDEFINED_ID}"),
        "--count",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sub = Script::python("sn_sub.py", &args).unwrap();
    let subscribed = sub
        .expect_line("SUBSCRIBED", REPLY_TIMEOUT * 2, |l| {
            l.starts_with("SUBSCRIBED")
        })
        .unwrap();
    // The concrete name got a topic id in its SUBACK.
    let ids: Vec<&str> = subscribed.split_whitespace().skip(1).collect();
    assert!(
        ids[1].parse::<u16>().is_ok_and(|id| id != 0),
        "{subscribed}"
    );

    // The upstream subscriptions follow the SUBACKs: publish (bounded) until all four
    // payloads arrived, each once per round at most.
    let want = [
        ("pyd/x/t", "via-wildcard"),
        ("pyd/exact", "via-name"),
        ("py", "via-short"),
        (PREDEFINED_TOPIC, "via-predefined"),
    ];
    let mut seen: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let deadline = Instant::now() + DELIVERY_TIMEOUT * 2;
    for _round in 0..20 {
        if seen.len() == want.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mqtt-sn-12 received only {seen:?}"
        );
        let msgs: Vec<UpMsg> = want
            .iter()
            .filter(|(_, p)| !seen.contains_key(*p))
            .map(|(t, p)| UpMsg::new(t, p, 1))
            .collect();
        publish_upstream(port, &msgs).unwrap();
        let round = Instant::now() + Duration::from_secs(3);
        for _ in 0..100 {
            if seen.len() == want.len() || Instant::now() >= round {
                break;
            }
            let Some(line) = sub
                .line(round.saturating_duration_since(Instant::now()))
                .unwrap()
            else {
                break;
            };
            assert!(!line.starts_with("ERROR"), "{line}\n{}", sub.stderr());
            if line.starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let payload = hex_text(v["payload_hex"].as_str().unwrap());
                seen.insert(payload, v);
            }
        }
    }
    assert_eq!(seen.len(), want.len(), "mqtt-sn-12 received only {seen:?}");
    let wildcard = &seen["via-wildcard"];
    assert_eq!(wildcard["name"], "pyd/x/t", "REGISTERed name: {wildcard}");
    assert_eq!(
        (wildcard["topic_type"].as_u64(), wildcard["qos"].as_u64()),
        (Some(0), Some(1))
    );
    let name = &seen["via-name"];
    assert_eq!(name["name"], "pyd/exact", "{name}");
    assert_eq!(name["topic_id"].as_u64(), ids[1].parse::<u64>().ok());
    let short = &seen["via-short"];
    assert_eq!(
        (short["topic_type"].as_u64(), short["topic_id"].as_u64()),
        (Some(2), Some(u64::from(sn::short_id(b"py"))))
    );
    let pre = &seen["via-predefined"];
    assert_eq!(
        (pre["topic_type"].as_u64(), pre["topic_id"].as_u64()),
        (Some(1), Some(u64::from(PREDEFINED_ID)))
    );
    // Then it unsubscribes everything through the library and disconnects.
    for _ in 0..4 {
        sub.expect_line("UNSUBSCRIBED", REPLY_TIMEOUT * 2, |l| l == "UNSUBSCRIBED")
            .unwrap();
    }
    let status = sub.wait_exit(REPLY_TIMEOUT * 2).unwrap();
    assert!(status.success(), "{status}: {}", sub.stderr());
}

#[test]
fn mqtt_sn_sub_cli_receives_one_registered_downlink_message() {
    let rig = Rig::start().unwrap();
    let port = rig.broker.port();
    let mut cmd = std::process::Command::new(sensorgate_tests::python());
    cmd.arg(venv_script("mqtt_sn_sub"))
        .args(["-h", "127.0.0.1", "-p"])
        .arg(rig.gateway.sn_addr().port().to_string())
        .args(["-i", "cli-sub", "-t", "cli/+/v", "-q", "1", "-1"])
        .args(["--timeout", "10"]);
    let mut sub = Script::spawn("mqtt_sn_sub", &mut cmd).unwrap();
    // It exits after the first message; publish until it has one (its SUBSCRIBE and the
    // upstream subscription race with the first publishes).
    let deadline = Instant::now() + DELIVERY_TIMEOUT * 2;
    let mut line = None;
    for _round in 0..30 {
        assert!(
            Instant::now() < deadline,
            "mqtt_sn_sub printed nothing: {}",
            sub.stderr()
        );
        publish_upstream(port, &[UpMsg::new("cli/a/v", "to-the-cli", 1)]).unwrap();
        if let Some(l) = sub.line(Duration::from_secs(1)).unwrap() {
            line = Some(l);
            break;
        }
    }
    assert_eq!(line.as_deref(), Some("to-the-cli"));
    let status = sub.wait_exit(REPLY_TIMEOUT * 3).unwrap();
    assert!(status.success(), "{status}: {}", sub.stderr());
}

fn hex_text(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn overlapping_filters_of_different_clients_deliver_one_copy_to_each() {
    // A holds dup/#, B holds dup/t: the gateway's upstream connection holds both filters and
    // the broker sends it one copy per matching filter. Each client has one matching
    // subscription and must get the message once.
    let rig = Rig::start().unwrap();
    let mut marker = Marker::for_rig(&rig, "overlap").unwrap();
    let mut a = rig.connected("ov-a").unwrap();
    let mut b = rig.connected("ov-b").unwrap();
    a.subscribe_ok(Qos::One, SubTopic::Name("dup/#")).unwrap();
    b.subscribe_ok(Qos::One, SubTopic::Name("dup/t")).unwrap();
    for filter in ["dup/#", "dup/t"] {
        rig.broker
            .wait_log("the upstream SUBSCRIBE", DELIVERY_TIMEOUT, |l| {
                is_upstream_subscribe(l, filter)
            })
            .unwrap();
    }
    marker.publish(&[UpMsg::new("dup/t", "once", 1)]).unwrap();
    let mut copies = Vec::new();
    for (who, c) in [("ov-a (dup/#)", &mut a), ("ov-b (dup/t)", &mut b)] {
        let got = c.downlink(1, DELIVERY_TIMEOUT).unwrap();
        assert_eq!(got[0].text(), "once", "{who}");
        if let Err(e) = c.assert_no_reply() {
            copies.push(format!("{who}: {e:#}"));
        }
    }
    assert!(
        copies.is_empty(),
        "a message matching two clients' different filters was delivered twice: {copies:?}"
    );
}

/// With `max_retained = limit`: retained rm/a and rm/b reach a first subscriber of rm/# (from
/// the broker); returns what a second subscriber of rm/# (served by the cache alone) gets.
fn retained_cache_with(limit: u32) -> Vec<String> {
    let rig = Rig::start_with(|c| {
        c.mqttsn(&format!("max_retained = {limit}"));
        Ok(())
    })
    .unwrap();
    let port = rig.broker.port();
    publish_upstream(
        port,
        &[
            UpMsg::retained("rm/a", "ra", 1),
            UpMsg::retained("rm/b", "rb", 1),
        ],
    )
    .unwrap();
    let mut first = rig.connected("rm-first").unwrap();
    first
        .subscribe_ok(Qos::One, SubTopic::Name("rm/#"))
        .unwrap();
    let mut got: Vec<String> = first
        .downlink(2, DELIVERY_TIMEOUT)
        .unwrap()
        .iter()
        .map(|d| d.text())
        .collect();
    got.sort();
    assert_eq!(got, vec!["ra", "rb"], "from the broker");
    let mut second = rig.connected("rm-second").unwrap();
    let m = second.msg_id();
    second
        .send(&sn::subscribe(Qos::One, m, &SubTopic::Name("rm/#")))
        .unwrap();
    let (early, _) = second
        .downlink_until(
            "SUBACK",
            REPLY_TIMEOUT,
            |p| matches!(p, Packet::Suback { msg_id, rc: 0, .. } if *msg_id == m),
        )
        .unwrap();
    assert!(early.is_empty(), "downlink before SUBACK: {early:?}");
    // Whatever the cache holds was queued with the SUBACK.
    let got = second.drain_pending().unwrap();
    assert!(got.iter().all(|d| d.retain), "{got:?}");
    got.iter().map(|d| d.text()).collect()
}

#[test]
fn max_retained_bounds_the_retained_cache_and_zero_disables_it() {
    assert_eq!(
        retained_cache_with(0),
        Vec::<String>::new(),
        "max_retained = 0"
    );
    let one = retained_cache_with(1);
    assert_eq!(one.len(), 1, "max_retained = 1: {one:?}");
}
