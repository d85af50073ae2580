//! Store-and-forward end to end: sensors keep publishing QoS 1 through broker outages,
//! gateway crashes and a full spool; every message the gateway acknowledged reaches the
//! broker, in order per sensor. Duplicates are allowed (at least once) and reported.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sensorgate_tests::{Gateway, GatewayConfig, Mosquitto, Subscriber};

use common::{Fleet, parse_payload, verify};

fn gateway(broker_port: u16, spool: &str) -> Gateway {
    let mut cfg = GatewayConfig::new(broker_port).unwrap();
    cfg.log_level = "info".into();
    cfg.extra_sections.push_str(spool);
    Gateway::start(&cfg).unwrap()
}

#[test]
fn broker_outage_of_30s_loses_nothing_acknowledged() {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let mut sub = Subscriber::start_session(broker.port(), &["fleet/#"], "fleet-observer").unwrap();
    let gw = gateway(broker.port(), "");
    let mut fleet = Fleet::new(gw.sn_addr(), 100, 1000);
    fleet.run(Duration::from_secs(3));
    broker.stop().unwrap();
    let before = fleet.acked_count();
    fleet.run(Duration::from_secs(30));
    let during = fleet.acked_count() - before;
    // Sensors kept being served while the broker was away.
    assert!(
        during > 10_000,
        "only {during} messages acknowledged during the outage"
    );
    broker.restart().unwrap();
    fleet.run(Duration::from_secs(3));
    eprintln!(
        "acknowledged {} ({during} during the outage), congestion answers {}, sessions {}",
        fleet.acked_count(),
        fleet.tally.congestion,
        fleet.tally.reconnects
    );
    verify(&mut sub, &fleet.tally, Duration::from_secs(120));
}

#[test]
fn kill_9_five_times_during_load_loses_nothing_acknowledged() {
    let broker = Mosquitto::start().unwrap();
    let mut sub = Subscriber::start_full(broker.port(), &["fleet/#"], "5", 1).unwrap();
    let mut gw = gateway(broker.port(), "");
    let mut fleet = Fleet::new(gw.sn_addr(), 20, 1000);
    for _ in 0..5 {
        fleet.run(Duration::from_secs(2));
        gw.kill9().unwrap();
        gw.restart().unwrap();
    }
    fleet.run(Duration::from_secs(2));
    assert!(
        fleet.acked_count() > 2000,
        "only {} acknowledged",
        fleet.acked_count()
    );
    verify(&mut sub, &fleet.tally, Duration::from_secs(120));
}

#[test]
fn a_full_spool_gives_congestion_loses_nothing_and_drains() {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let mut sub = Subscriber::start_session(broker.port(), &["fleet/#"], "full-observer").unwrap();
    let gw = gateway(
        broker.port(),
        "\n[spool]\nmax_bytes = \"1MiB\"\nsegment_bytes = \"64KiB\"\n",
    );
    let mut fleet = Fleet::new(gw.sn_addr(), 20, 2000);
    fleet.pad = 200;
    broker.stop().unwrap();
    fleet.run(Duration::from_secs(10));
    assert!(fleet.tally.congestion > 0, "the 1 MiB spool never filled");
    let accepted = fleet.acked_count();
    assert!(accepted > 1000, "only {accepted} accepted");
    broker.restart().unwrap();
    verify(&mut sub, &fleet.tally, Duration::from_secs(60));
    // Room again once drained: new messages are accepted.
    let congestion = fleet.tally.congestion;
    fleet.run(Duration::from_secs(2));
    assert!(fleet.acked_count() > accepted);
    eprintln!("congestion answers while full: {congestion}");
}

#[test]
fn drop_oldest_keeps_accepting_and_forwards_the_newest() {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let mut sub = Subscriber::start_session(broker.port(), &["fleet/#"], "drop-observer").unwrap();
    let gw = gateway(
        broker.port(),
        "\n[spool]\nmax_bytes = \"1MiB\"\nsegment_bytes = \"64KiB\"\nwhen_full = \"drop_oldest\"\n",
    );
    let mut fleet = Fleet::new(gw.sn_addr(), 20, 2000);
    fleet.pad = 200;
    broker.stop().unwrap();
    fleet.run(Duration::from_secs(10));
    assert_eq!(fleet.tally.congestion, 0, "drop_oldest never refuses");
    let newest: Vec<(usize, u64)> = fleet
        .tally
        .acked
        .iter()
        .map(|(&c, seqs)| (c, *seqs.last().unwrap()))
        .collect();
    broker.restart().unwrap();
    // The newest message of every sensor arrives; older ones may have been dropped.
    let mut want: HashSet<(usize, u64)> = newest.into_iter().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut received = 0;
    while !want.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = sub
            .next(left)
            .unwrap()
            .expect("newest messages did not all arrive");
        received += 1;
        want.remove(&parse_payload(&m.payload));
    }
    assert!(
        received < fleet.acked_count(),
        "nothing was dropped: {received}"
    );
    eprintln!("accepted {}, received {received}", fleet.acked_count());
}

#[test]
fn a_second_gateway_on_the_same_state_dir_refuses_to_start() {
    let broker = Mosquitto::start().unwrap();
    let gw = gateway(broker.port(), "");
    let text = std::fs::read_to_string(gw.dir().join("sensorgate.toml")).unwrap();
    // Same state dir, another UDP port.
    let port = sensorgate_tests::free_udp_port("127.0.0.1".parse().unwrap()).unwrap();
    let text = text.replace(&gw.sn_addr().to_string(), &format!("127.0.0.1:{port}"));
    let conf = gw.dir().join("second.toml");
    std::fs::write(&conf, text).unwrap();
    let out = sensorgate_tests::run_bounded(
        std::process::Command::new(sensorgate_tests::sensorgate_bin())
            .arg("run")
            .arg("-c")
            .arg(&conf),
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another sensorgate"), "{stderr}");
}
