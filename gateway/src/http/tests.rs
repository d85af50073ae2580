//! The glue against a real router and spool in a tempdir (the shape of `bridges`'s router
//! tests): durability rules of [`super::publish`], the driver, and the handlers through a
//! loopback listener.

// The tests hold the spool's lock across awaits on purpose, to block the writer thread; no
// task on the test's runtime takes that lock.
#![allow(clippy::await_holding_lock)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use sensorgate_bridges::message::{Downlink, Message, Qos};
use sensorgate_bridges::route::{RouteSpec, RouteTable};
use sensorgate_bridges::router::{IngressHandle, Router};
use sensorgate_bridges::spool::{
    AppendReply, FsyncPolicy, SharedSpool, Spool, SpoolConfig, StdFs, WhenFull, start_writer,
};
use sensorgate_bridges::telemetry::Beat;

use super::driver::Driver;
use super::handlers::{self, App};
use super::publish::{Ingress, ItemRefused, Outcome};
use super::sse::Hub;
use super::stats::HttpStats;
use crate::config::{HttpSection, SseQueueFull};

/// Generous bound on every wait for a condition (never a timing target).
const BOUND: Duration = Duration::from_secs(20);

struct Setup {
    router: Router,
    spool: Arc<SharedSpool<StdFs>>,
    _dir: tempfile::TempDir,
}

fn setup(queue: usize, max_bytes: u64, routes: RouteTable) -> Setup {
    setup_with(queue, max_bytes, routes, Vec::new())
}

/// `setup` with `upstreams` behind the router (fakes recording the subscription calls).
fn setup_with(
    queue: usize,
    max_bytes: u64,
    routes: RouteTable,
    upstreams: Vec<sensorgate_bridges::router::RoutedUpstream>,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig {
        dir: PathBuf::from(dir.path()),
        max_bytes,
        segment_bytes: 64 << 10,
        min_free_bytes: 0,
        max_age: None,
        when_full: WhenFull::RejectNew,
        fsync: FsyncPolicy::Always,
        memory_tail_bytes: 8 << 20,
        retain_bytes: 0,
    };
    let (spool, _) = Spool::open(StdFs, config, &["up".to_owned()]).unwrap();
    let spool = SharedSpool::new(spool);
    let (appender, _writer) = start_writer(Arc::clone(&spool), queue).unwrap();
    Setup {
        router: Router::new(appender, upstreams, 64, Arc::new(routes)),
        spool,
        _dir: dir,
    }
}

fn hub() -> Hub {
    Hub::new(16, 4, 64, 16, SseQueueFull::DropOldest, 1 << 20)
}

/// The HTTP ingress over `setup`'s router, its verdict channel and its downlink channel.
struct Http {
    ingress: Arc<Ingress>,
    replies: mpsc::Receiver<Vec<AppendReply>>,
    downlink: mpsc::Receiver<Downlink>,
}

fn http(setup: &Setup, queue_wait: Duration) -> Http {
    let (reply_tx, replies) = mpsc::channel(16);
    let (dl_tx, downlink) = mpsc::channel(16);
    let handle = setup.router.ingress(reply_tx).with_downlink(dl_tx);
    let ingress = Arc::new(Ingress::new(
        handle,
        hub(),
        queue_wait,
        Arc::new(HttpStats::default()),
        CancellationToken::new(),
    ));
    Http {
        ingress,
        replies,
        downlink,
    }
}

/// Starts the driver task on `http`'s channels; cancelling the token stops it.
fn drive(http: Http) -> (Arc<Ingress>, CancellationToken) {
    let stop = CancellationToken::new();
    let (_query_tx, queries) = mpsc::channel(1);
    let ingress = Arc::clone(&http.ingress);
    tokio::spawn(
        Driver {
            ingress: Arc::clone(&http.ingress),
            devices: Arc::new(std::sync::Mutex::new(super::devices::Devices::new(16))),
            replies: http.replies,
            downlink: http.downlink,
            queries,
            beat: Arc::new(Beat::new()),
        }
        .run(stop.clone()),
    );
    (ingress, stop)
}

/// Another ingress that takes downlink and wants every topic: what `deliver_local` reaches.
fn peer(setup: &Setup) -> (IngressHandle, mpsc::Receiver<Downlink>) {
    let (dl_tx, dl_rx) = mpsc::channel(64);
    let handle = setup
        .router
        .ingress(mpsc::channel(4).0)
        .with_downlink(dl_tx);
    handle.subscribe(now(), "#", Qos::AtMostOnce).unwrap();
    (handle, dl_rx)
}

#[allow(clippy::disallowed_methods)] // Only rate-limits the router's warnings here.
fn now() -> Instant {
    Instant::now()
}

fn msg(topic: &str, payload: &'static [u8], qos: Qos) -> Message {
    Message::new(topic, Bytes::from_static(payload), qos, false)
}

/// Waits for `condition` (polled on each timer tick of a generous bound, never a timing
/// target).
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Blocks the spool writer: it takes one filler append (and signals room), then waits for
/// the spool's lock held by the returned guard; the queue is empty then, and nothing more is
/// taken until the guard is dropped.
async fn block_writer<'s>(
    setup: &'s Setup,
    handle: &IngressHandle,
) -> std::sync::MutexGuard<'s, Spool<StdFs>> {
    let filler = || msg("filler", b"", Qos::AtMostOnce);
    hold_writer_with(setup, handle, || async {
        let _ = handle.append(filler(), None);
    })
    .await
}

/// Takes the spool's lock, runs `append` (which makes the writer take something from its
/// queue) and waits until the writer took it: it is then blocked on the lock, inside its
/// group commit. The writer's own housekeeping also takes the lock (every 100 ms): when it
/// got blocked there instead, the lock is let go and the whole step retried.
async fn hold_writer_with<'s, F, Fut>(
    setup: &'s Setup,
    handle: &IngressHandle,
    mut append: F,
) -> std::sync::MutexGuard<'s, Spool<StdFs>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..100 {
        let guard = setup.spool.lock();
        let mark = handle.room_mark();
        append().await;
        let took = tokio::time::timeout(Duration::from_millis(500), handle.room_since(mark));
        if took.await.is_ok() {
            return guard;
        }
        drop(guard);
    }
    panic!("the spool writer never took an append while the lock was held");
}

#[tokio::test]
async fn a_qos1_publish_is_answered_only_after_its_verdict() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let mut h = http(&s, Duration::from_secs(1));
    let ingress = Arc::clone(&h.ingress);
    let publish =
        tokio::spawn(async move { ingress.publish(msg("t/1", b"x", Qos::AtLeastOnce)).await });
    // The verdict comes back on the reply channel; nobody has handed it to the waiter yet.
    let replies = bounded("the verdict", h.replies.recv()).await.unwrap();
    assert_eq!(replies.len(), 1);
    assert!(replies[0].accepted);
    tokio::task::yield_now().await;
    assert!(
        !publish.is_finished(),
        "answered before its verdict was delivered"
    );
    assert_eq!(h.ingress.verdicts.len(), 1);
    h.ingress.verdicts.deliver(&replies, &h.ingress);
    assert_eq!(
        bounded("the answer", publish).await.unwrap(),
        Outcome::Durable
    );
    assert_eq!(h.ingress.verdicts.len(), 0);
}

#[tokio::test]
async fn a_refused_verdict_is_spool_refused() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let mut h = http(&s, Duration::from_secs(1));
    let ingress = Arc::clone(&h.ingress);
    let publish =
        tokio::spawn(async move { ingress.publish(msg("t/1", b"x", Qos::AtLeastOnce)).await });
    let replies = bounded("the verdict", h.replies.recv()).await.unwrap();
    // The writer refuses (spool full / disk error) with `accepted: false`; the same shape.
    let refused: Vec<AppendReply> = replies
        .iter()
        .map(|r| AppendReply {
            token: r.token,
            accepted: false,
        })
        .collect();
    h.ingress.verdicts.deliver(&refused, &h.ingress);
    assert_eq!(
        bounded("the answer", publish).await.unwrap(),
        Outcome::SpoolRefused
    );
}

#[tokio::test]
async fn a_full_spool_refuses_for_real() {
    // Larger than half of max_bytes: the spool refuses it (its verdict, not the queue).
    let s = setup(16, 256 << 10, RouteTable::everything());
    let (ingress, stop) = drive(http(&s, Duration::from_secs(1)));
    let big = Message::new("t/big", vec![0u8; 200 << 10], Qos::AtLeastOnce, false);
    assert_eq!(
        bounded("the answer", ingress.publish(big)).await,
        Outcome::SpoolRefused
    );
    assert_eq!(
        bounded(
            "the answer",
            ingress.publish(msg("t/1", b"x", Qos::AtLeastOnce))
        )
        .await,
        Outcome::Durable
    );
    stop.cancel();
}

#[tokio::test]
async fn a_full_writer_queue_waits_for_room_then_is_durable() {
    let s = setup(1, 1 << 20, RouteTable::everything());
    let (ingress, stop) = drive(http(&s, Duration::from_secs(600)));
    // Warm up: the writer thread runs.
    assert_eq!(
        ingress.publish(msg("t/0", b"", Qos::AtLeastOnce)).await,
        Outcome::Durable
    );
    let guard = block_writer(&s, &ingress.handle).await;
    // The queue (1) takes one more; then the publish has to wait for room.
    ingress
        .handle
        .append(msg("filler", b"", Qos::AtMostOnce), None)
        .unwrap();
    let mut publish = Box::pin(ingress.publish(msg("t/1", b"x", Qos::AtLeastOnce)));
    assert!((&mut publish).now_or_never().is_none(), "waits for room");
    assert_eq!(ingress.verdicts.len(), 1, "registered before the append");
    drop(guard);
    assert_eq!(bounded("the answer", publish).await, Outcome::Durable);
    stop.cancel();
}

#[tokio::test]
async fn a_writer_queue_full_past_queue_wait_is_busy_and_nothing_is_left_waiting() {
    let s = setup(1, 1 << 20, RouteTable::everything());
    let (ingress, stop) = drive(http(&s, Duration::from_secs(1)));
    assert_eq!(
        ingress.publish(msg("t/0", b"", Qos::AtLeastOnce)).await,
        Outcome::Durable
    );
    let guard = block_writer(&s, &ingress.handle).await;
    ingress
        .handle
        .append(msg("filler", b"", Qos::AtMostOnce), None)
        .unwrap();
    // Paused time (only while nothing waits for the writer thread, which runs in real
    // time): the runtime jumps to the queue_wait deadline once idle.
    tokio::time::pause();
    assert_eq!(
        ingress.publish(msg("t/1", b"x", Qos::AtLeastOnce)).await,
        Outcome::Busy
    );
    assert_eq!(
        ingress.publish(msg("t/2", b"x", Qos::AtMostOnce)).await,
        Outcome::Busy
    );
    tokio::time::resume();
    assert_eq!(
        ingress.verdicts.len(),
        0,
        "the refused append's waiter was disarmed"
    );
    drop(guard);
    stop.cancel();
}

#[tokio::test]
async fn no_route_is_refused_without_a_waiter() {
    let spec = RouteSpec {
        filter: "a/#".to_owned(),
        upstreams: vec!["up".to_owned()],
        ..Default::default()
    };
    let routes = RouteTable::compile(&[spec], &["up"], "gw").unwrap();
    let s = setup(16, 1 << 20, routes);
    let (ingress, stop) = drive(http(&s, Duration::from_secs(1)));
    assert_eq!(
        ingress.publish(msg("b/1", b"x", Qos::AtLeastOnce)).await,
        Outcome::NoRoute
    );
    assert_eq!(ingress.verdicts.len(), 0);
    assert_eq!(
        ingress.first_unrouted(["a/1", "a/2", "b/3", "b/4"]),
        Some(2)
    );
    assert_eq!(ingress.first_unrouted(["a/1"]), None);
    stop.cancel();
}

#[tokio::test]
async fn a_dropped_requests_verdict_is_counted_orphaned_and_still_delivered_locally() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let (_peer, mut peer_rx) = peer(&s);
    let (ingress, stop) = drive(http(&s, Duration::from_secs(1)));
    assert_eq!(
        ingress.publish(msg("warm", b"", Qos::AtLeastOnce)).await,
        Outcome::Durable
    );
    assert_eq!(
        bounded("warm-up copy", peer_rx.recv()).await.unwrap().topic,
        "warm"
    );
    let guard = s.spool.lock();
    let mut publish = Box::pin(ingress.publish(msg("t/orphan", b"x", Qos::AtLeastOnce)));
    assert!(
        (&mut publish).now_or_never().is_none(),
        "appended, waiting for its verdict"
    );
    // The client leaves: hyper drops the handler's future.
    drop(publish);
    assert!(
        peer_rx.try_recv().is_err(),
        "nothing delivered before the verdict"
    );
    drop(guard);
    let copy = bounded("the local copy", peer_rx.recv()).await.unwrap();
    assert_eq!(
        (copy.topic.as_str(), &copy.payload[..]),
        ("t/orphan", &b"x"[..])
    );
    wait_for("the orphan count", || {
        ingress.stats.verdicts_orphaned() == 1
    })
    .await;
    assert_eq!(ingress.verdicts.len(), 0);
    stop.cancel();
}

#[tokio::test]
async fn qos0_is_delivered_locally_on_append_and_a_refused_qos1_never() {
    let s = setup(16, 256 << 10, RouteTable::everything());
    let (_peer, mut peer_rx) = peer(&s);
    let (ingress, stop) = drive(http(&s, Duration::from_secs(1)));
    assert_eq!(
        ingress.publish(msg("q0", b"a", Qos::AtMostOnce)).await,
        Outcome::Queued
    );
    assert_eq!(
        bounded("the QoS 0 copy", peer_rx.recv())
            .await
            .unwrap()
            .topic,
        "q0"
    );
    let big = Message::new("big", vec![0u8; 200 << 10], Qos::AtLeastOnce, false);
    assert_eq!(ingress.publish(big).await, Outcome::SpoolRefused);
    assert_eq!(
        ingress.publish(msg("q1", b"b", Qos::AtLeastOnce)).await,
        Outcome::Durable
    );
    let next = bounded("the QoS 1 copy", peer_rx.recv()).await.unwrap();
    assert_eq!(next.topic, "q1", "the refused message was not delivered");
    stop.cancel();
}

fn batch_of(items: &[(&str, usize, Qos)]) -> Vec<Message> {
    items
        .iter()
        .map(|&(topic, size, qos)| Message::new(topic, vec![b'x'; size], qos, false))
        .collect()
}

#[tokio::test]
async fn a_batch_is_durable_as_a_whole() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let (_peer, mut peer_rx) = peer(&s);
    let (ingress, stop) = drive(http(&s, Duration::from_secs(1)));
    let items = batch_of(&[
        ("b/0", 1, Qos::AtLeastOnce),
        ("b/1", 1, Qos::AtMostOnce),
        ("b/2", 1, Qos::AtLeastOnce),
    ]);
    let outcome = bounded("the batch", ingress.publish_batch(items)).await;
    assert_eq!((outcome.items, outcome.durable, outcome.queued), (3, 2, 1));
    assert!(outcome.complete());
    let mut topics = Vec::new();
    for _ in 0..3 {
        topics.push(bounded("a copy", peer_rx.recv()).await.unwrap().topic);
    }
    topics.sort();
    assert_eq!(topics, ["b/0", "b/1", "b/2"]);
    stop.cancel();
}

#[tokio::test]
async fn a_partial_batch_lists_exactly_the_items_the_spool_refused() {
    // 256 KiB spool: two 100 KiB items fit, a third does not; a small fourth does again.
    let s = setup(16, 256 << 10, RouteTable::everything());
    let (ingress, stop) = drive(http(&s, Duration::from_secs(1)));
    let items = batch_of(&[
        ("p/0", 100 << 10, Qos::AtLeastOnce),
        ("p/1", 100 << 10, Qos::AtLeastOnce),
        ("p/2", 100 << 10, Qos::AtLeastOnce),
        ("p/3", 10, Qos::AtLeastOnce),
    ]);
    let outcome = bounded("the batch", ingress.publish_batch(items)).await;
    assert_eq!(outcome.refused, [(2, ItemRefused::SpoolFull)]);
    assert_eq!((outcome.durable, outcome.queued), (3, 0));
    assert_eq!(ingress.verdicts.len(), 0);
    stop.cancel();
}

#[tokio::test]
async fn a_batch_stops_at_queue_wait_and_keeps_its_order() {
    let s = setup(3, 1 << 20, RouteTable::everything());
    let (ingress, stop) = drive(http(&s, Duration::from_secs(1)));
    assert_eq!(
        ingress.publish(msg("t/0", b"", Qos::AtLeastOnce)).await,
        Outcome::Durable
    );
    let guard = block_writer(&s, &ingress.handle).await;
    let items = batch_of(&[
        ("o/0", 1, Qos::AtLeastOnce),
        ("o/1", 1, Qos::AtMostOnce),
        ("o/2", 1, Qos::AtLeastOnce),
        ("o/3", 1, Qos::AtLeastOnce),
        ("o/4", 1, Qos::AtMostOnce),
    ]);
    tokio::time::pause();
    let batch = {
        let ingress = Arc::clone(&ingress);
        tokio::spawn(async move { ingress.publish_batch(items).await })
    };
    // Virtual time: the batch gives up on item 3 at its queue_wait, then waits for the
    // verdicts of items 0..3, which the blocked writer cannot give yet.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !batch.is_finished(),
        "waits for the verdicts of what it appended"
    );
    // Real time again: the writer thread answers in real time.
    tokio::time::resume();
    drop(guard);
    let outcome = bounded("the batch", batch).await.unwrap();
    assert_eq!(
        outcome.refused,
        [(3, ItemRefused::Busy), (4, ItemRefused::NotAttempted)]
    );
    assert_eq!((outcome.durable, outcome.queued), (2, 1));
    // The spool holds the appended items in order, and none after the gap.
    let topics = spooled_topics(&s);
    let ours: Vec<&str> = topics
        .iter()
        .map(String::as_str)
        .filter(|t| t.starts_with("o/"))
        .collect();
    assert_eq!(ours, ["o/0", "o/1", "o/2"]);
    stop.cancel();
}

/// Every record in the spool, in log order.
fn spooled(s: &Setup) -> Vec<sensorgate_bridges::spool::Record> {
    let mut spool = s.spool.lock();
    let mut pos = spool.reader(0);
    let mut out = Vec::new();
    spool.read(&mut pos, 1000, 0, &mut out).unwrap();
    out
}

/// Every topic in the spool, in log order (the warm-up and filler records of some tests
/// included).
fn spooled_topics(s: &Setup) -> Vec<String> {
    spooled(s).into_iter().map(|r| r.topic).collect()
}

// ---- Handlers, through a loopback listener ----

/// A running HTTP ingress: its address, its parts, and the token that stops it.
struct Served {
    addr: std::net::SocketAddr,
    /// Reloads the served ingress's settings (as SIGHUP does).
    reloader: super::Reloader,
    ingress: Arc<Ingress>,
    stop: CancellationToken,
    /// Asks the driver (as the admin listener does).
    queries: mpsc::Sender<crate::observe::model::IngressQuery>,
    /// Stops the listener (separate, so a test can stop the ingress alone first, as the
    /// server's graceful shutdown leaves a window where requests still arrive).
    server_stop: CancellationToken,
    driver_stop: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
        self.server_stop.cancel();
        self.driver_stop.cancel();
    }
}

/// Serves the handlers over `setup`'s router on a free loopback port.
async fn serve(setup: &Setup, section: HttpSection) -> Served {
    let section = Arc::new(section);
    let (reply_tx, replies) = mpsc::channel(16);
    let (dl_tx, downlink) = mpsc::channel(16);
    let handle = setup.router.ingress(reply_tx).with_downlink(dl_tx);
    let stop = CancellationToken::new();
    let ingress = Arc::new(Ingress::new(
        handle,
        super::hub(&section),
        section.queue_wait,
        Arc::new(HttpStats::default()),
        stop.clone(),
    ));
    let devices = Arc::new(std::sync::Mutex::new(super::devices::Devices::new(16)));
    let reloader = super::Reloader::new(&section).unwrap();
    let app = App::new(
        Arc::clone(reloader.live()),
        Arc::clone(&ingress),
        Arc::clone(&devices),
    );
    let (query_tx, queries) = mpsc::channel(1);
    let driver_stop = CancellationToken::new();
    tokio::spawn(
        Driver {
            ingress: Arc::clone(&ingress),
            devices,
            replies,
            downlink,
            queries,
            beat: Arc::new(Beat::new()),
        }
        .run(driver_stop.clone()),
    );
    // The real server adapter (limits, ConnInfo, graceful stop) on a free loopback port.
    let section = Arc::new(HttpSection {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..(*section).clone()
    });
    let bound = super::server::bind(&section).unwrap();
    let addr = bound.plain[0].local_addr().unwrap();
    let router = handlers::router(app);
    let server_stop = CancellationToken::new();
    let conn = Arc::clone(&ingress.stats.conn);
    tokio::spawn(super::server::serve_live(
        bound,
        None,
        router,
        Arc::clone(reloader.live()),
        conn,
        server_stop.clone(),
    ));
    Served {
        addr,
        reloader,
        ingress,
        stop,
        queries: query_tx,
        server_stop,
        driver_stop,
    }
}

fn anonymous() -> HttpSection {
    HttpSection {
        allow_anonymous: true,
        ..HttpSection::default()
    }
}

/// A response as read off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `raw` (a request with `Connection: close`, exact bytes) and reads the response
/// until the server closes.
async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut bytes = Vec::new();
    bounded("the response", stream.read_to_end(&mut bytes))
        .await
        .unwrap();
    parse_reply(&bytes)
}

fn parse_reply(bytes: &[u8]) -> Reply {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(bytes)));
    let head = std::str::from_utf8(&bytes[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: bytes[end + 4..].to_vec(),
    }
}

/// `method path` with `body` (Content-Length), `Connection: close` and `extra` header lines.
async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
    body: &[u8],
) -> Reply {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    exchange(addr, &raw).await
}

#[tokio::test]
async fn single_publishes_answer_200_durable_and_202_queued_and_are_spooled() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(&s, anonymous()).await;
    let r = call(
        served.addr,
        "POST",
        "/v1/publish/sensors/dev1/temp?qos=1&retain=true",
        "",
        b"21.5",
    )
    .await;
    assert_eq!(
        (r.status, &r.body[..]),
        (200, &br#"{"qos":1,"durable":true}"#[..])
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = call(
        served.addr,
        "POST",
        "/v1/publish/sensors/dev1/hum",
        "QoS-Level: 0\r\n",
        b"40",
    )
    .await;
    assert_eq!(
        (r.status, &r.body[..]),
        (202, &br#"{"qos":0,"durable":false}"#[..])
    );
    let r = call(served.addr, "POST", "/v1/publish/a%2Fb", "", b"").await;
    assert_eq!(r.status, 200, "an empty body is a valid payload");
    // QoS 0 is only queued: wait for the writer before reading the spool.
    wait_for("the QoS 0 record", || spooled_topics(&s).len() == 3).await;
    let records = spooled(&s);
    let first = &records[0];
    assert_eq!(
        (first.topic.as_str(), &first.payload[..], first.retain),
        ("sensors/dev1/temp", &b"21.5"[..], true)
    );
    assert_eq!(
        first.origin.protocol,
        sensorgate_bridges::message::Protocol::Http
    );
    assert_eq!(first.origin.client_id, None, "anonymous");
    assert!(
        first
            .origin
            .peer
            .as_deref()
            .is_some_and(|p| p.starts_with("tcp:127.0.0.1:"))
    );
    assert_eq!(records[1].qos, Qos::AtMostOnce);
    assert_eq!(records[2].topic, "a/b");
    let report = served.ingress.stats.report(Default::default()).counters;
    assert_eq!(
        (report.packets_in, report.messages_in, report.acks),
        (3, [0, 1, 2, 0], 2)
    );
}

#[tokio::test]
async fn an_oversized_content_length_is_413_before_the_body_is_read() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(
        &s,
        HttpSection {
            max_body_size: 10,
            ..anonymous()
        },
    )
    .await;
    // 10 of the announced 100,000,000 bytes: the answer comes without the rest.
    let raw =
        b"POST /v1/publish/t HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000000\r\n\r\n0123456789";
    let r = exchange(served.addr, raw).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "too_large");
    assert_eq!(r.json()["limit"], 10);
    assert_eq!(r.header("connection"), Some("close"));
    // Chunked past the limit: 413 after at most limit + 1 bytes.
    let raw = b"POST /v1/publish/t HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n";
    assert_eq!(exchange(served.addr, raw).await.status, 413);
    // At the limit: stored.
    assert_eq!(
        call(served.addr, "POST", "/v1/publish/t", "", b"0123456789")
            .await
            .status,
        200
    );
    assert_eq!(spooled_topics(&s), ["t"]);
}

#[tokio::test]
async fn a_chunked_body_is_411_when_a_length_is_required() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(
        &s,
        HttpSection {
            require_content_length: true,
            ..anonymous()
        },
    )
    .await;
    let raw = b"POST /v1/publish/t HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
    let r = exchange(served.addr, raw).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (411, Some("length_required"))
    );
    assert_eq!(
        call(served.addr, "POST", "/v1/publish/t", "", b"hi")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn a_body_not_complete_within_request_timeout_is_408() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(
        &s,
        HttpSection {
            request_timeout: Duration::from_millis(200),
            ..anonymous()
        },
    )
    .await;
    let raw = b"POST /v1/publish/t HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\n01234";
    let r = exchange(served.addr, raw).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (408, Some("request_timeout"))
    );
    assert_eq!(r.header("connection"), Some("close"));
    assert!(spooled_topics(&s).is_empty());
}

#[tokio::test]
async fn malformed_requests_are_400_and_unknown_routes_404_or_405() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(&s, anonymous()).await;
    let a = served.addr;
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("POST", "/v1/publish/t?qos=2", "", 400, "bad_qos"),
        (
            "POST",
            "/v1/publish/t?qos=1",
            "QoS-Level: 0\r\n",
            400,
            "bad_qos",
        ),
        ("POST", "/v1/publish/t?retain=maybe", "", 400, "bad_retain"),
        ("POST", "/v1/publish/a%23", "", 400, "bad_topic"),
        ("POST", "/v1/publish/a+b", "", 400, "bad_topic"),
        ("POST", "/v1/publish/%FF", "", 400, "bad_topic"),
        ("POST", "/v1/publish/", "", 400, "bad_topic"),
        ("GET", "/v1/subscribe", "", 400, "bad_filter"),
        ("GET", "/v1/messages?filter=x", "", 404, "not_found"),
        ("GET", "/", "", 404, "not_found"),
        ("GET", "/v1/publish/t", "", 405, "method_not_allowed"),
        ("PUT", "/v1/publish", "", 405, "method_not_allowed"),
        ("OPTIONS", "/v1/publish/t", "", 405, "method_not_allowed"),
        (
            "POST",
            "/v1/subscribe?filter=x",
            "",
            405,
            "method_not_allowed",
        ),
        ("HEAD", "/v1/subscribe?filter=x", "", 405, ""),
    ];
    for &(method, path, extra, status, error) in cases {
        let r = call(a, method, path, extra, b"").await;
        assert_eq!(r.status, status, "{method} {path}");
        if !error.is_empty() {
            assert_eq!(r.json()["error"], error, "{method} {path}");
        }
        if status == 405 {
            let allow = if path.starts_with("/v1/subscribe") {
                "GET"
            } else {
                "POST"
            };
            assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        }
    }
    assert!(spooled_topics(&s).is_empty());
}

#[tokio::test]
async fn without_credentials_and_anonymous_off_every_endpoint_is_401() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(&s, HttpSection::default()).await;
    for (method, path) in [
        ("POST", "/v1/publish/t"),
        ("POST", "/v1/publish"),
        ("GET", "/v1/subscribe?filter=t"),
    ] {
        let r = call(served.addr, method, path, "", b"x").await;
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (401, Some("unauthorized")),
            "{path}"
        );
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="sensorgate""#)
        );
    }
    assert!(spooled_topics(&s).is_empty());
}

#[tokio::test]
async fn spool_refusals_are_503_with_retry_after_and_nothing_durable_is_refused() {
    let s = setup(16, 256 << 10, RouteTable::everything());
    let served = serve(
        &s,
        HttpSection {
            retry_after: Duration::from_secs(9),
            max_body_size: 256 << 10,
            ..anonymous()
        },
    )
    .await;
    let big = vec![b'x'; 200 << 10];
    let r = call(served.addr, "POST", "/v1/publish/big", "", &big).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (503, Some("spool_full"))
    );
    assert_eq!(r.header("retry-after"), Some("9"));
    assert!(spooled_topics(&s).is_empty());
}

#[tokio::test]
async fn a_stopping_gateway_answers_503_stopping_and_appends_nothing() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(&s, anonymous()).await;
    served.stop.cancel();
    for (method, path) in [("POST", "/v1/publish/t"), ("GET", "/v1/subscribe?filter=t")] {
        let r = call(served.addr, method, path, "", b"x").await;
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (503, Some("stopping")),
            "{path}"
        );
        assert_eq!(r.header("retry-after"), Some("5"));
        assert_eq!(r.header("connection"), Some("close"));
    }
    assert!(spooled_topics(&s).is_empty());
}

#[tokio::test]
async fn the_driver_answers_the_admins_report_and_client_pages() {
    use crate::observe::model::{ClientQuery, IngressQuery, SessionState};
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(&s, anonymous()).await;
    assert_eq!(
        call(served.addr, "POST", "/v1/publish/a/b?qos=1", "", b"1")
            .await
            .status,
        200
    );
    assert_eq!(
        call(served.addr, "POST", "/v1/publish/a/c?qos=0", "", b"2")
            .await
            .status,
        202
    );
    assert_eq!(
        call(served.addr, "POST", "/v1/publish/a%23", "", b"3")
            .await
            .status,
        400
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    served.queries.send(IngressQuery::Report(tx)).await.unwrap();
    let report = bounded("the report", rx).await.unwrap();
    assert_eq!(report.protocol, "http");
    let c = report.counters;
    assert_eq!((c.packets_in, c.messages_in, c.acks), (3, [0, 1, 1, 0], 1));
    assert_eq!(
        c.refusals,
        [0, 1, 0, 0, 0, 0],
        "bad_topic counts as invalid_topic"
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    let query = ClientQuery {
        limit: 10,
        ..ClientQuery::default()
    };
    served
        .queries
        .send(IngressQuery::Clients(query, tx))
        .await
        .unwrap();
    let page = bounded("the page", rx).await.unwrap();
    assert_eq!(page.clients.len(), 1);
    let client = &page.clients[0];
    assert_eq!(client.client_id, "anonymous@127.0.0.1");
    assert_eq!(
        (client.protocol, client.state),
        ("http", SessionState::Active)
    );
    assert!(
        client
            .address
            .as_deref()
            .is_some_and(|a| a.starts_with("tcp:127.0.0.1:"))
    );
    let devices = served.ingress.stats.events();
    let get = |name: &str| devices.iter().find(|(n, _)| *n == name).map(|&(_, v)| v);
    assert_eq!(
        (
            get("responses_200"),
            get("responses_202"),
            get("responses_400")
        ),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(get("connections_opened"), Some(3));
}

// ---- With package B (auth, batch, SSE) ----

/// Records the router's calls to its one upstream.
#[derive(Clone, Default)]
struct FakeUpstream {
    calls: Arc<std::sync::Mutex<Vec<String>>>,
}

impl sensorgate_bridges::upstream::Subscriber for FakeUpstream {
    fn name(&self) -> &str {
        "fake"
    }

    fn subscribe(
        &self,
        filter: &str,
        qos: Qos,
    ) -> Result<(), sensorgate_bridges::upstream::FailReason> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("sub {filter} {qos:?}"));
        Ok(())
    }

    fn unsubscribe(&self, filter: &str) -> Result<(), sensorgate_bridges::upstream::FailReason> {
        self.calls.lock().unwrap().push(format!("unsub {filter}"));
        Ok(())
    }
}

impl FakeUpstream {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

/// `setup` with one fake upstream whose subscription calls are recorded.
fn setup_with_upstream(max_bytes: u64) -> (Setup, FakeUpstream) {
    let fake = FakeUpstream::default();
    // The link's sender may go: the router only reads the last value.
    let (_link_tx, link) = tokio::sync::watch::channel(true);
    let upstream = sensorgate_bridges::router::RoutedUpstream {
        subscriber: Box::new(fake.clone()),
        link,
    };
    let s = setup_with(16, max_bytes, RouteTable::everything(), vec![upstream]);
    (s, fake)
}

const TOKEN1: &str = "token-of-device-one-0123456789";
const TOKEN2: &str = "token-of-device-two-0123456789";

fn devices_section() -> HttpSection {
    let device =
        |id: &str, token: &str, publish: &str, subscribe: &str| crate::config::DeviceSpec {
            id: id.to_owned(),
            token_hash: Some(super::token::digest(token.as_bytes())),
            publish: vec![publish.to_owned()],
            subscribe: vec![subscribe.to_owned()],
        };
    HttpSection {
        devices: vec![
            device("dev1", TOKEN1, "sensors/dev1", "cmd/dev1"),
            device("dev2", TOKEN2, "sensors/dev2", "cmd/dev2"),
        ],
        ..HttpSection::default()
    }
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

#[tokio::test]
async fn the_auth_matrix() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(&s, devices_section()).await;
    let a = served.addr;
    let post = |extra: String, path: &'static str| async move {
        call(a, "POST", path, &extra, b"1").await
    };
    let r = post(String::new(), "/v1/publish/sensors/dev1/t").await;
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (401, Some(r#"Bearer realm="sensorgate""#))
    );
    for extra in [
        bearer("not-a-known-token-at-all"),
        "Authorization: Basic ZGV2MTp4\r\n".to_owned(),
        bearer("a b"),
    ] {
        let r = post(extra.clone(), "/v1/publish/sensors/dev1/t").await;
        assert_eq!(r.status, 401, "{extra}");
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="sensorgate", error="invalid_token""#),
            "{extra}"
        );
    }
    let r = post(bearer(TOKEN1), "/v1/publish/sensors/dev10/t").await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("forbidden_topic"))
    );
    let r = post(bearer(TOKEN2), "/v1/publish/sensors/dev1/t").await;
    assert_eq!(r.status, 403, "dev2 may not publish under dev1");
    let r = call(
        a,
        "GET",
        "/v1/subscribe?filter=cmd/dev2/%23",
        &bearer(TOKEN1),
        b"",
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("forbidden_filter"))
    );
    assert!(spooled_topics(&s).is_empty(), "nothing refused was stored");
    let r = post(bearer(TOKEN1), "/v1/publish/sensors/dev1/t").await;
    assert_eq!(r.status, 200);
    let records = spooled(&s);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].origin.client_id.as_deref(), Some("dev1"));
}

#[tokio::test]
async fn a_device_over_its_rate_is_429_with_retry_after() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(
        &s,
        HttpSection {
            rate_per_device: 0.001,
            rate_burst: 1,
            ..devices_section()
        },
    )
    .await;
    let a = served.addr;
    assert_eq!(
        call(
            a,
            "POST",
            "/v1/publish/sensors/dev1/t",
            &bearer(TOKEN1),
            b"1"
        )
        .await
        .status,
        200
    );
    let r = call(
        a,
        "POST",
        "/v1/publish/sensors/dev1/t",
        &bearer(TOKEN1),
        b"2",
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (429, Some("rate_limited"))
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        retry > 1 && r.json()["retry_after_secs"] == retry,
        "{retry}"
    );
    // Another device has its own bucket.
    assert_eq!(
        call(
            a,
            "POST",
            "/v1/publish/sensors/dev2/t",
            &bearer(TOKEN2),
            b"3"
        )
        .await
        .status,
        200
    );
    assert_eq!(spooled_topics(&s), ["sensors/dev1/t", "sensors/dev2/t"]);
}

fn json_batch(
    a: std::net::SocketAddr,
    query: &str,
    content_type: &str,
    body: &[u8],
) -> impl Future<Output = Reply> {
    let path = format!("/v1/publish{query}");
    let extra = format!("Content-Type: {content_type}\r\n");
    let body = body.to_vec();
    async move { call(a, "POST", &path, &extra, &body).await }
}

#[tokio::test]
async fn batches_are_answered_as_one_unit() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(
        &s,
        HttpSection {
            max_batch_items: 3,
            anonymous_publish: vec!["sensors".to_owned()],
            ..anonymous()
        },
    )
    .await;
    let a = served.addr;
    let body =
        br#"[{"topic":"sensors/a","payload":"1"},{"topic":"sensors/b","payload":{"x":1},"qos":0}]"#;
    let r = json_batch(a, "", "application/json", body).await;
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"items":2,"durable":1,"queued":1}))
    );
    let body = b"{\"topic\":\"sensors/c\",\"payload\":\"3\"}\n{\"topic\":\"sensors/d\",\"payload_b64\":\"AAE=\"}\n";
    let r = json_batch(a, "?qos=0", "application/x-ndjson", body).await;
    assert_eq!(
        (r.status, r.json()),
        (202, serde_json::json!({"items":2,"durable":0,"queued":2}))
    );
    wait_for("the QoS 0 items", || spooled_topics(&s).len() == 4).await;
    let records = spooled(&s);
    let got: Vec<(&str, &[u8])> = records
        .iter()
        .map(|r| (r.topic.as_str(), &r.payload[..]))
        .collect();
    assert_eq!(
        got,
        [
            ("sensors/a", &b"1"[..]),
            ("sensors/b", br#"{"x":1}"#),
            ("sensors/c", b"3"),
            ("sensors/d", &[0, 1])
        ]
    );
    // Refused whole: nothing more is stored.
    let r = json_batch(a, "", "text/plain", b"[]").await;
    assert_eq!(
        (r.status, r.header("accept-post")),
        (415, Some(super::request::BATCH_MEDIA_TYPES))
    );
    let r = json_batch(
        a,
        "",
        "application/json",
        br#"[{"topic":"sensors/a","payload":"1"},{"topic":"sensors/b"}]"#,
    )
    .await;
    assert_eq!(
        (
            r.status,
            r.json()["error"].as_str(),
            r.json()["index"].as_u64()
        ),
        (400, Some("bad_batch"), Some(1))
    );
    let r = json_batch(
        a,
        "",
        "application/json",
        br#"[{"topic":"sensors/a","payload":"1"},{"topic":"other/b","payload":"2"}]"#,
    )
    .await;
    assert_eq!(
        (
            r.status,
            r.json()["error"].as_str(),
            r.json()["index"].as_u64()
        ),
        (403, Some("forbidden_topic"), Some(1))
    );
    let four = br#"[{"topic":"sensors/a","payload":"1"},{"topic":"sensors/a","payload":"1"},{"topic":"sensors/a","payload":"1"},{"topic":"sensors/a","payload":"1"}]"#;
    let r = json_batch(a, "", "application/json", four).await;
    assert_eq!((r.status, r.json()["limit"].as_u64()), (413, Some(3)));
    assert_eq!(spooled_topics(&s).len(), 4);
}

#[tokio::test]
async fn a_batch_the_spool_partly_refuses_is_503_with_the_exact_refused_list() {
    let s = setup(16, 256 << 10, RouteTable::everything());
    let served = serve(
        &s,
        HttpSection {
            max_body_size: 128 << 10,
            ..anonymous()
        },
    )
    .await;
    let big = "x".repeat(100 << 10);
    let body = format!(
        r#"[{{"topic":"p/0","payload":"{big}"}},{{"topic":"p/1","payload":"{big}"}},{{"topic":"p/2","payload":"{big}"}},{{"topic":"p/3","payload":"small"}}]"#
    );
    let r = json_batch(served.addr, "", "application/json", body.as_bytes()).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    let json = r.json();
    assert_eq!(json["error"], "partial");
    assert_eq!(json["accepted"], 3);
    assert_eq!(
        json["refused"],
        serde_json::json!([{"index": 2, "error": "spool_full"}])
    );
    assert_eq!(
        spooled_topics(&s),
        ["p/0", "p/1", "p/3"],
        "every item not listed is stored"
    );
}

#[tokio::test]
async fn a_batch_with_an_unrouted_topic_is_403_and_nothing_is_stored() {
    let spec = RouteSpec {
        filter: "a/#".to_owned(),
        upstreams: vec!["up".to_owned()],
        ..Default::default()
    };
    let routes = RouteTable::compile(&[spec], &["up"], "gw").unwrap();
    let s = setup(16, 1 << 20, routes);
    let served = serve(&s, anonymous()).await;
    let body = br#"[{"topic":"a/1","payload":"1"},{"topic":"b/2","payload":"2"}]"#;
    let r = json_batch(served.addr, "", "application/json", body).await;
    assert_eq!(
        (
            r.status,
            r.json()["error"].as_str(),
            r.json()["index"].as_u64()
        ),
        (403, Some("no_route"), Some(1))
    );
    let r = call(served.addr, "POST", "/v1/publish/b/1", "", b"x").await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("no_route"))
    );
    assert!(spooled_topics(&s).is_empty());
}

/// An SSE client over raw TCP: reads until `needle` shows up in what it has read.
struct SseClient {
    stream: tokio::net::TcpStream,
    seen: Vec<u8>,
}

impl SseClient {
    async fn open(addr: std::net::SocketAddr, path: &str, extra: &str) -> Self {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{extra}\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        SseClient {
            stream,
            seen: Vec::new(),
        }
    }

    async fn until(&mut self, needle: &str) -> String {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        let found = |seen: &[u8]| seen.windows(needle.len()).any(|w| w == needle.as_bytes());
        while !found(&self.seen) {
            let n = bounded(needle, self.stream.read(&mut buf)).await.unwrap();
            assert!(
                n > 0,
                "stream ended before {needle:?}: {}",
                String::from_utf8_lossy(&self.seen)
            );
            self.seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&self.seen).into_owned()
    }
}

#[tokio::test]
async fn sse_streams_get_downlink_and_local_messages_and_unsubscribe_when_dropped() {
    let (s, fake) = setup_with_upstream(1 << 20);
    let served = serve(
        &s,
        HttpSection {
            sse_keepalive: Duration::from_millis(50),
            max_streams_per_device: 1,
            ..devices_section()
        },
    )
    .await;
    let mut sse = SseClient::open(
        served.addr,
        "/v1/subscribe?filter=cmd/dev1/%23",
        &bearer(TOKEN1),
    )
    .await;
    let head = sse.until("event: ready").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(
        head.contains(r#"data: {"filters":["cmd/dev1/#"]}"#),
        "{head}"
    );
    assert_eq!(fake.calls(), ["sub cmd/dev1/# AtMostOnce"]);
    // Another ingress's accepted message reaches the stream through the router.
    let (other, _rx) = peer(&s);
    other.deliver_local(&msg("cmd/dev1/led", b"on", Qos::AtLeastOnce));
    sse.until(r#""topic":"cmd/dev1/led","payload":"on""#).await;
    // The device's second stream is over its limit (1 here).
    let r = call(
        served.addr,
        "GET",
        "/v1/subscribe?filter=cmd/dev1/x",
        &bearer(TOKEN1),
        b"",
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (429, Some("too_many_streams"))
    );
    assert_eq!(r.header("retry-after"), Some("5"));
    drop(other);
    // Keep-alive comments flow while idle.
    sse.until(": ka").await;
    assert_eq!(
        served
            .ingress
            .streams
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The client leaves: the next keep-alive write fails, the body is dropped, the stream
    // unregistered and the router's filter released.
    drop(sse);
    let ours = || -> Vec<String> {
        let calls = fake.calls();
        calls
            .into_iter()
            .filter(|c| c.contains("cmd/dev1"))
            .collect()
    };
    wait_for("the unsubscribe", || ours().len() == 2).await;
    assert_eq!(ours(), ["sub cmd/dev1/# AtMostOnce", "unsub cmd/dev1/#"]);
    assert_eq!(
        served
            .ingress
            .streams
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn an_http_publish_reaches_this_ingress_s_own_streams() {
    let (s, _fake) = setup_with_upstream(1 << 20);
    let served = serve(
        &s,
        HttpSection {
            sse_keepalive: Duration::from_secs(600),
            ..anonymous()
        },
    )
    .await;
    let mut sse = SseClient::open(served.addr, "/v1/subscribe?filter=t/%2B", "").await;
    sse.until("event: ready").await;
    assert_eq!(
        call(served.addr, "POST", "/v1/publish/t/1?qos=1", "", b"one")
            .await
            .status,
        200
    );
    assert_eq!(
        call(served.addr, "POST", "/v1/publish/t/2?qos=0", "", &[0xff])
            .await
            .status,
        202
    );
    sse.until(r#""topic":"t/1","payload":"one","qos":1"#).await;
    sse.until(r#""topic":"t/2","payload_b64":"/w==""#).await;
    // At shutdown the stream ends cleanly.
    served.stop.cancel();
    served.ingress.hub().close_all();
    let rest = sse.until("0\r\n\r\n").await;
    assert!(rest.ends_with("0\r\n\r\n"), "the chunked body ended");
}

#[tokio::test]
async fn run_serves_until_stop_then_answers_the_verdict_in_flight_and_returns() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let section = Arc::new(HttpSection {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..anonymous()
    });
    let bound = super::server::bind(&section).unwrap();
    let addr = bound.plain[0].local_addr().unwrap();
    let (reply_tx, replies) = mpsc::channel(16);
    let (dl_tx, downlink) = mpsc::channel(16);
    let (_query_tx, queries) = mpsc::channel(1);
    let wiring = super::Wiring {
        handle: s.router.ingress(reply_tx).with_downlink(dl_tx),
        replies,
        downlink,
        queries,
        beat: Arc::new(Beat::new()),
    };
    let stats = Arc::new(HttpStats::default());
    let stop = CancellationToken::new();
    let running = tokio::spawn(super::run(
        super::Reloader::new(&section).unwrap(),
        bound,
        None,
        wiring,
        Arc::clone(&stats),
        stop.clone(),
    ));
    assert_eq!(
        call(addr, "POST", "/v1/publish/t/0", "", b"0").await.status,
        200
    );
    let mut sse = SseClient::open(addr, "/v1/subscribe?filter=t/%23", "").await;
    sse.until("event: ready").await;
    // A QoS 1 request is appended; the writer holds it, blocked before its write.
    let probe = s.router.ingress(mpsc::channel(1).0);
    let requests = std::cell::RefCell::new(Vec::new());
    let guard = hold_writer_with(&s, &probe, || async {
        let request = tokio::spawn(call(addr, "POST", "/v1/publish/t/1", "", b"1"));
        requests.borrow_mut().push(request);
    })
    .await;
    let in_flight = requests.borrow_mut().pop().unwrap();
    stop.cancel();
    // The SSE stream ends at once (its chunked body is terminated).
    sse.until("0\r\n\r\n").await;
    assert!(!in_flight.is_finished());
    drop(guard);
    let reply = bounded("the request in flight", in_flight).await.unwrap();
    assert_eq!(
        (reply.status, reply.json()["durable"].as_bool()),
        (200, Some(true))
    );
    bounded("run's return", running).await.unwrap().unwrap();
    for earlier in requests.into_inner() {
        assert_eq!(
            earlier.await.unwrap().status,
            200,
            "a retried step's request"
        );
    }
    assert_eq!(stats.verdicts_orphaned(), 0);
}

#[tokio::test]
async fn bodies_beyond_body_memory_wait_then_get_503_busy() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(
        &s,
        HttpSection {
            // One KiB: one request body at a time.
            body_memory: 1024,
            request_timeout: Duration::from_millis(300),
            ..anonymous()
        },
    )
    .await;
    let a = served.addr;
    assert_eq!(
        call(a, "POST", "/v1/publish/t/0", "", b"0").await.status,
        200
    );
    // A request holds its body's share until it is answered: this one waits for its verdict.
    let probe = s.router.ingress(mpsc::channel(1).0);
    let requests = std::cell::RefCell::new(Vec::new());
    let guard = hold_writer_with(&s, &probe, || async {
        requests
            .borrow_mut()
            .push(tokio::spawn(call(a, "POST", "/v1/publish/t/1", "", b"1")));
    })
    .await;
    let r = call(a, "POST", "/v1/publish/t/2", "", b"2").await;
    assert_eq!((r.status, r.json()["error"].as_str()), (503, Some("busy")));
    assert_eq!(r.header("retry-after"), Some("5"));
    drop(guard);
    for request in requests.into_inner() {
        assert_eq!(bounded("the holder", request).await.unwrap().status, 200);
    }
    assert_eq!(
        call(a, "POST", "/v1/publish/t/3", "", b"3").await.status,
        200,
        "memory back"
    );
    assert!(!spooled_topics(&s).contains(&"t/2".to_owned()));
}

#[tokio::test]
async fn a_client_that_leaves_before_its_verdict_is_an_orphan_whose_message_is_still_delivered() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let (_peer, mut peer_rx) = peer(&s);
    let served = serve(&s, anonymous()).await;
    let a = served.addr;
    assert_eq!(
        call(a, "POST", "/v1/publish/warm", "", b"0").await.status,
        200
    );
    assert_eq!(
        bounded("warm-up copy", peer_rx.recv()).await.unwrap().topic,
        "warm"
    );
    let probe = s.router.ingress(mpsc::channel(1).0);
    let requests = std::cell::RefCell::new(Vec::new());
    let guard = hold_writer_with(&s, &probe, || async {
        requests
            .borrow_mut()
            .push(tokio::spawn(call(a, "POST", "/v1/publish/gone", "", b"1")));
    })
    .await;
    // The client goes away (its socket closed): hyper drops the handler.
    let leaving = requests.borrow_mut().pop().unwrap();
    leaving.abort();
    wait_for("the handler dropped", || {
        served.ingress.verdicts.orphans_waiting() == 1
    })
    .await;
    drop(guard);
    let earlier = requests.into_inner();
    let answered = earlier.len();
    for request in earlier {
        assert_eq!(
            request.await.unwrap().status,
            200,
            "a retried step's request"
        );
    }
    // One copy per stored "gone": the answered ones (retried steps) and the orphan.
    for _ in 0..=answered {
        let copy = bounded("the orphan's local copy", peer_rx.recv())
            .await
            .unwrap();
        assert_eq!(
            (copy.topic.as_str(), &copy.payload[..]),
            ("gone", &b"1"[..])
        );
    }
    wait_for("the orphan count", || {
        served.ingress.stats.verdicts_orphaned() == 1
    })
    .await;
    assert_eq!(served.ingress.verdicts.len(), 0);
    assert!(
        spooled_topics(&s).contains(&"gone".to_owned()),
        "durable though nobody was told"
    );
}

/// An HTTP/1.1 client on one kept-alive connection: one request at a time, each response
/// read by its `Content-Length`.
struct KeepAlive {
    stream: tokio::net::TcpStream,
}

impl KeepAlive {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        KeepAlive {
            stream: tokio::net::TcpStream::connect(addr).await.unwrap(),
        }
    }

    async fn post(&mut self, path: &str, extra: &str, body: &[u8]) -> Reply {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(body);
        self.stream.write_all(&raw).await.unwrap();
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = parse_reply(&bytes[..end + 4]);
                let length: usize = head
                    .header("content-length")
                    .map_or(0, |v| v.parse().unwrap());
                if bytes.len() >= end + 4 + length {
                    return parse_reply(&bytes[..end + 4 + length]);
                }
            }
            let n = bounded("a response", self.stream.read(&mut buf))
                .await
                .unwrap();
            assert!(
                n > 0,
                "connection closed: {:?}",
                String::from_utf8_lossy(&bytes)
            );
            bytes.extend_from_slice(&buf[..n]);
        }
    }
}

const TOKEN3: &str = "token-of-device-one-renewed-0123";

/// Two devices that may publish and subscribe anywhere.
fn open_devices(dev1_token: &str) -> HttpSection {
    let device = |id: &str, token: &str| crate::config::DeviceSpec {
        id: id.to_owned(),
        token_hash: Some(super::token::digest(token.as_bytes())),
        publish: vec!["#".to_owned()],
        subscribe: vec!["#".to_owned()],
    };
    HttpSection {
        devices: vec![device("dev1", dev1_token), device("dev2", TOKEN2)],
        sse_keepalive: Duration::from_secs(600),
        ..HttpSection::default()
    }
}

#[tokio::test]
async fn a_reload_swaps_tokens_and_limits_and_keeps_connections_and_streams() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(&s, open_devices(TOKEN1)).await;
    let a = served.addr;
    let mut sse = SseClient::open(a, "/v1/subscribe?filter=x/%23", &bearer(TOKEN2)).await;
    sse.until("event: ready").await;
    let mut kept = KeepAlive::connect(a).await;
    assert_eq!(
        kept.post("/v1/publish/x/1", &bearer(TOKEN1), b"12345")
            .await
            .status,
        200
    );

    // dev1's token is renewed, bodies are limited to 4 bytes.
    let notes = served
        .reloader
        .apply(&HttpSection {
            max_body_size: 4,
            ..open_devices(TOKEN3)
        })
        .unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains(r#"1 with a new token ["dev1"]"#),
        "{notes:?}"
    );

    // The connection opened before the reload serves the new settings.
    assert_eq!(
        kept.post("/v1/publish/x/2", &bearer(TOKEN3), b"1234")
            .await
            .status,
        200,
        "the new token works"
    );
    let r = kept
        .post("/v1/publish/x/3", &bearer(TOKEN3), b"12345")
        .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (413, Some("too_large"))
    );
    let r = call(a, "POST", "/v1/publish/x/4", &bearer(TOKEN1), b"1").await;
    assert_eq!(r.status, 401, "the old token is refused");
    assert_eq!(
        call(a, "POST", "/v1/publish/x/5", &bearer(TOKEN2), b"1")
            .await
            .status,
        200,
        "an unchanged device goes on"
    );
    // The stream opened before the reload got everything stored, in order.
    let seen = sse.until(r#""topic":"x/5""#).await;
    let order: Vec<usize> = ["\"x/1\"", "\"x/2\"", "\"x/5\""]
        .iter()
        .map(|t| seen.find(t).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{seen}");
    assert!(!seen.contains("\"x/3\"") && !seen.contains("\"x/4\""));
    assert_eq!(spooled_topics(&s), ["x/1", "x/2", "x/5"]);
}

#[tokio::test]
async fn a_lowered_max_connections_waits_for_open_ones_to_end() {
    let s = setup(16, 1 << 20, RouteTable::everything());
    let served = serve(
        &s,
        HttpSection {
            max_connections: 2,
            ..anonymous()
        },
    )
    .await;
    let a = served.addr;
    let mut first = KeepAlive::connect(a).await;
    assert_eq!(first.post("/v1/publish/t/1", "", b"1").await.status, 200);
    let notes = served
        .reloader
        .apply(&HttpSection {
            max_connections: 1,
            ..anonymous()
        })
        .unwrap();
    assert!(notes.is_empty(), "one open, one allowed: {notes:?}");
    let notes = served
        .reloader
        .apply(&HttpSection {
            max_connections: 0,
            ..anonymous()
        })
        .unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("max_connections lowered to 0, below 1"),
        "{notes:?}"
    );
    // (0 is taken as 1, as at start.)
    served
        .reloader
        .apply(&HttpSection {
            max_connections: 1,
            ..anonymous()
        })
        .unwrap();
    // The open connection goes on; a second one waits in the accept queue until it ends.
    let second = tokio::spawn(call(a, "POST", "/v1/publish/t/2", "", b"2"));
    assert_eq!(first.post("/v1/publish/t/3", "", b"3").await.status, 200);
    assert!(!second.is_finished());
    let opened = || {
        served
            .ingress
            .stats
            .conn
            .connections_opened
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(opened(), 1, "the second connection is not served yet");
    drop(first);
    assert_eq!(
        bounded("the waiting connection", second)
            .await
            .unwrap()
            .status,
        200
    );
    // Raised again: two at once.
    served
        .reloader
        .apply(&HttpSection {
            max_connections: 2,
            ..anonymous()
        })
        .unwrap();
    let mut one = KeepAlive::connect(a).await;
    assert_eq!(one.post("/v1/publish/t/4", "", b"4").await.status, 200);
    assert_eq!(
        call(a, "POST", "/v1/publish/t/5", "", b"5").await.status,
        200
    );
}
