//! The fleet view: what the gateway tells each upstream about itself, on its own connection,
//! and the history it sends again on request ([`replay`], its adapter [`replayer`]).
//!
//! ```text
//!  [fleet] ──> presence::build ──> Presence {birth, will, death} ──> each upstream's config
//!                                   (MQTT: birth after CONNACK, Will in CONNECT, death before
//!                                    DISCONNECT; AMQP: birth on connect, death on close)
//!  snapshot::Sources::gather ──> heartbeat::Beats (sans-IO) ──> `<prefix>/status`, QoS 0
//!  observe::Events (ring) ── subscribe ──> events::Limiter (sans-IO) ──> `<prefix>/events`
//! ```
//!
//! Invariants:
//! - Nothing here is spooled or tracked: heartbeats and events go through
//!   `Upstream::publish_with_seq(message, None, None)`; refused (link down, queue full) means
//!   skipped and counted, never queued (a heartbeat an hour late is worse than none), and
//!   they never count as sensor data.
//! - One source of truth: a heartbeat is built from the same [`Snapshot`](crate::observe::snapshot::Snapshot)
//!   as `/status`; events are the `/status` event ring's.
//! - Bounded: one heartbeat or event payload is at most `[fleet] max_message_size` (a
//!   heartbeat sheds detail first, then is skipped and counted); events are rate-limited
//!   (`max_events_per_minute`, the excess counted); the event subscription is a bounded
//!   broadcast (a lagging publisher loses the oldest, counted).

pub mod events;
pub mod heartbeat;
pub mod presence;
pub mod replay;
pub mod replayer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use sensorgate_bridges::upstream::Upstream;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{FleetSection, GatewaySection};
use crate::observe::snapshot::Sources;

/// One upstream as the fleet publishers reach it.
#[derive(Clone)]
pub struct FleetLink {
    /// `[[upstream]] name`.
    pub name: String,
    /// Its index (spool cursor, [`Sources::upstreams`]).
    pub index: usize,
    /// Where its heartbeats and events go (untracked publishes).
    pub upstream: Arc<dyn Upstream>,
}

/// The fleet publishers' own counters (reported in every heartbeat).
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
}

/// [`FleetCounters`] read at one moment, as a heartbeat carries them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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
        }
    }
}

/// Who the gateway is, as every fleet payload says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `[gateway] id`.
    pub gateway_id: u8,
    /// `[gateway] name`.
    pub gateway_name: String,
    /// When the process started (wall clock ms).
    pub started_ms: u64,
}

impl Identity {
    /// The identity of the gateway `gateway`, started at `started_ms`.
    #[must_use]
    pub fn of(gateway: &GatewaySection, started_ms: u64) -> Self {
        Identity {
            gateway_id: gateway.id,
            gateway_name: gateway.name.clone(),
            started_ms,
        }
    }
}

/// Starts the heartbeat (unless `heartbeat = "0s"`) and event publishers for `links`; they
/// end when `stop` is cancelled. Nothing starts when `[fleet]` is off.
pub fn start(
    fleet: &FleetSection,
    identity: &Identity,
    sources: &Sources,
    links: Vec<FleetLink>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    if !fleet.enabled || links.is_empty() {
        return Vec::new();
    }
    let counters = Arc::new(FleetCounters::default());
    let mut tasks = Vec::new();
    if let Some(period) = fleet.heartbeat {
        tasks.push(tokio::spawn(heartbeat::run(
            heartbeat::Settings {
                period,
                topic: fleet.topic("status"),
                max_message_size: fleet.max_message_size,
            },
            identity.clone(),
            sources.clone(),
            links.clone(),
            Arc::clone(&counters),
            stop.clone(),
        )));
    }
    tasks.push(tokio::spawn(events::run(
        events::Settings {
            topic: fleet.topic("events"),
            qos: fleet.qos,
            max_per_minute: fleet.max_events_per_minute,
            max_message_size: fleet.max_message_size,
        },
        identity.clone(),
        sources.events.subscribe(),
        links,
        counters,
        stop.clone(),
    )));
    tasks
}
