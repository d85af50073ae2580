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
use crate::telemetry::{BROKER_CLOSED, io_error_summary};

/// Largest `topic + payload` accepted for publishing, in bytes.
///
/// MQTT 3.1.1 clients must be given an outgoing packet limit, and a publish over it would
/// fail the whole connection, so oversized messages are refused up front
/// ([`FailReason::Rejected`]) for both versions.
pub const MAX_PUBLISH_BYTES: usize = 256 * 1024;

/// Headroom for the fixed header, topic length and packet id on top of
/// [`MAX_PUBLISH_BYTES`].
const PACKET_OVERHEAD_BYTES: usize = 16;

/// MQTT 3.1.1 cannot tell the broker `max_downlink_bytes`, and the client's decoder fails the
/// whole connection on a packet over its limit. So the decoder gets this many times
/// `max_downlink_bytes` (at least [`V311_MIN_DECODE_BYTES`]): packets in between are decoded,
/// then acknowledged, dropped and counted, and only bigger ones cost the connection.
const V311_DECODE_FACTOR: usize = 4;

/// Lower bound of the MQTT 3.1.1 decoding limit; see [`V311_DECODE_FACTOR`].
const V311_MIN_DECODE_BYTES: usize = 1024 * 1024;

/// Requests the event loop takes from its queue per iteration and writes with one flush.
///
/// The client's default is one request per iteration, which costs a socket write (and a TCP
/// segment, and usually a separate PUBACK from the broker) per publish. A burst of publishes
/// queued by the gateway in one wake-up now leaves in a few writes, in the same order.
const MAX_REQUEST_BATCH: usize = 256;

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

/// What one `EventLoop::poll` reported, reduced to what the upstream acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    /// A CONNACK accepted the connection.
    Connected,
    /// The broker delivered a message (acknowledged only by [`Client::try_ack`]).
    Publish(IncomingPublish),
    /// Any other packet in or out.
    Other,
}

/// A PUBLISH from the broker, both versions alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IncomingPublish {
    /// The full broker topic, not yet checked for UTF-8.
    pub(crate) topic: Bytes,
    pub(crate) payload: Bytes,
    pub(crate) qos: Qos,
    pub(crate) retain: bool,
    /// Packet id on the current connection (0 for QoS 0).
    pub(crate) pkid: u16,
    /// Size of the whole packet on the wire.
    pub(crate) packet_bytes: usize,
    /// MQTT 5: the subscription identifiers the broker sent this copy for. Empty for MQTT
    /// 3.1.1 and for brokers without subscription identifiers.
    pub(crate) subscription_ids: Vec<usize>,
}

/// Resolves with the broker's SUBACK for one SUBSCRIBE of several filters.
#[derive(Debug)]
pub(crate) enum SubscribeWait {
    V4(v4::SubscribeNotice),
    V5(v5::SubscribeNotice),
}

impl SubscribeWait {
    /// Per filter, in request order: `None` if granted, else the broker's reason. `Err` when
    /// no SUBACK came (the connection ended first), with the client's error for logs.
    pub(crate) async fn outcome(self) -> Result<Vec<Option<&'static str>>, String> {
        match self {
            Self::V4(notice) => match notice.wait_async().await {
                Ok(suback) => Ok(suback
                    .return_codes
                    .iter()
                    .map(|code| match code {
                        v4::SubscribeReasonCode::Success(_) => None,
                        v4::SubscribeReasonCode::Failure => Some("failure"),
                    })
                    .collect()),
                Err(error) => Err(error.to_string()),
            },
            Self::V5(notice) => match notice.wait_async().await {
                Ok(suback) => Ok(suback.return_codes.iter().map(v5_refusal).collect()),
                Err(error) => Err(error.to_string()),
            },
        }
    }
}

/// `None` for a granted MQTT 5 subscription, else a short tag for the reason code.
const fn v5_refusal(code: &v5::SubscribeReasonCode) -> Option<&'static str> {
    use v5::SubscribeReasonCode as Code;
    match code {
        Code::Success(_) => None,
        Code::Failure => Some("failure"),
        Code::Unspecified => Some("unspecified"),
        Code::ImplementationSpecific => Some("implementation_specific"),
        Code::NotAuthorized => Some("not_authorized"),
        Code::TopicFilterInvalid => Some("topic_filter_invalid"),
        Code::PkidInUse => Some("pkid_in_use"),
        Code::QuotaExceeded => Some("quota_exceeded"),
        Code::SharedSubscriptionsNotSupported => Some("shared_subscriptions_not_supported"),
        Code::SubscriptionIdNotSupported => Some("subscription_id_not_supported"),
        Code::WildcardSubscriptionsNotSupported => Some("wildcard_subscriptions_not_supported"),
    }
}

/// Why the connection (or a connection attempt) ended.
#[derive(Debug)]
pub(crate) enum LinkError {
    V4(v4::ConnectionError),
    V5(v5::ConnectionError),
    /// The upstream dropped the connection itself (an acknowledgement took too long).
    Reset,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(error) => error.fmt(f),
            Self::V5(error) => error.fmt(f),
            Self::Reset => f.write_str("connection reset: the broker stopped acknowledging"),
        }
    }
}

impl LinkError {
    /// A short text for the admin listener's link status: what an operator acts on
    /// ("connection refused", "not authorised (CONNACK 0x87)"). Never the credentials: no
    /// variant carries them.
    pub(crate) fn summary(&self) -> String {
        match self {
            Self::V4(error) => match error {
                v4::ConnectionError::Io(e) => io_error_summary(e),
                v4::ConnectionError::Tls(e) => format!("TLS: {e}"),
                v4::ConnectionError::NetworkTimeout | v4::ConnectionError::FlushTimeout => {
                    "network timeout".into()
                }
                v4::ConnectionError::ConnectionRefused(code) => v4_connack_refusal(*code),
                v4::ConnectionError::MqttState(v4::StateError::ConnectionAborted) => {
                    BROKER_CLOSED.into()
                }
                v4::ConnectionError::MqttState(v4::StateError::Io(e)) => io_error_summary(e),
                v4::ConnectionError::MqttState(v4::StateError::AwaitPingResp) => {
                    "broker stopped answering pings".into()
                }
                other => other.to_string(),
            },
            Self::V5(error) => match error {
                v5::ConnectionError::Io(e) => io_error_summary(e),
                v5::ConnectionError::Tls(e) => format!("TLS: {e}"),
                v5::ConnectionError::Timeout(_) => "network timeout".into(),
                v5::ConnectionError::ConnectionRefused(code) => v5_connack_refusal(*code),
                v5::ConnectionError::MqttState(v5::StateError::ConnectionAborted) => {
                    BROKER_CLOSED.into()
                }
                v5::ConnectionError::MqttState(v5::StateError::Io(e)) => io_error_summary(e),
                v5::ConnectionError::MqttState(v5::StateError::AwaitPingResp) => {
                    "broker stopped answering pings".into()
                }
                other => other.to_string(),
            },
            Self::Reset => self.to_string(),
        }
    }
}

fn v4_connack_refusal(code: v4::ConnectReturnCode) -> String {
    use v4::ConnectReturnCode as C;
    let (what, hex) = match code {
        C::Success => ("accepted", 0x00),
        C::RefusedProtocolVersion => ("protocol version refused", 0x01),
        C::BadClientId => ("client id refused", 0x02),
        C::ServiceUnavailable => ("service unavailable", 0x03),
        C::BadUserNamePassword => ("bad user name or password", 0x04),
        C::NotAuthorized => ("not authorised", 0x05),
    };
    format!("{what} (CONNACK 0x{hex:02x})")
}

fn v5_connack_refusal(code: v5::ConnectReturnCode) -> String {
    use v5::ConnectReturnCode as C;
    let (what, hex) = match code {
        C::Success => ("accepted", 0x00),
        C::RefusedProtocolVersion => ("protocol version refused", 0x01),
        C::BadClientId => ("client id refused", 0x02),
        C::ServiceUnavailable => ("service unavailable", 0x03),
        C::UnspecifiedError => ("unspecified error", 0x80),
        C::MalformedPacket => ("malformed packet", 0x81),
        C::ProtocolError => ("protocol error", 0x82),
        C::ImplementationSpecificError => ("implementation specific error", 0x83),
        C::UnsupportedProtocolVersion => ("unsupported protocol version", 0x84),
        C::ClientIdentifierNotValid => ("client id not valid", 0x85),
        C::BadUserNamePassword => ("bad user name or password", 0x86),
        C::NotAuthorized => ("not authorised", 0x87),
        C::ServerUnavailable => ("server unavailable", 0x88),
        C::ServerBusy => ("server busy", 0x89),
        C::Banned => ("banned", 0x8a),
        C::BadAuthenticationMethod => ("bad authentication method", 0x8c),
        C::TopicNameInvalid => ("topic name invalid", 0x90),
        C::PacketTooLarge => ("packet too large", 0x95),
        C::QuotaExceeded => ("quota exceeded", 0x97),
        C::PayloadFormatInvalid => ("payload format invalid", 0x99),
        C::RetainNotSupported => ("retain not supported", 0x9a),
        C::QoSNotSupported => ("QoS not supported", 0x9b),
        C::UseAnotherServer => ("use another server", 0x9c),
        C::ServerMoved => ("server moved", 0x9d),
        C::ConnectionRateExceeded => ("connection rate exceeded", 0x9f),
    };
    format!("{what} (CONNACK 0x{hex:02x})")
}

/// The MQTT 5 user property that carries a spooled message's sequence id.
pub const SEQ_PROPERTY: &str = "sg-seq";

fn v5_options(qos: v5::QoS, retain: bool, seq: Option<u64>) -> v5::PublishOptions {
    let options = v5::PublishOptions::new(qos).retain(retain);
    match seq {
        Some(seq) => options.properties(v5::PublishProperties {
            user_properties: vec![(SEQ_PROPERTY.to_owned(), seq.to_string())],
            ..v5::PublishProperties::default()
        }),
        None => options,
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
            // What the broker will never take: dropping it is the only way not to hold up
            // every message behind it (counted and logged at warn by the drain).
            Self::V5(
                v5::PublishNoticeError::V5PubAck(
                    v5::PubAckReason::NotAuthorized
                    | v5::PubAckReason::TopicNameInvalid
                    | v5::PubAckReason::PayloadFormatInvalid,
                )
                | v5::PublishNoticeError::V5PubRec(
                    v5::PubRecReason::NotAuthorized
                    | v5::PubRecReason::TopicNameInvalid
                    | v5::PubRecReason::PayloadFormatInvalid,
                )
                | v5::PublishNoticeError::RetainNotSupported,
            ) => FailReason::Rejected,
            // Quota exceeded, unspecified or implementation specific errors, packet id
            // trouble: the broker may take the message later, so it is sent again (the spool
            // has already acknowledged it to the sensor). (A failing PUBCOMP never gets here:
            // `Notice::wait` counts it as delivered.)
            Self::V5(
                v5::PublishNoticeError::V5PubAck(_)
                | v5::PublishNoticeError::V5PubRec(_)
                | v5::PublishNoticeError::V5PubComp(_),
            ) => FailReason::BrokerBusy,
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

/// Maps a version's `QoS` onto ours.
macro_rules! from_qos {
    ($module:ident, $qos:expr) => {
        match $qos {
            $module::QoS::AtMostOnce => Qos::AtMostOnce,
            $module::QoS::AtLeastOnce => Qos::AtLeastOnce,
            $module::QoS::ExactlyOnce => Qos::ExactlyOnce,
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
        seq: Option<u64>,
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
                .try_publish(topic, payload, v5_options(qos!(v5, qos), retain, seq))
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
        seq: Option<u64>,
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
                .try_publish_tracked(topic, payload, v5_options(qos!(v5, qos), retain, seq))
                .map(Notice::V5)
                .map_err(|e| submit_error!(v5, e)),
        }
    }

    /// Queues the PUBACK (QoS 1) or PUBREC (QoS 2) of the incoming publish `pkid` received on
    /// the current connection. The client fails the connection on an ack for a packet id it
    /// does not hold, so the caller must make sure the id belongs to the current connection.
    pub(crate) fn try_ack(&self, pkid: u16, qos: Qos) -> Result<(), SubmitError> {
        match (self, qos) {
            (_, Qos::AtMostOnce) => Ok(()),
            (Self::V4(client), Qos::AtLeastOnce) => client
                .try_manual_ack(v4::ManualAck::PubAck(v4::PubAck::new(pkid)))
                .map_err(|e| submit_error!(v4, e)),
            (Self::V4(client), Qos::ExactlyOnce) => client
                .try_manual_ack(v4::ManualAck::PubRec(v4::PubRec::new(pkid)))
                .map_err(|e| submit_error!(v4, e)),
            (Self::V5(client), Qos::AtLeastOnce) => client
                .try_manual_ack(v5::ManualAck::PubAck(v5::PubAck::new(pkid, None)))
                .map_err(|e| submit_error!(v5, e)),
            (Self::V5(client), Qos::ExactlyOnce) => client
                .try_manual_ack(v5::ManualAck::PubRec(v5::PubRec::new(pkid, None)))
                .map_err(|e| submit_error!(v5, e)),
        }
    }

    /// Whether SUBSCRIBE carries a subscription identifier (MQTT 5), which then applies to
    /// every filter of the packet.
    pub(crate) const fn has_subscription_ids(&self) -> bool {
        matches!(self, Self::V5(_))
    }

    /// Queues one SUBSCRIBE for `filters` (full broker filters, already validated).
    ///
    /// MQTT 5 subscribes with subscription identifier `id`, No Local (the upstream's own
    /// publishes do not come back), Retain As Published (live retained messages keep their
    /// flag) and Retain Handling 1 (retained messages are sent for a new subscription, not
    /// again when a QoS change resubscribes). MQTT 3.1.1 has none of these options and
    /// ignores `id`.
    pub(crate) fn try_subscribe_many(
        &self,
        filters: &[(String, Qos)],
        id: Option<usize>,
    ) -> Result<SubscribeWait, SubmitError> {
        match self {
            Self::V4(client) => client
                .try_subscribe_many_tracked(
                    filters
                        .iter()
                        .map(|(filter, qos)| v4::SubscribeFilterInput::new(filter, qos!(v4, qos))),
                )
                .map(SubscribeWait::V4)
                .map_err(|e| submit_error!(v4, e)),
            Self::V5(client) => client
                .try_subscribe_many_with_properties_tracked(
                    filters.iter().map(|(filter, qos)| {
                        v5::SubscribeFilterInput::new(filter, qos!(v5, qos))
                            .no_local(true)
                            .preserve_retain(true)
                            .retain_forward_rule(v5::RetainForwardRule::OnNewSubscribe)
                    }),
                    v5::SubscribeProperties {
                        id,
                        user_properties: Vec::new(),
                    },
                )
                .map(SubscribeWait::V5)
                .map_err(|e| submit_error!(v5, e)),
        }
    }

    /// Queues one UNSUBSCRIBE for `filters` (full broker filters).
    pub(crate) fn try_unsubscribe_many(&self, filters: &[String]) -> Result<(), SubmitError> {
        match self {
            Self::V4(client) => client
                .try_unsubscribe_many(filters.iter().map(String::as_str))
                .map_err(|e| submit_error!(v4, e)),
            Self::V5(client) => client
                .try_unsubscribe_many(filters.iter().map(String::as_str))
                .map_err(|e| submit_error!(v5, e)),
        }
    }

    /// Asks the event loop to wait up to `drain` for in-flight publishes, then send
    /// DISCONNECT. Returns whether the request was queued.
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
            Self::V5(notice) => match notice.wait_completion_async().await {
                // A PUBCOMP follows only a successful PUBREC, after which the broker owns the
                // message (MQTT 5 4.3.3): whatever its reason code, sending it again would
                // only duplicate it.
                Err(v5::PublishNoticeError::V5PubComp(reason)) => {
                    tracing::debug!(
                        ?reason,
                        "PUBCOMP with a failure reason; the broker has the message."
                    );
                    Ok(())
                }
                other => other.map(drop).map_err(NoticeError::V5),
            },
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
    /// Drops the current connection (the next `poll` reconnects); what was in flight on it
    /// fails like on any connection loss.
    pub(crate) fn reset(&mut self) {
        match self {
            Self::V4(eventloop) => eventloop.clean(),
            Self::V5(eventloop) => eventloop.clean(),
        }
    }

    /// Drives the connection one step; after an error the next call reconnects.
    ///
    /// Not cancel safe in general (it may be cut off mid-write), so the upstream never drops
    /// an unfinished call except on shutdown or a [`Self::reset`]. The client cleans up a lost
    /// connection (drops queued acknowledgements, replays nothing on the clean session) inside
    /// the same call that returns its error.
    pub(crate) async fn poll(&mut self) -> Result<LinkEvent, LinkError> {
        match self {
            Self::V4(eventloop) => match eventloop.poll().await {
                Ok(v4::Event::Incoming(v4::Packet::ConnAck(_))) => Ok(LinkEvent::Connected),
                Ok(v4::Event::Incoming(v4::Packet::Publish(publish))) => {
                    Ok(LinkEvent::Publish(IncomingPublish {
                        packet_bytes: publish.size(),
                        qos: from_qos!(v4, publish.qos),
                        retain: publish.retain,
                        pkid: publish.pkid,
                        topic: publish.topic,
                        payload: publish.payload,
                        subscription_ids: Vec::new(),
                    }))
                }
                Ok(_) => Ok(LinkEvent::Other),
                Err(error) => Err(LinkError::V4(error)),
            },
            Self::V5(eventloop) => match eventloop.poll().await {
                Ok(v5::Event::Incoming(v5::Packet::ConnAck(_))) => Ok(LinkEvent::Connected),
                Ok(v5::Event::Incoming(v5::Packet::Publish(publish))) => {
                    Ok(LinkEvent::Publish(IncomingPublish {
                        packet_bytes: publish.size(),
                        qos: from_qos!(v5, publish.qos),
                        retain: publish.retain,
                        pkid: publish.pkid,
                        topic: publish.topic,
                        payload: publish.payload,
                        subscription_ids: publish
                            .properties
                            .map(|p| p.subscription_identifiers)
                            .unwrap_or_default(),
                    }))
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
/// publish as failed, and the spool, not the client library, resends. Incoming QoS >= 1
/// publishes are acknowledged manually (`DownlinkAck`), never by the client on its own.
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
            options.set_max_request_batch(MAX_REQUEST_BATCH);
            options
                .try_set_clean_session(true)
                .map_err(|e| client_error(&e))?;
            options
                .try_set_inflight(config.max_inflight)
                .map_err(|e| client_error(&e))?;
            options.set_max_packet_size(
                v311_decode_limit(config.max_downlink_bytes),
                MAX_PUBLISH_BYTES + PACKET_OVERHEAD_BYTES,
            );
            // Downlink is acknowledged by the gateway once it holds the message (`DownlinkAck`).
            options.set_ack_mode(v4::AckMode::Manual);
            if let Some(will) = config.presence.as_ref().map(|p| &p.will) {
                options.set_last_will(v4::LastWill::new(
                    will_topic(config, &will.topic),
                    will.payload.to_vec(),
                    qos!(v4, will.qos),
                    will.retain,
                ));
            }
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
            // Writes are already batched (`MAX_REQUEST_BATCH`); Nagle would only hold back the
            // last segment of a batch until the broker acknowledges the previous one.
            network.set_tcp_nodelay(true);
            eventloop.set_network_options(network);
            Ok((Client::V4(client), EventLoop::V4(Box::new(eventloop))))
        }
        MqttVersion::V5 => {
            let mut options =
                v5::MqttOptions::new(config.client_id.clone(), (config.host.clone(), config.port));
            options.set_keep_alive(keep_alive);
            options.set_max_request_batch(MAX_REQUEST_BATCH);
            options.set_clean_start(true);
            // No session survives the connection (session expiry 0 is the MQTT 5 default).
            options.set_session_expiry_interval(None);
            options.set_outgoing_inflight_upper_limit(config.max_inflight);
            options.set_connect_timeout(config.connect_timeout);
            // As for MQTT 3.1.1: writes are batched, Nagle would only delay them.
            let mut network = options.network_options();
            network.set_tcp_nodelay(true);
            options.set_network_options(network);
            // Downlink is acknowledged by the gateway once it holds the message (`DownlinkAck`).
            options.set_ack_mode(v5::AckMode::Manual);
            // Maximum Packet Size: the broker must not send bigger packets (it drops them);
            // the client's decoder enforces the same limit.
            let max_packet = u32::try_from(config.max_downlink_bytes).map_err(|_| {
                SetupError::InvalidConfig {
                    field: "max_downlink_bytes",
                    reason: "must not exceed the MQTT packet size limit (268435460)",
                }
            })?;
            options.set_max_packet_size(Some(max_packet));
            // Receive Maximum: at most this many unacknowledged QoS >= 1 deliveries.
            options.set_receive_maximum(Some(config.max_unacked_downlinks));
            if let Some(will) = config.presence.as_ref().map(|p| &p.will) {
                options.set_last_will(v5::LastWill::new(
                    will_topic(config, &will.topic),
                    will.payload.to_vec(),
                    qos!(v5, will.qos),
                    will.retain,
                    None,
                ));
            }
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

/// The broker topic of the Will: `remote_prefix` + its topic, as for every publish.
fn will_topic(config: &MqttUpstreamConfig, topic: &str) -> String {
    format!("{}{topic}", config.remote_prefix)
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

/// The MQTT 3.1.1 decoder's limit on a packet's remaining length; see
/// [`V311_DECODE_FACTOR`].
fn v311_decode_limit(max_downlink_bytes: usize) -> usize {
    max_downlink_bytes
        .saturating_mul(V311_DECODE_FACTOR)
        .max(V311_MIN_DECODE_BYTES)
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
    use crate::topic;

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
    fn the_v311_decode_limit_leaves_room_to_drop_oversized_downlinks() {
        assert_eq!(v311_decode_limit(1024), V311_MIN_DECODE_BYTES);
        assert_eq!(
            v311_decode_limit(1024 * 1024),
            V311_DECODE_FACTOR * 1024 * 1024
        );
        assert_eq!(v311_decode_limit(usize::MAX), usize::MAX);
    }

    /// The one validator ([`crate::topic`]) is never laxer than the client's, which would
    /// refuse the request; it is stricter only on control characters.
    #[test]
    fn the_topic_validator_is_at_least_as_strict_as_the_client() {
        let long = "x".repeat(70_000);
        for filter in [
            "site/a/+/temp",
            "site/#",
            "#",
            "a//b",
            "site/#/x",
            "site/a+",
            "",
            "nul\0byte",
            &long,
        ] {
            assert_eq!(
                topic::is_valid_filter(filter),
                v5::ValidatedTopicFilter::new(filter).is_ok(),
                "{filter:.20}"
            );
        }
        assert!(v5::ValidatedTopicFilter::new("bell\u{7}").is_ok());
        assert!(!topic::is_valid_filter("bell\u{7}"));
    }

    #[test]
    fn oversized_publishes_are_refused_before_the_client() {
        let payload = Bytes::from(vec![0u8; MAX_PUBLISH_BYTES]);
        assert_eq!(check_size("t", &payload), Err(SubmitError::Invalid));
        assert_eq!(check_size("", &payload), Ok(()));
    }

    #[test]
    fn broker_refusals_for_now_are_sent_again_and_only_lasting_ones_drop() {
        use v5::{PubAckReason as Ack, PubRecReason as Rec};
        let ack = |r| NoticeError::V5(v5::PublishNoticeError::V5PubAck(r)).reason();
        let rec = |r| NoticeError::V5(v5::PublishNoticeError::V5PubRec(r)).reason();
        for r in [
            Ack::QuotaExceeded,
            Ack::UnspecifiedError,
            Ack::ImplementationSpecificError,
            Ack::PacketIdentifierInUse,
        ] {
            assert_eq!(ack(r), FailReason::BrokerBusy, "{r:?}");
            assert!(ack(r).is_recoverable());
        }
        for r in [Rec::QuotaExceeded, Rec::UnspecifiedError] {
            assert_eq!(rec(r), FailReason::BrokerBusy, "{r:?}");
        }
        for r in [
            Ack::NotAuthorized,
            Ack::TopicNameInvalid,
            Ack::PayloadFormatInvalid,
        ] {
            assert_eq!(ack(r), FailReason::Rejected, "{r:?}");
        }
        assert_eq!(rec(Rec::TopicNameInvalid), FailReason::Rejected);
    }
}
