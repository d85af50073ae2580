//! Config validation tests: every error located, all of them reported.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
[gateway]
id = 1
state_dir = "/tmp/sg"
[mqttsn]
listen = ["127.0.0.1:1883", "[::1]:1883"]
[[mqttsn.predefined_topic]]
id = 1
topic = "sensors/predefined/1"
clients = ["*"]
[[upstream]]
name = "local"
kind = "mqtt"
url = "mqtt://127.0.0.1:1883"
remote_prefix = ""
"#;

/// The diagnostics of a config that must not parse (every section's tests use it).
pub(super) fn errors(text: &str) -> Vec<Diagnostic> {
    match Config::parse(Path::new("test.toml"), text) {
        Ok(_) => panic!("expected errors"),
        Err(LoadError::Invalid(d)) => d,
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn the_fixed_example_is_valid() {
    let c = Config::parse(Path::new("test.toml"), MINIMAL).unwrap();
    assert_eq!(c.gateway.id, 1);
    assert_eq!(c.mqttsn.listen.len(), 2);
    assert_eq!(c.mqttsn.core.predefined.len(), 1);
    assert_eq!(c.upstreams.len(), 1);
    let UpstreamKind::Mqtt(m) = &c.upstreams[0].kind else {
        panic!("an MQTT upstream")
    };
    assert_eq!(
        (m.host.as_str(), m.port, m.tls.is_none()),
        ("127.0.0.1", 1883, true)
    );
    assert!(
        c.summary()
            .contains("upstream local: MQTT 5 at mqtt://127.0.0.1:1883")
    );
}

#[test]
fn unknown_keys_are_all_reported_with_location_and_hint() {
    let text = MINIMAL.replace(
        "[mqttsn]\n",
        "[mqttsn]\nmax_client = 5\nlisten_adress = 1\n",
    ) + "\n[gatway]\nid = 2\n";
    let d = errors(&text);
    assert_eq!(d.len(), 3, "{d:#?}");
    assert_eq!(d[0].message, "unknown key `max_client` in `[mqttsn]`");
    assert_eq!(d[0].hint.as_deref(), Some("did you mean `max_clients`?"));
    assert_eq!((d[0].line, d[0].column), (6, 1));
    assert_eq!(d[1].message, "unknown key `listen_adress` in `[mqttsn]`");
    assert_eq!(d[1].hint.as_deref(), Some("did you mean `listen`?"));
    assert_eq!(d[2].message, "unknown key `gatway`");
    assert_eq!(d[2].hint.as_deref(), Some("did you mean `gateway`?"));
    assert!(
        d[0].to_string()
            .starts_with("test.toml:6:1: error: unknown key `max_client`")
    );
}

#[test]
fn semantic_errors_are_collected_together() {
    let text = MINIMAL
        .replace("id = 1\nstate_dir", "id = 300\nstate_dir")
        .replace("\"[::1]:1883\"", "\"localhost:1883\"")
        .replace(
            "remote_prefix = \"\"",
            "remote_prefix = \"\"\nbackoff_max = \"abc\"\nprotocol = \"6\"",
        );
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 4, "{msgs:#?}");
    assert!(msgs[0].starts_with("`gateway.id`: 300 is out of range 0..=255"));
    assert_eq!((d[0].line, d[0].column), (3, 6));
    assert!(
        msgs[1].starts_with("`mqttsn.listen[1]`: `localhost:1883` is not an IP socket address")
    );
    assert_eq!(d[1].line, 6);
    assert!(msgs[2].starts_with("`upstream[0].backoff_max`: invalid duration `abc`"));
    assert!(msgs[3].starts_with("`upstream[0].protocol`: unknown MQTT protocol version `6`"));
}

#[test]
fn syntax_errors_point_at_the_spot() {
    let d = errors("[gateway]\nid = = 1\n");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].line, 2);
    assert!(d[0].message.starts_with("invalid TOML"));
}

#[test]
fn type_errors_are_located() {
    let d = errors(&MINIMAL.replace("id = 1\nstate_dir", "id = \"one\"\nstate_dir"));
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].line, 3);
}

#[test]
fn four_wrong_types_give_four_errors_in_the_configs_terms() {
    let text = MINIMAL.replace(
        "[mqttsn]\n",
        "[mqttsn]\nretry_interval = 10\nmax_packet_size = 4096\nqos_minus_one = \"yes\"\n",
    ) + "[spool]\nqueue = \"5\"\n";
    let d = errors(&text);
    let msgs: Vec<String> = d.iter().map(|d| d.to_string()).collect();
    assert_eq!(d.len(), 4, "{msgs:#?}");
    let at = |needle: &str| {
        let line = text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
        (line, needle.len() + 1)
    };
    assert_eq!((d[0].line, d[0].column), at("retry_interval = "));
    assert_eq!(
        d[0].message,
        "`mqttsn.retry_interval`: expected a duration such as \"10s\", found the integer 10"
    );
    assert_eq!((d[1].line, d[1].column), at("max_packet_size = "));
    assert_eq!(
        d[1].message,
        "`mqttsn.max_packet_size`: expected a size such as \"4KiB\", found the integer 4096"
    );
    assert_eq!((d[2].line, d[2].column), at("qos_minus_one = "));
    assert_eq!(
        d[2].message,
        "`mqttsn.qos_minus_one`: expected true or false, found the string \"yes\""
    );
    assert_eq!((d[3].line, d[3].column), at("queue = "));
    assert_eq!(
        d[3].message,
        "`spool.queue`: expected an integer, found the string \"5\""
    );
    assert_eq!(
        d[3].hint.as_deref(),
        Some("write the number without quotes: 5")
    );
    assert!(msgs[0].starts_with("test.toml:"), "{}", msgs[0]);
}

#[test]
fn wrong_types_unknown_keys_and_bad_values_are_reported_together() {
    let text = MINIMAL
        .replace("id = 1\nstate_dir", "id = 300\nstate_dir")
        .replace(
            "[mqttsn]\n",
            "[mqttsn]\nmax_client = 5\nmax_retries = \"3\"\n",
        )
        .replace("name = \"local\"", "name = 7");
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 4, "{msgs:#?}");
    assert!(
        msgs[0].starts_with("`gateway.id`: 300 is out of range"),
        "{msgs:#?}"
    );
    assert_eq!(msgs[1], "unknown key `max_client` in `[mqttsn]`");
    assert_eq!(
        msgs[2],
        "`mqttsn.max_retries`: expected an integer, found the string \"3\""
    );
    // A wrongly typed required key is reported once, not again as missing or invalid.
    assert_eq!(
        msgs[3],
        "`upstream[0].name`: expected a string, found the integer 7"
    );
}

#[test]
fn required_keys_are_reported_as_missing() {
    let d = errors(&MINIMAL.replace("name = \"local\"\n", ""));
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].message, "`upstream[0].name`: is required");
    let d = errors(&MINIMAL.replace("topic = \"sensors/predefined/1\"\n", ""));
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(
        d[0].message,
        "`mqttsn.predefined_topic[0].topic`: is required"
    );
}

#[test]
fn predefined_ids_must_be_unambiguous() {
    let text = MINIMAL.to_owned()
        + "[[mqttsn.predefined_topic]]\nid = 1\ntopic = \"other\"\nclients = [\"dev1\"]\n"
        + "[[mqttsn.predefined_topic]]\nid = 0\ntopic = \"a/+\"\n";
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 3, "{msgs:#?}");
    assert!(msgs[0].contains("predefined topic id 1 is already defined for all clients"));
    assert!(msgs[1].contains("0 is out of range 1..=65534"));
    assert!(msgs[2].contains("must not contain wildcards"));
}

#[test]
fn a_remote_prefix_must_start_a_valid_topic() {
    for (prefix, expected) in [
        ("site/+/", "must not contain wildcards"),
        ("site\\u0007/", "control characters"),
    ] {
        let text = MINIMAL.replace(
            "remote_prefix = \"\"",
            &format!("remote_prefix = \"{prefix}\""),
        );
        let d = errors(&text);
        assert_eq!(d.len(), 1, "{d:#?}");
        assert!(d[0].message.contains(expected), "{}", d[0].message);
        assert!(d[0].message.contains("remote_prefix"), "{}", d[0].message);
    }
}

#[test]
fn an_upstream_is_required_and_kinds_are_checked() {
    let d = errors("[mqttsn]\nlisten = [\"127.0.0.1:1\"]\n");
    assert!(d[0].message.contains("no `[[upstream]]`"));
    let d = errors(&MINIMAL.replace("kind = \"mqtt\"", "kind = \"mqt\""));
    assert_eq!(d[0].hint.as_deref(), Some("did you mean `mqtt`?"));
    let d = errors(&MINIMAL.replace("mqtt://127.0.0.1:1883", "http://x"));
    assert!(d[0].message.starts_with("`upstream[0].url`"));
}

#[test]
fn sizes_and_durations_use_strings() {
    let text = MINIMAL.replace(
        "[mqttsn]\n",
        "[mqttsn]\nmax_packet_size = \"2KiB\"\nrecv_buffer = \"1\"\n",
    );
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert!(d[0].message.contains("missing unit"));
    let ok = MINIMAL.replace("[mqttsn]\n", "[mqttsn]\nmax_packet_size = \"2KiB\"\n");
    let c = Config::parse(Path::new("t.toml"), &ok).unwrap();
    assert_eq!(c.mqttsn.core.max_packet_size, 2048);
}

#[test]
fn the_session_log_bound_has_a_default_and_a_checked_range() {
    let c = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
    assert_eq!(c.mqttsn.session_log_max_size, 256 << 20);
    assert!(
        c.summary()
            .contains("sessions: sleeping and CleanSession=0 sessions kept in")
    );
    let ok = MINIMAL.replace("[mqttsn]\n", "[mqttsn]\nsession_log_max_size = \"2GiB\"\n");
    let c = Config::parse(Path::new("t.toml"), &ok).unwrap();
    assert_eq!(c.mqttsn.session_log_max_size, 2 << 30);
    let d = errors(&MINIMAL.replace("[mqttsn]\n", "[mqttsn]\nsession_log_max_size = \"64KiB\"\n"));
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(
        d[0].message
            .starts_with("`mqttsn.session_log_max_size`: 64KiB is out of range 1MiB..=64GiB"),
        "{}",
        d[0].message
    );
    assert_eq!(d[0].line, 6);
    let d = errors(&MINIMAL.replace("[mqttsn]\n", "[mqttsn]\nsession_log_max_siz = \"1MiB\"\n"));
    assert_eq!(
        d[0].hint.as_deref(),
        Some("did you mean `session_log_max_size`?")
    );
}

#[test]
fn reference_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["config/sensorgate.toml", "config/local.toml"] {
        let path = root.join(file);
        if let Err(e) = Config::load(&path) {
            panic!("{file}: {e}");
        }
    }
}

#[test]
fn max_filters_bounds_the_core_and_sizes_every_upstream_table() {
    let c = Config::parse(Path::new("test.toml"), MINIMAL).unwrap();
    assert_eq!(c.mqttsn.core.max_filters, MAX_SUBSCRIPTIONS);
    let text = MINIMAL.replace("[mqttsn]\n", "[mqttsn]\nmax_filters = 500\n");
    let c = Config::parse(Path::new("test.toml"), &text).unwrap();
    assert_eq!(c.mqttsn.core.max_filters, 500);
    let UpstreamKind::Mqtt(m) = &c.upstreams[0].kind else {
        panic!("an MQTT upstream")
    };
    assert_eq!(
        m.max_subscriptions, 501,
        "one more for the fleet control topic"
    );
    for bad in ["0", "65537"] {
        let text = MINIMAL.replace("[mqttsn]\n", &format!("[mqttsn]\nmax_filters = {bad}\n"));
        let d = errors(&text);
        assert!(d[0].message.contains("out of range"), "{d:?}");
    }
}

const AMQP: &str = r#"
[[upstream]]
name = "cloud"
kind = "amqp"
url = "amqp://guest:secret@127.0.0.1:5672/%2f"
"#;

#[test]
fn an_amqp_upstream_takes_defaults_and_hides_its_password() {
    let c = Config::parse(Path::new("test.toml"), &format!("{MINIMAL}{AMQP}")).unwrap();
    assert_eq!(c.upstreams.len(), 2);
    let up = &c.upstreams[1];
    let UpstreamKind::Amqp(a) = &up.kind else {
        panic!("an AMQP upstream")
    };
    assert_eq!(a.exchange, "amq.topic");
    assert_eq!(a.heartbeat, Duration::from_secs(30));
    assert_eq!(a.url, "amqp://guest:secret@127.0.0.1:5672/%2f");
    assert_eq!(up.url, "amqp://guest:***@127.0.0.1:5672/%2f");
    assert!(c.summary().contains(
        "upstream cloud: AMQP 0-9-1 at amqp://guest:***@127.0.0.1:5672/%2f, exchange `amq.topic`"
    ));
    assert!(!c.summary().contains("secret"));
}

#[test]
fn amqp_settings_are_read() {
    let text = format!(
        "{MINIMAL}{AMQP}exchange = \"sensors\"\nheartbeat = \"5s\"\nmax_inflight = 7\n\
         ack_timeout = \"2s\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n"
    );
    let c = Config::parse(Path::new("test.toml"), &text).unwrap();
    let UpstreamKind::Amqp(a) = &c.upstreams[1].kind else {
        panic!("an AMQP upstream")
    };
    assert_eq!(
        (a.exchange.as_str(), a.heartbeat, a.max_inflight),
        ("sensors", Duration::from_secs(5), 7)
    );
    assert_eq!(
        (a.backoff_initial, a.backoff_max),
        (Duration::from_millis(100), Duration::from_secs(1))
    );
    assert_eq!(c.upstreams[1].ack_timeout, Duration::from_secs(2));
}

#[test]
fn a_bad_amqp_url_and_mqtt_only_keys_are_located() {
    let text = format!("{MINIMAL}{AMQP}")
        .replace("amqp://guest:secret@127.0.0.1:5672/%2f", "amqp://h:port/")
        + "client_id = \"x\"\nexchang = \"e\"\n";
    let d = errors(&text);
    assert_eq!(d.len(), 3, "{d:#?}");
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let unknown = d.iter().find(|d| d.message.contains("exchang")).unwrap();
    assert_eq!(unknown.hint.as_deref(), Some("did you mean `exchange`?"));
    assert_eq!(unknown.line, line_of("exchang ="));
    let url = d.iter().find(|d| d.message.contains("AMQP URL")).unwrap();
    assert_eq!((url.line, url.column), (line_of("amqp://h:port/"), 7));
    let id = d
        .iter()
        .find(|d| d.message.contains("not an AMQP"))
        .unwrap();
    assert_eq!(id.line, line_of("client_id"));
}

#[test]
fn amqp_keys_on_an_mqtt_upstream_are_errors() {
    let d = errors(&MINIMAL.replace("remote_prefix = \"\"", "exchange = \"x\""));
    assert!(d[0].message.contains("is an AMQP setting"), "{d:#?}");
}

/// MINIMAL and AMQP ("local" and "cloud") with two routes.
fn with_routes(routes: &str) -> String {
    format!("{MINIMAL}{AMQP}{routes}")
}

const ROUTES: &str = r##"
[[route]]
filter = "#"
upstreams = ["local"]

[[route]]
filter = "sensors/#"
upstreams = ["local", "cloud"]
strip_prefix = "sensors/"
template = "plants/{gateway_id}/{protocol}/{client_id}/{topic}"
qos_max = 1
"##;

/// Line and column (1-based) of the first occurrence of `needle` in `text`.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    let offset = text.find(needle).unwrap();
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[test]
fn without_routes_everything_goes_everywhere() {
    let c = Config::parse(Path::new("test.toml"), &with_routes("")).unwrap();
    assert!(c.routes.is_everything());
    assert!(c.route_specs.is_empty());
    assert!(c.summary().contains("routes: none"), "{}", c.summary());
}

#[test]
fn routes_are_compiled_against_the_upstreams() {
    let c = Config::parse(Path::new("test.toml"), &with_routes(ROUTES)).unwrap();
    assert!(!c.routes.is_everything());
    assert_eq!(c.route_specs.len(), 2);
    let spec = &c.route_specs[1];
    assert_eq!(spec.filter, "sensors/#");
    assert_eq!(spec.upstreams, ["local", "cloud"]);
    assert_eq!(spec.strip_prefix.as_deref(), Some("sensors/"));
    assert_eq!(spec.add_prefix, None);
    assert_eq!(
        spec.template.as_deref(),
        Some("plants/{gateway_id}/{protocol}/{client_id}/{topic}")
    );
    assert_eq!(
        spec.qos_max,
        Some(sensorgate_bridges::message::Qos::AtLeastOnce)
    );
    let summary = c.summary();
    assert!(summary.contains("route 0: `#` to local\n"), "{summary}");
    assert!(
        summary.contains("route 1: `sensors/#` to local, cloud, strip `sensors/`, as "),
        "{summary}"
    );
    assert!(summary.contains("QoS at most 1"), "{summary}");
    assert!(summary.contains("a message no route matches is refused"));

    // Without a catch-all, a topic no route matches is refused.
    let only = "[[route]]\nfilter = \"sensors/#\"\nupstreams = [\"cloud\"]\n";
    let c = Config::parse(Path::new("test.toml"), &with_routes(only)).unwrap();
    assert!(c.routes.accepts("sensors/t1"));
    assert!(!c.routes.accepts("site/chatter"));
}

#[test]
fn a_route_naming_an_unknown_upstream_is_located() {
    let text = with_routes(&ROUTES.replace("[\"local\", \"cloud\"]", "[\"local\", \"clod\"]"));
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(
        d[0].message,
        "`route[1].upstreams[1]`: no upstream is named `clod`"
    );
    assert_eq!(d[0].hint.as_deref(), Some("did you mean `cloud`?"));
    assert_eq!((d[0].line, d[0].column), position_of(&text, "\"clod\""));

    let text = with_routes("[[route]]\nfilter = \"#\"\nupstreams = [\"elsewhere\"]\n");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(
        d[0].hint.as_deref(),
        Some("the upstreams configured are: local, cloud")
    );
}

#[test]
fn an_invalid_route_filter_is_located() {
    for filter in ["sensors/#/x", "sensors/t+", ""] {
        let text = with_routes(&ROUTES.replace("\"sensors/#\"", &format!("\"{filter}\"")));
        let d = errors(&text);
        assert_eq!(d.len(), 1, "{filter}: {d:#?}");
        assert!(
            d[0].message.starts_with("`route[1].filter`: "),
            "{}",
            d[0].message
        );
        assert!(d[0].message.contains("not a valid topic filter"));
        let at = position_of(&text, &format!("filter = \"{filter}\""));
        assert_eq!((d[0].line, d[0].column), (at.0, at.1 + "filter = ".len()));
    }
}

#[test]
fn a_template_with_an_unknown_placeholder_is_located() {
    let text = with_routes(&ROUTES.replace("{gateway_id}", "{gateway}"));
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(
        d[0].message,
        "`route[1].template`: unknown placeholder `{gateway}`"
    );
    assert_eq!(d[0].hint.as_deref(), Some("did you mean `{gateway_id}`?"));
    let at = position_of(&text, "template = ");
    assert_eq!((d[0].line, d[0].column), (at.0, at.1 + "template = ".len()));
    assert!(
        d[0].to_string()
            .starts_with(&format!("test.toml:{}:{}: error: ", d[0].line, d[0].column))
    );
}

#[test]
fn templates_are_checked_locally() {
    let check = |t: &str| route::check_template(t).map_err(|(message, _)| message);
    assert_eq!(check("{topic}"), Ok(()));
    assert_eq!(
        check("a/{gateway_id}/{protocol}/{client_id}/{topic}/z"),
        Ok(())
    );
    assert_eq!(check("fixed/topic"), Ok(()));
    assert_eq!(
        check("a/{nope}"),
        Err("unknown placeholder `{nope}`".into())
    );
    assert_eq!(check("a/{}"), Err("unknown placeholder `{}`".into()));
    assert_eq!(
        check("a/{topic"),
        Err("has a `{` that is not closed by a `}`".into())
    );
    assert_eq!(
        check("a/{to{pic}"),
        Err("has a `{` that is not closed by a `}`".into())
    );
    assert_eq!(
        check("a/topic}"),
        Err("has a `}` that closes no placeholder".into())
    );
    // Doubled braces are literal braces.
    assert_eq!(check("a/{{literal}}/{topic}"), Ok(()));
    assert_eq!(check("a/}}{{"), Ok(()));
    let long = format!("{}/{{topic}}", "x".repeat(MAX_REWRITE_BYTES));
    assert_eq!(check(&long), Err("is longer than 1024 bytes".into()));
    assert_eq!(
        check("a/+/{topic}"),
        Err("must not contain wildcards (`+`, `#`)".into())
    );
    assert_eq!(check(""), Err("must not be empty".into()));
    let (_, hint) = route::check_template("{x}").unwrap_err();
    assert_eq!(
        hint.as_deref(),
        Some("the placeholders are {topic}, {client_id}, {protocol}, {gateway_id}")
    );
}

#[test]
fn every_route_key_is_checked_and_all_errors_are_reported_together() {
    let text = with_routes(
        "[[route]]\nupstreams = []\nstrip_prefix = \"\"\nadd_prefix = \"a/#\"\nqos_max = 3\n\
         [[route]]\nfilter = \"x\"\nupstreams = [\"local\", \"local\"]\n\
         add_prefix = \"p/\"\ntemplate = \"{topic}\"\n",
    );
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(
        msgs,
        [
            "`route[0].filter`: is required",
            "`route[0].upstreams`: must name at least one upstream",
            "`route[0].strip_prefix`: must not be empty (leave the key out for no prefix)",
            "`route[0].add_prefix`: must not contain wildcards (`+`, `#`)",
            "`route[0].qos_max`: 3 is out of range 0..=2",
            "`route[1].upstreams[1]`: `local` is listed twice",
            "`route[1].add_prefix`: cannot be used with template",
        ]
    );
    // A missing key is reported at its entry.
    assert_eq!(d[0].line, position_of(&text, "[[route]]").0);
}

#[test]
fn route_counts_and_prefix_lengths_are_bounded() {
    let one = "[[route]]\nfilter = \"#\"\nupstreams = [\"local\"]\n";
    let c = Config::parse(
        Path::new("test.toml"),
        &with_routes(&one.repeat(MAX_ROUTES)),
    )
    .unwrap();
    assert_eq!(c.route_specs.len(), MAX_ROUTES);
    let text = with_routes(&one.repeat(MAX_ROUTES + 1));
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(
        d[0].message,
        format!("`route[{MAX_ROUTES}]`: at most {MAX_ROUTES} routes can be configured")
    );
    let long = "x/".repeat(MAX_REWRITE_BYTES / 2 + 1);
    let d = errors(&with_routes(&format!("{one}add_prefix = \"{long}\"\n")));
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(
        d[0].message,
        "`route[0].add_prefix`: is longer than 1024 bytes"
    );
}

#[test]
fn unknown_route_keys_get_a_hint() {
    let text = with_routes("[[route]]\nfilter = \"#\"\nupstream = [\"local\"]\n");
    let d = errors(&text);
    assert_eq!(d.len(), 2, "{d:#?}");
    // The missing key is reported at its entry, before the misspelt one.
    assert_eq!(d[0].message, "`route[0].upstreams`: is required");
    assert_eq!(d[1].message, "unknown key `upstream` in `[route]`");
    assert_eq!(d[1].hint.as_deref(), Some("did you mean `upstreams`?"));
    assert_eq!((d[1].line, d[1].column), position_of(&text, "upstream = "));
}

#[test]
fn wrongly_typed_route_keys_are_reported_once() {
    let text = with_routes("[[route]]\nfilter = \"#\"\nupstreams = \"local\"\nqos_max = \"1\"\n");
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(
        msgs,
        [
            "`route[0].upstreams`: expected an array, found the string \"local\"",
            "`route[0].qos_max`: expected an integer, found the string \"1\"",
        ]
    );
}

/// The route table's own errors (the checks `RouteTable::compile` makes beyond the local
/// ones) are reported at the key they name, in the entry they name.
#[test]
fn route_table_errors_are_located_at_their_key() {
    use sensorgate_bridges::route::{RouteError, RouteField};
    let text = with_routes(ROUTES);
    let root = toml::de::DeTable::parse(&text).unwrap();
    for (field, key, needle) in [
        (RouteField::Filter, "filter", "filter = \"sensors/#\""),
        (
            RouteField::Upstreams,
            "upstreams",
            "upstreams = [\"local\", ",
        ),
        (RouteField::StripPrefix, "strip_prefix", "strip_prefix = "),
        (RouteField::Template, "template", "template = "),
        (RouteField::QosMax, "qos_max", "qos_max = "),
    ] {
        let error = RouteError {
            route: 1,
            field,
            message: "wrong".into(),
        };
        let path = route::route_error_path(&error);
        assert_eq!(path.to_string(), format!("route[1].{key}"));
        let mut r = Reporter::new(Path::new("test.toml"), &text, Some(&root));
        r.at_path(&path, error.message.clone(), None);
        let d = r.finish();
        let at = position_of(&text, needle);
        assert_eq!(
            (d[0].line, d[0].column),
            (at.0, at.1 + key.len() + " = ".len()),
            "{key}"
        );
        assert_eq!(d[0].message, format!("`route[1].{key}`: wrong"));
    }
    // The table's messages may start with the key; the diagnostic names it already.
    let error = RouteError {
        route: 1,
        field: RouteField::Template,
        message: "template: unknown placeholder `{x}`".into(),
    };
    assert_eq!(
        route::route_error_message(&error),
        "unknown placeholder `{x}`"
    );
    let error = RouteError {
        route: 1,
        field: RouteField::Filter,
        message: "template: is not stripped from another key's error".into(),
    };
    assert_eq!(route::route_error_message(&error), error.message);
    // A key the entry does not have: its entry.
    let error = RouteError {
        route: 0,
        field: RouteField::AddPrefix,
        message: "wrong".into(),
    };
    let mut r = Reporter::new(Path::new("test.toml"), &text, Some(&root));
    r.at_path(&route::route_error_path(&error), "wrong".into(), None);
    assert_eq!(r.finish()[0].line, position_of(&text, "[[route]]").0);
}

#[test]
fn backlog_caps_default_to_unbounded_and_are_read_for_every_kind() {
    use sensorgate_bridges::spool::BacklogLimit;
    let c = Config::parse(Path::new("test.toml"), &with_routes("")).unwrap();
    assert_eq!(c.upstreams[0].max_backlog, BacklogLimit::default());
    assert_eq!(c.upstreams[1].max_backlog, BacklogLimit::default());
    assert!(!c.summary().contains("backlog at most"));

    let text = MINIMAL.replace(
        "remote_prefix = \"\"",
        "remote_prefix = \"\"\nmax_backlog_age = \"36h\"",
    ) + AMQP
        + "max_backlog = \"2GiB\"\nmax_backlog_age = \"7d\"\n";
    let c = Config::parse(Path::new("test.toml"), &text).unwrap();
    assert_eq!(
        c.upstreams[0].max_backlog,
        BacklogLimit {
            bytes: None,
            age: Some(Duration::from_secs(36 * 3600)),
        }
    );
    assert_eq!(
        c.upstreams[1].max_backlog,
        BacklogLimit {
            bytes: Some(2 << 30),
            age: Some(Duration::from_secs(7 * 86_400)),
        }
    );
    let summary = c.summary();
    assert!(
        summary.contains("upstream local: backlog at most 1day 12h, beyond it"),
        "{summary}"
    );
    assert!(
        summary.contains("upstream cloud: backlog at most 2GiB and 7days, beyond it"),
        "{summary}"
    );
}

#[test]
fn backlog_caps_are_range_checked_and_located() {
    let text = MINIMAL.replace(
        "remote_prefix = \"\"",
        "remote_prefix = \"\"\nmax_backlog = \"512KiB\"\nmax_backlog_age = \"0s\"",
    ) + AMQP
        + "max_backlog = 100\nmax_backlog_age = \"soon\"\n";
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 4, "{msgs:#?}");
    assert_eq!(
        msgs[0],
        "`upstream[0].max_backlog`: 512KiB is out of range 1MiB..=64TiB"
    );
    let at = position_of(&text, "max_backlog = \"512KiB\"");
    assert_eq!(
        (d[0].line, d[0].column),
        (at.0, at.1 + "max_backlog = ".len())
    );
    assert!(
        msgs[1].starts_with("`upstream[0].max_backlog_age`: 0s is out of range 1s..="),
        "{}",
        msgs[1]
    );
    assert_eq!(
        msgs[2],
        "`upstream[1].max_backlog`: expected a size such as \"4KiB\", found the integer 100"
    );
    assert!(
        msgs[3].starts_with("`upstream[1].max_backlog_age`: invalid duration `soon`"),
        "{}",
        msgs[3]
    );
}

#[test]
fn amqp_downlink_and_tls_settings_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let text = format!(
        "{MINIMAL}{AMQP}downlink_queue = \"sg-down\"\nbindings = [\"cmd.#\"]\n\
         max_unacked_downlinks = 9\nmax_downlink_bytes = \"1KiB\"\n"
    );
    let c = Config::parse(Path::new("test.toml"), &text).unwrap();
    let UpstreamKind::Amqp(a) = &c.upstreams[1].kind else {
        panic!("an AMQP upstream")
    };
    assert_eq!(a.downlink_queue, DownlinkQueue::Durable("sg-down".into()));
    assert_eq!(a.bindings, vec!["cmd.#".to_owned()]);
    assert_eq!((a.max_unacked_downlinks, a.max_downlink_bytes), (9, 1024));
    assert!(
        c.summary()
            .contains("downlink from durable queue `sg-down`")
    );
    // TLS files need amqps://, and an unreadable CA is reported at its key.
    let d = errors(&format!("{MINIMAL}{AMQP}ca_file = \"{}\"\n", ca.display()));
    assert!(
        d.iter().any(|d| d.message.contains("not `amqps://`")),
        "{d:#?}"
    );
    let text = format!("{MINIMAL}{AMQP}ca_file = \"{}\"\n", ca.display())
        .replace("amqp://guest", "amqps://guest");
    let d = errors(&text);
    let line = text.lines().position(|l| l.starts_with("ca_file")).unwrap() + 1;
    assert!(d.iter().any(|d| d.line == line), "{d:#?}");
}

#[test]
fn amqp_downlink_mistakes_are_located() {
    let text = format!("{MINIMAL}{AMQP}downlink_queue_passive = true\nmax_unacked_downlinks = 0\n");
    let d = errors(&text);
    let line_of = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    assert!(
        d.iter()
            .any(|d| d.line == line_of("downlink_queue_passive") && d.message.contains("needs")),
        "{d:#?}"
    );
    assert!(
        d.iter()
            .any(|d| d.line == line_of("max_unacked_downlinks")
                && d.message.contains("out of range")),
        "{d:#?}"
    );
    let text = format!(
        "{MINIMAL}{AMQP}downlink_queue = \"q\"\ndownlink_queue_passive = true\nbindings = [\"a\"]\n"
    );
    let d = errors(&text);
    assert!(d.iter().any(|d| d.message.contains("used as-is")), "{d:#?}");
    // An AMQP key on an MQTT upstream is an error.
    let d = errors(&MINIMAL.replace("remote_prefix = \"\"", "bindings = [\"x\"]"));
    assert!(d[0].message.contains("is an AMQP setting"), "{d:#?}");
}

#[test]
fn amqp_credentials_and_vhost_may_be_keys_instead_of_url_parts() {
    let text = format!(
        "{MINIMAL}{}username = \"gw7\"\npassword = \"p@ss/word\"\nvhost = \"fleet\"\n",
        AMQP.replace("guest:secret@", "")
    );
    let c = Config::parse(Path::new("test.toml"), &text).unwrap();
    let UpstreamKind::Amqp(a) = &c.upstreams[1].kind else {
        panic!("not AMQP: {:?}", c.upstreams[1].kind)
    };
    assert_eq!(
        (
            a.username.as_deref(),
            a.password.as_deref(),
            a.vhost.as_deref()
        ),
        (Some("gw7"), Some("p@ss/word"), Some("fleet"))
    );
    let uri = a.validate().unwrap();
    assert_eq!(uri.vhost, "fleet");
    assert!(!c.summary().contains("p@ss"), "the password is never shown");
    // vhost is an AMQP key: an error on an MQTT upstream.
    let d = errors(&MINIMAL.replace("remote_prefix = \"\"", "vhost = \"x\""));
    assert!(d[0].message.contains("is an AMQP setting"), "{d:#?}");
}

#[test]
fn the_admin_listener_is_on_loopback_by_default_and_off_when_empty() {
    let c = Config::parse(Path::new("test.toml"), MINIMAL).unwrap();
    assert_eq!(c.admin.listen, Some(DEFAULT_ADMIN_LISTEN.parse().unwrap()));
    assert_eq!(c.admin.token, None);
    assert_eq!((c.admin.event_history, c.admin.max_connections), (100, 16));
    assert!(
        c.summary()
            .contains("admin (metrics, health, status, console) on http://127.0.0.1:9180/")
    );
    let off = format!("{MINIMAL}[admin]\nlisten = \"\"\n");
    let c = Config::parse(Path::new("test.toml"), &off).unwrap();
    assert_eq!(c.admin.listen, None);
    assert!(c.summary().contains("listener: admin off"));
}

#[test]
fn an_admin_listener_reachable_from_other_hosts_needs_a_token() {
    let open = format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9180\"\n");
    let d = errors(&open);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(
        d[0].message
            .starts_with("`admin.listen`: `0.0.0.0:9180` is reachable from other hosts"),
        "{}",
        d[0].message
    );
    assert_eq!(d[0].line, position_of(&open, "listen = \"0.0.0.0").0);
    let guarded =
        format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9180\"\ntoken = \"0123456789abcdef0123\"\n");
    let c = Config::parse(Path::new("test.toml"), &guarded).unwrap();
    assert_eq!(c.admin.token.as_deref(), Some("0123456789abcdef0123"));
}

#[test]
fn admin_keys_are_checked_and_located() {
    let text = format!(
        "{MINIMAL}[admin]\nlisten = \"localhost:9180\"\ntoken = \"short\"\nevent_history = 0\nmax_connections = 5000\nevnt_history = 3\n"
    );
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 5, "{msgs:#?}");
    for (needle, key) in [
        (
            "listen = \"localhost",
            "`admin.listen`: `localhost:9180` is not an IP socket address",
        ),
        (
            "token = \"short",
            "`admin.token`: must be at least 16 characters",
        ),
        (
            "event_history = 0",
            "`admin.event_history`: 0 is out of range 1..=10000",
        ),
        (
            "max_connections = 5000",
            "`admin.max_connections`: 5000 is out of range 1..=1024",
        ),
    ] {
        let line = position_of(&text, needle).0;
        assert!(
            d.iter()
                .any(|d| d.line == line && d.message.starts_with(key)),
            "{key} at line {line}: {msgs:#?}"
        );
    }
    assert!(
        d.iter().any(|d| d.message.contains("evnt_history")),
        "{msgs:#?}"
    );
}

/// `MINIMAL` with a `[coap]` table of `keys` (one per line) appended.
fn with_coap(keys: &str) -> String {
    format!("{MINIMAL}[coap]\n{keys}")
}

/// Line and column (1-based) of `needle` at or after the `[coap]` table.
fn position_in_coap(text: &str, needle: &str) -> (usize, usize) {
    let start = text.find("[coap]").unwrap();
    let offset = start + text[start..].find(needle).unwrap();
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[test]
fn coap_is_off_without_a_table_or_listen_address() {
    let c = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
    assert!(c.coap.is_none());
    assert!(
        c.summary().contains("listener: CoAP off\n"),
        "{}",
        c.summary()
    );
    let c = Config::parse(Path::new("t.toml"), &with_coap("listen = []\n")).unwrap();
    assert!(c.coap.is_none());
    // Off, and still checked.
    let d = errors(&with_coap("listen = []\nack_timeout = \"2\"\n"));
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(
        d[0].message
            .starts_with("`coap.ack_timeout`: invalid duration")
    );
}

#[test]
fn coap_takes_the_cores_defaults_and_shows_in_the_summary() {
    let text = with_coap("listen = [\"127.0.0.1:5683\", \"[::1]:5683\"]\n");
    let c = Config::parse(Path::new("t.toml"), &text).unwrap();
    let coap = c.coap.as_ref().unwrap();
    assert_eq!(
        coap.listen,
        vec![
            "127.0.0.1:5683".parse().unwrap(),
            "[::1]:5683".parse().unwrap()
        ]
    );
    assert_eq!(
        (coap.recv_buffer, coap.send_buffer, coap.recv_batch),
        (8 << 20, 4 << 20, 64)
    );
    assert_eq!(
        coap.core,
        crate::coap::core::CoreConfig {
            security: Arc::clone(&c.security),
            ..crate::coap::core::CoreConfig::default()
        }
    );
    // The RFC 7252 values, written out once here so a changed default is noticed.
    assert_eq!(coap.core.max_message_size, 1152);
    assert_eq!(coap.core.ack_timeout, Duration::from_secs(2));
    assert_eq!(coap.core.exchange_lifetime, Duration::from_secs(247));
    assert_eq!(coap.core.ack_wait, Duration::from_millis(500));
    let summary = c.summary();
    assert!(
        summary.contains("listener: CoAP over UDP on 127.0.0.1:5683\n")
            && summary.contains("listener: CoAP over UDP on [::1]:5683\n")
            && summary.contains("coap: up to 100000 peers, messages up to 1152B"),
        "{summary}"
    );
}

#[test]
fn every_coap_key_is_read() {
    let text = with_coap(
        r#"listen = ["0.0.0.0:5684"]
recv_buffer = "1MiB"
send_buffer = "512KiB"
recv_batch = 8
max_message_size = "1280B"
max_body_size = "1MiB"
block_size = "256B"
ack_timeout = "3s"
ack_random_factor = 2
max_retransmit = 3
nstart = 2
probing_rate = 100
exchange_lifetime = "5m"
non_lifetime = "2m"
ack_wait = "0s"
busy_max_age = "30s"
max_peers = 1000
dedup_per_peer = 8
max_exchanges_per_peer = 4
max_observers = 500
max_observers_per_peer = 2
max_filters = 100
max_queued_per_observer = 3
queue_full = "drop_new"
notification_check_count = 10
notification_check_interval = "1h"
observer_ping_interval = "0s"
block_lifetime = "1m"
reassembly_bytes = "2MiB"
max_block2_bodies = 7
max_retained = 0
max_client_id_len = 32
"#,
    );
    let c = Config::parse(Path::new("t.toml"), &text).unwrap();
    let coap = c.coap.unwrap();
    assert_eq!(coap.listen, vec!["0.0.0.0:5684".parse().unwrap()]);
    assert_eq!(
        (coap.recv_buffer, coap.send_buffer, coap.recv_batch),
        (1 << 20, 512 << 10, 8)
    );
    let expected = crate::coap::core::CoreConfig {
        max_message_size: 1280,
        max_body_size: 1 << 20,
        block_size: 256,
        ack_timeout: Duration::from_secs(3),
        ack_random_factor: 2.0,
        max_retransmit: 3,
        nstart: 2,
        probing_rate: 100,
        exchange_lifetime: Duration::from_secs(300),
        non_lifetime: Duration::from_secs(120),
        ack_wait: Duration::ZERO,
        busy_max_age: 30,
        max_peers: 1000,
        dedup_per_peer: 8,
        max_exchanges_per_peer: 4,
        max_observers: 500,
        max_observers_per_peer: 2,
        max_filters: 100,
        max_queued_per_observer: 3,
        queue_full: crate::mqttsn::core::QueueFull::DropNew,
        notification_check_count: 10,
        notification_check_interval: Duration::from_secs(3600),
        observer_ping_interval: Duration::ZERO,
        block_lifetime: Duration::from_secs(60),
        reassembly_bytes: 2 << 20,
        max_block2_bodies: 7,
        max_retained: 0,
        max_client_id_len: 32,
        require_identity: false,
        security: Arc::clone(&c.security),
    };
    assert_eq!(coap.core, expected);
}

#[test]
fn every_coap_range_error_is_located() {
    let cases: &[(&str, &str)] = &[
        (
            "recv_buffer = \"1KiB\"",
            "`coap.recv_buffer`: 1KiB is out of range 4KiB..=1GiB",
        ),
        (
            "recv_batch = 0",
            "`coap.recv_batch`: 0 is out of range 1..=1024",
        ),
        (
            "max_message_size = \"1281B\"",
            "`coap.max_message_size`: 1281B is out of range 64B..=1280B",
        ),
        (
            "max_body_size = \"2MiB\"",
            "`coap.max_body_size`: 2MiB is out of range 16B..=1MiB",
        ),
        (
            "block_size = \"2KiB\"",
            "`coap.block_size`: 2KiB is out of range 16B..=1KiB",
        ),
        (
            "block_size = \"100B\"",
            "`coap.block_size`: 100B is not a power of two",
        ),
        (
            "ack_timeout = \"10ms\"",
            "`coap.ack_timeout`: 10ms is out of range 100ms..=5m",
        ),
        (
            "ack_random_factor = 0.5",
            "`coap.ack_random_factor`: 0.5 is out of range 1.0..=4.0",
        ),
        (
            "max_retransmit = 11",
            "`coap.max_retransmit`: 11 is out of range 0..=10",
        ),
        ("nstart = 0", "`coap.nstart`: 0 is out of range 1..=64"),
        ("probing_rate = 0", "`coap.probing_rate`: 0 is out of range"),
        (
            "exchange_lifetime = \"40s\"",
            "`coap.exchange_lifetime`: 40s is shorter than a client may still retransmit a \
             request (47s: ",
        ),
        (
            "non_lifetime = \"0s\"",
            "`coap.non_lifetime`: 0s is out of range 1s..=1day",
        ),
        (
            "ack_wait = \"2s\"",
            "`coap.ack_wait`: 2s must be shorter than ack_timeout (2s)",
        ),
        (
            "busy_max_age = \"1500ms\"",
            "`coap.busy_max_age`: 1500ms is not whole seconds",
        ),
        (
            "max_peers = 0",
            "`coap.max_peers`: 0 is out of range 1..=10000000",
        ),
        (
            "dedup_per_peer = 0",
            "`coap.dedup_per_peer`: 0 is out of range 1..=1024",
        ),
        (
            "max_exchanges_per_peer = 0",
            "`coap.max_exchanges_per_peer`: 0 is out of range",
        ),
        (
            "max_observers = 0",
            "`coap.max_observers`: 0 is out of range",
        ),
        (
            "max_observers_per_peer = 0",
            "`coap.max_observers_per_peer`: 0 is out of range",
        ),
        (
            "max_filters = 65537",
            "`coap.max_filters`: 65537 is out of range 1..=65536",
        ),
        (
            "max_queued_per_observer = 0",
            "`coap.max_queued_per_observer`: 0 is out of range",
        ),
        (
            "queue_full = \"drop_olde\"",
            "`coap.queue_full`: unknown policy `drop_olde`",
        ),
        (
            "notification_check_count = 0",
            "`coap.notification_check_count`: 0 is out of range",
        ),
        (
            "notification_check_interval = \"0s\"",
            "`coap.notification_check_interval`: 0s is out of range",
        ),
        (
            "observer_ping_interval = \"10ms\"",
            "`coap.observer_ping_interval`: 10ms is too short",
        ),
        (
            "block_lifetime = \"0s\"",
            "`coap.block_lifetime`: 0s is out of range",
        ),
        (
            "reassembly_bytes = \"0B\"",
            "`coap.reassembly_bytes`: 0B is out of range 1KiB..=4GiB",
        ),
        (
            "max_block2_bodies = 0",
            "`coap.max_block2_bodies`: 0 is out of range",
        ),
        (
            "max_retained = -1",
            "`coap.max_retained`: -1 is out of range",
        ),
        (
            "max_client_id_len = 256",
            "`coap.max_client_id_len`: 256 is out of range 1..=255",
        ),
    ];
    for (line, message) in cases {
        let text = with_coap(&format!("listen = [\"127.0.0.1:5683\"]\n{line}\n"));
        let d = errors(&text);
        assert_eq!(d.len(), 1, "{line}: {d:#?}");
        assert!(
            d[0].message.starts_with(message),
            "{line}: {}",
            d[0].message
        );
        // At the value.
        let (key, _) = line.split_once(" = ").unwrap();
        let (l, c) = position_in_coap(&text, line);
        assert_eq!((d[0].line, d[0].column), (l, c + key.len() + 3), "{line}");
        assert!(d[0].to_string().starts_with(&format!("test.toml:{l}:")));
    }
    // Checked against each other, and all reported together.
    let text = with_coap(
        "listen = [\"127.0.0.1:5683\"]\nmax_body_size = \"1MiB\"\nreassembly_bytes = \"64KiB\"\n\
         ack_timeout = \"1s\"\nack_wait = \"1s\"\n",
    );
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 2, "{msgs:#?}");
    assert!(
        msgs[0].starts_with("`coap.max_body_size`: 1MiB is larger than reassembly_bytes (64KiB)"),
        "{msgs:#?}"
    );
    assert!(msgs[1].starts_with("`coap.ack_wait`: 1s must be shorter than ack_timeout (1s)"));
    // The floor follows the transmission parameters: 1s * (2^2 - 1) * 1.0 + 1s.
    let text = with_coap(
        "ack_timeout = \"1s\"\nack_random_factor = 1\nmax_retransmit = 2\nack_wait = \"0s\"\n\
         exchange_lifetime = \"4s\"\n",
    );
    assert!(Config::parse(Path::new("t.toml"), &text).is_ok());
    let d = errors(&text.replace("\"4s\"", "\"3s\""));
    assert!(d[0].message.contains("(4s: "), "{d:#?}");
}

#[test]
fn coap_types_and_unknown_keys_are_reported_in_the_configs_terms() {
    let text = with_coap(
        "listen = \"127.0.0.1:5683\"\nack_random_factor = \"1.5\"\nmax_message_size = 1152\n\
         ack_timout = \"2s\"\n",
    );
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 4, "{msgs:#?}");
    assert_eq!(
        msgs[0],
        "`coap.listen`: expected an array, found the string \"127.0.0.1:5683\""
    );
    assert_eq!(
        msgs[1],
        "`coap.ack_random_factor`: expected a number such as 1.5, found the string \"1.5\""
    );
    assert_eq!(
        msgs[2],
        "`coap.max_message_size`: expected a size such as \"4KiB\", found the integer 1152"
    );
    assert_eq!(msgs[3], "unknown key `ack_timout` in `[coap]`");
    assert_eq!(d[3].hint.as_deref(), Some("did you mean `ack_timeout`?"));
    assert_eq!(
        (d[3].line, d[3].column),
        position_in_coap(&text, "ack_timout")
    );
}

#[test]
fn a_coap_address_on_an_mqttsn_port_is_refused_where_it_is_written() {
    // MINIMAL's [mqttsn] listens on 127.0.0.1:1883 and [::1]:1883.
    let text = with_coap("listen = [\"127.0.0.1:5683\", \"[::1]:1883\", \"nowhere\"]\n");
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 2, "{msgs:#?}");
    assert_eq!(
        msgs[0],
        "`coap.listen[1]`: `[::1]:1883` takes the UDP port of [mqttsn] listen `[::1]:1883`: \
         a port serves one protocol"
    );
    assert_eq!(
        d[0].hint.as_deref(),
        Some("CoAP's port is 5683: write `[::1]:5683`")
    );
    assert_eq!(
        (d[0].line, d[0].column),
        position_in_coap(&text, "\"[::1]:1883\"")
    );
    assert!(msgs[1].starts_with("`coap.listen[2]`: `nowhere` is not an IP socket address"));
    // A wildcard takes the port on every address of its family, either way round.
    let wild = MINIMAL.replace("\"127.0.0.1:1883\"", "\"0.0.0.0:1883\"");
    let d = errors(&format!("{wild}[coap]\nlisten = [\"127.0.0.1:1883\"]\n"));
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(d[0].message.contains("[mqttsn] listen `0.0.0.0:1883`"));
    let d = errors(&with_coap(
        "listen = [\"0.0.0.0:1883\", \"127.0.0.1:5683\", \"127.0.0.1:5683\", \"0.0.0.0:5683\"]\n",
    ));
    assert_eq!(d.len(), 3, "{d:#?}");
    assert!(d[0].message.contains("[mqttsn] listen `127.0.0.1:1883`"));
    assert!(d[1].message.ends_with("`127.0.0.1:5683` is listed twice"));
    assert!(
        d[2].message
            .ends_with("`0.0.0.0:5683` takes the UDP port of an address listed before it"),
        "{d:#?}"
    );
    // Another family, another port, or a port the kernel picks: no clash.
    let ok = with_coap("listen = [\"0.0.0.0:5683\", \"127.0.0.2:1884\"]\n");
    assert!(Config::parse(Path::new("t.toml"), &ok).is_ok());
    let zero = MINIMAL.replace("\"127.0.0.1:1883\"", "\"127.0.0.1:0\"");
    let ok = format!("{zero}[coap]\nlisten = [\"127.0.0.1:0\"]\n");
    assert!(Config::parse(Path::new("t.toml"), &ok).is_ok());
}

#[test]
fn the_routers_filter_bound_is_the_sum_of_the_ingresses_at_most_65536() {
    let c = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
    assert_eq!(c.max_filters(), MAX_SUBSCRIPTIONS);
    let text = MINIMAL.replace("[mqttsn]\n", "[mqttsn]\nmax_filters = 500\n")
        + "[coap]\nlisten = [\"127.0.0.1:5683\"]\nmax_filters = 300\n";
    let c = Config::parse(Path::new("t.toml"), &text).unwrap();
    assert_eq!(c.max_filters(), 800);
    let UpstreamKind::Mqtt(m) = &c.upstreams[0].kind else {
        panic!("an MQTT upstream")
    };
    assert_eq!(
        m.max_subscriptions, 801,
        "one more for the fleet control topic"
    );
    // CoAP off: its bound does not count.
    let off = text.replace("listen = [\"127.0.0.1:5683\"]\n", "");
    let c = Config::parse(Path::new("t.toml"), &off).unwrap();
    assert_eq!(c.max_filters(), 500);
    assert_eq!(
        router_max_filters(65_536, Some(65_536), Some(1)),
        MAX_SUBSCRIPTIONS
    );
}

#[test]
fn the_reference_config_shows_every_coap_key_with_its_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sensorgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    let mut keys: Vec<&str> = doc["coap"]
        .as_table()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut fields = fields_of::<RawCoap>().to_vec();
    fields.sort_unstable();
    assert_eq!(keys, fields);
    // Switched on, the section as written is the core's defaults.
    // `\nlisten`: not `[mqttsn] dtls_listen = []`, which comes first.
    let on = text.replacen("\nlisten = []\n", "\nlisten = [\"127.0.0.1:5683\"]\n", 1);
    let c = Config::parse(&path, &on).unwrap();
    assert_eq!(
        c.coap.unwrap().core,
        crate::coap::core::CoreConfig {
            // The gateway's policy (the fleet prefix reserved), not a CoAP key.
            security: Arc::clone(&c.security),
            ..crate::coap::core::CoreConfig::default()
        }
    );
}

// ---------------------------------------------------------------------------------------------
// [http]

/// `MINIMAL` with an `[http]` table of `keys` (one per line) appended.
fn with_http(keys: &str) -> String {
    format!("{MINIMAL}[http]\n{keys}")
}

/// Line and column (1-based) of `needle` at or after the `[http]` table.
fn position_in_http(text: &str, needle: &str) -> (usize, usize) {
    let start = text.find("[http]").unwrap();
    let offset = start + text[start..].find(needle).unwrap();
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Asserts exactly one error, starting with `message`, at `needle` (after `[http]`) moved
/// right by `shift` characters.
fn assert_one_error_at(text: &str, needle: &str, shift: usize, message: &str) -> Diagnostic {
    let d = errors(text);
    assert_eq!(d.len(), 1, "{message}: {d:#?}");
    assert!(
        d[0].message.starts_with(message),
        "expected `{message}`, got `{}`",
        d[0].message
    );
    let (l, c) = position_in_http(text, needle);
    assert_eq!((d[0].line, d[0].column), (l, c + shift), "{message}");
    d[0].clone()
}

/// A valid token hash (of "0123456789abcdef-<n>").
fn hash_of(n: u32) -> String {
    crate::http::token::format_hash(&crate::http::token::digest(
        format!("0123456789abcdef-{n}").as_bytes(),
    ))
}

#[test]
fn http_is_off_without_a_table_or_listen_address_and_still_checked() {
    let c = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
    assert!(c.http.is_none());
    assert!(
        c.summary().contains("listener: HTTP off\n"),
        "{}",
        c.summary()
    );
    let c = Config::parse(Path::new("t.toml"), &with_http("listen = []\n")).unwrap();
    assert!(c.http.is_none());
    // Off, and still checked.
    let text = with_http("listen = []\nmax_headers = 2\n");
    assert_one_error_at(
        &text,
        "max_headers = 2",
        "max_headers = ".len(),
        "`http.max_headers`: 2 is out of range 8..=1000",
    );
    // Devices of a switched-off section too.
    let text = with_http(&format!(
        "[[http.device]]\nid = \"dev1\"\ntoken_hash = \"{}\"\n",
        "sha256:00"
    ));
    assert_eq!(errors(&text).len(), 1);
}

#[test]
fn http_takes_the_documented_defaults_and_shows_in_the_summary() {
    let text = with_http("listen = [\"127.0.0.1:8080\", \"[::1]:8080\"]\n");
    let c = Config::parse(Path::new("t.toml"), &text).unwrap();
    let http = c.http.clone().unwrap();
    let listen: Vec<SocketAddr> = vec![
        "127.0.0.1:8080".parse().unwrap(),
        "[::1]:8080".parse().unwrap(),
    ];
    assert_eq!(
        http,
        HttpSection {
            listen: listen.clone(),
            // The gateway's policy (the fleet prefix reserved), not an HTTP key.
            security: Arc::clone(&c.security),
            ..HttpSection::default()
        }
    );
    // The defaults of the key table (README, config/sensorgate.toml), written out once here
    // so that a changed default is noticed.
    let d = HttpSection::default();
    assert_eq!(d.tls, None);
    assert!(!d.allow_anonymous && d.http2 && !d.require_content_length);
    assert_eq!(
        (d.anonymous_publish, d.anonymous_subscribe),
        (vec!["#".to_owned()], vec!["#".to_owned()])
    );
    assert_eq!(
        (
            d.worker_threads,
            d.max_connections,
            d.max_connections_per_ip,
            d.h2_max_streams
        ),
        (1, 1024, 256, 64)
    );
    assert_eq!((d.max_header_size, d.max_headers), (16 << 10, 64));
    assert_eq!(
        (
            d.header_timeout,
            d.request_timeout,
            d.idle_timeout,
            d.tls_handshake_timeout
        ),
        (
            Duration::from_secs(10),
            Duration::from_secs(30),
            Duration::from_secs(60),
            Duration::from_secs(10)
        )
    );
    assert_eq!(
        (
            d.max_body_size,
            d.max_batch_size,
            d.max_batch_items,
            d.body_memory
        ),
        (64 << 10, 4 << 20, 1000, 64 << 20)
    );
    assert_eq!(
        (d.queue_wait, d.retry_after),
        (Duration::from_secs(1), Duration::from_secs(5))
    );
    assert_eq!((d.rate_per_device, d.rate_burst), (100.0, 200));
    assert_eq!(
        (
            d.max_streams,
            d.max_streams_per_device,
            d.max_filters_per_stream,
            d.max_filters
        ),
        (1024, 4, 8, 4096)
    );
    assert_eq!(
        (
            d.sse_queue,
            d.sse_queue_full,
            d.sse_max_event,
            d.sse_keepalive
        ),
        (
            256,
            SseQueueFull::DropOldest,
            256 << 10,
            Duration::from_secs(15)
        )
    );
    assert_eq!(d.max_devices_tracked, 10_000);
    let summary = c.summary();
    assert!(
        summary.contains("listener: HTTP on http://127.0.0.1:8080/ (HTTP/1.1, h2c)\n")
            && summary.contains("listener: HTTP on http://[::1]:8080/ (HTTP/1.1, h2c)\n")
            && summary.contains(
                "http: 0 device(s), anonymous off; bodies up to 64KiB, batches up to 4MiB and \
                 1000 items; 1024 connections (256 per IP); 100 requests/s per device (burst \
                 200); up to 1024 SSE streams\n"
            ),
        "{summary}"
    );
    assert!(!summary.contains("HTTP off"), "{summary}");
}

#[test]
fn every_http_key_is_read() {
    let text = with_http(&format!(
        r##"listen = ["127.0.0.1:8080"]
tls_listen = ["127.0.0.1:8443", "[::1]:8443"]
tls_cert = "tls/server.pem"
tls_key = "/etc/keys/server.key"
client_ca = "devices-ca.pem"
client_cert = "required"
allow_anonymous = true
anonymous_publish = ["sensors/anon", "lab"]
anonymous_subscribe = []
http2 = false
worker_threads = 2
max_connections = 100
max_connections_per_ip = 10
h2_max_streams = 16
max_header_size = "32KiB"
max_headers = 32
header_timeout = "5s"
request_timeout = "1m"
idle_timeout = "2m"
tls_handshake_timeout = "3s"
max_body_size = "256KiB"
max_batch_size = "1MiB"
max_batch_items = 50
body_memory = "8MiB"
require_content_length = true
queue_wait = "0s"
retry_after = "30s"
rate_per_device = 0.5
rate_burst = 3
max_streams = 0
max_streams_per_device = 2
max_filters_per_stream = 3
max_filters = 100
sse_queue = 16
sse_queue_full = "close"
sse_max_event = "64KiB"
sse_keepalive = "30s"
max_devices_tracked = 5

[[http.device]]
id = "dev1"
token_hash = "{}"
publish = ["sensors/dev1", "alarms"]
subscribe = ["cmd/dev1"]

[[http.device]]
id = "plc-7"
publish = ["#"]
"##,
        hash_of(1)
    ));
    let c = Config::parse(Path::new("/etc/sg/t.toml"), &text).unwrap();
    let http = c.http.clone().unwrap();
    let expected = HttpSection {
        listen: vec!["127.0.0.1:8080".parse().unwrap()],
        tls_listen: vec![
            "127.0.0.1:8443".parse().unwrap(),
            "[::1]:8443".parse().unwrap(),
        ],
        tls: Some(TlsFiles {
            // Relative to the config file's directory.
            cert: "/etc/sg/tls/server.pem".into(),
            key: "/etc/keys/server.key".into(),
            client_ca: Some("/etc/sg/devices-ca.pem".into()),
            client_cert: ClientCertMode::Required,
        }),
        allow_anonymous: true,
        anonymous_publish: vec!["sensors/anon".into(), "lab".into()],
        anonymous_subscribe: vec![],
        devices: vec![
            DeviceSpec {
                id: "dev1".into(),
                token_hash: Some(crate::http::token::digest(b"0123456789abcdef-1")),
                publish: vec!["sensors/dev1".into(), "alarms".into()],
                subscribe: vec!["cmd/dev1".into()],
            },
            DeviceSpec {
                id: "plc-7".into(),
                token_hash: None,
                publish: vec!["#".into()],
                subscribe: vec![],
            },
        ],
        http2: false,
        worker_threads: 2,
        max_connections: 100,
        max_connections_per_ip: 10,
        h2_max_streams: 16,
        max_header_size: 32 << 10,
        max_headers: 32,
        header_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(120),
        tls_handshake_timeout: Duration::from_secs(3),
        max_body_size: 256 << 10,
        max_batch_size: 1 << 20,
        max_batch_items: 50,
        body_memory: 8 << 20,
        require_content_length: true,
        queue_wait: Duration::ZERO,
        retry_after: Duration::from_secs(30),
        rate_per_device: 0.5,
        rate_burst: 3,
        max_streams: 0,
        max_streams_per_device: 2,
        max_filters_per_stream: 3,
        max_filters: 100,
        sse_queue: 16,
        sse_queue_full: SseQueueFull::Close,
        sse_max_event: 64 << 10,
        sse_keepalive: Duration::from_secs(30),
        max_devices_tracked: 5,
        security: Arc::clone(&c.security),
        jwt: None,
    };
    assert_eq!(http, expected);
    let summary = c.summary();
    assert!(
        summary.contains("listener: HTTP on http://127.0.0.1:8080/ (HTTP/1.1)\n")
            && summary.contains(
                "listener: HTTPS on https://[::1]:8443/ (HTTP/1.1; client certificates \
                 required)\n"
            )
            && summary.contains(
                "http: 2 device(s), anonymous on; bodies up to 256KiB, batches up to 1MiB and \
                 50 items; 100 connections (10 per IP); 0.5 requests/s per device (burst 3); \
                 SSE off\n"
            ),
        "{summary}"
    );
    // client_cert defaults to "optional" with a client_ca; "off" without one.
    let optional = text.replace("client_cert = \"required\"\n", "");
    let c = Config::parse(Path::new("t.toml"), &optional).unwrap();
    let tls = c.http.as_ref().unwrap().tls.clone().unwrap();
    assert_eq!(tls.client_cert, ClientCertMode::Optional);
    assert!(
        c.summary()
            .contains("(HTTP/1.1; client certificates optional)")
    );
    let text = with_http(
        "tls_listen = [\"127.0.0.1:8443\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nrate_per_device = 0\n",
    );
    let c = Config::parse(Path::new("t.toml"), &text).unwrap();
    let http = c.http.as_ref().unwrap();
    assert!(http.listen.is_empty());
    assert_eq!(
        http.tls,
        Some(TlsFiles {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            client_ca: None,
            client_cert: ClientCertMode::Off,
        })
    );
    let summary = c.summary();
    assert!(
        summary.contains(
            "listener: HTTPS on https://127.0.0.1:8443/ (HTTP/1.1, h2; client certificates off)\n"
        ) && summary.contains("; no request rate limit;"),
        "{summary}"
    );
}

#[test]
fn every_http_range_edge_is_checked_and_located() {
    // (key, below the range or "", the lowest value, the highest value, above the range, the
    // range as reported, keys that make the edges valid on their own).
    let cases: &[(&str, &str, &str, &str, &str, &str, &str)] = &[
        ("worker_threads", "0", "1", "16", "17", "1..=16", ""),
        (
            "max_connections",
            "0",
            "1",
            "65536",
            "65537",
            "1..=65536",
            "",
        ),
        (
            "max_connections_per_ip",
            "0",
            "1",
            "65536",
            "65537",
            "1..=65536",
            "",
        ),
        ("h2_max_streams", "0", "1", "1000", "1001", "1..=1000", ""),
        (
            "max_header_size",
            "\"8191B\"",
            "\"8KiB\"",
            "\"1MiB\"",
            "\"1025KiB\"",
            "8KiB..=1MiB",
            "",
        ),
        ("max_headers", "7", "8", "1000", "1001", "8..=1000", ""),
        (
            "header_timeout",
            "\"999ms\"",
            "\"1s\"",
            "\"5m\"",
            "\"301s\"",
            "1s..=5m",
            "",
        ),
        (
            "request_timeout",
            "\"999ms\"",
            "\"1s\"",
            "\"10m\"",
            "\"601s\"",
            "1s..=10m",
            "",
        ),
        (
            "idle_timeout",
            "\"1999ms\"",
            "\"2s\"",
            "\"1h\"",
            "\"3601s\"",
            "2s..=1h",
            "sse_keepalive = \"1s\"",
        ),
        (
            "tls_handshake_timeout",
            "\"999ms\"",
            "\"1s\"",
            "\"5m\"",
            "\"301s\"",
            "1s..=5m",
            "",
        ),
        (
            "max_body_size",
            "\"0B\"",
            "\"1B\"",
            "\"256KiB\"",
            "\"257KiB\"",
            "1B..=256KiB",
            "",
        ),
        (
            "max_batch_size",
            "\"1023B\"",
            "\"1KiB\"",
            "\"64MiB\"",
            "\"65MiB\"",
            "1KiB..=64MiB",
            "",
        ),
        (
            "max_batch_items",
            "0",
            "1",
            "100000",
            "100001",
            "1..=100000",
            "",
        ),
        (
            "body_memory",
            "\"1023KiB\"",
            "\"1MiB\"",
            "\"4GiB\"",
            "\"5GiB\"",
            "1MiB..=4GiB",
            "max_batch_size = \"1MiB\"",
        ),
        (
            "queue_wait",
            "",
            "\"0s\"",
            "\"1m\"",
            "\"61s\"",
            "0s..=1m",
            "",
        ),
        (
            "retry_after",
            "\"0s\"",
            "\"1s\"",
            "\"1h\"",
            "\"3601s\"",
            "1s..=1h",
            "",
        ),
        (
            "rate_burst",
            "0",
            "1",
            "1000000",
            "1000001",
            "1..=1000000",
            "",
        ),
        ("max_streams", "-1", "0", "65536", "65537", "0..=65536", ""),
        (
            "max_streams_per_device",
            "0",
            "1",
            "1024",
            "1025",
            "1..=1024",
            "",
        ),
        ("max_filters_per_stream", "0", "1", "64", "65", "1..=64", ""),
        ("max_filters", "0", "1", "65536", "65537", "1..=65536", ""),
        ("sse_queue", "0", "1", "65536", "65537", "1..=65536", ""),
        (
            "sse_max_event",
            "\"1023B\"",
            "\"1KiB\"",
            "\"16MiB\"",
            "\"17MiB\"",
            "1KiB..=16MiB",
            "",
        ),
        (
            "sse_keepalive",
            "\"999ms\"",
            "\"1s\"",
            "\"10m\"",
            "\"601s\"",
            "1s..=10m",
            "idle_timeout = \"1h\"",
        ),
        (
            "max_devices_tracked",
            "0",
            "1",
            "1000000",
            "1000001",
            "1..=1000000",
            "",
        ),
    ];
    for (key, below, low, high, above, range, context) in cases {
        for ok in [low, high] {
            let text = with_http(&format!(
                "listen = [\"127.0.0.1:8080\"]\n{context}\n{key} = {ok}\n"
            ));
            if let Err(e) = Config::parse(Path::new("test.toml"), &text) {
                panic!("{key} = {ok}: {e}");
            }
        }
        for bad in [below, above].into_iter().filter(|b| !b.is_empty()) {
            let line = format!("{key} = {bad}");
            let text = with_http(&format!(
                "listen = [\"127.0.0.1:8080\"]\n{context}\n{line}\n"
            ));
            let d = assert_one_error_at(
                &text,
                &line,
                key.len() + 3,
                &format!(
                    "`http.{key}`: {} is out of range {range}",
                    bad.trim_matches('"')
                ),
            );
            assert!(d.to_string().starts_with("test.toml:"), "{d}");
        }
    }
    // rate_per_device: 0 (off) or 0.001..=1000000, integer or not.
    for ok in ["0", "0.001", "1", "2.5", "1000000"] {
        let text = with_http(&format!("rate_per_device = {ok}\n"));
        assert!(Config::parse(Path::new("t.toml"), &text).is_ok(), "{ok}");
    }
    for bad in ["-1", "0.0005", "1000001", "nan"] {
        let line = format!("rate_per_device = {bad}");
        assert_one_error_at(
            &with_http(&format!("{line}\n")),
            &line,
            "rate_per_device = ".len(),
            "`http.rate_per_device`: ",
        );
    }
    // Retry-After counts whole seconds.
    let line = "retry_after = \"1500ms\"";
    assert_one_error_at(
        &with_http(&format!("{line}\n")),
        line,
        "retry_after = ".len(),
        "`http.retry_after`: 1500ms is not whole seconds",
    );
    // The SSE queue policy.
    let line = "sse_queue_full = \"drop_olde\"";
    let d = assert_one_error_at(
        &with_http(&format!("{line}\n")),
        line,
        "sse_queue_full = ".len(),
        "`http.sse_queue_full`: unknown policy `drop_olde`",
    );
    assert_eq!(d.hint.as_deref(), Some("did you mean `drop_oldest`?"));
    for (policy, expected) in [
        ("drop_oldest", SseQueueFull::DropOldest),
        ("drop_new", SseQueueFull::DropNew),
        ("close", SseQueueFull::Close),
    ] {
        let text = with_http(&format!(
            "listen = [\"127.0.0.1:8080\"]\nsse_queue_full = \"{policy}\"\n"
        ));
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(c.http.unwrap().sse_queue_full, expected);
    }
}

#[test]
fn http_limits_are_checked_against_each_other() {
    // The keep-alive comment must come before the idle limit closes the stream.
    let line = "sse_keepalive = \"15s\"";
    for idle in ["15s", "10s"] {
        let text = with_http(&format!("idle_timeout = \"{idle}\"\n{line}\n"));
        assert_one_error_at(
            &text,
            line,
            "sse_keepalive = ".len(),
            &format!("`http.sse_keepalive`: 15s must be shorter than idle_timeout ({idle})"),
        );
    }
    let ok = with_http(&format!("idle_timeout = \"16s\"\n{line}\n"));
    assert!(Config::parse(Path::new("t.toml"), &ok).is_ok());
    // A batch must fit the body memory.
    let line = "body_memory = \"2MiB\"";
    let text = with_http(&format!("max_batch_size = \"3MiB\"\n{line}\n"));
    assert_one_error_at(
        &text,
        line,
        "body_memory = ".len(),
        "`http.body_memory`: 2MiB is smaller than max_batch_size (3MiB)",
    );
    let ok = with_http(&format!("max_batch_size = \"2MiB\"\n{line}\n"));
    assert!(Config::parse(Path::new("t.toml"), &ok).is_ok());
}

#[test]
fn anonymous_requests_are_accepted_only_on_loopback_listeners() {
    for listen in [
        "listen = [\"127.0.0.1:8080\"]",
        "listen = [\"[::1]:8080\"]",
        "listen = [\"127.0.0.1:8080\", \"[::1]:8080\"]",
        "listen = []",
    ] {
        let text = with_http(&format!("{listen}\nallow_anonymous = true\n"));
        assert!(
            Config::parse(Path::new("t.toml"), &text).is_ok(),
            "{listen}"
        );
    }
    let line = "allow_anonymous = true";
    for (listen, named) in [
        ("listen = [\"0.0.0.0:8080\"]", "`0.0.0.0:8080` is reachable"),
        ("listen = [\"[::]:8080\"]", "`[::]:8080` is reachable"),
        (
            "listen = [\"127.0.0.1:8080\", \"192.168.1.5:8080\"]",
            "`192.168.1.5:8080` is",
        ),
    ] {
        let text = with_http(&format!("{listen}\n{line}\n"));
        let d = assert_one_error_at(
            &text,
            line,
            "allow_anonymous = ".len(),
            "`http.allow_anonymous`: anonymous requests are allowed only when every listen and \
             tls_listen address is loopback",
        );
        assert!(
            d.message
                .ends_with(&format!("{named} reachable from other hosts"))
                || d.message.contains(named),
            "{d}"
        );
        assert!(d.hint.as_deref().unwrap().contains("127.0.0.1"), "{d}");
    }
    // A TLS listener counts too; every offending address is named.
    let text = with_http(&format!(
        "listen = [\"10.0.0.1:8080\"]\ntls_listen = [\"0.0.0.0:8443\"]\ntls_cert = \"c.pem\"\n\
         tls_key = \"k.pem\"\n{line}\n"
    ));
    let d = assert_one_error_at(
        &text,
        line,
        "allow_anonymous = ".len(),
        "`http.allow_anonymous`",
    );
    assert!(
        d.message
            .ends_with("`10.0.0.1:8080`, `0.0.0.0:8443` are reachable from other hosts"),
        "{d}"
    );
    // Off: any address.
    let text = with_http("listen = [\"0.0.0.0:8080\"]\nallow_anonymous = false\n");
    assert!(Config::parse(Path::new("t.toml"), &text).is_ok());
}

#[test]
fn http_addresses_must_not_repeat_or_take_the_admin_port() {
    let text = with_http("listen = [\"127.0.0.1:8080\", \"nowhere\", \"127.0.0.1:8080\"]\n");
    let d = errors(&text);
    assert_eq!(d.len(), 2, "{d:#?}");
    assert_eq!(
        d[0].message,
        "`http.listen[1]`: `nowhere` is not an IP socket address"
    );
    assert_eq!(
        (d[0].line, d[0].column),
        position_in_http(&text, "\"nowhere\"")
    );
    assert_eq!(
        d[1].message,
        "`http.listen[2]`: `127.0.0.1:8080` is listed twice (also at `http.listen[0]`)"
    );
    let (l, c) = position_in_http(&text, "\"nowhere\", ");
    assert_eq!((d[1].line, d[1].column), (l, c + "\"nowhere\", ".len()));
    // Across plain and TLS lists; a wildcard takes the port of its family only.
    let text = with_http(
        "listen = [\"127.0.0.1:8080\", \"[::]:8443\"]\ntls_listen = [\"0.0.0.0:8080\", \
         \"0.0.0.0:8443\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
    );
    let d = assert_one_error_at(
        &text,
        "\"0.0.0.0:8080\"",
        0,
        "`http.tls_listen[0]`: `0.0.0.0:8080` takes the TCP port of `127.0.0.1:8080` \
         (`http.listen[0]`)",
    );
    assert!(d.hint.unwrap().contains("wildcard"));
    // The [admin] listener's port (127.0.0.1:9180 by default) on an overlapping address.
    for addr in ["127.0.0.1:9180", "0.0.0.0:9180", "[::]:9180"] {
        let text = with_http(&format!("listen = [\"{addr}\"]\n"));
        assert_one_error_at(
            &text,
            &format!("\"{addr}\""),
            0,
            &format!(
                "`http.listen[0]`: `{addr}` takes the TCP port of [admin] listen `127.0.0.1:9180`"
            ),
        );
    }
    for ok in ["127.0.0.2:9180", "[::1]:9180", "127.0.0.1:0"] {
        let text = with_http(&format!("listen = [\"{ok}\"]\n"));
        assert!(Config::parse(Path::new("t.toml"), &text).is_ok(), "{ok}");
    }
    let admin_off =
        format!("{MINIMAL}[admin]\nlisten = \"\"\n[http]\nlisten = [\"127.0.0.1:9180\"]\n");
    assert!(Config::parse(Path::new("t.toml"), &admin_off).is_ok());
    let admin_v6 = format!(
        "{MINIMAL}[admin]\nlisten = \"[::]:9180\"\ntoken = \"0123456789abcdef0123\"\n[http]\n\
         listen = [\"127.0.0.1:9180\"]\n"
    );
    assert_one_error_at(
        &admin_v6,
        "\"127.0.0.1:9180\"",
        0,
        "`http.listen[0]`: `127.0.0.1:9180` takes the TCP port of [admin] listen `[::]:9180`",
    );
}

#[test]
fn tls_keys_need_each_other_and_a_tls_listener() {
    const TLS: &str = "tls_listen = [\"127.0.0.1:8443\"]\n";
    // tls_listen without files.
    let text = with_http(TLS);
    assert_one_error_at(
        &text,
        "[\"127.0.0.1:8443\"]",
        0,
        "`http.tls_listen`: needs tls_cert and tls_key",
    );
    // One file without the other.
    let text = with_http(&format!("{TLS}tls_cert = \"c.pem\"\n"));
    assert_one_error_at(
        &text,
        "\"c.pem\"",
        0,
        "`http.tls_cert`: needs tls_key as well",
    );
    let text = with_http(&format!("{TLS}tls_key = \"k.pem\"\n"));
    assert_one_error_at(
        &text,
        "\"k.pem\"",
        0,
        "`http.tls_key`: needs tls_cert as well",
    );
    // Files without a TLS listener.
    for key in ["tls_cert", "tls_key", "client_ca"] {
        let text = with_http(&format!(
            "listen = [\"127.0.0.1:8080\"]\n{key} = \"x.pem\"\n"
        ));
        assert_one_error_at(
            &text,
            "\"x.pem\"",
            0,
            &format!("`http.{key}`: is set, but tls_listen is empty"),
        );
    }
    let files = format!("{TLS}tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n");
    let text = with_http(&format!("{files}tls_key = \"\"\n").replace("tls_key = \"k.pem\"\n", ""));
    assert_one_error_at(
        &text,
        "tls_key = \"\"",
        "tls_key = ".len(),
        "`http.tls_key`: must name a file",
    );
    // Client certificates: a mode other than "off" needs client_ca, and client_ca a mode
    // other than "off".
    for mode in ["required", "optional"] {
        let line = format!("client_cert = \"{mode}\"");
        let text = with_http(&format!("{files}{line}\n"));
        assert_one_error_at(
            &text,
            &line,
            "client_cert = ".len(),
            &format!("`http.client_cert`: \"{mode}\" needs client_ca"),
        );
    }
    let line = "client_cert = \"off\"";
    let text = with_http(&format!("{files}client_ca = \"ca.pem\"\n{line}\n"));
    assert_one_error_at(
        &text,
        line,
        "client_cert = ".len(),
        "`http.client_cert`: is \"off\", but client_ca is set",
    );
    let line = "client_cert = \"requird\"";
    let text = with_http(&format!("{files}client_ca = \"ca.pem\"\n{line}\n"));
    let d = assert_one_error_at(
        &text,
        line,
        "client_cert = ".len(),
        "`http.client_cert`: unknown mode `requird`",
    );
    assert_eq!(d.hint.as_deref(), Some("did you mean `required`?"));
    let text = with_http(&format!("{files}client_cert = \"off\"\n"));
    assert!(Config::parse(Path::new("t.toml"), &text).is_ok());
}

/// An `[[http.device]]` table.
fn device(keys: &str) -> String {
    format!("[[http.device]]\n{keys}")
}

#[test]
fn devices_need_a_unique_id_and_token_and_valid_grants() {
    const ON: &str = "listen = [\"127.0.0.1:8080\"]\n";
    // A malformed hash, with the hint naming the command that makes one.
    let line = "token_hash = \"sha256:abc\"";
    let text = with_http(&format!(
        "{ON}{}",
        device(&format!("id = \"dev1\"\n{line}\n"))
    ));
    let d = assert_one_error_at(
        &text,
        line,
        "token_hash = ".len(),
        "`http.device[0].token_hash`: `sha256:abc` is not a token hash (`sha256:` and 64 hex \
         digits)",
    );
    assert!(
        d.hint
            .as_deref()
            .unwrap()
            .contains("`sensorgate hash-token`"),
        "{d}"
    );
    let text = with_http(&format!(
        "{ON}{}",
        device("id = \"dev1\"\ntoken_hash = \"0123456789abcdef0123456789abcdef\"\n")
    ));
    assert_eq!(errors(&text).len(), 1);
    // Duplicate ids and tokens, at the second one.
    let text = with_http(&format!(
        "{ON}{}{}{}",
        device(&format!("id = \"dev1\"\ntoken_hash = \"{}\"\n", hash_of(1))),
        device(&format!("id = \"dev1\"\ntoken_hash = \"{}\"\n", hash_of(2))),
        device(&format!(
            "id = \"dev3\"\ntoken_hash = \"{}\"\n",
            hash_of(1).to_uppercase().replace("SHA256", "sha256")
        )),
    ));
    let d = errors(&text);
    assert_eq!(d.len(), 2, "{d:#?}");
    assert_eq!(
        d[0].message,
        "`http.device[1].id`: `dev1` is already the id of `http.device[0]`"
    );
    let second = text.match_indices("id = \"dev1\"").nth(1).unwrap().0;
    let line_of_second = text[..second].matches('\n').count() + 1;
    assert_eq!((d[0].line, d[0].column), (line_of_second, 6));
    assert_eq!(
        d[1].message,
        "`http.device[2].token_hash`: is the token hash of `http.device[0]` too: a token names \
         one device"
    );
    assert_eq!(d[1].line, line_of_second + 4);
    // A device without a token is reachable only by a client certificate.
    let text = with_http(&format!("{ON}{}", device("id = \"plc\"\n")));
    let d = assert_one_error_at(
        &text,
        "\"plc\"",
        0,
        "`http.device[0].id`: has no token_hash and client certificates are off (no client_ca)",
    );
    assert!(d.hint.unwrap().contains("hash-token --generate"));
    // Ids: required, 1..=128 bytes, no control characters, not the anonymous identity.
    let text = with_http(&format!(
        "{ON}{}",
        device(&format!("token_hash = \"{}\"\n", hash_of(1)))
    ));
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].message, "`http.device[0].id`: is required");
    let long = "x".repeat(MAX_DEVICE_ID_LEN + 1);
    for (id, message) in [
        (
            long.as_str(),
            "`http.device[0].id`: must be 1..=128 bytes long",
        ),
        ("", "`http.device[0].id`: must be 1..=128 bytes long"),
        (
            "a\\tb",
            "`http.device[0].id`: `a\\tb` contains control characters",
        ),
        (
            "anonymous",
            "`http.device[0].id`: `anonymous` is the identity of requests without",
        ),
    ] {
        let text = with_http(&format!(
            "{ON}{}",
            device(&format!("id = \"{id}\"\ntoken_hash = \"{}\"\n", hash_of(1)))
        ));
        assert_one_error_at(&text, &format!("\"{id}\""), 0, message);
    }
    let text = with_http(&format!(
        "{ON}{}",
        device(&format!(
            "id = \"{}\"\ntoken_hash = \"{}\"\n",
            "é".repeat(64),
            hash_of(1)
        ))
    ));
    assert!(Config::parse(Path::new("t.toml"), &text).is_ok());
    // Grants: topic names or a lone "#", each located.
    let text = with_http(&format!(
        "{ON}anonymous_subscribe = [\"cmd\", \"cmd/+\"]\n{}",
        device(&format!(
            "id = \"dev1\"\ntoken_hash = \"{}\"\npublish = [\"#\", \"sensors/#\"]\nsubscribe = [\"\"]\n",
            hash_of(1)
        ))
    ));
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 3, "{msgs:#?}");
    assert!(
        msgs[0].starts_with(
            "`http.anonymous_subscribe[1]`: prefix `cmd/+` must not contain wildcards"
        ),
        "{msgs:#?}"
    );
    assert_eq!(
        (d[0].line, d[0].column),
        position_in_http(&text, "\"cmd/+\"")
    );
    assert!(msgs[1].starts_with("`http.device[0].publish[1]`: prefix `sensors/#` must not"));
    assert_eq!(
        (d[1].line, d[1].column),
        position_in_http(&text, "\"sensors/#\"")
    );
    assert_eq!(
        msgs[2],
        "`http.device[0].subscribe[0]`: topic must not be empty"
    );
}

#[test]
fn http_types_and_unknown_keys_are_reported_in_the_configs_terms() {
    let text = with_http(&format!(
        "listen = \"127.0.0.1:8080\"\nallow_anonymous = \"yes\"\nmax_body_size = 1024\nmax_conections = 5\n{}",
        device(&format!("id = \"dev1\"\ntokenhash = \"{}\"\n", hash_of(1)))
    ));
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 6, "{msgs:#?}");
    assert_eq!(
        msgs[0],
        "`http.listen`: expected an array, found the string \"127.0.0.1:8080\""
    );
    assert_eq!(
        msgs[1],
        "`http.allow_anonymous`: expected true or false, found the string \"yes\""
    );
    assert_eq!(
        msgs[2],
        "`http.max_body_size`: expected a size such as \"4KiB\", found the integer 1024"
    );
    assert_eq!(msgs[3], "unknown key `max_conections` in `[http]`");
    assert_eq!(
        d[3].hint.as_deref(),
        Some("did you mean `max_connections`?")
    );
    assert_eq!(
        (d[3].line, d[3].column),
        position_in_http(&text, "max_conections")
    );
    // The device's own keys: the unknown one, and (so) no token: unreachable.
    assert!(
        msgs[4].starts_with("`http.device[0].id`: has no token_hash"),
        "{msgs:#?}"
    );
    assert_eq!(msgs[5], "unknown key `tokenhash` in `[http.device]`");
    assert_eq!(d[5].hint.as_deref(), Some("did you mean `token_hash`?"));
    assert_eq!(
        (d[5].line, d[5].column),
        position_in_http(&text, "tokenhash")
    );
}

#[test]
fn plain_http_tokens_over_the_network_are_a_start_up_warning() {
    let dev = device(&format!("id = \"dev1\"\ntoken_hash = \"{}\"\n", hash_of(1)));
    let section = |listen: &str, devices: &str| {
        let text = with_http(&format!("listen = [{listen}]\n{devices}"));
        Config::parse(Path::new("t.toml"), &text)
            .unwrap()
            .http
            .unwrap()
    };
    let open = section("\"127.0.0.1:8080\", \"0.0.0.0:8081\"", &dev);
    let warning = open.plaintext_token_warning().unwrap();
    assert!(
        warning.starts_with("[http] listen 0.0.0.0:8081 is plain HTTP reachable from other hosts"),
        "{warning}"
    );
    assert_eq!(
        section("\"127.0.0.1:8080\", \"[::1]:8080\"", &dev).plaintext_token_warning(),
        None
    );
    // No tokens: nothing to leak (anonymous is refused off loopback anyway).
    let no_tokens = HttpSection {
        devices: vec![],
        ..open
    };
    assert_eq!(no_tokens.plaintext_token_warning(), None);
}

#[test]
fn the_routers_filter_bound_adds_http_when_it_is_on() {
    let base = MINIMAL.replace("[mqttsn]\n", "[mqttsn]\nmax_filters = 500\n");
    let text = format!("{base}[http]\nlisten = [\"127.0.0.1:8080\"]\nmax_filters = 300\n");
    let c = Config::parse(Path::new("t.toml"), &text).unwrap();
    assert_eq!(c.max_filters(), 800);
    let UpstreamKind::Mqtt(m) = &c.upstreams[0].kind else {
        panic!("an MQTT upstream")
    };
    assert_eq!(
        m.max_subscriptions, 801,
        "one more for the fleet control topic"
    );
    let off = text.replace("listen = [\"127.0.0.1:8080\"]\n", "");
    let c = Config::parse(Path::new("t.toml"), &off).unwrap();
    assert_eq!(c.max_filters(), 500);
    let with_coap = format!("{text}[coap]\nlisten = [\"127.0.0.1:5683\"]\nmax_filters = 65000\n");
    let c = Config::parse(Path::new("t.toml"), &with_coap).unwrap();
    assert_eq!(c.max_filters(), MAX_SUBSCRIPTIONS);
    assert_eq!(router_max_filters(1, Some(2), Some(3)), 6);
}

#[test]
fn the_reference_config_shows_every_http_key_with_its_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sensorgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    let http = doc["http"].as_table().unwrap();
    // Live keys, and the optional ones without a default, commented out.
    let commented = ["tls_cert", "tls_key", "client_ca", "client_cert"];
    let mut keys: Vec<&str> = http.keys().map(String::as_str).collect();
    for key in commented {
        assert!(text.contains(&format!("\n# {key} = ")), "{key}");
        keys.push(key);
    }
    keys.push("device");
    keys.push("jwt");
    keys.sort_unstable();
    let mut fields = fields_of::<RawHttp>().to_vec();
    fields.sort_unstable();
    assert_eq!(keys, fields);
    // Switched on, the section as written is the defaults.
    let at = text.find("\n[http]\n").unwrap();
    let on = format!(
        "{}{}",
        &text[..at],
        text[at..].replacen("listen = []\n", "listen = [\"127.0.0.1:8080\"]\n", 1)
    );
    let c = Config::parse(&path, &on).unwrap();
    // The policy is the gateway's (with the fleet prefix reserved), not an HTTP key.
    assert_eq!(
        c.http
            .as_ref()
            .unwrap()
            .security
            .reserved_topic_prefix
            .as_deref(),
        Some("sensorgate/1")
    );
    assert_eq!(
        c.http.unwrap(),
        HttpSection {
            listen: vec!["127.0.0.1:8080".parse().unwrap()],
            security: Arc::clone(&c.security),
            ..HttpSection::default()
        }
    );
    // The commented examples are valid once uncommented (the device with a real hash).
    let uncomment = |line: &str| {
        let line = line.strip_prefix("# ").unwrap_or(line);
        if line.starts_with('#') {
            String::new()
        } else {
            format!("{line}\n")
        }
    };
    let start = text.find("\n# [[http.device]]\n").unwrap() + 1;
    let end = start + text[start..].find("\n\n").unwrap();
    let example: String = text[start..end].lines().map(uncomment).collect();
    let example = example.replace(
        "sha256:<64 hex digits from sensorgate hash-token>",
        &hash_of(1),
    );
    let mut fields = fields_of::<RawDevice>().to_vec();
    fields.sort_unstable();
    let mut written: Vec<&str> = example
        .lines()
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
        .collect();
    written.sort_unstable();
    assert_eq!(written, fields);
    let tls: String = [
        "tls_listen",
        "tls_cert",
        "tls_key",
        "client_ca",
        "client_cert",
    ]
    .iter()
    .map(|key| {
        let at = text.find(&format!("\n# {key} = ")).unwrap() + 1;
        uncomment(text[at..].lines().next().unwrap())
    })
    .collect();
    let on = on
        .replacen("\ntls_listen = []\n", &format!("\n{tls}"), 1)
        .replacen(
            "\n# [[http.device]]\n",
            &format!("\n{example}\n# [[http.device]]\n"),
            1,
        );
    let c = Config::parse(&path, &on).unwrap();
    let http = c.http.unwrap();
    assert_eq!(http.devices.len(), 1);
    assert_eq!(http.tls.unwrap().client_cert, ClientCertMode::Optional);
}

#[test]
fn forwarders_default_to_none_and_take_addresses_ranges_and_ports_of_both_families() {
    let c = Config::parse(Path::new("test.toml"), MINIMAL).unwrap();
    assert!(c.mqttsn.forwarders.is_empty());
    let text = MINIMAL.replace(
        "[mqttsn]\n",
        "[mqttsn]\nforwarders = [\"127.0.0.2\", \"10.0.0.0/24\", \"[::1]:47000\", \"fd00::/64\"]\n",
    );
    let c = Config::parse(Path::new("test.toml"), &text).unwrap();
    let shown: Vec<String> = c
        .mqttsn
        .forwarders
        .entries()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        shown,
        ["127.0.0.2", "10.0.0.0/24", "[::1]:47000", "fd00::/64"]
    );
    let from = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert_eq!(c.mqttsn.forwarders.matching(from("10.0.0.9:5")), Some(1));
    assert_eq!(c.mqttsn.forwarders.matching(from("[::1]:47000")), Some(2));
    assert_eq!(c.mqttsn.forwarders.matching(from("[::1]:47001")), None);
    assert!(
        c.summary()
            .contains("MQTT-SN forwarders: 127.0.0.2, 10.0.0.0/24, [::1]:47000, fd00::/64\n"),
        "{}",
        c.summary()
    );
}

#[test]
fn bad_forwarder_entries_are_located_each() {
    let text = MINIMAL.replace(
        "[mqttsn]\nlisten = [\"127.0.0.1:1883\", \"[::1]:1883\"]\n",
        "[mqttsn]\nlisten = [\"127.0.0.1:1883\"]\nforwarders = [\n  \"gw.example\",\n  \
         \"10.0.0.1/24\",\n  \"10.0.0.0/33\",\n  \"::1\",\n  \"10.0.0.0/8\",\n  \"10.1.2.3:7\",\n]\n",
    );
    let d = errors(&text);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 5, "{msgs:#?}");
    let lines: Vec<usize> = d.iter().map(|d| d.line).collect();
    assert_eq!(lines, [8, 9, 10, 11, 13], "{msgs:#?}");
    assert!(d.iter().all(|d| d.column == 3), "{d:#?}");
    assert!(msgs[0].contains("`gw.example` is not an IP address, a CIDR range or an IP:port"));
    assert!(msgs[1].contains("host bits set"));
    assert_eq!(d[1].hint.as_deref(), Some("write `10.0.0.0/24`"));
    assert!(msgs[2].contains("prefix length 33 is too long"));
    assert!(msgs[3].contains("no listener of the address family of `::1`"));
    assert!(msgs[4].contains("`10.1.2.3:7` never matches: `10.0.0.0/8` (mqttsn.forwarders[4])"));
    assert!(
        msgs.iter().all(|m| m.contains("mqttsn.forwarders[")),
        "{msgs:#?}"
    );
}

#[test]
fn acl_and_limits_compile_into_every_ingress() {
    let text = MINIMAL.to_owned()
        + r#"
[coap]
listen = ["127.0.0.1:5683"]
[[acl]]
identity = "dev1"
publish = ["special/dev1"]
[[acl]]
publish = ["sensors/{identity}/#"]
subscribe = ["cmd/{client_id}/#"]
[limits]
messages_per_second = 2.5
bytes_per_second = "1KiB"
max_message_size = "512B"
max_identities = 7
[[limits.identity]]
identity = "dev1"
messages_per_second = 100
"#;
    let c = Config::parse(Path::new("test.toml"), &text).unwrap();
    let acl = c.security.acl.as_ref().unwrap();
    assert_eq!(acl.rules().len(), 2);
    assert_eq!(acl.rules()[0].identity.as_deref(), Some("dev1"));
    let l = &c.security.limits;
    assert_eq!(l.default.messages.per_second, 2.5);
    assert_eq!(l.default.messages.burst, 2.5);
    assert_eq!(l.default.bytes.per_second, 1024.0);
    assert_eq!(l.default.max_message_size, Some(512));
    assert_eq!(l.max_identities, 7);
    let dev1 = l.per_identity.get("dev1").unwrap();
    assert_eq!(dev1.messages.per_second, 100.0);
    assert_eq!(dev1.messages.burst, 100.0);
    // Absent keys take the [limits] values.
    assert_eq!(dev1.bytes.per_second, 1024.0);
    assert_eq!(dev1.max_message_size, Some(512));
    assert!(Arc::ptr_eq(&c.security, &c.mqttsn.core.security));
    assert!(Arc::ptr_eq(
        &c.security,
        &c.coap.as_ref().unwrap().core.security
    ));
    assert!(c.summary().contains("acl: 2 rule(s)"));
}

#[test]
fn no_acl_and_no_limits_allow_everything() {
    let c = Config::parse(Path::new("test.toml"), MINIMAL).unwrap();
    assert!(c.security.acl.is_none());
    assert!(!c.security.limits_active());
    assert!(c.summary().contains("acl: none"));
}

#[test]
fn acl_and_limits_errors_are_located() {
    let text = MINIMAL.to_owned()
        + r#"
[[acl]]
identity = ""
publish = ["a/#/b", "x/{user}"]
subscribe = ["ok/#"]
[limits]
messages_per_second = -1
byte_burst = "lots"
max_identitys = 3
[[limits.identity]]
messages_per_second = 1
"#;
    let d = errors(&text);
    let messages: Vec<String> = d
        .iter()
        .map(|d| format!("{}:{} {}", d.line, d.column, d.message))
        .collect();
    assert_eq!(d.len(), 7, "{messages:#?}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains("identity must not be empty"))
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("`a/#/b`: not a valid MQTT topic filter"))
    );
    assert!(messages.iter().any(|m| m.contains("unknown placeholder")));
    assert!(messages.iter().any(|m| m.contains("-1 is out of range")));
    assert!(messages.iter().any(|m| m.contains("needs an `identity`")));
    let unknown = d
        .iter()
        .find(|d| d.message.contains("max_identitys"))
        .unwrap();
    assert_eq!(
        unknown.hint.as_deref(),
        Some("did you mean `max_identities`?")
    );
    // Every diagnostic points into the file (line past MINIMAL's).
    assert!(d.iter().all(|d| d.line >= 18), "{messages:#?}");
}

#[test]
fn a_changed_acl_is_applied_live_to_every_ingress() {
    let base = MINIMAL.to_owned()
        + r#"
[coap]
listen = ["127.0.0.1:5683"]
[http]
listen = ["127.0.0.1:8080"]
allow_anonymous = true
"#;
    let before = Config::parse(Path::new("t.toml"), &base).unwrap();
    let after = Config::parse(
        Path::new("t.toml"),
        &(base.clone() + "[[acl]]\npublish = [\"sensors/#\"]\n[limits]\nmessages_per_second = 5\n"),
    )
    .unwrap();
    let plan = crate::reload::plan(&before, &before, &after);
    assert!(
        plan.restart_required.is_empty(),
        "{:?}",
        plan.restart_required
    );
    assert_eq!(plan.mqttsn.unwrap().security, after.security);
    assert_eq!(plan.coap.unwrap().security, after.security);
    assert_eq!(plan.http.unwrap().security, after.security);
    let same = crate::reload::plan(&after, &after, &after);
    assert!(same.mqttsn.is_none() && same.coap.is_none() && same.http.is_none());
}

#[test]
fn the_reference_jwt_example_is_valid_once_uncommented_and_is_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sensorgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find("\n# [http.jwt]\n").unwrap() + 1;
    let end = start + text[start..].find("\n\n").unwrap();
    let example: String = text[start..end]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let toml = format!("{MINIMAL}[http]\nlisten = [\"127.0.0.1:8080\"]\n{example}");
    let c = Config::parse(Path::new("/etc/sg/t.toml"), &toml).unwrap();
    assert_eq!(
        c.http.unwrap().jwt,
        Some(JwtSpec::with(
            JwtKeyFile::PublicKey("/etc/sensorgate/jwt.pem".into()),
            "sensorgate"
        ))
    );
}

#[test]
fn jwt_keys_are_checked_and_located() {
    let base = format!("{MINIMAL}[http]\nlisten = [\"127.0.0.1:8080\"]\n[http.jwt]\n");
    let ok = format!(
        "{base}jwks = \"keys/jwks.json\"\naudience = \"gw\"\nissuer = \"me\"\n\
         algorithms = [\"ES256\"]\nleeway = \"0s\"\nidentity_claim = \"device\"\n\
         default_publish = [\"public\"]\nmax_keys = 3\n"
    );
    let c = Config::parse(Path::new("/etc/sg/t.toml"), &ok).unwrap();
    assert!(
        c.summary().contains(
            "http jwt: jwks /etc/sg/keys/jwks.json (ES256), audience \"gw\", issuer \"me\", \
             leeway 0s\n"
        ),
        "{}",
        c.summary()
    );
    let jwt = c.http.unwrap().jwt.unwrap();
    assert_eq!(jwt.keys, JwtKeyFile::Jwks("/etc/sg/keys/jwks.json".into()));
    assert_eq!(jwt.algorithms, vec![JwtAlgorithm::Es256]);
    assert_eq!(
        (
            jwt.issuer.as_deref(),
            jwt.leeway,
            jwt.identity_claim.as_str()
        ),
        (Some("me"), Duration::ZERO, "device")
    );
    assert_eq!(
        (jwt.default_publish, jwt.max_keys),
        (vec!["public".into()], 3)
    );

    let cases = [
        ("audience = \"gw\"\n", "needs public_key"),
        ("public_key = \"k.pem\"\n", "needs audience"),
        (
            "public_key = \"k.pem\"\njwks = \"j.json\"\naudience = \"gw\"\n",
            "together with public_key",
        ),
        (
            "public_key = \"k.pem\"\naudience = \"gw\"\nalgorithms = [\"none\"]\n",
            "`none`",
        ),
        (
            "public_key = \"k.pem\"\naudience = \"gw\"\nalgorithms = [\"RS256\", \"HS256\"]\n",
            "algorithm confusion",
        ),
        (
            "public_key = \"k.pem\"\naudience = \"gw\"\nalgorithms = []\n",
            "is empty",
        ),
        (
            "public_key = \"k.pem\"\naudience = \"gw\"\nidentity_claim = \"exp\"\n",
            "registered claim",
        ),
        (
            "public_key = \"k.pem\"\naudience = \"gw\"\npublish_claim = \"sub\"\n",
            "already identity_claim",
        ),
        (
            "public_key = \"k.pem\"\naudience = \"gw\"\ndefault_subscribe = [\"a/#\"]\n",
            "wildcards",
        ),
        (
            "public_key = \"k.pem\"\naudience = \"gw\"\nleeway = \"11m\"\n",
            "out of range",
        ),
        (
            "public_key = \"k.pem\"\naudience = \"gw\"\nmax_keys = 0\n",
            "out of range",
        ),
        (
            "public_key = \"k.pem\"\naudience = \"gw\"\nkid = \"x\"\n",
            "unknown",
        ),
    ];
    let jwt_line = base.lines().count();
    for (keys, want) in cases {
        let d = errors(&format!("{base}{keys}"));
        assert!(
            d.iter()
                .any(|d| d.message.contains(want)
                    || d.hint.as_deref().is_some_and(|h| h.contains(want))),
            "{keys}: {d:?}"
        );
        // Located in the [http.jwt] table (its header line or one of its keys).
        assert!(
            d.iter().all(|d| d.line >= jwt_line && d.column >= 1),
            "{keys}: {d:?}"
        );
    }
}
