//! Load: 1,000 distinct clients, each on its own UDP socket (its own source port), CONNECT,
//! REGISTER and PUBLISH QoS 1 at the same time from a few threads. Every PUBACK must be rc 0 and
//! the broker must deliver all 1,000 distinct messages.
//!
//! Like real MQTT-SN clients (6.13), the senders retransmit a request that got no reply; a
//! retransmitted PUBLISH carries the DUP flag. Retransmissions are counted and printed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use sensorgate_tests::Rig;
use sensorgate_tests::sn::{self, Packet, Qos, TopicType};

const CLIENTS: usize = 1_000;
const THREADS: usize = 4;
const TEST_BUDGET: Duration = Duration::from_secs(60);
/// How long one round waits for replies before retransmitting.
const ROUND: Duration = Duration::from_secs(3);
const MAX_ROUNDS: usize = 5;

struct Client {
    sock: UdpSocket,
    index: usize,
    topic_id: u16,
}

/// Sends `request(client, retransmission)` to every client, collects one reply each with
/// `accept` (which returns an error for a wrong reply), retransmitting to the silent ones.
fn exchange(
    gw: SocketAddr,
    clients: &mut [Client],
    what: &str,
    request: impl Fn(&Client, bool) -> Vec<u8>,
    mut accept: impl FnMut(&mut Client, Packet) -> Result<bool, String>,
) -> usize {
    let mut pending: Vec<usize> = (0..clients.len()).collect();
    let mut retransmissions = 0;
    let mut buf = vec![0u8; 2048];
    for round in 0..MAX_ROUNDS {
        for &i in &pending {
            clients[i]
                .sock
                .send_to(&request(&clients[i], round > 0), gw)
                .unwrap();
        }
        if round > 0 {
            retransmissions += pending.len();
        }
        let deadline = Instant::now() + ROUND;
        while !pending.is_empty() && Instant::now() < deadline {
            let mut still = Vec::with_capacity(pending.len());
            for &i in &pending {
                let mut done = false;
                // Drain everything queued on this socket (stale duplicates included).
                for _ in 0..8 {
                    match clients[i].sock.recv_from(&mut buf) {
                        Ok((n, _)) => {
                            let p = sn::decode(&buf[..n]).unwrap();
                            match accept(&mut clients[i], p) {
                                Ok(true) => done = true,
                                Ok(false) => {}
                                Err(e) => panic!("{what}, client {}: {e}", clients[i].index),
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("recv: {e}"),
                    }
                }
                if !done {
                    still.push(i);
                }
            }
            pending = still;
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if pending.is_empty() {
            return retransmissions;
        }
    }
    let ids: Vec<usize> = pending.iter().take(20).map(|&i| clients[i].index).collect();
    panic!(
        "{what}: {} clients got no reply after {MAX_ROUNDS} rounds of {ROUND:?} (first: {ids:?})",
        pending.len()
    );
}

fn run_clients(gw: SocketAddr, indices: std::ops::Range<usize>) -> [usize; 3] {
    let mut clients: Vec<Client> = indices
        .map(|index| {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_nonblocking(true).unwrap();
            Client {
                sock,
                index,
                topic_id: 0,
            }
        })
        .collect();
    let connects = exchange(
        gw,
        &mut clients,
        "CONNECT",
        |c, _| {
            sn::connect(
                sn::FLAG_CLEAN,
                300,
                format!("load-{:04}", c.index).as_bytes(),
            )
        },
        |_, p| match p {
            Packet::Connack { rc: 0 } => Ok(true),
            p => Err(format!("expected CONNACK rc 0, got {p:?}")),
        },
    );
    let registers = exchange(
        gw,
        &mut clients,
        "REGISTER",
        |c, _| sn::register(1, format!("load/{:04}", c.index).as_bytes()),
        |c, p| match p {
            Packet::Regack {
                msg_id: 1,
                rc: 0,
                topic_id,
            } => {
                if c.topic_id != 0 && c.topic_id != topic_id {
                    return Err(format!("REGACK ids differ: {} then {topic_id}", c.topic_id));
                }
                c.topic_id = topic_id;
                Ok(true)
            }
            p => Err(format!("expected REGACK msg id 1 rc 0, got {p:?}")),
        },
    );
    let publishes = exchange(
        gw,
        &mut clients,
        "PUBLISH",
        |c, dup| {
            let flags =
                sn::flags(Qos::One, false, TopicType::Normal) | if dup { sn::FLAG_DUP } else { 0 };
            sn::publish(
                flags,
                c.topic_id,
                2,
                format!("msg-{:04}", c.index).as_bytes(),
            )
        },
        |c, p| match p {
            Packet::Puback {
                msg_id: 2,
                rc: 0,
                topic_id,
            } if topic_id == c.topic_id => Ok(true),
            // A late REGACK for a retransmitted REGISTER.
            Packet::Regack { msg_id: 1, .. } => Ok(false),
            p => Err(format!(
                "expected PUBACK(topic {}, msg id 2, rc 0), got {p:?}",
                c.topic_id
            )),
        },
    );
    [connects, registers, publishes]
}

#[test]
fn thousand_clients_connect_register_and_publish_qos1() {
    let started = Instant::now();
    let rig = Rig::start_with(|cfg| {
        // Per-packet debug logging of 3,000 exchanges would measure the logger.
        cfg.log_level = "info".into();
        Ok(())
    })
    .unwrap();
    let mut sub = rig.subscribe(&["load/#"]).unwrap();
    let gw = rig.gateway.sn_addr();

    let per_thread = CLIENTS / THREADS;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| std::thread::spawn(move || run_clients(gw, t * per_thread..(t + 1) * per_thread)))
        .collect();
    let mut retrans = [0usize; 3];
    for h in handles {
        let r = h.join().expect("client thread panicked");
        for (total, n) in retrans.iter_mut().zip(r) {
            *total += n;
        }
    }
    eprintln!(
        "all {CLIENTS} PUBACKs after {:?}; retransmissions: CONNECT {}, REGISTER {}, PUBLISH {}",
        started.elapsed(),
        retrans[0],
        retrans[1],
        retrans[2]
    );

    let left = TEST_BUDGET.saturating_sub(started.elapsed());
    let mut by_topic: HashMap<String, usize> = HashMap::new();
    let mut payloads = BTreeSet::new();
    let mut received = 0usize;
    // Duplicates (QoS 1 redelivery after a retransmission) are legal; collect until every
    // distinct message is in, bounded by count and by the test budget.
    let deadline = Instant::now() + left;
    while payloads.len() < CLIENTS && received < 3 * CLIENTS {
        let wait = deadline.saturating_duration_since(Instant::now());
        let Some(m) = sub.next(wait).unwrap() else {
            panic!(
                "broker delivered only {} of {CLIENTS} distinct messages within {TEST_BUDGET:?}",
                payloads.len()
            );
        };
        received += 1;
        assert_eq!(m.qos, 1, "{m:?}");
        let index = m.topic.strip_prefix("load/").expect("topic under load/");
        assert_eq!(
            m.payload,
            format!("msg-{index}").into_bytes(),
            "payload of {}",
            m.topic
        );
        *by_topic.entry(m.topic.clone()).or_default() += 1;
        payloads.insert(m.payload);
    }
    assert_eq!(payloads.len(), CLIENTS);
    let dups = received - CLIENTS;
    assert!(
        dups <= retrans[2],
        "{dups} duplicate deliveries but only {} PUBLISH retransmissions",
        retrans[2]
    );
    assert!(
        started.elapsed() < TEST_BUDGET,
        "took {:?}",
        started.elapsed()
    );
    let mut rig = rig;
    assert!(rig.gateway.is_running());
}
