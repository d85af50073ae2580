//! The AMQP upstream's handle and its connection task (see the module docs of `amqp`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event, ExchangeKind,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::config::{AmqpConfigError, AmqpUpstreamConfig, MAX_ROUTING_KEY_BYTES};
use super::{Confirm, HEADER_QOS, HEADER_RETAIN, HEADER_TOPIC, routing_key};
use crate::message::{Message, Qos};
use crate::mqtt::backoff::Backoff;
use crate::upstream::{AckReport, Delivery, FailReason};

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
    /// Messages the broker returned as unroutable (reported `Failed(Rejected)` when tracked).
    pub returned: AtomicU64,
    /// Messages the broker nacked (reported `Failed(BrokerBusy)`, sent again by the spool).
    pub nacked: AtomicU64,
    /// Messages the broker acknowledged.
    pub acknowledged: AtomicU64,
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
        let uri = config.validate()?;
        let (requests, rx) = mpsc::channel(config.request_queue);
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
        });
        let task = Task {
            shared: Arc::clone(&shared),
            config,
            uri,
            rx,
            acks,
            link_tx,
            stop,
        };
        let handle = tokio::spawn(task.run());
        Ok((Self { shared }, handle))
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

    /// Drops the live connection (failing what is in flight); nothing while it is down.
    pub fn reset_link(&self) {
        if *self.shared.link.borrow() {
            self.shared.reset.notify_one();
        }
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
}

/// The connection task.
struct Task {
    shared: Arc<Shared>,
    config: AmqpUpstreamConfig,
    uri: AMQPUri,
    rx: mpsc::Receiver<Request>,
    acks: mpsc::Sender<AckReport>,
    link_tx: watch::Sender<bool>,
    stop: CancellationToken,
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
            let attempt = tokio::select! {
                () = self.stop.cancelled() => break,
                r = tokio::time::timeout(
                    self.config.connect_timeout,
                    connect(&self.uri, &self.config.exchange),
                ) => r,
            };
            match attempt {
                Ok(Ok((conn, channel))) => {
                    failing = false;
                    tracing::info!(upstream = %name, url = %self.config.redacted_url(), "AMQP upstream connected.");
                    // A reset asked for while the link was going down must not cut this new
                    // connection: drop its stored permit.
                    let _ = self.shared.reset.notified().now_or_never();
                    self.link_tx.send_replace(true);
                    let (end, confirmed) = self.serve(&conn, &channel).await;
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
                    let _ = tokio::time::timeout(
                        self.config.connect_timeout,
                        conn.close(REPLY_SUCCESS, "sensorgate".into()),
                    )
                    .await;
                    match end {
                        End::Stop => break,
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
                    if !failing {
                        tracing::warn!(upstream = %name, %error, "AMQP upstream cannot connect; retrying with backoff.");
                    } else {
                        tracing::debug!(upstream = %name, %error, "AMQP connect attempt failed.");
                    }
                    failing = true;
                }
                Err(_) => {
                    if !failing {
                        tracing::warn!(upstream = %name, "AMQP upstream connect timed out; retrying with backoff.");
                    }
                    failing = true;
                }
            }
            let delay = backoff.next_delay();
            let stop = self.stop.clone();
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
                // Requests queued while down were accepted before the drop: fail them now.
                () = self.fail_queued_forever() => {}
            }
        }
        self.link_tx.send_replace(false);
        self.rx.close();
        self.fail_queued(FailReason::Shutdown).await;
        tracing::info!(upstream = %name, "AMQP upstream stopped.");
    }

    /// Serves one connection until it ends; also tells whether the broker confirmed anything.
    async fn serve(&mut self, conn: &Connection, channel: &Channel) -> (End, bool) {
        let mut confirmed = false;
        let end = self.serve_until_end(conn, channel, &mut confirmed).await;
        (end, confirmed)
    }

    async fn serve_until_end(
        &mut self,
        conn: &Connection,
        channel: &Channel,
        confirmed: &mut bool,
    ) -> End {
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
                    Some(Event::Error(error)) => break End::Lost(error.to_string()),
                    Some(_) => {}
                    None => break End::Lost("connection events ended".into()),
                },
                _ = check.tick() => {
                    if !conn.status().connected() || !channel.status().connected() {
                        break End::Lost("connection or channel closed".into());
                    }
                }
                // Bounded: tracked sends are at most `max_inflight` (the handle refuses more);
                // untracked (QoS 0) confirms awaited at once are capped too.
                request = self.rx.recv(), if pending.len() < self.pending_cap() => {
                    let Some(request) = request else { return End::Stop };
                    let token = request.token;
                    match publish(channel, &self.config.exchange, request).await {
                        Ok(confirm) => {
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

/// Opens the connection and a confirm-mode channel, and checks that the exchange exists (a
/// missing one is a connect failure, retried with backoff and logged once, instead of a
/// channel closed by every publish).
async fn connect(uri: &AMQPUri, exchange: &str) -> lapin::Result<(Connection, Channel)> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from("sensorgate".to_owned()));
    let conn = Connection::connect_uri(uri.clone(), props).await?;
    let channel = conn.create_channel().await?;
    // The default exchange ("") always exists and cannot be declared.
    if !exchange.is_empty() {
        channel
            .exchange_declare(
                ShortString::from(exchange.to_owned()),
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
    Ok((conn, channel))
}

/// Sends one message: persistent, mandatory, message id = the spool sequence id.
async fn publish(
    channel: &Channel,
    exchange: &str,
    request: Request,
) -> lapin::Result<lapin::PublisherConfirm> {
    let Request { message, seq, .. } = request;
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
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(seq) = seq {
        properties = properties.with_message_id(ShortString::from(seq.to_string()));
    }
    channel
        .basic_publish(
            ShortString::from(exchange.to_owned()),
            ShortString::from(routing_key(&message.topic)),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &message.payload,
            properties,
        )
        .await
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
