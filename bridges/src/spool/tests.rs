//! Model-based tests of the spool: random appends, writes, syncs, acknowledgements, reads,
//! crashes and injected faults against a model of what must survive.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::log::{
    AppendError, BacklogInfo, Chunks, FsyncPolicy, ReadPos, Spool, SpoolConfig, WhenFull,
    read_records,
};
use super::memfs::{Faults, MemFs};
use crate::message::{Message, Qos};

const UPSTREAMS: usize = 2;

fn config(max_bytes: u64, when_full: WhenFull) -> SpoolConfig {
    SpoolConfig {
        dir: PathBuf::from("/spool"),
        max_bytes,
        segment_bytes: 64 * 1024,
        min_free_bytes: 0,
        max_age: None,
        when_full,
        fsync: FsyncPolicy::Always,
        memory_tail_bytes: 8 << 20,
        retain_bytes: 0,
    }
}

fn names() -> Vec<String> {
    (0..UPSTREAMS).map(|i| format!("up{i}")).collect()
}

fn msg(i: u64, size: usize) -> Message {
    let mut payload = i.to_le_bytes().to_vec();
    payload.resize(size.max(8), b'x');
    Message {
        topic: format!("s/{}", i % 7),
        payload: Bytes::from(payload),
        qos: Qos::AtLeastOnce,
        retain: false,
        origin: Default::default(),
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Append n messages of a size, write, sync (a group commit).
    Commit(u8, u16),
    /// Upstream reads up to n records and acknowledges the first k of them.
    Drain(usize, u8, u8),
    SaveCursors,
    Crash(u64),
    Faults {
        enospc: bool,
        eio: bool,
        fail_sync: bool,
    },
    /// Bit rot: XOR random bytes into a run of `n` bytes at a random place of a closed
    /// segment (any but the newest file), while the spool runs (readers meet it) or before
    /// a restart (recovery meets it).
    Corrupt(u64, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..40, 8u16..3000).prop_map(|(n, s)| Op::Commit(n, s)),
        5 => (0..UPSTREAMS, 1u8..60, 0u8..60).prop_map(|(u, n, k)| Op::Drain(u, n, k)),
        1 => Just(Op::SaveCursors),
        1 => any::<u64>().prop_map(Op::Crash),
        1 => (prop::bool::weighted(0.3), prop::bool::weighted(0.2), prop::bool::weighted(0.3))
            .prop_map(|(enospc, eio, fail_sync)| Op::Faults { enospc, eio, fail_sync }),
        1 => (any::<u64>(), prop_oneof![3 => Just(1u8), 1 => 2u8..40]).prop_map(|(seed, n)| Op::Corrupt(seed, n)),
    ]
}

/// The model: what was acknowledged (durable), and per upstream what it acknowledged.
#[derive(Default)]
struct Model {
    /// seq -> payload of every record whose group commit succeeded.
    durable: BTreeMap<u64, Bytes>,
    /// Every seq ever handed out, acknowledged or not (a failed write may hand it out again).
    issued: BTreeMap<u64, Bytes>,
    /// Every seq written to the OS: readers may have seen it.
    written: BTreeMap<u64, Bytes>,
    /// Per upstream: every seq it acknowledged (moved its cursor over).
    delivered: Vec<BTreeMap<u64, ()>>,
    /// Every seq whose record bytes were damaged: allowed to be lost, nothing else is.
    damaged: BTreeMap<u64, ()>,
}

/// The segment files of `fs`, in log order.
fn segment_files(fs: &MemFs) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = fs
        .file_names()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs
}

/// Damages `n` bytes of a random closed segment of `fs` and returns the sequence ids of the
/// records they touched (found by walking the records that still parse, past earlier
/// damage, byte by byte).
fn rot(fs: &MemFs, seed: u64, n: u8) -> Vec<u64> {
    use super::record::{Parse, SEGMENT_HEADER, parse};
    let mut rng = SmallRng::seed_from_u64(seed);
    let segs = segment_files(fs);
    if segs.len() < 2 {
        return Vec::new();
    }
    let seg = &segs[rng.random_range(0..segs.len() - 1)];
    let bytes = fs.contents(seg);
    if bytes.is_empty() {
        return Vec::new();
    }
    let offset = rng.random_range(0..bytes.len());
    let damaged = offset..offset + usize::from(n);
    let mask: Vec<u8> = (0..n).map(|_| rng.random_range(1..=255u8)).collect();
    let mut hit = Vec::new();
    let mut at = SEGMENT_HEADER as usize;
    while at < bytes.len() {
        match parse(&bytes[at..]) {
            Parse::Record(r, len) => {
                if at < damaged.end && damaged.start < at + len {
                    hit.push(r.seq);
                }
                at += len;
            }
            _ => at += 1,
        }
    }
    fs.corrupt_with(seg, offset, &mask);
    hit
}

fn run(ops: Vec<Op>, max_bytes: u64) -> Result<(), TestCaseError> {
    let fs = MemFs::new();
    let open =
        |fs: &MemFs| Spool::open(fs.clone(), config(max_bytes, WhenFull::RejectNew), &names());
    let (mut spool, _) = open(&fs).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut model = Model {
        delivered: vec![BTreeMap::new(); UPSTREAMS],
        ..Model::default()
    };
    let mut readers: Vec<ReadPos> = (0..UPSTREAMS).map(|u| spool.reader(u)).collect();
    // Each reader keeps its read buffer across reads, as a drain does (until a crash).
    let mut chunks: Vec<Chunks> = (0..UPSTREAMS).map(|_| Chunks::default()).collect();
    let mut counter = 0u64;
    for op in ops {
        match op {
            Op::Commit(n, size) => {
                let mut group = Vec::new();
                for _ in 0..n {
                    counter += 1;
                    let m = msg(counter, usize::from(size));
                    match spool.append(1, &m) {
                        Ok(seq) => {
                            // An id that may have left (it was written) is never reused.
                            prop_assert!(
                                model.written.keys().next_back().is_none_or(|&l| seq > l),
                                "seq {seq} reused"
                            );
                            model.issued.insert(seq, m.payload.clone());
                            group.push((seq, m.payload));
                        }
                        Err(AppendError::Full | AppendError::TooLarge) => {}
                    }
                }
                if let Ok(Some(pending)) = spool.write() {
                    model
                        .written
                        .extend(group.iter().map(|(s, p)| (*s, p.clone())));
                    let result = pending.run();
                    spool.synced(&pending, &result);
                    if result.is_ok() {
                        model.durable.extend(group);
                    }
                }
            }
            Op::Drain(u, n, k) => {
                let mut out = Vec::new();
                read_records(
                    &mut spool,
                    &mut readers[u],
                    usize::from(n),
                    1,
                    &mut chunks[u],
                    &mut out,
                )
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut last = None;
                for r in &out {
                    prop_assert!(last.is_none_or(|l| r.seq > l), "out of order");
                    last = Some(r.seq);
                    let issued = model.issued.get(&r.seq);
                    prop_assert_eq!(issued, Some(&r.payload), "content of seq {}", r.seq);
                }
                // Acknowledge a prefix of what was read, as the drain does.
                let k = usize::from(k).min(out.len());
                if k > 0 {
                    for r in &out[..k] {
                        model.delivered[u].insert(r.seq, ());
                    }
                    let next = out.get(k).map_or(readers[u].next_seq(), |r| r.seq);
                    spool.set_cursor(u, next);
                }
                // What was read and not acknowledged is sent again: read from the cursor.
                readers[u] = spool.reader(u);
            }
            Op::SaveCursors => {
                // The writer's housekeeping.
                spool.collect_garbage();
                let _ = spool.save_cursors();
            }
            Op::Crash(seed) => {
                drop(spool);
                fs.crash(&mut SmallRng::seed_from_u64(seed));
                let faults = fs.faults();
                fs.set_faults(Faults {
                    available: u64::MAX,
                    ..Faults::default()
                });
                let (s, _) = open(&fs).map_err(|e| TestCaseError::fail(e.to_string()))?;
                spool = s;
                fs.set_faults(faults);
                readers = (0..UPSTREAMS).map(|u| spool.reader(u)).collect();
                chunks = (0..UPSTREAMS).map(|_| Chunks::default()).collect();
            }
            Op::Faults {
                enospc,
                eio,
                fail_sync,
            } => fs.set_faults(Faults {
                enospc,
                eio_writes: eio,
                fail_sync,
                available: u64::MAX,
            }),
            Op::Corrupt(seed, n) => {
                model
                    .damaged
                    .extend(rot(&fs, seed, n).into_iter().map(|s| (s, ())));
            }
        }
    }
    // Heal, restart, and drain everything: every durable record reaches every upstream
    // (before or now), in order, with its content.
    fs.set_faults(Faults {
        available: u64::MAX,
        ..Faults::default()
    });
    drop(spool);
    let (mut spool, _) = open(&fs).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for u in 0..UPSTREAMS {
        let mut pos = spool.reader(u);
        let mut all = Vec::new();
        loop {
            let mut out = Vec::new();
            spool
                .read(&mut pos, 1000, 1, &mut out)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            if out.is_empty() {
                break;
            }
            all.extend(out);
        }
        for w in all.windows(2) {
            prop_assert!(w[0].seq < w[1].seq);
        }
        for r in &all {
            prop_assert_eq!(model.issued.get(&r.seq), Some(&r.payload));
        }
        for seq in model.durable.keys() {
            let got = model.delivered[u].contains_key(seq)
                || model.damaged.contains_key(seq)
                || all.iter().any(|r| r.seq == *seq);
            prop_assert!(got, "durable seq {seq} lost for upstream {u}");
        }
        spool.set_cursor(u, pos.next_seq());
    }
    spool.collect_garbage();
    // Everything acknowledged: at most the active segment is left.
    prop_assert!(
        spool.stats().segments <= 1,
        "segments left: {}",
        spool.stats().segments
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn nothing_durable_is_lost(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, 64 * 1024 * 1024)?;
    }

    #[test]
    fn nothing_durable_is_lost_when_small(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, 300 * 1024)?;
    }
}

#[test]
fn a_second_open_is_refused_until_the_first_closes() {
    let fs = MemFs::new();
    let (spool, _) =
        Spool::open(fs.clone(), config(1 << 20, WhenFull::RejectNew), &names()).unwrap();
    let err = Spool::open(fs.clone(), config(1 << 20, WhenFull::RejectNew), &names())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("in use by another sensorgate"),
        "{err}"
    );
    drop(spool);
    assert!(Spool::open(fs, config(1 << 20, WhenFull::RejectNew), &names()).is_ok());
}

#[test]
fn reject_new_refuses_and_keeps_everything() {
    let fs = MemFs::new();
    let (mut spool, _) =
        Spool::open(fs, config(300 * 1024, WhenFull::RejectNew), &names()).unwrap();
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..2000 {
        match spool.append(1, &msg(i, 1000)) {
            Ok(_) => accepted += 1,
            Err(AppendError::Full) => refused += 1,
            Err(e) => panic!("{e}"),
        }
        if i % 10 == 0 {
            spool.write().unwrap();
        }
    }
    spool.write().unwrap();
    assert!(
        refused > 0 && accepted > 200,
        "accepted {accepted} refused {refused}"
    );
    assert!(spool.stats().bytes <= 300 * 1024);
    let mut pos = spool.reader(0);
    let mut out = Vec::new();
    spool.read(&mut pos, 10_000, 1, &mut out).unwrap();
    assert_eq!(out.len(), accepted);
}

#[test]
fn drop_oldest_counts_what_it_drops_and_keeps_the_newest() {
    let fs = MemFs::new();
    let (mut spool, _) =
        Spool::open(fs, config(300 * 1024, WhenFull::DropOldest), &names()).unwrap();
    for i in 0..2000 {
        spool.append(1, &msg(i, 1000)).unwrap();
        if i % 10 == 0 {
            spool.write().unwrap();
        }
    }
    spool.write().unwrap();
    let stats = spool.stats();
    assert!(stats.bytes <= 300 * 1024);
    let mut pos = spool.reader(0);
    let mut out = Vec::new();
    spool.read(&mut pos, 10_000, 1, &mut out).unwrap();
    assert_eq!(out.len() as u64 + stats.dropped_oldest, 2000);
    assert_eq!(out.last().unwrap().seq, 2000);
}

#[test]
fn a_reader_at_a_sequence_id_reads_from_there_and_moves_no_cursor() {
    let fs = MemFs::new();
    let (mut spool, _) =
        Spool::open(fs, config(300 * 1024, WhenFull::DropOldest), &names()).unwrap();
    assert_eq!(spool.oldest_seq(), None);
    for i in 0..2000 {
        spool.append(1, &msg(i, 1000)).unwrap();
        if i % 10 == 0 {
            spool.write().unwrap();
        }
    }
    spool.write().unwrap();
    // `drop_oldest` dropped whole segments: the oldest id held is where the first one starts.
    let oldest = spool.oldest_seq().unwrap();
    assert_eq!(oldest, spool.stats().dropped_oldest + 1);
    let mut out = Vec::new();
    // A range still held: exactly from the id asked for, with the ids kept.
    let mut pos = spool.reader_at(1990);
    spool.read(&mut pos, 5, 1, &mut out).unwrap();
    let seqs: Vec<u64> = out.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1990, 1991, 1992, 1993, 1994]);
    assert_eq!(out[0].payload[..8], 1989u64.to_le_bytes());
    // A dropped range: the first record read is the oldest held, which says what is gone.
    out.clear();
    let mut pos = spool.reader_at(1);
    spool.read(&mut pos, 1, 1, &mut out).unwrap();
    assert_eq!(out[0].seq, oldest);
    // No cursor moved.
    assert_eq!(spool.cursor(0), spool.cursor(1));
    assert!(spool.cursor(0).unwrap() <= oldest);
}

#[test]
fn acknowledged_segments_are_kept_up_to_the_retention_and_yield_to_new_data() {
    let fs = MemFs::new();
    let cfg = SpoolConfig {
        retain_bytes: 200 * 1024,
        ..config(600 * 1024, WhenFull::RejectNew)
    };
    let (mut spool, _) = Spool::open(fs, cfg, &names()).unwrap();
    for i in 0..500 {
        spool.append(1, &msg(i, 1000)).unwrap();
        if i % 10 == 0 {
            spool.write().unwrap();
        }
    }
    spool.write().unwrap();
    let next = spool.next_seq();
    for u in 0..UPSTREAMS {
        spool.set_cursor(u, next);
    }
    spool.collect_garbage();
    // About 500 KB acknowledged: the newest whole segments within 200 KiB stay, readable.
    let oldest = spool.oldest_seq().unwrap();
    assert!(oldest > 1, "the oldest acknowledged segments are gone");
    assert!(
        next - oldest >= 120,
        "{} acknowledged records kept",
        next - oldest
    );
    assert!(spool.stats().bytes <= 200 * 1024 + 64 * 1024 + 2048);
    let mut out = Vec::new();
    let mut pos = spool.reader_at(oldest);
    spool.read(&mut pos, 3, 1, &mut out).unwrap();
    let seqs: Vec<u64> = out.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![oldest, oldest + 1, oldest + 2]);
    assert!(!spool.refusing(), "kept data is room for new data");
    // New data, never acknowledged: the kept segments give way before anything is refused.
    let mut accepted = 0u64;
    for i in 500..2000 {
        match spool.append(1, &msg(i, 1000)) {
            Ok(_) => accepted += 1,
            Err(AppendError::Full) => break,
            Err(e) => panic!("{e}"),
        }
        if i % 10 == 0 {
            spool.write().unwrap();
        }
    }
    assert!(accepted >= 500, "only {accepted} new records taken");
    // (The segment that was active at the acknowledgement also holds new records: it stays.)
    assert!(
        spool.oldest_seq().unwrap() > oldest,
        "the kept segments went first: oldest {:?}, next {next}",
        spool.oldest_seq()
    );
}

#[test]
fn a_corrupt_record_is_skipped_and_counted_the_rest_kept() {
    let fs = MemFs::new();
    let (mut spool, _) =
        Spool::open(fs.clone(), config(1 << 20, WhenFull::RejectNew), &names()).unwrap();
    for i in 0..10 {
        spool.append(1, &msg(i, 100)).unwrap();
    }
    let p = spool.write().unwrap().unwrap();
    p.run().unwrap();
    drop(spool);
    let seg = fs
        .file_names()
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    // The third record's payload: header 16, then 3 records of 24 + 11 + 3 + 100.
    fs.corrupt(&seg, 16 + 2 * 138 + 60);
    let (mut spool, recovery) =
        Spool::open(fs, config(1 << 20, WhenFull::RejectNew), &names()).unwrap();
    assert_eq!(recovery.corrupt, 1);
    assert_eq!(recovery.records, 9);
    let mut pos = spool.reader(0);
    let mut out = Vec::new();
    spool.read(&mut pos, 100, 1, &mut out).unwrap();
    assert_eq!(
        out.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 4, 5, 6, 7, 8, 9, 10]
    );
}

#[test]
fn bytes_written_per_message_stay_close_to_the_record() {
    let fs = MemFs::new();
    let (mut spool, _) =
        Spool::open(fs.clone(), config(64 << 20, WhenFull::RejectNew), &names()).unwrap();
    let m = msg(1, 32);
    let record = super::record::encoded_len(&m.topic, &m.payload, &m.origin) as u64;
    for group in 0..1000 {
        for i in 0..20 {
            spool.append(1, &msg(group * 20 + i, 32)).unwrap();
        }
        let p = spool.write().unwrap().unwrap();
        let r = p.run();
        spool.synced(&p, &r);
    }
    let (written, _) = fs.io_counts();
    let per_msg = written as f64 / 20_000.0;
    assert!(
        per_msg <= 1.1 * record as f64,
        "{per_msg} bytes per {record}-byte record"
    );
}

#[test]
fn large_segments_and_records_are_recovered_and_read_in_chunks() {
    let fs = MemFs::new();
    let mut cfg = config(64 << 20, WhenFull::RejectNew);
    cfg.segment_bytes = 8 << 20;
    let (mut spool, _) = Spool::open(fs.clone(), cfg.clone(), &names()).unwrap();
    let sizes: Vec<usize> = (0..3000u64)
        .map(|i| match i {
            1000 => 1 << 20,
            2000 => 100_000,
            _ => 10 + (i as usize * 37) % 900,
        })
        .collect();
    for (i, &size) in sizes.iter().enumerate() {
        spool.append(1, &msg(i as u64, size)).unwrap();
        if i % 50 == 0 {
            let p = spool.write().unwrap().unwrap();
            let r = p.run();
            spool.synced(&p, &r);
        }
    }
    let p = spool.write().unwrap().unwrap();
    p.run().unwrap();
    drop(spool);
    let (mut spool, recovery) = Spool::open(fs, cfg, &names()).unwrap();
    assert_eq!((recovery.records, recovery.corrupt), (3000, 0));
    let mut pos = spool.reader(0);
    let mut all = Vec::new();
    loop {
        let mut out = Vec::new();
        spool.read(&mut pos, 7, 1, &mut out).unwrap();
        if out.is_empty() {
            break;
        }
        all.extend(out);
    }
    assert_eq!(all.len(), 3000);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(r.payload, msg(i as u64, sizes[i]).payload);
    }
}

/// A spool with a closed segment of records and an active segment of 3 more: the
/// filesystem, the closed segment's path, every record (sequence id and payload) and the byte
/// range of each record of the closed segment.
struct Closed {
    fs: MemFs,
    seg: PathBuf,
    records: Vec<(u64, Bytes)>,
    layout: Vec<(u64, std::ops::Range<usize>)>,
}

/// Builds a [`Closed`] spool whose closed segment holds `n` records of varying sizes.
fn closed_segment(n: u64) -> Closed {
    let fs = MemFs::new();
    let cfg = config(1 << 20, WhenFull::RejectNew);
    let mut layout = Vec::new();
    let mut records = Vec::new();
    let mut at = super::record::SEGMENT_HEADER as usize;
    for (range, first) in [(0..n, true), (n..n + 3, false)] {
        let (mut spool, _) = Spool::open(fs.clone(), cfg.clone(), &names()).unwrap();
        for i in range {
            let m = msg(i, 8 + (i as usize * 13) % 40);
            let seq = spool.append(1, &m).unwrap();
            if first {
                let len = super::record::encoded_len(&m.topic, &m.payload, &m.origin);
                layout.push((seq, at..at + len));
                at += len;
            }
            records.push((seq, m.payload));
        }
        let p = spool.write().unwrap().unwrap();
        p.run().unwrap();
        drop(spool);
    }
    let segs = segment_files(&fs);
    assert_eq!(segs.len(), 2);
    assert_eq!(fs.file_len(&segs[0]), at, "layout of the closed segment");
    Closed {
        fs,
        seg: segs[0].clone(),
        records,
        layout,
    }
}

/// Opens `c.fs`, reads everything for both upstreams (checking content) and returns the
/// sequence ids read (the same for both), the `corrupt` count of the recovery and the
/// `corrupt` counter after the reads.
fn recover_and_read(c: &Closed) -> (Vec<u64>, u64, u64) {
    let (mut spool, recovery) =
        Spool::open(c.fs.clone(), config(1 << 20, WhenFull::RejectNew), &names()).unwrap();
    let mut seqs = Vec::new();
    for u in 0..UPSTREAMS {
        let mut pos = spool.reader(u);
        let mut all = Vec::new();
        loop {
            let mut out = Vec::new();
            spool.read(&mut pos, 7, 1, &mut out).unwrap();
            if out.is_empty() {
                break;
            }
            all.extend(out);
        }
        for r in &all {
            let want = c.records.iter().find(|(s, _)| *s == r.seq).map(|(_, p)| p);
            assert_eq!(want, Some(&r.payload), "content of {}", r.seq);
        }
        let got: Vec<u64> = all.iter().map(|r| r.seq).collect();
        if u == 0 {
            seqs = got;
        } else {
            assert_eq!(seqs, got, "both upstreams read the same records");
        }
    }
    (seqs, recovery.corrupt, spool.stats().corrupt)
}

/// Asserts that after damage to the bytes `damaged` of the closed segment, exactly the records
/// overlapping them are missing and each is counted once (at start-up, not again when read).
fn assert_only_damaged_records_lost(c: &Closed, damaged: &[usize], what: &str) {
    let (seqs, at_start, total) = recover_and_read(c);
    let hit: Vec<u64> = c
        .layout
        .iter()
        .filter(|(_, r)| damaged.iter().any(|d| r.contains(d)))
        .map(|(s, _)| *s)
        .collect();
    let want: Vec<u64> = c
        .records
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| !hit.contains(s))
        .collect();
    assert_eq!(seqs, want, "{what}: records read");
    let last_hit = c.layout.last().is_some_and(|(s, _)| hit.contains(s));
    if last_hit {
        // Damage that runs to the end of a closed segment leaves nothing to tell how many
        // records it held: at least one is counted.
        assert!(
            (1..=hit.len() as u64).contains(&at_start),
            "{what}: corrupt counted at start-up: {at_start} of {}",
            hit.len()
        );
    } else {
        assert_eq!(
            at_start,
            hit.len() as u64,
            "{what}: corrupt counted at start-up"
        );
    }
    assert_eq!(total, at_start, "{what}: corrupt counted once in the stats");
}

#[test]
fn every_single_flipped_byte_of_a_closed_segment_costs_at_most_its_own_record() {
    let len = closed_segment(12).layout.last().unwrap().1.end;
    for offset in 0..len {
        for mask in [0x01u8, 0x40, 0xff] {
            let c = closed_segment(12);
            c.fs.corrupt_with(&c.seg, offset, &[mask]);
            let what = format!("byte {offset} ^ {mask:#04x}");
            assert_only_damaged_records_lost(&c, &[offset], &what);
        }
    }
}

#[test]
fn multi_byte_damage_costs_only_the_records_it_touches() {
    let len = closed_segment(12).layout.last().unwrap().1.end;
    // Runs of damage, and two separate flips (in different records or the same).
    let patterns: [&[u8]; 3] = [&[0xff, 0xff], &[0x5a; 4], &[0xa5; 24]];
    for offset in 0..len {
        for mask in patterns {
            let c = closed_segment(12);
            c.fs.corrupt_with(&c.seg, offset, mask);
            let damaged: Vec<usize> = (offset..(offset + mask.len()).min(len)).collect();
            let what = format!("{} bytes at {offset}", mask.len());
            assert_only_damaged_records_lost(&c, &damaged, &what);
        }
        let other = (offset * 7 + 301) % len;
        let c = closed_segment(12);
        c.fs.corrupt_with(&c.seg, offset, &[0x10]);
        c.fs.corrupt_with(&c.seg, other, &[0x08]);
        let what = format!("bytes {offset} and {other}");
        assert_only_damaged_records_lost(&c, &[offset, other], &what);
    }
}

#[test]
fn a_damaged_segment_header_is_rewritten_and_its_records_kept() {
    let c = closed_segment(5);
    c.fs.corrupt_with(&c.seg, 3, &[0x20]);
    c.fs.corrupt_with(&c.seg, 13, &[0x01]);
    assert_only_damaged_records_lost(&c, &[], "header");
    let header = super::record::segment_header();
    assert_eq!(&c.fs.contents(&c.seg)[..header.len()], &header, "rewritten");
}

#[test]
fn a_version_1_segment_is_refused_by_name_and_left_alone() {
    let c = closed_segment(5);
    let mut v1 = c.fs.contents(&c.seg);
    let old = *b"SGSPOOL\0\x01\0\0\0\0\0\0\0";
    let mask: Vec<u8> = v1.iter().zip(old).map(|(a, b)| a ^ b).collect();
    c.fs.corrupt_with(&c.seg, 0, &mask);
    v1[..16].copy_from_slice(&old);
    let err = Spool::open(c.fs.clone(), config(1 << 20, WhenFull::RejectNew), &names())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("format version 1") && err.contains(&c.seg.display().to_string()),
        "{err}"
    );
    assert_eq!(c.fs.contents(&c.seg), v1, "untouched");
}

#[test]
fn an_unreadable_segment_with_a_damaged_header_is_set_aside_not_deleted() {
    let c = closed_segment(3);
    let len = c.fs.file_len(&c.seg);
    let garbage = vec![0x5a; len];
    c.fs.corrupt_with(&c.seg, 0, &garbage);
    let before = c.fs.contents(&c.seg);
    let (spool, recovery) =
        Spool::open(c.fs.clone(), config(1 << 20, WhenFull::RejectNew), &names()).unwrap();
    assert_eq!((recovery.records, recovery.corrupt), (3, 1));
    drop(spool);
    let aside = c.seg.with_extension("seg.damaged");
    assert_eq!(c.fs.contents(&aside), before);
}

#[test]
fn damage_met_by_two_readers_while_running_is_counted_once() {
    let c = closed_segment(10);
    let (mut spool, _) =
        Spool::open(c.fs.clone(), config(1 << 20, WhenFull::RejectNew), &names()).unwrap();
    // Rot after start-up: the 4th record's length, the 8th record's payload.
    let (s4, r4) = c.layout[3].clone();
    let (s8, r8) = c.layout[7].clone();
    c.fs.corrupt_with(&c.seg, r4.start + 5, &[0x01]);
    c.fs.corrupt_with(&c.seg, r8.end - 1, &[0x80]);
    for u in 0..UPSTREAMS {
        let mut pos = spool.reader(u);
        let mut out = Vec::new();
        spool.read(&mut pos, 100, 1, &mut out).unwrap();
        let seqs: Vec<u64> = out.iter().map(|r| r.seq).collect();
        let want: Vec<u64> = c
            .records
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s != s4 && *s != s8)
            .collect();
        assert_eq!(seqs, want, "upstream {u}");
    }
    assert_eq!(spool.stats().corrupt, 2);
}

#[test]
fn every_single_flipped_byte_of_the_last_segment_costs_at_most_its_own_record() {
    use super::fs::Fs;
    let len = closed_segment(12).layout.last().unwrap().1.end;
    for offset in 0..len {
        let c = closed_segment(12);
        // Without the newer segment, the damaged one is the last (the active one at a crash).
        let newer = c.seg.with_file_name(format!("{:020}.seg", c.records[12].0));
        c.fs.remove(&newer).unwrap();
        c.fs.corrupt_with(&c.seg, offset, &[0x04]);
        let (mut spool, recovery) =
            Spool::open(c.fs.clone(), config(1 << 20, WhenFull::RejectNew), &names()).unwrap();
        let mut pos = spool.reader(0);
        let mut out = Vec::new();
        spool.read(&mut pos, 100, 1, &mut out).unwrap();
        let hit: Vec<u64> = c
            .layout
            .iter()
            .filter(|(_, r)| r.contains(&offset))
            .map(|(s, _)| *s)
            .collect();
        let want: Vec<u64> = c
            .layout
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| !hit.contains(s))
            .collect();
        let seqs: Vec<u64> = out.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, want, "byte {offset}");
        // Damage to the last record's header looks like a torn write: cut, counted in bytes.
        let torn = u64::from(recovery.truncated_bytes > 0);
        assert_eq!(recovery.corrupt + torn, hit.len() as u64, "byte {offset}");
        assert_eq!(spool.stats().corrupt, recovery.corrupt, "byte {offset}");
    }
}

/// Segments are preallocated: a gateway that stops (or crashes) leaves its active segment
/// with a zero tail, which recovery reads as the clean end of the records, neither torn nor
/// damaged; a closed segment whose truncation was lost is read the same way.
#[test]
fn preallocated_space_is_the_clean_end_of_a_segment() {
    use super::fs::{Fs, SpoolFile};
    let fs = MemFs::new();
    let cfg = || config(64 << 20, WhenFull::RejectNew);
    let (mut spool, _) = Spool::open(fs.clone(), cfg(), &names()).unwrap();
    for i in 0..200 {
        spool.append(1, &msg(i, 1000)).unwrap();
        let pending = spool.write().unwrap().unwrap();
        let result = pending.run();
        spool.synced(&pending, &result);
    }
    assert!(spool.stats().segments >= 3, "{:?}", spool.stats());
    drop(spool);
    let segs = segment_files(&fs);
    // The newest segment still has its preallocated zeros; give a closed one zeros too.
    let last = fs.contents(segs.last().unwrap());
    assert_eq!(last.len(), 64 * 1024, "preallocated to the segment size");
    assert_eq!(*last.last().unwrap(), 0);
    let closed = fs.open(&segs[0], false).unwrap();
    let len = closed.len().unwrap();
    closed.set_len(len + 5000).unwrap();
    closed.sync_data().unwrap();
    let (mut spool, recovery) = Spool::open(fs.clone(), cfg(), &names()).unwrap();
    assert_eq!(recovery.truncated_bytes, 0, "{recovery:?}");
    assert_eq!(recovery.corrupt, 0, "{recovery:?}");
    assert_eq!(recovery.records, 200);
    let mut pos = spool.reader(0);
    let mut out = Vec::new();
    spool.read(&mut pos, 1000, 1, &mut out).unwrap();
    let seqs: Vec<u64> = out.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    // A torn write in the zeros is still a torn tail.
    drop(spool);
    let newest = fs.open(segment_files(&fs).last().unwrap(), false).unwrap();
    let end = newest.len().unwrap();
    newest.set_len(end + 4096).unwrap();
    newest
        .write_all_at(&[0xD3, 0x5A, 0x9C, 0xE7, 9, 9], end + 10)
        .unwrap();
    newest.sync_data().unwrap();
    let (_spool, recovery) = Spool::open(fs, cfg(), &names()).unwrap();
    assert!(recovery.truncated_bytes > 0, "{recovery:?}");
    assert_eq!(recovery.records, 200);
}

/// The first sequence ids of the segment files, oldest first.
fn segment_firsts(fs: &MemFs) -> Vec<u64> {
    segment_files(fs)
        .iter()
        .map(|p| {
            let stem = p.file_stem().unwrap().to_str().unwrap();
            stem.parse().unwrap()
        })
        .collect()
}

/// 200 records of 1000 bytes, stamped `1000 + i`, written in groups of 10 (several
/// segments of 64 KiB).
fn spool_with_backlog(memory_tail_bytes: u64) -> (Spool<MemFs>, MemFs) {
    let fs = MemFs::new();
    let mut config = config(8 << 20, WhenFull::RejectNew);
    config.memory_tail_bytes = memory_tail_bytes;
    let (mut spool, _) = Spool::open(fs.clone(), config, &names()).unwrap();
    for i in 0..200 {
        spool.append(1000 + i, &msg(i, 1000)).unwrap();
        if i % 10 == 9 {
            spool.write().unwrap();
        }
    }
    (spool, fs)
}

#[test]
fn backlog_info_is_exact_after_acks_and_caught_up_is_zero() {
    const NOW: u64 = 1_000_000;
    let (mut spool, fs) = spool_with_backlog(8 << 20);
    assert!(segment_firsts(&fs).len() >= 3, "several segments");
    let info = spool.backlog_info(0, NOW);
    assert_eq!(info.records, 200);
    assert_eq!(info.bytes, spool.backlog_bytes(0));
    assert_eq!(info.oldest_ms, Some(1000));
    // Acknowledged up to id 51 (ids start at 1): exact count, and the exact age while the
    // record is in the tail in memory.
    spool.set_cursor(0, 51);
    let info = spool.backlog_info(0, NOW);
    assert_eq!(info.records, 150);
    assert_eq!(info.oldest_ms, Some(1050));
    // The spool holds what the slowest upstream (1, at the start) has not acknowledged.
    assert_eq!(spool.held_records(), 200);
    assert_eq!(spool.oldest_ms(), Some(1000));
    spool.set_cursor(1, 101);
    assert_eq!(spool.held_records(), 150);
    assert_eq!(spool.oldest_ms(), Some(1050));
    // Caught up.
    spool.set_cursor(0, 201);
    let info = spool.backlog_info(0, NOW);
    assert_eq!((info.records, info.bytes, info.oldest_ms), (0, 0, None));
    assert_eq!(spool.held_records(), 100);
    spool.set_cursor(1, 201);
    assert_eq!((spool.held_records(), spool.oldest_ms()), (0, None));
    // An unknown upstream reads as caught up.
    assert_eq!(spool.backlog_info(7, NOW), BacklogInfo::default());
}

#[test]
fn without_the_memory_tail_the_oldest_age_moves_by_segment() {
    const NOW: u64 = 1_000_000;
    let (mut spool, fs) = spool_with_backlog(0);
    let firsts = segment_firsts(&fs);
    let second = firsts[1];
    assert_eq!(firsts[0], 1);
    // Within the first segment: its first record's time.
    spool.set_cursor(0, 10);
    let info = spool.backlog_info(0, NOW);
    assert_eq!(info.records, 191);
    assert_eq!(info.oldest_ms, Some(1000));
    // Past it: the second segment's first record (id `second`, stamped 1000 + second - 1).
    spool.set_cursor(0, second + 1);
    let info = spool.backlog_info(0, NOW);
    assert_eq!(info.records, 200 - second);
    assert_eq!(info.oldest_ms, Some(1000 + second - 1));
    // The same after a restart: recovery finds each segment's first time.
    drop(spool);
    let (spool, _) =
        Spool::open(fs.clone(), config(8 << 20, WhenFull::RejectNew), &names()).unwrap();
    let info = spool.backlog_info(1, NOW);
    assert_eq!((info.records, info.oldest_ms), (200, Some(1000)));
}

#[test]
fn refusing_tells_when_the_next_append_would_be_refused() {
    let fs = MemFs::new();
    let (mut spool, _) = Spool::open(
        fs.clone(),
        config(300 * 1024, WhenFull::RejectNew),
        &names(),
    )
    .unwrap();
    assert!(!spool.refusing());
    let mut i = 0;
    loop {
        match spool.append(1, &msg(i, 1000)) {
            Ok(_) => {}
            Err(AppendError::Full) => break,
            Err(e) => panic!("{e}"),
        }
        i += 1;
        spool.write().unwrap();
    }
    // Full of 1000-byte records, perhaps with room for a small one: refusing once even
    // that is refused.
    while spool.append(1, &msg(i, 8)).is_ok() {
        i += 1;
    }
    spool.write().unwrap();
    assert!(spool.refusing());
    // Acknowledged by everyone: the segments can be collected, so an append has room.
    let end = spool.next_seq();
    spool.set_cursor(0, end);
    spool.set_cursor(1, end);
    assert!(!spool.refusing());

    // The free-disk watermark.
    let mut low = config(300 * 1024, WhenFull::DropOldest);
    low.dir = PathBuf::from("/other");
    low.min_free_bytes = 1 << 20;
    let (mut spool, _) = Spool::open(fs.clone(), low, &names()).unwrap();
    spool.check_disk();
    assert!(!spool.refusing());
    fs.set_faults(Faults {
        available: 1000,
        ..fs.faults()
    });
    spool.check_disk();
    // drop_oldest with nothing older to drop: refused.
    assert!(spool.refusing());
    assert_eq!(spool.append(1, &msg(0, 100)), Err(AppendError::Full));
}
