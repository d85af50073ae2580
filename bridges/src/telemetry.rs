//! Instruments the admin listener reads, made to cost the hot path next to nothing.
//!
//! Invariants:
//! - Recording is a few relaxed atomic operations, never a lock or an allocation: loops that
//!   handle every message may record into these freely.
//! - Reading (a scrape, `/status`) takes a snapshot; it may be slightly inconsistent across
//!   fields (a histogram's count and buckets are read one after the other), never torn
//!   within one field.
//! - Nothing here reads the clock: callers pass the time they already have.

use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the latency histograms' buckets: 100 µs to 10 s, roughly three
/// per decade (an fsync on flash takes 1 to 50 ms; a broker's acknowledgement 0.1 to 100 ms).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram of durations with fixed buckets, recorded with relaxed atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound plus the `+Inf` bucket (not cumulative).
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(LATENCY_BUCKETS)
    }
}

impl Histogram {
    /// A histogram with these bucket upper bounds (seconds, ascending).
    #[must_use]
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, duration: Duration) {
        let secs = duration.as_secs_f64();
        let index = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// The values now, with cumulative bucket counts.
    #[must_use]
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(self.buckets.iter())
            .map(|(&bound, count)| {
                cumulative += count.load(Relaxed);
                (bound, cumulative)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            count: self.count.load(Relaxed),
            sum_secs: Duration::from_nanos(self.sum_nanos.load(Relaxed)).as_secs_f64(),
        }
    }
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations at or below it), ascending; `+Inf` is `count`.
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum_secs: f64,
}

/// When a loop last turned: the loop beats each time round (and at least every
/// [`BEAT_IDLE`] when idle), the health check reads how long ago that was.
#[derive(Debug)]
pub struct Beat {
    /// Milliseconds since [`epoch`] at the last beat, plus one (0: never beat).
    last: AtomicU64,
}

/// The longest an idle loop waits before beating anyway: a loop silent for several times
/// this is stuck.
pub const BEAT_IDLE: Duration = Duration::from_secs(1);

impl Default for Beat {
    fn default() -> Self {
        Self::new()
    }
}

impl Beat {
    /// A beat that has not beaten yet.
    #[must_use]
    pub const fn new() -> Self {
        Beat {
            last: AtomicU64::new(0),
        }
    }

    /// The loop turned at `now`.
    pub fn beat(&self, now: Instant) {
        self.last.store(millis_since_epoch(now) + 1, Relaxed);
    }

    /// How long before `now` the last beat was; `None` if it never beat.
    #[must_use]
    pub fn silent_for(&self, now: Instant) -> Option<Duration> {
        let last = self.last.load(Relaxed).checked_sub(1)?;
        Some(Duration::from_millis(
            millis_since_epoch(now).saturating_sub(last),
        ))
    }
}

/// The instant beats are counted from (the first time anyone asks).
#[allow(clippy::disallowed_methods)] // Read once, as the origin of the beats' clock.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis_since_epoch(now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX)
}

/// The state of one upstream's link as the admin listener shows it: written by the upstream
/// kind's connection task at each transition (never per message), read by `/status`.
#[derive(Debug, Default)]
pub struct LinkInfo {
    state: Mutex<LinkStatus>,
}

/// A snapshot of [`LinkInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// Whether the link is up.
    pub connected: bool,
    /// Wall-clock milliseconds since the Unix epoch of the last transition (or of the first
    /// attempt); 0 before any.
    pub since_ms: u64,
    /// Why the link last went down or failed to come up (`None` before any failure).
    pub last_error: Option<String>,
    /// Connections established (a reconnect is every one after the first).
    pub connects: u64,
    /// Connection attempts that failed.
    pub failed_attempts: u64,
}

impl LinkInfo {
    /// The link came up at `now_ms` (wall clock).
    pub fn up(&self, now_ms: u64) {
        let mut s = self.lock();
        s.connected = true;
        s.since_ms = now_ms;
        s.connects += 1;
    }

    /// The link went down at `now_ms`, or an attempt failed: why.
    pub fn down(&self, now_ms: u64, error: impl std::fmt::Display) {
        let mut s = self.lock();
        if s.connected || s.since_ms == 0 {
            s.since_ms = now_ms;
        }
        if !s.connected {
            s.failed_attempts += 1;
        }
        s.connected = false;
        s.last_error = Some(error.to_string());
    }

    /// The state now.
    #[must_use]
    pub fn status(&self) -> LinkStatus {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkStatus> {
        // A panic elsewhere while holding it leaves a plain struct: still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A short text for a link's I/O error, as [`LinkStatus::last_error`] shows it: the
/// common cases in an operator's words ("connection refused", "broker closed the
/// connection"), others as the OS says them.
#[must_use]
pub fn io_error_summary(error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::UnexpectedEof
        | ErrorKind::BrokenPipe => BROKER_CLOSED.into(),
        ErrorKind::TimedOut => "network timeout".into(),
        _ => format!("I/O: {error}"),
    }
}

/// [`LinkStatus::last_error`] when the peer ended the connection.
pub const BROKER_CLOSED: &str = "broker closed the connection";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_every_observation() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(0.001, 1), (0.01, 3)]);
        assert_eq!(s.count, 4);
        assert!((s.sum_secs - 1.0105).abs() < 1e-9, "{}", s.sum_secs);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // Any instant will do; beats count from the first.
    fn a_beat_tells_how_long_the_loop_was_silent() {
        let beat = Beat::new();
        let now = Instant::now();
        assert_eq!(beat.silent_for(now), None);
        beat.beat(now);
        let later = now + Duration::from_secs(3);
        let silent = beat.silent_for(later).unwrap();
        assert!(silent >= Duration::from_millis(2999) && silent <= Duration::from_secs(3));
    }

    #[test]
    fn link_info_keeps_the_last_error_and_counts_connects_and_failures() {
        let link = LinkInfo::default();
        link.down(10, "connection refused");
        link.down(20, "connection refused");
        let s = link.status();
        assert!(!s.connected);
        assert_eq!((s.since_ms, s.failed_attempts), (10, 2));
        link.up(30);
        link.down(40, "broker closed the connection");
        link.up(50);
        let s = link.status();
        assert!(s.connected);
        assert_eq!((s.since_ms, s.connects), (50, 2));
        assert_eq!(
            s.last_error.as_deref(),
            Some("broker closed the connection")
        );
    }
}
