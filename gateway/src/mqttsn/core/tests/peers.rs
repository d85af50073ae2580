//! Peers of any transport: the core keys and answers them by their opaque address, the same
//! whether it names a UDP socket or a serial line.

use super::*;

#[test]
fn a_serial_peer_is_served_like_a_udp_peer_and_kept_apart_from_it() {
    let mut h = Harness::new(config());
    let line = Peer::serial(0);
    let udp = peer(1000);
    h.connect(&line, "alice", 60);
    h.connect(&udp, "bob", 60);
    let (id, _) = h.register(&line, "a/b", 1);
    h.send(
        &line,
        publish(QoS::AtLeastOnce, TopicRef::Normal(id), 9, b"x"),
    );
    let (msg, token) = single_publish(h.events());
    assert_eq!(msg.topic, "a/b");
    h.core
        .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Accepted);
    // The PUBACK goes to the line, not to the UDP peer.
    assert_eq!(
        decode(&h.reply(&line)),
        Packet::PubAck {
            topic_id: id,
            msg_id: 9,
            rc: ReturnCode::Accepted
        }
    );
    // Another line is another address: no session there.
    let other = Peer::serial(1);
    h.send(&other, Packet::PingReq { client_id: None });
    assert_eq!(
        decode(&h.reply(&other)),
        Packet::Disconnect { duration: None }
    );
}

#[test]
fn a_session_moves_between_transports_by_its_client_id() {
    let mut h = Harness::new(config());
    let line = Peer::serial(3);
    let udp = peer(1000);
    h.connect(&line, "alice", 60);
    h.connect(&udp, "alice", 60);
    // The line lost its binding: it cannot act on alice's session any more.
    h.send(&line, Packet::PingReq { client_id: None });
    assert_eq!(
        decode(&h.reply(&line)),
        Packet::Disconnect { duration: None }
    );
    h.send(&udp, Packet::PingReq { client_id: None });
    assert_eq!(decode(&h.reply(&udp)), Packet::PingResp);
}

#[test]
fn a_forwarder_on_a_serial_line_gets_its_clients_answers_encapsulated() {
    let mut h = Harness::new(config());
    let line = Peer::serial(0);
    let connect = Packet::Connect {
        will: false,
        clean_session: true,
        duration: 60,
        client_id: "node-7",
    };
    let mut buf = Vec::new();
    codec::encode_encapsulated(0, &[7], &connect, &mut buf).unwrap();
    h.core.handle_datagram(h.now, line.clone(), &buf);
    let node = Peer {
        node: Some(Box::from([7u8])),
        ..line
    };
    let bytes = h.reply(&node);
    match codec::decode(&bytes, &DecodeLimits::default()).unwrap() {
        Frame::Encapsulated {
            node_id, packet, ..
        } => {
            assert_eq!(node_id, [7]);
            assert_eq!(
                packet,
                Packet::ConnAck {
                    rc: ReturnCode::Accepted
                }
            );
        }
        Frame::Plain(p) => panic!("expected an encapsulated CONNACK, got {p:?}"),
    }
    assert_eq!(node.to_string(), "serial:0 node 07");
}
