//! The MQTT upstream against a real broker: mosquitto started as a child process on a free
//! 127.0.0.1 port, with a generated config in a temporary directory, killed by PID on drop.
//!
//! Deliveries are observed with an independent MQTT 5 client subscribed to `#` (its SUBACK is
//! awaited, so nothing published afterwards can be missed). Every wait is bounded and polls a
//! condition; no fixed sleep decides a test.
//!
//! mosquitto (Debian package `mosquitto`) is required: without it these tests fail, they do
//! not skip. The TLS test also needs the `openssl` command.

// A test harness: failing loudly is its job, and it reads the wall clock to bound its waits.
#![allow(clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sensorgate_bridges::message::{Downlink, Message, Qos};
use sensorgate_bridges::mqtt::{
    AckReport, Delivery, FailReason, MqttUpstream, MqttUpstreamConfig, MqttVersion, TlsSettings,
};
use sensorgate_bridges::telemetry::LinkStatus;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use common::{
    Broker, EVENT_BOUND, Observer, RECONNECT_BOUND, fast_config, free_port, init_tracing,
};

// ---------------------------------------------------------------------------------------------
// Harness (the broker, the observer and the rest are in `common`)
// ---------------------------------------------------------------------------------------------

/// Fast-retrying configuration for tests.
fn config(url: &str, version: MqttVersion) -> MqttUpstreamConfig {
    let mut config = fast_config("test", url, version);
    config.max_inflight = 100;
    config.request_queue = 100;
    config
}

/// A running upstream plus what the test needs to drive and stop it.
struct Running {
    upstream: MqttUpstream,
    task: JoinHandle<()>,
    acks: mpsc::Receiver<AckReport>,
    shutdown: CancellationToken,
}

fn spawn(config: MqttUpstreamConfig) -> Running {
    let (tx, acks) = mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    let (upstream, task) =
        MqttUpstream::spawn(3, config, tx, shutdown.clone()).expect("upstream starts");
    Running {
        upstream,
        task,
        acks,
        shutdown,
    }
}

impl Running {
    async fn wait_connected(&self, connected: bool) {
        let deadline = Instant::now() + RECONNECT_BOUND;
        while self.upstream.is_connected() != connected {
            assert!(
                Instant::now() < deadline,
                "upstream connected={} not reached within {RECONNECT_BOUND:?}",
                connected
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the link status (as the admin listener reads it) satisfies `condition`,
    /// and returns it.
    async fn wait_link(&self, what: &str, condition: impl Fn(&LinkStatus) -> bool) -> LinkStatus {
        let deadline = Instant::now() + RECONNECT_BOUND;
        loop {
            let status = self.upstream.link_info().status();
            if condition(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "link status not {what} within {RECONNECT_BOUND:?}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The next `n` reports, keyed by token; fails on a duplicate token.
    async fn reports(&mut self, n: usize) -> BTreeMap<u64, Delivery> {
        let mut seen = BTreeMap::new();
        while seen.len() < n {
            let report = timeout(EVENT_BOUND, self.acks.recv())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} reports: {seen:?}", seen.len()))
                .expect("report channel open");
            assert_eq!(report.upstream, 3, "report names the spawn index");
            assert!(
                seen.insert(report.token, report.delivery).is_none(),
                "token {} reported twice",
                report.token
            );
        }
        seen
    }

    /// Cancels, waits for the task (bounded) and checks that no further report exists.
    async fn shut_down(mut self) -> BTreeMap<u64, Delivery> {
        self.shutdown.cancel();
        timeout(EVENT_BOUND, &mut self.task)
            .await
            .expect("upstream task ends after shutdown")
            .expect("upstream task did not panic");
        let mut rest = BTreeMap::new();
        while let Some(report) = self.acks.recv().await {
            assert!(
                rest.insert(report.token, report.delivery).is_none(),
                "token {} reported twice",
                report.token
            );
        }
        rest
    }
}

fn msg(topic: &str, payload: &'static str, qos: Qos) -> Message {
    Message {
        topic: topic.to_owned(),
        payload: Bytes::from_static(payload.as_bytes()),
        qos,
        retain: false,
        origin: Default::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

async fn qos1_and_qos2_are_acknowledged_and_delivered(version: MqttVersion) {
    init_tracing();
    let broker = Broker::start();
    let mut observer = Observer::connect(broker.port).await;
    let mut cfg = config(&broker.url(), version);
    cfg.remote_prefix = "site-7/".into();
    let mut up = spawn(cfg);
    up.wait_connected(true).await;

    up.upstream
        .publish(msg("sensors/a", "one", Qos::AtLeastOnce), Some(1))
        .expect("accepted");
    up.upstream
        .publish(msg("sensors/b", "two", Qos::ExactlyOnce), Some(2))
        .expect("accepted");
    up.upstream
        .publish(msg("sensors/c", "three", Qos::AtMostOnce), None)
        .expect("sent");

    let reports = up.reports(2).await;
    assert_eq!(
        reports,
        BTreeMap::from([(1, Delivery::Acknowledged), (2, Delivery::Acknowledged)])
    );
    assert_eq!(
        observer.expect(3).await,
        vec![
            ("site-7/sensors/a".to_owned(), Bytes::from_static(b"one")),
            ("site-7/sensors/b".to_owned(), Bytes::from_static(b"two")),
            ("site-7/sensors/c".to_owned(), Bytes::from_static(b"three")),
        ]
    );
    let stats = up.upstream.stats();
    assert_eq!(stats.published, 3);
    assert_eq!(stats.acknowledged, 2);
    assert_eq!(stats.failed, 0);
    assert_eq!(up.upstream.name(), "test");
    assert!(up.shut_down().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos2_are_acknowledged_and_delivered_v311() {
    qos1_and_qos2_are_acknowledged_and_delivered(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos2_are_acknowledged_and_delivered_v5() {
    qos1_and_qos2_are_acknowledged_and_delivered(MqttVersion::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_while_the_broker_is_down_fails_immediately() {
    init_tracing();
    // Nothing listens on this port.
    let up = spawn(config(
        &format!("mqtt://127.0.0.1:{}", free_port()),
        MqttVersion::V311,
    ));
    assert!(!up.upstream.is_connected());
    // The link status says why, in an operator's words, and counts the attempts.
    let status = up
        .wait_link("a failed attempt", |s| s.failed_attempts >= 1)
        .await;
    assert!(!status.connected);
    assert_eq!(status.connects, 0);
    assert_eq!(status.last_error.as_deref(), Some("connection refused"));
    assert!(status.since_ms > 0);
    assert_eq!(
        up.upstream
            .publish(msg("t", "x", Qos::AtLeastOnce), Some(1)),
        Err(FailReason::Disconnected)
    );
    assert_eq!(
        up.upstream
            .publish(msg("t", "x", Qos::ExactlyOnce), Some(2)),
        Err(FailReason::Disconnected)
    );
    assert_eq!(
        up.upstream.publish(msg("t", "x", Qos::AtMostOnce), None),
        Err(FailReason::Disconnected)
    );
    // Refused for now, not lost: the caller (the spool's drain) still holds them.
    let stats = up.upstream.stats();
    assert_eq!(
        (
            stats.deferred,
            stats.failed,
            stats.dropped_qos0,
            stats.published
        ),
        (3, 0, 0, 0)
    );
    let upstream = up.upstream.clone();
    // A refused publish never produces a report.
    assert!(up.shut_down().await.is_empty());
    assert_eq!(
        upstream.publish(msg("t", "x", Qos::AtLeastOnce), Some(3)),
        Err(FailReason::Shutdown)
    );
}

async fn reconnects_after_broker_restart(version: MqttVersion) {
    init_tracing();
    let mut broker = Broker::start();
    let mut up = spawn(config(&broker.url(), version));
    up.wait_connected(true).await;
    let first = up.wait_link("up", |s| s.connected).await;
    assert_eq!((first.connects, first.failed_attempts), (1, 0), "{first:?}");
    assert_eq!(first.last_error, None);
    assert!(first.since_ms > 0);
    up.upstream
        .publish(msg("before", "1", Qos::AtLeastOnce), Some(1))
        .expect("accepted");
    assert_eq!(
        up.reports(1).await,
        BTreeMap::from([(1, Delivery::Acknowledged)])
    );

    broker.kill();
    up.wait_connected(false).await;
    let down = up.wait_link("down", |s| !s.connected).await;
    assert!(down.last_error.is_some(), "{down:?}");
    if down.failed_attempts == 0 {
        // No reconnect attempt has failed yet: the error is the lost connection's own.
        assert_eq!(
            down.last_error.as_deref(),
            Some("broker closed the connection")
        );
    }
    assert!(down.since_ms >= first.since_ms);
    // Attempts against the dead port fail, each counted, with the reason.
    let retrying = up
        .wait_link("a failed reconnect", |s| s.failed_attempts >= 1)
        .await;
    assert_eq!(retrying.last_error.as_deref(), Some("connection refused"));
    assert_eq!(retrying.connects, 1);
    assert_eq!(
        up.upstream
            .publish(msg("during", "2", Qos::AtLeastOnce), Some(2)),
        Err(FailReason::Disconnected)
    );

    broker.restart();
    up.wait_connected(true).await;
    let again = up.wait_link("up again", |s| s.connected).await;
    assert_eq!(again.connects, 2, "{again:?}");
    assert!(again.since_ms >= down.since_ms);
    let mut observer = Observer::connect(broker.port).await;
    up.upstream
        .publish(msg("after", "3", Qos::AtLeastOnce), Some(3))
        .expect("accepted after reconnect");
    up.upstream
        .publish(msg("after2", "4", Qos::ExactlyOnce), Some(4))
        .expect("accepted after reconnect");
    assert_eq!(
        up.reports(2).await,
        BTreeMap::from([(3, Delivery::Acknowledged), (4, Delivery::Acknowledged)])
    );
    assert_eq!(
        observer.expect(2).await,
        vec![
            ("after".to_owned(), Bytes::from_static(b"3")),
            ("after2".to_owned(), Bytes::from_static(b"4")),
        ]
    );
    assert!(up.upstream.stats().reconnects >= 1);
    assert!(up.shut_down().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_broker_restart_v311() {
    reconnects_after_broker_restart(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_broker_restart_v5() {
    reconnects_after_broker_restart(MqttVersion::V5).await;
}

async fn in_flight_publishes_fail_once_when_the_link_drops(version: MqttVersion) {
    init_tracing();
    let mut broker = Broker::start();
    let mut up = spawn(config(&broker.url(), version));
    up.wait_connected(true).await;

    // A frozen broker keeps the TCP connection but acknowledges nothing.
    broker.pause();
    for token in 0..20 {
        let qos = if token % 2 == 0 {
            Qos::AtLeastOnce
        } else {
            Qos::ExactlyOnce
        };
        up.upstream
            .publish(msg("in-flight", "x", qos), Some(token))
            .expect("accepted while the link looks up");
    }
    broker.kill();

    let reports = up.reports(20).await;
    assert_eq!(reports.len(), 20);
    for (token, delivery) in &reports {
        assert_eq!(
            *delivery,
            Delivery::Failed(FailReason::Disconnected),
            "token {token}"
        );
    }
    // The client keeps reconnecting; nothing further is reported for these tokens.
    let rest = up.shut_down().await;
    assert!(rest.is_empty(), "extra reports: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_publishes_fail_once_when_the_link_drops_v311() {
    in_flight_publishes_fail_once_when_the_link_drops(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_publishes_fail_once_when_the_link_drops_v5() {
    in_flight_publishes_fail_once_when_the_link_drops(MqttVersion::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_refuses_with_queue_full_until_acknowledged() {
    init_tracing();
    let broker = Broker::start();
    let mut cfg = config(&broker.url(), MqttVersion::V311);
    cfg.max_inflight = 2;
    // Keep-alive must not expire while the broker is frozen.
    cfg.keep_alive = Duration::from_secs(60);
    let mut up = spawn(cfg);
    up.wait_connected(true).await;

    broker.pause();
    for token in [1, 2] {
        up.upstream
            .publish(msg("window", "x", Qos::AtLeastOnce), Some(token))
            .expect("within the window");
    }
    assert_eq!(
        up.upstream
            .publish(msg("window", "x", Qos::AtLeastOnce), Some(3)),
        Err(FailReason::QueueFull)
    );
    // QoS 0 does not use the window.
    up.upstream
        .publish(msg("window", "q0", Qos::AtMostOnce), None)
        .expect("QoS 0 bypasses the tracked window");

    broker.resume();
    assert_eq!(
        up.reports(2).await,
        BTreeMap::from([(1, Delivery::Acknowledged), (2, Delivery::Acknowledged)])
    );
    // Reports freed the window.
    up.upstream
        .publish(msg("window", "x", Qos::AtLeastOnce), Some(4))
        .expect("window free again");
    assert_eq!(
        up.reports(1).await,
        BTreeMap::from([(4, Delivery::Acknowledged)])
    );
    let stats = up.upstream.stats();
    // The refusal of a full window is for now (the caller sends again), not a failure.
    assert_eq!(
        (stats.acknowledged, stats.failed, stats.deferred),
        (3, 0, 1)
    );
    assert!(up.shut_down().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_every_open_publish_exactly_once() {
    init_tracing();
    let broker = Broker::start();
    let mut cfg = config(&broker.url(), MqttVersion::V5);
    cfg.keep_alive = Duration::from_secs(60);
    let up = spawn(cfg);
    up.wait_connected(true).await;

    broker.pause();
    for token in 100..105 {
        up.upstream
            .publish(msg("open", "x", Qos::AtLeastOnce), Some(token))
            .expect("accepted");
    }
    let upstream = up.upstream.clone();
    let reports = up.shut_down().await;
    assert_eq!(
        reports,
        (100..105)
            .map(|token| (token, Delivery::Failed(FailReason::Shutdown)))
            .collect::<BTreeMap<_, _>>()
    );
    assert!(!upstream.is_connected());
    assert_eq!(
        upstream.publish(msg("late", "x", Qos::AtLeastOnce), Some(200)),
        Err(FailReason::Shutdown)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_publishes_drain() {
    init_tracing();
    let broker = Broker::start();
    let mut up = spawn(config(&broker.url(), MqttVersion::V311));
    up.wait_connected(true).await;
    for token in 0..50 {
        up.upstream
            .publish(msg("drain", "x", Qos::ExactlyOnce), Some(token))
            .expect("accepted");
    }
    // Whatever was not reported before the shutdown is reported by it, each token once,
    // and with a live broker that means acknowledged.
    let mut all = up.reports(1).await;
    let rest = up.shut_down().await;
    for (token, delivery) in rest {
        assert!(all.insert(token, delivery).is_none(), "token {token} twice");
    }
    assert_eq!(all.len(), 50);
    assert!(
        all.values().all(|d| d.is_acknowledged()),
        "live broker, graceful shutdown: {all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topics_are_rejected_locally() {
    init_tracing();
    let broker = Broker::start();
    let up = spawn(config(&broker.url(), MqttVersion::V5));
    up.wait_connected(true).await;
    assert_eq!(
        up.upstream
            .publish(msg("bad/+/wildcard", "x", Qos::AtLeastOnce), Some(1)),
        Err(FailReason::Rejected)
    );
    let huge = Message {
        topic: "big".into(),
        payload: Bytes::from(vec![0u8; sensorgate_bridges::mqtt::MAX_PUBLISH_BYTES + 1]),
        qos: Qos::AtLeastOnce,
        retain: false,
        origin: Default::default(),
    };
    assert_eq!(
        up.upstream.publish(huge, Some(2)),
        Err(FailReason::Rejected)
    );
    assert!(
        up.upstream.is_connected(),
        "a refused message must not hurt the link"
    );
    // Refused for good: counted as failed, not as deferred.
    let stats = up.upstream.stats();
    assert_eq!((stats.failed, stats.deferred), (2, 0));
    assert!(up.shut_down().await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("the TLS test needs the `openssl` command: {e}"));
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for IP 127.0.0.1 and a client certificate, in `dir`.
fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=test-ca",
        "-days",
        "2",
    ]);
    openssl(dir, &ca);
    for (name, ext) in [
        (
            "server",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
        ),
        (
            "client",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write ext");
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={name}");
        let extfile = format!("{name}.ext");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_the_ring_provider() {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    let path = |name: &str| dir.path().join(name);
    let extra = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        path("ca.pem").display(),
        path("server.pem").display(),
        path("server.key").display()
    );
    let settings = TlsSettings {
        ca_file: Some(path("ca.pem")),
        client_cert: Some(path("client.pem")),
        client_key: Some(path("client.key")),
    };
    // Started as root, mosquitto drops to the `mosquitto` user before loading its key: let it
    // read these throwaway files.
    for entry in std::fs::read_dir(dir.path()).expect("list pki") {
        let entry = entry.expect("pki entry");
        std::fs::set_permissions(entry.path(), Permissions::from_mode(0o644)).expect("chmod");
    }
    std::fs::set_permissions(dir.path(), Permissions::from_mode(0o755)).expect("chmod dir");
    let broker = Broker::start_in(dir, &extra);

    for version in [MqttVersion::V311, MqttVersion::V5] {
        let mut cfg = config(&format!("mqtts://127.0.0.1:{}", broker.port), version);
        cfg.tls = Some(settings.clone());
        let mut up = spawn(cfg);
        up.wait_connected(true).await;
        up.upstream
            .publish(msg("tls", "x", Qos::AtLeastOnce), Some(7))
            .expect("accepted");
        assert_eq!(
            up.reports(1).await,
            BTreeMap::from([(7, Delivery::Acknowledged)])
        );
        assert!(up.shut_down().await.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Volume
// ---------------------------------------------------------------------------------------------

async fn sustained_publishing_reports_every_token_once(version: MqttVersion) {
    init_tracing();
    const N: u64 = 20_000;
    let broker = Broker::start();
    let mut cfg = config(&broker.url(), version);
    cfg.max_inflight = 1_000;
    cfg.request_queue = 1_000;
    let mut up = spawn(cfg);
    up.wait_connected(true).await;

    let started = Instant::now();
    let mut reports = BTreeMap::new();
    let record = |reports: &mut BTreeMap<u64, Delivery>, report: AckReport| {
        assert!(
            reports.insert(report.token, report.delivery).is_none(),
            "token {} twice",
            report.token
        );
    };
    let mut refused = 0u64;
    for token in 0..N {
        loop {
            match up.upstream.publish(
                msg("volume", "0123456789abcdef", Qos::AtLeastOnce),
                Some(token),
            ) {
                Ok(()) => break,
                // The window is full: wait for a report to free a slot (the bounded design's
                // intended backpressure).
                Err(FailReason::QueueFull) => {
                    refused += 1;
                    let report = timeout(EVENT_BOUND, up.acks.recv())
                        .await
                        .expect("a report frees the window")
                        .expect("report channel open");
                    record(&mut reports, report);
                }
                Err(other) => panic!("token {token}: {other:?}"),
            }
        }
    }
    while (reports.len() as u64) < N {
        let Ok(Some(report)) = timeout(EVENT_BOUND, up.acks.recv()).await else {
            panic!("only {} of {N} reports", reports.len());
        };
        record(&mut reports, report);
    }
    let elapsed = started.elapsed();
    assert_eq!(reports.len() as u64, N);
    assert!(reports.values().all(|d| d.is_acknowledged()));
    eprintln!(
        "{version:?}: {N} QoS 1 publishes acknowledged in {elapsed:?} ({:.0}/s), \
         {refused} QueueFull retries",
        N as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(up.upstream.stats().acknowledged, N);
    assert!(up.shut_down().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_publishing_reports_every_token_once_v311() {
    sustained_publishing_reports_every_token_once(MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_publishing_reports_every_token_once_v5() {
    sustained_publishing_reports_every_token_once(MqttVersion::V5).await;
}

// ---------------------------------------------------------------------------------------------
// Downlink: subscriptions and messages from the broker
// ---------------------------------------------------------------------------------------------

/// Publishes with `mosquitto_pub` (an independent client) and returns when it exited.
fn mosquitto_pub(port: u16, topic: &str, payload: &str, qos: u8, retain: bool) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        topic,
        "-m",
        payload,
    ]);
    cmd.args(["-q", &qos.to_string()]);
    if retain {
        cmd.arg("-r");
    }
    let status = cmd
        .status()
        .expect("mosquitto_pub runs (Debian package mosquitto-clients)");
    assert!(status.success(), "mosquitto_pub failed");
}

/// Publishes `topic` until a downlink for it arrives (the SUBSCRIBE is asynchronous), bounded.
async fn publish_until_received(
    port: u16,
    rx: &mut mpsc::Receiver<Downlink>,
    remote_topic: &str,
    payload: &str,
) -> Downlink {
    let deadline = Instant::now() + RECONNECT_BOUND;
    loop {
        assert!(Instant::now() < deadline, "no downlink for {remote_topic}");
        mosquitto_pub(port, remote_topic, payload, 1, false);
        if let Ok(Some(d)) = timeout(Duration::from_secs(1), rx.recv()).await {
            return d;
        }
    }
}

async fn downlink_arrives_with_prefix_stripped_and_survives_restart(version: MqttVersion) {
    init_tracing();
    let mut broker = Broker::start();
    let mut cfg = config(&broker.url(), version);
    cfg.remote_prefix = "site-7/".into();
    let (acks_tx, _acks) = mpsc::channel(16);
    let (dl_tx, mut dl_rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let (upstream, task) =
        MqttUpstream::spawn_with_downlink(5, cfg, acks_tx, Some(dl_tx), shutdown.clone())
            .expect("upstream starts");
    let running_deadline = Instant::now() + RECONNECT_BOUND;
    while !upstream.is_connected() {
        assert!(Instant::now() < running_deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    upstream
        .subscribe("cmd/#", Qos::AtLeastOnce)
        .expect("subscribe");
    let d = publish_until_received(broker.port, &mut dl_rx, "site-7/cmd/x", "one").await;
    assert_eq!(
        (d.upstream, d.topic.as_str(), &d.payload[..], d.qos),
        (5, "cmd/x", &b"one"[..], Qos::AtLeastOnce)
    );
    d.ack.ack();
    // Outside the prefix: not ours (the broker still delivers nothing for it: no subscription).
    // After a broker restart the subscription is made again.
    broker.restart();
    let d = publish_until_received(broker.port, &mut dl_rx, "site-7/cmd/y", "two").await;
    assert_eq!(d.topic, "cmd/y");
    d.ack.ack();
    // Unsubscribed: the marker subscription is made after the UNSUBSCRIBE on the same
    // connection, so once a marker arrives the UNSUBSCRIBE has taken effect; from then on a
    // cmd/ message published before a marker must not arrive before it.
    upstream.unsubscribe("cmd/#").expect("unsubscribe");
    upstream
        .subscribe("marker", Qos::AtMostOnce)
        .expect("subscribe");
    let d = publish_until_received(broker.port, &mut dl_rx, "site-7/marker", "m").await;
    assert_eq!(d.topic, "marker");
    while let Ok(Some(d)) = timeout(Duration::from_millis(1), dl_rx.recv()).await {
        // Markers still in the channel from the retries above.
        assert_eq!(d.topic, "marker");
    }
    mosquitto_pub(broker.port, "site-7/cmd/z", "three", 1, false);
    mosquitto_pub(broker.port, "site-7/marker", "last", 1, false);
    loop {
        let d = timeout(EVENT_BOUND, dl_rx.recv())
            .await
            .expect("a downlink")
            .expect("open");
        assert_ne!(d.topic, "cmd/z", "delivered after unsubscribe");
        if &d.payload[..] == b"last" {
            break;
        }
    }
    assert!(upstream.stats().downlink_received >= 3);
    shutdown.cancel();
    timeout(EVENT_BOUND, task)
        .await
        .expect("stops")
        .expect("no panic");
}

#[tokio::test]
async fn downlink_arrives_with_prefix_stripped_and_survives_restart_v311() {
    downlink_arrives_with_prefix_stripped_and_survives_restart(MqttVersion::V311).await;
}

#[tokio::test]
async fn downlink_arrives_with_prefix_stripped_and_survives_restart_v5() {
    downlink_arrives_with_prefix_stripped_and_survives_restart(MqttVersion::V5).await;
}

#[tokio::test]
async fn retained_messages_arrive_flagged_on_subscribe() {
    init_tracing();
    let broker = Broker::start();
    mosquitto_pub(broker.port, "cfg/a", "retained", 1, true);
    let cfg = config(&broker.url(), MqttVersion::V5);
    let (acks_tx, _acks) = mpsc::channel(16);
    let (dl_tx, mut dl_rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let (upstream, task) =
        MqttUpstream::spawn_with_downlink(0, cfg, acks_tx, Some(dl_tx), shutdown.clone())
            .expect("upstream starts");
    // Subscribing before the connection is up is remembered and made on connect.
    upstream
        .subscribe("cfg/#", Qos::AtLeastOnce)
        .expect("subscribe");
    let d = timeout(RECONNECT_BOUND, dl_rx.recv())
        .await
        .expect("retained arrives")
        .expect("open");
    assert_eq!(
        (d.topic.as_str(), &d.payload[..], d.retain),
        ("cfg/a", &b"retained"[..], true)
    );
    d.ack.ack();
    shutdown.cancel();
    timeout(EVENT_BOUND, task)
        .await
        .expect("stops")
        .expect("no panic");
}
