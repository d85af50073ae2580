//! The HTTP load generator (issue 16's bench scenarios 14-15): `connections` HTTP/1.1
//! keep-alive connections on hyper's client, one task each, one request outstanding per
//! connection (window 1: the next request leaves after the answer's body is read):
//!
//! ```text
//! connect ─> ready ══(go)══> POST ─> answer ─> POST ─> ... ─> done ══(finish)══> closed
//!                                  └─ transport error / timeout: reconnect (bounded), go on
//! ```
//!
//! Two kinds of request ([`HttpSpec::batch`]):
//! - single: `POST /v1/publish/<prefix><i>?qos=Q`, the body the payload;
//! - batch: `POST /v1/publish?qos=Q` with a JSON array of `batch` items `{"topic":
//!   "<prefix><i>", "payload_b64": ...}`.
//!
//! Payloads are [`sn::stamp_into`]'s (client = the connection's index, sequence, send time),
//! so the counting subscriber counts HTTP uplink unchanged (a batch's items carry
//! consecutive sequence numbers). Each connection presents its own bearer token, so the
//! gateway's authentication is part of what is measured. Latency is request sent -> answer
//! read, for 2xx answers. Every loop is bounded in count and time; every connection is to
//! loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at};

use crate::generator::count;
use crate::{elapsed_ns, new_histogram, sn};

/// What [`HttpLoad`] does.
#[derive(Debug, Clone)]
pub struct HttpSpec {
    /// The gateway's HTTP address.
    pub server: SocketAddr,
    /// Connections (one task each).
    pub connections: usize,
    /// Index of the first connection: its client number in the payload stamps and its topic.
    pub first_index: u32,
    /// Topic before the connection's index (path-safe characters only: it goes into the URL
    /// as is).
    pub topic_prefix: String,
    /// Bearer tokens; connection `k` presents `tokens[k % len]`; none: no `Authorization`.
    pub tokens: Vec<String>,
    /// Requests per connection.
    pub requests: u64,
    /// `None`: single publishes; `Some(n)`: batches of `n` readings per request.
    pub batch: Option<usize>,
    /// The `qos` query parameter (0 or 1).
    pub qos: u8,
    /// Bound on sending new requests; the outstanding one may still complete.
    pub publish_for: Duration,
    /// Payload bytes per reading (at least the 20-byte stamp).
    pub payload: usize,
    /// Bound on one exchange (connect, or request to the answer's last byte).
    pub answer_timeout: Duration,
    /// Bound on reconnections per connection after a transport error.
    pub reconnects: u32,
}

impl HttpSpec {
    /// One connection, single QoS 1 publishes to `bench/h/<i>`, 32-byte payloads, no token.
    #[must_use]
    pub fn new(server: SocketAddr) -> HttpSpec {
        HttpSpec {
            server,
            connections: 1,
            first_index: 0,
            topic_prefix: "bench/h/".into(),
            tokens: Vec::new(),
            requests: 0,
            batch: None,
            qos: 1,
            publish_for: Duration::from_secs(30),
            payload: 32,
            answer_timeout: Duration::from_secs(10),
            reconnects: 10,
        }
    }
}

/// Counters shared by a load's connections.
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Connections through their first connect.
    pub ready: AtomicU64,
    /// Connections whose first connect failed.
    pub failed: AtomicU64,
    /// Connections done sending.
    pub done: AtomicU64,
    /// Requests sent.
    pub sent: AtomicU64,
    /// Answers 200 (QoS 1: durable).
    pub ok: AtomicU64,
    /// Answers 202 (QoS 0: queued).
    pub accepted: AtomicU64,
    /// Readings the 200 answers report durable (a single publish: 1; a batch: its
    /// `"durable"` field).
    pub durable: AtomicU64,
    /// Readings the 2xx answers report queued without fsync (QoS 0).
    pub queued: AtomicU64,
    /// Answers 429.
    pub rate_limited: AtomicU64,
    /// Answers 503.
    pub unavailable: AtomicU64,
    /// Answers with another status.
    pub other_status: AtomicU64,
    /// Requests without an answer: transport error or [`HttpSpec::answer_timeout`].
    pub unanswered: AtomicU64,
    /// Reconnections after a transport error or a closed connection.
    pub reconnects: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Pause after a 429 or 503 before the next request (the gateway asks for seconds in
/// `Retry-After`; a bench run wants to see whether it recovers, not to wait that long).
const REFUSED_PAUSE: Duration = Duration::from_millis(50);

/// Bound on an answer's body (the gateway's are small JSON documents).
const MAX_ANSWER: usize = 64 * 1024;

/// Phases the controller moves a load through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Wait,
    Go,
    Finish,
}

/// HTTP connections publishing: connected by [`HttpLoad::start`], sending after
/// [`HttpLoad::go`].
#[derive(Debug)]
pub struct HttpLoad {
    /// Live counters.
    pub counters: Arc<HttpCounters>,
    /// Request sent -> 2xx answer read, µs (merged as each connection ends).
    pub latency: Arc<Mutex<Histogram<u64>>>,
    /// The first unexpected thing seen (a non-2xx status with its body, a transport error),
    /// for the report's notes.
    pub first_problem: Arc<Mutex<Option<String>>>,
    phase: watch::Sender<Phase>,
    tasks: Vec<JoinHandle<()>>,
    connections: u64,
    go_at: Option<Instant>,
}

impl HttpLoad {
    /// Starts one task per connection; each connects, then waits for [`HttpLoad::go`]. Must
    /// be called within a Tokio runtime.
    ///
    /// # Errors
    /// When a token cannot be put in a header (not visible ASCII).
    pub fn start(spec: HttpSpec) -> anyhow::Result<HttpLoad> {
        let host = HeaderValue::from_str(&spec.server.to_string())?;
        let auth = spec
            .tokens
            .iter()
            .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
            .collect::<Result<Vec<_>, _>>()?;
        let spec = Arc::new(spec);
        let counters = Arc::new(HttpCounters::default());
        let latency = Arc::new(Mutex::new(new_histogram()));
        let first_problem = Arc::new(Mutex::new(None));
        let (phase, phase_rx) = watch::channel(Phase::Wait);
        let mut tasks = Vec::with_capacity(spec.connections);
        for k in 0..spec.connections {
            let index = spec
                .first_index
                .saturating_add(u32::try_from(k).unwrap_or(u32::MAX));
            let conn = Connection {
                index,
                spec: spec.clone(),
                host: host.clone(),
                auth: auth.get(k % auth.len().max(1)).cloned(),
                counters: counters.clone(),
                latency: latency.clone(),
                first_problem: first_problem.clone(),
                phase: phase_rx.clone(),
            };
            tasks.push(tokio::spawn(conn.run()));
        }
        Ok(HttpLoad {
            counters,
            latency,
            first_problem,
            phase,
            tasks,
            connections: spec.connections as u64,
            go_at: None,
        })
    }

    /// Waits (up to `max`) until every connection is connected or failed; returns the
    /// connected ones.
    pub async fn wait_ready(&self, max: Duration) -> u64 {
        let c = &self.counters;
        wait_until(max, || {
            count(&c.ready) + count(&c.failed) >= self.connections
        })
        .await;
        count(&c.ready)
    }

    /// Lets the connections send.
    pub fn go(&mut self) {
        self.go_at = Some(Instant::now());
        self.phase.send_replace(Phase::Go);
    }

    /// Waits (up to `max`) until every connected connection is done; returns the time since
    /// [`HttpLoad::go`].
    pub async fn wait_done(&self, max: Duration) -> Duration {
        let c = &self.counters;
        let ready = count(&c.ready);
        wait_until(max, || count(&c.done) >= ready).await;
        self.go_at.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// The first problem noted, if any.
    #[must_use]
    pub fn problem(&self) -> Option<String> {
        self.first_problem.lock().ok().and_then(|p| p.clone())
    }

    /// Stops the connections (bounded wait; stragglers are aborted) and closes them.
    pub async fn finish(self) {
        self.phase.send_replace(Phase::Finish);
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        for t in self.tasks {
            let abort = t.abort_handle();
            if timeout_at(until, t).await.is_err() {
                abort.abort();
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
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// An open HTTP/1.1 connection: the request half and the task driving the socket (aborted
/// when this is dropped, which closes the socket).
struct Open {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Connects to `server` (bounded by `max`), Nagle off: requests are small and latency counts.
async fn connect(server: SocketAddr, max: Duration) -> Result<Open, String> {
    let stream = timeout(max, TcpStream::connect(server))
        .await
        .map_err(|_| format!("connecting to {server}: no answer within {max:?}"))?
        .map_err(|e| format!("connecting to {server}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = timeout(
        max,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| format!("HTTP/1.1 handshake with {server}: timed out"))?
    .map_err(|e| format!("HTTP/1.1 handshake with {server}: {e}"))?;
    let driver = tokio::spawn(async move {
        // An error here also fails the request in flight, which counts it.
        let _ = conn.await;
    });
    Ok(Open { sender, driver })
}

/// How one exchange ended.
enum Answer {
    /// Status and body.
    Status(u16, Bytes),
    /// Transport error or timeout.
    Failed(String),
}

struct Connection {
    index: u32,
    spec: Arc<HttpSpec>,
    host: HeaderValue,
    auth: Option<HeaderValue>,
    counters: Arc<HttpCounters>,
    latency: Arc<Mutex<Histogram<u64>>>,
    first_problem: Arc<Mutex<Option<String>>>,
    phase: watch::Receiver<Phase>,
}

impl Connection {
    async fn run(mut self) {
        let mut open = match connect(self.spec.server, self.spec.answer_timeout).await {
            Ok(open) => {
                bump(&self.counters.ready);
                open
            }
            Err(e) => {
                self.note(e);
                bump(&self.counters.failed);
                return;
            }
        };
        while *self.phase.borrow() == Phase::Wait {
            if self.phase.changed().await.is_err() {
                return;
            }
        }
        if *self.phase.borrow() == Phase::Go {
            self.send_all(&mut open).await;
        }
        bump(&self.counters.done);
    }

    fn note(&self, problem: String) {
        if let Ok(mut p) = self.first_problem.lock() {
            p.get_or_insert(problem);
        }
    }

    async fn send_all(&mut self, open: &mut Open) {
        let spec = self.spec.clone();
        let c = self.counters.clone();
        let deadline = Instant::now() + spec.publish_for;
        let topic = format!("{}{}", spec.topic_prefix, self.index);
        let uri = match spec.batch {
            None => format!("/v1/publish/{topic}?qos={}", spec.qos),
            Some(_) => format!("/v1/publish?qos={}", spec.qos),
        };
        let uri: hyper::Uri = match uri.parse() {
            Ok(u) => u,
            Err(e) => {
                self.note(format!("request URI {uri}: {e}"));
                return;
            }
        };
        let content_type = HeaderValue::from_static(match spec.batch {
            None => "application/octet-stream",
            Some(_) => "application/json",
        });
        let per_request = spec.batch.map_or(1, |n| n.max(1)) as u64;
        let mut hist = new_histogram();
        let mut reconnects = 0;
        let mut seq = 0u64;
        let mut body = Vec::new();
        let mut stamp = Vec::with_capacity(spec.payload);
        for _ in 0..spec.requests {
            if Instant::now() >= deadline || *self.phase.borrow() == Phase::Finish {
                break;
            }
            body.clear();
            match spec.batch {
                None => sn::stamp_into(&mut body, self.index, seq, elapsed_ns(), spec.payload),
                Some(_) => {
                    batch_into(
                        &mut body,
                        &mut stamp,
                        &topic,
                        self.index,
                        seq,
                        per_request,
                        spec.payload,
                    );
                }
            }
            seq += per_request;
            let mut req = Request::new(Full::new(Bytes::copy_from_slice(&body)));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri.clone();
            let headers = req.headers_mut();
            headers.insert(header::HOST, self.host.clone());
            headers.insert(header::CONTENT_TYPE, content_type.clone());
            if let Some(auth) = &self.auth {
                headers.insert(header::AUTHORIZATION, auth.clone());
            }
            // A connection the gateway closed (`Connection: close`, idle timeout) is reopened
            // before the request goes: that is not a lost request.
            let usable = !open.sender.is_closed()
                && matches!(
                    timeout(spec.answer_timeout, open.sender.ready()).await,
                    Ok(Ok(()))
                );
            if !usable && !self.reconnect(open, &mut reconnects).await {
                break;
            }
            let sent = Instant::now();
            bump(&c.sent);
            match self.exchange(open, req).await {
                Answer::Status(status, answer) => {
                    let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.tally_answer(status, &answer, per_request, micros, &mut hist)
                        .await;
                }
                Answer::Failed(e) => {
                    bump(&c.unanswered);
                    self.note(e);
                    if !self.reconnect(open, &mut reconnects).await {
                        break;
                    }
                }
            }
        }
        if let Ok(mut all) = self.latency.lock() {
            let _ = all.add(&hist);
        }
    }

    /// One request to its answer's last byte, bounded by `answer_timeout`.
    async fn exchange(&self, open: &mut Open, req: Request<Full<Bytes>>) -> Answer {
        let max = self.spec.answer_timeout;
        let work = async {
            let resp = open
                .sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("answer body: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        match timeout(max, work).await {
            Ok(Ok((status, body))) => Answer::Status(status, body),
            Ok(Err(e)) => Answer::Failed(e),
            Err(_) => Answer::Failed(format!("no answer within {max:?}")),
        }
    }

    /// Counts one answer; `micros` goes to `hist` for a 2xx.
    async fn tally_answer(
        &self,
        status: u16,
        answer: &[u8],
        readings: u64,
        micros: u64,
        hist: &mut Histogram<u64>,
    ) {
        let c = &self.counters;
        let (durable, queued) = match status {
            200 | 202 => {
                let _ = hist.record(micros);
                let (d, q) = reported(answer, self.spec.batch.is_some(), status, readings);
                if status == 200 {
                    bump(&c.ok);
                } else {
                    bump(&c.accepted);
                }
                (d, q)
            }
            429 | 503 => {
                bump(if status == 429 {
                    &c.rate_limited
                } else {
                    &c.unavailable
                });
                self.note(problem_text(status, answer));
                tokio::time::sleep(REFUSED_PAUSE).await;
                (0, 0)
            }
            _ => {
                bump(&c.other_status);
                self.note(problem_text(status, answer));
                (0, 0)
            }
        };
        c.durable.fetch_add(durable, Ordering::Relaxed);
        c.queued.fetch_add(queued, Ordering::Relaxed);
    }

    /// Replaces `open` with a new connection; `false` when the bound on reconnections is
    /// reached or connecting failed.
    async fn reconnect(&self, open: &mut Open, reconnects: &mut u32) -> bool {
        if *reconnects >= self.spec.reconnects {
            self.note(format!(
                "connection {}: gave up after {reconnects} reconnections",
                self.index
            ));
            return false;
        }
        *reconnects += 1;
        bump(&self.counters.reconnects);
        match connect(self.spec.server, self.spec.answer_timeout).await {
            Ok(new) => {
                *open = new;
                true
            }
            Err(e) => {
                self.note(e);
                false
            }
        }
    }
}

/// "503: {body}", the body cut to a line's length.
fn problem_text(status: u16, answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer.get(..200).unwrap_or(answer));
    format!("HTTP {status}: {text}")
}

/// (durable, queued) readings of a 2xx answer: a single publish's is its status's (200:
/// durable, 202: queued); a batch's comes from its `{"items", "durable", "queued"}` body,
/// else from its status for all `readings`.
fn reported(answer: &[u8], batch: bool, status: u16, readings: u64) -> (u64, u64) {
    let by_status = if status == 200 {
        (readings, 0)
    } else {
        (0, readings)
    };
    if !batch {
        return by_status;
    }
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(answer) else {
        return by_status;
    };
    let field = |k: &str| doc.get(k).and_then(serde_json::Value::as_u64);
    match (field("durable"), field("queued")) {
        (Some(d), Some(q)) => (d, q),
        _ => by_status,
    }
}

/// Appends a JSON array of `n` readings to `topic`, with consecutive sequence numbers from
/// `first_seq`, each payload a stamp of `payload` bytes in `payload_b64` (the stamp is
/// binary). `stamp` is scratch space.
pub fn batch_into(
    out: &mut Vec<u8>,
    stamp: &mut Vec<u8>,
    topic: &str,
    client: u32,
    first_seq: u64,
    n: u64,
    payload: usize,
) {
    let now = elapsed_ns();
    out.push(b'[');
    for k in 0..n {
        if k > 0 {
            out.push(b',');
        }
        stamp.clear();
        sn::stamp_into(stamp, client, first_seq + k, now, payload);
        out.extend_from_slice(b"{\"topic\":\"");
        // The topic is the bench's own (path-safe characters): no JSON escaping needed.
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(b"\",\"payload_b64\":\"");
        let at = out.len();
        out.resize(at + base64::encoded_len(stamp.len(), true).unwrap_or(0), 0);
        if let Some(slot) = out.get_mut(at..) {
            let written = base64::engine::general_purpose::STANDARD
                .encode_slice(&stamp, slot)
                .unwrap_or(0);
            out.truncate(at + written);
        }
        out.extend_from_slice(b"\"}");
    }
    out.push(b']');
}

/// One `[[http.device]]` of a bench gateway: id, token, the token's hash as the config wants
/// it.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub token: String,
    pub token_hash: String,
}

/// `n` devices `sg-bench-<k>` with distinct tokens (`b64token` characters, longer than the
/// gateway's 16-character minimum) and their SHA-256 hashes, made as `sensorgate hash-token`
/// makes them.
#[must_use]
pub fn devices(n: usize) -> Vec<Device> {
    use sensorgate::http::token;
    (0..n)
        .map(|k| {
            let token = format!("sg-bench-token-{k:05}-{:08x}", std::process::id());
            Device {
                id: format!("sg-bench-{k}"),
                token_hash: token::format_hash(&token::digest(token.as_bytes())),
                token,
            }
        })
        .collect()
}

/// The `[[http.device]]` tables for `devices`, each allowed to publish everywhere.
#[must_use]
pub fn device_tables(devices: &[Device]) -> String {
    let mut out = String::new();
    for d in devices {
        out.push_str(&format!(
            "[[http.device]]\nid = \"{}\"\ntoken_hash = \"{}\"\npublish = [\"#\"]\n\n",
            d.id, d.token_hash
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use axum::Router;
    use axum::extract::{Path, Query, State};
    use axum::http::{HeaderMap, StatusCode, header::CONNECTION};
    use axum::response::IntoResponse;
    use axum::routing::post;

    use super::*;

    /// What the stand-in server saw: (token, topic, client, seq) per reading.
    #[derive(Default)]
    struct Seen {
        readings: Vec<(String, String, u32, u64)>,
        queries: BTreeSet<String>,
        content_types: BTreeSet<String>,
    }

    /// How the stand-in answers one reading, by its stamp.
    type Script = fn(u32, u64) -> Reply;

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Reply {
        Durable,
        Busy,
        /// 200 with `Connection: close`.
        DurableClose,
        /// Never answers (the request must time out).
        Hang,
    }

    #[derive(Clone)]
    struct Stand {
        seen: Arc<Mutex<Seen>>,
        script: Script,
    }

    fn token_of(headers: &HeaderMap) -> String {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("-")
            .to_owned()
    }

    fn note_request(st: &Stand, headers: &HeaderMap, q: &HashMap<String, String>) {
        let mut seen = st.seen.lock().unwrap();
        seen.queries
            .insert(q.get("qos").cloned().unwrap_or_else(|| "none".into()));
        seen.content_types.insert(
            headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned(),
        );
    }

    async fn answer(reply: Reply, body: &'static str) -> axum::response::Response {
        match reply {
            Reply::Durable => (StatusCode::OK, body).into_response(),
            Reply::DurableClose => (StatusCode::OK, [(CONNECTION, "close")], body).into_response(),
            Reply::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"busy","reason":"test"}"#,
            )
                .into_response(),
            Reply::Hang => std::future::pending().await,
        }
    }

    async fn single(
        State(st): State<Stand>,
        Path(topic): Path<String>,
        Query(q): Query<HashMap<String, String>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        note_request(&st, &headers, &q);
        let (client, seq, _) = sn::read_stamp(&body).unwrap();
        assert_eq!(body.len(), 32);
        st.seen
            .lock()
            .unwrap()
            .readings
            .push((token_of(&headers), topic, client, seq));
        answer((st.script)(client, seq), r#"{"qos":1,"durable":true}"#).await
    }

    async fn batch(
        State(st): State<Stand>,
        Query(q): Query<HashMap<String, String>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        note_request(&st, &headers, &q);
        let items: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        let mut reply = Reply::Durable;
        for item in &items {
            let topic = item["topic"].as_str().unwrap().to_owned();
            let payload = base64::engine::general_purpose::STANDARD
                .decode(item["payload_b64"].as_str().unwrap())
                .unwrap();
            let (client, seq, _) = sn::read_stamp(&payload).unwrap();
            st.seen
                .lock()
                .unwrap()
                .readings
                .push((token_of(&headers), topic, client, seq));
            if (st.script)(client, seq) != Reply::Durable {
                reply = (st.script)(client, seq);
            }
        }
        let body = format!(r#"{{"items":{0},"durable":{0},"queued":0}}"#, items.len());
        match reply {
            Reply::Durable => (StatusCode::OK, body).into_response(),
            other => answer(other, "{}").await,
        }
    }

    /// A stand-in for the gateway's HTTP ingress on a free loopback port, answering by
    /// `script`; stopped when the runtime ends.
    async fn stand_in(script: Script) -> (SocketAddr, Arc<Mutex<Seen>>) {
        let st = Stand {
            seen: Arc::new(Mutex::new(Seen::default())),
            script,
        };
        let seen = st.seen.clone();
        let app = Router::new()
            .route("/v1/publish/{*topic}", post(single))
            .route("/v1/publish", post(batch))
            .with_state(st);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (addr, seen)
    }

    async fn run(spec: HttpSpec) -> HttpLoad {
        let n = spec.connections as u64;
        let mut load = HttpLoad::start(spec).unwrap();
        assert_eq!(load.wait_ready(Duration::from_secs(20)).await, n);
        load.go();
        load.wait_done(Duration::from_secs(60)).await;
        assert_eq!(count(&load.counters.done), n);
        load
    }

    fn tokens(n: usize) -> Vec<String> {
        devices(n).into_iter().map(|d| d.token).collect()
    }

    /// Single publishes: every (client, seq) once, to the connection's topic, with its own
    /// token; a 503 is counted apart, and no latency is recorded for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_publishes_carry_stamps_topics_and_tokens() {
        let (addr, seen) = stand_in(|client, seq| {
            if (client, seq) == (11, 2) {
                Reply::Busy
            } else {
                Reply::Durable
            }
        })
        .await;
        let mut spec = HttpSpec::new(addr);
        spec.connections = 3;
        spec.first_index = 10;
        spec.requests = 5;
        spec.tokens = tokens(3);
        let load = run(spec.clone()).await;
        let c = load.counters.clone();
        assert_eq!(
            (count(&c.sent), count(&c.ok), count(&c.unavailable)),
            (15, 14, 1)
        );
        assert_eq!((count(&c.durable), count(&c.queued)), (14, 0));
        assert_eq!(
            count(&c.unanswered) + count(&c.other_status) + count(&c.reconnects),
            0
        );
        assert_eq!(load.latency.lock().unwrap().len(), 14);
        assert!(
            load.problem()
                .unwrap()
                .starts_with("HTTP 503: {\"error\":\"busy\"")
        );
        load.finish().await;
        let seen = seen.lock().unwrap();
        let mut pairs: Vec<(u32, u64)> = seen.readings.iter().map(|r| (r.2, r.3)).collect();
        pairs.sort_unstable();
        let expected: Vec<(u32, u64)> =
            (10..13).flat_map(|c| (0..5).map(move |s| (c, s))).collect();
        assert_eq!(pairs, expected);
        for (token, topic, client, _) in &seen.readings {
            assert_eq!(topic, &format!("bench/h/{client}"));
            assert_eq!(token, &spec.tokens[*client as usize - 10]);
        }
        assert_eq!(seen.queries, BTreeSet::from(["1".to_owned()]));
        assert_eq!(
            seen.content_types,
            BTreeSet::from(["application/octet-stream".to_owned()])
        );
    }

    /// Batches: JSON arrays of base64 stamps with consecutive sequence numbers; the durable
    /// count comes from the answer's body.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_carry_consecutive_stamps() {
        let (addr, seen) = stand_in(|_, _| Reply::Durable).await;
        let mut spec = HttpSpec::new(addr);
        spec.connections = 2;
        spec.requests = 3;
        spec.batch = Some(4);
        spec.qos = 0;
        spec.topic_prefix = "bench/b/".into();
        spec.tokens = tokens(2);
        let load = run(spec).await;
        let c = load.counters.clone();
        assert_eq!(
            (count(&c.sent), count(&c.ok), count(&c.durable)),
            (6, 6, 24)
        );
        assert_eq!(load.latency.lock().unwrap().len(), 6);
        load.finish().await;
        let seen = seen.lock().unwrap();
        for client in 0..2u32 {
            let seqs: Vec<u64> = seen
                .readings
                .iter()
                .filter(|r| r.2 == client)
                .inspect(|r| assert_eq!(r.1, format!("bench/b/{client}")))
                .map(|r| r.3)
                .collect();
            assert_eq!(seqs, (0..12).collect::<Vec<_>>(), "in order, once each");
        }
        assert_eq!(seen.queries, BTreeSet::from(["0".to_owned()]));
        assert_eq!(
            seen.content_types,
            BTreeSet::from(["application/json".to_owned()])
        );
    }

    /// A connection the server closes is reopened before the next request (no request
    /// lost); a request never answered times out, is counted, and its connection replaced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconnects_after_close_and_timeout() {
        let (addr, seen) = stand_in(|client, seq| match (client, seq) {
            (0, 1) => Reply::DurableClose,
            (1, 2) => Reply::Hang,
            _ => Reply::Durable,
        })
        .await;
        let mut spec = HttpSpec::new(addr);
        spec.connections = 2;
        spec.requests = 4;
        spec.answer_timeout = Duration::from_millis(300);
        let load = run(spec).await;
        let c = load.counters.clone();
        assert_eq!((count(&c.sent), count(&c.ok)), (8, 7));
        assert_eq!(count(&c.unanswered), 1);
        assert_eq!(
            count(&c.reconnects),
            2,
            "one after the close, one after the hang"
        );
        assert!(load.problem().unwrap().contains("no answer within"));
        load.finish().await;
        assert_eq!(seen.lock().unwrap().readings.len(), 8);
    }

    /// The gateway's own digest of each token is what the device table holds.
    #[test]
    fn device_tables_hold_the_tokens_hashes() {
        let d = devices(2);
        assert_ne!(d[0].token, d[1].token);
        assert!(
            d.iter()
                .all(|d| d.token.len() >= 16 && sensorgate::http::token::valid_chars(&d.token))
        );
        let toml = device_tables(&d);
        assert_eq!(toml.matches("[[http.device]]").count(), 2);
        let hash = sensorgate::http::token::format_hash(&sensorgate::http::token::digest(
            d[1].token.as_bytes(),
        ));
        assert!(toml.contains(&format!("id = \"sg-bench-1\"\ntoken_hash = \"{hash}\"")));
    }
}
