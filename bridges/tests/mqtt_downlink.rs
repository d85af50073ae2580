//! Downlink against a real broker: subscriptions made by the upstream, messages published by an
//! independent MQTT 5 client, delivered as `Downlink`s.
//!
//! mosquitto runs as a child process on a free 127.0.0.1 port (killed by PID on drop). Most
//! brokers here allow one unacknowledged QoS >= 1 message per client (`max_inflight_messages
//! 1`, and the upstream's `max_unacked_downlinks` 1, which MQTT 5 announces as Receive
//! Maximum): a second QoS 1 message is then held back by the broker until the first is
//! acknowledged, which makes "acknowledged or not" observable. A QoS 0 sentinel published after
//! it is not held back, so "the next downlink is the sentinel" proves, without sleeping, that
//! the held message did not come.
//!
//! Every wait is bounded and polls a condition. mosquitto (Debian package `mosquitto`) is
//! required: without it these tests fail, they do not skip.

// A test harness: failing loudly is its job (also on a malformed packet reaching its fake
// broker), and it reads the wall clock to bound its waits.
#![allow(
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::indexing_slicing
)]

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc_v5 as v5;
use sensorgate_bridges::message::{Downlink, Message, Qos};
use sensorgate_bridges::mqtt::{
    AckReport, Delivery, FailReason, MqttUpstream, MqttUpstreamConfig, MqttVersion, UpstreamStats,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use common::{Broker, EVENT_BOUND, RECONNECT_BOUND, fast_config, free_port, init_tracing, unique};

/// mosquitto holds a second unacknowledged QoS >= 1 message back.
const ONE_IN_FLIGHT: &str = "max_inflight_messages 1\n";

// ---------------------------------------------------------------------------------------------
// Harness (the broker and the rest are in `common`)
// ---------------------------------------------------------------------------------------------

/// Fast-retrying configuration with prefix `site-7/` and one unacknowledged downlink.
fn config(broker: &Broker, version: MqttVersion) -> MqttUpstreamConfig {
    let mut config = fast_config("down", &broker.url(), version);
    config.remote_prefix = "site-7/".into();
    config.max_unacked_downlinks = 1;
    config
}

/// A running upstream with its downlink and report channels.
struct Running {
    upstream: MqttUpstream,
    task: JoinHandle<()>,
    downlinks: mpsc::Receiver<Downlink>,
    acks: mpsc::Receiver<AckReport>,
    shutdown: CancellationToken,
}

impl Running {
    /// Starts the upstream and waits until it is connected.
    async fn start(config: MqttUpstreamConfig) -> Self {
        let (acks_tx, acks) = mpsc::channel(64);
        let (downlink_tx, downlinks) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let (upstream, task) = MqttUpstream::spawn_with_downlink(
            7,
            config,
            acks_tx,
            Some(downlink_tx),
            shutdown.clone(),
        )
        .expect("upstream starts");
        let running = Self {
            upstream,
            task,
            downlinks,
            acks,
            shutdown,
        };
        running.wait_for("connected", |up| up.is_connected()).await;
        running
    }

    /// Polls `condition` on the upstream until it holds, bounded by [`RECONNECT_BOUND`].
    async fn wait_for(&self, what: &str, condition: impl Fn(&MqttUpstream) -> bool) {
        let deadline = Instant::now() + RECONNECT_BOUND;
        while !condition(&self.upstream) {
            assert!(
                Instant::now() < deadline,
                "not {what} within {RECONNECT_BOUND:?}: {:?}",
                self.upstream.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stats(&self) -> UpstreamStats {
        self.upstream.stats()
    }

    /// Subscribes and waits for the broker's SUBACK (counted as granted).
    async fn subscribe(&self, filter: &str, qos: Qos) {
        let granted = self.stats().subscribe_granted;
        self.upstream.subscribe(filter, qos).expect("subscribe");
        self.wait_for("granted", |up| up.stats().subscribe_granted > granted)
            .await;
    }

    /// The next downlink message.
    async fn next(&mut self) -> Downlink {
        timeout(EVENT_BOUND, self.downlinks.recv())
            .await
            .unwrap_or_else(|_| panic!("no downlink within {EVENT_BOUND:?}: {:?}", self.stats()))
            .expect("downlink channel open")
    }

    /// The next downlink message, which must be `topic` with `payload`.
    async fn expect(&mut self, topic: &str, payload: &str) -> Downlink {
        let downlink = self.next().await;
        assert_eq!(
            (downlink.topic.as_str(), &downlink.payload[..]),
            (topic, payload.as_bytes()),
            "unexpected downlink {downlink:?}"
        );
        assert_eq!(downlink.upstream, 7);
        downlink
    }

    async fn shut_down(self) {
        self.shutdown.cancel();
        timeout(EVENT_BOUND, self.task)
            .await
            .expect("upstream task ends after shutdown")
            .expect("upstream task did not panic");
    }
}

/// An independent MQTT 5 client that publishes.
struct Publisher {
    client: v5::AsyncClient,
    task: JoinHandle<()>,
}

impl Publisher {
    async fn connect(broker: &Broker) -> Self {
        let mut options = v5::MqttOptions::new(unique("publisher"), ("127.0.0.1", broker.port));
        options.set_keep_alive(5);
        let (client, mut eventloop) = v5::AsyncClient::builder(options).capacity(64).build();
        let task = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        Self { client, task }
    }

    /// Publishes and waits until the broker has it (QoS >= 1: PUBACK / PUBCOMP; QoS 0:
    /// written to the socket).
    async fn publish(&self, topic: &str, payload: &[u8], qos: Qos, retain: bool) {
        let qos = match qos {
            Qos::AtMostOnce => v5::QoS::AtMostOnce,
            Qos::AtLeastOnce => v5::QoS::AtLeastOnce,
            Qos::ExactlyOnce => v5::QoS::ExactlyOnce,
        };
        let notice = self
            .client
            .publish_tracked(
                topic.to_owned(),
                Bytes::copy_from_slice(payload),
                v5::PublishOptions::new(qos).retain(retain),
            )
            .await
            .expect("queue publish");
        timeout(EVENT_BOUND, notice.wait_async())
            .await
            .expect("publish completes in time")
            .expect("publish accepted");
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

async fn qos1_downlink_is_acknowledged_only_by_ack(version: MqttVersion) {
    init_tracing();
    let broker = Broker::start_with(ONE_IN_FLIGHT);
    let publisher = Publisher::connect(&broker).await;
    let mut up = Running::start(config(&broker, version)).await;
    up.subscribe("cmd/#", Qos::ExactlyOnce).await;

    publisher
        .publish("site-7/cmd/a", b"one", Qos::AtLeastOnce, false)
        .await;
    let first = up.expect("cmd/a", "one").await;
    assert_eq!((first.qos, first.retain), (Qos::AtLeastOnce, false));
    assert!(first.ack.is_required());

    // Unacknowledged: the broker holds the second QoS 1 message back, not the QoS 0 sentinel.
    publisher
        .publish("site-7/cmd/b", b"two", Qos::AtLeastOnce, false)
        .await;
    publisher
        .publish("site-7/cmd/sentinel", b"s1", Qos::AtMostOnce, false)
        .await;
    let sentinel = up.expect("cmd/sentinel", "s1").await;
    assert!(
        !sentinel.ack.is_required(),
        "QoS 0 needs no acknowledgement"
    );
    sentinel.ack.ack();

    first.ack.ack();
    let second = up.expect("cmd/b", "two").await;
    second.ack.ack();

    // QoS 2: PUBREC on ack(), the client completes the exchange.
    publisher
        .publish("site-7/cmd/c", b"three", Qos::ExactlyOnce, false)
        .await;
    let third = up.expect("cmd/c", "three").await;
    assert_eq!(third.qos, Qos::ExactlyOnce);
    third.ack.ack();

    // Nothing is redelivered: the next message is the next one published.
    publisher
        .publish("site-7/cmd/d", b"four", Qos::AtLeastOnce, false)
        .await;
    up.expect("cmd/d", "four").await.ack.ack();

    up.wait_for("acknowledged", |up| up.stats().downlink_acknowledged == 4)
        .await;
    let stats = up.stats();
    assert_eq!(
        (
            stats.downlink_received,
            stats.downlink_dropped,
            stats.downlink_acks_stale
        ),
        (5, 0, 0)
    );
    assert_eq!(stats.reconnects, 0);
    up.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_downlink_is_acknowledged_only_by_ack_v311() {
    qos1_downlink_is_acknowledged_only_by_ack(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_downlink_is_acknowledged_only_by_ack_v5() {
    qos1_downlink_is_acknowledged_only_by_ack(MqttVersion::V5).await;
}

async fn an_ack_from_before_a_reconnect_acknowledges_nothing(version: MqttVersion) {
    init_tracing();
    let mut broker = Broker::start_with(ONE_IN_FLIGHT);
    let mut up = Running::start(config(&broker, version)).await;
    up.subscribe("cmd/#", Qos::AtLeastOnce).await;
    {
        let publisher = Publisher::connect(&broker).await;
        publisher
            .publish("site-7/cmd/old", b"old", Qos::AtLeastOnce, false)
            .await;
    }
    let old = up.expect("cmd/old", "old").await;

    // The subscription is made again on the new connection: a message published after the
    // restart arrives.
    broker.restart();
    up.wait_for("reconnected", |up| {
        let stats = up.stats();
        up.is_connected() && stats.reconnects == 1 && stats.subscribe_granted >= 2
    })
    .await;
    let publisher = Publisher::connect(&broker).await;
    publisher
        .publish("site-7/cmd/new", b"new", Qos::AtLeastOnce, false)
        .await;
    // `old` holds the only acknowledgement slot, so `new` waits in the link task until `old`
    // is used. Its acknowledgement names the old connection and most likely the same packet
    // id as `new`: it must acknowledge nothing, and not upset the client either.
    old.ack.ack();
    up.wait_for("stale ack seen", |up| up.stats().downlink_acks_stale == 1)
        .await;
    let new = up.expect("cmd/new", "new").await;
    // `new` is still unacknowledged: the broker holds the next QoS 1 message back. (Had the
    // stale ack acknowledged `new`, the broker would send `held`, which would wait for a slot
    // in front of the sentinel, and the sentinel would not come.)
    publisher
        .publish("site-7/cmd/held", b"held", Qos::AtLeastOnce, false)
        .await;
    publisher
        .publish("site-7/cmd/sentinel", b"s", Qos::AtMostOnce, false)
        .await;
    up.expect("cmd/sentinel", "s").await;

    new.ack.ack();
    up.expect("cmd/held", "held").await.ack.ack();
    let stats = up.stats();
    assert_eq!(stats.reconnects, 1, "the stale ack cost the connection");
    assert!(up.upstream.is_connected());
    up.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_from_before_a_reconnect_acknowledges_nothing_v311() {
    an_ack_from_before_a_reconnect_acknowledges_nothing(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_from_before_a_reconnect_acknowledges_nothing_v5() {
    an_ack_from_before_a_reconnect_acknowledges_nothing(MqttVersion::V5).await;
}

async fn unsubscribe_stops_delivery(version: MqttVersion) {
    init_tracing();
    let broker = Broker::start();
    let publisher = Publisher::connect(&broker).await;
    let mut up = Running::start(config(&broker, version)).await;
    up.subscribe("a/#", Qos::AtLeastOnce).await;
    up.subscribe("b/#", Qos::AtLeastOnce).await;
    publisher
        .publish("site-7/a/1", b"a1", Qos::AtLeastOnce, false)
        .await;
    up.expect("a/1", "a1").await.ack.ack();

    up.upstream.unsubscribe("a/#").expect("unsubscribe");
    // A SUBSCRIBE queued after the UNSUBSCRIBE on the same connection: once it is granted,
    // the broker has processed the UNSUBSCRIBE too.
    up.subscribe("barrier", Qos::AtMostOnce).await;
    publisher
        .publish("site-7/a/2", b"a2", Qos::AtLeastOnce, false)
        .await;
    publisher
        .publish("site-7/b/1", b"b1", Qos::AtLeastOnce, false)
        .await;
    up.expect("b/1", "b1").await.ack.ack();
    // Unsubscribing twice, or a filter never subscribed, is fine.
    up.upstream.unsubscribe("a/#").expect("unsubscribe again");
    up.upstream
        .unsubscribe("never")
        .expect("unsubscribe unknown");
    up.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery_v311() {
    unsubscribe_stops_delivery(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery_v5() {
    unsubscribe_stops_delivery(MqttVersion::V5).await;
}

async fn retained_messages_keep_their_flag(version: MqttVersion) {
    init_tracing();
    let broker = Broker::start();
    let publisher = Publisher::connect(&broker).await;
    publisher
        .publish("site-7/cfg/a", b"stored", Qos::AtLeastOnce, true)
        .await;
    let mut up = Running::start(config(&broker, version)).await;
    up.subscribe("cfg/#", Qos::AtLeastOnce).await;
    let stored = up.expect("cfg/a", "stored").await;
    assert!(stored.retain, "retained message sent on subscribe");
    stored.ack.ack();

    // A live retained update: MQTT 5 keeps the flag (Retain As Published), MQTT 3.1.1 clears
    // it.
    publisher
        .publish("site-7/cfg/a", b"update", Qos::AtLeastOnce, true)
        .await;
    let update = up.expect("cfg/a", "update").await;
    assert_eq!(update.retain, version == MqttVersion::V5);
    update.ack.ack();
    up.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_keep_their_flag_v311() {
    retained_messages_keep_their_flag(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_keep_their_flag_v5() {
    retained_messages_keep_their_flag(MqttVersion::V5).await;
}

async fn own_uplink_echo(version: MqttVersion) {
    init_tracing();
    let broker = Broker::start();
    let publisher = Publisher::connect(&broker).await;
    let mut up = Running::start(config(&broker, version)).await;
    up.subscribe("echo/#", Qos::AtLeastOnce).await;
    let own = Message {
        topic: "echo/own".into(),
        payload: Bytes::from_static(b"mine"),
        qos: Qos::AtLeastOnce,
        retain: false,
        origin: Default::default(),
    };
    up.upstream.publish(own, Some(1)).expect("publish accepted");
    let report = timeout(EVENT_BOUND, up.acks.recv())
        .await
        .expect("report in time")
        .expect("report channel open");
    assert_eq!(report.delivery, Delivery::Acknowledged);
    // Routed by the broker before this one.
    publisher
        .publish("site-7/echo/other", b"theirs", Qos::AtLeastOnce, false)
        .await;
    // MQTT 5: No Local, the broker sends no echo. MQTT 3.1.1: it does, and the upstream
    // drops it (the gateway delivered the message to its own subscribers already). Either
    // way the next downlink is the other client's message.
    up.expect("echo/other", "theirs").await.ack.ack();
    let echoes = u64::from(version == MqttVersion::V311);
    assert_eq!(up.stats().downlink_echoes_dropped, echoes);
    assert_eq!(up.stats().echo_records_expired, 0);
    up.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_uplink_echo_is_dropped_on_v311() {
    own_uplink_echo(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_uplink_does_not_echo_back_on_v5() {
    own_uplink_echo(MqttVersion::V5).await;
}

async fn oversized_downlinks_are_dropped(version: MqttVersion) {
    init_tracing();
    let broker = Broker::start_with(ONE_IN_FLIGHT);
    let publisher = Publisher::connect(&broker).await;
    let mut cfg = config(&broker, version);
    cfg.max_downlink_bytes = 2048;
    let mut up = Running::start(cfg).await;
    up.subscribe("big/#", Qos::AtLeastOnce).await;
    publisher
        .publish("site-7/big/x", &[b'x'; 4000], Qos::AtLeastOnce, false)
        .await;
    // MQTT 3.1.1: dropped here, and acknowledged: with one message in flight, the next QoS 1
    // message only comes once the big one was acknowledged. MQTT 5: the broker honours the
    // Maximum Packet Size and never sends it (mosquitto 2.0.11 then keeps the dropped message's
    // in-flight slot until the client reconnects, so the next message is QoS 0).
    let next_qos = match version {
        MqttVersion::V311 => Qos::AtLeastOnce,
        MqttVersion::V5 => Qos::AtMostOnce,
    };
    publisher
        .publish("site-7/big/y", b"small", next_qos, false)
        .await;
    up.expect("big/y", "small").await.ack.ack();
    let stats = up.stats();
    let dropped_here = u64::from(version == MqttVersion::V311);
    assert_eq!(
        (stats.downlink_received, stats.downlink_dropped),
        (1 + dropped_here, dropped_here)
    );
    assert_eq!(stats.reconnects, 0);
    assert!(up.upstream.is_connected());
    up.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_downlinks_are_dropped_v311() {
    oversized_downlinks_are_dropped(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_downlinks_are_dropped_v5() {
    oversized_downlinks_are_dropped(MqttVersion::V5).await;
}

/// A minimal MQTT 3.1.1 broker for one connection: accepts it, grants subscriptions to
/// filters starting with `site-7/allowed/` and refuses all others (SUBACK 0x80), answers
/// pings. mosquitto 2.0 grants every subscription (its ACLs apply on delivery).
async fn refusing_broker(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut stream, _) = listener.accept().await.expect("accept");
    loop {
        let mut first = [0u8; 1];
        if stream.read_exact(&mut first).await.is_err() {
            return;
        }
        let mut remaining = 0usize;
        for shift in (0..4).map(|i| 7 * i) {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.expect("length");
            remaining |= usize::from(byte[0] & 0x7f) << shift;
            if byte[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; remaining];
        stream.read_exact(&mut body).await.expect("body");
        let reply = match first[0] >> 4 {
            1 => vec![0x20, 0x02, 0x00, 0x00], // CONNECT -> CONNACK accepted
            8 => {
                // SUBSCRIBE: packet id, then (length, filter, options) per filter.
                let mut codes = Vec::new();
                let mut rest = &body[2..];
                while rest.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                    let filter = &rest[2..2 + len];
                    codes.push(if filter.starts_with(b"site-7/allowed/") {
                        0x01
                    } else {
                        0x80
                    });
                    rest = &rest[2 + len + 1..];
                }
                let mut suback = vec![0x90, u8::try_from(2 + codes.len()).expect("few")];
                suback.extend_from_slice(&body[..2]);
                suback.extend_from_slice(&codes);
                suback
            }
            12 => vec![0xd0, 0x00], // PINGREQ -> PINGRESP
            _ => continue,
        };
        stream.write_all(&reply).await.expect("write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscriptions_are_counted() {
    init_tracing();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local addr").port();
    let broker = tokio::spawn(refusing_broker(listener));
    let mut cfg =
        MqttUpstreamConfig::new("down", &format!("mqtt://127.0.0.1:{port}")).expect("valid url");
    cfg.remote_prefix = "site-7/".into();
    let up = Running::start(cfg).await;
    up.upstream
        .subscribe("denied/#", Qos::AtLeastOnce)
        .expect("remembered");
    up.upstream
        .subscribe("allowed/#", Qos::AtLeastOnce)
        .expect("remembered");
    up.wait_for("answered", |up| {
        let stats = up.stats();
        stats.subscribe_granted + stats.subscribe_refused == 2
    })
    .await;
    let stats = up.stats();
    assert_eq!((stats.subscribe_granted, stats.subscribe_refused), (1, 1));
    assert!(up.upstream.is_connected());
    up.shut_down().await;
    broker.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_is_asked_for_again_on_the_same_connection() {
    init_tracing();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local addr").port();
    let broker = tokio::spawn(refusing_broker(listener));
    let mut cfg =
        MqttUpstreamConfig::new("down", &format!("mqtt://127.0.0.1:{port}")).expect("valid url");
    cfg.remote_prefix = "site-7/".into();
    cfg.subscribe_retry = Duration::from_millis(50);
    let up = Running::start(cfg).await;
    up.upstream
        .subscribe("allowed/#", Qos::AtLeastOnce)
        .expect("remembered");
    up.upstream
        .subscribe("denied/#", Qos::AtLeastOnce)
        .expect("remembered");
    // The refusing broker accepts one connection only: every answer is on the first.
    up.wait_for("asked again", |up| up.stats().subscribe_refused >= 3)
        .await;
    assert_eq!(
        up.stats().subscribe_granted,
        1,
        "a granted filter is not re-sent"
    );
    // (That a filter no longer wanted is not asked for again is checked by the table's
    // tests: `SubscriptionTable::unapply` of an unwanted filter sends nothing.)
    assert!(up.upstream.is_connected());
    up.shut_down().await;
    broker.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_refuses_invalid_filters_and_works_while_down() {
    init_tracing();
    // Nothing listens on this port: subscriptions are only remembered.
    let mut cfg = MqttUpstreamConfig::new("down", &format!("mqtt://127.0.0.1:{}", free_port()))
        .expect("valid url");
    cfg.remote_prefix = "site-7/".into();
    let (acks_tx, _acks) = mpsc::channel(1);
    let (downlink_tx, _downlinks) = mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let (upstream, task) =
        MqttUpstream::spawn_with_downlink(0, cfg, acks_tx, Some(downlink_tx), shutdown.clone())
            .expect("upstream starts");
    assert_eq!(upstream.subscribe("ok/+/x", Qos::AtLeastOnce), Ok(()));
    assert_eq!(upstream.subscribe("ok/+/x", Qos::AtMostOnce), Ok(()));
    for filter in ["", "a/#/b", "a+", "nul\0", &"x".repeat(70_000)] {
        assert_eq!(
            upstream.subscribe(filter, Qos::AtLeastOnce),
            Err(FailReason::Rejected),
            "{filter:.20}"
        );
    }
    assert_eq!(upstream.unsubscribe("ok/+/x"), Ok(()));
    shutdown.cancel();
    assert_eq!(
        upstream.subscribe("ok/#", Qos::AtLeastOnce),
        Err(FailReason::Shutdown)
    );
    assert_eq!(upstream.unsubscribe("ok/#"), Err(FailReason::Shutdown));
    timeout(EVENT_BOUND, task)
        .await
        .expect("stops")
        .expect("no panic");
}
