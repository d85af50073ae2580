//! SIGTERM, the way systemd stops the daemon: the real binary, real mosquitto, several
//! independent MQTT-SN clients with QoS 1 messages in flight.
//!
//! - Every message the gateway acknowledged (PUBACK rc 0) reaches the broker: before the
//!   stop, or from the spool after a restart. The exit status is 0, the exit comes within a
//!   bounded grace, and `STOPPING=1` was sent first.
//! - SIGTERM while the broker is down: the spooled backlog is kept and forwarded by the
//!   next start.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeSet, HashMap};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sensorgate_tests::notify::NotifySocket;
use sensorgate_tests::sn::{self, Packet, Qos, TopicType};
use sensorgate_tests::{
    Gateway, GatewayConfig, LaunchOptions, Mosquitto, READY_TIMEOUT, SnClient, Subscriber,
    poll_until, send_signal,
};

/// Clients publishing at once.
const CLIENTS: usize = 4;
/// QoS 1 PUBLISHes each client keeps unacknowledged.
const WINDOW: usize = 8;
/// Acknowledged messages per client before the SIGTERM.
const BEFORE_TERM: usize = 20;
/// The bound on the exit after SIGTERM: generous (the shutdown's steps each have their own
/// grace; a healthy stop takes well under a second).
const EXIT_BOUND: Duration = Duration::from_secs(30);
/// How long the messages may take to reach the broker's subscriber.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(60);

fn start_gateway(broker: &Mosquitto, notify: &NotifySocket) -> Gateway {
    let config = GatewayConfig::new(broker.port()).unwrap();
    Gateway::start_with(
        &config,
        LaunchOptions {
            env: notify.env(),
            ..LaunchOptions::default()
        },
    )
    .unwrap()
}

/// Sends SIGTERM and waits for the exit; returns the status and how long it took.
fn terminate(gw: &mut Gateway) -> (ExitStatus, Duration) {
    let pid = gw.pid().unwrap();
    let sent = Instant::now();
    send_signal(pid, "TERM").unwrap();
    let status = poll_until(
        "the gateway to exit after SIGTERM",
        EXIT_BOUND * 2,
        Duration::from_millis(20),
        || gw.exited(),
    )
    .unwrap();
    (status, sent.elapsed())
}

/// Publishes QoS 1 messages `<id>-<n>` keeping [`WINDOW`] unacknowledged, until `stop` and
/// the gateway fell silent; returns the payloads acknowledged with rc 0 and how many were
/// left unanswered (in flight when the gateway stopped).
fn pump(
    mut client: SnClient,
    id: &str,
    topic_id: u16,
    acked_count: &AtomicUsize,
    stop: &AtomicBool,
) -> (Vec<String>, usize) {
    let mut outstanding: HashMap<u16, String> = HashMap::new();
    let mut acked = Vec::new();
    let mut n = 0u64;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while !stopping && outstanding.len() < WINDOW {
            let payload = format!("{id}-{n}");
            n += 1;
            let msg_id = client
                .publish(
                    Qos::One,
                    TopicType::Normal,
                    topic_id,
                    false,
                    payload.as_bytes(),
                )
                .unwrap();
            outstanding.insert(msg_id, payload);
        }
        match client.recv(Duration::from_millis(500)).unwrap() {
            Some(Packet::Puback { msg_id, rc, .. }) => {
                if let Some(payload) = outstanding.remove(&msg_id) {
                    // Another rc (congestion while stopping) is a refusal: not ours to check.
                    if rc == sn::RC_ACCEPTED {
                        acked.push(payload);
                        acked_count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Some(_) => {}
            // The gateway is gone and the test said so: nothing more will come.
            None if stopping => return (acked, outstanding.len()),
            None => {}
        }
    }
}

/// Waits until `sub` has seen every payload of `want` (duplicates allowed).
fn await_all(sub: &mut Subscriber, want: &BTreeSet<String>) {
    let mut missing = want.clone();
    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{} acknowledged messages never reached the broker: {:?}",
            missing.len(),
            missing.iter().take(20).collect::<Vec<_>>()
        );
        if let Some(m) = sub.next(left).unwrap() {
            missing.remove(&String::from_utf8_lossy(&m.payload).into_owned());
        }
    }
}

#[test]
fn sigterm_with_qos1_in_flight_loses_nothing_acknowledged() {
    let broker = Mosquitto::start().unwrap();
    let mut sub = Subscriber::start_full(broker.port(), &["term/#"], "5", 1).unwrap();
    let mut notify = NotifySocket::start().unwrap();
    let mut gw = start_gateway(&broker, &notify);
    notify
        .expect("READY=1", READY_TIMEOUT, |n| n.has("READY", "1"))
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicUsize>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let pumps: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let id = format!("term-{i}");
            let mut client = SnClient::new(gw.sn_addr()).unwrap();
            client.connect_ok(&id).unwrap();
            let topic_id = client.register(&format!("term/{id}")).unwrap();
            let stop = Arc::clone(&stop);
            let count = Arc::clone(&counts[i]);
            std::thread::spawn(move || pump(client, &id, topic_id, &count, &stop))
        })
        .collect();
    poll_until(
        "every client to have messages acknowledged",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || {
            assert!(gw.is_running(), "gateway exited:\n{}", gw.log());
            Ok(counts
                .iter()
                .all(|c| c.load(Ordering::Relaxed) >= BEFORE_TERM)
                .then_some(()))
        },
    )
    .unwrap();

    // The clients go on publishing through the SIGTERM.
    let (status, took) = terminate(&mut gw);
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    let mut unanswered = 0;
    for pump in pumps {
        let (mine, left) = pump.join().unwrap();
        acked.extend(mine);
        unanswered += left;
    }
    // The stop really cut through traffic: some publishes were never answered.
    assert!(unanswered > 0, "nothing was in flight at the SIGTERM");
    assert!(status.success(), "exit {status}:\n{}", gw.log());
    assert!(took < EXIT_BOUND, "exit took {took:?}");
    let stopping = notify
        .expect("STOPPING=1", Duration::from_secs(5), |n| {
            n.has("STOPPING", "1")
        })
        .unwrap();
    assert_eq!(stopping.get("STATUS"), Some("stopping"));
    assert!(acked.len() >= CLIENTS * BEFORE_TERM);

    // What was spooled but not yet forwarded goes out after a restart.
    gw.restart().unwrap();
    await_all(&mut sub, &acked);
    let (status, _) = terminate(&mut gw);
    assert!(status.success(), "exit {status}:\n{}", gw.log());
}

#[test]
fn sigterm_while_the_broker_is_down_keeps_the_backlog_for_the_next_start() {
    let mut broker = Mosquitto::start().unwrap();
    let mut notify = NotifySocket::start().unwrap();
    let mut gw = start_gateway(&broker, &notify);
    let mut client = SnClient::new(gw.sn_addr()).unwrap();
    client.connect_ok("term-down").unwrap();
    let topic_id = client.register("term/down").unwrap();
    broker.stop().unwrap();
    let mut want = BTreeSet::new();
    for n in 0..20 {
        let payload = format!("down-{n}");
        client
            .publish_qos1_ok(TopicType::Normal, topic_id, payload.as_bytes())
            .unwrap();
        want.insert(payload);
    }
    let (status, took) = terminate(&mut gw);
    assert!(status.success(), "exit {status}:\n{}", gw.log());
    assert!(took < EXIT_BOUND, "exit took {took:?}");
    notify
        .expect("STOPPING=1", Duration::from_secs(5), |n| {
            n.has("STOPPING", "1")
        })
        .unwrap();

    broker.restart().unwrap();
    let mut sub = Subscriber::start_full(broker.port(), &["term/#"], "5", 1).unwrap();
    gw.restart().unwrap();
    assert!(
        gw.log().contains("Spooled messages to forward."),
        "the restart found no backlog:\n{}",
        gw.log()
    );
    await_all(&mut sub, &want);
    let (status, _) = terminate(&mut gw);
    assert!(status.success(), "exit {status}:\n{}", gw.log());
}
