//! The `/status` document: one JSON object saying how the gateway is, read by
//! `sensorgate status`, the field console and scripts.
//!
//! The field names are an interface (scripts parse them): add fields, never rename or remove
//! one. Times are wall-clock milliseconds since the Unix epoch (`*_ms`) or durations in
//! seconds (`*_secs`); sizes are bytes.

use serde::{Deserialize, Serialize};

/// How the gateway is, as `/readyz` and `sensorgate status` judge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Serving, every upstream connected, nothing refused for lack of room.
    Healthy,
    /// Serving and accepting data, with a reason: an upstream is down (data is spooled), the
    /// spool is full (new data is refused or the oldest dropped), or the disk failed.
    Degraded,
    /// Not serving: starting, stopping, or a loop stopped turning.
    Unhealthy,
}

/// The whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// Who this gateway is.
    pub gateway: GatewayInfo,
    /// The verdict and its reasons.
    pub health: HealthInfo,
    /// What it listens on (serial lines too: transport `serial`, address the device).
    pub listeners: Vec<ListenerInfo>,
    /// The `[[serial]]` lines, in config order (`line` is the index); empty without any.
    #[serde(default)]
    pub serial: Vec<SerialLineInfo>,
    /// Per southbound protocol: sessions and counters.
    pub protocols: Vec<ProtocolInfo>,
    /// Per upstream: link, forwarding, backlog.
    pub upstreams: Vec<UpstreamInfo>,
    /// The spool's use.
    pub spool: SpoolInfo,
    /// The most recent notable events, oldest first (a bounded ring: `[admin] event_history`).
    pub events: Vec<EventInfo>,
    /// The last reload (SIGHUP); absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadInfo>,
    /// The fleet view (`[fleet]`); absent when it is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetInfo>,
}

/// The fleet view as `/status` shows it: where it publishes and what it sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetInfo {
    /// `[fleet] topic_prefix` with `{gateway_id}` replaced.
    pub topic_prefix: String,
    /// The heartbeat period, seconds; 0: off.
    pub heartbeat_secs: u64,
    /// Whether replay requests are served.
    pub replay: bool,
    /// Heartbeats, events and replays since the start (as in each heartbeat).
    pub counts: super::fleet::FleetCounts,
}

/// The outcome of the last reload (SIGHUP, `systemctl reload`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadInfo {
    /// When (wall clock, ms since the epoch).
    pub at_ms: u64,
    /// Reloads since the start.
    pub count: u64,
    /// `applied` (the new config is running, maybe with `restart_required` keys waiting) or
    /// `rejected` (it had errors: the running config was kept).
    pub outcome: String,
    /// The live parts that changed (`[[route]]`, `[mqttsn]`, `[[upstream]] cloud` ...).
    pub applied: Vec<String>,
    /// Changed keys that only a restart applies.
    pub restart_required: Vec<String>,
    /// The config's errors (file:line:column: message) when rejected; what a part could not
    /// apply otherwise.
    pub errors: Vec<String>,
    /// What the parts said while applying (a limit now below its current use ...).
    pub notes: Vec<String>,
    /// One line saying all of it (as in `STATUS=`).
    pub summary: String,
}

impl From<&crate::reload::Outcome> for ReloadInfo {
    fn from(o: &crate::reload::Outcome) -> Self {
        ReloadInfo {
            at_ms: o.at_ms,
            count: o.count,
            outcome: if o.ok { "applied" } else { "rejected" }.to_owned(),
            applied: o.applied.clone(),
            restart_required: o.restart_required.clone(),
            errors: o.errors.clone(),
            notes: o.notes.clone(),
            summary: o.summary(),
        }
    }
}

/// The gateway's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInfo {
    /// `[gateway] id` (the MQTT-SN GwId).
    pub id: u8,
    /// `[gateway] name`.
    pub name: String,
    /// The sensorgate version.
    pub version: String,
    /// When it started (wall clock, ms since the epoch).
    pub started_ms: u64,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// The config file it runs on.
    pub config: String,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthInfo {
    /// Healthy, degraded or unhealthy.
    pub state: Health,
    /// `/healthz`: the process runs and its loops turn.
    pub live: bool,
    /// `/readyz`: listeners bound, spool open, accepting data (also while degraded).
    pub ready: bool,
    /// Why it is not healthy, one sentence each (empty when healthy).
    pub reasons: Vec<String>,
}

/// One listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// `mqtt-sn`, `admin`, later `coap`, `http`.
    pub protocol: String,
    /// `udp`, `tcp`, later `serial`, `dtls`.
    pub transport: String,
    /// The bound address.
    pub address: String,
}

/// One serial line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialLineInfo {
    /// Its index (`line` in metrics and logs).
    pub line: u16,
    /// The device path.
    pub device: String,
    /// Whether the far end is a forwarder (0xFE encapsulation).
    pub forwarder: bool,
    /// Whether the device is open.
    pub up: bool,
    /// Since when it is in that state (wall clock ms; 0: no attempt yet).
    pub since_ms: u64,
    /// Opens after the first (the device came back).
    pub reopens: u64,
    /// Good frames read since start.
    pub frames_in: u64,
    /// Frames written since start.
    pub frames_out: u64,
    /// Bytes read since start.
    pub bytes_in: u64,
    /// Bytes written since start.
    pub bytes_out: u64,
    /// Frames for the line dropped since start (write queue full, or the line down).
    pub write_dropped: u64,
    /// Frames given up on since start, by reason: `bad_crc`, `oversize`, `truncated`,
    /// `encapsulated` (0xFE on a line that is not a forwarder's); `garbage_bytes` counts
    /// bytes skipped while resynchronising.
    pub bad: std::collections::BTreeMap<String, u64>,
}

/// One southbound protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolInfo {
    /// The protocol's label.
    pub protocol: String,
    /// Sessions per state (`active`, `asleep`, `awake`, `lost` ...; every state listed).
    pub sessions: std::collections::BTreeMap<String, u64>,
    /// Every session.
    pub sessions_total: u64,
    /// Accepted uplink messages since start (every QoS).
    pub messages_in: u64,
    /// Refusals since start, every reason.
    pub refused: u64,
    /// Downlink messages delivered to clients since start.
    pub downlink_delivered: u64,
    /// Refusals by `[[acl]]`, `[limits]` and the identity checks since start, per reason
    /// (`acl_denied_publish`, `rate_limited` ...; the `event` labels of
    /// `sensorgate_ingress_events_total`).
    #[serde(default)]
    pub security: std::collections::BTreeMap<String, u64>,
}

/// One upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamInfo {
    /// `[[upstream]] name`.
    pub name: String,
    /// `mqtt` or `amqp`.
    pub kind: String,
    /// The broker's address (credentials removed).
    pub url: String,
    /// Whether the link is up.
    pub connected: bool,
    /// Since when it is in that state (wall clock ms; 0: no attempt yet).
    pub since_ms: u64,
    /// Why it last went down or failed to connect.
    pub last_error: Option<String>,
    /// Connections established after the first.
    pub reconnects: u64,
    /// Messages the broker acknowledged (or taken, QoS 0) since start.
    pub forwarded: u64,
    /// Messages sent and not yet acknowledged.
    pub in_flight: u64,
    /// What is waiting for it.
    pub backlog: BacklogInfo,
}

/// An upstream's backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BacklogInfo {
    /// Records not yet acknowledged.
    pub records: u64,
    /// Bytes of the segments holding them (an upper bound).
    pub bytes: u64,
    /// Age of the oldest of them, seconds (0 when none).
    pub oldest_age_secs: u64,
}

/// The spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolInfo {
    /// Its directory.
    pub dir: String,
    /// Bytes of segment files.
    pub bytes: u64,
    /// `[spool] max_bytes`.
    pub max_bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Records held for the slowest upstream.
    pub records: u64,
    /// Records appended since start.
    pub appended: u64,
    /// `reject_new` or `drop_oldest`.
    pub when_full: String,
    /// Whether appends are refused now for want of room (spool or disk).
    pub full: bool,
    /// Data given up since start: `drop_oldest`, `expired`, `corrupt`.
    pub dropped: std::collections::BTreeMap<String, u64>,
    /// Failed writes and fsyncs since start.
    pub disk_errors: u64,
}

/// One notable event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInfo {
    /// When (wall clock ms).
    pub at_ms: u64,
    /// `started`, `upstream_up`, `upstream_down`, `spool_full`, `disk_error`, `data_dropped`,
    /// `config_reloaded`, `serial_up`, `serial_down`, `stopping`.
    pub kind: String,
    /// `info` or `warning`.
    pub level: String,
    /// One sentence.
    pub message: String,
    /// The upstream it is about (`upstream_down`, `upstream_up`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// How long the state it ends lasted, seconds (`upstream_down`: up for; `upstream_up`:
    /// down for); absent when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<u64>,
    /// Why (`data_dropped`: `drop_oldest`, `expired`, `corrupt`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many records it concerns (`data_dropped`: given up; `spool_full`: appends
    /// refused); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
}
