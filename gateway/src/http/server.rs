//! The HTTP ingress's server adapter: listeners, connection bounds, TLS, HTTP/1.1 and HTTP/2
//! (hyper-util's auto builder), [`ConnInfo`] for the handlers, and the graceful stop.
//!
//! ```text
//!  accept loop (one per listener)            connection task (one per connection)
//!  permit  <- Semaphore(max_connections)     Permitted (idle_timeout, holds the permit)
//!  accept  (errors: debug, pause)            [TLS handshake <= tls_handshake_timeout]
//!  per-IP count > max_connections_per_ip     ConnInfo { peer, tls, cert_device }
//!     -> closed at once, counted             first request <= header_timeout
//!  set_nodelay, spawn                        hyper auto (h1 | h2) -> axum Router
//! ```
//!
//! Invariants:
//! - At most `max_connections` connections are open at once, over every listener: the permit
//!   is taken BEFORE `accept`, so further clients wait in the kernel's accept queue, and a
//!   connection gives it back when it is dropped, however it ends.
//! - At most `max_connections_per_ip` connections per peer address; one more is accepted and
//!   closed at once (counted in [`ConnStats::per_ip_refused`]). The per-IP table holds only
//!   addresses with an open connection (at most `max_connections` entries).
//! - Every connection is bounded in time: no byte either way for `idle_timeout` closes it
//!   (h2, stalled SSE readers included); the TLS handshake gets `tls_handshake_timeout`; the
//!   first request must arrive within `header_timeout` (a silent connection, h2c included),
//!   and each HTTP/1.1 head after that too (hyper's `header_read_timeout`, which therefore
//!   is also the HTTP/1.1 keep-alive idle limit).
//! - Sizes: an HTTP/1.1 head is bounded by `max_header_size` (hyper's read buffer; hyper
//!   answers 431) and `max_headers`; an h2 header list by `max_header_size`; h2 streams per
//!   connection by `h2_max_streams`; hyper's h2 buffers by [`H2_CONN_WINDOW`],
//!   [`H2_STREAM_WINDOW`] and [`H2_SEND_BUF`].
//! - The TLS handshake and all HTTP work run in the connection's task, never in the accept
//!   loop, so a slow client cannot stall accepting.
//! - Stop: the accept loops end and the listeners close (new connections are refused), every
//!   connection is asked to finish (HTTP/1.1: after the request in flight; h2: GOAWAY), for at
//!   most [`HTTP_GRACE`]; whatever is left is then dropped, and [`serve`] returns only once
//!   every connection task has ended.
//! - Peer-triggered logs are at debug, except the per-IP cap and TLS handshake failures:
//!   warn, at most one per [`PEER_LOG_INTERVAL`] per kind, with the number suppressed since.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::reload::{Live, Settings};
use super::tls;
use crate::io::tcp::{ACCEPT_ERROR_PAUSE, IdleFlag, Permitted};

use crate::config::HttpSection;

/// How long [`serve`] lets connections finish after `stop` before dropping them (below the
/// application's shutdown grace, so the spool writer is never waited on by an HTTP appender).
pub const HTTP_GRACE: Duration = Duration::from_secs(4);

/// HTTP/2 connection-level receive window. hyper's default (1 MiB per connection and per
/// stream) would let `max_connections` connections hold about a GiB of request bodies in
/// hyper's buffers, outside `body_memory`.
pub const H2_CONN_WINDOW: u32 = 256 * 1024;

/// HTTP/2 per-stream receive window (a single body is at most 256 KiB; a larger batch is
/// read in window-sized steps).
pub const H2_STREAM_WINDOW: u32 = 64 * 1024;

/// HTTP/2 send buffer per stream (hyper's default is about 400 KB); an SSE stream whose
/// reader is slow waits for the window instead of buffering more.
pub const H2_SEND_BUF: usize = 64 * 1024;

/// The kernel's accept queue per listener (what waits beyond `max_connections`).
pub const LISTEN_BACKLOG: i32 = 1024;

/// At most one warning per kind of peer-triggered event in this interval.
pub const PEER_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// hyper's smallest HTTP/1.1 read buffer (`max_buf_size` panics below it); the config's
/// `max_header_size` floor is the same, this only keeps a bad value from panicking.
const MIN_H1_BUF: usize = 8 * 1024;

/// The bound listeners: plain HTTP/1.1 + h2c, and HTTPS.
#[derive(Debug)]
pub struct Bound {
    /// `[http] listen`.
    pub plain: Vec<std::net::TcpListener>,
    /// `[http] tls_listen`.
    pub tls: Vec<std::net::TcpListener>,
}

/// Binds every `listen` and `tls_listen` address: non-blocking std listeners (so they can
/// be moved to another thread's runtime), `SO_REUSEADDR`, IPv6 sockets v6-only (so
/// `0.0.0.0:P` and `[::]:P` can both be listed).
///
/// # Errors
/// The key (`"[http] listen"` / `"[http] tls_listen"`), the address and the OS error.
pub fn bind(section: &HttpSection) -> Result<Bound, (&'static str, SocketAddr, std::io::Error)> {
    let each = |key: &'static str, addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|&addr| bind_one(addr).map_err(|error| (key, addr, error)))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Bound {
        plain: each("[http] listen", &section.listen)?,
        tls: each("[http] tls_listen", &section.tls_listen)?,
    })
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // A restart can bind while the previous process's connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// What a handler knows about its connection: inserted into every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the connection is HTTPS.
    pub tls: bool,
    /// The device name of the verified client certificate ([`tls::device_name`] of the
    /// first peer certificate), taken once per connection.
    pub cert_device: Option<Arc<str>>,
}

/// Connection-level counters (relaxed atomics).
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections accepted and served (per-IP refusals not included).
    pub connections_opened: AtomicU64,
    /// Connections open now (a gauge).
    pub connections_open: AtomicU64,
    /// Connections closed at once for `max_connections_per_ip`.
    pub per_ip_refused: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failed: AtomicU64,
    /// Connections closed because a request head did not arrive within `header_timeout`
    /// (a silent or trickling client, or an HTTP/1.1 keep-alive connection left unused).
    pub header_timeouts: AtomicU64,
    /// Connections closed after a request head over `max_header_size` / `max_headers`
    /// (hyper answered 431).
    pub heads_too_large: AtomicU64,
    /// Connections closed after `idle_timeout` without a byte moved.
    pub idle_closed: AtomicU64,
}

impl ConnStats {
    /// Every counter by name, for the ingress's extra counters
    /// (`sensorgate_ingress_events_total`); the `connections_open` gauge is not among them
    /// (read it directly).
    #[must_use]
    pub fn events(&self) -> [(&'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("connections_opened", get(&self.connections_opened)),
            ("per_ip_refused", get(&self.per_ip_refused)),
            ("tls_handshake_failed", get(&self.tls_handshake_failed)),
            ("header_timeouts", get(&self.header_timeouts)),
            ("heads_too_large", get(&self.heads_too_large)),
            ("idle_closed", get(&self.idle_closed)),
        ]
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Lets one warning through per interval and counts the ones held back (time passed in).
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter letting one warning through per `interval`.
    pub(crate) const fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, `n` occurrences were held back since the last warning; `None`:
    /// hold this one back (counted).
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < self.interval)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The warning limiters of the peer-triggered events this adapter logs.
#[derive(Debug)]
struct PeerLogs {
    per_ip: LogLimiter,
    tls: LogLimiter,
}

/// What every accept loop and connection task shares.
struct Shared {
    app: Router,
    /// The settings in force (section and hyper builder; a reload swaps them, each connection
    /// takes those of its accept) and the `max_connections` permits over every listener.
    live: Arc<Live>,
    stats: Arc<ConnStats>,
    tls: Option<TlsAcceptor>,
    /// Open connections per peer address; an entry is removed at zero.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    logs: Mutex<PeerLogs>,
    /// Every connection task, so `serve` returns only once they all ended.
    tracker: TaskTracker,
    /// Cancelled when `stop` fires: connections still in their TLS handshake give up.
    stop: CancellationToken,
    /// Cancelled after [`HTTP_GRACE`]: every connection left is dropped.
    kill: CancellationToken,
}

impl Shared {
    /// Logs a peer-triggered event at warn if its limiter lets it through (with the number
    /// held back since the last warning), else at debug.
    #[allow(clippy::disallowed_methods)] // The adapter reads the clock for its log limiter.
    fn warn_limited(
        &self,
        pick: fn(&mut PeerLogs) -> &mut LogLimiter,
        peer: SocketAddr,
        detail: &dyn std::fmt::Display,
        what: &str,
    ) {
        let allowed = {
            let mut logs = self
                .logs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pick(&mut logs).allow(Instant::now())
        };
        match allowed {
            Some(suppressed) => tracing::warn!(%peer, %detail, suppressed, "{what}"),
            None => tracing::debug!(%peer, %detail, "{what}"),
        }
    }
}

/// One peer address's slot in the per-IP table, given back on drop.
struct IpSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl IpSlot {
    /// A slot for `ip`, or `None` when it has `max_connections_per_ip` already.
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<IpSlot> {
        let mut table = shared
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = table.entry(ip).or_insert(0);
        if *count >= shared.live.settings().section.max_connections_per_ip {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            shared: Arc::clone(shared),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut table = self
            .shared
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = table.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                table.remove(&self.ip);
            }
        }
    }
}

/// Counts a connection open for its life.
struct OpenGuard(Arc<ConnStats>);

impl OpenGuard {
    fn new(stats: &Arc<ConnStats>) -> Self {
        bump(&stats.connections_opened);
        bump(&stats.connections_open);
        OpenGuard(Arc::clone(stats))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// hyper-util's auto builder with every limit of `section`.
pub(crate) fn builder(section: &HttpSection) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(section.header_timeout)
        .max_buf_size(section.max_header_size.max(MIN_H1_BUF))
        .max_headers(section.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(section.h2_max_streams)
        .max_header_list_size(u32::try_from(section.max_header_size).unwrap_or(u32::MAX))
        .initial_connection_window_size(H2_CONN_WINDOW)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .max_send_buf_size(H2_SEND_BUF);
    if section.http2 {
        builder
    } else {
        builder.http1_only()
    }
}

/// Serves `app` on every listener of `bound` until `stop`; then stops accepting, lets the
/// connections finish (HTTP/1.1: the request in flight; h2: GOAWAY) for at most
/// [`HTTP_GRACE`], drops the rest, and returns once every connection task has ended.
/// [`ConnInfo`] is in every request's extensions. Must be called on a tokio runtime (any
/// flavour); connection tasks are spawned on it.
///
/// # Errors
/// A listener that cannot be registered with the runtime, or TLS listeners without `tls`
/// (`InvalidInput`); nothing is served then.
pub async fn serve(
    bound: Bound,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    section: Arc<HttpSection>,
    stats: Arc<ConnStats>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    // The router `app` authenticates with its own settings: no JWT keys are needed here.
    serve_live(bound, tls, app, Live::new(&section, None), stats, stop).await
}

/// [`serve`] with the settings of `live`, which a reload may change while it runs
/// ([`super::reload`]): connections accepted after a reload get the new settings.
pub(crate) async fn serve_live(
    bound: Bound,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    live: Arc<Live>,
    stats: Arc<ConnStats>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    if !bound.tls.is_empty() && tls.is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "TLS listeners without a TLS configuration",
        ));
    }
    let mut listeners = Vec::new();
    for (listener, is_tls) in bound
        .plain
        .into_iter()
        .map(|l| (l, false))
        .chain(bound.tls.into_iter().map(|l| (l, true)))
    {
        listeners.push((TcpListener::from_std(listener)?, is_tls));
    }
    live.serving(&stats);
    let shared = Arc::new(Shared {
        app,
        live,
        stats,
        tls: tls.map(TlsAcceptor::from),
        per_ip: Mutex::new(HashMap::new()),
        logs: Mutex::new(PeerLogs {
            per_ip: LogLimiter::new(PEER_LOG_INTERVAL),
            tls: LogLimiter::new(PEER_LOG_INTERVAL),
        }),
        tracker: TaskTracker::new(),
        stop: stop.clone(),
        kill: CancellationToken::new(),
    });
    let graceful = GracefulShutdown::new();
    futures_util::future::join_all(
        listeners
            .into_iter()
            .map(|(listener, is_tls)| accept_loop(listener, is_tls, &shared, &graceful)),
    )
    .await;
    // With no listener at all the loops end at once; serving still lasts until `stop`.
    stop.cancelled().await;
    // The listeners are closed now: new connections are refused.
    let open = graceful.count();
    if tokio::time::timeout(HTTP_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = open,
            grace_secs = HTTP_GRACE.as_secs(),
            "HTTP connections still open after the grace period; dropping them."
        );
    }
    shared.kill.cancel();
    shared.tracker.close();
    shared.tracker.wait().await;
    Ok(())
}

/// Accepts on `listener` until `stop`, spawning a connection task per accepted stream.
async fn accept_loop(
    listener: TcpListener,
    is_tls: bool,
    shared: &Arc<Shared>,
    graceful: &GracefulShutdown,
) {
    loop {
        // Before `accept`: beyond `max_connections`, clients wait in the accept queue.
        let Some(mut permit) = take_permit(shared).await else {
            return;
        };
        let (stream, peer) = loop {
            tokio::select! {
                biased;
                () = shared.stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => break accepted,
                    // Out of descriptors and the like: wait a little instead of spinning.
                    Err(error) => {
                        tracing::debug!(%error, "HTTP accept failed.");
                        tokio::select! {
                            () = shared.stop.cancelled() => return,
                            () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                        }
                    }
                },
            }
        };
        // `max_connections` was lowered (a reload) while this permit waited for the accept:
        // it retires, and the connection waits for a permit under the new bound.
        if permit.is_some() && shared.live.retire_permit() {
            if let Some(retired) = permit.take() {
                retired.forget();
            }
            let Some(next) = take_permit(shared).await else {
                return;
            };
            permit = next;
        }
        let Some(slot) = IpSlot::take(shared, peer.ip()) else {
            bump(&shared.stats.per_ip_refused);
            shared.warn_limited(
                |logs| &mut logs.per_ip,
                peer,
                &format_args!(
                    "{} open",
                    shared.live.settings().section.max_connections_per_ip
                ),
                "HTTP connection refused: this address has [http] max_connections_per_ip open.",
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let task = connection(
            Arc::clone(shared),
            stream,
            peer,
            is_tls,
            permit,
            slot,
            watcher,
        );
        shared.tracker.spawn(task);
    }
}

/// A `max_connections` permit, waited for; permits that must retire because the bound was
/// lowered (a reload) are forgotten on the way. `None`: `stop` fired. The inner `None`: the
/// semaphore was closed (it never is; serving one more is harmless).
async fn take_permit(shared: &Shared) -> Option<Option<OwnedSemaphorePermit>> {
    loop {
        let permit = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return None,
            permit = Arc::clone(&shared.live.connections).acquire_owned() => permit.ok(),
        };
        match permit {
            Some(permit) if shared.live.retire_permit() => permit.forget(),
            permit => return Some(permit),
        }
    }
}

/// One connection's life: idle wrapper, TLS handshake, HTTP; dropped when `kill` fires.
async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    is_tls: bool,
    permit: Option<OwnedSemaphorePermit>,
    slot: IpSlot,
    watcher: Watcher,
) {
    let _open = OpenGuard::new(&shared.stats);
    let _slot = slot;
    // The settings in force when it was accepted, for the connection's whole life.
    let settings = shared.live.settings();
    let io = Permitted::new(stream, permit, settings.section.idle_timeout);
    let idle = io.idle_flag();
    let kill = shared.kill.clone();
    let work = async {
        let Some(acceptor) = shared.tls.as_ref().filter(|_| is_tls) else {
            let info = ConnInfo {
                peer,
                tls: false,
                cert_device: None,
            };
            return serve_http(&shared, &settings, TokioIo::new(io), info, watcher, &idle).await;
        };
        let handshake = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            h = tokio::time::timeout(settings.section.tls_handshake_timeout, acceptor.accept(io)) => h,
        };
        let stream = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                bump(&shared.stats.tls_handshake_failed);
                shared.warn_limited(|logs| &mut logs.tls, peer, &error, "TLS handshake failed.");
                return;
            }
            Err(_) => {
                bump(&shared.stats.tls_handshake_failed);
                shared.warn_limited(
                    |logs| &mut logs.tls,
                    peer,
                    &"timed out",
                    "TLS handshake not done within [http] tls_handshake_timeout.",
                );
                return;
            }
        };
        let cert_device = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| tls::device_name(cert));
        let info = ConnInfo {
            peer,
            tls: true,
            cert_device,
        };
        serve_http(
            &shared,
            &settings,
            TokioIo::new(stream),
            info,
            watcher,
            &idle,
        )
        .await;
    };
    tokio::select! {
        biased;
        () = kill.cancelled() => tracing::debug!(%peer, "HTTP connection dropped at the end of the grace period."),
        () = work => {}
    }
}

/// Serves HTTP on `io` under the graceful-shutdown `watcher` and classifies how it ended.
async fn serve_http<I>(
    shared: &Shared,
    settings: &Settings,
    io: I,
    info: ConnInfo,
    watcher: Watcher,
    idle: &IdleFlag,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = info.peer;
    let first = Arc::new(Notify::new());
    let service = WithConn {
        app: shared.app.clone(),
        info,
        first: Arc::clone(&first),
    };
    let conn = watcher.watch(settings.builder.serve_connection(io, service));
    tokio::pin!(conn);
    // hyper's header timeout starts only once hyper-util knows the protocol (after the first
    // bytes), and h2 has none: the first request is bounded here.
    let result = tokio::select! {
        result = &mut conn => result,
        seen = tokio::time::timeout(settings.section.header_timeout, first.notified()) => {
            if seen.is_err() {
                bump(&shared.stats.header_timeouts);
                tracing::debug!(%peer, "HTTP connection closed: no request within [http] header_timeout.");
                return;
            }
            conn.await
        }
    };
    // hyper takes an I/O error between HTTP/1.1 requests for a clean close: the flag tells.
    if idle.raised() {
        bump(&shared.stats.idle_closed);
        tracing::debug!(%peer, "HTTP connection closed: idle ([http] idle_timeout).");
        return;
    }
    let Err(error) = result else {
        return;
    };
    let hyper_error = error.downcast_ref::<hyper::Error>();
    if hyper_error.is_some_and(hyper::Error::is_timeout) {
        bump(&shared.stats.header_timeouts);
        tracing::debug!(%peer, "HTTP connection closed: request head not complete within [http] header_timeout.");
    } else if hyper_error.is_some_and(hyper::Error::is_parse_too_large) {
        bump(&shared.stats.heads_too_large);
        tracing::debug!(%peer, "HTTP connection closed: request head too large (431).");
    } else {
        tracing::debug!(%peer, %error, "HTTP connection ended with an error.");
    }
}

/// The per-connection service: puts [`ConnInfo`] into each request and calls the Router.
#[derive(Clone)]
struct WithConn {
    app: Router,
    info: ConnInfo,
    /// Told of every request (the first one ends the first-request deadline).
    first: Arc<Notify>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for WithConn {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = axum::routing::future::RouteFuture<Infallible>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        self.first.notify_one();
        let mut request: Request = request.map(axum::body::Body::new);
        request.extensions_mut().insert(self.info.clone());
        let mut app = self.app.clone();
        // The Router is always ready (axum's own `serve` calls it the same way).
        tower_service::Service::call(&mut app, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientCertMode, TlsFiles};

    use axum::Extension;
    use axum::routing::get;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::http::tls::test_pki;

    /// A generous bound for conditions that hold within milliseconds.
    const BOUND: Duration = Duration::from_secs(20);

    struct Running {
        plain: Option<SocketAddr>,
        tls: Option<SocketAddr>,
        stats: Arc<ConnStats>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    fn section(plain: bool, tls: bool) -> HttpSection {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        HttpSection {
            listen: if plain { vec![loopback] } else { vec![] },
            tls_listen: if tls { vec![loopback] } else { vec![] },
            ..HttpSection::default()
        }
    }

    async fn who(Extension(info): Extension<ConnInfo>) -> String {
        format!("tls={} device={:?}", info.tls, info.cert_device.as_deref())
    }

    fn app() -> Router {
        Router::new().route("/who", get(who))
    }

    fn start(section: HttpSection, tls: Option<Arc<rustls::ServerConfig>>, app: Router) -> Running {
        let bound = bind(&section).unwrap();
        let plain = bound.plain.first().map(|l| l.local_addr().unwrap());
        let tls_addr = bound.tls.first().map(|l| l.local_addr().unwrap());
        let stats = Arc::new(ConnStats::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            bound,
            tls,
            app,
            Arc::new(section),
            Arc::clone(&stats),
            stop.clone(),
        ));
        Running {
            plain,
            tls: tls_addr,
            stats,
            stop,
            task,
        }
    }

    impl Running {
        async fn stop(self) {
            self.stop.cancel();
            tokio::time::timeout(BOUND, self.task)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    fn get_counter(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `cond` holds.
    async fn wait_for(mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(BOUND, async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition within the bound");
    }

    /// One request with `Connection: close` on a raw socket; the whole answer.
    async fn raw_request(stream: &mut TcpStream, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(BOUND, stream.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(answer).unwrap()
    }

    /// Whether the server closed `stream` (EOF or reset), waiting at most [`BOUND`].
    async fn closed_by_server(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(BOUND, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

    async fn h1_client(addr: SocketAddr) -> H1 {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    fn request(path: &str) -> hyper::Request<Empty<Bytes>> {
        hyper::Request::get(format!("http://127.0.0.1{path}"))
            .body(Empty::new())
            .unwrap()
    }

    async fn h1_get(sender: &mut H1, path: &str) -> (hyper::StatusCode, String) {
        let response = sender.send_request(request(path)).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn http1_requests_are_served_with_the_connection_info() {
        let server = start(section(true, false), None, app());
        let mut stream = TcpStream::connect(server.plain.unwrap()).await.unwrap();
        let answer = raw_request(&mut stream, "/who").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("tls=false device=None"), "{answer}");
        // Keep-alive: two requests on one connection.
        let mut client = h1_client(server.plain.unwrap()).await;
        for _ in 0..2 {
            let (status, body) = h1_get(&mut client, "/who").await;
            assert_eq!(status, 200);
            assert_eq!(body, "tls=false device=None");
        }
        assert_eq!(get_counter(&server.stats.connections_opened), 2);
        drop(client);
        server.stop().await;
    }

    #[tokio::test]
    async fn h2c_with_prior_knowledge_is_served() {
        let server = start(section(true, false), None, app());
        let stream = TcpStream::connect(server.plain.unwrap()).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let response = sender.send_request(request("/who")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"tls=false device=None");
        drop(sender);
        server.stop().await;
    }

    #[tokio::test]
    async fn with_http2_off_the_h2c_preface_is_not_served_but_http1_is() {
        let server = start(
            HttpSection {
                http2: false,
                ..section(true, false)
            },
            None,
            app(),
        );
        let stream = TcpStream::connect(server.plain.unwrap()).await.unwrap();
        let refused = async {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .ok()?;
            tokio::spawn(conn);
            sender.send_request(request("/who")).await.ok()
        };
        let answer = tokio::time::timeout(BOUND, refused).await.unwrap();
        assert!(answer.is_none(), "h2c served: {answer:?}");
        let mut client = h1_client(server.plain.unwrap()).await;
        assert_eq!(h1_get(&mut client, "/who").await.0, 200);
        drop(client);
        server.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_header_timeout() {
        let server = start(section(true, false), None, app());
        let mut stream = TcpStream::connect(server.plain.unwrap()).await.unwrap();
        // Time is paused: it jumps to the header timeout (10 s) when nothing else happens,
        // well before the idle timeout (60 s).
        assert!(closed_by_server(&mut stream).await);
        assert_eq!(get_counter(&server.stats.header_timeouts), 1);
        assert_eq!(get_counter(&server.stats.idle_closed), 0);
        server.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_left_incomplete_is_closed_after_the_header_timeout() {
        let server = start(section(true, false), None, app());
        let mut stream = TcpStream::connect(server.plain.unwrap()).await.unwrap();
        stream
            .write_all(b"GET /who HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        assert!(closed_by_server(&mut stream).await);
        assert_eq!(get_counter(&server.stats.header_timeouts), 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_head_over_max_header_size_gets_431() {
        let server = start(
            HttpSection {
                max_header_size: 8 * 1024,
                ..section(true, false)
            },
            None,
            app(),
        );
        let mut stream = TcpStream::connect(server.plain.unwrap()).await.unwrap();
        let big = "a".repeat(16 * 1024);
        let request = format!("GET /who HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(BOUND, stream.read_to_end(&mut answer))
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        wait_for(|| get_counter(&server.stats.heads_too_large) == 1).await;
        server.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_and_gives_its_permit_back() {
        let server = start(
            HttpSection {
                max_connections: 1,
                header_timeout: Duration::from_secs(300),
                idle_timeout: Duration::from_secs(5),
                ..section(true, false)
            },
            None,
            app(),
        );
        let addr = server.plain.unwrap();
        let mut first = h1_client(addr).await;
        assert_eq!(h1_get(&mut first, "/who").await.0, 200);
        // The only permit is held by the idle keep-alive connection: this one is answered
        // once the first is closed for idleness (paused time jumps there).
        let mut second = TcpStream::connect(addr).await.unwrap();
        let answer = raw_request(&mut second, "/who").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(
            get_counter(&server.stats.idle_closed),
            1,
            "{:?}",
            server.stats.events()
        );
        assert_eq!(get_counter(&server.stats.connections_opened), 2);
        drop(first);
        server.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_h2_connection_is_closed_after_the_idle_timeout() {
        let server = start(section(true, false), None, app());
        let stream = TcpStream::connect(server.plain.unwrap()).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        assert_eq!(
            sender.send_request(request("/who")).await.unwrap().status(),
            200
        );
        // h2 has no head timeout after the first request: the idle wrapper ends it (paused
        // time jumps to the idle timeout).
        let _ = tokio::time::timeout(BOUND * 10, conn).await.unwrap();
        wait_for(|| get_counter(&server.stats.idle_closed) == 1).await;
        assert_eq!(get_counter(&server.stats.header_timeouts), 0);
        drop(sender);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_connection_beyond_max_connections_waits_until_one_closes() {
        let server = start(
            HttpSection {
                max_connections: 2,
                ..section(true, false)
            },
            None,
            app(),
        );
        let addr = server.plain.unwrap();
        let mut a = h1_client(addr).await;
        let mut b = h1_client(addr).await;
        assert_eq!(h1_get(&mut a, "/who").await.0, 200);
        assert_eq!(h1_get(&mut b, "/who").await.0, 200);
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /who HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        // A round trip on `b` after `c`'s request: `c` was not taken meanwhile.
        assert_eq!(h1_get(&mut b, "/who").await.0, 200);
        assert_eq!(get_counter(&server.stats.connections_opened), 2);
        let mut buf = [0u8; 16];
        assert_eq!(
            c.try_read(&mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        drop(a);
        let mut answer = Vec::new();
        tokio::time::timeout(BOUND, c.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        assert_eq!(get_counter(&server.stats.connections_opened), 3);
        drop(b);
        server.stop().await;
    }

    #[tokio::test]
    async fn one_address_gets_at_most_max_connections_per_ip() {
        let server = start(
            HttpSection {
                max_connections_per_ip: 1,
                ..section(true, false)
            },
            None,
            app(),
        );
        let addr = server.plain.unwrap();
        let mut a = h1_client(addr).await;
        assert_eq!(h1_get(&mut a, "/who").await.0, 200);
        let mut b = TcpStream::connect(addr).await.unwrap();
        assert!(closed_by_server(&mut b).await);
        assert_eq!(get_counter(&server.stats.per_ip_refused), 1);
        assert_eq!(get_counter(&server.stats.connections_opened), 1);
        // Its slot comes back when it closes.
        drop(a);
        wait_for(|| get_counter(&server.stats.connections_open) == 0).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(
            raw_request(&mut c, "/who")
                .await
                .starts_with("HTTP/1.1 200")
        );
        server.stop().await;
    }

    fn client_tls(
        pki: &test_pki::Pki,
        cert: Option<(&std::path::Path, &std::path::Path)>,
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&pki.ca).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match cert {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_file(cert).unwrap()],
                    PrivateKeyDer::from_pem_file(key).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    fn tls_server(pki: &test_pki::Pki, mode: ClientCertMode) -> Running {
        let files = TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca.clone()),
            client_cert: mode,
        };
        let config = tls::server_config(&files, true).unwrap();
        start(section(false, true), Some(config), app())
    }

    /// A TLS connection to `addr` and one h2 request to `/who` on it (errors as `None`).
    async fn tls_who(
        connector: &tokio_rustls::TlsConnector,
        addr: SocketAddr,
    ) -> Option<(Vec<u8>, String)> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
        let stream = connector.connect(name, tcp).await.ok()?;
        let alpn = stream
            .get_ref()
            .1
            .alpn_protocol()
            .unwrap_or_default()
            .to_vec();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let response = sender.send_request(request("/who")).await.ok()?;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((alpn, String::from_utf8(body.to_vec()).unwrap()))
    }

    #[tokio::test]
    async fn tls_negotiates_h2_and_names_the_client_certificates_device() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let server = tls_server(&pki, ClientCertMode::Optional);
        let addr = server.tls.unwrap();
        let with_cert = client_tls(&pki, Some((&pki.client_cert, &pki.client_key)));
        let (alpn, body) = tokio::time::timeout(BOUND, tls_who(&with_cert, addr))
            .await
            .unwrap()
            .expect("served");
        assert_eq!(alpn, b"h2");
        assert_eq!(body, "tls=true device=Some(\"dev1\")");
        // Optional: without a certificate too, with no device.
        let without = client_tls(&pki, None);
        let (_, body) = tokio::time::timeout(BOUND, tls_who(&without, addr))
            .await
            .unwrap()
            .expect("served");
        assert_eq!(body, "tls=true device=None");
        assert_eq!(get_counter(&server.stats.tls_handshake_failed), 0);
        server.stop().await;
    }

    #[tokio::test]
    async fn required_client_certs_refuse_a_client_without_one_or_from_another_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let server = tls_server(&pki, ClientCertMode::Required);
        let addr = server.tls.unwrap();
        let without = client_tls(&pki, None);
        let answer = tokio::time::timeout(BOUND, tls_who(&without, addr))
            .await
            .unwrap();
        assert!(answer.is_none(), "served without a certificate: {answer:?}");
        wait_for(|| get_counter(&server.stats.tls_handshake_failed) == 1).await;
        let stranger = client_tls(&pki, Some((&pki.stranger_cert, &pki.stranger_key)));
        let answer = tokio::time::timeout(BOUND, tls_who(&stranger, addr))
            .await
            .unwrap();
        assert!(
            answer.is_none(),
            "served with another CA's certificate: {answer:?}"
        );
        wait_for(|| get_counter(&server.stats.tls_handshake_failed) == 2).await;
        let with_cert = client_tls(&pki, Some((&pki.client_cert, &pki.client_key)));
        let (_, body) = tokio::time::timeout(BOUND, tls_who(&with_cert, addr))
            .await
            .unwrap()
            .expect("served");
        assert_eq!(body, "tls=true device=Some(\"dev1\")");
        server.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_tls_client_that_never_finishes_its_handshake_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let server = tls_server(&pki, ClientCertMode::Off);
        let mut stream = TcpStream::connect(server.tls.unwrap()).await.unwrap();
        // Paused time jumps to the handshake timeout (10 s), before the idle timeout.
        assert!(closed_by_server(&mut stream).await);
        assert_eq!(get_counter(&server.stats.tls_handshake_failed), 1);
        assert_eq!(get_counter(&server.stats.idle_closed), 0);
        server.stop().await;
    }

    #[tokio::test]
    async fn stop_lets_the_request_in_flight_finish_and_refuses_new_connections() {
        let started = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let slow = {
            let (started, release) = (Arc::clone(&started), Arc::clone(&release));
            move || async move {
                started.notify_one();
                release.notified().await;
                "done"
            }
        };
        let server = start(
            section(true, false),
            None,
            Router::new().route("/slow", get(slow)),
        );
        let addr = server.plain.unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            raw_request(&mut stream, "/slow").await
        });
        tokio::time::timeout(BOUND, started.notified())
            .await
            .unwrap();
        server.stop.cancel();
        // The listener closes: a new connection is refused (once the accept loop saw `stop`).
        tokio::time::timeout(BOUND, async {
            while let Ok(mut stream) = TcpStream::connect(addr).await {
                // Accepted by the kernel before the close: reset with the listener.
                let _ = closed_by_server(&mut stream).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        // The request in flight holds `serve` up.
        assert!(!server.task.is_finished());
        release.notify_one();
        let answer = tokio::time::timeout(BOUND, client).await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        tokio::time::timeout(BOUND, server.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn stop_drops_what_is_left_after_the_grace_period() {
        let never = || std::future::pending::<&'static str>();
        let server = start(
            HttpSection {
                idle_timeout: Duration::from_secs(3600),
                ..section(true, false)
            },
            None,
            Router::new().route("/never", get(never)),
        );
        let mut stream = TcpStream::connect(server.plain.unwrap()).await.unwrap();
        stream
            .write_all(b"GET /never HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        wait_for(|| get_counter(&server.stats.connections_open) == 1).await;
        server.stop.cancel();
        // Paused time jumps over the grace period; the connection is dropped, not answered.
        assert!(closed_by_server(&mut stream).await);
        tokio::time::timeout(BOUND * 10, server.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[test]
    fn bind_names_the_key_and_address_that_failed() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let s = HttpSection {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            tls_listen: vec![addr],
            ..HttpSection::default()
        };
        let (key, at, _) = bind(&s).unwrap_err();
        assert_eq!((key, at), ("[http] tls_listen", addr));
    }

    #[test]
    fn the_log_limiter_lets_one_through_per_interval_and_counts_the_rest() {
        let mut limiter = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.allow(t0), Some(0));
        assert_eq!(limiter.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(limiter.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(limiter.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(limiter.allow(t0 + Duration::from_secs(11)), None);
    }
}
