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
