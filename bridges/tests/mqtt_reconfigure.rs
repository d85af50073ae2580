//! `MqttUpstream::reconfigure` against real brokers: mosquitto child processes on free
//! 127.0.0.1 ports (each test its own), killed by PID on drop.
//!
//! - new credentials: the old user removed from mosquitto's password file (re-read on
//!   SIGHUP), the new one works after the reconfigure;
//! - a new URL: the link moves to a second broker, messages in flight during the switch all
//!   arrive (at least once, over both brokers), the subscriptions are made again there;
//! - a bad configuration is refused and the link is untouched.
//!
//! Every wait is bounded and polls a condition; no fixed sleep decides a test.

// A test harness: failing loudly is its job, and it reads the wall clock to bound its waits.
#![allow(clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc_v5 as v5;
use sensorgate_bridges::message::{Downlink, Message, Qos};
use sensorgate_bridges::mqtt::{
    AckReport, Delivery, MqttUpstream, MqttUpstreamConfig, MqttVersion, Reconfigured, SetupError,
    TlsSettings,
};
use sensorgate_bridges::telemetry::LinkStatus;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use common::{Broker, EVENT_BOUND, Observer, RECONNECT_BOUND, fast_config, init_tracing, unique};

/// A running upstream with its report and downlink channels.
struct Running {
    upstream: MqttUpstream,
    acks: mpsc::Receiver<AckReport>,
    downlink: mpsc::Receiver<Downlink>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn spawn(config: MqttUpstreamConfig) -> Running {
    let (tx, acks) = mpsc::channel(1024);
    let (downlink_tx, downlink) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let (upstream, task) =
        MqttUpstream::spawn_with_downlink(0, config, tx, Some(downlink_tx), shutdown.clone())
            .expect("upstream starts");
    Running {
        upstream,
        acks,
        downlink,
        shutdown,
        task,
    }
}

impl Running {
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

    /// Publishes one tracked QoS 1 message and expects it acknowledged.
    async fn publish_acked(&mut self, topic: &str, token: u64) {
        self.upstream
            .publish(msg(topic, "x"), Some(token))
            .expect("accepted while connected");
        let report = timeout(EVENT_BOUND, self.acks.recv())
            .await
            .expect("report in time")
            .expect("report channel open");
        assert_eq!(
            (report.token, report.delivery),
            (token, Delivery::Acknowledged)
        );
    }

    async fn shut_down(self) {
        self.shutdown.cancel();
        timeout(EVENT_BOUND, self.task)
            .await
            .expect("upstream task ends after shutdown")
            .expect("upstream task did not panic");
    }
}

fn msg(topic: &str, payload: &str) -> Message {
    Message::new(
        topic,
        Bytes::from(payload.to_owned()),
        Qos::AtLeastOnce,
        false,
    )
}

fn config(url: &str, version: MqttVersion) -> MqttUpstreamConfig {
    let mut config = fast_config("reconf", url, version);
    config.max_inflight = 64;
    config.request_queue = 256;
    config
}

/// Writes mosquitto's password file with `users` (name, password).
fn write_password_file(path: &Path, users: &[(&str, &str)]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, "").expect("create password file");
    for (user, password) in users {
        let status = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg(path)
            .arg(user)
            .arg(password)
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd failed");
    }
}

/// Whether an independent MQTT 5 client can connect to `port` as `user`.
async fn connects_as(port: u16, user: &str, password: &str) -> bool {
    let mut options = v5::MqttOptions::new(unique("probe"), ("127.0.0.1", port));
    options.set_credentials(user, Bytes::from(password.to_owned()));
    let (_client, mut eventloop) = v5::AsyncClient::builder(options).capacity(4).build();
    let outcome = timeout(EVENT_BOUND, async {
        loop {
            match eventloop.poll().await {
                Ok(v5::Event::Incoming(v5::Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    outcome.unwrap_or(false)
}

/// Waits (bounded) until `condition` holds.
async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + RECONNECT_BOUND;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {RECONNECT_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn new_credentials_take_effect_and_the_old_user_may_be_removed() {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let passwords: PathBuf = dir.path().join("passwords");
    write_password_file(&passwords, &[("alice", "a-secret"), ("bob", "b-secret")]);
    // `user root`: started as root, mosquitto would drop to a user that cannot read the
    // private temporary directory.
    let extra = format!(
        "allow_anonymous false\npassword_file {}\nuser root\n",
        passwords.display()
    );
    let broker = Broker::start_in(dir, &extra);

    for version in [MqttVersion::V311, MqttVersion::V5] {
        write_password_file(&passwords, &[("alice", "a-secret"), ("bob", "b-secret")]);
        common::signal(broker.pid(), "-HUP");
        eventually("alice is accepted again", async || {
            connects_as(broker.port, "alice", "a-secret").await
        })
        .await;
        let mut cfg = config(&broker.url(), version);
        cfg.username = Some("alice".to_owned());
        cfg.password = Some("a-secret".to_owned());
        let mut up = spawn(cfg.clone());
        up.wait_link("up", |s| s.connected).await;
        up.publish_acked("as/alice", 1).await;

        // The old user goes: mosquitto drops its connection on the reload, and the upstream
        // keeps failing to reconnect as alice.
        write_password_file(&passwords, &[("bob", "b-secret")]);
        common::signal(broker.pid(), "-HUP");
        eventually("alice is refused", async || {
            !connects_as(broker.port, "alice", "a-secret").await
        })
        .await;

        cfg.username = Some("bob".to_owned());
        cfg.password = Some("b-secret".to_owned());
        assert_eq!(
            up.upstream.reconfigure(cfg.clone()).expect("accepted"),
            Reconfigured::Reconnecting
        );
        // A second connection, as bob (alice is refused now).
        up.wait_link("reconnected", |s| s.connects == 2 && s.connected)
            .await;
        up.publish_acked("as/bob", 2).await;
        assert_eq!(
            up.upstream.reconfigure(cfg).expect("accepted"),
            Reconfigured::Unchanged,
            "the same settings again change nothing"
        );
        up.shut_down().await;
    }
}

#[tokio::test]
async fn a_new_url_moves_the_link_and_every_message_in_flight_arrives() {
    init_tracing();
    const N: u64 = 400;
    let first = Broker::start();
    let second = Broker::start();
    let mut seen_first = Observer::connect(first.port).await;
    let mut seen_second = Observer::connect(second.port).await;
    let cfg = config(&first.url(), MqttVersion::V5);
    let mut up = spawn(cfg.clone());
    up.upstream
        .subscribe("cmd/#", Qos::AtLeastOnce)
        .expect("subscribe");
    up.wait_link("up", |s| s.connected).await;
    eventually("subscribed on the first broker", async || {
        up.upstream.stats().subscribe_granted >= 1
    })
    .await;

    // A burst, then the switch while much of it is still in flight. The loop below plays
    // the drain: a failed message is sent again once the link is back.
    let mut to_send: VecDeque<u64> = (0..N).collect();
    let mut sent_before = 0;
    while let Some(&i) = to_send.front() {
        if up
            .upstream
            .publish(msg(&format!("t/{i}"), &i.to_string()), Some(i))
            .is_err()
        {
            break;
        }
        to_send.pop_front();
        sent_before += 1;
    }
    assert!(sent_before > 0);
    let mut moved = cfg.clone();
    moved.port = second.port;
    assert_eq!(
        up.upstream.reconfigure(moved).expect("accepted"),
        Reconfigured::Reconnecting
    );

    let mut acknowledged = BTreeSet::new();
    let mut failed = 0;
    let deadline = Instant::now() + RECONNECT_BOUND;
    while acknowledged.len() < usize::try_from(N).expect("small") {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} acknowledged",
            acknowledged.len()
        );
        while let Some(&i) = to_send.front() {
            if up
                .upstream
                .publish(msg(&format!("t/{i}"), &i.to_string()), Some(i))
                .is_err()
            {
                break;
            }
            to_send.pop_front();
        }
        match timeout(Duration::from_millis(50), up.acks.recv()).await {
            Ok(Some(report)) => match report.delivery {
                Delivery::Acknowledged => {
                    acknowledged.insert(report.token);
                }
                Delivery::Failed(reason) => {
                    assert!(reason.is_recoverable(), "{reason:?}");
                    failed += 1;
                    to_send.push_back(report.token);
                }
            },
            Ok(None) => panic!("report channel closed"),
            Err(_) => {}
        }
    }
    let status = up.wait_link("on the second broker", |s| s.connected).await;
    assert_eq!(status.connects, 2, "{status:?}");
    assert_eq!(
        status.last_error.as_deref(),
        Some("reconfigured: reconnecting"),
        "the link status shows why it reconnected"
    );

    // Every message reached one broker or the other (a failed one may have reached both).
    let mut arrived = BTreeSet::new();
    for observer in [&mut seen_first, &mut seen_second] {
        while let Some(item) = observer.next_within(Duration::from_millis(500)).await {
            if let Some(i) = item.topic.strip_prefix("t/") {
                arrived.insert(i.parse::<u64>().expect("number"));
            }
        }
    }
    let missing: Vec<u64> = (0..N).filter(|i| !arrived.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "never arrived: {missing:?} ({failed} resent)"
    );

    // The subscription was made again on the new connection: downlink from the second broker.
    eventually("subscribed on the second broker", async || {
        up.upstream.stats().subscribe_granted >= 2
    })
    .await;
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &second.port.to_string()])
        .args(["-t", "cmd/1", "-m", "go", "-q", "1"])
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success());
    let downlink = timeout(EVENT_BOUND, up.downlink.recv())
        .await
        .expect("downlink in time")
        .expect("downlink open");
    assert_eq!(downlink.topic, "cmd/1");
    downlink.ack.ack();
    up.shut_down().await;
}

#[tokio::test]
async fn a_bad_configuration_is_refused_and_the_link_is_untouched() {
    init_tracing();
    let broker = Broker::start();
    let cfg = config(&broker.url(), MqttVersion::V5);
    let mut up = spawn(cfg.clone());
    up.wait_link("up", |s| s.connected).await;

    let mut missing_ca = cfg.clone();
    missing_ca.tls = Some(TlsSettings {
        ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
        ..TlsSettings::default()
    });
    assert!(matches!(
        up.upstream.reconfigure(missing_ca),
        Err(SetupError::PemFile { .. })
    ));
    let mut bad_keep_alive = cfg.clone();
    bad_keep_alive.keep_alive = Duration::from_millis(1500);
    bad_keep_alive.port = 1;
    assert!(matches!(
        up.upstream.reconfigure(bad_keep_alive),
        Err(SetupError::InvalidConfig {
            field: "keep_alive",
            ..
        })
    ));
    let mut bigger_window = cfg.clone();
    bigger_window.max_inflight += 1;
    bigger_window.port = 1;
    assert!(matches!(
        up.upstream.reconfigure(bigger_window),
        Err(SetupError::RestartRequired {
            field: "max_inflight"
        })
    ));
    // In place: no reconnect.
    let mut slower = cfg.clone();
    slower.backoff_max = Duration::from_secs(5);
    slower.subscribe_retry = Duration::from_secs(5);
    // A lower subscription bound: applies to new filters, drops none.
    up.upstream
        .subscribe("held", Qos::AtLeastOnce)
        .expect("subscribe");
    slower.max_subscriptions = 1;
    assert_eq!(
        up.upstream.reconfigure(slower.clone()).expect("accepted"),
        Reconfigured::Applied
    );

    assert!(
        up.upstream.subscribe("new", Qos::AtLeastOnce).is_err(),
        "over the new bound"
    );
    up.upstream
        .subscribe("held", Qos::AtMostOnce)
        .expect("a held filter stays and may change");
    up.publish_acked("still/up", 9).await;
    let status = up.upstream.link_info().status();
    assert!(status.connected, "{status:?}");
    assert_eq!(status.connects, 1, "never reconnected: {status:?}");
    assert_eq!(status.last_error, None);
    // What was refused did not become the reference: the same in-place config is unchanged.
    assert_eq!(
        up.upstream.reconfigure(slower).expect("accepted"),
        Reconfigured::Unchanged
    );
    up.shut_down().await;
}
