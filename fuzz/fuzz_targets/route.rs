//! Fuzzes the route table (`bridges/src/route.rs`): compiling arbitrary filters, prefixes and
//! templates never panics; a compiled route's rewrite of any topic and client id is a valid
//! topic name (or no target); the reverse mapping of a route's own rewrite gives back a topic
//! its filter matches; the upstream filters are valid filters.
//!
//! Input: NUL-separated fields (lossy UTF-8): filter, strip_prefix, add_prefix, template,
//! topic, client id, sensor filter; an empty prefix or template field means "not set".

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use sensorgate_bridges::message::{Origin, Protocol, Qos};
use sensorgate_bridges::route::{RouteSpec, RouteTable};
use sensorgate_bridges::topic::{filters_overlap, is_valid_filter, is_valid_name, matches};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\0');
    let mut next = || fields.next().unwrap_or("").to_owned();
    let (filter, strip, add, template, topic, client_id, sensor_filter) =
        (next(), next(), next(), next(), next(), next(), next());
    let set = |s: String| (!s.is_empty()).then_some(s);
    let spec = RouteSpec {
        filter: filter.clone(),
        upstreams: vec!["up".to_owned()],
        strip_prefix: set(strip),
        add_prefix: set(add),
        template: set(template),
        qos_max: Some(Qos::AtLeastOnce),
    };
    assert_eq!(
        filters_overlap(&filter, &sensor_filter),
        filters_overlap(&sensor_filter, &filter)
    );
    let Ok(table) = RouteTable::compile(&[spec], &["up"], "gw") else {
        return;
    };
    let origin = Origin {
        protocol: Protocol::MqttSn,
        client_id: Some(Arc::from(client_id.as_str())),
        peer: None,
    };
    if is_valid_name(&topic) {
        assert_eq!(table.accepts(&topic), matches(&filter, &topic));
        if let Some(target) = table.target(0, &topic, Qos::ExactlyOnce, &origin) {
            assert!(is_valid_name(&target.topic), "{:?}", target.topic);
            assert_eq!(target.qos, Qos::AtLeastOnce);
            if let Some(back) = table.downlink_topic(0, &target.topic) {
                assert!(is_valid_name(&back), "{back:?}");
                assert!(matches(&filter, &back), "{back:?}");
            }
        }
    }
    if is_valid_filter(&sensor_filter) {
        for f in table.upstream_filters(0, &sensor_filter) {
            assert!(is_valid_filter(&f), "{f:?}");
        }
    }
});
