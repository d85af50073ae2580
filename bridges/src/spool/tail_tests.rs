//! The live/backlog switch: a reader served from the tail in memory whenever it can (as a
//! drain is) must see exactly what a reader of the disk sees, at every step, whatever the
//! appends, write failures, evictions, dropped segments, rewinds and expiry did.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::log::{Chunks, FsyncPolicy, ReadPos, Spool, SpoolConfig, WhenFull, read_records};
use super::memfs::{Faults, MemFs};
use crate::message::{Message, Qos};

const UPSTREAMS: usize = 2;

fn config(max_bytes: u64, tail: u64, max_age: Option<Duration>) -> SpoolConfig {
    SpoolConfig {
        dir: PathBuf::from("/spool"),
        max_bytes,
        segment_bytes: 64 * 1024,
        min_free_bytes: 0,
        max_age,
        when_full: WhenFull::DropOldest,
        fsync: FsyncPolicy::Always,
        memory_tail_bytes: tail,
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
        topic: format!("t/{}", i % 5),
        payload: Bytes::from(payload),
        qos: if i.is_multiple_of(3) {
            Qos::AtMostOnce
        } else {
            Qos::AtLeastOnce
        },
        retain: i.is_multiple_of(4),
        origin: Default::default(),
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Append n messages of a size (owned or borrowed), write, sync.
    Commit(u8, u16, bool),
    /// Reader u reads up to n records.
    Read(usize, u16),
    /// Upstream u acknowledges everything its reader passed.
    Ack(usize),
    /// Reader u starts again at its cursor (a lost connection).
    Rewind(usize),
    /// The writer's housekeeping.
    Housekeeping,
    /// Time passes (expiry).
    Tick(u16),
    Faults {
        enospc: bool,
        eio: bool,
        fail_sync: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..40, 8u16..2000, any::<bool>()).prop_map(|(n, s, o)| Op::Commit(n, s, o)),
        6 => (0..UPSTREAMS, 1u16..120).prop_map(|(u, n)| Op::Read(u, n)),
        2 => (0..UPSTREAMS).prop_map(Op::Ack),
        1 => (0..UPSTREAMS).prop_map(Op::Rewind),
        1 => Just(Op::Housekeeping),
        1 => (0u16..200).prop_map(Op::Tick),
        1 => (prop::bool::weighted(0.2), prop::bool::weighted(0.2), prop::bool::weighted(0.2))
            .prop_map(|(enospc, eio, fail_sync)| Op::Faults { enospc, eio, fail_sync }),
    ]
}

/// Reads as the drain task does: the tail when it covers the position, else the disk.
fn read_live(
    spool: &mut Spool<MemFs>,
    pos: &mut ReadPos,
    max: usize,
    now_ms: u64,
    chunks: &mut Chunks,
    out: &mut Vec<super::Record>,
) -> bool {
    if spool.read_tail(pos, max, now_ms, out) {
        return true;
    }
    read_records(&mut *spool, pos, max, now_ms, chunks, out).is_ok_and(|()| false)
}

fn run(
    ops: Vec<Op>,
    max_bytes: u64,
    tail: u64,
    max_age: Option<Duration>,
) -> Result<(), TestCaseError> {
    let fs = MemFs::new();
    let (mut spool, _) = Spool::open(fs.clone(), config(max_bytes, tail, max_age), &names())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut live: Vec<ReadPos> = (0..UPSTREAMS).map(|u| spool.reader(u)).collect();
    let mut chunks: Vec<Chunks> = (0..UPSTREAMS).map(|_| Chunks::default()).collect();
    let mut disk_chunks: Vec<Chunks> = (0..UPSTREAMS).map(|_| Chunks::default()).collect();
    // Everything each reader returned since its last rewind: ids strictly increase.
    let mut seen: Vec<Option<u64>> = vec![None; UPSTREAMS];
    let mut now = 1_000u64;
    let mut counter = 0u64;
    for op in ops {
        match op {
            Op::Commit(n, size, owned) => {
                for _ in 0..n {
                    counter += 1;
                    let m = msg(counter, usize::from(size));
                    let _ = if owned {
                        spool.append_owned(now, m)
                    } else {
                        spool.append(now, &m)
                    };
                }
                if let Ok(Some(pending)) = spool.write() {
                    let result = pending.run();
                    spool.synced(&pending, &result);
                }
            }
            Op::Read(u, n) => {
                // The same read twice from the same position: from disk only, then as the
                // drain reads. Records and the resulting position must be identical.
                let mut disk_pos = live[u];
                let mut from_disk = Vec::new();
                read_records(
                    &mut spool,
                    &mut disk_pos,
                    usize::from(n),
                    now,
                    &mut disk_chunks[u],
                    &mut from_disk,
                )
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut from_live = Vec::new();
                let before = live[u].next_seq();
                let memory = read_live(
                    &mut spool,
                    &mut live[u],
                    usize::from(n),
                    now,
                    &mut chunks[u],
                    &mut from_live,
                );
                prop_assert_eq!(&from_live, &from_disk);
                prop_assert_eq!(live[u].next_seq(), disk_pos.next_seq());
                if memory && live[u].next_seq() != before {
                    // Records passed in memory leave the reader exactly where the disk
                    // would (segment, offset), so its next read may come from either. (A
                    // read that passed nothing leaves it as it was, which may be less
                    // precise than a disk read's search, never different in what follows.)
                    prop_assert_eq!(live[u], disk_pos);
                }
                for r in &from_live {
                    prop_assert!(
                        seen[u].is_none_or(|s| r.seq > s),
                        "order or duplicate at {}",
                        r.seq
                    );
                    seen[u] = Some(r.seq);
                }
            }
            Op::Ack(u) => spool.set_cursor(u, live[u].next_seq()),
            Op::Rewind(u) => {
                live[u] = spool.reader(u);
                seen[u] = None;
            }
            Op::Housekeeping => spool.collect_garbage(),
            Op::Tick(ms) => now += u64::from(ms),
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
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The tail holds a few records only: readers keep moving between memory and disk.
    #[test]
    fn live_reads_match_disk_reads(
        ops in proptest::collection::vec(op(), 1..80),
        tail in 0u64..40_000,
        small in any::<bool>(),
        expiry in any::<bool>(),
    ) {
        let max_bytes = if small { 300 * 1024 } else { 64 * 1024 * 1024 };
        let max_age = expiry.then(|| Duration::from_millis(300));
        run(ops, max_bytes, tail, max_age)?;
    }
}

/// A reader at the written end is served from memory; one behind the tail reads the disk
/// until it reaches the tail, then memory again, with nothing missed or repeated.
#[test]
fn a_caught_up_reader_reads_memory_and_a_late_one_switches_over() {
    let fs = MemFs::new();
    // About 20 records of 1000 bytes fit.
    let (mut spool, _) = Spool::open(fs, config(64 << 20, 22_000, None), &names()).unwrap();
    let mut pos = spool.reader(0);
    let mut chunks = Chunks::default();
    let mut got = Vec::new();
    for i in 1..=10 {
        spool.append_owned(1, msg(i, 1000)).unwrap();
    }
    spool.write().unwrap();
    let mut out = Vec::new();
    assert!(read_live(
        &mut spool,
        &mut pos,
        512,
        1,
        &mut chunks,
        &mut out
    ));
    got.extend(out.iter().map(|r| r.seq));
    assert_eq!(spool.stats().read_memory, 10);
    assert_eq!(spool.stats().read_disk, 0);

    // A burst larger than the tail: the reader falls behind it and reads the disk.
    for i in 11..=100 {
        spool.append_owned(1, msg(i, 1000)).unwrap();
        spool.write().unwrap();
    }
    loop {
        let mut out = Vec::new();
        read_live(&mut spool, &mut pos, 16, 1, &mut chunks, &mut out);
        if out.is_empty() {
            break;
        }
        got.extend(out.iter().map(|r| r.seq));
    }
    let expected: Vec<u64> = (1..=100).collect();
    assert_eq!(got, expected, "no gap, no duplicate");
    let stats = spool.stats();
    assert!(stats.read_disk > 0, "{stats:?}");
    assert!(
        stats.read_memory > 10,
        "{stats:?}: back on the fast path once caught up"
    );
    assert_eq!(stats.read_memory + stats.read_disk, 100);
}

/// `memory_tail = 0` keeps nothing: every read goes to disk.
#[test]
fn no_tail_reads_disk() {
    let fs = MemFs::new();
    let (mut spool, _) = Spool::open(fs, config(64 << 20, 0, None), &names()).unwrap();
    let mut pos = spool.reader(0);
    spool.append_owned(1, msg(1, 100)).unwrap();
    spool.write().unwrap();
    let mut out = Vec::new();
    assert!(!read_live(
        &mut spool,
        &mut pos,
        512,
        1,
        &mut Chunks::default(),
        &mut out
    ));
    assert_eq!(out.len(), 1);
    assert_eq!(spool.stats().read_memory, 0);
}
