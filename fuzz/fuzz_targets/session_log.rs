//! Fuzzes the session log reader (`gateway/src/io/session_store.rs`, format versions 1 and 2
//! on the shared framing `sensorgate_bridges::durable::frame`): any bytes must read without
//! panicking, the valid part must end within the file, and the sessions read must come back
//! unchanged from a version 2 log written of them (as a compaction writes it).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::io::session_store::{fuzz_read_log, fuzz_write_log};

fuzz_target!(|data: &[u8]| {
    let Some((sessions, end)) = fuzz_read_log(data) else {
        return;
    };
    assert!(end <= data.len() as u64, "end {end} past {}", data.len());
    let rewritten = fuzz_write_log(&sessions);
    let again = fuzz_read_log(&rewritten);
    assert_eq!(again, Some((sessions, rewritten.len() as u64)), "round trip");
});
