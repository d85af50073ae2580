//! Per-identity rate limits: two token buckets per identity (messages and bytes), a bounded
//! table of tracked identities with least-recently-used eviction, and a per-identity maximum
//! message size. No IO; time is passed in.
//!
//! A bucket holds at most its burst and refills at its rate; a message takes one message
//! token and `len` byte tokens, both or neither. An identity evicted from a full table comes
//! back with full buckets (it may burst again): the table bounds memory, not the rate, so size
//! it above the number of devices that send at once (`[limits] max_identities`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One rate: a steady rate per second and a burst. `per_second == 0`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// The bucket's size (at least 1).
    pub burst: f64,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        per_second: 0.0,
        burst: 0.0,
    };

    /// Whether this rate limits anything.
    #[must_use]
    pub fn is_limited(&self) -> bool {
        self.per_second > 0.0
    }
}

/// The limits of one identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Messages per second.
    pub messages: Rate,
    /// Payload bytes per second.
    pub bytes: Rate,
    /// The largest payload, in bytes; `None`: only the protocol's own limits.
    pub max_message_size: Option<usize>,
}

impl Limits {
    /// No limit at all.
    pub const NONE: Limits = Limits {
        messages: Rate::UNLIMITED,
        bytes: Rate::UNLIMITED,
        max_message_size: None,
    };

    /// Whether any of these limits applies.
    #[must_use]
    pub fn is_limited(&self) -> bool {
        self.messages.is_limited() || self.bytes.is_limited() || self.max_message_size.is_some()
    }
}

/// `[limits]` compiled: the default, overrides per identity, and the table bound.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsPolicy {
    /// What applies to an identity without an override.
    pub default: Limits,
    /// Overrides by identity name.
    pub per_identity: HashMap<Arc<str>, Limits>,
    /// Identities tracked at once (each ingress keeps its own table).
    pub max_identities: usize,
}

impl Default for LimitsPolicy {
    fn default() -> Self {
        LimitsPolicy {
            default: Limits::NONE,
            per_identity: HashMap::new(),
            max_identities: DEFAULT_MAX_IDENTITIES,
        }
    }
}

/// `[limits] max_identities` by default.
pub const DEFAULT_MAX_IDENTITIES: usize = 10_000;

impl LimitsPolicy {
    /// Whether any limit is configured (otherwise the limiter is never consulted).
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.default.is_limited() || self.per_identity.values().any(Limits::is_limited)
    }

    /// The limits of the identity named `key`.
    #[must_use]
    pub fn limits_of(&self, key: &str) -> &Limits {
        self.per_identity.get(key).unwrap_or(&self.default)
    }
}

/// The limiter's verdict on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limits (its tokens were taken).
    Allowed,
    /// Larger than the identity's `max_message_size`, or than its byte burst (it could never
    /// pass).
    TooLarge,
    /// Over the rate: try again after this long.
    RateLimited {
        /// When enough tokens will be there (at least one millisecond).
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Bucket {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
    }

    /// How long until `need` tokens are there (zero if they are).
    fn wait(&self, rate: Rate, need: f64) -> Duration {
        if self.tokens >= need || rate.per_second <= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64((need - self.tokens) / rate.per_second).unwrap_or(Duration::MAX)
    }
}

#[derive(Debug)]
struct Entry {
    messages: Bucket,
    bytes: Bucket,
    /// Its key in `Limiter::order`.
    used: u64,
}

/// The buckets of the identities seen recently, at most `max_identities` of them.
#[derive(Debug, Default)]
pub struct Limiter {
    entries: HashMap<Arc<str>, Entry>,
    /// Use tick -> identity, oldest first.
    order: BTreeMap<u64, Arc<str>>,
    tick: u64,
    evicted: u64,
}

impl Limiter {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        Limiter::default()
    }

    /// Identities tracked now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no identity is tracked.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Identities evicted to make room since start.
    #[must_use]
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Checks a message of `len` payload bytes from `key` at `now` under `policy` (passed on
    /// each call: a reload takes effect on the next message, buckets kept), and takes its
    /// tokens when it is allowed.
    pub fn check(&mut self, policy: &LimitsPolicy, now: Instant, key: &str, len: usize) -> Verdict {
        self.check_many(policy, now, key, 1, len, len)
    }

    /// As [`Self::check`] for `count` messages at once (an HTTP batch) of `bytes` in all, the
    /// largest `largest` bytes: all are taken or none.
    pub fn check_many(
        &mut self,
        policy: &LimitsPolicy,
        now: Instant,
        key: &str,
        count: usize,
        bytes: usize,
        largest: usize,
    ) -> Verdict {
        let limits = *policy.limits_of(key);
        #[allow(clippy::cast_precision_loss)] // Counts and sizes are far below 2^52.
        let (len_f, count_f) = (bytes as f64, count as f64);
        let len = largest;
        if limits.max_message_size.is_some_and(|max| len > max)
            || (limits.bytes.is_limited() && len_f > limits.bytes.burst)
            || (limits.messages.is_limited() && count_f > limits.messages.burst)
        {
            return Verdict::TooLarge;
        }
        if !limits.messages.is_limited() && !limits.bytes.is_limited() {
            return Verdict::Allowed;
        }
        self.tick += 1;
        let tick = self.tick;
        if let Some((k, e)) = self.entries.get_key_value(key) {
            let k = Arc::clone(k);
            self.order.remove(&e.used);
            self.order.insert(tick, k);
        } else {
            while self.entries.len() >= policy.max_identities.max(1) {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.entries.remove(&oldest);
                self.evicted += 1;
            }
            let k: Arc<str> = Arc::from(key);
            self.order.insert(tick, Arc::clone(&k));
            self.entries.insert(
                k,
                Entry {
                    messages: Bucket::full(limits.messages, now),
                    bytes: Bucket::full(limits.bytes, now),
                    used: tick,
                },
            );
        }
        let Some(entry) = self.entries.get_mut(key) else {
            return Verdict::Allowed;
        };
        entry.used = tick;
        let mut wait = Duration::ZERO;
        if limits.messages.is_limited() {
            entry.messages.refill(limits.messages, now);
            wait = wait.max(entry.messages.wait(limits.messages, count_f));
        }
        if limits.bytes.is_limited() {
            entry.bytes.refill(limits.bytes, now);
            wait = wait.max(entry.bytes.wait(limits.bytes, len_f));
        }
        if wait > Duration::ZERO {
            return Verdict::RateLimited {
                retry_after: wait.max(Duration::from_millis(1)),
            };
        }
        if limits.messages.is_limited() {
            entry.messages.tokens -= count_f;
        }
        if limits.bytes.is_limited() {
            entry.bytes.tokens -= len_f;
        }
        Verdict::Allowed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    #[allow(clippy::disallowed_methods)] // The virtual clock starts at an arbitrary instant.
    fn start() -> Instant {
        Instant::now()
    }

    fn policy(msgs: f64, burst: f64, bytes: f64, byte_burst: f64) -> LimitsPolicy {
        LimitsPolicy {
            default: Limits {
                messages: Rate {
                    per_second: msgs,
                    burst,
                },
                bytes: Rate {
                    per_second: bytes,
                    burst: byte_burst,
                },
                max_message_size: None,
            },
            ..LimitsPolicy::default()
        }
    }

    #[test]
    fn no_limits_allow_everything_and_track_nothing() {
        let mut l = Limiter::new();
        let p = LimitsPolicy::default();
        assert!(!p.is_active());
        let t = start();
        for _ in 0..1000 {
            assert_eq!(l.check(&p, t, "a", 1 << 20), Verdict::Allowed);
        }
        assert!(l.is_empty());
    }

    #[test]
    fn message_bucket_bursts_then_refills_at_its_rate() {
        let mut l = Limiter::new();
        let p = policy(2.0, 3.0, 0.0, 0.0);
        let t0 = start();
        for _ in 0..3 {
            assert_eq!(l.check(&p, t0, "a", 10), Verdict::Allowed);
        }
        let Verdict::RateLimited { retry_after } = l.check(&p, t0, "a", 10) else {
            panic!("fourth message in the same instant must be limited");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        // Another identity has its own bucket.
        assert_eq!(l.check(&p, t0, "b", 10), Verdict::Allowed);
        // Half a second later one token is back, exactly one.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.check(&p, t1, "a", 10), Verdict::Allowed);
        assert!(matches!(
            l.check(&p, t1, "a", 10),
            Verdict::RateLimited { .. }
        ));
        // A long pause refills up to the burst only.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(l.check(&p, t2, "a", 10), Verdict::Allowed);
        }
        assert!(matches!(
            l.check(&p, t2, "a", 10),
            Verdict::RateLimited { .. }
        ));
    }

    #[test]
    fn byte_bucket_takes_both_or_neither() {
        let mut l = Limiter::new();
        let p = policy(100.0, 100.0, 1000.0, 1000.0);
        let t0 = start();
        assert_eq!(l.check(&p, t0, "a", 600), Verdict::Allowed);
        let Verdict::RateLimited { retry_after } = l.check(&p, t0, "a", 600) else {
            panic!("over the byte burst");
        };
        assert_eq!(retry_after, Duration::from_millis(200));
        // The refused message took no message token: 99 small ones still pass.
        for _ in 0..99 {
            assert_eq!(l.check(&p, t0, "a", 1), Verdict::Allowed);
        }
        assert!(matches!(
            l.check(&p, t0, "a", 0),
            Verdict::RateLimited { .. }
        ));
        // Larger than the byte burst can never pass: too large, not limited.
        assert_eq!(l.check(&p, t0, "b", 1001), Verdict::TooLarge);
    }

    #[test]
    fn max_message_size_and_overrides() {
        let mut l = Limiter::new();
        let mut p = LimitsPolicy::default();
        p.default.max_message_size = Some(100);
        p.per_identity.insert(
            Arc::from("big"),
            Limits {
                max_message_size: Some(1000),
                ..Limits::NONE
            },
        );
        assert!(p.is_active());
        let t = start();
        assert_eq!(l.check(&p, t, "a", 100), Verdict::Allowed);
        assert_eq!(l.check(&p, t, "a", 101), Verdict::TooLarge);
        assert_eq!(l.check(&p, t, "big", 1000), Verdict::Allowed);
        assert_eq!(l.check(&p, t, "big", 1001), Verdict::TooLarge);
    }

    #[test]
    fn table_is_bounded_and_evicts_the_least_recently_used() {
        let mut l = Limiter::new();
        let mut p = policy(1.0, 1.0, 0.0, 0.0);
        p.max_identities = 3;
        let t = start();
        for k in ["a", "b", "c"] {
            assert_eq!(l.check(&p, t, k, 0), Verdict::Allowed);
        }
        // "a" used again (limited, but touched): "b" is now the oldest.
        assert!(matches!(
            l.check(&p, t, "a", 0),
            Verdict::RateLimited { .. }
        ));
        assert_eq!(l.check(&p, t, "d", 0), Verdict::Allowed);
        assert_eq!(l.len(), 3);
        assert_eq!(l.evicted(), 1);
        // "a" and "c" kept their empty buckets; "b" was forgotten and starts full.
        assert!(matches!(
            l.check(&p, t, "a", 0),
            Verdict::RateLimited { .. }
        ));
        assert!(matches!(
            l.check(&p, t, "c", 0),
            Verdict::RateLimited { .. }
        ));
        for i in 0..10_000 {
            let _ = l.check(&p, t, &format!("x{i}"), 0);
            assert!(l.len() <= 3);
        }
        assert_eq!(l.order.len(), l.entries.len());
    }
}
