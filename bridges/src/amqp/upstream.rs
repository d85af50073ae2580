//! The AMQP upstream's handle and its connection task (see the module docs of `amqp`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, Event,
    ExchangeKind,
};
use rustls::ClientConfig;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::bindings::{BindingTable, Change};
use super::config::{AmqpConfigError, AmqpUpstreamConfig, DownlinkQueue, MAX_ROUTING_KEY_BYTES};
use super::{
    Confirm, HEADER_CLIENT, HEADER_PROTOCOL, HEADER_QOS, HEADER_RETAIN, HEADER_TOPIC, binding_key,
    routing_key, topic_of,
};
use crate::message::{Downlink, DownlinkAck, Message, Qos};
use crate::mqtt::backoff::Backoff;
use crate::mqtt::config::tls_fingerprint;
use crate::spool::wall_ms;
use crate::telemetry::{LinkInfo, io_error_summary};
use crate::upstream::{AckReport, Delivery, FailReason, Presence, RELINK_DRAIN, Reconfigured};

/// How often the task looks at the connection's and channel's state (a closed channel raises
/// no connection event).
const STATE_CHECK: Duration = Duration::from_millis(250);
/// Untracked (QoS 0) publishes awaiting their confirm at once, beyond the tracked window;
/// when reached, the task reads no more requests until confirms arrive (backpressure).
const MAX_UNTRACKED_PENDING: usize = 1024;
/// AMQP reply code of a normal close.
const REPLY_SUCCESS: u16 = 200;

/// Counters of one AMQP upstream.
#[derive(Debug, Default)]
pub struct AmqpStats {
    /// Messages sent with `basic.publish` (tracked or not).
    pub published: AtomicU64,
    /// Messages the broker returned as unroutable (reported `Failed(Rejected)` when tracked).
    pub returned: AtomicU64,
    /// Messages the broker nacked (reported `Failed(BrokerBusy)`, sent again by the spool).
    pub nacked: AtomicU64,
    /// Messages the broker acknowledged.
    pub acknowledged: AtomicU64,
    /// Downlink deliveries handed to the gateway.
    pub downlink_delivered: AtomicU64,
    /// Downlink deliveries acknowledged to the broker after the gateway took them.
    pub downlink_acked: AtomicU64,
    /// Downlink deliveries acknowledged and dropped here: over `max_downlink_bytes`, or a
    /// routing key that maps to no valid topic name.
    pub downlink_dropped: AtomicU64,
    /// Downlink deliveries that were this upstream's own publishes coming back through a
    /// binding (acknowledged and dropped: the gateway delivered them locally already).
    pub downlink_echoes_dropped: AtomicU64,
}

/// One queued publish.
struct Request {
    message: Message,
    token: Option<u64>,
    seq: Option<u64>,
}

/// State shared by the handles and the task.
struct Shared {
    /// Configured name, for logs.
    name: String,
    /// The index reports carry.
    index: usize,
    /// Into the connection task; bounded by `request_queue`.
    requests: mpsc::Sender<Request>,
    /// Whether the connection and its confirm channel are up.
    link: watch::Receiver<bool>,
    /// Tracked publishes accepted and not yet reported.
    inflight: AtomicUsize,
    /// Bound of `inflight`.
    max_inflight: usize,
    /// Asks the task to drop the live connection.
    reset: Notify,
    /// Refuses publishes once cancelled.
    stop: CancellationToken,
    /// Counters.
    stats: AmqpStats,
    /// The binding keys the subscriptions want (short-held lock, never across an await).
    bindings: Mutex<BindingTable>,
    /// Tells the task the binding table changed.
    bindings_changed: Notify,
    /// The link's transitions for the admin listener; written by the task only.
    link_info: Arc<LinkInfo>,
    /// Sent as `app_id` on every publish and unique per process and upstream, so this
    /// upstream's own messages coming back on the downlink queue are recognised.
    app_id: String,
    /// The configuration in force and its TLS files' fingerprint (what
    /// [`AmqpUpstream::reconfigure`] compares with).
    config: Mutex<(AmqpUpstreamConfig, u64)>,
    /// A new configuration for the task; `retune` wakes it.
    pending: Mutex<Option<Retune>>,
    retune: Notify,
}

/// A validated new configuration for the task.
struct Retune {
    config: AmqpUpstreamConfig,
    uri: AMQPUri,
    tls: Option<Arc<ClientConfig>>,
    /// A connection setting changed: close the connection and open it again.
    reconnect: bool,
}

impl Shared {
    fn bindings(&self) -> MutexGuard<'_, BindingTable> {
        // Every edit of the table is complete at each step; a panic elsewhere leaves it valid.
        self.bindings.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a downlink acknowledgement asks of the task: `basic.ack` of `tag` if the connection
/// `generation` is still the current one. Carries its slot, so the ack channel (capacity
/// `max_unacked_downlinks`) never holds more than the slots, and `try_send` never finds it
/// full.
struct AckMsg {
    generation: u64,
    tag: u64,
    _slot: OwnedSemaphorePermit,
}

/// Handle to one AMQP upstream: cheap to clone; the task runs until the stop token fires.
#[derive(Clone)]
pub struct AmqpUpstream {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AmqpUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpUpstream")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl AmqpUpstream {
    /// Validates `config` and starts the connection task; reports for tracked publishes go
    /// to `acks` with `upstream: index`.
    ///
    /// # Errors
    /// [`AmqpConfigError`] when a setting is bad; nothing was started.
    pub fn spawn(
        index: usize,
        config: AmqpUpstreamConfig,
        acks: mpsc::Sender<AckReport>,
        stop: CancellationToken,
    ) -> Result<(Self, JoinHandle<()>), AmqpConfigError> {
        Self::spawn_with_downlink(index, config, acks, None, stop)
    }

    /// [`Self::spawn`], and with `downlink` also consumes from the configured queue: each
    /// delivery goes to `downlink` as a [`Downlink`] (`upstream: index`) whose ack does
    /// `basic.ack`. Without it nothing is consumed and no binding is made.
    ///
    /// # Errors
    /// [`AmqpConfigError`] when a setting is bad or a TLS file unusable; nothing was started.
    pub fn spawn_with_downlink(
        index: usize,
        config: AmqpUpstreamConfig,
        acks: mpsc::Sender<AckReport>,
        downlink: Option<mpsc::Sender<Downlink>>,
        stop: CancellationToken,
    ) -> Result<(Self, JoinHandle<()>), AmqpConfigError> {
        let uri = config.validate()?;
        let tls = config.tls_config(&uri)?;
        let (requests, rx) = mpsc::channel(config.request_queue);
        let unacked = usize::from(config.max_unacked_downlinks);
        let (ack_tx, ack_rx) = mpsc::channel(unacked);
        let (link_tx, link) = watch::channel(false);
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            index,
            requests,
            link,
            inflight: AtomicUsize::new(0),
            max_inflight: usize::from(config.max_inflight),
            reset: Notify::new(),
            stop: stop.clone(),
            stats: AmqpStats::default(),
            bindings: Mutex::new(BindingTable::new(
                config.max_subscriptions,
                config.bindings.iter().cloned(),
            )),
            bindings_changed: Notify::new(),
            link_info: Arc::default(),
            app_id: format!("sensorgate-{:016x}", {
                use rand::{Rng, SeedableRng};
                rand::rngs::SmallRng::from_os_rng().random::<u64>()
            }),
            config: Mutex::new((config.clone(), tls_fingerprint(Some(&config.tls)))),
            pending: Mutex::new(None),
            retune: Notify::new(),
        });
        let task = Task {
            shared: Arc::clone(&shared),
            config,
            uri,
            tls,
            rx,
            acks,
            link_tx,
            stop,
            downlink,
            ack_tx,
            ack_rx,
            slots: Arc::new(Semaphore::new(unacked)),
            generation: 0,
        };
        let handle = tokio::spawn(task.run());
        Ok((Self { shared }, handle))
    }

    /// Changes the settings of the running upstream to `config` (for a config reload).
    ///
    /// `config` is checked first like [`Self::spawn`] checks it (values, URL, TLS files): on
    /// any error nothing changes and the link is untouched. Then:
    ///
    /// - nothing changed: [`Reconfigured::Unchanged`];
    /// - only `backoff_initial`, `backoff_max`, `max_downlink_bytes` or `max_subscriptions`
    ///   changed: applied in place (a lower `max_subscriptions` unbinds nothing: it refuses
    ///   new keys until below), [`Reconfigured::Applied`];
    /// - a connection setting changed (`url`, `username`, `password`, `vhost`, `exchange`,
    ///   `heartbeat`, `connect_timeout`, `downlink_queue`, the TLS files or their contents):
    ///   [`Reconfigured::Reconnecting`]. The task stops sending, lets the broker confirm
    ///   what is in flight for up to [`RELINK_DRAIN`](crate::upstream::RELINK_DRAIN), fails the rest (`Disconnected`: the
    ///   drain sends it again from its cursor; nothing confirmed is lost, duplicates are
    ///   possible), closes the connection (connection.close) and connects with the new
    ///   settings at once; the downlink queue and every binding are made again, as after any
    ///   reconnect. The link watch and [`LinkInfo`] show the link going down and up.
    ///
    /// Returns at once; the reconnect happens on the task.
    ///
    /// # Errors
    /// As [`Self::spawn`], and [`AmqpConfigError::RestartRequired`] when a setting fixed
    /// for the upstream's life changed (`name`, `max_inflight`, `request_queue`,
    /// `max_unacked_downlinks`, `bindings`).
    pub fn reconfigure(&self, config: AmqpUpstreamConfig) -> Result<Reconfigured, AmqpConfigError> {
        let uri = config.validate()?;
        let tls = config.tls_config(&uri)?;
        let tls_files = tls_fingerprint(Some(&config.tls));
        let mut current = self
            .shared
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (old, old_tls_files) = &*current;
        if let Some(field) = restart_only_change(old, &config) {
            return Err(AmqpConfigError::RestartRequired(field));
        }
        let reconnect = connection_changed(old, &config) || tls_files != *old_tls_files;
        let in_place = old.backoff_initial != config.backoff_initial
            || old.backoff_max != config.backoff_max
            || old.max_downlink_bytes != config.max_downlink_bytes
            || old.max_subscriptions != config.max_subscriptions;
        if !reconnect && !in_place {
            return Ok(Reconfigured::Unchanged);
        }
        self.shared
            .bindings()
            .set_capacity(config.max_subscriptions);
        *current = (config.clone(), tls_files);
        drop(current);
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // One the task has not taken yet is replaced, keeping its need to reconnect.
        let reconnect = reconnect || pending.as_ref().is_some_and(|p| p.reconnect);
        *pending = Some(Retune {
            config,
            uri,
            tls,
            reconnect,
        });
        drop(pending);
        self.shared.retune.notify_one();
        Ok(if reconnect {
            Reconfigured::Reconnecting
        } else {
            Reconfigured::Applied
        })
    }

    /// The configured name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> &AmqpStats {
        &self.shared.stats
    }

    /// See [`Upstream::publish_with_seq`](crate::upstream::Upstream::publish_with_seq).
    ///
    /// # Errors
    /// Refused now: `Shutdown`, `Disconnected`, `QueueFull`, or `Rejected` (a topic too long
    /// for a routing key).
    pub fn publish_with_seq(
        &self,
        message: Message,
        token: Option<u64>,
        seq: Option<u64>,
    ) -> Result<(), FailReason> {
        let s = &self.shared;
        if s.stop.is_cancelled() {
            return Err(FailReason::Shutdown);
        }
        if !*s.link.borrow() {
            return Err(FailReason::Disconnected);
        }
        if message.topic.len() > MAX_ROUTING_KEY_BYTES {
            return Err(FailReason::Rejected);
        }
        if token.is_some() && s.inflight.fetch_add(1, Ordering::AcqRel) >= s.max_inflight {
            s.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(FailReason::QueueFull);
        }
        let tracked = token.is_some();
        match s.requests.try_send(Request {
            message,
            token,
            seq,
        }) {
            Ok(()) => Ok(()),
            Err(e) => {
                if tracked {
                    s.inflight.fetch_sub(1, Ordering::AcqRel);
                }
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => FailReason::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => FailReason::Shutdown,
                })
            }
        }
    }

    /// Whether the link is up.
    #[must_use]
    pub fn watch_link(&self) -> watch::Receiver<bool> {
        self.shared.link.clone()
    }

    /// The link's state, transitions and last error, for the admin listener.
    #[must_use]
    pub fn link_info(&self) -> Arc<LinkInfo> {
        Arc::clone(&self.shared.link_info)
    }

    /// Drops the live connection (failing what is in flight); nothing while it is down.
    pub fn reset_link(&self) {
        if *self.shared.link.borrow() {
            self.shared.reset.notify_one();
        }
    }

    /// Binds the downlink queue with the binding key of `filter` ([`binding_key`]), now and
    /// after every reconnect. The QoS is not used: every delivery is acknowledged manually.
    ///
    /// # Errors
    /// `Rejected` (a filter with no faithful binding key), `QueueFull` (`max_subscriptions`
    /// keys wanted), `Shutdown`.
    pub fn subscribe(&self, filter: &str, _qos: Qos) -> Result<(), FailReason> {
        if self.shared.stop.is_cancelled() {
            return Err(FailReason::Shutdown);
        }
        let key = binding_key(filter)?;
        let changed = self
            .shared
            .bindings()
            .set(&key)
            .map_err(|_| FailReason::QueueFull)?;
        if changed {
            self.shared.bindings_changed.notify_one();
        }
        Ok(())
    }

    /// Removes the binding of `filter` (the router calls it when the last subscriber left); a
    /// configured binding with the same key stays.
    ///
    /// # Errors
    /// `Shutdown` after the stop token fired.
    pub fn unsubscribe(&self, filter: &str) -> Result<(), FailReason> {
        if self.shared.stop.is_cancelled() {
            return Err(FailReason::Shutdown);
        }
        // A filter with no key was never subscribed.
        if let Ok(key) = binding_key(filter)
            && self.shared.bindings().remove(&key)
        {
            self.shared.bindings_changed.notify_one();
        }
        Ok(())
    }
}

impl crate::upstream::Subscriber for AmqpUpstream {
    fn name(&self) -> &str {
        Self::name(self)
    }

    fn subscribe(&self, filter: &str, qos: Qos) -> Result<(), FailReason> {
        Self::subscribe(self, filter, qos)
    }

    fn unsubscribe(&self, filter: &str) -> Result<(), FailReason> {
        Self::unsubscribe(self, filter)
    }
}

impl crate::upstream::Upstream for AmqpUpstream {
    fn name(&self) -> &str {
        Self::name(self)
    }

    fn publish_with_seq(
        &self,
        message: Message,
        token: Option<u64>,
        seq: Option<u64>,
    ) -> Result<(), FailReason> {
        Self::publish_with_seq(self, message, token, seq)
    }

    fn watch_link(&self) -> watch::Receiver<bool> {
        Self::watch_link(self)
    }

    fn link_info(&self) -> Arc<LinkInfo> {
        Self::link_info(self)
    }

    fn reset_link(&self) {
        Self::reset_link(self);
    }
}

/// A confirm being awaited: the token (untracked: `None`) and the outcome.
type Pending = BoxFuture<'static, (Option<u64>, Confirm)>;

/// How a connection ended.
enum End {
    /// The stop token fired (or every handle is gone).
    Stop,
    /// The drain asked for a reset.
    Reset,
    /// The broker or the network dropped it.
    Lost(String),
    /// A reconfigure changed a connection setting.
    Reconfigure,
}

/// The connection task.
struct Task {
    shared: Arc<Shared>,
    config: AmqpUpstreamConfig,
    uri: AMQPUri,
    /// `amqps://`: the rustls configuration (ring).
    tls: Option<Arc<ClientConfig>>,
    rx: mpsc::Receiver<Request>,
    acks: mpsc::Sender<AckReport>,
    link_tx: watch::Sender<bool>,
    stop: CancellationToken,
    /// Where deliveries go; `None`: no downlink (or the receiver is gone).
    downlink: Option<mpsc::Sender<Downlink>>,
    /// Acknowledgement handles queue their `basic.ack` here (see [`AckMsg`]).
    ack_tx: mpsc::Sender<AckMsg>,
    ack_rx: mpsc::Receiver<AckMsg>,
    /// `max_unacked_downlinks` slots: each delivery handed out holds one until its handle is
    /// acknowledged (and the task has read that) or dropped.
    slots: Arc<Semaphore>,
    /// The current connection, counted from 1; an acknowledgement of another is a no-op.
    generation: u64,
}

/// The consuming side of one connection.
struct DownlinkLink {
    /// Not in confirm mode; deliveries and their `basic.ack`s belong to it.
    channel: Channel,
    /// The queue's name (server-made for [`DownlinkQueue::ServerNamed`]).
    queue: String,
    consumer: Consumer,
}

/// One live connection.
struct Link {
    conn: Connection,
    channel: Channel,
    downlink: Option<DownlinkLink>,
}

impl Task {
    async fn run(mut self) {
        let name = self.shared.name.clone();
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        // Logged once per transition: a broker down for an hour is one warning.
        let mut failing = false;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            backoff.set_bounds(self.config.backoff_initial, self.config.backoff_max);
            let attempt = tokio::select! {
                () = self.stop.cancelled() => break,
                r = tokio::time::timeout(
                    self.config.connect_timeout,
                    connect(&self.uri, self.tls.clone(), &self.config, self.downlink.is_some()),
                ) => r,
            };
            match attempt {
                Ok(Ok(link)) => {
                    failing = false;
                    self.generation += 1;
                    let fresh = matches!(self.config.downlink_queue, DownlinkQueue::ServerNamed);
                    self.shared.bindings().reset_link(fresh);
                    self.shared.bindings_changed.notify_one();
                    tracing::info!(upstream = %name, url = %self.config.redacted_url(), "AMQP upstream connected.");
                    // A reset asked for while the link was going down must not cut this new
                    // connection: drop its stored permit.
                    let _ = self.shared.reset.notified().now_or_never();
                    // Birth first: sent on the channel before the link is marked up, so
                    // before any drained record.
                    self.announce(&link.channel, |p| &p.birth, true).await;
                    self.link_tx.send_replace(true);
                    self.shared.link_info.up(wall_ms());
                    let Link {
                        conn,
                        channel,
                        mut downlink,
                    } = link;
                    let (end, confirmed) = self.serve(&conn, &channel, downlink.as_mut()).await;
                    // A connection that dies before any confirm (a broker that closes the
                    // channel on every publish) keeps backing off instead of spinning.
                    if confirmed {
                        backoff.reset();
                    }
                    self.link_tx.send_replace(false);
                    // Accepted before the link went down, never sent.
                    let reason = if matches!(end, End::Stop) {
                        FailReason::Shutdown
                    } else {
                        FailReason::Disconnected
                    };
                    self.fail_queued(reason).await;
                    if matches!(end, End::Stop) {
                        // Death before the connection closes, confirmed (bounded).
                        self.announce(&channel, |p| &p.death, true).await;
                    }
                    let _ = tokio::time::timeout(
                        self.config.connect_timeout,
                        conn.close(REPLY_SUCCESS, "sensorgate".into()),
                    )
                    .await;
                    let why = match &end {
                        End::Stop => "upstream stopped".to_owned(),
                        End::Reset => "link reset: acknowledgements overdue".to_owned(),
                        End::Lost(error) => error.clone(),
                        End::Reconfigure => "reconfigured: reconnecting".to_owned(),
                    };
                    self.shared.link_info.down(wall_ms(), why);
                    match end {
                        End::Stop => break,
                        End::Reconfigure => {
                            tracing::info!(upstream = %name, url = %self.config.redacted_url(), "AMQP upstream reconfigured; reconnecting with the new settings.");
                            backoff =
                                Backoff::new(self.config.backoff_initial, self.config.backoff_max);
                            continue;
                        }
                        End::Reset => tracing::warn!(
                            upstream = %name,
                            "AMQP upstream link reset (acknowledgements overdue); reconnecting."
                        ),
                        End::Lost(error) => tracing::warn!(
                            upstream = %name,
                            %error,
                            "AMQP upstream link lost; reconnecting."
                        ),
                    }
                }
                Ok(Err(error)) => {
                    self.shared.link_info.down(wall_ms(), error_summary(&error));
                    if !failing {
                        tracing::warn!(upstream = %name, %error, "AMQP upstream cannot connect; retrying with backoff.");
                    } else {
                        tracing::debug!(upstream = %name, %error, "AMQP connect attempt failed.");
                    }
                    failing = true;
                }
                Err(_) => {
                    self.shared.link_info.down(wall_ms(), "connect timed out");
                    if !failing {
                        tracing::warn!(upstream = %name, "AMQP upstream connect timed out; retrying with backoff.");
                    }
                    failing = true;
                }
            }
            let delay = backoff.next_delay();
            let stop = self.stop.clone();
            let shared = Arc::clone(&self.shared);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
                // Requests queued while down were accepted before the drop: fail them now.
                () = self.fail_queued_forever() => {}
                // New settings are tried at once.
                () = shared.retune.notified() => {
                    self.take_retune();
                    backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
                }
            }
        }
        self.link_tx.send_replace(false);
        self.rx.close();
        self.fail_queued(FailReason::Shutdown).await;
        tracing::info!(upstream = %name, "AMQP upstream stopped.");
    }

    /// Serves one connection until it ends; also tells whether the broker confirmed anything.
    async fn serve(
        &mut self,
        conn: &Connection,
        channel: &Channel,
        mut downlink: Option<&mut DownlinkLink>,
    ) -> (End, bool) {
        let mut confirmed = false;
        let end = self
            .serve_until_end(conn, channel, &mut downlink, &mut confirmed)
            .await;
        (end, confirmed)
    }

    async fn serve_until_end(
        &mut self,
        conn: &Connection,
        channel: &Channel,
        downlink: &mut Option<&mut DownlinkLink>,
        confirmed: &mut bool,
    ) -> End {
        // The slot the next delivery takes; acquired before reading one (backpressure).
        let mut slot: Option<OwnedSemaphorePermit> = None;
        let binds = downlink.is_some()
            && !self.config.exchange.is_empty()
            && !matches!(self.config.downlink_queue, DownlinkQueue::Passive(_));
        let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
        // Tracked tokens sent and not yet reported: what a dropped link must fail.
        let mut open = BTreeSet::new();
        let mut events = conn.events_listener();
        let mut check = tokio::time::interval(STATE_CHECK);
        let end = loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => {
                    // Let the broker confirm what is in flight, for a bounded time.
                    let _ = tokio::time::timeout(self.config.connect_timeout, async {
                        while let Some((token, confirm)) = pending.next().await {
                            if token.is_some_and(|t| open.remove(&t)) || token.is_none() {
                                self.settle(token, confirm).await;
                            }
                        }
                    })
                    .await;
                    self.fail_open(&mut open, FailReason::Shutdown).await;
                    return End::Stop;
                }
                () = self.shared.reset.notified() => break End::Reset,
                () = self.shared.retune.notified() => {
                    if self.take_retune() {
                        // The drain stops sending; the broker confirms what is in flight, for
                        // a bounded time.
                        self.link_tx.send_replace(false);
                        let drain = RELINK_DRAIN.min(self.config.connect_timeout);
                        let _ = tokio::time::timeout(drain, async {
                            while let Some((token, confirm)) = pending.next().await {
                                if let Some(t) = token {
                                    open.remove(&t);
                                }
                                self.settle(token, confirm).await;
                            }
                        })
                        .await;
                        break End::Reconfigure;
                    }
                }
                Some((token, confirm)) = pending.next(), if !pending.is_empty() => {
                    if let Some(t) = token {
                        open.remove(&t);
                    }
                    *confirmed |= confirm == Confirm::Ack;
                    if confirm == Confirm::Lost {
                        self.settle(token, confirm).await;
                        break End::Lost("channel closed before the confirm".into());
                    }
                    self.settle(token, confirm).await;
                }
                event = events.next() => match event {
                    Some(Event::Error(error)) => break End::Lost(error_summary(&error)),
                    Some(_) => {}
                    None => break End::Lost("connection events ended".into()),
                },
                _ = check.tick() => {
                    let downlink_down = downlink
                        .as_ref()
                        .is_some_and(|d| !d.channel.status().connected());
                    if !conn.status().connected() || !channel.status().connected() || downlink_down {
                        break End::Lost("connection or channel closed".into());
                    }
                }
                Some(msg) = self.ack_rx.recv() => {
                    if let Err(end) = self.ack(downlink.as_deref(), msg).await {
                        break end;
                    }
                }
                () = self.shared.bindings_changed.notified(), if binds => {
                    if let Some(d) = downlink.as_deref()
                        && let Err(end) = self.apply_bindings(d).await {
                            break end;
                        }
                }
                permit = Arc::clone(&self.slots).acquire_owned(),
                    if slot.is_none() && downlink.is_some() && self.downlink.is_some() =>
                {
                    // The semaphore is never closed.
                    slot = permit.ok();
                }
                delivery = next_delivery(downlink.as_deref_mut()),
                    if slot.is_some() && self.downlink.is_some() =>
                {
                    match delivery {
                        Some(Ok(delivery)) => {
                            if let (Some(d), Some(s)) = (downlink.as_deref(), slot.take())
                                && let Err(end) = self.deliver(d, delivery, s).await {
                                    break end;
                                }
                        }
                        Some(Err(error)) => break End::Lost(error.to_string()),
                        None => break End::Lost("the broker cancelled the downlink consumer".into()),
                    }
                }
                // Bounded: tracked sends are at most `max_inflight` (the handle refuses more);
                // untracked (QoS 0) confirms awaited at once are capped too.
                request = self.rx.recv(), if pending.len() < self.pending_cap() => {
                    let Some(request) = request else { return End::Stop };
                    let token = request.token;
                    match publish(channel, &self.config.exchange, &self.shared.app_id, request).await {
                        Ok(confirm) => {
                            self.shared.stats.published.fetch_add(1, Ordering::Relaxed);
                            if let Some(t) = token {
                                open.insert(t);
                            }
                            pending.push(Box::pin(async move {
                                (token, classify(confirm.await))
                            }));
                        }
                        Err(error) => {
                            self.settle(token, Confirm::Lost).await;
                            break End::Lost(error.to_string());
                        }
                    }
                }
            }
        };
        // Confirms still awaited on the dropped link are failed; their futures go with it.
        drop(pending);
        self.fail_open(&mut open, FailReason::Disconnected).await;
        end
    }

    /// Publishes the presence message `which` picks (birth, death) on `channel`, untracked;
    /// with `confirmed` (always, today: a birth confirmed before the link is marked up
    /// precedes every record), waits (up to `connect_timeout`) for the broker's confirm. Failures
    /// are logged: the connection's own error handling sees a broken channel anyway.
    async fn announce(&self, channel: &Channel, which: fn(&Presence) -> &Message, confirmed: bool) {
        let Some(presence) = &self.config.presence else {
            return;
        };
        let message = which(presence).clone();
        let topic = message.topic.clone();
        let request = Request {
            message,
            token: None,
            seq: None,
        };
        let sent = tokio::time::timeout(self.config.connect_timeout, async {
            let confirm = publish(channel, &self.config.exchange, &self.shared.app_id, request)
                .await
                .map_err(|e| e.to_string())?;
            if confirmed {
                match classify(confirm.await) {
                    Confirm::Ack | Confirm::Returned => {}
                    other => return Err(format!("not confirmed ({other:?})")),
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()));
        match sent {
            Ok(()) => tracing::debug!(upstream = %self.shared.name, %topic, "Presence published."),
            Err(error) => {
                tracing::warn!(upstream = %self.shared.name, %topic, %error, "Presence message not sent.");
            }
        }
    }

    /// Takes a pending reconfigure into the task's settings; returns whether it needs a new
    /// connection.
    fn take_retune(&mut self) -> bool {
        let taken = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Retune {
            config,
            uri,
            tls,
            reconnect,
        }) = taken
        else {
            return false;
        };
        self.config = config;
        self.uri = uri;
        self.tls = tls;
        if !reconnect {
            tracing::info!(upstream = %self.shared.name, "AMQP upstream settings changed in place.");
        }
        reconnect
    }

    /// Makes the binding table's changes on the broker, one at a time (each a short RPC,
    /// bounded by `connect_timeout`); a failure ends the connection (retried with backoff).
    async fn apply_bindings(&self, d: &DownlinkLink) -> Result<(), End> {
        loop {
            let Some(change) = self.shared.bindings().next_change() else {
                return Ok(());
            };
            let queue = ShortString::from(d.queue.clone());
            let exchange = ShortString::from(self.config.exchange.clone());
            let rpc = async {
                match &change {
                    Change::Bind(key) => {
                        d.channel
                            .queue_bind(
                                queue,
                                exchange,
                                ShortString::from(key.clone()),
                                QueueBindOptions::default(),
                                FieldTable::default(),
                            )
                            .await
                    }
                    Change::Unbind(key) => {
                        d.channel
                            .queue_unbind(
                                queue,
                                exchange,
                                ShortString::from(key.clone()),
                                FieldTable::default(),
                            )
                            .await
                    }
                }
            };
            match tokio::time::timeout(self.config.connect_timeout, rpc).await {
                Ok(Ok(())) => {
                    tracing::debug!(upstream = %self.shared.name, ?change, "AMQP binding changed.");
                    self.shared.bindings().done(&change);
                }
                Ok(Err(error)) => {
                    return Err(End::Lost(format!(
                        "binding change {change:?} failed: {error}"
                    )));
                }
                Err(_) => return Err(End::Lost(format!("binding change {change:?} timed out"))),
            }
        }
    }

    /// One delivery: dropped here (acknowledged and counted) or handed to the gateway with a
    /// handle that acknowledges it on this connection.
    async fn deliver(
        &mut self,
        d: &DownlinkLink,
        delivery: lapin::message::Delivery,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), End> {
        let stats = &self.shared.stats;
        let tag = delivery.delivery_tag;
        let echo = delivery
            .properties
            .app_id()
            .as_ref()
            .is_some_and(|id| id.as_str() == self.shared.app_id);
        let topic = topic_of(delivery.routing_key.as_str());
        let dropped = if echo {
            stats
                .downlink_echoes_dropped
                .fetch_add(1, Ordering::Relaxed);
            Some("echo")
        } else if delivery.data.len() > self.config.max_downlink_bytes {
            stats.downlink_dropped.fetch_add(1, Ordering::Relaxed);
            Some("too_big")
        } else if topic.is_none() {
            stats.downlink_dropped.fetch_add(1, Ordering::Relaxed);
            Some("invalid_topic")
        } else {
            None
        };
        let (Some(topic), None) = (topic, dropped) else {
            // Peers trigger these: debug only; the counters tell.
            tracing::debug!(
                upstream = %self.shared.name,
                routing_key = %delivery.routing_key,
                bytes = delivery.data.len(),
                reason = dropped.unwrap_or("invalid_topic"),
                "AMQP downlink message dropped (acknowledged)."
            );
            return d
                .channel
                .basic_ack(tag, BasicAckOptions::default())
                .await
                .map_err(|e| End::Lost(e.to_string()));
        };
        let ack_tx = self.ack_tx.clone();
        let generation = self.generation;
        let ack = DownlinkAck::from_fn(move || {
            // Never full (each queued message holds one of the slots the capacity counts);
            // closed only once the upstream stopped: the documented no-op.
            let _ = ack_tx.try_send(AckMsg {
                generation,
                tag,
                _slot: slot,
            });
        });
        let message = Downlink {
            upstream: self.shared.index,
            topic,
            payload: bytes::Bytes::from(delivery.data),
            qos: Qos::AtLeastOnce,
            retain: false,
            filters: None,
            ack,
        };
        let Some(tx) = &self.downlink else {
            return Ok(());
        };
        tokio::select! {
            biased;
            () = self.stop.cancelled() => return Err(End::Stop),
            sent = tx.send(message) => {
                if sent.is_err() {
                    // The gateway stopped taking downlink: read no more; what is unacknowledged
                    // is redelivered by the broker to the next consumer.
                    self.downlink = None;
                } else {
                    stats.downlink_delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// `basic.ack` for a handle acknowledged by the gateway, if its connection is this one.
    async fn ack(&self, d: Option<&DownlinkLink>, msg: AckMsg) -> Result<(), End> {
        let Some(d) = d.filter(|_| msg.generation == self.generation) else {
            // The delivery tag belongs to a connection that ended: the broker has requeued
            // the message already and redelivers it.
            tracing::debug!(upstream = %self.shared.name, "AMQP downlink ack after a reconnect ignored.");
            return Ok(());
        };
        d.channel
            .basic_ack(msg.tag, BasicAckOptions::default())
            .await
            .map_err(|e| End::Lost(e.to_string()))?;
        self.shared
            .stats
            .downlink_acked
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Confirms awaited at once, at most: the tracked window plus [`MAX_UNTRACKED_PENDING`].
    fn pending_cap(&self) -> usize {
        usize::from(self.config.max_inflight) + MAX_UNTRACKED_PENDING
    }

    /// Reports one confirmation (untracked: counts only).
    async fn settle(&self, token: Option<u64>, confirm: Confirm) {
        let stats = &self.shared.stats;
        match confirm {
            Confirm::Ack => {
                stats.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Confirm::Returned => {
                stats.returned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    upstream = %self.shared.name,
                    "AMQP broker returned a message as unroutable (no queue bound); it counts as refused."
                );
            }
            Confirm::Nack => {
                stats.nacked.fetch_add(1, Ordering::Relaxed);
            }
            Confirm::Lost => {}
        }
        if let Some(token) = token {
            self.report(token, confirm.delivery()).await;
        }
    }

    async fn report(&self, token: u64, delivery: Delivery) {
        self.shared.inflight.fetch_sub(1, Ordering::AcqRel);
        let _ = self
            .acks
            .send(AckReport {
                token,
                upstream: self.shared.index,
                delivery,
            })
            .await;
    }

    /// Fails every tracked send still awaiting its confirm.
    async fn fail_open(&self, open: &mut BTreeSet<u64>, reason: FailReason) {
        for token in std::mem::take(open) {
            self.report(token, Delivery::Failed(reason)).await;
        }
    }

    /// Fails every queued request without waiting.
    async fn fail_queued(&mut self, reason: FailReason) {
        while let Ok(request) = self.rx.try_recv() {
            if let Some(token) = request.token {
                self.report(token, Delivery::Failed(reason)).await;
            }
        }
    }

    /// While the link is down: fails each request as it arrives (accepted just before the
    /// drop). Never returns on its own.
    async fn fail_queued_forever(&mut self) {
        loop {
            match self.rx.recv().await {
                Some(request) => {
                    if let Some(token) = request.token {
                        self.report(token, Delivery::Failed(FailReason::Disconnected))
                            .await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
    }
}

/// The next delivery of the consumer (pending forever without one).
async fn next_delivery(
    d: Option<&mut DownlinkLink>,
) -> Option<lapin::Result<lapin::message::Delivery>> {
    match d {
        Some(d) => d.consumer.next().await,
        None => std::future::pending().await,
    }
}

/// Opens the connection: plain TCP, or TLS with the given rustls configuration (the ring
/// provider, `ca_file` / client certificate; see `config`).
async fn open(
    uri: &AMQPUri,
    tls: Option<Arc<ClientConfig>>,
    props: ConnectionProperties,
) -> lapin::Result<Connection> {
    let Some(tls) = tls else {
        return Connection::connect_uri(uri.clone(), props).await;
    };
    let runtime = lapin::runtime::default_runtime()?;
    let connector = lapin::tcp::RustlsConnector::from(tls);
    Connection::connector(
        uri.clone(),
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = uri.authority.host.clone();
            let addrs = runtime.to_socket_addrs((host.clone(), uri.authority.port));
            let stream = lapin::AsyncTcpStream::connect(&runtime, addrs).await?;
            Ok(stream.into_rustls(&connector, &host).await?)
        },
        props,
    )
    .await
}

/// Opens the connection and a confirm-mode channel, and checks that the exchange exists (a
/// missing one is a connect failure, retried with backoff and logged once, instead of a
/// channel closed by every publish). With `downlink`, also opens the consuming channel:
/// prefetch, the queue (declared, or checked with a passive declare), the configured
/// bindings, and the consumer (manual acknowledgement).
async fn connect(
    uri: &AMQPUri,
    tls: Option<Arc<ClientConfig>>,
    config: &AmqpUpstreamConfig,
    downlink: bool,
) -> lapin::Result<Link> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(config.connection_name()));
    let conn = open(uri, tls, props).await?;
    let channel = conn.create_channel().await?;
    let exchange = &config.exchange;
    // The default exchange ("") always exists and cannot be declared.
    if !exchange.is_empty() {
        channel
            .exchange_declare(
                ShortString::from(exchange.clone()),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let downlink = if downlink {
        Some(open_downlink(&conn, config).await?)
    } else {
        None
    };
    Ok(Link {
        conn,
        channel,
        downlink,
    })
}

async fn open_downlink(
    conn: &Connection,
    config: &AmqpUpstreamConfig,
) -> lapin::Result<DownlinkLink> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(config.max_unacked_downlinks, BasicQosOptions::default())
        .await?;
    let (name, options) = match &config.downlink_queue {
        DownlinkQueue::ServerNamed => (
            String::new(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        ),
        DownlinkQueue::Durable(name) => (
            name.clone(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
        ),
        DownlinkQueue::Passive(name) => (
            name.clone(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
        ),
    };
    let queue = channel
        .queue_declare(ShortString::from(name), options, FieldTable::default())
        .await?;
    let queue = queue.name().as_str().to_owned();
    if !matches!(config.downlink_queue, DownlinkQueue::Passive(_)) && !config.exchange.is_empty() {
        for key in &config.bindings {
            channel
                .queue_bind(
                    ShortString::from(queue.clone()),
                    ShortString::from(config.exchange.clone()),
                    ShortString::from(key.clone()),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    let consumer = channel
        .basic_consume(
            ShortString::from(queue.clone()),
            ShortString::from(String::new()),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(DownlinkLink {
        channel,
        queue,
        consumer,
    })
}

/// Sends one message: persistent, message id = the spool sequence id. Mandatory when it is
/// a spooled record (a sequence id or a token): one no queue takes is returned, counted and
/// warned about. The gateway's own untracked messages without a sequence id (the fleet's
/// presence, heartbeats and events) are not: like an MQTT publish nobody subscribed to, the
/// broker drops them quietly when no queue is bound for them.
async fn publish(
    channel: &Channel,
    exchange: &str,
    app_id: &str,
    request: Request,
) -> lapin::Result<lapin::PublisherConfirm> {
    let Request {
        message,
        seq,
        token,
    } = request;
    let mandatory = seq.is_some() || token.is_some();
    let qos: u8 = match message.qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    };
    let mut headers = FieldTable::default();
    headers.insert(
        HEADER_TOPIC.into(),
        AMQPValue::LongString(LongString::from(message.topic.clone())),
    );
    headers.insert(HEADER_QOS.into(), AMQPValue::ShortShortUInt(qos));
    headers.insert(HEADER_RETAIN.into(), AMQPValue::Boolean(message.retain));
    headers.insert(
        HEADER_PROTOCOL.into(),
        AMQPValue::LongString(LongString::from(message.origin.protocol.as_str())),
    );
    if let Some(client) = &message.origin.client_id {
        headers.insert(
            HEADER_CLIENT.into(),
            AMQPValue::LongString(LongString::from(client.to_string())),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_app_id(ShortString::from(app_id.to_owned()))
        .with_headers(headers);
    if let Some(seq) = seq {
        properties = properties.with_message_id(ShortString::from(seq.to_string()));
    }
    channel
        .basic_publish(
            ShortString::from(exchange.to_owned()),
            ShortString::from(routing_key(&message.topic)),
            BasicPublishOptions {
                mandatory,
                immediate: false,
            },
            &message.payload,
            properties,
        )
        .await
}

/// The first setting fixed for the upstream's life that differs (see
/// [`AmqpUpstream::reconfigure`]).
fn restart_only_change(old: &AmqpUpstreamConfig, new: &AmqpUpstreamConfig) -> Option<&'static str> {
    if old.name != new.name {
        Some("name")
    } else if old.max_inflight != new.max_inflight {
        Some("max_inflight")
    } else if old.request_queue != new.request_queue {
        Some("request_queue")
    } else if old.max_unacked_downlinks != new.max_unacked_downlinks {
        Some("max_unacked_downlinks")
    } else if old.bindings != new.bindings {
        Some("bindings")
    } else {
        None
    }
}

/// Whether a connection setting differs: changing it takes a new connection.
fn connection_changed(old: &AmqpUpstreamConfig, new: &AmqpUpstreamConfig) -> bool {
    let tls_paths = |c: &AmqpUpstreamConfig| {
        (
            c.tls.ca_file.clone(),
            c.tls.client_cert.clone(),
            c.tls.client_key.clone(),
        )
    };
    old.url != new.url
        || old.username != new.username
        || old.password != new.password
        || old.vhost != new.vhost
        || old.exchange != new.exchange
        || old.heartbeat != new.heartbeat
        || old.connect_timeout != new.connect_timeout
        || old.downlink_queue != new.downlink_queue
        || tls_paths(old) != tls_paths(new)
}

/// A short text for a connection error, as the link status shows it (the broker's refusal
/// as it words it, e.g. `ACCESS_REFUSED - Login was refused ...`; never the credentials).
fn error_summary(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::IOError(e) => io_error_summary(e),
        lapin::ErrorKind::MissingHeartbeatError => "broker stopped sending heartbeats".into(),
        _ => error.to_string(),
    }
}

fn classify(result: lapin::Result<Confirmation>) -> Confirm {
    match result {
        Ok(Confirmation::Ack(None)) => Confirm::Ack,
        Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_))) => Confirm::Returned,
        Ok(Confirmation::Nack(None)) => Confirm::Nack,
        // Not in confirm mode cannot happen (confirm.select succeeded before any publish).
        Ok(Confirmation::NotRequested) => Confirm::Ack,
        Err(_) => Confirm::Lost,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn message(topic: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos: Qos::AtLeastOnce,
            retain: false,
            origin: Default::default(),
        }
    }

    /// A port nothing listens on (bound, read, released).
    fn dead_url() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    }

    #[tokio::test]
    async fn reconfigure_checks_first_and_a_new_url_is_dialled_at_once() {
        let mut config = AmqpUpstreamConfig::new("t", dead_url());
        // The first attempt fails, then the task waits at least 30 s before the next one.
        config.backoff_initial = Duration::from_secs(60);
        config.backoff_max = Duration::from_secs(60);
        let (acks, _ack_rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let (up, task) = AmqpUpstream::spawn(0, config.clone(), acks, stop.clone()).unwrap();
        let attempted = async {
            while up.link_info().status().failed_attempts == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), attempted)
            .await
            .unwrap();

        let mut bad = config.clone();
        bad.url = "http://127.0.0.1/".into();
        assert!(matches!(up.reconfigure(bad), Err(AmqpConfigError::Url(_))));
        let mut bad = config.clone();
        bad.max_downlink_bytes = 0;
        assert!(matches!(
            up.reconfigure(bad),
            Err(AmqpConfigError::Invalid(_))
        ));
        let mut fixed = config.clone();
        fixed.bindings = vec!["x.#".into()];
        assert_eq!(
            up.reconfigure(fixed),
            Err(AmqpConfigError::RestartRequired("bindings"))
        );
        assert_eq!(up.reconfigure(config.clone()), Ok(Reconfigured::Unchanged));
        let mut bigger = config.clone();
        bigger.max_downlink_bytes += 1;
        assert_eq!(up.reconfigure(bigger.clone()), Ok(Reconfigured::Applied));
        assert_eq!(up.reconfigure(bigger.clone()), Ok(Reconfigured::Unchanged));
        bigger.max_subscriptions = 1;
        assert_eq!(up.reconfigure(bigger.clone()), Ok(Reconfigured::Applied));
        up.subscribe("a/#", Qos::AtLeastOnce).unwrap();
        assert_eq!(
            up.subscribe("b/#", Qos::AtLeastOnce),
            Err(FailReason::QueueFull),
            "the new bound holds"
        );

        // A TCP peer (no broker): the task dials the new URL at once, not after its backoff.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut moved = bigger;
        moved.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        assert_eq!(up.reconfigure(moved), Ok(Reconfigured::Reconnecting));
        let (_peer, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("dialled within the bound, long before the backoff ends")
            .unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn while_down_publishes_are_refused_and_after_stop_the_task_ends() {
        let mut config = AmqpUpstreamConfig::new("t", dead_url());
        config.backoff_initial = Duration::from_millis(10);
        config.backoff_max = Duration::from_millis(50);
        let (acks, mut ack_rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let (up, task) = AmqpUpstream::spawn(0, config, acks, stop.clone()).unwrap();
        assert!(!*up.watch_link().borrow());
        assert_eq!(
            up.publish_with_seq(message("a/b"), Some(1), Some(1)),
            Err(FailReason::Disconnected)
        );
        // The link status counts the failed attempts and says why, in an operator's words.
        let attempted = async {
            loop {
                let status = up.link_info().status();
                if status.failed_attempts >= 1 {
                    break status;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let status = tokio::time::timeout(Duration::from_secs(10), attempted)
            .await
            .unwrap();
        assert!(!status.connected);
        assert_eq!(status.connects, 0);
        assert_eq!(status.last_error.as_deref(), Some("connection refused"));
        // Reset while down does nothing (no permit is stored for the next connection).
        up.reset_link();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            up.publish_with_seq(message("a/b"), Some(2), Some(2)),
            Err(FailReason::Shutdown)
        );
        // Refused sends get no report.
        assert!(ack_rx.try_recv().is_err());
    }

    #[test]
    fn invalid_settings_start_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let (acks, _rx) = mpsc::channel(1);
        let mut config = AmqpUpstreamConfig::new("t", "mqtt://h:1883");
        assert!(
            AmqpUpstream::spawn(0, config.clone(), acks.clone(), CancellationToken::new()).is_err()
        );
        config.url = "amqp://h/%2f".into();
        config.max_inflight = 0;
        assert!(AmqpUpstream::spawn(0, config, acks, CancellationToken::new()).is_err());
    }

    #[test]
    fn returned_and_nacked_confirmations_are_classified() {
        assert_eq!(classify(Ok(Confirmation::Ack(None))), Confirm::Ack);
        assert_eq!(classify(Ok(Confirmation::Nack(None))), Confirm::Nack);
        assert_eq!(
            classify(Err(lapin::ErrorKind::ChannelsLimitReached.into())),
            Confirm::Lost
        );
    }
}
