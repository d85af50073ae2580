use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::message::Protocol;

const UPSTREAMS: &[&str] = &["local", "cloud"];
const LOCAL: usize = 0;
const CLOUD: usize = 1;

fn spec(filter: &str, upstreams: &[&str]) -> RouteSpec {
    RouteSpec {
        filter: filter.to_owned(),
        upstreams: upstreams.iter().map(|u| (*u).to_owned()).collect(),
        ..RouteSpec::default()
    }
}

fn compile(specs: &[RouteSpec]) -> RouteTable {
    RouteTable::compile(specs, UPSTREAMS, "gw1").unwrap()
}

fn compile_err(specs: &[RouteSpec]) -> RouteError {
    RouteTable::compile(specs, UPSTREAMS, "gw1").unwrap_err()
}

fn origin(client_id: Option<&str>) -> Origin {
    Origin {
        protocol: Protocol::MqttSn,
        client_id: client_id.map(Arc::from),
        peer: None,
    }
}

/// The topic and QoS a QoS 2 message from client `c1` gets on `upstream`.
fn target(table: &RouteTable, upstream: usize, topic: &str) -> Option<(String, Qos)> {
    table
        .target(upstream, topic, Qos::ExactlyOnce, &origin(Some("c1")))
        .map(|t| (t.topic.into_owned(), t.qos))
}

#[test]
fn without_routes_everything_goes_everywhere_unchanged() {
    let table = RouteTable::compile(&[], UPSTREAMS, "gw").unwrap();
    assert!(table.is_everything());
    assert!(table.accepts("any/thing"));
    for up in [LOCAL, CLOUD] {
        assert_eq!(
            target(&table, up, "a/b"),
            Some(("a/b".to_owned(), Qos::ExactlyOnce))
        );
        assert_eq!(table.upstream_filters(up, "a/#"), ["a/#"]);
        assert_eq!(table.downlink_topic(up, "a/b").as_deref(), Some("a/b"));
    }
}

#[test]
fn routes_are_all_match_and_the_first_route_per_upstream_decides() {
    let table = compile(&[
        RouteSpec {
            add_prefix: Some("site/".into()),
            qos_max: Some(Qos::AtLeastOnce),
            ..spec("sensors/#", &["cloud"])
        },
        spec("sensors/+/temp", &["local", "cloud"]),
        spec("alarms/#", &["local"]),
    ]);
    assert!(!table.is_everything());
    assert!(table.accepts("sensors/t1/temp"));
    assert!(table.accepts("alarms/fire"));
    assert!(!table.accepts("other/x"), "no route matches: refused");
    // Both upstreams take it; cloud through its first matching route (the rewrite and cap).
    assert_eq!(
        target(&table, CLOUD, "sensors/t1/temp"),
        Some(("site/sensors/t1/temp".to_owned(), Qos::AtLeastOnce))
    );
    assert_eq!(
        target(&table, LOCAL, "sensors/t1/temp"),
        Some(("sensors/t1/temp".to_owned(), Qos::ExactlyOnce))
    );
    assert_eq!(target(&table, LOCAL, "sensors/t1/hum"), None);
    assert_eq!(target(&table, CLOUD, "alarms/fire"), None);
    assert_eq!(target(&table, 7, "alarms/fire"), None, "unknown upstream");
}

#[test]
fn a_catch_all_route_is_the_default_route() {
    let table = compile(&[
        RouteSpec {
            add_prefix: Some("fast/".into()),
            ..spec("alarms/#", &["local"])
        },
        spec("#", &["local"]),
    ]);
    assert!(table.accepts("anything/at/all"));
    assert_eq!(
        target(&table, LOCAL, "x").map(|t| t.0).as_deref(),
        Some("x")
    );
    assert_eq!(
        target(&table, LOCAL, "alarms/a").map(|t| t.0).as_deref(),
        Some("fast/alarms/a")
    );
    assert!(!table.accepts("$SYS/x"), "`#` does not match `$` topics");
}

#[test]
fn strip_prefix_applies_only_when_the_topic_has_it_and_something_remains() {
    let table = compile(&[RouteSpec {
        strip_prefix: Some("site/".into()),
        add_prefix: Some("fleet/".into()),
        ..spec("#", &["cloud"])
    }]);
    let t = |topic| target(&table, CLOUD, topic).map(|t| t.0);
    assert_eq!(t("site/a/b").as_deref(), Some("fleet/a/b"));
    assert_eq!(t("other/a").as_deref(), Some("fleet/other/a"));
    assert_eq!(t("site/").as_deref(), Some("fleet/site/"));
    assert_eq!(t("site").as_deref(), Some("fleet/site"));
}

#[test]
fn a_strip_only_rewrite_borrows_the_topic() {
    let table = compile(&[RouteSpec {
        strip_prefix: Some("a/".into()),
        ..spec("a/#", &["local"])
    }]);
    let origin = Origin::default();
    let target = table
        .target(LOCAL, "a/b/c", Qos::AtMostOnce, &origin)
        .unwrap();
    assert!(matches!(target.topic, Cow::Borrowed("b/c")));
}

#[test]
fn templates_render_every_placeholder_and_sanitise_the_values() {
    let table = compile(&[RouteSpec {
        strip_prefix: Some("s/".into()),
        template: Some("{gateway_id}/{protocol}/{client_id}/{topic}/{{raw}}".into()),
        ..spec("s/#", &["cloud"])
    }]);
    let render = |client_id: Option<&str>| {
        table
            .target(CLOUD, "s/t1/temp", Qos::AtMostOnce, &origin(client_id))
            .map(|t| t.topic.into_owned())
    };
    assert_eq!(
        render(Some("c1")).as_deref(),
        Some("gw1/mqttsn/c1/t1/temp/{raw}")
    );
    assert_eq!(
        render(Some("a/b+c#d\0e\u{7f}")).as_deref(),
        Some("gw1/mqttsn/a_b_c_d_e_/t1/temp/{raw}"),
        "no new levels, wildcards or control characters"
    );
    assert_eq!(
        render(None).as_deref(),
        Some("gw1/mqttsn/unknown/t1/temp/{raw}")
    );
    assert_eq!(
        render(Some("")).as_deref(),
        Some("gw1/mqttsn/unknown/t1/temp/{raw}")
    );
    let internal = table
        .target(CLOUD, "s/x", Qos::AtMostOnce, &Origin::default())
        .unwrap();
    assert_eq!(internal.topic, "gw1/internal/unknown/x/{raw}");
}

#[test]
fn a_rewrite_too_long_for_a_topic_gives_no_target() {
    let table = compile(&[RouteSpec {
        template: Some("{client_id}/{topic}".into()),
        ..spec("#", &["local"])
    }]);
    let long = "x".repeat(topic::MAX_TOPIC_BYTES - 2);
    let short = Origin {
        client_id: Some(Arc::from("c")),
        ..Origin::default()
    };
    let longer = Origin {
        client_id: Some(Arc::from("cc")),
        ..Origin::default()
    };
    assert!(
        table
            .target(LOCAL, &long, Qos::AtMostOnce, &short)
            .is_some()
    );
    assert_eq!(table.target(LOCAL, &long, Qos::AtMostOnce, &longer), None);
}

#[test]
fn the_qos_cap_only_lowers() {
    let table = compile(&[RouteSpec {
        qos_max: Some(Qos::AtLeastOnce),
        ..spec("#", &["local"])
    }]);
    let qos = |q| table.target(LOCAL, "t", q, &Origin::default()).unwrap().qos;
    assert_eq!(qos(Qos::AtMostOnce), Qos::AtMostOnce);
    assert_eq!(qos(Qos::AtLeastOnce), Qos::AtLeastOnce);
    assert_eq!(qos(Qos::ExactlyOnce), Qos::AtLeastOnce);
}

#[test]
fn compile_errors_name_the_route_and_the_key() {
    let ok = spec("a/#", &["local"]);
    let table: Vec<(RouteSpec, RouteField, &str)> = vec![
        (spec("a/#/b", &["local"]), RouteField::Filter, "wildcards"),
        (spec("", &["local"]), RouteField::Filter, "empty"),
        (spec("a", &[]), RouteField::Upstreams, "at least one"),
        (
            spec("a", &["nowhere"]),
            RouteField::Upstreams,
            "\"nowhere\"",
        ),
        (
            spec("a", &["local", "cloud", "local"]),
            RouteField::Upstreams,
            "twice",
        ),
        (
            RouteSpec {
                strip_prefix: Some(String::new()),
                ..ok.clone()
            },
            RouteField::StripPrefix,
            "empty",
        ),
        (
            RouteSpec {
                add_prefix: Some("a/+/".into()),
                ..ok.clone()
            },
            RouteField::AddPrefix,
            "wildcards",
        ),
        (
            RouteSpec {
                add_prefix: Some("a\0".into()),
                ..ok.clone()
            },
            RouteField::AddPrefix,
            "control",
        ),
        (
            RouteSpec {
                add_prefix: Some("x".repeat(MAX_REWRITE_BYTES + 1)),
                ..ok.clone()
            },
            RouteField::AddPrefix,
            "longer",
        ),
        (
            RouteSpec {
                add_prefix: Some("p/".into()),
                template: Some("{topic}".into()),
                ..ok.clone()
            },
            RouteField::Template,
            "exclude",
        ),
        (
            RouteSpec {
                template: Some("x/{topik}".into()),
                ..ok.clone()
            },
            RouteField::Template,
            "`{topik}`",
        ),
        (
            RouteSpec {
                template: Some("x/{topic".into()),
                ..ok.clone()
            },
            RouteField::Template,
            "not closed",
        ),
        (
            RouteSpec {
                template: Some("x}/{topic}".into()),
                ..ok.clone()
            },
            RouteField::Template,
            "closes no placeholder",
        ),
        (
            RouteSpec {
                template: Some("x/#/{topic}".into()),
                ..ok.clone()
            },
            RouteField::Template,
            "wildcard",
        ),
        (
            RouteSpec {
                template: Some(String::new()),
                ..ok.clone()
            },
            RouteField::Template,
            "empty",
        ),
        (
            RouteSpec {
                template: Some("{".repeat(MAX_REWRITE_BYTES + 1)),
                ..ok.clone()
            },
            RouteField::Template,
            "longer",
        ),
    ];
    for (bad, field, needle) in table {
        let err = compile_err(&[ok.clone(), bad.clone()]);
        assert_eq!(err.route, 1, "{bad:?}");
        assert_eq!(err.field, field, "{bad:?}");
        assert!(err.message.contains(needle), "{bad:?}: {}", err.message);
    }
}

#[test]
fn a_gateway_id_that_is_no_topic_text_is_refused_in_a_template() {
    let route = RouteSpec {
        template: Some("{gateway_id}/{topic}".into()),
        ..spec("#", &["local"])
    };
    let err = RouteTable::compile(std::slice::from_ref(&route), UPSTREAMS, "gw#1").unwrap_err();
    assert_eq!(err.field, RouteField::Template);
    assert!(RouteTable::compile(&[route], UPSTREAMS, "gw-1").is_ok());
}

#[test]
fn the_number_of_routes_is_bounded() {
    let routes = vec![spec("#", &["local"]); MAX_ROUTES];
    assert!(RouteTable::compile(&routes, UPSTREAMS, "gw").is_ok());
    let routes = vec![spec("#", &["local"]); MAX_ROUTES + 1];
    let err = RouteTable::compile(&routes, UPSTREAMS, "gw").unwrap_err();
    assert_eq!(err.route, MAX_ROUTES);
}

#[test]
fn downlink_follows_reversible_routes_only() {
    let table = compile(&[
        RouteSpec {
            template: Some("{client_id}/{topic}".into()),
            ..spec("per-client/#", &["cloud"])
        },
        RouteSpec {
            strip_prefix: Some("site/".into()),
            add_prefix: Some("fleet/gw1/".into()),
            ..spec("site/#", &["cloud"])
        },
        RouteSpec {
            template: Some("{gateway_id}/in/{topic}/set".into()),
            ..spec("cmd/+", &["local"])
        },
    ]);
    // A sensor subscribing to `site/+/cmd` gets it from the cloud under the rewritten name.
    assert_eq!(
        table.upstream_filters(CLOUD, "site/+/cmd"),
        ["fleet/gw1/+/cmd"]
    );
    assert_eq!(
        table.upstream_filters(LOCAL, "site/+/cmd"),
        Vec::<String>::new()
    );
    assert_eq!(table.upstream_filters(CLOUD, "#"), ["fleet/gw1/#"]);
    assert_eq!(
        table.upstream_filters(CLOUD, "per-client/x"),
        Vec::<String>::new(),
        "a template with {{client_id}} carries no downlink"
    );
    assert_eq!(table.upstream_filters(LOCAL, "cmd/+"), ["gw1/in/cmd/+/set"]);
    assert_eq!(
        table.upstream_filters(LOCAL, "cmd/#"),
        ["gw1/in/cmd/#"],
        "widened: `#` swallows the template's tail"
    );
    assert_eq!(
        table.downlink_topic(CLOUD, "fleet/gw1/t1/cmd").as_deref(),
        Some("site/t1/cmd")
    );
    assert_eq!(table.downlink_topic(CLOUD, "fleet/gw2/t1/cmd"), None);
    assert_eq!(
        table.downlink_topic(LOCAL, "gw1/in/cmd/x/set").as_deref(),
        Some("cmd/x")
    );
    assert_eq!(
        table.downlink_topic(LOCAL, "gw1/in/cmd/x/y/set"),
        None,
        "`cmd/x/y` is not matched by the route's filter"
    );
    assert_eq!(table.downlink_topic(LOCAL, "fleet/gw1/t1/cmd"), None);
}

#[test]
fn prefixes_inside_a_level_widen_the_upstream_filter() {
    let table = compile(&[RouteSpec {
        strip_prefix: Some("sen".into()),
        add_prefix: Some("x".into()),
        ..spec("#", &["local"])
    }]);
    // `sensors/+` -> stripped `sors/+` -> `xsors/+`.
    assert_eq!(table.upstream_filters(LOCAL, "sensors/+"), ["xsors/+"]);
    // `+/a` -> the first level is `sen...`: `+/a`, then `x` glued to `+` -> `+/a`.
    assert_eq!(table.upstream_filters(LOCAL, "+/a"), ["+/a"]);
    assert_eq!(
        table.upstream_filters(LOCAL, "other/a"),
        Vec::<String>::new()
    );
}

#[test]
fn filters_overlap_is_used_for_the_route_filter() {
    let table = compile(&[spec("a/+", &["local"])]);
    assert_eq!(table.upstream_filters(LOCAL, "+/b"), ["+/b"]);
    assert_eq!(table.upstream_filters(LOCAL, "b/#"), Vec::<String>::new());
    assert_eq!(table.downlink_topic(LOCAL, "c/b"), None);
}

// --------------------------------------------------------------------------------------
// Properties.

fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(""),
        Just("a"),
        Just("b"),
        Just("s"),
        Just("$s"),
        Just("sa")
    ]
    .prop_map(String::from)
}

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..5)
        .prop_map(|l| l.join("/"))
        .prop_filter("a name is not empty", |n| !n.is_empty())
}

fn filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![level(), Just("+".to_owned())];
    (prop::collection::vec(level, 0..4), any::<bool>()).prop_filter_map(
        "a filter",
        |(mut levels, hash)| {
            if hash {
                levels.push("#".into());
            }
            let f = levels.join("/");
            topic::is_valid_filter(&f).then_some(f)
        },
    )
}

fn prefix() -> impl Strategy<Value = Option<String>> {
    prop::option::of(
        prop_oneof![Just("s/"), Just("s"), Just("a/b/"), Just("$s/"), Just("/")]
            .prop_map(String::from),
    )
}

/// Reversible rewrites (templates with `{topic}` once and `{gateway_id}`) and a few others.
fn rewrite() -> impl Strategy<Value = (Option<String>, Option<String>)> {
    prop_oneof![
        Just((None, None)),
        prefix().prop_map(|p| (p, None)),
        prop_oneof![
            Just("{topic}"),
            Just("x/{topic}"),
            Just("{gateway_id}/{topic}/up"),
            Just("{topic}z"),
            Just("g{topic}/"),
            Just("{client_id}/{topic}"),
            Just("{protocol}{topic}"),
            Just("{{{topic}}}"),
            Just("fixed"),
        ]
        .prop_map(|t| (None, Some(t.to_owned()))),
    ]
}

fn route_spec() -> impl Strategy<Value = RouteSpec> {
    (filter(), prefix(), rewrite(), any::<bool>()).prop_map(
        |(filter, strip_prefix, (add_prefix, template), both)| RouteSpec {
            filter,
            upstreams: if both {
                vec!["local".into(), "cloud".into()]
            } else {
                vec!["cloud".into()]
            },
            strip_prefix,
            add_prefix,
            template,
            qos_max: None,
        },
    )
}

proptest! {
    #[test]
    fn the_reverse_mapping_only_yields_topics_a_route_takes(
        specs in prop::collection::vec(route_spec(), 1..4),
        sensor_filter in filter(),
        broker_topics in prop::collection::vec(name(), 1..8),
    ) {
        let table = RouteTable::compile(&specs, UPSTREAMS, "gw").unwrap();
        for upstream in [LOCAL, CLOUD] {
            for f in table.upstream_filters(upstream, &sensor_filter) {
                prop_assert!(topic::is_valid_filter(&f), "{f:?}");
                for t in &broker_topics {
                    let t = format!("x/{t}");
                    for t in [t.as_str(), &t[2..]] {
                        if !topic::matches(&f, t) {
                            continue;
                        }
                        if let Some(back) = table.downlink_topic(upstream, t) {
                            prop_assert!(topic::is_valid_name(&back), "{back:?}");
                            prop_assert!(
                                table.routes.iter().any(|r| r.upstreams.contains(&upstream)
                                    && topic::matches(&r.filter, &back)),
                                "{t:?} -> {back:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_reversible_route_maps_its_rewrite_back(route in route_spec(), topic in name()) {
        let table = RouteTable::compile(std::slice::from_ref(&route), UPSTREAMS, "gw").unwrap();
        let reversible = table.routes[0].reverse.is_some();
        let strip_applies = route.strip_prefix.as_deref().is_none_or(|p| {
            topic.strip_prefix(p).is_some_and(|rest| !rest.is_empty())
        });
        if let Some(target) = table.target(CLOUD, &topic, Qos::AtMostOnce, &Origin::default()) {
            prop_assert!(topic::is_valid_name(&target.topic));
            let back = table.downlink_topic(CLOUD, &target.topic);
            if reversible && strip_applies {
                prop_assert_eq!(back.as_deref(), Some(topic.as_str()));
            }
        }
    }

    #[test]
    fn a_subscription_covers_every_topic_its_route_sends(
        route in route_spec(),
        sensor_filter in filter(),
        topic in name(),
    ) {
        let table = RouteTable::compile(std::slice::from_ref(&route), UPSTREAMS, "gw").unwrap();
        let strip_applies = route.strip_prefix.as_deref().is_none_or(|p| {
            topic.strip_prefix(p).is_some_and(|rest| !rest.is_empty())
        });
        // Only these are promised (skipped rather than rejected: most inputs are not).
        if table.routes[0].reverse.is_none()
            || !strip_applies
            || !topic::matches(&sensor_filter, &topic)
        {
            return Ok(());
        }
        let Some(target) = table.target(CLOUD, &topic, Qos::AtMostOnce, &Origin::default())
        else {
            return Ok(());
        };
        // Brokers keep `$` topics from wildcard-first filters (documented).
        if target.topic.starts_with('$') {
            return Ok(());
        }
        let filters = table.upstream_filters(CLOUD, &sensor_filter);
        prop_assert!(
            filters.iter().any(|f| topic::matches(f, &target.topic)),
            "{topic:?} -> {:?} not in {filters:?}", target.topic
        );
    }
}
