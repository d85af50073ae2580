//! ACLs, limits and the identity requirement in the CoAP core: 4.03 for the ACL (publish,
//! GET, Observe), 4.29 with Max-Age over the rate, 4.13 too large, 4.01 without a required
//! identity; counters; a DTLS identity wins over the `id` query.

use crate::identity::{Identity, IdentitySource};
use crate::security::{Acl, Denial, Limits, LimitsPolicy, Pattern, Policy, Rate, Rule};

use super::*;

fn policy_config(policy: Policy) -> CoreConfig {
    CoreConfig {
        security: Arc::new(policy),
        ..test_config()
    }
}

fn acl() -> Policy {
    Policy {
        acl: Some(Acl::new(vec![Rule {
            identity: None,
            publish: vec![Pattern::new("sensors/{identity}/#").unwrap()],
            subscribe: vec![Pattern::new("cmd/{client_id}/#").unwrap()],
        }])),
        ..Policy::default()
    }
}

#[test]
fn the_acl_answers_4_03_to_publish_get_and_observe() {
    let mut h = Harness::new(policy_config(acl()));
    h.send(
        1,
        &request(CON, PUT, 1, b"t1", "/ps/sensors/dev1/t?id=dev1", &[], b"1"),
    );
    let (message, token) = h.publish_token();
    assert_eq!(message.topic, "sensors/dev1/t");
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    assert_eq!(h.one(1).code, Code::CHANGED);
    // Another device's topic, no id at all, an id with a separator.
    for (mid, uri) in [
        (2, "/ps/sensors/dev2/t?id=dev1"),
        (3, "/ps/sensors/dev1/t"),
        (4, "/ps/sensors/dev1/t?id=dev1%2Fx"),
    ] {
        h.send(1, &request(CON, PUT, mid, b"t2", uri, &[], b"1"));
        assert!(h.events().is_empty(), "{uri}");
        let m = h.one(1);
        assert_eq!(
            (m.ty, m.code, m.message_id),
            (MessageType::Ack, Code::FORBIDDEN, mid),
            "{uri}"
        );
    }
    // NON: answered 4.03 too (CoAP answers a NON; nothing is published).
    h.send(
        1,
        &request(NON, POST, 5, b"t3", "/ps/other?id=dev1", &[], b"1"),
    );
    assert!(h.events().is_empty());
    assert_eq!(h.one(1).code, Code::FORBIDDEN);
    // Observe within the pattern, and outside it.
    let _ = h.observe(1, 6, b"o1", "/ps/cmd/dev1/+?id=dev1");
    h.send(
        1,
        &request(CON, GET, 7, b"o2", "/ps/cmd/#?id=dev1", &[(6, vec![])], b""),
    );
    assert!(h.events().is_empty());
    assert_eq!(h.one(1).code, Code::FORBIDDEN);
    // A plain GET is a read of what the topic receives.
    h.send(
        1,
        &request(CON, GET, 8, b"g", "/ps/sensors/dev1/t?id=dev1", &[], b""),
    );
    assert_eq!(h.one(1).code, Code::FORBIDDEN);
    let c = h.core.security_counters();
    assert_eq!(c.get(Denial::AclPublish), 4);
    assert_eq!(c.get(Denial::AclSubscribe), 2);
}

#[test]
fn a_dtls_identity_wins_over_the_id_query() {
    let mut h = Harness::new(policy_config(acl()));
    let dtls = Peer {
        identity: Some(Arc::new(Identity::new("dev1", IdentitySource::Psk))),
        ..peer(1)
    };
    let put = |uri: &str, mid: u16| request(CON, PUT, mid, b"t", uri, &[], b"1");
    h.core
        .handle_datagram(h.now, dtls.clone(), &put("/ps/sensors/dev1/a?id=dev2", 1));
    let (_, token) = h.publish_token();
    h.verdict(token.unwrap(), PublishOutcome::Accepted);
    assert_eq!(h.one(1).code, Code::CHANGED);
    h.core
        .handle_datagram(h.now, dtls, &put("/ps/sensors/dev2/a?id=dev2", 2));
    assert!(h.events().is_empty());
    assert_eq!(h.one(1).code, Code::FORBIDDEN);
}

#[test]
fn over_the_rate_is_4_29_with_max_age_and_too_large_is_4_13() {
    let policy = Policy {
        limits: LimitsPolicy {
            default: Limits {
                messages: Rate {
                    per_second: 0.5,
                    burst: 1.0,
                },
                bytes: Rate::UNLIMITED,
                max_message_size: Some(4),
            },
            ..LimitsPolicy::default()
        },
        ..Policy::default()
    };
    let mut h = Harness::new(policy_config(policy));
    h.send(
        1,
        &request(NON, PUT, 1, b"t", "/ps/a?id=dev1&qos=0", &[], b"1"),
    );
    assert_eq!(h.events().len(), 1);
    assert_eq!(h.one(1).code, Code::CHANGED);
    h.send(1, &request(CON, PUT, 2, b"t", "/ps/a?id=dev1", &[], b"1"));
    assert!(h.events().is_empty());
    let m = h.one(1);
    assert_eq!((m.code, m.max_age), (Code::TOO_MANY_REQUESTS, Some(2)));
    // Another identity has its own bucket; an anonymous peer is limited by its address.
    h.send(
        1,
        &request(NON, PUT, 3, b"t", "/ps/a?id=dev2&qos=0", &[], b"1"),
    );
    assert_eq!(h.events().len(), 1);
    let _ = h.out();
    h.advance(Duration::from_secs(2));
    h.send(
        1,
        &request(CON, PUT, 4, b"t", "/ps/a?id=dev1", &[], b"12345"),
    );
    assert!(h.events().is_empty());
    assert_eq!(h.one(1).code, Code::REQUEST_ENTITY_TOO_LARGE);
    let c = h.core.security_counters();
    assert_eq!(
        (c.get(Denial::RateLimited), c.get(Denial::TooLarge)),
        (1, 1)
    );
}

#[test]
fn require_identity_answers_4_01_to_plain_peers() {
    let mut h = Harness::new(CoreConfig {
        require_identity: true,
        ..test_config()
    });
    h.send(1, &request(CON, PUT, 1, b"t", "/ps/a?id=dev1", &[], b"1"));
    assert!(h.events().is_empty());
    assert_eq!(h.one(1).code, Code::UNAUTHORIZED);
    let dtls = Peer {
        identity: Some(Arc::new(Identity::new("dev1", IdentitySource::Psk))),
        ..peer(2)
    };
    h.core.handle_datagram(
        h.now,
        dtls,
        &request(NON, PUT, 2, b"t", "/ps/a?qos=0", &[], b"1"),
    );
    assert_eq!(h.events().len(), 1);
    assert_eq!(h.core.security_counters().get(Denial::IdentityRequired), 1);
}

#[test]
fn a_narrowed_acl_stops_notifications_of_existing_observations() {
    let mut h = Harness::new(test_config());
    let _ = h.observe(1, 1, b"o1", "/ps/cmd/#?id=dev1");
    assert_eq!(h.downlink("cmd/dev2/x", b"before", Qos::AtMostOnce), 1);
    let _ = h.out();
    let notes = h.core.reconfigure(h.now, policy_config(acl()));
    let _ = notes;
    // Still observing; only what the new ACL allows is notified.
    assert_eq!(h.downlink("cmd/dev2/x", b"no", Qos::AtMostOnce), 0);
    assert!(h.out().is_empty());
    assert_eq!(h.downlink("cmd/dev1/x", b"yes", Qos::AtMostOnce), 1);
    assert_eq!(h.one(1).payload, b"yes");
    assert_eq!(h.core.security_counters().get(Denial::AclDeniedDelivery), 1);
}
