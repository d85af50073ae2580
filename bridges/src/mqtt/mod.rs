//! Northbound MQTT: one aggregated connection per configured upstream broker.
//!
//! [`MqttUpstream::spawn`] validates the configuration, then starts the connection; the
//! returned handle publishes without blocking, and the broker's verdict on each tracked
//! publish comes back as an [`AckReport`] on a channel shared by all upstreams.
//!
//! ```text
//!  gateway ── publish(msg, token) ──> MqttUpstream ──try_publish_tracked──> rumqttc request queue
//!     ^          (non-blocking;          │ (remote_prefix + topic)                  │
//!     │           Err = refused now)     │ notice + in-flight slot                  v
//!     │                                  v                               event loop task ──> broker
//!     └─── AckReport {token, delivery} ── ack task: FuturesUnordered of notices <── PUBACK/PUBCOMP
//! ```
//!
//! Invariants (MUST hold; the integration tests check them against a real broker):
//!
//! - **One outcome per token.** A tracked publish (QoS >= 1 with `Some(token)`) either is refused
//!   by `publish` (an `Err`, and no report follows) or is accepted (`Ok`) and then yields exactly
//!   one [`AckReport`] — also when the link drops, the broker restarts or the upstream shuts
//!   down.
//! - **Acknowledged means acknowledged.** [`Delivery::Acknowledged`] is reported only after the
//!   broker's PUBACK (QoS 1) or PUBCOMP (QoS 2), and for MQTT 5 only with a success reason code
//!   ("no matching subscribers" included).
//! - **Link loss fails the in-flight window.** When the connection drops, every accepted,
//!   unacknowledged publish is reported `Failed(Disconnected)` at once, and while the link is
//!   down new publishes are refused with [`FailReason::Disconnected`]. Sessions are clean
//!   (clean session / clean start, MQTT 5 session expiry 0): this module never resends; the
//!   spool does (DESIGN invariant 1). A failed publish may still have reached the broker, so a
//!   resend can duplicate (invariant 4), never lose.
//! - **Bounded.** At most `max_inflight` tracked publishes are accepted and unreported at any
//!   time (beyond that: [`FailReason::QueueFull`]); the client's request channel holds at most
//!   `request_queue` requests; waiting for acknowledgements costs one entry in one
//!   `FuturesUnordered`, never a task per message. A slow [`AckReport`] consumer stalls the
//!   reports, which fills the window, which refuses new publishes: backpressure, not memory.
//! - **Order.** Publishes of one caller reach the broker in `publish` order.
//! - **Shutdown.** Cancelling the token refuses new publishes ([`FailReason::Shutdown`]), lets
//!   the broker acknowledge what is in flight for up to `connect_timeout`, sends DISCONNECT,
//!   reports everything still open as `Failed(Shutdown)`, and then the task ends.

mod backoff;
mod client;
pub mod config;
mod sink;

pub use client::MAX_PUBLISH_BYTES;
pub(crate) use client::PendingAck;
pub use config::{
    MqttUpstreamConfig, MqttVersion, SetupError, TlsSettings, UrlError, build_tls_config,
};
pub use sink::{MqttUpstream, UpstreamStats};

/// Outcome of a QoS >= 1 publish, reported back to the gateway core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The broker acknowledged the message (PUBACK / PUBCOMP).
    Acknowledged,
    /// Upstream down, queue full, rejected by the broker (v5 reason code), or session reset:
    /// the sensor gets congestion.
    Failed(FailReason),
}

impl Delivery {
    /// Whether the broker took the message.
    #[must_use]
    pub const fn is_acknowledged(self) -> bool {
        matches!(self, Self::Acknowledged)
    }
}

/// Why a publish was not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The link to the broker was down, or dropped before the acknowledgement.
    Disconnected,
    /// `max_inflight` publishes are outstanding, or the client's request queue is full.
    QueueFull,
    /// Refused: by the broker (MQTT 5 failure reason code), or locally (invalid topic, over
    /// [`MAX_PUBLISH_BYTES`]). Retrying the same message will not help.
    Rejected,
    /// The client reconnected without a broker session and dropped the publish.
    SessionReset,
    /// The upstream is shutting down.
    Shutdown,
}

impl FailReason {
    /// A short stable tag for metrics and structured logs.
    #[must_use]
    pub const fn error_code(self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::QueueFull => "queue_full",
            Self::Rejected => "rejected",
            Self::SessionReset => "session_reset",
            Self::Shutdown => "shutdown",
        }
    }

    /// Whether sending the same message again later can succeed.
    #[must_use]
    pub const fn is_recoverable(self) -> bool {
        !matches!(self, Self::Rejected)
    }
}

/// The broker's verdict on one tracked publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckReport {
    /// The token given to [`MqttUpstream::publish`].
    pub token: u64,
    /// The `index` given to [`MqttUpstream::spawn`].
    pub upstream: usize,
    /// What happened.
    pub delivery: Delivery,
}
