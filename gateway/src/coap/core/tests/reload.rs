//! Live reconfiguration ([`Core::reconfigure`]): peers, observations, pending verdicts and
//! uploads survive; lowered limits apply to what comes next; the invariants hold with them.

use super::*;

#[test]
fn reconfigure_keeps_observations_and_exchanges_and_lowered_limits_apply_next() {
    let start = CoreConfig {
        max_observers_per_peer: 2,
        max_observers: 3,
        max_filters: 3,
        ..test_config()
    };
    let mut h = Harness::new(start.clone());
    h.observe(1, 1, b"a", "/ps/t");
    h.observe(1, 2, b"b", "/ps/u");
    let _ = h.events();
    // Peer 2 waits for the spool's verdict on a CON PUT.
    h.send(2, &request(CON, PUT, 7, b"p", "/ps/x", &[], b"1"));
    let (_, token) = h.publish_token();
    // Peer 3 has a Block1 upload in progress.
    h.send(
        3,
        &request(
            CON,
            PUT,
            9,
            b"u",
            "/ps/big",
            &[block1(0, true, 0)],
            &[b'x'; 16],
        ),
    );
    assert_eq!(h.one(3).code, Code::CONTINUE);

    let notes = h.core.reconfigure(
        h.now,
        CoreConfig {
            max_observers_per_peer: 1,
            max_observers: 1,
            max_filters: 1,
            max_peers: 2,
            ..test_config()
        },
    );
    h.core.check_invariants();
    let keys: Vec<&str> = notes
        .iter()
        .map(|n| n.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "max_peers",
            "max_observers",
            "max_filters",
            "max_observers_per_peer"
        ],
        "{notes:?}"
    );
    assert!(
        h.out().is_empty() && h.events().is_empty(),
        "nothing released"
    );
    assert_eq!((h.core.stats().peers, h.core.stats().observers), (3, 2));

    // Both observations still notify.
    assert_eq!(h.downlink("t", b"t1", Qos::AtMostOnce), 1);
    assert_eq!(h.downlink("u", b"u1", Qos::AtMostOnce), 1);
    let notified: Vec<Vec<u8>> = h.out().into_iter().map(|(_, m)| m.payload).collect();
    assert_eq!(notified, [b"t1".to_vec(), b"u1".to_vec()]);
    // The pending verdict is answered as before.
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    let m = h.one(2);
    assert_eq!(
        (m.ty, m.code, m.message_id),
        (MessageType::Ack, Code::CHANGED, 7)
    );
    // The upload completes.
    h.send(
        3,
        &request(
            CON,
            PUT,
            10,
            b"u",
            "/ps/big",
            &[block1(1, false, 0)],
            b"end",
        ),
    );
    let (message, token) = h.publish_token();
    assert_eq!(message.payload.len(), 19);
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    assert_eq!(h.one(3).code, Code::CHANGED);
    // A new observation is refused (every observation limit is below the count).
    h.send(
        2,
        &request(CON, GET, 11, b"c", "/ps/t", &[(6, vec![])], b""),
    );
    assert_eq!(h.one(2).code, Code::SERVICE_UNAVAILABLE);
    assert!(h.events().is_empty());
    // A new peer comes in only in place of an idle one: the table does not grow.
    h.advance(Duration::from_secs(1));
    h.send(4, &request(CON, PUT, 1, b"n", "/ps/n?qos=0", &[], b"1"));
    assert_eq!(h.one(4).code, Code::CHANGED);
    assert_eq!(h.core.stats().peers, 3);
    assert_eq!(h.core.stats().peers_evicted, 1);

    // Raised again: a registration is taken.
    assert!(h.core.reconfigure(h.now, start).is_empty());
    h.core.check_invariants();
    h.observe(2, 12, b"d", "/ps/w");
    assert_eq!(h.core.stats().observers, 3);
}

#[test]
fn an_observer_ping_interval_turned_on_is_armed_for_existing_observers() {
    let mut h = Harness::new(CoreConfig {
        observer_ping_interval: Duration::ZERO,
        ..test_config()
    });
    h.observe(1, 1, b"a", "/ps/t");
    let _ = h.events();
    h.advance(Duration::from_secs(1000));
    assert!(h.out().is_empty(), "no pings while off");
    h.core.reconfigure(
        h.now,
        CoreConfig {
            observer_ping_interval: Duration::from_secs(100),
            ..test_config()
        },
    );
    h.core.check_invariants();
    h.advance(Duration::from_secs(100));
    let m = h.one(1);
    assert_eq!((m.ty, m.code), (MessageType::Con, Code::EMPTY));
}

#[test]
fn a_larger_message_size_and_block_size_apply_to_the_next_body() {
    let config = CoreConfig {
        max_message_size: 256,
        block_size: 64,
        ..test_config()
    };
    let mut h = Harness::new(config.clone());
    h.observe(1, 1, b"a", "/ps/t");
    let _ = h.events();
    let body: &'static [u8] = &[b'z'; 200];
    assert_eq!(h.downlink("t", body, Qos::AtMostOnce), 1);
    let m = h.one(1);
    assert_eq!(
        (m.payload.len(), m.block2.map(|b| b.size())),
        (64, Some(64))
    );
    h.core.reconfigure(
        h.now,
        CoreConfig {
            max_message_size: 1152,
            block_size: 1024,
            ..config
        },
    );
    h.core.check_invariants();
    assert_eq!(h.downlink("t", body, Qos::AtMostOnce), 1);
    let m = h.one(1);
    assert_eq!((m.payload.len(), m.block2), (200, None));
}
