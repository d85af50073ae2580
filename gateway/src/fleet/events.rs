//! Events: each notable event of the `/status` ring, as it is pushed, on every upstream's
//! `<topic_prefix>/events` (`[fleet] qos`, not retained, never spooled), at most
//! `max_events_per_minute` (the excess is counted and dropped).
//!
//! Payload: see schemas/event.json (the `/status` event's fields plus the gateway's id and
//! name). [`Limiter`] is sans-IO (a fixed one-minute window, time passed in).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use sensorgate_bridges::message::{Message, Qos};
use sensorgate_bridges::spool::wall_ms;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{FleetCounters, FleetLink, Identity};
use crate::observe::status::EventInfo;

/// One minute, the rate limit's window.
const WINDOW_MS: u64 = 60_000;

/// What the event task needs from `[fleet]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `<topic_prefix>/events`.
    pub topic: String,
    /// `qos`.
    pub qos: Qos,
    /// `max_events_per_minute`.
    pub max_per_minute: u32,
    /// `max_message_size`.
    pub max_message_size: usize,
}

/// A fixed-window rate limit: at most `max` events per minute.
#[derive(Debug, Clone)]
pub struct Limiter {
    max: u32,
    /// When the current window began (its first event); `None` before any.
    window_start_ms: Option<u64>,
    used: u32,
}

impl Limiter {
    /// At most `max` per minute (0: none at all).
    #[must_use]
    pub const fn new(max: u32) -> Self {
        Limiter {
            max,
            window_start_ms: None,
            used: 0,
        }
    }

    /// Whether one more event may go out at `now_ms` (and counts it if so).
    pub fn allow(&mut self, now_ms: u64) -> bool {
        // A new window at the first event, a minute later, or after the clock stepped back.
        let expired = self
            .window_start_ms
            .is_none_or(|start| now_ms < start || now_ms - start >= WINDOW_MS);
        if expired {
            self.window_start_ms = Some(now_ms);
            self.used = 0;
        }
        if self.used >= self.max {
            return false;
        }
        self.used += 1;
        true
    }
}

/// One event message.
#[derive(Debug, Clone, Serialize)]
pub struct EventDoc<'a> {
    /// `[gateway] id`.
    pub gateway_id: u8,
    /// `[gateway] name`.
    pub gateway_name: &'a str,
    /// The event, as `/status` lists it.
    #[serde(flatten)]
    pub event: &'a EventInfo,
}

/// The payload of `event`, at most `max` bytes (a long sentence is cut at a character
/// boundary, with `…`); `None` when even that does not fit.
#[must_use]
pub fn payload(identity: &Identity, event: &EventInfo, max: usize) -> Option<Vec<u8>> {
    let doc = |event: &EventInfo| {
        serde_json::to_vec(&EventDoc {
            gateway_id: identity.gateway_id,
            gateway_name: &identity.gateway_name,
            event,
        })
        .ok()
    };
    let bytes = doc(event)?;
    if bytes.len() <= max {
        return Some(bytes);
    }
    let over = bytes.len() - max;
    let mut keep = event.message.len().checked_sub(over + 3)?;
    while !event.message.is_char_boundary(keep) {
        keep -= 1;
    }
    let mut short = event.clone();
    short.message = format!("{}…", event.message.get(..keep)?);
    doc(&short).filter(|b| b.len() <= max)
}

/// Publishes every event from `events` on every link until `stop`.
pub async fn run(
    settings: Settings,
    identity: Identity,
    mut events: broadcast::Receiver<EventInfo>,
    links: Vec<FleetLink>,
    counters: Arc<FleetCounters>,
    stop: CancellationToken,
) {
    let mut limiter = Limiter::new(settings.max_per_minute);
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = events.recv() => event,
        };
        let event = match event {
            Ok(event) => event,
            Err(RecvError::Lagged(n)) => {
                counters.events_lagged.fetch_add(n, Relaxed);
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if !limiter.allow(wall_ms()) {
            counters.events_rate_limited.fetch_add(1, Relaxed);
            tracing::debug!(event = %event.kind, "Event over [fleet] max_events_per_minute; not sent.");
            continue;
        }
        let Some(payload) = payload(&identity, &event, settings.max_message_size) else {
            counters.events_skipped.fetch_add(1, Relaxed);
            continue;
        };
        let payload = Bytes::from(payload);
        for link in &links {
            let message =
                Message::new(settings.topic.clone(), payload.clone(), settings.qos, false);
            match link.upstream.publish_with_seq(message, None, None) {
                Ok(()) => counters.events_sent.fetch_add(1, Relaxed),
                Err(_) => counters.events_skipped.fetch_add(1, Relaxed),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_allows_max_per_minute_window() {
        let mut l = Limiter::new(2);
        assert!(l.allow(1_000));
        assert!(l.allow(2_000));
        assert!(!l.allow(3_000));
        assert!(!l.allow(60_999));
        assert!(l.allow(61_000));
        let mut none = Limiter::new(0);
        assert!(!none.allow(5));
    }

    #[test]
    fn payloads_carry_the_event_and_are_bounded() {
        let id = Identity {
            gateway_id: 3,
            gateway_name: "gw".into(),
            started_ms: 0,
        };
        let event = EventInfo {
            at_ms: 5,
            kind: "upstream_up".into(),
            level: "info".into(),
            message: "é".repeat(600),
            upstream: Some("cloud".into()),
            duration_secs: Some(12),
            ..EventInfo::default()
        };
        let full = payload(&id, &event, 1 << 20).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&full).unwrap();
        assert_eq!(v["gateway_id"], 3);
        assert_eq!(v["kind"], "upstream_up");
        assert_eq!(v["upstream"], "cloud");
        assert_eq!(v["duration_secs"], 12);
        let short = payload(&id, &event, 1024).unwrap();
        assert!(short.len() <= 1024);
        let v: serde_json::Value = serde_json::from_slice(&short).unwrap();
        assert!(v["message"].as_str().unwrap().ends_with('…'));
        assert!(payload(&id, &event, 50).is_none());
    }
}
