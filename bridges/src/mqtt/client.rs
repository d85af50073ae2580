//! The MQTT 3.1.1 / MQTT 5 difference, in one place.
//!
//! `rumqttc-v4-next` and `rumqttc-v5-next` have the same shape (an `AsyncClient` handle, an
//! `EventLoop` to poll, tracked publishes returning a `PublishNotice`) but distinct types. The
//! enums here wrap both and expose only what the upstream needs, so the connection and
//! acknowledgement logic in `sink.rs` exists once. Each method is a two-arm `match`; nothing
//! but option mapping and error translation lives here.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc_v4 as v4;
use rumqttc_v5 as v5;

use super::config::{MqttUpstreamConfig, MqttVersion, SetupError};
use super::{Delivery, FailReason};
use crate::message::Qos;

/// Largest `topic + payload` accepted for publishing, in bytes.
///
/// MQTT 3.1.1 clients must be given an outgoing packet limit, and a publish over it would
/// fail the whole connection, so oversized messages are refused up front
/// ([`FailReason::Rejected`]) for both versions.
pub const MAX_PUBLISH_BYTES: usize = 256 * 1024;

/// Headroom for the fixed header, topic length and packet id on top of
/// [`MAX_PUBLISH_BYTES`].
const PACKET_OVERHEAD_BYTES: usize = 16;

/// Limit on packets from the broker: the upstream subscribes to nothing, so only small
/// acknowledgements arrive.
const MAX_INCOMING_PACKET_BYTES: usize = 16 * 1024;

/// Handle used to queue requests into the event loop (cheap to clone).
#[derive(Clone, Debug)]
pub(crate) enum Client {
    V4(v4::AsyncClient),
    V5(v5::AsyncClient),
}

/// The connection driver; must be polled continuously by exactly one task.
pub(crate) enum EventLoop {
    V4(Box<v4::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// Resolves once the broker acknowledged a tracked publish or the client gave up on it.
#[derive(Debug)]
pub(crate) enum Notice {
    V4(v4::PublishNotice),
    V5(v5::PublishNotice),
}

macro_rules! qos_from {
    ($module:ident, $qos:expr) => {
        match $qos {
            $module::QoS::AtMostOnce => Qos::AtMostOnce,
            $module::QoS::AtLeastOnce => Qos::AtLeastOnce,
            $module::QoS::ExactlyOnce => Qos::ExactlyOnce,
        }
    };
}

/// What one `EventLoop::poll` reported, reduced to what the upstream acts on.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// A CONNACK accepted the connection.
    Connected,
    /// A PUBLISH from the broker (manual acknowledgement mode: see [`Client::prepare_ack`]).
    /// Boxed: a v5 PUBLISH with its properties is large next to the other variants.
    Publish(Box<IncomingPublish>),
    /// Any other packet in or out.
    Other,
}

/// A PUBLISH received from the broker.
#[derive(Debug)]
pub(crate) enum IncomingPublish {
    V4(v4::Publish),
    V5(v5::Publish),
}

impl IncomingPublish {
    /// Topic, payload, QoS and retain flag, whatever the protocol version.
    pub(crate) fn parts(&self) -> (&Bytes, &Bytes, Qos, bool) {
        match self {
            Self::V4(p) => (&p.topic, &p.payload, qos_from!(v4, p.qos), p.retain),
            Self::V5(p) => (&p.topic, &p.payload, qos_from!(v5, p.qos), p.retain),
        }
    }
}

/// An acknowledgement to send later for a QoS 1/2 incoming PUBLISH.
#[derive(Debug)]
pub(crate) enum PendingAck {
    V4(v4::AsyncClient, v4::ManualAck),
    V5(v5::AsyncClient, v5::ManualAck),
}

impl PendingAck {
    /// Queues it without blocking. A full request queue or a stale packet id (the connection
    /// it belongs to is gone) is ignored: the broker then redelivers, or already forgot.
    pub(crate) fn send(self) {
        match self {
            Self::V4(client, ack) => drop(client.try_manual_ack(ack)),
            Self::V5(client, ack) => drop(client.try_manual_ack(ack)),
        }
    }
}

/// Why the connection (or a connection attempt) ended.
#[derive(Debug)]
pub(crate) enum LinkError {
    V4(v4::ConnectionError),
    V5(v5::ConnectionError),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(error) => error.fmt(f),
            Self::V5(error) => error.fmt(f),
        }
    }
}

/// Why a tracked publish was not acknowledged, with the client library's own error for logs.
#[derive(Debug)]
pub(crate) enum NoticeError {
    V4(v4::PublishNoticeError),
    V5(v5::PublishNoticeError),
}

impl fmt::Display for NoticeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(error) => error.fmt(f),
            Self::V5(error) => error.fmt(f),
        }
    }
}

impl NoticeError {
    /// The failure reported to the gateway.
    pub(crate) fn reason(&self) -> FailReason {
        match self {
            // The notice sender is dropped only when the event loop discards requests it
            // never processed, which happens on shutdown.
            Self::V4(v4::PublishNoticeError::Recv) | Self::V5(v5::PublishNoticeError::Recv) => {
                FailReason::Shutdown
            }
            Self::V4(v4::PublishNoticeError::SessionReset)
            | Self::V5(v5::PublishNoticeError::SessionReset) => FailReason::SessionReset,
            Self::V5(
                v5::PublishNoticeError::V5PubAck(_)
                | v5::PublishNoticeError::V5PubRec(_)
                | v5::PublishNoticeError::V5PubComp(_)
                | v5::PublishNoticeError::RetainNotSupported,
            ) => FailReason::Rejected,
            Self::V4(v4::PublishNoticeError::Qos0NotFlushed)
            | Self::V5(v5::PublishNoticeError::Qos0NotFlushed) => FailReason::Disconnected,
            // Lost local session state (persistence, replay): the broker never confirmed it.
            Self::V4(_) | Self::V5(_) => FailReason::SessionReset,
        }
    }
}

/// Why a request could not be queued into the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubmitError {
    /// The request channel (`request_queue`) is full.
    Full,
    /// The event loop is gone (shutdown).
    Closed,
    /// The client refused the request (invalid topic).
    Invalid,
}

impl From<SubmitError> for FailReason {
    fn from(error: SubmitError) -> Self {
        match error {
            SubmitError::Full => Self::QueueFull,
            SubmitError::Closed => Self::Shutdown,
            SubmitError::Invalid => Self::Rejected,
        }
    }
}

/// Maps both versions' `ClientError` (same variants, distinct types).
macro_rules! submit_error {
    ($module:ident, $error:expr) => {
        match $error {
            $module::ClientError::RequestChannelFull(_) => SubmitError::Full,
            $module::ClientError::RequestChannelDisconnected(_) => SubmitError::Closed,
            _ => SubmitError::Invalid,
        }
    };
}

/// Maps our QoS onto a version's `QoS` (same variants, distinct types).
macro_rules! qos {
    ($module:ident, $qos:expr) => {
        match $qos {
            Qos::AtMostOnce => $module::QoS::AtMostOnce,
            Qos::AtLeastOnce => $module::QoS::AtLeastOnce,
            Qos::ExactlyOnce => $module::QoS::ExactlyOnce,
        }
    };
}

impl Client {
    /// Queues a publish without tracking; fails at once if the request channel is full.
    pub(crate) fn try_publish(
        &self,
        topic: String,
        payload: Bytes,
        qos: Qos,
        retain: bool,
    ) -> Result<(), SubmitError> {
        check_size(&topic, &payload)?;
        match self {
            Self::V4(client) => client
                .try_publish(
                    topic,
                    payload,
                    v4::PublishOptions::new(qos!(v4, qos)).retain(retain),
                )
                .map_err(|e| submit_error!(v4, e)),
            Self::V5(client) => client
                .try_publish(
                    topic,
                    payload,
                    v5::PublishOptions::new(qos!(v5, qos)).retain(retain),
                )
                .map_err(|e| submit_error!(v5, e)),
        }
    }

    /// Queues a publish whose broker acknowledgement resolves the returned notice.
    pub(crate) fn try_publish_tracked(
        &self,
        topic: String,
        payload: Bytes,
        qos: Qos,
        retain: bool,
    ) -> Result<Notice, SubmitError> {
        check_size(&topic, &payload)?;
        match self {
            Self::V4(client) => client
                .try_publish_tracked(
                    topic,
                    payload,
                    v4::PublishOptions::new(qos!(v4, qos)).retain(retain),
                )
                .map(Notice::V4)
                .map_err(|e| submit_error!(v4, e)),
            Self::V5(client) => client
                .try_publish_tracked(
                    topic,
                    payload,
                    v5::PublishOptions::new(qos!(v5, qos)).retain(retain),
                )
                .map(Notice::V5)
                .map_err(|e| submit_error!(v5, e)),
        }
    }

    /// Asks the event loop to wait up to `drain` for in-flight publishes, then send
    /// DISCONNECT. Returns whether the request was queued.
    /// Queues one SUBSCRIBE for `filters` (remote filters, prefix applied). MQTT 5 subscribes
    /// with retain-as-published so live retained updates keep their flag.
    pub(crate) fn try_subscribe(&self, filters: &[(String, Qos)]) -> Result<(), SubmitError> {
        if filters.is_empty() {
            return Ok(());
        }
        match self {
            Self::V4(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| v4::SubscribeFilter::new(f.clone(), qos!(v4, *q))),
                )
                .map_err(|e| submit_error!(v4, e)),
            Self::V5(client) => client
                .try_subscribe_many(filters.iter().map(|(f, q)| {
                    v5::SubscribeFilterInput::new(f.clone(), qos!(v5, *q)).preserve_retain(true)
                }))
                .map_err(|e| submit_error!(v5, e)),
        }
    }

    /// Queues an UNSUBSCRIBE for one remote filter.
    pub(crate) fn try_unsubscribe(&self, filter: &str) -> Result<(), SubmitError> {
        match self {
            Self::V4(client) => client
                .try_unsubscribe(filter.to_owned())
                .map_err(|e| submit_error!(v4, e)),
            Self::V5(client) => client
                .try_unsubscribe(filter.to_owned())
                .map_err(|e| submit_error!(v5, e)),
        }
    }

    /// The acknowledgement to send for `publish` once the gateway holds it (QoS 1/2).
    pub(crate) fn prepare_ack(&self, publish: &IncomingPublish) -> Option<PendingAck> {
        match (self, publish) {
            (Self::V4(client), IncomingPublish::V4(p)) => client
                .prepare_ack(p)
                .map(|a| PendingAck::V4(client.clone(), a)),
            (Self::V5(client), IncomingPublish::V5(p)) => client
                .prepare_ack(p)
                .map(|a| PendingAck::V5(client.clone(), a)),
            _ => None,
        }
    }

    pub(crate) fn try_disconnect(&self, drain: Duration) -> bool {
        match self {
            Self::V4(client) => client.try_disconnect_with_timeout(drain).is_ok(),
            Self::V5(client) => client.try_disconnect_with_timeout(drain).is_ok(),
        }
    }
}

/// Refuses messages over [`MAX_PUBLISH_BYTES`] before they reach the client.
fn check_size(topic: &str, payload: &Bytes) -> Result<(), SubmitError> {
    if topic.len().saturating_add(payload.len()) > MAX_PUBLISH_BYTES {
        return Err(SubmitError::Invalid);
    }
    Ok(())
}

impl Notice {
    /// Waits for the broker: `Ok` after PUBACK / PUBCOMP (MQTT 5: with a success reason code).
    pub(crate) async fn wait(self) -> Result<(), NoticeError> {
        match self {
            Self::V4(notice) => notice.wait_async().await.map(drop).map_err(NoticeError::V4),
            // `wait_completion_async` turns failing v5 reason codes into errors; "no matching
            // subscribers" counts as delivered.
            Self::V5(notice) => notice
                .wait_completion_async()
                .await
                .map_err(NoticeError::V5),
        }
    }

    /// [`Self::wait`] as the outcome reported to the gateway.
    pub(crate) async fn delivery(self) -> (Delivery, Option<NoticeError>) {
        match self.wait().await {
            Ok(()) => (Delivery::Acknowledged, None),
            Err(error) => (Delivery::Failed(error.reason()), Some(error)),
        }
    }
}

impl EventLoop {
    /// Drives the connection one step; after an error the next call reconnects.
    pub(crate) async fn poll(&mut self) -> Result<LinkEvent, LinkError> {
        match self {
            Self::V4(eventloop) => match eventloop.poll().await {
                Ok(v4::Event::Incoming(v4::Packet::ConnAck(_))) => Ok(LinkEvent::Connected),
                Ok(v4::Event::Incoming(v4::Packet::Publish(p))) => {
                    Ok(LinkEvent::Publish(Box::new(IncomingPublish::V4(p))))
                }
                Ok(_) => Ok(LinkEvent::Other),
                Err(error) => Err(LinkError::V4(error)),
            },
            Self::V5(eventloop) => match eventloop.poll().await {
                Ok(v5::Event::Incoming(v5::Packet::ConnAck(_))) => Ok(LinkEvent::Connected),
                Ok(v5::Event::Incoming(v5::Packet::Publish(p))) => {
                    Ok(LinkEvent::Publish(Box::new(IncomingPublish::V5(p))))
                }
                Ok(_) => Ok(LinkEvent::Other),
                Err(error) => Err(LinkError::V5(error)),
            },
        }
    }
}

/// Creates the client pair for `config`; `tls` is the prepared rustls config of `mqtts://`.
///
/// Clean session / clean start is always on: this module reports every unacknowledged
/// publish as failed, and the spool, not the client library, resends.
pub(crate) fn build(
    config: &MqttUpstreamConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(Client, EventLoop), SetupError> {
    let keep_alive = config.keep_alive_secs().ok_or(SetupError::InvalidConfig {
        field: "keep_alive",
        reason: "must be whole seconds, at most 65535 s",
    })?;
    let client_error = |e: &dyn fmt::Display| SetupError::Client(e.to_string());
    match config.version {
        MqttVersion::V311 => {
            let mut options =
                v4::MqttOptions::new(config.client_id.clone(), (config.host.clone(), config.port));
            options.set_keep_alive(keep_alive);
            // Downlink is acknowledged by the gateway once it holds the message.
            options.set_ack_mode(v4::AckMode::Manual);
            options
                .try_set_clean_session(true)
                .map_err(|e| client_error(&e))?;
            options
                .try_set_inflight(config.max_inflight)
                .map_err(|e| client_error(&e))?;
            options.set_max_packet_size(
                MAX_INCOMING_PACKET_BYTES,
                MAX_PUBLISH_BYTES + PACKET_OVERHEAD_BYTES,
            );
            match (&config.username, &config.password) {
                (Some(user), Some(password)) => {
                    options.set_credentials(user.clone(), Bytes::from(password.clone()));
                }
                (Some(user), None) => {
                    options.set_username(user.clone());
                }
                (None, Some(_)) => {
                    return Err(SetupError::InvalidConfig {
                        field: "password",
                        reason: "MQTT 3.1.1 needs a username with a password",
                    });
                }
                (None, None) => {}
            }
            if let Some(tls) = tls {
                options.set_transport(v4::Transport::tls_with_config(
                    v4::TlsConfiguration::Rustls(tls),
                ));
            }
            options.set_socket_connector(|address, network| {
                v4::default_socket_connect(bracket_ipv6(address), network)
            });
            let (client, mut eventloop) = v4::AsyncClient::builder(options)
                .capacity(config.request_queue)
                .try_build()
                .map_err(|e| client_error(&e))?;
            // MQTT 3.1.1 takes the connect timeout from the event loop's network options, in
            // whole seconds: round up so a sub-second setting never becomes "no time at all".
            let mut network = eventloop.network_options();
            network.set_connection_timeout(ceil_secs(config.connect_timeout));
            eventloop.set_network_options(network);
            Ok((Client::V4(client), EventLoop::V4(Box::new(eventloop))))
        }
        MqttVersion::V5 => {
            let mut options =
                v5::MqttOptions::new(config.client_id.clone(), (config.host.clone(), config.port));
            options.set_keep_alive(keep_alive);
            options.set_ack_mode(v5::AckMode::Manual);
            options.set_clean_start(true);
            // No session survives the connection (session expiry 0 is the MQTT 5 default).
            options.set_session_expiry_interval(None);
            options.set_outgoing_inflight_upper_limit(config.max_inflight);
            options.set_connect_timeout(config.connect_timeout);
            match (&config.username, &config.password) {
                (Some(user), Some(password)) => {
                    options.set_credentials(user.clone(), Bytes::from(password.clone()));
                }
                (Some(user), None) => {
                    options.set_username(user.clone());
                }
                (None, Some(password)) => {
                    options.set_password(Bytes::from(password.clone()));
                }
                (None, None) => {}
            }
            if let Some(tls) = tls {
                options.set_transport(v5::Transport::tls_with_config(
                    v5::TlsConfiguration::Rustls(tls),
                ));
            }
            options.set_socket_connector(|address, network| {
                v5::default_socket_connect(bracket_ipv6(address), network)
            });
            let (client, eventloop) = v5::AsyncClient::builder(options)
                .capacity(config.request_queue)
                .try_build()
                .map_err(|e| client_error(&e))?;
            Ok((Client::V5(client), EventLoop::V5(Box::new(eventloop))))
        }
    }
}

/// The client dials `format!("{host}:{port}")`; an IPv6 literal needs brackets there, but
/// not in the TLS server name, so hosts are stored bare and bracketed only for dialing.
fn bracket_ipv6(address: String) -> String {
    match address.rsplit_once(':') {
        Some((host, port)) if host.contains(':') && !host.starts_with('[') => {
            format!("[{host}]:{port}")
        }
        _ => address,
    }
}

/// Whole seconds, rounded up, at least 1.
fn ceil_secs(duration: Duration) -> u64 {
    let secs = duration.as_secs();
    if duration.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_literals_are_bracketed_for_dialing_only() {
        assert_eq!(bracket_ipv6("::1:1883".into()), "[::1]:1883");
        assert_eq!(
            bracket_ipv6("2001:db8::7:8883".into()),
            "[2001:db8::7]:8883"
        );
        assert_eq!(bracket_ipv6("[::1]:1883".into()), "[::1]:1883");
        assert_eq!(bracket_ipv6("127.0.0.1:1883".into()), "127.0.0.1:1883");
        assert_eq!(
            bracket_ipv6("broker.example:1883".into()),
            "broker.example:1883"
        );
    }

    #[test]
    fn connect_timeout_rounds_up_to_whole_seconds() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(10)), 10);
    }

    #[test]
    fn oversized_publishes_are_refused_before_the_client() {
        let payload = Bytes::from(vec![0u8; MAX_PUBLISH_BYTES]);
        assert_eq!(check_size("t", &payload), Err(SubmitError::Invalid));
        assert_eq!(check_size("", &payload), Ok(()));
    }
}
