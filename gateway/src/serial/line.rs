//! The serial-line adapter: one task per `[[serial]]` line (tokio-serial), between the device
//! and the MQTT-SN driver (`io::udp::UdpDriver::with_serial`).
//!
//! - Open: the device with the configured settings. Absent at start, vanished (USB unplugged,
//!   the pty's other end gone) or failing: retried after [`Backoff`] (`reopen_min`, doubling up
//!   to `reopen_max`, back to `reopen_min` once open). Logged once per state change: warn when
//!   the line goes down (or cannot be opened at first), info when it comes up; the attempts in
//!   between at debug. The rest of the gateway runs on; the core sees only silence, so the
//!   line's sessions are lost by keep-alive (Will published) and resume when it returns.
//! - Read: bytes -> [`Decoder`] -> each frame to the driver on the one bounded channel all
//!   lines share, tagged with the line's index. `frame_timeout` of silence after bytes ->
//!   [`Decoder::idle`] (a partial frame is dropped, counted). On a line without
//!   `forwarder = true` a forwarder-encapsulated frame (MsgType 0xFE) is dropped here,
//!   counted (`encapsulated_dropped`). A full channel (the driver paused reading for a full
//!   spool queue) blocks the reader: the device's bytes wait in the kernel (and, with flow
//!   control, on the far end).
//! - Write: the driver queues frames with [`LineHandle::send`] (bounded by `write_queue`;
//!   full or the line down: dropped, counted). Each is encoded and written no sooner than the
//!   line can carry the previous ones ([`Pacer`]: 1 start bit + data + parity + stop bits per
//!   byte at `baud`), less [`PACE_SLACK`] (20 ms of line time), so no more than that plus one
//!   frame waits in the kernel in front of a slow port. Frames queued while the line is down are dropped (counted).
//!
//! Invariants: the clock is read only here (an adapter); [`Pacer`] and [`Backoff`] are plain
//! arithmetic, unit-tested. Memory per line is bounded: the decoder's `max_frame`, one read
//! buffer ([`READ_BUFFER`]), `write_queue` frames.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

use sensorgate_bridges::spool::wall_ms;

use super::framing::{self, Crc, Decoder, DecoderStats, Framing};
use crate::config::{FlowControl, Parity, SerialLine};
use crate::mqttsn::codec::msg_type::ENCAPSULATED;
use crate::observe::events::{Events, Level};

/// Frames (from every line) waiting for the driver at most; beyond it the lines' readers wait.
pub const INBOUND_CHANNEL: usize = 256;

/// Bytes taken from the device per read.
pub const READ_BUFFER: usize = 4096;

/// A line's counters, written by its task, read by the admin.
#[derive(Debug, Default)]
pub struct LineStats {
    up: AtomicBool,
    /// Wall clock ms of the last state change (0: none yet).
    since_ms: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    write_dropped: AtomicU64,
    encapsulated_dropped: AtomicU64,
    reopens: AtomicU64,
    bad_crc: AtomicU64,
    oversize: AtomicU64,
    truncated: AtomicU64,
    garbage_bytes: AtomicU64,
}

/// A line's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineCounters {
    /// Whether the device is open.
    pub up: bool,
    /// Wall clock ms of the last state change (0: none yet).
    pub since_ms: u64,
    /// Good frames read.
    pub frames_in: u64,
    /// Frames written.
    pub frames_out: u64,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Frames for the line dropped: its write queue full, or the line down.
    pub write_dropped: u64,
    /// Encapsulated frames dropped on a line that is not a forwarder's.
    pub encapsulated_dropped: u64,
    /// Opens after the first.
    pub reopens: u64,
    /// Frames with a wrong CRC.
    pub bad_crc: u64,
    /// Frames longer than the maximum, skipped.
    pub oversize: u64,
    /// Partial frames dropped at a silence or when the line went down.
    pub truncated: u64,
    /// Bytes skipped while resynchronising.
    pub garbage_bytes: u64,
}

impl LineCounters {
    /// The frame events as (label, count), the same labels every time (metrics' `event`).
    pub fn counters_by_event(&self) -> [(&'static str, u64); 8] {
        [
            ("in", self.frames_in),
            ("out", self.frames_out),
            ("write_dropped", self.write_dropped),
            ("encapsulated_dropped", self.encapsulated_dropped),
            ("bad_crc", self.bad_crc),
            ("oversize", self.oversize),
            ("truncated", self.truncated),
            ("garbage", self.garbage_bytes),
        ]
    }
}

impl LineStats {
    /// The counters now.
    pub fn read(&self) -> LineCounters {
        LineCounters {
            up: self.up.load(Relaxed),
            since_ms: self.since_ms.load(Relaxed),
            frames_in: self.frames_in.load(Relaxed),
            frames_out: self.frames_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            write_dropped: self.write_dropped.load(Relaxed),
            encapsulated_dropped: self.encapsulated_dropped.load(Relaxed),
            reopens: self.reopens.load(Relaxed),
            bad_crc: self.bad_crc.load(Relaxed),
            oversize: self.oversize.load(Relaxed),
            truncated: self.truncated.load(Relaxed),
            garbage_bytes: self.garbage_bytes.load(Relaxed),
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
        self.since_ms.store(wall_ms(), Relaxed);
    }

    fn decoder(&self, d: &DecoderStats) {
        self.bad_crc.store(d.bad_crc, Relaxed);
        self.oversize.store(d.oversize, Relaxed);
        self.truncated.store(d.truncated, Relaxed);
        self.garbage_bytes.store(d.garbage_bytes, Relaxed);
    }
}

/// The driver's end of one line: its write queue and its counters.
#[derive(Debug, Clone)]
pub struct LineHandle {
    writes: mpsc::Sender<Bytes>,
    stats: Arc<LineStats>,
    delay: Duration,
}

impl LineHandle {
    /// Queues a frame (an MQTT-SN message) for the line without waiting; a full queue or a
    /// stopped line drops it (counted).
    pub fn send(&self, frame: Bytes) {
        if self.writes.try_send(frame).is_err() {
            self.stats.write_dropped.fetch_add(1, Relaxed);
        }
    }

    /// How long a full write queue takes to reach the far end ([`queue_delay`]): what a
    /// retransmission timer toward this line adds to the retry interval.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The line's counters.
    pub fn stats(&self) -> &Arc<LineStats> {
        &self.stats
    }
}

#[cfg(test)]
impl LineHandle {
    /// A handle with no device and no task: the test reads the write queue.
    pub(crate) fn detached(write_queue: usize) -> (LineHandle, mpsc::Receiver<Bytes>) {
        let (writes, queue) = mpsc::channel(write_queue);
        let handle = LineHandle {
            writes,
            stats: Arc::default(),
            delay: Duration::ZERO,
        };
        (handle, queue)
    }
}

/// What the driver gets for the serial lines: one handle per line (index = line) and the
/// frames they read, tagged with the line's index.
#[derive(Debug)]
pub struct SerialLinks {
    /// Per line, in `[[serial]]` order.
    pub lines: Vec<LineHandle>,
    /// Frames from every line.
    pub inbound: mpsc::Receiver<(u16, Bytes)>,
}

/// The lines' tasks, for the wiring to join at shutdown.
#[derive(Debug)]
pub struct SerialTasks(Vec<JoinHandle<()>>);

impl SerialTasks {
    /// Waits for every line's task (they end when the stop token given to [`start`] is
    /// cancelled).
    pub async fn join(self) {
        for task in self.0 {
            let _ = task.await;
        }
    }
}

/// Starts one task per line on the current runtime, until `stop` is cancelled. With
/// `events`, each state change is also recorded there (`serial_down` warning, `serial_up`
/// info), for `/status` and the console.
pub fn start(
    lines: &[SerialLine],
    stop: &CancellationToken,
    events: Option<Arc<Events>>,
) -> (SerialLinks, SerialTasks) {
    let (inbound_tx, inbound) = mpsc::channel(INBOUND_CHANNEL);
    let mut handles = Vec::with_capacity(lines.len());
    let mut tasks = Vec::with_capacity(lines.len());
    for (index, config) in lines.iter().enumerate() {
        // The config allows at most `MAX_SERIAL_LINES` (256) lines.
        let Ok(index) = u16::try_from(index) else {
            break;
        };
        let (writes, queue) = mpsc::channel(config.write_queue);
        let stats = Arc::new(LineStats::default());
        handles.push(LineHandle {
            writes,
            stats: Arc::clone(&stats),
            delay: queue_delay(config),
        });
        let line = Line {
            index,
            config: config.clone(),
            inbound: inbound_tx.clone(),
            queue,
            stats,
            stop: stop.clone(),
            events: events.clone(),
        };
        tasks.push(tokio::spawn(line.run()));
    }
    (
        SerialLinks {
            lines: handles,
            inbound,
        },
        SerialTasks(tasks),
    )
}

/// The most bytes one message of `max_frame` bytes takes on the line in `framing`: as is
/// (length), or every byte escaped plus a CRC trailer and two END bytes (SLIP).
pub fn max_encoded_len(framing: Framing, max_frame: usize) -> usize {
    match framing {
        Framing::Length => max_frame,
        Framing::Slip { crc } => {
            let trailer = match crc {
                Crc::None => 0,
                Crc::Crc16 => 2,
                Crc::Crc32 => 4,
            };
            (max_frame + trailer).saturating_mul(2).saturating_add(2)
        }
    }
}

/// The time a full write queue of the largest frames takes at the line's rate: how much
/// later than over UDP an answer to the last of them can come back.
pub fn queue_delay(line: &SerialLine) -> Duration {
    let bytes = max_encoded_len(line.framing, line.max_frame).saturating_mul(line.write_queue);
    Pacer::new(line.baud, line.bits_per_char(), PACE_SLACK).duration_of(bytes)
}

/// Line time a write may run ahead of the wire: the most that waits in the kernel's buffer in
/// front of the line (plus the frame being written). Without it every frame would wait for
/// the previous one to leave, and tokio's timer (1 ms resolution) would cap a line at about a
/// thousand frames/s whatever its rate; 20 ms is 230 bytes at 115200 baud, 19 at 9600.
pub const PACE_SLACK: Duration = Duration::from_millis(20);

/// Pacing at a line's rate: a write of `n` bytes occupies the line for
/// `n * bits_per_char / baud` after the previous write ends (or from when it is made, if the
/// line is idle by then). A write may start once what is already written ends within `slack`
/// (the line's backlog is at most `slack`). Idle time earns no credit.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Nanoseconds per byte times baud: `bits_per_char * 1e9`, divided by baud per use.
    bit_ns: u128,
    baud: u128,
    slack: Duration,
    /// When everything written so far has left (by the line's rate).
    next_free: Option<Instant>,
}

impl Pacer {
    /// A pacer for `baud` bits/s and `bits_per_char` bits on the wire per byte, letting writes
    /// run `slack` ahead of the wire.
    pub fn new(baud: u32, bits_per_char: u32, slack: Duration) -> Self {
        Pacer {
            bit_ns: u128::from(bits_per_char) * 1_000_000_000,
            baud: u128::from(baud.max(1)),
            slack,
            next_free: None,
        }
    }

    /// How long `bytes` take on the line (rounded up to the nanosecond).
    pub fn duration_of(&self, bytes: usize) -> Duration {
        let ns = (bytes as u128 * self.bit_ns).div_ceil(self.baud);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// When a write may start, given it is `now`: once the backlog is at most `slack`.
    pub fn ready_at(&self, now: Instant) -> Instant {
        self.next_free
            .and_then(|free| free.checked_sub(self.slack))
            .map_or(now, |start| start.max(now))
    }

    /// A write of `bytes` was made at `now` (no sooner than [`Self::ready_at`]).
    pub fn sent(&mut self, now: Instant, bytes: usize) {
        let from = self.next_free.map_or(now, |free| free.max(now));
        self.next_free = Some(from + self.duration_of(bytes));
    }
}

/// The wait before the next open attempt: `min`, doubling per failure up to `max`; back to
/// `min` after a successful open.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff from `min` to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// An attempt failed: the wait before the next one.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    /// The line opened.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Whether `frame` (an MQTT-SN message) is a forwarder encapsulation (MsgType 0xFE after a
/// 1- or 3-byte Length).
pub fn is_encapsulated(frame: &[u8]) -> bool {
    match frame {
        [0x01, _, _, t, ..] => *t == ENCAPSULATED,
        [_, t, ..] => *t == ENCAPSULATED,
        _ => false,
    }
}

/// How a served line ended.
enum Ended {
    /// The stop token.
    Stopped,
    /// The device failed (or reached its end: the other side of a pty closed).
    Failed(io::Error),
}

/// One line's task state.
struct Line {
    index: u16,
    config: SerialLine,
    inbound: mpsc::Sender<(u16, Bytes)>,
    queue: mpsc::Receiver<Bytes>,
    stats: Arc<LineStats>,
    stop: CancellationToken,
    events: Option<Arc<Events>>,
}

impl Line {
    /// Records a state change in the events ring, if there is one.
    fn event(&self, kind: &'static str, level: Level, message: String) {
        if let Some(events) = &self.events {
            events.push(wall_ms(), kind, level, message);
        }
    }

    async fn run(mut self) {
        let mut decoder = Decoder::new(self.config.framing, self.config.max_frame);
        let mut backoff = Backoff::new(self.config.reopen_min, self.config.reopen_max);
        let mut opened = false;
        // Whether "down" was logged since the line was last up.
        let mut down_logged = false;
        let device = self.config.device.clone();
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            match self.open() {
                Ok(port) => {
                    backoff.reset();
                    if opened {
                        self.stats.reopens.fetch_add(1, Relaxed);
                    }
                    opened = true;
                    self.stats.set_up(true);
                    tracing::info!(line = self.index, %device, "Serial line up.");
                    self.event(
                        "serial_up",
                        Level::Info,
                        format!("Serial line {} ({device}) is up.", self.index),
                    );
                    let ended = self.serve(port, &mut decoder).await;
                    // A frame cut by the failure is not completed by the next open.
                    decoder.idle();
                    self.stats.decoder(decoder.stats());
                    self.stats.set_up(false);
                    match ended {
                        Ended::Stopped => return,
                        Ended::Failed(error) => {
                            down_logged = true;
                            tracing::warn!(
                                line = self.index,
                                %device,
                                %error,
                                "Serial line down; reopening with backoff."
                            );
                            self.event(
                                "serial_down",
                                Level::Warning,
                                format!(
                                    "Serial line {} ({device}) is down: {error}; reopening.",
                                    self.index
                                ),
                            );
                        }
                    }
                }
                Err(error) if !down_logged => {
                    down_logged = true;
                    self.stats.set_up(false);
                    tracing::warn!(
                        line = self.index,
                        %device,
                        %error,
                        "Serial line cannot be opened; retrying with backoff."
                    );
                    self.event(
                        "serial_down",
                        Level::Warning,
                        format!(
                            "Serial line {} ({device}) cannot be opened: {error}; retrying.",
                            self.index
                        ),
                    );
                }
                Err(error) => {
                    tracing::debug!(line = self.index, %device, %error, "Serial line still down.");
                }
            }
            let wait = tokio::time::sleep(backoff.failed());
            let mut wait = std::pin::pin!(wait);
            loop {
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = &mut wait => break,
                    // Frames for a line that is down are dropped, not written when it
                    // returns (their answers would be stale).
                    Some(_) = self.queue.recv() => {
                        self.stats.write_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
        }
    }

    fn open(&self) -> tokio_serial::Result<tokio_serial::SerialStream> {
        let c = &self.config;
        let data_bits = match c.data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        };
        let parity = match c.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        };
        let stop_bits = match c.stop_bits {
            2 => tokio_serial::StopBits::Two,
            _ => tokio_serial::StopBits::One,
        };
        let flow = match c.flow_control {
            FlowControl::None => tokio_serial::FlowControl::None,
            FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
            FlowControl::Software => tokio_serial::FlowControl::Software,
        };
        tokio_serial::new(&c.device, c.baud)
            .data_bits(data_bits)
            .parity(parity)
            .stop_bits(stop_bits)
            .flow_control(flow)
            .open_native_async()
    }

    /// Reads and writes the open device until it fails or `stop`.
    async fn serve(&mut self, port: tokio_serial::SerialStream, decoder: &mut Decoder) -> Ended {
        let (reader, writer) = tokio::io::split(port);
        let stop = self.stop.clone();
        let read = read_loop(
            reader,
            decoder,
            self.index,
            &self.config,
            &self.inbound,
            &self.stats,
        );
        let write = write_loop(writer, &mut self.queue, &self.config, &self.stats);
        // Stop first: at shutdown the driver's channel closes too, which is no failure.
        tokio::select! {
            biased;
            () = stop.cancelled() => Ended::Stopped,
            error = read => Ended::Failed(error),
            error = write => Ended::Failed(error),
        }
    }
}

/// Reads frames into the driver's channel until the device fails.
#[allow(clippy::disallowed_methods)] // The adapter reads the clock (frame timeout).
async fn read_loop(
    mut reader: tokio::io::ReadHalf<tokio_serial::SerialStream>,
    decoder: &mut Decoder,
    index: u16,
    config: &SerialLine,
    inbound: &mpsc::Sender<(u16, Bytes)>,
    stats: &LineStats,
) -> io::Error {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut frames: Vec<Bytes> = Vec::new();
    // Bytes since the last frame or silence: the frame timeout is armed.
    let mut partial = false;
    loop {
        let read = if partial {
            match tokio::time::timeout(config.frame_timeout, reader.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => {
                    decoder.idle();
                    stats.decoder(decoder.stats());
                    partial = false;
                    continue;
                }
            }
        } else {
            reader.read(&mut buf).await
        };
        let n = match read {
            Ok(0) => return io::Error::new(io::ErrorKind::UnexpectedEof, "device closed"),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return e,
        };
        let Some(bytes) = buf.get(..n) else { continue };
        stats.bytes_in.fetch_add(n as u64, Relaxed);
        decoder.push(bytes, &mut |frame| {
            frames.push(Bytes::copy_from_slice(frame));
        });
        stats.decoder(decoder.stats());
        partial = true;
        for frame in frames.drain(..) {
            if !config.forwarder && is_encapsulated(&frame) {
                stats.encapsulated_dropped.fetch_add(1, Relaxed);
                tracing::debug!(
                    line = index,
                    "Encapsulated frame on a line that is not a forwarder's; dropped."
                );
                continue;
            }
            stats.frames_in.fetch_add(1, Relaxed);
            // Waits while the driver is not reading (backpressure); a gone driver means
            // the gateway is stopping.
            if inbound.send((index, frame)).await.is_err() {
                return io::Error::other("the MQTT-SN driver is gone");
            }
        }
    }
}

/// Writes queued frames, paced at the line's rate, until the device fails.
#[allow(clippy::disallowed_methods)] // The adapter reads the clock (pacing).
async fn write_loop(
    mut writer: tokio::io::WriteHalf<tokio_serial::SerialStream>,
    queue: &mut mpsc::Receiver<Bytes>,
    config: &SerialLine,
    stats: &LineStats,
) -> io::Error {
    let mut pacer = Pacer::new(config.baud, config.bits_per_char(), PACE_SLACK);
    let mut buf = Vec::with_capacity(max_encoded_len(config.framing, config.max_frame));
    loop {
        let Some(frame) = queue.recv().await else {
            // The driver is gone (stopping): nothing more to write; reading goes on.
            return std::future::pending().await;
        };
        buf.clear();
        framing::encode(config.framing, &frame, &mut buf);
        let now = Instant::now();
        let start = pacer.ready_at(now);
        if start > now {
            tokio::time::sleep_until(start.into()).await;
        }
        if let Err(e) = writer.write_all(&buf).await {
            return e;
        }
        pacer.sent(start.max(now), buf.len());
        stats.frames_out.fetch_add(1, Relaxed);
        stats.bytes_out.fetch_add(buf.len() as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests;
