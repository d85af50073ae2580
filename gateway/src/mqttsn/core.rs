//! The MQTT-SN gateway core: sessions, topic registration and the uplink, with no IO.
//!
//! # Driving the core
//!
//! The IO adapter owns one [`Core`] and, in a loop:
//! 1. feeds every received datagram to [`Core::handle_datagram`] and every upstream
//!    acknowledgement to [`Core::handle_publish_result`];
//! 2. calls [`Core::handle_timeout`] once the instant from [`Core::poll_timeout`] has passed
//!    (calling it early is harmless: nothing is due, nothing happens);
//! 3. drains [`Core::poll_transmit`] (datagrams to send) and [`Core::poll_event`] (messages for
//!    the upstreams) until both return `None`;
//! 4. sleeps until the next datagram, acknowledgement or [`Core::poll_timeout`].
//!
//! Time is always passed in; the core never reads a clock.
//!
//! # Invariants
//! - Clients are keyed by ClientId; an address maps to at most one session and a session to
//!   exactly one address. A datagram is only ever applied to the session its address maps to.
//! - A QoS 1/2 PUBLISH is acknowledged to the sensor (PUBACK / PUBREC) only after
//!   [`Core::handle_publish_result`] reports it accepted for its token; a failure is answered
//!   with PUBACK rc 0x01 (congestion) so the sensor retries later.
//! - A QoS 2 message is forwarded at most once per MsgId until the sensor's PUBREL: a duplicate
//!   PUBLISH while it is pending or after PUBREC is never forwarded again.
//! - Everything is bounded: sessions ([`CoreConfig::max_clients`]), topics per client,
//!   unacknowledged publishes per client, queued output (one reply per input at most, drained by
//!   the adapter after every batch).
//! - Bytes from the network never cause a panic: malformed datagrams are counted and dropped.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sensorgate_bridges::message::{Message, Qos};

use super::codec::{self, DecodeLimits, Frame, Packet, QoS, ReturnCode, TopicRef};

/// Which clients a predefined topic applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSet {
    /// Every client (`clients = ["*"]`), and QoS -1 senders.
    All,
    /// Only these ClientIds.
    Only(Vec<String>),
}

/// A topic id fixed by configuration on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredefinedTopic {
    /// The id (1..=0xFFFE).
    pub id: u16,
    /// The MQTT topic it stands for.
    pub topic: String,
    /// Who may use it.
    pub clients: ClientSet,
}

/// Settings of the core, compiled from `[mqttsn]`.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// GwId in GWINFO and ADVERTISE.
    pub gw_id: u8,
    /// Maximum number of sessions; a CONNECT beyond it gets rc 0x01 (congestion).
    pub max_clients: usize,
    /// Datagrams longer than this are dropped.
    pub max_packet_size: usize,
    /// Longest accepted ClientId (the spec says 23).
    pub max_client_id_len: usize,
    /// Topic registrations per client; a REGISTER beyond it gets rc 0x01 (congestion).
    pub max_topics_per_client: usize,
    /// QoS 1/2 publishes per client awaiting the upstream; beyond it: PUBACK rc 0x01.
    pub max_inflight_per_client: usize,
    /// Accept QoS -1 publishes from senders without a session.
    pub qos_minus_one: bool,
    /// Predefined topics.
    pub predefined: Vec<PredefinedTopic>,
}

/// Keep-alive supervision: a session silent for this multiple of its Duration is lost.
const KEEP_ALIVE_FACTOR_PERCENT: u32 = 150;

/// Where a datagram came from (and where its answers go).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Which listening socket (index in the listener list).
    pub listener: u16,
    /// The UDP source address.
    pub addr: SocketAddr,
    /// Wireless Node Id when the client sits behind a forwarder (0xFE encapsulation).
    pub node: Option<Box<[u8]>>,
}

impl Peer {
    /// A peer reached directly over UDP.
    pub fn udp(listener: u16, addr: SocketAddr) -> Self {
        Peer {
            listener,
            addr,
            node: None,
        }
    }
}

/// Output for the upstream side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A sensor published; with a token, report the outcome through
    /// [`Core::handle_publish_result`] exactly once.
    Publish {
        /// The message, topic already resolved to its MQTT name.
        message: Message,
        /// Present for QoS 1/2 (the sensor waits for the outcome).
        token: Option<u64>,
    },
}

/// The upstream's verdict on a tokened publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Every target has it; acknowledge the sensor.
    Accepted,
    /// Could not be delivered now; the sensor gets rc 0x01 (congestion) and retries.
    Congestion,
}

/// Counters, monotonically increasing except `sessions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to the core.
    pub datagrams: u64,
    /// Datagrams dropped as malformed.
    pub malformed: u64,
    /// Datagrams dropped for exceeding `max_packet_size`.
    pub oversize: u64,
    /// Accepted publishes per QoS: [-1, 0, 1, 2].
    pub publishes: [u64; 4],
    /// QoS -1 publishes dropped (disabled, or unknown topic).
    pub qos_m1_dropped: u64,
    /// PUBACK / REGACK / CONNACK rejections sent.
    pub rejections: u64,
    /// Sessions dropped by keep-alive expiry.
    pub keep_alive_expired: u64,
    /// Current sessions.
    pub sessions: u64,
}

/// Index of a session slot plus its generation, so stale references are detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SessionRef {
    slot: u32,
    generation: u32,
}

/// One connected client.
#[derive(Debug)]
struct Session {
    client_id: Arc<str>,
    peer: Peer,
    generation: u32,
    /// Keep-alive Duration from CONNECT; zero disables supervision.
    keep_alive: Duration,
    last_seen: Instant,
    topics: TopicTable,
    /// Client-specific predefined topics (global ones are looked up in the core).
    own_predefined: Option<Arc<HashMap<u16, Arc<str>>>>,
    /// QoS 1/2 publishes awaiting the upstream: (MsgId, token).
    inflight: Vec<(u16, u64)>,
    /// QoS 2 MsgIds answered with PUBREC, awaiting PUBREL.
    qos2_received: Vec<u16>,
}

/// Per-client topic name <-> id table (spec 7.3 recommends per-client tables).
#[derive(Debug, Default)]
struct TopicTable {
    by_name: HashMap<Arc<str>, u16>,
    by_id: HashMap<u16, Arc<str>>,
    next_id: u16,
}

/// A tokened publish awaiting its outcome.
#[derive(Debug, Clone, Copy)]
struct Pending {
    session: SessionRef,
    msg_id: u16,
    topic_id: u16,
    qos2: bool,
}

/// A timer: when it fires the session's keep-alive is checked (it may have been extended since).
type TimerEntry = Reverse<(Instant, SessionRef)>;

/// The gateway core. See the module docs for the call order.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    limits: DecodeLimits,
    slots: Vec<Option<Session>>,
    free: Vec<u32>,
    generations: Vec<u32>,
    by_client: HashMap<Arc<str>, SessionRef>,
    by_peer: HashMap<Peer, SessionRef>,
    global_predefined: HashMap<u16, Arc<str>>,
    client_predefined: HashMap<Arc<str>, Arc<HashMap<u16, Arc<str>>>>,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    timers: BinaryHeap<TimerEntry>,
    transmits: VecDeque<(Peer, Reply)>,
    events: VecDeque<Event>,
    stats: Stats,
}

/// A packet the gateway sends; small and owned so it can be queued without allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    ConnAck(ReturnCode),
    RegAck {
        topic_id: u16,
        msg_id: u16,
        rc: ReturnCode,
    },
    PubAck {
        topic_id: u16,
        msg_id: u16,
        rc: ReturnCode,
    },
    PubRec(u16),
    PubComp(u16),
    SubAck {
        msg_id: u16,
        rc: ReturnCode,
    },
    UnsubAck(u16),
    PingResp,
    Disconnect,
    GwInfo,
    WillTopicResp(ReturnCode),
    WillMsgResp(ReturnCode),
}

impl Core {
    /// Creates a core. `config` must have been validated (see `config`).
    pub fn new(config: CoreConfig) -> Self {
        let mut global_predefined = HashMap::new();
        let mut per_client: HashMap<Arc<str>, HashMap<u16, Arc<str>>> = HashMap::new();
        for p in &config.predefined {
            let topic: Arc<str> = Arc::from(p.topic.as_str());
            match &p.clients {
                ClientSet::All => {
                    global_predefined.insert(p.id, topic);
                }
                ClientSet::Only(ids) => {
                    for c in ids {
                        per_client
                            .entry(Arc::from(c.as_str()))
                            .or_default()
                            .insert(p.id, topic.clone());
                    }
                }
            }
        }
        let limits = DecodeLimits {
            max_client_id_len: config.max_client_id_len,
        };
        Core {
            config,
            limits,
            slots: Vec::new(),
            free: Vec::new(),
            generations: Vec::new(),
            by_client: HashMap::new(),
            by_peer: HashMap::new(),
            global_predefined,
            client_predefined: per_client
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
            pending: HashMap::new(),
            next_token: 1,
            timers: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        Stats {
            sessions: self.by_client.len() as u64,
            ..self.stats
        }
    }

    /// Number of connected sessions.
    pub fn session_count(&self) -> usize {
        self.by_client.len()
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, peer: Peer, datagram: &[u8]) {
        self.stats.datagrams += 1;
        if datagram.len() > self.config.max_packet_size {
            self.stats.oversize += 1;
            tracing::debug!(peer = %peer.addr, len = datagram.len(), "Oversize datagram dropped.");
            return;
        }
        match codec::decode(datagram, &self.limits) {
            Ok(Frame::Plain(packet)) => self.handle_packet(now, peer, packet),
            Ok(Frame::Encapsulated {
                node_id, packet, ..
            }) => {
                let peer = Peer {
                    node: Some(node_id.into()),
                    ..peer
                };
                self.handle_packet(now, peer, packet);
            }
            Err(error) => {
                self.stats.malformed += 1;
                tracing::debug!(peer = %peer.addr, %error, "Malformed datagram dropped.");
            }
        }
    }

    /// Reports the upstream's verdict for a token from [`Event::Publish`].
    pub fn handle_publish_result(&mut self, _now: Instant, token: u64, outcome: PublishOutcome) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let Some(session) = self.session_mut(p.session) else {
            return;
        };
        session.inflight.retain(|&(_, t)| t != token);
        let peer = session.peer.clone();
        let reply = match outcome {
            PublishOutcome::Accepted if p.qos2 => {
                if !session.qos2_received.contains(&p.msg_id) {
                    session.qos2_received.push(p.msg_id);
                }
                Reply::PubRec(p.msg_id)
            }
            PublishOutcome::Accepted => Reply::PubAck {
                topic_id: p.topic_id,
                msg_id: p.msg_id,
                rc: ReturnCode::Accepted,
            },
            PublishOutcome::Congestion => {
                self.stats.rejections += 1;
                Reply::PubAck {
                    topic_id: p.topic_id,
                    msg_id: p.msg_id,
                    rc: ReturnCode::Congestion,
                }
            }
        };
        self.transmits.push_back((peer, reply));
    }

    /// Runs due timers (keep-alive supervision). Early calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((deadline, sref))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let Some(session) = self.session_mut(sref) else {
                continue;
            };
            let due = session.last_seen + keep_alive_limit(session.keep_alive);
            if due > now {
                self.timers.push(Reverse((due, sref)));
                continue;
            }
            tracing::debug!(client_id = %session.client_id, "Keep-alive expired; session dropped.");
            self.stats.keep_alive_expired += 1;
            self.remove_session(sref);
        }
    }

    /// The next instant [`Core::handle_timeout`] has work, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Writes the next datagram to send into `buf` (cleared first) and returns its destination.
    #[must_use]
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Peer> {
        let (peer, reply) = self.transmits.pop_front()?;
        buf.clear();
        let packet = self.reply_packet(reply);
        let result = match &peer.node {
            None => packet.encode(buf),
            Some(node) => codec::encode_encapsulated(0, node, &packet, buf),
        };
        // Replies are a few bytes: encoding cannot exceed the u16 length form.
        debug_assert!(result.is_ok());
        Some(peer)
    }

    /// The next message for the upstream side.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn reply_packet(&self, reply: Reply) -> Packet<'static> {
        match reply {
            Reply::ConnAck(rc) => Packet::ConnAck { rc },
            Reply::RegAck {
                topic_id,
                msg_id,
                rc,
            } => Packet::RegAck {
                topic_id,
                msg_id,
                rc,
            },
            Reply::PubAck {
                topic_id,
                msg_id,
                rc,
            } => Packet::PubAck {
                topic_id,
                msg_id,
                rc,
            },
            Reply::PubRec(msg_id) => Packet::PubRec { msg_id },
            Reply::PubComp(msg_id) => Packet::PubComp { msg_id },
            Reply::SubAck { msg_id, rc } => Packet::SubAck {
                qos: QoS::AtMostOnce,
                topic_id: 0,
                msg_id,
                rc,
            },
            Reply::UnsubAck(msg_id) => Packet::UnsubAck { msg_id },
            Reply::PingResp => Packet::PingResp,
            Reply::Disconnect => Packet::Disconnect { duration: None },
            Reply::GwInfo => Packet::GwInfo {
                gw_id: self.config.gw_id,
                gw_addr: &[],
            },
            Reply::WillTopicResp(rc) => Packet::WillTopicResp { rc },
            Reply::WillMsgResp(rc) => Packet::WillMsgResp { rc },
        }
    }

    fn handle_packet(&mut self, now: Instant, peer: Peer, packet: Packet<'_>) {
        match packet {
            Packet::Connect {
                will,
                clean_session,
                duration,
                client_id,
            } => {
                self.handle_connect(now, peer, will, clean_session, duration, client_id);
            }
            Packet::SearchGw { .. } => self.transmits.push_back((peer, Reply::GwInfo)),
            Packet::Publish {
                qos: QoS::MinusOne,
                topic,
                data,
                retain,
                ..
            } => {
                self.handle_publish_m1(peer, topic, data, retain);
            }
            Packet::Publish {
                dup: _,
                qos,
                retain,
                topic,
                msg_id,
                data,
            } => {
                let Some(sref) = self.touch(now, &peer) else {
                    return self.unknown_peer(peer, packet.name());
                };
                self.handle_publish(sref, peer, qos, retain, topic, msg_id, data);
            }
            Packet::Register {
                msg_id, topic_name, ..
            } => {
                let Some(sref) = self.touch(now, &peer) else {
                    return self.unknown_peer(peer, packet.name());
                };
                let reply = self.register(sref, topic_name, msg_id);
                self.transmits.push_back((peer, reply));
            }
            Packet::PubRel { msg_id } => {
                let Some(sref) = self.touch(now, &peer) else {
                    return self.unknown_peer(peer, packet.name());
                };
                if let Some(s) = self.session_mut(sref) {
                    s.qos2_received.retain(|&m| m != msg_id);
                }
                // PUBCOMP even for an unknown MsgId: the sensor may be retrying after a lost one.
                self.transmits.push_back((peer, Reply::PubComp(msg_id)));
            }
            Packet::PingReq { .. } => {
                if self.touch(now, &peer).is_some() {
                    self.transmits.push_back((peer, Reply::PingResp));
                } else {
                    self.unknown_peer(peer, packet.name());
                }
            }
            Packet::Disconnect { .. } => {
                if let Some(&sref) = self.by_peer.get(&peer) {
                    if let Some(s) = self.session_mut(sref) {
                        tracing::debug!(client_id = %s.client_id, "Client disconnected.");
                    }
                    self.remove_session(sref);
                }
                self.transmits.push_back((peer, Reply::Disconnect));
            }
            Packet::Subscribe { msg_id, .. } => {
                if self.touch(now, &peer).is_none() {
                    return self.unknown_peer(peer, packet.name());
                }
                self.stats.rejections += 1;
                let reply = Reply::SubAck {
                    msg_id,
                    rc: ReturnCode::NotSupported,
                };
                self.transmits.push_back((peer, reply));
            }
            Packet::Unsubscribe { msg_id, .. } => {
                if self.touch(now, &peer).is_none() {
                    return self.unknown_peer(peer, packet.name());
                }
                self.transmits.push_back((peer, Reply::UnsubAck(msg_id)));
            }
            Packet::WillTopicUpd { .. } | Packet::WillMsgUpd { .. } => {
                if self.touch(now, &peer).is_none() {
                    return self.unknown_peer(peer, packet.name());
                }
                let reply = if matches!(packet, Packet::WillTopicUpd { .. }) {
                    Reply::WillTopicResp(ReturnCode::NotSupported)
                } else {
                    Reply::WillMsgResp(ReturnCode::NotSupported)
                };
                self.transmits.push_back((peer, reply));
            }
            Packet::PubAck { .. }
            | Packet::PubRec { .. }
            | Packet::PubComp { .. }
            | Packet::RegAck { .. } => {
                // Acknowledgements of gateway-to-client traffic; the uplink sends none yet.
                let _ = self.touch(now, &peer);
            }
            Packet::Advertise { .. }
            | Packet::GwInfo { .. }
            | Packet::ConnAck { .. }
            | Packet::WillTopicReq
            | Packet::WillTopic { .. }
            | Packet::WillMsgReq
            | Packet::WillMsg { .. }
            | Packet::SubAck { .. }
            | Packet::UnsubAck { .. }
            | Packet::PingResp
            | Packet::WillTopicResp { .. }
            | Packet::WillMsgResp { .. } => {
                tracing::debug!(peer = %peer.addr, packet = packet.name(), "Unexpected packet ignored.");
            }
        }
    }

    /// A packet that needs a session came from an address without one: tell it to reconnect
    /// (spec 6.12).
    fn unknown_peer(&mut self, peer: Peer, what: &'static str) {
        tracing::debug!(peer = %peer.addr, packet = what, "Packet from unknown client; sent DISCONNECT.");
        self.transmits.push_back((peer, Reply::Disconnect));
    }

    fn handle_connect(
        &mut self,
        now: Instant,
        peer: Peer,
        will: bool,
        clean_session: bool,
        duration: u16,
        client_id: &str,
    ) {
        if !clean_session || will {
            // Persistent sessions and Will come with the sessions work; refuse honestly.
            self.stats.rejections += 1;
            self.transmits
                .push_back((peer, Reply::ConnAck(ReturnCode::NotSupported)));
            return;
        }
        // A second CONNECT with the same ClientId replaces the old session; a new client on an
        // address replaces whoever was there.
        if let Some(&old) = self.by_client.get(client_id) {
            self.remove_session(old);
        }
        if let Some(&old) = self.by_peer.get(&peer) {
            self.remove_session(old);
        }
        if self.by_client.len() >= self.config.max_clients {
            self.stats.rejections += 1;
            tracing::debug!(client_id, "Session table full; CONNECT refused.");
            self.transmits
                .push_back((peer, Reply::ConnAck(ReturnCode::Congestion)));
            return;
        }
        let client_id: Arc<str> = Arc::from(client_id);
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let Some(generation) = self.generations.get_mut(slot as usize) else {
            return;
        };
        *generation = generation.wrapping_add(1);
        let sref = SessionRef {
            slot,
            generation: *generation,
        };
        let keep_alive = Duration::from_secs(u64::from(duration));
        let session = Session {
            own_predefined: self.client_predefined.get(&client_id).cloned(),
            client_id: client_id.clone(),
            peer: peer.clone(),
            generation: sref.generation,
            keep_alive,
            last_seen: now,
            topics: TopicTable {
                next_id: 1,
                ..TopicTable::default()
            },
            inflight: Vec::new(),
            qos2_received: Vec::new(),
        };
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = Some(session);
        }
        self.by_client.insert(client_id.clone(), sref);
        self.by_peer.insert(peer.clone(), sref);
        if !keep_alive.is_zero() {
            self.timers
                .push(Reverse((now + keep_alive_limit(keep_alive), sref)));
        }
        tracing::debug!(client_id = %client_id, peer = %peer.addr, keep_alive_secs = duration, "Client connected.");
        self.transmits
            .push_back((peer, Reply::ConnAck(ReturnCode::Accepted)));
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_publish(
        &mut self,
        sref: SessionRef,
        peer: Peer,
        qos: QoS,
        retain: bool,
        topic: TopicRef,
        msg_id: u16,
        data: &[u8],
    ) {
        let max_inflight = self.config.max_inflight_per_client;
        let Some(resolved) = self.resolve_topic(sref, topic) else {
            self.stats.rejections += 1;
            let reply = Reply::PubAck {
                topic_id: topic_id_of(topic),
                msg_id,
                rc: ReturnCode::InvalidTopicId,
            };
            self.transmits.push_back((peer, reply));
            return;
        };
        let Some(session) = slot_mut(&mut self.slots, sref) else {
            return;
        };
        let (level, upstream_qos) = match qos {
            QoS::AtMostOnce => (1, Qos::AtMostOnce),
            QoS::AtLeastOnce => (2, Qos::AtLeastOnce),
            QoS::ExactlyOnce => (3, Qos::ExactlyOnce),
            QoS::MinusOne => return,
        };
        let mut token = None;
        if qos != QoS::AtMostOnce {
            if session.inflight.iter().any(|&(m, _)| m == msg_id) {
                // A retransmission of a publish the upstream has not answered yet: the answer
                // will come once, for both.
                return;
            }
            if qos == QoS::ExactlyOnce && session.qos2_received.contains(&msg_id) {
                self.transmits.push_back((peer, Reply::PubRec(msg_id)));
                return;
            }
            let full = session.inflight.len() >= max_inflight
                || (qos == QoS::ExactlyOnce && session.qos2_received.len() >= max_inflight);
            if full {
                self.stats.rejections += 1;
                let reply = Reply::PubAck {
                    topic_id: topic_id_of(topic),
                    msg_id,
                    rc: ReturnCode::Congestion,
                };
                self.transmits.push_back((peer, reply));
                return;
            }
            let t = self.next_token;
            self.next_token += 1;
            session.inflight.push((msg_id, t));
            self.pending.insert(
                t,
                Pending {
                    session: sref,
                    msg_id,
                    topic_id: topic_id_of(topic),
                    qos2: qos == QoS::ExactlyOnce,
                },
            );
            token = Some(t);
        }
        if let Some(n) = self.stats.publishes.get_mut(level) {
            *n += 1;
        }
        let message = Message {
            topic: resolved.to_string(),
            payload: Bytes::copy_from_slice(data),
            qos: upstream_qos,
            retain,
        };
        self.events.push_back(Event::Publish { message, token });
    }

    fn handle_publish_m1(&mut self, peer: Peer, topic: TopicRef, data: &[u8], retain: bool) {
        if !self.config.qos_minus_one {
            self.stats.qos_m1_dropped += 1;
            return;
        }
        // A connected sender's own predefined topics apply; otherwise the global ones.
        let resolved = match (topic, self.by_peer.get(&peer).copied()) {
            (TopicRef::Normal(_), _) => None,
            (_, Some(sref)) => self.resolve_topic(sref, topic),
            (TopicRef::Predefined(id), None) => self.global_predefined.get(&id).cloned(),
            (TopicRef::Short(s), None) => short_topic(s),
        };
        let Some(resolved) = resolved else {
            self.stats.qos_m1_dropped += 1;
            tracing::debug!(peer = %peer.addr, ?topic, "QoS -1 publish to unknown topic dropped.");
            return;
        };
        if let Some(n) = self.stats.publishes.first_mut() {
            *n += 1;
        }
        let message = Message {
            topic: resolved.to_string(),
            payload: Bytes::copy_from_slice(data),
            qos: Qos::AtMostOnce,
            retain,
        };
        self.events.push_back(Event::Publish {
            message,
            token: None,
        });
    }

    fn resolve_topic(&self, sref: SessionRef, topic: TopicRef) -> Option<Arc<str>> {
        let session = self.session(sref)?;
        match topic {
            TopicRef::Normal(id) => session.topics.by_id.get(&id).cloned(),
            TopicRef::Predefined(id) => session
                .own_predefined
                .as_ref()
                .and_then(|own| own.get(&id))
                .or_else(|| self.global_predefined.get(&id))
                .cloned(),
            TopicRef::Short(s) => short_topic(s),
        }
    }

    fn register(&mut self, sref: SessionRef, name: &str, msg_id: u16) -> Reply {
        let max_topics = self.config.max_topics_per_client;
        let global = &self.global_predefined;
        let Some(session) = slot_mut(&mut self.slots, sref) else {
            return Reply::Disconnect;
        };
        if !is_mqtt_topic_name(name) {
            self.stats.rejections += 1;
            return Reply::RegAck {
                topic_id: 0,
                msg_id,
                rc: ReturnCode::InvalidTopicId,
            };
        }
        if let Some(&id) = session.topics.by_name.get(name) {
            return Reply::RegAck {
                topic_id: id,
                msg_id,
                rc: ReturnCode::Accepted,
            };
        }
        if session.topics.by_id.len() >= max_topics {
            self.stats.rejections += 1;
            return Reply::RegAck {
                topic_id: 0,
                msg_id,
                rc: ReturnCode::Congestion,
            };
        }
        // Dynamic ids never collide with a predefined id this client could use.
        let own = session.own_predefined.clone();
        let taken = |id: u16, table: &TopicTable| {
            id == 0
                || id == 0xFFFF
                || table.by_id.contains_key(&id)
                || global.contains_key(&id)
                || own.as_ref().is_some_and(|o| o.contains_key(&id))
        };
        let mut id = session.topics.next_id;
        let mut tries = 0u32;
        while taken(id, &session.topics) {
            id = id.wrapping_add(1);
            tries += 1;
            if tries > 0x1_0000 {
                return Reply::RegAck {
                    topic_id: 0,
                    msg_id,
                    rc: ReturnCode::Congestion,
                };
            }
        }
        session.topics.next_id = id.wrapping_add(1);
        let topic: Arc<str> = Arc::from(name);
        session.topics.by_name.insert(topic.clone(), id);
        session.topics.by_id.insert(id, topic);
        Reply::RegAck {
            topic_id: id,
            msg_id,
            rc: ReturnCode::Accepted,
        }
    }

    /// The session for `peer`, with its keep-alive refreshed.
    fn touch(&mut self, now: Instant, peer: &Peer) -> Option<SessionRef> {
        let sref = *self.by_peer.get(peer)?;
        let session = self.session_mut(sref)?;
        session.last_seen = now;
        Some(sref)
    }

    fn session(&self, sref: SessionRef) -> Option<&Session> {
        self.slots
            .get(sref.slot as usize)?
            .as_ref()
            .filter(|s| s.generation == sref.generation)
    }

    fn session_mut(&mut self, sref: SessionRef) -> Option<&mut Session> {
        slot_mut(&mut self.slots, sref)
    }

    fn remove_session(&mut self, sref: SessionRef) {
        let Some(session) = self
            .slots
            .get_mut(sref.slot as usize)
            .and_then(|slot| slot.take_if(|s| s.generation == sref.generation))
        else {
            return;
        };
        self.by_client.remove(&session.client_id);
        if self.by_peer.get(&session.peer) == Some(&sref) {
            self.by_peer.remove(&session.peer);
        }
        for (_, token) in session.inflight {
            self.pending.remove(&token);
        }
        self.free.push(sref.slot);
        // Timer entries of removed sessions are skipped when they fire; under connect/disconnect
        // churn, drop them early so the heap stays proportional to the live sessions.
        if self.timers.len() > 2 * self.by_client.len() + 1024 {
            let slots = &self.slots;
            self.timers.retain(|Reverse((_, r))| {
                slots
                    .get(r.slot as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.generation == r.generation)
            });
        }
    }
}

/// The live session in `sref`'s slot (borrowing only the slots, so other fields stay usable).
fn slot_mut(slots: &mut [Option<Session>], sref: SessionRef) -> Option<&mut Session> {
    slots
        .get_mut(sref.slot as usize)?
        .as_mut()
        .filter(|s| s.generation == sref.generation)
}

/// How long a session may stay silent before it is lost.
fn keep_alive_limit(keep_alive: Duration) -> Duration {
    keep_alive * KEEP_ALIVE_FACTOR_PERCENT / 100
}

/// The TopicId field to echo in a PUBACK.
fn topic_id_of(topic: TopicRef) -> u16 {
    match topic {
        TopicRef::Normal(id) | TopicRef::Predefined(id) => id,
        TopicRef::Short([a, b]) => u16::from_be_bytes([a, b]),
    }
}

/// A short topic name is its two characters; they must make a valid MQTT topic.
fn short_topic(s: [u8; 2]) -> Option<Arc<str>> {
    std::str::from_utf8(&s)
        .ok()
        .filter(|t| is_mqtt_topic_name(t))
        .map(Arc::from)
}

/// Whether `topic` may be published to an MQTT broker: non-empty, no wildcards, and no
/// character MQTT forbids (U+0000) or brokers refuse (other C0/C1 controls, U+FFFE/U+FFFF).
/// A broker that gets one of these drops the whole connection, which would cost every sensor
/// its upstream: such topics are refused here, at the sensor that sent them.
pub fn is_mqtt_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && !topic.chars().any(|c| {
            matches!(c, '+' | '#' | '\u{0}'..='\u{1F}' | '\u{7F}'..='\u{9F}' | '\u{FFFE}' | '\u{FFFF}')
        })
}

#[cfg(test)]
mod tests;
