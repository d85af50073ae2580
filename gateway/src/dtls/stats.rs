//! The DTLS layer's counters, written by its driver's task and read by the admin listener
//! (`IngressSource.extra`, the metric
//! `sensorgate_ingress_events_total{protocol=..,event="dtls_<name>"}`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a handshake (or an established session) ended in failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client's PSK identity is in no `[[psk]]`.
    UnknownIdentity,
    /// A known identity with the wrong key (its Finished MAC did not verify).
    BadKey,
    /// A client certificate was refused.
    CertificateInvalid,
    /// The handshake was not done within `handshake_timeout`.
    Timeout,
    /// A ClientHello carried a cookie that does not verify (stale, or not ours).
    CookieInvalid,
    /// `max_handshakes` or `max_sessions` was reached.
    TableFull,
    /// Any other protocol failure during the handshake.
    Protocol,
    /// An established session failed (a fatal alert or error).
    Established,
}

impl Failure {
    const ALL: [Failure; 8] = [
        Failure::UnknownIdentity,
        Failure::BadKey,
        Failure::CertificateInvalid,
        Failure::Timeout,
        Failure::CookieInvalid,
        Failure::TableFull,
        Failure::Protocol,
        Failure::Established,
    ];

    /// The reason's name (counter suffix, logs).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::UnknownIdentity => "unknown_identity",
            Failure::BadKey => "bad_key",
            Failure::CertificateInvalid => "certificate_invalid",
            Failure::Timeout => "timeout",
            Failure::CookieInvalid => "cookie_invalid",
            Failure::TableFull => "table_full",
            Failure::Protocol => "protocol",
            Failure::Established => "session_error",
        }
    }

    fn counter(self) -> &'static str {
        match self {
            Failure::UnknownIdentity => "dtls_handshakes_failed_unknown_identity",
            Failure::BadKey => "dtls_handshakes_failed_bad_key",
            Failure::CertificateInvalid => "dtls_handshakes_failed_certificate_invalid",
            Failure::Timeout => "dtls_handshakes_failed_timeout",
            Failure::CookieInvalid => "dtls_handshakes_failed_cookie_invalid",
            Failure::TableFull => "dtls_handshakes_failed_table_full",
            Failure::Protocol => "dtls_handshakes_failed_protocol",
            Failure::Established => "dtls_sessions_failed",
        }
    }
}

/// Counters and gauges of one DTLS layer.
#[derive(Debug, Default)]
pub struct DtlsStats {
    hello_verify_sent: AtomicU64,
    started: AtomicU64,
    ok: AtomicU64,
    failed: [AtomicU64; 8],
    idle_closed: AtomicU64,
    close_notify: AtomicU64,
    unexpected: AtomicU64,
    no_session: AtomicU64,
    out_dropped: AtomicU64,
    sessions_open: AtomicU64,
    handshakes_open: AtomicU64,
    identities: AtomicU64,
}

impl DtlsStats {
    pub(super) fn count_hello_verify(&self) {
        self.hello_verify_sent.fetch_add(1, Relaxed);
    }
    pub(super) fn count_started(&self) {
        self.started.fetch_add(1, Relaxed);
    }
    pub(super) fn count_ok(&self) {
        self.ok.fetch_add(1, Relaxed);
    }
    pub(super) fn count_failure(&self, failure: Failure) {
        if let Some(c) = Failure::ALL
            .iter()
            .position(|f| *f == failure)
            .and_then(|i| self.failed.get(i))
        {
            c.fetch_add(1, Relaxed);
        }
    }
    pub(super) fn count_idle(&self) {
        self.idle_closed.fetch_add(1, Relaxed);
    }
    pub(super) fn count_closed(&self) {
        self.close_notify.fetch_add(1, Relaxed);
    }
    pub(super) fn count_unexpected(&self) {
        self.unexpected.fetch_add(1, Relaxed);
    }
    pub(super) fn count_no_session(&self) {
        self.no_session.fetch_add(1, Relaxed);
    }
    pub(super) fn count_out_dropped(&self) {
        self.out_dropped.fetch_add(1, Relaxed);
    }
    pub(super) fn set_open(&self, sessions: usize, handshakes: usize) {
        self.sessions_open.store(sessions as u64, Relaxed);
        self.handshakes_open.store(handshakes as u64, Relaxed);
    }
    pub(super) fn set_identities(&self, n: usize) {
        self.identities.store(n as u64, Relaxed);
    }

    /// Handshakes that completed.
    #[must_use]
    pub fn handshakes_ok(&self) -> u64 {
        self.ok.load(Relaxed)
    }

    /// Handshakes that failed for `failure`.
    #[must_use]
    pub fn failed(&self, failure: Failure) -> u64 {
        Failure::ALL
            .iter()
            .position(|f| *f == failure)
            .and_then(|i| self.failed.get(i))
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Every counter and gauge by name, for `IngressSource.extra`: `dtls_hello_verify_sent`
    /// (stateless cookie answers), `dtls_handshakes_started` (verified ClientHellos that made
    /// a session), `dtls_handshakes_ok`, `dtls_handshakes_failed_<reason>` (see
    /// [`Failure::as_str`]), `dtls_sessions_failed`, `dtls_sessions_idle_closed`,
    /// `dtls_sessions_close_notify`, `dtls_datagrams_unexpected` (no session and not a
    /// ClientHello), `dtls_transmits_no_session` (the inner core answered a peer whose session
    /// has gone), `dtls_transmits_dropped` (output queue full); gauges `dtls_sessions_open`,
    /// `dtls_handshakes_open`, `dtls_psk_identities`.
    #[must_use]
    pub fn events(&self) -> Vec<(&'static str, u64)> {
        let mut events = vec![
            (
                "dtls_hello_verify_sent",
                self.hello_verify_sent.load(Relaxed),
            ),
            ("dtls_handshakes_started", self.started.load(Relaxed)),
            ("dtls_handshakes_ok", self.ok.load(Relaxed)),
        ];
        events.extend(
            Failure::ALL
                .iter()
                .zip(&self.failed)
                .map(|(f, c)| (f.counter(), c.load(Relaxed))),
        );
        events.extend([
            ("dtls_sessions_idle_closed", self.idle_closed.load(Relaxed)),
            (
                "dtls_sessions_close_notify",
                self.close_notify.load(Relaxed),
            ),
            ("dtls_datagrams_unexpected", self.unexpected.load(Relaxed)),
            ("dtls_transmits_no_session", self.no_session.load(Relaxed)),
            ("dtls_transmits_dropped", self.out_dropped.load(Relaxed)),
            ("dtls_sessions_open", self.sessions_open.load(Relaxed)),
            ("dtls_handshakes_open", self.handshakes_open.load(Relaxed)),
            ("dtls_psk_identities", self.identities.load(Relaxed)),
        ]);
        events
    }
}
