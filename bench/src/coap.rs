//! The CoAP load generator (issue 15's bench scenarios 11-13): emulated CoAP devices and
//! observers. Messages are encoded and decoded here from RFC 7252 §3 by hand ([`wire`]), not
//! with coap-lite: the gateway's codec must not be its own judge.
//!
//! Three loads:
//! - [`ConLoad`]: `devices` devices, one UDP socket each (own source address, as
//!   [`crate::generator`] does), each with one outstanding CON `PUT /ps/bench/<i>`
//!   (NSTART = 1):
//!
//!   ```text
//!   CON PUT ─> ACK 2.xx (piggy-backed) ──────────────────────────────> next request
//!           ─> empty ACK ─> CON/NON 2.xx with our token (CON: ACKed) ─> next request
//!           ─> silence for ACK_TIMEOUT·rand[1, ACK_RANDOM_FACTOR]·2^k: resend (k < MAX_RETRANSMIT)
//!   ```
//! - [`non_put`]: one device sending NON PUTs in `sendmmsg` batches paced at a total rate; a
//!   reader task counts the answers (none expected with No-Response = 2, RFC 7967).
//! - [`Observers`]: sockets × tokens observations of one resource (CON `GET` Observe=0, sent
//!   and retransmitted like the PUTs, one at a time per socket), then counting notifications.
//!
//! Every CON that arrives from the server (separate responses, notifications) gets an empty
//! ACK with its Message ID, also when it repeats one already answered. Payloads are
//! [`sn::stamp_into`]'s (client, sequence, send time), so the counting subscriber counts CoAP
//! uplink unchanged. Every loop is bounded in count and time; every socket is on loopback.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout_at;

use crate::generator::{count, send_batch, source_ip};
use crate::{elapsed_ns, new_histogram, sn, sys};

/// The few parts of RFC 7252 §3 (message format) and §5.10 (options) the generator needs.
pub mod wire {
    /// Message types (RFC 7252 §3, field T).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Type {
        Con,
        Non,
        Ack,
        Rst,
    }

    impl Type {
        const fn bits(self) -> u8 {
            match self {
                Type::Con => 0,
                Type::Non => 1,
                Type::Ack => 2,
                Type::Rst => 3,
            }
        }

        const fn from_bits(b: u8) -> Type {
            match b & 3 {
                0 => Type::Con,
                1 => Type::Non,
                2 => Type::Ack,
                _ => Type::Rst,
            }
        }
    }

    /// Codes as the header's byte: class in the 3 high bits, detail in the 5 low ones.
    pub mod code {
        pub const EMPTY: u8 = 0x00;
        pub const GET: u8 = 0x01;
        pub const PUT: u8 = 0x03;
        /// 2.04 Changed.
        pub const CHANGED: u8 = 0x44;
        /// 2.05 Content.
        pub const CONTENT: u8 = 0x45;
        /// 5.03 Service Unavailable.
        pub const SERVICE_UNAVAILABLE: u8 = 0xA3;

        /// The class (2 for success, 4 client error, 5 server error).
        #[must_use]
        pub const fn class(code: u8) -> u8 {
            code >> 5
        }

        /// "c.dd", as the RFC writes codes.
        #[must_use]
        pub fn text(code: u8) -> String {
            format!("{}.{:02}", code >> 5, code & 0x1F)
        }
    }

    /// Option numbers (RFC 7252 §12.2, RFC 7641, RFC 7967).
    pub mod option {
        pub const OBSERVE: u16 = 6;
        pub const URI_PATH: u16 = 11;
        pub const MAX_AGE: u16 = 14;
        pub const URI_QUERY: u16 = 15;
        pub const NO_RESPONSE: u16 = 258;
    }

    /// Longest token (TKL 0-8).
    pub const MAX_TOKEN: usize = 8;
    const VERSION_BITS: u8 = 0x40;
    const PAYLOAD_MARKER: u8 = 0xFF;

    /// An option's delta or length: the 4-bit nibble and its extended bytes (§3.1).
    fn nibble(v: usize) -> (u8, Option<u8>, Option<u16>) {
        match v {
            0..=12 => (u8::try_from(v).unwrap_or(0), None, None),
            13..=268 => (13, u8::try_from(v - 13).ok(), None),
            _ => (14, None, Some(u16::try_from(v - 269).unwrap_or(u16::MAX))),
        }
    }

    /// Appends one message: header, token (its first [`MAX_TOKEN`] bytes), `options` as
    /// (number, value) in ascending number order (delta-encoded), then the payload marker and
    /// payload if there is one.
    pub fn encode_into(
        out: &mut Vec<u8>,
        ty: Type,
        code: u8,
        mid: u16,
        token: &[u8],
        options: &[(u16, &[u8])],
        payload: &[u8],
    ) {
        let token = token.get(..MAX_TOKEN).unwrap_or(token);
        let tkl = u8::try_from(token.len()).unwrap_or(0);
        out.push(VERSION_BITS | ty.bits() << 4 | tkl);
        out.push(code);
        out.extend_from_slice(&mid.to_be_bytes());
        out.extend_from_slice(token);
        let mut last = 0u16;
        for &(number, value) in options {
            let (delta, d1, d2) = nibble(usize::from(number.saturating_sub(last)));
            let (len, l1, l2) = nibble(value.len());
            last = number;
            out.push(delta << 4 | len);
            for (one, two) in [(d1, d2), (l1, l2)] {
                out.extend(one);
                out.extend(two.map(u16::to_be_bytes).into_iter().flatten());
            }
            out.extend_from_slice(value);
        }
        if !payload.is_empty() {
            out.push(PAYLOAD_MARKER);
            out.extend_from_slice(payload);
        }
    }

    /// An empty ACK (or RST) for `mid`.
    #[must_use]
    pub fn empty(ty: Type, mid: u16) -> [u8; 4] {
        let [hi, lo] = mid.to_be_bytes();
        [VERSION_BITS | ty.bits() << 4, code::EMPTY, hi, lo]
    }

    /// The fields of a received message the generator looks at.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Message<'a> {
        pub ty: Type,
        pub code: u8,
        pub mid: u16,
        pub token: &'a [u8],
        pub observe: Option<u32>,
        pub max_age: Option<u32>,
        pub payload: &'a [u8],
    }

    /// Decodes `d`; `None` for anything malformed (version not 1, TKL over 8, an option
    /// running past the end, nibble 15 outside the marker, a marker with no payload).
    #[must_use]
    pub fn decode(d: &[u8]) -> Option<Message<'_>> {
        let b0 = *d.first()?;
        if b0 >> 6 != 1 {
            return None;
        }
        let tkl = usize::from(b0 & 0x0F);
        if tkl > MAX_TOKEN {
            return None;
        }
        let code = *d.get(1)?;
        let mid = u16::from_be_bytes([*d.get(2)?, *d.get(3)?]);
        let token = d.get(4..4 + tkl)?;
        let mut m = Message {
            ty: Type::from_bits(b0 >> 4),
            code,
            mid,
            token,
            observe: None,
            max_age: None,
            payload: &[],
        };
        let mut pos = 4 + tkl;
        let mut number = 0usize;
        while let Some(&b) = d.get(pos) {
            pos += 1;
            if b == PAYLOAD_MARKER {
                m.payload = d.get(pos..).filter(|p| !p.is_empty())?;
                break;
            }
            number += extended(d, &mut pos, b >> 4)?;
            let len = extended(d, &mut pos, b & 0x0F)?;
            let value = d.get(pos..pos + len)?;
            pos += len;
            match u16::try_from(number).ok()? {
                option::OBSERVE => m.observe = Some(uint(value)?),
                option::MAX_AGE => m.max_age = Some(uint(value)?),
                _ => {}
            }
        }
        Some(m)
    }

    /// The value of a delta or length nibble, reading its extended bytes at `pos`.
    fn extended(d: &[u8], pos: &mut usize, nibble: u8) -> Option<usize> {
        match nibble {
            0..=12 => Some(usize::from(nibble)),
            13 => {
                let v = usize::from(*d.get(*pos)?) + 13;
                *pos += 1;
                Some(v)
            }
            14 => {
                let v = usize::from(u16::from_be_bytes([*d.get(*pos)?, *d.get(*pos + 1)?])) + 269;
                *pos += 2;
                Some(v)
            }
            _ => None,
        }
    }

    /// An unsigned integer option value (0-4 bytes, big-endian).
    fn uint(v: &[u8]) -> Option<u32> {
        (v.len() <= 4).then(|| v.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)))
    }
}

use wire::{Type, code, option};

/// Retransmission parameters of a device (RFC 7252 §4.8).
#[derive(Debug, Clone, Copy)]
pub struct Transmission {
    /// ACK_TIMEOUT.
    pub ack_timeout: Duration,
    /// ACK_RANDOM_FACTOR: the first timeout is drawn from [ack_timeout, ack_timeout × this].
    pub random_factor: f64,
    /// MAX_RETRANSMIT.
    pub max_retransmit: u32,
    /// Bound on waiting for a separate response after an empty ACK (the RFC leaves it to
    /// the client).
    pub separate_wait: Duration,
}

impl Default for Transmission {
    /// The RFC's defaults; 20 s for a separate response.
    fn default() -> Self {
        Transmission {
            ack_timeout: Duration::from_secs(2),
            random_factor: 1.5,
            max_retransmit: 4,
            separate_wait: Duration::from_secs(20),
        }
    }
}

/// Counters of request/response exchanges, shared by a load's devices.
#[derive(Debug, Default)]
pub struct ExchangeCounters {
    /// Requests sent (first transmissions).
    pub sent: AtomicU64,
    /// Answers with a 2.xx code.
    pub success: AtomicU64,
    /// Answers 5.03 Service Unavailable.
    pub unavailable: AtomicU64,
    /// Answers with another code.
    pub other_code: AtomicU64,
    /// Empty ACKs (a separate response follows).
    pub empty_acks: AtomicU64,
    /// Separate responses (CON or NON carrying the request's token).
    pub separate: AtomicU64,
    /// Retransmissions.
    pub retransmits: AtomicU64,
    /// RSTs to a request.
    pub resets: AtomicU64,
    /// Requests given up: retransmissions exhausted, or no separate response in time.
    pub unanswered: AtomicU64,
    /// Empty ACKs sent for CONs from the server.
    pub acks_sent: AtomicU64,
}

/// How an exchange ended.
enum Outcome {
    Answer(u8),
    Reset,
    NoAnswer,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A small xorshift generator for the retransmission jitter (no dependency needed; quality
/// is irrelevant here).
struct Jitter(u64);

impl Jitter {
    fn new(seed: u64) -> Jitter {
        Jitter(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One device's socket and exchange state.
struct Endpoint {
    sock: UdpSocket,
    buf: Vec<u8>,
    mid: u16,
    jitter: Jitter,
    tx: Transmission,
}

/// Receive buffer asked for each socket (the kernel caps it at `net.core.rmem_max`): bursts
/// of answers and notifications must not be dropped at the generator.
const RECV_BUFFER: usize = 4 << 20;

/// Bound on a datagram read (the gateway's largest message is 1,280 bytes).
const READ_SLOT: usize = 2048;

impl Endpoint {
    /// A socket on device `i`'s source address, connected to `server`.
    async fn bind(i: usize, server: SocketAddr, tx: Transmission) -> anyhow::Result<Endpoint> {
        let bind = SocketAddr::new(source_ip(i), 0);
        let sock = UdpSocket::bind(bind)
            .await
            .with_context(|| format!("binding device {i} on {bind}"))?;
        sock.connect(server).await?;
        // Best effort: a smaller buffer shows up as kernel drops at the generator.
        let _ = setsockopt(&sock, sockopt::RcvBuf, &RECV_BUFFER);
        let mut jitter = Jitter::new(elapsed_ns() ^ (i as u64) << 32);
        let mid = u16::try_from(jitter.next() & 0xFFFF).unwrap_or(0);
        Ok(Endpoint {
            sock,
            buf: vec![0; READ_SLOT],
            mid,
            jitter,
            tx,
        })
    }

    fn next_mid(&mut self) -> u16 {
        self.mid = self.mid.wrapping_add(1);
        self.mid
    }

    /// Acknowledges a CON from the server.
    async fn ack(&self, mid: u16, c: &ExchangeCounters) -> io::Result<()> {
        bump(&c.acks_sent);
        match self.sock.send(&wire::empty(Type::Ack, mid)).await {
            Err(e) if e.kind() != io::ErrorKind::ConnectionRefused => Err(e),
            _ => Ok(()),
        }
    }

    /// Sends the CON request `packet` (Message ID `mid`, token `token`) and waits for its
    /// answer: piggy-backed on the ACK, or separate after an empty ACK. Retransmits per
    /// [`Transmission`]; acknowledges every CON that arrives meanwhile.
    async fn exchange(
        &mut self,
        packet: &[u8],
        mid: u16,
        token: &[u8],
        c: &ExchangeCounters,
    ) -> io::Result<Outcome> {
        bump(&c.sent);
        self.send_request(packet).await?;
        let jitter = 1.0 + self.jitter.unit() * (self.tx.random_factor - 1.0).max(0.0);
        let mut wait = self.tx.ack_timeout.mul_f64(jitter);
        let mut retry_at = tokio::time::Instant::now() + wait;
        let mut retransmits = 0;
        let mut separate_until = None;
        loop {
            let wake = separate_until.unwrap_or(retry_at);
            let received = timeout_at(wake, self.sock.recv(&mut self.buf)).await;
            match received {
                Ok(Ok(n)) => {
                    let Some(m) = wire::decode(self.buf.get(..n).unwrap_or_default()) else {
                        continue;
                    };
                    let (ty, code, their_mid) = (m.ty, m.code, m.mid);
                    let ours = m.token == token;
                    if ty == Type::Con {
                        self.ack(their_mid, c).await?;
                    }
                    match ty {
                        Type::Ack
                            if their_mid == mid
                                && code == code::EMPTY
                                && separate_until.is_none() =>
                        {
                            bump(&c.empty_acks);
                            separate_until =
                                Some(tokio::time::Instant::now() + self.tx.separate_wait);
                        }
                        // A repeated empty ACK.
                        Type::Ack if their_mid == mid && code == code::EMPTY => {}
                        Type::Ack if their_mid == mid => return Ok(Outcome::Answer(code)),
                        Type::Rst if their_mid == mid => return Ok(Outcome::Reset),
                        Type::Con | Type::Non if ours && code::class(code) >= 2 => {
                            bump(&c.separate);
                            return Ok(Outcome::Answer(code));
                        }
                        _ => {}
                    }
                }
                // ICMP port unreachable from an earlier datagram: the server is not there
                // (yet); retransmission covers it.
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Ok(Err(e)) => return Err(e),
                Err(_) if separate_until.is_some() => return Ok(Outcome::NoAnswer),
                Err(_) => {
                    retransmits += 1;
                    if retransmits > self.tx.max_retransmit {
                        return Ok(Outcome::NoAnswer);
                    }
                    bump(&c.retransmits);
                    self.send_request(packet).await?;
                    wait *= 2;
                    retry_at = tokio::time::Instant::now() + wait;
                }
            }
        }
    }

    async fn send_request(&self, packet: &[u8]) -> io::Result<()> {
        match self.sock.send(packet).await {
            Err(e) if e.kind() != io::ErrorKind::ConnectionRefused => Err(e),
            _ => Ok(()),
        }
    }

    /// Counts `outcome` in `c`; `true` for a 2.xx answer.
    fn count(outcome: &Outcome, c: &ExchangeCounters) -> bool {
        match *outcome {
            Outcome::Answer(x) if code::class(x) == 2 => {
                bump(&c.success);
                return true;
            }
            Outcome::Answer(code::SERVICE_UNAVAILABLE) => bump(&c.unavailable),
            Outcome::Answer(_) => bump(&c.other_code),
            Outcome::Reset => bump(&c.resets),
            Outcome::NoAnswer => bump(&c.unanswered),
        }
        false
    }
}

/// Phases the controller moves a load through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Wait,
    Go,
    Finish,
}

/// Waits for `phase` (or the controller gone); acknowledges CONs from the server meanwhile
/// (a separate response repeated because an ACK was lost).
async fn linger(
    ep: &mut Endpoint,
    phase: &mut watch::Receiver<Phase>,
    until: Phase,
    c: &ExchangeCounters,
) {
    loop {
        if *phase.borrow() >= until {
            return;
        }
        tokio::select! {
            changed = phase.changed() => if changed.is_err() { return },
            received = ep.sock.recv(&mut ep.buf) => {
                let Ok(n) = received else { continue };
                if let Some(m) = wire::decode(ep.buf.get(..n).unwrap_or_default())
                    && m.ty == Type::Con
                {
                    let mid = m.mid;
                    let _ = ep.ack(mid, c).await;
                }
            }
        }
    }
}

/// Waits (up to `max`) until `done()`; `true` if it came.
async fn wait_until(max: Duration, done: impl Fn() -> bool) -> bool {
    let until = Instant::now() + max;
    while !done() {
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Waits (bounded) for `tasks` to end after the finish signal; aborts the stragglers.
async fn join_all(tasks: Vec<JoinHandle<()>>, max: Duration) {
    let until = tokio::time::Instant::now() + max;
    for t in tasks {
        let abort = t.abort_handle();
        if timeout_at(until, t).await.is_err() {
            abort.abort();
        }
    }
}

/// The Uri-Path options of `/<segments...>`.
fn path_options<'a>(segments: &'a [String]) -> impl Iterator<Item = (u16, &'a [u8])> + 'a {
    segments.iter().map(|s| (option::URI_PATH, s.as_bytes()))
}

/// What [`ConLoad`] does.
#[derive(Debug, Clone)]
pub struct ConSpec {
    /// The server's UDP address.
    pub server: SocketAddr,
    /// Number of devices.
    pub devices: usize,
    /// Index of the first device (its client number in the payload stamps).
    pub first_index: u32,
    /// Uri-Path before the device's index: `["ps", "bench"]` publishes to `bench/<i>`.
    pub path: Vec<String>,
    /// Requests per device.
    pub messages: u64,
    /// Bound on sending new requests; the outstanding one may still complete.
    pub publish_for: Duration,
    /// Payload bytes (at least the 20-byte stamp).
    pub payload: usize,
    /// Retransmission parameters.
    pub tx: Transmission,
}

impl ConSpec {
    /// One device, `PUT /ps/bench/<i>`, 32-byte payloads, the RFC's retransmission.
    #[must_use]
    pub fn new(server: SocketAddr) -> ConSpec {
        ConSpec {
            server,
            devices: 1,
            first_index: 0,
            path: vec!["ps".into(), "bench".into()],
            messages: 0,
            publish_for: Duration::from_secs(30),
            payload: 32,
            tx: Transmission::default(),
        }
    }
}

/// CON PUT devices, NSTART = 1: set up (sockets bound) by [`ConLoad::start`], sending after
/// [`ConLoad::go`].
#[derive(Debug)]
pub struct ConLoad {
    /// Live counters.
    pub counters: Arc<ExchangeCounters>,
    /// Devices done sending.
    pub done: Arc<AtomicU64>,
    /// First transmission → 2.xx answer, µs.
    pub latency: Arc<Mutex<Histogram<u64>>>,
    phase: watch::Sender<Phase>,
    tasks: Vec<JoinHandle<()>>,
    devices: u64,
    go_at: Option<Instant>,
}

impl ConLoad {
    /// Binds one socket per device and starts their tasks, which wait for [`ConLoad::go`].
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// When sockets cannot be bound (the open-file limit, usually).
    pub async fn start(spec: ConSpec) -> anyhow::Result<ConLoad> {
        let spec = Arc::new(spec);
        let counters = Arc::new(ExchangeCounters::default());
        let done = Arc::new(AtomicU64::new(0));
        let latency = Arc::new(Mutex::new(new_histogram()));
        let (phase, phase_rx) = watch::channel(Phase::Wait);
        let mut tasks = Vec::with_capacity(spec.devices);
        for k in 0..spec.devices {
            let index = spec
                .first_index
                .saturating_add(u32::try_from(k).unwrap_or(u32::MAX));
            let ep = Endpoint::bind(index as usize, spec.server, spec.tx).await?;
            let device = ConDevice {
                index,
                spec: spec.clone(),
                counters: counters.clone(),
                done: done.clone(),
                latency: latency.clone(),
                phase: phase_rx.clone(),
                ep,
            };
            tasks.push(tokio::spawn(device.run()));
        }
        Ok(ConLoad {
            counters,
            done,
            latency,
            phase,
            tasks,
            devices: spec.devices as u64,
            go_at: None,
        })
    }

    /// Lets the devices send.
    pub fn go(&mut self) {
        self.go_at = Some(Instant::now());
        self.phase.send_replace(Phase::Go);
    }

    /// Waits (up to `max`) until every device is done; returns the time since
    /// [`ConLoad::go`].
    pub async fn wait_done(&self, max: Duration) -> Duration {
        wait_until(max, || count(&self.done) >= self.devices).await;
        self.go_at.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Stops the devices (bounded wait; stragglers are aborted).
    pub async fn finish(self) {
        self.phase.send_replace(Phase::Finish);
        join_all(self.tasks, Duration::from_secs(10)).await;
    }
}

struct ConDevice {
    index: u32,
    spec: Arc<ConSpec>,
    counters: Arc<ExchangeCounters>,
    done: Arc<AtomicU64>,
    latency: Arc<Mutex<Histogram<u64>>>,
    phase: watch::Receiver<Phase>,
    ep: Endpoint,
}

impl ConDevice {
    async fn run(mut self) {
        let c = self.counters.clone();
        linger(&mut self.ep, &mut self.phase, Phase::Go, &c).await;
        if *self.phase.borrow() == Phase::Go {
            if let Err(e) = self.send_all().await {
                eprintln!("CoAP device {}: {e}", self.index);
            }
            bump(&self.done);
            linger(&mut self.ep, &mut self.phase, Phase::Finish, &c).await;
        }
    }

    async fn send_all(&mut self) -> io::Result<()> {
        let spec = self.spec.clone();
        let c = self.counters.clone();
        let deadline = Instant::now() + spec.publish_for;
        let leaf = self.index.to_string();
        let mut hist = new_histogram();
        let mut payload = Vec::with_capacity(spec.payload);
        let mut packet = Vec::with_capacity(spec.payload + 64);
        let mut token = u32::try_from(self.ep.jitter.next() >> 32).unwrap_or(0);
        let mut seq = 0;
        while seq < spec.messages && Instant::now() < deadline {
            let mid = self.ep.next_mid();
            token = token.wrapping_add(1);
            let token = token.to_be_bytes();
            payload.clear();
            sn::stamp_into(&mut payload, self.index, seq, elapsed_ns(), spec.payload);
            let options: Vec<(u16, &[u8])> = path_options(&spec.path)
                .chain([(option::URI_PATH, leaf.as_bytes())])
                .collect();
            packet.clear();
            wire::encode_into(
                &mut packet,
                Type::Con,
                code::PUT,
                mid,
                &token,
                &options,
                &payload,
            );
            let sent = Instant::now();
            let outcome = self.ep.exchange(&packet, mid, &token, &c).await?;
            if Endpoint::count(&outcome, &c) {
                let _ = hist.record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            seq += 1;
        }
        if let Ok(mut all) = self.latency.lock() {
            let _ = all.add(&hist);
        }
        Ok(())
    }
}

/// What [`non_put`] sends.
#[derive(Debug, Clone)]
pub struct NonSpec {
    /// The server's UDP address.
    pub server: SocketAddr,
    /// The device's index (source address, client number in the stamps, topic leaf).
    pub device: u32,
    /// Uri-Path before the device's index.
    pub path: Vec<String>,
    /// Messages to send.
    pub messages: u64,
    /// Offered msg/s.
    pub rate: f64,
    /// Bound on sending.
    pub publish_for: Duration,
    /// Payload bytes (at least the 20-byte stamp).
    pub payload: usize,
    /// Datagrams per `sendmmsg`.
    pub batch: usize,
    /// Send No-Response = 2 (RFC 7967: suppress 2.xx answers).
    pub no_response: bool,
}

impl NonSpec {
    /// Device 0, `PUT /ps/bench/0` at 1,000 msg/s, answers on.
    #[must_use]
    pub fn new(server: SocketAddr) -> NonSpec {
        NonSpec {
            server,
            device: 0,
            path: vec!["ps".into(), "bench".into()],
            messages: 0,
            rate: 1000.0,
            publish_for: Duration::from_secs(10),
            payload: 32,
            batch: 64,
            no_response: false,
        }
    }
}

/// What [`non_put`] saw.
#[derive(Debug, Clone, Copy)]
pub struct NonResult {
    /// Requests sent.
    pub sent: u64,
    /// Seconds from the first to the last send.
    pub secs: f64,
    /// Answers with a 2.xx code.
    pub answered: u64,
    /// Answers with another code (RST included).
    pub other: u64,
    /// Answers the kernel dropped at the device's socket (its receive buffer full); `None`
    /// when `/proc/net/udp` does not list it.
    pub device_drops: Option<u64>,
}

/// Waiting for the last answers ends after this long without a new one.
const ANSWER_IDLE: Duration = Duration::from_millis(500);

/// Sends `spec.messages` NON PUTs from one device, paced, in `sendmmsg` batches; a reader task
/// counts the answers until they stop coming (or, with No-Response, right after sending).
///
/// # Errors
/// When the socket cannot be bound or sending fails.
pub async fn non_put(spec: &NonSpec) -> anyhow::Result<NonResult> {
    let ep = Endpoint::bind(spec.device as usize, spec.server, Transmission::default()).await?;
    let local = ep.sock.local_addr()?;
    let sock = Arc::new(ep.sock);
    let answered = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let (stop, mut stop_rx) = watch::channel(false);
    let reader = {
        let (sock, answered, other) = (sock.clone(), answered.clone(), other.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; READ_SLOT];
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => return,
                    received = sock.recv(&mut buf) => {
                        let Ok(n) = received else { continue };
                        let Some(m) = wire::decode(buf.get(..n).unwrap_or_default()) else {
                            bump(&other);
                            continue;
                        };
                        if code::class(m.code) == 2 {
                            bump(&answered);
                        } else {
                            bump(&other);
                        }
                    }
                }
            }
        })
    };
    let mut options: Vec<(u16, &[u8])> = path_options(&spec.path).collect();
    let leaf = spec.device.to_string();
    options.push((option::URI_PATH, leaf.as_bytes()));
    if spec.no_response {
        // 2: not interested in 2.xx responses (RFC 7967 §2.1).
        options.push((option::NO_RESPONSE, &[2]));
    }
    let batch = spec.batch.max(1);
    let mut packets: Vec<Vec<u8>> = vec![Vec::with_capacity(spec.payload + 64); batch];
    let mut payload = Vec::with_capacity(spec.payload);
    let mut mid = u16::try_from(elapsed_ns() & 0xFFFF).unwrap_or(0);
    let start = Instant::now();
    let deadline = start + spec.publish_for;
    let rate = spec.rate.max(1e-3);
    let mut seq = 0u64;
    let mut result = Ok(());
    while seq < spec.messages && Instant::now() < deadline {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).saturating_sub(seq);
        if due == 0 {
            let at = start + Duration::from_secs_f64(seq as f64 / rate);
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            continue;
        }
        let n = due.min(batch as u64).min(spec.messages - seq);
        let k = usize::try_from(n).unwrap_or(1);
        let now = elapsed_ns();
        for (j, packet) in packets.iter_mut().take(k).enumerate() {
            let s = seq + j as u64;
            mid = mid.wrapping_add(1);
            payload.clear();
            sn::stamp_into(&mut payload, spec.device, s, now, spec.payload);
            packet.clear();
            // Low 32 bits of the sequence: distinct among the answers still on their way.
            let token = u32::try_from(s & 0xFFFF_FFFF).unwrap_or(0).to_be_bytes();
            wire::encode_into(
                packet,
                Type::Non,
                code::PUT,
                mid,
                &token,
                &options,
                &payload,
            );
        }
        if let Err(e) = send_batch(&sock, packets.get(..k).unwrap_or_default()).await {
            result = Err(e);
            break;
        }
        seq += n;
    }
    let secs = start.elapsed().as_secs_f64();
    if !spec.no_response {
        let until = Instant::now() + Duration::from_secs(10);
        let mut last = (u64::MAX, Instant::now());
        while count(&answered) + count(&other) < seq && Instant::now() < until {
            let got = count(&answered) + count(&other);
            if got != last.0 {
                last = (got, Instant::now());
            } else if last.1.elapsed() > ANSWER_IDLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.send_replace(true);
    join_all(vec![reader], Duration::from_secs(2)).await;
    // Read while the socket is open: its row goes with it.
    let device_drops = sys::udp_drops(local);
    result?;
    Ok(NonResult {
        sent: seq,
        secs,
        answered: count(&answered),
        other: count(&other),
        device_drops,
    })
}

/// What [`Observers`] registers.
#[derive(Debug, Clone)]
pub struct ObserveSpec {
    /// The server's UDP address.
    pub server: SocketAddr,
    /// Observer sockets (peers).
    pub sockets: usize,
    /// Observations (tokens) per socket; the gateway's `max_observers_per_peer` bounds it.
    pub tokens: usize,
    /// Index of the first socket (its source address).
    pub first_index: u32,
    /// The observed resource's Uri-Path.
    pub path: Vec<String>,
    /// Uri-Query options of the registration (`qos=0`).
    pub queries: Vec<String>,
    /// Latency is recorded for notifications whose payload stamp names this client.
    pub latency_client: Option<u32>,
    /// Retransmission of the registrations.
    pub tx: Transmission,
}

impl ObserveSpec {
    /// One socket with one token observing `/ps/bench/fan?qos=0`.
    #[must_use]
    pub fn new(server: SocketAddr) -> ObserveSpec {
        ObserveSpec {
            server,
            sockets: 1,
            tokens: 1,
            first_index: 0,
            path: vec!["ps".into(), "bench".into(), "fan".into()],
            queries: vec!["qos=0".into()],
            latency_client: None,
            tx: Transmission::default(),
        }
    }
}

/// Counters of the observers.
#[derive(Debug, Default)]
pub struct ObserveCounters {
    /// The registrations' exchanges (success = registered).
    pub exchanges: ExchangeCounters,
    /// Sockets through registration.
    pub sockets_done: AtomicU64,
    /// Notifications received (2.xx with Observe and a registered token).
    pub notifications: AtomicU64,
    /// Of those, CON (acknowledged).
    pub con_notifications: AtomicU64,
    /// Last notification, ns since the epoch.
    pub last_ns: AtomicU64,
}

/// Sockets × tokens observations of one resource, counting notifications until
/// [`Observers::finish`].
#[derive(Debug)]
pub struct Observers {
    /// Live counters.
    pub counters: Arc<ObserveCounters>,
    /// Publisher stamp → notification arrival, µs (merged at [`Observers::finish`]).
    pub latency: Arc<Mutex<Histogram<u64>>>,
    locals: Vec<SocketAddr>,
    phase: watch::Sender<Phase>,
    tasks: Vec<JoinHandle<()>>,
    sockets: u64,
}

impl Observers {
    /// Binds the sockets and starts registering at once. Must be called within a Tokio
    /// runtime.
    ///
    /// # Errors
    /// When sockets cannot be bound.
    pub async fn start(spec: ObserveSpec) -> anyhow::Result<Observers> {
        let spec = Arc::new(spec);
        let counters = Arc::new(ObserveCounters::default());
        let latency = Arc::new(Mutex::new(new_histogram()));
        let (phase, phase_rx) = watch::channel(Phase::Go);
        let mut tasks = Vec::with_capacity(spec.sockets);
        let mut locals = Vec::with_capacity(spec.sockets);
        for k in 0..spec.sockets {
            let index = spec.first_index as usize + k;
            let ep = Endpoint::bind(index, spec.server, spec.tx).await?;
            locals.push(ep.sock.local_addr()?);
            let observer = Observer {
                index,
                spec: spec.clone(),
                counters: counters.clone(),
                latency: latency.clone(),
                phase: phase_rx.clone(),
                ep,
                tokens: Vec::new(),
            };
            tasks.push(tokio::spawn(observer.run()));
        }
        Ok(Observers {
            counters,
            latency,
            locals,
            phase,
            tasks,
            sockets: spec.sockets as u64,
        })
    }

    /// Waits (up to `max`) until every socket is through its registrations; returns the
    /// observations registered.
    pub async fn wait_registered(&self, max: Duration) -> u64 {
        let c = &self.counters;
        wait_until(max, || count(&c.sockets_done) >= self.sockets).await;
        count(&c.exchanges.success)
    }

    /// Notifications so far.
    #[must_use]
    pub fn notifications(&self) -> u64 {
        count(&self.counters.notifications)
    }

    /// Waits (up to `max`) until `total` notifications arrived or none came for `idle`.
    pub async fn wait_notifications(&self, total: u64, idle: Duration, max: Duration) {
        let until = Instant::now() + max;
        let mut last = (u64::MAX, Instant::now());
        loop {
            let got = self.notifications();
            if got >= total || Instant::now() > until {
                return;
            }
            if got != last.0 {
                last = (got, Instant::now());
            } else if last.1.elapsed() > idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Datagrams the kernel dropped at the observer sockets (receive buffers full); `None`
    /// when `/proc/net/udp` lists none of them.
    #[must_use]
    pub fn kernel_drops(&self) -> Option<u64> {
        self.locals
            .iter()
            .filter_map(|a| sys::udp_drops(*a))
            .reduce(u64::saturating_add)
    }

    /// Stops counting (bounded wait; stragglers are aborted). The observations are not
    /// cancelled: the server learns of their end from its next CON notification (ICMP port
    /// unreachable), or is stopped anyway.
    pub async fn finish(self) {
        self.phase.send_replace(Phase::Finish);
        join_all(self.tasks, Duration::from_secs(10)).await;
    }
}

struct Observer {
    index: usize,
    spec: Arc<ObserveSpec>,
    counters: Arc<ObserveCounters>,
    latency: Arc<Mutex<Histogram<u64>>>,
    phase: watch::Receiver<Phase>,
    ep: Endpoint,
    tokens: Vec<[u8; 4]>,
}

impl Observer {
    async fn run(mut self) {
        if let Err(e) = self.register().await {
            eprintln!("CoAP observer {}: {e}", self.index);
        }
        bump(&self.counters.sockets_done);
        let mut hist = new_histogram();
        if let Err(e) = self.count(&mut hist).await {
            eprintln!("CoAP observer {}: {e}", self.index);
        }
        if let Ok(mut all) = self.latency.lock() {
            let _ = all.add(&hist);
        }
    }

    /// One registration after the other (NSTART = 1).
    async fn register(&mut self) -> io::Result<()> {
        let spec = self.spec.clone();
        let c = &self.counters.exchanges;
        let mut packet = Vec::with_capacity(64);
        for k in 0..spec.tokens {
            if *self.phase.borrow() == Phase::Finish {
                break;
            }
            let token = (0x5347_0000 | u32::try_from(k).unwrap_or(0)).to_be_bytes();
            let mid = self.ep.next_mid();
            // Observe = 0 (register) is the empty uint.
            let options: Vec<(u16, &[u8])> = [(option::OBSERVE, &[][..])]
                .into_iter()
                .chain(path_options(&spec.path))
                .chain(
                    spec.queries
                        .iter()
                        .map(|q| (option::URI_QUERY, q.as_bytes())),
                )
                .collect();
            packet.clear();
            wire::encode_into(
                &mut packet,
                Type::Con,
                code::GET,
                mid,
                &token,
                &options,
                &[],
            );
            let outcome = self.ep.exchange(&packet, mid, &token, c).await?;
            if Endpoint::count(&outcome, c) {
                self.tokens.push(token);
            }
        }
        Ok(())
    }

    /// Counts notifications until the finish signal, acknowledging CON ones.
    async fn count(&mut self, hist: &mut Histogram<u64>) -> io::Result<()> {
        let c = self.counters.clone();
        loop {
            if *self.phase.borrow() == Phase::Finish {
                return Ok(());
            }
            tokio::select! {
                changed = self.phase.changed() => if changed.is_err() { return Ok(()) },
                received = self.ep.sock.recv(&mut self.ep.buf) => {
                    let n = match received {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                        Err(e) => return Err(e),
                    };
                    let now = elapsed_ns();
                    let Some(m) = wire::decode(self.ep.buf.get(..n).unwrap_or_default()) else {
                        continue;
                    };
                    let notification = code::class(m.code) == 2
                        && m.observe.is_some()
                        && self.tokens.iter().any(|t| t.as_slice() == m.token);
                    let stamp = sn::read_stamp(m.payload);
                    let (ty, mid) = (m.ty, m.mid);
                    if ty == Type::Con {
                        self.ep.ack(mid, &c.exchanges).await?;
                    }
                    if notification {
                        bump(&c.notifications);
                        if ty == Type::Con {
                            bump(&c.con_notifications);
                        }
                        c.last_ns.fetch_max(now, Ordering::Relaxed);
                        if let Some((client, _, sent)) = stamp
                            && Some(client) == self.spec.latency_client
                        {
                            let _ = hist.record(now.saturating_sub(sent) / 1000);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wire::{Message, Type, code, decode, empty, encode_into, option};
    use super::*;

    /// RFC 7252 §3 layout assembled by hand: Ver 1, T CON, TKL 2; code 0.03; MID 0x1234;
    /// token; Uri-Path "ps" (delta 11), Uri-Path "bench" (delta 0), Uri-Path "7", Uri-Query
    /// "qos=1" (delta 4), No-Response (258: delta 243 = 13 + 230 in one extended byte,
    /// length 1, value 2); the 0xFF marker and payload.
    #[tokio::test]
    async fn encodes_a_request_byte_for_byte() {
        let mut out = Vec::new();
        encode_into(
            &mut out,
            Type::Con,
            code::PUT,
            0x1234,
            &[0xAB, 0xCD],
            &[
                (option::URI_PATH, b"ps"),
                (option::URI_PATH, b"bench"),
                (option::URI_PATH, b"7"),
                (option::URI_QUERY, b"qos=1"),
                (option::NO_RESPONSE, &[2]),
            ],
            b"hi",
        );
        let expected: &[u8] = &[
            0x42, 0x03, 0x12, 0x34, 0xAB, 0xCD, // header, token
            0xB2, b'p', b's', // delta 11, length 2
            0x05, b'b', b'e', b'n', b'c', b'h', // delta 0, length 5
            0x01, b'7', // delta 0, length 1
            0x45, b'q', b'o', b's', b'=', b'1', // delta 4, length 5
            0xD1, 230, 2, // delta 13 + 230 = 243, length 1
            0xFF, b'h', b'i', // marker, payload
        ];
        assert_eq!(out, expected);
        // Observe = 0 as the empty uint, NON, empty token, no payload; a 14-nibble length.
        let long = [b'x'; 300];
        let mut out = Vec::new();
        encode_into(
            &mut out,
            Type::Non,
            code::GET,
            1,
            &[],
            &[(option::OBSERVE, &[]), (option::URI_QUERY, &long)],
            &[],
        );
        assert_eq!(out.get(..7), Some(&[0x50, 0x01, 0, 1, 0x60, 0x9E, 0][..]));
        assert_eq!(out.get(7), Some(&31), "300 - 269 in two bytes");
        assert_eq!(out.len(), 8 + 300);
        assert_eq!(empty(Type::Ack, 0xBEEF), [0x60, 0, 0xBE, 0xEF]);
    }

    #[tokio::test]
    async fn decodes_responses_and_rejects_malformed_ones() {
        // ACK 2.04, MID 0x1234, token AB CD, Max-Age (14) = 5: delta 14 -> nibble 13 + 1.
        let ack = [0x62, 0x44, 0x12, 0x34, 0xAB, 0xCD, 0xD1, 0x01, 0x05];
        assert_eq!(
            decode(&ack),
            Some(Message {
                ty: Type::Ack,
                code: code::CHANGED,
                mid: 0x1234,
                token: &[0xAB, 0xCD],
                observe: None,
                max_age: Some(5),
                payload: &[],
            })
        );
        // NON 2.05 notification: Observe (6) = 0x0102 in two bytes, payload "v".
        let note = [0x51, 0x45, 0, 9, 0x77, 0x62, 0x01, 0x02, 0xFF, b'v'];
        let m = decode(&note).unwrap();
        assert_eq!(
            (m.ty, m.code, m.token, m.observe, m.payload),
            (
                Type::Non,
                code::CONTENT,
                &[0x77][..],
                Some(0x0102),
                &b"v"[..]
            )
        );
        assert_eq!(code::text(code::SERVICE_UNAVAILABLE), "5.03");
        // Our own encoding decodes back.
        let mut out = Vec::new();
        encode_into(
            &mut out,
            Type::Con,
            code::CONTENT,
            7,
            &[1, 2, 3],
            &[
                (option::OBSERVE, &[0x12, 0x34, 0x56]),
                (option::URI_PATH, b"x"),
            ],
            b"data",
        );
        let m = decode(&out).unwrap();
        assert_eq!(
            (m.observe, m.payload, m.mid),
            (Some(0x12_3456), &b"data"[..], 7)
        );
        for bad in [
            &[0x82, 0x44, 0, 1, 0, 0][..],    // version 2
            &[0x49, 0x44, 0, 1][..],          // TKL 9
            &[0x60, 0x44, 0, 1, 0xFF][..],    // marker without payload
            &[0x60, 0x44, 0, 1, 0xF1, 0][..], // delta nibble 15
            &[0x60, 0x44, 0, 1, 0x13, 1][..], // option runs past the end
            &[0x60, 0x44, 0, 1, 0xD0][..],    // extended delta byte missing
            &[0x60, 0x44, 0][..],             // short header
            &[0x62, 0x44, 0, 1, 0xAB][..],    // token cut off
        ] {
            assert_eq!(decode(bad), None, "{bad:02X?}");
        }
    }

    /// A child process killed and reaped on drop.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// libcoap's server on a free loopback port, creating resources on PUT (`-d`).
    fn libcoap_server() -> (Child, SocketAddr) {
        let port = crate::procs::free_port().unwrap();
        let bin =
            std::env::var("SENSORGATE_COAP_SERVER").unwrap_or_else(|_| "coap-server-notls".into());
        let child = std::process::Command::new(&bin)
            .args([
                "-A",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-d",
                "100",
                "-v",
                "0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin} (apt-get install libcoap3-bin): {e}"));
        (Child(child), SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// The three loads against an independent server (libcoap): CON PUT answered 2.01 then
    /// 2.04, NON PUT answered NON 2.04 (none with No-Response), observers registered with
    /// 2.05 and notified of each change (libcoap sends some of them CON: they are ACKed, or
    /// it would cancel the observations).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drives_libcoap_with_con_non_and_observers() {
        let (_server, addr) = libcoap_server();
        // Until the server answers: CON PUT retransmission covers its start.
        let mut spec = ConSpec::new(addr);
        spec.devices = 3;
        spec.messages = 5;
        spec.tx.ack_timeout = Duration::from_millis(200);
        spec.publish_for = Duration::from_secs(20);
        let mut load = ConLoad::start(spec).await.unwrap();
        load.go();
        load.wait_done(Duration::from_secs(30)).await;
        let c = load.counters.clone();
        let n = load.latency.lock().unwrap().len();
        load.finish().await;
        assert_eq!((count(&c.sent), count(&c.success)), (15, 15));
        assert_eq!(
            count(&c.unanswered) + count(&c.other_code) + count(&c.resets),
            0
        );
        assert_eq!(n, 15, "one latency per answer");

        let mut non = NonSpec::new(addr);
        non.messages = 200;
        non.rate = 2000.0;
        non.batch = 8;
        let r = non_put(&non).await.unwrap();
        assert_eq!((r.sent, r.answered, r.other), (200, 200, 0));
        non.no_response = true;
        non.device = 1;
        let r = non_put(&non).await.unwrap();
        assert_eq!(
            (r.sent, r.answered),
            (200, 0),
            "No-Response suppresses 2.04"
        );

        // The resource must exist before it can be observed. One token per socket: libcoap
        // keys an observation by session and request options (a second token with the same
        // request replaces the first), the gateway by (peer, token).
        let fan = SocketAddr::new(source_ip(50), 0);
        let put = std::net::UdpSocket::bind(fan).unwrap();
        put.connect(addr).unwrap();
        put.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let mut publish = |mid: u16, seq: u64| {
            let mut payload = Vec::new();
            sn::stamp_into(&mut payload, 9, seq, elapsed_ns(), 24);
            let mut p = Vec::new();
            let path = [
                (option::URI_PATH, &b"ps"[..]),
                (option::URI_PATH, b"bench"),
                (option::URI_PATH, b"fan"),
            ];
            encode_into(&mut p, Type::Con, code::PUT, mid, &[1], &path, &payload);
            put.send(&p).unwrap();
            loop {
                let n = put.recv(&mut buf).unwrap();
                let m = decode(&buf[..n]).unwrap();
                if m.ty == Type::Ack && m.mid == mid {
                    assert_eq!(code::class(m.code), 2);
                    return;
                }
            }
        };
        publish(100, 0);
        let mut spec = ObserveSpec::new(addr);
        spec.sockets = 6;
        spec.tokens = 1;
        spec.first_index = 60;
        spec.queries = Vec::new();
        spec.latency_client = Some(9);
        spec.tx.ack_timeout = Duration::from_millis(200);
        let obs = Observers::start(spec).await.unwrap();
        assert_eq!(obs.wait_registered(Duration::from_secs(20)).await, 6);
        for k in 1..=7u16 {
            publish(100 + k, u64::from(k));
            obs.wait_notifications(
                6 * u64::from(k),
                Duration::from_secs(5),
                Duration::from_secs(10),
            )
            .await;
        }
        let c = obs.counters.clone();
        assert_eq!(obs.kernel_drops(), Some(0));
        let latency = obs.latency.clone();
        obs.finish().await;
        assert_eq!(count(&c.notifications), 42);
        assert!(
            count(&c.con_notifications) > 0,
            "libcoap sends every 5th CON"
        );
        assert_eq!(latency.lock().unwrap().len(), 42);
    }
}
