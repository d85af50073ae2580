//! The threads around the [`Spool`]: one writer thread that appends, writes and syncs in
//! groups and answers the senders (with a syncer thread for the fsyncs nobody waits for:
//! groups of QoS 0 only, synced after [`UNACKED_SYNC_DELAY`] or [`UNACKED_SYNC_BYTES`]), and
//! one drain task per upstream that forwards in order and moves the upstream's cursor on the
//! broker's acknowledgements.
//!
//! # The drain task
//!
//! A drain at the spool's written end takes the newest records from the tail in memory
//! ([`Spool::read_tail`], `spool/tail.rs`): what the writer just wrote, with no file read and
//! no hop to a blocking thread. Behind the tail (a backlog after an outage or a restart, or a
//! burst larger than `memory_tail`) it reads the disk off the runtime, and switches back once
//! it has caught up; both give the same records and positions (`tail_tests.rs`).
//!
//! [`drain`] is a thin task around the sans-IO [`Drain`] (`upstream/drain.rs`), which makes
//! every decision. The task performs its actions, then sleeps until the machine's timer or
//! an event. It MUST NOT sleep with work pending: whatever stops the machine from sending
//! either arms its timer or names the event that ends the wait ([`Drain::waiting_for`]; the
//! model tests in `upstream/drain/tests.rs` check this after every input). The pairs
//! (`tests/spool_drain.rs` covers each one but the failed read against a real broker):
//!
//! - **The window is full** (`window` QoS >= 1 messages unacknowledged): every one of them
//!   gets exactly one report on the `acks` channel (acknowledged, refused, or failed when its
//!   connection is lost), and the ack timeout is armed for the oldest. A report frees the
//!   acknowledged slots at once, since that report may be the last event for a while. QoS 0
//!   messages take no slot: nothing would ever free it. They are settled once the client's
//!   request queue took them, and that queue (`request_queue`) bounds them instead.
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
//! - **The budget is spent** ([`SENDS_PER_BATCH`] messages, bounded work per wake): an
//!   immediate timer, after yielding to the runtime.
//! - **Rewinding after a lost connection**: the remaining reports of that connection; the
//!   last one rewinds the read position to the first unacknowledged message.
//! - **The backlog cap** (`max_backlog` set): a check after every append (the `written`
//!   watch wakes the drain, link up or down) and a timer ([`BACKLOG_CHECK`]) for the age
//!   limit.
//! - **Shutdown**: the drain stops sending, waits only for the reports of what is in flight,
//!   and ends.
//!
//! Besides, the task wakes at least every [`BEAT_IDLE`] to beat ([`DrainStats::beat`], read by
//! the health check); that wake is not a machine input unless the machine's own timer is
//! due. After each turn it stores the tracked sends in flight ([`DrainStats::in_flight`]).
//!
//! [`FailReason::QueueFull`]: crate::upstream::FailReason::QueueFull
//! [`QUEUE_FULL_RETRY`]: crate::upstream::drain::QUEUE_FULL_RETRY
//! [`READ_RETRY`]: crate::upstream::drain::READ_RETRY
//! [`BACKLOG_CHECK`]: crate::upstream::drain::BACKLOG_CHECK
//! [`SENDS_PER_BATCH`]: crate::upstream::drain::SENDS_PER_BATCH

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
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
use crate::route::SharedRoutes;
use crate::telemetry::{BEAT_IDLE, Beat, Histogram};
use crate::upstream::drain::{Action, Drain, DrainConfig, DrainStats, READ_BATCH};
use crate::upstream::{AckReport, Upstream};

/// Most appends taken into one group commit.
const MAX_GROUP: usize = 8192;

/// How often the writer saves the cursors and checks the free disk space.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

// The writer beats in its housekeeping, which an idle writer reaches every HOUSEKEEPING.
const _: () = assert!(HOUSEKEEPING.as_millis() < BEAT_IDLE.as_millis());

/// With `fsync = "always"`, how long a group that holds no QoS >= 1 message (nobody waits
/// for its fsync) may stay written but unsynced: it is synced with the next group that
/// needs one, or after this. QoS 0 carries no durability promise, and an fsync per QoS 0
/// group would cost the flash a rewrite of the same page per group.
const UNACKED_SYNC_DELAY: Duration = Duration::from_secs(1);

/// ... or once this many message bytes wait for it. Such fsyncs run on their own thread
/// (`spool-syncer`), so that nobody's appends wait for an fsync nobody waits for.
const UNACKED_SYNC_BYTES: usize = 1 << 20;

/// The spool shared by the writer thread and the drain tasks. Critical sections are short:
/// encoding a group, one `pwrite`, one read of at most 256 KiB; fsyncs run outside the lock.
pub struct SharedSpool<F: Fs> {
    spool: Mutex<Spool<F>>,
    /// The last sequence id written; changes wake the drains.
    written: watch::Sender<u64>,
    /// Appends refused because the writer's queue was full (shared with the appenders).
    queue_full: Arc<AtomicU64>,
    /// Durations of the successful data fsyncs the writer and the syncer run.
    fsync_latency: Histogram,
    /// The writer thread's loop.
    writer_beat: Beat,
}

impl<F: Fs> SharedSpool<F> {
    /// Wraps an opened spool.
    pub fn new(spool: Spool<F>) -> Arc<Self> {
        let written = watch::Sender::new(spool.written_seq());
        Arc::new(Self {
            spool: Mutex::new(spool),
            written,
            queue_full: Arc::default(),
            fsync_latency: Histogram::default(),
            writer_beat: Beat::new(),
        })
    }

    /// How long each successful data fsync took: every group commit's, and the deferred
    /// ones (`spool-syncer`, housekeeping, shutdown). Not timed: the rare fsync of a
    /// segment sealed at rotation while its last write was unsynced (it runs inside
    /// [`Spool::write`], which reads no clock) — counted in [`SpoolStats::syncs`] all the
    /// same, so `syncs` may exceed this count by those.
    #[must_use]
    pub fn fsync_latency(&self) -> &Histogram {
        &self.fsync_latency
    }

    /// The writer thread's loop: it beats every turn, and at least every [`BEAT_IDLE`]
    /// when no append comes.
    #[must_use]
    pub fn writer_beat(&self) -> &Beat {
        &self.writer_beat
    }

    /// Runs `pending`'s fsync (without the lock), times it if it succeeded, and reports it
    /// to the spool.
    fn sync(&self, pending: &super::log::Pending<F::File>) -> std::io::Result<()> {
        #[allow(clippy::disallowed_methods)] // An adapter timing the fsync it runs.
        let start = Instant::now();
        let result = pending.run();
        if result.is_ok() {
            self.fsync_latency.observe(start.elapsed());
        }
        self.lock().synced(pending, &result);
        result
    }

    /// Appends refused because the writer's queue was full (or the writer stopped). A
    /// refusal is not a loss: the MQTT-SN driver holds a refused message and appends it
    /// again once the writer has room (each refused retry counts again), so a count here
    /// says the queue was full and the driver paused its reads; what it gave up is its own
    /// counter (`queue_dropped`).
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

/// Tells appenders refused for a full queue that the writer has taken from it since: a count
/// of the groups taken (and of the writer's end), and the waiters on it.
#[derive(Debug, Default)]
struct Room {
    taken: AtomicU64,
    notify: tokio::sync::Notify,
}

impl Room {
    /// The writer took appends from the queue (or stopped): wakes every waiter.
    fn signal(&self) {
        self.taken.fetch_add(1, Release);
        self.notify.notify_waiters();
    }
}

/// Signals [`Room`] when the writer thread ends however it ends (a panic included), so no
/// appender waits for room that never comes.
struct SignalOnDrop(Arc<Room>);

impl Drop for SignalOnDrop {
    fn drop(&mut self) {
        self.0.signal();
    }
}

/// The writer thread's entrance, from which each ingress takes its own
/// [`IngressAppender`]. Cheap to clone; the thread stops once every clone of it and of the
/// ingress appenders is dropped (after writing and syncing what it has).
#[derive(Clone, Debug)]
pub struct Appender {
    tx: SyncSender<Append>,
    queue_full: Arc<AtomicU64>,
    room: Arc<Room>,
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
            room: Arc::clone(&self.room),
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
    room: Arc<Room>,
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

    /// A mark of the writer's progress, for [`Self::room_since`]: take it before an
    /// [`Self::append`] that may be refused, so a take between the two is not missed.
    #[must_use]
    pub fn room_mark(&self) -> u64 {
        self.room.taken.load(Acquire)
    }

    /// Resolves once the writer has taken appends from its queue since `mark` was taken
    /// (there is room again), or has stopped. Waits without polling: the writer wakes it.
    pub async fn room_since(&self, mark: u64) {
        loop {
            let notified = self.room.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a signal between the two still wakes it.
            notified.as_mut().enable();
            if self.room.taken.load(Acquire) != mark {
                return;
            }
            notified.await;
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
    start_writer_with(shared, queue, UNACKED_SYNC_DELAY)
}

/// [`start_writer`] with another [`UNACKED_SYNC_DELAY`] (tests).
pub(crate) fn start_writer_with<F: Fs>(
    shared: Arc<SharedSpool<F>>,
    queue: usize,
    unacked_sync_delay: Duration,
) -> std::io::Result<(Appender, JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel(queue);
    let queue_full = Arc::clone(&shared.queue_full);
    let room = Arc::new(Room::default());
    let signal = SignalOnDrop(Arc::clone(&room));
    let handle = std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || {
            let signal = signal;
            Writer::new(shared, unacked_sync_delay).run(&rx, &signal.0);
        })?;
    Ok((
        Appender {
            tx,
            queue_full,
            room,
        },
        handle,
    ))
}

/// The verdicts of one group commit, one batch per ingress: those refused before the write
/// (the spool full) first, then the written ones in the order each ingress appended them.
/// Each token gets exactly one verdict; nothing orders verdicts across tokens.
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
    /// Written but not synced: the interval policy's writes, and with `always` a group
    /// nobody waits for (QoS 0 only), since `unsynced_at`.
    unsynced: Option<super::log::Pending<F::File>>,
    unsynced_at: Instant,
    /// Message bytes (topic and payload) in the deferred groups.
    unsynced_bytes: usize,
    /// The thread that runs the deferred fsyncs (one at a time), while it runs.
    syncer: Option<SyncSender<super::log::Pending<F::File>>>,
    unacked_sync_delay: Duration,
    last_sync: Instant,
    last_housekeeping: Instant,
    /// A disk error is ongoing (logged once per episode).
    failing: bool,
}

impl<F: Fs> Writer<F> {
    #[allow(clippy::disallowed_methods)]
    fn new(shared: Arc<SharedSpool<F>>, unacked_sync_delay: Duration) -> Self {
        let policy = shared.lock().config().fsync;
        Self {
            shared,
            policy,
            unsynced: None,
            unsynced_at: Instant::now(),
            unsynced_bytes: 0,
            syncer: None,
            unacked_sync_delay,
            last_sync: Instant::now(),
            last_housekeeping: Instant::now(),
            failing: false,
        }
    }

    #[allow(clippy::disallowed_methods)]
    fn run(mut self, rx: &Receiver<Append>, room: &Room) {
        self.shared.lock().check_disk();
        let syncer = self.start_syncer();
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
                // The queue has room now: appenders paused on a full one read again while
                // this group is written.
                room.signal();
                // Durable before told: the verdicts go out only after the group's write
                // and (per policy) its fsync, one fsync for every ingress in the group.
                self.commit(&mut group).send();
            }
            self.housekeeping(false);
        }
        self.housekeeping(true);
        // The syncer finishes what it was given, then ends.
        self.syncer = None;
        if let Some(handle) = syncer {
            let _ = handle.join();
        }
    }

    /// Starts the syncer thread (`fsync = "always"` only); without it (the OS refused a
    /// thread) the writer runs the deferred fsyncs itself.
    fn start_syncer(&mut self) -> Option<JoinHandle<()>> {
        if self.policy != FsyncPolicy::Always {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<super::log::Pending<F::File>>(1);
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new()
            .name("spool-syncer".into())
            .spawn(move || {
                for pending in rx {
                    if let Err(error) = shared.sync(&pending) {
                        // Counted (sync_errors) and the segment sealed by `synced`; the
                        // writer logs the disk error episode with the next acknowledged group.
                        tracing::debug!(%error, "Deferred spool fsync failed.");
                    }
                }
            });
        match spawned {
            Ok(handle) => {
                self.syncer = Some(tx);
                Some(handle)
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot start the spool syncer thread; the writer syncs by itself.");
                None
            }
        }
    }

    /// Appends, writes and (per policy) syncs one group; returns the verdicts per ingress.
    #[allow(clippy::disallowed_methods)]
    fn commit(&mut self, group: &mut Vec<Append>) -> Verdicts {
        let now_ms = wall_ms();
        let mut verdicts = Verdicts::default();
        let mut stored = Vec::new();
        let mut group_bytes = 0;
        let written = {
            let mut spool = self.shared.lock();
            for a in group.drain(..) {
                group_bytes += a.message.topic.len() + a.message.payload.len();
                let ok = spool.append_owned(now_ms, a.message).is_ok();
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
            (spool.write(), spool.written_seq())
        };
        let (written, written_seq) = written;
        let durable = match written {
            Ok(None) => true,
            Ok(Some(pending)) => match self.policy {
                // Nobody waits for this group's fsync (QoS 0 only): deferred, see
                // UNACKED_SYNC_DELAY.
                FsyncPolicy::Always if stored.is_empty() => {
                    if self.unsynced.is_none() {
                        self.unsynced_at = Instant::now();
                    }
                    self.unsynced = Some(pending);
                    self.unsynced_bytes += group_bytes;
                    if self.unsynced_bytes >= UNACKED_SYNC_BYTES {
                        self.hand_off_sync();
                    }
                    self.health(None, "write");
                    true
                }
                FsyncPolicy::Always => {
                    let result = self.shared.sync(&pending);
                    self.health(result.as_ref().err(), "fsync");
                    // It covered a deferred group too: the same file up to a later end, or
                    // an older segment, synced when it was sealed.
                    self.unsynced = None;
                    self.unsynced_bytes = 0;
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
        // The drains hear of the group once its fsync (if any) has run, together with the
        // verdicts: one wake of the runtime per group instead of two. (A drain awake for
        // another reason may take the records from the tail before: they are written, and a
        // crash before the fsync can only cause a duplicate, as the sender resends.)
        self.shared
            .written
            .send_if_modified(|w| std::mem::replace(w, written_seq) != written_seq);
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

    /// Hands the deferred fsync (`fsync = "always"`, groups nobody waits for) to the syncer
    /// thread; if it is still busy with the previous one, the fsync stays deferred and is
    /// handed over at the next chance.
    fn hand_off_sync(&mut self) {
        let Some(pending) = self.unsynced.take() else {
            return;
        };
        let sent = match self.syncer.as_ref() {
            Some(syncer) => syncer.try_send(pending),
            None => Err(TrySendError::Disconnected(pending)),
        };
        match sent {
            Ok(()) => {
                self.unsynced_bytes = 0;
            }
            Err(TrySendError::Full(pending)) => self.unsynced = Some(pending),
            Err(TrySendError::Disconnected(pending)) => {
                let result = self.shared.sync(&pending);
                self.health(result.as_ref().err(), "fsync");
                self.unsynced_bytes = 0;
            }
        }
    }

    #[allow(clippy::disallowed_methods)]
    fn housekeeping(&mut self, last: bool) {
        let now = Instant::now();
        // Every turn of the writer's loop ends here, and an idle one turns every
        // HOUSEKEEPING (< BEAT_IDLE): the beat costs no clock read of its own.
        self.shared.writer_beat.beat(now);
        if !last
            && self.policy == FsyncPolicy::Always
            && self.unsynced.is_some()
            && now.duration_since(self.unsynced_at) >= self.unacked_sync_delay
        {
            self.hand_off_sync();
        }
        let due = match self.policy {
            FsyncPolicy::Interval(interval) => now.duration_since(self.last_sync) >= interval,
            FsyncPolicy::Always => false,
        };
        if last || due {
            self.last_sync = now;
            self.unsynced_bytes = 0;
            if let Some(pending) = self.unsynced.take() {
                let result = self.shared.sync(&pending);
                self.health(result.as_ref().err(), "fsync");
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

/// Forwards the spool to `upstream` (index `index`) in order until `shutdown`: the thin task
/// around [`Drain`], which decides everything (the window, the rate, the cursor, the ack
/// timeout, the rewind after a connection loss); this task reads the spool off the runtime,
/// publishes, and sleeps until the machine's timer or an event (a report on `acks`, a write
/// to the spool, the link watch, shutdown). `acks` must be the report channel given to this
/// upstream only.
#[allow(clippy::too_many_arguments)] // each is a separate resource of the task
pub async fn drain<F: Fs, U: Upstream>(
    shared: Arc<SharedSpool<F>>,
    index: usize,
    upstream: U,
    acks: mpsc::Receiver<AckReport>,
    config: DrainConfig,
    routes: SharedRoutes,
    stats: Arc<DrainStats>,
    shutdown: CancellationToken,
) {
    let (_fixed, control) = watch::channel(config);
    drain_with_control(
        shared, index, upstream, acks, control, routes, stats, shutdown,
    )
    .await;
}

/// [`drain`] whose settings follow `control` (a reload sends new ones: see
/// [`Drain::set_config`]; the window stays the upstream's `max_inflight`).
#[allow(clippy::too_many_arguments)] // each is a separate resource of the task
pub async fn drain_with_control<F: Fs, U: Upstream>(
    shared: Arc<SharedSpool<F>>,
    index: usize,
    upstream: U,
    mut acks: mpsc::Receiver<AckReport>,
    mut control: watch::Receiver<DrainConfig>,
    routes: SharedRoutes,
    stats: Arc<DrainStats>,
    shutdown: CancellationToken,
) {
    let config = *control.borrow_and_update();
    let mut control_open = true;
    let name = upstream.name().to_owned();
    let mut limit = config.max_backlog;
    let mut pos = shared.lock().reader(index);
    let mut chunks = Chunks::default();
    let mut written = shared.written.subscribe();
    let mut link = upstream.watch_link();
    let mut machine = Drain::new(
        name.clone(),
        config,
        Arc::clone(&stats),
        pos.next_seq(),
        clock(),
    )
    .with_routes(index, routes);
    machine.handle_link(*link.borrow_and_update());
    let mut reports = Vec::new();
    let mut stopping = false;
    let mut timer = std::pin::pin!(tokio::time::sleep_until(clock().into()));
    let mut timer_at = None;
    // When an idle task wakes anyway, to beat: moved on only once passed (at most once per
    // BEAT_IDLE), so the timer is not re-registered every turn.
    let mut idle_due = clock() + BEAT_IDLE;
    loop {
        if !stopping && shutdown.is_cancelled() {
            stopping = true;
            machine.handle_shutdown();
        }
        let mut now = clock();
        stats.beat.beat(now);
        if idle_due <= now {
            idle_due = now + BEAT_IDLE;
        }
        while let Some(action) = machine.poll_action(now) {
            match action {
                Action::Send {
                    seq,
                    tracked,
                    message,
                } => {
                    let result =
                        upstream.publish_with_seq(message, tracked.then_some(seq), Some(seq));
                    machine.handle_publish(now, result);
                }
                Action::Read => {
                    // Marked seen before the read, so a write racing with it wakes the drain.
                    written.borrow_and_update();
                    // The fast path: a drain at the written end takes the newest records
                    // from memory, on this task (a short lock, no file read).
                    let mut out = Vec::new();
                    if shared
                        .lock()
                        .read_tail(&mut pos, READ_BATCH, wall_ms(), &mut out)
                    {
                        machine.handle_records(now, Ok(out), pos.next_seq());
                        continue;
                    }
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
                    let (read, out) = match job.await {
                        Ok((read, p, c, out)) => {
                            pos = p;
                            chunks = c;
                            (read, out)
                        }
                        Err(error) => (Err(std::io::Error::other(error)), Vec::new()),
                    };
                    // A cold read may take a while: send times count from after it.
                    now = clock();
                    let records = match read {
                        Ok(()) => Ok(out),
                        Err(error) => {
                            tracing::warn!(upstream = %name, %error, "Spool read failed; retrying.");
                            Err(out)
                        }
                    };
                    machine.handle_records(now, records, pos.next_seq());
                }
                Action::SetCursor(seq) => shared.lock().set_cursor(index, seq),
                Action::CheckBacklog => {
                    let check = shared.lock().check_backlog(index, limit, wall_ms());
                    machine.handle_backlog(now, check);
                }
                Action::Rewind => pos = shared.lock().reader(index),
                Action::ResetLink => upstream.reset_link(),
                Action::Done => {
                    stats.in_flight.store(0, Relaxed);
                    return;
                }
            }
        }
        stats.in_flight.store(
            u64::try_from(machine.outstanding()).unwrap_or(u64::MAX),
            Relaxed,
        );
        let wake = machine.poll_timeout();
        // Idle, the task still wakes every BEAT_IDLE to beat (the health check tells a
        // stuck drain from an idle one); the machine only hears of its own timer.
        let at = wake.map_or(idle_due, |w| w.min(idle_due));
        // One timer for the task's life, moved only when the deadline changes: registering
        // a fresh one each turn would wake the runtime's driver every time.
        if timer_at != Some(at) {
            timer.as_mut().reset(at.into());
            timer_at = Some(at);
        }
        let sleep = async {
            if at <= clock() {
                // Work is ready now: let the runtime's other tasks run first.
                tokio::task::yield_now().await;
            } else {
                timer.as_mut().await;
            }
        };
        tokio::select! {
            () = shutdown.cancelled(), if !stopping => {}
            n = acks.recv_many(&mut reports, 256) => {
                if n == 0 {
                    break;
                }
                // One clock read per batch of reports, for the ack latency.
                let now = clock();
                for report in reports.drain(..) {
                    machine.handle_ack(now, report);
                }
            }
            r = written.changed(), if !stopping => {
                if r.is_err() {
                    break;
                }
                machine.handle_appended();
            }
            r = link.changed(), if !stopping => {
                if r.is_err() {
                    break;
                }
                machine.handle_link(*link.borrow_and_update());
            }
            r = control.changed(), if control_open && !stopping => match r {
                // Nobody can change the settings any more: they stay.
                Err(_) => control_open = false,
                Ok(()) => {
                    let config = *control.borrow_and_update();
                    limit = config.max_backlog;
                    machine.set_config(clock(), config);
                    tracing::info!(upstream = %name, "Upstream drain settings changed.");
                }
            },
            () = sleep, if !stopping => {
                let now = clock();
                if wake.is_some_and(|w| w <= now) {
                    machine.handle_timeout(now);
                }
            }
        }
    }
}

/// The drain task's clock: the one place the drain reads it.
fn clock() -> Instant {
    #[allow(clippy::disallowed_methods)] // The thin adapter is where the clock is read.
    Instant::now()
}
