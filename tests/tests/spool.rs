//! Store-and-forward end to end: sensors keep publishing QoS 1 through broker outages,
//! gateway crashes and a full spool; every message the gateway acknowledged reaches the
//! broker, in order per sensor. Duplicates are allowed (at least once) and reported.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, Packet, Qos, TopicType};
use sensorgate_tests::{Gateway, GatewayConfig, Mosquitto, Subscriber};

/// One sensor of the fleet: QoS 1, one message outstanding, payload `c<i>:<n>`.
struct Sensor {
    index: usize,
    socket: UdpSocket,
    topic_id: u16,
    next: u64,
    msg_id: u16,
    /// The outstanding message: (msg id, n, sent at).
    outstanding: Option<(u16, u64, Instant)>,
    due: Instant,
}

/// What the fleet saw.
#[derive(Default, Debug)]
struct Tally {
    /// Per sensor, the numbers acknowledged with rc 0.
    acked: BTreeMap<usize, Vec<u64>>,
    congestion: u64,
    reconnects: u64,
}

fn blocking_exchange(
    socket: &UdpSocket,
    packet: &[u8],
    want: impl Fn(&Packet) -> bool,
) -> Option<Packet> {
    socket.set_nonblocking(false).ok()?;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut buf = [0u8; 2048];
    for _ in 0..4 {
        socket.send(packet).ok()?;
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            let Ok(n) = socket.recv(&mut buf) else { break };
            if let Ok(p) = sn::decode(&buf[..n]) {
                if want(&p) {
                    socket.set_nonblocking(true).ok()?;
                    return Some(p);
                }
            }
        }
    }
    None
}

impl Sensor {
    fn new(gw: SocketAddr, index: usize) -> Sensor {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(gw).unwrap();
        Sensor {
            index,
            socket,
            topic_id: 0,
            next: 1,
            msg_id: 0,
            outstanding: None,
            due: Instant::now(),
        }
    }

    /// CONNECT and REGISTER; false if the gateway does not answer (yet).
    fn session(&mut self, tally: &mut Tally) -> bool {
        tally.reconnects += 1;
        let id = format!("fleet-{}", self.index);
        let connect = sn::connect(sn::FLAG_CLEAN, 300, id.as_bytes());
        if !matches!(
            blocking_exchange(&self.socket, &connect, |p| matches!(
                p,
                Packet::Connack { .. }
            )),
            Some(Packet::Connack { rc: 0 })
        ) {
            return false;
        }
        let topic = format!("fleet/{}", self.index);
        let reg = sn::register(1, topic.as_bytes());
        match blocking_exchange(&self.socket, &reg, |p| matches!(p, Packet::Regack { .. })) {
            Some(Packet::Regack {
                topic_id, rc: 0, ..
            }) => {
                self.topic_id = topic_id;
                self.outstanding = None;
                true
            }
            _ => false,
        }
    }

    fn send(&mut self, n: u64, dup: bool, pad: usize) {
        self.msg_id = self.msg_id.wrapping_add(1).max(1);
        let flags =
            sn::flags(Qos::One, false, TopicType::Normal) | if dup { sn::FLAG_DUP } else { 0 };
        let payload = format!("c{}:{n}:{}", self.index, ".".repeat(pad));
        let _ = self.socket.send(&sn::publish(
            flags,
            self.topic_id,
            self.msg_id,
            payload.as_bytes(),
        ));
        self.outstanding = Some((self.msg_id, n, Instant::now()));
    }
}

/// Sensors publishing QoS 1 at `rate` msg/s in total, for `run(...)` calls.
struct Fleet {
    sensors: Vec<Sensor>,
    interval: Duration,
    /// Bytes added to each payload.
    pad: usize,
    tally: Tally,
}

impl Fleet {
    fn new(gw: SocketAddr, count: usize, rate: u32) -> Fleet {
        let mut tally = Tally::default();
        let mut sensors: Vec<Sensor> = (0..count).map(|i| Sensor::new(gw, i)).collect();
        for s in &mut sensors {
            assert!(s.session(&mut tally), "sensor {} cannot connect", s.index);
        }
        Fleet {
            sensors,
            interval: Duration::from_secs_f64(count as f64 / f64::from(rate)),
            pad: 0,
            tally,
        }
    }

    /// Publishes for `duration`, then waits up to 20 s for the outstanding acknowledgements.
    /// Bounded in time.
    fn run(&mut self, duration: Duration) {
        let end = Instant::now() + duration;
        let mut buf = [0u8; 2048];
        loop {
            let now = Instant::now();
            let sending = now < end;
            if !sending && self.sensors.iter().all(|s| s.outstanding.is_none()) {
                return;
            }
            if now > end + Duration::from_secs(20) {
                return;
            }
            let mut idle = true;
            for s in &mut self.sensors {
                while let Ok(n) = s.socket.recv(&mut buf) {
                    idle = false;
                    match sn::decode(&buf[..n]) {
                        Ok(Packet::Puback { msg_id, rc, .. }) => {
                            let Some((m, seq, _)) = s.outstanding else {
                                continue;
                            };
                            if m != msg_id {
                                continue;
                            }
                            s.outstanding = None;
                            if rc == sn::RC_ACCEPTED {
                                self.tally.acked.entry(s.index).or_default().push(seq);
                                s.next = seq + 1;
                                s.due = s.due.max(now) + self.interval;
                            } else if rc == sn::RC_CONGESTION {
                                self.tally.congestion += 1;
                                s.due = now + Duration::from_millis(100);
                            } else {
                                s.topic_id = 0;
                            }
                        }
                        Ok(Packet::Disconnect) => s.topic_id = 0,
                        _ => {}
                    }
                }
                // A gateway that lost the session (restart) or stopped answering: a new
                // session, then the same message again.
                let stale = s
                    .outstanding
                    .is_some_and(|(_, _, at)| now.duration_since(at) > Duration::from_secs(3));
                if s.topic_id == 0 || stale {
                    if !s.session(&mut self.tally) {
                        s.topic_id = 0;
                        continue;
                    }
                    s.due = now;
                }
                if s.outstanding.is_none() && sending && s.due <= now {
                    s.send(s.next, false, self.pad);
                    idle = false;
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn acked_count(&self) -> usize {
        self.tally.acked.values().map(Vec::len).sum()
    }
}

/// Reads the subscriber until every acknowledged message arrived (or `timeout`); checks the
/// order per sensor; returns the number of duplicates.
fn verify(sub: &mut Subscriber, tally: &Tally, timeout: Duration) -> u64 {
    let mut missing: HashSet<(usize, u64)> = tally
        .acked
        .iter()
        .flat_map(|(&c, seqs)| seqs.iter().map(move |&s| (c, s)))
        .collect();
    let total = missing.len();
    let mut seen: HashMap<usize, HashSet<u64>> = HashMap::new();
    let mut last_new: HashMap<usize, u64> = HashMap::new();
    let mut duplicates = 0;
    let deadline = Instant::now() + timeout;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = sub.next(left).unwrap() else {
            let mut some: Vec<_> = missing.iter().take(10).collect();
            some.sort();
            panic!(
                "{} of {total} acknowledged messages never arrived, e.g. {some:?}",
                missing.len()
            );
        };
        let text = String::from_utf8(m.payload).unwrap();
        let mut parts = text.trim_start_matches('c').split(':');
        let (c, n) = (parts.next().unwrap(), parts.next().unwrap());
        let (c, n): (usize, u64) = (c.parse().unwrap(), n.parse().unwrap());
        if !seen.entry(c).or_default().insert(n) {
            duplicates += 1;
            continue;
        }
        // First copies arrive in the order the sensor sent them.
        let last = last_new.entry(c).or_insert(0);
        assert!(n > *last, "sensor {c}: {n} arrived after {last}");
        *last = n;
        missing.remove(&(c, n));
    }
    eprintln!("all {total} acknowledged messages arrived; {duplicates} duplicates");
    duplicates
}

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
        let text = String::from_utf8(m.payload).unwrap();
        let mut parts = text.trim_start_matches('c').split(':');
        let (c, n) = (parts.next().unwrap(), parts.next().unwrap());
        want.remove(&(c.parse().unwrap(), n.parse().unwrap()));
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
