//! The spool drain against a real broker, through the public API only: a spool on disk
//! (`StdFs` in a temporary directory) filled through the writer thread, one MQTT 5
//! `MqttUpstream`, and `drain()` between them, wired as `gateway/src/app.rs` wires them.
//! mosquitto runs as a child process on a free 127.0.0.1 port (killed by PID on drop).
//!
//! Every message carries its spool sequence id (the user property `sg-seq`), so an independent
//! MQTT 5 observer subscribed to `#` checks deliveries by id:
//!
//! - every id appended arrives, with the topic and payload appended under it;
//! - the first copies arrive in id order;
//! - more copies of an id (a resend after a lost connection: at least once) are counted, and
//!   forbidden only where no connection was lost.
//!
//! Faults are real: the broker crashes (SIGKILL) and comes back on the same port, or freezes
//! (SIGSTOP) so that only the drain's `ack_timeout` can notice. Every wait is bounded and polls
//! a condition; no fixed sleep decides a test. mosquitto (Debian package `mosquitto`) is
//! required: without it these tests fail, they do not skip.

// A test harness: failing loudly is its job, and it reads the wall clock to bound its waits.
#![allow(clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sensorgate_bridges::message::{Message, Qos};
use sensorgate_bridges::mqtt::{MqttUpstream, MqttUpstreamConfig, MqttVersion, SEQ_PROPERTY};
use sensorgate_bridges::route::RouteTable;
use sensorgate_bridges::spool::{
    AppendReply, BacklogLimit, DrainConfig, DrainStats, FsyncPolicy, IngressAppender, SharedSpool,
    Spool, SpoolConfig, StdFs, WhenFull, drain, encoded_len, start_writer, wall_ms,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use common::{Broker, EVENT_BOUND, Observed, Observer, fast_config, init_tracing};

/// The upstream's `max_inflight` and the drain's window, unless a test says otherwise.
const WINDOW: u16 = 100;

/// Target segment size: the smallest the spool allows, so that a test backlog spans several
/// segment files.
const SEGMENT_BYTES: u64 = 64 * 1024;

/// A drain that outpaces the observer makes mosquitto queue for the observer, and beyond its
/// default `max_queued_messages` (1000) it drops QoS 1 messages: the broker's loss, which
/// would fail these tests for nothing the drain did.
const BROKER_CONF: &str = "max_queued_messages 0\n";

/// An `ack_timeout` that only a broker which stopped answering can exceed.
const PATIENT: Duration = Duration::from_secs(30);

/// The upstream's keep-alive: long, so that a frozen broker is noticed by the drain's
/// `ack_timeout` (or not at all), never by the client's pings.
const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Messages spread over this many topics.
const TOPICS: usize = 4;

/// The upstream's name (the spool keys its cursor by it).
const UPSTREAM: &str = "spool-test";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Message `i` of a test, QoS 1: topic `drain/<i mod TOPICS>`, payload `i` padded with dots so
/// that topic and payload together are `len` bytes (what `rate_bytes` counts).
fn message(i: usize, len: usize) -> Message {
    let topic = format!("drain/{}", i % TOPICS);
    let mut payload = format!("{i:06}").into_bytes();
    payload.resize(len.saturating_sub(topic.len()).max(payload.len()), b'.');
    Message {
        topic,
        payload: Bytes::from(payload),
        qos: Qos::AtLeastOnce,
        retain: false,
        origin: Default::default(),
    }
}

fn messages(range: std::ops::Range<usize>, len: usize) -> Vec<Message> {
    range.map(|i| message(i, len)).collect()
}

/// [`messages`] at QoS 0: nothing acknowledges them, so only the drain itself can keep them
/// moving.
fn qos0_messages(range: std::ops::Range<usize>, len: usize) -> Vec<Message> {
    range
        .map(|i| Message {
            qos: Qos::AtMostOnce,
            ..message(i, len)
        })
        .collect()
}

fn drain_config(
    rate_msgs: Option<u32>,
    rate_bytes: Option<u64>,
    ack_timeout: Duration,
) -> DrainConfig {
    DrainConfig {
        max_backlog: BacklogLimit::default(),
        window: usize::from(WINDOW),
        rate_msgs,
        rate_bytes,
        ack_timeout,
    }
}

/// The counters of [`DrainStats`], read once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    forwarded: u64,
    rejected: u64,
    ack_timeouts: u64,
    resent: u64,
}

/// The upstream and the drain task of a [`Rig`].
struct Running {
    upstream: MqttUpstream,
    stats: Arc<DrainStats>,
    upstream_task: JoinHandle<()>,
    drain_task: JoinHandle<()>,
    stop_upstream: CancellationToken,
    stop_drain: CancellationToken,
}

/// A spool in a temporary directory with its writer thread, and (once started) one upstream
/// draining it. Drop stops what is still running.
struct Rig {
    dir: tempfile::TempDir,
    spool: Arc<SharedSpool<StdFs>>,
    /// Dropping the last appender stops the writer.
    appender: Option<IngressAppender>,
    replies: mpsc::Receiver<Vec<AppendReply>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// The sequence id of `appended[0]`.
    first_seq: u64,
    /// Every message appended, in order: `appended[i]` has id `first_seq + i`.
    appended: Vec<Message>,
    running: Option<Running>,
}

impl Rig {
    /// Opens an empty spool (fsync always, small segments) and starts its writer.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = SpoolConfig {
            dir: dir.path().join("spool"),
            max_bytes: 64 << 20,
            segment_bytes: SEGMENT_BYTES,
            min_free_bytes: 0,
            max_age: None,
            when_full: WhenFull::RejectNew,
            fsync: FsyncPolicy::Always,
            memory_tail_bytes: 8 << 20,
            retain_bytes: 0,
        };
        assert_eq!(config.effective_segment_bytes(), SEGMENT_BYTES);
        let (spool, _) = Spool::open(StdFs, config, &[UPSTREAM.to_owned()]).expect("spool opens");
        let first_seq = spool.next_seq();
        let spool = SharedSpool::new(spool);
        let (replies_tx, replies) = mpsc::channel(1024);
        let (appender, writer) = start_writer(Arc::clone(&spool), 8192).expect("writer starts");
        let appender = appender.for_ingress(replies_tx);
        Self {
            dir,
            spool,
            appender: Some(appender),
            replies,
            writer: Some(writer),
            first_seq,
            appended: Vec::new(),
            running: None,
        }
    }

    /// Appends `batch` through the writer and waits until every message is durable (one or a
    /// few group commits).
    async fn append(&mut self, batch: Vec<Message>) {
        let appender = self.appender.as_ref().expect("writer running");
        let first = self.end();
        assert_eq!(self.spool.lock().next_seq(), first, "only this rig appends");
        for (i, message) in batch.iter().enumerate() {
            appender
                .append(message.clone(), Some(first + i as u64))
                .expect("the writer's queue has room");
        }
        let mut accepted = 0;
        while accepted < batch.len() {
            let replies = timeout(EVENT_BOUND, self.replies.recv())
                .await
                .expect("the writer answers in time")
                .expect("writer running");
            for reply in replies {
                assert!(reply.accepted, "append {} refused", reply.token);
                accepted += 1;
            }
        }
        self.appended.extend(batch);
        assert_eq!(self.spool.lock().next_seq(), self.end());
    }

    /// The id after the last one appended.
    fn end(&self) -> u64 {
        self.first_seq + self.appended.len() as u64
    }

    /// Starts the upstream (MQTT 5) and its drain, as `gateway/src/app.rs` does: a report
    /// channel of its own, `window + 16` deep, and `max_inflight` equal to the window.
    fn start_drain(&mut self, broker: &Broker, config: DrainConfig) {
        self.start_drain_with(broker, config, |_| {});
    }

    /// [`Self::start_drain`] with the upstream's configuration changed by `tune` first.
    fn start_drain_with(
        &mut self,
        broker: &Broker,
        config: DrainConfig,
        tune: impl FnOnce(&mut MqttUpstreamConfig),
    ) {
        assert!(self.running.is_none(), "drain already running");
        let mut upstream_config = fast_config(UPSTREAM, &broker.url(), MqttVersion::V5);
        upstream_config.max_inflight = u16::try_from(config.window).expect("a u16 window");
        upstream_config.keep_alive = KEEP_ALIVE;
        tune(&mut upstream_config);
        let (ack_tx, ack_rx) = mpsc::channel(config.window + 16);
        let stop_upstream = CancellationToken::new();
        let stop_drain = CancellationToken::new();
        let (upstream, upstream_task) =
            MqttUpstream::spawn(0, upstream_config, ack_tx, stop_upstream.clone())
                .expect("upstream starts");
        let stats = Arc::new(DrainStats::default());
        let drain_task = tokio::spawn(drain(
            Arc::clone(&self.spool),
            0,
            upstream.clone(),
            ack_rx,
            config,
            Arc::new(RouteTable::everything()).into(),
            Arc::clone(&stats),
            stop_drain.clone(),
        ));
        self.running = Some(Running {
            upstream,
            stats,
            upstream_task,
            drain_task,
            stop_upstream,
            stop_drain,
        });
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("drain started")
    }

    fn upstream(&self) -> &MqttUpstream {
        &self.running().upstream
    }

    fn counts(&self) -> Counts {
        let stats = &self.running().stats;
        Counts {
            forwarded: stats.forwarded.load(Relaxed),
            rejected: stats.rejected.load(Relaxed),
            ack_timeouts: stats.ack_timeouts.load(Relaxed),
            resent: stats.resent.load(Relaxed),
        }
    }

    /// The upstream's cursor: the first id it has not acknowledged.
    fn cursor(&self) -> u64 {
        self.spool.lock().cursor(0).expect("one upstream")
    }

    /// Polls `condition` until it holds, failing after `bound`.
    async fn wait_for(&self, what: &str, bound: Duration, condition: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + bound;
        while !condition(self) {
            assert!(
                Instant::now() < deadline,
                "not {what} within {bound:?}: cursor {} (end {}), drain {:?}, upstream {:?}",
                self.cursor(),
                self.end(),
                self.counts(),
                self.upstream().stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the drain has settled everything appended: the cursor is past the last id.
    async fn wait_settled(&self) {
        self.wait_for("settled", EVENT_BOUND, |rig| rig.cursor() == rig.end())
            .await;
    }

    /// Segment files in the spool directory.
    fn segment_files(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("spool"))
            .expect("list spool")
            .filter(|entry| {
                entry
                    .as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            })
            .count()
    }

    /// Stops in the gateway's order: the writer ends (after syncing), then the drain and the
    /// upstream; each bounded.
    async fn stop(mut self) {
        drop(self.appender.take());
        if let Some(writer) = self.writer.take() {
            timeout(
                EVENT_BOUND,
                tokio::task::spawn_blocking(move || writer.join()),
            )
            .await
            .expect("writer stops in time")
            .expect("join task")
            .expect("writer did not panic");
        }
        if let Some(running) = self.running.take() {
            running.stop_drain.cancel();
            running.stop_upstream.cancel();
            timeout(EVENT_BOUND, running.drain_task)
                .await
                .expect("drain stops in time")
                .expect("drain did not panic");
            timeout(EVENT_BOUND, running.upstream_task)
                .await
                .expect("upstream stops in time")
                .expect("upstream did not panic");
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.stop_drain.cancel();
            running.stop_upstream.cancel();
            running.drain_task.abort();
            running.upstream_task.abort();
        }
    }
}

/// Receives into `observed` until every id appended to `rig` was seen at least once (each
/// wait for the next message bounded by [`EVENT_BOUND`]), then takes what already arrived
/// beyond that.
async fn collect(observer: &mut Observer, rig: &Rig, observed: &mut Vec<Observed>) {
    let mut missing: BTreeSet<u64> = (rig.first_seq..rig.end()).collect();
    for seq in observed.iter().filter_map(|o| o.seq) {
        missing.remove(&seq);
    }
    while let Some(&first_missing) = missing.first() {
        let Some(item) = observer.next_within(EVENT_BOUND).await else {
            panic!(
                "{} of {} messages never arrived (the first: id {first_missing}); \
                 cursor {}, drain {:?}, upstream {:?}",
                missing.len(),
                rig.appended.len(),
                rig.cursor(),
                rig.counts(),
                rig.upstream().stats()
            );
        };
        if let Some(seq) = item.seq {
            missing.remove(&seq);
        }
        observed.push(item);
    }
    while let Some(item) = observer.try_next() {
        observed.push(item);
    }
}

/// Checks `observed` against what `rig` appended: each message carries an id that was
/// appended with this topic and payload, the first copies are exactly the ids in order, and
/// none is missing. Returns the number of further copies.
fn check_delivery(observed: &[Observed], rig: &Rig) -> usize {
    let mut next = rig.first_seq;
    let mut duplicates = 0;
    for (k, item) in observed.iter().enumerate() {
        let seq = item
            .seq
            .unwrap_or_else(|| panic!("message {k} on {} has no {SEQ_PROPERTY}", item.topic));
        let appended = seq
            .checked_sub(rig.first_seq)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| rig.appended.get(i))
            .unwrap_or_else(|| panic!("message {k} carries id {seq}, never appended"));
        assert_eq!(
            (item.topic.as_str(), &item.payload),
            (appended.topic.as_str(), &appended.payload),
            "message {k} does not carry what was appended with id {seq}"
        );
        match seq.cmp(&next) {
            std::cmp::Ordering::Equal => next += 1,
            std::cmp::Ordering::Less => duplicates += 1,
            std::cmp::Ordering::Greater => {
                panic!("message {k}: id {seq} arrived before any copy of id {next}")
            }
        }
    }
    assert_eq!(next, rig.end(), "ids from {next} on never arrived");
    duplicates
}

/// Checks the pace of a rate-limited drain of `total` units (messages or bytes) at `rate`
/// units per second, which `started` before the drain did.
///
/// The token bucket starts full with one second's worth (a burst of `rate`), so the last unit
/// cannot leave before `(total - rate) / rate` seconds after the drain started, whatever the
/// scheduling: measured from `started` (before the drain), this lower bound is exact (less a
/// little for timer rounding). From the first arrival to the last, the delivery delay of the
/// first message may shorten the span (on a loaded machine, by a scheduling hiccup): that
/// bound keeps half a second of slack. The upper bound only catches a drain that crawls or
/// stalls; it is generous because other builds and benchmarks share these two cores.
fn assert_paced(observed: &[Observed], started: Instant, total: f64, rate: f64) {
    let ideal = Duration::from_secs_f64((total - rate) / rate);
    let (Some(first), Some(last)) = (observed.first(), observed.last()) else {
        panic!("nothing arrived");
    };
    let since_start = last.at.duration_since(started);
    let span = last.at.duration_since(first.at);
    eprintln!(
        "{total} units at {rate}/s: the last arrived {since_start:?} after the start, \
         {span:?} after the first (ideal {ideal:?})"
    );
    assert!(
        since_start >= ideal.saturating_sub(Duration::from_millis(50)),
        "the drain outran its rate: done {since_start:?} after it started, ideal {ideal:?}"
    );
    assert!(
        span >= ideal.saturating_sub(Duration::from_millis(500)),
        "first to last arrival took {span:?}, expected about {ideal:?}"
    );
    assert!(
        span <= Duration::from_secs(30),
        "first to last arrival took {span:?}, expected about {ideal:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_arrives_in_spool_order_with_its_sequence_id() {
    init_tracing();
    const N: usize = 2000;
    // Each batch is one or a few group commits smaller than a segment, so the backlog fills
    // several segment files that the drain then has to free.
    const BATCH: usize = 200;
    const LEN: usize = 150;
    let broker = Broker::start_with(BROKER_CONF);
    let mut observer = Observer::connect(broker.port).await;
    let batch_bytes: usize = messages(0..BATCH, LEN)
        .iter()
        .map(|m| encoded_len(&m.topic, &m.payload, &m.origin))
        .sum();
    assert!(
        (batch_bytes as u64) < SEGMENT_BYTES,
        "a batch of {batch_bytes} bytes must fit a segment"
    );
    let mut rig = Rig::new();
    rig.start_drain(&broker, drain_config(None, None, PATIENT));
    for start in (0..N).step_by(BATCH) {
        rig.append(messages(start..start + BATCH, LEN)).await;
    }

    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    let duplicates = check_delivery(&observed, &rig);
    rig.wait_settled().await;
    let counts = rig.counts();
    assert_eq!(counts.rejected, 0);
    // Without a lost connection nothing is sent twice.
    if rig.upstream().stats().reconnects == 0 {
        assert_eq!(duplicates, 0, "duplicates without a reconnect");
        assert_eq!(counts.resent, 0);
        assert_eq!(counts.ack_timeouts, 0);
        assert_eq!(counts.forwarded, N as u64);
        // Every acknowledgement was timed, once.
        let latency = rig.running().stats.ack_latency.snapshot();
        assert_eq!(latency.count, N as u64, "{latency:?}");
        assert!(latency.sum_secs > 0.0);
    }
    // Nothing is in flight once everything is settled, and the drain's loop turns.
    rig.wait_for("nothing in flight", EVENT_BOUND, |rig| {
        rig.running().stats.in_flight.load(Relaxed) == 0
    })
    .await;
    // Idle (nothing to send, no backlog cap, so no timer of the machine's), the drain task
    // still beats.
    let idle = Instant::now();
    rig.wait_for("an idle beat", EVENT_BOUND, |rig| {
        let now = Instant::now();
        rig.running()
            .stats
            .beat
            .silent_for(now)
            .is_some_and(|silent| silent + Duration::from_millis(2) <= now.duration_since(idle))
    })
    .await;
    // Caught up: no backlog, nothing held, no age.
    let info = rig.spool.lock().backlog_info(0, wall_ms());
    assert_eq!((info.records, info.oldest_ms), (0, None), "{info:?}");
    assert_eq!(rig.spool.lock().held_records(), 0);
    // One fsync timed per group commit (fsync always, QoS 1: no deferred or seal-time one).
    let syncs = rig.spool.stats().syncs;
    assert!(syncs > 0);
    assert_eq!(rig.spool.fsync_latency().snapshot().count, syncs);

    // Everything is acknowledged: once collected, at most the active segment remains.
    let stats = {
        let mut spool = rig.spool.lock();
        spool.collect_garbage();
        spool.stats()
    };
    // No segment grows past its target with writes this small, so this many bytes took at
    // least three segment files.
    assert!(
        stats.bytes_written > 2 * SEGMENT_BYTES,
        "the backlog must have spanned several segments: {stats:?}"
    );
    assert!(stats.segments <= 1, "{stats:?}");
    assert!(
        rig.segment_files() <= 1,
        "{} segment files",
        rig.segment_files()
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_keeps_to_its_message_rate() {
    init_tracing();
    const N: usize = 600;
    const RATE: u32 = 200;
    let broker = Broker::start_with(BROKER_CONF);
    let mut observer = Observer::connect(broker.port).await;
    let mut rig = Rig::new();
    // The whole backlog is there before the drain starts: only the rate holds it back.
    rig.append(messages(0..N, 32)).await;
    let started = Instant::now();
    rig.start_drain(&broker, drain_config(Some(RATE), None, PATIENT));

    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    check_delivery(&observed, &rig);
    assert_paced(&observed, started, N as f64, f64::from(RATE));
    rig.wait_settled().await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_keeps_to_its_byte_rate() {
    init_tracing();
    const N: usize = 600;
    // Topic and payload: what `rate_bytes` counts.
    const LEN: usize = 100;
    const RATE: u64 = 20_000;
    let broker = Broker::start_with(BROKER_CONF);
    let mut observer = Observer::connect(broker.port).await;
    let mut rig = Rig::new();
    let backlog = messages(0..N, LEN);
    assert!(
        backlog
            .iter()
            .all(|m| m.topic.len() + m.payload.len() == LEN)
    );
    rig.append(backlog).await;
    let started = Instant::now();
    rig.start_drain(&broker, drain_config(None, Some(RATE), PATIENT));

    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    check_delivery(&observed, &rig);
    assert_paced(&observed, started, (N * LEN) as f64, RATE as f64);
    rig.wait_settled().await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_when_the_broker_crashes_are_sent_again() {
    init_tracing();
    const BEFORE: usize = 300;
    const DURING: usize = 700;
    let mut broker = Broker::start_persistent(BROKER_CONF);
    // mosquitto acknowledges before anything is durable, so a crash can lose messages it had
    // acknowledged and not yet delivered: the broker's loss, not the drain's. Hence the crash
    // comes only once every message acknowledged so far has been observed. And the observer's
    // session and subscription are saved before: the restarted broker has them from its
    // first moment and queues what the drain resends even before the observer is back
    // (subscribing again after the restart would race with the upstream's reconnect).
    let mut observer = Observer::persistent(broker.port).await;
    broker.save();
    let mut rig = Rig::new();
    rig.start_drain(&broker, drain_config(None, None, PATIENT));
    rig.append(messages(0..BEFORE, 64)).await;
    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    rig.wait_settled().await;

    // A frozen broker reads nothing more: what the drain sends from now on stays in the
    // socket buffers and is never acknowledged, and the drain stops at a full window with
    // the rest of the backlog waiting.
    broker.pause();
    rig.append(messages(BEFORE..BEFORE + DURING, 64)).await;
    rig.wait_for("a full window in flight", EVENT_BOUND, |rig| {
        rig.upstream().stats().published >= (BEFORE + usize::from(WINDOW)) as u64
    })
    .await;
    // The gauge shows the full window, and the backlog is exactly what is not acknowledged.
    rig.wait_for("the gauge at the window", EVENT_BOUND, |rig| {
        rig.running().stats.in_flight.load(Relaxed) == u64::from(WINDOW)
    })
    .await;
    {
        let spool = rig.spool.lock();
        let cursor = spool.cursor(0).expect("one upstream");
        let info = spool.backlog_info(0, wall_ms());
        assert_eq!(info.records, rig.end() - cursor, "{info:?}");
        assert_eq!(spool.held_records(), info.records);
        assert!(info.oldest_ms.is_some_and(|t| t <= wall_ms()), "{info:?}");
        assert_eq!(spool.oldest_ms(), info.oldest_ms);
        assert!(info.bytes > 0);
    }
    let published = rig.upstream().stats().published;
    assert!(rig.cursor() < rig.end(), "the crash comes mid-way");
    broker.restart();

    collect(&mut observer, &rig, &mut observed).await;
    let duplicates = check_delivery(&observed, &rig);
    rig.wait_settled().await;
    let counts = rig.counts();
    eprintln!("crash: {counts:?}, {duplicates} duplicates observed");
    // Every publish after the first BEFORE (all acknowledged before the freeze) was on the
    // crashed connection, was never acknowledged, and was sent again after the restart.
    assert!(
        counts.resent >= published - BEFORE as u64,
        "resent {} of {} lost in flight",
        counts.resent,
        published - BEFORE as u64
    );
    assert!(rig.upstream().stats().reconnects >= 1);
    assert_eq!(counts.rejected, 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_acknowledging_is_dropped_after_the_ack_timeout() {
    init_tracing();
    const BEFORE: usize = 200;
    const DURING: usize = 300;
    const ACK_TIMEOUT: Duration = Duration::from_secs(1);
    let broker = Broker::start_with(BROKER_CONF);
    // A persistent session with a long keep-alive: the freeze does not cost the observer its
    // connection, and if it did, the broker would keep what arrives meanwhile for it.
    let mut observer = Observer::persistent(broker.port).await;
    let mut rig = Rig::new();
    rig.start_drain(&broker, drain_config(None, None, ACK_TIMEOUT));
    rig.append(messages(0..BEFORE, 64)).await;
    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    rig.wait_settled().await;
    assert_eq!(rig.counts().ack_timeouts, 0);

    // Frozen, the broker keeps the connection open and acknowledges nothing: only the ack
    // timeout can tell (the keep-alive is far longer).
    broker.pause();
    rig.append(messages(BEFORE..BEFORE + DURING, 64)).await;
    rig.wait_for("an ack timeout", EVENT_BOUND, |rig| {
        rig.counts().ack_timeouts >= 1
    })
    .await;
    assert!(
        rig.cursor() < rig.end(),
        "nothing acknowledged while frozen"
    );
    broker.resume();

    collect(&mut observer, &rig, &mut observed).await;
    let duplicates = check_delivery(&observed, &rig);
    rig.wait_settled().await;
    let counts = rig.counts();
    eprintln!("ack timeout: {counts:?}, {duplicates} duplicates observed");
    // The reset failed what was in flight, and it was sent again on the next connection.
    assert!(counts.resent >= 1, "{counts:?}");
    assert!(rig.upstream().stats().reconnects >= 1);
    assert_eq!(counts.rejected, 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_drain_sends_nothing_new_and_settles_what_is_in_flight() {
    init_tracing();
    const N: usize = 600;
    let broker = Broker::start_with(BROKER_CONF);
    let mut rig = Rig::new();
    rig.append(messages(0..N, 32)).await;
    // Paced, so that most of the backlog is still unsent when the drain is told to stop.
    rig.start_drain(&broker, drain_config(Some(200), None, PATIENT));
    rig.wait_for("forwarding", EVENT_BOUND, |rig| {
        rig.counts().forwarded >= 250
    })
    .await;
    let running = rig.running.as_mut().expect("drain started");
    running.stop_drain.cancel();
    timeout(EVENT_BOUND, &mut running.drain_task)
        .await
        .expect("the drain stops once what is in flight is settled")
        .expect("drain did not panic");
    let counts = rig.counts();
    // The upstream is still up: only the drain's own stop held the rest back.
    assert!(rig.upstream().is_connected());
    assert!(
        counts.forwarded < N as u64,
        "kept sending after stop: {counts:?}"
    );
    assert_eq!(
        rig.cursor(),
        rig.first_seq + counts.forwarded,
        "the cursor covers exactly what the broker acknowledged"
    );
}

// QoS 0 produces no acknowledgement, so these check that the drain keeps itself going: a
// backlog of QoS 0 messages larger than the window, appended once and never followed by more
// traffic, must arrive whole. Each failed before the fix with the drain asleep after the first
// window.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_messages_beyond_the_window_arrive_without_further_traffic() {
    init_tracing();
    const N: usize = 10 * WINDOW as usize;
    let broker = Broker::start_with(BROKER_CONF);
    let mut observer = Observer::connect(broker.port).await;
    let mut rig = Rig::new();
    rig.start_drain(&broker, drain_config(None, None, PATIENT));
    // One append, then silence: no later write may be what wakes the drain.
    rig.append(qos0_messages(0..N, 64)).await;

    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    check_delivery(&observed, &rig);
    rig.wait_settled().await;
    let counts = rig.counts();
    if rig.upstream().stats().reconnects == 0 {
        assert_eq!(counts.forwarded, N as u64, "{counts:?}");
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_run_after_qos1_messages_arrives_without_further_traffic() {
    init_tracing();
    const N: usize = 10 * WINDOW as usize;
    let broker = Broker::start_with(BROKER_CONF);
    let mut observer = Observer::connect(broker.port).await;
    let mut rig = Rig::new();
    rig.start_drain(&broker, drain_config(None, None, PATIENT));
    // The first half mixes QoS 1 into QoS 0 (windows holding both, the QoS 0 messages behind
    // unacknowledged ones); the second half is a run of QoS 0 several windows long, after the
    // last acknowledgement that could wake the drain.
    let mut batch = qos0_messages(0..N, 64);
    for (i, m) in batch.iter_mut().enumerate().take(N / 2) {
        if i % 7 == 0 {
            m.qos = Qos::AtLeastOnce;
        }
    }
    rig.append(batch).await;

    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    check_order_per_qos(&observed, &rig);
    // Contents and completeness, order aside (checked per QoS level above).
    observed.sort_by_key(|o| o.seq);
    check_delivery(&observed, &rig);
    rig.wait_settled().await;
    rig.stop().await;
}

/// Checks that the first copies of each QoS level arrived in id order. Only per level: the
/// broker passes a QoS 0 message on at once, while a QoS 1 message may wait for a slot of the
/// observer's in-flight window, so a QoS 0 message can overtake an earlier QoS 1 message on
/// the broker's way out (MQTT orders messages per QoS level only).
fn check_order_per_qos(observed: &[Observed], rig: &Rig) {
    for qos in [Qos::AtMostOnce, Qos::AtLeastOnce] {
        let mut seen = BTreeSet::new();
        let mut last = None;
        for seq in observed.iter().filter_map(|o| o.seq) {
            let level = seq
                .checked_sub(rig.first_seq)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| rig.appended.get(i))
                .map(|m| m.qos);
            if level != Some(qos) || !seen.insert(seq) {
                continue;
            }
            assert!(
                last.is_none_or(|l| l < seq),
                "{qos:?}: id {seq} arrived after id {last:?}"
            );
            last = Some(seq);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_qos0_backlog_arrives_whole_at_its_rate() {
    init_tracing();
    const N: usize = 600;
    // More than the window per second, so the window, not the rate, is what fills first.
    const RATE: u32 = 200;
    let broker = Broker::start_with(BROKER_CONF);
    let mut observer = Observer::connect(broker.port).await;
    let mut rig = Rig::new();
    rig.append(qos0_messages(0..N, 32)).await;
    let started = Instant::now();
    rig.start_drain(&broker, drain_config(Some(RATE), None, PATIENT));

    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    check_delivery(&observed, &rig);
    assert_paced(&observed, started, N as f64, f64::from(RATE));
    rig.wait_settled().await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_client_queue_only_delays_qos0_messages() {
    init_tracing();
    const N: usize = 10 * WINDOW as usize;
    let broker = Broker::start_with(BROKER_CONF);
    let mut observer = Observer::connect(broker.port).await;
    let mut rig = Rig::new();
    // A client queue far smaller than the backlog: the drain meets `QueueFull` again and
    // again and must come back by itself each time.
    rig.start_drain_with(&broker, drain_config(None, None, PATIENT), |c| {
        c.request_queue = 4;
    });
    rig.append(qos0_messages(0..N, 64)).await;

    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    check_delivery(&observed, &rig);
    rig.wait_settled().await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_upstream_refuses_do_not_fill_the_window() {
    init_tracing();
    // Refused by the client when submitted (a wildcard in a topic name): settled at once,
    // nothing will ever acknowledge them, like QoS 0.
    const BAD: usize = 3 * WINDOW as usize;
    const GOOD: usize = 10;
    let broker = Broker::start_with(BROKER_CONF);
    let mut observer = Observer::connect(broker.port).await;
    let mut rig = Rig::new();
    rig.start_drain(&broker, drain_config(None, None, PATIENT));
    let mut batch: Vec<Message> = messages(0..BAD, 64)
        .into_iter()
        .map(|m| Message {
            topic: "drain/+/refused".into(),
            ..m
        })
        .collect();
    let good = messages(BAD..BAD + GOOD, 64);
    batch.extend(good.iter().cloned());
    rig.append(batch).await;

    let got = observer.expect(GOOD).await;
    let mut want: Vec<(String, Bytes)> = good.into_iter().map(|m| (m.topic, m.payload)).collect();
    want.sort();
    assert_eq!(got, want);
    rig.wait_settled().await;
    assert_eq!(rig.counts().rejected, BAD as u64, "{:?}", rig.counts());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_one_drains_a_qos1_backlog_without_further_traffic() {
    init_tracing();
    // The acknowledgement that frees the only slot is also the last event before silence:
    // the pass it wakes must see the slot free (failed before the fix with one message
    // forwarded per write).
    const N: usize = 50;
    let broker = Broker::start_with(BROKER_CONF);
    let mut observer = Observer::connect(broker.port).await;
    let mut rig = Rig::new();
    rig.start_drain(
        &broker,
        DrainConfig {
            max_backlog: BacklogLimit::default(),
            window: 1,
            ..drain_config(None, None, PATIENT)
        },
    );
    rig.append(messages(0..N, 64)).await;

    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    check_delivery(&observed, &rig);
    rig.wait_settled().await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_backlog_spooled_during_an_outage_arrives_once_the_broker_is_back() {
    init_tracing();
    const N: usize = 10 * WINDOW as usize;
    // The broker keeps the observer's session across the outage and queues QoS 0 messages
    // for it while it reconnects, so the observer misses nothing the drain sends.
    let mut broker = Broker::start_persistent("max_queued_messages 0\nqueue_qos0_messages true\n");
    let mut observer = Observer::persistent(broker.port).await;
    broker.save();
    let mut rig = Rig::new();
    rig.start_drain(&broker, drain_config(None, None, PATIENT));
    rig.wait_for("the upstream connected", EVENT_BOUND, |rig| {
        rig.upstream().is_connected()
    })
    .await;
    broker.kill();
    rig.wait_for("the link lost", EVENT_BOUND, |rig| {
        !rig.upstream().is_connected()
    })
    .await;
    // The whole backlog waits for the link; the reconnect is the last event.
    rig.append(qos0_messages(0..N, 64)).await;
    broker.launch();

    let mut observed = Vec::new();
    collect(&mut observer, &rig, &mut observed).await;
    check_delivery(&observed, &rig);
    rig.wait_settled().await;
    rig.stop().await;
}

/// Two upstreams on one spool: one live (a real mosquitto), one pointed at a closed loopback
/// port with a small `max_backlog.bytes`. The live one gets everything; the dead one's
/// backlog stays within its cap plus a segment, its cursor moves only by giving up, and
/// `backlog_dropped` counts exactly the records it gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_over_its_backlog_cap_gives_up_its_oldest_records_only() {
    init_tracing();
    const N: usize = 3000;
    const BATCH: usize = 200;
    const LEN: usize = 150;
    const CAP: u64 = 2 * SEGMENT_BYTES;
    let broker = Broker::start_with(BROKER_CONF);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = SpoolConfig {
        dir: dir.path().join("spool"),
        max_bytes: 64 << 20,
        segment_bytes: SEGMENT_BYTES,
        min_free_bytes: 0,
        max_age: None,
        when_full: WhenFull::RejectNew,
        fsync: FsyncPolicy::Always,
        memory_tail_bytes: 8 << 20,
        retain_bytes: 0,
    };
    let names = ["live".to_owned(), "dead".to_owned()];
    let (spool, _) = Spool::open(StdFs, config, &names).expect("spool opens");
    let first_seq = spool.next_seq();
    let spool = SharedSpool::new(spool);
    let (replies_tx, mut replies) = mpsc::channel(1024);
    let (entrance, writer) = start_writer(Arc::clone(&spool), 8192).expect("writer starts");
    let appender = entrance.for_ingress(replies_tx);
    // The writer stops once every appender is gone: keep only the ingress's.
    drop(entrance);

    let closed = common::free_port();
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut stats = Vec::new();
    for (index, (name, url, limit)) in [
        ("live", broker.url(), BacklogLimit::default()),
        (
            "dead",
            format!("mqtt://127.0.0.1:{closed}"),
            BacklogLimit {
                bytes: Some(CAP),
                age: None,
            },
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut upstream_config = fast_config(name, &url, MqttVersion::V5);
        upstream_config.max_inflight = WINDOW;
        let (ack_tx, ack_rx) = mpsc::channel(usize::from(WINDOW) + 16);
        let (upstream, upstream_task) =
            MqttUpstream::spawn(index, upstream_config, ack_tx, stop.clone())
                .expect("upstream starts");
        let drain_stats = Arc::new(DrainStats::default());
        let config = DrainConfig {
            max_backlog: limit,
            ..drain_config(None, None, PATIENT)
        };
        let drain_task = tokio::spawn(drain(
            Arc::clone(&spool),
            index,
            upstream,
            ack_rx,
            config,
            Arc::new(RouteTable::everything()).into(),
            Arc::clone(&drain_stats),
            stop.clone(),
        ));
        tasks.push(upstream_task);
        tasks.push(drain_task);
        stats.push(drain_stats);
    }

    for start in (0..N).step_by(BATCH) {
        let batch = messages(start..start + BATCH, LEN);
        let first = first_seq + start as u64;
        for (i, m) in batch.into_iter().enumerate() {
            appender
                .append(m, Some(first + i as u64))
                .expect("the writer's queue has room");
        }
        let mut accepted = 0;
        while accepted < BATCH {
            let got = timeout(EVENT_BOUND, replies.recv())
                .await
                .expect("the writer answers in time")
                .expect("writer running");
            assert!(got.iter().all(|r| r.accepted));
            accepted += got.len();
        }
    }
    let end = first_seq + N as u64;

    // The live upstream gets everything.
    let deadline = Instant::now() + EVENT_BOUND;
    while spool.lock().cursor(0) != Some(end) {
        assert!(Instant::now() < deadline, "live upstream not settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats[0].forwarded.load(Relaxed), N as u64);
    assert_eq!(stats[0].backlog_dropped.load(Relaxed), 0, "under no cap");

    // The dead one gave up its oldest records, and its backlog is back within the cap plus a
    // segment (checked after every group commit and every second).
    let deadline = Instant::now() + EVENT_BOUND;
    while spool.lock().backlog_bytes(1) > CAP + SEGMENT_BYTES {
        assert!(
            Instant::now() < deadline,
            "dead upstream's backlog not bounded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dead_cursor = spool.lock().cursor(1).expect("two upstreams");
    assert!(dead_cursor > first_seq, "records were given up");
    assert_eq!(stats[1].forwarded.load(Relaxed), 0);
    assert_eq!(
        stats[1].backlog_dropped.load(Relaxed),
        dead_cursor - first_seq,
        "every record given up is counted, once"
    );
    // The spool freed what both cursors passed.
    let bytes = {
        let mut s = spool.lock();
        s.collect_garbage();
        s.stats().bytes
    };
    assert!(bytes <= CAP + SEGMENT_BYTES, "{bytes} bytes on disk");

    drop(appender);
    timeout(
        EVENT_BOUND,
        tokio::task::spawn_blocking(move || writer.join()),
    )
    .await
    .expect("writer stops in time")
    .expect("join task")
    .expect("writer did not panic");
    stop.cancel();
    for task in tasks {
        timeout(EVENT_BOUND, task)
            .await
            .expect("stops in time")
            .expect("did not panic");
    }
}
