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

use super::events::Level;
use super::snapshot::Sources;

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
        record(&sources, &last, &now, wall_ms());
        last = now;
    }
}

/// The events between two looks.
fn record(sources: &Sources, last: &Seen, now: &Seen, at_ms: u64) {
    let events = &sources.events;
    for ((u, before), after) in sources.upstreams.iter().zip(&last.links).zip(&now.links) {
        // `connects` catches a drop and reconnect between two looks.
        let reconnected = after.connects > before.connects;
        if before.connected && (!after.connected || reconnected) {
            let duration = at_ms.saturating_sub(before.since_ms) / 1000;
            events.push(
                at_ms,
                "upstream_down",
                Level::Warning,
                format!(
                    "Upstream `{}` went down after {duration}s up{}; data is spooled.",
                    u.name,
                    after
                        .last_error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ),
            );
        }
        if after.connected && (!before.connected || reconnected) {
            let down_for = if before.since_ms == 0 || before.connected {
                String::new()
            } else {
                format!(
                    " after {}s down",
                    after.since_ms.saturating_sub(before.since_ms) / 1000
                )
            };
            events.push(
                at_ms,
                "upstream_up",
                Level::Info,
                format!("Upstream `{}` connected{down_for}.", u.name),
            );
        }
        if !before.connected && !after.connected && after.failed_attempts > before.failed_attempts {
            // Repeated failures while down are not news; the first one is (above, or at start).
            if before.failed_attempts == 0 && before.connects == 0 {
                events.push(
                    at_ms,
                    "upstream_down",
                    Level::Warning,
                    format!(
                        "Upstream `{}` cannot be reached{}; data is spooled.",
                        u.name,
                        after
                            .last_error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ),
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
        events.push(
            at_ms,
            "spool_full",
            Level::Warning,
            format!(
                "{} appends refused: the spool is full.",
                b.rejected_full - a.rejected_full
            ),
        );
    }
    let errors = (b.write_errors + b.sync_errors).saturating_sub(a.write_errors + a.sync_errors);
    if errors > 0 {
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
            events.push(
                at_ms,
                "data_dropped",
                Level::Warning,
                format!("{} records given up ({reason}).", after - before),
            );
        }
    }
}
