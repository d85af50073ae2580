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
    /// Where the message came from: kept with it in the spool, sent upstream as headers,
    /// and available to route rewrite templates.
    pub origin: Origin,
}

impl Message {
    /// A message with no origin (tests, gateway-generated messages).
    #[must_use]
    pub fn new(
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: Qos,
        retain: bool,
    ) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            origin: Origin::default(),
        }
    }
}

/// The southbound protocol a message arrived by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Made by the gateway itself, or origin unknown (a record written before origins were
    /// kept).
    #[default]
    Internal,
    /// MQTT-SN, over any transport (UDP, serial line, DTLS).
    MqttSn,
    /// CoAP.
    Coap,
    /// HTTP.
    Http,
}

impl Protocol {
    /// The name used in headers, templates (`{protocol}`), metrics and logs.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::MqttSn => "mqttsn",
            Self::Coap => "coap",
            Self::Http => "http",
        }
    }

    /// The one-byte code stored in the spool (stable: never renumber).
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::Internal => 0,
            Self::MqttSn => 1,
            Self::Coap => 2,
            Self::Http => 3,
        }
    }

    /// The protocol stored as `code`; unknown codes read as [`Self::Internal`].
    #[must_use]
    pub const fn from_code(code: u8) -> Self {
        match code {
            1 => Self::MqttSn,
            2 => Self::Coap,
            3 => Self::Http,
            _ => Self::Internal,
        }
    }
}

/// The origin of an uplink message. Cheap to clone: the strings are shared.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// The protocol it arrived by.
    pub protocol: Protocol,
    /// The client's identity (MQTT-SN ClientId, DTLS identity, HTTP credential name);
    /// `None` when the protocol has none.
    pub client_id: Option<Arc<str>>,
    /// The peer's address as text (`udp:[::1]:5000`, `serial:/dev/ttyUSB0`); `None` when
    /// unknown.
    pub peer: Option<Arc<str>>,
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
    inner: AckInner,
}

/// How a [`DownlinkAck`] acknowledges.
enum AckInner {
    /// Nothing to acknowledge (QoS 0, tests).
    None,
    /// The MQTT upstream's reserved ack slot and what to send through it.
    Mqtt(OwnedPermit<AckRequest>, AckRequest),
    /// Any other upstream kind: the closure acknowledges (it must not block).
    Custom(Box<dyn FnOnce() + Send + 'static>),
    /// One part of a [`DownlinkAck::split`].
    Part(Arc<SharedAck>),
}

/// The original handle behind the parts of a [`DownlinkAck::split`].
struct SharedAck {
    /// Parts not yet acknowledged or dropped.
    remaining: std::sync::atomic::AtomicUsize,
    /// Set when a part was dropped without `ack()`: the original is then never acknowledged.
    failed: std::sync::atomic::AtomicBool,
    /// The original, taken by whichever part finishes last.
    original: std::sync::Mutex<Option<DownlinkAck>>,
}

impl SharedAck {
    /// One part is done (`acked` or dropped); the last one acknowledges the original if
    /// every part was acknowledged, or drops it.
    fn part_done(&self, acked: bool) {
        use std::sync::atomic::Ordering;
        if !acked {
            self.failed.store(true, Ordering::SeqCst);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let original = self
                .original
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(original) = original
                && !self.failed.load(Ordering::SeqCst)
            {
                original.ack();
            }
        }
    }
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
        Self {
            inner: AckInner::None,
        }
    }

    /// A handle that sends `request` through the reserved slot `permit`.
    pub(crate) const fn new(permit: OwnedPermit<AckRequest>, request: AckRequest) -> Self {
        Self {
            inner: AckInner::Mqtt(permit, request),
        }
    }

    /// A handle for another upstream kind: `ack()` calls `f`, which must not block (it
    /// queues the acknowledgement for the upstream's own task). Dropping the handle drops
    /// `f` uncalled.
    pub fn from_fn(f: impl FnOnce() + Send + 'static) -> Self {
        Self {
            inner: AckInner::Custom(Box::new(f)),
        }
    }

    /// Splits the handle into `n` parts for `n` receivers of the same message (ingresses):
    /// the message is acknowledged once every part was `ack()`ed, and never if any part is
    /// dropped without it. `n == 0` acknowledges at once (nobody needed the message);
    /// `n == 1` returns the handle itself. A handle that needs no acknowledgement gives
    /// parts that need none.
    #[must_use]
    pub fn split(self, n: usize) -> Vec<Self> {
        if n == 0 {
            self.ack();
            return Vec::new();
        }
        if n == 1 || !self.is_required() {
            let mut parts = Vec::with_capacity(n);
            parts.push(self);
            parts.extend((1..n).map(|_| Self::none()));
            return parts;
        }
        let shared = Arc::new(SharedAck {
            remaining: std::sync::atomic::AtomicUsize::new(n),
            failed: std::sync::atomic::AtomicBool::new(false),
            original: std::sync::Mutex::new(Some(self)),
        });
        (0..n)
            .map(|_| Self {
                inner: AckInner::Part(Arc::clone(&shared)),
            })
            .collect()
    }

    /// Whether `ack()` acknowledges anything (a QoS >= 1 message).
    #[must_use]
    pub const fn is_required(&self) -> bool {
        !matches!(self.inner, AckInner::None)
    }

    /// Acknowledges the message to the broker. Never blocks; a no-op for QoS 0, after the
    /// message's connection ended, or after the upstream stopped.
    pub fn ack(mut self) {
        match std::mem::replace(&mut self.inner, AckInner::None) {
            AckInner::None => {}
            // The slot was reserved when the message arrived, so this cannot fail; if the
            // upstream has stopped, the request is dropped, which is the documented no-op.
            AckInner::Mqtt(permit, request) => drop(permit.send(request)),
            AckInner::Custom(f) => f(),
            AckInner::Part(shared) => shared.part_done(true),
        }
    }
}

impl Drop for DownlinkAck {
    fn drop(&mut self) {
        if let AckInner::Part(shared) = std::mem::replace(&mut self.inner, AckInner::None) {
            shared.part_done(false);
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
            AckInner::Mqtt(_, request) => f
                .debug_struct("DownlinkAck")
                .field("generation", &request.generation)
                .field("pkid", &request.pkid)
                .field("qos", &request.qos)
                .finish(),
            AckInner::Custom(_) => f.write_str("DownlinkAck(custom)"),
            AckInner::Part(_) => f.write_str("DownlinkAck(part)"),
            AckInner::None => f.write_str("DownlinkAck(none)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::DownlinkAck;

    fn counted() -> (DownlinkAck, Arc<AtomicUsize>) {
        let acks = Arc::new(AtomicUsize::new(0));
        let a = Arc::clone(&acks);
        (
            DownlinkAck::from_fn(move || {
                a.fetch_add(1, Ordering::SeqCst);
            }),
            acks,
        )
    }

    #[test]
    fn a_split_ack_acknowledges_once_after_every_part() {
        let (ack, acks) = counted();
        let mut parts = ack.split(3);
        assert_eq!(parts.len(), 3);
        parts.pop().into_iter().for_each(DownlinkAck::ack);
        parts.pop().into_iter().for_each(DownlinkAck::ack);
        assert_eq!(acks.load(Ordering::SeqCst), 0, "one part still out");
        parts.pop().into_iter().for_each(DownlinkAck::ack);
        assert_eq!(acks.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_dropped_part_means_the_message_is_never_acknowledged() {
        let (ack, acks) = counted();
        let mut parts = ack.split(2);
        drop(parts.pop());
        parts.pop().into_iter().for_each(DownlinkAck::ack);
        assert_eq!(acks.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn split_into_none_acknowledges_at_once_and_into_one_is_the_handle() {
        let (ack, acks) = counted();
        assert!(ack.split(0).is_empty());
        assert_eq!(acks.load(Ordering::SeqCst), 1);
        let (ack, acks) = counted();
        let mut parts = ack.split(1);
        assert!(parts[0].is_required());
        parts.pop().into_iter().for_each(DownlinkAck::ack);
        assert_eq!(acks.load(Ordering::SeqCst), 1);
    }
}
