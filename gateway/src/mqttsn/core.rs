//! The MQTT-SN gateway core: sessions, topic registration, uplink, subscriptions and downlink,
//! Will, sleeping clients, persistent sessions and discovery, with no IO.
//!
//! # Driving the core
//!
//! The IO adapter owns one [`Core`]. Before any traffic it hands every stored session record
//! to [`Core::restore`] (restored subscriptions come out of [`Core::poll_event`] as the usual
//! [`Event::Subscribe`]s). Then, in a loop, it:
//! 1. feeds every received datagram to [`Core::handle_datagram`], the spool's verdict on every
//!    tokened publish to [`Core::handle_publish_result`] (accepted once the message is durable
//!    in the spool, i.e. written and fsync'd; refused when the spool cannot take it), every
//!    message from an upstream subscription to [`Core::handle_downlink`], and the upstreams'
//!    availability to [`Core::set_upstream_available`]. When the [`DownlinkOutcome`] of
//!    `handle_downlink` says [`DownlinkOutcome::needs_durability`], the adapter holds the
//!    broker's acknowledgement until the changes of step 4 of this round are durable;
//!    otherwise it acknowledges at once;
//! 2. calls [`Core::handle_timeout`] once the instant from [`Core::poll_timeout`] has passed
//!    (calling it early is harmless: nothing is due, nothing happens);
//! 3. drains [`Core::poll_transmit`] (datagrams to send) and [`Core::poll_event`] (publishes
//!    and subscription changes for the upstreams) until both return `None`;
//! 4. takes [`Core::take_persist_changes`] and writes them durably (in order), then releases
//!    the acknowledgements held in step 1;
//! 5. sleeps until the next input or [`Core::poll_timeout`].
//!
//! Time is always passed in; the core never reads a clock.
//!
//! # Persistence
//!
//! A session is *persistent* while it has CleanSession=0 or is asleep (or awake, delivering
//! its buffer): that is what must survive a gateway restart. Its record ([`persist`]) holds
//! registrations (all unknown to the client after a restore), refused topics, subscriptions,
//! the Will and the queued QoS 1/2 downlink (a message in flight first, marked DUP if it was
//! sent). QoS 0 downlink, addresses, uplink exchanges and timers are not kept: a restored
//! session is asleep or disconnected with its timers restarted from the restore instant (the
//! full sleep duration, or the full `session_expiry`). Sending a message is not a change (a
//! write per PUBLISH would double the writes): a message sent after the session's last
//! record comes back without DUP; it is resent either way.
//!
//! [`persist`]: super::persist
//!
//! # Observability
//!
//! [`Core::report`] and [`Core::clients`] answer the admin listener (through the adapter,
//! which owns the core) in the protocol-neutral shape of [`crate::observe::model`], labelled
//! [`PROTOCOL`]. Sessions by state are counted by walking the session table when asked,
//! never per transition; the counters ([`Stats`]) are plain fields bumped where the event
//! happens already, so the hot path pays an increment at most. A persistent session without
//! a connection is `lost` when its client was lost, `disconnected` when it sent DISCONNECT
//! (or it was restored: records do not keep the difference).
//!
//! # Reconfiguration
//!
//! [`Core::reconfigure`] puts a new [`CoreConfig`] in force between two turns (a reload).
//! Every session survives with its address binding, registrations, subscriptions, Will, queue,
//! uplink publishes awaiting their verdict and downlink exchange in flight. Per setting:
//! - `predefined`: in force at once for every session (a session shares its client's table).
//!   A new id resolves in the next PUBLISH / SUBSCRIBE; a changed one resolves to its new
//!   topic; a removed one is unknown: a PUBLISH to it gets PUBACK rc 0x02 (invalid topic id;
//!   spec 6.7: not recoverable by re-registering the id, the client must REGISTER the name),
//!   QoS -1 to it is dropped. A subscription made through a removed id stays (it is held by
//!   topic name); its next message is REGISTERed to the client first (spec 6.10). A message
//!   already in flight keeps the topic id it was sent with. A registration whose id an added
//!   predefined id now equals keeps working (the two are told apart by TopicIdType); new
//!   registrations skip it.
//! - Limits (`max_clients`, `max_topics_per_client`, `max_inflight_per_client`,
//!   `max_subscriptions_per_client`, `max_filters`, `max_queued_per_client`,
//!   `max_buffered_per_sleeping_client`, `max_retained`): lowering one drops nothing; it applies
//!   to what comes next: CONNECTs of new ClientIds, REGISTERs of new names, new QoS 1/2
//!   PUBLISHes, new SUBSCRIBEs and new filters are refused with rc 0x01 while the count is at
//!   or above the new limit (a known ClientId may still CONNECT); a new downlink message for
//!   a queue at or above it meets a full queue (`queue_full` decides: the new one or the
//!   oldest goes, so the queue never grows); a new retained topic is not cached. The router's
//!   filter table is sized at start from every ingress's `max_filters`: a `max_filters` above
//!   the value at start is capped at it until a restart (noted), so a SUBACK rc 0x00 never
//!   names a filter the router could refuse.
//! - `max_packet_size`, `max_client_id_len`, `qos_minus_one`, `queue_full`, `gw_id`,
//!   `gwinfo_to_destinations`, `advertise_to`: from the next datagram or message (a session
//!   whose ClientId is longer than a lowered `max_client_id_len` is kept, but its client's
//!   next CONNECT is refused with rc 0x03; queued downlink that no longer fits a lowered
//!   `max_packet_size` is not sent when its turn comes).
//! - Timers take a new duration when next armed: `retry_interval` from the next (re)sent
//!   message, `max_retries` at the next retransmission, `session_expiry` when a connection
//!   next ends; the Will handshake's deadline (`retry_interval * (max_retries + 1)` after the
//!   CONNECT) follows at once. `advertise_interval`: the next ADVERTISE is due at the earlier
//!   of the old schedule and now plus the new interval.
//! - `security` (`[[acl]]`, `[limits]`) and `require_identity`: from the next packet. Sessions,
//!   registrations and subscriptions made under the old policy stay; a PUBLISH is checked
//!   under the new one, and a downlink message is delivered only if the session may receive its
//!   topic now (dropped and counted otherwise). The rate buckets are kept.
//!
//! # Authorisation
//!
//! Each session carries its identity: the one its transport proved (`Peer::identity`), else its
//! ClientId claimed. The ACL is checked on REGISTER (REGACK rc 0x03), PUBLISH at every QoS
//! (PUBACK rc 0x03; QoS 0/-1 dropped, counted), SUBSCRIBE (SUBACK rc 0x03), the Will topic
//! (CONNACK / WILLTOPICRESP rc 0x03) and at delivery; the limits on PUBLISH (rc 0x01 over the
//! rate, rc 0x03 too large). Refusals are counted in [`Core::security_counters`].
//!
//! # Client states (spec 6.14)
//!
//! ```text
//!   CONNECT(Will) --> Connecting --WILLMSG--> Active <--CONNECT-- Asleep / Disconnected
//!   CONNECT ----------------------------------> Active --DISCONNECT(d)--> Asleep
//!   Asleep --PINGREQ(ClientId)--> Awake --(buffer sent, each acked)--> PINGRESP, Asleep
//!   Active/Asleep/Awake --timer or retries exhausted--> lost: Will published, then
//!       removed (CleanSession=1) or Disconnected until session expiry (CleanSession=0)
//!   Active --DISCONNECT--> removed (CleanSession=1) or Disconnected (CleanSession=0)
//! ```
//!
//! # CONNECT
//!
//! A CONNECT that decodes is always answered. It is refused with a CONNACK carrying the reason
//! (spec 6.2), before anything else happens (no session, no address binding, no Will
//! handshake; counted in [`Stats::connects_refused`]; the 3-octet CONNACK is never larger than
//! the CONNECT, so the refusal cannot amplify):
//! - rc 0x03 (not supported) for an empty ClientId or one longer than `max_client_id_len`. An
//!   empty ClientId is refused rather than assigned one (as MQTT 3.1.1 would): v1.2 allows
//!   1-23 characters, and its CONNACK cannot tell the client an assigned id, without which a
//!   sleeping client cannot wake (PINGREQ carries the ClientId) nor a session be resumed;
//! - rc 0x01 (congestion) when `max_clients` sessions exist and the ClientId has none;
//! - rc 0x03 when the peer's proven identity may not use the ClientId
//!   ([`Identity::allows_client_id`]), when `require_identity` is set and the peer proved none,
//!   or when a session of the ClientId is held by a proven identity other than the peer's.
//!
//! # Packets by session state
//!
//! Every packet passes one table, [`admission`], keyed by the sender's standing: the state of
//! the session its address is bound to (for PINGREQ with a ClientId, of the session it names).
//! A packet the table does not allow is never acted on: it gets DISCONNECT ("not connected,
//! CONNECT first", spec 6.12) or is dropped, and is counted in [`Stats::out_of_state`].
//!
//! ```text
//!                          no session*  Will: topic  Will: msg  Active  Asleep  Awake
//!  CONNECT, SEARCHGW,        act          act          act       act     act     act
//!    PUBLISH QoS -1, DISCONNECT
//!  WILLTOPIC                 drop         act          act**     drop    drop    drop
//!  WILLMSG                   drop         drop         act       drop    drop    drop
//!  PINGREQ (with or          DISC         DISC         DISC      act     act     act
//!    without ClientId)
//!  PUBACK, PUBREC,           drop         drop         drop      act     drop    act
//!    PUBCOMP, REGACK
//!  PUBLISH QoS 0/1/2,        DISC         DISC         DISC      act     act     act
//!    REGISTER, PUBREL
//!  SUBSCRIBE, UNSUBSCRIBE,   DISC         DISC         DISC      act     DISC    DISC
//!    WILLTOPICUPD, WILLMSGUPD
//!  packets only a gateway    drop         drop         drop      drop    drop    drop
//!    sends (CONNACK, GWINFO, ADVERTISE, SUBACK, ...)
//!
//!  act: handled; DISC: answered with DISCONNECT, nothing else; drop: ignored
//!  *  also a session without a connection (disconnected, or lost): it is bound to no address,
//!     and PINGREQ(ClientId) does not bind it
//!  ** a retransmitted WILLTOPIC (our WILLMSGREQ was lost) is answered with WILLMSGREQ again
//! ```
//!
//! An asleep or awake client may publish (and register a topic, and finish a QoS 2 exchange)
//! without leaving its sleep: battery sensors wake, publish and sleep again, and the Paho
//! gateway serves them so. It stays asleep (its sleep timer unchanged); changing its
//! subscriptions or its Will needs a CONNECT.
//!
//! # Invariants
//! - Clients are keyed by ClientId. An address maps to at most one session and a session to at
//!   most one address; a datagram only ever acts on the session its address is bound to, and
//!   only as the session's state allows (see above). A session is rebound to a new address
//!   only by CONNECT or PINGREQ carrying its ClientId, and the old address then loses its
//!   binding (it cannot inject into the session).
//! - A QoS 1/2 PUBLISH is acknowledged to the sensor (PUBACK / PUBREC) only after
//!   [`Core::handle_publish_result`] reported it accepted, which the adapter does once the
//!   spool holds it durably (fsync'd), not when a broker acknowledged it; a refusal is
//!   answered with PUBACK rc 0x01 (congestion) so the sensor retries later, or rc 0x03 (not
//!   supported) when no `[[route]]` takes its topic ([`PublishOutcome::NoRoute`]: dropped).
//! - Every uplink message (and Will) carries its [`Origin`]: MQTT-SN, the session's ClientId
//!   (shared, not copied per message) and its address as text (QoS -1 from an unconnected
//!   sender: the address only).
//! - A QoS 2 message is forwarded at most once per MsgId until the sensor's PUBREL.
//! - Downlink: at most one QoS 1/2 PUBLISH (or REGISTER) in flight per client; retransmitted
//!   with DUP after `retry_interval`, up to `max_retries` times, then the client is lost.
//! - Local delivery: a sensor's publish reaches the core's own matching sessions (the
//!   publisher's included) like a downlink, without the upstream, once per session: QoS 0/-1
//!   when received, QoS 1/2 when [`Core::handle_publish_result`] reports it accepted (never a
//!   refused one), a Will when published. The upstreams never bring the same message back.
//! - Upstream subscriptions are the union of the sessions' filters, reference-counted: an
//!   [`Event::Subscribe`] when a filter gains its first subscriber (or a higher QoS), an
//!   [`Event::Unsubscribe`] when its last subscriber leaves. The union holds at most
//!   `max_filters` distinct filters, the capacity of the upstreams' subscription tables: a
//!   SUBSCRIBE that would add one more gets SUBACK rc 0x01 (congestion), and a restored session
//!   keeps only the subscriptions that fit. A SUBACK rc 0x00 is never sent for a filter the
//!   gateway does not hold.
//! - Everything is bounded: sessions, topics, subscriptions and queued messages per client,
//!   retained messages, unacknowledged uplink publishes per client.
//! - Bytes from the network never cause a panic: malformed datagrams are counted and dropped.
//! - Forwarder encapsulations (0xFE) are acted on only from a peer address that may relay
//!   ([`PeerAddr::may_relay`]: an allow-listed UDP forwarder, a serial line); from any other
//!   they are dropped unanswered and counted ([`RefusalReason::ForwarderNotAllowed`]), so no
//!   plain UDP source can speak for a node. Behind a forwarder each Wireless Node Id is its
//!   own peer (the forwarder's address plus the node id), so its nodes are sessions of their
//!   own, apart from each other and from direct clients; the forwarder's address is the
//!   driver's (an allow-list entry), so its source moving within the entry moves nothing here.
//! - Transport-neutral: a [`Peer`] is an opaque [`PeerAddr`] (UDP listener and address, a
//!   serial line, ...) plus the forwarder node id. The core compares, hashes and logs it, and
//!   reads only the node id (an MQTT-SN matter: encapsulation); it never matches on the
//!   transport. The driver that made a `PeerAddr` maps it back. Addresses are never persisted.
//! - Persistence is O(changes): every change to the persisted content of a persistent session
//!   (connect, disconnect, sleep, subscribe, unsubscribe, a new registration, the Will, a
//!   QoS 1/2 downlink queued, delivered or dropped) marks it dirty once; a take encodes each
//!   dirty session once. A session that ends, or stops being persistent, after a record was
//!   emitted for it (or restored) gets a [`PersistChange::Remove`]. Within one take the
//!   removals of ended sessions come first, so when a ClientId's session ended and a new one
//!   began, the new one's change comes last and wins.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sensorgate_bridges::message::{Message, Origin, Protocol, Qos};
use sensorgate_bridges::topic::{has_wildcards, is_valid_filter, is_valid_name, matches};

use super::codec::{
    self, DecodeLimits, Frame, Packet, QoS, ReturnCode, SubscribeTopic, TopicRef, WillFlags,
};
use super::persist::{
    self, RecordError, RecordMessage, RecordState, RecordSubscription, RecordTopic, RecordWill,
    SessionRecord,
};
use crate::identity::{Identity, IdentitySource};
use crate::ingress::DatagramCore;
pub use crate::ingress::{DownlinkOutcome, Event, Peer, PeerAddr, PersistChange, PublishOutcome};
use crate::observe::model::{
    ClientInfo, ClientQuery, ClientsPage, DownlinkDropReason, IngressCounters, IngressReport,
    RefusalReason, SessionCounts, SessionState, SubscriptionInfo,
};
use crate::security::{self, Denial, Limiter, Policy, Requester};

/// The protocol label of this core's sessions and counters in the admin listener's reports.
pub const PROTOCOL: &str = "mqtt-sn";

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

/// What happens when a client's downlink queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// Drop the oldest queued message to make room (the freshest data wins).
    DropOldest,
    /// Drop the new message.
    DropNew,
}

/// Settings of the core, compiled from `[mqttsn]`.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// GwId in GWINFO and ADVERTISE.
    pub gw_id: u8,
    /// Maximum number of sessions (persistent and sleeping ones included); a CONNECT beyond it
    /// gets rc 0x01 (congestion).
    pub max_clients: usize,
    /// Datagrams longer than this are dropped; downlink PUBLISHes longer than this are not
    /// sent (spec 6.10: "silently aborted") and counted.
    pub max_packet_size: usize,
    /// Longest accepted ClientId (the spec says 23).
    pub max_client_id_len: usize,
    /// Topic registrations per client; a REGISTER beyond it gets rc 0x01 (congestion).
    pub max_topics_per_client: usize,
    /// QoS 1/2 uplink publishes per client awaiting the spool's verdict; beyond it: PUBACK
    /// rc 0x01.
    pub max_inflight_per_client: usize,
    /// Accept QoS -1 publishes from senders without a session.
    pub qos_minus_one: bool,
    /// Predefined topics.
    pub predefined: Vec<PredefinedTopic>,
    /// Subscriptions per client; beyond it SUBACK rc 0x01.
    pub max_subscriptions_per_client: usize,
    /// Distinct filters subscribed upstream (the union of all sessions' filters); a SUBSCRIBE
    /// that would add one more gets SUBACK rc 0x01 (congestion). The upstreams' subscription
    /// tables hold this many, so a filter acknowledged to a sensor always fits upstream.
    pub max_filters: usize,
    /// Downlink messages queued per client that is awake (active) or disconnected with a
    /// persistent session.
    pub max_queued_per_client: usize,
    /// Downlink messages buffered per sleeping client.
    pub max_buffered_per_sleeping_client: usize,
    /// Policy when a queue is full.
    pub queue_full: QueueFull,
    /// Tretry: wait for an acknowledgement before retransmitting.
    pub retry_interval: Duration,
    /// Nretry: retransmissions before the client is lost.
    pub max_retries: u32,
    /// How long a CleanSession=0 session outlives its connection.
    pub session_expiry: Duration,
    /// Retained messages remembered for new subscribers.
    pub max_retained: usize,
    /// Where ADVERTISE goes (empty: never advertise) and, with `gwinfo_to_destinations`,
    /// GWINFO answers.
    pub advertise_to: Vec<Peer>,
    /// ADVERTISE period (TADV).
    pub advertise_interval: Duration,
    /// Answer SEARCHGW by sending GWINFO to `advertise_to` instead of the searcher.
    pub gwinfo_to_destinations: bool,
    /// `true`: a CONNECT from a peer without a proven identity (plain UDP, serial) is refused
    /// (CONNACK rc 0x03); `false`: its ClientId is its claimed identity.
    pub require_identity: bool,
    /// ACLs and limits (`[[acl]]`, `[limits]`); the default allows everything.
    pub security: Arc<Policy>,
}

impl CoreConfig {
    /// Defaults as documented in `config/sensorgate.toml`.
    pub fn with_defaults(gw_id: u8) -> Self {
        CoreConfig {
            gw_id,
            max_clients: 100_000,
            max_packet_size: 4096,
            max_client_id_len: codec::MAX_CLIENT_ID_LEN_SPEC,
            max_topics_per_client: 64,
            max_inflight_per_client: 16,
            qos_minus_one: true,
            predefined: Vec::new(),
            max_subscriptions_per_client: 32,
            max_filters: 65_536,
            max_queued_per_client: 100,
            max_buffered_per_sleeping_client: 1000,
            queue_full: QueueFull::DropOldest,
            retry_interval: Duration::from_secs(10),
            max_retries: 3,
            session_expiry: Duration::from_secs(3600),
            max_retained: 10_000,
            advertise_to: Vec::new(),
            advertise_interval: Duration::from_secs(900),
            gwinfo_to_destinations: false,
            require_identity: false,
            security: Arc::default(),
        }
    }
}

/// Keep-alive supervision: a session silent for this multiple of its Duration is lost.
const KEEP_ALIVE_FACTOR_PERCENT: u32 = 150;

/// Why [`Core::restore`] refused a stored record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The bytes are not a valid record.
    #[error("invalid session record: {0}")]
    Decode(#[from] RecordError),
    /// A session with this ClientId exists already.
    #[error("session {0} exists already")]
    Duplicate(Arc<str>),
    /// The session table is full (`max_clients`).
    #[error("session table full")]
    TableFull,
    /// A CleanSession=1 session that is not asleep: nothing of it outlives its connection.
    #[error("session {0} is neither persistent nor asleep")]
    NotPersistent(Arc<str>),
}

impl RestoreError {
    /// A snake_case tag for metrics and structured logs, stable across releases.
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::Decode(e) => e.error_code(),
            Self::Duplicate(_) => "duplicate",
            Self::TableFull => "table_full",
            Self::NotPersistent(_) => "not_persistent",
        }
    }
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
    /// Accepted uplink publishes per QoS: [-1, 0, 1, 2].
    pub publishes: [u64; 4],
    /// QoS -1 publishes dropped (disabled, or unknown topic).
    pub qos_m1_dropped: u64,
    /// PUBACK / REGACK / CONNACK / SUBACK rejections sent.
    pub rejections: u64,
    /// CONNECTs refused (ClientId empty or too long, session table full); also counted in
    /// `rejections`.
    pub connects_refused: u64,
    /// SUBSCRIBEs refused, and restored sessions cut, because `max_filters` distinct filters
    /// are subscribed upstream.
    pub filters_full: u64,
    /// Packets not allowed in the sender's session state (see "Packets by session state" in
    /// the module docs): answered with DISCONNECT or ignored, never acted on.
    pub out_of_state: u64,
    /// Clients lost (keep-alive, sleep timer, retransmissions exhausted).
    pub clients_lost: u64,
    /// Wills published.
    pub wills_published: u64,
    /// Downlink messages accepted from upstreams.
    pub downlink_in: u64,
    /// Messages of the gateway's own sensors (and Wills) handed to local delivery, once
    /// each however many sessions got them (those are counted in the `downlink_*` counters).
    pub local_in: u64,
    /// Retained messages from the broker that were its copy of a local sensor's retained
    /// message every subscriber already had (delivered to no one).
    pub downlink_own_retained: u64,
    /// Downlink PUBLISHes sent to clients (first transmissions).
    pub downlink_sent: u64,
    /// Downlink messages acknowledged by clients (QoS 1/2) or sent (QoS 0).
    pub downlink_delivered: u64,
    /// Downlink messages dropped, every reason (the sum of `downlink_dropped_by`).
    pub downlink_dropped: u64,
    /// Downlink messages dropped per reason (index: position in [`DownlinkDropReason::ALL`]):
    /// queue full (also a restored queue cut to the limit, and a message whose topic the
    /// client's full topic table cannot register), rejected by the client (a REGACK or PUBACK
    /// rejection, or a topic it refused before), too large for `max_packet_size`, expired (a
    /// QoS 0 message for a session without a connection, and whatever was queued or in
    /// flight when the session ended or its connection did, QoS 0 being kept for no one).
    pub downlink_dropped_by: [u64; 4],
    /// Retransmissions to clients.
    pub retransmissions: u64,
    /// Refusals per reason (index: position in [`RefusalReason::ALL`]): every answer with a
    /// rejection return code (CONNACK, REGACK, PUBACK, SUBACK, WILLTOPICRESP, WILLMSGRESP;
    /// a spool's refusal counted even when its sender left before the answer), every QoS -1
    /// publish dropped (not allowed), every datagram dropped as oversize (too large) or
    /// malformed, every forwarder encapsulation from a source that may not relay
    /// ([`PeerAddr::may_relay`]). Packets refused for the sender's session state are in
    /// `out_of_state`.
    pub refusals: [u64; RefusalReason::COUNT],
    /// Accepted QoS 1/2 uplink publishes acknowledged to their sensor (PUBACK accepted, or
    /// PUBREC), sent once the spool's verdict said durable.
    pub acks: u64,
    /// Current sessions.
    pub sessions: u64,
}

impl Stats {
    /// Counts one refusal.
    fn refuse(&mut self, reason: RefusalReason) {
        if let Some(n) = self.refusals.get_mut(reason as usize) {
            *n += 1;
        }
    }

    /// Counts a rejection return code sent (`rejections` and its refusal reason).
    fn reject(&mut self, rc: ReturnCode) {
        self.rejections += 1;
        self.refuse(refusal_of(rc));
    }

    /// Counts `n` downlink messages dropped.
    fn drop_downlink(&mut self, reason: DownlinkDropReason, n: u64) {
        self.downlink_dropped += n;
        if let Some(c) = self.downlink_dropped_by.get_mut(reason as usize) {
            *c += n;
        }
    }
}

/// What a rejection return code tells the admin listener.
fn refusal_of(rc: ReturnCode) -> RefusalReason {
    match rc {
        ReturnCode::InvalidTopicId => RefusalReason::InvalidTopic,
        ReturnCode::NotSupported => RefusalReason::NotAllowed,
        // Accepted is never a refusal; callers pass rejections only.
        ReturnCode::Congestion | ReturnCode::Accepted => RefusalReason::Congestion,
    }
}

/// The ClientId as a claimed identity (plain transports, restored sessions).
fn claimed_identity(client_id: &Arc<str>) -> Arc<Identity> {
    Arc::new(Identity {
        name: Arc::clone(client_id),
        source: IdentitySource::ClientId,
        client_ids: None,
    })
}

/// The identity `peer`'s transport proved, else `client_id` claimed.
fn identity_of(peer: &Peer, client_id: &Arc<str>) -> Arc<Identity> {
    peer.identity
        .clone()
        .unwrap_or_else(|| claimed_identity(client_id))
}

/// The origin of a session's uplink messages.
fn session_origin(client_id: &Arc<str>, peer: Option<&Peer>) -> Origin {
    Origin {
        protocol: Protocol::MqttSn,
        client_id: Some(Arc::clone(client_id)),
        peer: peer.map(peer_text),
    }
}

/// A peer's address as an origin names it (its `Display`: made once per binding).
fn peer_text(peer: &Peer) -> Arc<str> {
    Arc::from(peer.to_string())
}

/// Index of a session slot plus its generation, so stale references are detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SessionRef {
    slot: u32,
    generation: u32,
}

/// Where a session is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// CONNECT with the Will flag: waiting for WILLTOPIC, then WILLMSG.
    Connecting {
        will_topic: Option<(Arc<str>, QoS, bool)>,
    },
    /// Connected and supervised by keep-alive.
    Active,
    /// Asleep until `until` (sleep duration plus tolerance); downlink is buffered.
    Asleep { until: Instant },
    /// Woken by PINGREQ(ClientId): buffered messages are being delivered.
    Awake,
    /// CleanSession=0 session without a connection, kept until `expires`.
    Disconnected {
        expires: Instant,
        /// The connection was lost (keep-alive, sleep timer, retransmissions exhausted), not
        /// ended by DISCONNECT; only the admin listener tells them apart. Not persisted: a
        /// restored session says `false`.
        lost: bool,
    },
}

impl State {
    /// The state as the admin listener names it.
    fn observed(&self) -> SessionState {
        match self {
            State::Connecting { .. } => SessionState::Connecting,
            State::Active => SessionState::Active,
            State::Asleep { .. } => SessionState::Asleep,
            State::Awake => SessionState::Awake,
            State::Disconnected { lost: false, .. } => SessionState::Disconnected,
            State::Disconnected { lost: true, .. } => SessionState::Lost,
        }
    }
}

/// The Will of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Will {
    topic: Arc<str>,
    payload: Bytes,
    qos: QoS,
    retain: bool,
}

/// A downlink message waiting for (or in) delivery to one client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Down {
    topic: Arc<str>,
    payload: Bytes,
    /// 0, 1 or 2: min(subscription, message).
    qos: u8,
    retain: bool,
    /// Sent before, on a connection that is gone or before a restart: resend with DUP.
    dup: bool,
}

/// The one downlink exchange in flight with a client.
#[derive(Debug, Clone)]
struct InFlight {
    msg: Down,
    /// MsgId of the REGISTER (phase `Register`) or of the PUBLISH.
    msg_id: u16,
    topic: TopicRef,
    phase: Phase,
    retries: u32,
    deadline: Instant,
    /// The client answered PUBACK rc 0x02 once already: a second time drops the message.
    reregistered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Register,
    PubAck,
    PubRec,
    PubComp,
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Subscription {
    filter: Arc<str>,
    qos: u8,
}

/// One client's session.
#[derive(Debug)]
struct Session {
    client_id: Arc<str>,
    /// Who the client is: the identity its transport proved (`Peer::identity`), else its
    /// ClientId as a claimed identity (also for a restored session until it connects again).
    identity: Arc<Identity>,
    /// Bound address; `None` while disconnected or after another client took the address.
    peer: Option<Peer>,
    /// What its uplink messages carry: the ClientId (shared with `client_id`) and the text of
    /// the last bound address (kept after unbinding: a Will of a lost client names it).
    origin: Origin,
    generation: u32,
    state: State,
    clean_session: bool,
    /// Keep-alive Duration from CONNECT, in seconds; zero disables supervision.
    keep_alive_secs: u16,
    /// Sleep duration from the last DISCONNECT(duration), in seconds.
    sleep_secs: u16,
    last_seen: Instant,
    topics: TopicTable,
    /// Client-specific predefined topics (global ones are looked up in the core).
    own_predefined: Option<Arc<HashMap<u16, Arc<str>>>>,
    /// QoS 1/2 uplink publishes awaiting the spool's verdict: (MsgId, token).
    inflight_up: Vec<(u16, u64)>,
    /// QoS 2 uplink MsgIds answered with PUBREC, awaiting PUBREL.
    qos2_received: Vec<u16>,
    /// Boxed: most sessions have none, and it is large.
    will: Option<Box<Will>>,
    subscriptions: Vec<Subscription>,
    queue: VecDeque<Down>,
    inflight_down: Option<InFlight>,
    next_msg_id: u16,
    /// Deadline of this session's earliest timer entry in the heap, if any.
    armed: Option<Instant>,
    /// The store holds a record of this session (emitted by a take, or restored): when the
    /// session ends or stops being persistent, the record must be removed.
    persisted: bool,
    /// Listed in `Core::persist_dirty`: its persisted content changed since the last take.
    dirty: bool,
}

impl Session {
    fn next_msg_id(&mut self) -> u16 {
        self.next_msg_id = self.next_msg_id.checked_add(1).unwrap_or(1);
        self.next_msg_id
    }

    /// The earliest instant something is due for this session.
    fn next_deadline(&self, retry_all: Duration) -> Option<Instant> {
        let state = match &self.state {
            State::Active if self.keep_alive_secs == 0 => None,
            State::Active => Some(self.last_seen + keep_alive_limit(self.keep_alive())),
            State::Connecting { .. } => Some(self.last_seen + retry_all),
            State::Asleep { until } => Some(*until),
            State::Awake => None,
            State::Disconnected { expires, .. } => Some(*expires),
        };
        let retry = self.inflight_down.as_ref().map(|f| f.deadline);
        match (state, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn keep_alive(&self) -> Duration {
        Duration::from_secs(u64::from(self.keep_alive_secs))
    }

    fn sleep(&self) -> Duration {
        Duration::from_secs(u64::from(self.sleep_secs))
    }

    fn can_send(&self) -> bool {
        self.peer.is_some() && matches!(self.state, State::Active | State::Awake)
    }

    /// Whether the session must survive a restart: CleanSession=0, or a sleeping client.
    fn is_persistent(&self) -> bool {
        !self.clean_session || matches!(self.state, State::Asleep { .. } | State::Awake)
    }

    /// Puts the message in flight back at the front of the queue (the connection it was sent
    /// on is gone); one already sent goes out again with DUP.
    fn requeue_in_flight(&mut self) {
        if let Some(f) = self.inflight_down.take() {
            let sent = f.phase != Phase::Register || f.reregistered;
            self.queue.push_front(Down {
                dup: f.msg.dup || sent,
                ..f.msg
            });
        }
    }

    /// The record of this session as [`Core::restore`] takes it back.
    fn record(&self) -> SessionRecord {
        let message = |d: &Down| RecordMessage {
            topic: d.topic.clone(),
            payload: d.payload.clone(),
            qos: d.qos,
            retain: d.retain,
            dup: d.dup,
        };
        // A QoS 0 message can be in flight too, waiting for its REGACK.
        let in_flight = self
            .inflight_down
            .as_ref()
            .filter(|f| f.msg.qos > 0)
            .map(|f| RecordMessage {
                dup: f.msg.dup || f.phase != Phase::Register || f.reregistered,
                ..message(&f.msg)
            });
        SessionRecord {
            client_id: self.client_id.clone(),
            clean_session: self.clean_session,
            keep_alive_secs: self.keep_alive_secs,
            sleep_secs: self.sleep_secs,
            state: match self.state {
                State::Asleep { .. } | State::Awake => RecordState::Asleep,
                _ => RecordState::Disconnected,
            },
            next_topic_id: self.topics.next_id,
            topics: self
                .topics
                .entries
                .iter()
                .map(|e| RecordTopic {
                    id: e.id,
                    name: e.name.clone(),
                })
                .collect(),
            refused: self
                .topics
                .refused
                .iter()
                .flat_map(|r| r.iter().cloned())
                .collect(),
            subscriptions: self
                .subscriptions
                .iter()
                .map(|s| RecordSubscription {
                    filter: s.filter.clone(),
                    qos: s.qos,
                })
                .collect(),
            will: self.will.as_ref().map(|w| RecordWill {
                topic: w.topic.clone(),
                payload: w.payload.clone(),
                qos: qos_level_of(w.qos),
                retain: w.retain,
            }),
            // QoS 0 is at most once: not worth a write, not kept.
            queue: in_flight
                .into_iter()
                .chain(self.queue.iter().filter(|d| d.qos > 0).map(message))
                .collect(),
        }
    }
}

/// Lists `session` as dirty (once) if its persisted content matters: it is persistent, or a
/// record of it is stored and must be replaced or removed. Call after the change.
fn mark_dirty(session: &mut Session, sref: SessionRef, dirty: &mut Vec<SessionRef>) {
    if session.dirty || !(session.persisted || session.is_persistent()) {
        return;
    }
    session.dirty = true;
    dirty.push(sref);
}

/// Per-client topic name <-> id table (spec 7.3 recommends per-client tables).
///
/// Most clients register a handful of topics, and a gateway holds up to `max_clients` of
/// these tables, so the table is a vector sorted by id (binary search by id, the uplink's
/// lookup) with a name index only once it grows past [`TopicTable::NAME_INDEX_FROM`] entries.
/// An empty table allocates nothing.
#[derive(Debug, Default)]
struct TopicTable {
    /// Registered topics, sorted by id.
    entries: Vec<TopicEntry>,
    /// Name -> id, kept only for tables longer than [`TopicTable::NAME_INDEX_FROM`].
    // Boxed on purpose: 8 bytes instead of 48 in each of up to `max_clients` tables.
    #[allow(clippy::box_collection)]
    by_name: Option<Box<HashMap<Arc<str>, u16>>>,
    next_id: u16,
    /// Topics the client refused with a REGACK rejection: not delivered any more (spec 6.5).
    #[allow(clippy::box_collection)] // As `by_name`: rarely used, kept small.
    refused: Option<Box<HashSet<Arc<str>>>>,
}

/// One registered topic of a client.
#[derive(Debug)]
struct TopicEntry {
    name: Arc<str>,
    id: u16,
    /// The client currently knows the id (registered by it, or acknowledged by its REGACK).
    /// After a CleanSession=0 reconnect it knows none and the gateway registers again before
    /// use.
    known: bool,
}

impl TopicTable {
    /// Tables longer than this get a name index; shorter ones are scanned.
    const NAME_INDEX_FROM: usize = 16;

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn position(&self, id: u16) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&id, |e| e.id)
    }

    fn contains_id(&self, id: u16) -> bool {
        self.position(id).is_ok()
    }

    /// The topic registered as `id`.
    fn name(&self, id: u16) -> Option<&Arc<str>> {
        let index = self.position(id).ok()?;
        self.entries.get(index).map(|e| &e.name)
    }

    /// The id registered for `name`.
    fn id(&self, name: &str) -> Option<u16> {
        match &self.by_name {
            Some(index) => index.get(name).copied(),
            None => self.entries.iter().find(|e| &*e.name == name).map(|e| e.id),
        }
    }

    /// The id of `name` if the client knows it.
    fn known_id(&self, name: &str) -> Option<u16> {
        let id = self.id(name)?;
        let index = self.position(id).ok()?;
        self.entries.get(index).filter(|e| e.known).map(|e| e.id)
    }

    /// Adds `name` as `id` (neither registered yet).
    fn insert(&mut self, id: u16, name: Arc<str>) {
        let Err(at) = self.position(id) else {
            return;
        };
        // Grow one step at a time while small: most tables hold one or two topics.
        if self.entries.len() == self.entries.capacity() {
            self.entries.reserve_exact(self.entries.len().clamp(1, 16));
        }
        if let Some(index) = &mut self.by_name {
            index.insert(name.clone(), id);
        } else if self.entries.len() >= Self::NAME_INDEX_FROM {
            let mut index: HashMap<Arc<str>, u16> = self
                .entries
                .iter()
                .map(|e| (e.name.clone(), e.id))
                .collect();
            index.insert(name.clone(), id);
            self.by_name = Some(Box::new(index));
        }
        self.entries.insert(
            at,
            TopicEntry {
                name,
                id,
                known: false,
            },
        );
    }

    fn set_known(&mut self, id: u16, known: bool) {
        if let Ok(index) = self.position(id)
            && let Some(e) = self.entries.get_mut(index)
        {
            e.known = known;
        }
    }

    /// The client lost its registrations (CleanSession=0 reconnect).
    fn forget_known(&mut self) {
        for e in &mut self.entries {
            e.known = false;
        }
    }

    fn is_refused(&self, name: &str) -> bool {
        self.refused.as_ref().is_some_and(|r| r.contains(name))
    }

    fn refuse(&mut self, name: Arc<str>) {
        self.refused.get_or_insert_default().insert(name);
    }
}

/// A tokened publish awaiting its outcome.
#[derive(Debug, Clone)]
struct Pending {
    session: SessionRef,
    msg_id: u16,
    topic_id: u16,
    qos2: bool,
    /// The message for the core's own subscribers, delivered once the publish is accepted
    /// (see [`Core::deliver_local`]): kept here because the publisher's session may be gone
    /// by then, and the message still goes upstream.
    local: LocalMessage,
}

/// A message one of the gateway's own sensors published (or a Will), as local delivery
/// hands it to the core's matching sessions.
#[derive(Debug, Clone)]
struct LocalMessage {
    /// The resolved MQTT topic name.
    topic: Arc<str>,
    payload: Bytes,
    /// 0, 1 or 2 (QoS -1 is delivered as 0).
    qos: u8,
    retain: bool,
}

/// Subscribers of one filter, for upstream reference counting.
#[derive(Debug, Default)]
struct FilterEntry {
    subscribers: HashMap<SessionRef, u8>,
    /// QoS the upstreams were asked for.
    upstream_qos: u8,
}

/// A timer: when it fires the session's deadlines are checked (they may have moved since).
type TimerEntry = Reverse<(Instant, SessionRef)>;

/// A packet the gateway sends; owned so it can be queued.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    ConnAck(ReturnCode),
    WillTopicReq,
    WillMsgReq,
    RegAck {
        topic_id: u16,
        msg_id: u16,
        rc: ReturnCode,
    },
    Register {
        topic_id: u16,
        msg_id: u16,
        name: Arc<str>,
    },
    PubAck {
        topic_id: u16,
        msg_id: u16,
        rc: ReturnCode,
    },
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Publish {
        dup: bool,
        qos: u8,
        retain: bool,
        topic: TopicRef,
        msg_id: u16,
        payload: Bytes,
    },
    SubAck {
        qos: u8,
        topic_id: u16,
        msg_id: u16,
        rc: ReturnCode,
    },
    UnsubAck(u16),
    PingResp,
    Disconnect,
    GwInfo {
        radius: u8,
    },
    Advertise,
    WillTopicResp(ReturnCode),
    WillMsgResp(ReturnCode),
}

/// Where the sender of a packet stands, for [`admission`]: the state of the session its
/// address is bound to (for PINGREQ with a ClientId: of the session it names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// No session, or one without a connection (disconnected, lost).
    NoSession,
    /// CONNECT with the Will flag answered with WILLTOPICREQ.
    AwaitingWillTopic,
    /// WILLTOPIC answered with WILLMSGREQ.
    AwaitingWillMsg,
    Active,
    Asleep,
    Awake,
}

impl Standing {
    fn of(state: &State) -> Self {
        match state {
            State::Connecting { will_topic: None } => Self::AwaitingWillTopic,
            State::Connecting {
                will_topic: Some(_),
            } => Self::AwaitingWillMsg,
            State::Active => Self::Active,
            State::Asleep { .. } => Self::Asleep,
            State::Awake => Self::Awake,
            State::Disconnected { .. } => Self::NoSession,
        }
    }
}

/// Packet types as [`admission`] tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connect,
    SearchGw,
    /// PUBLISH with QoS -1 (needs no session, spec 6.8).
    PublishMinusOne,
    Publish,
    Register,
    RegAck,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    Unsubscribe,
    /// PINGREQ without a ClientId.
    PingReq,
    /// PINGREQ with a ClientId (wakes a sleeping client, spec 6.14).
    PingReqWake,
    Disconnect,
    WillTopic,
    WillMsg,
    WillTopicUpd,
    WillMsgUpd,
    /// A type only a gateway sends (ADVERTISE, GWINFO, CONNACK, ...).
    GatewayOnly,
}

impl Kind {
    fn of(packet: &Packet<'_>) -> Self {
        match packet {
            Packet::Connect { .. } => Self::Connect,
            Packet::SearchGw { .. } => Self::SearchGw,
            Packet::Publish {
                qos: QoS::MinusOne, ..
            } => Self::PublishMinusOne,
            Packet::Publish { .. } => Self::Publish,
            Packet::Register { .. } => Self::Register,
            Packet::RegAck { .. } => Self::RegAck,
            Packet::PubAck { .. } => Self::PubAck,
            Packet::PubRec { .. } => Self::PubRec,
            Packet::PubRel { .. } => Self::PubRel,
            Packet::PubComp { .. } => Self::PubComp,
            Packet::Subscribe { .. } => Self::Subscribe,
            Packet::Unsubscribe { .. } => Self::Unsubscribe,
            Packet::PingReq { client_id: None } => Self::PingReq,
            Packet::PingReq { client_id: Some(_) } => Self::PingReqWake,
            Packet::Disconnect { .. } => Self::Disconnect,
            Packet::WillTopic { .. } => Self::WillTopic,
            Packet::WillMsg { .. } => Self::WillMsg,
            Packet::WillTopicUpd { .. } => Self::WillTopicUpd,
            Packet::WillMsgUpd { .. } => Self::WillMsgUpd,
            Packet::Advertise { .. }
            | Packet::GwInfo { .. }
            | Packet::ConnAck { .. }
            | Packet::WillTopicReq
            | Packet::WillMsgReq
            | Packet::SubAck { .. }
            | Packet::UnsubAck { .. }
            | Packet::PingResp
            | Packet::WillTopicResp { .. }
            | Packet::WillMsgResp { .. } => Self::GatewayOnly,
        }
    }
}

/// What [`admission`] decides for a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Allowed: act on it.
    Handle,
    /// Needs a connection the sender does not have: answer DISCONNECT (spec 6.12, "CONNECT
    /// first") and change nothing.
    Reconnect,
    /// Not allowed and not worth an answer (a stray acknowledgement, a late handshake
    /// retransmission, a gateway's packet): drop it, change nothing.
    Ignore,
}

/// The state x packet table of the module docs ("Packets by session state"): the one place
/// that decides whether a packet is acted on. Packets that are not are counted in
/// [`Stats::out_of_state`].
fn admission(standing: Standing, kind: Kind) -> Admission {
    use Admission::{Handle, Ignore, Reconnect};
    use Standing::{Active, Asleep, AwaitingWillMsg, AwaitingWillTopic, Awake};
    match (kind, standing) {
        (Kind::GatewayOnly, _) => Ignore,
        (Kind::Connect | Kind::SearchGw | Kind::PublishMinusOne | Kind::Disconnect, _) => Handle,
        (Kind::WillTopic, AwaitingWillTopic | AwaitingWillMsg) => Handle,
        (Kind::WillMsg, AwaitingWillMsg) => Handle,
        (Kind::WillTopic | Kind::WillMsg, _) => Ignore,
        (Kind::PingReq | Kind::PingReqWake, Active | Asleep | Awake) => Handle,
        (Kind::PubAck | Kind::PubRec | Kind::PubComp | Kind::RegAck, Active | Awake) => Handle,
        (Kind::PubAck | Kind::PubRec | Kind::PubComp | Kind::RegAck, _) => Ignore,
        // A sleeping sensor may wake, publish and sleep again without a CONNECT (as the Paho
        // gateway allows): its registrations and QoS 2 exchanges stay usable while asleep.
        (Kind::Publish | Kind::Register | Kind::PubRel, Active | Asleep | Awake) => Handle,
        (Kind::Subscribe | Kind::Unsubscribe | Kind::WillTopicUpd | Kind::WillMsgUpd, Active) => {
            Handle
        }
        (
            Kind::PingReq
            | Kind::PingReqWake
            | Kind::PubRel
            | Kind::Publish
            | Kind::Register
            | Kind::Subscribe
            | Kind::Unsubscribe
            | Kind::WillTopicUpd
            | Kind::WillMsgUpd,
            _,
        ) => Reconnect,
    }
}

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
    global_predefined_by_name: HashMap<Arc<str>, u16>,
    client_predefined: HashMap<Arc<str>, Arc<HashMap<u16, Arc<str>>>>,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    timers: BinaryHeap<TimerEntry>,
    /// Exact-topic filters and wildcard filters, each with their subscribers.
    exact_filters: HashMap<Arc<str>, FilterEntry>,
    wild_filters: HashMap<Arc<str>, FilterEntry>,
    retained: HashMap<Arc<str>, Down>,
    /// Retained topics whose cached message a local sensor published and whose copy from the
    /// broker has not come back yet (a subset of `retained`'s keys). A new upstream filter
    /// gets these from the cache (the broker may not have them yet: an outage, a backlog),
    /// and the broker's identical copy, once it comes, is delivered to no one (every
    /// subscriber already has it: live, or from the cache).
    retained_local: HashSet<Arc<str>>,
    upstream_available: bool,
    next_advertise: Option<Instant>,
    transmits: VecDeque<(Peer, Reply)>,
    events: VecDeque<Event>,
    stats: Stats,
    /// Sessions whose persisted content changed since the last take (each listed once, see
    /// [`Session::dirty`]); entries of sessions removed meanwhile are stale and skipped.
    persist_dirty: Vec<SessionRef>,
    /// ClientIds of ended sessions whose stored record must go.
    persist_removed: Vec<Arc<str>>,
    /// QoS 0 / -1 publishes of the datagram being handled, delivered locally at its end
    /// ([`Core::deliver_received_local`]); at most one per datagram.
    received_local: Vec<LocalMessage>,
    /// Extra time before a downlink retransmission toward a slow link (a serial line: the time
    /// its write queue takes at the line's rate), by transport address; set by the wiring.
    link_delay: HashMap<PeerAddr, Duration>,
    /// The largest of each bound over every config put in force ([`Core::reconfigure`]):
    /// what state admitted under an earlier, higher limit may still reach
    /// ([`Core::check_invariants`]).
    #[cfg(test)]
    ceilings: CoreConfig,
    /// `max_filters` at construction: the router's filter table was sized with it (see
    /// [`Core::reconfigure`]).
    started_max_filters: usize,
    /// Rate buckets of the identities that published recently (`[limits]`).
    limiter: Limiter,
    /// Refusals by the ACLs, the limits and the identity checks (shared with the admin).
    security_counters: Arc<security::Counters>,
}

/// The predefined topics of a config, indexed for lookups.
struct PredefinedTables {
    /// Id -> topic of the topics every client may use.
    global: HashMap<u16, Arc<str>>,
    /// Topic -> id of `global`.
    global_by_name: HashMap<Arc<str>, u16>,
    /// ClientId -> id -> topic of the topics only some clients may use (a session shares its
    /// client's map).
    per_client: HashMap<Arc<str>, Arc<HashMap<u16, Arc<str>>>>,
}

impl PredefinedTables {
    fn compile(predefined: &[PredefinedTopic]) -> Self {
        let mut global = HashMap::new();
        let mut per_client: HashMap<Arc<str>, HashMap<u16, Arc<str>>> = HashMap::new();
        for p in predefined {
            let topic: Arc<str> = Arc::from(p.topic.as_str());
            match &p.clients {
                ClientSet::All => {
                    global.insert(p.id, topic);
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
        PredefinedTables {
            global_by_name: global.iter().map(|(id, t)| (t.clone(), *id)).collect(),
            global,
            per_client: per_client
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
        }
    }
}

impl Core {
    /// Creates a core. `config` must have been validated (see `config`).
    pub fn new(config: CoreConfig) -> Self {
        let predefined = PredefinedTables::compile(&config.predefined);
        let limits = DecodeLimits {
            max_client_id_len: config.max_client_id_len,
        };
        Core {
            link_delay: HashMap::new(),
            limits,
            slots: Vec::new(),
            free: Vec::new(),
            generations: Vec::new(),
            by_client: HashMap::new(),
            by_peer: HashMap::new(),
            global_predefined_by_name: predefined.global_by_name,
            global_predefined: predefined.global,
            client_predefined: predefined.per_client,
            pending: HashMap::new(),
            next_token: 1,
            timers: BinaryHeap::new(),
            exact_filters: HashMap::new(),
            wild_filters: HashMap::new(),
            retained: HashMap::new(),
            retained_local: HashSet::new(),
            upstream_available: true,
            next_advertise: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            persist_dirty: Vec::new(),
            persist_removed: Vec::new(),
            received_local: Vec::new(),
            #[cfg(test)]
            ceilings: config.clone(),
            started_max_filters: config.max_filters,
            limiter: Limiter::new(),
            security_counters: Arc::default(),
            config,
        }
    }

    /// The counters of refusals by ACL, limit and identity checks, for the admin listener
    /// (`sensorgate_ingress_events_total`): the core writes them, the admin reads them.
    #[must_use]
    pub fn security_counters(&self) -> Arc<security::Counters> {
        Arc::clone(&self.security_counters)
    }

    /// Checks a publish of `len` payload bytes to `topic` by `identity` using `client_id`
    /// against the ACL and the limits (taking its rate tokens when allowed), and counts a
    /// refusal. `rate_key`: the identity's name, or the peer's address when there is none.
    fn authorize_publish(
        &mut self,
        now: Instant,
        identity: Option<&Identity>,
        client_id: Option<&str>,
        rate_key: &str,
        topic: &str,
        len: usize,
    ) -> Result<(), Denial> {
        let policy = &self.config.security;
        let who = Requester::new(identity, client_id);
        let denial = if !policy.may_publish(&who, topic) {
            Some(Denial::AclPublish)
        } else if policy.limits_active() {
            match self.limiter.check(&policy.limits, now, rate_key, len) {
                security::Verdict::Allowed => None,
                security::Verdict::TooLarge => Some(Denial::TooLarge),
                security::Verdict::RateLimited { .. } => Some(Denial::RateLimited),
            }
        } else {
            None
        };
        match denial {
            None => Ok(()),
            Some(denial) => {
                self.security_counters.count(denial);
                tracing::debug!(
                    client_id,
                    identity = identity.map(|i| &*i.name),
                    topic,
                    len,
                    reason = denial.as_str(),
                    "MQTT-SN publish refused."
                );
                Err(denial)
            }
        }
    }

    /// Whether any ACL or limit is configured (otherwise no publish is checked).
    fn policy_active(&self) -> bool {
        self.config.security.acl.is_some() || self.config.security.limits_active()
    }

    /// The PUBACK rc of a refused publish: 0x01 (congestion) over the rate, else 0x03.
    fn denial_rc(denial: Denial) -> ReturnCode {
        match denial {
            Denial::RateLimited => ReturnCode::Congestion,
            _ => ReturnCode::NotSupported,
        }
    }

    /// Whether session `sref` may be sent a message on `topic` under the ACL in force.
    fn may_receive(&self, sref: SessionRef, topic: &str) -> bool {
        if self.config.security.acl.is_none() {
            return true;
        }
        self.session(sref).is_none_or(|s| {
            let who = Requester::new(Some(&s.identity), Some(&s.client_id));
            self.config.security.may_receive(&who, topic)
        })
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        Stats {
            sessions: self.by_client.len() as u64,
            ..self.stats
        }
    }

    /// Number of sessions (connected, asleep or persisted).
    pub fn session_count(&self) -> usize {
        self.by_client.len()
    }

    /// What the admin listener shows of this core: sessions by state, counted by walking the
    /// session table now (O(sessions); nothing is kept per transition), and the counters.
    #[must_use]
    pub fn report(&self) -> IngressReport {
        let mut sessions = SessionCounts::default();
        for s in self.slots.iter().flatten() {
            sessions.add(s.state.observed());
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
                downlink_dropped: stats.downlink_dropped_by,
                packets_in: stats.datagrams,
            },
        }
    }

    /// A page of sessions for the admin listener: those whose ClientId starts with
    /// `query.prefix`, in `query.state`, and ordered after `query.after`, by ClientId, at most
    /// `query.limit` of them (`more` says whether further ones match). `now` dates
    /// `last_seen_ms_ago`. Costs O(sessions log sessions) per call, nothing per packet.
    #[must_use]
    pub fn clients(&self, now: Instant, query: &ClientQuery) -> ClientsPage {
        let prefix = query.prefix.as_deref().unwrap_or("");
        let after = query.after.as_deref();
        let mut matching: Vec<&Session> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| {
                s.client_id.starts_with(prefix)
                    && after.is_none_or(|a| &*s.client_id > a)
                    && query.state.is_none_or(|st| s.state.observed() == st)
            })
            .collect();
        let more = matching.len() > query.limit;
        // Only the page needs sorting: select its members first.
        if more && query.limit > 0 {
            matching.select_nth_unstable_by(query.limit, |a, b| a.client_id.cmp(&b.client_id));
        }
        matching.truncate(query.limit);
        matching.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
        let clients = matching
            .into_iter()
            .map(|s| ClientInfo {
                client_id: s.client_id.to_string(),
                protocol: PROTOCOL,
                address: s.peer.as_ref().map(ToString::to_string),
                state: s.state.observed(),
                keep_alive_secs: match s.state {
                    State::Asleep { .. } | State::Awake => u64::from(s.sleep_secs),
                    _ => u64::from(s.keep_alive_secs),
                },
                last_seen_ms_ago: u64::try_from(
                    now.saturating_duration_since(s.last_seen).as_millis(),
                )
                .unwrap_or(u64::MAX),
                subscriptions: s
                    .subscriptions
                    .iter()
                    .map(|sub| SubscriptionInfo {
                        filter: sub.filter.to_string(),
                        qos: sub.qos,
                    })
                    .collect(),
                queued_downlink: (s.queue.len() + usize::from(s.inflight_down.is_some())) as u64,
                counters: None,
            })
            .collect();
        ClientsPage { clients, more }
    }

    /// Tells the core whether any upstream is connected; ADVERTISE is sent only while one is
    /// (spec 6.1).
    pub fn set_upstream_available(&mut self, available: bool) {
        self.upstream_available = available;
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, peer: Peer, datagram: &[u8]) {
        self.stats.datagrams += 1;
        if datagram.len() > self.config.max_packet_size {
            self.stats.oversize += 1;
            self.stats.refuse(RefusalReason::TooLarge);
            tracing::debug!(peer = %peer, len = datagram.len(), "Oversize datagram dropped.");
            return;
        }
        match codec::decode(datagram, &self.limits) {
            Ok(Frame::Plain(packet)) => self.handle_packet(now, peer, packet, 0),
            // Only an allow-listed forwarder (or a serial line) may speak for other clients:
            // anyone else could claim any node id.
            Ok(Frame::Encapsulated { .. }) if !peer.addr.may_relay() => {
                self.stats.refuse(RefusalReason::ForwarderNotAllowed);
                tracing::debug!(peer = %peer, "Encapsulated datagram from a source that may not relay dropped.");
            }
            Ok(Frame::Encapsulated {
                node_id,
                packet,
                radius,
            }) => {
                let peer = Peer {
                    node: Some(node_id.into()),
                    ..peer
                };
                self.handle_packet(now, peer, packet, radius);
            }
            Err(error) => {
                self.stats.malformed += 1;
                self.stats.refuse(RefusalReason::Malformed);
                tracing::debug!(peer = %peer, %error, "Malformed datagram dropped.");
            }
        }
        self.deliver_received_local(now);
    }

    /// Local delivery of the QoS 0 / -1 publishes the last datagram carried.
    fn deliver_received_local(&mut self, now: Instant) {
        let mut received = std::mem::take(&mut self.received_local);
        for local in received.drain(..) {
            self.deliver_local(now, local);
        }
        // Keep the allocation for the next datagram.
        self.received_local = received;
    }

    /// Local delivery: a message the gateway's own sensors published (or a Will) goes to
    /// every matching session of this core exactly like a downlink (see
    /// [`Core::handle_downlink`]): QoS = min(subscription, message), each session once however
    /// many of its filters match, sleeping clients buffered, the retain flag as published and
    /// the retained cache updated. MQTT-SN has no No Local: the publisher gets its own message
    /// when subscribed.
    ///
    /// Called when the message is accepted: QoS 0 / -1 when received, QoS 1/2 when
    /// [`Core::handle_publish_result`] reports it durable, a Will when published. The
    /// upstreams never bring it back a second time: MQTT 5 subscribes with No Local, and the
    /// MQTT 3.1.1 upstream drops the broker's echo of the gateway's own publishes.
    fn deliver_local(&mut self, now: Instant, msg: LocalMessage) {
        self.stats.local_in += 1;
        if msg.retain {
            self.remember_retained(&msg.topic, &msg.payload, msg.qos);
            if self.retained.contains_key(&*msg.topic) {
                self.retained_local.insert(msg.topic.clone());
            }
        }
        let mut targets: HashMap<SessionRef, u8> = HashMap::new();
        let mut collect = |entry: &FilterEntry| {
            for (&sref, &sub_qos) in &entry.subscribers {
                let q = targets.entry(sref).or_insert(0);
                *q = (*q).max(sub_qos.min(msg.qos));
            }
        };
        if let Some(entry) = self.exact_filters.get(&msg.topic) {
            collect(entry);
        }
        for (filter, entry) in &self.wild_filters {
            if matches(filter, &msg.topic) {
                collect(entry);
            }
        }
        for (sref, qos) in targets {
            let down = Down {
                topic: msg.topic.clone(),
                payload: msg.payload.clone(),
                qos,
                retain: msg.retain,
                dup: false,
            };
            // A drop (full queue) is counted by `enqueue`; nothing waits for the outcome.
            let _ = self.enqueue(now, sref, down);
        }
    }

    /// Reports the spool's verdict for a token from [`Event::Publish`]: accepted once the
    /// message is durable (fsync'd), congestion when it could not be taken.
    ///
    /// An accepted publish also goes to the core's own matching sessions (local delivery, see
    /// the module docs), after the publisher's acknowledgement. A refused one does not (the
    /// sensor retries it; delivering it now would deliver it twice).
    pub fn handle_publish_result(&mut self, now: Instant, token: u64, outcome: PublishOutcome) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        self.answer_publish(&p, token, outcome);
        if outcome == PublishOutcome::Accepted {
            self.deliver_local(now, p.local);
        }
    }

    /// Answers the sensor of a tokened publish: PUBACK / PUBREC, or PUBACK rc 0x01.
    fn answer_publish(&mut self, p: &Pending, token: u64, outcome: PublishOutcome) {
        // Refused whether or not its sender is still there to be told.
        match outcome {
            PublishOutcome::Accepted => {}
            PublishOutcome::Congestion => self.stats.refuse(RefusalReason::Congestion),
            PublishOutcome::NoRoute => self.stats.refuse(RefusalReason::NotAllowed),
        }
        let Some(session) = slot_mut(&mut self.slots, p.session) else {
            return;
        };
        session.inflight_up.retain(|&(_, t)| t != token);
        // Remembered even when the client is gone meanwhile: it will send the PUBLISH again
        // (DUP) after reconnecting, and that copy must not be taken as new.
        if p.qos2
            && matches!(outcome, PublishOutcome::Accepted)
            && !session.qos2_received.contains(&p.msg_id)
        {
            session.qos2_received.push(p.msg_id);
        }
        let Some(peer) = session.peer.clone() else {
            return;
        };
        let reply = match outcome {
            PublishOutcome::Accepted if p.qos2 => {
                self.stats.acks += 1;
                Reply::PubRec(p.msg_id)
            }
            PublishOutcome::Accepted => {
                self.stats.acks += 1;
                Reply::PubAck {
                    topic_id: p.topic_id,
                    msg_id: p.msg_id,
                    rc: ReturnCode::Accepted,
                }
            }
            PublishOutcome::Congestion => {
                self.stats.rejections += 1;
                Reply::PubAck {
                    topic_id: p.topic_id,
                    msg_id: p.msg_id,
                    rc: ReturnCode::Congestion,
                }
            }
            // Of the return codes of v1.2 section 5.3.10, 0x01 (congestion) would make the
            // sensor retry what can never be taken, and 0x02 (invalid topic id) would make it
            // re-register a topic the gateway knows; 0x03 (not supported) says the gateway
            // does not take this publish. PUBACK is the refusal for QoS 2 too (PUBREC has no
            // return code).
            PublishOutcome::NoRoute => {
                self.stats.rejections += 1;
                Reply::PubAck {
                    topic_id: p.topic_id,
                    msg_id: p.msg_id,
                    rc: ReturnCode::NotSupported,
                }
            }
        };
        self.transmits.push_back((peer, reply));
    }

    /// A message from an upstream subscription: queued for every matching session with QoS =
    /// min(subscription, message), and remembered when retained.
    ///
    /// `filters` names the subscriptions this copy was delivered for when the upstream knows
    /// (MQTT 5 subscription identifiers): the broker sends one copy per matching upstream
    /// filter, so each copy goes to the subscribers of its own filters only and a client
    /// matched by two different clients' filters still gets one copy. `None` matches every
    /// subscribed filter.
    ///
    /// The outcome says whether the message became part of a persistent session's state (see
    /// the module docs, "Driving the core", for what to do with the broker's acknowledgement).
    pub fn handle_downlink(
        &mut self,
        now: Instant,
        topic: &str,
        payload: Bytes,
        qos: Qos,
        retain: bool,
        filters: Option<&[Arc<str>]>,
    ) -> DownlinkOutcome {
        self.stats.downlink_in += 1;
        let msg_qos = qos_level(qos);
        if retain {
            // The broker's copy of a retained message a local sensor published: every
            // subscriber has it already (live when it was published, or from the cache when
            // it subscribed later), so it goes to no one.
            let own = self.retained_local.remove(topic)
                && self
                    .retained
                    .get(topic)
                    .is_some_and(|d| d.payload == payload);
            self.remember_retained(topic, &payload, msg_qos);
            if own {
                self.stats.downlink_own_retained += 1;
                return DownlinkOutcome::default();
            }
        }
        let mut targets: HashMap<SessionRef, u8> = HashMap::new();
        let mut collect = |entry: &FilterEntry| {
            for (&sref, &sub_qos) in &entry.subscribers {
                let q = targets.entry(sref).or_insert(0);
                *q = (*q).max(sub_qos.min(msg_qos));
            }
        };
        match filters {
            Some(filters) => {
                for filter in filters {
                    let entry = if has_wildcards(filter) {
                        self.wild_filters
                            .get(filter)
                            .filter(|_| matches(filter, topic))
                    } else {
                        self.exact_filters
                            .get(filter)
                            .filter(|_| **filter == *topic)
                    };
                    if let Some(entry) = entry {
                        collect(entry);
                    }
                }
            }
            None => {
                if let Some(entry) = self.exact_filters.get(topic) {
                    collect(entry);
                }
                for (filter, entry) in &self.wild_filters {
                    if matches(filter, topic) {
                        collect(entry);
                    }
                }
            }
        }
        let mut outcome = DownlinkOutcome::default();
        if targets.is_empty() {
            return outcome;
        }
        let topic: Arc<str> = Arc::from(topic);
        for (sref, qos) in targets {
            let down = Down {
                topic: topic.clone(),
                payload: payload.clone(),
                qos,
                retain,
                dup: false,
            };
            match self.enqueue(now, sref, down) {
                Queued::Persisted => {
                    outcome.queued += 1;
                    outcome.persisted += 1;
                }
                Queued::Volatile => outcome.queued += 1,
                Queued::Dropped => {}
            }
        }
        outcome
    }

    /// Runs due timers (keep-alive, sleep, retransmission, session expiry, ADVERTISE). Early
    /// calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advertise_if_due(now);
        let retry_all = self.handshake_timeout();
        while let Some(Reverse((deadline, sref))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let Some(session) = slot_mut(&mut self.slots, sref) else {
                continue;
            };
            if session.armed == Some(deadline) {
                session.armed = None;
            }
            match session.next_deadline(retry_all) {
                Some(due) if due <= now => self.on_session_timer(now, sref),
                Some(_) => self.schedule(sref),
                None => {}
            }
        }
    }

    /// The next instant [`Core::handle_timeout`] has work, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((t, _))| *t);
        let adv = if self.config.advertise_to.is_empty() {
            None
        } else {
            self.next_advertise
        };
        match (timer, adv) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes the next datagram to send into `buf` (cleared first) and returns its destination.
    #[must_use]
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Peer> {
        loop {
            let (peer, reply) = self.transmits.pop_front()?;
            buf.clear();
            let radius = match reply {
                Reply::GwInfo { radius } => radius,
                _ => 0,
            };
            let packet = self.reply_packet(&reply);
            let result = match &peer.node {
                None => packet.encode(buf),
                Some(node) => codec::encode_encapsulated(radius, node, &packet, buf),
            };
            // Only a PUBLISH can be long, and its size was checked when it was built.
            if result.is_ok() {
                return Some(peer);
            }
        }
    }

    /// The next event for the upstream side.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Appends to `out` what changed in the persisted sessions since the last call: the
    /// removals of ended sessions first, then one change per dirty session (an
    /// [`PersistChange::Upsert`] with its current record, or a [`PersistChange::Remove`] when
    /// it stopped being persistent). The store applies them in order. Costs O(changes), not
    /// O(sessions).
    pub fn take_persist_changes(&mut self, out: &mut Vec<PersistChange>) {
        out.extend(
            self.persist_removed
                .drain(..)
                .map(|client_id| PersistChange::Remove { client_id }),
        );
        let mut dirty = std::mem::take(&mut self.persist_dirty);
        for sref in dirty.drain(..) {
            let Some(s) = slot_mut(&mut self.slots, sref) else {
                continue;
            };
            s.dirty = false;
            if s.is_persistent() {
                let mut bytes = Vec::new();
                match persist::encode(&s.record(), &mut bytes) {
                    Ok(()) => {
                        s.persisted = true;
                        out.push(PersistChange::Upsert {
                            client_id: s.client_id.clone(),
                            bytes,
                        });
                    }
                    // Unreachable with the core's own limits (ClientIds and topics fit 16
                    // bits); the last stored record stays.
                    Err(error) => {
                        tracing::error!(client_id = %s.client_id, %error, "Cannot encode session record; not persisted.");
                    }
                }
            } else if s.persisted {
                s.persisted = false;
                out.push(PersistChange::Remove {
                    client_id: s.client_id.clone(),
                });
            }
        }
        // Keep the allocation for the next round.
        self.persist_dirty = dirty;
    }

    /// Restores one stored session record (from [`Core::take_persist_changes`] of an earlier
    /// run). Call at start, before any other input. The session comes back asleep or
    /// disconnected, unbound to any address, with its timers restarted from `now` (the full
    /// sleep duration plus tolerance, or the full `session_expiry`); registrations are
    /// restored as unknown to the client, so topics are registered again before use; its
    /// subscriptions are indexed as usual, so [`Core::poll_event`] yields the
    /// [`Event::Subscribe`]s the upstreams need. Queues and lists longer than the current
    /// limits are cut (the oldest queued messages go, the drops counted) and the record is
    /// rewritten at the next take.
    ///
    /// # Errors
    /// [`RestoreError`] when the bytes are no valid record, the ClientId has a session
    /// already, the session table is full, or the record is of a session that needs no
    /// persistence. Nothing changes then.
    pub fn restore(&mut self, now: Instant, encoded: &[u8]) -> Result<(), RestoreError> {
        let record = persist::decode(encoded)?;
        if self.by_client.contains_key(&record.client_id) {
            return Err(RestoreError::Duplicate(record.client_id));
        }
        if self.by_client.len() >= self.config.max_clients {
            return Err(RestoreError::TableFull);
        }
        let state = match record.state {
            RecordState::Asleep => State::Asleep {
                until: now + sleep_limit(Duration::from_secs(u64::from(record.sleep_secs))),
            },
            RecordState::Disconnected if !record.clean_session => State::Disconnected {
                expires: now + self.config.session_expiry,
                lost: false,
            },
            RecordState::Disconnected => {
                return Err(RestoreError::NotPersistent(record.client_id));
            }
        };
        let queue_limit = match state {
            State::Asleep { .. } => self.config.max_buffered_per_sleeping_client,
            _ => self.config.max_queued_per_client,
        };
        let mut cut = false;
        let mut topics = TopicTable {
            next_id: record.next_topic_id,
            ..TopicTable::default()
        };
        let topics_total = record.topics.len();
        for t in record
            .topics
            .into_iter()
            .take(self.config.max_topics_per_client)
        {
            topics.insert(t.id, t.name);
        }
        cut |= topics.len() < topics_total;
        for name in record.refused {
            topics.refuse(name);
        }
        let subs_total = record.subscriptions.len();
        // New distinct filters only while `max_filters` allows (as for a SUBSCRIBE).
        let mut room = self.config.max_filters.saturating_sub(self.filter_count());
        let mut new_filters: HashSet<Arc<str>> = HashSet::new();
        let subscriptions: Vec<Subscription> = record
            .subscriptions
            .into_iter()
            .take(self.config.max_subscriptions_per_client)
            .filter(|s| {
                if self.is_indexed(&s.filter) || new_filters.contains(&s.filter) {
                    return true;
                }
                if room == 0 {
                    return false;
                }
                room -= 1;
                new_filters.insert(s.filter.clone());
                true
            })
            .map(|s| Subscription {
                filter: s.filter,
                qos: s.qos,
            })
            .collect();
        if subscriptions.len() < subs_total.min(self.config.max_subscriptions_per_client) {
            self.stats.filters_full += 1;
            tracing::debug!(client_id = %record.client_id, "Distinct filter limit reached; restored session lost subscriptions.");
        }
        cut |= subscriptions.len() < subs_total;
        let mut queue: VecDeque<Down> = record
            .queue
            .into_iter()
            .map(|m| Down {
                topic: m.topic,
                payload: m.payload,
                qos: m.qos,
                retain: m.retain,
                dup: m.dup,
            })
            .collect();
        if queue.len() > queue_limit {
            let excess = queue.len() - queue_limit;
            self.stats
                .drop_downlink(DownlinkDropReason::QueueFull, excess as u64);
            match self.config.queue_full {
                QueueFull::DropOldest => drop(queue.drain(..excess)),
                QueueFull::DropNew => queue.truncate(queue_limit),
            }
            cut = true;
        }
        let will = record.will.map(|w| {
            Box::new(Will {
                topic: w.topic,
                payload: w.payload,
                qos: wire_qos(w.qos),
                retain: w.retain,
            })
        });

        let client_id = record.client_id;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = u32::try_from(self.slots.len()).map_err(|_| RestoreError::TableFull)?;
                self.slots.push(None);
                self.generations.push(0);
                slot
            }
        };
        let Some(generation) = self.generations.get_mut(slot as usize) else {
            return Err(RestoreError::TableFull);
        };
        *generation = generation.wrapping_add(1);
        let sref = SessionRef {
            slot,
            generation: *generation,
        };
        let session = Session {
            own_predefined: self.client_predefined.get(&client_id).cloned(),
            identity: claimed_identity(&client_id),
            client_id: client_id.clone(),
            peer: None,
            origin: session_origin(&client_id, None),
            generation: sref.generation,
            state,
            clean_session: record.clean_session,
            keep_alive_secs: record.keep_alive_secs,
            sleep_secs: record.sleep_secs,
            last_seen: now,
            topics,
            inflight_up: Vec::new(),
            qos2_received: Vec::new(),
            will,
            subscriptions,
            queue,
            inflight_down: None,
            next_msg_id: 0,
            armed: None,
            persisted: true,
            dirty: false,
        };
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return Err(RestoreError::TableFull);
        };
        let filters: Vec<(Arc<str>, u8)> = session
            .subscriptions
            .iter()
            .map(|s| (s.filter.clone(), s.qos))
            .collect();
        *entry = Some(session);
        self.by_client.insert(client_id.clone(), sref);
        for (filter, qos) in filters {
            self.index_subscription(sref, &filter, qos);
        }
        if cut {
            self.mark_dirty(sref);
        }
        self.schedule(sref);
        tracing::debug!(client_id = %client_id, "Session restored.");
        Ok(())
    }

    fn handshake_timeout(&self) -> Duration {
        self.config.retry_interval * (self.config.max_retries + 1)
    }

    fn reply_packet<'a>(&self, reply: &'a Reply) -> Packet<'a> {
        match reply {
            Reply::ConnAck(rc) => Packet::ConnAck { rc: *rc },
            Reply::WillTopicReq => Packet::WillTopicReq,
            Reply::WillMsgReq => Packet::WillMsgReq,
            Reply::RegAck {
                topic_id,
                msg_id,
                rc,
            } => Packet::RegAck {
                topic_id: *topic_id,
                msg_id: *msg_id,
                rc: *rc,
            },
            Reply::Register {
                topic_id,
                msg_id,
                name,
            } => Packet::Register {
                topic_id: *topic_id,
                msg_id: *msg_id,
                topic_name: name,
            },
            Reply::PubAck {
                topic_id,
                msg_id,
                rc,
            } => Packet::PubAck {
                topic_id: *topic_id,
                msg_id: *msg_id,
                rc: *rc,
            },
            Reply::PubRec(msg_id) => Packet::PubRec { msg_id: *msg_id },
            Reply::PubRel(msg_id) => Packet::PubRel { msg_id: *msg_id },
            Reply::PubComp(msg_id) => Packet::PubComp { msg_id: *msg_id },
            Reply::Publish {
                dup,
                qos,
                retain,
                topic,
                msg_id,
                payload,
            } => Packet::Publish {
                dup: *dup,
                qos: wire_qos(*qos),
                retain: *retain,
                topic: *topic,
                msg_id: *msg_id,
                data: payload,
            },
            Reply::SubAck {
                qos,
                topic_id,
                msg_id,
                rc,
            } => Packet::SubAck {
                qos: wire_qos(*qos),
                topic_id: *topic_id,
                msg_id: *msg_id,
                rc: *rc,
            },
            Reply::UnsubAck(msg_id) => Packet::UnsubAck { msg_id: *msg_id },
            Reply::PingResp => Packet::PingResp,
            Reply::Disconnect => Packet::Disconnect { duration: None },
            Reply::GwInfo { .. } => Packet::GwInfo {
                gw_id: self.config.gw_id,
                gw_addr: &[],
            },
            Reply::Advertise => Packet::Advertise {
                gw_id: self.config.gw_id,
                duration: u16::try_from(self.config.advertise_interval.as_secs())
                    .unwrap_or(u16::MAX),
            },
            Reply::WillTopicResp(rc) => Packet::WillTopicResp { rc: *rc },
            Reply::WillMsgResp(rc) => Packet::WillMsgResp { rc: *rc },
        }
    }

    fn handle_packet(&mut self, now: Instant, peer: Peer, packet: Packet<'_>, radius: u8) {
        let kind = Kind::of(&packet);
        // PINGREQ(ClientId) names its session; every other packet acts on the session its
        // address is bound to.
        let sref = match packet {
            Packet::PingReq {
                client_id: Some(id),
            } => self.by_client.get(id).copied(),
            _ => self.by_peer.get(&peer).copied(),
        };
        let standing = sref
            .and_then(|sref| self.session(sref))
            .map_or(Standing::NoSession, |s| Standing::of(&s.state));
        match admission(standing, kind) {
            Admission::Handle => {}
            Admission::Reconnect => {
                self.stats.out_of_state += 1;
                tracing::debug!(peer = %peer, packet = packet.name(), ?standing, "Packet needs a connection; sent DISCONNECT.");
                self.transmits.push_back((peer, Reply::Disconnect));
                return;
            }
            Admission::Ignore => {
                self.stats.out_of_state += 1;
                tracing::debug!(peer = %peer, packet = packet.name(), ?standing, "Packet not allowed in this state ignored.");
                return;
            }
        }
        match packet {
            Packet::Connect {
                will,
                clean_session,
                duration,
                client_id,
            } => {
                self.handle_connect(now, peer, will, clean_session, duration, client_id);
            }
            Packet::SearchGw {
                radius: search_radius,
            } => {
                if self.config.gwinfo_to_destinations && !self.config.advertise_to.is_empty() {
                    for dest in self.config.advertise_to.clone() {
                        self.transmits.push_back((
                            dest,
                            Reply::GwInfo {
                                radius: search_radius,
                            },
                        ));
                    }
                } else {
                    // Through a forwarder, the reply is broadcast with the searcher's radius.
                    let radius = if peer.node.is_some() {
                        search_radius
                    } else {
                        radius
                    };
                    self.transmits.push_back((peer, Reply::GwInfo { radius }));
                }
            }
            Packet::Publish {
                qos: QoS::MinusOne,
                topic,
                data,
                retain,
                ..
            } => {
                self.handle_publish_m1(now, peer, topic, data, retain);
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
                self.handle_publish(now, sref, peer, qos, retain, topic, msg_id, data);
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
            Packet::PingReq { client_id } => self.handle_pingreq(now, peer, client_id),
            Packet::Disconnect { duration } => self.handle_disconnect(now, peer, duration),
            Packet::Subscribe {
                msg_id, qos, topic, ..
            } => {
                let Some(sref) = self.touch(now, &peer) else {
                    return self.unknown_peer(peer, packet.name());
                };
                self.handle_subscribe(now, sref, peer, msg_id, qos, topic);
            }
            Packet::Unsubscribe { msg_id, topic } => {
                let Some(sref) = self.touch(now, &peer) else {
                    return self.unknown_peer(peer, packet.name());
                };
                if let Some(filter) = self.subscribe_filter(sref, topic) {
                    self.remove_subscription(sref, &filter);
                }
                self.transmits.push_back((peer, Reply::UnsubAck(msg_id)));
            }
            Packet::WillTopic { will, topic } => self.handle_will_topic(now, peer, will, topic),
            Packet::WillMsg { msg } => self.handle_will_msg(now, peer, msg),
            Packet::WillTopicUpd { will, topic } => {
                let Some(sref) = self.touch(now, &peer) else {
                    return self.unknown_peer(peer, packet.name());
                };
                let rc = self.update_will_topic(sref, will, topic);
                if rc != ReturnCode::Accepted {
                    self.stats.refuse(refusal_of(rc));
                }
                self.transmits.push_back((peer, Reply::WillTopicResp(rc)));
            }
            Packet::WillMsgUpd { msg } => {
                let Some(sref) = self.touch(now, &peer) else {
                    return self.unknown_peer(peer, packet.name());
                };
                let rc = match slot_mut(&mut self.slots, sref) {
                    Some(s) if s.will.is_some() => {
                        if let Some(w) = &mut s.will {
                            w.payload = Bytes::copy_from_slice(msg);
                        }
                        mark_dirty(s, sref, &mut self.persist_dirty);
                        ReturnCode::Accepted
                    }
                    // No Will topic to attach the message to.
                    _ => {
                        self.stats.refuse(RefusalReason::NotAllowed);
                        ReturnCode::NotSupported
                    }
                };
                self.transmits.push_back((peer, Reply::WillMsgResp(rc)));
            }
            Packet::PubAck {
                topic_id,
                msg_id,
                rc,
            } => {
                if let Some(sref) = self.touch(now, &peer) {
                    self.on_puback(now, sref, topic_id, msg_id, rc);
                }
            }
            Packet::PubRec { msg_id } => {
                if let Some(sref) = self.touch(now, &peer) {
                    self.on_pubrec(now, sref, msg_id);
                }
            }
            Packet::PubComp { msg_id } => {
                if let Some(sref) = self.touch(now, &peer) {
                    self.on_pubcomp(now, sref, msg_id);
                }
            }
            Packet::RegAck {
                topic_id,
                msg_id,
                rc,
            } => {
                if let Some(sref) = self.touch(now, &peer) {
                    self.on_regack(now, sref, topic_id, msg_id, rc);
                }
            }
            // Only a gateway sends these: `admission` ignores them.
            Packet::Advertise { .. }
            | Packet::GwInfo { .. }
            | Packet::ConnAck { .. }
            | Packet::WillTopicReq
            | Packet::WillMsgReq
            | Packet::SubAck { .. }
            | Packet::UnsubAck { .. }
            | Packet::PingResp
            | Packet::WillTopicResp { .. }
            | Packet::WillMsgResp { .. } => {}
        }
    }

    /// A packet that needs a session came from an address without one: tell it to reconnect
    /// (spec 6.12).
    fn unknown_peer(&mut self, peer: Peer, what: &'static str) {
        tracing::debug!(peer = %peer, packet = what, "Packet from unknown client; sent DISCONNECT.");
        self.transmits.push_back((peer, Reply::Disconnect));
    }

    // ------------------------------------------------------------------------------------
    // Connection, Will, sleep.

    fn handle_connect(
        &mut self,
        now: Instant,
        peer: Peer,
        will: bool,
        clean_session: bool,
        duration: u16,
        client_id: &str,
    ) {
        let keep_alive = duration;
        // Refusals come first and change nothing: no session, no binding, no Will handshake.
        if client_id.is_empty() {
            return self.refuse_connect(peer, 0, RefusalReason::NotAllowed);
        }
        if client_id.len() > self.config.max_client_id_len {
            return self.refuse_connect(peer, client_id.len(), RefusalReason::TooLarge);
        }
        if let Some(denial) = self.connect_denial(&peer, client_id) {
            self.security_counters.count(denial);
            tracing::debug!(peer = %peer, client_id, reason = denial.as_str(), "CONNECT refused by identity check.");
            return self.refuse_connect(peer, client_id.len(), RefusalReason::NotAllowed);
        }
        let existing = self.by_client.get(client_id).copied();
        if existing.is_none() && self.by_client.len() >= self.config.max_clients {
            return self.refuse_connect(peer, client_id.len(), RefusalReason::Congestion);
        }
        let sref = match existing {
            Some(old) if !clean_session => {
                // Resume the persistent session (also from asleep or disconnected), possibly
                // from a new address.
                self.bind(old, peer.clone());
                let Some(s) = self.session_mut(old) else {
                    return;
                };
                s.clean_session = false;
                s.identity = identity_of(&peer, &s.client_id);
                s.keep_alive_secs = keep_alive;
                s.last_seen = now;
                // The client's own topic table was lost with its connection.
                s.topics.forget_known();
                s.requeue_in_flight();
                old
            }
            _ => {
                if let Some(old) = existing {
                    self.remove_session(old);
                }
                if let Some(&other) = self.by_peer.get(&peer) {
                    // A new client on this address: the old one loses the binding only.
                    self.unbind(other);
                }
                match self.create_session(now, peer.clone(), client_id, clean_session, keep_alive) {
                    Some(sref) => sref,
                    None => return,
                }
            }
        };
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        tracing::debug!(client_id, peer = %peer, keep_alive_secs = duration, clean_session, will, "Client connecting.");
        if will {
            s.state = State::Connecting { will_topic: None };
            self.transmits.push_back((peer, Reply::WillTopicReq));
        } else {
            if clean_session {
                s.will = None;
            }
            return self.activate(now, sref, peer);
        }
        self.mark_dirty(sref);
        self.schedule(sref);
    }

    /// Why a CONNECT of `client_id` from `peer` is refused by the identity checks, if it is: a
    /// proven identity that may not use this ClientId; no proven identity where
    /// `require_identity` asks for one; a session of this ClientId held by a proven identity
    /// other than the peer's (a plain client must not take over a DTLS client's session), or
    /// a ClientId bound to a `[[psk]]` identity claimed without proving it (so also for a
    /// session restored after a restart, whose record does not say who proved it).
    fn connect_denial(&self, peer: &Peer, client_id: &str) -> Option<Denial> {
        match &peer.identity {
            Some(id) if !id.allows_client_id(client_id) => return Some(Denial::ClientIdMismatch),
            None if self.config.require_identity => return Some(Denial::IdentityRequired),
            None if self.config.security.is_reserved(client_id) => {
                return Some(Denial::ClientIdMismatch);
            }
            _ => {}
        }
        let held = self
            .by_client
            .get(client_id)
            .and_then(|&sref| self.session(sref))
            .map(|s| &s.identity)
            .filter(|id| id.is_proven())?;
        (peer.identity.as_deref() != Some(&**held)).then_some(Denial::ClientIdMismatch)
    }

    /// Answers a CONNECT the gateway does not accept with a CONNACK carrying the rc of
    /// `reason` (spec 6.2: 0x01 for congestion, else 0x03), and nothing else: the reply (3
    /// octets) is never larger than the CONNECT, nothing is stored.
    fn refuse_connect(&mut self, peer: Peer, client_id_len: usize, reason: RefusalReason) {
        let rc = match reason {
            RefusalReason::Congestion => ReturnCode::Congestion,
            _ => ReturnCode::NotSupported,
        };
        self.stats.rejections += 1;
        self.stats.refuse(reason);
        self.stats.connects_refused += 1;
        tracing::debug!(peer = %peer, client_id_len, ?rc, "CONNECT refused.");
        self.transmits.push_back((peer, Reply::ConnAck(rc)));
    }

    /// The connection is established: CONNACK, then whatever is queued, with timers re-armed.
    fn activate(&mut self, now: Instant, sref: SessionRef, peer: Peer) {
        if let Some(s) = self.session_mut(sref) {
            s.state = State::Active;
        }
        // Covers a new or resumed session, its Will, and a sleeper that stopped sleeping.
        self.mark_dirty(sref);
        self.transmits
            .push_back((peer, Reply::ConnAck(ReturnCode::Accepted)));
        self.pump(now, sref);
        self.schedule(sref);
    }

    fn create_session(
        &mut self,
        now: Instant,
        peer: Peer,
        client_id: &str,
        clean_session: bool,
        keep_alive: u16,
    ) -> Option<SessionRef> {
        let client_id: Arc<str> = Arc::from(client_id);
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                u32::try_from(self.slots.len() - 1).ok()?
            }
        };
        let generation = self.generations.get_mut(slot as usize)?;
        *generation = generation.wrapping_add(1);
        let sref = SessionRef {
            slot,
            generation: *generation,
        };
        let session = Session {
            own_predefined: self.client_predefined.get(&client_id).cloned(),
            identity: identity_of(&peer, &client_id),
            client_id: client_id.clone(),
            peer: Some(peer.clone()),
            origin: session_origin(&client_id, Some(&peer)),
            generation: sref.generation,
            state: State::Active,
            clean_session,
            keep_alive_secs: keep_alive,
            sleep_secs: 0,
            last_seen: now,
            topics: TopicTable {
                next_id: 1,
                ..TopicTable::default()
            },
            inflight_up: Vec::new(),
            qos2_received: Vec::new(),
            will: None,
            subscriptions: Vec::new(),
            queue: VecDeque::new(),
            inflight_down: None,
            next_msg_id: 0,
            armed: None,
            persisted: false,
            dirty: false,
        };
        *self.slots.get_mut(slot as usize)? = Some(session);
        self.by_client.insert(client_id, sref);
        self.by_peer.insert(peer, sref);
        Some(sref)
    }

    fn handle_will_topic(
        &mut self,
        now: Instant,
        peer: Peer,
        will: Option<WillFlags>,
        topic: &str,
    ) {
        let Some(sref) = self.touch(now, &peer) else {
            return;
        };
        // A Will is a publish on the client's behalf: the ACL applies to its topic.
        let will_allowed = will.is_none()
            || self.session(sref).is_none_or(|s| {
                self.config.security.may_publish(
                    &Requester::new(Some(&s.identity), Some(&s.client_id)),
                    topic,
                )
            });
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        // Also while waiting for WILLMSG: the client retransmits WILLTOPIC when our
        // WILLMSGREQ was lost (spec 6.13), and gets it again.
        if !matches!(s.state, State::Connecting { .. }) {
            return;
        }
        match will {
            // An empty WILLTOPIC: no Will after all.
            None => {
                s.will = None;
                self.activate(now, sref, peer);
            }
            Some(_) if !is_valid_name(topic) => {
                self.stats.reject(ReturnCode::InvalidTopicId);
                self.remove_session(sref);
                self.transmits
                    .push_back((peer, Reply::ConnAck(ReturnCode::InvalidTopicId)));
            }
            Some(_) if !will_allowed => {
                self.security_counters.count(Denial::AclPublish);
                self.stats.reject(ReturnCode::NotSupported);
                self.remove_session(sref);
                self.transmits
                    .push_back((peer, Reply::ConnAck(ReturnCode::NotSupported)));
            }
            Some(flags) => {
                s.state = State::Connecting {
                    will_topic: Some((Arc::from(topic), flags.qos, flags.retain)),
                };
                self.transmits.push_back((peer, Reply::WillMsgReq));
            }
        }
    }

    fn handle_will_msg(&mut self, now: Instant, peer: Peer, msg: &[u8]) {
        let Some(sref) = self.touch(now, &peer) else {
            return;
        };
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        let State::Connecting {
            will_topic: Some((topic, qos, retain)),
        } = &s.state
        else {
            return;
        };
        s.will = Some(Box::new(Will {
            topic: topic.clone(),
            payload: Bytes::copy_from_slice(msg),
            qos: *qos,
            retain: *retain,
        }));
        self.activate(now, sref, peer);
    }

    fn update_will_topic(
        &mut self,
        sref: SessionRef,
        will: Option<WillFlags>,
        topic: &str,
    ) -> ReturnCode {
        let allowed = will.is_none()
            || self.session(sref).is_none_or(|s| {
                self.config.security.may_publish(
                    &Requester::new(Some(&s.identity), Some(&s.client_id)),
                    topic,
                )
            });
        if !allowed && is_valid_name(topic) {
            self.security_counters.count(Denial::AclPublish);
            return ReturnCode::NotSupported;
        }
        let Some(s) = slot_mut(&mut self.slots, sref) else {
            return ReturnCode::NotSupported;
        };
        match will {
            // An empty WILLTOPICUPD deletes topic and message (spec 6.4).
            None => {
                s.will = None;
                mark_dirty(s, sref, &mut self.persist_dirty);
                ReturnCode::Accepted
            }
            Some(_) if !is_valid_name(topic) => ReturnCode::InvalidTopicId,
            Some(flags) => {
                let payload = s.will.take().map(|w| w.payload).unwrap_or_default();
                s.will = Some(Box::new(Will {
                    topic: Arc::from(topic),
                    payload,
                    qos: flags.qos,
                    retain: flags.retain,
                }));
                mark_dirty(s, sref, &mut self.persist_dirty);
                ReturnCode::Accepted
            }
        }
    }

    fn handle_pingreq(&mut self, now: Instant, peer: Peer, client_id: Option<&str>) {
        let sref = match client_id {
            // PINGREQ with a ClientId identifies the session even from a new address (a
            // sleeping client behind NAT); without one, only the address does.
            Some(id) => match self.by_client.get(id).copied() {
                Some(sref) => {
                    let bound_elsewhere = self
                        .session(sref)
                        .is_some_and(|s| s.peer.as_ref() != Some(&peer));
                    // A session of a proven identity moves only to a peer proving the same.
                    let foreign = self.session(sref).is_some_and(|s| {
                        s.identity.is_proven() && peer.identity.as_deref() != Some(&*s.identity)
                    }) || (peer.identity.is_none()
                        && self.config.security.is_reserved(id));
                    if foreign {
                        self.security_counters.count(Denial::ClientIdMismatch);
                        return self.unknown_peer(peer, "PINGREQ");
                    }
                    if bound_elsewhere {
                        self.bind(sref, peer.clone());
                    }
                    sref
                }
                None => return self.unknown_peer(peer, "PINGREQ"),
            },
            None => match self.by_peer.get(&peer).copied() {
                Some(sref) => sref,
                None => return self.unknown_peer(peer, "PINGREQ"),
            },
        };
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        s.last_seen = now;
        match s.state {
            State::Asleep { .. } | State::Awake if client_id.is_some() => {
                s.state = State::Awake;
                self.pump(now, sref);
            }
            State::Disconnected { .. } | State::Connecting { .. } => {
                // Not connected: it must CONNECT first.
                self.transmits.push_back((peer, Reply::Disconnect));
            }
            _ => self.transmits.push_back((peer, Reply::PingResp)),
        }
        self.schedule(sref);
    }

    fn handle_disconnect(&mut self, now: Instant, peer: Peer, duration: Option<u16>) {
        let Some(&sref) = self.by_peer.get(&peer) else {
            // Idempotent: answer even without a session.
            self.transmits.push_back((peer, Reply::Disconnect));
            return;
        };
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        s.last_seen = now;
        match duration {
            Some(d)
                if d > 0
                    && !matches!(
                        s.state,
                        State::Disconnected { .. } | State::Connecting { .. }
                    ) =>
            {
                let sleep = Duration::from_secs(u64::from(d));
                s.sleep_secs = d;
                s.state = State::Asleep {
                    until: now + sleep_limit(sleep),
                };
                s.requeue_in_flight();
                tracing::debug!(client_id = %s.client_id, sleep_secs = d, "Client asleep.");
                self.transmits.push_back((peer, Reply::Disconnect));
                self.mark_dirty(sref);
                self.schedule(sref);
            }
            _ => {
                tracing::debug!(client_id = %s.client_id, "Client disconnected.");
                self.transmits.push_back((peer, Reply::Disconnect));
                // A clean DISCONNECT never publishes the Will.
                self.end_connection(now, sref, false);
            }
        }
    }

    /// The connection ended (`lost`: without DISCONNECT): a CleanSession=1 session goes away,
    /// a persistent one waits.
    fn end_connection(&mut self, now: Instant, sref: SessionRef, lost: bool) {
        let expiry = self.config.session_expiry;
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        if s.clean_session {
            self.remove_session(sref);
            return;
        }
        s.state = State::Disconnected {
            expires: now + expiry,
            lost,
        };
        s.requeue_in_flight();
        // QoS 0 messages are not kept for a disconnected client.
        let queued = s.queue.len();
        s.queue.retain(|d| d.qos > 0);
        let expired = (queued - s.queue.len()) as u64;
        self.stats
            .drop_downlink(DownlinkDropReason::Expired, expired);
        self.unbind(sref);
        self.mark_dirty(sref);
        self.schedule(sref);
    }

    /// The client is lost (spec 6.14): its Will goes upstream, then the connection ends.
    fn lose(&mut self, now: Instant, sref: SessionRef, why: &'static str) {
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        tracing::debug!(client_id = %s.client_id, reason = why, "Client lost.");
        let will = s.will.clone();
        let origin = s.origin.clone();
        let mut local = None;
        self.stats.clients_lost += 1;
        if let Some(will) = will {
            self.stats.wills_published += 1;
            let qos = match will.qos {
                QoS::AtLeastOnce => Qos::AtLeastOnce,
                QoS::ExactlyOnce => Qos::ExactlyOnce,
                QoS::AtMostOnce | QoS::MinusOne => Qos::AtMostOnce,
            };
            self.events.push_back(Event::Publish {
                message: Message {
                    topic: will.topic.to_string(),
                    payload: will.payload.clone(),
                    qos,
                    retain: will.retain,
                    origin,
                },
                token: None,
            });
            local = Some(LocalMessage {
                topic: will.topic.clone(),
                payload: will.payload,
                qos: qos_level_of(will.qos),
                retain: will.retain,
            });
        }
        self.end_connection(now, sref, true);
        // The Will reaches the gateway's own subscribers too, once the connection is over (a
        // persistent session of the lost client queues its own copy like a broker would).
        if let Some(local) = local {
            self.deliver_local(now, local);
        }
    }

    fn on_session_timer(&mut self, now: Instant, sref: SessionRef) {
        let retry_all = self.handshake_timeout();
        let retry = self.retry_interval_of(sref);
        let max_retries = self.config.max_retries;
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        // Retransmission first: it may lose the client.
        let mut resend = None;
        if let Some(f) = s.inflight_down.as_mut().filter(|f| f.deadline <= now) {
            if f.retries >= max_retries {
                return self.lose(now, sref, "retransmissions exhausted");
            }
            f.retries += 1;
            f.deadline = now + retry;
            resend = Some(f.clone());
        }
        if let (Some(f), Some(peer)) = (resend, s.peer.clone()) {
            self.stats.retransmissions += 1;
            let reply = match f.phase {
                Phase::Register => Reply::Register {
                    topic_id: topic_id_of(f.topic),
                    msg_id: f.msg_id,
                    name: f.msg.topic,
                },
                Phase::PubComp => Reply::PubRel(f.msg_id),
                Phase::PubAck | Phase::PubRec => Reply::Publish {
                    dup: true,
                    qos: f.msg.qos,
                    retain: f.msg.retain,
                    topic: f.topic,
                    msg_id: f.msg_id,
                    payload: f.msg.payload,
                },
            };
            self.transmits.push_back((peer, reply));
        }
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        match s.state {
            State::Active
                if s.keep_alive_secs != 0
                    && s.last_seen + keep_alive_limit(s.keep_alive()) <= now =>
            {
                self.lose(now, sref, "keep-alive expired");
            }
            State::Asleep { until } if until <= now => self.lose(now, sref, "sleep timer expired"),
            State::Connecting { .. } if s.last_seen + retry_all <= now => {
                tracing::debug!(client_id = %s.client_id, "Will handshake timed out.");
                self.remove_session(sref);
            }
            State::Disconnected { expires, .. } if expires <= now => {
                tracing::debug!(client_id = %s.client_id, "Persistent session expired.");
                self.remove_session(sref);
            }
            _ => self.schedule(sref),
        }
    }

    fn advertise_if_due(&mut self, now: Instant) {
        if self.config.advertise_to.is_empty() {
            return;
        }
        if self.next_advertise.is_some_and(|t| t > now) {
            return;
        }
        self.next_advertise = Some(now + self.config.advertise_interval);
        if !self.upstream_available {
            return;
        }
        for dest in self.config.advertise_to.clone() {
            self.transmits.push_back((dest, Reply::Advertise));
        }
    }

    // ------------------------------------------------------------------------------------
    // Uplink.

    #[allow(clippy::too_many_arguments)]
    fn handle_publish(
        &mut self,
        now: Instant,
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
            return self.reject_publish(peer, topic, msg_id, ReturnCode::InvalidTopicId);
        };
        // Nothing to check without a policy; a retransmission of a publish being answered is
        // not checked (nor charged) again.
        let unchecked = !self.policy_active()
            || qos != QoS::AtMostOnce
                && self.session(sref).is_some_and(|s| {
                    s.inflight_up.iter().any(|&(m, _)| m == msg_id)
                        || (qos == QoS::ExactlyOnce && s.qos2_received.contains(&msg_id))
                });
        if !unchecked
            && let Some((identity, client_id)) = self
                .session(sref)
                .map(|s| (Arc::clone(&s.identity), Arc::clone(&s.client_id)))
        {
            let checked = self.authorize_publish(
                now,
                Some(&identity),
                Some(&client_id),
                &identity.name,
                &resolved,
                data.len(),
            );
            if let Err(denial) = checked {
                if qos == QoS::AtMostOnce {
                    // Nobody waits for an answer: dropped, counted.
                    self.stats.refuse(refusal_of(Self::denial_rc(denial)));
                    return;
                }
                return self.reject_publish(peer, topic, msg_id, Self::denial_rc(denial));
            }
        }
        let Some(session) = slot_mut(&mut self.slots, sref) else {
            return;
        };
        let (level, upstream_qos) = match qos {
            QoS::AtMostOnce => (1, Qos::AtMostOnce),
            QoS::AtLeastOnce => (2, Qos::AtLeastOnce),
            QoS::ExactlyOnce => (3, Qos::ExactlyOnce),
            QoS::MinusOne => return,
        };
        let payload = Bytes::copy_from_slice(data);
        let local = LocalMessage {
            topic: resolved.clone(),
            payload: payload.clone(),
            qos: qos_level_of(qos),
            retain,
        };
        let mut token = None;
        if qos != QoS::AtMostOnce {
            if session.inflight_up.iter().any(|&(m, _)| m == msg_id) {
                // A retransmission of a publish the spool has not answered yet: the answer
                // will come once, for both.
                return;
            }
            if qos == QoS::ExactlyOnce && session.qos2_received.contains(&msg_id) {
                self.transmits.push_back((peer, Reply::PubRec(msg_id)));
                return;
            }
            let full = session.inflight_up.len() >= max_inflight
                || (qos == QoS::ExactlyOnce && session.qos2_received.len() >= max_inflight);
            if full {
                return self.reject_publish(peer, topic, msg_id, ReturnCode::Congestion);
            }
            let t = self.next_token;
            self.next_token += 1;
            session.inflight_up.push((msg_id, t));
            self.pending.insert(
                t,
                Pending {
                    session: sref,
                    msg_id,
                    topic_id: topic_id_of(topic),
                    qos2: qos == QoS::ExactlyOnce,
                    local: local.clone(),
                },
            );
            token = Some(t);
        }
        if let Some(n) = self.stats.publishes.get_mut(level) {
            *n += 1;
        }
        let message = Message {
            topic: resolved.to_string(),
            payload,
            qos: upstream_qos,
            retain,
            origin: session.origin.clone(),
        };
        self.events.push_back(Event::Publish { message, token });
        // QoS 0 is delivered locally when received: nobody waits for its verdict. QoS 1/2
        // waits for `handle_publish_result`.
        if token.is_none() {
            self.received_local.push(local);
        }
    }

    /// Refuses a sensor's PUBLISH with PUBACK carrying `rc`.
    fn reject_publish(&mut self, peer: Peer, topic: TopicRef, msg_id: u16, rc: ReturnCode) {
        self.stats.reject(rc);
        let reply = Reply::PubAck {
            topic_id: topic_id_of(topic),
            msg_id,
            rc,
        };
        self.transmits.push_back((peer, reply));
    }

    fn handle_publish_m1(
        &mut self,
        now: Instant,
        peer: Peer,
        topic: TopicRef,
        data: &[u8],
        retain: bool,
    ) {
        if !self.config.qos_minus_one {
            self.stats.qos_m1_dropped += 1;
            self.stats.refuse(RefusalReason::NotAllowed);
            return;
        }
        // A connected sender's own predefined topics apply; otherwise the global ones.
        let sender = self.by_peer.get(&peer).copied();
        let origin = match sender.and_then(|sref| self.session(sref)) {
            Some(session) => session.origin.clone(),
            None => Origin {
                protocol: Protocol::MqttSn,
                client_id: None,
                peer: Some(peer_text(&peer)),
            },
        };
        let resolved = match (topic, sender) {
            (TopicRef::Normal(_), _) => None,
            (_, Some(sref)) => self.resolve_topic(sref, topic),
            (TopicRef::Predefined(id), None) => self.global_predefined.get(&id).cloned(),
            (TopicRef::Short(s), None) => short_topic(s),
        };
        let Some(resolved) = resolved else {
            self.stats.qos_m1_dropped += 1;
            self.stats.refuse(RefusalReason::NotAllowed);
            tracing::debug!(peer = %peer, ?topic, "QoS -1 publish to unknown topic dropped.");
            return;
        };
        // The sender's session identity, else what its transport proved, else nothing (then
        // the rate is the address's). Nothing is built when no policy is configured.
        if self.policy_active() {
            let (identity, client_id) = match sender.and_then(|sref| self.session(sref)) {
                Some(s) => (
                    Some(Arc::clone(&s.identity)),
                    Some(Arc::clone(&s.client_id)),
                ),
                None => (peer.identity.clone(), None),
            };
            let rate_key: Arc<str> = match &identity {
                Some(id) => Arc::clone(&id.name),
                None => Arc::from(format!("peer:{peer}")),
            };
            let checked = self.authorize_publish(
                now,
                identity.as_deref(),
                client_id.as_deref(),
                &rate_key,
                &resolved,
                data.len(),
            );
            if checked.is_err() {
                self.stats.qos_m1_dropped += 1;
                self.stats.refuse(RefusalReason::NotAllowed);
                return;
            }
        }
        if let Some(n) = self.stats.publishes.first_mut() {
            *n += 1;
        }
        let payload = Bytes::copy_from_slice(data);
        let message = Message {
            topic: resolved.to_string(),
            payload: payload.clone(),
            qos: Qos::AtMostOnce,
            retain,
            origin,
        };
        self.events.push_back(Event::Publish {
            message,
            token: None,
        });
        self.received_local.push(LocalMessage {
            topic: resolved,
            payload,
            qos: 0,
            retain,
        });
    }

    fn resolve_topic(&self, sref: SessionRef, topic: TopicRef) -> Option<Arc<str>> {
        let session = self.session(sref)?;
        match topic {
            TopicRef::Normal(id) => session.topics.name(id).cloned(),
            TopicRef::Predefined(id) => self.predefined_for(session, id),
            TopicRef::Short(s) => short_topic(s),
        }
    }

    fn predefined_for(&self, session: &Session, id: u16) -> Option<Arc<str>> {
        session
            .own_predefined
            .as_ref()
            .and_then(|own| own.get(&id))
            .or_else(|| self.global_predefined.get(&id))
            .cloned()
    }

    /// The predefined id this client can use for `topic`, if any.
    fn predefined_id_of(&self, session: &Session, topic: &str) -> Option<u16> {
        if let Some(own) = &session.own_predefined
            && let Some((&id, _)) = own.iter().find(|(_, t)| &***t == topic)
        {
            return Some(id);
        }
        self.global_predefined_by_name.get(topic).copied()
    }

    fn register(&mut self, sref: SessionRef, name: &str, msg_id: u16) -> Reply {
        if !is_valid_name(name) {
            self.stats.reject(ReturnCode::InvalidTopicId);
            return Reply::RegAck {
                topic_id: 0,
                msg_id,
                rc: ReturnCode::InvalidTopicId,
            };
        }
        // A client REGISTERs a name to publish to it: a name it may not publish to is refused
        // at once (REGACK rc 0x03), before it takes a slot of the topic table.
        let allowed = self.session(sref).is_none_or(|s| {
            self.config
                .security
                .may_publish(&Requester::new(Some(&s.identity), Some(&s.client_id)), name)
        });
        if !allowed {
            self.security_counters.count(Denial::AclPublish);
            self.stats.reject(ReturnCode::NotSupported);
            tracing::debug!(topic = name, "REGISTER refused by the ACL.");
            return Reply::RegAck {
                topic_id: 0,
                msg_id,
                rc: ReturnCode::NotSupported,
            };
        }
        match self.topic_id_for(sref, name) {
            Some(id) => {
                if let Some(s) = self.session_mut(sref) {
                    s.topics.set_known(id, true);
                }
                Reply::RegAck {
                    topic_id: id,
                    msg_id,
                    rc: ReturnCode::Accepted,
                }
            }
            None => {
                self.stats.reject(ReturnCode::Congestion);
                Reply::RegAck {
                    topic_id: 0,
                    msg_id,
                    rc: ReturnCode::Congestion,
                }
            }
        }
    }

    /// The session's id for `name`, allocating one when needed. `None` when the table is full.
    /// Dynamic ids never collide with a predefined id this client could use.
    fn topic_id_for(&mut self, sref: SessionRef, name: &str) -> Option<u16> {
        let max_topics = self.config.max_topics_per_client;
        let global = &self.global_predefined;
        let session = slot_mut(&mut self.slots, sref)?;
        if let Some(id) = session.topics.id(name) {
            return Some(id);
        }
        if session.topics.len() >= max_topics {
            return None;
        }
        let own = session.own_predefined.clone();
        let taken = |id: u16, table: &TopicTable| {
            id == 0
                || id == 0xFFFF
                || table.contains_id(id)
                || global.contains_key(&id)
                || own.as_ref().is_some_and(|o| o.contains_key(&id))
        };
        let mut id = session.topics.next_id;
        let mut tries = 0u32;
        while taken(id, &session.topics) {
            id = id.wrapping_add(1);
            tries += 1;
            if tries > 0x1_0000 {
                return None;
            }
        }
        session.topics.next_id = id.wrapping_add(1);
        let topic: Arc<str> = Arc::from(name);
        session.topics.insert(id, topic);
        mark_dirty(session, sref, &mut self.persist_dirty);
        Some(id)
    }

    // ------------------------------------------------------------------------------------
    // Subscriptions.

    /// The MQTT filter a SUBSCRIBE/UNSUBSCRIBE topic stands for.
    fn subscribe_filter(&self, sref: SessionRef, topic: SubscribeTopic<'_>) -> Option<Arc<str>> {
        match topic {
            SubscribeTopic::Name(name) => is_valid_filter(name).then(|| Arc::from(name)),
            SubscribeTopic::Predefined(id) => self.predefined_for(self.session(sref)?, id),
            SubscribeTopic::Short(s) => short_topic(s),
        }
    }

    fn handle_subscribe(
        &mut self,
        now: Instant,
        sref: SessionRef,
        peer: Peer,
        msg_id: u16,
        qos: QoS,
        topic: SubscribeTopic<'_>,
    ) {
        let granted = match qos {
            QoS::AtMostOnce | QoS::MinusOne => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        };
        let reject = |rc| Reply::SubAck {
            qos: 0,
            topic_id: 0,
            msg_id,
            rc,
        };
        let Some(filter) = self.subscribe_filter(sref, topic) else {
            self.stats.reject(ReturnCode::InvalidTopicId);
            self.transmits
                .push_back((peer, reject(ReturnCode::InvalidTopicId)));
            return;
        };
        let allowed = self.session(sref).is_none_or(|s| {
            self.config.security.may_subscribe(
                &Requester::new(Some(&s.identity), Some(&s.client_id)),
                &filter,
            )
        });
        if !allowed {
            self.security_counters.count(Denial::AclSubscribe);
            self.stats.reject(ReturnCode::NotSupported);
            tracing::debug!(%filter, "SUBSCRIBE refused by the ACL.");
            self.transmits
                .push_back((peer, reject(ReturnCode::NotSupported)));
            return;
        }
        let max_subs = self.config.max_subscriptions_per_client;
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        let existing = s.subscriptions.iter().position(|x| x.filter == filter);
        if existing.is_none() && s.subscriptions.len() >= max_subs {
            self.stats.reject(ReturnCode::Congestion);
            self.transmits
                .push_back((peer, reject(ReturnCode::Congestion)));
            return;
        }
        // A new distinct filter must fit the upstreams' subscription tables: a SUBACK rc 0x00
        // promises a subscription the gateway holds.
        if !self.is_indexed(&filter) && self.filter_count() >= self.config.max_filters {
            self.stats.reject(ReturnCode::Congestion);
            self.stats.filters_full += 1;
            tracing::debug!(%filter, max_filters = self.config.max_filters, "Distinct filter limit reached; SUBSCRIBE refused.");
            self.transmits
                .push_back((peer, reject(ReturnCode::Congestion)));
            return;
        }
        // The topic id in SUBACK: the predefined or short id as given, 0 for a wildcard
        // filter, otherwise the (possibly new) registered id.
        let topic_id = match topic {
            SubscribeTopic::Predefined(id) => id,
            SubscribeTopic::Short([a, b]) => u16::from_be_bytes([a, b]),
            SubscribeTopic::Name(name) if has_wildcards(name) => 0,
            SubscribeTopic::Name(name) => match self.topic_id_for(sref, name) {
                Some(id) => {
                    if let Some(s) = self.session_mut(sref) {
                        s.topics.set_known(id, true);
                    }
                    id
                }
                None => {
                    self.stats.reject(ReturnCode::Congestion);
                    self.transmits
                        .push_back((peer, reject(ReturnCode::Congestion)));
                    return;
                }
            },
        };
        let Some(s) = slot_mut(&mut self.slots, sref) else {
            return;
        };
        match existing.and_then(|i| s.subscriptions.get_mut(i)) {
            Some(sub) => sub.qos = granted,
            None => s.subscriptions.push(Subscription {
                filter: filter.clone(),
                qos: granted,
            }),
        }
        mark_dirty(s, sref, &mut self.persist_dirty);
        let new_upstream = self.index_subscription(sref, &filter, granted);
        self.transmits.push_back((
            peer,
            Reply::SubAck {
                qos: granted,
                topic_id,
                msg_id,
                rc: ReturnCode::Accepted,
            },
        ));
        // Retained messages reach the new subscriber (after its SUBACK): from the broker when
        // the filter is new upstream (it sends them on the new subscription; serving the cache
        // too would deliver them twice), else from the cache. Those local sensors published
        // come from the cache either way: the broker may not have them yet, and its copy is
        // delivered to no one (see `retained_local`).
        let retained: Vec<Down> = if new_upstream {
            self.retained_local
                .iter()
                .filter(|topic| matches(&filter, topic))
                .filter_map(|topic| self.retained.get(topic).cloned())
                .collect()
        } else if has_wildcards(&filter) {
            self.retained
                .values()
                .filter(|d| matches(&filter, &d.topic))
                .cloned()
                .collect()
        } else {
            self.retained.get(&filter).cloned().into_iter().collect()
        };
        for mut d in retained {
            d.qos = d.qos.min(granted);
            d.retain = true;
            let _ = self.enqueue(now, sref, d);
        }
    }

    /// Distinct filters subscribed upstream (bounded by `max_filters`).
    fn filter_count(&self) -> usize {
        self.exact_filters.len() + self.wild_filters.len()
    }

    /// Whether some session subscribes `filter` (it is subscribed upstream).
    fn is_indexed(&self, filter: &str) -> bool {
        if has_wildcards(filter) {
            self.wild_filters.contains_key(filter)
        } else {
            self.exact_filters.contains_key(filter)
        }
    }

    /// Adds `sref` to the subscribers of `filter`; returns whether the filter is new (its
    /// upstream subscription is asked for now).
    fn index_subscription(&mut self, sref: SessionRef, filter: &Arc<str>, qos: u8) -> bool {
        let map = if has_wildcards(filter) {
            &mut self.wild_filters
        } else {
            &mut self.exact_filters
        };
        let new = !map.contains_key(filter);
        let entry = map.entry(filter.clone()).or_default();
        entry.subscribers.insert(sref, qos);
        let wanted = entry.subscribers.values().copied().max().unwrap_or(0);
        if entry.subscribers.len() == 1 || wanted > entry.upstream_qos {
            entry.upstream_qos = wanted;
            self.events.push_back(Event::Subscribe {
                filter: filter.clone(),
                qos: upstream_qos(wanted),
            });
        }
        new
    }

    fn remove_subscription(&mut self, sref: SessionRef, filter: &Arc<str>) {
        if let Some(s) = slot_mut(&mut self.slots, sref) {
            s.subscriptions.retain(|x| &x.filter != filter);
            mark_dirty(s, sref, &mut self.persist_dirty);
        }
        let map = if has_wildcards(filter) {
            &mut self.wild_filters
        } else {
            &mut self.exact_filters
        };
        if let Some(entry) = map.get_mut(filter) {
            entry.subscribers.remove(&sref);
            if entry.subscribers.is_empty() {
                map.remove(filter);
                self.events.push_back(Event::Unsubscribe {
                    filter: filter.clone(),
                });
            }
        }
    }

    fn remember_retained(&mut self, topic: &str, payload: &Bytes, qos: u8) {
        if payload.is_empty() {
            // An empty retained message clears the topic.
            self.retained.remove(topic);
            self.retained_local.remove(topic);
            return;
        }
        if !self.retained.contains_key(topic) && self.retained.len() >= self.config.max_retained {
            return;
        }
        let topic: Arc<str> = Arc::from(topic);
        self.retained.insert(
            topic.clone(),
            Down {
                topic,
                payload: payload.clone(),
                qos,
                retain: true,
                dup: false,
            },
        );
    }

    // ------------------------------------------------------------------------------------
    // Downlink delivery.

    fn enqueue(&mut self, now: Instant, sref: SessionRef, down: Down) -> Queued {
        // A subscription made under an earlier ACL gets only what the ACL in force allows.
        if !self.may_receive(sref, &down.topic) {
            self.security_counters.count(Denial::AclDeniedDelivery);
            return Queued::Dropped;
        }
        let policy = self.config.queue_full;
        let (limit, keep) = match self.session(sref).map(|s| &s.state) {
            Some(State::Asleep { .. } | State::Awake) => {
                (self.config.max_buffered_per_sleeping_client, true)
            }
            // A disconnected persistent session keeps QoS >= 1 only.
            Some(State::Disconnected { .. }) => (self.config.max_queued_per_client, down.qos > 0),
            Some(_) => (self.config.max_queued_per_client, true),
            None => return Queued::Dropped,
        };
        let Some(s) = slot_mut(&mut self.slots, sref) else {
            return Queued::Dropped;
        };
        if !keep {
            // QoS 0 is kept for no session without a connection.
            self.stats.drop_downlink(DownlinkDropReason::Expired, 1);
            return Queued::Dropped;
        }
        // Only QoS 1/2 messages are part of a session's record.
        let mut changed = down.qos > 0;
        if s.queue.len() >= limit {
            self.stats.drop_downlink(DownlinkDropReason::QueueFull, 1);
            match policy {
                QueueFull::DropNew => return Queued::Dropped,
                QueueFull::DropOldest => {
                    changed |= s.queue.pop_front().is_some_and(|d| d.qos > 0);
                }
            }
        }
        let persisted = down.qos > 0 && s.is_persistent();
        s.queue.push_back(down);
        if changed {
            mark_dirty(s, sref, &mut self.persist_dirty);
        }
        self.pump(now, sref);
        if persisted {
            Queued::Persisted
        } else {
            Queued::Volatile
        }
    }

    /// Sends queued downlink messages while the client can take them: QoS 0 directly, QoS 1/2
    /// one at a time. An awake sleeper with nothing left gets PINGRESP and goes back to sleep.
    fn pump(&mut self, now: Instant, sref: SessionRef) {
        let retry = self.retry_interval_of(sref);
        let max_packet = self.config.max_packet_size;
        loop {
            let Some(s) = self.session(sref) else { return };
            if !s.can_send() || s.inflight_down.is_some() {
                return;
            }
            let Some(peer) = s.peer.clone() else { return };
            let Some(front) = s.queue.front() else {
                if s.state == State::Awake {
                    let until = now + sleep_limit(s.sleep());
                    if let Some(s) = self.session_mut(sref) {
                        s.state = State::Asleep { until };
                    }
                    self.transmits.push_back((peer, Reply::PingResp));
                    self.schedule(sref);
                }
                return;
            };
            let topic_name = front.topic.clone();
            // How the client will know the topic: predefined, short, or registered.
            let predefined = self.predefined_id_of(s, &topic_name);
            let refused = s.topics.is_refused(&topic_name);
            let known_id = s.topics.known_id(&topic_name);
            let topic = if let Some(id) = predefined {
                Some(TopicRef::Predefined(id))
            } else if let [a, b] = topic_name.as_bytes() {
                Some(TopicRef::Short([*a, *b]))
            } else {
                known_id.map(TopicRef::Normal)
            };
            if refused {
                self.drop_front(sref, DownlinkDropReason::Rejected);
                continue;
            }
            let Some(topic) = topic else {
                // REGISTER first, then PUBLISH on REGACK.
                // The client's topic table is full: a per-client bound, like its queue.
                let Some(id) = self.topic_id_for(sref, &topic_name) else {
                    self.drop_front(sref, DownlinkDropReason::QueueFull);
                    continue;
                };
                let Some(s) = self.session_mut(sref) else {
                    return;
                };
                let Some(msg) = s.queue.pop_front() else {
                    return;
                };
                let msg_id = s.next_msg_id();
                s.inflight_down = Some(InFlight {
                    msg,
                    msg_id,
                    topic: TopicRef::Normal(id),
                    phase: Phase::Register,
                    retries: 0,
                    deadline: now + retry,
                    reregistered: false,
                });
                self.transmits.push_back((
                    peer,
                    Reply::Register {
                        topic_id: id,
                        msg_id,
                        name: topic_name,
                    },
                ));
                self.schedule(sref);
                return;
            };
            let Some(s) = slot_mut(&mut self.slots, sref) else {
                return;
            };
            let Some(msg) = s.queue.pop_front() else {
                return;
            };
            // PUBLISH header: 7 octets (9 in the long form) plus the payload.
            if msg.payload.len() + 9 > max_packet {
                if msg.qos > 0 {
                    mark_dirty(s, sref, &mut self.persist_dirty);
                }
                self.stats.drop_downlink(DownlinkDropReason::TooLarge, 1);
                continue;
            }
            self.send_publish(now, sref, peer, msg, topic, false);
        }
    }

    /// Drops the front of the queue (undeliverable), counting it.
    fn drop_front(&mut self, sref: SessionRef, reason: DownlinkDropReason) {
        if let Some(s) = slot_mut(&mut self.slots, sref)
            && s.queue.pop_front().is_some_and(|d| d.qos > 0)
        {
            mark_dirty(s, sref, &mut self.persist_dirty);
        }
        self.stats.drop_downlink(reason, 1);
    }

    fn send_publish(
        &mut self,
        now: Instant,
        sref: SessionRef,
        peer: Peer,
        msg: Down,
        topic: TopicRef,
        reregistered: bool,
    ) {
        let retry = self.retry_interval_of(sref);
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        let msg_id = if msg.qos == 0 { 0 } else { s.next_msg_id() };
        let reply = Reply::Publish {
            dup: msg.dup,
            qos: msg.qos,
            retain: msg.retain,
            topic,
            msg_id,
            payload: msg.payload.clone(),
        };
        if msg.qos > 0 {
            let phase = if msg.qos == 1 {
                Phase::PubAck
            } else {
                Phase::PubRec
            };
            s.inflight_down = Some(InFlight {
                msg,
                msg_id,
                topic,
                phase,
                retries: 0,
                deadline: now + retry,
                reregistered,
            });
        } else {
            self.stats.downlink_delivered += 1;
        }
        self.stats.downlink_sent += 1;
        self.transmits.push_back((peer, reply));
        self.schedule(sref);
    }

    fn on_regack(
        &mut self,
        now: Instant,
        sref: SessionRef,
        topic_id: u16,
        msg_id: u16,
        rc: ReturnCode,
    ) {
        let Some(s) = slot_mut(&mut self.slots, sref) else {
            return;
        };
        let Some(f) = s
            .inflight_down
            .take_if(|f| f.phase == Phase::Register && f.msg_id == msg_id)
        else {
            return;
        };
        let Some(peer) = s.peer.clone() else { return };
        if rc != ReturnCode::Accepted {
            // The client refuses this topic: stop sending it (spec 6.5).
            s.topics.refuse(f.msg.topic.clone());
            mark_dirty(s, sref, &mut self.persist_dirty);
            self.stats.drop_downlink(DownlinkDropReason::Rejected, 1);
            return self.pump(now, sref);
        }
        let id = topic_id_of(f.topic);
        if topic_id != id && topic_id != 0 {
            tracing::debug!(client_id = %s.client_id, topic_id, expected = id, "REGACK with another topic id.");
        }
        s.topics.set_known(id, true);
        self.send_publish(now, sref, peer, f.msg, f.topic, f.reregistered);
        self.pump(now, sref);
    }

    fn on_puback(
        &mut self,
        now: Instant,
        sref: SessionRef,
        topic_id: u16,
        msg_id: u16,
        rc: ReturnCode,
    ) {
        let retry = self.retry_interval_of(sref);
        let Some(s) = slot_mut(&mut self.slots, sref) else {
            return;
        };
        let matching = s.inflight_down.as_ref().is_some_and(|f| {
            f.msg_id == msg_id && matches!(f.phase, Phase::PubAck | Phase::PubRec)
        });
        if !matching {
            // A PUBACK rc 0x02 to a QoS 0 PUBLISH still tells us the client lost the id.
            if rc == ReturnCode::InvalidTopicId {
                s.topics.set_known(topic_id, false);
            }
            return;
        }
        let Some(f) = s.inflight_down.take() else {
            return;
        };
        match rc {
            ReturnCode::Accepted => self.stats.downlink_delivered += 1,
            ReturnCode::InvalidTopicId
                if !f.reregistered && matches!(f.topic, TopicRef::Normal(_)) =>
            {
                // The client lost the registration: register again, then resend (once).
                s.topics.set_known(topic_id_of(f.topic), false);
                let msg_id = s.next_msg_id();
                let name = f.msg.topic.clone();
                let Some(peer) = s.peer.clone() else { return };
                s.inflight_down = Some(InFlight {
                    msg_id,
                    phase: Phase::Register,
                    retries: 0,
                    deadline: now + retry,
                    reregistered: true,
                    ..f
                });
                self.transmits.push_back((
                    peer,
                    Reply::Register {
                        topic_id: topic_id_of(f.topic),
                        msg_id,
                        name,
                    },
                ));
                self.schedule(sref);
                return;
            }
            ReturnCode::Congestion => {
                // Try again after Tretry (TWAIT would be minutes; a gateway retries sooner).
                s.inflight_down = Some(InFlight {
                    deadline: now + retry,
                    ..f
                });
                self.schedule(sref);
                return;
            }
            _ => self.stats.drop_downlink(DownlinkDropReason::Rejected, 1),
        }
        // Delivered or dropped: gone from the session's record.
        mark_dirty(s, sref, &mut self.persist_dirty);
        self.pump(now, sref);
    }

    fn on_pubrec(&mut self, now: Instant, sref: SessionRef, msg_id: u16) {
        let retry = self.retry_interval_of(sref);
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        let Some(peer) = s.peer.clone() else { return };
        match s.inflight_down.as_mut() {
            Some(f) if f.msg_id == msg_id && matches!(f.phase, Phase::PubRec | Phase::PubComp) => {
                f.phase = Phase::PubComp;
                f.retries = 0;
                f.deadline = now + retry;
                self.transmits.push_back((peer, Reply::PubRel(msg_id)));
                self.schedule(sref);
            }
            _ => {}
        }
    }

    fn on_pubcomp(&mut self, now: Instant, sref: SessionRef, msg_id: u16) {
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        if s.inflight_down
            .take_if(|f| f.msg_id == msg_id && f.phase == Phase::PubComp)
            .is_some()
        {
            self.stats.downlink_delivered += 1;
            self.mark_dirty(sref);
            self.pump(now, sref);
        }
    }

    // ------------------------------------------------------------------------------------
    // Session table.

    /// The session for `peer`, with its keep-alive refreshed.
    fn touch(&mut self, now: Instant, peer: &Peer) -> Option<SessionRef> {
        let sref = *self.by_peer.get(peer)?;
        let session = self.session_mut(sref)?;
        session.last_seen = now;
        Some(sref)
    }

    /// Binds `sref` to `peer`, taking the address from any other session and dropping the
    /// session's old address.
    fn bind(&mut self, sref: SessionRef, peer: Peer) {
        if let Some(&other) = self.by_peer.get(&peer)
            && other != sref
        {
            self.unbind(other);
        }
        self.unbind(sref);
        if let Some(s) = self.session_mut(sref) {
            s.origin.peer = Some(peer_text(&peer));
            s.peer = Some(peer.clone());
            self.by_peer.insert(peer, sref);
        }
    }

    fn unbind(&mut self, sref: SessionRef) {
        let Some(s) = self.session_mut(sref) else {
            return;
        };
        if let Some(old) = s.peer.take()
            && self.by_peer.get(&old) == Some(&sref)
        {
            self.by_peer.remove(&old);
        }
    }

    /// Makes sure the session's next deadline has a timer entry. An entry at or before it
    /// already exists when `armed` says so (it re-evaluates when it fires), so the heap holds
    /// about one entry per session however often deadlines move.
    fn schedule(&mut self, sref: SessionRef) {
        let retry_all = self.handshake_timeout();
        let Some(s) = slot_mut(&mut self.slots, sref) else {
            return;
        };
        let Some(at) = s.next_deadline(retry_all) else {
            return;
        };
        if s.armed.is_some_and(|armed| armed <= at) {
            return;
        }
        s.armed = Some(at);
        self.timers.push(Reverse((at, sref)));
    }

    /// Puts `config` (validated) in force at `now`, keeping every session with its
    /// registrations, subscriptions, Will, queues and exchanges in flight; returns notes for
    /// the log. See the module doc (# Reconfiguration) for each setting.
    pub fn reconfigure(&mut self, now: Instant, mut config: CoreConfig) -> Vec<String> {
        let mut notes = self.reconfigure_notes(&config);
        // The router's filter table was sized at start with this bound among the ingresses':
        // above it a SUBACK rc 0x00 could be sent for a filter the router then refuses.
        notes.extend(crate::ingress::cap_max_filters(
            &mut config.max_filters,
            self.started_max_filters,
        ));
        let predefined = PredefinedTables::compile(&config.predefined);
        self.global_predefined = predefined.global;
        self.global_predefined_by_name = predefined.global_by_name;
        self.client_predefined = predefined.per_client;
        for s in self.slots.iter_mut().flatten() {
            s.own_predefined = self.client_predefined.get(&s.client_id).cloned();
        }
        self.limits = DecodeLimits {
            max_client_id_len: config.max_client_id_len,
        };
        // A shorter ADVERTISE period starts now, not after the rest of the old one.
        if let Some(next) = self.next_advertise {
            self.next_advertise = Some(next.min(now + config.advertise_interval));
        }
        #[cfg(test)]
        widen_ceilings(&mut self.ceilings, &config);
        self.config = config;
        // The Will handshake's deadline follows `retry_interval` and `max_retries` (the only
        // deadline not fixed when armed): an earlier one gets its timer entry now.
        let live: Vec<SessionRef> = self.by_client.values().copied().collect();
        for sref in live {
            self.schedule(sref);
        }
        notes
    }

    /// What `config` means for the state there is: predefined topics changed, limits now
    /// below what is in use (each applies to what comes next).
    fn reconfigure_notes(&self, config: &CoreConfig) -> Vec<String> {
        let mut notes = Vec::new();
        let old: HashMap<u16, &PredefinedTopic> =
            self.config.predefined.iter().map(|p| (p.id, p)).collect();
        let new: HashMap<u16, &PredefinedTopic> =
            config.predefined.iter().map(|p| (p.id, p)).collect();
        let added = new.keys().filter(|id| !old.contains_key(id)).count();
        let changed = new
            .iter()
            .filter(|(id, p)| old.get(id).is_some_and(|o| o != *p))
            .count();
        let mut removed: Vec<u16> = old
            .keys()
            .filter(|id| !new.contains_key(id))
            .copied()
            .collect();
        removed.sort_unstable();
        if added + changed + removed.len() > 0 {
            notes.push(format!(
                "predefined topics: {added} added, {changed} changed, {} removed{}",
                removed.len(),
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (ids {removed:?}: a PUBLISH to one now gets PUBACK rc 0x02, invalid \
                         topic id; subscriptions made through one stay, by topic name)"
                    )
                }
            ));
        }
        let sessions: Vec<&Session> = self.slots.iter().flatten().collect();
        let mut lowered = |key: &str, limit: usize, used: usize, what: &str, effect: &str| {
            if used > limit {
                notes.push(format!(
                    "{key} lowered to {limit}, below {used} {what}: kept; {effect}"
                ));
            }
        };
        lowered(
            "max_clients",
            config.max_clients,
            sessions.len(),
            "sessions",
            "CONNECTs of new ClientIds get rc 0x01 (congestion) until below",
        );
        lowered(
            "max_filters",
            config.max_filters,
            self.filter_count(),
            "distinct filters",
            "SUBSCRIBEs to a new filter get rc 0x01 until below",
        );
        lowered(
            "max_retained",
            config.max_retained,
            self.retained.len(),
            "retained messages",
            "new retained topics are not cached until below",
        );
        let over = |f: &dyn Fn(&Session) -> bool| sessions.iter().filter(|s| f(s)).count();
        let per_session: [(&str, usize, usize, &str); 5] = [
            (
                "max_topics_per_client",
                config.max_topics_per_client,
                over(&|s| s.topics.len() > config.max_topics_per_client),
                "REGISTERs of new topics get rc 0x01 until below",
            ),
            (
                "max_subscriptions_per_client",
                config.max_subscriptions_per_client,
                over(&|s| s.subscriptions.len() > config.max_subscriptions_per_client),
                "new SUBSCRIBEs get rc 0x01 until below",
            ),
            (
                "max_inflight_per_client",
                config.max_inflight_per_client,
                over(&|s| s.inflight_up.len() > config.max_inflight_per_client),
                "new QoS 1/2 PUBLISHes get rc 0x01 until below",
            ),
            (
                "max_queued_per_client",
                config.max_queued_per_client,
                over(&|s| {
                    !matches!(s.state, State::Asleep { .. } | State::Awake)
                        && s.queue.len() > config.max_queued_per_client
                }),
                "each new message meets a full queue (queue_full decides)",
            ),
            (
                "max_buffered_per_sleeping_client",
                config.max_buffered_per_sleeping_client,
                over(&|s| {
                    matches!(s.state, State::Asleep { .. } | State::Awake)
                        && s.queue.len() > config.max_buffered_per_sleeping_client
                }),
                "each new message meets a full buffer (queue_full decides)",
            ),
        ];
        for (key, limit, sessions_over, effect) in per_session {
            if sessions_over > 0 {
                notes.push(format!(
                    "{key} lowered to {limit}: {sessions_over} sessions hold more, kept; {effect}"
                ));
            }
        }
        let long_ids = over(&|s| s.client_id.len() > config.max_client_id_len);
        if long_ids > 0 {
            notes.push(format!(
                "max_client_id_len lowered to {}: {long_ids} sessions have a longer ClientId; \
                 kept, but their clients' next CONNECT gets rc 0x03 (the sessions expire as \
                 usual)",
                config.max_client_id_len
            ));
        }
        if config.max_packet_size < self.config.max_packet_size {
            notes.push(format!(
                "max_packet_size lowered to {}: longer datagrams are dropped, and queued \
                 downlink that no longer fits is not sent when its turn comes (spec 6.10)",
                config.max_packet_size
            ));
        }
        if config.gw_id != self.config.gw_id {
            notes.push(format!(
                "gw_id changed from {} to {}: GWINFO and ADVERTISE carry it from now on",
                self.config.gw_id, config.gw_id
            ));
        }
        notes
    }

    /// Checks the tables' consistency and bounds (the tests call it after each step). A bound
    /// is checked against the largest value any config put in force had: state admitted
    /// under an earlier, higher limit is kept by [`Self::reconfigure`].
    #[cfg(test)]
    #[allow(clippy::expect_used)] // A broken invariant is the finding: panic with its name.
    pub(crate) fn check_invariants(&self) {
        let ceil = &self.ceilings;
        let live = self.slots.iter().flatten().count();
        assert_eq!(live, self.by_client.len(), "slots vs ClientId map");
        assert!(live <= ceil.max_clients, "sessions bound");
        for (client_id, sref) in &self.by_client {
            let s = self
                .session(*sref)
                .expect("ClientId maps to a live session");
            assert_eq!(&s.client_id, client_id);
            if let Some(peer) = &s.peer {
                assert_eq!(
                    self.by_peer.get(peer),
                    Some(sref),
                    "bound address maps back"
                );
            }
            let own = self.client_predefined.get(client_id);
            assert_eq!(
                s.own_predefined.as_deref(),
                own.map(|o| &**o),
                "session's predefined topics are its client's in the config in force"
            );
            assert!(s.topics.len() <= ceil.max_topics_per_client, "topics bound");
            assert!(
                s.subscriptions.len() <= ceil.max_subscriptions_per_client,
                "subscriptions bound"
            );
            assert!(
                s.inflight_up.len() <= ceil.max_inflight_per_client,
                "uplink in flight bound"
            );
            assert!(
                s.queue.len()
                    <= ceil
                        .max_queued_per_client
                        .max(ceil.max_buffered_per_sleeping_client),
                "queue bound"
            );
            for sub in &s.subscriptions {
                let map = if has_wildcards(&sub.filter) {
                    &self.wild_filters
                } else {
                    &self.exact_filters
                };
                let entry = map.get(&sub.filter).expect("subscription is indexed");
                assert_eq!(entry.subscribers.get(sref), Some(&sub.qos));
            }
            if let Some(due) = s.next_deadline(self.handshake_timeout()) {
                assert!(
                    s.armed.is_some_and(|armed| armed <= due),
                    "a timer entry at or before the session's next deadline"
                );
            }
        }
        for (peer, sref) in &self.by_peer {
            let s = self.session(*sref).expect("address maps to a live session");
            assert_eq!(s.peer.as_ref(), Some(peer), "address binding both ways");
        }
        for (filter, entry) in self.exact_filters.iter().chain(&self.wild_filters) {
            assert!(!entry.subscribers.is_empty(), "empty filter entry");
            for sref in entry.subscribers.keys() {
                let s = self.session(*sref).expect("filter lists a live session");
                assert!(s.subscriptions.iter().any(|x| &x.filter == filter));
            }
        }
        assert!(self.filter_count() <= ceil.max_filters, "filters bound");
        assert!(self.retained.len() <= ceil.max_retained, "retained bound");
    }

    /// Downlink retransmissions toward `addr` (and the clients behind it) wait `delay`
    /// longer than `retry_interval`: what a slow link (a serial line) adds before a reply can
    /// come back. Zero removes it.
    pub fn set_link_delay(&mut self, addr: PeerAddr, delay: Duration) {
        if delay.is_zero() {
            self.link_delay.remove(&addr);
        } else {
            self.link_delay.insert(addr, delay);
        }
    }

    /// The retransmission interval toward the session's peer: `retry_interval` plus its
    /// link's delay ([`Self::set_link_delay`]).
    fn retry_interval_of(&self, sref: SessionRef) -> Duration {
        let delay = self
            .session(sref)
            .and_then(|s| s.peer.as_ref())
            .and_then(|p| self.link_delay.get(&p.addr))
            .copied()
            .unwrap_or_default();
        self.config.retry_interval.saturating_add(delay)
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

    /// See [`mark_dirty`].
    fn mark_dirty(&mut self, sref: SessionRef) {
        if let Some(s) = slot_mut(&mut self.slots, sref) {
            mark_dirty(s, sref, &mut self.persist_dirty);
        }
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
        let undelivered = session.queue.len() + usize::from(session.inflight_down.is_some());
        self.stats
            .drop_downlink(DownlinkDropReason::Expired, undelivered as u64);
        if session.persisted {
            self.persist_removed.push(session.client_id.clone());
        }
        if let Some(peer) = &session.peer
            && self.by_peer.get(peer) == Some(&sref)
        {
            self.by_peer.remove(peer);
        }
        // Tokens still awaiting their verdict stay in `pending`: an accepted publish goes to
        // the local subscribers even after its sender left (it goes upstream too). Each token
        // gets exactly one verdict, which removes it, so `pending` stays bounded by what the
        // upstream side holds.
        for sub in &session.subscriptions {
            self.remove_subscription(sref, &sub.filter);
        }
        self.free.push(sref.slot);
        // Timer entries of removed sessions are skipped when they fire; under churn, drop them
        // early so the heap stays proportional to the live sessions.
        if self.timers.len() > 4 * self.by_client.len() + 1024 {
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

/// Raises each bound of `ceilings` to `config`'s where that is higher.
#[cfg(test)]
fn widen_ceilings(ceilings: &mut CoreConfig, config: &CoreConfig) {
    let pairs = [
        (&mut ceilings.max_clients, config.max_clients),
        (
            &mut ceilings.max_topics_per_client,
            config.max_topics_per_client,
        ),
        (
            &mut ceilings.max_inflight_per_client,
            config.max_inflight_per_client,
        ),
        (
            &mut ceilings.max_subscriptions_per_client,
            config.max_subscriptions_per_client,
        ),
        (&mut ceilings.max_filters, config.max_filters),
        (
            &mut ceilings.max_queued_per_client,
            config.max_queued_per_client,
        ),
        (
            &mut ceilings.max_buffered_per_sleeping_client,
            config.max_buffered_per_sleeping_client,
        ),
        (&mut ceilings.max_retained, config.max_retained),
    ];
    for (ceiling, value) in pairs {
        *ceiling = (*ceiling).max(value);
    }
}

/// How long a session may stay silent before it is lost.
fn keep_alive_limit(keep_alive: Duration) -> Duration {
    keep_alive * KEEP_ALIVE_FACTOR_PERCENT / 100
}

/// How long a sleeping client may stay silent: its sleep duration plus the spec's tolerance
/// (7.2: +10% for durations over a minute, +50% for shorter ones).
fn sleep_limit(sleep: Duration) -> Duration {
    if sleep > Duration::from_secs(60) {
        sleep * 110 / 100
    } else {
        sleep * 150 / 100
    }
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
        .filter(|t| is_valid_name(t))
        .map(Arc::from)
}

/// Where [`Core::enqueue`] put a downlink message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queued {
    /// Queued (or sent) as QoS 1/2 for a persistent session: part of its next record.
    Persisted,
    /// Queued (or sent), not persisted.
    Volatile,
    /// Dropped (queue full, QoS 0 for a disconnected session, no session).
    Dropped,
}

/// The numeric QoS of a Will: 0..=2 (a Will cannot be QoS -1; it would be published at 0).
fn qos_level_of(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce | QoS::MinusOne => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn qos_level(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

fn upstream_qos(level: u8) -> Qos {
    match level {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        _ => Qos::ExactlyOnce,
    }
}

fn wire_qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests;

/// The UDP driver's view of the core: the inherent methods above.
impl DatagramCore for Core {
    const NAME: &'static str = "MQTT-SN";
    type Settings = CoreConfig;

    fn reconfigure(&mut self, now: Instant, settings: CoreConfig) -> Vec<String> {
        Core::reconfigure(self, now, settings)
    }

    fn max_datagram_size(&self) -> usize {
        self.config.max_packet_size
    }

    fn handle_datagram(&mut self, now: Instant, peer: Peer, datagram: &[u8]) {
        Core::handle_datagram(self, now, peer, datagram);
    }

    fn handle_publish_result(&mut self, now: Instant, token: u64, outcome: PublishOutcome) {
        Core::handle_publish_result(self, now, token, outcome);
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
        Core::handle_downlink(self, now, topic, payload, qos, retain, filters)
    }

    fn handle_timeout(&mut self, now: Instant) {
        Core::handle_timeout(self, now);
    }

    fn set_upstream_available(&mut self, available: bool) {
        Core::set_upstream_available(self, available);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Core::poll_timeout(self)
    }

    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Peer> {
        Core::poll_transmit(self, buf)
    }

    fn poll_event(&mut self) -> Option<Event> {
        Core::poll_event(self)
    }

    fn take_persist_changes(&mut self, out: &mut Vec<PersistChange>) {
        Core::take_persist_changes(self, out);
    }

    fn report(&self) -> IngressReport {
        Core::report(self)
    }

    fn clients(&self, now: Instant, query: &ClientQuery) -> ClientsPage {
        Core::clients(self, now, query)
    }
}
