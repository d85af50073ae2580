//! The HTTP ingress's counters: relaxed atomics bumped by the handlers and the driver task,
//! read by the admin listener through the driver ([`HttpStats::report`]) and by the metrics
//! ([`HttpStats::events`], `sensorgate_ingress_events_total{protocol="http",event=..}`).
//!
//! Mapping to the protocol-neutral report (design section 8): `packets_in` = requests;
//! `messages_in[qos + 1]` per accepted message (a batch's items one each); `acks` = QoS 1
//! messages answered 2xx once durable; `refusals` by `request::Refusal::reason`;
//! `downlink_delivered` = SSE message events written; `downlink_dropped` = events lost to a
//! full queue, too large, or queued when their stream closed (`expired`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;

use sensorgate_bridges::message::Qos;

use super::jwt::JwtError;
use super::server::ConnStats;
use crate::observe::model::{
    DownlinkDropReason, IngressCounters, IngressReport, RefusalReason, SessionCounts,
};

/// The status codes counted one by one (`responses_<code>`); any other counts as
/// `responses_other`.
const CODES: [(u16, &str); 15] = [
    (200, "responses_200"),
    (202, "responses_202"),
    (400, "responses_400"),
    (401, "responses_401"),
    (403, "responses_403"),
    (404, "responses_404"),
    (405, "responses_405"),
    (408, "responses_408"),
    (411, "responses_411"),
    (413, "responses_413"),
    (415, "responses_415"),
    (429, "responses_429"),
    (500, "responses_500"),
    (503, "responses_503"),
    (0, "responses_other"),
];

/// Every counter of the HTTP ingress since start.
#[derive(Debug, Default)]
pub struct HttpStats {
    /// The server adapter's connection counters.
    pub conn: Arc<ConnStats>,
    /// Refusals by `[[acl]]` and `[limits]` (the shared limits' 429s are also in
    /// `rate_limited`, the one event of both).
    pub security: crate::security::Counters,
    /// Requests that reached a handler (or a fallback).
    requests: AtomicU64,
    /// Accepted messages per QoS, index as `IngressCounters::messages_in`.
    messages_in: [AtomicU64; 4],
    /// QoS 1 messages answered 2xx after their durable verdict.
    acks: AtomicU64,
    /// Refusals per `RefusalReason::ALL` position.
    refusals: [AtomicU64; RefusalReason::COUNT],
    /// SSE message events written to their streams.
    downlink_delivered: AtomicU64,
    /// SSE events lost, per `DownlinkDropReason::ALL` position.
    downlink_dropped: [AtomicU64; 4],
    /// Responses per [`CODES`] position.
    responses: [AtomicU64; CODES.len()],
    /// Verdicts that came after their client had left (durable, nobody told).
    verdicts_orphaned: AtomicU64,
    /// Requests refused for the device's rate.
    rate_limited: AtomicU64,
    /// Bodies not complete within `request_timeout` (408).
    body_timeouts: AtomicU64,
    /// SSE streams opened.
    sse_streams_opened: AtomicU64,
    /// Batches answered 503 with some items durable and some not.
    batch_partial: AtomicU64,
    /// JWT bearer tokens accepted.
    jwt_accepted: AtomicU64,
    /// JWT bearer tokens refused, per `JwtError::ALL` position.
    jwt_refused: [AtomicU64; JwtError::ALL.len()],
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl HttpStats {
    /// One more request.
    pub(crate) fn request(&self) {
        bump(&self.requests);
    }

    /// A response with `status` went out.
    pub(crate) fn response(&self, status: StatusCode) {
        let code = status.as_u16();
        let index = CODES
            .iter()
            .position(|&(c, _)| c == code)
            .unwrap_or(CODES.len() - 1);
        if let Some(counter) = self.responses.get(index) {
            bump(counter);
        }
    }

    /// A request or message refused for `reason`.
    pub(crate) fn refused(&self, reason: RefusalReason) {
        if let Some(counter) = RefusalReason::ALL
            .iter()
            .position(|&r| r == reason)
            .and_then(|i| self.refusals.get(i))
        {
            bump(counter);
        }
    }

    /// `n` messages at `qos` accepted (appended; durable for QoS 1).
    pub(crate) fn accepted(&self, qos: Qos, n: u64) {
        let index = match qos {
            Qos::AtMostOnce => 1,
            Qos::AtLeastOnce => 2,
            Qos::ExactlyOnce => 3,
        };
        if let Some(counter) = self.messages_in.get(index) {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// `n` QoS 1 messages answered as durable.
    pub(crate) fn acked(&self, n: u64) {
        self.acks.fetch_add(n, Ordering::Relaxed);
    }

    /// An SSE message event was written.
    pub(crate) fn delivered(&self) {
        bump(&self.downlink_delivered);
    }

    /// `n` SSE events lost for `reason`.
    pub(crate) fn dropped(&self, reason: DownlinkDropReason, n: u64) {
        if let Some(counter) = DownlinkDropReason::ALL
            .iter()
            .position(|&r| r == reason)
            .and_then(|i| self.downlink_dropped.get(i))
        {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A verdict whose client had left.
    pub(crate) fn orphaned(&self) {
        bump(&self.verdicts_orphaned);
    }

    /// Orphaned verdicts so far (tests, the status line).
    pub fn verdicts_orphaned(&self) -> u64 {
        self.verdicts_orphaned.load(Ordering::Relaxed)
    }

    /// Connections open now (a gauge, for `/status` or a gauge metric).
    pub fn connections_open(&self) -> u64 {
        self.conn.connections_open.load(Ordering::Relaxed)
    }

    /// A request refused for its device's rate.
    pub(crate) fn rate_limited(&self) {
        bump(&self.rate_limited);
    }

    /// Requests refused for their device's rate so far (the status line).
    pub fn rate_limited_total(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// A body not complete in time.
    pub(crate) fn body_timeout(&self) {
        bump(&self.body_timeouts);
    }

    /// An SSE stream opened.
    pub(crate) fn stream_opened(&self) {
        bump(&self.sse_streams_opened);
    }

    /// A JWT accepted.
    pub(crate) fn jwt_accepted(&self) {
        bump(&self.jwt_accepted);
    }

    /// A JWT refused for `reason`.
    pub(crate) fn jwt_refused(&self, reason: JwtError) {
        if let Some(counter) = self.jwt_refused.get(reason.index()) {
            bump(counter);
        }
    }

    /// A batch answered partially.
    pub(crate) fn batch_partial(&self) {
        bump(&self.batch_partial);
    }

    /// The protocol-neutral report, with `sessions` (devices with an open SSE stream, as
    /// active) counted by the caller.
    pub(crate) fn report(&self, sessions: SessionCounts) -> IngressReport {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IngressReport {
            protocol: super::PROTOCOL,
            sessions,
            counters: IngressCounters {
                messages_in: self.messages_in.each_ref().map(load),
                acks: load(&self.acks),
                refusals: self.refusals.each_ref().map(load),
                downlink_delivered: load(&self.downlink_delivered),
                downlink_retransmitted: 0,
                downlink_dropped: self.downlink_dropped.each_ref().map(load),
                packets_in: load(&self.requests),
            },
        }
    }

    /// The counters beyond the protocol-neutral report, for `IngressSource.extra` and the
    /// metric `sensorgate_ingress_events_total{protocol="http",event=<name>}`:
    /// `responses_<code>` (and `responses_other`), the server's connection counters
    /// (`ConnStats::events`; the gauge is [`Self::connections_open`]), `verdicts_orphaned`,
    /// `rate_limited`, `body_timeouts`, `sse_streams_opened`, `batch_partial`, `jwt_accepted`
    /// and `jwt_refused_<reason>` (one per [`JwtError`]).
    pub fn events(&self) -> Vec<(&'static str, u64)> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut events: Vec<(&'static str, u64)> = CODES
            .iter()
            .zip(&self.responses)
            .map(|(&(_, name), counter)| (name, load(counter)))
            .collect();
        events.extend(self.conn.events());
        events.extend([
            ("verdicts_orphaned", load(&self.verdicts_orphaned)),
            ("rate_limited", load(&self.rate_limited)),
            ("body_timeouts", load(&self.body_timeouts)),
            ("sse_streams_opened", load(&self.sse_streams_opened)),
            ("batch_partial", load(&self.batch_partial)),
            ("jwt_accepted", load(&self.jwt_accepted)),
        ]);
        events.extend(
            self.security
                .events()
                .into_iter()
                .filter(|(name, _)| *name != "rate_limited"),
        );
        events.extend(
            JwtError::ALL
                .iter()
                .zip(&self.jwt_refused)
                .map(|(e, counter)| (e.event(), load(counter))),
        );
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_counted_per_code_and_others_together() {
        let stats = HttpStats::default();
        stats.response(StatusCode::OK);
        stats.response(StatusCode::OK);
        stats.response(StatusCode::IM_A_TEAPOT);
        let events = stats.events();
        let get = |name: &str| events.iter().find(|(n, _)| *n == name).map(|&(_, v)| v);
        assert_eq!(get("responses_200"), Some(2));
        assert_eq!(get("responses_other"), Some(1));
        assert_eq!(get("responses_503"), Some(0));
        assert_eq!(get("verdicts_orphaned"), Some(0));
    }

    #[test]
    fn the_report_maps_messages_refusals_and_drops() {
        let stats = HttpStats::default();
        stats.request();
        stats.accepted(Qos::AtLeastOnce, 3);
        stats.accepted(Qos::AtMostOnce, 1);
        stats.acked(3);
        stats.refused(RefusalReason::TooLarge);
        stats.dropped(DownlinkDropReason::Expired, 2);
        let report = stats.report(SessionCounts::default());
        assert_eq!(report.protocol, "http");
        let c = report.counters;
        assert_eq!((c.packets_in, c.messages_in, c.acks), (1, [0, 1, 3, 0], 3));
        assert_eq!(c.refusals, [0, 0, 0, 1, 0, 0]);
        assert_eq!(c.downlink_dropped, [0, 0, 0, 2]);
    }
}
