//! `[http]` and `[[http.device]]`: the HTTP ingress's listeners (plain and TLS), its devices
//! (bearer-token digests, client-certificate names, topic grants) and every bound.
//!
//! Invariants:
//! - `listen = []` and `tls_listen = []` (the default) or no `[http]` table: HTTP is off
//!   ([`super::Config::http`] is `None`); every other key is still checked.
//! - `allow_anonymous = true` is accepted only when every `listen` and `tls_listen` address is
//!   a loopback address (the name and this rule are fixed by issue 16).
//! - No two HTTP addresses take the same TCP port (same port and family, same address or
//!   either one the family's wildcard: IPv6 listeners are v6-only, as the UDP ones), and none
//!   takes the `[admin] listen` port on an overlapping address (the admin listener is
//!   dual-stack when it is `[::]`, so an IPv6 wildcard overlaps IPv4 there). Port 0 never
//!   clashes.
//! - `tls` is `Some` exactly when `tls_listen` is not empty; its paths are relative to the
//!   config file's directory. The files are not read here (the start-up reads them).
//! - Every device can authenticate: it has a `token_hash`, or client certificates are
//!   requested (`client_ca`). No two devices share an id or a token.
//! - Grants are prefixes: a valid topic name, or `#` alone (everything).
//! - `[http.jwt]` names exactly one of `public_key` (PEM) and `jwks` (a local JWKS file),
//!   relative to the config file's directory, and an `audience`; `algorithms` are RS256 and/or
//!   ES256 only (never `none`, never an HMAC one: the keys are public). The key file is not
//!   read here: preflight (`check-config`), the start and every SIGHUP read it
//!   ([`crate::http::jwt::JwtVerifier::load`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sensorgate_bridges::mqtt::{MAX_PUBLISH_BYTES, MAX_SUBSCRIPTIONS};
use serde::Deserialize;

use super::check::{check_topic_name, duration_in, int_in, size_in};
use super::diag::{self, KeyPath, Reporter};
use super::units;
use super::{DurationText, Number, SizeText};
use crate::http::token::{self, TokenDigest};

/// Longest `[[http.device]] id`, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// The identity of requests without credentials (`allow_anonymous`): no device may take it.
pub const ANONYMOUS_ID: &str = "anonymous";

/// `[http]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSection {
    /// Plain HTTP/1.1 (and h2c by prior knowledge) addresses.
    pub listen: Vec<SocketAddr>,
    /// HTTPS addresses (ALPN h2 and http/1.1).
    pub tls_listen: Vec<SocketAddr>,
    /// Certificate, key and client-certificate settings; `Some` iff `tls_listen` is not empty.
    pub tls: Option<TlsFiles>,
    /// Requests without credentials are served as [`ANONYMOUS_ID`] (loopback listeners only).
    pub allow_anonymous: bool,
    /// Topic prefixes anonymous requests may publish to.
    pub anonymous_publish: Vec<String>,
    /// Filter prefixes anonymous requests may subscribe to.
    pub anonymous_subscribe: Vec<String>,
    /// The configured devices, in file order.
    pub devices: Vec<DeviceSpec>,
    /// HTTP/2 (h2c by prior knowledge, ALPN h2); `false`: HTTP/1.1 only.
    pub http2: bool,
    /// Threads of the `sensorgate-http` runtime (1: a current-thread runtime).
    pub worker_threads: usize,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections from one IP address at once; beyond it a connection is closed at once.
    pub max_connections_per_ip: usize,
    /// HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub h2_max_streams: u32,
    /// Largest request head (h1) or header list (h2); beyond it 431.
    pub max_header_size: usize,
    /// Most header fields in an HTTP/1.1 request; beyond it 431.
    pub max_headers: usize,
    /// Deadline for an HTTP/1.1 request head (also the h1 keep-alive idle limit).
    pub header_timeout: Duration,
    /// Deadline for reading a request body (408) or waiting for body memory (503).
    pub request_timeout: Duration,
    /// A connection that moves no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Deadline for a TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Largest single-publish body, and largest payload of a batch item.
    pub max_body_size: usize,
    /// Largest batch request body.
    pub max_batch_size: usize,
    /// Most items in one batch.
    pub max_batch_items: usize,
    /// Request body bytes held in memory at once, over every request.
    pub body_memory: usize,
    /// `true`: a request without `Content-Length` gets 411.
    pub require_content_length: bool,
    /// How long a request waits for room in the spool writer's queue before 503 `busy`.
    pub queue_wait: Duration,
    /// `Retry-After` of a 503 (whole seconds).
    pub retry_after: Duration,
    /// Requests per second per device (anonymous: per IP address); 0.0: no limit.
    pub rate_per_device: f64,
    /// Requests a device may make at once above its rate.
    pub rate_burst: u32,
    /// SSE streams in total (0: `/v1/subscribe` answers 503).
    pub max_streams: usize,
    /// SSE streams per device.
    pub max_streams_per_device: usize,
    /// Filters in one SSE stream.
    pub max_filters_per_stream: usize,
    /// Distinct filters over every SSE stream (added to the router's bound).
    pub max_filters: usize,
    /// Events queued per SSE stream.
    pub sse_queue: usize,
    /// What a full SSE queue does with the next event.
    pub sse_queue_full: SseQueueFull,
    /// Largest encoded SSE event; a larger message is dropped for HTTP (counted).
    pub sse_max_event: usize,
    /// Interval of SSE keep-alive comments (shorter than `idle_timeout`).
    pub sse_keepalive: Duration,
    /// Devices (and anonymous addresses) kept in the `/clients` table, least recent first out.
    pub max_devices_tracked: usize,
    /// `[[acl]]` and `[limits]` (set by `config::compile`; not an `[http]` key): checked on top
    /// of the devices' own grants and rate.
    pub security: std::sync::Arc<crate::security::Policy>,
    /// JWT bearer tokens (`[http.jwt]`); `None`: bearer tokens are the static ones only.
    pub jwt: Option<JwtSpec>,
}

/// `[http.jwt]`: how JWT bearer tokens are verified and what their claims grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSpec {
    /// Where the verification keys are.
    pub keys: JwtKeyFile,
    /// The `alg` values accepted (RS256, ES256); anything else is refused before any key is
    /// looked at.
    pub algorithms: Vec<JwtAlgorithm>,
    /// The `aud` value tokens must carry (alone or in their `aud` list).
    pub audience: String,
    /// The `iss` value tokens must carry, when set.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The claim naming the device identity (a string).
    pub identity_claim: String,
    /// The claim holding the topic prefixes the token may publish to.
    pub publish_claim: String,
    /// The claim holding the filter prefixes the token may subscribe to.
    pub subscribe_claim: String,
    /// Publish prefixes of a token without `publish_claim` (default: none).
    pub default_publish: Vec<String>,
    /// Subscribe prefixes of a token without `subscribe_claim` (default: none).
    pub default_subscribe: Vec<String>,
    /// Longest JWT (the whole `Authorization` token), in bytes.
    pub max_token_size: usize,
    /// Largest decoded JOSE header, in bytes.
    pub max_token_header_size: usize,
    /// Most keys in the JWKS file.
    pub max_keys: usize,
}

/// The key file of `[http.jwt]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeyFile {
    /// One PEM public key (`public_key`): RSA (`PUBLIC KEY` or `RSA PUBLIC KEY`) or EC P-256.
    PublicKey(PathBuf),
    /// A JWK Set (`jwks`): keys chosen by the token's `kid`.
    Jwks(PathBuf),
}

impl JwtKeyFile {
    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        match self {
            JwtKeyFile::PublicKey(p) | JwtKeyFile::Jwks(p) => p,
        }
    }

    /// The config key that names it.
    #[must_use]
    pub fn key(&self) -> &'static str {
        match self {
            JwtKeyFile::PublicKey(_) => "public_key",
            JwtKeyFile::Jwks(_) => "jwks",
        }
    }
}

/// A JWS algorithm `[http.jwt] algorithms` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RSA keys of 2048..=8192 bits).
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    Es256,
}

impl JwtAlgorithm {
    /// The JOSE name (`alg`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
        }
    }
}

/// The names `[http.jwt] algorithms` accepts.
const JWT_ALGORITHMS: [&str; 2] = ["RS256", "ES256"];

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: Vec::new(),
            tls_listen: Vec::new(),
            tls: None,
            allow_anonymous: false,
            anonymous_publish: vec!["#".into()],
            anonymous_subscribe: vec!["#".into()],
            devices: Vec::new(),
            http2: true,
            worker_threads: 1,
            max_connections: 1024,
            max_connections_per_ip: 256,
            h2_max_streams: 64,
            max_header_size: 16 << 10,
            max_headers: 64,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
            max_body_size: 64 << 10,
            max_batch_size: 4 << 20,
            max_batch_items: 1000,
            body_memory: 64 << 20,
            require_content_length: false,
            queue_wait: Duration::from_secs(1),
            retry_after: Duration::from_secs(5),
            rate_per_device: 100.0,
            rate_burst: 200,
            max_streams: 1024,
            max_streams_per_device: 4,
            max_filters_per_stream: 8,
            max_filters: 4096,
            sse_queue: 256,
            sse_queue_full: SseQueueFull::DropOldest,
            sse_max_event: 256 << 10,
            sse_keepalive: Duration::from_secs(15),
            max_devices_tracked: 10_000,
            security: std::sync::Arc::default(),
            jwt: None,
        }
    }
}

impl JwtSpec {
    /// The defaults of every key but the key file and the audience (which have none).
    #[must_use]
    pub fn with(keys: JwtKeyFile, audience: &str) -> Self {
        JwtSpec {
            keys,
            algorithms: vec![JwtAlgorithm::Rs256, JwtAlgorithm::Es256],
            audience: audience.to_owned(),
            issuer: None,
            leeway: Duration::from_secs(30),
            identity_claim: "sub".into(),
            publish_claim: "sg_pub".into(),
            subscribe_claim: "sg_sub".into(),
            default_publish: Vec::new(),
            default_subscribe: Vec::new(),
            max_token_size: 8 << 10,
            max_token_header_size: 1 << 10,
            max_keys: 16,
        }
    }
}

/// The TLS listeners' files and client-certificate mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain (`tls_cert`).
    pub cert: PathBuf,
    /// PEM private key (`tls_key`).
    pub key: PathBuf,
    /// PEM roots client certificates must chain to (`client_ca`); `Some` iff `client_cert`
    /// is not [`ClientCertMode::Off`].
    pub client_ca: Option<PathBuf>,
    /// Whether client certificates are asked for.
    pub client_cert: ClientCertMode,
}

/// Client certificates (mTLS) on the TLS listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertMode {
    /// Not asked for.
    Off,
    /// Asked for; a connection without one may still authenticate by token.
    Optional,
    /// The handshake fails without a certificate signed by `client_ca`.
    Required,
}

/// What a full SSE stream queue does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseQueueFull {
    /// The oldest queued event goes (the freshest data wins); counted.
    DropOldest,
    /// The new event goes; counted.
    DropNew,
    /// The stream is closed (the client reconnects and knows it missed events).
    Close,
}

/// One `[[http.device]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The device's identity: `Origin.client_id`, the `/clients` name, the rate-limit key,
    /// and the client-certificate name that authenticates it.
    pub id: String,
    /// SHA-256 of its bearer token; `None`: certificate only.
    pub token_hash: Option<TokenDigest>,
    /// Topic prefixes it may publish to (`#`: everything).
    pub publish: Vec<String>,
    /// Filter prefixes it may subscribe to (`#`: everything).
    pub subscribe: Vec<String>,
}

impl HttpSection {
    /// A warning for the start-up log when bearer tokens would travel in clear text over a
    /// network (a plain `listen` address that is not loopback, and devices with tokens).
    #[must_use]
    pub fn plaintext_token_warning(&self) -> Option<String> {
        let open: Vec<String> = self
            .listen
            .iter()
            .filter(|a| !a.ip().is_loopback())
            .map(ToString::to_string)
            .collect();
        let tokens = self.devices.iter().any(|d| d.token_hash.is_some()) || self.jwt.is_some();
        (tokens && !open.is_empty()).then(|| {
            format!(
                "[http] listen {} is plain HTTP reachable from other hosts, and devices \
                 authenticate with bearer tokens: anyone on the network path can read a token \
                 and reuse it. Prefer tls_listen for those devices.",
                open.join(", ")
            )
        })
    }

    /// The `listener:` lines of the summary for `check-config` and the start-up log.
    pub(super) fn summary_listeners(&self) -> String {
        let mut s = String::new();
        for addr in &self.listen {
            s.push_str(&format!(
                "listener: HTTP on http://{addr}/ ({})\n",
                if self.http2 {
                    "HTTP/1.1, h2c"
                } else {
                    "HTTP/1.1"
                }
            ));
        }
        if let Some(tls) = &self.tls {
            for addr in &self.tls_listen {
                s.push_str(&format!(
                    "listener: HTTPS on https://{addr}/ ({}; client certificates {})\n",
                    if self.http2 {
                        "HTTP/1.1, h2"
                    } else {
                        "HTTP/1.1"
                    },
                    match tls.client_cert {
                        ClientCertMode::Off => "off",
                        ClientCertMode::Optional => "optional",
                        ClientCertMode::Required => "required",
                    }
                ));
            }
        }
        s
    }

    /// The summary line of the limits (and of `[http.jwt]` when it is on).
    pub(super) fn summary_limits(&self) -> String {
        let jwt = self.jwt.as_ref().map_or_else(String::new, |j| {
            format!(
                "http jwt: {} {} ({}), audience {:?}{}, leeway {}\n",
                j.keys.key(),
                j.keys.path().display(),
                j.algorithms
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                j.audience,
                j.issuer
                    .as_ref()
                    .map_or_else(String::new, |i| format!(", issuer {i:?}")),
                humantime::format_duration(j.leeway)
            )
        });
        let limits = format!(
            "http: {} device(s), anonymous {}; bodies up to {}, batches up to {} and {} items; \
             {} connections ({} per IP); {}; {}\n",
            self.devices.len(),
            if self.allow_anonymous { "on" } else { "off" },
            units::format_size(self.max_body_size as u64),
            units::format_size(self.max_batch_size as u64),
            self.max_batch_items,
            self.max_connections,
            self.max_connections_per_ip,
            if self.rate_per_device > 0.0 {
                format!(
                    "{} requests/s per device (burst {})",
                    self.rate_per_device, self.rate_burst
                )
            } else {
                "no request rate limit".to_owned()
            },
            if self.max_streams == 0 {
                "SSE off".to_owned()
            } else {
                format!("up to {} SSE streams", self.max_streams)
            },
        );
        limits + &jwt
    }
}

// ---------------------------------------------------------------------------------------------
// Raw, as written.

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawHttp {
    listen: Vec<String>,
    tls_listen: Vec<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    client_ca: Option<String>,
    client_cert: Option<String>,
    allow_anonymous: bool,
    anonymous_publish: Vec<String>,
    anonymous_subscribe: Vec<String>,
    http2: bool,
    worker_threads: i64,
    max_connections: i64,
    max_connections_per_ip: i64,
    h2_max_streams: i64,
    max_header_size: SizeText,
    max_headers: i64,
    header_timeout: DurationText,
    request_timeout: DurationText,
    idle_timeout: DurationText,
    tls_handshake_timeout: DurationText,
    max_body_size: SizeText,
    max_batch_size: SizeText,
    max_batch_items: i64,
    body_memory: SizeText,
    require_content_length: bool,
    queue_wait: DurationText,
    retry_after: DurationText,
    rate_per_device: Number,
    rate_burst: i64,
    max_streams: i64,
    max_streams_per_device: i64,
    max_filters_per_stream: i64,
    max_filters: i64,
    sse_queue: i64,
    sse_queue_full: String,
    sse_max_event: SizeText,
    sse_keepalive: DurationText,
    max_devices_tracked: i64,
    device: Vec<RawDevice>,
    jwt: Option<RawJwt>,
}

impl Default for RawHttp {
    /// [`HttpSection::default`] as written, so the two cannot drift.
    fn default() -> Self {
        let d = HttpSection::default();
        let size = |bytes: usize| SizeText(units::format_size(bytes as u64));
        let duration = |d: Duration| DurationText(humantime::format_duration(d).to_string());
        let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        RawHttp {
            listen: Vec::new(),
            tls_listen: Vec::new(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            client_cert: None,
            allow_anonymous: d.allow_anonymous,
            anonymous_publish: d.anonymous_publish,
            anonymous_subscribe: d.anonymous_subscribe,
            http2: d.http2,
            worker_threads: int(d.worker_threads),
            max_connections: int(d.max_connections),
            max_connections_per_ip: int(d.max_connections_per_ip),
            h2_max_streams: i64::from(d.h2_max_streams),
            max_header_size: size(d.max_header_size),
            max_headers: int(d.max_headers),
            header_timeout: duration(d.header_timeout),
            request_timeout: duration(d.request_timeout),
            idle_timeout: duration(d.idle_timeout),
            tls_handshake_timeout: duration(d.tls_handshake_timeout),
            max_body_size: size(d.max_body_size),
            max_batch_size: size(d.max_batch_size),
            max_batch_items: int(d.max_batch_items),
            body_memory: size(d.body_memory),
            require_content_length: d.require_content_length,
            queue_wait: duration(d.queue_wait),
            retry_after: duration(d.retry_after),
            rate_per_device: Number(d.rate_per_device),
            rate_burst: i64::from(d.rate_burst),
            max_streams: int(d.max_streams),
            max_streams_per_device: int(d.max_streams_per_device),
            max_filters_per_stream: int(d.max_filters_per_stream),
            max_filters: int(d.max_filters),
            sse_queue: int(d.sse_queue),
            sse_queue_full: sse_policy_name(d.sse_queue_full).into(),
            sse_max_event: size(d.sse_max_event),
            sse_keepalive: duration(d.sse_keepalive),
            max_devices_tracked: int(d.max_devices_tracked),
            device: Vec::new(),
            jwt: None,
        }
    }
}

/// `[http.jwt]`, as written.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawJwt {
    public_key: Option<String>,
    jwks: Option<String>,
    algorithms: Vec<String>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: DurationText,
    identity_claim: String,
    publish_claim: String,
    subscribe_claim: String,
    default_publish: Vec<String>,
    default_subscribe: Vec<String>,
    max_token_size: SizeText,
    max_token_header_size: SizeText,
    max_keys: i64,
}

impl Default for RawJwt {
    /// [`JwtSpec::with`]'s defaults as written.
    fn default() -> Self {
        let d = JwtSpec::with(JwtKeyFile::PublicKey(PathBuf::new()), "");
        RawJwt {
            public_key: None,
            jwks: None,
            algorithms: d.algorithms.iter().map(|a| a.as_str().to_owned()).collect(),
            audience: None,
            issuer: None,
            leeway: DurationText(humantime::format_duration(d.leeway).to_string()),
            identity_claim: d.identity_claim,
            publish_claim: d.publish_claim,
            subscribe_claim: d.subscribe_claim,
            default_publish: d.default_publish,
            default_subscribe: d.default_subscribe,
            max_token_size: SizeText(units::format_size(d.max_token_size as u64)),
            max_token_header_size: SizeText(units::format_size(d.max_token_header_size as u64)),
            max_keys: i64::try_from(d.max_keys).unwrap_or(i64::MAX),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RawDevice {
    /// Required (reported in [`compile_http`], with the other errors).
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    token_hash: Option<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
}

const SSE_POLICIES: [&str; 3] = ["drop_oldest", "drop_new", "close"];

fn sse_policy_name(p: SseQueueFull) -> &'static str {
    match p {
        SseQueueFull::DropOldest => "drop_oldest",
        SseQueueFull::DropNew => "drop_new",
        SseQueueFull::Close => "close",
    }
}

const CLIENT_CERT_MODES: [&str; 3] = ["off", "optional", "required"];

// ---------------------------------------------------------------------------------------------
// Compilation.

/// Whether two TCP listen addresses would take the same port: same port (not 0) and family,
/// and the same address or either one the family's wildcard (IPv6 HTTP listeners are v6-only).
fn same_tcp_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Whether an HTTP address takes the admin listener's port: as [`same_tcp_port`], and an IPv6
/// wildcard on either side overlaps IPv4 too (the admin listener is not v6-only, and the
/// check does not rely on the HTTP one being so).
fn takes_admin_port(http: SocketAddr, admin: SocketAddr) -> bool {
    let v6_wildcard = |a: SocketAddr| a.is_ipv6() && a.ip().is_unspecified();
    same_tcp_port(http, admin)
        || (http.port() == admin.port()
            && http.port() != 0
            && (v6_wildcard(http) || v6_wildcard(admin)))
}

/// A grant prefix: `#` alone, or a topic name without wildcards.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix == "#" {
        return Ok(());
    }
    check_topic_name(prefix).map_err(|e| {
        if e.contains("wildcards") {
            format!(
                "prefix `{prefix}` must not contain wildcards (write `#` alone for every topic; \
                 a prefix grants the topics below it)"
            )
        } else {
            e
        }
    })
}

/// Checks a list of grant prefixes, reporting each bad one at its index.
fn compile_prefixes(list: &[String], path: &KeyPath, r: &mut Reporter<'_>) -> Option<Vec<String>> {
    let mut ok = true;
    for (i, p) in list.iter().enumerate() {
        if let Err(e) = check_prefix(p) {
            r.at_path(&path.index(i), e, None);
            ok = false;
        }
    }
    ok.then(|| list.to_vec())
}

/// Parses one address list; `seen` holds the addresses of the lists before (for clashes).
fn compile_addresses(
    list: &[String],
    path: &KeyPath,
    seen: &mut Vec<(SocketAddr, KeyPath)>,
    admin: Option<SocketAddr>,
    r: &mut Reporter<'_>,
) -> Option<Vec<SocketAddr>> {
    let mut ok = true;
    let mut out = Vec::new();
    for (i, text) in list.iter().enumerate() {
        let at = path.index(i);
        let Ok(addr) = text.parse::<SocketAddr>() else {
            r.at_path(
                &at,
                format!("`{text}` is not an IP socket address"),
                Some("write e.g. `127.0.0.1:8080` or `[::1]:8080`".into()),
            );
            ok = false;
            continue;
        };
        if let Some((_, other)) = seen.iter().find(|(a, _)| *a == addr) {
            r.at_path(
                &at,
                format!("`{text}` is listed twice (also at `{other}`)"),
                None,
            );
            ok = false;
        } else if let Some((a, other)) = seen.iter().find(|(a, _)| same_tcp_port(addr, *a)) {
            r.at_path(
                &at,
                format!("`{text}` takes the TCP port of `{a}` (`{other}`)"),
                Some("a wildcard (0.0.0.0, [::]) takes the port on every address".into()),
            );
            ok = false;
        } else if let Some(admin) = admin.filter(|a| takes_admin_port(addr, *a)) {
            r.at_path(
                &at,
                format!("`{text}` takes the TCP port of [admin] listen `{admin}`"),
                Some("the admin listener and the HTTP ingress need their own ports".into()),
            );
            ok = false;
        }
        seen.push((addr, at));
        out.push(addr);
    }
    ok.then_some(out)
}

/// `[http]`; `None` when a key is wrong (reported). Paths are relative to `base`;
/// `admin_listen` is the `[admin] listen` address, if it parsed and is on.
pub(super) fn compile_http(
    h: &RawHttp,
    base: &Path,
    admin_listen: Option<SocketAddr>,
    r: &mut Reporter<'_>,
) -> Option<HttpSection> {
    let hp = KeyPath::root("http");
    let mut ok = true;
    let mut seen = Vec::new();
    let listen = compile_addresses(&h.listen, &hp.key("listen"), &mut seen, admin_listen, r);
    let tls_listen = compile_addresses(
        &h.tls_listen,
        &hp.key("tls_listen"),
        &mut seen,
        admin_listen,
        r,
    );
    if h.allow_anonymous {
        let open: Vec<String> = seen
            .iter()
            .filter(|(a, _)| !a.ip().is_loopback())
            .map(|(a, _)| format!("`{a}`"))
            .collect();
        if !open.is_empty() {
            r.at_path(
                &hp.key("allow_anonymous"),
                format!(
                    "anonymous requests are allowed only when every listen and tls_listen \
                     address is loopback, and {} {} reachable from other hosts",
                    open.join(", "),
                    if open.len() == 1 { "is" } else { "are" }
                ),
                Some(
                    "listen on 127.0.0.1 / [::1] only, or give each device a token \
                     ([[http.device]]) and set allow_anonymous = false"
                        .into(),
                ),
            );
            ok = false;
        }
    }

    // TLS files and client certificates.
    let file_of = |s: &Option<String>| s.as_ref().map(|p| base.join(p));
    let has_tls_listen = !h.tls_listen.is_empty();
    for (key, value) in [
        ("tls_cert", &h.tls_cert),
        ("tls_key", &h.tls_key),
        ("client_ca", &h.client_ca),
    ] {
        if value.as_deref() == Some("") {
            r.at_path(&hp.key(key), "must name a file".into(), None);
            ok = false;
        } else if value.is_some() && !has_tls_listen {
            r.at_path(
                &hp.key(key),
                "is set, but tls_listen is empty (no HTTPS listener would use it)".into(),
                Some("add e.g. tls_listen = [\"0.0.0.0:8443\"], or remove this key".into()),
            );
            ok = false;
        }
    }
    if has_tls_listen {
        let needs = |r: &mut Reporter<'_>, key: &str, message: &str| {
            r.at_path(
                &hp.key(key),
                message.to_owned(),
                Some("tls_cert is the PEM certificate chain, tls_key its PEM private key".into()),
            );
        };
        match (h.tls_cert.is_some(), h.tls_key.is_some()) {
            (true, true) => {}
            (true, false) => needs(r, "tls_cert", "needs tls_key as well"),
            (false, true) => needs(r, "tls_key", "needs tls_cert as well"),
            (false, false) => needs(r, "tls_listen", "needs tls_cert and tls_key"),
        }
        ok &= h.tls_cert.is_some() && h.tls_key.is_some();
    }
    let client_cert = match h.client_cert.as_deref() {
        None if h.client_ca.is_some() => Some(ClientCertMode::Optional),
        None | Some("off") => Some(ClientCertMode::Off),
        Some("optional") => Some(ClientCertMode::Optional),
        Some("required") => Some(ClientCertMode::Required),
        Some(other) => {
            let hint = diag::did_you_mean(other, &CLIENT_CERT_MODES).map_or_else(
                || "use \"off\", \"optional\" or \"required\"".to_owned(),
                |b| format!("did you mean `{b}`?"),
            );
            r.at_path(
                &hp.key("client_cert"),
                format!("unknown mode `{other}`"),
                Some(hint),
            );
            None
        }
    };
    match (client_cert, h.client_ca.is_some()) {
        (Some(mode @ (ClientCertMode::Optional | ClientCertMode::Required)), false) => {
            r.at_path(
                &hp.key("client_cert"),
                format!(
                    "\"{}\" needs client_ca (the PEM roots client certificates must chain to)",
                    if mode == ClientCertMode::Required {
                        "required"
                    } else {
                        "optional"
                    }
                ),
                None,
            );
            ok = false;
        }
        (Some(ClientCertMode::Off), true) => {
            r.at_path(
                &hp.key("client_cert"),
                "is \"off\", but client_ca is set: client certificates would never be asked for"
                    .into(),
                Some("remove client_ca, or write \"optional\" or \"required\"".into()),
            );
            ok = false;
        }
        _ => {}
    }
    let certificates = client_cert.is_some_and(|m| m != ClientCertMode::Off);
    let tls = match (has_tls_listen, file_of(&h.tls_cert), file_of(&h.tls_key)) {
        (true, Some(cert), Some(key)) => client_cert.map(|mode| {
            Some(TlsFiles {
                cert,
                key,
                client_ca: file_of(&h.client_ca).filter(|_| mode != ClientCertMode::Off),
                client_cert: mode,
            })
        }),
        (true, _, _) => None,
        (false, _, _) => Some(None),
    };

    // Grants and devices.
    let anonymous_publish = compile_prefixes(&h.anonymous_publish, &hp.key("anonymous_publish"), r);
    let anonymous_subscribe =
        compile_prefixes(&h.anonymous_subscribe, &hp.key("anonymous_subscribe"), r);
    let devices = compile_devices(&h.device, &hp.key("device"), certificates, r);
    let jwt = match &h.jwt {
        None => Some(None),
        Some(raw) => compile_jwt(raw, base, &hp.key("jwt"), r).map(Some),
    };

    // Bounds.
    let worker_threads = int_in::<usize>(r, &hp.key("worker_threads"), h.worker_threads, 1, 16);
    let max_connections =
        int_in::<usize>(r, &hp.key("max_connections"), h.max_connections, 1, 65_536);
    let max_connections_per_ip = int_in::<usize>(
        r,
        &hp.key("max_connections_per_ip"),
        h.max_connections_per_ip,
        1,
        65_536,
    );
    let h2_max_streams = int_in::<u32>(r, &hp.key("h2_max_streams"), h.h2_max_streams, 1, 1000);
    let max_header_size = size_in(
        r,
        &hp.key("max_header_size"),
        &h.max_header_size,
        8 << 10,
        1 << 20,
    );
    let max_headers = int_in::<usize>(r, &hp.key("max_headers"), h.max_headers, 8, 1000);
    let secs = Duration::from_secs;
    let header_timeout = duration_in(
        r,
        &hp.key("header_timeout"),
        &h.header_timeout,
        secs(1),
        secs(300),
    );
    let request_timeout = duration_in(
        r,
        &hp.key("request_timeout"),
        &h.request_timeout,
        secs(1),
        secs(600),
    );
    // At least 2 s: `sse_keepalive` (at least 1 s) must be shorter.
    let idle_timeout = duration_in(
        r,
        &hp.key("idle_timeout"),
        &h.idle_timeout,
        secs(2),
        secs(3600),
    );
    let tls_handshake_timeout = duration_in(
        r,
        &hp.key("tls_handshake_timeout"),
        &h.tls_handshake_timeout,
        secs(1),
        secs(300),
    );
    // A larger body could be spooled but never forwarded by an MQTT upstream.
    let max_body_size = size_in(
        r,
        &hp.key("max_body_size"),
        &h.max_body_size,
        1,
        MAX_PUBLISH_BYTES as u64,
    );
    let max_batch_size = size_in(
        r,
        &hp.key("max_batch_size"),
        &h.max_batch_size,
        1 << 10,
        64 << 20,
    );
    let max_batch_items =
        int_in::<usize>(r, &hp.key("max_batch_items"), h.max_batch_items, 1, 100_000);
    let body_memory = size_in(r, &hp.key("body_memory"), &h.body_memory, 1 << 20, 4 << 30);
    if let (Some(memory), Some(batch)) = (body_memory, max_batch_size)
        && memory < batch
    {
        r.at_path(
            &hp.key("body_memory"),
            format!(
                "{} is smaller than max_batch_size ({}): a batch that large could never be \
                     read",
                h.body_memory.trim(),
                h.max_batch_size.trim()
            ),
            None,
        );
        ok = false;
    }
    let queue_wait = duration_in(
        r,
        &hp.key("queue_wait"),
        &h.queue_wait,
        Duration::ZERO,
        secs(60),
    );
    let retry_after = duration_in(
        r,
        &hp.key("retry_after"),
        &h.retry_after,
        secs(1),
        secs(3600),
    )
    .and_then(|d| {
        if d.subsec_nanos() == 0 {
            Some(d)
        } else {
            r.at_path(
                &hp.key("retry_after"),
                format!(
                    "{} is not whole seconds (Retry-After counts seconds)",
                    h.retry_after.trim()
                ),
                None,
            );
            None
        }
    });
    let rate = h.rate_per_device.0;
    let rate_per_device = if rate == 0.0 || (rate.is_finite() && (0.001..=1e6).contains(&rate)) {
        Some(rate)
    } else {
        r.at_path(
            &hp.key("rate_per_device"),
            format!("{rate} is out of range: write 0 (no limit) or 0.001..=1000000"),
            None,
        );
        None
    };
    let rate_burst = int_in::<u32>(r, &hp.key("rate_burst"), h.rate_burst, 1, 1_000_000);
    let max_streams = int_in::<usize>(r, &hp.key("max_streams"), h.max_streams, 0, 65_536);
    let max_streams_per_device = int_in::<usize>(
        r,
        &hp.key("max_streams_per_device"),
        h.max_streams_per_device,
        1,
        1024,
    );
    let max_filters_per_stream = int_in::<usize>(
        r,
        &hp.key("max_filters_per_stream"),
        h.max_filters_per_stream,
        1,
        64,
    );
    let max_filters = int_in::<usize>(
        r,
        &hp.key("max_filters"),
        h.max_filters,
        1,
        MAX_SUBSCRIPTIONS as i64,
    );
    let sse_queue = int_in::<usize>(r, &hp.key("sse_queue"), h.sse_queue, 1, 65_536);
    let sse_queue_full = match h.sse_queue_full.as_str() {
        "drop_oldest" => Some(SseQueueFull::DropOldest),
        "drop_new" => Some(SseQueueFull::DropNew),
        "close" => Some(SseQueueFull::Close),
        other => {
            let hint = diag::did_you_mean(other, &SSE_POLICIES).map_or_else(
                || "use \"drop_oldest\", \"drop_new\" or \"close\"".to_owned(),
                |b| format!("did you mean `{b}`?"),
            );
            r.at_path(
                &hp.key("sse_queue_full"),
                format!("unknown policy `{other}`"),
                Some(hint),
            );
            None
        }
    };
    let sse_max_event = size_in(
        r,
        &hp.key("sse_max_event"),
        &h.sse_max_event,
        1 << 10,
        16 << 20,
    );
    let sse_keepalive = duration_in(
        r,
        &hp.key("sse_keepalive"),
        &h.sse_keepalive,
        secs(1),
        secs(600),
    );
    if let (Some(keepalive), Some(idle)) = (sse_keepalive, idle_timeout)
        && keepalive >= idle
    {
        r.at_path(
            &hp.key("sse_keepalive"),
            format!(
                "{} must be shorter than idle_timeout ({}): an idle stream would be closed \
                     before its keep-alive comment",
                h.sse_keepalive.trim(),
                h.idle_timeout.trim()
            ),
            None,
        );
        ok = false;
    }
    let max_devices_tracked = int_in::<usize>(
        r,
        &hp.key("max_devices_tracked"),
        h.max_devices_tracked,
        1,
        1_000_000,
    );

    let section = HttpSection {
        listen: listen?,
        tls_listen: tls_listen?,
        tls: tls?,
        allow_anonymous: h.allow_anonymous,
        anonymous_publish: anonymous_publish?,
        anonymous_subscribe: anonymous_subscribe?,
        devices: devices?,
        http2: h.http2,
        worker_threads: worker_threads?,
        max_connections: max_connections?,
        max_connections_per_ip: max_connections_per_ip?,
        h2_max_streams: h2_max_streams?,
        max_header_size: max_header_size?,
        max_headers: max_headers?,
        header_timeout: header_timeout?,
        request_timeout: request_timeout?,
        idle_timeout: idle_timeout?,
        tls_handshake_timeout: tls_handshake_timeout?,
        max_body_size: max_body_size?,
        max_batch_size: max_batch_size?,
        max_batch_items: max_batch_items?,
        body_memory: body_memory?,
        require_content_length: h.require_content_length,
        queue_wait: queue_wait?,
        retry_after: retry_after?,
        rate_per_device: rate_per_device?,
        rate_burst: rate_burst?,
        max_streams: max_streams?,
        max_streams_per_device: max_streams_per_device?,
        max_filters_per_stream: max_filters_per_stream?,
        max_filters: max_filters?,
        sse_queue: sse_queue?,
        sse_queue_full: sse_queue_full?,
        sse_max_event: sse_max_event?,
        sse_keepalive: sse_keepalive?,
        max_devices_tracked: max_devices_tracked?,
        // Set by `config::compile` from `[[acl]]` and `[limits]`.
        security: std::sync::Arc::default(),
        jwt: jwt?,
    };
    ok.then_some(section)
}

/// Longest JWT claim name (`identity_claim`, `publish_claim`, `subscribe_claim`), in bytes.
const MAX_CLAIM_NAME_LEN: usize = 64;

/// `[http.jwt]`; `None` when a key is wrong (reported).
fn compile_jwt(j: &RawJwt, base: &Path, path: &KeyPath, r: &mut Reporter<'_>) -> Option<JwtSpec> {
    let mut ok = true;
    let file = |key: &str, value: &Option<String>, r: &mut Reporter<'_>| match value.as_deref() {
        Some("") => {
            r.at_path(&path.key(key), "must name a file".into(), None);
            None
        }
        other => Some(other.map(|p| base.join(p))),
    };
    let public_key = file("public_key", &j.public_key, r);
    let jwks = file("jwks", &j.jwks, r);
    let keys = match (public_key, jwks) {
        (Some(Some(pem)), Some(None)) => Some(JwtKeyFile::PublicKey(pem)),
        (Some(None), Some(Some(set))) => Some(JwtKeyFile::Jwks(set)),
        (Some(Some(_)), Some(Some(_))) => {
            r.at_path(
                &path.key("jwks"),
                "is set together with public_key: name one key file".into(),
                Some("public_key is one PEM key; jwks a JWK Set whose keys have a kid".into()),
            );
            None
        }
        (Some(None), Some(None)) => {
            r.at_path(
                path,
                "needs public_key (a PEM public key) or jwks (a JWK Set file)".into(),
                Some("write e.g. public_key = \"/etc/sensorgate/jwt.pem\"".into()),
            );
            None
        }
        _ => None,
    };
    let mut algorithms = Vec::new();
    if j.algorithms.is_empty() {
        r.at_path(
            &path.key("algorithms"),
            "is empty: no token could be accepted".into(),
            Some("write e.g. algorithms = [\"RS256\", \"ES256\"]".into()),
        );
        ok = false;
    }
    for (i, name) in j.algorithms.iter().enumerate() {
        let alg = match name.as_str() {
            "RS256" => JwtAlgorithm::Rs256,
            "ES256" => JwtAlgorithm::Es256,
            other => {
                let why = if other.eq_ignore_ascii_case("none") {
                    "`none` (unsigned tokens) is never accepted".to_owned()
                } else if other.to_ascii_uppercase().starts_with("HS") {
                    format!(
                        "`{other}` is an HMAC algorithm: with a public key anyone could sign \
                         tokens (algorithm confusion); it is never accepted"
                    )
                } else {
                    format!("unsupported algorithm `{other}`")
                };
                let hint = diag::did_you_mean(other, &JWT_ALGORITHMS).map_or_else(
                    || "use \"RS256\" and/or \"ES256\"".to_owned(),
                    |b| format!("did you mean `{b}`?"),
                );
                r.at_path(&path.key("algorithms").index(i), why, Some(hint));
                ok = false;
                continue;
            }
        };
        if algorithms.contains(&alg) {
            r.at_path(
                &path.key("algorithms").index(i),
                format!("`{name}` is listed twice"),
                None,
            );
            ok = false;
        }
        algorithms.push(alg);
    }
    let audience = match j.audience.as_deref() {
        Some(a) if !a.is_empty() && !a.chars().any(char::is_control) => Some(a.to_owned()),
        Some(_) => {
            r.at_path(
                &path.key("audience"),
                "must be a non-empty string without control characters".into(),
                None,
            );
            None
        }
        None => {
            r.at_path(
                path,
                "needs audience (the `aud` value tokens for this gateway carry)".into(),
                Some("write e.g. audience = \"sensorgate\"".into()),
            );
            None
        }
    };
    if j.issuer.as_deref() == Some("") {
        r.at_path(
            &path.key("issuer"),
            "must not be empty (remove it to accept any issuer)".into(),
            None,
        );
        ok = false;
    }
    let mut claims = Vec::new();
    for (key, name) in [
        ("identity_claim", &j.identity_claim),
        ("publish_claim", &j.publish_claim),
        ("subscribe_claim", &j.subscribe_claim),
    ] {
        if name.is_empty() || name.len() > MAX_CLAIM_NAME_LEN || name.chars().any(char::is_control)
        {
            r.at_path(
                &path.key(key),
                format!("must be 1..={MAX_CLAIM_NAME_LEN} bytes without control characters"),
                None,
            );
            ok = false;
        } else if ["exp", "nbf", "iat", "aud", "iss", "jti"].contains(&name.as_str()) {
            r.at_path(
                &path.key(key),
                format!("`{name}` is a registered claim with another meaning"),
                None,
            );
            ok = false;
        } else if let Some((other, _)) = claims.iter().find(|(_, n)| n == name) {
            r.at_path(
                &path.key(key),
                format!("`{name}` is already {other}"),
                Some("each claim has one meaning".into()),
            );
            ok = false;
        }
        claims.push((key, name.clone()));
    }
    let default_publish = compile_prefixes(&j.default_publish, &path.key("default_publish"), r);
    let default_subscribe =
        compile_prefixes(&j.default_subscribe, &path.key("default_subscribe"), r);
    let leeway = duration_in(
        r,
        &path.key("leeway"),
        &j.leeway,
        Duration::ZERO,
        Duration::from_secs(600),
    );
    let max_token_size = size_in(
        r,
        &path.key("max_token_size"),
        &j.max_token_size,
        256,
        64 << 10,
    );
    let max_token_header_size = size_in(
        r,
        &path.key("max_token_header_size"),
        &j.max_token_header_size,
        64,
        16 << 10,
    );
    let max_keys = int_in::<usize>(r, &path.key("max_keys"), j.max_keys, 1, 1000);
    let spec = JwtSpec {
        keys: keys?,
        algorithms,
        audience: audience?,
        issuer: j.issuer.clone(),
        leeway: leeway?,
        identity_claim: j.identity_claim.clone(),
        publish_claim: j.publish_claim.clone(),
        subscribe_claim: j.subscribe_claim.clone(),
        default_publish: default_publish?,
        default_subscribe: default_subscribe?,
        max_token_size: max_token_size?,
        max_token_header_size: max_token_header_size?,
        max_keys: max_keys?,
    };
    ok.then_some(spec)
}

/// `[[http.device]]`; `certificates`: whether client certificates are asked for (a device
/// without a token is reachable only then).
fn compile_devices(
    raw: &[RawDevice],
    path: &KeyPath,
    certificates: bool,
    r: &mut Reporter<'_>,
) -> Option<Vec<DeviceSpec>> {
    let mut ok = true;
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut hashes: HashMap<TokenDigest, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, d) in raw.iter().enumerate() {
        let at = path.index(i);
        let id = match d.id.as_deref() {
            None => {
                r.at_path(
                    &at.key("id"),
                    "is required".into(),
                    Some("write e.g. id = \"dev1\" (the device's identity)".into()),
                );
                None
            }
            Some(id) if id.is_empty() || id.len() > MAX_DEVICE_ID_LEN => {
                r.at_path(
                    &at.key("id"),
                    format!("must be 1..={MAX_DEVICE_ID_LEN} bytes long"),
                    None,
                );
                None
            }
            Some(id) if id.chars().any(char::is_control) => {
                r.at_path(
                    &at.key("id"),
                    format!("`{}` contains control characters", id.escape_debug()),
                    None,
                );
                None
            }
            Some(ANONYMOUS_ID) => {
                r.at_path(
                    &at.key("id"),
                    format!("`{ANONYMOUS_ID}` is the identity of requests without credentials"),
                    Some("choose another id".into()),
                );
                None
            }
            Some(id) => match ids.get(id) {
                Some(first) => {
                    r.at_path(
                        &at.key("id"),
                        format!("`{id}` is already the id of `{}`", path.index(*first)),
                        Some("each device needs its own id".into()),
                    );
                    None
                }
                None => {
                    ids.insert(id, i);
                    Some(id.to_owned())
                }
            },
        };
        let token_hash = match d.token_hash.as_deref() {
            None => Some(None),
            Some(text) => match token::parse_hash(text) {
                None => {
                    r.at_path(
                        &at.key("token_hash"),
                        format!(
                            "`{text}` is not a token hash (`{}` and 64 hex digits)",
                            token::HASH_PREFIX
                        ),
                        Some(
                            "make one with `sensorgate hash-token` (it reads the token on \
                             stdin), or a new token and its hash with `sensorgate hash-token \
                             --generate`"
                                .into(),
                        ),
                    );
                    None
                }
                Some(digest) => match hashes.get(&digest) {
                    Some(first) => {
                        r.at_path(
                            &at.key("token_hash"),
                            format!(
                                "is the token hash of `{}` too: a token names one device",
                                path.index(*first)
                            ),
                            Some("give each device its own token".into()),
                        );
                        None
                    }
                    None => {
                        hashes.insert(digest, i);
                        Some(Some(digest))
                    }
                },
            },
        };
        if d.token_hash.is_none() && !certificates && id.is_some() {
            r.at_path(
                &at.key("id"),
                "has no token_hash and client certificates are off (no client_ca): this \
                 device could never authenticate"
                    .into(),
                Some(
                    "add token_hash (`sensorgate hash-token --generate`), or set tls_listen and \
                     client_ca so that its certificate names it"
                        .into(),
                ),
            );
            ok = false;
        }
        let publish = compile_prefixes(&d.publish, &at.key("publish"), r);
        let subscribe = compile_prefixes(&d.subscribe, &at.key("subscribe"), r);
        match (id, token_hash, publish, subscribe) {
            (Some(id), Some(token_hash), Some(publish), Some(subscribe)) => {
                out.push(DeviceSpec {
                    id,
                    token_hash,
                    publish,
                    subscribe,
                });
            }
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn tcp_ports_clash_on_the_same_address_or_a_wildcard_of_the_family() {
        assert!(same_tcp_port(a("127.0.0.1:8080"), a("127.0.0.1:8080")));
        assert!(same_tcp_port(a("0.0.0.0:8080"), a("127.0.0.1:8080")));
        assert!(same_tcp_port(a("[::1]:8080"), a("[::]:8080")));
        assert!(!same_tcp_port(a("0.0.0.0:8080"), a("[::]:8080")));
        assert!(!same_tcp_port(a("127.0.0.1:8080"), a("127.0.0.2:8080")));
        assert!(!same_tcp_port(a("127.0.0.1:0"), a("127.0.0.1:0")));
    }

    #[test]
    fn an_ipv6_wildcard_overlaps_the_admin_port_on_ipv4_too() {
        assert!(takes_admin_port(a("[::]:9180"), a("127.0.0.1:9180")));
        assert!(takes_admin_port(a("127.0.0.1:9180"), a("[::]:9180")));
        assert!(takes_admin_port(a("0.0.0.0:9180"), a("127.0.0.1:9180")));
        assert!(!takes_admin_port(a("0.0.0.0:9180"), a("[::1]:9180")));
        assert!(!takes_admin_port(a("127.0.0.1:8080"), a("127.0.0.1:9180")));
        assert!(!takes_admin_port(a("[::]:0"), a("127.0.0.1:0")));
    }

    #[test]
    fn prefixes_are_topic_names_or_a_lone_hash() {
        assert!(check_prefix("#").is_ok());
        assert!(check_prefix("sensors/dev1").is_ok());
        assert!(check_prefix("sensors/#").unwrap_err().contains("wildcards"));
        assert!(check_prefix("a/+/b").unwrap_err().contains("wildcards"));
        assert!(check_prefix("").is_err());
        assert!(check_prefix("a\u{1}").is_err());
    }

    #[test]
    fn the_raw_defaults_are_the_sections() {
        let mut r = Reporter::new(Path::new("t.toml"), "", None);
        let s = compile_http(&RawHttp::default(), Path::new("."), None, &mut r).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(s, HttpSection::default());
    }
}
