//! The HTTP ingress (issue 16): `POST /v1/publish/{topic}`, `POST /v1/publish` (batches) and
//! `GET /v1/subscribe` (Server-Sent Events) on axum/hyper, on its own thread and runtime
//! (`sensorgate-http`, started by `app`): a flood of requests or TLS handshakes slows HTTP,
//! not the datagram protocols.
//!
//! HTTP is the one ingress that is not a `DatagramCore`: hyper owns the per-connection state
//! (keep-alive, h2 streams, timeouts) and a request's state is one future. The decisions are
//! pure modules with `now` passed in ([`request`], `auth`, `rate`, `batch`, `sse`,
//! [`devices`]); the axum [`handlers`] are the adapters; [`publish`] appends and waits for
//! the spool's verdicts; one [`driver`] task owns the channels from the rest of the gateway
//! (verdicts, downlink, admin queries, beat). A reload ([`Reloader::apply`], SIGHUP) swaps the
//! settings each request and each new connection reads ([`reload`]); connections, requests in
//! flight and SSE streams go on.
//!
//! ```text
//!  client ──> server (C: listeners, TLS, limits) ──> handlers ──> Ingress::publish[_batch]
//!                                                     │  ^            │ append(msg, token)
//!                                SSE body <── Hub <───┘  │ waiter      v
//!                                  ^                     └── Verdicts <── driver <── spool
//!                                  └──────── driver <── router downlink        verdicts
//! ```
//!
//! Durability rules (MUST hold; [`publish`] and the tests check them):
//! 1. A 200 for a QoS 1 message is written only after its spool verdict `accepted: true`
//!    (fsync'd per `[spool] fsync`, group commit shared with the other protocols). 202 means
//!    appended without waiting for the fsync, and its body says `"durable": false`.
//! 2. A failure status is only sent for a message that was not appended, or whose verdict was
//!    `accepted: false`. Once appended, nothing times out into an error: `request_timeout`
//!    covers reading the body only, and the verdict always comes (the writer answers every
//!    tokened append once and outlives this ingress).
//! 3. A client that leaves while waiting gets nothing; its verdict is counted
//!    (`verdicts_orphaned`) and, accepted, still delivered locally (by the driver, from the
//!    waiter entry), so other subscribers see exactly the durable messages, once.
//! 4. Per HTTP/1.1 connection requests are sequential and each is appended before it is
//!    answered: one device's messages keep their order. Concurrent requests have none.
//! 5. A batch is validated whole (400/403/413/415 append nothing), then appended in order;
//!    when the writer's queue stays full for `queue_wait` at item k, items k.. are never
//!    appended. A 503 lists exactly the items not in the spool; every other item is stored.
//! 6. Shutdown ([`run`]): once `stop` fires, requests not yet appended get 503 `stopping`,
//!    SSE streams end, the server finishes the requests in flight (bounded by its grace);
//!    the driver answers verdicts until the server has returned, then stops.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use sensorgate_bridges::message::Downlink;
use sensorgate_bridges::router::IngressHandle;
use sensorgate_bridges::spool::AppendReply;
use sensorgate_bridges::telemetry::Beat;

use crate::observe::model::IngressQuery;

pub(crate) mod auth;
pub mod batch;
pub(crate) mod devices;
pub(crate) mod driver;
pub(crate) mod handlers;
pub mod jwt;
pub(crate) mod publish;
pub(crate) mod rate;
pub mod reload;
pub mod request;
pub mod server;
pub(crate) mod sse;
pub mod stats;
pub mod tls;
pub mod token;

#[cfg(test)]
mod tests;

/// The protocol label in `/status`, metrics and origin templates.
pub const PROTOCOL: &str = "http";

/// What the HTTP ingress takes from the rest of the gateway.
pub struct Wiring {
    /// `router.ingress(reply_tx).with_downlink(downlink_tx)`.
    pub handle: IngressHandle,
    /// The spool's verdicts on this ingress's tokened appends (MUST be read at all times: the
    /// writer blocks on it).
    pub replies: mpsc::Receiver<Vec<AppendReply>>,
    /// This ingress's share of the downlink (for the SSE streams).
    pub downlink: mpsc::Receiver<Downlink>,
    /// The admin listener's questions.
    pub queries: mpsc::Receiver<IngressQuery>,
    /// Beaten by the driver task at least every `BEAT_IDLE`.
    pub beat: Arc<Beat>,
}

pub use reload::Reloader;

/// Runs the HTTP ingress on the current runtime (the `sensorgate-http` thread's) until
/// `stop`, then drains (see the module doc, rule 6) and returns. Answers every verdict on
/// `wiring.replies` until it returns. Its settings are `reloader`'s (made from the section,
/// [`Reloader::new`]): [`Reloader::apply`] changes them while it runs.
///
/// # Errors
/// The server's fatal IO error.
pub async fn run(
    reloader: Reloader,
    bound: Bound,
    tls: Option<Arc<rustls::ServerConfig>>,
    wiring: Wiring,
    stats: Arc<stats::HttpStats>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let live = Arc::clone(reloader.live());
    let section = Arc::clone(&live.settings().section);
    let ingress = Arc::new(publish::Ingress::new(
        wiring.handle,
        hub(&section),
        section.queue_wait,
        Arc::clone(&stats),
        stop.clone(),
    ));
    let devices = Arc::new(Mutex::new(devices::Devices::new(
        section.max_devices_tracked,
    )));
    let app = handlers::App::new(
        Arc::clone(&live),
        Arc::clone(&ingress),
        Arc::clone(&devices),
    );
    let driver_stop = CancellationToken::new();
    let driver = tokio::spawn(
        driver::Driver {
            ingress: Arc::clone(&ingress),
            devices,
            replies: wiring.replies,
            downlink: wiring.downlink,
            queries: wiring.queries,
            beat: wiring.beat,
        }
        .run(driver_stop.clone()),
    );
    // SSE streams end as soon as the gateway stops (they would hold the grace otherwise).
    let closer = {
        let ingress = Arc::clone(&ingress);
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            ingress.hub().close_all();
        })
    };
    let conn = Arc::clone(&stats.conn);
    let result = serve_live(bound, tls, handlers::router(app), live, conn, stop).await;
    closer.abort();
    ingress.hub().close_all();
    // Every handler that could wait for a verdict has finished or been dropped by now.
    driver_stop.cancel();
    if let Err(error) = driver.await {
        tracing::error!(%error, "HTTP driver task failed.");
    }
    result
}

use crate::config::HttpSection;
use server::{Bound, serve_live};
use sse::Hub;

/// The SSE hub with `section`'s bounds.
fn hub(section: &HttpSection) -> Hub {
    Hub::new(
        section.max_streams,
        section.max_streams_per_device,
        section.max_filters,
        section.sse_queue,
        section.sse_queue_full,
        section.sse_max_event,
    )
}
