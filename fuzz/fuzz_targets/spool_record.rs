//! Fuzzes the spool's record decoder and its resynchronisation after damage (format version
//! 3, and the version 2 records it still reads, `bridges/src/spool/record.rs`): any bytes
//! must decode without panicking, every record it accepts must encode back to exactly the
//! same bytes in the layout it was read in (with or without the origin; a record with an
//! unknown protocol code, read as `internal`, is left out), and damage of any length and
//! content between intact records must never cost a record before it, nor one after it
//! unless the damage itself holds a forged record header (a sync word and a header CRC that
//! checks). The segment around the damage holds version 2 records before it and version 3
//! records (with an origin) after it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate_bridges::spool::{fuzz_resync, fuzz_round_trip};

/// The sync word every record starts with (`record::RECORD_SYNC`).
const SYNC: [u8; 4] = [0xD3, 0x5A, 0x9C, 0xE7];

fuzz_target!(|data: &[u8]| {
    if let Some((out, len)) = fuzz_round_trip(data) {
        assert_eq!(Some(out.as_slice()), data.get(..len), "round trip");
    }
    let (scanned, read) = fuzz_resync(data);
    assert!(
        read.starts_with(&[100, 101, 102]),
        "records before the damage: {read:?}"
    );
    if !data.windows(4).any(|w| w == SYNC) {
        assert_eq!(
            read,
            [100, 101, 102, 103, 104, 105],
            "records after the damage"
        );
        assert_eq!(scanned, 6, "recovery scan");
    }
});
