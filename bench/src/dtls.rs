//! The DTLS 1.2 client side of the load generator: `dimpl` (sans-IO, the RustCrypto backend,
//! the suite the gateway's RFC 7925 profile requires, `PSK_AES128_CCM_8`) driven from the
//! harness's tokio UDP sockets. The harness's own code, not the gateway's: the gateway's DTLS
//! layer (`gateway/src/dtls`) is what is measured, so nothing of it is reused here.
//!
//! ```text
//! handshake(): ClientHello ─> HelloVerifyRequest (cookie) ─> ClientHello + cookie
//!              ─> ServerHello .. ServerHelloDone ─> ClientKeyExchange, CCS, Finished
//!              ─> CCS, Finished: connected           (dimpl retransmits lost flights)
//! Link::send / send_batch: one MQTT-SN packet per record, one record per datagram
//! Link::recv: datagram ─> records ─> MQTT-SN packets, one at a time
//! ```
//!
//! A client sends one MQTT-SN packet per datagram, as over plain UDP (a datagram is polled out
//! of `dimpl` after each record, so it never packs two). A handshake is bounded by its
//! deadline (`dimpl`'s timers resend lost flights within it); `Link::recv` waits like a
//! socket's `recv`, so its callers bound it, as they do over plain UDP.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use dimpl::crypto::{Dtls12CipherSuite, SupportedDtls12CipherSuite};
use tokio::net::UdpSocket;

/// The largest datagram read or written (the gateway's DTLS layer takes up to 2048 bytes).
const MAX_DATAGRAM: usize = 2048;

/// Decrypted packets kept for [`Link::recv`] beyond which more are dropped (a datagram holds
/// a handful of records at most).
const MAX_PENDING: usize = 64;

/// The bench's pre-shared key (in hex in the gateway's `[[psk]] key_hex`): 16 bytes, as
/// `openssl rand -hex 16` makes.
pub const BENCH_KEY: [u8; 16] = *b"sg-bench-psk-key";

/// `BENCH_KEY` in hex.
#[must_use]
pub fn bench_key_hex() -> String {
    BENCH_KEY.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `[[psk]]` table per identity (each identity is its only ClientId), with [`BENCH_KEY`].
#[must_use]
pub fn psk_tables<I: IntoIterator<Item = String>>(identities: I) -> String {
    let key = bench_key_hex();
    let mut out = String::new();
    for id in identities {
        out.push_str(&format!(
            "[[psk]]\nidentity = \"{id}\"\nkey_hex = \"{key}\"\n"
        ));
    }
    out
}

/// The same key for every identity.
struct Key(Vec<u8>);

impl dimpl::PskResolver for Key {
    fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
        Some(self.0.clone())
    }
}

/// RustCrypto's provider cut down to what a PSK client uses: the `PSK_AES128_CCM_8` suite and
/// no key exchange groups. `dimpl` checks a provider each time a configuration is built, with
/// an ECDSA verification per certificate suite and an ECDH exchange per group; with the whole
/// provider that is milliseconds of CPU per client (each client's identity needs its own
/// configuration), which would make the harness, not the gateway, the handshakes' limit.
fn psk_provider() -> anyhow::Result<dimpl::crypto::CryptoProvider> {
    static PSK_SUITES: OnceLock<Option<&'static [&'static dyn SupportedDtls12CipherSuite]>> =
        OnceLock::new();
    let mut provider = dimpl::crypto::rust_crypto::default_provider();
    let suites = PSK_SUITES
        .get_or_init(|| {
            let psk = provider
                .cipher_suites
                .iter()
                .copied()
                .find(|cs| cs.suite() == Dtls12CipherSuite::PSK_AES128_CCM_8)?;
            // Once per process: the provider wants a `'static` slice.
            Some(&*Box::leak(Box::new([psk])))
        })
        .context("the RustCrypto provider has no PSK_AES128_CCM_8")?;
    provider.cipher_suites = suites;
    provider.kx_groups = &[];
    Ok(provider)
}

/// A PSK client configuration for `identity`: `PSK_AES128_CCM_8` only (no DTLS 1.3),
/// `dimpl`'s default retransmission timers (first flight again after 1 s, doubling).
///
/// # Errors
/// When `dimpl` refuses the configuration.
pub fn client_config(identity: &str, key: &[u8]) -> anyhow::Result<Arc<dimpl::Config>> {
    let config = dimpl::Config::builder()
        .with_crypto_provider(psk_provider()?)
        .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
        .dtls13_cipher_suites(&[])
        .with_psk_client(identity.as_bytes().to_vec(), Arc::new(Key(key.to_vec())))
        .build()
        .map_err(|e| anyhow::anyhow!("dimpl client config: {e}"))?;
    Ok(Arc::new(config))
}

/// A client's way to the gateway: a connected UDP socket, plain or with a DTLS session.
pub enum Link {
    /// MQTT-SN straight over UDP.
    Plain(UdpSocket),
    /// MQTT-SN in DTLS records.
    Dtls(Box<DtlsLink>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::Plain(_) => f.write_str("Link::Plain"),
            Link::Dtls(_) => f.write_str("Link::Dtls"),
        }
    }
}

impl Link {
    /// Sends one MQTT-SN packet.
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        match self {
            Link::Plain(sock) => sock.send(packet).await.map(drop),
            Link::Dtls(d) => d.send(packet).await,
        }
    }

    /// Sends `packets`, each in its own datagram, with as few `sendmmsg` calls as the socket
    /// allows.
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn send_batch(&mut self, packets: &[Vec<u8>]) -> io::Result<()> {
        match self {
            Link::Plain(sock) => crate::generator::send_batch(sock, packets).await,
            Link::Dtls(d) => {
                d.seal_all(packets)?;
                crate::generator::send_batch(&d.sock, &d.sealed).await
            }
        }
    }

    /// The next MQTT-SN packet into `buf`; its length. Cancel-safe: a packet decrypted but not
    /// yet returned stays for the next call.
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(sock) => sock.recv(buf).await,
            Link::Dtls(d) => d.recv(buf).await,
        }
    }

    /// Ends the DTLS session with a `close_notify` (nothing for plain UDP), best effort.
    pub fn close(&mut self) {
        if let Link::Dtls(d) = self {
            d.close();
        }
    }
}

/// An established DTLS session on a connected socket.
pub struct DtlsLink {
    sock: UdpSocket,
    dtls: dimpl::Dtls,
    /// Scratch for `dimpl`'s output.
    out: Vec<u8>,
    /// Scratch for received datagrams.
    raw: Vec<u8>,
    /// Decrypted packets not yet returned by [`DtlsLink::recv`].
    pending: VecDeque<Vec<u8>>,
    /// Sealed datagrams of the last [`Link::send_batch`] (buffers reused).
    sealed: Vec<Vec<u8>>,
    /// The gateway sent `close_notify`.
    pub closed_by_peer: bool,
}

/// Times of one handshake.
#[derive(Debug, Clone, Copy)]
pub struct Handshake {
    /// First ClientHello sent to `Connected`.
    pub took: Duration,
    /// Flights `dimpl` sent again (its retransmission timer fired).
    pub timer_fired: u32,
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// `dimpl` gave up or the gateway's answer was refused.
    #[error("DTLS: {0}")]
    Dtls(String),
    /// Not done by the deadline.
    #[error("no handshake within the deadline")]
    Timeout,
}

/// Runs a full DTLS 1.2 PSK handshake on `sock` (connected to the gateway's DTLS listener),
/// cookie round trip included, until `deadline`.
///
/// # Errors
/// See [`HandshakeError`].
pub async fn handshake(
    sock: UdpSocket,
    config: Arc<dimpl::Config>,
    deadline: Instant,
) -> Result<(DtlsLink, Handshake), HandshakeError> {
    let start = Instant::now();
    let mut dtls = dimpl::Dtls::new_12_psk(config, start);
    dtls.set_active(true);
    dtls.handle_timeout(start)
        .map_err(|e| HandshakeError::Dtls(e.to_string()))?;
    let mut link = DtlsLink {
        sock,
        dtls,
        out: vec![0u8; MAX_DATAGRAM],
        raw: vec![0u8; MAX_DATAGRAM],
        pending: VecDeque::new(),
        sealed: Vec::new(),
        closed_by_peer: false,
    };
    let mut timer_fired = 0u32;
    loop {
        let (connected, wake) = link.flush().await?;
        if connected {
            let took = start.elapsed();
            return Ok((link, Handshake { took, timer_fired }));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(HandshakeError::Timeout);
        }
        let until = wake.map_or(deadline, |w| w.min(deadline));
        let received = tokio::time::timeout_at(
            tokio::time::Instant::from_std(until),
            link.sock.recv(&mut link.raw),
        )
        .await;
        let now = Instant::now();
        link.dtls
            .handle_timeout(now)
            .map_err(|e| HandshakeError::Dtls(e.to_string()))?;
        match received {
            Ok(Ok(n)) => {
                let datagram = link.raw.get(..n).unwrap_or_default();
                link.dtls
                    .handle_packet(datagram)
                    .map_err(|e| HandshakeError::Dtls(e.to_string()))?;
            }
            // The gateway's port is not open (ICMP port unreachable): try again on the timer.
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                if wake.is_some_and(|w| w <= now) {
                    timer_fired += 1;
                }
            }
        }
    }
}

impl DtlsLink {
    /// Sends what `dimpl` has to send and collects what it received, until its `Timeout`;
    /// returns whether it reported `Connected` and its next timer.
    async fn flush(&mut self) -> Result<(bool, Option<Instant>), HandshakeError> {
        let mut connected = false;
        loop {
            match self.dtls.poll_output(&mut self.out) {
                dimpl::Output::Packet(p) => match self.sock.send(p).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(e.into()),
                },
                dimpl::Output::Connected => connected = true,
                dimpl::Output::ApplicationData(d) if self.pending.len() < MAX_PENDING => {
                    self.pending.push_back(d.to_vec());
                }
                dimpl::Output::CloseNotify => self.closed_by_peer = true,
                dimpl::Output::Timeout(t) => return Ok((connected, Some(t))),
                dimpl::Output::BufferTooSmall { needed } => {
                    return Err(HandshakeError::Dtls(format!(
                        "a record of {needed} bytes does not fit {MAX_DATAGRAM}"
                    )));
                }
                _ => {}
            }
        }
    }

    /// Everything `dimpl` has to send, without waiting (`try_send`: what the socket cannot
    /// take now is lost, as a datagram may be), and what it received into `pending`.
    fn flush_now(&mut self) {
        loop {
            match self.dtls.poll_output(&mut self.out) {
                dimpl::Output::Packet(p) => {
                    let _ = self.sock.try_send(p);
                }
                dimpl::Output::ApplicationData(d) if self.pending.len() < MAX_PENDING => {
                    self.pending.push_back(d.to_vec());
                }
                dimpl::Output::CloseNotify => self.closed_by_peer = true,
                dimpl::Output::Timeout(_) | dimpl::Output::BufferTooSmall { .. } => return,
                _ => {}
            }
        }
    }

    /// Encrypts `packet` into one record in one datagram, put into `sealed` at `at` (its
    /// buffer reused).
    fn seal_into(&mut self, packet: &[u8], at: usize) -> io::Result<()> {
        self.dtls
            .send_application_data(packet)
            .map_err(|e| io::Error::other(format!("DTLS send: {e}")))?;
        let mut done = false;
        loop {
            match self.dtls.poll_output(&mut self.out) {
                dimpl::Output::Packet(p) if !done => {
                    if self.sealed.len() <= at {
                        self.sealed.resize_with(at + 1, Vec::new);
                    }
                    if let Some(slot) = self.sealed.get_mut(at) {
                        slot.clear();
                        slot.extend_from_slice(p);
                    }
                    done = true;
                }
                dimpl::Output::Packet(p) => {
                    // Not expected (one record per poll cycle); sent as is.
                    let _ = self.sock.try_send(p);
                }
                dimpl::Output::ApplicationData(d) if self.pending.len() < MAX_PENDING => {
                    self.pending.push_back(d.to_vec());
                }
                dimpl::Output::Timeout(_) | dimpl::Output::BufferTooSmall { .. } => break,
                _ => {}
            }
        }
        if done {
            Ok(())
        } else {
            Err(io::Error::other("DTLS send: no record came out"))
        }
    }

    /// Seals every packet into `sealed` (exactly `packets.len()` datagrams).
    fn seal_all(&mut self, packets: &[Vec<u8>]) -> io::Result<()> {
        for (k, p) in packets.iter().enumerate() {
            self.seal_into(p, k)?;
        }
        self.sealed.truncate(packets.len());
        Ok(())
    }

    async fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        self.seal_into(packet, 0)?;
        let datagram = self.sealed.first().map(Vec::as_slice).unwrap_or_default();
        match self.sock.send(datagram).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                let n = p.len().min(buf.len());
                if let (Some(to), Some(from)) = (buf.get_mut(..n), p.get(..n)) {
                    to.copy_from_slice(from);
                }
                return Ok(n);
            }
            // The only await: nothing is lost when the caller drops this future here.
            let n = self.sock.recv(&mut self.raw).await?;
            let now = Instant::now();
            if self.dtls.handle_timeout(now).is_err() {
                continue;
            }
            let datagram = self.raw.get(..n).unwrap_or_default();
            // A record that does not authenticate is dropped, as by the gateway.
            if self.dtls.handle_packet(datagram).is_ok() {
                self.flush_now();
            }
        }
    }

    fn close(&mut self) {
        if self.dtls.close().is_ok() {
            self.flush_now();
        }
    }

    /// The socket (for its local address).
    #[must_use]
    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }
}

/// One device of scenario 19 with its session open: the link (plain or DTLS) and its times.
#[derive(Debug)]
pub struct Opened {
    /// Its link to the gateway, kept open until [`Opened::close`].
    pub link: Link,
    /// The DTLS handshake (`None` over plain UDP).
    pub handshake: Option<Handshake>,
    /// CONNECT sent to CONNACK rc 0 received.
    pub connack: Duration,
    /// CONNECTs sent again (no CONNACK within the retry interval).
    pub connect_retries: u32,
}

impl std::fmt::Debug for DtlsLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsLink")
            .field("pending", &self.pending.len())
            .field("closed_by_peer", &self.closed_by_peer)
            .finish_non_exhaustive()
    }
}

/// Why a device of scenario 19 did not get its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpenFailure {
    /// Its socket could not be bound or connected.
    Socket,
    /// The DTLS handshake failed (an alert, a refused record).
    Handshake,
    /// The DTLS handshake did not complete in time.
    HandshakeTimeout,
    /// No CONNACK, or one with a non-zero return code.
    Connack,
    /// The scenario's overall deadline passed before it could start.
    NotStarted,
}

impl OpenFailure {
    /// A label for the report.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            OpenFailure::Socket => "socket",
            OpenFailure::Handshake => "handshake refused",
            OpenFailure::HandshakeTimeout => "handshake timed out",
            OpenFailure::Connack => "no CONNACK rc 0",
            OpenFailure::NotStarted => "not started (deadline)",
        }
    }
}

/// CONNECT tries before a device gives up (one per `retry`).
const CONNECT_TRIES: u32 = 8;

/// Opens one device's session: binds `bind` (a fresh source port), connects to `gateway`,
/// with `dtls` does a full PSK handshake with `client_id` as the identity (cookie round trip
/// included), then CONNECT (keep-alive `keep_alive` s, CleanSession) until CONNACK rc 0,
/// every step by `deadline`.
///
/// # Errors
/// See [`OpenFailure`].
pub async fn open_session(
    bind: std::net::SocketAddr,
    gateway: std::net::SocketAddr,
    dtls: bool,
    client_id: &str,
    keep_alive: u16,
    retry: Duration,
    deadline: Instant,
) -> Result<Opened, OpenFailure> {
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|_| OpenFailure::Socket)?;
    sock.connect(gateway)
        .await
        .map_err(|_| OpenFailure::Socket)?;
    let (mut link, shake) = if dtls {
        let config = client_config(client_id, &BENCH_KEY).map_err(|_| OpenFailure::Handshake)?;
        match handshake(sock, config, deadline).await {
            Ok((link, h)) => (Link::Dtls(Box::new(link)), Some(h)),
            Err(HandshakeError::Timeout) => return Err(OpenFailure::HandshakeTimeout),
            Err(_) => return Err(OpenFailure::Handshake),
        }
    } else {
        (Link::Plain(sock), None)
    };
    let connect = crate::sn::connect(client_id, keep_alive);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let start = Instant::now();
    for attempt in 0..CONNECT_TRIES {
        if Instant::now() >= deadline {
            break;
        }
        link.send(&connect)
            .await
            .map_err(|_| OpenFailure::Connack)?;
        let until = tokio::time::Instant::from_std((Instant::now() + retry).min(deadline));
        while let Ok(Ok(n)) = tokio::time::timeout_at(until, link.recv(&mut buf)).await {
            if let Some((crate::sn::kind::CONNACK, body)) =
                crate::sn::parse(buf.get(..n).unwrap_or_default())
            {
                if body.first() == Some(&0) {
                    return Ok(Opened {
                        link,
                        handshake: shake,
                        connack: start.elapsed(),
                        connect_retries: attempt,
                    });
                }
                return Err(OpenFailure::Connack);
            }
        }
    }
    Err(OpenFailure::Connack)
}

impl Opened {
    /// DISCONNECT, then (over DTLS) `close_notify`; best effort.
    pub async fn close(&mut self) {
        let _ = self.link.send(&crate::sn::disconnect()).await;
        self.link.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_key_is_16_bytes_in_hex() {
        assert_eq!(bench_key_hex(), "73672d62656e63682d70736b2d6b6579");
        let tables = psk_tables(["a-1".to_owned()]);
        assert!(tables.contains("identity = \"a-1\"\nkey_hex = \"73672d"));
    }

    #[test]
    fn a_client_config_builds_quickly() {
        assert!(client_config("dev1", &BENCH_KEY).is_ok());
        // Twenty in 200 ms, even in a debug build (with the whole provider's check twenty
        // take about a second there, some 90 ms in release).
        let start = Instant::now();
        for k in 0..20 {
            client_config(&format!("dev{k}"), &BENCH_KEY).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
    }

    /// A `dimpl` PSK server on loopback that echoes each record back, for one client, until
    /// `quit` datagrams of application data (bounded by the test's timeout).
    async fn echo_server(sock: UdpSocket, quit: usize) {
        let config = dimpl::Config::builder()
            .with_crypto_provider(dimpl::crypto::rust_crypto::default_provider())
            .with_psk_server(None, Arc::new(Key(BENCH_KEY.to_vec())))
            .build()
            .unwrap();
        let mut server = dimpl::Dtls::new_12_psk(Arc::new(config), Instant::now());
        let (mut raw, mut out) = (vec![0u8; MAX_DATAGRAM], vec![0u8; MAX_DATAGRAM]);
        let mut echoed = 0;
        while echoed < quit {
            let (n, from) = sock.recv_from(&mut raw).await.unwrap();
            server.handle_timeout(Instant::now()).unwrap();
            let _ = server.handle_packet(&raw[..n]);
            let mut got = Vec::new();
            loop {
                match server.poll_output(&mut out) {
                    dimpl::Output::Packet(p) => {
                        sock.send_to(p, from).await.unwrap();
                    }
                    dimpl::Output::ApplicationData(d) => got.push(d.to_vec()),
                    dimpl::Output::Timeout(_) => break,
                    _ => {}
                }
            }
            for d in got {
                server.send_application_data(&d).unwrap();
                echoed += 1;
                while let dimpl::Output::Packet(p) = server.poll_output(&mut out) {
                    sock.send_to(p, from).await.unwrap();
                }
            }
        }
    }

    #[tokio::test]
    async fn a_handshake_then_packets_one_by_one_and_in_a_batch_come_back() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = server.local_addr().unwrap();
        let echo = tokio::spawn(echo_server(server, 4));
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(at).await.unwrap();
        let config = client_config("dev1", &BENCH_KEY).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (link, shake) = handshake(sock, config, deadline).await.unwrap();
        assert!(shake.took < Duration::from_secs(10));
        let mut link = Link::Dtls(Box::new(link));
        let mut buf = [0u8; 64];
        link.send(b"one").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), link.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"one");
        link.send_batch(&[b"two".to_vec(), b"three".to_vec(), b"four".to_vec()])
            .await
            .unwrap();
        for want in [&b"two"[..], b"three", b"four"] {
            let n = tokio::time::timeout(Duration::from_secs(5), link.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], want);
        }
        tokio::time::timeout(Duration::from_secs(5), echo)
            .await
            .unwrap()
            .unwrap();
    }
}
