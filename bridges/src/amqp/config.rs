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

use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};

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

/// Settings of one AMQP upstream.
#[derive(Clone, Debug)]
pub struct AmqpUpstreamConfig {
    /// Name used in logs.
    pub name: String,
    /// `amqp://` or `amqps://` URL with credentials and vhost.
    pub url: String,
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
        }
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
        let heartbeat = u16::try_from(self.heartbeat.as_secs())
            .map_err(|_| AmqpConfigError::Invalid("heartbeat: at most 65535 s".into()))?;
        uri.query.heartbeat = Some(heartbeat);
        uri.query.connection_timeout =
            Some(u64::try_from(self.connect_timeout.as_millis()).unwrap_or(u64::MAX));
        Ok(uri)
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
    fn the_password_never_shows() {
        assert_eq!(
            redact("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact("amqp://h/%2f"), "amqp://h/%2f");
    }
}
