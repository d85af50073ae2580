//! Fuzzes the fleet replay request parser and gate (`gateway/src/fleet/replay.rs`): any
//! payload on the replay topic is judged without a panic; an accepted request is within the
//! bounds (size, id length, range no longer than `max_records`), a refusal serializes.
//!
//! Input: the payload of a message on `<prefix>/replay`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::fleet::replay::fuzz_request;

fuzz_target!(|data: &[u8]| {
    fuzz_request(data);
});
