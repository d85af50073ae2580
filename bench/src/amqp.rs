//! The AMQP side of scenario 8: a counting consumer on a queue bound to the exchange the
//! gateway publishes to, and a native AMQP publisher (publisher confirms, a bounded confirm
//! window) sending the same messages straight to RabbitMQ.
//!
//! The consumer counts with the MQTT counting subscriber's [`Tally`] (loss, duplicates,
//! reordering per client, latency), on its own thread and runtime so the load does not delay
//! it. It consumes with automatic acknowledgement: the cheapest consumer for the broker, and
//! the queue is empty again once everything arrived.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

use sensorgate_bridges::amqp::{HEADER_QOS, HEADER_RETAIN, HEADER_TOPIC, routing_key};

use crate::subscriber::{Tally, wait_tally};
use crate::{elapsed_ns, sn};

/// The exchange both the gateway and the native publisher send to (the gateway's default).
pub const EXCHANGE: &str = "amq.topic";

/// Bound on connecting and setting up a channel.
const SETUP: Duration = Duration::from_secs(10);

/// A consumer counting benchmark messages from a durable queue bound to [`EXCHANGE`].
#[derive(Debug)]
pub struct AmqpCounter {
    tally: Arc<Mutex<Tally>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl AmqpCounter {
    /// Connects to `url`, declares the durable queue `queue`, binds it to [`EXCHANGE`] with
    /// each of `bindings` (routing keys, e.g. `bench.#`) and starts consuming.
    ///
    /// # Errors
    /// When the broker refuses or does not answer within 10 s.
    pub fn start(url: &str, queue: &str, bindings: &[&str]) -> anyhow::Result<AmqpCounter> {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let t = tally.clone();
        let url = url.to_owned();
        let queue = queue.to_owned();
        let bindings: Vec<String> = bindings.iter().map(|b| (*b).to_owned()).collect();
        let thread = std::thread::Builder::new()
            .name("amqp-counter".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let setup = tokio::time::timeout(SETUP, async {
                        let conn =
                            Connection::connect(&url, ConnectionProperties::default()).await?;
                        let channel = conn.create_channel().await?;
                        channel
                            .queue_declare(
                                ShortString::from(queue.clone()),
                                QueueDeclareOptions::durable(),
                                FieldTable::default(),
                            )
                            .await?;
                        for b in &bindings {
                            channel
                                .queue_bind(
                                    ShortString::from(queue.clone()),
                                    ShortString::from(EXCHANGE),
                                    ShortString::from(b.clone()),
                                    QueueBindOptions::default(),
                                    FieldTable::default(),
                                )
                                .await?;
                        }
                        let consumer = channel
                            .basic_consume(
                                ShortString::from(queue.clone()),
                                ShortString::from("sg-bench-counter"),
                                BasicConsumeOptions {
                                    no_ack: true,
                                    ..BasicConsumeOptions::default()
                                },
                                FieldTable::default(),
                            )
                            .await?;
                        Ok::<_, lapin::Error>((conn, consumer))
                    })
                    .await;
                    let (conn, mut consumer) = match setup {
                        Ok(Ok(ok)) => ok,
                        Ok(Err(e)) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                        Err(_) => {
                            let _ = ready_tx.send(Err("timed out".into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    loop {
                        tokio::select! {
                            _ = &mut stop_rx => break,
                            delivery = consumer.next() => match delivery {
                                Some(Ok(d)) => {
                                    let now = elapsed_ns();
                                    if let Ok(mut t) = t.lock() {
                                        t.record(&d.data, now);
                                    }
                                }
                                Some(Err(e)) => {
                                    eprintln!("AMQP counting consumer: {e}");
                                    break;
                                }
                                None => break,
                            },
                        }
                    }
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        conn.close(200, ShortString::from("done")),
                    )
                    .await;
                });
            })?;
        match ready_rx.recv_timeout(SETUP + Duration::from_secs(1)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("the AMQP counting consumer could not start: {e}"),
            Err(_) => bail!("the AMQP counting consumer did not start within 10 s"),
        }
        Ok(AmqpCounter {
            tally,
            thread: Some(thread),
            stop: Some(stop_tx),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Tally> {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets everything counted so far.
    pub fn reset(&self) {
        *self.lock() = Tally::default();
    }

    /// Waits until `unique` distinct messages arrived, nothing new came for `idle`, or `max`
    /// passed; returns the tally.
    ///
    /// # Errors
    /// When the consumer's thread ended.
    pub fn wait_for(&self, unique: u64, idle: Duration, max: Duration) -> anyhow::Result<Tally> {
        let alive = || self.thread.as_ref().is_some_and(|t| !t.is_finished());
        wait_tally(&self.tally, &alive, unique, idle, max)
            .context("the AMQP counting consumer stopped")
    }
}

impl Drop for AmqpCounter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let until = Instant::now() + Duration::from_secs(3);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// What the native AMQP publisher sends: `messages` stamped messages spread round-robin over
/// `clients` topics `<topic_prefix><client>`, as the gateway publishes them (persistent,
/// mandatory, `message_id`, the gateway's headers), with at most `window` unconfirmed.
#[derive(Debug, Clone)]
pub struct NativeAmqp {
    /// `amqp://` URL.
    pub url: String,
    /// Topic prefix (MQTT form; the routing key is mapped like the gateway's).
    pub topic_prefix: String,
    /// Clients (topics) the messages are spread over.
    pub clients: u32,
    /// Number of messages.
    pub messages: u64,
    /// Payload bytes.
    pub payload: usize,
    /// Publishes awaiting their confirm, at most (the gateway's `max_inflight`).
    pub window: u16,
    /// Bound on the run.
    pub max: Duration,
}

/// What the native AMQP publisher achieved.
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeResult {
    /// Published.
    pub sent: u64,
    /// Confirmed with basic.ack (not returned).
    pub acked: u64,
    /// basic.nack, returned as unroutable, or lost.
    pub failed: u64,
    /// From the first publish to the last confirm.
    pub secs: f64,
}

/// Publishes `n`'s messages and waits for their confirms.
///
/// # Errors
/// When the broker is unreachable or the channel cannot be set up.
pub async fn publish_native(n: &NativeAmqp) -> anyhow::Result<NativeResult> {
    let (conn, channel) = tokio::time::timeout(SETUP, async {
        let conn = Connection::connect(&n.url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok::<_, lapin::Error>((conn, channel))
    })
    .await
    .context("the native AMQP publisher did not connect within 10 s")??;
    let routes: Vec<(String, String)> = (0..n.clients.max(1))
        .map(|c| {
            let topic = format!("{}{c}", n.topic_prefix);
            let key = routing_key(&topic);
            (topic, key)
        })
        .collect();
    let clients = u64::from(n.clients.max(1));
    let window = usize::from(n.window.max(1));
    let mut result = NativeResult::default();
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let until = start + n.max;
    let mut body = Vec::with_capacity(n.payload);
    while result.sent < n.messages && Instant::now() < until {
        if pending.len() >= window {
            match tokio::time::timeout_at(until.into(), pending.next()).await {
                Ok(Some(r)) => settle(r, &mut result),
                Ok(None) => {}
                Err(_) => break,
            }
            continue;
        }
        let j = result.sent;
        let client = j % clients;
        let Some((topic, key)) = routes.get(usize::try_from(client).unwrap_or(0)) else {
            break;
        };
        body.clear();
        sn::stamp_into(
            &mut body,
            u32::try_from(client).unwrap_or(u32::MAX),
            j / clients,
            elapsed_ns(),
            n.payload,
        );
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_TOPIC.into(),
            AMQPValue::LongString(LongString::from(topic.clone())),
        );
        headers.insert(HEADER_QOS.into(), AMQPValue::ShortShortUInt(1));
        headers.insert(HEADER_RETAIN.into(), AMQPValue::Boolean(false));
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers)
            .with_message_id(ShortString::from(j.to_string()));
        let confirm = channel
            .basic_publish(
                ShortString::from(EXCHANGE),
                ShortString::from(key.clone()),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                properties,
            )
            .await
            .context("native AMQP publish")?;
        pending.push(confirm);
        result.sent += 1;
    }
    // The last window's confirms, bounded apart from the publishing.
    let confirms_until = Instant::now() + Duration::from_secs(30);
    while let Ok(Some(r)) = tokio::time::timeout_at(confirms_until.into(), pending.next()).await {
        settle(r, &mut result);
    }
    result.secs = start.elapsed().as_secs_f64();
    result.failed += u64::try_from(pending.len()).unwrap_or(0);
    drop(pending);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        conn.close(200, ShortString::from("done")),
    )
    .await;
    Ok(result)
}

/// Counts one confirm: an ack of a routed message, or anything else (nack, returned, lost).
fn settle(confirm: lapin::Result<Confirmation>, result: &mut NativeResult) {
    match confirm {
        Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => result.acked += 1,
        _ => result.failed += 1,
    }
}
