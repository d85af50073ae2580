//! The units of traffic between the sensors and the upstreams: a [`Message`] travelling from a
//! sensor toward an upstream, and a [`Downlink`] travelling from an upstream to the sensors.
//!
//! A [`Message`] is cheap to clone: the payload is a reference-counted [`Bytes`], so routing
//! one reading to several upstreams shares a single buffer. A [`Downlink`] carries a
//! [`DownlinkAck`], the handle that acknowledges it to the broker.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc::OwnedPermit;

/// QoS toward the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    /// Fire and forget: no acknowledgement, may be lost.
    AtMostOnce,
    /// Acknowledged by the broker (PUBACK); may be duplicated.
    AtLeastOnce,
    /// Four-way handshake with the broker (PUBREC / PUBREL / PUBCOMP).
    ExactlyOnce,
}

impl Qos {
    /// Whether the broker acknowledges a publish at this QoS (QoS 1 and 2).
    #[must_use]
    pub const fn is_acknowledged(self) -> bool {
        !matches!(self, Self::AtMostOnce)
    }
}

/// One message travelling north.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic relative to the upstream; the upstream prepends its `remote_prefix`.
    pub topic: String,
    /// Application payload, passed through unchanged.
    pub payload: Bytes,
    /// Requested delivery guarantee toward the upstream.
    pub qos: Qos,
    /// Ask the broker to retain the message for future subscribers.
    pub retain: bool,
}

/// A message from an upstream for the sensors: one PUBLISH the broker delivered on a
/// subscription made with [`MqttUpstream::subscribe`](crate::mqtt::MqttUpstream::subscribe).
#[derive(Debug)]
pub struct Downlink {
    /// The `index` given to [`MqttUpstream::spawn`](crate::mqtt::MqttUpstream::spawn).
    pub upstream: usize,
    /// Topic relative to the upstream: the broker's topic with `remote_prefix` stripped.
    pub topic: String,
    /// Application payload, passed through unchanged.
    pub payload: Bytes,
    /// QoS the broker delivered with (the lower of the publisher's and the subscription's).
    pub qos: Qos,
    /// The retain flag as delivered. Set for retained messages sent because of a new
    /// subscription; for live messages MQTT 5 keeps the publisher's flag (the upstream
    /// subscribes with Retain As Published) while MQTT 3.1.1 brokers clear it.
    pub retain: bool,
    /// The filters (as given to `subscribe`) this copy was delivered for, when the broker
    /// says so (MQTT 5 subscription identifiers); `None` when it does not (MQTT 3.1.1).
    ///
    /// A broker sends one copy per matching subscription, so with overlapping filters the
    /// same message arrives several times: each copy is for the subscribers of its filters
    /// only. Without this information every copy matches every overlapping filter.
    pub filters: Option<Vec<Arc<str>>>,
    /// Acknowledges the message to the broker; see [`DownlinkAck`].
    pub ack: DownlinkAck,
}

/// Acknowledges a QoS >= 1 downlink message to the broker (PUBACK, or PUBREC and then
/// PUBREL / PUBCOMP) when [`Self::ack`] is called.
///
/// The gateway calls it once it has taken responsibility for the message (today: once it is
/// queued for every matching client; later: once it is durable). Dropping the handle without
/// `ack()` leaves the message unacknowledged: the broker does not send more than its in-flight
/// window of unacknowledged messages (the upstream's `max_unacked_downlinks` for MQTT 5), and
/// would redeliver the message after a reconnect if it kept a session (the upstream uses clean
/// sessions, so the broker discards it then).
///
/// Holding the handle holds one of the upstream's `max_unacked_downlinks` slots; while all are
/// held the upstream stops reading from the broker (backpressure). `ack()` never blocks. An
/// `ack()` after the connection the message arrived on has ended does nothing: the packet id
/// belongs to the old connection and could name a different message on the new one. For QoS 0
/// the handle is a no-op.
pub struct DownlinkAck {
    /// `None` for QoS 0 and [`Self::none`].
    inner: Option<(OwnedPermit<AckRequest>, AckRequest)>,
}

/// What the upstream's link task needs to acknowledge one downlink message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckRequest {
    /// The connection the message arrived on (counted from 1 per upstream).
    pub(crate) generation: u64,
    /// The broker's packet id, valid on that connection only.
    pub(crate) pkid: u16,
    /// QoS 1 (PUBACK) or 2 (PUBREC).
    pub(crate) qos: Qos,
}

impl DownlinkAck {
    /// A handle whose `ack()` does nothing: for QoS 0 messages and tests.
    #[must_use]
    pub const fn none() -> Self {
        Self { inner: None }
    }

    /// A handle that sends `request` through the reserved slot `permit`.
    pub(crate) const fn new(permit: OwnedPermit<AckRequest>, request: AckRequest) -> Self {
        Self {
            inner: Some((permit, request)),
        }
    }

    /// Whether `ack()` acknowledges anything (a QoS >= 1 message).
    #[must_use]
    pub const fn is_required(&self) -> bool {
        self.inner.is_some()
    }

    /// Acknowledges the message to the broker. Never blocks; a no-op for QoS 0, after the
    /// message's connection ended, or after the upstream stopped.
    pub fn ack(self) {
        if let Some((permit, request)) = self.inner {
            // The slot was reserved when the message arrived, so this cannot fail; if the
            // upstream has stopped, the request is dropped, which is the documented no-op.
            drop(permit.send(request));
        }
    }
}

impl Default for DownlinkAck {
    fn default() -> Self {
        Self::none()
    }
}

impl fmt::Debug for DownlinkAck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Some((_, request)) => f
                .debug_struct("DownlinkAck")
                .field("generation", &request.generation)
                .field("pkid", &request.pkid)
                .field("qos", &request.qos)
                .finish(),
            None => f.write_str("DownlinkAck(none)"),
        }
    }
}
