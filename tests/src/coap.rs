//! CoAP peers for the end-to-end tests: a raw client writing exact bytes, and bounded runs of
//! the independent clients (libcoap's `coap-client-notls`, aiocoap's `aiocoap-client`).
//!
//! Invariants:
//! - The codec here is hand-written from RFC 7252 §3 (message format) and §5.4.6 (option
//!   ordering), RFC 7959 §2.2 (Block option value); it shares nothing with the gateway's codec
//!   (which wraps coap-lite), so a codec bug cannot judge itself.
//! - Decoding a reply never panics: every read is checked and a bad datagram is an error.
//! - Every wait is bounded by a timeout given by the caller; nothing sleeps to pass.
//! - libcoap exits 0 even when the request failed, so callers assert on its printed PDUs
//!   (`-v 7` dumps every PDU as `v:1 t:ACK c:2.04 i:.. {token} [ options ] :: 'payload'`).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Ver| T |  TKL  |      Code     |          Message ID           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   Token (if any, TKL bytes) ...
//! |   Options (delta/length nibbles, 13: +1 byte -13, 14: +2 bytes -269) ...
//! |1 1 1 1 1 1 1 1|    Payload (if any) ...
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::{python, run_bounded};

/// Message types (RFC 7252 §3, T).
pub const CON: u8 = 0;
/// Non-confirmable.
pub const NON: u8 = 1;
/// Acknowledgement.
pub const ACK: u8 = 2;
/// Reset.
pub const RST: u8 = 3;

/// A code `class.detail` as its byte (`c.dd`: class in the top 3 bits).
pub const fn code(class: u8, detail: u8) -> u8 {
    (class << 5) | (detail & 0x1f)
}

/// Codes the tests use (RFC 7252 §12.1, RFC 7959 §2.9).
pub mod codes {
    use super::code;
    /// 0.00: an empty message (ACK, RST, ping).
    pub const EMPTY: u8 = 0;
    pub const GET: u8 = code(0, 1);
    pub const POST: u8 = code(0, 2);
    pub const PUT: u8 = code(0, 3);
    pub const DELETE: u8 = code(0, 4);
    pub const CREATED: u8 = code(2, 1);
    pub const CHANGED: u8 = code(2, 4);
    pub const CONTENT: u8 = code(2, 5);
    pub const CONTINUE: u8 = code(2, 31);
    pub const BAD_REQUEST: u8 = code(4, 0);
    pub const BAD_OPTION: u8 = code(4, 2);
    pub const NOT_FOUND: u8 = code(4, 4);
    pub const METHOD_NOT_ALLOWED: u8 = code(4, 5);
    pub const REQUEST_ENTITY_INCOMPLETE: u8 = code(4, 8);
    pub const REQUEST_ENTITY_TOO_LARGE: u8 = code(4, 13);
    pub const SERVICE_UNAVAILABLE: u8 = code(5, 3);
}

/// Option numbers the tests use (RFC 7252 §5.10, RFC 7641, RFC 7959, RFC 7967).
pub mod opts {
    pub const OBSERVE: u16 = 6;
    pub const URI_PORT: u16 = 7;
    pub const URI_PATH: u16 = 11;
    pub const CONTENT_FORMAT: u16 = 12;
    pub const MAX_AGE: u16 = 14;
    pub const URI_QUERY: u16 = 15;
    pub const BLOCK2: u16 = 23;
    pub const BLOCK1: u16 = 27;
    pub const SIZE2: u16 = 28;
    pub const SIZE1: u16 = 60;
    pub const NO_RESPONSE: u16 = 258;
}

/// `c.dd` text of a code, as libcoap and the RFC print it.
pub fn code_text(c: u8) -> String {
    format!("{}.{:02}", c >> 5, c & 0x1f)
}

/// One CoAP message, decoded or to encode. Options are kept in the order given; `encode`
/// sorts them by number (stable, so repeated options keep their order, RFC 7252 §5.4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Version (1; others only to test that they are ignored).
    pub ver: u8,
    /// [`CON`], [`NON`], [`ACK`] or [`RST`].
    pub ty: u8,
    /// Request method or response code.
    pub code: u8,
    /// Message ID.
    pub mid: u16,
    /// 0..=8 bytes (longer only to test the refusal).
    pub token: Vec<u8>,
    /// (number, value).
    pub options: Vec<(u16, Vec<u8>)>,
    /// Without the 0xFF marker.
    pub payload: Vec<u8>,
}

impl Msg {
    /// A message with no token, options or payload.
    pub fn new(ty: u8, code: u8, mid: u16) -> Msg {
        Msg {
            ver: 1,
            ty,
            code,
            mid,
            token: Vec::new(),
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// A request for `target` (`path/segments?q1&q2`, no leading slash needed).
    pub fn request(ty: u8, code: u8, mid: u16, token: &[u8], target: &str) -> Msg {
        let mut m = Msg::new(ty, code, mid);
        m.token = token.to_vec();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            m.options.push((opts::URI_PATH, seg.as_bytes().to_vec()));
        }
        for q in query.split('&').filter(|s| !s.is_empty()) {
            m.options.push((opts::URI_QUERY, q.as_bytes().to_vec()));
        }
        m
    }

    /// An empty ACK or RST for `mid`.
    pub fn empty(ty: u8, mid: u16) -> Msg {
        Msg::new(ty, codes::EMPTY, mid)
    }

    /// Adds an option.
    #[must_use]
    pub fn with_option(mut self, number: u16, value: &[u8]) -> Msg {
        self.options.push((number, value.to_vec()));
        self
    }

    /// Adds a uint option in its shortest form (RFC 7252 §3.2).
    #[must_use]
    pub fn with_uint(self, number: u16, value: u32) -> Msg {
        let v = uint_bytes(value);
        self.with_option(number, &v)
    }

    /// Sets the payload.
    #[must_use]
    pub fn with_payload(mut self, payload: &[u8]) -> Msg {
        self.payload = payload.to_vec();
        self
    }

    /// The wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.payload.len());
        let tkl = u8::try_from(self.token.len()).unwrap_or(15).min(15);
        out.push((self.ver & 3) << 6 | (self.ty & 3) << 4 | tkl);
        out.push(self.code);
        out.extend_from_slice(&self.mid.to_be_bytes());
        out.extend_from_slice(&self.token);
        let mut sorted: Vec<&(u16, Vec<u8>)> = self.options.iter().collect();
        sorted.sort_by_key(|(n, _)| *n);
        let mut prev = 0u16;
        for (number, value) in sorted {
            push_option(&mut out, number - prev, value);
            prev = *number;
        }
        if !self.payload.is_empty() {
            out.push(0xff);
            out.extend_from_slice(&self.payload);
        }
        out
    }

    /// Decodes a datagram (RFC 7252 §3), checking every length.
    ///
    /// # Errors
    /// On a truncated header, token, option or a reserved nibble (15 outside the marker), or
    /// a payload marker followed by nothing.
    pub fn decode(b: &[u8]) -> Result<Msg> {
        let mut r = Reader { b, at: 0 };
        let first = r.u8()?;
        let code = r.u8()?;
        let mid = u16::from_be_bytes([r.u8()?, r.u8()?]);
        let tkl = usize::from(first & 0x0f);
        ensure!(tkl <= 8, "TKL {tkl} > 8");
        let token = r.take(tkl)?.to_vec();
        let mut options = Vec::new();
        let mut number = 0u16;
        let mut payload = Vec::new();
        while let Some(byte) = r.peek() {
            if byte == 0xff {
                r.at += 1;
                payload = r.rest().to_vec();
                ensure!(!payload.is_empty(), "payload marker with no payload");
                break;
            }
            r.at += 1;
            let delta = r.ext(byte >> 4)?;
            let len = r.ext(byte & 0x0f)?;
            number = number
                .checked_add(delta)
                .ok_or_else(|| anyhow!("option number overflows"))?;
            options.push((number, r.take(usize::from(len))?.to_vec()));
        }
        Ok(Msg {
            ver: first >> 6,
            ty: (first >> 4) & 3,
            code,
            mid,
            token,
            options,
            payload,
        })
    }

    /// The first value of option `number`.
    pub fn option(&self, number: u16) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, v)| v.as_slice())
    }

    /// Option `number` as a uint (RFC 7252 §3.2), if present and at most 4 bytes.
    pub fn uint(&self, number: u16) -> Option<u32> {
        let v = self.option(number)?;
        (v.len() <= 4).then(|| v.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)))
    }

    /// The Block1 or Block2 option (`number`) as (NUM, M, SZX).
    pub fn block(&self, number: u16) -> Option<(u32, bool, u8)> {
        self.uint(number).map(block_parts)
    }

    /// The payload as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// `T c.dd mid` for messages.
    pub fn describe(&self) -> String {
        let ty = ["CON", "NON", "ACK", "RST"]
            .get(usize::from(self.ty))
            .copied()
            .unwrap_or("?");
        format!(
            "{ty} {} mid {:#06x} token {:02x?} options {:?} payload {:?}",
            code_text(self.code),
            self.mid,
            self.token,
            self.options,
            self.text()
        )
    }
}

/// A uint option value in its shortest form (0 is empty).
pub fn uint_bytes(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b.get(skip..).unwrap_or_default().to_vec()
}

/// A Block option value (RFC 7959 §2.2): NUM, M, SZX (block size 2^(SZX+4)).
pub fn block_value(num: u32, more: bool, szx: u8) -> u32 {
    num << 4 | u32::from(more) << 3 | u32::from(szx & 7)
}

/// (NUM, M, SZX) of a Block option value.
pub fn block_parts(v: u32) -> (u32, bool, u8) {
    (v >> 4, v & 8 != 0, (v & 7) as u8)
}

fn push_option(out: &mut Vec<u8>, delta: u16, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    let (dn, dext) = nibble(delta);
    let (ln, lext) = nibble(len);
    out.push(dn << 4 | ln);
    out.extend_from_slice(&dext);
    out.extend_from_slice(&lext);
    out.extend_from_slice(value);
}

/// The 4-bit field and its extension bytes for `v` (RFC 7252 §3.1).
fn nibble(v: u16) -> (u8, Vec<u8>) {
    match v {
        0..=12 => (v as u8, Vec::new()),
        13..=268 => (13, vec![(v - 13) as u8]),
        _ => (14, (v - 269).to_be_bytes().to_vec()),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }

    fn u8(&mut self) -> Result<u8> {
        let v = self
            .peek()
            .ok_or_else(|| anyhow!("truncated at byte {}", self.at))?;
        self.at += 1;
        Ok(v)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).ok_or_else(|| anyhow!("overflow"))?;
        let s = self
            .b
            .get(self.at..end)
            .ok_or_else(|| anyhow!("truncated: {n} bytes wanted at {}", self.at))?;
        self.at = end;
        Ok(s)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = self.b.get(self.at..).unwrap_or_default();
        self.at = self.b.len();
        s
    }

    fn ext(&mut self, n: u8) -> Result<u16> {
        match n {
            0..=12 => Ok(u16::from(n)),
            13 => Ok(u16::from(self.u8()?) + 13),
            14 => {
                let v = u16::from_be_bytes([self.u8()?, self.u8()?]);
                v.checked_add(269)
                    .ok_or_else(|| anyhow!("option field overflows"))
            }
            _ => bail!("reserved option nibble 15"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The raw client.

/// RFC 7252 §4.8 ACK_TIMEOUT: the first retransmission wait of [`RawClient::request`].
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 7252 §4.8 MAX_RETRANSMIT.
pub const MAX_RETRANSMIT: u32 = 4;

/// A blocking UDP CoAP client that sends exactly the bytes it is given.
#[derive(Debug)]
pub struct RawClient {
    sock: UdpSocket,
    server: SocketAddr,
    next_mid: u16,
    next_token: u32,
}

impl RawClient {
    /// A client on an ephemeral port of the loopback of `server`'s family.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn new(server: SocketAddr) -> Result<RawClient> {
        let local: IpAddr = match server {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        RawClient::bind(server, local)
    }

    /// A client bound to `local` (e.g. one of 127.0.0.0/8, so each client is its own peer).
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn bind(server: SocketAddr, local: IpAddr) -> Result<RawClient> {
        let sock =
            UdpSocket::bind(SocketAddr::new(local, 0)).with_context(|| format!("bind {local}"))?;
        let port = sock.local_addr()?.port();
        Ok(RawClient {
            sock,
            server,
            // Different clients start at different MIDs, like real ones (RFC 7252 §4.4).
            next_mid: port.wrapping_mul(7919),
            next_token: u32::from(port) << 8,
        })
    }

    /// Its local address.
    ///
    /// # Errors
    /// When the socket cannot tell.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }

    /// A fresh Message ID.
    pub fn mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    /// A fresh 4-byte token.
    pub fn token(&mut self) -> Vec<u8> {
        self.next_token = self.next_token.wrapping_add(1);
        self.next_token.to_be_bytes().to_vec()
    }

    /// Sends raw bytes to the server.
    ///
    /// # Errors
    /// When the send fails.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<()> {
        self.sock
            .send_to(bytes, self.server)
            .with_context(|| format!("send to {}", self.server))?;
        Ok(())
    }

    /// Sends `m`.
    ///
    /// # Errors
    /// When the send fails.
    pub fn send(&self, m: &Msg) -> Result<()> {
        self.send_raw(&m.encode())
    }

    /// The next datagram from the server, or `None` after `timeout`.
    ///
    /// # Errors
    /// On a socket error.
    pub fn recv_raw(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        // Bounded: every round either returns or waits out part of the deadline.
        for _ in 0..10_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) if from == self.server => {
                    return Ok(Some(buf.get(..n).unwrap_or_default().to_vec()));
                }
                Ok(_) => {} // not from the gateway: ignore
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// The next message from the server, or `None` after `timeout`.
    ///
    /// # Errors
    /// On a socket error or an undecodable datagram.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Msg>> {
        match self.recv_raw(timeout)? {
            None => Ok(None),
            Some(b) => Msg::decode(&b)
                .map(Some)
                .with_context(|| format!("undecodable reply {b:02x?}")),
        }
    }

    /// Waits up to `timeout` for a message satisfying `want`; other messages are collected in
    /// `skipped` (a CON among them is acknowledged with an empty ACK so the server moves on).
    ///
    /// # Errors
    /// On a socket error or a bad datagram.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        skipped: &mut Vec<Msg>,
        mut want: impl FnMut(&Msg) -> bool,
    ) -> Result<Option<Msg>> {
        let deadline = Instant::now() + timeout;
        for _ in 0..10_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(m) = self.recv(left)? else {
                return Ok(None);
            };
            if want(&m) {
                return Ok(Some(m));
            }
            if m.ty == CON {
                self.send(&Msg::empty(ACK, m.mid))?;
            }
            skipped.push(m);
        }
        Ok(None)
    }

    /// Sends a request and returns its response, the RFC 7252 way: a CON is retransmitted
    /// with ACK_TIMEOUT doubling, up to [`MAX_RETRANSMIT`] times; the response is the
    /// piggy-backed ACK, or after an empty ACK the separate response (a CON, acknowledged
    /// here) with the same token. A NON request is sent once and waits `timeout` for a
    /// response with its token. Messages with other tokens are skipped (and ACKed if CON).
    ///
    /// # Errors
    /// On a socket error, a bad datagram, an RST, or no response within `timeout`.
    pub fn request(&self, req: &Msg, timeout: Duration) -> Result<Msg> {
        let deadline = Instant::now() + timeout;
        let bytes = req.encode();
        let mut wait = ACK_TIMEOUT;
        let mut retransmissions = 0;
        let mut acked = req.ty != CON;
        let mut next_send = Instant::now();
        let mut skipped = Vec::new();
        for _ in 0..10_000 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if !acked && now >= next_send {
                if retransmissions > MAX_RETRANSMIT {
                    bail!(
                        "no ACK for {} after {MAX_RETRANSMIT} retransmissions",
                        req.describe()
                    );
                }
                self.send_raw(&bytes)?;
                next_send = now + wait;
                wait *= 2;
                retransmissions += 1;
            } else if req.ty != CON && retransmissions == 0 {
                self.send_raw(&bytes)?;
                retransmissions = 1;
            }
            let until = if acked {
                deadline
            } else {
                next_send.min(deadline)
            };
            let Some(m) = self.recv(until.saturating_duration_since(Instant::now()))? else {
                continue;
            };
            match m.ty {
                RST if m.mid == req.mid => bail!("RST for {}", req.describe()),
                ACK if m.mid == req.mid && req.ty == CON => {
                    if m.code == codes::EMPTY {
                        acked = true;
                    } else {
                        return Ok(m);
                    }
                }
                CON | NON if m.token == req.token && m.code != codes::EMPTY => {
                    if m.ty == CON {
                        self.send(&Msg::empty(ACK, m.mid))?;
                    }
                    return Ok(m);
                }
                _ => {
                    if m.ty == CON {
                        self.send(&Msg::empty(ACK, m.mid))?;
                    }
                    skipped.push(m);
                }
            }
        }
        bail!(
            "no response to {} within {timeout:?}; skipped {:?}",
            req.describe(),
            skipped.iter().map(Msg::describe).collect::<Vec<_>>()
        )
    }

    /// Asserts that nothing arrives within `quiet`.
    ///
    /// # Errors
    /// When something does (it is described).
    pub fn assert_silent(&self, quiet: Duration) -> Result<()> {
        match self.recv_raw(quiet)? {
            None => Ok(()),
            Some(b) => bail!(
                "expected silence, got {}",
                Msg::decode(&b).map_or_else(|e| format!("{b:02x?} ({e})"), |m| m.describe())
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Independent clients.

/// How long one libcoap / aiocoap run may take (their own `-B` is shorter).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(40);

/// libcoap's client without DTLS (`SENSORGATE_COAP_CLIENT` overrides).
///
/// # Panics
/// When it is not installed.
pub fn libcoap_client() -> PathBuf {
    let path = std::env::var_os("SENSORGATE_COAP_CLIENT").map_or_else(
        || PathBuf::from("/usr/bin/coap-client-notls"),
        PathBuf::from,
    );
    if !path.is_file() {
        panic!(
            "coap-client-notls not found at {}: apt-get install libcoap3-bin \
             (or set SENSORGATE_COAP_CLIENT)",
            path.display()
        );
    }
    path
}

/// aiocoap's client in the test venv (next to [`python`]).
///
/// # Panics
/// When it is not installed.
pub fn aiocoap_client() -> PathBuf {
    let py = python();
    let path = py.parent().map_or_else(
        || PathBuf::from("aiocoap-client"),
        |d| d.join("aiocoap-client"),
    );
    if !path.is_file() {
        panic!(
            "aiocoap-client not found at {}: pip install -r tests/requirements.txt into the \
             venv of {}",
            path.display(),
            py.display()
        );
    }
    path
}

/// What a client printed, stdout then stderr.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `coap-client-notls -v 7 <args>` (bounded) and returns everything it printed.
///
/// # Errors
/// When it cannot run or does not finish within [`CLIENT_TIMEOUT`].
pub fn libcoap(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(libcoap_client());
    cmd.arg("-v").arg("7").args(args);
    Ok(output_text(&run_bounded(&mut cmd, CLIENT_TIMEOUT)?))
}

/// Runs `aiocoap-client <args>` (bounded); returns (success, everything printed). Its exit
/// status is advisory only: assert on the output.
///
/// # Errors
/// When it cannot run or does not finish within [`CLIENT_TIMEOUT`].
pub fn aiocoap(args: &[&str]) -> Result<(bool, String)> {
    let mut cmd = Command::new(aiocoap_client());
    cmd.args(args);
    let out = run_bounded(&mut cmd, CLIENT_TIMEOUT)?;
    Ok((out.status.success(), output_text(&out)))
}

/// One PDU libcoap printed with `-v 7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// `CON`, `NON`, `ACK`, `RST`.
    pub ty: String,
    /// `PUT`, `2.04`, ...
    pub code: String,
    /// The whole line.
    pub line: String,
}

/// The PDUs in libcoap's `-v 7` output, in order (`v:1 t:ACK c:2.04 i:...`).
pub fn libcoap_pdus(text: &str) -> Vec<Pdu> {
    text.lines()
        .filter_map(|l| {
            let at = l.find("v:1 t:")?;
            let rest = l.get(at..)?;
            let mut words = rest.split_whitespace();
            let _v = words.next()?;
            let ty = words.next()?.strip_prefix("t:")?;
            let code = words.next()?.strip_prefix("c:")?;
            Some(Pdu {
                ty: ty.to_owned(),
                code: code.to_owned(),
                line: rest.to_owned(),
            })
        })
        .collect()
}

/// The response codes (`2.04` ...) among libcoap's printed PDUs (codes with a class digit
/// other than 0, i.e. not requests or empty messages).
pub fn libcoap_responses(text: &str) -> Vec<String> {
    libcoap_pdus(text)
        .into_iter()
        .map(|p| p.code)
        .filter(|c| c.contains('.') && !c.starts_with("0."))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn rfc7252_appendix_a_get_temperature_encodes_to_known_bytes() {
        // RFC 7252 Figure 16: CON [0x7d34] GET /temperature, no token.
        let m = Msg::request(CON, codes::GET, 0x7d34, &[], "temperature");
        let mut want = vec![0x40, 0x01, 0x7d, 0x34, 0xbb];
        want.extend_from_slice(b"temperature");
        assert_eq!(m.encode(), want);
        assert_eq!(Msg::decode(&want).unwrap(), m);
    }

    #[test]
    fn a_put_with_token_queries_and_payload_encodes_options_in_order() {
        let m = Msg::request(CON, codes::PUT, 0x1234, &[0xab, 0xcd], "ps/a?qos=0&id=d")
            .with_payload(b"21.5");
        let mut want = vec![0x42, 0x03, 0x12, 0x34, 0xab, 0xcd];
        want.extend_from_slice(&[0xb2, b'p', b's', 0x01, b'a']); // Uri-Path 11, then delta 0
        want.extend_from_slice(&[0x45, b'q', b'o', b's', b'=', b'0']); // Uri-Query 15: delta 4
        want.extend_from_slice(&[0x04, b'i', b'd', b'=', b'd']);
        want.extend_from_slice(&[0xff, b'2', b'1', b'.', b'5']);
        assert_eq!(m.encode(), want);
        assert_eq!(Msg::decode(&want).unwrap(), m);
    }

    #[test]
    fn extended_deltas_and_lengths_use_13_and_14_forms() {
        // Delta 258 (No-Response): 13 + ext 245. Delta 2049-258=1791: 14 + 1522 (0x05f2). A
        // 300-byte value: length 14 + (300-269).
        let big = vec![7u8; 300];
        let m = Msg::new(NON, codes::POST, 1)
            .with_uint(opts::NO_RESPONSE, 2)
            .with_option(2049, &big);
        let b = m.encode();
        assert_eq!(&b[4..7], &[0xd1, 245, 2]);
        assert_eq!(&b[7..12], &[0xee, 0x05, 0xf2, 0x00, 31]);
        assert_eq!(b.len(), 12 + 300);
        assert_eq!(Msg::decode(&b).unwrap(), m);
    }

    #[test]
    fn an_ack_2_04_with_token_decodes() {
        let m = Msg::decode(&[0x62, 0x44, 0xbe, 0xef, 0x01, 0x02]).unwrap();
        assert_eq!((m.ty, m.code, m.mid), (ACK, codes::CHANGED, 0xbeef));
        assert_eq!(m.token, [1, 2]);
        assert_eq!(code_text(m.code), "2.04");
        assert!(m.options.is_empty() && m.payload.is_empty());
    }

    #[test]
    fn a_notification_with_observe_block2_and_payload_decodes() {
        // NON 2.05, token 0x7f, Observe 0x0102 (opt 6), Block2 (opt 23: delta 17 = 13-form
        // ext 4) NUM 0 M SZX 6 (0x0e), payload "on".
        let b = [
            0x51, 0x45, 0, 9, 0x7f, 0x62, 0x01, 0x02, 0xd1, 4, 0x0e, 0xff, b'o', b'n',
        ];
        let m = Msg::decode(&b).unwrap();
        assert_eq!(m.uint(opts::OBSERVE), Some(0x0102));
        assert_eq!(m.block(opts::BLOCK2), Some((0, true, 6)));
        assert_eq!(m.text(), "on");
    }

    #[test]
    fn a_4_13_with_size1_decodes() {
        // ACK 4.13 mid 5, no token, Size1 (60) = 1024: delta 13-form ext 47, length 2.
        let m = Msg::decode(&[0x60, 0x8d, 0, 5, 0xd2, 47, 0x04, 0x00]).unwrap();
        assert_eq!(m.code, codes::REQUEST_ENTITY_TOO_LARGE);
        assert_eq!(m.uint(opts::SIZE1), Some(1024));
    }

    #[test]
    fn bad_datagrams_are_errors_not_panics() {
        for b in [
            &[][..],
            &[0x40, 0x01, 0x00],                            // short header
            &[0x44, 0x01, 0, 1, 1, 2],                      // token shorter than TKL
            &[0x49, 0x01, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9], // TKL 9
            &[0x40, 0x01, 0, 1, 0xb5, b'a'],                // option value cut short
            &[0x40, 0x01, 0, 1, 0xd1],                      // extended delta missing
            &[0x40, 0x01, 0, 1, 0xf0],                      // nibble 15
            &[0x40, 0x01, 0, 1, 0xff],                      // marker, no payload
        ] {
            assert!(Msg::decode(b).is_err(), "{b:02x?}");
        }
    }

    #[test]
    fn block_values_round_trip() {
        assert_eq!(block_value(0, true, 2), 0x0a);
        assert_eq!(block_parts(0x0a), (0, true, 2));
        assert_eq!(
            block_parts(block_value(0xf_ffff, false, 6)),
            (0xf_ffff, false, 6)
        );
        assert_eq!(uint_bytes(0), Vec::<u8>::new());
        assert_eq!(uint_bytes(0x0102), vec![1, 2]);
    }

    #[test]
    fn libcoap_pdu_lines_are_parsed() {
        let text = "Dec 03 15:52:37.463 DEBG sending CoAP request:\n\
            v:1 t:CON c:PUT i:f984 {01} [ Uri-Path:x ] :: '21.5'\n\
            v:1 t:ACK c:2.31 i:f984 {01} [ Block1:0/M/64 ]\n\
            v:1 t:ACK c:2.04 i:f985 {02} [ ]\n";
        let pdus = libcoap_pdus(text);
        assert_eq!(pdus.len(), 3);
        assert_eq!((pdus[0].ty.as_str(), pdus[0].code.as_str()), ("CON", "PUT"));
        assert_eq!(libcoap_responses(text), ["2.31", "2.04"]);
    }
}
