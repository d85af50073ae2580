//! Authorisation, the same for every southbound protocol: topic ACLs ([`acl`]) and
//! per-identity rate and size limits ([`limit`]), decided on a [`crate::identity::Identity`]
//! whatever carried the data. Pure: no IO, time passed in.
//!
//! [`Policy`] is compiled once from the config (`[[acl]]`, `[limits]`) and shared by the
//! three ingresses through their settings (`mqttsn` and `coap` `CoreConfig::security`,
//! `HttpSection::security`); a reload compiles a new one and each ingress swaps it whole
//! through its usual live path, keeping every session (and its limiter buckets). Each ingress
//! owns its own [`limit::Limiter`] (one owner per state): an identity's rate is counted per
//! protocol.
//!
//! What is refused is counted per reason ([`Counters`], shared with the admin listener as
//! `sensorgate_ingress_events_total{protocol,event}`).

pub mod acl;
pub mod limit;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use acl::{Acl, Pattern, Requester, Rule};
pub use limit::{Limiter, Limits, LimitsPolicy, Rate, Verdict};

/// The compiled authorisation policy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// The ACL; `None` when no `[[acl]]` is configured (everything allowed).
    pub acl: Option<Acl>,
    /// `[limits]`.
    pub limits: LimitsPolicy,
    /// The MQTT-SN ClientIds bound to a `[[psk]]` identity (its `client_ids`): only a peer
    /// proving that identity may use them. Kept here rather than in the sessions so that it
    /// holds for a session restored after a restart too (its record does not say who proved
    /// it) and for a ClientId that has no session yet.
    pub reserved_client_ids: HashSet<Arc<str>>,
    /// The fleet view's topic prefix (`[fleet] topic_prefix`, when `[fleet]` is on): the
    /// gateway's own namespace upstream (its presence, heartbeats, events, replay requests).
    /// No sensor publishes under it, whatever the ACL says, as no MQTT client may publish to
    /// a broker's `$SYS`: a sensor could otherwise announce the gateway offline or ask for
    /// replays.
    pub reserved_topic_prefix: Option<Arc<str>>,
}

impl Policy {
    /// Whether `client_id` belongs to a `[[psk]]` identity (a plain client may not use it).
    #[must_use]
    pub fn is_reserved(&self, client_id: &str) -> bool {
        self.reserved_client_ids.contains(client_id)
    }

    /// Whether `who` may publish to `topic`.
    #[must_use]
    pub fn may_publish(&self, who: &Requester<'_>, topic: &str) -> bool {
        !self.is_reserved_topic(topic)
            && self.acl.as_ref().is_none_or(|a| a.may_publish(who, topic))
    }

    /// Whether `topic` is the fleet prefix or under it ([`Self::reserved_topic_prefix`]).
    #[must_use]
    pub fn is_reserved_topic(&self, topic: &str) -> bool {
        self.reserved_topic_prefix.as_deref().is_some_and(|prefix| {
            topic
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    /// Whether `who` may subscribe to `filter`.
    #[must_use]
    pub fn may_subscribe(&self, who: &Requester<'_>, filter: &str) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.may_subscribe(who, filter))
    }

    /// Whether `who` may receive a message on `topic` (checked at delivery).
    #[must_use]
    pub fn may_receive(&self, who: &Requester<'_>, topic: &str) -> bool {
        self.acl.as_ref().is_none_or(|a| a.may_receive(who, topic))
    }

    /// Whether any rate or size limit is configured.
    #[must_use]
    pub fn limits_active(&self) -> bool {
        self.limits.is_active()
    }
}

/// Why a request was refused by the policy (or the identity checks before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// A publish the ACL does not allow.
    AclPublish,
    /// A subscription the ACL does not allow.
    AclSubscribe,
    /// Over the identity's message or byte rate.
    RateLimited,
    /// Larger than the identity's `max_message_size` (or its byte burst).
    TooLarge,
    /// An MQTT-SN CONNECT whose ClientId the proven identity may not use.
    ClientIdMismatch,
    /// A request without a proven identity where one is required (`require_identity`).
    IdentityRequired,
    /// A downlink message not delivered because the subscriber may no longer receive its
    /// topic (the ACL changed since it subscribed).
    AclDeniedDelivery,
}

impl Denial {
    /// Every reason, in the order of [`Counters::events`].
    pub const ALL: [Denial; 7] = [
        Denial::AclPublish,
        Denial::AclSubscribe,
        Denial::RateLimited,
        Denial::TooLarge,
        Denial::ClientIdMismatch,
        Denial::IdentityRequired,
        Denial::AclDeniedDelivery,
    ];

    /// The `event` label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Denial::AclPublish => "acl_denied_publish",
            Denial::AclSubscribe => "acl_denied_subscribe",
            Denial::RateLimited => "rate_limited",
            Denial::TooLarge => "too_large",
            Denial::ClientIdMismatch => "client_id_mismatch",
            Denial::IdentityRequired => "identity_required",
            Denial::AclDeniedDelivery => "acl_denied_delivery",
        }
    }
}

/// Refusals per [`Denial`] of one ingress, written by its task, read by the admin listener at
/// scrape time.
#[derive(Debug, Default)]
pub struct Counters {
    counts: [AtomicU64; 7],
}

impl Counters {
    /// Counts one refusal.
    pub fn count(&self, denial: Denial) {
        if let Some(c) = self.counts.get(denial as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `n` refusals.
    pub fn add(&self, denial: Denial, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(c) = self.counts.get(denial as usize) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The count of `denial`.
    #[must_use]
    pub fn get(&self, denial: Denial) -> u64 {
        self.counts
            .get(denial as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every counter with its `event` label.
    #[must_use]
    pub fn events(&self) -> Vec<(&'static str, u64)> {
        Denial::ALL
            .iter()
            .map(|d| (d.as_str(), self.get(*d)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_publishes_under_the_fleet_prefix_whatever_the_acl() {
        let policy = Policy {
            reserved_topic_prefix: Some(Arc::from("sensorgate/7")),
            ..Policy::default()
        };
        let who = Requester::new(None, Some("s1"));
        for topic in ["sensorgate/7", "sensorgate/7/state", "sensorgate/7/replay"] {
            assert!(!policy.may_publish(&who, topic), "{topic}");
        }
        for topic in [
            "sensorgate/70/state",
            "sensorgate/7x",
            "sensorgate",
            "sensors/7",
        ] {
            assert!(policy.may_publish(&who, topic), "{topic}");
        }
        // Subscribing is not publishing: a sensor may watch the gateway's own topics.
        assert!(policy.may_subscribe(&who, "sensorgate/7/#"));
        assert!(Policy::default().may_publish(&who, "sensorgate/7/state"));
    }
}
