//! Load: 1,000 sleeping clients, each on its own UDP socket, each subscribed (QoS 1) to its
//! own topic, asleep; 10 QoS 1 messages per client published upstream with paho-mqtt (10,000
//! in all); then all of them woken at once by PINGREQ(ClientId). Every client must get its 10
//! messages, in order, exactly once to the application (a DUP retransmission of a MsgId it
//! already has does not count twice), acknowledge each, and get PINGRESP right after its 10th.
//!
//! No sleeps: the upstream subscriptions are known to be in place from the broker's log, and
//! the 10,000 messages are known to be buffered at the gateway once a marker published after
//! them has arrived (see [`Marker`]). Everything is bounded by [`BUDGET`].

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, Packet, Qos, SubTopic};
use sensorgate_tests::{GATEWAY_ID, Marker, Rig, SnClient, UpMsg, poll_until};

const CLIENTS: usize = 1_000;
const PER_CLIENT: usize = 10;
const THREADS: usize = 4;
const BUDGET: Duration = Duration::from_secs(120);

struct Sleeper {
    index: usize,
    client_id: String,
    topic_id: u16,
    client: SnClient,
    /// Payloads delivered to the application, in order.
    delivered: Vec<String>,
    /// MsgIds already received (to recognise DUP retransmissions).
    msg_ids: HashSet<u16>,
    duplicates_ignored: usize,
    done: bool,
}

impl Sleeper {
    /// Handles one packet from the gateway while waking.
    fn on_packet(&mut self, p: Packet) {
        let i = self.index;
        match p {
            Packet::Publish {
                flags,
                topic_id,
                msg_id,
                data,
            } => {
                assert!(!self.done, "client {i}: PUBLISH after PINGRESP");
                assert_eq!(
                    (flags & !sn::FLAG_DUP, topic_id),
                    (0x20, self.topic_id),
                    "client {i}: QoS 1 on its subscription's topic id"
                );
                let text = String::from_utf8(data).unwrap();
                let fresh = self.msg_ids.insert(msg_id);
                if !fresh && sn::is_dup(flags) {
                    // A retransmission of what the application already has.
                    self.duplicates_ignored += 1;
                } else {
                    assert!(
                        fresh,
                        "client {i}: MsgId {msg_id} ({text}) again without DUP"
                    );
                    self.delivered.push(text);
                }
                self.client
                    .send(&sn::puback(topic_id, msg_id, sn::RC_ACCEPTED))
                    .unwrap();
            }
            Packet::Pingresp => {
                let want: Vec<String> = (0..PER_CLIENT).map(|k| format!("{i}:{k}")).collect();
                assert_eq!(
                    self.delivered, want,
                    "client {i}: PINGRESP after exactly its {PER_CLIENT} messages, in order"
                );
                self.done = true;
            }
            other => panic!("client {i}: unexpected {other:?} while waking"),
        }
    }
}

#[test]
fn a_thousand_sleepers_woken_by_pingreq_each_get_ten_qos1_messages_exactly_once() {
    let started = Instant::now();
    let rig = Rig::start().unwrap();
    let gw = rig.gateway.sn_addr();
    let mut marker = Marker::for_rig(&rig, "load").unwrap();

    // Connect and subscribe from a few threads.
    let mut groups: Vec<Vec<Sleeper>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    (t..CLIENTS)
                        .step_by(THREADS)
                        .map(|index| {
                            let client_id = format!("ld-{index}");
                            let mut client = SnClient::new(gw).unwrap();
                            assert_eq!(
                                client
                                    .connect_full(&client_id, sn::FLAG_CLEAN, 3600)
                                    .unwrap(),
                                sn::RC_ACCEPTED
                            );
                            let topic_id = client
                                .subscribe_ok(Qos::One, SubTopic::Name(&format!("ld/{index}")))
                                .unwrap();
                            assert_ne!(topic_id, 0);
                            Sleeper {
                                index,
                                client_id,
                                topic_id,
                                client,
                                delivered: Vec::new(),
                                msg_ids: HashSet::new(),
                                duplicates_ignored: 0,
                                done: false,
                            }
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let connected = started.elapsed();

    // Every upstream subscription is in place once the broker has logged it.
    let upstream = format!("sensorgate-{GATEWAY_ID}-local");
    poll_until(
        "the broker to log 1,000 upstream subscriptions",
        BUDGET.saturating_sub(started.elapsed()),
        Duration::from_millis(100),
        || {
            let log = rig.broker.log();
            let subscribed: BTreeSet<&str> = log
                .lines()
                .filter_map(|l| {
                    let t: Vec<&str> = l.split_whitespace().collect();
                    (t.len() == 4 && t[1] == upstream && t[3].starts_with("ld/")).then(|| t[3])
                })
                .collect();
            Ok((subscribed.len() == CLIENTS).then_some(()))
        },
    )
    .unwrap();

    // All asleep.
    std::thread::scope(|s| {
        for group in &groups {
            s.spawn(move || {
                for c in group {
                    c.client.sleep(600).unwrap();
                }
            });
        }
    });
    let asleep = started.elapsed();

    // 10,000 QoS 1 messages; once the marker is through, all are buffered at the gateway.
    let msgs: Vec<UpMsg> = (0..PER_CLIENT)
        .flat_map(|k| {
            (0..CLIENTS).map(move |i| UpMsg::new(&format!("ld/{i}"), format!("{i}:{k}"), 1))
        })
        .collect();
    marker.publish(&msgs).unwrap();
    let published = started.elapsed();

    // Wake everyone at once; each thread serves its clients round-robin, non-blocking.
    std::thread::scope(|s| {
        for group in &mut groups {
            s.spawn(move || {
                for c in group.iter() {
                    c.client.set_nonblocking(true).unwrap();
                    c.client
                        .send(&sn::pingreq_with_id(c.client_id.as_bytes()))
                        .unwrap();
                }
                let mut idle_sweeps = 0u64;
                for _sweep in 0..10_000_000u64 {
                    if group.iter().all(|c| c.done) {
                        return;
                    }
                    assert!(
                        started.elapsed() < BUDGET,
                        "out of time; unfinished: {:?}",
                        group
                            .iter()
                            .filter(|c| !c.done)
                            .map(|c| (c.index, c.delivered.len()))
                            .take(20)
                            .collect::<Vec<_>>()
                    );
                    let mut progressed = false;
                    for c in group.iter_mut().filter(|c| !c.done) {
                        // Drain what is there (bounded per visit).
                        for _ in 0..(2 * PER_CLIENT + 2) {
                            match c.client.recv(Duration::ZERO).unwrap() {
                                Some(p) => {
                                    progressed = true;
                                    c.on_packet(p);
                                }
                                None => break,
                            }
                        }
                    }
                    if !progressed {
                        idle_sweeps += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                panic!("sweep bound reached after {idle_sweeps} idle sweeps");
            });
        }
    });
    let woken = started.elapsed();

    let all: Vec<&Sleeper> = groups.iter().flatten().collect();
    assert_eq!(all.len(), CLIENTS);
    let delivered: usize = all.iter().map(|c| c.delivered.len()).sum();
    let dups: usize = all.iter().map(|c| c.duplicates_ignored).sum();
    assert_eq!(delivered, CLIENTS * PER_CLIENT);
    eprintln!(
        "{CLIENTS} sleepers: connected+subscribed {connected:?}, asleep {asleep:?}, \
         {delivered} messages published {published:?}, all woken and delivered {woken:?}; \
         {dups} DUP retransmissions ignored"
    );
}
