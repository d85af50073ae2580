//! Fuzzes the one topic validator and matcher (`bridges/src/topic.rs`): on any two strings
//! neither panics; a valid filter without wildcards is a valid name that matches itself and
//! exactly itself; a valid filter matched against a valid name never accepts a `$` name with a
//! leading wildcard.
//!
//! Input: the first byte picks where the rest splits into the filter and the name (each read
//! as lossy UTF-8, so every input reaches the checks).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate_bridges::topic::{
    has_wildcards, is_valid_filter, is_valid_name, matches, validate_filter, validate_name,
};

fuzz_target!(|data: &[u8]| {
    let Some((&at, rest)) = data.split_first() else {
        return;
    };
    let (a, b) = rest.split_at(usize::from(at).min(rest.len()));
    let (filter, name) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));

    let filter_ok = validate_filter(&filter).is_ok();
    let name_ok = validate_name(&name).is_ok();
    assert_eq!(filter_ok, is_valid_filter(&filter));
    assert_eq!(name_ok, is_valid_name(&name));
    let matched = matches(&filter, &name);

    if filter_ok && !has_wildcards(&filter) {
        assert!(
            is_valid_name(&filter),
            "a plain filter is a name: {filter:?}"
        );
        assert!(
            matches(&filter, &filter),
            "a plain filter matches itself: {filter:?}"
        );
        if name_ok {
            assert_eq!(matched, filter == name, "{filter:?} vs {name:?}");
        }
    }
    if filter_ok && name_ok && name.starts_with('$') && filter.starts_with(['+', '#']) {
        assert!(!matched, "{filter:?} must not match {name:?}");
    }
});
