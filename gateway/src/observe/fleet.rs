//! The fleet view's counters (`crate::fleet`): relaxed atomics its tasks bump, read by its
//! heartbeats and by `/metrics` (`sensorgate_fleet_*`). Plain data here, so that `observe`
//! does not import the fleet tasks that import it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// The fleet view's own counters (in every heartbeat and in `/metrics`).
#[derive(Debug, Default)]
pub struct FleetCounters {
    /// Heartbeats handed to an upstream.
    pub heartbeats_sent: AtomicU64,
    /// Heartbeats not sent: the link was down or its queue full.
    pub heartbeats_skipped: AtomicU64,
    /// Heartbeats sent without detail to fit `max_message_size`.
    pub heartbeats_trimmed: AtomicU64,
    /// Events handed to an upstream (one per upstream).
    pub events_sent: AtomicU64,
    /// Events not sent on an upstream: its link was down or its queue full.
    pub events_skipped: AtomicU64,
    /// Events over `max_events_per_minute`, not sent anywhere.
    pub events_rate_limited: AtomicU64,
    /// Events lost because the publisher fell behind the event ring.
    pub events_lagged: AtomicU64,
    /// Replay requests served (answered `ok`).
    pub replays_served: AtomicU64,
    /// Replay requests refused with an answer.
    pub replays_refused: AtomicU64,
    /// Replay requests over the rate refused without an answer.
    pub replays_unanswered: AtomicU64,
    /// Records published again by replays.
    pub replayed_records: AtomicU64,
}

/// [`FleetCounters`] read at one moment, as a heartbeat carries them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCounts {
    /// See [`FleetCounters::heartbeats_sent`].
    pub heartbeats_sent: u64,
    /// See [`FleetCounters::heartbeats_skipped`].
    pub heartbeats_skipped: u64,
    /// See [`FleetCounters::heartbeats_trimmed`].
    pub heartbeats_trimmed: u64,
    /// See [`FleetCounters::events_sent`].
    pub events_sent: u64,
    /// See [`FleetCounters::events_skipped`].
    pub events_skipped: u64,
    /// See [`FleetCounters::events_rate_limited`].
    pub events_rate_limited: u64,
    /// See [`FleetCounters::events_lagged`].
    pub events_lagged: u64,
    /// See [`FleetCounters::replays_served`].
    pub replays_served: u64,
    /// See [`FleetCounters::replays_refused`].
    pub replays_refused: u64,
    /// See [`FleetCounters::replays_unanswered`].
    pub replays_unanswered: u64,
    /// See [`FleetCounters::replayed_records`].
    pub replayed_records: u64,
}

impl FleetCounters {
    /// The counts now.
    #[must_use]
    pub fn read(&self) -> FleetCounts {
        FleetCounts {
            heartbeats_sent: self.heartbeats_sent.load(Relaxed),
            heartbeats_skipped: self.heartbeats_skipped.load(Relaxed),
            heartbeats_trimmed: self.heartbeats_trimmed.load(Relaxed),
            events_sent: self.events_sent.load(Relaxed),
            events_skipped: self.events_skipped.load(Relaxed),
            events_rate_limited: self.events_rate_limited.load(Relaxed),
            events_lagged: self.events_lagged.load(Relaxed),
            replays_served: self.replays_served.load(Relaxed),
            replays_refused: self.replays_refused.load(Relaxed),
            replays_unanswered: self.replays_unanswered.load(Relaxed),
            replayed_records: self.replayed_records.load(Relaxed),
        }
    }
}

/// What `/status` says about the fleet view besides its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `[fleet] topic_prefix`, `{gateway_id}` replaced.
    pub topic_prefix: String,
    /// The heartbeat period, seconds; 0: off.
    pub heartbeat_secs: u64,
    /// Whether replay requests are served.
    pub replay: bool,
}
