//! ACLs, limits and identity checks in the core: the answer codes (REGACK / PUBACK / SUBACK
//! rc 0x03 for the ACL, PUBACK rc 0x01 over the rate, CONNACK rc 0x03 for an identity that may
//! not use the ClientId), silent QoS 0 refusals, counters, and a live ACL change.

use crate::identity::{Identity, IdentitySource};
use crate::security::{Acl, Denial, Limits, LimitsPolicy, Pattern, Policy, Rate, Rule};

use super::*;

fn rule(identity: Option<&str>, publish: &[&str], subscribe: &[&str]) -> Rule {
    Rule {
        identity: identity.map(Arc::from),
        publish: publish.iter().map(|p| Pattern::new(p).unwrap()).collect(),
        subscribe: subscribe.iter().map(|p| Pattern::new(p).unwrap()).collect(),
    }
}

fn with_policy(policy: Policy) -> CoreConfig {
    CoreConfig {
        security: Arc::new(policy),
        ..config()
    }
}

fn acl_policy() -> Policy {
    Policy {
        acl: Some(Acl::new(vec![rule(
            None,
            &["sensors/{client_id}/#"],
            &["cmd/{client_id}/#"],
        )])),
        ..Policy::default()
    }
}

fn puback_rc(h: &mut Harness, from: &Peer) -> ReturnCode {
    match decode(&h.reply(from)) {
        Packet::PubAck { rc, .. } => rc,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

fn connack_rc(h: &mut Harness, from: &Peer) -> ReturnCode {
    match decode(&h.reply(from)) {
        Packet::ConnAck { rc } => rc,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn psk_peer(port: u16, name: &str, client_ids: &[&str]) -> Peer {
    let mut identity = Identity::new(name, IdentitySource::Psk);
    identity.client_ids = Some(client_ids.iter().map(|c| Arc::from(*c)).collect());
    Peer {
        identity: Some(Arc::new(identity)),
        ..peer(port)
    }
}

#[test]
fn the_acl_refuses_register_publish_and_subscribe_with_rc_0x03() {
    let mut h = Harness::new(with_policy(acl_policy()));
    let c = peer(1000);
    h.connect(&c, "dev1", 60);
    // REGISTER of a topic it may not publish to: refused before it takes a topic id.
    assert_eq!(
        h.register(&c, "sensors/dev2/t", 1),
        (0, ReturnCode::NotSupported)
    );
    let (id, rc) = h.register(&c, "sensors/dev1/t", 2);
    assert_eq!(rc, ReturnCode::Accepted);
    h.send(
        &c,
        publish(QoS::AtLeastOnce, TopicRef::Normal(id), 3, b"ok"),
    );
    let (message, token) = single_publish(h.events());
    assert_eq!(message.topic, "sensors/dev1/t");
    h.core
        .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Accepted);
    assert_eq!(puback_rc(&mut h, &c), ReturnCode::Accepted);
    // Predefined and short topics are checked on PUBLISH.
    h.send(
        &c,
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 4, b"no"),
    );
    assert_eq!(puback_rc(&mut h, &c), ReturnCode::NotSupported);
    assert!(h.events().is_empty());
    h.send(
        &c,
        publish(QoS::AtLeastOnce, TopicRef::Short(*b"xy"), 5, b"no"),
    );
    assert_eq!(puback_rc(&mut h, &c), ReturnCode::NotSupported);
    // QoS 0 and -1: dropped without an answer, counted.
    h.send(
        &c,
        publish(QoS::AtMostOnce, TopicRef::Predefined(1), 0, b"no"),
    );
    h.send(
        &c,
        publish(QoS::MinusOne, TopicRef::Predefined(1), 0, b"no"),
    );
    assert!(h.transmits().is_empty());
    assert!(h.events().is_empty());
    // Subscriptions: within the pattern or refused.
    assert_eq!(
        h.subscribe(&c, "cmd/dev1/#", QoS::AtLeastOnce, 6).1,
        ReturnCode::Accepted
    );
    assert_eq!(
        h.subscribe(&c, "cmd/dev1/+", QoS::AtLeastOnce, 7).1,
        ReturnCode::Accepted
    );
    assert_eq!(
        h.subscribe(&c, "cmd/#", QoS::AtLeastOnce, 8).1,
        ReturnCode::NotSupported
    );
    assert_eq!(
        h.subscribe(&c, "#", QoS::AtLeastOnce, 9).1,
        ReturnCode::NotSupported
    );
    let counters = h.core.security_counters();
    assert_eq!(counters.get(Denial::AclPublish), 5);
    assert_eq!(counters.get(Denial::AclSubscribe), 2);
    h.core.check_invariants();
}

#[test]
fn a_client_id_with_wildcards_gains_nothing() {
    let mut h = Harness::new(with_policy(acl_policy()));
    for (i, id) in ["+", "#", "a/b", "$SYS"].into_iter().enumerate() {
        let c = peer(2000 + i as u16);
        h.connect(&c, id, 60);
        for topic in ["sensors/x/t", "sensors//t", "sensors/a/b/t"] {
            assert_eq!(
                h.register(&c, topic, 1).1,
                ReturnCode::NotSupported,
                "{id} registered {topic}"
            );
        }
        assert_eq!(
            h.subscribe(&c, "cmd/x/#", QoS::AtMostOnce, 2).1,
            ReturnCode::NotSupported
        );
    }
}

#[test]
fn over_the_rate_qos1_gets_congestion_and_qos0_is_dropped() {
    let policy = Policy {
        limits: LimitsPolicy {
            default: Limits {
                messages: Rate {
                    per_second: 1.0,
                    burst: 2.0,
                },
                bytes: Rate::UNLIMITED,
                max_message_size: Some(8),
            },
            ..LimitsPolicy::default()
        },
        ..Policy::default()
    };
    let mut h = Harness::new(with_policy(policy));
    let c = peer(1000);
    h.connect(&c, "dev1", 60);
    for msg_id in 1..=2 {
        h.send(
            &c,
            publish(QoS::AtLeastOnce, TopicRef::Predefined(1), msg_id, b"v"),
        );
        let (_, token) = single_publish(h.events());
        h.core
            .handle_publish_result(h.now, token.unwrap(), PublishOutcome::Accepted);
        assert_eq!(puback_rc(&mut h, &c), ReturnCode::Accepted);
    }
    h.send(
        &c,
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 3, b"v"),
    );
    assert_eq!(puback_rc(&mut h, &c), ReturnCode::Congestion);
    assert!(h.events().is_empty());
    h.send(
        &c,
        publish(QoS::AtMostOnce, TopicRef::Predefined(1), 0, b"v"),
    );
    assert!(h.transmits().is_empty());
    assert!(h.events().is_empty());
    // A second later one token is back.
    h.advance(Duration::from_secs(1));
    h.send(
        &c,
        publish(QoS::AtMostOnce, TopicRef::Predefined(1), 0, b"v"),
    );
    assert_eq!(h.events().len(), 1);
    // Too large for max_message_size: rc 0x03 (retrying cannot help).
    h.advance(Duration::from_secs(5));
    h.send(
        &c,
        publish(QoS::AtLeastOnce, TopicRef::Predefined(1), 4, b"123456789"),
    );
    assert_eq!(puback_rc(&mut h, &c), ReturnCode::NotSupported);
    let counters = h.core.security_counters();
    assert_eq!(counters.get(Denial::RateLimited), 2);
    assert_eq!(counters.get(Denial::TooLarge), 1);
}

#[test]
fn a_proven_identity_may_connect_only_with_its_client_ids() {
    let mut h = Harness::new(config());
    let dtls = psk_peer(1000, "dev1", &["dev1", "dev1-b"]);
    h.send(
        &dtls,
        Packet::Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: "dev2",
        },
    );
    assert_eq!(connack_rc(&mut h, &dtls), ReturnCode::NotSupported);
    assert_eq!(h.core.session_count(), 0);
    h.connect(&dtls, "dev1", 60);
    // A plain client claiming the ClientId of a proven session does not take it over.
    let plain = peer(1001);
    h.send(
        &plain,
        Packet::Connect {
            will: false,
            clean_session: false,
            duration: 60,
            client_id: "dev1",
        },
    );
    assert_eq!(connack_rc(&mut h, &plain), ReturnCode::NotSupported);
    h.send(
        &plain,
        Packet::PingReq {
            client_id: Some("dev1"),
        },
    );
    assert_eq!(
        decode(&h.reply(&plain)),
        Packet::Disconnect { duration: None }
    );
    // The proven client is still connected.
    h.send(&dtls, Packet::PingReq { client_id: None });
    assert_eq!(decode(&h.reply(&dtls)), Packet::PingResp);
    assert_eq!(h.core.security_counters().get(Denial::ClientIdMismatch), 3);
    h.core.check_invariants();
}

#[test]
fn a_client_id_bound_to_a_psk_identity_is_refused_to_plain_peers_even_for_an_unproven_session() {
    // A session of `dev1` made before the binding existed (as one restored after a restart:
    // its record does not say who proved it), then `[[psk]] client_ids = ["dev1"]`.
    let mut h = Harness::new(config());
    let old = peer(1000);
    h.connect(&old, "dev1", 60);
    let reserved = Policy {
        reserved_client_ids: [Arc::from("dev1")].into_iter().collect(),
        ..Policy::default()
    };
    let _ = h.core.reconfigure(h.now, with_policy(reserved));
    // A plain peer may neither wake nor take that session, nor CONNECT as dev1.
    let plain = peer(1001);
    h.send(
        &plain,
        Packet::PingReq {
            client_id: Some("dev1"),
        },
    );
    assert_eq!(
        decode(&h.reply(&plain)),
        Packet::Disconnect { duration: None }
    );
    h.send(
        &plain,
        Packet::Connect {
            will: false,
            clean_session: false,
            duration: 60,
            client_id: "dev1",
        },
    );
    assert_eq!(connack_rc(&mut h, &plain), ReturnCode::NotSupported);
    // Other ClientIds are not concerned; the identity itself takes its session.
    h.connect(&peer(1002), "dev2", 60);
    h.connect(&psk_peer(1003, "dev1", &["dev1"]), "dev1", 60);
    assert_eq!(h.core.security_counters().get(Denial::ClientIdMismatch), 2);
    h.core.check_invariants();
}

#[test]
fn require_identity_refuses_plain_connects() {
    let mut h = Harness::new(CoreConfig {
        require_identity: true,
        ..config()
    });
    let plain = peer(1000);
    h.send(
        &plain,
        Packet::Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: "dev1",
        },
    );
    assert_eq!(connack_rc(&mut h, &plain), ReturnCode::NotSupported);
    h.connect(&psk_peer(1001, "dev1", &["dev1"]), "dev1", 60);
    assert_eq!(h.core.security_counters().get(Denial::IdentityRequired), 1);
}

#[test]
fn identity_rules_use_the_proven_identity_not_the_client_id() {
    let policy = Policy {
        acl: Some(Acl::new(vec![rule(
            Some("dev1"),
            &["site/{identity}/{client_id}"],
            &[],
        )])),
        ..Policy::default()
    };
    let mut h = Harness::new(with_policy(policy));
    let dtls = psk_peer(1000, "dev1", &["node-a"]);
    h.connect(&dtls, "node-a", 60);
    assert_eq!(
        h.register(&dtls, "site/dev1/node-a", 1).1,
        ReturnCode::Accepted
    );
    assert_eq!(
        h.register(&dtls, "site/node-a/node-a", 2).1,
        ReturnCode::NotSupported
    );
    // A plain client whose ClientId is "dev1" claims identity dev1 (allowed by the config).
    let plain = peer(1001);
    h.connect(&plain, "dev1", 60);
    assert_eq!(
        h.register(&plain, "site/dev1/dev1", 1).1,
        ReturnCode::Accepted
    );
}

#[test]
fn a_narrowed_acl_applies_live_to_sessions_and_their_subscriptions() {
    let mut h = Harness::new(config());
    let c = peer(1000);
    h.connect(&c, "dev1", 60);
    assert_eq!(
        h.subscribe(&c, "cmd/#", QoS::AtMostOnce, 1).1,
        ReturnCode::Accepted
    );
    let (id, _) = h.register(&c, "other/t", 2);
    let notes = h.core.reconfigure(h.now, with_policy(acl_policy()));
    let _ = notes;
    // The session survives; a message its ACL no longer allows is not delivered.
    h.downlink("cmd/dev2/x", b"no", Qos::AtMostOnce);
    assert!(h.transmits().is_empty());
    h.downlink("cmd/dev1/x", b"yes", Qos::AtMostOnce);
    let sent = h.transmits();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(matches!(
        decode(&sent[0].1),
        Packet::Register {
            topic_name: "cmd/dev1/x",
            ..
        }
    ));
    h.send(&c, publish(QoS::AtLeastOnce, TopicRef::Normal(id), 3, b"v"));
    match decode(&h.reply(&c)) {
        Packet::PubAck { rc, .. } => assert_eq!(rc, ReturnCode::NotSupported),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.core.security_counters().get(Denial::AclDeniedDelivery), 1);
    assert_eq!(h.core.session_count(), 1);
    h.core.check_invariants();
}
