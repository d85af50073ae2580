//! The upstream abstraction: what a drain needs from any upstream kind (MQTT today, AMQP
//! next), and the drain itself as a sans-IO state machine ([`drain::Drain`]).
//!
//! ```text
//!  spool ── records ──> Drain (sans-IO) ── Action::Send ──> Upstream::publish_with_seq
//!                         ^   ^                                   │ tracked (QoS >= 1):
//!                         │   └── handle_link <── watch_link ─────┤ exactly one AckReport
//!                         └────── handle_ack <── AckReport ───────┘ on the drain's channel
//! ```
//!
//! Contract of an [`Upstream`] (MUST hold for every kind; the drain relies on each point):
//!
//! - **One outcome per tracked send.** A publish with `Some(token)` either is refused at once
//!   (an `Err`, and no report follows) or is accepted (`Ok`) and then yields exactly one
//!   [`AckReport`] on the channel given to that upstream: acknowledged, refused, or failed
//!   (also when the link drops or the upstream shuts down). A publish without a token gets no
//!   report: it is settled once accepted.
//! - **Acknowledged means acknowledged**: [`Delivery::Acknowledged`] only after the peer's
//!   acknowledgement (MQTT PUBACK / PUBCOMP, AMQP publisher confirm).
//! - **Link loss fails the in-flight sends** at once, and while the link is down publishes are
//!   refused with [`FailReason::Disconnected`]. The upstream never resends: the spool does.
//! - **The link watch** tells whether the link is up; it changes on every transition.
//! - **Reset** drops a live link (a peer that stopped acknowledging) and fails what is in
//!   flight on it; it does nothing while the link is down.
//! - **Order**: sends reach the peer in the order they were accepted.

pub mod drain;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::message::Message;
use crate::telemetry::LinkInfo;

/// What a drain needs from an upstream. See the module docs for the contract.
pub trait Upstream: Send + Sync + 'static {
    /// The configured name (for logs).
    fn name(&self) -> &str;

    /// Sends `message` without blocking; `token` (QoS >= 1 only) asks for one [`AckReport`];
    /// `seq` is the spool's sequence id, carried to the peer so consumers can drop duplicates.
    ///
    /// # Errors
    /// Refused now, and no report follows: why, as a [`FailReason`].
    fn publish_with_seq(
        &self,
        message: Message,
        token: Option<u64>,
        seq: Option<u64>,
    ) -> Result<(), FailReason>;

    /// Whether the link is up; changes on every transition.
    fn watch_link(&self) -> watch::Receiver<bool>;

    /// Drops the current link and connects again, failing what is in flight on it.
    fn reset_link(&self);

    /// The link's state for the admin listener (up since when, last error, connects),
    /// written by the upstream's connection task at each transition, never per message.
    fn link_info(&self) -> Arc<LinkInfo>;
}

/// What an upstream says about the gateway's presence on its own connection (plain data,
/// kind-neutral; built by the gateway's wiring, never by a kind itself). Topics are relative
/// to the upstream, which applies its `remote_prefix` (MQTT) or routing-key mapping (AMQP) as
/// for sensor data.
///
/// - `birth` (retained, `"state": "online"`) is published on every (re)connect before any
///   other publish of that connection is accepted, so it precedes every drained record;
/// - `will` (retained, `"state": "offline"`) is the MQTT CONNECT's Will, published by the
///   broker when the connection ends without DISCONNECT (crash, network loss, keep-alive);
/// - `death` (retained, `"state": "offline"`) is published on a clean shutdown, before the
///   link closes (MQTT: before DISCONNECT, which discards the Will).
///
/// Presence publishes are untracked (no [`AckReport`]) and never spooled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Published on every connect.
    pub birth: Message,
    /// The broker publishes it when the link dies (MQTT Will).
    pub will: Message,
    /// Published on clean shutdown.
    pub death: Message,
}

/// Longest wait (at most the upstream's `connect_timeout`) for the old connection's
/// in-flight messages to be acknowledged before a reconfigure closes it; what is still open
/// then is failed (`Disconnected`) and sent again by the drain on the new connection.
pub const RELINK_DRAIN: Duration = Duration::from_secs(2);

/// What an upstream's `reconfigure` (MQTT, AMQP) did with a new configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconfigured {
    /// The configuration in force already: nothing was done.
    Unchanged,
    /// Only settings that need no new connection changed; applied in place.
    Applied,
    /// A connection setting changed: the link is closed cleanly and opened again with the
    /// new settings (what was in flight is sent again by the drain, as after a link loss).
    Reconnecting,
}

/// Outcome of a QoS >= 1 publish, reported back to the gateway core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The broker acknowledged the message (PUBACK / PUBCOMP).
    Acknowledged,
    /// Upstream down, queue full, rejected by the broker (v5 reason code), or session reset:
    /// the sensor gets congestion.
    Failed(FailReason),
}

impl Delivery {
    /// Whether the broker took the message.
    #[must_use]
    pub const fn is_acknowledged(self) -> bool {
        matches!(self, Self::Acknowledged)
    }
}

/// Why a publish was not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The link to the broker was down, or dropped before the acknowledgement.
    Disconnected,
    /// `max_inflight` publishes are outstanding, or the client's request queue is full; for
    /// a subscribe: `max_subscriptions` filters are subscribed.
    QueueFull,
    /// Refused for good: by the broker (MQTT 5 reason code Not authorized, Topic Name
    /// invalid or Payload format invalid), or locally (invalid topic or filter, over the
    /// upstream's size limit). Retrying the same message will not help.
    Rejected,
    /// Refused for now by the broker (MQTT 5 reason code Quota exceeded, Unspecified error,
    /// Implementation specific error, Packet Identifier in use): the message
    /// is sent again, never dropped.
    BrokerBusy,
    /// The client reconnected without a broker session and dropped the publish.
    SessionReset,
    /// The upstream is shutting down.
    Shutdown,
}

impl FailReason {
    /// A short stable tag for metrics and structured logs.
    #[must_use]
    pub const fn error_code(self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::QueueFull => "queue_full",
            Self::Rejected => "rejected",
            Self::BrokerBusy => "broker_busy",
            Self::SessionReset => "session_reset",
            Self::Shutdown => "shutdown",
        }
    }

    /// Whether sending the same message again later can succeed.
    #[must_use]
    pub const fn is_recoverable(self) -> bool {
        !matches!(self, Self::Rejected)
    }
}

/// The broker's verdict on one tracked publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckReport {
    /// The token given to [`Upstream::publish_with_seq`].
    pub token: u64,
    /// The index the upstream was started with.
    pub upstream: usize,
    /// What happened.
    pub delivery: Delivery,
}

/// What the router needs from an upstream for the downlink: the filters to subscribe to.
/// The router calls it with the union of every ingress's filters (reference counted there),
/// so one `subscribe` per filter and QoS change and one `unsubscribe` when the last ingress
/// leaves; neither may block (they queue the change for the upstream's own task).
pub trait Subscriber: Send + Sync + 'static {
    /// The configured name (for logs).
    fn name(&self) -> &str;

    /// Subscribes to `filter` at `qos`, or changes the QoS of an existing subscription.
    ///
    /// # Errors
    /// Refused, and nothing is remembered: why, as a [`FailReason`] ([`FailReason::QueueFull`]
    /// for a full subscription table, [`FailReason::Rejected`] for a filter this upstream
    /// cannot take).
    fn subscribe(&self, filter: &str, qos: crate::message::Qos) -> Result<(), FailReason>;

    /// Removes the subscription to `filter`; an unknown filter is ignored.
    ///
    /// # Errors
    /// Refused ([`FailReason::Shutdown`] after shutdown).
    fn unsubscribe(&self, filter: &str) -> Result<(), FailReason>;
}
