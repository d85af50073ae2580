//! Fuzzes what `sensorgate status` does with a gateway's answer (`gateway/src/observe/cli.rs`):
//! any bytes either fail to parse as a status document or parse into one that renders (with
//! and without colour) and maps to an exit status without panicking, and that survives a JSON
//! round trip unchanged.
//!
//! Input: the `/status` body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::observe::cli::{exit_code, render};
use sensorgate::observe::status::StatusDoc;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<StatusDoc>(data) else {
        return;
    };
    let _ = render(&doc, false);
    let _ = render(&doc, true);
    let code = exit_code(&Ok(doc.clone()));
    assert!(code <= 2, "a parsed document is healthy, degraded or unhealthy");
    let again: StatusDoc =
        serde_json::from_slice(&serde_json::to_vec(&doc).expect("a document encodes"))
            .expect("what was encoded decodes");
    assert_eq!(again, doc);
});
