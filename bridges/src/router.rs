//! The hub between the ingresses (one per protocol driver) and the upstreams: a driver holds
//! an [`IngressHandle`] and never sees an upstream.
//!
//! ```text
//!  driver (MQTT-SN today) ── IngressHandle ──┬── append(message, token) ──> spool writer
//!     ^                                      │   (this ingress's IngressAppender; verdicts
//!     │ AppendReply (own channel) <──────────┘    come back on its own reply channel)
//!     │                                      ├── subscribe / unsubscribe ──> Router: filter ->
//!     │                                      │   {ingress -> QoS}; each Subscriber gets the
//!     │                                      │   union, at the highest QoS any ingress wants
//!     │                                      └── upstream_available() <── any link watch up
//!     └── Downlink (one channel from the upstreams, not routed here yet)
//! ```
//!
//! Invariants (MUST hold; the unit tests below check them with a fake [`Subscriber`]):
//!
//! - **Subscriptions are reference counted across ingresses.** A filter is subscribed
//!   upstream while at least one ingress wants it, at the highest QoS any of them wants; an
//!   ingress's unsubscribe removes only its own interest, and a lower maximum is passed on.
//!   Each ingress keeps its own reference count per filter (the MQTT-SN core counts its
//!   sessions) and tells the router the QoS it wants and when it leaves. (The MQTT-SN core
//!   only ever raises a filter's QoS while it has subscribers; it does not pass on a lower
//!   maximum when its highest subscriber leaves.)
//! - **Bounded**: at most `max_filters` distinct filters over all ingresses (the capacity of
//!   every upstream's subscription table); a new filter beyond it is refused with
//!   [`FailReason::QueueFull`] and nothing is remembered.
//! - **Upstreams see changes in the order the router took them**: the calls to the
//!   [`Subscriber`]s are made under the router's lock. They never block (they queue the
//!   change for the upstream's own task), so the critical section stays short, and no lock
//!   is held across an `.await` (the router has none).
//! - A refused upstream change is logged at warn, at most once per
//!   [`SUBSCRIBE_WARN_INTERVAL`] (sensors trigger them), with the number refused since.
//!
//! Downlink messages still travel on one channel from the upstreams to the one ingress that
//! takes them (the MQTT-SN driver); fanning them out to several ingresses is not built yet.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::message::{Message, Qos};
use crate::route::RouteTable;
use crate::spool::{AppendReply, Appender, IngressAppender};
use crate::upstream::{FailReason, Subscriber};

/// Least time between two warnings about refused subscription changes (the refusals in
/// between are counted in the next one).
pub const SUBSCRIBE_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// One upstream as the router sees it: where subscriptions go, and its link state.
pub struct RoutedUpstream {
    /// Takes the union of the ingresses' filters.
    pub subscriber: Box<dyn Subscriber>,
    /// `true` while the upstream's link is up (the `Upstream::watch_link` of the same
    /// upstream).
    pub link: watch::Receiver<bool>,
}

/// The hub: hands out one [`IngressHandle`] per ingress. The spool writer keeps running
/// while the router or any of its handles is alive.
pub struct Router {
    shared: Arc<Shared>,
}

/// What the router and its handles share.
struct Shared {
    /// The `[[route]]` table: which messages are accepted, where subscriptions go.
    routes: Arc<RouteTable>,
    /// Messages refused by [`IngressHandle::append`] because no route matches their topic.
    unrouted: AtomicU64,
    /// Every upstream; each takes every subscription.
    upstreams: Vec<RoutedUpstream>,
    /// The spool writer's entrance, from which each ingress gets its own appender.
    appender: Appender,
    /// Most distinct filters over all ingresses.
    max_filters: usize,
    /// The subscription table and the warning limiter, under a short-held lock.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Filter -> what each ingress wants; at most `max_filters` entries, none empty.
    filters: HashMap<String, Wanted>,
    /// The id the next ingress gets.
    next_ingress: u64,
    /// When the last refused change was logged, and how many were refused since: sensors
    /// trigger them, so the warning is rate-limited.
    warned: Option<Instant>,
    refused: u64,
}

/// The interest in one filter.
struct Wanted {
    /// Ingress id -> the QoS it wants; never empty.
    by_ingress: BTreeMap<u64, Qos>,
    /// The QoS the upstreams were asked for: the highest in `by_ingress`.
    upstream: Qos,
}

impl Wanted {
    fn highest(&self) -> Qos {
        self.by_ingress
            .values()
            .copied()
            .max_by_key(|q| qos_rank(*q))
            .unwrap_or(Qos::AtMostOnce)
    }
}

const fn qos_rank(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

impl Router {
    /// A router over `upstreams`, appending through `appender`, holding at most
    /// `max_filters` distinct filters (the same limit the protocol cores keep).
    #[must_use]
    pub fn new(
        appender: Appender,
        upstreams: Vec<RoutedUpstream>,
        max_filters: usize,
        routes: Arc<RouteTable>,
    ) -> Self {
        Router {
            shared: Arc::new(Shared {
                routes,
                unrouted: AtomicU64::new(0),
                upstreams,
                appender,
                max_filters,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Registers an ingress: the spool's verdicts on its tokened appends come back on
    /// `replies` (see [`Appender::for_ingress`]: it MUST keep reading them).
    #[must_use]
    pub fn ingress(&self, replies: mpsc::Sender<Vec<AppendReply>>) -> IngressHandle {
        let id = {
            let mut state = self.shared.lock();
            state.next_ingress += 1;
            state.next_ingress
        };
        IngressHandle {
            id,
            appender: self.shared.appender.for_ingress(replies),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Messages refused at the ingresses because no route matches their topic, since start.
    #[must_use]
    pub fn unrouted(&self) -> u64 {
        self.shared.unrouted.load(Ordering::Relaxed)
    }
}

/// Why [`IngressHandle::append`] refused a message; it is given back either way and no reply
/// follows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendRefused {
    /// The spool writer's queue is full (or the writer stopped): congestion, the sender may
    /// retry.
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

    /// Asks every upstream for `filter` at `qos`; called under the lock (see module docs).
    fn subscribe_all(&self, state: &mut State, now: Instant, filter: &str, qos: Qos) {
        for up in &self.upstreams {
            if let Err(reason) = up.subscriber.subscribe(filter, qos) {
                state.refused(now, up.subscriber.name(), filter, reason);
            }
        }
    }

    fn unsubscribe_all(&self, state: &mut State, now: Instant, filter: &str) {
        for up in &self.upstreams {
            if let Err(reason) = up.subscriber.unsubscribe(filter) {
                state.refused(now, up.subscriber.name(), filter, reason);
            }
        }
    }
}

impl State {
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

/// One ingress's way into the pipeline (made by [`Router::ingress`]): appends to the spool
/// with its verdicts on its own channel, and subscriptions counted across all ingresses.
pub struct IngressHandle {
    /// Tells this ingress's interest apart in the subscription table.
    id: u64,
    /// This ingress's entrance to the spool writer (its own reply route).
    appender: IngressAppender,
    shared: Arc<Shared>,
}

impl IngressHandle {
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
        if !self.shared.routes.accepts(&message.topic) {
            let count = self.shared.unrouted.fetch_add(1, Ordering::Relaxed) + 1;
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

    /// This ingress wants `filter` at `qos` (its current highest; lower than before lowers
    /// it). The upstreams are asked when the filter is new or its highest QoS over all
    /// ingresses changes; their refusals are logged (rate-limited) here, and do not fail the
    /// call (another upstream may have taken it). `now` only rate-limits the warning.
    ///
    /// # Errors
    /// [`FailReason::QueueFull`] when `filter` is new and `max_filters` filters are
    /// subscribed: nothing is remembered, and nothing is asked upstream.
    pub fn subscribe(&self, now: Instant, filter: &str, qos: Qos) -> Result<(), FailReason> {
        let shared = &*self.shared;
        let mut guard = shared.lock();
        let state = &mut *guard;
        let count = state.filters.len();
        let ask = match state.filters.get_mut(filter) {
            Some(wanted) => {
                wanted.by_ingress.insert(self.id, qos);
                let highest = wanted.highest();
                (highest != wanted.upstream).then(|| {
                    wanted.upstream = highest;
                    highest
                })
            }
            None if count >= shared.max_filters => {
                state.refused(now, "router", filter, FailReason::QueueFull);
                return Err(FailReason::QueueFull);
            }
            None => {
                let wanted = Wanted {
                    by_ingress: BTreeMap::from([(self.id, qos)]),
                    upstream: qos,
                };
                state.filters.insert(filter.to_owned(), wanted);
                Some(qos)
            }
        };
        if let Some(qos) = ask {
            shared.subscribe_all(state, now, filter, qos);
        }
        Ok(())
    }

    /// This ingress no longer wants `filter`. The upstreams unsubscribe once no ingress wants
    /// it, or are asked for the lower highest QoS of the others; an unknown filter is
    /// ignored. Upstream refusals are logged (rate-limited); `now` only rate-limits that.
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
            state.filters.remove(filter);
            shared.unsubscribe_all(state, now, filter);
            return;
        }
        let highest = wanted.highest();
        if highest != wanted.upstream {
            wanted.upstream = highest;
            shared.subscribe_all(state, now, filter, highest);
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

    /// Records every call; refuses every subscribe while `refuse` is set.
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<Call>>>,
        refuse: Option<FailReason>,
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
            self.refuse.map_or(Ok(()), Err)
        }

        fn unsubscribe(&self, filter: &str) -> Result<(), FailReason> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Unsub(filter.to_owned()));
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
        setup_with_routes(fakes, max_filters, RouteTable::everything())
    }

    fn setup_with_routes(fakes: Vec<Fake>, max_filters: usize, routes: RouteTable) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            dir: PathBuf::from(dir.path()),
            max_bytes: 1 << 20,
            segment_bytes: 64 << 10,
            min_free_bytes: 0,
            max_age: None,
            when_full: WhenFull::RejectNew,
            fsync: FsyncPolicy::Always,
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

    #[test]
    fn a_message_no_route_matches_is_refused_and_counted() {
        let spec = crate::route::RouteSpec {
            filter: "sensors/#".to_owned(),
            upstreams: vec!["up".to_owned()],
            ..Default::default()
        };
        let routes = RouteTable::compile(&[spec], &["up"], "gw").unwrap();
        let s = setup_with_routes(vec![Fake::default()], 8, routes);
        let (tx, mut rx) = mpsc::channel(4);
        let a = s.router.ingress(tx);
        let message =
            |topic: &str| Message::new(topic, Bytes::from_static(b"1"), Qos::AtLeastOnce, false);
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
}
