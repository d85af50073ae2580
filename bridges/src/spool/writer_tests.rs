//! The writer thread with several ingresses: each gets exactly its own verdicts, one fsync
//! covers a group whatever the number of ingresses in it, and a vanished ingress costs only
//! its own verdicts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // Tests bound their waits by the real clock.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::log::{FsyncPolicy, Spool, SpoolConfig, WhenFull};
use super::memfs::MemFs;
use super::service::{AppendReply, SharedSpool, start_writer, start_writer_with};
use crate::message::{Message, Qos};

/// How long a verdict may take at most (a loaded CI machine included).
const BOUND: Duration = Duration::from_secs(10);

fn open() -> Arc<SharedSpool<MemFs>> {
    let config = SpoolConfig {
        dir: PathBuf::from("/spool"),
        max_bytes: 64 << 20,
        segment_bytes: 1 << 20,
        min_free_bytes: 0,
        max_age: None,
        when_full: WhenFull::RejectNew,
        fsync: FsyncPolicy::Always,
        memory_tail_bytes: 8 << 20,
        retain_bytes: 0,
    };
    let (spool, _) = Spool::open(MemFs::new(), config, &["up".to_owned()]).unwrap();
    SharedSpool::new(spool)
}

fn qos1(ingress: &str, i: u64) -> Message {
    Message {
        topic: format!("{ingress}/{i}"),
        payload: Bytes::from(i.to_le_bytes().to_vec()),
        qos: Qos::AtLeastOnce,
        retain: false,
        origin: Default::default(),
    }
}

/// Collects verdicts from `rx` until `n` have come; panics past [`BOUND`].
fn collect(rx: &mut mpsc::Receiver<Vec<AppendReply>>, n: usize) -> (Vec<AppendReply>, usize) {
    let mut all = Vec::new();
    let mut batches = 0;
    let start = std::time::Instant::now();
    while all.len() < n {
        match rx.try_recv() {
            Ok(batch) => {
                assert!(!batch.is_empty(), "an empty batch is never sent");
                batches += 1;
                all.extend(batch);
            }
            Err(mpsc::error::TryRecvError::Empty) => {
                assert!(
                    start.elapsed() < BOUND,
                    "verdicts late: {} of {n}",
                    all.len()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(mpsc::error::TryRecvError::Disconnected) => panic!("writer gone"),
        }
    }
    (all, batches)
}

#[test]
fn two_ingresses_get_exactly_their_own_verdicts_under_one_fsync() {
    const N: u64 = 50;
    let shared = open();
    let (tx_a, mut rx_a) = mpsc::channel(64);
    let (tx_b, mut rx_b) = mpsc::channel(64);
    let syncs_before;
    let (appender, writer) = {
        // The writer locks the spool before it takes its first append: holding the lock
        // while appending puts every append in its first group.
        let guard = shared.lock();
        syncs_before = guard.stats().syncs;
        let (appender, writer) = start_writer(Arc::clone(&shared), 1024).unwrap();
        let a = appender.for_ingress(tx_a);
        let b = appender.for_ingress(tx_b);
        // Interleaved, with the same tokens on both: tokens are unique per ingress only.
        for i in 0..N {
            a.append(qos1("a", i), Some(i)).unwrap();
            b.append(qos1("b", i), Some(i)).unwrap();
            // An untokened message asks for no verdict.
            b.append(qos1("b0", i), None).unwrap();
        }
        drop(guard);
        (appender, writer)
    };
    let (got_a, batches_a) = collect(&mut rx_a, N as usize);
    let (got_b, batches_b) = collect(&mut rx_b, N as usize);
    // One group commit: one batch per ingress, in each ingress's append order.
    assert_eq!((batches_a, batches_b), (1, 1));
    let expect: Vec<AppendReply> = (0..N)
        .map(|token| AppendReply {
            token,
            accepted: true,
        })
        .collect();
    assert_eq!(got_a, expect);
    assert_eq!(got_b, expect);
    // Durable before told, and one fsync for both ingresses.
    let stats = shared.stats();
    assert_eq!(stats.syncs - syncs_before, 1, "{stats:?}");
    assert_eq!(stats.appended, N * 3);
    // Nothing more for anybody once the writer stops.
    drop(appender);
    writer.join().unwrap();
    assert!(rx_a.try_recv().is_err());
    assert!(rx_b.try_recv().is_err());
}

#[test]
fn a_dropped_ingress_receiver_does_not_affect_another() {
    const N: u64 = 200;
    let shared = open();
    let (appender, writer) = start_writer(Arc::clone(&shared), 1024).unwrap();
    let (tx_gone, rx_gone) = mpsc::channel(1);
    let (tx_live, mut rx_live) = mpsc::channel(4);
    let gone = appender.for_ingress(tx_gone);
    let live = appender.for_ingress(tx_live);
    drop(appender);
    drop(rx_gone);
    let mut seen = BTreeSet::new();
    for i in 0..N {
        // Many commits, each with verdicts for the vanished ingress: none stalls the writer
        // (a channel of 1 would, were it still sent to).
        gone.append(qos1("gone", i), Some(i)).unwrap();
        live.append(qos1("live", i), Some(1000 + i)).unwrap();
        let (got, _) = collect(&mut rx_live, 1);
        for reply in got {
            assert!(reply.accepted);
            assert!(seen.insert(reply.token), "one verdict per token");
        }
    }
    assert_eq!(seen, (1000..1000 + N).collect());
    // Both ingresses' messages are stored: a vanished receiver loses verdicts, not data.
    assert_eq!(shared.stats().appended, 2 * N);
    drop((gone, live));
    writer.join().unwrap();
    assert!(rx_live.try_recv().is_err());
}

#[test]
fn the_queue_bounds_all_ingresses_together_and_counts_refusals() {
    let shared = open();
    let (tx_a, mut rx_a) = mpsc::channel(4);
    let (tx_b, mut rx_b) = mpsc::channel(4);
    let (a, b, writer) = {
        // The writer waits for the lock before taking anything: the queue alone holds.
        let _guard = shared.lock();
        let (appender, writer) = start_writer(Arc::clone(&shared), 2).unwrap();
        let a = appender.for_ingress(tx_a);
        let b = appender.for_ingress(tx_b);
        a.append(qos1("a", 0), Some(0)).unwrap();
        b.append(qos1("b", 0), Some(0)).unwrap();
        // Full: the message comes back, no verdict follows, the refusal is counted.
        assert_eq!(a.append(qos1("a", 1), Some(1)).unwrap_err().topic, "a/1");
        assert_eq!(b.append(qos1("b", 1), Some(1)).unwrap_err().topic, "b/1");
        assert_eq!(shared.queue_full(), 2);
        (a, b, writer)
    };
    let accepted = |token| AppendReply {
        token,
        accepted: true,
    };
    assert_eq!(collect(&mut rx_a, 1).0, [accepted(0)]);
    assert_eq!(collect(&mut rx_b, 1).0, [accepted(0)]);
    drop((a, b));
    writer.join().unwrap();
    assert!(rx_a.try_recv().is_err());
    assert!(rx_b.try_recv().is_err());
}

/// An appender refused for a full queue waits for room without polling: not woken while the
/// writer takes nothing (here: it waits for the spool's lock), woken once it takes a group.
#[test]
fn a_refused_appender_waits_for_room_and_is_woken_when_the_writer_takes() {
    let shared = open();
    let (tx, mut rx) = mpsc::channel(4);
    let guard = shared.lock();
    let (appender, writer) = start_writer(Arc::clone(&shared), 2).unwrap();
    let a = appender.for_ingress(tx);
    drop(appender);
    a.append(qos1("a", 0), Some(0)).unwrap();
    a.append(qos1("a", 1), Some(1)).unwrap();
    let mark = a.room_mark();
    assert!(a.append(qos1("a", 2), Some(2)).is_err());

    {
        let mut wait = std::pin::pin!(a.room_since(mark));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // The writer cannot take while the lock is held: no room yet.
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        drop(guard);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime
            .block_on(async { tokio::time::timeout(BOUND, wait).await })
            .expect("woken once the writer took from the queue");
    }
    // Room indeed: the next append is taken.
    a.append(qos1("a", 3), Some(3)).unwrap();
    let tokens: BTreeSet<u64> = collect(&mut rx, 3).0.iter().map(|r| r.token).collect();
    assert_eq!(tokens, BTreeSet::from([0, 1, 3]));

    drop(a);
    writer.join().unwrap();
}

/// With `fsync = "always"`, a group nobody waits for (QoS 0 only) is written but not synced
/// on its own: the next group with a QoS >= 1 message syncs both with one fsync, and the
/// writer syncs what is left when it stops.
#[test]
fn a_group_nobody_waits_for_is_synced_with_the_next_or_at_the_end() {
    let shared = open();
    let (tx, mut rx) = mpsc::channel(64);
    let syncs_before = shared.stats().syncs;
    // A delay no test run reaches: only the events below can cause a sync.
    let (appender, writer) =
        start_writer_with(Arc::clone(&shared), 1024, Duration::from_secs(3600)).unwrap();
    let ingress = appender.for_ingress(tx);
    let mut qos0 = qos1("q0", 0);
    qos0.qos = Qos::AtMostOnce;
    for _ in 0..10 {
        ingress.append(qos0.clone(), None).unwrap();
    }
    let start = std::time::Instant::now();
    while shared.stats().appended < 10 {
        assert!(
            start.elapsed() < BOUND,
            "the writer did not take the appends"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The group is written (the drains can read it) and not synced.
    assert_eq!(shared.stats().syncs - syncs_before, 0);
    ingress.append(qos1("q1", 1), Some(1)).unwrap();
    let (got, _) = collect(&mut rx, 1);
    assert_eq!(
        got,
        vec![AppendReply {
            token: 1,
            accepted: true
        }]
    );
    assert_eq!(
        shared.stats().syncs - syncs_before,
        1,
        "one fsync for both groups"
    );
    // QoS 0 again, then the writer stops: it syncs before it ends.
    ingress.append(qos0, None).unwrap();
    drop(ingress);
    drop(appender);
    writer.join().unwrap();
    assert_eq!(shared.stats().appended, 12);
    assert_eq!(shared.stats().syncs - syncs_before, 2);
}

/// A flood of QoS 0 is synced once a megabyte waits for it, on the syncer thread, without a
/// QoS >= 1 message or the timer.
#[test]
fn a_megabyte_nobody_waits_for_is_synced_by_the_syncer() {
    let shared = open();
    let (tx, _rx) = mpsc::channel(64);
    let syncs_before = shared.stats().syncs;
    let (appender, writer) =
        start_writer_with(Arc::clone(&shared), 1024, Duration::from_secs(3600)).unwrap();
    let ingress = appender.for_ingress(tx);
    let mut big = qos1("q0", 0);
    big.qos = Qos::AtMostOnce;
    big.payload = Bytes::from(vec![7u8; 32 * 1024]);
    for _ in 0..40 {
        while ingress.append(big.clone(), None).is_err() {
            std::thread::yield_now();
        }
    }
    let start = std::time::Instant::now();
    while shared.stats().syncs == syncs_before {
        assert!(start.elapsed() < BOUND, "no sync after 1.25 MiB of QoS 0");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(ingress);
    drop(appender);
    writer.join().unwrap();
    assert_eq!(shared.stats().appended, 40);
}

/// Whether `beat` beat after `t` (a margin for its millisecond resolution).
fn beat_after(beat: &crate::telemetry::Beat, t: std::time::Instant) -> bool {
    let now = std::time::Instant::now();
    beat.silent_for(now)
        .is_some_and(|silent| silent + Duration::from_millis(2) <= now.duration_since(t))
}

#[test]
fn every_fsync_is_timed_and_an_idle_writer_keeps_beating() {
    let shared = open();
    assert_eq!(
        shared.writer_beat().silent_for(std::time::Instant::now()),
        None
    );
    let (tx, mut rx) = mpsc::channel(64);
    // A short deferral, so the QoS 0 group's fsync runs on the syncer thread soon.
    let (appender, writer) =
        start_writer_with(Arc::clone(&shared), 1024, Duration::from_millis(20)).unwrap();
    let ingress = appender.for_ingress(tx);
    // Group commits one by one: each waits for its verdict, so each had its own fsync.
    for i in 0..5 {
        ingress.append(qos1("a", i), Some(i)).unwrap();
        collect(&mut rx, 1);
    }
    let stats = shared.stats();
    assert!(stats.syncs >= 5, "{stats:?}");
    assert_eq!(shared.fsync_latency().snapshot().count, stats.syncs);
    // A QoS 0 group nobody waits for: synced later by the syncer thread, timed too.
    let before = stats.syncs;
    let mut q0 = qos1("q0", 0);
    q0.qos = Qos::AtMostOnce;
    ingress.append(q0, None).unwrap();
    let start = std::time::Instant::now();
    while shared.stats().syncs == before {
        assert!(start.elapsed() < BOUND, "deferred fsync late");
        std::thread::sleep(Duration::from_millis(1));
    }
    let h = shared.fsync_latency().snapshot();
    assert_eq!(h.count, shared.stats().syncs, "{h:?}");
    assert_eq!(
        h.buckets.last().map(|b| b.1),
        Some(h.count),
        "every fsync within 10 s"
    );
    // Idle, the writer still beats.
    let idle = std::time::Instant::now();
    while !beat_after(shared.writer_beat(), idle) {
        assert!(idle.elapsed() < BOUND, "the idle writer does not beat");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop((appender, ingress));
    writer.join().unwrap();
}
