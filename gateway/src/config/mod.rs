//! Configuration: one TOML file, validated completely before anything binds.
//!
//! Invariants:
//! - Unknown keys are errors, each reported with file, line, column and a "did you mean" hint.
//! - Every error in the file is reported at once, each in the config's terms ("expected an
//!   integer", "expected a duration such as \"10s\""): wrong types, unknown keys and semantic
//!   checks together. Only syntax errors stop at the first, since nothing after them can be
//!   trusted.
//! - Durations and sizes are strings everywhere (see [`units`]).
//! - Every bound has a key and a documented default (`config/sensorgate.toml`).

mod diag;
pub mod units;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sensorgate_bridges::amqp::AmqpUpstreamConfig;
use sensorgate_bridges::amqp::config::DownlinkQueue;
use sensorgate_bridges::mqtt::{MAX_SUBSCRIPTIONS, MqttUpstreamConfig, MqttVersion, TlsSettings};
use sensorgate_bridges::spool::{FsyncPolicy, SpoolConfig, WhenFull};
use sensorgate_bridges::topic::{self, TopicError};
use serde::Deserialize;
use serde::de::{Deserializer, Visitor};

pub use diag::{Diagnostic, KeyPath};
use diag::{Reporter, fields_of, path_of_span, remove_value};

use crate::mqttsn::codec::MAX_CLIENT_ID_LEN_DECODE;
use crate::mqttsn::core::{ClientSet, CoreConfig, Peer, PredefinedTopic, QueueFull};

/// Default config path of the packaged daemon.
pub const DEFAULT_PATH: &str = "/etc/sensorgate/sensorgate.toml";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    /// `[gateway]`.
    pub gateway: GatewaySection,
    /// `[log]`.
    pub log: LogSection,
    /// `[mqttsn]`.
    pub mqttsn: MqttSnSection,
    /// `[spool]`.
    pub spool: SpoolSection,
    /// `[[upstream]]`, in file order.
    pub upstreams: Vec<Upstream>,
}

/// `[gateway]`.
#[derive(Debug, Clone)]
pub struct GatewaySection {
    /// MQTT-SN GwId.
    pub id: u8,
    /// Name used in logs and the default upstream client id.
    pub name: String,
    /// Where durable state lives.
    pub state_dir: PathBuf,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogSection {
    /// A `tracing` filter directive (`info`, `sensorgate=debug,warn`); `RUST_LOG` overrides it.
    pub level: String,
}

/// `[mqttsn]`.
#[derive(Debug, Clone)]
pub struct MqttSnSection {
    /// UDP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// `SO_RCVBUF` request for each socket, in bytes.
    pub recv_buffer: usize,
    /// `SO_SNDBUF` request for each socket, in bytes.
    pub send_buffer: usize,
    /// Datagrams read per wake-up before the core's output is flushed.
    pub recv_batch: usize,
    /// Bound on the log of persisted sessions (`<state_dir>/sessions`), in bytes.
    pub session_log_max_size: u64,
    /// The protocol core's settings.
    pub core: CoreConfig,
}

/// `[spool]`.
#[derive(Debug, Clone)]
pub struct SpoolSection {
    /// The log's settings; `dir` is `<state_dir>/spool`.
    pub spool: SpoolConfig,
    /// Messages waiting for the spool writer at most; beyond it QoS >= 1 senders get
    /// congestion and QoS 0 messages are dropped (counted).
    pub queue: usize,
    /// Per upstream, messages per second forwarded at most (`None`: unlimited).
    pub drain_rate: Option<u32>,
    /// Per upstream, topic and payload bytes per second forwarded at most (`None`: unlimited).
    pub drain_bytes_rate: Option<u64>,
}

/// One `[[upstream]]`.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its unique name.
    pub name: String,
    /// A QoS >= 1 message unacknowledged this long means the broker is gone: reconnect and
    /// resend.
    pub ack_timeout: Duration,
    /// The URL as written (for summaries; credentials never appear in it).
    pub url: String,
    /// Kind-specific settings.
    pub kind: UpstreamKind,
}

/// What an upstream speaks.
#[derive(Debug, Clone)]
pub enum UpstreamKind {
    /// MQTT 3.1.1 or 5.
    Mqtt(MqttUpstreamConfig),
    /// AMQP 0-9-1 (RabbitMQ): uplink with publisher confirms, downlink from a queue.
    Amqp(AmqpUpstreamConfig),
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file has errors; all of them are listed.
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

fn render(diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diags {
        out.push_str(&d.to_string());
        out.push('\n');
    }
    out.push_str(&format!("{} error(s) in config", diags.len()));
    out
}

impl Config {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// [`LoadError::Read`] when the file cannot be read, [`LoadError::Invalid`] with every
    /// diagnostic otherwise.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates config text; `path` is used in diagnostics and to resolve relative paths.
    ///
    /// # Errors
    /// [`LoadError::Invalid`] with every diagnostic.
    pub fn parse(path: &Path, text: &str) -> Result<Config, LoadError> {
        let root = match toml::de::DeTable::parse(text) {
            Ok(root) => root,
            Err(e) => {
                let mut r = Reporter::new(path, text, None);
                r.at_span(e.span(), format!("invalid TOML: {}", e.message()), None);
                return Err(LoadError::Invalid(r.finish()));
            }
        };
        let mut reporter = Reporter::new(path, text, Some(&root));
        let Some(raw) = deserialize_raw(&root, &mut reporter) else {
            return Err(LoadError::Invalid(reporter.finish()));
        };
        let config = compile(path, raw, &mut reporter);
        let errors = reporter.finish();
        match config {
            Some(config) if errors.is_empty() => Ok(config),
            _ => Err(LoadError::Invalid(errors)),
        }
    }

    /// A short human summary for `check-config` and the start-up log.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "gateway {} (GwId {}), state in {}\n",
            self.gateway.name,
            self.gateway.id,
            self.gateway.state_dir.display()
        );
        for addr in &self.mqttsn.listen {
            s.push_str(&format!("listener: MQTT-SN over UDP on {addr}\n"));
        }
        s.push_str(&format!(
            "mqttsn: up to {} clients, packets up to {}, {} predefined topic(s), QoS -1 {}\n",
            self.mqttsn.core.max_clients,
            units::format_size(self.mqttsn.core.max_packet_size as u64),
            self.mqttsn.core.predefined.len(),
            if self.mqttsn.core.qos_minus_one {
                "on"
            } else {
                "off"
            },
        ));
        s.push_str(&format!(
            "sessions: sleeping and CleanSession=0 sessions kept in {} (log up to {})\n",
            self.gateway
                .state_dir
                .join(crate::io::session_store::SESSIONS_DIR)
                .display(),
            units::format_size(self.mqttsn.session_log_max_size),
        ));
        let sp = &self.spool.spool;
        s.push_str(&format!(
            "spool: {} (up to {}, keep {} free, when full: {}, fsync: {})\n",
            sp.dir.display(),
            units::format_size(sp.max_bytes),
            units::format_size(sp.min_free_bytes),
            match sp.when_full {
                WhenFull::RejectNew => "reject_new",
                WhenFull::DropOldest => "drop_oldest",
            },
            match sp.fsync {
                FsyncPolicy::Always => "always".to_owned(),
                FsyncPolicy::Interval(d) => format!("every {}", humantime::format_duration(d)),
            }
        ));
        for u in &self.upstreams {
            match &u.kind {
                UpstreamKind::Mqtt(m) => s.push_str(&format!(
                    "upstream {}: MQTT {} at {}{}\n",
                    u.name,
                    match m.version {
                        MqttVersion::V311 => "3.1.1",
                        MqttVersion::V5 => "5",
                    },
                    u.url,
                    if m.remote_prefix.is_empty() {
                        String::new()
                    } else {
                        format!(", topics prefixed with `{}`", m.remote_prefix)
                    }
                )),
                UpstreamKind::Amqp(a) => s.push_str(&format!(
                    "upstream {}: AMQP 0-9-1 at {}, exchange `{}`, downlink from {}\n",
                    u.name,
                    u.url,
                    a.exchange,
                    match &a.downlink_queue {
                        DownlinkQueue::ServerNamed => "a server-named queue".to_owned(),
                        DownlinkQueue::Durable(q) => format!("durable queue `{q}`"),
                        DownlinkQueue::Passive(q) => format!("existing queue `{q}`"),
                    }
                )),
            }
        }
        s
    }
}

/// Deserializes the document into the raw config, reporting every unknown key and every value
/// of the wrong type. A wrongly typed value is reported and taken out of the document (its
/// default applies), and deserializing starts again, so that one wrong type does not hide the
/// others; each round removes a value, so this ends. `None` after an error that cannot be
/// located (reported as it is).
fn deserialize_raw(
    root: &toml::Spanned<toml::de::DeTable<'_>>,
    r: &mut Reporter<'_>,
) -> Option<RawConfig> {
    let mut doc = root.clone();
    loop {
        let mut unknown: Vec<KeyPath> = Vec::new();
        let de = toml::de::Deserializer::from(doc.clone());
        let result: Result<RawConfig, _> = serde_ignored::deserialize(de, |p| {
            unknown.push(ignored_path(&p));
        });
        let error = match result {
            Ok(raw) => {
                for key in &unknown {
                    r.unknown_key(key, known_fields(key));
                }
                return Some(raw);
            }
            Err(error) => error,
        };
        let located = error
            .span()
            .and_then(|span| path_of_span(&doc, &span))
            .and_then(|at| Some((at.clone(), remove_value(&mut doc, &at)?)));
        match located {
            Some((at, removed)) => r.wrong_type(&at, removed, error.message()),
            None => {
                let (message, hint) = diag::type_message(error.message());
                r.at_span(error.span(), message, hint);
                for key in &unknown {
                    r.unknown_key(key, known_fields(key));
                }
                return None;
            }
        }
    }
}

/// Converts a `serde_ignored` path into ours.
fn ignored_path(path: &serde_ignored::Path<'_>) -> KeyPath {
    fn walk(p: &serde_ignored::Path<'_>, out: &mut Vec<diag::PathSeg>) {
        use serde_ignored::Path as P;
        match p {
            P::Root => {}
            P::Seq { parent, index } => {
                walk(parent, out);
                out.push(diag::PathSeg::Index(*index));
            }
            P::Map { parent, key } => {
                walk(parent, out);
                out.push(diag::PathSeg::Key(key.clone()));
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                walk(parent, out);
            }
        }
    }
    let mut segs = Vec::new();
    walk(path, &mut segs);
    KeyPath(segs)
}

/// The fields of the section an unknown key was found in.
fn known_fields(key: &KeyPath) -> &'static [&'static str] {
    let sections: Vec<&str> = key
        .0
        .iter()
        .take(key.0.len().saturating_sub(1))
        .filter_map(|s| match s {
            diag::PathSeg::Key(k) => Some(k.as_str()),
            diag::PathSeg::Index(_) => None,
        })
        .collect();
    match sections.as_slice() {
        [] => fields_of::<RawConfig>(),
        ["gateway"] => fields_of::<RawGateway>(),
        ["log"] => fields_of::<RawLog>(),
        ["mqttsn"] => fields_of::<RawMqttSn>(),
        ["mqttsn", "predefined_topic"] => fields_of::<RawPredefined>(),
        ["spool"] => fields_of::<RawSpool>(),
        ["upstream"] => fields_of::<RawUpstream>(),
        _ => &[],
    }
}

// ---------------------------------------------------------------------------------------------
// Raw, as written. Defaults live here and in `config/sensorgate.toml`, which documents them.

/// A string value that stands for something else (a duration, a size): its own type, so that
/// a value of the wrong type is reported as what the key expects ("expected a duration such
/// as \"10s\""), not as "expected a string". Parsed in [`compile`].
macro_rules! text_value {
    ($name:ident, $expecting:literal) => {
        #[derive(Debug, Clone)]
        struct $name(String);

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                $name(text.to_owned())
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Text;
                impl Visitor<'_> for Text {
                    type Value = String;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
                        Ok(v.to_owned())
                    }
                }
                deserializer.deserialize_str(Text).map($name)
            }
        }
    };
}

text_value!(DurationText, "a duration such as \"10s\"");
text_value!(SizeText, "a size such as \"4KiB\"");

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    gateway: RawGateway,
    log: RawLog,
    mqttsn: RawMqttSn,
    spool: RawSpool,
    upstream: Vec<RawUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawSpool {
    max_bytes: SizeText,
    segment_bytes: SizeText,
    min_free_bytes: SizeText,
    max_age: DurationText,
    when_full: String,
    fsync: String,
    fsync_interval: DurationText,
    queue: i64,
    drain_rate: i64,
    drain_bytes_rate: SizeText,
}

impl Default for RawSpool {
    fn default() -> Self {
        RawSpool {
            max_bytes: "1GiB".into(),
            segment_bytes: "8MiB".into(),
            min_free_bytes: "64MiB".into(),
            max_age: "0s".into(),
            when_full: "reject_new".into(),
            fsync: "always".into(),
            fsync_interval: "1s".into(),
            queue: 65_536,
            drain_rate: 0,
            drain_bytes_rate: "0B".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawGateway {
    id: i64,
    name: String,
    state_dir: String,
}

impl Default for RawGateway {
    fn default() -> Self {
        RawGateway {
            id: 1,
            name: "sensorgate".into(),
            state_dir: "/var/lib/sensorgate".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawLog {
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawMqttSn {
    listen: Vec<String>,
    max_clients: i64,
    max_packet_size: SizeText,
    recv_buffer: SizeText,
    send_buffer: SizeText,
    recv_batch: i64,
    session_log_max_size: SizeText,
    max_client_id_len: i64,
    max_topics_per_client: i64,
    max_inflight_per_client: i64,
    qos_minus_one: bool,
    max_subscriptions_per_client: i64,
    max_filters: i64,
    max_queued_per_client: i64,
    max_buffered_per_sleeping_client: i64,
    queue_full: String,
    retry_interval: DurationText,
    max_retries: i64,
    session_expiry: DurationText,
    max_retained: i64,
    advertise_interval: DurationText,
    advertise_destinations: Vec<String>,
    searchgw_reply: String,
    predefined_topic: Vec<RawPredefined>,
}

impl Default for RawMqttSn {
    fn default() -> Self {
        RawMqttSn {
            listen: vec!["0.0.0.0:1883".into(), "[::]:1883".into()],
            max_clients: 100_000,
            max_packet_size: "4KiB".into(),
            recv_buffer: "8MiB".into(),
            send_buffer: "4MiB".into(),
            recv_batch: 64,
            session_log_max_size: "256MiB".into(),
            max_client_id_len: 23,
            max_topics_per_client: 64,
            max_inflight_per_client: 16,
            qos_minus_one: true,
            max_subscriptions_per_client: 32,
            max_filters: 65_536,
            max_queued_per_client: 100,
            max_buffered_per_sleeping_client: 1000,
            queue_full: "drop_oldest".into(),
            retry_interval: "10s".into(),
            max_retries: 3,
            session_expiry: "1h".into(),
            max_retained: 10_000,
            advertise_interval: "15m".into(),
            advertise_destinations: Vec::new(),
            searchgw_reply: "searcher".into(),
            predefined_topic: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawPredefined {
    /// Required (reported in [`compile`], with the other errors).
    #[serde(default)]
    id: Option<i64>,
    /// Required.
    #[serde(default)]
    topic: Option<String>,
    #[serde(default = "all_clients")]
    clients: Vec<String>,
}

fn all_clients() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Deserialize)]
struct RawUpstream {
    /// Required (reported in [`compile`], with the other errors).
    #[serde(default)]
    name: Option<String>,
    /// Required.
    #[serde(default)]
    kind: Option<String>,
    /// Required.
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    remote_prefix: String,
    #[serde(default = "default_protocol")]
    protocol: String,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    client_cert: Option<String>,
    #[serde(default)]
    client_key: Option<String>,
    #[serde(default = "default_keep_alive")]
    keep_alive: DurationText,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: DurationText,
    #[serde(default = "default_backoff_initial")]
    backoff_initial: DurationText,
    #[serde(default = "default_backoff_max")]
    backoff_max: DurationText,
    #[serde(default = "default_max_inflight")]
    max_inflight: i64,
    #[serde(default = "default_queue")]
    queue: i64,
    #[serde(default = "default_ack_timeout")]
    ack_timeout: DurationText,
    /// `kind = "amqp"` only; default [`sensorgate_bridges::amqp::config::DEFAULT_EXCHANGE`].
    #[serde(default)]
    exchange: Option<String>,
    /// `kind = "amqp"` only; default `30s`.
    #[serde(default)]
    heartbeat: Option<DurationText>,
    /// `kind = "amqp"` only: the named downlink queue; default a server-named exclusive one.
    #[serde(default)]
    downlink_queue: Option<String>,
    /// `kind = "amqp"` only: use `downlink_queue` as-is (passive declare, no bindings).
    #[serde(default)]
    downlink_queue_passive: Option<bool>,
    /// `kind = "amqp"` only: binding keys (AMQP syntax) of the downlink queue.
    #[serde(default)]
    bindings: Option<Vec<String>>,
    /// `kind = "amqp"` only: prefetch of the downlink consumer.
    #[serde(default)]
    max_unacked_downlinks: Option<i64>,
    /// `kind = "amqp"` only: largest downlink body.
    #[serde(default)]
    max_downlink_bytes: Option<SizeText>,
}

fn default_ack_timeout() -> DurationText {
    "5s".into()
}

fn default_protocol() -> String {
    "5".into()
}
fn default_keep_alive() -> DurationText {
    "15s".into()
}
fn default_connect_timeout() -> DurationText {
    "10s".into()
}
fn default_backoff_initial() -> DurationText {
    "500ms".into()
}
fn default_backoff_max() -> DurationText {
    "30s".into()
}
fn default_max_inflight() -> i64 {
    1000
}
fn default_queue() -> i64 {
    10_000
}

// ---------------------------------------------------------------------------------------------
// Compilation: raw -> validated, collecting every error.

/// Checks an integer range, reporting at `path`.
fn int_in<T: TryFrom<i64>>(
    r: &mut Reporter<'_>,
    path: &KeyPath,
    value: i64,
    min: i64,
    max: i64,
) -> Option<T> {
    if value < min || value > max {
        r.at_path(path, format!("{value} is out of range {min}..={max}"), None);
        return None;
    }
    T::try_from(value).ok()
}

fn size_in(r: &mut Reporter<'_>, path: &KeyPath, text: &str, min: u64, max: u64) -> Option<usize> {
    match units::parse_size(text) {
        Ok(v) if v < min || v > max => {
            r.at_path(
                path,
                format!(
                    "{text} is out of range {}..={}",
                    units::format_size(min),
                    units::format_size(max)
                ),
                None,
            );
            None
        }
        Ok(v) => usize::try_from(v).ok(),
        Err(e) => {
            r.at_path(path, e, None);
            None
        }
    }
}

fn duration_in(
    r: &mut Reporter<'_>,
    path: &KeyPath,
    text: &str,
    min: Duration,
    max: Duration,
) -> Option<Duration> {
    match units::parse_duration(text) {
        Ok(v) if v < min || v > max => {
            r.at_path(
                path,
                format!(
                    "{text} is out of range {}..={}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
                None,
            );
            None
        }
        Ok(v) => Some(v),
        Err(e) => {
            r.at_path(path, e, None);
            None
        }
    }
}

/// A topic name usable for publishing ([`topic::validate_name`]).
fn check_topic_name(name: &str) -> Result<(), String> {
    topic::validate_name(name).map_err(|error| match error {
        TopicError::Empty => "topic must not be empty".into(),
        TopicError::Wildcard => {
            format!("topic `{name}` must not contain wildcards (`+`, `#`)")
        }
        TopicError::ForbiddenChar => {
            format!(
                "topic `{}` contains control characters",
                name.escape_debug()
            )
        }
        TopicError::TooLong | TopicError::MisplacedWildcard => error.to_string(),
    })
}

fn compile(file: &Path, raw: RawConfig, r: &mut Reporter<'_>) -> Option<Config> {
    let gw = KeyPath::root("gateway");
    let gw_id = int_in::<u8>(r, &gw.key("id"), raw.gateway.id, 0, 255);
    if raw.gateway.name.is_empty() {
        r.at_path(&gw.key("name"), "must not be empty".into(), None);
    }
    if raw.gateway.state_dir.is_empty() {
        r.at_path(&gw.key("state_dir"), "must not be empty".into(), None);
    }
    let base = file.parent().unwrap_or(Path::new("."));
    let state_dir = base.join(&raw.gateway.state_dir);

    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
        r.at_path(
            &KeyPath::root("log").key("level"),
            format!("invalid log filter `{}`: {e}", raw.log.level),
            Some(
                "use `error`, `warn`, `info`, `debug`, `trace`, or `sensorgate=debug,info`".into(),
            ),
        );
    }

    let sn = KeyPath::root("mqttsn");
    let m = &raw.mqttsn;
    let mut listen = Vec::new();
    if m.listen.is_empty() {
        r.at_path(
            &sn.key("listen"),
            "at least one listen address is required".into(),
            None,
        );
    }
    let mut seen = HashSet::new();
    for (i, addr) in m.listen.iter().enumerate() {
        match addr.parse::<SocketAddr>() {
            Ok(a) if !seen.insert(a) => r.at_path(
                &sn.key("listen").index(i),
                format!("`{addr}` is listed twice"),
                None,
            ),
            Ok(a) => listen.push(a),
            Err(_) => r.at_path(
                &sn.key("listen").index(i),
                format!("`{addr}` is not an IP socket address"),
                Some("write `127.0.0.1:1883` or `[::1]:1883`".into()),
            ),
        }
    }
    let max_clients = int_in::<usize>(r, &sn.key("max_clients"), m.max_clients, 1, 10_000_000);
    let max_packet_size = size_in(
        r,
        &sn.key("max_packet_size"),
        &m.max_packet_size,
        16,
        65_535,
    );
    let recv_buffer = size_in(r, &sn.key("recv_buffer"), &m.recv_buffer, 4096, 1 << 30);
    let send_buffer = size_in(r, &sn.key("send_buffer"), &m.send_buffer, 4096, 1 << 30);
    let recv_batch = int_in::<usize>(r, &sn.key("recv_batch"), m.recv_batch, 1, 1024);
    let session_log_max_size = size_in(
        r,
        &sn.key("session_log_max_size"),
        &m.session_log_max_size,
        1 << 20,
        64 << 30,
    );
    let max_client_id_len = int_in::<usize>(
        r,
        &sn.key("max_client_id_len"),
        m.max_client_id_len,
        1,
        MAX_CLIENT_ID_LEN_DECODE as i64,
    );
    let max_topics = int_in::<usize>(
        r,
        &sn.key("max_topics_per_client"),
        m.max_topics_per_client,
        1,
        65_000,
    );
    let max_inflight = int_in::<usize>(
        r,
        &sn.key("max_inflight_per_client"),
        m.max_inflight_per_client,
        1,
        1024,
    );

    let max_subs = int_in::<usize>(
        r,
        &sn.key("max_subscriptions_per_client"),
        m.max_subscriptions_per_client,
        1,
        10_000,
    );
    // The upstreams' subscription tables are sized from it (see `compile`).
    let max_filters = int_in::<usize>(
        r,
        &sn.key("max_filters"),
        m.max_filters,
        1,
        MAX_SUBSCRIPTIONS as i64,
    );
    let max_queued = int_in::<usize>(
        r,
        &sn.key("max_queued_per_client"),
        m.max_queued_per_client,
        1,
        1_000_000,
    );
    let max_buffered = int_in::<usize>(
        r,
        &sn.key("max_buffered_per_sleeping_client"),
        m.max_buffered_per_sleeping_client,
        1,
        1_000_000,
    );
    let queue_full = match m.queue_full.as_str() {
        "drop_oldest" => Some(QueueFull::DropOldest),
        "drop_new" => Some(QueueFull::DropNew),
        other => {
            let hint = diag::did_you_mean(other, &["drop_oldest", "drop_new"])
                .map(|b| format!("did you mean `{b}`?"));
            r.at_path(
                &sn.key("queue_full"),
                format!("unknown policy `{other}`"),
                hint,
            );
            None
        }
    };
    let retry_interval = duration_in(
        r,
        &sn.key("retry_interval"),
        &m.retry_interval,
        Duration::from_millis(100),
        Duration::from_secs(3600),
    );
    let max_retries = int_in::<u32>(r, &sn.key("max_retries"), m.max_retries, 0, 100);
    let session_expiry = duration_in(
        r,
        &sn.key("session_expiry"),
        &m.session_expiry,
        Duration::from_secs(1),
        Duration::from_secs(30 * 24 * 3600),
    );
    let max_retained = int_in::<usize>(r, &sn.key("max_retained"), m.max_retained, 0, 10_000_000);
    let advertise_interval = duration_in(
        r,
        &sn.key("advertise_interval"),
        &m.advertise_interval,
        Duration::from_secs(1),
        Duration::from_secs(65_535),
    );
    let mut advertise_to = Vec::new();
    for (i, dest) in m.advertise_destinations.iter().enumerate() {
        let path = sn.key("advertise_destinations").index(i);
        match dest.parse::<SocketAddr>() {
            Ok(addr) => match listen.iter().position(|l| l.is_ipv4() == addr.is_ipv4()) {
                Some(listener) => advertise_to.push(Peer::udp(listener as u16, addr)),
                None => r.at_path(
                    &path,
                    format!("no listener of the address family of `{dest}` to send from"),
                    None,
                ),
            },
            Err(_) => r.at_path(&path, format!("`{dest}` is not an IP socket address"), None),
        }
    }
    let gwinfo_to_destinations = match m.searchgw_reply.as_str() {
        "searcher" => false,
        "destinations" => true,
        other => {
            r.at_path(
                &sn.key("searchgw_reply"),
                format!("unknown value `{other}`"),
                Some("use \"searcher\" or \"destinations\"".into()),
            );
            false
        }
    };
    if gwinfo_to_destinations && advertise_to.is_empty() {
        r.at_path(
            &sn.key("searchgw_reply"),
            "\"destinations\" needs advertise_destinations".into(),
            None,
        );
    }

    let mut predefined = Vec::new();
    // (id, client or "*") -> index of the first definition, to refuse ambiguous ids.
    let mut defined: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for (i, p) in m.predefined_topic.iter().enumerate() {
        let path = sn.key("predefined_topic").index(i);
        let id = match p.id {
            Some(id) => int_in::<u16>(r, &path.key("id"), id, 1, 65_534),
            None => {
                r.at_path(&path.key("id"), "is required".into(), None);
                None
            }
        };
        let topic = match &p.topic {
            Some(topic) => {
                if let Err(e) = check_topic_name(topic) {
                    r.at_path(&path.key("topic"), e, None);
                }
                topic.clone()
            }
            None => {
                r.at_path(&path.key("topic"), "is required".into(), None);
                String::new()
            }
        };
        if p.clients.is_empty() {
            r.at_path(
                &path.key("clients"),
                "must name at least one ClientId, or `*` for all".into(),
                None,
            );
        }
        let all = p.clients.iter().any(|c| c == "*");
        if all && p.clients.len() > 1 {
            r.at_path(
                &path.key("clients"),
                "`*` already covers every client".into(),
                None,
            );
        }
        let Some(id) = id else { continue };
        for c in &p.clients {
            for key in [(id, c.clone()), (id, "*".to_owned())] {
                if let Some(first) = defined.get(&key) {
                    if *first != i {
                        r.at_path(
                            &path.key("id"),
                            format!(
                                "predefined topic id {id} is already defined for {} \
                                 (mqttsn.predefined_topic[{first}])",
                                if key.1 == "*" {
                                    "all clients".to_owned()
                                } else {
                                    format!("client `{c}`")
                                }
                            ),
                            None,
                        );
                    }
                }
            }
            if c == "*" {
                if let Some((_, first)) = defined.iter().find(|((k, _), _)| *k == id) {
                    if *first != i {
                        r.at_path(
                            &path.key("id"),
                            format!(
                                "predefined topic id {id} is already defined for some clients \
                                 (mqttsn.predefined_topic[{first}])"
                            ),
                            None,
                        );
                    }
                }
            }
            defined.entry((id, c.clone())).or_insert(i);
        }
        predefined.push(PredefinedTopic {
            id,
            topic,
            clients: if all {
                ClientSet::All
            } else {
                ClientSet::Only(p.clients.clone())
            },
        });
    }

    let spool = compile_spool(&raw.spool, &state_dir, r);

    let mut upstreams = Vec::new();
    // Unless `upstream` was there with a wrong type (and is reported for that).
    if raw.upstream.is_empty() && !r.was_reported(&KeyPath::root("upstream")) {
        r.at_span(
            Some(0..0),
            "no `[[upstream]]` is configured: sensor data would have nowhere to go".into(),
            Some("add an [[upstream]] section with name, kind and url".into()),
        );
    }
    let mut names = HashSet::new();
    for (i, u) in raw.upstream.iter().enumerate() {
        let path = KeyPath::root("upstream").index(i);
        if let Some(mut up) = compile_upstream(&path, u, gw_id.unwrap_or(0), base, r) {
            // Every filter the MQTT-SN core acknowledges fits every upstream's table.
            if let UpstreamKind::Mqtt(c) = &mut up.kind {
                c.max_subscriptions = max_filters.unwrap_or(MAX_SUBSCRIPTIONS);
            }
            if !names.insert(up.name.clone()) {
                r.at_path(
                    &path.key("name"),
                    format!("upstream name `{}` is used twice", up.name),
                    None,
                );
            }
            upstreams.push(up);
        }
    }

    Some(Config {
        file: file.to_owned(),
        gateway: GatewaySection {
            id: gw_id?,
            name: raw.gateway.name,
            state_dir,
        },
        log: LogSection {
            level: raw.log.level,
        },
        mqttsn: MqttSnSection {
            listen,
            recv_buffer: recv_buffer?,
            send_buffer: send_buffer?,
            recv_batch: recv_batch?,
            session_log_max_size: session_log_max_size? as u64,
            core: CoreConfig {
                gw_id: gw_id?,
                max_clients: max_clients?,
                max_packet_size: max_packet_size?,
                max_client_id_len: max_client_id_len?,
                max_topics_per_client: max_topics?,
                max_inflight_per_client: max_inflight?,
                qos_minus_one: m.qos_minus_one,
                predefined,
                max_subscriptions_per_client: max_subs?,
                max_filters: max_filters?,
                max_queued_per_client: max_queued?,
                max_buffered_per_sleeping_client: max_buffered?,
                queue_full: queue_full?,
                retry_interval: retry_interval?,
                max_retries: max_retries?,
                session_expiry: session_expiry?,
                max_retained: max_retained?,
                advertise_to,
                advertise_interval: advertise_interval?,
                gwinfo_to_destinations,
            },
        },
        spool: spool?,
        upstreams,
    })
}

fn compile_spool(raw: &RawSpool, state_dir: &Path, r: &mut Reporter<'_>) -> Option<SpoolSection> {
    let path = KeyPath::root("spool");
    const TIB: u64 = 1 << 40;
    let max_bytes = size_in(r, &path.key("max_bytes"), &raw.max_bytes, 1 << 20, 64 * TIB);
    let segment_bytes = size_in(
        r,
        &path.key("segment_bytes"),
        &raw.segment_bytes,
        64 << 10,
        1 << 30,
    );
    let min_free_bytes = size_in(
        r,
        &path.key("min_free_bytes"),
        &raw.min_free_bytes,
        0,
        64 * TIB,
    );
    let max_age = duration_in(
        r,
        &path.key("max_age"),
        &raw.max_age,
        Duration::ZERO,
        Duration::from_secs(10 * 365 * 86_400),
    );
    let when_full = match raw.when_full.as_str() {
        "reject_new" => Some(WhenFull::RejectNew),
        "drop_oldest" => Some(WhenFull::DropOldest),
        other => {
            r.at_path(
                &path.key("when_full"),
                format!("unknown policy `{other}`"),
                Some("use \"reject_new\" or \"drop_oldest\"".into()),
            );
            None
        }
    };
    let interval = duration_in(
        r,
        &path.key("fsync_interval"),
        &raw.fsync_interval,
        Duration::from_millis(1),
        Duration::from_secs(3600),
    );
    let fsync = match raw.fsync.as_str() {
        "always" => Some(FsyncPolicy::Always),
        "interval" => interval.map(FsyncPolicy::Interval),
        other => {
            r.at_path(
                &path.key("fsync"),
                format!("unknown fsync policy `{other}`"),
                Some("use \"always\" or \"interval\"".into()),
            );
            None
        }
    };
    let queue = int_in::<usize>(r, &path.key("queue"), raw.queue, 1, 10_000_000);
    let drain_rate = int_in::<u32>(r, &path.key("drain_rate"), raw.drain_rate, 0, 100_000_000);
    let drain_bytes_rate = size_in(
        r,
        &path.key("drain_bytes_rate"),
        &raw.drain_bytes_rate,
        0,
        TIB,
    );
    if let (Some(rate), Some(seg)) = (drain_bytes_rate, segment_bytes) {
        if rate != 0 && rate < 64 << 10 && seg > 0 {
            // A message larger than one second's budget could never be sent.
            r.at_path(
                &path.key("drain_bytes_rate"),
                "must be 0 (unlimited) or at least 64KiB".into(),
                None,
            );
        }
    }
    Some(SpoolSection {
        spool: SpoolConfig {
            dir: state_dir.join("spool"),
            max_bytes: max_bytes? as u64,
            segment_bytes: segment_bytes? as u64,
            min_free_bytes: min_free_bytes? as u64,
            max_age: max_age.filter(|a| !a.is_zero()),
            when_full: when_full?,
            fsync: fsync?,
        },
        queue: queue?,
        drain_rate: drain_rate.filter(|&r| r > 0),
        drain_bytes_rate: drain_bytes_rate.map(|r| r as u64).filter(|&r| r > 0),
    })
}

fn compile_upstream(
    path: &KeyPath,
    u: &RawUpstream,
    gw_id: u8,
    base: &Path,
    r: &mut Reporter<'_>,
) -> Option<Upstream> {
    let name = match &u.name {
        Some(name) => {
            let name_ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !name_ok {
                r.at_path(
                    &path.key("name"),
                    format!("`{name}` is not a valid upstream name"),
                    Some("use letters, digits, `-` and `_`".into()),
                );
            }
            name.clone()
        }
        None => {
            r.at_path(
                &path.key("name"),
                "is required".into(),
                Some("name each upstream, e.g. name = \"central\"".into()),
            );
            String::new()
        }
    };
    match u.kind.as_deref() {
        Some("mqtt") => {
            for (key, set) in [
                ("exchange", u.exchange.is_some()),
                ("heartbeat", u.heartbeat.is_some()),
                ("downlink_queue", u.downlink_queue.is_some()),
                ("downlink_queue_passive", u.downlink_queue_passive.is_some()),
                ("bindings", u.bindings.is_some()),
                ("max_unacked_downlinks", u.max_unacked_downlinks.is_some()),
                ("max_downlink_bytes", u.max_downlink_bytes.is_some()),
            ] {
                if set {
                    r.at_path(
                        &path.key(key),
                        "is an AMQP setting (kind = \"amqp\")".into(),
                        Some("MQTT upstreams use keep_alive".into()),
                    );
                }
            }
        }
        Some("amqp") => return compile_amqp_upstream(path, u, name, base, r),
        Some(other) => {
            let hint = diag::did_you_mean(other, &["mqtt", "amqp"])
                .map(|b| format!("did you mean `{b}`?"));
            r.at_path(
                &path.key("kind"),
                format!("unknown upstream kind `{other}`"),
                hint,
            );
            return None;
        }
        None => {
            r.at_path(
                &path.key("kind"),
                "is required".into(),
                Some("write kind = \"mqtt\"".into()),
            );
            return None;
        }
    }
    let url = u.url.clone().unwrap_or_default();
    let endpoint = match MqttUpstreamConfig::parse_url(&url) {
        _ if u.url.is_none() => {
            r.at_path(
                &path.key("url"),
                "is required".into(),
                Some("write `mqtt://host:1883` or `mqtts://host:8883`".into()),
            );
            None
        }
        Ok(e) => Some(e),
        Err(e) => {
            r.at_path(
                &path.key("url"),
                e.to_string(),
                Some("write `mqtt://host:1883` or `mqtts://host:8883`".into()),
            );
            None
        }
    };
    let version = match u.protocol.as_str() {
        "5" | "5.0" => Some(MqttVersion::V5),
        "3.1.1" | "4" => Some(MqttVersion::V311),
        other => {
            r.at_path(
                &path.key("protocol"),
                format!("unknown MQTT protocol version `{other}`"),
                Some("use \"5\" or \"3.1.1\"".into()),
            );
            None
        }
    };
    let file_of = |s: &Option<String>| s.as_ref().map(|p| base.join(p));
    let tls_wanted = endpoint.as_ref().is_some_and(|e| e.2);
    let has_tls_files = u.ca_file.is_some() || u.client_cert.is_some() || u.client_key.is_some();
    if has_tls_files && !tls_wanted && endpoint.is_some() {
        r.at_path(
            &path.key("url"),
            "TLS files are set but the URL is not `mqtts://`".into(),
            Some("use an `mqtts://` URL, or remove ca_file/client_cert/client_key".into()),
        );
    }
    if u.client_cert.is_some() != u.client_key.is_some() {
        r.at_path(
            &path.key(if u.client_cert.is_some() {
                "client_cert"
            } else {
                "client_key"
            }),
            "client_cert and client_key must be given together".into(),
            None,
        );
    }
    for (key, value) in [
        ("ca_file", &u.ca_file),
        ("client_cert", &u.client_cert),
        ("client_key", &u.client_key),
    ] {
        if let Some(p) = file_of(value) {
            if !p.is_file() {
                r.at_path(
                    &path.key(key),
                    format!("file {} does not exist", p.display()),
                    None,
                );
            }
        }
    }
    if u.password.is_some() && u.username.is_none() {
        r.at_path(
            &path.key("password"),
            "a password needs a username".into(),
            None,
        );
    }
    let client_id = u
        .client_id
        .clone()
        .unwrap_or_else(|| format!("sensorgate-{gw_id}-{name}"));
    if client_id.is_empty() || client_id.len() > 65_535 {
        r.at_path(
            &path.key("client_id"),
            "must be 1..=65535 bytes".into(),
            None,
        );
    }
    let keep_alive = duration_in(
        r,
        &path.key("keep_alive"),
        &u.keep_alive,
        Duration::from_secs(1),
        Duration::from_secs(65_535),
    );
    let link = link_settings(path, u, r);
    // The prefix starts every published topic and subscribed filter: it must be a valid
    // start of a topic name ([`topic::validate_name`]); empty means no prefix.
    let prefix_key = path.key("remote_prefix");
    match topic::validate_name(&u.remote_prefix) {
        Ok(()) | Err(TopicError::Empty) => {}
        Err(TopicError::Wildcard) => {
            r.at_path(&prefix_key, "must not contain wildcards".into(), None);
        }
        Err(other) => r.at_path(&prefix_key, format!("invalid: {other}"), None),
    }
    let (host, port, tls) = endpoint?;
    let tls = tls.then(|| TlsSettings {
        ca_file: file_of(&u.ca_file),
        client_cert: file_of(&u.client_cert),
        client_key: file_of(&u.client_key),
    });
    // Load the TLS material now, so check-config catches a wrong PEM or a mismatched key.
    let files_exist = [&u.ca_file, &u.client_cert, &u.client_key]
        .iter()
        .all(|f| file_of(f).is_none_or(|p| p.is_file()));
    if let (Some(settings), true) = (&tls, files_exist) {
        if let Err(e) = sensorgate_bridges::mqtt::build_tls_config(settings) {
            let key = if u.client_cert.is_some() {
                "client_cert"
            } else {
                "url"
            };
            r.at_path(&path.key(key), e.to_string(), None);
        }
    }
    let link = link?;
    let config = MqttUpstreamConfig {
        name: name.clone(),
        host,
        port,
        tls,
        version: version?,
        client_id,
        username: u.username.clone(),
        password: u.password.clone(),
        keep_alive: keep_alive?,
        connect_timeout: link.connect_timeout,
        backoff_initial: link.backoff_initial,
        backoff_max: link.backoff_max,
        max_inflight: link.max_inflight,
        remote_prefix: u.remote_prefix.clone(),
        request_queue: link.queue,
        max_downlink_bytes: sensorgate_bridges::mqtt::config::DEFAULT_MAX_DOWNLINK_BYTES,
        max_unacked_downlinks: sensorgate_bridges::mqtt::config::DEFAULT_MAX_UNACKED_DOWNLINKS,
        // Set from `[mqttsn] max_filters` by `compile`.
        max_subscriptions: MAX_SUBSCRIPTIONS,
        subscribe_retry: sensorgate_bridges::mqtt::config::DEFAULT_SUBSCRIBE_RETRY,
    };
    Some(Upstream {
        name,
        ack_timeout: link.ack_timeout,
        url,
        kind: UpstreamKind::Mqtt(config),
    })
}

/// The settings every upstream kind has: connect timeout, reconnect backoff, in-flight
/// window, ack timeout and request queue; `None` when one of them is wrong (reported).
fn link_settings(path: &KeyPath, u: &RawUpstream, r: &mut Reporter<'_>) -> Option<LinkSettings> {
    let connect_timeout = duration_in(
        r,
        &path.key("connect_timeout"),
        &u.connect_timeout,
        Duration::from_millis(100),
        Duration::from_secs(600),
    );
    let backoff_initial = duration_in(
        r,
        &path.key("backoff_initial"),
        &u.backoff_initial,
        Duration::from_millis(10),
        Duration::from_secs(3600),
    );
    let backoff_max = duration_in(
        r,
        &path.key("backoff_max"),
        &u.backoff_max,
        Duration::from_millis(10),
        Duration::from_secs(3600),
    );
    if let (Some(a), Some(b)) = (backoff_initial, backoff_max) {
        if a > b {
            r.at_path(
                &path.key("backoff_max"),
                "must not be below backoff_initial".into(),
                None,
            );
        }
    }
    let max_inflight = int_in::<u16>(r, &path.key("max_inflight"), u.max_inflight, 1, 65_535);
    let ack_timeout = duration_in(
        r,
        &path.key("ack_timeout"),
        &u.ack_timeout,
        Duration::from_millis(100),
        Duration::from_secs(3600),
    );
    let queue = int_in::<usize>(r, &path.key("queue"), u.queue, 1, 1_000_000);
    Some(LinkSettings {
        connect_timeout: connect_timeout?,
        backoff_initial: backoff_initial?,
        backoff_max: backoff_max?,
        max_inflight: max_inflight?,
        ack_timeout: ack_timeout?,
        queue: queue?,
    })
}

/// See [`link_settings`].
struct LinkSettings {
    connect_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    max_inflight: u16,
    ack_timeout: Duration,
    queue: usize,
}

/// `[[upstream]] kind = "amqp"`: URL (credentials and vhost in it), exchange, heartbeat,
/// TLS files, the downlink queue and its bindings, and the settings shared with MQTT
/// (timeouts, backoff, window, queue).
fn compile_amqp_upstream(
    path: &KeyPath,
    u: &RawUpstream,
    name: String,
    base: &Path,
    r: &mut Reporter<'_>,
) -> Option<Upstream> {
    use sensorgate_bridges::amqp::config::{
        DEFAULT_EXCHANGE, DEFAULT_MAX_DOWNLINK_BYTES, DEFAULT_MAX_UNACKED_DOWNLINKS, DownlinkQueue,
        MAX_BINDINGS, MAX_ROUTING_KEY_BYTES, TlsSettings,
    };
    // MQTT-only keys are errors rather than silently ignored.
    for (key, set) in [
        ("remote_prefix", !u.remote_prefix.is_empty()),
        ("client_id", u.client_id.is_some()),
        ("username", u.username.is_some()),
        ("password", u.password.is_some()),
    ] {
        if set {
            r.at_path(
                &path.key(key),
                "is not an AMQP upstream setting".into(),
                Some(
                    "credentials and vhost go in the URL: amqp://user:pass@host:5672/vhost".into(),
                ),
            );
        }
    }
    let hint = || Some("write `amqp://user:pass@host:5672/%2f` or `amqps://...`".to_owned());
    let url = match &u.url {
        None => {
            r.at_path(&path.key("url"), "is required".into(), hint());
            None
        }
        Some(url) => match AmqpUpstreamConfig::parse_url(url) {
            Ok(_) => Some(url.clone()),
            Err(e) => {
                r.at_path(&path.key("url"), e.to_string(), hint());
                None
            }
        },
    };
    let exchange = u
        .exchange
        .clone()
        .unwrap_or_else(|| DEFAULT_EXCHANGE.to_owned());
    if exchange.len() > MAX_ROUTING_KEY_BYTES {
        r.at_path(
            &path.key("exchange"),
            "must be at most 255 bytes".into(),
            None,
        );
    }
    let heartbeat = duration_in(
        r,
        &path.key("heartbeat"),
        u.heartbeat.as_deref().unwrap_or("30s"),
        Duration::ZERO,
        Duration::from_secs(65_535),
    );
    let tls_url = url.as_deref().is_some_and(|u| u.starts_with("amqps://"));
    let file_of = |s: &Option<String>| s.as_ref().map(|p| base.join(p));
    let has_tls_files = u.ca_file.is_some() || u.client_cert.is_some() || u.client_key.is_some();
    if has_tls_files && !tls_url && url.is_some() {
        r.at_path(
            &path.key("url"),
            "TLS files are set but the URL is not `amqps://`".into(),
            Some("use an `amqps://` URL, or remove ca_file/client_cert/client_key".into()),
        );
    }
    if u.client_cert.is_some() != u.client_key.is_some() {
        let key = if u.client_cert.is_some() {
            "client_cert"
        } else {
            "client_key"
        };
        r.at_path(
            &path.key(key),
            "client_cert and client_key must be given together".into(),
            None,
        );
    }
    let mut files_exist = true;
    for (key, value) in [
        ("ca_file", &u.ca_file),
        ("client_cert", &u.client_cert),
        ("client_key", &u.client_key),
    ] {
        if let Some(p) = file_of(value).filter(|p| !p.is_file()) {
            files_exist = false;
            r.at_path(
                &path.key(key),
                format!("file {} does not exist", p.display()),
                None,
            );
        }
    }
    let tls = TlsSettings {
        ca_file: file_of(&u.ca_file),
        client_cert: file_of(&u.client_cert),
        client_key: file_of(&u.client_key),
    };
    // Load the TLS material now, so check-config catches a wrong PEM or a mismatched key.
    if tls_url && files_exist && u.client_cert.is_some() == u.client_key.is_some() {
        if let Err(e) = sensorgate_bridges::mqtt::build_tls_config(&tls) {
            let key = if u.client_cert.is_some() {
                "client_cert"
            } else if u.ca_file.is_some() {
                "ca_file"
            } else {
                "url"
            };
            r.at_path(&path.key(key), e.to_string(), None);
        }
    }
    let passive = u.downlink_queue_passive.unwrap_or(false);
    let downlink_queue = match (&u.downlink_queue, passive) {
        (None, false) => Some(DownlinkQueue::ServerNamed),
        (None, true) => {
            r.at_path(
                &path.key("downlink_queue_passive"),
                "needs `downlink_queue`: the name of the existing queue".into(),
                None,
            );
            None
        }
        (Some(q), _) if q.is_empty() || q.len() > MAX_ROUTING_KEY_BYTES => {
            r.at_path(
                &path.key("downlink_queue"),
                "must be 1 to 255 bytes".into(),
                None,
            );
            None
        }
        (Some(q), false) => Some(DownlinkQueue::Durable(q.clone())),
        (Some(q), true) => Some(DownlinkQueue::Passive(q.clone())),
    };
    let bindings = u.bindings.clone().unwrap_or_default();
    let bindings_path = path.key("bindings");
    if passive && !bindings.is_empty() {
        r.at_path(
            &bindings_path,
            "a passive downlink queue is used as-is: the gateway binds nothing".into(),
            Some("bind the queue on the broker, or drop downlink_queue_passive".into()),
        );
    }
    if bindings.len() > MAX_BINDINGS {
        r.at_path(
            &bindings_path,
            format!("at most {MAX_BINDINGS} binding keys"),
            None,
        );
    }
    for (i, key) in bindings.iter().enumerate() {
        if key.len() > MAX_ROUTING_KEY_BYTES {
            r.at_path(
                &bindings_path.index(i),
                "must be at most 255 bytes".into(),
                None,
            );
        }
    }
    let max_unacked_downlinks = match u.max_unacked_downlinks {
        Some(v) => int_in::<u16>(
            r,
            &path.key("max_unacked_downlinks"),
            v,
            1,
            i64::from(u16::MAX),
        ),
        None => Some(DEFAULT_MAX_UNACKED_DOWNLINKS),
    };
    let max_downlink_bytes = match &u.max_downlink_bytes {
        Some(text) => size_in(
            r,
            &path.key("max_downlink_bytes"),
            text,
            1,
            128 * 1024 * 1024,
        ),
        None => Some(DEFAULT_MAX_DOWNLINK_BYTES),
    };
    let link = link_settings(path, u, r);
    let link = link?;
    let mut config = AmqpUpstreamConfig::new(name.clone(), url?);
    config.tls = tls;
    config.downlink_queue = downlink_queue?;
    config.bindings = bindings;
    config.max_unacked_downlinks = max_unacked_downlinks?;
    config.max_downlink_bytes = max_downlink_bytes?;
    config.exchange = exchange;
    config.heartbeat = heartbeat?;
    config.connect_timeout = link.connect_timeout;
    config.backoff_initial = link.backoff_initial;
    config.backoff_max = link.backoff_max;
    config.max_inflight = link.max_inflight;
    config.request_queue = link.queue;
    Some(Upstream {
        name,
        ack_timeout: link.ack_timeout,
        // Summaries and logs never show the password.
        url: config.redacted_url(),
        kind: UpstreamKind::Amqp(config),
    })
}

#[cfg(test)]
mod tests;
