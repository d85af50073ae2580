//! Fuzzes the persisted session record decoder: any bytes must decode without panicking, and
//! every record it accepts must encode back to exactly the same bytes (the format is
//! canonical), and restore into a core.

#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use sensorgate::mqttsn::core::{Core, CoreConfig};
use sensorgate::mqttsn::persist::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let Ok(record) = decode(data) else {
        return;
    };
    let mut out = Vec::new();
    encode(&record, &mut out).expect("a decoded record fits its length fields again");
    assert_eq!(out, data, "round trip of {record:?}");
    let mut core = Core::new(CoreConfig::with_defaults(1));
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    // A clean session that is not asleep is refused; anything else decoded must restore.
    if let Err(e) = core.restore(now, data) {
        assert!(record.clean_session, "{e}: {record:?}");
    }
});
