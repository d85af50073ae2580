//! systemd `Type=notify`: readiness, status lines, the watchdog, stopping.
//!
//! ```text
//!  app: listeners bound ──> Notifier::ready ─────────────> READY=1 + STATUS=
//!  supervise (every TICK):  Sources::gather ─> Snapshot ─> Supervisor::handle_snapshot
//!                                                             ├─ STATUS=<status_line> (changed, <= 1/s)
//!                                                             └─ WATCHDOG=1 (due, and every loop turns)
//!  app: shutdown starts ──> Notifier::stopping ──────────> STOPPING=1 + STATUS=stopping
//! ```
//!
//! Invariants:
//! - `READY=1` is sent once the config is validated, the spool recovered and every listener
//!   bound (the wiring calls [`Notifier::ready`] after "sensorgate ready.").
//! - `WATCHDOG=1` goes out every half [`watchdog_interval`] only while every loop turns: the
//!   verdict is [`Snapshot::health`]'s `live`, the same one `/healthz` gives (each ingress
//!   answered its query within [`QUERY_TIMEOUT`](super::snapshot::QUERY_TIMEOUT), no ingress,
//!   drain or spool writer silent past [`STALL_AFTER`](super::snapshot::STALL_AFTER)). A stuck
//!   core therefore stops the pings and systemd restarts the daemon.
//! - While stopping, the pings go on unconditionally: the shutdown is bounded by its own grace
//!   periods and by `TimeoutStopSec=`, and the loops it stops no longer beat.
//! - `STATUS=` is sent when the line changed, at most once per [`STATUS_MIN_INTERVAL`].
//! - A notification that cannot be sent never stops the daemon: the first failure is logged
//!   at debug, the rest silently (the socket's owner is gone or not systemd).
//! - Without `NOTIFY_SOCKET` there is no [`Notifier`] and nothing runs.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use super::cli::human_bytes;
use super::snapshot::{Phase, Snapshot, Sources};

/// The least time between two `STATUS=` lines.
pub const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Sends notifications to the service manager's `NOTIFY_SOCKET`.
///
/// Each call sends one datagram (sd_notify(3)); errors are swallowed (see the module doc).
#[derive(Debug, Clone)]
pub struct Notifier {
    /// Set at the first failed send, so that only that one is logged.
    failed: Arc<AtomicBool>,
}

impl Notifier {
    /// A notifier when `NOTIFY_SOCKET` is set (systemd started us with `Type=notify`).
    #[must_use]
    pub fn from_env() -> Option<Notifier> {
        std::env::var_os("NOTIFY_SOCKET")
            .filter(|path| !path.is_empty())
            .map(|_| Notifier {
                failed: Arc::new(AtomicBool::new(false)),
            })
    }

    /// `READY=1` with a first status line: the daemon serves.
    pub fn ready(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// `STATUS=<line>` (newlines become spaces: one datagram field per line).
    pub fn status(&self, line: &str) {
        let line = one_line(line);
        self.send(&[NotifyState::Status(&line)]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (as `Type=notify-reload` wants); send
    /// [`Self::ready`] once the reload is done.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// `STOPPING=1` and `STATUS=stopping`: shutdown has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// `WATCHDOG=1`: the daemon is alive.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(error) = sd_notify::notify(states)
            && !self.failed.swap(true, Relaxed)
        {
            tracing::debug!(%error, "Cannot notify the service manager (NOTIFY_SOCKET); further failures are not logged.");
        }
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), when `WATCHDOG_PID` is unset or
/// names this process (sd_watchdog_enabled(3)); `None` when off or zero.
#[must_use]
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// `line` on one line.
fn one_line(line: &str) -> String {
    line.replace(['\n', '\r'], " ")
}

/// The `STATUS=` line: phase, sessions per protocol, upstream states, backlog.
///
/// `serving: 12 sessions (mqtt-sn 10, coap 2); upstreams main up, cloud down; backlog 340
/// (1.2 MiB)`. Sessions count every state (sleeping ones too); an ingress that did not answer
/// is named `<protocol> ?`. The backlog is the largest upstream's (records and bytes the spool
/// holds for it). A stalled loop puts `stalled: <what>` first; the last reload's outcome, once
/// there was one, comes last (`reload #2: applied [[route]]`).
#[must_use]
pub fn status_line(snapshot: &Snapshot) -> String {
    let phase = match snapshot.phase {
        Phase::Starting => "starting",
        Phase::Serving => "serving",
        Phase::Stopping => "stopping",
    };
    let mut line = String::new();
    let stalled = snapshot.stalled();
    if !stalled.is_empty() {
        let names: Vec<&str> = stalled.iter().map(|(name, _)| name.as_str()).collect();
        let _ = write!(line, "stalled: {}; ", names.join(", "));
    }
    let total: u64 = snapshot
        .ingresses
        .iter()
        .filter_map(|i| i.report.as_ref())
        .map(|r| r.sessions.total())
        .sum();
    let per: Vec<String> = snapshot
        .ingresses
        .iter()
        .map(|i| match &i.report {
            Some(r) => format!("{} {}", i.protocol, r.sessions.total()),
            None => format!("{} ?", i.protocol),
        })
        .collect();
    let plural = if total == 1 { "" } else { "s" };
    let _ = write!(line, "{phase}: {total} session{plural}");
    if !per.is_empty() {
        let _ = write!(line, " ({})", per.join(", "));
    }
    if !snapshot.upstreams.is_empty() {
        let ups: Vec<String> = snapshot
            .upstreams
            .iter()
            .map(|u| {
                let state = if u.link.connected { "up" } else { "down" };
                format!("{} {state}", u.name)
            })
            .collect();
        let _ = write!(line, "; upstreams {}", ups.join(", "));
        let (records, bytes) = snapshot
            .upstreams
            .iter()
            .map(|u| (u.backlog.records, u.backlog.bytes))
            .max()
            .unwrap_or_default();
        let _ = write!(line, "; backlog {records} ({})", human_bytes(bytes));
    }
    if let Some(reload) = &snapshot.reload {
        let _ = write!(line, "; {}", reload.summary());
    }
    line
}

/// Whether the watchdog may be pinged on this snapshot: every loop turns (the verdict
/// `/healthz` gives as `live`).
#[must_use]
pub fn loops_turn(snapshot: &Snapshot) -> bool {
    snapshot.health().live
}

/// What to send after one look.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Turn {
    /// Send `WATCHDOG=1`.
    pub ping: bool,
    /// Send `STATUS=` with this line.
    pub status: Option<String>,
}

/// The decisions of the supervising task, sans-IO: fed a snapshot (or the news that the
/// gateway is stopping) and the time, it says what to send.
#[derive(Debug, Clone)]
pub struct Supervisor {
    /// Half the watchdog interval, when the watchdog is on.
    ping_every: Option<Duration>,
    /// When the next ping is due (`None`: at the first chance).
    next_ping: Option<Instant>,
    /// The last line sent, and when.
    last_status: Option<(String, Instant)>,
}

impl Supervisor {
    /// A supervisor for a watchdog of `watchdog` (see [`watchdog_interval`]).
    #[must_use]
    pub fn new(watchdog: Option<Duration>) -> Supervisor {
        Supervisor {
            ping_every: watchdog.map(|w| w / 2),
            next_ping: None,
            last_status: None,
        }
    }

    /// How often to look: [`STATUS_MIN_INTERVAL`], or half the ping period when shorter (so
    /// a ping is never late by more than that).
    #[must_use]
    pub fn tick(&self) -> Duration {
        match self.ping_every {
            Some(every) => (every / 2).clamp(Duration::from_millis(10), STATUS_MIN_INTERVAL),
            None => STATUS_MIN_INTERVAL,
        }
    }

    /// One look at `snapshot`, taken at `now`.
    pub fn handle_snapshot(&mut self, now: Instant, snapshot: &Snapshot) -> Turn {
        if snapshot.phase == Phase::Stopping {
            // `Notifier::stopping` said so; the pings go on (module doc).
            return self.handle_stopping(now);
        }
        let ping = loops_turn(snapshot) && self.ping_due(now);
        let line = status_line(snapshot);
        let status = match &self.last_status {
            Some((last, _)) if *last == line => None,
            Some((_, at)) if now.saturating_duration_since(*at) < STATUS_MIN_INTERVAL => None,
            _ => Some(line),
        };
        if let Some(line) = &status {
            self.last_status = Some((line.clone(), now));
        }
        Turn { ping, status }
    }

    /// One look while stopping: pings only.
    pub fn handle_stopping(&mut self, now: Instant) -> Turn {
        Turn {
            ping: self.ping_due(now),
            status: None,
        }
    }

    /// Whether a ping is due at `now`; if so, the next one is scheduled.
    fn ping_due(&mut self, now: Instant) -> bool {
        let Some(every) = self.ping_every else {
            return false;
        };
        if self.next_ping.is_some_and(|due| now < due) {
            return false;
        }
        self.next_ping = Some(now + every);
        true
    }
}

/// Sends `STATUS=` lines and watchdog pings (see the module doc) until `stop`.
pub async fn supervise(
    sources: Sources,
    notifier: Notifier,
    watchdog: Option<Duration>,
    stop: CancellationToken,
) {
    let mut supervisor = Supervisor::new(watchdog);
    if let Some(interval) = watchdog {
        tracing::info!(
            watchdog_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            "systemd watchdog on."
        );
    }
    let mut tick = tokio::time::interval(supervisor.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let turn = if sources.phase.get() == Phase::Stopping {
            supervisor.handle_stopping(now())
        } else {
            let snapshot = tokio::select! {
                () = stop.cancelled() => return,
                snapshot = sources.gather() => snapshot,
            };
            supervisor.handle_snapshot(now(), &snapshot)
        };
        if let Some(line) = &turn.status {
            notifier.status(line);
        }
        if turn.ping {
            notifier.watchdog();
        }
    }
}

/// The adapter's clock.
#[allow(clippy::disallowed_methods)] // The supervising task is an adapter: it reads the clock.
fn now() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::snapshot::STALL_AFTER;
    use crate::observe::snapshot::tests::serving;

    #[test]
    fn the_status_line_names_sessions_upstreams_and_backlog() {
        let mut s = serving();
        assert_eq!(
            status_line(&s),
            "serving: 3 sessions (mqtt-sn 3); upstreams cloud up; backlog 0 (0 B)"
        );
        let mut coap = s.ingresses[0].clone();
        coap.protocol = "coap";
        coap.report = None;
        s.ingresses.push(coap);
        let mut main = s.upstreams[0].clone();
        main.name = "main".into();
        main.backlog.records = 340;
        main.backlog.bytes = 1_258_291;
        s.upstreams.insert(0, main);
        s.upstreams[1].link.connected = false;
        s.upstreams[1].backlog.records = 12;
        assert_eq!(
            status_line(&s),
            "serving: 3 sessions (mqtt-sn 3, coap ?); upstreams main up, cloud down; \
             backlog 340 (1.2 MiB)"
        );
        s.spool.writer_silent_for = Some(STALL_AFTER * 2);
        s.phase = Phase::Starting;
        s.upstreams.clear();
        s.ingresses.truncate(1);
        s.ingresses[0].report.as_mut().unwrap().sessions.0 = [0, 1, 0, 0, 0, 0];
        assert_eq!(
            status_line(&s),
            "stalled: spool writer; starting: 1 session (mqtt-sn 1)"
        );
        s.reload = Some(crate::reload::Outcome {
            at_ms: 1,
            count: 2,
            ok: false,
            applied: vec![],
            restart_required: vec![],
            errors: vec!["f:1:1: error: x".into()],
            notes: vec![],
        });
        assert!(
            status_line(&s)
                .ends_with("; reload #2 refused: 1 error(s) in the config, running config kept"),
            "{}",
            status_line(&s)
        );
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // Any instant will do: the supervisor is given time.
    fn pings_go_out_at_half_the_interval_while_every_loop_turns() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(Some(Duration::from_secs(30)));
        assert_eq!(sup.tick(), Duration::from_secs(1));
        let s = serving();
        let first = sup.handle_snapshot(t0, &s);
        assert!(first.ping);
        assert!(first.status.is_some());
        // Not again before 15 s; the unchanged line is not repeated.
        let turn = sup.handle_snapshot(t0 + Duration::from_secs(14), &s);
        assert_eq!(turn, Turn::default());
        assert!(sup.handle_snapshot(t0 + Duration::from_secs(15), &s).ping);
        assert!(!sup.handle_snapshot(t0 + Duration::from_secs(16), &s).ping);
        // No watchdog configured: never a ping.
        let mut off = Supervisor::new(None);
        assert!(!off.handle_snapshot(t0, &s).ping);
        assert!(!off.handle_stopping(t0).ping);
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn a_stale_beat_or_a_silent_core_stops_the_pings() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(Some(Duration::from_secs(2)));
        assert_eq!(sup.tick(), Duration::from_millis(500));
        let mut stuck = serving();
        stuck.ingresses[0].silent_for = Some(STALL_AFTER + Duration::from_millis(1));
        assert!(!loops_turn(&stuck));
        for i in 0..10 {
            let turn = sup.handle_snapshot(t0 + Duration::from_secs(i), &stuck);
            assert!(!turn.ping, "second {i}");
        }
        // The core does not answer its query at all.
        let mut silent = serving();
        silent.ingresses[0].report = None;
        assert!(
            !sup.handle_snapshot(t0 + Duration::from_secs(11), &silent)
                .ping
        );
        // The spool writer stalls.
        let mut writer = serving();
        writer.spool.writer_silent_for = Some(STALL_AFTER * 3);
        assert!(
            !sup.handle_snapshot(t0 + Duration::from_secs(12), &writer)
                .ping
        );
        // It turns again: the pings resume at once.
        assert!(
            sup.handle_snapshot(t0 + Duration::from_secs(13), &serving())
                .ping
        );
        // An upstream down is no reason to be restarted: the data is spooled.
        let mut down = serving();
        down.upstreams[0].link.connected = false;
        assert!(
            sup.handle_snapshot(t0 + Duration::from_secs(14), &down)
                .ping
        );
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn status_lines_are_sent_when_changed_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(None);
        let mut s = serving();
        assert!(sup.handle_snapshot(t0, &s).status.is_some());
        s.ingresses[0].report.as_mut().unwrap().sessions.0[1] += 1;
        let soon = t0 + Duration::from_millis(400);
        assert_eq!(sup.handle_snapshot(soon, &s).status, None);
        let later = t0 + STATUS_MIN_INTERVAL;
        let line = sup.handle_snapshot(later, &s).status.unwrap();
        assert!(line.starts_with("serving: 4 sessions"), "{line}");
        assert_eq!(sup.handle_snapshot(later, &s).status, None);
        // Stopping: no status from here (`Notifier::stopping` sent it), pings go on.
        let mut sup = Supervisor::new(Some(Duration::from_secs(2)));
        s.phase = Phase::Stopping;
        s.ingresses[0].report = None;
        let turn = sup.handle_snapshot(t0, &s);
        assert_eq!((turn.ping, turn.status), (true, None));
        assert!(sup.handle_stopping(t0 + Duration::from_secs(1)).ping);
    }

    #[test]
    fn status_text_is_kept_on_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }
}
