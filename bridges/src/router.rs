//! The hub between the ingresses (one per protocol driver) and the upstreams: a driver holds
//! an [`IngressHandle`] and never sees an upstream.
//!
//! ```text
//!  driver (MQTT-SN, CoAP ...) ── IngressHandle ──┬── append(message, token) ──> spool writer
//!     ^  ^                                       │   (own IngressAppender; verdicts come
//!     │  │ AppendReply (own channel) <───────────┘    back on its own reply channel)
//!     │  │                                       ├── subscribe(F) / unsubscribe(F) ──> Router:
//!     │  │                                       │   sensor filter F -> {ingress -> QoS};
//!     │  │                                       │   upstream u takes routes.upstream_filters(u, F),
//!     │  │                                       │   counted per upstream filter, highest QoS
//!     │  │                                       ├── deliver_local(message) ──> the OTHER
//!     │  │                                       │   ingresses whose filters match (try_send)
//!     │  │                                       └── upstream_available() <── any link watch up
//!     │  └── Downlink (own bounded channel, registered with IngressHandle::with_downlink)
//!     │          ^
//!     │   DownlinkRouter::run: upstreams' Downlink -> routes.downlink_topic -> matching
//!     │   ingresses, DownlinkAck split across them
//! ```
//!
//! Invariants (MUST hold; the unit tests below check them with fake [`Subscriber`]s):
//!
//! - **Subscriptions are reference counted across ingresses and routes.** A sensor filter F
//!   is held while at least one ingress wants it, at the highest QoS any of them wants; an
//!   ingress's unsubscribe removes only its own interest, and a lower maximum is passed on.
//!   For each upstream u, F takes the upstream filters `routes.upstream_filters(u, F)`
//!   (possibly several, possibly none), remembered with F so that its release gives back
//!   exactly what it took. An upstream filter is subscribed while at least one sensor filter
//!   holds it, at the highest QoS of those sensor filters (the union at the highest QoS). Each
//!   ingress keeps its own reference count per filter (the MQTT-SN core counts its sessions)
//!   and tells the router the QoS it wants and when it leaves. (The MQTT-SN core only ever
//!   raises a filter's QoS while it has subscribers; it does not pass on a lower maximum when
//!   its highest subscriber leaves.)
//! - **Bounded**: at most `max_filters` distinct sensor filters over all ingresses, and at
//!   most `max_filters` distinct upstream filters per upstream (the capacity of every
//!   upstream's subscription table); a new sensor filter beyond either is refused with
//!   [`FailReason::QueueFull`] and nothing is remembered.
//! - **Upstreams see changes in the order the router took them**: the calls to the
//!   [`Subscriber`]s are made under the router's lock. They never block (they queue the
//!   change for the upstream's own task), so the critical section stays short, and no lock
//!   is held across an `.await`: the downlink task and [`IngressHandle::deliver_local`]
//!   decide the targets under the lock and send after releasing it.
//! - A refused upstream change is logged at warn, at most once per
//!   [`SUBSCRIBE_WARN_INTERVAL`] (sensors trigger them), with the number refused since.
//! - **Downlink goes where it was subscribed.** [`DownlinkRouter::run`] maps a message's topic
//!   back with `routes.downlink_topic` (no mapping: acknowledged, counted as `unrouted`),
//!   then sends one copy to every ingress holding a sensor filter that matches it and that
//!   took an upstream filter on the message's upstream. When the upstream says which
//!   upstream filters the copy is for (`Downlink::filters`, MQTT 5 subscription
//!   identifiers), only the sensor filters behind those count, and each copy's `filters`
//!   names the ingress's own (sensor-side) filters. No ingress: acknowledged, counted as
//!   `unmatched`. The [`DownlinkAck`] is split across the copies: the broker gets its
//!   acknowledgement once every ingress acknowledged its copy, never if one was dropped.
//! - **Downlink backpressure**: the task awaits each target ingress's bounded channel in
//!   turn, so a slow ingress slows the downlink of every ingress (bounded memory; the
//!   upstreams stop reading from their brokers once their unacknowledged window is held). An
//!   ingress whose channel is closed loses its copy: the message is not acknowledged
//!   (counted as `ingress_gone`). Messages keep their order per ingress (one task).
//! - **Local delivery across ingresses**: [`IngressHandle::deliver_local`] hands a sensor's
//!   accepted message to the other ingresses whose filters match (never back to its own,
//!   whose core delivers it itself), with no acknowledgement to wait for. It never waits: a
//!   driver waiting on another driver's channel could deadlock with it, so a full channel
//!   loses the copy (counted as `local_dropped`).
//! - An ingress without a downlink channel ([`Router::ingress`] alone: an uplink-only
//!   ingress) is never a target.
//! - **Routes change live without a gap** ([`RouteReconfigurer::set_routes`]): the table is
//!   swapped under the lock, every held sensor filter is routed again, the upstream filters
//!   the new table adds are subscribed before those it drops are released (no moment with
//!   neither), and afterwards each sensor filter holds exactly what the new table gives it,
//!   so the reference counts above stay exact. Uplink and downlink judge by the new table
//!   from the next message on; the drains read the same [`SharedRoutes`].
//! - **Control topics never reach sensors** ([`Router::control`]): a message whose topic is
//!   its upstream's control topic (the fleet replay requests) goes to the control channel
//!   only, before any route is consulted, and only from that upstream: a request is taken
//!   from the connection it came on, which is its authentication. The control topic holds
//!   its upstream filter like a sensor filter that never leaves (subscribed at QoS 1, never
//!   unsubscribed when sensors sharing it leave), beside the sensors' `max_filters`: it is
//!   not counted there (the upstream's own table has room for one more). The
//!   channel is bounded: a message it has no room for is dropped (`control_dropped`). Either
//!   way the broker gets its acknowledgement (a request is not sensor data; the requester
//!   asks again when no answer comes).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::message::{Downlink, DownlinkAck, Message, Qos};
use crate::route::{RouteTable, SharedRoutes};
use crate::spool::{AppendReply, Appender, IngressAppender};
use crate::topic;
use crate::upstream::{FailReason, Subscriber};

/// Least time between two warnings about refused subscription changes (the refusals in
/// between are counted in the next one).
pub const SUBSCRIBE_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// The [`Downlink::upstream`] of a copy made by [`IngressHandle::deliver_local`]: it comes
/// from another ingress, not from an upstream.
pub const LOCAL_UPSTREAM: usize = usize::MAX;

/// One upstream as the router sees it: where subscriptions go, and its link state.
pub struct RoutedUpstream {
    /// Takes the union of the ingresses' filters (as routed).
    pub subscriber: Box<dyn Subscriber>,
    /// `true` while the upstream's link is up (the `Upstream::watch_link` of the same
    /// upstream).
    pub link: watch::Receiver<bool>,
}

/// The router's counters since start: downlink it dropped or acknowledged without delivering,
/// and uplink it refused.
#[derive(Debug, Default)]
pub struct DownlinkStats {
    /// Downlink messages taken from the upstreams (each counted once, however many copies).
    pub received: AtomicU64,
    /// Downlink messages no route maps back to a sensor topic: acknowledged, dropped.
    pub unrouted: AtomicU64,
    /// Downlink messages no ingress subscribed for: acknowledged, dropped.
    pub unmatched: AtomicU64,
    /// Copies for an ingress whose channel is closed: dropped, the message not acknowledged.
    pub ingress_gone: AtomicU64,
    /// Local copies for another ingress whose channel was full or closed: dropped.
    pub local_dropped: AtomicU64,
    /// Uplink messages refused by [`IngressHandle::append`] because no route matches their
    /// topic (see [`Router::unrouted`]).
    pub refused_no_route: AtomicU64,
    /// Downlink messages on a control topic handed to the control channel.
    pub control: AtomicU64,
    /// Downlink messages on a control topic dropped: the control channel was full or closed.
    pub control_dropped: AtomicU64,
}

/// A message that came on an upstream's control topic (see [`Router::control`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMessage {
    /// The upstream (by index) it came on: the only one its answer goes to.
    pub upstream: usize,
    /// Its topic (relative to the upstream).
    pub topic: String,
    /// Its payload, unchanged.
    pub payload: bytes::Bytes,
}

/// The holder of a control topic's upstream filter in the subscription tables: not a valid
/// filter (a NUL character), so never a sensor's.
const CONTROL_HOLDER: &str = "\u{0}control";

/// The hub: hands out one [`IngressHandle`] per ingress, and the [`DownlinkRouter`]. The
/// spool writer keeps running while the router or any of its handles is alive (the
/// downlink task does not hold it).
pub struct Router {
    shared: Arc<Shared>,
    /// The spool writer's entrance, from which each ingress gets its own appender.
    appender: Appender,
}

/// What the router, its handles and its downlink task share.
struct Shared {
    /// The `[[route]]` table: which messages are accepted, where subscriptions go, how
    /// downlink topics map back. Live: swapped only by [`RouteReconfigurer::set_routes`],
    /// under `state`'s lock, so the subscription tables always follow the table in force.
    routes: SharedRoutes,
    /// Every upstream, by index (the index in [`Downlink::upstream`] and in `routes`).
    upstreams: Vec<RoutedUpstream>,
    /// Most distinct sensor filters over all ingresses, and upstream filters per upstream.
    /// Read under `state`'s lock; changed by [`RouteReconfigurer::set_max_filters`].
    max_filters: AtomicUsize,
    /// Dropped or acknowledged-undelivered downlink.
    stats: Arc<DownlinkStats>,
    /// How many ingresses take downlink (`State::downlinks.len()`), readable without the
    /// lock: [`IngressHandle::has_peers`] is asked for every publish.
    takers: AtomicUsize,
    /// The subscription tables and the warning limiter, under a short-held lock.
    state: Mutex<State>,
    /// The control topics and their channel ([`Router::control`]), set once: read by every
    /// downlink message without the lock.
    control: OnceLock<Control>,
}

/// What [`Router::control`] set.
struct Control {
    /// Per upstream (by index): its control topic, if it has one.
    topics: Vec<Option<String>>,
    /// Where messages on a control topic go.
    tx: mpsc::Sender<ControlMessage>,
}

impl Control {
    /// Upstream `upstream`'s control topic, if it has one.
    fn topic(&self, upstream: usize) -> Option<&str> {
        self.topics.get(upstream)?.as_deref()
    }
}

#[derive(Default)]
struct State {
    /// Sensor filter -> what each ingress wants and what it took upstream; at most
    /// `max_filters` entries, none empty.
    filters: HashMap<Arc<str>, Wanted>,
    /// Per upstream (by index): upstream filter -> the sensor filters holding it; at most
    /// `max_filters` entries each, none empty.
    upstream_filters: Vec<HashMap<String, UpstreamFilter>>,
    /// Ingress id -> its downlink channel (ingresses that take downlink only).
    downlinks: BTreeMap<u64, mpsc::Sender<Downlink>>,
    /// The id the next ingress gets.
    next_ingress: u64,
    /// When the last refused change was logged, and how many were refused since: sensors
    /// trigger them, so the warning is rate-limited.
    warned: Option<Instant>,
    refused: u64,
}

/// The interest in one sensor filter.
struct Wanted {
    /// Ingress id -> the QoS it wants; never empty.
    by_ingress: BTreeMap<u64, Qos>,
    /// The QoS the upstream filters were asked for on its behalf: the highest in
    /// `by_ingress`.
    upstream: Qos,
    /// Per upstream (by index): the upstream filters this sensor filter took, as
    /// `routes.upstream_filters` gave them when it was new; its release gives back exactly
    /// these.
    routed: Vec<Vec<String>>,
}

impl Wanted {
    fn highest(&self) -> Qos {
        highest(self.by_ingress.values().copied())
    }
}

/// One filter on one upstream.
struct UpstreamFilter {
    /// Sensor filter -> the QoS it asked for; never empty.
    by_sensor: BTreeMap<Arc<str>, Qos>,
    /// The QoS the upstream was asked for: the highest in `by_sensor`.
    asked: Qos,
}

/// What an upstream must be told after a change of interest in one of its filters.
enum Change {
    None,
    Subscribe(Qos),
    Unsubscribe,
}

fn highest(qos: impl Iterator<Item = Qos>) -> Qos {
    qos.max_by_key(|q| qos_rank(*q)).unwrap_or(Qos::AtMostOnce)
}

const fn qos_rank(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

impl Router {
    /// A router over `upstreams` (by index, as in `routes`), appending through `appender`,
    /// holding at most `max_filters` distinct filters (the same limit the protocol cores
    /// keep). Give the drains the same [`SharedRoutes`] (an `Arc<RouteTable>` makes one of
    /// its own: fine where no drain reads the routes).
    #[must_use]
    pub fn new(
        appender: Appender,
        upstreams: Vec<RoutedUpstream>,
        max_filters: usize,
        routes: impl Into<SharedRoutes>,
    ) -> Self {
        let routes = routes.into();
        let state = State {
            upstream_filters: upstreams.iter().map(|_| HashMap::new()).collect(),
            ..State::default()
        };
        Router {
            shared: Arc::new(Shared {
                routes,
                upstreams,
                max_filters: AtomicUsize::new(max_filters),
                stats: Arc::new(DownlinkStats::default()),
                takers: AtomicUsize::new(0),
                state: Mutex::new(state),
                control: OnceLock::new(),
            }),
            appender,
        }
    }

    /// Registers an ingress: the spool's verdicts on its tokened appends come back on
    /// `replies` (see [`Appender::for_ingress`]: it MUST keep reading them). It takes no
    /// downlink until [`IngressHandle::with_downlink`] gives it a channel.
    #[must_use]
    pub fn ingress(&self, replies: mpsc::Sender<Vec<AppendReply>>) -> IngressHandle {
        let id = {
            let mut state = self.shared.lock();
            state.next_ingress += 1;
            state.next_ingress
        };
        IngressHandle {
            id,
            takes_downlink: false,
            appender: self.appender.for_ingress(replies),
            shared: Arc::clone(&self.shared),
        }
    }

    /// The task that takes the upstreams' downlink and hands it to the ingresses (see
    /// [`DownlinkRouter::run`]). It does not keep the spool writer running.
    #[must_use]
    pub fn downlink_router(&self) -> DownlinkRouter {
        DownlinkRouter {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The downlink counters (shared with the downlink task and the handles).
    #[must_use]
    pub fn downlink_stats(&self) -> Arc<DownlinkStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Messages refused at the ingresses because no route matches their topic, since start.
    #[must_use]
    pub fn unrouted(&self) -> u64 {
        self.shared.stats.refused_no_route.load(Ordering::Relaxed)
    }

    /// The handle that swaps the route table while the router runs (for a config reload).
    #[must_use]
    pub fn reconfigurer(&self) -> RouteReconfigurer {
        RouteReconfigurer {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Gives upstream `i` the control topic `topics[i]` (`None`: none): subscribed there now
    /// at QoS 1 (held for good, see the module docs), and every message on it that arrives
    /// on upstream `i` goes to `channel` instead of the sensors. Call it once, before the
    /// downlink task runs (a second call changes nothing); `now` only rate-limits the
    /// warning about a refusal.
    ///
    /// # Errors
    /// The upstreams that refused their control topic, by index, with the reason (their
    /// control messages are still intercepted, should a subscription bring any).
    pub fn control(
        &self,
        now: Instant,
        topics: Vec<Option<String>>,
        channel: mpsc::Sender<ControlMessage>,
    ) -> Result<(), Vec<(usize, FailReason)>> {
        let shared = &*self.shared;
        let mut guard = shared.lock();
        let state = &mut *guard;
        let control = Control {
            topics: topics.clone(),
            tx: channel,
        };
        if shared.control.set(control).is_err() {
            return Ok(());
        }
        let holder: Arc<str> = Arc::from(CONTROL_HOLDER);
        let mut refused = Vec::new();
        for (upstream, topic) in topics.iter().enumerate() {
            let Some(topic) = topic else { continue };
            if let Err(reason) =
                shared.set_interest(state, now, upstream, topic, &holder, Some(Qos::AtLeastOnce))
            {
                refused.push((upstream, reason));
            }
        }
        drop(guard);
        if refused.is_empty() {
            Ok(())
        } else {
            Err(refused)
        }
    }
}

/// Most refused upstream filters a [`RouteChange`] lists one by one (the rest are counted).
pub const MAX_LISTED_REFUSALS: usize = 32;

/// Swaps the router's route table while it runs (made by [`Router::reconfigurer`]).
#[derive(Clone)]
pub struct RouteReconfigurer {
    shared: Arc<Shared>,
}

/// What [`RouteReconfigurer::set_routes`] moved, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteChange {
    /// Sensor filters held when the table was swapped (each was routed again).
    pub sensor_filters: usize,
    /// Of those, the ones whose upstream filters changed.
    pub moved: usize,
    /// Upstream filters newly subscribed (or asked for at another QoS), over all upstreams.
    pub subscribed: usize,
    /// Upstream filters released (unsubscribed: no sensor filter holds them any more).
    pub unsubscribed: usize,
    /// Subscription changes the upstreams refused (each also logged, rate-limited); the
    /// router keeps the filters, as for a sensor's subscribe.
    pub refused: usize,
    /// The first [`MAX_LISTED_REFUSALS`] refusals: upstream name, upstream filter, why.
    pub refusals: Vec<(String, String, FailReason)>,
    /// Upstreams (by name) left holding more than `max_filters` upstream filters: new
    /// sensor filters that would take another one there are refused until it drops below.
    pub over_capacity: Vec<String>,
}

impl RouteChange {
    /// Whether no upstream subscription moved.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.subscribed == 0 && self.unsubscribed == 0 && self.refused == 0
    }
}

impl RouteReconfigurer {
    /// Puts `routes` in force for the ingresses, the downlink task and the drains (they read
    /// one [`SharedRoutes`]), and moves the upstream subscriptions with it, atomically as
    /// seen from outside:
    ///
    /// 1. under the router's lock (no subscribe, unsubscribe or downlink decision in between),
    ///    the table is swapped;
    /// 2. for every sensor filter held, the upstream filters the new table gives are taken
    ///    (subscribed upstream where new) **before** any it no longer gives is released, so a
    ///    filter both tables give is never unsubscribed and no upstream is left, even for a
    ///    moment, with neither the old nor the new filter;
    /// 3. then the released ones are given back (unsubscribed where no sensor filter holds
    ///    them any more); reference counts stay exact: each sensor filter then holds exactly
    ///    what the new table gives it;
    /// 4. a subscribe an upstream refused for a full table in step 2 is asked again once the
    ///    releases made room.
    ///
    /// Uplink (`accepts`, the drains' `target`) and downlink mapping use the new table from
    /// the next message on. The upstreams' refusals are logged (rate-limited) and counted in
    /// the returned [`RouteChange`]. Never waits: the upstreams queue the changes for their
    /// own tasks (`async` so a later version may wait for their answers).
    pub async fn set_routes(&self, routes: Arc<RouteTable>) -> RouteChange {
        self.apply(clock_now(), routes)
    }

    /// A new bound on distinct sensor filters and on upstream filters per upstream (a
    /// reload's `max_filters`): it applies to the next new filter; a lower bound drops no
    /// filter already held, new ones are refused until the tables are below it.
    pub fn set_max_filters(&self, max_filters: usize) {
        let shared = &*self.shared;
        // Under the lock, so no subscribe sees half a change.
        let _state = shared.lock();
        shared.max_filters.store(max_filters, Ordering::Relaxed);
    }

    /// [`Self::set_routes`] with the time passed in (it only rate-limits warnings).
    fn apply(&self, now: Instant, routes: Arc<RouteTable>) -> RouteChange {
        let shared = &*self.shared;
        let mut guard = shared.lock();
        let state = &mut *guard;
        shared.routes.store(Arc::clone(&routes));
        let mut change = RouteChange {
            sensor_filters: state.filters.len(),
            ..RouteChange::default()
        };
        // Sensor filter -> (what it takes now, what it took before), for those that moved.
        let mut moves: Vec<(Arc<str>, Qos, Vec<Vec<String>>)> = Vec::new();
        for (sensor, wanted) in &state.filters {
            let routed = shared.routed(&routes, sensor);
            if routed != wanted.routed {
                moves.push((Arc::clone(sensor), wanted.upstream, routed));
            }
        }
        change.moved = moves.len();
        let mut retry: Vec<(usize, String)> = Vec::new();
        // Step 2: take every new upstream filter first.
        for (sensor, qos, routed) in &moves {
            let Some(old) = state.filters.get(sensor).map(|w| w.routed.clone()) else {
                continue;
            };
            for (upstream, filters) in routed.iter().enumerate() {
                let before = old.get(upstream);
                for filter in filters {
                    if before.is_some_and(|b| b.contains(filter)) {
                        continue;
                    }
                    match shared.set_interest(state, now, upstream, filter, sensor, Some(*qos)) {
                        Ok(Change::None) => {}
                        Ok(_) => change.subscribed += 1,
                        Err(FailReason::QueueFull) => retry.push((upstream, filter.clone())),
                        Err(reason) => change.refuse(shared, upstream, filter, reason),
                    }
                }
            }
        }
        // Step 3: then give back what the new table no longer gives.
        for (sensor, _, routed) in moves {
            let Some(wanted) = state.filters.get_mut(&sensor) else {
                continue;
            };
            let old = std::mem::replace(&mut wanted.routed, routed.clone());
            for (upstream, filters) in old.iter().enumerate() {
                let after = routed.get(upstream);
                for filter in filters {
                    if after.is_some_and(|a| a.contains(filter)) {
                        continue;
                    }
                    match shared.set_interest(state, now, upstream, filter, &sensor, None) {
                        Ok(Change::Unsubscribe) => change.unsubscribed += 1,
                        // A lower QoS of the others: asked for again.
                        Ok(Change::Subscribe(_)) => change.subscribed += 1,
                        Ok(Change::None) => {}
                        Err(reason) => change.refuse(shared, upstream, filter, reason),
                    }
                }
            }
        }
        // Step 4: the subscribes a full upstream table refused, now that releases made room.
        for (upstream, filter) in retry {
            let (Some(up), Some(entry)) = (
                shared.upstreams.get(upstream),
                state
                    .upstream_filters
                    .get(upstream)
                    .and_then(|t| t.get(&filter)),
            ) else {
                continue;
            };
            match up.subscriber.subscribe(&filter, entry.asked) {
                Ok(()) => change.subscribed += 1,
                Err(reason) => {
                    state.refused(now, up.subscriber.name(), &filter, reason);
                    change.refuse(shared, upstream, &filter, reason);
                }
            }
        }
        for upstream in 0..state.upstream_filters.len() {
            if shared.sensor_held(state, upstream) > shared.max_filters.load(Ordering::Relaxed)
                && let Some(up) = shared.upstreams.get(upstream)
            {
                change.over_capacity.push(up.subscriber.name().to_owned());
            }
        }
        drop(guard);
        if change.refused > 0 || !change.over_capacity.is_empty() {
            tracing::warn!(
                refused = change.refused,
                over_capacity = ?change.over_capacity,
                "Routes changed; some upstream subscriptions could not follow."
            );
        }
        tracing::info!(
            sensor_filters = change.sensor_filters,
            moved = change.moved,
            subscribed = change.subscribed,
            unsubscribed = change.unsubscribed,
            refused = change.refused,
            "Routes changed."
        );
        change
    }
}

impl RouteChange {
    /// Counts (and lists, up to [`MAX_LISTED_REFUSALS`]) one refused change.
    fn refuse(&mut self, shared: &Shared, upstream: usize, filter: &str, reason: FailReason) {
        self.refused += 1;
        if self.refusals.len() < MAX_LISTED_REFUSALS {
            let name = shared
                .upstreams
                .get(upstream)
                .map_or_else(String::new, |up| up.subscriber.name().to_owned());
            self.refusals.push((name, filter.to_owned(), reason));
        }
    }
}

/// The clock, for rate-limiting warnings only (the routing itself takes no time).
#[allow(clippy::disallowed_methods)]
fn clock_now() -> Instant {
    Instant::now()
}

/// Why [`IngressHandle::append`] refused a message; it is given back either way and no reply
/// follows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendRefused {
    /// The spool writer's queue is full (or the writer stopped): a transient refusal, the
    /// message may be appended again once there is room ([`IngressHandle::room_since`]).
    #[error("spool queue full")]
    QueueFull(Message),
    /// With `[[route]]`s configured, no route matches the topic: the message goes nowhere,
    /// a retry would not help. Counted in [`Router::unrouted`].
    #[error("no route matches the topic")]
    NoRoute(Message),
}

impl AppendRefused {
    /// The refused message.
    #[must_use]
    pub fn into_message(self) -> Message {
        match self {
            Self::QueueFull(m) | Self::NoRoute(m) => m,
        }
    }

    /// A short tag for metrics and logs.
    #[must_use]
    pub const fn error_code(&self) -> &'static str {
        match self {
            Self::QueueFull(_) => "queue_full",
            Self::NoRoute(_) => "no_route",
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every await-free step; a panic elsewhere does not
        // make it wrong.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The control channel, when `topic` is upstream `upstream`'s control topic.
    fn control_channel(
        &self,
        upstream: usize,
        topic: &str,
    ) -> Option<&mpsc::Sender<ControlMessage>> {
        let control = self.control.get()?;
        (control.topic(upstream)? == topic).then_some(&control.tx)
    }

    /// Upstream filters upstream `upstream` holds for sensors (see [`State::sensor_held`]).
    fn sensor_held(&self, state: &State, upstream: usize) -> usize {
        let control = self.control.get().and_then(|c| c.topic(upstream));
        state.sensor_held(upstream, control)
    }

    /// Sets (`Some`) or removes (`None`) sensor filter `sensor`'s interest in upstream filter
    /// `filter` of upstream `upstream`, and tells the upstream when the union changes; called
    /// under the lock (see module docs). A refusal is logged (rate-limited) and returned.
    fn set_interest(
        &self,
        state: &mut State,
        now: Instant,
        upstream: usize,
        filter: &str,
        sensor: &Arc<str>,
        qos: Option<Qos>,
    ) -> Result<Change, FailReason> {
        let Some(table) = state.upstream_filters.get_mut(upstream) else {
            return Ok(Change::None);
        };
        let change = match (qos, table.get_mut(filter)) {
            (Some(qos), None) => {
                let by_sensor = BTreeMap::from([(Arc::clone(sensor), qos)]);
                table.insert(
                    filter.to_owned(),
                    UpstreamFilter {
                        by_sensor,
                        asked: qos,
                    },
                );
                Change::Subscribe(qos)
            }
            (Some(qos), Some(entry)) => {
                entry.by_sensor.insert(Arc::clone(sensor), qos);
                entry.update()
            }
            (None, None) => Change::None,
            (None, Some(entry)) => {
                if entry.by_sensor.remove(sensor).is_none() {
                    Change::None
                } else if entry.by_sensor.is_empty() {
                    table.remove(filter);
                    Change::Unsubscribe
                } else {
                    entry.update()
                }
            }
        };
        let Some(up) = self.upstreams.get(upstream) else {
            return Ok(Change::None);
        };
        let result = match change {
            Change::None => Ok(()),
            Change::Subscribe(qos) => up.subscriber.subscribe(filter, qos),
            Change::Unsubscribe => up.subscriber.unsubscribe(filter),
        };
        if let Err(reason) = result {
            state.refused(now, up.subscriber.name(), filter, reason);
            return Err(reason);
        }
        Ok(change)
    }

    /// The upstream filters `routes` gives sensor filter `filter`, per upstream.
    fn routed(&self, routes: &RouteTable, filter: &str) -> Vec<Vec<String>> {
        (0..self.upstreams.len())
            .map(|upstream| routes.upstream_filters(upstream, filter))
            .collect()
    }

    /// Sets `sensor`'s interest in every upstream filter of `routed` (see [`Self::set_interest`]).
    fn set_all(
        &self,
        state: &mut State,
        now: Instant,
        routed: &[Vec<String>],
        sensor: &Arc<str>,
        qos: Option<Qos>,
    ) {
        for (upstream, filters) in routed.iter().enumerate() {
            for filter in filters {
                // Refusals are logged there; the filter stays held (see `subscribe`).
                let _ = self.set_interest(state, now, upstream, filter, sensor, qos);
            }
        }
    }

    /// Where a downlink message that arrived on `upstream` goes: per ingress, its channel and
    /// the sensor filters the copy is for. `sensor_topic` is the topic mapped back; `filters`
    /// the upstream filters the broker named, if it did. Decided under the lock, sent after.
    fn downlink_targets(
        &self,
        upstream: usize,
        sensor_topic: &str,
        filters: Option<&[Arc<str>]>,
    ) -> Vec<(mpsc::Sender<Downlink>, Vec<Arc<str>>)> {
        let state = self.lock();
        let Some(table) = state.upstream_filters.get(upstream) else {
            return Vec::new();
        };
        let mut by_ingress: BTreeMap<u64, Vec<Arc<str>>> = BTreeMap::new();
        let mut add = |sensor: &Arc<str>, wanted: &Wanted| {
            if !topic::matches(sensor, sensor_topic) {
                return;
            }
            for &ingress in wanted.by_ingress.keys() {
                let list = by_ingress.entry(ingress).or_default();
                if !list.contains(sensor) {
                    list.push(Arc::clone(sensor));
                }
            }
        };
        match filters {
            // The copy is for the sensor filters behind the upstream filters it names.
            Some(filters) => {
                for filter in filters {
                    let Some(entry) = table.get(&**filter) else {
                        continue;
                    };
                    for sensor in entry.by_sensor.keys() {
                        if let Some(wanted) = state.filters.get(sensor) {
                            add(sensor, wanted);
                        }
                    }
                }
            }
            // Every sensor filter that matches and was subscribed on this upstream.
            None => {
                for (sensor, wanted) in &state.filters {
                    if wanted.routed.get(upstream).is_some_and(|f| !f.is_empty()) {
                        add(sensor, wanted);
                    }
                }
            }
        }
        by_ingress
            .into_iter()
            .filter_map(|(id, filters)| Some((state.downlinks.get(&id)?.clone(), filters)))
            .collect()
    }
}

impl UpstreamFilter {
    /// Recomputes the union's QoS after a change; the upstream is asked again if it moved.
    fn update(&mut self) -> Change {
        let qos = highest(self.by_sensor.values().copied());
        if qos == self.asked {
            Change::None
        } else {
            self.asked = qos;
            Change::Subscribe(qos)
        }
    }
}

impl State {
    /// Upstream filters upstream `upstream` holds for sensors: its control topic (`control`)
    /// does not count when nothing but the control holds it.
    fn sensor_held(&self, upstream: usize, control: Option<&str>) -> usize {
        let Some(table) = self.upstream_filters.get(upstream) else {
            return 0;
        };
        let control_only = control
            .and_then(|topic| table.get(topic))
            .is_some_and(|entry| {
                entry.by_sensor.len() == 1 && entry.by_sensor.contains_key(CONTROL_HOLDER)
            });
        table.len() - usize::from(control_only)
    }

    /// Logs a refused subscription change at warn, at most once per
    /// [`SUBSCRIBE_WARN_INTERVAL`], with the number refused since the last warning.
    fn refused(&mut self, now: Instant, upstream: &str, filter: &str, reason: FailReason) {
        self.refused += 1;
        if self
            .warned
            .is_some_and(|at| now.saturating_duration_since(at) < SUBSCRIBE_WARN_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            upstream,
            filter,
            reason = reason.error_code(),
            refused = self.refused,
            "Upstream refused a subscription change; subscribers of this filter get nothing from it."
        );
        self.warned = Some(now);
        self.refused = 0;
    }
}

/// The downlink hub's task (made by [`Router::downlink_router`]).
pub struct DownlinkRouter {
    shared: Arc<Shared>,
}

impl DownlinkRouter {
    /// Takes every upstream's downlink from `downlink` and hands each message to the
    /// ingresses that subscribed for it (see the module docs), until `stop` is cancelled or
    /// every upstream is gone. A message being sent when `stop` fires is dropped
    /// unacknowledged.
    pub async fn run(self, mut downlink: mpsc::Receiver<Downlink>, stop: CancellationToken) {
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => break,
                message = downlink.recv() => match message {
                    Some(message) => message,
                    None => break,
                },
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.route(message) => {}
            }
        }
        let stats = &self.shared.stats;
        tracing::debug!(
            received = stats.received.load(Ordering::Relaxed),
            unrouted = stats.unrouted.load(Ordering::Relaxed),
            unmatched = stats.unmatched.load(Ordering::Relaxed),
            ingress_gone = stats.ingress_gone.load(Ordering::Relaxed),
            local_dropped = stats.local_dropped.load(Ordering::Relaxed),
            "Downlink router stopped."
        );
    }

    /// Hands one message to its ingresses, waiting for room in each one's channel in turn.
    async fn route(&self, message: Downlink) {
        let Downlink {
            upstream,
            topic,
            payload,
            qos,
            retain,
            filters,
            ack,
        } = message;
        let stats = &self.shared.stats;
        stats.received.fetch_add(1, Ordering::Relaxed);
        if let Some(control) = self.shared.control_channel(upstream, &topic) {
            let message = ControlMessage {
                upstream,
                topic,
                payload,
            };
            if control.try_send(message).is_ok() {
                stats.control.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.control_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(upstream, "Control message dropped: its channel is full.");
            }
            ack.ack();
            return;
        }
        // `None` inside: the topic is unchanged (no copy made). The table is read once, and
        // not held across the sends below.
        let mapped = self
            .shared
            .routes
            .read()
            .downlink_topic(upstream, &topic)
            .map(|mapped| match mapped {
                Cow::Borrowed(same) if same == topic.as_str() => None,
                Cow::Borrowed(part) => Some(part.to_owned()),
                Cow::Owned(mapped) => Some(mapped),
            });
        let sensor_topic = match mapped {
            Some(None) => topic,
            Some(Some(mapped)) => mapped,
            None => {
                stats.unrouted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(upstream, %topic, "Downlink message no route maps back; dropped.");
                ack.ack();
                return;
            }
        };
        let targets = self
            .shared
            .downlink_targets(upstream, &sensor_topic, filters.as_deref());
        if targets.is_empty() {
            stats.unmatched.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(upstream, topic = %sensor_topic, "Downlink message nobody subscribed for; dropped.");
        }
        let parts = ack.split(targets.len());
        // Only with filters from the upstream do the copies name theirs (see `Downlink`).
        let named = filters.is_some();
        for ((channel, filters), ack) in targets.into_iter().zip(parts) {
            let copy = Downlink {
                upstream,
                topic: sensor_topic.clone(),
                payload: payload.clone(),
                qos,
                retain,
                filters: named.then_some(filters),
                ack,
            };
            // A closed channel hands the copy back and drops it: its ack part with it, so the
            // broker is not acknowledged.
            if channel.send(copy).await.is_err() {
                stats.ingress_gone.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(upstream, "Downlink copy for a stopped ingress dropped.");
            }
        }
    }
}

/// One ingress's way into the pipeline (made by [`Router::ingress`]): appends to the spool
/// with its verdicts on its own channel, subscriptions counted across all ingresses, and its
/// share of the downlink on its own channel.
pub struct IngressHandle {
    /// Tells this ingress's interest apart in the subscription table.
    id: u64,
    /// Whether it registered a downlink channel.
    takes_downlink: bool,
    /// This ingress's entrance to the spool writer (its own reply route).
    appender: IngressAppender,
    shared: Arc<Shared>,
}

impl IngressHandle {
    /// This ingress takes downlink: the copies for its filters (from the upstreams, and the
    /// other ingresses' local messages) come on `downlink`, a bounded channel it MUST keep
    /// reading (the downlink of every ingress waits while it is full). A QoS >= 1 copy's
    /// [`DownlinkAck`] is acknowledged once the ingress took responsibility for it.
    #[must_use]
    pub fn with_downlink(mut self, downlink: mpsc::Sender<Downlink>) -> Self {
        let mut state = self.shared.lock();
        if state.downlinks.insert(self.id, downlink).is_none() {
            self.shared.takers.fetch_add(1, Ordering::Relaxed);
        }
        drop(state);
        self.takes_downlink = true;
        self
    }

    /// Queues `message` for the spool; with a token, an [`AppendReply`] carrying it follows
    /// on this ingress's reply channel. Never blocks.
    ///
    /// # Errors
    /// The message is given back, and no reply follows:
    /// - [`AppendRefused::NoRoute`]: routes are configured and none matches its topic
    ///   (counted in [`Router::unrouted`]; logged at warn when the count reaches a power of
    ///   two, so a sensor publishing to a wrong topic cannot flood the log, and at debug
    ///   otherwise);
    /// - [`AppendRefused::QueueFull`]: the writer's queue is full (or the writer stopped).
    pub fn append(&self, message: Message, token: Option<u64>) -> Result<(), AppendRefused> {
        if !self.shared.routes.read().accepts(&message.topic) {
            let count = self
                .shared
                .stats
                .refused_no_route
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if count.is_power_of_two() {
                tracing::warn!(
                    topic = %message.topic,
                    unrouted = count,
                    "No route matches the topic of a message; it was refused."
                );
            } else {
                tracing::debug!(topic = %message.topic, unrouted = count, "Message refused: no route.");
            }
            return Err(AppendRefused::NoRoute(message));
        }
        self.appender
            .append(message, token)
            .map_err(AppendRefused::QueueFull)
    }

    /// Whether a message on `topic` would pass the route check of [`Self::append`]. An
    /// ingress that takes several messages as one unit (an HTTP batch) checks every topic
    /// first and appends nothing when one has no route. A reload may swap the routes between
    /// this check and the append ([`RouteReconfigurer::set_routes`]): the append then judges
    /// by the new table (a batch may be refused part way; its sender is told). Counts
    /// nothing.
    #[must_use]
    pub fn accepts(&self, topic: &str) -> bool {
        self.shared.routes.read().accepts(topic)
    }

    /// A mark of the spool writer's progress, for [`Self::room_since`]: take it before an
    /// [`Self::append`] that may be refused with [`AppendRefused::QueueFull`].
    #[must_use]
    pub fn room_mark(&self) -> u64 {
        self.appender.room_mark()
    }

    /// Resolves once the spool writer has taken from its queue since `mark` (room for
    /// appends again) or has stopped; a driver refused with [`AppendRefused::QueueFull`]
    /// waits on it before reading its sockets again (backpressure). Never polls.
    pub async fn room_since(&self, mark: u64) {
        self.appender.room_since(mark).await;
    }

    /// Whether another ingress takes downlink: only then does [`Self::deliver_local`] have
    /// anyone to deliver to (a driver may skip keeping copies otherwise).
    #[must_use]
    pub fn has_peers(&self) -> bool {
        self.shared.takers.load(Ordering::Relaxed) > usize::from(self.takes_downlink)
    }

    /// A sensor of this ingress published `message` and it was accepted (QoS 0 on receipt,
    /// QoS 1/2 once durable, a Will when published): a copy goes to every other ingress
    /// whose filters match, at the QoS published, with nothing to acknowledge. This
    /// ingress's own subscribers are its own business. Never waits: a full or closed channel
    /// loses the copy (counted as `local_dropped`).
    pub fn deliver_local(&self, message: &Message) {
        let targets = {
            let state = self.shared.lock();
            if !state.downlinks.keys().any(|&id| id != self.id) {
                return;
            }
            let mut by_ingress: BTreeMap<u64, Vec<Arc<str>>> = BTreeMap::new();
            for (sensor, wanted) in &state.filters {
                if !topic::matches(sensor, &message.topic) {
                    continue;
                }
                for &ingress in wanted.by_ingress.keys().filter(|&&id| id != self.id) {
                    by_ingress
                        .entry(ingress)
                        .or_default()
                        .push(Arc::clone(sensor));
                }
            }
            by_ingress
                .into_iter()
                .filter_map(|(id, filters)| Some((state.downlinks.get(&id)?.clone(), filters)))
                .collect::<Vec<_>>()
        };
        for (channel, filters) in targets {
            let copy = Downlink {
                upstream: LOCAL_UPSTREAM,
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                qos: message.qos,
                retain: message.retain,
                filters: Some(filters),
                ack: DownlinkAck::none(),
            };
            if channel.try_send(copy).is_err() {
                self.shared
                    .stats
                    .local_dropped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(topic = %message.topic, "Local copy for another ingress dropped: its channel is full or closed.");
            }
        }
    }

    /// This ingress wants `filter` at `qos` (its current highest; lower than before lowers
    /// it). The upstreams are asked (for the filters the routes give, see the module docs)
    /// when the filter is new or its highest QoS over all ingresses changes; their refusals
    /// are logged (rate-limited) here, and do not fail the call (another upstream may have
    /// taken it). `now` only rate-limits the warning.
    ///
    /// # Errors
    /// [`FailReason::QueueFull`] when `filter` is new and `max_filters` sensor filters are
    /// held, or it would take an upstream beyond `max_filters` upstream filters: nothing is
    /// remembered, and nothing is asked upstream.
    pub fn subscribe(&self, now: Instant, filter: &str, qos: Qos) -> Result<(), FailReason> {
        let shared = &*self.shared;
        let mut guard = shared.lock();
        let state = &mut *guard;
        if let Some(wanted) = state.filters.get_mut(filter) {
            wanted.by_ingress.insert(self.id, qos);
            let highest = wanted.highest();
            if highest != wanted.upstream {
                wanted.upstream = highest;
                let routed = wanted.routed.clone();
                let sensor: Arc<str> = Arc::from(filter);
                shared.set_all(state, now, &routed, &sensor, Some(highest));
            }
            return Ok(());
        }
        let routed = shared.routed(&shared.routes.read(), filter);
        let max_filters = shared.max_filters.load(Ordering::Relaxed);
        let room = state.filters.len() < max_filters
            && routed.iter().enumerate().all(|(upstream, filters)| {
                let table = state.upstream_filters.get(upstream);
                let held = shared.sensor_held(state, upstream);
                let new = filters
                    .iter()
                    .filter(|f| !table.is_some_and(|t| t.contains_key(*f)))
                    .count();
                held + new <= max_filters
            });
        if !room {
            state.refused(now, "router", filter, FailReason::QueueFull);
            return Err(FailReason::QueueFull);
        }
        let sensor: Arc<str> = Arc::from(filter);
        shared.set_all(state, now, &routed, &sensor, Some(qos));
        let wanted = Wanted {
            by_ingress: BTreeMap::from([(self.id, qos)]),
            upstream: qos,
            routed,
        };
        state.filters.insert(sensor, wanted);
        Ok(())
    }

    /// This ingress no longer wants `filter`. Its upstream filters are released once no
    /// ingress wants it (unsubscribed upstream once no sensor filter holds them), or asked
    /// for the lower highest QoS of the others; an unknown filter is ignored. Upstream
    /// refusals are logged (rate-limited); `now` only rate-limits that.
    pub fn unsubscribe(&self, now: Instant, filter: &str) {
        let shared = &*self.shared;
        let mut guard = shared.lock();
        let state = &mut *guard;
        let Some(wanted) = state.filters.get_mut(filter) else {
            return;
        };
        if wanted.by_ingress.remove(&self.id).is_none() {
            return;
        }
        if wanted.by_ingress.is_empty() {
            if let Some((sensor, wanted)) = state.filters.remove_entry(filter) {
                shared.set_all(state, now, &wanted.routed, &sensor, None);
            }
            return;
        }
        let highest = wanted.highest();
        if highest != wanted.upstream {
            wanted.upstream = highest;
            let routed = wanted.routed.clone();
            let sensor: Arc<str> = Arc::from(filter);
            shared.set_all(state, now, &routed, &sensor, Some(highest));
        }
    }

    /// Whether any upstream's link is up (for MQTT-SN ADVERTISE / GWINFO). Cheap: reads the
    /// links' watches without waiting.
    #[must_use]
    pub fn upstream_available(&self) -> bool {
        self.shared.upstreams.iter().any(|up| *up.link.borrow())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;
    use crate::spool::{
        FsyncPolicy, SharedSpool, Spool, SpoolConfig, StdFs, WhenFull, start_writer,
    };

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Sub(String, Qos),
        Unsub(String),
    }

    /// Records every call; refuses every subscribe while `refuse` is set, and a new filter
    /// beyond `capacity` held ones with `QueueFull` (like an upstream's subscription table).
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<Call>>>,
        refuse: Option<FailReason>,
        capacity: Option<usize>,
        held: Arc<Mutex<std::collections::BTreeSet<String>>>,
    }

    impl Fake {
        fn take(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl Subscriber for Fake {
        fn name(&self) -> &str {
            "fake"
        }

        fn subscribe(&self, filter: &str, qos: Qos) -> Result<(), FailReason> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Sub(filter.to_owned(), qos));
            if let Some(reason) = self.refuse {
                return Err(reason);
            }
            let mut held = self.held.lock().unwrap();
            if !held.contains(filter) && self.capacity.is_some_and(|c| held.len() >= c) {
                return Err(FailReason::QueueFull);
            }
            held.insert(filter.to_owned());
            Ok(())
        }

        fn unsubscribe(&self, filter: &str) -> Result<(), FailReason> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Unsub(filter.to_owned()));
            self.held.lock().unwrap().remove(filter);
            Ok(())
        }
    }

    struct Setup {
        router: Router,
        fakes: Vec<Fake>,
        links: Vec<watch::Sender<bool>>,
        _dir: tempfile::TempDir,
    }

    fn setup(fakes: Vec<Fake>, max_filters: usize) -> Setup {
        setup_with(fakes, max_filters, RouteTable::everything())
    }

    fn setup_with(fakes: Vec<Fake>, max_filters: usize, routes: RouteTable) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            dir: PathBuf::from(dir.path()),
            max_bytes: 1 << 20,
            segment_bytes: 64 << 10,
            min_free_bytes: 0,
            max_age: None,
            when_full: WhenFull::RejectNew,
            fsync: FsyncPolicy::Always,
            memory_tail_bytes: 8 << 20,
            retain_bytes: 0,
        };
        let (spool, _) = Spool::open(StdFs, config, &["up".to_owned()]).unwrap();
        let (appender, _writer) = start_writer(SharedSpool::new(spool), 16).unwrap();
        let mut links = Vec::new();
        let upstreams = fakes
            .iter()
            .map(|fake| {
                let (tx, rx) = watch::channel(false);
                links.push(tx);
                RoutedUpstream {
                    subscriber: Box::new(fake.clone()),
                    link: rx,
                }
            })
            .collect();
        Setup {
            router: Router::new(appender, upstreams, max_filters, Arc::new(routes)),
            fakes,
            links,
            _dir: dir,
        }
    }

    fn ingress(router: &Router) -> IngressHandle {
        router.ingress(mpsc::channel(4).0)
    }

    fn sub(filter: &str, qos: Qos) -> Call {
        Call::Sub(filter.to_owned(), qos)
    }

    #[allow(clippy::disallowed_methods)] // Only rate-limits warnings here.
    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn a_filter_stays_subscribed_while_any_ingress_wants_it() {
        let s = setup(vec![Fake::default(), Fake::default()], 8);
        let (a, b) = (ingress(&s.router), ingress(&s.router));
        a.subscribe(now(), "t/#", Qos::AtLeastOnce).unwrap();
        b.subscribe(now(), "t/#", Qos::AtLeastOnce).unwrap();
        for fake in &s.fakes {
            assert_eq!(fake.take(), [sub("t/#", Qos::AtLeastOnce)], "asked once");
        }
        a.unsubscribe(now(), "t/#");
        assert_eq!(s.fakes[0].take(), [], "b still wants it");
        b.unsubscribe(now(), "t/#");
        for fake in &s.fakes {
            assert_eq!(fake.take(), [Call::Unsub("t/#".to_owned())]);
        }
    }

    #[test]
    fn the_upstream_gets_the_highest_qos_and_a_lower_one_when_it_leaves() {
        let s = setup(vec![Fake::default()], 8);
        let (a, b) = (ingress(&s.router), ingress(&s.router));
        a.subscribe(now(), "x", Qos::AtMostOnce).unwrap();
        b.subscribe(now(), "x", Qos::ExactlyOnce).unwrap();
        a.subscribe(now(), "x", Qos::AtLeastOnce).unwrap();
        assert_eq!(
            s.fakes[0].take(),
            [sub("x", Qos::AtMostOnce), sub("x", Qos::ExactlyOnce)],
            "a's raise below b's QoS changes nothing upstream"
        );
        b.unsubscribe(now(), "x");
        assert_eq!(s.fakes[0].take(), [sub("x", Qos::AtLeastOnce)]);
    }

    #[test]
    fn an_unsubscribe_from_an_ingress_that_never_subscribed_changes_nothing() {
        let s = setup(vec![Fake::default()], 8);
        let (a, b) = (ingress(&s.router), ingress(&s.router));
        a.subscribe(now(), "x", Qos::AtLeastOnce).unwrap();
        b.unsubscribe(now(), "x");
        b.unsubscribe(now(), "unknown");
        assert_eq!(s.fakes[0].take(), [sub("x", Qos::AtLeastOnce)]);
    }

    #[test]
    fn new_filters_beyond_max_filters_are_refused_across_ingresses() {
        let s = setup(vec![Fake::default()], 2);
        let (a, b) = (ingress(&s.router), ingress(&s.router));
        a.subscribe(now(), "one", Qos::AtMostOnce).unwrap();
        b.subscribe(now(), "two", Qos::AtMostOnce).unwrap();
        assert_eq!(
            a.subscribe(now(), "three", Qos::AtMostOnce),
            Err(FailReason::QueueFull)
        );
        // An existing filter still takes another ingress.
        a.subscribe(now(), "two", Qos::AtLeastOnce).unwrap();
        assert_eq!(
            s.fakes[0].take(),
            [
                sub("one", Qos::AtMostOnce),
                sub("two", Qos::AtMostOnce),
                sub("two", Qos::AtLeastOnce)
            ],
            "nothing asked upstream for the refused filter"
        );
        // Room again once a filter is gone.
        b.unsubscribe(now(), "one");
        a.unsubscribe(now(), "one");
        b.subscribe(now(), "three", Qos::AtMostOnce).unwrap();
    }

    #[test]
    fn an_upstream_refusal_is_logged_not_returned_and_the_filter_is_kept() {
        let refusing = Fake {
            refuse: Some(FailReason::Rejected),
            ..Fake::default()
        };
        let s = setup(vec![refusing, Fake::default()], 8);
        let a = ingress(&s.router);
        a.subscribe(now(), "x", Qos::AtLeastOnce).unwrap();
        assert_eq!(s.fakes[1].take(), [sub("x", Qos::AtLeastOnce)]);
        a.unsubscribe(now(), "x");
        assert_eq!(s.fakes[1].take(), [Call::Unsub("x".to_owned())]);
    }

    #[test]
    fn the_upstream_is_available_while_any_link_is_up() {
        let s = setup(vec![Fake::default(), Fake::default()], 8);
        let a = ingress(&s.router);
        assert!(!a.upstream_available());
        s.links[1].send_replace(true);
        assert!(a.upstream_available());
        s.links[1].send_replace(false);
        assert!(!a.upstream_available());
    }

    #[test]
    fn each_ingress_gets_its_own_verdicts() {
        let s = setup(vec![Fake::default()], 8);
        let (tx_a, mut rx_a) = mpsc::channel(4);
        let (tx_b, mut rx_b) = mpsc::channel(4);
        let (a, b) = (s.router.ingress(tx_a), s.router.ingress(tx_b));
        let message = |topic: &str| Message {
            topic: topic.to_owned(),
            payload: Bytes::from_static(b"1"),
            qos: Qos::AtLeastOnce,
            retain: false,
            origin: Default::default(),
        };
        a.append(message("a"), Some(7)).unwrap();
        b.append(message("b"), Some(7)).unwrap();
        let a_reply = rx_a.blocking_recv().unwrap();
        let b_reply = rx_b.blocking_recv().unwrap();
        let accepted = vec![AppendReply {
            token: 7,
            accepted: true,
        }];
        assert_eq!((a_reply, b_reply), (accepted.clone(), accepted));
    }

    /// An ingress taking downlink on its own channel (of `bound` messages).
    fn downlink_ingress(
        router: &Router,
        bound: usize,
    ) -> (IngressHandle, mpsc::Receiver<Downlink>) {
        let (tx, rx) = mpsc::channel(bound);
        (ingress(router).with_downlink(tx), rx)
    }

    /// A QoS 1 downlink message whose acknowledgements are counted.
    fn downlink(
        upstream: usize,
        topic: &str,
        filters: Option<&[&str]>,
    ) -> (Downlink, Arc<AtomicUsize>) {
        let acks = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&acks);
        let message = Downlink {
            upstream,
            topic: topic.to_owned(),
            payload: Bytes::from_static(b"d"),
            qos: Qos::AtLeastOnce,
            retain: false,
            filters: filters.map(|f| f.iter().map(|f| Arc::from(*f)).collect()),
            ack: DownlinkAck::from_fn(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        };
        (message, acks)
    }

    fn acked(acks: &AtomicUsize) -> usize {
        acks.load(Ordering::SeqCst)
    }

    fn names(filters: Option<&Vec<Arc<str>>>) -> Option<Vec<&str>> {
        filters.map(|f| f.iter().map(|f| &**f).collect())
    }

    #[tokio::test]
    async fn downlink_goes_to_every_matching_ingress_and_is_acked_after_both() {
        let s = setup(vec![Fake::default()], 8);
        let (a, mut rx_a) = downlink_ingress(&s.router, 4);
        let (b, mut rx_b) = downlink_ingress(&s.router, 4);
        let (c, mut rx_c) = downlink_ingress(&s.router, 4);
        a.subscribe(now(), "t/#", Qos::AtLeastOnce).unwrap();
        b.subscribe(now(), "t/+", Qos::AtMostOnce).unwrap();
        c.subscribe(now(), "other", Qos::AtLeastOnce).unwrap();
        let (message, acks) = downlink(0, "t/1", None);
        s.router.downlink_router().route(message).await;
        let copy_a = rx_a.try_recv().unwrap();
        let copy_b = rx_b.try_recv().unwrap();
        assert!(rx_c.try_recv().is_err(), "c's filter does not match");
        assert_eq!(
            (copy_a.topic.as_str(), copy_b.topic.as_str()),
            ("t/1", "t/1")
        );
        assert_eq!(copy_a.qos, Qos::AtLeastOnce, "the QoS as delivered");
        assert_eq!(
            copy_a.filters, None,
            "no filters from the upstream: none named"
        );
        copy_a.ack.ack();
        assert_eq!(acked(&acks), 0, "b has not acknowledged yet");
        copy_b.ack.ack();
        assert_eq!(acked(&acks), 1);
    }

    #[tokio::test]
    async fn a_dropped_or_undeliverable_copy_means_no_ack() {
        let s = setup(vec![Fake::default()], 8);
        let (a, mut rx_a) = downlink_ingress(&s.router, 4);
        let (b, mut rx_b) = downlink_ingress(&s.router, 4);
        a.subscribe(now(), "t", Qos::AtLeastOnce).unwrap();
        b.subscribe(now(), "t", Qos::AtLeastOnce).unwrap();
        let downlink_router = s.router.downlink_router();

        let (message, acks) = downlink(0, "t", None);
        downlink_router.route(message).await;
        rx_a.try_recv().unwrap().ack.ack();
        drop(rx_b.try_recv().unwrap());
        assert_eq!(acked(&acks), 0, "b dropped its copy");

        drop(rx_b);
        let (message, acks) = downlink(0, "t", None);
        downlink_router.route(message).await;
        rx_a.try_recv().unwrap().ack.ack();
        assert_eq!(acked(&acks), 0, "b is gone");
        assert_eq!(
            s.router
                .downlink_stats()
                .ingress_gone
                .load(Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn control_topics_go_to_the_control_channel_of_their_upstream_only() {
        let s = setup(vec![Fake::default(), Fake::default()], 3);
        let (a, mut rx_a) = downlink_ingress(&s.router, 4);
        let (control_tx, mut control_rx) = mpsc::channel(1);
        s.router
            .control(now(), vec![Some("g/replay".to_owned()), None], control_tx)
            .unwrap();
        assert_eq!(
            s.fakes[0].take(),
            vec![Call::Sub("g/replay".into(), Qos::AtLeastOnce)]
        );
        assert_eq!(s.fakes[1].take(), vec![]);
        // A sensor holding the same upstream filter: it leaves, the control topic stays.
        a.subscribe(now(), "g/replay", Qos::AtMostOnce).unwrap();
        let (message, acks) = downlink(0, "g/replay", None);
        s.router.downlink_router().route(message).await;
        assert_eq!(acked(&acks), 1, "acknowledged");
        let got = control_rx.try_recv().unwrap();
        assert_eq!((got.upstream, got.topic.as_str()), (0, "g/replay"));
        assert!(rx_a.try_recv().is_err(), "never to a sensor");
        // The same topic on another upstream is sensor data (no control topic there).
        let (message, _) = downlink(1, "g/replay", None);
        s.router.downlink_router().route(message).await;
        assert_eq!(rx_a.try_recv().unwrap().topic, "g/replay");
        assert!(control_rx.try_recv().is_err());
        // A full channel drops (counted), and acknowledges all the same.
        for _ in 0..2 {
            let (message, acks) = downlink(0, "g/replay", None);
            s.router.downlink_router().route(message).await;
            assert_eq!(acked(&acks), 1);
        }
        let stats = s.router.downlink_stats();
        assert_eq!(stats.control.load(Ordering::Relaxed), 2);
        assert_eq!(stats.control_dropped.load(Ordering::Relaxed), 1);
        a.unsubscribe(now(), "g/replay");
        let calls = s.fakes[0].take();
        assert!(
            !calls.contains(&Call::Unsub("g/replay".into())),
            "{calls:?}"
        );
        // It takes none of the sensors' `max_filters` (3).
        for filter in ["x", "y", "z"] {
            a.subscribe(now(), filter, Qos::AtMostOnce).unwrap();
        }
        assert_eq!(
            a.subscribe(now(), "w", Qos::AtMostOnce),
            Err(FailReason::QueueFull)
        );
    }

    #[tokio::test]
    async fn downlink_nobody_wants_is_acked_and_counted() {
        let s = setup(vec![Fake::default()], 8);
        let (a, mut rx_a) = downlink_ingress(&s.router, 4);
        // An uplink-only ingress is never a target, whatever it subscribed.
        let uplink_only = ingress(&s.router);
        a.subscribe(now(), "t", Qos::AtLeastOnce).unwrap();
        uplink_only.subscribe(now(), "u", Qos::AtLeastOnce).unwrap();
        for topic in ["u", "v"] {
            let (message, acks) = downlink(0, topic, None);
            s.router.downlink_router().route(message).await;
            assert_eq!(acked(&acks), 1, "{topic}");
        }
        assert!(rx_a.try_recv().is_err());
        assert_eq!(
            s.router.downlink_stats().unmatched.load(Ordering::Relaxed),
            2
        );
    }

    #[tokio::test]
    async fn filters_from_the_upstream_pick_the_subscribers_of_the_copy() {
        let s = setup(vec![Fake::default()], 8);
        let (a, mut rx_a) = downlink_ingress(&s.router, 4);
        let (b, mut rx_b) = downlink_ingress(&s.router, 4);
        a.subscribe(now(), "t/#", Qos::AtLeastOnce).unwrap();
        a.subscribe(now(), "t/1", Qos::AtLeastOnce).unwrap();
        b.subscribe(now(), "t/1", Qos::AtLeastOnce).unwrap();
        let downlink_router = s.router.downlink_router();

        let (message, acks) = downlink(0, "t/1", Some(&["t/#"]));
        downlink_router.route(message).await;
        let copy = rx_a.try_recv().unwrap();
        assert_eq!(names(copy.filters.as_ref()), Some(vec!["t/#"]));
        assert!(rx_b.try_recv().is_err(), "the copy is for t/# only");
        copy.ack.ack();
        assert_eq!(acked(&acks), 1);

        let (message, _) = downlink(0, "t/1", Some(&["t/1", "t/#"]));
        downlink_router.route(message).await;
        let copy = rx_a.try_recv().unwrap();
        assert_eq!(names(copy.filters.as_ref()), Some(vec!["t/1", "t/#"]));
        let copy = rx_b.try_recv().unwrap();
        assert_eq!(names(copy.filters.as_ref()), Some(vec!["t/1"]));

        // A filter nobody holds (any more) names no subscriber.
        let (message, acks) = downlink(0, "t/1", Some(&["t/+"]));
        downlink_router.route(message).await;
        assert!(rx_a.try_recv().is_err() && rx_b.try_recv().is_err());
        assert_eq!(acked(&acks), 1);
    }

    #[tokio::test]
    async fn subscriptions_and_downlink_follow_the_routes() {
        let spec = |filter: &str, upstream: &str| crate::route::RouteSpec {
            filter: filter.to_owned(),
            upstreams: vec![upstream.to_owned()],
            ..Default::default()
        };
        let routes = RouteTable::compile(
            &[spec("a/#", "one"), spec("b/#", "two")],
            &["one", "two", "uplink-only"],
            "gw",
        )
        .unwrap();
        let s = setup_with(
            vec![Fake::default(), Fake::default(), Fake::default()],
            8,
            routes,
        );
        let (a, mut rx_a) = downlink_ingress(&s.router, 4);
        a.subscribe(now(), "a/#", Qos::AtLeastOnce).unwrap();
        assert_eq!(s.fakes[0].take(), [sub("a/#", Qos::AtLeastOnce)]);
        assert_eq!(
            s.fakes[1].take(),
            [],
            "its route's filter does not overlap a/#"
        );
        assert_eq!(s.fakes[2].take(), [], "no route takes downlink from it");

        // Downlink from an upstream whose routes do not take the topic is nobody's.
        for upstream in [1, 2] {
            let (message, acks) = downlink(upstream, "a/1", None);
            s.router.downlink_router().route(message).await;
            assert!(rx_a.try_recv().is_err());
            assert_eq!(acked(&acks), 1);
        }
        let (message, _) = downlink(0, "a/1", None);
        s.router.downlink_router().route(message).await;
        assert_eq!(rx_a.try_recv().unwrap().topic, "a/1");

        // A filter overlapping both routes' filters goes to both upstreams.
        a.subscribe(now(), "+/x", Qos::AtMostOnce).unwrap();
        assert_eq!(s.fakes[0].take(), [sub("+/x", Qos::AtMostOnce)]);
        assert_eq!(s.fakes[1].take(), [sub("+/x", Qos::AtMostOnce)]);
        assert_eq!(s.fakes[2].take(), []);

        a.unsubscribe(now(), "a/#");
        assert_eq!(s.fakes[0].take(), [Call::Unsub("a/#".to_owned())]);
        assert_eq!(s.fakes[1].take(), [], "released exactly what was taken");
        assert_eq!(s.fakes[2].take(), []);
    }

    #[tokio::test]
    async fn the_downlink_router_runs_until_its_input_ends_or_it_is_stopped() {
        let s = setup(vec![Fake::default()], 8);
        let (a, mut rx_a) = downlink_ingress(&s.router, 4);
        a.subscribe(now(), "t", Qos::AtLeastOnce).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let (message, acks) = downlink(0, "t", None);
        tx.send(message).await.unwrap();
        drop(tx);
        s.router
            .downlink_router()
            .run(rx, CancellationToken::new())
            .await;
        rx_a.try_recv().unwrap().ack.ack();
        assert_eq!(acked(&acks), 1);

        // Stopped while waiting for room in a full ingress: that message is not acknowledged.
        let (tx, rx) = mpsc::channel(8);
        for _ in 0..4 {
            tx.send(downlink(0, "t", None).0).await.unwrap();
        }
        let (message, acks) = downlink(0, "t", None);
        tx.send(message).await.unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(s.router.downlink_router().run(rx, stop.clone()));
        for _ in 0..100_000 {
            if rx_a.len() == 4 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(rx_a.len(), 4, "the ingress's channel is full");
        stop.cancel();
        task.await.unwrap();
        assert_eq!(acked(&acks), 0);
    }

    #[test]
    fn a_local_message_goes_to_the_other_matching_ingresses_only() {
        let s = setup(vec![Fake::default()], 8);
        let (a, mut rx_a) = downlink_ingress(&s.router, 4);
        assert!(!a.has_peers(), "alone, local delivery has nobody to reach");
        a.subscribe(now(), "t/#", Qos::AtLeastOnce).unwrap();
        a.deliver_local(&Message::new("t/1", "x", Qos::ExactlyOnce, true));
        assert!(rx_a.try_recv().is_err(), "never back to its own ingress");

        let (b, mut rx_b) = downlink_ingress(&s.router, 4);
        let (_c, mut rx_c) = downlink_ingress(&s.router, 4);
        assert!(a.has_peers());
        b.subscribe(now(), "t/+", Qos::AtMostOnce).unwrap();
        b.subscribe(now(), "t/1", Qos::AtMostOnce).unwrap();
        a.deliver_local(&Message::new("t/1", "x", Qos::ExactlyOnce, true));
        assert!(rx_a.try_recv().is_err());
        assert!(rx_c.try_recv().is_err(), "c subscribed nothing");
        let copy = rx_b.try_recv().unwrap();
        assert_eq!(copy.upstream, LOCAL_UPSTREAM);
        assert_eq!(
            (copy.topic.as_str(), copy.qos, copy.retain),
            ("t/1", Qos::ExactlyOnce, true)
        );
        let mut filters = names(copy.filters.as_ref()).unwrap();
        filters.sort_unstable();
        assert_eq!(filters, ["t/+", "t/1"]);
        assert!(!copy.ack.is_required(), "nothing to acknowledge");
        assert!(rx_b.try_recv().is_err(), "one copy per ingress");

        b.deliver_local(&Message::new("t/2", "y", Qos::AtMostOnce, false));
        assert_eq!(rx_a.try_recv().unwrap().topic, "t/2");
    }

    #[test]
    fn a_local_copy_for_a_full_ingress_is_dropped_not_waited_for() {
        let s = setup(vec![Fake::default()], 8);
        let (a, _rx_a) = downlink_ingress(&s.router, 4);
        let (b, mut rx_b) = downlink_ingress(&s.router, 1);
        b.subscribe(now(), "t", Qos::AtLeastOnce).unwrap();
        a.deliver_local(&Message::new("t", "1", Qos::AtLeastOnce, false));
        a.deliver_local(&Message::new("t", "2", Qos::AtLeastOnce, false));
        assert_eq!(rx_b.try_recv().unwrap().payload, Bytes::from_static(b"1"));
        assert!(rx_b.try_recv().is_err());
        assert_eq!(
            s.router
                .downlink_stats()
                .local_dropped
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_message_no_route_matches_is_refused_and_counted() {
        let spec = crate::route::RouteSpec {
            filter: "sensors/#".to_owned(),
            upstreams: vec!["up".to_owned()],
            ..Default::default()
        };
        let routes = RouteTable::compile(&[spec], &["up"], "gw").unwrap();
        let s = setup_with(vec![Fake::default()], 8, routes);
        let (tx, mut rx) = mpsc::channel(4);
        let a = s.router.ingress(tx);
        let message =
            |topic: &str| Message::new(topic, Bytes::from_static(b"1"), Qos::AtLeastOnce, false);
        assert!(!a.accepts("other/t"));
        assert!(a.accepts("sensors/t"));
        assert_eq!(s.router.unrouted(), 0, "asking counts nothing");
        let refused = a.append(message("other/t"), Some(1)).unwrap_err();
        assert_eq!(refused.error_code(), "no_route");
        assert_eq!(refused.into_message().topic, "other/t", "given back");
        assert_eq!(s.router.unrouted(), 1);
        a.append(message("sensors/t"), Some(2)).unwrap();
        assert_eq!(
            rx.blocking_recv().unwrap(),
            [AppendReply {
                token: 2,
                accepted: true
            }],
            "no reply for the refused one"
        );
        assert_eq!(s.router.unrouted(), 1);
    }

    fn route(
        filter: &str,
        upstreams: &[&str],
        add_prefix: Option<&str>,
    ) -> crate::route::RouteSpec {
        crate::route::RouteSpec {
            filter: filter.to_owned(),
            upstreams: upstreams.iter().map(|u| (*u).to_owned()).collect(),
            add_prefix: add_prefix.map(str::to_owned),
            ..Default::default()
        }
    }

    fn table(specs: &[crate::route::RouteSpec]) -> Arc<RouteTable> {
        Arc::new(RouteTable::compile(specs, &["one", "two"], "gw").unwrap())
    }

    #[tokio::test]
    async fn a_route_change_subscribes_the_new_filters_before_releasing_the_old() {
        let old = table(&[route("a/#", &["one"], Some("x/"))]);
        let s = setup_with(
            vec![Fake::default(), Fake::default()],
            8,
            RouteTable::clone(&old),
        );
        let a = ingress(&s.router);
        a.subscribe(now(), "a/1", Qos::AtLeastOnce).unwrap();
        a.subscribe(now(), "a/2", Qos::AtMostOnce).unwrap();
        s.fakes[0].take();

        let change = s
            .router
            .reconfigurer()
            .set_routes(table(&[route("a/#", &["one", "two"], Some("y/"))]))
            .await;
        let calls = s.fakes[0].take();
        assert_eq!(calls.len(), 4, "{calls:?}");
        let first_unsub = calls
            .iter()
            .position(|c| matches!(c, Call::Unsub(_)))
            .unwrap();
        assert!(
            calls[..first_unsub].contains(&sub("y/a/1", Qos::AtLeastOnce))
                && calls[..first_unsub].contains(&sub("y/a/2", Qos::AtMostOnce)),
            "every new filter before any release: {calls:?}"
        );
        assert!(calls.contains(&Call::Unsub("x/a/1".to_owned())));
        assert!(calls.contains(&Call::Unsub("x/a/2".to_owned())));
        let mut two = s.fakes[1].take();
        two.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            two,
            [
                sub("y/a/1", Qos::AtLeastOnce),
                sub("y/a/2", Qos::AtMostOnce)
            ]
        );
        assert_eq!(
            change,
            RouteChange {
                sensor_filters: 2,
                moved: 2,
                subscribed: 4,
                unsubscribed: 2,
                ..RouteChange::default()
            }
        );

        // The counts follow the new table: a release gives back exactly the new filters.
        a.unsubscribe(now(), "a/1");
        assert_eq!(s.fakes[0].take(), [Call::Unsub("y/a/1".to_owned())]);
        assert_eq!(s.fakes[1].take(), [Call::Unsub("y/a/1".to_owned())]);
        // And a new subscription takes the new table's filters.
        a.subscribe(now(), "a/3", Qos::AtLeastOnce).unwrap();
        assert_eq!(s.fakes[0].take(), [sub("y/a/3", Qos::AtLeastOnce)]);
    }

    #[tokio::test]
    async fn a_filter_both_tables_give_is_kept_and_shared_filters_stay_counted() {
        // Old: a/# and b/# both to "one" unchanged. New: a/# to "one" unchanged, b/# nowhere.
        let old = table(&[route("a/#", &["one"], None), route("#", &["one"], None)]);
        let s = setup_with(
            vec![Fake::default(), Fake::default()],
            8,
            RouteTable::clone(&old),
        );
        let (a, b) = (ingress(&s.router), ingress(&s.router));
        a.subscribe(now(), "a/#", Qos::AtLeastOnce).unwrap();
        b.subscribe(now(), "b/#", Qos::AtLeastOnce).unwrap();
        s.fakes[0].take();
        let change = s
            .router
            .reconfigurer()
            .set_routes(table(&[route("a/#", &["one"], None)]))
            .await;
        assert_eq!(
            s.fakes[0].take(),
            [Call::Unsub("b/#".to_owned())],
            "a/# is given by both tables: untouched"
        );
        assert_eq!(
            (change.moved, change.subscribed, change.unsubscribed),
            (1, 0, 1)
        );

        // Back: b/# is taken again; a/# still once.
        let change = s.router.reconfigurer().set_routes(old).await;
        assert_eq!(s.fakes[0].take(), [sub("b/#", Qos::AtLeastOnce)]);
        assert_eq!(
            (change.moved, change.subscribed, change.unsubscribed),
            (1, 1, 0)
        );
        a.unsubscribe(now(), "a/#");
        b.unsubscribe(now(), "b/#");
        let mut calls = s.fakes[0].take();
        calls.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            calls,
            [Call::Unsub("a/#".to_owned()), Call::Unsub("b/#".to_owned())]
        );
        assert_eq!(s.fakes[1].take(), []);
    }

    #[tokio::test]
    async fn two_sensor_filters_moving_onto_one_upstream_filter_hold_it_until_both_leave() {
        let old = table(&[route("#", &["one"], Some("x/"))]);
        let s = setup_with(
            vec![Fake::default(), Fake::default()],
            8,
            RouteTable::clone(&old),
        );
        let a = ingress(&s.router);
        a.subscribe(now(), "a/#", Qos::AtLeastOnce).unwrap();
        a.subscribe(now(), "#", Qos::AtLeastOnce).unwrap();
        s.fakes[0].take();
        // Stripping "a/" turns both "a/#" and "#" into the upstream filter "#".
        let mut spec = route("#", &["one"], None);
        spec.strip_prefix = Some("a/".to_owned());
        let change = s.router.reconfigurer().set_routes(table(&[spec])).await;
        let mut calls = s.fakes[0].take();
        assert_eq!(
            calls.first(),
            Some(&sub("#", Qos::AtLeastOnce)),
            "{calls:?}"
        );
        calls.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            calls,
            [
                sub("#", Qos::AtLeastOnce),
                Call::Unsub("x/#".to_owned()),
                Call::Unsub("x/a/#".to_owned())
            ],
            "taken once for both"
        );
        assert_eq!(
            (change.moved, change.subscribed, change.unsubscribed),
            (2, 1, 2)
        );
        a.unsubscribe(now(), "a/#");
        assert_eq!(s.fakes[0].take(), [], "\"#\" still holds it");
        a.unsubscribe(now(), "#");
        assert_eq!(s.fakes[0].take(), [Call::Unsub("#".to_owned())]);
    }

    #[tokio::test]
    async fn a_full_upstream_table_takes_the_moved_filters_once_the_old_ones_are_released() {
        let full = Fake {
            capacity: Some(2),
            ..Fake::default()
        };
        let old = table(&[route("#", &["one"], Some("x/"))]);
        let s = setup_with(vec![full, Fake::default()], 8, RouteTable::clone(&old));
        let a = ingress(&s.router);
        a.subscribe(now(), "a", Qos::AtLeastOnce).unwrap();
        a.subscribe(now(), "b", Qos::AtLeastOnce).unwrap();
        s.fakes[0].take();
        let change = s
            .router
            .reconfigurer()
            .set_routes(table(&[route("#", &["one"], Some("y/"))]))
            .await;
        assert_eq!(change.refused, 0, "{change:?}");
        assert_eq!(change.subscribed, 2);
        let held: Vec<String> = s.fakes[0].held.lock().unwrap().iter().cloned().collect();
        assert_eq!(held, ["y/a", "y/b"]);
    }

    #[tokio::test]
    async fn refused_filters_are_reported_and_kept() {
        let refusing = Fake {
            refuse: Some(FailReason::Rejected),
            ..Fake::default()
        };
        let s = setup_with(
            vec![Fake::default(), refusing],
            8,
            RouteTable::clone(&table(&[route("#", &["one"], None)])),
        );
        let a = ingress(&s.router);
        a.subscribe(now(), "t", Qos::AtLeastOnce).unwrap();
        let change = s
            .router
            .reconfigurer()
            .set_routes(table(&[route("#", &["one", "two"], None)]))
            .await;
        assert_eq!(change.refused, 1);
        assert_eq!(
            change.refusals,
            [("fake".to_owned(), "t".to_owned(), FailReason::Rejected)]
        );
        assert_eq!(s.fakes[0].take(), [sub("t", Qos::AtLeastOnce)]);
        a.unsubscribe(now(), "t");
        assert_eq!(
            s.fakes[1].take(),
            [sub("t", Qos::AtLeastOnce), Call::Unsub("t".to_owned())],
            "kept like a sensor's refused subscribe, so released too"
        );
    }

    #[tokio::test]
    async fn uplink_and_downlink_follow_the_new_table_from_the_next_message() {
        let s = setup_with(
            vec![Fake::default(), Fake::default()],
            8,
            RouteTable::clone(&table(&[route("a/#", &["one"], Some("x/"))])),
        );
        let (a, mut rx_a) = downlink_ingress(&s.router, 4);
        a.subscribe(now(), "a/#", Qos::AtLeastOnce).unwrap();
        assert!(a.accepts("a/1") && !a.accepts("b/1"));
        let shared_routes = s.router.shared.routes.clone();
        s.router
            .reconfigurer()
            .set_routes(table(&[
                route("b/#", &["one"], None),
                route("a/#", &["one"], Some("y/")),
            ]))
            .await;
        assert!(a.accepts("a/1") && a.accepts("b/1"));
        assert!(
            shared_routes.load().accepts("b/1"),
            "the drains' handle too"
        );
        let (message, acks) = downlink(0, "x/a/1", None);
        s.router.downlink_router().route(message).await;
        assert!(rx_a.try_recv().is_err(), "the old prefix maps back no more");
        assert_eq!(acked(&acks), 1);
        let (message, _) = downlink(0, "y/a/1", None);
        s.router.downlink_router().route(message).await;
        assert_eq!(rx_a.try_recv().unwrap().topic, "a/1");
    }

    #[test]
    fn a_lower_max_filters_keeps_what_is_held_and_refuses_new_filters() {
        let s = setup(vec![Fake::default()], 8);
        let a = ingress(&s.router);
        a.subscribe(now(), "one", Qos::AtMostOnce).unwrap();
        a.subscribe(now(), "two", Qos::AtMostOnce).unwrap();
        s.router.reconfigurer().set_max_filters(1);
        assert_eq!(
            a.subscribe(now(), "three", Qos::AtMostOnce),
            Err(FailReason::QueueFull)
        );
        a.subscribe(now(), "two", Qos::AtLeastOnce)
            .expect("a held filter is kept and may change");
        a.unsubscribe(now(), "one");
        a.unsubscribe(now(), "two");
        a.subscribe(now(), "three", Qos::AtMostOnce).unwrap();
        s.router.reconfigurer().set_max_filters(2);
        a.subscribe(now(), "four", Qos::AtMostOnce).unwrap();
    }
}
