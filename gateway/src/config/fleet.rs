//! `[fleet]`: what the gateway tells its upstreams about itself (presence, heartbeats,
//! events), and `[fleet.replay]` (resending held records on request; parsed here, used by
//! the replay component).

use std::time::Duration;

use sensorgate_bridges::message::Qos;
use serde::Deserialize;

use super::check::{check_topic_name, duration_in, int_in, size_in};
use super::diag::{KeyPath, Reporter};
use super::{DurationText, SizeText};

/// The only placeholder `topic_prefix` knows.
pub const GATEWAY_ID_PLACEHOLDER: &str = "{gateway_id}";

/// `[fleet]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSection {
    /// Presence, heartbeats and events on every upstream.
    pub enabled: bool,
    /// The topic prefix as written (`{gateway_id}` not yet replaced).
    pub topic_prefix_template: String,
    /// The topic prefix with `{gateway_id}` replaced: `<prefix>/state`, `/status`, `/events`,
    /// `/replay`, `/replay/result` (each upstream's `remote_prefix` applies on top).
    pub topic_prefix: String,
    /// QoS of birth, death, Will and events (heartbeats are QoS 0).
    pub qos: Qos,
    /// The payload of `<prefix>/state`.
    pub state_payload: StatePayload,
    /// Heartbeat period; `None`: off (`"0s"`).
    pub heartbeat: Option<Duration>,
    /// Event messages per minute at most; the excess is counted and dropped.
    pub max_events_per_minute: u32,
    /// Largest heartbeat or event payload, bytes.
    pub max_message_size: usize,
    /// `[fleet.replay]`.
    pub replay: ReplaySection,
}

impl FleetSection {
    /// `<topic_prefix>/<leaf>`.
    #[must_use]
    pub fn topic(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.topic_prefix)
    }
}

/// `[fleet] state_payload`: what the retained `<prefix>/state` messages carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatePayload {
    /// `"json"`: the state document (schemas/state.json).
    Json,
    /// `"text"`: the bare word `online` or `offline`, for consumers that expect an
    /// availability topic (Home Assistant, Node-RED dashboards).
    Text,
}

/// `[fleet.replay]` (plain data; the replay component reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySection {
    /// Whether replay requests are taken.
    pub enabled: bool,
    /// Most records one request may resend.
    pub max_records: u64,
    /// Requests per minute at most, per upstream.
    pub max_requests_per_minute: u32,
    /// Bytes of acknowledged records kept on disk for replays (the spool's `retain_bytes`).
    pub keep_acknowledged: u64,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawFleet {
    enabled: bool,
    topic_prefix: String,
    qos: i64,
    state_payload: String,
    heartbeat: DurationText,
    max_events_per_minute: i64,
    max_message_size: SizeText,
    pub(super) replay: RawReplay,
}

impl Default for RawFleet {
    fn default() -> Self {
        RawFleet {
            enabled: true,
            topic_prefix: "sensorgate/{gateway_id}".into(),
            qos: 1,
            state_payload: "json".into(),
            heartbeat: "60s".into(),
            max_events_per_minute: 30,
            max_message_size: "16KiB".into(),
            replay: RawReplay::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawReplay {
    enabled: bool,
    max_records: i64,
    max_requests_per_minute: i64,
    keep_acknowledged: SizeText,
}

impl Default for RawReplay {
    fn default() -> Self {
        RawReplay {
            enabled: true,
            max_records: 10_000,
            max_requests_per_minute: 6,
            keep_acknowledged: "64MiB".into(),
        }
    }
}

/// `[fleet]`; `None` when a key is wrong (reported). `gateway_id` is `[gateway] id`.
pub(super) fn compile_fleet(
    raw: &RawFleet,
    gateway_id: u8,
    r: &mut Reporter<'_>,
) -> Option<FleetSection> {
    let path = KeyPath::root("fleet");
    let topic_prefix = compile_prefix(&raw.topic_prefix, gateway_id, &path.key("topic_prefix"), r);
    let qos = match raw.qos {
        0 => Some(Qos::AtMostOnce),
        1 => Some(Qos::AtLeastOnce),
        2 => Some(Qos::ExactlyOnce),
        other => {
            r.at_path(
                &path.key("qos"),
                format!("{other} is out of range 0..=2"),
                None,
            );
            None
        }
    };
    let state_payload = match raw.state_payload.as_str() {
        "json" => Some(StatePayload::Json),
        "text" => Some(StatePayload::Text),
        other => {
            r.at_path(
                &path.key("state_payload"),
                format!("unknown payload format `{other}`"),
                Some("use \"json\" or \"text\"".into()),
            );
            None
        }
    };
    let heartbeat = duration_in(
        r,
        &path.key("heartbeat"),
        &raw.heartbeat,
        Duration::ZERO,
        Duration::from_secs(86_400),
    );
    if let Some(h) = heartbeat
        && !h.is_zero()
        && h < Duration::from_secs(1)
    {
        r.at_path(
            &path.key("heartbeat"),
            "must be \"0s\" (off) or at least 1s".into(),
            None,
        );
    }
    let max_events_per_minute = int_in::<u32>(
        r,
        &path.key("max_events_per_minute"),
        raw.max_events_per_minute,
        0,
        6_000,
    );
    let max_message_size = size_in(
        r,
        &path.key("max_message_size"),
        &raw.max_message_size,
        1 << 10,
        1 << 20,
    );
    let rpath = path.key("replay");
    let max_records = int_in::<u64>(
        r,
        &rpath.key("max_records"),
        raw.replay.max_records,
        1,
        10_000_000,
    );
    let max_requests_per_minute = int_in::<u32>(
        r,
        &rpath.key("max_requests_per_minute"),
        raw.replay.max_requests_per_minute,
        1,
        600,
    );
    let keep_acknowledged = size_in(
        r,
        &rpath.key("keep_acknowledged"),
        &raw.replay.keep_acknowledged,
        0,
        1 << 40,
    );
    let heartbeat = heartbeat?;
    if !heartbeat.is_zero() && heartbeat < Duration::from_secs(1) {
        return None;
    }
    Some(FleetSection {
        enabled: raw.enabled,
        topic_prefix_template: raw.topic_prefix.clone(),
        topic_prefix: topic_prefix?,
        qos: qos?,
        state_payload: state_payload?,
        heartbeat: (!heartbeat.is_zero()).then_some(heartbeat),
        max_events_per_minute: max_events_per_minute?,
        max_message_size: max_message_size?,
        replay: ReplaySection {
            enabled: raw.replay.enabled,
            max_records: max_records?,
            max_requests_per_minute: max_requests_per_minute?,
            keep_acknowledged: keep_acknowledged? as u64,
        },
    })
}

/// `topic_prefix` with `{gateway_id}` replaced, checked as a topic name (no wildcards, no
/// other placeholder, no leading or trailing `/`).
fn compile_prefix(
    template: &str,
    gateway_id: u8,
    at: &KeyPath,
    r: &mut Reporter<'_>,
) -> Option<String> {
    let prefix = template.replace(GATEWAY_ID_PLACEHOLDER, &gateway_id.to_string());
    if prefix.contains('{') || prefix.contains('}') {
        r.at_path(
            at,
            format!("`{template}` has a placeholder other than `{GATEWAY_ID_PLACEHOLDER}`"),
            Some("write for example \"sensorgate/{gateway_id}\"".into()),
        );
        return None;
    }
    if prefix.starts_with('/') || prefix.ends_with('/') {
        r.at_path(
            at,
            format!("`{template}` must not start or end with `/`"),
            Some("the topics are `<topic_prefix>/state`, `/status`, `/events` ...".into()),
        );
        return None;
    }
    if let Err(e) = check_topic_name(&prefix) {
        r.at_path(at, e, None);
        return None;
    }
    Some(prefix)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tests::errors;
    use super::super::{Config, fields_of};
    use super::*;

    const BASE: &str = r#"
[gateway]
id = 9
state_dir = "/tmp/sg"
[mqttsn]
listen = ["127.0.0.1:1883"]
[[upstream]]
name = "local"
kind = "mqtt"
url = "mqtt://127.0.0.1:1883"
"#;

    #[test]
    fn a_fleet_table_is_compiled_and_summarised() {
        let text = format!(
            "{BASE}[fleet]\ntopic_prefix = \"plants/{{gateway_id}}/gw\"\nqos = 0\n\
             heartbeat = \"0s\"\nstate_payload = \"text\"\n[fleet.replay]\nenabled = false\n\
             max_records = 5\n"
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(c.fleet.topic_prefix, "plants/9/gw");
        assert_eq!(c.fleet.qos, Qos::AtMostOnce);
        assert_eq!(c.fleet.heartbeat, None);
        assert_eq!(c.fleet.state_payload, StatePayload::Text);
        assert!(!c.fleet.replay.enabled);
        assert_eq!(c.fleet.replay.max_records, 5);
        assert!(
            c.summary().contains(
                "fleet: presence on `plants/9/gw/state` (retained, Will, plain text), heartbeat off on \
                 `/status`, events on `/events` (at most 30/min), QoS 0, replay off\n"
            ),
            "{}",
            c.summary()
        );
        let off = Config::parse(
            Path::new("t.toml"),
            &format!("{BASE}[fleet]\nenabled = false\n"),
        )
        .unwrap();
        assert!(off.summary().contains("fleet: off"));
        // Absent: the defaults.
        let c = Config::parse(Path::new("t.toml"), BASE).unwrap();
        assert_eq!(c.fleet.topic_prefix, "sensorgate/9");
        assert_eq!(c.fleet.heartbeat, Some(Duration::from_secs(60)));
        assert_eq!(c.fleet.state_payload, StatePayload::Json);
    }

    #[test]
    fn fleet_errors_name_file_line_and_column() {
        let text = format!(
            "{BASE}[fleet]\ntopic_prefix = \"a/+/{{gw}}\"\nqos = 3\nheartbeat = \"500ms\"\n\
             max_events_per_minute = -1\nmax_message_size = \"10B\"\nbeat = 1\n\
             [fleet.replay]\nmax_records = 0\nmax_requests_per_minute = 601\n"
        );
        let d = errors(&text);
        let lines: Vec<(usize, String)> = d.iter().map(|d| (d.line, d.to_string())).collect();
        let base = BASE.lines().count();
        for (line, needle) in [
            (base + 2, "placeholder other than `{gateway_id}`"),
            (base + 3, "3 is out of range 0..=2"),
            (base + 4, "must be \"0s\" (off) or at least 1s"),
            (base + 5, "-1 is out of range 0..=6000"),
            (base + 6, "out of range 1KiB..=1MiB"),
            (base + 7, "beat"),
            (base + 9, "0 is out of range 1..=10000000"),
            (base + 10, "601 is out of range 1..=600"),
        ] {
            assert!(
                lines.iter().any(|(l, t)| *l == line && t.contains(needle)),
                "no `{needle}` at line {line} in {lines:#?}"
            );
        }
        assert!(d.iter().all(|d| d.to_string().starts_with("test.toml:")));
        let d = errors(&format!("{BASE}[fleet]\nstate_payload = \"xml\"\n"));
        assert!(
            d[0].to_string().contains("unknown payload format `xml`"),
            "{}",
            d[0]
        );
        let d = errors(&format!("{BASE}[fleet]\ntopic_prefix = \"a/#\"\n"));
        assert!(d[0].to_string().contains("wildcards"), "{}", d[0]);
        let d = errors(&format!("{BASE}[fleet]\ntopic_prefix = \"a/\"\n"));
        assert!(d[0].to_string().contains("must not start or end with `/`"));
    }

    #[test]
    fn the_reference_config_shows_every_fleet_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sensorgate.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        let fleet = doc["fleet"].as_table().unwrap();
        let mut keys: Vec<&str> = fleet.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut fields = fields_of::<RawFleet>().to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
        let mut keys: Vec<&str> = fleet["replay"]
            .as_table()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut fields = fields_of::<RawReplay>().to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
        let c = Config::parse(&path, &text).unwrap();
        let mut r = Reporter::new(&path, "", None);
        let defaults = compile_fleet(&RawFleet::default(), c.gateway.id, &mut r).unwrap();
        assert_eq!(c.fleet, defaults);
    }

    #[test]
    fn defaults_match_the_design() {
        let text = "";
        let path = Path::new("t.toml");
        let mut r = Reporter::new(path, text, None);
        let f = compile_fleet(&RawFleet::default(), 7, &mut r).unwrap();
        assert!(r.finish().is_empty());
        assert!(f.enabled);
        assert_eq!(f.topic_prefix, "sensorgate/7");
        assert_eq!(f.topic("state"), "sensorgate/7/state");
        assert_eq!(f.qos, Qos::AtLeastOnce);
        assert_eq!(f.heartbeat, Some(Duration::from_secs(60)));
        assert_eq!(f.max_events_per_minute, 30);
        assert_eq!(f.max_message_size, 16 << 10);
        assert_eq!(
            f.replay,
            ReplaySection {
                enabled: true,
                max_records: 10_000,
                max_requests_per_minute: 6,
                keep_acknowledged: 64 << 20,
            }
        );
    }
}
