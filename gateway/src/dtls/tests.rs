#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
//! The layer against `dimpl`'s own client, on a virtual clock: handshakes, data both ways with
//! the identity, stateless cookies, wrong keys and unknown identities, bounds and timeouts.

use std::net::{Ipv4Addr, SocketAddr};

use super::keys::PskKey;
use super::stats::Failure;
use super::*;

/// The virtual clock's origin (the only real reading; every later time is derived from it).
#[allow(clippy::disallowed_methods)]
fn t0() -> Instant {
    Instant::now()
}

/// An inner core that records what it gets and echoes it back with a `>` prefix.
#[derive(Default)]
struct Echo {
    got: Vec<(Peer, Vec<u8>)>,
    out: VecDeque<(Peer, Vec<u8>)>,
}

impl DatagramCore for Echo {
    const NAME: &'static str = "echo";
    type Settings = ();

    fn reconfigure(&mut self, _now: Instant, _settings: ()) -> Vec<String> {
        Vec::new()
    }
    fn max_datagram_size(&self) -> usize {
        256
    }
    fn handle_datagram(&mut self, _now: Instant, peer: Peer, datagram: &[u8]) {
        self.got.push((peer.clone(), datagram.to_vec()));
        let mut reply = b">".to_vec();
        reply.extend_from_slice(datagram);
        self.out.push_back((peer, reply));
    }
    fn handle_publish_result(&mut self, _: Instant, _: u64, _: PublishOutcome) {}
    fn handle_downlink(
        &mut self,
        _: Instant,
        _: &str,
        _: Bytes,
        _: Qos,
        _: bool,
        _: Option<&[Arc<str>]>,
    ) -> DownlinkOutcome {
        DownlinkOutcome::default()
    }
    fn handle_timeout(&mut self, _: Instant) {}
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Peer> {
        let (peer, bytes) = self.out.pop_front()?;
        buf.clear();
        buf.extend_from_slice(&bytes);
        Some(peer)
    }
    fn poll_event(&mut self) -> Option<Event> {
        None
    }
    fn report(&self) -> IngressReport {
        IngressReport {
            protocol: "echo",
            sessions: Default::default(),
            counters: Default::default(),
        }
    }
    fn clients(&self, _: Instant, _: &ClientQuery) -> ClientsPage {
        ClientsPage::default()
    }
}

fn settings() -> Arc<DtlsSettings> {
    Arc::new(DtlsSettings {
        psk: vec![PskEntry {
            identity: "dev1".into(),
            key: PskKey::new(b"s3cret".to_vec()),
            client_ids: Arc::from(vec![Arc::<str>::from("dev1")]),
        }],
        max_handshakes: 2,
        max_sessions: 3,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        ..DtlsSettings::default()
    })
}

struct ClientKey(&'static [u8]);

impl dimpl::PskResolver for ClientKey {
    fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
        Some(self.0.to_vec())
    }
}

fn client(identity: &str, key: &'static [u8], now: Instant) -> dimpl::Dtls {
    let config = dimpl::Config::builder()
        .with_crypto_provider(dimpl::crypto::rust_crypto::default_provider())
        .with_psk_client(identity.as_bytes().to_vec(), Arc::new(ClientKey(key)))
        .build()
        .unwrap();
    let mut c = dimpl::Dtls::new_12_psk(Arc::new(config), now);
    c.set_active(true);
    c
}

/// Listener 0 plain, listener 1 DTLS.
fn layer(now: Instant) -> Dtls<Echo> {
    Dtls::new(Echo::default(), Some(1), settings(), now).unwrap()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Client output: packets, and data received.
fn drain_client(c: &mut dimpl::Dtls) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, bool) {
    let mut buf = vec![0u8; 4096];
    let (mut packets, mut data, mut connected) = (Vec::new(), Vec::new(), false);
    loop {
        match c.poll_output(&mut buf) {
            dimpl::Output::Packet(p) => packets.push(p.to_vec()),
            dimpl::Output::ApplicationData(d) => data.push(d.to_vec()),
            dimpl::Output::Connected => connected = true,
            dimpl::Output::Timeout(_) => break,
            _ => {}
        }
    }
    (packets, data, connected)
}

fn drain_layer(l: &mut Dtls<Echo>) -> Vec<(Peer, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(peer) = l.poll_transmit(&mut buf) {
        out.push((peer, buf.clone()));
    }
    out
}

/// Runs client and layer against each other until quiet; returns whether the client
/// connected, and the data it received.
fn run(l: &mut Dtls<Echo>, c: &mut dimpl::Dtls, port: u16, now: Instant) -> (bool, Vec<Vec<u8>>) {
    let (mut connected, mut data) = (false, Vec::new());
    c.handle_timeout(now).unwrap();
    for _ in 0..20 {
        let (packets, got, conn) = drain_client(c);
        connected |= conn;
        data.extend(got);
        if packets.is_empty() {
            break;
        }
        for p in packets {
            l.handle_datagram(now, Peer::udp(1, addr(port)), &p);
        }
        for (peer, bytes) in drain_layer(l) {
            assert_eq!(
                peer.addr,
                PeerAddr::Udp {
                    listener: 1,
                    addr: addr(port)
                }
            );
            if c.handle_packet(&bytes).is_err() {
                return (false, data);
            }
        }
    }
    (connected, data)
}

#[test]
fn a_psk_handshake_carries_data_both_ways_with_the_identity() {
    let now = t0();
    let mut l = layer(now);
    let mut c = client("dev1", b"s3cret", now);
    let (connected, _) = run(&mut l, &mut c, 5000, now);
    assert!(connected);
    let stats = l.stats();
    assert_eq!(stats.handshakes_ok(), 1);
    c.send_application_data(b"hello").unwrap();
    let (_, data) = run(&mut l, &mut c, 5000, now);
    assert_eq!(data, vec![b">hello".to_vec()]);
    let (peer, bytes) = &l.inner().got[0];
    assert_eq!(bytes, b"hello");
    let identity = peer.identity.as_ref().unwrap();
    assert_eq!(&*identity.name, "dev1");
    assert_eq!(identity.source, crate::identity::IdentitySource::Psk);
    assert!(identity.allows_client_id("dev1") && !identity.allows_client_id("dev2"));
}

#[test]
fn a_first_client_hello_gets_a_cookie_and_leaves_no_state() {
    let now = t0();
    let mut l = layer(now);
    for port in 6000..6020 {
        let mut c = client("dev1", b"s3cret", now);
        c.handle_timeout(now).unwrap();
        let (packets, _, _) = drain_client(&mut c);
        for p in packets {
            l.handle_datagram(now, Peer::udp(1, addr(port)), &p);
        }
        let out = drain_layer(&mut l);
        assert_eq!(out.len(), 1, "one HelloVerifyRequest");
        assert_eq!(out[0].1[13], 3, "HelloVerifyRequest");
    }
    assert_eq!(l.sessions(), 0);
    assert_eq!(l.poll_timeout(), None);
    let events: HashMap<_, _> = l.stats().events().into_iter().collect();
    assert_eq!(events["dtls_hello_verify_sent"], 20);
    assert_eq!(events["dtls_sessions_open"], 0);
}

#[test]
fn a_cookie_from_another_address_is_refused() {
    let now = t0();
    let mut l = layer(now);
    let mut c = client("dev1", b"s3cret", now);
    c.handle_timeout(now).unwrap();
    let (packets, _, _) = drain_client(&mut c);
    l.handle_datagram(now, Peer::udp(1, addr(7000)), &packets[0]);
    let hvr = drain_layer(&mut l).remove(0).1;
    c.handle_packet(&hvr).unwrap();
    let (second, _, _) = drain_client(&mut c);
    // The cookie'd ClientHello from another port: another HelloVerifyRequest, no session.
    l.handle_datagram(now, Peer::udp(1, addr(7001)), &second[0]);
    assert_eq!(l.sessions(), 0);
    assert_eq!(l.stats().failed(Failure::CookieInvalid), 1);
    // From the right address it is taken.
    l.handle_datagram(now, Peer::udp(1, addr(7000)), &second[0]);
    assert_eq!(l.sessions(), 1);
}

#[test]
fn a_wrong_key_and_an_unknown_identity_are_refused_and_counted() {
    let now = t0();
    let mut l = layer(now);
    let mut c = client("dev1", b"wrong", now);
    assert!(!run(&mut l, &mut c, 5001, now).0);
    let mut c = client("nobody", b"s3cret", now);
    assert!(!run(&mut l, &mut c, 5002, now).0);
    let stats = l.stats();
    assert_eq!(stats.failed(Failure::BadKey), 1);
    assert_eq!(stats.failed(Failure::UnknownIdentity), 1);
    assert_eq!(stats.handshakes_ok(), 0);
    assert_eq!(l.sessions(), 0);
    assert!(l.inner().got.is_empty());
}

#[test]
fn plain_listeners_pass_straight_through() {
    let now = t0();
    let mut l = layer(now);
    l.handle_datagram(now, Peer::udp(0, addr(5003)), b"plain");
    assert_eq!(l.inner().got[0].1, b"plain");
    assert!(l.inner().got[0].0.identity.is_none());
    let out = drain_layer(&mut l);
    assert_eq!(out, vec![(Peer::udp(0, addr(5003)), b">plain".to_vec())]);
}

#[test]
fn half_open_handshakes_time_out_and_the_table_is_bounded() {
    let now = t0();
    let mut l = layer(now);
    // Three clients stop after their cookie'd ClientHello: max_handshakes is 2.
    for port in 8000..8003 {
        let mut c = client("dev1", b"s3cret", now);
        c.handle_timeout(now).unwrap();
        let (p, _, _) = drain_client(&mut c);
        l.handle_datagram(now, Peer::udp(1, addr(port)), &p[0]);
        let hvr = drain_layer(&mut l).remove(0).1;
        c.handle_packet(&hvr).unwrap();
        let (p, _, _) = drain_client(&mut c);
        l.handle_datagram(now, Peer::udp(1, addr(port)), &p[0]);
        drain_layer(&mut l);
    }
    assert_eq!(l.sessions(), 2);
    assert_eq!(l.stats().failed(Failure::TableFull), 1);
    // Retransmissions until the handshake timeout, then nothing is left.
    let mut t = now;
    while let Some(next) = l.poll_timeout() {
        assert!(next <= now + Duration::from_secs(11), "{:?}", next - now);
        t = next.max(t);
        l.handle_timeout(t);
        drain_layer(&mut l);
    }
    assert_eq!(l.sessions(), 0);
    assert_eq!(l.stats().failed(Failure::Timeout), 2);
}

#[test]
fn an_idle_session_is_dropped_and_the_client_can_come_back() {
    let now = t0();
    let mut l = layer(now);
    let mut c = client("dev1", b"s3cret", now);
    assert!(run(&mut l, &mut c, 5004, now).0);
    let later = now + Duration::from_secs(61);
    let mut t = now;
    while let Some(next) = l.poll_timeout().filter(|n| *n <= later) {
        t = next.max(t);
        l.handle_timeout(t);
        drain_layer(&mut l);
    }
    l.handle_timeout(later);
    assert_eq!(l.sessions(), 0);
    // The inner core's answer to a peer without a session is counted and dropped.
    l.inner_mut()
        .out
        .push_back((Peer::udp(1, addr(5004)), b"late".to_vec()));
    assert!(drain_layer(&mut l).is_empty());
    let mut c = client("dev1", b"s3cret", later);
    assert!(run(&mut l, &mut c, 5004, later).0);
}

#[test]
fn a_reload_changes_keys_for_new_handshakes_only() {
    let now = t0();
    let mut l = layer(now);
    let mut old = client("dev1", b"s3cret", now);
    assert!(run(&mut l, &mut old, 5005, now).0);
    let mut changed = (*settings()).clone();
    changed.psk[0].key = PskKey::new(b"n3w".to_vec());
    let notes = l.reconfigure(
        now,
        Settings {
            inner: None,
            dtls: Some(Arc::new(changed)),
        },
    );
    assert!(
        notes.iter().any(|n| n.contains("1 established")),
        "{notes:?}"
    );
    old.send_application_data(b"still").unwrap();
    assert_eq!(run(&mut l, &mut old, 5005, now).1, vec![b">still".to_vec()]);
    let mut stale = client("dev1", b"s3cret", now);
    assert!(!run(&mut l, &mut stale, 5006, now).0);
    let mut fresh = client("dev1", b"n3w", now);
    assert!(run(&mut l, &mut fresh, 5007, now).0);
}

mod certificates {
    use std::path::Path;
    use std::time::SystemTime;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::*;
    use crate::dtls::cert::{self, ClientCertificates, ServerCertificate};
    use crate::http::tls::test_pki;

    fn der_cert(path: &Path) -> Vec<u8> {
        CertificateDer::from_pem_file(path).unwrap().to_vec()
    }

    fn der_key(path: &Path) -> Vec<u8> {
        PrivateKeyDer::from_pem_file(path)
            .unwrap()
            .secret_der()
            .to_vec()
    }

    fn layer(pki: &test_pki::Pki, now: Instant) -> Dtls<Echo> {
        let mut s = (*settings()).clone();
        s.certificate = Some(ServerCertificate {
            certificate: Arc::from(der_cert(&pki.server_cert)),
            private_key: cert::load_private_key(&pki.server_key).unwrap(),
        });
        s.client_ca = cert::load_certificates(&pki.ca).unwrap();
        s.client_certificates = ClientCertificates::Required;
        Dtls::new(Echo::default(), Some(1), Arc::new(s), now).unwrap()
    }

    fn cert_client(cert: &Path, key: &Path, now: Instant) -> dimpl::Dtls {
        let config = dimpl::Config::builder()
            .with_crypto_provider(dimpl::crypto::rust_crypto::default_provider())
            .build()
            .unwrap();
        let mut c = dimpl::Dtls::new_12(
            Arc::new(config),
            dimpl::DtlsCertificate {
                certificate: der_cert(cert),
                private_key: der_key(key),
            },
            now,
        );
        c.set_active(true);
        c
    }

    #[test]
    fn a_client_certificate_of_the_ca_proves_its_subject() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let now = t0();
        let mut l = layer(&pki, now);
        let mut c = cert_client(&pki.client_cert, &pki.client_key, now);
        assert!(run(&mut l, &mut c, 9000, now).0);
        c.send_application_data(b"hi").unwrap();
        run(&mut l, &mut c, 9000, now);
        let identity = l.inner().got[0].0.identity.clone().unwrap();
        assert_eq!(&*identity.name, "dev1");
        assert_eq!(
            identity.source,
            crate::identity::IdentitySource::Certificate
        );
        // PSK clients still get in beside certificates.
        let mut p = client("dev1", b"s3cret", now);
        assert!(run(&mut l, &mut p, 9001, now).0);
    }

    #[test]
    fn a_wrongly_signed_or_expired_client_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let now = t0();
        let mut l = layer(&pki, now);
        let mut c = cert_client(&pki.stranger_cert, &pki.stranger_key, now);
        assert!(!run(&mut l, &mut c, 9002, now).0);
        assert_eq!(l.stats().failed(Failure::CertificateInvalid), 1);
        // The test PKI's certificates are valid for 30 days: 60 days on, expired.
        #[allow(clippy::disallowed_methods)]
        fn later() -> SystemTime {
            SystemTime::now() + Duration::from_secs(60 * 24 * 3600)
        }
        let mut l = layer(&pki, now).with_wall_clock(later);
        let mut c = cert_client(&pki.client_cert, &pki.client_key, now);
        assert!(!run(&mut l, &mut c, 9003, now).0);
        assert_eq!(l.stats().failed(Failure::CertificateInvalid), 1);
        assert!(l.inner().got.is_empty());
    }
}
