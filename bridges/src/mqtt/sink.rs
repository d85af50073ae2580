//! The upstream handle and its two tasks.
//!
//! ```text
//!   MqttUpstream (Clone)              ack task (returned JoinHandle)        link task
//!   ────────────────────              ──────────────────────────────        ─────────
//!   publish():                        owns: FuturesUnordered<settled>       owns: EventLoop
//!     link up? slot free?             recv Tracked ─> push waiter           poll() forever:
//!     try_publish_tracked ─ Tracked ─>waiter = notice | link lost | stop      CONNACK -> link up,
//!                          (bounded)  settled ─> acks.send(AckReport)           subscribe all
//!                                     then frees the in-flight slot          PUBLISH -> Downlink
//!   subscribe() / unsubscribe():      joins the link task on shutdown         error -> link lost,
//!     edit the subscription table ─ notify ───────────────────────────────>           backoff
//!                                                                            shutdown -> drain,
//!   DownlinkAck::ack() ── ack slot (bounded) ─────────────────────────────>          DISCONNECT
//! ```
//!
//! The link state (`Link`) has one writer, the link task; `publish` reads it under a short
//! std mutex. Each link generation has its own `lost` token: publishing captures the token of
//! the generation it saw as connected, and the link task cancels it when that connection ends.
//! So a publish accepted on a connection is failed when *that* connection drops, even if the
//! client has reconnected before the waiter looks.
//!
//! While the link task waits, for the next event (`EventLoop::poll`), for a free
//! acknowledgement slot or for room in the downlink channel, `Control::drive` keeps serving
//! downlink acknowledgements, SUBACKs and subscription changes, so a full downlink channel
//! never blocks the acknowledgements that would drain it. Downlink acknowledgements carry their
//! connection's generation, the link task's count of CONNACKs, and are dropped unless that
//! connection is still up (see [`Control`]).

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use super::backoff::Backoff;
use super::client::{
    self, Client, EventLoop, IncomingPublish, LinkError, LinkEvent, Notice, NoticeError,
    SubmitError,
};
use super::config::{
    MqttUpstreamConfig, MqttVersion, SetupError, build_tls_config, tls_fingerprint,
};
use super::echo::EchoFilter;
use super::subscriptions::{SubscriptionTable, TableFull};
use super::{AckReport, Delivery, FailReason};
use crate::message::{AckRequest, Downlink, DownlinkAck, Message, Qos};
use crate::spool::wall_ms;
use crate::telemetry::LinkInfo;
use crate::topic;
use crate::upstream::{Presence, RELINK_DRAIN, Reconfigured};

/// Most filters in one SUBSCRIBE or UNSUBSCRIBE packet.
const FILTERS_PER_PACKET: usize = 64;

/// Most filter bytes in one SUBSCRIBE or UNSUBSCRIBE packet (beyond a single filter, which
/// always fits the client's outgoing packet limit).
const FILTER_BYTES_PER_PACKET: usize = 16 * 1024;

/// Most SUBSCRIBE packets awaiting their SUBACK; further changes wait for one to arrive.
const MAX_PENDING_SUBACKS: usize = 16;

/// Most tracked publishes the ack task takes from its channel per wake-up.
const RECV_BATCH: usize = 64;

/// Extra time, beyond the drain timeout given to the client, before the link task stops
/// polling a broker that never answers the shutdown DISCONNECT.
const DISCONNECT_MARGIN: Duration = Duration::from_secs(1);

/// Handle to one upstream broker connection. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct MqttUpstream {
    /// State shared with the tasks (the client that queues requests into the event loop is
    /// `Shared::conn`: a reconfigure replaces it).
    shared: Arc<Shared>,
    /// One permit per accepted, unreported tracked publish (`max_inflight` in total). The
    /// permit travels with the publish and is released after its report was sent.
    inflight: Arc<Semaphore>,
    /// Hands accepted tracked publishes to the ack task. Its capacity equals the number of
    /// permits, so a publish holding a permit always finds room.
    tracked: mpsc::Sender<Tracked>,
    /// Cancelled when the gateway shuts down.
    shutdown: CancellationToken,
}

/// Counter snapshot of one upstream, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamStats {
    /// Publishes handed to the MQTT client (any QoS).
    pub published: u64,
    /// Tracked publishes the broker acknowledged.
    pub acknowledged: u64,
    /// QoS >= 1 publishes refused by `publish` as invalid ([`FailReason::Rejected`]) or
    /// reported failed.
    pub failed: u64,
    /// QoS 0 publishes refused by `publish` as invalid ([`FailReason::Rejected`]).
    pub dropped_qos0: u64,
    /// Publishes refused for now (link down, queue full, shutdown): the caller still holds
    /// them, and the spool's drain sends them again, so these are not losses.
    pub deferred: u64,
    /// Successful connections after the first one.
    pub reconnects: u64,
    /// PUBLISH packets the broker delivered on the upstream's subscriptions.
    pub downlink_received: u64,
    /// Of those, messages acknowledged to the broker and dropped instead of being passed on:
    /// over `max_downlink_bytes`, topic not UTF-8 or outside `remote_prefix`, no downlink
    /// receiver.
    pub downlink_dropped: u64,
    /// PUBACKs / PUBRECs of downlink messages handed to the client (after `DownlinkAck::ack`,
    /// or for dropped messages).
    pub downlink_acknowledged: u64,
    /// `DownlinkAck::ack` calls that came after the message's connection had ended, and so
    /// acknowledged nothing (the broker discarded the message with the clean session).
    pub downlink_acks_stale: u64,
    /// MQTT 3.1.1: messages taken for the broker's echo of the gateway's own publishes,
    /// acknowledged and dropped (local delivery served the gateway's subscribers already).
    pub downlink_echoes_dropped: u64,
    /// MQTT 3.1.1: records of the gateway's publishes that no echo consumed (aged out,
    /// evicted by the count bound, or dropped with their connection).
    pub echo_records_expired: u64,
    /// Filters the broker granted (SUBACK), counted per SUBSCRIBE, so re-subscribing after a
    /// reconnect counts again.
    pub subscribe_granted: u64,
    /// Filters the broker refused (SUBACK failure, e.g. not authorized), counted per refusal.
    /// They stay wanted and are asked for again every `subscribe_retry` and after
    /// every reconnect; each refusal is logged at warn (rate-limited).
    pub subscribe_refused: u64,
}

/// What the handle and both tasks share.
struct Shared {
    /// `MqttUpstreamConfig::name`, the `upstream` log field.
    name: String,
    /// The connection's client and topic prefix in force; replaced only by the link task,
    /// when it applies a reconfigure that reconnects (see [`MqttUpstream::reconfigure`]).
    conn: ArcSwap<Conn>,
    /// The configuration in force (what [`MqttUpstream::reconfigure`] compares with), and
    /// the fingerprint of its TLS files' contents (a renewed certificate under the same path
    /// is a change too).
    config: Mutex<(MqttUpstreamConfig, u64)>,
    /// Settings applied in place (no reconnect), read by the link task where it uses them.
    live: Mutex<LiveSettings>,
    /// A new connection for the link task to switch to; `relink` wakes it.
    pending: Mutex<Option<Relink>>,
    relink: Notify,
    /// Connection state; written by the link task only.
    link: Mutex<Link>,
    /// Statistics, updated lock-free.
    counters: Counters,
    /// The gateway's filters (without `remote_prefix`): wanted, and applied on the current
    /// connection. Edited by the handle, applied by the link task.
    subscriptions: Mutex<SubscriptionTable>,
    /// Wakes the link task when `subscriptions` changed.
    subscriptions_changed: Notify,
    /// Whether the link is up, for those who wait for it (the spool's drain).
    link_state: watch::Sender<bool>,
    /// Asks the link task to drop the connection and reconnect.
    reset: Notify,
    /// The link's transitions for the admin listener; written by the link task only.
    link_info: Arc<LinkInfo>,
    /// MQTT 3.1.1 only: fingerprints of recent publishes, to drop the broker's echo of them
    /// (MQTT 5 subscribes with No Local). See [`EchoFilter`].
    echo: Option<Mutex<EchoFilter>>,
}

/// The client and prefix of the connection in force.
struct Conn {
    /// Queues requests into the event loop.
    client: Client,
    /// Prepended to every topic.
    remote_prefix: String,
    /// Birth (on every CONNACK) and death (before a clean DISCONNECT); the Will is in the
    /// client's CONNECT.
    presence: Option<Presence>,
}

/// The settings [`MqttUpstream::reconfigure`] changes without reconnecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LiveSettings {
    backoff_initial: Duration,
    backoff_max: Duration,
    subscribe_retry: Duration,
    /// Applied to the subscription table by `reconfigure` itself.
    max_subscriptions: usize,
}

impl LiveSettings {
    fn of(config: &MqttUpstreamConfig) -> Self {
        Self {
            backoff_initial: config.backoff_initial,
            backoff_max: config.backoff_max,
            subscribe_retry: config.subscribe_retry,
            max_subscriptions: config.max_subscriptions,
        }
    }
}

/// A new connection, built and validated by [`MqttUpstream::reconfigure`], for the link task.
struct Relink {
    client: Client,
    eventloop: EventLoop,
    config: MqttUpstreamConfig,
}

/// Connection state as seen by `publish`.
struct Link {
    /// A CONNACK was received and the connection has not failed since.
    connected: bool,
    /// Cancelled when the current connection ends; replaced for the next one.
    lost: CancellationToken,
}

/// The live counters behind [`UpstreamStats`].
#[derive(Default)]
struct Counters {
    published: AtomicU64,
    acknowledged: AtomicU64,
    failed: AtomicU64,
    dropped_qos0: AtomicU64,
    deferred: AtomicU64,
    reconnects: AtomicU64,
    downlink_received: AtomicU64,
    downlink_dropped: AtomicU64,
    downlink_acknowledged: AtomicU64,
    downlink_acks_stale: AtomicU64,
    downlink_echoes_dropped: AtomicU64,
    subscribe_granted: AtomicU64,
    subscribe_refused: AtomicU64,
}

/// An accepted tracked publish on its way to the ack task.
struct Tracked {
    /// The gateway's token.
    token: u64,
    /// Resolves with the broker's answer.
    notice: Notice,
    /// The `lost` token of the connection the publish was accepted on.
    lost: CancellationToken,
    /// The in-flight slot, released once the report was sent.
    permit: OwnedSemaphorePermit,
}

/// A tracked publish whose outcome is known.
struct Settled {
    token: u64,
    delivery: Delivery,
    /// The client's error, for the log.
    error: Option<NoticeError>,
    /// Held until the report was sent.
    permit: OwnedSemaphorePermit,
}

impl MqttUpstream {
    /// Starts the connection task (reconnects forever until `shutdown` is cancelled).
    /// `index` identifies this upstream in [`AckReport`]s. Messages from subscriptions are
    /// acknowledged and dropped (counted as `downlink_dropped`); use
    /// [`Self::spawn_with_downlink`] to receive them.
    ///
    /// Validates `config` and reads the TLS files first; nothing is started on error. Must be
    /// called from within a Tokio runtime. The returned task ends after `shutdown` was
    /// cancelled and every accepted tracked publish was reported on `acks`.
    ///
    /// # Errors
    ///
    /// [`SetupError`] for an invalid configuration, unreadable or unsuitable TLS files, options
    /// the MQTT client refuses, or a missing runtime.
    pub fn spawn(
        index: usize,
        config: MqttUpstreamConfig,
        acks: mpsc::Sender<AckReport>,
        shutdown: CancellationToken,
    ) -> Result<(Self, JoinHandle<()>), SetupError> {
        Self::spawn_with_downlink(index, config, acks, None, shutdown)
    }

    /// [`Self::spawn`], and messages from the upstream's subscriptions (see
    /// [`Self::subscribe`]) are sent to `downlink` as [`Downlink`]s, `remote_prefix` stripped.
    ///
    /// The link task waits on a full `downlink` channel, and, before handing out a QoS >= 1
    /// message, for one of the `max_unacked_downlinks` acknowledgement slots (held by each
    /// [`DownlinkAck`] until `ack()` or drop). While it waits it reads nothing from the broker:
    /// backpressure toward the broker, never an unbounded buffer. Waiting longer than the
    /// broker's keep-alive tolerance costs the connection.
    ///
    /// Size limit: MQTT 5 tells the broker `max_downlink_bytes` (CONNECT Maximum Packet Size),
    /// so it does not send bigger packets. MQTT 3.1.1 cannot: bigger packets are read,
    /// acknowledged, dropped and counted up to a decoding limit of a few times
    /// `max_downlink_bytes`; a packet beyond that fails the connection (the client library
    /// cannot skip it), and a *retained* one on a subscribed topic would then fail every
    /// reconnect. Use MQTT 5 or the broker's `message_size_limit` where that matters.
    ///
    /// # Errors
    ///
    /// As [`Self::spawn`].
    pub fn spawn_with_downlink(
        index: usize,
        config: MqttUpstreamConfig,
        acks: mpsc::Sender<AckReport>,
        downlink: Option<mpsc::Sender<Downlink>>,
        shutdown: CancellationToken,
    ) -> Result<(Self, JoinHandle<()>), SetupError> {
        config.validate()?;
        let tls = config.tls.as_ref().map(build_tls_config).transpose()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SetupError::NoRuntime)?;
        let (client, eventloop) = client::build(&config, tls)?;

        let tls_files = tls_fingerprint(config.tls.as_ref());
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            conn: ArcSwap::from_pointee(Conn {
                client: client.clone(),
                remote_prefix: config.remote_prefix.clone(),
                presence: config.presence.clone(),
            }),
            config: Mutex::new((config.clone(), tls_files)),
            live: Mutex::new(LiveSettings::of(&config)),
            pending: Mutex::new(None),
            relink: Notify::new(),
            link: Mutex::new(Link {
                connected: false,
                lost: CancellationToken::new(),
            }),
            counters: Counters::default(),
            subscriptions: Mutex::new(SubscriptionTable::new(config.max_subscriptions)),
            subscriptions_changed: Notify::new(),
            link_state: watch::Sender::new(false),
            reset: Notify::new(),
            link_info: Arc::default(),
            echo: (config.version == MqttVersion::V311).then(|| {
                Mutex::new(EchoFilter::new(
                    EchoFilter::capacity_for(config.request_queue, config.max_inflight),
                    EchoFilter::max_age_for(config.keep_alive),
                ))
            }),
        });
        let window = usize::from(config.max_inflight);
        let (tracked_tx, tracked_rx) = mpsc::channel(window);
        let upstream = Self {
            shared: Arc::clone(&shared),
            inflight: Arc::new(Semaphore::new(window)),
            tracked: tracked_tx,
            shutdown: shutdown.clone(),
        };

        let unacked = usize::from(config.max_unacked_downlinks);
        let (ack_slots, ack_requests) = mpsc::channel(unacked);
        let link = LinkTask {
            eventloop,
            control: Control {
                client,
                shared: Arc::clone(&shared),
                shutdown: shutdown.clone(),
                acks: ack_requests,
                ack_backlog: VecDeque::new(),
                ack_backlog_cap: unacked,
                generation: 0,
                up: false,
                resync: false,
                subacks: FuturesUnordered::new(),
                refused: BTreeSet::new(),
                retry_refused_at: None,
                refusal_warned: None,
                refusals_unlogged: 0,
            },
            backoff: Backoff::new(config.backoff_initial, config.backoff_max),
            drain: config.connect_timeout,
            broker: format!("{}:{}", config.host, config.port),
            version: config.version,
            index,
            downlink,
            ack_slots,
            max_downlink_bytes: config.max_downlink_bytes,
            downlink_closed_logged: false,
        };
        let link = runtime.spawn(link.run());
        let acks = AckTask {
            index,
            tracked: tracked_rx,
            acks,
            shared,
            shutdown,
        };
        let task = runtime.spawn(acks.run(link));
        Ok((upstream, task))
    }

    /// Changes the settings of the running upstream to `config` (for a config reload).
    ///
    /// `config` is checked first like [`Self::spawn`] checks it (values, TLS files, client
    /// options): on any error nothing changes and the link is untouched. Then:
    ///
    /// - nothing changed: [`Reconfigured::Unchanged`];
    /// - only `backoff_initial`, `backoff_max`, `subscribe_retry` or `max_subscriptions`
    ///   changed: applied in place (the next reconnect delay, the next refused-filter retry,
    ///   the next new filter: a lower bound drops no filter already subscribed),
    ///   [`Reconfigured::Applied`];
    /// - a connection setting changed (the URL's host, port or TLS, the TLS files or their
    ///   contents, `client_id`, `username`, `password`, `keep_alive`, `connect_timeout`,
    ///   `remote_prefix`, `max_downlink_bytes`): [`Reconfigured::Reconnecting`]. The link
    ///   task refuses new publishes (`Disconnected`, as while the link is down), lets the
    ///   broker acknowledge what is in flight for up to [`RELINK_DRAIN`](crate::upstream::RELINK_DRAIN), sends DISCONNECT,
    ///   fails what is still unacknowledged (`Disconnected`: the drain sends it again from
    ///   its cursor, so nothing acknowledged is lost and duplicates are possible), then
    ///   connects with the new settings at once; every wanted subscription is made again on
    ///   the new connection, as after any reconnect. The link watch and [`LinkInfo`] show
    ///   the link going down and up again.
    ///
    /// Returns at once; the reconnect happens on the link task.
    ///
    /// # Errors
    ///
    /// As [`Self::spawn`], and [`SetupError::RestartRequired`] when a setting that is fixed
    /// for the upstream's life changed (`name`, `version`, `max_inflight`, `request_queue`,
    /// `max_unacked_downlinks`: queues and windows sized at start).
    pub fn reconfigure(&self, config: MqttUpstreamConfig) -> Result<Reconfigured, SetupError> {
        config.validate()?;
        let tls = config.tls.as_ref().map(build_tls_config).transpose()?;
        let tls_files = tls_fingerprint(config.tls.as_ref());
        let mut current = self
            .shared
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (old, old_tls_files) = &*current;
        if let Some(field) = restart_only_change(old, &config) {
            return Err(SetupError::RestartRequired { field });
        }
        let reconnect = connection_change(old, &config).is_some() || tls_files != *old_tls_files;
        let live = LiveSettings::of(&config);
        if !reconnect && live == LiveSettings::of(old) {
            return Ok(Reconfigured::Unchanged);
        }
        let relink = if reconnect {
            let (client, eventloop) = client::build(&config, tls)?;
            Some(Relink {
                client,
                eventloop,
                config: config.clone(),
            })
        } else {
            None
        };
        // Every check passed: from here on nothing fails.
        *self
            .shared
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = live;
        self.shared
            .subscriptions()
            .set_capacity(config.max_subscriptions);
        *current = (config, tls_files);
        drop(current);
        let Some(relink) = relink else {
            info!(upstream = %self.shared.name, "Upstream settings changed in place.");
            return Ok(Reconfigured::Applied);
        };
        // A reconfigure the link task has not taken yet is replaced (its client never ran).
        *self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(relink);
        self.shared.relink.notify_one();
        Ok(Reconfigured::Reconnecting)
    }

    /// Queues `msg` for the broker without blocking; the topic sent is
    /// `remote_prefix + msg.topic`.
    ///
    /// - QoS >= 1 with `Some(token)` (tracked): `Ok` means accepted, and exactly one
    ///   [`AckReport`] for `token` follows on the `acks` channel — `Acknowledged` only after
    ///   the broker's PUBACK / PUBCOMP.
    /// - QoS 0, or QoS >= 1 with `None`: `Ok` means handed to the client; no report follows.
    ///
    /// # Errors
    ///
    /// The publish was refused now and no report will follow: [`FailReason::Disconnected`]
    /// while the link is down, [`FailReason::QueueFull`] when `max_inflight` tracked publishes
    /// are outstanding or the request queue is full, [`FailReason::Rejected`] for an invalid
    /// topic or an oversized message, [`FailReason::Shutdown`] after shutdown. A `Rejected`
    /// QoS 0 publish counts as `dropped_qos0`, any other `Rejected` one as `failed`; the other
    /// refusals count as `deferred` (the caller keeps the message and may send it again).
    pub fn publish(&self, msg: Message, token: Option<u64>) -> Result<(), FailReason> {
        self.publish_with_seq(msg, token, None)
    }

    /// [`Self::publish`] with the spool's sequence id, sent as the MQTT 5 user property
    /// [`SEQ_PROPERTY`](super::SEQ_PROPERTY) so consumers can drop duplicates (MQTT 3.1.1 has
    /// no properties: the id is not sent).
    ///
    /// # Errors
    /// As [`Self::publish`].
    pub fn publish_with_seq(
        &self,
        msg: Message,
        token: Option<u64>,
        seq: Option<u64>,
    ) -> Result<(), FailReason> {
        let qos = msg.qos;
        let result = self.submit(msg, token, seq);
        let counters = &self.shared.counters;
        match result {
            Ok(()) => counters.published.fetch_add(1, Ordering::Relaxed),
            Err(FailReason::Rejected) if qos == Qos::AtMostOnce => {
                counters.dropped_qos0.fetch_add(1, Ordering::Relaxed)
            }
            Err(FailReason::Rejected) => counters.failed.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.deferred.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// [`Self::publish`] without the counting.
    fn submit(&self, msg: Message, token: Option<u64>, seq: Option<u64>) -> Result<(), FailReason> {
        if self.shutdown.is_cancelled() {
            return Err(FailReason::Shutdown);
        }
        let lost = self
            .shared
            .link_if_connected()
            .ok_or(FailReason::Disconnected)?;
        let conn = self.shared.conn();
        let mut msg = msg;
        msg.topic = remote_topic(&conn.remote_prefix, std::mem::take(&mut msg.topic));
        // Refused here rather than by the client or, worse, by the broker, which would drop
        // the connection and with it every other sensor's traffic.
        if !topic::is_valid_name(&msg.topic) {
            return Err(FailReason::Rejected);
        }
        // MQTT 3.1.1: remember the publish before the client can send it, so its echo is
        // recognised; taken back if the client refuses it.
        let echo = self
            .shared
            .record_echo(&conn.remote_prefix, &msg.topic, &msg.payload);
        let result = self.submit_to_client(&conn.client, msg, token, seq, lost);
        if result.is_err() {
            self.shared.cancel_echo(echo);
        }
        result
    }

    /// Hands one publish (`msg.topic` with the prefix already) to the client, tracked when it
    /// has a token and QoS >= 1.
    fn submit_to_client(
        &self,
        client: &Client,
        msg: Message,
        token: Option<u64>,
        seq: Option<u64>,
        lost: CancellationToken,
    ) -> Result<(), FailReason> {
        let Message {
            topic,
            payload,
            qos,
            retain,
            origin: _,
        } = msg;
        match token {
            Some(token) if qos.is_acknowledged() => {
                let permit = Arc::clone(&self.inflight)
                    .try_acquire_owned()
                    .map_err(|_| FailReason::QueueFull)?;
                // Reserve before publishing so an accepted publish is never left untracked.
                let slot = self.tracked.try_reserve().map_err(|error| match error {
                    TrySendError::Full(()) => FailReason::QueueFull,
                    TrySendError::Closed(()) => FailReason::Shutdown,
                })?;
                let notice = client.try_publish_tracked(topic, payload, qos, retain, seq)?;
                slot.send(Tracked {
                    token,
                    notice,
                    lost,
                    permit,
                });
            }
            _ => client.try_publish(topic, payload, qos, retain, seq)?,
        }
        Ok(())
    }

    /// Adds (or updates the QoS of) an upstream subscription for `filter`, the sensors' filter:
    /// the broker is asked for `remote_prefix + filter`. Non-blocking.
    ///
    /// The subscription is remembered and made again after every reconnect (sessions are
    /// clean). The link task sends it as soon as the link is up and the client's request queue
    /// has room, batched with other changes; a full queue only delays it. MQTT 5 subscribes
    /// with No Local (the upstream's own publishes do not come back), Retain As Published (live
    /// retained messages keep their retain flag) and Retain Handling 1 (retained messages are
    /// sent for a new subscription, not again when a QoS change resubscribes). MQTT 3.1.1 has
    /// none of these options: live retained messages arrive
    /// with retain = 0, and the broker echoes the gateway's own uplink publishes to a
    /// subscribed topic, which the link task recognises and drops (see the module docs of
    /// `mqtt`). The broker's SUBACK is counted in [`UpstreamStats`]; a refused filter stays
    /// remembered, is logged at warn (rate-limited) and asked for again after a delay.
    ///
    /// # Errors
    ///
    /// [`FailReason::Shutdown`] after shutdown; [`FailReason::Rejected`] for an empty filter, or one
    /// that is not valid with the prefix ([`topic::validate_filter`]); [`FailReason::QueueFull`] when
    /// `max_subscriptions` (at most [`MAX_SUBSCRIPTIONS`](super::MAX_SUBSCRIPTIONS)) other
    /// filters are subscribed.
    /// Nothing is remembered on error.
    pub fn subscribe(&self, filter: &str, qos: Qos) -> Result<(), FailReason> {
        if self.shutdown.is_cancelled() {
            return Err(FailReason::Shutdown);
        }
        if filter.is_empty()
            || !topic::is_valid_filter(&remote_topic(
                &self.shared.conn().remote_prefix,
                filter.to_owned(),
            ))
        {
            return Err(FailReason::Rejected);
        }
        let changed = self
            .shared
            .subscriptions()
            .set(filter, qos)
            .map_err(|TableFull| FailReason::QueueFull)?;
        if changed {
            self.shared.subscriptions_changed.notify_one();
        }
        Ok(())
    }

    /// Removes the subscription for `filter` made with [`Self::subscribe`] (UNSUBSCRIBE
    /// upstream, sent like a subscription change) and forgets it. Unknown filters are ignored.
    ///
    /// # Errors
    ///
    /// [`FailReason::Shutdown`] after shutdown.
    pub fn unsubscribe(&self, filter: &str) -> Result<(), FailReason> {
        if self.shutdown.is_cancelled() {
            return Err(FailReason::Shutdown);
        }
        if self.shared.subscriptions().remove(filter) {
            self.shared.subscriptions_changed.notify_one();
        }
        Ok(())
    }

    /// Whether the broker accepted the current connection (CONNACK) and it has not failed
    /// since.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.shared.link().connected
    }

    /// Follows the link state (`true` while connected).
    #[must_use]
    pub fn watch_link(&self) -> watch::Receiver<bool> {
        self.shared.link_state.subscribe()
    }

    /// The link's state, transitions and last error, for the admin listener.
    #[must_use]
    pub fn link_info(&self) -> Arc<LinkInfo> {
        Arc::clone(&self.shared.link_info)
    }

    /// Drops the current connection and reconnects (after the backoff), failing what is in
    /// flight on it: for a broker that stopped answering without closing the connection.
    /// Does nothing while the link is down.
    pub fn reset_link(&self) {
        self.shared.reset.notify_one();
    }

    /// The configured name of this upstream.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A snapshot of the counters (each read atomically, not all at the same instant).
    #[must_use]
    pub fn stats(&self) -> UpstreamStats {
        let c = &self.shared.counters;
        UpstreamStats {
            published: c.published.load(Ordering::Relaxed),
            acknowledged: c.acknowledged.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            dropped_qos0: c.dropped_qos0.load(Ordering::Relaxed),
            deferred: c.deferred.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            downlink_received: c.downlink_received.load(Ordering::Relaxed),
            downlink_dropped: c.downlink_dropped.load(Ordering::Relaxed),
            downlink_acknowledged: c.downlink_acknowledged.load(Ordering::Relaxed),
            downlink_acks_stale: c.downlink_acks_stale.load(Ordering::Relaxed),
            downlink_echoes_dropped: c.downlink_echoes_dropped.load(Ordering::Relaxed),
            echo_records_expired: self.shared.echo().map_or(0, |echo| echo.expired()),
            subscribe_granted: c.subscribe_granted.load(Ordering::Relaxed),
            subscribe_refused: c.subscribe_refused.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for MqttUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttUpstream")
            .field("name", &self.shared.name)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The link state; a poisoned lock is still consistent (two plain fields).
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The subscription table; a poisoned lock still holds a consistent table (its methods
    /// do not panic midway).
    fn subscriptions(&self) -> MutexGuard<'_, SubscriptionTable> {
        self.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The echo filter (MQTT 3.1.1); a poisoned lock still holds a consistent filter (its
    /// methods do not panic midway).
    fn echo(&self) -> Option<MutexGuard<'_, EchoFilter>> {
        self.echo
            .as_ref()
            .map(|echo| echo.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// MQTT 3.1.1: records a publish about to be sent (`topic` with the remote prefix), if a
    /// subscription will bring it back; returns what [`Self::cancel_echo`] needs. A publish
    /// no subscription matches is not recorded: no echo would ever consume its record, which
    /// would only crowd out records still waiting for theirs.
    fn record_echo(&self, prefix: &str, topic: &str, payload: &[u8]) -> Option<(u64, u64)> {
        self.echo.as_ref()?;
        let local = topic.strip_prefix(prefix)?;
        if !self.subscriptions().wants(local) {
            return None;
        }
        let mut echo = self.echo()?;
        let fingerprint = echo.fingerprint(topic.as_bytes(), payload);
        #[allow(clippy::disallowed_methods)] // The filter's clock; the sink is not sans-IO.
        let seq = echo.record(Instant::now(), fingerprint);
        Some((fingerprint, seq))
    }

    /// Takes back a record of [`Self::record_echo`] for a publish that was not sent.
    fn cancel_echo(&self, record: Option<(u64, u64)>) {
        if let (Some((fingerprint, seq)), Some(mut echo)) = (record, self.echo()) {
            echo.cancel(fingerprint, seq);
        }
    }

    /// MQTT 3.1.1: whether an incoming message is the broker's echo of a recorded publish
    /// (consuming the record).
    fn take_echo(&self, topic: &[u8], payload: &[u8], retain: bool) -> bool {
        let Some(mut echo) = self.echo() else {
            return false;
        };
        #[allow(clippy::disallowed_methods)] // As in `record_echo`.
        let now = Instant::now();
        echo.take_echo(now, topic, payload, retain)
    }

    /// The current connection's `lost` token, if connected.
    fn link_if_connected(&self) -> Option<CancellationToken> {
        let link = self.link();
        link.connected.then(|| link.lost.clone())
    }

    /// CONNACK received.
    fn set_connected(&self) {
        self.link().connected = true;
        self.link_state.send_replace(true);
    }

    /// The connection (attempt) ended: fail what was accepted on it. Returns whether the link
    /// was up.
    fn set_lost(&self) -> bool {
        let mut link = self.link();
        let was_connected = link.connected;
        link.connected = false;
        if was_connected {
            link.lost.cancel();
            link.lost = CancellationToken::new();
        }
        drop(link);
        // With clean sessions no echo of what went out on that connection can come any more.
        if was_connected && let Some(mut echo) = self.echo() {
            echo.clear();
        }
        self.link_state.send_replace(false);
        was_connected
    }

    /// Shutting down: refuse publishes, but let in-flight ones drain.
    fn set_stopped(&self) {
        self.link().connected = false;
        self.link_state.send_replace(false);
    }

    /// The connection's client and prefix in force (a short read: not held across waits).
    fn conn(&self) -> arc_swap::Guard<Arc<Conn>> {
        self.conn.load()
    }

    /// The in-place settings in force.
    fn live(&self) -> LiveSettings {
        *self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A reconfigure is switching connections: refuse new publishes (as while the link is
    /// down) but let what is in flight be acknowledged during the clean close.
    fn pause(&self) {
        self.link().connected = false;
        self.link_state.send_replace(false);
    }

    /// The old connection of a reconfigure is closed: fail what it never acknowledged (the
    /// drain sends it again on the new one), as [`Self::set_lost`] does for a lost link.
    fn end_paused(&self) {
        let mut link = self.link();
        link.connected = false;
        link.lost.cancel();
        link.lost = CancellationToken::new();
        drop(link);
        if let Some(mut echo) = self.echo() {
            echo.clear();
        }
        self.link_state.send_replace(false);
    }
}

/// `prefix + topic` (or filter), reusing `topic`'s buffer when there is no prefix.
fn remote_topic(prefix: &str, topic: String) -> String {
    if prefix.is_empty() {
        return topic;
    }
    let mut remote = String::with_capacity(prefix.len() + topic.len());
    remote.push_str(prefix);
    remote.push_str(&topic);
    remote
}

/// The first setting fixed for the upstream's life that differs (see
/// [`MqttUpstream::reconfigure`]).
fn restart_only_change(old: &MqttUpstreamConfig, new: &MqttUpstreamConfig) -> Option<&'static str> {
    if old.name != new.name {
        Some("name")
    } else if old.version != new.version {
        Some("version")
    } else if old.max_inflight != new.max_inflight {
        Some("max_inflight")
    } else if old.request_queue != new.request_queue {
        Some("request_queue")
    } else if old.max_unacked_downlinks != new.max_unacked_downlinks {
        Some("max_unacked_downlinks")
    } else {
        None
    }
}

/// The first connection setting that differs: changing it takes a new connection.
fn connection_change(old: &MqttUpstreamConfig, new: &MqttUpstreamConfig) -> Option<&'static str> {
    let tls_paths = |c: &MqttUpstreamConfig| {
        c.tls.as_ref().map(|t| {
            (
                t.ca_file.clone(),
                t.client_cert.clone(),
                t.client_key.clone(),
            )
        })
    };
    if old.host != new.host || old.port != new.port {
        Some("url")
    } else if tls_paths(old) != tls_paths(new) {
        Some("tls")
    } else if old.client_id != new.client_id {
        Some("client_id")
    } else if old.username != new.username || old.password != new.password {
        Some("credentials")
    } else if old.keep_alive != new.keep_alive {
        Some("keep_alive")
    } else if old.connect_timeout != new.connect_timeout {
        Some("connect_timeout")
    } else if old.remote_prefix != new.remote_prefix {
        Some("remote_prefix")
    } else if old.max_downlink_bytes != new.max_downlink_bytes {
        Some("max_downlink_bytes")
    } else if old.presence != new.presence {
        // The Will is part of CONNECT.
        Some("presence")
    } else {
        None
    }
}

/// Owns the event loop: connects, reconnects with backoff, tracks the link state, passes
/// downlink messages on.
struct LinkTask {
    eventloop: EventLoop,
    /// What runs while `eventloop.poll()` is pending: acknowledgements, subscriptions.
    control: Control,
    backoff: Backoff,
    /// How long in-flight publishes may drain on shutdown (`connect_timeout`).
    drain: Duration,
    /// `host:port`, for logs.
    broker: String,
    version: MqttVersion,
    /// This upstream's index, for [`Downlink::upstream`].
    index: usize,
    /// Where messages from subscriptions go; `None`: they are dropped (counted).
    downlink: Option<mpsc::Sender<Downlink>>,
    /// One slot per QoS >= 1 downlink handed out and not yet acknowledged
    /// (`max_unacked_downlinks`); the [`DownlinkAck`] sends its request through the slot, to
    /// `Control::acks`.
    ack_slots: mpsc::Sender<AckRequest>,
    /// `MqttUpstreamConfig::max_downlink_bytes`.
    max_downlink_bytes: usize,
    /// The closed downlink receiver was logged.
    downlink_closed_logged: bool,
}

/// The part of the link task that must also run while the event loop is being polled: it
/// turns [`DownlinkAck::ack`] calls and subscription changes into client requests.
///
/// The client fails the connection on an acknowledgement for a packet id it does not hold, and
/// a packet id of an old connection may name another message on the new one. So requests tied
/// to a connection are queued only from this task, only while that connection is up, and only
/// at a point where the event loop cannot be between noticing the loss and reporting it:
/// between two `poll` calls, or while one is pending (the client cleans up a lost connection,
/// dropping queued acknowledgements, inside the call that returns the error). A request queued
/// for a connection is then either sent on it or dropped with it.
struct Control {
    client: Client,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    /// `DownlinkAck::ack` requests, through the slots of `LinkTask::ack_slots`.
    acks: mpsc::Receiver<AckRequest>,
    /// Acknowledgements the client's request queue had no room for, retried after each event;
    /// at most `ack_backlog_cap`, emptied when the connection ends.
    ack_backlog: VecDeque<AckRequest>,
    /// `max_unacked_downlinks`.
    ack_backlog_cap: usize,
    /// Counts connections (CONNACKs). A downlink's acknowledgement names the connection it
    /// arrived on and is sent only while that one is up.
    generation: u64,
    /// Connection `generation` is up: CONNACK seen, no error since.
    up: bool,
    /// Subscription changes wait for room (request queue or `MAX_PENDING_SUBACKS`).
    resync: bool,
    /// SUBACKs awaited, with the gateway's filters they answer.
    subacks: FuturesUnordered<SubackFuture>,
    /// Filters the broker refused on this connection, asked for again at `retry_refused_at`;
    /// wanted filters only, so bounded by the table's capacity.
    refused: BTreeSet<String>,
    /// When `refused` is asked for again.
    retry_refused_at: Option<tokio::time::Instant>,
    /// When a refusal was last logged at warn, and how many came since (sensors choose the
    /// filters, so the warning is rate-limited).
    refusal_warned: Option<tokio::time::Instant>,
    refusals_unlogged: u64,
}

/// The gateway's filters of one SUBSCRIBE and, per filter, `None` if granted or the broker's
/// refusal; `Err` when no SUBACK came.
type SubackOutcome = (Vec<String>, Result<Vec<Option<&'static str>>, String>);

/// Resolves with a [`SubackOutcome`].
type SubackFuture = Pin<Box<dyn Future<Output = SubackOutcome> + Send>>;

/// The link as last logged, so each change is logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not connected since start.
    Starting,
    /// Connected.
    Up,
    /// Connection failed or lost; retrying quietly.
    Down,
}

/// Why a downlink message was dropped (acknowledged, counted, not passed on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropReason {
    /// Packet over `max_downlink_bytes`.
    Oversize,
    /// Topic not valid UTF-8.
    NotUtf8,
    /// Topic does not start with `remote_prefix`, or is only the prefix.
    OutsidePrefix,
    /// No downlink receiver (none given, or dropped).
    NoReceiver,
}

impl DropReason {
    /// A short stable tag for logs.
    const fn error_code(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::NotUtf8 => "not_utf8",
            Self::OutsidePrefix => "outside_prefix",
            Self::NoReceiver => "no_receiver",
        }
    }
}

/// The gateway's topic of a delivered PUBLISH: checks the size, UTF-8 and the prefix, and
/// strips the prefix.
fn downlink_topic(
    remote_prefix: &str,
    topic: &[u8],
    packet_bytes: usize,
    max_downlink_bytes: usize,
) -> Result<String, DropReason> {
    if packet_bytes > max_downlink_bytes {
        return Err(DropReason::Oversize);
    }
    let topic = std::str::from_utf8(topic).map_err(|_| DropReason::NotUtf8)?;
    match topic.strip_prefix(remote_prefix) {
        Some(local) if !local.is_empty() => Ok(local.to_owned()),
        _ => Err(DropReason::OutsidePrefix),
    }
}

impl LinkTask {
    async fn run(mut self) {
        let name = self.control.shared.name.clone();
        info!(upstream = %name, broker = %self.broker, version = ?self.version, "Upstream starting.");
        let mut phase = Phase::Starting;
        let mut connections: u64 = 0;
        loop {
            // `None`: shutdown. The poll is dropped unfinished only then.
            let shared = Arc::clone(&self.control.shared);
            let reset = async {
                if phase == Phase::Up {
                    shared.reset.notified().await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            // `None`: shutdown. The poll is dropped unfinished only then, or when the
            // connection is reset or replaced on purpose (it is discarded then anyway).
            let polled = tokio::select! {
                polled = self.control.drive(self.eventloop.poll()) => polled.map(Some),
                () = reset => Some(Some(Err(LinkError::Reset))),
                () = shared.relink.notified() => Some(None),
            };
            let Some(polled) = polled else {
                break;
            };
            let Some(polled) = polled else {
                phase = self.relink(phase).await;
                continue;
            };
            if matches!(polled, Err(LinkError::Reset)) {
                self.eventloop.reset();
            }
            match polled {
                Ok(LinkEvent::Connected) => {
                    // A reset asked for while the link was down (or for the previous
                    // connection) must not cut this new one: drop its stored permit.
                    let _ = self.control.shared.reset.notified().now_or_never();
                    // Birth first: queued before the link is marked up, so it reaches the
                    // broker before any publish of this connection (the request queue is
                    // FIFO).
                    self.announce(|p| &p.birth);
                    self.control.shared.set_connected();
                    self.control.shared.link_info.up(wall_ms());
                    self.backoff.reset();
                    if connections > 0 {
                        self.control
                            .shared
                            .counters
                            .reconnects
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    connections = connections.saturating_add(1);
                    info!(upstream = %name, broker = %self.broker, "Upstream connected.");
                    phase = Phase::Up;
                    self.control.connected();
                }
                Ok(LinkEvent::Publish(publish)) => {
                    if !self.deliver(publish).await {
                        break;
                    }
                }
                Ok(LinkEvent::Other) => {}
                Err(error) => {
                    self.control.lost();
                    self.control
                        .shared
                        .link_info
                        .down(wall_ms(), error.summary());
                    match phase {
                        Phase::Up => {
                            warn!(upstream = %name, error = %error, "Upstream connection lost.");
                        }
                        Phase::Starting => warn!(
                            upstream = %name,
                            broker = %self.broker,
                            error = %error,
                            "Upstream connection failed, retrying."
                        ),
                        Phase::Down => {
                            debug!(upstream = %name, error = %error, "Upstream reconnect failed.");
                        }
                    }
                    phase = Phase::Down;
                    let live = self.control.shared.live();
                    self.backoff
                        .set_bounds(live.backoff_initial, live.backoff_max);
                    let delay = self.backoff.next_delay();
                    debug!(upstream = %name, delay = ?delay, "Upstream reconnecting after backoff.");
                    // A reconfigure ends the wait: the new settings are tried at once.
                    let shared = Arc::clone(&self.control.shared);
                    let slept = tokio::select! {
                        slept = self.control.drive(tokio::time::sleep(delay)) => slept.map(|()| false),
                        () = shared.relink.notified() => Some(true),
                    };
                    match slept {
                        None => break,
                        Some(true) => phase = self.relink(phase).await,
                        Some(false) => {}
                    }
                }
            }
            self.control.retry();
        }
        if phase == Phase::Up {
            self.control
                .shared
                .link_info
                .down(wall_ms(), "upstream stopped");
        }
        self.stop(phase == Phase::Up).await;
        info!(upstream = %name, "Upstream stopped.");
    }

    /// Switches to the connection a reconfigure built (see [`MqttUpstream::reconfigure`]):
    /// closes the current one cleanly, fails what it left unacknowledged, and installs the
    /// new client, event loop and settings; the next poll connects. Returns the new phase.
    async fn relink(&mut self, phase: Phase) -> Phase {
        let taken = self
            .control
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Relink {
            client,
            eventloop,
            config,
        }) = taken
        else {
            return phase;
        };
        let shared = Arc::clone(&self.control.shared);
        let broker = format!("{}:{}", config.host, config.port);
        info!(upstream = %shared.name, from = %self.broker, to = %broker, "Upstream reconfigured; reconnecting with the new settings.");
        if phase == Phase::Up {
            shared.pause();
            let drain = RELINK_DRAIN.min(self.drain);
            if self.control.client.try_disconnect(drain) {
                let deadline = tokio::time::sleep(drain.saturating_add(DISCONNECT_MARGIN));
                tokio::pin!(deadline);
                let stop = self.control.shutdown.clone();
                loop {
                    // Acknowledgements of in-flight publishes settle them; downlink arriving
                    // now is neither passed on nor acknowledged (the clean session drops it).
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = &mut deadline => {
                            debug!(upstream = %shared.name, "Upstream disconnect for a reconfigure timed out.");
                            break;
                        }
                        polled = self.eventloop.poll() => if polled.is_err() {
                            break;
                        }
                    }
                }
            }
            shared
                .link_info
                .down(wall_ms(), "reconfigured: reconnecting");
        }
        self.control.up = false;
        self.control.ack_backlog.clear();
        self.control.subacks = FuturesUnordered::new();
        shared.end_paused();
        shared.conn.store(Arc::new(Conn {
            client: client.clone(),
            remote_prefix: config.remote_prefix.clone(),
            presence: config.presence.clone(),
        }));
        self.control.client = client;
        // The old event loop goes with its connection: anything left in its queue fails.
        self.eventloop = eventloop;
        self.broker = broker;
        self.drain = config.connect_timeout;
        self.max_downlink_bytes = config.max_downlink_bytes;
        self.backoff = Backoff::new(config.backoff_initial, config.backoff_max);
        Phase::Starting
    }

    /// Passes a message from a subscription on, with `remote_prefix` stripped and, for QoS >= 1,
    /// an acknowledgement handle for the current connection. Waits for an acknowledgement slot
    /// and for room in the downlink channel. Returns `false` on shutdown.
    async fn deliver(&mut self, publish: IncomingPublish) -> bool {
        let IncomingPublish {
            topic,
            payload,
            qos,
            retain,
            pkid,
            packet_bytes,
            subscription_ids,
        } = publish;
        let counters = &self.control.shared.counters;
        counters.downlink_received.fetch_add(1, Ordering::Relaxed);
        let request = AckRequest {
            generation: self.control.generation,
            pkid,
            qos,
        };
        if self.control.shared.take_echo(&topic, &payload, retain) {
            counters
                .downlink_echoes_dropped
                .fetch_add(1, Ordering::Relaxed);
            trace!(upstream = %self.control.shared.name, "Echo of the gateway's own publish dropped.");
            if qos.is_acknowledged() {
                self.control.forward_ack(request);
            }
            return true;
        }
        let topic = match downlink_topic(
            &self.control.shared.conn().remote_prefix,
            &topic,
            packet_bytes,
            self.max_downlink_bytes,
        ) {
            Ok(topic) => topic,
            Err(reason) => {
                self.drop_downlink(request, packet_bytes, reason);
                return true;
            }
        };
        let Some(downlink) = &self.downlink else {
            self.drop_downlink(request, packet_bytes, DropReason::NoReceiver);
            return true;
        };
        let ack = if qos.is_acknowledged() {
            match self
                .control
                .drive(self.ack_slots.clone().reserve_owned())
                .await
            {
                None => return false,
                Some(Ok(slot)) => DownlinkAck::new(slot, request),
                // Unreachable: the receiver lives in `self.control`.
                Some(Err(_)) => DownlinkAck::none(),
            }
        } else {
            DownlinkAck::none()
        };
        let filters = if subscription_ids.is_empty() {
            None
        } else {
            let table = self.control.shared.subscriptions();
            Some(
                subscription_ids
                    .iter()
                    .filter_map(|&id| table.filter_for(id))
                    .collect(),
            )
        };
        let message = Downlink {
            upstream: self.index,
            topic,
            payload,
            qos,
            retain,
            filters,
            ack,
        };
        match self.control.drive(downlink.send(message)).await {
            None => false,
            Some(Ok(())) => true,
            Some(Err(SendError(message))) => {
                if !self.downlink_closed_logged {
                    self.downlink_closed_logged = true;
                    warn!(upstream = %self.control.shared.name, "Downlink receiver dropped, discarding downlink messages.");
                }
                self.control
                    .shared
                    .counters
                    .downlink_dropped
                    .fetch_add(1, Ordering::Relaxed);
                message.ack.ack();
                true
            }
        }
    }

    /// Acknowledges a message that will not be passed on, so it does not hold the broker's
    /// in-flight window, and counts it.
    fn drop_downlink(&mut self, request: AckRequest, packet_bytes: usize, reason: DropReason) {
        self.control
            .shared
            .counters
            .downlink_dropped
            .fetch_add(1, Ordering::Relaxed);
        debug!(
            upstream = %self.control.shared.name,
            reason = reason.error_code(),
            packet_bytes,
            "Downlink message dropped."
        );
        if request.qos.is_acknowledged() {
            self.control.forward_ack(request);
        }
    }

    /// Lets the broker acknowledge what is in flight (bounded by `drain`), then disconnects.
    /// Dropping the event loop afterwards resolves every remaining notice. Downlink messages
    /// arriving meanwhile are neither passed on nor acknowledged (the session is clean).
    async fn stop(mut self, connected: bool) {
        self.control.shared.set_stopped();
        if connected {
            // Death before DISCONNECT (which makes the broker discard the Will).
            self.announce(|p| &p.death);
        }
        let shared = &self.control.shared;
        if !connected || !self.control.client.try_disconnect(self.drain) {
            return;
        }
        let deadline = tokio::time::sleep(self.drain.saturating_add(DISCONNECT_MARGIN));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                () = &mut deadline => {
                    debug!(upstream = %shared.name, "Upstream disconnect timed out.");
                    return;
                }
                polled = self.eventloop.poll() => if let Err(error) = polled {
                    // `RequestsDone` after a clean DISCONNECT, or the drain timed out.
                    debug!(upstream = %shared.name, error = %error, "Upstream disconnected.");
                    return;
                }
            }
        }
    }
}

impl LinkTask {
    /// Queues the presence message `which` picks (birth, death), untracked, with
    /// `remote_prefix`; a full request queue or a refusal is logged and counted as `failed`.
    fn announce(&self, which: fn(&Presence) -> &Message) {
        let conn = self.control.shared.conn();
        let Some(presence) = &conn.presence else {
            return;
        };
        let msg = which(presence);
        let topic = remote_topic(&conn.remote_prefix, msg.topic.clone());
        match conn
            .client
            .try_publish(topic, msg.payload.clone(), msg.qos, msg.retain, None)
        {
            Ok(()) => {
                debug!(upstream = %self.control.shared.name, topic = %msg.topic, "Presence published.");
            }
            Err(error) => {
                self.control
                    .shared
                    .counters
                    .failed
                    .fetch_add(1, Ordering::Relaxed);
                warn!(upstream = %self.control.shared.name, topic = %msg.topic, error = ?error, "Presence message not sent.");
            }
        }
    }
}

impl Control {
    /// Runs `work` to completion while serving acknowledgements, SUBACKs and subscription
    /// changes; `None` if shutdown came first (`work` is dropped then).
    async fn drive<F: Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::pin!(work);
        loop {
            let retry_at = self.retry_refused_at;
            let retry_refused = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return None,
                Some(request) = self.acks.recv() => self.forward_ack(request),
                Some((filters, outcome)) = self.subacks.next(), if !self.subacks.is_empty() => {
                    self.on_suback(&filters, outcome);
                }
                () = self.shared.subscriptions_changed.notified() => self.sync_subscriptions(),
                () = retry_refused => self.retry_refused(),
                output = &mut work => return Some(output),
            }
        }
    }

    /// CONNACK: a new connection without subscriptions.
    fn connected(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.up = true;
        self.ack_backlog.clear();
        // Everything wanted is asked for again, refused filters included.
        self.refused.clear();
        self.retry_refused_at = None;
        self.shared.subscriptions().reset_link();
        self.sync_subscriptions();
    }

    /// Asks the broker again for the filters it refused.
    fn retry_refused(&mut self) {
        self.retry_refused_at = None;
        let refused = std::mem::take(&mut self.refused);
        {
            let mut table = self.shared.subscriptions();
            for filter in &refused {
                table.unapply(filter);
            }
        }
        self.sync_subscriptions();
    }

    /// The connection (attempt) ended: acknowledgements for it are void from now on.
    fn lost(&mut self) {
        self.up = false;
        self.ack_backlog.clear();
        self.shared.set_lost();
    }

    /// After each event: retries what found the request queue full.
    fn retry(&mut self) {
        while let Some(&request) = self.ack_backlog.front() {
            if !self.submit_ack(request) {
                break;
            }
            self.ack_backlog.pop_front();
        }
        if self.resync {
            self.sync_subscriptions();
        }
    }

    /// Sends a downlink acknowledgement if its connection is still up; otherwise drops it.
    fn forward_ack(&mut self, request: AckRequest) {
        if !self.up || request.generation != self.generation {
            self.shared
                .counters
                .downlink_acks_stale
                .fetch_add(1, Ordering::Relaxed);
            trace!(upstream = %self.shared.name, pkid = request.pkid, "Stale downlink acknowledgement ignored.");
            return;
        }
        if !self.ack_backlog.is_empty() || !self.submit_ack(request) {
            if self.ack_backlog.len() < self.ack_backlog_cap {
                self.ack_backlog.push_back(request);
            } else {
                // Cannot happen while each backlog entry came through one of the slots; the
                // message stays unacknowledged until the connection ends.
                warn!(upstream = %self.shared.name, pkid = request.pkid, "Downlink acknowledgement dropped, backlog full.");
            }
        }
    }

    /// Queues one acknowledgement; `false` if the request queue is full (retry later).
    fn submit_ack(&self, request: AckRequest) -> bool {
        match self.client.try_ack(request.pkid, request.qos) {
            Ok(()) => {
                self.shared
                    .counters
                    .downlink_acknowledged
                    .fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(SubmitError::Full) => false,
            // The event loop is gone (shutdown): nothing left to acknowledge.
            Err(SubmitError::Closed | SubmitError::Invalid) => true,
        }
    }

    /// Sends the subscription changes while the link is up, in batches, as far as the request
    /// queue and `MAX_PENDING_SUBACKS` allow; sets `resync` if some must wait.
    fn sync_subscriptions(&mut self) {
        self.resync = false;
        if !self.up {
            // `connected` sends everything on the next connection.
            return;
        }
        let conn = self.shared.conn();
        let prefix = conn.remote_prefix.as_str();
        let mut table = self.shared.subscriptions();
        while table.has_changes() {
            if self.subacks.len() >= MAX_PENDING_SUBACKS {
                self.resync = true;
                return;
            }
            // A subscription identifier covers a whole SUBSCRIBE, so with identifiers every
            // filter gets its own packet.
            let per_packet = if self.client.has_subscription_ids() {
                1
            } else {
                FILTERS_PER_PACKET
            };
            let batch = table.next_batch(per_packet, FILTER_BYTES_PER_PACKET, prefix.len());
            if !batch.unsubscribe.is_empty() {
                let remote: Vec<String> = batch
                    .unsubscribe
                    .iter()
                    .map(|filter| format!("{prefix}{filter}"))
                    .collect();
                match self.client.try_unsubscribe_many(&remote) {
                    Ok(()) => table.commit_unsubscribe(&batch.unsubscribe),
                    Err(error) => {
                        table.requeue(batch.unsubscribe.iter().map(String::as_str));
                        table.requeue(batch.subscribe.iter().map(|(f, _)| f.as_str()));
                        self.resync = error == SubmitError::Full;
                        return;
                    }
                }
            }
            if !batch.subscribe.is_empty() {
                let remote: Vec<(String, Qos)> = batch
                    .subscribe
                    .iter()
                    .map(|(filter, qos)| (format!("{prefix}{filter}"), *qos))
                    .collect();
                let id = match batch.subscribe.as_slice() {
                    [(filter, _)] if self.client.has_subscription_ids() => table.id(filter),
                    _ => None,
                };
                match self.client.try_subscribe_many(&remote, id) {
                    Ok(wait) => {
                        table.commit_subscribe(&batch.subscribe);
                        let filters: Vec<String> =
                            batch.subscribe.into_iter().map(|(f, _)| f).collect();
                        self.subacks
                            .push(Box::pin(async move { (filters, wait.outcome().await) }));
                    }
                    Err(SubmitError::Invalid) => {
                        // Cannot happen: `subscribe` validated every filter. Forget them
                        // rather than retrying forever.
                        error!(upstream = %self.shared.name, filters = ?remote, "Upstream subscription refused by the client.");
                        table.commit_subscribe(&batch.subscribe);
                    }
                    Err(error) => {
                        table.requeue(batch.subscribe.iter().map(|(f, _)| f.as_str()));
                        self.resync = error == SubmitError::Full;
                        return;
                    }
                }
            }
        }
    }

    /// Counts the broker's answer to one SUBSCRIBE.
    fn on_suback(
        &mut self,
        filters: &[String],
        outcome: Result<Vec<Option<&'static str>>, String>,
    ) {
        let counters = &self.shared.counters;
        match outcome {
            Ok(codes) => {
                if codes.len() != filters.len() {
                    debug!(upstream = %self.shared.name, filters = filters.len(), codes = codes.len(), "SUBACK does not match its SUBSCRIBE.");
                }
                for (filter, code) in filters.iter().zip(codes) {
                    match code {
                        None => counters.subscribe_granted.fetch_add(1, Ordering::Relaxed),
                        Some(reason) => {
                            // Subscribers of this filter get nothing from this upstream: seen
                            // at warn, rate-limited (sensors choose the filters), and retried.
                            self.refusals_unlogged += 1;
                            let now = tokio::time::Instant::now();
                            let quiet = self.refusal_warned.is_some_and(|at| {
                                now.saturating_duration_since(at)
                                    < self.shared.live().subscribe_retry
                            });
                            if !quiet {
                                warn!(
                                    upstream = %self.shared.name,
                                    %filter,
                                    reason,
                                    refused = self.refusals_unlogged,
                                    retry_secs = self.shared.live().subscribe_retry.as_secs(),
                                    "Upstream refused a subscription; asking again later."
                                );
                                self.refusal_warned = Some(now);
                                self.refusals_unlogged = 0;
                            }
                            if self.up {
                                self.refused.insert(filter.clone());
                                self.retry_refused_at
                                    .get_or_insert(now + self.shared.live().subscribe_retry);
                            }
                            counters.subscribe_refused.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }
            Err(error) => {
                // The next connection asks for every wanted filter again (`connected`).
                trace!(upstream = %self.shared.name, error = %error, "Subscription not confirmed before the link dropped.");
            }
        }
        if self.resync {
            self.sync_subscriptions();
        }
    }
}

/// Waits for the broker's verdicts and reports them; the task `spawn` returns.
struct AckTask {
    index: usize,
    tracked: mpsc::Receiver<Tracked>,
    acks: mpsc::Sender<AckReport>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl AckTask {
    async fn run(mut self, mut link: JoinHandle<()>) {
        // Cancelled once the link task (and with it the event loop) is gone: nothing can be
        // acknowledged any more, so every waiter still open settles as `Shutdown`.
        let abandon = CancellationToken::new();
        let mut pending = FuturesUnordered::new();
        let mut batch = Vec::with_capacity(RECV_BATCH);
        let mut receiving = true;
        let mut closing = false;
        let mut link_running = true;
        let mut acks_open = true;
        loop {
            if !receiving && !link_running && pending.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                joined = &mut link, if link_running => {
                    link_running = false;
                    abandon.cancel();
                    self.shared.set_stopped();
                    if let Err(error) = joined {
                        error!(upstream = %self.shared.name, error = %error, "Upstream connection task failed.");
                    }
                }
                () = self.shutdown.cancelled(), if !closing => {
                    // No new publishes; those already in the channel are still received.
                    closing = true;
                    self.tracked.close();
                }
                Some(settled) = pending.next(), if !pending.is_empty() => {
                    acks_open = self.report(settled, acks_open).await;
                }
                received = self.tracked.recv_many(&mut batch, RECV_BATCH), if receiving => {
                    if received == 0 {
                        receiving = false;
                    }
                    for tracked in batch.drain(..) {
                        pending.push(settle(tracked, abandon.clone()));
                    }
                }
                else => break,
            }
        }
        debug!(upstream = %self.shared.name, "Upstream acknowledgement task finished.");
    }

    /// Counts and sends one report; returns whether the report channel is still open.
    async fn report(&self, settled: Settled, acks_open: bool) -> bool {
        let Settled {
            token,
            delivery,
            error,
            permit,
        } = settled;
        let counters = &self.shared.counters;
        match delivery {
            Delivery::Acknowledged => {
                counters.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Delivery::Failed(reason) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                match &error {
                    Some(error) => trace!(
                        upstream = %self.shared.name,
                        token,
                        reason = reason.error_code(),
                        error = %error,
                        "Publish not acknowledged."
                    ),
                    None => trace!(
                        upstream = %self.shared.name,
                        token,
                        reason = reason.error_code(),
                        "Publish not acknowledged."
                    ),
                }
            }
        }
        let report = AckReport {
            token,
            upstream: self.index,
            delivery,
        };
        let still_open = acks_open && self.acks.send(report).await.is_ok();
        if acks_open && !still_open {
            warn!(upstream = %self.shared.name, "Acknowledgement receiver dropped, discarding reports.");
        }
        // The slot frees only now, so unsent reports count against `max_inflight`.
        drop(permit);
        still_open
    }
}

/// Waits for the first of: the broker's answer, the loss of the connection the publish was
/// accepted on, the end of the event loop. The broker's answer wins ties.
async fn settle(tracked: Tracked, abandon: CancellationToken) -> Settled {
    let Tracked {
        token,
        notice,
        lost,
        permit,
    } = tracked;
    let (delivery, error) = tokio::select! {
        biased;
        outcome = notice.delivery() => outcome,
        () = lost.cancelled() => (Delivery::Failed(FailReason::Disconnected), None),
        () = abandon.cancelled() => (Delivery::Failed(FailReason::Shutdown), None),
    };
    Settled {
        token,
        delivery,
        error,
        permit,
    }
}
