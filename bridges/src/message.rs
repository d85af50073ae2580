//! The unit of northbound traffic: one message travelling from a sensor toward an upstream.
//!
//! A [`Message`] is cheap to clone: the payload is a reference-counted [`Bytes`], so routing
//! one reading to several upstreams shares a single buffer.

use bytes::Bytes;

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

/// A message from an upstream subscription, travelling south to the sensors.
#[derive(Debug)]
pub struct Downlink {
    /// Index of the upstream it came from.
    pub upstream: usize,
    /// The topic, with the upstream's `remote_prefix` removed.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// The QoS the broker delivered it with.
    pub qos: Qos,
    /// The retain flag as delivered (MQTT 5: as published, the gateway subscribes with
    /// retain-as-published).
    pub retain: bool,
    /// Acknowledges it to the broker.
    pub ack: DownlinkAck,
}

/// Acknowledges a QoS 1/2 downlink message to the broker (PUBACK, or PUBREC for QoS 2) when
/// [`DownlinkAck::ack`] is called. The gateway calls it once it has taken responsibility for the
/// message. Dropping it unacknowledged leaves the message to the broker's redelivery rules; an
/// acknowledgement for a connection that has since dropped is a harmless no-op.
#[derive(Debug, Default)]
pub struct DownlinkAck(pub(crate) Option<crate::mqtt::PendingAck>);

impl DownlinkAck {
    /// A handle with nothing to acknowledge (QoS 0, tests).
    pub fn none() -> Self {
        DownlinkAck(None)
    }

    /// Sends the acknowledgement (non-blocking).
    pub fn ack(self) {
        if let Some(pending) = self.0 {
            pending.send();
        }
    }
}
