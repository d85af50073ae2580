//! Configuration of one AMQP 0-9-1 upstream, checked before anything starts.
//!
//! The broker is written as a URL; credentials and the vhost come from it (RabbitMQ's URI
//! spec; `%2f` is the default vhost `/`):
//!
//! ```text
//! amqp://guest:guest@127.0.0.1:5672/%2f     plain TCP (default port 5672)
//! amqps://user:secret@rabbit.example/site    TLS (default port 5671), rustls with ring
//! ```
//!
//! Unlike an MQTT upstream's URL, this one may carry credentials: the gateway logs only
//! [`AmqpUpstreamConfig::redacted_url`].
//!
//! `amqps://` uses the same rustls configuration as an `mqtts://` upstream
//! ([`build_tls_config`](crate::mqtt::build_tls_config), the ring provider): `ca_file` (PEM)
//! replaces the system roots, `client_cert` + `client_key` (PEM) present a client certificate.

use std::sync::Arc;
use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};
use rustls::ClientConfig;

pub use crate::mqtt::TlsSettings;

/// Default exchange the messages are published to (RabbitMQ's MQTT plugin uses it too).
pub const DEFAULT_EXCHANGE: &str = "amq.topic";
/// Default heartbeat interval negotiated with the broker.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Default bound on one connection attempt (TCP + TLS + AMQP handshake + channel setup).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default first reconnect delay.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Default largest reconnect delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Default bound on outstanding tracked (confirm-awaited) publishes.
pub const DEFAULT_MAX_INFLIGHT: u16 = 100;
/// Default capacity of the request channel into the connection task.
pub const DEFAULT_REQUEST_QUEUE: usize = 1024;
/// Largest routing key AMQP 0-9-1 can carry (a short string).
pub const MAX_ROUTING_KEY_BYTES: usize = 255;
/// Default prefetch (`basic.qos`): downlink deliveries handed out and not yet acknowledged.
pub const DEFAULT_MAX_UNACKED_DOWNLINKS: u16 = crate::mqtt::config::DEFAULT_MAX_UNACKED_DOWNLINKS;
/// Default largest downlink body; bigger ones are acknowledged, dropped and counted.
pub const DEFAULT_MAX_DOWNLINK_BYTES: usize = crate::mqtt::config::DEFAULT_MAX_DOWNLINK_BYTES;
/// Most configured `bindings`.
pub const MAX_BINDINGS: usize = 64;

/// Where downlink messages are consumed from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum DownlinkQueue {
    /// A server-named, exclusive, auto-delete queue declared on every connection (the
    /// default): the broker deletes it with the connection, so nothing is kept for the
    /// gateway while the link is down (like an MQTT clean session).
    #[default]
    ServerNamed,
    /// A named durable queue the gateway declares (and binds): messages wait in it while the
    /// gateway is away, and unacknowledged ones are redelivered.
    Durable(String),
    /// An existing queue, used as-is: checked with a passive declare (missing is a connect
    /// failure), never bound by the gateway (neither `bindings` nor subscriptions).
    Passive(String),
}

/// Settings of one AMQP upstream.
#[derive(Clone, Debug)]
pub struct AmqpUpstreamConfig {
    /// Name used in logs.
    pub name: String,
    /// `amqp://` or `amqps://` URL, with credentials and vhost unless given below.
    pub url: String,
    /// User name; replaces the URL's (so the password need not be in a URL).
    pub username: Option<String>,
    /// Password; replaces the URL's.
    pub password: Option<String>,
    /// Virtual host; replaces the URL's path (unescaped: `/`, not `%2f`).
    pub vhost: Option<String>,
    /// Exchange every message is published to.
    pub exchange: String,
    /// Heartbeat interval asked of the broker (whole seconds; zero turns heartbeats off).
    pub heartbeat: Duration,
    /// Bound on one connection attempt.
    pub connect_timeout: Duration,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Tracked publishes accepted and not yet reported, at most.
    pub max_inflight: u16,
    /// Capacity of the request channel into the connection task.
    pub request_queue: usize,
    /// The queue downlink messages are consumed from.
    pub downlink_queue: DownlinkQueue,
    /// Binding keys (AMQP syntax) the downlink queue is bound with on the exchange on every
    /// connection, besides the subscriptions' keys; never unbound by the gateway.
    pub bindings: Vec<String>,
    /// Prefetch (`basic.qos`) of the downlink channel, and the most downlink acknowledgement
    /// handles outstanding over all connections.
    pub max_unacked_downlinks: u16,
    /// Largest downlink body accepted; bigger ones are acknowledged, dropped and counted.
    pub max_downlink_bytes: usize,
    /// Most binding keys the subscriptions may want at once.
    pub max_subscriptions: usize,
    /// `amqps://` only: CA file and client certificate (the system roots when unset).
    pub tls: TlsSettings,
    /// Birth (published on every connect, before anything else) and death (published on a
    /// clean shutdown, confirmed before the connection closes) of the gateway (`[fleet]`);
    /// `None`: none. AMQP has no Will: with presence on, the connection is named after the
    /// Will's topic (`connection_name`, as RabbitMQ's management UI and event exchange show
    /// it), so a backend can watch `connection.closed` for a crash.
    pub presence: Option<crate::upstream::Presence>,
}

/// Why an AMQP upstream's settings were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AmqpConfigError {
    /// The URL does not parse.
    #[error("invalid AMQP URL: {0}")]
    Url(String),
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The TLS files cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// `reconfigure`: a setting that is fixed for the upstream's life changed (it takes a
    /// restart); nothing was changed.
    #[error("`{0}` cannot change while the upstream runs (restart to change it)")]
    RestartRequired(&'static str),
}

impl AmqpUpstreamConfig {
    /// Settings with every default, for `url`.
    #[must_use]
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
            heartbeat: DEFAULT_HEARTBEAT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            request_queue: DEFAULT_REQUEST_QUEUE,
            downlink_queue: DownlinkQueue::default(),
            bindings: Vec::new(),
            max_unacked_downlinks: DEFAULT_MAX_UNACKED_DOWNLINKS,
            max_downlink_bytes: DEFAULT_MAX_DOWNLINK_BYTES,
            max_subscriptions: crate::mqtt::MAX_SUBSCRIPTIONS,
            tls: TlsSettings::default(),
            username: None,
            password: None,
            vhost: None,
            presence: None,
        }
    }

    /// The connection name the broker shows (client property `connection_name`): the Will's
    /// topic with presence on (`sensorgate/7/state`), else `sensorgate`.
    #[must_use]
    pub fn connection_name(&self) -> String {
        self.presence
            .as_ref()
            .map_or_else(|| "sensorgate".to_owned(), |p| p.will.topic.clone())
    }

    /// Parses an `amqp://` / `amqps://` URL.
    ///
    /// # Errors
    /// [`AmqpConfigError::Url`] when it does not parse or has another scheme.
    pub fn parse_url(url: &str) -> Result<AMQPUri, AmqpConfigError> {
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(AmqpConfigError::Url(
                "the scheme must be `amqp://` or `amqps://`".into(),
            ));
        }
        url.parse::<AMQPUri>().map_err(AmqpConfigError::Url)
    }

    /// Checks every setting; returns the URL with the heartbeat and connect timeout applied.
    ///
    /// # Errors
    /// [`AmqpConfigError`] naming the first bad setting.
    pub fn validate(&self) -> Result<AMQPUri, AmqpConfigError> {
        let mut uri = Self::parse_url(&self.url)?;
        if let Some(username) = &self.username {
            uri.authority.userinfo.username.clone_from(username);
        }
        if let Some(password) = &self.password {
            uri.authority.userinfo.password.clone_from(password);
        }
        if let Some(vhost) = &self.vhost {
            uri.vhost.clone_from(vhost);
        }
        if self.exchange.len() > MAX_ROUTING_KEY_BYTES {
            return Err(AmqpConfigError::Invalid(
                "exchange: longer than 255 bytes".into(),
            ));
        }
        if self.max_inflight == 0 {
            return Err(AmqpConfigError::Invalid("max_inflight: must be > 0".into()));
        }
        if self.request_queue == 0 {
            return Err(AmqpConfigError::Invalid(
                "request_queue: must be > 0".into(),
            ));
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            return Err(AmqpConfigError::Invalid(
                "backoff_initial: must be > 0 and <= backoff_max".into(),
            ));
        }
        if self.max_unacked_downlinks == 0 {
            return Err(AmqpConfigError::Invalid(
                "max_unacked_downlinks: must be > 0".into(),
            ));
        }
        if self.max_downlink_bytes == 0 {
            return Err(AmqpConfigError::Invalid(
                "max_downlink_bytes: must be > 0".into(),
            ));
        }
        if self.max_subscriptions == 0 {
            return Err(AmqpConfigError::Invalid(
                "max_subscriptions: must be > 0".into(),
            ));
        }
        if self.bindings.len() > MAX_BINDINGS {
            return Err(AmqpConfigError::Invalid(format!(
                "bindings: at most {MAX_BINDINGS}"
            )));
        }
        if let Some(key) = self
            .bindings
            .iter()
            .find(|k| k.len() > MAX_ROUTING_KEY_BYTES)
        {
            return Err(AmqpConfigError::Invalid(format!(
                "bindings: `{key:.32}...` is longer than 255 bytes"
            )));
        }
        match &self.downlink_queue {
            DownlinkQueue::ServerNamed => {}
            DownlinkQueue::Durable(name) | DownlinkQueue::Passive(name) => {
                if name.is_empty() || name.len() > MAX_ROUTING_KEY_BYTES {
                    return Err(AmqpConfigError::Invalid(
                        "downlink_queue: 1 to 255 bytes".into(),
                    ));
                }
            }
        }
        if matches!(self.downlink_queue, DownlinkQueue::Passive(_)) && !self.bindings.is_empty() {
            return Err(AmqpConfigError::Invalid(
                "bindings: a passive downlink queue is used as-is, the gateway binds nothing"
                    .into(),
            ));
        }
        let has_tls_files = self.tls.ca_file.is_some()
            || self.tls.client_cert.is_some()
            || self.tls.client_key.is_some();
        if has_tls_files && !is_tls(&uri) {
            return Err(AmqpConfigError::Invalid(
                "ca_file, client_cert, client_key: only for an `amqps://` URL".into(),
            ));
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return Err(AmqpConfigError::Invalid(
                "client_cert and client_key must be given together".into(),
            ));
        }
        let heartbeat = u16::try_from(self.heartbeat.as_secs())
            .map_err(|_| AmqpConfigError::Invalid("heartbeat: at most 65535 s".into()))?;
        uri.query.heartbeat = Some(heartbeat);
        uri.query.connection_timeout =
            Some(u64::try_from(self.connect_timeout.as_millis()).unwrap_or(u64::MAX));
        Ok(uri)
    }

    /// The rustls configuration of an `amqps://` URL (`None` for `amqp://`): the files are
    /// read here, at start.
    ///
    /// # Errors
    /// [`AmqpConfigError::Tls`] when a file cannot be read or holds no certificate or key.
    pub fn tls_config(&self, uri: &AMQPUri) -> Result<Option<Arc<ClientConfig>>, AmqpConfigError> {
        if !is_tls(uri) {
            return Ok(None);
        }
        crate::mqtt::build_tls_config(&self.tls)
            .map(Some)
            .map_err(|e| AmqpConfigError::Tls(e.to_string()))
    }

    /// The URL without its password, for logs and summaries.
    #[must_use]
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

/// `url` with the password part of its userinfo replaced by `***`.
#[must_use]
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// Whether the URL asks for TLS.
#[must_use]
pub fn is_tls(uri: &AMQPUri) -> bool {
    uri.scheme == AMQPScheme::AMQPS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_credentials_vhost_and_port() {
        let uri = AmqpUpstreamConfig::parse_url("amqp://u:p@127.0.0.1:5673/%2f").unwrap();
        assert_eq!(uri.authority.userinfo.username, "u");
        assert_eq!(uri.authority.userinfo.password, "p");
        assert_eq!(uri.authority.port, 5673);
        assert_eq!(uri.vhost, "/");
        assert!(!is_tls(&uri));
        let tls = AmqpUpstreamConfig::parse_url("amqps://h/site").unwrap();
        assert!(is_tls(&tls));
        assert_eq!(tls.authority.port, 5671);
        assert_eq!(tls.vhost, "site");
    }

    #[test]
    fn another_scheme_is_refused() {
        assert!(AmqpUpstreamConfig::parse_url("mqtt://h:1883").is_err());
        let mut keyed = AmqpUpstreamConfig::new("k", "amqp://u:p@127.0.0.1/%2f");
        keyed.username = Some("gw".into());
        keyed.password = Some("s3cret/+".into());
        keyed.vhost = Some("site/7".into());
        let uri = keyed.validate().unwrap();
        assert_eq!(
            (
                uri.authority.userinfo.username.as_str(),
                uri.authority.userinfo.password.as_str(),
                uri.vhost.as_str()
            ),
            ("gw", "s3cret/+", "site/7"),
            "keys replace the URL's credentials and vhost"
        );
        assert!(AmqpUpstreamConfig::parse_url("amqp://h:notaport/").is_err());
    }

    #[test]
    fn validate_applies_heartbeat_and_checks_ranges() {
        let mut c = AmqpUpstreamConfig::new("a", "amqp://127.0.0.1/%2f");
        c.heartbeat = Duration::from_secs(7);
        assert_eq!(c.validate().unwrap().query.heartbeat, Some(7));
        c.max_inflight = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn downlink_settings_are_checked() {
        let mut c = AmqpUpstreamConfig::new("a", "amqp://127.0.0.1/%2f");
        c.max_unacked_downlinks = 0;
        assert!(c.validate().is_err());
        c.max_unacked_downlinks = 1;
        c.downlink_queue = DownlinkQueue::Passive("q".into());
        c.bindings = vec!["cmd.#".into()];
        assert!(c.validate().is_err(), "a passive queue gets no bindings");
        c.downlink_queue = DownlinkQueue::Durable("q".into());
        assert!(c.validate().is_ok());
        c.bindings = vec!["x".repeat(256)];
        assert!(c.validate().is_err());
        c.bindings.clear();
        c.downlink_queue = DownlinkQueue::Durable(String::new());
        assert!(c.validate().is_err());
    }

    #[test]
    fn tls_files_need_amqps_and_come_in_pairs() {
        let mut c = AmqpUpstreamConfig::new("a", "amqp://127.0.0.1/%2f");
        c.tls.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(c.validate().is_err(), "ca_file with amqp://");
        c.url = "amqps://127.0.0.1/%2f".into();
        let uri = c.validate().unwrap();
        assert!(matches!(c.tls_config(&uri), Err(AmqpConfigError::Tls(_))));
        c.tls.client_cert = Some("/nonexistent/c.pem".into());
        assert!(c.validate().is_err(), "client_cert without client_key");
    }

    #[test]
    fn the_password_never_shows() {
        assert_eq!(
            redact("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact("amqp://h/%2f"), "amqp://h/%2f");
    }
}
