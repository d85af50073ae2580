//! The load generator: `clients` emulated MQTT-SN clients, each with its own UDP socket (own
//! source address), going through the phases
//!
//! ```text
//! connect ─> register / subscribe ─> ready ══(start_publish)══> publish ─> done
//!   ══(finish)══> DISCONNECT          (while waiting: PINGREQ every keep_alive/2, downlink counted)
//! ```
//!
//! Set-up runs at most `connect_concurrency` clients at a time (a connect storm that the
//! gateway's socket buffer can take; lost datagrams are retried like a real client would).
//! Publishing: QoS -1/0 in `sendmmsg` batches, paced (total msg/s spread over the clients) or
//! unpaced; QoS 1/2 with a window of outstanding messages per client, retransmitted with DUP
//! after `retry`. Every phase is bounded in time. Payloads carry (client, sequence, send time).
//! Counters are shared atomics; the controller reads them.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::dtls::Link;
use crate::sn::{self, kind};
use crate::{elapsed_ns, new_histogram};

/// How a client names the topic it publishes to.
#[derive(Debug, Clone)]
pub enum TopicMode {
    /// REGISTER `<prefix><client index>` and publish on the returned id.
    Register(String),
    /// A predefined topic id (the only choice for QoS -1).
    Predefined(u16),
}

/// What the generator does.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The gateway's UDP address.
    pub gateway: SocketAddr,
    /// Number of clients.
    pub clients: usize,
    /// Index of the first client (several generator processes split one large run).
    pub first_index: u32,
    /// ClientId prefix (followed by the index).
    pub id_prefix: String,
    /// Keep-alive Duration in CONNECT, seconds; clients ping every half of it while waiting.
    pub keep_alive: u16,
    /// The topic of uplink messages.
    pub topic: TopicMode,
    /// Subscribe to this topic name at QoS 0 and count downlink messages.
    pub subscribe: Option<String>,
    /// QoS -1, 0, 1 or 2.
    pub qos: i8,
    /// Messages per client (`u64::MAX`: until `publish_for` ends).
    pub messages: u64,
    /// Bound on the publish phase.
    pub publish_for: Duration,
    /// Outstanding QoS 1/2 messages per client.
    pub window: usize,
    /// Total offered msg/s over all clients; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// Payload bytes (at least the 20-byte stamp).
    pub payload: usize,
    /// Datagrams per `sendmmsg` (QoS -1/0).
    pub batch: usize,
    /// Clients in set-up at the same time.
    pub connect_concurrency: usize,
    /// Retransmission interval for set-up packets and QoS 1/2 messages.
    pub retry: Duration,
    /// Over DTLS 1.2 (`gateway` is then a `dtls_listen` address): each client first does a
    /// PSK handshake ([`crate::dtls`]) whose identity is its ClientId and key
    /// [`crate::dtls::BENCH_KEY`], within the set-up's concurrency bound.
    pub dtls: bool,
}

impl LoadSpec {
    /// A spec with the usual defaults: one client, QoS 0, 32-byte payload, registered topic.
    #[must_use]
    pub fn new(gateway: SocketAddr) -> LoadSpec {
        LoadSpec {
            gateway,
            clients: 1,
            first_index: 0,
            id_prefix: "sgb-".into(),
            keep_alive: 300,
            topic: TopicMode::Register("bench/c/".into()),
            subscribe: None,
            qos: 0,
            messages: 0,
            publish_for: Duration::from_secs(30),
            window: 1,
            rate: None,
            payload: 32,
            batch: 64,
            connect_concurrency: 1024,
            retry: Duration::from_secs(1),
            dtls: false,
        }
    }
}

/// Counters shared by all clients.
#[derive(Debug, Default)]
pub struct Counters {
    /// CONNACK rc 0 received.
    pub connected: AtomicU64,
    /// Clients through set-up.
    pub ready: AtomicU64,
    /// Clients whose set-up failed.
    pub failed: AtomicU64,
    /// Of those, clients whose DTLS handshake failed.
    pub handshakes_failed: AtomicU64,
    /// PUBLISH datagrams sent (first transmissions).
    pub sent: AtomicU64,
    /// PUBACK rc 0 / PUBCOMP received.
    pub acked: AtomicU64,
    /// PUBACK with a rejecting return code.
    pub rejected: AtomicU64,
    /// Retransmissions (set-up and QoS 1/2).
    pub retransmits: AtomicU64,
    /// Clients done publishing.
    pub done: AtomicU64,
    /// QoS 1/2 messages given up (no answer after retries, or the phase ended).
    pub unanswered: AtomicU64,
    /// Downlink PUBLISH received.
    pub downlink: AtomicU64,
    /// PINGRESP received.
    pub pingresp: AtomicU64,
    /// DISCONNECT received from the gateway (a session lost).
    pub lost: AtomicU64,
    /// Last CONNACK, ns since the epoch.
    pub last_connack_ns: AtomicU64,
    /// First and last downlink arrival, ns since the epoch.
    pub first_downlink_ns: AtomicU64,
    pub last_downlink_ns: AtomicU64,
}

/// The current value of one counter.
#[must_use]
pub fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Phases the controller moves the clients through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    SetUp,
    Publish,
    Finish,
}

/// A running load: clients set up (or setting up), waiting for the controller.
#[derive(Debug)]
pub struct Load {
    /// Live counters.
    pub counters: Arc<Counters>,
    /// Round trip PUBLISH → PUBACK/PUBCOMP, µs.
    pub ack_latency: Arc<Mutex<Histogram<u64>>>,
    /// Publisher stamp → downlink arrival, µs.
    pub downlink_latency: Arc<Mutex<Histogram<u64>>>,
    phase: watch::Sender<Phase>,
    tasks: Vec<JoinHandle<()>>,
    clients: u64,
    started: Instant,
    publish_started: Option<Instant>,
}

/// The source address of client `i`: 20,000 clients per loopback address (the ephemeral port
/// range holds about 28,000), starting at 127.77.0.1.
pub(crate) fn source_ip(i: usize) -> IpAddr {
    let k = u8::try_from(i / 20_000).unwrap_or(u8::MAX);
    IpAddr::V4(Ipv4Addr::new(127, 77, 0, k.saturating_add(1)))
}

impl Load {
    /// Binds one socket per client and starts them. Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// When sockets cannot be bound (the open-file limit, usually).
    pub async fn start(spec: LoadSpec) -> anyhow::Result<Load> {
        let spec = Arc::new(spec);
        let counters = Arc::new(Counters::default());
        let ack_latency = Arc::new(Mutex::new(new_histogram()));
        let downlink_latency = Arc::new(Mutex::new(new_histogram()));
        let (phase, phase_rx) = watch::channel(Phase::SetUp);
        let gate = Arc::new(Semaphore::new(spec.connect_concurrency.max(1)));
        let mut tasks = Vec::with_capacity(spec.clients);
        let started = Instant::now();
        for k in 0..spec.clients {
            let i = spec.first_index as usize + k;
            let bind = SocketAddr::new(source_ip(i), 0);
            let sock = UdpSocket::bind(bind)
                .await
                .with_context(|| format!("binding client {i} on {bind}"))?;
            sock.connect(spec.gateway).await?;
            let client = Client {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                spec: spec.clone(),
                counters: counters.clone(),
                ack_latency: ack_latency.clone(),
                downlink_latency: downlink_latency.clone(),
                phase: phase_rx.clone(),
                link: Link::Plain(sock),
                buf: vec![0u8; 1536],
                registered: 0,
            };
            let gate = gate.clone();
            tasks.push(tokio::spawn(client.run(gate)));
        }
        Ok(Load {
            counters,
            ack_latency,
            downlink_latency,
            phase,
            tasks,
            clients: spec.clients as u64,
            started,
            publish_started: None,
        })
    }

    /// Waits (up to `max`) until every client is through set-up or failed; returns the set-up
    /// time (start to the last CONNACK / set-up completion).
    pub async fn wait_ready(&self, max: Duration) -> Duration {
        let c = &self.counters;
        let until = Instant::now() + max;
        while count(&c.ready) + count(&c.failed) < self.clients && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.started.elapsed()
    }

    /// Seconds from start to the last CONNACK.
    #[must_use]
    pub fn connack_secs(&self) -> f64 {
        let last = count(&self.counters.last_connack_ns);
        let start = u64::try_from(
            self.started
                .saturating_duration_since(*crate::EPOCH.get_or_init(Instant::now))
                .as_nanos(),
        )
        .unwrap_or(0);
        last.saturating_sub(start) as f64 / 1e9
    }

    /// Lets the clients publish.
    pub fn start_publish(&mut self) {
        self.publish_started = Some(Instant::now());
        self.phase.send_replace(Phase::Publish);
    }

    /// Waits (up to `max`) until every ready client finished publishing; returns the time
    /// since [`Load::start_publish`].
    pub async fn wait_published(&self, max: Duration) -> Duration {
        let c = &self.counters;
        let until = Instant::now() + max;
        let ready = count(&c.ready);
        while count(&c.done) < ready && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.publish_started.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Waits (up to `max`) until `total` downlink messages arrived or none came for `idle`.
    pub async fn wait_downlink(&self, total: u64, idle: Duration, max: Duration) {
        let c = &self.counters;
        let until = Instant::now() + max;
        let mut last = (0, Instant::now());
        loop {
            let got = count(&c.downlink);
            if got >= total || Instant::now() > until {
                return;
            }
            if got != last.0 {
                last = (got, Instant::now());
            } else if last.1.elapsed() > idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends DISCONNECT from every client and waits (bounded) for the tasks to end.
    pub async fn finish(self) {
        self.phase.send_replace(Phase::Finish);
        let until = Instant::now() + Duration::from_secs(30);
        for t in self.tasks {
            let left = until.saturating_duration_since(Instant::now());
            if timeout(left, t).await.is_err() {
                // Aborted on drop of the handle: nothing to do.
            }
        }
    }
}

/// One emulated client.
struct Client {
    index: u32,
    spec: Arc<LoadSpec>,
    counters: Arc<Counters>,
    ack_latency: Arc<Mutex<Histogram<u64>>>,
    downlink_latency: Arc<Mutex<Histogram<u64>>>,
    phase: watch::Receiver<Phase>,
    /// Plain until [`Client::run`]'s handshake, when over DTLS.
    link: Link,
    buf: Vec<u8>,
    /// The topic id REGACK gave.
    registered: u16,
}

/// How often set-up packets are tried before the client gives up.
const SETUP_TRIES: u32 = 8;

/// Bound on one client's DTLS handshake (`dimpl` retransmits lost flights within it).
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(20);

impl Client {
    async fn run(mut self, gate: Arc<Semaphore>) {
        let permit = gate.acquire_owned().await;
        if self.spec.dtls {
            let secured = match self.link {
                Link::Plain(sock) => secure(sock, &self.spec, self.index).await,
                secured @ Link::Dtls(_) => Ok(secured),
            };
            match secured {
                Ok(link) => self.link = link,
                Err(e) => {
                    drop(permit);
                    eprintln!("client {}: DTLS handshake: {e:#}", self.index);
                    self.counters
                        .handshakes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let ok = self.set_up().await;
        drop(permit);
        if !ok {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counters.ready.fetch_add(1, Ordering::Relaxed);
        let topic = match &self.spec.topic {
            TopicMode::Predefined(id) => (*id, sn::TOPIC_PREDEFINED),
            TopicMode::Register(_) => (self.registered, 0),
        };
        if self.wait_phase(Phase::Publish).await {
            if self.spec.messages > 0 {
                let result = if self.spec.qos >= 1 {
                    self.publish_acked(topic).await
                } else {
                    self.publish_unacked(topic).await
                };
                if let Err(e) = result {
                    eprintln!("client {}: {e}", self.index);
                }
            }
            self.counters.done.fetch_add(1, Ordering::Relaxed);
            self.wait_phase(Phase::Finish).await;
        }
        let _ = self.link.send(&sn::disconnect()).await;
        self.link.close();
    }

    /// Waits for `phase`, pinging every keep_alive/2 and counting what arrives; `false` if the
    /// session was lost.
    async fn wait_phase(&mut self, phase: Phase) -> bool {
        let ping_every = Duration::from_secs(u64::from(self.spec.keep_alive.max(2)) / 2);
        let mut next_ping = tokio::time::Instant::now() + ping_every;
        loop {
            if *self.phase.borrow() >= phase {
                return true;
            }
            tokio::select! {
                changed = self.phase.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
                () = tokio::time::sleep_until(next_ping) => {
                    let _ = self.link.send(&sn::pingreq()).await;
                    next_ping += ping_every;
                }
                received = self.link.recv(&mut self.buf) => {
                    let Ok(n) = received else { continue };
                    if !self.on_idle_datagram(n) {
                        return false;
                    }
                }
            }
        }
    }

    /// Handles a datagram outside a request/response exchange; `false` on DISCONNECT.
    fn on_idle_datagram(&mut self, n: usize) -> bool {
        let Some((t, body)) = sn::parse(self.buf.get(..n).unwrap_or_default()) else {
            return true;
        };
        match t {
            kind::PINGRESP => {
                self.counters.pingresp.fetch_add(1, Ordering::Relaxed);
            }
            kind::DISCONNECT => {
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            kind::PUBLISH => {
                let now = elapsed_ns();
                let c = &self.counters;
                c.downlink.fetch_add(1, Ordering::Relaxed);
                c.first_downlink_ns
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                    .ok();
                c.last_downlink_ns.fetch_max(now, Ordering::Relaxed);
                if let Some((_, _, sent)) = body.get(5..).and_then(sn::read_stamp)
                    && let Ok(mut h) = self.downlink_latency.lock()
                {
                    let _ = h.record(now.saturating_sub(sent) / 1000);
                }
            }
            _ => {}
        }
        true
    }

    /// Sends `packet` until a reply of type `want` comes (answering nothing else); returns
    /// its body length in `self.buf` after the 2-octet header, or `None` after the tries.
    async fn exchange(&mut self, packet: &[u8], want: u8) -> Option<(usize, usize)> {
        for attempt in 0..SETUP_TRIES {
            if attempt > 0 {
                self.counters.retransmits.fetch_add(1, Ordering::Relaxed);
            }
            self.link.send(packet).await.ok()?;
            let until = tokio::time::Instant::now() + self.spec.retry;
            while let Ok(Ok(n)) =
                tokio::time::timeout_at(until, self.link.recv(&mut self.buf)).await
            {
                let d = self.buf.get(..n).unwrap_or_default();
                if let Some((t, body)) = sn::parse(d)
                    && t == want
                {
                    let start = n - body.len();
                    return Some((start, n));
                }
            }
        }
        None
    }

    async fn set_up(&mut self) -> bool {
        let id = format!("{}{}", self.spec.id_prefix, self.index);
        let Some((at, _)) = self
            .exchange(&sn::connect(&id, self.spec.keep_alive), kind::CONNACK)
            .await
        else {
            return false;
        };
        if self.buf.get(at) != Some(&0) {
            return false;
        }
        self.counters.connected.fetch_add(1, Ordering::Relaxed);
        self.counters
            .last_connack_ns
            .fetch_max(elapsed_ns(), Ordering::Relaxed);
        if let TopicMode::Register(prefix) = &self.spec.topic
            && self.spec.messages > 0
        {
            let name = format!("{prefix}{}", self.index);
            let Some((at, _)) = self.exchange(&sn::register(&name, 1), kind::REGACK).await else {
                return false;
            };
            let (id, rc) = (sn::be16(&self.buf, at), self.buf.get(at + 4));
            match (id, rc) {
                (Some(id), Some(0)) => self.registered = id,
                _ => return false,
            }
        }
        if let Some(topic) = self.spec.subscribe.clone() {
            let Some((at, _)) = self
                .exchange(&sn::subscribe(&topic, 0, 2), kind::SUBACK)
                .await
            else {
                return false;
            };
            if self.buf.get(at + 5) != Some(&0) {
                return false;
            }
        }
        true
    }

    /// Messages due by now for a paced client, or the batch size unpaced.
    fn due(&self, start: Instant, sent: u64) -> u64 {
        match self.spec.rate {
            Some(total) => {
                let per_client = total / self.spec.clients.max(1) as f64;
                let due = (start.elapsed().as_secs_f64() * per_client) as u64 + 1;
                due.saturating_sub(sent)
            }
            None => u64::MAX,
        }
    }

    /// When the next message of a paced client is due.
    fn next_due(&self, start: Instant, sent: u64) -> tokio::time::Instant {
        let per_client = self.spec.rate.unwrap_or(1.0) / self.spec.clients.max(1) as f64;
        let at = start + Duration::from_secs_f64(sent as f64 / per_client.max(1e-6));
        tokio::time::Instant::from_std(at)
    }

    /// QoS -1 / 0: batches of PUBLISH through `sendmmsg`.
    async fn publish_unacked(&mut self, (topic_id, topic_type): (u16, u8)) -> io::Result<()> {
        let spec = self.spec.clone();
        let flags = sn::qos_flags(spec.qos) | topic_type;
        let start = Instant::now();
        let deadline = start + spec.publish_for;
        let mut packets: Vec<Vec<u8>> =
            vec![Vec::with_capacity(spec.payload + 8); spec.batch.max(1)];
        let mut payload = Vec::with_capacity(spec.payload);
        let mut seq = 0u64;
        while seq < spec.messages && Instant::now() < deadline {
            let due = self.due(start, seq);
            if due == 0 {
                tokio::time::sleep_until(self.next_due(start, seq)).await;
                continue;
            }
            let n = due.min(spec.batch.max(1) as u64).min(spec.messages - seq);
            let now = elapsed_ns();
            let count = usize::try_from(n).unwrap_or(1);
            for (k, packet) in packets.iter_mut().take(count).enumerate() {
                let s = seq + k as u64;
                payload.clear();
                sn::stamp_into(&mut payload, self.index, s, now, spec.payload);
                packet.clear();
                sn::publish_into(packet, flags, topic_id.to_be_bytes(), 0, &payload);
            }
            self.link
                .send_batch(packets.get(..count).unwrap_or_default())
                .await?;
            seq += n;
            self.counters.sent.fetch_add(n, Ordering::Relaxed);
            if spec.rate.is_none() {
                // Unpaced: let the other tasks (the subscriber's, other clients) run.
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }

    /// QoS 1 / 2 with a window of outstanding messages, retransmitted with DUP.
    async fn publish_acked(&mut self, (topic_id, topic_type): (u16, u8)) -> io::Result<()> {
        let spec = self.spec.clone();
        let flags = sn::qos_flags(spec.qos) | topic_type;
        let start = Instant::now();
        let deadline = start + spec.publish_for;
        let mut hist = new_histogram();
        // (msg id, first sent, tries, packet, released (QoS 2 after PUBREC))
        let mut window: VecDeque<(u16, Instant, u32, Vec<u8>, bool)> = VecDeque::new();
        let mut payload = Vec::with_capacity(spec.payload);
        let mut seq = 0u64;
        let mut retry_at = tokio::time::Instant::now() + spec.retry;
        loop {
            let sending = seq < spec.messages && Instant::now() < deadline;
            while sending
                && window.len() < spec.window.max(1)
                && seq < spec.messages
                && self.due(start, seq) > 0
            {
                let msg_id = u16::try_from(seq % 65_535 + 1).unwrap_or(1);
                payload.clear();
                sn::stamp_into(&mut payload, self.index, seq, elapsed_ns(), spec.payload);
                let mut packet = Vec::with_capacity(payload.len() + 8);
                sn::publish_into(&mut packet, flags, topic_id.to_be_bytes(), msg_id, &payload);
                self.link.send(&packet).await?;
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                window.push_back((msg_id, Instant::now(), 0, packet, false));
                seq += 1;
            }
            if window.is_empty() {
                if seq >= spec.messages || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep_until(self.next_due(start, seq)).await;
                continue;
            }
            // Past the deadline, outstanding messages get one retry period to complete.
            if Instant::now() >= deadline + spec.retry {
                break;
            }
            let wake = if spec.rate.is_some() && seq < spec.messages && window.len() < spec.window {
                retry_at.min(self.next_due(start, seq))
            } else {
                retry_at
            };
            match tokio::time::timeout_at(wake, self.link.recv(&mut self.buf)).await {
                Ok(Ok(n)) => {
                    let Some((t, body)) = sn::parse(self.buf.get(..n).unwrap_or_default()) else {
                        continue;
                    };
                    match t {
                        kind::PUBACK => {
                            let (id, rc) = (sn::be16(body, 2), body.get(4).copied());
                            if let Some(pos) = window.iter().position(|w| Some(w.0) == id)
                                && let Some((_, sent, ..)) = window.remove(pos)
                            {
                                if rc == Some(0) {
                                    self.counters.acked.fetch_add(1, Ordering::Relaxed);
                                    let _ = hist.record(
                                        u64::try_from(sent.elapsed().as_micros())
                                            .unwrap_or(u64::MAX),
                                    );
                                } else {
                                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        kind::PUBREC => {
                            let id = sn::be16(body, 0);
                            if let Some(w) = window.iter_mut().find(|w| Some(w.0) == id) {
                                w.4 = true;
                                w.3 = sn::pubrel(w.0);
                                self.link.send(&w.3).await?;
                            }
                        }
                        kind::PUBCOMP => {
                            let id = sn::be16(body, 0);
                            if let Some(pos) = window.iter().position(|w| Some(w.0) == id)
                                && let Some((_, sent, ..)) = window.remove(pos)
                            {
                                self.counters.acked.fetch_add(1, Ordering::Relaxed);
                                let _ = hist.record(
                                    u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX),
                                );
                            }
                        }
                        kind::DISCONNECT => {
                            self.counters.lost.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        _ => {}
                    }
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Ok(Err(e)) => return Err(e),
                Err(_) if tokio::time::Instant::now() >= retry_at => {
                    // Retransmit what is outstanding (with DUP), give up after the tries.
                    let mut k = 0;
                    while let Some(w) = window.get_mut(k) {
                        if w.1.elapsed() < spec.retry {
                            k += 1;
                            continue;
                        }
                        w.2 += 1;
                        if w.2 > SETUP_TRIES {
                            window.remove(k);
                            self.counters.unanswered.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if !w.4
                            && let Some(f) = w.3.get_mut(2)
                        {
                            *f |= sn::DUP;
                        }
                        self.link.send(&w.3).await?;
                        self.counters.retransmits.fetch_add(1, Ordering::Relaxed);
                        k += 1;
                    }
                    retry_at = tokio::time::Instant::now() + spec.retry;
                }
                Err(_) => {}
            }
        }
        self.counters
            .unanswered
            .fetch_add(window.len() as u64, Ordering::Relaxed);
        if let Ok(mut all) = self.ack_latency.lock() {
            let _ = all.add(&hist);
        }
        Ok(())
    }
}

/// Client `index`'s plain socket turned into a DTLS session: a PSK handshake with its ClientId
/// as the identity.
async fn secure(sock: UdpSocket, spec: &LoadSpec, index: u32) -> anyhow::Result<Link> {
    let id = format!("{}{index}", spec.id_prefix);
    let config = crate::dtls::client_config(&id, &crate::dtls::BENCH_KEY)?;
    let (link, _) = crate::dtls::handshake(sock, config, Instant::now() + HANDSHAKE_WITHIN).await?;
    Ok(Link::Dtls(Box::new(link)))
}

/// Sends `packets` on a connected socket with as few `sendmmsg` calls as the socket allows.
/// (The `sendmmsg` headers are built per call: they hold raw pointers, so they cannot live in a
/// task that moves between threads.)
pub(crate) async fn send_batch(sock: &UdpSocket, packets: &[Vec<u8>]) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let mut sent = 0;
    while sent < packets.len() {
        let rest = packets.get(sent..).unwrap_or_default();
        let result = sock.try_io(Interest::WRITABLE, || {
            let slices: Vec<[IoSlice<'_>; 1]> = rest.iter().map(|p| [IoSlice::new(p)]).collect();
            let addrs: Vec<Option<SockaddrStorage>> = vec![None; slices.len()];
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(slices.len(), None);
            sendmmsg(
                fd,
                &mut headers,
                slices.iter(),
                &addrs,
                [],
                MsgFlags::MSG_DONTWAIT,
            )
            .map(|r| r.count())
            .map_err(io::Error::from)
        });
        match result {
            Ok(n) => sent += n.max(1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.writable().await?,
            // The gateway is not listening (ICMP port unreachable): the datagram is lost.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => sent += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
