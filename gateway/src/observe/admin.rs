//! The admin listener: HTTP/1.1 (axum) on `[admin] listen`, loopback by default.
//!
//! ```text
//!  GET /          the field console (one static page, no external resources)
//!  GET /healthz   200 "ok" while the process's loops turn, else 503 naming the stuck one
//!  GET /readyz    200 "ready" / "degraded: ..." while serving, else 503 "not ready: ..."
//!  GET /metrics   Prometheus exposition (OpenMetrics if asked for, else text 0.0.4)
//!  GET /status    the status document (JSON, `observe::status`)
//!  GET /clients   ?prefix=&state=&after=&limit= sessions of every protocol, by ClientId
//! ```
//!
//! Invariants:
//! - With `[admin] token` set, every path but `/` (static, holds no data) and `/healthz`
//!   (what a supervisor probes) wants `Authorization: Bearer <token>`; the comparison takes
//!   the same time wherever the first difference is.
//! - At most `[admin] max_connections` connections are served at once; further ones wait in
//!   the kernel's accept queue. The admin runs on the gateway's runtime but never holds a
//!   lock across an `.await`, and asks the ingresses only through their bounded query
//!   channels with a timeout, so a flood of admin requests slows the admin, not the sensors.
//! - Every answer is computed from one [`Snapshot`](super::snapshot::Snapshot).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use super::metrics::{self, Format};
use super::model::{ClientInfo, ClientQuery, ClientsPage, IngressQuery, SessionState};
use super::process::ProcessStats;
use super::snapshot::{QUERY_TIMEOUT, Snapshot, Sources};
use super::status::{
    FleetInfo, GatewayInfo, Health, ListenerInfo, ProtocolInfo, ReloadInfo, SerialLineInfo,
    SpoolInfo, StatusDoc, UpstreamInfo,
};
use crate::io::tcp::Limited;
use sensorgate_bridges::spool::WhenFull;

/// The most clients one `/clients` page lists.
pub const MAX_PAGE: usize = 1000;

/// The page size when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;

/// An admin connection that neither sends nor takes a byte for this long is closed (a request
/// that never completes included), so idle or stalled clients cannot hold the
/// `max_connections` slots. The console polls every 2 s and keeps its connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The console page.
const CONSOLE: &str = include_str!("console.html");

/// The admin listener's settings.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// The bearer token, if any.
    pub token: Option<String>,
    /// Connections served at once.
    pub max_connections: usize,
}

struct Admin {
    sources: Sources,
    token: Option<String>,
}

/// Binds the admin listener (before anything is served, so a bind error stops the start).
///
/// # Errors
/// The bind error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the admin endpoints on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    sources: Sources,
    options: AdminOptions,
    stop: CancellationToken,
) {
    let admin = Arc::new(Admin {
        sources,
        token: options.token,
    });
    let app = router(Arc::clone(&admin));
    let listener = Limited::new(
        listener,
        Arc::new(Semaphore::new(options.max_connections.max(1))),
        IDLE_TIMEOUT,
        "admin",
    );
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(error) = result {
        tracing::warn!(%error, "Admin listener stopped.");
    }
}

fn router(admin: Arc<Admin>) -> Router {
    let protected = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/status", get(status))
        .route("/clients", get(clients))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&admin),
            authorize,
        ));
    Router::new()
        .route("/", get(console))
        .route("/healthz", get(healthz))
        .merge(protected)
        .fallback(not_found)
        .with_state(admin)
}

/// A JSON error body: `{"error": "...", "reason": "..."}`.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    reason: String,
}

fn error(status: StatusCode, error: &'static str, reason: String) -> Response {
    (status, axum::Json(ErrorBody { error, reason })).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such path; see / for the console, /status, /clients, /metrics, /healthz, /readyz"
            .into(),
    )
}

async fn authorize(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    let Some(token) = admin.token.as_deref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if same(given.trim().as_bytes(), token.as_bytes()) => next.run(request).await,
        _ => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send `Authorization: Bearer <[admin] token>`".into(),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sensorgate\""),
            );
            response
        }
    }
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn console() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // The page loads nothing from elsewhere and talks only to this listener; no other
            // site may frame it (clickjacking) or have its scripts run in it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                 base-uri 'none'; form-action 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        CONSOLE,
    )
        .into_response()
}

async fn healthz(State(admin): State<Arc<Admin>>) -> Response {
    let health = admin.sources.gather().await.health();
    if health.live {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: {}\n", health.reasons.join("; ")),
        )
            .into_response()
    }
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let health = admin.sources.gather().await.health();
    match health.state {
        Health::Healthy => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Health::Degraded => (
            StatusCode::OK,
            format!("degraded: {}\n", health.reasons.join("; ")),
        )
            .into_response(),
        Health::Unhealthy => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", health.reasons.join("; ")),
        )
            .into_response(),
    }
}

async fn metrics_handler(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let snapshot = admin.sources.gather().await;
    let process = ProcessStats::read();
    match metrics::render(snapshot, process, format) {
        Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding",
            "the metrics could not be encoded".into(),
        ),
    }
}

async fn status(State(admin): State<Arc<Admin>>) -> Response {
    let snapshot = admin.sources.gather().await;
    axum::Json(status_doc(&admin.sources, &snapshot)).into_response()
}

/// The status document from a snapshot.
#[must_use]
pub fn status_doc(sources: &Sources, s: &Snapshot) -> StatusDoc {
    let health = s.health();
    let protocols = s
        .ingresses
        .iter()
        .map(|i| {
            let report = i.report.as_ref();
            let sessions: BTreeMap<String, u64> = SessionState::ALL
                .into_iter()
                .map(|st| {
                    (
                        st.as_str().to_owned(),
                        report.map_or(0, |r| r.sessions.get(st)),
                    )
                })
                .collect();
            ProtocolInfo {
                protocol: i.protocol.to_owned(),
                sessions_total: report.map_or(0, |r| r.sessions.total()),
                sessions,
                messages_in: report.map_or(0, |r| r.counters.messages_in_total()),
                refused: report.map_or(0, |r| r.counters.refusals.iter().sum()),
                downlink_delivered: report.map_or(0, |r| r.counters.downlink_delivered),
                security: i
                    .events
                    .iter()
                    .filter(|(name, _)| {
                        crate::security::Denial::ALL
                            .iter()
                            .any(|d| d.as_str() == *name)
                    })
                    .map(|&(name, n)| (name.to_owned(), n))
                    .collect(),
            }
        })
        .collect();
    let upstreams = s
        .upstreams
        .iter()
        .map(|u| UpstreamInfo {
            name: u.name.clone(),
            kind: u.kind.to_owned(),
            url: u.url.clone(),
            connected: u.link.connected,
            since_ms: u.link.since_ms,
            last_error: u.link.last_error.clone(),
            reconnects: u.link.connects.saturating_sub(1),
            forwarded: u.forwarded,
            in_flight: u.in_flight,
            backlog: u.backlog,
        })
        .collect();
    let st = &s.spool.stats;
    StatusDoc {
        gateway: GatewayInfo {
            id: sources.gateway_id,
            name: sources.gateway_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms: sources.started_ms,
            uptime_secs: s.uptime.as_secs(),
            config: sources.config_file.clone(),
        },
        health,
        listeners: sources
            .listeners
            .iter()
            .map(|l| ListenerInfo {
                protocol: l.protocol.to_owned(),
                transport: l.transport.to_owned(),
                address: l.address.to_string(),
            })
            .chain(sources.serial.iter().map(|l| ListenerInfo {
                protocol: crate::mqttsn::core::PROTOCOL.to_owned(),
                transport: "serial".to_owned(),
                address: l.device.clone(),
            }))
            .collect(),
        serial: (0u16..)
            .zip(&s.serial)
            .map(|(line, l)| {
                let c = &l.counters;
                SerialLineInfo {
                    line,
                    device: l.device.clone(),
                    forwarder: l.forwarder,
                    up: c.up,
                    since_ms: c.since_ms,
                    reopens: c.reopens,
                    frames_in: c.frames_in,
                    frames_out: c.frames_out,
                    bytes_in: c.bytes_in,
                    bytes_out: c.bytes_out,
                    write_dropped: c.write_dropped,
                    bad: [
                        ("bad_crc", c.bad_crc),
                        ("oversize", c.oversize),
                        ("truncated", c.truncated),
                        ("encapsulated", c.encapsulated_dropped),
                        ("garbage_bytes", c.garbage_bytes),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
                }
            })
            .collect(),
        protocols,
        upstreams,
        spool: SpoolInfo {
            dir: s.spool.dir.clone(),
            bytes: st.bytes,
            max_bytes: s.spool.max_bytes,
            segments: st.segments,
            records: s.spool.records,
            appended: st.appended,
            when_full: match s.spool.when_full {
                WhenFull::RejectNew => "reject_new",
                WhenFull::DropOldest => "drop_oldest",
            }
            .to_owned(),
            full: s.spool.refusing,
            dropped: [
                ("drop_oldest", st.dropped_oldest),
                ("expired", st.expired),
                ("corrupt", st.corrupt),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            disk_errors: st.write_errors + st.sync_errors,
        },
        events: sources.events.list(),
        reload: s.reload.as_ref().map(ReloadInfo::from),
        fleet: sources.fleet_settings.as_ref().map(|f| FleetInfo {
            topic_prefix: f.topic_prefix.clone(),
            heartbeat_secs: f.heartbeat_secs,
            replay: f.replay,
            counts: s.fleet,
        }),
    }
}

/// `/clients` query parameters.
#[derive(Debug, Deserialize)]
struct ClientsParams {
    prefix: Option<String>,
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// `/clients` answer.
#[derive(Debug, Serialize)]
struct ClientsBody {
    clients: Vec<ClientInfo>,
    /// The last ClientId of this page when more follow (pass it as `after`), else null.
    next: Option<String>,
}

async fn clients(
    State(admin): State<Arc<Admin>>,
    params: Result<Query<ClientsParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "expected prefix=, state=, after=, limit= (a number)".into(),
        );
    };
    let state = match params.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(name) => match SessionState::parse(name) {
            Some(s) => Some(s),
            None => {
                let names: Vec<&str> = SessionState::ALL.iter().map(|s| s.as_str()).collect();
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_state",
                    format!("state must be one of {}", names.join(", ")),
                );
            }
        },
    };
    let limit = params.limit.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
    let query = ClientQuery {
        prefix: params.prefix.filter(|p| !p.is_empty()),
        state,
        after: params.after.filter(|a| !a.is_empty()),
        limit,
    };
    let pages = futures_util::future::join_all(admin.sources.ingresses.iter().map(|i| async {
        let ask = async {
            let (tx, rx) = oneshot::channel();
            i.queries
                .send(IngressQuery::Clients(query.clone(), tx))
                .await
                .ok()?;
            rx.await.ok()
        };
        (
            i.protocol,
            tokio::time::timeout(QUERY_TIMEOUT, ask)
                .await
                .ok()
                .flatten(),
        )
    }))
    .await;
    let mut all: Vec<ClientInfo> = Vec::new();
    let mut more = false;
    for (protocol, page) in pages {
        let Some(ClientsPage { clients, more: m }) = page else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "stalled",
                format!(
                    "the {protocol} driver did not answer within {}s",
                    QUERY_TIMEOUT.as_secs()
                ),
            );
        };
        more |= m;
        all.extend(clients);
    }
    all.sort_by(|a, b| (a.client_id.as_str(), a.protocol).cmp(&(b.client_id.as_str(), b.protocol)));
    if all.len() > limit {
        all.truncate(limit);
        more = true;
    }
    let next = if more {
        all.last().map(|c| c.client_id.clone())
    } else {
        None
    };
    axum::Json(ClientsBody { clients: all, next }).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_equal_only_when_identical() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!same(b"", b"x"));
    }
}
