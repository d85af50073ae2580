//! The store-and-forward load generator shared by the spool test binaries: a [`Fleet`] of QoS 1
//! sensors, one message outstanding each, payload `c<sensor>:<n>:<padding>`, on topic
//! `fleet/<sensor>`; and the check ([`verify`], [`Ledger`]) that every message acknowledged
//! with rc 0 reached the broker, first copies in order per sensor, duplicates counted.

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use sensorgate_tests::Subscriber;
use sensorgate_tests::sn::{self, Packet, Qos, TopicType};

/// A PUBACK that does not come within this long makes the sensor start a new session and
/// send the same message again (counted in [`Tally::timeouts`]).
pub(crate) const STALE: Duration = Duration::from_secs(3);

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
pub(crate) struct Tally {
    /// Per sensor, the numbers acknowledged with rc 0.
    pub(crate) acked: BTreeMap<usize, Vec<u64>>,
    /// PUBACKs with rc 0x01 (congestion).
    pub(crate) congestion: u64,
    /// Sessions started (CONNECT + REGISTER), the first ones included.
    pub(crate) reconnects: u64,
    /// Outstanding messages that got no PUBACK within [`STALE`].
    pub(crate) timeouts: u64,
}

impl Tally {
    /// Records that sensor `index` had `n` acknowledged with rc 0 (for messages published
    /// outside the fleet, in the fleet's payload format, on `fleet/<index>`).
    pub(crate) fn acked(&mut self, index: usize, n: u64) {
        self.acked.entry(index).or_default().push(n);
    }

    /// Messages acknowledged with rc 0 so far.
    pub(crate) fn acked_count(&self) -> usize {
        self.acked.values().map(Vec::len).sum()
    }
}

/// Sends `packet` until a reply satisfying `want` arrives (4 tries of 500 ms).
pub(crate) fn blocking_exchange(
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
            if let Ok(p) = sn::decode(&buf[..n])
                && want(&p)
            {
                socket.set_nonblocking(true).ok()?;
                return Some(p);
            }
        }
    }
    None
}

/// The payload of message `n` of sensor `index`.
pub(crate) fn payload(index: usize, n: u64, pad: usize) -> String {
    format!("c{index}:{n}:{}", ".".repeat(pad))
}

/// The (sensor, n) of a [`payload`].
///
/// # Panics
/// When `payload` is not one.
pub(crate) fn parse_payload(payload: &[u8]) -> (usize, u64) {
    let text = std::str::from_utf8(payload).unwrap();
    let mut parts = text.trim_start_matches('c').split(':');
    let (c, n) = (parts.next().unwrap(), parts.next().unwrap());
    (c.parse().unwrap(), n.parse().unwrap())
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
        let _ = self.socket.send(&sn::publish(
            flags,
            self.topic_id,
            self.msg_id,
            payload(self.index, n, pad).as_bytes(),
        ));
        self.outstanding = Some((self.msg_id, n, Instant::now()));
    }
}

/// Sensors publishing QoS 1 at `rate` msg/s in total, for `run(...)` calls.
pub(crate) struct Fleet {
    sensors: Vec<Sensor>,
    interval: Duration,
    /// Bytes added to each payload.
    pub(crate) pad: usize,
    /// What the sensors saw so far.
    pub(crate) tally: Tally,
}

impl Fleet {
    /// `count` sensors (indices `0..count`), connected and registered.
    ///
    /// # Panics
    /// When a sensor cannot connect.
    pub(crate) fn new(gw: SocketAddr, count: usize, rate: u32) -> Fleet {
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
    pub(crate) fn run(&mut self, duration: Duration) {
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
                                self.tally.acked(s.index, seq);
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
                    .is_some_and(|(_, _, at)| now.duration_since(at) > STALE);
                if stale {
                    self.tally.timeouts += 1;
                }
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

    /// Messages acknowledged with rc 0 so far.
    pub(crate) fn acked_count(&self) -> usize {
        self.tally.acked_count()
    }
}

/// What the observing subscriber received so far, across several [`Ledger::verify`] calls.
#[derive(Default, Debug)]
pub(crate) struct Ledger {
    /// Per sensor, the numbers received.
    seen: HashMap<usize, HashSet<u64>>,
    /// Per sensor, the highest number received (first copies arrive in increasing order).
    last_new: HashMap<usize, u64>,
    /// Copies received of numbers received before.
    pub(crate) duplicates: u64,
}

impl Ledger {
    /// Reads the subscriber until every message of `tally` acknowledged with rc 0 and not
    /// received before has arrived (or `timeout`); checks the order per sensor; returns the
    /// number of duplicates received in this call. Messages of other publishers must use
    /// [`payload`] too.
    ///
    /// # Panics
    /// When a message is missing after `timeout`, or a first copy arrives out of order.
    pub(crate) fn verify(&mut self, sub: &mut Subscriber, tally: &Tally, timeout: Duration) -> u64 {
        let mut missing: HashSet<(usize, u64)> = tally
            .acked
            .iter()
            .flat_map(|(&c, seqs)| seqs.iter().map(move |&s| (c, s)))
            .filter(|(c, s)| !self.seen.get(c).is_some_and(|seen| seen.contains(s)))
            .collect();
        let total = missing.len();
        let before = self.duplicates;
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
            let (c, n) = parse_payload(&m.payload);
            if !self.seen.entry(c).or_default().insert(n) {
                self.duplicates += 1;
                continue;
            }
            // First copies arrive in the order the sensor sent them.
            let last = self.last_new.entry(c).or_insert(0);
            assert!(n > *last, "sensor {c}: {n} arrived after {last}");
            *last = n;
            missing.remove(&(c, n));
        }
        let duplicates = self.duplicates - before;
        eprintln!("all {total} acknowledged messages arrived; {duplicates} duplicates");
        duplicates
    }
}

/// Reads the subscriber until every acknowledged message arrived (or `timeout`); checks the
/// order per sensor; returns the number of duplicates.
pub(crate) fn verify(sub: &mut Subscriber, tally: &Tally, timeout: Duration) -> u64 {
    Ledger::default().verify(sub, tally, timeout)
}
