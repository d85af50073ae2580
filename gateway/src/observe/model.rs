//! What every southbound protocol reports to the admin listener, in one protocol-neutral
//! shape: plain data, no IO, so a sans-IO core may build it.
//!
//! Each ingress (the MQTT-SN driver today; CoAP, HTTP and serial later) answers
//! [`IngressQuery`]s on its own bounded channel, from its own task, between two turns of its
//! loop: the session table keeps its one owner, and a scrape costs the hot path nothing
//! until it is asked.

use std::fmt;

use serde::Serialize;
use tokio::sync::oneshot;

/// Where a session is in its life, as the admin listener names it (the MQTT-SN client
/// states of spec 6.14, plus the CONNECT handshake and a persistent session without a
/// connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// CONNECT received, Will exchange in progress.
    Connecting,
    /// Connected and supervised by keep-alive.
    Active,
    /// Sleeping; downlink is buffered.
    Asleep,
    /// Woken up to receive its buffered downlink.
    Awake,
    /// A persistent session whose client disconnected cleanly, kept for its return.
    Disconnected,
    /// A persistent session whose client was lost (keep-alive, sleep timer or retries
    /// exhausted), kept for its return.
    Lost,
}

impl SessionState {
    /// Every state, in the order metrics and tables list them.
    pub const ALL: [SessionState; 6] = [
        SessionState::Connecting,
        SessionState::Active,
        SessionState::Asleep,
        SessionState::Awake,
        SessionState::Disconnected,
        SessionState::Lost,
    ];

    /// The label value (`active`, `asleep` ...).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionState::Connecting => "connecting",
            SessionState::Active => "active",
            SessionState::Asleep => "asleep",
            SessionState::Awake => "awake",
            SessionState::Disconnected => "disconnected",
            SessionState::Lost => "lost",
        }
    }

    /// The state named `name` ([`Self::as_str`]).
    #[must_use]
    pub fn parse(name: &str) -> Option<SessionState> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sessions per state (index: position in [`SessionState::ALL`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounts(pub [u64; 6]);

impl SessionCounts {
    /// Counts one more session in `state`.
    pub fn add(&mut self, state: SessionState) {
        if let Some(n) = self.0.get_mut(state as usize) {
            *n += 1;
        }
    }

    /// Sessions in `state`.
    #[must_use]
    pub fn get(&self, state: SessionState) -> u64 {
        self.0.get(state as usize).copied().unwrap_or(0)
    }

    /// Every session.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Why an uplink message or request was refused (a protocol return code went back, or the
/// packet was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The spool is full, its writer's queue is full, or a limit of the gateway's tables
    /// was reached (MQTT-SN rc 0x01).
    Congestion,
    /// The topic (id) is unknown or invalid (MQTT-SN rc 0x02).
    InvalidTopic,
    /// No route takes the topic, or the sender may not use it (MQTT-SN rc 0x03).
    NotAllowed,
    /// Larger than the configured maximum.
    TooLarge,
    /// Not a well-formed packet.
    Malformed,
    /// A forwarder encapsulation (MQTT-SN 0xFE) from a source that may not relay (a UDP source
    /// not in `[mqttsn] forwarders`), dropped unanswered. (A serial line that is not a
    /// forwarder's drops such frames itself and counts them with the line.)
    ForwarderNotAllowed,
}

impl RefusalReason {
    /// How many reasons there are (the length of the per-reason counter arrays).
    pub const COUNT: usize = 6;

    /// Every reason, in the order metrics list them (a counter array's index is the reason's
    /// position here, which is its discriminant).
    pub const ALL: [RefusalReason; RefusalReason::COUNT] = [
        RefusalReason::Congestion,
        RefusalReason::InvalidTopic,
        RefusalReason::NotAllowed,
        RefusalReason::TooLarge,
        RefusalReason::Malformed,
        RefusalReason::ForwarderNotAllowed,
    ];

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Congestion => "congestion",
            RefusalReason::InvalidTopic => "invalid_topic",
            RefusalReason::NotAllowed => "not_allowed",
            RefusalReason::TooLarge => "too_large",
            RefusalReason::Malformed => "malformed",
            RefusalReason::ForwarderNotAllowed => "forwarder_not_allowed",
        }
    }
}

/// Why a downlink message was not delivered to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DownlinkDropReason {
    /// The client's queue (a sleeping or slow client) was full, or another bound of the
    /// client's (MQTT-SN: its topic table, so the topic could not be registered with it).
    QueueFull,
    /// The client refused it (a REGACK or PUBACK with an error code).
    Rejected,
    /// Larger than the client's packets may be.
    TooLarge,
    /// Retransmissions exhausted, or the session ended with it queued, or it could not be
    /// kept for a session without a connection (MQTT-SN: QoS 0).
    Expired,
}

impl DownlinkDropReason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [DownlinkDropReason; 4] = [
        DownlinkDropReason::QueueFull,
        DownlinkDropReason::Rejected,
        DownlinkDropReason::TooLarge,
        DownlinkDropReason::Expired,
    ];

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            DownlinkDropReason::QueueFull => "queue_full",
            DownlinkDropReason::Rejected => "rejected",
            DownlinkDropReason::TooLarge => "too_large",
            DownlinkDropReason::Expired => "expired",
        }
    }
}

/// An ingress's counters, monotonically increasing since the process started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngressCounters {
    /// Accepted uplink messages per QoS: index 0 is QoS -1, then 0, 1, 2 (protocols without
    /// a level leave it 0).
    pub messages_in: [u64; 4],
    /// Acknowledgements of accepted uplink (PUBACK accepted, CoAP 2.04, HTTP 2xx), sent
    /// once durable for QoS >= 1.
    pub acks: u64,
    /// Refusals per reason (index: position in [`RefusalReason::ALL`]).
    pub refusals: [u64; RefusalReason::COUNT],
    /// Downlink messages delivered to clients (acknowledged by them for QoS >= 1, sent for
    /// QoS 0).
    pub downlink_delivered: u64,
    /// Downlink retransmissions to clients.
    pub downlink_retransmitted: u64,
    /// Downlink messages dropped per reason (index: position in [`DownlinkDropReason::ALL`]).
    pub downlink_dropped: [u64; 4],
    /// Datagrams, requests or frames received (valid or not).
    pub packets_in: u64,
}

impl IngressCounters {
    /// Accepted uplink messages, every QoS.
    #[must_use]
    pub fn messages_in_total(&self) -> u64 {
        self.messages_in.iter().sum()
    }
}

/// What one ingress reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressReport {
    /// The protocol's label (`mqtt-sn`, `coap`, `http` ...).
    pub protocol: &'static str,
    /// Sessions by state now.
    pub sessions: SessionCounts,
    /// Counters since start.
    pub counters: IngressCounters,
}

/// A filter for [`IngressQuery::Clients`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientQuery {
    /// Only ClientIds starting with this.
    pub prefix: Option<String>,
    /// Only sessions in this state.
    pub state: Option<SessionState>,
    /// Only ClientIds ordered after this one (the previous page's last).
    pub after: Option<String>,
    /// At most this many (the ingress may return fewer; the admin listener caps it).
    pub limit: usize,
}

/// One subscription of a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionInfo {
    /// The topic filter.
    pub filter: String,
    /// The granted QoS.
    pub qos: u8,
}

/// One client (session), as `/clients` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientInfo {
    /// The ClientId.
    pub client_id: String,
    /// The protocol's label.
    pub protocol: &'static str,
    /// The address it was last seen at (`None` for a persisted session not seen since the
    /// restart).
    pub address: Option<String>,
    /// Its state.
    pub state: SessionState,
    /// The keep-alive (or sleep duration while asleep) it asked for, seconds.
    pub keep_alive_secs: u64,
    /// Milliseconds since its last packet.
    pub last_seen_ms_ago: u64,
    /// Its subscriptions.
    pub subscriptions: Vec<SubscriptionInfo>,
    /// Downlink messages queued for it (buffered while asleep, or waiting their turn).
    pub queued_downlink: u64,
    /// Its request counters, for protocols that count per client (HTTP); left out of the
    /// JSON when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<ClientCounters>,
}

/// A client's request counters (HTTP: per device, since it was first seen or last forgotten
/// by the bounded devices table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientCounters {
    /// Requests answered, any status.
    pub requests: u64,
    /// Messages accepted (a batch's items one each).
    pub messages: u64,
    /// Requests answered with an error status (4xx, 5xx).
    pub refused: u64,
    /// The topic of its last publish.
    pub last_topic: Option<String>,
    /// The status of its last request.
    pub last_status: u16,
}

/// A page of [`ClientInfo`]s, ordered by ClientId.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientsPage {
    /// The clients, ordered by ClientId.
    pub clients: Vec<ClientInfo>,
    /// Whether more matching clients follow the last one.
    pub more: bool,
}

/// A question to an ingress's task, answered between two turns of its loop.
#[derive(Debug)]
pub enum IngressQuery {
    /// Its report (sessions by state, counters).
    Report(oneshot::Sender<IngressReport>),
    /// A page of its clients.
    Clients(ClientQuery, oneshot::Sender<ClientsPage>),
}

/// How many queries may wait for one ingress (the admin listener's handlers wait for room;
/// one scrape or page asks once).
pub const QUERY_CHANNEL: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reason_indexes_its_counter_by_its_position_in_all() {
        for (i, reason) in RefusalReason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "{}", reason.as_str());
        }
        assert_eq!(
            RefusalReason::ForwarderNotAllowed.as_str(),
            "forwarder_not_allowed"
        );
    }
}
