//! DTLS 1.2 under the datagram protocols (MQTT-SN, CoAP): [`Dtls`] wraps a [`DatagramCore`]
//! and is one itself, so the UDP driver drives it like any core. The driver binds the plain
//! listeners first and the DTLS ones after them; the wrapper is told where the DTLS listeners
//! start and leaves every other datagram to the inner core untouched (one branch). A
//! datagram from a DTLS listener goes through the DTLS session of its address; the decrypted
//! application data reaches the inner core with the peer's proven [`Identity`]
//! (`Peer.identity`), and what the inner core sends to such a peer is encrypted on the way
//! out. One inner core serves both kinds of listener, so a ClientId is one session whichever
//! listener it comes through.
//!
//! The handshakes are `dimpl`'s (pure Rust, sans-IO, time passed in): `PSK_AES128_CCM_8`
//! with `[[psk]]` keys, and `ECDHE_ECDSA` suites with `[dtls] certificate`. A dimpl server is
//! one or the other, so each verified ClientHello picks (PSK when it offers the PSK suite and
//! keys exist). The layer adds what `dimpl` leaves to its user:
//!
//! - **Stateless cookies.** A ClientHello from an address without a session is answered with a
//!   HelloVerifyRequest built here ([`record`]) whose cookie is an HMAC of the listener, the
//!   address and the client random under a secret rotated every [`COOKIE_PERIOD`] (the
//!   previous secret still verifies). Nothing is kept. Only a ClientHello whose cookie
//!   verifies creates a session; `dimpl` is then handed that ClientHello (after a cookie-less
//!   copy that puts it past its own cookie step, whose cookie `keys::CookieHmac` makes the
//!   one already checked).
//! - **Bounds.** At most `max_handshakes` sessions in their handshake and `max_sessions` in
//!   all (a verified ClientHello beyond either is dropped and counted as `table_full`); a
//!   handshake not done within `handshake_timeout` is dropped; an established session silent
//!   for `idle_timeout` is dropped (the inner core's session, bound to the ClientId, is not:
//!   the client handshakes again and goes on).
//! - **Address changes** mean a new handshake: a session is bound to its address (no RFC 9146
//!   connection ids: `dimpl` 0.9 has none). A ClientHello with a valid cookie on the address
//!   of an established session replaces it (a client that restarted, RFC 6347 4.2.8).
//! - **No resumption**: `dimpl` 0.9 does not resume sessions; every handshake is a full one.
//! - **Client certificates** (`client_certificates = "required"`): dimpl hands out the
//!   client's leaf certificate unchecked; the layer verifies it against `client_ca` at the
//!   wall-clock time of an injected clock ([`cert::verify`]) and names the device from it. A
//!   refused client never gets the server's Finished.
//! - **Reload**: [`DatagramCore::reconfigure`] takes new PSK entries, certificates and limits;
//!   new handshakes use them, established sessions keep the keys they were made with.
//! - **Counters** ([`DtlsStats::events`]): handshakes ok and failed by reason, cookies,
//!   sessions open.
//!
//! Invariants: no per-peer state exists before a ClientHello with a valid cookie; key
//! material is never logged; a decrypted datagram reaches the inner core only from an
//! established session, with its identity.

pub mod cert;
pub mod keys;
pub mod record;
pub mod stats;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ring::hmac;
use sensorgate_bridges::message::Qos;

use crate::identity::Identity;
use crate::ingress::{DatagramCore, DownlinkOutcome, Event, Peer, PeerAddr, PublishOutcome};
use crate::observe::model::{ClientQuery, ClientsPage, IngressReport};
use cert::{ClientCertificates, ServerCertificate};
use keys::{COOKIE_HMAC, Capture, Presented, PskEntry, PskTable, Resolver};
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
pub use stats::DtlsStats;
use stats::Failure;

/// How long a cookie secret is the current one; a cookie made with it verifies for up to
/// twice this long.
pub const COOKIE_PERIOD: Duration = Duration::from_secs(30);

/// The longest DTLS datagram taken (a handshake flight's record or a protected datagram).
pub const MAX_DTLS_DATAGRAM: usize = 2048;

/// Datagrams waiting to go out (handshake flights, HelloVerifyRequests, encrypted
/// datagrams) beyond which more are dropped and counted.
const MAX_QUEUED_OUT: usize = 4096;

/// The largest record `dimpl` is asked to write (a protected datagram of the inner core's
/// largest message plus the record overhead fits well below it).
const MTU: usize = 1400;

/// The DTLS settings, validated (`[dtls]`, `[[psk]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DtlsSettings {
    /// `[[psk]]`, in file order (identities unique).
    pub psk: Vec<PskEntry>,
    /// `max_handshakes`: sessions in their handshake at once.
    pub max_handshakes: usize,
    /// `max_sessions`: sessions in all (handshaking or established).
    pub max_sessions: usize,
    /// `handshake_timeout`: from the verified ClientHello to the handshake's end.
    pub handshake_timeout: Duration,
    /// `idle_timeout`: an established session that hears nothing for this long is dropped.
    pub idle_timeout: Duration,
    /// `certificate` and `private_key`: the server's certificate (`None`: PSK only).
    pub certificate: Option<ServerCertificate>,
    /// `client_ca`: the CA certificates client certificates are verified against.
    pub client_ca: Vec<CertificateDer<'static>>,
    /// `client_certificates`.
    pub client_certificates: ClientCertificates,
}

impl Default for DtlsSettings {
    fn default() -> Self {
        DtlsSettings {
            psk: Vec::new(),
            max_handshakes: 1000,
            max_sessions: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            certificate: None,
            client_ca: Vec::new(),
            client_certificates: ClientCertificates::Off,
        }
    }
}

/// What [`Dtls::reconfigure`] takes: the inner core's settings and the DTLS settings, each
/// when it changed.
#[derive(Debug)]
pub struct Settings<S> {
    /// The inner core's (`None`: unchanged).
    pub inner: Option<S>,
    /// The DTLS layer's (`None`: unchanged).
    pub dtls: Option<Arc<DtlsSettings>>,
}

/// Why the DTLS layer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `dimpl` refused its configuration.
    #[error("DTLS configuration refused: {0}")]
    Config(String),
    /// The client CA could not be used.
    #[error("[dtls] client_ca refused: {0}")]
    ClientCa(String),
}

/// A session key: the DTLS listener and the peer's address.
type Key = (u16, SocketAddr);

/// One peer's DTLS session.
struct Session {
    dtls: dimpl::Dtls,
    /// The identity the client proved; set once the handshake is done.
    identity: Option<Arc<Identity>>,
    /// What the client presented in its ClientKeyExchange (for the failure's reason).
    presented: Option<Presented>,
    /// When the handshake must be done (`None` once established).
    handshake_deadline: Option<Instant>,
    /// When the session last heard from its peer.
    last_heard: Instant,
    /// `dimpl`'s own timer (retransmissions).
    timer: Option<Instant>,
    /// The peer closed (close_notify): drop once its answer is out.
    closed: bool,
}

impl Session {
    fn deadline(&self, idle: Duration) -> Instant {
        let end = self
            .handshake_deadline
            .unwrap_or_else(|| self.last_heard + idle);
        self.timer.map_or(end, |t| t.min(end))
    }
}

/// The two cookie secrets in force.
struct Cookies {
    current: hmac::Key,
    previous: hmac::Key,
    /// When `current` stops being current.
    rotate_at: Instant,
}

impl Cookies {
    fn new(now: Instant) -> Self {
        Cookies {
            current: fresh_key(),
            previous: fresh_key(),
            rotate_at: now + COOKIE_PERIOD,
        }
    }

    fn rotate(&mut self, now: Instant) {
        if now >= self.rotate_at {
            self.previous = std::mem::replace(&mut self.current, fresh_key());
            self.rotate_at = now + COOKIE_PERIOD;
        }
    }

    fn cookie(key: &hmac::Key, (listener, addr): Key, random: &[u8; 32]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(key);
        ctx.update(&listener.to_be_bytes());
        match addr {
            SocketAddr::V4(a) => ctx.update(&a.ip().octets()),
            SocketAddr::V6(a) => ctx.update(&a.ip().octets()),
        }
        ctx.update(&addr.port().to_be_bytes());
        ctx.update(random);
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref().get(..32).unwrap_or(&[0; 32]));
        out
    }

    fn verify(&self, key: Key, random: &[u8; 32], cookie: &[u8]) -> Option<[u8; 32]> {
        [&self.current, &self.previous]
            .into_iter()
            .map(|k| Self::cookie(k, key, random))
            .find(|c| ring_eq(c, cookie))
    }
}

fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn fresh_key() -> hmac::Key {
    let rng = ring::rand::SystemRandom::new();
    hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
        // Only when the OS has no RNG (where dimpl cannot make keys either): a key from
        // std's per-process random hasher keys, still unknown to a peer.
        use std::hash::{BuildHasher, Hasher};
        let mut bytes = [0u8; 32];
        for chunk in bytes.chunks_mut(8) {
            let h = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            chunk.copy_from_slice(&h.to_le_bytes());
        }
        hmac::Key::new(hmac::HMAC_SHA256, &bytes)
    })
}

/// A [`DatagramCore`] behind DTLS on some of its listeners (see the module doc).
///
/// Call order: as for any [`DatagramCore`]; `now` is the driver's clock.
pub struct Dtls<C: DatagramCore> {
    inner: C,
    /// The first DTLS listener's index (every listener from it on is DTLS); `None`: no DTLS
    /// listener, every datagram passes straight through.
    first_dtls: Option<u16>,
    settings: Arc<DtlsSettings>,
    /// What new handshakes use (`None` when there is no DTLS listener).
    server: Option<Server>,
    /// The wall clock, for client certificates' validity (the only wall-clock reading).
    wall: fn() -> SystemTime,
    cookies: Cookies,
    sessions: HashMap<Key, Session>,
    /// Sessions still in their handshake.
    handshaking: usize,
    /// Datagrams for DTLS peers (flights, HelloVerifyRequests, protected data).
    out: VecDeque<(Key, Vec<u8>)>,
    /// The earliest session deadline (retransmission, handshake end, idle end).
    next_sweep: Option<Instant>,
    /// `dimpl`'s output buffer.
    buf: Vec<u8>,
    stats: Arc<DtlsStats>,
}

impl<C: DatagramCore> Dtls<C> {
    /// Wraps `inner`; listeners from `first_dtls` on are DTLS (`None`: none is).
    ///
    /// # Errors
    /// [`SetupError`] when `dimpl` refuses the configuration made from `settings`.
    pub fn new(
        inner: C,
        first_dtls: Option<u16>,
        settings: Arc<DtlsSettings>,
        now: Instant,
    ) -> Result<Self, SetupError> {
        let server = match first_dtls {
            Some(_) => Some(Server::new(&settings)?),
            None => None,
        };
        let stats = Arc::new(DtlsStats::default());
        stats.set_identities(settings.psk.len());
        Ok(Dtls {
            inner,
            first_dtls,
            settings,
            server,
            wall: system_time,
            cookies: Cookies::new(now),
            sessions: HashMap::new(),
            handshaking: 0,
            out: VecDeque::new(),
            next_sweep: None,
            buf: vec![0; MTU * 2],
            stats,
        })
    }

    /// Replaces the wall clock client certificates are checked with (tests).
    #[must_use]
    pub fn with_wall_clock(mut self, wall: fn() -> SystemTime) -> Self {
        self.wall = wall;
        self
    }

    /// The layer's counters (shared; read by the admin listener).
    #[must_use]
    pub fn stats(&self) -> Arc<DtlsStats> {
        Arc::clone(&self.stats)
    }

    /// The inner core.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The inner core, mutably (for set-up before the driver runs).
    pub fn inner_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// Sessions now (handshaking and established).
    #[must_use]
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The session key of `addr` if it is a DTLS listener's peer.
    fn dtls_key(&self, addr: &PeerAddr) -> Option<Key> {
        match (addr, self.first_dtls) {
            (PeerAddr::Udp { listener, addr }, Some(first)) if *listener >= first => {
                Some((*listener, *addr))
            }
            _ => None,
        }
    }

    fn push_out(&mut self, key: Key, bytes: Vec<u8>) {
        if self.out.len() >= MAX_QUEUED_OUT {
            self.stats.count_out_dropped();
            return;
        }
        self.out.push_back((key, bytes));
    }

    fn wake_at(&mut self, at: Instant) {
        self.next_sweep = Some(self.next_sweep.map_or(at, |t| t.min(at)));
    }

    /// A datagram from a DTLS listener.
    fn handle_dtls(&mut self, now: Instant, key: Key, datagram: &[u8]) {
        self.cookies.rotate(now);
        let restart = self.sessions.get(&key).is_some_and(|s| {
            s.handshake_deadline.is_none() && record::parse_client_hello(datagram).is_ok()
        });
        if self.sessions.contains_key(&key) && !restart {
            self.feed(now, key, datagram, None);
            return;
        }
        let hello = match record::parse_client_hello(datagram) {
            Ok(hello) => hello,
            Err(error) => {
                self.stats.count_unexpected();
                tracing::trace!(peer = %key.1, %error, "DTLS datagram without a session dropped.");
                return;
            }
        };
        let Some(cookie) = self.cookies.verify(key, hello.random, hello.cookie) else {
            if !hello.cookie.is_empty() {
                self.stats.count_failure(Failure::CookieInvalid);
            }
            let cookie = Cookies::cookie(&self.cookies.current, key, hello.random);
            let mut hvr = Vec::with_capacity(64);
            record::hello_verify_request(hello.record_sequence, &cookie, &mut hvr);
            self.stats.count_hello_verify();
            self.push_out(key, hvr);
            return;
        };
        let replacing = usize::from(restart);
        if self.handshaking >= self.settings.max_handshakes
            || self.sessions.len() - replacing >= self.settings.max_sessions
        {
            self.stats.count_failure(Failure::TableFull);
            tracing::debug!(peer = %key.1, "DTLS handshake refused: table full.");
            return;
        }
        let Some(server) = self.server.clone() else {
            return;
        };
        if restart {
            self.remove(key);
        }
        let Some(mut dtls) = server.session(&hello, now) else {
            return;
        };
        // dimpl makes its server random on its first timeout call; before it, a ClientHello
        // would find none.
        if let Err(error) = dtls.handle_timeout(now) {
            tracing::debug!(%error, "DTLS session could not start.");
            return;
        }
        self.sessions.insert(
            key,
            Session {
                dtls,
                identity: None,
                presented: None,
                handshake_deadline: Some(now + self.settings.handshake_timeout),
                last_heard: now,
                timer: None,
                closed: false,
            },
        );
        self.handshaking += 1;
        self.stats.count_started();
        self.stats.set_open(self.sessions.len(), self.handshaking);
        // Past dimpl's own cookie step (its answer is dropped), then the real ClientHello.
        let bare = hello.without_cookie();
        self.feed(now, key, &bare, Some((cookie, true)));
        self.feed(now, key, datagram, Some((cookie, false)));
    }

    /// Hands `datagram` to `key`'s session and drains it; `cookie` (with whether to drop the
    /// output) while the verified ClientHello is handed over.
    fn feed(&mut self, now: Instant, key: Key, datagram: &[u8], cookie: Option<([u8; 32], bool)>) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let capture = Capture::begin(cookie.map(|(c, _)| c));
        session.last_heard = now;
        let result = session.dtls.handle_packet(datagram);
        if let Some(presented) = capture.presented() {
            session.presented = Some(presented);
        }
        match result {
            Ok(()) => self.drain(now, key, cookie.is_some_and(|(_, discard)| discard)),
            Err(error) => self.fail(key, &error),
        }
        drop(capture);
    }

    /// Drains `key`'s session: packets out (dropped when `discard`), the handshake's end,
    /// application data to the inner core.
    fn drain(&mut self, now: Instant, key: Key, discard: bool) {
        let mut packets: Vec<Vec<u8>> = Vec::new();
        let mut data: Vec<Vec<u8>> = Vec::new();
        let mut connected = false;
        let mut closed = false;
        let mut broken = None;
        let mut peer_cert: Option<Vec<u8>> = None;
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        loop {
            match session.dtls.poll_output(&mut self.buf) {
                dimpl::Output::Packet(p) => packets.push(p.to_vec()),
                dimpl::Output::BufferTooSmall { needed } => {
                    if needed > MAX_DTLS_DATAGRAM * 8 {
                        broken = Some(Failure::Protocol);
                        break;
                    }
                    self.buf.resize(needed, 0);
                }
                dimpl::Output::Timeout(t) => {
                    session.timer = Some(t);
                    break;
                }
                dimpl::Output::Connected => connected = true,
                dimpl::Output::ApplicationData(d) => data.push(d.to_vec()),
                dimpl::Output::CloseNotify => closed = true,
                dimpl::Output::PeerCert(der) => peer_cert = Some(der.to_vec()),
                _ => {}
            }
        }
        let server = self.server.as_ref();
        if let Some(der) = peer_cert
            && let Some(verifier) = server.and_then(|s| s.verifier.as_ref())
        {
            match cert::verify(verifier.as_ref(), &der, (self.wall)()) {
                Ok(identity) => session.presented = Some(Presented::Certificate(identity)),
                Err(reason) => {
                    tracing::debug!(peer = %key.1, %reason, "DTLS client certificate refused.");
                    broken = Some(Failure::CertificateInvalid);
                }
            }
        }
        if connected && session.handshake_deadline.is_some() && broken.is_none() {
            match session.presented.take() {
                Some(Presented::Known(identity) | Presented::Certificate(identity)) => {
                    tracing::debug!(
                        peer = %key.1, identity = %identity.name,
                        source = identity.source.as_str(),
                        "DTLS handshake done."
                    );
                    session.identity = Some(identity);
                    session.handshake_deadline = None;
                }
                // A certificate-suite client where none is required: encrypted, no identity.
                _ if server.is_some_and(|s| !s.identity_required) => {
                    tracing::debug!(peer = %key.1, "DTLS handshake done (no client identity).");
                    session.handshake_deadline = None;
                }
                // No identity was proven though one is required: refuse it.
                _ => broken = Some(Failure::Protocol),
            }
        }
        if closed {
            session.closed = true;
        }
        let deadline = session.deadline(self.settings.idle_timeout);
        let identity = session.identity.clone();
        let established = session.handshake_deadline.is_none();
        if connected && established && broken.is_none() {
            self.handshaking = self.handshaking.saturating_sub(1);
            self.stats.count_ok();
            self.stats.set_open(self.sessions.len(), self.handshaking);
        }
        if let Some(failure) = broken {
            // Nothing more goes out: a refused client never sees the server's Finished.
            self.stats.count_failure(failure);
            self.remove(key);
            return;
        }
        if !discard {
            for p in packets {
                self.push_out(key, p);
            }
        }
        self.wake_at(deadline);
        if established {
            let limit = self.inner.max_datagram_size() + 1;
            for d in data {
                let peer = Peer {
                    addr: PeerAddr::Udp {
                        listener: key.0,
                        addr: key.1,
                    },
                    node: None,
                    identity: identity.clone(),
                };
                self.inner
                    .handle_datagram(now, peer, d.get(..limit).unwrap_or(&d));
            }
        }
        if closed {
            self.stats.count_closed();
            self.remove(key);
        }
    }

    /// Ends `key`'s session after a `dimpl` error, counting why.
    fn fail(&mut self, key: Key, error: &dimpl::Error) {
        let Some(session) = self.sessions.get(&key) else {
            return;
        };
        let failure = if session.handshake_deadline.is_none() {
            Failure::Established
        } else {
            match (&session.presented, error) {
                (Some(Presented::Unknown), _) => Failure::UnknownIdentity,
                (_, dimpl::Error::Timeout(_)) => Failure::Timeout,
                (Some(Presented::Known(_)), _) => Failure::BadKey,
                (Some(Presented::Certificate(_)) | None, _) => Failure::Protocol,
            }
        };
        tracing::debug!(peer = %key.1, reason = failure.as_str(), %error, "DTLS session failed.");
        self.stats.count_failure(failure);
        self.remove(key);
    }

    fn remove(&mut self, key: Key) {
        if let Some(session) = self.sessions.remove(&key)
            && session.handshake_deadline.is_some()
        {
            self.handshaking = self.handshaking.saturating_sub(1);
        }
        self.stats.set_open(self.sessions.len(), self.handshaking);
    }

    /// Runs the sessions' timers due at `now`; ends handshakes and idle sessions past their
    /// time.
    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|t| now < t) {
            return;
        }
        self.next_sweep = None;
        let idle = self.settings.idle_timeout;
        let keys: Vec<Key> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.deadline(idle) <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(session) = self.sessions.get_mut(&key) else {
                continue;
            };
            match session.handshake_deadline {
                Some(end) if end <= now => {
                    self.stats.count_failure(Failure::Timeout);
                    tracing::debug!(peer = %key.1, "DTLS handshake timed out.");
                    self.remove(key);
                    continue;
                }
                None if session.last_heard + idle <= now => {
                    self.stats.count_idle();
                    tracing::debug!(peer = %key.1, "DTLS session idle; dropped.");
                    self.remove(key);
                    continue;
                }
                _ => {}
            }
            if session.timer.is_some_and(|t| t <= now) {
                session.timer = None;
                match session.dtls.handle_timeout(now) {
                    Ok(()) => self.drain(now, key, false),
                    Err(error) => self.fail(key, &error),
                }
            }
        }
        // Whatever was not due still has its deadline.
        let next = self.sessions.values().map(|s| s.deadline(idle)).min();
        if let Some(next) = next {
            self.wake_at(next);
        }
    }
}

/// `TLS_PSK_WITH_AES_128_CCM_8`, the PSK suite dimpl serves.
const PSK_AES128_CCM_8: u16 = 0xc0a8;

/// What new handshakes are made with. dimpl's server is either a PSK server or a
/// certificate one, so the ClientHello's suites pick which (PSK when it offers the PSK suite
/// and keys are configured).
#[derive(Clone)]
struct Server {
    /// The PSK server's configuration (`None`: no `[[psk]]`).
    psk: Option<Arc<dimpl::Config>>,
    /// The certificate server's configuration and certificate (`None`: no certificate).
    cert: Option<(Arc<dimpl::Config>, dimpl::DtlsCertificate)>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// A session must end with a proven identity (false only with certificates and
    /// `client_certificates = "off"`).
    identity_required: bool,
}

impl Server {
    fn new(settings: &DtlsSettings) -> Result<Self, SetupError> {
        let required = settings.client_certificates == ClientCertificates::Required;
        let verifier = if required {
            Some(cert::verifier(&settings.client_ca).map_err(SetupError::ClientCa)?)
        } else {
            None
        };
        let psk = if settings.psk.is_empty() {
            None
        } else {
            Some(server_config(settings, true)?)
        };
        let cert = match &settings.certificate {
            Some(c) => Some((server_config(settings, false)?, c.for_dimpl())),
            None => None,
        };
        Ok(Server {
            psk,
            cert,
            verifier,
            identity_required: settings.certificate.is_none() || required,
        })
    }

    /// A server session for `hello`; `None` when nothing configured can answer it.
    fn session(&self, hello: &record::ClientHello<'_>, now: Instant) -> Option<dimpl::Dtls> {
        match (&self.psk, &self.cert) {
            (Some(psk), _) if hello.offers_suite(PSK_AES128_CCM_8) => {
                Some(dimpl::Dtls::new_12_psk(Arc::clone(psk), now))
            }
            (_, Some((config, c))) => Some(dimpl::Dtls::new_12(Arc::clone(config), c.clone(), now)),
            // A PSK server that will find no common suite (the handshake fails and is
            // counted).
            (Some(psk), None) => Some(dimpl::Dtls::new_12_psk(Arc::clone(psk), now)),
            (None, None) => None,
        }
    }
}

/// The wall clock ([`Dtls::with_wall_clock`] replaces it in tests).
#[allow(clippy::disallowed_methods)]
fn system_time() -> SystemTime {
    SystemTime::now()
}

/// `dimpl`'s server configuration for `settings`: the PSK server's (`psk`) or the certificate
/// server's.
fn server_config(settings: &DtlsSettings, psk: bool) -> Result<Arc<dimpl::Config>, SetupError> {
    let mut provider = dimpl::crypto::rust_crypto::default_provider();
    provider.hmac_provider = &COOKIE_HMAC;
    let resolver = Resolver(Arc::new(PskTable::new(&settings.psk)));
    let builder = dimpl::Config::builder()
        .with_crypto_provider(provider)
        .use_server_cookie(true)
        .mtu(MTU)
        .handshake_timeout(settings.handshake_timeout)
        .require_client_certificate(settings.client_certificates == ClientCertificates::Required);
    let builder = if psk {
        builder.with_psk_server(None, Arc::new(resolver))
    } else {
        builder
    };
    builder
        .build()
        .map(Arc::new)
        .map_err(|e| SetupError::Config(e.to_string()))
}

impl<C: DatagramCore> DatagramCore for Dtls<C> {
    const NAME: &'static str = C::NAME;

    type Settings = Settings<C::Settings>;

    fn reconfigure(&mut self, now: Instant, settings: Self::Settings) -> Vec<String> {
        let mut notes = match settings.inner {
            Some(inner) => self.inner.reconfigure(now, inner),
            None => Vec::new(),
        };
        if let Some(dtls) = settings.dtls.filter(|d| **d != *self.settings) {
            if self.first_dtls.is_some() {
                match Server::new(&dtls) {
                    Ok(server) => self.server = Some(server),
                    Err(error) => {
                        notes.push(format!("DTLS settings kept: {error}"));
                        return notes;
                    }
                }
                notes.push(format!(
                    "DTLS: {} PSK identities for new handshakes; {} established sessions keep \
                     their keys",
                    dtls.psk.len(),
                    self.sessions.len() - self.handshaking
                ));
            }
            self.stats.set_identities(dtls.psk.len());
            self.settings = dtls;
        }
        notes
    }

    fn max_datagram_size(&self) -> usize {
        let inner = self.inner.max_datagram_size();
        match self.first_dtls {
            Some(_) => inner.max(MAX_DTLS_DATAGRAM),
            None => inner,
        }
    }

    fn handle_datagram(&mut self, now: Instant, peer: Peer, datagram: &[u8]) {
        match self.dtls_key(&peer.addr) {
            None => {
                let limit = self.inner.max_datagram_size() + 1;
                let datagram = datagram.get(..limit).unwrap_or(datagram);
                self.inner.handle_datagram(now, peer, datagram);
            }
            Some(key) => self.handle_dtls(now, key, datagram),
        }
    }

    fn handle_publish_result(&mut self, now: Instant, token: u64, outcome: PublishOutcome) {
        self.inner.handle_publish_result(now, token, outcome);
    }

    fn handle_subscribe_result(&mut self, now: Instant, filter: &str, accepted: bool) {
        self.inner.handle_subscribe_result(now, filter, accepted);
    }

    fn handle_downlink(
        &mut self,
        now: Instant,
        topic: &str,
        payload: Bytes,
        qos: Qos,
        retain: bool,
        filters: Option<&[Arc<str>]>,
    ) -> DownlinkOutcome {
        self.inner
            .handle_downlink(now, topic, payload, qos, retain, filters)
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.cookies.rotate(now);
        self.sweep(now);
        self.inner.handle_timeout(now);
    }

    fn set_upstream_available(&mut self, available: bool) {
        self.inner.set_upstream_available(available);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match (self.inner.poll_timeout(), self.next_sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Peer> {
        loop {
            if let Some(((listener, addr), bytes)) = self.out.pop_front() {
                buf.clear();
                buf.extend_from_slice(&bytes);
                return Some(Peer::udp(listener, addr));
            }
            let peer = self.inner.poll_transmit(buf)?;
            let Some(key) = self.dtls_key(&peer.addr) else {
                return Some(peer);
            };
            let Some(session) = self
                .sessions
                .get_mut(&key)
                .filter(|s| s.handshake_deadline.is_none() && !s.closed)
            else {
                self.stats.count_no_session();
                continue;
            };
            if let Err(error) = session.dtls.send_application_data(buf) {
                self.fail(key, &error);
                continue;
            }
            loop {
                match session.dtls.poll_output(&mut self.buf) {
                    dimpl::Output::Packet(p) => {
                        if self.out.len() < MAX_QUEUED_OUT {
                            self.out.push_back((key, p.to_vec()));
                        } else {
                            self.stats.count_out_dropped();
                        }
                    }
                    dimpl::Output::BufferTooSmall { needed } if needed <= MAX_DTLS_DATAGRAM * 8 => {
                        self.buf.resize(needed, 0);
                    }
                    dimpl::Output::Timeout(t) => {
                        session.timer = Some(t);
                        break;
                    }
                    dimpl::Output::BufferTooSmall { .. } => break,
                    // Nothing comes in while sending; anything else waits for the next input.
                    _ => {}
                }
            }
        }
    }

    fn poll_event(&mut self) -> Option<Event> {
        self.inner.poll_event()
    }

    fn take_persist_changes(&mut self, out: &mut Vec<crate::ingress::PersistChange>) {
        self.inner.take_persist_changes(out);
    }

    fn report(&self) -> IngressReport {
        self.inner.report()
    }

    fn clients(&self, now: Instant, query: &ClientQuery) -> ClientsPage {
        self.inner.clients(now, query)
    }
}

#[cfg(test)]
mod tests;
