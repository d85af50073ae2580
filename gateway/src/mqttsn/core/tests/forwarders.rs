//! Forwarder encapsulation (spec 5.5): only a peer that may relay speaks for nodes; behind it
//! each node is a session of its own, apart from the others and from direct clients.

use crate::observe::model::RefusalReason;

use super::*;

/// The encapsulation of `packet` for node `node`.
fn encapsulated(node: &[u8], packet: &Packet<'_>) -> Vec<u8> {
    let mut buf = Vec::new();
    codec::encode_encapsulated(0, node, packet, &mut buf).unwrap();
    buf
}

/// Sends `packet` for node `node` from `from`.
fn relay(h: &mut Harness, from: &Peer, node: &[u8], packet: &Packet<'_>) {
    let buf = encapsulated(node, packet);
    h.core.handle_datagram(h.now, from.clone(), &buf);
}

/// The peer of node `node` behind `forwarder`.
fn node(forwarder: &Peer, node: &[u8]) -> Peer {
    Peer {
        node: Some(node.into()),
        ..forwarder.clone()
    }
}

/// Every datagram the core sends, as (peer, node id of the encapsulation or `None`, packet).
fn sent(h: &mut Harness) -> Vec<(Peer, Option<Vec<u8>>, Packet<'static>)> {
    h.transmits()
        .into_iter()
        .map(
            |(to, bytes)| match codec::decode(&bytes, &DecodeLimits::default()).unwrap() {
                Frame::Plain(_) => (to, None, owned(&bytes)),
                Frame::Encapsulated { node_id, .. } => {
                    let node_id = node_id.to_vec();
                    let inner = bytes.get(usize::from(bytes[0])..).unwrap().to_vec();
                    (to, Some(node_id), owned(&inner))
                }
            },
        )
        .collect()
}

fn connect(client_id: &str) -> Packet<'_> {
    Packet::Connect {
        will: false,
        clean_session: true,
        duration: 60,
        client_id,
    }
}

fn forwarder_refusals(h: &Harness) -> u64 {
    h.core.report().counters.refusals[RefusalReason::ForwarderNotAllowed as usize]
}

const CONNACK: Packet<'static> = Packet::ConnAck {
    rc: ReturnCode::Accepted,
};

#[test]
fn only_a_peer_that_may_relay_is_heard_for_its_nodes() {
    assert!(Peer::forwarder(0).addr.may_relay());
    assert!(Peer::serial(0).addr.may_relay());
    assert!(!peer(5000).addr.may_relay());
    assert_eq!(Peer::forwarder(3).to_string(), "forwarder:3");
    assert_eq!(
        node(&Peer::forwarder(3), &[0xAB]).to_string(),
        "forwarder:3 node ab"
    );
}

#[test]
fn an_encapsulation_from_a_plain_udp_source_is_dropped_and_counted() {
    let mut h = Harness::new(config());
    let spoofer = peer(5000);
    relay(&mut h, &spoofer, &[7], &connect("node-7"));
    relay(&mut h, &spoofer, &[7], &Packet::SearchGw { radius: 1 });
    assert!(h.transmits().is_empty(), "no CONNACK, no GWINFO");
    assert_eq!(h.core.session_count(), 0);
    assert_eq!(forwarder_refusals(&h), 2);
    assert_eq!(h.core.stats().malformed, 0, "well-formed, only not allowed");
    // The same source's plain packets are served as ever.
    h.connect(&spoofer, "direct", 60);
    assert_eq!(forwarder_refusals(&h), 2);
}

#[test]
fn a_spoofed_node_id_does_not_touch_the_real_nodes_session() {
    let mut h = Harness::new(config());
    let fwd = Peer::forwarder(0);
    let real = node(&fwd, &[7]);
    relay(&mut h, &fwd, &[7], &connect("node-7"));
    assert_eq!(sent(&mut h), vec![(real.clone(), Some(vec![7]), CONNACK)]);
    let (id, _) = {
        relay(
            &mut h,
            &fwd,
            &[7],
            &Packet::Register {
                topic_id: 0,
                msg_id: 1,
                topic_name: "n/7",
            },
        );
        match sent(&mut h).pop().unwrap().2 {
            Packet::RegAck { topic_id, rc, .. } => (topic_id, rc),
            other => panic!("expected REGACK, got {other:?}"),
        }
    };

    // Another source claims node 7: CONNECT (to steal the ClientId), DISCONNECT, PUBLISH.
    let spoofer = peer(5000);
    relay(&mut h, &spoofer, &[7], &connect("node-7"));
    relay(
        &mut h,
        &spoofer,
        &[7],
        &Packet::Disconnect { duration: None },
    );
    relay(
        &mut h,
        &spoofer,
        &[7],
        &publish(QoS::AtMostOnce, TopicRef::Normal(id), 0, b"forged"),
    );
    assert!(h.transmits().is_empty());
    assert!(h.events().is_empty(), "nothing forged went upstream");
    assert_eq!(forwarder_refusals(&h), 3);

    // The real node is still connected and publishes as before.
    relay(&mut h, &fwd, &[7], &Packet::PingReq { client_id: None });
    assert_eq!(
        sent(&mut h),
        vec![(real.clone(), Some(vec![7]), Packet::PingResp)]
    );
    relay(
        &mut h,
        &fwd,
        &[7],
        &publish(QoS::AtMostOnce, TopicRef::Normal(id), 0, b"real"),
    );
    let (msg, _) = single_publish(h.events());
    assert_eq!(&msg.payload[..], b"real");
    assert_eq!(msg.origin.client_id.as_deref(), Some("node-7"));
    assert_eq!(msg.origin.peer.as_deref(), Some("forwarder:0 node 07"));
}

#[test]
fn nodes_behind_forwarders_and_direct_clients_are_kept_apart() {
    let mut h = Harness::new(config());
    let fwd = Peer::forwarder(0);
    let other_fwd = Peer::forwarder(1);
    let direct = peer(1000);
    let (n1, n2) = (node(&fwd, &[1]), node(&fwd, &[2]));
    for (n, id) in [(&[1u8], "n1"), (&[2u8], "n2")] {
        relay(&mut h, &fwd, n, &connect(id));
        assert_eq!(
            sent(&mut h),
            vec![(node(&fwd, n), Some(n.to_vec()), CONNACK)]
        );
    }
    h.connect(&direct, "direct", 60);
    assert_eq!(h.core.session_count(), 3);

    // Each subscribes to its own topic.
    for (from, topic) in [(&n1, "down/n1"), (&n2, "down/n2")] {
        let sub = Packet::Subscribe {
            dup: false,
            qos: QoS::AtMostOnce,
            msg_id: 1,
            topic: SubscribeTopic::Name(topic),
        };
        relay(&mut h, &fwd, from.node.as_deref().unwrap(), &sub);
        assert!(matches!(
            sent(&mut h).as_slice(),
            [(to, _, Packet::SubAck { rc: ReturnCode::Accepted, .. })] if to == from
        ));
    }
    h.subscribe(&direct, "down/direct", QoS::AtMostOnce, 1);
    let _ = h.events();

    // Downlink for each reaches it only, encapsulated for nodes, plain for the direct client.
    for (topic, to, node_id) in [
        ("down/n1", &n1, Some(vec![1])),
        ("down/n2", &n2, Some(vec![2])),
        ("down/direct", &direct, None),
    ] {
        h.downlink(topic, b"x", Qos::AtMostOnce);
        let out = sent(&mut h);
        assert!(!out.is_empty(), "{topic}: nothing sent");
        for (peer, node, _) in &out {
            assert_eq!((peer, node), (to, &node_id), "{topic}");
        }
    }

    // The same node id behind another forwarder, or sent plain by the forwarder itself, is
    // another peer: it has no session.
    relay(
        &mut h,
        &other_fwd,
        &[1],
        &Packet::PingReq { client_id: None },
    );
    assert_eq!(
        sent(&mut h),
        vec![(
            node(&other_fwd, &[1]),
            Some(vec![1]),
            Packet::Disconnect { duration: None }
        )]
    );
    h.send(&fwd, Packet::PingReq { client_id: None });
    assert_eq!(
        sent(&mut h),
        vec![(fwd.clone(), None, Packet::Disconnect { duration: None })]
    );

    // A node ending its session leaves the others alone.
    relay(&mut h, &fwd, &[1], &Packet::Disconnect { duration: None });
    let _ = sent(&mut h);
    assert_eq!(h.core.session_count(), 2);
    relay(&mut h, &fwd, &[2], &Packet::PingReq { client_id: None });
    assert_eq!(sent(&mut h), vec![(n2, Some(vec![2]), Packet::PingResp)]);
    h.send(&direct, Packet::PingReq { client_id: None });
    assert_eq!(decode(&h.reply(&direct)), Packet::PingResp);
}

#[test]
fn searchgw_through_a_forwarder_gets_gwinfo_encapsulated_with_the_searchers_radius() {
    let mut h = Harness::new(config());
    let fwd = Peer::forwarder(0);
    let mut buf = Vec::new();
    // Encapsulation radius 0 (broadcast), SEARCHGW radius 2.
    codec::encode_encapsulated(0, &[9], &Packet::SearchGw { radius: 2 }, &mut buf).unwrap();
    h.core.handle_datagram(h.now, fwd.clone(), &buf);
    let out = h.transmits();
    assert_eq!(out.len(), 1);
    let (to, bytes) = &out[0];
    assert_eq!(to, &node(&fwd, &[9]));
    match codec::decode(bytes, &DecodeLimits::default()).unwrap() {
        Frame::Encapsulated {
            node_id,
            radius,
            packet,
        } => {
            assert_eq!((node_id, radius), (&[9u8][..], 2));
            assert_eq!(
                packet,
                Packet::GwInfo {
                    gw_id: 7,
                    gw_addr: &[]
                }
            );
        }
        Frame::Plain(p) => panic!("expected an encapsulated GWINFO, got {p:?}"),
    }
}
