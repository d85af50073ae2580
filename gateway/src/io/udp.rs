//! The UDP adapter of every datagram protocol (MQTT-SN, CoAP): owns the listening sockets and
//! one sans-IO core (a [`DatagramCore`]), and moves datagrams, the spool's verdicts (a sensor's
//! QoS 1/2 publish is accepted once it is durable in the spool), downlink messages and timer
//! expiries into it and its output out. Protocol decisions are the core's; what is here
//! (batching, backpressure, local delivery, admin queries) is the same for every protocol.
//!
//! It makes no protocol decisions and sees no upstream, only the router's [`IngressHandle`]:
//! downlink comes from the router on this ingress's own channel, and a sensor's accepted
//! publish is handed back to it for the other ingresses' subscribers
//! ([`IngressHandle::deliver_local`]; the core serves its own).
//! Per wake-up it reads up to `recv_batch` datagrams from each ready socket, then drains the
//! core's events (to the ingress handle) and transmits (to the sockets), so a burst is handled
//! with one flush. With a session store, it then hands the
//! round's persisted session changes and the broker acknowledgements that wait for them to the
//! store thread ([`StoreLink`]), never waiting for the disk itself.
//!
//! Backpressure: when the spool writer's queue refuses an append ([`AppendRefused::QueueFull`])
//! the driver holds the refused publish, and every publish the core emits after it, in order
//! (`held`), and stops reading its sockets ([`ReadGate`]) until the writer has taken from the
//! queue again ([`IngressHandle::room_since`], woken by the writer, no polling). Then it
//! appends the held publishes first, in order, taking a fresh progress mark before each
//! try; if the queue fills again the rest stay held and it waits again. Only with nothing
//! held does it read again. So a burst waits in the kernel's receive buffers (`recv_buffer`)
//! instead of being read and discarded, what overflows those is counted by the kernel
//! (`kernel_drops` in the status line), and nothing read is dropped: a QoS 1/2 sensor gets
//! its PUBACK / PUBREC (accepted) once the held publish is appended and durable, never
//! congestion for a transient full queue. The log order per sender is the order the core
//! emitted the publishes, held or not.
//!
//! Invariants: while anything is held the sockets are not read (`held` non-empty implies a
//! paused [`ReadGate`]); hence at most what one round read is held, [`HELD_ROUNDS`] receive
//! batches per socket ([`held_max`]). Publishes emitted without reading while
//! paused (a Will due at a keep-alive expiry) go behind the held ones too; one that would
//! exceed the bound gets the old answer instead (QoS 1/2: congestion, the sensor retries;
//! QoS 0/-1 and Wills: dropped, counted in [`UdpStats::queue_dropped`]). A spool verdict
//! for a held publish cannot come (none was taken), so `local_pending` keeps its copy until
//! the verdict of the append that took it. At shutdown the held publishes are tried once
//! more without waiting; what is still refused is not acknowledged (QoS 1/2 senders resend
//! it to the next run) or, without a token, lost and counted. While paused, the spool's
//! verdicts, downlink, the session store and the timers are served as usual, so the queue
//! drains and sessions do not time out.
//!
//! Every refusal, the first one and each failed retry, is counted as `queue_full` in the
//! spool status (`SharedSpool::queue_full`): a count there says the writer's queue was full
//! and reading paused, not that anything was lost.
//!
//! Serial lines (MQTT-SN, [`UdpDriver::with_serial`]): the frames the line tasks read arrive
//! on one bounded channel, read like one more socket (a batch of `recv_batch` per round, not
//! while the read gate is closed; it counts as one more socket in `held_max`), and reach
//! the core as `Peer::serial(line)`; what the core sends to `PeerAddr::Serial { line }` goes
//! to that line's bounded write queue without waiting (full: dropped, counted by the line).
//!
//! Observability: the admin listener asks its [`IngressQuery`]s on a channel of its own
//! ([`UdpDriver::with_queries`]); the driver answers one per turn from the core it owns
//! ([`DatagramCore::report`], [`DatagramCore::clients`]), so the session table keeps one owner and no lock,
//! and nothing is counted or copied per packet for it. With a [`Beat`]
//! ([`UdpDriver::with_beat`]) each turn ends with one relaxed store of the instant already
//! read for the timers, and an interval of [`BEAT_IDLE`] makes an idle driver turn too.
//!
//! Live reconfiguration ([`UdpDriver::with_reconfigure`]): a [`Reconfigure`] request is
//! served between two turns like an admin query: the core takes the settings
//! ([`DatagramCore::reconfigure`], sessions untouched), the receive slots follow a changed
//! [`DatagramCore::max_datagram_size`], the turn's flush sends what the change caused, and
//! the core's notes go back to the asker. Nothing else the driver holds (held publishes, the
//! read gate, verdicts and acknowledgements awaited) is touched.
//!
//! Forwarders ([`UdpDriver::with_forwarders`], see [`forwarders`]): a datagram whose source
//! matches an allow-list entry reaches the core from [`PeerAddr::Forwarder`] of that entry, not
//! from its socket address, and the core's datagrams for that peer go to the entry's latest
//! source. The driver only maps addresses; whether encapsulations are acted on is the core's
//! decision ([`PeerAddr::may_relay`]).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use sensorgate_bridges::message::{Downlink, Message};
use sensorgate_bridges::router::{AppendRefused, IngressHandle};
use sensorgate_bridges::spool::AppendReply;
use sensorgate_bridges::telemetry::{BEAT_IDLE, Beat};

use self::forwarders::Forwarders;
pub use self::forwarders::{ForwarderEntry, ForwarderEntryError, ForwarderList, MAX_FORWARDERS};
use super::batch::{RecvBatch, SendBatch};
use super::session_store::StoreLink;
use crate::ingress::{DatagramCore, Event, Peer, PeerAddr, PublishOutcome, Reconfigure};
use crate::observe::model::IngressQuery;
use crate::serial::line::{LineHandle, SerialLinks};

pub mod forwarders;

/// Replies sent per `sendmmsg`.
const SEND_BATCH: usize = 64;

/// Downlink messages taken per wake-up beyond the first, before output is flushed.
const DOWNLINK_BATCH: usize = 255;

/// Most accepted-pending QoS 1/2 publishes kept for local delivery to the other ingresses
/// (a copy each while the spool's verdict is out; beyond it a copy is not delivered to them).
const LOCAL_PENDING_MAX: usize = 65_536;

/// Receive batches taken from each socket per round beyond the one that woke the driver,
/// before output is flushed.
const DRAIN_ROUNDS: usize = 4;

/// Receive batches per socket whose publishes may be held at once (see the module doc,
/// backpressure): one round's reads, the batch that woke the driver and [`DRAIN_ROUNDS`].
const HELD_ROUNDS: usize = 1 + DRAIN_ROUNDS;

/// The driver's counters, read by the status line.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Publishes without a token (QoS 0/-1, Wills) given up for a full spool queue: beyond
    /// the held bound, or still held at shutdown. A QoS 1/2 publish is never counted here:
    /// it is answered with congestion (beyond the bound) or left unacknowledged (shutdown),
    /// and its sender resends it.
    pub queue_dropped: AtomicU64,
}

impl UdpStats {
    /// [`Self::queue_dropped`], now.
    pub fn queue_dropped(&self) -> u64 {
        self.queue_dropped.load(Ordering::Relaxed)
    }
}

/// Whether the driver reads its sockets (see the module doc, backpressure): paused by a
/// refusal for a full spool queue until the writer has made progress past the mark taken
/// before that append.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ReadGate {
    /// The writer's progress mark (`IngressHandle::room_mark`) before the latest refused
    /// append; `None` while reading.
    paused_at: Option<u64>,
}

impl ReadGate {
    /// An append taken with progress mark `mark` was refused for a full queue: pause. The
    /// latest refusal's mark is kept (an earlier one may be passed already while the queue
    /// is full again).
    fn refused(&mut self, mark: u64) {
        self.paused_at = Some(mark);
    }

    /// Whether the sockets are read.
    fn reading(&self) -> bool {
        self.paused_at.is_none()
    }

    /// The mark to wait past while paused.
    fn waiting_for(&self) -> Option<u64> {
        self.paused_at
    }

    /// The writer took from the queue since the mark: read again.
    fn room(&mut self) {
        self.paused_at = None;
    }
}

/// Socket settings from `[mqttsn]`.
#[derive(Debug, Clone, Copy)]
pub struct SocketOptions {
    /// `SO_RCVBUF` request in bytes.
    pub recv_buffer: usize,
    /// `SO_SNDBUF` request in bytes.
    pub send_buffer: usize,
}

/// A socket buffer as asked for and as the kernel granted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSize {
    /// The request (`SO_RCVBUF` / `SO_SNDBUF`), in bytes.
    pub requested: usize,
    /// What the kernel granted, in the request's terms (bytes of datagram data).
    pub granted: usize,
}

impl BufferSize {
    /// From the request and what `getsockopt` reported after it. Linux doubles a granted size
    /// to leave room for its bookkeeping and reports the doubled value (socket(7)), so the
    /// report is halved there to be comparable with the request.
    fn from_report(requested: usize, reported: usize) -> BufferSize {
        let granted = if cfg!(target_os = "linux") {
            reported / 2
        } else {
            reported
        };
        BufferSize { requested, granted }
    }

    /// True when the kernel granted less than asked: its cap (`net.core.rmem_max` /
    /// `net.core.wmem_max`) applied.
    pub fn capped(&self) -> bool {
        self.granted < self.requested
    }
}

/// The receive and send buffers of `socket` after the requests of `options`.
///
/// # Errors
/// The OS error of `getsockopt`.
pub fn buffer_sizes(
    socket: &UdpSocket,
    options: SocketOptions,
) -> io::Result<(BufferSize, BufferSize)> {
    let sock = socket2::SockRef::from(socket);
    Ok((
        BufferSize::from_report(options.recv_buffer, sock.recv_buffer_size()?),
        BufferSize::from_report(options.send_buffer, sock.send_buffer_size()?),
    ))
}

/// The sysctls that capped `recv` and `send`, for the log ("" when none did).
fn capping_sysctls(recv: BufferSize, send: BufferSize) -> &'static str {
    match (recv.capped(), send.capped()) {
        (true, true) => "net.core.rmem_max, net.core.wmem_max",
        (true, false) => "net.core.rmem_max",
        (false, true) => "net.core.wmem_max",
        (false, false) => "",
    }
}

/// Binds one UDP listener. IPv6 sockets are v6-only so `0.0.0.0:P` and `[::]:P` can coexist.
/// Logs one line with the buffer sizes asked for and granted, at warn when the kernel capped
/// them.
///
/// # Errors
/// The OS error from socket, option or bind calls.
pub fn bind(addr: SocketAddr, options: SocketOptions, protocol: &str) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    } else {
        // ADVERTISE / GWINFO destinations may be broadcast addresses.
        socket.set_broadcast(true)?;
    }
    // The kernel silently caps these (net.core.rmem_max / wmem_max): what it granted is logged.
    socket.set_recv_buffer_size(options.recv_buffer)?;
    socket.set_send_buffer_size(options.send_buffer)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    let (recv, send) = buffer_sizes(&socket, options)?;
    let capped_by = capping_sysctls(recv, send);
    if capped_by.is_empty() {
        tracing::info!(
            %addr,
            protocol,
            recv_buffer_requested = recv.requested,
            recv_buffer_granted = recv.granted,
            send_buffer_requested = send.requested,
            send_buffer_granted = send.granted,
            "UDP listener bound."
        );
    } else {
        // Bursts beyond the granted buffer are dropped by the kernel, unseen by the gateway.
        tracing::warn!(
            %addr,
            protocol,
            recv_buffer_requested = recv.requested,
            recv_buffer_granted = recv.granted,
            send_buffer_requested = send.requested,
            send_buffer_granted = send.granted,
            capped_by,
            "UDP listener bound with smaller socket buffers than configured; raise \
             the sysctl named in capped_by to get them."
        );
    }
    Ok(socket)
}

/// The task owning the core and its sockets.
pub struct UdpDriver<C: DatagramCore> {
    core: C,
    sockets: Vec<Arc<UdpSocket>>,
    /// The way into the pipeline: appends to the spool, subscriptions (counted across
    /// ingresses by the router) and the upstreams' link state. The driver sees no upstream.
    ingress: IngressHandle,
    replies: mpsc::Receiver<Vec<AppendReply>>,
    /// This ingress's share of the downlink, from the router (registered with
    /// `IngressHandle::with_downlink`): the upstreams' messages for its filters and the other
    /// ingresses' local messages.
    downlink: mpsc::Receiver<Downlink>,
    /// Token -> a copy of a QoS 1/2 publish whose verdict is out, for the other ingresses
    /// once accepted (only while another ingress takes downlink); at most
    /// [`LOCAL_PENDING_MAX`].
    local_pending: HashMap<u64, Message>,
    rx: RecvBatch,
    tx: Vec<SendBatch>,
    /// Where persisted session changes go, with the broker acknowledgements that wait for
    /// them; `None` runs without persistence (every downlink acknowledged at once).
    store: Option<StoreLink>,
    /// Paused while the spool writer's queue is full (backpressure).
    gate: ReadGate,
    /// Publishes refused for a full spool queue and those emitted after them, in the core's
    /// order, waiting for room (see the module doc, backpressure); at most `held_max`.
    held: VecDeque<(Message, Option<u64>)>,
    /// The most `held` takes: [`HELD_ROUNDS`] receive batches per socket.
    held_max: usize,
    /// Counters for the status line.
    stats: Arc<UdpStats>,
    /// The admin listener's questions (report, clients), answered between two turns;
    /// `None`: nobody asks.
    queries: Option<mpsc::Receiver<IngressQuery>>,
    /// Beaten once per turn for the health check; `None`: nobody watches (and an idle
    /// driver sleeps until its next input or deadline).
    beat: Option<Arc<Beat>>,
    /// Datagrams read per socket per batch (sizes `held_max` when serial lines join).
    recv_batch: usize,
    /// The serial lines' write queues, by line index ([`Self::with_serial`]).
    serial_lines: Vec<LineHandle>,
    /// Frames from every serial line, tagged with the line; `None`: no serial line.
    serial_in: Option<mpsc::Receiver<(u16, Bytes)>>,
    /// The UDP forwarders allowed to relay, and where each was last heard from (empty: every
    /// source is a direct client).
    forwarders: Forwarders,
    /// New settings for the core (a reload), applied between two turns; `None`: the
    /// settings are fixed.
    reconfigure: Option<mpsc::Receiver<Reconfigure<C::Settings>>>,
    /// The longest datagram the receive slots are sized for (they hold one byte more).
    max_datagram: usize,
}

impl<C: DatagramCore> UdpDriver<C> {
    /// Assembles a driver: uplink messages and subscriptions go through `ingress`; the
    /// spool's verdicts on tokened messages come back on `replies` (the channel `ingress` was
    /// registered with), and the router's downlink for this ingress on `downlink` (the channel
    /// given to `IngressHandle::with_downlink`).
    pub fn new(
        core: C,
        sockets: Vec<UdpSocket>,
        ingress: IngressHandle,
        replies: mpsc::Receiver<Vec<AppendReply>>,
        downlink: mpsc::Receiver<Downlink>,
        recv_batch: usize,
        max_packet_size: usize,
    ) -> Self {
        let tx = sockets
            .iter()
            .map(|s| SendBatch::new(SEND_BATCH, s.local_addr().is_ok_and(|a| a.is_ipv6())))
            .collect();
        let sockets_len = sockets.len();
        UdpDriver {
            core,
            sockets: sockets.into_iter().map(Arc::new).collect(),
            ingress,
            replies,
            downlink,
            local_pending: HashMap::new(),
            // One byte more than the limit so oversize datagrams are seen as such.
            rx: RecvBatch::new(recv_batch, max_packet_size + 1),
            tx,
            store: None,
            gate: ReadGate::default(),
            held: VecDeque::new(),
            held_max: held_max(recv_batch, sockets_len),
            stats: Arc::default(),
            queries: None,
            beat: None,
            recv_batch,
            serial_lines: Vec::new(),
            serial_in: None,
            forwarders: Forwarders::default(),
            reconfigure: None,
            max_datagram: max_packet_size,
        }
    }

    /// Applies the [`Reconfigure`] requests from `requests` to the core between two turns of
    /// the loop (see the module doc); the notes go back on each request's `done`.
    #[must_use]
    pub fn with_reconfigure(mut self, requests: mpsc::Receiver<Reconfigure<C::Settings>>) -> Self {
        self.reconfigure = Some(requests);
        self
    }

    /// Serves serial lines too (see `serial::line`): a frame from line `i` goes to the core
    /// as from `Peer::serial(i)`, read like a socket (not while the read gate is closed:
    /// the lines' readers wait then), and a transmit for `PeerAddr::Serial { line }` goes to
    /// that line's bounded write queue (full: dropped, counted by the line). The serial
    /// frames count as one more socket for the held bound.
    #[must_use]
    pub fn with_serial(mut self, links: SerialLinks) -> Self {
        if links.lines.is_empty() {
            return self;
        }
        self.held_max = held_max(self.recv_batch, self.sockets.len() + 1);
        self.serial_lines = links.lines;
        self.serial_in = Some(links.inbound);
        self
    }

    /// Treats sources matching an entry of `list` as that entry's forwarder: their datagrams
    /// reach the core from [`PeerAddr::Forwarder`], and what the core sends there goes to the
    /// entry's latest source (see [`forwarders`]).
    #[must_use]
    pub fn with_forwarders(mut self, list: ForwarderList) -> Self {
        self.forwarders = Forwarders::new(list);
        self
    }

    /// Answers the admin listener's [`IngressQuery`]s from `queries` (the core's report and
    /// pages of its clients), between two turns of the loop. A query whose asker has gone
    /// is answered into the void.
    #[must_use]
    pub fn with_queries(mut self, queries: mpsc::Receiver<IngressQuery>) -> Self {
        self.queries = Some(queries);
        self
    }

    /// Beats `beat` once per turn of the loop, and turns at least every [`BEAT_IDLE`] even
    /// when idle, so a silent beat means a stuck loop.
    #[must_use]
    pub fn with_beat(mut self, beat: Arc<Beat>) -> Self {
        self.beat = Some(beat);
        self
    }

    /// Counts into `stats` (shared with the status line) instead of a counter of its own.
    #[must_use]
    pub fn with_stats(mut self, stats: Arc<UdpStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Persists sessions through `store`: downlink queued for a persistent session is
    /// acknowledged to the broker once the store has made it durable.
    #[must_use]
    pub fn with_session_store(mut self, store: StoreLink) -> Self {
        self.store = Some(store);
        self
    }

    /// Runs until `shutdown` is cancelled.
    ///
    /// # Errors
    /// A socket error other than the transient ones (the gateway cannot serve without its
    /// sockets).
    #[allow(clippy::disallowed_methods)] // The adapter is where the clock is read.
    pub async fn run(mut self, shutdown: CancellationToken) -> io::Result<()> {
        let mut tx_buf = Vec::with_capacity(256);
        // Restored sessions' subscriptions go upstream now, not at the first wake-up.
        self.flush(&mut tx_buf).await?;
        let mut timer = std::pin::pin!(tokio::time::sleep_until(Instant::now().into()));
        let mut timer_at = None;
        // Independent of the core's timer (reset only when its deadline moves): an idle
        // loop turns once per period to beat; a busy one barely notices the extra turn.
        let mut idle = tokio::time::interval(BEAT_IDLE);
        idle.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let beating = self.beat.is_some();
        loop {
            let deadline = self.core.poll_timeout();
            // One timer, moved only when the deadline changes: a fresh registration each
            // round would wake the runtime's driver every time.
            if let Some(d) = deadline
                && timer_at != Some(d)
            {
                timer.as_mut().reset(d.into());
                timer_at = Some(d);
            }
            let sleep = async {
                match deadline {
                    Some(_) => timer.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            // Only when the store's channel was full: resolves once it has room again.
            let store_room = self.store.as_ref().and_then(StoreLink::room);
            let store_room = async {
                match store_room {
                    Some(room) => room.await.ok(),
                    None => std::future::pending().await,
                }
            };
            // Backpressure: while the writer's queue is full the sockets are not read; this
            // resolves once it has taken from the queue (woken by the writer).
            let reading = self.gate.reading();
            let room = async {
                match self.gate.waiting_for() {
                    Some(mark) => self.ingress.room_since(mark).await,
                    None => std::future::pending().await,
                }
            };
            let reconfiguring = self.reconfigure.is_some();
            let reconfigure = async {
                match self.reconfigure.as_mut() {
                    Some(requests) => requests.recv().await,
                    None => std::future::pending().await,
                }
            };
            let asking = self.queries.is_some();
            let query = async {
                match self.queries.as_mut() {
                    Some(queries) => queries.recv().await,
                    None => std::future::pending().await,
                }
            };
            let serial = async {
                match self.serial_in.as_mut() {
                    Some(frames) => frames.recv().await,
                    None => std::future::pending().await,
                }
            };
            let readable = std::future::poll_fn(|cx| {
                for (i, s) in self.sockets.iter().enumerate() {
                    if let Poll::Ready(r) = s.poll_recv_ready(cx) {
                        return Poll::Ready((i, r));
                    }
                }
                Poll::Pending
            });
            tokio::select! {
                () = shutdown.cancelled() => {
                    self.release_held();
                    if let Some(store) = self.store.as_mut() {
                        store.finish(&mut self.core).await;
                    }
                    return Ok(());
                }
                (index, ready) = readable, if reading => {
                    ready?;
                    self.receive_batch(index)?;
                }
                Some((line, frame)) = serial, if reading => {
                    self.core
                        .handle_datagram(Instant::now(), Peer::serial(line), &frame);
                    // One batch with the frame that woke the driver, as for a socket.
                    self.receive_serial(self.recv_batch.saturating_sub(1));
                }
                () = room, if !reading => {
                    // The held publishes go first; reading resumes only once all are taken.
                    self.gate.room();
                    self.append_held(Instant::now());
                    if self.gate.reading() {
                        tracing::trace!("Spool queue has room again; reading the sockets.");
                    }
                }
                Some(replies) = self.replies.recv() => {
                    let now = Instant::now();
                    self.on_replies(now, &replies);
                }
                Some(message) = self.downlink.recv() => {
                    let now = Instant::now();
                    self.on_downlink(now, message);
                    for _ in 0..DOWNLINK_BATCH {
                        let Ok(message) = self.downlink.try_recv() else { break };
                        self.on_downlink(now, message);
                    }
                }
                Some(permit) = store_room => {
                    if let Some(store) = self.store.as_mut() {
                        store.send_with(permit);
                    }
                }
                Some(query) = query, if asking => self.answer_query(query),
                Some(request) = reconfigure, if reconfiguring => {
                    self.apply_reconfigure(Instant::now(), request);
                }
                _ = idle.tick(), if beating => {}
                () = sleep => {}
            }
            // Whatever else is ready is taken in the same round, so one flush (one
            // `sendmmsg`, one hand-over to the upstreams) serves all of it.
            self.drain_ready()?;
            self.core
                .set_upstream_available(self.ingress.upstream_available());
            let now = Instant::now();
            self.core.handle_timeout(now);
            if let Some(beat) = &self.beat {
                beat.beat(now);
            }
            self.flush(&mut tx_buf).await?;
            if let Some(store) = self.store.as_mut() {
                store.end_round(&mut self.core);
            }
        }
    }

    /// Puts new settings in force in the core (sessions untouched) and resizes the receive
    /// slots when the longest datagram changed; the notes go back to the asker (gone: into
    /// the void). The turn's flush sends what the change caused.
    fn apply_reconfigure(&mut self, now: Instant, request: Reconfigure<C::Settings>) {
        let Reconfigure { settings, done } = request;
        let notes = self.core.reconfigure(now, settings);
        let max_datagram = self.core.max_datagram_size();
        if max_datagram != self.max_datagram {
            // One byte more than the limit so oversize datagrams are seen as such.
            self.rx = RecvBatch::new(self.recv_batch, max_datagram.saturating_add(1));
            self.max_datagram = max_datagram;
        }
        tracing::info!(
            protocol = C::NAME,
            notes = notes.len(),
            "Ingress settings reconfigured; sessions kept."
        );
        let _ = done.send(notes);
    }

    /// Answers one of the admin listener's questions from the core's state now.
    #[allow(clippy::disallowed_methods)] // Dates the clients' last packets.
    fn answer_query(&self, query: IngressQuery) {
        // The asker may have given up (its request timed out): nothing to do then.
        match query {
            IngressQuery::Report(reply) => {
                let _ = reply.send(self.core.report());
            }
            IngressQuery::Clients(query, reply) => {
                let _ = reply.send(self.core.clients(Instant::now(), &query));
            }
        }
    }

    /// Takes, without waiting, the upstream reports and the datagrams already queued, within
    /// a bound per round ([`DRAIN_ROUNDS`] receive batches per socket).
    #[allow(clippy::disallowed_methods)]
    fn drain_ready(&mut self) -> io::Result<()> {
        let now = Instant::now();
        while let Ok(replies) = self.replies.try_recv() {
            self.on_replies(now, &replies);
        }
        // Paused (backpressure): the datagrams wait in the kernel's buffers.
        let sockets = if self.gate.reading() {
            self.sockets.len()
        } else {
            0
        };
        for index in 0..sockets {
            for _ in 0..DRAIN_ROUNDS {
                if self.receive_batch(index)? == 0 {
                    break;
                }
            }
        }
        if self.gate.reading() {
            for _ in 0..DRAIN_ROUNDS {
                if self.receive_serial(self.recv_batch) == 0 {
                    break;
                }
            }
        }
        while let Ok(replies) = self.replies.try_recv() {
            self.on_replies(now, &replies);
        }
        Ok(())
    }

    /// Reads one batch from socket `index` into the core; returns how many datagrams it had
    /// (0 when none was waiting).
    #[allow(clippy::disallowed_methods)]
    fn receive_batch(&mut self, index: usize) -> io::Result<usize> {
        let Some(socket) = self.sockets.get(index) else {
            return Ok(0);
        };
        let received = match self.rx.recv(socket) {
            Ok(n) => n,
            Err(e) if is_peer_error(&e) => {
                // ICMP errors from earlier sends surface here; they are about one peer.
                tracing::debug!(error = %e, "Transient UDP receive error.");
                return Ok(1);
            }
            Err(e) => return Err(e),
        };
        if received == 0 {
            return Ok(0);
        }
        let now = Instant::now();
        let listener = index as u16;
        for (from, datagram) in self.rx.datagrams() {
            let peer = match self.forwarders.heard(listener, from) {
                Some(entry) => Peer::forwarder(entry),
                None => Peer::udp(listener, from),
            };
            self.core.handle_datagram(now, peer, datagram);
        }
        Ok(received)
    }

    /// Hands up to `max` frames already waiting from the serial lines to the core; returns
    /// how many.
    #[allow(clippy::disallowed_methods)]
    fn receive_serial(&mut self, max: usize) -> usize {
        let Some(frames) = self.serial_in.as_mut() else {
            return 0;
        };
        let now = Instant::now();
        let mut taken = 0;
        while taken < max {
            let Ok((line, frame)) = frames.try_recv() else {
                break;
            };
            self.core.handle_datagram(now, Peer::serial(line), &frame);
            taken += 1;
        }
        taken
    }

    /// Hands a message from an upstream subscription to the core, then acknowledges it to the
    /// broker: at once when the core has queued it for the matching clients, or, when it is
    /// part of a persistent session, once the store has made this round's changes durable.
    fn on_downlink(&mut self, now: Instant, message: Downlink) {
        let Downlink {
            topic,
            payload,
            qos,
            retain,
            filters,
            ack,
            ..
        } = message;
        let outcome =
            self.core
                .handle_downlink(now, &topic, payload, qos, retain, filters.as_deref());
        match self.store.as_mut() {
            Some(store) if outcome.needs_durability() => store.hold_ack(ack),
            _ => ack.ack(),
        }
    }

    /// The spool's verdicts: accepted once durable, else congestion (the sensor retries).
    fn on_replies(&mut self, now: Instant, replies: &[AppendReply]) {
        for reply in replies {
            self.deliver_accepted(reply);
            let outcome = if reply.accepted {
                PublishOutcome::Accepted
            } else {
                PublishOutcome::Congestion
            };
            self.core.handle_publish_result(now, reply.token, outcome);
        }
    }

    /// Keeps a copy of a sensor's publish for the other ingresses (their subscribers), which
    /// get it when it is accepted: at once without a token (QoS 0 and Wills, which the core
    /// delivers to its own sessions at once too), with a token once the spool's verdict says
    /// accepted. Nothing is kept while no other ingress takes downlink.
    fn keep_local(&mut self, message: &Message, token: Option<u64>) {
        if !self.ingress.has_peers() {
            return;
        }
        match token {
            None => self.ingress.deliver_local(message),
            Some(token) if self.local_pending.len() < LOCAL_PENDING_MAX => {
                self.local_pending.insert(token, message.clone());
            }
            Some(_) => tracing::debug!(
                topic = %message.topic,
                "Too many publishes awaiting their verdict; this one is not delivered to the other ingresses."
            ),
        }
    }

    /// A verdict on a kept copy: accepted goes to the other ingresses, refused is forgotten.
    fn deliver_accepted(&mut self, reply: &AppendReply) {
        if self.local_pending.is_empty() {
            return;
        }
        if let Some(message) = self.local_pending.remove(&reply.token)
            && reply.accepted
        {
            self.ingress.deliver_local(&message);
        }
    }

    /// Hands a publish from the core to the spool, or holds it (see the module doc,
    /// backpressure): behind those already held, so the log keeps the core's order, or when
    /// the writer's queue is full, pausing the reads. A topic no route takes is refused for
    /// good: rc 0x03 (QoS 0/-1: dropped), counted by the router (`unrouted`).
    fn append_or_hold(&mut self, now: Instant, message: Message, token: Option<u64>) {
        if !self.held.is_empty() {
            self.hold(now, message, token);
            return;
        }
        // Taken before the append, so a take by the writer in between is seen.
        let mark = self.ingress.room_mark();
        match self.ingress.append(message, token) {
            Ok(()) => {}
            Err(AppendRefused::QueueFull(message)) => {
                tracing::debug!(
                    "Spool queue full; holding publishes, reads paused until it has room."
                );
                self.gate.refused(mark);
                self.hold(now, message, token);
            }
            Err(AppendRefused::NoRoute(_)) => self.answer(now, token, PublishOutcome::NoRoute),
        }
    }

    /// Holds a publish refused for a full queue (or behind one); beyond `held_max`
    /// (only publishes emitted while paused without reading, e.g. Wills, can get there) it
    /// gets the answer of a full queue without holding: congestion, or dropped and counted.
    fn hold(&mut self, now: Instant, message: Message, token: Option<u64>) {
        if self.held.len() < self.held_max {
            self.held.push_back((message, token));
            return;
        }
        match token {
            Some(_) => self.answer(now, token, PublishOutcome::Congestion),
            None => {
                self.stats.queue_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    topic = %message.topic,
                    "Spool queue full and too many publishes held; a publish without a token was dropped."
                );
            }
        }
    }

    /// The writer took from its queue: appends the held publishes in order until the queue
    /// refuses again (the rest stay held and the reads paused, with a fresh mark).
    fn append_held(&mut self, now: Instant) {
        while let Some((message, token)) = self.held.pop_front() {
            let mark = self.ingress.room_mark();
            match self.ingress.append(message, token) {
                Ok(()) => {}
                Err(AppendRefused::QueueFull(message)) => {
                    self.held.push_front((message, token));
                    self.gate.refused(mark);
                    return;
                }
                Err(AppendRefused::NoRoute(_)) => {
                    self.answer(now, token, PublishOutcome::NoRoute);
                }
            }
        }
    }

    /// Shutdown: the held publishes are tried once more, without waiting; the rest are not
    /// acknowledged (QoS 1/2: the sender resends to the next run) or, without a token, lost
    /// and counted. Stops at the first refusal so a later publish never overtakes it.
    fn release_held(&mut self) {
        while let Some((message, token)) = self.held.pop_front() {
            match self.ingress.append(message, token) {
                // A verdict may still come; nobody reads it any more (like any in flight).
                // A topic no route takes: refused for good, counted by the router.
                Ok(()) | Err(AppendRefused::NoRoute(_)) => {}
                Err(AppendRefused::QueueFull(message)) => {
                    self.held.push_front((message, token));
                    break;
                }
            }
        }
        if self.held.is_empty() {
            return;
        }
        let mut dropped = 0;
        for (_, token) in self.held.drain(..) {
            match token {
                Some(token) => drop(self.local_pending.remove(&token)),
                None => dropped += 1,
            }
        }
        self.stats
            .queue_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        tracing::debug!(
            dropped,
            "Stopping with the spool queue full; held publishes not taken (QoS 1/2 unacknowledged)."
        );
    }

    /// Answers a tokened publish at once (its kept copy for the other ingresses forgotten);
    /// without a token there is nobody to answer.
    fn answer(&mut self, now: Instant, token: Option<u64>, outcome: PublishOutcome) {
        if let Some(token) = token {
            self.local_pending.remove(&token);
            self.core.handle_publish_result(now, token, outcome);
        }
    }

    #[allow(clippy::disallowed_methods)]
    async fn flush(&mut self, tx_buf: &mut Vec<u8>) -> io::Result<()> {
        let now = Instant::now();
        while let Some(event) = self.core.poll_event() {
            match event {
                Event::Publish { message, token } => {
                    self.keep_local(&message, token);
                    self.append_or_hold(now, message, token);
                }
                // The core keeps its distinct filters within `max_filters`, the router's
                // limit too, so a refusal comes from another ingress's filters filling the
                // router, or from an upstream (a filter it cannot take): the router logs both
                // (rate-limited), since the sensor was told it is subscribed.
                Event::Subscribe { filter, qos } => {
                    let accepted = self.ingress.subscribe(now, &filter, qos).is_ok();
                    self.core.handle_subscribe_result(now, &filter, accepted);
                }
                Event::Unsubscribe { filter } => self.ingress.unsubscribe(now, &filter),
            }
        }
        while let Some(peer) = self.core.poll_transmit(tx_buf) {
            // This core's peers all come from this driver's sockets and serial lines (and the
            // configured ADVERTISE destinations, UDP too).
            let (listener, addr) = match peer.addr {
                PeerAddr::Udp { listener, addr } => (listener, addr),
                PeerAddr::Forwarder { entry } => match self.forwarders.route(entry) {
                    Some(route) => route,
                    // Only a datagram from the entry makes its peer: this is unreachable
                    // in practice, and harmless.
                    None => {
                        tracing::debug!(%peer, "Datagram for a forwarder not heard from yet dropped.");
                        continue;
                    }
                },
                // To the line's bounded write queue (full or line down: dropped, counted).
                PeerAddr::Serial { line } => {
                    match self.serial_lines.get(usize::from(line)) {
                        Some(link) => link.send(Bytes::copy_from_slice(tx_buf)),
                        // Lines are wired with the driver: a wiring bug, nothing a peer causes.
                        None => tracing::debug!(%peer, "Frame for an unknown serial line dropped."),
                    }
                    continue;
                }
            };
            let index = usize::from(listener);
            let (Some(batch), Some(socket)) = (self.tx.get_mut(index), self.sockets.get(index))
            else {
                continue;
            };
            if batch.is_full() {
                batch.flush(socket).await?;
            }
            batch.push(addr, tx_buf);
        }
        for (batch, socket) in self.tx.iter_mut().zip(&self.sockets) {
            if !batch.is_empty() {
                batch.flush(socket).await?;
            }
        }
        Ok(())
    }
}

/// The most publishes held at once: [`HELD_ROUNDS`] receive batches of `recv_batch` per
/// socket (see the module doc, backpressure).
fn held_max(recv_batch: usize, sockets: usize) -> usize {
    HELD_ROUNDS
        .saturating_mul(recv_batch)
        .saturating_mul(sockets)
}

/// Errors a UDP socket reports about one peer (ICMP unreachable and the like), not about itself.
pub(crate) fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(nix::errno::Errno::EMSGSIZE as i32)
}

#[cfg(test)]
mod driver_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel limit from `/proc/sys/net/core/`.
    fn sysctl(name: &str) -> usize {
        let path = format!("/proc/sys/net/core/{name}");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn reading_pauses_on_a_full_queue_until_the_writer_passed_the_latest_mark() {
        let mut gate = ReadGate::default();
        assert!(gate.reading());
        assert_eq!(gate.waiting_for(), None);
        gate.refused(7);
        assert!(!gate.reading());
        assert_eq!(gate.waiting_for(), Some(7));
        // A later refusal in the same round, after the writer took once more: its mark.
        gate.refused(8);
        assert_eq!(gate.waiting_for(), Some(8));
        gate.room();
        assert!(gate.reading());
        assert_eq!(gate.waiting_for(), None);
    }

    #[test]
    fn a_reported_size_is_halved_to_what_was_granted() {
        // rmem_max = 4 MiB capped a request of 8 MiB; getsockopt says 8 MiB.
        let capped = BufferSize::from_report(8 << 20, 8 << 20);
        assert_eq!(capped.granted, 4 << 20);
        assert!(capped.capped());
        let full = BufferSize::from_report(64 << 10, 128 << 10);
        assert_eq!(full.granted, 64 << 10);
        assert!(!full.capped());
        assert_eq!(capping_sysctls(capped, full), "net.core.rmem_max");
        assert_eq!(capping_sysctls(full, capped), "net.core.wmem_max");
        assert_eq!(capping_sysctls(full, full), "");
    }

    #[tokio::test]
    async fn buffers_are_reported_as_granted_and_capped_at_the_kernel_limits() {
        let (rmem_max, wmem_max) = (sysctl("rmem_max"), sysctl("wmem_max"));
        let above = SocketOptions {
            recv_buffer: rmem_max + (1 << 20),
            send_buffer: wmem_max + (1 << 20),
        };
        let socket = bind("127.0.0.1:0".parse().unwrap(), above, "test").unwrap();
        let (recv, send) = buffer_sizes(&socket, above).unwrap();
        assert_eq!((recv.granted, recv.capped()), (rmem_max, true));
        assert_eq!((send.granted, send.capped()), (wmem_max, true));

        // Below the limits (and above the kernel's minimum) a request is granted exactly.
        let below = SocketOptions {
            recv_buffer: (rmem_max / 2).max(16 << 10),
            send_buffer: (wmem_max / 2).max(16 << 10),
        };
        let socket = bind("[::1]:0".parse().unwrap(), below, "test").unwrap();
        let (recv, send) = buffer_sizes(&socket, below).unwrap();
        assert_eq!((recv.granted, recv.capped()), (below.recv_buffer, false));
        assert_eq!((send.granted, send.capped()), (below.send_buffer, false));
    }
}
