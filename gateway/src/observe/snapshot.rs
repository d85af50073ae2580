//! Everything the admin listener reads, gathered at one moment into a [`Snapshot`], and the
//! health verdict drawn from it.
//!
//! Invariants:
//! - Gathering reads counters the pipeline keeps anyway (relaxed atomics, the spool's stats
//!   under its lock for a few microseconds) and asks each ingress for its report on the
//!   ingress's own channel: nothing is counted on the hot path for the admin's sake.
//! - An ingress that does not answer within [`QUERY_TIMEOUT`] is reported as stalled (the
//!   verdict says unhealthy), never waited for longer: a stuck loop cannot hang a scrape.
//! - One snapshot feeds `/metrics`, `/status`, `/healthz` and `/readyz`, so they agree.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use sensorgate_bridges::router::DownlinkStats;
use sensorgate_bridges::spool::{DrainStats, SharedSpool, SpoolStats, StdFs, WhenFull, wall_ms};
use sensorgate_bridges::telemetry::{Beat, HistogramSnapshot, LinkInfo, LinkStatus};
use tokio::sync::{mpsc, oneshot};

use super::events::Events;
use super::model::{IngressQuery, IngressReport};
use super::status::{BacklogInfo, Health, HealthInfo};
use crate::io::kernel_drops::KernelDrops;
use crate::io::udp::UdpStats;
use crate::serial::line::{LineCounters, LineStats};

/// How long an ingress may take to answer a query before it counts as stalled.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// A loop silent for longer than this is stuck (loops beat at least every
/// [`sensorgate_bridges::telemetry::BEAT_IDLE`]).
pub const STALL_AFTER: Duration = Duration::from_secs(10);

/// How long after the last failed spool write or fsync the gateway reports itself degraded.
pub const DISK_ERROR_WINDOW: Duration = Duration::from_secs(300);

/// Where the gateway is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Opening the spool, starting upstreams, binding listeners.
    Starting = 0,
    /// Every listener bound, the spool open: serving.
    Serving = 1,
    /// Shutdown requested.
    Stopping = 2,
}

/// The gateway's phase, shared between the wiring (writer) and the admin (reader).
#[derive(Debug, Default)]
pub struct PhaseCell(AtomicU8);

impl PhaseCell {
    /// Moves to `phase`.
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Relaxed);
    }

    /// The phase now.
    pub fn get(&self) -> Phase {
        match self.0.load(Relaxed) {
            1 => Phase::Serving,
            2 => Phase::Stopping,
            _ => Phase::Starting,
        }
    }
}

/// One listener, for `/status`.
#[derive(Debug, Clone)]
pub struct Listener {
    /// `mqtt-sn`, `admin` ...
    pub protocol: &'static str,
    /// `udp`, `tcp` ...
    pub transport: &'static str,
    /// The bound address.
    pub address: SocketAddr,
}

/// One ingress (southbound protocol driver) as the admin reaches it.
#[derive(Clone)]
pub struct IngressSource {
    /// Its protocol label.
    pub protocol: &'static str,
    /// Where its queries go (answered by its task).
    pub queries: mpsc::Sender<IngressQuery>,
    /// Its loop's beat.
    pub beat: Arc<Beat>,
    /// The UDP driver's own counters, for a UDP ingress.
    pub udp: Option<Arc<UdpStats>>,
    /// The kernel's drops on its sockets, for a UDP ingress.
    pub kernel_drops: Option<Arc<KernelDrops>>,
    /// The ingress's own counters beyond [`IngressReport`] (HTTP: responses by status,
    /// connections, orphaned verdicts ...), read at scrape time; `None` when it has none.
    pub extra: Option<KindCounters>,
}

/// One `[[serial]]` line as the admin reads it.
#[derive(Debug, Clone)]
pub struct SerialSource {
    /// `device`.
    pub device: String,
    /// `forwarder`.
    pub forwarder: bool,
    /// Its counters (written by the line's task).
    pub stats: Arc<LineStats>,
}

/// One serial line at the moment of the snapshot.
#[derive(Debug, Clone)]
pub struct SerialSnap {
    /// `device`.
    pub device: String,
    /// `forwarder`.
    pub forwarder: bool,
    /// Its counters.
    pub counters: LineCounters,
}

/// An upstream kind's own counters, read at scrape time: (event name, count) pairs, the
/// same names every time (`published`, `acknowledged`, ... as the kind defines them).
pub type KindCounters = Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// One upstream as the admin reads it.
#[derive(Clone)]
pub struct UpstreamSource {
    /// `[[upstream]] name`.
    pub name: String,
    /// `mqtt` or `amqp`.
    pub kind: &'static str,
    /// The broker's address as configured (no credentials).
    pub url: String,
    /// Its index in the spool's cursors.
    pub index: usize,
    /// Its link state (written by the upstream's connection task).
    pub link: Arc<LinkInfo>,
    /// Its drain's counters.
    pub drain: Arc<DrainStats>,
    /// Its kind's own counters (the MQTT client's, the AMQP channel's).
    pub events: KindCounters,
}

/// Everything the admin reads, handed over by the wiring.
#[derive(Clone)]
pub struct Sources {
    /// `[gateway] id`.
    pub gateway_id: u8,
    /// `[gateway] name`.
    pub gateway_name: String,
    /// The config file.
    pub config_file: String,
    /// When the process started (wall clock ms).
    pub started_ms: u64,
    /// When the process started.
    pub started: Instant,
    /// The listeners.
    pub listeners: Vec<Listener>,
    /// The southbound drivers.
    pub ingresses: Vec<IngressSource>,
    /// The `[[serial]]` lines, in config order (index = line).
    pub serial: Vec<SerialSource>,
    /// The upstreams, in config order.
    pub upstreams: Vec<UpstreamSource>,
    /// The spool.
    pub spool: Arc<SharedSpool<StdFs>>,
    /// The router's counters.
    pub router: Arc<DownlinkStats>,
    /// Notable events.
    pub events: Arc<Events>,
    /// The gateway's phase.
    pub phase: Arc<PhaseCell>,
    /// When (wall clock ms) the monitor last saw spool writes or fsyncs fail; 0: never.
    pub last_disk_error_ms: Arc<AtomicU64>,
    /// The last reload's outcome.
    pub reload: Arc<crate::reload::ReloadCell>,
    /// The fleet view's counters (zero while `[fleet]` is off).
    pub fleet: Arc<super::fleet::FleetCounters>,
    /// The fleet view's settings as `/status` shows them; `None` when `[fleet]` is off.
    pub fleet_settings: Option<super::fleet::FleetSettings>,
}

/// One ingress at the moment of the snapshot.
#[derive(Debug, Clone)]
pub struct IngressSnap {
    /// Its protocol label.
    pub protocol: &'static str,
    /// Its report; `None` when it did not answer in time (stalled).
    pub report: Option<IngressReport>,
    /// How long its loop has been silent.
    pub silent_for: Option<Duration>,
    /// Publishes it gave up for a full spool queue (UDP driver).
    pub queue_dropped: u64,
    /// Datagrams the kernel dropped on its sockets (UDP).
    pub kernel_drops: Option<u64>,
    /// Its own counters (see [`IngressSource::extra`]); empty when it has none.
    pub events: Vec<(&'static str, u64)>,
}

/// One upstream at the moment of the snapshot.
#[derive(Debug, Clone)]
pub struct UpstreamSnap {
    /// `[[upstream]] name`.
    pub name: String,
    /// `mqtt` or `amqp`.
    pub kind: &'static str,
    /// The broker's address.
    pub url: String,
    /// Its link.
    pub link: LinkStatus,
    /// Acknowledged (or taken, QoS 0) by the broker.
    pub forwarded: u64,
    /// Refused for good by the broker.
    pub rejected: u64,
    /// Connections reset for an acknowledgement overdue.
    pub ack_timeouts: u64,
    /// Sent again after a connection loss.
    pub resent: u64,
    /// Passed over: no route sends them here.
    pub unrouted: u64,
    /// Given up over `max_backlog`.
    pub backlog_dropped: u64,
    /// Sent, not yet acknowledged.
    pub in_flight: u64,
    /// Waiting for it.
    pub backlog: BacklogInfo,
    /// Send to acknowledgement.
    pub ack_latency: HistogramSnapshot,
    /// How long its drain loop has been silent.
    pub silent_for: Option<Duration>,
    /// Its kind's own counters.
    pub events: Vec<(&'static str, u64)>,
}

/// The spool at the moment of the snapshot.
#[derive(Debug, Clone)]
pub struct SpoolSnap {
    /// Its counters.
    pub stats: SpoolStats,
    /// Appends refused for a full writer queue.
    pub queue_full: u64,
    /// Records held for the slowest upstream.
    pub records: u64,
    /// Age of the oldest record held, seconds.
    pub oldest_age_secs: u64,
    /// Whether an append now would be refused for want of room.
    pub refusing: bool,
    /// `[spool] max_bytes`.
    pub max_bytes: u64,
    /// `[spool] when_full`.
    pub when_full: WhenFull,
    /// Its directory.
    pub dir: String,
    /// Data fsync durations.
    pub fsync_latency: HistogramSnapshot,
    /// How long the writer thread has been silent.
    pub writer_silent_for: Option<Duration>,
}

/// Everything at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Wall clock, ms since the epoch.
    pub now_ms: u64,
    /// Since the process started.
    pub uptime: Duration,
    /// The phase.
    pub phase: Phase,
    /// The southbound drivers.
    pub ingresses: Vec<IngressSnap>,
    /// The serial lines, in config order (index = line).
    pub serial: Vec<SerialSnap>,
    /// The upstreams.
    pub upstreams: Vec<UpstreamSnap>,
    /// The spool.
    pub spool: SpoolSnap,
    /// The router's counters.
    pub router: RouterSnap,
    /// When spool writes or fsyncs last failed (wall clock ms; 0: never).
    pub last_disk_error_ms: u64,
    /// The last reload's outcome; `None` before the first.
    pub reload: Option<crate::reload::Outcome>,
    /// The fleet view's counters.
    pub fleet: super::fleet::FleetCounts,
}

/// The router's counters (see [`DownlinkStats`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RouterSnap {
    /// Uplink refused: no route takes the topic.
    pub refused_no_route: u64,
    /// Downlink taken from the upstreams.
    pub downlink_received: u64,
    /// Downlink the route table maps to no sensor topic.
    pub downlink_unrouted: u64,
    /// Downlink no ingress subscribed to.
    pub downlink_unmatched: u64,
    /// Downlink for an ingress that is gone.
    pub downlink_ingress_gone: u64,
    /// Local copies lost to a full ingress channel.
    pub local_dropped: u64,
    /// Messages on a control topic (fleet replay requests) handed to the control channel.
    pub control: u64,
    /// Messages on a control topic dropped: the control channel was full.
    pub control_dropped: u64,
}

impl Sources {
    /// Reads everything now; asks every ingress for its report (each within
    /// [`QUERY_TIMEOUT`], all at once).
    #[allow(clippy::disallowed_methods)] // The admin is an adapter: it reads the clock.
    pub async fn gather(&self) -> Snapshot {
        let reports = join_all(self.ingresses.iter().map(ask_report)).await;
        let now = Instant::now();
        let now_ms = wall_ms();
        let ingresses = self
            .ingresses
            .iter()
            .zip(reports)
            .map(|(i, report)| IngressSnap {
                protocol: i.protocol,
                report,
                silent_for: i.beat.silent_for(now),
                queue_dropped: i.udp.as_ref().map_or(0, |u| u.queue_dropped()),
                kernel_drops: i.kernel_drops.as_ref().map(|k| k.read()),
                events: i.extra.as_ref().map_or_else(Vec::new, |extra| extra()),
            })
            .collect();
        let (spool, upstreams) = {
            let locked = self.spool.lock();
            let stats = locked.stats();
            let upstreams: Vec<UpstreamSnap> = self
                .upstreams
                .iter()
                .map(|u| {
                    let b = locked.backlog_info(u.index, now_ms);
                    UpstreamSnap {
                        name: u.name.clone(),
                        kind: u.kind,
                        url: u.url.clone(),
                        link: u.link.status(),
                        forwarded: u.drain.forwarded.load(Relaxed),
                        rejected: u.drain.rejected.load(Relaxed),
                        ack_timeouts: u.drain.ack_timeouts.load(Relaxed),
                        resent: u.drain.resent.load(Relaxed),
                        unrouted: u.drain.unrouted.load(Relaxed),
                        backlog_dropped: u.drain.backlog_dropped.load(Relaxed),
                        in_flight: u.drain.in_flight.load(Relaxed),
                        backlog: BacklogInfo {
                            records: b.records,
                            bytes: b.bytes,
                            oldest_age_secs: age_secs(now_ms, b.oldest_ms),
                        },
                        ack_latency: u.drain.ack_latency.snapshot(),
                        silent_for: u.drain.beat.silent_for(now),
                        events: (u.events)(),
                    }
                })
                .collect();
            let config = locked.config();
            let spool = SpoolSnap {
                stats,
                queue_full: 0,
                records: locked.held_records(),
                oldest_age_secs: age_secs(now_ms, locked.oldest_ms()),
                refusing: locked.refusing(),
                max_bytes: config.max_bytes,
                when_full: config.when_full,
                dir: config.dir.display().to_string(),
                fsync_latency: HistogramSnapshot::default(),
                writer_silent_for: None,
            };
            (spool, upstreams)
        };
        let spool = SpoolSnap {
            queue_full: self.spool.queue_full(),
            fsync_latency: self.spool.fsync_latency().snapshot(),
            writer_silent_for: self.spool.writer_beat().silent_for(now),
            ..spool
        };
        let r = &self.router;
        Snapshot {
            now_ms,
            uptime: now.saturating_duration_since(self.started),
            phase: self.phase.get(),
            last_disk_error_ms: self.last_disk_error_ms.load(Relaxed),
            reload: self.reload.get(),
            fleet: self.fleet.read(),
            ingresses,
            serial: self
                .serial
                .iter()
                .map(|l| SerialSnap {
                    device: l.device.clone(),
                    forwarder: l.forwarder,
                    counters: l.stats.read(),
                })
                .collect(),
            upstreams,
            spool,
            router: RouterSnap {
                refused_no_route: r.refused_no_route.load(Relaxed),
                downlink_received: r.received.load(Relaxed),
                downlink_unrouted: r.unrouted.load(Relaxed),
                downlink_unmatched: r.unmatched.load(Relaxed),
                downlink_ingress_gone: r.ingress_gone.load(Relaxed),
                local_dropped: r.local_dropped.load(Relaxed),
                control: r.control.load(Relaxed),
                control_dropped: r.control_dropped.load(Relaxed),
            },
        }
    }
}

/// ` (<last error>)`, or nothing before any error: the tail of the sentences that name a
/// link's state.
pub(crate) fn why(link: &LinkStatus) -> String {
    link.last_error
        .as_deref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default()
}

/// Seconds from `oldest_ms` to `now_ms` (0 when there is none).
fn age_secs(now_ms: u64, oldest_ms: Option<u64>) -> u64 {
    oldest_ms.map_or(0, |t| now_ms.saturating_sub(t) / 1000)
}

/// Asks one ingress for its report; `None` when it does not answer in time.
async fn ask_report(ingress: &IngressSource) -> Option<IngressReport> {
    let ask = async {
        let (tx, rx) = oneshot::channel();
        ingress.queries.send(IngressQuery::Report(tx)).await.ok()?;
        rx.await.ok()
    };
    tokio::time::timeout(QUERY_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}

impl Snapshot {
    /// The loops that stopped turning: (name, silent for).
    #[must_use]
    pub fn stalled(&self) -> Vec<(String, Duration)> {
        let mut out = Vec::new();
        let mut check = |name: String, silent: Option<Duration>| {
            if let Some(s) = silent.filter(|s| *s > STALL_AFTER) {
                out.push((name, s));
            }
        };
        for i in &self.ingresses {
            check(format!("{} driver", i.protocol), i.silent_for);
        }
        for u in &self.upstreams {
            check(format!("drain of upstream `{}`", u.name), u.silent_for);
        }
        check("spool writer".into(), self.spool.writer_silent_for);
        out
    }

    /// The verdict: live (loops turn), ready (serving), healthy or degraded, with reasons.
    #[must_use]
    pub fn health(&self) -> HealthInfo {
        let mut reasons = Vec::new();
        for (name, silent) in self.stalled() {
            reasons.push(format!(
                "the {name} has not turned for {}s",
                silent.as_secs()
            ));
        }
        for i in self.ingresses.iter().filter(|i| i.report.is_none()) {
            reasons.push(format!(
                "the {} driver did not answer within {}s",
                i.protocol,
                QUERY_TIMEOUT.as_secs()
            ));
        }
        let live = reasons.is_empty();
        let ready = live && self.phase == Phase::Serving;
        match self.phase {
            Phase::Starting => reasons.push("starting".into()),
            Phase::Stopping => reasons.push("stopping".into()),
            Phase::Serving => {}
        }
        let unhealthy = !ready;
        for u in self.upstreams.iter().filter(|u| !u.link.connected) {
            let since = if u.link.since_ms == 0 {
                "never connected".to_owned()
            } else {
                format!(
                    "down for {}s",
                    self.now_ms.saturating_sub(u.link.since_ms) / 1000
                )
            };
            let why = why(&u.link);
            reasons.push(format!(
                "upstream `{}` {since}{why}: its data is spooled ({} records waiting)",
                u.name, u.backlog.records
            ));
        }
        // A configured serial line that is not open: its sensors are not heard (the line is
        // being reopened), the rest of the gateway serves on.
        for (line, l) in self
            .serial
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.counters.up)
        {
            let since = if l.counters.since_ms == 0 {
                "not opened yet".to_owned()
            } else {
                format!(
                    "down for {}s",
                    self.now_ms.saturating_sub(l.counters.since_ms) / 1000
                )
            };
            reasons.push(format!(
                "serial line {line} (`{}`) {since}: reopening; its sensors are not heard",
                l.device
            ));
        }
        if self.spool.refusing {
            reasons.push(match self.spool.when_full {
                WhenFull::RejectNew => {
                    "the spool is full: new QoS 1/2 data is refused (congestion)".to_owned()
                }
                WhenFull::DropOldest => {
                    "the spool is full: the oldest data is dropped to make room".to_owned()
                }
            });
        }
        let since_disk_error = self.now_ms.saturating_sub(self.last_disk_error_ms);
        if self.last_disk_error_ms != 0 && since_disk_error < DISK_ERROR_WINDOW.as_millis() as u64 {
            reasons.push(format!(
                "spool writes or fsyncs failed {}s ago ({} write and {} fsync errors since start): \
                 check the disk",
                since_disk_error / 1000,
                self.spool.stats.write_errors,
                self.spool.stats.sync_errors
            ));
        }
        let state = if unhealthy {
            Health::Unhealthy
        } else if reasons.is_empty() {
            Health::Healthy
        } else {
            Health::Degraded
        };
        HealthInfo {
            state,
            live,
            ready,
            reasons,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::observe::model::{IngressCounters, SessionCounts};

    /// A serving gateway with one MQTT-SN ingress and one connected upstream, all quiet.
    pub(crate) fn serving() -> Snapshot {
        Snapshot {
            fleet: crate::observe::fleet::FleetCounts::default(),
            now_ms: 1_000_000,
            uptime: Duration::from_secs(60),
            phase: Phase::Serving,
            ingresses: vec![IngressSnap {
                protocol: "mqtt-sn",
                report: Some(IngressReport {
                    protocol: "mqtt-sn",
                    sessions: SessionCounts([0, 2, 1, 0, 0, 0]),
                    counters: IngressCounters {
                        messages_in: [0, 3, 5, 0],
                        ..IngressCounters::default()
                    },
                }),
                silent_for: Some(Duration::from_millis(5)),
                queue_dropped: 0,
                kernel_drops: Some(0),
                events: Vec::new(),
            }],
            serial: Vec::new(),
            upstreams: vec![UpstreamSnap {
                name: "cloud".into(),
                kind: "mqtt",
                url: "mqtt://127.0.0.1:1883".into(),
                link: LinkStatus {
                    connected: true,
                    since_ms: 900_000,
                    last_error: None,
                    connects: 1,
                    failed_attempts: 0,
                },
                forwarded: 8,
                rejected: 0,
                ack_timeouts: 0,
                resent: 0,
                unrouted: 0,
                backlog_dropped: 0,
                in_flight: 0,
                backlog: BacklogInfo {
                    records: 0,
                    bytes: 0,
                    oldest_age_secs: 0,
                },
                ack_latency: HistogramSnapshot::default(),
                silent_for: Some(Duration::from_millis(300)),
                events: vec![("published", 8), ("acknowledged", 8)],
            }],
            spool: SpoolSnap {
                stats: SpoolStats::default(),
                queue_full: 0,
                records: 0,
                oldest_age_secs: 0,
                refusing: false,
                max_bytes: 1 << 30,
                when_full: WhenFull::RejectNew,
                dir: "/var/lib/sensorgate/spool".into(),
                fsync_latency: HistogramSnapshot::default(),
                writer_silent_for: Some(Duration::from_millis(50)),
            },
            router: RouterSnap::default(),
            last_disk_error_ms: 0,
            reload: None,
        }
    }

    #[test]
    fn a_quiet_serving_gateway_is_healthy() {
        let h = serving().health();
        assert_eq!(h.state, Health::Healthy);
        assert!(h.live && h.ready);
        assert!(h.reasons.is_empty(), "{:?}", h.reasons);
    }

    #[test]
    fn an_upstream_down_degrades_but_stays_ready() {
        let mut s = serving();
        s.upstreams[0].link = LinkStatus {
            connected: false,
            since_ms: 880_000,
            last_error: Some("connection refused".into()),
            connects: 1,
            failed_attempts: 4,
        };
        s.upstreams[0].backlog.records = 42;
        let h = s.health();
        assert_eq!(h.state, Health::Degraded);
        assert!(h.live && h.ready);
        assert_eq!(
            h.reasons,
            [
                "upstream `cloud` down for 120s (connection refused): its data is spooled (42 records waiting)"
            ]
        );
    }

    #[test]
    fn a_serial_line_down_degrades_but_stays_ready() {
        let mut s = serving();
        let line = |up: bool, since_ms: u64| SerialSnap {
            device: format!("/dev/tty{since_ms}"),
            forwarder: false,
            counters: LineCounters {
                up,
                since_ms,
                ..LineCounters::default()
            },
        };
        s.serial = vec![line(true, 900_000), line(false, 970_000), line(false, 0)];
        let h = s.health();
        assert_eq!(h.state, Health::Degraded);
        assert!(h.live && h.ready);
        assert_eq!(
            h.reasons,
            [
                "serial line 1 (`/dev/tty970000`) down for 30s: reopening; its sensors are not heard",
                "serial line 2 (`/dev/tty0`) not opened yet: reopening; its sensors are not heard",
            ]
        );
    }

    #[test]
    fn a_full_spool_and_recent_disk_errors_degrade() {
        let mut s = serving();
        s.spool.refusing = true;
        s.spool.stats.sync_errors = 2;
        s.last_disk_error_ms = s.now_ms - 30_000;
        let h = s.health();
        assert_eq!(h.state, Health::Degraded);
        assert!(
            h.reasons[0].contains("the spool is full"),
            "{:?}",
            h.reasons
        );
        assert!(h.reasons[1].starts_with("spool writes or fsyncs failed 30s ago"));
        // An old disk error no longer counts.
        s.spool.refusing = false;
        s.last_disk_error_ms = s.now_ms - DISK_ERROR_WINDOW.as_millis() as u64 - 1;
        assert_eq!(s.health().state, Health::Healthy);
    }

    #[test]
    fn starting_stopping_and_stuck_loops_are_unhealthy() {
        let mut s = serving();
        s.phase = Phase::Starting;
        let h = s.health();
        assert_eq!((h.state, h.live, h.ready), (Health::Unhealthy, true, false));
        assert_eq!(h.reasons, ["starting"]);

        let mut s = serving();
        s.spool.writer_silent_for = Some(STALL_AFTER + Duration::from_secs(1));
        let h = s.health();
        assert_eq!(
            (h.state, h.live, h.ready),
            (Health::Unhealthy, false, false)
        );
        assert_eq!(h.reasons, ["the spool writer has not turned for 11s"]);
        assert_eq!(s.stalled().len(), 1);

        let mut s = serving();
        s.ingresses[0].report = None;
        let h = s.health();
        assert!(!h.live);
        assert_eq!(h.reasons, ["the mqtt-sn driver did not answer within 2s"]);
    }
}
