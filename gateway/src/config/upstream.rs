//! `[[upstream]]`: where the spooled messages go, MQTT or AMQP, with the link settings every
//! kind shares.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use sensorgate_bridges::amqp::AmqpUpstreamConfig;
use sensorgate_bridges::mqtt::{MAX_SUBSCRIPTIONS, MqttUpstreamConfig, MqttVersion, TlsSettings};
use sensorgate_bridges::spool::BacklogLimit;
use sensorgate_bridges::topic::{self, TopicError};
use serde::Deserialize;

use super::check::{duration_in, int_in, size_in};
use super::diag::{self, KeyPath, Reporter};
use super::{DurationText, SizeText};

/// One `[[upstream]]`.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its unique name.
    pub name: String,
    /// A QoS >= 1 message unacknowledged this long means the broker is gone: reconnect and
    /// resend.
    pub ack_timeout: Duration,
    /// How far this upstream may fall behind (`max_backlog`, `max_backlog_age`); past it, its
    /// oldest records are given up for this upstream only (counted), so a dead link cannot
    /// fill the spool and stop the others. Unbounded by default.
    pub max_backlog: BacklogLimit,
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

#[derive(Debug, Deserialize)]
pub(super) struct RawUpstream {
    /// Required (reported in [`compile_upstream`], with the other errors).
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
    /// Spool bytes behind this upstream's cursor at most; unbounded when absent.
    #[serde(default)]
    max_backlog: Option<SizeText>,
    /// Age of the oldest record behind this upstream's cursor at most; unbounded when absent.
    #[serde(default)]
    max_backlog_age: Option<DurationText>,
    /// `kind = "amqp"` only; default [`sensorgate_bridges::amqp::config::DEFAULT_EXCHANGE`].
    #[serde(default)]
    exchange: Option<String>,
    /// `kind = "amqp"` only; default `30s`.
    #[serde(default)]
    heartbeat: Option<DurationText>,
    /// `kind = "amqp"` only: the virtual host, replacing the URL's.
    #[serde(default)]
    vhost: Option<String>,
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

impl RawUpstream {
    /// The name as written, if any.
    pub(super) fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
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

/// Every `[[upstream]]`, in file order; those with an error are reported and left out.
/// `max_filters` is `[mqttsn] max_filters`: every filter the MQTT-SN core acknowledges must
/// fit every upstream's subscription table.
pub(super) fn compile_upstreams(
    raw: &[RawUpstream],
    gw_id: u8,
    base: &Path,
    max_filters: usize,
    r: &mut Reporter<'_>,
) -> Vec<Upstream> {
    let mut upstreams = Vec::new();
    // Unless `upstream` was there with a wrong type (and is reported for that).
    if raw.is_empty() && !r.was_reported(&KeyPath::root("upstream")) {
        r.at_span(
            Some(0..0),
            "no `[[upstream]]` is configured: sensor data would have nowhere to go".into(),
            Some("add an [[upstream]] section with name, kind and url".into()),
        );
    }
    let mut names = HashSet::new();
    for (i, u) in raw.iter().enumerate() {
        let path = KeyPath::root("upstream").index(i);
        if let Some(mut up) = compile_upstream(&path, u, gw_id, base, r) {
            // Every filter the MQTT-SN core acknowledges fits every upstream's table, with
            // one more for the fleet's control topic (replay requests, see `Router::control`).
            if let UpstreamKind::Mqtt(c) = &mut up.kind {
                c.max_subscriptions = (max_filters + 1).min(MAX_SUBSCRIPTIONS);
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
    upstreams
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
                ("vhost", u.vhost.is_some()),
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
        if let Some(p) = file_of(value)
            && !p.is_file()
        {
            r.at_path(
                &path.key(key),
                format!("file {} does not exist", p.display()),
                None,
            );
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
    if let (Some(settings), true) = (&tls, files_exist)
        && let Err(e) = sensorgate_bridges::mqtt::build_tls_config(settings)
    {
        let key = if u.client_cert.is_some() {
            "client_cert"
        } else {
            "url"
        };
        r.at_path(&path.key(key), e.to_string(), None);
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
        // Set from `[fleet]` by the wiring.
        presence: None,
    };
    Some(Upstream {
        name,
        ack_timeout: link.ack_timeout,
        max_backlog: link.max_backlog,
        url,
        kind: UpstreamKind::Mqtt(config),
    })
}

/// The settings every upstream kind has: connect timeout, reconnect backoff, in-flight
/// window, ack timeout, request queue and backlog cap; `None` when one of them is wrong
/// (reported).
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
    if let (Some(a), Some(b)) = (backoff_initial, backoff_max)
        && a > b
    {
        r.at_path(
            &path.key("backoff_max"),
            "must not be below backoff_initial".into(),
            None,
        );
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
    let max_backlog = backlog_limit(path, u, r);
    Some(LinkSettings {
        connect_timeout: connect_timeout?,
        backoff_initial: backoff_initial?,
        backoff_max: backoff_max?,
        max_inflight: max_inflight?,
        ack_timeout: ack_timeout?,
        max_backlog: max_backlog?,
        queue: queue?,
    })
}

/// `max_backlog` and `max_backlog_age`, each unbounded when absent; `None` when one is wrong
/// (reported).
fn backlog_limit(path: &KeyPath, u: &RawUpstream, r: &mut Reporter<'_>) -> Option<BacklogLimit> {
    let bytes = match &u.max_backlog {
        None => Some(None),
        Some(text) => size_in(r, &path.key("max_backlog"), text, MIN_BACKLOG, MAX_BACKLOG)
            .map(|b| Some(b as u64)),
    };
    let age = match &u.max_backlog_age {
        None => Some(None),
        Some(text) => duration_in(
            r,
            &path.key("max_backlog_age"),
            text,
            MIN_BACKLOG_AGE,
            MAX_BACKLOG_AGE,
        )
        .map(Some),
    };
    Some(BacklogLimit {
        bytes: bytes?,
        age: age?,
    })
}

/// The range of `max_backlog`: below a mebibyte a short hiccup would already cost records.
const MIN_BACKLOG: u64 = 1 << 20;
const MAX_BACKLOG: u64 = 64 << 40;
/// The range of `max_backlog_age`.
const MIN_BACKLOG_AGE: Duration = Duration::from_secs(1);
const MAX_BACKLOG_AGE: Duration = Duration::from_secs(10 * 365 * 86_400);

/// See [`link_settings`].
struct LinkSettings {
    connect_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    max_inflight: u16,
    ack_timeout: Duration,
    queue: usize,
    max_backlog: BacklogLimit,
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
    ] {
        if set {
            r.at_path(
                &path.key(key),
                "is not an AMQP upstream setting".into(),
                Some("AMQP takes username, password and vhost (or all in the URL)".into()),
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
    if tls_url
        && files_exist
        && u.client_cert.is_some() == u.client_key.is_some()
        && let Err(e) = sensorgate_bridges::mqtt::build_tls_config(&tls)
    {
        let key = if u.client_cert.is_some() {
            "client_cert"
        } else if u.ca_file.is_some() {
            "ca_file"
        } else {
            "url"
        };
        r.at_path(&path.key(key), e.to_string(), None);
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
    config.username.clone_from(&u.username);
    config.password.clone_from(&u.password);
    config.vhost.clone_from(&u.vhost);
    config.heartbeat = heartbeat?;
    config.connect_timeout = link.connect_timeout;
    config.backoff_initial = link.backoff_initial;
    config.backoff_max = link.backoff_max;
    config.max_inflight = link.max_inflight;
    config.request_queue = link.queue;
    Some(Upstream {
        name,
        ack_timeout: link.ack_timeout,
        max_backlog: link.max_backlog,
        // Summaries and logs never show the password.
        url: config.redacted_url(),
        kind: UpstreamKind::Amqp(config),
    })
}
