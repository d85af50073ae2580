#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use proptest::prelude::*;

use super::*;
use crate::identity::{Identity, IdentitySource};

fn rule(identity: Option<&str>, publish: &[&str], subscribe: &[&str]) -> Rule {
    Rule {
        identity: identity.map(Arc::from),
        publish: publish.iter().map(|p| Pattern::new(p).unwrap()).collect(),
        subscribe: subscribe.iter().map(|p| Pattern::new(p).unwrap()).collect(),
    }
}

fn psk(name: &str) -> Identity {
    Identity::new(name, IdentitySource::Psk)
}

#[test]
fn patterns_are_validated() {
    assert!(Pattern::new("sensors/{identity}/#").is_ok());
    assert!(Pattern::new("a/dev-{client_id}/x").is_ok());
    assert!(Pattern::new("#").is_ok());
    assert_eq!(
        Pattern::new("a/{user}/b"),
        Err(PatternError::UnknownPlaceholder)
    );
    assert!(matches!(
        Pattern::new("a/#/b"),
        Err(PatternError::Filter(_))
    ));
    assert!(matches!(Pattern::new("a+/b"), Err(PatternError::Filter(_))));
    assert!(matches!(Pattern::new(""), Err(PatternError::Filter(_))));
}

#[test]
fn identity_rules_and_pattern_rules_add_up() {
    let acl = Acl::new(vec![
        rule(Some("dev1"), &["special/dev1"], &[]),
        rule(None, &["sensors/{identity}/#"], &["cmd/{client_id}/#"]),
    ]);
    let dev1 = psk("dev1");
    let dev2 = psk("dev2");
    let who1 = Requester::new(Some(&dev1), Some("c1"));
    let who2 = Requester::new(Some(&dev2), Some("c2"));
    assert!(acl.may_publish(&who1, "sensors/dev1/t"));
    assert!(acl.may_publish(&who1, "sensors/dev1"));
    assert!(acl.may_publish(&who1, "special/dev1"));
    assert!(!acl.may_publish(&who1, "sensors/dev2/t"));
    assert!(acl.may_publish(&who2, "sensors/dev2/t"));
    assert!(!acl.may_publish(&who2, "special/dev1"));
    // Deny by default.
    assert!(!acl.may_publish(&who1, "other"));
    assert!(acl.may_subscribe(&who1, "cmd/c1/#"));
    assert!(acl.may_subscribe(&who1, "cmd/c1/+/x"));
    assert!(acl.may_subscribe(&who1, "cmd/c1"));
    assert!(!acl.may_subscribe(&who1, "cmd/c2/#"));
    assert!(!acl.may_subscribe(&who1, "cmd/+/#"));
    assert!(!acl.may_subscribe(&who1, "#"));
    assert!(acl.may_receive(&who1, "cmd/c1/reboot"));
    assert!(!acl.may_receive(&who1, "cmd/c2/reboot"));
}

#[test]
fn placeholders_without_a_value_do_not_apply() {
    let acl = Acl::new(vec![rule(
        None,
        &["sensors/{identity}/#", "open/#"],
        &["cmd/{client_id}/#"],
    )]);
    let nobody = Requester::default();
    assert!(!acl.may_publish(&nobody, "sensors/x/t"));
    assert!(acl.may_publish(&nobody, "open/x"));
    assert!(!acl.may_subscribe(&nobody, "cmd/x/#"));
    // Anonymous HTTP clients have no identity name to substitute, nor identity rules.
    let anon = Identity::new("anonymous", IdentitySource::Anonymous);
    let who = Requester::new(Some(&anon), None);
    assert!(!acl.may_publish(&who, "sensors/anonymous/t"));
    let acl = Acl::new(vec![rule(Some("anonymous"), &["#"], &[])]);
    assert!(!acl.may_publish(&who, "x"));
}

#[test]
fn injected_wildcards_and_separators_never_widen_a_rule() {
    let acl = Acl::new(vec![rule(
        None,
        &["sensors/{client_id}/data", "d/{identity}/#"],
        &["cmd/{client_id}/#", "c/{identity}"],
    )]);
    for evil in [
        "+",
        "#",
        "a/b",
        "a+",
        "x#",
        "+/#",
        "/",
        "",
        "$SYS",
        "a\u{0}b",
        "{identity}",
    ] {
        let id = psk(evil);
        let who = Requester::new(Some(&id), Some(evil));
        for topic in [
            "sensors/a/data",
            "sensors/+/data",
            "d/a/x",
            "d/x",
            "sensors//data",
        ] {
            assert!(!acl.may_publish(&who, topic), "{evil:?} published {topic}");
        }
        for filter in ["cmd/#", "cmd/+/#", "#", "c/+", "cmd/a/#", "c/a"] {
            assert!(
                !acl.may_subscribe(&who, filter),
                "{evil:?} subscribed {filter}"
            );
        }
    }
    // A literal value works.
    let id = psk("ok");
    let who = Requester::new(Some(&id), Some("ok"));
    assert!(acl.may_publish(&who, "sensors/ok/data"));
    assert!(acl.may_subscribe(&who, "c/ok"));
}

#[test]
fn dollar_topics_need_a_dollar_pattern() {
    let acl = Acl::new(vec![rule(None, &["#"], &["#", "+/x"])]);
    let who = Requester::default();
    assert!(!acl.may_publish(&who, "$SYS/x"));
    assert!(acl.may_publish(&who, "a/b"));
    assert!(!acl.may_subscribe(&who, "$SYS/#"));
    assert!(!acl.may_subscribe(&who, "$SYS/x"));
    assert!(acl.may_subscribe(&who, "+/x"));
    assert!(acl.may_subscribe(&who, "#"));
}

#[test]
fn filter_within_cases() {
    let yes = [
        ("a/b", "a/b"),
        ("a/b", "a/+"),
        ("a/b", "#"),
        ("a/+", "a/+"),
        ("a/+", "a/#"),
        ("a", "a/#"),
        ("a/#", "a/#"),
        ("a/b/#", "a/#"),
        ("a/+/c", "+/+/c"),
        ("$SYS/x", "$SYS/#"),
        ("+", "#"),
    ];
    let no = [
        ("a/#", "a/+"),
        ("a/+", "a/b"),
        ("a", "a/+"),
        ("a/b", "a"),
        ("a/#", "a/b/#"),
        ("#", "a/#"),
        ("$SYS/x", "#"),
        ("$SYS/x", "+/x"),
        ("a/b/c", "a/b"),
        ("+/b", "a/b"),
    ];
    for (inner, outer) in yes {
        assert!(filter_within(inner, outer), "{inner} within {outer}");
    }
    for (inner, outer) in no {
        assert!(!filter_within(inner, outer), "{inner} not within {outer}");
    }
}

/// A small alphabet of levels so random filters and names collide often.
fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just(String::new()),
        Just("$s".to_owned()),
    ]
}

fn name() -> impl Strategy<Value = String> {
    proptest::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
}

fn filter() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(prop_oneof![level(), Just("+".to_owned())], 0..4),
        any::<bool>(),
    )
        .prop_filter_map("empty", |(mut levels, hash)| {
            if hash {
                levels.push("#".to_owned());
            }
            let f = levels.join("/");
            topic::is_valid_filter(&f).then_some(f)
        })
}

proptest! {
    /// `filter_within(f, p)` implies every name `f` matches is matched by `p` (soundness: a
    /// subscription never receives what the pattern would not allow).
    #[test]
    fn within_is_sound(inner in filter(), outer in filter(), names in proptest::collection::vec(name(), 1..40)) {
        if filter_within(&inner, &outer) {
            for n in &names {
                if topic::matches(&inner, n) {
                    prop_assert!(topic::matches(&outer, n), "{} within {} but {} escapes", inner, outer, n);
                }
            }
        }
    }

    /// A filter is within itself and within `#` unless it can match `$` topics.
    #[test]
    fn within_is_reflexive(f in filter()) {
        prop_assert!(filter_within(&f, &f));
        prop_assert_eq!(filter_within(&f, "#"), !f.starts_with('$'));
    }

    /// Whatever the ClientId, a `{client_id}` rule allows only names under that one literal
    /// level.
    #[test]
    fn client_id_stays_in_its_level(id in "[a-z+#/$]{0,4}", n in name()) {
        let acl = Acl::new(vec![rule(None, &["x/{client_id}/#"], &["x/{client_id}/#"])]);
        let who = Requester::new(None, Some(&id));
        if acl.may_publish(&who, &n) {
            prop_assert!(safe_value(&id));
            let own = n == format!("x/{id}") || n.starts_with(&format!("x/{id}/"));
            prop_assert!(own, "{} published {}", id, n);
        }
    }
}
