//! Northbound AMQP 0-9-1 (RabbitMQ): one connection per configured upstream with a
//! confirm-mode channel for uplink ([`Upstream`](crate::upstream::Upstream)) and, with a
//! downlink channel given, a consuming channel for downlink
//! ([`Subscriber`](crate::upstream::Subscriber): subscriptions become queue bindings).
//!
//! ```text
//!  drain ── publish_with_seq(msg, token, seq) ──> AmqpUpstream ── bounded request channel ──┐
//!    ^        (non-blocking; Err = refused now)                                              v
//!    │                                              connection task: basic.publish on the
//!    │                                              confirm channel (mandatory, persistent)
//!    └── AckReport {token, delivery} <── FuturesUnordered of publisher confirms <── broker
//! ```
//!
//! Each publish goes to the configured exchange (default `amq.topic`) with:
//!
//! - routing key: the topic mapped like RabbitMQ's MQTT plugin does ([`routing_key`]): `/`
//!   becomes `.` and `.` becomes `/`, so `sensors/t1` is `sensors.t1` and a consumer bound
//!   with `sensors.#` gets it; the mapping is reversible, nothing is refused for a `.`.
//!   A topic longer than 255 bytes (the routing key's limit) is refused as
//!   [`FailReason::Rejected`];
//! - `delivery_mode` 2 (persistent), `mandatory` set;
//! - `message_id`: the spool sequence id in decimal (the same value MQTT upstreams send as the
//!   `sg-seq` user property), so consumers can drop duplicates;
//! - headers [`HEADER_TOPIC`] (the topic as routed), [`HEADER_QOS`], [`HEADER_RETAIN`], and the
//!   origin: [`HEADER_PROTOCOL`] and, when the sender has an identity, [`HEADER_CLIENT`].
//!
//! Invariants (the [`Upstream`](crate::upstream::Upstream) contract; MUST hold):
//!
//! - **One outcome per tracked send.** A broker ack is [`Delivery::Acknowledged`]; a nack is
//!   `Failed(BrokerBusy)` (the spool sends it again). A message the broker **returned** as
//!   unroutable (`mandatory`: no queue bound for its routing key) is `Failed(Rejected)`: the
//!   drain moves past it (sending it again would be returned again), with a warning and the
//!   `returned` counter ([`AmqpStats`]); it is never dropped without both.
//! - **Link loss fails the in-flight window** with `Failed(Disconnected)`, as does every
//!   accepted request not yet sent; the link watch goes false and publishes are refused
//!   until the next connection. The task never resends; the spool does.
//! - **QoS 0** records are published on the same confirm channel, untracked: no report, but
//!   their confirms are still awaited (and a return still counted) so none piles up.
//! - **Bounded**: at most `max_inflight` tracked publishes unreported (beyond: `QueueFull`),
//!   at most `request_queue` requests queued, and a fixed number of untracked confirms awaited
//!   beyond the window (then the task reads no more requests until confirms arrive).
//! - **Reconnect** with jittered exponential backoff; each transition is logged once. A
//!   connection counts as a success for the backoff only once the broker confirmed a message
//!   on it. The exchange must exist: it is checked (passive declare) on every connection, and
//!   a missing one is a connect failure.
//! - **Shutdown**: the stop token refuses new publishes, lets the broker confirm what is in
//!   flight for up to `connect_timeout`, closes the connection and reports the rest
//!   `Failed(Shutdown)`.
//! - **Reconfigure** ([`AmqpUpstream::reconfigure`]) changes nothing unless the whole new
//!   configuration passes the setup checks. A connection change ends the connection like a
//!   reset with a clean end (a bounded wait for confirms, the rest `Failed(Disconnected)`,
//!   connection.close) and connects with the new settings at once, also from a backoff wait.
//!
//! Downlink invariants (MUST hold):
//!
//! - **The queue** is a server-named exclusive auto-delete one per connection (default), a
//!   durable one the gateway declares, or an existing one checked with a passive declare and
//!   used as-is (no bindings). Configured `bindings` are made on every connection and never
//!   removed; a sensor filter becomes a binding with [`binding_key`] while the router wants
//!   it, and is unbound when the last subscriber leaves. Every binding is made again after a
//!   reconnect (`bindings.rs`).
//! - **Acknowledged only when taken.** A delivery is `basic.ack`ed only when the gateway calls
//!   [`DownlinkAck::ack`](crate::message::DownlinkAck::ack), or when this module drops it
//!   (body over `max_downlink_bytes`, a routing key that is no valid topic name, or this
//!   upstream's own publish coming back: `app_id`), counted. An ack after its connection ended
//!   is a no-op: the broker has requeued the message and redelivers it.
//! - **Bounded.** `basic.qos` prefetch = `max_unacked_downlinks` per connection, and as many
//!   acknowledgement slots over all connections: while all are held the task reads no more
//!   deliveries (it keeps serving uplink and acknowledgements). The downlink channel is the
//!   gateway's bounded one.

mod bindings;
pub mod config;
mod upstream;

pub use config::{AmqpConfigError, AmqpUpstreamConfig};
pub use upstream::{AmqpStats, AmqpUpstream};

use crate::upstream::{Delivery, FailReason};

/// Header carrying the message's original topic.
pub const HEADER_TOPIC: &str = "sg-topic";
/// Header carrying the sensor's QoS (0, 1 or 2).
pub const HEADER_QOS: &str = "sg-qos";
/// Header carrying the retain flag.
pub const HEADER_RETAIN: &str = "sg-retain";
/// Header carrying the southbound protocol the message arrived by (`mqttsn`, `coap`, `http`,
/// `internal`).
pub const HEADER_PROTOCOL: &str = "sg-protocol";
/// Header carrying the sender's identity (MQTT-SN ClientId); absent when it has none.
pub const HEADER_CLIENT: &str = "sg-client";

/// The routing key for `topic`, as RabbitMQ's MQTT plugin maps it: `/` and `.` swap places.
#[must_use]
pub fn routing_key(topic: &str) -> String {
    topic
        .chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            c => c,
        })
        .collect()
}

/// The binding key for an MQTT topic `filter`, as RabbitMQ's MQTT plugin makes it: the
/// characters of [`routing_key`] (`/` and `.` swap places), then a `+` level becomes `*` and
/// `#` stays `#`. So a message whose topic matches `filter` has a routing key the binding
/// matches, and nothing else does.
///
/// # Errors
/// [`FailReason::Rejected`] for a filter that is not a valid MQTT filter, whose key would be
/// longer than 255 bytes, or with a level that is exactly `*` (an ordinary character in MQTT
/// but a wildcard in AMQP: the binding would match more than the filter).
pub fn binding_key(filter: &str) -> Result<String, FailReason> {
    if !crate::topic::is_valid_filter(filter) || filter.len() > config::MAX_ROUTING_KEY_BYTES {
        return Err(FailReason::Rejected);
    }
    let mapped = routing_key(filter);
    let mut levels = Vec::new();
    for level in mapped.split('.') {
        levels.push(match level {
            "*" => return Err(FailReason::Rejected),
            "+" => "*",
            other => other,
        });
    }
    Ok(levels.join("."))
}

/// The topic a delivered message's routing key stands for (the inverse of [`routing_key`]),
/// if it is a valid MQTT topic name.
#[must_use]
pub fn topic_of(routing_key_text: &str) -> Option<String> {
    let topic = routing_key(routing_key_text);
    crate::topic::is_valid_name(&topic).then_some(topic)
}

/// What a broker confirmation means for a tracked send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Confirm {
    /// basic.ack, message routed.
    Ack,
    /// basic.ack after a basic.return: no queue took it.
    Returned,
    /// basic.nack.
    Nack,
    /// The channel or connection closed before the confirmation.
    Lost,
}

impl Confirm {
    pub(crate) const fn delivery(self) -> Delivery {
        match self {
            Self::Ack => Delivery::Acknowledged,
            Self::Returned => Delivery::Failed(FailReason::Rejected),
            Self::Nack => Delivery::Failed(FailReason::BrokerBusy),
            Self::Lost => Delivery::Failed(FailReason::Disconnected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slashes_become_dots_and_dots_slashes() {
        assert_eq!(routing_key("sensors/t1"), "sensors.t1");
        assert_eq!(routing_key("sensors/x"), "sensors.x");
        assert_eq!(routing_key("a.b/c"), "a/b.c");
        assert_eq!(routing_key("/lead/"), ".lead.");
        assert_eq!(routing_key("plain"), "plain");
        assert_eq!(routing_key("tëst/ü"), "tëst.ü");
    }

    #[test]
    fn the_mapping_is_its_own_inverse() {
        for t in ["a/b.c", "x.y.z", "s/1/2", ""] {
            assert_eq!(routing_key(&routing_key(t)), t);
        }
    }

    #[test]
    fn filters_become_binding_keys_like_the_mqtt_plugin_makes_them() {
        assert_eq!(binding_key("cmd/s1").unwrap(), "cmd.s1");
        assert_eq!(binding_key("cmd/+/set").unwrap(), "cmd.*.set");
        assert_eq!(binding_key("cmd/#").unwrap(), "cmd.#");
        assert_eq!(binding_key("#").unwrap(), "#");
        assert_eq!(binding_key("+").unwrap(), "*");
        // A dot is an ordinary character in MQTT: it swaps with the separator.
        assert_eq!(binding_key("v1.2/+").unwrap(), "v1/2.*");
        // `*` inside a level is literal for RabbitMQ too.
        assert_eq!(binding_key("a*b/c").unwrap(), "a*b.c");
    }

    #[test]
    fn filters_the_broker_would_widen_or_cannot_take_are_refused() {
        assert_eq!(binding_key("cmd/*"), Err(FailReason::Rejected));
        assert_eq!(binding_key("cmd/#/x"), Err(FailReason::Rejected));
        assert_eq!(binding_key(""), Err(FailReason::Rejected));
        assert_eq!(binding_key(&"x".repeat(256)), Err(FailReason::Rejected));
        assert!(binding_key(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn a_routing_key_maps_back_to_the_topic_it_came_from() {
        for t in ["cmd/s1", "v1.2/x", "a", "/lead"] {
            assert_eq!(topic_of(&routing_key(t)).as_deref(), Some(t));
        }
        // Wildcard characters and empty keys are no topic names: such deliveries are dropped.
        assert_eq!(topic_of("a.#"), None);
        assert_eq!(topic_of("a.+"), None);
        assert_eq!(topic_of(""), None);
    }

    #[test]
    fn confirmations_map_to_the_stated_verdicts() {
        assert_eq!(Confirm::Ack.delivery(), Delivery::Acknowledged);
        assert_eq!(
            Confirm::Returned.delivery(),
            Delivery::Failed(FailReason::Rejected)
        );
        assert_eq!(
            Confirm::Nack.delivery(),
            Delivery::Failed(FailReason::BrokerBusy)
        );
        assert_eq!(
            Confirm::Lost.delivery(),
            Delivery::Failed(FailReason::Disconnected)
        );
    }
}
