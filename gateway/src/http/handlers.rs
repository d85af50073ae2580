//! The axum router and its handlers: thin glue between a request and the pure modules
//! (request parsing, auth, rate, batch, SSE hub) and [`Ingress`].
//!
//! ```text
//! POST /v1/publish/{*topic}   single publish (the raw path re-read and decoded once)
//! POST /v1/publish/           400 bad_topic (empty topic)
//! POST /v1/publish            batch (JSON array or NDJSON)
//! GET  /v1/subscribe?filter=  Server-Sent Events
//! anything else               404 not_found / 405 method_not_allowed + Allow (JSON bodies)
//! ```
//!
//! Check order, so an unauthenticated client never makes the gateway read a body: stopping
//! -> route/method -> auth -> rate -> parameters and topic -> grants -> length (413 from
//! `Content-Length` before any body byte is read; 411 when required) -> body (`Limited`,
//! `request_timeout` -> 408, the `body_memory` budget) -> spool. Handlers read the clock
//! (they are the adapters) and pass `now` down. Success bodies of single publishes are
//! constant byte strings (no serializer on the hot path). Every response is counted
//! ([`HttpStats`]) and its device recorded ([`Devices`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;

use sensorgate_bridges::message::{Message, Origin, Protocol, Qos};
use sensorgate_bridges::router::IngressHandle;
use sensorgate_bridges::upstream::FailReason;

use super::auth::{AuthError, Identity};
use super::batch::{BatchError, BatchLimits, batch_kind, parse as parse_batch};
use super::devices::{Devices, Seen};
use super::publish::{BatchOutcome, Ingress, ItemRefused, Outcome};
use super::reload::{Live, Settings};
use super::request::{self, Refusal};
use super::server::ConnInfo;
use super::sse::{HubRefused, KEEPALIVE, StreamId, StreamQueue, Subscriptions, encode_ready};
use super::stats::HttpStats;
use crate::identity::IdentitySource;
use crate::observe::model::DownlinkDropReason;
use crate::security::{Denial, Limiter, Requester, Verdict};

/// `application/json` for every body we write.
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The constant success bodies of single publishes.
const DURABLE_BODY: &[u8] = br#"{"qos":1,"durable":true}"#;
const QUEUED_BODY: &[u8] = br#"{"qos":0,"durable":false}"#;

/// Everything the handlers share (the axum state).
pub(crate) struct App {
    pub(crate) ingress: Arc<Ingress>,
    pub(crate) devices: Arc<Mutex<Devices>>,
    /// The settings in force (auth table, limits, body budget) and the rate buckets,
    /// swapped by a reload ([`super::reload`]); read once per request.
    live: Arc<Live>,
    /// The `[limits]` buckets of the identities that published recently (the policy itself
    /// is `settings().section.security`, swapped by a reload).
    limiter: Mutex<Limiter>,
}

impl App {
    /// The handlers' state on `live`'s settings (attached to `ingress` and `devices`, so a
    /// reload reaches them).
    pub(crate) fn new(
        live: Arc<Live>,
        ingress: Arc<Ingress>,
        devices: Arc<Mutex<Devices>>,
    ) -> Arc<Self> {
        live.attach(Arc::clone(&ingress), Arc::clone(&devices));
        Arc::new(App {
            ingress,
            devices,
            live,
            limiter: Mutex::new(Limiter::new()),
        })
    }

    /// The settings in force for this request.
    fn settings(&self) -> Arc<Settings> {
        self.live.settings()
    }

    fn stats(&self) -> &HttpStats {
        &self.ingress.stats
    }
}

/// The router of the HTTP ingress (paths fixed by the issue).
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/publish", post(batch))
        .route("/v1/publish/", post(empty_topic))
        .route("/v1/publish/{*topic}", post(single))
        .route("/v1/subscribe", get(subscribe))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// The wall clock in Unix seconds (JWT `exp` / `nbf`); 0 if the clock is before 1970.
#[allow(clippy::disallowed_methods)] // Handlers are the adapters: they read the clock.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[allow(clippy::disallowed_methods)] // Handlers are the adapters: they read the clock.
fn now() -> Instant {
    // tokio's clock, so paused-time tests drive it.
    tokio::time::Instant::now().into_std()
}

/// What is known about the request for its accounting.
struct Ctx {
    peer: SocketAddr,
    tls: bool,
    cert_device: Option<Arc<str>>,
    /// The device key once authenticated (`anonymous@<ip>` for anonymous).
    device: Option<Arc<str>>,
    topic: Option<String>,
    /// Messages accepted by this request.
    messages: u64,
}

impl Ctx {
    fn new(request: &Request) -> Self {
        // Without the server adapter (tests through the router alone) there is no ConnInfo.
        let conn = request.extensions().get::<ConnInfo>();
        Ctx {
            peer: conn.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.peer),
            tls: conn.is_some_and(|c| c.tls),
            cert_device: conn.and_then(|c| c.cert_device.clone()),
            device: None,
            topic: None,
            messages: 0,
        }
    }

    /// The peer as kept in a message's origin (`tcp:1.2.3.4:5`, `tls:[::1]:6`).
    fn origin_peer(&self) -> Arc<str> {
        let scheme = if self.tls { "tls" } else { "tcp" };
        Arc::from(format!("{scheme}:{}", self.peer))
    }
}

impl App {
    /// Counts and records a finished request and turns a refusal into its response.
    fn finish(&self, ctx: &Ctx, result: Result<Response, Refusal>) -> Response {
        let (response, error) = match result {
            Ok(response) => (response, None),
            Err(refusal) => {
                self.stats().refused(refusal.reason());
                if matches!(refusal, Refusal::RateLimited(_)) {
                    self.stats().rate_limited();
                }
                if matches!(refusal, Refusal::RequestTimeout) {
                    self.stats().body_timeout();
                }
                (
                    refusal.response(self.settings().section.retry_after),
                    Some(refusal.code()),
                )
            }
        };
        // Peer-triggered: debug only (the counters and /clients have the totals).
        tracing::debug!(
            peer = %ctx.peer,
            device = ctx.device.as_deref(),
            topic = ctx.topic.as_deref(),
            status = response.status().as_u16(),
            error,
            "HTTP request."
        );
        let status = response.status();
        self.stats().response(status);
        if let Some(device) = &ctx.device {
            let seen = Seen {
                peer: ctx.peer,
                tls: ctx.tls,
                topic: ctx.topic.as_deref(),
                status: status.as_u16(),
                messages: ctx.messages,
            };
            self.devices
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(now(), device, seen);
        }
        response
    }

    /// Stopping, then credentials, then the device's rate: the checks every endpoint starts
    /// with.
    fn admit(
        &self,
        settings: &Settings,
        ctx: &mut Ctx,
        headers: &HeaderMap,
    ) -> Result<Arc<Identity>, Refusal> {
        if self.ingress.stopping.is_cancelled() {
            return Err(Refusal::Stopping);
        }
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let identity = settings
            .auth
            .authenticate(authorization, ctx.cert_device.as_deref(), unix_now())
            .inspect(|identity| {
                if identity.source == IdentitySource::Jwt {
                    self.stats().jwt_accepted();
                }
            })
            .map_err(|e| match e {
                AuthError::Missing => Refusal::Unauthorized {
                    invalid_token: false,
                },
                AuthError::InvalidToken => Refusal::Unauthorized {
                    invalid_token: true,
                },
                AuthError::CredentialsDisagree => Refusal::CredentialsDisagree,
                AuthError::UnknownCertificate => Refusal::UnknownCertificate,
                AuthError::Jwt(error) => {
                    self.stats().jwt_refused(error);
                    // Peer-triggered: debug only; never the token.
                    tracing::debug!(peer = %ctx.peer, reason = error.code(), "JWT refused.");
                    Refusal::InvalidJwt(error)
                }
            })?;
        let device: Arc<str> = if identity.anonymous {
            Arc::from(format!("anonymous@{}", ctx.peer.ip()))
        } else {
            Arc::clone(&identity.id)
        };
        ctx.device = Some(Arc::clone(&device));
        self.live
            .rate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(&device, now())
            .map_err(Refusal::RateLimited)?;
        Ok(identity)
    }

    /// Reads a body of at most `limit` bytes: 413 from `Content-Length` before any byte is
    /// read, 411 when required and absent, the memory budget within `request_timeout` (else
    /// 503 busy), the body within `request_timeout` (else 408), 413 past `limit`. The permit
    /// holds the body's share of `body_memory`: the caller keeps it until it answers.
    async fn read_body(
        &self,
        settings: &Settings,
        headers: &HeaderMap,
        body: Body,
        limit: usize,
    ) -> Result<(Bytes, OwnedSemaphorePermit), Refusal> {
        let limit_u64 = limit as u64;
        let length = match headers.get(header::CONTENT_LENGTH) {
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(Refusal::BodyError)?,
            ),
            None => None,
        };
        match length {
            Some(n) if n > limit_u64 => {
                return Err(Refusal::TooLarge {
                    limit: limit_u64,
                    index: None,
                });
            }
            None if settings.section.require_content_length => {
                return Err(Refusal::LengthRequired { limit: limit_u64 });
            }
            _ => {}
        }
        let reserve = length.unwrap_or(limit_u64);
        let kib = u32::try_from(reserve.div_ceil(1024).max(1))
            .unwrap_or(u32::MAX)
            .min(settings.body_permits);
        let timeout = settings.section.request_timeout;
        let permit = match tokio::time::timeout(
            timeout,
            Arc::clone(&settings.body_memory).acquire_many_owned(kib),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            _ => return Err(Refusal::Busy),
        };
        match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
            Err(_) => Err(Refusal::RequestTimeout),
            Ok(Ok(collected)) => Ok((collected.to_bytes(), permit)),
            Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
                Err(Refusal::TooLarge {
                    limit: limit_u64,
                    index: None,
                })
            }
            Ok(Err(_)) => Err(Refusal::BodyError),
        }
    }

    fn origin(&self, ctx: &Ctx, identity: &Identity) -> Origin {
        Origin {
            protocol: Protocol::Http,
            client_id: (!identity.anonymous).then(|| Arc::clone(&identity.id)),
            peer: Some(ctx.origin_peer()),
        }
    }
}

impl App {
    /// The `[[acl]]` check of a publish to `topic` (on top of the device's own grants):
    /// 403 `forbidden_topic`, counted.
    fn acl_publish(
        &self,
        settings: &Settings,
        identity: &Identity,
        topic: &str,
        index: Option<usize>,
    ) -> Result<(), Refusal> {
        let policy = &settings.section.security;
        if policy.acl.is_none() {
            return Ok(());
        }
        let id = identity.identity();
        let client_id = (!identity.anonymous).then_some(&*identity.id);
        if policy.may_publish(&Requester::new(Some(&id), client_id), topic) {
            return Ok(());
        }
        self.stats().security.count(Denial::AclPublish);
        Err(Refusal::ForbiddenTopic { index })
    }

    /// The `[[acl]]` check of an SSE subscription: 403 `forbidden_filter`, counted.
    fn acl_subscribe(
        &self,
        settings: &Settings,
        identity: &Identity,
        filters: &[Arc<str>],
    ) -> Result<(), Refusal> {
        let policy = &settings.section.security;
        if policy.acl.is_none() {
            return Ok(());
        }
        let id = identity.identity();
        let client_id = (!identity.anonymous).then_some(&*identity.id);
        let who = Requester::new(Some(&id), client_id);
        if filters.iter().all(|f| policy.may_subscribe(&who, f)) {
            return Ok(());
        }
        self.stats().security.count(Denial::AclSubscribe);
        Err(Refusal::ForbiddenFilter)
    }

    /// The `[limits]` check of `count` messages of `bytes` in all (the largest `largest`):
    /// 429 with Retry-After over the rate, 413 too large; counted. Keyed by the device (an
    /// anonymous client by its address, as HTTP's own rate).
    fn limits(
        &self,
        settings: &Settings,
        ctx: &Ctx,
        count: usize,
        bytes: usize,
        largest: usize,
    ) -> Result<(), Refusal> {
        let policy = &settings.section.security;
        if !policy.limits_active() {
            return Ok(());
        }
        let key = ctx.device.as_deref().unwrap_or("");
        let verdict = self
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check_many(&policy.limits, now(), key, count, bytes, largest);
        match verdict {
            Verdict::Allowed => Ok(()),
            Verdict::TooLarge => {
                self.stats().security.count(Denial::TooLarge);
                let limit = policy.limits.limits_of(key).max_message_size;
                Err(Refusal::TooLarge {
                    limit: limit.unwrap_or(largest) as u64,
                    index: None,
                })
            }
            Verdict::RateLimited { retry_after } => {
                self.stats().security.count(Denial::RateLimited);
                Err(Refusal::RateLimited(retry_after))
            }
        }
    }
}

fn constant(status: StatusCode, body: &'static [u8]) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, JSON);
    response
}

/// `POST /v1/publish/{*topic}`.
async fn single(State(app): State<Arc<App>>, request: Request) -> Response {
    app.stats().request();
    let mut ctx = Ctx::new(&request);
    let result = single_inner(&app, &mut ctx, request).await;
    app.finish(&ctx, result)
}

async fn single_inner(app: &App, ctx: &mut Ctx, request: Request) -> Result<Response, Refusal> {
    let (parts, body) = request.into_parts();
    let settings = app.settings();
    let identity = app.admit(&settings, ctx, &parts.headers)?;
    let params = request::publish_params(parts.uri.query(), &parts.headers)?;
    let topic = request::topic_from_path(parts.uri.path())?;
    ctx.topic = Some(topic.clone());
    if !identity.publish.allows_topic(&topic) {
        return Err(Refusal::ForbiddenTopic { index: None });
    }
    app.acl_publish(&settings, &identity, &topic, None)?;
    let (payload, _memory) = app
        .read_body(
            &settings,
            &parts.headers,
            body,
            settings.section.max_body_size,
        )
        .await?;
    app.limits(&settings, ctx, 1, payload.len(), payload.len())?;
    let message = Message {
        topic,
        payload,
        qos: params.qos,
        retain: params.retain,
        origin: app.origin(ctx, &identity),
    };
    let stats = app.stats();
    match app.ingress.publish(message).await {
        Outcome::Durable => {
            stats.accepted(params.qos, 1);
            stats.acked(1);
            ctx.messages = 1;
            Ok(constant(StatusCode::OK, DURABLE_BODY))
        }
        Outcome::Queued => {
            stats.accepted(params.qos, 1);
            ctx.messages = 1;
            Ok(constant(StatusCode::ACCEPTED, QUEUED_BODY))
        }
        Outcome::SpoolRefused => Err(Refusal::SpoolFull),
        Outcome::Busy => Err(Refusal::Busy),
        Outcome::NoRoute => Err(Refusal::NoRoute { index: None }),
        Outcome::Stopping => Err(Refusal::Stopping),
    }
}

/// `POST /v1/publish/`: the empty topic.
async fn empty_topic(State(app): State<Arc<App>>, request: Request) -> Response {
    app.stats().request();
    let mut ctx = Ctx::new(&request);
    let result = app
        .admit(&app.settings(), &mut ctx, request.headers())
        .and_then(|_| {
            Err(Refusal::BadTopic {
                index: None,
                reason: "the topic is empty: POST /v1/publish/{topic}".into(),
            })
        });
    app.finish(&ctx, result)
}

/// `POST /v1/publish`: a batch.
async fn batch(State(app): State<Arc<App>>, request: Request) -> Response {
    app.stats().request();
    let mut ctx = Ctx::new(&request);
    let result = batch_inner(&app, &mut ctx, request).await;
    app.finish(&ctx, result)
}

async fn batch_inner(app: &App, ctx: &mut Ctx, request: Request) -> Result<Response, Refusal> {
    let (parts, body) = request.into_parts();
    let settings = app.settings();
    let identity = app.admit(&settings, ctx, &parts.headers)?;
    let defaults = request::publish_params(parts.uri.query(), &parts.headers)?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = batch_kind(content_type).ok_or(Refusal::UnsupportedMediaType)?;
    let (body, _memory) = app
        .read_body(
            &settings,
            &parts.headers,
            body,
            settings.section.max_batch_size,
        )
        .await?;
    let limits = BatchLimits {
        max_items: settings.section.max_batch_items,
        max_payload: settings.section.max_body_size,
    };
    let items =
        parse_batch(kind, &body, defaults.qos, defaults.retain, &limits).map_err(|e| match e {
            BatchError::Malformed { index, reason } => Refusal::BadBatch { index, reason },
            BatchError::BadTopic { index, reason } => Refusal::BadTopic {
                index: Some(index),
                reason: reason.into(),
            },
            BatchError::BadQos { index } => Refusal::BadQos { index: Some(index) },
            BatchError::TooManyItems { limit } => Refusal::TooLarge {
                limit: limit as u64,
                index: None,
            },
            BatchError::PayloadTooLarge { index, limit } => Refusal::TooLarge {
                limit: limit as u64,
                index: Some(index),
            },
        })?;
    drop(body);
    if let Some(index) = items
        .iter()
        .position(|item| !identity.publish.allows_topic(&item.topic))
    {
        return Err(Refusal::ForbiddenTopic { index: Some(index) });
    }
    for (index, item) in items.iter().enumerate() {
        app.acl_publish(&settings, &identity, &item.topic, Some(index))?;
    }
    let bytes: usize = items.iter().map(|i| i.payload.len()).sum();
    let largest = items.iter().map(|i| i.payload.len()).max().unwrap_or(0);
    app.limits(&settings, ctx, items.len(), bytes, largest)?;
    if let Some(index) = app
        .ingress
        .first_unrouted(items.iter().map(|i| i.topic.as_str()))
    {
        return Err(Refusal::NoRoute { index: Some(index) });
    }
    ctx.topic = items.last().map(|i| i.topic.clone());
    let origin = app.origin(ctx, &identity);
    let all_qos0 = items.iter().all(|i| i.qos == Qos::AtMostOnce);
    let messages: Vec<Message> = items
        .into_iter()
        .map(|item| Message {
            topic: item.topic,
            payload: item.payload,
            qos: item.qos,
            retain: item.retain,
            origin: origin.clone(),
        })
        .collect();
    let outcome = app.ingress.publish_batch(messages).await;
    Ok(batch_response(app, ctx, &outcome, all_qos0))
}

/// 200 (202 when every item is QoS 0) with the counts, or 503 with the exact `refused` list.
fn batch_response(app: &App, ctx: &mut Ctx, outcome: &BatchOutcome, all_qos0: bool) -> Response {
    let stats = app.stats();
    stats.accepted(Qos::AtLeastOnce, outcome.durable as u64);
    stats.accepted(Qos::AtMostOnce, outcome.queued as u64);
    let accepted = outcome.durable + outcome.queued;
    ctx.messages = accepted as u64;
    if outcome.complete() {
        stats.acked(outcome.durable as u64);
        let status = if all_qos0 {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
        let body = json!({
            "items": outcome.items,
            "durable": outcome.durable,
            "queued": outcome.queued,
        });
        return request::json_response(status, HeaderMap::new(), &body);
    }
    stats.refused(crate::observe::model::RefusalReason::Congestion);
    let first = outcome
        .refused
        .first()
        .map_or(ItemRefused::Busy, |&(_, why)| why);
    let (error, reason) = if accepted > 0 {
        stats.batch_partial();
        (
            "partial",
            "some items were not stored: resend only the items listed in `refused`; \
             every other item is stored",
        )
    } else {
        (first.code(), "no item was stored; resend the batch later")
    };
    let refused: Vec<Value> = outcome
        .refused
        .iter()
        .map(|&(index, why)| json!({ "index": index, "error": why.code() }))
        .collect();
    let body = json!({
        "error": error,
        "reason": reason,
        "accepted": accepted,
        "refused": refused,
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(request::ceil_secs(app.settings().section.retry_after)),
    );
    request::json_response(StatusCode::SERVICE_UNAVAILABLE, headers, &body)
}

/// The router's subscriptions as the hub asks for them: QoS 0 (the issue fixes "QoS 0
/// semantics" for SSE; the router raises the upstream QoS if another protocol wants more).
struct Subs<'a>(&'a IngressHandle);

impl Subscriptions for Subs<'_> {
    fn subscribe(&self, now: Instant, filter: &str) -> Result<(), FailReason> {
        self.0.subscribe(now, filter, Qos::AtMostOnce)
    }

    fn unsubscribe(&self, now: Instant, filter: &str) {
        self.0.unsubscribe(now, filter);
    }
}

/// Unregisters a stream when its body is dropped (the client left, the connection idled out,
/// or the stream ended at shutdown); the events still queued count as expired.
struct StreamGuard {
    ingress: Arc<Ingress>,
    id: StreamId,
    queue: Arc<StreamQueue>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let expired = self.queue.len() as u64;
        self.ingress
            .stats
            .dropped(DownlinkDropReason::Expired, expired);
        let ingress = &self.ingress;
        ingress
            .hub()
            .unregister(now(), self.id, &Subs(&ingress.handle));
        ingress.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /v1/subscribe?filter=..`: Server-Sent Events.
async fn subscribe(State(app): State<Arc<App>>, request: Request) -> Response {
    app.stats().request();
    let mut ctx = Ctx::new(&request);
    let result = subscribe_inner(&app, &mut ctx, &request);
    app.finish(&ctx, result)
}

fn subscribe_inner(app: &App, ctx: &mut Ctx, request: &Request) -> Result<Response, Refusal> {
    // axum serves HEAD with GET routes; we do not.
    if request.method() == Method::HEAD {
        return Err(Refusal::MethodNotAllowed { allow: "GET" });
    }
    let settings = app.settings();
    let identity = app.admit(&settings, ctx, request.headers())?;
    let filters = request::filters_from_query(
        request.uri().query(),
        settings.section.max_filters_per_stream,
    )?;
    if !filters
        .filters
        .iter()
        .all(|f| identity.subscribe.allows_filter(f))
    {
        return Err(Refusal::ForbiddenFilter);
    }
    app.acl_subscribe(&settings, &identity, &filters.filters)?;
    let device = ctx
        .device
        .clone()
        .unwrap_or_else(|| Arc::clone(&identity.id));
    let ingress = &app.ingress;
    let ready = encode_ready(&filters.filters);
    let registered = {
        let mut hub = ingress.hub();
        let registered = hub.register(
            now(),
            &device,
            filters.filters,
            filters.base64,
            &Subs(&ingress.handle),
        );
        if let Ok((id, _)) = &registered {
            // Checked at each delivery, so a narrowed ACL (a reload) applies to open streams.
            let client_id = (!identity.anonymous).then(|| Arc::clone(&identity.id));
            hub.set_stream_identity(*id, identity.identity(), client_id);
        }
        registered
    };
    let (id, queue) = registered.map_err(|e| match e {
        HubRefused::TooManyStreams => Refusal::TooManyStreams { device: false },
        HubRefused::TooManyForDevice => Refusal::TooManyStreams { device: true },
        HubRefused::FilterTableFull | HubRefused::Subscribe(_) => Refusal::SubscribeRefused,
    })?;
    ingress.streams.fetch_add(1, Ordering::Relaxed);
    ingress.stats.stream_opened();
    let guard = StreamGuard {
        ingress: Arc::clone(ingress),
        id,
        queue,
    };
    let body = Body::from_stream(events(guard, ready, settings.section.sse_keepalive));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies such as nginx buffer responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The stream's events: `ready` at once, then its queue, with a keep-alive comment after every
/// `keepalive` of silence; ends when the queue is closed (shutdown, the `close` policy).
fn events(
    guard: StreamGuard,
    ready: Bytes,
    keepalive: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    futures_util::stream::unfold((guard, Some(ready)), move |(guard, ready)| async move {
        if let Some(ready) = ready {
            return Some((Ok(ready), (guard, None)));
        }
        let event = match tokio::time::timeout(keepalive, guard.queue.next()).await {
            Ok(Some(event)) => {
                if event.starts_with(b"id: ") {
                    guard.ingress.stats.delivered();
                }
                event
            }
            Ok(None) => return None,
            Err(_) => Bytes::from_static(KEEPALIVE),
        };
        Some((Ok(event), (guard, None)))
    })
}

/// Any other path.
async fn not_found(State(app): State<Arc<App>>, request: Request) -> Response {
    app.stats().request();
    let ctx = Ctx::new(&request);
    app.finish(&ctx, Err(Refusal::NotFound))
}

/// A known path with another method.
async fn method_not_allowed(State(app): State<Arc<App>>, request: Request) -> Response {
    app.stats().request();
    let ctx = Ctx::new(&request);
    let allow = if request.uri().path().starts_with("/v1/subscribe") {
        "GET"
    } else {
        "POST"
    };
    app.finish(&ctx, Err(Refusal::MethodNotAllowed { allow }))
}
