//! Fuzzes the HTTP ingress's batch parser (`gateway/src/http/batch.rs`): any body, as a JSON
//! array or as NDJSON, is either refused or gives 1..=max items with valid topic names and
//! payloads within the limit, without panicking; the accepted items re-encoded as a JSON
//! array batch (payloads as `payload` text or as `payload_b64`) parse back equal.
//!
//! Input: the first byte's bit 0 picks NDJSON (else a JSON array), bit 1 re-encodes UTF-8
//! payloads as `payload` text (else everything as `payload_b64`); the rest is the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::http::batch::{fuzz_encode, fuzz_parse};
use sensorgate_bridges::topic::is_valid_name;

const MAX_ITEMS: usize = 16;
const MAX_PAYLOAD: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let (ndjson, plain_text) = (mode & 1 == 1, mode & 2 == 2);
    let Ok(items) = fuzz_parse(ndjson, body, MAX_ITEMS, MAX_PAYLOAD) else {
        return;
    };
    assert!((1..=MAX_ITEMS).contains(&items.len()));
    for (topic, payload, qos, _) in &items {
        assert!(is_valid_name(topic), "{topic:?}");
        assert!(payload.len() <= MAX_PAYLOAD);
        assert!(*qos <= 1);
    }
    let again = fuzz_encode(&items, plain_text);
    assert_eq!(fuzz_parse(false, &again, MAX_ITEMS, MAX_PAYLOAD), Ok(items));
});
