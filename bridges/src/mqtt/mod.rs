//! Northbound MQTT: one aggregated connection per configured upstream broker.
//!
//! [`MqttUpstream::spawn_with_downlink`] validates the configuration, then starts the
//! connection; the returned handle publishes and subscribes without blocking. The broker's
//! verdict on each tracked publish comes back as an [`AckReport`] on a channel shared by all
//! upstreams; messages from subscriptions come back as [`Downlink`]s on another.
//!
//! Uplink:
//!
//! ```text
//!  gateway ── publish(msg, token) ──> MqttUpstream ──try_publish_tracked──> rumqttc request queue
//!     ^          (non-blocking;          │ (remote_prefix + topic)                  │
//!     │           Err = refused now)     │ notice + in-flight slot                  v
//!     │                                  v                               event loop task ──> broker
//!     └─── AckReport {token, delivery} ── ack task: FuturesUnordered of notices <── PUBACK/PUBCOMP
//! ```
//!
//! Downlink:
//!
//! ```text
//!  gateway ── subscribe(filter, qos) ──> subscription table ── notify ──> link task
//!          ── unsubscribe(filter) ────>  (wanted / applied)               │ batched SUBSCRIBE /
//!                                                                         │ UNSUBSCRIBE of
//!                                                                         v remote_prefix + filter
//!  broker ── PUBLISH ──> link task: size / UTF-8 / prefix checks ──> Downlink {topic, .., ack}
//!                         (dropped: acked + counted)               bounded channel, send().await
//!                         QoS >= 1: waits for an ack slot
//!  gateway ── DownlinkAck::ack() ── ack slot ──> link task ──> PUBACK / PUBREC (if the message's
//!                                                              connection is still up)
//! ```
//!
//! [`Downlink`]: crate::message::Downlink
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
//! - **Reconfigure** ([`MqttUpstream::reconfigure`]) changes nothing unless the whole new
//!   configuration passes the setup checks. A connection change is a link loss with a clean
//!   end: new publishes refused, a bounded wait for acknowledgements, DISCONNECT, everything
//!   still open failed (the spool resends), then the new connection at once; the handle's
//!   clones, the in-flight window and the subscription table survive it.
//!
//! Downlink invariants:
//!
//! - **Acknowledged only when taken.** A QoS >= 1 message is acknowledged to the broker
//!   (PUBACK; PUBREC, then PUBCOMP to the broker's PUBREL) only when the gateway calls
//!   [`DownlinkAck::ack`], or when this module drops it itself (over `max_downlink_bytes`, topic
//!   not UTF-8 or outside `remote_prefix`, no receiver), which is counted as `downlink_dropped`.
//!   The client library never acknowledges on its own (manual acknowledgement mode).
//! - **An acknowledgement belongs to its connection.** It is sent only while the connection the
//!   message arrived on is up; later it is a no-op (the packet id may name another message on
//!   the new connection, and the client would fail the connection on an unknown one). With
//!   clean sessions the broker discards unacknowledged messages of a lost connection.
//! - **Subscriptions are remembered.** Every filter passed to [`MqttUpstream::subscribe`] and
//!   not unsubscribed is asked for on every connection: after each CONNACK all of them, batched,
//!   then each change as it happens. A full request queue delays a change, never loses it. A
//!   filter the broker refuses (SUBACK failure) is logged at warn (rate-limited) and asked for
//!   again after a delay; one whose SUBACK the dropped link never brought is asked for on the
//!   next connection like every other.
//! - **Prefix.** The broker is asked for `remote_prefix + filter`; a delivered topic loses the
//!   prefix, and one without it is dropped.
//! - **Bounded.** At most `max_subscriptions` filters (configured, at most
//!   [`MAX_SUBSCRIPTIONS`]); at most `max_unacked_downlinks`
//!   [`DownlinkAck`]s of QoS >= 1 messages outstanding (MQTT 5 tells the broker as Receive
//!   Maximum); the downlink channel is the gateway's bounded channel. When a slot or channel
//!   space is missing, the link task waits and reads nothing more from the broker
//!   (backpressure), while still sending acknowledgements and subscription changes.
//! - **No echo of the gateway's own publishes.** The gateway delivers its sensors' messages to
//!   its own subscribers itself (local delivery), so the broker's copy must not come back:
//!   MQTT 5 subscribes with No Local; MQTT 3.1.1 has no such option, and the link task drops
//!   (acknowledges and counts as `downlink_echoes_dropped`) each incoming non-retained
//!   message matching an open fingerprint of a recent publish (bounded; see `echo.rs` for
//!   the bounds and the caveat).
//! - **MQTT 3.1.1 differences.** No No Local (see above). No Retain As Published: live
//!   retained messages arrive with retain = 0 (retained messages sent because of a subscribe
//!   still carry retain = 1). No Maximum Packet Size: see
//!   [`MqttUpstream::spawn_with_downlink`].
//!
//! [`DownlinkAck`]: crate::message::DownlinkAck
//! [`DownlinkAck::ack`]: crate::message::DownlinkAck::ack

pub(crate) mod backoff;
mod client;
pub mod config;
mod echo;
mod sink;
mod subscriptions;

pub use client::{MAX_PUBLISH_BYTES, SEQ_PROPERTY};
pub use config::{
    MqttUpstreamConfig, MqttVersion, SetupError, TlsSettings, UrlError, build_tls_config,
};
pub use sink::{MqttUpstream, UpstreamStats};
pub use subscriptions::MAX_SUBSCRIPTIONS;

// The upstream-neutral verdicts, here too so existing paths keep working.
pub use crate::upstream::{AckReport, Delivery, FailReason, Reconfigured};

impl crate::upstream::Upstream for MqttUpstream {
    fn name(&self) -> &str {
        Self::name(self)
    }

    fn publish_with_seq(
        &self,
        message: crate::message::Message,
        token: Option<u64>,
        seq: Option<u64>,
    ) -> Result<(), FailReason> {
        Self::publish_with_seq(self, message, token, seq)
    }

    fn watch_link(&self) -> tokio::sync::watch::Receiver<bool> {
        Self::watch_link(self)
    }

    fn reset_link(&self) {
        Self::reset_link(self);
    }

    fn link_info(&self) -> std::sync::Arc<crate::telemetry::LinkInfo> {
        Self::link_info(self)
    }
}

impl crate::upstream::Subscriber for MqttUpstream {
    fn name(&self) -> &str {
        Self::name(self)
    }

    fn subscribe(&self, filter: &str, qos: crate::message::Qos) -> Result<(), FailReason> {
        Self::subscribe(self, filter, qos)
    }

    fn unsubscribe(&self, filter: &str) -> Result<(), FailReason> {
        Self::unsubscribe(self, filter)
    }
}
