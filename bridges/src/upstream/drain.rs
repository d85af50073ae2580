//! The drain of one upstream as a sans-IO state machine: it decides what to send, when to read
//! the spool, where the cursor goes and when to give up on a silent peer; a thin task
//! (`spool::drain`) does the reading, sending and sleeping.
//!
//! # Call order
//!
//! ```text
//!  new(cursor), handle_link(up)
//!    loop:
//!      while let Some(action) = poll_action(now):
//!        Send      -> publish; handle_publish(now, result) before the next poll
//!        Read      -> read the spool; handle_records(now, records, next_seq)
//!        SetCursor -> save the upstream's cursor
//!        CheckBacklog -> measure the backlog behind the cursor; handle_backlog(now, check)
//!                     before the next poll
//!        Rewind    -> read again from the cursor (after a lost connection)
//!        ResetLink -> drop the upstream's link (ack timeout)
//!        Done      -> stop
//!      sleep until poll_timeout() or an event, then one of:
//!        handle_ack / handle_link / handle_appended / handle_timeout(now) / handle_shutdown
//! ```
//!
//! Time is always passed in; nothing here reads a clock, sleeps or touches the spool.
//!
//! # Invariants (MUST hold; `tests` checks them against a model under a virtual clock)
//!
//! - **Never idle with work pending.** After every input, once `poll_action` returns `None`,
//!   either [`Drain::poll_timeout`] is `Some` (rate limit, full request queue, failed read,
//!   spent budget, ack timeout) or [`Drain::waiting_for`] names the event that ends the wait
//!   ([`Wait::Ack`]: a report is outstanding; [`Wait::Link`]: the link is down;
//!   [`Wait::Append`]: the spool has nothing more; [`Wait::Read`]: a read is under way).
//! - **The cursor never passes an unsettled record**: it moves only over records that are
//!   acknowledged or refused for good (QoS >= 1), taken by the upstream (QoS 0), not routed
//!   to this upstream (skipped at read, counted once in `unrouted`), or given up by the
//!   backlog cap (`max_backlog`, counted in `backlog_dropped`). A report of a send the cap
//!   gave up (its sequence id is below the cursor) only frees its slot.
//! - **Routing**: each record read goes through the route table ([`Drain::with_routes`]); a
//!   targeted one is sent with the target's topic and QoS, an unrouted one holds nothing up.
//! - **Backlog cap**: while `max_backlog` is set, the backlog is checked
//!   ([`Action::CheckBacklog`]) after every append and every [`BACKLOG_CHECK`], link up or
//!   down; an upstream under its cap is never affected.
//! - **Order**: first sends follow log order; after a lost connection everything from the
//!   first unacknowledged record is sent again, in order (counted in `resent`).
//! - **Bounded**: at most `window` QoS >= 1 records unacknowledged (QoS 0 take no slot:
//!   nothing would ever free it; the upstream's request queue bounds them), at most
//!   [`SENDS_PER_BATCH`] sends before the caller gets a turn, and the token buckets'
//!   rate.
//! - **Shutdown** sends nothing new and ends once every tracked send has its report.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::{AckReport, Delivery, FailReason};
use crate::message::Message;
use crate::route::{RouteTable, SharedRoutes};
use crate::spool::Record;
use crate::telemetry::{Beat, Histogram};

/// Records one spool read returns at most (what [`Action::Read`] asks for).
pub const READ_BATCH: usize = 512;

/// Sends in a row before the machine gives the caller a turn (an immediate timeout), so acks,
/// the link and shutdown are looked at again: bounded work per wake.
pub const SENDS_PER_BATCH: usize = READ_BATCH;

/// How long to wait before retrying when the upstream's request queue is full (nothing
/// signals room).
pub const QUEUE_FULL_RETRY: Duration = Duration::from_millis(2);

/// How long the drain waits before sending again after the peer refused a message for now
/// ([`FailReason::BrokerBusy`]: quota exceeded and the like), so a busy broker is not asked
/// again at once, round trip after round trip.
pub const BROKER_BUSY_RETRY: Duration = Duration::from_secs(1);

/// How long to wait before retrying a failed spool read.
pub const READ_RETRY: Duration = Duration::from_millis(100);

/// How often the backlog is checked against `max_backlog` besides after every append (the
/// age limit passes without appends).
pub const BACKLOG_CHECK: Duration = Duration::from_secs(1);

/// The spool's answer to [`Action::CheckBacklog`] (`Spool::check_backlog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BacklogCheck {
    /// The backlog is over the cap: move the cursor to this sequence id, giving up `records`
    /// records (whole segments).
    pub give_up: Option<GiveUp>,
    /// The upstream has caught up: its backlog lies within the newest segment (ends the
    /// over-cap state).
    pub caught_up: bool,
}

/// Records given up by the backlog cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveUp {
    /// The new cursor.
    pub to: u64,
    /// Records between the old cursor and `to`.
    pub records: u64,
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
    /// The most this upstream may fall behind; past it, its oldest records are given up
    /// (counted), so a dead upstream cannot fill the disk and stop the others.
    pub max_backlog: BacklogLimit,
}

/// How far one upstream may fall behind (`max_backlog`); `None` is unbounded (only the
/// spool's own limits apply). Past either limit the upstream's oldest whole segments are
/// given up: its cursor moves past them (counted in [`DrainStats::backlog_dropped`]), so
/// the spool deletes them once the other upstreams passed them too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BacklogLimit {
    /// Bytes of spool segments holding records at or after the upstream's cursor, at most
    /// (the newest segment is never given up for bytes: the backlog may exceed this by up to
    /// one segment).
    pub bytes: Option<u64>,
    /// Age of the records behind the cursor, at most: a segment whose newest record is older
    /// is given up.
    pub age: Option<Duration>,
}

impl BacklogLimit {
    /// Whether any limit is set.
    #[must_use]
    pub const fn is_set(&self) -> bool {
        self.bytes.is_some() || self.age.is_some()
    }
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
    /// Records no route sends to this upstream: passed over by its cursor, unsent.
    pub unrouted: AtomicU64,
    /// Records this upstream gave up because its backlog was over `max_backlog`: lost for
    /// this upstream only.
    pub backlog_dropped: AtomicU64,
    /// Tracked (QoS >= 1) sends without their report yet: a gauge the drain task stores
    /// after each turn.
    pub in_flight: AtomicU64,
    /// From a tracked send to the peer's acknowledgement (acknowledged sends only, not
    /// refusals or failures), measured by [`Drain`] from the `now` of the send's turn to the
    /// `now` given with the report, so it may read up to one turn of the task long.
    pub ack_latency: Histogram,
    /// The drain task's loop: it beats every turn, and at least every
    /// [`BEAT_IDLE`](crate::telemetry::BEAT_IDLE) when idle.
    pub beat: Beat,
}

/// What the caller must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish this (with `token = Some(seq)` when `tracked`, and the sequence id `seq`), then
    /// call [`Drain::handle_publish`] with the result before polling again.
    Send {
        /// The spool's sequence id.
        seq: u64,
        /// Whether a report must follow (QoS >= 1).
        tracked: bool,
        /// The message.
        message: Message,
    },
    /// Read up to [`READ_BATCH`] records from the read position, then call
    /// [`Drain::handle_records`].
    Read,
    /// Move the upstream's cursor to this sequence id (everything below is settled).
    SetCursor(u64),
    /// Check the backlog behind the cursor against `max_backlog`, then call
    /// [`Drain::handle_backlog`] before polling again.
    CheckBacklog,
    /// Drop the read position and read again from the cursor (after a lost connection).
    Rewind,
    /// The upstream did not acknowledge in time: reset its link.
    ResetLink,
    /// Shutdown is complete: stop.
    Done,
}

/// The event an idle drain waits for (see [`Drain::waiting_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// A report of a tracked send: the window is full, a lost (or reset) connection's reports
    /// are still coming, or shutdown waits for them.
    Ack,
    /// The link to come up.
    Link,
    /// A record to be appended to the spool.
    Append,
    /// The answer to an [`Action::Read`].
    Read,
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
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(n));
        self.at = self.at.max(now);
        // A little slack, and waits rounded up to whole microseconds: float rounding must not
        // leave a wait of zero that never fills the bucket (a spin under a virtual clock).
        if self.tokens >= n - 1e-9 {
            Ok(())
        } else {
            let micros = ((n - self.tokens) / self.rate * 1e6).ceil();
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Positive, small.
            Err(Duration::from_micros(micros as u64))
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

/// One QoS >= 1 message sent upstream and not yet moved over by the cursor.
#[derive(Debug)]
struct Sent {
    seq: u64,
    acked: bool,
    at: Instant,
}

/// A wait that ends at an instant.
fn blocked(until: Option<Instant>, now: Instant) -> bool {
    until.is_some_and(|u| now < u)
}

/// The drain of one upstream. See the module docs for the call order and the invariants.
#[derive(Debug)]
pub struct Drain {
    /// For logs.
    name: String,
    config: DrainConfig,
    stats: Arc<DrainStats>,
    /// The cursor as last set: every record below it is settled.
    cursor: u64,
    /// The next sequence id the spool's read position would return (after the last read).
    read_next: u64,
    /// Read ahead and not yet sent, in log order.
    pending: VecDeque<Record>,
    /// Tracked sends in log order, from the first one not moved over by the cursor.
    sent: VecDeque<Sent>,
    /// Tracked sends whose report has not come yet (across a lost connection too).
    outstanding: usize,
    /// A report said a connection was lost: nothing is sent until every report is in, then
    /// the drain reads again from the first unacknowledged record.
    rewinding: bool,
    /// A reset for an ack timeout was asked for and the rewind it causes has not happened.
    reset_requested: bool,
    /// Sends below this sequence id are resends (counted).
    resend_until: u64,
    /// One past the last sequence id the upstream took (any QoS), for `resend_until`.
    handed_end: u64,
    /// The link watch's last value.
    link_up: bool,
    /// A publish was refused because the link is down, though the watch may not say so yet:
    /// wait for an event.
    link_refused: bool,
    /// Shutdown began.
    stopping: bool,
    /// An [`Action::Read`] is unanswered.
    reading: bool,
    /// An [`Action::Send`] is unanswered (the record is still `pending`'s front).
    sending: bool,
    /// The last read returned nothing: the spool has nothing more until an append.
    spool_empty: bool,
    /// Rewinds to hand out ([`Action::SetCursor`] before [`Action::Rewind`]).
    queued: VecDeque<Action>,
    /// Sends left before the caller gets a turn.
    budget: usize,
    /// When the budget ran out (an immediate timeout).
    yield_at: Option<Instant>,
    rate_until: Option<Instant>,
    queue_full_until: Option<Instant>,
    read_retry_until: Option<Instant>,
    /// A report said the peer refused a message for now; [`Self::poll_action`] turns it into
    /// `busy_until`, counted from that poll.
    busy_pending: bool,
    busy_until: Option<Instant>,
    msgs: Option<Bucket>,
    bytes: Option<Bucket>,
    done: bool,
    /// This upstream's index in the route table, and the table (live: a reload swaps it,
    /// and records read from then on follow the new one).
    upstream: usize,
    routes: SharedRoutes,
    /// Records from here on have not been counted in `unrouted` yet (a rewind reads them
    /// again).
    unrouted_from: u64,
    /// When the backlog is checked next (`max_backlog` set).
    backlog_due: Option<Instant>,
    /// An append asked for a check; [`Self::poll_action`] turns it into `backlog_due`.
    backlog_recheck: bool,
    /// An [`Action::CheckBacklog`] is unanswered.
    checking: bool,
    /// Records are being given up (logged when it starts and ends).
    over_cap: bool,
}

impl Drain {
    /// A drain starting at `cursor` (the upstream's saved cursor), with the link down until
    /// [`Self::handle_link`] says otherwise.
    #[must_use]
    pub fn new(
        name: impl Into<String>,
        config: DrainConfig,
        stats: Arc<DrainStats>,
        cursor: u64,
        now: Instant,
    ) -> Self {
        Self {
            name: name.into(),
            config,
            stats,
            cursor,
            read_next: cursor,
            pending: VecDeque::new(),
            sent: VecDeque::new(),
            outstanding: 0,
            rewinding: false,
            reset_requested: false,
            resend_until: 0,
            handed_end: 0,
            link_up: false,
            link_refused: false,
            stopping: false,
            reading: false,
            sending: false,
            spool_empty: false,
            queued: VecDeque::new(),
            budget: SENDS_PER_BATCH,
            yield_at: None,
            rate_until: None,
            queue_full_until: None,
            busy_pending: false,
            busy_until: None,
            read_retry_until: None,
            msgs: config.rate_msgs.map(|r| Bucket::new(f64::from(r), now)),
            #[allow(clippy::cast_precision_loss)] // A rate beyond 2^53 bytes/s is unlimited.
            bytes: config.rate_bytes.map(|r| Bucket::new(r as f64, now)),
            done: false,
            upstream: 0,
            routes: SharedRoutes::new(Arc::new(RouteTable::everything())),
            unrouted_from: cursor,
            backlog_due: config.max_backlog.is_set().then_some(now),
            backlog_recheck: false,
            checking: false,
            over_cap: false,
        }
    }

    /// Applies `routes` as upstream `upstream` (its index in the table); without it every
    /// record is sent unchanged. Each read batch is judged by the table in force when it
    /// arrives ([`Self::handle_records`]); records already read keep their verdict.
    #[must_use]
    pub fn with_routes(mut self, upstream: usize, routes: SharedRoutes) -> Self {
        self.upstream = upstream;
        self.routes = routes;
        self
    }

    /// New settings while running (a reload): the rates (token buckets start full again),
    /// `ack_timeout` (for the sends still unacknowledged too) and `max_backlog` (checked at
    /// once when set). The window stays: it is the upstream's `max_inflight`, fixed for its
    /// life.
    pub fn set_config(&mut self, now: Instant, config: DrainConfig) {
        let config = DrainConfig {
            window: self.config.window,
            ..config
        };
        if config.rate_msgs != self.config.rate_msgs {
            self.msgs = config.rate_msgs.map(|r| Bucket::new(f64::from(r), now));
            self.rate_until = None;
        }
        if config.rate_bytes != self.config.rate_bytes {
            #[allow(clippy::cast_precision_loss)] // As in `new`.
            let bytes = config.rate_bytes.map(|r| Bucket::new(r as f64, now));
            self.bytes = bytes;
            self.rate_until = None;
        }
        if config.max_backlog != self.config.max_backlog {
            self.backlog_due = config.max_backlog.is_set().then_some(now);
        }
        self.config = config;
    }

    /// The cursor as last set.
    #[must_use]
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Tracked sends without their report yet.
    #[must_use]
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// A new event: the caller had its turn, so the send budget is whole again.
    fn turn(&mut self) {
        self.budget = SENDS_PER_BATCH;
        self.yield_at = None;
        self.link_refused = false;
    }

    /// The answer to [`Action::Read`]: the records read (in log order), or the read's error
    /// (with what was read before it), and where the read position now stands.
    pub fn handle_records(
        &mut self,
        now: Instant,
        records: Result<Vec<Record>, Vec<Record>>,
        next_seq: u64,
    ) {
        self.reading = false;
        let (records, failed) = match records {
            Ok(r) => (r, false),
            Err(r) => (r, true),
        };
        self.spool_empty = !failed && records.is_empty();
        if failed {
            self.read_retry_until = Some(now + READ_RETRY);
        }
        let mut skipped = 0;
        let routes = self.routes.read();
        for mut r in records {
            if r.seq < self.cursor {
                // Given up by the backlog cap while the read position was behind.
                continue;
            }
            let target = routes.target(self.upstream, &r.topic, r.qos, &r.origin);
            match target {
                Some(t) => {
                    // Only a rewrite allocates: an unchanged topic stays the record's own.
                    let rewritten = match t.topic {
                        std::borrow::Cow::Owned(topic) => Some(topic),
                        std::borrow::Cow::Borrowed(_) => None,
                    };
                    r.qos = t.qos;
                    if let Some(topic) = rewritten {
                        r.topic = topic;
                    }
                    self.pending.push_back(r);
                }
                None => {
                    skipped += 1;
                    if r.seq >= self.unrouted_from {
                        self.unrouted_from = r.seq + 1;
                        self.stats.unrouted.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        // Skipping costs a turn's budget like sending: bounded work per wake.
        if skipped > 0 {
            self.budget = self.budget.saturating_sub(skipped);
            if self.budget == 0 {
                self.yield_at = Some(now);
            }
        }
        self.read_next = next_seq;
    }

    /// The answer to [`Action::CheckBacklog`]. Giving up moves the cursor (handed out as
    /// [`Action::SetCursor`]), drops what was read ahead below it, and forgets the sends in
    /// flight below it (their reports only free their slots).
    pub fn handle_backlog(&mut self, now: Instant, check: BacklogCheck) {
        self.checking = false;
        self.backlog_due = Some(now + BACKLOG_CHECK);
        if let Some(GiveUp { to, records }) = check.give_up.filter(|g| g.to > self.cursor) {
            self.stats.backlog_dropped.fetch_add(records, Relaxed);
            if !self.over_cap {
                self.over_cap = true;
                tracing::warn!(upstream = %self.name, records, to, limit = ?self.config.max_backlog, "Upstream backlog over max_backlog: giving up its oldest records (lost for this upstream only).");
            }
            self.cursor = to;
            self.queued.push_back(Action::SetCursor(to));
            self.pending.retain(|r| r.seq >= to);
            self.sent.retain(|s| s.seq >= to);
            self.unrouted_from = self.unrouted_from.max(to);
            self.read_next = self.read_next.max(to);
        } else if check.caught_up && self.over_cap {
            self.over_cap = false;
            tracing::warn!(upstream = %self.name, dropped = self.stats.backlog_dropped.load(Relaxed), "Upstream backlog back within max_backlog.");
        }
    }

    /// The result of publishing the [`Action::Send`] just polled.
    pub fn handle_publish(&mut self, now: Instant, result: Result<(), FailReason>) {
        if !self.sending {
            return;
        }
        self.sending = false;
        let Some(item) = self.pending.front() else {
            return;
        };
        let seq = item.seq;
        let tracked = item.qos.is_acknowledged();
        match result {
            Ok(()) => {
                if seq < self.resend_until {
                    self.stats.resent.fetch_add(1, Relaxed);
                }
                if tracked {
                    self.outstanding += 1;
                    self.sent.push_back(Sent {
                        seq,
                        acked: false,
                        at: now,
                    });
                } else {
                    // Settled once the client's request queue took it.
                    self.stats.forwarded.fetch_add(1, Relaxed);
                }
            }
            Err(FailReason::Rejected) => {
                self.stats.rejected.fetch_add(1, Relaxed);
                tracing::warn!(upstream = %self.name, seq, topic = %item.topic, "Upstream refuses a spooled message; dropped.");
            }
            Err(FailReason::QueueFull) => {
                // Nothing signals room: look again shortly.
                self.queue_full_until = Some(now + QUEUE_FULL_RETRY);
                return;
            }
            Err(_) => {
                // The link went down (its watch changes) or the upstream stops.
                self.link_refused = true;
                return;
            }
        }
        self.handed_end = seq + 1;
        self.pending.pop_front();
        self.budget = self.budget.saturating_sub(1);
        if self.budget == 0 {
            self.yield_at = Some(now);
        }
    }

    /// One report of a tracked send (`token` is its sequence id), received at `now` (an
    /// acknowledgement's latency is measured from its send to `now`).
    pub fn handle_ack(&mut self, now: Instant, report: AckReport) {
        self.turn();
        self.outstanding = self.outstanding.saturating_sub(1);
        if report.token < self.cursor {
            // Given up by the backlog cap while in flight (only the cap moves the cursor
            // past an unreported send): it only frees its slot.
            if self.rewinding && self.outstanding == 0 {
                self.rewind();
            }
            return;
        }
        let settled = match report.delivery {
            Delivery::Acknowledged => {
                self.stats.forwarded.fetch_add(1, Relaxed);
                true
            }
            Delivery::Failed(FailReason::Rejected) => {
                self.stats.rejected.fetch_add(1, Relaxed);
                tracing::warn!(upstream = %self.name, seq = report.token, "Upstream refused a spooled message; dropped.");
                true
            }
            Delivery::Failed(FailReason::BrokerBusy) => {
                tracing::warn!(upstream = %self.name, seq = report.token, retry = ?BROKER_BUSY_RETRY, "Upstream refused a spooled message for now; sending it again.");
                self.busy_pending = true;
                false
            }
            Delivery::Failed(_) => false,
        };
        if settled {
            if let Ok(i) = self.sent.binary_search_by_key(&report.token, |s| s.seq)
                && let Some(s) = self.sent.get_mut(i)
            {
                if !s.acked && report.delivery.is_acknowledged() {
                    self.stats
                        .ack_latency
                        .observe(now.saturating_duration_since(s.at));
                }
                s.acked = true;
            }
        } else {
            self.rewinding = true;
        }
        // Free the slots of the acknowledged prefix at once: this report may be the last
        // event for a while (a whole window acknowledged, a window of one).
        while self.sent.front().is_some_and(|s| s.acked) {
            self.sent.pop_front();
        }
        if self.rewinding && self.outstanding == 0 {
            self.rewind();
        }
    }

    /// Every report of the lost connection is in: start again at the first record the peer
    /// did not acknowledge.
    fn rewind(&mut self) {
        let from = self
            .sent
            .front()
            .map_or(self.cursor, |s| s.seq)
            .max(self.cursor);
        self.resend_until = self.resend_until.max(self.handed_end);
        if from > self.cursor {
            self.cursor = from;
            self.queued.push_back(Action::SetCursor(from));
        }
        self.queued.push_back(Action::Rewind);
        self.sent.clear();
        self.pending.clear();
        self.read_next = self.cursor;
        self.spool_empty = false;
        self.read_retry_until = None;
        self.rewinding = false;
        self.reset_requested = false;
        tracing::debug!(upstream = %self.name, from = self.cursor, "Spool drain resumes after a connection loss.");
    }

    /// The link watch's value after a change (and once at the start).
    pub fn handle_link(&mut self, up: bool) {
        self.turn();
        self.link_up = up;
    }

    /// Something was appended to the spool since the last [`Action::Read`] was handed out.
    pub fn handle_appended(&mut self) {
        self.turn();
        self.spool_empty = false;
        self.backlog_recheck = self.config.max_backlog.is_set();
    }

    /// The instant of [`Self::poll_timeout`] has come (an early call does nothing harmful).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.turn();
        for until in [
            &mut self.rate_until,
            &mut self.queue_full_until,
            &mut self.read_retry_until,
            &mut self.busy_until,
        ] {
            if until.is_some_and(|u| u <= now) {
                *until = None;
            }
        }
    }

    /// Stop sending; end once every tracked send has its report.
    pub fn handle_shutdown(&mut self) {
        self.turn();
        self.stopping = true;
    }

    /// The next thing to do, if any. Call until `None` after every input.
    #[must_use]
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if self.busy_pending {
            self.busy_pending = false;
            self.busy_until = Some(now + BROKER_BUSY_RETRY);
        }
        if std::mem::take(&mut self.backlog_recheck) {
            self.backlog_due = Some(self.backlog_due.map_or(now, |d| d.min(now)));
        }
        if self.done || self.reading || self.sending || self.checking {
            return None;
        }
        if let Some(a) = self.queued.pop_front() {
            return Some(a);
        }
        if !self.stopping && self.backlog_due.is_some_and(|d| d <= now) {
            self.backlog_due = None;
            self.checking = true;
            return Some(Action::CheckBacklog);
        }
        if let Some(a) = self.poll_send(now) {
            return Some(a);
        }
        // Move the cursor up to the first record not settled.
        let next = self
            .sent
            .front()
            .map(|s| s.seq)
            .or_else(|| self.pending.front().map(|r| r.seq))
            .unwrap_or(self.read_next);
        if next > self.cursor && !self.rewinding {
            self.cursor = next;
            return Some(Action::SetCursor(next));
        }
        // A peer that stopped acknowledging: drop the connection once. Only a live link is
        // reset (a lost one fails what is in flight by itself).
        if let Some(due) = self.ack_due()
            && due <= now
        {
            self.reset_requested = true;
            self.stats.ack_timeouts.fetch_add(1, Relaxed);
            tracing::warn!(upstream = %self.name, timeout = ?self.config.ack_timeout, "Upstream did not acknowledge in time; reconnecting.");
            return Some(Action::ResetLink);
        }
        if self.stopping && self.outstanding == 0 {
            self.done = true;
            return Some(Action::Done);
        }
        None
    }

    /// Whether the window is full: sends not moved over by the cursor, or reports still
    /// coming (sends the backlog cap gave up still hold their slot at the upstream).
    fn window_full(&self) -> bool {
        self.sent.len().max(self.outstanding) >= self.config.window
    }

    /// When the oldest unacknowledged send times out, if that is watched now. A rewind on a
    /// live link (the peer refused a message for now) is watched too: it waits for the
    /// remaining reports, and a peer that stopped acknowledging must not hold it forever.
    fn ack_due(&self) -> Option<Instant> {
        let watching = !self.reset_requested && !self.stopping && self.link_up;
        let oldest = self.sent.iter().find(|s| !s.acked).filter(|_| watching)?;
        Some(oldest.at + self.config.ack_timeout)
    }

    /// A send or a read, if the window, the rate, the queue, the link and the budget allow.
    fn poll_send(&mut self, now: Instant) -> Option<Action> {
        if self.rewinding
            || self.stopping
            || !self.link_up
            || self.link_refused
            || self.budget == 0
            || blocked(self.queue_full_until, now)
            || blocked(self.busy_until, now)
            || blocked(self.rate_until, now)
        {
            return None;
        }
        let Some(item) = self.pending.front() else {
            if self.spool_empty || blocked(self.read_retry_until, now) {
                return None;
            }
            self.reading = true;
            return Some(Action::Read);
        };
        let tracked = item.qos.is_acknowledged();
        if tracked && self.window_full() {
            return None;
        }
        #[allow(clippy::cast_precision_loss)] // Sizes are far below 2^53.
        let size = (item.topic.len() + item.payload.len()) as f64;
        if let Err(after) = take_limits(&mut self.msgs, &mut self.bytes, size, now) {
            self.rate_until = Some(now + after);
            return None;
        }
        self.rate_until = None;
        self.sending = true;
        Some(Action::Send {
            seq: item.seq,
            tracked,
            message: Message {
                topic: item.topic.clone(),
                payload: item.payload.clone(),
                qos: item.qos,
                retain: item.retain,
                origin: item.origin.clone(),
            },
        })
    }

    /// When to call [`Self::handle_timeout`], if a timer is armed.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        [
            self.yield_at,
            self.rate_until,
            self.queue_full_until,
            self.read_retry_until,
            self.busy_until,
            self.ack_due(),
            self.backlog_due.filter(|_| !self.stopping),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The event an idle drain waits for, if any; `None` while an action is ready, a timer is
    /// armed for the next step, or the drain is done.
    #[must_use]
    pub fn waiting_for(&self) -> Option<Wait> {
        if self.done {
            return None;
        }
        if self.reading {
            return Some(Wait::Read);
        }
        if self.outstanding > 0
            && (self.rewinding
                || self.reset_requested
                || self.stopping
                || self
                    .pending
                    .front()
                    .is_some_and(|i| i.qos.is_acknowledged())
                    && self.window_full())
        {
            return Some(Wait::Ack);
        }
        if self.rewinding || self.stopping {
            return None;
        }
        if !self.link_up || self.link_refused {
            return Some(Wait::Link);
        }
        if self.pending.is_empty() && self.spool_empty {
            return Some(Wait::Append);
        }
        None
    }
}

#[cfg(test)]
mod tests;
