//! Pure request parsing and the refusal table: what the handlers decide from a request's
//! path, query and headers, and the one place a refusal becomes a status, an error code, a
//! reason and headers ([`Refusal::response`]). No IO and no clock.
//!
//! Rules (design section 2):
//! - **Topic**: the raw path after `/v1/publish/`, percent-decoded exactly once (so `%2F` is a
//!   level separator like `/`, and `%23` / `%2B` decode to `#` / `+` and are then refused as
//!   wildcards), UTF-8, then [`topic::validate_name`].
//! - **QoS / retain**: query `qos=0|1` (default 1) and `retain=true|false|1|0` (default
//!   false); headers `QoS-Level` (Eclipse Hono's name) and `Retain` take the same values. Both
//!   present and different, a value given twice differently, or a value out of range: 400.
//! - **Filters**: query `filter` (repeated, percent-decoded once; a `+` is the MQTT wildcard,
//!   not a form-encoded space), each [`topic::validate_filter`], duplicates folded,
//!   1..=`max` of them; `encoding=base64` forces `payload_b64` in the events.
//! - Unknown query parameters are ignored (proxies and clients add their own).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};

use sensorgate_bridges::message::Qos;
use sensorgate_bridges::topic;

use super::jwt::JwtError;
use crate::observe::model::RefusalReason;

/// The path prefix of single publishes; the topic is the rest of the path.
pub(crate) const PUBLISH_PREFIX: &str = "/v1/publish/";

/// Eclipse Hono's QoS header.
pub(crate) const QOS_HEADER: HeaderName = HeaderName::from_static("qos-level");

/// The retain flag as a header.
pub(crate) const RETAIN_HEADER: HeaderName = HeaderName::from_static("retain");

/// The media types a batch may have (the `Accept-Post` header of a 415).
pub(crate) const BATCH_MEDIA_TYPES: &str = super::batch::MEDIA_TYPES;

/// Every refusal the HTTP ingress gives; [`Self::response`] is the only place that turns one
/// into a status, an error code, a reason and headers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refusal {
    /// No credentials and anonymous access off (`invalid_token: false`), or an `Authorization`
    /// header that is not a known bearer token (`true`).
    Unauthorized { invalid_token: bool },
    /// A JWT refused by `[http.jwt]` (401 `unauthorized`, `error="invalid_token"`), with the
    /// reason (`token_error` in the body).
    InvalidJwt(JwtError),
    /// The token and the client certificate name different devices.
    CredentialsDisagree,
    /// A verified client certificate names no configured device.
    UnknownCertificate,
    /// A topic outside the identity's `publish` grants (batch: the first item's index).
    ForbiddenTopic { index: Option<usize> },
    /// A filter outside the identity's `subscribe` grants.
    ForbiddenFilter,
    /// Routes are configured and none takes the topic (batch: the first item's index).
    NoRoute { index: Option<usize> },
    /// An empty or invalid topic (batch: the item's index).
    BadTopic {
        index: Option<usize>,
        reason: Cow<'static, str>,
    },
    /// `qos` not 0 or 1, or query and header disagree (batch: the item's index).
    BadQos { index: Option<usize> },
    /// `retain` not a boolean, or query and header disagree.
    BadRetain,
    /// A malformed batch body (the item's index; for NDJSON its line).
    BadBatch { index: usize, reason: String },
    /// No filter, an invalid one, or too many.
    BadFilter(Cow<'static, str>),
    /// `require_content_length` and no `Content-Length`.
    LengthRequired { limit: u64 },
    /// A body (or a batch's item count or item payload) beyond the limit.
    TooLarge { limit: u64, index: Option<usize> },
    /// A batch whose `Content-Type` is not one of [`BATCH_MEDIA_TYPES`].
    UnsupportedMediaType,
    /// The device is over its request rate; a token is there after this long.
    RateLimited(Duration),
    /// SSE streams: the device's (`device: true`, 429) or the gateway's (503) are all taken.
    TooManyStreams { device: bool },
    /// The spool refused the append (full with `reject_new`, or a write error).
    SpoolFull,
    /// The spool writer's queue stayed full for `queue_wait`, or the body memory budget was
    /// not available within `request_timeout`.
    Busy,
    /// The router's filter table is full (or the hub's): no stream.
    SubscribeRefused,
    /// The gateway is stopping; nothing was appended.
    Stopping,
    /// The body was not complete within `request_timeout`.
    RequestTimeout,
    /// The body could not be read (a bad `Content-Length`, a broken chunked encoding, a
    /// reset stream).
    BodyError,
    /// No such path.
    NotFound,
    /// A known path with another method; the methods it takes.
    MethodNotAllowed { allow: &'static str },
}

impl Refusal {
    /// The status code.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthorized { .. }
            | Refusal::InvalidJwt(_)
            | Refusal::CredentialsDisagree => StatusCode::UNAUTHORIZED,
            Refusal::UnknownCertificate
            | Refusal::ForbiddenTopic { .. }
            | Refusal::ForbiddenFilter
            | Refusal::NoRoute { .. } => StatusCode::FORBIDDEN,
            Refusal::BadTopic { .. }
            | Refusal::BadQos { .. }
            | Refusal::BadRetain
            | Refusal::BadBatch { .. }
            | Refusal::BadFilter(_) => StatusCode::BAD_REQUEST,
            Refusal::LengthRequired { .. } => StatusCode::LENGTH_REQUIRED,
            Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::RateLimited(_) | Refusal::TooManyStreams { device: true } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Refusal::TooManyStreams { device: false }
            | Refusal::SpoolFull
            | Refusal::Busy
            | Refusal::SubscribeRefused
            | Refusal::Stopping => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::BodyError => StatusCode::BAD_REQUEST,
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The `error` code of the body (stable: clients and tests match on it).
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Refusal::Unauthorized { .. } | Refusal::InvalidJwt(_) => "unauthorized",
            Refusal::CredentialsDisagree => "credentials_disagree",
            Refusal::UnknownCertificate => "unknown_certificate",
            Refusal::ForbiddenTopic { .. } => "forbidden_topic",
            Refusal::ForbiddenFilter => "forbidden_filter",
            Refusal::NoRoute { .. } => "no_route",
            Refusal::BadTopic { .. } => "bad_topic",
            Refusal::BadQos { .. } => "bad_qos",
            Refusal::BadRetain => "bad_retain",
            Refusal::BadBatch { .. } => "bad_batch",
            Refusal::BadFilter(_) => "bad_filter",
            Refusal::LengthRequired { .. } => "length_required",
            Refusal::TooLarge { .. } => "too_large",
            Refusal::UnsupportedMediaType => "unsupported_media_type",
            Refusal::RateLimited(_) => "rate_limited",
            Refusal::TooManyStreams { .. } => "too_many_streams",
            Refusal::SpoolFull => "spool_full",
            Refusal::Busy => "busy",
            Refusal::SubscribeRefused => "subscribe_refused",
            Refusal::Stopping => "stopping",
            Refusal::RequestTimeout => "request_timeout",
            Refusal::BodyError => "bad_body",
            Refusal::NotFound => "not_found",
            Refusal::MethodNotAllowed { .. } => "method_not_allowed",
        }
    }

    /// The human-readable `reason` of the body.
    fn reason_text(&self) -> Cow<'static, str> {
        match self {
            Refusal::Unauthorized {
                invalid_token: false,
            } => "credentials required: Authorization: Bearer <token>".into(),
            Refusal::Unauthorized {
                invalid_token: true,
            } => "the Authorization header is not a known bearer token".into(),
            Refusal::InvalidJwt(error) => error.to_string().into(),
            Refusal::CredentialsDisagree => {
                "the token and the client certificate name different devices".into()
            }
            Refusal::UnknownCertificate => {
                "the client certificate names no configured device".into()
            }
            Refusal::ForbiddenTopic { .. } => "this device may not publish to the topic".into(),
            Refusal::ForbiddenFilter => "this device may not subscribe to the filter".into(),
            Refusal::NoRoute { .. } => "no route takes the topic".into(),
            Refusal::BadTopic { reason, .. } | Refusal::BadFilter(reason) => reason.clone(),
            Refusal::BadQos { .. } => {
                "qos must be 0 or 1 (query `qos` and header `QoS-Level` must agree)".into()
            }
            Refusal::BadRetain => {
                "retain must be true, false, 1 or 0 (query and header must agree)".into()
            }
            Refusal::BadBatch { reason, .. } => reason.clone().into(),
            Refusal::LengthRequired { .. } => "a Content-Length header is required".into(),
            Refusal::TooLarge { .. } => "larger than the limit".into(),
            Refusal::UnsupportedMediaType => {
                format!("a batch must be one of: {BATCH_MEDIA_TYPES}").into()
            }
            Refusal::RateLimited(_) => {
                "rate limit of this device reached (requests, messages or bytes)".into()
            }
            Refusal::TooManyStreams { device: true } => {
                "this device has its maximum of streams open".into()
            }
            Refusal::TooManyStreams { device: false } => {
                "the gateway has its maximum of streams open".into()
            }
            Refusal::SpoolFull => {
                "the spool refused the message (full, or a disk error); nothing was stored".into()
            }
            Refusal::Busy => "the gateway is busy; nothing was stored".into(),
            Refusal::SubscribeRefused => "the gateway's subscription table is full".into(),
            Refusal::Stopping => "the gateway is stopping; nothing was stored".into(),
            Refusal::RequestTimeout => "the body was not received in time".into(),
            Refusal::BodyError => "the body could not be read".into(),
            Refusal::NotFound => "endpoints: POST /v1/publish/{topic}, POST /v1/publish, \
                                  GET /v1/subscribe?filter="
                .into(),
            Refusal::MethodNotAllowed { allow } => format!("allowed: {allow}").into(),
        }
    }

    /// The admin counter it counts in (design section 8).
    pub(crate) fn reason(&self) -> RefusalReason {
        match self {
            Refusal::RateLimited(_)
            | Refusal::TooManyStreams { .. }
            | Refusal::SpoolFull
            | Refusal::Busy
            | Refusal::SubscribeRefused
            | Refusal::Stopping => RefusalReason::Congestion,
            Refusal::BadTopic { .. } | Refusal::BadFilter(_) => RefusalReason::InvalidTopic,
            Refusal::Unauthorized { .. }
            | Refusal::InvalidJwt(_)
            | Refusal::CredentialsDisagree
            | Refusal::UnknownCertificate
            | Refusal::ForbiddenTopic { .. }
            | Refusal::ForbiddenFilter
            | Refusal::NoRoute { .. } => RefusalReason::NotAllowed,
            Refusal::LengthRequired { .. } | Refusal::TooLarge { .. } => RefusalReason::TooLarge,
            Refusal::BadQos { .. }
            | Refusal::BadRetain
            | Refusal::BadBatch { .. }
            | Refusal::UnsupportedMediaType
            | Refusal::RequestTimeout
            | Refusal::BodyError
            | Refusal::NotFound
            | Refusal::MethodNotAllowed { .. } => RefusalReason::Malformed,
        }
    }

    /// The response: status, `{"error","reason",..}` JSON body and the row's headers.
    /// `retry_after` is the configured `Retry-After` of 503s and per-device stream limits.
    pub(crate) fn response(&self, retry_after: Duration) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), Value::from(self.code()));
        body.insert(
            "reason".into(),
            Value::from(self.reason_text().into_owned()),
        );
        let mut headers = HeaderMap::new();
        let mut close = false;
        let mut retry = None;
        match self {
            Refusal::Unauthorized { invalid_token } => {
                let value = if *invalid_token {
                    r#"Bearer realm="sensorgate", error="invalid_token""#
                } else {
                    r#"Bearer realm="sensorgate""#
                };
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(value));
            }
            Refusal::InvalidJwt(error) => {
                body.insert("token_error".into(), Value::from(error.code()));
                let value = format!(
                    r#"Bearer realm="sensorgate", error="invalid_token", error_description="{}""#,
                    error.code()
                );
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            Refusal::ForbiddenTopic { index } | Refusal::NoRoute { index } => {
                add_index(&mut body, *index);
            }
            Refusal::BadTopic { index, .. } | Refusal::BadQos { index } => {
                add_index(&mut body, *index);
            }
            Refusal::BadBatch { index, .. } => add_index(&mut body, Some(*index)),
            Refusal::LengthRequired { limit } => {
                body.insert("limit".into(), Value::from(*limit));
                close = true;
            }
            Refusal::TooLarge { limit, index } => {
                body.insert("limit".into(), Value::from(*limit));
                add_index(&mut body, *index);
                close = true;
            }
            Refusal::UnsupportedMediaType => {
                headers.insert(
                    HeaderName::from_static("accept-post"),
                    HeaderValue::from_static(BATCH_MEDIA_TYPES),
                );
            }
            Refusal::RateLimited(wait) => {
                let secs = ceil_secs(*wait);
                body.insert("retry_after_secs".into(), Value::from(secs));
                retry = Some(secs);
            }
            Refusal::TooManyStreams { .. }
            | Refusal::SpoolFull
            | Refusal::Busy
            | Refusal::SubscribeRefused => retry = Some(ceil_secs(retry_after)),
            Refusal::Stopping => {
                retry = Some(ceil_secs(retry_after));
                close = true;
            }
            Refusal::RequestTimeout | Refusal::BodyError => close = true,
            Refusal::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Refusal::CredentialsDisagree
            | Refusal::UnknownCertificate
            | Refusal::ForbiddenFilter
            | Refusal::BadRetain
            | Refusal::BadFilter(_)
            | Refusal::NotFound => {}
        }
        if let Some(secs) = retry {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if close {
            // HTTP/1.1: the body may be unread; h2 drops this header (the stream is reset).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        json_response(self.status(), headers, &Value::Object(body))
    }
}

impl IntoResponse for Refusal {
    /// With the default `Retry-After` ([`DEFAULT_RETRY_AFTER`]); the handlers use
    /// [`Refusal::response`] with the configured one.
    fn into_response(self) -> Response {
        self.response(DEFAULT_RETRY_AFTER)
    }
}

/// `Retry-After` when no configured one is at hand (the `[http] retry_after` default).
pub(crate) const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

fn add_index(body: &mut Map<String, Value>, index: Option<usize>) {
    if let Some(index) = index {
        body.insert("index".into(), Value::from(index));
    }
}

/// Whole seconds, rounded up, at least 1 (`Retry-After: 0` would invite a hot loop).
pub(crate) fn ceil_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// A JSON response with `headers`.
pub(crate) fn json_response(status: StatusCode, headers: HeaderMap, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response.headers_mut().extend(headers);
    response
}

/// QoS and retain of a publish (or a batch's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PublishParams {
    /// Default [`Qos::AtLeastOnce`].
    pub qos: Qos,
    /// Default `false`.
    pub retain: bool,
}

/// QoS and retain from the query (`qos`, `retain`) and the headers (`QoS-Level`, `Retain`).
///
/// # Errors
/// [`Refusal::BadQos`] / [`Refusal::BadRetain`]: a value out of range, or two that disagree.
pub(crate) fn publish_params(
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<PublishParams, Refusal> {
    let mut qos: Option<Qos> = None;
    let mut retain: Option<bool> = None;
    let bad_qos = Refusal::BadQos { index: None };
    for (name, value) in query_pairs(query) {
        match name {
            "qos" => merge(&mut qos, parse_qos(&decoded(value)), &bad_qos)?,
            "retain" => merge(
                &mut retain,
                parse_bool(&decoded(value)),
                &Refusal::BadRetain,
            )?,
            _ => {}
        }
    }
    for value in headers.get_all(QOS_HEADER) {
        let parsed = value.to_str().ok().and_then(|v| parse_qos(v.trim()));
        merge(&mut qos, parsed, &bad_qos)?;
    }
    for value in headers.get_all(RETAIN_HEADER) {
        let parsed = value.to_str().ok().and_then(|v| parse_bool(v.trim()));
        merge(&mut retain, parsed, &Refusal::BadRetain)?;
    }
    Ok(PublishParams {
        qos: qos.unwrap_or(Qos::AtLeastOnce),
        retain: retain.unwrap_or(false),
    })
}

/// Takes `value` into `slot`: `None` (unparsable) or a value different from one already
/// there is `refusal`.
fn merge<T: PartialEq>(
    slot: &mut Option<T>,
    value: Option<T>,
    refusal: &Refusal,
) -> Result<(), Refusal> {
    let Some(value) = value else {
        return Err(refusal.clone());
    };
    match slot {
        Some(old) if *old != value => Err(refusal.clone()),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

fn parse_qos(value: &str) -> Option<Qos> {
    match value {
        "0" => Some(Qos::AtMostOnce),
        "1" => Some(Qos::AtLeastOnce),
        _ => None,
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// The query's raw `name=value` pairs (a pair without `=` has an empty value).
fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// A query value percent-decoded once (lossy UTF-8: a value that was not UTF-8 then fails
/// its own parse). A `+` stays a `+`.
fn decoded(value: &str) -> Cow<'_, str> {
    percent_decode_str(value).decode_utf8_lossy()
}

/// The topic of a single publish from the request's raw path.
///
/// # Errors
/// [`Refusal::BadTopic`]: the path is not under [`PUBLISH_PREFIX`], the topic is empty, not
/// UTF-8 once decoded, or not a valid topic name.
pub(crate) fn topic_from_path(path: &str) -> Result<String, Refusal> {
    let bad = |reason: Cow<'static, str>| Refusal::BadTopic {
        index: None,
        reason,
    };
    let raw = path
        .strip_prefix(PUBLISH_PREFIX)
        .ok_or_else(|| bad("the topic follows /v1/publish/".into()))?;
    let topic = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| bad("the topic is not UTF-8 once percent-decoded".into()))?;
    topic::validate_name(&topic).map_err(|e| bad(e.to_string().into()))?;
    Ok(topic.into_owned())
}

/// The filters of a subscribe request and whether `encoding=base64` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Filters {
    /// 1..=max distinct valid filters, in the order given.
    pub filters: Vec<Arc<str>>,
    /// Every payload as `payload_b64`.
    pub base64: bool,
}

/// The filters from the query (`filter`, repeated) and `encoding`.
///
/// # Errors
/// [`Refusal::BadFilter`]: none, more than `max` distinct ones, an invalid one, or an
/// `encoding` other than `base64` / `auto`.
pub(crate) fn filters_from_query(query: Option<&str>, max: usize) -> Result<Filters, Refusal> {
    let mut filters: Vec<Arc<str>> = Vec::new();
    let mut base64 = false;
    for (name, value) in query_pairs(query) {
        match name {
            "filter" => {
                // Strict decode: a filter that is not UTF-8 is refused, not mangled.
                let filter = percent_decode_str(value)
                    .decode_utf8()
                    .map_err(|_| Refusal::BadFilter("a filter is not UTF-8".into()))?;
                topic::validate_filter(&filter)
                    .map_err(|e| Refusal::BadFilter(format!("filter `{filter}`: {e}").into()))?;
                if filters.iter().any(|f| **f == *filter) {
                    continue;
                }
                if filters.len() >= max {
                    return Err(Refusal::BadFilter(
                        format!("at most {max} filters per stream").into(),
                    ));
                }
                filters.push(Arc::from(filter.as_ref()));
            }
            "encoding" => match decoded(value).as_ref() {
                "base64" => base64 = true,
                "auto" => base64 = false,
                _ => {
                    return Err(Refusal::BadFilter("encoding must be base64 or auto".into()));
                }
            },
            _ => {}
        }
    }
    if filters.is_empty() {
        return Err(Refusal::BadFilter(
            "at least one filter is required: ?filter=<topic filter>".into(),
        ));
    }
    Ok(Filters { filters, base64 })
}

/// For the `http_request` fuzz target only: runs every request-line and header parser on
/// `data` (split at the first two 0xFF bytes into path, query and header value) and checks
/// what they promise: a topic taken from the path is a valid topic name; filters are 1..=`max`
/// distinct valid filters; a refusal renders a response with an error status; the bearer
/// parser takes only `b64token` characters. Panics when a promise is broken.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8], max_filters: usize) {
    let mut parts = data.splitn(3, |&b| b == 0xFF);
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let header = parts.next().unwrap_or_default();
    let check = |refusal: &Refusal| {
        let response = refusal.response(Duration::from_secs(1));
        assert!(response.status().is_client_error() || response.status().is_server_error());
    };
    match topic_from_path(&format!("{PUBLISH_PREFIX}{path}")) {
        Ok(topic) => assert!(topic::is_valid_name(&topic), "{topic:?}"),
        Err(refusal) => check(&refusal),
    }
    match filters_from_query(Some(&query), max_filters) {
        Ok(f) => {
            assert!((1..=max_filters).contains(&f.filters.len()));
            for filter in &f.filters {
                assert!(topic::validate_filter(filter).is_ok(), "{filter:?}");
            }
        }
        Err(refusal) => check(&refusal),
    }
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(header) {
        headers.insert(QOS_HEADER, value.clone());
        headers.insert(RETAIN_HEADER, value);
    }
    if let Err(refusal) = publish_params(Some(&query), &headers) {
        check(&refusal);
    }
    crate::http::auth::fuzz_bearer(header);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn params(query: &str, h: &[(&str, &str)]) -> Result<(Qos, bool), Refusal> {
        let query = (!query.is_empty()).then_some(query);
        publish_params(query, &headers(h)).map(|p| (p.qos, p.retain))
    }

    #[test]
    fn publish_params_default_to_qos_1_without_retain() {
        assert_eq!(params("", &[]), Ok((Qos::AtLeastOnce, false)));
    }

    #[test]
    fn publish_params_table() {
        use Qos::{AtLeastOnce as Q1, AtMostOnce as Q0};
        let bad_qos = Err(Refusal::BadQos { index: None });
        let bad_retain = Err(Refusal::BadRetain);
        type Row<'a> = (
            &'a str,
            &'a [(&'a str, &'a str)],
            Result<(Qos, bool), Refusal>,
        );
        let rows: &[Row<'_>] = &[
            ("qos=0", &[], Ok((Q0, false))),
            ("qos=1&retain=true", &[], Ok((Q1, true))),
            ("retain=1", &[], Ok((Q1, true))),
            ("retain=0&qos=0", &[], Ok((Q0, false))),
            ("other=x&qos=0", &[], Ok((Q0, false))),
            ("", &[("QoS-Level", "0")], Ok((Q0, false))),
            (
                "",
                &[("qos-level", " 1 "), ("Retain", "true")],
                Ok((Q1, true)),
            ),
            ("qos=0", &[("QoS-Level", "0")], Ok((Q0, false))),
            ("qos=0&qos=0", &[], Ok((Q0, false))),
            ("qos=2", &[], bad_qos.clone()),
            ("qos=", &[], bad_qos.clone()),
            ("qos", &[], bad_qos.clone()),
            ("qos=0&qos=1", &[], bad_qos.clone()),
            ("qos=0", &[("QoS-Level", "1")], bad_qos.clone()),
            ("", &[("QoS-Level", "2")], bad_qos),
            ("retain=yes", &[], bad_retain.clone()),
            ("retain=true", &[("Retain", "false")], bad_retain.clone()),
            ("", &[("Retain", "TRUE")], bad_retain),
        ];
        for (query, h, expected) in rows {
            assert_eq!(&params(query, h), expected, "query {query:?} headers {h:?}");
        }
    }

    #[test]
    fn topic_from_path_table() {
        let ok = |t: &str| Ok::<String, ()>(t.to_owned());
        let rows: &[(&str, Result<String, ()>)] = &[
            ("/v1/publish/sensors/dev1/temp", ok("sensors/dev1/temp")),
            ("/v1/publish/a%2Fb", ok("a/b")),
            ("/v1/publish/caf%C3%A9", ok("café")),
            ("/v1/publish/a%252F", ok("a%2F")),
            ("/v1/publish/a//b/", ok("a//b/")),
            ("/v1/publish/sp%20ace", ok("sp ace")),
            ("/v1/publish/", Err(())),
            ("/v1/publish/a%23", Err(())),
            ("/v1/publish/a%2Bb", Err(())),
            ("/v1/publish/a+b", Err(())),
            ("/v1/publish/%FF", Err(())),
            ("/v1/publish/a%00b", Err(())),
            ("/v1/publish/a%0Ab", Err(())),
            ("/v1/other/x", Err(())),
        ];
        for (path, expected) in rows {
            let got = topic_from_path(path);
            match (&got, expected) {
                (Ok(topic), Ok(want)) => assert_eq!(topic, want, "{path}"),
                (Err(Refusal::BadTopic { index: None, .. }), Err(())) => {}
                _ => panic!("{path}: {got:?}, expected {expected:?}"),
            }
        }
        let long = format!("/v1/publish/{}", "a".repeat(topic::MAX_TOPIC_BYTES + 1));
        assert!(topic_from_path(&long).is_err());
    }

    #[test]
    fn filters_from_query_table() {
        let f = |q: &str| filters_from_query(Some(q), 3);
        let names = |q: &str| {
            f(q).map(|x| {
                (
                    x.filters.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    x.base64,
                )
            })
        };
        assert_eq!(
            names("filter=cmd/dev1/%23"),
            Ok((vec!["cmd/dev1/#".into()], false))
        );
        assert_eq!(
            names("filter=cmd/+/x&filter=cfg&encoding=base64"),
            Ok((vec!["cmd/+/x".into(), "cfg".into()], true))
        );
        assert_eq!(
            names("filter=a&filter=a&filter=b&filter=c"),
            Ok((vec!["a".into(), "b".into(), "c".into()], false)),
            "duplicates fold before the limit"
        );
        for bad in [
            "",
            "encoding=base64",
            "filter=",
            "filter=a/%23/b",
            "filter=a%2B",
            "filter=%FF",
            "filter=a%00",
            "filter=a&filter=b&filter=c&filter=d",
            "filter=a&encoding=hex",
        ] {
            assert!(
                matches!(f(bad), Err(Refusal::BadFilter(_))),
                "{bad}: {:?}",
                f(bad)
            );
        }
        assert!(filters_from_query(None, 3).is_err());
    }

    fn body_of(response: Response) -> (StatusCode, HeaderMap, Value) {
        let (parts, body) = response.into_parts();
        let bytes = futures_util::FutureExt::now_or_never(axum::body::to_bytes(body, 1 << 20))
            .expect("a full body is ready at once")
            .unwrap();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    /// Every row of the design's status table that a refusal makes: status, code, reason
    /// counter and headers.
    #[test]
    fn refusal_table() {
        let retry = Duration::from_secs(7);
        let bad_topic = Refusal::BadTopic {
            index: Some(2),
            reason: "x".into(),
        };
        type Row = (
            Refusal,
            u16,
            &'static str,
            RefusalReason,
            &'static [(&'static str, &'static str)],
        );
        use RefusalReason::*;
        let rows: Vec<Row> = vec![
            (
                Refusal::Unauthorized {
                    invalid_token: false,
                },
                401,
                "unauthorized",
                NotAllowed,
                &[("www-authenticate", r#"Bearer realm="sensorgate""#)],
            ),
            (
                Refusal::Unauthorized {
                    invalid_token: true,
                },
                401,
                "unauthorized",
                NotAllowed,
                &[(
                    "www-authenticate",
                    r#"Bearer realm="sensorgate", error="invalid_token""#,
                )],
            ),
            (
                Refusal::InvalidJwt(JwtError::Expired),
                401,
                "unauthorized",
                NotAllowed,
                &[(
                    "www-authenticate",
                    r#"Bearer realm="sensorgate", error="invalid_token", error_description="expired""#,
                )],
            ),
            (
                Refusal::CredentialsDisagree,
                401,
                "credentials_disagree",
                NotAllowed,
                &[],
            ),
            (
                Refusal::UnknownCertificate,
                403,
                "unknown_certificate",
                NotAllowed,
                &[],
            ),
            (
                Refusal::ForbiddenTopic { index: None },
                403,
                "forbidden_topic",
                NotAllowed,
                &[],
            ),
            (
                Refusal::ForbiddenFilter,
                403,
                "forbidden_filter",
                NotAllowed,
                &[],
            ),
            (
                Refusal::NoRoute { index: Some(1) },
                403,
                "no_route",
                NotAllowed,
                &[],
            ),
            (bad_topic, 400, "bad_topic", InvalidTopic, &[]),
            (
                Refusal::BadQos { index: None },
                400,
                "bad_qos",
                Malformed,
                &[],
            ),
            (Refusal::BadRetain, 400, "bad_retain", Malformed, &[]),
            (
                Refusal::BadBatch {
                    index: 3,
                    reason: "r".into(),
                },
                400,
                "bad_batch",
                Malformed,
                &[],
            ),
            (
                Refusal::BadFilter("f".into()),
                400,
                "bad_filter",
                InvalidTopic,
                &[],
            ),
            (
                Refusal::LengthRequired { limit: 10 },
                411,
                "length_required",
                TooLarge,
                &[("connection", "close")],
            ),
            (
                Refusal::TooLarge {
                    limit: 10,
                    index: None,
                },
                413,
                "too_large",
                TooLarge,
                &[("connection", "close")],
            ),
            (
                Refusal::UnsupportedMediaType,
                415,
                "unsupported_media_type",
                Malformed,
                &[("accept-post", BATCH_MEDIA_TYPES)],
            ),
            (
                Refusal::RateLimited(Duration::from_millis(1500)),
                429,
                "rate_limited",
                Congestion,
                &[("retry-after", "2")],
            ),
            (
                Refusal::TooManyStreams { device: true },
                429,
                "too_many_streams",
                Congestion,
                &[("retry-after", "7")],
            ),
            (
                Refusal::TooManyStreams { device: false },
                503,
                "too_many_streams",
                Congestion,
                &[("retry-after", "7")],
            ),
            (
                Refusal::SpoolFull,
                503,
                "spool_full",
                Congestion,
                &[("retry-after", "7")],
            ),
            (
                Refusal::Busy,
                503,
                "busy",
                Congestion,
                &[("retry-after", "7")],
            ),
            (
                Refusal::SubscribeRefused,
                503,
                "subscribe_refused",
                Congestion,
                &[("retry-after", "7")],
            ),
            (
                Refusal::Stopping,
                503,
                "stopping",
                Congestion,
                &[("retry-after", "7"), ("connection", "close")],
            ),
            (
                Refusal::RequestTimeout,
                408,
                "request_timeout",
                Malformed,
                &[("connection", "close")],
            ),
            (
                Refusal::BodyError,
                400,
                "bad_body",
                Malformed,
                &[("connection", "close")],
            ),
            (Refusal::NotFound, 404, "not_found", Malformed, &[]),
            (
                Refusal::MethodNotAllowed { allow: "POST" },
                405,
                "method_not_allowed",
                Malformed,
                &[("allow", "POST")],
            ),
        ];
        for (refusal, status, code, reason, want_headers) in rows {
            assert_eq!(refusal.reason(), reason, "{refusal:?}");
            let (got_status, headers, body) = body_of(refusal.response(retry));
            assert_eq!(got_status.as_u16(), status, "{refusal:?}");
            assert_eq!(body["error"], code, "{refusal:?}");
            assert!(body["reason"].is_string(), "{refusal:?}");
            assert_eq!(headers["content-type"], "application/json");
            for (name, value) in want_headers {
                assert_eq!(
                    headers.get(*name).map(|v| v.to_str().unwrap()),
                    Some(*value),
                    "{refusal:?} {name}"
                );
            }
            for absent in [
                "retry-after",
                "connection",
                "www-authenticate",
                "allow",
                "accept-post",
            ] {
                if !want_headers.iter().any(|(n, _)| *n == absent) {
                    assert!(headers.get(absent).is_none(), "{refusal:?} has {absent}");
                }
            }
        }
    }

    #[test]
    fn refusal_bodies_carry_their_extra_fields() {
        let (_, _, body) = body_of(
            Refusal::TooLarge {
                limit: 65536,
                index: Some(4),
            }
            .response(DEFAULT_RETRY_AFTER),
        );
        assert_eq!(
            (body["limit"].as_u64(), body["index"].as_u64()),
            (Some(65536), Some(4))
        );
        let (_, _, body) =
            body_of(Refusal::RateLimited(Duration::from_millis(10)).response(DEFAULT_RETRY_AFTER));
        assert_eq!(body["retry_after_secs"], 1, "never 0");
        let (_, _, body) = body_of(
            Refusal::BadBatch {
                index: 9,
                reason: "line 9: x".into(),
            }
            .response(DEFAULT_RETRY_AFTER),
        );
        assert_eq!(
            (body["index"].as_u64(), body["reason"].as_str()),
            (Some(9), Some("line 9: x"))
        );
    }
}
