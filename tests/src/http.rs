//! HTTP peers for the end-to-end tests of the HTTP ingress: curl runs, a raw TCP client that
//! writes and reads exact bytes, a test PKI made with the openssl CLI, token hashes from
//! `sensorgate hash-token`, the `[http]` config section, SSE stream readers and the
//! `tests/py/http_client.py` (httpx) driver.
//!
//! Invariants:
//! - Every client here is independent of the gateway's HTTP stack: curl (libcurl + nghttp2 +
//!   OpenSSL), httpx/h2 in Python, and a hand-written HTTP/1.1 reader (RFC 9112 §4-7: status
//!   line, fields, `Content-Length` or chunked body) that shares nothing with hyper.
//! - Every run and every read is bounded in time; nothing sleeps to pass. Readiness of the
//!   HTTP listener is a condition (an HTTP answer to a probe request), never a delay.
//! - Decoding a reply never panics on the bytes the gateway sent: every read is checked.
//! - Missing peers (curl, openssl, the httpx packages) fail the test with a message saying
//!   what to install, as the rest of the harness does; nothing is skipped silently.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::{
    GatewayConfig, READY_TIMEOUT, Rig, Script, free_tcp_port, poll_until, python, run_bounded,
    sensorgate_bin, temp_dir,
};

/// How long one HTTP exchange (curl run, raw read, python request file) may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Replies.

/// An HTTP response as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// `1.1`, `2` (curl's `%{http_version}`; the raw client says `1.1`).
    pub version: String,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Reply {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    ///
    /// # Errors
    /// When it is not JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body of {} is not JSON: {:?}", self.status, self.text()))
    }

    /// The `error` field of a JSON error body, if any.
    pub fn error_code(&self) -> Option<String> {
        self.json()
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
    }

    /// One line for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "HTTP/{} {} {:?} {}",
            self.version,
            self.status,
            self.headers,
            self.text()
        )
    }
}

/// Asserts the reply's status and (for an error) its JSON `error` code and the
/// `Content-Type: application/json` of every error body.
///
/// # Errors
/// When either differs.
pub fn expect_status(reply: &Reply, status: u16, error: Option<&str>) -> Result<()> {
    ensure!(
        reply.status == status,
        "expected {status} {error:?}, got {}",
        reply.describe()
    );
    if let Some(code) = error {
        ensure!(
            reply.error_code().as_deref() == Some(code),
            "expected error {code:?}, got {}",
            reply.describe()
        );
        ensure!(
            reply
                .header("content-type")
                .is_some_and(|v| v.starts_with("application/json")),
            "error body without Content-Type: application/json: {}",
            reply.describe()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// curl.

/// `curl` itself, failing the test with an install hint when it is missing.
///
/// # Panics
/// When curl cannot be found on `PATH`.
pub fn curl_cmd() -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join("curl").is_file()));
    if !found {
        panic!("curl not found on PATH: apt-get install curl");
    }
    Command::new("curl")
}

/// Runs curl with `args` (plus `-sS`, no proxy, a time bound) and returns what it printed
/// (exit status, stdout, stderr) without judging it: for tests that expect curl to fail.
///
/// # Errors
/// When curl cannot run or exceeds [`HTTP_TIMEOUT`].
pub fn curl_output(args: &[&str]) -> Result<Output> {
    let mut cmd = curl_cmd();
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "20"])
        .args(args);
    run_bounded(&mut cmd, HTTP_TIMEOUT)
}

/// One request with curl: `args` are curl's (method, data, headers, URL ...); returns the
/// last response's status, headers and body.
///
/// # Errors
/// When curl fails (its exit status and stderr say why) or exceeds [`HTTP_TIMEOUT`].
pub fn curl(args: &[&str]) -> Result<Reply> {
    let dir = temp_dir()?;
    let head = dir.path().join("head");
    let body = dir.path().join("body");
    let mut all: Vec<&str> = vec![
        "-D",
        path_str(&head)?,
        "-o",
        path_str(&body)?,
        "-w",
        "%{http_code} %{http_version}",
    ];
    all.extend_from_slice(args);
    let out = curl_output(&all)?;
    ensure!(
        out.status.success(),
        "curl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let w = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts = w.split_whitespace();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("curl printed no status: {w:?}"))?;
    let version = parts.next().unwrap_or_default().to_owned();
    let head_text = std::fs::read(&head).unwrap_or_default();
    let head_text = String::from_utf8_lossy(&head_text);
    // Several blocks with `100 Continue` or a redirect: the last one is the response.
    let last = head_text
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()
        .unwrap_or_default();
    let headers = last
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        version,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    })
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", p.display()))
}

/// `Authorization: Bearer <token>` as a curl `-H` value.
pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client: exact bytes out, a hand-written reader in.

/// A TCP connection that writes exactly what the test gives and parses responses itself.
#[derive(Debug)]
pub struct RawHttp {
    stream: TcpStream,
    /// Read but not yet consumed.
    buf: Vec<u8>,
}

/// Longest response head the reader accepts (the gateway's are tiny).
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body the reader accepts.
const MAX_BODY: usize = 64 * 1024 * 1024;

impl RawHttp {
    /// Connects to `addr` (bounded).
    ///
    /// # Errors
    /// When the connection is refused or times out.
    pub fn connect(addr: SocketAddr) -> Result<RawHttp> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(RawHttp {
            stream,
            buf: Vec::new(),
        })
    }

    /// Writes `bytes` (all of them).
    ///
    /// # Errors
    /// When the connection is closed.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
        self.stream.write_all(bytes)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF, `Ok(None)`-like timeouts as errors of
    /// kind `WouldBlock`/`TimedOut`.
    fn fill(&mut self, deadline: Instant) -> Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "timed out reading from the gateway");
        self.stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default());
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "timed out reading from the gateway (read so far: {:?})",
                    self.peek()
                )
            }
            Err(e) => Err(e.into()),
        }
    }

    fn peek(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// Reads until `pattern` is in the buffer; returns its end offset.
    fn read_until(&mut self, pattern: &[u8], deadline: Instant, limit: usize) -> Result<usize> {
        loop {
            if let Some(at) = find(&self.buf, pattern) {
                return Ok(at + pattern.len());
            }
            ensure!(
                self.buf.len() <= limit,
                "no {pattern:?} within {limit} bytes"
            );
            ensure!(
                self.fill(deadline)? > 0,
                "connection closed before {:?}; read {:?}",
                String::from_utf8_lossy(pattern),
                self.peek()
            );
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let rest = self.buf.split_off(n.min(self.buf.len()));
        std::mem::replace(&mut self.buf, rest)
    }

    /// Reads one response head: status and header fields.
    ///
    /// # Errors
    /// On timeout, EOF, or a malformed head.
    pub fn read_head(&mut self, timeout: Duration) -> Result<Reply> {
        let deadline = Instant::now() + timeout;
        let end = self.read_until(b"\r\n\r\n", deadline, MAX_HEAD)?;
        let head = self.take(end);
        let text = String::from_utf8(head).context("response head is not UTF-8")?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts
            .next()
            .and_then(|v| v.strip_prefix("HTTP/"))
            .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?
            .to_owned();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
        let mut headers = Vec::new();
        for l in lines.filter(|l| !l.is_empty()) {
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| anyhow!("bad header line {l:?}"))?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Ok(Reply {
            status,
            version,
            headers,
            body: Vec::new(),
        })
    }

    /// Reads one whole response: head, then the body by `Content-Length`, chunked coding, or
    /// (neither) until EOF.
    ///
    /// # Errors
    /// On timeout, EOF before the end, or a malformed response.
    pub fn read_reply(&mut self, timeout: Duration) -> Result<Reply> {
        let deadline = Instant::now() + timeout;
        let mut reply = self.read_head(timeout)?;
        // 1xx responses have no body; the final one follows.
        while (100..200).contains(&reply.status) {
            reply = self.read_head(deadline.saturating_duration_since(Instant::now()))?;
        }
        if reply
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
        {
            reply.body = self.read_chunked(deadline)?;
        } else if let Some(len) = reply.header("content-length") {
            let len: usize = len.parse().context("bad Content-Length")?;
            ensure!(len <= MAX_BODY, "Content-Length {len} too large");
            while self.buf.len() < len {
                ensure!(self.fill(deadline)? > 0, "EOF inside a body of {len} bytes");
            }
            reply.body = self.take(len);
        } else if reply.status != 204 && reply.status != 304 {
            while self.fill(deadline)? > 0 {
                ensure!(self.buf.len() <= MAX_BODY, "body too large");
            }
            reply.body = self.take(self.buf.len());
        }
        Ok(reply)
    }

    fn read_chunked(&mut self, deadline: Instant) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let end = self.read_until(b"\r\n", deadline, MAX_HEAD)?;
            let line = self.take(end);
            let line = String::from_utf8_lossy(&line);
            let size_text = line.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let end = self.read_until(b"\r\n", deadline, MAX_HEAD)?;
                    if self.take(end).len() == 2 {
                        return Ok(body);
                    }
                }
            }
            ensure!(body.len() + size <= MAX_BODY, "chunked body too large");
            while self.buf.len() < size + 2 {
                ensure!(self.fill(deadline)? > 0, "EOF inside a chunk");
            }
            let chunk = self.take(size + 2);
            body.extend_from_slice(chunk.get(..size).unwrap_or_default());
        }
    }

    /// Sends `request` and reads the response.
    ///
    /// # Errors
    /// As [`RawHttp::send`] and [`RawHttp::read_reply`].
    pub fn exchange(&mut self, request: &[u8]) -> Result<Reply> {
        self.send(request)?;
        self.read_reply(HTTP_TIMEOUT)
    }

    /// Reads and discards everything until the peer closes; returns how many bytes came. A
    /// reset counts as a close.
    ///
    /// # Errors
    /// When the connection is still open after `timeout`.
    pub fn read_to_eof(&mut self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut total = self.buf.len();
        self.buf.clear();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "connection still open after {timeout:?} ({total} bytes read)"
            );
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(total),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("connection still open after {timeout:?} ({total} bytes read)")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads until `pattern` has been seen in the stream (chunk framing included as is).
    ///
    /// # Errors
    /// On timeout or EOF first.
    pub fn wait_for(&mut self, pattern: &[u8], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let end = self.read_until(pattern, deadline, MAX_BODY)?;
        self.take(end);
        Ok(())
    }

    /// The socket (to shut down one direction, or to keep it unread).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP/1.1 request's bytes: `method target`, `Host`, the given header lines, a
/// `Content-Length` for `body` (unless a header line already frames it), then `body`.
pub fn request(method: &str, target: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    let framed = headers.iter().any(|h| {
        let h = h.to_ascii_lowercase();
        h.starts_with("content-length:") || h.starts_with("transfer-encoding:")
    });
    if !framed && (!body.is_empty() || method == "POST") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

// ---------------------------------------------------------------------------------------------
// Tokens and the `[http]` section.

/// `token_hash = "sha256:..."` for `token`, from `sensorgate hash-token` reading it on stdin
/// (so every test that configures a device also tests the CLI).
///
/// # Errors
/// When the CLI fails or prints something else.
pub fn hash_token(token: &str) -> Result<String> {
    let out = hash_token_cli(&[], token.as_bytes())?;
    ensure!(
        out.status.success(),
        "sensorgate hash-token failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    parse_hash_line(&text).ok_or_else(|| anyhow!("hash-token printed {text:?}"))
}

/// The `sha256:<64 hex>` of a `token_hash = "..."` line in `text`.
pub fn parse_hash_line(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("token_hash")?.trim_start();
        let v = v.strip_prefix('=')?.trim().trim_matches('"');
        let hex = v.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| v.to_owned())
    })
}

/// Runs `sensorgate hash-token <args>` with `stdin` as its standard input (bounded).
///
/// # Errors
/// When it cannot run or does not finish.
pub fn hash_token_cli(args: &[&str], stdin: &[u8]) -> Result<Output> {
    let dir = temp_dir()?;
    let input = dir.path().join("stdin");
    std::fs::write(&input, stdin)?;
    // `run_bounded` closes stdin; the shell redirects the file instead.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("bin=\"$1\"; input=\"$2\"; shift 2; exec \"$bin\" hash-token \"$@\" < \"$input\"")
        .arg("sh")
        .arg(sensorgate_bin())
        .arg(&input)
        .args(args)
        .env_remove("RUST_LOG");
    run_bounded(&mut cmd, Duration::from_secs(20))
}

/// A `[[http.device]]`.
#[derive(Debug, Clone)]
pub struct Device {
    /// `id`.
    pub id: String,
    /// The plain token (hashed into `token_hash` with the CLI); `None`: certificate only.
    pub token: Option<String>,
    /// `publish` prefixes.
    pub publish: Vec<String>,
    /// `subscribe` prefixes.
    pub subscribe: Vec<String>,
}

impl Device {
    /// A device with token `token`, publishing under `sensors/<id>` and subscribing under
    /// `cmd/<id>`.
    pub fn new(id: &str, token: &str) -> Device {
        Device {
            id: id.to_owned(),
            token: Some(token.to_owned()),
            publish: vec![format!("sensors/{id}")],
            subscribe: vec![format!("cmd/{id}")],
        }
    }

    /// Replaces the publish prefixes.
    #[must_use]
    pub fn publish(mut self, prefixes: &[&str]) -> Device {
        self.publish = prefixes.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    /// Replaces the subscribe prefixes.
    #[must_use]
    pub fn subscribe(mut self, prefixes: &[&str]) -> Device {
        self.subscribe = prefixes.iter().map(|p| (*p).to_owned()).collect();
        self
    }
}

/// Token of the standard device `dev1` (>= 16 b64token characters).
pub const TOKEN1: &str = "dev1-token-0123456789abcdef";
/// Token of the standard device `dev2`.
pub const TOKEN2: &str = "dev2-token-fedcba9876543210";

/// `dev1` and `dev2` with [`TOKEN1`] and [`TOKEN2`].
pub fn two_devices() -> Vec<Device> {
    vec![Device::new("dev1", TOKEN1), Device::new("dev2", TOKEN2)]
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The `[http]` section a test runs with.
#[derive(Debug, Clone)]
pub struct HttpSetup {
    /// `listen` (plain); empty with TLS only.
    pub listen: Vec<SocketAddr>,
    /// `tls_listen`.
    pub tls_listen: Vec<SocketAddr>,
    /// `allow_anonymous`.
    pub anonymous: bool,
    /// Extra `key = value` lines for `[http]`.
    pub lines: String,
    /// `[[http.device]]` entries.
    pub devices: Vec<Device>,
}

impl HttpSetup {
    /// A plain listener on a free 127.0.0.1 port, anonymous off, no devices.
    ///
    /// # Errors
    /// When no port is free.
    pub fn new() -> Result<HttpSetup> {
        Ok(HttpSetup {
            listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, free_tcp_port()?))],
            tls_listen: Vec::new(),
            anonymous: false,
            lines: String::new(),
            devices: Vec::new(),
        })
    }

    /// Anonymous access on (every listener is loopback).
    #[must_use]
    pub fn anonymous(mut self) -> HttpSetup {
        self.anonymous = true;
        self
    }

    /// Adds `key = value` lines to `[http]`.
    #[must_use]
    pub fn lines(mut self, lines: &str) -> HttpSetup {
        self.lines.push_str(lines);
        if !lines.ends_with('\n') {
            self.lines.push('\n');
        }
        self
    }

    /// Adds devices.
    #[must_use]
    pub fn devices(mut self, devices: Vec<Device>) -> HttpSetup {
        self.devices.extend(devices);
        self
    }

    /// The plain listener (the first `listen`).
    ///
    /// # Panics
    /// When there is none.
    pub fn addr(&self) -> SocketAddr {
        match self.listen.first() {
            Some(a) => *a,
            None => panic!("HttpSetup has no plain listener"),
        }
    }

    /// The TOML text (tokens hashed with the CLI).
    ///
    /// # Errors
    /// When `hash-token` fails.
    pub fn render(&self) -> Result<String> {
        let addrs =
            |v: &[SocketAddr]| toml_list(&v.iter().map(ToString::to_string).collect::<Vec<_>>());
        let mut s = format!(
            "\n[http]\nlisten = {}\nallow_anonymous = {}\n",
            addrs(&self.listen),
            self.anonymous
        );
        if !self.tls_listen.is_empty() {
            s.push_str(&format!("tls_listen = {}\n", addrs(&self.tls_listen)));
        }
        s.push_str(&self.lines);
        for d in &self.devices {
            s.push_str(&format!("\n[[http.device]]\nid = \"{}\"\n", d.id));
            if let Some(t) = &d.token {
                s.push_str(&format!("token_hash = \"{}\"\n", hash_token(t)?));
            }
            s.push_str(&format!(
                "publish = {}\nsubscribe = {}\n",
                toml_list(&d.publish),
                toml_list(&d.subscribe)
            ));
        }
        Ok(s)
    }
}

/// Waits until the HTTP listener at `addr` answers a request (any status: `GET
/// /v1/ready-probe` is a 404 once the ingress serves).
///
/// # Errors
/// When nothing answers within [`READY_TIMEOUT`].
pub fn wait_http_ready(addr: SocketAddr) -> Result<()> {
    poll_until(
        "the HTTP listener to answer",
        READY_TIMEOUT,
        Duration::from_millis(50),
        || {
            let Ok(mut c) = RawHttp::connect(addr) else {
                return Ok(None);
            };
            let probe = request("GET", "/v1/ready-probe", &["Connection: close"], b"");
            Ok(c.send(&probe)
                .and_then(|()| c.read_reply(Duration::from_secs(2)))
                .ok()
                .map(|_| ()))
        },
    )
}

/// A broker and a gateway with an `[http]` section, the HTTP listener ready.
pub struct HttpRig {
    /// Broker and gateway.
    pub rig: Rig,
    /// The plain HTTP listener, when there is one.
    pub addr: Option<SocketAddr>,
    /// The TLS listener, when there is one.
    pub tls_addr: Option<SocketAddr>,
}

impl HttpRig {
    /// Starts a broker and a gateway with `http` (and the admin listener), then waits for
    /// every HTTP listener.
    ///
    /// # Errors
    /// When anything does not come up.
    pub fn start(http: &HttpSetup) -> Result<HttpRig> {
        HttpRig::start_with(http, |_| Ok(()))
    }

    /// As [`HttpRig::start`], letting `edit` change the rest of the config first.
    ///
    /// # Errors
    /// When anything does not come up or `edit` fails.
    pub fn start_with(
        http: &HttpSetup,
        edit: impl FnOnce(&mut GatewayConfig) -> Result<()>,
    ) -> Result<HttpRig> {
        let section = http.render()?;
        let rig = Rig::start_with(|c| {
            c.with_admin()?;
            edit(c)?;
            c.extra_sections.push_str(&section);
            Ok(())
        })?;
        let addr = http.listen.first().copied();
        if let Some(a) = addr {
            wait_http_ready(a).with_context(|| format!("gateway log:\n{}", rig.gateway.log()))?;
        }
        let tls_addr = http.tls_listen.first().copied();
        if let Some(a) = tls_addr {
            // A TCP connect is enough: the TLS listener binds with the plain one.
            poll_until(
                "the HTTPS listener to accept",
                READY_TIMEOUT,
                Duration::from_millis(50),
                || Ok(TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok()),
            )?;
        }
        Ok(HttpRig {
            rig,
            addr,
            tls_addr,
        })
    }

    /// `http://<plain listener><path>`.
    ///
    /// # Panics
    /// When there is no plain listener.
    pub fn url(&self, path: &str) -> String {
        match self.addr {
            Some(a) => format!("http://{a}{path}"),
            None => panic!("this rig has no plain HTTP listener"),
        }
    }

    /// `http://<plain listener>`.
    pub fn base(&self) -> String {
        self.url("")
    }

    /// The plain listener's address.
    ///
    /// # Panics
    /// When there is none.
    pub fn addr(&self) -> SocketAddr {
        match self.addr {
            Some(a) => a,
            None => panic!("this rig has no plain HTTP listener"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics.

/// The sum of the samples of `name` (e.g. `sensorgate_downlink_dropped_total`) whose labels
/// include every `labels` pair, from Prometheus text; `None` when no sample matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            && let Ok(v) = value.parse::<f64>()
        {
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events.

/// One SSE event (RFC: WHATWG HTML "Server-sent events", §9.2.6 interpretation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// `id:`.
    pub id: Option<String>,
    /// `event:` (default `message`).
    pub event: String,
    /// `data:` lines joined with `\n`.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON.
    ///
    /// # Errors
    /// When it is not JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.data).with_context(|| format!("SSE data {:?}", self.data))
    }

    /// A message event's payload bytes (`payload` text, or `payload_b64` decoded).
    pub fn payload(&self) -> Option<Vec<u8>> {
        let v = self.json().ok()?;
        if let Some(p) = v.get("payload").and_then(Value::as_str) {
            return Some(p.as_bytes().to_vec());
        }
        v.get("payload_b64")
            .and_then(Value::as_str)
            .and_then(b64_decode)
    }

    /// A message event's topic.
    pub fn topic(&self) -> Option<String> {
        self.json()
            .ok()?
            .get("topic")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// Standard base64 (RFC 4648 §4, padding optional) decoding; `None` on a bad character.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Standard base64 with padding.
pub fn b64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let idx = ((n >> (18 - 6 * i)) & 63) as usize;
                out.push(char::from(A.get(idx).copied().unwrap_or(b'A')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An SSE stream read by `curl -N` (an independent client), line by line.
pub struct CurlSse {
    script: Script,
}

impl CurlSse {
    /// `curl -N` on `url` with `args` (headers ...) before it.
    ///
    /// # Errors
    /// When curl cannot be spawned.
    pub fn start(url: &str, args: &[&str]) -> Result<CurlSse> {
        let mut cmd = curl_cmd();
        cmd.args(["-N", "-sS", "--noproxy", "*", "--max-time", "120"])
            .args(args)
            .arg(url);
        Ok(CurlSse {
            script: Script::spawn("curl-sse", &mut cmd)?,
        })
    }

    /// The next event within `timeout` (comments skipped), `None` on timeout.
    ///
    /// # Errors
    /// When curl exited (the stream ended).
    pub fn next(&mut self, timeout: Duration) -> Result<Option<SseEvent>> {
        let deadline = Instant::now() + timeout;
        let mut ev = SseEvent::default();
        let mut any = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let Some(line) = self.script.line(left)? else {
                return Ok(None);
            };
            if line.is_empty() {
                if any {
                    if ev.event.is_empty() {
                        ev.event = "message".into();
                    }
                    return Ok(Some(ev));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            any = true;
            match field {
                "id" => ev.id = Some(value),
                "event" => ev.event = value,
                "data" => {
                    if !ev.data.is_empty() {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(&value);
                }
                _ => {}
            }
        }
    }

    /// Reads until the `ready` event; returns its data.
    ///
    /// # Errors
    /// When it does not come within [`READY_TIMEOUT`] or the stream ends.
    pub fn ready(&mut self) -> Result<Value> {
        match self.next(READY_TIMEOUT)? {
            Some(ev) if ev.event == "ready" => ev.json(),
            Some(ev) => bail!("first SSE event is not ready: {ev:?}"),
            None => bail!(
                "no ready event within {READY_TIMEOUT:?}: {}",
                self.script.stderr()
            ),
        }
    }

    /// The next `message` event whose payload does not start with `skip` (late probes),
    /// within `timeout`.
    ///
    /// # Errors
    /// On timeout or the end of the stream.
    pub fn message(&mut self, timeout: Duration, skip: &str) -> Result<SseEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(ev) = self.next(left)? else {
                bail!("no SSE message within {timeout:?}")
            };
            let probe = ev
                .payload()
                .is_some_and(|p| !skip.is_empty() && p.starts_with(skip.as_bytes()));
            if ev.event == "message" && !probe {
                return Ok(ev);
            }
        }
    }

    /// Waits until curl exits (the server ended the stream).
    ///
    /// # Errors
    /// When it still runs after `timeout`.
    pub fn wait_end(&mut self, timeout: Duration) -> Result<()> {
        self.script.wait_exit(timeout).map(|_| ())
    }

    /// curl's stderr.
    pub fn stderr(&self) -> String {
        self.script.stderr()
    }

    /// curl's PID while it runs (to stop it with SIGSTOP: a reader that stalls).
    pub fn pid(&self) -> Option<u32> {
        self.script.pid()
    }
}

/// Waits until the upstream subscription behind an SSE stream is live: publishes QoS 1
/// probes (`probe-<n>`) on `topic` through the broker until one arrives on `stream`.
///
/// # Errors
/// When none arrives within [`READY_TIMEOUT`].
pub fn await_sse_live(stream: &mut CurlSse, broker_port: u16, topic: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for round in 0..20 {
        let payload = format!("{}{round}", crate::PROBE_PREFIX);
        crate::publish_upstream(broker_port, &[crate::UpMsg::new(topic, &payload, 1)])?;
        let wait = Duration::from_secs(3).min(deadline.saturating_duration_since(Instant::now()));
        let until = Instant::now() + wait;
        while let Some(ev) = stream.next(until.saturating_duration_since(Instant::now()))? {
            if ev.event == "message"
                && ev
                    .payload()
                    .is_some_and(|p| p.starts_with(crate::PROBE_PREFIX.as_bytes()))
            {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    bail!("the SSE subscription to {topic} never went live")
}

// ---------------------------------------------------------------------------------------------
// The httpx client script.

/// A request for [`py_send`].
#[derive(Debug, Clone)]
pub struct PyRequest {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header fields.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl PyRequest {
    /// `POST path` with `body`.
    pub fn post(path: &str, body: impl AsRef<[u8]>) -> PyRequest {
        PyRequest {
            method: "POST".into(),
            path: path.into(),
            headers: Vec::new(),
            body: body.as_ref().to_vec(),
        }
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> PyRequest {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Sends `reqs` in order with httpx over one keep-alive client (`extra`: `--http2`, `--h2c`,
/// `--cacert` ...) and returns the replies.
///
/// # Errors
/// When the script fails or does not answer every request within [`HTTP_TIMEOUT`] each.
pub fn py_send(base: &str, reqs: &[PyRequest], extra: &[&str]) -> Result<Vec<Reply>> {
    let dir = temp_dir()?;
    let file = dir.path().join("requests.jsonl");
    let mut text = String::new();
    for r in reqs {
        let headers: serde_json::Map<String, Value> = r
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        text.push_str(
            &serde_json::json!({
                "method": r.method,
                "path": r.path,
                "headers": headers,
                "body_b64": b64_encode(&r.body),
            })
            .to_string(),
        );
        text.push('\n');
    }
    std::fs::write(&file, text)?;
    let mut args: Vec<String> = vec![
        "send".into(),
        "--base".into(),
        base.into(),
        "--file".into(),
        path_str(&file)?.into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let script = py_client(&args)?;
    let mut out = Vec::new();
    for i in 0..reqs.len() {
        let line =
            script.expect_line(&format!("reply {i}"), HTTP_TIMEOUT, |l| l.starts_with('{'))?;
        let v: Value = serde_json::from_str(&line)?;
        let headers = v
            .get("headers")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Reply {
            status: v
                .get("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| anyhow!("no status in {line}"))?,
            version: v
                .get("version")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            headers,
            body: v
                .get("body_b64")
                .and_then(Value::as_str)
                .and_then(b64_decode)
                .unwrap_or_default(),
        });
    }
    script.expect_line("DONE", HTTP_TIMEOUT, |l| l == "DONE")?;
    Ok(out)
}

/// Runs `tests/py/http_client.py <args>`, checking first that httpx is installed.
///
/// # Errors
/// When it cannot be spawned.
///
/// # Panics
/// When httpx, h2 or httpx_sse are missing from the venv (with the install command).
pub fn py_client(args: &[String]) -> Result<Script> {
    require_httpx();
    Script::python("http_client.py", args)
}

/// Fails the test (never skips it) when the Python HTTP client packages are missing.
///
/// # Panics
/// When `import httpx, h2, httpx_sse` fails in the test venv.
pub fn require_httpx() {
    let mut cmd = Command::new(python());
    cmd.args(["-c", "import httpx, h2, httpx_sse"]);
    let ok = run_bounded(&mut cmd, Duration::from_secs(30))
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        panic!(
            "httpx[http2] and httpx-sse are not installed for {}: {} -m pip install -r \
             tests/requirements.txt",
            python().display(),
            python().display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A test PKI (openssl CLI).

/// Files of [`make_ca`]: every certificate P-256 (ECDSA), PEM.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The test CA (`basicConstraints=critical,CA:TRUE`, `keyUsage=critical,keyCertSign`).
    pub ca: PathBuf,
    /// Server certificate (`subjectAltName=IP:127.0.0.1,IP:::1`) signed by the CA, and key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client certificate `CN=dev1` signed by the CA, and key.
    pub dev1_cert: PathBuf,
    pub dev1_key: PathBuf,
    /// Client certificate `CN=dev2` signed by the CA, and key.
    pub dev2_cert: PathBuf,
    pub dev2_key: PathBuf,
    /// Client certificate `CN=ghost` (a device nobody configured) signed by the CA, and key.
    pub ghost_cert: PathBuf,
    pub ghost_key: PathBuf,
    /// A second CA, and a `CN=dev1` client certificate it signed, and its key.
    pub other_ca: PathBuf,
    pub other_dev1_cert: PathBuf,
    pub other_dev1_key: PathBuf,
}

fn openssl(args: &[&str]) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join("openssl").is_file()));
    if !found {
        panic!("openssl not found on PATH: apt-get install openssl");
    }
    let out = run_bounded(Command::new("openssl").args(args), Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "openssl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn make_root(dir: &Path, name: &str, cn: &str) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        path_str(&key)?,
        "-out",
        path_str(&cert)?,
        "-days",
        "30",
        "-subj",
        &format!("/CN={cn}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])?;
    Ok((cert, key))
}

/// Issues `name.pem`/`name.key` with subject `CN=cn` signed by `ca`, with the extension lines
/// `ext` (an openssl extfile section).
fn issue(
    dir: &Path,
    ca: &(PathBuf, PathBuf),
    name: &str,
    cn: &str,
    ext: &str,
) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let cert = dir.join(format!("{name}.pem"));
    let extfile = dir.join(format!("{name}.ext"));
    std::fs::write(&extfile, ext)?;
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        path_str(&key)?,
        "-out",
        path_str(&csr)?,
        "-subj",
        &format!("/CN={cn}"),
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&csr)?,
        "-CA",
        path_str(&ca.0)?,
        "-CAkey",
        path_str(&ca.1)?,
        "-CAcreateserial",
        "-out",
        path_str(&cert)?,
        "-days",
        "30",
        "-sha256",
        "-extfile",
        path_str(&extfile)?,
    ])?;
    Ok((cert, key))
}

/// Makes a test PKI in `dir` with the openssl CLI (see [`Pki`]).
///
/// # Errors
/// When openssl fails.
///
/// # Panics
/// When openssl is not installed.
pub fn make_ca(dir: &Path) -> Result<Pki> {
    let ca = make_root(dir, "ca", "sensorgate test CA")?;
    let other = make_root(dir, "other-ca", "another test CA")?;
    let server = issue(
        dir,
        &ca,
        "server",
        "127.0.0.1",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:::1\n",
    )?;
    let client_ext = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                      extendedKeyUsage=clientAuth\n";
    let dev1 = issue(dir, &ca, "dev1", "dev1", client_ext)?;
    let dev2 = issue(dir, &ca, "dev2", "dev2", client_ext)?;
    let ghost = issue(dir, &ca, "ghost", "ghost", client_ext)?;
    let other_dev1 = issue(dir, &other, "other-dev1", "dev1", client_ext)?;
    Ok(Pki {
        ca: ca.0,
        server_cert: server.0,
        server_key: server.1,
        dev1_cert: dev1.0,
        dev1_key: dev1.1,
        dev2_cert: dev2.0,
        dev2_key: dev2.1,
        ghost_cert: ghost.0,
        ghost_key: ghost.1,
        other_ca: other.0,
        other_dev1_cert: other_dev1.0,
        other_dev1_key: other_dev1.1,
    })
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// `VmRSS` of `pid` in KiB, from `/proc`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Reads lines of `reader` until one satisfies `want` (bounded by the reader's own timeout).
///
/// # Errors
/// On EOF or a read error first.
pub fn read_line_until(
    reader: &mut impl BufRead,
    mut want: impl FnMut(&str) -> bool,
) -> Result<String> {
    let mut line = String::new();
    for _ in 0..1_000_000 {
        line.clear();
        ensure!(reader.read_line(&mut line)? > 0, "EOF");
        if want(line.trim_end()) {
            return Ok(line.trim_end().to_owned());
        }
    }
    bail!("no such line")
}

/// A buffered reader over a clone of `stream` (for line-oriented reads of a raw stream).
///
/// # Errors
/// When the socket cannot be cloned.
pub fn line_reader(stream: &TcpStream, timeout: Duration) -> Result<BufReader<TcpStream>> {
    let s = stream.try_clone()?;
    s.set_read_timeout(Some(timeout))?;
    Ok(BufReader::new(s))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::net::TcpListener;

    use super::*;

    /// A one-shot server on a free loopback port answering the first request with `response`
    /// once its head arrived; returns the address and the request head it read.
    fn canned(response: &'static [u8]) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut b).unwrap() == 0 {
                    break;
                }
                head.push(b[0]);
            }
            s.write_all(response).unwrap();
            String::from_utf8_lossy(&head).into_owned()
        });
        (addr, t)
    }

    #[test]
    fn the_raw_client_reads_chunked_and_length_framed_replies() {
        let (addr, t) = canned(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Payload Too Large\r\n\
              Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
              9\r\n{\"error\":\r\n12;x=1\r\n\"too_large\",\"a\":1}\r\n0\r\n\r\n",
        );
        let mut c = RawHttp::connect(addr).unwrap();
        let r = c
            .exchange(&request("POST", "/v1/publish/x", &["X-A: 1"], b"hi"))
            .unwrap();
        expect_status(&r, 413, Some("too_large")).unwrap();
        assert_eq!(r.json().unwrap()["a"], 1);
        let head = t.join().unwrap();
        assert!(
            head.starts_with("POST /v1/publish/x HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("Content-Length: 2\r\n"), "{head}");

        let (addr, _t) = canned(b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\n\r\nhello");
        let r = RawHttp::connect(addr)
            .unwrap()
            .exchange(&request("GET", "/", &[], b""))
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (202, &b"hello"[..]));
    }

    #[test]
    fn curl_returns_status_headers_and_body() {
        let (addr, t) = canned(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 2\r\n\
              Connection: close\r\n\r\n{}",
        );
        let r = curl(&[
            "-X",
            "POST",
            "--data-binary",
            "21.5",
            "-H",
            &bearer(TOKEN1),
            &format!("http://{addr}/v1/publish/a?qos=1"),
        ])
        .unwrap();
        assert_eq!(r.status, 429, "{}", r.describe());
        assert_eq!(r.header("Retry-After"), Some("7"));
        assert_eq!(r.version, "1.1");
        assert_eq!(r.body, b"{}");
        let head = t.join().unwrap();
        assert!(
            head.contains(&format!("Authorization: Bearer {TOKEN1}")),
            "{head}"
        );
    }

    #[test]
    fn curl_sse_parses_events_skipping_comments_and_probes() {
        let (addr, _t) = canned(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n\
              retry: 5000\nevent: ready\ndata: {\"filters\":[\"a/#\"]}\n\n: ka\n\n\
              id: 1\nevent: message\ndata: {\"topic\":\"a/p\",\"payload\":\"probe-0\"}\n\n\
              id: 2\nevent: message\ndata: {\"topic\":\"a/b\",\"payload_b64\":\"/wCA\"}\n\n\
              event: dropped\ndata: {\"dropped\":3}\n\n",
        );
        let mut s =
            CurlSse::start(&format!("http://{addr}/v1/subscribe?filter=a/%23"), &[]).unwrap();
        assert_eq!(s.ready().unwrap(), serde_json::json!({"filters": ["a/#"]}));
        let ev = s.message(HTTP_TIMEOUT, "probe-").unwrap();
        assert_eq!(ev.id.as_deref(), Some("2"));
        assert_eq!(ev.topic().as_deref(), Some("a/b"));
        assert_eq!(ev.payload().unwrap(), [0xff, 0x00, 0x80]);
        let ev = s.next(HTTP_TIMEOUT).unwrap().unwrap();
        assert_eq!(
            (ev.event.as_str(), ev.data.as_str()),
            ("dropped", "{\"dropped\":3}")
        );
        s.wait_end(HTTP_TIMEOUT).unwrap();
    }

    #[test]
    fn base64_round_trips_and_hash_lines_parse() {
        for n in 0..40 {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(b64_decode(&b64_encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(b64_encode(b"abc"), "YWJj");
        assert_eq!(b64_decode("/w=="), Some(vec![0xff]));
        let h = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(parse_hash_line(&format!("token_hash = \"{h}\"\n")), Some(h));
        assert_eq!(parse_hash_line("token_hash = \"sha256:12\""), None);
    }

    #[test]
    fn metric_sums_matching_samples() {
        let text = "# TYPE x counter\nx_total{protocol=\"http\",reason=\"queue_full\"} 3\n\
                    x_total{protocol=\"http\",reason=\"too_large\"} 4\nx_total{protocol=\"coap\"} 9\n";
        assert_eq!(metric(text, "x_total", &[("protocol", "http")]), Some(7.0));
        assert_eq!(
            metric(text, "x_total", &[("reason", "queue_full")]),
            Some(3.0)
        );
        assert_eq!(metric(text, "y_total", &[]), None);
    }

    /// The PKI is what rustls/webpki want, checked with openssl and served by `openssl
    /// s_server` to curl: the server certificate verifies for 127.0.0.1 against the CA; a
    /// client certificate of the other CA does not verify against the CA.
    #[test]
    fn make_ca_issues_a_server_certificate_curl_accepts() {
        let dir = temp_dir().unwrap();
        let pki = make_ca(dir.path()).unwrap();
        let ca = path_str(&pki.ca).unwrap();
        for cert in [&pki.server_cert, &pki.dev1_cert, &pki.dev2_cert] {
            openssl(&["verify", "-CAfile", ca, path_str(cert).unwrap()]).unwrap();
        }
        assert!(
            openssl(&[
                "verify",
                "-CAfile",
                ca,
                path_str(&pki.other_dev1_cert).unwrap()
            ])
            .is_err()
        );
        let text = run_bounded(
            Command::new("openssl").args(["x509", "-noout", "-text", "-in", ca]),
            HTTP_TIMEOUT,
        )
        .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("CA:TRUE") && text.contains("Certificate Sign"),
            "{text}"
        );

        let port = free_tcp_port().unwrap();
        let mut cmd = Command::new("openssl");
        cmd.args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-cert", path_str(&pki.server_cert).unwrap()])
            .args(["-key", path_str(&pki.server_key).unwrap()]);
        let _server = Script::spawn("s_server", &mut cmd).unwrap();
        let r = poll_until(
            "openssl s_server to serve",
            READY_TIMEOUT,
            Duration::from_millis(50),
            || Ok(curl(&["--cacert", ca, &format!("https://127.0.0.1:{port}/")]).ok()),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.describe());
        // Without the CA, curl refuses the certificate (exit 60).
        let out = curl_output(&[&format!("https://127.0.0.1:{port}/")]).unwrap();
        assert_eq!(out.status.code(), Some(60), "{out:?}");
    }
}
