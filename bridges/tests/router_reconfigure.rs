//! `RouteReconfigurer::set_routes` with a real MQTT upstream on a real broker (mosquitto on a
//! free 127.0.0.1 port, killed by PID on drop): a sensor subscription moves from the old
//! route's upstream filter to the new one's, and downlink follows the new table.
//!
//! Every wait is bounded and polls a condition; no fixed sleep decides a test.

// A test harness: failing loudly is its job, and it reads the wall clock to bound its waits.
#![allow(clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sensorgate_bridges::message::{Downlink, Qos};
use sensorgate_bridges::mqtt::{MqttUpstream, MqttVersion};
use sensorgate_bridges::route::{RouteSpec, RouteTable, SharedRoutes};
use sensorgate_bridges::router::{RoutedUpstream, Router};
use sensorgate_bridges::spool::{
    FsyncPolicy, SharedSpool, Spool, SpoolConfig, StdFs, WhenFull, start_writer,
};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use common::{Broker, EVENT_BOUND, RECONNECT_BOUND, fast_config, init_tracing};

fn table(prefix: &str) -> Arc<RouteTable> {
    let spec = RouteSpec {
        filter: "#".to_owned(),
        upstreams: vec!["up".to_owned()],
        add_prefix: Some(prefix.to_owned()),
        ..RouteSpec::default()
    };
    Arc::new(RouteTable::compile(&[spec], &["up"], "gw").expect("routes compile"))
}

fn publish(broker: &Broker, topic: &str, payload: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-t", topic, "-m", payload, "-q", "1"])
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub {topic}");
}

async fn next(rx: &mut mpsc::Receiver<Downlink>) -> Downlink {
    timeout(EVENT_BOUND, rx.recv())
        .await
        .expect("downlink in time")
        .expect("downlink open")
}

#[tokio::test]
async fn a_subscription_moves_with_the_routes_and_downlink_follows_them() {
    init_tracing();
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let spool_config = SpoolConfig {
        dir: dir.path().join("spool"),
        max_bytes: 1 << 20,
        segment_bytes: 64 << 10,
        min_free_bytes: 0,
        max_age: None,
        when_full: WhenFull::RejectNew,
        fsync: FsyncPolicy::Always,
        memory_tail_bytes: 1 << 20,
        retain_bytes: 0,
    };
    let (spool, _) = Spool::open(StdFs, spool_config, &["up".to_owned()]).expect("spool opens");
    let (appender, _writer) = start_writer(SharedSpool::new(spool), 16).expect("writer starts");

    let stop = CancellationToken::new();
    let (acks, _acks) = mpsc::channel(16);
    let (downlink_tx, downlink_rx) = mpsc::channel(16);
    let (up, task) = MqttUpstream::spawn_with_downlink(
        0,
        fast_config("up", &broker.url(), MqttVersion::V5),
        acks,
        Some(downlink_tx),
        stop.clone(),
    )
    .expect("upstream starts");
    let routes = SharedRoutes::new(table("old/"));
    let router = Router::new(
        appender,
        vec![RoutedUpstream {
            link: up.watch_link(),
            subscriber: Box::new(up.clone()),
        }],
        64,
        routes.clone(),
    );
    let downlink_task = tokio::spawn(router.downlink_router().run(downlink_rx, stop.clone()));
    let (ingress_tx, mut ingress_rx) = mpsc::channel(16);
    let ingress = router.ingress(mpsc::channel(4).0).with_downlink(ingress_tx);

    let granted = |n: u64| {
        let up = up.clone();
        async move {
            let deadline = Instant::now() + RECONNECT_BOUND;
            while up.stats().subscribe_granted < n {
                assert!(Instant::now() < deadline, "no SUBACK #{n}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    ingress
        .subscribe(Instant::now(), "cmd/#", Qos::AtLeastOnce)
        .expect("subscribed");
    granted(1).await;
    publish(&broker, "old/cmd/1", "one");
    let got = next(&mut ingress_rx).await;
    assert_eq!(got.topic, "cmd/1");
    got.ack.ack();

    let change = router.reconfigurer().set_routes(table("new/")).await;
    assert_eq!(
        (
            change.moved,
            change.subscribed,
            change.unsubscribed,
            change.refused
        ),
        (1, 1, 1, 0)
    );
    assert!(
        routes.load().accepts("anything"),
        "the drains' handle sees the new table"
    );
    granted(2).await;
    // In publish order on the one connection: if "old/cmd/2" reached the ingress it would
    // come first.
    publish(&broker, "old/cmd/2", "stale");
    publish(&broker, "new/cmd/3", "three");
    let got = next(&mut ingress_rx).await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("cmd/3", &b"three"[..])
    );
    got.ack.ack();

    stop.cancel();
    timeout(EVENT_BOUND, task)
        .await
        .expect("upstream ends")
        .expect("no panic");
    timeout(EVENT_BOUND, downlink_task)
        .await
        .expect("downlink router ends")
        .expect("no panic");
}
