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
//!
//! Layout: one module per section (`gateway` for `[gateway]` and `[log]`, `mqttsn`, `coap`,
//! `http`, `serial`, `spool`, `admin`, `upstream`), each with its raw struct (as written, with defaults) and its compile function;
//! `check` holds the range checks they share; this module deserializes the document, knows
//! which keys each section has, and joins the sections into [`Config`].

mod admin;
mod check;
mod coap;
mod diag;
mod dtls;
mod fleet;
mod gateway;
mod http;
mod mqttsn;
mod route;
mod security;
mod serial;
mod spool;
pub mod units;
mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sensorgate_bridges::amqp::config::DownlinkQueue;
use sensorgate_bridges::mqtt::{MAX_SUBSCRIPTIONS, MqttVersion};
use sensorgate_bridges::route::{RouteSpec, RouteTable};
use sensorgate_bridges::spool::{FsyncPolicy, WhenFull};
use serde::Deserialize;
use serde::de::{Deserializer, Visitor};

use admin::RawAdmin;
pub use admin::{AdminSection, DEFAULT_ADMIN_LISTEN, MIN_TOKEN_LEN};
use coap::RawCoap;
pub use coap::{COAP_PORT, CoapSection};
pub use diag::{Diagnostic, KeyPath};
use diag::{Reporter, fields_of, path_of_span, remove_value};
pub use dtls::{COAPS_PORT, DtlsSection};
use dtls::{RawDtls, RawPsk};
pub use fleet::{FleetSection, GATEWAY_ID_PLACEHOLDER, ReplaySection, StatePayload};
use fleet::{RawFleet, RawReplay};
pub use gateway::{GatewaySection, LogSection};
use gateway::{RawGateway, RawLog};
pub(crate) use http::check_prefix as http_check_prefix;
pub use http::{
    ANONYMOUS_ID, ClientCertMode, DeviceSpec, HttpSection, JwtAlgorithm, JwtKeyFile, JwtSpec,
    MAX_DEVICE_ID_LEN, SseQueueFull, TlsFiles,
};
use http::{RawDevice, RawHttp, RawJwt};
pub use mqttsn::MqttSnSection;
use mqttsn::{RawMqttSn, RawPredefined};
use route::RawRoute;
pub use route::{MAX_REWRITE_BYTES, MAX_ROUTES, PLACEHOLDERS};
pub use security::{MAX_ACL_RULES, MAX_LIMIT_OVERRIDES, MAX_PATTERNS_PER_RULE};
use security::{RawAcl, RawLimitOverride, RawLimits};
use serial::RawSerial;
pub use serial::{FlowControl, MAX_SERIAL_LINES, Parity, SerialLine};
use spool::RawSpool;
pub use spool::SpoolSection;
use upstream::RawUpstream;
pub use upstream::{Upstream, UpstreamKind};

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
    /// `[coap]`; `None` when the table is absent or its `listen` and `dtls_listen` are
    /// empty (CoAP off).
    pub coap: Option<CoapSection>,
    /// `[dtls]` and `[[psk]]` (the DTLS layer under `dtls_listen`).
    pub dtls: DtlsSection,
    /// `[http]`; `None` when the table is absent or both `listen` and `tls_listen` are empty
    /// (HTTP off).
    pub http: Option<HttpSection>,
    /// `[spool]`.
    pub spool: SpoolSection,
    /// `[admin]`.
    pub admin: AdminSection,
    /// `[fleet]` (and `[fleet.replay]`).
    pub fleet: FleetSection,
    /// `[[serial]]`, in file order (a line's index is its `PeerAddr::Serial` line).
    pub serial: Vec<SerialLine>,
    /// `[[upstream]]`, in file order.
    pub upstreams: Vec<Upstream>,
    /// `[[route]]`, compiled against `upstreams` (indexes are theirs);
    /// [`RouteTable::everything`] when there is none.
    pub routes: Arc<RouteTable>,
    /// `[[route]]` as written, in file order (for summaries).
    pub route_specs: Vec<RouteSpec>,
    /// `[[acl]]` and `[limits]`, compiled (also in each ingress's settings:
    /// `mqttsn.core.security`, `coap.core.security`, `http.security`).
    pub security: Arc<crate::security::Policy>,
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

    /// The router's bound on distinct sensor filters over every ingress (see
    /// [`router_max_filters`]).
    pub fn max_filters(&self) -> usize {
        router_max_filters(
            self.mqttsn.core.max_filters,
            self.coap.as_ref().map(|c| c.core.max_filters),
            self.http.as_ref().map(|h| h.max_filters),
        )
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
        for addr in &self.mqttsn.dtls_listen {
            s.push_str(&format!("listener: MQTT-SN over DTLS on {addr}\n"));
        }
        for line in &self.serial {
            s.push_str(&format!(
                "listener: MQTT-SN over serial on {} ({} baud, {}{}{}, {} framing{}{})\n",
                line.device,
                line.baud,
                line.data_bits,
                match line.parity {
                    Parity::None => 'N',
                    Parity::Even => 'E',
                    Parity::Odd => 'O',
                },
                line.stop_bits,
                match line.framing {
                    crate::serial::framing::Framing::Length => "length".to_owned(),
                    crate::serial::framing::Framing::Slip { crc } => format!(
                        "slip/{}",
                        match crc {
                            crate::serial::framing::Crc::None => "no crc",
                            crate::serial::framing::Crc::Crc16 => "crc16",
                            crate::serial::framing::Crc::Crc32 => "crc32",
                        }
                    ),
                },
                match line.flow_control {
                    FlowControl::None => "",
                    FlowControl::Hardware => ", RTS/CTS",
                    FlowControl::Software => ", XON/XOFF",
                },
                if line.forwarder { ", forwarder" } else { "" },
            ));
        }
        let forwarders = self.mqttsn.forwarders.entries();
        if !forwarders.is_empty() {
            let list: Vec<String> = forwarders.iter().map(ToString::to_string).collect();
            s.push_str(&format!("MQTT-SN forwarders: {}\n", list.join(", ")));
        }
        match &self.coap {
            Some(coap) => {
                for addr in &coap.listen {
                    s.push_str(&format!("listener: CoAP over UDP on {addr}\n"));
                }
                for addr in &coap.dtls_listen {
                    s.push_str(&format!("listener: CoAP over DTLS on {addr}\n"));
                }
            }
            None => s.push_str("listener: CoAP off\n"),
        }
        match &self.http {
            Some(http) => s.push_str(&http.summary_listeners()),
            None => s.push_str("listener: HTTP off\n"),
        }
        match self.admin.listen {
            Some(addr) => s.push_str(&format!(
                "listener: admin (metrics, health, status, console) on http://{addr}/{}\n",
                if self.admin.token.is_some() {
                    ", bearer token required"
                } else {
                    ""
                }
            )),
            None => s.push_str("listener: admin off\n"),
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
        if let Some(coap) = &self.coap {
            let c = &coap.core;
            s.push_str(&format!(
                "coap: up to {} peers, messages up to {}, bodies up to {}, {} observers; a CON \
                 is answered on its ACK when durable within {}, else separately\n",
                c.max_peers,
                units::format_size(c.max_message_size as u64),
                units::format_size(c.max_body_size as u64),
                c.max_observers,
                humantime::format_duration(c.ack_wait),
            ));
        }
        if let Some(http) = &self.http {
            s.push_str(&http.summary_limits());
        }
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
            let limit = &u.max_backlog;
            let bytes = limit.bytes.map(units::format_size);
            let age = limit.age.map(|a| humantime::format_duration(a).to_string());
            let bounds: Vec<String> = bytes.into_iter().chain(age).collect();
            if !bounds.is_empty() {
                s.push_str(&format!(
                    "upstream {}: backlog at most {}, beyond it its oldest records are given up \
                     for it alone (counted)\n",
                    u.name,
                    bounds.join(" and ")
                ));
            }
        }
        s.push_str(&self.fleet_summary());
        match &self.security.acl {
            Some(acl) => s.push_str(&format!(
                "acl: {} rule(s), what none allows is refused\n",
                acl.rules().len()
            )),
            None => s.push_str("acl: none, every topic allowed\n"),
        }
        let limits = &self.security.limits;
        if limits.is_active() {
            let d = &limits.default;
            let rate = |r: &crate::security::Rate, unit: &str| {
                if r.is_limited() {
                    format!("{} {unit}/s (burst {})", r.per_second, r.burst)
                } else {
                    format!("{unit}/s unlimited")
                }
            };
            s.push_str(&format!(
                "limits per identity: {}, {}, messages up to {}, {} override(s), {} identities \
                 tracked per ingress\n",
                rate(&d.messages, "msg"),
                rate(&d.bytes, "B"),
                d.max_message_size.map_or_else(
                    || "the protocols' limits".to_owned(),
                    |m| units::format_size(m as u64)
                ),
                limits.per_identity.len(),
                limits.max_identities,
            ));
        }
        if self.route_specs.is_empty() {
            s.push_str("routes: none, every message goes to every upstream unchanged\n");
        }
        for (i, spec) in self.route_specs.iter().enumerate() {
            s.push_str(&format!(
                "route {i}: `{}` to {}",
                spec.filter,
                spec.upstreams.join(", ")
            ));
            if let Some(p) = &spec.strip_prefix {
                s.push_str(&format!(", strip `{p}`"));
            }
            if let Some(p) = &spec.add_prefix {
                s.push_str(&format!(", add `{p}`"));
            }
            if let Some(t) = &spec.template {
                s.push_str(&format!(", as `{t}`"));
            }
            if let Some(q) = spec.qos_max {
                s.push_str(&format!(", QoS at most {}", route::qos_number(q)));
            }
            s.push('\n');
        }
        if !self.route_specs.is_empty() {
            s.push_str("routes: a message no route matches is refused\n");
        }
        s
    }
}

impl Config {
    /// The `check-config` line of `[fleet]`.
    fn fleet_summary(&self) -> String {
        let f = &self.fleet;
        if !f.enabled {
            return "fleet: off (no birth, Will, heartbeat or events upstream)\n".to_owned();
        }
        format!(
            "fleet: presence on `{}/state` (retained, Will{}), heartbeat {} on `/status`, events \
             on `/events` (at most {}/min), QoS {}, replay {}\n",
            f.topic_prefix,
            match f.state_payload {
                StatePayload::Json => "",
                StatePayload::Text => ", plain text",
            },
            f.heartbeat.map_or_else(
                || "off".to_owned(),
                |h| format!("every {}", humantime::format_duration(h))
            ),
            f.max_events_per_minute,
            route::qos_number(f.qos),
            if f.replay.enabled { "on" } else { "off" },
        )
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
        ["coap"] => fields_of::<RawCoap>(),
        ["dtls"] => fields_of::<RawDtls>(),
        ["psk"] => fields_of::<RawPsk>(),
        ["http"] => fields_of::<RawHttp>(),
        ["http", "device"] => fields_of::<RawDevice>(),
        ["http", "jwt"] => fields_of::<RawJwt>(),
        ["spool"] => fields_of::<RawSpool>(),
        ["admin"] => fields_of::<RawAdmin>(),
        ["fleet"] => fields_of::<RawFleet>(),
        ["fleet", "replay"] => fields_of::<RawReplay>(),
        ["upstream"] => fields_of::<RawUpstream>(),
        ["route"] => fields_of::<RawRoute>(),
        ["serial"] => fields_of::<RawSerial>(),
        ["acl"] => fields_of::<RawAcl>(),
        ["limits"] => fields_of::<RawLimits>(),
        ["limits", "identity"] => fields_of::<RawLimitOverride>(),
        _ => &[],
    }
}

// ---------------------------------------------------------------------------------------------
// Raw, as written. Each section's raw struct and its defaults live in the section's module;
// `config/sensorgate.toml` documents the defaults.

/// A string value that stands for something else (a duration, a size): its own type, so that
/// a value of the wrong type is reported as what the key expects ("expected a duration such
/// as \"10s\""), not as "expected a string". Parsed where its section is compiled.
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

/// A number that may be written as an integer or with a fraction (`2` or `1.5`): TOML tells
/// them apart, the config does not.
#[derive(Debug, Clone, Copy)]
struct Number(f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Num;
        impl Visitor<'_> for Num {
            type Value = f64;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number such as 1.5")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<f64, E> {
                Ok(v)
            }
            #[allow(clippy::cast_precision_loss)] // Config numbers are small.
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<f64, E> {
                Ok(v as f64)
            }
            #[allow(clippy::cast_precision_loss)] // Config numbers are small.
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<f64, E> {
                Ok(v as f64)
            }
        }
        deserializer.deserialize_any(Num).map(Number)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    gateway: RawGateway,
    log: RawLog,
    mqttsn: RawMqttSn,
    coap: RawCoap,
    dtls: RawDtls,
    psk: Vec<RawPsk>,
    http: RawHttp,
    spool: RawSpool,
    admin: RawAdmin,
    fleet: RawFleet,
    upstream: Vec<RawUpstream>,
    route: Vec<RawRoute>,
    serial: Vec<RawSerial>,
    acl: Vec<RawAcl>,
    limits: RawLimits,
}

// ---------------------------------------------------------------------------------------------
// Compilation: raw -> validated, collecting every error. Each section compiles in its module;
// this joins them.

fn compile(file: &Path, raw: RawConfig, r: &mut Reporter<'_>) -> Option<Config> {
    let base = file.parent().unwrap_or(Path::new("."));
    let state_dir = raw.gateway.state_dir(base);
    let gateway = gateway::compile_gateway(&raw.gateway, state_dir.clone(), r);
    let gw_id = gateway.as_ref().map(|g| g.id);
    let log = gateway::compile_log(raw.log, r);
    let mqttsn = mqttsn::compile_mqttsn(&raw.mqttsn, gw_id, r);
    let mqttsn_udp: Vec<SocketAddr> = raw
        .mqttsn
        .listen_addrs()
        .into_iter()
        .chain(raw.mqttsn.dtls_listen_addrs())
        .collect();
    let coap = coap::compile_coap(&raw.coap, &mqttsn_udp, r);
    let dtls = dtls::compile_dtls(&raw.dtls, &raw.psk, base, r);
    if let (Some(dtls), Some(m)) = (&dtls, &mqttsn) {
        let mut plain: Vec<(KeyPath, SocketAddr)> = (0..)
            .zip(&m.listen)
            .map(|(i, a)| (KeyPath::root("mqttsn").key("listen").index(i), *a))
            .collect();
        let mut secure =
            (!m.dtls_listen.is_empty()).then(|| KeyPath::root("mqttsn").key("dtls_listen"));
        if let Some(c) = &coap {
            plain.extend(
                (0..)
                    .zip(&c.listen)
                    .map(|(i, a)| (KeyPath::root("coap").key("listen").index(i), *a)),
            );
            if secure.is_none() && !c.dtls_listen.is_empty() {
                secure = Some(KeyPath::root("coap").key("dtls_listen"));
            }
        }
        dtls::check_listeners(dtls, &plain, secure.as_ref(), r);
    }
    let serial = serial::compile_serial(
        &raw.serial,
        mqttsn.as_ref().map(|m| m.core.max_packet_size),
        r,
    );
    let spool = spool::compile_spool(&raw.spool, &state_dir, r);
    let admin = admin::compile_admin(&raw.admin, r);
    let fleet = fleet::compile_fleet(&raw.fleet, gw_id.unwrap_or(0), r);
    let http = http::compile_http(&raw.http, base, raw.admin.listen_addr(), r);
    let http_on = |h: &HttpSection| !h.listen.is_empty() || !h.tls_listen.is_empty();
    let max_filters = router_max_filters(
        mqttsn
            .as_ref()
            .map_or(MAX_SUBSCRIPTIONS, |m| m.core.max_filters),
        coap.as_ref()
            .filter(|c| !c.listen.is_empty() || !c.dtls_listen.is_empty())
            .map(|c| c.core.max_filters),
        http.as_ref().filter(|h| http_on(h)).map(|h| h.max_filters),
    );
    let upstreams =
        upstream::compile_upstreams(&raw.upstream, gw_id.unwrap_or(0), base, max_filters, r);
    let known: Vec<&str> = raw.upstream.iter().filter_map(|u| u.name()).collect();
    let compiled: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
    let all_compiled = compiled.len() == raw.upstream.len();
    let routes = route::compile_routes(
        &raw.route,
        &known,
        all_compiled.then_some(compiled.as_slice()),
        gw_id.unwrap_or(0),
        r,
    );
    let security = security::compile_security(&raw.acl, &raw.limits, r);
    let routes = routes?;
    let dtls = dtls?;
    let mut coap = coap?;
    let mut http = http?;
    let mut mqttsn = mqttsn?;
    let mut security = security?;
    // A ClientId bound to a [[psk]] identity is that identity's alone, on every listener.
    Arc::make_mut(&mut security).reserved_client_ids = dtls
        .settings
        .psk
        .iter()
        .flat_map(|p| p.client_ids.iter().cloned())
        .collect();
    // Acknowledged records stay on disk for replays only while replays are served.
    let mut spool = spool?;
    spool.spool.retain_bytes = fleet
        .as_ref()
        .filter(|f| f.enabled && f.replay.enabled)
        .map_or(0, |f| f.replay.keep_acknowledged);
    // The fleet view's topics are the gateway's own: no sensor publishes under them.
    Arc::make_mut(&mut security).reserved_topic_prefix = fleet
        .as_ref()
        .filter(|f| f.enabled)
        .map(|f| Arc::from(f.topic_prefix.as_str()));
    mqttsn.core.security = Arc::clone(&security);
    coap.core.security = Arc::clone(&security);
    http.security = Arc::clone(&security);
    Some(Config {
        file: file.to_owned(),
        gateway: gateway?,
        log,
        mqttsn,
        coap: (!coap.listen.is_empty() || !coap.dtls_listen.is_empty()).then_some(coap),
        dtls,
        http: http_on(&http).then_some(http),
        spool,
        admin: admin?,
        fleet: fleet?,
        serial,
        upstreams,
        routes: routes.table,
        route_specs: routes.specs,
        security,
    })
}

/// The router's bound on distinct sensor filters over all ingresses, which also sizes every
/// upstream's subscription table: the sum of the ingresses' own `max_filters` (`coap`,
/// `http`: `None` when that ingress is off), at most [`MAX_SUBSCRIPTIONS`]. The sum, not the
/// larger one, so that one ingress holding all it may cannot starve the others; the cap is
/// what an upstream's table holds.
pub fn router_max_filters(mqttsn: usize, coap: Option<usize>, http: Option<usize>) -> usize {
    mqttsn
        .saturating_add(coap.unwrap_or(0))
        .saturating_add(http.unwrap_or(0))
        .min(MAX_SUBSCRIPTIONS)
}

#[cfg(test)]
mod tests;
