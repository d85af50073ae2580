//! Birth, Will and death: the retained `<topic_prefix>/state` messages of one upstream.
//!
//! Payload (schemas/state.json): `{"state": "online" | "offline", "reason": ..., "gateway_id",
//! "gateway_name", "version", "started_ms", "upstream"}`. `reason` tells how it was sent:
//! `connected` (birth), `connection_lost` (the broker published the Will), `shutdown` (death).
//! With `[fleet] state_payload = "text"` the payload is the bare `state` word instead (an
//! availability topic). The payloads are fixed at start: a reconnect publishes the same birth
//! again.

use sensorgate_bridges::message::Message;
use sensorgate_bridges::upstream::Presence;
use serde::Serialize;

use super::Identity;
use crate::config::{FleetSection, StatePayload};

/// The `state` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateDoc<'a> {
    /// `online` or `offline`.
    pub state: &'static str,
    /// `connected`, `connection_lost` or `shutdown`.
    pub reason: &'static str,
    /// `[gateway] id`.
    pub gateway_id: u8,
    /// `[gateway] name`.
    pub gateway_name: &'a str,
    /// The sensorgate version.
    pub version: &'static str,
    /// When the process started (wall clock, ms since the epoch).
    pub started_ms: u64,
    /// The upstream this message went through (`[[upstream]] name`).
    pub upstream: &'a str,
}

/// The presence of the gateway on upstream `upstream`; `None` when `[fleet]` is off.
#[must_use]
pub fn build(fleet: &FleetSection, identity: &Identity, upstream: &str) -> Option<Presence> {
    if !fleet.enabled {
        return None;
    }
    let topic = fleet.topic("state");
    let message = |state: &'static str, reason: &'static str| {
        let doc = StateDoc {
            state,
            reason,
            gateway_id: identity.gateway_id,
            gateway_name: &identity.gateway_name,
            version: env!("CARGO_PKG_VERSION"),
            started_ms: identity.started_ms,
            upstream,
        };
        let payload = match fleet.state_payload {
            // Plain strings and integers: serializing cannot fail.
            StatePayload::Json => serde_json::to_vec(&doc).unwrap_or_default(),
            StatePayload::Text => state.as_bytes().to_vec(),
        };
        Message::new(topic.clone(), payload, fleet.qos, true)
    };
    Some(Presence {
        birth: message("online", "connected"),
        will: message("offline", "connection_lost"),
        death: message("offline", "shutdown"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(enabled: bool) -> FleetSection {
        FleetSection {
            enabled,
            topic_prefix_template: "sensorgate/{gateway_id}".into(),
            topic_prefix: "sensorgate/7".into(),
            qos: sensorgate_bridges::message::Qos::AtLeastOnce,
            state_payload: StatePayload::Json,
            heartbeat: None,
            max_events_per_minute: 30,
            max_message_size: 16 << 10,
            replay: crate::config::ReplaySection {
                enabled: true,
                max_records: 10,
                max_requests_per_minute: 6,
                keep_acknowledged: 0,
            },
        }
    }

    #[test]
    fn birth_will_and_death_are_retained_state_documents() {
        let id = Identity {
            gateway_id: 7,
            gateway_name: "site-7".into(),
            started_ms: 1_700_000_000_000,
        };
        assert!(build(&fleet(false), &id, "cloud").is_none());
        let p = build(&fleet(true), &id, "cloud").unwrap();
        for (m, state, reason) in [
            (&p.birth, "online", "connected"),
            (&p.will, "offline", "connection_lost"),
            (&p.death, "offline", "shutdown"),
        ] {
            assert_eq!(m.topic, "sensorgate/7/state");
            assert!(m.retain);
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v["state"], state);
            assert_eq!(v["reason"], reason);
            assert_eq!(v["gateway_id"], 7);
            assert_eq!(v["gateway_name"], "site-7");
            assert_eq!(v["upstream"], "cloud");
            assert_eq!(v["started_ms"], 1_700_000_000_000_u64);
            assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        }
        // "text": the bare word, still retained on the same topic.
        let text = FleetSection {
            state_payload: StatePayload::Text,
            ..fleet(true)
        };
        let p = build(&text, &id, "cloud").unwrap();
        for (m, word) in [
            (&p.birth, "online"),
            (&p.will, "offline"),
            (&p.death, "offline"),
        ] {
            assert_eq!(
                (m.topic.as_str(), &m.payload[..], m.retain),
                ("sensorgate/7/state", word.as_bytes(), true)
            );
        }
    }
}
