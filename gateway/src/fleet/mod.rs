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

use sensorgate_bridges::upstream::Upstream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{FleetSection, GatewaySection};
pub use crate::observe::fleet::{FleetCounters, FleetCounts};
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
    let counters = Arc::clone(&sources.fleet);
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
