//! The threads around the [`Spool`]: one writer thread that appends, writes and syncs in
//! groups and answers the senders, and one drain task per upstream that forwards in order
//! and moves the upstream's cursor on the broker's acknowledgements.
//!
//! # The drain loop
//!
//! Each pass sends what it may, moves the cursor, then sleeps until a wake source fires. It
//! MUST NOT sleep with work pending: whatever stops a pass from sending arms a wake source
//! that fires once sending may go on. The pairs (`tests/spool_drain.rs` covers each one but
//! the failed read against a real broker):
//!
//! - **The window is full** (`window` QoS >= 1 messages unacknowledged): every one of them
//!   gets exactly one report on the `acks` channel (acknowledged, refused, or failed when its
//!   connection is lost), and the ack timeout is armed for the oldest. The pass a report
//!   wakes frees the acknowledged slots *before* it sends, since that report may be the last
//!   event for a while. QoS 0 messages take no slot: nothing would ever free it. They are
//!   settled once the client's request queue took them, and that queue (`request_queue`)
//!   bounds them instead.
//! - **The rate limit** (`rate_msgs`, `rate_bytes`): a timer at the instant the token buckets
//!   hold enough for the next message.
//! - **The client's request queue is full** (or its in-flight permits are taken):
//!   [`FailReason::QueueFull`] signals nothing when room appears, so a retry timer
//!   ([`QUEUE_FULL_RETRY`]).
//! - **The link is down** (the publish fails, or the link watch says so): the link watch
//!   changes when it comes back. It is a `watch`, so a change between the look and the sleep
//!   is not missed.
//! - **The spool has nothing more** (a read returned no record): the `written` watch, marked
//!   seen *before* the read, so a write racing with the read wakes the drain. A read returns
//!   nothing only at the written end: it crosses segment boundaries and skips expired and
//!   damaged records by itself.
//! - **A read failed**: a retry timer ([`READ_RETRY`]).
//! - **The pass's budget is spent** ([`SENDS_PER_PASS`] messages, bounded work per wake): an
//!   immediate wake, after yielding to the runtime.
//! - **Rewinding after a lost connection**: the remaining reports of that connection; the
//!   pass after the last one sends again.
//! - **Shutdown**: the drain stops sending, waits only for the reports of what is in flight,
//!   and ends.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::fs::Fs;
use super::log::{Access, Chunks, FsyncPolicy, ReadPos, Spool, SpoolStats, read_records};
use super::record::Record;
use crate::message::Message;
use crate::mqtt::{AckReport, Delivery, FailReason, MqttUpstream};

/// Most appends taken into one group commit.
const MAX_GROUP: usize = 8192;

/// How often the writer saves the cursors and checks the free disk space.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// Records read from the spool per read call at most.
const READ_BATCH: usize = 512;

/// How long the drain waits before retrying when the client's request queue is full.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(2);

/// How long the drain waits before retrying a failed spool read.
const READ_RETRY: Duration = Duration::from_millis(100);

/// Most messages one pass of the drain loop hands to the client before it looks at the
/// acknowledgements, the link and shutdown again.
const SENDS_PER_PASS: usize = READ_BATCH;

/// The spool shared by the writer thread and the drain tasks. Critical sections are short:
/// encoding a group, one `pwrite`, one read of at most 256 KiB; fsyncs run outside the lock.
pub struct SharedSpool<F: Fs> {
    spool: Mutex<Spool<F>>,
    /// The last sequence id written; changes wake the drains.
    written: watch::Sender<u64>,
    /// Messages refused because the writer's queue was full (shared with the appenders).
    queue_full: Arc<AtomicU64>,
}

impl<F: Fs> SharedSpool<F> {
    /// Wraps an opened spool.
    pub fn new(spool: Spool<F>) -> Arc<Self> {
        let written = watch::Sender::new(spool.written_seq());
        Arc::new(Self {
            spool: Mutex::new(spool),
            written,
            queue_full: Arc::default(),
        })
    }

    /// Messages refused (QoS >= 1: answered with congestion; QoS 0: dropped) because the
    /// writer's queue was full.
    pub fn queue_full(&self) -> u64 {
        self.queue_full.load(Relaxed)
    }

    /// The spool. A poisoned lock is still consistent: no method panics midway.
    pub fn lock(&self) -> MutexGuard<'_, Spool<F>> {
        self.spool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters.
    pub fn stats(&self) -> SpoolStats {
        self.lock().stats()
    }

    /// [`Spool::read`], with the lock held only to find segments and to count: the file
    /// reads run without it, so the writer never waits for a reader (a cold read from flash
    /// can take milliseconds). Blocking: call it off the async runtime.
    ///
    /// # Errors
    /// The OS error of a read; `out` keeps what was read before it.
    pub fn read(
        &self,
        pos: &mut ReadPos,
        max: usize,
        now_ms: u64,
        chunks: &mut Chunks,
        out: &mut Vec<Record>,
    ) -> std::io::Result<()> {
        read_records(self, pos, max, now_ms, chunks, out)
    }
}

impl<F: Fs> Access<F> for &SharedSpool<F> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Spool<F>) -> R) -> R {
        f(&mut self.lock())
    }
}

/// One message for the spool; `reply` asks for an [`AppendReply`] on its ingress's route.
#[derive(Debug)]
struct Append {
    message: Message,
    reply: Option<ReplyTo>,
}

/// Where the verdict on one message goes: its token, on its ingress's channel.
#[derive(Debug)]
struct ReplyTo {
    token: u64,
    route: Arc<Route>,
}

/// The reply channel of one ingress, shared by its [`IngressAppender`] clones. The writer
/// tells ingresses apart by the identity of this allocation (`Arc::ptr_eq`), so tokens need
/// to be unique within one ingress only.
#[derive(Debug)]
struct Route {
    replies: mpsc::Sender<Vec<AppendReply>>,
}

/// The spool's verdict on a tokened message: accepted means durable per the fsync policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReply {
    /// The token given to [`IngressAppender::append`] (unique within that ingress only).
    pub token: u64,
    /// Stored; otherwise refused (full, or a disk error) and the sender must retry later.
    pub accepted: bool,
}

/// The writer thread's entrance, from which each ingress takes its own
/// [`IngressAppender`]. Cheap to clone; the thread stops once every clone of it and of the
/// ingress appenders is dropped (after writing and syncing what it has).
#[derive(Clone, Debug)]
pub struct Appender {
    tx: SyncSender<Append>,
    queue_full: Arc<AtomicU64>,
}

impl Appender {
    /// An appender for one ingress (a protocol core's driver): the verdicts on its tokened
    /// messages come back on `replies`, in batches, one batch per group commit, and never on
    /// another ingress's channel. The ingress MUST keep reading `replies` while it appends
    /// (the channel bounds the writer: a full one makes it wait); a dropped receiver only
    /// loses that ingress's verdicts.
    #[must_use]
    pub fn for_ingress(&self, replies: mpsc::Sender<Vec<AppendReply>>) -> IngressAppender {
        IngressAppender {
            tx: self.tx.clone(),
            queue_full: Arc::clone(&self.queue_full),
            route: Arc::new(Route { replies }),
        }
    }
}

/// Hands one ingress's messages to the writer thread; made by [`Appender::for_ingress`].
/// Clones share the ingress's reply channel (and so its token space).
#[derive(Clone, Debug)]
pub struct IngressAppender {
    tx: SyncSender<Append>,
    queue_full: Arc<AtomicU64>,
    route: Arc<Route>,
}

impl IngressAppender {
    /// Queues `message`; with a token, an [`AppendReply`] carrying it follows on this
    /// ingress's reply channel. Never blocks.
    ///
    /// # Errors
    /// The writer's queue is full (or the writer stopped): the message is given back, and no
    /// reply follows.
    pub fn append(&self, message: Message, token: Option<u64>) -> Result<(), Message> {
        let reply = token.map(|token| ReplyTo {
            token,
            route: Arc::clone(&self.route),
        });
        match self.tx.try_send(Append { message, reply }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(a) | TrySendError::Disconnected(a)) => {
                self.queue_full.fetch_add(1, Relaxed);
                Err(a.message)
            }
        }
    }
}

/// Starts the writer thread: `queue` bounds the appends waiting for it (all ingresses
/// together); each ingress registers with [`Appender::for_ingress`].
///
/// # Errors
/// The OS refused to start a thread.
pub fn start_writer<F: Fs>(
    shared: Arc<SharedSpool<F>>,
    queue: usize,
) -> std::io::Result<(Appender, JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel(queue);
    let queue_full = Arc::clone(&shared.queue_full);
    let handle = std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || Writer::new(shared).run(&rx))?;
    Ok((Appender { tx, queue_full }, handle))
}

/// The verdicts of one group commit, one batch per ingress, in the order each ingress
/// appended.
#[derive(Debug, Default)]
struct Verdicts {
    batches: Vec<(Arc<Route>, Vec<AppendReply>)>,
}

impl Verdicts {
    /// Adds `reply` to its ingress's batch. Few ingresses: a linear search, starting with
    /// the last one used (appends come in runs per ingress).
    fn push(&mut self, route: Arc<Route>, reply: AppendReply) {
        let found = self
            .batches
            .iter_mut()
            .rev()
            .find(|(r, _)| Arc::ptr_eq(r, &route));
        match found {
            Some((_, batch)) => batch.push(reply),
            None => self.batches.push((route, vec![reply])),
        }
    }

    /// Sends each ingress its batch. A closed channel (the ingress is gone) is skipped: its
    /// verdicts have nobody to tell, and the other ingresses still get theirs.
    fn send(self) {
        for (route, batch) in self.batches {
            if route.replies.blocking_send(batch).is_err() {
                tracing::debug!("Spool replies receiver of an ingress gone.");
            }
        }
    }
}

/// Milliseconds since the Unix epoch, the records' timestamps.
#[must_use]
pub fn wall_ms() -> u64 {
    #[allow(clippy::disallowed_methods)] // The adapter is where the clock is read.
    let now = SystemTime::now();
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct Writer<F: Fs> {
    shared: Arc<SharedSpool<F>>,
    policy: FsyncPolicy,
    /// Written but not synced (interval policy).
    unsynced: Option<super::log::Pending<F::File>>,
    last_sync: Instant,
    last_housekeeping: Instant,
    /// A disk error is ongoing (logged once per episode).
    failing: bool,
}

impl<F: Fs> Writer<F> {
    #[allow(clippy::disallowed_methods)]
    fn new(shared: Arc<SharedSpool<F>>) -> Self {
        let policy = shared.lock().config().fsync;
        Self {
            shared,
            policy,
            unsynced: None,
            last_sync: Instant::now(),
            last_housekeeping: Instant::now(),
            failing: false,
        }
    }

    #[allow(clippy::disallowed_methods)]
    fn run(mut self, rx: &Receiver<Append>) {
        self.shared.lock().check_disk();
        let mut group = Vec::new();
        loop {
            match rx.recv_timeout(HOUSEKEEPING) {
                Ok(a) => group.push(a),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(a) => group.push(a),
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                // Durable before told: the verdicts go out only after the group's write
                // and (per policy) its fsync, one fsync for every ingress in the group.
                self.commit(&mut group).send();
            }
            self.housekeeping(false);
        }
        self.housekeeping(true);
    }

    /// Appends, writes and (per policy) syncs one group; returns the verdicts per ingress.
    #[allow(clippy::disallowed_methods)]
    fn commit(&mut self, group: &mut Vec<Append>) -> Verdicts {
        let now_ms = wall_ms();
        let mut verdicts = Verdicts::default();
        let mut stored = Vec::new();
        let written = {
            let mut spool = self.shared.lock();
            for a in group.drain(..) {
                let ok = spool.append(now_ms, &a.message).is_ok();
                match (a.reply, ok) {
                    (Some(reply), true) => stored.push(reply),
                    (Some(ReplyTo { token, route }), false) => verdicts.push(
                        route,
                        AppendReply {
                            token,
                            accepted: false,
                        },
                    ),
                    (None, _) => {}
                }
            }
            let written = spool.write();
            self.shared.written.send_if_modified(|w| {
                let now = spool.written_seq();
                std::mem::replace(w, now) != now
            });
            written
        };
        let durable = match written {
            Ok(None) => true,
            Ok(Some(pending)) => match self.policy {
                FsyncPolicy::Always => {
                    let result = pending.run();
                    self.shared.lock().synced(&pending, &result);
                    self.health(result.as_ref().err(), "fsync");
                    result.is_ok()
                }
                FsyncPolicy::Interval(_) => {
                    self.unsynced = Some(pending);
                    self.health(None, "write");
                    true
                }
            },
            Err(error) => {
                self.health(Some(&error), "write");
                false
            }
        };
        for ReplyTo { token, route } in stored {
            verdicts.push(
                route,
                AppendReply {
                    token,
                    accepted: durable,
                },
            );
        }
        verdicts
    }

    /// Logs the start and the end of a disk-error episode (not every failed write).
    fn health(&mut self, error: Option<&std::io::Error>, op: &str) {
        match (error, self.failing) {
            (Some(error), false) => {
                self.failing = true;
                tracing::error!(%error, op, "Spool write failed: QoS >= 1 senders get congestion until the disk accepts writes again.");
            }
            (None, true) => {
                self.failing = false;
                tracing::info!("Spool writes succeed again.");
            }
            _ => {}
        }
    }

    #[allow(clippy::disallowed_methods)]
    fn housekeeping(&mut self, last: bool) {
        let now = Instant::now();
        if let FsyncPolicy::Interval(interval) = self.policy {
            if last || now.duration_since(self.last_sync) >= interval {
                self.last_sync = now;
                if let Some(pending) = self.unsynced.take() {
                    let result = pending.run();
                    self.shared.lock().synced(&pending, &result);
                    self.health(result.as_ref().err(), "fsync");
                }
            }
        }
        if last || now.duration_since(self.last_housekeeping) >= HOUSEKEEPING {
            self.last_housekeeping = now;
            let mut spool = self.shared.lock();
            spool.check_disk();
            spool.collect_garbage();
            if let Err(error) = spool.save_cursors() {
                tracing::warn!(%error, "Cannot save the spool cursors (a restart may resend).");
            }
        }
    }
}

/// How one upstream drains the spool.
#[derive(Debug, Clone, Copy)]
pub struct DrainConfig {
    /// QoS >= 1 messages sent and not yet acknowledged, at most (the upstream's
    /// `max_inflight`). QoS 0 messages take no slot: they are settled once the client's
    /// request queue took them.
    pub window: usize,
    /// Messages per second at most; `None`: unlimited.
    pub rate_msgs: Option<u32>,
    /// Bytes (payload and topic) per second at most; `None`: unlimited.
    pub rate_bytes: Option<u64>,
    /// A QoS >= 1 message unacknowledged this long means the broker is gone: the connection
    /// is dropped and made again, and everything unacknowledged is sent again.
    pub ack_timeout: Duration,
}

/// Counters of one drain, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct DrainStats {
    /// Messages forwarded: acknowledged by the broker (QoS >= 1) or handed to the
    /// connection (QoS 0).
    pub forwarded: AtomicU64,
    /// Messages the broker refused for good (MQTT 5 failure reason, invalid topic): dropped.
    pub rejected: AtomicU64,
    /// Connections reset because an acknowledgement took longer than `ack_timeout`.
    pub ack_timeouts: AtomicU64,
    /// Messages sent again after a connection loss.
    pub resent: AtomicU64,
}

/// A token bucket for the drain rate; a burst of one second.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate,
            at: now,
        }
    }

    /// Refills, then returns `Ok` if `n` tokens are there, else how long until they are.
    fn ready(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate.max(n));
        self.at = now;
        if self.tokens >= n {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / self.rate))
        }
    }

    /// Takes `n` tokens, or returns how long until they are there (taking none).
    #[cfg(test)]
    fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.ready(n, now)?;
        self.tokens -= n;
        Ok(())
    }
}

/// Takes one message of `size` bytes from both limits, or from neither and returns how long
/// until both allow it.
fn take_limits(
    msgs: &mut Option<Bucket>,
    bytes: &mut Option<Bucket>,
    size: f64,
    now: Instant,
) -> Result<(), Duration> {
    let wait_msgs = msgs.as_mut().map_or(Ok(()), |b| b.ready(1.0, now));
    let wait_bytes = bytes.as_mut().map_or(Ok(()), |b| b.ready(size, now));
    match (wait_msgs, wait_bytes) {
        (Ok(()), Ok(())) => {
            if let Some(b) = msgs.as_mut() {
                b.tokens -= 1.0;
            }
            if let Some(b) = bytes.as_mut() {
                b.tokens -= size;
            }
            Ok(())
        }
        (Err(a), Err(b)) => Err(a.max(b)),
        (Err(a), Ok(())) | (Ok(()), Err(a)) => Err(a),
    }
}

/// Sets `wake` to `at` unless it is set to an earlier instant.
fn arm(wake: &mut Option<Instant>, at: Instant) {
    *wake = Some(wake.map_or(at, |w| w.min(at)));
}

/// One QoS >= 1 message sent upstream and not yet moved over by the cursor.
#[derive(Debug)]
struct Sent {
    seq: u64,
    acked: bool,
    at: Instant,
}

/// Forwards the spool to `upstream` (index `index`) in order until `shutdown`: at most
/// `window` QoS >= 1 messages unacknowledged, the cursor moved only over acknowledged messages
/// (QoS 0: handed to the client), everything unacknowledged sent again after a connection
/// loss. The module docs list what wakes it. `acks` must be the report channel given to this
/// upstream only.
#[allow(clippy::disallowed_methods, clippy::too_many_lines)]
pub async fn drain<F: Fs>(
    shared: Arc<SharedSpool<F>>,
    index: usize,
    upstream: MqttUpstream,
    mut acks: mpsc::Receiver<AckReport>,
    config: DrainConfig,
    stats: Arc<DrainStats>,
    shutdown: CancellationToken,
) {
    let name = upstream.name().to_owned();
    let mut pos = shared.lock().reader(index);
    let mut chunks = Chunks::default();
    let mut cursor = pos.next_seq();
    let mut pending: VecDeque<Record> = VecDeque::new();
    let mut sent: VecDeque<Sent> = VecDeque::new();
    let mut outstanding = 0usize;
    let mut rewinding = false;
    let mut reset_requested = false;
    let mut resend_until = 0u64;
    // One past the last sequence id handed to the client (any QoS), for `resend_until`.
    let mut handed_end = 0u64;
    let mut written = shared.written.subscribe();
    let mut link = upstream.watch_link();
    let now = Instant::now();
    let mut msgs = config.rate_msgs.map(|r| Bucket::new(f64::from(r), now));
    let mut bytes = config.rate_bytes.map(|r| Bucket::new(r as f64, now));
    let mut reports = Vec::new();
    loop {
        let mut now = Instant::now();
        let mut wake: Option<Instant> = None;
        // Free the slots of the acknowledged prefix before sending, not after: the report that
        // woke this pass may be the last event for a while (a whole window acknowledged in one
        // batch, a window of one), so this pass must see its slots free.
        while sent.front().is_some_and(|s| s.acked) {
            sent.pop_front();
        }
        // Send what the window, the rate, the client's queue, the link and this pass's budget
        // allow; nothing new once stopping (what is in flight still settles). Every way out of
        // this loop arms `wake`, except those an event ends: nothing more to read (`written`),
        // a full window (the reports), a link that is down (`link`). See the module docs.
        if !rewinding && !shutdown.is_cancelled() && *link.borrow() {
            let mut budget = SENDS_PER_PASS;
            loop {
                if budget == 0 {
                    // More may be ready: come back at once, after a look at the other wake
                    // sources (bounded work per wake).
                    arm(&mut wake, now);
                    break;
                }
                if pending.is_empty() {
                    written.borrow_and_update();
                    // Read ahead a whole batch off the runtime (the window may take only part
                    // of it now; the rest waits in `pending`).
                    let job = {
                        let shared = Arc::clone(&shared);
                        let mut out = Vec::with_capacity(READ_BATCH);
                        let mut chunks = std::mem::take(&mut chunks);
                        tokio::task::spawn_blocking(move || {
                            let r =
                                shared.read(&mut pos, READ_BATCH, wall_ms(), &mut chunks, &mut out);
                            (r, pos, chunks, out)
                        })
                    };
                    let done = job.await;
                    // A cold read may take a while: send times count from after it.
                    now = Instant::now();
                    let (read, out) = match done {
                        Ok((read, p, c, out)) => {
                            pos = p;
                            chunks = c;
                            (read, out)
                        }
                        Err(error) => (Err(std::io::Error::other(error)), Vec::new()),
                    };
                    pending.extend(out);
                    if let Err(error) = read {
                        tracing::warn!(upstream = %name, %error, "Spool read failed; retrying.");
                        arm(&mut wake, now + READ_RETRY);
                    }
                }
                // Nothing left below the written end: the next write wakes the drain (the
                // watch was marked seen before the read, so a write racing with it counts).
                let Some(rec) = pending.front() else {
                    break;
                };
                let tracked = rec.qos.is_acknowledged();
                // Only a message the broker acknowledges takes a slot of the window: nothing
                // would ever free one taken by a QoS 0 message. The acknowledgement (or the
                // ack timeout) of the oldest slot wakes the drain.
                if tracked && sent.len() >= config.window {
                    break;
                }
                let size = (rec.topic.len() + rec.payload.len()) as f64;
                if let Err(after) = take_limits(&mut msgs, &mut bytes, size, now) {
                    arm(&mut wake, now + after);
                    break;
                }
                let seq = rec.seq;
                let message = Message {
                    topic: rec.topic.clone(),
                    payload: rec.payload.clone(),
                    qos: rec.qos,
                    retain: rec.retain,
                };
                match upstream.publish_with_seq(message, tracked.then_some(seq), Some(seq)) {
                    Ok(()) => {
                        if seq < resend_until {
                            stats.resent.fetch_add(1, Relaxed);
                        }
                        if tracked {
                            outstanding += 1;
                            sent.push_back(Sent {
                                seq,
                                acked: false,
                                at: now,
                            });
                        } else {
                            // Settled once the client's request queue took it (`request_queue`
                            // bounds how many wait there).
                            stats.forwarded.fetch_add(1, Relaxed);
                        }
                    }
                    Err(FailReason::Rejected) => {
                        stats.rejected.fetch_add(1, Relaxed);
                        tracing::warn!(upstream = %name, seq, topic = %rec.topic, "Upstream refuses a spooled message; dropped.");
                    }
                    Err(FailReason::QueueFull) => {
                        // The client's request queue (or its in-flight permits) has no room:
                        // nothing signals room, so look again shortly.
                        arm(&mut wake, now + QUEUE_FULL_RETRY);
                        break;
                    }
                    Err(_) => {
                        // The link went down (its watch changes, and wakes the drain when it
                        // is back) or the upstream stops.
                        break;
                    }
                }
                handed_end = seq + 1;
                pending.pop_front();
                budget -= 1;
            }
        }
        // Move the cursor up to the first message not settled (`sent` starts with one that is
        // not acknowledged: the prefix was freed above and nothing since was acknowledged).
        let next = sent
            .front()
            .map(|s| s.seq)
            .or_else(|| pending.front().map(|r| r.seq))
            .unwrap_or_else(|| pos.next_seq());
        if next > cursor && !rewinding {
            cursor = next;
            shared.lock().set_cursor(index, cursor);
        }
        // A broker that stopped acknowledging: drop the connection once. Only a live link is
        // reset (a lost one fails what is in flight by itself); the link coming back or the
        // rewind ending wakes the loop to look again.
        let watching = !reset_requested && !rewinding && *link.borrow();
        if let Some(oldest) = sent.iter().find(|s| !s.acked).filter(|_| watching) {
            let due = oldest.at + config.ack_timeout;
            if due <= now {
                reset_requested = true;
                stats.ack_timeouts.fetch_add(1, Relaxed);
                tracing::warn!(upstream = %name, seq = oldest.seq, timeout = ?config.ack_timeout, "Upstream did not acknowledge in time; reconnecting.");
                upstream.reset_link();
            } else {
                arm(&mut wake, due);
            }
        }
        if shutdown.is_cancelled() && outstanding == 0 {
            break;
        }
        let sleep = async {
            match wake {
                // Work is ready now: let the runtime's other tasks run first.
                Some(at) if at <= Instant::now() => tokio::task::yield_now().await,
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let stopping = shutdown.is_cancelled();
        tokio::select! {
            () = shutdown.cancelled(), if !stopping => {}
            n = acks.recv_many(&mut reports, 256) => {
                if n == 0 {
                    break;
                }
                for report in reports.drain(..) {
                    outstanding = outstanding.saturating_sub(1);
                    let ok = match report.delivery {
                        Delivery::Acknowledged => {
                            stats.forwarded.fetch_add(1, Relaxed);
                            true
                        }
                        Delivery::Failed(FailReason::Rejected) => {
                            stats.rejected.fetch_add(1, Relaxed);
                            tracing::warn!(upstream = %name, seq = report.token, "Upstream refused a spooled message; dropped.");
                            true
                        }
                        Delivery::Failed(_) => false,
                    };
                    if ok {
                        if let Ok(i) = sent.binary_search_by_key(&report.token, |s| s.seq) {
                            if let Some(s) = sent.get_mut(i) {
                                s.acked = true;
                            }
                        }
                    } else {
                        rewinding = true;
                    }
                }
            }
            r = written.changed(), if !stopping => {
                if r.is_err() {
                    break;
                }
            }
            r = link.changed(), if !stopping => {
                if r.is_err() {
                    break;
                }
            }
            () = sleep, if !stopping => {}
        }
        if rewinding && outstanding == 0 {
            // Every report of the lost connection is in: start again at the first message
            // the broker did not acknowledge.
            while sent.front().is_some_and(|s| s.acked) {
                sent.pop_front();
            }
            let from = sent.front().map_or(cursor, |s| s.seq).max(cursor);
            resend_until = resend_until.max(handed_end);
            if from > cursor {
                cursor = from;
                shared.lock().set_cursor(index, cursor);
            }
            sent.clear();
            pending.clear();
            pos = shared.lock().reader(index);
            rewinding = false;
            reset_requested = false;
            tracing::debug!(upstream = %name, from = pos.next_seq(), "Spool drain resumes after a connection loss.");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::disallowed_methods)]
    use super::*;

    #[test]
    fn the_bucket_allows_a_one_second_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100.0, t0);
        for _ in 0..100 {
            assert!(b.take(1.0, t0).is_ok());
        }
        // Empty: the next token comes in 10 ms.
        let wait = b.take(1.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.01).abs() < 1e-6, "{wait:?}");
        // Half a second refills 50, never more than one second's worth.
        let t1 = t0 + Duration::from_millis(500);
        for _ in 0..50 {
            assert!(b.take(1.0, t1).is_ok());
        }
        assert!(b.take(1.0, t1).is_err());
        let t2 = t1 + Duration::from_secs(10);
        for _ in 0..100 {
            assert!(b.take(1.0, t2).is_ok());
        }
        assert!(b.take(1.0, t2).is_err());
    }

    #[test]
    fn the_bucket_passes_an_item_larger_than_the_rate_after_waiting() {
        // A byte budget of 100/s and a 250-byte message: it goes once 250 tokens are there,
        // not never.
        let t0 = Instant::now();
        let mut b = Bucket::new(100.0, t0);
        let wait = b.take(250.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 1.5).abs() < 1e-6, "{wait:?}");
        assert!(b.take(250.0, t0 + wait).is_ok());
        assert!(b.take(1.0, t0 + wait).is_err());
    }

    #[test]
    fn a_refusal_by_one_limit_takes_nothing_from_the_other() {
        let t0 = Instant::now();
        let mut msgs = Some(Bucket::new(10.0, t0));
        let mut bytes = Some(Bucket::new(100.0, t0));
        // 150 bytes: the byte limit refuses for 0.5 s; the message token stays.
        let wait = take_limits(&mut msgs, &mut bytes, 150.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!((msgs.as_ref().unwrap().tokens - 10.0).abs() < 1e-9);
        take_limits(&mut msgs, &mut bytes, 150.0, t0 + wait).unwrap();
        assert!((msgs.as_ref().unwrap().tokens - 9.0).abs() < 1e-9);
        // Without limits everything passes.
        take_limits(&mut None, &mut None, 1e12, t0).unwrap();
    }
}
