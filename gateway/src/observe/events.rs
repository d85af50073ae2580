//! The notable events `/status` lists: a bounded ring, oldest dropped first.
//!
//! Events are rare by construction (link transitions, a spool that became full, disk errors,
//! data given up, start and stop): the monitor records a change of state once, not every
//! occurrence, so the ring holds hours of history, never a flood.
//!
//! Subscribers ([`Events::subscribe`], the fleet's `/events` publisher) get every event as it
//! is pushed, through a bounded broadcast channel: one that falls behind by more than
//! [`SUBSCRIBER_QUEUE`] events loses the oldest (it is told how many).

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::status::EventInfo;

/// Events queued for each subscriber at most.
pub const SUBSCRIBER_QUEUE: usize = 64;

/// What an event is about, besides its sentence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detail {
    /// The upstream it concerns.
    pub upstream: Option<String>,
    /// How long the state it ends lasted, seconds.
    pub duration_secs: Option<u64>,
    /// Why (`data_dropped`: `drop_oldest`, `expired` or `corrupt`).
    pub reason: Option<&'static str>,
    /// How many records it concerns (`data_dropped`: given up; `spool_full`: refused).
    pub records: Option<u64>,
}

/// How bad an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Part of normal life (start, an upstream back).
    Info,
    /// Something an operator should look at (an upstream down, data given up).
    Warning,
}

/// The ring.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<VecDeque<EventInfo>>,
    capacity: usize,
    subscribers: broadcast::Sender<EventInfo>,
}

impl Events {
    /// A ring keeping the last `capacity` events (at least one).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Events {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity: capacity.max(1),
            subscribers: broadcast::Sender::new(SUBSCRIBER_QUEUE),
        }
    }

    /// Every event pushed from now on (bounded: see [`SUBSCRIBER_QUEUE`]).
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<EventInfo> {
        self.subscribers.subscribe()
    }

    /// Records an event at `at_ms` (wall clock). Logged at debug only: what it reports was
    /// logged where it happened (the link task, the spool), once.
    pub fn push(&self, at_ms: u64, kind: &'static str, level: Level, message: String) {
        self.push_with(at_ms, kind, level, message, Detail::default());
    }

    /// [`Self::push`] with what the event is about.
    pub fn push_with(
        &self,
        at_ms: u64,
        kind: &'static str,
        level: Level,
        message: String,
        detail: Detail,
    ) {
        tracing::debug!(event = kind, ?level, "{message}");
        let event = EventInfo {
            at_ms,
            kind: kind.to_owned(),
            level: match level {
                Level::Info => "info",
                Level::Warning => "warning",
            }
            .to_owned(),
            message,
            upstream: detail.upstream,
            duration_secs: detail.duration_secs,
            reason: detail.reason.map(str::to_owned),
            records: detail.records,
        };
        // No subscriber is no error.
        let _ = self.subscribers.send(event.clone());
        let mut ring = self.lock();
        if ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    /// The events, oldest first.
    #[must_use]
    pub fn list(&self) -> Vec<EventInfo> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<EventInfo>> {
        // Plain data: a panic elsewhere while holding it leaves it usable.
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_events_in_order() {
        let events = Events::new(2);
        events.push(1, "started", Level::Info, "a".into());
        events.push(2, "upstream_down", Level::Warning, "b".into());
        events.push(3, "upstream_up", Level::Info, "c".into());
        let list = events.list();
        let kinds: Vec<&str> = list.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["upstream_down", "upstream_up"]);
        assert_eq!(list[0].level, "warning");
        assert_eq!(list[1].at_ms, 3);
    }
}
