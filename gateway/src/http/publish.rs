//! Appending HTTP publishes to the spool and waiting for what may be promised: the waiter
//! table for the spool's verdicts ([`Verdicts`]), single publishes ([`Ingress::publish`]) and
//! batches ([`Ingress::publish_batch`]), backpressure from the writer's queue, and local
//! delivery (to the other ingresses and to this ingress's own SSE streams).
//!
//! Invariants (design section 3):
//! - A waiter is registered BEFORE its append (a verdict could beat the insert otherwise) and
//!   removed by its verdict (the writer answers every tokened append exactly once, so the
//!   table cannot leak) or by [`WaitGuard::disarm`] when the append was refused synchronously
//!   (no verdict comes).
//! - A QoS 1 publish is [`Outcome::Durable`] only after its `AppendReply { accepted: true }`;
//!   a failure outcome only for a message that was not appended or whose verdict was
//!   refused. Once appended, nothing here times out: the wait for the verdict is unbounded
//!   (the writer outlives the HTTP ingress); only a client leaving ends it, without a status.
//! - Cancel safety: hyper drops the handler's future when the client goes. The [`WaitGuard`]
//!   then turns the request's waiters into orphans; their verdicts are counted
//!   (`verdicts_orphaned`) and, accepted, still delivered locally.
//! - Local delivery of an accepted QoS 1 message is done by the driver task from the waiter
//!   entry, whether or not its client still waits, so the other protocols' subscribers see
//!   exactly the durable messages, once; QoS 0 on append, by the handler.
//! - Batch: items are appended in order; if the writer's queue stays full for `queue_wait` at
//!   item k, items k.. are never appended, so no later item overtakes an earlier one.
//! - Locks: the verdicts lock is never held while taking another; then hub, then router.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use sensorgate_bridges::message::{Message, Qos};
use sensorgate_bridges::router::{AppendRefused, IngressHandle};
use sensorgate_bridges::spool::AppendReply;

use super::sse::Hub;
use super::stats::HttpStats;
use crate::observe::model::DownlinkDropReason;

/// What a single publish came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// QoS 1: durable in the spool (200).
    Durable,
    /// QoS 0: handed to the spool writer (202).
    Queued,
    /// The spool refused it (full with `reject_new`, or a write error): not stored (503).
    SpoolRefused,
    /// The writer's queue stayed full for `queue_wait`: not appended (503).
    Busy,
    /// Routes are configured and none takes the topic: not appended (403).
    NoRoute,
    /// The gateway is stopping: not appended (503).
    Stopping,
}

/// Why a batch item is not in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ItemRefused {
    /// The spool refused it (its verdict).
    SpoolFull,
    /// The writer's queue stayed full for `queue_wait` at this item.
    Busy,
    /// After the item where appending stopped: never tried.
    NotAttempted,
    /// The gateway began stopping before it was appended.
    Stopping,
}

impl ItemRefused {
    /// The `error` of its entry in `refused`.
    pub(crate) const fn code(self) -> &'static str {
        match self {
            ItemRefused::SpoolFull => "spool_full",
            ItemRefused::Busy => "busy",
            ItemRefused::NotAttempted => "not_attempted",
            ItemRefused::Stopping => "stopping",
        }
    }
}

/// What a batch came to. An index is in `refused` iff that item is not in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchOutcome {
    /// Items in the batch.
    pub items: usize,
    /// QoS 1 items durable.
    pub durable: usize,
    /// QoS 0 items appended.
    pub queued: usize,
    /// The items not in the spool, by index, in order.
    pub refused: Vec<(usize, ItemRefused)>,
}

impl BatchOutcome {
    /// Every item is in the spool.
    pub(crate) fn complete(&self) -> bool {
        self.refused.is_empty()
    }
}

/// Who waits for a verdict.
#[derive(Debug)]
enum Reply {
    /// A single publish's handler.
    One(oneshot::Sender<bool>),
    /// Item `index` of a batch.
    Batch(Arc<BatchWait>, usize),
    /// Its client left: the verdict is counted, and delivered locally when accepted.
    Orphaned,
}

/// One appended tokened message waiting for its verdict.
#[derive(Debug)]
struct Waiter {
    reply: Reply,
    /// A copy for local delivery once accepted (only when anyone may want it).
    local: Option<Message>,
}

/// The verdicts of one batch's items, filled in by the driver.
#[derive(Debug)]
pub(crate) struct BatchWait {
    /// Per item: `Some(accepted)` once its verdict came.
    results: Mutex<Vec<Option<bool>>>,
    /// Verdicts still out.
    pending: AtomicUsize,
    /// Woken when `pending` reaches 0.
    done: Notify,
}

impl BatchWait {
    fn new(items: usize) -> Self {
        BatchWait {
            results: Mutex::new(vec![None; items]),
            pending: AtomicUsize::new(0),
            done: Notify::new(),
        }
    }

    fn set(&self, index: usize, accepted: bool) {
        if let Some(slot) = lock(&self.results).get_mut(index) {
            *slot = Some(accepted);
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Resolves once every registered verdict came. Cancel-safe.
    async fn all(&self) {
        // A stale permit (the count touched 0 between two appends) only causes a re-check.
        while self.pending.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent; a panic elsewhere does not stop us.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The waiter table: token -> who waits for the spool's verdict on that append.
#[derive(Debug, Default)]
pub(crate) struct Verdicts {
    next_token: AtomicU64,
    /// Await-free critical sections only, and no other lock taken under it.
    waiting: Mutex<HashMap<u64, Waiter>>,
}

impl Verdicts {
    /// Registers a waiter and returns its token (BEFORE the append).
    fn register(&self, reply: Reply, local: Option<Message>) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        lock(&self.waiting).insert(token, Waiter { reply, local });
        token
    }

    /// Waiters registered and not yet answered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.waiting).len()
    }

    /// Waiters whose client left (tests).
    #[cfg(test)]
    pub(crate) fn orphans_waiting(&self) -> usize {
        let waiting = lock(&self.waiting);
        waiting
            .values()
            .filter(|w| matches!(w.reply, Reply::Orphaned))
            .count()
    }

    /// Takes the waiters of `replies` out under one lock acquisition; then, in order, accepted
    /// ones are delivered locally and each waiter is told. Never blocks.
    pub(crate) fn deliver(&self, replies: &[AppendReply], ingress: &Ingress) {
        let taken: Vec<(Waiter, bool)> = {
            let mut waiting = lock(&self.waiting);
            replies
                .iter()
                .filter_map(|r| waiting.remove(&r.token).map(|w| (w, r.accepted)))
                .collect()
        };
        for (waiter, accepted) in taken {
            if accepted && let Some(message) = &waiter.local {
                ingress.deliver_local(message);
            }
            match waiter.reply {
                Reply::One(tx) => {
                    if tx.send(accepted).is_err() {
                        ingress.stats.orphaned();
                    }
                }
                Reply::Batch(wait, index) => wait.set(index, accepted),
                Reply::Orphaned => ingress.stats.orphaned(),
            }
        }
    }
}

/// Turns the waiters of a request still waiting into orphans when dropped (the client left
/// and hyper dropped the handler); [`Self::disarm`] forgets one whose append was refused.
struct WaitGuard<'a> {
    verdicts: &'a Verdicts,
    tokens: Vec<u64>,
}

impl<'a> WaitGuard<'a> {
    fn new(verdicts: &'a Verdicts) -> Self {
        WaitGuard {
            verdicts,
            tokens: Vec::new(),
        }
    }

    fn register(&mut self, reply: Reply, local: Option<Message>) -> u64 {
        let token = self.verdicts.register(reply, local);
        self.tokens.push(token);
        token
    }

    /// The append of `token` was refused: no verdict will come.
    fn disarm(&mut self, token: u64) {
        lock(&self.verdicts.waiting).remove(&token);
        self.tokens.retain(|&t| t != token);
    }

    /// Every verdict came (the entries are gone): nothing to do on drop.
    fn done(mut self) {
        self.tokens.clear();
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.tokens.is_empty() {
            return;
        }
        let mut waiting = lock(&self.verdicts.waiting);
        for token in &self.tokens {
            if let Some(waiter) = waiting.get_mut(token) {
                waiter.reply = Reply::Orphaned;
            }
        }
    }
}

/// The HTTP ingress's way into the pipeline, shared by every handler and the driver task.
pub(crate) struct Ingress {
    /// Appends, route checks, subscriptions and local delivery to the other ingresses.
    pub(crate) handle: IngressHandle,
    /// Who waits for which verdict.
    pub(crate) verdicts: Verdicts,
    /// The SSE streams and their filters.
    pub(crate) hub: Mutex<Hub>,
    /// Streams in the hub (mirrors `Hub::len`, read without its lock on the hot path).
    pub(crate) streams: AtomicUsize,
    /// How long an append waits for room in the writer's queue, in nanoseconds (a reload
    /// changes it: [`Ingress::set_queue_wait`]).
    queue_wait_nanos: AtomicU64,
    pub(crate) stats: Arc<HttpStats>,
    /// Cancelled when the gateway stops: nothing new is appended.
    pub(crate) stopping: CancellationToken,
}

impl Ingress {
    pub(crate) fn new(
        handle: IngressHandle,
        hub: Hub,
        queue_wait: Duration,
        stats: Arc<HttpStats>,
        stopping: CancellationToken,
    ) -> Self {
        Ingress {
            handle,
            verdicts: Verdicts::default(),
            hub: Mutex::new(hub),
            streams: AtomicUsize::new(0),
            queue_wait_nanos: AtomicU64::new(nanos(queue_wait)),
            stats,
            stopping,
        }
    }

    /// How long an append waits for room in the writer's queue (`queue_wait`).
    pub(crate) fn queue_wait(&self) -> Duration {
        Duration::from_nanos(self.queue_wait_nanos.load(Ordering::Relaxed))
    }

    /// A new `queue_wait`, for the requests that start from now (a reload).
    pub(crate) fn set_queue_wait(&self, queue_wait: Duration) {
        self.queue_wait_nanos
            .store(nanos(queue_wait), Ordering::Relaxed);
    }

    /// Locks the hub (lock order: verdicts, hub, router; the verdicts lock is never held).
    pub(crate) fn hub(&self) -> MutexGuard<'_, Hub> {
        lock(&self.hub)
    }

    /// Whether anyone may want a local copy of a message.
    fn wants_local(&self) -> bool {
        self.handle.has_peers() || self.streams.load(Ordering::Relaxed) > 0
    }

    /// An accepted message of this ingress: to the other ingresses' subscribers, and to this
    /// ingress's own SSE streams (the router never hands an ingress its own messages back).
    pub(crate) fn deliver_local(&self, message: &Message) {
        if self.handle.has_peers() {
            self.handle.deliver_local(message);
        }
        if self.streams.load(Ordering::Relaxed) > 0 {
            let delivered = self.hub().deliver(
                &message.topic,
                &message.payload,
                message.qos,
                message.retain,
                None,
            );
            self.stats
                .dropped(DownlinkDropReason::QueueFull, delivered.dropped_full);
            self.stats
                .dropped(DownlinkDropReason::TooLarge, delivered.dropped_large);
            self.stats
                .security
                .add(crate::security::Denial::AclDeniedDelivery, delivered.denied);
        }
    }

    /// Appends `message` (tokened when `token`), waiting for room in the writer's queue up to
    /// `deadline`. Cancel-safe: a dropped call appended nothing or exactly once.
    async fn append_with_room(
        &self,
        mut message: Message,
        token: Option<u64>,
        deadline: tokio::time::Instant,
    ) -> Result<(), Outcome> {
        loop {
            // Taken before the append, so a take by the writer in between is seen.
            let mark = self.handle.room_mark();
            match self.handle.append(message, token) {
                Ok(()) => return Ok(()),
                Err(AppendRefused::NoRoute(_)) => return Err(Outcome::NoRoute),
                Err(AppendRefused::QueueFull(back)) => message = back,
            }
            if tokio::time::timeout_at(deadline, self.handle.room_since(mark))
                .await
                .is_err()
                || tokio::time::Instant::now() >= deadline
            {
                return Err(Outcome::Busy);
            }
        }
    }

    /// Appends `message` and waits for what may be promised: QoS 1 durable (its verdict),
    /// QoS 0 appended. Never times out once appended (see the module doc).
    pub(crate) async fn publish(&self, message: Message) -> Outcome {
        if self.stopping.is_cancelled() {
            return Outcome::Stopping;
        }
        let deadline = tokio::time::Instant::now() + self.queue_wait();
        let local = self.wants_local().then(|| message.clone());
        if message.qos == Qos::AtMostOnce {
            return match self.append_with_room(message, None, deadline).await {
                Ok(()) => {
                    if let Some(local) = &local {
                        self.deliver_local(local);
                    }
                    Outcome::Queued
                }
                Err(outcome) => outcome,
            };
        }
        let (tx, rx) = oneshot::channel();
        let mut guard = WaitGuard::new(&self.verdicts);
        let token = guard.register(Reply::One(tx), local);
        if let Err(outcome) = self.append_with_room(message, Some(token), deadline).await {
            guard.disarm(token);
            return outcome;
        }
        match rx.await {
            Ok(accepted) => {
                guard.done();
                if accepted {
                    Outcome::Durable
                } else {
                    Outcome::SpoolRefused
                }
            }
            // The waiter was dropped unanswered: only when the ingress itself is torn down.
            // The message may be durable: no status at all (the runtime drops this future).
            Err(_) => std::future::pending().await,
        }
    }

    /// Appends every item in order and waits for every verdict (design section 3, rule 5).
    /// The caller checked grants and routes ([`Ingress::first_unrouted`]) first.
    pub(crate) async fn publish_batch(&self, items: Vec<Message>) -> BatchOutcome {
        let count = items.len();
        let wait = Arc::new(BatchWait::new(count));
        let mut guard = WaitGuard::new(&self.verdicts);
        let mut refused = Vec::new();
        let mut queued = 0;
        let mut tokened = Vec::new();
        let deadline = tokio::time::Instant::now() + self.queue_wait();
        let wants_local = self.wants_local();
        let mut items = items.into_iter().enumerate();
        for (index, message) in items.by_ref() {
            if self.stopping.is_cancelled() {
                refused.push((index, ItemRefused::Stopping));
                break;
            }
            let local = wants_local.then(|| message.clone());
            // The local copy of a tokened item rides with its waiter (the driver delivers it).
            let (token, local) = if message.qos == Qos::AtMostOnce {
                (None, local)
            } else {
                wait.pending.fetch_add(1, Ordering::AcqRel);
                let reply = Reply::Batch(Arc::clone(&wait), index);
                (Some(guard.register(reply, local)), None)
            };
            match self.append_with_room(message, token, deadline).await {
                Ok(()) => match token {
                    Some(_) => tokened.push(index),
                    None => {
                        queued += 1;
                        if let Some(local) = &local {
                            self.deliver_local(local);
                        }
                    }
                },
                Err(outcome) => {
                    if let Some(token) = token {
                        guard.disarm(token);
                        wait.pending.fetch_sub(1, Ordering::AcqRel);
                    }
                    // Routes were checked first and are fixed; NoRoute cannot come here.
                    let why = match outcome {
                        Outcome::Stopping => ItemRefused::Stopping,
                        _ => ItemRefused::Busy,
                    };
                    refused.push((index, why));
                    break;
                }
            }
        }
        refused.extend(items.map(|(index, _)| (index, ItemRefused::NotAttempted)));
        wait.all().await;
        guard.done();
        let results = lock(&wait.results).clone();
        let mut durable = 0;
        let mut verdict_refused = Vec::new();
        for index in tokened {
            match results.get(index).copied().flatten() {
                Some(true) => durable += 1,
                _ => verdict_refused.push((index, ItemRefused::SpoolFull)),
            }
        }
        verdict_refused.extend(refused);
        verdict_refused.sort_by_key(|&(index, _)| index);
        BatchOutcome {
            items: count,
            durable,
            queued,
            refused: verdict_refused,
        }
    }

    /// The first item no route takes (a batch is refused whole before anything is appended).
    pub(crate) fn first_unrouted<'m>(
        &self,
        topics: impl IntoIterator<Item = &'m str>,
    ) -> Option<usize> {
        topics.into_iter().position(|t| !self.handle.accepts(t))
    }
}

/// `d` in nanoseconds, saturating (a `queue_wait` beyond 584 years waits that long).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
