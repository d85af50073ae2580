//! Turns changes of state into notable events: an upstream going down or coming back, the
//! spool becoming full or having room again, disk errors, data given up.
//!
//! It looks once per [`MONITOR_INTERVAL`] at values the pipeline keeps anyway (the upstreams'
//! link info, the spool's counters), so an event costs the hot path nothing, and a burst of
//! the same trouble (thousands of refused appends) is one event per interval at most.

use std::time::Duration;

use sensorgate_bridges::spool::{SpoolStats, wall_ms};
use sensorgate_bridges::telemetry::LinkStatus;
use tokio_util::sync::CancellationToken;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::events::{Detail, Events, Level};
use super::snapshot::{Sources, UpstreamSource, why};

/// How often the monitor looks.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(1);

/// What the monitor saw last time.
struct Seen {
    links: Vec<LinkStatus>,
    spool: SpoolStats,
    refusing: bool,
}

fn look(sources: &Sources) -> Seen {
    let links = sources.upstreams.iter().map(|u| u.link.status()).collect();
    let locked = sources.spool.lock();
    Seen {
        links,
        spool: locked.stats(),
        refusing: locked.refusing(),
    }
}

/// Records events until `stop`.
pub async fn run(sources: Sources, stop: CancellationToken) {
    let mut last = look(&sources);
    let mut tick = tokio::time::interval(MONITOR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = look(&sources);
        record(
            &sources.upstreams,
            &sources.events,
            &sources.last_disk_error_ms,
            &last,
            &now,
            wall_ms(),
        );
        last = now;
    }
}

/// The events between two looks.
fn record(
    upstreams: &[UpstreamSource],
    events: &Events,
    last_disk_error_ms: &AtomicU64,
    last: &Seen,
    now: &Seen,
    at_ms: u64,
) {
    for ((u, before), after) in upstreams.iter().zip(&last.links).zip(&now.links) {
        // `connects` catches a drop and reconnect between two looks.
        let reconnected = after.connects > before.connects;
        if before.connected && (!after.connected || reconnected) {
            let duration = at_ms.saturating_sub(before.since_ms) / 1000;
            events.push_with(
                at_ms,
                "upstream_down",
                Level::Warning,
                format!(
                    "Upstream `{}` went down after {duration}s up{}; data is spooled.",
                    u.name,
                    why(after)
                ),
                Detail {
                    upstream: Some(u.name.clone()),
                    duration_secs: Some(duration),
                    ..Detail::default()
                },
            );
        }
        if after.connected && (!before.connected || reconnected) {
            let down_secs = (before.since_ms != 0 && !before.connected)
                .then(|| after.since_ms.saturating_sub(before.since_ms) / 1000);
            let down_for = down_secs.map_or_else(String::new, |d| format!(" after {d}s down"));
            events.push_with(
                at_ms,
                "upstream_up",
                Level::Info,
                format!("Upstream `{}` connected{down_for}.", u.name),
                Detail {
                    upstream: Some(u.name.clone()),
                    duration_secs: down_secs,
                    ..Detail::default()
                },
            );
        }
        if !before.connected && !after.connected && after.failed_attempts > before.failed_attempts {
            // Repeated failures while down are not news; the first one is (above, or at start).
            if before.failed_attempts == 0 && before.connects == 0 {
                events.push_with(
                    at_ms,
                    "upstream_down",
                    Level::Warning,
                    format!(
                        "Upstream `{}` cannot be reached{}; data is spooled.",
                        u.name,
                        why(after)
                    ),
                    Detail {
                        upstream: Some(u.name.clone()),
                        ..Detail::default()
                    },
                );
            }
        }
    }
    let (a, b) = (&last.spool, &now.spool);
    if now.refusing && !last.refusing {
        events.push(
            at_ms,
            "spool_full",
            Level::Warning,
            "The spool is full (or the disk below [spool] min_free_bytes).".into(),
        );
    } else if !now.refusing && last.refusing {
        events.push(
            at_ms,
            "spool_room",
            Level::Info,
            "The spool has room again.".into(),
        );
    }
    if b.rejected_full > a.rejected_full {
        let refused = b.rejected_full - a.rejected_full;
        events.push_with(
            at_ms,
            "spool_full",
            Level::Warning,
            format!("{refused} appends refused: the spool is full."),
            Detail {
                records: Some(refused),
                ..Detail::default()
            },
        );
    }
    let errors = (b.write_errors + b.sync_errors).saturating_sub(a.write_errors + a.sync_errors);
    if errors > 0 {
        last_disk_error_ms.store(at_ms, Relaxed);
        events.push(
            at_ms,
            "disk_error",
            Level::Warning,
            format!("{errors} spool writes or fsyncs failed; see the log."),
        );
    }
    for (reason, before, after) in [
        ("drop_oldest", a.dropped_oldest, b.dropped_oldest),
        ("expired", a.expired, b.expired),
        ("corrupt", a.corrupt, b.corrupt),
    ] {
        if after > before {
            events.push_with(
                at_ms,
                "data_dropped",
                Level::Warning,
                format!("{} records given up ({reason}).", after - before),
                Detail {
                    reason: Some(reason),
                    records: Some(after - before),
                    ..Detail::default()
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn upstream() -> UpstreamSource {
        UpstreamSource {
            name: "cloud".into(),
            kind: "mqtt",
            url: "mqtt://127.0.0.1:1883".into(),
            index: 0,
            link: Arc::default(),
            drain: Arc::default(),
            events: Arc::new(Vec::new),
        }
    }

    fn seen(link: LinkStatus, spool: SpoolStats, refusing: bool) -> Seen {
        Seen {
            links: vec![link],
            spool,
            refusing,
        }
    }

    fn link(connected: bool, since_ms: u64, connects: u64, failed: u64) -> LinkStatus {
        LinkStatus {
            connected,
            since_ms,
            last_error: (!connected).then(|| "connection refused".to_owned()),
            connects,
            failed_attempts: failed,
        }
    }

    #[test]
    fn link_changes_spool_trouble_and_drops_become_events_once() {
        let ups = [upstream()];
        let events = Events::new(100);
        let disk = AtomicU64::new(0);
        let quiet = SpoolStats::default();
        let steps = [
            // Never connected, first failure: news. Further failures: not.
            seen(link(false, 1_000, 0, 1), quiet, false),
            seen(link(false, 1_000, 0, 5), quiet, false),
            seen(link(true, 9_000, 1, 5), quiet, false),
            // Down and back between two looks: both reported.
            seen(link(true, 20_000, 2, 6), quiet, false),
            seen(
                link(true, 20_000, 2, 6),
                SpoolStats {
                    rejected_full: 7,
                    sync_errors: 1,
                    dropped_oldest: 3,
                    ..quiet
                },
                true,
            ),
            seen(link(true, 20_000, 2, 6), quiet, false),
        ];
        let mut last = seen(link(false, 0, 0, 0), quiet, false);
        for (i, now) in steps.into_iter().enumerate() {
            record(&ups, &events, &disk, &last, &now, 100_000 + i as u64);
            last = now;
        }
        let kinds: Vec<String> = events.list().into_iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                "upstream_down",
                "upstream_up",
                "upstream_down",
                "upstream_up",
                "spool_full",
                "spool_full",
                "disk_error",
                "data_dropped",
                "spool_room",
            ]
        );
        assert_eq!(disk.load(Relaxed), 100_004);
        let list = events.list();
        assert_eq!(list[1].message, "Upstream `cloud` connected after 8s down.");
        assert!(
            list[7]
                .message
                .starts_with("3 records given up (drop_oldest)")
        );
        // A backend reads the reason and the count, not the sentence.
        assert_eq!(
            (list[7].reason.as_deref(), list[7].records),
            (Some("drop_oldest"), Some(3))
        );
    }
}
