//! The notable events `/status` lists: a bounded ring, oldest dropped first.
//!
//! Events are rare by construction (link transitions, a spool that became full, disk errors,
//! data given up, start and stop): the monitor records a change of state once, not every
//! occurrence, so the ring holds hours of history, never a flood.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::status::EventInfo;

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
}

impl Events {
    /// A ring keeping the last `capacity` events (at least one).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Events {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity: capacity.max(1),
        }
    }

    /// Records an event at `at_ms` (wall clock). Logged at debug only: what it reports was
    /// logged where it happened (the link task, the spool), once.
    pub fn push(&self, at_ms: u64, kind: &'static str, level: Level, message: String) {
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
        };
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
