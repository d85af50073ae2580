//! `AmqpUpstream::reconfigure` against a real RabbitMQ node (the end-to-end tests' private
//! loopback node: its own ports and directory, stopped on drop).
//!
//! - new credentials and vhost (a user and a vhost made with `rabbitmqctl` on the test node):
//!   the connection moves, messages in flight during the switch are all confirmed in the end
//!   (the test plays the drain: a failed one is sent again);
//! - a bad configuration is refused and the link is untouched.
//!
//! Every wait is bounded and polls a condition; no fixed sleep decides a test.

// A test harness: failing loudly is its job, and it reads the wall clock to bound its waits.
#![allow(clippy::expect_used, clippy::disallowed_methods)]

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sensorgate_bridges::amqp::{AmqpConfigError, AmqpUpstream, AmqpUpstreamConfig};
use sensorgate_bridges::message::{Downlink, Message, Qos};
use sensorgate_bridges::telemetry::LinkStatus;
use sensorgate_bridges::upstream::{AckReport, Delivery, Reconfigured};
use sensorgate_tests::RabbitMq;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Bound for a reconnect and anything that waits for one.
const BOUND: Duration = Duration::from_secs(30);

fn msg(i: u64) -> Message {
    Message::new(
        format!("t/{i}"),
        Bytes::from(i.to_string()),
        Qos::AtLeastOnce,
        false,
    )
}

async fn wait_link(
    up: &AmqpUpstream,
    what: &str,
    condition: impl Fn(&LinkStatus) -> bool,
) -> LinkStatus {
    let deadline = Instant::now() + BOUND;
    loop {
        let status = up.link_info().status();
        if condition(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "link not {what} within {BOUND:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends tokens `0..n` until each is confirmed, sending a failed one again (as the drain
/// does); `during` runs once after the first burst. Returns how many were sent again.
async fn send_all(
    up: &AmqpUpstream,
    acks: &mut mpsc::Receiver<AckReport>,
    n: u64,
    during: impl FnOnce(),
) -> usize {
    let mut to_send: VecDeque<u64> = (0..n).collect();
    let mut burst = 0;
    while let Some(&i) = to_send.front() {
        if up.publish_with_seq(msg(i), Some(i), Some(i)).is_err() {
            break;
        }
        to_send.pop_front();
        burst += 1;
    }
    assert!(burst > 0, "the link was up: some were accepted");
    during();
    let mut confirmed = BTreeSet::new();
    let mut resent = 0;
    let deadline = Instant::now() + BOUND;
    while confirmed.len() < usize::try_from(n).expect("small") {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} confirmed",
            confirmed.len()
        );
        while let Some(&i) = to_send.front() {
            if up.publish_with_seq(msg(i), Some(i), Some(i)).is_err() {
                break;
            }
            to_send.pop_front();
        }
        match timeout(Duration::from_millis(50), acks.recv()).await {
            Ok(Some(report)) => match report.delivery {
                Delivery::Acknowledged => {
                    confirmed.insert(report.token);
                }
                Delivery::Failed(reason) => {
                    assert!(reason.is_recoverable(), "{reason:?}");
                    resent += 1;
                    to_send.push_back(report.token);
                }
            },
            Ok(None) => panic!("report channel closed"),
            Err(_) => {}
        }
    }
    resent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_credentials_and_vhost_move_the_connection_and_nothing_confirmed_is_lost() {
    let node = tokio::task::spawn_blocking(RabbitMq::start)
        .await
        .expect("join")
        .expect("rabbitmq starts");
    for args in [
        &["add_user", "bob", "bob-secret"][..],
        &["add_vhost", "site2"],
        &["set_permissions", "-p", "site2", "bob", ".*", ".*", ".*"],
    ] {
        node.ctl(args).expect("rabbitmqctl");
    }
    let mut config = AmqpUpstreamConfig::new("rabbit", node.url());
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(5);
    // Every message is routable (a mandatory publish no queue takes would be returned): the
    // upstream's own downlink queue takes them all (and drops them as its own echoes).
    config.bindings = vec!["#".to_owned()];
    let (acks_tx, mut acks) = mpsc::channel(1024);
    let (downlink_tx, _downlink) = mpsc::channel::<Downlink>(64);
    let stop = CancellationToken::new();
    let (up, task) = AmqpUpstream::spawn_with_downlink(
        0,
        config.clone(),
        acks_tx,
        Some(downlink_tx),
        stop.clone(),
    )
    .expect("starts");
    wait_link(&up, "up", |s| s.connected).await;

    // A bad configuration changes nothing.
    let mut bad = config.clone();
    bad.url = "amqp://127.0.0.1:notaport/".to_owned();
    assert!(matches!(up.reconfigure(bad), Err(AmqpConfigError::Url(_))));
    let mut bad = config.clone();
    bad.max_inflight += 1;
    assert_eq!(
        up.reconfigure(bad),
        Err(AmqpConfigError::RestartRequired("max_inflight"))
    );
    let status = up.link_info().status();
    assert!(status.connected && status.connects == 1, "{status:?}");

    let mut moved = config.clone();
    moved.username = Some("bob".to_owned());
    moved.password = Some("bob-secret".to_owned());
    moved.vhost = Some("site2".to_owned());
    let resent = send_all(&up, &mut acks, 300, || {
        assert_eq!(
            up.reconfigure(moved.clone()),
            Ok(Reconfigured::Reconnecting)
        );
    })
    .await;
    let status = wait_link(&up, "reconnected", |s| s.connected && s.connects == 2).await;
    assert_eq!(
        status.last_error.as_deref(),
        Some("reconfigured: reconnecting")
    );
    let connections = tokio::task::block_in_place(|| {
        node.ctl(&["list_connections", "user", "vhost"])
            .expect("list connections")
    });
    assert!(
        connections
            .lines()
            .any(|l| l.split_whitespace().eq(["bob", "site2"])),
        "the upstream is connected as bob on site2: {connections} ({resent} sent again)"
    );
    assert_eq!(up.reconfigure(moved), Ok(Reconfigured::Unchanged));

    stop.cancel();
    timeout(BOUND, task)
        .await
        .expect("task ends")
        .expect("no panic");
    drop(node);
}
