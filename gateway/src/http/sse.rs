//! Server-Sent Events for `GET /v1/subscribe`: the per-stream bounded queue, the event
//! encoding, and the hub that maps filters to streams and keeps the router's subscriptions
//! counted.
//!
//! ```text
//! retry: 5000                       (first, at once)
//! event: ready
//! data: {"filters":["cmd/dev1/#"]}
//!
//! id: 17                            (one per message)
//! event: message
//! data: {"topic":"cmd/dev1/led","payload":"on","qos":0,"retain":false}
//!
//! event: dropped                    (before the next event after losses)
//! data: {"dropped":3}
//!
//! : ka                              (keep-alive comment, by the glue)
//! ```
//!
//! # Invariants
//!
//! - Every `data:` line is compact JSON from serde_json, which escapes every control
//!   character: broker bytes can never break the framing.
//! - A message is encoded at most once per encoding (text, forced base64) and the `Bytes`
//!   shared by every stream; `payload` when the bytes are UTF-8 (and the stream did not ask
//!   for base64), else `payload_b64` (standard base64 with padding). The `id` is the hub's
//!   message counter: the same on every stream, increasing, not contiguous per stream.
//! - A stream's queue holds at most its capacity of events; on overflow its policy drops the
//!   oldest, drops the new one, or closes the stream. Every lost event (overflow, or larger than
//!   `max_event`) is counted and announced by one `dropped` event before the stream's next
//!   event (a stream closed by its policy still gets it, then what was queued). Pushing
//!   never waits.
//! - The hub holds one entry per distinct filter with the streams holding it; the router is
//!   asked to `subscribe` when a filter's first stream registers and to `unsubscribe` when its
//!   last one leaves, so its calls always balance. A refused `subscribe` undoes the
//!   subscribes of that registration and registers nothing.
//! - A message reaches a stream at most once, however many of its filters match.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use sensorgate_bridges::message::Qos;
use sensorgate_bridges::topic;
use sensorgate_bridges::upstream::FailReason;
use serde::Serialize;

use crate::identity::Identity;
use crate::security::{Policy, Requester};
use tokio::sync::Notify;

use crate::config::SseQueueFull;

/// The keep-alive comment the glue sends after `sse_keepalive` of silence.
pub(crate) const KEEPALIVE: &[u8] = b": ka\n\n";

/// The reconnection delay the `ready` event asks of `EventSource` clients, in milliseconds.
pub(crate) const RETRY_MS: u32 = 5000;

/// What [`StreamQueue::push`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued; nothing lost.
    Queued,
    /// Queued; the oldest queued event was dropped to make room.
    DroppedOldest,
    /// The queue was full: this event was dropped.
    DroppedNew,
    /// The queue is closed (now, by the `close` policy, or before): this event was dropped.
    Closed,
}

/// A stream's bounded event queue: the driver pushes, the response body pops. `Send + Sync`.
#[derive(Debug)]
pub(crate) struct StreamQueue {
    state: Mutex<QueueState>,
    /// Wakes the one reader; a notification sent while it is not waiting is kept (a permit).
    notify: Notify,
    /// Most events held (>= 1).
    cap: usize,
    policy: SseQueueFull,
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<Bytes>,
    /// Events lost since the last `dropped` notice.
    dropped: u64,
    closed: bool,
}

impl StreamQueue {
    /// A queue of at most `cap` events (0 is taken as 1), full by `policy`.
    pub(crate) fn new(cap: usize, policy: SseQueueFull) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
            cap: cap.max(1),
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `event` by the policy. Never waits.
    pub(crate) fn push(&self, event: Bytes) -> Push {
        let outcome = {
            let mut state = self.lock();
            if state.closed {
                return Push::Closed;
            }
            if state.items.len() < self.cap {
                state.items.push_back(event);
                Push::Queued
            } else {
                state.dropped += 1;
                match self.policy {
                    SseQueueFull::DropOldest => {
                        state.items.pop_front();
                        state.items.push_back(event);
                        Push::DroppedOldest
                    }
                    SseQueueFull::DropNew => Push::DroppedNew,
                    SseQueueFull::Close => {
                        state.closed = true;
                        Push::Closed
                    }
                }
            }
        };
        self.notify.notify_one();
        outcome
    }

    /// Counts an event lost before reaching the queue (too large): announced like an overflow.
    pub(crate) fn lost(&self) {
        self.lock().dropped += 1;
        self.notify.notify_one();
    }

    /// Ends the stream once what is queued has been read (shutdown, or the hub let it go).
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// Events queued.
    pub(crate) fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Whether the queue is closed (it may still hold events).
    #[cfg(test)]
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Next event (a `dropped` notice first when events were lost); None once closed and empty.
    ///
    /// Cancel-safe: nothing is taken from the queue until the event is returned.
    pub(crate) async fn next(&self) -> Option<Bytes> {
        loop {
            {
                let mut state = self.lock();
                if state.dropped > 0 {
                    let n = std::mem::take(&mut state.dropped);
                    return Some(encode_dropped(n));
                }
                if let Some(event) = state.items.pop_front() {
                    return Some(event);
                }
                if state.closed {
                    return None;
                }
            }
            self.notify.notified().await;
        }
    }
}

/// The first event of a stream: the reconnection delay and the filters it holds.
pub(crate) fn encode_ready(filters: &[Arc<str>]) -> Bytes {
    #[derive(Serialize)]
    struct Ready<'a> {
        filters: Vec<&'a str>,
    }
    let data = Ready {
        filters: filters.iter().map(|f| &**f).collect(),
    };
    let mut out = format!("retry: {RETRY_MS}\nevent: ready\ndata: ").into_bytes();
    // Serializing strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The gap notice: `n` events of this stream were lost.
fn encode_dropped(n: u64) -> Bytes {
    Bytes::from(format!("event: dropped\ndata: {{\"dropped\":{n}}}\n\n"))
}

/// One message event; `payload_b64` when `base64` or the payload is not UTF-8.
fn encode_message(
    id: u64,
    topic: &str,
    payload: &[u8],
    qos: Qos,
    retain: bool,
    base64: bool,
) -> Bytes {
    #[derive(Serialize)]
    struct Data<'a> {
        topic: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload_b64: Option<String>,
        qos: u8,
        retain: bool,
    }
    let text = if base64 {
        None
    } else {
        std::str::from_utf8(payload).ok()
    };
    let data = Data {
        topic,
        payload: text,
        payload_b64: text
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(payload)),
        qos: match qos {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        },
        retain,
    };
    let mut out = format!("id: {id}\nevent: message\ndata: ").into_bytes();
    // Serializing strings and numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The router's subscription calls; `IngressHandle` implements it in the glue (QoS 0), a
/// fake in the tests.
pub(crate) trait Subscriptions {
    /// The ingress wants `filter` (its first stream registered).
    ///
    /// # Errors
    /// The router refused (its filter table is full).
    fn subscribe(&self, now: Instant, filter: &str) -> Result<(), FailReason>;
    /// The ingress no longer wants `filter` (its last stream left).
    fn unsubscribe(&self, now: Instant, filter: &str);
}

/// A registered stream's handle.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct StreamId(pub(crate) u64);

/// Why [`Hub::register`] refused a stream (nothing was registered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HubRefused {
    /// `max_streams` streams are open (503 `too_many_streams`).
    #[error("too many streams")]
    TooManyStreams,
    /// The device has `max_streams_per_device` streams open (429 `too_many_streams`).
    #[error("too many streams for this device")]
    TooManyForDevice,
    /// The new filters would take the hub beyond `max_filters` (503 `subscribe_refused`).
    #[error("the filter table is full")]
    FilterTableFull,
    /// The router refused a filter (503 `subscribe_refused`).
    #[error("the router refused the subscription ({})", .0.error_code())]
    Subscribe(FailReason),
}

/// What one [`Hub::deliver`] did, summed over the streams it reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Delivered {
    /// Events queued (including those that pushed an older one out).
    pub(crate) queued: u64,
    /// Events lost to a full or closed queue (`queue_full`), counting pushed-out ones.
    pub(crate) dropped_full: u64,
    /// Events larger than `max_event`, not queued (`too_large`).
    pub(crate) dropped_large: u64,
    /// Events not queued because the stream's identity may no longer receive the topic (the
    /// ACL changed since the stream opened).
    pub(crate) denied: u64,
}

/// One registered stream.
#[derive(Debug)]
struct Stream {
    device: Arc<str>,
    /// Who opened it, for the ACL at delivery (`None`: not checked).
    identity: Option<(Identity, Option<Arc<str>>)>,
    filters: Vec<Arc<str>>,
    base64: bool,
    queue: Arc<StreamQueue>,
}

/// Streams and their filters.
#[derive(Debug)]
pub(crate) struct Hub {
    streams: HashMap<StreamId, Stream>,
    /// Wildcard-free filters -> the streams holding them (never an empty list).
    exact: HashMap<Arc<str>, Vec<StreamId>>,
    /// Wildcard filters -> the streams holding them (never an empty list).
    wild: HashMap<Arc<str>, Vec<StreamId>>,
    /// Open streams per device (no zero entries).
    per_device: HashMap<Arc<str>, usize>,
    next_stream: u64,
    /// The last message id given (ids start at 1).
    last_event_id: u64,
    max_streams: usize,
    max_per_device: usize,
    max_filters: usize,
    queue_cap: usize,
    policy: SseQueueFull,
    max_event: usize,
    /// `[[acl]]` in force, checked at delivery for streams with an identity.
    security: Arc<Policy>,
}

impl Hub {
    /// An empty hub with its bounds (`[http] max_streams`, `max_streams_per_device`,
    /// `max_filters`, `sse_queue`, `sse_queue_full`, `sse_max_event`).
    pub(crate) fn new(
        max_streams: usize,
        max_per_device: usize,
        max_filters: usize,
        queue_cap: usize,
        policy: SseQueueFull,
        max_event: usize,
    ) -> Self {
        Self {
            streams: HashMap::new(),
            exact: HashMap::new(),
            wild: HashMap::new(),
            per_device: HashMap::new(),
            next_stream: 0,
            last_event_id: 0,
            max_streams,
            max_per_device,
            max_filters,
            queue_cap,
            policy,
            max_event,
            security: Arc::default(),
        }
    }

    /// The ACL in force (start and reload): a stream opened under an earlier one gets only what
    /// its identity may receive now.
    pub(crate) fn set_security(&mut self, security: Arc<Policy>) {
        self.security = security;
    }

    /// Records who opened stream `id` (`client_id`: the device id, `None` for anonymous).
    pub(crate) fn set_stream_identity(
        &mut self,
        id: StreamId,
        identity: Identity,
        client_id: Option<Arc<str>>,
    ) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.identity = Some((identity, client_id));
        }
    }

    /// New bounds (a reload): `max_streams`, `max_per_device` and `max_filters` apply to the
    /// next registration (open streams are kept), `queue_cap` and `policy` to streams opened
    /// from now on (an open stream keeps its queue), `max_event` to the next event.
    pub(crate) fn set_limits(
        &mut self,
        max_streams: usize,
        max_per_device: usize,
        max_filters: usize,
        queue_cap: usize,
        policy: SseQueueFull,
        max_event: usize,
    ) {
        self.max_streams = max_streams;
        self.max_per_device = max_per_device;
        self.max_filters = max_filters;
        self.queue_cap = queue_cap;
        self.policy = policy;
        self.max_event = max_event;
    }

    fn table(&mut self, filter: &str) -> &mut HashMap<Arc<str>, Vec<StreamId>> {
        if topic::has_wildcards(filter) {
            &mut self.wild
        } else {
            &mut self.exact
        }
    }

    fn holds(&self, filter: &str) -> bool {
        self.exact.contains_key(filter) || self.wild.contains_key(filter)
    }

    /// Registers a stream of `device` on `filters` (duplicates ignored), subscribing the
    /// router to the filters no stream held yet, in order.
    ///
    /// # Errors
    /// A bound is reached, or the router refused a filter (its earlier subscribes in this
    /// call are undone): nothing is registered.
    pub(crate) fn register(
        &mut self,
        now: Instant,
        device: &Arc<str>,
        filters: Vec<Arc<str>>,
        base64: bool,
        subs: &dyn Subscriptions,
    ) -> Result<(StreamId, Arc<StreamQueue>), HubRefused> {
        if self.streams.len() >= self.max_streams {
            return Err(HubRefused::TooManyStreams);
        }
        if self.per_device.get(device).copied().unwrap_or(0) >= self.max_per_device {
            return Err(HubRefused::TooManyForDevice);
        }
        let mut seen = HashSet::new();
        let filters: Vec<Arc<str>> = filters
            .into_iter()
            .filter(|f| seen.insert(Arc::clone(f)))
            .collect();
        let new: Vec<&Arc<str>> = filters.iter().filter(|f| !self.holds(f)).collect();
        if self.exact.len() + self.wild.len() + new.len() > self.max_filters {
            return Err(HubRefused::FilterTableFull);
        }
        for (done, filter) in new.iter().enumerate() {
            if let Err(reason) = subs.subscribe(now, filter) {
                for earlier in new.iter().take(done) {
                    subs.unsubscribe(now, earlier);
                }
                return Err(HubRefused::Subscribe(reason));
            }
        }
        self.next_stream += 1;
        let id = StreamId(self.next_stream);
        for filter in &filters {
            self.table(filter)
                .entry(Arc::clone(filter))
                .or_default()
                .push(id);
        }
        *self.per_device.entry(Arc::clone(device)).or_default() += 1;
        let queue = Arc::new(StreamQueue::new(self.queue_cap, self.policy));
        self.streams.insert(
            id,
            Stream {
                device: Arc::clone(device),
                identity: None,
                filters,
                base64,
                queue: Arc::clone(&queue),
            },
        );
        Ok((id, queue))
    }

    /// Removes a stream (an unknown id is ignored), closes its queue, and unsubscribes the
    /// router from the filters it was the last to hold.
    pub(crate) fn unregister(&mut self, now: Instant, id: StreamId, subs: &dyn Subscriptions) {
        let Some(stream) = self.streams.remove(&id) else {
            return;
        };
        stream.queue.close();
        if let Entry::Occupied(mut count) = self.per_device.entry(Arc::clone(&stream.device)) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
        for filter in &stream.filters {
            let table = self.table(filter);
            if let Entry::Occupied(mut ids) = table.entry(Arc::clone(filter)) {
                ids.get_mut().retain(|s| *s != id);
                if ids.get().is_empty() {
                    ids.remove();
                    subs.unsubscribe(now, filter);
                }
            }
        }
    }

    /// Encodes once per encoding in use, pushes to every matching stream (once per stream).
    /// `filters: Some` = only the streams of those filters (MQTT 5 subscription ids).
    pub(crate) fn deliver(
        &mut self,
        topic: &str,
        payload: &Bytes,
        qos: Qos,
        retain: bool,
        filters: Option<&[Arc<str>]>,
    ) -> Delivered {
        let mut targets: Vec<StreamId> = Vec::new();
        match filters {
            Some(list) => {
                for filter in list {
                    if let Some(ids) = self.exact.get(filter).or_else(|| self.wild.get(filter)) {
                        targets.extend(ids);
                    }
                }
            }
            None => {
                if let Some(ids) = self.exact.get(topic) {
                    targets.extend(ids);
                }
                for (filter, ids) in &self.wild {
                    if topic::matches(filter, topic) {
                        targets.extend(ids);
                    }
                }
            }
        }
        let mut delivered = Delivered::default();
        if targets.is_empty() {
            return delivered;
        }
        targets.sort_unstable_by_key(|s| s.0);
        targets.dedup();
        self.last_event_id += 1;
        let id = self.last_event_id;
        let utf8 = std::str::from_utf8(payload).is_ok();
        // A non-UTF-8 payload is base64 in both encodings, so one serves.
        let (mut text, mut forced) = (None::<Bytes>, None::<Bytes>);
        for target in targets {
            let Some(stream) = self.streams.get(&target) else {
                continue;
            };
            if let (Some(_), Some((identity, client_id))) = (&self.security.acl, &stream.identity) {
                let who = Requester::new(Some(identity), client_id.as_deref());
                if !self.security.may_receive(&who, topic) {
                    delivered.denied += 1;
                    continue;
                }
            }
            let base64 = stream.base64 || !utf8;
            let cache = if base64 { &mut forced } else { &mut text };
            let event = cache
                .get_or_insert_with(|| encode_message(id, topic, payload, qos, retain, base64))
                .clone();
            if event.len() > self.max_event {
                stream.queue.lost();
                delivered.dropped_large += 1;
                continue;
            }
            match stream.queue.push(event) {
                Push::Queued => delivered.queued += 1,
                Push::DroppedOldest => {
                    delivered.queued += 1;
                    delivered.dropped_full += 1;
                }
                Push::DroppedNew | Push::Closed => delivered.dropped_full += 1,
            }
        }
        delivered
    }

    /// Closes every stream's queue (shutdown): each ends once read; their guards unregister.
    pub(crate) fn close_all(&mut self) {
        for stream in self.streams.values() {
            stream.queue.close();
        }
    }

    /// Open streams.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.streams.len()
    }

    /// Distinct filters held.
    #[cfg(test)]
    pub(crate) fn filter_count(&self) -> usize {
        self.exact.len() + self.wild.len()
    }

    /// (device, filters, queued events) per stream, for /clients.
    pub(crate) fn streams(&self) -> impl Iterator<Item = (&Arc<str>, &[Arc<str>], usize)> {
        self.streams
            .values()
            .map(|s| (&s.device, s.filters.as_slice(), s.queue.len()))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    #[allow(clippy::disallowed_methods)] // The virtual clock starts at an arbitrary instant.
    fn start() -> Instant {
        Instant::now()
    }

    fn ev(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    /// The JSON of an event's `data:` line.
    fn data(event: &Bytes) -> serde_json::Value {
        let line = text(event)
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap();
        serde_json::from_str(line).unwrap()
    }

    fn dropped_notice(n: u64) -> Bytes {
        Bytes::from(format!("event: dropped\ndata: {{\"dropped\":{n}}}\n\n"))
    }

    /// Everything ready now, without waiting: (events, ended).
    async fn drain(q: &StreamQueue) -> (Vec<Bytes>, bool) {
        let mut out = Vec::new();
        loop {
            tokio::select! {
                biased;
                next = q.next() => match next {
                    Some(event) => out.push(event),
                    None => return (out, true),
                },
                () = std::future::ready(()) => return (out, false),
            }
        }
    }

    #[test]
    fn the_queue_and_the_hub_can_be_shared_across_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<StreamQueue>();
        shared::<Hub>();
        shared::<crate::http::auth::AuthTable>();
        shared::<crate::http::rate::RateTable>();
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest_and_announces_the_gap_first() {
        let q = StreamQueue::new(2, SseQueueFull::DropOldest);
        assert_eq!(q.push(ev(1)), Push::Queued);
        assert_eq!(q.push(ev(2)), Push::Queued);
        assert_eq!(q.push(ev(3)), Push::DroppedOldest);
        assert_eq!(q.push(ev(4)), Push::DroppedOldest);
        assert_eq!(q.len(), 2);
        assert_eq!(
            drain(&q).await,
            (vec![dropped_notice(2), ev(3), ev(4)], false)
        );
        assert_eq!(q.push(ev(5)), Push::Queued);
        assert_eq!(drain(&q).await, (vec![ev(5)], false), "one notice per gap");
    }

    #[tokio::test]
    async fn drop_new_keeps_the_queued_events() {
        let q = StreamQueue::new(1, SseQueueFull::DropNew);
        assert_eq!(q.push(ev(1)), Push::Queued);
        assert_eq!(q.push(ev(2)), Push::DroppedNew);
        assert_eq!(drain(&q).await, (vec![dropped_notice(1), ev(1)], false));
    }

    #[tokio::test]
    async fn the_close_policy_ends_the_stream_after_the_notice_and_the_queue() {
        let q = StreamQueue::new(1, SseQueueFull::Close);
        assert_eq!(q.push(ev(1)), Push::Queued);
        assert_eq!(q.push(ev(2)), Push::Closed);
        assert!(q.is_closed());
        assert_eq!(q.push(ev(3)), Push::Closed);
        assert_eq!(drain(&q).await, (vec![dropped_notice(1), ev(1)], true));
    }

    #[tokio::test]
    async fn close_ends_the_stream_once_read_and_a_zero_cap_holds_one() {
        let q = StreamQueue::new(0, SseQueueFull::DropNew);
        assert_eq!(q.push(ev(1)), Push::Queued);
        assert_eq!(q.push(ev(2)), Push::DroppedNew);
        q.close();
        assert_eq!(q.push(ev(3)), Push::Closed);
        assert_eq!(drain(&q).await, (vec![dropped_notice(1), ev(1)], true));
        assert_eq!(q.next().await, None);
    }

    #[tokio::test]
    async fn next_is_cancel_safe_and_wakes_on_push() {
        let q = Arc::new(StreamQueue::new(4, SseQueueFull::DropOldest));
        // A `next` dropped while waiting takes nothing.
        assert_eq!(drain(&q).await, (vec![], false));
        q.push(ev(1));
        assert_eq!(drain(&q).await, (vec![ev(1)], false));
        // A waiting reader is woken by a push from another task.
        let reader = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.next().await })
        };
        tokio::task::yield_now().await;
        q.push(ev(2));
        assert_eq!(reader.await.unwrap(), Some(ev(2)));
        // And by close.
        let reader = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.next().await })
        };
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(reader.await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_lost_event_is_announced() {
        let q = StreamQueue::new(4, SseQueueFull::DropOldest);
        q.lost();
        q.lost();
        assert_eq!(drain(&q).await, (vec![dropped_notice(2)], false));
    }

    #[test]
    fn the_ready_event_lists_the_filters() {
        let ready = encode_ready(&[Arc::from("cmd/dev1/#"), Arc::from("a\"b")]);
        assert_eq!(
            text(&ready),
            "retry: 5000\nevent: ready\ndata: {\"filters\":[\"cmd/dev1/#\",\"a\\\"b\"]}\n\n"
        );
        assert_eq!(KEEPALIVE, b": ka\n\n");
    }

    #[test]
    fn message_events_are_compact_json_with_text_or_base64() {
        let e = encode_message(17, "cmd/dev1/led", b"on", Qos::AtMostOnce, false, false);
        assert_eq!(
            text(&e),
            "id: 17\nevent: message\ndata: {\"topic\":\"cmd/dev1/led\",\"payload\":\"on\",\"qos\":0,\"retain\":false}\n\n"
        );
        let e = encode_message(1, "t", &[0xff, 0], Qos::AtLeastOnce, true, false);
        assert_eq!(
            data(&e),
            serde_json::json!({"topic":"t","payload_b64":"/wA=","qos":1,"retain":true})
        );
        let e = encode_message(1, "t", b"on", Qos::AtMostOnce, false, true);
        assert_eq!(
            data(&e),
            serde_json::json!({"topic":"t","payload_b64":"b24=","qos":0,"retain":false})
        );
        // Broker bytes cannot break the framing: one data line, newlines escaped.
        let e = encode_message(
            2,
            "a\nb",
            "x\r\n\ny\u{2028}".as_bytes(),
            Qos::AtMostOnce,
            false,
            false,
        );
        let t = text(&e);
        assert_eq!(t.matches('\n').count(), 4, "{t}");
        assert!(!t.contains('\r'));
        assert_eq!(data(&e)["payload"], "x\r\n\ny\u{2028}");
    }

    /// Records the router calls; refuses the filters in `refuse`.
    #[derive(Default)]
    struct FakeSubs {
        held: RefCell<BTreeMap<String, u32>>,
        calls: RefCell<Vec<(bool, String)>>,
        refuse: RefCell<HashSet<String>>,
    }

    impl Subscriptions for FakeSubs {
        fn subscribe(&self, _: Instant, filter: &str) -> Result<(), FailReason> {
            if self.refuse.borrow().contains(filter) {
                return Err(FailReason::QueueFull);
            }
            self.calls.borrow_mut().push((true, filter.to_owned()));
            *self.held.borrow_mut().entry(filter.to_owned()).or_default() += 1;
            Ok(())
        }

        fn unsubscribe(&self, _: Instant, filter: &str) {
            self.calls.borrow_mut().push((false, filter.to_owned()));
            let mut held = self.held.borrow_mut();
            let count = held
                .get_mut(filter)
                .expect("unsubscribe of a filter not held");
            *count -= 1;
            if *count == 0 {
                held.remove(filter);
            }
        }
    }

    impl FakeSubs {
        fn held(&self) -> Vec<String> {
            let held = self.held.borrow();
            assert!(held.values().all(|&n| n == 1), "subscribed twice: {held:?}");
            held.keys().cloned().collect()
        }
    }

    fn filters(list: &[&str]) -> Vec<Arc<str>> {
        list.iter().map(|f| Arc::from(*f)).collect()
    }

    fn hub() -> Hub {
        Hub::new(8, 3, 6, 4, SseQueueFull::DropOldest, 1024)
    }

    #[test]
    fn the_first_stream_subscribes_and_the_last_unsubscribes() {
        let (now, subs, mut hub) = (start(), FakeSubs::default(), hub());
        let dev: Arc<str> = Arc::from("dev1");
        let (a, _) = hub
            .register(
                now,
                &dev,
                filters(&["cmd/dev1/#", "cfg/dev1", "cmd/dev1/#"]),
                false,
                &subs,
            )
            .unwrap();
        assert_eq!(subs.held(), ["cfg/dev1", "cmd/dev1/#"]);
        let (b, _) = hub
            .register(now, &dev, filters(&["cmd/dev1/#", "x"]), false, &subs)
            .unwrap();
        assert_eq!(subs.calls.borrow().len(), 3, "cmd/dev1/# asked once");
        assert_eq!(hub.len(), 2);
        assert_eq!(hub.filter_count(), 3);
        hub.unregister(now, a, &subs);
        assert_eq!(subs.held(), ["cmd/dev1/#", "x"]);
        hub.unregister(now, a, &subs);
        assert_eq!(
            subs.held(),
            ["cmd/dev1/#", "x"],
            "a second unregister is ignored"
        );
        hub.unregister(now, b, &subs);
        assert!(subs.held().is_empty());
        assert_eq!(hub.len(), 0);
        assert_eq!(hub.filter_count(), 0);
        assert!(hub.per_device.is_empty());
    }

    #[test]
    fn a_refused_subscribe_undoes_this_registration_only() {
        let (now, subs, mut hub) = (start(), FakeSubs::default(), hub());
        let dev: Arc<str> = Arc::from("dev1");
        hub.register(now, &dev, filters(&["a"]), false, &subs)
            .unwrap();
        subs.refuse.borrow_mut().insert("c".into());
        assert_eq!(
            hub.register(now, &dev, filters(&["a", "b", "c", "d"]), false, &subs)
                .map(|_| ()),
            Err(HubRefused::Subscribe(FailReason::QueueFull))
        );
        assert_eq!(subs.held(), ["a"], "b undone, a kept, d never asked");
        assert_eq!(
            *subs.calls.borrow(),
            [(true, "a".into()), (true, "b".into()), (false, "b".into())]
        );
        assert_eq!(hub.len(), 1);
        assert_eq!(hub.filter_count(), 1);
        assert_eq!(hub.per_device.get("dev1"), Some(&1));
    }

    #[test]
    fn bounds_refuse_before_anything_is_asked() {
        let (now, subs) = (start(), FakeSubs::default());
        let mut hub = Hub::new(3, 2, 3, 4, SseQueueFull::DropOldest, 1024);
        let (d1, d2, d3): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("d1"), Arc::from("d2"), Arc::from("d3"));
        hub.register(now, &d1, filters(&["a"]), false, &subs)
            .unwrap();
        hub.register(now, &d1, filters(&["a"]), false, &subs)
            .unwrap();
        assert_eq!(
            hub.register(now, &d1, filters(&["a"]), false, &subs)
                .map(|_| ()),
            Err(HubRefused::TooManyForDevice)
        );
        assert_eq!(
            hub.register(now, &d2, filters(&["b", "c", "d"]), false, &subs)
                .map(|_| ()),
            Err(HubRefused::FilterTableFull)
        );
        hub.register(now, &d2, filters(&["a", "b", "c"]), false, &subs)
            .unwrap();
        assert_eq!(
            hub.register(now, &d3, filters(&["a"]), false, &subs)
                .map(|_| ()),
            Err(HubRefused::TooManyStreams)
        );
        assert_eq!(subs.held(), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_message_reaches_each_matching_stream_once_with_shared_bytes() {
        let (now, subs, mut hub) = (start(), FakeSubs::default(), hub());
        let dev: Arc<str> = Arc::from("dev1");
        let (_, q1) = hub
            .register(
                now,
                &dev,
                filters(&["cmd/dev1/#", "cmd/+/led", "cmd/dev1/led"]),
                false,
                &subs,
            )
            .unwrap();
        let (_, q2) = hub
            .register(now, &dev, filters(&["cmd/dev1/led"]), false, &subs)
            .unwrap();
        let (_, q3) = hub
            .register(now, &dev, filters(&["cmd/#"]), true, &subs)
            .unwrap();
        let (_, q4) = hub
            .register(now, &Arc::from("d2"), filters(&["other"]), false, &subs)
            .unwrap();
        let got = hub.deliver(
            "cmd/dev1/led",
            &Bytes::from_static(b"on"),
            Qos::AtMostOnce,
            false,
            None,
        );
        assert_eq!(
            got,
            Delivered {
                queued: 3,
                dropped_full: 0,
                dropped_large: 0,
                denied: 0,
            }
        );
        let (e1, e2, e3) = (drain(&q1).await.0, drain(&q2).await.0, drain(&q3).await.0);
        assert_eq!((e1.len(), e2.len(), e3.len(), q4.len()), (1, 1, 1, 0));
        assert_eq!(e1[0].as_ptr(), e2[0].as_ptr(), "encoded once, shared");
        assert_eq!(data(&e1[0])["payload"], "on");
        assert_eq!(data(&e3[0])["payload_b64"], "b24=");
        // A binary payload: one encoding serves text and base64 streams alike.
        hub.deliver(
            "cmd/dev1/led",
            &Bytes::from_static(&[0xff]),
            Qos::AtMostOnce,
            false,
            None,
        );
        let (e1, e3) = (drain(&q1).await.0, drain(&q3).await.0);
        assert_eq!(e1[0].as_ptr(), e3[0].as_ptr());
        assert!(text(&e1[0]).starts_with("id: 2\n"), "ids count messages");
        // No match: no id used.
        let none = hub.deliver("nothing", &Bytes::new(), Qos::AtMostOnce, false, None);
        assert_eq!(none, Delivered::default());
        hub.deliver("other", &Bytes::new(), Qos::AtMostOnce, false, None);
        assert!(text(&drain(&q4).await.0[0]).starts_with("id: 3\n"));
        // `$` topics are not matched by a leading wildcard; `+` matches one level.
        let got = hub.deliver("cmd/x/led", &Bytes::new(), Qos::AtMostOnce, false, None);
        assert_eq!(got.queued, 2, "cmd/+/led and cmd/#");
    }

    #[tokio::test]
    async fn targeted_delivery_reaches_only_the_named_filters_streams() {
        let (now, subs, mut hub) = (start(), FakeSubs::default(), hub());
        let dev: Arc<str> = Arc::from("dev1");
        let (_, q1) = hub
            .register(now, &dev, filters(&["cmd/#", "cmd/+"]), false, &subs)
            .unwrap();
        let (_, q2) = hub
            .register(now, &dev, filters(&["cmd/a"]), false, &subs)
            .unwrap();
        let got = hub.deliver(
            "cmd/a",
            &Bytes::new(),
            Qos::AtLeastOnce,
            true,
            Some(&filters(&["cmd/#", "cmd/+", "unknown"])),
        );
        assert_eq!(got.queued, 1);
        assert_eq!(drain(&q1).await.0.len(), 1);
        assert_eq!(q2.len(), 0);
        let got = hub.deliver(
            "cmd/a",
            &Bytes::new(),
            Qos::AtLeastOnce,
            true,
            Some(&filters(&["cmd/a"])),
        );
        assert_eq!(got.queued, 1);
        assert_eq!(q1.len(), 0);
        assert_eq!(data(&drain(&q2).await.0[0])["retain"], true);
    }

    #[tokio::test]
    async fn too_large_and_overflowing_events_are_counted_and_announced() {
        let (now, subs) = (start(), FakeSubs::default());
        let mut hub = Hub::new(8, 8, 8, 1, SseQueueFull::DropNew, 120);
        let dev: Arc<str> = Arc::from("dev1");
        let (_, q) = hub
            .register(now, &dev, filters(&["t"]), false, &subs)
            .unwrap();
        let big = Bytes::from(vec![b'x'; 200]);
        let got = hub.deliver("t", &big, Qos::AtMostOnce, false, None);
        assert_eq!(
            got,
            Delivered {
                queued: 0,
                dropped_full: 0,
                dropped_large: 1,
                denied: 0,
            }
        );
        let small = Bytes::from_static(b"s");
        assert_eq!(
            hub.deliver("t", &small, Qos::AtMostOnce, false, None)
                .queued,
            1
        );
        let got = hub.deliver("t", &small, Qos::AtMostOnce, false, None);
        assert_eq!(
            got,
            Delivered {
                queued: 0,
                dropped_full: 1,
                dropped_large: 0,
                denied: 0,
            }
        );
        let (events, _) = drain(&q).await;
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], dropped_notice(2));
        assert_eq!(data(&events[1])["payload"], "s");
    }

    #[tokio::test]
    async fn close_all_ends_every_stream_and_unregister_closes_its_queue() {
        let (now, subs, mut hub) = (start(), FakeSubs::default(), hub());
        let dev: Arc<str> = Arc::from("dev1");
        let (a, qa) = hub
            .register(now, &dev, filters(&["a"]), false, &subs)
            .unwrap();
        let (_, qb) = hub
            .register(now, &dev, filters(&["b"]), false, &subs)
            .unwrap();
        hub.deliver("b", &Bytes::new(), Qos::AtMostOnce, false, None);
        let listed: Vec<_> = hub
            .streams()
            .map(|(d, f, n)| (d.to_string(), f.to_vec(), n))
            .collect();
        assert_eq!(listed.len(), 2);
        assert!(listed.contains(&("dev1".into(), filters(&["b"]), 1)));
        hub.unregister(now + Duration::from_secs(1), a, &subs);
        assert!(qa.is_closed());
        hub.close_all();
        let (events, ended) = drain(&qb).await;
        assert_eq!(
            (events.len(), ended),
            (1, true),
            "what was queued, then the end"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register {
            device: u8,
            filters: Vec<usize>,
            refuse: Option<usize>,
        },
        Unregister(usize),
        Deliver(usize),
    }

    const FILTERS: &[&str] = &["a/#", "a/b", "a/+", "#", "c", "+/b"];
    const TOPICS: &[&str] = &["a/b", "a", "c", "x/b", "a/c"];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3u8, proptest::collection::vec(0..FILTERS.len(), 0..4),
                  proptest::option::weighted(0.2, 0..FILTERS.len()))
                .prop_map(|(device, filters, refuse)| Op::Register { device, filters, refuse }),
            2 => any::<usize>().prop_map(Op::Unregister),
            2 => (0..TOPICS.len()).prop_map(Op::Deliver),
        ]
    }

    proptest! {
        #[test]
        fn register_unregister_sequences_keep_the_router_in_step(
            ops in proptest::collection::vec(op(), 1..40)
        ) {
            let now = start();
            let subs = FakeSubs::default();
            let mut hub = Hub::new(5, 3, 4, 64, SseQueueFull::DropOldest, 1 << 16);
            // The model: live streams (id, device, distinct filters, queue).
            let mut live: Vec<(StreamId, u8, Vec<&str>, Arc<StreamQueue>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Register { device, filters: picks, refuse } => {
                        let mut wanted: Vec<&str> = Vec::new();
                        for &i in &picks {
                            if !wanted.contains(&FILTERS[i]) {
                                wanted.push(FILTERS[i]);
                            }
                        }
                        let held: HashSet<&str> =
                            live.iter().flat_map(|s| s.2.iter().copied()).collect();
                        let new: Vec<&str> =
                            wanted.iter().copied().filter(|f| !held.contains(f)).collect();
                        subs.refuse.borrow_mut().clear();
                        if let Some(r) = refuse {
                            subs.refuse.borrow_mut().insert(FILTERS[r].to_owned());
                        }
                        let expected = if live.len() >= 5 {
                            Err(HubRefused::TooManyStreams)
                        } else if live.iter().filter(|s| s.1 == device).count() >= 3 {
                            Err(HubRefused::TooManyForDevice)
                        } else if held.len() + new.len() > 4 {
                            Err(HubRefused::FilterTableFull)
                        } else if refuse.is_some_and(|r| new.contains(&FILTERS[r])) {
                            Err(HubRefused::Subscribe(FailReason::QueueFull))
                        } else {
                            Ok(())
                        };
                        let dev: Arc<str> = Arc::from(format!("d{device}"));
                        let got = hub.register(
                            now,
                            &dev,
                            picks.iter().map(|&i| Arc::from(FILTERS[i])).collect(),
                            false,
                            &subs,
                        );
                        match got {
                            Ok((id, queue)) => {
                                prop_assert_eq!(expected, Ok(()));
                                live.push((id, device, wanted, queue));
                            }
                            Err(refused) => prop_assert_eq!(expected, Err(refused)),
                        }
                    }
                    Op::Unregister(pick) => {
                        if live.is_empty() {
                            hub.unregister(now, StreamId(u64::MAX), &subs);
                        } else {
                            let (id, ..) = live.remove(pick % live.len());
                            hub.unregister(now, id, &subs);
                        }
                    }
                    Op::Deliver(t) => {
                        let topic = TOPICS[t];
                        let got = hub.deliver(topic, &Bytes::new(), Qos::AtMostOnce, false, None);
                        let mut expected = 0;
                        for (_, _, filters, queue) in &live {
                            let hit = filters.iter().any(|f| topic::matches(f, topic));
                            expected += u64::from(hit);
                            let mut events = 0;
                            while queue.len() > 0 {
                                drop(queue.state.lock().unwrap().items.pop_front());
                                events += 1;
                            }
                            prop_assert_eq!(events, u64::from(hit), "once per stream");
                        }
                        prop_assert_eq!(got.queued, expected);
                    }
                }
                let mut model: Vec<String> = live
                    .iter()
                    .flat_map(|s| s.2.iter().map(|f| (*f).to_owned()))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                model.sort();
                prop_assert_eq!(subs.held(), model);
                prop_assert_eq!(hub.len(), live.len());
            }
            for (id, ..) in live.drain(..) {
                hub.unregister(now, id, &subs);
            }
            prop_assert!(subs.held().is_empty());
            prop_assert_eq!(hub.filter_count(), 0);
        }
    }

    #[tokio::test]
    async fn a_narrowed_acl_stops_events_of_open_streams() {
        use crate::identity::{Identity, IdentitySource};
        use crate::security::{Acl, Pattern, Rule};
        let (now, subs, mut hub) = (start(), FakeSubs::default(), hub());
        let dev: Arc<str> = Arc::from("dev1");
        let (id, _q) = hub
            .register(now, &dev, filters(&["cmd/#"]), false, &subs)
            .unwrap();
        hub.set_stream_identity(
            id,
            Identity::new("dev1", IdentitySource::HttpToken),
            Some(Arc::clone(&dev)),
        );
        let send = |hub: &mut Hub, topic: &str| {
            hub.deliver(
                topic,
                &Bytes::from_static(b"x"),
                Qos::AtMostOnce,
                false,
                None,
            )
        };
        assert_eq!(send(&mut hub, "cmd/dev2/led").queued, 1);
        hub.set_security(Arc::new(Policy {
            acl: Some(Acl::new(vec![Rule {
                identity: None,
                publish: Vec::new(),
                subscribe: vec![Pattern::new("cmd/{identity}/#").unwrap()],
            }])),
            ..Policy::default()
        }));
        let denied = send(&mut hub, "cmd/dev2/led");
        assert_eq!((denied.queued, denied.denied), (0, 1));
        assert_eq!(send(&mut hub, "cmd/dev1/led").queued, 1);
    }
}
