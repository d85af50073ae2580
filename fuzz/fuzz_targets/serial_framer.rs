//! Fuzzes the serial framer: any byte stream, pushed in chunks with frame timeouts between
//! some of them, must never panic; the decoder stays bounded (`check_invariants`), every frame
//! it hands out is non-empty and at most `max_frame` octets, and encoding a frame then decoding
//! it with a fresh decoder gives exactly that frame back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::serial::framing::{Crc, Decoder, Framing, MIN_MAX_FRAME, encode};

const FRAMINGS: [Framing; 4] = [
    Framing::Length,
    Framing::Slip { crc: Crc::None },
    Framing::Slip { crc: Crc::Crc16 },
    Framing::Slip { crc: Crc::Crc32 },
];

// Input: one octet picking the framing (bits 1..0) and `max_frame` (bits 7..2), then chunks,
// each a header octet (bits 6..0: length; bit 7: the line goes idle after it) and its octets.
fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let framing = FRAMINGS[usize::from(first & 0b11)];
    let max_frame = MIN_MAX_FRAME + usize::from(first >> 2) * 8;
    let mut decoder = Decoder::new(framing, max_frame);
    let mut frames = Vec::new();
    while let Some((&header, tail)) = rest.split_first() {
        let len = usize::from(header & 0x7F).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        rest = next;
        decoder.push(chunk, &mut |frame| frames.push(frame.to_vec()));
        decoder.check_invariants();
        if header & 0x80 != 0 {
            decoder.idle();
            decoder.check_invariants();
            assert_eq!(decoder.buffered(), 0);
        }
    }
    assert_eq!(decoder.stats().frames, frames.len() as u64);
    for frame in &frames {
        assert!(!frame.is_empty() && frame.len() <= max_frame, "{frame:02x?}");
        let mut line = Vec::new();
        encode(framing, frame, &mut line);
        let mut fresh = Decoder::new(framing, max_frame);
        let mut again = Vec::new();
        fresh.push(&line, &mut |f| again.push(f.to_vec()));
        assert_eq!(again, [frame.clone()], "{framing:?} re-encoding {frame:02x?}");
    }
});
