//! The real [`UdpDriver`] against a real spool writer whose queue holds one append and whose
//! disk is stalled by the test (it holds the spool's lock, so the writer cannot write): a
//! client on a real UDP socket floods it, raw MQTT-SN bytes. Nothing read may be dropped:
//! every publish ends up in the spool, in order, and a QoS 1 sender gets PUBACK accepted
//! for each, only once its message is in the spool. Many more publishes are sent than the
//! driver may hold (`held_max`), so this also fails if it kept reading while holding.
//!
//! No sleep synchronises anything: the test waits on conditions (the refusal counter, the
//! spool's contents, datagrams) within generous bounds.

#![allow(clippy::disallowed_methods)] // Waits are bounded by the real clock.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use sensorgate_bridges::durable::memfs::MemFs;
use sensorgate_bridges::route::RouteTable;
use sensorgate_bridges::router::Router;
use sensorgate_bridges::spool::{
    FsyncPolicy, Record, SharedSpool, Spool, SpoolConfig, WhenFull, start_writer, wall_ms,
};

use super::*;
use crate::mqttsn::codec::{self, DecodeLimits, Frame, Packet, QoS, ReturnCode, TopicRef};
use crate::mqttsn::core::{Core, CoreConfig};
use crate::observe::model::{ClientQuery, QUERY_CHANNEL, RefusalReason, SessionState};

/// How long any awaited condition may take at most (a loaded CI machine included).
const BOUND: Duration = Duration::from_secs(30);

/// Datagrams per receive batch: small, so the driver may hold few publishes
/// (`HELD_ROUNDS * RECV_BATCH`) compared with those sent.
const RECV_BATCH: usize = 4;

/// The writer's queue (`[spool] queue`): one append.
const QUEUE: usize = 1;

const TOPIC: &str = "held/t";

/// A driver on 127.0.0.1 with its spool writer, and a client socket.
struct Rig {
    shared: Arc<SharedSpool<MemFs>>,
    stats: Arc<UdpStats>,
    stop: CancellationToken,
    driver: tokio::task::JoinHandle<io::Result<()>>,
    writer: std::thread::JoinHandle<()>,
    client: UdpSocket,
    gateway: SocketAddr,
}

impl Rig {
    async fn start(max_inflight: usize) -> Rig {
        Self::start_with(max_inflight, |driver| driver).await
    }

    /// A rig whose driver answers queries on the returned sender and beats the returned beat.
    async fn start_observed() -> (Rig, mpsc::Sender<IngressQuery>, Arc<Beat>) {
        let (queries, queries_rx) = mpsc::channel(QUERY_CHANNEL);
        let beat = Arc::new(Beat::new());
        let watched = Arc::clone(&beat);
        let rig = Self::start_with(16, move |driver| {
            driver.with_queries(queries_rx).with_beat(watched)
        })
        .await;
        (rig, queries, beat)
    }

    /// Like [`Rig::start`], with `configure` applied to the driver before it runs.
    async fn start_with(
        max_inflight: usize,
        configure: impl FnOnce(UdpDriver<Core>) -> UdpDriver<Core>,
    ) -> Rig {
        let config = SpoolConfig {
            dir: PathBuf::from("/spool"),
            max_bytes: 64 << 20,
            segment_bytes: 1 << 20,
            min_free_bytes: 0,
            max_age: None,
            when_full: WhenFull::RejectNew,
            fsync: FsyncPolicy::Always,
            memory_tail_bytes: 8 << 20,
            retain_bytes: 0,
        };
        let (spool, _) = Spool::open(MemFs::new(), config, &["up".to_owned()]).unwrap();
        let shared = SharedSpool::new(spool);
        let (appender, writer) = start_writer(Arc::clone(&shared), QUEUE).unwrap();
        let router = Router::new(
            appender,
            Vec::new(),
            1024,
            Arc::new(RouteTable::everything()),
        );
        let (reply_tx, reply_rx) = mpsc::channel(64);
        let ingress = router.ingress(reply_tx);
        // Only the ingress keeps the writer running, so it stops with the driver.
        drop(router);
        // Nobody sends downlink: the closed channel is simply never ready.
        let (_, downlink_rx) = mpsc::channel(1);
        let options = SocketOptions {
            recv_buffer: 1 << 20,
            send_buffer: 1 << 20,
        };
        let socket = bind("127.0.0.1:0".parse().unwrap(), options, "test").unwrap();
        let gateway = socket.local_addr().unwrap();
        let core = Core::new(CoreConfig {
            max_inflight_per_client: max_inflight,
            ..CoreConfig::with_defaults(1)
        });
        let stats = Arc::new(UdpStats::default());
        let driver = UdpDriver::new(
            core,
            vec![socket],
            ingress,
            reply_rx,
            downlink_rx,
            RECV_BATCH,
            1024,
        )
        .with_stats(Arc::clone(&stats));
        let driver = configure(driver);
        let stop = CancellationToken::new();
        // The driver is not `Send` (its batches hold raw `mmsghdr`s): run on this thread,
        // in the test's `LocalSet`.
        let driver = tokio::task::spawn_local(driver.run(stop.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Rig {
            shared,
            stats,
            stop,
            driver,
            writer,
            client,
            gateway,
        }
    }

    async fn send(&self, packet: Packet<'_>) {
        let mut buf = Vec::new();
        packet.encode(&mut buf).unwrap();
        self.client.send_to(&buf, self.gateway).await.unwrap();
    }

    /// The next datagram from the gateway, decoded by `f`; panics past [`BOUND`].
    async fn recv<T>(&self, f: impl FnOnce(Packet<'_>) -> T) -> T {
        let mut buf = vec![0; 2048];
        let (n, from) = tokio::time::timeout(BOUND, self.client.recv_from(&mut buf))
            .await
            .expect("a reply from the gateway")
            .unwrap();
        assert_eq!(from, self.gateway);
        match codec::decode(&buf[..n], &DecodeLimits::default()).unwrap() {
            Frame::Plain(p) | Frame::Encapsulated { packet: p, .. } => f(p),
        }
    }

    /// CONNECT and REGISTER [`TOPIC`]: its topic id.
    async fn connect_and_register(&self) -> u16 {
        self.send(Packet::Connect {
            will: false,
            clean_session: true,
            duration: 600,
            client_id: "held-client",
        })
        .await;
        let connack = self.recv(|p| {
            p == Packet::ConnAck {
                rc: ReturnCode::Accepted,
            }
        });
        assert!(connack.await, "CONNACK accepted");
        self.send(Packet::Register {
            topic_id: 0,
            msg_id: 1,
            topic_name: TOPIC,
        })
        .await;
        self.recv(|p| match p {
            Packet::RegAck {
                topic_id,
                msg_id: 1,
                rc: ReturnCode::Accepted,
            } => topic_id,
            other => panic!("expected REGACK, got {other:?}"),
        })
        .await
    }

    /// Stalls the writer, sends `publishes` (message id, number) and waits until the driver
    /// met the full queue; the writer stays stalled until the returned [`Stall`] is released.
    async fn stall_and_publish(
        &self,
        qos: QoS,
        topic_id: u16,
        publishes: impl IntoIterator<Item = (u16, u32)>,
    ) -> Stall {
        let stall = Stall::start(&self.shared);
        for (msg_id, i) in publishes {
            self.publish(qos, topic_id, msg_id, i).await;
        }
        self.wait_for("refusal for a full queue", |r| r.shared.queue_full() > 0)
            .await;
        stall
    }

    async fn publish(&self, qos: QoS, topic_id: u16, msg_id: u16, i: u32) {
        self.send(Packet::Publish {
            dup: false,
            qos,
            retain: false,
            topic: TopicRef::Normal(topic_id),
            msg_id,
            data: &i.to_be_bytes(),
        })
        .await;
    }

    /// Every record in the spool, in log order.
    fn records(&self) -> Vec<Record> {
        let mut spool = self.shared.lock();
        let mut pos = spool.reader(0);
        let mut out = Vec::new();
        spool.read(&mut pos, 1 << 16, wall_ms(), &mut out).unwrap();
        out
    }

    /// Waits until `done` holds; panics with `what` past [`BOUND`].
    async fn wait_for(&self, what: &str, mut done: impl FnMut(&Rig) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(start.elapsed() < BOUND, "no {what} within {BOUND:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops the driver (it must end cleanly) and then the writer.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(BOUND, self.driver)
            .await
            .expect("driver stopped")
            .unwrap()
            .unwrap();
        let writer = self.writer;
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap()
            .unwrap();
    }
}

/// Holds the spool's lock on a thread of its own until released: the writer, which needs it
/// to write, takes at most one group from its queue and then waits.
struct Stall {
    release: std_mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Stall {
    fn start(shared: &Arc<SharedSpool<MemFs>>) -> Stall {
        let shared = Arc::clone(shared);
        let (locked_tx, locked_rx) = std_mpsc::channel();
        let (release, release_rx) = std_mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _guard = shared.lock();
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        locked_rx.recv().unwrap();
        Stall { release, thread }
    }

    fn release(self) {
        self.release.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

/// The payloads of `records`, as the publishes' numbers.
fn numbers(records: &[Record]) -> Vec<u32> {
    records
        .iter()
        .map(|r| {
            assert_eq!(r.topic, TOPIC);
            u32::from_be_bytes(r.payload.as_ref().try_into().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn a_qos0_flood_meeting_a_full_spool_queue_is_held_and_spooled_in_order() {
    tokio::task::LocalSet::new()
        .run_until(qos0_flood_is_held_and_spooled_in_order())
        .await;
}

async fn qos0_flood_is_held_and_spooled_in_order() {
    // Five times what the driver may hold: it must stop reading while holding.
    const N: u32 = 5 * (HELD_ROUNDS * RECV_BATCH) as u32;
    let rig = Rig::start(16).await;
    let topic_id = rig.connect_and_register().await;

    let stall = rig
        .stall_and_publish(QoS::AtMostOnce, topic_id, (0..N).map(|i| (0, i)))
        .await;
    stall.release();

    rig.wait_for("every publish spooled", |r| {
        assert_eq!(r.stats.queue_dropped(), 0, "publishes dropped");
        r.shared.stats().appended >= u64::from(N)
    })
    .await;
    assert_eq!(numbers(&rig.records()), (0..N).collect::<Vec<_>>());
    assert_eq!(rig.stats.queue_dropped(), 0, "nothing given up");
    assert!(rig.shared.queue_full() > 0);
    rig.stop().await;
}

#[tokio::test]
async fn qos1_publishes_meeting_a_full_spool_queue_are_acknowledged_once_spooled() {
    tokio::task::LocalSet::new()
        .run_until(qos1_publishes_are_acknowledged_once_spooled())
        .await;
}

async fn qos1_publishes_are_acknowledged_once_spooled() {
    // More than the driver may hold, all in flight at once (the core allows it).
    const N: u16 = 2 * (HELD_ROUNDS * RECV_BATCH) as u16;
    let rig = Rig::start(usize::from(N)).await;
    let topic_id = rig.connect_and_register().await;

    let stall = rig
        .stall_and_publish(
            QoS::AtLeastOnce,
            topic_id,
            (1..=N).map(|msg_id| (msg_id, u32::from(msg_id))),
        )
        .await;
    stall.release();

    let mut acknowledged = Vec::new();
    for _ in 1..=N {
        let msg_id = rig
            .recv(|p| match p {
                Packet::PubAck {
                    topic_id: t,
                    msg_id,
                    rc,
                } => {
                    assert_eq!((t, rc), (topic_id, ReturnCode::Accepted), "PUBACK {msg_id}");
                    msg_id
                }
                other => panic!("expected PUBACK, got {other:?}"),
            })
            .await;
        // Acknowledged only once durable: the message is in the spool already.
        assert!(
            numbers(&rig.records()).contains(&u32::from(msg_id)),
            "PUBACK {msg_id} before its message was spooled"
        );
        acknowledged.push(msg_id);
    }
    acknowledged.sort_unstable();
    assert_eq!(acknowledged, (1..=N).collect::<Vec<_>>());
    assert_eq!(
        numbers(&rig.records()),
        (1..=u32::from(N)).collect::<Vec<_>>()
    );
    assert_eq!(rig.stats.queue_dropped(), 0);
    rig.stop().await;
}

#[tokio::test]
async fn held_publishes_still_refused_at_shutdown_are_counted_as_dropped() {
    tokio::task::LocalSet::new()
        .run_until(held_publishes_at_shutdown_are_counted())
        .await;
}

async fn held_publishes_at_shutdown_are_counted() {
    const N: u32 = 2 * (HELD_ROUNDS * RECV_BATCH) as u32;
    let rig = Rig::start(16).await;
    let topic_id = rig.connect_and_register().await;

    let stall = rig
        .stall_and_publish(QoS::AtMostOnce, topic_id, (0..N).map(|i| (0, i)))
        .await;
    let Rig {
        shared,
        stats,
        stop,
        driver,
        writer,
        ..
    } = rig;
    // Stopped while the writer still cannot take: the last try is refused too.
    stop.cancel();
    tokio::time::timeout(BOUND, driver)
        .await
        .expect("driver stopped")
        .unwrap()
        .unwrap();
    stall.release();
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .unwrap()
        .unwrap();
    let dropped = stats.queue_dropped();
    assert!(dropped > 0, "the held publishes were counted");
    // What was taken before the queue filled is spooled, in order; nothing after a drop.
    let mut spool = shared.lock();
    let mut pos = spool.reader(0);
    let mut records = Vec::new();
    spool
        .read(&mut pos, 1 << 16, wall_ms(), &mut records)
        .unwrap();
    let spooled = numbers(&records);
    assert_eq!(spooled, (0..spooled.len() as u32).collect::<Vec<_>>());
    assert!(spooled.len() as u64 + dropped <= u64::from(N));
}

/// Asks the driver for its report.
async fn report(queries: &mpsc::Sender<IngressQuery>) -> crate::observe::model::IngressReport {
    let (tx, rx) = tokio::sync::oneshot::channel();
    queries.send(IngressQuery::Report(tx)).await.unwrap();
    tokio::time::timeout(BOUND, rx)
        .await
        .expect("a report within the bound")
        .expect("the driver answers")
}

#[tokio::test]
async fn report_and_clients_queries_are_answered_from_the_core() {
    tokio::task::LocalSet::new()
        .run_until(queries_are_answered())
        .await;
}

async fn queries_are_answered() {
    let (rig, queries, _) = Rig::start_observed().await;
    let before = report(&queries).await;
    assert_eq!(before.protocol, "mqtt-sn");
    assert_eq!(before.sessions.total(), 0);

    rig.connect_and_register().await;
    let after = report(&queries).await;
    assert_eq!(after.sessions.get(SessionState::Active), 1);
    assert_eq!(after.sessions.total(), 1);
    assert_eq!(after.counters.packets_in, 2, "CONNECT and REGISTER");

    let (tx, rx) = tokio::sync::oneshot::channel();
    let query = ClientQuery {
        prefix: Some("held".into()),
        limit: 10,
        ..ClientQuery::default()
    };
    queries
        .send(IngressQuery::Clients(query, tx))
        .await
        .unwrap();
    let page = tokio::time::timeout(BOUND, rx).await.unwrap().unwrap();
    assert!(!page.more);
    let [client] = &page.clients[..] else {
        panic!("expected one client, got {page:?}");
    };
    assert_eq!(client.client_id, "held-client");
    assert_eq!(client.state, SessionState::Active);
    assert_eq!(client.keep_alive_secs, 600);
    let address = rig.client.local_addr().unwrap().to_string();
    assert_eq!(client.address.as_deref(), Some(address.as_str()));

    // An asker that gave up is no trouble: the driver goes on answering.
    let (tx, rx) = tokio::sync::oneshot::channel();
    drop(rx);
    queries.send(IngressQuery::Report(tx)).await.unwrap();
    assert_eq!(report(&queries).await.sessions.total(), 1);
    rig.stop().await;
}

#[tokio::test]
async fn an_idle_driver_still_beats() {
    tokio::task::LocalSet::new()
        .run_until(idle_driver_beats())
        .await;
}

async fn idle_driver_beats() {
    let (rig, _queries, beat) = Rig::start_observed().await;
    // When the last beat was, as an instant (to the millisecond).
    let last_beat = || {
        let now = Instant::now();
        beat.silent_for(now).map(|silent| now - silent)
    };
    rig.wait_for("a first beat", |_| last_beat().is_some())
        .await;
    let first = last_beat().unwrap();
    // No traffic and no timer of the core's: only the idle turns beat again.
    rig.wait_for("a beat while idle", |_| {
        last_beat().is_some_and(|last| last >= first + BEAT_IDLE / 2)
    })
    .await;
    rig.stop().await;
}

#[tokio::test]
async fn a_forwarders_nodes_are_answered_at_its_latest_source_and_others_may_not_relay() {
    tokio::task::LocalSet::new()
        .run_until(forwarders_are_routed_by_entry())
        .await;
}

/// The next datagram on `socket` from the gateway, raw; panics past [`BOUND`].
async fn recv_raw(socket: &UdpSocket, gateway: SocketAddr) -> Vec<u8> {
    let mut buf = vec![0; 2048];
    let (n, from) = tokio::time::timeout(BOUND, socket.recv_from(&mut buf))
        .await
        .expect("a datagram from the gateway")
        .unwrap();
    assert_eq!(from, gateway);
    buf.truncate(n);
    buf
}

async fn forwarders_are_routed_by_entry() {
    let (queries, queries_rx) = mpsc::channel(QUERY_CHANNEL);
    let list = ForwarderList::new(vec!["127.0.0.2".parse().unwrap()]);
    let rig = Rig::start_with(16, move |driver| {
        driver.with_queries(queries_rx).with_forwarders(list)
    })
    .await;
    let encapsulated = |node: u8, packet: Packet<'_>| {
        let mut buf = Vec::new();
        codec::encode_encapsulated(0, &[node], &packet, &mut buf).unwrap();
        buf
    };
    let first = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let connect = encapsulated(
        5,
        Packet::Connect {
            will: false,
            clean_session: true,
            duration: 600,
            client_id: "node-5",
        },
    );
    first.send_to(&connect, rig.gateway).await.unwrap();
    // Length 4, 0xFE, Ctrl, node 05; CONNACK rc 0.
    assert_eq!(
        recv_raw(&first, rig.gateway).await,
        [0x04, 0xFE, 0x00, 0x05, 0x03, 0x05, 0x00]
    );

    // The forwarder restarted on another port: node 5's session answers there.
    let second = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let ping = encapsulated(5, Packet::PingReq { client_id: None });
    second.send_to(&ping, rig.gateway).await.unwrap();
    assert_eq!(
        recv_raw(&second, rig.gateway).await,
        [0x04, 0xFE, 0x00, 0x05, 0x02, 0x17]
    );

    // From an address not in the list the same encapsulation is refused: no answer (the
    // plain SEARCHGW after it is the first thing answered), counted.
    rig.client.send_to(&ping, rig.gateway).await.unwrap();
    rig.send(Packet::SearchGw { radius: 0 }).await;
    let gwinfo = rig.recv(|p| matches!(p, Packet::GwInfo { .. }));
    assert!(
        gwinfo.await,
        "GWINFO first, nothing for the refused PINGREQ"
    );
    let refused = report(&queries).await.counters.refusals;
    assert_eq!(refused[RefusalReason::ForwarderNotAllowed as usize], 1);
    assert_eq!(report(&queries).await.sessions.total(), 1);
    rig.stop().await;
}

mod serial;

#[tokio::test]
async fn a_reconfigure_request_is_applied_between_turns_and_sessions_survive() {
    tokio::task::LocalSet::new()
        .run_until(reconfigure_keeps_sessions())
        .await;
}

/// A QoS 1 PUBLISH of `data` to `topic`; the PUBACK's rc.
async fn publish_acked(rig: &Rig, topic: TopicRef, msg_id: u16, data: &[u8]) -> ReturnCode {
    rig.send(Packet::Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic,
        msg_id,
        data,
    })
    .await;
    rig.recv(|p| match p {
        Packet::PubAck { msg_id: m, rc, .. } if m == msg_id => rc,
        other => panic!("expected PUBACK {msg_id}, got {other:?}"),
    })
    .await
}

async fn reconfigure_keeps_sessions() {
    let (requests, requests_rx) = mpsc::channel(1);
    let (queries, queries_rx) = mpsc::channel(QUERY_CHANNEL);
    let rig = Rig::start_with(16, move |driver| {
        driver
            .with_reconfigure(requests_rx)
            .with_queries(queries_rx)
    })
    .await;
    let topic_id = rig.connect_and_register().await;
    assert_eq!(
        publish_acked(&rig, TopicRef::Predefined(5), 2, b"x").await,
        ReturnCode::InvalidTopicId,
        "no predefined topic 5 yet"
    );

    // Predefined topic 5 and datagrams up to 2048 bytes (the driver's slots were 1024 + 1).
    let settings = CoreConfig {
        max_packet_size: 2048,
        max_topics_per_client: 0,
        predefined: vec![crate::mqttsn::core::PredefinedTopic {
            id: 5,
            topic: "re/five".into(),
            clients: crate::mqttsn::core::ClientSet::All,
        }],
        ..CoreConfig::with_defaults(1)
    };
    let (done, notes) = tokio::sync::oneshot::channel();
    requests.send(Reconfigure { settings, done }).await.unwrap();
    let notes = tokio::time::timeout(BOUND, notes)
        .await
        .expect("notes within the bound")
        .expect("the driver answers");
    // (The rig's core had the default max_packet_size, 4096, above its driver's slots.)
    let keys: Vec<&str> = notes
        .iter()
        .map(|n| n.split([' ', ':']).next().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["predefined", "max_topics_per_client", "max_packet_size"],
        "{notes:?}"
    );

    // The session, its registration and its address binding survived.
    assert_eq!(report(&queries).await.sessions.total(), 1);
    assert_eq!(
        publish_acked(&rig, TopicRef::Normal(topic_id), 3, b"y").await,
        ReturnCode::Accepted
    );
    assert_eq!(
        publish_acked(&rig, TopicRef::Predefined(5), 4, b"z").await,
        ReturnCode::Accepted
    );
    // A datagram longer than the old slots is read whole (truncated it would not decode).
    let long = vec![b'l'; 1500];
    assert_eq!(
        publish_acked(&rig, TopicRef::Predefined(5), 5, &long).await,
        ReturnCode::Accepted
    );
    let records = rig.records();
    let spooled: Vec<(&str, usize)> = records
        .iter()
        .map(|r| (r.topic.as_str(), r.payload.len()))
        .collect();
    assert_eq!(spooled, [(TOPIC, 1), ("re/five", 1), ("re/five", 1500)]);
    rig.stop().await;
}
