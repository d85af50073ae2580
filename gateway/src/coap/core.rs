//! The CoAP ingress core (sans-IO): messaging layer (RFC 7252 section 4), the `/ps` resources
//! (`super::resource`), acknowledgement after durable, and Observe (RFC 7641).
//!
//! # Driving the core
//!
//! Like the MQTT-SN core, through [`DatagramCore`]: datagrams, the spool's verdicts and downlink
//! in; then [`DatagramCore::handle_timeout`]; then drain [`DatagramCore::poll_event`] (each
//! [`Event::Subscribe`]'s result goes straight back through
//! [`DatagramCore::handle_subscribe_result`], so an Observe registration is answered in the same
//! flush) and [`DatagramCore::poll_transmit`]; sleep until [`DatagramCore::poll_timeout`]. Time
//! is passed in; the only randomness (Message IDs, retransmission jitter, Observe sequence
//! starts) comes from the seeded generator, so tests are deterministic.
//!
//! # Messaging layer
//!
//! - A peer is a source address. Peers are created by requests only (never by ACK/RST or a
//!   malformed datagram: those are answered statelessly, never with more bytes than came in),
//!   bounded by `max_peers`. An idle peer is forgotten `exchange_lifetime` after its last
//!   datagram once it is *evictable* (no verdict pending, no CON in flight or waiting, no
//!   observation); when the table is full the least recently seen evictable peer goes (a
//!   bounded scan, [`LRU_SCAN`]), else the newcomer's CON gets 5.03 + Max-Age.
//! - Deduplication by (peer, Message ID): a FIFO of the last `dedup_per_peer` requests per
//!   peer, each alive `exchange_lifetime` (CON) / `non_lifetime` (NON). A duplicate is never
//!   executed twice: an answered PUT/POST gets its answer again (same bytes), one waiting for
//!   its verdict gets an empty ACK (CON) or nothing (NON). GETs are not remembered:
//!   re-executing them is harmless (idempotent; an Observe re-registration is a replace).
//! - Acknowledgement after durable: a CON PUT/POST with QoS >= 1 is answered when the spool's
//!   verdict comes: piggy-backed on the ACK within `ack_wait`, else an empty ACK at `ack_wait`
//!   and the answer later as a separate CON response. Every CON the gateway sends (separate
//!   responses, CON notifications, pings) goes through the peer's NSTART window and is
//!   retransmitted after a random timeout in [ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR],
//!   doubled each time, given up after `max_retransmit` retransmissions (RFC 7252 4.2).
//! - PROBING_RATE (RFC 7252 4.7): once a CON to a peer needed a retransmission and nothing
//!   came back since, NON notifications to it are held to `probing_rate` bytes/s on average
//!   (their queues bound what waits) until it answers again or is given up.
//! - No-Response (RFC 7967) suppresses the answers of the classes it names (a CON still gets
//!   its empty ACK).
//!
//! # Observe
//!
//! An observation is keyed by (peer, token) and holds one MQTT filter. Filters are counted
//! like the MQTT-SN core's subscriptions: [`Event::Subscribe`] for the first observer (or a
//! higher QoS), [`Event::Unsubscribe`] when the last leaves (a lower QoS re-subscribes lower).
//! A registration that needs a new upstream subscription is answered when the router's result
//! comes; refused: 5.03 and nothing kept. Each downlink message is one notification per
//! matching observation (QoS = min(observation, message)); QoS 0 goes NON, QoS >= 1 CON,
//! and every `notification_check_count`-th or after `notification_check_interval` a NON one
//! goes CON too (RFC 7641 4.5). Per observation one CON at a time and order kept (a
//! notification never overtakes an earlier one, so a client's freshness check never drops a
//! QoS >= 1 message); the queue is bounded (`max_queued_per_observer`, `queue_full`). An RST
//! to a notification (CON in flight, or one of the last `dedup_per_peer` NON ones) cancels the
//! observation; exhausted CON retransmissions cancel all the peer's observations (gone). A
//! peer whose observations saw no CON exchange for `observer_ping_interval` gets an empty CON.
//!
//! # Block-wise (RFC 7959)
//!
//! A PUT/POST with Block1 goes through [`super::block::Reassembly`] keyed by (peer, request
//! URI): 2.31 per block, one publish when the last block completes the body, answered like
//! any publish (after the durable verdict) with the final Block1 echo. A body (read,
//! registration answer, notification) larger than `block_size` or one datagram goes as its
//! first block with ETag and Size2 and is cached ([`super::block::Block2Cache`], by peer and
//! topic/filter) for the client's `GET` + Block2 follow-ups; without a cache entry a
//! follow-up is served from the retained value. Concurrent uploads are bounded by
//! `reassembly_bytes` and by `max_peers` (no key of their own); per peer they count against
//! `max_exchanges_per_peer` with the verdicts pending (the peer mirrors its uploads' keys and
//! idle lifetime), and a peer with an upload in progress is not evicted.
//!
//! # Reconfiguration
//!
//! [`Core::reconfigure`] puts a new [`CoreConfig`] in force between two turns (a reload).
//! Peers, observations (with their queues and sequence numbers), verdicts pending, CONs in
//! flight, dedup entries, Block1 uploads and cached Block2 bodies all survive. Per setting:
//! - Limits (`max_peers`, `max_observers`, `max_observers_per_peer`, `max_filters`,
//!   `max_queued_per_observer`, `max_exchanges_per_peer`, `max_retained`, `reassembly_bytes`,
//!   `max_block2_bodies`, `dedup_per_peer`, `nstart`): lowering one drops nothing at once; it
//!   applies to what comes next. A new peer is taken only in place of an evictable one while
//!   the table is at or above `max_peers` (idle peers still age out); new registrations get
//!   5.03; a notification for a queue at or above its bound meets a full queue
//!   (`queue_full`); new requests beyond the exchanges get 5.03; a new retained topic is not
//!   kept; a peer's dedup FIFO and NON ring shrink at its next entry; a lower `nstart` holds
//!   new CONs until the window is below it; uploads go on while they fit the new budget; the
//!   Block2 cache is trimmed at its next insert. The router's filter table is sized at start
//!   from every ingress's `max_filters`: a `max_filters` above the value at start is capped at
//!   it until a restart (noted).
//! - `max_message_size`, `max_body_size`, `block_size`, `ack_wait`, `busy_max_age`,
//!   `max_client_id_len`, `queue_full`, `notification_check_count`, `probing_rate`: from the
//!   next datagram, request or message (an upload whose body already passes a lowered
//!   `max_body_size` gets 4.13 at its next block). Messages already built (retransmissions)
//!   go as built.
//! - Timers take a new duration when next armed: `ack_timeout` and `ack_random_factor` from
//!   the next CON sent (one in flight keeps doubling its own), `max_retransmit` at the next
//!   retransmission, `exchange_lifetime` / `non_lifetime` /
//!   `block_lifetime` from the next entry or idle check, `notification_check_interval` from
//!   the next notification, `observer_ping_interval` from the next ping (turned on from zero:
//!   armed at once for the peers with observations).
//! - `security` (`[[acl]]`, `[limits]`) and `require_identity`: from the next request;
//!   observations made under the old ACL stay and are notified only of what the peer may
//!   receive now (dropped and counted otherwise). The rate buckets are kept.
//!
//! # Authorisation
//!
//! A request's identity is its peer's DTLS identity, else its `id` query claimed (the
//! `{client_id}` of a pattern is the identity's name). Without a proven identity where
//! `require_identity` asks for one: 4.01. The ACL: 4.03 for PUT/POST (checked on every Block1
//! block), GET and Observe (the subscribe rule: a read receives what the topic receives). The
//! limits once a body is complete: 4.29 with Max-Age over the rate, 4.13 too large.
//!
//! # Invariants
//!
//! - Nothing here panics on bytes from the network; every table is bounded by a config key
//!   or a documented constant.
//! - A tokened publish is answered with success only after its verdict said durable; a
//!   request is published at most once per (peer, MID) within its dedup lifetime.
//! - Each observation is indexed under exactly one filter entry, so a message reaches an
//!   observation at most once; a filter entry exists iff it has observers.
//! - Every datagram sent is at most `max_message_size` bytes: a larger body goes block-wise.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sensorgate_bridges::message::{Message as Upstream, Origin, Protocol, Qos};
use sensorgate_bridges::topic::{has_wildcards, matches};

use super::block::{Block1Verdict, Block2Cache, Limits, Reassembly, block2_slice};
use super::link;
use super::msg::{self, Block, Code, Message, MessageType, Response, Token};
use super::resource::{self, Action, Refusal};
use crate::identity::{Identity, IdentitySource};
use crate::ingress::{DatagramCore, DownlinkOutcome, Event, Peer, PeerAddr, PublishOutcome};
use crate::mqttsn::core::QueueFull;
use crate::observe::model::{
    ClientInfo, ClientQuery, ClientsPage, DownlinkDropReason, IngressCounters, IngressReport,
    RefusalReason, SessionCounts, SessionState, SubscriptionInfo,
};
use crate::security::{self, Denial, Limiter, Policy, Requester};

/// The protocol's label in the admin listener's reports and metrics.
pub const PROTOCOL: &str = "coap";

/// What [`Core::authorize`] checks.
#[derive(Debug, Clone, Copy)]
enum Check<'a> {
    /// A publish to `topic` (identity and ACL).
    Publish { topic: &'a str },
    /// The rate and size of a publish of `len` bytes (identity and limits).
    Rate { len: usize },
    /// A read or an observation of `filter` (identity and ACL).
    Subscribe { filter: &'a str },
}

/// A request refused by [`Core::authorize`], with its answer.
#[derive(Debug, Clone, Copy)]
struct Denied {
    code: Code,
    diagnostic: &'static str,
    max_age: Option<u32>,
    denial: Denial,
}

/// Settings of the core, compiled from `[coap]` (each field is the key of the same name;
/// the defaults are RFC 7252's where the RFC names the parameter).
#[derive(Debug, Clone, PartialEq)]
pub struct CoreConfig {
    /// Largest datagram taken or sent (RFC 7252 section 4.6: 1152); 64..=1280.
    pub max_message_size: usize,
    /// Largest request body, single or reassembled from Block1; 4.13 with Size1 beyond.
    pub max_body_size: usize,
    /// Preferred block size for Block2, largest taken for Block1 (power of two, 16..=1024).
    pub block_size: usize,
    /// ACK_TIMEOUT: first retransmission timeout of a CON the gateway sends.
    pub ack_timeout: Duration,
    /// ACK_RANDOM_FACTOR (>= 1.0).
    pub ack_random_factor: f64,
    /// MAX_RETRANSMIT.
    pub max_retransmit: u8,
    /// NSTART: CONs in flight per peer.
    pub nstart: usize,
    /// PROBING_RATE in bytes/s toward a peer that does not answer.
    pub probing_rate: u32,
    /// EXCHANGE_LIFETIME: how long a CON's Message ID is remembered for deduplication.
    pub exchange_lifetime: Duration,
    /// NON_LIFETIME: how long a NON's Message ID is remembered.
    pub non_lifetime: Duration,
    /// How long a CON request waits for the spool's verdict to piggy-back the answer on the
    /// ACK; after it an empty ACK goes out and the answer follows as a separate CON.
    pub ack_wait: Duration,
    /// Max-Age (seconds) of a 5.03 Service Unavailable.
    pub busy_max_age: u32,
    /// Peers (source addresses) tracked at once.
    pub max_peers: usize,
    /// Recent Message IDs remembered per peer.
    pub dedup_per_peer: usize,
    /// Requests waiting for a verdict plus Block1 transfers, per peer.
    pub max_exchanges_per_peer: usize,
    /// Observations in total.
    pub max_observers: usize,
    /// Observations per peer.
    pub max_observers_per_peer: usize,
    /// Distinct observed filters.
    pub max_filters: usize,
    /// Notifications waiting per observation.
    pub max_queued_per_observer: usize,
    /// What a full notification queue drops.
    pub queue_full: QueueFull,
    /// Every Nth NON notification goes as CON (RFC 7641 section 4.5).
    pub notification_check_count: u32,
    /// A CON notification at least this often.
    pub notification_check_interval: Duration,
    /// An empty CON ping to a peer whose observations were idle this long (zero: off).
    pub observer_ping_interval: Duration,
    /// An idle Block1 transfer or cached Block2 body is kept this long.
    pub block_lifetime: Duration,
    /// Byte budget of all Block1 reassembly buffers.
    pub reassembly_bytes: usize,
    /// Cached large response bodies (Block2).
    pub max_block2_bodies: usize,
    /// Retained values kept for plain GET.
    pub max_retained: usize,
    /// Longest `id` query (the device identity).
    pub max_client_id_len: usize,
    /// `true`: a request from a peer without a proven (DTLS) identity gets 4.01 Unauthorized;
    /// `false`: its `id` / `clientid` query is its claimed identity.
    pub require_identity: bool,
    /// ACLs and limits (`[[acl]]`, `[limits]`); the default allows everything.
    pub security: Arc<Policy>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            max_message_size: 1152,
            max_body_size: 64 * 1024,
            block_size: 1024,
            ack_timeout: Duration::from_secs(2),
            ack_random_factor: 1.5,
            max_retransmit: 4,
            nstart: 1,
            probing_rate: 1,
            exchange_lifetime: Duration::from_secs(247),
            non_lifetime: Duration::from_secs(145),
            ack_wait: Duration::from_millis(500),
            busy_max_age: 5,
            max_peers: 100_000,
            dedup_per_peer: 32,
            max_exchanges_per_peer: 16,
            max_observers: 100_000,
            max_observers_per_peer: 32,
            max_filters: 65_536,
            max_queued_per_observer: 16,
            queue_full: QueueFull::DropOldest,
            notification_check_count: 100,
            notification_check_interval: Duration::from_secs(24 * 3600),
            observer_ping_interval: Duration::from_secs(3600),
            block_lifetime: Duration::from_secs(247),
            reassembly_bytes: 16 * 1024 * 1024,
            max_block2_bodies: 1024,
            max_retained: 10_000,
            max_client_id_len: 64,
            require_identity: false,
            security: Arc::default(),
        }
    }
}

/// Peers looked at, at most, to find one to evict when the table is full (those looked at and
/// kept move to the back: a second chance, so repeated scans make progress).
pub const LRU_SCAN: usize = 64;

/// Observe sequence numbers are 24 bits (RFC 7641 section 3.4).
const SEQ_MASK: u32 = 0x00FF_FFFF;

/// No slot (the LRU list's end).
const NIL: u32 = u32::MAX;

/// Counters and gauges of the core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to the core.
    pub datagrams: u64,
    /// Datagrams that did not decode (answered with RST / 4.0x, or dropped).
    pub malformed: u64,
    /// Datagrams larger than `max_message_size`.
    pub oversize: u64,
    /// Requests executed (duplicates not counted).
    pub requests: u64,
    /// Publishes emitted per QoS: [unused, 0, 1, 2].
    pub publishes: [u64; 4],
    /// Duplicate requests (same peer and Message ID) answered from the dedup table.
    pub duplicates: u64,
    /// Dedup entries pushed out by newer requests before their lifetime ended.
    pub dedup_evicted_early: u64,
    /// Empty ACKs sent because the verdict did not come within `ack_wait`.
    pub empty_acks: u64,
    /// Separate (CON) responses queued.
    pub separate_responses: u64,
    /// Separate responses whose retransmissions were exhausted.
    pub separate_expired: u64,
    /// CON retransmissions (separate responses, notifications, pings).
    pub retransmissions: u64,
    /// Success answers sent after a durable verdict.
    pub acks: u64,
    /// Refusals per reason (index: position in [`RefusalReason::ALL`]).
    pub refusals: [u64; RefusalReason::COUNT],
    /// New peers refused because `max_peers` peers were tracked and none was evictable.
    pub peers_full: u64,
    /// Peers forgotten (idle or evicted).
    pub peers_evicted: u64,
    /// Downlink messages handed to the core (upstream and local).
    pub downlink_in: u64,
    /// Notifications sent (first transmissions).
    pub notifications: u64,
    /// Notifications delivered (CON acknowledged, NON sent).
    pub downlink_delivered: u64,
    /// Notifications dropped per reason (index: position in [`DownlinkDropReason::ALL`]).
    pub downlink_dropped: [u64; 4],
    /// Observations cancelled by the client (RST, Observe=1) or lost with their peer.
    pub observations_cancelled: u64,
    /// Empty CON pings sent to observers.
    pub pings: u64,
    /// Block1 uploads dropped idle (`block_lifetime`).
    pub block1_expired: u64,
    /// Current peers.
    pub peers: u64,
    /// Current observations.
    pub observers: u64,
}

impl Stats {
    fn refuse(&mut self, reason: RefusalReason) {
        if let Some(n) = self.refusals.get_mut(reason as usize) {
            *n += 1;
        }
    }

    fn drop_downlink(&mut self, reason: DownlinkDropReason, n: u64) {
        if let Some(c) = self.downlink_dropped.get_mut(reason as usize) {
            *c += n;
        }
    }
}

/// Whether No-Response (RFC 7967 section 2.1) suppresses an answer with `code`.
fn suppressed(no_response: u8, code: Code) -> bool {
    let bit = match code.class() {
        2 => 0x02,
        4 => 0x08,
        5 => 0x10,
        _ => 0,
    };
    no_response & bit != 0
}

/// A peer slot and its generation (stale references are detected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PeerRef {
    slot: u32,
    generation: u32,
}

/// An observation slot and its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ObsRef {
    slot: u32,
    generation: u32,
}

/// A response the core sends, kept small and `Copy` so the dedup table replays it (same
/// bytes) without keeping its encoding. `code == Code::EMPTY` encodes an empty message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reply {
    ty: MessageType,
    code: Code,
    mid: u16,
    token: Token,
    max_age: Option<u32>,
    size1: Option<u32>,
    block1: Option<Block>,
    content_format: Option<u16>,
    payload: &'static str,
}

impl Reply {
    fn new(ty: MessageType, code: Code, mid: u16, token: Token) -> Self {
        Reply {
            ty,
            code,
            mid,
            token,
            max_age: None,
            size1: None,
            block1: None,
            content_format: None,
            payload: "",
        }
    }

    fn empty_ack(mid: u16) -> Self {
        Reply::new(MessageType::Ack, Code::EMPTY, mid, Token::EMPTY)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        if self.code == Code::EMPTY {
            msg::encode_empty(out, self.ty, self.mid);
            return;
        }
        let mut response = Response::new(self.ty, self.code, self.mid, self.token);
        response.max_age = self.max_age;
        response.size1 = self.size1;
        response.block1 = self.block1;
        response.content_format = self.content_format;
        response.payload = self.payload.as_bytes();
        msg::encode_response(out, &response);
    }
}

/// A datagram waiting in the transmit queue, encoded by `poll_transmit`.
#[derive(Debug, Clone)]
enum Tx {
    Reply(Reply),
    /// A 2.05 with a shared payload: a read, a registration answer, a notification.
    Content {
        ty: MessageType,
        mid: u16,
        token: Token,
        observe: Option<u32>,
        /// Content-Format (only `/.well-known/core` has one).
        content_format: Option<u16>,
        /// Block2 of a large body.
        block: Option<BodyBlock>,
        payload: Bytes,
    },
}

/// One block of a large response body (RFC 7959 Block2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BodyBlock {
    block2: Block,
    etag: u32,
    /// The whole body's size (Size2), sent with block 0.
    size2: Option<u32>,
}

/// What a CON the gateway sends carries.
#[derive(Debug, Clone)]
enum OutKind {
    /// A separate response (its `mid` is the CON's).
    Separate(Reply),
    /// A notification of `obs` with its sequence number.
    Notification {
        obs: ObsRef,
        token: Token,
        seq: u32,
        block: Option<BodyBlock>,
        payload: Bytes,
    },
    /// An empty CON (CoAP ping) to an observer.
    Ping,
}

/// A CON in flight, waiting for its ACK/RST.
#[derive(Debug, Clone)]
struct OutCon {
    mid: u16,
    kind: OutKind,
    retransmits: u8,
    timeout: Duration,
    due: Instant,
}

impl OutCon {
    fn tx(&self) -> Tx {
        match &self.kind {
            OutKind::Separate(reply) => Tx::Reply(Reply {
                mid: self.mid,
                ..*reply
            }),
            OutKind::Notification {
                token,
                seq,
                block,
                payload,
                ..
            } => Tx::Content {
                ty: MessageType::Con,
                mid: self.mid,
                token: *token,
                observe: Some(*seq),
                content_format: None,
                block: *block,
                payload: payload.clone(),
            },
            OutKind::Ping => Tx::Reply(Reply::new(
                MessageType::Con,
                Code::EMPTY,
                self.mid,
                Token::EMPTY,
            )),
        }
    }
}

/// A CON waiting for room in the peer's NSTART window (before any notification).
#[derive(Debug, Clone, Copy)]
enum Waiting {
    Separate(Reply),
    Ping,
}

/// What a remembered request's duplicate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DedupState {
    /// Waiting for the verdict of this publish token.
    InProgress(u64),
    /// Answered with this reply (piggy-backed or NON).
    Answered(Reply),
    /// Empty-ACKed; the answer went (or goes) as a separate CON: duplicates get the empty ACK.
    Separate,
    /// Nothing to send (No-Response).
    Silent,
}

#[derive(Debug, Clone, Copy)]
struct Dedup {
    mid: u16,
    con: bool,
    at: Instant,
    state: DedupState,
}

/// One peer (source address).
#[derive(Debug)]
struct PeerState {
    /// The slot's generation when this peer took it.
    generation: u32,
    peer: Peer,
    /// The address as origins name it (made once).
    origin_peer: Arc<str>,
    /// The last identity query (for `/clients`).
    client_id: Option<Arc<str>>,
    last_seen: Instant,
    dedup: VecDeque<Dedup>,
    next_mid: u16,
    in_flight: Vec<OutCon>,
    waiting: VecDeque<Waiting>,
    pending_verdicts: usize,
    /// Block1 uploads in progress (request URI, last block), mirroring the table.
    uploads: Vec<(Box<str>, Instant)>,
    observations: Vec<ObsRef>,
    /// Message IDs of the last NON notifications (an RST to one cancels its observation).
    non_sent: VecDeque<(u16, ObsRef)>,
    /// Round-robin start over `observations`.
    rr: usize,
    /// Last CON exchange completed (or the first observation made).
    last_con_ok: Instant,
    /// Since when the peer has not answered (a CON of ours needed a retransmission and
    /// nothing came from it since) and the bytes sent to it meanwhile: PROBING_RATE applies.
    quiet: Option<(Instant, u64)>,
    idle_armed: bool,
    ping_armed: bool,
    prev: u32,
    next: u32,
}

impl PeerState {
    fn next_mid(&mut self) -> u16 {
        let mid = self.next_mid;
        self.next_mid = self.next_mid.wrapping_add(1);
        mid
    }

    /// Whether `size` more bytes may go to this peer now: unlimited while it answers; at
    /// most `rate` bytes/s on average (plus one message) while it does not (RFC 7252 4.7).
    fn may_probe(&mut self, now: Instant, size: usize, rate: u32) -> bool {
        let Some((since, sent)) = self.quiet.as_mut() else {
            return true;
        };
        let budget = u64::from(rate)
            .saturating_mul(elapsed(*since, now).as_secs())
            .saturating_add(size as u64);
        let after = sent.saturating_add(size as u64);
        if after > budget {
            return false;
        }
        *sent = after;
        true
    }

    fn evictable(&self) -> bool {
        self.pending_verdicts == 0
            && self.uploads.is_empty()
            && self.in_flight.is_empty()
            && self.waiting.is_empty()
            && self.observations.is_empty()
    }

    /// The newest live dedup entry for `mid`.
    fn dedup_find(&self, mid: u16, now: Instant, config: &CoreConfig) -> Option<usize> {
        self.dedup
            .iter()
            .rposition(|d| d.mid == mid && elapsed(d.at, now) < lifetime(config, d.con))
    }
}

/// The longest delay a timer is set for (a larger configured duration is this long: an
/// `Instant` cannot hold any sum).
const MAX_DELAY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `at + delay`, the delay capped at [`MAX_DELAY`] (never overflows).
fn later(at: Instant, delay: Duration) -> Instant {
    at.checked_add(delay.min(MAX_DELAY)).unwrap_or(at)
}

/// Time from `since` to `now` (zero if `now` is earlier).
fn elapsed(since: Instant, now: Instant) -> Duration {
    now.saturating_duration_since(since)
}

fn lifetime(config: &CoreConfig, con: bool) -> Duration {
    if con {
        config.exchange_lifetime
    } else {
        config.non_lifetime
    }
}

/// One downlink message waiting for an observation.
#[derive(Debug, Clone)]
struct Down {
    payload: Bytes,
    qos: u8,
    block: Option<BodyBlock>,
}

/// Where a registration's answer goes once the router has answered the subscription.
#[derive(Debug, Clone, Copy)]
struct Registering {
    ty: MessageType,
    mid: u16,
}

#[derive(Debug)]
struct Observation {
    /// The slot's generation when this observation took it.
    generation: u32,
    peer: PeerRef,
    token: Token,
    filter: Arc<str>,
    qos: u8,
    seq: u32,
    queue: VecDeque<Down>,
    in_flight: bool,
    non_since_con: u32,
    last_con: Instant,
    registering: Option<Registering>,
}

/// The observers of one filter.
#[derive(Debug, Default)]
struct FilterEntry {
    observers: HashMap<ObsRef, u8>,
    /// QoS the upstreams were asked for.
    upstream_qos: u8,
    /// Registrations waiting for the router's answer.
    awaiting: Vec<ObsRef>,
    /// The router accepted it once (an Unsubscribe is owed when the last observer leaves).
    confirmed: bool,
}

/// A message of one of the core's own devices, for local delivery.
#[derive(Debug, Clone)]
struct LocalMessage {
    topic: Arc<str>,
    payload: Bytes,
    qos: u8,
    retain: bool,
}

/// A publish waiting for the spool's verdict.
#[derive(Debug)]
struct Pending {
    peer: PeerRef,
    mid: u16,
    con: bool,
    token: Token,
    /// An empty ACK went already: the answer is a separate response.
    acked: bool,
    no_response: u8,
    /// The final Block1 echo of a block-wise upload.
    block1: Option<Block>,
    local: Option<LocalMessage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    AckWait(u64),
    Retransmit(PeerRef, u16),
    PeerIdle(PeerRef),
    Ping(PeerRef),
}

/// The CoAP core. See the module docs.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    rng: SmallRng,
    slots: Vec<Option<PeerState>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    by_addr: HashMap<PeerAddr, PeerRef>,
    lru_head: u32,
    lru_tail: u32,
    obs: Vec<Option<Observation>>,
    obs_generations: Vec<u32>,
    obs_free: Vec<u32>,
    obs_by_key: HashMap<(PeerRef, Token), ObsRef>,
    exact: HashMap<Arc<str>, FilterEntry>,
    wild: HashMap<Arc<str>, FilterEntry>,
    retained: HashMap<Arc<str>, Bytes>,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    transmits: VecDeque<(Peer, Tx)>,
    events: VecDeque<Event>,
    stats: Stats,
    /// Reused by fan-out (no allocation per message once warm).
    scratch: Vec<(ObsRef, u8)>,
    /// Block1 uploads being reassembled, by (peer, path and queries).
    block1: Reassembly<(PeerRef, Box<str>)>,
    /// Large bodies sent block-wise, by (peer, topic or filter), for Block2 follow-ups.
    block2: Block2Cache<(PeerRef, Arc<str>)>,
    /// Block size exponent of bodies sent ([`body_szx`]).
    body_szx: u8,
    /// The largest of each bound over every config put in force ([`Core::reconfigure`]):
    /// what state admitted under an earlier, higher limit may still reach
    /// ([`Core::check_invariants`]).
    #[cfg(any(test, feature = "invariants"))]
    ceilings: CoreConfig,
    /// `max_filters` at construction: the router's filter table was sized with it (see
    /// [`Core::reconfigure`]).
    started_max_filters: usize,
    /// Rate buckets of the identities that published recently (`[limits]`).
    limiter: Limiter,
    /// Refusals by the ACLs, the limits and the identity checks (shared with the admin).
    security_counters: Arc<security::Counters>,
}

impl Core {
    /// A core with `config` (validated by the config module); `seed` seeds Message IDs,
    /// retransmission jitter and Observe sequence starts.
    pub fn new(config: CoreConfig, seed: u64) -> Core {
        let mut rng = SmallRng::seed_from_u64(seed);
        let block1 = Reassembly::new(Limits {
            max_transfers: max_block1_transfers(&config),
            max_body_size: config.max_body_size,
            budget_bytes: config.reassembly_bytes,
            lifetime: config.block_lifetime,
        });
        // A random first ETag: a restarted gateway does not reuse those clients still hold.
        let block2 = Block2Cache::new(
            config.max_block2_bodies,
            config.block_lifetime,
            rng.random(),
        );
        Core {
            block1,
            block2,
            body_szx: body_szx(&config),
            #[cfg(any(test, feature = "invariants"))]
            ceilings: config.clone(),
            started_max_filters: config.max_filters,
            config,
            rng,
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            by_addr: HashMap::new(),
            lru_head: NIL,
            lru_tail: NIL,
            obs: Vec::new(),
            obs_generations: Vec::new(),
            obs_free: Vec::new(),
            obs_by_key: HashMap::new(),
            exact: HashMap::new(),
            wild: HashMap::new(),
            retained: HashMap::new(),
            pending: HashMap::new(),
            next_token: 1,
            timers: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            scratch: Vec::new(),
            limiter: Limiter::new(),
            security_counters: Arc::default(),
        }
    }

    /// The counters of refusals by ACL, limit and identity checks, for the admin listener
    /// (`sensorgate_ingress_events_total`).
    #[must_use]
    pub fn security_counters(&self) -> Arc<security::Counters> {
        Arc::clone(&self.security_counters)
    }

    /// Checks a request of peer `pref` against the identity requirement, the ACL and (for a
    /// publish of `len` bytes) the limits. The identity is the one DTLS proved, else the
    /// request's `id` query as a claimed one (`{client_id}` stands for the identity's name
    /// too); without either, the rate is the address's. `Err` carries the answer.
    fn authorize(
        &mut self,
        now: Instant,
        pref: PeerRef,
        query_id: Option<&str>,
        check: Check<'_>,
    ) -> Result<(), Denied> {
        let off = self.config.security.acl.is_none() && !self.config.security.limits_active();
        if off && !self.config.require_identity {
            return Ok(());
        }
        let Some(peer) = slot(&self.slots, pref) else {
            return Ok(());
        };
        let policy = Arc::clone(&self.config.security);
        let proven = peer.peer.identity.clone();
        if proven.is_none() && self.config.require_identity {
            return Err(self.denied(Denial::IdentityRequired, None));
        }
        if policy.acl.is_none() && !(policy.limits_active() && matches!(check, Check::Rate { .. }))
        {
            return Ok(());
        }
        let identity = proven
            .or_else(|| query_id.map(|id| Arc::new(Identity::new(id, IdentitySource::CoapQuery))));
        let name = identity.as_ref().map(|i| Arc::clone(&i.name));
        let who = Requester::new(identity.as_deref(), name.as_deref());
        match check {
            Check::Publish { topic } if !policy.may_publish(&who, topic) => {
                Err(self.denied(Denial::AclPublish, None))
            }
            Check::Subscribe { filter } if !policy.may_subscribe(&who, filter) => {
                Err(self.denied(Denial::AclSubscribe, None))
            }
            Check::Rate { len } => {
                let key = name.unwrap_or_else(|| Arc::clone(&peer.origin_peer));
                match self.limiter.check(&policy.limits, now, &key, len) {
                    security::Verdict::Allowed => Ok(()),
                    security::Verdict::TooLarge => Err(self.denied(Denial::TooLarge, None)),
                    security::Verdict::RateLimited { retry_after } => {
                        let secs =
                            retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                        let max_age = u32::try_from(secs.max(1)).unwrap_or(u32::MAX);
                        Err(self.denied(Denial::RateLimited, Some(max_age)))
                    }
                }
            }
            _ => Ok(()),
        }
    }

    /// Counts `denial` and makes its answer.
    fn denied(&mut self, denial: Denial, max_age: Option<u32>) -> Denied {
        self.security_counters.count(denial);
        let (code, diagnostic, reason) = match denial {
            Denial::IdentityRequired => (
                Code::UNAUTHORIZED,
                "identity required",
                RefusalReason::NotAllowed,
            ),
            Denial::RateLimited => (
                Code::TOO_MANY_REQUESTS,
                "rate limited",
                RefusalReason::Congestion,
            ),
            Denial::TooLarge => (
                Code::REQUEST_ENTITY_TOO_LARGE,
                "too large",
                RefusalReason::TooLarge,
            ),
            _ => (Code::FORBIDDEN, "forbidden", RefusalReason::NotAllowed),
        };
        self.stats.refuse(reason);
        Denied {
            code,
            diagnostic,
            max_age,
            denial,
        }
    }

    /// Answers a request the policy refused.
    fn refuse_denied(&mut self, now: Instant, pref: PeerRef, request: &Message, denied: Denied) {
        tracing::debug!(code = %denied.code, reason = denied.denial.as_str(), "CoAP request refused by policy.");
        let mut reply = self.reply_to(pref, request, denied.code);
        reply.payload = denied.diagnostic;
        reply.max_age = denied.max_age;
        let no_response = request.no_response.unwrap_or(0);
        let remember = request.code != Code::GET;
        self.answer(now, pref, request, no_response, reply, remember);
    }

    /// The settings.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Puts `config` (validated) in force at `now`, keeping every peer, observation, queued
    /// notification, exchange in flight, pending verdict and Block1/Block2 transfer; returns
    /// notes for the log. A lowered limit applies to what comes next; a timer takes its new
    /// duration when next armed (an observer ping interval turned on from zero is armed now
    /// for the peers with observations). Messages already built are sent (and retransmitted)
    /// as built, with the parameters of their first transmission.
    pub fn reconfigure(&mut self, now: Instant, mut config: CoreConfig) -> Vec<String> {
        let mut notes = self.reconfigure_notes(&config);
        // The router's filter table was sized at start with this bound among the ingresses':
        // above it this ingress would take the room the others count on.
        notes.extend(crate::ingress::cap_max_filters(
            &mut config.max_filters,
            self.started_max_filters,
        ));
        let ping_on = self.config.observer_ping_interval.is_zero()
            && !config.observer_ping_interval.is_zero();
        self.block1.set_limits(Limits {
            max_transfers: max_block1_transfers(&config),
            max_body_size: config.max_body_size,
            budget_bytes: config.reassembly_bytes,
            lifetime: config.block_lifetime,
        });
        self.block2
            .set_limits(config.max_block2_bodies, config.block_lifetime);
        self.body_szx = body_szx(&config);
        #[cfg(any(test, feature = "invariants"))]
        widen_ceilings(&mut self.ceilings, &config);
        self.config = config;
        if ping_on {
            let observing: Vec<PeerRef> = self
                .by_addr
                .values()
                .copied()
                .filter(|pref| slot(&self.slots, *pref).is_some_and(|p| !p.observations.is_empty()))
                .collect();
            for pref in observing {
                self.arm_ping(now, pref);
            }
        }
        notes
    }

    /// What `config` means for the state there is: limits now below what is in use.
    fn reconfigure_notes(&self, config: &CoreConfig) -> Vec<String> {
        let mut notes = Vec::new();
        let mut lowered = |key: &str, limit: usize, used: usize, what: &str, effect: &str| {
            if used > limit {
                notes.push(format!(
                    "{key} lowered to {limit}, below {used} {what}: kept; {effect}"
                ));
            }
        };
        let peers = self.slots.iter().flatten();
        lowered(
            "max_peers",
            config.max_peers,
            self.by_addr.len(),
            "peers",
            "a new peer is taken only in place of an idle one until below",
        );
        lowered(
            "max_observers",
            config.max_observers,
            self.obs_by_key.len(),
            "observations",
            "new registrations get 5.03 until below",
        );
        lowered(
            "max_filters",
            config.max_filters,
            self.filter_count(),
            "distinct observed filters",
            "registrations of a new filter get 5.03 until below",
        );
        lowered(
            "max_retained",
            config.max_retained,
            self.retained.len(),
            "retained values",
            "new topics are not kept for GET until below",
        );
        lowered(
            "max_observers_per_peer",
            config.max_observers_per_peer,
            peers
                .clone()
                .map(|p| p.observations.len())
                .max()
                .unwrap_or(0),
            "observations of one peer",
            "such a peer's new registrations get 5.03 until below",
        );
        lowered(
            "max_block2_bodies",
            config.max_block2_bodies,
            self.block2.len(),
            "cached Block2 bodies",
            "the oldest go at the next insert",
        );
        lowered(
            "reassembly_bytes",
            config.reassembly_bytes,
            self.block1.bytes(),
            "bytes of Block1 reassembly",
            "transfers in progress continue while they fit; new ones get 5.03 until below",
        );
        if config.max_message_size < self.config.max_message_size {
            notes.push(format!(
                "max_message_size lowered to {}: longer datagrams are refused; messages built \
                 before (retransmissions) go as built",
                config.max_message_size
            ));
        }
        notes
    }

    /// Current counters and gauges.
    pub fn stats(&self) -> Stats {
        Stats {
            peers: self.by_addr.len() as u64,
            observers: self.obs_by_key.len() as u64,
            ..self.stats
        }
    }

    // ------------------------------------------------------------------------------------
    // Input.

    fn on_datagram(&mut self, now: Instant, from: Peer, datagram: &[u8]) {
        self.stats.datagrams += 1;
        if datagram.len() > self.config.max_message_size {
            self.oversize(&from, datagram);
            return;
        }
        let message = match msg::decode(datagram) {
            Ok(message) => message,
            Err(error) => {
                self.stats.malformed += 1;
                self.stats.refuse(RefusalReason::Malformed);
                tracing::debug!(peer = %from, %error, "Malformed CoAP datagram.");
                match error.answer() {
                    msg::Answer::Drop => {}
                    msg::Answer::Reset { message_id } => {
                        let rst =
                            Reply::new(MessageType::Rst, Code::EMPTY, message_id, Token::EMPTY);
                        self.transmits.push_back((from, Tx::Reply(rst)));
                    }
                    msg::Answer::Respond {
                        message_id,
                        token,
                        code,
                    } => {
                        // RFC 7252 5.7.2: a request to proxy gets 5.05, not 4.02.
                        let proxy = matches!(
                            error,
                            msg::DecodeError::Request {
                                reason: msg::RequestError::BadOption {
                                    number: msg::option::PROXY_URI | msg::option::PROXY_SCHEME
                                },
                                ..
                            }
                        );
                        let code = if proxy {
                            Code::PROXYING_NOT_SUPPORTED
                        } else {
                            code
                        };
                        let reply = Reply::new(MessageType::Ack, code, message_id, token);
                        self.transmits.push_back((from, Tx::Reply(reply)));
                    }
                }
                return;
            }
        };
        match message.ty {
            MessageType::Ack => self.on_ack(now, &from, message.message_id),
            MessageType::Rst => self.on_rst(now, &from, message.message_id),
            _ if message.is_request() => self.on_request(now, from, message, datagram.len()),
            MessageType::Con => {
                // A CoAP ping (Empty CON) is answered with RST (RFC 7252 4.3); so is a
                // response the gateway never asked for.
                if message.code != Code::EMPTY {
                    self.stats.refuse(RefusalReason::Malformed);
                }
                let rst = Reply::new(
                    MessageType::Rst,
                    Code::EMPTY,
                    message.message_id,
                    Token::EMPTY,
                );
                self.transmits.push_back((from, Tx::Reply(rst)));
            }
            // An Empty or response NON: nothing to do (RFC 7252 4.3: silently ignored).
            MessageType::Non => {}
        }
    }

    /// A datagram beyond `max_message_size`: a CON request whose header and token are readable
    /// gets 4.13 with Size1 (the largest body taken); anything else is dropped. No state.
    fn oversize(&mut self, from: &Peer, datagram: &[u8]) {
        self.stats.oversize += 1;
        self.stats.refuse(RefusalReason::TooLarge);
        let [b0, code, hi, lo, rest @ ..] = datagram else {
            return;
        };
        let tkl = usize::from(b0 & 0x0F);
        let token = rest.get(..tkl).and_then(Token::new);
        let con = b0 >> 4 == (msg::VERSION << 2);
        if let (true, true, Some(token)) = (con, Code(*code).is_request(), token) {
            let mut reply = Reply::new(
                MessageType::Ack,
                Code::REQUEST_ENTITY_TOO_LARGE,
                u16::from_be_bytes([*hi, *lo]),
                token,
            );
            // RFC 7959 2.9.3: Size1 = the largest body taken, Block1 = the block size to use.
            reply.size1 = Some(u32::try_from(self.config.max_body_size).unwrap_or(u32::MAX));
            reply.block1 = Block::new(0, false, self.body_szx);
            self.transmits.push_back((from.clone(), Tx::Reply(reply)));
        }
    }

    fn on_request(&mut self, now: Instant, from: Peer, message: Message, len: usize) {
        let con = message.ty == MessageType::Con;
        let Some(pref) = self.peer_for(now, &from) else {
            self.stats.peers_full += 1;
            self.stats.refuse(RefusalReason::Congestion);
            tracing::debug!(peer = %from, "CoAP peer table full; request refused.");
            if con {
                // Built without state, never longer than the request (no amplification).
                let mut reply = Reply::new(
                    MessageType::Ack,
                    Code::SERVICE_UNAVAILABLE,
                    message.message_id,
                    message.token,
                );
                reply.max_age = Some(self.config.busy_max_age);
                let needed = 4 + message.token.len() + 5;
                if len < needed {
                    reply = Reply::new(
                        MessageType::Rst,
                        Code::EMPTY,
                        message.message_id,
                        Token::EMPTY,
                    );
                }
                self.transmits.push_back((from, Tx::Reply(reply)));
            }
            return;
        };
        if let Some(dup) = self.duplicate(now, pref, message.message_id) {
            self.stats.duplicates += 1;
            if let Some(reply) = dup {
                self.send_to(pref, Tx::Reply(reply));
            }
            return;
        }
        self.stats.requests += 1;
        let no_response = message.no_response.unwrap_or(0);
        let action = resource::classify(&message, self.config.max_client_id_len);
        match action {
            Err(refusal) => {
                self.stats.refuse(refusal.reason);
                let remember = message.code != Code::GET;
                self.refuse_request(now, pref, &message, refusal, remember);
            }
            Ok(Action::WellKnown) => {
                if suppressed(no_response, Code::CONTENT) {
                    if con {
                        self.send_to(pref, Tx::Reply(Reply::empty_ack(message.message_id)));
                    }
                    return;
                }
                let body = Bytes::from(link::well_known_core(&message.uri_query));
                let reply = self.reply_to(pref, &message, Code::CONTENT);
                self.send_to(
                    pref,
                    Tx::Content {
                        ty: reply.ty,
                        mid: reply.mid,
                        token: reply.token,
                        observe: None,
                        content_format: Some(link::CONTENT_FORMAT),
                        block: None,
                        payload: body,
                    },
                );
            }
            Ok(Action::Publish {
                topic,
                qos,
                retain,
                client_id,
            }) => {
                // Kept on the peer (no copy per request); the origin shares it.
                if let Some(id) = client_id {
                    self.set_client_id(pref, id);
                }
                let has_id = client_id.is_some();
                self.on_publish(now, pref, message, topic, qos, retain, has_id);
            }
            Ok(Action::Get {
                filter,
                observe,
                qos,
                client_id,
            }) => {
                if let Some(id) = client_id {
                    self.set_client_id(pref, id);
                }
                // A read or an observation receives the topic's messages: the subscribe ACL.
                let check = Check::Subscribe { filter: &filter };
                if let Err(denied) = self.authorize(now, pref, client_id, check) {
                    self.refuse_denied(now, pref, &message, denied);
                    return;
                }
                self.on_get(now, pref, &message, filter, observe, qos);
            }
        }
    }

    /// Looks `mid` up in the peer's dedup table: `None` = new; `Some(answer)` = a duplicate
    /// (with what to send again, if anything).
    fn duplicate(&mut self, now: Instant, pref: PeerRef, mid: u16) -> Option<Option<Reply>> {
        let config = &self.config;
        let peer = slot(&self.slots, pref)?;
        let index = peer.dedup_find(mid, now, config)?;
        let entry = *peer.dedup.get(index)?;
        Some(match entry.state {
            DedupState::Answered(reply) => Some(reply),
            DedupState::Separate => entry.con.then(|| Reply::empty_ack(mid)),
            DedupState::Silent => None,
            DedupState::InProgress(token) => {
                if !entry.con {
                    return Some(None);
                }
                // The client's retransmission timer fired: ack_wait is past for it.
                if let Some(p) = self.pending.get_mut(&token).filter(|p| !p.acked) {
                    p.acked = true;
                    self.stats.empty_acks += 1;
                }
                Some(Reply::empty_ack(mid))
            }
        })
    }

    /// Remembers a request (FIFO, bounded by `dedup_per_peer`).
    fn remember(&mut self, now: Instant, pref: PeerRef, mid: u16, con: bool, state: DedupState) {
        let bound = self.config.dedup_per_peer;
        if bound == 0 {
            return;
        }
        let config = &self.config;
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        while let Some(front) = peer.dedup.front() {
            if elapsed(front.at, now) >= lifetime(config, front.con) {
                peer.dedup.pop_front();
            } else if peer.dedup.len() >= bound {
                peer.dedup.pop_front();
                self.stats.dedup_evicted_early += 1;
            } else {
                break;
            }
        }
        peer.dedup.push_back(Dedup {
            mid,
            con,
            at: now,
            state,
        });
    }

    /// Sets the dedup state of the live entry for `mid` (if still there).
    fn set_dedup(&mut self, pref: PeerRef, mid: u16, token: u64, state: DedupState) {
        let entry = slot_mut(&mut self.slots, pref).and_then(|peer| {
            peer.dedup
                .iter_mut()
                .rev()
                .find(|d| d.mid == mid && d.state == DedupState::InProgress(token))
        });
        if let Some(entry) = entry {
            entry.state = state;
        }
    }

    /// A reply to `request` with `code`: piggy-backed on the ACK for a CON, a NON with a new
    /// Message ID for a NON.
    fn reply_to(&mut self, pref: PeerRef, request: &Message, code: Code) -> Reply {
        if request.ty == MessageType::Con {
            Reply::new(MessageType::Ack, code, request.message_id, request.token)
        } else {
            let mid = slot_mut(&mut self.slots, pref).map_or(0, PeerState::next_mid);
            Reply::new(MessageType::Non, code, mid, request.token)
        }
    }

    /// Sends `reply` now (subject to No-Response) and remembers it for duplicates.
    fn answer(
        &mut self,
        now: Instant,
        pref: PeerRef,
        request: &Message,
        no_response: u8,
        reply: Reply,
        remember: bool,
    ) {
        let con = request.ty == MessageType::Con;
        let state = if suppressed(no_response, reply.code) {
            if con {
                let ack = Reply::empty_ack(request.message_id);
                self.send_to(pref, Tx::Reply(ack));
                DedupState::Answered(ack)
            } else {
                DedupState::Silent
            }
        } else {
            self.send_to(pref, Tx::Reply(reply));
            DedupState::Answered(reply)
        };
        if remember {
            self.remember(now, pref, request.message_id, con, state);
        }
    }

    fn refuse_request(
        &mut self,
        now: Instant,
        pref: PeerRef,
        request: &Message,
        refusal: Refusal,
        remember: bool,
    ) {
        tracing::debug!(code = %refusal.code, diagnostic = refusal.diagnostic, "CoAP request refused.");
        let mut reply = self.reply_to(pref, request, refusal.code);
        reply.payload = refusal.diagnostic;
        let no_response = request.no_response.unwrap_or(0);
        self.answer(now, pref, request, no_response, reply, remember);
    }

    /// 5.03 Service Unavailable with Max-Age.
    fn busy(&mut self, now: Instant, pref: PeerRef, request: &Message, remember: bool) {
        self.stats.refuse(RefusalReason::Congestion);
        let mut reply = self.reply_to(pref, request, Code::SERVICE_UNAVAILABLE);
        reply.max_age = Some(self.config.busy_max_age);
        let no_response = request.no_response.unwrap_or(0);
        self.answer(now, pref, request, no_response, reply, remember);
    }

    fn set_client_id(&mut self, pref: PeerRef, id: &str) {
        if let Some(peer) =
            slot_mut(&mut self.slots, pref).filter(|p| p.client_id.as_deref() != Some(id))
        {
            peer.client_id = Some(Arc::from(id));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_publish(
        &mut self,
        now: Instant,
        pref: PeerRef,
        mut message: Message,
        topic: String,
        qos: u8,
        retain: bool,
        has_id: bool,
    ) {
        let con = message.ty == MessageType::Con;
        let no_response = message.no_response.unwrap_or(0);
        let query_id = if has_id {
            slot(&self.slots, pref).and_then(|p| p.client_id.clone())
        } else {
            None
        };
        // The ACL before any block is taken; the rate once the whole body is known.
        let check = Check::Publish { topic: &topic };
        if let Err(denied) = self.authorize(now, pref, query_id.as_deref(), check) {
            self.refuse_denied(now, pref, &message, denied);
            return;
        }
        let (payload, echo) = match message.block1 {
            Some(block) => match self.offer_block(now, pref, &message, block) {
                Some((body, echo)) => (body, Some(echo)),
                None => return,
            },
            None if message.payload.len() > self.config.max_body_size => {
                self.stats.refuse(RefusalReason::TooLarge);
                let mut reply = self.reply_to(pref, &message, Code::REQUEST_ENTITY_TOO_LARGE);
                reply.size1 = Some(u32::try_from(self.config.max_body_size).unwrap_or(u32::MAX));
                self.answer(now, pref, &message, no_response, reply, true);
                return;
            }
            None => (Bytes::from(std::mem::take(&mut message.payload)), None),
        };
        let check = Check::Rate { len: payload.len() };
        if let Err(denied) = self.authorize(now, pref, query_id.as_deref(), check) {
            self.refuse_denied(now, pref, &message, denied);
            return;
        }
        let Some(peer) = slot(&self.slots, pref) else {
            return;
        };
        if qos > 0
            && peer.pending_verdicts + peer.uploads.len() >= self.config.max_exchanges_per_peer
        {
            self.busy(now, pref, &message, true);
            return;
        }
        let origin = Origin {
            protocol: Protocol::Coap,
            client_id: if has_id { peer.client_id.clone() } else { None },
            peer: Some(peer.origin_peer.clone()),
        };
        // Local delivery needs the topic only when someone here may want it.
        let local =
            (retain || !self.exact.is_empty() || !self.wild.is_empty()).then(|| LocalMessage {
                topic: Arc::from(topic.as_str()),
                payload: payload.clone(),
                qos,
                retain,
            });
        let upstream = Upstream {
            topic,
            payload,
            qos: upstream_qos(qos),
            retain,
            origin,
        };
        if let Some(n) = self.stats.publishes.get_mut(usize::from(qos) + 1) {
            *n += 1;
        }
        let request = Message {
            payload: Vec::new(),
            ..message
        };
        if qos == 0 {
            self.events.push_back(Event::Publish {
                message: upstream,
                token: None,
            });
            let mut reply = self.reply_to(pref, &request, Code::CHANGED);
            reply.block1 = echo;
            self.answer(now, pref, &request, no_response, reply, true);
            if let Some(local) = local {
                self.deliver_local(now, local);
            }
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        let mut acked = false;
        if con && self.config.ack_wait.is_zero() {
            acked = true;
            self.stats.empty_acks += 1;
            self.send_to(pref, Tx::Reply(Reply::empty_ack(request.message_id)));
        } else if con {
            self.schedule(now, self.config.ack_wait, Timer::AckWait(token));
        }
        self.pending.insert(
            token,
            Pending {
                peer: pref,
                mid: request.message_id,
                con,
                token: request.token,
                acked,
                no_response,
                block1: echo,
                local,
            },
        );
        if let Some(peer) = slot_mut(&mut self.slots, pref) {
            peer.pending_verdicts += 1;
        }
        self.remember(
            now,
            pref,
            request.message_id,
            con,
            DedupState::InProgress(token),
        );
        self.events.push_back(Event::Publish {
            message: upstream,
            token: Some(token),
        });
    }

    /// Offers one Block1 block to the reassembly table: the whole body and the final echo
    /// once complete; otherwise answers (2.31, 4.08, 4.00, 4.13, 5.03) and returns `None`.
    fn offer_block(
        &mut self,
        now: Instant,
        pref: PeerRef,
        request: &Message,
        block: Block,
    ) -> Option<(Bytes, Block)> {
        let no_response = request.no_response.unwrap_or(0);
        let uri = transfer_key(request);
        let lifetime = self.config.block_lifetime;
        let limit = self.config.max_exchanges_per_peer;
        let peer = slot_mut(&mut self.slots, pref)?;
        // The peer's uploads mirror the table's (same idle lifetime): what a new one counts
        // against `max_exchanges_per_peer`, with the verdicts pending.
        peer.uploads
            .retain(|(_, last)| elapsed(*last, now) < lifetime);
        let known = peer.uploads.iter().any(|(k, _)| *k == uri);
        if block.num() == 0
            && block.more()
            && !known
            && peer.pending_verdicts + peer.uploads.len() >= limit
        {
            self.busy(now, pref, request, true);
            return None;
        }
        let verdict = self.block1.offer(
            now,
            (pref, uri.clone()),
            block,
            &request.payload,
            request.size1,
            self.body_szx,
        );
        let peer = slot_mut(&mut self.slots, pref)?;
        match &verdict {
            Block1Verdict::Continue { .. } | Block1Verdict::Duplicate { .. } => {
                match peer.uploads.iter_mut().find(|(k, _)| *k == uri) {
                    Some(entry) => entry.1 = now,
                    None => peer.uploads.push((uri, now)),
                }
            }
            _ => peer.uploads.retain(|(k, _)| *k != uri),
        }
        let (code, reason) = match verdict {
            Block1Verdict::Complete { body, echo } => return Some((body, echo)),
            Block1Verdict::Continue { echo } | Block1Verdict::Duplicate { echo } => {
                let mut reply = self.reply_to(pref, request, Code::CONTINUE);
                reply.block1 = Some(echo);
                self.answer(now, pref, request, no_response, reply, true);
                return None;
            }
            Block1Verdict::Busy => {
                self.busy(now, pref, request, true);
                return None;
            }
            Block1Verdict::TooLarge { limit } => {
                self.stats.refuse(RefusalReason::TooLarge);
                let mut reply = self.reply_to(pref, request, Code::REQUEST_ENTITY_TOO_LARGE);
                reply.size1 = Some(u32::try_from(limit).unwrap_or(u32::MAX));
                self.answer(now, pref, request, no_response, reply, true);
                return None;
            }
            Block1Verdict::Incomplete => (Code::REQUEST_ENTITY_INCOMPLETE, "incomplete"),
            Block1Verdict::BadRequest => (Code::BAD_REQUEST, "bad block size"),
        };
        self.stats.refuse(RefusalReason::Malformed);
        let refusal = Refusal {
            code,
            diagnostic: reason,
            reason: RefusalReason::Malformed,
        };
        self.refuse_request(now, pref, request, refusal, true);
        None
    }

    fn on_publish_result(&mut self, now: Instant, token: u64, outcome: PublishOutcome) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let (code, max_age, payload) = match outcome {
            PublishOutcome::Accepted => (Code::CHANGED, None, ""),
            PublishOutcome::Congestion => {
                self.stats.refuse(RefusalReason::Congestion);
                (
                    Code::SERVICE_UNAVAILABLE,
                    Some(self.config.busy_max_age),
                    "",
                )
            }
            PublishOutcome::NoRoute => {
                self.stats.refuse(RefusalReason::NotAllowed);
                (Code::FORBIDDEN, None, "no route")
            }
        };
        if let Some(peer) = slot_mut(&mut self.slots, p.peer) {
            peer.pending_verdicts = peer.pending_verdicts.saturating_sub(1);
            if outcome == PublishOutcome::Accepted {
                self.stats.acks += 1;
            }
            let silent = suppressed(p.no_response, code);
            let state = if p.con && !p.acked {
                let reply = if silent {
                    Reply::empty_ack(p.mid)
                } else {
                    Reply {
                        max_age,
                        payload,
                        block1: p.block1,
                        ..Reply::new(MessageType::Ack, code, p.mid, p.token)
                    }
                };
                self.transmits
                    .push_back((peer.peer.clone(), Tx::Reply(reply)));
                DedupState::Answered(reply)
            } else if p.con {
                if !silent {
                    let reply = Reply {
                        max_age,
                        payload,
                        block1: p.block1,
                        ..Reply::new(MessageType::Con, code, 0, p.token)
                    };
                    peer.waiting.push_back(Waiting::Separate(reply));
                    self.stats.separate_responses += 1;
                }
                DedupState::Separate
            } else if silent {
                DedupState::Silent
            } else {
                let reply = Reply {
                    max_age,
                    payload,
                    block1: p.block1,
                    ..Reply::new(MessageType::Non, code, peer.next_mid(), p.token)
                };
                self.transmits
                    .push_back((peer.peer.clone(), Tx::Reply(reply)));
                DedupState::Answered(reply)
            };
            self.set_dedup(p.peer, p.mid, token, state);
            self.pump_peer(now, p.peer);
        }
        if let (PublishOutcome::Accepted, Some(local)) = (outcome, p.local) {
            self.deliver_local(now, local);
        }
    }

    // ------------------------------------------------------------------------------------
    // GET and Observe.

    fn on_get(
        &mut self,
        now: Instant,
        pref: PeerRef,
        request: &Message,
        filter: String,
        observe: Option<u32>,
        qos: u8,
    ) {
        // A Block2 follow-up (NUM > 0) is a read whatever Observe says (RFC 7959 2.6).
        let follow_up = request.block2.is_some_and(|b| b.num() > 0);
        match observe {
            _ if follow_up => self.read(now, pref, request, &filter),
            Some(0) => self.register(now, pref, request, filter, qos),
            Some(1) => {
                if let Some(oref) = self.obs_by_key.get(&(pref, request.token)).copied() {
                    self.stats.observations_cancelled += 1;
                    self.remove_observation(oref);
                }
                self.read(now, pref, request, &filter);
            }
            _ => self.read(now, pref, request, &filter),
        }
    }

    /// A plain read: the retained value of one topic (2.05) or 4.04.
    fn read(&mut self, now: Instant, pref: PeerRef, request: &Message, topic: &str) {
        if resource::is_wild(topic) {
            self.stats.refuse(RefusalReason::InvalidTopic);
            let refusal = Refusal {
                code: Code::BAD_REQUEST,
                diagnostic: "wildcard read",
                reason: RefusalReason::InvalidTopic,
            };
            self.refuse_request(now, pref, request, refusal, false);
            return;
        }
        let path: Arc<str> = Arc::from(topic);
        let want = request.block2;
        if let Some(b) = want.filter(|b| b.num() > 0) {
            // A Block2 follow-up (RFC 7959 2.6): the cached body, else the current value.
            let key = (pref, path.clone());
            let cached = self.block2.get(now, &key);
            let cached = cached.or_else(|| {
                let body = self.retained.get(topic).cloned()?;
                let etag = self.block2.insert(now, key, body.clone());
                Some((body, etag))
            });
            let Some((body, etag)) = cached else {
                let refusal = Refusal {
                    code: Code::NOT_FOUND,
                    diagnostic: "",
                    reason: RefusalReason::Malformed,
                };
                self.stats.refuse(RefusalReason::Malformed);
                self.refuse_request(now, pref, request, refusal, false);
                return;
            };
            let szx = b.szx().min(self.body_szx);
            match cut(&body, b.num(), szx, etag) {
                Some((payload, block)) => {
                    self.content(pref, request, None, payload, Some(block));
                }
                None => {
                    let refusal = Refusal {
                        code: Code::BAD_REQUEST,
                        diagnostic: "no such block",
                        reason: RefusalReason::Malformed,
                    };
                    self.stats.refuse(RefusalReason::Malformed);
                    self.refuse_request(now, pref, request, refusal, false);
                }
            }
            return;
        }
        match self.retained.get(topic).cloned() {
            Some(payload) => {
                let (payload, block) =
                    self.cut_body(now, pref, &path, request.token, payload, want);
                self.content(pref, request, None, payload, block);
            }
            None => {
                self.stats.refuse(RefusalReason::Malformed);
                let refusal = Refusal {
                    code: Code::NOT_FOUND,
                    diagnostic: "",
                    reason: RefusalReason::Malformed,
                };
                self.refuse_request(now, pref, request, refusal, false);
            }
        }
    }

    /// Whether a 2.05 with this token, an Observe option and `payload` fits one datagram.
    fn fits(&self, token: Token, payload: usize) -> bool {
        // Header 4, token, Observe 4, payload marker 1.
        4 + token.len() + 4 + 1 + payload <= self.config.max_message_size
    }

    /// Answers `request` with 2.05 and `payload` (and `observe`).
    fn content(
        &mut self,
        pref: PeerRef,
        request: &Message,
        observe: Option<u32>,
        payload: Bytes,
        block: Option<BodyBlock>,
    ) {
        if suppressed(request.no_response.unwrap_or(0), Code::CONTENT) {
            if request.ty == MessageType::Con {
                self.send_to(pref, Tx::Reply(Reply::empty_ack(request.message_id)));
            }
            return;
        }
        let reply = self.reply_to(pref, request, Code::CONTENT);
        self.send_to(
            pref,
            Tx::Content {
                ty: reply.ty,
                mid: reply.mid,
                token: reply.token,
                observe,
                content_format: None,
                block,
                payload,
            },
        );
    }

    /// A fresh response body as sent: whole when it fits one message (and the client's
    /// Block2 size, if it asked for one), else its first block, the body cached under
    /// (peer, `path`) for the client's follow-ups (RFC 7959 2.4).
    fn cut_body(
        &mut self,
        now: Instant,
        pref: PeerRef,
        path: &Arc<str>,
        token: Token,
        body: Bytes,
        want: Option<Block>,
    ) -> (Bytes, Option<BodyBlock>) {
        let szx = want.map_or(self.body_szx, |b| b.szx().min(self.body_szx));
        let limit = if want.is_some() {
            16usize << szx
        } else {
            self.config.block_size
        };
        if body.len() <= limit && self.fits(token, body.len()) {
            return (body, None);
        }
        let etag = self.block2.insert(now, (pref, path.clone()), body.clone());
        match cut(&body, 0, szx, etag) {
            Some((payload, block)) => (payload, Some(block)),
            // Block 0 always exists.
            None => (Bytes::new(), None),
        }
    }

    /// `GET P Observe=0`: a new observation, or a re-registration of (peer, token).
    fn register(
        &mut self,
        now: Instant,
        pref: PeerRef,
        request: &Message,
        filter: String,
        qos: u8,
    ) {
        if request.token.is_empty() {
            // Observations are told apart by token; an empty one would collide.
            let refusal = Refusal {
                code: Code::BAD_REQUEST,
                diagnostic: "token required",
                reason: RefusalReason::Malformed,
            };
            self.stats.refuse(RefusalReason::Malformed);
            self.refuse_request(now, pref, request, refusal, false);
            return;
        }
        let key = (pref, request.token);
        let mut seq = None;
        if let Some(oref) = self.obs_by_key.get(&key).copied() {
            let same = obs_slot(&self.obs, oref).is_some_and(|o| *o.filter == *filter);
            if same {
                self.reregister(now, oref, request, qos);
                return;
            }
            // Another path: the old observation is replaced; its sequence space continues.
            seq = obs_slot(&self.obs, oref).map(|o| o.seq);
            self.remove_observation(oref);
        }
        let filter: Arc<str> = Arc::from(filter);
        let new_filter = !self.is_indexed(&filter);
        let per_peer = slot(&self.slots, pref).map_or(0, |p| p.observations.len());
        if self.obs_by_key.len() >= self.config.max_observers
            || per_peer >= self.config.max_observers_per_peer
            || (new_filter && self.filter_count() >= self.config.max_filters)
        {
            tracing::debug!(%filter, "CoAP observation refused: limits.");
            self.busy(now, pref, request, false);
            return;
        }
        let seq = seq.unwrap_or_else(|| self.rng.random::<u32>() & SEQ_MASK);
        let oref = self.alloc_obs(Observation {
            generation: 0,
            peer: pref,
            token: request.token,
            filter: filter.clone(),
            qos,
            seq,
            queue: VecDeque::new(),
            in_flight: false,
            non_since_con: 0,
            last_con: now,
            registering: None,
        });
        self.obs_by_key.insert(key, oref);
        if let Some(peer) = slot_mut(&mut self.slots, pref) {
            peer.observations.push(oref);
            if peer.observations.len() == 1 {
                peer.last_con_ok = now;
            }
        }
        self.arm_ping(now, pref);
        self.index_and_answer(now, oref, &filter, qos, request);
    }

    /// Indexes `oref` under `filter` and answers its registration, at once when the router
    /// holds the filter already, else when its answer comes ([`Self::on_subscribe_result`]).
    fn index_and_answer(
        &mut self,
        now: Instant,
        oref: ObsRef,
        filter: &Arc<str>,
        qos: u8,
        request: &Message,
    ) {
        if self.index(oref, filter, qos) {
            if let Some(o) = obs_slot_mut(&mut self.obs, oref) {
                o.registering = Some(Registering {
                    ty: request.ty,
                    mid: request.message_id,
                });
            }
            if let Some(entry) = self.entry_mut(filter) {
                entry.awaiting.push(oref);
            }
        } else {
            self.answer_registration(now, oref, request.ty, request.message_id);
        }
    }

    fn reregister(&mut self, now: Instant, oref: ObsRef, request: &Message, qos: u8) {
        let Some(o) = obs_slot_mut(&mut self.obs, oref) else {
            return;
        };
        if o.registering.is_some() {
            // Still waiting for the router: its answer goes out then.
            return;
        }
        let filter = o.filter.clone();
        o.qos = qos;
        self.index_and_answer(now, oref, &filter, qos, request);
    }

    /// 2.05 with Observe = the current sequence number, the retained value of an exact topic.
    fn answer_registration(&mut self, now: Instant, oref: ObsRef, ty: MessageType, mid: u16) {
        let Some(o) = obs_slot(&self.obs, oref) else {
            return;
        };
        let (pref, token, seq) = (o.peer, o.token, o.seq);
        let filter = o.filter.clone();
        let value = if has_wildcards(&filter) {
            None
        } else {
            self.retained.get(&filter).cloned()
        };
        let (payload, block) = match value {
            Some(body) => self.cut_body(now, pref, &filter, token, body, None),
            None => (Bytes::new(), None),
        };
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        let (ty, mid) = match ty {
            MessageType::Con => (MessageType::Ack, mid),
            _ => (MessageType::Non, peer.next_mid()),
        };
        let tx = Tx::Content {
            ty,
            mid,
            token,
            observe: Some(seq),
            content_format: None,
            block,
            payload,
        };
        self.transmits.push_back((peer.peer.clone(), tx));
        self.pump_obs(now, oref);
    }

    fn on_subscribe_result(&mut self, now: Instant, filter: &str, accepted: bool) {
        let Some(entry) = self.entry_mut(filter) else {
            return;
        };
        if accepted {
            entry.confirmed = true;
        }
        let awaiting = std::mem::take(&mut entry.awaiting);
        for oref in awaiting {
            let Some(o) = obs_slot_mut(&mut self.obs, oref) else {
                continue;
            };
            let Some(reg) = o.registering.take() else {
                continue;
            };
            if accepted {
                self.answer_registration(now, oref, reg.ty, reg.mid);
            } else {
                let pref = o.peer;
                let token = o.token;
                self.remove_observation(oref);
                self.stats.refuse(RefusalReason::Congestion);
                let Some(peer) = slot_mut(&mut self.slots, pref) else {
                    continue;
                };
                let (ty, mid) = match reg.ty {
                    MessageType::Con => (MessageType::Ack, reg.mid),
                    _ => (MessageType::Non, peer.next_mid()),
                };
                let mut reply = Reply::new(ty, Code::SERVICE_UNAVAILABLE, mid, token);
                reply.max_age = Some(self.config.busy_max_age);
                self.transmits
                    .push_back((peer.peer.clone(), Tx::Reply(reply)));
            }
        }
    }

    fn filter_count(&self) -> usize {
        self.exact.len() + self.wild.len()
    }

    fn is_indexed(&self, filter: &str) -> bool {
        if has_wildcards(filter) {
            self.wild.contains_key(filter)
        } else {
            self.exact.contains_key(filter)
        }
    }

    fn entry_mut(&mut self, filter: &str) -> Option<&mut FilterEntry> {
        if has_wildcards(filter) {
            self.wild.get_mut(filter)
        } else {
            self.exact.get_mut(filter)
        }
    }

    /// Adds (or updates) `oref` among the observers of `filter`, emitting
    /// [`Event::Subscribe`] for a new filter or a higher QoS; returns whether the registration
    /// must wait for the router's answer (one was asked for, now or by an earlier observer).
    fn index(&mut self, oref: ObsRef, filter: &Arc<str>, qos: u8) -> bool {
        let map = if has_wildcards(filter) {
            &mut self.wild
        } else {
            &mut self.exact
        };
        let mut new = false;
        let entry = map.entry(filter.clone()).or_insert_with(|| {
            new = true;
            FilterEntry::default()
        });
        entry.observers.insert(oref, qos);
        let wanted = entry.observers.values().copied().max().unwrap_or(0);
        if new || wanted > entry.upstream_qos {
            entry.upstream_qos = wanted;
            self.events.push_back(Event::Subscribe {
                filter: filter.clone(),
                qos: upstream_qos(wanted),
            });
            return true;
        }
        if wanted < entry.upstream_qos && entry.confirmed {
            // A re-registration lowered the highest QoS (as `unindex` does when one leaves).
            entry.upstream_qos = wanted;
            self.events.push_back(Event::Subscribe {
                filter: filter.clone(),
                qos: upstream_qos(wanted),
            });
        }
        !entry.confirmed
    }

    /// Removes `oref` from its filter's observers (Unsubscribe when it was the last, a lower
    /// re-Subscribe when the highest QoS left).
    fn unindex(&mut self, oref: ObsRef, filter: &Arc<str>) {
        let map = if has_wildcards(filter) {
            &mut self.wild
        } else {
            &mut self.exact
        };
        let Some(entry) = map.get_mut(filter) else {
            return;
        };
        entry.observers.remove(&oref);
        entry.awaiting.retain(|o| *o != oref);
        if entry.observers.is_empty() {
            let confirmed = entry.confirmed;
            map.remove(filter);
            if confirmed {
                self.events.push_back(Event::Unsubscribe {
                    filter: filter.clone(),
                });
            }
        } else {
            let wanted = entry.observers.values().copied().max().unwrap_or(0);
            if wanted < entry.upstream_qos && entry.confirmed {
                entry.upstream_qos = wanted;
                self.events.push_back(Event::Subscribe {
                    filter: filter.clone(),
                    qos: upstream_qos(wanted),
                });
            }
        }
    }

    fn alloc_obs(&mut self, mut o: Observation) -> ObsRef {
        if let Some(slot) = self.obs_free.pop() {
            let generation = self
                .obs_generations
                .get(slot as usize)
                .copied()
                .unwrap_or(0);
            o.generation = generation;
            if let Some(s) = self.obs.get_mut(slot as usize) {
                *s = Some(o);
            }
            ObsRef { slot, generation }
        } else {
            let slot = u32::try_from(self.obs.len()).unwrap_or(u32::MAX);
            o.generation = 0;
            self.obs.push(Some(o));
            self.obs_generations.push(0);
            ObsRef {
                slot,
                generation: 0,
            }
        }
    }

    /// Removes an observation: index, key, its peer's list; what it had queued is dropped
    /// (counted expired). A CON notification of it in flight completes on its own.
    fn remove_observation(&mut self, oref: ObsRef) {
        if obs_slot(&self.obs, oref).is_none() {
            return;
        }
        let Some(o) = self.obs.get_mut(oref.slot as usize).and_then(Option::take) else {
            return;
        };
        if let Some(g) = self.obs_generations.get_mut(oref.slot as usize) {
            *g = g.wrapping_add(1);
        }
        self.obs_free.push(oref.slot);
        self.stats
            .drop_downlink(DownlinkDropReason::Expired, o.queue.len() as u64);
        self.obs_by_key.remove(&(o.peer, o.token));
        if let Some(peer) = slot_mut(&mut self.slots, o.peer) {
            peer.observations.retain(|x| *x != oref);
            peer.non_sent.retain(|(_, x)| *x != oref);
        }
        self.unindex(oref, &o.filter);
    }

    /// The peer is gone (a CON to it went unanswered): every observation of it ends.
    fn peer_gone(&mut self, pref: PeerRef) {
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        let observations = std::mem::take(&mut peer.observations);
        tracing::debug!(peer = %peer.peer, observations = observations.len(), "CoAP observer gone (no answer).");
        self.stats.observations_cancelled += observations.len() as u64;
        for oref in observations {
            self.remove_observation(oref);
        }
        if let Some(peer) = slot_mut(&mut self.slots, pref) {
            peer.waiting.retain(|w| matches!(w, Waiting::Separate(_)));
        }
    }

    // ------------------------------------------------------------------------------------
    // Downlink.

    fn remember_retained(&mut self, topic: &str, payload: &Bytes) {
        if payload.is_empty() {
            self.retained.remove(topic);
            return;
        }
        if let Some(value) = self.retained.get_mut(topic) {
            *value = payload.clone();
        } else if self.retained.len() < self.config.max_retained {
            self.retained.insert(Arc::from(topic), payload.clone());
        }
    }

    fn deliver_local(&mut self, now: Instant, local: LocalMessage) {
        if local.retain {
            self.remember_retained(&local.topic, &local.payload);
        }
        let _ = self.deliver(now, &local.topic, &local.payload, local.qos, None);
    }

    /// Queues `payload` for every matching observation; returns how many.
    fn deliver(
        &mut self,
        now: Instant,
        topic: &str,
        payload: &Bytes,
        qos: u8,
        filters: Option<&[Arc<str>]>,
    ) -> usize {
        let mut targets = std::mem::take(&mut self.scratch);
        targets.clear();
        let mut collect = |entry: &FilterEntry| {
            targets.extend(
                entry
                    .observers
                    .iter()
                    .map(|(oref, sub_qos)| (*oref, (*sub_qos).min(qos))),
            );
        };
        match filters {
            Some(filters) => {
                for (i, filter) in filters.iter().enumerate() {
                    // Each entry once, even if the list repeats a filter.
                    if filters.get(..i).is_some_and(|seen| seen.contains(filter)) {
                        continue;
                    }
                    let entry = if has_wildcards(filter) {
                        self.wild.get(filter).filter(|_| matches(filter, topic))
                    } else {
                        self.exact.get(filter).filter(|_| **filter == *topic)
                    };
                    if let Some(entry) = entry {
                        collect(entry);
                    }
                }
            }
            None => {
                if let Some(entry) = self.exact.get(topic) {
                    collect(entry);
                }
                for (filter, entry) in &self.wild {
                    if matches(filter, topic) {
                        collect(entry);
                    }
                }
            }
        }
        // A peer's notifications adjacent (the observers map has no order): the driver sends
        // a peer's equal-length datagrams as one GSO send (io::batch). Order across one
        // peer's observations of one message does not matter.
        targets.sort_by_key(|(oref, _)| obs_slot(&self.obs, *oref).map(|o| o.peer));
        let mut queued = 0;
        for &(oref, q) in &targets {
            // An observation made under an earlier ACL gets only what the ACL in force allows.
            if !self.obs_may_receive(oref, topic) {
                self.security_counters.count(Denial::AclDeniedDelivery);
                continue;
            }
            if self.enqueue(now, oref, payload, q) {
                queued += 1;
            }
        }
        self.scratch = targets;
        queued
    }

    /// Whether observation `oref` may be notified of `topic` under the ACL in force: its
    /// peer's DTLS identity, else the peer's last `id` query as a claimed one.
    fn obs_may_receive(&self, oref: ObsRef, topic: &str) -> bool {
        if self.config.security.acl.is_none() {
            return true;
        }
        let Some(peer) = obs_slot(&self.obs, oref).and_then(|o| slot(&self.slots, o.peer)) else {
            return true;
        };
        let claimed;
        let identity = match &peer.peer.identity {
            Some(id) => Some(&**id),
            None => {
                claimed = peer
                    .client_id
                    .as_ref()
                    .map(|id| Identity::new(Arc::clone(id), IdentitySource::CoapQuery));
                claimed.as_ref()
            }
        };
        let name = identity.map(|i| &*i.name);
        self.config
            .security
            .may_receive(&Requester::new(identity, name), topic)
    }

    /// Queues one notification for `oref` and sends what its window allows.
    fn enqueue(&mut self, now: Instant, oref: ObsRef, payload: &Bytes, qos: u8) -> bool {
        let limit = self.config.max_queued_per_observer;
        let policy = self.config.queue_full;
        let Some(o) = obs_slot(&self.obs, oref) else {
            return false;
        };
        let whole = payload.len() <= self.config.block_size && self.fits(o.token, payload.len());
        let (payload, block) = if whole {
            (payload.clone(), None)
        } else {
            // A large message goes as its first block (+ETag); the client fetches the rest.
            let (pref, token, filter) = (o.peer, o.token, o.filter.clone());
            self.cut_body(now, pref, &filter, token, payload.clone(), None)
        };
        let Some(o) = obs_slot_mut(&mut self.obs, oref) else {
            return false;
        };
        if o.queue.len() >= limit {
            self.stats.drop_downlink(DownlinkDropReason::QueueFull, 1);
            match policy {
                QueueFull::DropNew => return false,
                QueueFull::DropOldest => {
                    o.queue.pop_front();
                }
            }
        }
        if limit == 0 {
            return false;
        }
        o.queue.push_back(Down {
            payload,
            qos,
            block,
        });
        self.pump_obs(now, oref);
        true
    }

    // ------------------------------------------------------------------------------------
    // Sending CONs: NSTART window, retransmission.

    /// Sends what the peer's window allows: waiting separate responses and pings first, then
    /// the observations' queues, round-robin.
    fn pump_peer(&mut self, now: Instant, pref: PeerRef) {
        let nstart = self.config.nstart.max(1);
        loop {
            let Some(peer) = slot_mut(&mut self.slots, pref) else {
                return;
            };
            if peer.in_flight.len() >= nstart {
                return;
            }
            let Some(w) = peer.waiting.pop_front() else {
                break;
            };
            let kind = match w {
                Waiting::Separate(reply) => OutKind::Separate(reply),
                Waiting::Ping => {
                    self.stats.pings += 1;
                    OutKind::Ping
                }
            };
            self.send_con(now, pref, kind);
        }
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        let n = peer.observations.len();
        if n == 0 {
            return;
        }
        let start = peer.rr % n;
        peer.rr = peer.rr.wrapping_add(1);
        for i in 0..n {
            let Some(oref) = slot(&self.slots, pref)
                .and_then(|p| p.observations.get((start + i) % n.max(1)).copied())
            else {
                break;
            };
            self.pump_obs(now, oref);
        }
    }

    /// Sends the notifications of `oref` its state allows: NONs at once, one CON at a time
    /// while the peer's window has room; order kept.
    fn pump_obs(&mut self, now: Instant, oref: ObsRef) {
        let nstart = self.config.nstart.max(1);
        let check_count = self.config.notification_check_count;
        let check_interval = self.config.notification_check_interval;
        let ring = self.config.dedup_per_peer;
        let probing_rate = self.config.probing_rate;
        loop {
            let Some(o) = obs_slot_mut(&mut self.obs, oref) else {
                return;
            };
            if o.registering.is_some() || o.in_flight {
                return;
            }
            let Some(front) = o.queue.front() else {
                return;
            };
            let con = front.qos > 0
                || (check_count > 0 && o.non_since_con.saturating_add(1) >= check_count)
                || elapsed(o.last_con, now) >= check_interval;
            let Some(peer) = slot_mut(&mut self.slots, o.peer) else {
                return;
            };
            if con && (peer.in_flight.len() >= nstart || !peer.waiting.is_empty()) {
                return;
            }
            let size = 9 + o.token.len() + front.payload.len();
            if !con && !peer.may_probe(now, size, probing_rate) {
                // Unanswering peer (RFC 7252 4.7): held until it answers, or is given up.
                return;
            }
            let Some(down) = o.queue.pop_front() else {
                return;
            };
            o.seq = o.seq.wrapping_add(1) & SEQ_MASK;
            self.stats.notifications += 1;
            if con {
                o.in_flight = true;
                o.non_since_con = 0;
                o.last_con = now;
                let kind = OutKind::Notification {
                    obs: oref,
                    token: o.token,
                    seq: o.seq,
                    block: down.block,
                    payload: down.payload,
                };
                let pref = o.peer;
                self.send_con(now, pref, kind);
            } else {
                o.non_since_con = o.non_since_con.saturating_add(1);
                let mid = peer.next_mid();
                if ring > 0 {
                    if peer.non_sent.len() >= ring {
                        peer.non_sent.pop_front();
                    }
                    peer.non_sent.push_back((mid, oref));
                }
                self.stats.downlink_delivered += 1;
                let tx = Tx::Content {
                    ty: MessageType::Non,
                    mid,
                    token: o.token,
                    observe: Some(o.seq),
                    content_format: None,
                    block: down.block,
                    payload: down.payload,
                };
                self.transmits.push_back((peer.peer.clone(), tx));
            }
        }
    }

    /// Sends a CON (first transmission) and arms its retransmission.
    fn send_con(&mut self, now: Instant, pref: PeerRef, kind: OutKind) {
        let base = self.config.ack_timeout;
        // Validated by the config (>= 1.0); kept finite and sane here whatever it says.
        let factor = self.config.ack_random_factor;
        let factor = if factor.is_finite() {
            factor.clamp(1.0, 16.0)
        } else {
            1.0
        };
        let jitter = self.rng.random_range(1.0..=factor);
        let timeout = Duration::try_from_secs_f64(base.as_secs_f64() * jitter).unwrap_or(base);
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        let mid = peer.next_mid();
        let out = OutCon {
            mid,
            kind,
            retransmits: 0,
            timeout,
            due: later(now, timeout),
        };
        self.transmits.push_back((peer.peer.clone(), out.tx()));
        self.timers
            .push(Reverse((out.due, Timer::Retransmit(pref, mid))));
        peer.in_flight.push(out);
    }

    fn on_retransmit(&mut self, now: Instant, deadline: Instant, pref: PeerRef, mid: u16) {
        let max = self.config.max_retransmit;
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        let Some(index) = peer
            .in_flight
            .iter()
            .position(|c| c.mid == mid && c.due == deadline)
        else {
            return;
        };
        let Some(out) = peer.in_flight.get_mut(index) else {
            return;
        };
        if out.retransmits < max {
            if peer.quiet.is_none() {
                peer.quiet = Some((now, 0));
            }
            out.retransmits += 1;
            out.timeout = out.timeout.saturating_mul(2);
            out.due = later(now, out.timeout);
            let due = out.due;
            let tx = out.tx();
            self.transmits.push_back((peer.peer.clone(), tx));
            self.timers
                .push(Reverse((due, Timer::Retransmit(pref, mid))));
            self.stats.retransmissions += 1;
            return;
        }
        // Given up (RFC 7252 4.2).
        let out = peer.in_flight.swap_remove(index);
        match out.kind {
            OutKind::Separate(_) => {
                self.stats.separate_expired += 1;
            }
            OutKind::Notification { obs, .. } => {
                if let Some(o) = obs_slot_mut(&mut self.obs, obs) {
                    o.in_flight = false;
                }
                self.stats.drop_downlink(DownlinkDropReason::Expired, 1);
                self.peer_gone(pref);
            }
            OutKind::Ping => self.peer_gone(pref),
        }
        self.pump_peer(now, pref);
    }

    fn on_ack(&mut self, now: Instant, from: &Peer, mid: u16) {
        let Some(pref) = self.by_addr.get(&from.addr).copied() else {
            return;
        };
        self.touch(now, pref);
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        let Some(index) = peer.in_flight.iter().position(|c| c.mid == mid) else {
            return;
        };
        let out = peer.in_flight.swap_remove(index);
        peer.last_con_ok = now;
        if let OutKind::Notification { obs, .. } = out.kind {
            self.stats.downlink_delivered += 1;
            if let Some(o) = obs_slot_mut(&mut self.obs, obs) {
                o.in_flight = false;
            }
        }
        self.pump_peer(now, pref);
    }

    fn on_rst(&mut self, now: Instant, from: &Peer, mid: u16) {
        let Some(pref) = self.by_addr.get(&from.addr).copied() else {
            return;
        };
        self.touch(now, pref);
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        let mut cancel = None;
        if let Some(index) = peer.in_flight.iter().position(|c| c.mid == mid) {
            let out = peer.in_flight.swap_remove(index);
            // Any answer shows the peer is there (an RST is how a ping is answered).
            peer.last_con_ok = now;
            if let OutKind::Notification { obs, .. } = out.kind {
                self.stats.drop_downlink(DownlinkDropReason::Rejected, 1);
                cancel = Some(obs);
            }
        } else if let Some(index) = peer.non_sent.iter().position(|(m, _)| *m == mid) {
            cancel = peer.non_sent.remove(index).map(|(_, obs)| obs);
        }
        if let Some(oref) = cancel.filter(|o| obs_slot(&self.obs, *o).is_some()) {
            self.stats.observations_cancelled += 1;
            self.remove_observation(oref);
        }
        self.pump_peer(now, pref);
    }

    // ------------------------------------------------------------------------------------
    // Peers.

    /// The peer of `from`, created if new (evicting an idle one when the table is full);
    /// `None` when the table is full of peers that cannot go.
    fn peer_for(&mut self, now: Instant, from: &Peer) -> Option<PeerRef> {
        if let Some(pref) = self.by_addr.get(&from.addr).copied() {
            self.touch(now, pref);
            return Some(pref);
        }
        if self.by_addr.len() >= self.config.max_peers && !self.evict_one() {
            return None;
        }
        let mut state = PeerState {
            generation: 0,
            peer: Peer {
                addr: from.addr.clone(),
                node: None,
                identity: from.identity.clone(),
            },
            origin_peer: Arc::from(from.addr.to_string()),
            client_id: None,
            last_seen: now,
            dedup: VecDeque::new(),
            next_mid: self.rng.random(),
            in_flight: Vec::new(),
            waiting: VecDeque::new(),
            pending_verdicts: 0,
            uploads: Vec::new(),
            observations: Vec::new(),
            non_sent: VecDeque::new(),
            rr: 0,
            last_con_ok: now,
            quiet: None,
            idle_armed: false,
            ping_armed: false,
            prev: NIL,
            next: NIL,
        };
        let pref = if let Some(slot) = self.free.pop() {
            let generation = self.generations.get(slot as usize).copied().unwrap_or(0);
            state.generation = generation;
            if let Some(s) = self.slots.get_mut(slot as usize) {
                *s = Some(state);
            }
            PeerRef { slot, generation }
        } else {
            let slot = u32::try_from(self.slots.len()).ok()?;
            self.slots.push(Some(state));
            self.generations.push(0);
            PeerRef {
                slot,
                generation: 0,
            }
        };
        self.by_addr.insert(from.addr.clone(), pref);
        self.lru_push_tail(pref.slot);
        self.arm_idle(now, pref);
        Some(pref)
    }

    /// Marks the peer seen now (most recently used).
    fn touch(&mut self, now: Instant, pref: PeerRef) {
        if let Some(peer) = slot_mut(&mut self.slots, pref) {
            peer.last_seen = now;
            peer.quiet = None;
            if peer.next != NIL {
                self.lru_unlink(pref.slot);
                self.lru_push_tail(pref.slot);
            }
        }
    }

    /// Evicts the least recently seen evictable peer, looking at [`LRU_SCAN`] at most.
    fn evict_one(&mut self) -> bool {
        for _ in 0..LRU_SCAN {
            let slot = self.lru_head;
            if slot == NIL {
                return false;
            }
            let generation = self.generations.get(slot as usize).copied().unwrap_or(0);
            let pref = PeerRef { slot, generation };
            let evictable = self::slot(&self.slots, pref).is_some_and(PeerState::evictable);
            if evictable {
                self.remove_peer(pref);
                return true;
            }
            self.lru_unlink(slot);
            self.lru_push_tail(slot);
        }
        false
    }

    fn remove_peer(&mut self, pref: PeerRef) {
        if slot(&self.slots, pref).is_none() {
            return;
        }
        self.lru_unlink(pref.slot);
        let Some(peer) = self
            .slots
            .get_mut(pref.slot as usize)
            .and_then(Option::take)
        else {
            return;
        };
        self.by_addr.remove(&peer.peer.addr);
        let _ = self.block1.remove_where(|k| k.0 == pref);
        let _ = self.block2.remove_where(|k| k.0 == pref);
        if let Some(g) = self.generations.get_mut(pref.slot as usize) {
            *g = g.wrapping_add(1);
        }
        self.free.push(pref.slot);
        self.stats.peers_evicted += 1;
    }

    fn links(&self, slot: u32) -> Option<(u32, u32)> {
        self.slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map(|p| (p.prev, p.next))
    }

    fn set_links(&mut self, slot: u32, prev: Option<u32>, next: Option<u32>) {
        if let Some(p) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) {
            if let Some(prev) = prev {
                p.prev = prev;
            }
            if let Some(next) = next {
                p.next = next;
            }
        }
    }

    fn lru_unlink(&mut self, slot: u32) {
        let Some((prev, next)) = self.links(slot) else {
            return;
        };
        if prev == NIL {
            if self.lru_head == slot {
                self.lru_head = next;
            }
        } else {
            self.set_links(prev, None, Some(next));
        }
        if next == NIL {
            if self.lru_tail == slot {
                self.lru_tail = prev;
            }
        } else {
            self.set_links(next, Some(prev), None);
        }
        self.set_links(slot, Some(NIL), Some(NIL));
    }

    fn lru_push_tail(&mut self, slot: u32) {
        let tail = self.lru_tail;
        self.set_links(slot, Some(tail), Some(NIL));
        if tail == NIL {
            self.lru_head = slot;
        } else {
            self.set_links(tail, None, Some(slot));
        }
        self.lru_tail = slot;
    }

    fn arm_idle(&mut self, now: Instant, pref: PeerRef) {
        let lifetime = self.config.exchange_lifetime;
        if let Some(peer) = slot_mut(&mut self.slots, pref).filter(|p| !p.idle_armed) {
            peer.idle_armed = true;
            let at = later(peer.last_seen.max(now), lifetime);
            self.timers.push(Reverse((at, Timer::PeerIdle(pref))));
        }
    }

    fn on_idle(&mut self, now: Instant, pref: PeerRef) {
        let lifetime = self.config.exchange_lifetime;
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        peer.idle_armed = false;
        let block_lifetime = self.config.block_lifetime;
        peer.uploads
            .retain(|(_, last)| elapsed(*last, now) < block_lifetime);
        if peer.evictable() && elapsed(peer.last_seen, now) >= lifetime {
            self.remove_peer(pref);
        } else {
            self.arm_idle(now, pref);
        }
    }

    fn arm_ping(&mut self, now: Instant, pref: PeerRef) {
        let interval = self.config.observer_ping_interval;
        if interval.is_zero() {
            return;
        }
        if let Some(peer) = slot_mut(&mut self.slots, pref).filter(|p| !p.ping_armed) {
            peer.ping_armed = true;
            let at = later(peer.last_con_ok.max(now), interval);
            self.timers.push(Reverse((at, Timer::Ping(pref))));
        }
    }

    fn on_ping_timer(&mut self, now: Instant, pref: PeerRef) {
        let interval = self.config.observer_ping_interval;
        let Some(peer) = slot_mut(&mut self.slots, pref) else {
            return;
        };
        peer.ping_armed = false;
        if peer.observations.is_empty() {
            return;
        }
        let busy =
            !peer.in_flight.is_empty() || peer.waiting.iter().any(|w| matches!(w, Waiting::Ping));
        if elapsed(peer.last_con_ok, now) >= interval && !busy {
            peer.waiting.push_back(Waiting::Ping);
            // Counted as an exchange: the next ping is an interval after this one.
            peer.last_con_ok = now;
            self.pump_peer(now, pref);
        }
        self.arm_ping(now, pref);
    }

    fn schedule(&mut self, now: Instant, delay: Duration, timer: Timer) {
        self.timers.push(Reverse((later(now, delay), timer)));
    }

    fn send_to(&mut self, pref: PeerRef, tx: Tx) {
        if let Some(peer) = slot(&self.slots, pref) {
            self.transmits.push_back((peer.peer.clone(), tx));
        }
    }

    fn on_ack_wait(&mut self, pref_token: u64) {
        let Some(p) = self.pending.get_mut(&pref_token) else {
            return;
        };
        if !p.con || p.acked {
            return;
        }
        p.acked = true;
        self.stats.empty_acks += 1;
        let (pref, mid) = (p.peer, p.mid);
        self.send_to(pref, Tx::Reply(Reply::empty_ack(mid)));
    }

    fn on_timeout(&mut self, now: Instant) {
        if self.block1.next_deadline().is_some_and(|at| at <= now) {
            self.stats.block1_expired += self.block1.expire(now) as u64;
        }
        if self.block2.next_deadline().is_some_and(|at| at <= now) {
            let _ = self.block2.expire(now);
        }
        while let Some(Reverse((deadline, timer))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::AckWait(token) => self.on_ack_wait(token),
                Timer::Retransmit(pref, mid) => self.on_retransmit(now, deadline, pref, mid),
                Timer::PeerIdle(pref) => self.on_idle(now, pref),
                Timer::Ping(pref) => self.on_ping_timer(now, pref),
            }
        }
    }

    fn encode(tx: &Tx, buf: &mut Vec<u8>) {
        match tx {
            Tx::Reply(reply) => reply.encode(buf),
            Tx::Content {
                ty,
                mid,
                token,
                observe,
                content_format,
                block,
                payload,
            } => {
                let mut response = Response::new(*ty, Code::CONTENT, *mid, *token);
                response.observe = *observe;
                response.content_format = *content_format;
                if let Some(b) = block {
                    response.etag = Some(b.etag);
                    response.block2 = Some(b.block2);
                    response.size2 = b.size2;
                }
                response.payload = payload;
                msg::encode_response(buf, &response);
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Admin.

    fn make_report(&self) -> IngressReport {
        let mut sessions = SessionCounts::default();
        for _ in self.slots.iter().flatten() {
            sessions.add(SessionState::Active);
        }
        let stats = &self.stats;
        IngressReport {
            protocol: PROTOCOL,
            sessions,
            counters: IngressCounters {
                messages_in: stats.publishes,
                acks: stats.acks,
                refusals: stats.refusals,
                downlink_delivered: stats.downlink_delivered,
                downlink_retransmitted: stats.retransmissions,
                downlink_dropped: stats.downlink_dropped,
                packets_in: stats.datagrams,
            },
        }
    }

    fn make_clients(&self, now: Instant, query: &ClientQuery) -> ClientsPage {
        let prefix = query.prefix.as_deref().unwrap_or("");
        let after = query.after.as_deref();
        if query.state.is_some_and(|s| s != SessionState::Active) {
            return ClientsPage::default();
        }
        let mut matching: Vec<(String, &PeerState)> = self
            .slots
            .iter()
            .flatten()
            .map(|p| {
                let id = p
                    .client_id
                    .as_deref()
                    .map_or_else(|| p.origin_peer.to_string(), str::to_owned);
                (id, p)
            })
            .filter(|(id, _)| id.starts_with(prefix) && after.is_none_or(|a| id.as_str() > a))
            .collect();
        let more = matching.len() > query.limit;
        if more && query.limit > 0 {
            matching.select_nth_unstable_by(query.limit, |a, b| a.0.cmp(&b.0));
        }
        matching.truncate(query.limit);
        matching.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let clients = matching
            .into_iter()
            .map(|(client_id, p)| {
                let observations = p
                    .observations
                    .iter()
                    .filter_map(|o| obs_slot(&self.obs, *o));
                ClientInfo {
                    client_id,
                    protocol: PROTOCOL,
                    address: Some(p.origin_peer.to_string()),
                    state: SessionState::Active,
                    keep_alive_secs: 0,
                    last_seen_ms_ago: u64::try_from(
                        now.saturating_duration_since(p.last_seen).as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                    subscriptions: observations
                        .clone()
                        .map(|o| SubscriptionInfo {
                            filter: o.filter.to_string(),
                            qos: o.qos,
                        })
                        .collect(),
                    queued_downlink: observations.map(|o| o.queue.len() as u64).sum(),
                    counters: None,
                }
            })
            .collect();
        ClientsPage { clients, more }
    }

    /// Checks the tables' consistency and bounds (tests and the fuzzer call it each step).
    #[cfg(any(test, feature = "invariants"))]
    #[allow(clippy::expect_used)] // A broken invariant is the finding: panic with its name.
    pub fn check_invariants(&self) {
        // Bounds as the highest any config in force had (see `reconfigure`).
        let config = &self.ceilings;
        assert!(
            self.by_addr.len() <= config.max_peers,
            "peers beyond max_peers"
        );
        let live = self.slots.iter().flatten().count();
        assert_eq!(live, self.by_addr.len(), "peer slots vs address map");
        for (addr, pref) in &self.by_addr {
            let peer = slot(&self.slots, *pref).expect("address maps to a live peer");
            assert_eq!(&peer.peer.addr, addr);
            assert!(peer.dedup.len() <= config.dedup_per_peer, "dedup bound");
            assert!(peer.in_flight.len() <= config.nstart.max(1), "NSTART");
            assert!(peer.observations.len() <= config.max_observers_per_peer);
            assert!(peer.non_sent.len() <= config.dedup_per_peer);
            let verdicts = self.pending.values().filter(|p| p.peer == *pref).count();
            assert_eq!(verdicts, peer.pending_verdicts, "pending verdicts");
            assert!(peer.pending_verdicts <= config.max_exchanges_per_peer);
            assert!(
                peer.uploads.len() <= config.max_exchanges_per_peer,
                "uploads per peer"
            );
            for o in &peer.observations {
                let obs = obs_slot(&self.obs, *o).expect("peer lists a live observation");
                assert_eq!(obs.peer, *pref);
            }
        }
        // The LRU list holds every live peer once.
        let mut count = 0;
        let mut at = self.lru_head;
        let mut prev = NIL;
        while at != NIL {
            let (p, n) = self.links(at).expect("LRU node is live");
            assert_eq!(p, prev, "LRU back link");
            prev = at;
            at = n;
            count += 1;
            assert!(count <= live, "LRU cycle");
        }
        assert_eq!(prev, self.lru_tail);
        assert_eq!(count, live, "LRU holds every peer");
        assert!(
            self.obs_by_key.len() <= config.max_observers,
            "observers bound"
        );
        assert!(self.filter_count() <= config.max_filters, "filters bound");
        let live_obs = self.obs.iter().flatten().count();
        assert_eq!(live_obs, self.obs_by_key.len());
        for ((pref, token), oref) in &self.obs_by_key {
            let o = obs_slot(&self.obs, *oref).expect("key maps to a live observation");
            assert_eq!((o.peer, o.token), (*pref, *token));
            assert!(o.queue.len() <= config.max_queued_per_observer);
            assert!(o.seq <= SEQ_MASK);
            let peer = slot(&self.slots, o.peer).expect("observation's peer is live");
            assert!(peer.observations.contains(oref));
            let entry = if has_wildcards(&o.filter) {
                self.wild.get(&o.filter)
            } else {
                self.exact.get(&o.filter)
            }
            .expect("observation's filter is indexed");
            assert_eq!(entry.observers.get(oref), Some(&o.qos));
        }
        for entry in self.exact.values().chain(self.wild.values()) {
            assert!(!entry.observers.is_empty(), "empty filter entry");
            for oref in entry.observers.keys() {
                assert!(
                    obs_slot(&self.obs, *oref).is_some(),
                    "filter lists a dead observation"
                );
            }
        }
        assert!(self.retained.len() <= config.max_retained);
        self.block1.check_invariants().expect("Block1 table");
        self.block2.check_invariants().expect("Block2 cache");
        assert!(self.block1.bytes() <= config.reassembly_bytes);
    }
}

fn slot(slots: &[Option<PeerState>], pref: PeerRef) -> Option<&PeerState> {
    slots
        .get(pref.slot as usize)
        .and_then(Option::as_ref)
        .filter(|p| p.generation == pref.generation)
}

fn slot_mut(slots: &mut [Option<PeerState>], pref: PeerRef) -> Option<&mut PeerState> {
    slots
        .get_mut(pref.slot as usize)
        .and_then(Option::as_mut)
        .filter(|p| p.generation == pref.generation)
}

fn obs_slot(obs: &[Option<Observation>], oref: ObsRef) -> Option<&Observation> {
    obs.get(oref.slot as usize)
        .and_then(Option::as_ref)
        .filter(|o| o.generation == oref.generation)
}

fn obs_slot_mut(obs: &mut [Option<Observation>], oref: ObsRef) -> Option<&mut Observation> {
    obs.get_mut(oref.slot as usize)
        .and_then(Option::as_mut)
        .filter(|o| o.generation == oref.generation)
}

/// What identifies a Block1 upload of a peer: its request URI (path and queries).
fn transfer_key(request: &Message) -> Box<str> {
    let mut key = String::new();
    for segment in &request.uri_path {
        key.push('/');
        key.push_str(segment);
    }
    for (i, q) in request.uri_query.iter().enumerate() {
        key.push(if i == 0 { '?' } else { '&' });
        key.push_str(&q.name);
        if let Some(v) = &q.value {
            key.push('=');
            key.push_str(v);
        }
    }
    key.into_boxed_str()
}

/// Block `num` of `body` at `szx`, sharing `body`'s memory, with its Block2 option.
fn cut(body: &Bytes, num: u32, szx: u8, etag: u32) -> Option<(Bytes, BodyBlock)> {
    let (slice, more) = block2_slice(body, num, szx)?;
    let block2 = Block::new(num, more, szx)?;
    let size2 = (num == 0).then(|| u32::try_from(body.len()).unwrap_or(u32::MAX));
    // `slice` is a sub-slice of `body` (block2_slice's contract): no copy.
    Some((
        body.slice_ref(slice),
        BodyBlock {
            block2,
            etag,
            size2,
        },
    ))
}

/// Concurrent Block1 uploads (no key of its own): no more than there can be peers, nor than
/// the reassembly budget holds at the smallest block (each transfer holds >= 16 bytes).
/// Raises each bound of `ceilings` that [`Core::check_invariants`] checks to `config`'s where
/// that is higher.
#[cfg(any(test, feature = "invariants"))]
fn widen_ceilings(ceilings: &mut CoreConfig, config: &CoreConfig) {
    let pairs = [
        (&mut ceilings.max_peers, config.max_peers),
        (&mut ceilings.dedup_per_peer, config.dedup_per_peer),
        (&mut ceilings.nstart, config.nstart),
        (
            &mut ceilings.max_exchanges_per_peer,
            config.max_exchanges_per_peer,
        ),
        (&mut ceilings.max_observers, config.max_observers),
        (
            &mut ceilings.max_observers_per_peer,
            config.max_observers_per_peer,
        ),
        (&mut ceilings.max_filters, config.max_filters),
        (
            &mut ceilings.max_queued_per_observer,
            config.max_queued_per_observer,
        ),
        (&mut ceilings.max_retained, config.max_retained),
        (&mut ceilings.reassembly_bytes, config.reassembly_bytes),
    ];
    for (ceiling, value) in pairs {
        *ceiling = (*ceiling).max(value);
    }
}

fn max_block1_transfers(config: &CoreConfig) -> usize {
    config.max_peers.min(config.reassembly_bytes / 16).max(1)
}

/// The largest block size exponent for bodies sent: at most `block_size`, and small enough
/// that a block with every option fits `max_message_size`.
fn body_szx(config: &CoreConfig) -> u8 {
    // Header 4, token 8, ETag 5, Observe 4, Block2 4, Size2 5, marker 1.
    const OVERHEAD: usize = 31;
    (0..=Block::MAX_SZX)
        .rev()
        .find(|szx| {
            let size = 16usize << szx;
            size <= config.block_size && size + OVERHEAD <= config.max_message_size
        })
        .unwrap_or(0)
}

fn upstream_qos(level: u8) -> Qos {
    match level {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        _ => Qos::ExactlyOnce,
    }
}

fn qos_level(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

impl DatagramCore for Core {
    const NAME: &'static str = "CoAP";
    type Settings = CoreConfig;

    fn reconfigure(&mut self, now: Instant, settings: CoreConfig) -> Vec<String> {
        Core::reconfigure(self, now, settings)
    }

    fn max_datagram_size(&self) -> usize {
        self.config.max_message_size
    }

    fn handle_datagram(&mut self, now: Instant, peer: Peer, datagram: &[u8]) {
        self.on_datagram(now, peer, datagram);
    }

    fn handle_publish_result(&mut self, now: Instant, token: u64, outcome: PublishOutcome) {
        self.on_publish_result(now, token, outcome);
    }

    fn handle_subscribe_result(&mut self, now: Instant, filter: &str, accepted: bool) {
        self.on_subscribe_result(now, filter, accepted);
    }

    fn handle_downlink(
        &mut self,
        now: Instant,
        topic: &str,
        payload: Bytes,
        qos: Qos,
        retain: bool,
        filters: Option<&[Arc<str>]>,
    ) -> DownlinkOutcome {
        self.stats.downlink_in += 1;
        if retain {
            self.remember_retained(topic, &payload);
        }
        let queued = self.deliver(now, topic, &payload, qos_level(qos), filters);
        DownlinkOutcome {
            queued,
            persisted: 0,
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.on_timeout(now);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        [
            self.timers.peek().map(|Reverse((at, _))| *at),
            self.block1.next_deadline(),
            self.block2.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Peer> {
        let (peer, tx) = self.transmits.pop_front()?;
        buf.clear();
        Self::encode(&tx, buf);
        Some(peer)
    }

    fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn report(&self) -> IngressReport {
        self.make_report()
    }

    fn clients(&self, now: Instant, query: &ClientQuery) -> ClientsPage {
        self.make_clients(now, query)
    }
}

#[cfg(test)]
mod tests;
