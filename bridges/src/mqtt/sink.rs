//! The upstream handle and its two tasks.
//!
//! ```text
//!   MqttUpstream (Clone)              ack task (returned JoinHandle)        link task
//!   ────────────────────              ──────────────────────────────        ─────────
//!   publish():                        owns: FuturesUnordered<settled>       owns: EventLoop
//!     link up? slot free?             recv Tracked ─> push waiter           poll() forever:
//!     try_publish_tracked ─ Tracked ─>waiter = notice | link lost | stop      CONNACK -> link up
//!                          (bounded)  settled ─> acks.send(AckReport)         error -> link lost,
//!                                     then frees the in-flight slot                    backoff
//!                                     joins the link task on shutdown       shutdown -> drain,
//!                                                                                     DISCONNECT
//! ```
//!
//! The link state (`Link`) has one writer, the link task; `publish` reads it under a short
//! std mutex. Each link generation has its own `lost` token: publishing captures the token of
//! the generation it saw as connected, and the link task cancels it when that connection ends.
//! So a publish accepted on a connection is failed when *that* connection drops, even if the
//! client has reconnected before the waiter looks.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use super::backoff::Backoff;
use super::client::{self, Client, EventLoop, IncomingPublish, LinkEvent, Notice, NoticeError};
use super::config::{MqttUpstreamConfig, MqttVersion, SetupError, build_tls_config};
use super::{AckReport, Delivery, FailReason};
use crate::message::{Downlink, DownlinkAck, Message, Qos};

/// Filters per SUBSCRIBE packet when subscriptions are made again after a reconnect.
const RESUBSCRIBE_BATCH: usize = 64;

/// Most tracked publishes the ack task takes from its channel per wake-up.
const RECV_BATCH: usize = 64;

/// Extra time, beyond the drain timeout given to the client, before the link task stops
/// polling a broker that never answers the shutdown DISCONNECT.
const DISCONNECT_MARGIN: Duration = Duration::from_secs(1);

/// Handle to one upstream broker connection. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct MqttUpstream {
    /// State shared with the tasks.
    shared: Arc<Shared>,
    /// Queues requests into the event loop.
    client: Client,
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
    /// QoS >= 1 publishes refused by `publish` or reported failed.
    pub failed: u64,
    /// QoS 0 publishes dropped (link down, queue full, refused).
    pub dropped_qos0: u64,
    /// Successful connections after the first one.
    pub reconnects: u64,
    /// Messages received from the upstream's subscriptions and passed on.
    pub downlink_received: u64,
    /// Messages received but dropped (topic outside `remote_prefix`, not UTF-8, no receiver).
    pub downlink_dropped: u64,
}

/// What the handle and both tasks share.
struct Shared {
    /// `MqttUpstreamConfig::name`, the `upstream` log field.
    name: String,
    /// Prepended to every topic.
    remote_prefix: String,
    /// Connection state; written by the link task only.
    link: Mutex<Link>,
    /// Statistics, updated lock-free.
    counters: Counters,
    /// Remote filters (prefix applied) and their QoS, made again after every reconnect.
    subscriptions: Mutex<BTreeMap<String, Qos>>,
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
    reconnects: AtomicU64,
    downlink_received: AtomicU64,
    downlink_dropped: AtomicU64,
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
    /// `index` identifies this upstream in [`AckReport`]s.
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
    /// [`Self::subscribe`]) are sent to `downlink`. The link task waits on a full `downlink`
    /// channel: backpressure toward the broker, never an unbounded buffer.
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

        let shared = Arc::new(Shared {
            name: config.name.clone(),
            remote_prefix: config.remote_prefix.clone(),
            link: Mutex::new(Link {
                connected: false,
                lost: CancellationToken::new(),
            }),
            counters: Counters::default(),
            subscriptions: Mutex::new(BTreeMap::new()),
        });
        let window = usize::from(config.max_inflight);
        let (tracked_tx, tracked_rx) = mpsc::channel(window);
        let upstream = Self {
            shared: Arc::clone(&shared),
            client: client.clone(),
            inflight: Arc::new(Semaphore::new(window)),
            tracked: tracked_tx,
            shutdown: shutdown.clone(),
        };

        let link = LinkTask {
            eventloop,
            client,
            shared: Arc::clone(&shared),
            backoff: Backoff::new(config.backoff_initial, config.backoff_max),
            shutdown: shutdown.clone(),
            drain: config.connect_timeout,
            broker: format!("{}:{}", config.host, config.port),
            version: config.version,
            index,
            downlink,
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
    /// topic or an oversized message, [`FailReason::Shutdown`] after shutdown. Refused QoS 0
    /// publishes count as `dropped_qos0`, others as `failed`.
    pub fn publish(&self, msg: Message, token: Option<u64>) -> Result<(), FailReason> {
        let qos = msg.qos;
        let result = self.submit(msg, token);
        let counters = &self.shared.counters;
        match result {
            Ok(()) => counters.published.fetch_add(1, Ordering::Relaxed),
            Err(_) if qos == Qos::AtMostOnce => {
                counters.dropped_qos0.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => counters.failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// [`Self::publish`] without the counting.
    fn submit(&self, msg: Message, token: Option<u64>) -> Result<(), FailReason> {
        if self.shutdown.is_cancelled() {
            return Err(FailReason::Shutdown);
        }
        let lost = self
            .shared
            .link_if_connected()
            .ok_or(FailReason::Disconnected)?;
        let Message {
            topic,
            payload,
            qos,
            retain,
        } = msg;
        let topic = self.shared.remote_topic(topic);
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
                let notice = self
                    .client
                    .try_publish_tracked(topic, payload, qos, retain)?;
                slot.send(Tracked {
                    token,
                    notice,
                    lost,
                    permit,
                });
            }
            _ => self.client.try_publish(topic, payload, qos, retain)?,
        }
        Ok(())
    }

    /// Adds (or changes the QoS of) an upstream subscription to `remote_prefix + filter`. It is
    /// remembered and made again after every reconnect (sessions are clean). Non-blocking.
    ///
    /// # Errors
    ///
    /// [`FailReason::Shutdown`] after shutdown; [`FailReason::QueueFull`] when the request could
    /// not be queued now (the subscription is still remembered and made on the next
    /// reconnect).
    pub fn subscribe(&self, filter: &str, qos: Qos) -> Result<(), FailReason> {
        if self.shutdown.is_cancelled() {
            return Err(FailReason::Shutdown);
        }
        let remote = self.shared.remote_topic(filter.to_owned());
        self.shared.subscriptions().insert(remote.clone(), qos);
        if self.is_connected() {
            self.client.try_subscribe(&[(remote, qos)])?;
        }
        Ok(())
    }

    /// Removes an upstream subscription made with [`Self::subscribe`].
    ///
    /// # Errors
    ///
    /// As [`Self::subscribe`]; the subscription is forgotten either way.
    pub fn unsubscribe(&self, filter: &str) -> Result<(), FailReason> {
        let remote = self.shared.remote_topic(filter.to_owned());
        self.shared.subscriptions().remove(&remote);
        if self.shutdown.is_cancelled() {
            return Err(FailReason::Shutdown);
        }
        if self.is_connected() {
            self.client.try_unsubscribe(&remote)?;
        }
        Ok(())
    }

    /// Whether the broker accepted the current connection (CONNACK) and it has not failed
    /// since.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.shared.link().connected
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
            reconnects: c.reconnects.load(Ordering::Relaxed),
            downlink_received: c.downlink_received.load(Ordering::Relaxed),
            downlink_dropped: c.downlink_dropped.load(Ordering::Relaxed),
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

    /// The remembered subscriptions; a poisoned lock still holds a consistent map.
    fn subscriptions(&self) -> MutexGuard<'_, BTreeMap<String, Qos>> {
        self.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The current connection's `lost` token, if connected.
    fn link_if_connected(&self) -> Option<CancellationToken> {
        let link = self.link();
        link.connected.then(|| link.lost.clone())
    }

    /// CONNACK received.
    fn set_connected(&self) {
        self.link().connected = true;
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
        was_connected
    }

    /// Shutting down: refuse publishes, but let in-flight ones drain.
    fn set_stopped(&self) {
        self.link().connected = false;
    }

    /// `remote_prefix + topic`, reusing `topic`'s buffer when there is no prefix.
    fn remote_topic(&self, topic: String) -> String {
        if self.remote_prefix.is_empty() {
            return topic;
        }
        let mut remote = String::with_capacity(self.remote_prefix.len() + topic.len());
        remote.push_str(&self.remote_prefix);
        remote.push_str(&topic);
        remote
    }
}

/// Owns the event loop: connects, reconnects with backoff, tracks the link state.
struct LinkTask {
    eventloop: EventLoop,
    /// For the shutdown DISCONNECT.
    client: Client,
    shared: Arc<Shared>,
    backoff: Backoff,
    shutdown: CancellationToken,
    /// How long in-flight publishes may drain on shutdown (`connect_timeout`).
    drain: Duration,
    /// `host:port`, for logs.
    broker: String,
    version: MqttVersion,
    /// This upstream's index, for [`Downlink::upstream`].
    index: usize,
    /// Where messages from subscriptions go; `None`: they are dropped (counted).
    downlink: Option<mpsc::Sender<Downlink>>,
}

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

impl LinkTask {
    async fn run(mut self) {
        let name = self.shared.name.clone();
        info!(upstream = %name, broker = %self.broker, version = ?self.version, "Upstream starting.");
        let mut phase = Phase::Starting;
        let mut connections: u64 = 0;
        loop {
            let polled = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                polled = self.eventloop.poll() => polled,
            };
            match polled {
                Ok(LinkEvent::Connected) => {
                    self.shared.set_connected();
                    self.backoff.reset();
                    if connections > 0 {
                        self.shared
                            .counters
                            .reconnects
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    connections = connections.saturating_add(1);
                    info!(upstream = %name, broker = %self.broker, "Upstream connected.");
                    phase = Phase::Up;
                    self.resubscribe();
                }
                Ok(LinkEvent::Publish(publish)) => self.deliver(*publish).await,
                Ok(LinkEvent::Other) => {}
                Err(error) => {
                    self.shared.set_lost();
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
                    let delay = self.backoff.next_delay();
                    debug!(upstream = %name, delay = ?delay, "Upstream reconnecting after backoff.");
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.stop(phase == Phase::Up).await;
        info!(upstream = %name, "Upstream stopped.");
    }

    /// Makes every remembered subscription again on a new (clean) connection, in batches.
    fn resubscribe(&self) {
        let filters: Vec<(String, Qos)> = self
            .shared
            .subscriptions()
            .iter()
            .map(|(f, q)| (f.clone(), *q))
            .collect();
        for batch in filters.chunks(RESUBSCRIBE_BATCH) {
            if let Err(error) = self.client.try_subscribe(batch) {
                warn!(upstream = %self.shared.name, error = ?error, "Upstream resubscribe failed.");
            }
        }
    }

    /// Passes a message from a subscription on, with `remote_prefix` removed; its
    /// acknowledgement travels with it.
    async fn deliver(&self, publish: IncomingPublish) {
        let counters = &self.shared.counters;
        let (topic, payload, qos, retain) = publish.parts();
        let topic = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| t.strip_prefix(self.shared.remote_prefix.as_str()));
        let (Some(topic), Some(downlink)) = (topic, &self.downlink) else {
            counters.downlink_dropped.fetch_add(1, Ordering::Relaxed);
            // Not ours to deliver: acknowledge so the broker does not keep it in flight.
            if let Some(ack) = self.client.prepare_ack(&publish) {
                ack.send();
            }
            return;
        };
        let message = Downlink {
            upstream: self.index,
            topic: topic.to_owned(),
            payload: payload.clone(),
            qos,
            retain,
            ack: DownlinkAck(self.client.prepare_ack(&publish)),
        };
        if downlink.send(message).await.is_ok() {
            counters.downlink_received.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.downlink_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lets the broker acknowledge what is in flight (bounded by `drain`), then disconnects.
    /// Dropping the event loop afterwards resolves every remaining notice.
    async fn stop(mut self, connected: bool) {
        self.shared.set_stopped();
        if !connected || !self.client.try_disconnect(self.drain) {
            return;
        }
        let deadline = tokio::time::sleep(self.drain.saturating_add(DISCONNECT_MARGIN));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                () = &mut deadline => {
                    debug!(upstream = %self.shared.name, "Upstream disconnect timed out.");
                    return;
                }
                polled = self.eventloop.poll() => if let Err(error) = polled {
                    // `RequestsDone` after a clean DISCONNECT, or the drain timed out.
                    debug!(upstream = %self.shared.name, error = %error, "Upstream disconnected.");
                    return;
                }
            }
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
