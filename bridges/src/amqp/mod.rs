//! Northbound AMQP 0-9-1 (RabbitMQ), uplink only: one connection and one confirm-mode channel
//! per configured upstream, implementing [`Upstream`](crate::upstream::Upstream).
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
//! - headers [`HEADER_TOPIC`] (the original topic), [`HEADER_QOS`] and [`HEADER_RETAIN`].
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
//!
//! No subscriptions: an AMQP upstream takes part in uplink only.

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
