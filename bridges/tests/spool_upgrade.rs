//! A spool written by format version 2 (the committed fixture `tests/fixtures/spool-v2`, see
//! its README) opened by this build: every old record reads back as written, with the default
//! origin, the upstreams keep their cursors, and new records (format version 3, with their
//! origin) go after them, in a new segment, without rewriting the old one.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use sensorgate_bridges::message::{Message, Origin, Protocol, Qos};
use sensorgate_bridges::spool::{FsyncPolicy, Record, Spool, SpoolConfig, StdFs, WhenFull};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/spool-v2");
const SEGMENT: &str = "00000000000000000001.seg";

fn config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 20,
        segment_bytes: 64 * 1024,
        min_free_bytes: 0,
        max_age: None,
        when_full: WhenFull::RejectNew,
        fsync: FsyncPolicy::Always,
        memory_tail_bytes: 8 << 20,
        retain_bytes: 0,
    }
}

/// The records the fixture was made with (see its README).
fn old_records() -> Vec<Record> {
    let rows: [(&str, &[u8], Qos, bool); 6] = [
        ("sensors/1/temp", b"21.5", Qos::AtMostOnce, false),
        ("sensors/1/hum", b"40", Qos::AtLeastOnce, false),
        ("sensors/2/state", b"on", Qos::AtLeastOnce, true),
        ("", b"", Qos::ExactlyOnce, false),
        ("a/b/c", &[0, 1, 2, 255, 254], Qos::ExactlyOnce, true),
        ("t", &[b'x'; 300], Qos::AtLeastOnce, false),
    ];
    rows.iter()
        .enumerate()
        .map(|(i, &(topic, payload, qos, retain))| Record {
            seq: i as u64 + 1,
            time_ms: 1_700_000_000_000 + i as u64 * 1000,
            qos,
            retain,
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            origin: Origin::default(),
        })
        .collect()
}

fn read_all(spool: &mut Spool<StdFs>, index: usize) -> Vec<Record> {
    let mut pos = spool.reader(index);
    let mut out = Vec::new();
    spool.read(&mut pos, 1000, 0, &mut out).expect("read");
    out
}

fn names() -> Vec<String> {
    vec!["alpha".to_owned(), "beta".to_owned()]
}

#[test]
fn a_version_2_spool_is_read_kept_and_continued_in_version_3() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(FIXTURE).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name != "README" {
            std::fs::copy(entry.path(), dir.join(name)).unwrap();
        }
    }
    let old_segment = std::fs::read(dir.join(SEGMENT)).unwrap();
    assert_eq!(
        &old_segment[8..12],
        &2u32.to_le_bytes(),
        "the fixture is version 2"
    );

    let (mut spool, recovery) = Spool::open(StdFs, config(&dir), &names()).expect("open");
    assert_eq!(recovery.records, 6);
    assert_eq!(recovery.corrupt, 0);
    assert_eq!(
        recovery.cursors,
        vec![("alpha".to_owned(), 4), ("beta".to_owned(), 1)]
    );
    let old = old_records();
    assert_eq!(read_all(&mut spool, 1), old, "beta reads everything");
    assert_eq!(read_all(&mut spool, 0), old[3..], "alpha from its cursor");

    let origin = Origin {
        protocol: Protocol::MqttSn,
        client_id: Some(Arc::from("sensor-7")),
        peer: Some(Arc::from("udp:[::1]:5000")),
    };
    let mut new = Vec::new();
    for (i, qos) in [Qos::AtLeastOnce, Qos::AtMostOnce].into_iter().enumerate() {
        let mut m = Message::new(
            format!("new/{i}"),
            Bytes::from(vec![b'n'; i + 1]),
            qos,
            i == 1,
        );
        m.origin = origin.clone();
        let seq = spool.append(1_800_000_000_000, &m).expect("append");
        assert!(seq > 6);
        new.push(Record {
            seq,
            time_ms: 1_800_000_000_000,
            qos,
            retain: i == 1,
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            origin: origin.clone(),
        });
    }
    let pending = spool.write().expect("write").expect("a write to sync");
    let synced = pending.run();
    spool.synced(&pending, &synced);
    synced.expect("fsync");

    let both: Vec<Record> = old.iter().cloned().chain(new.iter().cloned()).collect();
    assert_eq!(read_all(&mut spool, 1), both);
    assert_eq!(
        std::fs::read(dir.join(SEGMENT)).unwrap(),
        old_segment,
        "the version 2 segment is not rewritten"
    );
    spool.save_cursors().expect("save cursors");
    drop(spool);

    // Reopened: both kinds again, the new segment in version 3.
    let (mut spool, recovery) = Spool::open(StdFs, config(&dir), &names()).expect("reopen");
    assert_eq!(recovery.records, 8);
    assert_eq!(recovery.segments, 2);
    assert_eq!(read_all(&mut spool, 1), both);
    assert_eq!(read_all(&mut spool, 0), both[3..]);
    let newest = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".seg") && n != SEGMENT)
        .collect::<Vec<_>>();
    assert_eq!(newest.len(), 1, "{newest:?}");
    let header = std::fs::read(dir.join(&newest[0])).unwrap();
    assert_eq!(&header[..12], b"SGSPOOL\0\x03\0\0\0");
}
