//! The CoAP ingress core (sans-IO): messaging layer (RFC 7252 section 4), the `/ps` resources,
//! acknowledgement after durable, Observe (RFC 7641) and block-wise transfers (RFC 7959).
//!
//! SKELETON: only [`CoreConfig`] and an inert [`Core`] (it counts datagrams and answers
//! nothing) exist so far; the work package building the core replaces the body. Not wired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sensorgate_bridges::message::Qos;

use crate::ingress::{DatagramCore, DownlinkOutcome, Event, Peer, PublishOutcome};
use crate::mqttsn::core::QueueFull;
use crate::observe::model::{
    ClientQuery, ClientsPage, IngressCounters, IngressReport, SessionCounts,
};

/// The protocol's label in the admin listener's reports and metrics.
pub const PROTOCOL: &str = "coap";

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
        }
    }
}

/// The core (inert skeleton).
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    datagrams: u64,
}

impl Core {
    /// A core with `config`; `seed` seeds Message IDs and retransmission jitter.
    pub fn new(config: CoreConfig, seed: u64) -> Core {
        let _ = seed;
        Core {
            config,
            datagrams: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }
}

impl DatagramCore for Core {
    const NAME: &'static str = "CoAP";

    fn handle_datagram(&mut self, _now: Instant, _peer: Peer, _datagram: &[u8]) {
        self.datagrams += 1;
    }

    fn handle_publish_result(&mut self, _now: Instant, _token: u64, _outcome: PublishOutcome) {}

    fn handle_downlink(
        &mut self,
        _now: Instant,
        _topic: &str,
        _payload: Bytes,
        _qos: Qos,
        _retain: bool,
        _filters: Option<&[Arc<str>]>,
    ) -> DownlinkOutcome {
        DownlinkOutcome::default()
    }

    fn handle_timeout(&mut self, _now: Instant) {}

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    fn poll_transmit(&mut self, _buf: &mut Vec<u8>) -> Option<Peer> {
        None
    }

    fn poll_event(&mut self) -> Option<Event> {
        None
    }

    fn report(&self) -> IngressReport {
        IngressReport {
            protocol: PROTOCOL,
            sessions: SessionCounts::default(),
            counters: IngressCounters {
                packets_in: self.datagrams,
                ..IngressCounters::default()
            },
        }
    }

    fn clients(&self, _now: Instant, _query: &ClientQuery) -> ClientsPage {
        ClientsPage {
            clients: Vec::new(),
            more: false,
        }
    }
}
