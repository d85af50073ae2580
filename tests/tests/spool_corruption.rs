//! Bit rot in the spool, end to end: sensors spool a few thousand QoS 1 messages while the
//! broker is down, the gateway stops, one byte of a record in the middle of a closed segment
//! and one byte of another segment's header are flipped, and the gateway starts again with
//! the broker: every acknowledged message but the damaged record's arrives, and the loss is
//! counted and logged with its segment and offset.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use sensorgate_tests::{Gateway, GatewayConfig, Mosquitto, Subscriber};

use common::{Fleet, Tally, parse_payload, verify};

/// The spool's record sync word (`bridges/src/spool/record.rs`, format version 2).
const SYNC: [u8; 4] = [0xD3, 0x5A, 0x9C, 0xE7];
/// Bytes of a record header, and of the body before the topic.
const RECORD_HEADER: usize = 24;
const BODY_FIXED: usize = 11;

/// The offsets of the records of a segment file (valid ones: the file is intact here).
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut at = 16;
    let mut out = Vec::new();
    while at + RECORD_HEADER <= bytes.len() && bytes[at..at + 4] == SYNC {
        out.push(at);
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at += RECORD_HEADER + len;
    }
    assert_eq!(at, bytes.len(), "segment parsed to its end");
    out
}

/// The fleet payload of the record at `at`.
fn payload_at(bytes: &[u8], at: usize) -> (usize, u64) {
    let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
    let body = &bytes[at + RECORD_HEADER..at + RECORD_HEADER + len];
    let topic_len = usize::from(u16::from_le_bytes(body[9..11].try_into().unwrap()));
    let mut at = BODY_FIXED + topic_len;
    // Format version 3: flags bit 3 says an origin (protocol u8, client id and peer, each
    // with a u8 length) sits between the topic and the payload.
    if body[0] & 8 != 0 {
        at += 1;
        at += 1 + usize::from(body[at]);
        at += 1 + usize::from(body[at]);
    }
    parse_payload(&body[at..])
}

#[test]
fn a_flipped_byte_in_a_closed_segment_costs_only_its_own_record() {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let mut sub =
        Subscriber::start_session(broker.port(), &["fleet/#"], "corruption-observer").unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    cfg.log_level = "info".into();
    cfg.extra_sections
        .push_str("\n[spool]\nsegment_bytes = \"64KiB\"\nmax_bytes = \"64MiB\"\n");
    let mut gw = Gateway::start(&cfg).unwrap();
    broker.stop().unwrap();
    let mut fleet = Fleet::new(gw.sn_addr(), 20, 2000);
    fleet.run(Duration::from_secs(3));
    let acked = fleet.acked_count();
    assert!(acked > 2000, "only {acked} acknowledged");
    gw.stop().unwrap();

    let spool = gw.dir().join("state").join("spool");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "segments: {segs:?}");
    // A length byte of a record in the middle of the second (closed) segment.
    let mut bytes = std::fs::read(&segs[1]).unwrap();
    let offsets = record_offsets(&bytes);
    let victim = offsets[offsets.len() / 2];
    let lost = payload_at(&bytes, victim);
    bytes[victim + 5] ^= 0x01;
    std::fs::write(&segs[1], &bytes).unwrap();
    // The version field of the first segment's header.
    let mut first = std::fs::read(&segs[0]).unwrap();
    first[9] ^= 0x10;
    std::fs::write(&segs[0], &first).unwrap();

    gw.restart().unwrap();
    broker.restart().unwrap();
    let mut want = Tally::default();
    for (&c, ns) in &fleet.tally.acked {
        for &n in ns {
            if (c, n) != lost {
                want.acked(c, n);
            }
        }
    }
    verify(&mut sub, &want, Duration::from_secs(60));
    gw.stop().unwrap();
    let log = gw.log();
    let seg1 = segs[1].display().to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("Spool record damaged; skipped.")
                && l.contains(&seg1)
                && l.contains(&format!("offset={victim}"))),
        "damage not logged with segment and offset:\n{log}"
    );
    assert!(
        log.contains("Spool segment header damaged"),
        "header damage not logged:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("Spool status") && l.contains("corrupt=1")),
        "corrupt not counted once in the status:\n{log}"
    );
    eprintln!(
        "{acked} acknowledged, {} segments; lost only {lost:?}",
        segs.len()
    );
}
