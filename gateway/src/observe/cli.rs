//! `sensorgate status`: asks a running gateway's admin listener for `/status` and prints a
//! one-screen summary (or the document itself, `--json`).
//!
//! Invariants:
//! - The exchange is bounded: one connection, one request, [`MAX_STATUS_BYTES`] of answer at
//!   most, the whole of it within the caller's timeout ([`STATUS_TIMEOUT`] from the CLI).
//! - HTTP is hyper's client connection API, never hand-written.
//! - [`render`] reads no clock: relative times ("3m 12s ago") are taken against the
//!   document's own "now" (`started_ms + uptime_secs`), so they are what the gateway saw.
//! - The exit code follows the Nagios plugin convention that monitoring tools understand:
//!   [`EXIT_HEALTHY`], [`EXIT_DEGRADED`], [`EXIT_UNHEALTHY`], [`EXIT_UNREACHABLE`].

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::status::{Health, SerialLineInfo, StatusDoc, UpstreamInfo};

/// Exit code: the gateway is healthy (Nagios OK).
pub const EXIT_HEALTHY: u8 = 0;
/// Exit code: the gateway serves and accepts data but something is wrong, e.g. an upstream
/// is down and data is spooled (Nagios WARNING).
pub const EXIT_DEGRADED: u8 = 1;
/// Exit code: the gateway answers but does not serve (starting, stopping, a loop stopped
/// turning) (Nagios CRITICAL).
pub const EXIT_UNHEALTHY: u8 = 2;
/// Exit code: no verdict: the admin listener is off, unreachable, refused the token, or
/// answered something that is not a `/status` document (Nagios UNKNOWN).
pub const EXIT_UNREACHABLE: u8 = 3;

/// How long `sensorgate status` waits for the whole answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest `/status` answer read (the document is a few KiB; the event ring is bounded).
pub const MAX_STATUS_BYTES: usize = 4 * 1024 * 1024;

/// How many of the document's events the summary shows (the most recent).
pub const SUMMARY_EVENTS: usize = 5;

/// Why no `/status` document was obtained.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The TCP connection failed (nothing listens, refused, no route).
    #[error("cannot connect to the admin listener at {addr}: {source}")]
    Unreachable {
        /// Where it was tried.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// No complete answer within the timeout.
    #[error("the admin listener at {addr} did not answer within {timeout:?}")]
    Timeout {
        /// Where it was asked.
        addr: SocketAddr,
        /// The bound.
        timeout: Duration,
    },
    /// HTTP 401.
    #[error("admin token missing or wrong (HTTP 401 from {addr}): set [admin] token")]
    Unauthorized {
        /// Where it was asked.
        addr: SocketAddr,
    },
    /// Another HTTP status than 200 or 401.
    #[error("the admin listener at {addr} answered HTTP {status}")]
    HttpStatus {
        /// Where it was asked.
        addr: SocketAddr,
        /// The status code.
        status: u16,
    },
    /// The token cannot be sent in a header (control characters).
    #[error("[admin] token cannot be sent in an HTTP header (it holds control characters)")]
    BadToken,
    /// The HTTP exchange failed (connection reset, not HTTP).
    #[error("HTTP exchange with {addr} failed: {source}")]
    Http {
        /// Where it was asked.
        addr: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
    /// Reading the answer failed or it exceeded [`MAX_STATUS_BYTES`].
    #[error("reading the answer from {addr} failed (at most {MAX_STATUS_BYTES} bytes): {source}")]
    Body {
        /// Where it was asked.
        addr: SocketAddr,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The answer is not a `/status` document.
    #[error("the answer from {addr} is not a /status document: {source}")]
    BadJson {
        /// Where it was asked.
        addr: SocketAddr,
        /// Why.
        source: serde_json::Error,
    },
}

/// Where to connect for a listener bound to `listen`: an unspecified address (`0.0.0.0`,
/// `::`) is reached on the loopback address of its family.
#[must_use]
pub fn connect_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

/// `GET /status` from the admin listener at `addr`, with `Authorization: Bearer <token>` when
/// given, within `timeout`.
///
/// # Errors
/// See [`StatusError`].
pub async fn fetch_status(
    addr: SocketAddr,
    token: Option<&str>,
    timeout: Duration,
) -> Result<StatusDoc, StatusError> {
    fetch_status_raw(addr, token, timeout)
        .await
        .map(|(_, doc)| doc)
}

/// As [`fetch_status`], also returning the body as received (for `--json`).
///
/// # Errors
/// See [`StatusError`].
pub async fn fetch_status_raw(
    addr: SocketAddr,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(Bytes, StatusDoc), StatusError> {
    let body = match tokio::time::timeout(timeout, get(addr, "/status", token)).await {
        Ok(body) => body?,
        Err(_) => return Err(StatusError::Timeout { addr, timeout }),
    };
    let doc =
        serde_json::from_slice(&body).map_err(|source| StatusError::BadJson { addr, source })?;
    Ok((body, doc))
}

/// Aborts the connection task when the exchange ends (or is dropped on timeout).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/1.1 GET on a fresh connection; the body of a 200 answer.
async fn get(
    addr: SocketAddr,
    path: &'static str,
    token: Option<&str>,
) -> Result<Bytes, StatusError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| StatusError::Unreachable { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| StatusError::Http { addr, source })?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        // Its error, if any, also fails the request below, which reports it.
        let _ = conn.await;
    }));

    let mut req = Request::new(Empty::<Bytes>::new());
    *req.uri_mut() = hyper::Uri::from_static(path);
    let headers = req.headers_mut();
    if let Ok(host) = HeaderValue::from_str(&addr.to_string()) {
        headers.insert(header::HOST, host);
    }
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("sensorgate-status/", env!("CARGO_PKG_VERSION"))),
    );
    if let Some(token) = token {
        let value =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| StatusError::BadToken)?;
        headers.insert(header::AUTHORIZATION, value);
    }

    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| StatusError::Http { addr, source })?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => return Err(StatusError::Unauthorized { addr }),
        s => {
            return Err(StatusError::HttpStatus {
                addr,
                status: s.as_u16(),
            });
        }
    }
    let collected = Limited::new(resp.into_body(), MAX_STATUS_BYTES)
        .collect()
        .await
        .map_err(|source| StatusError::Body { addr, source })?;
    Ok(collected.to_bytes())
}

/// The exit code for a fetch's outcome: the health's, or [`EXIT_UNREACHABLE`] without a
/// document.
#[must_use]
pub fn exit_code(result: &Result<StatusDoc, StatusError>) -> u8 {
    match result {
        Ok(doc) => health_exit_code(doc.health.state),
        Err(_) => EXIT_UNREACHABLE,
    }
}

/// The exit code of a verdict.
#[must_use]
pub const fn health_exit_code(health: Health) -> u8 {
    match health {
        Health::Healthy => EXIT_HEALTHY,
        Health::Degraded => EXIT_DEGRADED,
        Health::Unhealthy => EXIT_UNHEALTHY,
    }
}

/// What `sensorgate status` prints and returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// For stdout.
    pub stdout: String,
    /// For stderr.
    pub stderr: String,
    /// The process exit code (`EXIT_*`).
    pub code: u8,
}

/// The whole `sensorgate status` command: `listen` and `token` are `[admin] listen` and
/// `token` (`None` listen: the listener is off), `json` prints the document as received,
/// `color` whether stdout is a terminal.
pub async fn status_command(
    listen: Option<SocketAddr>,
    token: Option<&str>,
    json: bool,
    color: bool,
    timeout: Duration,
) -> CommandOutput {
    let Some(listen) = listen else {
        return CommandOutput {
            stdout: String::new(),
            stderr: "sensorgate status: the admin listener is off ([admin] listen is empty); \
                     nothing to ask\n"
                .to_owned(),
            code: EXIT_UNREACHABLE,
        };
    };
    let addr = connect_addr(listen);
    match fetch_status_raw(addr, token, timeout).await {
        Ok((body, doc)) => {
            let mut stdout = if json {
                String::from_utf8_lossy(&body).into_owned()
            } else {
                render(&doc, color)
            };
            if !stdout.ends_with('\n') {
                stdout.push('\n');
            }
            CommandOutput {
                stdout,
                stderr: String::new(),
                code: health_exit_code(doc.health.state),
            }
        }
        Err(e) => CommandOutput {
            stdout: String::new(),
            stderr: format!("sensorgate status: UNREACHABLE: {e}\n"),
            code: EXIT_UNREACHABLE,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering.

const RED: &str = "31";
const GREEN: &str = "32";
const YELLOW: &str = "33";
const BOLD: &str = "1";
const DIM: &str = "2";

/// `text` in SGR `code` when `color`.
fn paint(text: &str, code: &str, color: bool) -> String {
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// `1023 B`, `4.0 KiB`, `12.5 MiB`, `1.2 GiB`.
#[must_use]
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    // Precision loss past 2^53 bytes is irrelevant to one decimal.
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in UNITS.iter().skip(1) {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `45s`, `3m 12s`, `2h 5m`, `3d 4h`.
#[must_use]
pub fn human_secs(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// How long before `now_ms` the wall-clock time `at_ms` was (`?` for 0: never).
fn ago(now_ms: u64, at_ms: u64) -> String {
    if at_ms == 0 {
        return "?".to_owned();
    }
    format!("{} ago", human_secs(now_ms.saturating_sub(at_ms) / 1000))
}

fn health_word(h: Health, color: bool) -> String {
    match h {
        Health::Healthy => paint("HEALTHY", GREEN, color),
        Health::Degraded => paint("DEGRADED", YELLOW, color),
        Health::Unhealthy => paint("UNHEALTHY", RED, color),
    }
}

fn upstream_lines(out: &mut String, u: &UpstreamInfo, now_ms: u64, color: bool) {
    let state = if u.connected {
        paint("UP", GREEN, color)
    } else {
        paint("DOWN", RED, color)
    };
    let since = if u.since_ms == 0 {
        "no attempt yet".to_owned()
    } else {
        format!("since {}", ago(now_ms, u.since_ms))
    };
    let _ = writeln!(
        out,
        "  {} ({}, {})  {state} {since}",
        paint(&u.name, BOLD, color),
        u.kind,
        u.url
    );
    let _ = writeln!(
        out,
        "    backlog {} records, {}, oldest {}   in flight {}   forwarded {}   reconnects {}",
        u.backlog.records,
        human_bytes(u.backlog.bytes),
        human_secs(u.backlog.oldest_age_secs),
        u.in_flight,
        u.forwarded,
        u.reconnects
    );
    if let Some(err) = &u.last_error {
        let _ = writeln!(out, "    last error: {}", paint(err, DIM, color));
    }
}

fn serial_line(out: &mut String, l: &SerialLineInfo, now_ms: u64, color: bool) {
    let state = if l.up {
        paint("UP", GREEN, color)
    } else {
        paint("DOWN", RED, color)
    };
    let since = if l.since_ms == 0 {
        "not opened yet".to_owned()
    } else {
        format!("since {}", ago(now_ms, l.since_ms))
    };
    let bad: Vec<String> = l
        .bad
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "  {} {}{}  {state} {since}   frames in {} out {}   write dropped {}   reopens {}{}{}",
        l.line,
        l.device,
        if l.forwarder { " (forwarder)" } else { "" },
        l.frames_in,
        l.frames_out,
        l.write_dropped,
        l.reopens,
        if bad.is_empty() { "" } else { "   bad: " },
        bad.join(", "),
    );
}

/// The one-screen summary of `doc`, with ANSI colour only when `color`.
#[must_use]
pub fn render(doc: &StatusDoc, color: bool) -> String {
    let g = &doc.gateway;
    let now_ms = g
        .started_ms
        .saturating_add(g.uptime_secs.saturating_mul(1000));
    let mut out = String::new();

    let _ = writeln!(
        out,
        "{}  {}",
        paint("Health:", BOLD, color),
        health_word(doc.health.state, color)
    );
    for r in &doc.health.reasons {
        let _ = writeln!(out, "  - {r}");
    }
    let _ = writeln!(
        out,
        "Gateway: {} (id {})  sensorgate {}  up {}  config {}",
        g.name,
        g.id,
        g.version,
        human_secs(g.uptime_secs),
        g.config
    );

    let listeners: Vec<String> = doc
        .listeners
        .iter()
        .map(|l| format!("{} {} {}", l.protocol, l.transport, l.address))
        .collect();
    let _ = writeln!(
        out,
        "Listeners: {}",
        if listeners.is_empty() {
            "none".to_owned()
        } else {
            listeners.join(", ")
        }
    );

    if !doc.serial.is_empty() {
        let _ = writeln!(out, "{}", paint("Serial lines:", BOLD, color));
    }
    for l in &doc.serial {
        serial_line(&mut out, l, now_ms, color);
    }

    let _ = writeln!(out, "{}", paint("Upstreams:", BOLD, color));
    if doc.upstreams.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for u in &doc.upstreams {
        upstream_lines(&mut out, u, now_ms, color);
    }

    let _ = writeln!(out, "{}", paint("Sessions:", BOLD, color));
    if doc.protocols.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for p in &doc.protocols {
        let states: Vec<String> = p
            .sessions
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  {:<8} {} total{}{}   messages in {}   refused {}   downlink {}",
            p.protocol,
            p.sessions_total,
            if states.is_empty() { "" } else { ": " },
            states.join(", "),
            p.messages_in,
            p.refused,
            p.downlink_delivered
        );
    }

    let s = &doc.spool;
    let percent = if s.max_bytes == 0 {
        0
    } else {
        u128::from(s.bytes) * 100 / u128::from(s.max_bytes)
    };
    let full = if s.full {
        format!("  {}", paint("FULL", RED, color))
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "{} {} of {} ({percent}%), {} records, {} segments, when full: {}{full}",
        paint("Spool:", BOLD, color),
        human_bytes(s.bytes),
        human_bytes(s.max_bytes),
        s.records,
        s.segments,
        s.when_full
    );
    let drops: Vec<String> = s.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(
        out,
        "  dropped: {}   disk errors: {}",
        if drops.is_empty() {
            "none".to_owned()
        } else {
            drops.join(", ")
        },
        s.disk_errors
    );

    if let Some(f) = &doc.fleet {
        let c = &f.counts;
        let beats = if f.heartbeat_secs == 0 {
            "heartbeats off".to_owned()
        } else {
            format!(
                "heartbeats every {}: {} sent, {} skipped",
                human_secs(f.heartbeat_secs),
                c.heartbeats_sent,
                c.heartbeats_skipped
            )
        };
        let replays = if f.replay {
            format!(
                "replays {} served, {} refused",
                c.replays_served,
                c.replays_refused + c.replays_unanswered
            )
        } else {
            "replay off".to_owned()
        };
        let _ = writeln!(
            out,
            "{} {}/state   {beats}   events {} sent, {} rate-limited   {replays}",
            paint("Fleet:", BOLD, color),
            f.topic_prefix,
            c.events_sent,
            c.events_rate_limited
        );
    }

    if let Some(r) = &doc.reload {
        let word = if r.outcome == "applied" {
            r.outcome.clone()
        } else {
            paint(&r.outcome, RED, color)
        };
        let _ = writeln!(
            out,
            "{} {word} {} ago: {}",
            paint("Last reload:", BOLD, color),
            human_secs(now_ms.saturating_sub(r.at_ms) / 1000),
            r.summary
        );
        for e in &r.errors {
            let _ = writeln!(out, "  - {e}");
        }
    }

    let _ = writeln!(out, "{}", paint("Recent events:", BOLD, color));
    if doc.events.is_empty() {
        let _ = writeln!(out, "  none");
    }
    let skip = doc.events.len().saturating_sub(SUMMARY_EVENTS);
    for e in doc.events.iter().skip(skip) {
        let level = if e.level == "warning" {
            paint(&e.level, YELLOW, color)
        } else {
            e.level.clone()
        };
        let _ = writeln!(
            out,
            "  {:>12}  {level:<7}  {}  {}",
            ago(now_ms, e.at_ms),
            e.kind,
            e.message
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::observe::status::{
        BacklogInfo, EventInfo, FleetInfo, GatewayInfo, HealthInfo, ListenerInfo, ProtocolInfo,
        ReloadInfo, SpoolInfo,
    };

    fn doc(health: Health) -> StatusDoc {
        let started_ms = 1_700_000_000_000;
        StatusDoc {
            gateway: GatewayInfo {
                id: 7,
                name: "field-box".into(),
                version: "0.1.0".into(),
                started_ms,
                uptime_secs: 192,
                config: "/etc/sensorgate.toml".into(),
            },
            health: HealthInfo {
                state: health,
                live: true,
                ready: true,
                reasons: if health == Health::Healthy {
                    vec![]
                } else {
                    vec!["upstream \"cloud\" is down".into()]
                },
            },
            listeners: vec![ListenerInfo {
                protocol: "mqtt-sn".into(),
                transport: "udp".into(),
                address: "127.0.0.1:1884".into(),
            }],
            serial: Vec::new(),
            protocols: vec![ProtocolInfo {
                protocol: "mqtt-sn".into(),
                sessions: BTreeMap::from([("active".into(), 2), ("asleep".into(), 1)]),
                sessions_total: 3,
                messages_in: 1234,
                refused: 0,
                downlink_delivered: 5,
                security: BTreeMap::new(),
            }],
            upstreams: vec![UpstreamInfo {
                name: "cloud".into(),
                kind: "mqtt".into(),
                url: "mqtt://broker:1883".into(),
                connected: health == Health::Healthy,
                since_ms: started_ms + 12_000,
                last_error: Some("connection refused".into()),
                reconnects: 1,
                forwarded: 1000,
                in_flight: 2,
                backlog: BacklogInfo {
                    records: 4321,
                    bytes: 5 * 1024 * 1024,
                    oldest_age_secs: 75,
                },
            }],
            spool: SpoolInfo {
                dir: "/var/lib/sensorgate/spool".into(),
                bytes: 5 * 1024 * 1024,
                max_bytes: 64 * 1024 * 1024,
                segments: 2,
                records: 4321,
                appended: 5321,
                when_full: "reject_new".into(),
                full: false,
                dropped: BTreeMap::from([("expired".into(), 3)]),
                disk_errors: 0,
            },
            events: (0..8)
                .map(|i| EventInfo {
                    at_ms: started_ms + i * 1000,
                    kind: format!("event_{i}"),
                    level: "warning".into(),
                    message: format!("message {i}"),
                    ..EventInfo::default()
                })
                .collect(),
            reload: None,
            fleet: None,
        }
    }

    #[test]
    fn render_without_colour_has_no_escape_and_the_key_values() {
        let text = render(&doc(Health::Degraded), false);
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains("DEGRADED"), "{text}");
        assert!(text.contains("upstream \"cloud\" is down"), "{text}");
        assert!(
            text.contains("cloud (mqtt, mqtt://broker:1883)  DOWN since 3m 0s ago"),
            "{text}"
        );
        assert!(
            text.contains("backlog 4321 records, 5.0 MiB, oldest 1m 15s"),
            "{text}"
        );
        assert!(text.contains("last error: connection refused"), "{text}");
        assert!(text.contains("3 total: active 2, asleep 1"), "{text}");
        assert!(text.contains("5.0 MiB of 64.0 MiB (7%)"), "{text}");
        assert!(text.contains("expired 3"), "{text}");
        assert!(text.contains("up 3m 12s"), "{text}");
        // The last five events only, oldest first.
        assert!(!text.contains("event_2"), "{text}");
        assert!(
            text.contains("event_3") && text.contains("event_7"),
            "{text}"
        );
        assert!(text.find("event_3") < text.find("event_7"));
    }

    #[test]
    fn serial_lines_are_listed_only_when_configured() {
        let mut d = doc(Health::Healthy);
        assert!(!render(&d, false).contains("Serial lines:"));
        let started_ms = d.gateway.started_ms;
        d.serial = vec![SerialLineInfo {
            line: 0,
            device: "/dev/serial/by-id/usb-FTDI-if00-port0".into(),
            forwarder: true,
            up: false,
            since_ms: started_ms + 12_000,
            reopens: 2,
            frames_in: 5,
            frames_out: 4,
            bytes_in: 60,
            bytes_out: 40,
            write_dropped: 1,
            bad: BTreeMap::from([("truncated".into(), 3), ("bad_crc".into(), 0)]),
        }];
        let text = render(&d, false);
        assert!(
            text.contains(
                "Serial lines:\n  0 /dev/serial/by-id/usb-FTDI-if00-port0 (forwarder)  DOWN \
                 since 3m 0s ago   frames in 5 out 4   write dropped 1   reopens 2   bad: \
                 truncated 3\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn render_shows_the_last_reload_and_its_errors() {
        let mut d = doc(Health::Healthy);
        let now_ms = d.gateway.started_ms + d.gateway.uptime_secs * 1000;
        d.reload = Some(ReloadInfo {
            at_ms: now_ms - 65_000,
            count: 3,
            outcome: "rejected".into(),
            applied: vec![],
            restart_required: vec![],
            errors: vec!["/etc/sensorgate/sensorgate.toml:4:9: `log.level`: bad".into()],
            notes: vec![],
            summary: "reload #3 refused: 1 error(s) in the config, running config kept".into(),
        });
        let text = render(&d, false);
        assert!(
            text.contains(
                "Last reload: rejected 1m 5s ago: reload #3 refused: 1 error(s) in the config, \
                 running config kept\n  - /etc/sensorgate/sensorgate.toml:4:9: `log.level`: bad\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn render_shows_the_fleet_view_when_it_is_on() {
        let mut d = doc(Health::Healthy);
        assert!(!render(&d, false).contains("Fleet:"));
        d.fleet = Some(FleetInfo {
            topic_prefix: "sensorgate/7".into(),
            heartbeat_secs: 60,
            replay: true,
            counts: crate::observe::fleet::FleetCounts {
                heartbeats_sent: 12,
                heartbeats_skipped: 1,
                events_sent: 4,
                replays_served: 2,
                replays_refused: 1,
                ..Default::default()
            },
        });
        let text = render(&d, false);
        assert!(
            text.contains(
                "Fleet: sensorgate/7/state   heartbeats every 1m 0s: 12 sent, 1 skipped   \
                 events 4 sent, 0 rate-limited   replays 2 served, 1 refused\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn render_with_colour_paints_the_verdict() {
        let text = render(&doc(Health::Healthy), true);
        assert!(text.contains("\x1b[32mHEALTHY\x1b[0m"), "{text}");
        assert!(text.contains("\x1b[32mUP\x1b[0m"), "{text}");
    }

    #[test]
    fn exit_codes_follow_the_nagios_convention() {
        assert_eq!(exit_code(&Ok(doc(Health::Healthy))), 0);
        assert_eq!(exit_code(&Ok(doc(Health::Degraded))), 1);
        assert_eq!(exit_code(&Ok(doc(Health::Unhealthy))), 2);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        assert_eq!(exit_code(&Err(StatusError::Unauthorized { addr })), 3);
        assert_eq!(
            exit_code(&Err(StatusError::Timeout {
                addr,
                timeout: STATUS_TIMEOUT
            })),
            3
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(human_secs(45), "45s");
        assert_eq!(human_secs(192), "3m 12s");
        assert_eq!(human_secs(7500), "2h 5m");
        assert_eq!(human_secs(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
    }

    #[test]
    fn unspecified_listen_is_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:9180".parse().unwrap();
        assert_eq!(connect_addr(any), "127.0.0.1:9180".parse().unwrap());
        let any6: SocketAddr = "[::]:9180".parse().unwrap();
        assert_eq!(connect_addr(any6), "[::1]:9180".parse().unwrap());
        let lan: SocketAddr = "192.0.2.1:9180".parse().unwrap();
        assert_eq!(connect_addr(lan), lan);
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let r = fetch_status(addr, None, STATUS_TIMEOUT).await;
        assert!(matches!(r, Err(StatusError::Unreachable { .. })), "{r:?}");
        assert_eq!(exit_code(&r), EXIT_UNREACHABLE);
        let out = status_command(None, None, false, false, STATUS_TIMEOUT).await;
        assert_eq!(out.code, EXIT_UNREACHABLE);
        assert!(out.stderr.contains("admin listener is off"), "{out:?}");
    }

    /// A one-shot server answering `answer` to the first request (after reading its head),
    /// or nothing at all for `None`; it returns the request head it read.
    async fn one_shot(answer: Option<&'static str>) -> (SocketAddr, JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "request ended early");
                head.extend_from_slice(&buf[..n]);
            }
            match answer {
                Some(a) => s.write_all(a.as_bytes()).await.unwrap(),
                // Hold the connection open without answering until the client gives up.
                None => while s.read(&mut buf).await.unwrap_or(0) > 0 {},
            }
            String::from_utf8_lossy(&head).into_owned()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_401_says_the_token_is_wrong_and_the_token_is_sent() {
        let (addr, server) = one_shot(Some(
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n",
        ))
        .await;
        let r = fetch_status(addr, Some("s3cret"), STATUS_TIMEOUT).await;
        let head = server.await.unwrap();
        assert!(matches!(r, Err(StatusError::Unauthorized { .. })), "{r:?}");
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("admin token missing or wrong")
        );
        assert!(head.starts_with("GET /status HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer s3cret\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_silent_listener_times_out_and_bad_json_is_reported() {
        let (addr, _server) = one_shot(None).await;
        let r = fetch_status(addr, None, Duration::from_millis(300)).await;
        assert!(matches!(r, Err(StatusError::Timeout { .. })), "{r:?}");

        let (addr, _server) = one_shot(Some(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        ))
        .await;
        let r = fetch_status(addr, None, STATUS_TIMEOUT).await;
        assert!(matches!(r, Err(StatusError::BadJson { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn a_document_is_parsed_and_json_mode_prints_it_as_received() {
        let body = serde_json::to_string(&doc(Health::Degraded)).unwrap();
        let answer: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (addr, _server) = one_shot(Some(answer)).await;
        let out = status_command(Some(addr), None, true, false, STATUS_TIMEOUT).await;
        assert_eq!(out.code, EXIT_DEGRADED, "{out:?}");
        assert_eq!(out.stdout, format!("{body}\n"));
    }
}
