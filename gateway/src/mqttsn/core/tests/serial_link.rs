//! A slow link's delay (`Core::set_link_delay`) stretches downlink retransmissions toward it
//! and only toward it.

use super::*;

#[test]
fn retransmission_toward_a_slow_link_waits_the_retry_interval_plus_its_delay() {
    let mut h = Harness::new(config());
    let (serial, udp) = (Peer::serial(0), peer(1));
    h.core
        .set_link_delay(PeerAddr::Serial { line: 0 }, Duration::from_secs(25));
    for (p, id) in [(&serial, "on-serial"), (&udp, "on-udp")] {
        h.connect(p, id, 600);
        h.subscribe(p, "cmd", QoS::AtLeastOnce, 1);
    }
    h.downlink("cmd", b"go", Qos::AtLeastOnce);
    let first = h.transmits();
    assert_eq!(first.len(), 2, "{first:?}");

    // retry_interval (10 s): only the UDP client gets its DUP.
    h.advance(Duration::from_secs(10));
    let resent: Vec<(Peer, bool)> = h
        .transmits()
        .into_iter()
        .map(|(p, bytes)| {
            (
                p,
                matches!(decode(&bytes), Packet::Publish { dup: true, .. }),
            )
        })
        .collect();
    assert_eq!(resent, [(udp.clone(), true)]);

    // Just before 10 s + 25 s nothing for the serial client; then its DUP.
    h.advance(Duration::from_secs(24));
    assert!(h.transmits().iter().all(|(p, _)| *p != serial));
    h.advance(Duration::from_secs(1));
    let to_serial: Vec<bool> = h
        .transmits()
        .into_iter()
        .filter(|(p, _)| *p == serial)
        .map(|(_, bytes)| matches!(decode(&bytes), Packet::Publish { dup: true, .. }))
        .collect();
    assert_eq!(to_serial, [true]);
}

#[test]
fn a_zero_delay_removes_it() {
    let mut h = Harness::new(config());
    let serial = Peer::serial(3);
    let addr = PeerAddr::Serial { line: 3 };
    h.core.set_link_delay(addr.clone(), Duration::from_secs(25));
    h.core.set_link_delay(addr, Duration::ZERO);
    h.connect(&serial, "s", 600);
    h.subscribe(&serial, "cmd", QoS::AtLeastOnce, 1);
    h.downlink("cmd", b"go", Qos::AtLeastOnce);
    assert_eq!(h.transmits().len(), 1);
    h.advance(Duration::from_secs(10));
    let resent = h.transmits();
    assert_eq!(resent.len(), 1, "{resent:?}");
    assert!(matches!(
        decode(&resent[0].1),
        Packet::Publish { dup: true, .. }
    ));
}
