//! Configuration of one MQTT upstream, and the setup checks that run before anything starts.
//!
//! Everything here is checked by [`MqttUpstreamConfig::validate`] and [`build_tls_config`],
//! which `MqttUpstream::spawn` calls before it opens a socket: a [`SetupError`] means nothing
//! was started (DESIGN invariant 7, "config is validated before anything binds"). The gateway
//! can run the same checks during its own config validation.
//!
//! Broker addresses are written as URLs:
//!
//! ```text
//! mqtt://broker.example:1883      plain TCP (default port 1883)
//! mqtts://broker.example          TLS (default port 8883)
//! mqtt://[2001:db8::1]:1883       IPv6 literal, in brackets
//! ```
//!
//! Credentials never go in the URL (it ends up in logs); use `username` / `password`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use url::{Host, Url};

use super::subscriptions::MAX_SUBSCRIPTIONS;

/// Default port of `mqtt://` URLs.
pub const DEFAULT_MQTT_PORT: u16 = 1883;
/// Default port of `mqtts://` URLs.
pub const DEFAULT_MQTTS_PORT: u16 = 8883;
/// Default MQTT keep-alive interval used by [`MqttUpstreamConfig::new`].
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Default bound on one connection attempt (TCP + TLS + CONNACK) used by
/// [`MqttUpstreamConfig::new`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default first reconnect delay used by [`MqttUpstreamConfig::new`].
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Default largest reconnect delay used by [`MqttUpstreamConfig::new`].
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Default bound on outstanding tracked publishes used by [`MqttUpstreamConfig::new`].
pub const DEFAULT_MAX_INFLIGHT: u16 = 100;
/// Default capacity of the request channel into the MQTT client used by
/// [`MqttUpstreamConfig::new`].
pub const DEFAULT_REQUEST_QUEUE: usize = 1024;
/// Default largest downlink PUBLISH packet accepted from the broker used by
/// [`MqttUpstreamConfig::new`].
pub const DEFAULT_MAX_DOWNLINK_BYTES: usize = 64 * 1024;
/// Default bound on QoS >= 1 downlink messages delivered and not yet acknowledged used by
/// [`MqttUpstreamConfig::new`].
pub const DEFAULT_MAX_UNACKED_DOWNLINKS: u16 = 256;

/// Default [`MqttUpstreamConfig::subscribe_retry`].
pub const DEFAULT_SUBSCRIBE_RETRY: Duration = Duration::from_secs(60);
/// Smallest accepted `max_downlink_bytes`: the broker's CONNACK and SUBACK packets must fit.
pub const MIN_DOWNLINK_BYTES: usize = 1024;
/// Largest accepted `max_downlink_bytes`: the largest packet MQTT can encode (a 4-byte
/// remaining length plus the fixed header).
pub const MAX_DOWNLINK_BYTES: usize = 268_435_455 + 5;

/// MQTT protocol version spoken to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.
    V5,
}

/// TLS settings of an `mqtts://` upstream.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// PEM file with the CA certificate(s) to trust; `None` trusts the system roots
    /// (via `rustls-native-certs`).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to the broker (mutual TLS); needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
}

/// Everything needed to run one aggregated connection to an MQTT broker.
#[derive(Debug, Clone)]
pub struct MqttUpstreamConfig {
    /// Name of the upstream in logs and metrics (the `upstream` field).
    pub name: String,
    /// Broker host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Broker TCP port.
    pub port: u16,
    /// `Some` for `mqtts://`: connect with TLS.
    pub tls: Option<TlsSettings>,
    /// Protocol version.
    pub version: MqttVersion,
    /// MQTT client identifier; must be unique on the broker.
    pub client_id: String,
    /// User name sent in CONNECT.
    pub username: Option<String>,
    /// Password sent in CONNECT (MQTT 3.1.1 needs a `username` with it).
    pub password: Option<String>,
    /// MQTT keep-alive interval, whole seconds, at most `u16::MAX` s; zero disables pings.
    pub keep_alive: Duration,
    /// Bound on one connection attempt. Also bounds the drain of in-flight publishes on
    /// shutdown.
    pub connect_timeout: Duration,
    /// First reconnect delay (before jitter).
    pub backoff_initial: Duration,
    /// Largest reconnect delay (before jitter).
    pub backoff_max: Duration,
    /// Most tracked (QoS >= 1 with a token) publishes accepted and not yet reported.
    pub max_inflight: u16,
    /// Prepended to every message topic, e.g. `"site-7/"`.
    pub remote_prefix: String,
    /// Capacity of the request channel into the MQTT client (all publishes, any QoS).
    pub request_queue: usize,
    /// Largest downlink PUBLISH packet (fixed header included) accepted from the broker.
    /// MQTT 5 announces it as the CONNECT Maximum Packet Size, so the broker does not send
    /// bigger ones; bigger ones that arrive anyway (MQTT 3.1.1 has no such announcement) are
    /// acknowledged, dropped and counted, up to the decoding limit described in
    /// `MqttUpstream::spawn`.
    pub max_downlink_bytes: usize,
    /// Most QoS >= 1 downlink messages delivered to the gateway and not yet acknowledged with
    /// [`DownlinkAck::ack`](crate::message::DownlinkAck::ack). MQTT 5 announces it as the
    /// CONNECT Receive Maximum; beyond it the upstream stops reading from the broker.
    pub max_unacked_downlinks: u16,
    /// Most filters subscribed at a time (1..=[`MAX_SUBSCRIPTIONS`]); a new one beyond it is
    /// refused by `MqttUpstream::subscribe`. The gateway sets it to the MQTT-SN core's
    /// `max_filters`, which refuses the SUBSCRIBE first, so the table never overflows.
    pub max_subscriptions: usize,
    /// How long a filter the broker refused (SUBACK failure) waits before it is asked for
    /// again, and the least time between two warnings about refusals.
    pub subscribe_retry: Duration,
    /// Birth, Will and death of the gateway on this connection (`[fleet]`); `None`: none.
    /// The Will goes into CONNECT; topics get `remote_prefix` like sensor data.
    pub presence: Option<crate::upstream::Presence>,
}

impl MqttUpstreamConfig {
    /// A configuration for the broker at `url` with the `DEFAULT_*` values of this module,
    /// MQTT 3.1.1, no credentials, no prefix, and `client_id` `sensorgate-<name>`.
    ///
    /// An `mqtts://` URL gets [`TlsSettings::default`] (system roots, no client certificate).
    ///
    /// # Errors
    ///
    /// See [`Self::parse_url`].
    pub fn new(name: impl Into<String>, url: &str) -> Result<Self, UrlError> {
        let name = name.into();
        let (host, port, tls) = Self::parse_url(url)?;
        Ok(Self {
            client_id: format!("sensorgate-{name}"),
            name,
            host,
            port,
            tls: tls.then(TlsSettings::default),
            version: MqttVersion::V311,
            username: None,
            password: None,
            keep_alive: DEFAULT_KEEP_ALIVE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            remote_prefix: String::new(),
            request_queue: DEFAULT_REQUEST_QUEUE,
            max_downlink_bytes: DEFAULT_MAX_DOWNLINK_BYTES,
            max_unacked_downlinks: DEFAULT_MAX_UNACKED_DOWNLINKS,
            max_subscriptions: MAX_SUBSCRIPTIONS,
            subscribe_retry: DEFAULT_SUBSCRIBE_RETRY,
            presence: None,
        })
    }

    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` into `(host, port, tls)`.
    ///
    /// Default ports are [`DEFAULT_MQTT_PORT`] and [`DEFAULT_MQTTS_PORT`]. An IPv6 literal is
    /// written in brackets (`mqtt://[::1]`) and returned without them (`::1`), the form TLS
    /// server-name checks expect. A trailing `/` is accepted.
    ///
    /// # Errors
    ///
    /// [`UrlError`] for a malformed URL, another scheme, a missing host, a path, query or
    /// fragment, or credentials in the URL.
    pub fn parse_url(url: &str) -> Result<(String, u16, bool), UrlError> {
        let parsed = Url::parse(url).map_err(UrlError::Syntax)?;
        let tls = match parsed.scheme() {
            "mqtt" => false,
            "mqtts" => true,
            other => return Err(UrlError::Scheme(other.to_owned())),
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(UrlError::Credentials);
        }
        let host = match parsed.host() {
            None => return Err(UrlError::MissingHost),
            Some(Host::Domain("")) => return Err(UrlError::MissingHost),
            Some(Host::Domain(domain)) => domain.to_owned(),
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => ip.to_string(),
        };
        if !matches!(parsed.path(), "" | "/")
            || parsed.query().is_some()
            || parsed.fragment().is_some()
        {
            return Err(UrlError::ExtraComponents);
        }
        let port = parsed.port().unwrap_or(if tls {
            DEFAULT_MQTTS_PORT
        } else {
            DEFAULT_MQTT_PORT
        });
        Ok((host, port, tls))
    }

    /// Checks the values that need no file or network access.
    ///
    /// # Errors
    ///
    /// [`SetupError::InvalidConfig`] naming the first offending field.
    pub fn validate(&self) -> Result<(), SetupError> {
        let invalid = |field: &'static str, reason: &'static str| {
            Err(SetupError::InvalidConfig { field, reason })
        };
        if self.host.is_empty() {
            return invalid("host", "must not be empty");
        }
        if self.port == 0 {
            return invalid("port", "must not be 0");
        }
        if self.keep_alive_secs().is_none() {
            return invalid("keep_alive", "must be whole seconds, at most 65535 s");
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "must be positive");
        }
        if self.backoff_initial.is_zero() {
            return invalid("backoff_initial", "must be positive");
        }
        if self.backoff_max < self.backoff_initial {
            return invalid("backoff_max", "must not be less than backoff_initial");
        }
        if self.max_inflight == 0 {
            return invalid("max_inflight", "must be at least 1");
        }
        if self.request_queue == 0 {
            return invalid("request_queue", "must be at least 1");
        }
        if self.max_downlink_bytes < MIN_DOWNLINK_BYTES {
            return invalid("max_downlink_bytes", "must be at least 1024");
        }
        if self.max_downlink_bytes > MAX_DOWNLINK_BYTES {
            return invalid(
                "max_downlink_bytes",
                "must not exceed the MQTT packet size limit (268435460)",
            );
        }
        if self.max_unacked_downlinks == 0 {
            return invalid("max_unacked_downlinks", "must be at least 1");
        }
        if !(1..=MAX_SUBSCRIPTIONS).contains(&self.max_subscriptions) {
            return invalid("max_subscriptions", "must be 1..=65536");
        }
        if self.subscribe_retry.is_zero() {
            return invalid("subscribe_retry", "must be more than zero");
        }
        if self.version == MqttVersion::V311 && self.password.is_some() && self.username.is_none() {
            return invalid("password", "MQTT 3.1.1 needs a username with a password");
        }
        if let Some(tls) = &self.tls
            && tls.client_cert.is_some() != tls.client_key.is_some()
        {
            return Err(SetupError::IncompleteClientAuth);
        }
        Ok(())
    }

    /// `keep_alive` in whole seconds, if it fits the MQTT field.
    pub(crate) fn keep_alive_secs(&self) -> Option<u16> {
        if self.keep_alive.subsec_nanos() != 0 {
            return None;
        }
        u16::try_from(self.keep_alive.as_secs()).ok()
    }
}

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not a URL at all.
    #[error("invalid URL: {0}")]
    Syntax(url::ParseError),
    /// A scheme other than `mqtt` or `mqtts`.
    #[error("unsupported scheme `{0}`, expected `mqtt` or `mqtts`")]
    Scheme(String),
    /// No host after `//`.
    #[error("URL has no host")]
    MissingHost,
    /// A path, query or fragment, which an MQTT broker address does not have.
    #[error("URL must be scheme://host[:port] without path, query or fragment")]
    ExtraComponents,
    /// `user:password@` in the URL.
    #[error("URL must not contain credentials, set username and password instead")]
    Credentials,
}

/// A configuration problem found before the upstream started; nothing is running.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The broker URL is malformed.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// A setting is out of range.
    #[error("invalid `{field}`: {reason}")]
    InvalidConfig {
        /// The offending `MqttUpstreamConfig` field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A PEM file could not be read or parsed.
    #[error("cannot read PEM file {}: {source}", path.display())]
    PemFile {
        /// The file.
        path: PathBuf,
        /// The I/O or PEM error.
        #[source]
        source: pem::Error,
    },
    /// A CA or client certificate file holds no certificate.
    #[error("no PEM certificate in {}", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The client key file holds no private key.
    #[error("no PEM private key in {}", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// Only one of `client_cert` and `client_key` is set.
    #[error("mutual TLS needs both client_cert and client_key")]
    IncompleteClientAuth,
    /// `ca_file` is unset and the system trust store has no usable certificate.
    #[error("no usable CA certificate in the system trust store, set ca_file")]
    NoSystemRoots,
    /// rustls refused the certificates or key (e.g. the key does not match the certificate).
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),
    /// The MQTT client library refused the options.
    #[error("MQTT client options rejected: {0}")]
    Client(String),
    /// `spawn` was called outside a Tokio runtime.
    #[error("no Tokio runtime to run the upstream on")]
    NoRuntime,
    /// `reconfigure`: a setting that is fixed for the upstream's life changed (it takes a
    /// restart); nothing was changed.
    #[error("`{field}` cannot change while the upstream runs (restart to change it)")]
    RestartRequired {
        /// The `MqttUpstreamConfig` field.
        field: &'static str,
    },
}

impl SetupError {
    /// A short stable tag for metrics and structured logs.
    #[must_use]
    pub const fn error_code(&self) -> &'static str {
        match self {
            Self::Url(_) => "bad_url",
            Self::InvalidConfig { .. } => "invalid_config",
            Self::PemFile { .. } => "pem_file",
            Self::NoCertificate { .. } => "no_certificate",
            Self::NoPrivateKey { .. } => "no_private_key",
            Self::IncompleteClientAuth => "incomplete_client_auth",
            Self::NoSystemRoots => "no_system_roots",
            Self::Tls(_) => "tls_config",
            Self::Client(_) => "client_options",
            Self::NoRuntime => "no_runtime",
            Self::RestartRequired { .. } => "restart_required",
        }
    }
}

/// A digest of the TLS files' contents (0 without TLS or when a file cannot be read: the
/// setup checks report that).
pub(crate) fn tls_fingerprint(tls: Option<&TlsSettings>) -> u64 {
    use std::hash::{Hash, Hasher};
    let Some(tls) = tls else {
        return 0;
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in [&tls.ca_file, &tls.client_cert, &tls.client_key]
        .into_iter()
        .flatten()
    {
        path.hash(&mut hasher);
        std::fs::read(path).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

/// Builds the rustls client configuration of an `mqtts://` upstream.
///
/// Uses the *ring* provider explicitly, so the binary needs no process-wide default provider
/// and links exactly one. Trusts `ca_file` if set, else the system roots; presents
/// `client_cert` / `client_key` when both are set (mutual TLS).
///
/// # Errors
///
/// A [`SetupError`] naming the unreadable or unsuitable file, or rustls' reason for refusing
/// the certificates and key.
pub fn build_tls_config(settings: &TlsSettings) -> Result<Arc<ClientConfig>, SetupError> {
    let roots = match &settings.ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(path)? {
                roots.add(cert)?;
            }
            roots
        }
        None => system_roots()?,
    };
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let config = match (&settings.client_cert, &settings.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certificates(cert)?;
            let key = read_private_key(key)?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => return Err(SetupError::IncompleteClientAuth),
    };
    Ok(Arc::new(config))
}

/// All certificates of a PEM file, at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, SetupError> {
    let pem_error = |source| SetupError::PemFile {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(SetupError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, SetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        pem::Error::NoItemsFound => SetupError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => SetupError::PemFile {
            path: path.to_owned(),
            source,
        },
    })
}

/// The platform trust store; unparsable entries are skipped, an empty result is an error.
fn system_roots() -> Result<RootCertStore, SetupError> {
    let loaded = rustls_native_certs::load_native_certs();
    for error in &loaded.errors {
        tracing::warn!(error = %error, "Skipping unreadable system CA certificates.");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    if ignored > 0 {
        tracing::debug!(added, ignored, "Ignored unparsable system CA certificates.");
    }
    if roots.is_empty() {
        return Err(SetupError::NoSystemRoots);
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn parse_url_defaults_ports_by_scheme() {
        assert_eq!(
            MqttUpstreamConfig::parse_url("mqtt://broker.example").unwrap(),
            ("broker.example".to_owned(), 1883, false)
        );
        assert_eq!(
            MqttUpstreamConfig::parse_url("mqtts://broker.example").unwrap(),
            ("broker.example".to_owned(), 8883, true)
        );
    }

    #[test]
    fn parse_url_keeps_explicit_port_and_trailing_slash() {
        assert_eq!(
            MqttUpstreamConfig::parse_url("mqtt://10.0.0.1:11883/").unwrap(),
            ("10.0.0.1".to_owned(), 11883, false)
        );
    }

    #[test]
    fn parse_url_strips_ipv6_brackets() {
        assert_eq!(
            MqttUpstreamConfig::parse_url("mqtts://[::1]:8884").unwrap(),
            ("::1".to_owned(), 8884, true)
        );
        assert_eq!(
            MqttUpstreamConfig::parse_url("mqtt://[2001:db8::1]").unwrap(),
            ("2001:db8::1".to_owned(), 1883, false)
        );
    }

    #[test]
    fn parse_url_rejects_other_schemes() {
        for url in [
            "http://host",
            "tcp://host:1883",
            "ws://host",
            "mqtt+ssl://host",
        ] {
            assert!(
                matches!(MqttUpstreamConfig::parse_url(url), Err(UrlError::Scheme(_))),
                "{url}"
            );
        }
    }

    #[test]
    fn parse_url_rejects_paths_queries_and_fragments() {
        for url in [
            "mqtt://host/topic",
            "mqtt://host:1883/a/b",
            "mqtt://host?client_id=x",
            "mqtt://host#frag",
        ] {
            assert_eq!(
                MqttUpstreamConfig::parse_url(url),
                Err(UrlError::ExtraComponents),
                "{url}"
            );
        }
    }

    #[test]
    fn parse_url_rejects_missing_host() {
        for url in ["mqtt://", "mqtt://:1883", "mqtt:broker"] {
            assert!(
                matches!(
                    MqttUpstreamConfig::parse_url(url),
                    Err(UrlError::MissingHost | UrlError::Syntax(_))
                ),
                "{url}: {:?}",
                MqttUpstreamConfig::parse_url(url)
            );
        }
        assert_eq!(
            MqttUpstreamConfig::parse_url("mqtt://"),
            Err(UrlError::MissingHost)
        );
    }

    #[test]
    fn parse_url_rejects_credentials_and_garbage() {
        assert_eq!(
            MqttUpstreamConfig::parse_url("mqtt://user:secret@host"),
            Err(UrlError::Credentials)
        );
        assert!(matches!(
            MqttUpstreamConfig::parse_url("not a url"),
            Err(UrlError::Syntax(_))
        ));
        assert!(matches!(
            MqttUpstreamConfig::parse_url("mqtt://host:99999"),
            Err(UrlError::Syntax(_))
        ));
    }

    #[test]
    fn new_config_is_valid() {
        let config = MqttUpstreamConfig::new("main", "mqtts://broker").unwrap();
        assert!(config.tls.is_some());
        assert_eq!(config.client_id, "sensorgate-main");
        config.validate().unwrap();
    }

    #[test]
    fn validate_names_the_offending_field() {
        let base = MqttUpstreamConfig::new("main", "mqtt://broker").unwrap();
        let field_of = |config: MqttUpstreamConfig| match config.validate() {
            Err(SetupError::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
        let mut c = base.clone();
        c.max_inflight = 0;
        assert_eq!(field_of(c), "max_inflight");
        let mut c = base.clone();
        c.request_queue = 0;
        assert_eq!(field_of(c), "request_queue");
        let mut c = base.clone();
        c.max_downlink_bytes = MIN_DOWNLINK_BYTES - 1;
        assert_eq!(field_of(c), "max_downlink_bytes");
        let mut c = base.clone();
        c.max_downlink_bytes = MAX_DOWNLINK_BYTES + 1;
        assert_eq!(field_of(c), "max_downlink_bytes");
        let mut c = base.clone();
        c.max_unacked_downlinks = 0;
        assert_eq!(field_of(c), "max_unacked_downlinks");
        for bad in [0, MAX_SUBSCRIPTIONS + 1] {
            let mut c = base.clone();
            c.max_subscriptions = bad;
            assert_eq!(field_of(c), "max_subscriptions");
        }
        let mut c = base.clone();
        c.subscribe_retry = Duration::ZERO;
        assert_eq!(field_of(c), "subscribe_retry");
        let mut c = base.clone();
        c.keep_alive = Duration::from_millis(1500);
        assert_eq!(field_of(c), "keep_alive");
        let mut c = base.clone();
        c.keep_alive = Duration::from_secs(70_000);
        assert_eq!(field_of(c), "keep_alive");
        let mut c = base.clone();
        c.backoff_max = Duration::from_millis(1);
        assert_eq!(field_of(c), "backoff_max");
        let mut c = base.clone();
        c.backoff_initial = Duration::ZERO;
        assert_eq!(field_of(c), "backoff_initial");
        let mut c = base.clone();
        c.connect_timeout = Duration::ZERO;
        assert_eq!(field_of(c), "connect_timeout");
        let mut c = base.clone();
        c.password = Some("pw".into());
        assert_eq!(field_of(c.clone()), "password");
        c.version = MqttVersion::V5;
        c.validate().unwrap();
    }

    #[test]
    fn downlink_limit_errors_name_the_limits() {
        let reason_of = |bytes: usize| {
            let mut config = MqttUpstreamConfig::new("main", "mqtt://broker").unwrap();
            config.max_downlink_bytes = bytes;
            match config.validate() {
                Err(SetupError::InvalidConfig { reason, .. }) => reason,
                other => panic!("expected InvalidConfig, got {other:?}"),
            }
        };
        assert!(reason_of(MIN_DOWNLINK_BYTES - 1).contains(&MIN_DOWNLINK_BYTES.to_string()));
        assert!(reason_of(MAX_DOWNLINK_BYTES + 1).contains(&MAX_DOWNLINK_BYTES.to_string()));
    }

    fn file_with(dir: &tempfile::TempDir, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(contents).unwrap();
        path
    }

    #[test]
    fn tls_missing_ca_file_is_reported_with_its_path() {
        let settings = TlsSettings {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsSettings::default()
        };
        let error = build_tls_config(&settings).unwrap_err();
        assert!(
            matches!(&error, SetupError::PemFile { path, source: pem::Error::Io(_) }
                if path == Path::new("/nonexistent/ca.pem")),
            "{error:?}"
        );
        assert!(error.to_string().contains("/nonexistent/ca.pem"));
    }

    #[test]
    fn tls_ca_file_without_pem_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, "ca.pem", b"this is not a certificate\n");
        let settings = TlsSettings {
            ca_file: Some(path.clone()),
            ..TlsSettings::default()
        };
        assert!(matches!(
            build_tls_config(&settings),
            Err(SetupError::NoCertificate { path: p }) if p == path
        ));
    }

    #[test]
    fn tls_corrupt_pem_section_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(
            &dir,
            "ca.pem",
            b"-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        );
        let settings = TlsSettings {
            ca_file: Some(path),
            ..TlsSettings::default()
        };
        assert!(matches!(
            build_tls_config(&settings),
            Err(SetupError::PemFile { .. })
        ));
    }

    #[test]
    fn tls_garbage_der_in_ca_file_is_refused_by_rustls() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(
            &dir,
            "ca.pem",
            b"-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
        );
        let settings = TlsSettings {
            ca_file: Some(path),
            ..TlsSettings::default()
        };
        assert!(matches!(
            build_tls_config(&settings),
            Err(SetupError::Tls(_))
        ));
    }

    #[test]
    fn tls_client_cert_without_key_is_refused() {
        let settings = TlsSettings {
            ca_file: Some(fixture("ca.pem")),
            client_cert: Some(fixture("client.pem")),
            client_key: None,
        };
        assert!(matches!(
            build_tls_config(&settings),
            Err(SetupError::IncompleteClientAuth)
        ));
        let mut config = MqttUpstreamConfig::new("main", "mqtts://broker").unwrap();
        config.tls = Some(settings);
        assert!(matches!(
            config.validate(),
            Err(SetupError::IncompleteClientAuth)
        ));
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    #[test]
    fn tls_mutual_auth_config_builds_from_pem_files() {
        let settings = TlsSettings {
            ca_file: Some(fixture("ca.pem")),
            client_cert: Some(fixture("client.pem")),
            client_key: Some(fixture("client.key")),
        };
        let config = build_tls_config(&settings).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn tls_key_file_without_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = file_with(&dir, "key.pem", b"no key in here\n");
        let settings = TlsSettings {
            ca_file: Some(fixture("ca.pem")),
            client_cert: Some(fixture("client.pem")),
            client_key: Some(key.clone()),
        };
        assert!(matches!(
            build_tls_config(&settings),
            Err(SetupError::NoPrivateKey { path }) if path == key
        ));
    }

    #[test]
    fn tls_key_not_matching_the_certificate_is_refused() {
        let settings = TlsSettings {
            ca_file: Some(fixture("ca.pem")),
            client_cert: Some(fixture("client.pem")),
            client_key: Some(fixture("other.key")),
        };
        assert!(matches!(
            build_tls_config(&settings),
            Err(SetupError::Tls(rustls::Error::InconsistentKeys(_)))
        ));
    }

    #[test]
    fn tls_key_file_given_as_certificate_is_refused() {
        let settings = TlsSettings {
            ca_file: Some(fixture("ca.pem")),
            client_cert: Some(fixture("client.key")),
            client_key: Some(fixture("client.key")),
        };
        assert!(matches!(
            build_tls_config(&settings),
            Err(SetupError::NoCertificate { .. })
        ));
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(SetupError::NoRuntime.error_code(), "no_runtime");
        assert_eq!(
            SetupError::from(UrlError::MissingHost).error_code(),
            "bad_url"
        );
    }
}
