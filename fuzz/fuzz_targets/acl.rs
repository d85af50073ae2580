//! Fuzzes the ACL checks (`gateway/src/security/acl.rs`) with what the network supplies: the
//! topic or filter of a PUBLISH / SUBSCRIBE / CoAP path and the ClientId (or `id` query). On
//! any strings nothing panics, and a `{client_id}` rule never lets a publish or a
//! subscription out of the ClientId's own single level; a granted filter never matches a
//! name the pattern would not (the subscribe check is sound).
//!
//! Input: the first byte picks where the rest splits into the ClientId and the topic (each
//! read as lossy UTF-8).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::security::acl::{Acl, Pattern, Requester, Rule, filter_within, safe_value};
use sensorgate_bridges::topic::{is_valid_filter, is_valid_name, matches};

fuzz_target!(|data: &[u8]| {
    let Some((&at, rest)) = data.split_first() else {
        return;
    };
    let (a, b) = rest.split_at(usize::from(at).min(rest.len()));
    let (client_id, topic) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    let pattern = |p: &str| Pattern::new(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let acl = Acl::new(vec![Rule {
        identity: None,
        publish: vec![pattern("d/{client_id}/#")],
        subscribe: vec![pattern("c/{client_id}/#"), pattern("open/+/x")],
    }]);
    let who = Requester::new(None, Some(&client_id));
    let own = |t: &str| t == format!("d/{client_id}") || t.starts_with(&format!("d/{client_id}/"));
    if acl.may_publish(&who, &topic) && is_valid_name(&topic) {
        assert!(safe_value(&client_id), "{client_id:?}");
        assert!(own(&topic), "{client_id:?} published {topic:?}");
    }
    if acl.may_subscribe(&who, &topic) && is_valid_filter(&topic) {
        let own_filter = topic == format!("c/{client_id}")
            || topic.starts_with(&format!("c/{client_id}/"))
            || filter_within(&topic, "open/+/x");
        assert!(own_filter, "{client_id:?} subscribed {topic:?}");
    }
    // Soundness of the subscribe check against the client id read as a name.
    if is_valid_filter(&topic) && is_valid_name(&client_id) && filter_within(&topic, "a/+/#") {
        if matches(&topic, &client_id) {
            assert!(matches("a/+/#", &client_id), "{topic:?} {client_id:?}");
        }
    }
    let _ = acl.may_receive(&who, &topic);
});
