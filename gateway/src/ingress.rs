//! The seam between the datagram transports and the protocol cores: the neutral types every
//! sans-IO ingress core speaks ([`Event`] out to the pipeline, [`PublishOutcome`] back from the
//! spool, [`Peer`] addresses) and [`DatagramCore`], what the one UDP driver
//! (`io::udp::UdpDriver`) drives. MQTT-SN's core and CoAP's implement it, so a datagram
//! protocol is a core plus one registration in `app.rs`; the driver (batching, backpressure,
//! local delivery, admin queries) is shared.
//!
//! Invariants: a core never reads a clock (time is passed in), never blocks, and answers each
//! tokened [`Event::Publish`] only after [`DatagramCore::handle_publish_result`] (the spool's
//! verdict: accepted means durable).
//!
//! Live reconfiguration (SIGHUP): [`DatagramCore::reconfigure`] swaps a core's settings between
//! two turns of its driver, which receives them as [`Reconfigure`] requests. Sessions,
//! registrations, subscriptions, queues and exchanges in flight survive it; a lowered limit
//! applies to what comes next (nothing admitted under the old one is dropped for it); a timer
//! takes a new duration when it is next armed. Each core documents its settings one by one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use sensorgate_bridges::message::{Message, Qos};
use tokio::sync::oneshot;

use crate::identity::Identity;
use crate::observe::model::{ClientQuery, ClientsPage, IngressReport};

/// How a peer is reached: its transport and its address within it. The core only compares,
/// hashes and logs it (a session is bound to one); the transport's driver, which made it,
/// maps it back to a socket or a line. Not `Copy`: a DTLS identity will not be.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerAddr {
    /// A UDP datagram socket.
    Udp {
        /// Which listening socket (index in the listener list).
        listener: u16,
        /// The UDP source address.
        addr: SocketAddr,
    },
    /// A serial line (index in the `[[serial]]` list): one client, or a forwarder's clients
    /// told apart by their node ids.
    Serial {
        /// Which line (index in the line list).
        line: u16,
    },
    /// A UDP forwarder: a source matching entry `entry` of `[mqttsn] forwarders`, wherever
    /// in the entry it sends from now (its address or port may change; the driver sends to
    /// the entry's latest source). One entry is one radio network: its node ids are unique
    /// within it.
    Forwarder {
        /// Which allow-list entry (index in `[mqttsn] forwarders`).
        entry: u16,
    },
}

impl PeerAddr {
    /// Whether datagrams from this address may carry forwarder encapsulations (0xFE) of other
    /// clients' messages: only an allow-listed UDP forwarder or a serial line may relay; a
    /// plain UDP source may not (it could speak for any node id).
    #[must_use]
    pub fn may_relay(&self) -> bool {
        match self {
            PeerAddr::Forwarder { .. } | PeerAddr::Serial { .. } => true,
            PeerAddr::Udp { .. } => false,
        }
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Udp { addr, .. } => write!(f, "{addr}"),
            PeerAddr::Serial { line } => write!(f, "serial:{line}"),
            PeerAddr::Forwarder { entry } => write!(f, "forwarder:{entry}"),
        }
    }
}

/// Where a datagram came from (and where its answers go): a transport address, and the
/// client's node id behind a forwarder.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The transport address (of the forwarder, for an encapsulated client).
    pub addr: PeerAddr,
    /// Wireless Node Id when the client sits behind a forwarder (0xFE encapsulation): the
    /// one part of an address that is MQTT-SN's, so the core reads it (to encapsulate).
    pub node: Option<Box<[u8]>>,
    /// The identity the transport proved for this peer (a DTLS PSK identity or client
    /// certificate); `None` on plain transports, where a core may only derive a claimed one
    /// (ClientId, CoAP query) where the config allows it.
    pub identity: Option<Arc<Identity>>,
}

impl Peer {
    /// A peer reached directly over UDP.
    pub fn udp(listener: u16, addr: SocketAddr) -> Self {
        Peer {
            addr: PeerAddr::Udp { listener, addr },
            node: None,
            identity: None,
        }
    }

    /// A peer reached directly over a serial line.
    pub fn serial(line: u16) -> Self {
        Peer {
            addr: PeerAddr::Serial { line },
            node: None,
            identity: None,
        }
    }

    /// A datagram from the UDP forwarder of allow-list entry `entry` (the core adds the node
    /// id of an encapsulated client).
    pub fn forwarder(entry: u16) -> Self {
        Peer {
            addr: PeerAddr::Forwarder { entry },
            node: None,
            identity: None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.addr)?;
        if let Some(node) = &self.node {
            f.write_str(" node ")?;
            for b in node {
                write!(f, "{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Output for the upstream side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A sensor published (or a Will is due); with a token, report the outcome through
    /// [`DatagramCore::handle_publish_result`] exactly once.
    Publish {
        /// The message, topic already resolved to its MQTT name.
        message: Message,
        /// Present for sensor QoS 1/2 (the sensor waits for the outcome).
        token: Option<u64>,
    },
    /// Subscribe every upstream to this filter (first subscriber, or a higher QoS).
    Subscribe {
        /// The MQTT topic filter.
        filter: Arc<str>,
        /// Highest QoS any subscriber asked for.
        qos: Qos,
    },
    /// The filter's last subscriber left.
    Unsubscribe {
        /// The MQTT topic filter.
        filter: Arc<str>,
    },
}

/// A change for the session store, from [`DatagramCore::take_persist_changes`] (MQTT-SN's
/// persistent sessions; a core without persistence has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersistChange {
    /// Store `bytes` (a `mqttsn::persist` record) as the session of `client_id`, replacing any
    /// earlier one.
    Upsert {
        /// The session's ClientId.
        client_id: Arc<str>,
        /// The encoded session record.
        bytes: Vec<u8>,
    },
    /// The session of `client_id` ended, or needs no persistence any more: forget its record.
    Remove {
        /// The session's ClientId.
        client_id: Arc<str>,
    },
}

/// What [`DatagramCore::handle_downlink`] did with one message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct DownlinkOutcome {
    /// Sessions the message was queued (or sent) for.
    pub queued: usize,
    /// Of these, persistent sessions that got it at QoS 1/2: their next records hold it.
    pub persisted: usize,
}

impl DownlinkOutcome {
    /// The message is part of persisted state: acknowledge it to the broker only once the
    /// changes of the next [`DatagramCore::take_persist_changes`] are durable.
    pub fn needs_durability(&self) -> bool {
        self.persisted > 0
    }
}

/// The spool's verdict on a tokened publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Durable in the spool for every target upstream (written and fsync'd); acknowledge the
    /// sensor. Delivery to the brokers follows from the spool.
    Accepted,
    /// Could not be taken now (spool full or its queue full); the sensor gets rc 0x01
    /// (congestion) and retries.
    Congestion,
    /// Refused for good: `[[route]]`s are configured and none takes the topic. The sensor
    /// gets rc 0x03 (not supported) and the message is dropped, never acknowledged.
    NoRoute,
}

/// New settings for a running datagram core, applied by its driver between two turns
/// (`UdpDriver::with_reconfigure`); `done` gets the core's notes for the log (see
/// [`DatagramCore::reconfigure`]). A request whose asker has gone is applied all the same.
#[derive(Debug)]
pub struct Reconfigure<S> {
    /// The validated settings (compiled from the new config file).
    pub settings: S,
    /// Where the notes go once the settings are in force.
    pub done: oneshot::Sender<Vec<String>>,
}

/// Caps a reloaded `max_filters` at the value the router's filter table was sized for at start
/// (the ingresses' bounds are summed there: above it this ingress would take room the others
/// count on); the note says so when it capped.
pub(crate) fn cap_max_filters(max_filters: &mut usize, started: usize) -> Option<String> {
    if *max_filters <= started {
        return None;
    }
    let note = format!(
        "max_filters {max_filters} is above the {started} the router's filter table was sized \
         for at start: capped at {started} until a restart"
    );
    *max_filters = started;
    Some(note)
}

/// A sans-IO datagram protocol core, as the UDP driver drives it. Per turn the driver feeds
/// datagrams, the spool's verdicts and downlink, calls [`Self::handle_timeout`], then drains
/// [`Self::poll_event`] (handing each [`Event::Subscribe`]'s result back through
/// [`Self::handle_subscribe_result`] at once) and [`Self::poll_transmit`], and sleeps until
/// [`Self::poll_timeout`] or the next input.
pub trait DatagramCore: Send + 'static {
    /// The protocol's name for logs ("MQTT-SN", "CoAP").
    const NAME: &'static str;

    /// What [`Self::reconfigure`] takes: the core's whole configuration.
    type Settings: Send + 'static;

    /// Puts `settings` (validated) in force at `now`, keeping every session, registration,
    /// subscription, queued message and exchange in flight. A lowered limit applies to what
    /// comes next; a timer takes its new duration when next armed. Returns notes for the log
    /// (what the change means for the state there is, e.g. a limit now below the current
    /// count); empty when there is nothing to say. Call between turns (after a flush), then
    /// flush: the change may have output (an ADVERTISE with a new GwId, a queue pumped).
    fn reconfigure(&mut self, now: Instant, settings: Self::Settings) -> Vec<String>;

    /// The longest datagram the core takes, for the driver's receive slots (which are one
    /// byte longer, to see oversize datagrams as such); read again after
    /// [`Self::reconfigure`].
    fn max_datagram_size(&self) -> usize;

    /// A datagram from `peer`. It may be one byte longer than the driver's packet limit (the
    /// read slot is one byte larger): such a datagram was oversize (possibly truncated).
    fn handle_datagram(&mut self, now: Instant, peer: Peer, datagram: &[u8]);

    /// The spool's verdict on the tokened publish `token`, exactly once per token.
    fn handle_publish_result(&mut self, now: Instant, token: u64, outcome: PublishOutcome);

    /// The router's answer to an [`Event::Subscribe`] for `filter` this core emitted, given
    /// in the same flush before transmits are drained (so an answer that waits for it can go
    /// out in the same round). Ignored by default.
    fn handle_subscribe_result(&mut self, now: Instant, filter: &str, accepted: bool) {
        let _ = (now, filter, accepted);
    }

    /// A message from an upstream subscription (or another ingress) matching `filters`
    /// (`None`: match it against every filter).
    fn handle_downlink(
        &mut self,
        now: Instant,
        topic: &str,
        payload: Bytes,
        qos: Qos,
        retain: bool,
        filters: Option<&[Arc<str>]>,
    ) -> DownlinkOutcome;

    /// Runs what is due at `now`; early calls do nothing.
    fn handle_timeout(&mut self, now: Instant);

    /// Whether any upstream is connected (for cores that tell their clients). Ignored by
    /// default.
    fn set_upstream_available(&mut self, available: bool) {
        let _ = available;
    }

    /// When [`Self::handle_timeout`] is next due.
    fn poll_timeout(&self) -> Option<Instant>;

    /// The next datagram to send, written into `buf` (cleared first), and where to.
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Peer>;

    /// The next event for the pipeline.
    fn poll_event(&mut self) -> Option<Event>;

    /// Takes the session changes to persist since the last call (in order). None by default.
    fn take_persist_changes(&mut self, out: &mut Vec<PersistChange>) {
        let _ = out;
    }

    /// Counters and gauges for the admin listener.
    fn report(&self) -> IngressReport;

    /// One page of clients for the admin listener.
    fn clients(&self, now: Instant, query: &ClientQuery) -> ClientsPage;
}
